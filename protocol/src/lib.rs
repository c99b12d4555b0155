//! # thynapse-protocol
//!
//! The Thynapse wire protocol v1 as pure functions: no sockets, no tasks, no
//! clocks. PROTOCOL.md at the repository root is the normative spec; this
//! crate is its executable form.
//!
//! ## Layout
//! - [`thid`]: 160-bit identifiers and the SHA-1 of an event's contents.
//! - [`frame`]: the `J VERB {json}` codec and the event-socket frames.
//! - [`body`]: the JSON body of each verb, and the error codes.
//! - [`pattern`]: channel names and the patterns cells listen to.
//! - [`query`]: metadata queries (JSON and selector strings) and the choice
//!   of a cell.
//! - [`limits`]: every default and limit, named.
//! - [`zmtp`]: ZMTP 3 greetings, frames and handshake commands.
//!
//! ## Example
//! ```
//! use thynapse_protocol::{frame, Verb, Pattern};
//!
//! let f = frame::decode(br#"J LSTN {"pattern":"billing::*","mode":"any"}"#).unwrap();
//! assert_eq!(f.verb, Verb::LSTN);
//! assert!(Pattern::parse("billing::*").unwrap().matches("billing::invoice::paid"));
//! ```

pub mod body;
pub mod frame;
pub mod limits;
pub mod pattern;
pub mod query;
pub mod thid;
pub mod zmtp;

pub use body::{ErrorCode, Mode};
pub use frame::{Frame, FrameError, Verb};
pub use pattern::{Pattern, PatternError};
pub use thid::{Thid, ThidError};
