//! Every default and limit of the SDK, in one place.
//!
//! The protocol's own defaults (endpoints, heartbeat, frame size) live in
//! [`thynapse_protocol::limits`]; these are the SDK's choices on top.

use std::time::Duration;

/// How long [`Client::connect`](crate::Client::connect) waits for the
/// transmitter's `WLCM` before failing with
/// [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request that expects an answer (`LSTN`, a confirmed `EVNT`,
/// a flush) waits for it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Client::request`](crate::Client::request) waits for a reply
/// unless told otherwise: sent as the request's `timeout_ms`, after which
/// the transmitter answers `ERRR timed_out`. The protocol's default too.
pub const DEFAULT_REPLY_TIMEOUT: Duration =
    Duration::from_millis(thynapse_protocol::limits::DEFAULT_REQUEST_TIMEOUT_MS);

/// How much longer than a request's timeout the SDK waits for the
/// transmitter's `timed_out` before it gives up on its own (a transmitter
/// that went away answers nothing).
pub const REPLY_TIMEOUT_GRACE: Duration = Duration::from_millis(500);

/// How many handlers [`Client::serve`](crate::Client::serve) runs at once
/// unless told otherwise; also the listen's `concurrency`, so the
/// transmitter holds back further requests (and sends them to less busy
/// cells) rather than queueing them in this process.
pub const DEFAULT_SERVE_CONCURRENCY: u32 = 5;

/// Receive and send high-water mark of the SDK's libzmq SUB, in messages.
/// libzmq's default (1000) drops or blocks on ordinary bursts.
pub const SOCKET_HWM: i32 = 100_000;

/// How long a closing SUB keeps trying to deliver what it queued (its
/// unsubscriptions), in ms.
pub const SOCKET_LINGER_MS: i32 = 1_000;

/// Most clients of a process that share one libzmq context (and its I/O
/// thread) for their SUBs; a context holds at most 1023 sockets.
pub const CLIENTS_PER_CONTEXT: usize = 100;

/// How long closing a client waits for the transmitter to confirm (the
/// `PONG` of a last `PING`) that it has read the final acks and `GBYE`.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The PLAIN user name the SDK presents when a token is set; transmitters
/// accept any user name and check only the password.
pub const PLAIN_USERNAME: &str = "cell";

/// An ack batch is flushed once it holds this many ids...
pub const ACK_BATCH_MAX_IDS: usize = 64;

/// ...or once its oldest id has waited this long. The connection task's
/// poll clock ticks in milliseconds, so on an otherwise idle connection a
/// batch leaves within about 1 ms; under load, within this delay.
pub const ACK_BATCH_MAX_DELAY: Duration = Duration::from_micros(500);

/// Most events the SDK sends in one batch (`J EVNT [...]`, PROTOCOL.md
/// §23): publishes that are ready at the same time share a message. The
/// transmitter keeps 258 frames of a message, so 256 events with binary
/// frames is the protocol's limit.
pub const EVENT_BATCH_MAX_EVENTS: usize = 256;

/// About the most bytes (all frames together) of one batch of events; an
/// event that would take a batch past it starts the next one.
pub const EVENT_BATCH_MAX_BYTES: usize = 64 * 1024;

/// How many acknowledged event THIDs the SDK remembers to recognise a
/// redelivery of an event it already processed.
pub const DEDUP_CAPACITY: usize = 100_000;

/// Commands from the async side that may wait for the connection task
/// before `publish` and friends start to wait (backpressure).
pub const COMMAND_QUEUE_CAPACITY: usize = 1024;

/// Most messages read from one socket before the connection task looks
/// at its other sockets and its clock again (fairness).
pub const READ_BURST: usize = 512;

/// Environment variable naming the service ([`Options::from_env`](crate::Options::from_env)).
pub const ENV_SERVICE: &str = "THYNAPSE_SERVICE";
/// Environment variable holding the token.
pub const ENV_TOKEN: &str = "THYNAPSE_TOKEN";
/// Environment variable holding the command endpoint (or several,
/// comma-separated: the first is used, the others are kept for failover).
pub const ENV_ENDPOINT: &str = "THYNAPSE_ENDPOINT";
