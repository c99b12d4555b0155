//! Criterion micro-benchmark of the router's routing step:
//! `Router::handle` with an EVNT for a channel that 4 anycatch cells of one
//! service listen to, driven without sockets as the router's unit tests
//! do. Each iteration routes one event and, for the acked case, handles the
//! ACKN that settles it, so the in-flight table stays small.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thynapse_protocol::Thid;
use thynapse_transmitter::router::{Output, Router};
use thynapse_transmitter::Config;

const CHANNEL: &str = "bench::events";

struct Harness {
    router: Router,
    now: Instant,
    out: Vec<Output>,
}

impl Harness {
    /// A router with 4 cells of one service listening anycatch to CHANNEL
    /// (with or without acks) and one publisher.
    fn new(ack: bool) -> Harness {
        let config = Config {
            ack_timeout: Duration::from_secs(3600),
            ..Config::for_tests()
        };
        let mut h = Harness {
            router: Router::new(
                Thid::random(),
                "tcp://127.0.0.1:1".into(),
                &config,
                Arc::default(),
            ),
            now: Instant::now(),
            out: Vec::new(),
        };
        for peer in ["cell1", "cell2", "cell3", "cell4"] {
            h.send(
                peer,
                &format!(
                    r#"J HELO {{"id":"{}","service":"workers"}}"#,
                    Thid::random()
                ),
            );
            h.send(
                peer,
                &format!(r#"J LSTN {{"pattern":"{CHANNEL}","mode":"any","ack":{ack}}}"#),
            );
        }
        h.send(
            "pub",
            &format!(
                r#"J HELO {{"id":"{}","service":"publisher"}}"#,
                Thid::random()
            ),
        );
        h.out.clear();
        h
    }

    fn send(&mut self, peer: &str, frame: &str) {
        self.router.handle(
            peer.as_bytes(),
            &[frame.as_bytes()],
            false,
            self.now,
            &mut self.out,
        );
    }
}

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("Router::handle");
    g.throughput(Throughput::Elements(1));
    for size in [32usize, 128, 1024, 8192] {
        let payload = vec![b'x'; size];
        let evnt = format!(r#"J EVNT {{"channel":"{CHANNEL}"}}"#);
        // ack: false — route and emit one DLVR.
        let mut h = Harness::new(false);
        g.bench_with_input(
            BenchmarkId::new("evnt_4_anycatch_noack", size),
            &payload,
            |b, p| {
                b.iter(|| {
                    h.router
                        .handle(b"pub", &[evnt.as_bytes(), p], false, h.now, &mut h.out);
                    black_box(&h.out);
                    h.out.clear();
                })
            },
        );
        // ack: false, the event's THID given by the publisher (as the SDK
        // does): no SHA-1 of the payload in the router.
        let with_id = format!(
            r#"J EVNT {{"channel":"{CHANNEL}","id":"{}","seq":1}}"#,
            Thid::random()
        );
        g.bench_with_input(
            BenchmarkId::new("evnt_with_id_4_anycatch_noack", size),
            &payload,
            |b, p| {
                b.iter(|| {
                    h.router
                        .handle(b"pub", &[with_id.as_bytes(), p], false, h.now, &mut h.out);
                    black_box(&h.out);
                    h.out.clear();
                })
            },
        );
        // ack: true — route, emit the DLVR, then handle the cell's ACKN.
        let mut h = Harness::new(true);
        let mut ack = Vec::with_capacity(128);
        g.bench_with_input(
            BenchmarkId::new("evnt_4_anycatch_ack_then_ackn", size),
            &payload,
            |b, p| {
                b.iter(|| {
                    h.router
                        .handle(b"pub", &[evnt.as_bytes(), p], false, h.now, &mut h.out);
                    if let Some(Output::ToPeer { peer, frame, .. }) = h.out.pop() {
                        // The body starts {"id":"<40 hex>".
                        let body = &frame[b"J DLVR ".len()..];
                        ack.clear();
                        ack.extend_from_slice(br#"J ACKN {"id":""#);
                        ack.extend_from_slice(&body[7..47]);
                        ack.extend_from_slice(br#""}"#);
                        h.router.handle(&peer, &[&ack], false, h.now, &mut h.out);
                    }
                    black_box(&h.out);
                    h.out.clear();
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
