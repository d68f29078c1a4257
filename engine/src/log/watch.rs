//! The watch over leader commits: a commit that blocks its tokio worker for long never leaves
//! the runtime without a thread polling its sockets.
//!
//! A leader commit ([`super::local`], decision 0005) writes and syncs on the HTTP worker that
//! appended, blocking that thread for as long as the disk takes: ~0.2 ms, or seconds when the
//! disk stalls (a frozen filesystem, a hung device). tokio lets one parked worker poll the
//! sockets while the others sleep on a condition variable; when the worker that woke for a
//! request is the one that blocks, nobody polls, and every connection (health, state reads,
//! WebSocket) waits for the disk. The watch sees a commit running longer than
//! [`STALL_AFTER`] and spawns an empty task on that runtime from outside it, which wakes a
//! sleeping worker; that worker then polls the sockets.
//!
//! Invariants: a commit costs the leader one clock read and two relaxed stores; the watch
//! thread wakes every [`CHECK_PERIOD`] and nudges once per stalled commit. It ends when the log
//! that owns it is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How often the watch looks.
pub const CHECK_PERIOD: Duration = Duration::from_millis(20);
/// A leader commit running this long wakes a sleeping worker of its runtime. A healthy sync
/// here takes 0.1–1 ms, a large group a few ms.
pub const STALL_AFTER: Duration = Duration::from_millis(20);

/// At most one warning about stalled commits per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the leaders tell the watch thread.
pub struct LeaderWatch {
    epoch: Instant,
    /// When the running leader commit started (µs after `epoch`, plus 1); 0 when none runs.
    started: AtomicU64,
    /// The runtime of the first leader on a multi-thread runtime: the one to wake.
    runtime: OnceLock<tokio::runtime::Handle>,
    /// Stalled commits that woke a worker.
    stalls: Counter,
}

impl LeaderWatch {
    /// A watch and its thread (`flux-log-watch`), counting stalled commits in `stalls`.
    pub fn start(stalls: Counter) -> std::io::Result<Arc<LeaderWatch>> {
        let watch = Arc::new(LeaderWatch {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            runtime: OnceLock::new(),
            stalls,
        });
        let weak = Arc::downgrade(&watch);
        std::thread::Builder::new()
            .name("flux-log-watch".into())
            .spawn(move || run(weak))?;
        Ok(watch)
    }

    /// A leader commit starts on this thread.
    pub fn begin(&self) {
        if self.runtime.get().is_none()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            let _ = self.runtime.set(handle);
        }
        self.started.store(self.micros() + 1, Ordering::Relaxed);
    }

    /// The leader commit is done.
    pub fn end(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

fn run(watch: Weak<LeaderWatch>) {
    // The commit already nudged for (its `started`), and when the last warning went out.
    let mut nudged = 0;
    let mut warned: Option<Instant> = None;
    loop {
        std::thread::sleep(CHECK_PERIOD);
        let Some(watch) = watch.upgrade() else {
            return;
        };
        let started = watch.started.load(Ordering::Relaxed);
        let stalled = started != 0
            && started != nudged
            && watch.micros() + 1 >= started + STALL_AFTER.as_micros() as u64;
        if stalled && let Some(runtime) = watch.runtime.get() {
            nudged = started;
            // Spawned from outside the runtime, the task wakes a sleeping worker; once it
            // has run, that worker parks polling the sockets.
            drop(runtime.spawn(async {}));
            watch.stalls.inc();
            if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
                continue;
            }
            warned = Some(Instant::now());
            tracing::warn!(
                "a log commit has blocked its HTTP worker for {STALL_AFTER:?}: the disk is slow \
                 or stalled; other requests go on being served"
            );
        }
    }
}
