//! An idle transmitter sleeps: its router thread waits in its poll
//! between heartbeats and gossip, with or without the mesh, rather than
//! turning its loop.

use std::time::Duration;

use anyhow::Context as _;
use thynapse_tests::{eventually, RawCell, TransmitterProcess};

/// CPU time, user and system, the process `pid` has used, in clock ticks
/// (fields 14 and 15 of `/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name, field 2, is in parentheses and may hold spaces.
    let after_name = stat.rsplit_once(')').context("no command name")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `after_name` starts at field 3, so field n is at n - 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

#[test]
fn an_idle_transmitter_sleeps_with_or_without_the_mesh() -> anyhow::Result<()> {
    for args in [&["--no-mesh"][..], &[][..]] {
        let t = TransmitterProcess::spawn(args)?;
        let mut cell = RawCell::open(t.command_endpoint())?;
        cell.hello("idle")?;
        let pid = t.pid();
        let start = cpu_ticks(pid)?;
        // A loop that never sleeps takes a whole core: about 100 ticks a
        // second. Heartbeats and gossip take a few. Watch for one second
        // of no traffic; more than 30 ticks is a loop turning idle.
        let spun = eventually(Duration::from_secs(1), Duration::from_millis(50), || {
            cpu_ticks(pid).map_or(true, |now| now - start > 30)
        });
        let used = cpu_ticks(pid)? - start;
        assert!(
            !spun,
            "transmitter {args:?} used {used} ticks of CPU in 1 s with nothing to do"
        );
    }
    Ok(())
}
