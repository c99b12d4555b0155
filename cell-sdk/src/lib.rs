//! # thynapse-cell
//!
//! The Thynapse cell SDK: the library a worker ("cell") links to join a
//! transmitter as a member of a service, listen to channel patterns,
//! publish events and acknowledge deliveries. It speaks protocol v1 (see
//! `PROTOCOL.md`) over ZeroMQ through libzmq.
//!
//! A [`Client`] is a cheap, cloneable handle in the async-nats shape. One
//! background thread per connection owns the ZeroMQ sockets (a DEALER on
//! the transmitter's command socket, a SUB on its event socket), since
//! libzmq sockets are not thread-safe; the handles talk to it over
//! channels and wake it through a doorbell it polls beside the sockets.
//! That thread sends heartbeats, batches acks, drops redeliveries of
//! events already processed, joins again when the transmitter has expired
//! the cell or the connection was re-established, and fails over to
//! another transmitter ([`Options::endpoint`]) when its own goes away.
//!
//! ## Delivery semantics
//! - **anycatch** ([`Mode::Any`]): exactly one cell of each listening
//!   service gets each event. With acks (the default) that is
//!   *at-least-once* delivery with a stable event THID: an event whose cell
//!   dies, NACKs or does not ack in time is redelivered to another cell,
//!   and the SDK drops a THID it has already processed (it remembers the
//!   last [`consts::DEDUP_CAPACITY`]), so a handler runs once per event.
//!   Without acks ([`ListenOptions::any_unacked`]) it is at-most-once.
//! - **multicatch** ([`Mode::Multi`]): every listening cell gets the event,
//!   at most once.
//!
//! ## Layout
//! - [`client`]: [`Client`], connect, listen, publish, flush, close.
//! - [`subscription`]: [`Subscription`], a `Stream` of [`Event`]s.
//! - [`event`]: [`Event`] and its ack / nack.
//! - [`options`]: [`Options`] (how to join) and [`ListenOptions`].
//! - [`error`]: [`Error`] and [`ErrorKind`].
//! - [`consts`]: every default and limit of the SDK.
//! - internal: `conn` (the background thread), `link` (channels and
//!   doorbell), `wire` (frames), `batch` (ack batching, dedup set).
//!
//! ## Quick start
//! ```no_run
//! use thynapse_cell::{Client, Mode, Options};
//!
//! # async fn run() -> Result<(), thynapse_cell::Error> {
//! let client = Client::connect("tcp://127.0.0.1:5454", Options::new("billing")).await?;
//!
//! // One cell of "billing" gets each invoice; acked when the event drops.
//! let mut invoices = client.listen("billing::invoice::*", Mode::Any).await?;
//! tokio::spawn(async move {
//!     while let Some(event) = invoices.next_event().await {
//!         println!("{} {}", event.channel(), event.payload_value());
//!     }
//! });
//!
//! client
//!     .publish("billing::invoice::paid", serde_json::json!({"amount": 42}))
//!     .await?;
//! let confirm = client.publish_confirmed("billing::invoice::paid", [1, 2, 3]).await?;
//! println!("routed to {} places", confirm.routed);
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! The async API needs a tokio runtime with its time driver enabled
//! (`#[tokio::main]` has it): request timeouts use `tokio::time`.
//! The doorbell is a Unix datagram socket pair, so the SDK builds on Unix
//! only.

pub mod client;
pub mod consts;
pub mod error;
pub mod event;
pub mod options;
pub mod subscription;

mod batch;
mod conn;
mod link;
mod wire;

pub use client::{Client, Confirm};
pub use error::{Error, ErrorKind};
pub use event::Event;
pub use options::{ListenOptions, Options};
pub use subscription::Subscription;
pub use thynapse_protocol::{Mode, Thid};
