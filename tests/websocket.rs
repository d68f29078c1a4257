//! Black-box tests of `GET /api/ws` (SPEC.md, "WebSocket"): exact, prefix (any depth) and `*`
//! subscriptions, the exact shape of `state_update`, `entity_deleted`, `error` and
//! `metrics_update`, per-entity order, the bounded queue of a slow consumer (1008), thousands
//! of subscribers, ping, oversized messages (1009), shutdown (1001), and the Python
//! `websockets` example from the public docs run as written.
//!
//! Every socket read has a timeout and every wait a deadline. A subscribe has no reply, so a
//! test confirms one by sending an invalid message right after it ([`Ws::sync`]): the server
//! handles one connection's messages in order, so once the `error` reply arrives the
//! subscription is in force. Negative checks ("this connection got nothing") wait until a `*`
//! witness connection has seen every change, then drain the connection for a short while.

mod util;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use serde_json::{Value, json};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::{Message, WebSocket};
use util::*;

/// Longest wait for one expected message.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection is drained for messages that must not come.
const DRAIN_WINDOW: Duration = Duration::from_millis(700);
/// Largest client message the server accepts (SPEC: bounded; egress `MAX_MESSAGE_BYTES`).
const MAX_MESSAGE_BYTES: usize = 64 << 10;

// ------------------------------------------------------------------ client

/// What one read of a WebSocket produced.
#[derive(Debug)]
enum Incoming {
    Text(String),
    /// The server sends only text; any binary message is a failure.
    Binary,
    Pong(Vec<u8>),
    /// A close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
    /// The connection ended without (or after) a close frame, or failed.
    Ended(String),
    TimedOut,
}

/// A blocking WebSocket client whose every read is bounded.
struct Ws {
    socket: WebSocket<TcpStream>,
    /// Text messages read while waiting for something else; handed out first.
    pending: VecDeque<String>,
}

impl Ws {
    fn connect(addr: &str) -> Ws {
        Ws::connect_with(addr, 16 * 1024)
    }

    /// Connects with a small read buffer (for tests holding thousands of connections).
    fn connect_with(addr: &str, read_buffer_bytes: usize) -> Ws {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(READ_TIMEOUT))
            .expect("write timeout");
        let config = WebSocketConfig::default()
            .read_buffer_size(read_buffer_bytes)
            .write_buffer_size(0);
        let (socket, response) = tungstenite::client::client_with_config(
            format!("ws://{addr}/api/ws"),
            stream,
            Some(config),
        )
        .unwrap_or_else(|e| panic!("WebSocket handshake with {addr}/api/ws: {e}"));
        assert_eq!(response.status().as_u16(), 101, "upgrade status");
        Ws {
            socket,
            pending: VecDeque::new(),
        }
    }

    fn send(&mut self, message: Message) {
        self.socket
            .send(message)
            .unwrap_or_else(|e| panic!("WebSocket send: {e}"));
    }

    fn send_text(&mut self, text: &str) {
        self.send(Message::text(text.to_string()));
    }

    fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string());
    }

    /// Reads one frame from the socket (not from `pending`), waiting until `deadline`.
    fn read_socket(&mut self, deadline: Instant) -> Incoming {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Incoming::TimedOut;
            }
            self.socket
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            match self.socket.read() {
                Ok(Message::Text(text)) => return Incoming::Text(text.as_str().to_string()),
                Ok(Message::Binary(_)) => return Incoming::Binary,
                Ok(Message::Pong(bytes)) => return Incoming::Pong(bytes.to_vec()),
                Ok(Message::Close(frame)) => {
                    return Incoming::Close(
                        frame.map(|f| (u16::from(f.code), f.reason.as_str().to_string())),
                    );
                }
                Ok(Message::Ping(_) | Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Incoming::Ended(e.to_string()),
            }
        }
    }

    /// The next message, `pending` first.
    fn recv_until(&mut self, deadline: Instant) -> Incoming {
        match self.pending.pop_front() {
            Some(text) => Incoming::Text(text),
            None => self.read_socket(deadline),
        }
    }

    /// The next text message as JSON (raw text and value); panics on anything else.
    fn next_json(&mut self, deadline: Instant, what: &str) -> (String, Value) {
        match self.recv_until(deadline) {
            Incoming::Text(text) => {
                let value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{what}: server sent non-JSON text ({e}): {text}"));
                (text, value)
            }
            other => panic!("{what}: wanted a JSON text message, got {other:?}"),
        }
    }

    /// The next message that is not a `metrics_update`.
    fn next_change(&mut self, deadline: Instant, what: &str) -> (String, Value) {
        loop {
            let (text, value) = self.next_json(deadline, what);
            if value["type"] != "metrics_update" {
                return (text, value);
            }
        }
    }

    /// Every message but `metrics_update` that arrives within `window`; panics if the
    /// connection closes.
    fn drain(&mut self, window: Duration, what: &str) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            match self.recv_until(deadline) {
                Incoming::TimedOut => return out,
                Incoming::Text(text) => {
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{what}: non-JSON text ({e}): {text}"));
                    if value["type"] != "metrics_update" {
                        out.push(text);
                    }
                }
                other => panic!("{what}: connection ended while draining: {other:?}"),
            }
        }
    }

    /// Sends an invalid message and waits for its `error` reply: everything sent before it
    /// has been handled. Changes that arrive meanwhile are kept for later reads.
    fn sync(&mut self) {
        self.send_text("sync: not JSON");
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            match self.read_socket(deadline) {
                Incoming::Text(text) => {
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("sync: non-JSON text ({e}): {text}"));
                    match value["type"].as_str() {
                        Some("error") => return,
                        Some("metrics_update") => {}
                        _ => self.pending.push_back(text),
                    }
                }
                other => panic!("sync: wanted the error reply to an invalid message: {other:?}"),
            }
        }
    }

    /// Subscribes and waits until the subscription is in force.
    fn subscribe(&mut self, pattern: &str) {
        self.send_json(&json!({"type": "subscribe", "entity_id": pattern}));
        self.sync();
    }

    fn unsubscribe(&mut self, pattern: &str) {
        self.send_json(&json!({"type": "unsubscribe", "entity_id": pattern}));
        self.sync();
    }

    /// Reads until a close frame arrives (skipping everything else); returns it and the number
    /// of text messages read before it.
    fn read_until_close(&mut self, limit: Duration, what: &str) -> (Option<(u16, String)>, u64) {
        let deadline = Instant::now() + limit;
        let mut texts = self.pending.len() as u64;
        self.pending.clear();
        loop {
            match self.read_socket(deadline) {
                Incoming::Close(frame) => return (frame, texts),
                Incoming::Text(_) => texts += 1,
                Incoming::Binary | Incoming::Pong(_) => {}
                Incoming::Ended(reason) => {
                    panic!(
                        "{what}: connection ended without a close frame ({reason}) after {texts} messages"
                    )
                }
                Incoming::TimedOut => {
                    panic!("{what}: no close frame within {limit:?} ({texts} messages read)")
                }
            }
        }
    }
}

// ------------------------------------------------------------------ message checks

/// Fields of one `state_update`, checked for shape.
#[derive(Debug)]
struct StateUpdate {
    entity_id: String,
    property: String,
    /// The `value` exactly as the server wrote it.
    raw_value: String,
    value: Value,
    timestamp: String,
}

/// Checks `text` is a timestamp in the contract's format, near the test's clock.
fn assert_server_time(timestamp: &str, context: &str) {
    let ms = parse_iso_millis(timestamp).unwrap_or_else(|| {
        panic!("{context}: timestamp {timestamp:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
    });
    let skew = (ms - now_ms()).abs();
    assert!(
        skew < 10 * 60 * 1000,
        "{context}: timestamp {timestamp} is not the server's current time"
    );
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("message is not a JSON object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn key_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Parses a `state_update`, asserting it has exactly the contract's fields.
fn state_update(text: &str) -> StateUpdate {
    let value: Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(value["type"], "state_update", "not a state_update: {text}");
    assert_eq!(
        keys(&value),
        key_set(&["type", "entity_id", "property", "value", "timestamp"]),
        "state_update fields: {text}"
    );
    let raw: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).expect("JSON object");
    let timestamp = value["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {text}"))
        .to_string();
    assert_server_time(&timestamp, text);
    StateUpdate {
        entity_id: value["entity_id"]
            .as_str()
            .unwrap_or_else(|| panic!("entity_id is not a string: {text}"))
            .to_string(),
        property: value["property"]
            .as_str()
            .unwrap_or_else(|| panic!("property is not a string: {text}"))
            .to_string(),
        raw_value: raw["value"].get().trim().to_string(),
        value: value["value"].clone(),
        timestamp,
    }
}

/// Parses an `entity_deleted`, asserting it has exactly the contract's fields; returns the id.
fn entity_deleted(text: &str) -> String {
    let value: Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(
        value["type"], "entity_deleted",
        "not an entity_deleted: {text}"
    );
    assert_eq!(
        keys(&value),
        key_set(&["type", "entity_id", "timestamp"]),
        "entity_deleted fields: {text}"
    );
    assert_server_time(value["timestamp"].as_str().unwrap_or(""), text);
    value["entity_id"]
        .as_str()
        .unwrap_or_else(|| panic!("entity_id is not a string: {text}"))
        .to_string()
}

/// Asserts `text` is `{"type":"error","message":"<non-empty>"}`; returns the message.
fn error_reply(text: &str, context: &str) -> String {
    let value: Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(
        value["type"], "error",
        "{context}: wanted an error, got {text}"
    );
    assert_eq!(
        keys(&value),
        key_set(&["type", "message"]),
        "{context}: error fields: {text}"
    );
    let message = value["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: message is not a string: {text}"));
    assert!(!message.trim().is_empty(), "{context}: empty message");
    message.to_string()
}

/// Is `id` one of the server's own entities (only `*` subscribers see them)?
fn builtin(id: &str) -> bool {
    id.starts_with("flux-core/")
}

// ------------------------------------------------------------------ publishing

/// Publishes `properties_json` (raw JSON text, so numbers keep every digit) to `entity`.
fn publish_raw(s: &Server, entity: &str, properties_json: &str) {
    let body = format!(
        r#"{{"stream":"sensors","source":"ws-test","timestamp":{TS},"payload":{{"entity_id":{},"properties":{properties_json}}}}}"#,
        json!(entity)
    );
    let resp = s.post_raw("/api/events", body.as_bytes());
    assert_eq!(resp.status, 200, "publish {body} -> {}", resp.text);
}

/// Publishes `events` in one batch request, asserting every one was accepted.
fn publish_batch(client: &Client, events: &[Value]) {
    let (status, text) = client
        .post("/api/events/batch", &Value::Array(events.to_vec()))
        .unwrap_or_else(|e| panic!("batch publish: {e}"));
    assert_eq!(status, 200, "batch publish -> {text}");
    let body: Value = serde_json::from_str(&text).expect("batch reply JSON");
    assert_eq!(
        (body["successful"].as_u64(), body["failed"].as_u64()),
        (Some(events.len() as u64), Some(0)),
        "batch publish -> {}",
        &text[..text.len().min(500)]
    );
}

/// Publishes events `0..total` in batches of `batch`, each to `entity(seq)` with a property
/// `blob` of ~1 KB (`{"seq": seq, "pad": …}`): megabytes of updates, to fill a client that
/// reads nothing.
fn flood(client: &Client, total: u64, batch: u64, entity: impl Fn(u64) -> &'static str) {
    let pad = "p".repeat(1_000);
    for start in (0..total).step_by(batch as usize) {
        let events: Vec<Value> = (start..start + batch)
            .map(|seq| event(entity(seq), json!({"blob": {"seq": seq, "pad": pad}})))
            .collect();
        publish_batch(client, &events);
    }
}

/// The server's resident memory in bytes, from `/proc/<pid>/status`.
fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ------------------------------------------------------------------ subscriptions

#[test]
fn subscriptions_deliver_state_updates_to_matching_connections_only() {
    let s = Server::start();
    let patterns = ["ns/site-3/pump-01", "ns/*", "ns/site-3/*", "*", "other/*"];
    let mut sockets: Vec<Ws> = patterns
        .iter()
        .map(|p| {
            let mut ws = Ws::connect(s.addr());
            ws.subscribe(p);
            ws
        })
        .collect();

    // (entity, properties as raw JSON text)
    let published: [(&str, &str); 8] = [
        (
            "ns/site-3/pump-01",
            r#"{"temperature":22.5,"status":"active","big":123456789012345678901234567890,"nested":{"a":[1,"x",null,true],"b":{"c":-0.5}}}"#,
        ),
        ("ns/site-4/valve", r#"{"open":true}"#),
        ("ns/site-30/x", r#"{"v":1}"#),
        ("ns/site-3/deeper/still/y", r#"{"v":"deep"}"#),
        ("ns/site-3/pump-01x", r#"{"v":null}"#),
        ("ns2/thing", r#"{"v":2}"#),
        ("ns", r#"{"v":3}"#),
        ("other/z", r#"{"w":[]}"#),
    ];
    // (entity, property) -> raw value text
    let mut expected_values: BTreeMap<(String, String), String> = BTreeMap::new();
    for (entity, props) in published {
        let parsed: BTreeMap<String, Box<RawValue>> = serde_json::from_str(props).expect("JSON");
        for (name, raw) in parsed {
            expected_values.insert((entity.to_string(), name), raw.get().to_string());
        }
    }
    for (entity, props) in published {
        publish_raw(&s, entity, props);
    }

    let matches = |pattern: &str, id: &str| match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => id == pattern,
    };
    let mut received: Vec<Vec<(String, String)>> = vec![Vec::new(); patterns.len()];
    for (i, pattern) in patterns.iter().enumerate() {
        let want: BTreeSet<(String, String)> = expected_values
            .keys()
            .filter(|(id, _)| matches(pattern, id))
            .cloned()
            .collect();
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut got: BTreeSet<(String, String)> = BTreeSet::new();
        while !want.is_subset(&got) {
            let (text, _) = sockets[i].next_change(
                deadline,
                &format!(
                    "subscriber {pattern:?} waiting for {:?}",
                    want.difference(&got)
                ),
            );
            let update = state_update(&text);
            if builtin(&update.entity_id) {
                continue;
            }
            let key = (update.entity_id.clone(), update.property.clone());
            let expected = expected_values
                .get(&key)
                .unwrap_or_else(|| panic!("subscriber {pattern:?}: unexpected update {text}"));
            let want_value: Value = serde_json::from_str(expected).expect("JSON");
            assert_eq!(update.value, want_value, "value of {key:?}: {text}");
            if key.1 == "big" {
                assert_eq!(
                    &update.raw_value, expected,
                    "a number beyond 64 bits must keep every digit: {text}"
                );
            }
            got.insert(key.clone());
            received[i].push(key);
        }
    }
    // The `*` subscriber has seen every change, so everything for the others is on its way.
    for (i, pattern) in patterns.iter().enumerate() {
        for text in sockets[i].drain(DRAIN_WINDOW, pattern) {
            let update = state_update(&text);
            if !builtin(&update.entity_id) {
                received[i].push((update.entity_id, update.property));
            }
        }
        let mut want: Vec<(String, String)> = expected_values
            .keys()
            .filter(|(id, _)| matches(pattern, id))
            .cloned()
            .collect();
        let mut got = received[i].clone();
        want.sort();
        got.sort();
        assert_eq!(
            got, want,
            "subscriber {pattern:?}: exactly one state_update per matching property"
        );
    }
}

#[test]
fn updates_of_one_event_carry_its_timestamp() {
    let s = Server::start();
    let mut ws = Ws::connect(s.addr());
    ws.subscribe("ts/e");
    let before = now_ms();
    publish_raw(&s, "ts/e", r#"{"a":1,"b":2,"c":3}"#);
    let after = now_ms();
    let deadline = Instant::now() + READ_TIMEOUT;
    let updates: Vec<StateUpdate> = (0..3)
        .map(|_| state_update(&ws.next_change(deadline, "ts/e update").0))
        .collect();
    let names: BTreeSet<&str> = updates.iter().map(|u| u.property.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]));
    assert!(
        updates.iter().all(|u| u.timestamp == updates[0].timestamp),
        "{updates:?}"
    );
    // The accept time, as `lastUpdated` (whole milliseconds around the request).
    let ms = parse_iso_millis(&updates[0].timestamp).expect("ISO time");
    assert!(
        (before - 1000..=after + 1000).contains(&ms),
        "timestamp {} is not the time the server accepted the event",
        updates[0].timestamp
    );
    let (_, entity) = s.entity("ts/e");
    assert_eq!(entity["lastUpdated"], json!(updates[0].timestamp));
}

#[test]
fn overlapping_subscriptions_deliver_once_and_unsubscribe_removes_exactly_one() {
    let s = Server::start();
    let mut idle = Ws::connect(s.addr());
    let mut witness = Ws::connect(s.addr());
    witness.subscribe("*");
    let mut ws = Ws::connect(s.addr());
    ws.subscribe("multi/a");
    ws.subscribe("multi/*");
    ws.subscribe("multi/a"); // subscribing twice to the same pattern changes nothing

    let witness_sees = |witness: &mut Ws, entity: &str, property: &str| {
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            let (text, _) = witness.next_change(deadline, &format!("witness: {entity}.{property}"));
            let update = state_update(&text);
            if update.entity_id == entity && update.property == property {
                return;
            }
        }
    };
    let got = |ws: &mut Ws, witness: &mut Ws, entity: &str, property: &str| -> Vec<String> {
        witness_sees(witness, entity, property);
        ws.drain(DRAIN_WINDOW, "multi subscriber")
            .iter()
            .map(|text| {
                let u = state_update(text);
                format!("{}.{}={}", u.entity_id, u.property, u.raw_value)
            })
            .collect()
    };

    s.put("multi/a", json!({"x": 1}));
    assert_eq!(
        got(&mut ws, &mut witness, "multi/a", "x"),
        ["multi/a.x=1"],
        "an update matching two subscriptions arrives once"
    );

    ws.unsubscribe("multi/a");
    s.put("multi/a", json!({"x": 2}));
    assert_eq!(
        got(&mut ws, &mut witness, "multi/a", "x"),
        ["multi/a.x=2"],
        "unsubscribing the exact id keeps multi/*"
    );
    s.put("multi/b", json!({"y": 1}));
    assert_eq!(got(&mut ws, &mut witness, "multi/b", "y"), ["multi/b.y=1"]);

    ws.subscribe("multi/a");
    ws.unsubscribe("multi/*");
    s.put("multi/b", json!({"y": 2}));
    assert!(
        got(&mut ws, &mut witness, "multi/b", "y").is_empty(),
        "multi/* was unsubscribed"
    );
    s.put("multi/a", json!({"x": 3}));
    assert_eq!(
        got(&mut ws, &mut witness, "multi/a", "x"),
        ["multi/a.x=3"],
        "the exact subscription still delivers"
    );

    ws.unsubscribe("multi/a");
    s.put("multi/a", json!({"x": 4}));
    assert!(got(&mut ws, &mut witness, "multi/a", "x").is_empty());

    // A connection that never subscribed sees metrics and nothing else.
    let deadline = Instant::now() + Duration::from_secs(6);
    let (text, value) = idle.next_json(deadline, "idle connection: a metrics_update");
    assert_eq!(
        value["type"], "metrics_update",
        "a connection without subscriptions got {text}"
    );
    let extra = idle.drain(DRAIN_WINDOW, "idle connection");
    assert!(
        extra.is_empty(),
        "a connection without subscriptions got {extra:?}"
    );
}

/// "Several at once": `entity_id` may be an array, each item subscribing (or unsubscribing)
/// as if sent alone; an array with an item that is not a non-empty string is refused whole.
#[test]
fn an_array_of_ids_subscribes_to_each_at_once() {
    let s = Server::start();
    let mut witness = Ws::connect(s.addr());
    witness.subscribe("*");
    let mut ws = Ws::connect(s.addr());
    let changes = |ws: &mut Ws, witness: &mut Ws, puts: &[(&str, Value)]| -> Vec<String> {
        for (entity, properties) in puts {
            s.put(entity, properties.clone());
        }
        let (last, _) = puts.last().expect("a put");
        let deadline = Instant::now() + READ_TIMEOUT;
        while state_update(&witness.next_change(deadline, "witness").0).entity_id != *last {}
        let mut got: Vec<String> = ws
            .drain(DRAIN_WINDOW, "array subscriber")
            .iter()
            .map(|text| {
                let u = state_update(text);
                format!("{}.{}={}", u.entity_id, u.property, u.raw_value)
            })
            .collect();
        got.sort();
        got
    };

    ws.send_json(&json!({"type": "subscribe", "entity_id": ["arr/a", "arr/p/*"]}));
    ws.sync();
    let puts = [
        ("arr/a", json!({"x": 1})),
        ("arr/p/q", json!({"y": 1})),
        ("arr/other", json!({"z": 1})),
    ];
    assert_eq!(
        changes(&mut ws, &mut witness, &puts),
        ["arr/a.x=1", "arr/p/q.y=1"]
    );

    ws.send_json(&json!({"type": "unsubscribe", "entity_id": ["arr/a", "arr/p/*"]}));
    ws.sync();
    let puts = [("arr/a", json!({"x": 2})), ("arr/p/q", json!({"y": 2}))];
    assert!(changes(&mut ws, &mut witness, &puts).is_empty());

    for bad in [json!(["arr/a", 5]), json!(["arr/a", ""]), json!([])] {
        ws.send_json(&json!({"type": "subscribe", "entity_id": bad}));
        let deadline = Instant::now() + READ_TIMEOUT;
        let (text, _) = ws.next_change(deadline, "the reply to a bad array");
        let message = error_reply(&text, "a bad array");
        assert!(message.contains("entity_id"), "{message}");
    }
    let puts = [("arr/a", json!({"x": 3}))];
    assert!(
        changes(&mut ws, &mut witness, &puts).is_empty(),
        "a refused array subscribes to none of its items"
    );
}

// ------------------------------------------------------------------ deletes

#[test]
fn entity_deleted_reaches_matching_connections_for_every_kind_of_delete() {
    let s = Server::start();
    let mut witness = Ws::connect(s.addr());
    witness.subscribe("*");
    let mut prefix = Ws::connect(s.addr());
    prefix.subscribe("del/*");
    let mut exact = Ws::connect(s.addr());
    exact.subscribe("del/a");
    let mut unrelated = Ws::connect(s.addr());
    unrelated.subscribe("keep/*");

    for id in ["del/a", "del/tmp-1", "del/tmp-2", "del/c", "keep/x"] {
        s.put(id, json!({"v": 1}));
    }
    let drain_creates = |ws: &mut Ws, ids: &[&str], who: &str| {
        let mut left: BTreeSet<&str> = ids.iter().copied().collect();
        let deadline = Instant::now() + READ_TIMEOUT;
        while !left.is_empty() {
            let (text, _) = ws.next_change(deadline, who);
            let update = state_update(&text);
            left.remove(update.entity_id.as_str());
        }
    };
    drain_creates(
        &mut witness,
        &["del/a", "del/tmp-1", "del/tmp-2", "del/c", "keep/x"],
        "witness",
    );
    drain_creates(
        &mut prefix,
        &["del/a", "del/tmp-1", "del/tmp-2", "del/c"],
        "del/*",
    );
    drain_creates(&mut exact, &["del/a"], "del/a");
    drain_creates(&mut unrelated, &["keep/x"], "keep/*");

    let (status, body) = s.delete("/api/state/entities/del/a");
    assert_eq!(status, 200, "DELETE del/a -> {body}");
    let (status, body) = s.post("/api/state/entities/delete", &json!({"prefix": "del/tmp-"}));
    assert_eq!(status, 200, "batch delete -> {body}");
    assert_eq!(body["deleted"], 2, "batch delete -> {body}");
    s.put("del/c", json!({"__deleted__": true}));

    let expected = ["del/a", "del/c", "del/tmp-1", "del/tmp-2"];
    let read_deletes = |ws: &mut Ws, want: &[&str], who: &str| -> Vec<String> {
        let mut got = Vec::new();
        let deadline = Instant::now() + READ_TIMEOUT;
        while got.len() < want.len() {
            let (text, value) = ws.next_change(deadline, &format!("{who}: entity_deleted"));
            if value["type"] == "state_update" && builtin(value["entity_id"].as_str().unwrap_or(""))
            {
                continue;
            }
            got.push(entity_deleted(&text));
        }
        got
    };
    let mut seen = read_deletes(&mut witness, &expected, "witness");
    seen.sort();
    assert_eq!(seen, expected);
    let mut seen = read_deletes(&mut prefix, &expected, "del/*");
    seen.sort();
    assert_eq!(seen, expected);
    assert_eq!(read_deletes(&mut exact, &["del/a"], "del/a"), ["del/a"]);

    for (ws, who) in [
        (&mut prefix, "del/*"),
        (&mut exact, "del/a"),
        (&mut unrelated, "keep/*"),
    ] {
        let extra = ws.drain(DRAIN_WINDOW, who);
        assert!(extra.is_empty(), "{who}: unexpected messages {extra:?}");
    }
    assert_eq!(s.entity("del/c").0, 404, "__deleted__ removed the entity");
}

// ------------------------------------------------------------------ errors

#[test]
fn bad_client_messages_get_an_error_and_the_connection_stays_open() {
    let s = Server::start();
    let mut ws = Ws::connect(s.addr());
    let bad: Vec<(&str, Message)> = vec![
        ("bad JSON", Message::text("{not json")),
        ("empty text", Message::text("")),
        (
            "unknown type",
            Message::text(r#"{"type":"bogus","entity_id":"err/a"}"#),
        ),
        ("missing type", Message::text(r#"{"entity_id":"err/a"}"#)),
        (
            "numeric type",
            Message::text(r#"{"type":5,"entity_id":"err/a"}"#),
        ),
        ("array", Message::text(r#"["subscribe","err/*"]"#)),
        (
            "missing entity_id",
            Message::text(r#"{"type":"subscribe"}"#),
        ),
        (
            "empty entity_id",
            Message::text(r#"{"type":"subscribe","entity_id":""}"#),
        ),
        (
            "entity_id not a string",
            Message::text(r#"{"type":"subscribe","entity_id":7}"#),
        ),
        ("JSON that is not an object", Message::text("[1,2]")),
        ("binary message", Message::binary(vec![1u8, 2, 3])),
        (
            "binary subscribe",
            Message::binary(br#"{"type":"subscribe","entity_id":"err/*"}"#.to_vec()),
        ),
    ];
    for (what, message) in bad {
        ws.send(message);
        let deadline = Instant::now() + READ_TIMEOUT;
        let (text, _) = ws.next_change(deadline, what);
        error_reply(&text, what);
    }
    // Still open, and nothing above subscribed to anything.
    ws.subscribe("err/*");
    s.put("err/a", json!({"ok": true}));
    let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "update after errors");
    let update = state_update(&text);
    assert_eq!(
        (update.entity_id.as_str(), update.property.as_str()),
        ("err/a", "ok")
    );
    let extra = ws.drain(DRAIN_WINDOW, "after errors");
    assert!(
        extra.is_empty(),
        "one reply per bad message, one update: {extra:?}"
    );
}

// ------------------------------------------------------------------ metrics

#[test]
fn metrics_update_arrives_with_sensible_counts() {
    let s = Server::start();
    for i in 0..5 {
        s.put(&format!("metrics/e{}", i % 3), json!({"i": i}));
    }
    let _first = Ws::connect(s.addr());
    let mut ws = Ws::connect(s.addr());
    let deadline = Instant::now() + Duration::from_secs(5);
    let (text, m) = ws.next_json(deadline, "a metrics_update within 5 s");
    assert_eq!(
        m["type"], "metrics_update",
        "a connection without subscriptions got {text}"
    );
    assert_server_time(m["timestamp"].as_str().unwrap_or(""), &text);
    let count = |path: &str| -> u64 {
        m.pointer(path)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{path} is not a count: {text}"))
    };
    assert!(count("/entities/total") >= 3, "entities.total: {text}");
    assert!(count("/events/total") >= 5, "events.total: {text}");
    assert!(
        count("/websocket/connections") >= 2,
        "websocket.connections counts both open connections: {text}"
    );
    count("/publishers/active");
    let rate = m
        .pointer("/events/rate_per_second")
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("events.rate_per_second is not a number: {text}"));
    assert!(rate >= 0.0 && rate.is_finite(), "{text}");

    // Every 2 s: the next one comes too, and sees later events.
    for i in 0..4 {
        s.put("metrics/later", json!({"i": i}));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (text, value) = ws.next_json(deadline, "a second metrics_update");
        assert_eq!(value["type"], "metrics_update", "{text}");
        if value["events"]["total"].as_u64() >= Some(9) {
            break;
        }
    }
}

/// "Active publishers" are the sources that published within the last minute; a restart
/// (whose snapshot covers those events) does not forget them.
#[test]
fn active_publishers_survive_a_restart() {
    let mut s = Server::start();
    let client = s.client();
    let events: Vec<Value> = ["sensor-a", "sensor-b", "sensor-c"]
        .iter()
        .map(|source| {
            let mut e = event("pubs/e", json!({"v": 1}));
            e["source"] = json!(source);
            e
        })
        .collect();
    publish_batch(&client, &events);
    let active = |s: &Server| -> u64 {
        let mut ws = Ws::connect(s.addr());
        let deadline = Instant::now() + Duration::from_secs(5);
        let (text, m) = ws.next_json(deadline, "a metrics_update within 5 s");
        assert_eq!(m["type"], "metrics_update", "{text}");
        m.pointer("/publishers/active")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("publishers.active is not a count: {text}"))
    };
    assert_eq!(active(&s), 3);
    let status = s.terminate();
    assert!(status.success(), "SIGTERM: {status:?}");
    s.restart();
    assert_eq!(active(&s), 3, "after a restart from the final snapshot");
}

// ------------------------------------------------------------------ order

#[test]
fn rapid_updates_to_one_entity_arrive_in_publish_order() {
    let started = Instant::now();
    let s = Server::start();
    let mut ws = Ws::connect(s.addr());
    ws.subscribe("order/e");
    let mut prefix = Ws::connect(s.addr());
    prefix.subscribe("order/*");
    let client = s.client();
    const TOTAL: u64 = 1000;
    for chunk in 0..10 {
        let events: Vec<Value> = (chunk * 100..(chunk + 1) * 100)
            .map(|seq| event("order/e", json!({"seq": seq})))
            .collect();
        publish_batch(&client, &events);
    }
    for seq in TOTAL..TOTAL + 50 {
        s.put("order/e", json!({"seq": seq}));
    }
    for (ws, who) in [(&mut ws, "order/e"), (&mut prefix, "order/*")] {
        let deadline = Instant::now() + Duration::from_secs(30);
        for want in 0..TOTAL + 50 {
            let (text, _) = ws.next_change(deadline, &format!("{who}: seq {want}"));
            let update = state_update(&text);
            assert_eq!(
                (update.property.as_str(), update.value.as_u64()),
                ("seq", Some(want)),
                "{who}: updates out of order or missing: {text}"
            );
        }
    }
    // Writes are counted, and each carries one frame or more.
    let (status, metrics) = s.get_text("/metrics");
    assert_eq!(status, 200, "GET /metrics -> {metrics}");
    let sample = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name} "))?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}")) as u64
    };
    let frames = sample("flux_websocket_frames_queued_total");
    let writes = sample("flux_websocket_writes_total");
    assert!(frames >= 2 * (TOTAL + 50), "{frames} frames");
    // Writes also carry each connection's `metrics_update` (one at start, then every 2 s),
    // which are not change frames: at most one write each beyond one per change frame.
    let metrics_updates = 2 * (2 + started.elapsed().as_secs() / 2);
    assert!(
        (2..=frames + metrics_updates).contains(&writes),
        "{writes} writes for {frames} frames"
    );
}

// ------------------------------------------------------------------ slow consumer

#[test]
fn slow_consumer_is_closed_with_1008_while_others_get_everything() {
    const EVENTS: u64 = 40_000;
    const BATCH: u64 = 1_000;
    const PAD_BYTES: usize = 1_000;
    const RSS_LIMIT_BYTES: u64 = 300 << 20;
    let s = Server::start();
    let pid = s.pid().expect("server pid");

    let mut slow = Ws::connect(s.addr());
    slow.subscribe("*");
    let mut fast = Ws::connect(s.addr());
    fast.subscribe("*");

    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut last_seq: HashMap<String, i64> = HashMap::new();
            let mut seen: u64 = 0;
            while seen < EVENTS {
                let text = match fast.recv_until(deadline) {
                    Incoming::Text(text) => text,
                    other => {
                        return Err(format!("fast reader: after {seen} updates got {other:?}"));
                    }
                };
                if !text.contains("\"slow/") {
                    continue;
                }
                let update = state_update(&text);
                let seq = update.value["seq"].as_i64().unwrap_or(-1);
                let last = last_seq.entry(update.entity_id.clone()).or_insert(-1);
                if seq <= *last {
                    return Err(format!("fast reader: {text:.200} after seq {last}"));
                }
                *last = seq;
                seen += 1;
                received.store(seen, Ordering::Relaxed);
            }
            Ok(seen)
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut peak = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = resident_bytes(pid) {
                    peak = peak.max(rss);
                }
                thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };

    let pad = "p".repeat(PAD_BYTES);
    let client = s.client();
    for start in (0..EVENTS).step_by(BATCH as usize) {
        // Keep the reading client near the head so only the stalled one overflows.
        let caught_up = wait_for(Duration::from_secs(60), || {
            (received.load(Ordering::Relaxed) + 4 * BATCH >= start).then_some(())
        });
        assert!(
            caught_up.is_some(),
            "the reading client fell behind: {} of {start} updates after 60 s",
            received.load(Ordering::Relaxed)
        );
        let events: Vec<Value> = (start..start + BATCH)
            .map(|seq| {
                event(
                    &format!("slow/e{}", seq % 10),
                    json!({"blob": {"seq": seq, "pad": pad}}),
                )
            })
            .collect();
        publish_batch(&client, &events);
    }

    // Every push to the stalled connection happened before the last publish was answered, so
    // its overflow has happened: read what it had buffered, then its close frame.
    let (close, buffered) = slow.read_until_close(Duration::from_secs(60), "stalled client");
    let (code, reason) = close.expect("close frame with a code");
    assert_eq!(code, 1008, "stalled client closed with {code} {reason:?}");
    assert!(
        reason.to_lowercase().contains("overflow"),
        "close reason {reason:?} does not name the overflow"
    );
    assert!(
        buffered < EVENTS,
        "the stalled client got all {buffered} messages; nothing overflowed"
    );
    eprintln!("the stalled client read {buffered} messages before its close frame");

    let fast_seen = reader
        .join()
        .expect("reader thread")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fast_seen, EVENTS, "the reading client got every update");
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler thread");
    assert!(peak > 0, "could not read VmRSS of pid {pid}");
    eprintln!("server VmRSS peaked at {} MiB", peak >> 20);
    assert!(
        peak < RSS_LIMIT_BYTES,
        "server resident memory peaked at {} MiB",
        peak >> 20
    );
}

#[test]
fn overflow_is_counted_in_prometheus_metrics_while_the_client_is_still_stalled() {
    // `*` subscribers read the shared stream, others their own queue: both must notice the
    // overflow while the client reads nothing, not only once it reads again.
    for pattern in ["*", "count/*"] {
        let s = Server::start();
        let mut slow = Ws::connect(s.addr());
        slow.subscribe(pattern);
        flood(&s.client(), 40_000, 2_000, |_| "count/e");
        let counted = wait_for(Duration::from_secs(20), || {
            let (status, metrics) = s.get_text("/metrics");
            assert_eq!(status, 200, "GET /metrics -> {metrics}");
            let counted: Vec<String> = metrics
                .lines()
                .filter(|l| !l.starts_with('#') && l.to_lowercase().contains("overflow"))
                .filter(|l| {
                    l.rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v >= 1.0)
                })
                .map(str::to_string)
                .collect();
            (!counted.is_empty()).then_some(counted)
        });
        assert!(
            counted.is_some(),
            "{pattern}: no overflow counter of at least 1 in /metrics while the client is stalled"
        );

        let (close, _) = slow.read_until_close(Duration::from_secs(60), "stalled client");
        assert_eq!(
            close.map(|(code, _)| code),
            Some(1008),
            "{pattern}: the client overflowed"
        );
    }
}

/// A client that reads nothing for longer than the server's 30 s write timeout still finds,
/// once it reads again, whole frames and then a 1008 close naming the overflow: the client
/// that overflowed its queue, and one whose queue never filled (its socket took nothing for
/// 30 s). Nothing is cut mid-frame.
#[test]
fn a_client_stalled_past_the_write_timeout_reads_whole_frames_then_1008() {
    const STALL: Duration = Duration::from_secs(36);
    let s = Server::start();
    let mut flooded = Ws::connect(s.addr());
    flooded.subscribe("*");
    let mut quiet = Ws::connect(s.addr());
    quiet.subscribe("stall/quiet");
    // 40 MB for `*` (past its 8 MiB queue); ~7 MB for `stall/quiet`: more than the socket
    // buffers hold without reads, less than its queue.
    flood(&s.client(), 40_000, 1_000, |seq| {
        if seq < 7_000 {
            "stall/quiet"
        } else {
            "stall/other"
        }
    });
    thread::sleep(STALL);
    for (ws, name, words) in [
        (&mut flooded, "the flooded client", "overflow"),
        (&mut quiet, "the quiet client", "read nothing"),
    ] {
        let (close, read) = ws.read_until_close(Duration::from_secs(60), name);
        let (code, reason) = close.unwrap_or_else(|| panic!("{name}: a close frame with a code"));
        assert_eq!(
            code, 1008,
            "{name} closed with {code} {reason:?} after {read} messages"
        );
        assert!(reason.contains(words), "{name}: close reason {reason:?}");
        assert!(read > 0, "{name} read nothing before its close");
    }
}

// ------------------------------------------------------------------ many subscribers

/// Joins reader threads that each return how many updates they checked; panics with the first
/// failure.
fn join_counts(workers: Vec<thread::JoinHandle<Result<u64, String>>>) -> u64 {
    workers
        .into_iter()
        .map(|w| {
            w.join()
                .expect("worker thread")
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .sum()
}

#[test]
fn two_thousand_subscribers_all_receive_a_burst() {
    const THREADS: usize = 20;
    const PER_THREAD: usize = 100;
    const UPDATES: u64 = 20;
    let s = Server::start();
    let addr = s.addr().to_string();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(std::sync::Mutex::new(go_rx));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let addr = addr.clone();
            let ready_tx = ready_tx.clone();
            let go_rx = go_rx.clone();
            thread::spawn(move || -> Result<u64, String> {
                let mut sockets: Vec<Ws> = (0..PER_THREAD)
                    .map(|i| {
                        let mut ws = Ws::connect_with(&addr, 4096);
                        ws.subscribe(if i % 2 == 0 { "burst/*" } else { "burst/e" });
                        ws
                    })
                    .collect();
                let _ = ready_tx.send(());
                let _ = go_rx
                    .lock()
                    .map(|rx| rx.recv_timeout(Duration::from_secs(120)));
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut total = 0;
                for (n, ws) in sockets.iter_mut().enumerate() {
                    for want in 0..UPDATES {
                        let text = loop {
                            match ws.recv_until(deadline) {
                                Incoming::Text(t) if t.contains("\"state_update\"") => break t,
                                Incoming::Text(_) => {}
                                other => {
                                    return Err(format!(
                                        "connection {n}: wanted seq {want}, got {other:?}"
                                    ));
                                }
                            }
                        };
                        let update = state_update(&text);
                        if update.value.as_u64() != Some(want) {
                            return Err(format!("connection {n}: wanted seq {want}: {text}"));
                        }
                        total += 1;
                    }
                }
                Ok(total)
            })
        })
        .collect();
    drop(ready_tx);
    for _ in 0..THREADS {
        ready_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("all subscribers connected and subscribed");
    }
    for seq in 0..UPDATES {
        s.put("burst/e", json!({"seq": seq}));
    }
    for _ in 0..THREADS {
        let _ = go_tx.send(());
    }
    let total = join_counts(workers);
    assert_eq!(total, (THREADS * PER_THREAD) as u64 * UPDATES);
}

/// Heavy fan-out to `*` (more subscribers than a change writes directly, ~300,000 frames/s):
/// the sweeper writes them, and each still gets every update in order.
#[test]
fn heavy_fan_out_to_star_subscribers_arrives_whole_and_in_order() {
    const THREADS: usize = 3;
    const PER_THREAD: usize = 50;
    const EVENTS: u64 = 2_000;
    const BATCH: u64 = 100;
    let s = Server::start();
    let addr = s.addr().to_string();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let addr = addr.clone();
            let ready_tx = ready_tx.clone();
            thread::spawn(move || -> Result<u64, String> {
                let mut sockets: Vec<Ws> = (0..PER_THREAD)
                    .map(|_| {
                        let mut ws = Ws::connect(&addr);
                        ws.subscribe("*");
                        ws
                    })
                    .collect();
                let _ = ready_tx.send(());
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut next = vec![0u64; sockets.len()];
                // Round-robin, a little from each, so no socket backs up while another is read.
                while next.iter().any(|&n| n < EVENTS) {
                    for (n, ws) in sockets.iter_mut().enumerate() {
                        for _ in 0..100 {
                            if next[n] == EVENTS {
                                break;
                            }
                            let text = match ws.recv_until(deadline) {
                                Incoming::Text(t) => t,
                                other => {
                                    return Err(format!(
                                        "connection {n}: wanted seq {}, got {other:?}",
                                        next[n]
                                    ));
                                }
                            };
                            if !text.contains("\"sweep/e\"") {
                                continue; // metrics_update, the directory
                            }
                            let update = state_update(&text);
                            if update.value.as_u64() != Some(next[n]) {
                                return Err(format!("connection {n}: wanted {}: {text}", next[n]));
                            }
                            next[n] += 1;
                        }
                    }
                }
                Ok(next.iter().sum())
            })
        })
        .collect();
    drop(ready_tx);
    for _ in 0..THREADS {
        ready_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("all subscribers connected and subscribed");
    }
    let client = s.client();
    for start in (0..EVENTS).step_by(BATCH as usize) {
        let events: Vec<Value> = (start..start + BATCH)
            .map(|seq| event("sweep/e", json!({"seq": seq})))
            .collect();
        publish_batch(&client, &events);
        thread::sleep(Duration::from_millis(50));
    }
    let total = join_counts(workers);
    assert_eq!(total, (THREADS * PER_THREAD) as u64 * EVENTS);
    let (status, metrics) = s.get_text("/metrics");
    assert_eq!(status, 200, "GET /metrics -> {metrics}");
    let swept = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flux_websocket_sweep_writes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no flux_websocket_sweep_writes_total in /metrics:\n{metrics}"));
    assert!(swept >= 1.0, "the sweeper wrote ({swept} writes)");
}

// ------------------------------------------------------------------ control frames, limits

#[test]
fn ping_gets_a_pong_with_the_same_payload() {
    let s = Server::start();
    let mut ws = Ws::connect(s.addr());
    for payload in [b"flux-ping-42".to_vec(), Vec::new(), vec![0xAB; 125]] {
        ws.send(Message::Ping(payload.clone().into()));
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            match ws.recv_until(deadline) {
                Incoming::Pong(got) => {
                    assert_eq!(got, payload, "pong payload");
                    break;
                }
                Incoming::Text(text) if text.contains("metrics_update") => {}
                other => panic!("wanted a pong, got {other:?}"),
            }
        }
    }
    ws.subscribe("ping/*");
}

#[test]
fn message_over_64_kib_is_closed_with_1009() {
    let s = Server::start();
    // Exactly the limit is still a message.
    let mut ws = Ws::connect(s.addr());
    let mut at_limit = br#"{"type":"subscribe","entity_id":"big/*","pad":""#.to_vec();
    at_limit.resize(MAX_MESSAGE_BYTES - 2, b'x');
    at_limit.extend_from_slice(b"\"}");
    ws.send(Message::text(String::from_utf8(at_limit).expect("utf8")));
    ws.sync();
    s.put("big/a", json!({"v": 1}));
    let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "a 64 KiB subscribe works");
    assert_eq!(state_update(&text).entity_id, "big/a");

    let mut big = Ws::connect(s.addr());
    big.send(Message::text("x".repeat(MAX_MESSAGE_BYTES + 1)));
    let (close, _) = big.read_until_close(READ_TIMEOUT, "oversized message");
    let (code, reason) = close.expect("close frame with a code");
    assert_eq!(
        code, 1009,
        "oversized message closed with {code} {reason:?}"
    );

    // A message is limited after reassembly: fragments that are each small but add up to
    // more than the limit close the connection too.
    let mut fragmented = Ws::connect(s.addr());
    let half = MAX_MESSAGE_BYTES / 2 + 1;
    fragmented.send(Message::Frame(Frame::message(
        vec![b'x'; half],
        OpCode::Data(Data::Text),
        false,
    )));
    fragmented.send(Message::Frame(Frame::message(
        vec![b'x'; half],
        OpCode::Data(Data::Continue),
        true,
    )));
    let (close, _) = fragmented.read_until_close(READ_TIMEOUT, "oversized fragmented message");
    let (code, reason) = close.expect("close frame with a code");
    assert_eq!(
        code, 1009,
        "oversized fragmented message closed with {code} {reason:?}"
    );

    // The server lives on, and a small fragmented subscribe is one message.
    let mut after = Ws::connect(s.addr());
    let subscribe = br#"{"type":"subscribe","entity_id":"big/*"}"#;
    after.send(Message::Frame(Frame::message(
        subscribe[..10].to_vec(),
        OpCode::Data(Data::Text),
        false,
    )));
    after.send(Message::Frame(Frame::message(
        subscribe[10..].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )));
    after.sync();
    s.put("big/b", json!({"v": 2}));
    let (text, _) = after.next_change(Instant::now() + READ_TIMEOUT, "fragmented subscribe");
    assert_eq!(state_update(&text).entity_id, "big/b");
}

/// Opens `/api/ws` by hand, sends `frame` (client bytes, masked by the caller) and returns the
/// code of the server's close frame, skipping any other frame before it.
fn close_code_after(addr: &str, frame: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut conn = RawConn::connect(addr);
    let handshake = b"GET /api/ws HTTP/1.1\r\nHost: flux\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";
    let mut buf = Vec::new();
    let stream = conn.stream();
    stream.write_all(handshake).expect("handshake");
    stream.write_all(frame).expect("frame");
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut chunk = [0u8; 4096];
    let mut start = None;
    while Instant::now() < deadline {
        if start.is_none() {
            start = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if let Some(mut at) = start {
            // Server frames: unmasked, FIN set; walk them to the close frame.
            while buf.len() >= at + 2 {
                let (opcode, len) = (buf[at] & 0x0F, (buf[at + 1] & 0x7F) as usize);
                let (header, len) = match len {
                    126 if buf.len() >= at + 4 => {
                        (4, u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize)
                    }
                    126 => break,
                    n => (2, n),
                };
                if buf.len() < at + header + len {
                    break;
                }
                let payload = &buf[at + header..at + header + len];
                if opcode == 0x8 {
                    return (payload.len() >= 2)
                        .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                at += header + len;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    None
}

/// A client that reads the server's close frame but never answers it (nor closes its socket)
/// is let go after a short grace: the server's reader ends, and the connection is gone from
/// `/metrics`.
#[test]
fn a_client_that_never_answers_the_close_is_let_go() {
    use std::io::Write;
    let s = Server::start();
    let mut conn = RawConn::connect(s.addr());
    let stream = conn.stream();
    stream
        .write_all(
            b"GET /api/ws HTTP/1.1\r\nHost: flux\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("handshake");
    stream
        .write_all(&client_frame(
            0x1,
            br#"{"type":"subscribe","entity_id":"*"}"#,
        ))
        .expect("subscribe");
    let gauge = || -> f64 {
        let (_, text) = s.get_text("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("flux_websocket_connections "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(wait_for(Duration::from_secs(10), || (gauge() == 1.0).then_some(())).is_some());
    // Flood it while it reads nothing: its queue overflows (1008).
    flood(&s.client(), 30_000, 1_000, |_| "letgo/e");
    // Read everything, close frame included, and answer nothing.
    let (received, end) = read_until_end(stream, Duration::from_secs(20));
    assert!(
        end.is_ok(),
        "the server kept the silent client's connection open"
    );
    assert!(
        received.contains(&0x88), // a close frame's first byte; JSON text is ASCII
        "no close frame among {} bytes",
        received.len()
    );
    assert!(
        wait_for(Duration::from_secs(10), || (gauge() == 0.0).then_some(())).is_some(),
        "the connection is still counted: {}",
        gauge()
    );
}

/// A masked client frame (FIN set) with `opcode` and a short `payload`.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// RFC 6455 §7.4 and §8.1: a close frame carries a code a peer may send (never 1005) and a
/// UTF-8 reason, and text is UTF-8; a client that breaks either is closed with 1002 or 1007.
/// A valid close code is echoed.
#[test]
fn close_codes_and_text_follow_rfc_6455() {
    let s = Server::start();
    let close = |payload: &[u8]| close_code_after(s.addr(), &client_frame(0x8, payload));
    assert_eq!(close(&1000u16.to_be_bytes()), Some(1000));
    assert_eq!(
        close(b"\x0f\xa0going"),
        Some(4000),
        "a private code is echoed"
    );
    assert_eq!(
        close(b""),
        Some(1000),
        "no code: a normal close, never 1005"
    );
    for code in [1005u16, 1006, 999, 1004, 5000] {
        assert_eq!(
            close(&code.to_be_bytes()),
            Some(1002),
            "client close {code}"
        );
    }
    assert_eq!(close(b"\x03"), Some(1002), "a 1-byte close payload");
    assert_eq!(
        close(b"\x03\xe8\xff"),
        Some(1007),
        "a reason that is not UTF-8"
    );
    let text = client_frame(0x1, b"{\"type\":\"\xff\"}");
    assert_eq!(
        close_code_after(s.addr(), &text),
        Some(1007),
        "text that is not UTF-8"
    );
    // Text that is UTF-8 but not JSON is an application error: the connection stays open.
    let mut ws = Ws::connect(s.addr());
    ws.send_text("not json");
    let (reply, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "bad JSON");
    error_reply(&reply, "bad JSON");
    ws.subscribe("rfc/*");
}

/// RFC 6455 §4.2: the opening handshake needs HTTP/1.1 and version 13 (426 naming it
/// otherwise); a request on the route that is no upgrade at all gets 426 too. A key that is
/// not 16 bytes of base64 is let through (it changes nothing for the server).
#[test]
fn a_bad_opening_handshake_is_refused() {
    let s = Server::start();
    let request = |version: &str, key: &str, ws_version: &str| {
        format!(
            "GET /api/ws {version}\r\nHost: flux\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {ws_version}\r\n\r\n"
        )
        .into_bytes()
    };
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let r = s.raw_ok(&request("HTTP/1.1", key, "8"));
    assert_eq!(r.status, 426, "{}", r.text());
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
    error_message(&r.json());
    let r = s.raw_ok(&request("HTTP/1.0", key, "13"));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = s.raw_ok(b"GET /api/ws HTTP/1.1\r\nHost: flux\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 426, "{}", r.text());
    assert_eq!(r.header("upgrade"), Some("websocket"));
    let connection = r
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(connection.contains("upgrade"), "{connection}");
    // And a good handshake still works.
    let mut ws = Ws::connect(s.addr());
    ws.subscribe("hs/*");
}

/// Many failing ids in one message get one error frame, not one each.
#[test]
fn an_array_with_many_refused_ids_gets_one_error() {
    let s = Server::start();
    let mut ws = Ws::connect(s.addr());
    let ids: Vec<String> = (0..3000).map(|i| format!("many/{i}")).collect();
    ws.send_json(&json!({"type": "unsubscribe", "entity_id": ids}));
    let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "the refusal");
    let message = error_reply(&text, "unsubscribe of 3000 unknown ids");
    assert!(
        message.contains("not subscribed") && message.contains("2999 more"),
        "{message}"
    );
    // Past the cap: the first 1,024 are taken, the rest refused in one frame.
    ws.send_json(&json!({"type": "subscribe", "entity_id": ids}));
    let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "the refusal");
    let message = error_reply(&text, "subscribe of 3000 ids");
    assert!(
        message.contains("too many subscriptions") && message.contains("1975 more"),
        "{message}"
    );
    ws.send_text("{}");
    let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "the sync reply");
    assert!(
        error_reply(&text, "sync").contains("type"),
        "one error frame per message: {text}"
    );
    s.put("many/7", json!({"v": 1}));
    let (text, _) = ws.next_change(
        Instant::now() + READ_TIMEOUT,
        "an update of a subscribed id",
    );
    assert_eq!(state_update(&text).entity_id, "many/7");
}

/// A subscription no entity id could match (longer than an id, or holding control characters)
/// is refused: public readers cannot pile up megabytes of patterns per connection.
#[test]
fn subscriptions_no_id_could_match_are_refused() {
    let s = Server::start();
    let mut ws = Ws::connect(s.addr());
    for (id, why) in [
        (format!("long/{}", "x".repeat(600)), "512 bytes"),
        (format!("{}*", "y/".repeat(257)), "512 bytes"),
        ("ctl/a\u{1}b".to_string(), "control characters"),
    ] {
        ws.send_json(&json!({"type": "subscribe", "entity_id": id}));
        let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "the refusal");
        let message = error_reply(&text, why);
        assert!(message.contains(why), "{message}");
    }
    // The longest id and the longest prefix pattern are taken, and the connection goes on.
    let longest = format!("ok/{}", "z".repeat(509));
    ws.subscribe(&longest);
    ws.subscribe(&format!("{}*", &longest[..512]));
    s.put(&longest, json!({"v": 1}));
    let (text, _) = ws.next_change(Instant::now() + READ_TIMEOUT, "an update of the longest id");
    assert_eq!(state_update(&text).entity_id, longest);
}

#[test]
fn sigterm_closes_connected_clients_with_1001() {
    let mut s = Server::start();
    let mut subscribed = Ws::connect(s.addr());
    subscribed.subscribe("*");
    let mut idle = Ws::connect(s.addr());
    let mut prefix = Ws::connect(s.addr());
    prefix.subscribe("bye/*");
    s.put("bye/a", json!({"v": 1}));
    let status = s.terminate();
    assert!(status.success(), "flux exited with {status:?}");
    for (ws, who) in [
        (&mut subscribed, "subscribed to *"),
        (&mut idle, "idle"),
        (&mut prefix, "subscribed to bye/*"),
    ] {
        let (close, _) = ws.read_until_close(READ_TIMEOUT, who);
        let (code, reason) = close.unwrap_or_else(|| panic!("{who}: close frame without a code"));
        assert_eq!(code, 1001, "{who}: closed with {code} {reason:?}");
    }
}

// ------------------------------------------------------------------ the Python example

/// Panics (never skips) when `python3` or its `websockets` package is missing.
fn require_python_websockets() {
    let output = Command::new("python3")
        .args(["-c", "import websockets"])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for this test ({e}); install Python 3"));
    assert!(
        output.status.success(),
        "the Python websockets package is missing: `pip install websockets` ({})",
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

#[test]
fn python_websockets_example_prints_updates() {
    require_python_websockets();
    let s = Server::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ws_subscribe.py");
    let mut child = Command::new("python3")
        .arg("-u") // line by line: stdout is a pipe
        .arg(script)
        .arg(format!("ws://{}/api/ws", s.addr()))
        .arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, line_rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr_text = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        let mut text = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text
    };

    // The script says nothing when it has subscribed: publish to a probe entity until it
    // prints one.
    let mut lines: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = 0;
    while !lines.iter().any(|l| l.starts_with("myns/probe.n = ")) {
        if Instant::now() >= deadline {
            let err = stderr_text(&mut child);
            panic!("the Python example printed nothing for myns/probe: {lines:?}\n{err}");
        }
        s.put("myns/probe", json!({"n": probe}));
        probe += 1;
        if let Ok(line) = line_rx.recv_timeout(Duration::from_millis(300)) {
            lines.push(line);
        }
    }

    s.put("other/sensor-01", json!({"temperature": 1}));
    publish_raw(
        &s,
        "myns/sensor-01",
        r#"{"temperature":22.5,"status":"active"}"#,
    );
    publish_raw(&s, "myns/site-3/pump-01", r#"{"on":true,"rpm":1500}"#);
    let want = [
        "myns/sensor-01.temperature = 22.5",
        "myns/sensor-01.status = active",
        "myns/site-3/pump-01.on = True",
        "myns/site-3/pump-01.rpm = 1500",
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !want.iter().all(|w| lines.iter().any(|l| l == w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match line_rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let err = stderr_text(&mut child);
                panic!("the Python example printed {lines:?}, wanted {want:?}\n{err}");
            }
        }
    }
    while let Ok(line) = line_rx.recv_timeout(DRAIN_WINDOW) {
        lines.push(line);
    }
    let _ = stderr_text(&mut child);
    // Order across properties and entities is not part of the contract: compare as sets.
    let mut printed: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("myns/probe."))
        .collect();
    printed.sort_unstable();
    let mut want = want.to_vec();
    want.sort_unstable();
    assert_eq!(printed, want, "lines printed by the Python example");
}
