//! `thynapse`: run a transmitter, or ask one about the mesh (the operator
//! commands of [`cli`]).

mod cli;

/// mimalloc, which also takes libzmq's `malloc`/`free` (feature `override`):
/// messages are allocated on the router thread and freed on libzmq's I/O
/// thread, and the other way round, where glibc's arenas contend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thynapse_protocol::limits;
use thynapse_transmitter::{Config, Transmitter};

#[derive(Parser)]
#[command(
    name = "thynapse",
    version,
    about = "Thynapse: a decentralized message bus over ZeroMQ",
    after_help = cli::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a transmitter: the daemon that cells join.
    Transmitter(TransmitterArgs),
    #[command(flatten)]
    Operator(cli::Command),
}

#[derive(clap::Args)]
struct TransmitterArgs {
    /// Endpoint of the ROUTER command socket (port 0 picks a free port).
    #[arg(long, env = "THYNAPSE_COMMAND", default_value = limits::DEFAULT_COMMAND_ENDPOINT)]
    command: String,
    /// Endpoint of the XPUB event socket (port 0 picks a free port).
    #[arg(long, env = "THYNAPSE_EVENT", default_value = limits::DEFAULT_EVENT_ENDPOINT)]
    event: String,
    /// Event endpoint announced to cells in WLCM (when binding 0.0.0.0).
    #[arg(long, env = "THYNAPSE_ADVERTISE")]
    advertise: Option<String>,
    /// Shared secret every connection must present (PLAIN password).
    #[arg(long, env = "THYNAPSE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Largest frame accepted, in bytes (each frame of a message).
    #[arg(long, env = "THYNAPSE_MAX_FRAME", default_value_t = limits::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Heartbeat interval announced to cells, in milliseconds.
    #[arg(long, env = "THYNAPSE_HEARTBEAT_MS", default_value_t = limits::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// Time a cell has to ack a delivery before redelivery, in milliseconds.
    #[arg(long, env = "THYNAPSE_ACK_TIMEOUT_MS", default_value_t = limits::DEFAULT_ACK_TIMEOUT_MS)]
    ack_timeout_ms: u64,
    /// Command endpoint of a transmitter to join (repeatable; the
    /// environment variable takes a comma-separated list).
    #[arg(long, env = "THYNAPSE_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// Secret transmitters present to each other (needs --token).
    #[arg(long, env = "THYNAPSE_MESH_SECRET", hide_env_values = true)]
    mesh_secret: Option<String>,
    /// Run alone: no gossip, no mesh.
    #[arg(long, env = "THYNAPSE_NO_MESH")]
    no_mesh: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THYNAPSE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Transmitter(args) => match run_transmitter(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:?}");
                ExitCode::FAILURE
            }
        },
        Command::Operator(command) => command.run(),
    }
}

fn run_transmitter(args: TransmitterArgs) -> anyhow::Result<()> {
    let token = args.token.filter(|t| !t.is_empty());
    let config = Config {
        command: args.command,
        event: args.event,
        advertise: args.advertise,
        token,
        max_frame: args.max_frame,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        ack_timeout: Duration::from_millis(args.ack_timeout_ms),
        mesh: !args.no_mesh,
        join: args.join,
        mesh_secret: args.mesh_secret.filter(|s| !s.is_empty()),
    };
    let mut t = Transmitter::start(config).context("starting the transmitter")?;
    let stop = t.stop_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while draining exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    // One machine-readable line, for scripts and tests that start us on port 0.
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "thynapse transmitter id={} command={} event={}",
        t.id(),
        t.command_endpoint(),
        t.event_endpoint()
    )?;
    stdout.flush()?;
    drop(stdout);
    t.wait();
    Ok(())
}
