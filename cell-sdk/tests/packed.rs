//! Packed batches (PROTOCOL.md §23) on the wire, against a scripted
//! raw-socket transmitter that shows exactly what the SDK sends: batches
//! of binary events packed into one binary frame when the `WLCM` says
//! `"packed":true`, a binary frame per event when it does not; and packed
//! `DLVR` and `EVNT` batches read back into events with their exact bytes.
//! (Against a real transmitter, tests/batches.rs.)

use std::time::Duration;

use serde_json::Value;
use thynapse_cell::{Client, Mode, Options};

/// Upper bound for any one test; the script's receives time out sooner.
const WATCHDOG: Duration = Duration::from_secs(20);

/// Events the publishing tests send back to back.
const EVENTS: usize = 2_000;

/// The binary payload of event `n`: empty for every tenth, else bytes
/// derived from `n`, of a length that varies with it.
fn payload(n: usize) -> Vec<u8> {
    let len = if n % 10 == 3 { 0 } else { 1 + (n * 7) % 300 };
    (0..len).map(|i| (i ^ n) as u8).collect()
}

/// A scripted transmitter's ROUTER on a loopback port of its own.
fn router(ctx: &zmq::Context) -> zmq::Socket {
    let s = ctx.socket(zmq::ROUTER).unwrap();
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(10_000).unwrap();
    s.bind("tcp://127.0.0.1:*").unwrap();
    s
}

/// One message from the cell: its peer id, verb, JSON body and binary
/// frames.
struct FromCell {
    peer: Vec<u8>,
    verb: String,
    body: Value,
    binaries: Vec<Vec<u8>>,
}

fn recv(router: &zmq::Socket) -> FromCell {
    let mut frames = router.recv_multipart(0).expect("a message from the cell");
    let binaries = frames.split_off(2);
    let text = String::from_utf8(frames.pop().unwrap()).expect("UTF-8 command");
    FromCell {
        peer: frames.pop().unwrap(),
        verb: text[2..6].to_owned(),
        body: serde_json::from_str(text[6..].trim()).expect("JSON body"),
        binaries,
    }
}

fn send(router: &zmq::Socket, peer: &[u8], frames: &[&[u8]]) {
    router.send(peer, zmq::SNDMORE).unwrap();
    router.send_multipart(frames, 0).expect("send to the cell");
}

/// Answers HELO with a `WLCM` that says `"packed":true` or not, and a
/// PING with its PONG; returns the other messages.
fn next(router: &zmq::Socket, packed: bool) -> FromCell {
    loop {
        let m = recv(router);
        let answer = match m.verb.as_str() {
            "HELO" => {
                assert_eq!(
                    (&m.body["batch"], &m.body["packed"]),
                    (&Value::Bool(true), &Value::Bool(true)),
                    "the cell takes packed batches"
                );
                let packed = if packed { r#","packed":true"# } else { "" };
                format!(
                    r#"J WLCM {{"id":"{}","pub":"tcp://127.0.0.1:1","heartbeat_ms":60000,"limits":{{"max_frame":1048576,"ack_timeout_ms":30000}},"batch":true{packed},"ref":{}}}"#,
                    "ab".repeat(20),
                    m.body["ref"]
                )
            }
            "PING" => format!(r#"J PONG {{"ref":{}}}"#, m.body["ref"]),
            _ => return m,
        };
        send(router, &m.peer, &[answer.as_bytes()]);
    }
}

/// After the cell's `GBYE`: answers the `PING` with which a closing cell
/// makes sure it was heard.
fn farewell(router: &zmq::Socket) {
    let m = recv(router);
    assert_eq!(m.verb, "PING", "{}", m.body);
    let pong = format!(r#"J PONG {{"ref":{}}}"#, m.body["ref"]);
    send(router, &m.peer, &[pong.as_bytes()]);
}

/// What the script saw of the cell's publishes.
#[derive(Default)]
struct Published {
    /// Every event's `seq` and binary payload, in arrival order.
    events: Vec<(u64, Vec<u8>)>,
    /// Batches that came packed.
    packed: usize,
    /// Batches of several events that came a binary frame per event.
    unpacked: usize,
}

/// Plays a transmitter taking `EVENTS` binary publishes, then the cell's
/// `GBYE`.
fn take_publishes(router: zmq::Socket, packed: bool) -> Published {
    let mut seen = Published::default();
    loop {
        let m = next(&router, packed);
        match m.verb.as_str() {
            "GBYE" => {
                farewell(&router);
                break;
            }
            "EVNT" => {}
            other => panic!("unexpected {other} {}", m.body),
        }
        let Value::Array(elements) = m.body else {
            assert_eq!(m.binaries.len(), 1, "a single event, its own frame");
            assert!(m.body.get("bin").is_none());
            let seq = m.body["seq"].as_u64().unwrap();
            seen.events.push((seq, m.binaries[0].clone()));
            continue;
        };
        assert!(elements.len() > 1 && elements.len() <= 256);
        let bins: Vec<Option<u64>> = elements.iter().map(|e| e["bin"].as_u64()).collect();
        let payloads = if bins[0].is_some() {
            assert!(
                packed,
                "a packed batch to a transmitter that did not say packed"
            );
            assert_eq!(m.binaries.len(), 1, "a packed batch has one binary frame");
            seen.packed += 1;
            let mut rest = &m.binaries[0][..];
            let cut: Vec<Vec<u8>> = bins
                .iter()
                .map(|bin| {
                    let (payload, after) =
                        rest.split_at(bin.expect("every element has bin") as usize);
                    rest = after;
                    payload.to_vec()
                })
                .collect();
            assert!(rest.is_empty(), "the bins add up to the frame");
            cut
        } else {
            assert!(bins.iter().all(Option::is_none));
            assert_eq!(m.binaries.len(), elements.len());
            seen.unpacked += 1;
            m.binaries
        };
        for (e, p) in elements.iter().zip(payloads) {
            seen.events.push((e["seq"].as_u64().unwrap(), p));
        }
    }
    seen
}

/// Publishes `EVENTS` binary events back to back to a script whose `WLCM`
/// says `packed` or not; returns what the script saw.
async fn publish_to_script(packed: bool) -> Published {
    let ctx = zmq::Context::new();
    let router = router(&ctx);
    let endpoint = router.get_last_endpoint().unwrap().unwrap();
    let script = std::thread::spawn(move || take_publishes(router, packed));
    let cell = Client::connect(&endpoint, Options::new("api"))
        .await
        .expect("welcomed");
    for n in 0..EVENTS {
        cell.publish_bytes("prices::eur", payload(n)).await.unwrap();
    }
    // Every publish sent (`close` does not wait for queued ones).
    cell.flush().await.unwrap();
    cell.close().await;
    let seen = tokio::task::spawn_blocking(move || script.join())
        .await
        .unwrap()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    // Every event, in order, with its exact bytes.
    let first = seen.events.first().map_or(0, |e| e.0);
    assert_eq!(seen.events.len(), EVENTS);
    for (n, (seq, bytes)) in seen.events.iter().enumerate() {
        assert_eq!(*seq, first + n as u64, "event {n} in order");
        assert_eq!(*bytes, payload(n), "event {n} intact");
    }
    seen
}

#[tokio::test]
async fn binary_publishes_go_packed_to_a_transmitter_that_says_packed() {
    let seen = tokio::time::timeout(WATCHDOG, publish_to_script(true))
        .await
        .expect("test watchdog fired");
    assert!(seen.packed > 0, "no packed batch");
    assert_eq!(seen.unpacked, 0);
}

#[tokio::test]
async fn binary_publishes_keep_a_frame_each_when_the_welcome_lacks_packed() {
    let seen = tokio::time::timeout(WATCHDOG, publish_to_script(false))
        .await
        .expect("test watchdog fired");
    assert_eq!(seen.packed, 0);
    assert!(seen.unpacked > 0, "no batch at all");
}

/// Welcomes the cell, accepts its two listens, sends a packed `DLVR`
/// batch (sizes 3, 0, 5) and a packed multicatch `EVNT` batch, and
/// expects the `DLVR`s' ids acked.
fn deliver_packed(router: zmq::Socket) {
    let mut peer = Vec::new();
    for _ in 0..2 {
        let m = next(&router, true);
        assert_eq!(m.verb, "LSTN");
        let okay = format!(r#"J OKAY {{"ref":{}}}"#, m.body["ref"]);
        send(&router, &m.peer, &[okay.as_bytes()]);
        peer = m.peer;
    }
    let from = "ef".repeat(20);
    let element = |id: &str, channel: &str, attempt: &str, bin: usize| {
        format!(r#"{{"id":"{id}","channel":"{channel}","from":"{from}"{attempt},"bin":{bin}}}"#)
    };
    let ids = ["01", "02", "03"].map(|b| b.repeat(20));
    let dlvr = format!(
        "J DLVR [{},{},{}]",
        element(&ids[0], "jobs::x", r#","attempt":1"#, 3),
        element(&ids[1], "jobs::x", r#","attempt":1"#, 0),
        element(&ids[2], "jobs::x", r#","attempt":1"#, 5)
    );
    send(&router, &peer, &[dlvr.as_bytes(), b"abcdefgh"]);
    let evnt = format!(
        "J EVNT [{},{}]",
        element(&"04".repeat(20), "prices::eur", "", 2),
        element(&"05".repeat(20), "prices::usd", "", 1)
    );
    send(&router, &peer, &[evnt.as_bytes(), b"xyz"]);
    let mut acked = Vec::new();
    while acked.len() < ids.len() {
        let m = next(&router, true);
        assert_eq!(m.verb, "ACKN", "{}", m.body);
        acked.extend(
            m.body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(acked, ids);
    assert_eq!(next(&router, true).verb, "GBYE");
    farewell(&router);
}

#[tokio::test]
async fn packed_deliveries_and_multicatch_events_arrive_with_their_exact_bytes() {
    let body = async {
        let ctx = zmq::Context::new();
        let router = router(&ctx);
        let endpoint = router.get_last_endpoint().unwrap().unwrap();
        let script = std::thread::spawn(move || deliver_packed(router));
        let cell = Client::connect(&endpoint, Options::new("workers"))
            .await
            .expect("welcomed");
        let mut jobs = cell.listen("jobs::*", Mode::Any).await.unwrap();
        let mut prices = cell.listen("prices::*", Mode::Multi).await.unwrap();
        for expected in [&b"abc"[..], b"", b"defgh"] {
            let event = jobs.next_event().await.expect("a delivery");
            assert_eq!(event.binary(), Some(expected));
            assert!(event.payload_raw().is_none());
        }
        for (channel, expected) in [("prices::eur", &b"xy"[..]), ("prices::usd", b"z")] {
            let mut event = prices.next_event().await.expect("a multicatch event");
            assert_eq!(event.channel(), channel);
            assert_eq!(event.take_binary().as_deref(), Some(expected));
        }
        cell.close().await;
        tokio::task::spawn_blocking(move || script.join())
            .await
            .unwrap()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    };
    tokio::time::timeout(WATCHDOG, body)
        .await
        .expect("test watchdog fired");
}
