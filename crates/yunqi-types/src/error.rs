//! The one error type of yunqi's libraries, shaped like PostgreSQL's: a lowercase primary
//! `message` naming the object and its kind, a `detail` that explains and a `hint` that says what
//! to do. Each error carries one stable [`ErrorCode`]; the HTTP API maps a code to one status and
//! the pg endpoint to one SQLSTATE, so a code is a contract and is never renamed.

use std::fmt;

/// Result with yunqi's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable error categories. The string form (`as_str`) is part of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a value is not valid (HTTP 400).
    InvalidInput,
    /// No credentials, or credentials that are unknown, expired or revoked (HTTP 401).
    Unauthenticated,
    /// Authenticated, but the policy does not allow the action (HTTP 403).
    PermissionDenied,
    /// The named object does not exist, or the caller may not know it exists (HTTP 404).
    NotFound,
    /// An object with that name exists already (HTTP 409).
    AlreadyExists,
    /// The request conflicts with the current state (HTTP 409).
    Conflict,
    /// A named limit was exceeded (HTTP 413 for bodies, 429/400 otherwise by context).
    LimitExceeded,
    /// The service or one of its stores cannot take the request now (HTTP 503).
    Unavailable,
    /// A bug or a broken invariant; the request failed alone (HTTP 500).
    Internal,
}

impl ErrorCode {
    /// The stable wire name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error people can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// The category.
    pub code: ErrorCode,
    /// Lowercase primary message naming the object and its kind.
    pub message: String,
    /// What happened, in more words.
    pub detail: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Error {
    /// A new error with a code and a primary message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }
    /// Adds a detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// `invalid_input` error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }
    /// `not_found` error for an object of a kind: `department "x" does not exist`.
    pub fn not_found(kind: &str, name: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!("{kind} \"{name}\" does not exist"),
        )
    }
    /// `already_exists` error for an object of a kind.
    pub fn already_exists(kind: &str, name: &str) -> Self {
        Self::new(
            ErrorCode::AlreadyExists,
            format!("{kind} \"{name}\" already exists"),
        )
    }
    /// `permission_denied` error.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }
    /// `unauthenticated` error.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }
    /// `limit_exceeded` error naming the limit and its value.
    pub fn limit(limit_name: &str, limit_value: u64, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::LimitExceeded, message)
            .detail(format!("the limit {limit_name} is {limit_value}"))
    }
    /// `internal` error: a bug or an IO failure the caller cannot fix.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// `unavailable` error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::internal(format!("io error: {e}"))
    }
}
