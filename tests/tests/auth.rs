//! With a token, both sockets are PLAIN servers: a cell presenting the
//! token as its password is welcomed and gets events, and a SUB presenting
//! it gets membership events; a wrong password, or none, is refused at the
//! handshake and nothing flows either way.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use thynapse_tests::{watchdog, RawCell, RawSub, REPLY_TIMEOUT, SILENCE, TEST_DEADLINE};
use thynapse_transmitter::{Config, Transmitter};

const TOKEN: &str = "correct horse battery staple";

fn start() -> anyhow::Result<Transmitter> {
    Ok(Transmitter::start(Config {
        token: Some(TOKEN.to_owned()),
        ..Config::for_tests()
    })?)
}

/// Sends a HELO without waiting for a connection: a refused DEALER may
/// have nowhere to queue it, which is fine.
fn try_hello(cell: &RawCell) {
    let body = json!({"id": cell.id(), "service": "intruder", "ref": "r-intruder"});
    let _ = cell
        .socket()
        .send(format!("J HELO {body}").as_bytes(), zmq::DONTWAIT);
}

#[test]
fn a_dealer_with_the_right_token_is_welcomed_and_served() -> anyhow::Result<()> {
    watchdog("right_token", TEST_DEADLINE, || {
        let t = start()?;
        let mut cell = RawCell::unconnected(Some(TOKEN))?;
        let monitor = cell.monitor()?;
        cell.connect(t.command_endpoint())?;
        let welcome = cell.hello("trusted")?;
        assert_eq!(welcome["id"], t.id().to_hex());
        monitor.expect(zmq::SocketEvent::HANDSHAKE_SUCCEEDED, REPLY_TIMEOUT)?;
        cell.listen("trusted::*", "any", true)?;
        let okay = cell.publish_confirmed("trusted::self", &json!({"to": "me"}))?;
        let d = cell.expect("DLVR", REPLY_TIMEOUT)?;
        assert_eq!(d["id"], okay["id"]);
        cell.ack(d["id"].as_str().unwrap_or_default())?;
        cell.ping()?;
        Ok(())
    })
}

#[test]
fn a_dealer_with_a_wrong_token_or_none_is_refused_at_the_handshake_and_gets_nothing(
) -> anyhow::Result<()> {
    watchdog("wrong_token", TEST_DEADLINE, || {
        let t = start()?;
        let wrong = RawCell::unconnected(Some("wrong horse"))?;
        let wrong_events = wrong.monitor()?;
        wrong.connect(t.command_endpoint())?;
        let prefix = RawCell::open_with_token(t.command_endpoint(), Some(&TOKEN[..7]))?;
        let longer = RawCell::open_with_token(t.command_endpoint(), Some(&format!("{TOKEN}!")))?;
        let none = RawCell::unconnected(None)?;
        let none_events = none.monitor()?;
        none.connect(t.command_endpoint())?;
        for cell in [&wrong, &prefix, &longer, &none] {
            try_hello(cell);
        }
        // The refusals are seen on the client side as handshake failures.
        wrong_events
            .expect(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH, REPLY_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("wrong password: {e:#}"))?;
        let (failure, seen) = none_events
            .expect_one_of(
                &[
                    zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL,
                    zmq::SocketEvent::HANDSHAKE_FAILED_AUTH,
                    zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL,
                    zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
                ],
                REPLY_TIMEOUT,
            )
            .map_err(|e| anyhow::anyhow!("no password: {e:#}"))?;
        assert_ne!(
            failure,
            zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
            "a client without credentials completed a handshake (after {seen:?})"
        );
        for (name, cell) in [
            ("a wrong", &wrong),
            ("a prefix of the", &prefix),
            ("a longer", &longer),
            ("no", &none),
        ] {
            assert_eq!(
                cell.recv_parts(SILENCE)?,
                None,
                "{name} password got an answer"
            );
        }
        // None of them became a cell, and the transmitter saw no command.
        let m = t.metrics().snapshot();
        assert_eq!(m["cells"], 0);
        assert_eq!(m["commands"], 0, "commands got through: {m:?}");
        // A right one still gets in after all those failures.
        let mut right = RawCell::open_with_token(t.command_endpoint(), Some(TOKEN))?;
        right.hello("trusted")?;
        Ok(())
    })
}

/// The next frame `sub` receives within [`REPLY_TIMEOUT`], as text.
fn next_frame(sub: &mut RawSub) -> anyhow::Result<String> {
    let parts = sub
        .recv(REPLY_TIMEOUT)?
        .context("no frame on the event socket")?;
    Ok(String::from_utf8_lossy(&parts[0]).into_owned())
}

#[test]
fn a_sub_with_a_wrong_token_receives_no_membership_events_while_a_correct_one_does(
) -> anyhow::Result<()> {
    watchdog("sub_token", TEST_DEADLINE, || {
        let t = start()?;
        let mut listener = RawCell::open_with_token(t.command_endpoint(), Some(TOKEN))?;
        let welcome = listener.hello("watcher")?;
        let endpoint = welcome["pub"].as_str().unwrap_or_default().to_owned();
        assert_eq!(endpoint, t.event_endpoint());

        // The good SUB takes everything the event socket publishes.
        let mut good = RawSub::open(&endpoint, Some(TOKEN))?;
        good.subscribe("")?;
        good.sync(REPLY_TIMEOUT)?;
        let mut bad = RawSub::unconnected(Some("wrong horse"))?;
        let bad_events = bad.monitor()?;
        bad.connect(&endpoint)?;
        bad.subscribe("")?;
        bad_events.expect(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH, REPLY_TIMEOUT)?;
        let mut none = RawSub::open(&endpoint, None)?;
        none.subscribe("")?;

        // A publisher joins, publishes multicatch events and leaves: the
        // good SUB sees it join and leave, and nothing in between, since
        // multicatch events go to the listener's DEALER.
        listener.listen("auth::*", "multi", false)?;
        let mut publisher = RawCell::open_with_token(t.command_endpoint(), Some(TOKEN))?;
        publisher.hello("speaker")?;
        let id = publisher.id().to_hex();
        let joined = next_frame(&mut good)?;
        assert!(
            joined.starts_with("MEMB speaker {") && joined.contains(&id),
            "expected the publisher's MEMB joined, got {joined:?}"
        );
        assert!(joined.ends_with(r#""event":"joined"}"#), "{joined}");
        for n in 0..5 {
            let okay = publisher.publish_confirmed("auth::news", &json!({ "n": n }))?;
            assert_eq!(okay["routed"], 1);
            let e = listener.expect("EVNT", REPLY_TIMEOUT)?;
            assert_eq!(e["channel"], "auth::news");
            assert_eq!(e["id"], okay["id"]);
            assert_eq!(e["payload"]["n"], n);
        }
        publisher.bye()?;
        let left = next_frame(&mut good)?;
        assert!(
            left.starts_with("MEMB speaker {") && left.ends_with(r#""event":"left"}"#),
            "expected the publisher's MEMB left and no multicatch frame, got {left:?}"
        );
        // Everything was published by now; the refused SUBs got none of it.
        assert_eq!(bad.recv(SILENCE)?, None, "the wrong password got a frame");
        assert_eq!(none.recv(Duration::ZERO)?, None, "no password got a frame");
        assert_eq!(t.metrics().snapshot()["syncs"], 1, "only one SYNC answered");
        Ok(())
    })
}
