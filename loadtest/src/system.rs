//! Process accounting: the server's CPU time and RSS from `/proc/<pid>`, and the generator's
//! own CPU time from `getrusage` (children included once they have been waited for). A
//! `--server-pid` whose process is not named `flux` is warned about, not refused.

use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};

use crate::report::round3;

/// CPU time and resident memory of one process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSample {
    pub cpu_s: f64,
    /// The part of `cpu_s` spent in the kernel (stime).
    pub sys_s: f64,
    pub rss_bytes: u64,
    pub at: Instant,
}

/// Reads utime+stime and VmRSS of `pid`.
pub fn sample(pid: u32) -> anyhow::Result<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is --server-pid right?)"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // A zombie (exited, not yet reaped by its parent) keeps its stat but has no memory left.
    if matches!(fields.first(), Some(&"Z" | &"X")) {
        anyhow::bail!("process {pid} has exited");
    }
    // After the name: state is field 3 of the line, so utime (14) and stime (15) are 11 and 12.
    let (user, sys): (u64, u64) = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some((u.parse().ok()?, s.parse().ok()?)))
        .context("malformed utime/stime in /proc stat")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(ProcessSample {
        cpu_s: (user + sys) as f64 / clock_ticks_per_second(),
        sys_s: sys as f64 / clock_ticks_per_second(),
        rss_bytes: rss_kib * 1024,
        at: Instant::now(),
    })
}

/// The name of `--server-pid`'s process when it is not `flux` (`/proc/<pid>/comm`), e.g. a
/// `timeout` or shell wrapper's pid given instead of the server's; `None` when it is `flux` or
/// cannot be read (sampling says why then).
pub fn not_a_flux_process(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let name = comm.trim_end_matches('\n');
    (name != "flux").then(|| name.to_string())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Samples the server (when a pid was given) around a measured window.
pub struct ServerProbe {
    pid: Option<u32>,
    before: Option<ProcessSample>,
}

impl ServerProbe {
    pub fn new(pid: Option<u32>) -> ServerProbe {
        ServerProbe { pid, before: None }
    }

    /// Takes the "before" sample; call when the measured window starts.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.pid {
            self.before = Some(sample(pid)?);
        }
        Ok(())
    }

    /// `{"cpu_s","cpu_sys_s","rss_bytes","rss_before_bytes","cpu_us_per_<unit>"}` over the
    /// window (`cpu_sys_s`: the kernel's part of `cpu_s`), or `None` without a pid. A server
    /// gone by then gives `{"pid","error"}`: the rest of the run's result still stands.
    pub fn finish(&self, work: u64, unit: &str) -> Option<Value> {
        let (Some(pid), Some(before)) = (self.pid, self.before) else {
            return None;
        };
        let after = match sample(pid) {
            Ok(after) => after,
            Err(error) => {
                return Some(json!({
                    "pid": pid,
                    "error": format!("the server process was gone at the end of the run: {error:#}"),
                }));
            }
        };
        let cpu_s = after.cpu_s - before.cpu_s;
        let per_unit = if work > 0 {
            cpu_s * 1e6 / work as f64
        } else {
            0.0
        };
        let mut server = json!({
            "pid": pid,
            "cpu_s": round3(cpu_s),
            "cpu_sys_s": round3(after.sys_s - before.sys_s),
            "cpu_utilization": round3(cpu_s / after.at.duration_since(before.at).as_secs_f64()),
            "rss_bytes": after.rss_bytes,
            "rss_before_bytes": before.rss_bytes,
        });
        server[format!("cpu_us_per_{unit}")] = json!(round3(per_unit));
        Some(server)
    }
}

/// Descriptors a process keeps for itself besides its subscribers' sockets.
const RESERVED_FDS: u64 = 64;

/// Raises this process's open-files limit to its hard maximum (children inherit it).
pub fn raise_open_files_limit() {
    // SAFETY: an all-zero rlimit is a valid value of this plain C struct.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// How many subscriber sockets one process can hold under its open-files limit.
pub fn open_files_budget() -> usize {
    // SAFETY: as in `raise_open_files_limit`.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return usize::MAX;
    }
    usize::try_from(limit.rlim_cur.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX)
}

/// The generator's CPU seconds: this process and its waited-for children (fanout workers).
pub fn generator_json() -> Value {
    let own = rusage_cpu_s(libc::RUSAGE_SELF);
    let children = rusage_cpu_s(libc::RUSAGE_CHILDREN);
    json!({
        "cpu_s": round3(own + children),
        "cpu_s_self": round3(own),
        "cpu_s_children": round3(children),
    })
}

/// User plus system CPU seconds of `who`.
pub fn rusage_cpu_s(who: libc::c_int) -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_itself() {
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0);
        assert!(me.cpu_s >= me.sys_s && me.sys_s >= 0.0);
    }
}
