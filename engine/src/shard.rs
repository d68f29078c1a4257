//! Shard workers: each runs on its own thread and owns the entities routed to it.
//!
//! Invariants:
//! - An entity lives in exactly one shard, chosen by [`shard_of`] (a hash of its id). A
//!   shard's maps are touched only under its lock: by its thread, handling [`ShardWork`] from
//!   its inbox, or by the log's committer applying records in place
//!   ([`Dispatcher::dispatch_in_place`]). Other threads send work and await replies.
//! - Records are applied in log order: the log dispatches frames from one place at a time and
//!   every inbox is FIFO. A record is applied in place only while the shard's inbox holds no
//!   unhandled work at all (`outstanding` is 0 under the lock), so it never overtakes an
//!   earlier record, snapshot request or read. `last_updated_ms` is the record's accept time,
//!   `revision` its position.
//! - Records at or below `covered` (the snapshot the shard was loaded from) only feed the
//!   history index, and the active publishers when accepted within their window; their effect
//!   on state is already in the snapshot.
//! - Inboxes are bounded ([`SHARD_INBOX_CAPACITY`]); a full inbox makes the sender wait.
//! - Per id a shard keeps one `Slot` (the entity block and its history) in a `HashTable` keyed
//!   by the id inside the block; an entity exists iff its revision is not 0 (log positions
//!   start at 1). The order listings need (bucket indexes sorted by id, `SortedIds`) is built
//!   when a listing needs it or the shard is idle; creates since then are kept in a small
//!   ordered set beside it and deleted ids are skipped on read (`Order`), so a listing never
//!   names a missing entity nor misses an existing one. Anything that moves or frees buckets
//!   (growth, rehash, `retain`, shrinking) drops the order first.
//! - A deleted entity's slot is kept while its history is, and freed once the log drops the
//!   last of its records ([`ShardWork::ForgetHistoryBefore`]); the table shrinks when most of
//!   it was freed, so a churn of short-lived ids leaves no memory behind.
//! - After applying a live record (not one a snapshot already covered) the shard tells its
//!   [`ChangeObserver`], on the applying thread and under the shard's lock, in log order.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use tokio::sync::oneshot;

use crate::control::{ControlChange, ControlState};
use crate::entity::Entity;
use crate::history::History;
use crate::record::{CONTROL_OWNER, Frame, LogPosition, PropertyIter, is_tombstone_property};
use crate::snapshot::SnapshotJob;
use crate::threads::{ThreadPolicy, recv_spinning_timeout};

pub use crate::history::HISTORY_KEPT_PER_ENTITY;

/// Streams of records Flux writes itself (API deletes, the directory).
pub const INTERNAL_STREAM_PREFIX: &str = "flux.";

/// The namespace of Flux's built-in entities (`flux-core/directory`). They are state like any
/// other, but the counts users see ([`ShardStats`]) leave them out, and no client writes them.
pub const BUILTIN_NAMESPACE: &str = "flux-core";
/// Ids of built-in entities start with this: [`BUILTIN_NAMESPACE`] and `/`.
pub const BUILTIN_ID_PREFIX: &str = "flux-core/";

/// Messages a shard's inbox holds before senders wait (backpressure, never dropped).
pub const SHARD_INBOX_CAPACITY: usize = 1024;

/// A shard whose ids need sorting sorts them once its inbox has been empty this long.
const SORT_WHEN_IDLE_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// The shard that owns `entity_id` among `shards` shards.
pub fn shard_of(entity_id: &str, shards: usize) -> u16 {
    // CRC32C runs in hardware and spreads ids evenly enough for routing.
    (crc32c::crc32c(entity_id.as_bytes()) as usize % shards) as u16
}

/// Fires once every shard that received part of an append has applied it.
pub struct Completion {
    remaining: AtomicUsize,
    first_position: AtomicU64,
    sender: Mutex<Option<oneshot::Sender<Result<LogPosition, AppendFailure>>>>,
}

/// Why an append completed without being applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendFailure {
    /// Nothing of it was accepted ([`Completion::fail`]).
    Refused(String),
    /// The log did not show whether it took it: it may still be applied
    /// ([`Completion::unknown`]).
    Unknown(String),
}

impl std::fmt::Display for AppendFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendFailure::Refused(reason) => f.write_str(reason),
            AppendFailure::Unknown(reason) => write!(f, "outcome unknown: {reason}"),
        }
    }
}

impl From<AppendFailure> for String {
    fn from(failure: AppendFailure) -> String {
        failure.to_string()
    }
}

impl Completion {
    /// A completion and the receiver its result arrives on (first position, or why not).
    pub fn new() -> (
        Arc<Self>,
        oneshot::Receiver<Result<LogPosition, AppendFailure>>,
    ) {
        let (tx, rx) = oneshot::channel();
        let completion = Completion {
            remaining: AtomicUsize::new(0),
            first_position: AtomicU64::new(0),
            sender: Mutex::new(Some(tx)),
        };
        (Arc::new(completion), rx)
    }

    /// Reports success without dispatching anything (an empty append at `position`).
    pub(crate) fn succeed(&self, position: LogPosition) {
        self.send(Ok(position));
    }

    /// Reports failure; nothing of the append was dispatched.
    pub fn fail(&self, reason: String) {
        self.send(Err(AppendFailure::Refused(reason)));
    }

    /// Reports that the append's fate is not known when its answer is due: the log may still
    /// store and dispatch it (a shared log that stopped answering after it was handed over).
    pub fn unknown(&self, reason: String) {
        self.send(Err(AppendFailure::Unknown(reason)));
    }

    fn send(&self, result: Result<LogPosition, AppendFailure>) {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }

    fn part_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.send(Ok(self.first_position.load(Ordering::Acquire)));
        }
    }
}

/// A page of a listing from one shard: entities in id order, rendered as JSON objects, all in
/// four buffers (not two allocations per entity).
#[derive(Debug, Default)]
pub struct ListedPage {
    ids: String,
    id_ends: Vec<usize>,
    json: Vec<u8>,
    json_ends: Vec<usize>,
}

impl ListedPage {
    fn push(&mut self, entity: &Entity) {
        self.ids.push_str(entity.id());
        self.id_ends.push(self.ids.len());
        entity.write_json(&mut self.json);
        self.json_ends.push(self.json.len());
    }

    pub fn len(&self) -> usize {
        self.id_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.id_ends.is_empty()
    }

    fn start(ends: &[usize], i: usize) -> usize {
        i.checked_sub(1).map_or(0, |j| ends[j])
    }

    /// The id of entity `i`.
    pub fn id(&self, i: usize) -> &str {
        &self.ids[Self::start(&self.id_ends, i)..self.id_ends[i]]
    }

    /// The JSON object of entity `i`.
    pub fn json(&self, i: usize) -> &[u8] {
        &self.json[Self::start(&self.json_ends, i)..self.json_ends[i]]
    }
}

/// Entities whose id starts with `prefix` and sorts after `after`, at most `limit` of them.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub prefix: Box<str>,
    pub after: Option<Box<str>>,
    pub limit: usize,
}

/// Counters a shard reports.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    /// Entities, the built-in ones left out.
    pub entities: usize,
    /// Deleted entities whose ids are still held, with their history, until the log drops it.
    pub deleted_ids: usize,
    /// Event records of built-in entities applied (replay included), to leave out of totals.
    pub builtin_events: u64,
    /// Event sources seen since the time the stats were asked for, as 64-bit hashes of their
    /// names (by one hasher every shard shares, so the shards' sets can be joined).
    pub active_sources: Vec<u64>,
}

/// Told about every applied change by the shard that owns the entity, on the thread applying
/// it (the shard's, or a log committer's) under the shard's lock and in log order, so
/// implementations must be quick and must not block.
pub trait ChangeObserver: Send + Sync + 'static {
    /// The entity was created or its properties were merged with `properties` (as sent).
    fn entity_updated(&self, entity_id: &str, accept_time_ms: u64, properties: PropertyIter<'_>);
    /// The entity existed and was deleted.
    fn entity_deleted(&self, entity_id: &str, accept_time_ms: u64);
}

/// Everything a shard can be asked to do.
pub enum ShardWork {
    /// Apply records `indexes` of `frame` (all owned by this shard), then signal `completion`.
    Apply {
        frame: Arc<Frame>,
        indexes: Vec<u32>,
        completion: Option<Arc<Completion>>,
    },
    /// Install entities read from a snapshot covering positions up to `covered`.
    Load {
        entities: Vec<Entity>,
        covered: LogPosition,
    },
    Get {
        id: Box<str>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    List {
        query: ListQuery,
        reply: oneshot::Sender<ListedPage>,
    },
    /// Ids of existing entities matching `query` (no rendering), for batch deletes.
    Ids {
        query: ListQuery,
        reply: oneshot::Sender<Vec<Arc<str>>>,
    },
    /// Entity counts per namespace (the id before its first `/`; ids without one are skipped).
    NamespaceCounts {
        reply: oneshot::Sender<Vec<(Box<str>, usize)>>,
    },
    /// How many existing entities match `query`.
    Count {
        query: ListQuery,
        reply: oneshot::Sender<usize>,
    },
    /// Which of `ids` exist.
    Contains {
        ids: Vec<Box<str>>,
        reply: oneshot::Sender<Vec<bool>>,
    },
    /// Log positions of the entity's newest `limit` events, newest first.
    History {
        id: Box<str>,
        limit: usize,
        reply: oneshot::Sender<Vec<LogPosition>>,
    },
    /// Write this shard's part of a snapshot.
    Snapshot(Arc<SnapshotJob>),
    /// The log no longer holds positions below `first_kept` (retention dropped them): forget
    /// them, and the ids of deleted entities that only they kept.
    ForgetHistoryBefore { first_kept: LogPosition },
    /// Counters; sources last seen before `active_since_ms` are forgotten.
    Stats {
        active_since_ms: u64,
        reply: oneshot::Sender<ShardStats>,
    },
}

/// A shard's state and the work its inbox holds that its thread has not finished.
struct ShardCell {
    state: Mutex<Shard>,
    /// Incremented before work is sent to the inbox, decremented (under `state`) once the
    /// shard thread handled it.
    outstanding: AtomicUsize,
}

impl ShardCell {
    fn new(shard: Shard) -> Arc<ShardCell> {
        Arc::new(ShardCell {
            state: Mutex::new(shard),
            outstanding: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shard> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard, if nobody holds it and its inbox has nothing unhandled: then records applied
    /// now come after everything sent to it before.
    fn idle(&self) -> Option<std::sync::MutexGuard<'_, Shard>> {
        let shard = match self.state.try_lock() {
            Ok(shard) => shard,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        (self.outstanding.load(Ordering::Acquire) == 0).then_some(shard)
    }

    /// Handles one message taken from the inbox (what the shard thread does).
    fn handle(&self, work: ShardWork) {
        let mut shard = self.lock();
        shard.handle(work);
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends work to the shards; the log holds one to dispatch frames in order.
#[derive(Clone)]
pub struct Dispatcher {
    inboxes: Vec<flume::Sender<ShardWork>>,
    cells: Vec<Arc<ShardCell>>,
    /// Control records are applied here, by whoever dispatches, in log order.
    control: Arc<RwLock<ControlState>>,
    /// Event records dispatched since start (replay included): the events in the log.
    events: Arc<AtomicU64>,
}

impl Dispatcher {
    pub fn shard_count(&self) -> usize {
        self.inboxes.len()
    }

    /// Event records dispatched so far (replay included).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// The control state (namespaces, runtime config) as of the last dispatched frame.
    pub fn control(&self) -> &Arc<RwLock<ControlState>> {
        &self.control
    }

    /// Sends each shard its records of `frame`; `owners[i]` is the shard of record `i`
    /// ([`CONTROL_OWNER`] for control records, which are applied here before anything is sent).
    pub fn dispatch(&self, frame: Arc<Frame>, owners: &[u16], completion: Option<Arc<Completion>>) {
        self.dispatch_to(frame, owners, completion, false);
    }

    /// Like [`Dispatcher::dispatch`], but applies a shard's records right here, on the calling
    /// thread, when that shard is idle (nobody holds it, nothing unhandled in its inbox); the
    /// others get theirs through their inbox. Saves the shard thread's wake-up, which costs
    /// more than applying a few records.
    pub fn dispatch_in_place(
        &self,
        frame: Arc<Frame>,
        owners: &[u16],
        completion: Option<Arc<Completion>>,
    ) {
        self.dispatch_to(frame, owners, completion, true);
    }

    fn dispatch_to(
        &self,
        frame: Arc<Frame>,
        owners: &[u16],
        completion: Option<Arc<Completion>>,
        in_place: bool,
    ) {
        let mut parts: Vec<Vec<u32>> = vec![Vec::new(); self.inboxes.len()];
        let mut events = 0;
        for (index, &shard) in owners.iter().enumerate() {
            if shard == CONTROL_OWNER {
                self.apply_control(&frame, index);
            } else {
                parts[shard as usize].push(index as u32);
                events += 1;
            }
        }
        self.events.fetch_add(events, Ordering::Relaxed);
        let involved = parts.iter().filter(|p| !p.is_empty()).count();
        if let Some(c) = &completion {
            c.first_position
                .store(frame.first_position, Ordering::Release);
            c.remaining.store(involved, Ordering::Release);
            if involved == 0 {
                c.send(Ok(frame.first_position));
            }
        }
        for (shard, indexes) in parts.into_iter().enumerate() {
            if indexes.is_empty() {
                continue;
            }
            if in_place && let Some(mut state) = self.cells[shard].idle() {
                state.apply(&frame, &indexes);
                drop(state);
                if let Some(c) = &completion {
                    c.part_done();
                }
                continue;
            }
            let work = ShardWork::Apply {
                frame: frame.clone(),
                indexes,
                completion: completion.clone(),
            };
            self.send(shard, work);
        }
    }

    fn apply_control(&self, frame: &Frame, index: usize) {
        let position = frame.first_position + index as u64;
        let change = frame
            .control(index)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                let json = json.ok_or("not a control record")?;
                serde_json::from_str::<ControlChange>(json).map_err(|e| e.to_string())
            });
        match change {
            Ok(change) => self
                .control
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .apply(position, change),
            // Written by this engine, checksummed: a failure is a bug or a newer format.
            Err(error) => tracing::error!(position, %error, "control record skipped"),
        }
    }

    /// Sends `work` to `shard`, blocking while its inbox is full. For threads, not async tasks.
    pub fn send(&self, shard: usize, work: ShardWork) {
        let outstanding = &self.cells[shard].outstanding;
        outstanding.fetch_add(1, Ordering::AcqRel);
        // A closed inbox means the engine is shutting down; the work is moot.
        if self.inboxes[shard].send(work).is_err() {
            outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Sends `work` to `shard`, waiting asynchronously while its inbox is full.
    pub async fn send_async(&self, shard: usize, work: ShardWork) {
        let outstanding = &self.cells[shard].outstanding;
        outstanding.fetch_add(1, Ordering::AcqRel);
        if self.inboxes[shard].send_async(work).await.is_err() {
            outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Starts `count` shard threads without an observer; see [`start_observed_shards`].
pub fn start_shards(
    count: usize,
) -> std::io::Result<(Dispatcher, Vec<std::thread::JoinHandle<()>>)> {
    start_observed_shards(count, None, None, ThreadPolicy::default())
}

/// Starts `count` shard threads that report changes to `observer`; returns the dispatcher and
/// their join handles.
pub fn start_observed_shards(
    count: usize,
    observer: Option<Arc<dyn ChangeObserver>>,
    after_idle_work: Option<fn()>,
    policy: ThreadPolicy,
) -> std::io::Result<(Dispatcher, Vec<std::thread::JoinHandle<()>>)> {
    let mut inboxes = Vec::with_capacity(count);
    let mut cells = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    let source_hasher = DefaultHashBuilder::default();
    for index in 0..count {
        let (tx, rx) = flume::bounded(SHARD_INBOX_CAPACITY);
        inboxes.push(tx);
        let cell = ShardCell::new(Shard {
            index,
            observer: observer.clone(),
            sources: ActiveSources::new(source_hasher.clone()),
            ..Shard::default()
        });
        cells.push(cell.clone());
        let handle = std::thread::Builder::new()
            .name(format!("flux-shard-{index}"))
            .spawn(move || {
                if policy.pin {
                    crate::threads::pin_current_thread(index);
                }
                run_shard(&cell, &rx, policy.spin, after_idle_work)
            })?;
        threads.push(handle);
    }
    let control = Arc::new(RwLock::new(ControlState::default()));
    let events = Arc::new(AtomicU64::new(0));
    Ok((
        Dispatcher {
            inboxes,
            cells,
            control,
            events,
        },
        threads,
    ))
}

/// What a shard keeps per id: the entity while it exists, and the positions of its events
/// still in the log (kept after a delete, for history).
struct Slot {
    /// Holds the id (the table's key) even while the entity does not exist; revision 0 then.
    entity: Entity,
    history: History,
}

impl Slot {
    fn new(id: &str) -> Self {
        Slot {
            entity: Entity::new(id, 0, 0),
            history: History::Empty,
        }
    }

    fn exists(&self) -> bool {
        self.entity.revision != 0
    }
}

/// The existing entities in id order, as indexes of their buckets in the shard's table
/// (4 bytes each, no copy of the ids): a listing reads each entity straight from its bucket.
///
/// Valid only while no bucket moves. The table moves buckets when it grows or rehashes (only
/// ever inside an insert made with no room left) and frees or moves them when history is
/// forgotten (`retain`, then maybe a shrink); the shard drops its [`Order`] before either
/// ([`slot_in`], [`Shard::forget_history_before`]).
struct SortedIds {
    buckets: Vec<u32>,
}

impl SortedIds {
    fn build(slots: &HashTable<Slot>, entities: usize) -> Self {
        let mut ids: Vec<(&str, u32)> = Vec::with_capacity(entities);
        ids.extend(slots.iter_buckets().filter_map(|bucket| {
            let slot = slots.get_bucket(bucket)?;
            slot.exists().then(|| (slot.entity.id(), bucket as u32))
        }));
        ids.sort_unstable_by(|a, b| a.0.cmp(b.0));
        SortedIds {
            buckets: ids.into_iter().map(|(_, bucket)| bucket).collect(),
        }
    }

    fn len(&self) -> usize {
        self.buckets.len()
    }

    fn get<'a>(&self, slots: &'a HashTable<Slot>, index: usize) -> Option<&'a Slot> {
        slots.get_bucket(self.buckets[index] as usize)
    }

    fn id<'a>(&self, slots: &'a HashTable<Slot>, index: usize) -> &'a str {
        self.get(slots, index).map_or("", |s| s.entity.id())
    }

    /// The first index whose id is not `before` (ids are sorted, so `before` holds for a prefix).
    fn first_not(&self, slots: &HashTable<Slot>, before: impl Fn(&str) -> bool) -> usize {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if before(self.id(slots, mid)) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    /// Entries from where `query` starts (after `query.after`, at `query.prefix`) while their
    /// ids carry the prefix, in order.
    fn from<'a>(
        &'a self,
        slots: &'a HashTable<Slot>,
        query: &'a ListQuery,
    ) -> impl Iterator<Item = Candidate<'a>> + 'a {
        let prefix: &str = &query.prefix;
        let first = match query.after.as_deref() {
            Some(after) if after >= prefix => self.first_not(slots, |id| id <= after),
            _ => self.first_not(slots, |id| id < prefix),
        };
        (first..self.len())
            .filter_map(move |i| self.get(slots, i))
            .map(|slot| (slot.entity.id(), Some(slot)))
            .take_while(move |(id, _)| id.starts_with(prefix))
    }
}

/// An id a listing may name, with its slot when already known.
type Candidate<'a> = (&'a str, Option<&'a Slot>);

/// The order listings page through, kept current without re-sorting on every create: ids
/// created since the last sort wait in a small ordered set beside it, and ids deleted since
/// are skipped on read (readers check every entry exists anyway). Either growing past
/// [`Order::rebuild_after`] drops it, to be sorted again at the next listing or idle moment,
/// so creates cost O(log n) amortized even while listings run.
struct Order {
    sorted: SortedIds,
    created: BTreeSet<Box<str>>,
    deleted: usize,
}

impl Order {
    fn rebuild_after(&self) -> usize {
        (self.sorted.len() / 8).max(1024)
    }

    /// Notes a created entity in `order`, dropping it once too much is pending.
    fn created(order: &mut Option<Order>, id: &str) {
        if let Some(o) = order {
            o.created.insert(id.into());
            if o.created.len() > o.rebuild_after() {
                *order = None;
            }
        }
    }

    /// Notes a deleted entity in `order`, dropping it once too much is pending.
    fn deleted(order: &mut Option<Order>, id: &str) {
        if let Some(o) = order {
            o.created.remove(id);
            o.deleted += 1;
            if o.deleted > o.rebuild_after() {
                *order = None;
            }
        }
    }

    /// Candidates for `query`, in id order, each id once; some may name deleted entities.
    fn candidates<'a>(
        &'a self,
        slots: &'a HashTable<Slot>,
        query: &'a ListQuery,
    ) -> impl Iterator<Item = Candidate<'a>> + 'a {
        let prefix: &str = &query.prefix;
        let start = match query.after.as_deref() {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let created = self
            .created
            .range::<str, _>((start, Bound::Unbounded))
            .map(|id| (&**id, None))
            .take_while(move |(id, _)| id.starts_with(prefix));
        MergeSorted {
            a: self.sorted.from(slots, query).peekable(),
            b: created.peekable(),
        }
    }
}

/// Merges two iterators sorted by id, yielding an id present in both once (the first's entry).
struct MergeSorted<'a, A: Iterator<Item = Candidate<'a>>, B: Iterator<Item = Candidate<'a>>> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<'a, A: Iterator<Item = Candidate<'a>>, B: Iterator<Item = Candidate<'a>>> Iterator
    for MergeSorted<'a, A, B>
{
    type Item = Candidate<'a>;

    fn next(&mut self) -> Option<Candidate<'a>> {
        match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) if a.0 < b.0 => self.a.next(),
            (Some(a), Some(b)) if a.0 > b.0 => self.b.next(),
            (Some(_), Some(_)) => {
                self.b.next();
                self.a.next()
            }
            (Some(_), None) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[derive(Default)]
struct Shard {
    index: usize,
    /// One lookup per applied record finds both the entity and its history.
    slots: HashTable<Slot>,
    hasher: DefaultHashBuilder,
    /// Slots whose entity exists.
    entities: usize,
    /// Of them, built-in entities ([`BUILTIN_ID_PREFIX`]).
    builtin_entities: usize,
    /// Event records applied to built-in entities (covered ones included, as the dispatcher
    /// counts them).
    builtin_events: u64,
    /// Sorted ids for listings and prefix scans; `None` until the next listing sorts them.
    order: Option<Order>,
    /// State already includes every record at or below this position (from a snapshot).
    covered: LogPosition,
    observer: Option<Arc<dyn ChangeObserver>>,
    /// Event sources and the accept time of their latest record (for "active publishers").
    sources: ActiveSources,
    /// Slots were freed since the thread was last idle: its heap has pages to give back.
    freed_slots: bool,
}

/// Most event sources one shard tracks for "active publishers": ~34 MiB of table at most (2^21
/// buckets of 17 bytes). Past
/// it, sources not yet tracked are not counted until tracked ones go quiet, so the count is a
/// lower bound there (a publisher id per event would otherwise grow memory without bound).
const ACTIVE_SOURCES_TRACKED: usize = 1 << 20;

/// The event sources a shard has seen lately, by a 64-bit hash of the name (16 bytes each,
/// no copy of the name), with the accept time of each one's latest record.
#[derive(Default)]
struct ActiveSources {
    /// `(hash, accept_ms)`, found by the hash itself.
    seen: HashTable<(u64, u64)>,
    hasher: DefaultHashBuilder,
    /// Accept time of the record that last found the table full and pruned it.
    pruned_full_at_ms: u64,
}

impl ActiveSources {
    /// Tracking by `hasher`, which every shard shares.
    fn new(hasher: DefaultHashBuilder) -> Self {
        ActiveSources {
            hasher,
            ..ActiveSources::default()
        }
    }

    fn saw(&mut self, source: &str, accept_ms: u64) {
        let hash = self.hasher.hash_one(source);
        if let Some(entry) = self.seen.find_mut(hash, |e| e.0 == hash) {
            entry.1 = accept_ms;
            return;
        }
        // Full: drop the sources gone quiet (stats may not have been asked for lately), at
        // most once a second, so a full table of live sources does not cost a sweep per record.
        if self.seen.len() >= ACTIVE_SOURCES_TRACKED
            && accept_ms >= self.pruned_full_at_ms.saturating_add(1000)
        {
            self.pruned_full_at_ms = accept_ms;
            let window = crate::engine::ACTIVE_PUBLISHER_WINDOW.as_millis() as u64;
            let since_ms = accept_ms.saturating_sub(window);
            self.seen.retain(|e| e.1 >= since_ms);
        }
        if self.seen.len() < ACTIVE_SOURCES_TRACKED {
            self.seen.insert_unique(hash, (hash, accept_ms), |e| e.0);
        }
    }

    /// Forgets sources quiet since before `since_ms` (giving the table's room back once
    /// mostly empty) and returns the others' hashes.
    fn seen_since(&mut self, since_ms: u64) -> Vec<u64> {
        self.seen.retain(|e| e.1 >= since_ms);
        if self.seen.len() < self.seen.capacity() / 4 {
            self.seen.shrink_to(0, |e| e.0);
        }
        self.seen.iter().map(|e| e.0).collect()
    }
}

/// A shard thread: handles its inbox in order, each message under the shard's lock. After
/// [`SORT_WHEN_IDLE_FOR`] without work it sorts the ids if creates or deletes dropped the order
/// (records applied in place do not wake it, so it checks on every quiet timeout), then runs
/// `after_idle_work`.
fn run_shard(
    cell: &ShardCell,
    inbox: &flume::Receiver<ShardWork>,
    spin: std::time::Duration,
    after_idle_work: Option<fn()>,
) {
    loop {
        match recv_spinning_timeout(inbox, spin, SORT_WHEN_IDLE_FOR) {
            Ok(work) => cell.handle(work),
            Err(flume::RecvTimeoutError::Timeout) => {
                let mut shard = cell.lock();
                let sort = shard.order.is_none() && shard.entities > 0;
                if sort {
                    // Quiet: sort now so the next listing need not (after a start-up, a
                    // snapshot load, or many creates).
                    shard.sort_ids();
                }
                let freed = std::mem::take(&mut shard.freed_slots);
                drop(shard);
                if let Some(hook) = after_idle_work.filter(|_| sort || freed) {
                    hook();
                }
            }
            Err(flume::RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Shard {
    fn find(&self, id: &str) -> Option<&Slot> {
        let hash = self.hasher.hash_one(id);
        self.slots
            .find(hash, |s| s.entity.id_bytes() == id.as_bytes())
    }

    fn entity(&self, id: &str) -> Option<&Entity> {
        self.find(id).filter(|s| s.exists()).map(|s| &s.entity)
    }

    /// The slot for `id`, created empty if new.
    fn slot(&mut self, id: &str) -> &mut Slot {
        slot_in(&mut self.slots, &self.hasher, &mut self.order, id)
    }

    /// Sorts the ids if a create or delete dropped them.
    fn sort_ids(&mut self) {
        if self.order.is_none() {
            self.order = Some(Order {
                sorted: SortedIds::build(&self.slots, self.entities),
                created: BTreeSet::new(),
                deleted: 0,
            });
        }
    }

    /// Ids of existing entities matching `query`, in order, at most `query.limit`
    /// (after [`Shard::sort_ids`]).
    fn matching<'a>(&'a self, query: &'a ListQuery) -> Vec<&'a Entity> {
        let Some(order) = &self.order else {
            return Vec::new();
        };
        order
            .candidates(&self.slots, query)
            .filter_map(|(id, slot)| match slot {
                Some(slot) => slot.exists().then_some(&slot.entity),
                None => self.entity(id),
            })
            .take(query.limit)
            .collect()
    }

    fn handle(&mut self, work: ShardWork) {
        match work {
            ShardWork::Apply {
                frame,
                indexes,
                completion,
            } => {
                self.apply(&frame, &indexes);
                if let Some(c) = completion {
                    c.part_done();
                }
            }
            ShardWork::Load { entities, covered } => {
                self.covered = self.covered.max(covered);
                self.order = None;
                for entity in entities {
                    let slot = self.slot(entity.id());
                    let existed = slot.exists();
                    slot.entity = entity;
                    let exists = slot.exists();
                    let builtin = entity_is_builtin(slot.entity.id());
                    self.entities = self.entities + usize::from(exists) - usize::from(existed);
                    if builtin {
                        self.builtin_entities =
                            self.builtin_entities + usize::from(exists) - usize::from(existed);
                    }
                }
            }
            ShardWork::Get { id, reply } => {
                let json = self.entity(&id).map(|e| {
                    let mut out = Vec::with_capacity(128);
                    e.write_json(&mut out);
                    out
                });
                let _ = reply.send(json);
            }
            ShardWork::List { query, reply } => {
                self.sort_ids();
                let mut page = ListedPage::default();
                for entity in self.matching(&query) {
                    page.push(entity);
                }
                let _ = reply.send(page);
            }
            ShardWork::Ids { query, reply } => {
                self.sort_ids();
                let ids = self
                    .matching(&query)
                    .into_iter()
                    .map(|e| Arc::from(e.id()))
                    .collect();
                let _ = reply.send(ids);
            }
            ShardWork::NamespaceCounts { reply } => {
                // A scan, not the sorted ids: the directory asks every few seconds and building
                // them would keep a copy of every id alive.
                let mut counts: HashMap<&str, usize> = HashMap::new();
                for slot in self.slots.iter().filter(|s| s.exists()) {
                    if let Some((namespace, _)) = slot.entity.id().split_once('/') {
                        *counts.entry(namespace).or_insert(0) += 1;
                    }
                }
                let mut counts: Vec<(Box<str>, usize)> = counts
                    .into_iter()
                    .map(|(namespace, n)| (namespace.into(), n))
                    .collect();
                counts.sort_unstable();
                let _ = reply.send(counts);
            }
            ShardWork::Count { query, reply } => {
                self.sort_ids();
                let _ = reply.send(self.matching(&query).len());
            }
            ShardWork::Contains { ids, reply } => {
                let _ = reply.send(ids.iter().map(|id| self.entity(id).is_some()).collect());
            }
            ShardWork::History { id, limit, reply } => {
                let positions = self
                    .find(&id)
                    .map(|s| s.history.newest(limit))
                    .unwrap_or_default();
                let _ = reply.send(positions);
            }
            ShardWork::ForgetHistoryBefore { first_kept } => {
                self.forget_history_before(first_kept);
            }
            ShardWork::Snapshot(job) => {
                let entities = self.slots.iter().filter(|s| s.exists()).map(|s| &s.entity);
                job.write_part(self.index, entities);
            }
            ShardWork::Stats {
                active_since_ms,
                reply,
            } => {
                let stats = ShardStats {
                    entities: self.entities - self.builtin_entities,
                    deleted_ids: self.slots.len() - self.entities,
                    builtin_events: self.builtin_events,
                    active_sources: self.sources.seen_since(active_since_ms),
                };
                let _ = reply.send(stats);
            }
        }
    }

    fn apply(&mut self, frame: &Frame, indexes: &[u32]) {
        // A record's properties, taken from the decoding walk for the tombstone check and the
        // merge (each would otherwise walk the record again); one buffer for the whole frame.
        let mut properties: Vec<(&str, &str)> = Vec::new();
        // Accept times from here on count as recent publishing (read once, if needed).
        let mut recent_since: Option<u64> = None;
        for &index in indexes {
            let position = frame.first_position + u64::from(index);
            let record = match frame.record_into(index as usize, &mut properties) {
                Ok(record) => record,
                Err(error) => {
                    // The frame passed its checksum, so this is a bug, not bad input.
                    tracing::error!(position, %error, shard = self.index, "undecodable record skipped");
                    continue;
                }
            };
            let id = record.fields.entity_id;
            let builtin = entity_is_builtin(id);
            self.builtin_events += u64::from(builtin);
            let covered = position <= self.covered;
            let accept_ms = frame.accept_time_ms;
            let slot = slot_in(&mut self.slots, &self.hasher, &mut self.order, id);
            slot.history.push(position);
            let publisher = !record.fields.stream.starts_with(INTERNAL_STREAM_PREFIX);
            if covered {
                // A restart still knows who published within the window: a covered record
                // that recent counts its source as a live one does.
                let recent_since = *recent_since.get_or_insert_with(|| {
                    let window = crate::engine::ACTIVE_PUBLISHER_WINDOW.as_millis() as u64;
                    crate::engine::now_ms().saturating_sub(window)
                });
                if publisher && accept_ms >= recent_since {
                    self.sources.saw(record.fields.source, accept_ms);
                }
                continue;
            }
            let tombstone = properties
                .iter()
                .any(|&(name, value)| is_tombstone_property(name, value));
            let change = if tombstone {
                if slot.exists() {
                    slot.entity.clear_properties();
                    slot.entity.set_last_updated_ms(0);
                    slot.entity.revision = 0;
                    self.entities -= 1;
                    self.builtin_entities -= usize::from(builtin);
                    Order::deleted(&mut self.order, id);
                    Some(false)
                } else {
                    None
                }
            } else {
                if !slot.exists() {
                    self.entities += 1;
                    self.builtin_entities += usize::from(builtin);
                    Order::created(&mut self.order, id);
                }
                slot.entity.merge_properties(properties.iter().copied());
                slot.entity.set_last_updated_ms(accept_ms);
                slot.entity.revision = position;
                Some(true)
            };
            // Flux's own writes (`flux.*` streams: deletes, the directory) are not publishers.
            if publisher {
                self.sources.saw(record.fields.source, accept_ms);
            }
            if let Some(observer) = &self.observer {
                match change {
                    Some(true) => observer.entity_updated(id, accept_ms, record.properties()),
                    Some(false) => observer.entity_deleted(id, accept_ms),
                    None => {}
                }
            }
        }
    }

    fn forget_history_before(&mut self, first_kept: LogPosition) {
        let before = self.slots.len();
        self.slots.retain(|slot| {
            slot.history.forget_before(first_kept);
            !slot.history.is_empty() || slot.exists()
        });
        if self.slots.len() != before {
            // Freed buckets may be reused by other ids: the sorted buckets no longer hold.
            self.order = None;
            self.freed_slots = true;
            // The table never shrinks by itself: after a churn of short-lived ids it would
            // keep their buckets for good.
            if self.slots.len() < self.slots.capacity() / 4 {
                let hasher = &self.hasher;
                self.slots.shrink_to(0, |s| hasher.hash_one(s.entity.id()));
            }
        }
    }
}

/// Whether `id` names a built-in entity ([`BUILTIN_ID_PREFIX`]).
pub fn entity_is_builtin(id: &str) -> bool {
    id.starts_with(BUILTIN_ID_PREFIX)
}

/// The slot for `id` in `slots`, created empty if new: the one way slots are inserted. With no
/// room left the insert grows or rehashes the table, which moves buckets, so `order` (sorted
/// bucket indexes) is dropped first.
fn slot_in<'a>(
    slots: &'a mut HashTable<Slot>,
    hasher: &DefaultHashBuilder,
    order: &mut Option<Order>,
    id: &str,
) -> &'a mut Slot {
    if slots.len() == slots.capacity() {
        *order = None;
    }
    slots
        .entry(
            hasher.hash_one(id),
            |s| s.entity.id_bytes() == id.as_bytes(),
            |s| hasher.hash_one(s.entity.id()),
        )
        .or_insert_with(|| Slot::new(id))
        .into_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_ids_are_the_built_in_namespace() {
        assert_eq!(BUILTIN_ID_PREFIX, format!("{BUILTIN_NAMESPACE}/"));
        assert!(entity_is_builtin("flux-core/directory"));
        assert!(!entity_is_builtin("flux-core") && !entity_is_builtin("flux-corex/a"));
    }

    #[test]
    fn a_slot_stays_40_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
    }

    fn query(prefix: &str, after: Option<&str>, limit: usize) -> ListQuery {
        ListQuery {
            prefix: prefix.into(),
            after: after.map(Box::from),
            limit,
        }
    }

    fn ids(shard: &mut Shard, q: &ListQuery) -> Vec<String> {
        shard.sort_ids();
        shard
            .matching(q)
            .into_iter()
            .map(|e| e.id().to_string())
            .collect()
    }

    /// A frame at `position` holding one record of `id`: an update, or a tombstone.
    fn change(id: &str, exists: bool, position: u64) -> Frame {
        let fields = crate::record::EventFields {
            event_id: crate::record::EventId::Text("e"),
            stream: "test",
            source: "test",
            timestamp: 0,
            entity_id: id,
            key: None,
            schema: None,
        };
        let properties: &[(&str, &str)] = if exists {
            &[("v", "1")]
        } else {
            &[("__deleted__", "true")]
        };
        let mut batch = crate::record::RecordBatch::with_capacity(64, 1);
        batch.push_event(0, &fields, properties.iter().copied());
        Frame::from_batch(position, 1, batch)
    }

    /// Creates (an update) or deletes (a tombstone) `id` by applying a record at `position`.
    fn set_exists(shard: &mut Shard, id: &str, exists: bool, position: u64) {
        shard.apply(&change(id, exists, position), &[0]);
    }

    /// A dispatcher over one shard without a thread: the test takes the inbox and plays the
    /// shard thread itself.
    fn unthreaded() -> (Dispatcher, Arc<ShardCell>, flume::Receiver<ShardWork>) {
        let (tx, rx) = flume::bounded(SHARD_INBOX_CAPACITY);
        let cell = ShardCell::new(Shard::default());
        let dispatcher = Dispatcher {
            inboxes: vec![tx],
            cells: vec![cell.clone()],
            control: Arc::default(),
            events: Arc::default(),
        };
        (dispatcher, cell, rx)
    }

    /// A frame at `position` holding one update of `id`.
    fn update(id: &str, position: u64) -> Arc<Frame> {
        Arc::new(change(id, true, position))
    }

    fn revision(cell: &ShardCell, id: &str) -> Option<u64> {
        cell.lock().entity(id).map(|e| e.revision)
    }

    #[test]
    fn in_place_applies_never_overtake_queued_work() {
        let (dispatcher, cell, inbox) = unthreaded();
        // Idle: applied at once, and the append's completion fires here.
        let (completion, done) = Completion::new();
        dispatcher.dispatch_in_place(update("a", 1), &[0], Some(completion));
        assert_eq!(revision(&cell, "a"), Some(1));
        assert!(inbox.is_empty());
        assert_eq!(done.blocking_recv().expect("completion"), Ok(1));

        // A record waits in the inbox: the next one must queue behind it, not jump it.
        dispatcher.dispatch(update("a", 2), &[0], None);
        dispatcher.dispatch_in_place(update("a", 3), &[0], None);
        assert_eq!(revision(&cell, "a"), Some(1));
        assert_eq!(inbox.len(), 2);
        while let Ok(work) = inbox.try_recv() {
            cell.handle(work);
        }
        assert_eq!(revision(&cell, "a"), Some(3));

        // A read waiting in the inbox counts as well (it must see the state before).
        let (reply, _answer) = oneshot::channel();
        dispatcher.send(
            0,
            ShardWork::Get {
                id: "a".into(),
                reply,
            },
        );
        dispatcher.dispatch_in_place(update("a", 4), &[0], None);
        assert_eq!(inbox.len(), 2);
        while let Ok(work) = inbox.try_recv() {
            cell.handle(work);
        }
        assert_eq!(revision(&cell, "a"), Some(4));

        // The shard thread holds the shard (handling something): queue.
        let held = cell.lock();
        dispatcher.dispatch_in_place(update("a", 5), &[0], None);
        drop(held);
        assert_eq!(inbox.len(), 1);
        cell.handle(inbox.try_recv().expect("queued"));
        assert_eq!(revision(&cell, "a"), Some(5));

        // Idle again: in place.
        dispatcher.dispatch_in_place(update("a", 6), &[0], None);
        assert_eq!(revision(&cell, "a"), Some(6));
        assert!(inbox.is_empty());
    }

    /// [`set_exists`], and the same change to the `oracle` of existing ids.
    fn set_in_both(
        shard: &mut Shard,
        oracle: &mut BTreeSet<String>,
        id: String,
        exists: bool,
        position: u64,
    ) {
        set_exists(shard, &id, exists, position);
        if exists {
            oracle.insert(id);
        } else {
            oracle.remove(&id);
        }
    }

    /// Once the log drops the history of a churn of deleted ids, the shard forgets them and
    /// its table gives their buckets back; listings stay exact.
    #[test]
    fn forgetting_deleted_ids_shrinks_the_table() {
        let mut shard = Shard::default();
        for i in 0..10_000 {
            set_exists(&mut shard, &format!("gone/{i}"), true, i + 1);
            set_exists(&mut shard, &format!("gone/{i}"), false, 10_000 + i + 1);
        }
        set_exists(&mut shard, "kept", true, 30_000);
        assert_eq!(ids(&mut shard, &query("", None, 10)), ["kept"]);
        let grown = shard.slots.capacity();
        shard.forget_history_before(19_001);
        assert_eq!(
            shard.slots.len(),
            1001,
            "those deleted at 19,001..=20,000 keep history"
        );
        shard.forget_history_before(25_000);
        assert_eq!(shard.slots.len(), 1);
        assert!(
            shard.slots.capacity() < grown / 100,
            "{grown} -> {}",
            shard.slots.capacity()
        );
        assert!(shard.freed_slots);
        assert_eq!(ids(&mut shard, &query("", None, 10)), ["kept"]);
        set_exists(&mut shard, "new", true, 30_001);
        assert_eq!(ids(&mut shard, &query("", None, 10)), ["kept", "new"]);
    }

    /// Sources are counted once per name across shards (one shared hasher), forgotten once
    /// quiet, and never tracked past the cap: a table full of live sources stays full, and one
    /// of quiet ones is pruned for the newcomer.
    #[test]
    fn active_sources_are_joined_across_shards_and_bounded() {
        let hasher = DefaultHashBuilder::default();
        let (mut one, mut two) = (
            ActiveSources::new(hasher.clone()),
            ActiveSources::new(hasher),
        );
        one.saw("agent-a", 1_000);
        one.saw("agent-b", 2_000);
        two.saw("agent-a", 3_000);
        one.saw("agent-a", 4_000);
        let mut all: BTreeSet<u64> = one.seen_since(0).into_iter().collect();
        all.extend(two.seen_since(0));
        assert_eq!(all.len(), 2);
        assert_eq!(one.seen_since(3_000).len(), 1, "agent-b went quiet");

        let mut full = ActiveSources::new(DefaultHashBuilder::default());
        for i in 0..ACTIVE_SOURCES_TRACKED {
            full.saw(&i.to_string(), 10_000);
        }
        full.saw("one more", 10_500);
        assert_eq!(
            full.seen.len(),
            ACTIVE_SOURCES_TRACKED,
            "all live: the newcomer waits"
        );
        let later = 10_000 + crate::engine::ACTIVE_PUBLISHER_WINDOW.as_millis() as u64 + 1;
        full.saw("one more", later);
        assert_eq!(full.seen_since(0).len(), 1, "the quiet ones pruned for it");
    }

    #[test]
    fn sorted_ids_page_by_prefix_and_after() {
        let mut shard = Shard::default();
        for (i, id) in ["b/2", "a/1", "b/1", "c", "b/10"].into_iter().enumerate() {
            set_exists(&mut shard, id, true, i as u64 + 1);
        }
        shard.slot("b/0");
        assert_eq!(
            ids(&mut shard, &query("", None, 10)),
            ["a/1", "b/1", "b/10", "b/2", "c"]
        );
        assert_eq!(ids(&mut shard, &query("b/", None, 2)), ["b/1", "b/10"]);
        assert_eq!(ids(&mut shard, &query("b/", Some("b/10"), 10)), ["b/2"]);
        assert_eq!(
            ids(&mut shard, &query("b/", Some("a"), 10)),
            ["b/1", "b/10", "b/2"]
        );
        assert_eq!(ids(&mut shard, &query("d", None, 10)), Vec::<String>::new());
    }

    /// The sorted buckets survive neither growth, nor an in-place rehash, nor a `retain` that
    /// frees buckets other ids then take: listings stay exact through all three.
    #[test]
    fn listings_stay_exact_when_buckets_move() {
        let mut shard = Shard::default();
        let mut oracle = BTreeSet::new();
        let all = |shard: &mut Shard| ids(shard, &query("", None, usize::MAX));
        let mut revision = 0;
        let mut set = |shard: &mut Shard, oracle: &mut BTreeSet<String>, id: String, on: bool| {
            revision += 1;
            set_in_both(shard, oracle, id, on, revision);
        };
        for round in 0..4 {
            // Grow: every listing between creates must match.
            for i in 0..3000 {
                set(&mut shard, &mut oracle, format!("r{round}/{i:04}"), true);
                if i % 500 == 0 {
                    assert_eq!(all(&mut shard), oracle.iter().cloned().collect::<Vec<_>>());
                }
            }
            // Sort, then delete a few (fewer than a rebuild needs, so the sorted buckets still
            // name them) and free their slots (no history): other ids take those buckets next.
            assert_eq!(all(&mut shard), oracle.iter().cloned().collect::<Vec<_>>());
            for i in (0..3000).filter(|i| i % 10 == 0) {
                set(&mut shard, &mut oracle, format!("r{round}/{i:04}"), false);
            }
            shard.forget_history_before(u64::MAX);
            for i in 0..300 {
                set(
                    &mut shard,
                    &mut oracle,
                    format!("r{round}/new-{i:03}"),
                    true,
                );
                if i % 50 == 0 {
                    assert_eq!(all(&mut shard), oracle.iter().cloned().collect::<Vec<_>>());
                }
            }
        }
        assert_eq!(shard.entities, oracle.len());
    }

    /// Creates and deletes between pages (and past the rebuild threshold) never make a listing
    /// name a missing entity, miss an existing one, or repeat one.
    #[test]
    fn listings_stay_exact_while_entities_come_and_go() {
        let mut shard = Shard::default();
        let mut oracle = BTreeSet::new();
        let mut revision = 0;
        let mut step = |shard: &mut Shard, oracle: &mut BTreeSet<String>, n: u64| {
            // A deterministic mix: ids reused across creates and deletes.
            let id = format!("ns/{:05}", (n * 7919) % 6000);
            let exists = !n.is_multiple_of(5);
            revision += 1;
            set_in_both(shard, oracle, id, exists, revision);
        };
        for n in 0..3000 {
            step(&mut shard, &mut oracle, n);
        }
        let mut n = 3000;
        for round in 0..6 {
            // Page through everything while entities keep changing between pages.
            let mut listed = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = ids(&mut shard, &query("ns/", after.as_deref(), 97));
                let Some(last) = page.last().cloned() else {
                    break;
                };
                for id in &page {
                    assert!(shard.entity(id).is_some(), "listed {id} does not exist");
                }
                listed.extend(page);
                after = Some(last);
                for _ in 0..(40 * round) {
                    step(&mut shard, &mut oracle, n);
                    n += 1;
                }
            }
            let mut sorted = listed.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted, listed, "a listing is sorted and names each id once");
            // With no changes between pages the listing is exactly the oracle.
            let all = ids(&mut shard, &query("", None, usize::MAX));
            assert_eq!(all, oracle.iter().cloned().collect::<Vec<_>>());
        }
    }
}
