//! The scenarios: each turns its flags into a run and returns the run's result object.
//!
//! Every result carries the same core fields (`scenario`, `params`, `duration_s`, `requests`,
//! `events`, `throughput_events_per_s`, `latency_us`, `errors_by_status`); scenarios add their
//! own (`loss`, `server`, `recovery`, ...). `main` adds `generator` and prints it.
//!
//! A scenario that writes before anything else (`ingest`, `ingest-batch`, `fleet`, `recovery`)
//! first checks the server is there ([`check_server`]): a run against nothing fails at once
//! instead of counting a whole run of failed requests. `e2e`, `fanout` and `connections` fail
//! as soon as no subscriber could connect.

pub mod connections;
pub mod delivery;
pub mod ingest;
pub mod recovery;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use crate::driver::Live;
use crate::http::{Reply, Target, TransportError, request_once};
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

/// One `GET /api/health` on a fresh connection.
pub async fn health(target: &Target, timeout: Duration) -> Result<Reply, TransportError> {
    request_once(target, Method::GET, "/api/health", Bytes::new(), timeout).await
}

/// Fails unless the server at `url` answers its health check with 200 (within `timeout`), with
/// why: the connect error (refused, a certificate not trusted, ...) or the status. `before`
/// names what the run was about to do.
pub async fn check_server(
    target: &Target,
    url: &str,
    timeout: Duration,
    before: &str,
) -> anyhow::Result<()> {
    match health(target, timeout).await {
        Ok(reply) if reply.status == StatusCode::OK => Ok(()),
        Ok(reply) => bail!(
            "the server's health check answered {} before {before}",
            reply.status
        ),
        Err(error) => bail!(
            "cannot reach the server at {url} ({}{})",
            error.key(),
            crate::http::first_connect_error().map_or(String::new(), |e| format!(": {e}"))
        ),
    }
}
