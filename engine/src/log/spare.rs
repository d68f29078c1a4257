//! Spare segments for the embedded log: zero-filled, synced files made ahead of need on a
//! background thread.
//!
//! Why: an append that grows a file makes `fdatasync` write the inode (its size) as well as the
//! data, a second synchronous write on this disk. A write into blocks that are already
//! allocated and written (zeros) leaves the size alone, so `fdatasync` flushes the data only:
//! 4 KiB write + `fdatasync` p50 ~100 µs instead of ~150 µs back to back here
//! (decision 0006). `fallocate` does not do it: its blocks are "unwritten" and the first write
//! into them changes metadata too.
//!
//! Invariants:
//! - At most one spare exists, `<dir>/spare.prep`. [`Spares::take`] hands it out only once
//!   every byte of it is written (zeros) and synced; the committer then renames it into place
//!   as a new segment. The thread never touches a segment.
//! - A spare left behind by a crash may be partial; [`Spares::start`] deletes it.
//! - Making a spare is work only a busy log asks for ([`Spares::request`]); it is written in
//!   small synced steps with pauses between, so the log's own syncs never queue behind
//!   megabytes of zeros.
//!   After a failure (a full disk) the next request is refused for [`RETRY_AFTER`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes of zeros written (and synced) per step: a sync of the log queued behind one waits
/// ~0.4 ms here.
const STEP_BYTES: usize = 128 << 10;
/// Pause between steps, so the disk mostly serves the log: 4 MiB take ~50 ms and 64 MiB
/// ~0.7 s, instead of ~0.15 s flat out.
const STEP_PAUSE: Duration = Duration::from_millis(1);
/// How long a failed spare keeps the next one from being tried.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The spare's file name inside the log directory (not a `.seg`, so never read as a segment).
const SPARE_NAME: &str = "spare.prep";

#[derive(Default)]
struct State {
    /// The committer wants a spare of this many bytes and none is ready.
    requested: Option<u64>,
    /// A complete spare of this many bytes is at the spare path.
    ready: Option<u64>,
    /// No spare is tried before this (after a failure).
    quiet_until: Option<Instant>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The background maker of spare segments.
pub struct Spares {
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Spares {
    /// Starts the thread that makes spares in `dir`, after deleting any spare a crash left
    /// there.
    pub fn start(dir: &Path) -> std::io::Result<Spares> {
        let path = dir.join(SPARE_NAME);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let thread = {
            let (shared, path) = (shared.clone(), path.clone());
            std::thread::Builder::new()
                .name("flux-log-spare".into())
                .spawn(move || run(&shared, &path))?
        };
        Ok(Spares {
            shared,
            path,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for a spare of `bytes` bytes unless one is ready or being made (or the last one
    /// failed recently).
    pub fn request(&self, bytes: u64) {
        let mut state = self.shared.lock();
        if state.ready.is_some() || state.requested.is_some() || state.stop {
            return;
        }
        if state
            .quiet_until
            .is_some_and(|until| Instant::now() < until)
        {
            return;
        }
        state.requested = Some(bytes);
        self.shared.changed.notify_one();
    }

    /// The path and size of a complete spare, now the caller's to rename; `None` if none is
    /// ready.
    pub fn take(&self) -> Option<(PathBuf, u64)> {
        let mut state = self.shared.lock();
        state.ready.take().map(|bytes| (self.path.clone(), bytes))
    }

    /// Stops the thread (abandoning a spare in the making) and waits for it.
    pub fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: waits for a request, makes a spare, repeats until stopped.
fn run(shared: &Shared, path: &Path) {
    loop {
        let bytes = {
            let mut state = shared.lock();
            loop {
                if state.stop {
                    return;
                }
                if let Some(bytes) = state.requested {
                    break bytes;
                }
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let made = make(shared, path, bytes);
        let mut state = shared.lock();
        state.requested = None;
        match made {
            Ok(true) => state.ready = Some(bytes),
            Ok(false) => {} // stopped midway
            Err(error) => {
                let _ = fs::remove_file(path);
                state.quiet_until = Some(Instant::now() + RETRY_AFTER);
                tracing::warn!(%error, "could not prepare a spare log segment; new segments grow as they are written");
            }
        }
    }
}

/// Writes `bytes` zeros to `path`, syncing each step; false if stopped before the end.
fn make(shared: &Shared, path: &Path, bytes: u64) -> std::io::Result<bool> {
    let mut file: File = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; STEP_BYTES];
    let mut written = 0u64;
    while written < bytes {
        if shared.lock().stop {
            drop(file);
            let _ = fs::remove_file(path);
            return Ok(false);
        }
        let step = (bytes - written).min(STEP_BYTES as u64) as usize;
        file.write_all(&zeros[..step])?;
        file.sync_data()?;
        written += step as u64;
        std::thread::sleep(STEP_PAUSE);
    }
    file.sync_all()?;
    Ok(true)
}
