//! `connections`: N idle WebSocket subscribers held open for `--hold` seconds; with
//! `--server-pid`, the server's RSS before, after connecting, after holding, and per
//! connection.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{core_result, seconds};
use crate::cli::ConnectionsArgs;
use crate::http::Target;
use crate::progress::{Counters, Progress};
use crate::report::{Errors, round3};
use crate::subscribers::{PoolConfig, SubscriberGroup};
use crate::system::{ProcessSample, sample};

pub async fn run(args: ConnectionsArgs) -> anyhow::Result<Value> {
    let target = Target::from_common(&args.common)?;
    let pid = args.common.server_pid;
    let take =
        |pid: Option<u32>| -> anyhow::Result<Option<ProcessSample>> { pid.map(sample).transpose() };
    let before = take(pid)?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let group = SubscriberGroup::start(
        PoolConfig {
            target,
            subscribers: args.connections,
            pattern: args.pattern.clone(),
            threads: args.subscriber_threads.unwrap_or(cores),
            idle: true,
            drop_subscriber_after: None,
        },
        args.subscribers_per_process,
    )?;
    let processes = group.processes();
    let started = Instant::now();
    let timeout = Duration::from_secs(30 + args.connections as u64 / 500);
    let (group, status) = tokio::task::spawn_blocking(move || {
        let status = group.wait_connected(timeout);
        (group, status)
    })
    .await?;
    let status = status?;
    if status.connected == 0 {
        let _ = group.finish(0, Duration::ZERO);
        anyhow::bail!(
            "no subscriber could connect to {} ({} attempts failed)",
            args.common.url,
            status.failed
        );
    }
    let connect_s = started.elapsed().as_secs_f64();
    // A server gone from here on leaves `server.error`; the connections' figures still stand.
    let connected = take(pid);

    let progress = {
        let source = group.status_source();
        let counters: Counters = Box::new(move || {
            let status = source.status();
            (
                status.connected - status.closed,
                status.closed + status.failed,
            )
        });
        Progress::start("open connections", counters)
    };
    let holding = Instant::now();
    tokio::select! {
        () = tokio::time::sleep(seconds(args.hold)) => {}
        () = crate::interrupt::stopped() => {}
    }
    let hold = holding.elapsed().min(seconds(args.hold));
    let held = take(pid);
    drop(progress);
    let outcome = tokio::task::spawn_blocking(move || group.finish(0, Duration::ZERO))
        .await?
        .context("collecting subscriber results")?;

    let mut errors = Errors::default();
    if status.failed > 0 {
        errors.add("connect_failed", status.failed);
    }
    let mut result = core_result(
        "connections",
        &args,
        hold,
        0,
        0,
        &Histogram::new(3).context("histogram")?,
        &errors,
    );
    let open_at_end = outcome.connected - outcome.closed_by_server;
    result["processes"] = json!(processes);
    result["connections"] = json!({
        "requested": args.connections,
        "connected": status.connected,
        "connect_failed": status.failed,
        "closed_during_hold": outcome.closed_by_server,
        "open_at_end": open_at_end,
        "connect_s": round3(connect_s),
        "connects_per_s": if connect_s > 0.0 { round3(status.connected as f64 / connect_s) } else { 0.0 },
        "close_codes": outcome.close_codes,
    });
    let samples = connected.and_then(|connected| Ok((connected, held?)));
    if let (Some(pid), Err(error)) = (pid, &samples) {
        result["server"] = json!({
            "pid": pid,
            "error": format!("the server process was gone before the end of the run: {error:#}"),
        });
    }
    if let (Some(pid), Some(before), Ok((Some(connected), Some(held)))) = (pid, before, samples) {
        let per_connection = |after: &ProcessSample| {
            if status.connected > 0 {
                (after.rss_bytes as f64 - before.rss_bytes as f64) / status.connected as f64
            } else {
                0.0
            }
        };
        result["server"] = json!({
            "pid": pid,
            "cpu_s": round3(held.cpu_s - before.cpu_s),
            "rss_bytes": held.rss_bytes,
            "rss_before_bytes": before.rss_bytes,
            "rss_connected_bytes": connected.rss_bytes,
            "rss_per_connection_bytes": per_connection(&held).round(),
            "rss_per_connection_after_connect_bytes": per_connection(&connected).round(),
        });
    }
    Ok(result)
}
