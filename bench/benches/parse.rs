//! Measures the ingress parse stage: validating one event, and turning a 1,000-event batch body
//! into a `RecordBatch` (`parse_batch`, `finish` each, `shard_of`, `push_to`).
//!
//! For the JSON parser decision record (`docs/decisions/0001-json-parser.md`) the same inputs
//! are also parsed by `simd_json::to_borrowed_value` (on a copy of the body, copy timed, since
//! simd-json parses in place) and by `serde_json::from_slice::<serde_json::Value>`. Those two
//! only build a document tree; they do no validation and no record encoding.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flux_bench::{BATCH_EVENTS, EventGenerator, SEED, new_event_id, parse_batch};
use flux_ingress::event::{self, finish, validate};

#[global_allocator]
static GLOBAL: flux_engine::alloc::Allocator = flux_engine::alloc::Allocator;

/// Shards the server runs on this 2-core machine.
const SHARDS: usize = 2;

fn single_event(c: &mut Criterion) {
    let event = EventGenerator::new(SEED).event();
    let mut group = c.benchmark_group("parse/event");
    group.throughput(Throughput::Elements(1));
    group.bench_function("validate", |b| {
        b.iter(|| {
            let valid = validate(black_box(&event), new_event_id).expect("valid event");
            black_box(valid.properties.0.len())
        })
    });
    group.bench_function("simd_json_borrowed_value", |b| {
        b.iter(|| {
            let mut copy = black_box(event.as_bytes()).to_vec();
            let value = simd_json::to_borrowed_value(&mut copy).expect("valid JSON");
            black_box(&value);
        })
    });
    group.bench_function("serde_json_value", |b| {
        b.iter(|| {
            let value: serde_json::Value =
                serde_json::from_slice(black_box(event.as_bytes())).expect("valid JSON");
            black_box(value)
        })
    });
    group.finish();
}

fn batch(c: &mut Criterion) {
    let body = EventGenerator::new(SEED).batch(BATCH_EVENTS);
    let mut group = c.benchmark_group("parse/batch_1000");
    group.throughput(Throughput::Elements(BATCH_EVENTS as u64));
    group.sample_size(40);
    group.bench_function("validate_and_encode", |b| {
        b.iter(|| {
            let batch = parse_batch(black_box(&body), SHARDS).expect("valid batch");
            black_box(batch.encoded_bytes())
        })
    });
    group.bench_function("validate_only", |b| {
        b.iter(|| {
            let events = event::parse_batch(black_box(&body)).expect("valid batch");
            for loose in events {
                let valid = finish(loose, new_event_id).expect("valid event");
                black_box(valid.properties.0.len());
            }
        })
    });
    group.bench_function("simd_json_borrowed_value", |b| {
        b.iter(|| {
            let mut copy = black_box(body.as_bytes()).to_vec();
            let value = simd_json::to_borrowed_value(&mut copy).expect("valid JSON");
            black_box(&value);
        })
    });
    group.bench_function("serde_json_value", |b| {
        b.iter(|| {
            let value: serde_json::Value =
                serde_json::from_slice(black_box(body.as_bytes())).expect("valid JSON");
            black_box(value)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = single_event, batch
}
criterion_main!(benches);
