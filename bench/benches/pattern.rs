//! Criterion micro-benchmarks of channel pattern matching: exact, prefix
//! and anchored glob patterns, matching and not matching.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use thynapse_protocol::Pattern;

fn matches(c: &mut Criterion) {
    let mut g = c.benchmark_group("Pattern::matches");
    let cases = [
        (
            "exact",
            "billing::invoice::paid",
            "billing::invoice::paid",
            true,
        ),
        (
            "exact_miss",
            "billing::invoice::paid",
            "billing::invoice::void",
            false,
        ),
        ("prefix", "billing::*", "billing::invoice::paid", true),
        ("prefix_miss", "billing::*", "shipping::parcel::sent", false),
        ("glob_suffix", "*::paid", "billing::invoice::paid", true),
        (
            "glob_middle",
            "billing::*::p?id",
            "billing::invoice::paid",
            true,
        ),
        (
            "glob_miss",
            "*::invoice::*::refunded",
            "billing::invoice::eu::paid",
            false,
        ),
        (
            "glob_many_stars",
            "*a*b*c*d*",
            "xxaxxbxxcxxdxx::yyaybycyd",
            true,
        ),
    ];
    for (name, pattern, channel, expected) in cases {
        let p = Pattern::parse(pattern).expect("valid pattern");
        assert_eq!(p.matches(channel), expected, "{pattern} vs {channel}");
        g.bench_function(name, |b| {
            b.iter(|| black_box(&p).matches(black_box(channel)))
        });
    }
    g.finish();
}

criterion_group!(benches, matches);
criterion_main!(benches);
