//! Ctrl-C during a run: the first one ends the run early and the result covers what was
//! measured until then (marked `"interrupted": true`); a second one quits at once (exit 130).
//!
//! Invariants: nothing is sent after the first Ctrl-C; every figure of an interrupted run is
//! counted over the measured window cut at that moment ([`measured`]), so rates stay rates.
//! Fanout worker processes ignore SIGINT ([`ignore_in_worker`]): the terminal sends it to the
//! whole process group, and the parent collects their counts as for any other end.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::driver::Schedule;

static STOPPED_AT: OnceLock<Instant> = OnceLock::new();
static STOPPED: Notify = Notify::const_new();

/// Listens for Ctrl-C for the rest of the run (call inside the runtime).
pub fn install() {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        let _ = STOPPED_AT.set(Instant::now());
        STOPPED.notify_waiters();
        eprintln!(
            "\nflux-loadtest: interrupted; finishing with what was measured (Ctrl-C again quits)"
        );
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
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

/// A fanout worker leaves SIGINT to its parent, which ends the run and asks it for its counts.
pub fn ignore_in_worker() {
    // SAFETY: setting a signal's disposition to "ignore" touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}
