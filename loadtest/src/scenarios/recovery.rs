//! `recovery`: populate N events in batches, write one marker event with a value only this run
//! knows, restart the server (by `--restart-cmd`, or by hand), and time until a GET of the
//! marker's entity returns that value again, polling every 5 ms; then check that the populated
//! data came back with it.
//!
//! The clock starts when the restart command is launched or, without one, when the server is
//! first seen down, and stops at the marker. With `--server-pid`, `server` describes the process
//! while it was being populated (the restart replaces it).
//!
//! Invariant: a run succeeds only when, after the restart, the server holds as many of this
//! run's entities (`<namespace>/dev-<n>`, counted by paging the namespace) as before it, and a
//! sample of them (checked before the restart against what this run sent) has the same
//! properties. Any failure names what was missing and the last thing the server answered.

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
/// Entities whose properties are compared before and after the restart.
const SAMPLE_ENTITIES: u64 = 64;
/// Ids per page when counting this run's entities.
const PAGE_LIMIT: usize = 1000;
/// Bound on one page or entity read of the data check.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: RecoveryArgs) -> anyhow::Result<Value> {
    let target = Target::from_common(&args.common)?;
    // A server that is not there would otherwise cost every populating request a failure.
    super::check_server(&target, &args.common.url, POLL_TIMEOUT, "populating").await?;
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
    let tally = driver::run(target.clone(), source.clone(), plan, schedule, live).await;
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
    // What the restart must bring back, read while the server still runs.
    let written = Written::read(&target, &args, &source, tally.total_events).await?;

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
        let last = match reply {
            Ok(reply) => {
                first_answer.get_or_insert(now);
                if reply.status == StatusCode::OK
                    && memchr::memmem::find(&reply.body, expected.as_bytes()).is_some()
                {
                    break now;
                }
                if reply.status == StatusCode::OK {
                    format!(
                        "the marker entity holds another value: {}",
                        excerpt(&reply.body)
                    )
                } else {
                    format!("{} {}", reply.status, excerpt(&reply.body))
                }
            }
            Err(error) => format!(
                "no answer ({}){}",
                error.key(),
                crate::http::first_connect_error().map_or(String::new(), |e| format!(
                    "; the run's first connect error: {e}"
                ))
            ),
        };
        if now >= deadline {
            let back = match first_answer {
                Some(at) => format!(
                    "the server came back (first answer {:.3} s after the restart began) but \
                     without the marker",
                    at.duration_since(clock_start).as_secs_f64()
                ),
                None => "the server never answered after the restart".to_string(),
            };
            bail!(
                "the marker event was not readable within {timeout:?} of the restart: {back}; \
                 {polls} polls of GET {path}, the last: {last}"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let checked = written.check_after_restart(&target, &args).await?;

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
        "entities_checked": checked.entities,
        "entities_sampled": checked.sampled,
    });
    Ok(result)
}

/// What the check after the restart found (all of it matched, or the run failed).
struct Checked {
    entities: u64,
    sampled: u64,
}

/// This run's data on the server before the restart.
struct Written {
    /// `<namespace>/dev-`.
    prefix: String,
    /// Ids `<prefix><n>` with `n` below this are this run's.
    distinct: u64,
    /// How many of them the server held.
    entities: u64,
    /// A sample of them and their properties, each checked against what this run sent.
    sample: Vec<(String, Value)>,
}

impl Written {
    async fn read(
        target: &Target,
        args: &RecoveryArgs,
        source: &IngestEvents,
        accepted: u64,
    ) -> anyhow::Result<Written> {
        let prefix = source.prefix.clone();
        let distinct = args.entities.min(args.events);
        let entities = count_entities(target, &args.namespace, &prefix, distinct)
            .await
            .map_err(|e| anyhow::anyhow!("counting the populated entities: {e}"))?;
        // With every event accepted every id was written; with some refused, the ones held.
        if accepted >= args.events && entities != distinct {
            bail!(
                "before the restart the server holds {entities} of the {distinct} entities \
                 {prefix}* this run wrote"
            );
        }
        let mut sample = Vec::new();
        let step = distinct.div_ceil(SAMPLE_ENTITIES).max(1);
        let picks = (0..distinct)
            .step_by(step as usize)
            .chain([distinct.saturating_sub(1)]);
        for n in picks {
            let id = format!("{prefix}{n}");
            if sample.iter().any(|(sampled, _)| *sampled == id) {
                continue;
            }
            let Some(properties) = read_properties(target, &id).await? else {
                if accepted >= args.events {
                    bail!("before the restart, entity {id} is not found");
                }
                continue;
            };
            check_sent(source, args.events, n, &id, &properties)?;
            sample.push((id, properties));
        }
        Ok(Written {
            prefix,
            distinct,
            entities,
            sample,
        })
    }

    /// After the marker is back: the same count of this run's entities, the same properties.
    async fn check_after_restart(
        &self,
        target: &Target,
        args: &RecoveryArgs,
    ) -> anyhow::Result<Checked> {
        let (prefix, before) = (&self.prefix, self.entities);
        let after = count_entities(target, &args.namespace, prefix, self.distinct)
            .await
            .map_err(|e| anyhow::anyhow!("the marker came back, but counting the entities: {e}"))?;
        if after != before {
            bail!(
                "the marker came back, but the populated data did not: the server holds {after} \
                 of the {before} entities {prefix}* it held before the restart"
            );
        }
        for (id, properties) in &self.sample {
            match read_properties(target, id).await? {
                Some(now) if now == *properties => {}
                Some(now) => bail!(
                    "the marker came back, but entity {id} did not: its properties are {now} \
                     after the restart, {properties} before it"
                ),
                None => {
                    bail!("the marker came back, but entity {id} is not found after the restart")
                }
            }
        }
        Ok(Checked {
            entities: after,
            sampled: self.sample.len() as u64,
        })
    }
}

/// Entity `n`'s properties must be those of one event this run sent it (the last one, unless
/// batches on different connections crossed); the sequence is in `p0`.
fn check_sent(
    source: &IngestEvents,
    events: u64,
    n: u64,
    id: &str,
    properties: &Value,
) -> anyhow::Result<()> {
    if source.props == 0 {
        return Ok(());
    }
    let sent = properties["p0"]
        .as_u64()
        .filter(|&s| s < events && s % source.entities.max(1) == n)
        .map(|s| source.properties_of(s));
    let matches = sent
        .as_ref()
        .and_then(Value::as_object)
        .is_some_and(|sent| {
            sent.iter()
                .all(|(key, value)| properties.get(key) == Some(value))
        });
    if !matches {
        bail!(
            "before the restart, entity {id} holds {properties}, which no event this run sent it carries"
        );
    }
    Ok(())
}

/// `properties` of one entity; `None` when the server answers 404.
async fn read_properties(target: &Target, id: &str) -> anyhow::Result<Option<Value>> {
    let path = format!("/api/state/entities/{}", query_value(id));
    let reply = request_once(target, Method::GET, &path, Bytes::new(), READ_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("reading entity {id}: {}", e.key()))?;
    match reply.status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(None),
        status => bail!("reading entity {id}: {status} {}", excerpt(&reply.body)),
    }
    let entity: Value = serde_json::from_slice(&reply.body)
        .with_context(|| format!("reading entity {id}: not JSON"))?;
    Ok(Some(entity["properties"].clone()))
}

/// How many ids `<prefix><n>`, `n < distinct`, the server holds: pages of
/// `GET /api/state/entities?namespace=<namespace>&limit=..&after=..`.
async fn count_entities(
    target: &Target,
    namespace: &str,
    prefix: &str,
    distinct: u64,
) -> Result<u64, String> {
    let mut count = 0u64;
    let mut after: Option<String> = None;
    loop {
        let mut path = format!(
            "/api/state/entities?namespace={}&limit={PAGE_LIMIT}",
            query_value(namespace)
        );
        if let Some(after) = &after {
            path += &format!("&after={}", query_value(after));
        }
        let reply = request_once(target, Method::GET, &path, Bytes::new(), READ_TIMEOUT)
            .await
            .map_err(|e| format!("GET {path}: no answer ({})", e.key()))?;
        if reply.status != StatusCode::OK {
            return Err(format!(
                "GET {path}: {} {}",
                reply.status,
                excerpt(&reply.body)
            ));
        }
        let page: Vec<Value> = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("GET {path}: not a JSON list ({e})"))?;
        for entity in &page {
            let n = entity["id"]
                .as_str()
                .and_then(|id| id.strip_prefix(prefix))
                .and_then(|n| n.parse::<u64>().ok());
            count += u64::from(n.is_some_and(|n| n < distinct));
        }
        match page.last().and_then(|e| e["id"].as_str()) {
            Some(last) if page.len() >= PAGE_LIMIT => after = Some(last.to_string()),
            _ => return Ok(count),
        }
    }
}

/// `text` percent-encoded for a query value or a path segment.
fn query_value(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The start of a reply body, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.into_owned(),
    }
}

/// Polls health until the server stops answering; returns when that was first seen.
async fn wait_until_down(target: &Target, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = super::health(target, POLL_TIMEOUT).await;
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
