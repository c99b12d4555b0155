//! Every bad input gets its ERRR code, with the command's `ref` echoed in
//! `re`, and is counted; meanwhile the cells that behave keep exchanging
//! events and the misbehaving connection itself keeps working.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use thynapse_tests::{watchdog, FlowProbe, RawCell, TEST_DEADLINE};
use thynapse_transmitter::{Config, Transmitter};

/// One bad input and the ERRR it must get.
struct Case {
    /// What is wrong, for failure messages.
    what: &'static str,
    /// The frames sent, as is.
    parts: Vec<Vec<u8>>,
    /// The expected `code`.
    code: &'static str,
    /// Acceptable values of `re` (the first is what the spec prescribes;
    /// others are tolerated readings of it).
    re: Vec<Value>,
}

fn case(what: &'static str, frame: &str, code: &'static str, re: Value) -> Case {
    Case {
        what,
        parts: vec![frame.as_bytes().to_vec()],
        code,
        re: vec![re],
    }
}

/// Sends each case on `cell`, checks its ERRR, then proves events still
/// flow; returns how many of each code were expected.
fn run_cases(
    cell: &mut RawCell,
    cases: Vec<Case>,
    probe: &mut FlowProbe,
    expected: &mut BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    for c in cases {
        let parts: Vec<&[u8]> = c.parts.iter().map(Vec::as_slice).collect();
        cell.send_parts(&parts)?;
        let err = cell
            .expect_error(c.code)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", c.what))?;
        assert!(
            c.re.contains(&err["re"]),
            "{}: ERRR re = {}, expected one of {:?} (body {err})",
            c.what,
            err["re"],
            c.re
        );
        *expected.entry(format!("errors.{}", c.code)).or_default() += 1;
        probe
            .check()
            .map_err(|e| anyhow::anyhow!("events stopped flowing after {}: {e:#}", c.what))?;
    }
    Ok(())
}

/// Counter increments from `before` to `after`, for the counters that moved.
fn deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[test]
fn every_bad_input_gets_its_error_code_and_is_counted_while_a_healthy_cell_keeps_flowing(
) -> anyhow::Result<()> {
    watchdog("bad_input", TEST_DEADLINE, || {
        let t = Transmitter::start(Config::for_tests())?;
        let mut probe = FlowProbe::join(t.command_endpoint(), None)?;
        probe.check()?;

        let mut bad = RawCell::open(t.command_endpoint())?;
        bad.hello("misbehaving")?;
        let other_id = thynapse_protocol::Thid::random().to_hex();
        let my_id = bad.id().to_hex();
        let unknown_delivery = thynapse_protocol::Thid::random().to_hex();

        let before = t.metrics().snapshot();
        let mut expected = BTreeMap::new();

        let welcomed_cases = vec![
            case(
                "a frame that does not parse",
                "not a command",
                "bad_frame",
                Value::Null,
            ),
            case(
                "a lowercase verb",
                r#"J ping {"ref":"r-lower"}"#,
                "bad_frame",
                Value::Null,
            ),
            case(
                "a verb of 5 letters",
                r#"J PINGS {"ref":"r-5"}"#,
                "bad_frame",
                Value::Null,
            ),
            Case {
                what: "an empty message (one empty frame)",
                parts: vec![Vec::new()],
                code: "bad_frame",
                re: vec![Value::Null],
            },
            Case {
                what: "a 3-frame message",
                parts: vec![
                    br#"J PING {"ref":"r-3frames"}"#.to_vec(),
                    b"one".to_vec(),
                    b"two".to_vec(),
                ],
                code: "bad_multipart",
                re: vec![Value::Null],
            },
            Case {
                what: "an empty first frame before a binary frame",
                parts: vec![Vec::new(), b"binary".to_vec()],
                code: "bad_frame",
                re: vec![Value::Null],
            },
            case(
                "an encoding other than J",
                r#"X PING {"ref":"r-enc"}"#,
                "bad_encoding",
                Value::Null,
            ),
            case(
                "JSON cut short",
                r#"J LSTN {"pattern":"a::*","mode":"#,
                "bad_json",
                Value::Null,
            ),
            case(
                "a body that is a string",
                r#"J PING "hello""#,
                "bad_json",
                Value::Null,
            ),
            case(
                "a body that is a number",
                "J GBYE 42",
                "bad_json",
                Value::Null,
            ),
            case(
                "a missing field",
                r#"J LSTN {"mode":"any","ref":"r-missing"}"#,
                "bad_json",
                json!("r-missing"),
            ),
            case(
                "an unknown listen mode",
                r#"J LSTN {"pattern":"a::*","mode":"sometimes","ref":"r-mode"}"#,
                "bad_json",
                json!("r-mode"),
            ),
            case(
                "an EVNT without a channel",
                r#"J EVNT {"payload":1,"ref":"r-nochan"}"#,
                "bad_json",
                json!("r-nochan"),
            ),
            case(
                "an unknown verb",
                r#"J ABCD {"ref":"r-unknown"}"#,
                "unknown_verb",
                json!("r-unknown"),
            ),
            case(
                "a verb only the transmitter sends",
                r#"J DLVR {"ref":"r-dlvr"}"#,
                "unknown_verb",
                json!("r-dlvr"),
            ),
            case(
                "a pattern with a space",
                r#"J LSTN {"pattern":"a b","mode":"any","ref":"r-space"}"#,
                "bad_pattern",
                json!("r-space"),
            ),
            case(
                "an empty pattern",
                r#"J LSTN {"pattern":"","mode":"multi","ref":"r-empty"}"#,
                "bad_pattern",
                json!("r-empty"),
            ),
            case(
                "a pattern over 255 bytes",
                &format!(
                    r#"J LSTN {{"pattern":"{}","mode":"any","ref":"r-long"}}"#,
                    "a".repeat(256)
                ),
                "bad_pattern",
                json!("r-long"),
            ),
            case(
                "a body that is a JSON array",
                r#"J LSTN ["a::*","any"]"#,
                "bad_json",
                Value::Null,
            ),
            case(
                "UNLS of an invalid pattern",
                r#"J UNLS {"pattern":"a b","ref":"r-unls-bad"}"#,
                "bad_pattern",
                json!("r-unls-bad"),
            ),
            case(
                "a wildcard in a published channel",
                r#"J EVNT {"channel":"a::*","payload":{},"ref":"r-wild"}"#,
                "bad_pattern",
                json!("r-wild"),
            ),
            case(
                "UNLS of a pattern never listened to",
                r#"J UNLS {"pattern":"never::*","ref":"r-unls"}"#,
                "not_listening",
                json!("r-unls"),
            ),
            case(
                "ACKN of an unknown delivery",
                &format!(r#"J ACKN {{"id":"{unknown_delivery}"}}"#),
                "unknown_delivery",
                json!(unknown_delivery),
            ),
            case(
                "a confirmed EVNT without a ref nobody listens to",
                &format!(r#"J EVNT {{"channel":"nobody::here","id":"{other_id}","confirm":true}}"#),
                "no_listeners",
                json!(other_id),
            ),
            Case {
                what: "a frame that is not UTF-8",
                parts: vec![b"J PING {\"ref\":\"\xff\xfe\"}".to_vec()],
                code: "bad_json",
                re: vec![Value::Null],
            },
            case(
                "a wildcard in a published channel, without a ref",
                &format!(r#"J EVNT {{"channel":"a::?","id":"{other_id}"}}"#),
                "bad_pattern",
                json!(other_id),
            ),
            case(
                "a service name with a space, without a ref",
                &format!(r#"J HELO {{"id":"{my_id}","service":"has space"}}"#),
                "bad_service",
                json!(my_id),
            ),
            case(
                "a confirmed EVNT nobody listens to",
                r#"J EVNT {"channel":"nobody::here","payload":{},"confirm":true,"ref":"r-nobody"}"#,
                "no_listeners",
                json!("r-nobody"),
            ),
            case(
                "a service name with a space",
                &format!(r#"J HELO {{"id":"{my_id}","service":"has space","ref":"r-svc"}}"#),
                "bad_service",
                json!("r-svc"),
            ),
            case(
                "a service name of 129 bytes",
                &format!(
                    r#"J HELO {{"id":"{my_id}","service":"{}","ref":"r-svc-long"}}"#,
                    "s".repeat(129)
                ),
                "bad_service",
                json!("r-svc-long"),
            ),
            case(
                "a HELO with another THID on a welcomed connection",
                &format!(r#"J HELO {{"id":"{other_id}","service":"misbehaving","ref":"r-other"}}"#),
                "thid_in_use",
                json!("r-other"),
            ),
            case(
                "a HELO whose id is not a THID",
                r#"J HELO {"id":"not-hex","service":"misbehaving","ref":"r-notthid"}"#,
                "bad_json",
                json!("r-notthid"),
            ),
        ];
        run_cases(&mut bad, welcomed_cases, &mut probe, &mut expected)?;

        // The connection that sent all that is still a welcomed cell.
        bad.ping()?;
        bad.listen("misbehaving::*", "any", false)?;
        bad.send(r#"PING {"ref":"r-unprefixed"}"#)?;
        bad.expect_reply("PONG", &json!("r-unprefixed"))?;

        // A connection that never said HELO.
        let mut early = RawCell::open(t.command_endpoint())?;
        let early_cases = vec![
            case(
                "LSTN before HELO",
                r#"J LSTN {"pattern":"a::*","mode":"any","ref":"r-early"}"#,
                "not_welcomed",
                json!("r-early"),
            ),
            case(
                "EVNT before HELO",
                r#"J EVNT {"channel":"a::b","payload":1,"ref":"r-early-evnt"}"#,
                "not_welcomed",
                json!("r-early-evnt"),
            ),
            case(
                "ACKN before HELO",
                &format!(r#"J ACKN {{"id":"{unknown_delivery}","ref":"r-early-ackn"}}"#),
                "not_welcomed",
                json!("r-early-ackn"),
            ),
            case(
                "a HELO without a ref with the THID of a live cell",
                &format!(r#"J HELO {{"id":"{my_id}","service":"impostor"}}"#),
                "thid_in_use",
                json!(my_id),
            ),
            case(
                "a HELO with the THID of a cell live on another connection",
                &format!(r#"J HELO {{"id":"{my_id}","service":"impostor","ref":"r-impostor"}}"#),
                "thid_in_use",
                json!("r-impostor"),
            ),
        ];
        run_cases(&mut early, early_cases, &mut probe, &mut expected)?;
        // PING needs no HELO.
        early.ping()?;

        // The impostor did not take over: the real cell still gets its
        // deliveries, the impostor none.
        let okay = probe
            .publisher
            .publish_confirmed("misbehaving::still-mine", &json!("x"))?;
        assert_eq!(okay["routed"], 1, "OKAY {okay}");
        let d = bad.expect("DLVR", thynapse_tests::REPLY_TIMEOUT)?;
        assert_eq!(d["id"], okay["id"]);
        assert_eq!(early.drain()?, vec![], "the impostor got something");

        // Nothing was left over anywhere, and no one else got an ERRR.
        assert_eq!(bad.drain()?, vec![]);
        assert_eq!(probe.publisher.drain()?, vec![]);
        assert_eq!(probe.listener.drain()?, vec![]);

        // Every error reply was counted, once, under its code, and no other
        // error was.
        let moved = deltas(&before, &t.metrics().snapshot());
        let errors: BTreeMap<String, u64> = moved
            .iter()
            .filter(|(k, _)| k.starts_with("errors."))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        assert_eq!(
            errors, expected,
            "error counters (left: seen, right: expected)"
        );
        let sent = expected.values().sum::<u64>();
        assert!(
            moved.get("commands").copied().unwrap_or(0) >= sent,
            "commands counter moved by {:?}, fewer than the {sent} bad commands",
            moved.get("commands")
        );
        Ok(())
    })
}

#[test]
fn a_second_helo_with_the_same_thid_on_the_same_connection_is_welcomed_again() -> anyhow::Result<()>
{
    watchdog("helo_again", TEST_DEADLINE, || {
        let t = Transmitter::start(Config::for_tests())?;
        let mut cell = RawCell::open(t.command_endpoint())?;
        let first = cell.hello("first-name")?;
        let second = cell.hello("second-name")?;
        assert_eq!(first["id"], second["id"]);
        assert_eq!(first["pub"], second["pub"]);
        assert_eq!(t.metrics().snapshot()["cells"], 1);
        assert_eq!(t.metrics().errors_total(), 0);
        Ok(())
    })
}

#[test]
fn a_cell_with_1024_listens_gets_too_many_listens_for_one_more_but_may_replace_one(
) -> anyhow::Result<()> {
    watchdog("too_many_listens", TEST_DEADLINE, || {
        let t = Transmitter::start(Config::for_tests())?;
        let mut cell = RawCell::open(t.command_endpoint())?;
        cell.hello("greedy")?;
        let max = thynapse_protocol::limits::MAX_LISTENS_PER_CELL;
        for i in 0..max {
            cell.send_json(
                "LSTN",
                &json!({"pattern": format!("greedy::{i}"), "mode": "any", "ack": false}),
            )?;
        }
        // Replies come in command order: the PONG comes after every OKAY.
        cell.ping()?;
        let replies = cell.drain()?;
        assert_eq!(replies.len(), max, "replies to {max} LSTNs");
        assert!(replies.iter().all(|m| m.verb == "OKAY"), "not all OKAY");
        cell.send(r#"J LSTN {"pattern":"greedy::one-more","mode":"any","ref":"r-more"}"#)?;
        let err = cell.expect_error("too_many_listens")?;
        assert_eq!(err["re"], "r-more");
        // Listening again to a pattern already listened to replaces it.
        cell.listen("greedy::0", "multi", false)?;
        Ok(())
    })
}

#[test]
fn a_cell_that_went_silent_is_expired_gets_not_welcomed_and_may_join_again() -> anyhow::Result<()> {
    watchdog("expiry", TEST_DEADLINE, || {
        let config = Config {
            heartbeat: std::time::Duration::from_millis(100),
            ..Config::for_tests()
        };
        let t = Transmitter::start(config)?;
        let mut cell = RawCell::open(t.command_endpoint())?;
        let welcome = cell.hello("sleepy")?;
        assert_eq!(welcome["heartbeat_ms"], 100);
        cell.listen("sleepy::*", "any", true)?;
        // Stay silent until the transmitter has expired the cell.
        thynapse_tests::wait_until(
            "the silent cell to expire",
            std::time::Duration::from_secs(5),
            thynapse_tests::POLL,
            || t.metrics().snapshot()["expired_cells"] == 1,
        )?;
        assert_eq!(t.metrics().snapshot()["cells"], 0);
        cell.send(r#"J UNLS {"pattern":"sleepy::*","ref":"r-late"}"#)?;
        assert_eq!(cell.expect_error("not_welcomed")?["re"], "r-late");
        // The SDK's recovery: HELO again (same THID) and listen again.
        cell.hello("sleepy")?;
        cell.listen("sleepy::*", "any", true)?;
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("waker")?;
        let okay = publisher.publish_confirmed("sleepy::wake", &json!(1))?;
        let d = cell.expect("DLVR", thynapse_tests::REPLY_TIMEOUT)?;
        assert_eq!(d["id"], okay["id"]);
        Ok(())
    })
}
