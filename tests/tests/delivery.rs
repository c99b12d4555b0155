//! Delivery semantics through one transmitter, with SDK cells: anycatch is
//! exactly once per service, multicatch reaches every cell, and a cell that
//! dies mid-stream loses nothing for its service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thynapse_cell::{Client, Mode, Options};
use thynapse_tests::RawCell;
use thynapse_transmitter::{Config, Transmitter};

/// What one cell received: channel, payload and attempt of each event.
type Log = Arc<Mutex<Vec<(String, Value, u32)>>>;

const WATCHDOG: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(20);
const EVENTS: u64 = 10_000;

fn transmitter() -> Transmitter {
    Transmitter::start(Config {
        mesh: false,
        ..Config::for_tests()
    })
    .expect("transmitter starts")
}

async fn cell(endpoint: &str, service: &str, pattern: &str, mode: Mode) -> (Client, Log) {
    let client = Client::connect(endpoint, Options::new(service))
        .await
        .expect("cell joins");
    let mut sub = client.listen(pattern, mode).await.expect("cell listens");
    let log = Log::default();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Some(event) = sub.next_event().await {
            let entry = (
                event.channel().to_owned(),
                event.payload_value(),
                event.attempt(),
            );
            sink.lock().unwrap().push(entry);
        }
    });
    (client, log)
}

/// Each event number seen in `logs`, with how often and the highest attempt.
fn seen(logs: &[&Log]) -> HashMap<u64, (usize, u32)> {
    let mut seen: HashMap<u64, (usize, u32)> = HashMap::new();
    for log in logs {
        for (_, payload, attempt) in log.lock().unwrap().iter() {
            let e = seen.entry(payload["n"].as_u64().unwrap()).or_default();
            e.0 += 1;
            e.1 = e.1.max(*attempt);
        }
    }
    seen
}

async fn until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anycatch_reaches_each_service_exactly_once_and_multicatch_reaches_every_cell() {
    tokio::time::timeout(WATCHDOG, async {
        let t = transmitter();
        let ep = t.command_endpoint().to_owned();
        let mut alpha = Vec::new();
        for _ in 0..3 {
            alpha.push(cell(&ep, "alpha", "orders::*", Mode::Any).await);
        }
        let beta = cell(&ep, "beta", "orders::created", Mode::Any).await;
        let gamma1 = cell(&ep, "gamma", "orders::*", Mode::Multi).await;
        let gamma2 = cell(&ep, "gamma", "*::created", Mode::Multi).await;
        let publisher = Client::connect(&ep, Options::new("shop")).await.unwrap();
        for n in 0..EVENTS {
            publisher
                .publish("orders::created", json!({"n": n}))
                .await
                .unwrap();
        }
        let alpha_logs: Vec<&Log> = alpha.iter().map(|(_, l)| l).collect();
        until("every delivery", Duration::from_secs(60), || {
            [
                seen(&alpha_logs),
                seen(&[&beta.1]),
                seen(&[&gamma1.1]),
                seen(&[&gamma2.1]),
            ]
            .iter()
            .all(|s| s.len() == EVENTS as usize)
        })
        .await;
        for (name, logs) in [
            ("alpha", alpha_logs.clone()),
            ("beta", vec![&beta.1]),
            ("gamma1", vec![&gamma1.1]),
            ("gamma2", vec![&gamma2.1]),
        ] {
            let s = seen(&logs);
            assert_eq!(s.len(), EVENTS as usize, "{name} lost events");
            assert!(
                s.values().all(|(n, _)| *n == 1),
                "{name} got an event twice"
            );
        }
        for (i, (_, log)) in alpha.iter().enumerate() {
            let share = log.lock().unwrap().len();
            assert!(
                share > 3_000,
                "alpha cell {i} took {share} of {EVENTS}: round robin"
            );
        }
        let m = t.metrics().snapshot();
        assert_eq!(m["errors.unknown_delivery"], 0);
        assert_eq!(m["redeliveries"], 0);
    })
    .await
    .expect("watchdog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_killed_mid_stream_loses_nothing_for_its_service() {
    tokio::time::timeout(WATCHDOG, async {
        let t = transmitter();
        let ep = t.command_endpoint().to_owned();
        let a1 = cell(&ep, "alpha", "orders::*", Mode::Any).await;
        let a2 = cell(&ep, "alpha", "orders::*", Mode::Any).await;
        // The doomed cell takes deliveries and never acks them; then its
        // connection vanishes without a GBYE, as a killed process's would.
        let mut doomed = RawCell::open(&ep).unwrap();
        doomed.hello("alpha").unwrap();
        doomed.listen("orders::*", "any", true).unwrap();
        let publisher = Client::connect(&ep, Options::new("shop")).await.unwrap();
        let stream = {
            let p = publisher.clone();
            tokio::spawn(async move {
                for n in 0..EVENTS {
                    p.publish("orders::created", json!({"n": n})).await.unwrap();
                }
            })
        };
        let mut taken = 0;
        while taken < 200 {
            if let Some(m) = doomed.recv(Duration::from_secs(10)).unwrap() {
                if m.verb == "DLVR" {
                    taken += 1;
                }
            } else {
                panic!("the doomed cell got no deliveries");
            }
        }
        drop(doomed);
        stream.await.unwrap();
        until(
            "every event to reach a live alpha cell",
            Duration::from_secs(60),
            || seen(&[&a1.1, &a2.1]).len() == EVENTS as usize,
        )
        .await;
        let s = seen(&[&a1.1, &a2.1]);
        assert!(
            s.values().all(|(n, _)| *n == 1),
            "the live cells got an event twice"
        );
        let redelivered = s.values().filter(|(_, attempt)| *attempt > 1).count();
        assert!(
            redelivered >= 200,
            "what the dead cell held came back: {redelivered}"
        );
        assert!(t.metrics().snapshot()["redeliveries"] >= 200);
    })
    .await
    .expect("watchdog");
}
