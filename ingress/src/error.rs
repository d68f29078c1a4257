//! API errors: each is born with its HTTP status, and one function renders `{"error": ...}`.

use bytes::Bytes;
use hyper::StatusCode;

use crate::http::{Response, full};

/// An error answered to the client. The message names the field or limit at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn payload_too_large() -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: "payload too large".into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }

    pub fn method_not_allowed(allowed: &str) -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("method not allowed; allowed: {allowed}"),
        }
    }

    /// The response: status plus `{"error": message}`.
    pub fn into_response(self) -> Response {
        json_response(self.status, error_body(&self.message))
    }
}

impl From<flux_engine::EngineError> for ApiError {
    fn from(error: flux_engine::EngineError) -> Self {
        if error.is_unavailable() {
            ApiError::unavailable(error.to_string())
        } else {
            tracing::error!(%error, "engine error");
            ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("internal error: {error}"),
            }
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
