//! The SDK against a real, in-process transmitter on loopback port 0.
//!
//! Every test starts its own transmitter, has a watchdog timeout, and
//! polls with a deadline instead of sleeping.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use thynapse_cell::{Client, ErrorKind, ListenOptions, Mode, Options};

#[tokio::test]
async fn a_client_is_welcomed_and_learns_the_event_endpoint() {
    watchdog(async {
        let t = start(config());
        let c = client(&t, "billing").await;
        assert_eq!(c.transmitter_id(), t.id());
        assert_eq!(c.event_endpoint(), t.event_endpoint());
        assert_eq!(c.service(), "billing");
        assert_eq!(c.heartbeat(), Duration::from_millis(1000));
        assert!(c.limits().max_frame > 0);
        eventually("the cell is counted", || metric(&t, "cells") == 1).await;
        c.flush().await.expect("a PING round trip");
        c.close().await;
        eventually("the cell left", || metric(&t, "cells") == 0).await;
    })
    .await;
}

#[tokio::test]
async fn an_invalid_service_is_rejected_with_its_code() {
    watchdog(async {
        let t = start(config());
        let err = Client::connect(t.command_endpoint(), Options::new("has space"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert_eq!(err.code(), Some("bad_service"));
    })
    .await;
}

#[tokio::test]
async fn connecting_to_nothing_times_out() {
    watchdog(async {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = Options::new("svc").connect_timeout(Duration::from_millis(300));
        let err = Client::connect(&format!("tcp://127.0.0.1:{port}"), options)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut);
    })
    .await;
}

#[tokio::test]
async fn anycatch_delivers_to_one_cell_and_the_ack_reaches_the_transmitter() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        let mut jobs = worker.listen("jobs::*", Mode::Any).await.unwrap();

        let confirm = publisher
            .publish_confirmed("jobs::resize", json!({"w": 640}))
            .await
            .unwrap();
        assert_eq!(confirm.routed, 1);

        let event = next(&mut jobs).await;
        assert_eq!(event.id(), confirm.id);
        assert_eq!(event.channel(), "jobs::resize");
        assert_eq!(event.payload_value(), json!({"w": 640}));
        assert_eq!(event.from(), publisher.id());
        assert_eq!(event.attempt(), 1);
        assert_eq!(event.mode(), Mode::Any);
        assert!(event.needs_ack());
        drop(event); // the handler is done: acked (batched)

        eventually("the ack is counted", || metric(&t, "acks") == 1).await;
        assert_eq!(metric(&t, "redeliveries"), 0);
    })
    .await;
}

#[tokio::test]
async fn many_acks_travel_in_batches_and_all_arrive() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        let mut jobs = worker.listen("jobs::*", Mode::Any).await.unwrap();
        const N: u64 = 500;
        for i in 0..N {
            publisher.publish("jobs::n", i).await.unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..N {
            seen.push(next(&mut jobs).await.payload::<u64>().unwrap());
        }
        // One publisher, one channel, one cell: publish order.
        assert_eq!(seen, (0..N).collect::<Vec<_>>());
        eventually("every ack is counted", || metric(&t, "acks") == N).await;
        assert_eq!(metric(&t, "errors.unknown_delivery"), 0);
        // Batching: far fewer frames than acks reached the transmitter.
        let commands = metric(&t, "commands");
        assert!(
            commands < 2 * N,
            "{commands} commands for {N} events and acks"
        );
    })
    .await;
}

#[tokio::test]
async fn a_nacked_delivery_is_redelivered_with_the_next_attempt() {
    watchdog(async {
        let t = start(config());
        let a = client(&t, "workers").await;
        let b = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        let mut sa = a.listen("jobs::*", Mode::Any).await.unwrap();
        let mut sb = b.listen("jobs::*", Mode::Any).await.unwrap();

        let id = publisher.publish("jobs::x", "payload").await.unwrap();
        let (mut first, other) = tokio::select! {
            e = next(&mut sa) => (e, &mut sb),
            e = next(&mut sb) => (e, &mut sa),
        };
        assert_eq!(first.id(), id);
        first.nack();
        drop(first);
        let again = next(other).await;
        assert_eq!(again.id(), id);
        assert_eq!(again.attempt(), 2);
        drop(again);
        eventually("the redelivery is acked", || metric(&t, "acks") == 1).await;
        assert_eq!(metric(&t, "nacks"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_redelivery_of_an_event_in_flight_is_not_yielded_twice() {
    watchdog(async {
        let mut cfg = config();
        cfg.ack_timeout = Duration::from_millis(200);
        let t = start(cfg);
        let worker = client(&t, "workers").await;
        let publisher = client(&t, "api").await;
        let mut jobs = worker.listen("jobs::*", Mode::Any).await.unwrap();

        publisher.publish("jobs::slow", 1).await.unwrap();
        let slow = next(&mut jobs).await;
        // The handler outlives the ack timeout: the transmitter redelivers
        // (to this cell, the only one); the SDK holds the duplicate back.
        eventually("a redelivery happened", || metric(&t, "redeliveries") >= 1).await;
        worker.flush().await.unwrap();
        assert!(jobs.try_next_event().is_none(), "duplicate yielded");
        drop(slow);
        worker.flush().await.unwrap();
        assert!(
            arrives_within(&mut jobs, Duration::from_millis(300))
                .await
                .is_none(),
            "the event came back after its ack"
        );
    })
    .await;
}

#[tokio::test]
async fn multicatch_reaches_every_listening_cell_and_filters_by_the_full_pattern() {
    watchdog(async {
        let t = start(config());
        let a = client(&t, "dash").await;
        let b = client(&t, "audit").await;
        let publisher = client(&t, "api").await;
        let mut sa = a.listen("news::*", Mode::Multi).await.unwrap();
        let mut sb = b.listen("news::*::eu", Mode::Multi).await.unwrap();

        // Published right after listen() returned: must not be missed.
        publisher
            .publish("news::sport::us", json!({"n": 1}))
            .await
            .unwrap();
        publisher
            .publish("news::sport::eu", json!({"n": 2}))
            .await
            .unwrap();

        let e1 = next(&mut sa).await;
        let e2 = next(&mut sa).await;
        assert_eq!(
            (e1.channel(), e2.channel()),
            ("news::sport::us", "news::sport::eu")
        );
        assert_eq!(e1.mode(), Mode::Multi);
        assert!(!e1.needs_ack());
        assert_eq!(e1.attempt(), 1);
        assert_eq!(e1.from(), publisher.id());
        let only = next(&mut sb).await;
        assert_eq!(only.channel(), "news::sport::eu");
        assert_eq!(only.payload_value(), json!({"n": 2}));
        b.flush().await.unwrap();
        assert!(sb.try_next_event().is_none());
    })
    .await;
}

#[tokio::test]
async fn two_subscriptions_of_one_client_each_get_multicatch_events() {
    watchdog(async {
        let t = start(config());
        let c = client(&t, "dash").await;
        let mut s1 = c.listen("a::*", Mode::Multi).await.unwrap();
        let mut s2 = c.listen("a::b", Mode::Multi).await.unwrap();
        let mut s3 = c.listen("a::*", Mode::Multi).await.unwrap();
        c.publish("a::b", "x").await.unwrap();
        for s in [&mut s1, &mut s2, &mut s3] {
            assert_eq!(next(s).await.channel(), "a::b");
        }
        // The cell gets one copy of a::c, for a::*: not for a::b.
        c.publish("a::c", "y").await.unwrap();
        for s in [&mut s1, &mut s3] {
            assert_eq!(next(s).await.channel(), "a::c");
        }
        c.flush().await.unwrap();
        assert!(s1.try_next_event().is_none());
        assert!(s2.try_next_event().is_none());
        assert_eq!(metric(&t, "multicast"), 2, "one copy per cell and event");
        // Same pattern, other mode: refused locally.
        let err = c.listen("a::*", Mode::Any).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
    })
    .await;
}

#[tokio::test]
async fn a_confirmed_publish_nobody_listens_to_fails_with_no_listeners() {
    watchdog(async {
        let t = start(config());
        let c = client(&t, "api").await;
        let err = c
            .publish_confirmed("nobody::here", json!(null))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoListeners);
        assert_eq!(err.code(), Some("no_listeners"));
    })
    .await;
}

#[tokio::test]
async fn binary_payloads_travel_as_a_second_frame() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let viewer = client(&t, "viewer").await;
        let mut any = worker.listen("blob::*", Mode::Any).await.unwrap();
        let mut multi = viewer.listen("blob::*", Mode::Multi).await.unwrap();
        let bytes: Vec<u8> = (0..=255).collect();
        let confirm = worker
            .publish_bytes_confirmed("blob::png", bytes.clone())
            .await
            .unwrap();
        assert_eq!(confirm.routed, 2);
        let e = next(&mut any).await;
        assert_eq!(e.binary(), Some(bytes.as_slice()));
        assert_eq!(e.payload_raw(), None);
        let e = next(&mut multi).await;
        assert_eq!(e.binary(), Some(bytes.as_slice()));
        assert_eq!(e.id(), confirm.id);
    })
    .await;
}

#[tokio::test]
async fn anycatch_without_acks_sends_no_ack() {
    watchdog(async {
        let t = start(config());
        let worker = client(&t, "workers").await;
        let mut jobs = worker
            .listen_with("jobs::*", ListenOptions::any_unacked())
            .await
            .unwrap();
        worker.publish("jobs::x", 1).await.unwrap();
        let e = next(&mut jobs).await;
        assert!(!e.needs_ack());
        drop(e);
        worker.flush().await.unwrap();
        assert_eq!(metric(&t, "acks"), 0);
        assert_eq!(metric(&t, "errors.unknown_delivery"), 0);
    })
    .await;
}

#[tokio::test]
async fn invalid_patterns_and_channels_fail_locally() {
    watchdog(async {
        let t = start(config());
        let c = client(&t, "svc").await;
        let err = c.listen("has space", Mode::Any).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidPattern);
        let err = c.publish("a::*", 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidChannel);
        let too_big = vec![0u8; c.limits().max_frame + 1];
        let err = c.publish_bytes("a::b", too_big).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        // The connection is still fine.
        c.flush().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_token_is_required_when_the_transmitter_has_one() {
    watchdog(async {
        let mut cfg = config();
        cfg.token = Some("s3cret".into());
        let t = start(cfg);
        let err = Client::connect(t.command_endpoint(), Options::new("svc").token("wrong"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
        let err = Client::connect(
            t.command_endpoint(),
            Options::new("svc").connect_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Unauthorized | ErrorKind::TimedOut),
            "{err}"
        );

        // The right token opens the command socket, and the event socket
        // when a membership stream asks for it.
        let c = Client::connect(t.command_endpoint(), Options::new("svc").token("s3cret"))
            .await
            .unwrap();
        let mut s = c.listen("a::*", Mode::Multi).await.unwrap();
        c.publish("a::b", 1).await.unwrap();
        assert_eq!(next(&mut s).await.payload::<u8>().unwrap(), 1);
        let _members = c
            .membership(None)
            .await
            .expect("the SUB's handshake passes");
    })
    .await;
}

#[tokio::test]
async fn an_expired_cell_joins_again_and_listens_again() {
    watchdog(async {
        let mut cfg = config();
        cfg.heartbeat = Duration::from_millis(100);
        let t = start(cfg);
        // A client that pings far too rarely gets expired after 300 ms.
        let options = Options::new("workers").heartbeat(Duration::from_secs(60));
        let c = Client::connect(t.command_endpoint(), options)
            .await
            .unwrap();
        let mut jobs = c.listen("jobs::*", Mode::Any).await.unwrap();
        eventually("the cell expired", || metric(&t, "expired_cells") == 1).await;

        // Its next command bounces with not_welcomed; the SDK says HELO,
        // LSTNs again and resends the command.
        let confirm = c.publish_confirmed("jobs::x", 7).await.unwrap();
        assert_eq!(confirm.routed, 1);
        let e = next(&mut jobs).await;
        assert_eq!(e.payload::<u8>().unwrap(), 7);
    })
    .await;
}

#[tokio::test]
async fn an_expired_cell_that_only_pings_learns_it_from_the_pong_and_listens_again() {
    watchdog(async {
        let mut cfg = config();
        cfg.heartbeat = Duration::from_millis(100);
        let t = start(cfg);
        // Pings every 400 ms: expired after 300 ms of silence each time,
        // and it sends nothing but PINGs, which the transmitter answers
        // `PONG {"welcomed":false}`.
        let options = Options::new("workers").heartbeat(Duration::from_millis(400));
        let c = Client::connect(t.command_endpoint(), options)
            .await
            .unwrap();
        let mut jobs = c.listen("jobs::*", Mode::Any).await.unwrap();
        eventually("the cell expired", || metric(&t, "expired_cells") >= 1).await;
        let expired = metric(&t, "expired_cells");

        // Without any command of its own, it is listening again.
        let publisher = client(&t, "shop").await;
        let deadline = Instant::now() + PATIENCE;
        loop {
            match publisher.publish_confirmed("jobs::x", 7).await {
                Ok(confirm) if confirm.routed == 1 => break,
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), ErrorKind::NoListeners, "{e}"),
            }
            assert!(Instant::now() < deadline, "the cell never listened again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(metric(&t, "expired_cells") >= expired);
        assert_eq!(next(&mut jobs).await.payload::<u8>().unwrap(), 7);
    })
    .await;
}

#[tokio::test]
async fn closing_ends_subscriptions_and_fails_later_calls() {
    watchdog(async {
        let t = start(config());
        let c = client(&t, "svc").await;
        let other = c.clone();
        let mut s = c.listen("a::*", Mode::Any).await.unwrap();
        c.close().await;
        assert!(other.is_closed());
        assert!(s.next_event().await.is_none());
        let err = other.publish("a::b", 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Disconnected);
        c.close().await; // twice is harmless
        eventually("the cell left", || metric(&t, "cells") == 0).await;
    })
    .await;
}

#[tokio::test]
async fn dropping_the_last_handle_leaves_the_transmitter() {
    watchdog(async {
        let t = start(config());
        let c = client(&t, "svc").await;
        let _s = c.listen("a::*", Mode::Any).await.unwrap();
        eventually("the cell is counted", || metric(&t, "cells") == 1).await;
        drop(c);
        eventually("the cell left", || metric(&t, "cells") == 0).await;
    })
    .await;
}

/// The connection is a task on the runtime that connected it: when that
/// runtime shuts down under a live client, the cell still says goodbye
/// instead of leaving the transmitter to expire it for missing heartbeats.
#[test]
fn a_client_whose_runtime_shuts_down_says_goodbye() {
    let t = start(config());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = runtime.block_on(async {
        let c = client(&t, "svc").await;
        eventually("the cell is counted", || metric(&t, "cells") == 1).await;
        c
    });
    drop(runtime);
    let deadline = Instant::now() + PATIENCE;
    while metric(&t, "cells") != 0 {
        assert!(Instant::now() < deadline, "the cell never left");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        metric(&t, "expired_cells"),
        0,
        "it left by GBYE, not expiry"
    );
    drop(c);
}

#[tokio::test]
async fn a_transmitter_shutdown_ends_subscriptions_with_disconnected() {
    watchdog(async {
        let mut t = start(config());
        let c = client(&t, "svc").await;
        let mut s = c.listen("a::*", Mode::Multi).await.unwrap();
        tokio::task::spawn_blocking(move || t.shutdown())
            .await
            .unwrap();
        assert!(tokio::time::timeout(PATIENCE, s.next_event())
            .await
            .expect("the stream ends")
            .is_none());
        let err = c.flush().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Disconnected);
    })
    .await;
}

#[tokio::test]
async fn a_goodbye_moves_a_cell_with_a_failover_endpoint_to_the_next_transmitter() {
    watchdog(async {
        let mut t1 = start(config());
        let t2 = start(config());
        let options = Options::new("workers").endpoint(t2.command_endpoint());
        let c = Client::connect(t1.command_endpoint(), options)
            .await
            .unwrap();
        let mut jobs = c.listen("jobs::*", Mode::Any).await.unwrap();
        let mut news = c.listen("news::*", Mode::Multi).await.unwrap();
        tokio::task::spawn_blocking(move || t1.shutdown())
            .await
            .unwrap();

        // The cell says HELO to t2 with the same THID and listens again.
        let publisher = client(&t2, "api").await;
        let deadline = Instant::now() + PATIENCE;
        let confirm = loop {
            match publisher.publish_confirmed("jobs::x", 1).await {
                Ok(confirm) => break confirm,
                Err(e) if e.kind() == ErrorKind::NoListeners => {
                    assert!(Instant::now() < deadline, "the cell never re-listened");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(confirm.routed, 1);
        assert_eq!(next(&mut jobs).await.id(), confirm.id);
        assert!(!c.is_closed());

        // Its multicatch listen moved to t2 too.
        let got = loop {
            publisher.publish("news::today", 2).await.unwrap();
            if let Some(e) = arrives_within(&mut news, Duration::from_millis(20)).await {
                break e;
            }
            assert!(Instant::now() < deadline, "no multicatch event through t2");
        };
        assert_eq!(got.payload::<u8>().unwrap(), 2);
    })
    .await;
}

#[tokio::test]
async fn multicatch_needs_no_event_socket_and_membership_opens_it() {
    watchdog(async {
        let t = start(config());
        let events_port = port_of(t.event_endpoint());
        let c = client(&t, "dash").await;
        let publisher = client(&t, "api").await;
        let mut news = c.listen("news::*", Mode::Multi).await.unwrap();
        publisher.publish("news::today", 1).await.unwrap();
        assert_eq!(next(&mut news).await.payload::<u8>().unwrap(), 1);
        c.flush().await.unwrap();
        assert_eq!(metric(&t, "syncs"), 0, "no SYNC handshake for a listen");
        assert_eq!(
            connections_to(events_port),
            0,
            "no client connected to the event socket"
        );

        // The first membership stream connects one SUB; a second reuses it.
        let mut members = c.membership(None).await.unwrap();
        assert_eq!(connections_to(events_port), 1);
        let _shop = c.membership(Some("shop")).await.unwrap();
        assert_eq!(metric(&t, "syncs"), 2);
        assert_eq!(connections_to(events_port), 1);
        let late = client(&t, "late").await;
        let joined = loop {
            let e = tokio::time::timeout(PATIENCE, members.next_event())
                .await
                .expect("a membership event within the deadline")
                .expect("the stream is open");
            if e.cell == late.id() {
                break e;
            }
        };
        assert_eq!(joined.service, "late");

        // Multicatch still comes over the command socket.
        publisher.publish("news::later", 2).await.unwrap();
        assert_eq!(next(&mut news).await.payload::<u8>().unwrap(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_membership_stream_follows_its_cell_to_the_failover_transmitter() {
    watchdog(async {
        let mut t1 = start(config());
        let t2 = start(config());
        let options = Options::new("ops").endpoint(t2.command_endpoint());
        let c = Client::connect(t1.command_endpoint(), options)
            .await
            .unwrap();
        let mut members = c.membership(None).await.unwrap();
        let mut news = c.listen("news::*", Mode::Multi).await.unwrap();
        tokio::task::spawn_blocking(move || t1.shutdown())
            .await
            .unwrap();

        // Once the cell is welcomed at t2, its SUB moves to t2's event
        // socket; a cell joining t2 after that shows in the stream.
        let publisher = client(&t2, "api").await;
        let deadline = Instant::now() + PATIENCE;
        while publisher.publish_confirmed("news::x", 1).await.is_err() {
            assert!(Instant::now() < deadline, "the cell never re-listened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(next(&mut news).await.payload::<u8>().unwrap(), 1);
        let port = port_of(t2.event_endpoint());
        eventually("the SUB connected to t2", || connections_to(port) == 1).await;
        let mut joiners = Vec::new();
        loop {
            // Subscriptions reach t2 asynchronously: join until one is seen.
            let late = client(&t2, "late").await;
            let seen = tokio::time::timeout(Duration::from_millis(100), async {
                while let Some(e) = members.next_event().await {
                    if e.cell == late.id() {
                        return Some(e);
                    }
                }
                None
            })
            .await;
            if let Ok(Some(e)) = seen {
                assert_eq!(e.transmitter, t2.id());
                break;
            }
            joiners.push(late);
            assert!(Instant::now() < deadline, "no membership event from t2");
        }
    })
    .await;
}
