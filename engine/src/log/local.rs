//! The embedded log: append-only segment files in `<data-dir>/log/`, written by one thread.
//!
//! Layout: `<first_position:020>.seg` files, each a sequence of frames (see [`crate::record`]),
//! positions dense and increasing across files. Invariants:
//! - One committer at a time owns the active segment: whoever holds the writer lock. It takes
//!   the queued appends in arrival order (up to a group's byte limit), writes them with one
//!   `write`, covers them with one `fdatasync` (group commit), and only then dispatches the
//!   frames to the shards, in position order, before it lets the lock go.
//! - The committer is, when the lock is free, the task that just queued a small append (a
//!   leader: it commits one group of at most [`IN_PLACE_MAX_RECORDS`] records on its own
//!   thread, so an append on an idle log wakes no other thread); otherwise the writer thread,
//!   which a leader kicks when it leaves work queued and which also runs every barrier.
//!   Whoever queues work and finds the lock taken leaves it to the holder, who looks at the
//!   queue again after letting the lock go: nothing is stranded. A leader's commit that
//!   stalls (a frozen disk) wakes another worker of its runtime ([`super::watch`]), so the
//!   other connections are still served.
//! - A new segment that cannot start is undone (the active segment goes on, every commit tries
//!   again); only a new file that cannot be removed again stops the log.
//! - A small group (at most [`IN_PLACE_MAX_RECORDS`] records) is applied in place by the
//!   committer where a shard is idle ([`Dispatcher::dispatch_in_place`]); larger ones go
//!   through the shards' inboxes, so shards apply them while the next group is written.
//! - A failed write is cut back off the file and its appends fail as *unavailable*; the next
//!   commit is tried as usual, and until one succeeds health reports the failure. A failed
//!   `fdatasync` leaves the file in an unknown state, so the log refuses every later write.
//! - On open, every frame is checked (length, CRC32C, position continuity). The first bad or
//!   partial frame of the newest segment ends the log: it and everything after it are cut (a
//!   torn group commit can leave later frames of the same unsynced write looking intact), the
//!   cut bytes (without trailing zeros) are kept beside the segment in
//!   `<segment>.torn-<offset>` for inspection until retention drops the segment, and the
//!   number of bytes dropped is logged. Unless intact frames of two different commits follow
//!   the damage: a crash tears only the last commit's write, so that damage is to synced data
//!   and the log refuses to open rather than cut acknowledged events
//!   (`later_commit_after_damage`). Damage in any older segment is corruption and the log
//!   refuses to open.
//! - Positions are dense within a segment. A gap *between* segments only appears when the log
//!   was continued at a snapshot's position ([`LocalLog::skip_to`]); open reports every gap in
//!   [`OpenSummary::gaps`] and the engine refuses to start unless a snapshot covers them.
//! - An empty append writes nothing and completes at once.
//! - Segments roll at `segment_bytes` (a spare segment at its own size, when the next spare is
//!   ready); whole segments are dropped by [`Log::compact`] once a snapshot covers them and
//!   their newest record is past retention. The active one never is.
//! - Frames are written at the segment's byte length (`pwrite`), never appended by the file
//!   offset. A busy log rolls into spare segments ([`super::spare`]): files of zeros made ahead
//!   (4 MiB first, doubling up to `segment_bytes`), so a write overwrites blocks that are
//!   already there and `fdatasync` flushes data only. A segment may therefore end in zeros; a
//!   frame never starts with zeros (its length is at least
//!   [`crate::record::FRAME_HEADER_BYTES`]), so zeros at a frame boundary that run to the end
//!   of the file are the unused part of a spare, not damage.
//! - A commit wholly inside a spare's zeros is synced as an overwrite where the filesystem is
//!   known to overwrite in place ([`super::overwrite`]): its pages, then a flush of the disk's
//!   cache, without the segment's inode. Every other commit is synced with `fdatasync`.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::log::overwrite::Flusher;
use crate::log::spare::Spares;
use crate::log::watch::LeaderWatch;
use crate::log::{Barrier, Log, LogError};
use crate::metrics::LogMetrics;
use crate::record::{
    CONTROL_OWNER, DecodeError, FRAME_HEADER_BYTES, FRAME_PREFIX_BYTES, Frame, FrameRead,
    LogPosition, RecordBatch, decode_frame, encode_frame,
};
use crate::shard::{Completion, Dispatcher, shard_of};

/// Appends queued for a committer before producers wait (backpressure).
pub const WRITER_QUEUE_CAPACITY: usize = 4096;
/// Most bytes of frames one group commit writes before it syncs.
pub const GROUP_MAX_BYTES: usize = 16 << 20;
/// Groups of at most this many records are applied in place by the committer (where shards
/// are idle): a shard thread's wake-up costs more than applying them. A leader (an appending
/// task that found the log idle) commits only groups this small, so it does not hold an HTTP
/// worker for long; larger appends go to the writer thread.
pub const IN_PLACE_MAX_RECORDS: u64 = 64;
/// Bytes read at a time while checking a segment on open.
const READ_WINDOW_BYTES: usize = 1 << 20;
/// A sparse index entry is kept at least every this many bytes of a segment.
const INDEX_STRIDE_BYTES: u64 = 64 << 10;

/// Tuning of the local log.
#[derive(Debug, Clone)]
pub struct LocalLogOptions {
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// The writer polls its queue this long before sleeping on it.
    pub spin: std::time::Duration,
    /// Whether an appending task that finds the log idle commits small groups itself (a
    /// leader). It blocks its thread for one `fdatasync`, so the binary turns this off when
    /// it runs a single HTTP worker; then the writer thread commits everything.
    pub leader_commits: bool,
    /// After this many group commits into a segment that is not a spare, the log asks for a
    /// spare ([`super::spare`]) and rolls into it once it is ready; a spare segment asks for
    /// the next one when a quarter full. Either only while the segment's commits average at
    /// most [`SPARE_MAX_AVERAGE_COMMIT_BYTES`]. `None`: never (every segment grows as written).
    pub spare_after_commits: Option<u64>,
    /// Size of the first spare; each next one is twice the last, up to `segment_bytes`.
    pub first_spare_bytes: u64,
    /// Whether a commit that lies wholly inside a spare's zeros is synced as an overwrite
    /// (its pages with `sync_file_range`, then a flush of the disk's cache) where the
    /// filesystem is known to overwrite in place, instead of with `fdatasync` of the segment
    /// ([`super::overwrite`]). That skips the inode write ext4 without a journal makes for
    /// the segment's mtime. `false`: always `fdatasync`.
    pub overwrite_sync: bool,
}

impl Default for LocalLogOptions {
    fn default() -> Self {
        LocalLogOptions {
            segment_bytes: 64 << 20,
            spin: std::time::Duration::ZERO,
            leader_commits: true,
            spare_after_commits: Some(SPARE_AFTER_COMMITS),
            first_spare_bytes: FIRST_SPARE_BYTES,
            overwrite_sync: true,
        }
    }
}

/// The first spare is small, so it is ready within ~50 ms of the log getting busy and a
/// server that writes little never holds a large file of zeros; spares double from there.
pub const FIRST_SPARE_BYTES: u64 = 4 << 20;

/// Group commits into a growing segment after which a spare is worth its zeros: a log that
/// commits this often will likely pay the inode write of a growing file many more times (at
/// 200 commits/s this is reached in 0.16 s), while a server that takes a handful of writes
/// never writes a spare.
pub const SPARE_AFTER_COMMITS: u64 = 32;

/// Spares pay off for small commits only: zeros written ahead save the inode write of each
/// `fdatasync` (~50 µs here), but cost a second write of every byte the log takes (~1.4 µs per
/// KiB marginal). Past ~36 KiB per commit the zeros cost more than they save, and under batch
/// load (hundreds of KiB per commit) they halve the disk's bandwidth for the log. So a segment
/// whose commits average more than this gets no spare (decision 0006, addendum).
pub const SPARE_MAX_AVERAGE_COMMIT_BYTES: u64 = 32 << 10;

/// What [`LocalLog::open`] found.
#[derive(Debug, Default, Clone)]
pub struct OpenSummary {
    pub segments: usize,
    pub frames: u64,
    pub records: u64,
    /// Bytes cut from a torn tail.
    pub dropped_bytes: u64,
    /// `(first missing, first present)` position ranges skipped between segments.
    pub gaps: Vec<(LogPosition, LogPosition)>,
}

struct Segment {
    first_position: LogPosition,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of whole, durable frames.
    len: u64,
    last_accept_ms: u64,
    /// `(first position of a frame, its byte offset)`, sparse, ascending.
    index: Vec<(LogPosition, u64)>,
}

impl Segment {
    fn note_frame(&mut self, first_position: LogPosition, offset: u64, accept_ms: u64) {
        let due = self
            .index
            .last()
            .is_none_or(|&(_, o)| offset - o >= INDEX_STRIDE_BYTES);
        if due {
            self.index.push((first_position, offset));
        }
        self.last_accept_ms = self.last_accept_ms.max(accept_ms);
    }
}

struct Shared {
    dir: PathBuf,
    segments: RwLock<Vec<Segment>>,
    /// Position of the next record; everything below it is durable.
    next_position: AtomicU64,
    failure: Mutex<Option<String>>,
    /// Why the last commit failed, when it did without stopping the log (a full disk): health
    /// reports it until a commit succeeds. `write_failing` says whether it is set.
    write_error: Mutex<Option<String>>,
    write_failing: AtomicBool,
    metrics: LogMetrics,
}

/// Work waiting for a committer.
enum Queued {
    Append {
        batch: RecordBatch,
        completion: Arc<Completion>,
    },
    Barrier(Barrier),
}

/// Appends and barriers waiting for a committer, in arrival order.
struct Queue {
    items: Mutex<VecDeque<Queued>>,
    /// Free places for appends; a committer gives one back for every append it takes.
    room: tokio::sync::Semaphore,
}

impl Queue {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.items().is_empty()
    }
}

/// The embedded, file-backed [`Log`].
pub struct LocalLog {
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    /// The committer's state; whoever holds this lock commits. `None` until started.
    writer: Arc<Mutex<Option<Writer>>>,
    /// Wakes the writer thread. `None` once closing: nothing more is queued then.
    kick: RwLock<Option<flume::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// [`LocalLogOptions::leader_commits`].
    leaders: bool,
    /// What the writer is built from at start: the kick receiver, the active segment, options.
    pending: Mutex<Option<(flume::Receiver<()>, Active, LocalLogOptions)>>,
    /// The maker of spare segments, unless [`LocalLogOptions::spare_after_commits`] is `None`.
    spares: Option<Arc<Spares>>,
    /// The watch over leader commits ([`super::watch`]), from the start while leaders commit.
    watch: std::sync::OnceLock<Arc<LeaderWatch>>,
    /// Leader commits the watch found stalled.
    stalled_commits: prometheus_client::metrics::counter::Counter,
}

/// The segment being written.
struct Active {
    /// Opened for writing (not appending): frames go at the segment's length.
    file: File,
    /// It was a spare of this many bytes (its blocks past the frames are written zeros);
    /// 0 for a segment that grows as it is written.
    prepared: u64,
    /// Its file's flags allow commits inside `prepared` to be synced as overwrites
    /// ([`super::overwrite::file_allows`]).
    overwritable: bool,
}

impl Active {
    /// The segment `file`, a spare of `prepared` bytes (0: none); commits into the spare are
    /// synced as overwrites if `flusher` is given and both the file's flags and its inode
    /// allow it.
    fn new(file: File, prepared: u64, flusher: Option<&mut Flusher>) -> Active {
        let overwritable = prepared > 0
            && flusher.is_some_and(|flusher| {
                super::overwrite::file_allows(&file) && flusher.keep_apart_from(&file)
            });
        Active {
            file,
            prepared,
            overwritable,
        }
    }
}

/// Whether every byte of `file` from `from` to `end` is zero.
/// (Up to 64 MiB at every start with a spare active: compared against a zero buffer, which
/// `memcmp` does many bytes at a time; `perf/experiments/zero_scan.rs` measures the two ways.)
fn zeros_to_end(file: &File, from: u64, end: u64) -> std::io::Result<bool> {
    let zeros = vec![0u8; READ_WINDOW_BYTES];
    let mut buf = vec![0u8; READ_WINDOW_BYTES];
    let mut at = from;
    while at < end {
        let n = (end - at).min(READ_WINDOW_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n] != zeros[..n] {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// The position of an intact frame in `tail` (the newest segment's bytes from its first
/// damage on, where position `expected` was due) whose commit is neither the damaged one's nor
/// that of an earlier intact frame of `tail`, if there is one. Every frame of a group commit
/// carries the group's accept time and a group is written only after the previous one's
/// `fdatasync` returned, so intact frames with two accept times after the damage prove that at
/// least one commit was written after the damaged bytes had been synced: damage to durable
/// data, which cutting would silently lose. One accept time (or none) is what a torn write of
/// the last commit leaves, and cutting there loses nothing acknowledged.
///
/// Looks for frames at every byte (the damaged frame's length says nothing), trying only those
/// whose header names a position the rest of the segment could hold.
fn later_commit_after_damage(tail: &[u8], expected: LogPosition) -> Option<LogPosition> {
    let plausible = expected..expected.saturating_add(tail.len() as u64);
    let mut first_accept = None;
    let mut at = 1;
    while let Some(header) = tail.get(at..at + FRAME_PREFIX_BYTES + FRAME_HEADER_BYTES) {
        let position = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if plausible.contains(&position)
            && let Ok(FrameRead::Frame(frame, used)) = decode_frame(&tail[at..])
        {
            match first_accept {
                None => first_accept = Some(frame.accept_time_ms),
                Some(accept) if accept != frame.accept_time_ms => return Some(position),
                Some(_) => {}
            }
            at += used;
            continue;
        }
        at += 1;
    }
    None
}

fn segment_path(dir: &Path, first_position: LogPosition) -> PathBuf {
    dir.join(format!("{first_position:020}.seg"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LocalLog {
    /// Opens (or creates) the log in `dir`, checking every frame and cutting a torn tail.
    /// `visit` sees every stored frame in order, for replay.
    pub fn open(
        dir: &Path,
        options: LocalLogOptions,
        visit: &mut dyn FnMut(Frame),
    ) -> Result<(LocalLog, OpenSummary), LogError> {
        fs::create_dir_all(dir)?;
        let mut starts: Vec<LogPosition> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        starts.sort_unstable();
        if starts.is_empty() {
            File::create(segment_path(dir, 1))?;
            File::open(dir)?.sync_all()?;
            starts.push(1);
        }
        let mut summary = OpenSummary {
            segments: starts.len(),
            ..OpenSummary::default()
        };
        let mut segments = Vec::with_capacity(starts.len());
        let mut expected = starts[0];
        for (i, &start) in starts.iter().enumerate() {
            let path = segment_path(dir, start);
            let is_last = i + 1 == starts.len();
            if start < expected {
                return Err(LogError::Corrupt(format!(
                    "{} starts at position {start}, inside the previous segment (which ends at {})",
                    path.display(),
                    expected - 1
                )));
            }
            if start > expected {
                summary.gaps.push((expected, start));
                expected = start;
            }
            let mut reader = File::open(&path)?;
            let file_len = reader.metadata()?.len();
            let mut segment = Segment {
                first_position: start,
                path: path.clone(),
                file: Arc::new(File::open(&path)?),
                len: 0,
                last_accept_ms: 0,
                index: Vec::new(),
            };
            // Frames are read through a window of the file, so start-up memory stays at about
            // one window (or one frame, if larger) however big the segment is.
            let mut window: Vec<u8> = Vec::new();
            let mut window_start = 0u64;
            let mut offset = 0u64;
            let damage: Option<String> = loop {
                if offset == file_len {
                    break None;
                }
                let at = (offset - window_start) as usize;
                if window.get(at..at + 4) == Some(&[0u8; 4][..]) {
                    // The unused part of a spare, if nothing but zeros follows.
                    if zeros_to_end(&segment.file, offset, file_len)? {
                        break None;
                    }
                    break Some(format!("bytes after zeros at offset {offset}"));
                }
                match decode_frame(&window[at..]) {
                    Ok(FrameRead::Frame(frame, used)) => {
                        if frame.first_position != expected {
                            break Some(format!(
                                "frame at offset {offset} has position {}, expected {expected}",
                                frame.first_position
                            ));
                        }
                        segment.note_frame(frame.first_position, offset, frame.accept_time_ms);
                        expected += frame.len() as u64;
                        summary.frames += 1;
                        summary.records += frame.len() as u64;
                        offset += used as u64;
                        visit(frame);
                    }
                    Ok(FrameRead::Incomplete { needed }) => {
                        let end = window_start + window.len() as u64;
                        if end == file_len {
                            break Some(format!(
                                "partial frame at offset {offset} (needs {needed} bytes)"
                            ));
                        }
                        window.drain(..at);
                        window_start = offset;
                        let want = needed.max(READ_WINDOW_BYTES) as u64;
                        let more = want.saturating_sub(window.len() as u64);
                        if (&mut reader).take(more).read_to_end(&mut window)? == 0 {
                            break Some(format!("segment ended early at offset {offset}"));
                        }
                    }
                    Err(error) => break Some(format!("bad frame at offset {offset}: {error}")),
                }
            };
            drop(window);
            if let Some(reason) = damage {
                if !is_last {
                    return Err(LogError::Corrupt(format!("{}: {reason}", path.display())));
                }
                let dropped = file_len - offset;
                let mut tail = vec![0u8; dropped as usize];
                segment.file.read_exact_at(&mut tail, offset)?;
                if let Some(position) = later_commit_after_damage(&tail, expected) {
                    return Err(LogError::Corrupt(format!(
                        "{}: {reason}, and intact frames of two later commits follow it (from \
                         position {position}): a crash tears only the last commit's write, so \
                         these bytes had been synced. Nothing was cut. Restore the segment from \
                         a copy, or cut it at offset {offset} by hand to start without the \
                         events from position {expected} on",
                        path.display()
                    )));
                }
                // Zeros after the damage are a spare's unused part: keep only what was written.
                let written = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                tail.truncate(written);
                let kept = path.with_extension(format!("seg.torn-{offset}"));
                fs::write(&kept, &tail)?;
                let file = OpenOptions::new().write(true).open(&path)?;
                file.set_len(offset)?;
                file.sync_all()?;
                summary.dropped_bytes = dropped;
                tracing::warn!(
                    segment = %path.display(), %reason, dropped_bytes = dropped,
                    kept_in = %kept.display(),
                    "cut torn tail of the log: dropped {dropped} bytes ({written} before a \
                     spare's zeros)"
                );
            }
            segment.len = offset;
            segments.push(segment);
        }
        let active_path = segments
            .last()
            .map(|s| s.path.clone())
            .expect("one segment at least");
        let active = OpenOptions::new().write(true).open(&active_path)?;
        let file_len = active.metadata()?.len();
        let prepared = if file_len > segments.last().map_or(0, |s| s.len) {
            file_len
        } else {
            0
        };
        let active = Active::new(active, prepared, None);
        let spares = match options.spare_after_commits {
            Some(_) => Some(Arc::new(Spares::start(dir)?)),
            None => None,
        };
        // One kick pending is enough: the writer thread empties the queue when it wakes.
        let (kick, kicked) = flume::bounded(1);
        let log = LocalLog {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                segments: RwLock::new(segments),
                next_position: AtomicU64::new(expected),
                failure: Mutex::new(None),
                write_error: Mutex::new(None),
                write_failing: AtomicBool::new(false),
                metrics: LogMetrics::default(),
            }),
            queue: Arc::new(Queue {
                items: Mutex::new(VecDeque::new()),
                room: tokio::sync::Semaphore::new(WRITER_QUEUE_CAPACITY),
            }),
            writer: Arc::new(Mutex::new(None)),
            kick: RwLock::new(Some(kick)),
            thread: Mutex::new(None),
            leaders: options.leader_commits,
            pending: Mutex::new(Some((kicked, active, options))),
            spares,
            watch: std::sync::OnceLock::new(),
            stalled_commits: Default::default(),
        };
        Ok((log, summary))
    }

    /// Makes the next record's position at least `position` (a snapshot is ahead of a log
    /// that lost its tail): starts a fresh segment there. Call before [`LocalLog::start`].
    pub fn skip_to(&self, position: LogPosition) -> Result<(), LogError> {
        if self.shared.next_position.load(Ordering::Acquire) >= position {
            return Ok(());
        }
        let path = segment_path(&self.shared.dir, position);
        File::create(&path)?;
        File::open(&self.shared.dir)?.sync_all()?;
        let file = Arc::new(File::open(&path)?);
        let active = Active::new(OpenOptions::new().write(true).open(&path)?, 0, None);
        self.shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Segment {
                first_position: position,
                path,
                file,
                len: 0,
                last_accept_ms: 0,
                index: Vec::new(),
            });
        self.shared.next_position.store(position, Ordering::Release);
        if let Some(pending) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            pending.1 = active;
        }
        tracing::warn!(
            position,
            "log ends before the snapshot; continuing at the snapshot position"
        );
        Ok(())
    }

    /// The writer's metrics.
    pub fn metrics(&self) -> &LogMetrics {
        &self.shared.metrics
    }

    /// Builds the committer and starts the writer thread; frames are dispatched through
    /// `dispatcher`.
    fn start_writer(&self, dispatcher: Dispatcher) -> std::io::Result<()> {
        let Some((kicked, active, options)) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let spin = options.spin;
        let mut flush = options
            .overwrite_sync
            .then(|| super::overwrite::flusher(&self.shared.dir))
            .flatten();
        // The segment opened last may be a spare with commits to come.
        let active = Active::new(active.file, active.prepared, flush.as_mut());
        if flush.is_some() {
            // The start-up line says `log_sync=overwrite`.
            tracing::debug!(
                "commits into spare segments are synced as overwrites (the filesystem is ext4 \
                 without data=journal; --log-sync fdatasync turns this off)"
            );
        }
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Writer {
            shared: self.shared.clone(),
            active,
            flush,
            commits: 0,
            committed_bytes: 0,
            spares: self.spares.clone(),
            next_spare_bytes: options.first_spare_bytes.min(options.segment_bytes),
            options,
            dispatcher,
            buf: Vec::with_capacity(1 << 20),
            last_accept_ms: 0,
            roll_failing: false,
            failed_writes_unlogged: 0,
            write_error_logged: None,
        });
        if self.leaders {
            let _ = self
                .watch
                .set(LeaderWatch::start(self.stalled_commits.clone())?);
        }
        let writer = self.writer.clone();
        let queue = self.queue.clone();
        let handle = std::thread::Builder::new()
            .name("flux-log-writer".into())
            .spawn(move || run_writer(&writer, &queue, &kicked, spin))?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        // Appends queued before the start are waiting.
        self.kick();
        Ok(())
    }

    /// Queues `item` unless the log is closing.
    fn enqueue(&self, item: Queued) -> Result<(), LogError> {
        // Held while pushing, so `close` (which takes it for writing) sees every item queued.
        let open = self.kick.read().unwrap_or_else(|e| e.into_inner());
        if open.is_none() {
            return Err(LogError::Unavailable("shutting down".into()));
        }
        self.queue.items().push_back(item);
        Ok(())
    }

    fn kick(&self) {
        if let Some(kick) = self.kick.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = kick.try_send(());
        }
    }

    /// Commits one group here if nobody else is committing; kicks the writer thread if work is
    /// left queued afterwards. If another committer holds the lock, it sees our work after it
    /// lets go. Without leader commits, only kicks the writer thread.
    fn lead(&self) {
        if !self.leaders {
            self.kick();
            return;
        }
        let mut guard = match self.writer.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if let Some(writer) = guard.as_mut() {
            let watch = self.watch.get();
            if let Some(watch) = watch {
                watch.begin();
            }
            writer.commit_next(&self.queue, true);
            if let Some(watch) = watch {
                watch.end();
            }
        }
        drop(guard);
        if !self.queue.is_empty() {
            self.kick();
        }
    }
}

/// While commits keep failing, at most one error line per this period.
const WRITE_ERROR_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a new segment did not start.
enum RollError {
    /// Nothing changed: the active segment stays, and a later commit tries again.
    Undone(std::io::Error),
    /// A new segment's file is left in place and could not be removed: writing on would give
    /// two files the same positions.
    Stuck(String),
}

/// The writer thread: sleeps until kicked, then commits until the queue is empty, looking
/// again after it lets the lock go (a leader may have queued work while it held it). Once the
/// log closes it empties the queue one last time and syncs.
fn run_writer(
    writer: &Mutex<Option<Writer>>,
    queue: &Queue,
    kicked: &flume::Receiver<()>,
    spin: std::time::Duration,
) {
    loop {
        let closing = crate::threads::recv_spinning(kicked, spin).is_err();
        loop {
            {
                let mut guard = writer.lock().unwrap_or_else(|e| e.into_inner());
                let Some(writer) = guard.as_mut() else { return };
                while writer.commit_next(queue, false) {}
            }
            if queue.is_empty() {
                break;
            }
        }
        if closing {
            let mut guard = writer.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(writer) = guard.as_mut() {
                let _ = writer.active.file.sync_data();
            }
            return;
        }
    }
}

/// Shard owners of every record of a frame read back from disk.
pub fn owners_of(frame: &Frame, shards: usize) -> Vec<u16> {
    (0..frame.len())
        .map(|i| match frame.record(i) {
            Ok(record) => shard_of(record.fields.entity_id, shards),
            Err(_) => CONTROL_OWNER,
        })
        .collect()
}

/// Removes the torn tails cut from `segment` (`<segment>.torn-<offset>`), which go with it.
fn remove_torn_tails_of(segment: &Path) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (
        segment.parent(),
        segment.file_name().and_then(|name| name.to_str()),
    ) else {
        return Ok(());
    };
    let prefix = format!("{name}.torn-");
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(&prefix))
        {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl Log for LocalLog {
    fn append(
        &self,
        batch: RecordBatch,
        completion: Arc<Completion>,
    ) -> Pin<Box<dyn Future<Output = Result<(), LogError>> + Send + '_>> {
        Box::pin(async move {
            if let Some(reason) = self.unavailable_reason() {
                return Err(LogError::Unavailable(reason));
            }
            let room = self
                .queue
                .room
                .acquire()
                .await
                .map_err(|_| LogError::Unavailable("log writer stopped".into()))?;
            // The committer that takes this append gives the place back.
            room.forget();
            if let Err(error) = self.enqueue(Queued::Append { batch, completion }) {
                self.queue.room.add_permits(1);
                return Err(error);
            }
            self.lead();
            Ok(())
        })
    }

    fn barrier(&self, barrier: Barrier) -> Result<(), LogError> {
        // Barriers run on the writer thread: they may block on full shard inboxes.
        self.enqueue(Queued::Barrier(barrier))?;
        self.kick();
        Ok(())
    }

    fn read_frame(&self, position: LogPosition) -> Result<Option<Arc<Frame>>, LogError> {
        if position == 0 || position >= self.next_position() {
            return Ok(None);
        }
        let (file, mut offset, end) = {
            let segments = self
                .shared
                .segments
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let i = segments.partition_point(|s| s.first_position <= position);
            let Some(segment) = i.checked_sub(1).map(|i| &segments[i]) else {
                return Ok(None);
            };
            let j = segment.index.partition_point(|&(p, _)| p <= position);
            let Some(&(_, offset)) = j.checked_sub(1).map(|j| &segment.index[j]) else {
                return Ok(None);
            };
            (segment.file.clone(), offset, segment.len)
        };
        let mut prefix = [0u8; FRAME_PREFIX_BYTES];
        while offset < end {
            file.read_exact_at(&mut prefix, offset)?;
            let body_len = u32::from_le_bytes(prefix[0..4].try_into().expect("4 bytes")) as u64;
            let total = FRAME_PREFIX_BYTES as u64 + body_len;
            let mut buf = vec![0u8; total as usize];
            file.read_exact_at(&mut buf, offset)?;
            match decode_frame(&buf) {
                Ok(FrameRead::Frame(frame, _)) if frame.last_position() >= position => {
                    return Ok(Some(Arc::new(frame)));
                }
                Ok(FrameRead::Frame(..)) => offset += total,
                Ok(FrameRead::Incomplete { .. }) | Err(DecodeError::Truncated { .. }) => {
                    return Err(LogError::Corrupt(format!("short frame at offset {offset}")));
                }
                Err(error) => {
                    return Err(LogError::Corrupt(format!(
                        "frame at offset {offset}: {error}"
                    )));
                }
            }
        }
        Ok(None)
    }

    fn first_position(&self) -> LogPosition {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner());
        segments.first().map_or(1, |s| s.first_position)
    }

    fn next_position(&self) -> LogPosition {
        self.shared.next_position.load(Ordering::Acquire)
    }

    fn compact(&self, covered: LogPosition, older_than_ms: u64) -> Result<usize, LogError> {
        let mut segments = self
            .shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mut dropped = 0;
        while segments.len() > 1
            && segments[1].first_position - 1 <= covered
            && segments[0].last_accept_ms < older_than_ms
        {
            let segment = segments.remove(0);
            fs::remove_file(&segment.path)?;
            remove_torn_tails_of(&segment.path)?;
            dropped += 1;
        }
        if dropped > 0 {
            File::open(&self.shared.dir)?.sync_all()?;
        }
        Ok(dropped)
    }

    fn health_reason(&self) -> Option<String> {
        self.unavailable_reason().or_else(|| {
            self.shared
                .write_failing
                .load(Ordering::Acquire)
                .then(|| {
                    self.shared
                        .write_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                })
                .flatten()
        })
    }

    fn unavailable_reason(&self) -> Option<String> {
        if let Some(failure) = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(failure);
        }
        self.kick
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
            .then(|| "shutting down".into())
    }

    fn start(&self, dispatcher: Dispatcher) -> std::io::Result<()> {
        self.start_writer(dispatcher)
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn sync_method(&self) -> Option<&'static str> {
        // The writer has a flusher iff commits into spares are synced as overwrites.
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        Some(match writer.as_ref().map(|w| w.flush.is_some()) {
            Some(true) => "overwrite",
            _ => "fdatasync",
        })
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.shared.metrics.register(registry);
        registry.register(
            "flux_log_stalled_leader_commits",
            "Commits on an HTTP worker that ran past 20 ms (a slow or stalled disk); each woke \
             another worker to serve the sockets",
            self.stalled_commits.clone(),
        );
    }

    fn close(&self) {
        self.kick.write().unwrap_or_else(|e| e.into_inner()).take();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        if let Some(spares) = &self.spares {
            spares.stop();
        }
        // Never started (or the thread is gone): nothing will commit what is still queued.
        let left: Vec<Queued> = self.queue.items().drain(..).collect();
        for item in left {
            if let Queued::Append { completion, .. } = item {
                completion.fail("shutting down".into());
            }
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    active: Active,
    /// The log's flush file (`overwrite::FLUSH_FILE`), to flush the disk's cache with once an
    /// overwrite's pages are written; `None` where commits are always synced with `fdatasync`.
    flush: Option<Flusher>,
    /// Group commits into the active segment (since it started or the log opened), and the
    /// bytes they wrote.
    commits: u64,
    committed_bytes: u64,
    spares: Option<Arc<Spares>>,
    /// Size of the next spare to ask for.
    next_spare_bytes: u64,
    options: LocalLogOptions,
    dispatcher: Dispatcher,
    buf: Vec<u8>,
    last_accept_ms: u64,
    /// The last try to start a new segment failed and was undone (logged once until one
    /// starts).
    roll_failing: bool,
    /// Failed commits not yet in the log's error output, and when the last one was logged.
    failed_writes_unlogged: u64,
    write_error_logged: Option<std::time::Instant>,
}

impl Writer {
    /// Takes appends from the head of `queue` and commits them as one group, then runs a
    /// barrier that ended the group. The writer thread (`leader` false) takes at least one
    /// append, then more while the group is under [`GROUP_MAX_BYTES`]. A leader takes appends
    /// only while the group stays within [`IN_PLACE_MAX_RECORDS`] records (a group it applies
    /// in place, quickly) and leaves anything bigger, and every barrier, to the writer thread.
    /// Returns whether it took anything.
    fn commit_next(&mut self, queue: &Queue, leader: bool) -> bool {
        let mut group: Vec<(RecordBatch, Arc<Completion>)> = Vec::new();
        let mut barrier = None;
        let mut taken = 0;
        {
            let mut items = queue.items();
            let (mut bytes, mut records) = (0, 0);
            while bytes < GROUP_MAX_BYTES {
                match items.front() {
                    None => break,
                    Some(Queued::Barrier(_)) if leader => break,
                    Some(Queued::Barrier(_)) => {
                        if let Some(Queued::Barrier(b)) = items.pop_front() {
                            barrier = Some(b);
                        }
                        taken += 1;
                        break;
                    }
                    Some(Queued::Append { batch, .. })
                        if leader && records + batch.len() as u64 > IN_PLACE_MAX_RECORDS =>
                    {
                        break;
                    }
                    Some(Queued::Append { .. }) => {}
                }
                let Some(Queued::Append { batch, completion }) = items.pop_front() else {
                    unreachable!("the head was an append");
                };
                taken += 1;
                queue.room.add_permits(1);
                if batch.is_empty() {
                    // Nothing to make durable; positions stay as they are.
                    completion.succeed(self.shared.next_position.load(Ordering::Acquire));
                } else {
                    bytes += batch.encoded_bytes();
                    records += batch.len() as u64;
                    group.push((batch, completion));
                }
            }
        }
        if !group.is_empty() {
            self.commit(&mut group);
        }
        if let Some(barrier) = barrier {
            let last = self.shared.next_position.load(Ordering::Acquire) - 1;
            barrier(last, &self.dispatcher);
        }
        taken > 0
    }

    fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes, syncs and dispatches one group of appends.
    fn commit(&mut self, group: &mut Vec<(RecordBatch, Arc<Completion>)>) {
        if let Some(reason) = self.failure() {
            for (_, completion) in group.drain(..) {
                completion.fail(reason.clone());
            }
            return;
        }
        let accept_ms = now_ms().max(self.last_accept_ms);
        let first = self.shared.next_position.load(Ordering::Acquire);
        let base = self.segment_len();
        self.buf.clear();
        let mut frames = Vec::with_capacity(group.len());
        let mut position = first;
        for (batch, _) in group.iter() {
            frames.push((position, base + self.buf.len() as u64));
            encode_frame(&mut self.buf, position, accept_ms, batch);
            position += batch.len() as u64;
        }
        if let Err(error) = self.write_and_sync(base) {
            let reason = format!("log write failed: {error}");
            // Once when writes start failing, then at most every WRITE_ERROR_LOG_EVERY: a full
            // disk fails every commit, and the log must not fill what is left of it.
            self.failed_writes_unlogged += 1;
            let starts = !self.shared.write_failing.load(Ordering::Acquire);
            if starts
                || self
                    .write_error_logged
                    .is_none_or(|at| at.elapsed() >= WRITE_ERROR_LOG_EVERY)
            {
                tracing::error!(%reason, failed_commits = self.failed_writes_unlogged);
                self.failed_writes_unlogged = 0;
                self.write_error_logged = Some(std::time::Instant::now());
            }
            *self
                .shared
                .write_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
            self.shared.write_failing.store(true, Ordering::Release);
            for (_, completion) in group.drain(..) {
                completion.fail(reason.clone());
            }
            return;
        }
        if self.shared.write_failing.swap(false, Ordering::AcqRel) {
            tracing::info!("log writes succeed again");
            self.failed_writes_unlogged = 0;
            self.write_error_logged = None;
            *self
                .shared
                .write_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.last_accept_ms = accept_ms;
        let records = position - first;
        self.shared.metrics.records_appended.inc_by(records);
        self.shared.metrics.group_records.observe(records as f64);
        {
            let mut segments = self
                .shared
                .segments
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(segment) = segments.last_mut() {
                for &(p, offset) in &frames {
                    segment.note_frame(p, offset, accept_ms);
                }
                segment.len = base + self.buf.len() as u64;
            }
        }
        self.shared.next_position.store(position, Ordering::Release);
        let in_place = records <= IN_PLACE_MAX_RECORDS;
        for ((mut batch, completion), (p, _)) in group.drain(..).zip(frames) {
            let owners = std::mem::take(&mut batch.shards);
            let frame = Arc::new(Frame::from_batch(p, accept_ms, batch));
            if in_place {
                self.dispatcher
                    .dispatch_in_place(frame, &owners, Some(completion));
            } else {
                self.dispatcher.dispatch(frame, &owners, Some(completion));
            }
        }
        self.commits += 1;
        self.committed_bytes += self.buf.len() as u64;
        match self.next_segment(position) {
            Ok(()) if self.roll_failing => {
                self.roll_failing = false;
                tracing::info!("the log starts new segments again");
            }
            Ok(()) => {}
            Err(RollError::Undone(error)) => {
                if !self.roll_failing {
                    tracing::warn!(
                        %error,
                        "starting a new log segment failed; the current one goes on taking \
                         writes, and every commit tries again"
                    );
                }
                self.roll_failing = true;
            }
            Err(RollError::Stuck(reason)) => {
                self.set_failure(format!("starting a new log segment failed: {reason}"));
            }
        }
    }

    /// After a commit: rolls when the segment is full, when its spare is full, or early into a
    /// spare when a growing segment is busy; asks for the next spare.
    fn next_segment(&mut self, next_position: LogPosition) -> Result<(), RollError> {
        let len = self.segment_len();
        let full = len >= self.options.segment_bytes;
        let Some(spares) = self.spares.clone() else {
            if full {
                self.roll(next_position, None)?;
            }
            return Ok(());
        };
        let prepared = self.active.prepared;
        let busy = self.busy();
        if full || busy || (prepared > 0 && len >= prepared) {
            match spares.take() {
                Some(spare) => self.roll(next_position, Some(spare))?,
                // A full spare with no successor yet grows like any segment meanwhile.
                None if full => self.roll(next_position, None)?,
                None => {}
            }
        }
        // The next spare is asked for once the current one is a quarter full: early enough for
        // the fastest writer seen here (~60 MB/s), and a slow log is not disturbed while
        // making it.
        let prepared = self.active.prepared;
        let spare_filling = prepared > 0 && self.segment_len() >= prepared / 4;
        if self.busy() || (spare_filling && self.small_commits()) {
            spares.request(self.next_spare_bytes);
        }
        Ok(())
    }

    /// A growing (not spare) segment that has taken enough small commits to be worth a spare.
    fn busy(&self) -> bool {
        self.active.prepared == 0
            && self
                .options
                .spare_after_commits
                .is_some_and(|after| self.commits >= after)
            && self.small_commits()
    }

    /// Whether the commits into this segment (since it started or the log opened) average at
    /// most [`SPARE_MAX_AVERAGE_COMMIT_BYTES`].
    fn small_commits(&self) -> bool {
        self.committed_bytes <= self.commits.max(1) * SPARE_MAX_AVERAGE_COMMIT_BYTES
    }

    fn segment_len(&self) -> u64 {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner());
        segments.last().map_or(0, |s| s.len)
    }

    fn write_and_sync(&mut self, base: u64) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        if let Err(error) = self.active.file.write_all_at(&self.buf, base) {
            // Cut the partial write so the file ends on a frame boundary again.
            self.active.prepared = 0;
            if let Err(cut) = self.active.file.set_len(base) {
                self.set_failure(format!(
                    "write failed ({error}) and could not be undone ({cut})"
                ));
            }
            return Err(error);
        }
        let written = std::time::Instant::now();
        let len = self.buf.len() as u64;
        let (synced, how) = match &self.flush {
            Some(flush) if self.active.overwritable && base + len <= self.active.prepared => (
                flush.sync(&self.active.file, base, len),
                "sync_file_range + cache flush",
            ),
            _ => (self.active.file.sync_data(), "fdatasync"),
        };
        if let Err(error) = synced {
            // After a failed fsync the page cache may have dropped the data: stop writing.
            self.set_failure(format!("{how} failed: {error}"));
            return Err(error);
        }
        let metrics = &self.shared.metrics;
        metrics
            .fsync_seconds
            .observe(written.elapsed().as_secs_f64());
        metrics
            .append_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.bytes_appended.inc_by(self.buf.len() as u64);
        Ok(())
    }

    fn set_failure(&self, reason: String) {
        tracing::error!(%reason, "the log stops taking writes");
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
    }

    /// Starts the segment at `next_position`: the `spare` file (path, size) renamed into place,
    /// or a new empty file.
    fn roll(
        &mut self,
        next_position: LogPosition,
        spare: Option<(PathBuf, u64)>,
    ) -> Result<(), RollError> {
        let path = segment_path(&self.shared.dir, next_position);
        // Whether the new segment's file is in place (ours to remove if the roll fails).
        let mut placed = false;
        let opened = (|| {
            let active = match &spare {
                Some((spare, _)) => {
                    fs::rename(spare, &path)?;
                    placed = true;
                    OpenOptions::new().write(true).open(&path)?
                }
                None => {
                    let file = OpenOptions::new()
                        .create_new(true)
                        .write(true)
                        .open(&path)?;
                    placed = true;
                    file
                }
            };
            File::open(&self.shared.dir)?.sync_all()?;
            Ok((active, Arc::new(File::open(&path)?)))
        })();
        let (active, file) = match opened {
            Ok(files) => files,
            Err(error) => {
                // The active segment goes on taking commits; a new file left behind would
                // claim positions that it holds.
                if placed
                    && let Err(undo) = fs::remove_file(&path)
                        .and_then(|()| File::open(&self.shared.dir)?.sync_all())
                {
                    return Err(RollError::Stuck(format!(
                        "{error}, and removing {} failed ({undo})",
                        path.display()
                    )));
                }
                if let (false, Some((spare, _))) = (placed, &spare) {
                    // Never renamed: not a segment, and no longer the spare maker's to hand out.
                    let _ = fs::remove_file(spare);
                }
                return Err(RollError::Undone(error));
            }
        };
        if let Some((_, bytes)) = &spare {
            self.next_spare_bytes = (bytes * 2).min(self.options.segment_bytes);
        }
        self.active = Active::new(
            active,
            spare.map_or(0, |(_, bytes)| bytes),
            self.flush.as_mut(),
        );
        self.commits = 0;
        self.committed_bytes = 0;
        self.shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Segment {
                first_position: next_position,
                path,
                file,
                len: 0,
                last_accept_ms: 0,
                index: Vec::new(),
            });
        Ok(())
    }
}
