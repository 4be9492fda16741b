//! Errors on the wire: `{"error": {"code", "message", "detail", "hint", "request_id"}}` with one
//! HTTP status per error code. Handlers return [`ApiError`]; the request middleware renders the
//! body, so that every error, including those of extractors and fallbacks, carries the request
//! id and is counted.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use yunqi_types::{Error, ErrorCode};

/// An error returned by a handler or extractor.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The error.
    pub error: Error,
    /// A status other than the code's usual one (413 for a body over the limit, 405, 415).
    pub status: Option<StatusCode>,
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError {
            error,
            status: None,
        }
    }
}

impl ApiError {
    /// An error with a specific status.
    pub fn with_status(error: Error, status: StatusCode) -> Self {
        ApiError {
            error,
            status: Some(status),
        }
    }
}

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::LimitExceeded => StatusCode::BAD_REQUEST,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Carried in the response extensions until the middleware renders it.
#[derive(Debug, Clone)]
pub struct PendingError(pub Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| status_of(self.error.code));
        let mut response = status.into_response();
        if self.error.code == ErrorCode::Unauthenticated {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"yunqi\""),
            );
        }
        response.extensions_mut().insert(PendingError(self.error));
        response
    }
}

/// The JSON body of an error.
pub fn error_body(error: &Error, request_id: &str) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "code": error.code.as_str(),
            "message": error.message,
            "detail": error.detail,
            "hint": error.hint,
            "request_id": request_id,
        }
    })
}
