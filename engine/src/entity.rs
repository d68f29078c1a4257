//! Entity state as a shard stores it, and property merging.
//!
//! Properties are packed into one allocation per entity (`u32 len | name | u32 len | raw value`,
//! repeated) in first-set order: a typical IoT entity of five properties costs one heap block
//! instead of ten. Values are the exact JSON text received. Merging keeps existing keys in place,
//! overwrites the keys an event sets, and appends new keys in the event's order, so property order
//! is a pure function of the log.

use hashbrown::{HashMap, HashSet};

use crate::json;

/// Above this many properties in one event, merging switches from linear search to hash maps.
const SMALL_EVENT_PROPERTIES: usize = 8;
use crate::record::LogPosition;

/// One entity's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// Packed `(name, raw JSON value)` pairs.
    properties: Box<[u8]>,
    /// Accept time of the latest event that changed the entity (milliseconds since the epoch).
    pub last_updated_ms: u64,
    /// Log position of that event.
    pub revision: LogPosition,
}

impl Entity {
    pub fn new(last_updated_ms: u64, revision: LogPosition) -> Self {
        Entity {
            properties: Box::new([]),
            last_updated_ms,
            revision,
        }
    }

    /// Rebuilds an entity from its packed form (as written by [`Entity::packed`]).
    pub fn from_packed(packed: &[u8], last_updated_ms: u64, revision: LogPosition) -> Option<Self> {
        let mut iter = PackedIter { buf: packed };
        while !iter.buf.is_empty() {
            iter.next_checked()?;
        }
        Some(Entity {
            properties: packed.into(),
            last_updated_ms,
            revision,
        })
    }

    /// The packed property bytes, for snapshots.
    pub fn packed(&self) -> &[u8] {
        &self.properties
    }

    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        PackedIter {
            buf: &self.properties,
        }
    }

    /// Merges `updates` (in event order) into the properties.
    pub fn merge_properties<'a>(
        &mut self,
        updates: impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone,
    ) {
        self.properties = merged(&self.properties, updates).into_boxed_slice();
    }

    /// Appends `{"id":..,"properties":{..},"lastUpdated":".."}`.
    pub fn write_json(&self, out: &mut Vec<u8>, id: &str) {
        out.extend_from_slice(b"{\"id\":");
        json::write_str(out, id);
        out.extend_from_slice(b",\"properties\":");
        json::write_object(out, self.properties());
        out.extend_from_slice(b",\"lastUpdated\":");
        json::write_time_ms(out, self.last_updated_ms);
        out.push(b'}');
    }
}

/// `old` packed properties with `updates` merged in, packed.
fn merged<'a>(
    old: &[u8],
    updates: impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone,
) -> Vec<u8> {
    // Fast path (telemetry): the event sets exactly the stored keys, in the stored order.
    let stored = PackedIter { buf: old }.map(|(name, _)| name);
    if updates.clone().map(|(name, _)| name).eq(stored) {
        let mut out = Vec::with_capacity(old.len() + 16);
        for (name, value) in updates.clone() {
            put(&mut out, name, value);
        }
        return out;
    }
    // Small events (the common case) search linearly; large ones use hash maps so a
    // 100,000-property event costs linear time, not quadratic.
    let large = updates.len() > SMALL_EVENT_PROPERTIES;
    let last_value: HashMap<&str, &str> = if large {
        updates.clone().collect()
    } else {
        HashMap::new()
    };
    let value_in_event = |name: &str| -> Option<&'a str> {
        if large {
            last_value.get(name).copied()
        } else {
            updates
                .clone()
                .filter(|(n, _)| *n == name)
                .last()
                .map(|u| u.1)
        }
    };
    let mut out = Vec::with_capacity(old.len() + updates.len() * 16);
    let mut written: HashSet<&str> = HashSet::new();
    for (name, value) in (PackedIter { buf: old }) {
        put(&mut out, name, value_in_event(name).unwrap_or(value));
        if large {
            written.insert(name);
        }
    }
    for (i, (name, value)) in updates.clone().enumerate() {
        let done = if large {
            !written.insert(name)
        } else {
            updates.clone().take(i).any(|(n, _)| n == name)
                || PackedIter { buf: old }.any(|(n, _)| n == name)
        };
        if !done {
            put(&mut out, name, value_in_event(name).unwrap_or(value));
        }
    }
    out
}

fn put(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

struct PackedIter<'a> {
    buf: &'a [u8],
}

impl<'a> PackedIter<'a> {
    fn take_str(&mut self) -> Option<&'a str> {
        let len = u32::from_le_bytes(self.buf.get(..4)?.try_into().ok()?) as usize;
        let bytes = self.buf.get(4..4 + len)?;
        self.buf = &self.buf[4 + len..];
        std::str::from_utf8(bytes).ok()
    }

    fn next_checked(&mut self) -> Option<(&'a str, &'a str)> {
        Some((self.take_str()?, self.take_str()?))
    }
}

impl<'a> Iterator for PackedIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        self.next_checked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(e: &Entity) -> Vec<(&str, &str)> {
        e.properties().collect()
    }

    #[test]
    fn merge_sets_keeps_and_appends_in_order() {
        let mut e = Entity::new(1, 1);
        e.merge_properties([("a", "1"), ("b", "\"x\"")].into_iter());
        e.merge_properties([("c", "null"), ("a", "2")].into_iter());
        assert_eq!(props(&e), [("a", "2"), ("b", "\"x\""), ("c", "null")]);
    }

    #[test]
    fn same_keys_in_the_same_order_replace_values() {
        let mut e = Entity::new(1, 1);
        e.merge_properties([("a", "1"), ("b", "2")].into_iter());
        e.merge_properties([("a", "10"), ("b", "\"twenty\"")].into_iter());
        assert_eq!(props(&e), [("a", "10"), ("b", "\"twenty\"")]);
        e.merge_properties([("b", "3"), ("a", "4")].into_iter());
        assert_eq!(
            props(&e),
            [("a", "4"), ("b", "3")],
            "other orders keep the stored order"
        );
    }

    #[test]
    fn duplicate_keys_in_one_event_last_wins() {
        let mut e = Entity::new(1, 1);
        e.merge_properties([("a", "1"), ("a", "2"), ("b", "3"), ("b", "4")].into_iter());
        assert_eq!(props(&e), [("a", "2"), ("b", "4")]);
        e.merge_properties([("a", "5"), ("a", "6")].into_iter());
        assert_eq!(props(&e), [("a", "6"), ("b", "4")]);
    }

    #[test]
    fn large_events_merge_like_small_ones() {
        let updates: Vec<(String, String)> = (0..50)
            .map(|i| (format!("k{}", i % 20), i.to_string()))
            .collect();
        let pairs = || updates.iter().map(|(a, b)| (a.as_str(), b.as_str()));
        let mut large = Entity::new(1, 1);
        large.merge_properties([("k5", "old"), ("z", "0")].into_iter());
        large.merge_properties(pairs());
        let mut small = Entity::new(1, 1);
        small.merge_properties([("k5", "old"), ("z", "0")].into_iter());
        for chunk in updates.chunks(1) {
            small.merge_properties(chunk.iter().map(|(a, b)| (a.as_str(), b.as_str())));
        }
        assert_eq!(props(&large), props(&small));
    }

    #[test]
    fn renders_json_with_raw_values() {
        let mut e = Entity::new(1_771_842_645_123, 3);
        e.merge_properties(
            [
                ("n", "123456789012345678901234567890"),
                ("o", "{\"x\": [1]}"),
            ]
            .into_iter(),
        );
        let mut out = Vec::new();
        e.write_json(&mut out, "acme/\"q\"");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"acme/\"q\"","properties":{"n":123456789012345678901234567890,"o":{"x": [1]}},"lastUpdated":"2026-02-23T10:30:45.123Z"}"#
        );
    }

    #[test]
    fn packed_round_trip_and_rejects_garbage() {
        let mut e = Entity::new(5, 6);
        e.merge_properties([("k", "true")].into_iter());
        let back = Entity::from_packed(e.packed(), 5, 6).expect("valid");
        assert_eq!(back, e);
        assert!(Entity::from_packed(&[9, 0, 0, 0, b'a'], 5, 6).is_none());
    }
}
