//! `thynapse-bench`: run one load scenario against one system and print one
//! JSON line. `bench/compare.sh` drives it over the whole grid.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thynapse_bench::nats::{JsPublish, JsTuning};
use thynapse_bench::{nats, raw, sdk, zmq_ceiling, Load, Scenario};

/// mimalloc for every client of every system alike (async-nats, the SDK,
/// the raw client), libzmq's allocations included (feature `override`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "thynapse-bench",
    about = "Thynapse and NATS load generators; one JSON line per run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Payload bytes per event (at least 8: the sequence number).
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Events to publish.
    #[arg(long, default_value_t = 200_000)]
    msgs: u64,
    /// Listening cells (subscribers / consumers).
    #[arg(long, default_value_t = 4)]
    cells: usize,
    /// Hard time limit of the run, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// After publishing, give up after this many seconds without a delivery.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// The server's process id, to report the CPU seconds it used.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Mesh runs: the publisher connects here (another node of the mesh
    /// or cluster) instead of where the cells are.
    #[arg(long)]
    publish_to: Option<String>,
    /// Seconds to wait after the cells are ready before publishing (mesh:
    /// for their interest to reach the publisher's node).
    #[arg(long, default_value_t = 0.0)]
    settle_secs: f64,
}

impl LoadArgs {
    fn load(&self) -> Load {
        Load {
            payload: self.payload.max(thynapse_bench::payload::MIN_PAYLOAD),
            msgs: self.msgs,
            cells: self.cells,
            deadline: Duration::from_secs(self.secs),
            idle: Duration::from_secs(self.idle_secs),
            server_pid: self.server_pid,
            publish_to: self.publish_to.clone(),
            settle: Duration::from_secs_f64(self.settle_secs.max(0.0)),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Raw libzmq DEALER→ROUTER throughput: the transport's ceiling.
    Zmq {
        /// Payload bytes per message.
        #[arg(long, default_value_t = 128)]
        payload: usize,
        /// Messages to send.
        #[arg(long, default_value_t = 2_000_000)]
        msgs: u64,
        /// Hard time limit, in seconds.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// A throughput scenario against nats-server (async-nats clients).
    Nats {
        /// Server URL (loopback).
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        /// The scenario.
        scenario: Scenario,
        #[command(flatten)]
        load: LoadArgs,
        /// JetStream run: how the publisher publishes.
        #[arg(long, value_enum, default_value = "core")]
        js_publish: JsPublish,
        /// JetStream run: the consumer's max_ack_pending (the server's
        /// default is 1000).
        #[arg(long, default_value_t = 1_000)]
        js_max_ack_pending: i64,
        /// JetStream run: messages per pull request (async-nats's default
        /// is 200).
        #[arg(long, default_value_t = 200)]
        js_batch: usize,
        /// JetStream run, acked publishing: most publish acks outstanding.
        #[arg(long, default_value_t = 1024)]
        js_window: usize,
    },
    /// A throughput scenario against a transmitter, with the raw-frame
    /// client.
    Raw {
        /// The transmitter's command endpoint (loopback).
        #[arg(long)]
        command: String,
        /// The scenario.
        scenario: Scenario,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// A throughput scenario against a transmitter, on the cell SDK.
    Sdk {
        /// The transmitter's command endpoint (loopback).
        #[arg(long)]
        command: String,
        /// The scenario.
        scenario: Scenario,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Transmitter resident size idle and with N idle SDK clients.
    SdkMemory {
        /// The transmitter's command endpoint (loopback).
        #[arg(long)]
        command: String,
        /// The transmitter's process id.
        #[arg(long)]
        pid: u32,
        /// Idle clients to connect.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Seconds to wait with every client joined before measuring.
        #[arg(long, default_value_t = 3)]
        settle_secs: u64,
    },
    /// Request/reply against nats-server: responders in a queue group.
    NatsRr {
        /// Server URL (loopback).
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        /// Concurrent requesters, one connection and one request in flight
        /// each.
        #[arg(long, default_value_t = 16)]
        requesters: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Request/reply against a transmitter (RQST/RPLY), raw-frame client.
    RawRr {
        /// The transmitter's command endpoint (loopback).
        #[arg(long)]
        command: String,
        /// Concurrent requesters, one connection and one request in flight
        /// each.
        #[arg(long, default_value_t = 16)]
        requesters: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Request/reply against a transmitter, on the cell SDK.
    SdkRr {
        /// The transmitter's command endpoint (loopback).
        #[arg(long)]
        command: String,
        /// Concurrent requesters, one client and one request in flight
        /// each.
        #[arg(long, default_value_t = 16)]
        requesters: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Server resident size idle and with N idle NATS connections.
    NatsMemory {
        /// Server URL (loopback).
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        /// The server's process id.
        #[arg(long)]
        pid: u32,
        /// Idle connections to open.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Seconds to wait with every connection open before measuring.
        #[arg(long, default_value_t = 3)]
        settle_secs: u64,
    },
    /// Transmitter resident size idle and with N idle raw-frame cells.
    RawMemory {
        /// The transmitter's command endpoint (loopback).
        #[arg(long)]
        command: String,
        /// The transmitter's process id.
        #[arg(long)]
        pid: u32,
        /// Idle cells to join.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Each cell also listens multicatch (`LSTN` mode `multi`; its
        /// events would come on its DEALER).
        #[arg(long)]
        multicatch: bool,
        /// Seconds to wait with every cell joined before measuring.
        #[arg(long, default_value_t = 3)]
        settle_secs: u64,
    },
}

/// The load generator's runtime: `BENCH_WORKERS` worker threads (default
/// 2), for every system's clients alike.
fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("BENCH_WORKERS")
                .ok()
                .and_then(|w| w.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let report = match Cli::parse().command {
        Command::Zmq {
            payload,
            msgs,
            secs,
        } => zmq_ceiling::run(payload, msgs, Duration::from_secs(secs))?,
        Command::Nats {
            url,
            scenario,
            load,
            js_publish,
            js_max_ack_pending,
            js_batch,
            js_window,
        } => {
            let js = JsTuning {
                publish: js_publish,
                max_ack_pending: js_max_ack_pending,
                batch: js_batch,
                window: js_window,
            };
            tokio_runtime()?.block_on(nats::run(&url, scenario, &load.load(), js))?
        }
        Command::Raw {
            command,
            scenario,
            load,
        } => raw::run(&command, scenario, &load.load())?,
        Command::Sdk {
            command,
            scenario,
            load,
        } => tokio_runtime()?.block_on(sdk::run(&command, scenario, &load.load()))?,
        Command::SdkMemory {
            command,
            pid,
            conns,
            settle_secs,
        } => tokio_runtime()?.block_on(sdk::memory(
            &command,
            pid,
            conns,
            Duration::from_secs(settle_secs),
        ))?,
        Command::NatsRr {
            url,
            requesters,
            load,
        } => tokio_runtime()?.block_on(nats::request_reply(&url, &load.load(), requesters))?,
        Command::RawRr {
            command,
            requesters,
            load,
        } => raw::request_reply(&command, &load.load(), requesters)?,
        Command::SdkRr {
            command,
            requesters,
            load,
        } => tokio_runtime()?.block_on(sdk::request_reply(&command, &load.load(), requesters))?,
        Command::NatsMemory {
            url,
            pid,
            conns,
            settle_secs,
        } => tokio_runtime()?.block_on(nats::memory(
            &url,
            pid,
            conns,
            Duration::from_secs(settle_secs),
        ))?,
        Command::RawMemory {
            command,
            pid,
            conns,
            multicatch,
            settle_secs,
        } => raw::memory(
            &command,
            pid,
            conns,
            multicatch,
            Duration::from_secs(settle_secs),
        )?,
    };
    println!("{}", report.to_line());
    Ok(())
}
