//! Body types and helpers shared by the handlers: response bodies, limited body reading, CORS,
//! query strings, path decoding and the request framing checks hyper leaves to us.
//!
//! Invariant: a request body is never read past its limit. A declared `Content-Length` over the
//! limit is refused before any byte is read; a chunked body is refused as soon as it exceeds it.

use std::borrow::Cow;
use std::convert::Infallible;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};

use crate::error::ApiError;

/// Every response body: a full buffer or a stream, boxed.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;
pub type Response = hyper::Response<Body>;
pub type Request = hyper::Request<Incoming>;

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed_unsync()
}

/// What a connection's handlers tell its socket, one per connection task (`serve` scopes it
/// around the connection, so no request pays for it). hyper handles one request at a time per
/// connection, so one flag per fact is enough.
#[derive(Default)]
pub struct ConnectionState {
    /// The request being handled had its body read to the end ([`read_body`]).
    body_read: std::cell::Cell<bool>,
    /// An answer went out with a request's body unread: the client may still be sending it.
    answered_unread: std::cell::Cell<bool>,
}

tokio::task_local! {
    /// The state of the connection whose task this is.
    pub static CONNECTION: ConnectionState;
}

/// Before a request is handled: nothing of its body read yet.
pub fn body_read_starts() {
    let _ = CONNECTION.try_with(|c| c.body_read.set(false));
}

/// After a request was handled: whether its handler read its body to the end (true outside a
/// connection task, where nobody asks).
pub fn body_was_read() -> bool {
    CONNECTION.try_with(|c| c.body_read.get()).unwrap_or(true)
}

/// An answer is going out with its request's body unread.
pub fn note_answered_unread() {
    let _ = CONNECTION.try_with(|c| c.answered_unread.set(true));
}

/// Whether this connection answered a request whose body it did not read.
pub fn answered_unread() -> bool {
    CONNECTION
        .try_with(|c| c.answered_unread.get())
        .unwrap_or(false)
}

/// Whether `request` says it carries a body (a `Content-Length` above 0, or chunked).
pub fn declares_body(request: &Request) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// The slowest average rate a request body may arrive at once its first `idle` period is
/// over: a client trickling a byte now and then, each gap just under the timeout, would
/// otherwise hold its request open for ever.
pub const MIN_BODY_BYTES_PER_SECOND: u64 = 1024;

/// Reads the whole body of `request`, refusing with 413 once it exceeds `limit` bytes, and
/// with 408 when no byte of it arrives for `idle`, or when it has taken longer than `idle`
/// plus its length at [`MIN_BODY_BYTES_PER_SECOND`] (a stalled or trickling client never
/// holds a request open for longer).
pub async fn read_body(request: Request, limit: usize, idle: Duration) -> Result<Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large());
    }
    let mut body = request.into_body();
    let mut buf = BytesMut::with_capacity(declared.map_or(8 << 10, |n| n as usize));
    let mut started = None;
    loop {
        // The timer is only armed when a frame is not already there.
        let now = tokio::time::Instant::now();
        let allowed = *started.get_or_insert(now) + idle + body_time(buf.len());
        let deadline = (now + idle).min(allowed);
        let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| {
                if !buf.is_empty() && allowed < now + idle {
                    ApiError::body_too_slow(MIN_BODY_BYTES_PER_SECOND, buf.len())
                } else {
                    ApiError::request_timeout(idle)
                }
            })?
        else {
            break;
        };
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading the body failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ApiError::payload_too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    let _ = CONNECTION.try_with(|c| c.body_read.set(true));
    Ok(buf.freeze())
}

/// How long `bytes` take at [`MIN_BODY_BYTES_PER_SECOND`].
fn body_time(bytes: usize) -> Duration {
    Duration::from_micros(bytes as u64 * 1_000_000 / MIN_BODY_BYTES_PER_SECOND)
}

/// The body as text, refusing anything but a JSON object (serde would also map an array onto
/// a struct's fields, in order).
pub fn object_body(body: &[u8]) -> Result<&str, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid JSON: body is not UTF-8"))?;
    if text.trim_start().starts_with('{') {
        Ok(text)
    } else {
        Err(ApiError::bad_request("body must be a JSON object"))
    }
}

/// `Access-Control-Allow-Origin` of every response.
pub const CORS_ALLOW_ORIGIN: &str = "*";
/// `Access-Control-Expose-Headers` of every response.
pub const CORS_EXPOSE_HEADERS: &str = "Retry-After, Content-Type";

/// Adds the CORS headers every response carries.
pub fn add_cors(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static(CORS_ALLOW_ORIGIN),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(CORS_EXPOSE_HEADERS),
    );
}

/// The answer to a CORS preflight (`OPTIONS`).
pub fn preflight() -> Response {
    let mut response = hyper::Response::new(full(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// Query parameters, decoded as forms encode them (`%XX`, and `+` for a space). A key or
/// value that is not UTF-8 once decoded is refused, naming the key.
pub fn query_params(request: &Request) -> Result<Vec<(String, String)>, ApiError> {
    let Some(query) = request.uri().query() else {
        return Ok(Vec::new());
    };
    let decode = |raw: &str| {
        let raw = raw.replace('+', " ");
        percent_encoding::percent_decode_str(&raw)
            .decode_utf8()
            .map(Cow::into_owned)
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key)
                .map_err(|_| ApiError::bad_request("a query parameter's name is not UTF-8"))?;
            let value = decode(value).map_err(|_| {
                ApiError::bad_request(format!("query parameter {key} is not UTF-8"))
            })?;
            Ok((key, value))
        })
        .collect()
}

/// Refuses a request whose framing HTTP/1.1 forbids and hyper lets through (RFC 9112):
/// several `Host` headers (§3.2), and a transfer coding other than one `chunked` (§6.1: 501
/// for a coding the server does not know, as it could not read the body). A missing `Host`
/// is let through: Flux serves one site, and hand-written load generators leave it out.
pub fn refuse_framing(request: &Request) -> Result<(), ApiError> {
    let headers = request.headers();
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err(ApiError::bad_request("more than one Host header"));
    }
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let value = value.to_str().unwrap_or("?");
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(ApiError::not_implemented(format!(
                    "Transfer-Encoding {coding:?} is not supported: send the body as is or chunked"
                )));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(ApiError::bad_request(
            "Transfer-Encoding: chunked may be applied only once",
        ));
    }
    Ok(())
}

pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Percent-decodes a path segment (`acme%2Fpump-01` → `acme/pump-01`); `what` names it in the
/// error (`entity id`, `namespace name`, `connector name`).
pub fn decode_path<'a>(raw: &'a str, what: &str) -> Result<Cow<'a, str>, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request(format!("{what} in the path is not valid UTF-8")))
}
