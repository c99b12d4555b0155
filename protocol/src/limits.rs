//! Every default and limit of protocol v1, in one place.

/// Default command endpoint of a transmitter.
pub const DEFAULT_COMMAND_ENDPOINT: &str = "tcp://127.0.0.1:5454";
/// Default event endpoint of a transmitter.
pub const DEFAULT_EVENT_ENDPOINT: &str = "tcp://127.0.0.1:5455";
/// Default largest frame (each frame of a message) a transmitter accepts: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;
/// Default interval at which cells send PING when otherwise silent.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;
/// A cell silent for this many heartbeat intervals is expired.
pub const HEARTBEAT_MISSES: u64 = 3;
/// Default time a cell has to ACKN an anycatch delivery before it is
/// redelivered to another cell.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 30_000;
/// Longest channel name or pattern, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;
/// Longest service name, in bytes.
pub const MAX_SERVICE_LEN: usize = 128;
/// Most patterns one cell may listen to.
pub const MAX_LISTENS_PER_CELL: usize = 1024;
/// ZAP domain used by transmitters for cell connections.
pub const ZAP_DOMAIN: &str = "thynapse";
/// Deliveries a cell may hold unacked per listen when its LSTN names no
/// `concurrency` (requests count too). Further ones wait at the transmitter.
pub const DEFAULT_CONCURRENCY: u32 = 1024;
/// Largest `concurrency` a listen may declare; larger values are capped.
pub const MAX_CONCURRENCY: u32 = 65_536;
/// Default time a request waits for its reply.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5000;
/// Deliveries that may wait at the transmitter for one cell; past it they
/// are counted as dropped and redelivered after the ack timeout.
pub const MAX_QUEUED_PER_CELL: usize = 10_000;
/// A cell whose queue stays full this long is disconnected (`slow_consumer`).
pub const SLOW_CONSUMER_MS: u64 = 5000;
