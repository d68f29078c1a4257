//! Events other nodes wrote into a shared log, per namespace, over the last minute: what a
//! node adds to its own count when it rate-limits a namespace that several nodes take writes
//! for.
//!
//! Each node counts what it admits itself (`flux_ingress`'s rate limiter); what the others
//! admitted it learns from the stream it tails, where their writes arrive in order with their
//! accept time. So a namespace's limit holds across nodes up to what the other nodes have in
//! flight (admitted, not yet applied here: about one request per concurrent writer), with no
//! messages of its own and no coordination beyond the stream.
//!
//! Invariants: counts are kept in one-second buckets by accept time and only for the last
//! [`WINDOW_SECONDS`]; a namespace whose buckets all aged out is dropped (looked for at most
//! once a second, not per frame), so memory follows the namespaces written in the last minute.
//! A frame is counted as a whole under one lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::record::{CONTROL_OWNER, Frame};
use crate::shard::shard_of;

/// How far back peers' writes count: the rate limit's minute.
pub const WINDOW_SECONDS: u64 = 60;

/// Events of other nodes that stop counting together: in `in_ms`, `events` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiring {
    pub in_ms: u64,
    pub events: u64,
}

/// `(second, events)` buckets of one namespace, oldest first.
type Buckets = VecDeque<(u64, u64)>;

/// Peers' events per namespace in one-second buckets.
#[derive(Default)]
pub struct PeerWrites {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    namespaces: HashMap<Box<str>, Buckets>,
    /// The second (of `now`) in which aged-out namespaces were last dropped.
    swept_second: u64,
}

impl PeerWrites {
    /// The owning shard of each record of `frame` (as [`super::local::owners_of`]), counting
    /// its events, written by another node, under their namespaces (the part of the id before
    /// its first `/`; ids without one count nowhere) on the way: one decode of each record
    /// serves both. A frame accepted more than a window before `now_ms` is not counted.
    pub fn owners_noting(&self, frame: &Frame, shards: usize, now_ms: u64) -> Vec<u16> {
        let mut owners = Vec::with_capacity(frame.len());
        self.count(frame, now_ms, |id| {
            owners.push(id.map_or(CONTROL_OWNER, |id| shard_of(id, shards)));
        });
        owners
    }

    /// Counts `frame` as [`PeerWrites::owners_noting`] does, without the owners; a frame too
    /// old to count is not decoded.
    pub fn note(&self, frame: &Frame, now_ms: u64) {
        if Self::recent(frame, now_ms) {
            self.count(frame, now_ms, |_| {});
        }
    }

    fn recent(frame: &Frame, now_ms: u64) -> bool {
        frame.accept_time_ms / 1000 + WINDOW_SECONDS > now_ms / 1000
    }

    /// Decodes each record once, counting the recent ones under their namespaces; `each` sees
    /// every record's entity id (`None` for a control record).
    fn count(&self, frame: &Frame, now_ms: u64, mut each: impl FnMut(Option<&str>)) {
        let recent = Self::recent(frame, now_ms);
        let mut runs: Vec<(&str, u64)> = Vec::new();
        for index in 0..frame.len() {
            let id = frame
                .record(index)
                .ok()
                .map(|record| record.fields.entity_id);
            if let (true, Some(id)) = (recent, id) {
                count_into(&mut runs, id);
            }
            each(id);
        }
        self.add(frame, now_ms, runs);
    }

    /// Adds one frame's counts per namespace (counted per namespace before the lock is taken:
    /// a frame's events are mostly of one) under the lock, and drops what aged out.
    fn add(&self, frame: &Frame, now_ms: u64, runs: Vec<(&str, u64)>) {
        if runs.is_empty() {
            return;
        }
        let second = frame.accept_time_ms / 1000;
        let oldest = (now_ms / 1000).saturating_sub(WINDOW_SECONDS - 1);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (namespace, events) in runs {
            let buckets = counts.namespaces.entry(namespace.into()).or_default();
            while buckets.front().is_some_and(|(s, _)| *s < oldest) {
                buckets.pop_front();
            }
            match buckets.iter_mut().rev().find(|(s, _)| *s == second) {
                Some((_, counted)) => *counted += events,
                None => {
                    // Accept times of different nodes interleave by up to their clock
                    // difference: keep the buckets in order.
                    let at = buckets.partition_point(|(s, _)| *s < second);
                    buckets.insert(at, (second, events));
                }
            }
        }
        if counts.swept_second != now_ms / 1000 {
            counts.swept_second = now_ms / 1000;
            counts.namespaces.retain(|_, buckets| {
                while buckets.front().is_some_and(|(s, _)| *s < oldest) {
                    buckets.pop_front();
                }
                !buckets.is_empty()
            });
        }
    }

    /// Peers' events in `namespace` accepted in the [`WINDOW_SECONDS`] up to `now_ms`.
    pub fn events(&self, namespace: &str, now_ms: u64) -> u64 {
        self.expiring(namespace, now_ms)
            .iter()
            .map(|e| e.events)
            .sum()
    }

    /// The same events, per second of acceptance, soonest to stop counting first: when they
    /// stop counting, for a limiter's `Retry-After`.
    pub fn expiring(&self, namespace: &str, now_ms: u64) -> Vec<Expiring> {
        let oldest = (now_ms / 1000).saturating_sub(WINDOW_SECONDS - 1);
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .namespaces
            .get(namespace)
            .map_or_else(Vec::new, |buckets| {
                buckets
                    .iter()
                    .filter(|(s, _)| *s >= oldest)
                    .map(|&(second, events)| Expiring {
                        in_ms: ((second + WINDOW_SECONDS) * 1000).saturating_sub(now_ms),
                        events,
                    })
                    .collect()
            })
    }
}

/// Counts `id` under its namespace in `runs`.
fn count_into<'a>(runs: &mut Vec<(&'a str, u64)>, id: &'a str) {
    let Some((namespace, _)) = id.split_once('/') else {
        return;
    };
    match runs.iter_mut().find(|(n, _)| *n == namespace) {
        Some((_, events)) => *events += 1,
        None => runs.push((namespace, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{EventFields, EventId, RecordBatch};

    fn frame(accept_ms: u64, ids: &[&str]) -> Frame {
        let mut batch = RecordBatch::with_capacity(256, ids.len());
        for id in ids {
            let fields = EventFields {
                event_id: EventId::Text("e"),
                stream: "s",
                source: "src",
                timestamp: 1,
                entity_id: id,
                key: None,
                schema: None,
            };
            batch.push_event(0, &fields, [("v", "1")].into_iter());
        }
        Frame::from_batch(1, accept_ms, batch)
    }

    #[test]
    fn counts_a_minute_of_peers_events_per_namespace() {
        let peers = PeerWrites::default();
        let t = 1_000_000_000;
        peers.owners_noting(
            &frame(t, &["acme/a", "acme/b", "beta/x", "nonamespace"]),
            1,
            t,
        );
        peers.note(&frame(t + 30_000, &["acme/c"]), t + 30_000);
        assert_eq!(peers.events("acme", t + 30_000), 3);
        assert_eq!(peers.events("beta", t + 30_000), 1);
        assert_eq!(peers.events("nonamespace", t + 30_000), 0);
        // A minute on, the first frame no longer counts; later, nothing does and the
        // namespaces are forgotten.
        assert_eq!(peers.events("acme", t + 60_000), 1);
        assert_eq!(peers.events("beta", t + 60_000), 0);
        peers.note(&frame(t + 200_000, &["gamma/a"]), t + 200_000);
        assert_eq!(peers.counts.lock().unwrap().namespaces.len(), 1);
        // Replayed frames older than the window are not counted at all.
        peers.note(&frame(t, &["acme/old"]), t + 200_000);
        assert_eq!(peers.events("acme", t + 200_000), 0);
        // A frame accepted a little earlier than the newest (another node's clock) is kept in
        // order and counted.
        peers.note(&frame(t + 199_000, &["gamma/b"]), t + 200_000);
        assert_eq!(peers.events("gamma", t + 200_000), 2);
        assert_eq!(peers.events("gamma", t + 258_500), 2);
        assert_eq!(peers.events("gamma", t + 259_000), 1);
        assert_eq!(
            peers.expiring("gamma", t + 258_500),
            [
                Expiring {
                    in_ms: 500,
                    events: 1
                },
                Expiring {
                    in_ms: 1500,
                    events: 1
                }
            ]
        );
    }

    #[test]
    fn owners_noting_gives_the_owners_and_counts_in_one_pass() {
        let peers = PeerWrites::default();
        let t = 1_000_000_000;
        let ids = ["acme/a", "beta/b", "acme/c", "x"];
        let f = frame(t, &ids);
        assert_eq!(
            peers.owners_noting(&f, 4, t),
            crate::log::local::owners_of(&f, 4)
        );
        assert_eq!(peers.events("acme", t), 2);
        assert_eq!(peers.events("beta", t), 1);
        // An old frame's owners still come back; nothing is counted.
        let old = frame(t - 61_000, &ids);
        assert_eq!(peers.owners_noting(&old, 4, t).len(), 4);
        assert_eq!(peers.events("acme", t), 2);
    }
}
