//! Measures the shard's apply step on entity state: `Entity::merge_properties` of a five-key
//! update into a five-key entity (same keys: the steady state of an IoT fleet), of an update
//! adding two new keys, and `Entity::write_json` rendering an entity for a read.
//!
//! Each merge starts from a fresh clone of the entity (not timed), so every iteration does the
//! same work; the clone's drop and the replaced property block's drop are timed.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use flux_bench::{SAME_KEYS_UPDATE, SAMPLE_PROPERTIES, TWO_NEW_KEYS_UPDATE};
use flux_engine::entity::Entity;

#[global_allocator]
static GLOBAL: flux_engine::alloc::Allocator = flux_engine::alloc::Allocator;

fn five_key_entity() -> Entity {
    let mut entity = Entity::new("acme/site-3/pump-01234", 1_795_392_000_000, 41);
    entity.merge_properties(SAMPLE_PROPERTIES.iter().copied());
    entity
}

fn merge(c: &mut Criterion) {
    let entity = five_key_entity();
    let mut group = c.benchmark_group("merge");
    group.throughput(Throughput::Elements(1));
    group.bench_function("5_same_keys_into_5", |b| {
        b.iter_batched(
            || entity.clone(),
            |mut entity| {
                entity.merge_properties(black_box(SAME_KEYS_UPDATE).iter().copied());
                entity
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("2_new_keys_into_5", |b| {
        b.iter_batched(
            || entity.clone(),
            |mut entity| {
                entity.merge_properties(black_box(TWO_NEW_KEYS_UPDATE).iter().copied());
                entity
            },
            BatchSize::SmallInput,
        )
    });
    let mut out = Vec::with_capacity(256);
    group.bench_function("write_json_5_keys", |b| {
        b.iter(|| {
            out.clear();
            black_box(&entity).write_json(&mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = merge
}
criterion_main!(benches);
