//! `https://` targets: the TLS client both clients (HTTP and WebSocket) run over, and the
//! stream type that is either a plain socket or a TLS session on one.
//!
//! Flux serves plain HTTP; a deployment usually puts a TLS terminator in front of it, and the
//! generator must reach it there. The server's certificate is checked against the system's
//! roots plus any `--ca-cert` PEM file (a private CA, a self-signed certificate), or is one of
//! that file's certificates exactly ([`ChainOrPinned`]); there is no way to skip the check. rustls runs on the `ring` provider the workspace already builds for
//! the NATS client.
//!
//! Invariants: a TLS stream is always checked against the host name (or IP address) of
//! `--url`; `Nodelay` is set on the socket before the handshake, as for plain streams.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
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
        let mut roots = rustls::RootCertStore::empty();
        // The system's store; certificates it cannot parse are skipped, as browsers do.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        let mut pinned = Vec::new();
        if let Some(path) = ca_cert {
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading --ca-cert {}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing --ca-cert {}", path.display()))?;
            if certs.is_empty() {
                anyhow::bail!("--ca-cert {} holds no PEM certificate", path.display());
            }
            for cert in certs {
                roots
                    .add(cert.clone())
                    .with_context(|| format!("--ca-cert {}", path.display()))?;
                pinned.push(cert);
            }
        }
        if roots.is_empty() {
            anyhow::bail!("no trusted certificate: the system has none, give --ca-cert");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chains = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .context("TLS certificate verifier")?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOrPinned { chains, pinned }))
            .with_no_client_auth();
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .with_context(|| format!("{host:?} is not a host name for TLS"))?
            .to_owned();
        Ok(TlsTarget {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

/// Checks a server's certificate chain against the trusted roots; failing that, accepts a
/// certificate that is byte for byte one of `--ca-cert`'s. `openssl req -x509` makes
/// self-signed certificates marked as CAs by default, which chain checks refuse to meet as a
/// server's own (`CaUsedAsEndEntity`); a user who handed over that exact certificate trusts it.
/// Handshake signatures are always checked, so the server must hold the certificate's key.
#[derive(Debug)]
struct ChainOrPinned {
    chains: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for ChainOrPinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.chains
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .or_else(|error| {
                if self
                    .pinned
                    .iter()
                    .any(|cert| cert.as_ref() == end_entity.as_ref())
                {
                    Ok(rustls::client::danger::ServerCertVerified::assertion())
                } else {
                    Err(error)
                }
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chains.supported_verify_schemes()
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
                let session = tls.connector.connect(tls.name.clone(), socket).await?;
                Ok(Stream::Tls(Box::new(session)))
            }
        }
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
