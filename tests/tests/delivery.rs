//! Delivery semantics through one transmitter, with SDK cells: anycatch is
//! exactly once per service, multicatch reaches every cell, and a cell that
//! dies mid-stream loses nothing for its service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use thynapse_cell::{Client, ListenOptions, Mode, Options};
use thynapse_tests::cells::{recording_cell, until, Log};
use thynapse_tests::RawCell;
use thynapse_transmitter::{Config, Transmitter};

const WATCHDOG: Duration = Duration::from_secs(90);
const EVENTS: u64 = 10_000;

fn transmitter() -> Transmitter {
    Transmitter::start(Config {
        mesh: false,
        ..Config::for_tests()
    })
    .expect("transmitter starts")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anycatch_reaches_each_service_exactly_once_and_multicatch_reaches_every_cell() {
    tokio::time::timeout(WATCHDOG, async {
        let t = transmitter();
        let ep = t.command_endpoint().to_owned();
        let mut alpha = Vec::new();
        for _ in 0..3 {
            alpha.push(recording_cell(&ep, &[], "alpha", "orders::*", Mode::Any).await);
        }
        let beta = recording_cell(&ep, &[], "beta", "orders::created", Mode::Any).await;
        let gamma1 = recording_cell(&ep, &[], "gamma", "orders::*", Mode::Multi).await;
        let gamma2 = recording_cell(&ep, &[], "gamma", "*::created", Mode::Multi).await;
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
        // With acks the transmitter picks the cell with the fewest
        // unacked deliveries, so the shares follow the cells' pace (on a
        // busy machine one lags); none is starved. The exact rotation
        // shows without acks (`without_acks_anycatch_takes_the_cells_in_turn`).
        for (i, (_, log)) in alpha.iter().enumerate() {
            let share = log.lock().unwrap().len();
            assert!(
                share > 2_500,
                "alpha cell {i} took {share} of {EVENTS}: starved"
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
async fn without_acks_anycatch_takes_the_cells_in_turn() {
    tokio::time::timeout(WATCHDOG, async {
        const N: usize = 3_000;
        let t = transmitter();
        let ep = t.command_endpoint().to_owned();
        let mut cells = Vec::new();
        for _ in 0..3 {
            let c = Client::connect(&ep, Options::new("alpha")).await.unwrap();
            let mut sub = c
                .listen_with("orders::*", ListenOptions::any_unacked())
                .await
                .unwrap();
            let count = Arc::new(AtomicUsize::new(0));
            let counted = count.clone();
            tokio::spawn(async move {
                while sub.next_event().await.is_some() {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
            cells.push((c, count));
        }
        let publisher = Client::connect(&ep, Options::new("shop")).await.unwrap();
        for n in 0..N {
            publisher
                .publish("orders::created", json!({"n": n}))
                .await
                .unwrap();
        }
        let shares = || -> Vec<usize> {
            cells
                .iter()
                .map(|(_, count)| count.load(Ordering::SeqCst))
                .collect()
        };
        until("every delivery", Duration::from_secs(60), || {
            shares().iter().sum::<usize>() == N
        })
        .await;
        // No cell holds an unacked delivery, so every one is as free as
        // the next: the transmitter's cursor alone picks, in turn.
        assert_eq!(shares(), [N / 3; 3]);
    })
    .await
    .expect("watchdog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_killed_mid_stream_loses_nothing_for_its_service() {
    tokio::time::timeout(WATCHDOG, async {
        let t = transmitter();
        let ep = t.command_endpoint().to_owned();
        // The doomed cell takes deliveries and never acks them; then its
        // connection vanishes without a GBYE, as a killed process's would.
        // It joins first, so the first events of the stream are all its own.
        const HELD: u64 = 500;
        let mut doomed = RawCell::open(&ep).unwrap();
        doomed.hello("alpha").unwrap();
        doomed.listen("orders::*", "any", true).unwrap();
        let publisher = Client::connect(&ep, Options::new("shop")).await.unwrap();
        for n in 0..HELD {
            publisher
                .publish("orders::created", json!({"n": n}))
                .await
                .unwrap();
        }
        let mut taken = 0;
        while taken < HELD {
            let m = doomed.recv(Duration::from_secs(10)).unwrap();
            match m {
                Some(m) if m.verb == "DLVR" => taken += 1,
                Some(_) => {}
                None => panic!("the doomed cell got {taken} of {HELD} deliveries"),
            }
        }
        // Live cells of the service join; the stream goes on while the
        // doomed cell dies.
        let a1 = recording_cell(&ep, &[], "alpha", "orders::*", Mode::Any).await;
        let a2 = recording_cell(&ep, &[], "alpha", "orders::*", Mode::Any).await;
        let stream = {
            let p = publisher.clone();
            tokio::spawn(async move {
                for n in HELD..EVENTS {
                    p.publish("orders::created", json!({"n": n})).await.unwrap();
                }
            })
        };
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
        // At least what it held before the others joined came back (more
        // if the live cells were busier than it for a moment).
        assert!(
            redelivered >= HELD as usize,
            "what the dead cell held came back: {redelivered} of {HELD}"
        );
        assert!(t.metrics().snapshot()["redeliveries"] >= HELD);
    })
    .await
    .expect("watchdog");
}
