//! Measures the durable path below ingress: an append through a real `LocalLog` in a temp dir
//! (under `target/tmp`, so on the project's disk, not a tmpfs) until its `Completion` fires, i.e.
//! written, `fdatasync`ed, dispatched and applied by two shard threads (`start_shards(2)`):
//! (a) one 1-event append at a time, (b) one 1,000-event append at a time, (c) 32 concurrent
//! 1-event appenders sharing group commits. Also the pure CPU cost of `encode_frame` and
//! `decode_frame` for a 1,000-record frame (no I/O).
//!
//! The appends are bounded by the disk's fdatasync latency: compare with `fsync_probe`.
//! Measurement times are short on purpose; each iteration syncs the disk.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use flux_bench::{BATCH_EVENTS, EventGenerator, SEED, one_record_batch, parse_batch};
use flux_engine::log::Log;
use flux_engine::log::local::{LocalLog, LocalLogOptions};
use flux_engine::record::{FrameRead, decode_frame, encode_frame};
use flux_engine::shard::{Completion, start_shards};
use flux_engine::{LogPosition, RecordBatch};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

#[global_allocator]
static GLOBAL: flux_engine::alloc::Allocator = flux_engine::alloc::Allocator;

const SHARDS: usize = 2;
const CONCURRENT_APPENDERS: usize = 32;

/// A started log with its shards; closes the log and joins the shard threads on drop.
struct RunningLog {
    log: Arc<LocalLog>,
    shard_threads: Vec<JoinHandle<()>>,
    /// Kept for its drop: removes the segment files after the shards stopped.
    _dir: tempfile::TempDir,
}

impl RunningLog {
    fn start() -> Self {
        let dir = tempfile::tempdir_in(Path::new(env!("CARGO_TARGET_TMPDIR")))
            .expect("temp dir under target/tmp");
        let (log, _summary) = LocalLog::open(
            &dir.path().join("log"),
            LocalLogOptions::default(),
            &mut |_| {},
        )
        .expect("open a fresh log");
        let (dispatcher, shard_threads) = start_shards(SHARDS).expect("start shards");
        log.start(dispatcher).expect("start the log writer");
        RunningLog {
            log: Arc::new(log),
            shard_threads,
            _dir: dir,
        }
    }
}

impl Drop for RunningLog {
    fn drop(&mut self) {
        // The writer owns the dispatcher: once it exits, the shard inboxes close.
        self.log.close();
        for thread in self.shard_threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Appends `batch` and waits until it is durable and applied; returns its first position.
async fn append(log: &LocalLog, batch: RecordBatch) -> LogPosition {
    let (completion, done) = Completion::new();
    log.append(batch, completion).await.expect("append queued");
    done.await
        .expect("completion fires")
        .expect("append durable")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn durable_append(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("log_append");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    {
        let running = RunningLog::start();
        let mut n = 0u64;
        group.throughput(Throughput::Elements(1));
        group.bench_function("1_event_sequential", |b| {
            b.iter_batched(
                || {
                    n += 1;
                    one_record_batch(n, SHARDS)
                },
                |batch| runtime.block_on(append(&running.log, batch)),
                BatchSize::SmallInput,
            )
        });
    }

    {
        let running = RunningLog::start();
        let body = EventGenerator::new(SEED).batch(BATCH_EVENTS);
        group.throughput(Throughput::Elements(BATCH_EVENTS as u64));
        group.bench_function("1000_event_batch", |b| {
            b.iter_batched(
                || parse_batch(&body, SHARDS).expect("valid batch"),
                |batch| runtime.block_on(append(&running.log, batch)),
                BatchSize::SmallInput,
            )
        });
    }

    {
        let running = RunningLog::start();
        let mut n = 0u64;
        group.throughput(Throughput::Elements(CONCURRENT_APPENDERS as u64));
        group.bench_function("32_concurrent_1_event", |b| {
            b.iter_batched(
                || {
                    (0..CONCURRENT_APPENDERS)
                        .map(|_| {
                            n += 1;
                            one_record_batch(n, SHARDS)
                        })
                        .collect::<Vec<_>>()
                },
                |batches| {
                    runtime.block_on(async {
                        let mut appenders = JoinSet::new();
                        for batch in batches {
                            let log = running.log.clone();
                            appenders.spawn(async move { append(&log, batch).await });
                        }
                        while let Some(done) = appenders.join_next().await {
                            black_box(done.expect("appender task"));
                        }
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn frame_codec(c: &mut Criterion) {
    let body = EventGenerator::new(SEED).batch(BATCH_EVENTS);
    let batch = parse_batch(&body, SHARDS).expect("valid batch");
    let mut encoded = Vec::with_capacity(batch.encoded_bytes() + 64);
    encode_frame(&mut encoded, 1, 1_795_392_000_000, &batch);

    let mut group = c.benchmark_group("frame_1000_records");
    group
        .throughput(Throughput::Elements(BATCH_EVENTS as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut out = Vec::with_capacity(encoded.len());
    group.bench_function("encode_frame", |b| {
        b.iter(|| {
            out.clear();
            encode_frame(&mut out, 1, 1_795_392_000_000, black_box(&batch));
            black_box(out.len())
        })
    });
    group.bench_function("decode_frame", |b| {
        b.iter(|| match decode_frame(black_box(&encoded)) {
            Ok(FrameRead::Frame(frame, used)) => black_box((frame.len(), used)),
            _ => panic!("the encoded frame decodes"),
        })
    });
    group.finish();
}

criterion_group!(benches, frame_codec, durable_append);
criterion_main!(benches);
