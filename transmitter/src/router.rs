//! The routing state machine: cells, listens, deliveries and acks.
//!
//! [`Router`] owns all routing state and does no I/O: the router thread
//! (see [`crate::server`]) feeds it commands and clock ticks and sends the
//! [`Output`]s it produces. That keeps it testable without sockets.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thynapse_protocol::body::{
    self, Ack, Confirm, ErrorReply, Goodbye, Hello, Limits, Listen, MeshAck, MeshDelivery, Publish,
    Ref, Unlisten, Welcome,
};
use thynapse_protocol::limits::{HEARTBEAT_MISSES, MAX_LISTENS_PER_CELL, MAX_SERVICE_LEN};
use thynapse_protocol::{frame, pattern, ErrorCode, Mode, Pattern, Thid, Verb};

use crate::config::{Config, MAX_BACKLOG_PER_SERVICE};
use crate::mesh::{CellRecord, ListenRecord, NodeRecord};
use crate::metrics::Metrics;

/// A ZeroMQ routing id: which connection a command came from.
pub type PeerId = Vec<u8>;

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
        binary: Option<Arc<Vec<u8>>>,
    },
    /// A message to another transmitter of the mesh.
    ToNode {
        /// The transmitter's THID.
        node: Thid,
        /// The command frame (`MDLV`, `MACK`, `MEVT`).
        frame: Vec<u8>,
        /// The optional binary payload frame.
        binary: Option<Arc<Vec<u8>>>,
    },
    /// A message on the event socket (multicatch).
    Publish {
        /// The `EVNT <channel> {json}` frame.
        frame: Vec<u8>,
        /// The optional binary payload frame.
        binary: Option<Arc<Vec<u8>>>,
    },
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
}

/// One listened pattern of a cell.
#[derive(Debug)]
struct ListenEntry {
    pattern: Pattern,
    mode: Mode,
    ack: bool,
}

/// A welcomed cell: a record, not a task.
#[derive(Debug)]
struct Cell {
    /// Its connection, to address replies and deliveries.
    peer: PeerId,
    /// Its service; anycatch picks one cell per service.
    service: Arc<str>,
    /// Its metadata as given at HELO (queried by later features).
    #[allow(dead_code)]
    metadata: Map<String, Value>,
    /// What it listens to.
    listens: Vec<ListenEntry>,
    /// Last time anything arrived from it (heartbeat expiry).
    last_seen: Instant,
    /// Sequence counter for its events that carry no `seq`.
    seq: u64,
}

/// An event kept while some delivery of it awaits an ack.
#[derive(Debug)]
struct EventData {
    id: Thid,
    channel: String,
    payload: Option<Vec<u8>>,
    binary: Option<Arc<Vec<u8>>>,
    from: Thid,
}

/// A delivery awaiting ACKN, keyed by (event, cell).
#[derive(Debug)]
struct InFlight {
    event: Arc<EventData>,
    service: Arc<str>,
    attempt: u32,
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
}

/// Where a channel's events go, computed from the listens and cached
/// until the listens change.
#[derive(Debug, Default)]
struct Route {
    any: Vec<ServiceRoute>,
    /// Whether a local cell listens in multicatch mode.
    multi: bool,
    /// Other transmitters with a multicatch listener.
    multi_nodes: Vec<Thid>,
}

/// A cell of another transmitter, as the mesh view describes it.
#[derive(Debug)]
struct RemoteCell {
    service: Arc<str>,
    listens: Vec<ListenEntry>,
}

/// Another transmitter of the mesh and its cells.
#[derive(Debug)]
struct RemoteNode {
    /// Its command endpoint, where mesh messages go.
    command: String,
    cells: HashMap<Thid, RemoteCell>,
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
    cursors: HashMap<Arc<str>, usize>,
    /// Deliveries awaiting an ack, by (event, cell).
    in_flight: HashMap<(Thid, Thid), InFlight>,
    /// Ack deadlines in the order they were set (the timeout is constant,
    /// so this is also deadline order); stale entries are skipped.
    deadlines: VecDeque<(Instant, Thid, Thid, u32)>,
    /// Redeliveries waiting for a cell of their service to listen again.
    backlog: HashMap<Arc<str>, VecDeque<(Arc<EventData>, u32)>>,
    /// The other transmitters of the mesh and their cells.
    remote: HashMap<Thid, RemoteNode>,
    /// Deliveries other transmitters forwarded to our cells, by (event,
    /// cell), with the origin that awaits the ack.
    proxied: HashMap<(Thid, Thid), Thid>,
    /// Whether the local cells changed since the mesh last heard of them.
    view_dirty: bool,
    /// Counters shared with the rest of the process.
    metrics: Arc<Metrics>,
    /// Set once shutdown began: new cells are refused.
    stopping: bool,
    /// Scratch buffer for frames, reused.
    scratch: Vec<u8>,
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
            metrics,
            stopping: false,
            scratch: Vec::with_capacity(256),
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
        if let Err(f) = self.dispatch(peer, parts, mesh_ok, now, out) {
            self.metrics.error(f.code);
            let reply = ErrorReply {
                code: f.code,
                message: f.message,
                re: f.re,
            };
            out.push(to_peer(peer, frame::encode_json(Verb::ERRR, &reply)));
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
        let (command, binary) = match parts {
            [c] => (*c, None),
            [c, b] => (*c, Some(*b)),
            _ => {
                return Err(Failure::new(
                    ErrorCode::BadMultipart,
                    format!(
                        "a message is a command frame and at most one binary frame, got {} frames",
                        parts.len()
                    ),
                    None,
                ))
            }
        };
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
        let cell = self.peers.get(peer).copied();
        if let Some(id) = cell {
            if let Some(c) = self.cells.get_mut(&id) {
                c.last_seen = now;
            }
        }
        match (f.verb, cell) {
            (Verb::PING, _) => {
                let r: Ref = parse(f.body)?;
                out.push(to_peer(peer, frame::encode_json(Verb::PONG, &r)));
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
            (Verb::MDLV, None) if mesh_ok => self.mesh_deliver(f.body, binary, out),
            (Verb::MACK, None) if mesh_ok => self.mesh_ack(f.body, now, out),
            (Verb::MEVT, None) if mesh_ok => self.mesh_event(f.body, binary, out),
            (verb, _) if !is_cell_verb(verb) => Err(Failure::new(
                ErrorCode::UnknownVerb,
                format!(
                    "unknown verb {verb}; cells send HELO LSTN UNLS EVNT ACKN NACK PING PONG GBYE"
                ),
                reference(f.body),
            )),
            (_, None) => Err(Failure::new(
                ErrorCode::NotWelcomed,
                "say HELO first",
                reference(f.body),
            )),
            (Verb::LSTN, Some(id)) => self.listen(peer, &id, f.body, now, out),
            (Verb::UNLS, Some(id)) => self.unlisten(peer, &id, f.body, out),
            (Verb::EVNT, Some(id)) => self.publish(peer, &id, f.body, binary, now, out),
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
            .is_some_and(|c| c.peer != peer && now.duration_since(c.last_seen) > self.heartbeat);
        if stale {
            self.remove_cell(&h.id, DisconnectReason::Replaced, now, out);
        }
        if let Some(existing) = self.cells.get_mut(&h.id) {
            if existing.peer != peer {
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
            existing.metadata = h.metadata;
            self.invalidate();
        } else {
            self.cells.insert(
                h.id,
                Cell {
                    peer: peer.to_vec(),
                    service: Arc::from(h.service.as_str()),
                    metadata: h.metadata,
                    listens: Vec::new(),
                    last_seen: now,
                    seq: 0,
                },
            );
            self.peers.insert(peer.to_vec(), h.id);
            self.metrics.cells.store(
                self.cells.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let welcome = Welcome {
            id: self.id,
            event_endpoint: self.event_endpoint.clone(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            limits: Limits {
                max_frame: self.max_frame,
                ack_timeout_ms: self.ack_timeout.as_millis() as u64,
            },
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
        Pattern::parse(&u.pattern)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e.to_string(), u.reference.clone()))?;
        let cell = self.cells.get_mut(id).expect("welcomed peers have a cell");
        let before = cell.listens.len();
        cell.listens.retain(|e| e.pattern.as_str() != u.pattern);
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
        let re = p
            .reference
            .clone()
            .or_else(|| Some(Value::String(id.to_hex())));
        pattern::validate_channel(&p.channel)
            .map_err(|e| Failure::new(ErrorCode::BadPattern, e.to_string(), re.clone()))?;
        let route = self.route(&p.channel);
        let mut routed = 0u32;
        if route.multi || !route.multi_nodes.is_empty() {
            self.scratch.clear();
            body::write_delivery(&mut self.scratch, &id, &p.channel, payload, from, None);
            let binary = binary.map(|b| Arc::new(b.to_vec()));
            if route.multi {
                out.push(Output::Publish {
                    frame: frame::encode_event(&p.channel, &self.scratch),
                    binary: binary.clone(),
                });
                Metrics::incr(&self.metrics.multicast);
            }
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
                channel: p.channel.into_owned(),
                payload: payload.map(<[u8]>::to_vec),
                binary: binary.map(|b| Arc::new(b.to_vec())),
                from: *from,
            });
            for sr in &route.any {
                let cursor = self.cursors.entry(sr.service.clone()).or_insert(0);
                let target = sr.cells[*cursor % sr.cells.len()];
                *cursor = cursor.wrapping_add(1);
                self.deliver(&event, &sr.service, target, 1, now, out);
                routed += 1;
            }
        }
        if routed == 0 {
            Metrics::incr(&self.metrics.dropped_no_listeners);
            if p.confirm {
                return Err(Failure::new(
                    ErrorCode::NoListeners,
                    "no cell listens to this channel",
                    re,
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
    fn deliver(
        &mut self,
        event: &Arc<EventData>,
        service: &Arc<str>,
        target: Target,
        attempt: u32,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        let Target { cell, ack, node } = target;
        self.scratch.clear();
        self.scratch.extend_from_slice(b"J DLVR ");
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
                let Some(c) = self.cells.get(&cell) else {
                    return;
                };
                out.push(Output::ToPeer {
                    peer: c.peer.clone(),
                    frame: self.scratch.clone(),
                    binary: event.binary.clone(),
                });
            }
            Some(node) => {
                // MDLV is the DLVR body plus who gets it and who awaits the ack.
                self.scratch[2..6].copy_from_slice(Verb::MDLV.as_bytes());
                self.scratch.pop();
                let tail = format!(r#","cell":"{cell}","origin":"{}","ack":{ack}}}"#, self.id);
                self.scratch.extend_from_slice(tail.as_bytes());
                out.push(Output::ToNode {
                    node,
                    frame: self.scratch.clone(),
                    binary: event.binary.clone(),
                });
                Metrics::incr(&self.metrics.mesh_out);
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
                },
            );
            self.deadlines
                .push_back((now + self.ack_timeout, event.id, *cell, attempt));
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
            match self.in_flight.remove(&(*id, *cell)) {
                Some(f) => self.settle(f, cell, positive, now, out),
                None => match self.proxied.remove(&(*id, *cell)) {
                    Some(origin) => forward.entry(origin).or_default().push(*id),
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

    /// `MDLV`: another transmitter chose one of our cells for an event.
    fn mesh_deliver(
        &mut self,
        body: &[u8],
        binary: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        let d: MeshDelivery = parse(body)?;
        let Some(cell) = self.cells.get(&d.cell) else {
            // The cell left before the origin heard of it: hand it back.
            out.push(mesh_ack(d.origin, vec![d.id], d.cell, false));
            return Ok(());
        };
        out.push(Output::ToPeer {
            peer: cell.peer.clone(),
            frame: frame::encode(Verb::DLVR, body),
            binary: binary.map(|b| Arc::new(b.to_vec())),
        });
        Metrics::incr(&self.metrics.deliveries);
        if d.ack {
            self.proxied.insert((d.id, d.cell), d.origin);
        }
        Ok(())
    }

    /// `MACK`: a cell of another transmitter answered a delivery we sent.
    fn mesh_ack(&mut self, body: &[u8], now: Instant, out: &mut Vec<Output>) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        let a: MeshAck = parse(body)?;
        for id in &a.ids {
            if let Some(f) = self.in_flight.remove(&(*id, a.cell)) {
                self.settle(f, &a.cell, a.ok, now, out);
            }
        }
        Ok(())
    }

    /// `MEVT`: a multicatch event published at another transmitter for our
    /// cells; it goes out on our event socket and nowhere else.
    fn mesh_event(&mut self, body: &[u8], binary: Option<&[u8]>, out: &mut Vec<Output>) -> Handled {
        Metrics::incr(&self.metrics.mesh_in);
        #[derive(serde::Deserialize)]
        struct Channel<'a> {
            #[serde(borrow)]
            channel: std::borrow::Cow<'a, str>,
        }
        let c: Channel<'_> = parse(body)?;
        out.push(Output::Publish {
            frame: frame::encode_event(&c.channel, body),
            binary: binary.map(|b| Arc::new(b.to_vec())),
        });
        Metrics::incr(&self.metrics.multicast);
        Ok(())
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
                    let listens = c
                        .listens
                        .into_iter()
                        .filter_map(|l| {
                            Some(ListenEntry {
                                pattern: Pattern::parse(&l.pattern).ok()?,
                                mode: l.mode,
                                ack: l.ack,
                            })
                        })
                        .collect();
                    let service = Arc::from(c.service.as_str());
                    (c.id, RemoteCell { service, listens })
                })
                .collect();
            remote.insert(
                n.id,
                RemoteNode {
                    command: n.command,
                    cells,
                },
            );
        }
        let old = std::mem::replace(&mut self.remote, remote);
        self.routes.clear();
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
            if let Some(f) = self.in_flight.remove(&key) {
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
        let route = self.route(&f.event.channel);
        let target = route
            .any
            .iter()
            .find(|sr| sr.service == f.service)
            .and_then(|sr| {
                let others: Vec<_> = sr
                    .cells
                    .iter()
                    .filter(|t| Some(&t.cell) != failed)
                    .collect();
                let pool = if others.is_empty() {
                    sr.cells.iter().collect()
                } else {
                    others
                };
                let cursor = self.cursors.entry(sr.service.clone()).or_insert(0);
                *cursor = cursor.wrapping_add(1);
                pool.get(*cursor % pool.len().max(1)).map(|t| **t)
            });
        match target {
            Some(t) => self.deliver(&f.event, &f.service, t, f.attempt + 1, now, out),
            None => {
                let queue = self.backlog.entry(f.service.clone()).or_default();
                if queue.len() >= MAX_BACKLOG_PER_SERVICE {
                    Metrics::incr(&self.metrics.dropped_backlog_full);
                } else {
                    queue.push_back((f.event, f.attempt));
                }
            }
        }
    }

    /// Delivers parked redeliveries of `service` that a cell now listens to.
    fn drain_backlog(&mut self, service: &Arc<str>, now: Instant, out: &mut Vec<Output>) {
        let Some(queue) = self.backlog.remove(service) else {
            return;
        };
        for (event, attempt) in queue {
            let f = InFlight {
                event,
                service: service.clone(),
                attempt,
            };
            self.redeliver(f, None, now, out);
        }
    }

    /// Forgets cached routes and notes that the mesh must hear of the change.
    fn invalidate(&mut self) {
        self.routes.clear();
        self.view_dirty = true;
    }

    /// The cached route of `channel`, computed on first use.
    fn route(&mut self, channel: &str) -> Arc<Route> {
        if let Some(r) = self.routes.get(channel) {
            return r.clone();
        }
        let mut route = Route::default();
        let local = self
            .cells
            .iter()
            .map(|(id, c)| (id, &c.service, &c.listens, None));
        let remote = self.remote.iter().flat_map(|(node, n)| {
            n.cells
                .iter()
                .filter(|(id, _)| !self.cells.contains_key(id))
                .map(move |(id, c)| (id, &c.service, &c.listens, Some(*node)))
        });
        for (id, service, listens, node) in local.chain(remote) {
            let mut matched_any = None;
            for l in listens.iter().filter(|l| l.pattern.matches(channel)) {
                match (l.mode, node) {
                    (Mode::Multi, None) => route.multi = true,
                    (Mode::Multi, Some(n)) if !route.multi_nodes.contains(&n) => {
                        route.multi_nodes.push(n)
                    }
                    (Mode::Multi, Some(_)) => {}
                    (Mode::Any, _) => matched_any = matched_any.or(Some(l.ack)),
                }
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
                    }),
                }
            }
        }
        // Stable order so round robin is fair whatever the maps' order.
        for sr in &mut route.any {
            sr.cells.sort_unstable_by_key(|t| t.cell);
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
                if let Some(f) = self.in_flight.remove(&(event, cell)) {
                    self.redeliver(f, Some(&cell), now, out);
                }
            }
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
        let Some(cell) = self.cells.remove(id) else {
            return;
        };
        tracing::debug!(cell = %id, service = %cell.service, ?reason, "cell left");
        self.peers.remove(&cell.peer);
        self.metrics.cells.store(
            self.cells.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
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
        peer: peer.to_vec(),
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
            self.out
                .drain(..)
                .map(|o| match o {
                    Output::ToPeer { peer, frame, .. } => (
                        String::from_utf8(peer).unwrap(),
                        String::from_utf8(frame).unwrap(),
                    ),
                    Output::Publish { frame, .. } => {
                        ("PUB".into(), String::from_utf8(frame).unwrap())
                    }
                    Output::ToNode { node, frame, .. } => {
                        (format!("node:{node}"), String::from_utf8(frame).unwrap())
                    }
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
    fn multicatch_publishes_once_on_the_event_socket() {
        let mut h = Harness::new();
        h.join("m1", "m");
        h.listen("m1", "news::*", "multi");
        h.join("m2", "m");
        h.listen("m2", "news::sport", "multi");
        h.join("pub", "p");
        let r = h.send(
            "pub",
            r#"J EVNT {"channel":"news::sport","payload":"goal"}"#,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "PUB");
        assert!(
            r[0].1.starts_with(r#"EVNT news::sport {"id":""#),
            "{}",
            r[0].1
        );
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
        let r = h.send("node-peer", &r[0].1.clone());
        assert_eq!(r[0].0, "PUB");
        assert!(r[0].1.starts_with("EVNT jobs::1 {"));
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
