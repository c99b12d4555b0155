//! The JSON line every run prints, the lost/duplicate tally, and the clock
//! that the cells of a run share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Load;

/// One run's result, printed as one JSON line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `nats`, `thynapse-raw`, `thynapse-sdk` or `zmq`.
    pub system: String,
    /// e.g. `anycatch_noack`, `multicatch`, `memory`, `zmq_dealer_router`.
    pub scenario: String,
    /// Payload bytes per event.
    pub payload: usize,
    /// Number of cells (subscribers, consumers or idle connections).
    pub cells: usize,
    /// Events published.
    pub msgs: u64,
    /// Deliveries counted at the cells (each cell's copy counts in
    /// multicatch).
    pub delivered: u64,
    /// From the first publish to the last delivery, in seconds.
    pub secs: f64,
    /// `delivered / secs`: deliveries per second.
    pub msgs_per_sec: f64,
    /// How long the publisher took to hand over all events, in seconds.
    pub publish_secs: f64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries beyond the expected one per event (and per cell in
    /// multicatch).
    pub dup: u64,
    /// CPU seconds the server used during the run (when its pid is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_secs: Option<f64>,
    /// CPU seconds the load generator (publisher and cells) used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu_secs: Option<f64>,
    /// Concurrent requesters (request/reply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requesters: Option<usize>,
    /// Median request → reply time, in microseconds (request/reply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    /// 99th percentile request → reply time, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    /// Resident size of the server before the cells connected (memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_idle_kib: Option<u64>,
    /// Resident size of the server with every cell connected (memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_loaded_kib: Option<u64>,
    /// `(loaded - idle) / cells`, in bytes (memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_cell_bytes: Option<f64>,
    /// Anything a reader must know about this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Report {
    /// A report for `system` and `scenario` with every figure zero.
    pub fn new(system: &str, scenario: &str) -> Report {
        Report {
            system: system.to_owned(),
            scenario: scenario.to_owned(),
            ..Report::default()
        }
    }

    /// Fills the throughput figures from the clock and the tally.
    pub fn fill(&mut self, clock: &RunClock, tally: &Tally, fan_out: bool, cells: usize) {
        self.delivered = clock.delivered();
        self.secs = clock.elapsed_to_last().as_secs_f64();
        self.msgs_per_sec = if self.secs > 0.0 {
            self.delivered as f64 / self.secs
        } else {
            0.0
        };
        let expected = if fan_out { cells as u64 } else { 1 };
        let (lost, dup) = tally.lost_dup(expected);
        self.lost = lost;
        self.dup = dup;
    }

    /// Records CPU seconds used, as measured by [`crate::procfs::CpuMark::since`].
    pub fn cpu(&mut self, (server, own): (Option<f64>, f64)) {
        self.server_cpu_secs = server;
        self.client_cpu_secs = Some(own);
    }

    /// Fills the latency percentiles from samples in microseconds.
    pub fn latencies(&mut self, mut us: Vec<u32>) {
        if us.is_empty() {
            return;
        }
        us.sort_unstable();
        let at = |q: f64| f64::from(us[((us.len() - 1) as f64 * q).round() as usize]);
        self.p50_us = Some(at(0.50));
        self.p99_us = Some(at(0.99));
    }

    /// The report of a request/reply run of `system` with `requesters`
    /// requesters that sent `sent` requests and got `answers`; `failures`
    /// names what `answers.errors` counts.
    pub fn request_reply(
        system: &str,
        load: &Load,
        requesters: usize,
        sent: u64,
        answers: Answers,
        cpu: (Option<f64>, f64),
        failures: &str,
    ) -> Report {
        let mut r = Report::new(system, "request_reply");
        r.payload = load.payload;
        r.cells = load.cells;
        r.requesters = Some(requesters);
        r.msgs = sent;
        r.delivered = answers.latencies.len() as u64;
        r.secs = (answers.last - answers.start).as_secs_f64();
        r.msgs_per_sec = if r.secs > 0.0 {
            r.delivered as f64 / r.secs
        } else {
            0.0
        };
        r.lost = sent.saturating_sub(r.delivered);
        r.dup = answers.tally.lost_dup(1).1;
        r.cpu(cpu);
        r.latencies(answers.latencies);
        if answers.errors > 0 {
            r.note = Some(format!("{} {failures}", answers.errors));
        }
        r
    }

    /// The report as one JSON line (no trailing newline).
    pub fn to_line(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).expect("a report serializes")
    }
}

/// What requesters saw of a request/reply run that started at `start`.
#[derive(Debug, Clone)]
pub struct Answers {
    /// When the first request went out.
    pub start: Instant,
    /// When the last answer came (`start` until one does).
    pub last: Instant,
    /// Round trip of each answered request, in microseconds.
    pub latencies: Vec<u32>,
    /// Answers by the sequence number they carry.
    pub tally: Tally,
    /// Requests that got an error instead of an answer.
    pub errors: u64,
}

impl Answers {
    /// No answers yet to a run of `msgs` requests that started at `start`.
    pub fn new(msgs: u64, start: Instant) -> Answers {
        Answers {
            start,
            last: start,
            latencies: Vec::new(),
            tally: Tally::new(msgs),
            errors: 0,
        }
    }

    /// An answer carrying `seq` came now, to a request sent at `sent`
    /// (when known).
    pub fn answer(&mut self, sent: Option<Instant>, seq: Option<u64>) {
        self.last = Instant::now();
        if let Some(t) = sent {
            self.latencies.push((self.last - t).as_micros() as u32);
        }
        self.tally.record(seq);
    }

    /// Adds another requester's answers.
    pub fn merge(&mut self, other: Answers) {
        self.last = self.last.max(other.last);
        self.latencies.extend(other.latencies);
        self.tally.merge(&other.tally);
        self.errors += other.errors;
    }
}

/// How many times each sequence number arrived (saturating at 255).
#[derive(Debug, Clone)]
pub struct Tally {
    counts: Vec<u8>,
    /// Deliveries whose sequence number was out of range or unreadable.
    pub strays: u64,
}

impl Tally {
    /// A tally for sequence numbers `0..msgs`.
    pub fn new(msgs: u64) -> Tally {
        Tally {
            counts: vec![0; msgs as usize],
            strays: 0,
        }
    }

    /// Counts one delivery of `seq`.
    pub fn record(&mut self, seq: Option<u64>) {
        match seq.and_then(|s| self.counts.get_mut(s as usize)) {
            Some(c) => *c = c.saturating_add(1),
            None => self.strays += 1,
        }
    }

    /// Adds another cell's tally to this one.
    pub fn merge(&mut self, other: &Tally) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.strays += other.strays;
    }

    /// `(lost, duplicated)` when each sequence number should have arrived
    /// `expected` times. Strays count as duplicates.
    pub fn lost_dup(&self, expected: u64) -> (u64, u64) {
        let mut lost = 0;
        let mut dup = self.strays;
        for &c in &self.counts {
            let c = u64::from(c);
            if c < expected {
                lost += expected - c;
            } else {
                dup += c - expected;
            }
        }
        (lost, dup)
    }
}

/// The shared clock of a run: when publishing started, how many deliveries
/// arrived and when the last one did.
#[derive(Debug)]
pub struct RunClock {
    start: Instant,
    started: AtomicU64,
    last_nanos: AtomicU64,
    delivered: AtomicU64,
}

impl Default for RunClock {
    fn default() -> Self {
        RunClock::new()
    }
}

impl RunClock {
    /// A clock that starts now (call [`RunClock::restart`] just before the
    /// first publish).
    pub fn new() -> RunClock {
        RunClock {
            start: Instant::now(),
            started: AtomicU64::new(0),
            last_nanos: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn now_nanos(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Marks the start of publishing.
    pub fn restart(&self) {
        self.started.store(self.now_nanos(), Ordering::Relaxed);
    }

    /// Counts `n` deliveries that arrived now.
    pub fn delivered_now(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.delivered.fetch_add(n, Ordering::Relaxed);
        self.last_nanos
            .fetch_max(self.now_nanos(), Ordering::Relaxed);
    }

    /// Deliveries so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Time from the start of publishing to the last delivery.
    pub fn elapsed_to_last(&self) -> Duration {
        let s = self.started.load(Ordering::Relaxed);
        let l = self.last_nanos.load(Ordering::Relaxed);
        Duration::from_nanos(l.saturating_sub(s))
    }

    /// Time since the start of publishing.
    pub fn since_start(&self) -> Duration {
        let s = self.started.load(Ordering::Relaxed);
        Duration::from_nanos(self.now_nanos().saturating_sub(s))
    }
}

/// Waits until `expected` deliveries arrived, the `deadline` passed (from
/// `begin`), or, once `published` says the publisher is done, nothing
/// arrived for `idle`.
pub fn wait_for_deliveries(
    clock: &RunClock,
    expected: u64,
    begin: Instant,
    deadline: Duration,
    idle: Duration,
    published: impl Fn() -> bool,
) {
    let mut last_count = clock.delivered();
    let mut last_change = Instant::now();
    loop {
        let n = clock.delivered();
        if n >= expected || begin.elapsed() >= deadline {
            return;
        }
        if n != last_count {
            last_count = n;
            last_change = Instant::now();
        } else if published() && last_change.elapsed() >= idle {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_tells_lost_from_duplicated() {
        let mut a = Tally::new(4);
        a.record(Some(0));
        a.record(Some(1));
        let mut b = Tally::new(4);
        b.record(Some(1));
        b.record(Some(2));
        b.record(Some(99));
        a.merge(&b);
        assert_eq!(a.lost_dup(1), (1, 2));
    }
}
