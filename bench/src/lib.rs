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

use std::time::Duration;

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
