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
    self, Ack, Confirm, ErrorReply, Goodbye, Hello, Limits, Listen, Publish, Ref, Unlisten, Welcome,
};
use thynapse_protocol::limits::{HEARTBEAT_MISSES, MAX_LISTENS_PER_CELL, MAX_SERVICE_LEN};
use thynapse_protocol::{frame, pattern, ErrorCode, Mode, Pattern, Thid, Verb};

use crate::config::{Config, MAX_BACKLOG_PER_SERVICE};
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

/// The anycatch targets of one service for one channel.
#[derive(Debug)]
struct ServiceRoute {
    service: Arc<str>,
    /// Candidate cells with whether they ack.
    cells: Vec<(Thid, bool)>,
}

/// Where a channel's events go, computed from the listens and cached
/// until the listens change.
#[derive(Debug, Default)]
struct Route {
    any: Vec<ServiceRoute>,
    multi: bool,
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
    /// binary frame. Every failure becomes an ERRR to the sender.
    pub fn handle(&mut self, peer: &[u8], parts: &[&[u8]], now: Instant, out: &mut Vec<Output>) {
        Metrics::incr(&self.metrics.commands);
        if let Err(f) = self.dispatch(peer, parts, now, out) {
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
        if let Some(existing) = self.cells.get_mut(&h.id) {
            if existing.peer != peer {
                return Err(Failure::new(
                    ErrorCode::ThidInUse,
                    format!("cell {} is connected on another connection", h.id),
                    re,
                ));
            }
            existing.service = Arc::from(h.service.as_str());
            existing.metadata = h.metadata;
            self.routes.clear();
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
        self.routes.clear();
        out.push(to_peer(peer, ok(l.reference)));
        if l.mode == Mode::Any {
            self.drain_backlog(&service, now, out);
        }
        Ok(())
    }

    fn unlisten(&mut self, peer: &[u8], id: &Thid, body: &[u8], out: &mut Vec<Output>) -> Handled {
        let u: Unlisten = parse(body)?;
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
        self.routes.clear();
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
        if route.multi {
            self.scratch.clear();
            body::write_delivery(&mut self.scratch, &id, &p.channel, payload, from, None);
            out.push(Output::Publish {
                frame: frame::encode_event(&p.channel, &self.scratch),
                binary: binary.map(|b| Arc::new(b.to_vec())),
            });
            Metrics::incr(&self.metrics.multicast);
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
                let (cell, ack) = sr.cells[*cursor % sr.cells.len()];
                *cursor = cursor.wrapping_add(1);
                self.deliver(&event, &sr.service, &cell, ack, 1, now, out);
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

    /// Sends one anycatch delivery and, when it must be acked, remembers it.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        event: &Arc<EventData>,
        service: &Arc<str>,
        cell: &Thid,
        ack: bool,
        attempt: u32,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        let Some(c) = self.cells.get(cell) else {
            return;
        };
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
        out.push(Output::ToPeer {
            peer: c.peer.clone(),
            frame: self.scratch.clone(),
            binary: event.binary.clone(),
        });
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
        for id in a.id.iter().chain(a.ids.iter()) {
            match self.in_flight.remove(&(*id, *cell)) {
                Some(f) if positive => {
                    Metrics::incr(&self.metrics.acks);
                    drop(f);
                }
                Some(f) => {
                    Metrics::incr(&self.metrics.nacks);
                    self.redeliver(f, Some(cell), now, out);
                }
                None => unknown = unknown.or(Some(*id)),
            }
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
                let others: Vec<_> = sr.cells.iter().filter(|(c, _)| Some(c) != failed).collect();
                let pool = if others.is_empty() {
                    sr.cells.iter().collect()
                } else {
                    others
                };
                let cursor = self.cursors.entry(sr.service.clone()).or_insert(0);
                *cursor = cursor.wrapping_add(1);
                pool.get(*cursor % pool.len().max(1)).map(|(c, a)| (*c, *a))
            });
        match target {
            Some((cell, ack)) => {
                self.deliver(&f.event, &f.service, &cell, ack, f.attempt + 1, now, out)
            }
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

    /// The cached route of `channel`, computed on first use.
    fn route(&mut self, channel: &str) -> Arc<Route> {
        if let Some(r) = self.routes.get(channel) {
            return r.clone();
        }
        let mut route = Route::default();
        for (id, cell) in &self.cells {
            let mut matched_any = None;
            for l in cell.listens.iter().filter(|l| l.pattern.matches(channel)) {
                match l.mode {
                    Mode::Multi => route.multi = true,
                    Mode::Any => matched_any = matched_any.or(Some(l.ack)),
                }
            }
            if let Some(ack) = matched_any {
                match route.any.iter_mut().find(|sr| sr.service == cell.service) {
                    Some(sr) => sr.cells.push((*id, ack)),
                    None => route.any.push(ServiceRoute {
                        service: cell.service.clone(),
                        cells: vec![(*id, ack)],
                    }),
                }
            }
        }
        // Stable order so round robin is fair whatever the map's order.
        for sr in &mut route.any {
            sr.cells.sort_unstable_by_key(|(id, _)| *id);
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
        self.routes.clear();
        let orphans: Vec<(Thid, Thid)> = self
            .in_flight
            .keys()
            .filter(|(_, c)| c == id)
            .copied()
            .collect();
        for key in orphans {
            if let Some(f) = self.in_flight.remove(&key) {
                self.redeliver(f, Some(id), now, out);
            }
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
