//! A cell written with the pure-Rust `zeromq` crate (async, on tokio; no
//! libzmq on its side) joins a transmitter, follows membership on a SUB
//! (with the SYNC handshake), listens anycatch and multicatch, gets a DLVR
//! and acks it, and gets the multicatch EVNT on its DEALER: the wire
//! protocol is plain ZMTP, not a libzmq peculiarity.

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use thynapse_protocol::Thid;
use thynapse_tests::{Msg, RawCell, REPLY_TIMEOUT, TEST_DEADLINE};
use thynapse_transmitter::{Config, Transmitter};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// The next message on the DEALER, decoded.
async fn recv(dealer: &mut DealerSocket) -> anyhow::Result<Msg> {
    let m = tokio::time::timeout(REPLY_TIMEOUT, dealer.recv())
        .await
        .map_err(|_| anyhow!("nothing on the DEALER within {REPLY_TIMEOUT:?}"))??;
    Msg::decode(m.into_vec().into_iter().map(|b| b.to_vec()).collect())
}

/// Sends `J VERB body` on the DEALER.
async fn send(dealer: &mut DealerSocket, verb: &str, body: Value) -> anyhow::Result<()> {
    dealer
        .send(ZmqMessage::from(format!("J {verb} {body}")))
        .await
        .with_context(|| format!("sending {verb}"))
}

/// Sends a command with `ref` and waits for `verb` with that ref; any
/// other message in between fails the test.
async fn call(
    dealer: &mut DealerSocket,
    verb: &str,
    mut body: Value,
    reply: &str,
) -> anyhow::Result<Value> {
    let reference = format!("zrs-{verb}-{}", body["pattern"].as_str().unwrap_or(""));
    body["ref"] = json!(reference);
    send(dealer, verb, body).await?;
    let m = recv(dealer).await?;
    if m.verb != reply || m.body["ref"] != reference.as_str() {
        bail!("{verb}: expected {reply} with ref {reference}, got {m}");
    }
    Ok(m.body)
}

/// The next frame on the SUB.
async fn recv_sub(sub: &mut SubSocket) -> anyhow::Result<Vec<u8>> {
    let m = tokio::time::timeout(REPLY_TIMEOUT, sub.recv())
        .await
        .map_err(|_| anyhow!("nothing on the SUB within {REPLY_TIMEOUT:?}"))??;
    if m.len() != 1 {
        bail!("a message of {} frames on the SUB", m.len());
    }
    Ok(m.get(0).map(|b| b.to_vec()).unwrap_or_default())
}

async fn scenario() -> anyhow::Result<()> {
    // Started on a runtime thread on purpose: embedding a transmitter in an
    // async program must work.
    let t = Transmitter::start(Config::for_tests())?;
    let id = Thid::random();

    // Join.
    let mut dealer = DealerSocket::new();
    dealer.connect(t.command_endpoint()).await?;
    let welcome = call(
        &mut dealer,
        "HELO",
        json!({"id": id, "service": "pure-rust", "metadata": {"lang": "rust", "zmq": "zeromq"}}),
        "WLCM",
    )
    .await?;
    assert_eq!(welcome["id"], t.id().to_hex());
    let endpoint = welcome["pub"].as_str().context("WLCM without pub")?;

    // Follow the publisher's service, and make sure the subscription is in
    // place (SYNC).
    let mut sub = SubSocket::new();
    sub.connect(endpoint).await?;
    sub.subscribe("MEMB libzmq-publisher ").await?;
    let marker = format!("SYNC {id}-1");
    sub.subscribe(&marker).await?;
    let first = recv_sub(&mut sub).await.context("SYNC handshake")?;
    assert_eq!(first, marker.as_bytes(), "first frame on the SUB");
    sub.unsubscribe(&marker).await?;

    // Listen both ways.
    call(
        &mut dealer,
        "LSTN",
        json!({"pattern": "zrs::any::*", "mode": "any"}),
        "OKAY",
    )
    .await?;
    call(
        &mut dealer,
        "LSTN",
        json!({"pattern": "zrs::multi::*", "mode": "multi"}),
        "OKAY",
    )
    .await?;

    // Another cell (libzmq) publishes one event of each kind.
    let endpoint = t.command_endpoint().to_owned();
    let (publisher, okay_any, okay_multi) = tokio::task::spawn_blocking(move || {
        let mut p = RawCell::open(&endpoint)?;
        p.hello("libzmq-publisher")?;
        let any = p.publish_confirmed("zrs::any::one", &json!({"k": 1}))?;
        let multi = p.publish_confirmed("zrs::multi::two", &json!({"k": [2, "two"]}))?;
        anyhow::Ok((p.id(), any, multi))
    })
    .await??;
    assert_eq!(okay_any["routed"], 1);
    assert_eq!(okay_multi["routed"], 1);

    // The publisher's arrival on the SUB.
    let joined = recv_sub(&mut sub).await?;
    let joined = String::from_utf8(joined)?;
    let body: Value = serde_json::from_str(
        joined
            .strip_prefix("MEMB libzmq-publisher ")
            .with_context(|| format!("not the publisher's MEMB frame: {joined:?}"))?,
    )?;
    assert_eq!(body["event"], "joined", "{body}");
    assert_eq!(body["cell"]["id"], publisher.to_hex(), "{body}");

    // The anycatch delivery, then the multicatch event, in publish order.
    let d = recv(&mut dealer).await?;
    assert_eq!(d.verb, "DLVR", "{d}");
    assert_eq!(d.body["id"], okay_any["id"]);
    assert_eq!(d.body["channel"], "zrs::any::one");
    assert_eq!(d.body["from"], publisher.to_hex());
    assert_eq!(d.body["attempt"], 1);
    assert_eq!(d.body["payload"], json!({"k": 1}));
    assert!(d.binary.is_none());
    let e = recv(&mut dealer).await?;
    assert_eq!(e.verb, "EVNT", "{e}");
    assert_eq!(e.body["id"], okay_multi["id"]);
    assert_eq!(e.body["channel"], "zrs::multi::two");
    assert_eq!(e.body["from"], publisher.to_hex());
    assert_eq!(e.body["payload"], json!({"k": [2, "two"]}));
    assert!(e.body.get("attempt").is_none(), "EVNT with an attempt: {e}");
    assert!(e.binary.is_none());

    // Only the DLVR is acked; an unknown id would get an ERRR before this
    // PONG.
    send(&mut dealer, "ACKN", json!({"ids": [d.body["id"]]})).await?;
    call(&mut dealer, "PING", json!({}), "PONG").await?;
    assert_eq!(t.metrics().snapshot()["acks"], 1);

    // Leave.
    send(&mut dealer, "GBYE", json!({"reason": "done"})).await?;
    let cells_left = tokio::task::spawn_blocking(move || {
        thynapse_tests::eventually(REPLY_TIMEOUT, thynapse_tests::POLL, || {
            t.metrics().snapshot()["cells"] == 1
        })
    })
    .await?;
    assert!(cells_left, "the GBYE did not remove the cell");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_written_with_the_pure_rust_zeromq_crate_joins_listens_both_ways_and_acks(
) -> anyhow::Result<()> {
    tokio::time::timeout(TEST_DEADLINE, scenario())
        .await
        .map_err(|_| anyhow!("watchdog: still running after {TEST_DEADLINE:?}; it hangs"))?
}
