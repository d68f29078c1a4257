//! The HTTP side of the generator: where the server is, and one keep-alive hyper client
//! connection per task.
//!
//! Invariants: a [`Connection`] carries at most one request at a time (HTTP/1.1, no
//! pipelining); any transport error or timeout discards it, and the caller reconnects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::tls::{Stream, TlsTarget};

/// The server under test, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value, prebuilt so requests do not format it.
    pub host: HeaderValue,
    /// `host:port` as given, for the WebSocket handshake.
    pub authority: String,
    /// The path the API sits under (empty, or `/flux` for a server behind a proxy there).
    pub base: String,
    /// `Bearer <token>` for every HTTP request, from `--token`.
    pub authorization: Option<HeaderValue>,
    /// For `https://`: how sessions are opened, and the `--ca-cert` it trusts besides the
    /// system's roots (passed on to worker processes).
    pub tls: Option<TlsTarget>,
    pub ca_cert: Option<PathBuf>,
}

/// The parts of a `--url`: `http://` or `https://`, a host, an optional port, an optional path
/// the API sits under (a server behind a proxy at `/flux`); no query, fragment or credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlParts {
    pub https: bool,
    /// `host` or `host:port` as given (IPv6 hosts in brackets): the `Host` header.
    pub authority: String,
    /// `host:port`, the port filled in (80 or 443) when none was given.
    pub with_port: String,
    /// The host alone, for TLS.
    pub host: String,
    /// The path before `/api/...`, without a trailing `/`; empty for the server's root.
    pub base: String,
}

/// Checks and splits a `--url` (also the flag's parser, so a bad one is a usage error).
pub fn parse_url(text: &str) -> Result<UrlParts, String> {
    let url = url::Url::parse(text).map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        _ => {
            return Err(format!(
                "must start with http:// or https:// (got {text:?})"
            ));
        }
    };
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{text:?} carries credentials, which are never sent: give a token with --token"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?} has a query or fragment; give the server's root (the API paths are fixed)"
        ));
    }
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    Ok(UrlParts {
        https,
        with_port: format!("{host}:{port}"),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        authority,
        base: url.path().trim_end_matches('/').to_string(),
    })
}

impl Target {
    /// Resolves `http://host[:port][/base]` or `https://…` (port 80 or 443 by default); TLS
    /// trusts the system's roots and the certificates in `ca_cert`.
    pub fn parse_with(url: &str, ca_cert: Option<&Path>) -> anyhow::Result<Target> {
        let parts = parse_url(url).map_err(|reason| anyhow::anyhow!("--url {reason}"))?;
        let tls = if parts.https {
            Some(TlsTarget::new(&parts.host, ca_cert)?)
        } else if ca_cert.is_some() {
            // Flags that do not go together, as clap's own usage errors.
            return Err(
                crate::UsageError("--ca-cert is for https:// URLs; --url is http://").into(),
            );
        } else {
            None
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&parts.with_port)
            .with_context(|| format!("resolving {}", parts.with_port))?
            .next()
            .with_context(|| format!("{} resolves to no address", parts.with_port))?;
        Ok(Target {
            addr,
            host: HeaderValue::from_str(&parts.authority).context("host header")?,
            authority: parts.authority,
            base: parts.base,
            authorization: None,
            tls,
            ca_cert: ca_cert.map(Path::to_path_buf),
        })
    }

    /// The request target for an API `path` (`/api/...`) under the URL's base path.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `http://host:port[/base]` or `https://…`: the URL this target was parsed from.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.base)
    }

    /// Opens a connection (with the TLS handshake for `https://`).
    pub async fn connect(&self) -> std::io::Result<Stream> {
        Stream::connect(self.addr, self.tls.as_ref()).await
    }

    /// The target of `--url`, sending `--token` (if any) as a bearer token.
    pub fn from_common(common: &crate::cli::CommonArgs) -> anyhow::Result<Target> {
        let mut target = Target::parse_with(&common.url, common.ca_cert.as_deref())?;
        if let Some(token) = &common.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .context("--token must be printable ASCII")?;
            value.set_sensitive(true);
            target.authorization = Some(value);
        }
        Ok(target)
    }
}

/// The first connect failure of this process, to say why a run got no reply at all.
static FIRST_CONNECT_ERROR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Why the first connection attempt that failed did, if one did.
pub fn first_connect_error() -> Option<&'static str> {
    FIRST_CONNECT_ERROR.get().map(String::as_str)
}

/// The first refusal this process got (a status other than 200, or an event refused inside a
/// batch), with the start of the server's answer: it names the field or limit at fault.
static FIRST_REFUSAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// How much of a refusal's body is kept.
const REFUSAL_BODY_BYTES: usize = 300;

/// Keeps the reason for the first refusal, if none was kept yet: the `"error"` of a refused
/// request, or of the first refused event in a batch's results, else the start of the body.
pub fn note_refusal(status: StatusCode, body: &[u8]) {
    if FIRST_REFUSAL.get().is_some() {
        return;
    }
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|answer| {
        answer["error"].as_str().or_else(|| {
            answer["results"]
                .as_array()?
                .iter()
                .find_map(|result| result["error"].as_str())
        })
    });
    let reason = match error {
        Some(error) if status == StatusCode::OK => format!("an event of a batch: {error}"),
        Some(error) => format!("{}: {error}", status.as_u16()),
        None => {
            let shown = String::from_utf8_lossy(&body[..body.len().min(REFUSAL_BODY_BYTES)]);
            let more = if body.len() > REFUSAL_BODY_BYTES {
                "…"
            } else {
                ""
            };
            format!("{}: {}{more}", status.as_u16(), shown.trim_end())
        }
    };
    let _ = FIRST_REFUSAL.set(reason);
}

/// The first refusal this process got, if any.
pub fn first_refusal() -> Option<&'static str> {
    FIRST_REFUSAL.get().map(String::as_str)
}

/// What came back for one request.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Why a request produced no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    /// Connect, write or read failed.
    Io,
    /// No complete reply within the request timeout.
    Timeout,
}

impl TransportError {
    /// The key under `errors_by_status`.
    pub fn key(self) -> &'static str {
        match self {
            TransportError::Io => "transport",
            TransportError::Timeout => "timeout",
        }
    }
}

/// One keep-alive client connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    /// The server answered `Connection: close`: it takes no more requests on this one.
    closing: bool,
}

impl Connection {
    pub async fn open(target: &Target) -> Result<Connection, TransportError> {
        let stream = target.connect().await.map_err(|error| {
            let _ = FIRST_CONNECT_ERROR.set(format!("connecting to {}: {error}", target.url()));
            TransportError::Io
        })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| TransportError::Io)?;
        tokio::spawn(async move {
            // The connection ends with an error when the server or the generator closes it;
            // the request that saw it already reported the failure.
            let _ = connection.await;
        });
        Ok(Connection {
            sender,
            closing: false,
        })
    }

    /// Whether the next request needs a new connection: the server said it closes this one
    /// (a 413 does), or it is closed already.
    pub fn is_closed(&self) -> bool {
        self.closing || self.sender.is_closed()
    }

    /// Sends one request and reads the whole reply.
    pub async fn send(
        &mut self,
        target: &Target,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        let uri = if target.base.is_empty() {
            path.parse()
        } else {
            target.path(path).parse()
        };
        *request.uri_mut() = uri.map_err(|_| TransportError::Io)?;
        let headers = request.headers_mut();
        headers.insert(HOST, target.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(authorization) = &target.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let exchange = async {
            self.sender.ready().await.map_err(|_| TransportError::Io)?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|_| TransportError::Io)?;
            let status = response.status();
            self.closing = response
                .headers()
                .get(CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| TransportError::Io)?
                .to_bytes();
            Ok(Reply { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout)?
    }
}

/// A one-off request on a fresh connection (probes, polls, setup).
pub async fn request_once(
    target: &Target,
    method: Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Reply, TransportError> {
    let mut connection = tokio::time::timeout(timeout, Connection::open(target))
        .await
        .map_err(|_| TransportError::Timeout)??;
    connection.send(target, method, path, body, timeout).await
}

/// Reads an unsigned integer that follows `key` (e.g. `"successful":`) in a JSON body.
pub fn find_u64_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(body, key)? + key.len();
    let digits = &body[at..];
    let digits = &digits[..digits.iter().take_while(|b| b.is_ascii_digit()).count()];
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let target = Target::parse_with("http://127.0.0.1:3000/", None).unwrap();
        assert_eq!(target.addr.port(), 3000);
        assert_eq!(target.authority, "127.0.0.1:3000");
        assert!(Target::parse_with("ftp://x", None).is_err());
        let tls = Target::parse_with("https://127.0.0.1", None).unwrap();
        assert_eq!(
            (tls.addr.port(), tls.url().as_str()),
            (443, "https://127.0.0.1")
        );
        assert!(tls.tls.is_some());
        let plain_with_ca = Target::parse_with("http://127.0.0.1", Some(Path::new("ca.pem")));
        assert!(
            plain_with_ca
                .expect_err("--ca-cert with http://")
                .downcast_ref::<crate::UsageError>()
                .is_some()
        );
        assert_eq!(
            Target::parse_with("http://127.0.0.1", None)
                .unwrap()
                .addr
                .port(),
            80
        );
        let behind = Target::parse_with("http://127.0.0.1:3000/flux/", None).unwrap();
        assert_eq!(behind.path("/api/ws"), "/flux/api/ws");
        assert_eq!(behind.url(), "http://127.0.0.1:3000/flux");
        assert_eq!(
            Target::parse_with("HTTP://127.0.0.1:3000", None)
                .unwrap()
                .base,
            ""
        );
        for bad in [
            "http://127.0.0.1:3000?x=1",
            "http://127.0.0.1:3000#f",
            "http://127.0.0.1:notaport",
            "http://user:pw@127.0.0.1:3000",
            "http://",
            "127.0.0.1:3000",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} was taken");
        }
        let v6 = parse_url("http://[::1]:3000").unwrap();
        assert_eq!(
            (v6.authority.as_str(), v6.host.as_str()),
            ("[::1]:3000", "::1")
        );
    }

    #[test]
    fn finds_counts() {
        let body = br#"{"successful":1000,"failed":0,"results":[]}"#;
        assert_eq!(find_u64_after(body, b"\"successful\":"), Some(1000));
        assert_eq!(find_u64_after(body, b"\"failed\":"), Some(0));
        assert_eq!(find_u64_after(body, b"\"nope\":"), None);
    }
}
