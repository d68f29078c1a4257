//! The shared log: a NATS JetStream stream (`--log nats://…`), tailed in order by every node.
//!
//! JetStream gives the total order, replication and durability; each Flux node is a replica
//! that applies the stream in order. Layout and invariants:
//! - One stream (file storage, `--nats-replicas` replicas, `max_age` = `--retention`, limits
//!   retention) with one subject. It is created if missing; an existing stream must have file
//!   storage, limits retention and exactly that subject, or open refuses.
//! - One append = one frame = one message whose payload is the [`encode_frame`] bytes (written
//!   with first position 0: the reader fills positions in). A frame larger than the server's
//!   `max_payload` is cut into byte chunks: every chunk but the last is published first as a
//!   *part* (header `Flux-Part`), and once all of them are acknowledged the last chunk is
//!   published with `Flux-Parts: <seq>,<seq>,…`. Readers skip parts and assemble the frame when
//!   they reach the last message, so an append whose publisher failed half-way is applied by
//!   nobody: nothing is half-applied.
//! - Positions: record `i` of the frame completed by stream message `seq` has position
//!   `(seq << 20) | i` ([`POSITION_SHIFT`]), so positions are unique and increasing in stream
//!   order, a record's message is `position >> 20`, and [`Log::read_frame`] is one get of that
//!   message by sequence (plus its parts): there is no in-memory index. A frame holds fewer
//!   than 2^20 records.
//! - Applying: one task on the backend's own runtime (one worker thread) reads the stream with
//!   an ordered pull consumer from the first sequence after replay and hands each frame to the
//!   ordering thread (`flux-log-tail`), which dispatches frames in stream order and runs
//!   barriers between them. Writes from every node are applied the same way.
//! - Completing: an append is registered under `Flux-Append: <node>.<counter>` before it is
//!   published; its [`Completion`] fires when the tail dispatches that message, so the HTTP 200
//!   comes after JetStream's ack *and* after this node applied the write (read-your-writes).
//! - Publishing: every message carries a `Nats-Msg-Id` unique to this process, append and
//!   part, and is published again when no ack came within [`ATTEMPT_TIMEOUT`], the
//!   connection dropped meanwhile (once it is back), or JetStream answered with an error, for
//!   up to [`PUBLISH_BUDGET`]. JetStream stores a repeated id once (streams Flux creates keep
//!   ids for [`DUPLICATE_WINDOW`]), so a stalled server or a dropped connection costs a write
//!   nothing and never stores it twice: a 503 after a stall means nothing was accepted.
//! - Deadlines: an append's final message carries `Flux-Deadline` (its publish budget plus
//!   [`SKIP_MARGIN`] for clock differences, Unix ms). Every node, tailing or replaying, skips
//!   a message JetStream stored after its deadline (the stored time is in the stream, so all
//!   agree). An append with no ack within its budget is answered by its tail's verdict
//!   (applied: 200; skipped: 503), or with 503 once the tail has applied everything up to the
//!   stream's last sequence at a probe asked [`SKIP_MARGIN`] past the deadline (stored in
//!   time, the append would have been dispatched by then). So a 503 accepted nothing even when
//!   a stalled server stores the write later. A write whose fate no probe settled within
//!   `UNKNOWN_CAP` after that moment (NATS unresponsive for longer, or its connection dropped
//!   with the ack lost) is answered as unknown ([`Completion::unknown`], HTTP 504), as is one
//!   still unacknowledged when the node shuts down: it may still be applied.
//! - An append acknowledged but not applied within [`APPLY_TIMEOUT`] is in the stream, hence
//!   accepted: it is answered then, without read-your-writes.
//! - Faults: while NATS is unreachable, a publish failed, or the tail cannot read, appends fail
//!   at once with [`LogError::Unavailable`] and [`Log::unavailable_reason`] says why; reads keep
//!   being served from the shards. A background task probes the stream and clears a publish
//!   failure; the tail clears its own as soon as its consumer is re-created (not at the next
//!   message, which may never come while writes are refused) and resumes from the sequence
//!   after the last one it applied. A probe that gets no answer within `PROBE_TIMEOUT` (a
//!   server holding its connections open and answering nothing) is reported by health until
//!   one is answered. Writes still try while JetStream acknowledges any write; once neither
//!   the probe nor a write has been answered since the probe was asked, appends fail at once
//!   with [`LogError::Unavailable`] (nothing is published) until one is.
//! - Start-up = newest snapshot + replay of the stream from its first message up to its last
//!   sequence at open time (records the snapshot covers only rebuild the history index). A
//!   snapshot's position names the stream sequence it covers, so snapshots are portable between
//!   nodes of one stream. [`Log::compact`] drops nothing: the stream's `max_age` governs
//!   retention.
//! - Only nats-server 2.9 features are used (Debian ships 2.9.10).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, ServerAddr};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, Semaphore};

use crate::engine::{EngineError, RecoveryReport, now_ms};
use crate::log::local::owners_of;
use crate::log::peers::PeerWrites;
use crate::log::{Barrier, Log, LogError};
use crate::metrics::LogMetrics;
use crate::record::{Frame, FrameRead, LogPosition, RecordBatch, decode_frame, encode_frame};
use crate::shard::{Completion, Dispatcher};

/// Bits of a position that hold the record's index within its message's frame.
pub const POSITION_SHIFT: u32 = 20;
/// Records one frame may hold: the index must fit below [`POSITION_SHIFT`].
pub const MAX_FRAME_RECORDS: usize = 1 << POSITION_SHIFT;
/// How long a request to NATS (connect, a JetStream API call) may wait for its reply.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(4);
/// How long one publish of a message waits for its ack before the message is published again
/// (same `Nats-Msg-Id`, so JetStream stores it once).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an append keeps publishing a message before it fails. With [`APPLY_TIMEOUT`] it
/// bounds a write's reply to about 8 s, under the 10 s many clients wait (12 s was too long: a
/// writer with a 10 s timeout gave up during a cluster election).
pub const PUBLISH_BUDGET: Duration = Duration::from_secs(6);
/// How long an acknowledged append may wait for this node's tail to apply it.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// The clocks of Flux nodes and NATS servers may differ by less than this. An append's
/// deadline (`Flux-Deadline`) is its publish budget plus this margin, so an append whose ack
/// came within the budget is never skipped; one without an ack learns its fate from a probe
/// asked this much after the deadline, when JetStream's clock has passed it.
pub const SKIP_MARGIN: Duration = Duration::from_secs(1);
/// How long past its `until` an unacknowledged append may wait for its fate to be settled
/// (NATS answering a probe and the tail catching up) before it is answered as unknown (504):
/// every write is answered within ~9.3 s, under the 10 s many clients wait.
const UNKNOWN_CAP: Duration = Duration::from_millis(1000);
/// Covers the moment between reading the two clocks an append's deadline is taken from.
const SETTLE_SLACK: Duration = Duration::from_millis(10);
/// The window in which JetStream drops a message whose `Nats-Msg-Id` it already stored, for
/// streams Flux creates: longer than [`PUBLISH_BUDGET`], short enough that the server's table
/// of ids stays small at tens of thousands of appends per second.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(30);
/// How long closing waits for appends still in flight. Their requests already had the HTTP
/// shutdown grace period, so what is left is waiting on an absent NATS: a node must still exit
/// within SPEC's 10 s.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How often a publish waiting for NATS to come back looks at the connection.
const RECONNECT_POLL: Duration = Duration::from_millis(20);
/// Pause before publishing again after JetStream answered with an error.
const REPUBLISH_DELAY: Duration = Duration::from_millis(100);
/// Appends published and not yet acknowledged before new appends wait (backpressure).
pub const APPENDS_IN_FLIGHT: usize = 1024;
/// Frames read from the stream and not yet dispatched before the reader waits.
pub const TAIL_QUEUE_CAPACITY: usize = 64;
/// Room left in a message for its headers.
const HEADER_ROOM_BYTES: usize = 4096;
/// Parts kept from the tail for the message that completes them, before the cache is reset.
const PART_CACHE_BYTES: usize = 64 << 20;
/// Period of the background tasks: apply deadlines; the stream probe (`run_probe`).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);
/// How long a probe of the stream (every fourth housekeeping tick, every tick while failing)
/// may wait for its answer before health reports NATS as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the next message while replaying at open.
const REPLAY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before the tail re-creates its consumer after an error.
const TAIL_RETRY_DELAY: Duration = Duration::from_millis(250);

const HEADER_APPEND: &str = "Flux-Append";
const HEADER_PART: &str = "Flux-Part";
const HEADER_PARTS: &str = "Flux-Parts";
/// The last moment (Unix ms, the writer's clock) at which JetStream may store an append's
/// final message for it to be applied; stored later, every node skips it (its writer answered
/// 503 or is about to).
const HEADER_DEADLINE: &str = "Flux-Deadline";
/// JetStream's de-duplication header: a message whose id the stream stored within its
/// duplicate window is acknowledged again and not stored.
const HEADER_MSG_ID: &str = "Nats-Msg-Id";

/// The first position of the frame completed by stream message `sequence`.
pub fn position_of(sequence: u64) -> LogPosition {
    sequence << POSITION_SHIFT
}

/// The stream message holding the record at `position`.
pub fn sequence_of(position: LogPosition) -> u64 {
    position >> POSITION_SHIFT
}

/// Where the stream lives and how it is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamOptions {
    /// `host:port` of one or more NATS servers.
    pub servers: Vec<String>,
    /// Stream name (`--nats-stream`).
    pub stream: String,
    /// The stream's only subject.
    pub subject: String,
    /// Stream replicas (`--nats-replicas`), used when the stream is created.
    pub replicas: usize,
    /// The stream's `max_age` (`--retention`).
    pub max_age: Duration,
}

impl JetStreamOptions {
    /// Options for stream `stream` on `servers`; stream `FLUX` uses subject `flux.log`, any
    /// other `flux.log.<stream>` so that several streams can share one server.
    pub fn new(servers: Vec<String>, stream: &str) -> Self {
        let subject = if stream == "FLUX" {
            "flux.log".to_string()
        } else {
            format!("flux.log.{stream}")
        };
        JetStreamOptions {
            servers,
            stream: stream.to_string(),
            subject,
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What [`JetStreamLog::open`] found.
#[derive(Debug, Default, Clone)]
pub struct OpenSummary {
    /// Whether open created the stream.
    pub created: bool,
    /// Messages read while replaying (frames and parts).
    pub messages: u64,
    pub frames: u64,
    pub records: u64,
    /// The stream's first and last sequence at open (0 when empty).
    pub first_sequence: u64,
    pub last_sequence: u64,
}

/// An append waiting for the tail: its completion and, once acknowledged, its message's
/// sequence and the deadline for applying it.
struct PendingAppend {
    completion: Arc<Completion>,
    acked: Option<(u64, Instant)>,
    /// Published but never acknowledged: the tail's verdict is awaited until then, and the
    /// reason the write then fails with.
    unknown: Option<(Instant, String)>,
}

struct Shared {
    options: JetStreamOptions,
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Stream,
    /// This process's `Flux-Append` prefix.
    node: String,
    /// Other nodes' writes (and this node's from before its start) over the last minute.
    peers: PeerWrites,
    next_append: AtomicU64,
    pending: Mutex<HashMap<u64, PendingAppend>>,
    /// The newest stream sequence dispatched (or replayed).
    applied_sequence: AtomicU64,
    first_sequence: AtomicU64,
    /// The stream's last sequence at the newest answered probe, and when that probe was asked:
    /// every message stored before then has at most that sequence.
    probed: Mutex<Option<(Instant, u64)>>,
    /// Largest message payload the server takes.
    max_payload: usize,
    /// Newest accept time written by this node (accept times never go back on one node).
    last_accept_ms: AtomicU64,
    /// Why publishing failed; cleared once the stream answers again.
    publish_failure: Mutex<Option<String>>,
    /// Why the tail cannot read; cleared once its consumer is back (or it reads a message).
    tail_failure: Mutex<Option<String>>,
    /// Why the last probe of the stream failed (a server that holds its connections open and
    /// answers nothing): health reports it until a probe succeeds.
    probe_failure: Mutex<Option<String>>,
    /// When (µs after `epoch`) the probe that went unanswered was asked; 0 once one is
    /// answered. Appends fail at once while no ack came after it ([`Shared::silent`]).
    unanswered_probe_us: AtomicU64,
    /// When (µs after `epoch`) the newest ack of a publish arrived.
    newest_ack_us: AtomicU64,
    closed: AtomicBool,
    /// Reference for the publish start times below.
    epoch: Instant,
    /// Start (µs after `epoch`) of the newest publish that succeeded: a failure of a publish
    /// started before it is old news and does not stop writes.
    newest_success_start_us: AtomicU64,
    in_flight: Arc<Semaphore>,
    /// Tells the tail to drop its consumer and re-create it after the last applied message
    /// (after a reconnect, or when it stalls behind the stream).
    tail_reset: Arc<TailReset>,
    /// Counts the client's disconnections: an ack awaited across one will not come.
    disconnects: tokio::sync::watch::Receiver<u64>,
    metrics: LogMetrics,
    /// Messages published again after a lost ack or an error answer.
    publish_retries: prometheus_client::metrics::counter::Counter,
    /// Appends JetStream stored after their deadline, skipped.
    late_skipped: prometheus_client::metrics::counter::Counter,
}

impl Shared {
    /// `at` in µs after `epoch`.
    fn micros_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Whether NATS has answered nothing since a probe it left unanswered: neither that probe
    /// nor an ack of any write since it was asked.
    fn silent(&self) -> bool {
        let asked = self.unanswered_probe_us.load(Ordering::Acquire);
        asked != 0 && self.newest_ack_us.load(Ordering::Acquire) < asked
    }
}

/// Requests that the tail re-create its consumer. Requests are counted: one made before the
/// current consumer was in place is already answered by it, so the tail ignores it instead of
/// dropping a consumer that works (while a cluster peer is down, creating a consumer can time
/// out, and a stale request arriving right after a success used to throw the success away).
#[derive(Default)]
struct TailReset {
    requests: AtomicU64,
    notify: Notify,
}

impl TailReset {
    fn request(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }
}

/// A frame read from the stream, for the ordering thread.
enum TailMsg {
    Frame(Delivered),
    Barrier(Barrier),
}

/// One stream message as the reader understood it.
struct Delivered {
    sequence: u64,
    /// `None` for a part, an undecodable message, or one stored after its deadline (skipped
    /// by every node alike).
    frame: Option<Frame>,
    /// Stored after its `Flux-Deadline`: skipped.
    late: bool,
    /// The append counter, when this node published the message.
    append: Option<u64>,
}

/// The JetStream-backed [`Log`].
pub struct JetStreamLog {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    queue: RwLock<Option<flume::Sender<TailMsg>>>,
    pending_start: Mutex<Option<flume::Receiver<TailMsg>>>,
    tail_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(context: &str, error: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{context}: {error}"))
}

fn parse_servers(servers: &[String]) -> Result<Vec<ServerAddr>, LogError> {
    servers
        .iter()
        .map(|s| {
            let url = if s.contains("://") {
                s.clone()
            } else {
                format!("nats://{s}")
            };
            url.parse::<ServerAddr>()
                .map_err(|e| LogError::Unavailable(format!("NATS address {s:?}: {e}")))
        })
        .collect()
}

/// The stream (created when missing), whether it was created, and its state. A cluster that
/// is electing a leader (a peer just stopped) answers nothing for seconds: unavailability is
/// retried until nothing has worked for [`REPLAY_IDLE_TIMEOUT`]; a stream Flux cannot use is not.
async fn open_stream(
    context: &jetstream::Context,
    options: &JetStreamOptions,
) -> Result<(stream::Stream, bool, stream::State), LogError> {
    let started = Instant::now();
    loop {
        let attempt = async {
            let (mut stream, created) = ensure_stream(context, options).await?;
            let state = stream
                .info()
                .await
                .map_err(|e| unavailable("reading the stream's state", e))?
                .state
                .clone();
            Ok((stream, created, state))
        };
        match attempt.await {
            Err(LogError::Unavailable(error)) if started.elapsed() < REPLAY_IDLE_TIMEOUT => {
                tracing::warn!(%error, "opening the stream: retrying");
                tokio::time::sleep(TAIL_RETRY_DELAY).await;
            }
            done => return done,
        }
    }
}

/// Opens (or creates) the stream and checks it is one Flux can use.
async fn ensure_stream(
    context: &jetstream::Context,
    options: &JetStreamOptions,
) -> Result<(stream::Stream, bool), LogError> {
    match context.get_stream(&options.stream).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| unavailable("reading the stream's info", e))?;
            check_stream(&info.config, options)?;
            Ok((existing, false))
        }
        Err(error) => {
            let missing = matches!(
                error.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !missing {
                return Err(unavailable(
                    &format!("looking up stream {}", options.stream),
                    error,
                ));
            }
            let config = stream::Config {
                name: options.stream.clone(),
                subjects: vec![options.subject.clone()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                discard: stream::DiscardPolicy::Old,
                num_replicas: options.replicas.max(1),
                max_age: options.max_age,
                duplicate_window: DUPLICATE_WINDOW,
                ..stream::Config::default()
            };
            let created = context
                .create_stream(config)
                .await
                .map_err(|e| unavailable(&format!("creating stream {}", options.stream), e))?;
            tracing::info!(
                stream = %options.stream, subject = %options.subject,
                replicas = options.replicas, "created the JetStream stream"
            );
            Ok((created, true))
        }
    }
}

fn check_stream(config: &stream::Config, options: &JetStreamOptions) -> Result<(), LogError> {
    let name = &options.stream;
    if config.storage != stream::StorageType::File {
        return Err(LogError::Corrupt(format!(
            "stream {name} exists with {:?} storage; Flux needs file storage",
            config.storage
        )));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        return Err(LogError::Corrupt(format!(
            "stream {name} exists with {:?} retention; Flux needs limits retention (messages \
             must stay after they are read)",
            config.retention
        )));
    }
    if config.subjects != [options.subject.clone()] {
        return Err(LogError::Corrupt(format!(
            "stream {name} exists with subjects {:?}; Flux needs exactly [{:?}]",
            config.subjects, options.subject
        )));
    }
    if config.num_replicas != options.replicas.max(1) {
        tracing::warn!(
            stream = %name, existing = config.num_replicas, requested = options.replicas,
            "the stream exists with another replica count; keeping the stream's"
        );
    }
    if config.max_age != options.max_age {
        tracing::warn!(
            stream = %name, existing = ?config.max_age, requested = ?options.max_age,
            "the stream exists with another max_age; keeping the stream's"
        );
    }
    if config.duplicate_window < PUBLISH_BUDGET {
        tracing::warn!(
            stream = %name, duplicate_window = ?config.duplicate_window,
            "the stream forgets message ids sooner than a write is published again \
             ({PUBLISH_BUDGET:?}): a write whose ack was lost may be stored twice"
        );
    }
    Ok(())
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// Fetches message `sequence`, or `None` when the stream no longer has it.
async fn get_message(
    stream: &stream::Stream,
    sequence: u64,
) -> Result<Option<(Option<HeaderMap>, Bytes)>, LogError> {
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(Some((Some(message.headers), message.payload))),
        Err(error) => match error.kind() {
            stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            stream::LastRawMessageErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND =>
            {
                Ok(None)
            }
            _ => Err(unavailable(
                &format!("reading stream message {sequence}"),
                error,
            )),
        },
    }
}

/// The frame completed by message `sequence` (`payload`, `headers`); parts come from `parts`
/// when cached there, else from the stream. `Ok(None)`: a part, or not a Flux frame.
async fn frame_of(
    stream: &stream::Stream,
    sequence: u64,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
    parts: &mut HashMap<u64, Bytes>,
) -> Result<Option<Frame>, LogError> {
    if header(headers, HEADER_PART).is_some() {
        return Ok(None);
    }
    let assembled;
    let bytes: &[u8] = match header(headers, HEADER_PARTS) {
        None => payload,
        Some(list) => {
            let mut whole = Vec::new();
            for part in list.split(',') {
                let Ok(part) = part.trim().parse::<u64>() else {
                    tracing::error!(sequence, list, "bad Flux-Parts header; message skipped");
                    return Ok(None);
                };
                match parts.remove(&part) {
                    Some(bytes) => whole.extend_from_slice(&bytes),
                    None => match get_message(stream, part).await? {
                        Some((_, bytes)) => whole.extend_from_slice(&bytes),
                        None => {
                            tracing::error!(sequence, part, "a part of the frame is gone");
                            return Ok(None);
                        }
                    },
                }
            }
            whole.extend_from_slice(payload);
            assembled = whole;
            &assembled
        }
    };
    match decode_frame(bytes) {
        Ok(FrameRead::Frame(mut frame, used)) if used == bytes.len() => {
            if frame.len() >= MAX_FRAME_RECORDS {
                tracing::error!(sequence, records = frame.len(), "frame too large; skipped");
                return Ok(None);
            }
            frame.first_position = position_of(sequence);
            Ok(Some(frame))
        }
        Ok(_) => {
            tracing::error!(sequence, "stream message is not one whole frame; skipped");
            Ok(None)
        }
        Err(error) => {
            tracing::error!(sequence, %error, "stream message is not a Flux frame; skipped");
            Ok(None)
        }
    }
}

/// Reads the stream in order from `next_sequence` with an ordered pull consumer.
struct Reader {
    shared: Arc<Shared>,
    next_sequence: u64,
    messages: Option<consumer::pull::Ordered>,
    /// [`TailReset::requests`] when `messages` was created: later requests re-create it.
    answered_resets: u64,
    /// Parts seen on the way, for the message that completes them.
    parts: HashMap<u64, Bytes>,
    parts_bytes: usize,
}

impl Reader {
    fn new(shared: Arc<Shared>, next_sequence: u64) -> Self {
        Reader {
            shared,
            next_sequence,
            messages: None,
            answered_resets: 0,
            parts: HashMap::new(),
            parts_bytes: 0,
        }
    }

    /// The next message, and how many messages the stream held after it when it was sent.
    async fn next(&mut self) -> Result<(Delivered, u64), LogError> {
        loop {
            if self.messages.is_none() {
                let config = consumer::pull::OrderedConfig {
                    filter_subject: self.shared.options.subject.clone(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: self.next_sequence.max(1),
                    },
                    ..Default::default()
                };
                let consumer = self
                    .shared
                    .stream
                    .create_consumer(config)
                    .await
                    .map_err(|e| unavailable("creating the tail consumer", e))?;
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|e| unavailable("reading the stream", e))?;
                self.messages = Some(messages);
                // Requests made while this consumer was being created are answered by it.
                self.answered_resets = self.shared.tail_reset.requests();
                // The tail reads again as soon as its consumer is back, not at the next message:
                // writes are refused while it is marked failed, so on a quiet stream the next
                // message might never come (writes answered 503 for good after a cluster peer
                // stopped).
                if lock(&self.shared.tail_failure).take().is_some() {
                    tracing::info!("the stream tail reads again");
                }
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let next = tokio::select! {
                next = messages.next() => next,
                () = self.shared.tail_reset.notify.notified() => {
                    if self.shared.tail_reset.requests() != self.answered_resets {
                        self.messages = None;
                    }
                    continue;
                }
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    self.messages = None;
                    return Err(unavailable("reading the stream", error));
                }
                None => {
                    self.messages = None;
                    return Err(LogError::Unavailable("the stream's consumer ended".into()));
                }
            };
            let (sequence, pending, stored_ms) = match message.info() {
                Ok(info) => (
                    info.stream_sequence,
                    info.pending,
                    (info.published.unix_timestamp_nanos() / 1_000_000) as u64,
                ),
                Err(error) => {
                    self.messages = None;
                    return Err(unavailable("a stream message without metadata", error));
                }
            };
            if sequence < self.next_sequence {
                continue; // Seen before the consumer was re-created.
            }
            let headers = message.headers.as_ref();
            if header(headers, HEADER_PART).is_some() {
                if self.parts_bytes + message.payload.len() > PART_CACHE_BYTES {
                    self.parts.clear();
                    self.parts_bytes = 0;
                }
                self.parts_bytes += message.payload.len();
                self.parts.insert(sequence, message.payload.clone());
            }
            let frame = frame_of(
                &self.shared.stream,
                sequence,
                headers,
                &message.payload,
                &mut self.parts,
            )
            .await?;
            if self.parts.is_empty() {
                self.parts_bytes = 0;
            }
            let append = header(headers, HEADER_APPEND)
                .and_then(|v| v.rsplit_once('.'))
                .filter(|(node, _)| *node == self.shared.node)
                .and_then(|(_, counter)| counter.parse().ok());
            let late = header(headers, HEADER_DEADLINE)
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|deadline| stored_ms > deadline);
            if late {
                tracing::warn!(
                    sequence,
                    "a write JetStream stored after its deadline is skipped (its writer was \
                     answered 503, or 504 if its fate was still open)"
                );
                self.shared.late_skipped.inc();
            }
            self.next_sequence = sequence + 1;
            let delivered = Delivered {
                sequence,
                frame: frame.filter(|_| !late),
                late,
                append,
            };
            return Ok((delivered, pending));
        }
    }
}

impl JetStreamLog {
    /// Connects, creates or checks the stream, and replays it up to its last sequence at open;
    /// `visit` sees every frame in stream order (positions filled in).
    pub fn open(
        options: JetStreamOptions,
        visit: &mut dyn FnMut(Frame),
    ) -> Result<(JetStreamLog, OpenSummary), LogError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flux-nats")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let opened = runtime.block_on(Self::connect(options));
        let (shared, mut summary) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let replayed = runtime.block_on(Self::replay(&shared, &mut summary, visit));
        if let Err(error) = replayed {
            runtime.shutdown_background();
            return Err(error);
        }
        let (tx, rx) = flume::bounded(TAIL_QUEUE_CAPACITY);
        let log = JetStreamLog {
            shared,
            runtime: Mutex::new(Some(runtime)),
            handle,
            queue: RwLock::new(Some(tx)),
            pending_start: Mutex::new(Some(rx)),
            tail_thread: Mutex::new(None),
        };
        Ok((log, summary))
    }

    async fn connect(options: JetStreamOptions) -> Result<(Arc<Shared>, OpenSummary), LogError> {
        let servers = parse_servers(&options.servers)?;
        if servers.is_empty() {
            return Err(LogError::Unavailable("no NATS server given".into()));
        }
        let tail_reset = Arc::new(TailReset::default());
        let on_event = tail_reset.clone();
        let (disconnected, disconnects) = tokio::sync::watch::channel(0u64);
        let disconnected = Arc::new(disconnected);
        let client = async_nats::ConnectOptions::new()
            .name("flux")
            .event_callback(move |event| {
                let tail_reset = on_event.clone();
                let disconnected = disconnected.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            tail_reset.request();
                        }
                        async_nats::Event::Disconnected => {
                            disconnected.send_modify(|n| *n += 1);
                            tracing::warn!(
                                "disconnected from NATS; writes answer 503 until it is back"
                            )
                        }
                        other => tracing::debug!(event = %other, "NATS client event"),
                    }
                }
            })
            .connection_timeout(PUBLISH_TIMEOUT)
            .request_timeout(Some(PUBLISH_TIMEOUT))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).min(1000))
            })
            .connect(servers)
            .await
            .map_err(|e| {
                unavailable(
                    &format!("connecting to NATS at {}", options.servers.join(",")),
                    e,
                )
            })?;
        let context = jetstream::ContextBuilder::new()
            .timeout(PUBLISH_TIMEOUT)
            .max_ack_inflight(APPENDS_IN_FLIGHT * 4)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let (stream, created, state) = open_stream(&context, &options).await?;
        let max_payload = client.server_info().max_payload.max(64 << 10);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let node = format!("{:x}-{:x}", std::process::id(), nanos);
        let summary = OpenSummary {
            created,
            first_sequence: state.first_sequence,
            last_sequence: state.last_sequence,
            ..OpenSummary::default()
        };
        let shared = Arc::new(Shared {
            options,
            client,
            context,
            stream,
            node,
            peers: PeerWrites::default(),
            next_append: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            applied_sequence: AtomicU64::new(0),
            first_sequence: AtomicU64::new(state.first_sequence),
            probed: Mutex::new(None),
            max_payload,
            last_accept_ms: AtomicU64::new(0),
            publish_failure: Mutex::new(None),
            tail_failure: Mutex::new(None),
            probe_failure: Mutex::new(None),
            unanswered_probe_us: AtomicU64::new(0),
            newest_ack_us: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            epoch: Instant::now(),
            newest_success_start_us: AtomicU64::new(0),
            in_flight: Arc::new(Semaphore::new(APPENDS_IN_FLIGHT)),
            tail_reset,
            disconnects,
            metrics: LogMetrics::default(),
            publish_retries: Default::default(),
            late_skipped: Default::default(),
        });
        Ok((shared, summary))
    }

    async fn replay(
        shared: &Arc<Shared>,
        summary: &mut OpenSummary,
        visit: &mut dyn FnMut(Frame),
    ) -> Result<(), LogError> {
        let last = summary.last_sequence;
        shared.applied_sequence.store(last, Ordering::Release);
        if last == 0 || last < summary.first_sequence {
            return Ok(());
        }
        // A message past `last` may come when `last` itself expired; the tail starts after it.
        let mut reader = Reader::new(shared.clone(), summary.first_sequence.max(1));
        // Errors (a cluster electing a leader, a reconnect) are retried until nothing arrives
        // for REPLAY_IDLE_TIMEOUT.
        let mut progress_at = Instant::now();
        loop {
            let left = REPLAY_IDLE_TIMEOUT.saturating_sub(progress_at.elapsed());
            let (delivered, pending) = match tokio::time::timeout(left, reader.next()).await {
                Ok(Ok(next)) => next,
                Ok(Err(error)) if !left.is_zero() => {
                    tracing::warn!(%error, "replaying the stream: retrying");
                    tokio::time::sleep(TAIL_RETRY_DELAY).await;
                    continue;
                }
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    return Err(LogError::Unavailable(format!(
                        "replaying the stream: no message for {REPLAY_IDLE_TIMEOUT:?}"
                    )));
                }
            };
            progress_at = Instant::now();
            summary.messages += 1;
            if let Some(frame) = delivered.frame {
                summary.frames += 1;
                summary.records += frame.len() as u64;
                // Nothing replayed was admitted by this process. (Only frames of the last
                // minute are decoded for it: `visit` finds their owners again, as the local
                // log's replay does.)
                shared.peers.note(&frame, now_ms());
                visit(frame);
            }
            if delivered.sequence >= last || pending == 0 {
                let applied = delivered.sequence.max(last);
                shared.applied_sequence.store(applied, Ordering::Release);
                return Ok(());
            }
        }
    }

    /// The backend's metrics.
    pub fn metrics(&self) -> &LogMetrics {
        &self.shared.metrics
    }

    /// The sequence of the newest stream message this node dispatched (or replayed).
    pub fn applied_sequence(&self) -> u64 {
        self.shared.applied_sequence.load(Ordering::Acquire)
    }

    /// Starts the ordering thread, the tail and the housekeeping task.
    fn start_tail(&self, dispatcher: Dispatcher) -> std::io::Result<()> {
        let Some(rx) = lock(&self.pending_start).take() else {
            return Ok(());
        };
        let Some(tx) = self.queue.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let last_position = {
            // The replayed frames were dispatched by the caller; barriers start after them.
            let sequence = shared.applied_sequence.load(Ordering::Acquire);
            if sequence == 0 {
                0
            } else {
                position_of(sequence + 1) - 1
            }
        };
        let thread = std::thread::Builder::new()
            .name("flux-log-tail".into())
            .spawn(move || run_ordering(shared, dispatcher, rx, last_position))?;
        *lock(&self.tail_thread) = Some(thread);
        let from = self.shared.applied_sequence.load(Ordering::Acquire) + 1;
        self.handle.spawn(run_tail(
            self.shared.clone(),
            Reader::new(self.shared.clone(), from),
            tx,
        ));
        self.handle
            .spawn(run_housekeeping(Arc::downgrade(&self.shared)));
        self.handle.spawn(run_probe(Arc::downgrade(&self.shared)));
        Ok(())
    }

    fn sender(&self) -> Option<flume::Sender<TailMsg>> {
        self.queue.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `future` on the backend's runtime and waits for it from any thread.
    fn block_on<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, LogError>> + Send + 'static,
    ) -> Result<T, LogError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv_timeout(PUBLISH_TIMEOUT * 2)
            .map_err(|_| LogError::Unavailable("NATS did not answer in time".into()))?
    }
}

/// The ordering thread: dispatches frames in stream order, completes this node's appends and
/// runs barriers between frames.
fn run_ordering(
    shared: Arc<Shared>,
    dispatcher: Dispatcher,
    rx: flume::Receiver<TailMsg>,
    mut last_position: LogPosition,
) {
    let shards = dispatcher.shard_count();
    while let Ok(msg) = rx.recv() {
        match msg {
            TailMsg::Frame(delivered) => {
                let completion = delivered
                    .append
                    .and_then(|counter| lock(&shared.pending).remove(&counter))
                    .map(|p| p.completion);
                match delivered.frame {
                    Some(frame) => {
                        let owners = if delivered.append.is_none() {
                            shared.peers.owners_noting(&frame, shards, now_ms())
                        } else {
                            owners_of(&frame, shards)
                        };
                        last_position = frame.last_position();
                        dispatcher.dispatch(Arc::new(frame), &owners, completion);
                    }
                    None => {
                        if let Some(completion) = completion {
                            completion.fail(if delivered.late {
                                format!(
                                    "JetStream did not acknowledge a write within \
                                     {PUBLISH_BUDGET:?}; it stored it too late to be applied"
                                )
                            } else {
                                "the stream message could not be read back".into()
                            });
                        }
                    }
                }
                shared
                    .applied_sequence
                    .store(delivered.sequence, Ordering::Release);
            }
            TailMsg::Barrier(barrier) => barrier(last_position, &dispatcher),
        }
    }
}

/// Reads the stream for as long as the backend runs, re-creating the consumer after errors.
async fn run_tail(shared: Arc<Shared>, mut reader: Reader, tx: flume::Sender<TailMsg>) {
    loop {
        match reader.next().await {
            Ok((delivered, _)) => {
                if lock(&shared.tail_failure).take().is_some() {
                    tracing::info!("the stream tail reads again");
                }
                if tx.send_async(TailMsg::Frame(delivered)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                let reason = format!("cannot read the stream: {error}");
                {
                    let mut failure = lock(&shared.tail_failure);
                    if failure.is_none() {
                        tracing::warn!(%reason, "stream tail interrupted; retrying");
                    }
                    *failure = Some(reason);
                }
                tokio::time::sleep(TAIL_RETRY_DELAY).await;
            }
        }
    }
}

/// Answers appends whose wait ended: acknowledged but not applied within [`APPLY_TIMEOUT`]
/// (200), unacknowledged with their fate settled (not stored in time: 503), or with their wait
/// capped and their fate still open (504).
async fn run_housekeeping(shared: std::sync::Weak<Shared>) {
    let mut ticker = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // While closing waits for the appends in flight, their answers still come on time.
        if shared.closed.load(Ordering::Acquire) && lock(&shared.pending).is_empty() {
            return;
        }
        let now = Instant::now();
        // An unacknowledged append's fate is settled once a probe asked after its `until`
        // (JetStream's clock then past its deadline) has been applied up to: stored in time,
        // the tail would have dispatched it by then. Read before the pending entries, which the
        // tail removes before it moves `applied_sequence`.
        let applied = shared.applied_sequence.load(Ordering::Acquire);
        let probed = *lock(&shared.probed);
        let settled =
            |until: Instant| probed.is_some_and(|(asked, last)| asked >= until && applied >= last);
        let late: Vec<PendingAppend> = {
            let mut pending = lock(&shared.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| {
                    p.acked.is_some_and(|(_, deadline)| deadline <= now)
                        || p.unknown.as_ref().is_some_and(|(until, _)| {
                            *until <= now && (settled(*until) || now >= *until + UNKNOWN_CAP)
                        })
                })
                .map(|(&id, _)| id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in late {
            if let Some((until, reason)) = p.unknown {
                if settled(until) {
                    // Not stored in time: stored later, every node skips it.
                    p.completion.fail(reason);
                } else {
                    // Stored in time or not, NATS has not shown which: say so, not 503.
                    p.completion.unknown(format!(
                        "{reason}; JetStream did not show within {:?} whether it stored the write",
                        PUBLISH_BUDGET + 2 * SKIP_MARGIN + UNKNOWN_CAP
                    ));
                }
                continue;
            }
            // The write is in the stream, so it is accepted (a 503 would say it was not):
            // answer now, without read-your-writes; the tail applies it when it gets there.
            if let Some((sequence, _)) = p.acked {
                tracing::warn!(
                    sequence,
                    "a write acknowledged by JetStream was not applied by this node within \
                     {APPLY_TIMEOUT:?}; answering it before it is applied"
                );
                p.completion.succeed(position_of(sequence));
            }
        }
    }
}

/// Probes the stream (every fourth housekeeping interval, every one while something fails or
/// an append's fate is open), on its own so a probe NATS does not answer never holds up the
/// appends' deadlines: records the stream's last sequence for them, clears a publish failure
/// once the stream answers, reports a probe unanswered within [`PROBE_TIMEOUT`] to health,
/// keeps the stream's first sequence fresh, and re-creates a stalled tail's consumer.
async fn run_probe(shared: std::sync::Weak<Shared>) {
    let mut ticker = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    // The applied sequence at the previous stall check, when the stream was ahead of it.
    let mut behind_at: Option<u64> = None;
    loop {
        ticker.tick().await;
        ticks += 1;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let failing = lock(&shared.publish_failure).is_some()
            || lock(&shared.probe_failure).is_some()
            || lock(&shared.pending).values().any(|p| p.unknown.is_some());
        if (failing || ticks.is_multiple_of(4))
            && shared.client.connection_state() == State::Connected
        {
            let asked = Instant::now();
            let probed = tokio::time::timeout(PROBE_TIMEOUT, shared.stream.get_info()).await;
            if probed.is_ok() {
                shared.unanswered_probe_us.store(0, Ordering::Release);
            }
            match probed {
                Ok(Ok(info)) => {
                    *lock(&shared.probed) = Some((asked, info.state.last_sequence));
                    if lock(&shared.probe_failure).take().is_some() {
                        tracing::info!("the stream answers its probe again");
                    }
                    shared
                        .first_sequence
                        .store(info.state.first_sequence, Ordering::Release);
                    let applied = shared.applied_sequence.load(Ordering::Acquire);
                    if info.state.last_sequence > applied {
                        if behind_at == Some(applied) {
                            tracing::warn!(
                                applied,
                                last = info.state.last_sequence,
                                "the stream tail stalled; re-creating its consumer"
                            );
                            shared.tail_reset.request();
                            // The new consumer gets two probes to make progress.
                            behind_at = None;
                        } else {
                            behind_at = Some(applied);
                        }
                    } else {
                        behind_at = None;
                    }
                    if lock(&shared.publish_failure).take().is_some() {
                        tracing::info!("the stream answers again; taking writes");
                    }
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "stream probe failed");
                    *lock(&shared.probe_failure) =
                        Some(format!("the stream probe failed: {error}"));
                }
                Err(_) => {
                    tracing::warn!("the stream did not answer its probe within {PROBE_TIMEOUT:?}");
                    shared
                        .unanswered_probe_us
                        .store(shared.micros_at(asked).max(1), Ordering::Release);
                    *lock(&shared.probe_failure) = Some(format!(
                        "NATS did not answer a probe of the stream within {PROBE_TIMEOUT:?}"
                    ));
                }
            }
        }
    }
}

/// Cuts `bytes` into the payloads of one append: chunks of at most `chunk` bytes.
fn chunks(bytes: Vec<u8>, chunk: usize) -> Vec<Bytes> {
    let bytes = Bytes::from(bytes);
    if bytes.len() <= chunk {
        return vec![bytes];
    }
    (0..bytes.len())
        .step_by(chunk)
        .map(|start| bytes.slice(start..(start + chunk).min(bytes.len())))
        .collect()
}

/// Publishes one message until JetStream acknowledges it or `deadline` passes, and returns
/// its stream sequence. Every attempt carries the same `Nats-Msg-Id` (in `headers`), so an
/// attempt whose ack was lost (the server stalled, the connection dropped) and the attempt
/// after it are stored once, and the later ack names the sequence of the first.
async fn publish_message(
    shared: &Shared,
    headers: HeaderMap,
    payload: Bytes,
    deadline: tokio::time::Instant,
) -> Result<u64, PublishFailure> {
    let mut disconnects = shared.disconnects.clone();
    // Whether an attempt reached the connection: JetStream may then store the message later.
    let handed = AtomicBool::new(false);
    let failure = |reason: String| PublishFailure {
        reason,
        maybe_stored: handed.load(Ordering::Relaxed),
    };
    loop {
        disconnects.mark_unchanged();
        // A message handed to the client while it is disconnected would wait in its buffer
        // and could be stored after this append gave up: publish only on a live connection.
        while shared.client.connection_state() != State::Connected {
            if tokio::time::Instant::now() + RECONNECT_POLL >= deadline {
                return Err(failure(format!(
                    "NATS unreachable at {} for {PUBLISH_BUDGET:?}",
                    shared.options.servers.join(",")
                )));
            }
            tokio::time::sleep(RECONNECT_POLL).await;
        }
        let attempt = async {
            let ack = shared
                .context
                .publish_with_headers(
                    shared.options.subject.clone(),
                    headers.clone(),
                    payload.clone(),
                )
                .await
                .map_err(|e| format!("publishing to JetStream failed: {e}"))?;
            handed.store(true, Ordering::Relaxed);
            ack.await
                .map_err(|e| format!("JetStream did not acknowledge a write: {e}"))
        };
        let attempt_deadline = deadline.min(tokio::time::Instant::now() + ATTEMPT_TIMEOUT);
        let lost = || format!("JetStream did not acknowledge a write within {PUBLISH_BUDGET:?}");
        let error = tokio::select! {
            outcome = tokio::time::timeout_at(attempt_deadline, attempt) => match outcome {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(error)) => error,
                Err(_) => lost(),
            },
            // The connection dropped after this attempt began: publish again once it is back.
            _ = disconnects.changed() => lost(),
        };
        let now = tokio::time::Instant::now();
        if now + REPUBLISH_DELAY >= deadline {
            return Err(failure(error));
        }
        if now < attempt_deadline {
            // An error answer, not a lost ack: do not hammer a server that refuses.
            tokio::time::sleep(REPUBLISH_DELAY).await;
        }
        shared.publish_retries.inc();
        tracing::debug!(%error, "publishing the message again");
    }
}

/// Why a message was not published, and whether JetStream may still store it (an attempt
/// reached the connection and no ack came).
struct PublishFailure {
    reason: String,
    maybe_stored: bool,
}

/// Publishes one append's messages: parts first (concurrently, all acks awaited), then the
/// message that completes the frame. Returns its stream sequence.
async fn publish_append(
    shared: &Shared,
    counter: u64,
    mut payloads: Vec<Bytes>,
    skip_after_ms: u64,
) -> Result<u64, PublishFailure> {
    let deadline = tokio::time::Instant::now() + PUBLISH_BUDGET;
    let append_id = format!("{}.{counter}", shared.node);
    let last = payloads.pop().ok_or_else(|| PublishFailure {
        reason: "nothing to publish".into(),
        maybe_stored: false,
    })?;
    let parts = payloads.into_iter().enumerate().map(|(i, payload)| {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_PART, append_id.as_str());
        headers.insert(HEADER_MSG_ID, format!("{append_id}.{i}").as_str());
        publish_message(shared, headers, payload, deadline)
    });
    // Parts alone are never applied: a failed part leaves nothing that could be.
    let sequences: Vec<String> = futures::future::try_join_all(parts)
        .await
        .map_err(|failure| PublishFailure {
            maybe_stored: false,
            ..failure
        })?
        .iter()
        .map(u64::to_string)
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_APPEND, append_id.as_str());
    headers.insert(HEADER_MSG_ID, append_id.as_str());
    headers.insert(HEADER_DEADLINE, skip_after_ms.to_string().as_str());
    if !sequences.is_empty() {
        headers.insert(HEADER_PARTS, sequences.join(",").as_str());
    }
    publish_message(shared, headers, last, deadline).await
}

impl Log for JetStreamLog {
    fn append(
        &self,
        batch: RecordBatch,
        completion: Arc<Completion>,
    ) -> Pin<Box<dyn Future<Output = Result<(), LogError>> + Send + '_>> {
        Box::pin(async move {
            if let Some(reason) = self.unavailable_reason() {
                return Err(LogError::Unavailable(reason));
            }
            if batch.is_empty() {
                completion.succeed(self.next_position());
                return Ok(());
            }
            if batch.len() >= MAX_FRAME_RECORDS {
                return Err(LogError::Unavailable(format!(
                    "a batch of {} records does not fit one JetStream frame (at most {})",
                    batch.len(),
                    MAX_FRAME_RECORDS - 1
                )));
            }
            let shared = self.shared.clone();
            let permit = shared
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| LogError::Unavailable("shutting down".into()))?;
            let records = batch.len() as u64;
            let now = now_ms();
            let accept_ms = now.max(shared.last_accept_ms.fetch_max(now, Ordering::AcqRel));
            let mut bytes = Vec::with_capacity(batch.encoded_bytes() + 32);
            encode_frame(&mut bytes, 0, accept_ms, &batch);
            drop(batch);
            let size = bytes.len() as u64;
            let payloads = chunks(bytes, shared.max_payload - HEADER_ROOM_BYTES);
            let counter = shared.next_append.fetch_add(1, Ordering::Relaxed);
            lock(&shared.pending).insert(
                counter,
                PendingAppend {
                    completion,
                    acked: None,
                    unknown: None,
                },
            );
            self.handle.spawn(async move {
                let started = Instant::now();
                let started_us = shared.micros_at(started);
                // The deadline JetStream's clock must not pass before storing the append, and
                // the moment (this clock) from which a probe shows whether it did.
                let skip_after_ms = now_ms() + (PUBLISH_BUDGET + SKIP_MARGIN).as_millis() as u64;
                let settles_from = started + PUBLISH_BUDGET + 2 * SKIP_MARGIN + SETTLE_SLACK;
                let result = publish_append(&shared, counter, payloads, skip_after_ms).await;
                drop(permit);
                let mut pending = lock(&shared.pending);
                match result {
                    Ok(sequence) => {
                        shared
                            .newest_success_start_us
                            .fetch_max(started_us, Ordering::AcqRel);
                        shared
                            .newest_ack_us
                            .fetch_max(shared.micros_at(Instant::now()), Ordering::AcqRel);
                        if let Some(p) = pending.get_mut(&counter) {
                            p.acked = Some((sequence, Instant::now() + APPLY_TIMEOUT));
                        }
                        drop(pending);
                        let metrics = &shared.metrics;
                        metrics.records_appended.inc_by(records);
                        metrics.bytes_appended.inc_by(size);
                        metrics.group_records.observe(records as f64);
                        metrics
                            .append_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    Err(failure) => {
                        let reason = failure.reason;
                        tracing::warn!(%reason, "append failed");
                        let newest = shared.newest_success_start_us.load(Ordering::Acquire);
                        if started_us >= newest {
                            lock(&shared.publish_failure).get_or_insert(reason.clone());
                        }
                        if failure.maybe_stored {
                            // JetStream may still store it, in time or too late: the tail's
                            // verdict answers, or housekeeping once it can no longer be in time.
                            if let Some(p) = pending.get_mut(&counter) {
                                p.unknown = Some((settles_from, reason));
                            }
                        } else if let Some(p) = pending.remove(&counter) {
                            drop(pending);
                            p.completion.fail(reason);
                        }
                    }
                }
            });
            Ok(())
        })
    }

    fn barrier(&self, barrier: Barrier) -> Result<(), LogError> {
        let sender = self
            .sender()
            .ok_or_else(|| LogError::Unavailable("shutting down".into()))?;
        sender
            .send(TailMsg::Barrier(barrier))
            .map_err(|_| LogError::Unavailable("the stream tail stopped".into()))
    }

    fn read_frame(&self, position: LogPosition) -> Result<Option<Arc<Frame>>, LogError> {
        let sequence = sequence_of(position);
        if sequence == 0 {
            return Ok(None);
        }
        let shared = self.shared.clone();
        let frame = self.block_on(async move {
            let Some((headers, payload)) = get_message(&shared.stream, sequence).await? else {
                return Ok(None);
            };
            let mut parts = HashMap::new();
            frame_of(
                &shared.stream,
                sequence,
                headers.as_ref(),
                &payload,
                &mut parts,
            )
            .await
        })?;
        Ok(frame
            .filter(|f| (f.first_position..=f.last_position()).contains(&position))
            .map(Arc::new))
    }

    fn first_position(&self) -> LogPosition {
        position_of(self.shared.first_sequence.load(Ordering::Acquire).max(1))
    }

    fn next_position(&self) -> LogPosition {
        position_of(self.shared.applied_sequence.load(Ordering::Acquire) + 1)
    }

    fn compact(&self, _covered: LogPosition, _older_than_ms: u64) -> Result<usize, LogError> {
        // The stream's max_age governs retention; the node keeps nothing of its own to drop.
        Ok(0)
    }

    fn health_reason(&self) -> Option<String> {
        self.unavailable_reason()
            .or_else(|| lock(&self.shared.probe_failure).clone())
    }

    fn peer_events(&self, namespace: &str, now_ms: u64) -> Vec<crate::log::peers::Expiring> {
        self.shared.peers.expiring(namespace, now_ms)
    }

    fn unavailable_reason(&self) -> Option<String> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
        if shared.client.connection_state() != State::Connected {
            return Some(format!(
                "NATS unreachable at {}",
                shared.options.servers.join(",")
            ));
        }
        if let Some(reason) = lock(&shared.publish_failure).clone() {
            return Some(reason);
        }
        if shared.silent() {
            return Some(format!(
                "NATS at {} answered neither a probe of the stream within {PROBE_TIMEOUT:?} nor \
                 any write since",
                shared.options.servers.join(",")
            ));
        }
        lock(&shared.tail_failure).clone()
    }

    fn close(&self) {
        let shared = &self.shared;
        if shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Let the appends already published finish: acknowledged, then applied.
        let deadline = Instant::now() + CLOSE_WAIT;
        while Instant::now() < deadline
            && (shared.in_flight.available_permits() < APPENDS_IN_FLIGHT
                || !lock(&shared.pending).is_empty())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (_, p) in lock(&shared.pending).drain() {
            match p.acked {
                // In the stream, hence accepted (this node will not apply it now).
                Some((sequence, _)) => p.completion.succeed(position_of(sequence)),
                // Perhaps handed to NATS and stored: neither accepted nor refused for sure.
                None => p
                    .completion
                    .unknown("shutting down before JetStream answered".into()),
            }
        }
        self.queue.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
        if let Some(thread) = lock(&self.tail_thread).take() {
            let _ = thread.join();
        }
    }

    fn start(&self, dispatcher: Dispatcher) -> std::io::Result<()> {
        self.start_tail(dispatcher)
    }

    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.shared.metrics.register(registry);
        registry.register(
            "flux_log_publish_retries",
            "JetStream messages published again (same Nats-Msg-Id) after a lost ack or an error",
            self.shared.publish_retries.clone(),
        );
        registry.register(
            "flux_log_late_appends_skipped",
            "Appends JetStream stored after their deadline (Flux-Deadline), skipped by every node",
            self.shared.late_skipped.clone(),
        );
    }
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.queue.write().unwrap_or_else(|e| e.into_inner()).take();
        // `shutdown_background` may run anywhere, even inside another runtime.
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
    }
}

/// Opens the stream for [`crate::Engine::open`], replaying it into the shards; refuses a
/// snapshot that the stream cannot continue.
pub(crate) fn open_for_engine(
    options: &JetStreamOptions,
    dispatcher: &Dispatcher,
    covered: LogPosition,
    report: &mut RecoveryReport,
) -> Result<Arc<dyn Log>, EngineError> {
    let shards = dispatcher.shard_count();
    let (log, summary) = JetStreamLog::open(options.clone(), &mut |frame| {
        let owners = owners_of(&frame, shards);
        dispatcher.dispatch(Arc::new(frame), &owners, None);
    })?;
    let stream = &options.stream;
    let covered_sequence = sequence_of(covered);
    if covered_sequence > summary.last_sequence {
        return Err(LogError::Corrupt(format!(
            "the newest snapshot covers stream sequence {covered_sequence} but stream {stream} \
             ends at {}: it was re-created or is another stream; move the data directory's \
             snapshots away to rebuild from the stream",
            summary.last_sequence
        ))
        .into());
    }
    if summary.first_sequence > 1 && covered_sequence + 1 < summary.first_sequence {
        return Err(LogError::Corrupt(format!(
            "stream {stream} starts at sequence {} (older messages expired) and no snapshot \
             covers sequences 1..{}; copy a snapshot from another node of this stream into the \
             data directory",
            summary.first_sequence, summary.first_sequence
        ))
        .into());
    }
    report.log_records = summary.records;
    tracing::info!(
        stream = %stream, created = summary.created, messages = summary.messages,
        frames = summary.frames, records = summary.records,
        last_sequence = summary.last_sequence, "replayed the JetStream stream"
    );
    Ok(Arc::new(log))
}
