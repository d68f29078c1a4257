//! `ingest`, `ingest-batch` and `fleet`: HTTP write load through the driver, measured over
//! `--duration` after `--warmup`, with the server sampled over the same window. A server that
//! does not answer its health check first fails the run before any load is sent.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use super::{core_result, driver_progress, seconds};
use crate::cli::{FleetArgs, IngestArgs, LoadArgs};
use crate::driver::{self, Live, Plan, Schedule};
use crate::http::Target;
use crate::payload::{Fleet, IngestEvents, RequestSource};
use crate::report::round3;
use crate::system::ServerProbe;

pub async fn ingest(mut args: IngestArgs, batched: bool) -> anyhow::Result<Value> {
    let batch = match (batched, args.batch) {
        (true, given) => given.unwrap_or(100),
        (false, None | Some(1)) => 1,
        (false, Some(_)) => {
            return Err(
                crate::UsageError("--batch is for ingest-batch; ingest sends one event").into(),
            );
        }
    };
    args.load.settle_open_loop()?;
    // Echo what ran.
    args.batch = Some(batch);
    let target = Target::from_common(&args.common)?;
    let timeout = Duration::from_millis(args.load.timeout_ms);
    super::check_server(&target, &args.common.url, timeout, "loading").await?;
    let source = Arc::new(IngestEvents {
        prefix: IngestEvents::prefix_in(&args.namespace),
        batch,
        props: args.props,
        entities: args.entities,
        total: None,
    });
    let plan = plan_for(&args.load, args.load.rate.map(|rate| rate / batch as f64));
    let scenario = if batched { "ingest-batch" } else { "ingest" };
    let mut result = measure(
        scenario,
        &args,
        target,
        source,
        plan,
        seconds(args.timing.warmup),
        seconds(args.timing.duration),
        args.common.server_pid,
    )
    .await?;
    result["target_rate_events_per_s"] = json!(args.load.rate);
    Ok(result)
}

pub async fn fleet(args: FleetArgs) -> anyhow::Result<Value> {
    let target = Target::from_common(&args.common)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    super::check_server(&target, &args.common.url, timeout, "loading").await?;
    let rate = args.devices as f64 * 1000.0 / args.interval_ms as f64;
    let source = Arc::new(Fleet::new(
        &args.namespace,
        args.devices,
        args.devices_per_site,
        args.sensors,
        args.seed,
    ));
    let plan = Plan {
        connections: args.connections,
        request_rate: Some(rate),
        request_limit: None,
        drop_after: Duration::from_millis(args.drop_after_ms),
        late_after: Duration::from_millis(args.late_ms),
        max_backlog: None,
        timeout: Duration::from_millis(args.timeout_ms),
    };
    let mut result = measure(
        "fleet",
        &args,
        target,
        source,
        plan,
        seconds(args.timing.warmup),
        seconds(args.timing.duration),
        args.common.server_pid,
    )
    .await?;
    result["target_rate_events_per_s"] = json!(round3(rate));
    result["sites"] = json!(args.devices.div_ceil(args.devices_per_site.max(1)));
    Ok(result)
}

pub fn plan_for(load: &LoadArgs, request_rate: Option<f64>) -> Plan {
    Plan {
        connections: load.connections,
        request_rate: request_rate.filter(|rate| *rate > 0.0),
        request_limit: None,
        // Filled in by `LoadArgs::settle_open_loop` for an open loop; a closed loop has none
        // and does not use them (nothing is due).
        drop_after: Duration::from_millis(load.drop_after_ms.unwrap_or_default()),
        late_after: Duration::from_millis(load.late_ms.unwrap_or_default()),
        max_backlog: load.max_in_flight,
        timeout: Duration::from_millis(load.timeout_ms),
    }
}

/// Runs the driver and builds the common result, `late`/`dropped` and `server` included.
#[allow(clippy::too_many_arguments)]
async fn measure(
    scenario: &str,
    params: &impl Serialize,
    target: Target,
    source: Arc<dyn RequestSource>,
    plan: Plan,
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let open_loop = plan.request_rate.is_some();
    let live = Arc::new(Live::default());
    let progress = driver_progress("events", &live);
    let mut probe = ServerProbe::new(server_pid);
    let schedule = Schedule::new(warmup, duration);
    let run = tokio::spawn(driver::run(target, source, plan, schedule, live));
    tokio::select! {
        () = tokio::time::sleep_until(schedule.measure_start.into()) => {}
        () = crate::interrupt::stopped() => {}
    }
    probe.start()?;
    let tally = run.await?;
    drop(progress);
    let mut result = core_result(
        scenario,
        params,
        crate::interrupt::measured(&schedule).min(duration),
        tally.requests,
        tally.events,
        &tally.latency,
        &tally.errors,
    );
    result["loop"] = json!(if open_loop { "open" } else { "closed" });
    result["late"] = json!(tally.late);
    result["dropped"] = json!(tally.dropped);
    // Warmup included: what the server holds from this run.
    result["total"] = json!({"requests": tally.total_requests, "events": tally.total_events});
    if let Some(server) = probe.finish(tally.events, "event") {
        result["server"] = server;
    }
    Ok(result)
}
