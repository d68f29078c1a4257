//! Measures what auth and rate limiting add to a write: identifying the caller from its bearer
//! token (SHA-256 of the token, then a lookup in the control state), checking the namespace of
//! each event's entity id, and counting the events against the namespace's rate limit. Run for
//! one single-event request and for a 1,000-event batch (reported per event). Goal: < 1 µs of
//! server CPU per event (issue 4).

use std::hint::black_box;
use std::sync::RwLock;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flux_engine::control::{ControlChange, ControlState, Namespace};
use flux_ingress::tenancy::{AuthConfig, RateLimiter, token_hash};
use hyper::header::{AUTHORIZATION, HeaderMap, HeaderValue};

#[global_allocator]
static GLOBAL: flux_engine::alloc::Allocator = flux_engine::alloc::Allocator;

const TOKEN: &str = "flux_4f1c2a9be0d84d7c9d2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8";

fn control_with_namespaces(n: usize) -> RwLock<ControlState> {
    let mut state = ControlState::default();
    for i in 0..n {
        let (name, token) = if i == 0 {
            ("acme".to_string(), TOKEN.to_string())
        } else {
            (format!("tenant-{i}"), format!("flux_other_{i}"))
        };
        let namespace = Namespace {
            name,
            id: format!("ns_{i:08}"),
            token_sha256: token_hash(&token),
            created_ms: 1,
        };
        state.apply(
            i as u64 + 1,
            ControlChange::NamespaceRegistered { namespace },
        );
    }
    RwLock::new(state)
}

/// One write request's tenancy work for `events` events, as `ingress::api` does it.
fn check_request(
    auth: &AuthConfig,
    control: &RwLock<ControlState>,
    limiter: &RateLimiter,
    headers: &HeaderMap,
    ids: &[String],
) -> bool {
    let lookup = |hash: &str| {
        let state = control.read().unwrap_or_else(|e| e.into_inner());
        state.namespace_for_token(hash).map(|ns| ns.name.clone())
    };
    let Ok(caller) = auth.writer(headers, lookup) else {
        return false;
    };
    let allowed = ids
        .iter()
        .filter(|id| caller.may_write(id, "payload.entity_id").is_ok())
        .count();
    let config = control.read().unwrap_or_else(|e| e.into_inner()).config;
    let namespace = caller.namespace().unwrap_or_default();
    // A limit no run reaches, so every iteration does the full counting work.
    limiter
        .admit(namespace, allowed as u64, u64::MAX / 2, &[])
        .is_ok()
        && config.rate_limit_enabled
}

fn tenancy(c: &mut Criterion) {
    let auth = AuthConfig {
        enabled: true,
        admin_token: Some("admin-secret".into()),
    };
    let control = control_with_namespaces(1_000);
    let limiter = RateLimiter::default();
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    let mut group = c.benchmark_group("tenancy");
    for events in [1usize, 1_000] {
        let ids: Vec<String> = (0..events)
            .map(|i| format!("acme/site-3/pump-{i:05}"))
            .collect();
        group.throughput(Throughput::Elements(events as u64));
        group.bench_function(format!("auth_and_rate_limit/{events}_event_request"), |b| {
            b.iter(|| {
                check_request(
                    &auth,
                    &control,
                    &limiter,
                    black_box(&headers),
                    black_box(&ids),
                )
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = tenancy
}
criterion_main!(benches);
