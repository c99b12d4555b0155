//! Transmitter settings and their defaults.

use std::time::Duration;

use thynapse_protocol::limits;

/// Default high-water mark (messages queued per peer) on both sockets. It
/// bounds what one consumer that stops reading can cost: at 1 KiB a message
/// about 10 MiB per peer (100,000 let a single stuck cell grow the
/// transmitter past 300 MiB).
pub const DEFAULT_HWM: i32 = 10_000;
/// High-water mark of the link to each other transmitter of the mesh. One
/// link carries the traffic of all of a transmitter's cells, so it is
/// deeper than a cell's queue: a burst of multicatch events for a remote
/// transmitter filled 10,000 at once and lost a fifth of a run. Anycatch
/// deliveries that wait for acks never fill it (the origin keeps to each
/// remote cell's limit).
pub const MESH_HWM: i32 = 100_000;
/// Most deliveries one service may have waiting at the transmitter for a
/// free slot (or for a cell to listen again); past it, or past
/// [`MAX_BACKLOG_BYTES_PER_SERVICE`], deliveries are dropped and counted.
/// A publisher that outruns acked consumers fills it: 100,000 lost a
/// third of a 200,000-event run once publishers sent batches.
pub const MAX_BACKLOG_PER_SERVICE: usize = 1_000_000;
/// Most bytes (payloads and about 256 bytes of bookkeeping each) one
/// service's waiting deliveries may hold.
pub const MAX_BACKLOG_BYTES_PER_SERVICE: usize = 512 * 1024 * 1024;
/// How often the router checks heartbeats and ack deadlines.
pub const TICK: Duration = Duration::from_millis(50);
/// How long sockets try to flush queued messages when closing.
pub const LINGER: Duration = Duration::from_millis(1000);

/// Everything a transmitter needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Endpoint the ROUTER command socket binds (port 0 picks a free port).
    pub command: String,
    /// Endpoint the XPUB event socket binds (port 0 picks a free port).
    pub event: String,
    /// Event endpoint announced in WLCM, when it differs from the bound one
    /// (binding 0.0.0.0, NAT).
    pub advertise: Option<String>,
    /// Shared secret every cell must present (PLAIN password); none = open.
    pub token: Option<String>,
    /// Largest frame accepted, in bytes; a larger one cuts the connection.
    pub max_frame: usize,
    /// Heartbeat interval announced to cells.
    pub heartbeat: Duration,
    /// Time a cell has to ack a delivery before it is redelivered.
    pub ack_timeout: Duration,
    /// Whether to gossip with other transmitters (UDP on the command
    /// port's number).
    pub mesh: bool,
    /// Command endpoints of transmitters to join.
    pub join: Vec<String>,
    /// Secret transmitters present to each other; needs `token`.
    pub mesh_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            command: limits::DEFAULT_COMMAND_ENDPOINT.to_owned(),
            event: limits::DEFAULT_EVENT_ENDPOINT.to_owned(),
            advertise: None,
            token: None,
            max_frame: limits::DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_millis(limits::DEFAULT_HEARTBEAT_MS),
            ack_timeout: Duration::from_millis(limits::DEFAULT_ACK_TIMEOUT_MS),
            mesh: true,
            join: Vec::new(),
            mesh_secret: None,
        }
    }
}

impl Config {
    /// Defaults, but both sockets on free loopback ports: what tests use.
    pub fn for_tests() -> Self {
        Config {
            command: "tcp://127.0.0.1:0".to_owned(),
            event: "tcp://127.0.0.1:0".to_owned(),
            ..Config::default()
        }
    }
}
