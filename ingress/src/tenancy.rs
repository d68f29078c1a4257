//! Tenancy on the request path: who is calling (bearer tokens), what they may write
//! (namespaces), and how fast (per-namespace rate limits).
//!
//! Invariants: tokens are never stored or logged, only their SHA-256; the admin token is
//! compared in constant time; with auth off every write is allowed and nothing is rate limited.
//! A rate-limit window is fixed per namespace: `limit` events per 60 s, each event of a batch
//! counting once; over the limit the whole request is refused with `Retry-After`. No caller,
//! admin or open, ever writes Flux's built-in entities (namespace `flux-core`).

use std::time::{Duration, Instant};

use flux_engine::log::peers::Expiring;
use flux_engine::shard::{BUILTIN_ID_PREFIX, BUILTIN_NAMESPACE, entity_is_builtin};
use hashbrown::HashMap;
use hyper::header::{AUTHORIZATION, HeaderMap};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The length of a rate-limit window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How the server authenticates (from flags, not from the log).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// `--auth`: writes need a namespace (or the admin) token.
    pub enabled: bool,
    /// `--admin-token`: may do anything; gates registration and admin config when set.
    pub admin_token: Option<String>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Auth is off: anyone may write anywhere (but the built-in namespace).
    Open,
    Admin,
    /// A namespace's token.
    Namespace(String),
}

/// Hex SHA-256 of a token, the only form in which tokens are kept.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The bearer token of the request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time equality, so the admin token cannot be guessed byte by byte from timings.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl AuthConfig {
    /// Whether `headers` carry the admin token.
    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        match (&self.admin_token, bearer(headers)) {
            (Some(admin), Some(token)) => same_secret(admin, token),
            _ => false,
        }
    }

    /// Identifies the writer of a request; `lookup` maps a token hash to its namespace.
    pub fn writer(
        &self,
        headers: &HeaderMap,
        lookup: impl FnOnce(&str) -> Option<String>,
    ) -> Result<Caller, ApiError> {
        if !self.enabled {
            return Ok(Caller::Open);
        }
        let Some(token) = bearer(headers) else {
            return Err(ApiError::unauthorized(
                "missing bearer token: send Authorization: Bearer <namespace token>",
            ));
        };
        if self
            .admin_token
            .as_deref()
            .is_some_and(|admin| same_secret(admin, token))
        {
            return Ok(Caller::Admin);
        }
        lookup(&token_hash(token))
            .map(Caller::Namespace)
            .ok_or_else(|| ApiError::unauthorized("unknown token"))
    }

    /// Gate of admin-only operations: the admin token when one is configured; with none
    /// configured, open only when `open_without_admin` (auth off). A missing or unknown token
    /// is refused with 401; a token `known` (by its hash) as a namespace's with 403.
    pub fn require_admin(
        &self,
        headers: &HeaderMap,
        open_without_admin: bool,
        known: impl FnOnce(&str) -> bool,
    ) -> Result<(), ApiError> {
        let none_configured = if self.admin_token.is_none() {
            if open_without_admin {
                return Ok(());
            }
            ", and none is configured (--admin-token)"
        } else {
            ""
        };
        match (&self.admin_token, bearer(headers)) {
            (Some(admin), Some(token)) if same_secret(admin, token) => Ok(()),
            (_, None) => Err(ApiError::unauthorized(format!(
                "missing admin token: this operation needs Authorization: Bearer <admin token>{none_configured}"
            ))),
            (_, Some(token)) if known(&token_hash(token)) => Err(ApiError::forbidden(format!(
                "this operation needs the admin token; a namespace token cannot do it{none_configured}"
            ))),
            (_, Some(_)) => Err(ApiError::unauthorized(format!(
                "unknown token: this operation needs the admin token{none_configured}"
            ))),
        }
    }
}

impl Caller {
    /// The namespace rate limits are counted against, if any.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Caller::Namespace(ns) => Some(ns),
            _ => None,
        }
    }

    /// Whether this caller may write `entity_id`: its namespace must be the token's, and no
    /// caller writes Flux's built-in entities (`flux-core/...`).
    pub fn may_write(&self, entity_id: &str, field: &str) -> Result<(), ApiError> {
        if entity_is_builtin(entity_id) {
            return Err(builtin_forbidden(field, entity_id));
        }
        let Caller::Namespace(ns) = self else {
            return Ok(());
        };
        match entity_id.split_once('/') {
            Some((prefix, _)) if prefix == ns => Ok(()),
            Some((prefix, _)) => Err(ApiError::forbidden(format!(
                "{field} {entity_id:?} is in namespace {prefix:?}; this token writes only namespace {ns:?}"
            ))),
            None => Err(ApiError::bad_request(format!(
                "{field} {entity_id:?} has no namespace: it must start with \"{ns}/\""
            ))),
        }
    }

    /// Whether this caller may act on every id starting with `prefix` (the built-in ids a
    /// shorter prefix such as `f` takes in are left to the caller to skip). Errors name the
    /// request's `field` and the `value` it gave (`namespace "acme"` or `prefix "acme/tmp-"`).
    pub fn may_write_prefix(&self, prefix: &str, field: &str, value: &str) -> Result<(), ApiError> {
        if prefix.starts_with(BUILTIN_ID_PREFIX) {
            return Err(builtin_forbidden(field, value));
        }
        let Caller::Namespace(ns) = self else {
            return Ok(());
        };
        let own = format!("{ns}/");
        if prefix.starts_with(&own) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{field} {value:?} is outside namespace {ns:?}; this token writes only \"{own}...\""
            )))
        }
    }
}

fn builtin_forbidden(field: &str, value: &str) -> ApiError {
    ApiError::forbidden(format!(
        "{field} {value:?} is in namespace {BUILTIN_NAMESPACE:?}, reserved for Flux's built-in entities"
    ))
}

struct Window {
    started: Instant,
    events: u64,
}

/// Fixed-window event counters per namespace, of the events this node admits. A namespace's
/// counter is dropped once its window has passed (at most one sweep per window), so deleted or
/// quiet namespaces leave nothing behind.
#[derive(Default)]
pub struct RateLimiter {
    windows: std::sync::Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    by_namespace: HashMap<String, Window>,
    /// When the counters of passed windows were last dropped.
    swept: Option<Instant>,
}

impl RateLimiter {
    /// Counts `events` against `namespace`; over `limit` per window, with the events other
    /// nodes of a shared log took for it in the last minute (`peers`) added to this node's own,
    /// → 429 with the seconds until enough of them stop counting, and nothing is counted.
    pub fn admit(
        &self,
        namespace: &str,
        events: u64,
        limit: u64,
        peers: &[Expiring],
    ) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows
            .swept
            .is_none_or(|at| now.duration_since(at) >= RATE_WINDOW)
        {
            windows.swept = Some(now);
            let windows = &mut windows.by_namespace;
            windows.retain(|_, w| now.duration_since(w.started) < RATE_WINDOW);
            if windows.len() < windows.capacity() / 4 {
                windows.shrink_to(0);
            }
        }
        let window = windows.by_namespace.entry_ref(namespace).or_insert(Window {
            started: now,
            events: 0,
        });
        if now.duration_since(window.started) >= RATE_WINDOW {
            *window = Window {
                started: now,
                events: 0,
            };
        }
        let peer_events: u64 = peers.iter().map(|e| e.events).sum();
        if window.events + peer_events + events > limit {
            let own_reset = RATE_WINDOW.saturating_sub(now.duration_since(window.started));
            let wait = time_to_room(
                window.events + peer_events + events - limit,
                (own_reset.as_millis() as u64, window.events),
                peers,
            );
            let retry_after = wait.div_ceil(1000);
            let through_peers = if peer_events > 0 {
                format!(" ({peer_events} written through other nodes in the last minute)")
            } else {
                String::new()
            };
            return Err(ApiError::rate_limited(
                format!(
                    "rate limit exceeded: namespace {namespace:?} may write {limit} events per \
                     minute{through_peers}"
                ),
                retry_after.max(1),
            ));
        }
        window.events += events;
        Ok(())
    }
}

/// Milliseconds until `excess` events stop counting: this node's own (`own`: when its window
/// resets, and how many) and other nodes' (`peers`), whichever go first; the longest of them
/// when even all together do not make room (a request larger than the limit).
fn time_to_room(excess: u64, own: (u64, u64), peers: &[Expiring]) -> u64 {
    let mut leaving: Vec<(u64, u64)> = peers.iter().map(|e| (e.in_ms, e.events)).collect();
    leaving.push(own);
    leaving.sort_unstable();
    let mut freed = 0;
    for &(at, events) in &leaving {
        freed += events;
        if freed >= excess {
            return at;
        }
    }
    leaving.last().map_or(0, |&(at, _)| at)
}

/// A random id of `len` characters from `a-z0-9`.
pub fn random_id(len: usize) -> Result<String, ApiError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::unavailable(format!("no randomness: {e}")))?;
    // 252 = 7 × 36: rejecting bytes above it keeps every character equally likely.
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in bytes.iter().copied().filter(|&b| b < 252) {
            if out.len() < len {
                out.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
        getrandom::fill(&mut bytes)
            .map_err(|e| ApiError::unavailable(format!("no randomness: {e}")))?;
    }
    Ok(out)
}

/// A new bearer token: 32 random bytes, hex.
pub fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::unavailable(format!("no randomness: {e}")))?;
    Ok(format!("flux_{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use hyper::StatusCode;

    use super::*;

    #[test]
    fn namespaces_match_whole_segments() {
        let ab = Caller::Namespace("ab".into());
        assert!(ab.may_write("ab/x", "entity_id").is_ok());
        assert_eq!(
            ab.may_write("abc/x", "entity_id").unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ab.may_write("ab", "entity_id").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert!(ab.may_write_prefix("ab/tmp-", "prefix", "ab/tmp-").is_ok());
        assert!(ab.may_write_prefix("abc/", "namespace", "abc").is_err());
        assert!(Caller::Open.may_write("anything", "entity_id").is_ok());
        for caller in [
            Caller::Open,
            Caller::Admin,
            Caller::Namespace("flux-core".into()),
        ] {
            let refused = caller.may_write("flux-core/directory", "entity_id");
            assert_eq!(refused.unwrap_err().status, StatusCode::FORBIDDEN);
            assert!(
                caller
                    .may_write_prefix("flux-core/", "namespace", "flux-core")
                    .is_err()
            );
        }
        assert!(
            Caller::Open
                .may_write_prefix("flux", "prefix", "flux")
                .is_ok(),
            "the caller skips built-ins"
        );
        assert!(crate::directory::DIRECTORY_ID.starts_with(BUILTIN_ID_PREFIX));
    }

    /// Counters of passed windows are dropped: namespaces written once and never again (or
    /// deleted) leave nothing behind.
    #[test]
    fn passed_windows_are_dropped() {
        let limiter = RateLimiter::default();
        let long_ago = Instant::now()
            .checked_sub(RATE_WINDOW * 2)
            .expect("the clock started long enough ago");
        {
            let mut windows = limiter.windows.lock().expect("lock");
            for i in 0..1000 {
                let window = Window {
                    started: long_ago,
                    events: 1,
                };
                windows.by_namespace.insert(format!("gone-{i}"), window);
            }
            windows.swept = Some(long_ago);
        }
        limiter.admit("live", 1, 10, &[]).expect("admitted");
        let windows = limiter.windows.lock().expect("lock");
        assert_eq!(windows.by_namespace.len(), 1);
        assert!(windows.by_namespace.contains_key("live"));
    }

    #[test]
    fn rate_limit_counts_events_and_reports_retry_after() {
        let limiter = RateLimiter::default();
        assert!(limiter.admit("acme", 7, 10, &[]).is_ok());
        assert!(limiter.admit("acme", 3, 10, &[]).is_ok());
        let error = limiter.admit("acme", 1, 10, &[]).unwrap_err();
        assert_eq!(error.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(error.retry_after.is_some_and(|s| (59..=60).contains(&s)));
        assert!(limiter.admit("other", 10, 10, &[]).is_ok());
        // Events other nodes took for a namespace count against it too, and are named; the
        // wait is until enough of them stop counting.
        let peers = |list: &[(u64, u64)]| -> Vec<Expiring> {
            list.iter()
                .map(|&(in_ms, events)| Expiring { in_ms, events })
                .collect()
        };
        let four = peers(&[(9_500, 1), (20_000, 3)]);
        assert!(limiter.admit("beta", 6, 10, &four).is_ok());
        let error = limiter.admit("beta", 1, 10, &four).unwrap_err();
        assert!(error.message.contains("4 written through other nodes"));
        assert_eq!(error.retry_after, Some(10));
        let error = limiter.admit("beta", 3, 10, &four).unwrap_err();
        assert_eq!(error.retry_after, Some(20));
        assert!(limiter.admit("gamma", 10, 10, &peers(&[(1, 1)])).is_err());
        // More than the limit never fits: the longest wait.
        let error = limiter.admit("delta", 11, 10, &four).unwrap_err();
        assert!(error.retry_after.is_some_and(|s| s >= 59));
    }

    #[test]
    fn ids_and_tokens_look_right() {
        let id = random_id(8).expect("id");
        assert!(
            id.len() == 8
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        let token = new_token().expect("token");
        assert_eq!(token.len(), 5 + 64);
        assert_eq!(token_hash(&token).len(), 64);
    }
}
