//! The sweeper: under heavy fan-out, one thread writes the connections subscribed to `*`,
//! instead of each connection's writer task on its own timer.
//!
//! Heavy means a coalescing window of `SWEEP_MIN_WINDOW` or more (about
//! 33,000 delivered frames/s and up; `Pace::swept`). Every [`TICK`] the sweeper takes the `*` connections
//! whose window has passed and that are behind the stream, and sends each what it has not sent,
//! [`SUBMISSION_WRITES`] connections per io_uring submission. One submission of many sends
//! spares a syscall per send, and no writer task is woken or timed: `fanout --subscribers 1000
//! --rate 1000`, 4 pairs, server 323 → 279 µs per event (medians; perf/README, session 12).
//!
//! Invariants:
//! - The sweeper writes a connection only as a direct writer does ([`Connection::sweep_begin`]):
//!   nothing queued, no write in flight, its window passed, under its queue lock, and without
//!   blocking (`MSG_DONTWAIT`). A socket that takes only part goes to the writer task, which
//!   sends the rest (and watches the stream meanwhile): one stalled client never holds the
//!   sweeper up.
//! - It holds the locks of at most [`SUBMISSION_WRITES`] connections at once, for one
//!   submission whose sends have all completed when it returns (none stays in flight, so the
//!   buffers they point into outlive them). No other code holds two connection locks at once,
//!   so this cannot deadlock; a producer or writer task meets such a lock held for at most one
//!   submission (~16 loopback sends).
//! - Without io_uring (an old kernel, a seccomp filter) the same writes go out one `writev`
//!   each.
//! - The thread starts at the first `*` subscription, waits (parked) while fan-out is light,
//!   and ends once the hub is dropped. Should a round panic, the thread ends and the hub goes
//!   back to waking the `*` writer tasks on every change: no connection is left unwritten.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::connection::SweepWrite;
use crate::hub::{Hub, SweepCache};

/// How often the sweeper looks for due connections while fan-out is heavy: at most half the
/// smallest window it serves.
pub const TICK: Duration = Duration::from_millis(1);
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
        let heavy = match round {
            Ok(heavy) => heavy,
            Err(_) => {
                tracing::error!("the WebSocket sweeper panicked; writer tasks take over");
                strong.sweeper_failed();
                return;
            }
        };
        drop(strong);
        if heavy {
            std::thread::sleep(TICK);
        } else {
            std::thread::park_timeout(IDLE_WAIT);
        }
    }
}

/// Sends sweep writes: as one io_uring submission when the kernel allows, else one `writev`
/// each.
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
                tracing::info!(%error, "io_uring unavailable; the sweeper writes with writev");
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
    /// connection).
    pub fn send(&mut self, writes: Vec<SweepWrite<'_>>, now: Instant) {
        if writes.is_empty() {
            return;
        }
        self.results.clear();
        self.results.resize(writes.len(), 0);
        match self.ring.as_mut() {
            Some(ring) => {
                if let Err(error) = submit(
                    ring,
                    &writes,
                    &mut self.iovecs,
                    &mut self.headers,
                    &mut self.results,
                ) {
                    // The sends that ran have their results; the others count as not sent
                    // (their writers take over). Later rounds use writev.
                    tracing::warn!(%error, "io_uring send failed; the sweeper writes with writev from now on");
                    self.ring = None;
                }
            }
            None => {
                for (write, result) in writes.iter().zip(self.results.iter_mut()) {
                    *result = writev(write);
                }
            }
        }
        // A kernel whose io_uring lacks `sendmsg` refuses every send: use writev from now on.
        let unsupported = [-libc::EINVAL, -libc::EOPNOTSUPP, -libc::ENOSYS];
        if self.ring.is_some() && self.results.iter().any(|r| unsupported.contains(r)) {
            tracing::warn!("io_uring refused a send; the sweeper writes with writev from now on");
            self.ring = None;
        }
        for (write, &result) in writes.into_iter().zip(&self.results) {
            write.finish(result, now);
        }
    }
}

/// One submission of a `sendmsg` per write; each completed send's result goes to `results`.
///
/// A send with `MSG_DONTWAIT` completes within the `io_uring_enter` that submits it (a full
/// socket answers `EAGAIN`, it is never left waiting), so once this returns no send is in
/// flight: on an error, those not submitted yet stay in the queue and the ring is dropped.
fn submit(
    ring: &mut io_uring::IoUring,
    writes: &[SweepWrite<'_>],
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
            .flat_map(|w| w.slices.iter())
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
        header.msg_iovlen = write.slices.len();
        first += write.slices.len();
        headers.push(header);
    }
    for (i, (write, header)) in writes.iter().zip(headers.iter()).enumerate() {
        let send = io_uring::opcode::SendMsg::new(io_uring::types::Fd(write.socket), header)
            .flags(libc::MSG_DONTWAIT as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the header, its iovecs and the bytes they point to (held by `writes`) stay
        // alive and unmoved until the send completes, which happens before this function
        // returns (see above); the socket stays open while its connection's lock is held.
        unsafe { ring.submission().push(&send) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
    }
    let mut completed = 0;
    while completed < writes.len() {
        match ring.submit_and_wait(writes.len() - completed) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                reap(ring, results);
                return Err(error);
            }
        }
        completed += reap(ring, results);
    }
    Ok(())
}

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

/// One non-blocking `writev` of a sweep write; the bytes written or a negative errno.
fn writev(write: &SweepWrite<'_>) -> i32 {
    let iovecs: Vec<libc::iovec> = write
        .slices
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: the iovecs point into `write.slices`, alive for the call; the socket is open
    // while its connection's lock is held.
    let written = unsafe { libc::writev(write.socket, iovecs.as_ptr(), iovecs.len() as i32) };
    if written < 0 {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(written).unwrap_or(i32::MAX)
    }
}
