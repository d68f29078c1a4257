//! `recovery`: populate N events in batches, write one marker event with a value only this run
//! knows, restart the server (by `--restart-cmd`, or by hand), and time until a GET of the
//! marker's entity returns that value again, polling every 5 ms.
//!
//! The clock starts when the restart command is launched or, without one, when the server is
//! first seen down. With `--server-pid`, `server` describes the process while it was being
//! populated (the restart replaces it).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::{core_result, driver_progress};
use crate::cli::RecoveryArgs;
use crate::driver::{self, Live, Plan, Schedule};
use crate::http::{Connection, Target, request_once};
use crate::payload::{EVENTS_PATH, IngestEvents, marker_body};
use crate::report::round3;
use crate::system::ServerProbe;

const POLL_INTERVAL: Duration = Duration::from_millis(5);
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn run(args: RecoveryArgs) -> anyhow::Result<Value> {
    let target = Target::from_common(&args.common)?;
    // A server that is not there would otherwise cost every populating request a failure.
    match health(&target).await {
        Ok(reply) if reply.status == StatusCode::OK => {}
        Ok(reply) => bail!(
            "the server's health check answered {} before populating",
            reply.status
        ),
        Err(error) => bail!(
            "cannot reach the server at {} ({}{})",
            args.common.url,
            error.key(),
            crate::http::first_connect_error().map_or(String::new(), |e| format!(": {e}"))
        ),
    }
    let batch = args.batch.max(1);
    // The entity whose marker value proves the populated log is back.
    let marker_entity = format!("{}/recovery-marker", args.namespace);
    let source = Arc::new(IngestEvents {
        prefix: IngestEvents::prefix_in(&args.namespace),
        batch,
        props: args.props,
        entities: args.entities,
        total: Some(args.events),
    });
    let plan = Plan {
        connections: args.connections,
        request_rate: None,
        request_limit: Some(args.events.div_ceil(batch)),
        drop_after: Duration::from_secs(1),
        late_after: Duration::from_millis(10),
        max_backlog: None,
        timeout: Duration::from_secs(30),
    };
    let live = Arc::new(Live::default());
    let progress = driver_progress("events", &live);
    let schedule = Schedule::new(Duration::ZERO, Duration::from_secs(365 * 24 * 3600));
    // The server as it was while populating: the restart replaces the process.
    let mut probe = ServerProbe::new(args.common.server_pid);
    probe.start()?;
    let populate_started = Instant::now();
    let tally = driver::run(target.clone(), source, plan, schedule, live).await;
    let populate_time = populate_started.elapsed();
    let populated = probe.finish(tally.total_events, "event");
    drop(progress);
    if tally.total_events < args.events {
        eprintln!(
            "flux-loadtest: only {} of {} events were accepted ({:?}{})",
            tally.total_events,
            args.events,
            tally.errors.to_json(),
            crate::http::first_refusal().map_or(String::new(), |r| format!("; first refusal: {r}"))
        );
    }

    let marker = uuid::Uuid::now_v7().to_string();
    let reply = request_once(
        &target,
        Method::POST,
        EVENTS_PATH,
        marker_body(&marker_entity, &marker).freeze(),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| anyhow::anyhow!("writing the marker event: {}", e.key()))?;
    if reply.status != StatusCode::OK {
        bail!("marker event rejected: {}", reply.status);
    }
    let path = format!("/api/state/entities/{marker_entity}");
    let expected = format!("\"marker\":\"{marker}\"");

    let timeout = Duration::from_secs_f64(args.restart_timeout.max(0.0));
    let (clock_start, mode, restart_cmd_s) = match &args.restart_cmd {
        Some(cmd) => {
            // A connection to the running server: after a real restart it is dead.
            let mut before = Connection::open(&target)
                .await
                .map_err(|e| anyhow::anyhow!("connecting before the restart: {}", e.key()))?;
            let started = Instant::now();
            let status = tokio::task::spawn_blocking({
                let cmd = cmd.clone();
                move || {
                    Command::new("sh")
                        .arg("-c")
                        .arg(&cmd)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::inherit())
                        .status()
                }
            })
            .await?
            .context("running --restart-cmd")?;
            if !status.success() {
                bail!("--restart-cmd failed: {status}");
            }
            let restart_cmd_s = started.elapsed().as_secs_f64();
            let still_up = !before.is_closed()
                && before
                    .send(
                        &target,
                        Method::GET,
                        "/api/health",
                        Bytes::new(),
                        POLL_TIMEOUT,
                    )
                    .await
                    .is_ok();
            if still_up {
                bail!(
                    "--restart-cmd returned, but a connection opened before it still gets \
                     answers: the server was not restarted"
                );
            }
            (started, "command", Some(restart_cmd_s))
        }
        None => {
            eprintln!(
                "flux-loadtest: {} events written; restart the server now (e.g. kill -9 and \
                 start it again). Waiting for it to go down...",
                tally.total_events + 1
            );
            let down = wait_until_down(&target, timeout).await?;
            (down, "manual", None)
        }
    };
    let deadline = clock_start + timeout;
    let mut polls = 0u64;
    let mut first_answer: Option<Instant> = None;
    let recovered = loop {
        polls += 1;
        let reply = request_once(&target, Method::GET, &path, Bytes::new(), POLL_TIMEOUT).await;
        let now = Instant::now();
        if let Ok(reply) = reply {
            first_answer.get_or_insert(now);
            if reply.status == StatusCode::OK
                && memchr::memmem::find(&reply.body, expected.as_bytes()).is_some()
            {
                break now;
            }
        }
        if now >= deadline {
            bail!("the marker event was not readable within {timeout:?} of the restart");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };

    let mut result = core_result(
        "recovery",
        &args,
        populate_time,
        tally.total_requests,
        tally.total_events,
        &tally.latency,
        &tally.errors,
    );
    if let Some(server) = populated {
        result["server"] = server;
    }
    result["recovery"] = json!({
        "mode": mode,
        "seconds": round3(recovered.duration_since(clock_start).as_secs_f64()),
        "restart_cmd_s": restart_cmd_s.map(round3),
        "first_response_s": first_answer.map(|t| round3(t.duration_since(clock_start).as_secs_f64())),
        "polls": polls,
        "events_before_restart": tally.total_events + 1,
        "marker_entity": marker_entity,
    });
    Ok(result)
}

/// One `GET /api/health` on a fresh connection.
async fn health(target: &Target) -> Result<crate::http::Reply, crate::http::TransportError> {
    request_once(
        target,
        Method::GET,
        "/api/health",
        Bytes::new(),
        POLL_TIMEOUT,
    )
    .await
}

/// Polls health until the server stops answering; returns when that was first seen.
async fn wait_until_down(target: &Target, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = health(target).await;
        let now = Instant::now();
        match reply {
            Ok(reply) if reply.status == StatusCode::OK => {}
            _ => return Ok(now),
        }
        if now >= deadline {
            bail!("the server did not go down within {timeout:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
