//! The Python raw cell (`examples/python/raw_cell.py`, pyzmq only, no SDK)
//! passes its interop selftest against the real binary, with and without
//! a token; with the wrong token, or none, it is never welcomed.

use std::process::Command;
use std::time::Duration;

use thynapse_tests::{
    binary_watchdog, run_with_deadline, workspace_root, Output, TransmitterProcess,
};

/// Deadline of each wait inside the script, in seconds.
const SCRIPT_WAIT_S: &str = "5";
/// Deadline of one whole script run.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(20);

/// Fails with a clear message when python3 or pyzmq is missing.
fn require_pyzmq() {
    let probe = run_with_deadline(
        Command::new("python3").args(["-c", "import zmq; print(zmq.pyzmq_version())"]),
        Duration::from_secs(15),
    );
    match probe {
        Err(e) => panic!("python3 is needed for the interop tests and could not run: {e:#}"),
        Ok(o) if !o.status.success() => panic!(
            "python3 cannot import zmq: run `pip install pyzmq` (CI installs it).\n{}",
            o.stderr
        ),
        Ok(_) => {}
    }
}

/// Runs `<script> --command <endpoint> [--token T] --selftest`, a script
/// of `examples/python/`.
fn selftest(script: &str, command: &str, token: Option<&str>) -> anyhow::Result<Output> {
    let script = workspace_root().join("examples/python").join(script);
    assert!(script.is_file(), "{} is missing", script.display());
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args([
            "--command",
            command,
            "--selftest",
            "--timeout",
            SCRIPT_WAIT_S,
        ])
        .current_dir(workspace_root());
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    run_with_deadline(&mut cmd, SCRIPT_DEADLINE)
}

/// Requires a passing selftest, with the transmitter still up after it
/// (shutdown itself is checked in `shutdown.rs`).
fn passes_against(args: &[&str], token: Option<&str>) -> anyhow::Result<()> {
    script_passes("raw_cell.py", args, token)
}

/// Requires `script`'s selftest to pass against a transmitter started
/// with `args`, which is still up after it.
fn script_passes(script: &str, args: &[&str], token: Option<&str>) -> anyhow::Result<()> {
    require_pyzmq();
    let mut t = TransmitterProcess::spawn(args)?;
    let out = selftest(script, t.command_endpoint(), token)?;
    let name = script.trim_end_matches(".py");
    assert!(
        out.status.success() && out.stdout.contains(&format!("{name} selftest: ok")),
        "{script} --selftest failed ({}):\nstdout:\n{}\nstderr:\n{}\ntransmitter log:\n{}",
        out.status,
        out.stdout,
        out.stderr,
        t.log()
    );
    assert!(t.is_running(), "the transmitter died; log:\n{}", t.log());
    Ok(())
}

/// Requires the selftest to fail because no WLCM ever came.
fn is_refused(args: &[&str], token: Option<&str>) -> anyhow::Result<()> {
    require_pyzmq();
    let t = TransmitterProcess::spawn(args)?;
    let out = selftest("raw_cell.py", t.command_endpoint(), token)?;
    assert!(
        !out.status.success() && !out.stdout.contains("selftest: ok"),
        "raw_cell.py with token {token:?} passed against a transmitter started with {args:?}:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("WLCM"),
        "raw_cell.py failed, but not for want of a WLCM:\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

#[test]
fn the_python_raw_cell_passes_its_selftest_against_the_binary_without_a_token() -> anyhow::Result<()>
{
    binary_watchdog("python_open", || passes_against(&[], None))
}

#[test]
fn the_python_raw_cell_passes_its_selftest_with_the_token_on_both_sides() -> anyhow::Result<()> {
    binary_watchdog("python_token", || {
        passes_against(&["--token", "s3cret-token"], Some("s3cret-token"))
    })
}

#[test]
fn the_python_raw_cell_with_a_wrong_token_is_never_welcomed() -> anyhow::Result<()> {
    binary_watchdog("python_wrong_token", || {
        is_refused(&["--token", "s3cret-token"], Some("not-the-token"))
    })
}

#[test]
fn the_python_raw_cell_without_a_token_is_never_welcomed_by_a_transmitter_that_wants_one(
) -> anyhow::Result<()> {
    binary_watchdog("python_no_token", || {
        is_refused(&["--token", "s3cret-token"], None)
    })
}

#[test]
fn the_python_raw_responder_answers_requests_and_its_requests_are_answered() -> anyhow::Result<()> {
    script_passes("raw_responder.py", &["--no-mesh"], None)
}
