//! # thynapse-bench
//!
//! Load generators for Thynapse and for the system users would otherwise
//! pick, `nats-server`, driven with the same client shape: one publisher
//! connection and N cell (subscriber) connections in one process. Every run
//! prints one JSON line ([`report::Report`]); `bench/compare.sh` starts the
//! servers, runs the grid on both and prints the Thynapse/NATS ratios.
//! Nothing here is a test: the criterion micro-benchmarks live in
//! `benches/` and CI only compiles them.
//!
//! ## Layout
//! - [`report`]: the JSON line, the lost/duplicate tally and the run clock.
//! - [`payload`]: payloads that carry their sequence number.
//! - [`procfs`]: resident size of a process, for the memory scenario.
//! - [`zmq_ceiling`]: raw libzmq DEALER→ROUTER throughput, the transport's
//!   ceiling.
//! - [`nats`]: the NATS side over `async-nats` (queue group, JetStream
//!   work queue with explicit acks, fan-out, idle connections).
//! - [`raw`]: a Thynapse client written on raw libzmq frames (the spec's
//!   `J VERB {json}` frames, batched `ACKN`), independent of the cell SDK.
//! - [`sdk`]: the same runs on the cell SDK (`thynapse-cell`).
//! - here: [`Load`] and [`Scenario`], and what the async runs (NATS, SDK)
//!   share: [`tally_deliveries`], a cell's receive loop, and
//!   [`await_deliveries`], the wait for the last one.
//!
//! Every load loop is bounded in count (`--msgs`) and in time (`--secs`);
//! traffic goes to loopback endpoints only.

pub mod nats;
pub mod payload;
pub mod procfs;
pub mod raw;
pub mod report;
pub mod sdk;
pub mod zmq_ceiling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use report::{wait_for_deliveries, RunClock, Tally};

/// The shape of one load run, shared by every system.
#[derive(Debug, Clone)]
pub struct Load {
    /// Bytes of payload per event.
    pub payload: usize,
    /// Events the publisher sends.
    pub msgs: u64,
    /// Number of cells (subscribers / consumers).
    pub cells: usize,
    /// Hard limit on the whole run (connect, publish, drain).
    pub deadline: Duration,
    /// Once the publisher is done, stop waiting after this long without a
    /// new delivery (what is missing then is counted as lost).
    pub idle: Duration,
    /// The server's process id, to report the CPU it used.
    pub server_pid: Option<u32>,
    /// Mesh runs: the server the publisher connects to, when it is not the
    /// one the cells joined. The scenario is then reported as `mesh_<name>`.
    pub publish_to: Option<String>,
    /// How long to wait between the cells being ready and the first
    /// publish (mesh runs: for the cells' interest to reach the
    /// publisher's server).
    pub settle: Duration,
}

impl Load {
    /// The scenario's name in the JSON line: `mesh_` first for mesh runs.
    pub fn scenario_name(&self, scenario: Scenario) -> String {
        match self.publish_to {
            Some(_) => format!("mesh_{}", scenario.name()),
            None => scenario.name().to_owned(),
        }
    }

    /// Deliveries a complete run counts: every event once, or once per
    /// cell when each cell gets all of them.
    pub fn expected_deliveries(&self, scenario: Scenario) -> u64 {
        if scenario.fan_out() {
            self.msgs * self.cells as u64
        } else {
            self.msgs
        }
    }
}

impl Default for Load {
    fn default() -> Self {
        Load {
            payload: 128,
            msgs: 200_000,
            cells: 4,
            deadline: Duration::from_secs(60),
            idle: Duration::from_secs(3),
            server_pid: None,
            publish_to: None,
            settle: Duration::ZERO,
        }
    }
}

/// A short random tag that makes a run's channel and service names unique,
/// so that deliveries a transmitter still holds from an earlier run (to be
/// redelivered) never reach this run's cells.
pub fn run_tag() -> String {
    thynapse_protocol::Thid::random().to_hex()[..8].to_owned()
}

/// Where a scenario sends its events and how the cells take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One cell of the service per event, no acks (NATS: a queue group).
    AnycatchNoack,
    /// One cell of the service per event, acked (NATS: a JetStream
    /// work-queue stream in memory with explicit acks).
    AnycatchAck,
    /// Every cell gets every event (NATS: plain subscribers).
    Multicatch,
}

impl Scenario {
    /// The name printed in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::AnycatchNoack => "anycatch_noack",
            Scenario::AnycatchAck => "anycatch_ack",
            Scenario::Multicatch => "multicatch",
        }
    }

    /// How many times each event is expected at each cell, and whether the
    /// cells share the events (anycatch) or each gets all (multicatch).
    pub fn fan_out(self) -> bool {
        matches!(self, Scenario::Multicatch)
    }
}

/// How often a cell's receive loop looks at the stop flag when nothing
/// arrives.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// One cell's receive loop in the async runs: counts each delivery of
/// `deliveries` (the sequence number it carried, `None` when unreadable)
/// in a [`Tally`] of `msgs` and on the shared `clock`, until `stop` is set
/// or the stream ends. The stream is dropped before this returns.
pub async fn tally_deliveries<S>(
    deliveries: S,
    msgs: u64,
    clock: &RunClock,
    stop: &AtomicBool,
) -> Tally
where
    S: Stream<Item = Option<u64>>,
{
    let mut deliveries = std::pin::pin!(deliveries);
    let mut tally = Tally::new(msgs);
    let mut wake = tokio::time::interval(STOP_CHECK);
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            d = deliveries.next() => match d {
                Some(seq) => {
                    tally.record(seq);
                    clock.delivered_now(1);
                }
                None => break,
            },
            _ = wake.tick() => {}
        }
    }
    tally
}

/// [`wait_for_deliveries`] for `scenario` under `load`, on a blocking
/// thread so that the runtime's tasks (the cells, the publisher) go on.
///
/// # Errors
/// When the waiting thread panics.
pub async fn await_deliveries(
    clock: &Arc<RunClock>,
    scenario: Scenario,
    load: &Load,
    begin: Instant,
    published: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let expected = load.expected_deliveries(scenario);
    let (clock, published, deadline, idle) =
        (clock.clone(), published.clone(), load.deadline, load.idle);
    tokio::task::spawn_blocking(move || {
        wait_for_deliveries(&clock, expected, begin, deadline, idle, || {
            published.load(Ordering::Relaxed)
        })
    })
    .await?;
    Ok(())
}
