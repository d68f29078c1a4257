//! The connection as hyper sees it ([`ApiIo`]): reads and writes pass through to the socket,
//! except hyper's own answers to requests it cannot parse, and writes the client takes nothing
//! of for too long.
//!
//! hyper answers a request it cannot parse (a garbled request line, a bad `Content-Length`, a
//! URI or header block over its limits, an unknown HTTP version) by itself, before any handler
//! runs: a 4xx or 5xx head with `connection: close`, `content-length: 0` and no body. SPEC wants
//! every error as `{"error": ...}` with the CORS headers every answer carries, so such a head
//! is written out with that body instead.
//!
//! Invariants:
//! - Only hyper's own error heads are rewritten: a complete head (ending in a blank line) with a
//!   4xx/5xx status, `connection: close`, `content-length: 0` and no `content-type`. Every error
//!   of Flux's handlers has a JSON body and a `content-type`, so none of them matches.
//! - hyper is told its head went out only once the whole rewritten answer did; until then a
//!   write is pending (hyper offers the same bytes again), so nothing it sends later can slip
//!   in between.
//! - The socket comes back whole for a WebSocket upgrade ([`ApiIo::into_tcp`]).
//! - A write (or flush) the socket takes nothing of for the write timeout fails (`TimedOut`),
//!   so hyper drops the connection: a client that stops reading an answer cannot hold its
//!   socket and the answer's buffers for ever. The timer exists only while a write waits.
//! - A connection hyper closes while the client may still be sending (bytes unread in the
//!   socket, or an answer given to a request whose body was not read) is half-closed and
//!   drained for up to `LINGER` before it is dropped, so the answer reaches the client instead
//!   of a reset.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::error_body;
use crate::http::{CORS_ALLOW_ORIGIN, CORS_EXPOSE_HEADERS};

/// A connection's socket for hyper.
pub struct ApiIo {
    io: TokioIo<TcpStream>,
    /// A rewritten error answer not yet fully written.
    rewrite: Option<Rewrite>,
    /// How long a write may wait for the socket to take anything.
    write_timeout: Duration,
    /// Armed when a write starts waiting; gone once one completes.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Armed when the connection closes with bytes from the client unread or still coming.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

struct Rewrite {
    bytes: Vec<u8>,
    sent: usize,
    /// The length of hyper's head it stands for: what hyper is told went out.
    replaces: usize,
}

impl ApiIo {
    pub fn new(stream: TcpStream, write_timeout: Duration) -> ApiIo {
        ApiIo {
            io: TokioIo::new(stream),
            rewrite: None,
            write_timeout,
            stalled: None,
            linger: None,
        }
    }

    /// `poll`, a write's outcome, bounded by the write timeout: pending for longer than that
    /// since the last write that completed, it fails.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stalled.as_mut().poll(cx));
        self.stalled = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing of the answer for the write timeout",
        )))
    }

    /// The socket, for a connection upgraded to a WebSocket.
    pub fn into_tcp(self) -> TcpStream {
        self.io.into_inner()
    }

    /// Starts rewriting `head` if it is one of hyper's own error heads.
    fn take(&mut self, head: &[u8]) -> bool {
        match error_answer(head) {
            Some(bytes) => {
                self.rewrite = Some(Rewrite {
                    bytes,
                    sent: 0,
                    replaces: head.len(),
                });
                true
            }
            None => false,
        }
    }

    /// Writes what is left of the rewritten answer (if any); ready once all of it went.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rewrite) = &mut self.rewrite {
            if rewrite.sent == rewrite.bytes.len() {
                break;
            }
            let written =
                ready!(Pin::new(&mut self.io).poll_write(cx, &rewrite.bytes[rewrite.sent..]));
            match written {
                Ok(0) => {
                    self.rewrite = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => rewrite.sent += n,
                Err(error) => {
                    self.rewrite = None;
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A write of hyper's that a rewrite stands for: ready, with the length of hyper's head,
    /// once the whole rewritten answer went.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        Poll::Ready(Ok(self
            .rewrite
            .take()
            .map_or(0, |rewrite| rewrite.replaces)))
    }
}

impl Read for ApiIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for ApiIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = if this.rewrite.is_some() || this.take(buf) {
            this.poll_rewrite(cx)
        } else {
            Pin::new(&mut this.io).poll_write(cx, buf)
        };
        this.bounded(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty());
        let poll = if this.rewrite.is_some() || first.is_some_and(|head| this.take(head)) {
            this.poll_rewrite(cx)
        } else {
            Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
        };
        this.bounded(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // A rewrite still being written goes out first; hyper learns that its head went at its
    // next write of it (the record stays until then, so it is not rewritten twice).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = match this.drive(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        };
        this.bounded(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drive(cx))?;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            // An answer to a body left unread: the client may still be sending it, even if
            // none of it has arrived yet.
            if !crate::http::answered_unread() && !unread_bytes(this.io.inner().as_raw_fd()) {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        this.poll_linger(cx)
    }
}

impl ApiIo {
    /// Reads and drops what the client still sends, until it closes or [`LINGER`] has passed.
    /// Closing a socket that holds unread bytes answers with a reset, which can destroy the
    /// answer just written before the client reads it: a client that sends a whole body over
    /// the limit before it reads (Python's `http.client`) would see a broken pipe instead of
    /// its 413.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        loop {
            if self
                .linger
                .as_mut()
                .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = tokio::io::ReadBuf::uninit(&mut scratch);
            match tokio::io::AsyncRead::poll_read(Pin::new(self.io.inner_mut()), cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client closed (or reset): done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Longest a closing connection keeps reading what its client still sends
/// ([`ApiIo::poll_linger`]).
const LINGER: Duration = Duration::from_secs(2);

/// Whether the socket `fd` holds bytes nobody has read yet.
pub(crate) fn unread_bytes(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is the socket of a connection the caller still owns, so it is open; `recv`
    // writes at most one byte into `byte`, and MSG_PEEK leaves the bytes in the socket.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// hyper's own error heads are a status line and three short headers.
const OWN_HEAD_MAX_BYTES: usize = 256;

/// hyper's own error head rewritten with SPEC's body, or `None` for anything else.
fn error_answer(head: &[u8]) -> Option<Vec<u8>> {
    // Cheap first: every other write (answers, their bodies, WebSocket frames) fails here.
    let candidate = head.len() <= OWN_HEAD_MAX_BYTES
        && head.starts_with(b"HTTP/1.1 ")
        && matches!(head.get(9), Some(b'4' | b'5'))
        && head.ends_with(b"\r\n\r\n");
    if !candidate {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let status_line = text.strip_prefix("HTTP/1.1 ")?;
    let code: u16 = status_line.get(..3)?.parse().ok()?;
    let lower = text.to_ascii_lowercase();
    let own = (400..600).contains(&code)
        && text.ends_with("\r\n\r\n")
        && lower.contains("\r\nconnection: close\r\n")
        && lower.contains("\r\ncontent-length: 0\r\n")
        && !lower.contains("\r\ncontent-type:");
    if !own {
        return None;
    }
    let reason = match code {
        400 => "malformed HTTP request: bad request line, header or Content-Length",
        414 => "request URI too long",
        431 => "request headers too large",
        505 => "HTTP version not supported: use HTTP/1.1",
        _ => "malformed HTTP request",
    };
    let body = error_body(reason);
    let at = lower.find("\r\ncontent-length: 0\r\n")? + 2;
    let end = at + "content-length: 0\r\n".len();
    let mut out = Vec::with_capacity(head.len() + 160 + body.len());
    out.extend_from_slice(&head[..at]);
    out.extend_from_slice(
        format!(
            "content-type: application/json\r\naccess-control-allow-origin: {CORS_ALLOW_ORIGIN}\r\n\
             access-control-expose-headers: {CORS_EXPOSE_HEADERS}\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&head[end..]);
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through a real socket: hyper's error head is answered with the rewrite and hyper is told
    /// its own length went; a flush in between does not make it go twice; other writes pass
    /// through as they are.
    #[tokio::test]
    async fn a_rewrite_stands_for_hypers_write_and_goes_once() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let mut io = ApiIo::new(
            listener.accept().await.expect("accept").0,
            Duration::from_secs(10),
        );
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                     content-length: 0\r\n\r\n";
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert!(io.take(head), "hyper's head is taken");
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_flush(cx))
            .await
            .expect("flush");
        let written = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, head))
            .await
            .expect("write");
        assert_eq!(written, head.len(), "hyper is told its head went");
        let written = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, reply))
            .await
            .expect("write");
        assert_eq!(written, reply.len());
        drop(io);
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.expect("read");
        let expected = [error_answer(head).expect("rewritten"), reply.to_vec()].concat();
        assert_eq!(
            String::from_utf8_lossy(&received),
            String::from_utf8_lossy(&expected)
        );
    }

    #[test]
    fn only_hypers_own_error_heads_get_a_body() {
        let head = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                     date: Tue, 24 Nov 2026 20:46:29 GMT\r\n\r\n";
        let answer = String::from_utf8(error_answer(head).expect("rewritten")).expect("UTF-8");
        let (new_head, body) = answer.split_once("\r\n\r\n").expect("a head");
        assert!(
            new_head.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(new_head.contains("\r\ndate: Tue, 24 Nov 2026"), "{answer}");
        assert!(new_head.contains("\r\nconnection: close"), "{answer}");
        assert!(
            new_head.contains("\r\ncontent-type: application/json"),
            "{answer}"
        );
        assert!(
            new_head.contains("\r\naccess-control-allow-origin: *"),
            "{answer}"
        );
        assert!(
            new_head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{answer}"
        );
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("Content-Length"))
        );

        let not_ours = [
            // A handler's error: it has a body and a content type.
            &b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: application/json\r\n\
               content-length: 0\r\n\r\n"[..],
            // Success, an empty 404 kept open, a head without its blank line.
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n",
            b"{\"type\":\"state_update\"}",
        ];
        for head in not_ours {
            assert_eq!(
                error_answer(head),
                None,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
