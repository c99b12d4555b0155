//! Request/reply and responder flow control against an in-process
//! transmitter.

mod common;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use thynapse_cell::{ErrorKind, Mode, Request};

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sum {
    sum: i64,
}

async fn add(request: Request) -> Result<Sum, String> {
    let add: Add = request.payload().map_err(|e| e.to_string())?;
    a_sum(add.a, add.b)
}

fn a_sum(a: i64, b: i64) -> Result<Sum, String> {
    a.checked_add(b)
        .map(|sum| Sum { sum })
        .ok_or_else(|| format!("{a} + {b} overflows"))
}

#[tokio::test]
async fn a_typed_request_gets_the_typed_reply_of_a_responder() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "calc").await;
        let _responder = server.serve("calc::add", add).await.unwrap();
        let requester = client(&t, "shop").await;

        let sum: Sum = requester
            .request_json("calc::add", &Add { a: 2, b: 40 })
            .await
            .unwrap();
        assert_eq!(sum, Sum { sum: 42 });

        // The builder form, with the untyped accessors.
        let reply = requester
            .request("calc::add", json!({"a": 1, "b": 2}))
            .service("calc")
            .timeout(Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(reply.payload_value(), json!({"sum": 3}));
        assert_eq!(reply.payload_raw(), Some(r#"{"sum":3}"#));
        assert!(reply.binary().is_none());
    })
    .await;
}

#[tokio::test]
async fn a_handler_error_is_rejected_with_the_handlers_message() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "calc").await;
        let _responder = server.serve("calc::add", add).await.unwrap();
        let requester = client(&t, "shop").await;

        let err = requester
            .request("calc::add", json!({"a": i64::MAX, "b": 1}))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert_eq!(err.message(), format!("{} + 1 overflows", i64::MAX));
        assert_eq!(err.code(), None, "a handler's error, not the transmitter's");
    })
    .await;
}

#[tokio::test]
async fn a_panicking_handler_is_rejected_and_its_responder_goes_on() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "calc").await;
        let _responder = server
            .serve("calc::add", |request: Request| async move {
                let add: Add = request.payload().map_err(|e| e.to_string())?;
                assert!(add.a != 13, "thirteen is unlucky");
                a_sum(add.a, add.b)
            })
            .await
            .unwrap();
        let requester = client(&t, "shop").await;

        let err = requester
            .request("calc::add", json!({"a": 13, "b": 1}))
            .timeout(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert!(
            err.message().contains("the handler failed") && err.message().contains("unlucky"),
            "{}",
            err.message()
        );
        // The slot the panicking handler held is free again.
        for a in 0..3 {
            let sum: Sum = requester
                .request_json("calc::add", &Add { a, b: 1 })
                .await
                .unwrap();
            assert_eq!(sum, Sum { sum: a + 1 });
        }
    })
    .await;
}

/// A result whose serialization panics.
struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("not today")
    }
}

#[tokio::test]
async fn a_handler_that_panics_making_its_future_or_serializing_is_rejected_and_goes_on() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "calc").await;
        let _adder = server
            .serve("calc::add", |request: Request| {
                let add: Add = request.payload().unwrap();
                assert!(add.a != 13, "thirteen is unlucky before any await");
                async move { a_sum(add.a, add.b) }
            })
            .await
            .unwrap();
        let _odd = server
            .serve("calc::odd", |_request: Request| async {
                Ok::<_, String>(Unserializable)
            })
            .await
            .unwrap();
        let requester = client(&t, "shop").await;

        let err = requester
            .request("calc::add", json!({"a": 13, "b": 1}))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert!(err.message().contains("unlucky"), "{}", err.message());
        let err = requester.request("calc::odd", 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert!(
            err.message().contains("does not serialize") && err.message().contains("not today"),
            "{}",
            err.message()
        );
        // The connection, which polled both handlers, goes on.
        let sum: Sum = requester
            .request_json("calc::add", &Add { a: 2, b: 1 })
            .await
            .unwrap();
        assert_eq!(sum, Sum { sum: 3 });
    })
    .await;
}

#[tokio::test]
async fn a_request_nobody_serves_fails_with_no_responders_at_once() {
    watchdog(async {
        let t = start(config());
        let requester = client(&t, "shop").await;
        let began = Instant::now();
        let err = requester
            .request("calc::add", json!({"a": 1, "b": 2}))
            .timeout(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoResponders);
        assert_eq!(err.code(), Some("no_responders"));
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "at once, not at the timeout: {:?}",
            began.elapsed()
        );

        // A responder of another service, or with other metadata, is none.
        let server = client(&t, "calc").await;
        let _responder = server.serve("calc::*", add).await.unwrap();
        let err = requester
            .request("calc::add", json!({"a": 1, "b": 2}))
            .service("other")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoResponders);
        let err = requester
            .request("calc::add", json!({"a": 1, "b": 2}))
            .matching("version>=2.0.0")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoResponders);
        let err = requester
            .request("calc::add", json!({"a": 1, "b": 2}))
            .matching("version>>2")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadQuery);
    })
    .await;
}

#[tokio::test]
async fn a_responder_that_never_answers_times_the_request_out_near_its_timeout() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "slow").await;
        let _responder = server
            .serve("slow::*", |_request: Request| {
                std::future::pending::<Result<(), String>>()
            })
            .await
            .unwrap();
        let requester = client(&t, "shop").await;
        let timeout = Duration::from_millis(400);
        let began = Instant::now();
        let err = requester
            .request("slow::x", 1)
            .timeout(timeout)
            .await
            .unwrap_err();
        let took = began.elapsed();
        assert_eq!(err.kind(), ErrorKind::TimedOut);
        assert_eq!(err.code(), Some("timed_out"), "the transmitter's verdict");
        assert!(took >= timeout, "not before the timeout: {took:?}");
        assert!(
            took < timeout + Duration::from_millis(400),
            "near the timeout: {took:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_responder_never_runs_more_handlers_than_its_concurrency() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "calc").await;
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let responder = server
            .serve("calc::add", move |request: Request| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    add(request).await
                }
            })
            .concurrency(3)
            .await
            .unwrap();
        assert_eq!(responder.concurrency(), 3);

        let requester = client(&t, "shop").await;
        let calls = (0..50i64).map(|i| {
            let requester = requester.clone();
            tokio::spawn(async move {
                requester
                    .request_json::<_, Sum>("calc::add", &Add { a: i, b: i })
                    .await
            })
        });
        for (i, call) in calls.collect::<Vec<_>>().into_iter().enumerate() {
            let sum = call.await.unwrap().unwrap();
            assert_eq!(sum.sum, 2 * i as i64);
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= 3, "{most} handlers ran at once");
        assert!(most >= 2, "requests were served concurrently ({most})");
        responder.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_waits_holds_up_neither_other_requests_nor_its_own_reply() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "work").await;
        let (release, released) = tokio::sync::watch::channel(false);
        let _responder = server
            .serve("work::*", move |request: Request| {
                let mut released = released.clone();
                async move {
                    if request.channel() == "work::slow" {
                        let _ = released.wait_for(|r| *r).await;
                    }
                    Ok::<_, String>(request.channel().to_owned())
                }
            })
            .concurrency(2)
            .await
            .unwrap();
        let requester = client(&t, "shop").await;
        let slow = {
            let r = requester.clone();
            tokio::spawn(async move { r.request("work::slow", 1).await })
        };
        eventually("the slow request reached the responder", || {
            metric(&t, "requests") == 1
        })
        .await;
        // The waiting handler went on as a task of its own: the
        // connection answers the next request meanwhile.
        let fast = requester.request("work::fast", 2).await.unwrap();
        assert_eq!(fast.payload::<String>().unwrap(), "work::fast");
        assert!(!slow.is_finished());
        release.send(true).unwrap();
        let slow = slow.await.unwrap().unwrap();
        assert_eq!(slow.payload::<String>().unwrap(), "work::slow");
    })
    .await;
}

#[tokio::test]
async fn requests_and_events_never_mix() {
    watchdog(async {
        let t = start(config());
        let cell = client(&t, "mixed").await;
        let served = Arc::new(AtomicU32::new(0));
        let count = served.clone();
        let _responder = cell
            .serve("rq::*", move |_request: Request| {
                count.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, String>("served") }
            })
            .await
            .unwrap();
        let mut events = cell.listen("ev::*", Mode::Any).await.unwrap();
        let other = client(&t, "other").await;

        // A request on a channel the cell listens to for events only: the
        // subscription does not see it, the requester is told.
        let err = other.request("ev::x", 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert!(err.message().contains("serves no requests"), "{err}");

        // An event on the served pattern: acked and dropped, no handler runs.
        let confirm = other.publish_confirmed("rq::x", 2).await.unwrap();
        assert_eq!(confirm.routed, 1);
        other.publish("ev::y", 3).await.unwrap();
        assert_eq!(next(&mut events).await.payload::<u8>().unwrap(), 3);
        assert_eq!(served.load(Ordering::SeqCst), 0);
        assert!(arrives_within(&mut events, Duration::from_millis(100))
            .await
            .is_none());

        let reply = other.request("rq::x", 4).await.unwrap();
        assert_eq!(reply.payload::<String>().unwrap(), "served");
        assert_eq!(served.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn a_retried_request_is_answered_by_a_later_attempt() {
    watchdog(async {
        let t = start(config());
        let server = client(&t, "flaky").await;
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let _responder = server
            .serve("flaky::*", move |_request: Request| {
                let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        // The first attempt is lost in a handler that hangs.
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, String>("second time lucky")
                }
            })
            .await
            .unwrap();
        let requester = client(&t, "shop").await;
        let began = Instant::now();
        let reply = requester
            .request("flaky::x", 1)
            .retry(Duration::from_millis(100), Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(reply.payload::<String>().unwrap(), "second time lucky");
        assert!(began.elapsed() < Duration::from_secs(2));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn a_stopped_responder_hands_its_waiting_requests_to_another() {
    watchdog(async {
        let t = start(config());
        let slow = client(&t, "work").await;
        let (release, released) = tokio::sync::watch::channel(false);
        let first = slow
            .serve("work::*", move |_request: Request| {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    Ok::<_, String>("first")
                }
            })
            .concurrency(1)
            .await
            .unwrap();
        let requester = client(&t, "shop").await;
        // One request runs on the only responder, a second waits.
        let running = {
            let r = requester.clone();
            tokio::spawn(async move { r.request("work::a", 1).await })
        };
        let waiting = {
            let r = requester.clone();
            tokio::spawn(async move { r.request("work::b", 2).await })
        };
        eventually("both requests reached the transmitter", || {
            metric(&t, "requests") == 2
        })
        .await;

        let fast = client(&t, "work").await;
        let _second = fast
            .serve("work::*", |_request: Request| async {
                Ok::<_, String>("second")
            })
            .await
            .unwrap();
        let stopping = tokio::spawn(first.stop());
        let _ = release.send(true);
        stopping.await.unwrap();
        let a = running.await.unwrap().unwrap();
        let b = waiting.await.unwrap().unwrap();
        assert_eq!(a.payload::<String>().unwrap(), "first");
        assert_eq!(b.payload::<String>().unwrap(), "second");
    })
    .await;
}
