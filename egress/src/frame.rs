//! WebSocket framing (RFC 6455) for the two directions Flux needs.
//!
//! Server → client: complete, unmasked frames encoded once into [`Bytes`] so every receiving
//! connection shares one buffer. Client → server: [`FrameReader`] reads masked frames into a
//! buffer that exists only while bytes are pending (an idle connection holds none), enforces
//! the protocol rules a server must (masking, control frame limits, continuation order, close
//! codes, UTF-8 text) and caps a message at [`MAX_MESSAGE_BYTES`].

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::tcp::OwnedReadHalf;

/// Largest client message (after reassembly) the server accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;
/// Bytes reserved for a read when data is pending; frames larger grow the buffer as needed.
const READ_CHUNK_BYTES: usize = 512;

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// Close codes used by the server.
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// A complete server frame (FIN set, unmasked) with `opcode` and `payload`.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    encode_into(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Writes the header of a server frame whose payload of `len` bytes follows.
pub fn encode_into(out: &mut BytesMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// A close frame with `code` and a reason (truncated to fit a control frame).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OPCODE_CLOSE, &payload)
}

/// One complete client message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The client's close code, if it sent one (always one a peer may send).
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The client broke the protocol; close with 1002 and this reason.
    Protocol(&'static str),
    /// A message exceeded [`MAX_MESSAGE_BYTES`]; close with 1009.
    TooBig,
    /// A text message (or a close reason) is not UTF-8; close with 1007.
    NotUtf8,
    /// The connection ended or failed.
    Closed,
}

/// Reads client frames from a TCP stream.
#[derive(Default)]
pub struct FrameReader {
    /// Bytes received but not yet consumed; empty (unallocated) between messages when idle.
    buf: Vec<u8>,
    /// A fragmented message being reassembled: its opcode and payload so far.
    partial: Option<(u8, Vec<u8>)>,
}

impl FrameReader {
    /// A reader that starts with `early` bytes already received.
    pub fn with_bytes(early: &[u8]) -> Self {
        FrameReader {
            buf: early.to_vec(),
            partial: None,
        }
    }

    /// Reads until one message (or control frame) is complete.
    pub async fn next(&mut self, stream: &mut OwnedReadHalf) -> Result<Message, ReadError> {
        loop {
            if let Some(message) = self.parse()? {
                if self.buf.is_empty() {
                    self.buf = Vec::new(); // An idle connection keeps no buffer.
                }
                return Ok(message);
            }
            stream.readable().await.map_err(|_| ReadError::Closed)?;
            self.buf.reserve(READ_CHUNK_BYTES);
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(ReadError::Closed),
            }
        }
    }

    /// Takes one frame off the buffer if it is complete; returns a message once one is whole.
    fn parse(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            let Some((header, len)) = self.frame_extent()? else {
                return Ok(None);
            };
            let b0 = self.buf[0];
            let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
            let mut mask = [0u8; 4];
            mask.copy_from_slice(&self.buf[header - 4..header]);
            let mut payload: Vec<u8> = self.buf[header..header + len].to_vec();
            self.buf.drain(..header + len);
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i & 3];
            }
            match opcode {
                OPCODE_PING => return Ok(Some(Message::Ping(payload))),
                OPCODE_PONG => return Ok(Some(Message::Pong)),
                OPCODE_CLOSE => return close_message(&payload).map(Some),
                OPCODE_TEXT | OPCODE_BINARY => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol(
                            "new message before the previous one ended",
                        ));
                    }
                    if fin {
                        return data_message(opcode, payload).map(Some);
                    }
                    self.partial = Some((opcode, payload));
                }
                OPCODE_CONTINUATION => {
                    let Some((first, mut so_far)) = self.partial.take() else {
                        return Err(ReadError::Protocol("continuation frame without a message"));
                    };
                    if so_far.len() + payload.len() > MAX_MESSAGE_BYTES {
                        return Err(ReadError::TooBig);
                    }
                    so_far.extend_from_slice(&payload);
                    if fin {
                        return data_message(first, so_far).map(Some);
                    }
                    self.partial = Some((first, so_far));
                }
                _ => return Err(ReadError::Protocol("unknown opcode")),
            }
        }
    }

    /// Header length and payload length of the frame at the front of the buffer, once it is
    /// entirely buffered; checks the rules that do not need the payload.
    fn frame_extent(&self) -> Result<Option<(usize, usize)>, ReadError> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let opcode = b0 & 0x0F;
        let (len, mut header) = match b1 & 0x7F {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
                10,
            ),
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        if opcode >= OPCODE_CLOSE && (b0 & 0x80 == 0 || len > 125) {
            return Err(ReadError::Protocol(
                "control frames must be whole and at most 125 bytes",
            ));
        }
        if len > MAX_MESSAGE_BYTES as u64 {
            return Err(ReadError::TooBig);
        }
        header += 4;
        let len = len as usize;
        Ok((buf.len() >= header + len).then_some((header, len)))
    }
}

fn data_message(opcode: u8, payload: Vec<u8>) -> Result<Message, ReadError> {
    if opcode == OPCODE_BINARY {
        Ok(Message::Binary(payload))
    } else if std::str::from_utf8(&payload).is_err() {
        Err(ReadError::NotUtf8)
    } else {
        Ok(Message::Text(payload))
    }
}

/// A close frame's payload: empty, or a code a peer may send (RFC 6455 §7.4) and a UTF-8
/// reason. 1005, 1006 and 1015 only ever stand for a missing code inside an endpoint.
fn close_message(payload: &[u8]) -> Result<Message, ReadError> {
    let Some((code, reason)) = payload.split_first_chunk::<2>() else {
        return match payload.len() {
            0 => Ok(Message::Close(None)),
            _ => Err(ReadError::Protocol("a close frame's code takes two bytes")),
        };
    };
    let code = u16::from_be_bytes(*code);
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(ReadError::Protocol("invalid close code"));
    }
    if std::str::from_utf8(reason).is_err() {
        return Err(ReadError::NotUtf8);
    }
    Ok(Message::Close(Some(code)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn parse_all(bytes: &[u8]) -> Result<Vec<Message>, ReadError> {
        let mut reader = FrameReader::default();
        let mut out = Vec::new();
        // Feed one byte at a time: frames split anywhere must reassemble.
        for &b in bytes {
            reader.buf.push(b);
            while let Some(m) = reader.parse()? {
                out.push(m);
            }
        }
        Ok(out)
    }

    #[test]
    fn reads_masked_text_fragments_and_control_frames() {
        let mut bytes = masked(0x81, b"{\"type\":\"subscribe\"}");
        bytes.extend(masked(0x01, b"ab"));
        bytes.extend(masked(0x89, b"ping!")); // control frames may interleave fragments
        bytes.extend(masked(0x80, b"cd"));
        bytes.extend(masked(0x81, &vec![b'x'; 300]));
        bytes.extend(masked(0x88, &1000u16.to_be_bytes()));
        let messages = parse_all(&bytes).expect("valid");
        assert_eq!(
            messages,
            vec![
                Message::Text(b"{\"type\":\"subscribe\"}".to_vec()),
                Message::Ping(b"ping!".to_vec()),
                Message::Text(b"abcd".to_vec()),
                Message::Text(vec![b'x'; 300]),
                Message::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn refuses_protocol_violations_and_oversized_messages() {
        assert_eq!(
            parse_all(&[0x81, 0x01, b'a']),
            Err(ReadError::Protocol("client frames must be masked"))
        );
        assert!(matches!(
            parse_all(&masked(0x80, b"x")),
            Err(ReadError::Protocol(_))
        ));
        assert!(matches!(
            parse_all(&masked(0x09, b"x")),
            Err(ReadError::Protocol(_))
        ));
        assert_eq!(
            parse_all(&masked(0x81, &vec![0; MAX_MESSAGE_BYTES + 1])),
            Err(ReadError::TooBig)
        );
        let mut two = masked(0x01, &vec![0; MAX_MESSAGE_BYTES]);
        two.extend(masked(0x80, b"y"));
        assert_eq!(parse_all(&two), Err(ReadError::TooBig));
    }

    #[test]
    fn text_must_be_utf8_and_close_codes_valid() {
        assert_eq!(
            parse_all(&masked(0x81, b"{\"type\":\"\xff\"}")),
            Err(ReadError::NotUtf8)
        );
        // Checked once the message is whole: a character may span two fragments.
        let mut split = masked(0x01, &"é".as_bytes()[..1]);
        split.extend(masked(0x80, &"é".as_bytes()[1..]));
        assert_eq!(parse_all(&split), Ok(vec![Message::Text("é".into())]));
        assert_eq!(
            parse_all(&masked(0x82, b"\xff")),
            Ok(vec![Message::Binary(vec![0xff])])
        );
        assert_eq!(
            parse_all(&masked(0x88, b"")),
            Ok(vec![Message::Close(None)])
        );
        for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert_eq!(
                parse_all(&masked(0x88, &code.to_be_bytes())),
                Ok(vec![Message::Close(Some(code))]),
                "{code}"
            );
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(
                parse_all(&masked(0x88, &code.to_be_bytes())),
                Err(ReadError::Protocol("invalid close code")),
                "{code}"
            );
        }
        assert!(matches!(
            parse_all(&masked(0x88, b"\x03")),
            Err(ReadError::Protocol(_))
        ));
        assert_eq!(
            parse_all(&masked(0x88, b"\x03\xe8\xff")),
            Err(ReadError::NotUtf8)
        );
    }

    #[test]
    fn encodes_every_length_form() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let frame = encode(OPCODE_TEXT, &vec![b'a'; len]);
            let header = match len {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            };
            assert_eq!(frame.len(), header + len);
            assert_eq!(frame[0], 0x81);
        }
        let c = close(1008, "queue overflow");
        assert_eq!(&c[..4], &[0x88, 16, 0x03, 0xF0]);
    }
}
