//! `e2e` and `fanout`: subscribers on a pattern while a publisher posts `sent_ns` events at a
//! fixed rate; reports delivery latency, delivered frames per second and loss.
//!
//! Sequence: connect and subscribe every subscriber; publish sync probes until each has seen
//! one (so no subscription races the first event); publish for warmup + duration; tell the
//! subscribers how many events were acknowledged and let them drain; sum up. Every
//! acknowledged event is expected once at every subscriber that stayed connected.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::{core_result, seconds};
use crate::cli::DeliveryArgs;
use crate::driver::{self, Live, Plan, Schedule};
use crate::http::{Target, request_once};
use crate::payload::{EVENTS_PATH, PublishTarget, Publisher, unix_ns};
use crate::progress::{Counters, Progress};
use crate::report::round3;
use crate::subscribers::{PoolConfig, SubscriberGroup};
use crate::system::ServerProbe;

/// How long subscribers may take to see a sync probe.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(mut args: DeliveryArgs, fanout: bool) -> anyhow::Result<Value> {
    let scenario = if fanout { "fanout" } else { "e2e" };
    let pattern = args.pattern.clone().unwrap_or_else(|| {
        if fanout {
            "*".to_string()
        } else {
            format!("{}/*", args.namespace)
        }
    });
    // Echo what ran.
    args.pattern = Some(pattern.clone());
    let target = Target::from_common(&args.common)?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let group = SubscriberGroup::start(
        PoolConfig {
            target: target.clone(),
            subscribers: args.subscribers,
            pattern: pattern.clone(),
            threads: args.subscriber_threads.unwrap_or(cores),
            idle: false,
            drop_subscriber_after: args.drop_subscriber_after,
        },
        args.subscribers_per_process,
    )?;
    let processes = group.processes();
    let connect_started = Instant::now();
    let connect_timeout = Duration::from_secs(30 + args.subscribers as u64 / 500);
    let (group, status) = tokio::task::spawn_blocking(move || {
        let status = group.wait_connected(connect_timeout);
        (group, status)
    })
    .await?;
    let status = status?;
    let connect_s = connect_started.elapsed().as_secs_f64();
    if status.connected == 0 {
        let _ = group.finish(0, Duration::ZERO);
        bail!("no subscriber could connect to {}", args.common.url);
    }

    let publisher = Arc::new(Publisher {
        target: PublishTarget::for_pattern(&pattern, args.entities, &args.namespace),
        batch: args.batch.max(1),
        props: args.props.max(1),
    });
    sync(&target, &publisher, &group).await?;

    let live = Arc::new(Live::default());
    let progress = {
        let source = group.status_source();
        let live = live.clone();
        let counters: Counters = Box::new(move || {
            (
                source.status().received,
                live.errors.load(Ordering::Relaxed),
            )
        });
        // `received` counts `sent_ns` frames (one per event per subscriber), not every frame.
        Progress::start("sent_ns frames delivered", counters)
    };
    let warmup = seconds(args.timing.warmup);
    let duration = seconds(args.timing.duration);
    let mut group = group;
    group.set_measure_from(unix_ns() + warmup.as_nanos() as u64);
    let mut probe = ServerProbe::new(args.common.server_pid);
    let schedule = Schedule::new(warmup, duration);
    let plan = Plan {
        connections: args.connections,
        request_rate: Some(args.rate / args.batch.max(1) as f64).filter(|r| *r > 0.0),
        request_limit: None,
        drop_after: Duration::from_secs(1),
        late_after: Duration::from_millis(10),
        max_backlog: None,
        // A publish still unanswered when the drain ends would not count anyway: the run
        // ends within duration + drain (+ the last request's own bound).
        timeout: Duration::from_millis(args.drain_ms.clamp(1000, 10_000)),
    };
    let run = tokio::spawn(driver::run(target.clone(), publisher, plan, schedule, live));
    tokio::select! {
        () = tokio::time::sleep_until(schedule.measure_start.into()) => {}
        () = crate::interrupt::stopped() => {}
    }
    probe.start()?;
    let tally = run.await?;
    let duration = crate::interrupt::measured(&schedule).min(duration);
    let expected = tally.total_events;
    let drain = Duration::from_millis(args.drain_ms);
    let outcome = tokio::task::spawn_blocking(move || group.finish(expected, drain))
        .await?
        .context("collecting subscriber results")?;
    drop(progress);

    let latency = outcome.latency_histogram(false);
    let mut result = core_result(
        scenario,
        &args,
        duration,
        tally.requests,
        tally.events,
        &latency,
        &tally.errors,
    );
    let seconds = duration.as_secs_f64();
    result["pattern"] = json!(pattern);
    result["processes"] = json!(processes);
    result["connect_s"] = json!(round3(connect_s));
    result["latency_from_due_us"] = crate::report::latency_json(&outcome.latency_histogram(true));
    result["publish_latency_us"] = crate::report::latency_json(&tally.latency);
    result["late"] = json!(tally.late);
    result["dropped"] = json!(tally.dropped);
    // Every `state_update` frame (one per property of each event), not only the `sent_ns` ones;
    // with `*`, the server's own `flux-core/directory` updates too.
    result["delivered_frames"] = json!(outcome.frames_measured);
    result["delivered_frames_per_s"] = json!(if seconds > 0.0 {
        round3(outcome.frames_measured as f64 / seconds)
    } else {
        0.0
    });
    result["loss"] = outcome.loss_json();
    result["subscribers"] = outcome.subscribers_json();
    // Warmup included: `loss.expected` counts frames for these events.
    result["total"] = json!({"requests": tally.total_requests, "events": tally.total_events});
    if let Some(server) = probe.finish(outcome.frames_measured, "frame") {
        result["server"] = server;
    }
    Ok(result)
}

/// Publishes sync probes every 100 ms until every connected subscriber has seen one.
async fn sync(
    target: &Target,
    publisher: &Publisher,
    group: &SubscriberGroup,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let mut k = 0u64;
    loop {
        if group.status().synced {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let status = group.status();
            bail!(
                "subscribers did not see the sync probe within {SYNC_TIMEOUT:?} ({} connected); \
                 does the pattern match the published ids?",
                status.connected
            );
        }
        let body = publisher.probe_body(k).freeze();
        match request_once(
            target,
            Method::POST,
            EVENTS_PATH,
            body,
            Duration::from_secs(5),
        )
        .await
        {
            Ok(reply) if reply.status == StatusCode::OK => {}
            Ok(reply) => bail!(
                "sync probe rejected: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            ),
            Err(error) => bail!("sync probe failed: {}", error.key()),
        }
        k += 1;
        let wait_until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < wait_until && !group.status().synced {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
