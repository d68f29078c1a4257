//! The all-stream: the frames of every change, appended once for the connections subscribed to
//! `*`, which read it at their own position.
//!
//! With a thousand `*` subscribers, queueing a handle per frame on every connection costs a
//! lock, a queue slot and two reference-count updates per frame *per connection* (about a fifth
//! of the server's CPU at 1,000,000 frames/s). Here a frame costs one copy into the stream,
//! and a connection's writer takes all it has not sent yet as one slice per chunk: contiguous
//! bytes, so one `writev` entry carries dozens of frames.
//!
//! Invariants:
//! - The stream is one byte sequence of whole server frames; a position is a byte offset into
//!   it. Bytes are stored in chunks ([`CHUNK_BYTES`], or one larger frame alone); a frame never
//!   spans chunks, so every chunk boundary and the stream's end are frame boundaries.
//! - Appends are serialized by the stream's lock. A chunk's bytes below its published length
//!   are never written again; an append writes past it and then publishes the new length
//!   (release), so readers (acquire) see whole frames only.
//! - The stream keeps at least the last [`KEEP_BYTES`] bytes. A reader whose position fell
//!   behind what is kept has lagged: its connection is closed (1008), as an overflowing queue
//!   would be, and its writer checks this whenever chunks are dropped while a full socket
//!   holds it back.
//!   What a reader took stays alive while it holds it (the chunk is shared), so a writer
//!   stuck on a full socket keeps at most one batch, not the stream. When the last `*`
//!   subscriber leaves, the stream lets go of every chunk ([`Stream::release`]).

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Bytes of one chunk (a frame larger than this gets a chunk of its own size).
pub const CHUNK_BYTES: usize = 64 << 10;
/// The stream keeps at least this many of its newest bytes for readers behind the head.
pub const KEEP_BYTES: u64 = crate::connection::QUEUE_MAX_BYTES as u64;

/// A fixed-size buffer filled front to back, read concurrently below its published length.
struct Chunk {
    /// Stream position of the chunk's first byte.
    start: u64,
    data: NonNull<u8>,
    capacity: usize,
    /// Bytes written and published; never decreases.
    len: AtomicUsize,
}

// SAFETY: the buffer is owned by the chunk. Bytes below `len` are immutable once published,
// and bytes above it are written only by the appender, which holds the stream's lock.
unsafe impl Send for Chunk {}
// SAFETY: as above; readers only read below the `len` they loaded with acquire ordering.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(start: u64, capacity: usize) -> Chunk {
        let buffer: Box<[u8]> = vec![0u8; capacity].into_boxed_slice();
        let data = NonNull::new(Box::into_raw(buffer).cast::<u8>()).expect("a box is not null");
        Chunk {
            start,
            data,
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    fn room(&self) -> usize {
        self.capacity - self.len.load(Ordering::Relaxed)
    }

    /// Copies `frame` in after the published bytes, then publishes it. The caller holds the
    /// stream's lock and checked that it fits.
    fn push(&self, frame: &[u8]) {
        let len = self.len.load(Ordering::Relaxed);
        debug_assert!(len + frame.len() <= self.capacity);
        // SAFETY: `len + frame.len() <= capacity` (checked by the caller); the range is above
        // the published length, so no reader looks at it, and only the lock holder writes.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), self.data.as_ptr().add(len), frame.len());
        }
        self.len.store(len + frame.len(), Ordering::Release);
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.data.as_ptr(), self.capacity);
        // SAFETY: `data` came from `Box::into_raw` of a boxed slice of `capacity` bytes, and
        // nothing else frees it.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// A published range of a chunk, shared as [`Bytes`] without copying.
struct Slice {
    chunk: Arc<Chunk>,
    from: usize,
    to: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `to` is at most a published length of the chunk (loaded with acquire), so
        // the range is initialized and never written again; the `Arc` keeps it alive.
        unsafe {
            std::slice::from_raw_parts(self.chunk.data.as_ptr().add(self.from), self.to - self.from)
        }
    }
}

/// A reader's position is older than anything the stream keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

/// The stream of frames for `*` subscribers.
pub struct Stream {
    chunks: Mutex<VecDeque<Arc<Chunk>>>,
    /// Position after the last published byte.
    end: AtomicU64,
    /// Woken after every append: writers of `*` connections that have nothing left to send.
    /// Under heavy fan-out the hub leaves it to the sweeper (`crate::sweep`).
    pub appended: tokio::sync::Notify,
    /// Woken by an append that dropped old chunks: writers held back by a full socket, to
    /// check that their position is still kept (else they overflow at once).
    pub moved: tokio::sync::Notify,
}

impl Default for Stream {
    fn default() -> Self {
        Stream {
            chunks: Mutex::new(VecDeque::new()),
            end: AtomicU64::new(0),
            appended: tokio::sync::Notify::new(),
            moved: tokio::sync::Notify::new(),
        }
    }
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Chunk>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Position after the last published byte: where a new reader starts.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Appends `frames` (in order) and drops chunks no longer needed to keep [`KEEP_BYTES`];
    /// returns the position of the first appended byte. Wakes [`Stream::moved`] when it
    /// dropped a chunk, never [`Stream::appended`].
    pub fn append(&self, frames: &[Bytes]) -> u64 {
        let (start, dropped) = self.append_locked(frames);
        if dropped {
            self.moved.notify_waiters();
        }
        start
    }

    /// [`Stream::append`] under the lock; also says whether a chunk was dropped.
    fn append_locked(&self, frames: &[Bytes]) -> (u64, bool) {
        let mut chunks = self.lock();
        let start = self.end.load(Ordering::Relaxed);
        let mut end = start;
        for frame in frames.iter().filter(|f| !f.is_empty()) {
            if chunks.back().is_none_or(|c| c.room() < frame.len()) {
                let capacity = CHUNK_BYTES.max(frame.len());
                chunks.push_back(Arc::new(Chunk::new(end, capacity)));
            }
            chunks.back().expect("a chunk with room").push(frame);
            end += frame.len() as u64;
        }
        self.end.store(end, Ordering::Release);
        let mut dropped = false;
        while chunks.len() > 1 && end - chunks[1].start >= KEEP_BYTES {
            chunks.pop_front();
            dropped = true;
        }
        (start, dropped)
    }

    /// Drops every chunk: the last `*` subscriber left (the caller holds the index's write
    /// lock, so nobody appends or starts reading meanwhile). Positions go on from the end; a
    /// reader still finishing reads nothing more.
    pub fn release(&self) {
        self.lock().clear();
    }

    /// Whether a reader at `position` has not lagged: the stream still keeps it (or keeps
    /// nothing, having been released).
    pub fn keeps(&self, position: u64) -> bool {
        self.lock()
            .front()
            .is_none_or(|first| position >= first.start)
    }

    /// Takes the published bytes from `from` on, at most about `max_bytes` (whole chunks past
    /// the first, so the batch ends on a frame boundary), as shared slices appended to `out`.
    /// Returns the position after them.
    pub fn read(
        &self,
        from: u64,
        max_bytes: usize,
        out: &mut impl Extend<Bytes>,
    ) -> Result<u64, Lagged> {
        let chunks = self.lock();
        let Some(first) = chunks.front() else {
            return Ok(from);
        };
        if from < first.start {
            return Err(Lagged);
        }
        let mut at = chunks.partition_point(|c| c.start <= from) - 1;
        let mut position = from;
        let mut taken = 0usize;
        while let Some(chunk) = chunks.get(at) {
            let len = chunk.len.load(Ordering::Acquire);
            let offset = (position - chunk.start) as usize;
            if offset < len {
                out.extend(std::iter::once(Bytes::from_owner(Slice {
                    chunk: chunk.clone(),
                    from: offset,
                    to: len,
                })));
                taken += len - offset;
                position = chunk.start + len as u64;
            }
            if taken >= max_bytes {
                break;
            }
            at += 1;
        }
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u32, len: usize) -> Bytes {
        let mut bytes = vec![(tag % 251) as u8; len];
        bytes[..4].copy_from_slice(&tag.to_le_bytes());
        Bytes::from(bytes)
    }

    fn read_all(stream: &Stream, from: u64) -> (Vec<u8>, u64) {
        let mut parts: Vec<Bytes> = Vec::new();
        let end = stream
            .read(from, usize::MAX, &mut parts)
            .expect("not lagged");
        (parts.concat(), end)
    }

    #[test]
    fn readers_get_exactly_the_bytes_appended_from_their_position() {
        let stream = Stream::default();
        let mut expected = Vec::new();
        let mut positions = vec![0u64];
        for i in 0..2_000u32 {
            // Sizes around and above a chunk, so frames start new chunks and big ones get
            // their own.
            let len = match i % 7 {
                0 => CHUNK_BYTES + 17,
                1 => 1,
                _ => 4 + (i as usize * 37) % 900,
            };
            let len = len.max(4);
            let f = frame(i, len);
            expected.extend_from_slice(&f);
            stream.append(std::slice::from_ref(&f));
            positions.push(stream.end());
            if stream.end() > KEEP_BYTES / 2 {
                break;
            }
        }
        assert_eq!(stream.end(), expected.len() as u64);
        for &from in positions.iter().step_by(13) {
            let (bytes, end) = read_all(&stream, from);
            assert_eq!(end, stream.end());
            assert_eq!(bytes, &expected[from as usize..], "from {from}");
        }
    }

    #[test]
    fn a_bounded_read_ends_on_a_chunk_boundary_and_the_next_one_continues() {
        let stream = Stream::default();
        let mut expected = Vec::new();
        for i in 0..500u32 {
            let f = frame(i, 700);
            expected.extend_from_slice(&f);
            stream.append(std::slice::from_ref(&f));
        }
        let mut got = Vec::new();
        let mut position = 0;
        let mut reads = 0;
        while position < stream.end() {
            let mut parts: Vec<Bytes> = Vec::new();
            let next = stream.read(position, 1, &mut parts).expect("not lagged");
            assert!(next > position);
            // Every read ends where a chunk (and so a frame) ends.
            assert_eq!(next % 700, 0, "read ended inside a frame at {next}");
            got.extend(parts.iter().flat_map(|p| p.iter().copied()));
            position = next;
            reads += 1;
        }
        assert_eq!(got, expected);
        assert!(reads > 1);
    }

    #[test]
    fn a_reader_behind_what_is_kept_has_lagged_and_memory_stays_bounded() {
        let stream = Stream::default();
        let f = frame(1, 1000);
        while stream.end() < 4 * KEEP_BYTES {
            stream.append(std::slice::from_ref(&f));
        }
        let mut parts: Vec<Bytes> = Vec::new();
        assert_eq!(stream.read(0, usize::MAX, &mut parts), Err(Lagged));
        let kept: u64 = stream.lock().iter().map(|c| c.capacity as u64).sum();
        assert!(
            kept <= KEEP_BYTES + 2 * CHUNK_BYTES as u64,
            "kept {kept} bytes"
        );
        // The newest KEEP_BYTES are still readable.
        let from = stream.end() - KEEP_BYTES;
        let (bytes, _) = read_all(&stream, from);
        assert_eq!(bytes.len() as u64, KEEP_BYTES);
    }

    #[test]
    fn a_released_stream_holds_nothing_and_goes_on_from_its_end() {
        let stream = Stream::default();
        stream.append(&[frame(1, 5000)]);
        let end = stream.end();
        stream.release();
        assert!(stream.lock().is_empty());
        let mut parts: Vec<Bytes> = Vec::new();
        assert_eq!(stream.read(0, usize::MAX, &mut parts), Ok(0));
        assert!(parts.is_empty());
        let next = frame(2, 300);
        stream.append(std::slice::from_ref(&next));
        let (bytes, new_end) = read_all(&stream, end);
        assert_eq!(new_end, end + 300);
        assert_eq!(bytes, &next[..]);
    }

    #[test]
    fn a_held_slice_outlives_the_chunks_the_stream_dropped() {
        let stream = Stream::default();
        let first = frame(7, 500);
        stream.append(std::slice::from_ref(&first));
        let mut held: Vec<Bytes> = Vec::new();
        stream.read(0, usize::MAX, &mut held).expect("read");
        let filler = frame(8, 4000);
        while stream.end() < 2 * KEEP_BYTES {
            stream.append(std::slice::from_ref(&filler));
        }
        assert_eq!(held.concat(), &first[..]);
    }

    #[test]
    fn concurrent_readers_see_whole_frames_only() {
        let stream = Arc::new(Stream::default());
        let writer = {
            let stream = stream.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u32 {
                    stream.append(&[frame(i, 64), frame(i, 64)]);
                }
            })
        };
        let mut position = 0u64;
        let mut next_tag = 0u32;
        let mut seen = 0;
        while seen < 40_000 {
            let mut parts: Vec<Bytes> = Vec::new();
            position = stream.read(position, 1 << 20, &mut parts).expect("kept");
            let bytes = parts.concat();
            assert_eq!(bytes.len() % 64, 0, "a partial frame was visible");
            for f in bytes.chunks(64) {
                let tag = u32::from_le_bytes(f[..4].try_into().expect("4 bytes"));
                assert_eq!(tag, next_tag / 2, "frames out of order");
                next_tag += 1;
                seen += 1;
            }
        }
        writer.join().expect("writer");
    }
}
