//! Batches (PROTOCOL.md §23) between the SDK and a real, in-process
//! transmitter on loopback port 0: publishes ready at the same time leave
//! as one `J EVNT [...]`, batched `DLVR`s and `EVNT`s arrive as single
//! events, and nothing is lost, duplicated or reordered on the way.
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
/// it, of a length that varies with it.
fn payload(n: u64) -> Vec<u8> {
    let mut p = n.to_le_bytes().to_vec();
    p.extend((0..(n % 97) as u8).map(|i| i.wrapping_mul(31) ^ n as u8));
    p
}

/// Publishes `EVENTS` events on `channel` without waiting between them:
/// binary ones, and every hundredth one as JSON (a batch never mixes
/// the two, so this also ends batches early).
async fn publish_all(publisher: &Client, channel: &str) {
    for n in 0..EVENTS {
        if n % 100 == 99 {
            publisher.publish(channel, n).await.expect("publish");
        } else {
            publisher
                .publish_bytes(channel, payload(n))
                .await
                .expect("publish_bytes");
        }
    }
}

/// Receives `EVENTS` events and checks each against what was published,
/// in order; each event is dropped (so acked) once checked. Returns how
/// many had an attempt above 1.
fn receive_all(mut sub: Subscription) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut redelivered = 0;
        for n in 0..EVENTS {
            let event = next(&mut sub).await;
            if n % 100 == 99 {
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
/// events published since `commands_before`: publishes shared frames.
fn assert_batched(t: &thynapse_transmitter::Transmitter, commands_before: u64) {
    let commands = metric(t, "commands") - commands_before;
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
        let received = receive_all(sub);
        let before = metric(&t, "commands");
        publish_all(&publisher, "jobs::resize").await;
        assert_eq!(received.await.unwrap(), 0);
        publisher.flush().await.unwrap();
        assert_batched(&t, before);
        assert_eq!(metric(&t, "deliveries"), EVENTS);
    })
    .await;
}

#[tokio::test]
async fn batched_deliveries_to_an_acked_listener_are_each_acked_once() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        let sub = worker.listen("jobs::*", Mode::Any).await.unwrap();
        let received = receive_all(sub);
        let before = metric(&t, "commands");
        publish_all(&publisher, "jobs::resize").await;
        assert_eq!(received.await.unwrap(), 0, "no redelivery");
        publisher.flush().await.unwrap();
        worker.flush().await.unwrap();
        eventually("every delivery is acked", || metric(&t, "acks") == EVENTS).await;
        assert_eq!(metric(&t, "redeliveries"), 0);
        assert_eq!(metric(&t, "nacks"), 0);
        // The acks travel in batches of ids too: fewer messages than
        // events, both ways together.
        assert_batched(&t, before);
    })
    .await;
}

#[tokio::test]
async fn batched_multicatch_events_reach_every_listener_complete_and_in_order() {
    watchdog(async {
        let t = start(config());
        let a = client(&t, "dashboards").await;
        let b = client(&t, "audit").await;
        let publisher = client(&t, "api").await;
        let from_a = receive_all(a.listen("prices::*", Mode::Multi).await.unwrap());
        let from_b = receive_all(b.listen("prices::*", Mode::Multi).await.unwrap());
        let before = metric(&t, "commands");
        publish_all(&publisher, "prices::eur").await;
        assert_eq!(from_a.await.unwrap(), 0);
        assert_eq!(from_b.await.unwrap(), 0);
        publisher.flush().await.unwrap();
        assert_batched(&t, before);
        assert_eq!(metric(&t, "multicast"), 2 * EVENTS);
        assert_eq!(metric(&t, "dropped_multicatch"), 0);
    })
    .await;
}
