//! A minimal WebSocket client for subscribers: the upgrade handshake, masked text frames out,
//! and a frame reader that hands each complete text message to a callback as a slice of its
//! read buffer.
//!
//! Why hand-rolled: a subscriber must cost well under a microsecond per frame to count a
//! million frames a second, so messages are never copied, parsed as JSON or allocated; one
//! `read` yields every complete frame in the buffer. Pings are answered, a close frame ends the
//! connection with its code. Server frames are expected unmasked (they are, per RFC 6455).

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http::Target;
use crate::tls::Stream;

/// Largest message accepted; bigger ones mean something is wrong.
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Largest upgrade response head.
const MAX_HEAD_BYTES: usize = 8 << 10;
/// Masking key of client frames (any key is valid; the server unmasks).
const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x8e];
/// A syntactically valid `Sec-WebSocket-Key` (16 bytes, base64).
const KEY: &str = "Zmx1eC1sb2FkdGVzdC0xNg==";

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    Open,
    /// The server sent a close frame (with its code, if any) or closed the socket (`None`).
    Closed(Option<u16>),
}

pub struct WsClient {
    stream: Stream,
    /// Bytes read but not yet consumed are `buffer[start..end]`.
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    /// Reassembly of a fragmented message (the server does not fragment; kept for safety).
    fragments: Vec<u8>,
}

impl WsClient {
    /// Connects and upgrades to a WebSocket on `/api/ws` (under the URL's base path); `buffer_bytes` is the initial read
    /// buffer (it grows for larger frames).
    pub async fn connect(target: &Target, buffer_bytes: usize) -> io::Result<WsClient> {
        let mut stream = target.connect().await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            target.path("/api/ws"),
            target.authority
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buffer = vec![0u8; buffer_bytes.max(MAX_HEAD_BYTES)];
        let mut end = 0;
        let head_end = loop {
            if end == MAX_HEAD_BYTES {
                return Err(invalid("upgrade response head too large"));
            }
            let n = stream.read(&mut buffer[end..MAX_HEAD_BYTES]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the upgrade",
                ));
            }
            end += n;
            if let Some(at) = memchr::memmem::find(&buffer[..end], b"\r\n\r\n") {
                break at + 4;
            }
        };
        if !buffer.starts_with(b"HTTP/1.1 101") {
            let line = buffer[..head_end]
                .split(|&b| b == b'\r')
                .next()
                .unwrap_or_default();
            return Err(invalid(&format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(line)
            )));
        }
        buffer.truncate(buffer_bytes.max(end));
        buffer.resize(buffer_bytes.max(end), 0);
        Ok(WsClient {
            stream,
            buffer,
            start: head_end,
            end,
            fragments: Vec::new(),
        })
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x81);
        if payload.len() < 126 {
            frame.push(0x80 | payload.len() as u8);
        } else if payload.len() <= usize::from(u16::MAX) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        self.stream.write_all(&frame).await
    }

    /// Subscribes to `pattern` (`{"type":"subscribe","entity_id":...}`).
    pub async fn subscribe(&mut self, pattern: &str) -> io::Result<()> {
        let message = serde_json::json!({"type": "subscribe", "entity_id": pattern});
        self.send_text(message.to_string().as_bytes()).await
    }

    /// Waits for bytes, then passes every complete text message to `on_text`. Messages left
    /// over from the handshake are delivered on the first call before reading.
    pub async fn read_messages(&mut self, mut on_text: impl FnMut(&[u8])) -> io::Result<ReadState> {
        if self.start == self.end || !self.has_complete_frame() {
            self.make_room();
            let n = self.stream.read(&mut self.buffer[self.end..]).await?;
            if n == 0 {
                return Ok(ReadState::Closed(None));
            }
            self.end += n;
        }
        let mut pong: Option<Vec<u8>> = None;
        while let Some((header, length)) = frame_extent(&self.buffer[self.start..self.end])? {
            let frame_start = self.start;
            let payload_start = frame_start + header;
            self.start = payload_start + length;
            let first = self.buffer[frame_start];
            if self.buffer[frame_start + 1] & 0x80 != 0 {
                let key: [u8; 4] = self.buffer[payload_start - 4..payload_start]
                    .try_into()
                    .map_err(|_| invalid("mask"))?;
                for (i, b) in self.buffer[payload_start..self.start]
                    .iter_mut()
                    .enumerate()
                {
                    *b ^= key[i % 4];
                }
            }
            let payload = &self.buffer[payload_start..self.start];
            let fin = first & 0x80 != 0;
            match first & 0x0f {
                0x1 | 0x2 if fin => on_text(payload),
                0x1 | 0x2 => {
                    self.fragments.clear();
                    self.fragments.extend_from_slice(payload);
                }
                0x0 => {
                    self.fragments.extend_from_slice(payload);
                    if self.fragments.len() > MAX_MESSAGE_BYTES {
                        return Err(invalid("fragmented message too large"));
                    }
                    if fin {
                        on_text(&self.fragments);
                        self.fragments.clear();
                    }
                }
                0x8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Ok(ReadState::Closed(code));
                }
                0x9 => pong = Some(payload.to_vec()),
                _ => {}
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if let Some(payload) = pong {
            self.send_control(0xA, &payload).await?;
        }
        Ok(ReadState::Open)
    }

    fn has_complete_frame(&self) -> bool {
        matches!(
            frame_extent(&self.buffer[self.start..self.end]),
            Ok(Some(_))
        )
    }

    /// Ensures free space after `end`, enough for the frame being received.
    fn make_room(&mut self) {
        let pending = self.end - self.start;
        let needed = match frame_extent(&self.buffer[self.start..self.end]) {
            Err(_) | Ok(Some(_)) => pending,
            Ok(None) => partial_frame_bytes(&self.buffer[self.start..self.end]).unwrap_or(pending),
        };
        if self.start > 0
            && (self.end == self.buffer.len() || needed > self.buffer.len() - self.start)
        {
            self.buffer.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
        }
        let target = needed.max(self.end + 1);
        if target > self.buffer.len() {
            self.buffer.resize(target.max(self.buffer.len() * 2), 0);
        }
    }

    async fn send_control(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let payload = &payload[..payload.len().min(125)];
        let mut frame = Vec::with_capacity(payload.len() + 6);
        frame.push(0x80 | opcode);
        frame.push(0x80 | payload.len() as u8);
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        self.stream.write_all(&frame).await
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// `(header bytes, payload bytes)` of the complete frame at the start of `bytes`, `None` when
/// it is not complete yet.
fn frame_extent(bytes: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let Some((header, length)) = frame_header(bytes)? else {
        return Ok(None);
    };
    Ok((bytes.len() >= header + length).then_some((header, length)))
}

/// Bytes the frame at the start of `bytes` occupies in total, once its header is known.
fn partial_frame_bytes(bytes: &[u8]) -> Option<usize> {
    frame_header(bytes).ok().flatten().map(|(h, l)| h + l)
}

fn frame_header(bytes: &[u8]) -> io::Result<Option<(usize, usize)>> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let masked = bytes[1] & 0x80 != 0;
    let (mut header, length) = match bytes[1] & 0x7f {
        126 => {
            if bytes.len() < 4 {
                return Ok(None);
            }
            (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]])))
        }
        127 => {
            if bytes.len() < 10 {
                return Ok(None);
            }
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[2..10]);
            (
                10,
                usize::try_from(u64::from_be_bytes(raw)).unwrap_or(usize::MAX),
            )
        }
        n => (2, usize::from(n)),
    };
    if masked {
        header += 4;
    }
    if length > MAX_MESSAGE_BYTES {
        return Err(invalid("frame too large"));
    }
    Ok(Some((header, length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_extents() {
        assert_eq!(frame_extent(&[0x81]).unwrap(), None);
        assert_eq!(frame_extent(&[0x81, 3, b'a', b'b']).unwrap(), None);
        assert_eq!(frame_extent(&[0x81, 2, b'a', b'b']).unwrap(), Some((2, 2)));
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.resize(4 + 256, b'x');
        assert_eq!(frame_extent(&long).unwrap(), Some((4, 256)));
        assert_eq!(partial_frame_bytes(&long[..10]), Some(260));
        assert!(frame_extent(&[0x81, 127, 0xff, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
