//! Batches (PROTOCOL.md §23) over real sockets, with raw frames: a batch
//! of events published in one message reaches a cell that takes batches
//! as one `DLVR` array, in order, each binary frame with its delivery; a
//! cell that did not ask gets the same events one frame each; a bad
//! element gets its own error while the others go on; packed batches (one
//! binary frame for all) both ways.

use std::time::Duration;

use serde_json::{json, Value};
use thynapse_tests::{RawCell, REPLY_TIMEOUT};
use thynapse_transmitter::{Config, Transmitter};

/// Events in the published batch.
const EVENTS: usize = 200;

fn transmitter() -> Transmitter {
    Transmitter::start(Config {
        mesh: false,
        ..Config::for_tests()
    })
    .expect("transmitter starts")
}

/// A cell of `service` that said HELO with `batch` and listens to `jobs::*`
/// anycatch with `ack`.
fn cell(t: &Transmitter, service: &str, batch: bool, ack: bool) -> anyhow::Result<RawCell> {
    let mut c = joined(t, service, json!({"batch": batch}))?;
    c.listen("jobs::*", "any", ack)?;
    Ok(c)
}

/// A cell of `service` that said HELO with `flags` (`batch`, `packed`).
fn joined(t: &Transmitter, service: &str, flags: Value) -> anyhow::Result<RawCell> {
    let mut c = RawCell::open(t.command_endpoint())?;
    let welcome = c.hello_with(service, flags)?;
    assert_eq!(welcome["batch"], true, "the transmitter takes batches");
    assert_eq!(
        welcome["packed"], true,
        "the transmitter takes packed batches"
    );
    Ok(c)
}

/// Reads messages until `want` deliveries came, and how many messages
/// carried them.
fn deliveries(c: &RawCell, want: usize) -> anyhow::Result<(Vec<Delivery>, usize)> {
    let got = c.items("DLVR", want)?;
    Ok((got.items, got.messages))
}

/// A delivery's body and its binary frame, if any.
type Delivery = (Value, Option<Vec<u8>>);

#[test]
fn a_published_batch_reaches_a_batching_cell_as_one_array_and_others_frame_by_frame(
) -> anyhow::Result<()> {
    let t = transmitter();
    let batching = cell(&t, "batching", true, true)?;
    let plain = cell(&t, "plain", false, false)?;
    let mut publisher = RawCell::open(t.command_endpoint())?;
    publisher.hello("publisher")?;

    let events: Vec<Value> = (0..EVENTS)
        .map(|n| json!({"channel": format!("jobs::{}", n % 3), "seq": n}))
        .collect();
    let head = format!("J EVNT {}", Value::Array(events));
    let binaries: Vec<Vec<u8>> = (0..EVENTS as u32)
        .map(|n| n.to_le_bytes().to_vec())
        .collect();
    let mut parts: Vec<&[u8]> = vec![head.as_bytes()];
    parts.extend(binaries.iter().map(Vec::as_slice));
    publisher.send_parts(&parts)?;

    let (got, messages) = deliveries(&batching, EVENTS)?;
    assert!(messages < EVENTS, "merged into fewer messages: {messages}");
    for (n, (body, binary)) in got.iter().enumerate() {
        let expected = (n as u32).to_le_bytes().to_vec();
        assert_eq!(
            binary.as_ref(),
            Some(&expected),
            "in order, binary with its delivery"
        );
        assert_eq!(body["channel"], format!("jobs::{}", n % 3));
        assert_eq!(body["attempt"], 1);
    }
    let (plain_got, plain_messages) = deliveries(&plain, EVENTS)?;
    assert_eq!(
        plain_messages, EVENTS,
        "a cell that did not ask gets single frames"
    );
    let last = plain_got.last().and_then(|(_, b)| b.clone());
    assert_eq!(last, Some(199u32.to_le_bytes().to_vec()));

    // One ACKN for the whole batch settles every delivery.
    let ids: Vec<&Value> = got.iter().map(|(b, _)| &b["id"]).collect();
    batching.send_json("ACKN", &json!({ "ids": ids }))?;
    let acked = thynapse_tests::eventually(REPLY_TIMEOUT, Duration::from_millis(10), || {
        t.metrics().snapshot()["acks"] == EVENTS as u64
    });
    assert!(acked, "acks: {}", t.metrics().snapshot()["acks"]);
    assert_eq!(t.metrics().snapshot()["events_in"], EVENTS as u64);
    Ok(())
}

#[test]
fn a_bad_element_of_a_batch_gets_its_own_error_and_the_others_go_on() -> anyhow::Result<()> {
    let t = transmitter();
    let batching = cell(&t, "batching", true, false)?;
    let mut publisher = RawCell::open(t.command_endpoint())?;
    publisher.hello("publisher")?;

    publisher.send(
        r#"J EVNT [{"channel":"jobs::a","payload":1},{"channel":"jobs::*","ref":"bad"},{"channel":"jobs::b","payload":2,"confirm":true,"ref":"c"}]"#,
    )?;
    let error = publisher.expect_error("bad_pattern")?;
    assert_eq!(error["re"], "bad");
    let okay = publisher.expect_reply("OKAY", &json!("c"))?;
    assert_eq!(okay["routed"], 1);
    let (got, _) = deliveries(&batching, 2)?;
    let payloads: Vec<&Value> = got.iter().map(|(d, _)| &d["payload"]).collect();
    assert_eq!(payloads, [&json!(1), &json!(2)]);

    // Binary frames must match the elements: one each, or none.
    publisher.send_parts(&[br#"J EVNT [{"channel":"jobs::a"}]"#, b"1", b"2"])?;
    publisher.expect_error("bad_multipart")?;
    publisher.send(r#"J EVNT [{"channel":"jobs::a"},"#)?;
    publisher.expect_error("bad_json")?;

    // More than 256 events with binary frames: refused whole, by count.
    let events = Value::Array(
        (0..300)
            .map(|n| json!({"channel": "jobs::a", "seq": n}))
            .collect(),
    );
    let head = format!("J EVNT {events}");
    let mut parts: Vec<&[u8]> = vec![head.as_bytes()];
    parts.extend(std::iter::repeat_n(&b"x"[..], 300));
    publisher.send_parts(&parts)?;
    let refused = publisher.expect_error("bad_multipart")?;
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("301")),
        "{refused}"
    );
    assert!(batching.recv_parts(Duration::from_millis(100))?.is_none());
    Ok(())
}

#[test]
fn a_packed_batch_reaches_packing_cells_packed_and_the_others_frame_by_frame() -> anyhow::Result<()>
{
    let t = transmitter();
    let mut packing = joined(&t, "packing", json!({"batch": true, "packed": true}))?;
    packing.listen("jobs::*", "any", false)?;
    let frames = cell(&t, "frames", true, false)?;
    let mut watcher = joined(&t, "watchers", json!({"batch": true, "packed": true}))?;
    watcher.listen("jobs::*", "multi", false)?;
    let mut publisher = joined(&t, "publisher", json!({"batch": true, "packed": true}))?;

    // Payloads of varied sizes, an empty one among them.
    let payloads: Vec<Vec<u8>> = (0..EVENTS).map(|n| vec![n as u8; n % 7]).collect();
    let events: Vec<Value> = payloads
        .iter()
        .enumerate()
        .map(|(n, p)| json!({"channel": format!("jobs::{}", n % 3), "seq": n, "bin": p.len()}))
        .collect();
    let head = format!("J EVNT {}", Value::Array(events));
    publisher.send_parts(&[head.as_bytes(), &payloads.concat()])?;

    let got = packing.items("DLVR", EVENTS)?;
    assert!(
        got.packed > 0,
        "a cell that said packed gets packed batches"
    );
    let multi = watcher.items("EVNT", EVENTS)?;
    assert!(multi.packed > 0, "multicatch events come packed too");
    let plain = frames.items("DLVR", EVENTS)?;
    assert_eq!(
        plain.packed, 0,
        "a cell that did not say packed never gets one"
    );
    for delivered in [&got.items, &multi.items, &plain.items] {
        for (n, (body, binary)) in delivered.iter().enumerate() {
            assert_eq!(binary.as_ref(), Some(&payloads[n]), "in order, exact bytes");
            assert_eq!(body["channel"], format!("jobs::{}", n % 3));
        }
    }
    // The THID is the one of the event with its payload in a frame of its own.
    let expected = thynapse_protocol::Thid::for_event(&publisher.id(), 5, "jobs::2", &payloads[5]);
    assert_eq!(got.items[5].0["id"], expected.to_hex());

    // Bins that do not add up: refused whole, nothing delivered.
    publisher.send_parts(&[
        br#"J EVNT [{"channel":"jobs::0","bin":2},{"channel":"jobs::1","bin":2}]"#,
        b"abc",
    ])?;
    publisher.expect_error("bad_multipart")?;
    assert!(packing.recv_parts(Duration::from_millis(100))?.is_none());
    assert_eq!(t.metrics().snapshot()["events_in"], EVENTS as u64);
    Ok(())
}
