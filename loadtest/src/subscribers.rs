//! WebSocket subscribers at scale: a [`LocalPool`] of subscriber tasks on this process's own
//! threads, or several child processes (`flux-loadtest fanout-worker`) each running one, behind
//! one [`SubscriberGroup`].
//!
//! Per frame a subscriber does one byte search for `"sent_ns"` and reads the digits of the
//! value that follows, and a prefix check for `state_update`; nothing is parsed as JSON. It
//! reads the clock once per socket read, not per frame. Counters live in one [`Slot`] per
//! subscriber, written only by that subscriber's task and read by the coordinator; latency
//! histograms are per thread (no locks).
//!
//! Two counts per subscriber: *events* (frames carrying `sent_ns`, one per published event:
//! latency and loss are per event) and *frames* (every `state_update` frame, one per property
//! of each event: what the server delivers). A frame without `sent_ns` belongs to the measured
//! window when the last `sent_ns` frame before it on the same socket did: the server sends a
//! change's frames together in the event's property order, and `sent_ns` is written first.
//!
//! Worker protocol (lines): parent → worker stdin `measure <unix_ns>`, `finish <expected>
//! <drain_ms>`; worker → parent stdout `connected <ok> <failed>`, `synced`, `received <n>`
//! (once a second), `result <json>` (last line). A worker whose stdin closes finishes at once;
//! one whose stdout is closed (the parent is gone) ends without a word.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cli::WorkerArgs;
use crate::http::Target;
use crate::payload::unix_ns;
use crate::report::{Buckets, latency_json, new_histogram, record, round_significant6};
use crate::ws::{ReadState, WsClient};

/// Concurrent connection attempts per subscriber thread.
const CONNECTS_IN_FLIGHT_PER_THREAD: usize = 64;
/// Read buffer of a subscriber that expects traffic, and of an idle one.
const ACTIVE_BUFFER_BYTES: usize = 16 << 10;
const IDLE_BUFFER_BYTES: usize = 1 << 10;

/// Subscriber states, in the order they are reached.
const CONNECTING: u8 = 0;
const SUBSCRIBED: u8 = 1;
const SYNCED: u8 = 2;
const CONNECT_FAILED: u8 = 3;
const CLOSED_BY_SERVER: u8 = 4;
const CLOSED_ON_PURPOSE: u8 = 5;

static SENT_NS_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"sent_ns\""));
static VALUE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"value\":"));
static SYNC_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"sync_probe\""));
static STATE_UPDATE_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"type\":\"state_update\""));
/// How Flux opens every `state_update` frame: checked first, so the usual frame costs no search.
const STATE_UPDATE_PREFIX: &[u8] = b"{\"type\":\"state_update\"";

/// Whether `message` is a `state_update` frame (any key order; Flux's own by its prefix).
pub fn is_state_update(message: &[u8]) -> bool {
    message.starts_with(STATE_UPDATE_PREFIX)
        || (!message.starts_with(b"{\"type\":") && STATE_UPDATE_KEY.find(message).is_some())
}

/// The `sent_ns` value of a `state_update` frame for that property, found by byte search:
/// `(sent, due)` from `[sent, due]`, or `(n, n)` from a plain number.
pub fn find_stamps(message: &[u8]) -> Option<(u64, u64)> {
    let at = SENT_NS_KEY.find(message)?;
    let after = &message[at..];
    let value = match VALUE_KEY.find(after) {
        Some(v) => &after[v + 8..],
        None => &message[VALUE_KEY.find(message)? + 8..],
    };
    let Some(pair) = value.strip_prefix(b"[") else {
        let (n, _) = leading_u64(value)?;
        return Some((n, n));
    };
    let (sent, used) = leading_u64(pair)?;
    let (due, _) = leading_u64(pair[used..].strip_prefix(b",")?)?;
    Some((sent, due))
}

/// The decimal number at the start of `bytes`, and how many bytes it took.
fn leading_u64(bytes: &[u8]) -> Option<(u64, usize)> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let n = bytes[..digits].iter().try_fold(0u64, |n, &b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })?;
    Some((n, digits))
}

/// Delivery latency histograms of one subscriber thread (or a whole pool), µs.
#[derive(Clone)]
pub struct Latencies {
    /// From when each event was sent.
    pub from_send: Histogram<u64>,
    /// From when each event was due on the publisher's schedule: a publisher held back by a
    /// stalled server shows here (coordinated omission), not in `from_send`.
    pub from_due: Histogram<u64>,
}

impl Latencies {
    fn new() -> Latencies {
        Latencies {
            from_send: new_histogram(),
            from_due: new_histogram(),
        }
    }

    fn add(&mut self, other: &Latencies) {
        let _ = self.from_send.add(&other.from_send);
        let _ = self.from_due.add(&other.from_due);
    }
}

/// One subscriber's counters; written by its own task only.
#[derive(Default)]
struct Slot {
    /// `sent_ns` frames: events received.
    received: AtomicU64,
    received_measured: AtomicU64,
    /// Every `state_update` frame of the measured window (one per property of each event).
    frames_measured: AtomicU64,
    max_latency_us: AtomicU64,
    state: AtomicU8,
}

/// What a pool's threads share with the coordinator.
pub struct Control {
    slots: Box<[Slot]>,
    /// Frames sent at or after this Unix time count toward latency; `u64::MAX` until set.
    measure_from_ns: AtomicU64,
    stop: AtomicBool,
    close_codes: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub target: Target,
    pub subscribers: usize,
    pub pattern: String,
    pub threads: usize,
    /// No traffic expected: no sync, small buffers.
    pub idle: bool,
    /// Subscriber 0 closes its socket after this many frames.
    pub drop_subscriber_after: Option<u64>,
}

fn local_status(control: &Control) -> Status {
    let mut status = Status {
        synced: true,
        ..Status::default()
    };
    for slot in control.slots.iter() {
        status.received += slot.received.load(Ordering::Relaxed);
        match slot.state.load(Ordering::Relaxed) {
            CONNECTING => {
                status.pending += 1;
                status.synced = false;
            }
            SUBSCRIBED => {
                status.connected += 1;
                status.synced = false;
            }
            CONNECT_FAILED => status.failed += 1,
            CLOSED_BY_SERVER | CLOSED_ON_PURPOSE => {
                status.connected += 1;
                status.closed += 1;
            }
            _ => status.connected += 1,
        }
    }
    status
}

fn workers_status(reports: &[(Arc<WorkerReport>, u64)]) -> Status {
    let mut status = Status {
        synced: true,
        ..Status::default()
    };
    for (report, subscribers) in reports {
        status.received += report.received.load(Ordering::Relaxed);
        status.synced &= report.synced.load(Ordering::Relaxed);
        if report.reported_connected.load(Ordering::Relaxed) {
            status.connected += report.connected.load(Ordering::Relaxed);
            status.failed += report.failed.load(Ordering::Relaxed);
        } else {
            status.pending += subscribers;
        }
    }
    status
}

/// Reads a group's status from another thread (the progress line).
pub enum StatusSource {
    Local(Arc<Control>),
    Processes(Vec<(Arc<WorkerReport>, u64)>),
}

impl StatusSource {
    pub fn status(&self) -> Status {
        match self {
            StatusSource::Local(control) => local_status(control),
            StatusSource::Processes(reports) => workers_status(reports),
        }
    }
}

/// Subscribers on this process's threads, each thread a single-threaded runtime.
pub struct LocalPool {
    control: Arc<Control>,
    threads: Vec<JoinHandle<Latencies>>,
}

/// A snapshot of a group's subscribers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Status {
    pub connected: u64,
    pub failed: u64,
    /// Still connecting (or, for a worker, not reported yet).
    pub pending: u64,
    /// Every connected subscriber has seen a sync probe.
    pub synced: bool,
    /// Closed by the server (or on purpose) after connecting; local pools only.
    pub closed: u64,
    /// Frames carrying `sent_ns`, all subscribers.
    pub received: u64,
}

impl LocalPool {
    pub fn start(config: PoolConfig) -> anyhow::Result<LocalPool> {
        let control = Arc::new(Control {
            slots: (0..config.subscribers).map(|_| Slot::default()).collect(),
            measure_from_ns: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            close_codes: Mutex::new(BTreeMap::new()),
        });
        let threads = config.threads.clamp(1, config.subscribers.max(1));
        let config = Arc::new(config);
        let mut handles = Vec::with_capacity(threads);
        for thread in 0..threads {
            let indexes: Vec<usize> = (thread..config.subscribers).step_by(threads).collect();
            let (control, config) = (control.clone(), config.clone());
            let handle = std::thread::Builder::new()
                .name(format!("subscribers-{thread}"))
                .spawn(move || run_thread(indexes, control, config))
                .context("spawning a subscriber thread")?;
            handles.push(handle);
        }
        Ok(LocalPool {
            control,
            threads: handles,
        })
    }

    pub fn status(&self) -> Status {
        local_status(&self.control)
    }

    pub fn set_measure_from(&self, unix_ns: u64) {
        self.control
            .measure_from_ns
            .store(unix_ns, Ordering::Relaxed);
    }

    /// Waits until every subscriber has `expected` frames (or is gone), at most `drain`, then
    /// stops the threads and sums up.
    pub fn finish(self, expected: u64, drain: Duration) -> PoolResult {
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline {
            let done = self.control.slots.iter().all(|slot| {
                slot.state.load(Ordering::Relaxed) > SYNCED
                    || slot.received.load(Ordering::Relaxed) >= expected
            });
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.control.stop.store(true, Ordering::Relaxed);
        let mut latency = Latencies::new();
        for thread in self.threads {
            if let Ok(histograms) = thread.join() {
                latency.add(&histograms);
            }
        }
        let mut result = PoolResult {
            subscribers: self.control.slots.len() as u64,
            expected_per_subscriber: expected,
            min_received: u64::MAX,
            latency: Buckets::from_histogram(&latency.from_send),
            latency_from_due: Buckets::from_histogram(&latency.from_due),
            close_codes: self
                .control
                .close_codes
                .lock()
                .map(|codes| codes.clone())
                .unwrap_or_default(),
            ..PoolResult::default()
        };
        let mut worst_lag = new_histogram();
        for slot in self.control.slots.iter() {
            let received = slot.received.load(Ordering::Relaxed);
            match slot.state.load(Ordering::Relaxed) {
                CONNECT_FAILED => {
                    result.connect_failed += 1;
                    continue;
                }
                CLOSED_BY_SERVER => result.closed_by_server += 1,
                CLOSED_ON_PURPOSE => result.closed_on_purpose += 1,
                _ => {}
            }
            result.connected += 1;
            result.received += received;
            result.received_measured += slot.received_measured.load(Ordering::Relaxed);
            result.frames_measured += slot.frames_measured.load(Ordering::Relaxed);
            result.lost += expected.saturating_sub(received);
            result.extra += received.saturating_sub(expected);
            result.subscribers_with_loss += u64::from(received < expected);
            result.min_received = result.min_received.min(received);
            result.max_received = result.max_received.max(received);
            let lag = slot.max_latency_us.load(Ordering::Relaxed);
            if lag > 0 {
                record(&mut worst_lag, lag);
            }
        }
        if result.connected == 0 {
            result.min_received = 0;
        }
        result.worst_lag = Buckets::from_histogram(&worst_lag);
        result
    }
}

fn run_thread(indexes: Vec<usize>, control: Arc<Control>, config: Arc<PoolConfig>) -> Latencies {
    let histogram = Rc::new(RefCell::new(Latencies::new()));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flux-loadtest: subscriber runtime: {error}");
            for &index in &indexes {
                control.slots[index]
                    .state
                    .store(CONNECT_FAILED, Ordering::Relaxed);
            }
            return Latencies::new();
        }
    };
    let local = tokio::task::LocalSet::new();
    let connects = Rc::new(tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT_PER_THREAD));
    for index in indexes {
        local.spawn_local(subscriber(
            index,
            control.clone(),
            config.clone(),
            histogram.clone(),
            connects.clone(),
        ));
    }
    local.block_on(&runtime, async {
        while !control.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    drop(local);
    drop(runtime);
    Rc::try_unwrap(histogram)
        .map(RefCell::into_inner)
        .unwrap_or_else(|shared| shared.borrow().clone())
}

async fn subscriber(
    index: usize,
    control: Arc<Control>,
    config: Arc<PoolConfig>,
    histogram: Rc<RefCell<Latencies>>,
    connects: Rc<tokio::sync::Semaphore>,
) {
    let slot = &control.slots[index];
    let buffer_bytes = if config.idle {
        IDLE_BUFFER_BYTES
    } else {
        ACTIVE_BUFFER_BYTES
    };
    let connected = async {
        let _permit = connects.acquire().await;
        let mut client = WsClient::connect(&config.target, buffer_bytes).await?;
        client.subscribe(&config.pattern).await?;
        std::io::Result::Ok(client)
    };
    let mut client = match connected.await {
        Ok(client) => client,
        Err(error) => {
            if index == 0 {
                eprintln!("flux-loadtest: subscriber connect failed: {error}");
            }
            slot.state.store(CONNECT_FAILED, Ordering::Relaxed);
            return;
        }
    };
    slot.state.store(SUBSCRIBED, Ordering::Relaxed);
    let drop_after = if index == 0 {
        config.drop_subscriber_after
    } else {
        None
    };
    let mut synced = config.idle;
    let (mut received, mut measured, mut worst) = (0u64, 0u64, 0u64);
    let mut frames_measured = 0u64;
    // Whether the last `sent_ns` frame was due in the measured window: the frames of its
    // other properties, which follow it, count (or not) with it.
    let mut in_window = false;
    loop {
        let mut now_ns = 0u64;
        let state = client
            .read_messages(|message| {
                if let Some((sent_ns, due_ns)) = find_stamps(message) {
                    received += 1;
                    // Read once frames are here: a read that began before the measured window
                    // opened must still count the frames due inside it.
                    in_window = due_ns >= control.measure_from_ns.load(Ordering::Relaxed);
                    if in_window {
                        measured += 1;
                        frames_measured += 1;
                        if now_ns == 0 {
                            now_ns = unix_ns();
                        }
                        let micros = now_ns.saturating_sub(sent_ns) / 1000;
                        worst = worst.max(micros);
                        let mut histograms = histogram.borrow_mut();
                        record(&mut histograms.from_send, micros);
                        record(
                            &mut histograms.from_due,
                            now_ns.saturating_sub(due_ns) / 1000,
                        );
                    }
                } else {
                    if in_window && is_state_update(message) {
                        frames_measured += 1;
                    }
                    if !synced && SYNC_KEY.find(message).is_some() {
                        synced = true;
                    }
                }
            })
            .await;
        slot.received.store(received, Ordering::Relaxed);
        slot.received_measured.store(measured, Ordering::Relaxed);
        slot.frames_measured
            .store(frames_measured, Ordering::Relaxed);
        slot.max_latency_us.store(worst, Ordering::Relaxed);
        if synced && slot.state.load(Ordering::Relaxed) == SUBSCRIBED && !config.idle {
            slot.state.store(SYNCED, Ordering::Relaxed);
        }
        let code = match state {
            Ok(ReadState::Open) => {
                if drop_after.is_some_and(|n| received >= n) {
                    slot.state.store(CLOSED_ON_PURPOSE, Ordering::Relaxed);
                    return;
                }
                continue;
            }
            Ok(ReadState::Closed(Some(code))) => code.to_string(),
            Ok(ReadState::Closed(None)) => "eof".to_string(),
            Err(_) => "error".to_string(),
        };
        slot.state.store(CLOSED_BY_SERVER, Ordering::Relaxed);
        if let Ok(mut codes) = control.close_codes.lock() {
            *codes.entry(code).or_default() += 1;
        }
        return;
    }
}

/// A pool's (or several pools') outcome.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PoolResult {
    pub subscribers: u64,
    pub connected: u64,
    pub connect_failed: u64,
    pub closed_by_server: u64,
    pub closed_on_purpose: u64,
    pub expected_per_subscriber: u64,
    /// `sent_ns` frames received by connected subscribers.
    pub received: u64,
    /// Of those, frames sent inside the measured window.
    pub received_measured: u64,
    /// Every `state_update` frame of the measured window, one per property of each event
    /// (`delivered_frames`).
    #[serde(default)]
    pub frames_measured: u64,
    pub lost: u64,
    /// Frames beyond the expected count (events applied whose acknowledgement was lost).
    pub extra: u64,
    pub subscribers_with_loss: u64,
    pub min_received: u64,
    pub max_received: u64,
    /// Delivery latency of every measured frame from its send, µs.
    pub latency: Buckets,
    /// The same from when each frame's event was due (coordinated omission counted).
    #[serde(default)]
    pub latency_from_due: Buckets,
    /// Each subscriber's largest delivery latency, µs.
    pub worst_lag: Buckets,
    /// Why subscribers closed: close code, `eof` or `error`.
    pub close_codes: BTreeMap<String, u64>,
}

impl PoolResult {
    fn merge(&mut self, other: PoolResult) {
        self.subscribers += other.subscribers;
        self.connected += other.connected;
        self.connect_failed += other.connect_failed;
        self.closed_by_server += other.closed_by_server;
        self.closed_on_purpose += other.closed_on_purpose;
        self.expected_per_subscriber = other.expected_per_subscriber;
        self.received += other.received;
        self.received_measured += other.received_measured;
        self.frames_measured += other.frames_measured;
        self.lost += other.lost;
        self.extra += other.extra;
        self.subscribers_with_loss += other.subscribers_with_loss;
        if other.connected > 0 {
            self.min_received = self.min_received.min(other.min_received);
        }
        self.max_received = self.max_received.max(other.max_received);
        self.latency.0.extend(other.latency.0);
        self.latency_from_due.0.extend(other.latency_from_due.0);
        self.worst_lag.0.extend(other.worst_lag.0);
        for (code, n) in other.close_codes {
            *self.close_codes.entry(code).or_default() += n;
        }
    }

    /// What is known of a worker process that died without its result: how many of its
    /// subscribers connected and the frames they had received by its last report. Every
    /// connected one counts as closed (`worker_exited`) with the rest of its frames lost; its
    /// latencies are unknown and left out.
    fn of_lost_worker(subscribers: u64, report: &WorkerReport, expected: u64) -> PoolResult {
        let connected = report.connected.load(Ordering::Relaxed);
        let received = report.received.load(Ordering::Relaxed);
        let lost = (expected * connected).saturating_sub(received);
        PoolResult {
            subscribers,
            connected,
            connect_failed: report.failed.load(Ordering::Relaxed),
            expected_per_subscriber: expected,
            received,
            lost,
            extra: received.saturating_sub(expected * connected),
            subscribers_with_loss: if lost > 0 { connected } else { 0 },
            close_codes: BTreeMap::from([("worker_exited".to_string(), connected)]),
            ..PoolResult::default()
        }
    }

    /// Delivery latency from send (`from_due` false) or from the due time, µs.
    pub fn latency_histogram(&self, from_due: bool) -> Histogram<u64> {
        let mut histogram = new_histogram();
        let buckets = if from_due {
            &self.latency_from_due
        } else {
            &self.latency
        };
        buckets.add_to(&mut histogram);
        histogram
    }

    /// The `"loss"` object of a result.
    pub fn loss_json(&self) -> Value {
        let expected = self.expected_per_subscriber * self.connected;
        json!({
            "expected": expected,
            "received": self.received,
            "lost": self.lost,
            "extra": self.extra,
            "loss_ratio": if expected > 0 {
                round_significant6(self.lost as f64 / expected as f64)
            } else {
                0.0
            },
            "expected_per_subscriber": self.expected_per_subscriber,
            "subscribers_with_loss": self.subscribers_with_loss,
            "min_received_per_subscriber": self.min_received,
            "max_received_per_subscriber": self.max_received,
        })
    }

    /// The `"subscribers"` object of a result.
    pub fn subscribers_json(&self) -> Value {
        let mut worst = new_histogram();
        self.worst_lag.add_to(&mut worst);
        json!({
            "requested": self.subscribers,
            "connected": self.connected,
            "connect_failed": self.connect_failed,
            "closed_by_server": self.closed_by_server,
            "closed_on_purpose": self.closed_on_purpose,
            "close_codes": self.close_codes,
            "worst_lag_us": latency_json(&worst),
        })
    }
}

/// What a worker process has reported so far.
#[derive(Default)]
pub struct WorkerReport {
    connected: AtomicU64,
    failed: AtomicU64,
    reported_connected: AtomicBool,
    synced: AtomicBool,
    received: AtomicU64,
    result: Mutex<Option<PoolResult>>,
}

/// A child `flux-loadtest fanout-worker` and the thread reading its stdout.
pub struct WorkerProcess {
    child: Child,
    stdin: ChildStdin,
    subscribers: u64,
    report: Arc<WorkerReport>,
    reader: JoinHandle<()>,
}

/// Subscribers in this process or spread over child processes.
pub enum SubscriberGroup {
    Local(LocalPool),
    Processes(Vec<WorkerProcess>),
}

impl SubscriberGroup {
    /// Starts `config.subscribers` subscribers, in `per_process` chunks over child processes
    /// when there are more than that (or than one process's open-files limit allows).
    pub fn start(config: PoolConfig, per_process: usize) -> anyhow::Result<SubscriberGroup> {
        let per_process = per_process.min(crate::system::open_files_budget()).max(1);
        if config.subscribers <= per_process {
            return Ok(SubscriberGroup::Local(LocalPool::start(config)?));
        }
        let executable = std::env::current_exe().context("locating flux-loadtest")?;
        let processes = config.subscribers.div_ceil(per_process.max(1));
        let mut workers = Vec::with_capacity(processes);
        for k in 0..processes {
            let share =
                config.subscribers / processes + usize::from(k < config.subscribers % processes);
            let mut command = Command::new(&executable);
            command
                .arg("fanout-worker")
                .args(["--url", &config.target.url()])
                .args(["--subscribers", &share.to_string()])
                .args(["--pattern", &config.pattern])
                .args(["--threads", &config.threads.to_string()]);
            if let Some(ca_cert) = &config.target.ca_cert {
                command.arg("--ca-cert").arg(ca_cert);
            }
            if config.idle {
                command.arg("--idle");
            }
            if let (0, Some(n)) = (k, config.drop_subscriber_after) {
                command.args(["--drop-subscriber-after", &n.to_string()]);
            }
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a fanout worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let report = Arc::new(WorkerReport::default());
            let reader = {
                let report = report.clone();
                std::thread::spawn(move || read_worker_lines(stdout, &report))
            };
            workers.push(WorkerProcess {
                child,
                stdin,
                subscribers: share as u64,
                report,
                reader,
            });
        }
        Ok(SubscriberGroup::Processes(workers))
    }

    pub fn processes(&self) -> usize {
        match self {
            SubscriberGroup::Local(_) => 1,
            SubscriberGroup::Processes(workers) => workers.len(),
        }
    }

    pub fn status(&self) -> Status {
        self.status_source().status()
    }

    pub fn status_source(&self) -> StatusSource {
        match self {
            SubscriberGroup::Local(pool) => StatusSource::Local(pool.control.clone()),
            SubscriberGroup::Processes(workers) => StatusSource::Processes(
                workers
                    .iter()
                    .map(|w| (w.report.clone(), w.subscribers))
                    .collect(),
            ),
        }
    }

    pub fn set_measure_from(&mut self, unix_ns: u64) {
        match self {
            SubscriberGroup::Local(pool) => pool.set_measure_from(unix_ns),
            SubscriberGroup::Processes(workers) => {
                for worker in workers {
                    let _ = writeln!(worker.stdin, "measure {unix_ns}");
                    let _ = worker.stdin.flush();
                }
            }
        }
    }

    /// Waits for the last frames (at most `drain`), stops every subscriber and sums up.
    pub fn finish(self, expected: u64, drain: Duration) -> anyhow::Result<PoolResult> {
        let workers = match self {
            SubscriberGroup::Local(pool) => return Ok(pool.finish(expected, drain)),
            SubscriberGroup::Processes(workers) => workers,
        };
        let mut total = PoolResult {
            min_received: u64::MAX,
            ..PoolResult::default()
        };
        let mut waiting = Vec::with_capacity(workers.len());
        for mut worker in workers {
            let _ = writeln!(worker.stdin, "finish {expected} {}", drain.as_millis());
            let _ = worker.stdin.flush();
            waiting.push(worker);
        }
        for worker in waiting {
            let WorkerProcess {
                mut child,
                stdin,
                subscribers,
                report,
                reader,
            } = worker;
            drop(stdin);
            let _ = reader.join();
            let status = child.wait().context("waiting for a fanout worker")?;
            let result = report.result.lock().ok().and_then(|mut r| r.take());
            match result {
                Some(result) => total.merge(result),
                None => {
                    eprintln!(
                        "flux-loadtest: a fanout worker exited without a result ({status}); its \
                         {subscribers} subscribers count as lost from their last report on"
                    );
                    total.merge(PoolResult::of_lost_worker(subscribers, &report, expected));
                }
            }
        }
        if total.connected == 0 {
            total.min_received = 0;
        }
        total.expected_per_subscriber = expected;
        Ok(total)
    }

    /// Waits until no subscriber is still connecting; `Err` after `timeout`.
    pub fn wait_connected(&self, timeout: Duration) -> anyhow::Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if status.pending == 0 {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "subscribers still connecting after {timeout:?}: {} connected, {} failed, {} pending",
                    status.connected,
                    status.failed,
                    status.pending
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn read_worker_lines(stdout: std::process::ChildStdout, report: &WorkerReport) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("connected"), Some(ok), Some(failed)) => {
                report
                    .connected
                    .store(ok.parse().unwrap_or(0), Ordering::Relaxed);
                report
                    .failed
                    .store(failed.parse().unwrap_or(0), Ordering::Relaxed);
                report.reported_connected.store(true, Ordering::Relaxed);
            }
            (Some("synced"), _, _) => report.synced.store(true, Ordering::Relaxed),
            (Some("received"), Some(n), _) => report
                .received
                .store(n.parse().unwrap_or(0), Ordering::Relaxed),
            (Some("result"), Some(_), _) => {
                let json = &line["result ".len()..];
                match serde_json::from_str::<PoolResult>(json) {
                    Ok(result) => {
                        if let Ok(mut slot) = report.result.lock() {
                            *slot = Some(result);
                        }
                    }
                    Err(error) => eprintln!("flux-loadtest: bad worker result: {error}"),
                }
            }
            _ => eprintln!("flux-loadtest: unexpected worker line: {line}"),
        }
    }
}

/// The hidden `fanout-worker` subcommand: one pool, driven by the parent over stdin/stdout.
/// A parent gone (its end of stdout closed) ends the worker quietly: it has no one to report to.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    match serve_parent(args) {
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        outcome => outcome,
    }
}

fn serve_parent(args: WorkerArgs) -> anyhow::Result<()> {
    let target = Target::parse_with(&args.url, args.ca_cert.as_deref())?;
    let pool = LocalPool::start(PoolConfig {
        target,
        subscribers: args.subscribers,
        pattern: args.pattern,
        threads: args.threads,
        idle: args.idle,
        drop_subscriber_after: args.drop_subscriber_after,
    })?;
    let (commands, incoming) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if commands.send(line).is_err() {
                return;
            }
        }
        let _ = commands.send("finish 0 0".to_string());
    });
    let mut stdout = std::io::stdout();
    let (mut said_connected, mut said_synced) = (false, false);
    let mut next_progress = Instant::now() + Duration::from_secs(1);
    loop {
        let status = pool.status();
        if !said_connected && status.pending == 0 {
            writeln!(stdout, "connected {} {}", status.connected, status.failed)?;
            said_connected = true;
        }
        if said_connected && !said_synced && status.synced && !args.idle {
            writeln!(stdout, "synced")?;
            said_synced = true;
        }
        if Instant::now() >= next_progress {
            writeln!(stdout, "received {}", status.received)?;
            next_progress += Duration::from_secs(1);
        }
        stdout.flush()?;
        match incoming.recv_timeout(Duration::from_millis(10)) {
            Ok(line) => {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("measure") => {
                        if let Some(ns) = words.next().and_then(|w| w.parse().ok()) {
                            pool.set_measure_from(ns);
                        }
                    }
                    Some("finish") => {
                        let expected = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                        let drain_ms = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                        let result = pool.finish(expected, Duration::from_millis(drain_ms));
                        writeln!(stdout, "result {}", serde_json::to_string(&result)?)?;
                        stdout.flush()?;
                        return Ok(());
                    }
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let result = pool.finish(0, Duration::ZERO);
                writeln!(stdout, "result {}", serde_json::to_string(&result)?)?;
                stdout.flush()?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_send_time() {
        let frame = br#"{"type":"state_update","entity_id":"loadtest/e2e-1","property":"sent_ns","value":1732000000123456789,"timestamp":"2026-02-23T10:30:45.123Z"}"#;
        assert_eq!(
            find_stamps(frame),
            Some((1_732_000_000_123_456_789, 1_732_000_000_123_456_789))
        );
        let reordered = br#"{"value":42,"property":"sent_ns"}"#;
        assert_eq!(find_stamps(reordered), Some((42, 42)));
        let other = br#"{"type":"state_update","entity_id":"x/y","property":"p1","value":7}"#;
        assert_eq!(find_stamps(other), None);
        let metrics = br#"{"type":"metrics_update","timestamp":1,"events":{"total":5}}"#;
        assert_eq!(find_stamps(metrics), None);
        let pair = br#"{"type":"state_update","entity_id":"loadtest/e2e-1","property":"sent_ns","value":[1732000000123456789,1732000000003456789],"timestamp":"2026-02-23T10:30:45.123Z"}"#;
        assert_eq!(
            find_stamps(pair),
            Some((1_732_000_000_123_456_789, 1_732_000_000_003_456_789))
        );
        assert_eq!(find_stamps(br#"{"property":"sent_ns","value":[1,]}"#), None);
    }

    #[test]
    fn tells_state_updates_from_other_frames() {
        let flux = br#"{"type":"state_update","entity_id":"loadtest/e2e-1","property":"p1","value":7,"timestamp":"2026-02-23T10:30:45.123Z"}"#;
        assert!(is_state_update(flux));
        assert!(is_state_update(
            br#"{"entity_id":"x/y","type":"state_update","property":"p1","value":7}"#
        ));
        for other in [
            &br#"{"type":"metrics_update","timestamp":1,"events":{"total":5}}"#[..],
            br#"{"type":"entity_deleted","entity_id":"x/y","timestamp":"t"}"#,
            br#"{"type":"error","message":"bad"}"#,
        ] {
            assert!(!is_state_update(other));
        }
    }
}
