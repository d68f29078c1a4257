//! Log conformance: one test body, run against every [`Log`] backend — the embedded local log
//! and JetStream (a real `nats-server` spawned per test on a free port with its own store).
//!
//! What every backend must do, checked against the frames the test appended:
//! - an append completes with its first position once dispatched; positions are unique and
//!   increase in append order, record `i` of a frame is at `first + i`;
//! - the shards see records in log order; control records are applied before the append
//!   completes; a barrier sees the last dispatched position;
//! - `read_frame` finds every record's frame (content and accept time intact) and nothing at
//!   positions never written;
//! - reopening replays exactly the frames appended, in order, with the same positions, and
//!   later appends get higher positions;
//! - a frame larger than one NATS message (1 MiB) round-trips; an empty append completes.
//!
//! The JetStream tests need `nats-server` on the PATH (`apt-get install -y nats-server`).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flux_engine::control::{ConfigPatch, ControlChange};
use flux_engine::log::jetstream::{JetStreamLog, JetStreamOptions};
use flux_engine::log::local::{LocalLog, LocalLogOptions};
use flux_engine::log::{Log, LogError};
use flux_engine::record::{EventFields, EventId, Frame, LogPosition, PropertyIter, RecordBatch};
use flux_engine::shard::{ChangeObserver, Completion, Dispatcher, start_observed_shards};

/// Every bounded wait of these tests.
const WAIT: Duration = Duration::from_secs(20);

/// Opens a backend on the same durable store each time it is called.
type Factory<'a> = dyn FnMut(&mut dyn FnMut(Frame)) -> Arc<dyn Log> + 'a;

/// A frame as appended: `(event_id, entity_id, temp)` per event, or the control JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Event(String, String, String),
    Control(String),
}

fn items_of(frame: &Frame) -> Vec<Item> {
    (0..frame.len())
        .map(
            |i| match frame.control(i).expect("a stored record decodes") {
                Some(json) => Item::Control(json.to_owned()),
                None => {
                    let record = frame.record(i).expect("an event record");
                    let temp = record
                        .properties()
                        .find(|(n, _)| *n == "temp")
                        .map_or(String::new(), |(_, v)| v.to_owned());
                    Item::Event(
                        record.fields.event_id.to_string(),
                        record.fields.entity_id.to_owned(),
                        temp,
                    )
                }
            },
        )
        .collect()
}

fn batch_of(items: &[Item]) -> RecordBatch {
    let mut batch = RecordBatch::default();
    for item in items {
        match item {
            Item::Event(event_id, entity_id, temp) => {
                let fields = EventFields {
                    event_id: EventId::Text(event_id),
                    stream: "sensors",
                    source: "conformance",
                    timestamp: 1_708_694_400_000,
                    entity_id,
                    key: None,
                    schema: None,
                };
                batch.push_event(0, &fields, [("temp", temp.as_str())].into_iter());
            }
            Item::Control(json) => batch.push_control(json),
        }
    }
    batch
}

fn events(tag: &str, count: usize, pad: usize) -> Vec<Item> {
    (0..count)
        .map(|i| {
            let temp = format!("\"{}{}\"", i, "x".repeat(pad));
            Item::Event(format!("{tag}-{i}"), format!("acme/{tag}-{}", i % 7), temp)
        })
        .collect()
}

/// Entity updates in the order the shard applied them.
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<(String, String)>>,
}

impl ChangeObserver for Recorder {
    fn entity_updated(&self, entity_id: &str, _: u64, properties: PropertyIter<'_>) {
        let temp = properties
            .clone()
            .find(|(n, _)| *n == "temp")
            .map_or(String::new(), |(_, v)| v.to_owned());
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.push((entity_id.to_owned(), temp));
    }

    fn entity_deleted(&self, _: &str, _: u64) {}
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
}

/// Appends `items` and waits for the completion: the frame's first position.
fn append(
    rt: &tokio::runtime::Runtime,
    log: &Arc<dyn Log>,
    items: &[Item],
) -> Result<LogPosition, String> {
    let (completion, done) = Completion::new();
    rt.block_on(log.append(batch_of(items), completion))
        .map_err(|e| e.to_string())?;
    let outcome = rt
        .block_on(async { tokio::time::timeout(WAIT, done).await })
        .map_err(|_| "append did not complete in time".to_string())?
        .map_err(|_| "completion dropped".to_string())?;
    Ok(outcome?)
}

struct Started {
    log: Arc<dyn Log>,
    dispatcher: Dispatcher,
    recorder: Arc<Recorder>,
    replayed: Vec<Frame>,
}

fn start(factory: &mut Factory<'_>) -> Started {
    let recorder = Arc::new(Recorder::default());
    let (dispatcher, _threads) =
        start_observed_shards(1, Some(recorder.clone()), None, Default::default())
            .expect("start shards");
    let mut replayed = Vec::new();
    let log = factory(&mut |frame| replayed.push(frame));
    log.start(dispatcher.clone()).expect("start the log");
    Started {
        log,
        dispatcher,
        recorder,
        replayed,
    }
}

/// The one body every backend runs.
fn conformance(factory: &mut Factory<'_>) {
    let rt = runtime();
    let s = start(factory);
    assert!(s.replayed.is_empty(), "a new log replays nothing");
    assert_eq!(s.log.unavailable_reason(), None);
    let first_next = s.log.next_position();

    // Appends of several shapes: one event, many, a control record between events.
    let config = ControlChange::ConfigChanged {
        patch: ConfigPatch {
            rate_limit_per_namespace_per_minute: Some(77),
            ..ConfigPatch::default()
        },
    };
    let control = serde_json::to_string(&config).expect("control json");
    let mut frames: Vec<(LogPosition, Vec<Item>)> = Vec::new();
    let shapes: Vec<Vec<Item>> = vec![
        events("one", 1, 0),
        events("many", 50, 3),
        vec![
            Item::Event("c-0".into(), "acme/c".into(), "1".into()),
            Item::Control(control),
            Item::Event("c-1".into(), "acme/c".into(), "2".into()),
        ],
        events("more", 10, 0),
    ];
    for items in shapes {
        let first = append(&rt, &s.log, &items).expect("append");
        if let Some((previous, items)) = frames.last() {
            assert!(
                first >= previous + items.len() as u64,
                "positions increase: {first} after {previous}+{}",
                items.len()
            );
        } else {
            assert!(first >= first_next.min(1), "first position {first}");
        }
        frames.push((first, items));
    }
    let limit = s
        .dispatcher
        .control()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .config
        .rate_limit_per_namespace_per_minute;
    assert_eq!(
        limit, 77,
        "a control record is applied before its append completes"
    );

    // The shard applied every event, in log order.
    let expected: Vec<(String, String)> = frames
        .iter()
        .flat_map(|(_, items)| items.iter())
        .filter_map(|item| match item {
            Item::Event(_, entity, temp) => Some((entity.clone(), temp.clone())),
            Item::Control(_) => None,
        })
        .collect();
    let applied = s
        .recorder
        .applied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(applied, expected, "dispatch order");

    // A barrier runs after everything dispatched and sees the last position.
    let (last_first, last_items) = frames.last().cloned().expect("frames");
    let last_position = last_first + last_items.len() as u64 - 1;
    let (tx, rx) = std::sync::mpsc::channel();
    s.log
        .barrier(Box::new(move |last, _| {
            let _ = tx.send(last);
        }))
        .expect("barrier");
    assert_eq!(rx.recv_timeout(WAIT).expect("barrier ran"), last_position);
    assert!(s.log.next_position() > last_position);
    assert!(s.log.first_position() <= frames[0].0);

    // Every record reads back from its frame.
    for (first, items) in &frames {
        for i in 0..items.len() as u64 {
            let frame = s
                .log
                .read_frame(first + i)
                .expect("read_frame")
                .unwrap_or_else(|| panic!("no frame at {}", first + i));
            assert_eq!(frame.first_position, *first);
            assert_eq!(&items_of(&frame), items);
        }
    }
    assert!(s.log.read_frame(0).expect("read 0").is_none());
    let beyond = s.log.next_position() + (1 << 40);
    assert!(s.log.read_frame(beyond).expect("read beyond").is_none());

    // An empty append completes without a position of its own.
    let (completion, done) = Completion::new();
    rt.block_on(s.log.append(RecordBatch::default(), completion))
        .expect("empty append");
    let empty = rt
        .block_on(async { tokio::time::timeout(WAIT, done).await })
        .expect("empty append completes")
        .expect("completion")
        .expect("empty append succeeds");
    assert!(empty > last_position);

    // A frame far larger than one NATS message (~3 MiB).
    let big = events("big", 30, 100_000);
    let big_first = append(&rt, &s.log, &big).expect("big append");
    assert!(big_first > last_position);
    let frame = s
        .log
        .read_frame(big_first + 29)
        .expect("read big")
        .expect("big frame");
    assert_eq!(items_of(&frame), big);
    frames.push((big_first, big));

    s.log.close();
    assert!(
        s.log.unavailable_reason().is_some(),
        "a closed log takes no writes"
    );
    let refused = append(&rt, &s.log, &events("late", 1, 0));
    assert!(refused.is_err(), "append after close: {refused:?}");
    drop(s);

    // Reopen: the same frames, same positions, same order; then more appends go after them.
    let s = start(factory);
    let replayed: Vec<(LogPosition, Vec<Item>)> = s
        .replayed
        .iter()
        .map(|f| (f.first_position, items_of(f)))
        .collect();
    assert_eq!(replayed, frames, "replay after reopen");
    let accept: Vec<u64> = s.replayed.iter().map(|f| f.accept_time_ms).collect();
    assert!(accept.iter().all(|&ms| ms > 0), "accept times kept");
    let after = append(&rt, &s.log, &events("after", 2, 0)).expect("append after reopen");
    let (big_first, big) = frames.last().expect("big");
    assert!(after >= big_first + big.len() as u64);
    let frame = s.log.read_frame(after + 1).expect("read").expect("frame");
    assert_eq!(items_of(&frame), events("after", 2, 0));
    s.log.close();
}

#[test]
fn local_log_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log");
    conformance(&mut |visit| {
        let (log, _) = LocalLog::open(&path, LocalLogOptions::default(), visit).expect("open");
        Arc::new(log)
    });
}

#[test]
fn jetstream_log_conforms() {
    let nats = NatsServer::start();
    let options = JetStreamOptions::new(vec![nats.host_port()], "FLUX");
    conformance(&mut |visit| {
        let (log, _) = JetStreamLog::open(options.clone(), visit).expect("open");
        Arc::new(log)
    });
}

#[test]
fn jetstream_refuses_a_mismatching_stream_and_fails_fast_without_nats() {
    let nats = NatsServer::start();
    let options = JetStreamOptions::new(vec![nats.host_port()], "FLUX");
    let (log, summary) = JetStreamLog::open(options.clone(), &mut |_| {}).expect("open");
    assert!(summary.created);
    drop(log);
    let mut other_subject = options.clone();
    other_subject.subject = "elsewhere".into();
    match JetStreamLog::open(other_subject, &mut |_| {}) {
        Err(LogError::Corrupt(reason)) => assert!(reason.contains("subjects"), "{reason}"),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a stream with other subjects was accepted"),
    }

    // NATS goes away under a started log: appends fail at once as unavailable.
    let rt = runtime();
    let (dispatcher, _threads) =
        start_observed_shards(1, None, None, Default::default()).expect("shards");
    let (log, _) = JetStreamLog::open(options.clone(), &mut |_| {}).expect("reopen");
    let log: Arc<dyn Log> = Arc::new(log);
    log.start(dispatcher).expect("start");
    append(&rt, &log, &events("up", 1, 0)).expect("append while up");
    nats.stop();
    let down = wait_until(|| log.unavailable_reason());
    assert!(down.contains("NATS"), "{down}");
    match append(&rt, &log, &events("down", 1, 0)) {
        Err(reason) => assert!(reason.contains("unavailable"), "{reason}"),
        Ok(position) => panic!("append succeeded at {position} with NATS down"),
    }

    // It comes back on the same port and store: writes resume, nothing was lost.
    nats.start_again();
    wait_until(|| log.unavailable_reason().is_none().then_some(()));
    let back = wait_until(|| append(&rt, &log, &events("back", 1, 0)).ok());
    let frame = log.read_frame(back).expect("read").expect("frame");
    assert_eq!(items_of(&frame), events("back", 1, 0));
    log.close();

    // Nothing listening: open fails quickly with a reason, rather than hanging.
    nats.stop();
    match JetStreamLog::open(options, &mut |_| {}) {
        Err(LogError::Unavailable(reason)) => assert!(reason.contains("NATS"), "{reason}"),
        Err(other) => panic!("expected unavailable, got {other}"),
        Ok(_) => panic!("opened without NATS"),
    }
}

fn wait_until<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `nats-server -js` on a free loopback port with its own store; killed on drop.
struct NatsServer {
    child: Mutex<Option<Child>>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let server = NatsServer {
            child: Mutex::new(None),
            port,
            dir: tempfile::tempdir().expect("nats store"),
        };
        server.start_again();
        server
    }

    fn start_again(&self) {
        let child = spawn_nats(self.port, &self.dir.path().join("store"));
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        wait_until(|| TcpStream::connect(("127.0.0.1", self.port)).ok());
    }

    fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn spawn_nats(port: u16, store: &Path) -> Child {
    Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server (apt-get install -y nats-server)")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
