//! The command socket is the transmitter's own ZMTP 3 ROUTER (it replaced
//! libzmq's). These tests prove what the other end-to-end tests take for
//! granted about it, with libzmq DEALERs and with raw TCP peers written
//! byte by byte:
//! - ZMTP heartbeats: `PING` is answered with `PONG` (context echoed), so a
//!   libzmq DEALER with `ZMQ_HEARTBEAT_IVL`/`ZMQ_HEARTBEAT_TIMEOUT` stays
//!   connected;
//! - routing ids: two DEALERs asking for the same `ZMQ_ROUTING_ID`, or for
//!   one starting with a zero byte, are each served on their own, and a
//!   DEALER taking the id of one that left is a new connection;
//! - socket types: a PUB or SUB (or a peer naming none) is refused at its
//!   READY, while REQ and ROUTER are accepted;
//! - handshakes: a peer stalled in its greeting disturbs nobody and may
//!   finish later; a greeting of an older ZMTP (a 64-byte one, or the
//!   short one a real ZMTP 2.0 peer sends) is cut off;
//! - frame counts: a message with more frames than the transmitter keeps is
//!   answered `bad_multipart` by its real count, and the stream stays in
//!   step;
//! - load: two DEALERs sending 5,000 PINGs each at once get every PONG, in
//!   order, and a DEALER is answered promptly while another floods.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::{json, Value};
use thynapse_tests::zmtp::{command, greeting, header, properties, ready, COMMAND, LONG, MORE};
use thynapse_tests::{wait_until, watchdog, Msg, RawCell, POLL, REPLY_TIMEOUT, TEST_DEADLINE};
use thynapse_transmitter::{Config, Transmitter};

fn start() -> anyhow::Result<Transmitter> {
    Ok(Transmitter::start(Config::for_tests())?)
}

// ---------------------------------------------------------------------------
// ZMTP by hand
// ---------------------------------------------------------------------------

/// A ZMTP 3.1 PING command with `ttl` (deciseconds) and `context`.
fn ping(ttl: u16, context: &[u8]) -> Vec<u8> {
    let mut data = ttl.to_be_bytes().to_vec();
    data.extend_from_slice(context);
    command("PING", &data)
}

/// Message frames: each part, MORE on all but the last.
fn message(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let more = if i + 1 < parts.len() { MORE } else { 0 };
        header(&mut out, more, p.len());
        out.extend_from_slice(p);
    }
    out
}

/// One frame read back: its flags and body.
#[derive(Debug)]
struct Frame {
    flags: u8,
    body: Vec<u8>,
}

impl Frame {
    fn is_command(&self) -> bool {
        self.flags & COMMAND != 0
    }

    /// A command's name and data.
    fn command(&self) -> anyhow::Result<(&[u8], &[u8])> {
        ensure!(self.is_command(), "not a command: {self:?}");
        let (&n, rest) = self.body.split_first().context("an empty command")?;
        rest.split_at_checked(usize::from(n))
            .context("a command name past its frame")
    }
}

/// What a raw peer reads when the transmitter hangs up.
enum End {
    /// The bytes read, then EOF (or a reset).
    Closed(Vec<u8>),
    /// The bytes read until the deadline, the connection still open.
    Open(Vec<u8>),
}

/// A raw TCP peer of the command socket.
struct RawPeer {
    stream: TcpStream,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
}

impl RawPeer {
    fn connect(endpoint: &str) -> anyhow::Result<RawPeer> {
        let addr = endpoint
            .strip_prefix("tcp://")
            .context("not a tcp:// endpoint")?;
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RawPeer {
            stream,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).context("writing")
    }

    /// Reads more bytes, waiting until `end`; `Ok(false)` on EOF or reset.
    fn fill(&mut self, end: Instant, what: &str) -> anyhow::Result<bool> {
        let mut chunk = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for {what}; read so far: {:?}", self.buf);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e).context("reading from the transmitter"),
            }
        }
    }

    /// The next `n` bytes, within [`REPLY_TIMEOUT`].
    fn take(&mut self, n: usize, what: &str) -> anyhow::Result<Vec<u8>> {
        let end = Instant::now() + REPLY_TIMEOUT;
        while self.buf.len() < n {
            if !self.fill(end, what)? {
                bail!(
                    "the transmitter closed the connection while we waited for {what}; read: {:?}",
                    self.buf
                );
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The transmitter's greeting, checked: ZMTP 3.x, NULL, as server.
    fn expect_greeting(&mut self) -> anyhow::Result<()> {
        let g = self.take(64, "the transmitter's greeting")?;
        ensure!(g[0] == 0xFF && g[9] == 0x7F, "not a ZMTP signature: {g:?}");
        ensure!(g[10] == 3, "major version {} (expected 3): {g:?}", g[10]);
        ensure!(&g[12..17] == b"NULL\0", "mechanism not NULL: {g:?}");
        Ok(())
    }

    /// The next frame, within [`REPLY_TIMEOUT`].
    fn frame(&mut self) -> anyhow::Result<Frame> {
        let head = self.take(2, "a frame header")?;
        let flags = head[0];
        let len = if flags & LONG != 0 {
            let mut be = [0u8; 8];
            be[0] = head[1];
            be[1..].copy_from_slice(&self.take(7, "a long frame header")?);
            usize::try_from(u64::from_be_bytes(be))?
        } else {
            usize::from(head[1])
        };
        let body = self.take(len, "a frame body")?;
        Ok(Frame { flags, body })
    }

    /// The transmitter's READY, checked to say it is a ROUTER.
    fn expect_ready(&mut self) -> anyhow::Result<()> {
        let f = self.frame()?;
        let (name, data) = f.command()?;
        ensure!(name == b"READY", "expected READY, got {f:?}");
        let needle = properties(&[("Socket-Type", b"ROUTER")]);
        ensure!(
            data.windows(needle.len()).any(|w| w == needle),
            "the READY does not say Socket-Type ROUTER: {f:?}"
        );
        Ok(())
    }

    /// The NULL handshake as a `socket_type`: our greeting and READY,
    /// theirs read and checked.
    fn handshake(&mut self, socket_type: &str) -> anyhow::Result<()> {
        let mut hello = greeting(3, b"NULL");
        hello.extend_from_slice(&ready(socket_type));
        self.send(&hello)?;
        self.expect_greeting()?;
        self.expect_ready()
    }

    /// Sends `J PING {"ref":reference}` as a message and requires the next
    /// frame to be its `J PONG`, a single-frame message.
    fn ping_pong(&mut self, reference: &str) -> anyhow::Result<Value> {
        self.send(&message(&[
            format!(r#"J PING {{"ref":"{reference}"}}"#).as_bytes()
        ]))?;
        let f = self.frame()?;
        ensure!(f.flags == 0, "expected a single message frame, got {f:?}");
        let m = Msg::decode(vec![f.body])?;
        ensure!(
            m.verb == "PONG" && m.body["ref"] == reference,
            "expected PONG for {reference}, got {m}"
        );
        Ok(m.body)
    }

    /// Reads until the transmitter hangs up or `deadline` passes.
    fn until_hang_up(&mut self, deadline: Duration) -> anyhow::Result<End> {
        let end = Instant::now() + deadline;
        loop {
            if Instant::now() >= end {
                return Ok(End::Open(std::mem::take(&mut self.buf)));
            }
            match self.fill(end, "the transmitter to hang up") {
                Ok(true) => {}
                Ok(false) => return Ok(End::Closed(std::mem::take(&mut self.buf))),
                Err(_) if Instant::now() >= end => {
                    return Ok(End::Open(std::mem::take(&mut self.buf)))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Requires the transmitter to hang up within [`REPLY_TIMEOUT`];
    /// returns what it sent before.
    fn expect_hang_up(&mut self, after: &str) -> anyhow::Result<Vec<u8>> {
        match self.until_hang_up(REPLY_TIMEOUT)? {
            End::Closed(rest) => Ok(rest),
            End::Open(rest) => bail!(
                "the transmitter kept the connection open {REPLY_TIMEOUT:?} after {after} \
                 (it sent {} bytes meanwhile: {rest:?})",
                rest.len()
            ),
        }
    }
}

/// Splits `bytes` into whole frames (none may be cut short).
fn frames_of(mut bytes: &[u8]) -> anyhow::Result<Vec<Frame>> {
    let mut out = Vec::new();
    while let Some(&flags) = bytes.first() {
        let (len, size) = if flags & LONG != 0 {
            let be: [u8; 8] = bytes
                .get(1..9)
                .context("a long header cut short")?
                .try_into()?;
            (usize::try_from(u64::from_be_bytes(be))?, 9)
        } else {
            (usize::from(*bytes.get(1).context("a header cut short")?), 2)
        };
        let body = bytes
            .get(size..size + len)
            .with_context(|| format!("a frame of {len} bytes cut short: {bytes:?}"))?;
        out.push(Frame {
            flags,
            body: body.to_vec(),
        });
        bytes = &bytes[size + len..];
    }
    Ok(out)
}

/// PING on `cell` and its PONG: proves the connection works, and says
/// whether it is (still) the welcomed one.
fn ping_welcomed(cell: &mut RawCell) -> anyhow::Result<bool> {
    let reference = cell.next_ref();
    cell.send_json("PING", &json!({ "ref": reference }))?;
    let pong = cell.expect_reply("PONG", &reference)?;
    pong["welcomed"]
        .as_bool()
        .with_context(|| format!("a PONG without welcomed: {pong}"))
}

/// The very next message on `cell`, required to be `J PONG` with `ref`
/// (nothing else may come first).
fn next_is_pong(cell: &mut RawCell, reference: &Value, who: &str) -> anyhow::Result<Value> {
    let m = cell
        .recv(REPLY_TIMEOUT)?
        .with_context(|| format!("{who}: no reply within {REPLY_TIMEOUT:?}"))?;
    ensure!(
        m.verb == "PONG" && m.body["ref"] == *reference,
        "{who}: expected PONG with ref {reference}, got {m}"
    );
    Ok(m.body)
}

/// Requires that no monitor event comes for `window`; waiting on the
/// monitor is the wait.
fn no_events_for(
    monitor: &thynapse_tests::Monitor,
    window: Duration,
    who: &str,
) -> anyhow::Result<()> {
    let end = Instant::now() + window;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if let Some(e) = monitor.next(left)? {
            bail!(
                "{who}: socket event {e:?} after {:?} of the {window:?} window",
                window - end.saturating_duration_since(Instant::now())
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1. ZMTP heartbeats
// ---------------------------------------------------------------------------

#[test]
fn a_libzmq_dealer_with_zmtp_heartbeats_stays_connected_well_past_its_timeout() -> anyhow::Result<()>
{
    watchdog("zmtp_heartbeats", TEST_DEADLINE, || {
        let t = start()?;
        let mut cell = RawCell::unconnected(None)?;
        // A PING every 100 ms; without traffic for 300 ms after one, libzmq
        // drops the connection. Its PINGs carry a TTL of 1 s.
        cell.socket().set_heartbeat_ivl(100)?;
        cell.socket().set_heartbeat_timeout(300)?;
        cell.socket().set_heartbeat_ttl(1000)?;
        let monitor = cell.monitor()?;
        cell.connect(t.command_endpoint())?;
        monitor.expect(zmq::SocketEvent::HANDSHAKE_SUCCEEDED, REPLY_TIMEOUT)?;
        cell.hello("heartbeats")?;

        // 1.5 s (five heartbeat timeouts) without a command: only the
        // transmitter's answers to libzmq's PINGs keep the connection up.
        no_events_for(&monitor, Duration::from_millis(1500), "heartbeating DEALER")?;

        // The same connection still works: the PONG says it is the
        // welcomed one (a reconnect would be a new, unwelcomed routing id).
        assert!(
            ping_welcomed(&mut cell)?,
            "the heartbeating DEALER lost its session"
        );
        let mut plain = RawCell::open(t.command_endpoint())?;
        plain.hello("no-heartbeats")?;
        assert!(ping_welcomed(&mut plain)?);
        Ok(())
    })
}

#[test]
fn a_zmtp_ping_is_answered_with_a_pong_echoing_its_context() -> anyhow::Result<()> {
    watchdog("zmtp_ping_bytes", TEST_DEADLINE, || {
        let t = start()?;
        let mut peer = RawPeer::connect(t.command_endpoint())?;
        peer.handshake("DEALER")?;

        // TTL 1 s, context "abc": PONG "abc".
        peer.send(&ping(10, b"abc"))?;
        let f = peer.frame()?;
        assert_eq!(f.flags, COMMAND, "PONG is a short command frame: {f:?}");
        assert_eq!(f.body, b"\x04PONGabc", "PONG body");

        // libzmq's PINGs: TTL 0, no context.
        peer.send(&ping(0, b""))?;
        let f = peer.frame()?;
        assert_eq!((f.flags, &f.body[..]), (COMMAND, &b"\x04PONG"[..]));

        // The longest context (16 bytes), sent a byte at a time.
        let context = b"0123456789abcdef";
        for b in ping(1, context) {
            peer.send(&[b])?;
        }
        let f = peer.frame()?;
        assert_eq!(f.body, [&b"\x04PONG"[..], context].concat());

        // Messages still flow on that connection, around PINGs.
        let pong = peer.ping_pong("after-pings")?;
        assert_eq!(pong["welcomed"], false);
        let mut both = message(&[br#"J PING {"ref":"m1"}"#]);
        both.extend_from_slice(&ping(0, b"xyz"));
        both.extend_from_slice(&message(&[br#"J PING {"ref":"m2"}"#]));
        peer.send(&both)?;
        // The ZMTP PONG is answered at once, while the messages' replies
        // are routed first: it may come before them; the replies to the
        // messages keep their order.
        let replies = [peer.frame()?, peer.frame()?, peer.frame()?];
        let (commands, messages): (Vec<&Frame>, Vec<&Frame>) =
            replies.iter().partition(|f| f.is_command());
        assert_eq!(commands.len(), 1, "one PONG: {replies:?}");
        assert_eq!(commands[0].body, b"\x04PONGxyz", "{replies:?}");
        assert_eq!(messages.len(), 2, "{replies:?}");
        for (f, reference) in messages.iter().zip(["m1", "m2"]) {
            let m = Msg::decode(vec![f.body.clone()])?;
            assert!(
                f.flags == 0 && m.verb == "PONG" && m.body["ref"] == reference,
                "expected J PONG {reference}: {replies:?}"
            );
        }
        Ok(())
    })
}

/// A peer that writes a message and its end of the stream in one go: the
/// close comes with the data's readiness and brings no other, and the
/// transmitter must still see it and hang up (a connection left open for
/// good otherwise: nothing is ever sent to a cell that said GBYE).
#[test]
fn a_peer_that_sends_and_closes_at_once_is_hung_up_on() -> anyhow::Result<()> {
    watchdog("send_and_close", TEST_DEADLINE, || {
        let t = start()?;
        for last in [&br#"J PING {"ref":"last"}"#[..], br#"J GBYE {}"#] {
            let mut peer = RawPeer::connect(t.command_endpoint())?;
            peer.handshake("DEALER")?;
            peer.send(&message(&[last]))?;
            peer.stream.shutdown(Shutdown::Write)?;
            peer.expect_hang_up(&format!(
                "{} and the end of our stream",
                String::from_utf8_lossy(last)
            ))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 2. Routing ids
// ---------------------------------------------------------------------------

/// A DEALER asking for routing id `id`, connected once its handshake
/// succeeded.
fn dealer_with_id(endpoint: &str, id: &[u8]) -> anyhow::Result<RawCell> {
    let cell = RawCell::unconnected(None)?;
    cell.socket().set_identity(id)?;
    let monitor = cell.monitor()?;
    cell.connect(endpoint)?;
    monitor
        .expect(zmq::SocketEvent::HANDSHAKE_SUCCEEDED, REPLY_TIMEOUT)
        .with_context(|| format!("the handshake of a DEALER with routing id {id:?}"))?;
    Ok(cell)
}

#[test]
fn two_dealers_asking_for_the_same_routing_id_are_each_served_on_their_own() -> anyhow::Result<()> {
    watchdog("same_routing_id", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        let mut first = dealer_with_id(ep, b"same-id")?;
        let mut second = dealer_with_id(ep, b"same-id")?;

        // Both ping with the same ref; each gets exactly its own PONG.
        first.send(r#"J PING {"ref":1}"#)?;
        second.send(r#"J PING {"ref":1}"#)?;
        next_is_pong(&mut first, &json!(1), "first")?;
        next_is_pong(&mut second, &json!(1), "second")?;
        // The second asks again: the first gets nothing of it.
        second.send(r#"J PING {"ref":2}"#)?;
        next_is_pong(&mut second, &json!(2), "second")?;
        first.send(r#"J PING {"ref":3}"#)?;
        next_is_pong(&mut first, &json!(3), "first")?;

        // The router tells them apart: each is welcomed as its own cell
        // (one connection cannot hold two THIDs) and stays welcomed.
        first.hello("same-id").context("first HELO")?;
        second.hello("same-id").context("second HELO")?;
        assert!(ping_welcomed(&mut first)?, "first");
        assert!(ping_welcomed(&mut second)?, "second");
        assert!(first.drain()?.is_empty(), "first got more than its replies");
        assert!(
            second.drain()?.is_empty(),
            "second got more than its replies"
        );
        Ok(())
    })
}

#[test]
fn a_new_dealer_taking_the_routing_id_of_one_that_left_is_a_new_unwelcomed_connection(
) -> anyhow::Result<()> {
    watchdog("reused_routing_id", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        // The first, by hand: READY with Identity "reused-id", HELO.
        let mut first = RawPeer::connect(ep)?;
        let mut hello = greeting(3, b"NULL");
        hello.extend_from_slice(&command(
            "READY",
            &properties(&[("Socket-Type", b"DEALER"), ("Identity", b"reused-id")]),
        ));
        first.send(&hello)?;
        first.expect_greeting()?;
        first.expect_ready()?;
        let first_id = thynapse_protocol::Thid::random();
        first.send(&message(&[format!(
            r#"J HELO {{"id":"{first_id}","service":"reused-id","ref":"h1"}}"#
        )
        .as_bytes()]))?;
        let f = first.frame()?;
        let m = Msg::decode(vec![f.body])?;
        ensure!(m.verb == "WLCM", "first HELO: {m}");
        assert_eq!(first.ping_pong("p1")?["welcomed"], true, "first");
        // It leaves: once the transmitter closes its side in turn, the
        // connection is gone there and the routing id is free again.
        first.stream.shutdown(std::net::Shutdown::Write)?;
        first.expect_hang_up("our side was closed")?;

        // A different DEALER asking for the same routing id is a new
        // connection (PROTOCOL.md §4 Reconnects): not welcomed, and free to
        // say HELO with its own THID.
        let mut second = dealer_with_id(ep, b"reused-id")?;
        assert!(
            !ping_welcomed(&mut second)?,
            "a new connection that never said HELO is welcomed as cell {first_id}, \
             which left on the connection that had its routing id"
        );
        second.hello("reused-id").context("second HELO")?;
        assert!(ping_welcomed(&mut second)?, "second");
        Ok(())
    })
}

#[test]
fn dealers_whose_routing_id_starts_with_a_zero_byte_are_served() -> anyhow::Result<()> {
    watchdog("zero_routing_id", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        // Zero-led ids are reserved for the ones the ROUTER draws; two
        // DEALERs asking for the same one still get one each.
        let mut a = dealer_with_id(ep, b"\0zero-led")?;
        let mut b = dealer_with_id(ep, b"\0zero-led")?;
        let mut c = dealer_with_id(ep, b"\0")?;
        for (cell, who) in [(&mut a, "a"), (&mut b, "b"), (&mut c, "c")] {
            cell.send(r#"J PING {"ref":1}"#)?;
            next_is_pong(cell, &json!(1), who)?;
        }
        for (cell, who) in [(&mut a, "a"), (&mut b, "b"), (&mut c, "c")] {
            cell.hello(&format!("zero-{who}"))?;
        }
        for (cell, who) in [(&mut a, "a"), (&mut b, "b"), (&mut c, "c")] {
            assert!(ping_welcomed(cell)?, "{who}");
            assert!(cell.drain()?.is_empty(), "{who} got more than its replies");
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 3. Socket types
// ---------------------------------------------------------------------------

/// Requires the peer to be refused after its READY: an optional ERROR
/// command, then the connection closed.
fn expect_refused(peer: &mut RawPeer, what: &str) -> anyhow::Result<()> {
    let rest = peer.expect_hang_up(what)?;
    for f in frames_of(&rest).with_context(|| format!("after {what}"))? {
        let (name, data) = f.command().with_context(|| format!("after {what}"))?;
        ensure!(name == b"ERROR", "after {what}: {f:?}, expected only ERROR");
        let (&n, reason) = data.split_first().context("ERROR without a reason")?;
        ensure!(
            reason.len() == usize::from(n),
            "ERROR reason length {n} but {} bytes: {f:?}",
            reason.len()
        );
    }
    Ok(())
}

#[test]
fn a_pub_or_sub_peer_is_refused_at_its_ready_and_others_are_served() -> anyhow::Result<()> {
    watchdog("socket_types", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        let mut cell = RawCell::open(ep)?;
        cell.hello("bystander")?;

        for kind in ["PUB", "SUB", "XPUB", "PAIR", "REP"] {
            let mut peer = RawPeer::connect(ep)?;
            peer.handshake(kind)?;
            expect_refused(&mut peer, &format!("READY as a {kind}"))?;
            assert!(ping_welcomed(&mut cell)?, "bystander after a {kind}");
        }
        // A READY naming no socket type at all.
        let mut peer = RawPeer::connect(ep)?;
        let mut hello = greeting(3, b"NULL");
        hello.extend_from_slice(&command("READY", &[]));
        peer.send(&hello)?;
        peer.expect_greeting()?;
        peer.expect_ready()?;
        expect_refused(&mut peer, "a READY without Socket-Type")?;

        // A refused peer's messages, sent right behind its READY, are not
        // handled.
        let mut peer = RawPeer::connect(ep)?;
        let mut hello = greeting(3, b"NULL");
        hello.extend_from_slice(&ready("PUB"));
        hello.extend_from_slice(&message(&[br#"J PING {"ref":"from-pub"}"#]));
        peer.send(&hello)?;
        peer.expect_greeting()?;
        peer.expect_ready()?;
        expect_refused(&mut peer, "READY as a PUB and a PING")?;

        // The peers a ROUTER takes.
        for kind in ["DEALER", "REQ", "ROUTER"] {
            let mut peer = RawPeer::connect(ep)?;
            peer.handshake(kind)?;
            peer.ping_pong(&format!("as-{kind}"))
                .with_context(|| format!("a {kind} peer"))?;
        }
        assert!(ping_welcomed(&mut cell)?, "bystander at the end");
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 4. Handshakes that stall, and older ZMTP
// ---------------------------------------------------------------------------

#[test]
fn peers_stalled_in_their_greeting_disturb_nobody_and_may_finish_later() -> anyhow::Result<()> {
    watchdog("stalled_greeting", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        let full = greeting(3, b"NULL");
        // Stalled after 5 bytes, after the signature, one byte short.
        let mut stalled = Vec::new();
        for cut in [5, 10, 11, 63, 5, 5, 5, 5] {
            let mut peer = RawPeer::connect(ep)?;
            peer.send(&full[..cut])?;
            stalled.push((peer, cut));
        }
        // Everyone else is served meanwhile.
        let mut cell = RawCell::open(ep)?;
        cell.hello("while-stalled")?;
        for _ in 0..3 {
            assert!(ping_welcomed(&mut cell)?);
        }
        // The stalled peers got the transmitter's greeting and were not
        // cut off: each finishes its handshake now and is served.
        for (i, (peer, cut)) in stalled.iter_mut().enumerate() {
            peer.expect_greeting()
                .with_context(|| format!("stalled peer #{i} (after {cut} bytes)"))?;
            peer.expect_ready()?;
            let mut rest = full[*cut..].to_vec();
            rest.extend_from_slice(&ready("DEALER"));
            peer.send(&rest)?;
            let pong = peer
                .ping_pong(&format!("stalled-{i}"))
                .with_context(|| format!("stalled peer #{i} (after {cut} bytes)"))?;
            assert_eq!(pong["welcomed"], false);
        }
        assert!(ping_welcomed(&mut cell)?);
        Ok(())
    })
}

#[test]
fn a_greeting_of_zmtp_major_version_2_or_older_is_cut_off() -> anyhow::Result<()> {
    watchdog("old_zmtp_greeting", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        let mut cell = RawCell::open(ep)?;
        cell.hello("bystander")?;
        for major in [2, 1, 0] {
            let mut peer = RawPeer::connect(ep)?;
            peer.send(&greeting(major, b"NULL"))?;
            peer.expect_hang_up(&format!("a 64-byte greeting of major version {major}"))?;
            assert!(ping_welcomed(&mut cell)?, "after major version {major}");
        }
        // Still refused when READY follows at once.
        let mut peer = RawPeer::connect(ep)?;
        let mut hello = greeting(2, b"NULL");
        hello.extend_from_slice(&ready("DEALER"));
        hello.extend_from_slice(&message(&[br#"J PING {"ref":"v2"}"#]));
        peer.send(&hello)?;
        let rest = peer.expect_hang_up("a version 2 greeting, READY and a PING")?;
        assert!(
            !rest.windows(6).any(|w| w == b"J PONG"),
            "a version 2 peer was answered: {rest:?}"
        );
        assert!(ping_welcomed(&mut cell)?);
        Ok(())
    })
}

#[test]
fn a_real_zmtp_2_peer_is_cut_off_once_its_version_byte_arrives() -> anyhow::Result<()> {
    watchdog("zmtp_2_peer", TEST_DEADLINE, || {
        let t = start()?;
        // What a ZMTP 2.0 peer (libzmq 3.x) sends before it waits for
        // messages: signature, revision 0x01, socket type DEALER (5), and
        // its empty identity as a ZMTP 2.0 frame. It never sends 64 bytes
        // of greeting; its version is known from byte 11.
        let mut peer = RawPeer::connect(t.command_endpoint())?;
        peer.send(&[0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 0x01, 0x05, 0x00, 0x00])?;
        peer.expect_hang_up("the 14 bytes of a ZMTP 2.0 greeting and identity")?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 5. More frames than the transmitter keeps
// ---------------------------------------------------------------------------

#[test]
fn a_message_of_more_frames_than_kept_gets_bad_multipart_by_its_real_count() -> anyhow::Result<()> {
    watchdog("many_frames", TEST_DEADLINE, || {
        let t = start()?;
        let mut cell = RawCell::open(t.command_endpoint())?;
        cell.hello("many-frames")?;
        let head =
            br#"J EVNT {"channel":"many::frames","payload":1,"confirm":true,"ref":"r-many"}"#;

        // 300 empty frames after the command (301 in all).
        let mut parts: Vec<&[u8]> = vec![head];
        parts.extend(std::iter::repeat_n(&b""[..], 300));
        cell.send_parts(&parts)?;
        let err = cell.expect_error("bad_multipart")?;
        assert_eq!(err["re"], Value::Null, "a framing error: {err}");
        let text = err["message"].as_str().unwrap_or_default();
        assert!(text.contains("got 301"), "the real count, 301: {err}");
        assert!(ping_welcomed(&mut cell)?, "after 301 empty frames");

        // Around the number kept (1 + 256): 258 and 257 frames are counted
        // right too.
        for n in [258usize, 257] {
            let mut parts: Vec<&[u8]> = vec![head];
            parts.extend(std::iter::repeat_n(&b"x"[..], n - 1));
            cell.send_parts(&parts)?;
            let err = cell.expect_error("bad_multipart")?;
            let text = err["message"].as_str().unwrap_or_default();
            assert!(text.contains(&format!("got {n}")), "{n} frames: {err}");
        }

        // Frames past those kept, long ones among them, are skipped
        // exactly: the next message is read from the right byte.
        let long = vec![b'L'; 1000];
        let short = vec![b's'; 100];
        let mut parts: Vec<&[u8]> = vec![head];
        for i in 0..400 {
            parts.push(if i % 3 == 0 { &long } else { &short });
        }
        cell.send_parts(&parts)?;
        cell.send(r#"J PING {"ref":"right-behind"}"#)?;
        let err = cell.expect_error("bad_multipart")?;
        assert!(
            err["message"]
                .as_str()
                .is_some_and(|m| m.contains("got 401")),
            "{err}"
        );
        next_is_pong(&mut cell, &json!("right-behind"), "after 401 frames")?;

        // The session was never lost, and nothing was published.
        assert!(ping_welcomed(&mut cell)?);
        assert!(cell.drain()?.is_empty(), "replies beyond the expected ones");
        assert_eq!(t.metrics().snapshot()["events_in"], 0);
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 6. Ordering and fairness under load
// ---------------------------------------------------------------------------

/// PINGs `n` times with refs 0..n as fast as the socket takes them, and
/// returns the refs of the PONGs in the order they came.
fn ping_burst(cell: &RawCell, n: u64, go: &Barrier) -> anyhow::Result<Vec<u64>> {
    go.wait();
    let end = Instant::now() + Duration::from_secs(20);
    let mut refs = Vec::new();
    let mut sent = 0;
    let take = |parts: Vec<Vec<u8>>, refs: &mut Vec<u64>| -> anyhow::Result<()> {
        let m = Msg::decode(parts)?;
        ensure!(m.verb == "PONG", "expected PONG, got {m}");
        ensure!(m.body["welcomed"] == true, "lost its session: {m}");
        refs.push(m.body["ref"].as_u64().with_context(|| format!("{m}"))?);
        Ok(())
    };
    while (refs.len() as u64) < n {
        if Instant::now() > end {
            bail!("{} of {n} PONGs ({sent} PINGs sent) after 20 s", refs.len());
        }
        while sent < n {
            let frame = format!(r#"J PING {{"ref":{sent}}}"#);
            match cell.socket().send(frame.as_bytes(), zmq::DONTWAIT) {
                Ok(()) => sent += 1,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(e).context("sending a PING"),
            }
            if sent.is_multiple_of(500) {
                // Read what came back before sending more.
                break;
            }
        }
        let wait = if sent < n {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        while let Some(parts) = cell.recv_parts(wait)? {
            take(parts, &mut refs)?;
            if refs.len() as u64 == n {
                break;
            }
        }
    }
    Ok(refs)
}

#[test]
fn two_dealers_sending_5000_pings_each_at_once_get_every_pong_in_order() -> anyhow::Result<()> {
    watchdog("ordering_under_load", TEST_DEADLINE, || {
        const N: u64 = 5000;
        let t = start()?;
        let go = Arc::new(Barrier::new(2));
        let mut handles = Vec::new();
        for name in ["left", "right"] {
            let cell = RawCell::unconnected(None)?;
            // No high-water mark on our side: what is measured is the
            // transmitter.
            cell.socket().set_sndhwm(0)?;
            cell.socket().set_rcvhwm(0)?;
            cell.connect(t.command_endpoint())?;
            let mut cell = cell;
            cell.hello(&format!("load-{name}"))?;
            let go = go.clone();
            handles.push((name, std::thread::spawn(move || ping_burst(&cell, N, &go))));
        }
        for (name, h) in handles {
            let refs = match h.join() {
                Ok(r) => r.with_context(|| format!("publisher {name}"))?,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            assert_eq!(refs.len() as u64, N, "{name}: every PONG");
            if let Some(i) = refs.iter().enumerate().position(|(i, r)| *r != i as u64) {
                panic!(
                    "{name}: PONG #{i} has ref {} (expected {i}); around it: {:?}",
                    refs[i],
                    &refs[i.saturating_sub(3)..(i + 4).min(refs.len())]
                );
            }
        }
        Ok(())
    })
}

#[test]
fn a_dealer_is_answered_promptly_while_another_floods_the_command_socket() -> anyhow::Result<()> {
    watchdog("fair_under_flood", TEST_DEADLINE, || {
        let t = start()?;
        let ep = t.command_endpoint();
        let mut quiet = RawCell::open(ep)?;
        quiet.hello("quiet")?;
        let mut flooder = RawCell::open(ep)?;
        flooder.ping()?;

        // The flooder sends PINGs as fast as libzmq takes them (faster than
        // the transmitter handles them), reading its PONGs on the way,
        // until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let flood = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let end = Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    for _ in 0..1000 {
                        match flooder.socket().send(&b"J PING {}"[..], zmq::DONTWAIT) {
                            Ok(()) => sent.fetch_add(1, Ordering::Relaxed),
                            Err(zmq::Error::EAGAIN) => break,
                            Err(e) => return Err(e).context("flooding"),
                        };
                    }
                    for _ in 0..1000 {
                        if flooder.socket().recv_bytes(zmq::DONTWAIT).is_err() {
                            break;
                        }
                    }
                }
                Ok(())
            })
        };
        wait_until("the flood to be under way", REPLY_TIMEOUT, POLL, || {
            sent.load(Ordering::Relaxed) >= 20_000
        })?;

        // Connections are served a message at a time in turn: the quiet
        // cell's PINGs are not stuck behind the flood.
        for i in 0..20 {
            let reference = json!(format!("quiet-{i}"));
            quiet.send_json("PING", &json!({ "ref": reference }))?;
            quiet
                .expect_reply("PONG", &reference)
                .with_context(|| format!("quiet PING #{i} during the flood"))?;
        }
        let flooding = !flood.is_finished();
        let during = sent.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        match flood.join() {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        assert!(
            flooding,
            "the flood ended before the quiet cell was done ({during} PINGs sent)"
        );
        Ok(())
    })
}
