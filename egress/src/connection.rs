//! One WebSocket connection: its bounded send queue, and the reader and writer tasks.
//!
//! Invariants:
//! - The send queue holds shared frame handles ([`Bytes`]), never copies. It is bounded by
//!   [`QUEUE_MAX_FRAMES`] and [`QUEUE_MAX_BYTES`]; a push past either bound drops what is
//!   queued and closes the connection with 1008 and a reason naming the overflow. Producers
//!   (whatever thread applied the change) never wait on a connection.
//! - The writer task takes everything queued at once and sends it with vectored writes, so a
//!   burst costs few syscalls. A writer that wrote very recently waits out a short window
//!   first ([`Pace`]): the window grows with the rate of frames the hub delivers, so heavy
//!   fan-out sends many frames per syscall while a lone subscriber is written to at once.
//!   Windows of 2 ms and more are slept out right after each send (one wake-up per send
//!   instead of two), except by `*` connections the sweeper writes. One small loopback send
//!   costs ~4–7 µs of CPU here whatever its size (`loopback_probe`), so frames per send is
//!   what bounds fan-out CPU per frame.
//! - A producer may write a change straight to the socket instead ([`Connection::direct_begin`],
//!   [`Connection::flush_begin`] for a helper's share), saving the hand-off to the writer task
//!   (a thread wake-up, tens of µs in a VM) — but only when nothing is queued, the writer holds
//!   no batch, and the window since the last write has passed, so frames still leave in push
//!   order. That write is non-blocking and made under the queue lock, held until it completed
//!   (the hub sends several connections' writes in one io_uring submission); whatever the
//!   socket does not take is queued for the writer. The writer withdraws the socket (under the
//!   same lock) when it ends, returning or dropped (`Withdraw`), so a direct write never
//!   reaches a closed or reused descriptor.
//! - Under heavy fan-out the sweeper thread writes the stream to `*` connections on the same
//!   terms as a direct write ([`Connection::sweep_begin`], `crate::sweep`), holding the queue
//!   lock until its write completed.
//! - Once a close frame is queued, nothing more is accepted; the writer sends it and shuts the
//!   socket down. A frame is never cut: the rest of one partly written (the front of the
//!   queue or of the writer's batch, marked `front_partial`) always goes out before the close
//!   frame, whatever an overflow drops; every queued element ends on a frame boundary. A
//!   closing writer owes its client only that rest, so it drops the rest of its batch and then
//!   waits up to [`CLOSING_STALL_TIMEOUT`] for the client to read to the close frame.
//! - A socket that takes nothing for [`WRITE_STALL_TIMEOUT`] counts as an overflow (1008): a
//!   client that reads nothing cannot keep up, even when its queue stays short. Once the
//!   writer has ended, a client that does not answer within [`CLOSE_REPLY_GRACE`] (or whose
//!   socket is dead) has its read side shut down, which ends the hub's reader.
//! - A connection subscribed to `*` reads the hub's [`Stream`] instead of receiving handles:
//!   its position there lives in the queue (under the same lock), and each round the writer
//!   sends what is queued first, then the stream from that position on. Frames queued before
//!   the `*` subscription are older than anything the stream holds for it; frames queued while
//!   it lasts are control frames (errors, pongs, metrics), whose order against changes does not
//!   matter; on unsubscribing, the stream's unsent remainder is queued before anything later.
//!   A position the stream no longer keeps is an overflow (1008), noticed as soon as the stream
//!   drops it, also while the writer waits on a full socket (the close frame then follows the
//!   batch in flight once the client reads again).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::frame;
use crate::stream::{Lagged, Stream};

/// Most frames a connection may have queued before it is closed as too slow.
pub const QUEUE_MAX_FRAMES: usize = 16_384;
/// Most bytes of frames a connection may have queued before it is closed as too slow.
pub const QUEUE_MAX_BYTES: usize = 8 << 20;
/// Frames handed to one `writev` call.
const WRITEV_MAX_FRAMES: usize = 256;
/// A socket that accepts no bytes for this long overflows its connection (closed with 1008).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing connection waits for its client to read up to the close frame before
/// the socket is dropped.
pub const CLOSING_STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the reader waits for the client to answer the server's close frame.
pub const CLOSE_REPLY_GRACE: Duration = Duration::from_secs(5);
/// A drained queue keeping more slots than this gives the memory back.
const IDLE_QUEUE_SLOTS: usize = 64;
/// Stream bytes a writer takes per round (rounded up to whole chunks): what a writer stuck on
/// a full socket can keep alive.
const STREAM_BATCH_BYTES: usize = 256 << 10;
/// Stream bytes one direct write takes.
const DIRECT_STREAM_BYTES: usize = 64 << 10;

/// A sweep's write to one connection, prepared by [`Connection::sweep_begin`]: the stream's
/// bytes from the connection's position, with its queue locked until [`SweepWrite::finish`].
pub struct SweepWrite<'a> {
    connection: &'a Connection,
    queue: std::sync::MutexGuard<'a, Queue>,
    /// The connection's socket (open while the lock is held).
    pub socket: RawFd,
    /// The bytes to send, in order (shared slices of the stream).
    pub slices: Vec<Bytes>,
    bytes: usize,
    /// The stream position after `slices`.
    end: u64,
    /// `slices` is as much as one write takes ([`STREAM_BATCH_BYTES`]): more may follow.
    batch_full: bool,
}

impl SweepWrite<'_> {
    /// Records the write's outcome (`result`: the bytes the socket took, or a negative errno)
    /// and unlocks the queue. The position moves past what was sent; a rest is queued for the
    /// writer task. Nothing sent (a full socket, an error) leaves the position where it was
    /// and wakes the writer, which meets the same condition and handles it.
    ///
    /// Returns whether the rest queued for the writer overflowed the queue (the connection then
    /// closes with 1008; the caller counts it).
    pub fn finish(mut self, result: i32, now: Instant) -> bool {
        let written = usize::try_from(result).unwrap_or(0);
        if written == 0 {
            drop(self.queue);
            self.connection.wake.notify_one();
            return false;
        }
        SOCKET_WRITES.inc();
        SWEEP_WRITES.inc();
        // A connection that got a whole batch may have more waiting: it stays due (its window
        // is for coalescing small sends, not for capping a backlog).
        if !(self.batch_full && written == self.bytes) {
            self.connection.wrote(&mut self.queue, now);
        }
        let rest = self
            .connection
            .sent_stream(&mut self.queue, &self.slices, written, self.end);
        let Some(pushed) = rest else {
            return false;
        };
        drop(self.queue);
        self.connection.wake.notify_one();
        pushed == Push::Overflowed
    }
}

/// A direct write of a change's frames to an idle connection, prepared by
/// [`Connection::direct_begin`]: its queue stays locked until [`DirectWrite::finish`], so the
/// send can go out in a batch with others' (`crate::sweep::Sender`).
pub struct DirectWrite<'a> {
    connection: &'a Connection,
    queue: std::sync::MutexGuard<'a, Queue>,
    /// The connection's socket (open while the lock is held).
    pub socket: RawFd,
    /// The frames to send, in order: a change's, or those a helper took out of the queue
    /// ([`Connection::flush_begin`]).
    pub frames: Cow<'a, [Bytes]>,
    now: Instant,
}

/// What [`Connection::direct_begin`] made of a change for one connection.
pub enum DirectBegin<'a> {
    /// Idle: send these frames, then finish the write.
    Write(DirectWrite<'a>),
    /// Queued for the writer (or refused); nothing to send.
    Done(Push),
    /// Its lock is held elsewhere and the caller may not wait for it.
    Busy,
}

impl DirectWrite<'_> {
    /// Records the send's outcome (`result`: the bytes the socket took, or a negative errno)
    /// and unlocks the queue; what the socket did not take is queued for the writer, as a
    /// direct write always did.
    pub fn finish(mut self, result: i32) -> Push {
        let written = usize::try_from(result).unwrap_or(0);
        if written > 0 {
            SOCKET_WRITES.inc();
            self.connection.wrote(&mut self.queue, self.now);
        }
        // The queue is empty (a direct write needs it so, a flush took it all); its
        // `front_partial` still tells whether `frames` began with the rest of a frame.
        if written == self.frames.iter().map(Bytes::len).sum::<usize>() {
            self.queue.front_partial = false;
            return Push::Queued;
        }
        let (rest, split) = unwritten(&self.frames, written);
        self.queue.front_partial = split || (self.queue.front_partial && written == 0);
        let outcome = self.connection.enqueue(&mut self.queue, &rest);
        drop(self.queue);
        self.connection.wake.notify_one();
        outcome
    }
}

/// Result of queueing frames on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue overflowed: the connection is now closing with 1008.
    Overflowed,
    /// The connection is already closing; nothing was queued.
    Closed,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front of `frames` is the rest of a frame partly written to the socket: it goes
    /// out before anything else, a close frame included.
    front_partial: bool,
    /// The close frame to send after `frames`; once set, nothing else is queued.
    close: Option<Bytes>,
    /// The socket, while the writer task owns it (for direct writes).
    socket: Option<RawFd>,
    /// The writer task holds a batch it has not finished writing.
    writing: bool,
    /// When bytes last went to the socket.
    last_write: Option<Instant>,
    /// Subscribed to `*`: the position in the hub's stream up to which it has been sent.
    stream: Option<u64>,
}

impl Queue {
    /// Nothing queued, no write in flight, and none within `window` before `now`: a producer
    /// may write to the socket itself without reordering anything.
    fn idle(&self, now: Instant, window: Duration) -> bool {
        self.frames.is_empty() && self.socket_free(now, window)
    }

    /// No write in flight and none within `window` before `now` (frames may be queued).
    fn socket_free(&self, now: Instant, window: Duration) -> bool {
        !self.writing
            && self
                .last_write
                .is_none_or(|at| now.duration_since(at) >= window)
    }
}

/// Socket writes that sent frames, from writer tasks and direct writes alike, in this process.
/// With the frames delivered, it tells how well writes coalesce: each costs ~7 µs of CPU on
/// loopback here, whatever it carries (decision 0003).
pub static SOCKET_WRITES: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);
/// The part of [`SOCKET_WRITES`] made by the sweeper (`crate::sweep`).
pub static SWEEP_WRITES: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);
/// Frames one direct write hands to `writev`.
const DIRECT_MAX_FRAMES: usize = 16;

/// The shared half of a connection: producers push, the writer drains.
pub struct Connection {
    pub id: u64,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Set when the connection overflowed (for metrics and tests).
    overflowed: AtomicBool,
    /// The hub still reads the client's messages.
    reading: AtomicBool,
    /// Mirrors `Queue::stream.is_some()` for the hub's index walk (changed only under the
    /// index's write lock, read under its read lock).
    streaming: AtomicBool,
    /// Mirrors `Queue::last_write` (nanoseconds since [`EPOCH`]; 0: never) for the sweeper,
    /// which skips connections within their window without taking their lock.
    last_write_ns: AtomicU64,
}

/// The origin of [`Connection::last_write_ns`].
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Connection {
    pub fn new(id: u64) -> Self {
        Connection {
            id,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            overflowed: AtomicBool::new(false),
            reading: AtomicBool::new(true),
            streaming: AtomicBool::new(false),
            last_write_ns: {
                // Start the clock before any write, so that no write reads as "never" (0).
                std::sync::LazyLock::force(&EPOCH);
                AtomicU64::new(0)
            },
        }
    }

    /// Records a write to the socket at `now` (under the queue lock).
    fn wrote(&self, queue: &mut Queue, now: Instant) {
        queue.last_write = Some(now);
        self.last_write_ns.store(
            now.duration_since(*EPOCH).as_nanos() as u64,
            Ordering::Relaxed,
        );
    }

    /// Whether a write at `now` is within `window` of the last one (read without the lock).
    pub fn within_window(&self, now: Instant, window: Duration) -> bool {
        let last = self.last_write_ns.load(Ordering::Relaxed);
        let now = now.duration_since(*EPOCH).as_nanos() as u64;
        last != 0 && now.saturating_sub(last) < window.as_nanos() as u64
    }

    /// Whether the connection reads the hub's stream (is subscribed to `*`).
    pub fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// Starts reading the stream at `position` (its end now). The caller holds the index's
    /// write lock, so no change is delivered meanwhile.
    pub fn start_stream(&self, position: u64) {
        self.lock().stream = Some(position);
        self.streaming.store(true, Ordering::Relaxed);
        // The writer may be waiting without listening to the stream.
        self.wake.notify_one();
    }

    /// Stops reading the stream: what it has not sent yet is queued, ahead of anything pushed
    /// later. The caller holds the index's write lock.
    pub fn stop_stream(&self, stream: &Stream) -> Push {
        self.streaming.store(false, Ordering::Relaxed);
        let outcome = {
            let mut queue = self.lock();
            let Some(position) = queue.stream.take() else {
                return Push::Queued;
            };
            if queue.close.is_some() {
                return Push::Closed;
            }
            let mut rest: Vec<Bytes> = Vec::new();
            match stream.read(position, usize::MAX, &mut rest) {
                Ok(_) => self.enqueue(&mut queue, &rest),
                Err(Lagged) => self.overflow(&mut queue),
            }
        };
        self.wake.notify_one();
        outcome
    }

    /// Writes the stream from this connection's position straight to the socket when the
    /// connection is idle (as [`Connection::direct_begin`]); true when it is then fully sent.
    /// `frames` were just appended to the stream at position `at`: a connection that is there
    /// gets them as they are, without reading them back. What the socket does not take is
    /// queued, so the position stays on a frame boundary.
    pub fn stream_direct(
        &self,
        stream: &Stream,
        frames: &[Bytes],
        at: u64,
        window: Duration,
    ) -> bool {
        let (sent, queued) = self.stream_direct_locked(stream, frames, at, window);
        if queued {
            self.wake.notify_one();
        }
        sent
    }

    /// Starts a sweep's write of the stream to this connection: when it reads the stream, is
    /// behind its end, and is idle with its `window` passed at `now` (as for
    /// [`Connection::stream_direct`]). The queue stays locked until [`SweepWrite::finish`], so
    /// nobody else writes to the socket meanwhile. A position the stream no longer keeps wakes
    /// the writer, which closes the connection.
    pub fn sweep_begin<'a>(
        &'a self,
        stream: &Stream,
        now: Instant,
        window: Duration,
    ) -> Option<SweepWrite<'a>> {
        // Never wait for a lock while holding others': one busy now is swept next round.
        let queue = self.try_lock()?;
        let position = queue.stream?;
        if queue.close.is_some() || position == stream.end() {
            return None;
        }
        let socket = queue.socket.filter(|_| queue.idle(now, window))?;
        let mut slices: Vec<Bytes> = Vec::new();
        if stream
            .read(position, STREAM_BATCH_BYTES, &mut slices)
            .is_err()
        {
            drop(queue);
            self.wake.notify_one();
            return None;
        }
        let bytes: usize = slices.iter().map(Bytes::len).sum();
        Some(SweepWrite {
            connection: self,
            queue,
            socket,
            end: position + bytes as u64,
            bytes,
            slices,
            batch_full: bytes >= STREAM_BATCH_BYTES,
        })
    }

    /// [`Connection::stream_direct`] under the queue lock; also says whether it queued a rest.
    fn stream_direct_locked(
        &self,
        stream: &Stream,
        frames: &[Bytes],
        at: u64,
        window: Duration,
    ) -> (bool, bool) {
        let mut queue = self.lock();
        let Some(position) = queue.stream else {
            return (true, false);
        };
        if queue.close.is_some() {
            return (true, false);
        }
        let now = Instant::now();
        let Some(socket) = queue.socket.filter(|_| queue.idle(now, window)) else {
            return (false, false);
        };
        let mut read: Vec<Bytes> = Vec::new();
        let (slices, end) = if position == at {
            let len: usize = frames.iter().map(Bytes::len).sum();
            (frames, at + len as u64)
        } else {
            let Ok(end) = stream.read(position, DIRECT_STREAM_BYTES, &mut read) else {
                return (false, false); // Lagged: the writer closes it.
            };
            (&read[..], end)
        };
        let total: usize = slices.iter().map(Bytes::len).sum();
        if total == 0 {
            return (end == stream.end(), false);
        }
        let written = write_now(socket, slices);
        if written == 0 {
            return (false, false); // The writer will take it from the stream.
        }
        self.wrote(&mut queue, now);
        match self.sent_stream(&mut queue, slices, written, end) {
            None => (end == stream.end(), false),
            Some(_) => (false, true),
        }
    }

    /// After the first `written` bytes of `slices` (the stream up to `end`) went to the socket:
    /// the position moves to `end`, and what the socket did not take is queued for the writer
    /// (ahead of the stream from `end`). Returns the outcome of queueing that rest, `None` when
    /// everything went.
    fn sent_stream(
        &self,
        queue: &mut Queue,
        slices: &[Bytes],
        written: usize,
        end: u64,
    ) -> Option<Push> {
        queue.stream = Some(end);
        let total: usize = slices.iter().map(Bytes::len).sum();
        (written < total).then(|| {
            // Only an idle connection is written to this way: the rest goes to the front.
            let (rest, split) = unwritten(slices, written);
            queue.front_partial = split;
            self.enqueue(queue, &rest)
        })
    }

    /// Queues `frames` (in order) unless that would pass a bound.
    pub fn push(&self, frames: &[Bytes]) -> Push {
        let (outcome, was_empty) = {
            let mut queue = self.lock();
            if queue.close.is_some() {
                return Push::Closed;
            }
            let was_empty = queue.frames.is_empty();
            (self.enqueue(&mut queue, frames), was_empty)
        };
        // A push onto a non-empty queue needs no wake-up: the push that made it non-empty
        // already woke the writer, which drains everything queued when it runs.
        if was_empty || outcome != Push::Queued {
            self.wake.notify_one();
        }
        outcome
    }

    /// Like [`Connection::push`], but leaves the writer asleep: the caller has
    /// [`Connection::flush_begin`] called soon (by a helper on another thread).
    pub fn push_quiet(&self, frames: &[Bytes]) -> Push {
        let outcome = {
            let mut queue = self.lock();
            if queue.close.is_some() {
                return Push::Closed;
            }
            self.enqueue(&mut queue, frames)
        };
        if outcome != Push::Queued {
            self.wake.notify_one();
        }
        outcome
    }

    /// The helper's half of a split change (queued by [`Connection::push_quiet`]): like
    /// [`Connection::direct_begin`], but for what is queued. With no write in flight and the
    /// window since the last passed, up to `DIRECT_MAX_FRAMES` queued frames come back taken
    /// out of the queue, locked with the socket; [`DirectWrite::finish`] queues again what the
    /// socket does not take, and the lock held in between lets nothing queued meanwhile pass
    /// them. Otherwise the writer is woken to send them.
    pub fn flush_begin(&self, window: Duration, wait: bool) -> DirectBegin<'_> {
        let Some(mut queue) = self.lock_or_try(wait) else {
            return DirectBegin::Busy;
        };
        if queue.frames.is_empty() && queue.close.is_none() {
            return DirectBegin::Done(Push::Queued); // The writer sent them already.
        }
        let now = Instant::now();
        let socket = queue.socket.filter(|_| {
            queue.close.is_none()
                && queue.frames.len() <= DIRECT_MAX_FRAMES
                && queue.socket_free(now, window)
        });
        if let Some(socket) = socket {
            let frames: Vec<Bytes> = queue.frames.drain(..).collect();
            queue.bytes = 0;
            return DirectBegin::Write(DirectWrite {
                connection: self,
                queue,
                socket,
                frames: Cow::Owned(frames),
                now,
            });
        }
        drop(queue);
        self.wake.notify_one();
        DirectBegin::Done(Push::Queued)
    }

    /// A direct write in two steps, for sends batched with others': an idle
    /// connection comes back locked with its socket, to be sent `frames` and finished; any
    /// other is queued at once. With `wait` false a lock held elsewhere answers
    /// [`DirectBegin::Busy`] (a caller holding other connections' locks must not wait).
    pub fn direct_begin<'a>(
        &'a self,
        frames: &'a [Bytes],
        window: Duration,
        wait: bool,
    ) -> DirectBegin<'a> {
        let Some(mut queue) = self.lock_or_try(wait) else {
            return DirectBegin::Busy;
        };
        if queue.close.is_some() {
            return DirectBegin::Done(Push::Closed);
        }
        let now = Instant::now();
        if let Some(socket) = queue.socket.filter(|_| queue.idle(now, window)) {
            return DirectBegin::Write(DirectWrite {
                connection: self,
                queue,
                socket,
                frames: Cow::Borrowed(frames),
                now,
            });
        }
        let outcome = self.enqueue(&mut queue, frames);
        drop(queue);
        self.wake.notify_one();
        DirectBegin::Done(outcome)
    }

    /// Like [`Connection::push`], but writes the frames to the socket at once when the
    /// connection is idle (nothing queued, no write in flight, none within `window`): one
    /// connection's [`Connection::direct_begin`] with a `writev` (the hub batches them).
    #[cfg(test)]
    pub fn push_direct(&self, frames: &[Bytes], window: Duration) -> Push {
        match self.direct_begin(frames, window, true) {
            DirectBegin::Write(write) => {
                let written = writev_now(write.socket, write.frames.iter());
                write.finish(i32::try_from(written).unwrap_or(i32::MAX))
            }
            DirectBegin::Done(pushed) => pushed,
            DirectBegin::Busy => self.push(frames), // never with `wait`
        }
    }

    /// Appends frames to the queue, or closes the connection (1008) if that would pass a bound.
    fn enqueue(&self, queue: &mut Queue, frames: &[Bytes]) -> Push {
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        if queue.frames.len() + frames.len() > QUEUE_MAX_FRAMES
            || queue.bytes + bytes > QUEUE_MAX_BYTES
        {
            self.overflow(queue)
        } else {
            queue.frames.extend(frames.iter().cloned());
            queue.bytes += bytes;
            Push::Queued
        }
    }

    /// Drops what is queued and closes the connection with 1008, naming the overflow.
    fn overflow(&self, queue: &mut Queue) -> Push {
        self.overflow_because(
            queue,
            &format!(
                "send queue overflow: client too slow (limit {QUEUE_MAX_FRAMES} frames / \
                 {QUEUE_MAX_BYTES} bytes)"
            ),
        )
    }

    /// Drops what is queued but the rest of a frame partly written, and closes the
    /// connection with 1008 and `reason`.
    fn overflow_because(&self, queue: &mut Queue, reason: &str) -> Push {
        cut_to_frame(&mut queue.frames, queue.front_partial);
        queue.bytes = queue.frames.iter().map(Bytes::len).sum();
        queue.stream = None;
        queue.close = Some(frame::close(frame::CLOSE_POLICY_VIOLATION, reason));
        self.overflowed.store(true, Ordering::Relaxed);
        Push::Overflowed
    }

    /// Queues a close frame after what is already queued; later pushes are refused.
    pub fn close(&self, code: u16, reason: &str) {
        {
            let mut queue = self.lock();
            if queue.close.is_some() {
                return;
            }
            queue.close = Some(frame::close(code, reason));
        }
        self.wake.notify_one();
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// The hub has stopped reading the client's messages.
    pub fn reader_ended(&self) {
        self.reading.store(false, Ordering::Relaxed);
    }

    /// The hub's reader stops and closes with `code`: it says so first, so a writer that
    /// ends with this close knows nobody is left reading (and spawns no grace for it).
    pub fn close_from_reader(&self, code: u16, reason: &str) {
        self.reader_ended();
        self.close(code, reason);
    }

    /// The writer task: sends queued frames (and, subscribed to `*`, the `stream`) until a
    /// close frame went out or the socket failed. `pace` sizes the coalescing window;
    /// `overflows` counts the overflows the writer finds itself (a stream position no longer
    /// kept, a socket that took nothing for [`WRITE_STALL_TIMEOUT`]).
    pub async fn write_loop(
        &self,
        mut socket: OwnedWriteHalf,
        pace: &Pace,
        stream: &Stream,
        overflows: &Counter,
    ) {
        self.lock().socket = Some(socket.as_ref().as_raw_fd());
        // Declared after `socket`, so dropped before it even when the task is dropped
        // unfinished (its runtime shutting down).
        let withdraw = Withdraw(self);
        let mut batch: VecDeque<Bytes> = VecDeque::new();
        let mut dead = false;
        loop {
            // Listen for appends before looking at the stream, so none is missed.
            let mut appended = std::pin::pin!(stream.appended.notified());
            let streaming = self.is_streaming();
            if streaming {
                appended.as_mut().enable();
            }
            // `partial`: the front of `batch` is the rest of a frame partly written.
            let (close, mut partial) = {
                let mut queue = self.lock();
                std::mem::swap(&mut queue.frames, &mut batch);
                let partial = std::mem::take(&mut queue.front_partial);
                queue.bytes = 0;
                if let Some(position) = queue.stream {
                    match stream.read(position, STREAM_BATCH_BYTES, &mut batch) {
                        Ok(next) => queue.stream = Some(next),
                        Err(Lagged) => {
                            cut_to_frame(&mut batch, partial);
                            if self.overflow(&mut queue) == Push::Overflowed {
                                overflows.inc();
                            }
                        }
                    }
                }
                queue.writing = !batch.is_empty() || queue.close.is_some();
                (queue.close.clone(), partial)
            };
            if batch.is_empty() && close.is_none() {
                if streaming {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = appended => {}
                    }
                } else {
                    self.wake.notified().await;
                }
                let last_write = self.lock().last_write;
                if let Some(at) = last_write {
                    let due = at + pace.window();
                    if Instant::now() < due {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                continue;
            }
            // Most writes complete at once, without a future. One the socket holds back waits
            // (watching the stream) in a box: inline, that state would grow every
            // connection's task. The writer's future (release build) was 480 bytes before the
            // watch, 688 with it inline, and is 416 this way (424 since the partial-frame flag).
            let result = match write_ready(&socket, &mut batch, &mut partial) {
                Ok(()) if batch.is_empty() => Ok(()),
                // A temporary, not a named local: a local would keep its room in this future.
                Ok(()) => {
                    Box::pin(self.write_held_back(
                        &socket,
                        &mut batch,
                        &mut partial,
                        stream,
                        overflows,
                    ))
                    .await
                }
                Err(error) => Err(error),
            };
            let written = Instant::now();
            self.wrote(&mut self.lock(), written);
            if result.is_err() {
                dead = true;
                break;
            }
            if batch.capacity() > IDLE_QUEUE_SLOTS {
                batch.shrink_to(IDLE_QUEUE_SLOTS);
            }
            if let Some(close) = close {
                let _ = tokio::time::timeout(CLOSING_STALL_TIMEOUT, socket.write_all(&close)).await;
                let _ = socket.shutdown().await;
                break;
            }
            // Under heavy fan-out, wait out the window right away while frames gather: waiting
            // for the next change first and then for the rest of the window cost two wake-ups
            // per send. (Not when the sweeper writes the `*` connections.)
            let window = pace.window();
            if window >= SWEEP_MIN_WINDOW && !(self.is_streaming() && pace.stream_swept()) {
                tokio::time::sleep_until((written + window).into()).await;
            }
        }
        drop(withdraw);
        // Make sure producers stop queueing for a connection nobody writes any more.
        self.close(frame::CLOSE_GOING_AWAY, "connection ended");
        if self.reading.load(Ordering::Relaxed) {
            end_reading(socket, dead);
        }
    }

    /// Writes the rest of `batch`, which the socket held back, as it becomes writable.
    /// Meanwhile:
    /// - a `*` subscriber whose position the stream stops keeping overflows at once (counted,
    ///   close frame queued), not only when its client reads again;
    /// - a socket that takes nothing for [`WRITE_STALL_TIMEOUT`] overflows too (counted);
    /// - once the connection is closing, only the rest of a frame partly written is still owed,
    ///   so the batch is cut to it, and that rest may take [`CLOSING_STALL_TIMEOUT`]; then the
    ///   socket counts as dead (an error).
    async fn write_held_back(
        &self,
        socket: &OwnedWriteHalf,
        batch: &mut VecDeque<Bytes>,
        partial: &mut bool,
        stream: &Stream,
        overflows: &Counter,
    ) -> std::io::Result<()> {
        let mut progress = Instant::now();
        let mut closing_since: Option<Instant> = None;
        loop {
            let mut moved = std::pin::pin!(stream.moved.notified());
            moved.as_mut().enable();
            let mut woken = std::pin::pin!(self.wake.notified());
            woken.as_mut().enable();
            let streaming = {
                let mut queue = self.lock();
                let stalled = progress.elapsed() >= WRITE_STALL_TIMEOUT;
                if queue.close.is_none() {
                    let lagged = queue.stream.is_some_and(|at| !stream.keeps(at));
                    let overflowed = if lagged {
                        self.overflow(&mut queue)
                    } else if stalled {
                        let reason = format!(
                            "send queue overflow: client read nothing for {} s",
                            WRITE_STALL_TIMEOUT.as_secs()
                        );
                        self.overflow_because(&mut queue, &reason)
                    } else {
                        Push::Queued
                    };
                    if overflowed == Push::Overflowed {
                        overflows.inc();
                    }
                }
                if queue.close.is_some() {
                    queue.stream = None; // Closing: the stream is of no more use to it.
                    closing_since.get_or_insert_with(Instant::now);
                }
                queue.stream.is_some()
            };
            let deadline = match closing_since {
                Some(since) => {
                    cut_to_frame(batch, *partial);
                    if batch.is_empty() {
                        return Ok(());
                    }
                    since + CLOSING_STALL_TIMEOUT
                }
                None => progress + WRITE_STALL_TIMEOUT,
            };
            tokio::select! {
                ready = tokio::time::timeout_at(deadline.into(), socket.writable()) => {
                    match ready {
                        Ok(ready) => ready?,
                        Err(_) if closing_since.is_some() => {
                            return Err(std::io::ErrorKind::TimedOut.into());
                        }
                        Err(_) => continue, // Stalled: overflows, then waits for the rest.
                    }
                    // Writes take from the front only: any byte sent shows there.
                    let front = |batch: &VecDeque<Bytes>| (batch.len(), batch.front().map(Bytes::len));
                    let before = front(batch);
                    write_ready(socket, batch, partial)?;
                    if batch.is_empty() {
                        return Ok(());
                    }
                    if front(batch) != before {
                        progress = Instant::now();
                    }
                }
                _ = moved, if streaming => {}
                _ = woken => {}
            }
        }
    }

    /// The queue's lock: waited for when `wait`, else only if free.
    fn lock_or_try(&self, wait: bool) -> Option<std::sync::MutexGuard<'_, Queue>> {
        if wait {
            Some(self.lock())
        } else {
            self.try_lock()
        }
    }

    /// The queue's lock if nobody holds it now.
    fn try_lock(&self) -> Option<std::sync::MutexGuard<'_, Queue>> {
        match self.queue.try_lock() {
            Ok(queue) => Some(queue),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ends the hub's reading of a connection whose writer has ended while the client is silent:
/// at once when the socket is dead, else once the client has had [`CLOSE_REPLY_GRACE`] to
/// answer the close frame. Shutting the read side down makes the pending read see the end,
/// so a client that never answers cannot hold the connection (its descriptor and
/// subscriptions) open. The wait is a task of its own, made only then: no idle connection
/// carries its timer.
fn end_reading(socket: OwnedWriteHalf, dead: bool) {
    let shut = move || {
        // SAFETY: the descriptor belongs to `socket`, which keeps it open for the call.
        unsafe { libc::shutdown(socket.as_ref().as_raw_fd(), libc::SHUT_RD) };
    };
    if dead {
        shut();
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_REPLY_GRACE).await;
            shut();
        });
    }
}

/// Withdraws a writer's socket from direct writers and the sweeper when the writer ends,
/// returning or dropped: none may reach the descriptor once the socket is closed (and
/// perhaps reused for a new connection or a file). Taking the lock waits for a send in flight.
struct Withdraw<'a>(&'a Connection);

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.socket = None;
        queue.writing = true;
    }
}

/// The part of `frames` after their first `written` bytes, and whether its first element is
/// the rest of one cut by the write.
fn unwritten(frames: &[Bytes], written: usize) -> (Vec<Bytes>, bool) {
    let mut skip = written;
    let mut split = false;
    let mut rest = Vec::with_capacity(frames.len());
    for frame in frames {
        if skip >= frame.len() {
            skip -= frame.len();
        } else {
            split |= skip > 0;
            rest.push(frame.slice(skip..));
            skip = 0;
        }
    }
    (rest, split)
}

/// Keeps of `frames` only the rest of a frame partly written (its front, when `partial`):
/// every element ends on a frame boundary, so the stream stays whole.
fn cut_to_frame(frames: &mut VecDeque<Bytes>, partial: bool) {
    frames.truncate(usize::from(partial));
}

/// Removes the first `bytes` bytes of `frames`; `partial` tells whether the front is now
/// the rest of an element cut short (it stays as it was when nothing was removed).
fn drop_front(frames: &mut VecDeque<Bytes>, mut bytes: usize, partial: &mut bool) {
    while bytes > 0 {
        let Some(front) = frames.front_mut() else {
            break;
        };
        if front.len() <= bytes {
            bytes -= front.len();
            frames.pop_front();
            *partial = false;
        } else {
            let _ = front.split_to(bytes);
            bytes = 0;
            *partial = true;
        }
    }
}

/// [`writev_now`], counted in [`SOCKET_WRITES`] when it sent something.
fn write_now<'a>(socket: RawFd, frames: impl IntoIterator<Item = &'a Bytes>) -> usize {
    let written = writev_now(socket, frames);
    if written > 0 {
        SOCKET_WRITES.inc();
    }
    written
}

/// One non-blocking `writev` of (the first [`DIRECT_MAX_FRAMES`] of) `frames` to `socket`;
/// returns the bytes written, 0 when the socket would block or failed (the writer task then
/// meets the same condition and handles it). The caller holds the connection's queue lock.
pub(crate) fn writev_now<'a>(socket: RawFd, frames: impl IntoIterator<Item = &'a Bytes>) -> usize {
    let mut slices = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; DIRECT_MAX_FRAMES];
    let mut count = 0;
    for (slice, frame) in slices.iter_mut().zip(frames) {
        slice.iov_base = frame.as_ptr() as *mut libc::c_void;
        slice.iov_len = frame.len();
        count += 1;
    }
    // SAFETY: the first `count` iovecs point into `frames`, borrowed for the call; `socket` is the
    // writer's open, non-blocking descriptor (the caller holds the queue lock, under which the
    // writer withdraws it before closing).
    let written = unsafe { libc::writev(socket, slices.as_ptr(), count as libc::c_int) };
    written.max(0) as usize
}

/// Coalescing window per frame/s the hub delivers, up to [`WINDOW_KNEE_FRAME_RATE`]:
/// 200,000 frames/s (1,000 subscribers at 200 events/s) → 6 ms, 20,000 → 0.6 ms, 200 → 6 µs.
/// Measured with `flux-loadtest fanout --subscribers 1000 --rate 200` (perf/README, session
/// 20): 60 ns gave p99 13.7–14.2 ms, 45 ns 11.2–11.4, 35 ns 9.5–9.8, 30 ns 8.3–8.8 ms, every
/// frame delivered in each, for ~10 % more server CPU per event at 30 ns than at 35. (In
/// session 12, before the sweeper's batched sends, 40 ns saturated the machine.)
const WINDOW_PER_FRAME_RATE: Duration = Duration::from_nanos(30);
/// Past this rate the window grows by [`WINDOW_PER_FRAME_RATE_PAST_KNEE`] per frame/s, so
/// heavy fan-out keeps its few large sends: 1,000,000 frames/s (1,000 subscribers at 1,000
/// events/s) → 12 + 36 = 48 ms, near the 50 ms it had before the knee. 35 ns all the way (a
/// 35 ms window there) cost 0.224–0.254 µs of server CPU per frame against 0.196 with 50 ms.
const WINDOW_KNEE_FRAME_RATE: f64 = 400_000.0;
/// The window's growth per frame/s past [`WINDOW_KNEE_FRAME_RATE`].
const WINDOW_PER_FRAME_RATE_PAST_KNEE: Duration = Duration::from_nanos(60);
/// The longest a frame waits for company.
const WINDOW_MAX: Duration = Duration::from_millis(50);
/// From this window on, the sweeper writes the `*` connections (the window is then twice its
/// tick or more), and other writers sleep it out right after each send. Shorter windows are
/// below the timer's 1 ms tick; a writer then waits for the next change first, as a lone
/// subscriber must be written to at once.
pub const SWEEP_MIN_WINDOW: Duration = Duration::from_millis(2);

/// The coalescing window every writer uses, set from the hub's delivered-frame rate.
///
/// A writer that wrote less than a window ago waits out the rest before writing again, so each
/// connection gets at most one send per window. The window is proportional to the frame rate:
/// as fan-out grows, sends carry more frames and their total cost stays bounded, while a quiet
/// hub (or a lone subscriber) writes at once.
#[derive(Default)]
pub struct Pace {
    window_ns: AtomicU64,
    /// The hub hands the `*` connections to the sweeper (set per change).
    stream_swept: AtomicBool,
}

impl Pace {
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// Heavy fan-out: from a window of [`SWEEP_MIN_WINDOW`] on, the sweeper writes the `*`
    /// connections (`crate::sweep`), not their writer tasks.
    pub fn swept(&self) -> bool {
        self.window() >= SWEEP_MIN_WINDOW
    }

    /// Whether the last change's `*` connections were left to the sweeper.
    pub fn stream_swept(&self) -> bool {
        self.stream_swept.load(Ordering::Relaxed)
    }

    /// Records whether the hub leaves the `*` connections to the sweeper.
    pub fn set_stream_swept(&self, swept: bool) {
        if self.stream_swept() != swept {
            self.stream_swept.store(swept, Ordering::Relaxed);
        }
    }

    /// Sets the window for a hub delivering `frames_per_second`.
    pub fn update(&self, frames_per_second: f64) {
        let rate = frames_per_second.max(0.0);
        let nanos = (rate.min(WINDOW_KNEE_FRAME_RATE) * WINDOW_PER_FRAME_RATE.as_nanos() as f64
            + (rate - WINDOW_KNEE_FRAME_RATE).max(0.0)
                * WINDOW_PER_FRAME_RATE_PAST_KNEE.as_nanos() as f64)
            .min(WINDOW_MAX.as_nanos() as f64);
        self.window_ns.store(nanos as u64, Ordering::Relaxed);
    }
}

/// Writes what the socket takes of `batch` now, without waiting; `partial` follows its front.
fn write_ready(
    socket: &OwnedWriteHalf,
    batch: &mut VecDeque<Bytes>,
    partial: &mut bool,
) -> std::io::Result<()> {
    while !batch.is_empty() {
        let slices: Vec<IoSlice<'_>> = batch
            .iter()
            .take(WRITEV_MAX_FRAMES)
            .map(|b| IoSlice::new(b))
            .collect();
        let written = match socket.try_write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => written,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) => return Err(error),
        };
        SOCKET_WRITES.inc();
        drop_front(batch, written, partial);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that stops inside an element leaves its rest marked partial; cutting a batch
    /// keeps exactly that rest, so a close frame never follows a cut frame.
    #[test]
    fn the_rest_of_a_cut_frame_is_kept_and_marked() {
        let frames = [Bytes::from_static(b"aaaa"), Bytes::from_static(b"bbbb")];
        assert_eq!(unwritten(&frames, 0), (frames.to_vec(), false));
        assert_eq!(unwritten(&frames, 4), (frames[1..].to_vec(), false));
        let (rest, split) = unwritten(&frames, 6);
        assert_eq!((rest, split), (vec![Bytes::from_static(b"bb")], true));

        let mut batch: VecDeque<Bytes> = frames.iter().cloned().collect();
        let mut partial = false;
        drop_front(&mut batch, 0, &mut partial);
        assert!(!partial, "nothing written: the front stays as it was");
        drop_front(&mut batch, 1, &mut partial);
        assert!(partial);
        drop_front(&mut batch, 3, &mut partial);
        assert!(!partial, "the first frame went out whole");
        drop_front(&mut batch, 2, &mut partial);
        assert!(partial);
        let mut cut = batch.clone();
        cut.push_back(Bytes::from_static(b"cccc"));
        cut_to_frame(&mut cut, partial);
        assert_eq!(cut, [Bytes::from_static(b"bb")]);
        cut_to_frame(&mut cut, false);
        assert!(cut.is_empty());
    }

    #[test]
    fn window_follows_the_frame_rate() {
        let pace = Pace::default();
        assert_eq!(pace.window(), Duration::ZERO);
        pace.update(200_000.0);
        assert_eq!(pace.window(), Duration::from_millis(6));
        pace.update(400_000.0);
        assert_eq!(pace.window(), Duration::from_millis(12));
        pace.update(1_000_000.0);
        assert_eq!(pace.window(), Duration::from_millis(48));
        pace.update(1_100_000.0);
        assert_eq!(pace.window(), WINDOW_MAX);
        pace.update(1e9);
        assert_eq!(pace.window(), WINDOW_MAX);
        pace.update(0.0);
        assert_eq!(pace.window(), Duration::ZERO);
    }

    /// A connection with its writer task on one end of a loopback socket, and a task reading
    /// the other end to its close.
    struct Connected {
        conn: std::sync::Arc<Connection>,
        writer: tokio::task::JoinHandle<()>,
        reader: tokio::task::JoinHandle<Vec<u8>>,
    }

    async fn connected(stream: std::sync::Arc<Stream>) -> Connected {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (_read, write) = server.into_split();
        let conn = std::sync::Arc::new(Connection::new(1));
        let writer = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let pace = Pace::default();
                conn.write_loop(write, &pace, &stream, &Counter::default())
                    .await
            })
        };
        // Wait until the writer has handed its socket over.
        while conn.lock().socket.is_none() {
            tokio::task::yield_now().await;
        }
        // Read while pushing: a peer that stopped reading would fill the socket and then the
        // bounded queue, and the tests are about order, not overflow.
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.expect("read");
            received
        });
        Connected {
            conn,
            writer,
            reader,
        }
    }

    impl Connected {
        /// Closes the connection, waits for its writer, and checks that the peer received
        /// exactly `expected`, then the close frame.
        async fn close_and_expect(self, expected: &[u8]) {
            let Connected {
                conn,
                writer,
                reader,
            } = self;
            conn.close(frame::CLOSE_NORMAL, "");
            let received = reader.await.expect("reader");
            writer.await.expect("writer");
            assert!(
                received.len() > expected.len(),
                "the close frame follows the data"
            );
            assert_eq!(
                String::from_utf8_lossy(&received[..expected.len()]),
                String::from_utf8_lossy(expected)
            );
        }
    }

    /// Direct writes and queued writes interleave without reordering, idle or busy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_frames_arrive_in_push_order() {
        let connected = connected(std::sync::Arc::new(Stream::default())).await;
        let conn = connected.conn.clone();
        let mut expected = Vec::new();
        // Fewer frames than the queue holds, so no scheduling delay of the writer can overflow.
        const FRAMES: u32 = 12_000;
        const _: () = assert!((FRAMES as usize) < QUEUE_MAX_FRAMES);
        for i in 0..FRAMES {
            let frame = Bytes::from(format!("{i:08}"));
            expected.extend_from_slice(&frame);
            let pushed = if i % 3 == 0 {
                conn.push(std::slice::from_ref(&frame))
            } else {
                conn.push_direct(std::slice::from_ref(&frame), Duration::ZERO)
            };
            assert_eq!(pushed, Push::Queued);
        }
        connected.close_and_expect(&expected).await;
        assert!(
            conn.lock().socket.is_none(),
            "the socket is withdrawn before it closes"
        );
    }

    /// A `*` connection: frames queued before it started streaming come first, then the stream
    /// in order (written directly or by the writer), and after it stops streaming its unsent
    /// remainder precedes frames pushed later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_frames_keep_their_order_around_queued_ones() {
        let stream = std::sync::Arc::new(Stream::default());
        let connected = connected(stream.clone()).await;
        let conn = &connected.conn;
        let mut expected = Vec::new();
        let mut next = 0u32;
        let mut next_frame = || {
            next += 1;
            Bytes::from(format!("<{next:07}>"))
        };
        // Appended before the subscription: never sent to it.
        stream.append(&[next_frame()]);
        let early = next_frame();
        assert_eq!(conn.push(std::slice::from_ref(&early)), Push::Queued);
        expected.extend_from_slice(&early);
        conn.start_stream(stream.end());
        for i in 0..6_000 {
            let f = next_frame();
            expected.extend_from_slice(&f);
            let at = stream.append(std::slice::from_ref(&f));
            if i % 2 == 0 {
                conn.stream_direct(&stream, std::slice::from_ref(&f), at, Duration::ZERO);
            } else {
                stream.appended.notify_waiters();
            }
            if i % 1000 == 999 {
                tokio::task::yield_now().await;
            }
        }
        // Let the writer drain and wait, then append without waking it: stopping must queue
        // that remainder ahead of what follows.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..100 {
            let f = next_frame();
            expected.extend_from_slice(&f);
            stream.append(std::slice::from_ref(&f));
        }
        assert_eq!(conn.stop_stream(&stream), Push::Queued);
        stream.append(&[next_frame()]); // not streaming any more: never sent
        for _ in 0..100 {
            let f = next_frame();
            expected.extend_from_slice(&f);
            assert_eq!(conn.push(std::slice::from_ref(&f)), Push::Queued);
        }
        connected.close_and_expect(&expected).await;
    }

    /// A sweep sender using io_uring (if the kernel allows) or `writev`.
    fn sweep_sender(io_uring: bool) -> crate::sweep::Sender {
        if !io_uring {
            return crate::sweep::Sender::without_io_uring();
        }
        let sender = crate::sweep::Sender::new();
        if !sender.uses_io_uring() {
            eprintln!("io_uring is not available here: both runs use writev");
        }
        sender
    }

    /// One sweep of one connection, as the sweeper makes it (without a window).
    fn sweep_once(conn: &Connection, stream: &Stream, sender: &mut crate::sweep::Sender) {
        sweep_once_within(conn, stream, sender, Duration::ZERO);
    }

    /// One sweep of one connection with a coalescing `window`.
    fn sweep_once_within(
        conn: &Connection,
        stream: &Stream,
        sender: &mut crate::sweep::Sender,
        window: Duration,
    ) {
        let now = Instant::now();
        let writes: Vec<_> = conn.sweep_begin(stream, now, window).into_iter().collect();
        sender.send(writes, now);
    }

    /// Three connections on one stream, for batched sends.
    async fn three_connected() -> (Connected, Connected, Connected) {
        let stream = std::sync::Arc::new(Stream::default());
        (
            connected(stream.clone()).await,
            connected(stream.clone()).await,
            connected(stream).await,
        )
    }

    /// Begins the first connection's write (waiting for its lock), finds the second `Busy`
    /// while its lock is held elsewhere, begins the second's and third's without waiting, and
    /// sends the three as one batch; their outcomes.
    fn send_three<'a>(
        [a, b, c]: [&'a Connection; 3],
        sender: &mut crate::sweep::Sender,
        begin: impl Fn(&'a Connection, bool) -> DirectBegin<'a>,
    ) -> Vec<Push> {
        let DirectBegin::Write(to_a) = begin(a, true) else {
            panic!("an idle connection is written directly");
        };
        let held = b.lock();
        assert!(matches!(begin(b, false), DirectBegin::Busy));
        drop(held);
        let mut batch = vec![to_a];
        for conn in [b, c] {
            match begin(conn, false) {
                DirectBegin::Write(write) => batch.push(write),
                _ => panic!("an idle connection is written directly"),
            }
        }
        let mut outcomes = Vec::new();
        sender.send_direct(&mut batch, |pushed| outcomes.push(pushed));
        outcomes
    }

    /// A change's direct writes to several connections go out in one submission (or one
    /// `writev` each), in order with what is queued behind them; a held lock is not waited for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_go_out_in_one_submission_and_a_busy_lock_is_not_waited_for() {
        for io_uring in [true, false] {
            let (a, b, c) = three_connected().await;
            let mut sender = sweep_sender(io_uring);
            let first = [Bytes::from_static(b"<one>"), Bytes::from_static(b"<two>")];
            let conns = [&*a.conn, &*b.conn, &*c.conn];
            let outcomes = send_three(conns, &mut sender, |conn, wait| {
                conn.direct_begin(&first, Duration::ZERO, wait)
            });
            assert_eq!(outcomes, [Push::Queued; 3]);
            // Within its window a connection is not idle: the next change is queued behind.
            let second = [Bytes::from_static(b"<three>")];
            assert!(matches!(
                a.conn.direct_begin(&second, Duration::from_secs(60), true),
                DirectBegin::Done(Push::Queued)
            ));
            a.close_and_expect(b"<one><two><three>").await;
            b.close_and_expect(b"<one><two>").await;
            c.close_and_expect(b"<one><two>").await;
        }
    }

    /// A writer task dropped unfinished (as its runtime shuts down) withdraws its socket: no
    /// direct write, flush or sweep may reach a descriptor that is closed or reused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_writer_withdraws_its_socket() {
        let stream = std::sync::Arc::new(Stream::default());
        let connected = connected(stream.clone()).await;
        let conn = connected.conn.clone();
        assert!(
            conn.lock().socket.is_some(),
            "registered while the writer runs"
        );
        connected.writer.abort();
        assert!(connected.writer.await.is_err_and(|e| e.is_cancelled()));
        assert!(conn.lock().socket.is_none());
        let frames = [Bytes::from_static(b"<late>")];
        assert!(!matches!(
            conn.direct_begin(&frames, Duration::ZERO, true),
            DirectBegin::Write(_)
        ));
        assert!(!matches!(
            conn.flush_begin(Duration::ZERO, true),
            DirectBegin::Write(_)
        ));
    }

    /// A helper's flushes of quietly queued frames go out in one submission (or one `writev`
    /// each), ahead of what is queued after them; a held lock is not waited for; a connection
    /// within its window, or with more queued than one write takes, is left to its writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushes_go_out_in_one_submission_and_leave_the_rest_to_the_writer() {
        for io_uring in [true, false] {
            let (a, b, c) = three_connected().await;
            let mut sender = sweep_sender(io_uring);
            let first = [Bytes::from_static(b"<one>"), Bytes::from_static(b"<two>")];
            for connected in [&a, &b, &c] {
                assert_eq!(connected.conn.push_quiet(&first), Push::Queued);
            }
            let conns = [&*a.conn, &*b.conn, &*c.conn];
            let outcomes = send_three(conns, &mut sender, |conn, wait| {
                conn.flush_begin(Duration::ZERO, wait)
            });
            assert_eq!(outcomes, [Push::Queued; 3]);
            // Nothing left to flush: the writer (or an earlier flush) sent it.
            assert!(matches!(
                a.conn.flush_begin(Duration::ZERO, true),
                DirectBegin::Done(Push::Queued)
            ));
            // A change after a quiet push is queued behind it; within its window, the flush
            // leaves both to the writer.
            assert_eq!(
                a.conn.push_quiet(&[Bytes::from_static(b"<three>")]),
                Push::Queued
            );
            assert!(matches!(
                a.conn
                    .direct_begin(&[Bytes::from_static(b"<four>")], Duration::ZERO, true),
                DirectBegin::Done(Push::Queued)
            ));
            assert!(matches!(
                a.conn.flush_begin(Duration::from_secs(60), true),
                DirectBegin::Done(Push::Queued)
            ));
            // More queued than one write takes: the writer sends it all.
            let mut many = Vec::new();
            for i in 0..=DIRECT_MAX_FRAMES {
                let frame = Bytes::from(format!("<{i}>"));
                many.extend_from_slice(&frame);
                assert_eq!(
                    b.conn.push_quiet(std::slice::from_ref(&frame)),
                    Push::Queued
                );
            }
            assert!(matches!(
                b.conn.flush_begin(Duration::ZERO, true),
                DirectBegin::Done(Push::Queued)
            ));
            a.close_and_expect(b"<one><two><three><four>").await;
            b.close_and_expect(&[&b"<one><two>"[..], &many].concat())
                .await;
            c.close_and_expect(b"<one><two>").await;
        }
    }

    /// Sweeps (as one io_uring submission, or one `writev` each) and the writer task take turns
    /// on a `*` connection: the stream arrives whole and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweeps_and_the_writer_send_the_stream_in_order() {
        for io_uring in [true, false] {
            let stream = std::sync::Arc::new(Stream::default());
            let connected = connected(stream.clone()).await;
            let conn = &connected.conn;
            let mut sender = sweep_sender(io_uring);
            conn.start_stream(stream.end());
            let mut expected = Vec::new();
            for i in 0..6_000u32 {
                let frame = Bytes::from(format!("<{i:07}>"));
                expected.extend_from_slice(&frame);
                stream.append(std::slice::from_ref(&frame));
                if i % 3 == 0 {
                    stream.appended.notify_waiters();
                } else {
                    sweep_once(conn, &stream, &mut sender);
                }
                if i % 500 == 499 {
                    tokio::task::yield_now().await;
                }
            }
            // Whatever neither sent yet goes out with the last wake.
            stream.appended.notify_waiters();
            tokio::time::sleep(Duration::from_millis(100)).await;
            connected.close_and_expect(&expected).await;
        }
    }

    /// A `*` connection far behind gets a whole batch per sweep without waiting its window
    /// between them: a backlog drains in consecutive sweeps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_drains_in_consecutive_sweeps() {
        let stream = std::sync::Arc::new(Stream::default());
        let connected = connected(stream.clone()).await;
        let conn = &connected.conn;
        let mut sender = sweep_sender(true);
        conn.start_stream(stream.end());
        // Let the writer, woken by the subscription, find nothing and wait again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut expected = Vec::new();
        // 1 MiB behind: four batches.
        for i in 0..1024u32 {
            let frame = Bytes::from(format!("<{i:07}>").repeat(128));
            expected.extend_from_slice(&frame);
            stream.append(std::slice::from_ref(&frame));
        }
        // A window far longer than the test: a batch per window would leave it behind. (A
        // socket that takes only part of a batch hands the rest to the writer, which then
        // goes on reading the stream itself: caught up either way.)
        let window = Duration::from_secs(60);
        for _ in 0..100 {
            if conn.lock().stream == Some(stream.end()) {
                break;
            }
            sweep_once_within(conn, &stream, &mut sender, window);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            conn.lock().stream,
            Some(stream.end()),
            "caught up within the window"
        );
        connected.close_and_expect(&expected).await;
    }

    /// A `*` connection whose client reads nothing: sweeps fill its socket without ever
    /// blocking (what the socket refuses goes to the writer), and once the stream drops its
    /// position the writer closes it as overflowed, while still stuck on the full socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_client_never_blocks_a_sweep_and_overflows() {
        for io_uring in [true, false] {
            let stream = std::sync::Arc::new(Stream::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let _stalled = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .await
                .expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            let (_read, write) = server.into_split();
            let conn = std::sync::Arc::new(Connection::new(1));
            let overflows = std::sync::Arc::new(Counter::default());
            let writer = {
                let (conn, stream, overflows) = (conn.clone(), stream.clone(), overflows.clone());
                tokio::spawn(async move {
                    let pace = Pace::default();
                    conn.write_loop(write, &pace, &stream, &overflows).await
                })
            };
            while conn.lock().socket.is_none() {
                tokio::task::yield_now().await;
            }
            conn.start_stream(stream.end());
            let mut sender = sweep_sender(io_uring);
            let frame = frame::encode(frame::OPCODE_TEXT, &[b'x'; 60_000]);
            // Twice what the stream keeps: far more than any socket buffer takes.
            let appends = 2 * crate::stream::KEEP_BYTES as usize / frame.len();
            for _ in 0..appends {
                stream.append(std::slice::from_ref(&frame));
                sweep_once(&conn, &stream, &mut sender);
                tokio::task::yield_now().await;
            }
            // Nobody wakes the writer for the stream here (as under heavy fan-out): the
            // appends themselves make it notice its position is gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !conn.overflowed() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                conn.overflowed(),
                "io_uring {io_uring}: the stalled connection overflowed"
            );
            assert_eq!(overflows.get(), 1, "io_uring {io_uring}: counted once");
            assert!(conn.is_closing());
            writer.abort();
        }
    }

    /// Frames queued quietly for a helper (`push_quiet`, then `flush_begin` on a blocking
    /// thread, as the hub splits a change's direct writes) keep their order with the direct and
    /// queued pushes made meanwhile, and every one arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quiet_pushes_flushed_by_a_helper_keep_their_order() {
        let connected = connected(std::sync::Arc::new(Stream::default())).await;
        let conn = &connected.conn;
        let mut expected = Vec::new();
        let mut helpers = Vec::new();
        for i in 0..3_000u32 {
            let frame = Bytes::from(format!("<{i:07}>"));
            expected.extend_from_slice(&frame);
            let frames = std::slice::from_ref(&frame);
            match i % 3 {
                0 => {
                    assert_eq!(conn.push_quiet(frames), Push::Queued);
                    let conn = conn.clone();
                    helpers.push(tokio::task::spawn_blocking(move || {
                        let mut sender = sweep_sender(false);
                        if let DirectBegin::Write(write) = conn.flush_begin(Duration::ZERO, true) {
                            sender.send_direct(&mut vec![write], |_| {});
                        }
                    }));
                }
                1 => assert_eq!(conn.push_direct(frames, Duration::ZERO), Push::Queued),
                _ => assert_eq!(conn.push(frames), Push::Queued),
            }
            if i % 500 == 499 {
                tokio::task::yield_now().await;
            }
        }
        for helper in helpers {
            helper.await.expect("helper");
        }
        connected.close_and_expect(&expected).await;
    }

    #[test]
    fn overflow_closes_with_1008_and_refuses_more() {
        let conn = Connection::new(1);
        let frame = Bytes::from_static(b"0123456789");
        for _ in 0..QUEUE_MAX_FRAMES {
            assert_eq!(conn.push(std::slice::from_ref(&frame)), Push::Queued);
        }
        assert_eq!(conn.push(std::slice::from_ref(&frame)), Push::Overflowed);
        assert!(conn.overflowed() && conn.is_closing());
        assert_eq!(conn.push(std::slice::from_ref(&frame)), Push::Closed);
        let queue = conn.queue.lock().expect("lock");
        assert!(
            queue.frames.is_empty(),
            "queued frames are dropped on overflow"
        );
        let close = queue.close.as_ref().expect("close frame");
        assert_eq!(&close[2..4], &1008u16.to_be_bytes());
    }
}
