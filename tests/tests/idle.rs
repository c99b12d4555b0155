//! An idle transmitter sleeps: its router thread waits in its poll
//! between heartbeats and gossip, with or without the mesh, rather than
//! turning its loop.

use std::time::Duration;

use thynapse_bench::procfs::cpu_ticks;
use thynapse_tests::{eventually, RawCell, TransmitterProcess};

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
