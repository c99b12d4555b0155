//! The connection task: sole owner of the DEALER (command socket, our own
//! ZMTP over a `mio` socket, see `dealer`) and, once the first membership
//! stream asks for it, a libzmq SUB (event socket). The DEALER's TCP socket
//! and the SUB's `ZMQ_FD` are registered in the runtime's reactor, and the
//! task awaits their readiness beside the doorbell of the async side (a
//! `Notify`, see `Conn::poll`); the wait's deadline is its clock
//! (heartbeats, ack batches, reconnects).
//!
//! It is a task on the runtime `Client::connect` runs on, not a thread of
//! its own: the handoffs between the application's tasks and the
//! connection (a request and its reply, a delivery and its handler, the
//! handler's reply) are then task wake-ups on the runtime's workers, not
//! context switches between threads. What blocks stays off the workers:
//! opening the sockets and the HELO/WLCM handshake run on the runtime's
//! blocking pool, and so does `Conn::finish` (it waits for the last PONG).
//!
//! Everything a cell listens to arrives on the DEALER: anycatch `DLVR`s,
//! `RQST`s, and multicatch events, each cell's own `J EVNT` copy
//! (PROTOCOL.md §6). The cell says `"batch":true` and `"packed":true` in
//! `HELO`, so a `DLVR` or `EVNT` may also come as a batch (§23): a JSON
//! array of bodies and one binary frame per element or none, or one
//! binary frame that the elements' `bin` lengths cut, each element
//! handled exactly as the same delivery sent alone. The event socket carries only
//! membership events and the `SYNC` markers that prove a membership
//! subscription in place (§18), so a cell that never follows membership
//! never opens a SUB.
//!
//! Publishes without answer that the task drains from the command
//! queue in one pass go out as one `J EVNT [...]` batch (§23) when the
//! `WLCM` said `"batch":true` (the `EventBatcher` of `batch` cuts them,
//! and packs their binary frames into one when the `WLCM` said
//! `"packed":true`):
//! the batch leaves at the end of the pass, or before any other command,
//! so nothing is reordered. A confirmed publish travels alone: a batch
//! refused as a whole (`not_welcomed` after an expiry) is answered
//! without the elements' `ref`s, and the SDK re-sends a refused confirmed
//! publish by its `ref`.
//!
//! libzmq sockets are not thread-safe: nothing outside this module touches
//! the SUB, and one owner at a time uses the sockets (the blocking pool's
//! thread, then the task, then the blocking pool again), each handover
//! through the runtime, which orders memory as libzmq requires for moving a
//! socket.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thynapse_protocol::body::Welcome;
use thynapse_protocol::{Mode, Pattern, Thid, Verb};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, trace, warn};

use crate::batch::{AckBatcher, EventBatcher, Publish, SeenSet};
use crate::consts::{
    ACK_BATCH_MAX_DELAY, ACK_BATCH_MAX_IDS, CLOSE_TIMEOUT, DEDUP_CAPACITY, EVENT_BATCH_MAX_BYTES,
    EVENT_BATCH_MAX_EVENTS, PLAIN_USERNAME, READ_BURST, SOCKET_HWM, SOCKET_LINGER_MS,
};
use crate::context::ContextLease;
use crate::dealer::{Dealer, Happened};
use crate::error::{Error, ErrorKind};
use crate::event::{AckGuard, Delivered, Event};
use crate::link::{Answer, Command, Control, Link, LinkReceiver, Sink};
use crate::membership::MembershipEvent;
use crate::options::{ListenOptions, Options};
use crate::serve::{Request, RequestGuard};
use crate::wire::{self, Incoming, Published};

/// What the connection needs to start.
pub(crate) struct Start {
    /// The command endpoint.
    pub(crate) endpoint: String,
    /// This cell's THID.
    pub(crate) id: Thid,
    /// The client's options.
    pub(crate) options: Options,
    /// The link's sending half, for the ack guards of deliveries.
    pub(crate) link: Arc<Link>,
    /// The link's receiving half.
    pub(crate) rx: LinkReceiver,
}

/// Starts the connection; the receiver gets the `WLCM` or the reason there was
/// none.
///
/// # Errors
/// [`ErrorKind::Io`] when there is no tokio runtime to run it on.
///
/// # Panics
/// When the runtime has no I/O driver (as tokio's own sockets do).
pub(crate) fn spawn(start: Start) -> Result<oneshot::Receiver<Result<Welcome, Error>>, Error> {
    let (tx, rx) = oneshot::channel();
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("a Thynapse client needs a tokio runtime: {e}"),
        )
    })?;
    let spawner = runtime.clone();
    // Here, in `connect`: fails on a runtime without an I/O driver (the
    // sockets register in its reactor).
    drop(tokio::net::UnixStream::pair()?);
    // Opening and the HELO/WLCM handshake wait in `zmq_poll`: off the
    // runtime's workers.
    runtime.spawn_blocking(move || {
        let connect_timeout = start.options.connect_timeout;
        match Conn::open(start) {
            Ok(mut conn) => match conn.handshake(connect_timeout, &tx) {
                Ok(welcome) => {
                    if tx.send(Ok(welcome)).is_err() {
                        // `connect` was cancelled: leave politely.
                        conn.stop = Some(Stop::Closed);
                    }
                    spawner.spawn(conn.run());
                }
                Err(e) => {
                    // Nobody welcomed us: nobody to say goodbye to.
                    conn.left = true;
                    let _ = tx.send(Err(e));
                }
            },
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    Ok(rx)
}

/// What ended a wait of the task.
enum Woke {
    /// The DEALER's socket is readable (`true`: and closed by the peer).
    Dealer(bool),
    /// The SUB's `ZMQ_FD` signalled.
    Sub,
    /// The doorbell rang.
    Bell,
    /// The DEALER's socket takes bytes again.
    Writable,
    /// The deadline passed.
    Timeout,
}

/// Why the loop stops.
#[derive(Debug, Clone)]
enum Stop {
    /// `close()` or the last handle dropped: say GBYE.
    Closed,
    /// The transmitter said GBYE.
    TransmitterLeft(Option<String>),
    /// The sockets failed.
    Failed(String),
}

/// A request awaiting its answer, by `ref`.
enum Pending {
    /// An `LSTN` for the wire listen of this pattern.
    Listen { pattern: String },
    /// An `UNLS`; the answer does not matter.
    Unlisten,
    /// A command a caller awaits the answer of (a confirmed `EVNT`, `META`,
    /// `SEND`, `DISC`, `RQST`); `frames` kept to resend after a re-welcome
    /// or a failover.
    Call {
        frames: Vec<Vec<u8>>,
        answer: Answer,
    },
    /// A flush's PING.
    Flush {
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// A re-HELO after `not_welcomed`.
    Hello,
}

/// One subscription's routing entry.
struct Sub {
    /// Its pattern.
    pattern: Pattern,
    /// Its mode and ack.
    options: ListenOptions,
    /// Where its events, or requests, go.
    sink: Sink,
    /// Events read in the current burst, handed over together at its end
    /// (one channel send and one wake-up for the lot).
    batch: Vec<Event>,
    /// How many events the last burst handed over: the room the next
    /// one starts with, rather than growing step by step.
    last_burst: usize,
}

impl Sub {
    fn new(pattern: Pattern, options: ListenOptions, sink: Sink) -> Sub {
        Sub {
            pattern,
            options,
            sink,
            batch: Vec::new(),
            last_burst: 0,
        }
    }

    fn takes_events(&self) -> bool {
        matches!(self.sink, Sink::Events(_))
    }
}

/// One membership stream.
struct MemberSub {
    /// Services starting with this.
    prefix: String,
    /// Where its events go.
    events: mpsc::UnboundedSender<MembershipEvent>,
    /// Told once the subscription is in place (the SYNC frame came).
    ready: Option<oneshot::Sender<Result<(), Error>>>,
}

/// What the transmitter knows: one listen per pattern string (the
/// protocol keeps one mode per pattern and cell), shared by every
/// subscription of that pattern.
struct WireListen {
    /// Mode and ack, the same for every subscription of it.
    options: ListenOptions,
    /// The subscriptions on it.
    subs: HashSet<u64>,
    /// The `ref` of the LSTN not yet answered, while setting up.
    lstn_ref: Option<u64>,
    /// Whether the listen is in place (its first LSTN was answered).
    active: bool,
    /// Subscriptions waiting for it to be in place.
    waiters: Vec<(u64, oneshot::Sender<Result<(), Error>>)>,
}

/// The connection's state.
struct Conn {
    /// The shared libzmq context, for a SUB created later; the place is
    /// given back when the connection ends.
    ctx: ContextLease,
    /// Command socket.
    dealer: Dealer,
    /// The reactor's watch on the SUB's `ZMQ_FD`. Declared before `sub`,
    /// so dropped first, while that descriptor is open.
    sub_watch: Option<AsyncFd<RawFd>>,
    /// Event socket, for membership streams only: created and connected
    /// by the first one, then kept (and moved along on failover).
    sub: Option<zmq::Socket>,
    /// The token, for the credentials of a SUB created later.
    token: Option<String>,
    /// Messages from the async side.
    rx: LinkReceiver,
    /// For the ack guards of deliveries.
    link: Arc<Link>,
    /// This cell.
    id: Thid,
    /// The command endpoint in use.
    endpoint: String,
    /// Every command endpoint: the one given to `connect`, then the
    /// failover endpoints of the options.
    endpoints: Vec<String>,
    /// Index of `endpoint` in `endpoints`.
    current: usize,
    /// When the last PING went out.
    last_ping: Instant,
    /// HELO fields, kept for a re-HELO.
    service: String,
    /// HELO fields, kept for a re-HELO.
    metadata: Map<String, Value>,
    /// Heartbeat override.
    heartbeat_override: Option<Duration>,
    /// PING after this much silence.
    heartbeat: Duration,
    /// The event endpoint of the latest WLCM, where a SUB connects.
    event_endpoint: String,
    /// The event endpoint the SUB is connected to, once there is one.
    pub_endpoint: Option<String>,
    /// When we last sent anything.
    last_sent: Instant,
    /// Requests by `ref`.
    pending: HashMap<u64, Pending>,
    /// Listens by pattern string.
    wire: HashMap<String, WireListen>,
    /// Subscriptions by id (ordered, for a stable round robin).
    subs: BTreeMap<u64, Sub>,
    /// The subscriptions whose `batch` holds events, in the order they
    /// got their first one.
    batched: Vec<u64>,
    /// Scratch list of the subscriptions a multicatch event goes to.
    targets: Vec<u64>,
    /// Outstanding `SYNC <token>` topics and the membership stream each
    /// one proves subscribed.
    syncs: HashMap<Vec<u8>, u64>,
    /// Membership streams by id.
    members: BTreeMap<u64, MemberSub>,
    /// Makes SYNC tokens unique.
    sync_counter: u64,
    /// Round-robin cursor over local anycatch subscriptions.
    round_robin: usize,
    /// Acks waiting to be flushed.
    acks: AckBatcher,
    /// Deliveries already acked (dedup).
    seen: SeenSet,
    /// Whether the latest `WLCM` said the transmitter takes batches of
    /// events; false from a re-HELO until its `WLCM` says again.
    takes_batches: bool,
    /// Publishes drained together from the command queue, sent as one
    /// batch when the pass ends or before any other command.
    events: EventBatcher,
    /// Deliveries handed out, not yet acked or nacked.
    in_flight: HashSet<Thid>,
    /// Messages the DEALER refused for now (too much unwritten).
    outbox: VecDeque<Vec<Vec<u8>>>,
    /// When the re-HELO after `not_welcomed` was sent, if one is under way.
    rewelcome: Option<Instant>,
    /// Requests to resend once welcomed again.
    after_welcome: Vec<u64>,
    /// When anything last arrived on the command socket.
    last_received: Instant,
    /// Whether the current silence of the transmitter was logged.
    silence_reported: bool,
    /// Set when the DEALER lost its connection: its next successful
    /// handshake is a new peer to the transmitter.
    reconnecting: bool,
    /// Callers of `close()`.
    close_replies: Vec<oneshot::Sender<()>>,
    /// Set when the loop must end.
    stop: Option<Stop>,
    /// Set once there is nothing more to tell the transmitter: `finish`
    /// said goodbye, or the handshake failed. A connection dropped
    /// without it (its runtime shut down) says goodbye on drop.
    left: bool,
}

fn ceil_ms(d: Duration) -> i64 {
    i64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i64::MAX)
}

/// A DEALER or SUB with the SDK's high-water marks and linger, and PLAIN
/// credentials when there is a token.
fn new_socket(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    token: Option<&str>,
) -> Result<zmq::Socket, Error> {
    let s = ctx
        .socket(kind)
        .map_err(|e| Error::zmq(&format!("{kind:?}"), e))?;
    s.set_sndhwm(SOCKET_HWM)?;
    s.set_rcvhwm(SOCKET_HWM)?;
    s.set_linger(SOCKET_LINGER_MS)?;
    if let Some(token) = token {
        s.set_plain_username(Some(PLAIN_USERNAME))?;
        s.set_plain_password(Some(token))?;
    }
    Ok(s)
}

/// Registers a libzmq socket's `ZMQ_FD` in the runtime's reactor.
///
/// tokio deprecates this constructor because it cannot know that the
/// descriptor stays open while registered; the caller keeps the watch no
/// longer than the socket (`Conn` declares it first).
fn watch(socket: &zmq::Socket) -> Result<AsyncFd<RawFd>, Error> {
    let fd = socket.get_fd().map_err(|e| Error::zmq("ZMQ_FD", e))?;
    #[allow(deprecated)]
    Ok(AsyncFd::with_interest(fd, Interest::READABLE)?)
}

/// Waits until `fd` is readable and takes the readiness (the caller reads
/// until the socket is empty); whether the peer closed or the socket
/// failed. `None` never returns.
async fn readable<T: AsRawFd>(fd: Option<&AsyncFd<T>>) -> io::Result<bool> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    let mut guard = fd.readable().await?;
    let ready = guard.ready();
    guard.clear_ready();
    Ok(ready.is_read_closed() || ready.is_error())
}

/// Waits until `fd` is writable and takes the readiness (the caller
/// writes until the socket refuses). `None` never returns.
async fn writable<T: AsRawFd>(fd: Option<&AsyncFd<T>>) -> io::Result<()> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    fd.writable().await?.clear_ready();
    Ok(())
}

impl Conn {
    /// Creates the DEALER and starts connecting it.
    fn open(start: Start) -> Result<Conn, Error> {
        let ctx = ContextLease::acquire();
        let mut dealer =
            Dealer::new(&start.endpoint, start.options.token.clone()).map_err(|e| {
                Error::new(ErrorKind::Io, format!("connect {}: {e}", start.endpoint)).with_source(e)
            })?;
        dealer.timers(Instant::now());
        let heartbeat = start.options.heartbeat.unwrap_or(Duration::from_millis(
            thynapse_protocol::limits::DEFAULT_HEARTBEAT_MS,
        ));
        Ok(Conn {
            ctx,
            dealer,
            sub_watch: None,
            sub: None,
            token: start.options.token,
            rx: start.rx,
            link: start.link,
            id: start.id,
            endpoints: std::iter::once(start.endpoint.clone())
                .chain(
                    start
                        .options
                        .endpoints
                        .iter()
                        .filter(|e| **e != start.endpoint)
                        .cloned(),
                )
                .collect(),
            current: 0,
            last_ping: Instant::now(),
            endpoint: start.endpoint,
            service: start.options.service,
            metadata: start.options.metadata,
            heartbeat_override: start.options.heartbeat,
            heartbeat,
            event_endpoint: String::new(),
            pub_endpoint: None,
            last_sent: Instant::now(),
            pending: HashMap::new(),
            wire: HashMap::new(),
            subs: BTreeMap::new(),
            batched: Vec::new(),
            targets: Vec::new(),
            syncs: HashMap::new(),
            members: BTreeMap::new(),
            sync_counter: 0,
            round_robin: 0,
            acks: AckBatcher::new(ACK_BATCH_MAX_IDS, ACK_BATCH_MAX_DELAY),
            seen: SeenSet::new(DEDUP_CAPACITY),
            takes_batches: false,
            events: EventBatcher::new(
                EVENT_BATCH_MAX_EVENTS,
                EVENT_BATCH_MAX_BYTES,
                thynapse_protocol::limits::DEFAULT_MAX_FRAME,
            ),
            in_flight: HashSet::new(),
            outbox: VecDeque::new(),
            rewelcome: None,
            after_welcome: Vec::new(),
            reconnecting: false,
            last_received: Instant::now(),
            silence_reported: false,
            close_replies: Vec::new(),
            stop: None,
            left: false,
        })
    }

    /// Sends HELO and waits for WLCM (or ERRR, or a failed PLAIN
    /// handshake).
    fn handshake(
        &mut self,
        timeout: Duration,
        caller: &oneshot::Sender<Result<Welcome, Error>>,
    ) -> Result<Welcome, Error> {
        let reference = self.link.next_ref();
        let hello = wire::hello(self.id, &self.service, &self.metadata, reference);
        self.send(vec![hello.clone()]);
        let deadline = Instant::now() + timeout;
        let mut handshake_failure: Option<String> = None;
        // A connection lost after our HELO was written took it along: the
        // next one says it again.
        let mut lost = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let why = handshake_failure
                    .map(|f| format!(" (the connection failed: {f})"))
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "no WLCM from {} within {} ms{why}",
                        self.endpoint,
                        timeout.as_millis()
                    ),
                ));
            }
            if caller.is_closed() {
                return Err(Error::disconnected());
            }
            // Wake at least every 50 ms to notice a cancelled `connect`.
            self.wait_blocking((deadline - now).min(Duration::from_millis(50)))?;
            while let Some(happened) = self.dealer.happened() {
                match happened {
                    Happened::Refused(status) => {
                        return Err(Error::new(
                            ErrorKind::Unauthorized,
                            format!(
                                "{} refused the PLAIN handshake (ZAP status {status}): {}",
                                self.endpoint,
                                if self.has_token() {
                                    "wrong token"
                                } else {
                                    "it requires a token"
                                }
                            ),
                        ));
                    }
                    Happened::HandshakeFailed(why) => {
                        handshake_failure = Some(format!(
                            "ZMTP handshake failed ({why}); a token set on one side only?"
                        ));
                    }
                    Happened::Unreachable(why) => {
                        handshake_failure = Some(format!("cannot connect: {why}"));
                    }
                    Happened::Disconnected => {
                        lost = true;
                        handshake_failure = Some("the connection was lost".to_owned());
                    }
                    Happened::Connected if lost => {
                        lost = false;
                        self.send(vec![hello.clone()]);
                    }
                    Happened::Connected => {}
                }
            }
            while let Some(message) = self.recv() {
                match message {
                    Ok(Incoming::Welcome(welcome)) => {
                        self.last_received = Instant::now();
                        self.welcomed(&welcome)?;
                        return Ok(welcome);
                    }
                    Ok(Incoming::Error { code, message, .. }) => {
                        return Err(Error::from_reply(&code, &message));
                    }
                    Ok(Incoming::Ping { reference }) => self.send(vec![wire::pong(reference)]),
                    Ok(Incoming::Goodbye { reason }) => {
                        return Err(Error::new(
                            ErrorKind::Disconnected,
                            format!(
                                "the transmitter said goodbye: {}",
                                reason.as_deref().unwrap_or("no reason")
                            ),
                        ));
                    }
                    Ok(other) => debug!(?other, "ignored before WLCM"),
                    Err(e) => warn!(error = %e, "undecodable message from the transmitter"),
                }
            }
        }
    }

    fn has_token(&self) -> bool {
        self.dealer.has_token()
    }

    /// Waits, on a blocking thread, at most `timeout` for the DEALER: flushes
    /// it, starts a due reconnect, then waits for its socket.
    fn wait_blocking(&mut self, timeout: Duration) -> Result<(), Error> {
        let now = Instant::now();
        self.dealer.timers(now);
        self.dealer.flush();
        if self.dealer.readable() {
            return Ok(());
        }
        let timeout = match self.dealer.deadline() {
            Some(at) => timeout.min(at.saturating_duration_since(now)),
            None => timeout,
        };
        let Some(fd) = self.dealer.raw_fd() else {
            std::thread::sleep(timeout);
            return Ok(());
        };
        let wanted = if self.dealer.has_output() {
            zmq::POLLIN | zmq::POLLOUT
        } else {
            zmq::POLLIN
        };
        let mut items = [zmq::PollItem::from_fd(fd, wanted)];
        match zmq::poll(&mut items, ceil_ms(timeout)) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(Error::zmq("zmq_poll", e)),
        }
        let [item] = &items;
        if item.is_readable() || item.is_error() {
            self.dealer.ready(item.is_error());
        }
        if item.is_writable() {
            self.dealer.flush();
        }
        Ok(())
    }

    /// Applies a WLCM: heartbeat, event endpoint (a SUB, if there is
    /// one, moves to it).
    fn welcomed(&mut self, welcome: &Welcome) -> Result<(), Error> {
        self.heartbeat = self
            .heartbeat_override
            .unwrap_or(Duration::from_millis(welcome.heartbeat_ms.max(1)));
        self.event_endpoint.clone_from(&welcome.event_endpoint);
        self.takes_batches = welcome.batch;
        self.events
            .welcomed(welcome.limits.max_frame, welcome.packed);
        self.follow_event_endpoint()?;
        debug!(
            transmitter = %welcome.id,
            event_endpoint = %welcome.event_endpoint,
            heartbeat_ms = welcome.heartbeat_ms,
            "welcomed"
        );
        Ok(())
    }

    /// Connects the SUB, if there is one, to the latest event endpoint,
    /// leaving the one it was connected to.
    fn follow_event_endpoint(&mut self) -> Result<(), Error> {
        let Some(sub) = &self.sub else {
            return Ok(());
        };
        if self.pub_endpoint.as_deref() == Some(self.event_endpoint.as_str()) {
            return Ok(());
        }
        if let Some(old) = self.pub_endpoint.take() {
            // Subscriptions stay on the socket and reach the new peer.
            let _ = sub.disconnect(&old);
        }
        sub.connect(&self.event_endpoint)
            .map_err(|e| Error::zmq(&format!("connect {}", self.event_endpoint), e))?;
        self.pub_endpoint = Some(self.event_endpoint.clone());
        Ok(())
    }

    /// The SUB, created and connected to the event endpoint on first use.
    fn subscriber(&mut self) -> Result<&zmq::Socket, Error> {
        let sub = match self.sub.take() {
            Some(sub) => sub,
            None => {
                let sub = new_socket(self.ctx.context(), zmq::SUB, self.token.as_deref())?;
                self.sub_watch = Some(watch(&sub)?);
                sub.connect(&self.event_endpoint)
                    .map_err(|e| Error::zmq(&format!("connect {}", self.event_endpoint), e))?;
                self.pub_endpoint = Some(self.event_endpoint.clone());
                debug!(event_endpoint = %self.event_endpoint, "event socket connected");
                sub
            }
        };
        Ok(self.sub.insert(sub))
    }

    /// Waits for the sockets and the doorbell: whether the DEALER, the
    /// doorbell and the SUB are ready, in that order. Writes what the
    /// DEALER holds first.
    ///
    /// The reactor reports edges. The DEALER is ready while it holds bytes
    /// not handled or was not read since its last edge. The SUB's
    /// `ZMQ_FD` signals commands for libzmq to process, not messages, and
    /// any libzmq call may process them and swallow the edge, so the SUB
    /// (rare) is asked for its `ZMQ_EVENTS` before each wait.
    ///
    /// `timer` is the task's one timer, set to `deadline` when that is
    /// sooner (or the timer fired): a wait that only moves the deadline
    /// later leaves the timer alone, and a timer that fires early costs
    /// one turn of the loop.
    async fn poll(
        &mut self,
        deadline: Instant,
        mut timer: Pin<&mut tokio::time::Sleep>,
    ) -> Result<[bool; 3], Error> {
        let held = !self.outbox.is_empty();
        self.dealer.flush();
        // Messages the DEALER refused move in as the socket takes bytes;
        // only a socket that refused bytes itself promises a writable
        // edge to wait for.
        while !self.outbox.is_empty() && !self.dealer.has_output() {
            self.flush_outbox();
            self.dealer.flush();
        }
        if held && self.outbox.is_empty() {
            // Room again: no wait, the loop drains the commands it left
            // queued (their senders may wait on the full queue, not ring).
            return Ok([false, true, false]);
        }
        let dealer = self.dealer.readable();
        let sub = match &self.sub {
            Some(sub) => sub.get_events()?.contains(zmq::POLLIN),
            None => false,
        };
        if dealer || sub {
            return Ok([dealer, false, sub]);
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        if timer.is_elapsed() || deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        let socket = self.dealer.socket();
        let writing = self.dealer.has_output();
        // Sockets first: a busy doorbell must not starve them (the loop
        // drains the queues on every turn, rung or not).
        let woke = tokio::select! {
            biased;
            closed = readable(socket) => Woke::Dealer(closed?),
            signalled = readable(self.sub_watch.as_ref()) => {
                signalled?;
                Woke::Sub
            }
            () = self.rx.bell.rang() => Woke::Bell,
            done = writable(socket), if writing => {
                done?;
                Woke::Writable
            }
            () = timer => Woke::Timeout,
        };
        Ok(match woke {
            Woke::Dealer(closed) => {
                self.dealer.ready(closed);
                [true, false, false]
            }
            Woke::Sub => [false, false, true],
            Woke::Bell => [false, true, false],
            Woke::Writable => {
                self.dealer.flush();
                [false; 3]
            }
            Woke::Timeout => [false; 3],
        })
    }

    /// The main loop, a task on the runtime; it waits in `Conn::poll`,
    /// through the runtime's reactor.
    async fn run(mut self) {
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        loop {
            tokio::task::consume_budget().await;
            let now = Instant::now();
            self.drain_control(now);
            if self.stop.is_some() {
                break;
            }
            self.flush_outbox();
            self.drain_commands();
            if self.acks.due(now) {
                self.flush_acks();
            }
            self.tick(now);
            if self.stop.is_some() {
                break;
            }

            let deadline = self.deadline();
            let [dealer, bell, sub] = match self.poll(deadline, timer.as_mut()).await {
                Ok(ready) => ready,
                Err(e) => {
                    error!(error = %e, "polling the sockets failed; closing the connection");
                    self.stop = Some(Stop::Failed(e.to_string()));
                    break;
                }
            };
            if bell {
                self.rx.bell.drain();
            }
            if dealer {
                self.read_commands();
            }
            if sub {
                self.read_events();
            }
            self.on_happened();
        }
        // Waits for the last PONG: off the runtime's workers.
        tokio::task::spawn_blocking(move || self.finish());
    }

    /// What the DEALER reports: a lost connection, a new one (join
    /// again), a refused token.
    fn on_happened(&mut self) {
        while let Some(happened) = self.dealer.happened() {
            match happened {
                Happened::Refused(status) => warn!(
                    endpoint = %self.endpoint,
                    status,
                    "the transmitter refused our token on reconnect"
                ),
                Happened::Disconnected => {
                    info!(endpoint = %self.endpoint, "disconnected; reconnecting");
                    self.reconnecting = true;
                }
                Happened::Connected if self.reconnecting => {
                    self.reconnecting = false;
                    // A new connection is a new peer to the transmitter (it
                    // may have restarted): it knows nothing of us, and would
                    // answer our PINGs all the same. Join again.
                    info!(endpoint = %self.endpoint, "reconnected; joining again");
                    self.start_rewelcome(true);
                }
                other => trace!(?other, "command connection"),
            }
        }
    }

    /// When the wait ends: at the next heartbeat, ack flush, re-HELO or
    /// reconnect.
    fn deadline(&self) -> Instant {
        let mut deadline = (self.last_sent + self.heartbeat)
            .min((self.last_received.max(self.last_ping)) + self.heartbeat);
        if !self.silence_reported || self.endpoints.len() > 1 {
            deadline = deadline.min(self.last_received + self.heartbeat * 3);
        }
        if let Some(d) = self.acks.deadline() {
            deadline = deadline.min(d);
        }
        if let Some(t) = self.rewelcome {
            deadline = deadline.min(t + self.hello_retry());
        }
        if let Some(t) = self.dealer.deadline() {
            deadline = deadline.min(t);
        }
        deadline
    }

    /// How often an unanswered re-HELO is repeated: every few hundred ms
    /// (PROTOCOL.md §4, reconnects).
    fn hello_retry(&self) -> Duration {
        (self.heartbeat / 4).clamp(Duration::from_millis(50), Duration::from_millis(500))
    }

    /// Timers: reconnect, heartbeat PING, re-HELO retry, sweeping abandoned
    /// requests.
    fn tick(&mut self, now: Instant) {
        self.dealer.timers(now);
        if let Some(t) = self.rewelcome {
            if now >= t + self.hello_retry() {
                // No WLCM yet: the HELO was lost with a connection, or the
                // old connection still holds our THID (`thid_in_use`) until
                // the transmitter expires it. HELO is idempotent: again.
                debug!("no WLCM after re-HELO; sending HELO again");
                self.start_rewelcome(true);
            }
        }
        // A stall long enough for the transmitter to expire us shows in
        // the answer to the next PING: `PONG {"welcomed":false}`.
        if now >= self.last_received + self.heartbeat * 3 {
            // Three PINGs unanswered: the transmitter is gone or stuck.
            if !self.silence_reported {
                warn!(endpoint = %self.endpoint, "no answer from the transmitter for 3 heartbeats");
                self.silence_reported = true;
            }
            if self.endpoints.len() > 1 {
                self.fail_over(now);
            }
            // With one endpoint, the DEALER keeps reconnecting to it, and
            // its `Connected` makes us join again.
        }
        // PING when we sent nothing for a heartbeat (liveness for the
        // transmitter), and when we heard nothing for one (a probe: its PONG
        // proves the transmitter alive, even while we only publish).
        let quiet =
            now >= self.last_received + self.heartbeat && now >= self.last_ping + self.heartbeat;
        if now >= self.last_sent + self.heartbeat || quiet {
            self.send(vec![wire::ping(None)]);
            self.last_ping = now;
            self.sweep();
        }
    }

    /// Moves to the next command endpoint: HELO there with the same THID,
    /// then (on WLCM) follow its event endpoint and LSTN everything again.
    /// Requests awaiting an answer are sent again; fire-and-forget messages
    /// not yet written to the dead transmitter are lost with it.
    fn fail_over(&mut self, now: Instant) {
        let next = (self.current + 1) % self.endpoints.len();
        let to = self.endpoints[next].clone();
        warn!(from = %self.endpoint, to = %to, "failing over");
        if let Err(e) = self.dealer.reconnect_to(&to) {
            error!(endpoint = %to, error = %e, "cannot connect; trying the next endpoint later");
        }
        self.current = next;
        self.endpoint = to;
        // Give the new transmitter three heartbeats of its own.
        self.last_received = now;
        self.silence_reported = false;
        // HELO must go first: queue the rest behind it.
        let held = std::mem::take(&mut self.outbox);
        self.start_rewelcome(true);
        self.outbox.extend(held);
        for (r, p) in &self.pending {
            if matches!(p, Pending::Call { .. } | Pending::Flush { .. })
                && !self.after_welcome.contains(r)
            {
                self.after_welcome.push(*r);
            }
        }
    }

    /// Forgets requests whose caller stopped waiting (timed out, dropped).
    fn sweep(&mut self) {
        self.pending.retain(|_, p| match p {
            Pending::Call { answer, .. } => !answer.is_closed(),
            Pending::Flush { reply } => !reply.is_closed(),
            _ => true,
        });
    }

    // ---- the async side ---------------------------------------------------

    fn drain_control(&mut self, now: Instant) {
        let mut nacks = Vec::new();
        while let Ok(message) = self.rx.control.try_recv() {
            match message {
                Control::Ack(id) => {
                    self.in_flight.remove(&id);
                    self.seen.insert(id);
                    if self.acks.push(id, now) {
                        self.flush_acks();
                    }
                }
                Control::Nack(id) => {
                    self.in_flight.remove(&id);
                    nacks.push(id);
                }
                Control::Reply { id, frames } => {
                    self.in_flight.remove(&id);
                    self.send(frames);
                }
                Control::Unlisten { sub } => self.remove_sub(sub),
                Control::StopMembership { sub } => self.remove_member(sub),
                Control::Close { reply } => {
                    self.close_replies.extend(reply);
                    self.stop.get_or_insert(Stop::Closed);
                }
            }
        }
        if !nacks.is_empty() {
            self.send(vec![wire::ack_batch(Verb::NACK, &nacks)]);
        }
    }

    /// Handles the commands queued by the async side; the publishes among
    /// them go out in batches.
    fn drain_commands(&mut self) {
        // While the DEALER refuses messages, leave commands queued: the bounded
        // queue then makes publishers wait.
        while self.outbox.is_empty() {
            let Ok(command) = self.rx.commands.try_recv() else {
                break;
            };
            if !matches!(command, Command::Publish(_)) {
                // Nothing overtakes the publishes before it.
                self.flush_events();
            }
            match command {
                Command::Publish(event) => self.publish(event),
                Command::Send { frames, answer } => {
                    if let Some((reference, answer)) = answer {
                        self.pending.insert(
                            reference,
                            Pending::Call {
                                frames: frames.clone(),
                                answer,
                            },
                        );
                    }
                    self.send(frames);
                }
                Command::Listen {
                    sub,
                    pattern,
                    options,
                    sink,
                    reply,
                } => self.listen(sub, pattern, options, sink, reply),
                Command::Membership {
                    sub,
                    prefix,
                    events,
                    reply,
                } => self.add_member(sub, prefix, events, reply),
                Command::Flush { reference, reply } => {
                    self.flush_acks();
                    self.pending.insert(reference, Pending::Flush { reply });
                    self.send(vec![wire::ping(Some(reference))]);
                }
            }
        }
        self.flush_events();
    }

    /// A publish without answer: held to join the publishes drained with
    /// it when the transmitter takes batches, else sent at once.
    fn publish(&mut self, event: Publish) {
        if !self.takes_batches {
            self.send(event.into_frames());
            return;
        }
        if !self.events.fits(&event) {
            self.flush_events();
        }
        self.events.push(event);
    }

    /// Sends the publishes held, as one message.
    fn flush_events(&mut self) {
        if self.outbox.is_empty() {
            if let Some(out) = self.dealer.output() {
                // Straight into the socket's output, not copied there.
                if self.events.take_into(out) {
                    self.last_sent = Instant::now();
                }
                return;
            }
        }
        if let Some(message) = self.events.take() {
            self.send(message);
        }
    }

    // ---- listens ----------------------------------------------------------

    fn listen(
        &mut self,
        sub: u64,
        pattern: Pattern,
        options: ListenOptions,
        sink: Sink,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        let key = pattern.as_str().to_owned();
        if let Some(w) = self.wire.get_mut(&key) {
            if w.options != options {
                let _ = reply.send(Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{key} is already listened to as {:?} (ack {}, concurrency {:?}); one mode per pattern",
                        w.options.mode, w.options.ack, w.options.concurrency
                    ),
                )));
                return;
            }
            w.subs.insert(sub);
            self.subs.insert(sub, Sub::new(pattern, options, sink));
            if w.active {
                if reply.send(Ok(())).is_err() {
                    self.remove_sub(sub);
                }
            } else {
                w.waiters.push((sub, reply));
            }
            return;
        }

        let reference = self.link.next_ref();
        self.send(vec![wire::listen(&key, &options, reference)]);
        self.pending.insert(
            reference,
            Pending::Listen {
                pattern: key.clone(),
            },
        );
        self.wire.insert(
            key,
            WireListen {
                options,
                subs: HashSet::from([sub]),
                lstn_ref: Some(reference),
                active: false,
                waiters: vec![(sub, reply)],
            },
        );
        self.subs.insert(sub, Sub::new(pattern, options, sink));
    }

    /// A fresh `SYNC <token>` topic: unique, and no prefix of another
    /// (the trailing `.` ends every token).
    fn next_sync_topic(&mut self) -> Vec<u8> {
        self.sync_counter += 1;
        wire::sync_topic(&format!("{}-{}.", self.id, self.sync_counter))
    }

    /// Subscribes a membership stream: `MEMB <prefix>`, then a SYNC topic
    /// whose answer proves the subscription in place (a SUB's
    /// subscriptions reach the publisher in order). The first one creates
    /// the SUB.
    fn add_member(
        &mut self,
        sub: u64,
        prefix: String,
        events: mpsc::UnboundedSender<MembershipEvent>,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        let topic = self.next_sync_topic();
        let events_topic = wire::membership_prefix(&prefix);
        let subscribed = self.subscriber().and_then(|socket| {
            let subscribed = socket
                .set_subscribe(&events_topic)
                .and_then(|()| socket.set_subscribe(&topic));
            subscribed.map_err(|e| {
                let _ = socket.set_unsubscribe(&events_topic);
                Error::zmq("subscribe", e)
            })
        });
        if let Err(e) = subscribed {
            let _ = reply.send(Err(e));
            return;
        }
        self.syncs.insert(topic, sub);
        self.members.insert(
            sub,
            MemberSub {
                prefix,
                events,
                ready: Some(reply),
            },
        );
    }

    /// A membership stream is gone: unsubscribe its topic (libzmq counts
    /// subscriptions, so other streams of the same prefix keep theirs).
    fn remove_member(&mut self, sub: u64) {
        let (Some(m), Some(socket)) = (self.members.remove(&sub), &self.sub) else {
            return;
        };
        let _ = socket.set_unsubscribe(&wire::membership_prefix(&m.prefix));
        self.syncs.retain(|topic, s| {
            if *s == sub {
                let _ = socket.set_unsubscribe(topic);
            }
            *s != sub
        });
    }

    /// Completes a wire listen whose LSTN was answered.
    fn complete(&mut self, key: &str) {
        let Some(w) = self.wire.get_mut(key) else {
            return;
        };
        if w.active {
            return;
        }
        w.active = true;
        let mut gone = Vec::new();
        for (sub, reply) in w.waiters.drain(..) {
            if reply.send(Ok(())).is_err() {
                gone.push(sub);
            }
        }
        for sub in gone {
            self.remove_sub(sub);
        }
    }

    /// The transmitter refused a listen: fail its subscriptions.
    fn fail_listen(&mut self, key: &str, code: &str, message: &str) {
        let Some(mut w) = self.wire.remove(key) else {
            return;
        };
        for (_, reply) in w.waiters.drain(..) {
            let _ = reply.send(Err(Error::from_reply(code, message)));
        }
        for sub in &w.subs {
            self.subs.remove(sub);
        }
    }

    /// A subscription is gone: stop routing to it, and unlisten its
    /// pattern if it was the last one on it.
    fn remove_sub(&mut self, sub: u64) {
        let Some(entry) = self.subs.remove(&sub) else {
            return;
        };
        let key = entry.pattern.as_str();
        let Some(w) = self.wire.get_mut(key) else {
            return;
        };
        w.subs.remove(&sub);
        w.waiters.retain(|(s, _)| *s != sub);
        if !w.subs.is_empty() {
            return;
        }
        if self.wire.remove(key).is_some() {
            let r = self.link.next_ref();
            self.send(vec![wire::unlisten(key, r)]);
            self.pending.insert(r, Pending::Unlisten);
        }
    }

    /// After a re-welcome: LSTN every pattern again.
    fn relisten_all(&mut self) {
        let keys: Vec<String> = self.wire.keys().cloned().collect();
        for key in keys {
            let reference = self.link.next_ref();
            let Some(w) = self.wire.get_mut(&key) else {
                continue;
            };
            let frame = wire::listen(&key, &w.options, reference);
            if !w.active {
                w.lstn_ref = Some(reference);
            }
            self.pending
                .insert(reference, Pending::Listen { pattern: key });
            self.send(vec![frame]);
        }
    }

    // ---- the command socket ----------------------------------------------

    fn read_commands(&mut self) {
        for n in 0..READ_BURST {
            let Some(message) = self.recv() else {
                break;
            };
            if n == 0 {
                // One clock reading for the burst.
                self.last_received = Instant::now();
                self.silence_reported = false;
            }
            match message {
                Ok(message) => self.on_command(message),
                Err(e) => warn!(error = %e, "undecodable message from the transmitter"),
            }
            if self.stop.is_some() {
                break;
            }
        }
        self.hand_over();
    }

    fn on_command(&mut self, message: Incoming) {
        match message {
            Incoming::Deliver(d) => self.on_delivery(d),
            Incoming::Delivers(batch) => batch.into_iter().for_each(|d| self.on_delivery(d)),
            Incoming::Event(d) => self.on_multicatch(d),
            Incoming::Events(batch) => batch.into_iter().for_each(|d| self.on_multicatch(d)),
            Incoming::Request(d) => self.on_request(d),
            Incoming::Reply { reference, reply } => {
                match reference.and_then(|r| self.pending.remove(&r)) {
                    Some(Pending::Call {
                        answer: Answer::Reply(tx),
                        ..
                    }) => {
                        let _ = tx.send(reply);
                    }
                    Some(other) => {
                        debug!("RPLY for a command that is not a request");
                        if let Some(r) = reference {
                            self.pending.insert(r, other);
                        }
                    }
                    None => trace!(?reference, "RPLY for nothing pending"),
                }
            }
            Incoming::Okay { reference, body } => {
                match reference.and_then(|r| self.pending.remove(&r).map(|p| (r, p))) {
                    Some((r, Pending::Listen { pattern })) => {
                        if let Some(w) = self.wire.get_mut(&pattern) {
                            if w.lstn_ref == Some(r) {
                                w.lstn_ref = None;
                                self.complete(&pattern);
                            }
                        }
                    }
                    Some((_, Pending::Call { answer, .. })) => match answer {
                        Answer::Okay { reply, metadata } => {
                            if let Some((update, replace)) = metadata {
                                // Join again later with what the transmitter now has.
                                if replace {
                                    self.metadata = update;
                                } else {
                                    self.metadata.extend(update);
                                }
                            }
                            let _ = reply.send(Ok(body));
                        }
                        Answer::Reply(tx) => {
                            let _ = tx.send(Err(Error::new(
                                ErrorKind::Rejected,
                                "the transmitter answered a request with OKAY",
                            )));
                        }
                    },
                    Some((_, Pending::Flush { reply })) => {
                        let _ = reply.send(Ok(()));
                    }
                    Some((_, Pending::Unlisten | Pending::Hello)) => {}
                    None => trace!(?reference, "OKAY for nothing pending"),
                }
            }
            Incoming::Pong {
                reference,
                welcomed,
            } => {
                if welcomed == Some(false) && self.rewelcome.is_none() {
                    // Expired (a stall, a lost connection) or the
                    // transmitter restarted: join again.
                    info!("the transmitter no longer knows this cell; joining again");
                    self.start_rewelcome(false);
                }
                if let Some(Pending::Flush { reply }) =
                    reference.and_then(|r| self.pending.remove(&r))
                {
                    let _ = reply.send(Ok(()));
                }
            }
            Incoming::Welcome(welcome) => {
                if self.rewelcome.take().is_none() {
                    debug!("unexpected WLCM");
                    return;
                }
                self.pending.retain(|_, p| !matches!(p, Pending::Hello));
                info!(transmitter = %welcome.id, "welcomed again; re-listening");
                if let Err(e) = self.welcomed(&welcome) {
                    error!(error = %e, "cannot follow the new event endpoint");
                }
                self.relisten_all();
                for r in std::mem::take(&mut self.after_welcome) {
                    match self.pending.get(&r) {
                        Some(Pending::Call { frames, .. }) => {
                            let frames = frames.clone();
                            self.send(frames);
                        }
                        Some(Pending::Flush { .. }) => self.send(vec![wire::ping(Some(r))]),
                        _ => {}
                    }
                }
            }
            Incoming::Error {
                code,
                message,
                reference,
            } => self.on_error(&code, &message, reference),
            Incoming::Ping { reference } => self.send(vec![wire::pong(reference)]),
            Incoming::Goodbye { reason } => {
                info!(
                    reason = reason.as_deref().unwrap_or(""),
                    "the transmitter said goodbye"
                );
                if self.endpoints.len() > 1 {
                    // PROTOCOL.md §8: reconnect elsewhere with the same THID.
                    self.fail_over(Instant::now());
                } else {
                    self.stop = Some(Stop::TransmitterLeft(reason));
                }
            }
            Incoming::Other(verb) => debug!(%verb, "ignored"),
        }
    }

    fn on_error(&mut self, code: &str, message: &str, reference: Option<u64>) {
        if code == "not_welcomed" {
            // The transmitter expired us (or restarted): HELO again, then
            // LSTN everything again; resend the request that bounced.
            self.start_rewelcome(false);
            if let Some(r) = reference {
                match self.pending.get(&r) {
                    Some(Pending::Call { .. } | Pending::Flush { .. }) => {
                        self.after_welcome.push(r)
                    }
                    // relisten_all sends a fresh LSTN.
                    Some(Pending::Listen { .. } | Pending::Unlisten) => {
                        self.pending.remove(&r);
                    }
                    _ => {}
                }
            }
            return;
        }
        if code == "unknown_delivery" {
            // An ack for a delivery the transmitter already gave up on, or
            // a re-ack of a duplicate: harmless.
            debug!(message, "unknown_delivery");
            return;
        }
        match reference.and_then(|r| self.pending.remove(&r).map(|p| (r, p))) {
            Some((r, Pending::Listen { pattern })) => {
                let failing = self
                    .wire
                    .get(&pattern)
                    .is_some_and(|w| w.lstn_ref == Some(r));
                if failing {
                    self.fail_listen(&pattern, code, message);
                } else {
                    warn!(pattern, code, message, "re-listen refused");
                }
            }
            Some((_, Pending::Call { answer, .. })) => {
                answer.fail(Error::from_reply(code, message));
            }
            Some((_, Pending::Flush { reply })) => {
                let _ = reply.send(Err(Error::from_reply(code, message)));
            }
            Some((_, Pending::Hello)) => {
                // Retried every heartbeat (`tick`): `thid_in_use` clears when
                // the transmitter expires our previous connection.
                if code == "thid_in_use" {
                    debug!(message, "re-HELO: our old connection still holds the THID");
                } else {
                    warn!(code, message, "re-HELO refused; retrying");
                }
            }
            Some((_, Pending::Unlisten)) => debug!(code, "UNLS refused"),
            None => warn!(code, message, "error from the transmitter"),
        }
    }

    /// Says HELO again (then LSTN again on WLCM). Without `force`, does
    /// nothing while a re-HELO is under way.
    fn start_rewelcome(&mut self, force: bool) {
        if self.rewelcome.is_some() && !force {
            return;
        }
        // Only the latest HELO matters: earlier ones were lost or refused.
        self.pending.retain(|_, p| !matches!(p, Pending::Hello));
        // The transmitter may have changed: no batch until its WLCM says.
        self.takes_batches = false;
        let r = self.link.next_ref();
        self.pending.insert(r, Pending::Hello);
        self.send(vec![wire::hello(self.id, &self.service, &self.metadata, r)]);
        self.rewelcome = Some(Instant::now());
    }

    fn on_delivery(&mut self, d: Delivered) {
        let id = d.id;
        if self.seen.contains(&id) {
            // Processed already (our ack crossed the redelivery): ack again.
            trace!(%id, "duplicate delivery re-acked");
            if self.acks.push(id, Instant::now()) {
                self.flush_acks();
            }
            return;
        }
        if self.in_flight.contains(&id) {
            // A handler is still on it; its ack will answer this one too.
            trace!(%id, "duplicate delivery of an event in flight");
            return;
        }
        let Some((key, needs_ack)) = self.pick(&d.channel, true) else {
            if self.pick(&d.channel, false).is_some() {
                // Only a responder listens: it answers requests, not
                // events. Acked, so that it does not come back here.
                warn!(%id, channel = %d.channel, "an event on a pattern served for requests only; dropped");
                if self.acks.push(id, Instant::now()) {
                    self.flush_acks();
                }
            } else {
                debug!(%id, channel = %d.channel, "delivery matches no subscription; NACK");
                self.send(vec![wire::ack_batch(Verb::NACK, &[id])]);
            }
            return;
        };
        let guard = needs_ack.then(|| {
            self.in_flight.insert(id);
            AckGuard::new(id, self.link.clone())
        });
        self.batch(
            key,
            Event {
                delivered: d,
                mode: Mode::Any,
                guard,
            },
        );
    }

    /// Queues an event for subscription `key`, to hand over at the end of
    /// the burst.
    fn batch(&mut self, key: u64, event: Event) {
        if let Some(sub) = self.subs.get_mut(&key) {
            if sub.batch.is_empty() {
                self.batched.push(key);
                sub.batch.reserve(sub.last_burst);
            }
            sub.batch.push(event);
        }
    }

    /// Hands every subscription the events of this burst, in order.
    fn hand_over(&mut self) {
        for key in self.batched.drain(..) {
            if let Some(Sub {
                sink: Sink::Events(events),
                batch,
                last_burst,
                ..
            }) = self.subs.get_mut(&key)
            {
                *last_burst = batch.len();
                // A closed receiver returns the events, whose guards then
                // NACK.
                let _ = events.send(std::mem::take(batch));
            }
        }
    }

    /// Round robin among this client's anycatch subscriptions matching
    /// `channel` that take events (or requests): the one to hand a
    /// delivery to, and whether any of them acks.
    fn pick(&mut self, channel: &str, events: bool) -> Option<(u64, bool)> {
        let matching = |s: &&Sub| {
            s.options.mode == Mode::Any && s.takes_events() == events && s.pattern.matches(channel)
        };
        let (count, needs_ack) = self
            .subs
            .values()
            .filter(matching)
            .fold((0, false), |(n, ack), s| (n + 1, ack || s.options.ack));
        if count == 0 {
            return None;
        }
        let nth = self.round_robin % count;
        self.round_robin = self.round_robin.wrapping_add(1);
        self.subs
            .iter()
            .filter(|(_, s)| matching(s))
            .nth(nth)
            .map(|(k, _)| (*k, needs_ack))
    }

    /// A request for this cell to answer (`RQST`): to one of the client's
    /// responders of a matching pattern, never to an event subscription.
    fn on_request(&mut self, d: Delivered) {
        let id = d.id;
        if self.in_flight.contains(&id) {
            // Redelivered to us while a handler is still on it: its reply
            // answers both.
            trace!(%id, "duplicate request in flight");
            return;
        }
        let Some((key, _)) = self.pick(&d.channel, false) else {
            if self.pick(&d.channel, true).is_some() {
                // Event subscriptions do not answer requests: say so
                // rather than leave the requester waiting.
                let message = format!(
                    "cell {} listens to {} for events and serves no requests there",
                    self.id, d.channel
                );
                self.send(vec![wire::reply_error(id, &message)]);
            } else {
                debug!(%id, channel = %d.channel, "request matches no responder; NACK");
                self.send(vec![wire::ack_batch(Verb::NACK, &[id])]);
            }
            return;
        };
        self.in_flight.insert(id);
        let request = Request {
            delivered: d,
            guard: Some(RequestGuard::new(id, self.link.clone())),
        };
        if let Some(Sub {
            sink: Sink::Requests(dispatch),
            ..
        }) = self.subs.get(&key)
        {
            dispatch.dispatch(request);
        }
    }

    /// A multicatch event (`EVNT` on the command socket): a copy to every
    /// multicatch subscription whose pattern matches its channel. The
    /// transmitter sends one copy per cell, however many of its patterns
    /// match; one that matches none (unlistened meanwhile) is dropped.
    fn on_multicatch(&mut self, d: Delivered) {
        let event = Event {
            // Multicatch bodies carry no `attempt`: it reads as 1.
            delivered: d,
            mode: Mode::Multi,
            guard: None,
        };
        let mut targets = std::mem::take(&mut self.targets);
        targets.extend(
            self.subs
                .iter()
                .filter(|(_, s)| {
                    s.options.mode == Mode::Multi
                        && s.takes_events()
                        && s.pattern.matches(event.channel())
                })
                .map(|(k, _)| *k),
        );
        if let Some((&last, others)) = targets.split_last() {
            for &key in others {
                self.batch(key, event.clone_unacked());
            }
            self.batch(last, event);
        }
        targets.clear();
        self.targets = targets;
    }

    // ---- the event socket -------------------------------------------------

    fn read_events(&mut self) {
        for _ in 0..READ_BURST {
            let Some(socket) = &self.sub else {
                return;
            };
            let frames = match socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    warn!(error = %e, "event socket receive failed");
                    return;
                }
            };
            match wire::decode_published(frames) {
                Ok(Published::Sync(topic)) => {
                    let Some(sub) = self.syncs.remove(&topic) else {
                        continue;
                    };
                    let _ = socket.set_unsubscribe(&topic);
                    let ready = self.members.get_mut(&sub).and_then(|m| m.ready.take());
                    if let Some(ready) = ready {
                        if ready.send(Ok(())).is_err() {
                            self.remove_member(sub);
                        }
                    }
                }
                Ok(Published::Membership(event)) => {
                    // The SUB prefix may let in other streams' services.
                    for m in self.members.values() {
                        if m.ready.is_none() && event.service.starts_with(&m.prefix) {
                            let _ = m.events.send(event.clone());
                        }
                    }
                }
                Err(e) => debug!(error = %e, "unreadable event-socket frame"),
            }
        }
    }

    // ---- sockets ----------------------------------------------------------

    /// Sends a message now, or queues it while the DEALER pushes back.
    fn send(&mut self, frames: Vec<Vec<u8>>) {
        if !self.outbox.is_empty() {
            self.outbox.push_back(frames);
            return;
        }
        match self.dealer.send(&frames) {
            Ok(()) => self.last_sent = Instant::now(),
            Err(_) => self.outbox.push_back(frames),
        }
    }

    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        self.dealer.flush();
        while let Some(frames) = self.outbox.front() {
            if self.dealer.send(frames).is_err() {
                return;
            }
            self.last_sent = Instant::now();
            self.outbox.pop_front();
        }
    }

    fn flush_acks(&mut self) {
        if !self.acks.is_empty() {
            let ids = self.acks.take();
            self.send(vec![wire::ack_batch(Verb::ACKN, &ids)]);
        }
    }

    /// Receives and decodes one command-socket message, without waiting;
    /// `None` when none is read. The first frame is decoded where it was
    /// read; binary frames, which go to the user, are copied into their
    /// own messages (one per element of a batch, or one shared by the
    /// elements of a packed batch).
    fn recv(&mut self) -> Option<Result<Incoming, String>> {
        let (first, binaries) = self.dealer.recv()?;
        Some(wire::decode_command(first, binaries))
    }

    /// Waits, at most `timeout`, for the `PONG` answering the `PING` of
    /// `reference`: the transmitter has then read everything sent before
    /// it. Whatever else arrives meanwhile is dropped: after our `GBYE`
    /// the transmitter redelivers what this cell held.
    fn await_pong(&mut self, reference: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush_outbox();
            while let Some(message) = self.recv() {
                if let Ok(Incoming::Pong {
                    reference: Some(r), ..
                }) = message
                {
                    if r == reference {
                        return true;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if self.wait_blocking(deadline - now).is_err() {
                return false;
            }
        }
    }

    /// Queues what a closing cell says last: its batched acks, then GBYE.
    fn say_goodbye(&mut self) {
        self.flush_acks();
        self.send(vec![wire::goodbye("close")]);
    }

    /// Leaves: the last acks, GBYE and a PING if we are the ones closing,
    /// fail what waits, wait (at most [`CLOSE_TIMEOUT`]) for the PING's
    /// PONG, which proves the transmitter read the rest; dropping the
    /// connection then closes the sockets and answers `close()`.
    fn finish(mut self) {
        let stop = self.stop.take().unwrap_or(Stop::Closed);
        let last_ping = matches!(stop, Stop::Closed).then(|| {
            self.say_goodbye();
            let reference = self.link.next_ref();
            self.send(vec![wire::ping(Some(reference))]);
            self.flush_outbox();
            reference
        });
        let why = match &stop {
            Stop::Closed => "the client was closed".to_owned(),
            Stop::TransmitterLeft(reason) => format!(
                "the transmitter said goodbye ({})",
                reason.as_deref().unwrap_or("no reason")
            ),
            Stop::Failed(e) => format!("the connection failed: {e}"),
        };
        let gone = || Error::new(ErrorKind::Disconnected, why.clone());
        for (_, p) in self.pending.drain() {
            match p {
                Pending::Call { answer, .. } => answer.fail(gone()),
                Pending::Flush { reply } => {
                    let _ = reply.send(Err(gone()));
                }
                _ => {}
            }
        }
        for (_, w) in self.wire.drain() {
            for (_, reply) in w.waiters {
                let _ = reply.send(Err(gone()));
            }
        }
        for (_, m) in std::mem::take(&mut self.members) {
            if let Some(ready) = m.ready {
                let _ = ready.send(Err(gone()));
            }
        }
        // Ends every subscription's stream.
        self.subs.clear();
        // Refuse further commands; queued ones are dropped, so their
        // callers see `Disconnected`.
        self.rx.commands.close();
        while let Ok(command) = self.rx.commands.try_recv() {
            drop(command);
        }
        if let Some(reference) = last_ping {
            if !self.await_pong(reference, CLOSE_TIMEOUT) {
                debug!("no PONG before closing: the last acks and GBYE may be lost");
            }
        }
        self.left = true;
        debug!("connection stopped");
    }
}

impl Drop for Conn {
    /// Whether or not `finish` ran (a task dropped with its runtime does
    /// not): says goodbye if nobody did, writing it at once (what the
    /// socket takes without waiting), closes the DEALER, and answers
    /// `close()`.
    fn drop(&mut self) {
        if !self.left {
            self.say_goodbye();
            self.flush_outbox();
            self.dealer.flush();
        }
        self.dealer.close();
        for reply in self.close_replies.drain(..) {
            let _ = reply.send(());
        }
    }
}
