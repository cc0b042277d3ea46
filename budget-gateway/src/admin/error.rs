//! The admin API's errors: OpenAI's error object, with the field to blame
//! as `param`.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::catalog::ChangeError;

/// An error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    code: &'static str,
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// For a person to read.
    pub message: String,
    /// `invalid_request_error` (4xx) or `server_error` (5xx).
    #[serde(rename = "type")]
    pub error_type: &'static str,
    /// The field of the request to blame, if one is (`limits[0].window`).
    pub param: Option<String>,
    /// For a program to read: `invalid_api_key`, `forbidden`,
    /// `invalid_request`, `invalid_value`, `not_found`, `conflict`,
    /// `unavailable`, `budget_unavailable`.
    pub code: &'static str,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    /// `400`: the request cannot be read (not JSON, not a UUID).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// `422`: the request is read, but asks for what cannot be.
    pub fn invalid(param: Option<String>, message: impl Into<String>) -> Self {
        ApiError {
            param,
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message)
        }
    }

    /// Its status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid { field, message } => ApiError::invalid(field, message),
            ChangeError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            ChangeError::NotFound(message) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            ChangeError::Unavailable(message) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response<Body> {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                error_type: if self.status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                },
                param: self.param,
                code: self.code,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// What every admin endpoint may answer before it reads the request:
/// `401` without a bearer key, `403` with another key than the admin key
/// (for the OpenAPI document, where each operation lists it).
pub struct Denied;

impl utoipa::IntoResponses for Denied {
    fn responses() -> BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::Response>> {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        [
            ("401", "No bearer key: send the admin key"),
            ("403", "Not the admin key"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", body)
                .build();
            (status.to_owned(), response.into())
        })
        .collect()
    }
}

/// Reads a JSON body: `400` if it is not JSON, `422` if it is JSON of the
/// wrong shape (a missing or unknown field, a wrong type), naming where.
///
/// A list is refused even where serde would read it as a struct's fields
/// in order: the bodies are objects.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if value.is_array() {
        return Err(ApiError::invalid(
            None,
            "the body must be a JSON object, not a list",
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(None, format!("the body: {e}")))
}
