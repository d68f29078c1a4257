//! `https://` targets: the TLS client both clients (HTTP and WebSocket) run over, and the
//! stream type that is either a plain socket or a TLS session on one.
//!
//! Flux serves plain HTTP; a deployment usually puts a TLS terminator in front of it, and the
//! generator must reach it there. Which certificates are trusted is `flux_tls`'s policy, the
//! one the `flux` CLI follows too: the system's roots plus any `--ca-cert` PEM file, or one of
//! that file's certificates exactly; there is no way to skip the check.
//!
//! A handshake refused over the server's certificate (not trusted, or not naming the host)
//! fails with an error that says so and what `--ca-cert` takes, the rustls reason in
//! parentheses.
//!
//! Invariants: a TLS stream is always checked against the host name (or IP address) of
//! `--url`; `Nodelay` is set on the socket before the handshake, as for plain streams.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use flux_tls::rustls::Error as TlsError;
use flux_tls::rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How to open TLS sessions to one server.
#[derive(Clone)]
pub struct TlsTarget {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsTarget {
    /// Checks certificates for `host` (a name or an IP address, no port) against the system's
    /// roots and the certificates in `ca_cert`.
    pub fn new(host: &str, ca_cert: Option<&Path>) -> anyhow::Result<TlsTarget> {
        let config = flux_tls::client_config(ca_cert)?;
        Ok(TlsTarget {
            connector: TlsConnector::from(Arc::new(config)),
            name: flux_tls::server_name(host)?,
        })
    }
}

/// A connection to the server: plain, or TLS over the socket.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Connects to `addr` and, with `tls`, completes the TLS handshake.
    pub async fn connect(
        addr: std::net::SocketAddr,
        tls: Option<&TlsTarget>,
    ) -> io::Result<Stream> {
        let socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        match tls {
            None => Ok(Stream::Plain(socket)),
            Some(tls) => {
                let session = tls
                    .connector
                    .connect(tls.name.clone(), socket)
                    .await
                    .map_err(|error| explain_certificate_error(error, &tls.name))?;
                Ok(Stream::Tls(Box::new(session)))
            }
        }
    }
}

/// A handshake error over the server's certificate, told as [`flux_tls::explain_refusal`]
/// does; any other error as it was.
fn explain_certificate_error(error: io::Error, name: &ServerName<'_>) -> io::Error {
    let explained = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<TlsError>())
        .and_then(|tls| flux_tls::explain_refusal(tls, &name.to_str()));
    match explained {
        Some(message) => io::Error::new(error.kind(), message),
        None => error,
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
