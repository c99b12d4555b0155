//! Shutdown: on SIGTERM or SIGINT the binary says GBYE `shutdown` to every
//! cell and exits 0, promptly; an in-process transmitter's `shutdown()`
//! returns promptly and is harmless twice.

use std::time::Duration;

use thynapse_tests::{
    binary_watchdog, watchdog, FlowProbe, RawCell, Signal, TransmitterProcess, REPLY_TIMEOUT,
};
use thynapse_transmitter::{Config, Transmitter};

/// How long a shutdown may take: the sockets linger 1 s at most.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// Starts the binary with `args`, joins two cells, sends `signal`, and
/// requires GBYE `shutdown` to both and exit status 0.
fn signal_says_gbye_and_exits_zero(
    args: &[&str],
    token: Option<&str>,
    signal: Signal,
) -> anyhow::Result<()> {
    let mut t = TransmitterProcess::spawn(args)?;
    let mut probe = FlowProbe::join(t.command_endpoint(), token)?;
    probe.check()?;
    t.signal(signal)?;
    for cell in [&mut probe.publisher, &mut probe.listener] {
        let bye = cell.expect("GBYE", REPLY_TIMEOUT)?;
        assert_eq!(bye["reason"], "shutdown", "GBYE {bye}");
    }
    let status = t.wait_exit(SHUTDOWN_DEADLINE)?;
    assert!(status.success(), "exit status {status}; log:\n{}", t.log());
    Ok(())
}

#[test]
fn sigterm_says_gbye_to_every_cell_and_exits_zero() -> anyhow::Result<()> {
    binary_watchdog("sigterm", || {
        signal_says_gbye_and_exits_zero(&[], None, Signal::SIGTERM)
    })
}

#[test]
fn sigint_says_gbye_to_every_cell_and_exits_zero() -> anyhow::Result<()> {
    binary_watchdog("sigint", || {
        signal_says_gbye_and_exits_zero(&[], None, Signal::SIGINT)
    })
}

#[test]
fn sigterm_with_a_token_says_gbye_to_every_cell_and_exits_zero() -> anyhow::Result<()> {
    binary_watchdog("sigterm_token", || {
        signal_says_gbye_and_exits_zero(&["--token", "tok"], Some("tok"), Signal::SIGTERM)
    })
}

#[test]
fn an_in_process_transmitter_shuts_down_promptly_and_twice_is_harmless() -> anyhow::Result<()> {
    watchdog("shutdown", SHUTDOWN_DEADLINE * 2, || {
        let mut t = Transmitter::start(Config::for_tests())?;
        let mut cell = RawCell::open(t.command_endpoint())?;
        cell.hello("leaving")?;
        t.shutdown();
        assert_eq!(cell.expect("GBYE", REPLY_TIMEOUT)?["reason"], "shutdown");
        t.shutdown();
        Ok(())
    })
}

#[test]
fn an_in_process_transmitter_with_a_token_shuts_down_promptly() -> anyhow::Result<()> {
    watchdog("shutdown_token", SHUTDOWN_DEADLINE * 2, || {
        let mut t = Transmitter::start(Config {
            token: Some("tok".to_owned()),
            ..Config::for_tests()
        })?;
        t.shutdown();
        Ok(())
    })
}
