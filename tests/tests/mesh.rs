//! The mesh end to end: three `thynapse` processes on loopback, cells spread
//! across them, events published at every transmitter.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use thynapse_cell::{Client, Mode, Options};
use thynapse_tests::cells::{recording_cell, until, Log, POLL};
use thynapse_tests::{Signal, TransmitterProcess};

/// Whole-test deadline: a test fails, it never hangs.
const WATCHDOG: Duration = Duration::from_secs(120);

/// The (publisher, n) pairs of work events in `logs`, with how often each
/// arrived and the highest attempt seen.
fn work(logs: &[&Log]) -> HashMap<(u64, u64), (usize, u32)> {
    let mut seen: HashMap<(u64, u64), (usize, u32)> = HashMap::new();
    for log in logs {
        for (channel, payload, attempt) in log.lock().unwrap().iter() {
            if channel != "work::e" {
                continue;
            }
            let key = (
                payload["p"].as_u64().unwrap(),
                payload["n"].as_u64().unwrap(),
            );
            let e = seen.entry(key).or_default();
            e.0 += 1;
            e.1 = e.1.max(*attempt);
        }
    }
    seen
}

/// Waits until every publisher's confirmed probe reaches `routed` places
/// (every service's cells are in its view), then until every multicatch
/// log has seen a probe from every publisher.
async fn converge(publishers: &[&Client], routed: u32, multi: &[&Log]) {
    for (i, p) in publishers.iter().enumerate() {
        until("the mesh view to converge", Duration::from_secs(20), || {
            futures_lite_block(p.publish_confirmed("work::probe", json!({"probe": i})))
                .is_ok_and(|c| c.routed == routed)
        })
        .await;
        let channel = format!("probe::{}", p.id());
        until(
            "multicatch cells to hear every transmitter",
            Duration::from_secs(20),
            || {
                let _ = futures_lite_block(p.publish(&channel, json!({})));
                multi
                    .iter()
                    .all(|l| l.lock().unwrap().iter().any(|(c, _, _)| *c == channel))
            },
        )
        .await;
    }
}

/// Runs a future to completion from inside a synchronous poll closure.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

async fn publish_work(client: Client, p: u64, count: u64) {
    for n in 0..count {
        client
            .publish("work::e", json!({"p": p, "n": n}))
            .await
            .expect("publish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_every_transmitter_reach_each_service_once_and_every_multicatch_cell() {
    tokio::time::timeout(WATCHDOG, async {
        const PER_PUBLISHER: u64 = 10_000;
        let t1 = TransmitterProcess::spawn(&[]).unwrap();
        let t2 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()]).unwrap();
        let t3 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()]).unwrap();
        let eps = [
            t1.command_endpoint(),
            t2.command_endpoint(),
            t3.command_endpoint(),
        ];

        let mut alpha = Vec::new();
        for ep in eps {
            alpha.push(recording_cell(ep, &[], "alpha", "work::*", Mode::Any).await);
        }
        let beta = recording_cell(eps[2], &[], "beta", "work::*", Mode::Any).await;
        let gamma1 = recording_cell(eps[0], &[], "gamma", "*", Mode::Multi).await;
        let gamma2 = recording_cell(eps[1], &[], "gamma", "*", Mode::Multi).await;
        let mut publishers = Vec::new();
        for ep in eps {
            publishers.push(
                Client::connect(ep, Options::new("publisher"))
                    .await
                    .unwrap(),
            );
        }
        let refs: Vec<&Client> = publishers.iter().collect();
        converge(&refs, 3, &[&gamma1.1, &gamma2.1]).await;

        let tasks: Vec<_> = publishers
            .iter()
            .enumerate()
            .map(|(p, c)| tokio::spawn(publish_work(c.clone(), p as u64, PER_PUBLISHER)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let total = 3 * PER_PUBLISHER as usize;
        let alpha_logs: Vec<&Log> = alpha.iter().map(|(_, l)| l).collect();
        until("every event to arrive", Duration::from_secs(90), || {
            work(&alpha_logs).len() == total
                && work(&[&beta.1]).len() == total
                && work(&[&gamma1.1]).len() == total
                && work(&[&gamma2.1]).len() == total
        })
        .await;
        let groups: [(&str, Vec<&Log>); 2] =
            [("alpha", alpha_logs.clone()), ("beta", vec![&beta.1])];
        for (name, logs) in groups {
            let seen = work(&logs);
            let dups = seen.values().filter(|(n, _)| *n > 1).count();
            assert_eq!(dups, 0, "{name}: {dups} events arrived more than once");
        }
        for (i, (_, log)) in alpha.iter().enumerate() {
            assert!(
                work(&[log]).len() > 1000,
                "alpha cell {i} took a share of the work"
            );
        }
        for (name, log) in [("gamma1", &gamma1.1), ("gamma2", &gamma2.1)] {
            assert!(
                work(&[log]).values().all(|(n, _)| *n == 1),
                "{name} got duplicates"
            );
        }
        drop((t1, t2, t3));
    })
    .await
    .expect("watchdog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transmitter_killed_mid_stream_loses_no_anycatch_event() {
    tokio::time::timeout(WATCHDOG, async {
        const EVENTS: u64 = 10_000;
        let t1 = TransmitterProcess::spawn(&[]).unwrap();
        let t2 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()]).unwrap();
        let t3 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()]).unwrap();
        let (e1, e2, e3) = (
            t1.command_endpoint().to_owned(),
            t2.command_endpoint().to_owned(),
            t3.command_endpoint().to_owned(),
        );
        let a2 = recording_cell(&e2, &[&e1], "alpha", "work::*", Mode::Any).await;
        let a3 = recording_cell(&e3, &[&e2, &e1], "alpha", "work::*", Mode::Any).await;
        let b1 = recording_cell(&e1, &[&e2], "beta", "work::*", Mode::Any).await;
        let b3 = recording_cell(&e3, &[&e1, &e2], "beta", "work::*", Mode::Any).await;
        let publisher = Client::connect(&e1, Options::new("publisher"))
            .await
            .unwrap();
        converge(&[&publisher], 2, &[]).await;
        // Both alpha cells and both beta cells are in the publisher's view.
        until(
            "every cell to be in the view",
            Duration::from_secs(20),
            || {
                let _ = futures_lite_block(publisher.publish("work::probe", json!({})));
                [&a2.1, &a3.1, &b1.1, &b3.1]
                    .iter()
                    .all(|l| l.lock().unwrap().iter().any(|(c, _, _)| c == "work::probe"))
            },
        )
        .await;

        let stream = tokio::spawn(publish_work(publisher.clone(), 0, EVENTS));
        let alpha_logs = [&a2.1, &a3.1];
        until(
            "the stream to be under way",
            Duration::from_secs(30),
            || work(&alpha_logs).len() >= 2_000,
        )
        .await;
        t3.signal(Signal::SIGKILL).unwrap();
        let killed = Instant::now();
        until(
            "the survivors to mark the killed transmitter dead",
            Duration::from_secs(30),
            || {
                [&t1, &t2]
                    .iter()
                    .all(|t| t.log().contains("transmitter left the view"))
            },
        )
        .await;
        let detected = killed.elapsed();
        stream.await.unwrap();

        until(
            "every alpha and beta event to arrive",
            Duration::from_secs(60),
            || {
                work(&alpha_logs).len() == EVENTS as usize
                    && work(&[&b1.1, &b3.1]).len() == EVENTS as usize
            },
        )
        .await;
        let recovered = killed.elapsed();
        let groups: [(&str, Vec<&Log>); 2] =
            [("alpha", vec![&a2.1, &a3.1]), ("beta", vec![&b1.1, &b3.1])];
        for (name, logs) in groups {
            let seen = work(&logs);
            assert_eq!(seen.len(), EVENTS as usize, "{name} lost events");
            let bad = seen
                .values()
                .filter(|(n, attempt)| *n > 1 && *attempt < 2)
                .count();
            assert_eq!(bad, 0, "{name}: duplicates that were not redeliveries");
        }
        // The killed transmitter's cells failed over to a survivor and are
        // served again.
        until("the orphaned cells to be served again", Duration::from_secs(30), || {
            let _ = futures_lite_block(publisher.publish("work::after", json!({})));
            [&a3.1, &b3.1]
                .iter()
                .all(|l| l.lock().unwrap().iter().any(|(c, _, _)| c == "work::after"))
        })
        .await;
        println!(
            "mesh failover: survivors marked the killed transmitter dead after {detected:?}; \
             every event delivered {recovered:?} after the kill; its cells served again {:?} after it",
            killed.elapsed()
        );
        drop((t1, t2, t3));
    })
    .await
    .expect("watchdog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_transmitter_learns_the_whole_view_and_a_restarted_one_rejoins() {
    tokio::time::timeout(WATCHDOG, async {
        let t1 = TransmitterProcess::spawn(&[]).unwrap();
        let _cells = [
            recording_cell(t1.command_endpoint(), &[], "alpha", "work::*", Mode::Any).await,
            recording_cell(t1.command_endpoint(), &[], "beta", "work::*", Mode::Any).await,
            recording_cell(t1.command_endpoint(), &[], "gamma", "*", Mode::Multi).await,
        ];
        let t2 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()]).unwrap();
        let late = Client::connect(t2.command_endpoint(), Options::new("late"))
            .await
            .unwrap();
        converge(&[&late], 3, &[&_cells[2].1]).await;
        late.close().await;

        let endpoint = t2.command_endpoint().to_owned();
        let event = t2.event_endpoint().to_owned();
        drop(t2);
        let t2 = TransmitterProcess::spawn(&[
            "--command",
            &endpoint,
            "--event",
            &event,
            "--join",
            t1.command_endpoint(),
        ])
        .unwrap();
        let again = Client::connect(t2.command_endpoint(), Options::new("again"))
            .await
            .unwrap();
        converge(&[&again], 3, &[&_cells[2].1]).await;
        let seen: HashSet<String> = _cells[0]
            .1
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _, _)| c.clone())
            .collect();
        assert!(seen.contains("work::probe"));
    })
    .await
    .expect("watchdog");
}

#[test]
fn transmitters_with_the_mesh_secret_route_to_each_other_and_others_stay_out() {
    use thynapse_tests::RawCell;
    let token = "cell-token";
    let args = |secret: &'static str, join: Option<String>| {
        let mut a = vec![
            "--token".to_owned(),
            token.to_owned(),
            "--mesh-secret".to_owned(),
            secret.to_owned(),
        ];
        if let Some(j) = join {
            a.extend(["--join".to_owned(), j]);
        }
        a
    };
    let spawn = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        TransmitterProcess::spawn(&refs).unwrap()
    };
    let t1 = spawn(args("right", None));
    let t2 = spawn(args("right", Some(t1.command_endpoint().to_owned())));
    let outsider = spawn(args("wrong", Some(t1.command_endpoint().to_owned())));

    let mut worker = RawCell::open_with_token(t1.command_endpoint(), Some(token)).unwrap();
    worker.hello("worker").unwrap();
    worker.listen("jobs::*", "any", true).unwrap();
    let mut inside = RawCell::open_with_token(t2.command_endpoint(), Some(token)).unwrap();
    inside.hello("shop").unwrap();
    let mut outside = RawCell::open_with_token(outsider.command_endpoint(), Some(token)).unwrap();
    outside.hello("shop").unwrap();

    // Through the mesh (authenticated with the secret): routed to t1's cell.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reference = json!("probe");
        inside
            .send_json(
                "EVNT",
                &json!({"channel": "jobs::1", "confirm": true, "ref": reference}),
            )
            .unwrap();
        let reply = inside
            .recv(Duration::from_secs(5))
            .unwrap()
            .expect("an answer");
        if reply.verb == "OKAY" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "t2 never saw t1's cell: {reply:?}"
        );
        std::thread::sleep(POLL);
    }
    let delivery = worker.expect("DLVR", Duration::from_secs(5)).unwrap();
    assert_eq!(delivery["channel"], "jobs::1");

    // The transmitter with another secret never learns of it, however long
    // the others have been gossiping.
    outside
        .send_json(
            "EVNT",
            &json!({"channel": "jobs::1", "confirm": true, "ref": 1}),
        )
        .unwrap();
    let err = outside.expect_error("no_listeners").unwrap();
    assert_eq!(err["re"], 1);

    // A cell holding the token is no transmitter: mesh verbs are refused.
    let mut impostor = RawCell::open_with_token(t1.command_endpoint(), Some(token)).unwrap();
    impostor
        .send(r#"J MEVT {"id":"0000000000000000000000000000000000000001","channel":"jobs::1","from":"0000000000000000000000000000000000000001"}"#)
        .unwrap();
    impostor.expect_error("unknown_verb").unwrap();
}

#[test]
fn a_multicatch_event_published_at_one_transmitter_reaches_a_raw_cell_of_another_as_evnt(
) -> anyhow::Result<()> {
    use thynapse_tests::{binary_watchdog, eventually, RawCell, REPLY_TIMEOUT};
    binary_watchdog("mesh_multicatch_raw", || {
        let t1 = TransmitterProcess::spawn(&[])?;
        let t2 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()])?;
        let mut c = RawCell::open(t2.command_endpoint())?;
        c.hello("backend")?;
        c.listen("orders::*", "multi", false)?;
        let mut a = RawCell::open(t1.command_endpoint())?;
        a.hello("billing")?;

        // Until T1's view holds C's listen, a confirmed event finds no
        // listener; C pings meanwhile so as not to expire.
        let mut probes = 0;
        let seen = eventually(Duration::from_secs(20), POLL, || {
            let _ = c.send("J PING {}");
            probes += 1;
            a.publish_confirmed("orders::probe", &json!(probes)).is_ok()
        });
        anyhow::ensure!(seen, "T1 never saw C's multicatch listen");
        let probe = c.expect("EVNT", REPLY_TIMEOUT)?;
        assert_eq!(probe["channel"], "orders::probe", "{probe}");

        a.send_parts(&[
            br#"J EVNT {"channel":"orders::created","payload":{"order":"o-17"},"seq":10,"confirm":true,"ref":"e1"}"#,
            b"\x89PNG",
        ])?;
        let okay = a.expect_reply("OKAY", &json!("e1"))?;
        assert_eq!(okay["routed"], 1, "{okay}");
        let e = c.expect_where("the EVNT from T1", REPLY_TIMEOUT, |m| {
            m.verb == "EVNT" && m.body["channel"] == "orders::created"
        })?;
        assert_eq!(e.body["id"], okay["id"], "{e}");
        assert_eq!(e.body["from"], a.id().to_hex(), "{e}");
        assert_eq!(e.body["payload"], json!({"order": "o-17"}), "{e}");
        assert!(e.body.get("attempt").is_none(), "{e}");
        assert_eq!(e.binary.as_deref(), Some(&b"\x89PNG"[..]), "{e}");
        // A multicatch event is never acked.
        c.ack(e.body["id"].as_str().unwrap_or_default())?;
        let err = c.expect_error("unknown_delivery")?;
        assert_eq!(err["re"], okay["id"], "{err}");
        Ok(())
    })
}

#[test]
fn a_packed_batch_crosses_the_mesh_packed_and_reaches_cells_of_another_transmitter(
) -> anyhow::Result<()> {
    use thynapse_tests::{binary_watchdog, eventually, RawCell};
    binary_watchdog("mesh_packed", || {
        let t1 = TransmitterProcess::spawn(&[])?;
        let t2 = TransmitterProcess::spawn(&["--join", t1.command_endpoint()])?;
        let packing = json!({"batch": true, "packed": true});
        let (mut any, mut multi) = (
            RawCell::open(t2.command_endpoint())?,
            RawCell::open(t2.command_endpoint())?,
        );
        for (c, service, mode) in [
            (&mut any, "workers", "any"),
            (&mut multi, "watchers", "multi"),
        ] {
            c.hello_with(service, packing.clone())?;
            c.listen("jobs::*", mode, false)?;
        }
        let mut a = RawCell::open(t1.command_endpoint())?;
        a.hello_with("billing", packing)?;

        // Until T1's view holds both listens, a probe is routed to fewer
        // than two (one service, and multicatch); the cells ping meanwhile.
        let seen = eventually(Duration::from_secs(20), POLL, || {
            let _ = any.send("J PING {}");
            let _ = multi.send("J PING {}");
            a.publish_confirmed("jobs::probe", &json!(0))
                .is_ok_and(|okay| okay["routed"] == 2)
        });
        anyhow::ensure!(seen, "T1 never saw both listens");

        let payloads: Vec<Vec<u8>> = (0..100u8).map(|n| vec![n; usize::from(n % 5)]).collect();
        let events: Vec<serde_json::Value> = payloads
            .iter()
            .enumerate()
            .map(|(n, p)| json!({"channel": "jobs::data", "seq": n, "bin": p.len()}))
            .collect();
        let head = format!("J EVNT {}", serde_json::Value::Array(events));
        a.send_parts(&[head.as_bytes(), &payloads.concat()])?;

        for (c, verb) in [(&any, "DLVR"), (&multi, "EVNT")] {
            // Probes that reached the cell come first; the data follows, in order.
            let mut data = Vec::new();
            let mut packed = 0;
            while data.len() < payloads.len() {
                let got = c.items(verb, 1)?;
                packed += got.packed;
                data.extend(
                    got.items
                        .into_iter()
                        .filter(|(b, _)| b["channel"] == "jobs::data"),
                );
            }
            for (n, (_, binary)) in data.iter().enumerate() {
                assert_eq!(
                    binary.as_ref(),
                    Some(&payloads[n]),
                    "{verb} {n}: in order, exact bytes"
                );
            }
            assert!(
                packed > 0,
                "{verb}: the cell said packed and gets packed batches"
            );
        }
        Ok(())
    })
}
