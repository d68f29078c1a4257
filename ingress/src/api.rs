//! Request handlers of the HTTP API (SPEC "Events", "State", "Operations").
//!
//! Every handler returns `Result<Response, ApiError>`; the router adds CORS headers and renders
//! errors. Writes reply only after the engine reports the records durable *and* applied.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flux_engine::record::EventId;
use flux_engine::shard::{BUILTIN_ID_PREFIX, entity_is_builtin};
use flux_engine::{Engine, RecordBatch, json};
use futures::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::StatusCode;
use hyper::body::Frame;
use serde_json::value::RawValue;

use crate::error::{ApiError, json_response};
use crate::event::{self, ValidEvent};
use crate::http::{Request, Response, object_body, param, query_params, read_body};
use crate::metrics::IngressMetrics;
use crate::sealer::Sealer;
use crate::tenancy::{AuthConfig, Caller, RateLimiter};

/// Largest number of entities one batch delete may remove (`max_batch_delete`).
pub const MAX_BATCH_DELETE: usize = 10_000;
/// History: events returned when no `limit` is given, and the most ever returned.
pub const HISTORY_DEFAULT_LIMIT: usize = 100;
pub const HISTORY_MAX_LIMIT: usize = flux_engine::shard::HISTORY_KEPT_PER_ENTITY;
/// History: how far back `since` defaults to.
const HISTORY_DEFAULT_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// A streamed listing sends chunks of about this many bytes.
const LIST_CHUNK_BYTES: usize = 64 << 10;
/// The stream and source recorded for deletes made through the state API.
const DELETE_STREAM: &str = "flux.delete";
const DELETE_SOURCE: &str = "flux-api";

/// Serves `GET /api/ws` (the upgrade); provided by the binary, which wires egress in.
pub type WebSocketHandler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// What every handler shares.
pub struct Api {
    pub engine: Engine,
    pub auth: AuthConfig,
    pub rate_limiter: RateLimiter,
    /// Seals connector credentials; `None` without `FLUX_ENCRYPTION_KEY`.
    pub sealer: Option<Sealer>,
    pub metrics: Arc<IngressMetrics>,
    /// Every component's metrics, rendered by `GET /metrics`.
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub websocket: Option<WebSocketHandler>,
    /// A client must send its request headers within this time, and no byte of a body it is
    /// sending may be more than this late.
    pub request_timeout: std::time::Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Room a generated event id takes in a record (a UUID's 16 bytes).
const GENERATED_ID_BYTES: usize = 16;

fn new_event_id() -> [u8; 16] {
    EventIds::default().next_id()
}

/// Generated event ids for one request: a UUIDv7 from the uuid crate for the first, then
/// counting up in the random low bits (RFC 9562 section 6.2, method 2), so a batch reads the
/// clock and the random generator once. Ids stay unique (another request starts from fresh
/// random bits) and ascend within a request.
#[derive(Default)]
struct EventIds {
    next: Option<u128>,
}

impl EventIds {
    /// The 62 random bits after the variant (`rand_b`), where the count goes.
    const RAND_B: u128 = (1 << 62) - 1;

    /// The next id's 16 bytes (`EventId::Uuid` renders them).
    fn next_id(&mut self) -> [u8; 16] {
        let id = match self.next {
            Some(id) => id,
            None => uuid::Uuid::now_v7().as_u128(),
        };
        // A count that would carry out of `rand_b` starts again from a fresh id.
        self.next = (id & Self::RAND_B != Self::RAND_B).then_some(id + 1);
        id.to_be_bytes()
    }
}

fn body_str(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::bad_request("invalid JSON: body is not UTF-8"))
}

fn write_ack(out: &mut Vec<u8>, event: &ValidEvent<'_>) {
    out.extend_from_slice(b"{\"eventId\":");
    json::write_str(out, event.event_id.as_event_id().as_str(&mut [0; 36]));
    out.extend_from_slice(b",\"stream\":");
    json::write_str(out, &event.stream);
    out.push(b'}');
}

impl Api {
    /// The writer of `request`, by its bearer token (401 when auth is on and it has none).
    pub fn writer(&self, request: &Request) -> Result<Caller, ApiError> {
        self.auth.writer(request.headers(), |hash| {
            self.engine
                .with_control(|c| c.namespace_for_token(hash).map(|ns| ns.name.clone()))
        })
    }

    /// Gate of admin-only operations ([`crate::tenancy::AuthConfig::require_admin`]), knowing
    /// the namespaces' tokens.
    pub fn require_admin(
        &self,
        request: &Request,
        open_without_admin: bool,
    ) -> Result<(), ApiError> {
        self.auth
            .require_admin(request.headers(), open_without_admin, |hash| {
                self.engine
                    .with_control(|c| c.namespace_for_token(hash).is_some())
            })
    }

    /// Counts `events` against the caller's namespace (auth mode, limits enabled).
    fn admit(&self, caller: &Caller, events: usize) -> Result<(), ApiError> {
        let Some(namespace) = caller.namespace() else {
            return Ok(());
        };
        let config = self.engine.with_control(|c| c.config);
        if !config.rate_limit_enabled || events == 0 {
            return Ok(());
        }
        let peers = self
            .engine
            .peer_events(namespace, flux_engine::engine::now_ms());
        let admitted = self.rate_limiter.admit(
            namespace,
            events as u64,
            config.rate_limit_per_namespace_per_minute,
            &peers,
        );
        if admitted.is_err() {
            self.metrics.rate_limited_requests.inc();
        }
        admitted
    }

    fn body_limits(&self) -> (usize, usize) {
        let config = self.engine.with_control(|c| c.config);
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        (
            clamp(config.body_size_limit_single_bytes),
            clamp(config.body_size_limit_batch_bytes),
        )
    }

    /// `POST /api/events`
    pub async fn publish(&self, request: Request) -> Result<Response, ApiError> {
        let caller = self.writer(&request)?;
        let body = read_body(request, self.body_limits().0, self.request_timeout).await?;
        let event =
            event::validate(body_str(&body)?, new_event_id).map_err(ApiError::bad_request)?;
        caller.may_write(&event.entity_id, "payload.entity_id")?;
        self.admit(&caller, 1)?;
        let mut batch = RecordBatch::with_capacity(body.len() + GENERATED_ID_BYTES, 1);
        event.push_to(&mut batch, self.engine.shard_of(&event.entity_id));
        self.engine.append(batch).await?;
        self.metrics.events_accepted.inc();
        let mut out = Vec::with_capacity(96);
        write_ack(&mut out, &event);
        Ok(json_response(StatusCode::OK, out))
    }

    /// `POST /api/events/batch`
    pub async fn publish_batch(&self, request: Request) -> Result<Response, ApiError> {
        let caller = self.writer(&request)?;
        let body = read_body(request, self.body_limits().1, self.request_timeout).await?;
        let items = event::parse_batch(body_str(&body)?).map_err(ApiError::bad_request)?;
        // Encoded records take fewer bytes than their JSON, plus the ids Flux generates: one
        // allocation, no regrowth.
        let mut batch =
            RecordBatch::with_capacity(body.len() + items.len() * GENERATED_ID_BYTES, items.len());
        let mut results: Vec<Result<ValidEvent<'_>, String>> = Vec::with_capacity(items.len());
        let mut ids = EventIds::default();
        for item in items {
            let result = event::finish(item, || ids.next_id()).and_then(|event| {
                caller
                    .may_write(&event.entity_id, "payload.entity_id")
                    .map_err(|e| e.message)?;
                Ok(event)
            });
            if let Ok(event) = &result {
                event.push_to(&mut batch, self.engine.shard_of(&event.entity_id));
            }
            results.push(result);
        }
        let successful = batch.len();
        self.admit(&caller, successful)?;
        self.engine.append(batch).await?;
        self.metrics.events_accepted.inc_by(successful as u64);
        self.metrics
            .count_rejected((results.len() - successful) as u64);
        let mut out = Vec::with_capacity(64 + 80 * results.len());
        out.extend_from_slice(b"{\"successful\":");
        json::write_u64(&mut out, successful as u64);
        out.extend_from_slice(b",\"failed\":");
        json::write_u64(&mut out, (results.len() - successful) as u64);
        out.extend_from_slice(b",\"results\":[");
        for (i, result) in results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match result {
                Ok(event) => write_ack(&mut out, event),
                Err(message) => out.extend_from_slice(&crate::error::error_body(message)),
            }
        }
        out.extend_from_slice(b"]}");
        Ok(json_response(StatusCode::OK, out))
    }

    /// `GET /api/events?entity=&since=&limit=`
    pub async fn history(&self, request: Request) -> Result<Response, ApiError> {
        let params = query_params(&request)?;
        let entity = param(&params, "entity")
            .filter(|e| !e.is_empty())
            .ok_or_else(|| ApiError::bad_request("entity query parameter is required"))?;
        let limit = match param(&params, "limit") {
            None => HISTORY_DEFAULT_LIMIT,
            Some(raw) => match raw.parse::<usize>() {
                Ok(n) if n > 0 => n.min(HISTORY_MAX_LIMIT),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "limit must be a positive integer (at most {HISTORY_MAX_LIMIT} events \
                         are returned)"
                    )));
                }
            },
        };
        let since_ms = match param(&params, "since") {
            None => now_ms().saturating_sub(HISTORY_DEFAULT_WINDOW_MS),
            Some(raw) => parse_time_ms(raw).ok_or_else(|| {
                ApiError::bad_request(
                    "since must be an ISO-8601 time like 2026-02-23T10:30:45.123Z or 2026-02-23 (or epoch ms)",
                )
            })?,
        };
        let body = self.engine.history(entity, since_ms, limit).await?;
        Ok(json_response(StatusCode::OK, body))
    }

    /// `GET /api/state/entities[?prefix=|namespace=][&limit=&after=]`, streamed.
    pub fn list(&self, request: &Request) -> Result<Response, ApiError> {
        let params = query_params(request)?;
        let namespace = match param(&params, "namespace") {
            Some(namespace) if namespace.is_empty() || namespace.contains('/') => {
                return Err(ApiError::bad_request(
                    "namespace must be non-empty and contain no '/'",
                ));
            }
            Some(namespace) => Some(format!("{namespace}/")),
            None => None,
        };
        // Both filters: the ids that match both, which is the longer prefix when one extends
        // the other, and none otherwise.
        let prefix = match (param(&params, "prefix"), namespace) {
            (Some(prefix), Some(namespace)) if prefix.starts_with(&namespace) => prefix.to_string(),
            (Some(prefix), Some(namespace)) if namespace.starts_with(prefix) => namespace,
            (Some(_), Some(_)) => {
                return Ok(json_response(StatusCode::OK, Bytes::from_static(b"[]")));
            }
            (Some(prefix), None) => prefix.to_string(),
            (None, Some(namespace)) => namespace,
            (None, None) => String::new(),
        };
        let limit = match param(&params, "limit") {
            None => usize::MAX,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| ApiError::bad_request("limit must be a positive integer"))?,
        };
        let lister = self.engine.list(&prefix, param(&params, "after"), limit);
        // Chunks of about LIST_CHUNK_BYTES; memory stays at one page per shard plus one chunk.
        let chunks = stream::unfold(Some((lister, true)), |state| async move {
            let (mut lister, first) = state?;
            let mut out = Vec::with_capacity(LIST_CHUNK_BYTES + 4096);
            if first {
                out.push(b'[');
            }
            let more = lister.next_chunk(&mut out, LIST_CHUNK_BYTES).await;
            if !more {
                out.push(b']');
            }
            let frame = Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(out)));
            Some((frame, more.then_some((lister, false))))
        });
        let mut response = hyper::Response::new(StreamBody::new(chunks).boxed_unsync());
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }

    /// `GET /api/state/entities/<id>`
    pub async fn get(&self, id: &str) -> Result<Response, ApiError> {
        match self.engine.get(id).await {
            Some(json) => Ok(json_response(StatusCode::OK, json)),
            None => Err(ApiError::not_found("Entity not found")),
        }
    }

    /// Appends one tombstone per id (all existing) as one durable batch; returns the event ids.
    async fn delete_entities(&self, ids: &[&str]) -> Result<Vec<String>, ApiError> {
        let mut batch = RecordBatch::default();
        let mut event_ids = Vec::with_capacity(ids.len());
        let timestamp = now_ms() as i64;
        let mut generated = EventIds::default();
        for id in ids {
            let event_id = EventId::Uuid(generated.next_id());
            let fields = flux_engine::EventFields {
                event_id,
                stream: DELETE_STREAM,
                source: DELETE_SOURCE,
                timestamp,
                entity_id: id,
                key: None,
                schema: None,
            };
            let tombstone = [(flux_engine::record::TOMBSTONE_KEY, "true")];
            batch.push_event(self.engine.shard_of(id), &fields, tombstone.into_iter());
            event_ids.push(event_id.to_string());
        }
        self.engine.append(batch).await?;
        Ok(event_ids)
    }

    /// `DELETE /api/state/entities/<id>`
    pub async fn delete(&self, request: &Request, id: &str) -> Result<Response, ApiError> {
        let caller = self.writer(request)?;
        caller.may_write(id, "entity id")?;
        self.admit(&caller, 1)?;
        if !self.engine.contains(&[id]).await[0] {
            return Err(ApiError::not_found("Entity not found"));
        }
        let event_ids = self.delete_entities(&[id]).await?;
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"{\"entity_id\":");
        json::write_str(&mut out, id);
        out.extend_from_slice(b",\"eventId\":");
        json::write_str(&mut out, &event_ids[0]);
        out.push(b'}');
        Ok(json_response(StatusCode::OK, out))
    }

    /// `POST /api/state/entities/delete` with exactly one of namespace, prefix, entity_ids.
    /// Deletes at most [`MAX_BATCH_DELETE`] entities a call; when a namespace or prefix matched
    /// more, `remaining` in the reply counts what it still matches (absent otherwise).
    /// Built-in entities are never deleted.
    pub async fn batch_delete(&self, request: Request) -> Result<Response, ApiError> {
        #[derive(serde::Deserialize)]
        struct Filter<'a> {
            #[serde(borrow)]
            namespace: Option<&'a RawValue>,
            #[serde(borrow)]
            prefix: Option<&'a RawValue>,
            #[serde(borrow)]
            entity_ids: Option<&'a RawValue>,
        }
        const ONE_FILTER: &str = "give exactly one of namespace, prefix, entity_ids";
        let caller = self.writer(&request)?;
        let body = read_body(request, self.body_limits().0, self.request_timeout).await?;
        let filter: Filter<'_> = serde_json::from_str(object_body(&body)?).map_err(|e| {
            if e.is_data() {
                ApiError::bad_request(format!("body must be a JSON object: {ONE_FILTER}"))
            } else {
                ApiError::bad_request(format!("invalid JSON: {e}"))
            }
        })?;
        let given = [
            filter.namespace.is_some(),
            filter.prefix.is_some(),
            filter.entity_ids.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(ApiError::bad_request(ONE_FILTER));
        }
        let text = |raw: &RawValue, field: &str| -> Result<String, ApiError> {
            serde_json::from_str::<String>(raw.get())
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::bad_request(format!("{field} must be a non-empty string")))
        };
        let mut errors: Vec<(String, String)> = Vec::new();
        // A namespace or prefix matching more than one call may delete: the rest is counted
        // in the reply (`remaining`), so a client knows to call again.
        let mut more_under: Option<String> = None;
        let targets: Vec<String> = if let Some(raw) = filter.entity_ids {
            let ids: Vec<String> = serde_json::from_str(raw.get())
                .map_err(|_| ApiError::bad_request("entity_ids must be an array of strings"))?;
            if ids.len() > MAX_BATCH_DELETE {
                return Err(ApiError::bad_request(format!(
                    "entity_ids has {} ids; max_batch_delete is {MAX_BATCH_DELETE}",
                    ids.len()
                )));
            }
            let mut seen = std::collections::HashSet::with_capacity(ids.len());
            let ids = ids.into_iter().filter(|id| seen.insert(id.clone()));
            // Each refusal keeps its id's place in the request, to be listed in that order.
            let mut refused: Vec<(usize, String, String)> = Vec::new();
            let mut allowed: Vec<(usize, String)> = Vec::new();
            for (place, id) in ids.enumerate() {
                match caller.may_write(&id, "entity id") {
                    Ok(()) => allowed.push((place, id)),
                    Err(error) => refused.push((place, id, error.message)),
                }
            }
            let refs: Vec<&str> = allowed.iter().map(|(_, id)| id.as_str()).collect();
            let exists = self.engine.contains(&refs).await;
            let mut targets = Vec::with_capacity(allowed.len());
            for ((place, id), exists) in allowed.into_iter().zip(exists) {
                if exists {
                    targets.push(id);
                } else {
                    refused.push((place, id, "Entity not found".to_string()));
                }
            }
            refused.sort_unstable_by_key(|(place, ..)| *place);
            errors.extend(refused.into_iter().map(|(_, id, message)| (id, message)));
            targets
        } else {
            let (prefix, field, value) = match (filter.namespace, filter.prefix) {
                (Some(ns), _) => {
                    let ns = text(ns, "namespace")?;
                    if ns.contains('/') {
                        return Err(ApiError::bad_request("namespace must not contain '/'"));
                    }
                    (format!("{ns}/"), "namespace", ns)
                }
                (_, Some(prefix)) => {
                    let prefix = text(prefix, "prefix")?;
                    (prefix.clone(), "prefix", prefix)
                }
                _ => return Err(ApiError::bad_request(ONE_FILTER)),
            };
            caller.may_write_prefix(&prefix, field, &value)?;
            let ids = self
                .engine
                .ids_with_prefix(&prefix, MAX_BATCH_DELETE + 1)
                .await;
            // Decided before the built-ins are skipped: they may sit among the first ids with
            // more after them.
            if ids.len() > MAX_BATCH_DELETE {
                more_under = Some(prefix);
            }
            ids.iter()
                .filter(|id| !entity_is_builtin(id))
                .take(MAX_BATCH_DELETE)
                .map(|id| id.to_string())
                .collect()
        };
        self.admit(&caller, targets.len())?;
        let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
        self.delete_entities(&refs).await?;
        let remaining = match &more_under {
            Some(prefix) => {
                let builtin = if BUILTIN_ID_PREFIX.starts_with(prefix.as_str()) {
                    self.engine.count_with_prefix(BUILTIN_ID_PREFIX).await
                } else {
                    0
                };
                self.engine
                    .count_with_prefix(prefix)
                    .await
                    .saturating_sub(builtin)
            }
            None => 0,
        };
        let mut out = Vec::with_capacity(64 + 64 * errors.len());
        out.extend_from_slice(b"{\"deleted\":");
        json::write_u64(&mut out, targets.len() as u64);
        // SPEC's reply has exactly deleted, failed and errors; `remaining` is added only when
        // the call stopped at the limit, so every other reply matches it key for key.
        if remaining > 0 {
            out.extend_from_slice(b",\"remaining\":");
            json::write_u64(&mut out, remaining as u64);
        }
        out.extend_from_slice(b",\"failed\":");
        json::write_u64(&mut out, errors.len() as u64);
        out.extend_from_slice(b",\"errors\":[");
        for (i, (id, message)) in errors.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"entity_id\":");
            json::write_str(&mut out, id);
            out.extend_from_slice(b",\"error\":");
            json::write_str(&mut out, message);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Ok(json_response(StatusCode::OK, out))
    }

    /// `GET /api/health`
    pub async fn health(&self) -> Response {
        let stats = self.engine.stats().await;
        let mut out = Vec::with_capacity(128);
        let status = match self.engine.health_reason() {
            None => {
                out.extend_from_slice(b"{\"status\":\"ok\"");
                StatusCode::OK
            }
            Some(reason) => {
                out.extend_from_slice(b"{\"status\":\"unavailable\",\"error\":");
                json::write_str(&mut out, &reason);
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        out.extend_from_slice(b",\"log\":");
        json::write_str(&mut out, self.engine.log_kind());
        out.extend_from_slice(b",\"entities\":");
        json::write_u64(&mut out, stats.entities as u64);
        out.extend_from_slice(b",\"logPosition\":");
        json::write_u64(&mut out, stats.next_position.saturating_sub(1));
        out.extend_from_slice(b",\"events\":");
        json::write_u64(&mut out, stats.events_total);
        out.push(b'}');
        json_response(status, out)
    }
}

/// Parses an ISO-8601 time to epoch milliseconds: extended or basic format
/// (`2026-02-23T10:30:45.123Z`, `20260223T103045Z`), seconds and fraction optional, a zone of
/// `Z`, `±hh:mm`, `±hhmm` or `±hh` (none: UTC), `T` or a space between date and time; a date
/// alone (its midnight, UTC); or integer epoch milliseconds. A `+` of an offset that arrived
/// unencoded in a query string (and so decoded to a space) is read as `+`.
fn parse_time_ms(raw: &str) -> Option<u64> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    if let Ok(ms) = raw.parse::<u64>() {
        return Some(ms);
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(raw) {
        return u64::try_from(time.timestamp_millis()).ok();
    }
    // The time part starts at the `T` (or the first space, between date and time).
    let Some(split) = raw.find(['T', 't', ' ']) else {
        let date = NaiveDate::parse_from_str(raw, "%Y-%m-%d").ok()?;
        return u64::try_from(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis()).ok();
    };
    let (date, time) = raw.split_at(split);
    let mut time = time[1..].to_string();
    // A zone: `Z`, or a sign after the clock (a space there was a decoded `+`).
    let zone = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        time = clock.to_string();
        Some("+00:00".to_string())
    } else if let Some(at) = time.rfind(['+', '-', ' ']) {
        let zone = time.split_off(at).replacen(' ', "+", 1);
        Some(zone)
    } else {
        None
    };
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(date, "%Y%m%d"))
        .ok()?;
    let clock = ["%H:%M:%S%.f", "%H:%M", "%H%M%S%.f", "%H%M"]
        .iter()
        .find_map(|format| chrono::NaiveTime::parse_from_str(&time, format).ok())?;
    let local = NaiveDateTime::new(date, clock).and_utc().timestamp_millis();
    let offset_s = match zone {
        None => 0,
        Some(zone) => {
            let (sign, digits) = zone.split_at(1);
            let digits = digits.replace(':', "");
            // Digits only (checked before slicing: other characters may be several bytes).
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let (h, m) = match digits.len() {
                2 => (digits.parse::<i64>().ok()?, 0),
                4 => (
                    digits[..2].parse::<i64>().ok()?,
                    digits[2..].parse::<i64>().ok()?,
                ),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let seconds = h * 3600 + m * 60;
            if sign == "-" { -seconds } else { seconds }
        }
    };
    u64::try_from(local - offset_s * 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::{EventIds, parse_time_ms};
    use flux_engine::record::EventId;

    #[test]
    fn generated_ids_are_unique_ascending_uuid_v7() {
        let mut first = EventIds::default();
        let mut second = EventIds::default();
        // The text a reply and the history show.
        let text = |bytes| EventId::Uuid(bytes).to_string();
        let ids: Vec<String> = (0..1000).map(|_| text(first.next_id())).collect();
        let others: Vec<String> = (0..1000).map(|_| text(second.next_id())).collect();
        let mut all: Vec<&String> = ids.iter().chain(&others).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ascending");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 2000, "unique across requests");
        for id in ids.iter().chain(&others) {
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        // A count that would carry into the variant starts from a fresh id instead.
        let mut full = EventIds {
            next: Some(uuid::Uuid::now_v7().as_u128() | EventIds::RAND_B),
        };
        let last = text(full.next_id());
        let fresh = uuid::Uuid::parse_str(&text(full.next_id())).expect("a UUID");
        assert_eq!(fresh.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(fresh.get_version_num(), 7);
        assert_ne!(fresh.to_string(), last);
    }

    /// Every string of up to three characters of an alphabet that reaches each branch, after
    /// prefixes that reach the zone, the clock and the date: parsing answers, never panics.
    #[test]
    fn time_parsing_never_panics() {
        let alphabet = ['+', '-', ':', ' ', 'Z', 'T', '.', '0', '1', '9', 'a', 'é'];
        let mut tails = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> = tails
                .iter()
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            tails.extend(longer);
        }
        tails.sort();
        tails.dedup();
        for prefix in [
            "",
            "2026-02-23",
            "2026-02-23T",
            "2026-02-23T10:30",
            "20260223T1030+",
        ] {
            for tail in &tails {
                let _ = parse_time_ms(&format!("{prefix}{tail}"));
            }
        }
    }

    #[test]
    fn parses_iso_times() {
        assert_eq!(
            parse_time_ms("2026-02-23T10:30:45.123Z"),
            Some(1_771_842_645_123)
        );
        assert_eq!(
            parse_time_ms("2026-02-23T11:30:45.123+01:00"),
            Some(1_771_842_645_123)
        );
        assert_eq!(parse_time_ms("1771842645123"), Some(1_771_842_645_123));
        // The offset's `+` decoded to a space by a query string.
        assert_eq!(
            parse_time_ms("2026-02-23T11:30:45.123 01:00"),
            Some(1_771_842_645_123)
        );
        // No zone: UTC.
        assert_eq!(
            parse_time_ms("2026-02-23T10:30:45.123"),
            Some(1_771_842_645_123)
        );
        assert_eq!(
            parse_time_ms("2026-02-23T10:30:45"),
            Some(1_771_842_645_000)
        );
        // A date alone: its midnight, UTC.
        assert_eq!(parse_time_ms("2026-02-23"), Some(1_771_804_800_000));
        // Without seconds, basic format, offsets without a colon or minutes, a space for `T`.
        let minute = Some(1_771_842_600_000);
        for text in [
            "2026-02-23T10:30Z",
            "2026-02-23T10:30",
            "2026-02-23 10:30",
            "20260223T1030Z",
            "20260223T103000Z",
            "2026-02-23T11:30+0100",
            "2026-02-23T11:30:00+01",
            "2026-02-23T11:30 01",
            "2026-02-23T09:00:00.000-01:30",
            "2026-02-23t10:30:00z",
        ] {
            assert_eq!(parse_time_ms(text), minute, "{text}");
        }
        for text in [
            "yesterday",
            "2026-02-30",
            "1969-12-31",
            "2026-02-23T",
            "2026-02-23T25:00Z",
            "2026-02-23T10:30+1",
            "2026-02-23T10:30+24:00",
            "2026-02-23T10:30+01:60",
            "2026-02-23T10:30+ab",
            "2026-02-23T10:30+aé1",
            "2026-02-23T10:30-é",
            "2026-02-23Té",
            "2026-02-23T10:30:00Zjunk",
            "T10:30Z",
        ] {
            assert_eq!(parse_time_ms(text), None, "{text}");
        }
    }
}
