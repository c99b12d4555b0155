//! # thynapse-transmitter
//!
//! The Thynapse transmitter as a library: the daemon that cells join. The
//! `thynapse` binary is a thin shell over it.
//!
//! ## Layout
//! - [`config`]: settings, defaults and limits.
//! - [`router`]: the routing state machine (cells, listens, deliveries,
//!   acks), free of I/O.
//! - [`server`]: the router thread that owns the command and event sockets.
//! - [`command_socket`]: the ROUTER command socket, ZMTP 3 read and written
//!   on the router thread.
//! - [`coalesce`]: merges deliveries to a cell into batch frames.
//! - [`discovery`]: answers about services, instances, hosts, regions.
//! - [`mesh`]: gossip membership and the view of other transmitters' cells.
//! - [`auth`]: the token check at every handshake (the command socket's
//!   PLAIN, and the ZAP handler for the event socket).
//! - [`metrics`]: lock-free counters.
//!
//! ## Example
//! ```no_run
//! use thynapse_transmitter::{Config, Transmitter};
//!
//! let mut t = Transmitter::start(Config::for_tests()).unwrap();
//! println!("cells connect to {}", t.command_endpoint());
//! t.shutdown();
//! ```

pub mod auth;
pub mod coalesce;
pub mod command_socket;
pub mod config;
pub mod discovery;
pub mod mesh;
pub mod metrics;
pub mod router;
pub mod server;

pub use config::Config;
pub use server::{StartError, Transmitter};
