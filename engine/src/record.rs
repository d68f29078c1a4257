//! Records and frames: the unit the log stores and the shards apply.
//!
//! A *record* is one accepted event (a delete is an event whose properties hold the tombstone
//! `"__deleted__": true`), or a *control* record: a change to the engine's own state
//! (namespaces, runtime config; see [`crate::control`]) as JSON text. Records of one append travel together in a *frame*; the log assigns
//! the frame its first [`LogPosition`] and accept time, so record `i` of a frame has position
//! `first_position + i` and every record of the frame shares the accept time.
//!
//! On-disk frame layout (all integers little-endian):
//! ```text
//! u32 body_len | u32 crc32c(body) | body
//! body = u64 first_position | u64 accept_time_ms | u32 record_count | records...
//! record = u8 kind(2=control) | str json
//!        | u8 kind(1=event) | str event_id | str stream | str source | i64 timestamp
//!        | str entity_id | opt key | opt schema | u32 property_count | (str name | str value)*
//! str = u32 len | utf-8 bytes;  opt = u32::MAX (absent) or a str
//! ```
//! Property values are stored as the exact JSON text received. The decoder checks every length
//! against the buffer and every string for UTF-8: it never panics on corrupt input.

use bytes::Bytes;

/// Position of a record in the log: 1 for the first record ever appended, then dense.
pub type LogPosition = u64;

/// Bytes before a frame's body: length and checksum.
pub const FRAME_PREFIX_BYTES: usize = 8;
/// Bytes of a frame body's header: first position, accept time, record count.
pub const FRAME_HEADER_BYTES: usize = 20;
/// A frame body larger than this is treated as corruption (no append can produce one).
pub const MAX_FRAME_BODY_BYTES: usize = 256 << 20;

const KIND_EVENT: u8 = 1;
const KIND_CONTROL: u8 = 2;
/// The owner given to control records in a batch: no shard; the dispatcher applies them.
pub const CONTROL_OWNER: u16 = u16::MAX;
const ABSENT: u32 = u32::MAX;
/// The property key that turns an event into a delete when its value is `true`.
pub const TOMBSTONE_KEY: &str = "__deleted__";

/// The fields of one validated event, borrowed from wherever they were parsed.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    pub event_id: &'a str,
    pub stream: &'a str,
    pub source: &'a str,
    pub timestamp: i64,
    pub entity_id: &'a str,
    pub key: Option<&'a str>,
    pub schema: Option<&'a str>,
}

/// Records of one append, encoded back to back, each tagged with its owning shard.
#[derive(Debug, Default)]
pub struct RecordBatch {
    pub(crate) bytes: Vec<u8>,
    pub(crate) offsets: Vec<u32>,
    pub(crate) shards: Vec<u16>,
}

impl RecordBatch {
    /// An empty batch with room for `records` records of about `bytes` bytes in all.
    pub fn with_capacity(bytes: usize, records: usize) -> Self {
        RecordBatch {
            bytes: Vec::with_capacity(bytes),
            offsets: Vec::with_capacity(records),
            shards: Vec::with_capacity(records),
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Encoded size of the records, without the frame header.
    pub fn encoded_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one event record owned by `shard`. `properties` yields `(name, raw JSON value)`.
    pub fn push_event<'p>(
        &mut self,
        shard: u16,
        fields: &EventFields<'_>,
        properties: impl ExactSizeIterator<Item = (&'p str, &'p str)>,
    ) {
        let out = &mut self.bytes;
        self.offsets.push(out.len() as u32);
        self.shards.push(shard);
        out.push(KIND_EVENT);
        put_str(out, fields.event_id);
        put_str(out, fields.stream);
        put_str(out, fields.source);
        out.extend_from_slice(&fields.timestamp.to_le_bytes());
        put_str(out, fields.entity_id);
        put_opt(out, fields.key);
        put_opt(out, fields.schema);
        out.extend_from_slice(&(properties.len() as u32).to_le_bytes());
        for (name, value) in properties {
            put_str(out, name);
            put_str(out, value);
        }
    }
}

impl RecordBatch {
    /// Appends one control record (JSON text), applied by the dispatcher rather than a shard.
    pub fn push_control(&mut self, json: &str) {
        self.offsets.push(self.bytes.len() as u32);
        self.shards.push(CONTROL_OWNER);
        self.bytes.push(KIND_CONTROL);
        put_str(&mut self.bytes, json);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => out.extend_from_slice(&ABSENT.to_le_bytes()),
    }
}

/// Appends the on-disk encoding of a frame holding `batch` to `out`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    first_position: LogPosition,
    accept_time_ms: u64,
    batch: &RecordBatch,
) {
    let body_len = FRAME_HEADER_BYTES + batch.bytes.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&first_position.to_le_bytes());
    out.extend_from_slice(&accept_time_ms.to_le_bytes());
    out.extend_from_slice(&(batch.offsets.len() as u32).to_le_bytes());
    out.extend_from_slice(&batch.bytes);
    let crc = crc32c::crc32c(&out[start + FRAME_PREFIX_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why a byte range is not a valid frame or record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: needs {needed} bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("frame body length {0} out of range")]
    Length(usize),
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// A durable frame in memory: header plus its records, shared by every shard that applies it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub first_position: LogPosition,
    pub accept_time_ms: u64,
    /// The encoded records, back to back. Invariant: every string in them is valid UTF-8 and
    /// every record decodes — they were encoded from `&str`s ([`Frame::from_batch`]) or checked
    /// by [`decode_frame`] — so reading them again skips the UTF-8 check.
    records: Bytes,
    /// Start of each record within `records`.
    offsets: Vec<u32>,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    pub fn last_position(&self) -> LogPosition {
        self.first_position + self.offsets.len() as u64 - 1
    }

    fn bytes_of(&self, index: usize) -> Result<&[u8], DecodeError> {
        let start = *self
            .offsets
            .get(index)
            .ok_or(DecodeError::Malformed("index"))? as usize;
        let end = self
            .offsets
            .get(index + 1)
            .map_or(self.records.len(), |&o| o as usize);
        Ok(&self.records[start..end])
    }

    /// The event record at `index` (0-based within the frame); an error for a control record.
    pub fn record(&self, index: usize) -> Result<EventRecord<'_>, DecodeError> {
        self.decode_record(index, None)
    }

    /// Like [`Frame::record`], and also puts the record's properties in `properties` (cleared
    /// first), from the same walk over the record that decoding makes anyway.
    pub fn record_into<'f>(
        &'f self,
        index: usize,
        properties: &mut Vec<(&'f str, &'f str)>,
    ) -> Result<EventRecord<'f>, DecodeError> {
        properties.clear();
        self.decode_record(index, Some(properties))
    }

    fn decode_record<'f>(
        &'f self,
        index: usize,
        properties: Option<&mut Vec<(&'f str, &'f str)>>,
    ) -> Result<EventRecord<'f>, DecodeError> {
        let bytes = self.bytes_of(index)?;
        // The frame's invariant: its strings were checked once already.
        let (record, used) = EventRecord::decode_prefix(bytes, false, properties)?;
        if used != bytes.len() {
            return Err(DecodeError::Malformed("trailing bytes after record"));
        }
        Ok(record)
    }

    /// The JSON of the control record at `index`, or `None` when it is an event.
    pub fn control(&self, index: usize) -> Result<Option<&str>, DecodeError> {
        let bytes = self.bytes_of(index)?;
        if bytes.first() != Some(&KIND_CONTROL) {
            return Ok(None);
        }
        let mut c = Cursor {
            buf: bytes,
            at: 1,
            check_utf8: true,
        };
        let json = c.str()?;
        if c.at != bytes.len() {
            return Err(DecodeError::Malformed("trailing bytes after record"));
        }
        Ok(Some(json))
    }

    /// Builds the in-memory frame for a batch the log just made durable.
    pub fn from_batch(
        first_position: LogPosition,
        accept_time_ms: u64,
        batch: RecordBatch,
    ) -> Self {
        Frame {
            first_position,
            accept_time_ms,
            records: Bytes::from(batch.bytes),
            offsets: batch.offsets,
        }
    }
}

/// Outcome of reading one frame from the front of a buffer.
pub enum FrameRead {
    /// A valid frame and the total number of bytes it occupied.
    Frame(Frame, usize),
    /// The buffer ends inside a frame: more bytes needed (or a torn tail).
    Incomplete { needed: usize },
}

/// Decodes the frame at the front of `buf`, checking its length, checksum and every record.
pub fn decode_frame(buf: &[u8]) -> Result<FrameRead, DecodeError> {
    if buf.len() < FRAME_PREFIX_BYTES {
        return Ok(FrameRead::Incomplete {
            needed: FRAME_PREFIX_BYTES,
        });
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if !(FRAME_HEADER_BYTES..=MAX_FRAME_BODY_BYTES).contains(&body_len) {
        return Err(DecodeError::Length(body_len));
    }
    let total = FRAME_PREFIX_BYTES + body_len;
    if buf.len() < total {
        return Ok(FrameRead::Incomplete { needed: total });
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let body = &buf[FRAME_PREFIX_BYTES..total];
    if crc32c::crc32c(body) != crc {
        return Err(DecodeError::Checksum);
    }
    let first_position = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    let accept_time_ms = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
    let records = &body[FRAME_HEADER_BYTES..];
    let mut offsets = Vec::with_capacity(count.min(records.len()));
    let mut at = 0usize;
    for _ in 0..count {
        offsets.push(at as u32);
        at += EventRecord::decode_len(&records[at..])?;
    }
    if at != records.len() || count == 0 {
        return Err(DecodeError::Malformed(
            "record count does not match frame length",
        ));
    }
    let frame = Frame {
        first_position,
        accept_time_ms,
        records: Bytes::copy_from_slice(records),
        offsets,
    };
    Ok(FrameRead::Frame(frame, total))
}

/// One decoded event record, borrowing from the frame.
#[derive(Debug, Clone, Copy)]
pub struct EventRecord<'a> {
    pub fields: EventFields<'a>,
    property_count: u32,
    properties: &'a [u8],
}

#[derive(Clone)]
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    /// Check strings for UTF-8; false only for bytes known valid (a [`Frame`]'s records).
    check_utf8: bool,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Malformed("length overflow"))?;
        let bytes = self.buf.get(self.at..end).ok_or(DecodeError::Truncated {
            needed: end,
            available: self.buf.len(),
        })?;
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn utf8(&self, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
        if self.check_utf8 {
            return std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed("invalid utf-8"));
        }
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: `check_utf8` is false only for a `Frame`'s records, whose strings were
        // encoded from `&str` or checked by `decode_frame` (the `Frame` invariant), and the
        // length prefixes were checked against the buffer by `take`.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        self.utf8(bytes)
    }

    fn opt(&mut self) -> Result<Option<&'a str>, DecodeError> {
        let len = self.u32()?;
        if len == ABSENT {
            return Ok(None);
        }
        let bytes = self.take(len as usize)?;
        self.utf8(bytes).map(Some)
    }
}

impl<'a> EventRecord<'a> {
    /// Decodes a record occupying exactly `buf`.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let (record, used) = Self::decode_prefix(buf, true, None)?;
        if used != buf.len() {
            return Err(DecodeError::Malformed("trailing bytes after record"));
        }
        Ok(record)
    }

    /// Length of the record (of either kind) at the front of `buf`.
    fn decode_len(buf: &[u8]) -> Result<usize, DecodeError> {
        if buf.first() == Some(&KIND_CONTROL) {
            let mut c = Cursor {
                buf,
                at: 1,
                check_utf8: true,
            };
            c.str()?;
            return Ok(c.at);
        }
        EventRecord::decode_prefix(buf, true, None).map(|(_, used)| used)
    }

    /// Decodes the record at the front of `buf`, returning it and its length; its properties
    /// also go to `properties` when given.
    fn decode_prefix(
        buf: &'a [u8],
        check_utf8: bool,
        mut properties: Option<&mut Vec<(&'a str, &'a str)>>,
    ) -> Result<(Self, usize), DecodeError> {
        let mut c = Cursor {
            buf,
            at: 0,
            check_utf8,
        };
        if c.take(1)? != [KIND_EVENT] {
            return Err(DecodeError::Malformed("unknown record kind"));
        }
        let fields = EventFields {
            event_id: c.str()?,
            stream: c.str()?,
            source: c.str()?,
            timestamp: c.i64()?,
            entity_id: c.str()?,
            key: c.opt()?,
            schema: c.opt()?,
        };
        let property_count = c.u32()?;
        let start = c.at;
        for _ in 0..property_count {
            let name = c.str()?;
            let value = c.str()?;
            if let Some(properties) = properties.as_mut() {
                properties.push((name, value));
            }
        }
        let record = EventRecord {
            fields,
            property_count,
            properties: &buf[start..c.at],
        };
        Ok((record, c.at))
    }

    /// `(name, raw JSON value)` pairs in the order they were sent.
    pub fn properties(&self) -> PropertyIter<'a> {
        PropertyIter {
            // Decoding the record already walked (and, unless trusted, checked) these strings.
            cursor: Cursor {
                buf: self.properties,
                at: 0,
                check_utf8: false,
            },
            remaining: self.property_count,
        }
    }
}

/// Whether a property (name, raw JSON value) makes its event a delete.
pub fn is_tombstone_property(name: &str, value: &str) -> bool {
    name == TOMBSTONE_KEY && value == "true"
}

/// Iterator over a record's properties; the record was validated when decoded.
#[derive(Clone)]
pub struct PropertyIter<'a> {
    cursor: Cursor<'a>,
    remaining: u32,
}

impl<'a> Iterator for PropertyIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // Both reads succeeded during decode; a failure here would mean a bug, so stop quietly.
        Some((self.cursor.str().ok()?, self.cursor.str().ok()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining as usize, Some(self.remaining as usize))
    }
}

impl ExactSizeIterator for PropertyIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_batch() -> RecordBatch {
        let mut batch = RecordBatch::default();
        let fields = EventFields {
            event_id: "e1",
            stream: "sensors",
            source: "test",
            timestamp: 1_708_694_400_000,
            entity_id: "acme/pump-01",
            key: Some("k"),
            schema: None,
        };
        let props = [("temp", "22.5"), ("big", "123456789012345678901234567890")];
        batch.push_event(0, &fields, props.iter().copied());
        let fields = EventFields {
            entity_id: "acme/pump-02",
            key: None,
            ..fields
        };
        batch.push_event(1, &fields, [("__deleted__", "true")].into_iter());
        batch.push_control(r#"{"type":"example"}"#);
        batch
    }

    #[test]
    fn frame_round_trips() {
        let batch = sample_batch();
        let mut out = Vec::new();
        encode_frame(&mut out, 7, 1234, &batch);
        let FrameRead::Frame(frame, used) = decode_frame(&out).expect("valid") else {
            panic!("incomplete")
        };
        assert_eq!(used, out.len());
        assert_eq!(
            (frame.first_position, frame.accept_time_ms, frame.len()),
            (7, 1234, 3)
        );
        assert_eq!(
            frame.control(2).expect("control"),
            Some(r#"{"type":"example"}"#)
        );
        assert_eq!(frame.control(0).expect("event"), None);
        assert!(frame.record(2).is_err());
        let first = frame.record(0).expect("record 0");
        assert_eq!(first.fields.entity_id, "acme/pump-01");
        assert_eq!(first.fields.key, Some("k"));
        let props: Vec<_> = first.properties().collect();
        assert_eq!(
            props,
            [("temp", "22.5"), ("big", "123456789012345678901234567890")]
        );
        let tombstone =
            |r: EventRecord<'_>| r.properties().any(|(n, v)| is_tombstone_property(n, v));
        assert!(!tombstone(first));
        assert!(tombstone(frame.record(1).expect("record 1")));
        // The properties a decode hands over are the record's, and replace what was there.
        let mut taken = vec![("stale", "x")];
        let again = frame.record_into(0, &mut taken).expect("record 0");
        assert_eq!(taken, props);
        assert_eq!(again.fields.entity_id, "acme/pump-01");
        frame.record_into(1, &mut taken).expect("record 1");
        assert_eq!(taken, [("__deleted__", "true")]);
        assert!(frame.record_into(2, &mut taken).is_err());
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_flip_is_detected() {
        let mut out = Vec::new();
        encode_frame(&mut out, 1, 1, &sample_batch());
        for cut in 0..out.len() {
            assert!(matches!(
                decode_frame(&out[..cut]),
                Ok(FrameRead::Incomplete { .. }) | Err(_)
            ));
        }
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(!matches!(decode_frame(&bad), Ok(FrameRead::Frame(_, n)) if n == out.len()));
        }
    }
}
