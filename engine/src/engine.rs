//! The [`Engine`] handle: opens the data directory, recovers state, and is what ingress calls
//! to append records and to read entities and history.
//!
//! Data directory layout: `LOCK` (held with an exclusive file lock while a server runs),
//! `log/` (the local log's segments), `snapshots/` (see [`crate::snapshot`]).
//!
//! Start-up = newest valid snapshot, then replay of the log: records the snapshot covers only
//! rebuild the history index, later ones are applied. An append returns only after the log made
//! it durable and every owning shard applied it, so a following read sees it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::control::{ControlChange, ControlState};
use crate::json;
use crate::log::local::{LocalLog, LocalLogOptions, owners_of};
use crate::log::{Log, LogError};
use crate::record::{LogPosition, RecordBatch};
use crate::shard::{
    AppendFailure, ChangeObserver, Completion, Dispatcher, ListQuery, ListedPage, ShardStats,
    ShardWork, shard_of, start_observed_shards,
};
use crate::snapshot::{self, SnapshotJob};
use crate::threads::ThreadPolicy;

/// Entities a shard renders per listing round trip.
const LIST_PAGE_ENTITIES: usize = 1024;
/// Snapshot entities sent to a shard per message while loading.
const LOAD_BATCH_ENTITIES: usize = 1024;

/// How the engine is set up; every tuning field has a `flux serve` flag.
#[derive(Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Shard worker threads.
    pub shards: usize,
    pub segment_bytes: u64,
    /// Log records stay at least this long (history is served from the log).
    pub retention: Duration,
    /// Time between periodic snapshots.
    pub snapshot_interval: Duration,
    /// Which durable log backs the engine.
    pub log: LogConfig,
    /// Told of every applied change (egress fan-out), if set.
    pub observer: Option<Arc<dyn ChangeObserver>>,
    /// Called on a shard thread after work it did because it was idle (the binary hands freed
    /// memory back to the OS there).
    pub after_idle_work: Option<fn()>,
    /// How shard and log-writer threads wait for work, and whether shards are pinned.
    pub threads: ThreadPolicy,
    /// Local log: an appending task that finds the log idle commits small groups itself
    /// ([`LocalLogOptions::leader_commits`]). Needs another HTTP worker to serve meanwhile.
    pub leader_commits: bool,
    /// Local log: commits into a spare's zeros may be synced as overwrites
    /// ([`LocalLogOptions::overwrite_sync`]).
    pub overwrite_sync: bool,
}

/// The durable log backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogConfig {
    /// The embedded log in `<data-dir>/log` (`--log local`).
    Local,
    /// A NATS JetStream stream shared by every node (`--log nats://…`).
    JetStream(crate::log::jetstream::JetStreamOptions),
}

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "data directory {0} is in use by another flux server (its LOCK file is held); stop that \
         server or choose another --data-dir"
    )]
    Locked(PathBuf),
    #[error("durable log unavailable: {0}")]
    Unavailable(String),
    /// The log did not answer whether it took an append, and still may apply it.
    #[error(
        "the durable log did not answer in time: {0}; the write may still be applied, read it \
         back before writing it again"
    )]
    OutcomeUnknown(String),
    #[error(transparent)]
    Log(#[from] LogError),
    /// The message holds the cause; it is not a `source`, so a report that walks the chain
    /// does not say it twice.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl EngineError {
    /// Whether the caller may retry later (HTTP 503) rather than a bug or corruption.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            EngineError::Unavailable(_) | EngineError::Log(LogError::Unavailable(_))
        )
    }
}

fn io_context(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let context = context.into();
    move |cause| EngineError::Io { context, cause }
}

/// What start-up found, for the start-up line and logs.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub snapshot_position: Option<LogPosition>,
    pub snapshot_entities: u64,
    pub log_records: u64,
    pub dropped_bytes: u64,
    pub next_position: LogPosition,
}

/// Opens the embedded log in `<data-dir>/log`, replaying it into the shards.
fn open_local(
    config: &EngineConfig,
    dispatcher: &Dispatcher,
    covered: LogPosition,
    report: &mut RecoveryReport,
) -> Result<Arc<dyn Log>, EngineError> {
    let options = LocalLogOptions {
        segment_bytes: config.segment_bytes,
        spin: config.threads.spin,
        leader_commits: config.leader_commits,
        overwrite_sync: config.overwrite_sync,
        ..LocalLogOptions::default()
    };
    let shards = dispatcher.shard_count();
    let (log, summary) = LocalLog::open(&config.data_dir.join("log"), options, &mut |frame| {
        let owners = owners_of(&frame, shards);
        dispatcher.dispatch(Arc::new(frame), &owners, None);
    })?;
    let first = log.first_position();
    if first > covered + 1 {
        return Err(LogError::Corrupt(format!(
            "the log starts at position {first} but no snapshot covers positions 1..{first}"
        ))
        .into());
    }
    if let Some(&(from, to)) = summary.gaps.iter().find(|&&(_, to)| to > covered + 1) {
        return Err(LogError::Corrupt(format!(
            "log positions {from}..{to} are missing and no snapshot covers them"
        ))
        .into());
    }
    report.log_records = summary.records;
    report.dropped_bytes = summary.dropped_bytes;
    if covered > 0 {
        log.skip_to(covered + 1)?;
    }
    Ok(Arc::new(log))
}

/// A cheap, cloneable handle to the running engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    log: Arc<dyn Log>,
    dispatcher: Dispatcher,
    /// Position of the newest snapshot written or loaded (0: none).
    last_snapshot: AtomicU64,
    /// The log's first position when the shards were last told to forget history before it.
    history_forgotten_before: AtomicU64,
    /// Serializes snapshots (timer and shutdown).
    snapshot_lock: Mutex<()>,
    /// Dropping the sender stops the snapshot timer.
    timer_stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Held for the engine's life: the exclusive lock on the data directory.
    _lock: File,
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Engine {
    /// Opens the data directory, recovers state and starts the writer, shards and snapshot timer.
    /// Blocking: call it before (or outside) the async runtime.
    pub fn open(config: EngineConfig) -> Result<(Engine, RecoveryReport), EngineError> {
        let dir = &config.data_dir;
        fs::create_dir_all(dir).map_err(io_context(format!("creating {}", dir.display())))?;
        let lock = lock_data_dir(dir)?;
        let snapshots = dir.join("snapshots");
        fs::create_dir_all(&snapshots).map_err(io_context("creating snapshots dir"))?;

        let shards = config.shards.max(1);
        let (dispatcher, _threads) = start_observed_shards(
            shards,
            config.observer.clone(),
            config.after_idle_work,
            config.threads,
        )
        .map_err(io_context("starting shards"))?;
        let mut report = RecoveryReport::default();

        let snapshot =
            snapshot::newest_valid(&snapshots).map_err(io_context("reading snapshots"))?;
        let mut covered = 0;
        if let Some(snapshot) = snapshot {
            covered = snapshot.position;
            *dispatcher
                .control()
                .write()
                .unwrap_or_else(|e| e.into_inner()) = snapshot.control.clone().restored(covered);
            report.snapshot_position = Some(covered);
            let mut batches: Vec<Vec<_>> = vec![Vec::new(); shards];
            let read = snapshot.read(|entity| {
                report.snapshot_entities += 1;
                let shard = shard_of(entity.id(), shards) as usize;
                batches[shard].push(entity);
                if batches[shard].len() >= LOAD_BATCH_ENTITIES {
                    let entities = std::mem::take(&mut batches[shard]);
                    dispatcher.send(shard, ShardWork::Load { entities, covered });
                }
            });
            if let Err(reason) = read {
                // Checked already; failing now means the disk changed under us.
                return Err(LogError::Corrupt(format!("snapshot {covered}: {reason}")).into());
            }
            for (shard, entities) in batches.into_iter().enumerate() {
                dispatcher.send(shard, ShardWork::Load { entities, covered });
            }
        }

        let log = match &config.log {
            LogConfig::Local => open_local(&config, &dispatcher, covered, &mut report)?,
            LogConfig::JetStream(options) => {
                crate::log::jetstream::open_for_engine(options, &dispatcher, covered, &mut report)?
            }
        };
        log.start(dispatcher.clone())
            .map_err(io_context("starting the log writer"))?;
        report.next_position = log.next_position();

        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                log,
                dispatcher,
                last_snapshot: AtomicU64::new(covered),
                history_forgotten_before: AtomicU64::new(0),
                snapshot_lock: Mutex::new(()),
                timer_stop: Mutex::new(None),
                _lock: lock,
            }),
        };
        // Replay is queued in the shard inboxes; wait until every shard has worked through it.
        engine.stats_blocking();
        engine
            .start_snapshot_timer()
            .map_err(io_context("starting the snapshot timer"))?;
        Ok((engine, report))
    }

    /// Registers the engine's metrics (durable log) in `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.log.register_metrics(registry);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn shard_count(&self) -> usize {
        self.inner.dispatcher.shard_count()
    }

    /// The shard owning `entity_id`, for [`RecordBatch::push_event`].
    pub fn shard_of(&self, entity_id: &str) -> u16 {
        shard_of(entity_id, self.shard_count())
    }

    /// Appends `batch` durably and waits until it is applied; returns its first position.
    pub async fn append(&self, batch: RecordBatch) -> Result<LogPosition, EngineError> {
        if batch.is_empty() {
            return Ok(self.inner.log.next_position());
        }
        let (completion, done) = Completion::new();
        self.inner.log.append(batch, completion).await?;
        match done.await {
            Ok(Ok(position)) => Ok(position),
            Ok(Err(AppendFailure::Refused(reason))) => Err(EngineError::Unavailable(reason)),
            Ok(Err(AppendFailure::Unknown(reason))) => Err(EngineError::OutcomeUnknown(reason)),
            Err(_) => Err(EngineError::Unavailable("engine stopped".into())),
        }
    }

    /// Appends one control change durably and waits until it is applied to the control state.
    pub async fn append_control(&self, change: &ControlChange) -> Result<LogPosition, EngineError> {
        let json = serde_json::to_string(change)
            .map_err(|e| EngineError::Unavailable(format!("encoding a control change: {e}")))?;
        let mut batch = RecordBatch::default();
        batch.push_control(&json);
        self.append(batch).await
    }

    /// Runs `read` on the current control state (namespaces, runtime config). Do not block in it.
    pub fn with_control<R>(&self, read: impl FnOnce(&ControlState) -> R) -> R {
        let control = self
            .inner
            .dispatcher
            .control()
            .read()
            .unwrap_or_else(|e| e.into_inner());
        read(&control)
    }

    /// The log backend's name (`local`, ...), for health and the start-up line.
    pub fn log_kind(&self) -> &'static str {
        self.inner.log.kind()
    }

    /// How the log makes commits durable on this node's disk ([`Log::sync_method`]).
    pub fn log_sync_method(&self) -> Option<&'static str> {
        self.inner.log.sync_method()
    }

    /// `None` when the log takes writes, else why not.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.inner.log.unavailable_reason()
    }

    /// Events other nodes sharing the log wrote into `namespace` in the last minute up to
    /// `now_ms` (none on the local log), by when they stop counting: what a per-namespace rate
    /// limit adds to this node's own count.
    pub fn peer_events(&self, namespace: &str, now_ms: u64) -> Vec<crate::log::peers::Expiring> {
        self.inner.log.peer_events(namespace, now_ms)
    }

    /// `None` when the log is healthy: it takes writes and its last write did not fail.
    pub fn health_reason(&self) -> Option<String> {
        self.inner.log.health_reason()
    }

    /// The entity's JSON object, if it exists.
    pub async fn get(&self, id: &str) -> Option<Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        let shard = self.shard_of(id) as usize;
        self.inner
            .dispatcher
            .send_async(
                shard,
                ShardWork::Get {
                    id: id.into(),
                    reply,
                },
            )
            .await;
        rx.await.ok().flatten()
    }

    /// Which of `ids` exist, in the same order.
    pub async fn contains(&self, ids: &[&str]) -> Vec<bool> {
        let shards = self.shard_count();
        let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); shards];
        for (i, id) in ids.iter().enumerate() {
            per_shard[shard_of(id, shards) as usize].push(i);
        }
        let mut found = vec![false; ids.len()];
        for (shard, indexes) in per_shard.into_iter().enumerate() {
            if indexes.is_empty() {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let query: Vec<Box<str>> = indexes.iter().map(|&i| Box::from(ids[i])).collect();
            self.inner
                .dispatcher
                .send_async(shard, ShardWork::Contains { ids: query, reply })
                .await;
            if let Ok(exists) = rx.await {
                for (i, e) in indexes.into_iter().zip(exists) {
                    found[i] = e;
                }
            }
        }
        found
    }

    /// Ids of existing entities starting with `prefix`, sorted, at most `limit`.
    pub async fn ids_with_prefix(&self, prefix: &str, limit: usize) -> Vec<Arc<str>> {
        let mut all = Vec::new();
        for shard in 0..self.shard_count() {
            let (reply, rx) = oneshot::channel();
            let query = ListQuery {
                prefix: prefix.into(),
                after: None,
                limit,
            };
            self.inner
                .dispatcher
                .send_async(shard, ShardWork::Ids { query, reply })
                .await;
            all.extend(rx.await.unwrap_or_default());
        }
        all.sort_unstable();
        all.truncate(limit);
        all
    }

    /// Entity counts per namespace across shards, by namespace name.
    pub async fn namespace_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut totals = std::collections::BTreeMap::new();
        for shard in 0..self.shard_count() {
            let (reply, rx) = oneshot::channel();
            self.inner
                .dispatcher
                .send_async(shard, ShardWork::NamespaceCounts { reply })
                .await;
            for (namespace, n) in rx.await.unwrap_or_default() {
                *totals.entry(namespace.into_string()).or_insert(0) += n;
            }
        }
        totals
    }

    /// How many entities have ids starting with `prefix`.
    pub async fn count_with_prefix(&self, prefix: &str) -> usize {
        let mut total = 0;
        for shard in 0..self.shard_count() {
            let (reply, rx) = oneshot::channel();
            let query = ListQuery {
                prefix: prefix.into(),
                after: None,
                limit: usize::MAX,
            };
            self.inner
                .dispatcher
                .send_async(shard, ShardWork::Count { query, reply })
                .await;
            total += rx.await.unwrap_or(0);
        }
        total
    }

    /// A streaming, id-ordered listing of entities starting with `prefix`, after `after`.
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Lister {
        let cursors = (0..self.shard_count())
            .map(|_| ShardCursor {
                page: ListedPage::default(),
                next: 0,
                after: after.map(Box::from),
                done: false,
            })
            .collect();
        Lister {
            engine: self.clone(),
            prefix: prefix.into(),
            remaining: limit,
            cursors,
            wrote: 0,
        }
    }

    /// The entity's events accepted at or after `since_ms`, newest first, at most `limit`,
    /// rendered as a JSON array.
    pub async fn history(
        &self,
        id: &str,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let shard = self.shard_of(id) as usize;
        let work = ShardWork::History {
            id: id.into(),
            limit,
            reply,
        };
        self.inner.dispatcher.send_async(shard, work).await;
        let positions = rx.await.unwrap_or_default();
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.render_history(&positions, since_ms))
            .await
            .map_err(|e| EngineError::Unavailable(format!("history reader failed: {e}")))?
    }

    fn render_history(
        &self,
        positions: &[LogPosition],
        since_ms: u64,
    ) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::with_capacity(256 * positions.len() + 2);
        out.push(b'[');
        let mut frame: Option<Arc<crate::record::Frame>> = None;
        let mut first = true;
        for &position in positions {
            let cached = matches!(&frame, Some(f) if contains(f, position));
            if !cached {
                frame = self.inner.log.read_frame(position)?;
            }
            let Some(f) = frame.as_ref().filter(|f| contains(f, position)) else {
                continue; // Dropped by retention.
            };
            if f.accept_time_ms < since_ms {
                break; // Positions go back in time; every older one is older still.
            }
            let record = f
                .record((position - f.first_position) as usize)
                .map_err(|e| LogError::Corrupt(format!("record {position}: {e}")))?;
            if !first {
                out.push(b',');
            }
            first = false;
            render_event(&mut out, &record, position, f.accept_time_ms);
        }
        out.push(b']');
        Ok(out)
    }

    /// Entity count, log position and active publishers.
    pub async fn stats(&self) -> EngineStats {
        let next_position = self.inner.log.next_position();
        let mut stats = EngineStats {
            next_position,
            events_total: self.inner.dispatcher.events(),
            ..Default::default()
        };
        let active_since_ms = now_ms().saturating_sub(ACTIVE_PUBLISHER_WINDOW.as_millis() as u64);
        let mut sources = hashbrown::HashSet::new();
        for shard in 0..self.shard_count() {
            let (reply, rx) = oneshot::channel();
            let work = ShardWork::Stats {
                active_since_ms,
                reply,
            };
            self.inner.dispatcher.send_async(shard, work).await;
            if let Ok(s) = rx.await {
                stats.entities += s.entities;
                stats.deleted_ids += s.deleted_ids;
                stats.events_total = stats.events_total.saturating_sub(s.builtin_events);
                sources.extend(s.active_sources);
            }
        }
        stats.active_publishers = sources.len();
        stats
    }

    fn stats_blocking(&self) -> Vec<ShardStats> {
        (0..self.shard_count())
            .filter_map(|shard| {
                let (reply, rx) = oneshot::channel();
                let work = ShardWork::Stats {
                    active_since_ms: 0,
                    reply,
                };
                self.inner.dispatcher.send(shard, work);
                rx.blocking_recv().ok()
            })
            .collect()
    }

    /// Writes a snapshot of everything appended so far (unless nothing changed since the last
    /// one), then drops what the snapshots and retention allow. Blocking.
    pub fn snapshot(&self) -> Result<Option<LogPosition>, EngineError> {
        let inner = &self.inner;
        let _one_at_a_time = inner
            .snapshot_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = inner.config.data_dir.join("snapshots");
        let since = inner.last_snapshot.load(Ordering::Acquire);
        let (tx, rx) = std::sync::mpsc::channel();
        inner
            .log
            .barrier(Box::new(move |last, dispatcher: &Dispatcher| {
                if last <= since {
                    let _ = tx.send(Ok(None));
                    return;
                }
                let shards = dispatcher.shard_count();
                let control = dispatcher
                    .control()
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let result =
                    SnapshotJob::create(&dir, last, shards, &control).map(|(job, done)| {
                        for shard in 0..shards {
                            dispatcher.send(shard, ShardWork::Snapshot(job.clone()));
                        }
                        Some(done)
                    });
                let _ = tx.send(result);
            }))?;
        let job = rx
            .recv()
            .map_err(|_| EngineError::Unavailable("log writer stopped".into()));
        let written = match job?.map_err(io_context("creating a snapshot"))? {
            None => None,
            Some(done) => {
                let position = done
                    .blocking_recv()
                    .map_err(|_| EngineError::Unavailable("shards stopped".into()))?
                    .map_err(|reason| EngineError::Io {
                        context: "writing a snapshot".into(),
                        cause: std::io::Error::other(reason),
                    })?;
                inner.last_snapshot.store(position, Ordering::Release);
                Some(position)
            }
        };
        self.compact()?;
        self.forget_dropped_history();
        Ok(written)
    }

    /// Tells the shards to forget history the log no longer holds, once per advance of its
    /// first position (retention here, or the stream's own `max_age` in JetStream mode): a
    /// deleted entity's id is kept only while its history is.
    fn forget_dropped_history(&self) {
        let inner = &self.inner;
        let first_kept = inner.log.first_position();
        if inner
            .history_forgotten_before
            .fetch_max(first_kept, Ordering::AcqRel)
            < first_kept
        {
            for shard in 0..inner.dispatcher.shard_count() {
                inner
                    .dispatcher
                    .send(shard, ShardWork::ForgetHistoryBefore { first_kept });
            }
        }
    }

    /// Drops snapshots beyond the newest two, then log segments the older of those covers and
    /// retention no longer needs. Runs after every snapshot attempt, so retention advances even
    /// when no new events arrive.
    fn compact(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        let snapshots = inner.config.data_dir.join("snapshots");
        let oldest_kept = snapshot::prune(&snapshots).map_err(io_context("pruning snapshots"))?;
        if let Some(oldest_kept) = oldest_kept {
            let cutoff = now_ms().saturating_sub(inner.config.retention.as_millis() as u64);
            let dropped = inner.log.compact(oldest_kept, cutoff)?;
            if dropped > 0 {
                tracing::info!(dropped, "retention dropped old log segments");
            }
        }
        Ok(())
    }

    fn start_snapshot_timer(&self) -> std::io::Result<()> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        *self
            .inner
            .timer_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(stop);
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.snapshot_interval;
        std::thread::Builder::new()
            .name("flux-snapshots".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(error) = (Engine { inner }).snapshot() {
                        tracing::warn!(%error, "periodic snapshot failed");
                    }
                }
            })?;
        Ok(())
    }

    /// Final snapshot, then stops the writer once every queued append is durable and applied.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        self.inner
            .timer_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let result = self.snapshot().map(|_| ());
        self.inner.log.close();
        result
    }
}

fn contains(frame: &crate::record::Frame, position: LogPosition) -> bool {
    (frame.first_position..=frame.last_position()).contains(&position)
}

fn render_event(
    out: &mut Vec<u8>,
    record: &crate::record::EventRecord<'_>,
    position: LogPosition,
    accept_ms: u64,
) {
    let f = &record.fields;
    out.extend_from_slice(b"{\"eventId\":");
    json::write_str(out, f.event_id.as_str(&mut [0; 36]));
    out.extend_from_slice(b",\"stream\":");
    json::write_str(out, f.stream);
    out.extend_from_slice(b",\"source\":");
    json::write_str(out, f.source);
    out.extend_from_slice(b",\"timestamp\":");
    json::write_i64(out, f.timestamp);
    out.extend_from_slice(b",\"payload\":{\"entity_id\":");
    json::write_str(out, f.entity_id);
    out.extend_from_slice(b",\"properties\":");
    json::write_object(out, record.properties());
    out.push(b'}');
    if let Some(key) = f.key {
        out.extend_from_slice(b",\"key\":");
        json::write_str(out, key);
    }
    if let Some(schema) = f.schema {
        out.extend_from_slice(b",\"schema\":");
        json::write_str(out, schema);
    }
    out.extend_from_slice(b",\"acceptedAt\":");
    json::write_time_ms(out, accept_ms);
    out.extend_from_slice(b",\"position\":");
    json::write_u64(out, position);
    out.push(b'}');
}

fn lock_data_dir(dir: &Path) -> Result<File, EngineError> {
    let path = dir.join("LOCK");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_context(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(EngineError::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => {
            Err(io_context(format!("locking {}", path.display()))(e))
        }
    }
}

/// Totals across shards.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStats {
    /// Entities, without the built-in ones (`flux-core/...`).
    pub entities: usize,
    /// Deleted entities whose ids (and history) are held until the log drops their records.
    pub deleted_ids: usize,
    pub next_position: LogPosition,
    /// Event records in the log (replayed at start-up plus applied since), without those of
    /// built-in entities.
    pub events_total: u64,
    /// Distinct event sources with a record accepted within [`ACTIVE_PUBLISHER_WINDOW`].
    pub active_publishers: usize,
}

/// A source counts as an active publisher this long after its latest accepted event.
pub const ACTIVE_PUBLISHER_WINDOW: Duration = Duration::from_secs(60);

struct ShardCursor {
    page: ListedPage,
    /// The page's first entity not yet written.
    next: usize,
    /// The last id this shard returned (resume point).
    after: Option<Box<str>>,
    done: bool,
}

/// A k-way merge of per-shard sorted pages: memory stays at one page per shard.
pub struct Lister {
    engine: Engine,
    prefix: Box<str>,
    remaining: usize,
    cursors: Vec<ShardCursor>,
    wrote: usize,
}

impl Lister {
    /// Appends the next entities (comma-separated JSON objects, with a leading comma when not
    /// the first) to `out` until it holds `target_bytes`. Returns false when the listing ended.
    pub async fn next_chunk(&mut self, out: &mut Vec<u8>, target_bytes: usize) -> bool {
        while out.len() < target_bytes {
            if self.remaining == 0 {
                return false;
            }
            for shard in 0..self.cursors.len() {
                let cursor = &mut self.cursors[shard];
                if cursor.next == cursor.page.len() && !cursor.done {
                    let (reply, rx) = oneshot::channel();
                    let query = ListQuery {
                        prefix: self.prefix.clone(),
                        after: cursor.after.clone(),
                        limit: LIST_PAGE_ENTITIES.min(self.remaining),
                    };
                    self.engine
                        .inner
                        .dispatcher
                        .send_async(shard, ShardWork::List { query, reply })
                        .await;
                    let page = rx.await.unwrap_or_default();
                    let cursor = &mut self.cursors[shard];
                    cursor.done = page.len() < LIST_PAGE_ENTITIES.min(self.remaining);
                    if !page.is_empty() {
                        cursor.after = Some(Box::from(page.id(page.len() - 1)));
                    }
                    cursor.page = page;
                    cursor.next = 0;
                }
            }
            let next = (0..self.cursors.len())
                .filter(|&s| self.cursors[s].next < self.cursors[s].page.len())
                .min_by(|&a, &b| {
                    let (a, b) = (&self.cursors[a], &self.cursors[b]);
                    a.page.id(a.next).cmp(b.page.id(b.next))
                });
            let Some(shard) = next else { return false };
            let cursor = &mut self.cursors[shard];
            if self.wrote > 0 {
                out.push(b',');
            }
            out.extend_from_slice(cursor.page.json(cursor.next));
            cursor.next += 1;
            self.wrote += 1;
            self.remaining -= 1;
        }
        true
    }
}
