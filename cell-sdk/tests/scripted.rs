//! The SDK against a scripted raw-socket transmitter, for what a real one
//! cannot be made to do on demand: drop the TCP connection without GBYE,
//! vanish, redeliver an event that was already acked.

use std::time::Duration;

use serde_json::Value;
use thynapse_cell::{Client, Mode, Options};

/// Upper bound for the test; the scripted peer's receives time out sooner.
const WATCHDOG: Duration = Duration::from_secs(20);

/// One command from the cell: the verb and its JSON body.
fn recv_command(router: &zmq::Socket) -> (Vec<u8>, String, Value) {
    let frames = router.recv_multipart(0).expect("a message from the cell");
    let peer = frames[0].clone();
    let text = String::from_utf8(frames[1].clone()).expect("UTF-8 command");
    let verb = text[2..6].to_owned();
    let body = serde_json::from_str(text[6..].trim()).expect("JSON body");
    (peer, verb, body)
}

/// The next command other than PING (PINGs are answered).
fn expect(router: &zmq::Socket, verb: &str) -> (Vec<u8>, Value) {
    loop {
        let (peer, v, body) = recv_command(router);
        if v == "PING" {
            router
                .send_multipart([peer.as_slice(), b"J PONG {}"], 0)
                .unwrap();
            continue;
        }
        assert_eq!(v, verb, "expected {verb}, got {v} {body}");
        return (peer, body);
    }
}

fn reply(router: &zmq::Socket, peer: &[u8], frame: String) {
    router
        .send_multipart([peer, frame.as_bytes()], 0)
        .expect("reply");
}

/// A ROUTER bound to `endpoint`. libzmq closes sockets in the background,
/// so rebinding a port just released is retried for a while.
fn router(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let s = ctx.socket(zmq::ROUTER).unwrap();
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(10_000).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match s.bind(endpoint) {
            Ok(()) => return s,
            Err(zmq::Error::EADDRINUSE) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("bind {endpoint}: {e}"),
        }
    }
}

/// Plays a transmitter: welcome, accept the listen, drop the connection
/// (close the socket, bind a fresh one on the same port), then expect the
/// cell to say HELO again with the same THID and to LSTN again.
fn scripted_transmitter(ctx: zmq::Context, command: zmq::Socket, events: String) {
    let endpoint = command.get_last_endpoint().unwrap().expect("an endpoint");
    let welcome = |r: &Value| {
        format!(
            r#"J WLCM {{"id":"{}","pub":"{events}","heartbeat_ms":1000,"limits":{{"max_frame":1048576,"ack_timeout_ms":30000}},"ref":{r}}}"#,
            "ab".repeat(20)
        )
    };

    let (peer, hello) = expect(&command, "HELO");
    reply(&command, &peer, welcome(&hello["ref"]));
    let (peer, listen) = expect(&command, "LSTN");
    assert_eq!(listen["pattern"], "jobs::*");
    reply(
        &command,
        &peer,
        format!(r#"J OKAY {{"ref":{}}}"#, listen["ref"]),
    );

    // The "crash": the connection drops, a new transmitter takes the port.
    drop(command);
    let command = router(&ctx, &endpoint);
    let (peer, again) = expect(&command, "HELO");
    assert_eq!(again["id"], hello["id"], "the same cell THID");
    assert_eq!(again["service"], "workers");
    reply(&command, &peer, welcome(&again["ref"]));
    let (peer, relisten) = expect(&command, "LSTN");
    assert_eq!(relisten["pattern"], "jobs::*");
    assert_eq!(relisten["mode"], "any");
    reply(
        &command,
        &peer,
        format!(r#"J OKAY {{"ref":{}}}"#, relisten["ref"]),
    );

    // Deliveries flow on the new connection.
    let id = "cd".repeat(20);
    let from = "ef".repeat(20);
    reply(
        &command,
        &peer,
        format!(
            r#"J DLVR {{"id":"{id}","channel":"jobs::x","payload":1,"from":"{from}","attempt":1}}"#
        ),
    );
    let (_, ack) = expect(&command, "ACKN");
    assert_eq!(ack["ids"][0], Value::String(id));
}

#[tokio::test]
async fn after_a_dropped_connection_the_cell_says_hello_again_and_listens_again() {
    let ctx = zmq::Context::new();
    let command = router(&ctx, "tcp://127.0.0.1:*");
    let events = ctx.socket(zmq::XPUB).unwrap();
    events.bind("tcp://127.0.0.1:*").unwrap();
    let event_endpoint = events.get_last_endpoint().unwrap().unwrap();
    let endpoint = command.get_last_endpoint().unwrap().unwrap();
    let mut script =
        tokio::task::spawn_blocking(move || scripted_transmitter(ctx, command, event_endpoint));

    let cell = async {
        let client = Client::connect(&endpoint, Options::new("workers"))
            .await
            .expect("welcomed");
        let mut jobs = client
            .listen("jobs::*", Mode::Any)
            .await
            .expect("listening");
        let event = jobs
            .next_event()
            .await
            .expect("a delivery after the reconnect");
        assert_eq!(event.channel(), "jobs::x");
        drop(event); // acked: the script waits for the ACKN
        (client, jobs)
    };
    tokio::pin!(cell);
    // A failed assertion in the script ends the test at once.
    let run = async {
        tokio::select! {
            finished = &mut script => {
                propagate(finished);
                (cell.await, true)
            }
            kept = &mut cell => (kept, false),
        }
    };
    let ((client, _jobs), script_finished) = tokio::time::timeout(WATCHDOG, run)
        .await
        .expect("test watchdog fired");
    if !script_finished {
        propagate(
            tokio::time::timeout(WATCHDOG, script)
                .await
                .expect("the script ends"),
        );
    }
    drop(events);
    client.close().await;
}

/// Re-raises the scripted transmitter's panic in the test.
fn propagate(finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the script did not finish: {e}"),
        }
    }
}

/// Plays a transmitter that welcomes the cell (heartbeat 100 ms), accepts
/// its listen, then goes silent for good: no GBYE, connection refused.
fn vanishing_transmitter(command: zmq::Socket, events: zmq::Socket) {
    let pub_endpoint = events.get_last_endpoint().unwrap().unwrap();
    let (peer, hello) = expect(&command, "HELO");
    reply(
        &command,
        &peer,
        format!(
            r#"J WLCM {{"id":"{}","pub":"{pub_endpoint}","heartbeat_ms":100,"limits":{{"max_frame":1048576,"ack_timeout_ms":30000}},"ref":{}}}"#,
            "ab".repeat(20),
            hello["ref"]
        ),
    );
    let (peer, listen) = expect(&command, "LSTN");
    reply(
        &command,
        &peer,
        format!(r#"J OKAY {{"ref":{}}}"#, listen["ref"]),
    );
}

#[tokio::test]
async fn a_silent_transmitter_makes_the_cell_fail_over_to_the_next_endpoint() {
    let body = async {
        let ctx = zmq::Context::new();
        let command = router(&ctx, "tcp://127.0.0.1:*");
        let events = ctx.socket(zmq::XPUB).unwrap();
        events.set_linger(0).unwrap();
        events.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = command.get_last_endpoint().unwrap().unwrap();
        let script = tokio::task::spawn_blocking(move || vanishing_transmitter(command, events));

        let mut config = thynapse_transmitter::Config::for_tests();
        config.mesh = false;
        let t2 = thynapse_transmitter::Transmitter::start(config).unwrap();
        let options = Options::new("workers").endpoint(t2.command_endpoint());
        let cell = Client::connect(&endpoint, options).await.expect("welcomed");
        let mut jobs = cell.listen("jobs::*", Mode::Any).await.expect("listening");
        propagate(script.await); // the first transmitter is gone now

        // Three unanswered heartbeats (300 ms) later the cell joins t2.
        let publisher = Client::connect(t2.command_endpoint(), Options::new("api"))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let confirm = loop {
            match publisher.publish_confirmed("jobs::x", 1).await {
                Ok(confirm) => break confirm,
                Err(e) if e.kind() == thynapse_cell::ErrorKind::NoListeners => {
                    assert!(std::time::Instant::now() < deadline, "never failed over");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let event = jobs.next_event().await.expect("a delivery through t2");
        assert_eq!(event.id(), confirm.id);
        assert_eq!(event.from(), publisher.id());
        cell.close().await;
    };
    tokio::time::timeout(WATCHDOG, body)
        .await
        .expect("test watchdog fired");
}

/// Welcomes the cell, accepts its listen, delivers one event, waits for
/// its ACKN, then delivers the same event again (as if the ack had crossed
/// a redelivery) and expects a second ACKN; then a fresh event, to show
/// the cell still yields new ones.
fn redelivering_transmitter(command: zmq::Socket, events: String) {
    let (peer, hello) = expect(&command, "HELO");
    reply(
        &command,
        &peer,
        format!(
            r#"J WLCM {{"id":"{}","pub":"{events}","heartbeat_ms":1000,"limits":{{"max_frame":1048576,"ack_timeout_ms":30000}},"ref":{}}}"#,
            "ab".repeat(20),
            hello["ref"]
        ),
    );
    let (peer, listen) = expect(&command, "LSTN");
    reply(
        &command,
        &peer,
        format!(r#"J OKAY {{"ref":{}}}"#, listen["ref"]),
    );
    let from = "ef".repeat(20);
    let deliver = |id: &str, attempt: u32| {
        format!(
            r#"J DLVR {{"id":"{id}","channel":"jobs::x","payload":{attempt},"from":"{from}","attempt":{attempt}}}"#
        )
    };
    let first = "01".repeat(20);
    reply(&command, &peer, deliver(&first, 1));
    let (_, ack) = expect(&command, "ACKN");
    assert_eq!(ack["ids"], serde_json::json!([first]));
    reply(&command, &peer, deliver(&first, 2));
    let (_, ack) = expect(&command, "ACKN");
    assert_eq!(
        ack["ids"],
        serde_json::json!([first]),
        "the duplicate is re-acked"
    );
    let second = "02".repeat(20);
    reply(&command, &peer, deliver(&second, 1));
    let (_, ack) = expect(&command, "ACKN");
    assert_eq!(ack["ids"], serde_json::json!([second]));
}

#[tokio::test]
async fn a_redelivery_of_an_acked_event_is_acked_again_and_not_yielded() {
    let body = async {
        let ctx = zmq::Context::new();
        let command = router(&ctx, "tcp://127.0.0.1:*");
        let events = ctx.socket(zmq::XPUB).unwrap();
        events.bind("tcp://127.0.0.1:*").unwrap();
        let event_endpoint = events.get_last_endpoint().unwrap().unwrap();
        let endpoint = command.get_last_endpoint().unwrap().unwrap();
        let script =
            tokio::task::spawn_blocking(move || redelivering_transmitter(command, event_endpoint));
        let cell = Client::connect(&endpoint, Options::new("workers"))
            .await
            .expect("welcomed");
        let mut jobs = cell.listen("jobs::*", Mode::Any).await.expect("listening");
        let first = jobs.next_event().await.expect("the first delivery");
        assert_eq!(first.attempt(), 1);
        drop(first);
        // The redelivery (attempt 2) is swallowed: next comes the new event.
        let second = jobs.next_event().await.expect("the second event");
        assert_eq!(second.id().to_hex(), "02".repeat(20));
        drop(second);
        propagate(script.await);
        cell.close().await;
    };
    tokio::time::timeout(WATCHDOG, body)
        .await
        .expect("test watchdog fired");
}
