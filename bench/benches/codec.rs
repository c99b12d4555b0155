//! Criterion micro-benchmarks of the frame codec: decoding a command
//! header and writing a delivery body, over the payload grid.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thynapse_protocol::{body, frame, Thid};

const PAYLOADS: [usize; 4] = [32, 128, 1024, 8192];

/// A JSON string payload of about `n` bytes.
fn json_payload(n: usize) -> Vec<u8> {
    let mut p = b"\"".to_vec();
    p.extend(std::iter::repeat_n(b'x', n.saturating_sub(2)));
    p.push(b'"');
    p
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame::decode");
    for n in PAYLOADS {
        let body = format!(
            r#"{{"channel":"billing::invoice::paid","payload":{}}}"#,
            String::from_utf8(json_payload(n)).expect("ASCII")
        );
        let f = frame::encode(thynapse_protocol::Verb::EVNT, body.as_bytes());
        g.throughput(Throughput::Bytes(f.len() as u64));
        g.bench_with_input(BenchmarkId::new("EVNT", n), &f, |b, f| {
            b.iter(|| frame::decode(black_box(f)))
        });
    }
    let ack = br#"J ACKN {"id":"148a4ee4688b0986a14a263c835b18af1f96cf81"}"#;
    g.bench_function("ACKN", |b| b.iter(|| frame::decode(black_box(ack))));
    g.finish();
}

fn write_delivery(c: &mut Criterion) {
    let mut g = c.benchmark_group("body::write_delivery");
    let id = Thid::random();
    let from = Thid::random();
    let mut out = Vec::with_capacity(16 * 1024);
    for n in PAYLOADS {
        let p = json_payload(n);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("json_payload", n), &p, |b, p| {
            b.iter(|| {
                out.clear();
                body::write_delivery(
                    &mut out,
                    black_box(&id),
                    black_box("billing::invoice::paid"),
                    Some(black_box(p)),
                    &from,
                    Some(1),
                );
            })
        });
    }
    // A binary payload travels in its own frame: the body has none.
    g.bench_function("binary_payload", |b| {
        b.iter(|| {
            out.clear();
            body::write_delivery(
                &mut out,
                black_box(&id),
                black_box("billing::invoice::paid"),
                None,
                &from,
                Some(1),
            );
        })
    });
    g.finish();
}

criterion_group!(benches, decode, write_delivery);
criterion_main!(benches);
