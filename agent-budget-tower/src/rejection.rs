//! Answers the layer gives instead of forwarding: an error status with an
//! OpenAI-style JSON body.
//!
//! # How it works
//!
//! A [`Rejection`] is what an [`Identify`](crate::Identify) or an
//! [`Estimator`](crate::Estimator) returns when a request must not reach
//! the inner service (no key, a body that is not JSON), and what the layer
//! itself answers when the budget refuses. It becomes a response with the
//! body OpenAI's API uses for errors, which OpenAI's client libraries
//! parse and show:
//!
//! ```json
//! {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}
//! ```
//!
//! Headers set on the rejection (`Retry-After`, `x-ratelimit-*`) go out
//! with it.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// A request answered by the layer, not forwarded: status, message and
/// the machine-readable `type` and `code` of OpenAI's error object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The response status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
    /// The error object's `type` (`invalid_request_error`, `tokens`, …).
    pub error_type: &'static str,
    /// The error object's `code` (`invalid_api_key`, `rate_limit_exceeded`, …).
    pub code: &'static str,
    /// Extra headers for the response.
    pub headers: HeaderMap,
}

impl Rejection {
    /// A rejection with `status`, `message`, `type` and `code`.
    pub fn new(
        status: StatusCode,
        message: impl Into<String>,
        error_type: &'static str,
        code: &'static str,
    ) -> Self {
        Rejection {
            status,
            message: message.into(),
            error_type,
            code,
            headers: HeaderMap::new(),
        }
    }

    /// `401 Unauthorized`: no credentials, or ones nobody knows.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            message,
            "invalid_request_error",
            "invalid_api_key",
        )
    }

    /// `400 Bad Request`: the request cannot be read or is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            "invalid_request",
        )
    }

    /// `413 Payload Too Large`: the body is larger than the layer reads.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            message,
            "invalid_request_error",
            "request_too_large",
        )
    }

    /// `415 Unsupported Media Type`: a body the layer cannot read as it
    /// is (compressed).
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message,
            "invalid_request_error",
            "unsupported_media_type",
        )
    }

    /// `404 Not Found`: a path the layer will not forward, as OpenAI
    /// answers a URL it does not know.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            message,
            "invalid_request_error",
            "unknown_endpoint",
        )
    }

    /// The OpenAI-style JSON body of this rejection.
    pub fn json_body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": null,
                "code": self.code,
            }
        });
        Bytes::from(body.to_string())
    }

    /// The response: status, headers, and the JSON body.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let body = self.json_body();
        let mut response = Response::new(B::from(body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        *headers = self.headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_openais_error_object_with_the_message_escaped() {
        let r = Rejection::unauthenticated("no key \"here\"\n");
        let body: serde_json::Value = serde_json::from_slice(&r.json_body()).unwrap();
        assert_eq!(body["error"]["message"], "no key \"here\"\n");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(body["error"]["param"].is_null());
        let response: Response<Bytes> = r.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    }
}
