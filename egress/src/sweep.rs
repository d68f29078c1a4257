//! The sweeper: under heavy fan-out, one thread writes the connections subscribed to `*`,
//! instead of each connection's writer task on its own timer.
//!
//! The hub hands a change's `*` connections to the sweeper when fan-out is heavy (a coalescing
//! window of `SWEEP_MIN_WINDOW` or more, about 67,000 delivered frames/s and up;
//! `Pace::swept`) and there are more of them than a change writes directly (128). Every tick
//! ([`tick`]: a sixteenth of the window, 1–4 ms) the sweeper takes the `*` connections whose
//! window has passed (a lock-free check) and sends each what it has not sent of the stream,
//! [`SUBMISSION_WRITES`] connections per io_uring submission (the hub's direct writes to
//! exact and prefix subscribers go out through the same [`Sender`]). One submission of many
//! sends spares a syscall per send, and no writer task is woken or timed: `fanout --subscribers 1000 --rate 1000`, 4 pairs, server 323 → 279
//! µs per event (medians; perf/README, session 12).
//!
//! Invariants:
//! - The sweeper writes a connection only as a direct writer does (`Connection::sweep_begin`):
//!   nothing queued, no write in flight, its window passed, under its queue lock, and without
//!   blocking (`MSG_DONTWAIT`). A socket that takes only part goes to the writer task, which
//!   sends the rest and meanwhile watches the stream (woken by appends that drop chunks,
//!   `Stream::moved`): one stalled client never holds the sweeper up, and it still overflows
//!   (1008, counted) as soon as the stream drops its position.
//! - A write takes up to 256 KiB of the stream; a connection that got that much stays due, so
//!   a backlog drains at once rather than a batch per window.
//! - It holds the locks of at most [`SUBMISSION_WRITES`] connections at once, and takes them
//!   with `try_lock` (a busy one waits for the next round), so it never waits while holding
//!   one. They are held until the submission's sends have all completed, so the buffers the
//!   sends point into outlive them. Should io_uring fail with sends not known to have
//!   completed, their buffers are leaked and their sockets shut down (those connections end),
//!   and the sweeper goes on with `writev`.
//! - Without io_uring (an old kernel, a seccomp filter) the same writes go out one `writev`
//!   each.
//! - The thread starts at the first `*` subscription, waits (parked) while fan-out is light,
//!   and ends once the hub is dropped. If fan-out turns light after changes were handed to
//!   it, it wakes the `*` writers, which take over. Should a round panic, the thread ends and
//!   the hub goes back to waking the `*` writer tasks on every change.

use std::os::fd::RawFd;
use std::sync::Weak;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::connection::{DirectWrite, Push, SweepWrite, writev_now};
use crate::hub::{Hub, SweepCache};

/// The shortest time between two looks for due connections: half the smallest window the
/// sweeper serves ([`crate::connection::SWEEP_MIN_WINDOW`]).
pub const TICK_MIN: Duration = Duration::from_millis(1);
/// The longest: a frame waits at most its window plus one tick.
const TICK_MAX: Duration = Duration::from_millis(4);

/// How long the sweeper sleeps between looks for due connections at `window`: a sixteenth of
/// it, within `TICK_MIN..=TICK_MAX`. Each look is a wake-up of an idle thread; at long
/// windows few connections fall due per millisecond, so looking every millisecond costs more
/// wake-ups than it saves waiting.
pub fn tick(window: Duration) -> Duration {
    (window / 16).clamp(TICK_MIN, TICK_MAX)
}

/// Connections written per io_uring submission: their locks are held until it completes.
/// `loopback_probe 1000 2 uring:16` costs what one submission of all 1,000 does.
pub const SUBMISSION_WRITES: usize = 16;
/// How long the sweeper waits, parked, between looks while fan-out is light (a change under
/// heavy fan-out unparks it at once).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Starts the sweeper thread of `hub`.
pub fn spawn(hub: Weak<Hub>) -> std::io::Result<std::thread::Thread> {
    let handle = std::thread::Builder::new()
        .name("flux-ws-sweep".into())
        .spawn(move || run(hub))?;
    Ok(handle.thread().clone())
}

fn run(hub: Weak<Hub>) {
    let mut sender = Sender::new();
    let mut cache = SweepCache::default();
    loop {
        let Some(strong) = hub.upgrade() else { return };
        // A panic must not leave the `*` connections unwritten: the hub then wakes their
        // writers on every change, as under light fan-out.
        let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            strong.sweep(&mut cache, &mut sender)
        }));
        let window = match round {
            Ok(window) => window,
            Err(_) => {
                tracing::error!("the WebSocket sweeper panicked; writer tasks take over");
                strong.sweeper_failed();
                return;
            }
        };
        drop(strong);
        if let Some(window) = window {
            std::thread::sleep(tick(window));
        } else {
            std::thread::park_timeout(IDLE_WAIT);
        }
    }
}

/// Sends sweep writes, and the hub's direct writes of a change: as one io_uring submission
/// when the kernel allows, else one `writev` each.
pub struct Sender {
    ring: Option<io_uring::IoUring>,
    /// Scratch space of a submission, kept between rounds.
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::msghdr>,
    results: Vec<i32>,
}

impl Default for Sender {
    fn default() -> Self {
        Self::new()
    }
}

impl Sender {
    pub fn new() -> Sender {
        let ring = match io_uring::IoUring::new(SUBMISSION_WRITES as u32) {
            Ok(ring) => Some(ring),
            Err(error) => {
                tracing::info!(%error, "io_uring unavailable; WebSocket sends use writev");
                None
            }
        };
        Sender {
            ring,
            iovecs: Vec::new(),
            headers: Vec::new(),
            results: Vec::new(),
        }
    }

    /// Whether sends go through io_uring.
    #[cfg(test)]
    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// A sender that writes with `writev` only (the fallback, for tests).
    #[cfg(test)]
    pub fn without_io_uring() -> Sender {
        Sender {
            ring: None,
            ..Sender::new()
        }
    }

    /// Sends each write without blocking, then finishes it with its outcome (which unlocks its
    /// connection). Returns how many connections overflowed on the rest of a partial send.
    pub fn send(&mut self, writes: Vec<SweepWrite<'_>>, now: Instant) -> u64 {
        if writes.is_empty() {
            return 0;
        }
        self.transmit(&writes, true);
        let mut overflows = 0;
        for (write, &result) in writes.into_iter().zip(&self.results) {
            overflows += u64::from(write.finish(result, now));
        }
        overflows
    }

    /// Sends a change's direct writes ([`crate::connection::Connection::direct_begin`]) as
    /// one submission, then finishes each with its outcome, which goes to `done` in order.
    pub fn send_direct(&mut self, writes: &mut Vec<DirectWrite<'_>>, mut done: impl FnMut(Push)) {
        if writes.is_empty() {
            return;
        }
        // A lone send costs more as a submission than as a syscall of its own
        // (`loopback_probe … uring:1`).
        self.transmit(writes, writes.len() > 1);
        for (write, &result) in writes.drain(..).zip(&self.results) {
            done(write.finish(result));
        }
    }

    /// Sends each write without blocking, through the ring when `batch` (and io_uring works),
    /// else one `writev` each; the outcomes land in `self.results`, in order.
    fn transmit<W: Outgoing>(&mut self, writes: &[W], batch: bool) {
        self.results.clear();
        self.results.resize(writes.len(), UNKNOWN);
        match self.ring.as_mut().filter(|_| batch) {
            Some(ring) => {
                let submitted = submit(
                    ring,
                    writes,
                    &mut self.iovecs,
                    &mut self.headers,
                    &mut self.results,
                );
                if let Err(error) = submitted {
                    tracing::error!(%error, "io_uring failed; these WebSocket sends use writev from now on");
                    self.abandon(writes);
                }
            }
            None => {
                for (write, result) in writes.iter().zip(self.results.iter_mut()) {
                    let written = writev_now(write.socket(), write.slices());
                    *result = i32::try_from(written).unwrap_or(i32::MAX);
                }
            }
        }
        // A kernel whose io_uring lacks `sendmsg` refuses every send: use writev from now on.
        let unsupported = [-libc::EINVAL, -libc::EOPNOTSUPP, -libc::ENOSYS];
        if self.ring.is_some() && self.results.iter().any(|r| unsupported.contains(r)) {
            tracing::warn!("io_uring refused a send; these WebSocket sends use writev from now on");
            self.ring = None;
        }
    }

    /// After io_uring failed with sends whose completion never came: those may still run, so
    /// the memory they point into is leaked (never freed) and their sockets are shut down (their
    /// connections end, rather than risk bytes sent twice); the ring is dropped.
    fn abandon<W: Outgoing>(&mut self, writes: &[W]) {
        for (write, result) in writes.iter().zip(self.results.iter_mut()) {
            if *result == UNKNOWN {
                std::mem::forget(write.slices().to_vec());
                // SAFETY: the socket is open (its connection's lock is held); shutting it down
                // only makes later reads and writes on it fail.
                unsafe { libc::shutdown(write.socket(), libc::SHUT_RDWR) };
                *result = -libc::EIO;
            }
        }
        std::mem::forget(std::mem::take(&mut self.iovecs));
        std::mem::forget(std::mem::take(&mut self.headers));
        self.ring = None;
    }
}

/// A write the [`Sender`] sends: bytes to one socket, whose connection stays locked (so the
/// socket stays open and the bytes alive) until its outcome is recorded.
trait Outgoing {
    fn socket(&self) -> RawFd;
    fn slices(&self) -> &[Bytes];
}

impl Outgoing for SweepWrite<'_> {
    fn socket(&self) -> RawFd {
        self.socket
    }
    fn slices(&self) -> &[Bytes] {
        &self.slices
    }
}

impl Outgoing for DirectWrite<'_> {
    fn socket(&self) -> RawFd {
        self.socket
    }
    fn slices(&self) -> &[Bytes] {
        &self.frames
    }
}

/// A result slot whose send has not completed.
const UNKNOWN: i32 = i32::MIN;

/// One submission of a `sendmsg` per write; each completed send's result goes to `results`
/// (the others stay [`UNKNOWN`]).
///
/// It returns once every send has completed, so the buffers they point into may then go. A
/// send with `MSG_DONTWAIT` normally completes within the `io_uring_enter` that submits it (a
/// full socket answers `EAGAIN`). Should `io_uring_enter` keep failing (it is retried for
/// about a second), the error is returned and the caller must treat the sends still
/// [`UNKNOWN`] as in flight.
fn submit<W: Outgoing>(
    ring: &mut io_uring::IoUring,
    writes: &[W],
    iovecs: &mut Vec<libc::iovec>,
    headers: &mut Vec<libc::msghdr>,
    results: &mut [i32],
) -> std::io::Result<()> {
    // Every iovec first, then the headers that point into it: neither vector grows once a
    // pointer into it is taken.
    iovecs.clear();
    iovecs.extend(
        writes
            .iter()
            .flat_map(|w| w.slices().iter())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            }),
    );
    headers.clear();
    let mut first = 0;
    for write in writes {
        // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = iovecs[first..].as_mut_ptr();
        header.msg_iovlen = write.slices().len();
        first += write.slices().len();
        headers.push(header);
    }
    for (i, (write, header)) in writes.iter().zip(headers.iter()).enumerate() {
        let send = io_uring::opcode::SendMsg::new(io_uring::types::Fd(write.socket()), header)
            .flags(libc::MSG_DONTWAIT as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the header, its iovecs and the bytes they point to (held by `writes`) stay
        // alive and unmoved until the send completes: this function waits for every
        // completion, and if it cannot, the caller leaks them. The socket stays open while
        // its connection's lock is held.
        unsafe { ring.submission().push(&send) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
    }
    let mut completed = 0;
    let mut failures = 0;
    while completed < writes.len() {
        match ring.submit_and_wait(writes.len() - completed) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                completed += reap(ring, results);
                failures += 1;
                if failures == SUBMIT_RETRIES {
                    return Err(error);
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        completed += reap(ring, results);
    }
    Ok(())
}

/// Times a failing `io_uring_enter` is tried again, 1 ms apart, before the ring is given up.
const SUBMIT_RETRIES: u32 = 1000;

/// Takes the completions there are into `results`; returns how many.
fn reap(ring: &mut io_uring::IoUring, results: &mut [i32]) -> usize {
    let mut count = 0;
    for completion in ring.completion() {
        if let Some(result) = results.get_mut(completion.user_data() as usize) {
            *result = completion.result();
        }
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_follows_the_window_within_its_bounds() {
        let ms = Duration::from_millis;
        // At the smallest swept window the sweeper still looks twice per window.
        assert_eq!(tick(crate::connection::SWEEP_MIN_WINDOW), ms(1));
        assert_eq!(tick(ms(12)), ms(1));
        assert_eq!(tick(ms(32)), ms(2));
        assert_eq!(tick(ms(50)), Duration::from_micros(3125));
        assert_eq!(tick(ms(500)), ms(4));
    }
}
