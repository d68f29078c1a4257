//! Ctrl-C (SIGINT) or SIGTERM during a run: the first one ends the run early and the result
//! covers what was measured until then (marked `"interrupted": true`); another one later than
//! [`REPEAT_WINDOW`] after it quits at once (exit 130, or 143 for SIGTERM).
//!
//! Invariants: nothing is sent after the first signal; every figure of an interrupted run is
//! counted over the measured window cut at that moment ([`measured`]), so rates stay rates. A
//! signal within [`REPEAT_WINDOW`] of the first is the same stop delivered twice (coreutils
//! `timeout` signals its child and then the child's whole process group), not a second Ctrl-C.
//! Fanout worker processes ignore both signals ([`ignore_in_worker`]): the terminal and
//! `timeout` send them to the whole process group, and the parent collects their counts as for
//! any other end (a worker whose parent is gone ends when its stdin closes).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::driver::Schedule;

/// Signals this soon after the first one are echoes of it, not a request to quit at once.
const REPEAT_WINDOW: Duration = Duration::from_millis(500);

static STOPPED_AT: OnceLock<Instant> = OnceLock::new();
static STOPPED: Notify = Notify::const_new();

/// Listens for SIGINT and SIGTERM for the rest of the run (call inside the runtime).
pub fn install() {
    // Registered here, not in the task: a signal arriving before the task first runs is seen.
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("flux-loadtest: cannot listen for SIGINT/SIGTERM; they end the run at once");
        return;
    };
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "interrupted",
            _ = terminate.recv() => "terminated (SIGTERM)",
        };
        let first = Instant::now();
        let _ = STOPPED_AT.set(first);
        STOPPED.notify_waiters();
        eprintln!("\nflux-loadtest: {name}; finishing with what was measured (Ctrl-C again quits)");
        loop {
            let code = tokio::select! {
                _ = interrupt.recv() => 130,
                _ = terminate.recv() => 143,
            };
            if first.elapsed() >= REPEAT_WINDOW {
                std::process::exit(code);
            }
        }
    });
}

/// When the run was interrupted, if it was.
pub fn stopped_at() -> Option<Instant> {
    STOPPED_AT.get().copied()
}

/// Returns once the run is interrupted (never, if it is not).
pub async fn stopped() {
    let notified = STOPPED.notified();
    if stopped_at().is_some() {
        return;
    }
    notified.await;
}

/// The measured window of `schedule` as it ran: cut at the interrupt, if one came.
pub fn measured(schedule: &Schedule) -> Duration {
    let end = stopped_at().map_or(schedule.end, |at| at.min(schedule.end));
    end.saturating_duration_since(schedule.measure_start)
}

/// A fanout worker leaves SIGINT and SIGTERM to its parent, which ends the run and asks it for
/// its counts.
pub fn ignore_in_worker() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: setting a signal's disposition to "ignore" touches no memory of ours.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}
