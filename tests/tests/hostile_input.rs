//! Hostile peers against the real `thynapse` binary: a frame header
//! claiming a terabyte, garbage bytes, a flood of malformed commands, a
//! message above `--max-frame`. The transmitter cuts off the offender
//! only, stays up, and the healthy cells keep exchanging events throughout
//! and after; in the end it still shuts down cleanly on SIGTERM.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;
use thynapse_tests::{
    binary_watchdog, wait_until, zmtp, BackgroundProbe, FlowProbe, RawCell, Signal,
    TransmitterProcess, REPLY_TIMEOUT,
};

/// Pause between two background probe events.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// A ZMTP long message frame header announcing `len` bytes.
fn long_frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![zmtp::LONG];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// Connects to a `tcp://host:port` endpoint with plain TCP.
fn tcp(endpoint: &str) -> anyhow::Result<TcpStream> {
    let addr = endpoint
        .strip_prefix("tcp://")
        .context("not a tcp:// endpoint")?;
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads (and discards) until the transmitter closes the connection.
///
/// # Errors
/// When it is still open after `deadline`.
fn expect_hang_up(stream: &mut TcpStream, deadline: Duration, what: &str) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the transmitter kept the connection open {deadline:?} after {what}");
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e).context("reading from the transmitter"),
        }
    }
}

/// Starts the binary with `args` and a flow probe running in the
/// background.
fn start(args: &[&str]) -> anyhow::Result<(TransmitterProcess, BackgroundProbe)> {
    let t = TransmitterProcess::spawn(args)?;
    let mut probe = FlowProbe::join(t.command_endpoint(), None)?;
    probe.check()?;
    let probe = probe.run_in_background(PROBE_EVERY);
    probe.wait_for_more(3, REPLY_TIMEOUT)?;
    Ok((t, probe))
}

/// Requires events to keep flowing, the process to be alive, and then a
/// clean shutdown: SIGTERM, GBYE `shutdown` to both probe cells, exit 0.
fn still_healthy_then_shut_down(
    mut t: TransmitterProcess,
    probe: BackgroundProbe,
) -> anyhow::Result<()> {
    probe
        .wait_for_more(10, Duration::from_secs(10))
        .with_context(|| format!("events stopped flowing; transmitter log:\n{}", t.log()))?;
    assert!(t.is_running(), "the transmitter died; log:\n{}", t.log());
    let mut probe = probe.stop()?;
    probe.check()?;
    t.signal(Signal::SIGTERM)?;
    for cell in [&mut probe.publisher, &mut probe.listener] {
        let bye = cell.expect("GBYE", REPLY_TIMEOUT)?;
        assert_eq!(bye["reason"], "shutdown", "GBYE {bye}");
    }
    let status = t.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status}; log:\n{}", t.log());
    Ok(())
}

#[test]
fn a_frame_header_claiming_a_terabyte_is_cut_off_while_events_keep_flowing() -> anyhow::Result<()> {
    binary_watchdog("terabyte", || {
        let (t, probe) = start(&[])?;
        let terabyte = long_frame_header(1 << 40);

        // After a complete handshake: greeting, READY, then the header.
        let mut s = tcp(t.command_endpoint())?;
        s.write_all(&zmtp::greeting(3, b"NULL"))?;
        s.write_all(&zmtp::ready("DEALER"))?;
        s.write_all(&terabyte)?;
        let _ = s.write_all(&[b'J'; 1024]);
        expect_hang_up(&mut s, REPLY_TIMEOUT, "a 1 TiB frame header after READY")?;

        // In place of the READY command.
        let mut s = tcp(t.command_endpoint())?;
        s.write_all(&zmtp::greeting(3, b"NULL"))?;
        s.write_all(&terabyte)?;
        expect_hang_up(
            &mut s,
            REPLY_TIMEOUT,
            "a 1 TiB frame header instead of READY",
        )?;

        // A 1 TiB *command* frame (flags 0x06) after READY.
        let mut s = tcp(t.command_endpoint())?;
        s.write_all(&zmtp::greeting(3, b"NULL"))?;
        s.write_all(&zmtp::ready("DEALER"))?;
        let mut command = terabyte.clone();
        command[0] = 0x06;
        s.write_all(&command)?;
        expect_hang_up(&mut s, REPLY_TIMEOUT, "a 1 TiB command frame header")?;

        // The same on the event socket, as a SUB would connect.
        let mut s = tcp(t.event_endpoint())?;
        s.write_all(&zmtp::greeting(3, b"NULL"))?;
        let ready = zmtp::ready("SUB");
        s.write_all(&ready)?;
        s.write_all(&terabyte)?;
        expect_hang_up(
            &mut s,
            REPLY_TIMEOUT,
            "a 1 TiB frame header on the event socket",
        )?;

        still_healthy_then_shut_down(t, probe)
    })
}

#[test]
fn garbage_bytes_do_not_disturb_the_transmitter_and_a_bad_mechanism_is_cut_off(
) -> anyhow::Result<()> {
    binary_watchdog("garbage", || {
        let (t, probe) = start(&[])?;

        // Deterministic pseudo-random bytes (xorshift), 64 KiB.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let garbage: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        let mut peers = Vec::new();
        for endpoint in [t.command_endpoint(), t.event_endpoint()] {
            for junk in [
                &garbage[..],
                b"GET / HTTP/1.1\r\nHost: thynapse\r\n\r\n",
                &[0u8; 4096],
                &[0xFF; 4096],
            ] {
                let mut s = tcp(endpoint)?;
                // The transmitter may hang up while we write: that is fine.
                let _ = s.write_all(junk);
                peers.push(s);
            }
        }
        probe.wait_for_more(5, REPLY_TIMEOUT)?;

        // A ZMTP 3 greeting with a mechanism the server does not speak is
        // a protocol error: the connection is closed.
        for mechanism in [&b"BOGUS"[..], b"CURVE", b"PLAIN"] {
            let mut s = tcp(t.command_endpoint())?;
            s.write_all(&zmtp::greeting(3, mechanism))?;
            expect_hang_up(
                &mut s,
                REPLY_TIMEOUT,
                &format!(
                    "a greeting with mechanism {}",
                    String::from_utf8_lossy(mechanism)
                ),
            )?;
        }
        // A valid greeting of a future major version, then garbage.
        let mut s = tcp(t.command_endpoint())?;
        let mut g = zmtp::greeting(3, b"NULL");
        g[10] = 9;
        let _ = s.write_all(&g);
        let _ = s.write_all(&garbage[..4096]);
        peers.push(s);

        probe.wait_for_more(5, REPLY_TIMEOUT)?;
        drop(peers);
        still_healthy_then_shut_down(t, probe)
    })
}

/// The malformed commands of the flood, in rotation, with the code each
/// must get on a connection that never said HELO.
const FLOOD: [(&str, &str); 5] = [
    ("not a command", "bad_frame"),
    (r#"J PING {"ref":"#, "bad_json"),
    (r#"J ABCD {"ref":1}"#, "unknown_verb"),
    (r#"J LSTN {"pattern":"a::*","mode":"any"}"#, "not_welcomed"),
    (r#"Q PING {}"#, "bad_encoding"),
];

#[test]
fn ten_thousand_malformed_commands_get_ten_thousand_errors_while_events_keep_flowing(
) -> anyhow::Result<()> {
    binary_watchdog("flood", || {
        let (t, probe) = start(&[])?;
        let flooder = RawCell::open(t.command_endpoint())?;
        const N: usize = 10_000;
        let mut codes = Vec::with_capacity(N);
        let end = Instant::now() + Duration::from_secs(15);
        let mut sent = 0;
        // Send and read replies as they come, so neither side's queue
        // holds everything.
        while codes.len() < N {
            if Instant::now() > end {
                bail!(
                    "{} of {N} replies after 15 s ({sent} sent); log:\n{}",
                    codes.len(),
                    t.log()
                );
            }
            while sent < N && sent - codes.len() < 1000 {
                flooder.send(FLOOD[sent % FLOOD.len()].0)?;
                sent += 1;
            }
            if let Some(parts) = flooder.recv_parts(Duration::from_millis(100))? {
                let m = thynapse_tests::Msg::decode(parts)?;
                assert_eq!(m.verb, "ERRR", "reply #{}: {m}", codes.len() + 1);
                codes.push(m.body["code"].as_str().unwrap_or("?").to_owned());
            }
        }
        // Replies to one connection come in command order.
        for (i, code) in codes.iter().enumerate() {
            let want = FLOOD[i % FLOOD.len()].1;
            assert_eq!(
                code,
                want,
                "reply #{} to {:?}",
                i + 1,
                FLOOD[i % FLOOD.len()].0
            );
        }
        assert!(
            flooder.recv_parts(Duration::ZERO)?.is_none(),
            "more replies than commands"
        );
        // The flooder's connection still works, and so does everyone's.
        let mut flooder = flooder;
        flooder.ping()?;
        flooder.hello("flooder")?;
        still_healthy_then_shut_down(t, probe)
    })
}

#[test]
fn a_message_above_max_frame_cuts_off_only_its_sender() -> anyhow::Result<()> {
    binary_watchdog("max_frame", || {
        const MAX: usize = 64 * 1024;
        let (t, probe) = start(&["--max-frame", "65536"])?;

        let mut big = RawCell::unconnected(None)?;
        let monitor = big.monitor()?;
        big.connect(t.command_endpoint())?;
        let welcome = big.hello("big")?;
        assert_eq!(welcome["limits"]["max_frame"], MAX);
        monitor.expect(zmq::SocketEvent::HANDSHAKE_SUCCEEDED, REPLY_TIMEOUT)?;

        // Just under the limit: handled like any message.
        let under = format!(
            r#"J EVNT {{"channel":"big::x","payload":"{}","confirm":true,"ref":"r-under"}}"#,
            "u".repeat(MAX - 200)
        );
        assert!(under.len() <= MAX);
        big.send(&under)?;
        assert_eq!(big.expect_error("no_listeners")?["re"], "r-under");

        // 100 KiB: libzmq drops the connection while decoding it.
        let over = format!(
            r#"J EVNT {{"channel":"big::x","payload":"{}","confirm":true,"ref":"r-over"}}"#,
            "o".repeat(100 * 1024)
        );
        big.send(&over)?;
        monitor
            .expect(zmq::SocketEvent::DISCONNECTED, REPLY_TIMEOUT)
            .context("the oversize sender was not disconnected")?;
        // Nothing was answered to it.
        assert!(
            big.drain()?.iter().all(|m| m.body["re"] != "r-over"),
            "the oversize message was answered"
        );

        // Everyone else is unaffected.
        probe.wait_for_more(5, REPLY_TIMEOUT)?;

        // libzmq reconnects the DEALER: a new connection, which the
        // transmitter has not welcomed.
        monitor.expect(zmq::SocketEvent::HANDSHAKE_SUCCEEDED, REPLY_TIMEOUT)?;
        big.ping()?;
        big.send(r#"J LSTN {"pattern":"big::*","mode":"any","ref":"r-after"}"#)?;
        assert_eq!(big.expect_error("not_welcomed")?["re"], "r-after");
        // Its THID is taken over once the old connection counts as gone
        // (PROTOCOL.md §4 Reconnects: at most 3 heartbeats, 3 s by
        // default); until then a HELO with it gets thid_in_use.
        let mut welcomed = false;
        wait_until(
            "the THID of the cut-off cell to be free again",
            Duration::from_secs(8),
            Duration::from_millis(100),
            || {
                let reference = big.next_ref();
                if big
                    .send_json(
                        "HELO",
                        &json!({"id": big.id(), "service": "big", "ref": reference}),
                    )
                    .is_err()
                {
                    return false;
                }
                match big.expect_where("WLCM or ERRR", REPLY_TIMEOUT, |m| {
                    m.body["ref"] == reference || m.body["re"] == reference
                }) {
                    Ok(m) if m.verb == "WLCM" => welcomed = true,
                    Ok(m) if m.body["code"] == "thid_in_use" => {}
                    Ok(m) => panic!("unexpected {m}"),
                    Err(e) => panic!("{e:#}"),
                }
                welcomed
            },
        )?;
        big.ping()?;
        still_healthy_then_shut_down(t, probe)
    })
}
