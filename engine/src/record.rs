//! Records and frames: the unit the log stores and the shards apply.
//!
//! A *record* is one accepted event (a delete is an event whose properties hold the tombstone
//! `"__deleted__": true`), or a *control* record: a change to the engine's own state
//! (namespaces, runtime config; see [`crate::control`]) as JSON text. Records of one append travel together in a *frame*; the log assigns
//! the frame its first [`LogPosition`] and accept time, so record `i` of a frame has position
//! `first_position + i` and every record of the frame shares the accept time.
//!
//! On-disk frame layout (fixed-width integers little-endian):
//! ```text
//! u32 body_len | u32 crc32c(body) | body
//! body = u64 first_position | u64 accept_time_ms | u32 record_count | records...
//! record = u8 kind(3=event) | u8 flags | id | var stream | var source | var zigzag(timestamp)
//!          | var entity_id | [var key] | [var schema] | var property_count
//!          | (var name | var value)*
//!        | u8 kind(2=control) | str json
//!        | u8 kind(1=event, written before the compact kind 3; still read)
//!          | str event_id | str stream | str source | i64 timestamp | str entity_id
//!          | opt key | opt schema | u32 property_count | (str name | str value)*
//! flags: 1 = id is a UUID as 16 bytes (the text was its lowercase hyphenated form), else
//!        id = var; 2 = key present; 4 = schema present; other bits zero
//! var = LEB128 length (at most 5 bytes, ≤ u32::MAX) | utf-8 bytes; a bare count or the
//!       timestamp is the LEB128 number alone (the timestamp up to 10 bytes)
//! str = u32 len | utf-8 bytes;  opt = u32::MAX (absent) or a str
//! ```
//! Property values are stored as the exact JSON text received. The decoder checks every length
//! against the buffer and every string for UTF-8: it never panics on corrupt input.
//!
//! Kind 3 spends ~1 byte on a length where kind 1 spent 4, and 16 on a generated id where kind 1
//! spent 40: a 5-property event with a generated id takes ~118 bytes instead of ~193, and every
//! byte is written, synced and (with JetStream) sent once per node. A node reads both kinds and
//! writes kind 3, or kind 1 while [`RecordFormat::V1`] is set (for a JetStream world whose
//! older nodes cannot read kind 3; decision 0009).

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

/// Position of a record in the log: 1 for the first record ever appended, then dense.
pub type LogPosition = u64;

/// Bytes before a frame's body: length and checksum.
pub const FRAME_PREFIX_BYTES: usize = 8;
/// Bytes of a frame body's header: first position, accept time, record count.
pub const FRAME_HEADER_BYTES: usize = 20;
/// A frame body larger than this is treated as corruption (no append can produce one).
pub const MAX_FRAME_BODY_BYTES: usize = 256 << 20;

/// The event record written before [`KIND_EVENT`]: fixed-width lengths, the id as text.
const KIND_EVENT_V1: u8 = 1;
const KIND_CONTROL: u8 = 2;
/// The event record written now: LEB128 lengths, a canonical UUID id as 16 bytes.
const KIND_EVENT: u8 = 3;
const FLAG_UUID_ID: u8 = 1;
const FLAG_KEY: u8 = 2;
const FLAG_SCHEMA: u8 = 4;
const FLAGS_KNOWN: u8 = FLAG_UUID_ID | FLAG_KEY | FLAG_SCHEMA;
/// The owner given to control records in a batch: no shard; the dispatcher applies them.
pub const CONTROL_OWNER: u16 = u16::MAX;
const ABSENT: u32 = u32::MAX;
/// The property key that turns an event into a delete when its value is `true`.
pub const TOMBSTONE_KEY: &str = "__deleted__";

/// Which kind of event record this process writes (it reads both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordFormat {
    /// Kind 3: LEB128 lengths, canonical UUID ids as 16 bytes.
    #[default]
    Compact,
    /// Kind 1, which versions before kind 3 read: for a JetStream world upgraded node by node
    /// (every node writes kind 1 until the last one runs this version; decision 0009).
    V1,
}

static WRITE_KIND_1: AtomicBool = AtomicBool::new(false);

/// Sets the kind of event record [`RecordBatch::push_event`] writes from now on, process-wide
/// (the server sets it once, at start).
pub fn set_record_format(format: RecordFormat) {
    WRITE_KIND_1.store(format == RecordFormat::V1, Ordering::Relaxed);
}

/// The fields of one validated event, borrowed from wherever they were parsed.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    /// An id the server generated is a [`EventId::Uuid`]; one a client sent is
    /// [`EventId::Text`] (stored as 16 bytes too when it is a UUID in canonical form).
    pub event_id: EventId<'a>,
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
        if WRITE_KIND_1.load(Ordering::Relaxed) {
            return self.push_event_v1(shard, fields, properties);
        }
        let out = &mut self.bytes;
        self.offsets.push(out.len() as u32);
        self.shards.push(shard);
        let uuid = match fields.event_id {
            EventId::Uuid(bytes) => Some(bytes),
            EventId::Text(text) => canonical_uuid(text),
        };
        let flags = (u8::from(uuid.is_some()) * FLAG_UUID_ID)
            | (u8::from(fields.key.is_some()) * FLAG_KEY)
            | (u8::from(fields.schema.is_some()) * FLAG_SCHEMA);
        out.extend_from_slice(&[KIND_EVENT, flags]);
        match uuid {
            Some(bytes) => out.extend_from_slice(&bytes),
            None => put_var_str(out, fields.event_id.as_str(&mut [0; 36])),
        }
        put_var_str(out, fields.stream);
        put_var_str(out, fields.source);
        put_var(out, zigzag(fields.timestamp));
        put_var_str(out, fields.entity_id);
        if let Some(key) = fields.key {
            put_var_str(out, key);
        }
        if let Some(schema) = fields.schema {
            put_var_str(out, schema);
        }
        put_var(out, properties.len() as u64);
        for (name, value) in properties {
            put_var_str(out, name);
            put_var_str(out, value);
        }
    }
}

impl RecordBatch {
    /// Appends one event record of kind 1, the kind versions before kind 3 wrote and read
    /// ([`RecordFormat::V1`]).
    pub fn push_event_v1<'p>(
        &mut self,
        shard: u16,
        fields: &EventFields<'_>,
        properties: impl ExactSizeIterator<Item = (&'p str, &'p str)>,
    ) {
        let out = &mut self.bytes;
        self.offsets.push(out.len() as u32);
        self.shards.push(shard);
        out.push(KIND_EVENT_V1);
        put_str(out, fields.event_id.as_str(&mut [0; 36]));
        put_str(out, fields.stream);
        put_str(out, fields.source);
        out.extend_from_slice(&fields.timestamp.to_le_bytes());
        put_str(out, fields.entity_id);
        for opt in [fields.key, fields.schema] {
            match opt {
                Some(s) => put_str(out, s),
                None => out.extend_from_slice(&ABSENT.to_le_bytes()),
            }
        }
        out.extend_from_slice(&(properties.len() as u32).to_le_bytes());
        for (name, value) in properties {
            put_str(out, name);
            put_str(out, value);
        }
    }

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

/// Unsigned LEB128: seven bits a byte, low bits first, the high bit set on all but the last.
#[inline]
fn put_var(out: &mut Vec<u8>, value: u64) {
    if value < 0x80 {
        out.push(value as u8);
    } else {
        put_var_long(out, value);
    }
}

#[cold]
fn put_var_long(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[inline]
fn put_var_str(out: &mut Vec<u8>, s: &str) {
    put_var(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Maps small negative and positive numbers alike to small unsigned ones.
fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    (value >> 1) as i64 ^ -((value & 1) as i64)
}

/// The 16 bytes of `id` when it is a UUID in exactly the form [`EventId`] renders (36
/// characters, lowercase, hyphenated), so storing the bytes gives back the same text.
fn canonical_uuid(id: &str) -> Option<[u8; 16]> {
    // At 36 bytes the parser takes only the hyphenated form; it also takes uppercase hex
    // (`A`-`F`; other letters fail it). A fold, not `any`, so the check is vectorized.
    let upper_hex = |b: u8| b.wrapping_sub(b'A') < 6;
    if id.len() != 36 || id.bytes().fold(false, |seen, b| seen | upper_hex(b)) {
        return None;
    }
    uuid::Uuid::try_parse(id).ok().map(|u| u.into_bytes())
}

/// A stored event id: the text as sent, or a UUID kept as its 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventId<'a> {
    Text(&'a str),
    Uuid([u8; 16]),
}

impl<'a> EventId<'a> {
    /// The id's text, rendered into `buf` when it is a UUID.
    pub fn as_str<'b>(&'b self, buf: &'b mut [u8; 36]) -> &'b str
    where
        'a: 'b,
    {
        match self {
            EventId::Text(text) => text,
            EventId::Uuid(bytes) => uuid::Uuid::from_bytes(*bytes)
                .hyphenated()
                .encode_lower(buf),
        }
    }
}

impl std::fmt::Display for EventId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str(&mut [0; 36]))
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
    /// The properties' lengths are `u32`s (kind 1), not LEB128 (kind 3).
    wide: bool,
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

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
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

    /// A LEB128 number of at most `max_bytes` (≤ 10) bytes.
    #[inline]
    fn var(&mut self, max_bytes: u32) -> Result<u64, DecodeError> {
        // Nearly every length is under 128: one byte.
        if let Some(&byte) = self.buf.get(self.at)
            && byte < 0x80
        {
            self.at += 1;
            return Ok(u64::from(byte));
        }
        self.var_long(max_bytes)
    }

    #[cold]
    fn var_long(&mut self, max_bytes: u32) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..7 * max_bytes).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if (bits << shift) >> shift != bits {
                return Err(DecodeError::Malformed("number overflow"));
            }
            value |= bits << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("number overflow"))
    }

    #[inline]
    fn var_u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.var(5)?).map_err(|_| DecodeError::Malformed("number overflow"))
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

    /// A string with a `u32` length (kind 1 and control records).
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        self.utf8(bytes)
    }

    /// A string with a LEB128 length (kind 3).
    #[inline]
    fn var_str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.var_u32()? as usize;
        let bytes = self.take(len)?;
        self.utf8(bytes)
    }

    /// A string whose length is a `u32` when `wide`, else LEB128.
    #[inline]
    fn str_of(&mut self, wide: bool) -> Result<&'a str, DecodeError> {
        if wide { self.str() } else { self.var_str() }
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

    /// Length of the record (of any kind) at the front of `buf`.
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
        properties: Option<&mut Vec<(&'a str, &'a str)>>,
    ) -> Result<(Self, usize), DecodeError> {
        let mut c = Cursor {
            buf,
            at: 0,
            check_utf8,
        };
        let wide = match c.u8()? {
            KIND_EVENT => false,
            KIND_EVENT_V1 => true,
            _ => return Err(DecodeError::Malformed("unknown record kind")),
        };
        let (fields, property_count) = if wide {
            Self::v1_fields(&mut c)?
        } else {
            Self::compact_fields(&mut c)?
        };
        let start = c.at;
        if wide {
            Self::walk_properties(&mut c, property_count, properties, Cursor::str)?;
        } else {
            Self::walk_properties(&mut c, property_count, properties, Cursor::var_str)?;
        }
        let record = EventRecord {
            fields,
            property_count,
            properties: &buf[start..c.at],
            wide,
        };
        Ok((record, c.at))
    }

    /// Reads `count` (name, value) pairs with `read`, one loop per length encoding.
    #[inline(always)]
    fn walk_properties(
        c: &mut Cursor<'a>,
        count: u32,
        mut properties: Option<&mut Vec<(&'a str, &'a str)>>,
        read: impl Fn(&mut Cursor<'a>) -> Result<&'a str, DecodeError>,
    ) -> Result<(), DecodeError> {
        for _ in 0..count {
            let name = read(c)?;
            let value = read(c)?;
            if let Some(properties) = properties.as_mut() {
                properties.push((name, value));
            }
        }
        Ok(())
    }

    /// The fields of a kind-3 record after its kind byte, and its property count.
    fn compact_fields(c: &mut Cursor<'a>) -> Result<(EventFields<'a>, u32), DecodeError> {
        let flags = c.u8()?;
        if flags & !FLAGS_KNOWN != 0 {
            return Err(DecodeError::Malformed("unknown record flags"));
        }
        let event_id = if flags & FLAG_UUID_ID != 0 {
            EventId::Uuid(c.take(16)?.try_into().expect("16 bytes"))
        } else {
            EventId::Text(c.var_str()?)
        };
        let fields = EventFields {
            event_id,
            stream: c.var_str()?,
            source: c.var_str()?,
            timestamp: unzigzag(c.var(10)?),
            entity_id: c.var_str()?,
            key: if flags & FLAG_KEY != 0 {
                Some(c.var_str()?)
            } else {
                None
            },
            schema: if flags & FLAG_SCHEMA != 0 {
                Some(c.var_str()?)
            } else {
                None
            },
        };
        Ok((fields, c.var_u32()?))
    }

    /// The fields of a kind-1 record after its kind byte, and its property count.
    fn v1_fields(c: &mut Cursor<'a>) -> Result<(EventFields<'a>, u32), DecodeError> {
        let fields = EventFields {
            event_id: EventId::Text(c.str()?),
            stream: c.str()?,
            source: c.str()?,
            timestamp: c.i64()?,
            entity_id: c.str()?,
            key: c.opt()?,
            schema: c.opt()?,
        };
        Ok((fields, c.u32()?))
    }

    /// The kind the record was written as.
    pub fn format(&self) -> RecordFormat {
        if self.wide {
            RecordFormat::V1
        } else {
            RecordFormat::Compact
        }
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
            wide: self.wide,
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
    wide: bool,
}

impl<'a> Iterator for PropertyIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // Both reads succeeded during decode; a failure here would mean a bug, so stop quietly.
        let name = self.cursor.str_of(self.wide).ok()?;
        Some((name, self.cursor.str_of(self.wide).ok()?))
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
            event_id: EventId::Text("e1"),
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
        assert_eq!(first.fields.schema, None);
        assert_eq!(first.fields.event_id, EventId::Text("e1"));
        assert_eq!(
            (
                first.fields.stream,
                first.fields.source,
                first.fields.timestamp
            ),
            ("sensors", "test", 1_708_694_400_000)
        );
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

    /// Decodes the single event record of a frame holding `batch`.
    fn decode_one(batch: &RecordBatch) -> (Frame, usize) {
        let mut out = Vec::new();
        encode_frame(&mut out, 1, 1, batch);
        let FrameRead::Frame(frame, _) = decode_frame(&out).expect("valid") else {
            panic!("incomplete")
        };
        (frame, batch.encoded_bytes())
    }

    fn event<'a>(id: &'a str, timestamp: i64, entity_id: &'a str) -> EventFields<'a> {
        EventFields {
            event_id: EventId::Text(id),
            stream: "s",
            source: "src",
            timestamp,
            entity_id,
            key: None,
            schema: Some("v2"),
        }
    }

    #[test]
    fn a_canonical_uuid_is_stored_as_16_bytes_and_any_other_id_as_sent() {
        let canonical = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let mut sizes = Vec::new();
        for id in [
            canonical,
            "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B",
            "0190a1b2c3d47e5f8a9b0c1d2e3f4a5b",
            "{0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b}",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5g",
            "0190a1b2-c3d4-7e5f-8a9b_0c1d2e3f4a5b",
            "evt-1",
            "",
        ] {
            let mut batch = RecordBatch::default();
            batch.push_event(0, &event(id, 1, "a/b"), [("x", "1")].into_iter());
            let (frame, bytes) = decode_one(&batch);
            let record = frame.record(0).expect("record");
            assert_eq!(record.fields.event_id.to_string(), id);
            assert_eq!(record.fields.event_id.as_str(&mut [0; 36]), id);
            assert_eq!(
                matches!(record.fields.event_id, EventId::Uuid(_)),
                id == canonical,
                "{id}"
            );
            sizes.push(bytes);
        }
        // The canonical id costs 16 bytes; the same id in capitals its 36 and a 1-byte length.
        assert_eq!(sizes[1] - sizes[0], 1 + 36 - 16);
    }

    #[test]
    fn lengths_and_timestamps_round_trip_at_every_leb128_boundary() {
        let long: String = "é".repeat(1 << 14);
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 20_000] {
            let value = &long[..len - len % 2];
            for timestamp in [0, 1, -1, 63, 64, -65, i64::MAX, i64::MIN, 1_795_507_434_494] {
                let mut batch = RecordBatch::default();
                let fields = EventFields {
                    key: Some(value),
                    ..event("id", timestamp, value)
                };
                batch.push_event(0, &fields, [(value, value), ("n", "1")].into_iter());
                let (frame, _) = decode_one(&batch);
                let record = frame.record(0).expect("record");
                assert_eq!(record.fields.timestamp, timestamp);
                assert_eq!(
                    (record.fields.entity_id, record.fields.key),
                    (value, Some(value))
                );
                assert_eq!(record.fields.schema, Some("v2"));
                let props: Vec<_> = record.properties().collect();
                assert_eq!(props, [(value, value), ("n", "1")]);
            }
        }
    }

    #[test]
    fn kind_1_records_written_by_earlier_versions_still_decode() {
        let old = EventFields {
            key: Some("k"),
            schema: None,
            ..event("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", -7, "acme/pump-01")
        };
        let props = [("temp", "22.5"), ("__deleted__", "true")];
        // A frame mixing both kinds, as a log written across an upgrade holds (in two frames).
        let mut batch = RecordBatch::default();
        batch.push_event_v1(0, &old, props.into_iter());
        batch.push_event(
            1,
            &event("new", 5, "acme/pump-02"),
            [("on", "true")].into_iter(),
        );
        batch.push_control("{}");
        let mut out = Vec::new();
        encode_frame(&mut out, 9, 2, &batch);
        let FrameRead::Frame(frame, used) = decode_frame(&out).expect("valid") else {
            panic!("incomplete")
        };
        assert_eq!((used, frame.len()), (out.len(), 3));
        let mut taken = Vec::new();
        let record = frame.record_into(0, &mut taken).expect("kind 1");
        assert_eq!(record.fields.event_id, old.event_id);
        assert_eq!(
            (
                record.fields.stream,
                record.fields.source,
                record.fields.timestamp,
                record.fields.entity_id
            ),
            ("s", "src", -7, "acme/pump-01")
        );
        assert_eq!((record.fields.key, record.fields.schema), (Some("k"), None));
        assert_eq!(taken, props);
        assert_eq!(record.properties().collect::<Vec<_>>(), props);
        assert_eq!(record.format(), RecordFormat::V1);
        let record = frame.record(1).expect("kind 3");
        assert_eq!(
            (record.fields.entity_id, record.fields.timestamp),
            ("acme/pump-02", 5)
        );
        assert_eq!(record.format(), RecordFormat::Compact);
        assert_eq!(frame.control(2).expect("control"), Some("{}"));
    }

    #[test]
    fn push_event_v1_writes_the_bytes_earlier_versions_wrote() {
        // The log `fe763a5` wrote (see the test that replays it in tests/crash.rs).
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/log-kind1/log/00000000000000000001.seg"
        );
        let log = std::fs::read(path).expect("fixture");
        let (mut at, mut events) = (0, 0);
        while at < log.len() {
            let Ok(FrameRead::Frame(frame, used)) = decode_frame(&log[at..]) else {
                panic!("a whole frame at {at}")
            };
            let mut batch = RecordBatch::default();
            for i in 0..frame.len() {
                if let Some(json) = frame.control(i).expect("record") {
                    batch.push_control(json);
                    continue;
                }
                let r = frame.record(i).expect("record");
                assert!(
                    matches!(r.fields.event_id, EventId::Text(_)),
                    "kind 1 ids are text"
                );
                batch.push_event_v1(0, &r.fields, r.properties());
                events += 1;
            }
            let records = &log[at + FRAME_PREFIX_BYTES + FRAME_HEADER_BYTES..at + used];
            assert_eq!(batch.bytes, records, "frame at {at}");
            at += used;
        }
        assert!(events >= 8, "{events} events");
    }

    #[test]
    fn overlong_numbers_and_unknown_flags_are_malformed() {
        let mut batch = RecordBatch::default();
        batch.push_event(0, &event("i", 1, "a"), [("x", "1")].into_iter());
        let good = batch.bytes.clone();
        assert!(EventRecord::decode(&good).is_ok());
        let mut flags = good.clone();
        flags[1] |= 0x80;
        assert_eq!(
            EventRecord::decode(&flags).unwrap_err(),
            DecodeError::Malformed("unknown record flags")
        );
        // The id's length (1) written in six bytes: more than a u32 length may take.
        let mut long = good[..2].to_vec();
        long.extend_from_slice(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x00]);
        long.extend_from_slice(&good[3..]);
        assert_eq!(
            EventRecord::decode(&long).unwrap_err(),
            DecodeError::Malformed("number overflow")
        );
        // Five bytes that hold more than u32::MAX.
        let mut wide = good[..2].to_vec();
        wide.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(EventRecord::decode(&wide).is_err());
        // A timestamp of 11 bytes, and one whose tenth byte sets bits past 64.
        let at = 2 + 2 + 2 + 4; // kind, flags, id "i", stream "s", source "src"
        for tail in [
            &[0xff; 11][..],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
        ] {
            let mut bad = good[..at].to_vec();
            bad.extend_from_slice(tail);
            assert_eq!(
                EventRecord::decode(&bad).unwrap_err(),
                DecodeError::Malformed("number overflow")
            );
        }
    }

    proptest::proptest! {
        /// A record whose bytes after the kind are anything at all decodes or is refused: no
        /// panic, and what decodes can be walked (frames are checksummed, the decoder is not).
        #[test]
        fn arbitrary_bytes_of_either_event_kind_never_panic(
            kind in proptest::sample::select(vec![KIND_EVENT_V1, KIND_EVENT]),
            flags in 0u8..8,
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
        ) {
            let mut bytes = vec![kind, flags];
            bytes.extend_from_slice(&rest);
            for end in 0..=bytes.len() {
                if let Ok(record) = EventRecord::decode(&bytes[..end]) {
                    let walked = record.properties().count();
                    proptest::prop_assert_eq!(walked, record.property_count as usize);
                    let _ = record.fields.event_id.to_string();
                }
            }
        }

        #[test]
        fn any_event_round_trips(
            id in "[0-9a-fA-F-]{0,40}|\\PC{0,40}",
            stream in "\\PC{0,20}",
            timestamp in proptest::num::i64::ANY,
            key in proptest::option::of("\\PC{0,300}"),
            props in proptest::collection::vec(("\\PC{0,12}", "\\PC{0,200}"), 0..6),
        ) {
            let fields = EventFields {
                event_id: EventId::Text(&id),
                stream: &stream,
                source: "s",
                timestamp,
                entity_id: "e",
                key: key.as_deref(),
                schema: None,
            };
            let mut batch = RecordBatch::default();
            batch.push_event(0, &fields, props.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            let (frame, _) = decode_one(&batch);
            let record = frame.record(0).expect("record");
            proptest::prop_assert_eq!(record.fields.event_id.to_string(), id);
            proptest::prop_assert_eq!(record.fields.stream, stream.as_str());
            proptest::prop_assert_eq!(record.fields.timestamp, timestamp);
            proptest::prop_assert_eq!(record.fields.key, key.as_deref());
            let decoded: Vec<_> = record.properties().collect();
            let sent: Vec<_> = props.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            proptest::prop_assert_eq!(decoded, sent);
        }
    }
}
