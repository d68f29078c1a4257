//! Black-box tests of the embedded durable log ([`LocalLog`]) through its public API.
//!
//! What is checked, each against a plain in-memory oracle of the frames appended:
//! - a model-based property test: random appends, clean reopens and crash reopens (a torn or
//!   garbage tail on the newest segment), with segments small enough to roll;
//! - crash safety: the last frame cut at every byte, every earlier frame survives;
//! - damage that is not a torn tail (in an older segment, or before intact frames of two later
//!   commits) makes `open` refuse with `LogError::Corrupt`;
//! - `compact` drops only whole, covered, old segments and never the active one;
//! - group commit under concurrent appenders keeps positions unique, dense and ordered;
//! - regressions and edge cases: empty batches, `skip_to`, `close` with appends in flight,
//!   reads through the sparse index of a large segment;
//! - spare segments: a busy log rolls into files of zeros, reopens them without calling the
//!   zeros damage, writes after its last frame inside them, and cuts a torn write in one.
//!
//! `PROPTEST_CASES=n` runs the property test longer than its default.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flux_engine::log::local::{LocalLog, LocalLogOptions, OpenSummary};
use flux_engine::log::{Log, LogError};
use flux_engine::record::{
    EventFields, EventId, Frame, FrameRead, LogPosition, RecordBatch, decode_frame,
};
use flux_engine::shard::{Completion, Dispatcher, start_shards};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;

/// Every test uses one shard, so every record is owned by shard 0.
const SHARD: u16 = 0;
/// Segment size when a test wants everything in one segment.
const LARGE_SEGMENT_BYTES: u64 = 64 << 20;

/// One event as the test built it (owned, comparable).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    event_id: String,
    stream: String,
    source: String,
    timestamp: i64,
    entity_id: String,
    key: Option<String>,
    schema: Option<String>,
    properties: Vec<(String, String)>,
}

/// A frame as the oracle expects to read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredFrame {
    first_position: LogPosition,
    accept_time_ms: u64,
    events: Vec<Event>,
}

impl StoredFrame {
    fn from_frame(frame: &Frame) -> Self {
        let events = (0..frame.len())
            .map(|i| {
                let record = frame.record(i).expect("a stored record decodes");
                let f = record.fields;
                Event {
                    event_id: f.event_id.to_string(),
                    stream: f.stream.to_owned(),
                    source: f.source.to_owned(),
                    timestamp: f.timestamp,
                    entity_id: f.entity_id.to_owned(),
                    key: f.key.map(str::to_owned),
                    schema: f.schema.map(str::to_owned),
                    properties: record
                        .properties()
                        .map(|(name, value)| (name.to_owned(), value.to_owned()))
                        .collect(),
                }
            })
            .collect();
        StoredFrame {
            first_position: frame.first_position,
            accept_time_ms: frame.accept_time_ms,
            events,
        }
    }

    fn positions(&self) -> Range<LogPosition> {
        self.first_position..self.first_position + self.events.len() as u64
    }
}

fn event(event_id: &str, entity_id: &str) -> Event {
    Event {
        event_id: event_id.to_owned(),
        stream: "sensors".to_owned(),
        source: "local-log-test".to_owned(),
        timestamp: 1_708_694_400_000,
        entity_id: entity_id.to_owned(),
        key: None,
        schema: None,
        properties: vec![("temp".to_owned(), "22.5".to_owned())],
    }
}

fn batch_of(events: &[Event]) -> RecordBatch {
    let mut batch = RecordBatch::default();
    for e in events {
        let fields = EventFields {
            event_id: EventId::Text(&e.event_id),
            stream: &e.stream,
            source: &e.source,
            timestamp: e.timestamp,
            entity_id: &e.entity_id,
            key: e.key.as_deref(),
            schema: e.schema.as_deref(),
        };
        let properties = e.properties.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        batch.push_event(SHARD, &fields, properties);
    }
    batch
}

/// A started log and what opening it found.
struct Opened {
    log: LocalLog,
    summary: OpenSummary,
    frames: Vec<StoredFrame>,
}

/// Opens the log in `dir` without starting it (for tests that expect `open` to fail).
fn open_only(dir: &Path, segment_bytes: u64) -> Result<(LocalLog, OpenSummary), LogError> {
    LocalLog::open(
        dir,
        LocalLogOptions {
            segment_bytes,
            ..Default::default()
        },
        &mut |_| {},
    )
}

/// Opens the log in `dir`, collects every replayed frame and starts the writer on one shard.
fn open(dir: &Path, segment_bytes: u64) -> Opened {
    open_with(
        dir,
        LocalLogOptions {
            segment_bytes,
            ..Default::default()
        },
    )
}

/// [`open`] with any options.
fn open_with(dir: &Path, options: LocalLogOptions) -> Opened {
    let mut frames = Vec::new();
    let (log, summary) = LocalLog::open(dir, options, &mut |frame| {
        frames.push(StoredFrame::from_frame(&frame))
    })
    .expect("log opens");
    let (dispatcher, _shard_threads) = start_shards(1).expect("shard starts");
    // The writer owns the only dispatcher left, so the shard thread exits once the log closes.
    log.start(dispatcher).expect("writer starts");
    Opened {
        log,
        summary,
        frames,
    }
}

/// Appends `events` as one frame and waits until it is durable and applied.
async fn append(log: &LocalLog, events: &[Event]) -> Result<LogPosition, String> {
    let (completion, done) = Completion::new();
    Log::append(log, batch_of(events), completion)
        .await
        .map_err(|e| e.to_string())?;
    Ok(done.await.map_err(|_| "completion dropped".to_owned())??)
}

/// Appends `events` and returns the frame as stored (with the accept time the log gave it).
async fn append_frame(log: &LocalLog, events: &[Event]) -> StoredFrame {
    let first_position = append(log, events).await.expect("append succeeds");
    let frame = log
        .read_frame(first_position)
        .expect("read after append")
        .expect("appended frame is readable");
    let stored = StoredFrame::from_frame(&frame);
    assert_eq!(
        stored.first_position, first_position,
        "read_frame returned another frame"
    );
    assert_eq!(
        stored.events, events,
        "appended frame reads back differently"
    );
    stored
}

/// Waits until the writer has finished everything queued so far, segment rolls included (an
/// append completes once its frame is applied, which can be just before the roll).
fn settle(log: &LocalLog) {
    let (tx, rx) = std::sync::mpsc::channel();
    let barrier = Box::new(move |last: LogPosition, _: &Dispatcher| {
        let _ = tx.send(last);
    });
    log.barrier(barrier).expect("barrier queued");
    let last = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("barrier ran");
    assert_eq!(
        last + 1,
        log.next_position(),
        "barrier saw another last position"
    );
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The `.seg` files of a log directory, oldest first (names are zero-padded positions).
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("log dir lists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

fn segment_first_position(path: &Path) -> LogPosition {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("segment file name");
    stem.parse()
        .expect("segment file is named after a position")
}

/// Byte ranges of the frames of a segment file that must hold only whole, valid frames.
fn frame_spans(bytes: &[u8]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_frame(&bytes[at..]) {
            Ok(FrameRead::Frame(_, used)) => {
                spans.push(at..at + used);
                at += used;
            }
            _ => panic!("segment holds a bad or partial frame at offset {at}"),
        }
    }
    spans
}

fn newest_segment(dir: &Path) -> PathBuf {
    segment_files(dir).pop().expect("at least one segment")
}

fn set_file_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open segment")
        .set_len(len)
        .expect("cut");
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy");
    for entry in fs::read_dir(from).expect("list") {
        let entry = entry.expect("dir entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copy file");
    }
}

/// Checks a (re)opened log against the oracle: replayed frames, positions, random reads.
fn check_against_oracle(opened: &Opened, oracle: &[StoredFrame], context: &str) {
    assert_eq!(
        opened.frames, oracle,
        "{context}: replayed frames differ from the oracle"
    );
    let records: u64 = oracle.iter().map(|f| f.events.len() as u64).sum();
    assert_eq!(
        opened.summary.frames,
        oracle.len() as u64,
        "{context}: summary.frames"
    );
    assert_eq!(
        opened.summary.records, records,
        "{context}: summary.records"
    );
    check_reads(&opened.log, oracle, context);
}

/// `read_frame` returns the frame holding each stored position, and nothing outside the log.
fn check_reads(log: &LocalLog, oracle: &[StoredFrame], context: &str) {
    // An empty log (fresh, or compacted to its empty active segment) continues at its start.
    let next = oracle
        .last()
        .map_or(log.first_position(), |f| f.positions().end);
    assert_eq!(log.next_position(), next, "{context}: next_position");
    for frame in oracle {
        for position in frame.positions() {
            let read = log
                .read_frame(position)
                .expect("read_frame")
                .unwrap_or_else(|| panic!("{context}: read_frame({position}) found nothing"));
            assert_eq!(
                &StoredFrame::from_frame(&read),
                frame,
                "{context}: read_frame({position})"
            );
        }
    }
    assert!(
        log.read_frame(0).expect("read_frame(0)").is_none(),
        "{context}: position 0"
    );
    assert!(
        log.read_frame(next).expect("read_frame(next)").is_none(),
        "{context}: next"
    );
}

/// Segment files are named after their first frame and only the newest is below the roll size.
fn check_segments(dir: &Path, segment_bytes: u64, oracle: &[StoredFrame], context: &str) {
    let files = segment_files(dir);
    let mut expected_first = 1;
    for (i, path) in files.iter().enumerate() {
        let bytes = fs::read(path).expect("read segment");
        let first = segment_first_position(path);
        assert_eq!(
            first,
            expected_first,
            "{context}: {} is misnamed",
            path.display()
        );
        let spans = frame_spans(&bytes);
        for span in &spans {
            let FrameRead::Frame(frame, _) = decode_frame(&bytes[span.clone()]).expect("valid")
            else {
                unreachable!("checked by frame_spans")
            };
            assert_eq!(
                frame.first_position, expected_first,
                "{context}: frame out of order"
            );
            expected_first += frame.len() as u64;
        }
        if i + 1 < files.len() {
            assert!(
                bytes.len() as u64 >= segment_bytes,
                "{context}: {} rolled at {} bytes, before segment_bytes {segment_bytes}",
                path.display(),
                bytes.len()
            );
            // The model appends one frame per group commit, so a segment rolls right after the
            // frame that made it reach `segment_bytes`.
            let before_last = spans.last().map_or(0, |last| last.start) as u64;
            assert!(
                before_last < segment_bytes,
                "{context}: {} did not roll at {before_last} bytes",
                path.display()
            );
        }
    }
    let next = oracle.last().map_or(1, |f| f.positions().end);
    assert_eq!(
        expected_first, next,
        "{context}: segments end at the wrong position"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Model-based property test.

/// How a crash leaves the newest segment.
#[derive(Debug, Clone)]
enum Tear {
    /// Cut this share of the last frame's bytes (0 up to the whole frame) off the file's end.
    Cut(Index),
    /// The last frame never reached the disk: the file ends on a frame boundary.
    LoseLastFrame,
    /// Half-written bytes after the last whole frame.
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Event>),
    CleanReopen,
    CrashReopen(Tear),
}

fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("true".to_owned()),
        Just("null".to_owned()),
        "[a-z ]{0,12}".prop_map(|s| format!("\"{s}\"")),
        "\\PC{0,6}".prop_map(|s| format!("{s:?}")),
    ]
}

fn event_strategy() -> impl Strategy<Value = Event> {
    (
        "[0-9a-f]{8}",
        "[a-z]{1,8}",
        "[a-z0-9]{0,6}",
        any::<i64>(),
        "[a-z]{1,5}/[a-z0-9-]{1,10}",
        proptest::option::of("[a-z0-9]{1,6}"),
        proptest::option::of("\\PC{0,6}"),
        proptest::collection::vec(("[a-z_]{1,8}", json_value()), 0..4),
    )
        .prop_map(
            |(event_id, stream, source, timestamp, entity_id, key, schema, properties)| Event {
                event_id,
                stream,
                source,
                timestamp,
                entity_id,
                key,
                schema,
                properties,
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(event_strategy(), 1..5).prop_map(Op::Append),
        1 => Just(Op::CleanReopen),
        2 => any::<Index>().prop_map(|i| Op::CrashReopen(Tear::Cut(i))),
        1 => Just(Op::CrashReopen(Tear::LoseLastFrame)),
        1 => proptest::collection::vec(any::<u8>(), 1..48)
            .prop_map(|g| Op::CrashReopen(Tear::Garbage(g))),
    ]
}

/// Applies `tear` to the newest segment of a closed log; updates the oracle and returns the
/// bytes the reopen must drop and the length the segment must have afterwards.
fn tear_newest_segment(dir: &Path, tear: &Tear, oracle: &mut Vec<StoredFrame>) -> (u64, u64) {
    let path = newest_segment(dir);
    let bytes = fs::read(&path).expect("read newest segment");
    let spans = frame_spans(&bytes);
    match tear {
        Tear::Cut(_) | Tear::LoseLastFrame => {
            let Some(last) = spans.last() else {
                // An empty newest segment (just rolled) has no frame to tear.
                return (0, 0);
            };
            let cut = match tear {
                Tear::Cut(share) => share.index(last.len() + 1),
                _ => last.len(),
            };
            set_file_len(&path, (bytes.len() - cut) as u64);
            if cut == 0 {
                return (0, bytes.len() as u64);
            }
            let torn = oracle.pop().expect("the oracle holds the newest frame");
            let Ok(FrameRead::Frame(frame, _)) = decode_frame(&bytes[last.clone()]) else {
                unreachable!("checked by frame_spans")
            };
            assert_eq!(
                frame.first_position, torn.first_position,
                "oracle and segment disagree"
            );
            ((last.len() - cut) as u64, last.start as u64)
        }
        Tear::Garbage(garbage) => {
            let mut file = OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("open segment");
            file.write_all(garbage).expect("write garbage");
            (garbage.len() as u64, bytes.len() as u64)
        }
    }
}

fn run_model(segment_bytes: u64, ops: Vec<Op>) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let runtime = current_thread_runtime();
    let mut oracle: Vec<StoredFrame> = Vec::new();
    let mut opened = open(&dir, segment_bytes);
    check_against_oracle(&opened, &oracle, "fresh log");
    for (step, op) in ops.iter().enumerate() {
        let context = format!("step {step} ({op:?})");
        match op {
            Op::Append(events) => {
                let stored = runtime.block_on(append_frame(&opened.log, events));
                let expected_first = oracle.last().map_or(1, |f| f.positions().end);
                assert_eq!(
                    stored.first_position, expected_first,
                    "{context}: first position"
                );
                if let Some(previous) = oracle.last() {
                    assert!(
                        stored.accept_time_ms >= previous.accept_time_ms,
                        "{context}: time"
                    );
                }
                oracle.push(stored);
                assert_eq!(
                    opened.log.next_position(),
                    expected_first + events.len() as u64
                );
            }
            Op::CleanReopen => {
                opened.log.close();
                check_segments(&dir, segment_bytes, &oracle, &context);
                opened = open(&dir, segment_bytes);
                assert_eq!(
                    opened.summary.dropped_bytes, 0,
                    "{context}: clean log lost bytes"
                );
                check_against_oracle(&opened, &oracle, &context);
            }
            Op::CrashReopen(tear) => {
                opened.log.close();
                let (dropped, cut_len) = tear_newest_segment(&dir, tear, &mut oracle);
                opened = open(&dir, segment_bytes);
                assert_eq!(
                    opened.summary.dropped_bytes, dropped,
                    "{context}: dropped bytes"
                );
                let newest_len = fs::metadata(newest_segment(&dir)).expect("stat").len();
                assert_eq!(
                    newest_len, cut_len,
                    "{context}: tail not cut to a frame boundary"
                );
                check_against_oracle(&opened, &oracle, &context);
                check_segments(&dir, segment_bytes, &oracle, &context);
            }
        }
    }
    // Appending after the last reopen continues right after the oracle, and survives a reopen.
    let extra = vec![event("final", "acme/final")];
    let stored = runtime.block_on(append_frame(&opened.log, &extra));
    assert_eq!(
        stored.first_position,
        oracle.last().map_or(1, |f| f.positions().end)
    );
    oracle.push(stored);
    opened.log.close();
    let reopened = open(&dir, segment_bytes);
    check_against_oracle(&reopened, &oracle, "final reopen");
    check_segments(&dir, segment_bytes, &oracle, "final reopen");
    reopened.log.close();
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES overrides the default for longer local runs.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn log_matches_oracle_across_appends_reopens_and_crashes(
        segment_bytes in prop_oneof![Just(300u64), 200u64..2_000, Just(LARGE_SEGMENT_BYTES)],
        ops in proptest::collection::vec(op_strategy(), 1..40),
    ) {
        run_model(segment_bytes, ops);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Every-byte truncation of the last frame.

/// Builds a closed log whose newest segment ends with a frame; returns the oracle.
fn build_log(dir: &Path, frames: usize, last_alone_in_segment: bool) -> Vec<StoredFrame> {
    let runtime = current_thread_runtime();
    let mut oracle = Vec::new();
    let events = |i: usize| -> Vec<Event> {
        (0..1 + i % 3)
            .map(|j| event(&format!("e{i}-{j}"), &format!("acme/pump-{i:02}")))
            .collect()
    };
    if last_alone_in_segment {
        // Roll after every frame, then reopen with a large segment so the final append lands
        // alone in the fresh (previously empty) newest segment.
        let opened = open(dir, 1);
        for i in 0..frames - 1 {
            oracle.push(runtime.block_on(append_frame(&opened.log, &events(i))));
        }
        opened.log.close();
        let opened = open(dir, LARGE_SEGMENT_BYTES);
        oracle.push(runtime.block_on(append_frame(&opened.log, &events(frames - 1))));
        opened.log.close();
        let bytes = fs::read(newest_segment(dir)).expect("read newest");
        assert_eq!(
            frame_spans(&bytes).len(),
            1,
            "newest segment should hold one frame"
        );
    } else {
        let opened = open(dir, LARGE_SEGMENT_BYTES);
        for i in 0..frames {
            oracle.push(runtime.block_on(append_frame(&opened.log, &events(i))));
        }
        opened.log.close();
        assert_eq!(segment_files(dir).len(), 1);
    }
    oracle
}

fn cut_last_frame_at_every_byte(last_alone_in_segment: bool) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let source = tmp.path().join("source");
    let oracle = build_log(&source, 6, last_alone_in_segment);
    let newest_name = newest_segment(&source)
        .file_name()
        .expect("name")
        .to_owned();
    let bytes = fs::read(source.join(&newest_name)).expect("read newest");
    let last = frame_spans(&bytes)
        .pop()
        .expect("newest segment has frames");
    assert_eq!(last.end, bytes.len());
    let survivors = &oracle[..oracle.len() - 1];
    let runtime = current_thread_runtime();
    for kept in 0..last.len() {
        let context = format!(
            "cut keeping {kept} of the last frame's {} bytes",
            last.len()
        );
        let dir = tmp.path().join(format!("cut-{kept}"));
        copy_dir(&source, &dir);
        let segment = dir.join(&newest_name);
        set_file_len(&segment, (last.start + kept) as u64);
        let opened = open(&dir, LARGE_SEGMENT_BYTES);
        check_against_oracle(&opened, survivors, &context);
        assert_eq!(
            opened.summary.dropped_bytes, kept as u64,
            "{context}: dropped bytes"
        );
        let len = fs::metadata(&segment).expect("stat").len();
        assert_eq!(
            len, last.start as u64,
            "{context}: not cut to the end of the previous frame"
        );
        // The torn frame's positions are handed out again.
        let again = runtime.block_on(append_frame(&opened.log, &[event("again", "acme/x")]));
        assert_eq!(
            again.first_position,
            oracle.last().expect("frames").first_position
        );
        opened.log.close();
        fs::remove_dir_all(&dir).expect("remove copy");
    }
}

#[test]
fn cutting_the_last_frame_at_every_byte_keeps_every_earlier_frame() {
    cut_last_frame_at_every_byte(false);
}

#[test]
fn cutting_a_frame_alone_in_the_newest_segment_at_every_byte_keeps_older_segments() {
    cut_last_frame_at_every_byte(true);
}

// ---------------------------------------------------------------------------------------------
// 3. Damage that is not a torn tail.

#[test]
fn a_flipped_byte_in_an_older_segment_is_corruption() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let source = tmp.path().join("source");
    let runtime = current_thread_runtime();
    let opened = open(&source, 300);
    let mut i = 0;
    while segment_files(&source).len() < 3 {
        let events: Vec<Event> = (0..3)
            .map(|j| event(&format!("e{i}-{j}"), "acme/p"))
            .collect();
        runtime.block_on(append_frame(&opened.log, &events));
        settle(&opened.log);
        i += 1;
    }
    opened.log.close();
    // Two segments with frames, then the empty active one; damage the first.
    let files = segment_files(&source);
    assert_eq!(files.len(), 3);
    let first_name = files[0].file_name().expect("name").to_owned();
    let first_len = fs::metadata(&files[0]).expect("stat").len() as usize;
    assert!(first_len >= 300);

    let middle = first_len / 2;
    let offsets = std::iter::once(middle).chain(0..first_len);
    for (n, offset) in offsets.enumerate() {
        let dir = tmp.path().join(format!("flip-{n}"));
        copy_dir(&source, &dir);
        let path = dir.join(&first_name);
        let mut bytes = fs::read(&path).expect("read");
        bytes[offset] ^= 0x40;
        fs::write(&path, &bytes).expect("write damaged segment");
        match open_only(&dir, 300) {
            Err(LogError::Corrupt(_)) => {}
            Err(other) => panic!("byte {offset} flipped: expected Corrupt, got {other}"),
            Ok((_, summary)) => panic!("byte {offset} flipped: log opened ({summary:?})"),
        }
        assert_eq!(
            fs::read(&path).expect("read"),
            bytes,
            "open changed a damaged older segment"
        );
        fs::remove_dir_all(&dir).expect("remove copy");
    }

    // A frame missing from the end of an older segment is a gap, not a torn tail: open reports
    // it (the engine refuses to start unless a snapshot covers it) and cuts nothing.
    let dir = tmp.path().join("short");
    copy_dir(&source, &dir);
    let bytes = fs::read(dir.join(&first_name)).expect("read");
    let last = frame_spans(&bytes).pop().expect("frames");
    set_file_len(&dir.join(&first_name), last.start as u64);
    let second_start: u64 = files[1]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("segment name is its first position");
    let (_, summary) = open_only(&dir, 300).expect("opens, reporting the gap");
    assert_eq!(summary.gaps, vec![(second_start - 3, second_start)]);
    assert_eq!(summary.dropped_bytes, 0);
}

/// Rewrites the accept time of the frame at `span` (and its checksum), as if its group commit
/// had been accepted at `accept_ms`.
fn stamp_frame(bytes: &mut [u8], span: &Range<usize>, accept_ms: u64) {
    let body = span.start + 8;
    bytes[body + 8..body + 16].copy_from_slice(&accept_ms.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[body..span.end]);
    bytes[span.start + 4..body].copy_from_slice(&crc.to_le_bytes());
}

/// A newest segment of four frames, the accept time of each set to `accepts[i]` (one group
/// commit gives all its frames one accept time), with a byte of the second frame flipped.
/// Returns the segment's path, its bytes and the second frame's offset.
fn newest_segment_damaged_in_frame_two(dir: &Path, accepts: [u64; 4]) -> (PathBuf, Vec<u8>, usize) {
    build_log(dir, 4, false);
    let path = newest_segment(dir);
    let mut bytes = fs::read(&path).expect("read");
    let spans = frame_spans(&bytes);
    assert_eq!(spans.len(), 4);
    for (span, accept) in spans.iter().zip(accepts) {
        stamp_frame(&mut bytes, span, accept);
    }
    let second = spans[1].clone();
    bytes[second.start + second.len() / 2] ^= 0x40;
    fs::write(&path, &bytes).expect("write damaged segment");
    (path, bytes, second.start)
}

/// Damage followed only by frames of its own commit is what a crash leaves when it tears the
/// last commit's write (pages of one write may reach the disk in any order): everything from
/// the damaged frame on is cut, and the cut bytes are kept beside the segment.
#[test]
fn damage_in_the_last_commit_is_a_torn_write_and_is_cut_there() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let t = now_ms();
    let (path, bytes, second) = newest_segment_damaged_in_frame_two(&dir, [t, t + 1, t + 1, t + 1]);
    let (_, summary) = open_only(&dir, LARGE_SEGMENT_BYTES).expect("a torn last commit opens");
    assert_eq!(summary.frames, 1);
    assert_eq!(summary.dropped_bytes, (bytes.len() - second) as u64);
    assert_eq!(fs::metadata(&path).expect("segment").len(), second as u64);
    let kept = path.with_extension(format!("seg.torn-{second}"));
    assert_eq!(fs::read(&kept).expect("cut bytes kept"), &bytes[second..]);
}

/// Intact frames of two commits after the damage prove the damaged bytes had been synced
/// (the later commit was written only after the earlier one's sync): cutting would silently
/// drop acknowledged events, so open refuses, says why, and leaves the segment as it is.
#[test]
fn damage_followed_by_two_later_commits_is_corruption_and_nothing_is_cut() {
    for accepts in [|t| [t, t, t + 1, t + 2], |t| [t, t + 1, t + 1, t + 2]] {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("log");
        let (path, bytes, _) = newest_segment_damaged_in_frame_two(&dir, accepts(now_ms()));
        let Err(LogError::Corrupt(reason)) = open_only(&dir, LARGE_SEGMENT_BYTES) else {
            panic!("damage before two later commits must not open");
        };
        assert!(reason.contains("two later commits"), "{reason}");
        assert_eq!(
            fs::read(&path).expect("segment"),
            bytes,
            "nothing may be cut"
        );
        assert_eq!(segment_files(&dir).len(), 1);
        assert!(
            !fs::read_dir(&dir).expect("dir").any(|e| e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .contains("torn")),
            "no torn tail is written"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Compaction.

#[test]
fn compact_drops_only_whole_covered_old_segments_and_never_the_active_one() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let runtime = current_thread_runtime();
    let two = |i: usize| {
        vec![
            event(&format!("e{i}-a"), "acme/a"),
            event(&format!("e{i}-b"), "b"),
        ]
    };

    // segment_bytes 1: every frame closes its segment, so segment k holds frame k only.
    let opened = open(&dir, 1);
    let mut oracle = Vec::new();
    for i in 0..6 {
        oracle.push(runtime.block_on(append_frame(&opened.log, &two(i))));
    }
    std::thread::sleep(Duration::from_millis(20));
    let cutoff_ms = now_ms();
    std::thread::sleep(Duration::from_millis(20));
    for i in 6..12 {
        oracle.push(runtime.block_on(append_frame(&opened.log, &two(i))));
    }
    assert!(oracle[..6].iter().all(|f| f.accept_time_ms < cutoff_ms));
    assert!(oracle[6..].iter().all(|f| f.accept_time_ms > cutoff_ms));
    let log = &opened.log;
    settle(log);
    // 12 one-frame segments (positions 1-2, 3-4, ..., 23-24) and the empty active one at 25.
    assert_eq!(segment_files(&dir).len(), 13);
    assert_eq!((log.first_position(), log.next_position()), (1, 25));

    let check = |dropped_frames: usize, context: &str| {
        let kept = &oracle[dropped_frames..];
        let first = kept.first().map_or(25, |f| f.first_position);
        assert_eq!(log.first_position(), first, "{context}: first_position");
        assert_eq!(
            segment_files(&dir).len(),
            13 - dropped_frames,
            "{context}: segment files"
        );
        for position in 1..first {
            assert!(
                log.read_frame(position).expect("read").is_none(),
                "{context}: {position}"
            );
        }
        check_reads(log, kept, context);
    };

    assert_eq!(
        log.compact(0, u64::MAX).expect("compact"),
        0,
        "nothing is covered"
    );
    check(0, "covered 0");
    assert_eq!(
        log.compact(24, 0).expect("compact"),
        0,
        "nothing is old enough"
    );
    check(0, "cutoff 0");
    // Position 5 is the middle of frame 3 (positions 5-6): its segment is not wholly covered.
    assert_eq!(log.compact(5, u64::MAX).expect("compact"), 2);
    check(2, "covered 5");
    assert_eq!(log.compact(6, u64::MAX).expect("compact"), 1);
    check(3, "covered 6");
    // Everything is covered, but only the first six frames are older than the cutoff.
    assert_eq!(log.compact(24, cutoff_ms).expect("compact"), 3);
    check(6, "covered all, cutoff between the phases");
    // Everything is covered and old: every segment goes except the (empty) active one.
    assert_eq!(log.compact(u64::MAX, u64::MAX).expect("compact"), 6);
    check(12, "covered all, all old");
    assert_eq!(log.next_position(), 25);
    assert_eq!(
        log.compact(u64::MAX, u64::MAX).expect("compact"),
        0,
        "active is kept"
    );
    opened.log.close();

    // Reopen: the log starts at the surviving segment and continues there.
    let opened = open(&dir, LARGE_SEGMENT_BYTES);
    check_against_oracle(&opened, &[], "reopen after compacting all");
    assert_eq!(opened.log.first_position(), 25);
    assert_eq!(opened.log.next_position(), 25);
    let stored = runtime.block_on(append_frame(&opened.log, &two(12)));
    assert_eq!(stored.first_position, 25);
    // The active segment now holds a covered, old frame: it still is never dropped.
    assert_eq!(opened.log.compact(u64::MAX, u64::MAX).expect("compact"), 0);
    assert_eq!(opened.log.first_position(), 25);
    check_reads(
        &opened.log,
        std::slice::from_ref(&stored),
        "active segment with a frame",
    );
    opened.log.close();
    let reopened = open(&dir, LARGE_SEGMENT_BYTES);
    check_against_oracle(&reopened, &[stored], "reopen after compaction");
    reopened.log.close();
}

// ---------------------------------------------------------------------------------------------
// 5. Group commit under concurrent appenders.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_unique_dense_positions_in_log_order() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 200;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let log = Arc::new(open(&dir, 8 << 10).log);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let id = format!("t{task}-{i}");
                let position = append(&log, &[event(&id, &format!("acme/task-{task}"))])
                    .await
                    .expect("append succeeds");
                positions.push((position, id));
            }
            positions
        }));
    }
    let mut appended = Vec::new();
    for task in tasks {
        let finished = tokio::time::timeout(Duration::from_secs(120), task).await;
        let positions = finished.expect("appender stopped").expect("appender ok");
        assert!(
            positions.windows(2).all(|w| w[0].0 < w[1].0),
            "one task's appends reordered"
        );
        appended.extend(positions);
    }
    appended.sort();
    let total = (TASKS * PER_TASK) as u64;
    let positions: Vec<LogPosition> = appended.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        positions,
        (1..=total).collect::<Vec<_>>(),
        "positions not unique and dense"
    );
    assert_eq!(log.next_position(), total + 1);
    log.close();

    let reopened = open(&dir, 8 << 10);
    assert_eq!(reopened.summary.records, total);
    assert!(
        segment_files(&dir).len() > 1,
        "the test should roll segments"
    );
    let replayed: Vec<(LogPosition, String)> = reopened
        .frames
        .iter()
        .flat_map(|f| {
            f.positions()
                .zip(f.events.iter().map(|e| e.event_id.clone()))
        })
        .collect();
    assert_eq!(
        replayed, appended,
        "replay differs from what the appends were acknowledged as"
    );
    for (position, id) in &appended {
        let frame = reopened
            .log
            .read_frame(*position)
            .expect("read")
            .expect("stored");
        let record = frame
            .record((position - frame.first_position) as usize)
            .expect("record");
        assert_eq!(record.fields.event_id.to_string(), *id);
    }
    reopened.log.close();
}

// ---------------------------------------------------------------------------------------------
// Regression: an empty batch.

/// Appends a record, an empty batch, then another record; reopens and reads both records back.
/// An error for the empty batch is fine; a success must not break anything.
fn append_around_an_empty_batch(segment_bytes: u64) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let runtime = current_thread_runtime();
    let opened = open(&dir, segment_bytes);
    let a = event("a", "acme/x");
    let b = event("b", "acme/x");
    assert_eq!(
        runtime.block_on(append(&opened.log, std::slice::from_ref(&a))),
        Ok(1)
    );
    let _ = runtime.block_on(append(&opened.log, &[]));
    let after = runtime.block_on(append(&opened.log, std::slice::from_ref(&b)));
    assert_eq!(
        after,
        Ok(2),
        "the log stopped taking writes after an empty batch"
    );
    opened.log.close();
    let (log, summary) = match open_only(&dir, segment_bytes) {
        Ok(opened) => opened,
        Err(error) => panic!("reopen after an empty batch failed: {error}"),
    };
    drop(log);
    assert_eq!(summary.dropped_bytes, 0, "reopen cut acknowledged bytes");
    let reopened = open(&dir, segment_bytes);
    let replayed: Vec<(LogPosition, Event)> = reopened
        .frames
        .iter()
        .flat_map(|f| f.positions().zip(f.events.iter().cloned()))
        .collect();
    assert_eq!(replayed, [(1, a), (2, b)], "replay after an empty batch");
    for position in 1..=2 {
        let read = reopened.log.read_frame(position);
        assert!(
            matches!(read, Ok(Some(_))),
            "read_frame({position}): {read:?}"
        );
    }
    reopened.log.close();
}

/// Regression: `LocalLog` writes an empty batch as a zero-record frame, which `decode_frame`
/// rejects, so reopen takes it for a torn tail and cuts it and every later frame.
#[test]
fn an_empty_batch_does_not_lose_later_acknowledged_records() {
    append_around_an_empty_batch(LARGE_SEGMENT_BYTES);
}

/// Regression: an empty batch that fills a segment makes the writer roll to a file named after
/// the unchanged next position, which already exists: the log stops taking writes.
#[test]
fn an_empty_batch_that_fills_a_segment_does_not_stop_the_log() {
    append_around_an_empty_batch(1);
}

// ---------------------------------------------------------------------------------------------
// Further contract checks.

/// Frames deep inside a segment larger than the sparse index stride are found, before and
/// after a reopen.
#[test]
fn reads_find_every_frame_of_a_segment_larger_than_the_index_stride() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let runtime = current_thread_runtime();
    let opened = open(&dir, LARGE_SEGMENT_BYTES);
    let padding = format!("\"{}\"", "x".repeat(700));
    let mut oracle = Vec::new();
    for i in 0..300 {
        let mut events = vec![event(&format!("e{i}"), "acme/big")];
        if i % 2 == 0 {
            events.push(event(&format!("e{i}-b"), "acme/big"));
        }
        events[0]
            .properties
            .push(("padding".to_owned(), padding.clone()));
        oracle.push(runtime.block_on(append_frame(&opened.log, &events)));
    }
    let bytes = fs::metadata(newest_segment(&dir)).expect("stat").len();
    assert!(
        bytes > 4 * (64 << 10),
        "segment of {bytes} bytes is too small for the test"
    );
    check_reads(&opened.log, &oracle, "before reopen");
    opened.log.close();
    let reopened = open(&dir, LARGE_SEGMENT_BYTES);
    check_against_oracle(&reopened, &oracle, "after reopen");
    reopened.log.close();
}

/// After `skip_to` (a snapshot is ahead of the log) the log continues at the snapshot position,
/// and it must still open on the next start.
#[test]
fn a_log_continued_at_a_snapshot_position_opens_again() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let runtime = current_thread_runtime();
    let opened = open_only(&dir, LARGE_SEGMENT_BYTES)
        .expect("fresh log opens")
        .0;
    opened.skip_to(101).expect("skip_to");
    assert_eq!(opened.next_position(), 101);
    let (dispatcher, _shard_threads) = start_shards(1).expect("shard starts");
    opened.start(dispatcher).expect("writer starts");
    let stored = runtime.block_on(append_frame(&opened, &[event("after-snapshot", "acme/s")]));
    assert_eq!(stored.first_position, 101);
    opened.close();
    let reopened = match LocalLog::open(&dir, LocalLogOptions::default(), &mut |_| {}) {
        Ok((log, _)) => log,
        Err(error) => panic!("log continued at a snapshot position does not reopen: {error}"),
    };
    assert_eq!(reopened.next_position(), 102);
    reopened.close();
}

/// `close` finishes every append already queued; appends after it are refused as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_finishes_queued_appends_and_refuses_later_ones() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let log = Arc::new(open(&dir, 4 << 10).log);
    let mut tasks = Vec::new();
    for task in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                let events = [event(&format!("t{task}-{i}"), "acme/c")];
                let (completion, done) = Completion::new();
                match Log::append(&*log, batch_of(&events), completion).await {
                    Ok(()) => {}
                    Err(LogError::Unavailable(_)) => break,
                    Err(other) => panic!("unexpected append error: {other}"),
                }
                // Queued: it must become durable and complete, close or not.
                let position = done
                    .await
                    .expect("completion fired")
                    .expect("append durable");
                acknowledged.push((position, events[0].event_id.clone()));
            }
            acknowledged
        }));
    }
    let some_appended = async {
        while log.next_position() < 300 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), some_appended)
        .await
        .expect("appends progress");
    let closing = log.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .expect("close returned");
    let mut acknowledged = Vec::new();
    for task in tasks {
        let finished = tokio::time::timeout(Duration::from_secs(60), task).await;
        acknowledged.extend(finished.expect("appender stopped").expect("appender ok"));
    }
    acknowledged.sort();
    let count = acknowledged.len() as u64;
    let positions: Vec<LogPosition> = acknowledged.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, (1..=count).collect::<Vec<_>>());
    assert_eq!(log.next_position(), count + 1);
    let (completion, done) = Completion::new();
    let refused = Log::append(&*log, batch_of(&[event("late", "acme/c")]), completion).await;
    assert!(
        matches!(refused, Err(LogError::Unavailable(_))),
        "{refused:?}"
    );
    drop(done);
    assert!(log.unavailable_reason().is_some());
    assert!(matches!(
        log.barrier(Box::new(|_, _| {})),
        Err(LogError::Unavailable(_))
    ));

    let reopened = open(&dir, 4 << 10);
    let replayed: Vec<(LogPosition, String)> = reopened
        .frames
        .iter()
        .flat_map(|f| {
            f.positions()
                .zip(f.events.iter().map(|e| e.event_id.clone()))
        })
        .collect();
    assert_eq!(
        replayed, acknowledged,
        "reopen differs from the acknowledged appends"
    );
    reopened.log.close();
}

// ---------------------------------------------------------------------------------------------
// 6. Spare segments: files of zeros a busy log rolls into.

/// Segment (and spare) size for the spare tests.
const SPARE_SEGMENT_BYTES: u64 = 16 << 10;

fn open_with_spares(dir: &Path) -> Opened {
    open_with(
        dir,
        LocalLogOptions {
            segment_bytes: SPARE_SEGMENT_BYTES,
            spare_after_commits: Some(3),
            ..Default::default()
        },
    )
}

/// Where the frames of a segment end (the rest, if any, is a spare's zeros).
fn data_end(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Ok(FrameRead::Frame(_, used)) = decode_frame(&bytes[at..]) {
        at += used;
    }
    at
}

/// Appends one-event frames (one group commit each) until the newest segment is a spare that
/// holds at least two frames; returns what was appended.
fn fill_until_in_spare(log: &LocalLog, dir: &Path, oracle: &mut Vec<StoredFrame>) {
    let runtime = current_thread_runtime();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let i = oracle.len();
        let events = vec![event(&format!("s{i}"), &format!("acme/spare-{i}"))];
        oracle.push(runtime.block_on(append_frame(log, &events)));
        settle(log);
        let bytes = fs::read(newest_segment(dir)).expect("read newest");
        let end = data_end(&bytes);
        let frames_in_newest = frame_spans(&bytes[..end]).len();
        if bytes.len() as u64 == SPARE_SEGMENT_BYTES && end < bytes.len() && frames_in_newest >= 2 {
            assert!(
                bytes[end..].iter().all(|&b| b == 0),
                "a spare holds zeros past its frames"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spare segment was used after {} commits",
            oracle.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_busy_log_rolls_into_spares_and_their_zeros_are_not_damage() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let runtime = current_thread_runtime();
    let mut oracle = Vec::new();
    let opened = open_with_spares(&dir);
    fill_until_in_spare(&opened.log, &dir, &mut oracle);
    opened.log.close();
    // Every segment holds whole frames (and zeros after them), named after its first frame.
    let mut expected_first = 1;
    for path in segment_files(&dir) {
        let bytes = fs::read(&path).expect("read segment");
        assert_eq!(segment_first_position(&path), expected_first);
        let end = data_end(&bytes);
        assert!(bytes[end..].iter().all(|&b| b == 0), "{}", path.display());
        expected_first += frame_spans(&bytes[..end]).len() as u64;
    }

    let reopened = open_with_spares(&dir);
    assert_eq!(
        reopened.summary.dropped_bytes, 0,
        "zeros are not a torn tail"
    );
    check_against_oracle(&reopened, &oracle, "reopen with a spare active");
    let newest = newest_segment(&dir);
    let before = fs::read(&newest).expect("read newest");
    // The next frame goes right after the last one, inside the spare: the file does not grow.
    let extra = vec![event("after-reopen", "acme/after")];
    oracle.push(runtime.block_on(append_frame(&reopened.log, &extra)));
    reopened.log.close();
    let after = fs::read(&newest).expect("read newest");
    assert_eq!(
        after.len(),
        before.len(),
        "the write landed inside the spare"
    );
    assert!(data_end(&after) > data_end(&before));
    let again = open_with_spares(&dir);
    assert_eq!(again.summary.dropped_bytes, 0);
    check_against_oracle(&again, &oracle, "second reopen");
    again.log.close();
    assert!(
        fs::read_dir(&dir).expect("list").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .contains("torn")),
        "nothing was cut"
    );
}

#[test]
fn a_torn_write_into_a_spare_is_cut_and_earlier_frames_survive() {
    for tear in [
        "half of the last frame reached the disk",
        "garbage after the last frame",
    ] {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("log");
        let mut oracle = Vec::new();
        let opened = open_with_spares(&dir);
        fill_until_in_spare(&opened.log, &dir, &mut oracle);
        opened.log.close();
        let path = newest_segment(&dir);
        let mut bytes = fs::read(&path).expect("read newest");
        let end = data_end(&bytes);
        let last = frame_spans(&bytes[..end]).pop().expect("a frame");
        let cut_at = if tear.starts_with("half") {
            // The write's second half never made it: the spare's zeros are still there.
            let half = last.start + last.len() / 2;
            bytes[half..last.end].fill(0);
            oracle.pop();
            last.start
        } else {
            bytes[end..end + 5].copy_from_slice(&[7, 0, 0, 0, 9]);
            end
        };
        fs::write(&path, &bytes).expect("write torn segment");
        let reopened = open_with_spares(&dir);
        check_against_oracle(&reopened, &oracle, tear);
        assert_eq!(
            reopened.summary.dropped_bytes,
            (bytes.len() - cut_at) as u64,
            "{tear}"
        );
        assert_eq!(
            fs::metadata(&path).expect("stat").len(),
            cut_at as u64,
            "{tear}: cut at the last whole frame"
        );
        let kept = fs::read(path.with_extension(format!("seg.torn-{cut_at}"))).expect("kept");
        let written = bytes.iter().rposition(|&b| b != 0).expect("nonzero") + 1;
        assert_eq!(
            kept,
            &bytes[cut_at..written],
            "{tear}: kept without the zeros"
        );
        // The log goes on after the cut.
        let runtime = current_thread_runtime();
        let extra = vec![event("after-cut", "acme/after")];
        oracle.push(runtime.block_on(append_frame(&reopened.log, &extra)));
        reopened.log.close();
        let again = open_with_spares(&dir);
        assert_eq!(again.summary.dropped_bytes, 0, "{tear}");
        check_against_oracle(&again, &oracle, tear);
        again.log.close();
    }
}

#[test]
fn large_commits_get_no_spare() {
    // Commits of ~40 KiB average more than SPARE_MAX_AVERAGE_COMMIT_BYTES: zeros written ahead
    // would cost the disk more than they save, so the log grows its segment as written.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let opened = open_with(
        &dir,
        LocalLogOptions {
            segment_bytes: 4 << 20,
            spare_after_commits: Some(3),
            first_spare_bytes: 64 << 10,
            ..Default::default()
        },
    );
    let runtime = current_thread_runtime();
    let value = format!("\"{}\"", "x".repeat(40 << 10));
    let mut oracle = Vec::new();
    for i in 0..12 {
        let mut big = event(&format!("big{i}"), &format!("acme/big-{i}"));
        big.properties = vec![("blob".to_owned(), value.clone())];
        oracle.push(runtime.block_on(append_frame(&opened.log, &[big])));
        settle(&opened.log);
    }
    // A spare asked for after the third commit would be written within milliseconds.
    std::thread::sleep(Duration::from_millis(200));
    opened.log.close();
    let segments = segment_files(&dir);
    assert_eq!(segments.len(), 1, "no roll into a spare: {segments:?}");
    let bytes = fs::read(&segments[0]).expect("read segment");
    assert_eq!(data_end(&bytes), bytes.len(), "no zeros after the frames");
    assert!(!dir.join("spare.prep").exists(), "no spare was made");
    let reopened = open_with_spares(&dir);
    check_against_oracle(&reopened, &oracle, "reopen after large commits");
    reopened.log.close();
}

#[test]
fn spares_start_small_and_double_up_to_the_segment_size() {
    const FIRST: u64 = 8 << 10;
    const SEGMENT: u64 = 64 << 10;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let log = open_with(
        &dir,
        LocalLogOptions {
            segment_bytes: SEGMENT,
            spare_after_commits: Some(3),
            first_spare_bytes: FIRST,
            ..Default::default()
        },
    )
    .log;
    let runtime = current_thread_runtime();
    let spare_sizes = || -> Vec<u64> {
        segment_files(&dir)
            .iter()
            .map(|p| fs::metadata(p).expect("stat").len())
            .filter(|&len| len >= FIRST)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    // Until two segments of the full size exist.
    while spare_sizes().iter().filter(|&&len| len >= SEGMENT).count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "spares never reached {SEGMENT} bytes"
        );
        let events = vec![event(&format!("d{i}"), &format!("acme/double-{i}"))];
        runtime.block_on(append_frame(&log, &events));
        i += 1;
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(2)); // time for the next spare
        }
    }
    log.close();
    let sizes = spare_sizes();
    // Each size class appears, in order: 8 KiB, 16 KiB, 32 KiB, then 64 KiB.
    let class = |len: u64| (len / FIRST).ilog2();
    let classes: Vec<u32> = sizes.iter().map(|&len| class(len).min(3)).collect();
    let mut expected = 0;
    for &c in &classes {
        if c == expected {
            expected += 1;
        }
        assert!(c < expected || c == 3, "sizes {sizes:?}: {c} out of order");
    }
    assert_eq!(
        expected, 4,
        "sizes {sizes:?} did not double up to the segment size"
    );
    let reopened = open(&dir, SEGMENT);
    assert_eq!(reopened.summary.dropped_bytes, 0);
    assert_eq!(reopened.summary.records, i as u64);
    reopened.log.close();
}
