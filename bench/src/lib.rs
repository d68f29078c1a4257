//! Shared fixtures for the hot-path benches: deterministic, realistic IoT events.
//!
//! Invariants: the same seed always yields the same bytes, so runs on different days and
//! machines measure the same input. An event is ~198 bytes of JSON with five properties (a
//! float, an integer, a string, a bool and a nested object) and no `eventId` (the server makes
//! one). Entity ids look like `acme/site-3/pump-01234` and come from a bounded fleet, so a long
//! bench updates existing entities instead of creating new ones without end.
//! Used only by the bench targets; nothing here is timed by itself.

use std::fmt::Write;

use flux_engine::shard::shard_of;
use flux_engine::{EventFields, RecordBatch};
use flux_ingress::event;

/// Events in one "large batch" body, the size the batch benches use.
pub const BATCH_EVENTS: usize = 1_000;
/// Distinct entities the generator draws from (sites × pumps).
pub const FLEET_ENTITIES: u64 = 10 * 2_000;
/// Seed every bench uses unless it needs a second, independent stream.
pub const SEED: u64 = 0x5eed_f1ed;

/// Deterministic generator of event JSON text (SplitMix64 underneath: tiny and well mixed).
pub struct EventGenerator {
    state: u64,
    timestamp_ms: i64,
}

impl EventGenerator {
    pub fn new(seed: u64) -> Self {
        EventGenerator {
            state: seed,
            timestamp_ms: 1_795_392_000_000,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Appends one event object to `out`.
    pub fn write_event(&mut self, out: &mut String) {
        let r = self.next_u64();
        let entity = r % FLEET_ENTITIES;
        self.timestamp_ms += 1 + (r >> 40) as i64 % 250;
        let temperature = 15.0 + (r >> 20 & 0x3ff) as f64 / 10.0;
        let rpm = 900 + (r >> 32 & 0x7ff);
        let state = ["ok", "idle", "alarm"][(r >> 44) as usize % 3];
        let on = r >> 47 & 1 == 1;
        let x = 52.0 + (r >> 48 & 0xff) as f64 / 100.0;
        let y = 13.0 + (r >> 56) as f64 / 100.0;
        write!(
            out,
            r#"{{"stream":"iot","source":"gw-{gateway}","timestamp":{ts},"payload":{{"entity_id":"{id}","properties":{{"temp":{temperature:.1},"rpm":{rpm},"state":"{state}","on":{on},"pos":{{"x":{x:.2},"y":{y:.2}}}}}}}}}"#,
            gateway = entity % 10,
            ts = self.timestamp_ms,
            id = entity_id(entity),
        )
        .expect("writing to a String cannot fail");
    }

    /// One event as its own JSON document.
    pub fn event(&mut self) -> String {
        let mut out = String::with_capacity(256);
        self.write_event(&mut out);
        out
    }

    /// A batch body: a JSON array of `count` events.
    pub fn batch(&mut self, count: usize) -> String {
        let mut out = String::with_capacity(count * 200 + 2);
        out.push('[');
        for i in 0..count {
            if i > 0 {
                out.push(',');
            }
            self.write_event(&mut out);
        }
        out.push(']');
        out
    }
}

/// The id of fleet member `n`: `acme/site-<s>/pump-<nnnnn>`.
pub fn entity_id(n: u64) -> String {
    format!("acme/site-{}/pump-{:05}", n % 10, n)
}

/// Stand-in for the server's event id generator (a UUIDv7's bytes).
pub fn new_event_id() -> [u8; 16] {
    0x019a_b3c2_7d41_7e55_9c1a_5f2e_8d4b_6a01_u128.to_be_bytes()
}

/// The ingress path for a batch body: parse it in one pass, validate each event, route it,
/// encode a record.
pub fn parse_batch(body: &str, shards: usize) -> Result<RecordBatch, String> {
    let events = event::parse_batch(body)?;
    let mut batch = RecordBatch::default();
    for loose in events {
        let event = event::finish(loose, new_event_id)?;
        event.push_to(&mut batch, shard_of(&event.entity_id, shards));
    }
    Ok(batch)
}

/// A ready-made one-record batch for fleet member `n`, built without parsing (for log benches).
pub fn one_record_batch(n: u64, shards: usize) -> RecordBatch {
    let entity_id = entity_id(n % FLEET_ENTITIES);
    let fields = EventFields {
        event_id: flux_engine::record::EventId::Text("019ab3c2-7d41-7e55-9c1a-5f2e8d4b6a01"),
        stream: "iot",
        source: "gw-4",
        timestamp: 1_795_392_000_000,
        entity_id: &entity_id,
        key: None,
        schema: None,
    };
    let mut batch = RecordBatch::default();
    batch.push_event(
        shard_of(&entity_id, shards),
        &fields,
        SAMPLE_PROPERTIES.iter().copied(),
    );
    batch
}

/// The five properties of a typical event, as `(name, raw JSON value)`.
pub const SAMPLE_PROPERTIES: [(&str, &str); 5] = [
    ("temp", "21.4"),
    ("rpm", "1450"),
    ("state", "\"ok\""),
    ("on", "true"),
    ("pos", "{\"x\":52.14,\"y\":13.04}"),
];

/// An update of the same five keys with new values.
pub const SAME_KEYS_UPDATE: [(&str, &str); 5] = [
    ("temp", "21.5"),
    ("rpm", "1462"),
    ("state", "\"idle\""),
    ("on", "false"),
    ("pos", "{\"x\":52.15,\"y\":13.04}"),
];

/// An update that adds two keys the entity does not have yet.
pub const TWO_NEW_KEYS_UPDATE: [(&str, &str); 2] =
    [("vibration", "0.031"), ("firmware", "\"4.2.1\"")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_deterministic_valid_and_about_200_bytes() {
        let a = EventGenerator::new(SEED).batch(BATCH_EVENTS);
        let b = EventGenerator::new(SEED).batch(BATCH_EVENTS);
        assert_eq!(a, b);
        let average = (a.len() - 2) / BATCH_EVENTS;
        assert!((185..=205).contains(&average), "average {average} bytes");
        let batch = parse_batch(&a, 2).expect("every generated event is valid");
        assert_eq!(batch.len(), BATCH_EVENTS);
        let one = EventGenerator::new(SEED).event();
        let event = event::validate(&one, new_event_id).expect("valid");
        assert_eq!(event.properties.0.len(), 5);
        assert!(event.entity_id.starts_with("acme/site-"));
    }

    #[test]
    fn one_record_batch_has_one_record() {
        assert_eq!(one_record_batch(7, 2).len(), 1);
    }
}
