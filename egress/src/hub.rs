//! The hub: the subscription index, the live connections, and the fan-out of applied changes.
//!
//! Invariants:
//! - A change becomes frames once (one `state_update` per property, or one `entity_deleted`),
//!   built only when at least one connection matches; every matching connection gets handles
//!   to the same bytes (`*` connections: to the stream's one copy of them). Fan-out runs on
//!   the thread that applied the change (its shard thread, or the log committer applying in
//!   place), under the shard's lock, so frames of one entity reach each connection in log
//!   order (a helper's writes included: a connection with quietly queued frames takes later
//!   ones behind them).
//! - Connections subscribed to `*` are not visited per change: the change's frames are
//!   appended once to the hub's [`Stream`], which their writers read (woken through
//!   [`Stream::appended`]). When there are few of them (up to 128), each idle one is written
//!   to at once; when there are more under heavy fan-out, the sweeper thread writes them
//!   (`crate::sweep`) and no writer is woken.
//! - The first few matching connections of a change are written to directly from the applying
//!   thread when idle (one wake-up less on the path to a quiet subscriber); see
//!   [`Connection::direct_begin`] and [`Connection::stream_direct`]. Those of exact and prefix
//!   subscriptions go out in io_uring submissions of up to 16 (`crate::sweep::Sender`, one per
//!   applying thread); a connection whose lock is busy is not waited for while the batch holds
//!   others' locks (the batch is sent first). Past the first
//!   `DIRECT_SPLIT_AFTER`, every second one is queued quietly ([`Connection::push_quiet`]) and
//!   written by a helper on a blocking-pool thread ([`Connection::flush_begin`], batched the
//!   same way) while the applying thread writes the others: two cores share the loopback sends
//!   of one change.
//! - Producers never wait for a connection: pushes are bounded and overflow closes the
//!   connection (1008), counted in [`Counters::overflow_closes`].
//! - A connection with no subscription receives only `metrics_update`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flux_engine::Engine;
use flux_engine::entity::check_entity_id;
use flux_engine::json;
use flux_engine::record::PropertyIter;
use flux_engine::shard::ChangeObserver;
use hashbrown::HashMap;
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;

use crate::connection::{Connection, DirectBegin, Pace, Push};
use crate::frame::{self, FrameReader, Message, ReadError};
use crate::index::{Index, Pattern};
use crate::stream::Stream;

/// Time between `metrics_update` messages.
pub const METRICS_INTERVAL: Duration = Duration::from_secs(2);
/// How often the coalescing window follows the delivered-frame rate.
const PACE_INTERVAL: Duration = Duration::from_millis(100);
/// Matching connections a change is written to straight from the applying thread (when idle);
/// the rest go to their writer tasks, which run in parallel on the runtime's workers. One
/// loopback write costs ~6 µs, so this bounds the applier's stall to under a millisecond, and
/// covers every subscriber of a change up to this many: no hand-off, no wake-up
/// (`e2e --subscribers 100 --rate 200`: p99 1.6–1.7 ms here, against 2.3–2.6 ms with 4).
const DIRECT_WRITES_PER_CHANGE: usize = 128;

/// Of the connections a change is written to directly, those after the first this many are
/// shared with a helper: every second one is queued quietly and the helper, on a thread of the
/// runtime's blocking pool (a task would wait in the applying worker's LIFO slot), writes them
/// while the applying thread writes the rest. `e2e --subscribers 100 --rate 200`, 12 pairs:
/// p99 ~2.0 → ~1.5 ms (medians; decision 0003, session-6 addendum).
const DIRECT_SPLIT_AFTER: usize = 8;
/// A helper is used only for changes written directly to at least this many connections: the
/// hand-off costs ~20 µs of CPU per change (`e2e --subscribers 20 --rate 2000`: 136–143 →
/// 156–162 µs of server CPU per event with a helper), which a few shared sends do not repay.
const DIRECT_SPLIT_FROM: usize = 32;

thread_local! {
    /// The io_uring sender of direct writes made on this thread (made at its first).
    static DIRECT_SENDER: std::cell::RefCell<Option<crate::sweep::Sender>> =
        const { std::cell::RefCell::new(None) };
}
/// Sends each of `connections` what `begin` prepares for it (a change's frames, or what a
/// helper flushes), [`crate::sweep::SUBMISSION_WRITES`] per io_uring submission through this
/// thread's sender (one syscall for many); `done` gets each connection's outcome. Holding
/// others' locks, a busy connection is not waited for: the batch goes first, then it is taken
/// with nothing held.
fn send_batched<'a>(
    connections: impl IntoIterator<Item = &'a Connection>,
    mut begin: impl FnMut(&'a Connection, bool) -> DirectBegin<'a>,
    mut done: impl FnMut(Push),
) {
    let mut connections = connections.into_iter().peekable();
    if connections.peek().is_none() {
        return; // No ring is made on a thread that has nothing to send.
    }
    DIRECT_SENDER.with_borrow_mut(|sender| {
        let sender = sender.get_or_insert_with(crate::sweep::Sender::new);
        let mut batch = Vec::with_capacity(crate::sweep::SUBMISSION_WRITES);
        for connection in connections {
            let begun = match begin(connection, batch.is_empty()) {
                DirectBegin::Busy => {
                    sender.send_direct(&mut batch, &mut done);
                    begin(connection, true)
                }
                begun => begun,
            };
            match begun {
                DirectBegin::Write(write) => batch.push(write),
                DirectBegin::Done(pushed) => done(pushed),
                DirectBegin::Busy => unreachable!("a begin allowed to wait takes the lock"),
            }
            if batch.len() == crate::sweep::SUBMISSION_WRITES {
                sender.send_direct(&mut batch, &mut done);
            }
        }
        sender.send_direct(&mut batch, &mut done);
    });
}

/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 1024;

/// Why `entity_id` cannot be a subscription: `*`, or an entity id ([`check_entity_id`]) or
/// id prefix followed by `*`, as no other could ever match.
fn check_subscription(entity_id: &str) -> Result<(), String> {
    match entity_id.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => check_entity_id(prefix, "entity_id (before its *)"),
        None => check_entity_id(entity_id, "entity_id"),
    }
}

/// How long shutdown waits for connections to send their close frames.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Counters for metrics.
#[derive(Default)]
pub struct Counters {
    pub connections: Gauge,
    pub connections_opened: Counter,
    pub overflow_closes: Counter,
    /// Frames queued on connections (each delivery of a shared frame counts once).
    pub frames_queued: Counter,
}

impl Counters {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flux_websocket_connections",
            "Open WebSocket connections",
            self.connections.clone(),
        );
        registry.register(
            "flux_websocket_connections_opened",
            "WebSocket connections accepted",
            self.connections_opened.clone(),
        );
        registry.register(
            "flux_websocket_overflow_closes",
            "Connections closed (1008) because their send queue overflowed (frames, bytes, or 30 s with nothing read)",
            self.overflow_closes.clone(),
        );
        registry.register(
            "flux_websocket_frames_queued",
            "Frames queued to connections (one per delivery of a shared frame)",
            self.frames_queued.clone(),
        );
        registry.register(
            "flux_websocket_writes",
            "Socket writes that sent WebSocket frames (each may carry many)",
            crate::connection::SOCKET_WRITES.clone(),
        );
        registry.register(
            "flux_websocket_sweep_writes",
            "Socket writes made by the sweeper under heavy fan-out (part of flux_websocket_writes)",
            crate::connection::SWEEP_WRITES.clone(),
        );
    }
}

/// Owns every WebSocket connection and their subscriptions.
pub struct Hub {
    index: RwLock<Index>,
    /// Mirrors the index's subscription count so changes skip the lock when nobody listens.
    subscriptions: AtomicUsize,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    /// Every writer's coalescing window, from the delivered-frame rate.
    pace: Pace,
    /// The runtime the connections run on (known once one connected): helpers of direct
    /// writes are spawned there.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    /// The frames of every change, for the connections subscribed to `*`.
    stream: Stream,
    /// The thread that writes `*` connections under heavy fan-out (`crate::sweep`).
    sweeper: std::sync::OnceLock<Option<std::thread::Thread>>,
    /// Set if the sweeper stopped on a panic: `*` writers then write for themselves again.
    sweeper_failed: std::sync::atomic::AtomicBool,
    /// Bumped whenever the set of `*` connections changes.
    all_generation: AtomicU64,
    next_id: AtomicU64,
    pub counters: Counters,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            index: RwLock::new(Index::default()),
            subscriptions: AtomicUsize::new(0),
            connections: Mutex::new(HashMap::new()),
            pace: Pace::default(),
            runtime: std::sync::OnceLock::new(),
            stream: Stream::default(),
            sweeper: std::sync::OnceLock::new(),
            sweeper_failed: std::sync::atomic::AtomicBool::new(false),
            all_generation: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
        }
    }
}

thread_local! {
    /// Scratch space for building a frame's JSON on the applying thread.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The sweeper's copy of the `*` connections, taken again when they change.
#[derive(Default)]
pub(crate) struct SweepCache {
    all: Vec<Arc<Connection>>,
    /// `Hub::all_generation` when `all` was taken.
    generation: Option<u64>,
}

/// Encodes a text frame whose payload `build` writes.
fn text_frame(build: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    SCRATCH.with(|scratch| {
        let mut payload = scratch.borrow_mut();
        payload.clear();
        build(&mut payload);
        let mut out = BytesMut::with_capacity(payload.len() + 10);
        frame::encode_into(&mut out, frame::OPCODE_TEXT, payload.len());
        out.extend_from_slice(&payload);
        out.freeze()
    })
}

fn error_frame(message: &str) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"error\",\"message\":");
        json::write_str(out, message);
        out.push(b'}');
    })
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn deliver(&self, id: &str, build: impl FnOnce() -> Vec<Bytes>) {
        if self.subscriptions.load(Ordering::Acquire) == 0 {
            return;
        }
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let mut frames: Option<Vec<Bytes>> = None;
        let mut build = Some(build);
        let mut delivered = 0u64;
        let mut direct_left = DIRECT_WRITES_PER_CHANGE;
        let window = self.pace.window();
        let all = index.all();
        if !all.is_empty() {
            let frames =
                frames.get_or_insert_with(|| build.take().map(|b| b()).unwrap_or_default());
            // Appended under the index's read lock: a `*` subscription (which takes the write
            // lock) starts reading either before or after this change, never inside it.
            let at = self.stream.append(frames);
            delivered += (frames.len() * all.len()) as u64;
            let mut wake = true;
            let sweeper = self
                .sweeper
                .get()
                .and_then(Option::as_ref)
                .filter(|_| all.len() > direct_left && self.pace.swept())
                .filter(|_| !self.sweeper_failed.load(Ordering::Relaxed));
            self.pace.set_stream_swept(sweeper.is_some());
            if let Some(sweeper) = sweeper {
                // Heavy fan-out: the sweeper writes them (woken in case it waits). Should it
                // find fan-out light by then, it wakes their writers instead.
                wake = false;
                sweeper.unpark();
            } else if all.len() <= direct_left {
                direct_left -= all.len();
                wake = false;
                for connection in all {
                    wake |= !connection.stream_direct(&self.stream, frames, at, window);
                }
            }
            if wake {
                self.stream.appended.notify_waiters();
            }
        }
        let mut count = |pushed: Push, frames: usize| match pushed {
            Push::Queued => delivered += frames as u64,
            Push::Overflowed => {
                self.counters.overflow_closes.inc();
            }
            Push::Closed => {}
        };
        // The first matching connections are written directly (below); the rest are queued.
        let mut direct: Vec<&Arc<Connection>> = Vec::new();
        index.for_each_match(id, |connection| {
            let frames =
                frames.get_or_insert_with(|| build.take().map(|b| b()).unwrap_or_default());
            if direct.len() < direct_left {
                direct.push(connection);
            } else {
                count(connection.push(frames), frames.len());
            }
        });
        let Some(frames) = &frames else {
            self.counters.frames_queued.inc_by(delivered);
            return;
        };
        // With many, past the first few every second one is queued quietly and written by a
        // helper on a blocking-pool thread while this thread writes the others.
        let helper = self
            .runtime
            .get()
            .filter(|_| direct.len() >= DIRECT_SPLIT_FROM);
        let mut helped: Vec<Arc<Connection>> = Vec::new();
        if helper.is_some() {
            let mut i = 0;
            direct.retain(|connection| {
                i += 1;
                if i <= DIRECT_SPLIT_AFTER || i % 2 == 1 {
                    return true;
                }
                let pushed = connection.push_quiet(frames);
                if pushed == Push::Queued {
                    helped.push(Arc::clone(connection));
                }
                count(pushed, frames.len());
                false
            });
        }
        if let Some(runtime) = helper.filter(|_| !helped.is_empty()) {
            runtime.spawn_blocking(move || {
                send_batched(
                    helped.iter().map(|connection| &**connection),
                    |connection, wait| connection.flush_begin(window, wait),
                    |_| {}, // Counted when queued.
                );
            });
        }
        send_batched(
            direct.into_iter().map(|connection| &**connection),
            |connection, wait| connection.direct_begin(frames, window, wait),
            |pushed| count(pushed, frames.len()),
        );
        self.counters.frames_queued.inc_by(delivered);
    }

    /// Starts the sweeper thread once (at the first `*` subscription); it ends with the hub.
    fn start_sweeper(self: &Arc<Self>) {
        let hub = Arc::downgrade(self);
        self.sweeper.get_or_init(|| match crate::sweep::spawn(hub) {
            Ok(thread) => Some(thread),
            Err(error) => {
                tracing::error!(%error, "could not start the WebSocket sweeper thread");
                None
            }
        });
    }

    /// The sweeper stopped on a panic: changes wake the `*` writers from now on.
    pub(crate) fn sweeper_failed(&self) {
        self.sweeper_failed.store(true, Ordering::Relaxed);
        self.stream.appended.notify_waiters();
    }

    /// One round of the sweeper: when fan-out is heavy, writes every `*` connection that is
    /// due (window passed) and behind the stream, and returns the window; `None` when fan-out
    /// is not heavy (the sweeper then waits). `cache` keeps the `*` connections between rounds.
    pub(crate) fn sweep(
        &self,
        cache: &mut SweepCache,
        sender: &mut crate::sweep::Sender,
    ) -> Option<Duration> {
        if !self.pace.swept() {
            *cache = SweepCache::default();
            if self.pace.stream_swept() {
                // Fan-out turned light since the last change, which was left to the sweeper
                // (a later change under light fan-out would have woken the writers): they
                // take over.
                self.pace.set_stream_swept(false);
                self.stream.appended.notify_waiters();
            }
            return None;
        }
        let generation = self.all_generation.load(Ordering::Acquire);
        if cache.generation != Some(generation) {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            cache.all = index.all().to_vec();
            cache.generation = Some(generation);
        }
        let window = self.pace.window();
        let round = Instant::now();
        let mut due = cache
            .all
            .iter()
            .filter(|c| !c.within_window(round, window))
            .peekable();
        while due.peek().is_some() {
            // The locks of one submission's connections at a time (see `crate::sweep`). A
            // connection's window runs from its send, not from the round's start: at
            // 1,000,000 frames/s that is ~8 % less server CPU and no more latency, at 200,000
            // ~0.4 ms more p50 (perf/README, session 12).
            let now = Instant::now();
            let writes: Vec<_> = due
                .by_ref()
                .filter_map(|c| c.sweep_begin(&self.stream, now, window))
                .take(crate::sweep::SUBMISSION_WRITES)
                .collect();
            let overflows = sender.send(writes, now);
            self.counters.overflow_closes.inc_by(overflows);
        }
        Some(window)
    }

    /// Answers `GET /api/ws`: upgrades and starts serving the connection. `Io` is the type
    /// the HTTP server wrapped the connection's socket in, and `into_tcp` takes the socket
    /// back out of it.
    pub fn upgrade<Io>(
        self: &Arc<Self>,
        mut request: hyper::Request<Incoming>,
        into_tcp: fn(Io) -> TcpStream,
    ) -> hyper::Response<Full<Bytes>>
    where
        Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if !fastwebsockets::upgrade::is_upgrade_request(&request) {
            return upgrade_required("expected a WebSocket upgrade request");
        }
        if let Some(refusal) = refuse_handshake(&request) {
            return refusal;
        }
        let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
            Ok(pair) => pair,
            Err(error) => {
                return plain_response(
                    hyper::StatusCode::BAD_REQUEST,
                    &format!("bad WebSocket upgrade: {error}"),
                );
            }
        };
        let hub = self.clone();
        self.runtime.get_or_init(tokio::runtime::Handle::current);
        tokio::spawn(async move {
            let Ok(websocket) = upgrade.await else { return };
            let upgraded = websocket.into_inner().into_inner();
            let Ok(parts) = upgraded.downcast::<Io>() else {
                tracing::error!("upgraded connection is not a TCP stream");
                return;
            };
            // Copy the (usually empty) early bytes and drop hyper's read buffer: holding it for
            // the connection's life would cost kilobytes per idle connection.
            let hyper::upgrade::Parts { io, read_buf, .. } = parts;
            let early = read_buf.to_vec();
            drop(read_buf);
            hub.serve(into_tcp(io), &early).await;
        });
        let (parts, _) = response.into_parts();
        hyper::Response::from_parts(parts, Full::new(Bytes::new()))
    }

    /// Serves one upgraded connection until it closes. `early` holds bytes the client sent
    /// right after its handshake.
    async fn serve(self: Arc<Self>, stream: TcpStream, early: &[u8]) {
        let _ = stream.set_nodelay(true);
        let (mut read, write) = stream.into_split();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection::new(id));
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, connection.clone());
        self.counters.connections_opened.inc();
        self.counters.connections.inc();
        let writer = {
            let (connection, hub) = (connection.clone(), self.clone());
            tokio::spawn(async move {
                let overflows = &hub.counters.overflow_closes;
                connection
                    .write_loop(write, &hub.pace, &hub.stream, overflows)
                    .await
            })
        };
        let mut reader = FrameReader::with_bytes(early);
        let mut patterns: Vec<Pattern> = Vec::new();
        // Reads until the client closes or breaks the protocol, or the writer ends reading
        // (`Connection::write_loop`: a client that does not answer a close frame, or is dead).
        loop {
            match reader.next(&mut read).await {
                Ok(Message::Text(text)) => self.on_text(&connection, &mut patterns, &text),
                Ok(Message::Binary(_)) => {
                    connection.push(&[error_frame(
                        "binary messages are not supported; send JSON text",
                    )]);
                }
                Ok(Message::Ping(payload)) => {
                    connection.push(&[frame::encode(frame::OPCODE_PONG, &payload)]);
                }
                Ok(Message::Pong) => {}
                Ok(Message::Close(code)) => {
                    // Echo the client's code, as the close handshake asks.
                    connection.close_from_reader(code.unwrap_or(frame::CLOSE_NORMAL), "");
                    break;
                }
                Err(ReadError::Protocol(reason)) => {
                    connection.close_from_reader(frame::CLOSE_PROTOCOL_ERROR, reason);
                    break;
                }
                Err(ReadError::TooBig) => {
                    let reason = format!("message larger than {} bytes", frame::MAX_MESSAGE_BYTES);
                    connection.close_from_reader(frame::CLOSE_TOO_BIG, &reason);
                    break;
                }
                Err(ReadError::NotUtf8) => {
                    connection
                        .close_from_reader(frame::CLOSE_INVALID_DATA, "text is not valid UTF-8");
                    break;
                }
                Err(ReadError::Closed) => {
                    connection.close_from_reader(frame::CLOSE_GOING_AWAY, "");
                    break;
                }
            }
            if connection.is_closing() {
                break; // Overflowed or shut down: stop reading.
            }
        }
        {
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            for pattern in &patterns {
                if index.remove(pattern, id) {
                    self.subscriptions.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if patterns.contains(&Pattern::All) {
                self.all_generation.fetch_add(1, Ordering::AcqRel);
                if index.all().is_empty() {
                    self.stream.release();
                }
            }
        }
        connection.reader_ended();
        let _ = writer.await;
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.counters.connections.dec();
    }

    fn on_text(
        self: &Arc<Self>,
        connection: &Arc<Connection>,
        patterns: &mut Vec<Pattern>,
        text: &[u8],
    ) {
        // Client messages are small and rare: a plain JSON value is simple and exact.
        let message: serde_json::Value = match serde_json::from_slice(text) {
            Ok(m) => m,
            Err(e) => {
                connection.push(&[error_frame(&format!("invalid JSON: {e}"))]);
                return;
            }
        };
        if !message.is_object() {
            connection.push(&[error_frame("message must be a JSON object")]);
            return;
        }
        let kind = match message.get("type") {
            None | Some(serde_json::Value::Null) => "",
            Some(serde_json::Value::String(kind)) => kind.as_str(),
            Some(_) => {
                connection.push(&[error_frame(
                    "type must be a string: subscribe or unsubscribe",
                )]);
                return;
            }
        };
        if kind != "subscribe" && kind != "unsubscribe" {
            let reason = if kind.is_empty() {
                "type is required: subscribe or unsubscribe".to_string()
            } else {
                format!("unknown message type {kind:?}: expected subscribe or unsubscribe")
            };
            connection.push(&[error_frame(&reason)]);
            return;
        }
        // One id, or several at once as an array (each as if sent alone).
        let ids: Vec<&str> = match message.get("entity_id") {
            Some(serde_json::Value::String(id)) if !id.is_empty() => vec![id.as_str()],
            Some(serde_json::Value::Array(items)) if !items.is_empty() => {
                let ids: Vec<&str> = items
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .filter(|id| !id.is_empty())
                    .collect();
                if ids.len() != items.len() {
                    connection.push(&[error_frame(
                        "entity_id: every item of the array must be a non-empty string",
                    )]);
                    return;
                }
                ids
            }
            _ => {
                connection.push(&[error_frame(
                    "entity_id is required: an id, a prefix ending in *, or * (or an array of them)",
                )]);
                return;
            }
        };
        // One error frame per message, however many of its ids fail.
        let mut refused = ids.iter().filter_map(|entity_id| {
            self.subscription(connection, patterns, kind == "subscribe", entity_id)
                .err()
        });
        if let Some(first) = refused.next() {
            let others = refused.count();
            let reason = match others {
                0 => first,
                _ => format!("{first} (and {others} more of the {} ids)", ids.len()),
            };
            connection.push(&[error_frame(&reason)]);
        }
    }

    /// Subscribes `connection` to `entity_id` (or unsubscribes it), or says why that cannot
    /// be done.
    fn subscription(
        self: &Arc<Self>,
        connection: &Arc<Connection>,
        patterns: &mut Vec<Pattern>,
        subscribe: bool,
        entity_id: &str,
    ) -> Result<(), String> {
        if subscribe {
            check_subscription(entity_id)?;
        }
        let pattern = Pattern::parse(entity_id);
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        if subscribe {
            if patterns.len() >= MAX_SUBSCRIPTIONS_PER_CONNECTION && !patterns.contains(&pattern) {
                return Err(format!(
                    "too many subscriptions (max {MAX_SUBSCRIPTIONS_PER_CONNECTION} per connection)"
                ));
            }
            if index.insert(&pattern, connection) {
                self.subscriptions.fetch_add(1, Ordering::AcqRel);
                if pattern == Pattern::All {
                    connection.start_stream(self.stream.end());
                    self.all_generation.fetch_add(1, Ordering::AcqRel);
                    self.start_sweeper();
                }
                patterns.push(pattern);
            }
        } else if index.remove(&pattern, connection.id) {
            self.subscriptions.fetch_sub(1, Ordering::AcqRel);
            if pattern == Pattern::All {
                self.all_generation.fetch_add(1, Ordering::AcqRel);
                if connection.stop_stream(&self.stream) == Push::Overflowed {
                    self.counters.overflow_closes.inc();
                }
                if index.all().is_empty() {
                    self.stream.release();
                }
            }
            patterns.retain(|p| *p != pattern);
        } else {
            return Err(format!("not subscribed to {entity_id:?}"));
        }
        Ok(())
    }

    /// Sets the writers' coalescing window from the frames delivered in each
    /// `PACE_INTERVAL` (100 ms), forever.
    pub async fn run_pace(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(PACE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rate = Rate::default();
        loop {
            ticker.tick().await;
            if let Some(frames_per_second) = rate.per_second(self.counters.frames_queued.get()) {
                self.pace.update(frames_per_second);
            }
        }
    }

    /// Sends `metrics_update` to every connection every [`METRICS_INTERVAL`], forever.
    pub async fn run_metrics(self: Arc<Self>, engine: Engine) {
        let mut ticker = tokio::time::interval(METRICS_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events_rate = Rate::default();
        loop {
            ticker.tick().await;
            let stats = engine.stats().await;
            let events_total = stats.events_total;
            let rate = events_rate.per_second(events_total).unwrap_or(0.0);
            let connections: Vec<Arc<Connection>> = self
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            let frame = text_frame(|out| {
                out.extend_from_slice(b"{\"type\":\"metrics_update\",\"timestamp\":");
                json::write_time_ms(out, flux_engine::engine::now_ms());
                out.extend_from_slice(b",\"entities\":{\"total\":");
                json::write_u64(out, stats.entities as u64);
                out.extend_from_slice(b"},\"events\":{\"total\":");
                json::write_u64(out, events_total);
                out.extend_from_slice(b",\"rate_per_second\":");
                json::write_f64(out, (rate * 10.0).round() / 10.0);
                out.extend_from_slice(b"},\"websocket\":{\"connections\":");
                json::write_u64(out, connections.len() as u64);
                out.extend_from_slice(b"},\"publishers\":{\"active\":");
                json::write_u64(out, stats.active_publishers as u64);
                out.extend_from_slice(b"}}");
            });
            for connection in connections {
                if connection.push(std::slice::from_ref(&frame)) == Push::Overflowed {
                    self.counters.overflow_closes.inc();
                }
            }
        }
    }

    /// Closes every connection with 1001 and waits (briefly) for the close frames to go out.
    pub async fn shutdown(&self) {
        let connections: Vec<Arc<Connection>> = self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for connection in &connections {
            connection.close(frame::CLOSE_GOING_AWAY, "server shutting down");
        }
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        while self.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The rate of a growing total, from one reading to the next.
#[derive(Default)]
struct Rate {
    previous: Option<(Instant, u64)>,
}

impl Rate {
    /// Units per second since the previous reading; `None` on the first.
    fn per_second(&mut self, total: u64) -> Option<f64> {
        let now = Instant::now();
        let rate = self.previous.and_then(|(at, before)| {
            let seconds = now.duration_since(at).as_secs_f64();
            (seconds > 0.0).then(|| total.saturating_sub(before) as f64 / seconds)
        });
        self.previous = Some((now, total));
        rate
    }
}

/// What RFC 6455 (§4.2.1) asks of an opening handshake beyond its upgrade headers, checked
/// before fastwebsockets answers it: HTTP/1.1, and version 13 (or a 426 naming it). A key
/// that does not decode to 16 bytes is let through: it changes nothing for the server, and
/// hand-written clients get it wrong.
fn refuse_handshake(request: &hyper::Request<Incoming>) -> Option<hyper::Response<Full<Bytes>>> {
    use hyper::header::SEC_WEBSOCKET_VERSION;
    if request.version() != hyper::Version::HTTP_11 {
        return Some(plain_response(
            hyper::StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs HTTP/1.1",
        ));
    }
    if request
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Some(upgrade_required("Sec-WebSocket-Version must be 13"));
    }
    None
}

/// 426 with the upgrade a client must ask for (RFC 9110 §15.5.22, RFC 6455 §4.2.2); a sender
/// of `Upgrade` also lists it in `Connection` (RFC 9110 §7.8).
fn upgrade_required(message: &str) -> hyper::Response<Full<Bytes>> {
    use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_VERSION, UPGRADE};
    let mut response = plain_response(hyper::StatusCode::UPGRADE_REQUIRED, message);
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    response
}

fn plain_response(status: hyper::StatusCode, message: &str) -> hyper::Response<Full<Bytes>> {
    let mut body = Vec::new();
    body.extend_from_slice(b"{\"error\":");
    json::write_str(&mut body, message);
    body.push(b'}');
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

impl ChangeObserver for Hub {
    fn entity_updated(&self, entity_id: &str, accept_time_ms: u64, properties: PropertyIter<'_>) {
        self.deliver(entity_id, || {
            let mut timestamp = Vec::with_capacity(26);
            json::write_time_ms(&mut timestamp, accept_time_ms);
            properties
                .map(|(name, value)| {
                    text_frame(|out| {
                        out.extend_from_slice(b"{\"type\":\"state_update\",\"entity_id\":");
                        json::write_str(out, entity_id);
                        out.extend_from_slice(b",\"property\":");
                        json::write_str(out, name);
                        out.extend_from_slice(b",\"value\":");
                        out.extend_from_slice(value.as_bytes());
                        out.extend_from_slice(b",\"timestamp\":");
                        out.extend_from_slice(&timestamp);
                        out.push(b'}');
                    })
                })
                .collect()
        });
    }

    fn entity_deleted(&self, entity_id: &str, accept_time_ms: u64) {
        self.deliver(entity_id, || {
            vec![text_frame(|out| {
                out.extend_from_slice(b"{\"type\":\"entity_deleted\",\"entity_id\":");
                json::write_str(out, entity_id);
                out.extend_from_slice(b",\"timestamp\":");
                json::write_time_ms(out, accept_time_ms);
                out.push(b'}');
            })]
        });
    }
}
