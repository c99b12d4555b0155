//! Resident size of a process, read from `/proc/<pid>/status`.

use anyhow::Context;

/// The resident set size (`VmRSS`) of process `pid`, in KiB.
///
/// # Errors
/// When the process does not exist or its status has no `VmRSS` line.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux
/// x86-64 and arm64).
pub const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads) process `pid` used so far, in
/// clock ticks ([`USER_HZ`] a second).
///
/// # Errors
/// When the process does not exist or its stat line cannot be read.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; count fields after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i - 3)
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse::<u64>()?)
    };
    Ok(ticks(14)? + ticks(15)?)
}

/// [`cpu_ticks`] in seconds.
///
/// # Errors
/// As [`cpu_ticks`].
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / USER_HZ)
}

/// CPU seconds used by a server and by this process between two points.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    server: Option<(u32, f64)>,
    own: f64,
}

impl CpuMark {
    /// Marks now, for the server `pid` if given.
    pub fn now(server_pid: Option<u32>) -> CpuMark {
        CpuMark {
            server: server_pid.and_then(|p| cpu_secs(p).ok().map(|c| (p, c))),
            own: cpu_secs(std::process::id()).unwrap_or(0.0),
        }
    }

    /// `(server, own)` CPU seconds used since this mark.
    pub fn since(&self) -> (Option<f64>, f64) {
        let server = self
            .server
            .and_then(|(p, c)| cpu_secs(p).ok().map(|n| n - c));
        (
            server,
            cpu_secs(std::process::id()).unwrap_or(0.0) - self.own,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_resident_size_is_positive() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        assert!(cpu_secs(std::process::id()).unwrap() >= 0.0);
    }
}
