//! API errors: each is born with its HTTP status, and one function renders `{"error": ...}`.

use bytes::Bytes;
use hyper::StatusCode;

use crate::http::{Response, full};

/// An error answered to the client. The message names the field or limit at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
    /// The methods for an `Allow` header (405).
    pub allow: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    pub fn request_timeout(idle: std::time::Duration) -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body: nothing received for {} s (request timeout)",
                idle.as_secs_f64()
            ),
        )
    }

    /// 408 for a body that arrives, but too slowly to ever finish in reasonable time.
    pub fn body_too_slow(min_bytes_per_second: u64, received: usize) -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body: arriving slower than {min_bytes_per_second} bytes/s \
                 ({received} bytes so far; request timeout)"
            ),
        )
    }

    pub fn payload_too_large() -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload too large")
    }

    /// 501, with `Connection: close`: the body's framing is not understood, so the
    /// connection cannot carry another request.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_IMPLEMENTED, message)
    }

    pub fn rate_limited(message: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after_seconds),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// 405 for a route that takes `allowed` (every route also answers `OPTIONS`, the CORS
    /// preflight); the list goes into the message and the `Allow` header.
    pub fn method_not_allowed(allowed: &str) -> Self {
        let allowed = format!("{allowed}, OPTIONS");
        ApiError {
            allow: Some(allowed.clone()),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed; allowed: {allowed}"),
            )
        }
    }

    /// The response: status plus `{"error": message}` (and `Retry-After` or `Allow` when
    /// set). A 413 or 501 also says `Connection: close`: the rest of its body is never read,
    /// so the connection cannot carry another request. A 401 names the scheme a client must
    /// use (`WWW-Authenticate: Bearer`).
    pub fn into_response(self) -> Response {
        let mut response = json_response(self.status, error_body(&self.message));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
        }
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_IMPLEMENTED
        ) {
            response.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        if let Some(allow) = self.allow.and_then(|a| a.parse().ok()) {
            response.headers_mut().insert(hyper::header::ALLOW, allow);
        }
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(seconds),
            );
        }
        response
    }
}

impl From<flux_engine::EngineError> for ApiError {
    fn from(error: flux_engine::EngineError) -> Self {
        if let flux_engine::EngineError::OutcomeUnknown(_) = error {
            // Neither "accepted" (200) nor "nothing was accepted" (503): the gateway's answer.
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, error.to_string())
        } else if error.is_unavailable() {
            ApiError::unavailable(error.to_string())
        } else {
            tracing::error!(%error, "engine error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error: {error}"),
            )
        }
    }
}

/// `{"error": message}` as bytes.
pub fn error_body(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 12);
    out.extend_from_slice(b"{\"error\":");
    flux_engine::json::write_str(&mut out, message);
    out.push(b'}');
    out
}

/// A JSON response with `status` and `body`.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut response = hyper::Response::new(full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
