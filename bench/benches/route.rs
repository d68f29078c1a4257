//! Measures routing: `shard_of` (CRC32C of the entity id, modulo the shard count) for a typical
//! id, `acme/site-3/pump-01234`, with 2 shards (this machine) and 8.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flux_engine::shard::shard_of;

#[global_allocator]
static GLOBAL: flux_engine::alloc::Allocator = flux_engine::alloc::Allocator;

fn route(c: &mut Criterion) {
    let id = "acme/site-3/pump-01234";
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    for shards in [2usize, 8] {
        group.bench_function(format!("shard_of/{shards}_shards"), |b| {
            b.iter(|| shard_of(black_box(id), black_box(shards)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = route
}
criterion_main!(benches);
