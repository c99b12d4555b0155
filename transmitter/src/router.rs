//! The routing state machine: cells, listens, deliveries and acks.
//!
//! [`Router`] owns all routing state and does no I/O: the router thread
//! (see [`crate::server`]) feeds it commands and clock ticks and sends the
//! [`Output`]s it produces. That keeps it testable without sockets.

use std::borrow::Cow;
use std::collections::VecDeque;

// THIDs are keys on the hot path: foldhash (seeded per process) instead
// of SipHash.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thynapse_protocol::body::{
    self, Ack, Confirm, Discover, ErrorReply, Goodbye, Hello, Limits, Listen, MeshAck,
    MeshDelivery, MetaUpdate, Publish, Ref, Reply, Request, Targeted, Unlisten, Welcome,
};
use thynapse_protocol::frame::BatchFrames;
use thynapse_protocol::limits::{
    DEFAULT_CONCURRENCY, DEFAULT_REQUEST_TIMEOUT_MS, HEARTBEAT_MISSES, MAX_CONCURRENCY,
    MAX_LISTENS_PER_CELL, MAX_QUEUED_PER_CELL, MAX_SERVICE_LEN,
};
use thynapse_protocol::query::{Outcome, Query};
use thynapse_protocol::{frame, pattern, ErrorCode, Mode, Pattern, Thid, Verb};

use crate::coalesce::{Batching, MAX_ITEMS};
use crate::config::{Config, MAX_BACKLOG_BYTES_PER_SERVICE, MAX_BACKLOG_PER_SERVICE};
use crate::discovery::{self, Instance, InstanceListen};
use crate::mesh::{CellRecord, ListenRecord, NodeRecord};
use crate::metrics::Metrics;

/// A ZeroMQ routing id: which connection a command came from.
pub type PeerId = Arc<[u8]>;

/// What the router asks the socket thread to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A message to one cell over the command socket.
    ToPeer {
        /// The cell's connection.
        peer: PeerId,
        /// The command frame.
        frame: Vec<u8>,
        /// The optional binary payload frame.
        binary: Option<Arc<[u8]>>,
    },
    /// A message to another transmitter of the mesh.
    ToNode {
        /// The transmitter's THID.
        node: Thid,
        /// The command frame (`MDLV`, `MACK`, `MEVT`).
        frame: Vec<u8>,
        /// The optional binary payload frame.
        binary: Option<Arc<[u8]>>,
    },
    /// A multicatch event to one cell over the command socket: dropped and
    /// counted, never queued, when the cell's queue is full.
    Multicatch {
        /// The cell's connection.
        peer: PeerId,
        /// The `J EVNT {json}` frame, shared by the cells it goes to.
        frame: Arc<[u8]>,
        /// The optional binary payload frame.
        binary: Option<Arc<[u8]>>,
    },
    /// A message on the event socket (membership events).
    Publish {
        /// The `MEMB <service> {json}` frame.
        frame: Vec<u8>,
        /// The optional binary payload frame.
        binary: Option<Arc<[u8]>>,
    },
    /// Several `DLVR`s, or multicatch `EVNT`s, to one cell that takes
    /// batches, merged at send time ([`crate::coalesce`]).
    Batch {
        /// The cell's connection.
        peer: PeerId,
        /// The merged messages.
        merged: Merged,
        /// Whether they are multicatch events (dropped, not redelivered,
        /// when the cell's queue is full).
        multicatch: bool,
    },
    /// Several `MDLV`s, or `MEVT`s, to another transmitter, merged at send
    /// time ([`crate::coalesce`]).
    NodeBatch {
        /// The transmitter's THID.
        node: Thid,
        /// The merged messages.
        merged: Merged,
    },
}

impl Output {
    /// The command frame it sends (for a batch, the merged one).
    pub fn frame(&self) -> &[u8] {
        match self {
            Output::ToPeer { frame, .. }
            | Output::ToNode { frame, .. }
            | Output::Publish { frame, .. } => frame,
            Output::Multicatch { frame, .. } => frame,
            Output::Batch { merged, .. } | Output::NodeBatch { merged, .. } => &merged.frame,
        }
    }

    /// Whether its binary payloads go out in one frame (a packed batch).
    pub fn packed(&self) -> bool {
        matches!(self, Output::Batch { merged, .. } | Output::NodeBatch { merged, .. } if merged.packed)
    }

    /// The binary frames that follow its command frame (of a packed
    /// batch, the payloads that go out as one).
    pub fn binaries(&self) -> &[Arc<[u8]>] {
        match self {
            Output::ToPeer { binary, .. }
            | Output::ToNode { binary, .. }
            | Output::Publish { binary, .. }
            | Output::Multicatch { binary, .. } => binary.as_slice(),
            Output::Batch { merged, .. } | Output::NodeBatch { merged, .. } => &merged.binaries,
        }
    }
}

/// Messages of one verb merged into one: `J VERB [{json},...]` and their
/// binary frames, one each or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// `J VERB [{json},...`, with the closing bracket once complete.
    pub frame: Vec<u8>,
    /// One binary frame per message, or none.
    pub binaries: Vec<Arc<[u8]>>,
    /// How many messages it carries.
    pub count: u32,
    /// Its size, frames together.
    pub bytes: usize,
    /// Whether its binary frames go out as one (the cell takes packed
    /// batches); each body then says its `bin` length.
    pub packed: bool,
}

/// Why a cell left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// It said GBYE.
    Bye,
    /// It missed its heartbeats.
    HeartbeatTimeout,
    /// Its connection is gone (the socket could not reach it).
    Unreachable,
    /// A new connection said HELO with its THID after the old one fell
    /// silent.
    Replaced,
    /// Its queue stayed full: it does not keep up.
    SlowConsumer,
}

/// One listened pattern of a cell.
#[derive(Debug)]
struct ListenEntry {
    pattern: Pattern,
    mode: Mode,
    ack: bool,
    /// Deliveries of this listen the cell takes at once.
    concurrency: u32,
}

/// A welcomed cell: a record, not a task.
#[derive(Debug)]
struct Cell {
    /// Its connection, to address replies and deliveries.
    peer: PeerId,
    /// Its service; anycatch picks one cell per service.
    service: Arc<str>,
    /// Its metadata, with the reserved keys the transmitter sets.
    metadata: Map<String, Value>,
    /// What it listens to.
    listens: Vec<ListenEntry>,
    /// How many deliveries it takes at once, [`limit_of`] its listens.
    limit: u32,
    /// Last time anything arrived from it (heartbeat expiry).
    last_seen: Instant,
    /// Sequence counter for its events that carry no `seq`.
    seq: u64,
    /// Deliveries sent to it that await ACKN, NACK or RPLY, by event THID:
    /// only these hold one of its slots.
    held: HashSet<Thid>,
    /// Deliveries waiting for a free slot, in order.
    queue: VecDeque<Queued>,
    /// Whether it said it takes batches (HELO `batch`).
    batch: bool,
    /// Whether it said it takes packed batches too (HELO `packed`).
    packed: bool,
}

impl Cell {
    /// How many deliveries it takes at once.
    fn limit(&self) -> u32 {
        self.limit
    }
}

/// How many deliveries a cell with `listens` takes at once: the sum over
/// its acked anycatch listens, and at least one.
fn limit_of(listens: &[ListenEntry]) -> u32 {
    listens
        .iter()
        .filter(|l| l.mode == Mode::Any && l.ack)
        .map(|l| l.concurrency)
        .fold(0u32, u32::saturating_add)
        .max(1)
}

/// A delivery frame waiting for a cell to have a free slot.
#[derive(Debug)]
struct Queued {
    /// (event, cell): a delivery that was settled elsewhere while it
    /// waited (timed out, redelivered) is not sent.
    key: (Thid, Thid),
    frame: Vec<u8>,
    binary: Option<Arc<[u8]>>,
}

/// Who waits for the reply to a request.
#[derive(Debug)]
struct Requester {
    /// The requester's connection.
    peer: PeerId,
    /// The `ref` of its RQST.
    reference: Option<Value>,
    /// When it gives up.
    deadline: Instant,
}

/// An event kept while some delivery of it awaits an ack.
#[derive(Debug)]
struct EventData {
    id: Thid,
    channel: Arc<str>,
    payload: Option<Vec<u8>>,
    binary: Option<Arc<[u8]>>,
    from: Thid,
}

/// The deliveries of one service waiting for a free slot, oldest first,
/// bounded by [`MAX_BACKLOG_PER_SERVICE`] and
/// [`MAX_BACKLOG_BYTES_PER_SERVICE`].
#[derive(Debug, Default)]
struct Backlog {
    queue: VecDeque<InFlight>,
    /// What the queued events hold, roughly ([`EventData::size`]).
    bytes: usize,
}

impl Backlog {
    /// Queues `f` unless the backlog is full; says whether it did.
    fn push(&mut self, f: InFlight) -> bool {
        let size = f.event.size();
        let full = self.queue.len() >= MAX_BACKLOG_PER_SERVICE
            || self.bytes + size > MAX_BACKLOG_BYTES_PER_SERVICE;
        if !full {
            self.bytes += size;
            self.queue.push_back(f);
        }
        !full
    }

    fn pop(&mut self) -> Option<InFlight> {
        let f = self.queue.pop_front()?;
        self.bytes -= f.event.size();
        Some(f)
    }
}

impl EventData {
    /// Bytes it holds, with an allowance for the bookkeeping around it.
    fn size(&self) -> usize {
        const OVERHEAD: usize = 256;
        OVERHEAD
            + self.channel.len()
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.binary.as_ref().map_or(0, |b| b.len())
    }
}

/// Where a delivery goes when its cell fails it.
#[derive(Debug, Clone)]
enum Retarget {
    /// Any other cell of the service that listens to the channel.
    Service,
    /// Another such cell whose metadata matches the query (`SEND`).
    Query(Arc<Query>),
    /// Nowhere: the delivery went to every matching cell already.
    Never,
}

/// A delivery awaiting ACKN, keyed by (event, cell).
#[derive(Debug)]
struct InFlight {
    event: Arc<EventData>,
    service: Arc<str>,
    attempt: u32,
    retarget: Retarget,
    /// Set for a request: it is delivered as RQST and answered by RPLY.
    request: bool,
}

/// One cell an anycatch event may go to.
#[derive(Debug, Clone, Copy)]
struct Target {
    cell: Thid,
    /// Whether its listen wants ACKN.
    ack: bool,
    /// The transmitter that owns it; `None` for a local cell.
    node: Option<Thid>,
}

/// The anycatch targets of one service for one channel.
#[derive(Debug)]
struct ServiceRoute {
    service: Arc<str>,
    /// Candidate cells, local and remote, in THID order.
    cells: Vec<Target>,
    /// The service's round-robin cursor, shared with its other routes.
    cursor: Cursor,
}

/// A round-robin cursor: the router thread alone moves it, so plain
/// loads and stores do.
type Cursor = Arc<AtomicUsize>;

/// The turn `cursor` is at, moving it on.
fn next_turn(cursor: &AtomicUsize) -> usize {
    let turn = cursor.load(Ordering::Relaxed);
    cursor.store(turn.wrapping_add(1), Ordering::Relaxed);
    turn
}

/// Where a channel's events go, computed from the listens and cached
/// until the listens change.
#[derive(Debug, Default)]
struct Route {
    /// The channel, shared by the events routed on it.
    channel: Arc<str>,
    any: Vec<ServiceRoute>,
    /// Local cells that listen in multicatch mode.
    multi: Vec<Thid>,
    /// Other transmitters with a multicatch listener.
    multi_nodes: Vec<Thid>,
}

impl Route {
    /// Whether nobody listens to the channel.
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.multi.is_empty() && self.multi_nodes.is_empty()
    }
}

/// A cell of another transmitter, as the mesh view describes it.
#[derive(Debug)]
struct RemoteCell {
    service: Arc<str>,
    metadata: Map<String, Value>,
    listens: Vec<ListenEntry>,
    /// How many deliveries it takes at once, [`limit_of`] its listens.
    limit: u32,
}

/// A cell of the view, local or remote, as routing and discovery see it.
struct ViewCell<'a> {
    id: &'a Thid,
    service: &'a Arc<str>,
    metadata: &'a Map<String, Value>,
    listens: &'a [ListenEntry],
    /// The transmitter that owns it; `None` for a local cell.
    node: Option<Thid>,
}

/// Another transmitter of the mesh and its cells.
#[derive(Debug)]
struct RemoteNode {
    /// Its command endpoint, where mesh messages go.
    command: String,
    cells: HashMap<Thid, RemoteCell>,
    /// Whether it takes batches of mesh messages.
    batch: bool,
    /// Whether it takes them packed.
    packed: bool,
}

/// Most channels whose routes are cached before the cache is emptied.
const MAX_CACHED_ROUTES: usize = 65_536;

/// The routing state machine of one transmitter.
#[derive(Debug)]
pub struct Router {
    /// The transmitter's THID, announced in WLCM and as `from` nowhere else.
    id: Thid,
    /// The WLCM body fields that do not change.
    event_endpoint: String,
    heartbeat: Duration,
    ack_timeout: Duration,
    max_frame: usize,
    /// Welcomed cells by THID.
    cells: HashMap<Thid, Cell>,
    /// Which cell each connection is.
    peers: HashMap<PeerId, Thid>,
    /// Route cache by channel; emptied whenever listens change.
    routes: HashMap<String, Arc<Route>>,
    /// Round-robin cursor per service.
    cursors: HashMap<Arc<str>, Cursor>,
    /// Deliveries awaiting an ack, by (event, cell).
    in_flight: HashMap<(Thid, Thid), InFlight>,
    /// Ack deadlines in the order they were set (the timeout is constant,
    /// so this is also deadline order); stale entries are skipped.
    deadlines: VecDeque<(Instant, Thid, Thid, u32)>,
    /// Redeliveries waiting for a cell of their service to listen again.
    backlog: HashMap<Arc<str>, Backlog>,
    /// The other transmitters of the mesh and their cells.
    remote: HashMap<Thid, RemoteNode>,
    /// Deliveries other transmitters forwarded to our cells, by (event,
    /// cell), with the origin that awaits the ack.
    proxied: HashMap<(Thid, Thid), Thid>,
    /// Whether the local cells changed since the mesh last heard of them.
    view_dirty: bool,
    /// Network addresses of connections that sent HELO, noted by the socket
    /// thread, taken into the cell's `host` metadata.
    addresses: HashMap<PeerId, String>,
    /// Deliveries we sent to other transmitters' cells that await an
    /// answer, by cell: the load used to pick the least busy cell.
    remote_load: HashMap<Thid, u32>,
    /// Requests made here that await their reply, by request THID.
    requests: HashMap<Thid, Requester>,
    /// Request deadlines in time order.
    request_deadlines: std::collections::BTreeSet<(Instant, Thid)>,
    /// Counters shared with the rest of the process.
    metrics: Arc<Metrics>,
    /// Set once shutdown began: new cells are refused.
    stopping: bool,
    /// Scratch buffer for frames, reused.
    scratch: Vec<u8>,
    /// The time of the command or tick being handled.
    clock: Instant,
}

/// A failed command: the code, an explanation and what it refers to.
struct Failure {
    code: ErrorCode,
    message: String,
    re: Option<Value>,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>, re: Option<Value>) -> Self {
        Failure {
            code,
            message: message.into(),
            re,
        }
    }
}

type Handled = Result<(), Failure>;

impl Router {
    /// A router for a transmitter with THID `id` whose event socket is
    /// reachable at `event_endpoint`.
    pub fn new(id: Thid, event_endpoint: String, config: &Config, metrics: Arc<Metrics>) -> Self {
        Router {
            id,
            event_endpoint,
            heartbeat: config.heartbeat,
            ack_timeout: config.ack_timeout,
            max_frame: config.max_frame,
            cells: HashMap::new(),
            peers: HashMap::new(),
            routes: HashMap::new(),
            cursors: HashMap::new(),
            in_flight: HashMap::new(),
            deadlines: VecDeque::new(),
            backlog: HashMap::new(),
            remote: HashMap::new(),
            proxied: HashMap::new(),
            view_dirty: true,
            addresses: HashMap::new(),
            remote_load: HashMap::new(),
            requests: HashMap::new(),
            request_deadlines: std::collections::BTreeSet::new(),
            metrics,
            stopping: false,
            scratch: Vec::with_capacity(256),
            clock: Instant::now(),
        }
    }

    /// Number of welcomed cells.
    pub fn cell_count(&self) -> usize {
        self.cells.len()
    }

    /// Number of deliveries awaiting an ack.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Handles one message from `peer`: its command frame and the optional
    /// binary frame. `mesh_ok` says whether the peer may send mesh verbs
    /// (it authenticated as a transmitter, or no mesh secret is set). Every
    /// failure becomes an ERRR to the sender.
    pub fn handle(
        &mut self,
        peer: &[u8],
        parts: &[&[u8]],
        mesh_ok: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        Metrics::incr(&self.metrics.commands);
        self.clock = now;
        if let Err(f) = self.dispatch(peer, parts, mesh_ok, now, out) {
            self.fail(peer, f, out);
        }
    }

    /// Answers a command that failed with `ERRR`, and counts it.
    fn fail(&self, peer: &[u8], f: Failure, out: &mut Vec<Output>) {
        self.metrics.error(f.code);
        let reply = ErrorReply {
            code: f.code,
            message: f.message,
            re: f.re,
        };
        out.push(to_peer(peer, frame::encode_json(Verb::ERRR, &reply)));
    }

    /// How transmitter `node` takes batches of mesh messages.
    pub fn node_batching(&self, node: &Thid) -> Batching {
        match self.remote.get(node) {
            Some(n) if n.packed => Batching::Packed,
            Some(n) if n.batch => Batching::Frames,
            _ => Batching::Off,
        }
    }

    /// How the cell on connection `peer` takes batches (HELO `batch` and
    /// `packed`).
    pub fn batching(&self, peer: &[u8]) -> Batching {
        match self.peers.get(peer).and_then(|id| self.cells.get(id)) {
            Some(c) if c.packed => Batching::Packed,
            Some(c) if c.batch => Batching::Frames,
            _ => Batching::Off,
        }
    }

    fn dispatch(
        &mut self,
        peer: &[u8],
        parts: &[&[u8]],
        mesh_ok: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        let Some((&command, binaries)) = parts.split_first() else {
            return Err(Failure::new(
                ErrorCode::BadMultipart,
                "a message is a command frame and at most one binary frame, got 0 frames",
                None,
            ));
        };
        if binaries.len() > MAX_ITEMS as usize {
            return Err(Failure::new(
                ErrorCode::BadMultipart,
                format!(
                    "a message has at most {} frames (a batch of {MAX_ITEMS} events with their binary frames), got {}",
                    MAX_ITEMS + 1,
                    parts.len()
                ),
                None,
            ));
        }
        if command.len() > self.max_frame {
            return Err(Failure::new(
                ErrorCode::TooLarge,
                format!(
                    "frame of {} bytes exceeds {}",
                    command.len(),
                    self.max_frame
                ),
                None,
            ));
        }
        let f = frame::decode(command).map_err(|e| {
            let code = match e {
                frame::FrameError::UnsupportedEncoding(_) => ErrorCode::BadEncoding,
                _ => ErrorCode::BadFrame,
            };
            Failure::new(code, e.to_string(), None)
        })?;
        // Only a batch carries more than one binary frame.
        let batch = matches!(f.verb, Verb::EVNT | Verb::MDLV | Verb::MEVT) && is_array(f.body);
        let binary = match binaries {
            [] => None,
            [b] if !batch => Some(*b),
            _ if batch => None,
            _ => {
                return Err(Failure::new(
                    ErrorCode::BadMultipart,
                    format!(
                        "a message is a command frame and at most one binary frame (a batch of events: one per event), got {} frames",
                        parts.len()
                    ),
                    None,
                ))
            }
        };
        let cell = self.peers.get(peer).copied();
        if let Some(id) = cell {
            if let Some(c) = self.cells.get_mut(&id) {
                c.last_seen = now;
            }
        }
        match (f.verb, cell) {
            (Verb::PING, _) => {
                // `welcomed` lets a cell that only pings learn that it was
                // expired and must say HELO again.
                let r: Ref = parse(f.body)?;
                let mut pong = Map::new();
                if let Some(reference) = r.reference {
                    pong.insert("ref".into(), reference);
                }
                pong.insert("welcomed".into(), Value::Bool(cell.is_some()));
                out.push(to_peer(peer, frame::encode_json(Verb::PONG, &pong)));
                Ok(())
            }
            (Verb::PONG, _) => Ok(()),
            (Verb::HELO, _) => self.hello(peer, cell, f.body, now, out),
            (Verb::GBYE, Some(id)) => {
                let _: Goodbye = parse(f.body)?;
                self.remove_cell(&id, DisconnectReason::Bye, now, out);
                Ok(())
            }
            (Verb::GBYE, None) => Ok(()),
            (Verb::MDLV, None) if mesh_ok && batch => {
                // Most batches have the shape transmitters write: read them
                // without serde (the general way gives the same).
                let Some(items) = MeshDelivery::canonical_batch(f.body) else {
                    return self.mesh_batch(peer, f.verb, f.body, binaries, out);
                };
                for (item, binary) in with_binaries(items, |i| i.bin, binaries)? {
                    Metrics::incr(&self.metrics.mesh_in);
                    self.mesh_deliver_parsed(item.delivery, item.head, binary, out);
                }
                Ok(())
            }
            (Verb::MEVT, None) if mesh_ok && batch => {
                let Some(items) = body::canonical_mesh_events(f.body) else {
                    return self.mesh_batch(peer, f.verb, f.body, binaries, out);
                };
                for (item, binary) in with_binaries(items, |i| i.bin, binaries)? {
                    Metrics::incr(&self.metrics.mesh_in);
                    if let Err(failure) = self.mesh_event_parsed(item.channel, item.head, binary, out) {
                        self.fail(peer, failure, out);
                    }
                }
                Ok(())
            }
            (Verb::MDLV, None) if mesh_ok => self.mesh_deliver(f.body, binary, out),
            (Verb::MACK, None) if mesh_ok => self.mesh_ack(f.body, now, out),
            (Verb::MEVT, None) if mesh_ok => self.mesh_event(f.body, binary, out),
            (Verb::MRPL, None) if mesh_ok => self.mesh_reply(f.body, binary, out),
            (verb, _) if !is_cell_verb(verb) => Err(Failure::new(
                ErrorCode::UnknownVerb,
                format!(
                    "unknown verb {verb}; cells send HELO LSTN UNLS EVNT ACKN NACK RQST RPLY META SEND DISC PING PONG GBYE"
                ),
                reference(f.body),
            )),
            (Verb::EVNT, None) if batch => {
                // Each event of the batch is refused under its own `ref`,
                // so that a client can match and re-send every one.
                for event in batch_elements(f.body)? {
                    let failure = Failure::new(
                        ErrorCode::NotWelcomed,
                        "say HELO first",
                        reference(event.get().as_bytes()),
                    );
                    self.fail(peer, failure, out);
                }
                Ok(())
            }
            (_, None) => Err(Failure::new(
                ErrorCode::NotWelcomed,
                "say HELO first",
                reference(f.body),
            )),
            (Verb::LSTN, Some(id)) => self.listen(peer, &id, f.body, now, out),
            (Verb::UNLS, Some(id)) => self.unlisten(peer, &id, f.body, out),
            (Verb::EVNT, Some(id)) if batch => {
                self.publish_batch(peer, &id, f.body, binaries, now, out)
            }
            (Verb::EVNT, Some(id)) => self.publish(peer, &id, f.body, binary, now, out),
            (Verb::META, Some(id)) => self.update_metadata(peer, &id, f.body, out),
            (Verb::SEND, Some(id)) => self.targeted(peer, &id, f.body, binary, now, out),
            (Verb::DISC, Some(_)) => self.discover(peer, f.body, out),
            (Verb::RQST, Some(id)) => self.request(peer, &id, f.body, binary, now, out),
            (Verb::RPLY, Some(id)) => self.reply(&id, f.body, binary, None, out),
            (Verb::ACKN, Some(id)) => self.ack(&id, f.body, now, out, true),
            (Verb::NACK, Some(id)) => self.ack(&id, f.body, now, out, false),
            (verb, Some(_)) => Err(Failure::new(
                ErrorCode::UnknownVerb,
                format!("{verb} is not handled"),
                reference(f.body),
            )),
        }
    }

    fn hello(
        &mut self,
        peer: &[u8],
        current: Option<Thid>,
        body: &[u8],
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        let h: Hello = parse(body)?;
        let re = h
            .reference
            .clone()
            .or_else(|| Some(Value::String(h.id.to_hex())));
        if self.stopping {
            return Err(Failure::new(
                ErrorCode::ShuttingDown,
                "transmitter is shutting down",
                re,
            ));
        }
        if h.service.is_empty()
            || h.service.len() > MAX_SERVICE_LEN
            || h.service
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Failure::new(
                ErrorCode::BadService,
                format!("a service name has 1 to {MAX_SERVICE_LEN} bytes and no whitespace"),
                re,
            ));
        }
        let mut metadata = h.metadata;
        check_metadata(&metadata, false)
            .map_err(|m| Failure::new(ErrorCode::BadMetadata, m, re.clone()))?;
        let address = self.addresses.remove(peer);
        self.add_reserved(&mut metadata, address);
        check_size(&metadata).map_err(|m| Failure::new(ErrorCode::BadMetadata, m, re.clone()))?;
        match current {
            Some(id) if id != h.id => {
                return Err(Failure::new(
                    ErrorCode::ThidInUse,
                    format!(
                        "this connection is cell {id}; open a new connection for {}",
                        h.id
                    ),
                    re,
                ))
            }
            _ => {}
        }
        // A cell whose connection dropped and came back (libzmq reconnects
        // under a new routing id) takes its THID over once the old
        // connection has missed a heartbeat; a live one keeps it.
        let stale = self
            .cells
            .get(&h.id)
            .is_some_and(|c| *c.peer != *peer && now.duration_since(c.last_seen) > self.heartbeat);
        if stale {
            self.remove_cell(&h.id, DisconnectReason::Replaced, now, out);
        }
        if let Some(existing) = self.cells.get_mut(&h.id) {
            if *existing.peer != *peer {
                return Err(Failure::new(
                    ErrorCode::ThidInUse,
                    format!(
                        "cell {} is connected on another connection; retry after one heartbeat if that one is dead",
                        h.id
                    ),
                    re,
                ));
            }
            existing.service = Arc::from(h.service.as_str());
            existing.metadata = metadata;
            existing.batch = h.batch;
            existing.packed = h.batch && h.packed;
            self.invalidate();
            self.announce(&h.id, "updated", out);
        } else {
            self.cells.insert(
                h.id,
                Cell {
                    peer: Arc::from(peer),
                    service: Arc::from(h.service.as_str()),
                    metadata,
                    listens: Vec::new(),
                    limit: limit_of(&[]),
                    last_seen: now,
                    seq: 0,
                    held: HashSet::new(),
                    queue: VecDeque::new(),
                    batch: h.batch,
                    packed: h.batch && h.packed,
                },
            );
            self.invalidate();
            self.announce(&h.id, "joined", out);
            self.peers.insert(Arc::from(peer), h.id);
            self.metrics
                .cells
                .store(self.cells.len() as u64, Ordering::Relaxed);
        }
        let welcome = Welcome {
            id: self.id,
            event_endpoint: self.event_endpoint.clone(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            limits: Limits {
                max_frame: self.max_frame,
                ack_timeout_ms: self.ack_timeout.as_millis() as u64,
            },
            batch: true,
            packed: true,
            reference: h.reference,
        };
        out.push(to_peer(peer, frame::encode_json(Verb::WLCM, &welcome)));
        Ok(())
    }

    fn listen(
        &mut self,
        peer: &[u8],
        id: &Thid,
        body: &[u8],
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        let l: Listen = parse(body)?;
        let pattern = Pattern::parse(&l.pattern)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e.to_string(), l.reference.clone()))?;
        let cell = self.cells.get_mut(id).expect("welcomed peers have a cell");
        let entry = ListenEntry {
            pattern,
            mode: l.mode,
            ack: l.ack.unwrap_or(true),
            concurrency: l
                .concurrency
                .unwrap_or(DEFAULT_CONCURRENCY)
                .clamp(1, MAX_CONCURRENCY),
        };
        let count = cell.listens.len();
        match cell.listens.iter_mut().find(|e| e.pattern == entry.pattern) {
            Some(existing) => *existing = entry,
            None if count >= MAX_LISTENS_PER_CELL => {
                return Err(Failure::new(
                    ErrorCode::TooManyListens,
                    format!("a cell listens to at most {MAX_LISTENS_PER_CELL} patterns"),
                    l.reference,
                ))
            }
            None => cell.listens.push(entry),
        }
        cell.limit = limit_of(&cell.listens);
        let service = cell.service.clone();
        self.invalidate();
        out.push(to_peer(peer, ok(l.reference)));
        if l.mode == Mode::Any {
            self.drain_backlog(&service, now, out);
        }
        Ok(())
    }

    fn unlisten(&mut self, peer: &[u8], id: &Thid, body: &[u8], out: &mut Vec<Output>) -> Handled {
        let u: Unlisten = parse(body)?;
        Pattern::parse(&u.pattern)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e.to_string(), u.reference.clone()))?;
        let cell = self.cells.get_mut(id).expect("welcomed peers have a cell");
        let before = cell.listens.len();
        cell.listens.retain(|e| e.pattern.as_str() != u.pattern);
        cell.limit = limit_of(&cell.listens);
        if cell.listens.len() == before {
            return Err(Failure::new(
                ErrorCode::NotListening,
                format!("not listening to {:?}", u.pattern),
                u.reference,
            ));
        }
        self.invalidate();
        out.push(to_peer(peer, ok(u.reference)));
        Ok(())
    }

    /// `EVNT` with an array body, followed by no binary frame or by one
    /// for each event: each event is published as if it had come alone,
    /// and each that fails gets its own `ERRR`.
    fn publish_batch(
        &mut self,
        peer: &[u8],
        from: &Thid,
        body: &[u8],
        binaries: &[&[u8]],
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        // Most batches have the shape clients write: read them without
        // serde (the general way below gives the same events).
        let events: Vec<Result<Publish<'_>, Failure>> = match Publish::canonical_batch(body) {
            Some(events) => events.into_iter().map(Ok).collect(),
            None => batch_elements(body)?
                .iter()
                .map(|e| parse(e.get().as_bytes()))
                .collect(),
        };
        let bin = |e: &Result<Publish<'_>, Failure>| e.as_ref().ok().and_then(|p| p.bin);
        for (event, binary) in with_binaries(events, bin, binaries)? {
            Metrics::incr(&self.metrics.events_in);
            let handled = event.and_then(|p| self.publish_event(peer, from, p, binary, now, out));
            if let Err(f) = handled {
                self.fail(peer, f, out);
            }
        }
        Ok(())
    }

    fn publish(
        &mut self,
        peer: &[u8],
        from: &Thid,
        body: &[u8],
        binary: Option<&[u8]>,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        Metrics::incr(&self.metrics.events_in);
        let p: Publish<'_> = parse(body)?;
        self.publish_event(peer, from, p, binary, now, out)
    }

    /// Routes one event, read from its `EVNT` body.
    fn publish_event(
        &mut self,
        peer: &[u8],
        from: &Thid,
        p: Publish<'_>,
        binary: Option<&[u8]>,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        let payload = p.payload.map(|r| r.get().as_bytes());
        let id = match p.id {
            Some(id) => id,
            None => {
                let cell = self
                    .cells
                    .get_mut(from)
                    .expect("welcomed peers have a cell");
                let seq = match p.seq {
                    Some(s) => s,
                    None => {
                        cell.seq += 1;
                        cell.seq
                    }
                };
                let hashed = binary.or(payload).unwrap_or_default();
                Thid::for_event(from, seq, &p.channel, hashed)
            }
        };
        // An error names the event by its `ref`, else by its THID.
        let re = |reference: Option<Value>| reference.or_else(|| Some(Value::String(id.to_hex())));
        let route = self
            .checked_route(&p.channel)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e, re(p.reference.clone())))?;
        let mut routed = 0u32;
        // One copy of the binary payload, shared by every delivery.
        let binary: Option<Arc<[u8]>> = if route.is_empty() {
            None
        } else {
            binary.map(Arc::from)
        };
        if !route.multi.is_empty() || !route.multi_nodes.is_empty() {
            self.scratch.clear();
            body::write_delivery(&mut self.scratch, &id, &p.channel, payload, from, None);
            self.multicatch(&route.multi, &self.scratch, binary.as_ref(), out);
            for node in &route.multi_nodes {
                out.push(Output::ToNode {
                    node: *node,
                    frame: frame::encode(Verb::MEVT, &self.scratch),
                    binary: binary.clone(),
                });
                Metrics::incr(&self.metrics.mesh_out);
            }
            routed += 1;
        }
        if !route.any.is_empty() {
            let event = Arc::new(EventData {
                id,
                channel: route.channel.clone(),
                payload: payload.map(<[u8]>::to_vec),
                binary,
                from: *from,
            });
            for sr in &route.any {
                let target = self.least_loaded(&sr.cursor, &sr.cells);
                if let Some(target) = target {
                    self.deliver(
                        &event,
                        &sr.service,
                        target,
                        1,
                        Retarget::Service,
                        false,
                        now,
                        out,
                    );
                    routed += 1;
                }
            }
        }
        if routed == 0 {
            Metrics::incr(&self.metrics.dropped_no_listeners);
            if p.confirm {
                return Err(Failure::new(
                    ErrorCode::NoListeners,
                    "no cell listens to this channel",
                    re(p.reference),
                ));
            }
        } else if p.confirm {
            let c = Confirm {
                reference: p.reference,
                id: Some(id),
                routed,
            };
            out.push(to_peer(peer, frame::encode_json(Verb::OKAY, &c)));
        }
        Ok(())
    }

    /// Sends one anycatch delivery, to a local cell or through the
    /// transmitter that owns it, and, when it must be acked, remembers it.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        event: &Arc<EventData>,
        service: &Arc<str>,
        target: Target,
        attempt: u32,
        retarget: Retarget,
        request: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        let Target { cell, ack, node } = target;
        // A request always waits for its answer.
        let ack = ack || request;
        // Every cell it could go to is full (the least busy one is): it
        // waits for the service's next free slot, not in this cell's queue
        // nor in another transmitter's.
        let full = ack && !matches!(retarget, Retarget::Never) && self.is_full(&cell);
        if full {
            self.park(InFlight {
                event: event.clone(),
                service: service.clone(),
                attempt: attempt - 1,
                retarget,
                request,
            });
            return;
        }
        self.scratch.clear();
        self.scratch
            .extend_from_slice(if request { b"J RQST " } else { b"J DLVR " });
        body::write_delivery(
            &mut self.scratch,
            &event.id,
            &event.channel,
            event.payload.as_deref(),
            &event.from,
            Some(attempt),
        );
        match node {
            None => {
                let frame = self.scratch.clone();
                if !self.send_to_cell(
                    &cell,
                    (event.id, cell),
                    frame,
                    event.binary.clone(),
                    ack,
                    out,
                ) {
                    // Gone, or its queue is full: the ack deadline (if
                    // any) brings it back.
                    Metrics::incr(&self.metrics.dropped_backlog_full);
                }
            }
            Some(node) => {
                // MDLV is the DLVR body plus who gets it and who awaits the ack.
                self.scratch[2..6].copy_from_slice(Verb::MDLV.as_bytes());
                self.scratch.pop();
                self.scratch.extend_from_slice(br#","cell":""#);
                self.scratch.extend_from_slice(&cell.hex());
                self.scratch.extend_from_slice(br#"","origin":""#);
                self.scratch.extend_from_slice(&self.id.hex());
                self.scratch.extend_from_slice(br#"","ack":"#);
                self.scratch
                    .extend_from_slice(if ack { b"true" } else { b"false" });
                self.scratch.extend_from_slice(br#","request":"#);
                self.scratch
                    .extend_from_slice(if request { b"true}" } else { b"false}" });
                out.push(Output::ToNode {
                    node,
                    frame: self.scratch.clone(),
                    binary: event.binary.clone(),
                });
                Metrics::incr(&self.metrics.mesh_out);
                if ack {
                    *self.remote_load.entry(cell).or_default() += 1;
                }
            }
        }
        let cell = &cell;
        Metrics::incr(&self.metrics.deliveries);
        if attempt > 1 {
            Metrics::incr(&self.metrics.redeliveries);
        }
        if ack {
            self.in_flight.insert(
                (event.id, *cell),
                InFlight {
                    event: event.clone(),
                    service: service.clone(),
                    attempt,
                    retarget,
                    request,
                },
            );
            // A request's own timeout governs it, not the ack deadline.
            if !request {
                self.deadlines
                    .push_back((now + self.ack_timeout, event.id, *cell, attempt));
            }
        }
    }

    fn ack(
        &mut self,
        cell: &Thid,
        body: &[u8],
        now: Instant,
        out: &mut Vec<Output>,
        positive: bool,
    ) -> Handled {
        let a: Ack = parse(body)?;
        let mut unknown = None;
        let mut forward: HashMap<Thid, Vec<Thid>> = HashMap::new();
        for id in a.id.iter().chain(a.ids.iter()) {
            // A request is answered by RPLY (or handed on by NACK), not acked.
            if positive && self.in_flight.get(&(*id, *cell)).is_some_and(|f| f.request) {
                unknown = unknown.or(Some(*id));
                continue;
            }
            match self.take_in_flight(&(*id, *cell), out) {
                Some(f) => self.settle(f, cell, positive, now, out),
                None => match self.proxied.remove(&(*id, *cell)) {
                    Some(origin) => {
                        self.release(cell, id, out);
                        forward.entry(origin).or_default().push(*id);
                    }
                    None => unknown = unknown.or(Some(*id)),
                },
            }
        }
        for (origin, ids) in forward {
            out.push(mesh_ack(origin, ids, *cell, positive));
        }
        match unknown {
            Some(id) => Err(Failure::new(
                ErrorCode::UnknownDelivery,
                format!("no delivery {id} awaits an answer from this cell (acked already, or redelivered after its deadline)"),
                Some(Value::String(id.to_hex())),
            )),
            None => Ok(()),
        }
    }

    /// Ends a delivery that was acked, or redelivers one that was refused.
    fn settle(
        &mut self,
        f: InFlight,
        cell: &Thid,
        positive: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if positive {
            Metrics::incr(&self.metrics.acks);
        } else {
            Metrics::incr(&self.metrics.nacks);
            self.redeliver(f, Some(cell), now, out);
        }
    }

    /// A batch of `MDLV`s or `MEVT`s from another transmitter, read the
    /// general way: each element handled as if it came alone.
    fn mesh_batch(
        &mut self,
        peer: &[u8],
        verb: Verb,
        body: &[u8],
        binaries: &[&[u8]],
        out: &mut Vec<Output>,
    ) -> Handled {
        for (item, binary) in mesh_items(body, binaries)? {
            let handled = match verb {
                Verb::MDLV => self.mesh_deliver(&item, binary, out),
                _ => self.mesh_event(&item, binary, out),
            };
            if let Err(failure) = handled {
                self.fail(peer, failure, out);
            }
        }
        Ok(())
    }

    /// `MDLV`: another transmitter chose one of our cells for an event.
    fn mesh_deliver(
        &mut self,
        body: &[u8],
        binary: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        let d: MeshDelivery = parse(body)?;
        let head = body.trim_ascii_end();
        self.mesh_deliver_parsed(d, &head[..head.len() - 1], binary, out);
        Ok(())
    }

    /// Delivers an `MDLV` to its cell: `head` is its body without the
    /// closing brace, which the cell gets as the body of a `DLVR` (or
    /// `RQST`).
    fn mesh_deliver_parsed(
        &mut self,
        d: MeshDelivery,
        head: &[u8],
        binary: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        let verb = if d.request { Verb::RQST } else { Verb::DLVR };
        let binary = binary.map(Arc::from);
        let key = (d.id, d.cell);
        if d.ack {
            // Recorded first, so the queued frame counts as live.
            self.proxied.insert(key, d.origin);
        }
        let mut frame = Vec::with_capacity(head.len() + 8);
        frame::encode_into(&mut frame, verb, head);
        frame.push(b'}');
        if !self.send_to_cell(&d.cell, key, frame, binary, d.ack, out) {
            self.proxied.remove(&key);
            // The cell left before the origin heard of it, or it is
            // swamped: hand it back.
            out.push(mesh_ack(d.origin, vec![d.id], d.cell, false));
            return;
        }
        Metrics::incr(&self.metrics.deliveries);
    }

    /// `MACK`: a cell of another transmitter answered a delivery we sent.
    fn mesh_ack(&mut self, body: &[u8], now: Instant, out: &mut Vec<Output>) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        let a: MeshAck = parse(body)?;
        for id in &a.ids {
            if let Some(f) = self.take_in_flight(&(*id, a.cell), out) {
                self.settle(f, &a.cell, a.ok, now, out);
            }
        }
        Ok(())
    }

    /// `MEVT`: a multicatch event published at another transmitter for our
    /// cells; it goes to each of them and nowhere else.
    fn mesh_event(&mut self, body: &[u8], binary: Option<&[u8]>, out: &mut Vec<Output>) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        #[derive(serde::Deserialize)]
        struct Channel<'a> {
            #[serde(borrow)]
            channel: std::borrow::Cow<'a, str>,
        }
        let c: Channel<'_> = parse(body)?;
        let head = body.trim_ascii_end();
        self.mesh_event_parsed(&c.channel, &head[..head.len() - 1], binary, out)
    }

    /// Sends an `MEVT` on `channel` to the local multicatch cells: `head` is
    /// its body without the closing brace, which they get as the body of
    /// a `J EVNT`.
    fn mesh_event_parsed(
        &mut self,
        channel: &str,
        head: &[u8],
        binary: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) -> Handled {
        let route = self
            .checked_route(channel)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e, None))?;
        if route.multi.is_empty() {
            return Ok(());
        }
        let mut frame = Vec::with_capacity(head.len() + 8);
        frame::encode_into(&mut frame, Verb::EVNT, head);
        frame.push(b'}');
        let binary = binary.map(Arc::from);
        self.multicatch_frame(&route.multi, Arc::from(frame), binary.as_ref(), out);
        Ok(())
    }

    /// Sends one multicatch event, `body` being its `DLVR` fields without
    /// `attempt`, as `J EVNT` to each of the local `cells`.
    fn multicatch(
        &self,
        cells: &[Thid],
        body: &[u8],
        binary: Option<&Arc<[u8]>>,
        out: &mut Vec<Output>,
    ) {
        if cells.is_empty() {
            return;
        }
        self.multicatch_frame(
            cells,
            Arc::from(frame::encode(Verb::EVNT, body)),
            binary,
            out,
        );
    }

    /// Sends one multicatch `J EVNT` frame to each of the local `cells`.
    fn multicatch_frame(
        &self,
        cells: &[Thid],
        frame: Arc<[u8]>,
        binary: Option<&Arc<[u8]>>,
        out: &mut Vec<Output>,
    ) {
        for cell in cells.iter().filter_map(|c| self.cells.get(c)) {
            out.push(Output::Multicatch {
                peer: cell.peer.clone(),
                frame: frame.clone(),
                binary: binary.cloned(),
            });
            Metrics::incr(&self.metrics.multicast);
        }
    }

    /// Replaces the view of the other transmitters. Deliveries to cells
    /// that left the view are redelivered.
    pub fn set_view(&mut self, nodes: Vec<NodeRecord>, now: Instant, out: &mut Vec<Output>) {
        let mut remote = HashMap::new();
        for n in nodes {
            if n.id == self.id {
                continue;
            }
            let cells = n
                .cells
                .into_iter()
                .map(|c| {
                    let listens: Vec<ListenEntry> = c
                        .listens
                        .into_iter()
                        .filter_map(|l| {
                            Some(ListenEntry {
                                pattern: Pattern::parse(&l.pattern).ok()?,
                                mode: l.mode,
                                ack: l.ack,
                                concurrency: l.concurrency.clamp(1, MAX_CONCURRENCY),
                            })
                        })
                        .collect();
                    let service = Arc::from(c.service.as_str());
                    let metadata = c.metadata;
                    (
                        c.id,
                        RemoteCell {
                            service,
                            metadata,
                            limit: limit_of(&listens),
                            listens,
                        },
                    )
                })
                .collect();
            remote.insert(
                n.id,
                RemoteNode {
                    batch: n.batch,
                    packed: n.batch && n.packed,
                    command: n.command,
                    cells,
                },
            );
        }
        let old = std::mem::replace(&mut self.remote, remote);
        self.routes.clear();
        self.announce_remote_changes(&old, out);
        let gone: Vec<Thid> = old
            .iter()
            .flat_map(|(node, n)| n.cells.keys().map(move |c| (node, c)))
            .filter(|(node, c)| {
                !self
                    .remote
                    .get(node)
                    .is_some_and(|n| n.cells.contains_key(c))
            })
            .map(|(_, c)| *c)
            .filter(|c| !self.cells.contains_key(c))
            .collect();
        for cell in &gone {
            self.redeliver_all_of(cell, now, out);
        }
        self.proxied
            .retain(|_, origin| self.remote.contains_key(origin));
    }

    /// The other transmitters: THID and command endpoint.
    pub fn nodes(&self) -> impl Iterator<Item = (&Thid, &str)> {
        self.remote.iter().map(|(id, n)| (id, n.command.as_str()))
    }

    /// The local cells as JSON for the mesh, if they changed since the
    /// last call.
    pub fn take_local_view(&mut self) -> Option<String> {
        if !self.view_dirty {
            return None;
        }
        self.view_dirty = false;
        let records: Vec<CellRecord> = self
            .cells
            .iter()
            .map(|(id, c)| CellRecord {
                id: *id,
                service: c.service.to_string(),
                metadata: c.metadata.clone(),
                listens: c
                    .listens
                    .iter()
                    .map(|l| ListenRecord {
                        pattern: l.pattern.as_str().to_owned(),
                        mode: l.mode,
                        ack: l.ack,
                        concurrency: l.concurrency,
                    })
                    .collect(),
            })
            .collect();
        Some(serde_json::to_string(&records).expect("cell records serialize"))
    }

    /// Redelivers every unacked delivery held by `cell`.
    fn redeliver_all_of(&mut self, cell: &Thid, now: Instant, out: &mut Vec<Output>) {
        let orphans: Vec<(Thid, Thid)> = self
            .in_flight
            .keys()
            .filter(|(_, c)| c == cell)
            .copied()
            .collect();
        for key in orphans {
            if let Some(f) = self.take_in_flight(&key, out) {
                self.redeliver(f, Some(cell), now, out);
            }
        }
    }

    /// Sends an unacked delivery to another cell of its service (the same
    /// one only if no other listens), or parks it until one listens.
    fn redeliver(
        &mut self,
        f: InFlight,
        failed: Option<&Thid>,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if f.request && !self.requests.contains_key(&f.event.id) {
            // Its requester was told timed_out already.
            return;
        }
        let query = match &f.retarget {
            Retarget::Never => return,
            Retarget::Service => None,
            Retarget::Query(q) => Some(q.clone()),
        };
        let route = self.route(&f.event.channel);
        let empty = Map::new();
        let pool: Vec<Target> = route
            .any
            .iter()
            .find(|sr| sr.service == f.service)
            .map(|sr| {
                let mut eligible: Vec<&Target> = sr
                    .cells
                    .iter()
                    .filter(|t| {
                        query
                            .as_ref()
                            .is_none_or(|q| q.matches(self.metadata_of(&t.cell).unwrap_or(&empty)))
                    })
                    .collect();
                // An optional query falls back to any cell, as on first delivery.
                if eligible.is_empty() && query.as_ref().is_some_and(|q| q.optional) {
                    eligible = sr.cells.iter().collect();
                }
                let others: Vec<_> = eligible
                    .iter()
                    .copied()
                    .filter(|t| Some(&t.cell) != failed)
                    .collect();
                let pool = if others.is_empty() { eligible } else { others };
                pool.into_iter().copied().collect()
            })
            .unwrap_or_default();
        let cursor = self.cursor(&f.service);
        let target = self.least_loaded(&cursor, &pool);
        match target {
            Some(t) => self.deliver(
                &f.event,
                &f.service,
                t,
                f.attempt + 1,
                f.retarget,
                f.request,
                now,
                out,
            ),
            None => self.park(f),
        }
    }

    /// Keeps a delivery at the transmitter until a cell of its service has
    /// a free slot (or listens again); `f.attempt` is the attempt before
    /// the one it will be sent as.
    fn park(&mut self, f: InFlight) {
        let backlog = self.backlog.entry(f.service.clone()).or_default();
        if backlog.push(f) {
            Metrics::incr(&self.metrics.queued);
        } else {
            Metrics::incr(&self.metrics.dropped_backlog_full);
        }
    }

    /// Delivers parked redeliveries of `service` that a cell now listens to.
    fn drain_backlog(&mut self, service: &Arc<str>, now: Instant, out: &mut Vec<Output>) {
        let Some(backlog) = self.backlog.remove(service) else {
            return;
        };
        for f in backlog.queue {
            self.redeliver(f, None, now, out);
        }
    }

    /// Sends a delivery frame to a local cell, or queues it while the cell
    /// holds as many unanswered deliveries as it takes at once. Returns
    /// false when the cell is gone or its queue is full.
    fn send_to_cell(
        &mut self,
        cell: &Thid,
        key: (Thid, Thid),
        frame: Vec<u8>,
        binary: Option<Arc<[u8]>>,
        needs_answer: bool,
        out: &mut Vec<Output>,
    ) -> bool {
        let Some(c) = self.cells.get_mut(cell) else {
            return false;
        };
        if !needs_answer {
            out.push(Output::ToPeer {
                peer: c.peer.clone(),
                frame,
                binary,
            });
            return true;
        }
        if (c.held.len() as u32) < c.limit() && c.queue.is_empty() {
            c.held.insert(key.0);
            out.push(Output::ToPeer {
                peer: c.peer.clone(),
                frame,
                binary,
            });
            return true;
        }
        if c.queue.len() >= MAX_QUEUED_PER_CELL {
            return false;
        }
        c.queue.push_back(Queued {
            key: (key.0, *cell),
            frame,
            binary,
        });
        Metrics::incr(&self.metrics.queued);
        true
    }

    /// A local cell's delivery of `event` is settled: if it held a slot,
    /// the slot goes to what waited for one.
    fn release(&mut self, cell: &Thid, event: &Thid, out: &mut Vec<Output>) {
        let Some(c) = self.cells.get_mut(cell) else {
            return;
        };
        if !c.held.remove(event) {
            return;
        }
        let service = c.service.clone();
        while (c.held.len() as u32) < c.limit() {
            let Some(q) = c.queue.pop_front() else { break };
            if !self.in_flight.contains_key(&q.key) && !self.proxied.contains_key(&q.key) {
                continue;
            }
            c.held.insert(q.key.0);
            out.push(Output::ToPeer {
                peer: c.peer.clone(),
                frame: q.frame,
                binary: q.binary,
            });
        }
        // A slot is still free: the oldest delivery waiting for the service.
        let free = self
            .cells
            .get(cell)
            .is_some_and(|c| (c.held.len() as u32) < c.limit());
        if free {
            if let Some(f) = self.backlog.get_mut(&service).and_then(Backlog::pop) {
                let now = self.clock;
                self.redeliver(f, None, now, out);
            }
        }
    }

    /// Removes a delivery awaiting an answer and frees what it held: the
    /// local cell's slot, or one of the slots we use of a remote cell,
    /// which then goes to the oldest delivery waiting for its service.
    fn take_in_flight(&mut self, key: &(Thid, Thid), out: &mut Vec<Output>) -> Option<InFlight> {
        let f = self.in_flight.remove(key)?;
        let cell = key.1;
        if self.cells.contains_key(&cell) {
            self.release(&cell, &key.0, out);
        } else if let Some(load) = self.remote_load.get_mut(&cell) {
            *load = load.saturating_sub(1);
            if *load == 0 {
                self.remote_load.remove(&cell);
            }
            if let Some(waiting) = self.backlog.get_mut(&f.service).and_then(Backlog::pop) {
                let now = self.clock;
                self.redeliver(waiting, None, now, out);
            }
        }
        Some(f)
    }

    /// Whether `cell` holds as many unanswered deliveries as it takes at
    /// once: a local cell counting all of them, a remote one those we sent.
    fn is_full(&self, cell: &Thid) -> bool {
        self.load(cell).0
    }

    /// Whether `cell` holds as many unanswered deliveries as it takes, and
    /// how many it has unanswered plus waiting (for a remote cell, the
    /// unanswered ones we sent), in one lookup.
    fn load(&self, cell: &Thid) -> (bool, usize) {
        match self.cells.get(cell) {
            Some(c) => (
                c.held.len() as u32 >= c.limit(),
                c.held.len() + c.queue.len(),
            ),
            None => {
                let sent = self.remote_load.get(cell).copied().unwrap_or(0);
                let full = self.remote_cell(cell).is_some_and(|c| sent >= c.limit);
                (full, sent as usize)
            }
        }
    }

    /// A cell of another transmitter, as the view describes it.
    fn remote_cell(&self, cell: &Thid) -> Option<&RemoteCell> {
        self.remote.values().find_map(|n| n.cells.get(cell))
    }

    /// The round-robin cursor of `key` (a service, or a request channel).
    fn cursor(&mut self, key: &str) -> Cursor {
        match self.cursors.get(key) {
            Some(c) => c.clone(),
            None => self.cursors.entry(Arc::from(key)).or_default().clone(),
        }
    }

    /// The least busy of `cells`: one with a free slot first, then the
    /// fewest unanswered plus waiting deliveries (for a remote cell, the
    /// unanswered ones we sent); ties go round robin.
    fn least_loaded(&self, cursor: &AtomicUsize, candidates: &[Target]) -> Option<Target> {
        if candidates.is_empty() {
            return None;
        }
        let start = next_turn(cursor);
        // A cell with a free slot beats any cell that would have to queue;
        // then the fewest unanswered-plus-waiting deliveries win, the first
        // from the cursor on a tie. An idle cell with a free slot cannot be
        // beaten, so the search stops there (without acks, at once).
        let n = candidates.len();
        let mut best: Option<(Target, (bool, usize))> = None;
        for i in 0..n {
            let t = candidates[(start + i) % n];
            let load = self.load(&t.cell);
            if load == (false, 0) {
                return Some(t);
            }
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((t, load));
            }
        }
        best.map(|(t, _)| t)
    }

    /// `RQST`: routes a request to one cell listening to its channel (of
    /// its service and matching its query, when given).
    fn request(
        &mut self,
        peer: &[u8],
        from: &Thid,
        body: &[u8],
        binary: Option<&[u8]>,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        Metrics::incr(&self.metrics.requests);
        let r: Request<'_> = parse(body)?;
        let re = r.reference.clone();
        let route = self
            .checked_route(&r.channel)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e, re.clone()))?;
        let query = parse_query(r.query.as_ref())
            .map_err(|e| Failure::new(ErrorCode::BadQuery, e, re.clone()))?;
        let empty = Map::new();
        let mut candidates: Vec<(Arc<str>, Target)> = Vec::new();
        for sr in route
            .any
            .iter()
            .filter(|sr| r.service.as_deref().is_none_or(|s| *sr.service == *s))
        {
            for t in &sr.cells {
                if query.matches(self.metadata_of(&t.cell).unwrap_or(&empty)) {
                    candidates.push((sr.service.clone(), *t));
                }
            }
        }
        let Some((service, _)) = candidates.first().cloned() else {
            return Err(Failure::new(
                ErrorCode::NoResponders,
                format!("no cell answers requests on {:?}", r.channel),
                re,
            ));
        };
        let cursor = self.cursor(&format!("rqst:{}", r.channel));
        let targets: Vec<Target> = candidates.iter().map(|(_, t)| *t).collect();
        let Some(target) = self.least_loaded(&cursor, &targets) else {
            return Err(Failure::new(ErrorCode::NoResponders, "no responder", re));
        };
        let service = candidates
            .iter()
            .find(|(_, t)| t.cell == target.cell)
            .map_or(service, |(s, _)| s.clone());
        let cell = self
            .cells
            .get_mut(from)
            .expect("welcomed peers have a cell");
        cell.seq += 1;
        let payload = r.payload.map(|p| p.get().as_bytes());
        let id = Thid::for_event(
            from,
            cell.seq,
            &r.channel,
            binary.or(payload).unwrap_or_default(),
        );
        let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS));
        self.requests.insert(
            id,
            Requester {
                peer: Arc::from(peer),
                reference: r.reference,
                deadline: now + timeout,
            },
        );
        self.request_deadlines.insert((now + timeout, id));
        let event = Arc::new(EventData {
            id,
            channel: route.channel.clone(),
            payload: payload.map(<[u8]>::to_vec),
            binary: binary.map(Arc::from),
            from: *from,
        });
        let retarget = if query.ops.is_empty() {
            Retarget::Service
        } else {
            Retarget::Query(Arc::new(query))
        };
        self.deliver(&event, &service, target, 1, retarget, true, now, out);
        Ok(())
    }

    /// `RPLY` from a local cell (or, with `via`, `MRPL` from the
    /// transmitter that owns the cell): settles the request and hands the
    /// answer to whoever waits for it.
    fn reply(
        &mut self,
        cell: &Thid,
        body: &[u8],
        binary: Option<&[u8]>,
        via: Option<()>,
        out: &mut Vec<Output>,
    ) -> Handled {
        let r: Reply<'_> = parse(body)?;
        let key = (r.id, *cell);
        let unknown = |what: &str| {
            Failure::new(
                ErrorCode::UnknownDelivery,
                format!(
                    "no request {} awaits an answer from this cell ({what})",
                    r.id
                ),
                Some(Value::String(r.id.to_hex())),
            )
        };
        match self.in_flight.get(&key).map(|f| f.request) {
            Some(true) => {
                self.take_in_flight(&key, out);
            }
            Some(false) => return Err(unknown("it is an event: ACKN it")),
            None => {
                let origin = via.is_none().then(|| self.proxied.remove(&key)).flatten();
                let Some(origin) = origin else {
                    return Err(unknown("timed out, or answered"));
                };
                // Answer to a request another transmitter routed here.
                self.release(cell, &r.id, out);
                let mut mrpl = Map::new();
                mrpl.insert("id".into(), Value::String(r.id.to_hex()));
                mrpl.insert("cell".into(), Value::String(cell.to_hex()));
                if let Some(error) = r.error {
                    mrpl.insert("error".into(), Value::String(error));
                }
                out.push(Output::ToNode {
                    node: origin,
                    frame: with_raw_payload(frame::encode_json(Verb::MRPL, &mrpl), r.payload),
                    binary: binary.map(Arc::from),
                });
                return Ok(());
            }
        }
        let Some(requester) = self.requests.remove(&r.id) else {
            return Ok(());
        };
        self.request_deadlines.remove(&(requester.deadline, r.id));
        let mut answer = serde_json::Map::new();
        if let Some(reference) = requester.reference {
            answer.insert("ref".into(), reference);
        }
        answer.insert("id".into(), Value::String(r.id.to_hex()));
        if let Some(error) = r.error {
            answer.insert("error".into(), Value::String(error));
        }
        let frame = with_raw_payload(frame::encode_json(Verb::RPLY, &answer), r.payload);
        Metrics::incr(&self.metrics.replies);
        out.push(Output::ToPeer {
            peer: requester.peer,
            frame,
            binary: binary.map(Arc::from),
        });
        Ok(())
    }

    /// `MRPL`: a cell of another transmitter answered a request made here.
    fn mesh_reply(&mut self, body: &[u8], binary: Option<&[u8]>, out: &mut Vec<Output>) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        let r: Reply<'_> = parse(body)?;
        let Some(cell) = r.cell else {
            return Err(Failure::new(
                ErrorCode::BadJson,
                "MRPL names the cell",
                None,
            ));
        };
        self.reply(&cell, body, binary, Some(()), out)
    }

    /// Tells requesters whose deadline passed that no reply came.
    fn expire_requests(&mut self, now: Instant, out: &mut Vec<Output>) {
        while let Some(&(deadline, id)) = self.request_deadlines.first() {
            if deadline > now {
                break;
            }
            self.request_deadlines.pop_first();
            let Some(requester) = self.requests.remove(&id) else {
                continue;
            };
            Metrics::incr(&self.metrics.request_timeouts);
            let held: Vec<(Thid, Thid)> = self
                .in_flight
                .keys()
                .filter(|(e, _)| *e == id)
                .copied()
                .collect();
            for key in held {
                self.take_in_flight(&key, out);
            }
            self.metrics.error(ErrorCode::TimedOut);
            let reply = ErrorReply {
                code: ErrorCode::TimedOut,
                message: "no reply came in time".to_owned(),
                re: requester.reference.or(Some(Value::String(id.to_hex()))),
            };
            out.push(to_peer(
                &requester.peer,
                frame::encode_json(Verb::ERRR, &reply),
            ));
        }
    }

    /// Notes the network address of a connection that is saying HELO; it
    /// becomes the cell's `host` metadata.
    pub fn note_address(&mut self, peer: &[u8], address: &str) {
        self.addresses.insert(Arc::from(peer), address.to_owned());
    }

    /// Sets the keys only the transmitter may set: the cell's host and its
    /// transmitter.
    fn add_reserved(&self, metadata: &mut Map<String, Value>, address: Option<String>) {
        if let Some(a) = address {
            metadata.insert("host".to_owned(), Value::String(a));
        }
        metadata.insert("transmitter".to_owned(), Value::String(self.id.to_hex()));
    }

    /// `META`: merges into or replaces the cell's metadata.
    fn update_metadata(
        &mut self,
        peer: &[u8],
        id: &Thid,
        body: &[u8],
        out: &mut Vec<Output>,
    ) -> Handled {
        let m: MetaUpdate = parse(body)?;
        // Merging, a null removes the key; replacing, there is nothing to
        // remove and null is refused like in HELO.
        check_metadata(&m.metadata, !m.replace)
            .map_err(|e| Failure::new(ErrorCode::BadMetadata, e, m.reference.clone()))?;
        let cell = self.cells.get(id).expect("welcomed peers have a cell");
        let mut merged = if m.replace {
            Map::new()
        } else {
            cell.metadata.clone()
        };
        for (k, v) in m.metadata {
            if v.is_null() {
                merged.remove(&k);
            } else {
                merged.insert(k, v);
            }
        }
        for k in RESERVED_KEYS {
            match cell.metadata.get(*k) {
                Some(v) => merged.insert((*k).to_owned(), v.clone()),
                None => merged.remove(*k),
            };
        }
        check_size(&merged)
            .map_err(|e| Failure::new(ErrorCode::BadMetadata, e, m.reference.clone()))?;
        let effective = Value::Object(merged.clone());
        self.cells.get_mut(id).expect("checked above").metadata = merged;
        self.invalidate();
        self.announce(id, "updated", out);
        let reply = with_ref(m.reference, [("metadata", effective)]);
        out.push(to_peer(peer, frame::encode_json(Verb::OKAY, &reply)));
        Ok(())
    }

    /// The metadata of a cell anywhere in the view.
    fn metadata_of(&self, cell: &Thid) -> Option<&Map<String, Value>> {
        self.cells
            .get(cell)
            .map(|c| &c.metadata)
            .or_else(|| self.remote_cell(cell).map(|c| &c.metadata))
    }

    /// `SEND`: delivers to one, or every, cell of a service whose metadata
    /// matches the query, among the cells that listen anycatch to the
    /// channel.
    fn targeted(
        &mut self,
        peer: &[u8],
        from: &Thid,
        body: &[u8],
        binary: Option<&[u8]>,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Handled {
        let t: Targeted<'_> = parse(body)?;
        let re = t.reference.clone();
        let mut query = parse_query(t.query.as_ref())
            .map_err(|e| Failure::new(ErrorCode::BadQuery, e, re.clone()))?;
        query.optional |= t.optional;
        query.droppable |= t.droppable;
        if let Some(key) = &t.key {
            query.key = Some(match key {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        let channel = t
            .channel
            .clone()
            .unwrap_or_else(|| format!("send::{}", t.service));
        let candidates: Vec<Target> = self
            .checked_route(&channel)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e, re.clone()))?
            .any
            .iter()
            .find(|sr| *sr.service == *t.service)
            .map(|sr| sr.cells.clone())
            .unwrap_or_default();
        let candidates: Vec<(Target, Map<String, Value>)> = candidates
            .into_iter()
            .map(|c| (c, self.metadata_of(&c.cell).cloned().unwrap_or_default()))
            .collect();
        let choice = query.choose(&candidates, |c| &c.1, |c| c.0.cell.as_bytes());
        let targets: Vec<Target> = match (&choice.outcome, t.all) {
            (Outcome::NoMatch, _) => {
                return Err(Failure::new(
                    ErrorCode::NoRoute,
                    format!(
                        "no cell of {:?} listening to {channel:?} matches the query",
                        t.service
                    ),
                    re,
                ))
            }
            (Outcome::Drop, _) => Vec::new(),
            (_, true) => choice.matched.iter().map(|c| c.0).collect(),
            (Outcome::One(c), false) => vec![c.0],
            (Outcome::Any(list), false) => {
                let turn = next_turn(&self.cursor(&t.service)).wrapping_add(1);
                vec![list[turn % list.len()].0]
            }
        };
        let cell = self
            .cells
            .get_mut(from)
            .expect("welcomed peers have a cell");
        cell.seq += 1;
        let payload = t.payload.map(|r| r.get().as_bytes());
        let id = Thid::for_event(
            from,
            cell.seq,
            &channel,
            binary.or(payload).unwrap_or_default(),
        );
        let event = Arc::new(EventData {
            id,
            channel: Arc::from(channel),
            payload: payload.map(<[u8]>::to_vec),
            binary: binary.map(Arc::from),
            from: *from,
        });
        let service: Arc<str> = Arc::from(t.service.as_str());
        let retarget = if t.all {
            Retarget::Never
        } else {
            Retarget::Query(Arc::new(query))
        };
        for target in &targets {
            self.deliver(
                &event,
                &service,
                *target,
                1,
                retarget.clone(),
                false,
                now,
                out,
            );
        }
        let reply = Confirm {
            reference: t.reference,
            id: Some(id),
            routed: targets.len() as u32,
        };
        out.push(to_peer(peer, frame::encode_json(Verb::OKAY, &reply)));
        Ok(())
    }

    /// Every cell of the view: the local ones, then the remote ones (a
    /// remote record of a cell that is also local is skipped: the cell
    /// moved here).
    fn view_cells(&self) -> impl Iterator<Item = ViewCell<'_>> {
        let local = self.cells.iter().map(|(id, c)| ViewCell {
            id,
            service: &c.service,
            metadata: &c.metadata,
            listens: &c.listens,
            node: None,
        });
        let remote = self.remote.iter().flat_map(move |(node, n)| {
            n.cells
                .iter()
                .filter(move |(id, _)| !self.cells.contains_key(id))
                .map(move |(id, c)| ViewCell {
                    id,
                    service: &c.service,
                    metadata: &c.metadata,
                    listens: &c.listens,
                    node: Some(*node),
                })
        });
        local.chain(remote)
    }

    /// Every cell of the view, local and remote.
    fn instances(&self) -> Vec<Instance> {
        let listens = |l: &[ListenEntry]| {
            l.iter()
                .map(|e| InstanceListen {
                    pattern: e.pattern.as_str().to_owned(),
                    mode: e.mode,
                })
                .collect()
        };
        let mut all: Vec<Instance> = self
            .view_cells()
            .map(|c| Instance {
                id: *c.id,
                service: c.service.to_string(),
                metadata: c.metadata.clone(),
                transmitter: c.node.unwrap_or(self.id),
                listens: listens(c.listens),
            })
            .collect();
        all.sort_by(|a, b| (&a.service, a.id).cmp(&(&b.service, b.id)));
        all
    }

    /// `DISC`: answers a question about the whole mesh.
    fn discover(&mut self, peer: &[u8], body: &[u8], out: &mut Vec<Output>) -> Handled {
        let d: Discover = parse(body)?;
        let re = d.reference.clone();
        let query = parse_query(d.query.as_ref())
            .map_err(|e| Failure::new(ErrorCode::BadQuery, e, re.clone()))?;
        let instances: Vec<Instance> = self
            .instances()
            .into_iter()
            .filter(|i| d.service.as_deref().is_none_or(|s| s == i.service))
            .filter(|i| query.matches(&i.metadata))
            .collect();
        let result = if d.what == "metrics" {
            serde_json::to_value(self.metrics.snapshot()).expect("counters serialize")
        } else {
            discovery::answer(&d.what, &instances).ok_or_else(|| {
                Failure::new(
                    ErrorCode::BadJson,
                    format!(
                        "unknown question {:?}; ask one of {}",
                        d.what,
                        discovery::WHATS.join(", ")
                    ),
                    re.clone(),
                )
            })?
        };
        let reply = with_ref(
            d.reference,
            [("what", Value::String(d.what)), ("result", result)],
        );
        out.push(to_peer(peer, frame::encode_json(Verb::OKAY, &reply)));
        Ok(())
    }

    /// Publishes membership events for remote cells that joined, left or
    /// changed metadata between two views.
    fn announce_remote_changes(&self, old: &HashMap<Thid, RemoteNode>, out: &mut Vec<Output>) {
        let (before, after) = (remote_cells(old), remote_cells(&self.remote));
        for (id, (node, c)) in &after {
            match before.get(id) {
                None => out.push(membership("joined", id, &c.service, &c.metadata, node)),
                Some((_, b)) if b.metadata != c.metadata => {
                    out.push(membership("updated", id, &c.service, &c.metadata, node))
                }
                Some(_) => {}
            }
        }
        for (id, (node, c)) in &before {
            if !after.contains_key(id) && !self.cells.contains_key(id) {
                out.push(membership("left", id, &c.service, &c.metadata, node));
            }
        }
    }

    /// Publishes a membership event for a local cell on the event socket.
    fn announce(&self, id: &Thid, event: &str, out: &mut Vec<Output>) {
        if let Some(c) = self.cells.get(id) {
            out.push(membership(event, id, &c.service, &c.metadata, &self.id));
        }
    }

    /// Forgets cached routes and notes that the mesh must hear of the change.
    fn invalidate(&mut self) {
        self.routes.clear();
        self.view_dirty = true;
    }

    /// The route of `channel`, which is checked first unless its route
    /// is cached (only valid channels' are).
    fn checked_route(&mut self, channel: &str) -> Result<Arc<Route>, String> {
        match self.routes.get(channel) {
            Some(r) => Ok(r.clone()),
            None => {
                pattern::validate_channel(channel).map_err(|e| e.to_string())?;
                Ok(self.route(channel))
            }
        }
    }

    /// The cached route of `channel`, computed on first use.
    fn route(&mut self, channel: &str) -> Arc<Route> {
        if let Some(r) = self.routes.get(channel) {
            return r.clone();
        }
        let mut route = Route {
            channel: Arc::from(channel),
            ..Route::default()
        };
        for ViewCell {
            id,
            service,
            listens,
            node,
            ..
        } in self.view_cells()
        {
            let mut matched_any = None;
            let mut matched_multi = false;
            for l in listens.iter().filter(|l| l.pattern.matches(channel)) {
                match (l.mode, node) {
                    (Mode::Multi, None) => matched_multi = true,
                    (Mode::Multi, Some(n)) if !route.multi_nodes.contains(&n) => {
                        route.multi_nodes.push(n)
                    }
                    (Mode::Multi, Some(_)) => {}
                    (Mode::Any, _) => matched_any = matched_any.or(Some(l.ack)),
                }
            }
            if matched_multi {
                route.multi.push(*id);
            }
            if let Some(ack) = matched_any {
                let target = Target {
                    cell: *id,
                    ack,
                    node,
                };
                match route.any.iter_mut().find(|sr| sr.service == *service) {
                    Some(sr) => sr.cells.push(target),
                    None => route.any.push(ServiceRoute {
                        service: service.clone(),
                        cells: vec![target],
                        cursor: Cursor::default(),
                    }),
                }
            }
        }
        // Stable order so round robin is fair whatever the maps' order.
        for sr in &mut route.any {
            sr.cells.sort_unstable_by_key(|t| t.cell);
            sr.cursor = self.cursor(&sr.service);
        }
        if self.routes.len() >= MAX_CACHED_ROUTES {
            self.routes.clear();
        }
        let route = Arc::new(route);
        self.routes.insert(channel.to_owned(), route.clone());
        route
    }

    /// Expires silent cells and redelivers deliveries past their deadline.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.clock = now;
        let limit = self.heartbeat * HEARTBEAT_MISSES as u32;
        let silent: Vec<Thid> = self
            .cells
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_seen) > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            Metrics::incr(&self.metrics.expired_cells);
            self.remove_cell(&id, DisconnectReason::HeartbeatTimeout, now, out);
        }
        while let Some(&(deadline, event, cell, attempt)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let due = self
                .in_flight
                .get(&(event, cell))
                .is_some_and(|f| f.attempt == attempt);
            if due {
                if let Some(f) = self.take_in_flight(&(event, cell), out) {
                    self.redeliver(f, Some(&cell), now, out);
                }
            }
        }
        self.expire_requests(now, out);
    }

    /// The cell behind `peer` has not taken a message for too long: it is
    /// told GBYE `slow_consumer` and removed, and what it held moves on.
    pub fn slow_consumer(&mut self, peer: &[u8], now: Instant, out: &mut Vec<Output>) {
        if let Some(id) = self.peers.get(peer).copied() {
            Metrics::incr(&self.metrics.slow_consumers);
            let bye = Goodbye {
                reason: Some("slow_consumer".to_owned()),
            };
            out.push(to_peer(peer, frame::encode_json(Verb::GBYE, &bye)));
            self.remove_cell(&id, DisconnectReason::SlowConsumer, now, out);
        }
    }

    /// The cell behind `peer` cannot be reached any more.
    pub fn peer_unreachable(&mut self, peer: &[u8], now: Instant, out: &mut Vec<Output>) {
        if let Some(id) = self.peers.get(peer).copied() {
            self.remove_cell(&id, DisconnectReason::Unreachable, now, out);
        }
    }

    /// Removes a cell and redelivers what it had not acked.
    fn remove_cell(
        &mut self,
        id: &Thid,
        reason: DisconnectReason,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        self.announce(id, "left", out);
        let Some(cell) = self.cells.remove(id) else {
            return;
        };
        tracing::debug!(cell = %id, service = %cell.service, ?reason, "cell left");
        self.peers.remove(&cell.peer);
        self.metrics
            .cells
            .store(self.cells.len() as u64, Ordering::Relaxed);
        self.invalidate();
        self.redeliver_all_of(id, now, out);
        // Deliveries other transmitters handed to it go back to them.
        let mut handed_back: HashMap<Thid, Vec<Thid>> = HashMap::new();
        self.proxied.retain(|(event, cell), origin| {
            if cell != id {
                return true;
            }
            handed_back.entry(*origin).or_default().push(*event);
            false
        });
        for (origin, ids) in handed_back {
            out.push(mesh_ack(origin, ids, *id, false));
        }
    }

    /// Begins shutdown: says GBYE to every cell and refuses new ones.
    pub fn shutdown(&mut self, out: &mut Vec<Output>) {
        self.stopping = true;
        let bye = frame::encode_json(
            Verb::GBYE,
            &Goodbye {
                reason: Some("shutdown".to_owned()),
            },
        );
        for cell in self.cells.values() {
            out.push(to_peer(&cell.peer, bye.clone()));
        }
    }

    /// The transmitter's THID.
    pub fn id(&self) -> Thid {
        self.id
    }

    /// The counters this router writes.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Metadata keys only the transmitter sets.
pub const RESERVED_KEYS: &[&str] = &["host", "transmitter"];
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY: usize = 64;
/// Deepest nesting of a metadata value.
pub const MAX_METADATA_DEPTH: usize = 8;
/// Largest metadata of one cell, as JSON text.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Checks metadata a cell sent; the error names every bad key and why.
/// Appends `"payload":<raw JSON>` to a frame whose body is a JSON object,
/// copying the payload's text as it came.
fn with_raw_payload(mut frame: Vec<u8>, payload: Option<&serde_json::value::RawValue>) -> Vec<u8> {
    if let Some(p) = payload {
        frame.pop();
        frame.extend_from_slice(b",\"payload\":");
        frame.extend_from_slice(p.get().as_bytes());
        frame.push(b'}');
    }
    frame
}

/// A reply body: `fields`, plus `ref` when the command had one.
fn with_ref<const N: usize>(
    reference: Option<Value>,
    fields: [(&str, Value); N],
) -> Map<String, Value> {
    let mut body: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if let Some(r) = reference {
        body.insert("ref".to_owned(), r);
    }
    body
}

/// Refuses metadata larger than [`MAX_METADATA_BYTES`] as JSON text.
fn check_size(metadata: &Map<String, Value>) -> Result<(), String> {
    let size = serde_json::to_string(metadata)
        .map(|s| s.len())
        .unwrap_or(0);
    if size > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata of {size} bytes exceeds {MAX_METADATA_BYTES}"
        ));
    }
    Ok(())
}

fn check_metadata(metadata: &Map<String, Value>, null_removes: bool) -> Result<(), String> {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let mut bad = Vec::new();
    for (k, v) in metadata {
        let why = if RESERVED_KEYS.contains(&k.as_str()) {
            Some("reserved: the transmitter sets it")
        } else if k.is_empty() || k.len() > MAX_METADATA_KEY {
            Some("a key has 1 to 64 bytes")
        } else if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("a key has no whitespace")
        } else if v.is_null() && !null_removes {
            Some("null is not a value; leave the key out")
        } else if depth(v) > MAX_METADATA_DEPTH {
            Some("nested deeper than 8 levels")
        } else {
            None
        };
        if let Some(why) = why {
            bad.push(format!("{k:?} ({why})"));
        }
    }
    if !bad.is_empty() {
        return Err(format!("bad metadata keys: {}", bad.join(", ")));
    }
    check_size(metadata)
}

/// Parses a `where`: a selector string, a JSON query, or nothing (every
/// cell matches).
fn parse_query(q: Option<&Value>) -> Result<Query, String> {
    match q {
        None | Some(Value::Null) => Query::parse_selector(""),
        Some(Value::String(s)) => Query::parse_selector(s),
        Some(v) => Query::from_json(v),
    }
    .map_err(|e| format!("bad query: {e}"))
}

/// Every remote cell of a view, with the transmitter that owns it.
fn remote_cells(view: &HashMap<Thid, RemoteNode>) -> HashMap<Thid, (Thid, &RemoteCell)> {
    view.iter()
        .flat_map(|(node, n)| n.cells.iter().map(move |(id, c)| (*id, (*node, c))))
        .collect()
}

/// A `MEMB <service> {json}` frame for the event socket.
fn membership(
    event: &str,
    id: &Thid,
    service: &str,
    metadata: &Map<String, Value>,
    transmitter: &Thid,
) -> Output {
    let body = serde_json::json!({
        "event": event,
        "cell": {"id": id, "service": service, "metadata": metadata, "transmitter": transmitter},
    });
    let mut frame = frame::MEMBERSHIP_TOPIC.to_vec();
    frame.extend_from_slice(service.as_bytes());
    frame.push(b' ');
    frame.extend_from_slice(body.to_string().as_bytes());
    Output::Publish {
        frame,
        binary: None,
    }
}

/// Verbs a cell may send.
fn is_cell_verb(verb: Verb) -> bool {
    matches!(
        verb,
        Verb::HELO
            | Verb::LSTN
            | Verb::UNLS
            | Verb::EVNT
            | Verb::ACKN
            | Verb::NACK
            | Verb::PING
            | Verb::PONG
            | Verb::GBYE
            | Verb::META
            | Verb::SEND
            | Verb::DISC
            | Verb::RQST
            | Verb::RPLY
    )
}

/// A `MACK` to the transmitter that awaits the answer for `ids`.
fn mesh_ack(origin: Thid, ids: Vec<Thid>, cell: Thid, ok: bool) -> Output {
    Output::ToNode {
        node: origin,
        frame: frame::encode_json(Verb::MACK, &MeshAck { ids, cell, ok }),
        binary: None,
    }
}

fn to_peer(peer: &[u8], frame: Vec<u8>) -> Output {
    Output::ToPeer {
        peer: Arc::from(peer),
        frame,
        binary: None,
    }
}

fn ok(reference: Option<Value>) -> Vec<u8> {
    frame::encode_json(Verb::OKAY, &Ref { reference })
}

/// Parses a body, turning JSON errors into `bad_json` with the `ref` if
/// one can still be read.
fn parse<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, Failure> {
    // serde would also read a struct from a JSON array of its fields.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(Failure::new(
            ErrorCode::BadJson,
            "the body must be a JSON object",
            None,
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            ErrorCode::BadJson,
            format!("bad body: {e}"),
            reference(body),
        )
    })
}

/// A message of a batch from another transmitter (its body, `bin` taken
/// off) and its binary payload.
type MeshItem<'a> = WithBinary<'a, Cow<'a, [u8]>>;

/// The messages of a batch of `MDLV`s or `MEVT`s from another
/// transmitter, each with its binary payload. Packed, each message's
/// `bin` is its last field (our own writer puts it there); it is taken off
/// the body, which goes on to a cell.
fn mesh_items<'a>(body: &'a [u8], binaries: &[&'a [u8]]) -> Result<Vec<MeshItem<'a>>, Failure> {
    let items: Vec<(Cow<'a, [u8]>, Option<u64>)> = batch_elements(body)?
        .into_iter()
        .map(|item| {
            let item = item.get().as_bytes();
            match trailing_bin(item) {
                Some((head, n)) => (Cow::Owned([head, b"}"].concat()), Some(n)),
                None => (Cow::Borrowed(item), None),
            }
        })
        .collect();
    Ok(with_binaries(items, |(_, bin)| *bin, binaries)?
        .into_iter()
        .map(|((body, _), binary)| (body, binary))
        .collect())
}

/// `{...,"bin":<n>}` as `{...` (without the bin and the closing brace)
/// and `n`; `None` when the object does not end with a `bin`.
fn trailing_bin(item: &[u8]) -> Option<(&[u8], u64)> {
    let inner = item.strip_suffix(b"}")?;
    let digits = inner
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let (head, number) = inner.split_at(inner.len() - digits);
    let head = head.strip_suffix(br#","bin":"#)?;
    let n = std::str::from_utf8(number).ok()?.parse().ok()?;
    Some((head, n))
}

/// The elements of a batch body (a JSON array).
fn batch_elements(body: &[u8]) -> Result<Vec<&serde_json::value::RawValue>, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::new(ErrorCode::BadJson, format!("bad batch: {e}"), None))
}

/// An element of a batch and its binary payload, if any.
type WithBinary<'a, T> = (T, Option<&'a [u8]>);

/// Each element of a batch with its binary payload (PROTOCOL.md §23, as
/// [`frame::batch_frames`] matches them), given how to read an element's
/// `bin` (`None` also for one that could not be read).
fn with_binaries<'a, T>(
    items: Vec<T>,
    bin: impl Fn(&T) -> Option<u64>,
    binaries: &[&'a [u8]],
) -> Result<Vec<WithBinary<'a, T>>, Failure> {
    let bins: Vec<Option<u64>> = items.iter().map(bin).collect();
    let lengths: Vec<usize> = binaries.iter().map(|b| b.len()).collect();
    let payloads: Vec<Option<&[u8]>> = match frame::batch_frames(&bins, &lengths) {
        Ok(BatchFrames::OnePerElement) => {
            (0..items.len()).map(|i| binaries.get(i).copied()).collect()
        }
        Ok(BatchFrames::Packed(ranges)) => {
            ranges.into_iter().map(|r| Some(&binaries[0][r])).collect()
        }
        Err(e) => return Err(Failure::new(ErrorCode::BadMultipart, e.to_string(), None)),
    };
    Ok(items.into_iter().zip(payloads).collect())
}

/// Whether a body is a JSON array (a batch).
fn is_array(body: &[u8]) -> bool {
    body.trim_ascii_start().first() == Some(&b'[')
}

/// The `ref` of a body, if it is JSON with one.
fn reference(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Ref>(body)
        .ok()
        .and_then(|r| r.reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Harness {
        router: Router,
        now: Instant,
        out: Vec<Output>,
        /// Membership events seen, kept apart from the other outputs.
        membership: Vec<String>,
    }

    impl Harness {
        fn new() -> Self {
            let config = Config {
                ack_timeout: Duration::from_secs(5),
                ..Config::for_tests()
            };
            Harness {
                router: Router::new(Thid::random(), "tcp://x:1".into(), &config, Arc::default()),
                now: Instant::now(),
                out: Vec::new(),
                membership: Vec::new(),
            }
        }

        fn send(&mut self, peer: &str, frame: &str) -> Vec<(String, String)> {
            self.router.handle(
                peer.as_bytes(),
                &[frame.as_bytes()],
                true,
                self.now,
                &mut self.out,
            );
            self.drain()
        }

        fn drain(&mut self) -> Vec<(String, String)> {
            let all: Vec<Output> = self.out.drain(..).collect();
            let (memb, rest): (Vec<Output>, Vec<Output>) = all.into_iter().partition(|o| {
                matches!(o, Output::Publish { frame, .. } if frame.starts_with(frame::MEMBERSHIP_TOPIC))
            });
            for m in memb {
                if let Output::Publish { frame, .. } = m {
                    self.membership.push(String::from_utf8(frame).unwrap());
                }
            }
            rest.into_iter()
                .map(|o| match &o {
                    Output::ToPeer { peer, .. }
                    | Output::Multicatch { peer, .. }
                    | Output::Batch { peer, .. } => (
                        String::from_utf8(peer.to_vec()).unwrap(),
                        String::from_utf8(o.frame().to_vec()).unwrap(),
                    ),
                    Output::Publish { .. } => {
                        ("PUB".into(), String::from_utf8(o.frame().to_vec()).unwrap())
                    }
                    Output::ToNode { node, .. } | Output::NodeBatch { node, .. } => (
                        format!("node:{node}"),
                        String::from_utf8(o.frame().to_vec()).unwrap(),
                    ),
                })
                .collect()
        }

        fn join(&mut self, peer: &str, service: &str) -> Thid {
            let id = Thid::random();
            let r = self.send(
                peer,
                &format!(r#"J HELO {{"id":"{id}","service":"{service}"}}"#),
            );
            assert!(r[0].1.starts_with("J WLCM"), "{r:?}");
            id
        }

        fn listen(&mut self, peer: &str, pattern: &str, mode: &str) {
            let r = self.send(
                peer,
                &format!(r#"J LSTN {{"pattern":"{pattern}","mode":"{mode}"}}"#),
            );
            assert_eq!(r, vec![(peer.to_owned(), "J OKAY {}".to_owned())]);
        }

        fn tick(&mut self, after: Duration) -> Vec<(String, String)> {
            self.now += after;
            self.router.tick(self.now, &mut self.out);
            self.drain()
        }
    }

    fn code(reply: &[(String, String)]) -> String {
        let body: Value = serde_json::from_str(&reply[0].1["J ERRR ".len()..]).unwrap();
        body["code"].as_str().unwrap().to_owned()
    }

    fn delivery_id(frame: &str) -> String {
        let body: Value = serde_json::from_str(&frame["J DLVR ".len()..]).unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    #[test]
    fn anycatch_delivers_each_event_to_exactly_one_cell_per_service() {
        let mut h = Harness::new();
        for p in ["a1", "a2", "a3"] {
            h.join(p, "alpha");
            h.listen(p, "orders::*", "any");
        }
        h.join("b1", "beta");
        h.listen("b1", "*::created", "any");
        h.join("pub", "publisher");
        let mut per_peer: HashMap<String, usize> = HashMap::new();
        for i in 0..30 {
            let r = h.send(
                "pub",
                &format!(r#"J EVNT {{"channel":"orders::created","payload":{i}}}"#),
            );
            assert_eq!(r.len(), 2, "one delivery per service: {r:?}");
            for (peer, _) in r {
                *per_peer.entry(peer).or_default() += 1;
            }
        }
        assert_eq!(per_peer["b1"], 30);
        assert_eq!(per_peer["a1"] + per_peer["a2"] + per_peer["a3"], 30);
        assert_eq!(per_peer["a1"], 10, "round robin spreads evenly");
    }

    #[test]
    fn multicatch_sends_one_copy_to_each_listening_cell() {
        let mut h = Harness::new();
        h.join("m1", "m");
        h.listen("m1", "news::*", "multi");
        h.listen("m1", "news::sport", "multi");
        h.join("m2", "m");
        h.listen("m2", "news::sport", "multi");
        h.join("m3", "m");
        h.listen("m3", "news::weather", "multi");
        h.join("pub", "p");
        let mut r = h.send(
            "pub",
            r#"J EVNT {"channel":"news::sport","payload":"goal"}"#,
        );
        r.sort();
        let peers: Vec<&str> = r.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            peers,
            ["m1", "m2"],
            "one copy per cell, however many listens match"
        );
        assert_eq!(r[0].1, r[1].1);
        assert!(r[0].1.starts_with(r#"J EVNT {"id":""#), "{}", r[0].1);
        assert!(!r[0].1.contains("attempt"), "{}", r[0].1);
        assert_eq!(h.router.metrics().snapshot()["multicast"], 2);
    }

    #[test]
    fn a_nack_redelivers_to_another_cell_with_a_higher_attempt() {
        let mut h = Harness::new();
        h.join("a1", "s");
        h.listen("a1", "c", "any");
        h.join("a2", "s");
        h.listen("a2", "c", "any");
        h.join("pub", "p");
        let r = h.send("pub", r#"J EVNT {"channel":"c"}"#);
        let (first, frame) = r[0].clone();
        let id = delivery_id(&frame);
        let r = h.send(&first, &format!(r#"J NACK {{"id":"{id}"}}"#));
        assert_eq!(r.len(), 1);
        assert_ne!(r[0].0, first);
        assert!(r[0].1.contains(r#""attempt":2"#));
        assert!(h
            .send(&r[0].0.clone(), &format!(r#"J ACKN {{"ids":["{id}"]}}"#))
            .is_empty());
        assert_eq!(h.router.in_flight_count(), 0);
    }

    #[test]
    fn unacked_deliveries_are_redelivered_after_the_deadline_or_when_the_cell_dies() {
        let mut h = Harness::new();
        h.join("a1", "s");
        h.listen("a1", "c", "any");
        h.join("a2", "s");
        h.listen("a2", "c", "any");
        h.join("pub", "p");
        let (first, _) = h.send("pub", r#"J EVNT {"channel":"c"}"#)[0].clone();
        for step in [2500, 2600] {
            h.now += Duration::from_millis(step);
            for peer in ["a1", "a2", "pub"] {
                h.send(peer, "J PING");
            }
            if step == 2500 {
                assert!(h.tick(Duration::ZERO).is_empty(), "not yet due");
            }
        }
        let r = h.tick(Duration::ZERO);
        assert_eq!(r.len(), 1, "redelivered after the ack timeout: {r:?}");
        assert_ne!(r[0].0, first);
        let second = r[0].0.clone();
        h.send(&second, r#"J GBYE {}"#);
        let r = h.drain();
        assert!(r.is_empty());
        // The GBYE moved the delivery back to the first cell.
        assert_eq!(h.router.in_flight_count(), 1);
        assert_eq!(h.router.cell_count(), 2);
    }

    #[test]
    fn silent_cells_expire_and_their_deliveries_move_on() {
        let mut h = Harness::new();
        h.join("a1", "s");
        h.listen("a1", "c", "any");
        h.join("pub", "p");
        h.send("pub", r#"J EVNT {"channel":"c"}"#);
        h.join("a2", "s");
        h.listen("a2", "c", "any");
        h.now += Duration::from_millis(2000);
        h.send("a2", "J PING");
        h.send("pub", "J PING");
        let r = h.tick(Duration::from_millis(1500));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, "a2");
        assert!(r[0].1.contains(r#""attempt":2"#));
        assert_eq!(h.router.cell_count(), 2);
    }

    #[test]
    fn redeliveries_wait_for_a_cell_of_their_service() {
        let mut h = Harness::new();
        h.join("a1", "s");
        h.listen("a1", "c", "any");
        h.join("pub", "p");
        h.send("pub", r#"J EVNT {"channel":"c"}"#);
        h.send("a1", "J GBYE");
        assert!(h.drain().is_empty());
        h.join("a2", "s");
        let r = h.send("a2", r#"J LSTN {"pattern":"c","mode":"any"}"#);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[1].1.contains(r#""attempt":2"#));
    }

    fn remote_node(node: Thid, cell: Thid, service: &str, mode: &str) -> NodeRecord {
        serde_json::from_value(serde_json::json!({
            "id": node, "command": "tcp://127.0.0.1:1",
            "cells": [{"id": cell, "service": service,
                       "listens": [{"pattern": "jobs::*", "mode": mode, "ack": true}]}]
        }))
        .unwrap()
    }

    #[test]
    fn events_reach_remote_cells_through_their_transmitter_and_acks_come_back() {
        let mut h = Harness::new();
        let (node, cell) = (Thid::random(), Thid::random());
        h.router
            .set_view(vec![remote_node(node, cell, "w", "any")], h.now, &mut h.out);
        h.join("pub", "p");
        let r = h.send("pub", r#"J EVNT {"channel":"jobs::1","payload":1}"#);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, format!("node:{node}"));
        assert!(r[0].1.starts_with("J MDLV "), "{}", r[0].1);
        assert!(r[0].1.contains(&format!(r#""cell":"{cell}""#)));
        let id = delivery_id(&r[0].1.replace("J MDLV ", "J DLVR "));
        assert_eq!(h.router.in_flight_count(), 1);
        let ack = format!(r#"J MACK {{"ids":["{id}"],"cell":"{cell}","ok":true}}"#);
        assert!(h.send("node-peer", &ack).is_empty());
        assert_eq!(h.router.in_flight_count(), 0);
    }

    #[test]
    fn a_remote_cell_gets_no_more_unanswered_deliveries_from_us_than_its_concurrency() {
        let mut h = Harness::new();
        let (node, cell) = (Thid::random(), Thid::random());
        let mut rec = remote_node(node, cell, "w", "any");
        rec.cells[0].listens[0].concurrency = 2;
        h.router.set_view(vec![rec], h.now, &mut h.out);
        h.join("pub", "p");
        let mut sent = Vec::new();
        for i in 0..5 {
            let r = h.send(
                "pub",
                &format!(r#"J EVNT {{"channel":"jobs::1","payload":{i}}}"#),
            );
            sent.extend(r.into_iter().map(|(_, f)| f));
        }
        assert_eq!(
            sent.len(),
            2,
            "the other three wait at the origin: {sent:?}"
        );
        let id = delivery_id(&sent[0].replace("J MDLV ", "J DLVR "));
        let ack = format!(r#"J MACK {{"ids":["{id}"],"cell":"{cell}","ok":true}}"#);
        let r = h.send("node-peer", &ack);
        assert_eq!(r.len(), 1, "one freed slot, one waiting delivery: {r:?}");
        assert!(
            r[0].1.starts_with("J MDLV ") && r[0].1.contains(r#""payload":2"#),
            "{r:?}"
        );
    }

    #[test]
    fn a_transmitter_leaving_the_view_hands_its_deliveries_to_other_cells() {
        let mut h = Harness::new();
        let (node, cell) = (Thid::random(), Thid::random());
        h.router
            .set_view(vec![remote_node(node, cell, "w", "any")], h.now, &mut h.out);
        h.join("pub", "p");
        h.send("pub", r#"J EVNT {"channel":"jobs::1"}"#);
        h.join("local", "w");
        h.listen("local", "jobs::*", "any");
        h.router.set_view(Vec::new(), h.now, &mut h.out);
        let r = h.drain();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, "local");
        assert!(r[0].1.contains(r#""attempt":2"#));
    }

    #[test]
    fn forwarded_deliveries_go_to_the_local_cell_and_its_ack_goes_to_the_origin() {
        let mut h = Harness::new();
        let cell = h.join("c", "w");
        let (origin, event) = (Thid::random(), Thid::random());
        let mdlv = format!(
            r#"J MDLV {{"id":"{event}","channel":"jobs::1","from":"{origin}","attempt":1,"cell":"{cell}","origin":"{origin}","ack":true}}"#
        );
        let r = h.send("node-peer", &mdlv);
        assert_eq!(r[0].0, "c");
        assert!(r[0].1.starts_with("J DLVR "));
        let r = h.send("c", &format!(r#"J ACKN {{"id":"{event}"}}"#));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, format!("node:{origin}"));
        assert!(
            r[0].1.starts_with("J MACK ") && r[0].1.contains(r#""ok":true"#),
            "{}",
            r[0].1
        );
    }

    #[test]
    fn a_batch_of_forwarded_deliveries_and_events_is_handled_one_by_one() {
        let mut h = Harness::new();
        let cell = h.join("c", "w");
        h.listen("c", "jobs::*", "any");
        h.listen("c", "news::*", "multi");
        let origin = Thid::random();
        let mdlv = |event: Thid| {
            format!(
                r#"{{"id":"{event}","channel":"jobs::1","from":"{origin}","attempt":1,"cell":"{cell}","origin":"{origin}","ack":true}}"#
            )
        };
        let (e1, e2) = (Thid::random(), Thid::random());
        let batch = format!("J MDLV [{},{}]", mdlv(e1), mdlv(e2));
        h.router.handle(
            b"node-peer",
            &[batch.as_bytes(), b"b1", b"b2"],
            true,
            h.now,
            &mut h.out,
        );
        let sent: Vec<Output> = h.out.drain(..).collect();
        assert_eq!(sent.len(), 2, "{sent:?}");
        for (o, (event, binary)) in sent.iter().zip([(e1, b"b1"), (e2, b"b2")]) {
            let Output::ToPeer {
                frame,
                binary: Some(b),
                ..
            } = o
            else {
                panic!("{o:?}")
            };
            assert!(String::from_utf8_lossy(frame).contains(&event.to_hex()));
            assert_eq!(&b[..], binary);
        }
        let mevt = format!(
            r#"J MEVT [{{"id":"{e1}","channel":"news::a","from":"{origin}"}},{{"id":"{e2}","channel":"news::b","from":"{origin}"}}]"#
        );
        let r = h.send("node-peer", &mevt);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r.iter().all(|(p, f)| p == "c" && f.starts_with("J EVNT {")));
        // A cell cannot send mesh batches.
        assert_eq!(code(&h.send("c", &mevt)), "unknown_verb");
    }

    #[test]
    fn multicatch_events_go_once_to_each_transmitter_with_listeners() {
        let mut h = Harness::new();
        let (n1, n2) = (Thid::random(), Thid::random());
        h.router.set_view(
            vec![
                remote_node(n1, Thid::random(), "a", "multi"),
                remote_node(n2, Thid::random(), "b", "multi"),
            ],
            h.now,
            &mut h.out,
        );
        h.join("pub", "p");
        let mut r = h.send("pub", r#"J EVNT {"channel":"jobs::1"}"#);
        r.sort();
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r.iter().all(|(_, f)| f.starts_with("J MEVT ")));
        h.join("m", "m");
        h.listen("m", "jobs::*", "multi");
        let evnt = h.send("node-peer", &r[0].1.clone());
        assert_eq!(evnt.len(), 1, "{evnt:?}");
        assert_eq!(evnt[0].0, "m");
        assert!(evnt[0].1.starts_with(r#"J EVNT {"id":""#), "{evnt:?}");
    }

    #[test]
    fn a_reconnected_cell_takes_its_thid_over_once_the_old_connection_fell_silent() {
        let mut h = Harness::new();
        let id = h.join("old", "s");
        let helo = format!(r#"J HELO {{"id":"{id}","service":"s"}}"#);
        assert_eq!(code(&h.send("new", &helo)), "thid_in_use");
        h.now += Duration::from_millis(1500);
        let r = h.send("new", &helo);
        assert!(r[0].1.starts_with("J WLCM"), "{r:?}");
        assert_eq!(h.router.cell_count(), 1);
        assert_eq!(
            code(&h.send("old", r#"J LSTN {"pattern":"a","mode":"any"}"#)),
            "not_welcomed"
        );
    }

    fn ok_body(reply: &[(String, String)]) -> Value {
        assert!(reply[0].1.starts_with("J OKAY "), "{reply:?}");
        serde_json::from_str(&reply[0].1["J OKAY ".len()..]).unwrap()
    }

    fn join_with(h: &mut Harness, peer: &str, service: &str, meta: Value) -> Thid {
        let id = Thid::random();
        let helo = serde_json::json!({"id": id, "service": service, "metadata": meta});
        let r = h.send(peer, &format!("J HELO {helo}"));
        assert!(r[0].1.starts_with("J WLCM"), "{r:?}");
        id
    }

    #[test]
    fn metadata_is_validated_merged_replaced_and_keeps_its_reserved_keys() {
        let mut h = Harness::new();
        h.router.note_address(b"c", "10.1.2.3");
        join_with(&mut h, "c", "s", serde_json::json!({"version": "1.0.0"}));
        let r = h.send("c", r#"J META {"metadata":{"region":"eu"}}"#);
        let m = &ok_body(&r)["metadata"];
        assert_eq!(m["version"], "1.0.0");
        assert_eq!(m["region"], "eu");
        assert_eq!(m["host"], "10.1.2.3");
        assert_eq!(m["transmitter"], h.router.id().to_hex());
        let r = h.send("c", r#"J META {"metadata":{"tier":"gold"},"replace":true}"#);
        let m = &ok_body(&r)["metadata"];
        assert!(m.get("version").is_none());
        assert_eq!(m["host"], "10.1.2.3");
        let r = h.send("c", r#"J META {"metadata":{"tier":null,"zone":"b"}}"#);
        let m = &ok_body(&r)["metadata"];
        assert!(
            m.get("tier").is_none(),
            "null removes a key when merging: {m}"
        );
        assert_eq!(m["zone"], "b");
        assert!(
            ok_body(&r).get("ref").is_none(),
            "no ref asked, none echoed"
        );
        let r = h.send(
            "c",
            r#"J META {"metadata":{"host":"x","a b":1,"n":null,"ok":1},"ref":3,"replace":true}"#,
        );
        assert_eq!(code(&r), "bad_metadata");
        let err: Value = serde_json::from_str(&r[0].1["J ERRR ".len()..]).unwrap();
        let message = err["message"].as_str().unwrap();
        for key in ["\"host\"", "\"a b\"", "\"n\""] {
            assert!(message.contains(key), "{key} named in {message}");
        }
        assert!(!message.contains("\"ok\""));
        assert!(r[0].1.contains(r#""re":3"#));
        let helo = r#"J HELO {"id":"0000000000000000000000000000000000000009","service":"s","metadata":{"transmitter":"me"}}"#;
        assert_eq!(code(&h.send("d", helo)), "bad_metadata");
        assert_eq!(
            h.membership.len(),
            4,
            "joined, then three updates: {:?}",
            h.membership
        );
        assert!(h.membership[0].starts_with("MEMB s {"));
        assert!(h.membership[0].contains(r#""event":"joined""#));
    }

    #[test]
    fn targeted_sends_reach_one_or_all_matching_cells_and_no_match_is_no_route() {
        let mut h = Harness::new();
        let v1 = join_with(
            &mut h,
            "v1",
            "backend",
            serde_json::json!({"version": "1.9.0"}),
        );
        let v2 = join_with(
            &mut h,
            "v2",
            "backend",
            serde_json::json!({"version": "2.10.0"}),
        );
        let v3 = join_with(
            &mut h,
            "v3",
            "backend",
            serde_json::json!({"version": "2.2.0"}),
        );
        for p in ["v1", "v2", "v3"] {
            h.listen(p, "send::backend", "any");
        }
        h.join("pub", "p");
        let mut seen = HashSet::new();
        for _ in 0..6 {
            let r = h.send(
                "pub",
                r#"J SEND {"service":"backend","where":"version>=2.0.0","payload":1}"#,
            );
            assert_eq!(r.len(), 2, "{r:?}");
            assert!(r[0].0 == "v2" || r[0].0 == "v3", "{r:?}");
            seen.insert(r[0].0.clone());
            assert_eq!(ok_body(&r[1..])["routed"], 1);
        }
        assert_eq!(
            seen.len(),
            2,
            "one-cell sends spread over the matching cells"
        );
        let r = h.send(
            "pub",
            r#"J SEND {"service":"backend","where":"version>=2.0.0","all":true}"#,
        );
        assert_eq!(r.len(), 3, "{r:?}");
        let r = h.send(
            "pub",
            r#"J SEND {"service":"backend","where":"version>=3","ref":"q"}"#,
        );
        assert_eq!(code(&r), "no_route");
        assert!(r[0].1.contains(r#""re":"q""#));
        let r = h.send(
            "pub",
            r#"J SEND {"service":"backend","where":"version>=3","droppable":true}"#,
        );
        assert_eq!(ok_body(&r)["routed"], 0);
        let r = h.send(
            "pub",
            r#"J SEND {"service":"backend","where":"version>=3","optional":true}"#,
        );
        assert_eq!(r.len(), 2, "optional falls back to any cell: {r:?}");
        let r = h.send("pub", r#"J SEND {"service":"backend","where":"version>>"}"#);
        assert_eq!(code(&r), "bad_query");
        let key = |h: &mut Harness| {
            h.send("pub", r#"J SEND {"service":"backend","key":"user-123"}"#)[0]
                .0
                .clone()
        };
        let first = key(&mut h);
        assert!(
            (0..5).all(|_| key(&mut h) == first),
            "a key sticks to one cell"
        );
        let _ = (v1, v2, v3);
    }

    #[test]
    fn a_failed_targeted_send_is_redelivered_only_to_another_matching_cell() {
        let mut h = Harness::new();
        join_with(
            &mut h,
            "old",
            "backend",
            serde_json::json!({"version": "1.0.0"}),
        );
        join_with(
            &mut h,
            "new1",
            "backend",
            serde_json::json!({"version": "2.0.0"}),
        );
        join_with(
            &mut h,
            "new2",
            "backend",
            serde_json::json!({"version": "2.1.0"}),
        );
        for p in ["old", "new1", "new2"] {
            h.listen(p, "send::backend", "any");
        }
        h.join("pub", "p");
        let r = h.send(
            "pub",
            r#"J SEND {"service":"backend","where":"version>=2"}"#,
        );
        let (first, frame) = r[0].clone();
        let id = delivery_id(&frame);
        assert_ne!(first, "old");
        let mut holder = first;
        for _ in 0..4 {
            let r = h.send(&holder, &format!(r#"J NACK {{"id":"{id}"}}"#));
            holder = r[0].0.clone();
            assert_ne!(holder, "old", "never to a cell outside the query");
        }
        h.send(&holder, &format!(r#"J ACKN {{"id":"{id}"}}"#));
        assert_eq!(h.router.in_flight_count(), 0);
    }

    #[test]
    fn a_batch_of_events_is_published_one_by_one_with_an_error_for_each_bad_one() {
        let mut h = Harness::new();
        h.join("c", "s");
        h.listen("c", "jobs::*", "any");
        h.join("pub", "p");
        let r = h.send(
            "pub",
            r#"J EVNT [{"channel":"jobs::1","payload":1},{"channel":"bad*","ref":"x"},{"channel":"jobs::2","payload":2}]"#,
        );
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r[0].1.starts_with("J DLVR ") && r[0].1.contains(r#""payload":1"#));
        assert_eq!(r[1].0, "pub");
        assert!(r[1].1.contains(r#""code":"bad_pattern""#) && r[1].1.contains(r#""re":"x""#));
        assert!(r[2].1.starts_with("J DLVR ") && r[2].1.contains(r#""payload":2"#));
        assert_eq!(h.router.metrics().snapshot()["events_in"], 2 + 1);
        assert_eq!(
            code(&h.send("pub", r#"J EVNT [{"channel":"jobs::1"},"#)),
            "bad_json"
        );
        assert_eq!(h.router.batching(b"pub"), Batching::Off);
        let r = h.send(
            "stranger",
            r#"J EVNT [{"channel":"jobs::1","ref":"a"},{"channel":"jobs::2","ref":"b"}]"#,
        );
        assert_eq!(r.len(), 2, "one not_welcomed per event: {r:?}");
        assert!(r[0].1.contains(r#""code":"not_welcomed""#) && r[0].1.contains(r#""re":"a""#));
        assert!(r[1].1.contains(r#""re":"b""#));

        // Binary frames: one per event, in order, or none.
        let batch = br#"J EVNT [{"channel":"jobs::1"},{"channel":"jobs::2"}]"#;
        h.router
            .handle(b"pub", &[batch, b"b1", b"b2"], false, h.now, &mut h.out);
        let sent: Vec<_> = h.out.drain(..).collect();
        let binaries: Vec<&[u8]> = sent
            .iter()
            .map(|o| match o {
                Output::ToPeer {
                    binary: Some(b), ..
                } => &b[..],
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(binaries, [&b"b1"[..], &b"b2"[..]]);
        h.router
            .handle(b"pub", &[batch, b"b1"], false, h.now, &mut h.out);
        assert_eq!(code(&h.drain()), "bad_multipart");
        let single = br#"J EVNT {"channel":"jobs::1"}"#;
        h.router
            .handle(b"pub", &[single, b"b1", b"b2"], false, h.now, &mut h.out);
        assert_eq!(code(&h.drain()), "bad_multipart");
    }

    /// The binary payload of each `DLVR` in `out`, in order.
    fn delivered_binaries(out: Vec<Output>) -> Vec<Vec<u8>> {
        out.iter()
            .map(|o| match o {
                Output::ToPeer {
                    frame,
                    binary: Some(b),
                    ..
                } if frame.starts_with(b"J DLVR ") => b.to_vec(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_packed_batch_from_another_transmitter_reaches_cells_without_its_bins() {
        let mut h = Harness::new();
        let cell = h.join("c", "s");
        h.listen("c", "jobs::*", "any");
        let origin = Thid::random();
        // As transmitters write them (read without serde), and with the
        // optional `request` left out (read the general way).
        let canonical = |id: Thid, bin: usize| {
            format!(
                r#"{{"id":"{id}","channel":"jobs::1","from":"{origin}","attempt":1,"cell":"{cell}","origin":"{origin}","ack":false,"request":false,"bin":{bin}}}"#
            )
        };
        let general = |id: Thid, bin: usize| canonical(id, bin).replace(r#","request":false"#, "");
        /// What the router sends for a batch from another transmitter
        /// with the packed frame `abc`.
        fn from_node(h: &mut Harness, batch: String) -> Vec<Output> {
            h.router.handle(
                b"node",
                &[batch.as_bytes(), b"abc"],
                true,
                h.now,
                &mut h.out,
            );
            h.out.drain(..).collect()
        }
        for mdlv in [&canonical as &dyn Fn(Thid, usize) -> String, &general] {
            let (e1, e2) = (Thid::random(), Thid::random());
            let out = from_node(&mut h, format!("J MDLV [{},{}]", mdlv(e1, 1), mdlv(e2, 2)));
            for o in &out {
                let frame = String::from_utf8_lossy(o.frame());
                assert!(
                    !frame.contains("bin"),
                    "the bin stays between transmitters: {frame}"
                );
                assert!(
                    frame.starts_with("J DLVR {") && frame.ends_with('}'),
                    "{frame}"
                );
                assert!(frame.contains(&format!(r#""cell":"{cell}""#)), "{frame}");
            }
            assert_eq!(delivered_binaries(out), [b"a".to_vec(), b"bc".to_vec()]);

            let refused = from_node(&mut h, format!("J MDLV [{},{}]", mdlv(e1, 1), mdlv(e2, 3)));
            assert!(
                refused.len() == 1
                    && refused[0]
                        .frame()
                        .starts_with(br#"J ERRR {"code":"bad_multipart""#),
                "{refused:?}"
            );
        }
        // MEVTs the same way, to a multicatch cell.
        h.join("m", "watchers");
        h.listen("m", "news::*", "multi");
        let mevt = |bin: usize| {
            format!(
                r#"{{"id":"{}","channel":"news::1","from":"{origin}","bin":{bin}}}"#,
                Thid::random()
            )
        };
        for batch in [
            format!("J MEVT [{},{}]", mevt(1), mevt(2)),
            format!("J MEVT [ {},{}]", mevt(1), mevt(2)),
        ] {
            let events: Vec<(String, Vec<u8>)> = from_node(&mut h, batch.clone())
                .into_iter()
                .map(|o| match o {
                    Output::Multicatch {
                        frame,
                        binary: Some(b),
                        ..
                    } => (String::from_utf8_lossy(&frame).into_owned(), b.to_vec()),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(events.len(), 2, "{batch}");
            for ((frame, got), want) in events.iter().zip([&b"a"[..], b"bc"]) {
                assert!(
                    frame.starts_with("J EVNT {") && frame.ends_with('}'),
                    "{frame}"
                );
                assert!(
                    !frame.contains("bin") && frame.contains("news::1"),
                    "{frame}"
                );
                assert_eq!(got, want);
            }
        }
        assert_eq!(
            trailing_bin(br#"{"a":1,"bin":12}"#),
            Some((&br#"{"a":1"#[..], 12))
        );
        assert_eq!(trailing_bin(br#"{"a":{"bin":12}}"#), None);
        assert_eq!(trailing_bin(br#"{"a":1,"bin":}"#), None);
    }

    #[test]
    fn a_packed_batch_is_cut_by_its_bins_and_hashed_as_if_unpacked() {
        let mut h = Harness::new();
        h.join("c", "s");
        h.listen("c", "jobs::*", "any");
        let from = h.join("pub", "p");
        let r = h.send(
            "pub",
            &format!(r#"J HELO {{"id":"{from}","service":"p","batch":true,"packed":true}}"#),
        );
        assert!(r[0].1.contains(r#""packed":true"#), "{r:?}");
        assert_eq!(h.router.batching(b"pub"), Batching::Packed);

        let packed = br#"J EVNT [{"channel":"jobs::1","seq":1,"bin":2},{"channel":"jobs::2","seq":2,"bin":0},{"channel":"jobs::3","seq":3,"bin":3}]"#;
        h.router
            .handle(b"pub", &[packed, b"aaccc"], false, h.now, &mut h.out);
        let out: Vec<Output> = h.out.drain(..).collect();
        let ids: Vec<String> = out
            .iter()
            .map(|o| {
                let body: Value = serde_json::from_slice(&o.frame()[7..]).unwrap();
                body["id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            delivered_binaries(out),
            [b"aa".to_vec(), b"".to_vec(), b"ccc".to_vec()]
        );
        let expected: Vec<String> = [
            ("jobs::1", 1, &b"aa"[..]),
            ("jobs::2", 2, b""),
            ("jobs::3", 3, b"ccc"),
        ]
        .iter()
        .map(|(c, seq, p)| Thid::for_event(&from, *seq, c, p).to_hex())
        .collect();
        assert_eq!(ids, expected, "THIDs over each event's own bytes");

        // The general way (whitespace, a payload field) reads the same.
        let spaced = br#"J EVNT [ {"channel":"jobs::1","payload":{"k":1},"bin":1}, {"bin":2,"channel":"jobs::2"} ]"#;
        h.router
            .handle(b"pub", &[spaced, b"xyz"], false, h.now, &mut h.out);
        let out: Vec<Output> = h.out.drain(..).collect();
        assert_eq!(delivered_binaries(out), [b"x".to_vec(), b"yz".to_vec()]);

        // Refused whole: bins that do not add up, a missing bin, a bin
        // after an unpacked first, not exactly one frame, an unreadable element.
        for (frames, what) in [
            (vec![&packed[..], b"aacc"], "short"),
            (vec![&packed[..], b"aacccc"], "long"),
            (vec![&packed[..], b"aa", b"", b"ccc"], "three frames"),
            (vec![&packed[..]], "no frame"),
            (
                vec![
                    &br#"J EVNT [{"channel":"jobs::1","bin":1},{"channel":"jobs::2"}]"#[..],
                    b"ab",
                ],
                "missing bin",
            ),
            (
                vec![
                    &br#"J EVNT [{"channel":"jobs::1"},{"channel":"jobs::2","bin":1}]"#[..],
                    b"a",
                    b"b",
                ],
                "late bin",
            ),
            (
                vec![
                    &br#"J EVNT [{"channel":"jobs::1","bin":1},{"channel":"jobs::2","bin":-1}]"#[..],
                    b"a",
                ],
                "bad bin",
            ),
            (
                vec![&br#"J EVNT [{"channel":"jobs::1","bin":1},7]"#[..], b"a"],
                "unreadable",
            ),
        ] {
            h.router.handle(b"pub", &frames, false, h.now, &mut h.out);
            let r = h.drain();
            assert_eq!(r.len(), 1, "{what}: {r:?}");
            assert_eq!(code(&r), "bad_multipart", "{what}");
        }
    }

    #[test]
    fn discovery_answers_the_transmitters_counters() {
        let mut h = Harness::new();
        h.join("a", "s");
        h.send("a", r#"J EVNT {"channel":"nobody"}"#);
        let r = h.send("a", r#"J DISC {"what":"metrics","ref":1}"#);
        let body: Value = serde_json::from_str(r[0].1.strip_prefix("J OKAY ").unwrap()).unwrap();
        assert_eq!(body["what"], "metrics");
        assert_eq!(body["result"]["events_in"], 1);
        assert_eq!(body["result"]["dropped_no_listeners"], 1);
        assert_eq!(body["result"]["dropped_multicatch"], 0);
        assert_eq!(body["result"]["cells"], 1);
    }

    #[test]
    fn discovery_answers_for_the_whole_view() {
        let mut h = Harness::new();
        join_with(
            &mut h,
            "a",
            "backend",
            serde_json::json!({"version": "2.0.0", "region": "eu"}),
        );
        join_with(
            &mut h,
            "b",
            "backend",
            serde_json::json!({"version": "1.0.0", "region": "us"}),
        );
        let node = Thid::random();
        let mut remote = remote_node(node, Thid::random(), "gateway", "any");
        remote.cells[0].metadata = serde_json::json!({"region": "eu"})
            .as_object()
            .unwrap()
            .clone();
        h.router.set_view(vec![remote], h.now, &mut h.out);
        h.drain();
        assert!(h
            .membership
            .iter()
            .any(|m| m.starts_with("MEMB gateway ") && m.contains("joined")));
        let r = h.send("a", r#"J DISC {"what":"services","ref":1}"#);
        let b = ok_body(&r);
        assert_eq!(b["ref"], 1);
        assert_eq!(b["result"].as_array().unwrap().len(), 2);
        let r = h.send("a", r#"J DISC {"what":"instances","where":"region=eu"}"#);
        let items = ok_body(&r)["result"].as_array().unwrap().clone();
        assert_eq!(items.len(), 2);
        assert!(items.iter().any(|i| i["transmitter"] == node.to_hex()));
        let r = h.send("a", r#"J DISC {"what":"versions","service":"backend"}"#);
        assert_eq!(ok_body(&r)["result"].as_array().unwrap().len(), 2);
        assert_eq!(code(&h.send("a", r#"J DISC {"what":"moons"}"#)), "bad_json");
    }

    #[test]
    fn a_cell_never_holds_more_unanswered_deliveries_than_its_concurrency() {
        let mut h = Harness::new();
        h.join("c", "s");
        let r = h.send(
            "c",
            r#"J LSTN {"pattern":"jobs","mode":"any","concurrency":2}"#,
        );
        assert_eq!(r.len(), 1);
        h.join("pub", "p");
        let mut delivered = Vec::new();
        for i in 0..5 {
            let r = h.send(
                "pub",
                &format!(r#"J EVNT {{"channel":"jobs","payload":{i}}}"#),
            );
            delivered.extend(r);
        }
        assert_eq!(delivered.len(), 2, "two at once: {delivered:?}");
        let id = delivery_id(&delivered[0].1);
        let r = h.send("c", &format!(r#"J ACKN {{"id":"{id}"}}"#));
        assert_eq!(r.len(), 1, "one slot freed, one waiting delivery sent");
        assert!(r[0].1.contains(r#""payload":2"#), "in order: {}", r[0].1);
        assert_eq!(
            h.router.in_flight_count(),
            2,
            "two held; two still wait at the transmitter"
        );
        assert_eq!(h.router.metrics().snapshot()["queued"], 3);
    }

    #[test]
    fn work_goes_to_the_least_busy_cell_of_the_service() {
        let mut h = Harness::new();
        h.join("busy", "s");
        h.listen("busy", "jobs", "any");
        h.join("pub", "p");
        for _ in 0..3 {
            h.send("pub", r#"J EVNT {"channel":"jobs"}"#);
        }
        h.join("idle", "s");
        h.listen("idle", "jobs", "any");
        let r: Vec<String> = (0..3)
            .map(|_| h.send("pub", r#"J EVNT {"channel":"jobs"}"#)[0].0.clone())
            .collect();
        assert_eq!(r, ["idle", "idle", "idle"]);
    }

    #[test]
    fn a_full_cell_gets_no_more_work_and_waiting_work_goes_to_the_next_free_slot() {
        let mut h = Harness::new();
        h.join("stuck", "s");
        h.send(
            "stuck",
            r#"J LSTN {"pattern":"jobs","mode":"any","concurrency":1}"#,
        );
        h.join("busy", "s");
        h.send(
            "busy",
            r#"J LSTN {"pattern":"jobs","mode":"any","concurrency":2}"#,
        );
        h.join("pub", "p");
        let mut to: Vec<String> = Vec::new();
        for i in 0..6 {
            let r = h.send(
                "pub",
                &format!(r#"J EVNT {{"channel":"jobs","payload":{i}}}"#),
            );
            to.extend(
                r.into_iter()
                    .map(|(p, f)| format!("{p} {}", delivery_id(&f))),
            );
        }
        assert_eq!(to.len(), 3, "three slots, three sent, three wait: {to:?}");
        let busy: Vec<&String> = to.iter().filter(|t| t.starts_with("busy ")).collect();
        assert_eq!(busy.len(), 2);
        for b in busy {
            let id = b.trim_start_matches("busy ");
            let r = h.send("busy", &format!(r#"J ACKN {{"id":"{id}"}}"#));
            assert_eq!(r.len(), 1, "a freed slot takes the next waiting event");
            assert_eq!(r[0].0, "busy", "never the stuck cell");
        }
    }

    fn rpc_setup(h: &mut Harness) {
        h.join("srv", "calc");
        let r = h.send(
            "srv",
            r#"J LSTN {"pattern":"calc::add","mode":"any","concurrency":5}"#,
        );
        assert_eq!(r.len(), 1);
        h.join("cli", "app");
    }

    #[test]
    fn a_request_reaches_one_responder_and_its_reply_or_error_comes_back() {
        let mut h = Harness::new();
        rpc_setup(&mut h);
        let r = h.send(
            "cli",
            r#"J RQST {"channel":"calc::add","payload":[1,2],"ref":"r1"}"#,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "srv");
        assert!(r[0].1.starts_with("J RQST {"), "{}", r[0].1);
        let id = delivery_id(&r[0].1.replacen("J RQST", "J DLVR", 1));
        let r = h.send("srv", &format!(r#"J RPLY {{"id":"{id}","payload":3}}"#));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "cli");
        assert_eq!(
            r[0].1,
            format!(r#"J RPLY {{"id":"{id}","ref":"r1","payload":3}}"#)
        );
        assert_eq!(h.router.in_flight_count(), 0);
        let r = h.send("cli", r#"J RQST {"channel":"calc::add","payload":"x"}"#);
        let id = delivery_id(&r[0].1.replacen("J RQST", "J DLVR", 1));
        let r = h.send(
            "srv",
            &format!(r#"J RPLY {{"id":"{id}","error":"not a number"}}"#),
        );
        assert!(r[0].1.contains(r#""error":"not a number""#), "{}", r[0].1);
        assert_eq!(
            code(&h.send("srv", &format!(r#"J RPLY {{"id":"{id}"}}"#))),
            "unknown_delivery"
        );
    }

    #[test]
    fn requests_without_responders_fail_at_once_and_unanswered_ones_time_out() {
        let mut h = Harness::new();
        rpc_setup(&mut h);
        let r = h.send("cli", r#"J RQST {"channel":"calc::mul","ref":7}"#);
        assert_eq!(code(&r), "no_responders");
        assert!(r[0].1.contains(r#""re":7"#));
        let r = h.send("cli", r#"J RQST {"channel":"calc::add","service":"other"}"#);
        assert_eq!(code(&r), "no_responders");
        h.send(
            "cli",
            r#"J RQST {"channel":"calc::add","timeout_ms":200,"ref":8}"#,
        );
        assert!(h.tick(Duration::from_millis(100)).is_empty());
        let r = h.tick(Duration::from_millis(150));
        assert_eq!(code(&r), "timed_out");
        assert!(r[0].1.contains(r#""re":8"#));
        assert_eq!(h.router.in_flight_count(), 0);
    }

    #[test]
    fn a_request_that_timed_out_while_queued_is_never_delivered() {
        let mut h = Harness::new();
        h.join("srv", "calc");
        h.send(
            "srv",
            r#"J LSTN {"pattern":"calc::add","mode":"any","concurrency":1}"#,
        );
        h.join("cli", "app");
        let r = h.send("cli", r#"J RQST {"channel":"calc::add","ref":"a"}"#);
        let first = delivery_id(&r[0].1.replacen("J RQST", "J DLVR", 1));
        let r = h.send(
            "cli",
            r#"J RQST {"channel":"calc::add","timeout_ms":100,"ref":"b"}"#,
        );
        assert!(r.is_empty(), "the second request waits: {r:?}");
        let r = h.tick(Duration::from_millis(150));
        assert_eq!(code(&r), "timed_out");
        let r = h.send("srv", &format!(r#"J RPLY {{"id":"{first}","payload":1}}"#));
        assert_eq!(r.len(), 1, "only the reply to a, no stale request b: {r:?}");
        assert_eq!(r[0].0, "cli");
    }

    #[test]
    fn huge_concurrencies_are_capped_and_never_overflow() {
        let mut h = Harness::new();
        h.join("c", "s");
        for p in ["a", "b"] {
            let lstn =
                format!(r#"J LSTN {{"pattern":"{p}","mode":"any","concurrency":4294967295}}"#);
            assert_eq!(h.send("c", &lstn).len(), 1);
        }
        h.join("pub", "p");
        assert_eq!(h.send("pub", r#"J EVNT {"channel":"a"}"#).len(), 1);
    }

    #[test]
    fn a_settled_queued_request_frees_no_slot_it_never_held() {
        let mut h = Harness::new();
        h.join("srv", "calc");
        h.send(
            "srv",
            r#"J LSTN {"pattern":"calc::add","mode":"any","concurrency":1}"#,
        );
        h.join("cli", "app");
        let r = h.send("cli", r#"J RQST {"channel":"calc::add","ref":"a"}"#);
        assert_eq!(r.len(), 1);
        h.send(
            "cli",
            r#"J RQST {"channel":"calc::add","timeout_ms":100,"ref":"b"}"#,
        );
        assert_eq!(code(&h.tick(Duration::from_millis(150))), "timed_out");
        let r = h.send("cli", r#"J RQST {"channel":"calc::add","ref":"c"}"#);
        assert!(
            r.is_empty(),
            "the first request still holds the only slot: {r:?}"
        );
    }

    #[test]
    fn requests_are_answered_by_rply_not_acked_and_wait_past_the_ack_deadline() {
        let mut h = Harness::new();
        rpc_setup(&mut h);
        let r = h.send(
            "cli",
            r#"J RQST {"channel":"calc::add","timeout_ms":60000}"#,
        );
        let id = delivery_id(&r[0].1.replacen("J RQST", "J DLVR", 1));
        assert_eq!(
            code(&h.send("srv", &format!(r#"J ACKN {{"id":"{id}"}}"#))),
            "unknown_delivery"
        );
        h.now += Duration::from_secs(6);
        h.send("srv", "J PING");
        h.send("cli", "J PING");
        assert!(
            h.tick(Duration::ZERO).is_empty(),
            "no redelivery at the ack deadline"
        );
        let r = h.send(
            "srv",
            &format!(
                r#"J RPLY {{"id":"{id}","payload":1,"cell":"{}"}}"#,
                Thid::random()
            ),
        );
        assert_eq!(r[0].0, "cli");
        h.join("pub", "p");
        h.listen("srv", "jobs", "any");
        let r = h.send("pub", r#"J EVNT {"channel":"jobs"}"#);
        let ev = delivery_id(&r[0].1);
        assert_eq!(
            code(&h.send("srv", &format!(r#"J RPLY {{"id":"{ev}"}}"#))),
            "unknown_delivery"
        );
    }

    #[test]
    fn a_request_to_a_responder_that_dies_goes_to_another() {
        let mut h = Harness::new();
        rpc_setup(&mut h);
        h.join("srv2", "calc");
        h.listen("srv2", "calc::add", "any");
        let r = h.send("cli", r#"J RQST {"channel":"calc::add","ref":1}"#);
        let first = r[0].0.clone();
        let r = h.send(&first, "J GBYE");
        assert_eq!(r.len(), 1, "{r:?}");
        assert_ne!(r[0].0, first);
        assert!(r[0].1.starts_with("J RQST ") && r[0].1.contains(r#""attempt":2"#));
    }

    #[test]
    fn requests_cross_the_mesh_and_replies_come_back_through_the_origin() {
        let mut h = Harness::new();
        let (node, cell) = (Thid::random(), Thid::random());
        let mut rec = remote_node(node, cell, "calc", "any");
        rec.cells[0].listens[0].pattern = "calc::*".into();
        h.router.set_view(vec![rec], h.now, &mut h.out);
        h.drain();
        h.join("cli", "app");
        let r = h.send(
            "cli",
            r#"J RQST {"channel":"calc::add","payload":1,"ref":"x"}"#,
        );
        assert_eq!(r[0].0, format!("node:{node}"));
        assert!(r[0].1.contains(r#""request":true"#), "{}", r[0].1);
        let id = delivery_id(&r[0].1.replacen("J MDLV", "J DLVR", 1));
        let mrpl = format!(r#"J MRPL {{"id":"{id}","payload":2,"cell":"{cell}"}}"#);
        let r = h.send("node-peer", &mrpl);
        assert_eq!(r[0].0, "cli");
        assert_eq!(
            r[0].1,
            format!(r#"J RPLY {{"id":"{id}","ref":"x","payload":2}}"#)
        );
    }

    #[test]
    fn forwarded_requests_are_answered_back_to_the_origin() {
        let mut h = Harness::new();
        let cell = h.join("srv", "calc");
        let (origin, req) = (Thid::random(), Thid::random());
        let mdlv = format!(
            r#"J MDLV {{"id":"{req}","channel":"calc::add","from":"{origin}","attempt":1,"cell":"{cell}","origin":"{origin}","ack":true,"request":true}}"#
        );
        let r = h.send("node-peer", &mdlv);
        assert!(r[0].1.starts_with("J RQST "), "{}", r[0].1);
        let r = h.send("srv", &format!(r#"J RPLY {{"id":"{req}","payload":5}}"#));
        assert_eq!(r[0].0, format!("node:{origin}"));
        assert!(r[0].1.starts_with("J MRPL ") && r[0].1.contains(&format!(r#""cell":"{cell}""#)));
    }

    #[test]
    fn bad_input_gets_stable_codes() {
        let mut h = Harness::new();
        assert_eq!(
            code(&h.send("x", r#"J LSTN {"pattern":"a","mode":"any","ref":7}"#)),
            "not_welcomed"
        );
        assert_eq!(code(&h.send("x", "nonsense")), "bad_frame");
        assert_eq!(code(&h.send("x", "Q HELO {}")), "bad_encoding");
        assert_eq!(code(&h.send("x", "J HELO {")), "bad_json");
        assert_eq!(code(&h.send("x", "J WXYZ {}")), "unknown_verb");
        let id = h.join("x", "s");
        assert_eq!(
            code(&h.send("y", &format!(r#"J HELO {{"id":"{id}","service":"s"}}"#))),
            "thid_in_use"
        );
        assert_eq!(
            code(&h.send("x", r#"J LSTN {"pattern":"a b","mode":"any"}"#)),
            "bad_pattern"
        );
        assert_eq!(
            code(&h.send("x", r#"J UNLS {"pattern":"zz"}"#)),
            "not_listening"
        );
        assert_eq!(
            code(&h.send("x", r#"J EVNT {"channel":"a","confirm":true}"#)),
            "no_listeners"
        );
        assert_eq!(
            code(&h.send("x", r#"J HELO {"id":"00","service":"s"}"#)),
            "bad_json"
        );
        let r = h.send("x", r#"J EVNT {"channel":"a*","ref":"r1"}"#);
        assert!(r[0].1.contains(r#""re":"r1""#), "{r:?}");
        assert_eq!(h.router.metrics().errors_total(), 11);
    }
}
