//! Entity state as a shard stores it, property merging, and the rule an entity id follows
//! ([`check_entity_id`], shared by event validation and WebSocket subscriptions).
//!
//! One entity is one heap block holding its accept time, its id and its properties, in
//! first-set order:
//! ```text
//! u64 last_updated_ms (LE) | varint id_len | id | (varint name_len | name | varint value_len | raw value)*
//! ```
//! (varints are LEB128), beside its `u64` revision. A typical IoT entity of five properties
//! costs one block of ~80 bytes instead of an id, a property block and their headers; the accept
//! time rides in the block because it usually fits in the block's size class for free, while
//! the shard's table entry shrinks by 8 bytes. Values are the exact JSON text received.
//!
//! Invariants: the block is written only from `&str`s (or from snapshot bytes checked as UTF-8)
//! and its lengths always describe it exactly; blocks are allocated at their exact size (the
//! allocator keeps a shrunk block in its old size class). Merging keeps existing keys in place,
//! overwrites the keys an event sets, and appends new keys in the event's order, so property
//! order is a pure function of the log.

use hashbrown::{HashMap, HashSet};

use crate::json;
use crate::record::LogPosition;

/// Longest entity id, in bytes (SPEC "Events": `entity_id` at most 512 bytes).
pub const MAX_ENTITY_ID_BYTES: usize = 512;

/// Checks an entity id: non-empty, at most 512 bytes, no control characters.
pub fn check_entity_id(id: &str, field: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if id.len() > MAX_ENTITY_ID_BYTES {
        return Err(format!(
            "{field} must be at most {MAX_ENTITY_ID_BYTES} bytes"
        ));
    }
    // Printable ASCII, the usual id, is checked by bytes; anything else by characters.
    let printable_ascii = id.bytes().all(|b| (0x20..0x7F).contains(&b));
    if !printable_ascii && id.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(())
}

/// Above this many properties in one event, merging switches from linear search to hash maps.
const SMALL_EVENT_PROPERTIES: usize = 8;

/// One entity's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// The accept time, the id and the packed `(name, raw JSON value)` pairs (layout in the
    /// module doc).
    bytes: Box<[u8]>,
    /// Log position of the latest event that changed the entity.
    pub revision: LogPosition,
}

impl Entity {
    /// An entity named `id` without properties.
    pub fn new(id: &str, last_updated_ms: u64, revision: LogPosition) -> Self {
        let mut bytes = Vec::with_capacity(TIME_BYTES + varint_len(id.len()) + id.len());
        bytes.extend_from_slice(&last_updated_ms.to_le_bytes());
        put_str(&mut bytes, id);
        Entity {
            bytes: bytes.into_boxed_slice(),
            revision,
        }
    }

    /// Rebuilds an entity from a snapshot's form of its properties (as written by
    /// [`Entity::write_snapshot_properties`]); `None` if `packed` is malformed.
    pub fn from_snapshot(
        id: &str,
        packed: &[u8],
        last_updated_ms: u64,
        revision: LogPosition,
    ) -> Option<Self> {
        let mut size = TIME_BYTES + varint_len(id.len()) + id.len();
        let mut iter = SnapshotIter { buf: packed };
        while !iter.buf.is_empty() {
            let (name, value) = iter.next_checked()?;
            size += entry_len(name, value);
        }
        let mut bytes = Vec::with_capacity(size);
        bytes.extend_from_slice(&last_updated_ms.to_le_bytes());
        put_str(&mut bytes, id);
        for (name, value) in (SnapshotIter { buf: packed }) {
            put_str(&mut bytes, name);
            put_str(&mut bytes, value);
        }
        Some(Entity {
            bytes: bytes.into_boxed_slice(),
            revision,
        })
    }

    /// Appends the properties in the snapshot's form: `(u32 len | name | u32 len | value)*`.
    pub fn write_snapshot_properties(&self, out: &mut Vec<u8>) {
        for (name, value) in self.properties() {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
    }

    pub fn id(&self) -> &str {
        self.split().0
    }

    /// The id's bytes (what lookups compare).
    pub fn id_bytes(&self) -> &[u8] {
        let mut rest = self.bytes.get(TIME_BYTES..).unwrap_or_default();
        take_bytes(&mut rest).unwrap_or_default()
    }

    /// Accept time of the latest event that changed the entity (milliseconds since the epoch).
    pub fn last_updated_ms(&self) -> u64 {
        let mut time = [0; TIME_BYTES];
        time.copy_from_slice(&self.bytes[..TIME_BYTES]);
        u64::from_le_bytes(time)
    }

    pub fn set_last_updated_ms(&mut self, last_updated_ms: u64) {
        self.bytes[..TIME_BYTES].copy_from_slice(&last_updated_ms.to_le_bytes());
    }

    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        PackedIter {
            buf: self.split().1,
        }
    }

    /// Drops every property, keeping the id.
    pub fn clear_properties(&mut self) {
        let id_end = self.bytes.len() - self.split().1.len();
        self.bytes = self.bytes[..id_end].into();
    }

    /// Merges `updates` (in event order) into the properties.
    pub fn merge_properties<'a>(
        &mut self,
        updates: impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone,
    ) {
        let id_end = self.bytes.len() - self.split().1.len();
        if let Some(merged) = merged(&mut self.bytes, id_end, updates) {
            self.bytes = merged;
        }
    }

    /// Appends `{"id":..,"properties":{..},"lastUpdated":".."}`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let (id, properties) = self.split();
        out.extend_from_slice(b"{\"id\":");
        json::write_str(out, id);
        out.extend_from_slice(b",\"properties\":");
        json::write_object(out, PackedIter { buf: properties });
        out.extend_from_slice(b",\"lastUpdated\":");
        json::write_time_ms(out, self.last_updated_ms());
        out.push(b'}');
    }

    /// The id and the packed properties.
    fn split(&self) -> (&str, &[u8]) {
        let mut rest = self.bytes.get(TIME_BYTES..).unwrap_or_default();
        let id = take_bytes(&mut rest).unwrap_or_default();
        (trusted_str(id), rest)
    }
}

/// Bytes of the accept time at the start of a block.
const TIME_BYTES: usize = 8;

/// Merges `updates` into the properties of `block` (which start at `id_end`). Returns the new
/// block, or `None` when the merge was done in place (same keys, same value lengths).
fn merged<'a>(
    block: &mut [u8],
    id_end: usize,
    updates: impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone,
) -> Option<Box<[u8]>> {
    // Fast path (telemetry): the event sets exactly the stored keys, in the stored order.
    let mut stored = PackedIter {
        buf: &block[id_end..],
    };
    let mut same_keys = true;
    let mut same_lengths = true;
    let mut size = id_end;
    for (name, value) in updates.clone() {
        match stored.next() {
            Some((stored_name, stored_value)) if stored_name == name => {
                same_lengths &= stored_value.len() == value.len();
                size += entry_len(name, value);
            }
            _ => {
                same_keys = false;
                break;
            }
        }
    }
    if same_keys && stored.next().is_none() {
        if same_lengths {
            // Every length prefix stays valid: overwrite the values where they are.
            let mut at = id_end;
            for (name, value) in updates {
                at += varint_len(name.len()) + name.len() + varint_len(value.len());
                block[at..at + value.len()].copy_from_slice(value.as_bytes());
                at += value.len();
            }
            return None;
        }
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&block[..id_end]);
        for (name, value) in updates {
            put_str(&mut out, name);
            put_str(&mut out, value);
        }
        return Some(out.into_boxed_slice());
    }
    let old = &block[id_end..];
    // Small events (the common case) search linearly; large ones use hash maps so a
    // 100,000-property event costs linear time, not quadratic.
    let large = updates.len() > SMALL_EVENT_PROPERTIES;
    let last_value: HashMap<&str, &str> = if large {
        updates.clone().collect()
    } else {
        HashMap::new()
    };
    // A small event is decoded once into this array; each lookup then compares slices
    // instead of decoding the record's properties again.
    let mut decoded = [("", ""); SMALL_EVENT_PROPERTIES];
    let small = if large {
        &decoded[..0]
    } else {
        for (slot, update) in decoded.iter_mut().zip(updates.clone()) {
            *slot = update;
        }
        &decoded[..updates.len()]
    };
    let value_in_event = |name: &str| -> Option<&'a str> {
        if large {
            last_value.get(name).copied()
        } else {
            small.iter().rev().find(|(n, _)| *n == name).map(|u| u.1)
        }
    };
    let mut out = Vec::with_capacity(block.len() + updates.len() * 16);
    out.extend_from_slice(&block[..id_end]);
    let mut written: HashSet<&str> = HashSet::new();
    for (name, value) in (PackedIter { buf: old }) {
        put_str(&mut out, name);
        put_str(&mut out, value_in_event(name).unwrap_or(value));
        if large {
            written.insert(name);
        }
    }
    for (i, (name, value)) in updates.clone().enumerate() {
        let done = if large {
            !written.insert(name)
        } else {
            small[..i].iter().any(|(n, _)| *n == name)
                || PackedIter { buf: old }.any(|(n, _)| n == name)
        };
        if !done {
            put_str(&mut out, name);
            put_str(&mut out, value_in_event(name).unwrap_or(value));
        }
    }
    // Copied rather than shrunk: a shrunk block would keep its larger size class.
    Some(Box::from(out.as_slice()))
}

/// Bytes `(name, value)` takes in the packed form.
fn entry_len(name: &str, value: &str) -> usize {
    varint_len(name.len()) + name.len() + varint_len(value.len()) + value.len()
}

fn varint_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Reads a varint length and that many bytes from the front of `buf`.
fn take_bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        len |= usize::from(byte & 0x7f).checked_shl(shift)?;
        if byte < 0x80 {
            break;
        }
        shift += 7;
    }
    let bytes = buf.get(..len)?;
    *buf = &buf[len..];
    Some(bytes)
}

/// A string of an entity block.
fn trusted_str(bytes: &[u8]) -> &str {
    debug_assert!(std::str::from_utf8(bytes).is_ok());
    // SAFETY: blocks are written only by this module, from `&str`s or from snapshot strings
    // checked by `SnapshotIter::next_checked`, and `take_bytes` cuts at the boundaries they
    // were written with (the module invariant).
    unsafe { std::str::from_utf8_unchecked(bytes) }
}

/// The `(name, value)` pairs of an entity block's property section.
struct PackedIter<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for PackedIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let name = take_bytes(&mut self.buf)?;
        let value = take_bytes(&mut self.buf)?;
        Some((trusted_str(name), trusted_str(value)))
    }
}

/// The `(name, value)` pairs of a snapshot's property bytes (`u32` lengths, untrusted).
struct SnapshotIter<'a> {
    buf: &'a [u8],
}

impl<'a> SnapshotIter<'a> {
    fn take_str(&mut self) -> Option<&'a str> {
        let len = u32::from_le_bytes(self.buf.get(..4)?.try_into().ok()?) as usize;
        let bytes = self.buf.get(4..4usize.checked_add(len)?)?;
        self.buf = &self.buf[4 + len..];
        std::str::from_utf8(bytes).ok()
    }

    fn next_checked(&mut self) -> Option<(&'a str, &'a str)> {
        Some((self.take_str()?, self.take_str()?))
    }
}

impl<'a> Iterator for SnapshotIter<'a> {
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
        let mut e = Entity::new("e", 1, 1);
        e.merge_properties([("a", "1"), ("b", "\"x\"")].into_iter());
        e.merge_properties([("c", "null"), ("a", "2")].into_iter());
        assert_eq!(props(&e), [("a", "2"), ("b", "\"x\""), ("c", "null")]);
    }

    #[test]
    fn same_keys_in_the_same_order_replace_values() {
        let mut e = Entity::new("e", 1, 1);
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
        let mut e = Entity::new("e", 1, 1);
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
        let mut large = Entity::new("e", 1, 1);
        large.merge_properties([("k5", "old"), ("z", "0")].into_iter());
        large.merge_properties(pairs());
        let mut small = Entity::new("e", 1, 1);
        small.merge_properties([("k5", "old"), ("z", "0")].into_iter());
        for chunk in updates.chunks(1) {
            small.merge_properties(chunk.iter().map(|(a, b)| (a.as_str(), b.as_str())));
        }
        assert_eq!(props(&large), props(&small));
    }

    #[test]
    fn renders_json_with_raw_values() {
        let mut e = Entity::new("acme/\"q\"", 1_771_842_645_123, 3);
        e.merge_properties(
            [
                ("n", "123456789012345678901234567890"),
                ("o", "{\"x\": [1]}"),
            ]
            .into_iter(),
        );
        let mut out = Vec::new();
        e.write_json(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"acme/\"q\"","properties":{"n":123456789012345678901234567890,"o":{"x": [1]}},"lastUpdated":"2026-02-23T10:30:45.123Z"}"#
        );
    }

    #[test]
    fn snapshot_round_trip_and_rejects_garbage() {
        let mut e = Entity::new("a/1", 5, 6);
        e.merge_properties([("k", "true"), ("long", &"x".repeat(300))].into_iter());
        let mut packed = Vec::new();
        e.write_snapshot_properties(&mut packed);
        assert_eq!(&packed[..9], &[1, 0, 0, 0, b'k', 4, 0, 0, 0]);
        let back = Entity::from_snapshot("a/1", &packed, 5, 6).expect("valid");
        assert_eq!(back, e);
        assert_eq!(back.id(), "a/1");
        assert!(Entity::from_snapshot("a/1", &[9, 0, 0, 0, b'a'], 5, 6).is_none());
        assert!(Entity::from_snapshot("a/1", &[1, 0, 0, 0, 0xff, 0, 0, 0, 0], 5, 6).is_none());
    }

    #[test]
    fn in_place_and_reallocating_merges_agree() {
        let mut e = Entity::new(&"i".repeat(200), 1, 1);
        e.merge_properties([("a", "1"), ("b", "22")].into_iter());
        e.merge_properties([("a", "3"), ("b", "44")].into_iter());
        assert_eq!(props(&e), [("a", "3"), ("b", "44")]);
        e.merge_properties([("a", "555"), ("b", "6")].into_iter());
        assert_eq!(props(&e), [("a", "555"), ("b", "6")]);
        assert_eq!(e.id(), "i".repeat(200));
        e.clear_properties();
        assert_eq!(props(&e), []);
        assert_eq!(e.id(), "i".repeat(200));
        assert_eq!(e.id_bytes(), "i".repeat(200).as_bytes());
    }

    #[test]
    fn blocks_are_exactly_sized() {
        let mut e = Entity::new("d", 1, 1);
        e.merge_properties([("p0", "12345"), ("p2", "\"v1\"")].into_iter());
        assert_eq!(e.bytes.len(), 8 + 2 + 3 + 6 + 3 + 5);
        e.merge_properties([("p0", "1"), ("p2", "\"v12345\"")].into_iter());
        assert_eq!(e.bytes.len(), 8 + 2 + 3 + 2 + 3 + 9);
        e.set_last_updated_ms(77);
        assert_eq!(e.last_updated_ms(), 77);
        assert_eq!(e.id(), "d");
    }
}
