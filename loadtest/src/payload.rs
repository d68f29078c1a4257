//! Request bodies: what each scenario sends, written into a caller's reused buffer.
//!
//! A [`RequestSource`] turns a request's ticket (its sequence number in the run) into a body,
//! so ids and values differ per event without allocating per request. Event shapes follow the
//! contract: `{"stream","source","timestamp","payload":{"entity_id","properties"}}`.
//!
//! Integers are written with `itoa`, not `core::fmt`: the generator shares the cores with the
//! server, and formatting was four fifths of its CPU in a batch run.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};

pub const EVENTS_PATH: &str = "/api/events";
pub const BATCH_PATH: &str = "/api/events/batch";
/// The property of an e2e/fanout event carrying `[sent, due]`: when it was sent and when it was
/// due on the publisher's schedule, in Unix nanoseconds. Subscribers measure delivery latency
/// from each (one property, so still one frame per event per subscriber).
pub const SENT_NS: &str = "sent_ns";
/// The property of the events that tell the publisher its subscribers are listening.
pub const SYNC_PROBE: &str = "sync_probe";

/// Builds the body of each request of a run.
pub trait RequestSource: Send + Sync + 'static {
    fn path(&self) -> &'static str;
    /// Events the request with this ticket carries.
    fn events_in(&self, ticket: u64) -> u64;
    /// Appends the body of request `ticket` to `out`; `due_ns` is the Unix time in ns the
    /// request was due (open loop), or now (closed loop).
    fn write_body(&self, ticket: u64, due_ns: u64, out: &mut BytesMut);
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Appends the decimal digits of `n`.
fn put_u64(out: &mut BytesMut, n: u64) {
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `"<key>":`.
fn put_key(out: &mut BytesMut, key: &str) {
    out.put_u8(b'"');
    out.put_slice(key.as_bytes());
    out.put_slice(b"\":");
}

/// `{"stream":..,"source":"flux-loadtest","timestamp":..,"payload":{"entity_id":"` — the id
/// and the properties follow.
fn open_event(out: &mut BytesMut, stream: &str, timestamp_ms: u64) {
    out.put_slice(b"{\"stream\":\"");
    out.put_slice(stream.as_bytes());
    out.put_slice(b"\",\"source\":\"flux-loadtest\",\"timestamp\":");
    put_u64(out, timestamp_ms);
    out.put_slice(b",\"payload\":{\"entity_id\":\"");
}

/// Ends the entity id and opens the properties object.
fn open_properties(out: &mut BytesMut) {
    out.put_slice(b"\",\"properties\":{");
}

fn close_event(out: &mut BytesMut) {
    out.put_slice(b"}}}");
}

/// Property `p<k>` of event `sequence`: numbers, strings and booleans in turn.
fn write_generated_property(out: &mut BytesMut, k: usize, sequence: u64) {
    out.put_slice(b"\"p");
    put_u64(out, k as u64);
    out.put_slice(b"\":");
    match k % 4 {
        0 => put_u64(out, sequence),
        1 => {
            put_u64(out, sequence % 1000);
            out.put_u8(b'.');
            put_u64(out, (k % 10) as u64);
        }
        2 => {
            out.put_slice(b"\"v");
            put_u64(out, sequence);
            out.put_u8(b'"');
        }
        _ => out.put_slice(if sequence.is_multiple_of(2) {
            b"true"
        } else {
            b"false"
        }),
    }
}

/// Plain ingest: `<namespace>/dev-<n>` events with generated properties, one per request or
/// `batch` per request.
pub struct IngestEvents {
    /// `<namespace>/dev-`: what every id starts with.
    pub prefix: String,
    pub batch: u64,
    pub props: usize,
    pub entities: u64,
    /// Total events of the run, when it is bounded (the last request may carry fewer).
    pub total: Option<u64>,
}

impl IngestEvents {
    /// The id prefix of events in `namespace`.
    pub fn prefix_in(namespace: &str) -> String {
        format!("{namespace}/dev-")
    }

    fn write_event(&self, out: &mut BytesMut, sequence: u64, timestamp_ms: u64) {
        open_event(out, "loadtest", timestamp_ms);
        out.put_slice(self.prefix.as_bytes());
        put_u64(out, sequence % self.entities.max(1));
        open_properties(out);
        self.write_properties(out, sequence);
        close_event(out);
    }

    fn write_properties(&self, out: &mut BytesMut, sequence: u64) {
        for k in 0..self.props {
            if k > 0 {
                out.put_u8(b',');
            }
            write_generated_property(out, k, sequence);
        }
    }

    /// The `properties` object event `sequence` carries, as sent (to check what a server holds).
    pub fn properties_of(&self, sequence: u64) -> serde_json::Value {
        let mut out = BytesMut::with_capacity(32 * self.props + 2);
        out.put_u8(b'{');
        self.write_properties(&mut out, sequence);
        out.put_u8(b'}');
        serde_json::from_slice(&out).expect("generated properties are valid JSON")
    }
}

impl RequestSource for IngestEvents {
    fn path(&self) -> &'static str {
        if self.batch > 1 {
            BATCH_PATH
        } else {
            EVENTS_PATH
        }
    }

    fn events_in(&self, ticket: u64) -> u64 {
        let first = ticket * self.batch;
        match self.total {
            Some(total) => self.batch.min(total.saturating_sub(first)),
            None => self.batch,
        }
    }

    fn write_body(&self, ticket: u64, _due_ns: u64, out: &mut BytesMut) {
        let timestamp_ms = unix_ms();
        if self.batch <= 1 {
            self.write_event(out, ticket, timestamp_ms);
            return;
        }
        let first = ticket * self.batch;
        out.put_u8(b'[');
        for i in 0..self.events_in(ticket) {
            if i > 0 {
                out.put_u8(b',');
            }
            self.write_event(out, first + i, timestamp_ms);
        }
        out.put_u8(b']');
    }
}

/// SplitMix64: small, seedable, good enough for sensor noise.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One simulated device: its random generator and its sensor values after `steps` reports.
struct Device {
    rng: Rng,
    values: Vec<f64>,
    steps: u64,
}

impl Device {
    /// One random-walk step of every sensor.
    fn step(&mut self) {
        for value in &mut self.values {
            *value += SENSOR_STEP * (2.0 * self.rng.next_f64() - 1.0);
        }
        self.steps += 1;
    }
}

/// The IoT fleet: request `ticket` is report `ticket / devices` of device `ticket % devices`,
/// whose sensors each take one random-walk step per report. A report's values depend only on
/// the seed, the device and the report's number: the walk also steps for reports the run
/// dropped (never sent), so one dropped report does not change every later value, and two runs
/// with the same seed send the same values in the reports both send.
pub struct Fleet {
    /// Locked only while one report is written; devices report one interval apart.
    devices: Vec<Mutex<Device>>,
    devices_per_site: u64,
    namespace: String,
}

/// Largest change of a sensor value per report.
const SENSOR_STEP: f64 = 0.5;

impl Fleet {
    /// `devices` reporting as `<namespace>/site-<k>/device-<n>`.
    pub fn new(
        namespace: &str,
        devices: u64,
        devices_per_site: u64,
        sensors: usize,
        seed: u64,
    ) -> Fleet {
        let devices = (0..devices)
            .map(|n| {
                let mut rng = Rng::new(seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
                let values = (0..sensors).map(|_| 10.0 + 20.0 * rng.next_f64()).collect();
                Mutex::new(Device {
                    rng,
                    values,
                    steps: 0,
                })
            })
            .collect();
        Fleet {
            devices,
            devices_per_site: devices_per_site.max(1),
            namespace: namespace.to_string(),
        }
    }
}

impl RequestSource for Fleet {
    fn path(&self) -> &'static str {
        EVENTS_PATH
    }

    fn events_in(&self, _ticket: u64) -> u64 {
        1
    }

    fn write_body(&self, ticket: u64, _due_ns: u64, out: &mut BytesMut) {
        let n = ticket % self.devices.len() as u64;
        open_event(out, "fleet", unix_ms());
        let site = n / self.devices_per_site;
        let _ = write!(out, "{}/site-{site}/device-{n}", self.namespace);
        open_properties(out);
        let mut device = self.devices[n as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Report r carries the values after r + 1 steps. A report written after a later one of
        // the same device (two overdue reports racing) repeats that later one's values.
        let report = ticket / self.devices.len() as u64;
        while device.steps <= report {
            device.step();
        }
        for (k, value) in device.values.iter().enumerate() {
            if k > 0 {
                out.put_u8(b',');
            }
            let _ = write!(out, "\"sensor-{k}\":{value:.3}");
        }
        close_event(out);
    }
}

/// Where e2e/fanout events go: ids that the subscription pattern matches.
#[derive(Debug, Clone)]
pub struct PublishTarget {
    /// `<prefix>e2e-<n>` ids, or one exact id.
    prefix: String,
    exact: bool,
    entities: u64,
}

impl PublishTarget {
    /// `*` → `<namespace>/e2e-<n>`; `acme/site/*` → `acme/site/e2e-<n>`; an exact id → that
    /// id.
    pub fn for_pattern(pattern: &str, entities: u64, namespace: &str) -> PublishTarget {
        if pattern == "*" {
            PublishTarget {
                prefix: format!("{namespace}/e2e-"),
                exact: false,
                entities,
            }
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            PublishTarget {
                prefix: format!("{prefix}e2e-"),
                exact: false,
                entities,
            }
        } else {
            PublishTarget {
                prefix: pattern.to_string(),
                exact: true,
                entities: 1,
            }
        }
    }

    fn write_id(&self, out: &mut BytesMut, sequence: u64) {
        out.put_slice(self.prefix.as_bytes());
        if !self.exact {
            put_u64(out, sequence % self.entities.max(1));
        }
    }
}

/// Published events of e2e/fanout: `sent_ns` first (`[sent, due]`, Unix ns), then optional
/// generated properties.
pub struct Publisher {
    pub target: PublishTarget,
    pub batch: u64,
    pub props: usize,
}

impl Publisher {
    fn write_event(&self, out: &mut BytesMut, sequence: u64, sent_ns: u64, due_ns: u64) {
        open_event(out, "loadtest", sent_ns / 1_000_000);
        self.target.write_id(out, sequence);
        open_properties(out);
        put_key(out, SENT_NS);
        out.put_u8(b'[');
        put_u64(out, sent_ns);
        out.put_u8(b',');
        put_u64(out, due_ns);
        out.put_u8(b']');
        for k in 1..self.props {
            out.put_u8(b',');
            write_generated_property(out, k, sequence);
        }
        close_event(out);
    }

    /// The body of sync probe `k` (one event on the first published id).
    pub fn probe_body(&self, k: u64) -> BytesMut {
        let mut out = BytesMut::with_capacity(256);
        open_event(&mut out, "loadtest", unix_ms());
        self.target.write_id(&mut out, 0);
        open_properties(&mut out);
        put_key(&mut out, SYNC_PROBE);
        put_u64(&mut out, k);
        close_event(&mut out);
        out
    }
}

impl RequestSource for Publisher {
    fn path(&self) -> &'static str {
        if self.batch > 1 {
            BATCH_PATH
        } else {
            EVENTS_PATH
        }
    }

    fn events_in(&self, _ticket: u64) -> u64 {
        self.batch.max(1)
    }

    fn write_body(&self, ticket: u64, due_ns: u64, out: &mut BytesMut) {
        let sent_ns = unix_ns();
        if self.batch <= 1 {
            self.write_event(out, ticket, sent_ns, due_ns);
            return;
        }
        out.put_u8(b'[');
        for i in 0..self.batch {
            if i > 0 {
                out.put_u8(b',');
            }
            self.write_event(out, ticket * self.batch + i, sent_ns, due_ns);
        }
        out.put_u8(b']');
    }
}

/// The event that marks the end of a populated log, with a value only this run knows.
pub fn marker_body(entity_id: &str, marker: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(256);
    open_event(&mut out, "loadtest", unix_ms());
    out.put_slice(entity_id.as_bytes());
    open_properties(&mut out);
    let _ = write!(out, "\"marker\":\"{marker}\"");
    close_event(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn body(source: &dyn RequestSource, ticket: u64) -> Value {
        let mut out = BytesMut::new();
        source.write_body(ticket, unix_ns(), &mut out);
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn properties_of_matches_the_sent_event() {
        let source = IngestEvents {
            prefix: IngestEvents::prefix_in("ns"),
            batch: 3,
            props: 6,
            entities: 4,
            total: None,
        };
        let sent = body(&source, 2);
        for (i, event) in sent.as_array().expect("a batch").iter().enumerate() {
            let sequence = 6 + i as u64;
            assert_eq!(
                event["payload"]["properties"],
                source.properties_of(sequence)
            );
            assert_eq!(
                event["payload"]["entity_id"],
                format!("ns/dev-{}", sequence % 4)
            );
        }
    }

    #[test]
    fn ingest_events_are_valid_and_distinct() {
        let single = IngestEvents {
            prefix: IngestEvents::prefix_in("loadtest"),
            batch: 1,
            props: 5,
            entities: 1000,
            total: None,
        };
        let event = body(&single, 7);
        assert_eq!(event["stream"], "loadtest");
        assert_eq!(event["payload"]["entity_id"], "loadtest/dev-7");
        assert_eq!(event["payload"]["properties"].as_object().unwrap().len(), 5);
        assert_ne!(body(&single, 8)["payload"], event["payload"]);
        let mut raw = BytesMut::new();
        single.write_body(1007, unix_ns(), &mut raw);
        let raw = std::str::from_utf8(&raw).expect("UTF-8");
        assert!(raw.starts_with(r#"{"stream":"loadtest","source":"flux-loadtest","timestamp":"#));
        assert!(
            raw.ends_with(r#","payload":{"entity_id":"loadtest/dev-7","properties":{"p0":1007,"p1":7.1,"p2":"v1007","p3":false,"p4":1007}}}"#),
            "{raw}"
        );

        let batch = IngestEvents {
            prefix: IngestEvents::prefix_in("acme"),
            batch: 10,
            props: 2,
            entities: 1000,
            total: Some(25),
        };
        assert_eq!(body(&batch, 0).as_array().unwrap().len(), 10);
        assert_eq!(body(&batch, 2).as_array().unwrap().len(), 5);
        assert_eq!(batch.events_in(2), 5);
        assert_eq!(body(&batch, 2)[4]["payload"]["entity_id"], "acme/dev-24");
    }

    #[test]
    fn fleet_repeats_with_the_seed() {
        let a = Fleet::new("fleet", 10, 4, 3, 42);
        let b = Fleet::new("fleet", 10, 4, 3, 42);
        for ticket in 0..30 {
            let (x, y) = (body(&a, ticket), body(&b, ticket));
            assert_eq!(x["payload"], y["payload"]);
        }
        let event = body(&a, 9);
        assert_eq!(event["payload"]["entity_id"], "fleet/site-2/device-9");
        // Another namespace moves the ids, not the values.
        let here = body(&Fleet::new("fleet", 10, 4, 3, 42), 9);
        let elsewhere = body(&Fleet::new("acme", 10, 4, 3, 42), 9);
        assert_eq!(elsewhere["payload"]["entity_id"], "acme/site-2/device-9");
        assert_eq!(
            elsewhere["payload"]["properties"],
            here["payload"]["properties"]
        );
        let c = Fleet::new("fleet", 10, 4, 3, 43);
        assert_ne!(
            body(&c, 0)["payload"],
            body(&Fleet::new("fleet", 10, 4, 3, 42), 0)["payload"]
        );
    }

    /// A run that drops reports (never sends them) still sends, in every report it does send,
    /// the values a run without drops sends in the same report.
    #[test]
    fn fleet_values_do_not_depend_on_dropped_reports() {
        let every = Fleet::new("fleet", 10, 4, 3, 42);
        let sparse = Fleet::new("fleet", 10, 4, 3, 42);
        let all: Vec<Value> = (0..100).map(|ticket| body(&every, ticket)).collect();
        for ticket in (0..100).filter(|t| t % 7 == 3 || *t >= 90) {
            assert_eq!(
                body(&sparse, ticket)["payload"],
                all[ticket as usize]["payload"]
            );
        }
        assert_ne!(
            all[3]["payload"], all[13]["payload"],
            "a device's values drift"
        );
    }

    #[test]
    fn publisher_matches_the_pattern() {
        let publisher = Publisher {
            target: PublishTarget::for_pattern("acme/site/*", 4, "loadtest"),
            batch: 1,
            props: 2,
        };
        let event = body(&publisher, 5);
        assert_eq!(event["payload"]["entity_id"], "acme/site/e2e-1");
        let stamps = &event["payload"]["properties"]["sent_ns"];
        assert!(stamps[0].as_u64().unwrap() > 0 && stamps[1].as_u64().unwrap() > 0);
        let everything = PublishTarget::for_pattern("*", 4, "acme");
        let publisher = Publisher {
            target: everything,
            batch: 1,
            props: 1,
        };
        assert_eq!(body(&publisher, 6)["payload"]["entity_id"], "acme/e2e-2");
        let exact = PublishTarget::for_pattern("acme/one", 4, "loadtest");
        let publisher = Publisher {
            target: exact,
            batch: 3,
            props: 1,
        };
        let events = body(&publisher, 1);
        assert_eq!(events[2]["payload"]["entity_id"], "acme/one");
        let probe: Value = serde_json::from_slice(&publisher.probe_body(3)).unwrap();
        assert_eq!(probe["payload"]["properties"]["sync_probe"], 3);
        let marker: Value = serde_json::from_slice(&marker_body("a/b", "xyz")).unwrap();
        assert_eq!(marker["payload"]["properties"]["marker"], "xyz");
    }
}
