//! The scenarios: each turns its flags into a run and returns the run's result object.
//!
//! Every result carries the same core fields (`scenario`, `params`, `duration_s`, `requests`,
//! `events`, `throughput_events_per_s`, `latency_us`, `errors_by_status`); scenarios add their
//! own (`loss`, `server`, `recovery`, ...). `main` adds `generator` and prints it.

pub mod connections;
pub mod delivery;
pub mod ingest;
pub mod recovery;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::driver::Live;
use crate::progress::{Counters, Progress};
use crate::report::{Errors, latency_json, round3};

/// The fields every result starts with.
pub fn core_result(
    scenario: &str,
    params: &impl Serialize,
    duration: Duration,
    requests: u64,
    events: u64,
    latency: &Histogram<u64>,
    errors: &Errors,
) -> Value {
    let seconds = duration.as_secs_f64();
    json!({
        "scenario": scenario,
        "params": params,
        "duration_s": round3(seconds),
        "requests": requests,
        "events": events,
        "throughput_events_per_s": if seconds > 0.0 { round3(events as f64 / seconds) } else { 0.0 },
        "latency_us": latency_json(latency),
        "errors_by_status": errors.to_json(),
    })
}

/// A progress line fed by a driver's live counters.
pub fn driver_progress(label: &'static str, live: &Arc<Live>) -> Progress {
    let live = live.clone();
    let counters: Counters = Box::new(move || {
        (
            live.events.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        )
    });
    Progress::start(label, counters)
}

pub fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
