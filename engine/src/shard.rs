//! Shard workers: each runs on its own thread and alone owns the entities routed to it.
//!
//! Invariants:
//! - An entity lives in exactly one shard, chosen by [`shard_of`] (a hash of its id); nothing
//!   else reads or writes a shard's maps — other threads send [`ShardWork`] and await replies.
//! - Records are applied in log order: the log dispatches frames from one thread and every
//!   inbox is FIFO. `last_updated_ms` is the record's accept time, `revision` its position.
//! - Records at or below `covered` (the snapshot the shard was loaded from) only feed the
//!   history index; their effect on state is already in the snapshot.
//! - Inboxes are bounded ([`SHARD_INBOX_CAPACITY`]); a full inbox makes the sender wait.
//! - After applying a live record (not one a snapshot already covered) the shard tells its
//!   [`ChangeObserver`], on the shard thread, in log order.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::HashMap;
use tokio::sync::oneshot;

use crate::control::{ControlChange, ControlState};
use crate::entity::Entity;
use crate::record::{CONTROL_OWNER, Frame, LogPosition, PropertyIter};
use crate::snapshot::SnapshotJob;

/// Event positions remembered per entity: a history query returns at most this many (newest
/// first), so older positions could never be asked for. Bounds the index to this many per id
/// however long the retention.
pub const HISTORY_KEPT_PER_ENTITY: usize = 500;

/// Streams of records Flux writes itself (API deletes, the directory).
pub const INTERNAL_STREAM_PREFIX: &str = "flux.";

/// Messages a shard's inbox holds before senders wait (backpressure, never dropped).
pub const SHARD_INBOX_CAPACITY: usize = 1024;

/// The shard that owns `entity_id` among `shards` shards.
pub fn shard_of(entity_id: &str, shards: usize) -> u16 {
    // CRC32C runs in hardware and spreads ids evenly enough for routing.
    (crc32c::crc32c(entity_id.as_bytes()) as usize % shards) as u16
}

/// Fires once every shard that received part of an append has applied it.
pub struct Completion {
    remaining: AtomicUsize,
    first_position: AtomicU64,
    sender: Mutex<Option<oneshot::Sender<Result<LogPosition, String>>>>,
}

impl Completion {
    /// A completion and the receiver its result arrives on (first position, or why not).
    pub fn new() -> (Arc<Self>, oneshot::Receiver<Result<LogPosition, String>>) {
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
        self.send(Err(reason));
    }

    fn send(&self, result: Result<LogPosition, String>) {
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

/// One entity in a page of a listing: its id and its rendered JSON object.
pub type ListedEntity = (Arc<str>, Vec<u8>);

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
    pub entities: usize,
    /// Event sources seen since the time the stats were asked for.
    pub active_sources: Vec<Arc<str>>,
}

/// Told about every applied change by the shard that owns the entity, on the shard's thread
/// and in log order, so implementations must be quick and must not block.
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
        entities: Vec<(Box<str>, Entity)>,
        covered: LogPosition,
    },
    Get {
        id: Box<str>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    List {
        query: ListQuery,
        reply: oneshot::Sender<Vec<ListedEntity>>,
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
    /// Write this shard's part of a snapshot; history below `forget_before` is dropped.
    Snapshot {
        job: Arc<SnapshotJob>,
        forget_before: LogPosition,
    },
    /// Counters; sources last seen before `active_since_ms` are forgotten.
    Stats {
        active_since_ms: u64,
        reply: oneshot::Sender<ShardStats>,
    },
}

/// Sends work to the shards; the log holds one to dispatch frames in order.
#[derive(Clone)]
pub struct Dispatcher {
    inboxes: Vec<flume::Sender<ShardWork>>,
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
        // A closed inbox means the engine is shutting down; the work is moot.
        let _ = self.inboxes[shard].send(work);
    }

    /// Sends `work` to `shard`, waiting asynchronously while its inbox is full.
    pub async fn send_async(&self, shard: usize, work: ShardWork) {
        let _ = self.inboxes[shard].send_async(work).await;
    }
}

/// Starts `count` shard threads without an observer; see [`start_observed_shards`].
pub fn start_shards(
    count: usize,
) -> std::io::Result<(Dispatcher, Vec<std::thread::JoinHandle<()>>)> {
    start_observed_shards(count, None)
}

/// Starts `count` shard threads that report changes to `observer`; returns the dispatcher and
/// their join handles.
pub fn start_observed_shards(
    count: usize,
    observer: Option<Arc<dyn ChangeObserver>>,
) -> std::io::Result<(Dispatcher, Vec<std::thread::JoinHandle<()>>)> {
    let mut inboxes = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    for index in 0..count {
        let (tx, rx) = flume::bounded(SHARD_INBOX_CAPACITY);
        inboxes.push(tx);
        let shard = Shard {
            index,
            observer: observer.clone(),
            ..Shard::default()
        };
        let handle = std::thread::Builder::new()
            .name(format!("flux-shard-{index}"))
            .spawn(move || shard.run(rx))?;
        threads.push(handle);
    }
    let control = Arc::new(RwLock::new(ControlState::default()));
    let events = Arc::new(AtomicU64::new(0));
    Ok((
        Dispatcher {
            inboxes,
            control,
            events,
        },
        threads,
    ))
}

/// What a shard keeps per id: the entity while it exists, and the positions of its events
/// still in the log (kept after a delete, for history).
#[derive(Default)]
struct Slot {
    entity: Option<Entity>,
    /// Oldest first; at most 2 × [`HISTORY_KEPT_PER_ENTITY`], of which the newest
    /// [`HISTORY_KEPT_PER_ENTITY`] are always present.
    history: Vec<LogPosition>,
}

#[derive(Default)]
struct Shard {
    index: usize,
    /// One lookup per applied record finds both the entity and its history.
    slots: HashMap<Arc<str>, Slot>,
    /// Ids of the slots holding an entity, sorted, for listings and prefix scans.
    order: BTreeSet<Arc<str>>,
    /// State already includes every record at or below this position (from a snapshot).
    covered: LogPosition,
    observer: Option<Arc<dyn ChangeObserver>>,
    /// Event sources and the accept time of their latest record (for "active publishers").
    sources: HashMap<Arc<str>, u64>,
}

impl Shard {
    fn run(mut self, inbox: flume::Receiver<ShardWork>) {
        while let Ok(work) = inbox.recv() {
            self.handle(work);
        }
    }

    fn entity(&self, id: &str) -> Option<&Entity> {
        self.slots.get(id)?.entity.as_ref()
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
                for (id, entity) in entities {
                    let (key, slot) = self.slot(&id);
                    if slot.entity.replace(entity).is_none() {
                        self.order.insert(key);
                    }
                }
            }
            ShardWork::Get { id, reply } => {
                let json = self.entity(&id).map(|e| {
                    let mut out = Vec::with_capacity(128);
                    e.write_json(&mut out, &id);
                    out
                });
                let _ = reply.send(json);
            }
            ShardWork::List { query, reply } => {
                let page = self
                    .matching(&query)
                    .map(|id| {
                        let mut out = Vec::with_capacity(128);
                        if let Some(e) = self.entity(id) {
                            e.write_json(&mut out, id);
                        }
                        (id.clone(), out)
                    })
                    .collect();
                let _ = reply.send(page);
            }
            ShardWork::Ids { query, reply } => {
                let _ = reply.send(self.matching(&query).cloned().collect());
            }
            ShardWork::NamespaceCounts { reply } => {
                // `order` is sorted, so each namespace's ids are contiguous.
                let mut counts: Vec<(Box<str>, usize)> = Vec::new();
                for id in &self.order {
                    let Some((namespace, _)) = id.split_once('/') else {
                        continue;
                    };
                    match counts.last_mut() {
                        Some((last, n)) if **last == *namespace => *n += 1,
                        _ => counts.push((namespace.into(), 1)),
                    }
                }
                let _ = reply.send(counts);
            }
            ShardWork::Count { query, reply } => {
                let _ = reply.send(self.matching(&query).count());
            }
            ShardWork::Contains { ids, reply } => {
                let _ = reply.send(ids.iter().map(|id| self.entity(id).is_some()).collect());
            }
            ShardWork::History { id, limit, reply } => {
                let positions = self
                    .slots
                    .get(&*id)
                    .map(|s| s.history.iter().rev().take(limit).copied().collect())
                    .unwrap_or_default();
                let _ = reply.send(positions);
            }
            ShardWork::Snapshot { job, forget_before } => {
                self.forget_history_before(forget_before);
                let entities = self
                    .order
                    .iter()
                    .filter_map(|id| Some((&**id, self.entity(id)?)));
                job.write_part(self.index, entities);
            }
            ShardWork::Stats {
                active_since_ms,
                reply,
            } => {
                self.sources.retain(|_, seen| *seen >= active_since_ms);
                let stats = ShardStats {
                    entities: self.order.len(),
                    active_sources: self.sources.keys().cloned().collect(),
                };
                let _ = reply.send(stats);
            }
        }
    }

    fn matching<'a>(&'a self, query: &'a ListQuery) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let prefix: &str = &query.prefix;
        let start = match query.after.as_deref() {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.order
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(move |id| id.starts_with(prefix))
            .take(query.limit)
    }

    /// The slot for `id` (created empty if new) and its shared key.
    fn slot(&mut self, id: &str) -> (Arc<str>, &mut Slot) {
        if !self.slots.contains_key(id) {
            self.slots.insert(Arc::from(id), Slot::default());
        }
        let (key, slot) = self.slots.get_key_value_mut(id).expect("inserted above");
        (key.clone(), slot)
    }

    fn apply(&mut self, frame: &Frame, indexes: &[u32]) {
        for &index in indexes {
            let position = frame.first_position + u64::from(index);
            let record = match frame.record(index as usize) {
                Ok(record) => record,
                Err(error) => {
                    // The frame passed its checksum, so this is a bug, not bad input.
                    tracing::error!(position, %error, shard = self.index, "undecodable record skipped");
                    continue;
                }
            };
            let id = record.fields.entity_id;
            let covered = position <= self.covered;
            let accept_ms = frame.accept_time_ms;
            let (key, slot) = match self.slots.get_key_value_mut(id) {
                Some((key, slot)) => (key, slot),
                None => {
                    self.slots.insert(Arc::from(id), Slot::default());
                    self.slots.get_key_value_mut(id).expect("inserted above")
                }
            };
            if slot.history.len() >= 2 * HISTORY_KEPT_PER_ENTITY {
                // Only the newest HISTORY_KEPT_PER_ENTITY can ever be asked for.
                slot.history
                    .drain(..slot.history.len() - HISTORY_KEPT_PER_ENTITY);
            }
            slot.history.push(position);
            if covered {
                continue;
            }
            let change = if record.is_tombstone() {
                match slot.entity.take() {
                    Some(_) => {
                        self.order.remove(id);
                        Some(false)
                    }
                    None => None,
                }
            } else {
                let entity = slot.entity.get_or_insert_with(|| {
                    self.order.insert(key.clone());
                    Entity::new(0, 0)
                });
                entity.merge_properties(record.properties());
                entity.last_updated_ms = accept_ms;
                entity.revision = position;
                Some(true)
            };
            // Flux's own writes (`flux.*` streams: deletes, the directory) are not publishers.
            if !record.fields.stream.starts_with(INTERNAL_STREAM_PREFIX) {
                let source = record.fields.source;
                match self.sources.get_mut(source) {
                    Some(seen) => *seen = accept_ms,
                    None => {
                        self.sources.insert(Arc::from(source), accept_ms);
                    }
                }
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
        self.slots.retain(|_, slot| {
            let cut = slot.history.partition_point(|&p| p < first_kept);
            slot.history.drain(..cut);
            if slot.history.capacity() > 2 * slot.history.len() + 4 {
                slot.history.shrink_to_fit();
            }
            !slot.history.is_empty() || slot.entity.is_some()
        });
    }
}
