//! Batches (PROTOCOL.md §23) between the SDK and a real, in-process
//! transmitter on loopback port 0: publishes ready at the same time leave
//! as one `J EVNT [...]`, batched `DLVR`s and `EVNT`s arrive as single
//! events, and nothing is lost, duplicated or reordered on the way. Both
//! sides say `packed`, so batches of binary events travel packed (their
//! payloads in one frame) both ways.
//!
//! Every test starts its own transmitter, has a watchdog timeout, and
//! waits with deadlines instead of sleeping.

mod common;

use common::*;
use thynapse_cell::{Client, ListenOptions, Mode, Subscription};
use tokio::task::JoinHandle;

/// Events each test publishes back to back.
const EVENTS: u64 = 5_000;

/// The binary payload of event `n`: its number, then bytes derived from
/// it, of a length that varies with it; every fiftieth one is empty.
fn payload(n: u64) -> Vec<u8> {
    if n % 50 == 7 {
        return Vec::new();
    }
    let mut p = n.to_le_bytes().to_vec();
    p.extend((0..(n % 97) as u8).map(|i| i.wrapping_mul(31) ^ n as u8));
    p
}

/// Whether event `n` is a JSON one: every hundredth when `mixed` (a batch
/// never mixes JSON and binary events, so this also ends batches early),
/// else none.
fn is_json(n: u64, mixed: bool) -> bool {
    mixed && n % 100 == 99
}

/// Publishes `EVENTS` events on `channel` without waiting between them:
/// binary ones, and JSON ones as `is_json` says.
async fn publish_all(publisher: &Client, channel: &str, mixed: bool) {
    for n in 0..EVENTS {
        if is_json(n, mixed) {
            publisher.publish(channel, n).await.expect("publish");
        } else {
            publisher
                .publish_bytes(channel, payload(n))
                .await
                .expect("publish_bytes");
        }
    }
}

/// Receives `EVENTS` events and checks each against what was published
/// (`mixed` as given to `publish_all`), in order; each event is dropped
/// (so acked) once checked. Returns how many had an attempt above 1.
fn receive_all(mut sub: Subscription, mixed: bool) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut redelivered = 0;
        for n in 0..EVENTS {
            let event = next(&mut sub).await;
            if is_json(n, mixed) {
                assert_eq!(event.payload::<u64>().unwrap(), n, "event {n} in order");
                assert!(event.binary().is_none());
            } else {
                assert_eq!(
                    event.binary(),
                    Some(&payload(n)[..]),
                    "event {n} in order and intact"
                );
                assert!(event.payload_raw().is_none());
            }
            if event.attempt() > 1 {
                redelivered += 1;
            }
        }
        assert!(
            arrives_within(&mut sub, std::time::Duration::from_millis(100))
                .await
                .is_none(),
            "no event twice"
        );
        redelivered
    })
}

/// Asserts that the transmitter read fewer command messages than the
/// events published since `commands_before`: publishes shared frames;
/// and that it refused none (a packed batch that does not add up is
/// refused whole with `bad_multipart`).
fn assert_batched(t: &thynapse_transmitter::Transmitter, commands_before: u64) {
    let commands = metric(t, "commands") - commands_before;
    assert_eq!(metric(t, "errors.bad_multipart"), 0);
    assert_eq!(metric(t, "events_in"), EVENTS);
    assert!(
        commands < EVENTS,
        "{EVENTS} events arrived in {commands} messages: no batch"
    );
}

#[tokio::test]
async fn events_published_back_to_back_reach_an_unacked_anycatch_listener_in_batches() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        let sub = worker
            .listen_with("jobs::*", ListenOptions::any_unacked())
            .await
            .unwrap();
        let received = receive_all(sub, true);
        let before = metric(&t, "commands");
        publish_all(&publisher, "jobs::resize", true).await;
        assert_eq!(received.await.unwrap(), 0);
        publisher.flush().await.unwrap();
        assert_batched(&t, before);
        assert_eq!(metric(&t, "deliveries"), EVENTS);
    })
    .await;
}

/// Acked anycatch: every event arrives in order, intact, and is acked
/// once, with JSON events among the binary ones (`mixed`) or not.
async fn acked_anycatch(mixed: bool) {
    let t = start(config());
    let worker = client(&t, "workers").await;
    let publisher = client(&t, "api").await;
    let sub = worker.listen("jobs::*", Mode::Any).await.unwrap();
    let received = receive_all(sub, mixed);
    let before = metric(&t, "commands");
    publish_all(&publisher, "jobs::resize", mixed).await;
    assert_eq!(received.await.unwrap(), 0, "no redelivery");
    publisher.flush().await.unwrap();
    worker.flush().await.unwrap();
    eventually("every delivery is acked", || metric(&t, "acks") == EVENTS).await;
    assert_eq!(metric(&t, "redeliveries"), 0);
    assert_eq!(metric(&t, "nacks"), 0);
    // The acks travel in batches of ids too: fewer messages than
    // events, both ways together.
    assert_batched(&t, before);
}

/// Multicatch: two listeners each get every event in order, intact, with
/// JSON events among the binary ones (`mixed`) or not.
async fn multicatch(mixed: bool) {
    let t = start(config());
    let a = client(&t, "dashboards").await;
    let b = client(&t, "audit").await;
    let publisher = client(&t, "api").await;
    let from_a = receive_all(a.listen("prices::*", Mode::Multi).await.unwrap(), mixed);
    let from_b = receive_all(b.listen("prices::*", Mode::Multi).await.unwrap(), mixed);
    let before = metric(&t, "commands");
    publish_all(&publisher, "prices::eur", mixed).await;
    assert_eq!(from_a.await.unwrap(), 0);
    assert_eq!(from_b.await.unwrap(), 0);
    publisher.flush().await.unwrap();
    assert_batched(&t, before);
    assert_eq!(metric(&t, "multicast"), 2 * EVENTS);
    assert_eq!(metric(&t, "dropped_multicatch"), 0);
}

#[tokio::test]
async fn batched_deliveries_to_an_acked_listener_are_each_acked_once() {
    watchdog(acked_anycatch(true)).await;
}

#[tokio::test]
async fn batched_multicatch_events_reach_every_listener_complete_and_in_order() {
    watchdog(multicatch(true)).await;
}

#[tokio::test]
async fn binary_events_published_fast_reach_an_acked_listener_packed_and_intact() {
    watchdog(acked_anycatch(false)).await;
}

#[tokio::test]
async fn binary_events_published_fast_reach_every_multicatch_listener_packed_and_intact() {
    watchdog(multicatch(false)).await;
}
