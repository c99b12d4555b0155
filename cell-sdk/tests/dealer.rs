//! The SDK's own ZMTP 3 DEALER (src/dealer.rs) on real loopback sockets,
//! for what the other SDK tests do not already show: ZMTP heartbeats
//! answered, connecting before anything listens, malformed endpoints,
//! frames far larger than one read, a connection cut and a transmitter
//! that comes back after refused attempts, a peer that is not ZMTP, a
//! transmitter whose bytes arrive one at a time, a frame header over the
//! size limit, a close right behind a message, and a connection lost
//! between HELO and WLCM.
//!
//! Every test starts its own transmitter, scripted ROUTER or raw TCP peer
//! on port 0 (or on a port found free), has a watchdog, and waits on
//! replies or polls with a deadline instead of sleeping.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use thynapse_cell::{Client, ErrorKind, Mode, Options};
use thynapse_protocol::zmtp::{self, Mechanism, GREETING_LEN};

/// The WLCM of a scripted transmitter: heartbeat 60 s, so the cell sends
/// no PING of its own for the length of a test.
fn welcome(reference: &Value) -> String {
    format!(
        r#"J WLCM {{"id":"{}","pub":"tcp://127.0.0.1:1","heartbeat_ms":60000,"limits":{{"max_frame":1048576,"ack_timeout_ms":30000}},"ref":{reference}}}"#,
        "ab".repeat(20)
    )
}

/// A protocol command's verb and JSON body (`J VERB {...}`).
fn parse_command(frame: &[u8]) -> (String, Value) {
    let text = std::str::from_utf8(frame).expect("UTF-8 command");
    let verb = text.get(2..6).expect("a verb").to_owned();
    let body = serde_json::from_str(text[6..].trim()).expect("JSON body");
    (verb, body)
}

/// Re-raises the panic of a script thread in the test.
async fn join_script<T: Send + 'static>(script: JoinHandle<T>) -> T {
    tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || script.join()))
        .await
        .expect("the script ends")
        .unwrap()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// ---------------------------------------------------------------------
// 1. ZMTP heartbeats from a libzmq ROUTER.

/// What the heartbeating ROUTER saw of the cell.
#[derive(Debug, Default)]
struct RouterSaw {
    helos: usize,
    pings: usize,
}

/// Plays a transmitter on a ROUTER that sends ZMTP PINGs: welcomes HELOs,
/// answers PINGs, forwards its monitor's events to `events`, and ends
/// after the cell's GBYE and closing PING.
fn heartbeating_router(
    router: zmq::Socket,
    monitor: zmq::Socket,
    events: tokio::sync::mpsc::UnboundedSender<zmq::SocketEvent>,
) -> RouterSaw {
    let mut saw = RouterSaw::default();
    let mut leaving = false;
    loop {
        let mut items = [
            router.as_poll_item(zmq::POLLIN),
            monitor.as_poll_item(zmq::POLLIN),
        ];
        let n = zmq::poll(&mut items, 10_000).unwrap();
        assert!(n > 0, "nothing from the cell or the monitor for 10 s");
        let (from_cell, from_monitor) = (items[0].is_readable(), items[1].is_readable());
        if from_monitor {
            let event = monitor.recv_multipart(0).unwrap();
            let raw = u16::from_ne_bytes([event[0][0], event[0][1]]);
            let _ = events.send(zmq::SocketEvent::from_raw(raw));
        }
        if !from_cell {
            continue;
        }
        let frames = router.recv_multipart(0).unwrap();
        let (verb, body) = parse_command(&frames[1]);
        let answer = match verb.as_str() {
            "HELO" => {
                saw.helos += 1;
                welcome(&body["ref"])
            }
            "PING" => {
                saw.pings += 1;
                format!(r#"J PONG {{"ref":{}}}"#, body["ref"])
            }
            "GBYE" => {
                leaving = true;
                continue;
            }
            other => panic!("unexpected {other} {body}"),
        };
        router
            .send_multipart([frames[0].as_slice(), answer.as_bytes()], 0)
            .unwrap();
        if leaving && verb == "PING" {
            return saw;
        }
    }
}

/// libzmq's ROUTER with `ZMQ_HEARTBEAT_IVL` 100 ms and
/// `ZMQ_HEARTBEAT_TIMEOUT` 300 ms drops a peer that does not answer its
/// ZMTP PINGs within 300 ms. The cell, welcomed with a 60 s heartbeat,
/// sends nothing of its own for 1.5 s: only its PONGs keep the connection.
/// It is the same connection throughout: one TCP accept, one handshake,
/// one HELO, no disconnect; a flush after it still round-trips.
#[tokio::test]
async fn zmtp_pings_from_a_heartbeating_router_are_answered_and_the_connection_kept() {
    watchdog(async {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.set_heartbeat_ivl(100).unwrap();
        router.set_heartbeat_timeout(300).unwrap();
        router.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = router.get_last_endpoint().unwrap().unwrap();
        router
            .monitor(
                "inproc://dealer-heartbeat-monitor",
                zmq::SocketEvent::ALL as i32,
            )
            .unwrap();
        let monitor = ctx.socket(zmq::PAIR).unwrap();
        monitor
            .connect("inproc://dealer-heartbeat-monitor")
            .unwrap();
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let script = std::thread::spawn(move || heartbeating_router(router, monitor, events_tx));

        let cell = Client::connect(&endpoint, Options::new("hb"))
            .await
            .expect("welcomed");
        // The ROUTER's view of the connection so far: accepted, then its
        // ZMTP handshake succeeded (HANDSHAKE_SUCCEEDED comes before the
        // HELO, hence before the WLCM `connect` waited for).
        let mut seen = Vec::new();
        while !seen.contains(&zmq::SocketEvent::HANDSHAKE_SUCCEEDED) {
            let e = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .expect("the ROUTER's handshake event")
                .expect("the monitor is running");
            seen.push(e);
        }
        assert_eq!(
            seen,
            [
                zmq::SocketEvent::ACCEPTED,
                zmq::SocketEvent::HANDSHAKE_SUCCEEDED
            ]
        );

        // 1.5 s, five heartbeat timeouts: the connection must not drop.
        if let Ok(e) = tokio::time::timeout(Duration::from_millis(1500), events.recv()).await {
            panic!("the ROUTER saw {e:?} while the cell was idle (its ZMTP PINGs unanswered?)");
        }
        tokio::time::timeout(PATIENCE, cell.flush())
            .await
            .expect("the flush returns")
            .expect("a PING round trip on the kept connection");
        assert!(
            events.try_recv().is_err(),
            "no new connection for the flush"
        );
        cell.close().await;
        let saw = join_script(script).await;
        assert_eq!(saw.helos, 1, "one HELO: the cell never joined again");
        assert_eq!(saw.pings, 2, "the flush's PING and the closing one");
    })
    .await;
}

// ---------------------------------------------------------------------
// 2. Connecting before the transmitter listens.

/// A loopback port nothing listens on (bound, then freed).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `Client::connect` to a port nothing listens on yet keeps trying (every
/// 100 ms) instead of failing, and is welcomed soon after a transmitter
/// binds that port.
#[tokio::test]
async fn a_connect_started_before_the_transmitter_listens_succeeds_once_it_does() {
    watchdog(async {
        let port = free_port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let options = Options::new("early").connect_timeout(Duration::from_secs(10));
        let mut connecting = tokio::spawn({
            let endpoint = endpoint.clone();
            async move { Client::connect(&endpoint, options).await }
        });
        // Refused attempts for 300 ms: `connect` neither fails nor returns.
        if let Ok(finished) =
            tokio::time::timeout(Duration::from_millis(300), &mut connecting).await
        {
            panic!(
                "connect returned before anything listened: {:?}",
                finished.unwrap().map(|c| c.id())
            );
        }

        let mut cfg = config();
        cfg.command = endpoint.clone();
        let t = start(cfg);
        assert_eq!(t.command_endpoint(), endpoint);
        let listening = Instant::now();
        let c = tokio::time::timeout(PATIENCE, connecting)
            .await
            .expect("connect returns once the transmitter listens")
            .unwrap()
            .expect("welcomed");
        let waited = listening.elapsed();
        assert!(
            waited < Duration::from_millis(1500),
            "welcomed {waited:?} after the transmitter started listening"
        );
        assert_eq!(c.transmitter_id(), t.id());
        eventually("the cell is counted", || metric(&t, "cells") == 1).await;
        c.flush().await.expect("a PING round trip");
    })
    .await;
}

// ---------------------------------------------------------------------
// 3. Malformed endpoints.

/// An endpoint that is not `tcp://host:port` fails `connect` at once with
/// `Io`, naming the endpoint, rather than after the connect timeout.
#[tokio::test]
async fn a_malformed_endpoint_fails_connect_at_once_with_io() {
    watchdog(async {
        for endpoint in [
            "not-an-endpoint",
            "tcp://127.0.0.1",
            "ipc:///tmp/x",
            "tcp://127.0.0.1:port",
            "tcp://127.0.0.1:65536",
            "",
        ] {
            let started = Instant::now();
            let options = Options::new("svc").connect_timeout(Duration::from_secs(10));
            let err = match Client::connect(endpoint, options).await {
                Ok(c) => panic!("{endpoint:?}: connected to {}", c.transmitter_id()),
                Err(e) => e,
            };
            let took = started.elapsed();
            assert_eq!(err.kind(), ErrorKind::Io, "{endpoint:?}: {err}");
            assert!(
                err.message().contains(endpoint),
                "{endpoint:?}: the message names it: {err}"
            );
            assert!(
                took < Duration::from_secs(2),
                "{endpoint:?}: failed after {took:?}, not at once"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------
// 4. Frames larger than a read.

/// A 900 KiB payload whose bytes depend on their position and on `seed`
/// (a shift, a lost or a repeated chunk shows).
fn big_payload(seed: u8) -> Vec<u8> {
    (0..900 * 1024usize)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8 ^ seed)
        .collect()
}

fn small_payload(n: usize) -> Vec<u8> {
    (0..1 + n % 97).map(|i| (i * 13 + n) as u8).collect()
}

/// Two 900 KiB binary events, each followed by 500 small ones, go from a
/// publisher's DEALER (writes that block part way) through a transmitter
/// to an anycatch listener's DEALER (frames over its 256 KiB read size,
/// small frames right behind them in the same reads): all arrive, in
/// order, byte for byte.
#[tokio::test]
async fn frames_far_larger_than_a_read_arrive_intact_with_the_small_ones_behind_them() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        assert!(publisher.limits().max_frame > 900 * 1024 + 4096);
        let mut blobs = worker.listen("blob::*", Mode::Any).await.unwrap();
        const SMALL: usize = 500;

        let mut expected = Vec::new();
        for seed in [0x5a, 0xc3] {
            expected.push(big_payload(seed));
            for n in 0..SMALL {
                expected.push(small_payload(n + usize::from(seed)));
            }
        }
        for (n, bytes) in expected.iter().enumerate() {
            let channel = if bytes.len() > 1000 {
                "blob::big"
            } else {
                "blob::small"
            };
            publisher
                .publish_bytes(channel, bytes.clone())
                .await
                .unwrap();
            if n == 0 {
                // The first big frame alone on the way, then the rest.
                publisher.flush().await.unwrap();
            }
        }
        for (n, bytes) in expected.iter().enumerate() {
            let event = next(&mut blobs).await;
            let got = event.binary().expect("a binary event");
            assert_eq!(got.len(), bytes.len(), "event {n}: length");
            if got != bytes.as_slice() {
                let at = got.iter().zip(bytes).position(|(a, b)| a != b).unwrap();
                panic!("event {n}: differs from byte {at} on");
            }
        }
        worker.flush().await.unwrap();
        assert!(blobs.try_next_event().is_none(), "an extra event");
        eventually("every delivery acked", || {
            metric(&t, "acks") == expected.len() as u64
        })
        .await;
    })
    .await;
}

// ---------------------------------------------------------------------
// A TCP listener on a thread of its own, for the raw peers below.

/// Accepts connections on a loopback port and hands each to `handle`;
/// stops when dropped.
struct Acceptor {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(mut handle: impl FnMut(TcpStream) + Send + 'static) -> Acceptor {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (accepted, stop) = (accepted.clone(), stop.clone());
            move || {
                while let Ok((stream, _)) = listener.accept() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    handle(stream);
                }
            }
        });
        Acceptor {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked `accept`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------
// 5. A connection cut, refused attempts, a new transmitter behind the
// same endpoint.

/// Where a proxy forwards, and the streams it holds open.
#[derive(Default)]
struct ProxyState {
    /// None: connections are closed as soon as they are accepted.
    upstream: Option<SocketAddr>,
    open: Vec<TcpStream>,
}

/// A TCP proxy in front of a transmitter, so the cell's endpoint stays
/// while what is behind it changes (the in-process transmitter says GBYE
/// when it shuts down; a crash would not).
struct Proxy {
    state: Arc<Mutex<ProxyState>>,
    acceptor: Acceptor,
}

fn addr_of(endpoint: &str) -> SocketAddr {
    endpoint
        .strip_prefix("tcp://")
        .expect("a tcp endpoint")
        .parse()
        .unwrap()
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let state = Arc::new(Mutex::new(ProxyState {
            upstream: Some(addr_of(upstream)),
            open: Vec::new(),
        }));
        let acceptor = Acceptor::start({
            let state = state.clone();
            move |cell| {
                let mut state = state.lock().unwrap();
                let Some(up) = state.upstream else {
                    return; // dropped: closed at once
                };
                let server = TcpStream::connect(up).expect("the transmitter behind the proxy");
                let _ = (cell.set_nodelay(true), server.set_nodelay(true));
                state.open.push(cell.try_clone().unwrap());
                state.open.push(server.try_clone().unwrap());
                pipe(cell.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, cell);
            }
        });
        Proxy { state, acceptor }
    }

    /// Cuts every connection (no GBYE) and refuses new ones.
    fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.upstream = None;
        for s in state.open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn forward_to(&self, upstream: &str) {
        self.state.lock().unwrap().upstream = Some(addr_of(upstream));
    }
}

/// A cell's connection is cut (no GBYE); its reconnects are accepted and
/// closed at once, several times; then a fresh transmitter is behind the
/// same endpoint. The cell (one endpoint) connects again, joins the new
/// transmitter, which knew nothing of it, listens again (deliveries
/// reach its old subscription) and a new listen works.
#[tokio::test]
async fn after_a_cut_and_refused_attempts_the_cell_joins_a_new_transmitter_on_the_same_endpoint() {
    watchdog(async {
        // A heartbeat far longer than the test: no PING of the cell learns
        // from its PONG that t2 does not know it, so only the reconnect
        // itself can make it join again.
        let quiet = || {
            let mut cfg = config();
            cfg.heartbeat = Duration::from_secs(60);
            cfg
        };
        let t1 = start(quiet());
        let proxy = Proxy::start(t1.command_endpoint());
        let worker = Client::connect(&proxy.acceptor.endpoint(), Options::new("workers"))
            .await
            .expect("welcomed through the proxy");
        let mut jobs = worker.listen("jobs::*", Mode::Any).await.unwrap();
        let p1 = client(&t1, "api").await;
        let confirm = p1.publish_confirmed("jobs::one", 1).await.unwrap();
        assert_eq!(confirm.routed, 1);
        assert_eq!(next(&mut jobs).await.id(), confirm.id);
        worker.flush().await.unwrap();

        let before = proxy.acceptor.accepted();
        proxy.cut();
        eventually("three reconnects refused", || {
            proxy.acceptor.accepted() >= before + 3
        })
        .await;
        assert!(!worker.is_closed());

        let t2 = start(quiet());
        proxy.forward_to(t2.command_endpoint());
        let p2 = client(&t2, "api").await;
        let deadline = Instant::now() + PATIENCE;
        let confirm = loop {
            match p2.publish_confirmed("jobs::two", 2).await {
                Ok(confirm) => break confirm,
                Err(e) if e.kind() == ErrorKind::NoListeners => {
                    assert!(Instant::now() < deadline, "the cell never listened at t2");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(confirm.routed, 1);
        let e = next(&mut jobs).await;
        assert_eq!((e.id(), e.payload::<u8>().unwrap()), (confirm.id, 2));
        drop(e);

        let mut news = worker.listen("news::*", Mode::Multi).await.unwrap();
        p2.publish("news::today", 3).await.unwrap();
        assert_eq!(next(&mut news).await.payload::<u8>().unwrap(), 3);
        eventually("t2 counts both cells", || metric(&t2, "cells") == 2).await;
        eventually("the delivery acked at t2", || metric(&t2, "acks") == 1).await;
        assert_eq!(metric(&t2, "errors.unknown_delivery"), 0);
    })
    .await;
}

// ---------------------------------------------------------------------
// 6. A peer that does not speak ZMTP.

/// A peer that answers every connection with an HTTP error and keeps it
/// open: the handshake fails on the first byte (no ZMTP signature),
/// again at each retry, and `connect` times out saying so.
#[tokio::test]
async fn a_peer_that_is_not_zmtp_times_connect_out_with_the_handshake_failure() {
    watchdog(async {
        let held = Arc::new(Mutex::new(Vec::new()));
        let peer = Acceptor::start({
            let held = held.clone();
            move |mut s| {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                held.lock().unwrap().push(s);
            }
        });
        let endpoint = peer.endpoint();
        let options = Options::new("svc").connect_timeout(Duration::from_millis(600));
        let started = Instant::now();
        let err = match Client::connect(&endpoint, options).await {
            Ok(c) => panic!("welcomed by an HTTP server: {}", c.transmitter_id()),
            Err(e) => e,
        };
        let took = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        let message = err.message();
        assert!(message.contains(&endpoint), "{message}");
        assert!(message.contains("ZMTP handshake failed"), "{message}");
        assert!(message.contains("not a ZMTP signature"), "{message}");
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(3),
            "timed out after {took:?}"
        );
        // It tried again after each failure (every 100 ms).
        assert!(peer.accepted() >= 2, "{} connections", peer.accepted());
    })
    .await;
}

// ---------------------------------------------------------------------
// A raw ZMTP 3 transmitter, to write exactly the bytes a test needs.

/// What a raw peer read: a command (name, data) or a message (frames).
#[derive(Debug)]
enum Zmtp {
    Command(String, Vec<u8>),
    Message(Vec<Vec<u8>>),
}

/// One connection of a raw ZMTP 3 peer (NULL mechanism), the transmitter
/// side.
struct RawPeer {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Write one byte per `write` call (each its own TCP segment).
    bytewise: bool,
}

impl RawPeer {
    /// The ZMTP handshake, then the cell's HELO, welcomed; returns it.
    fn welcome_cell(&mut self) -> Value {
        self.handshake();
        let hello = self.expect("HELO");
        self.send(welcome(&hello["ref"]).as_bytes());
        hello
    }

    /// The cell's next LSTN, answered OKAY; returns it.
    fn accept_listen(&mut self) -> Value {
        let listen = self.expect("LSTN");
        self.send(format!(r#"J OKAY {{"ref":{}}}"#, listen["ref"]).as_bytes());
        listen
    }

    /// On a new connection: the same cell (`hello`'s THID) says HELO
    /// again, is welcomed, and listens again as `listen` did.
    fn welcome_back(&mut self, hello: &Value, listen: &Value) {
        let again = self.welcome_cell();
        assert_eq!(again["id"], hello["id"], "the same cell THID");
        let relisten = self.accept_listen();
        assert_eq!(
            (&relisten["pattern"], &relisten["mode"]),
            (&listen["pattern"], &listen["mode"])
        );
    }

    fn new(stream: TcpStream, bytewise: bool) -> RawPeer {
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawPeer {
            stream,
            buf: Vec::new(),
            bytewise,
        }
    }

    /// Reads until `n` bytes are buffered.
    fn fill(&mut self, n: usize) {
        let mut chunk = [0u8; 16 * 1024];
        while self.buf.len() < n {
            let got = self.stream.read(&mut chunk).expect("read from the cell");
            assert!(got > 0, "the cell closed the connection");
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.bytewise {
            for b in bytes {
                self.stream.write_all(std::slice::from_ref(b)).unwrap();
            }
        } else {
            self.stream.write_all(bytes).unwrap();
        }
    }

    /// One frame: its header and body.
    fn frame(&mut self) -> (zmtp::Header, Vec<u8>) {
        let header = loop {
            if let Some(h) = zmtp::decode_header(&self.buf, 1 << 30).expect("a frame header") {
                break h;
            }
            let more = self.buf.len() + 1;
            self.fill(more);
        };
        self.fill(header.size + header.len);
        let body = self.buf[header.size..header.size + header.len].to_vec();
        self.buf.drain(..header.size + header.len);
        (header, body)
    }

    /// The next command or whole message.
    fn next(&mut self) -> Zmtp {
        let mut frames = Vec::new();
        loop {
            let (h, body) = self.frame();
            if h.command {
                assert!(frames.is_empty(), "a command inside a message");
                let (name, data) = zmtp::parse_command(&body).unwrap();
                return Zmtp::Command(String::from_utf8_lossy(name).into_owned(), data.to_vec());
            }
            frames.push(body);
            if !h.more {
                return Zmtp::Message(frames);
            }
        }
    }

    /// The greetings and READYs: checks the cell says NULL and DEALER.
    fn handshake(&mut self) {
        self.fill(GREETING_LEN);
        let greeting: Vec<u8> = self.buf.drain(..GREETING_LEN).collect();
        let g = zmtp::parse_greeting(greeting.as_slice().try_into().unwrap()).unwrap();
        assert_eq!((g.major, g.mechanism.as_slice()), (3, &b"NULL"[..]));
        self.write(&zmtp::greeting(Mechanism::Null, false));
        match self.next() {
            Zmtp::Command(name, data) if name == "READY" => {
                let props = zmtp::parse_properties(&data).unwrap();
                assert_eq!(zmtp::property(&props, "Socket-Type"), Some(&b"DEALER"[..]));
            }
            other => panic!("expected READY, got {other:?}"),
        }
        let mut ready = Vec::new();
        zmtp::encode_command(
            &mut ready,
            "READY",
            &zmtp::encode_properties(&[("Socket-Type", b"ROUTER")]),
        );
        self.write(&ready);
    }

    /// Sends one single-frame message (what a ROUTER sends after the
    /// routing id).
    fn send(&mut self, frame: &[u8]) {
        let mut out = Vec::new();
        zmtp::encode_frame(&mut out, frame, false);
        self.write(&out);
    }

    /// The next protocol command from the cell, answering its PINGs (and
    /// ignoring ZMTP commands) on the way.
    fn expect(&mut self, verb: &str) -> Value {
        loop {
            match self.next() {
                Zmtp::Message(frames) => {
                    let (v, body) = parse_command(&frames[0]);
                    if v == "PING" && verb != "PING" {
                        self.send(format!(r#"J PONG {{"ref":{}}}"#, body["ref"]).as_bytes());
                        continue;
                    }
                    assert_eq!(v, verb, "expected {verb}, got {v} {body}");
                    return body;
                }
                Zmtp::Command(name, _) => panic!("unexpected ZMTP {name} while expecting {verb}"),
            }
        }
    }

    /// After GBYE: answers the closing PING.
    fn farewell(&mut self) {
        let ping = self.expect("PING");
        self.send(format!(r#"J PONG {{"ref":{}}}"#, ping["ref"]).as_bytes());
    }
}

// ---------------------------------------------------------------------
// 7. Bytes one at a time, ZMTP commands after the handshake.

/// What the byte-at-a-time transmitter saw.
#[derive(Debug)]
struct Trickled {
    /// The data of the PONG that answered our PING.
    pong: Vec<u8>,
    /// Connections accepted in all.
    connections: usize,
}

/// Plays a transmitter that writes every byte on its own: greeting,
/// READY, WLCM; then an unknown ZMTP command (to be ignored) and a ZMTP
/// PING with a TTL and a context (to be answered with a PONG echoing the
/// context); then PONGs to the cell's PINGs until its GBYE.
fn trickling_transmitter(listener: TcpListener) -> Trickled {
    let (stream, _) = listener.accept().unwrap();
    let mut peer = RawPeer::new(stream, true);
    peer.welcome_cell();

    let mut commands = Vec::new();
    zmtp::encode_command(&mut commands, "XYZZY", b"whatever");
    let mut ping_data = vec![0x00, 0x0a];
    ping_data.extend_from_slice(b"ctx-0123456789");
    zmtp::encode_command(&mut commands, "PING", &ping_data);
    peer.write(&commands);

    let mut pong = None;
    loop {
        match peer.next() {
            Zmtp::Command(name, data) if name == "PONG" && pong.is_none() => pong = Some(data),
            Zmtp::Command(name, data) => panic!("unexpected ZMTP {name} {data:?}"),
            Zmtp::Message(frames) => {
                let (verb, body) = parse_command(&frames[0]);
                match verb.as_str() {
                    "PING" => {
                        peer.send(format!(r#"J PONG {{"ref":{}}}"#, body["ref"]).as_bytes());
                    }
                    "GBYE" => {
                        peer.farewell();
                        break;
                    }
                    other => panic!("unexpected {other} {body}"),
                }
            }
        }
    }
    listener.set_nonblocking(true).unwrap();
    let mut connections = 1;
    while listener.accept().is_ok() {
        connections += 1;
    }
    Trickled {
        pong: pong.expect("a PONG to the ZMTP PING"),
        connections,
    }
}

/// A transmitter whose bytes arrive one TCP segment each (the greeting
/// and frame headers split across reads) still welcomes the cell; an
/// unknown ZMTP command after the handshake is ignored, and a ZMTP PING
/// is answered with a PONG that echoes its context (without the TTL), on
/// the one connection.
#[tokio::test]
async fn a_transmitter_writing_byte_by_byte_is_understood_and_its_zmtp_ping_echoed() {
    watchdog(async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let script = std::thread::spawn(move || trickling_transmitter(listener));
        let cell = Client::connect(&endpoint, Options::new("slow"))
            .await
            .expect("welcomed byte by byte");
        assert_eq!(cell.transmitter_id().to_string(), "ab".repeat(20));
        assert_eq!(cell.heartbeat(), Duration::from_secs(60));
        tokio::time::timeout(PATIENCE, cell.flush())
            .await
            .expect("the flush returns")
            .expect("a PING round trip after the ZMTP commands");
        cell.close().await;
        let seen = join_script(script).await;
        assert_eq!(seen.pong, b"ctx-0123456789");
        assert_eq!(seen.connections, 1);
    })
    .await;
}

// ---------------------------------------------------------------------
// 8. A frame header over the limit.

/// Plays a transmitter that welcomes the cell and accepts its listen,
/// then announces a 1 TiB frame: the cell must close the connection
/// without waiting for the body, connect again, say HELO with the same
/// THID and LSTN again; a delivery on the new connection is acked.
fn oversized_transmitter(listener: TcpListener) {
    let (stream, _) = listener.accept().unwrap();
    let mut first = RawPeer::new(stream, false);
    let hello = first.welcome_cell();
    let listen = first.accept_listen();
    assert_eq!(listen["pattern"], "jobs::*");

    // A message frame of 1 TiB: its header only.
    let mut header = Vec::new();
    zmtp::encode_header(&mut header, 1 << 40, false, false);
    first.write(&header);
    // The cell hangs up (reading until then: it may have sent a PING).
    let mut sink = [0u8; 4096];
    loop {
        match first.stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the cell kept the connection after the oversized header: {e}"),
        }
    }

    let (stream, _) = listener.accept().unwrap();
    let mut second = RawPeer::new(stream, false);
    second.welcome_back(&hello, &listen);
    let id = "cd".repeat(20);
    second.send(
        format!(
            r#"J DLVR {{"id":"{id}","channel":"jobs::x","payload":7,"from":"{}","attempt":1}}"#,
            "ef".repeat(20)
        )
        .as_bytes(),
    );
    let ack = second.expect("ACKN");
    assert_eq!(ack["ids"][0], Value::String(id));
    second.expect("GBYE");
    second.farewell();
}

/// A frame header announcing more than the DEALER's frame limit ends the
/// connection at once (the body is never waited for); the cell connects
/// again and joins again, and deliveries flow on the new connection.
#[tokio::test]
async fn a_frame_header_over_the_limit_drops_the_connection_and_the_cell_joins_again() {
    watchdog(async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let script = std::thread::spawn(move || oversized_transmitter(listener));
        let cell = Client::connect(&endpoint, Options::new("workers"))
            .await
            .expect("welcomed");
        let mut jobs = cell.listen("jobs::*", Mode::Any).await.unwrap();
        let event = next(&mut jobs).await;
        assert_eq!(event.payload::<u8>().unwrap(), 7);
        drop(event); // acked: the script waits for the ACKN
        cell.flush().await.unwrap();
        cell.close().await;
        join_script(script).await;
    })
    .await;
}

// ---------------------------------------------------------------------
// 9. A transmitter that closes the connection right after a message.

/// Plays a transmitter that welcomes the cell (heartbeat 60 s) and
/// accepts its multicatch listen; on `go`, writes one event and closes the
/// connection at once, then says `done`. The cell must notice the close
/// (its heartbeat is far too long for a PING to find out) and connect
/// again within 3 s: HELO with the same THID, LSTN again; then GBYE.
fn closing_transmitter(
    listener: TcpListener,
    go: std::sync::mpsc::Receiver<()>,
    done: std::sync::mpsc::Sender<()>,
    rejoined: Arc<AtomicBool>,
) {
    let (stream, _) = listener.accept().unwrap();
    let mut first = RawPeer::new(stream, false);
    let hello = first.welcome_cell();
    let listen = first.accept_listen();
    // The cell's flush.
    let ping = first.expect("PING");
    first.send(format!(r#"J PONG {{"ref":{}}}"#, ping["ref"]).as_bytes());

    go.recv_timeout(PATIENCE).expect("the test says go");
    first.send(
        format!(
            r#"J EVNT {{"id":"{}","channel":"news::last","payload":5,"from":"{}"}}"#,
            "cd".repeat(20),
            "ef".repeat(20)
        )
        .as_bytes(),
    );
    drop(first); // the event's bytes, then the FIN
    done.send(()).unwrap();

    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no reconnect within 3 s: the cell never noticed that the connection \
                     closed right after the event"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let mut second = RawPeer::new(stream, false);
    second.welcome_back(&hello, &listen);
    rejoined.store(true, Ordering::SeqCst);
    second.expect("GBYE");
    second.farewell();
}

/// The transmitter writes a message and closes the connection while the
/// cell's runtime is busy, so the bytes and the end of the stream are
/// waiting together when the cell reads. It takes the message and also
/// sees the end: it connects again and joins again at once (not at its
/// next heartbeat, 60 s away).
#[tokio::test]
async fn a_close_right_behind_a_message_is_noticed_and_the_cell_joins_again() {
    watchdog(async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let (go_tx, go) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel();
        let rejoined = Arc::new(AtomicBool::new(false));
        let script = std::thread::spawn({
            let rejoined = rejoined.clone();
            move || closing_transmitter(listener, go, done, rejoined)
        });
        let cell = Client::connect(&endpoint, Options::new("news"))
            .await
            .expect("welcomed");
        let mut news = cell.listen("news::*", Mode::Multi).await.unwrap();
        cell.flush().await.unwrap();

        // Blocks this (current-thread) runtime, and with it the cell's
        // connection task, until the event and the close are both there.
        go_tx.send(()).unwrap();
        done_rx
            .recv_timeout(PATIENCE)
            .expect("the script wrote and closed");
        let event = next(&mut news).await;
        assert_eq!(event.payload::<u8>().unwrap(), 5);

        let deadline = Instant::now() + PATIENCE;
        while !rejoined.load(Ordering::SeqCst) {
            if script.is_finished() {
                join_script(script).await;
                panic!("the script ended before the cell joined again");
            }
            assert!(Instant::now() < deadline, "the cell never joined again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cell.close().await;
        join_script(script).await;
    })
    .await;
}

// ---------------------------------------------------------------------
// 10. A connection lost between HELO and WLCM.

/// Plays a transmitter that takes the cell's HELO on the first connection
/// and closes it without answering (a restart mid-join), then welcomes
/// the HELO that comes on the next connection.
fn restarting_transmitter(listener: TcpListener) {
    let (stream, _) = listener.accept().unwrap();
    let mut first = RawPeer::new(stream, false);
    first.handshake();
    let hello = first.expect("HELO");
    drop(first);

    let (stream, _) = listener.accept().unwrap();
    let mut second = RawPeer::new(stream, false);
    let again = second.welcome_cell();
    assert_eq!(again["id"], hello["id"], "the same cell THID");
    second.expect("GBYE");
    second.farewell();
}

/// A connection lost after the HELO went out and before the WLCM came
/// does not fail `connect`: the DEALER connects again, and the HELO is
/// said again on the new connection, within the connect timeout.
#[tokio::test]
async fn a_connection_lost_before_the_welcome_does_not_fail_connect() {
    watchdog(async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let script = std::thread::spawn(move || restarting_transmitter(listener));
        let options = Options::new("svc").connect_timeout(Duration::from_secs(3));
        let cell = match Client::connect(&endpoint, options).await {
            Ok(cell) => cell,
            Err(e) => panic!("connect failed although the transmitter came back: {e}"),
        };
        cell.close().await;
        join_script(script).await;
    })
    .await;
}

// ---------------------------------------------------------------------
// 11. More than the DEALER holds unwritten.

/// A publisher that outruns the socket: the DEALER refuses what exceeds
/// the bytes it holds unwritten, the connection keeps the rest, and moves
/// it on as the socket takes bytes, without waiting for a writable edge
/// that a socket that took everything never gives. With a 60 s heartbeat
/// a connection that waited for one would stall far past the deadline.
#[tokio::test]
async fn publishes_beyond_what_the_dealer_holds_flow_without_waiting_for_a_timer() {
    watchdog(async {
        let mut cfg = config();
        cfg.heartbeat = Duration::from_secs(60);
        let t = start(cfg);
        let publisher = client(&t, "bulk").await;
        let listener = client(&t, "sink").await;
        let mut sub = listener.listen("bulk::*", Mode::Multi).await.unwrap();
        const EVENTS: usize = 48;
        let started = Instant::now();
        for n in 0..EVENTS {
            publisher
                .publish_bytes("bulk::x", vec![u8::try_from(n).unwrap(); 512 * 1024])
                .await
                .unwrap();
        }
        tokio::time::timeout(PATIENCE, publisher.flush())
            .await
            .expect("the 24 MiB left the publisher within the deadline")
            .unwrap();
        for n in 0..EVENTS {
            let event = tokio::time::timeout(PATIENCE, next(&mut sub))
                .await
                .expect("every event arrives within the deadline");
            assert_eq!(
                event.binary().map(|b| (b.len(), b[0])),
                Some((512 * 1024, n as u8))
            );
        }
        eprintln!(
            "{EVENTS} events of 512 KiB through in {:?}",
            started.elapsed()
        );
        listener.close().await;
        publisher.close().await;
    })
    .await;
}
