//! One WebSocket connection: its bounded send queue, and the reader and writer tasks.
//!
//! Invariants:
//! - The send queue holds shared frame handles ([`Bytes`]), never copies. It is bounded by
//!   [`QUEUE_MAX_FRAMES`] and [`QUEUE_MAX_BYTES`]; a push past either bound drops what is
//!   queued and closes the connection with 1008 and a reason naming the overflow. Producers
//!   (whatever thread applied the change) never wait on a connection.
//! - Only the writer task writes to the socket. It takes everything queued at once and sends it
//!   with vectored writes, so a burst costs few syscalls. A writer that wrote very recently waits
//!   out a short window first ([`Pace`]): the window grows with the rate of frames the hub
//!   delivers, so heavy fan-out sends many frames per syscall while a lone subscriber is written
//!   to at once. One small loopback send costs ~6–7 µs of CPU here whatever its size
//!   (`loopback_probe`), so frames per send is what bounds fan-out CPU per frame.
//! - A producer may write a change straight to the socket instead ([`Connection::push_direct`]),
//!   saving the hand-off to the writer task (a thread wake-up, tens of µs in a VM) — but only when
//!   nothing is queued, the writer holds no batch, and the window since the last write has passed,
//!   so frames still leave in push order. That write is non-blocking and made under the queue
//!   lock; whatever the socket does not take is queued for the writer. The writer withdraws the
//!   socket (under the same lock) before it is closed, so a direct write never reaches a reused
//!   descriptor.
//! - Once a close frame is queued, nothing more is accepted; the writer sends it and shuts the
//!   socket down.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::frame;

/// Most frames a connection may have queued before it is closed as too slow.
pub const QUEUE_MAX_FRAMES: usize = 16_384;
/// Most bytes of frames a connection may have queued before it is closed as too slow.
pub const QUEUE_MAX_BYTES: usize = 8 << 20;
/// Frames handed to one `writev` call.
const WRITEV_MAX_FRAMES: usize = 256;
/// A socket that accepts no bytes for this long is treated as dead and dropped.
pub const WRITE_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A drained queue keeping more slots than this gives the memory back.
const IDLE_QUEUE_SLOTS: usize = 64;

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
    /// The close frame to send after `frames`; once set, nothing else is queued.
    close: Option<Bytes>,
    /// The socket, while the writer task owns it (for direct writes).
    socket: Option<RawFd>,
    /// The writer task holds a batch it has not finished writing.
    writing: bool,
    /// When bytes last went to the socket.
    last_write: Option<Instant>,
}

/// Frames one direct write hands to `writev`.
const DIRECT_MAX_FRAMES: usize = 16;

/// The shared half of a connection: producers push, the writer drains.
pub struct Connection {
    pub id: u64,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Set when the connection overflowed (for metrics and tests).
    overflowed: AtomicBool,
}

impl Connection {
    pub fn new(id: u64) -> Self {
        Connection {
            id,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            overflowed: AtomicBool::new(false),
        }
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

    /// Like [`Connection::push`], but writes the frames to the socket at once when the
    /// connection is idle (nothing queued, no write in flight, none within `window`).
    pub fn push_direct(&self, frames: &[Bytes], window: Duration) -> Push {
        let outcome = {
            let mut queue = self.lock();
            if queue.close.is_some() {
                return Push::Closed;
            }
            let now = Instant::now();
            let idle = queue.frames.is_empty()
                && !queue.writing
                && queue
                    .last_write
                    .is_none_or(|at| now.duration_since(at) >= window);
            let written = match queue.socket {
                Some(socket) if idle => write_now(socket, frames),
                _ => 0,
            };
            if written > 0 {
                queue.last_write = Some(now);
            }
            if written == frames.iter().map(Bytes::len).sum::<usize>() {
                return Push::Queued;
            }
            // What the socket did not take (rare: a full socket buffer or a failed write).
            let mut skip = written;
            let mut rest = Vec::with_capacity(frames.len());
            for frame in frames {
                if skip >= frame.len() {
                    skip -= frame.len();
                } else {
                    rest.push(frame.slice(skip..));
                    skip = 0;
                }
            }
            self.enqueue(&mut queue, &rest)
        };
        self.wake.notify_one();
        outcome
    }

    /// Appends frames to the queue, or closes the connection (1008) if that would pass a bound.
    fn enqueue(&self, queue: &mut Queue, frames: &[Bytes]) -> Push {
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        if queue.frames.len() + frames.len() > QUEUE_MAX_FRAMES
            || queue.bytes + bytes > QUEUE_MAX_BYTES
        {
            queue.frames = VecDeque::new();
            queue.bytes = 0;
            let reason = format!(
                "send queue overflow: client too slow (limit {QUEUE_MAX_FRAMES} frames / \
                 {QUEUE_MAX_BYTES} bytes)"
            );
            queue.close = Some(frame::close(frame::CLOSE_POLICY_VIOLATION, &reason));
            self.overflowed.store(true, Ordering::Relaxed);
            Push::Overflowed
        } else {
            queue.frames.extend(frames.iter().cloned());
            queue.bytes += bytes;
            Push::Queued
        }
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

    /// The writer task: sends queued frames until a close frame went out or the socket failed.
    /// `pace` sizes the coalescing window.
    pub async fn write_loop(&self, mut socket: OwnedWriteHalf, pace: &Pace) {
        self.lock().socket = Some(socket.as_ref().as_raw_fd());
        let mut batch: VecDeque<Bytes> = VecDeque::new();
        loop {
            let close = {
                let mut queue = self.lock();
                std::mem::swap(&mut queue.frames, &mut batch);
                queue.bytes = 0;
                queue.writing = !batch.is_empty() || queue.close.is_some();
                queue.close.clone()
            };
            if batch.is_empty() && close.is_none() {
                self.wake.notified().await;
                let last_write = self.lock().last_write;
                if let Some(at) = last_write {
                    let due = at + pace.window();
                    if Instant::now() < due {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                continue;
            }
            let result = write_all(&mut socket, &mut batch).await;
            self.lock().last_write = Some(Instant::now());
            if result.is_err() {
                break;
            }
            if batch.capacity() > IDLE_QUEUE_SLOTS {
                batch.shrink_to(IDLE_QUEUE_SLOTS);
            }
            if let Some(close) = close {
                let _ = tokio::time::timeout(WRITE_STALL_TIMEOUT, socket.write_all(&close)).await;
                let _ = socket.shutdown().await;
                break;
            }
        }
        // No direct write may reach the descriptor once the socket is dropped (and perhaps
        // reused by a new connection).
        {
            let mut queue = self.lock();
            queue.socket = None;
            queue.writing = true;
        }
        // Make sure producers stop queueing for a connection nobody writes any more.
        self.close(frame::CLOSE_GOING_AWAY, "connection ended");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One non-blocking `writev` of (the first [`DIRECT_MAX_FRAMES`] of) `frames` to `socket`;
/// returns the bytes written, 0 when the socket would block or failed (the writer task then
/// meets the same condition and handles it).
fn write_now(socket: RawFd, frames: &[Bytes]) -> usize {
    let mut slices = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; DIRECT_MAX_FRAMES];
    let count = frames.len().min(DIRECT_MAX_FRAMES);
    for (slice, frame) in slices.iter_mut().zip(frames) {
        slice.iov_base = frame.as_ptr() as *mut libc::c_void;
        slice.iov_len = frame.len();
    }
    // SAFETY: the first `count` iovecs point into `frames`, alive for the call; `socket` is the
    // writer's open, non-blocking descriptor (the caller holds the queue lock, under which the
    // writer withdraws it before closing).
    let written = unsafe { libc::writev(socket, slices.as_ptr(), count as libc::c_int) };
    written.max(0) as usize
}

/// Coalescing window per frame/s the hub delivers: 200,000 frames/s (1,000 subscribers at
/// 200 events/s) → 12 ms, 20,000 → 1.2 ms, 200 → 12 µs; 1,000,000 → the 50 ms cap.
/// Measured with `flux-loadtest fanout --subscribers 1000 --rate 200`: 40 ns gave ~2 frames per
/// send and a saturated machine (p99 28–42 ms), 60 ns p99 16 ms, 100 ns p99 23 ms.
const WINDOW_PER_FRAME_RATE: Duration = Duration::from_nanos(60);
/// The longest a frame waits for company.
const WINDOW_MAX: Duration = Duration::from_millis(50);

/// The coalescing window every writer uses, set from the hub's delivered-frame rate.
///
/// A writer that wrote less than a window ago waits out the rest before writing again, so each
/// connection gets at most one send per window. The window is proportional to the frame rate:
/// as fan-out grows, sends carry more frames and their total cost stays bounded, while a quiet
/// hub (or a lone subscriber) writes at once.
#[derive(Default)]
pub struct Pace {
    window_ns: AtomicU64,
}

impl Pace {
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// Sets the window for a hub delivering `frames_per_second`.
    pub fn update(&self, frames_per_second: f64) {
        let nanos = (frames_per_second.max(0.0) * WINDOW_PER_FRAME_RATE.as_nanos() as f64)
            .min(WINDOW_MAX.as_nanos() as f64);
        self.window_ns.store(nanos as u64, Ordering::Relaxed);
    }
}

/// Writes every frame of `batch` with vectored writes, draining it.
async fn write_all(
    socket: &mut OwnedWriteHalf,
    batch: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !batch.is_empty() {
        let written = {
            let slices: Vec<IoSlice<'_>> = batch
                .iter()
                .take(WRITEV_MAX_FRAMES)
                .map(|b| IoSlice::new(b))
                .collect();
            tokio::time::timeout(WRITE_STALL_TIMEOUT, socket.write_vectored(&slices))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let Some(front) = batch.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                batch.pop_front();
            } else {
                let _ = front.split_to(left);
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_the_frame_rate() {
        let pace = Pace::default();
        assert_eq!(pace.window(), Duration::ZERO);
        pace.update(200_000.0);
        assert_eq!(pace.window(), Duration::from_millis(12));
        pace.update(1e9);
        assert_eq!(pace.window(), WINDOW_MAX);
        pace.update(0.0);
        assert_eq!(pace.window(), Duration::ZERO);
    }

    /// Direct writes and queued writes interleave without reordering, idle or busy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_frames_arrive_in_push_order() {
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
        let pace = std::sync::Arc::new(Pace::default());
        let writer = {
            let (conn, pace) = (conn.clone(), pace.clone());
            tokio::spawn(async move { conn.write_loop(write, &pace).await })
        };
        // Wait until the writer has handed its socket over.
        while conn.lock().socket.is_none() {
            tokio::task::yield_now().await;
        }
        // Read while pushing: a peer that stopped reading would fill the socket and then the
        // bounded queue, and the test is about order, not overflow.
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.expect("read");
            received
        });
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
        conn.close(frame::CLOSE_NORMAL, "");
        let received = reader.await.expect("reader");
        writer.await.expect("writer");
        assert!(
            received.len() > expected.len(),
            "the close frame follows the data"
        );
        assert_eq!(&received[..expected.len()], &expected[..]);
        assert!(
            conn.lock().socket.is_none(),
            "the socket is withdrawn before it closes"
        );
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
