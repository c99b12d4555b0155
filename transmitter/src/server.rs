//! The router thread: owns the sockets, feeds the [`Router`], sends what it
//! produces.
//!
//! One thread owns the command socket (a ZMTP ROUTER of our own,
//! [`CommandSocket`]) and libzmq's XPUB event socket, polls both with the
//! poll timeout as its clock, and runs the state machine synchronously.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thynapse_protocol::frame::SYNC_TOPIC;
use thynapse_protocol::limits::{SLOW_CONSUMER_MS, ZAP_DOMAIN};
use thynapse_protocol::Thid;

use std::collections::HashMap;

use crate::auth::{self, Gate, MESH_USER};
use crate::coalesce::coalesce;
use crate::command_socket::{self, CommandSocket, SendError};
use crate::config::{Config, DEFAULT_HWM, LINGER, MESH_HWM, TICK};
use crate::mesh::{self, MeshError, MeshSettings, NodeRecord};
use crate::metrics::Metrics;
use crate::router::{Output, PeerId, Router};

/// Most messages taken from one socket before the others get a turn.
const BATCH: usize = 512;
/// Outputs gathered before they are sent, while more messages are ready.
const FLUSH_AT: usize = 1024;

/// Why a transmitter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket could not be created, configured or bound.
    #[error("cannot {what} {endpoint}: {source}")]
    Socket {
        /// What was attempted.
        what: &'static str,
        /// The endpoint concerned.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// The command socket could not listen.
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        /// The endpoint concerned.
        endpoint: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The mesh could not start.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// Settings that do not go together.
    #[error("{0}")]
    Config(&'static str),
}

/// How long messages wait for a transmitter that is not in the view yet.
const UNSEEN_WAIT: Duration = Duration::from_secs(5);
/// Most messages kept for one such transmitter.
const UNSEEN_MAX: usize = 10_000;

/// Where the router thread and the mesh thread talk.
const MESH_PAIR: &str = "inproc://thynapse-mesh";

/// A running transmitter. Dropping it shuts it down.
#[derive(Debug)]
pub struct Transmitter {
    /// The transmitter's THID.
    id: Thid,
    /// Resolved endpoint of the command socket.
    command_endpoint: String,
    /// Resolved endpoint of the event socket.
    event_endpoint: String,
    /// Counters shared with the router thread.
    metrics: Arc<Metrics>,
    /// Raised to ask the router thread to shut down.
    stop: Arc<AtomicBool>,
    /// The router thread.
    thread: Option<JoinHandle<()>>,
    /// The ZAP thread, when a token is set; it ends with the context.
    zap: Option<JoinHandle<()>>,
    /// The mesh thread, when gossip runs; it ends with the stop flag.
    mesh: Option<JoinHandle<()>>,
}

fn socket_err<'a>(
    what: &'static str,
    endpoint: &'a str,
) -> impl FnOnce(zmq::Error) -> StartError + 'a {
    move |source| StartError::Socket {
        what,
        endpoint: endpoint.to_owned(),
        source,
    }
}

/// libzmq spells "any free port" as `*`; accept the usual `:0` too.
fn bind_spelling(endpoint: &str) -> String {
    match endpoint.strip_suffix(":0") {
        Some(host) if endpoint.starts_with("tcp://") => format!("{host}:*"),
        _ => endpoint.to_owned(),
    }
}

/// Binds `socket` to `endpoint` and returns the endpoint actually bound.
fn bind(socket: &zmq::Socket, endpoint: &str) -> Result<String, StartError> {
    socket
        .bind(&bind_spelling(endpoint))
        .map_err(socket_err("bind", endpoint))?;
    Ok(socket
        .get_last_endpoint()
        .map_err(socket_err("resolve", endpoint))?
        .unwrap_or_else(|_| endpoint.to_owned()))
}

/// The endpoint peers should connect to: the advertised one, or the bound
/// one with a wildcard host replaced by loopback.
fn announced(bound: &str, advertise: Option<&str>) -> String {
    if let Some(a) = advertise {
        return a.to_owned();
    }
    if bound.contains("0.0.0.0") {
        tracing::warn!(
            endpoint = bound,
            "socket bound to 0.0.0.0 without --advertise; announcing 127.0.0.1"
        );
        return bound.replace("0.0.0.0", "127.0.0.1");
    }
    bound.to_owned()
}

impl Transmitter {
    /// Binds both sockets and starts the router thread.
    ///
    /// # Errors
    /// [`StartError`] when a socket cannot be created or bound.
    pub fn start(config: Config) -> Result<Transmitter, StartError> {
        if config.mesh_secret.is_some() && config.token.is_none() {
            return Err(StartError::Config(
                "a mesh secret needs a token: both sockets then authenticate with PLAIN",
            ));
        }
        let ctx = zmq::Context::new();
        let stop = Arc::new(AtomicBool::new(false));
        let zap = match &config.token {
            Some(token) => Some(
                auth::start(
                    &ctx,
                    token.clone(),
                    config.mesh_secret.clone(),
                    stop.clone(),
                )
                .map_err(socket_err("bind", auth::ZAP_ENDPOINT))?,
            ),
            None => None,
        };
        let listen_err = |source| StartError::Listen {
            endpoint: config.command.clone(),
            source,
        };
        let commands = CommandSocket::bind(
            &config.command,
            command_socket::Settings {
                max_frame: config.max_frame,
                hwm: DEFAULT_HWM as usize,
                gate: config
                    .token
                    .clone()
                    .map(|t| Gate::new(t, config.mesh_secret.clone())),
            },
            MAX_FRAMES,
        )
        .map_err(listen_err)?;
        let command_endpoint = commands.endpoint().map_err(listen_err)?;
        let events = ctx
            .socket(zmq::XPUB)
            .map_err(socket_err("create", &config.event))?;
        let setup = |s: &zmq::Socket, endpoint: &str| -> Result<(), StartError> {
            let e = socket_err("configure", endpoint);
            let result = (|| {
                s.set_maxmsgsize(config.max_frame as i64)?;
                s.set_sndhwm(DEFAULT_HWM)?;
                s.set_rcvhwm(DEFAULT_HWM)?;
                s.set_linger(LINGER.as_millis() as i32)?;
                if config.token.is_some() {
                    s.set_zap_domain(ZAP_DOMAIN)?;
                    s.set_plain_server(true)?;
                }
                Ok(())
            })();
            result.map_err(e)
        };
        setup(&events, &config.event)?;
        events
            .set_xpub_verbose(true)
            .map_err(socket_err("configure", &config.event))?;
        let event_endpoint = bind(&events, &config.event)?;
        let id = Thid::random();
        let metrics = Arc::new(Metrics::default());
        let router = Router::new(
            id,
            announced(&event_endpoint, config.advertise.as_deref()),
            &config,
            metrics.clone(),
        );
        let (pair, mesh) = if config.mesh {
            let pair = ctx
                .socket(zmq::PAIR)
                .map_err(socket_err("create", MESH_PAIR))?;
            pair.bind(MESH_PAIR)
                .map_err(socket_err("bind", MESH_PAIR))?;
            let command = announced(&command_endpoint, None);
            let settings = MeshSettings {
                id,
                gossip: mesh::gossip_addr(&command)?,
                command,
                join: config.join.clone(),
                secret: config.mesh_secret.clone(),
            };
            let thread = mesh::start(&ctx, MESH_PAIR, settings, stop.clone())?;
            (Some(pair), Some(thread))
        } else {
            (None, None)
        };
        // The router thread waits in the command socket's poll: the
        // XPUB's and the mesh PAIR's `ZMQ_FD`s wait there too.
        let mut commands = commands;
        let fd = events
            .get_fd()
            .map_err(socket_err("watch", &event_endpoint))?;
        let events_signal = commands.watch(fd).map_err(listen_err)?;
        let mesh_signal = match &pair {
            Some(pair) => {
                let fd = pair.get_fd().map_err(socket_err("watch", MESH_PAIR))?;
                commands.watch(fd).map_err(listen_err)?
            }
            None => 0,
        };
        let switchboard = Switchboard {
            router,
            commands,
            events,
            mesh: pair,
            events_signal,
            mesh_signal,
            events_due: true,
            mesh_due: true,
            nodes: HashMap::new(),
            ctx: ctx.clone(),
            node_password: config.mesh_secret.clone().or(config.token.clone()),
            mesh_policy: match (config.mesh, &config.mesh_secret) {
                (false, _) => MeshPolicy::Off,
                (true, None) => MeshPolicy::Open,
                (true, Some(_)) => MeshPolicy::Authenticated,
            },
            out: Vec::with_capacity(BATCH),
            sending: Vec::with_capacity(BATCH),
            stuck: HashMap::new(),
            unseen: HashMap::new(),
        };
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("thynapse-router".into())
                .spawn(move || {
                    switchboard.run(&stop);
                    drop(ctx);
                })
                .expect("spawning a thread at startup")
        };
        tracing::info!(%id, command = %command_endpoint, event = %event_endpoint, auth = config.token.is_some(), "transmitter started");
        Ok(Transmitter {
            id,
            command_endpoint,
            event_endpoint,
            metrics,
            stop,
            thread: Some(thread),
            zap,
            mesh,
        })
    }

    /// The transmitter's THID.
    pub fn id(&self) -> Thid {
        self.id
    }

    /// The command socket's bound endpoint (port resolved).
    pub fn command_endpoint(&self) -> &str {
        &self.command_endpoint
    }

    /// The event socket's bound endpoint (port resolved).
    pub fn event_endpoint(&self) -> &str {
        &self.event_endpoint
    }

    /// The transmitter's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A flag that, once raised, makes the transmitter shut down (for
    /// signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Says GBYE to every cell, flushes, closes the sockets and waits for
    /// the router thread. Calling it twice is harmless.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wait();
    }

    /// Waits until the transmitter has stopped (after the stop flag rose).
    pub fn wait(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(m) = self.mesh.take() {
            let _ = m.join();
        }
        if let Some(z) = self.zap.take() {
            let _ = z.join();
        }
    }
}

impl Drop for Transmitter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Who may send mesh verbs (MDLV, MACK, MEVT, MRPL).
#[derive(Debug, Clone, Copy)]
enum MeshPolicy {
    /// Nobody: this transmitter runs alone.
    Off,
    /// Any connection that has not said HELO (no mesh secret is set).
    Open,
    /// Connections that authenticated as user `mesh` with the secret.
    Authenticated,
}

/// What the router thread owns: the sockets and the router.
struct Switchboard {
    router: Router,
    /// The ROUTER command socket.
    commands: CommandSocket,
    /// The XPUB event socket.
    events: zmq::Socket,
    /// The PAIR socket to the mesh thread, when gossip runs.
    mesh: Option<zmq::Socket>,
    /// The bit of the XPUB's `ZMQ_FD` in what the command socket's poll
    /// reports.
    events_signal: u32,
    /// The same for the mesh PAIR (0 without the mesh).
    mesh_signal: u32,
    /// The XPUB may hold subscriptions to read: its `ZMQ_FD` had an edge,
    /// or a send may have taken one (any libzmq call on a socket may
    /// process the commands its `ZMQ_FD` signals).
    events_due: bool,
    /// The same for the mesh PAIR.
    mesh_due: bool,
    /// A DEALER to each other transmitter's command socket.
    nodes: HashMap<Thid, (String, zmq::Socket)>,
    /// For creating node DEALERs.
    ctx: zmq::Context,
    /// PLAIN password for node DEALERs (the mesh secret, else the token).
    node_password: Option<String>,
    /// Who may send mesh verbs.
    mesh_policy: MeshPolicy,
    /// Outputs waiting to be sent.
    out: Vec<Output>,
    /// The outputs being sent, while sending them makes more in `out`;
    /// kept between flushes so that flushing allocates nothing.
    sending: Vec<Output>,
    /// Messages for transmitters not in our view yet (one that saw us
    /// first may forward to us before we see it), with when the first came.
    unseen: HashMap<Thid, (Instant, Vec<Output>)>,
    /// Cells whose queue is full, since when: past
    /// [`SLOW_CONSUMER_MS`] they are disconnected.
    stuck: HashMap<PeerId, Instant>,
}

impl Switchboard {
    /// The router thread's loop.
    fn run(mut self, stop: &AtomicBool) {
        let mut next_tick = Instant::now() + TICK;
        let mut busy = false;
        while !stop.load(Ordering::Relaxed) {
            // One wait for everything: the command socket's connections
            // and the libzmq sockets' `ZMQ_FD`s share its epoll.
            let timeout = if busy || self.commands.has_input() || self.events_due || self.mesh_due {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            let signalled = self.commands.poll(timeout);
            self.events_due |= signalled & self.events_signal != 0;
            self.mesh_due |= signalled & self.mesh_signal != 0;
            // What is ready is handled first and sent together (up to
            // FLUSH_AT outputs), so that deliveries to one cell can share
            // a frame.
            busy = false;
            for _ in 0..BATCH {
                let Some(message) = self.commands.recv() else {
                    break;
                };
                busy = true;
                handle(
                    &mut self.router,
                    &message,
                    self.mesh_policy,
                    Instant::now(),
                    &mut self.out,
                );
                if self.out.len() >= FLUSH_AT {
                    self.flush();
                }
            }
            self.flush();
            self.read_subscriptions();
            self.receive_view();
            let now = Instant::now();
            if now >= next_tick {
                self.router.tick(now, &mut self.out);
                self.flush();
                self.commands.tick(now);
                self.expire_unseen(now);
                if let (Some(m), Some(view)) = (&self.mesh, self.router.take_local_view()) {
                    let _ = m.send(view.as_bytes(), zmq::DONTWAIT);
                    self.mesh_due = true;
                }
                next_tick = now + TICK;
            }
        }
        self.router.shutdown(&mut self.out);
        self.flush();
        self.commands.linger(Instant::now() + LINGER);
        tracing::info!(
            cells = self.router.cell_count(),
            in_flight = self.router.in_flight_count(),
            "transmitter stopped"
        );
    }

    /// Answers the subscriptions the XPUB holds, at most [`BATCH`] a
    /// turn; once it is empty, its next `ZMQ_FD` edge says when to look
    /// again.
    fn read_subscriptions(&mut self) {
        if !self.events_due {
            return;
        }
        self.events_due = false;
        for _ in 0..BATCH {
            match self.events.recv_bytes(zmq::DONTWAIT) {
                Ok(sub) => self.answer_subscription(&sub),
                Err(_) => return,
            }
        }
        self.events_due = true;
    }

    /// Takes the latest mesh view, if one came, and opens or closes the
    /// DEALERs to other transmitters to match it.
    fn receive_view(&mut self) {
        if !std::mem::take(&mut self.mesh_due) {
            return;
        }
        let Some(mesh) = &self.mesh else { return };
        let mut latest = None;
        while let Ok(view) = mesh.recv_bytes(zmq::DONTWAIT) {
            latest = Some(view);
        }
        let Some(view) = latest else { return };
        let nodes: Vec<NodeRecord> = match serde_json::from_slice(&view) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable mesh view");
                return;
            }
        };
        self.router.set_view(nodes, Instant::now(), &mut self.out);
        let wanted: HashMap<Thid, String> = self
            .router
            .nodes()
            .map(|(id, cmd)| (*id, cmd.to_owned()))
            .collect();
        self.nodes.retain(|id, (cmd, _)| {
            let keep = wanted.get(id).is_some_and(|w| w == cmd);
            if !keep {
                tracing::info!(node = %id, "transmitter left the view");
            }
            keep
        });
        for (id, cmd) in wanted {
            if self.nodes.contains_key(&id) {
                continue;
            }
            match self.node_socket(&cmd) {
                Ok(socket) => {
                    tracing::info!(node = %id, command = %cmd, "transmitter joined the view");
                    self.nodes.insert(id, (cmd, socket));
                    if let Some((_, held)) = self.unseen.remove(&id) {
                        self.out.extend(held);
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %id, command = %cmd, error = %e, "cannot reach transmitter")
                }
            }
        }
        self.flush();
    }

    /// Keeps a message for a transmitter we do not see yet, for at most
    /// [`UNSEEN_WAIT`] and [`UNSEEN_MAX`] messages.
    fn hold_for_unseen(&mut self, node: Thid, o: Output) {
        let (_, held) = self
            .unseen
            .entry(node)
            .or_insert_with(|| (Instant::now(), Vec::new()));
        if held.len() < UNSEEN_MAX {
            held.push(o);
        } else {
            Metrics::incr(&self.router.metrics().dropped_hwm);
        }
    }

    /// Drops what waited too long for a transmitter that never appeared.
    fn expire_unseen(&mut self, now: Instant) {
        let metrics = self.router.metrics();
        self.unseen.retain(|_, (since, held)| {
            let keep = now.duration_since(*since) < UNSEEN_WAIT;
            if !keep {
                for _ in held.iter() {
                    Metrics::incr(&metrics.dropped_hwm);
                }
            }
            keep
        });
    }

    /// A DEALER to another transmitter's command socket.
    fn node_socket(&self, endpoint: &str) -> Result<zmq::Socket, zmq::Error> {
        let s = self.ctx.socket(zmq::DEALER)?;
        s.set_sndhwm(MESH_HWM)?;
        s.set_rcvhwm(DEFAULT_HWM)?;
        s.set_linger(0)?;
        if let Some(password) = &self.node_password {
            s.set_plain_username(Some(MESH_USER))?;
            s.set_plain_password(Some(password))?;
        }
        s.connect(endpoint)?;
        Ok(s)
    }

    /// A subscription frame is `\x01topic` (subscribe) or `\x00topic`. A new
    /// `SYNC <token>` subscription is answered at once with a `SYNC <token>`
    /// frame, proving to the cell that its earlier subscriptions arrived.
    fn answer_subscription(&mut self, sub: &[u8]) {
        if let [1, topic @ ..] = sub {
            if topic.starts_with(SYNC_TOPIC) {
                let _ = self.events.send(topic, zmq::DONTWAIT);
                self.events_due = true;
                Metrics::incr(&self.router.metrics().syncs);
            }
        }
    }

    /// Sends every pending output; unreachable cells are reported back to
    /// the router, full queues are counted.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            let mut batch = std::mem::take(&mut self.sending);
            let router = &self.router;
            coalesce(&mut self.out, &mut batch, |dest| match dest {
                Ok(peer) => router.batching(peer),
                Err(node) => router.node_batching(node),
            });
            for o in batch.drain(..) {
                let (frame, binaries, packed) = (o.frame(), o.binaries(), o.packed());
                let peer = match &o {
                    Output::ToPeer { peer, .. }
                    | Output::Multicatch { peer, .. }
                    | Output::Batch { peer, .. } => peer,
                    Output::Publish { .. } => {
                        if send(&self.events, frame, binaries, false).is_err() {
                            Metrics::incr(&self.router.metrics().dropped_hwm);
                        }
                        self.events_due = true;
                        continue;
                    }
                    Output::ToNode { node, .. } | Output::NodeBatch { node, .. } => {
                        match self.nodes.get(node) {
                            Some((_, s)) => {
                                if send(s, frame, binaries, packed).is_err() {
                                    Metrics::incr(&self.router.metrics().dropped_hwm);
                                }
                            }
                            None => self.hold_for_unseen(*node, o),
                        }
                        continue;
                    }
                };
                match self.commands.send(peer, frame, binaries, packed) {
                    Ok(()) => {
                        if !self.stuck.is_empty() {
                            self.stuck.remove(&peer[..]);
                        }
                    }
                    Err(SendError::Unreachable) => {
                        self.router
                            .peer_unreachable(peer, Instant::now(), &mut self.out);
                    }
                    Err(SendError::Full) => {
                        let metrics = self.router.metrics();
                        Metrics::incr(&metrics.dropped_hwm);
                        match &o {
                            Output::Multicatch { .. } => Metrics::incr(&metrics.dropped_multicatch),
                            Output::Batch {
                                merged,
                                multicatch: true,
                                ..
                            } => Metrics::add(&metrics.dropped_multicatch, merged.count),
                            _ => {}
                        }
                        let now = Instant::now();
                        let since = *self.stuck.entry(peer.clone()).or_insert(now);
                        if now.duration_since(since) > Duration::from_millis(SLOW_CONSUMER_MS) {
                            self.stuck.remove(&peer[..]);
                            self.router.slow_consumer(peer, now, &mut self.out);
                        }
                    }
                }
            }
            self.sending = batch;
        }
        self.commands.write_all();
    }
}

/// Most frames of one incoming message kept: the command and a binary
/// frame for each event of the largest batch.
const MAX_FRAMES: usize = 1 + crate::coalesce::MAX_ITEMS as usize;

/// Hands a message to the router, saying whether the peer may send mesh
/// verbs under `mesh_policy`.
fn handle(
    router: &mut Router,
    message: &command_socket::Message<'_>,
    mesh_policy: MeshPolicy,
    now: Instant,
    out: &mut Vec<Output>,
) {
    let mesh_ok = match mesh_policy {
        MeshPolicy::Off => false,
        MeshPolicy::Open => true,
        MeshPolicy::Authenticated => message.user == Some(MESH_USER),
    };
    let command = message.frame(0);
    if command.starts_with(b"J HELO") || command.starts_with(b"HELO") {
        // The cell's `host` metadata: where its connection comes from.
        router.note_address(message.peer, message.address);
    }
    let peer = message.peer;
    match message.count {
        1 => router.handle(peer, &[command], mesh_ok, now, out),
        2 => router.handle(peer, &[command, message.frame(1)], mesh_ok, now, out),
        n => {
            // Frames past MAX_FRAMES were not kept: empty stand-ins, so the
            // router refuses the message by its count.
            let all: Vec<&[u8]> = (0..n).map(|i| message.frame(i)).collect();
            router.handle(peer, &all, mesh_ok, now, out)
        }
    }
}

/// Sends one message on a libzmq socket: the command frame, then its
/// binary frames, or, `packed`, their bytes in one frame (PROTOCOL.md §23).
fn send(
    socket: &zmq::Socket,
    frame: &[u8],
    binaries: &[Arc<[u8]>],
    packed: bool,
) -> Result<(), zmq::Error> {
    let more = |last: bool| {
        if last {
            zmq::DONTWAIT
        } else {
            zmq::SNDMORE | zmq::DONTWAIT
        }
    };
    if packed {
        let mut one = zmq::Message::with_size(binaries.iter().map(|b| b.len()).sum());
        let mut at = 0;
        for b in binaries {
            one[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        socket.send(frame, more(false))?;
        return socket.send(one, more(true));
    }
    socket.send(frame, more(binaries.is_empty()))?;
    for (i, b) in binaries.iter().enumerate() {
        socket.send(&b[..], more(i + 1 == binaries.len()))?;
    }
    Ok(())
}
