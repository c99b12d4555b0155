//! # thynapse-cell
//!
//! The Thynapse cell SDK: the library a worker ("cell") links to join a
//! transmitter as a member of a service, listen to channel patterns,
//! publish events and acknowledge deliveries. It speaks protocol v1 (see
//! `PROTOCOL.md`) over ZeroMQ's ZMTP 3: its own DEALER on the
//! transmitter's command socket, libzmq's SUB on its event socket.
//!
//! A [`Client`] is a cheap, cloneable handle in the async-nats shape. One
//! connection task per client, on the tokio runtime that connected it,
//! owns the sockets (a DEALER on the transmitter's command socket, which
//! carries every delivery, multicatch events included, read and written
//! by the task itself; a libzmq SUB on its event socket only once
//! [`Client::membership`] asks for one); the handles talk to it over
//! channels and wake it through a doorbell it polls beside the sockets.
//! Clients that follow membership share libzmq contexts for their SUBs,
//! hence libzmq I/O threads (one per hundred clients). That task sends heartbeats, batches
//! acks, drops redeliveries of events already processed, joins again when
//! the transmitter has expired the cell or the connection was
//! re-established, and fails over to another transmitter
//! ([`Options::endpoint`]) when its own goes away.
//!
//! Every message has a fixed cost, so the SDK batches both ways (PROTOCOL.md
//! §23) when the transmitter takes batches: publishes that reach the
//! connection together (a publisher faster than the socket) leave as one
//! message of at most [`consts::EVENT_BATCH_MAX_EVENTS`] events and about
//! [`consts::EVENT_BATCH_MAX_BYTES`], in publish order, and the cell takes
//! the deliveries the transmitter has ready at once in one message. Either
//! way each event is handled as if it travelled alone. Confirmed publishes
//! travel alone.
//!
//! The allocator matters: an event's payload is allocated on the
//! connection task and freed wherever the application drops it, where
//! glibc's arenas contend. A worker that moves many events can link
//! `mimalloc` with its `override` feature (which takes libzmq's `malloc`
//! too) and declare it the `#[global_allocator]`; the `thynapse` binary and
//! the benchmarks do (`docs/BENCHMARKS.md`: about a fifth less client CPU
//! per event).
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
//!   at most once: a cell that falls far behind loses events, which the
//!   transmitter counts, and one stuck for long is removed as a slow
//!   consumer (PROTOCOL.md §21).
//!
//! ## Request/reply
//! A responder serves a channel pattern with a handler
//! ([`Client::serve`]); a requester sends a request on a channel and
//! awaits the first reply ([`Client::request`], or [`Client::request_json`]
//! for serde types):
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use thynapse_cell::{Client, Options, Request};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add { a: i64, b: i64 }
//! #[derive(Serialize, Deserialize)]
//! struct Sum { sum: i64 }
//!
//! # async fn run() -> Result<(), thynapse_cell::Error> {
//! let server = Client::connect("tcp://127.0.0.1:5454", Options::new("calc")).await?;
//! let _responder = server
//!     .serve("calc::add", |request: Request| async move {
//!         let add: Add = request.payload().map_err(|e| e.to_string())?;
//!         Ok::<_, String>(Sum { sum: add.a + add.b })
//!     })
//!     .concurrency(10)
//!     .await?;
//!
//! let client = Client::connect("tcp://127.0.0.1:5454", Options::new("shop")).await?;
//! let sum: Sum = client.request_json("calc::add", &Add { a: 2, b: 3 }).await?;
//! assert_eq!(sum.sum, 5);
//! # Ok(())
//! # }
//! ```
//!
//! A request goes to one cell among those that serve a pattern matching
//! its channel (narrowed with [`RequestBuilder::service`] and
//! [`RequestBuilder::matching`]), in this transmitter's mesh. It fails
//! with [`ErrorKind::NoResponders`] at once when there is none, with
//! [`ErrorKind::TimedOut`] when no reply comes in time (default 5 s,
//! [`RequestBuilder::timeout`]), and with [`ErrorKind::Rejected`] carrying
//! the handler's message when the handler returned `Err`. A responder that
//! dies or stops holding a request hands it to another responder.
//! [`RequestBuilder::retry`] sends the request again after an interval
//! without reply; the first reply wins. Requests and events never mix:
//! requests reach responders only, events reach [`Subscription`]s only.
//!
//! ## Flow control
//! A cell takes a bounded number of deliveries at once, and the
//! transmitter keeps the rest:
//! - every acked anycatch listen has a `concurrency`
//!   ([`ListenOptions::concurrency`], default 1024 at the transmitter):
//!   the cell holds at most that many deliveries of it unanswered (not
//!   yet acked, nacked or replied to); further ones wait at the
//!   transmitter, which hands each to the least busy cell of the service;
//! - a responder's concurrency ([`ServeBuilder::concurrency`], default
//!   [`consts::DEFAULT_SERVE_CONCURRENCY`]) is both its listen's
//!   `concurrency` and the number of handlers it runs at once, so a slow
//!   responder is sent fewer requests and a busy service's requests go to
//!   its idle cells (the transmitter counts a cell's limit as the sum over
//!   its acked anycatch listens: requests beyond the responder's own
//!   concurrency that a cell with other listens is sent wait in the SDK);
//! - publishing waits when the connection task cannot keep up (a
//!   bounded command queue, [`consts::COMMAND_QUEUE_CAPACITY`]) or the
//!   transmitter reads slower than the cell writes.
//!
//! ## Metadata, targeted sends, discovery, membership
//! A cell's metadata ([`Options::metadata`], changed with
//! [`Client::update_metadata`]) lets senders choose among the cells of a
//! service: [`Client::send_to`] sends to one (or every) cell whose
//! metadata matches a query (`"version>=2.0.0,region=eu"`),
//! [`RequestBuilder::matching`] narrows a request's responders the same
//! way, [`Client::discover`] asks what services, instances, hosts,
//! regions and versions the mesh holds, and [`Client::membership`]
//! streams cells joining, leaving and changing.
//!
//! ## Layout
//! - [`client`]: [`Client`], connect, listen, publish, flush, close, and
//!   the entry points of the features below.
//! - [`subscription`]: [`Subscription`], a `Stream` of [`Event`]s.
//! - [`event`]: [`Event`] and its ack / nack.
//! - [`request`]: [`RequestBuilder`] and [`Reply`] (the requester's side).
//! - [`serve`]: [`ServeBuilder`], [`Responder`], [`Request`] and the
//!   [`Handler`] trait (the responder's side).
//! - [`targeted`]: [`SendTo`], sends chosen by metadata.
//! - [`discovery`]: [`Discover`], questions about the mesh.
//! - [`membership`]: [`MembershipStream`] of [`MembershipEvent`]s.
//! - [`options`]: [`Options`] (how to join) and [`ListenOptions`].
//! - [`error`]: [`Error`] and [`ErrorKind`].
//! - [`consts`]: every default and limit of the SDK.
//! - internal: `conn` (the connection task), `dealer` (the command
//!   socket's ZMTP), `context` (the libzmq contexts the SUBs share), `link`
//!   (channels and doorbell), `wire`
//!   (frames), `batch` (ack and event batching, dedup set).
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
//! The async API needs a tokio runtime with its I/O and time drivers
//! enabled (`#[tokio::main]` and `#[tokio::test]` have both): the
//! connection task waits through the runtime's reactor, and request
//! timeouts use `tokio::time`. Like any task, it runs only while the
//! runtime runs: a client whose runtime shuts down says `GBYE` as it is
//! dropped, without waiting for the transmitter's answer. The connection
//! registers its sockets' descriptors in the runtime's reactor, so the SDK
//! builds on Unix only (it is tested on Linux).

pub mod client;
pub mod consts;
pub mod discovery;
pub mod error;
pub mod event;
pub mod membership;
pub mod options;
pub mod request;
pub mod serve;
pub mod subscription;
pub mod targeted;

mod batch;
mod conn;
mod context;
mod dealer;
mod link;
mod wire;

pub use client::{Client, Confirm};
pub use discovery::Discover;
pub use error::{Error, ErrorKind};
pub use event::Event;
pub use membership::{MembershipChange, MembershipEvent, MembershipStream};
pub use options::{ListenOptions, Options};
pub use request::{Reply, RequestBuilder};
pub use serve::{Handler, Request, Responder, ServeBuilder};
pub use subscription::Subscription;
pub use targeted::SendTo;
pub use thynapse_protocol::{Mode, Thid};
