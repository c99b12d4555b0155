//! The router thread: owns the sockets, feeds the [`Router`], sends what it
//! produces.
//!
//! libzmq sockets are not thread-safe and their API blocks, so one thread
//! owns the ROUTER command socket and the XPUB event socket, polls both with
//! the poll timeout as its clock, and runs the state machine synchronously.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use thynapse_protocol::frame::SYNC_TOPIC;
use thynapse_protocol::limits::ZAP_DOMAIN;
use thynapse_protocol::Thid;

use crate::auth;
use crate::config::{Config, DEFAULT_HWM, LINGER, TICK};
use crate::metrics::Metrics;
use crate::router::{Output, Router};

/// Most messages taken from one socket before the others get a turn.
const BATCH: usize = 512;

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
}

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

/// The endpoint cells should connect their SUB to: the advertised one, or
/// the bound one with a wildcard host replaced by loopback.
fn announced(bound: &str, advertise: Option<&str>) -> String {
    if let Some(a) = advertise {
        return a.to_owned();
    }
    if bound.contains("0.0.0.0") {
        tracing::warn!(
            endpoint = bound,
            "event socket bound to 0.0.0.0 without --advertise; announcing 127.0.0.1"
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
        let ctx = zmq::Context::new();
        let zap = match &config.token {
            Some(token) => Some(
                auth::start(&ctx, token.clone()).map_err(socket_err("bind", auth::ZAP_ENDPOINT))?,
            ),
            None => None,
        };
        let commands = ctx
            .socket(zmq::ROUTER)
            .map_err(socket_err("create", &config.command))?;
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
        setup(&commands, &config.command)?;
        setup(&events, &config.event)?;
        commands
            .set_router_mandatory(true)
            .map_err(socket_err("configure", &config.command))?;
        events
            .set_xpub_verbose(true)
            .map_err(socket_err("configure", &config.event))?;
        let command_endpoint = bind(&commands, &config.command)?;
        let event_endpoint = bind(&events, &config.event)?;
        let id = Thid::random();
        let metrics = Arc::new(Metrics::default());
        let router = Router::new(
            id,
            announced(&event_endpoint, config.advertise.as_deref()),
            &config,
            metrics.clone(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("thynapse-router".into())
                .spawn(move || {
                    run(router, commands, events, &stop);
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

/// The router thread's loop.
fn run(mut router: Router, commands: zmq::Socket, events: zmq::Socket, stop: &AtomicBool) {
    let mut out = Vec::with_capacity(BATCH);
    let mut inbox = Inbox::default();
    let mut next_tick = Instant::now() + TICK;
    while !stop.load(Ordering::Relaxed) {
        let timeout = next_tick
            .saturating_duration_since(Instant::now())
            .as_millis() as i64;
        let mut items = [
            commands.as_poll_item(zmq::POLLIN),
            events.as_poll_item(zmq::POLLIN),
        ];
        if zmq::poll(&mut items, timeout).is_err() {
            break;
        }
        for _ in 0..BATCH {
            let now = Instant::now();
            match inbox.recv(&commands) {
                Ok(()) => inbox.handle(&mut router, now, &mut out),
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "command socket receive failed");
                    break;
                }
            }
            flush(&mut router, &commands, &events, &mut out);
        }
        for _ in 0..BATCH {
            match events.recv_bytes(zmq::DONTWAIT) {
                Ok(sub) => answer_subscription(&sub, &events, &router),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            router.tick(now, &mut out);
            flush(&mut router, &commands, &events, &mut out);
            next_tick = now + TICK;
        }
    }
    router.shutdown(&mut out);
    flush(&mut router, &commands, &events, &mut out);
    tracing::info!(
        cells = router.cell_count(),
        in_flight = router.in_flight_count(),
        "transmitter stopped"
    );
}

/// Reusable buffers for one incoming message: the routing id, the command
/// frame, the optional binary frame, and a count of any further frames
/// (which make the message malformed). Receiving allocates nothing.
struct Inbox {
    parts: [zmq::Message; 3],
    count: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            parts: [
                zmq::Message::new(),
                zmq::Message::new(),
                zmq::Message::new(),
            ],
            count: 0,
        }
    }
}

impl Inbox {
    /// Receives one whole message without blocking.
    fn recv(&mut self, socket: &zmq::Socket) -> Result<(), zmq::Error> {
        socket.recv(&mut self.parts[0], zmq::DONTWAIT)?;
        self.count = 1;
        let mut more = self.parts[0].get_more();
        while more {
            if self.count < self.parts.len() {
                socket.recv(&mut self.parts[self.count], 0)?;
                more = self.parts[self.count].get_more();
            } else {
                let mut extra = zmq::Message::new();
                socket.recv(&mut extra, 0)?;
                more = extra.get_more();
            }
            self.count += 1;
        }
        Ok(())
    }

    /// Hands the message to the router.
    fn handle(&self, router: &mut Router, now: Instant, out: &mut Vec<Output>) {
        let [peer, command, binary] = &self.parts;
        match self.count {
            1 => router.handle(peer, &[], now, out),
            2 => router.handle(peer, &[command], now, out),
            3 => router.handle(peer, &[command, binary], now, out),
            n => {
                let filler: Vec<&[u8]> = vec![&[][..]; n - 1];
                router.handle(peer, &filler, now, out)
            }
        }
    }
}

/// A subscription frame is `\x01topic` (subscribe) or `\x00topic`. A new
/// `SYNC <token>` subscription is answered at once with a `SYNC <token>`
/// frame, proving to the cell that its earlier subscriptions arrived.
fn answer_subscription(sub: &[u8], events: &zmq::Socket, router: &Router) {
    if let [1, topic @ ..] = sub {
        if topic.starts_with(SYNC_TOPIC) {
            let _ = events.send(topic, zmq::DONTWAIT);
            Metrics::incr(&router.metrics().syncs);
        }
    }
}

/// Sends every pending output; unreachable cells are reported back to the
/// router, full queues are counted.
fn flush(router: &mut Router, commands: &zmq::Socket, events: &zmq::Socket, out: &mut Vec<Output>) {
    while !out.is_empty() {
        let batch = std::mem::take(out);
        for o in batch {
            let sent = match &o {
                Output::ToPeer {
                    peer,
                    frame,
                    binary,
                } => send(commands, Some(peer), frame, binary.as_deref()),
                Output::Publish { frame, binary } => send(events, None, frame, binary.as_deref()),
            };
            match sent {
                Ok(()) => {}
                Err(zmq::Error::EHOSTUNREACH) => {
                    if let Output::ToPeer { peer, .. } = &o {
                        router.peer_unreachable(peer, Instant::now(), out);
                    }
                }
                Err(_) => Metrics::incr(&router.metrics().dropped_hwm),
            }
        }
    }
}

fn send(
    socket: &zmq::Socket,
    peer: Option<&[u8]>,
    frame: &[u8],
    binary: Option<&Vec<u8>>,
) -> Result<(), zmq::Error> {
    if let Some(p) = peer {
        socket.send(p, zmq::SNDMORE | zmq::DONTWAIT)?;
    }
    match binary {
        Some(b) => {
            socket.send(frame, zmq::SNDMORE | zmq::DONTWAIT)?;
            socket.send(b.as_slice(), zmq::DONTWAIT)
        }
        None => socket.send(frame, zmq::DONTWAIT),
    }
}
