//! Extractors that turn every bad input into an [`ApiError`] that says what to do: JSON bodies
//! (malformed, wrong types, unknown fields, too large, wrong content type), query strings, and
//! the bearer token.

use std::sync::{Arc, OnceLock};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use yunqi_governance::{Actor, CallContext};
use yunqi_types::Error;

use crate::AppState;
use crate::error::ApiError;

/// Per-request facts, put in the request extensions by the middleware.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Request id.
    pub id: String,
    /// The authenticated principal's name, once known (for the log line).
    pub principal: Arc<OnceLock<String>>,
}

impl RequestInfo {
    /// The audit context of this request.
    pub fn ctx(&self) -> CallContext {
        CallContext {
            request_id: self.id.clone(),
        }
    }
}

fn request_info(parts: &Parts) -> RequestInfo {
    parts
        .extensions
        .get::<RequestInfo>()
        .cloned()
        .unwrap_or_else(|| RequestInfo {
            id: String::new(),
            principal: Arc::new(OnceLock::new()),
        })
}

/// A JSON body.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let text = r.body_text();
    match r {
        JsonRejection::JsonDataError(_) => {
            Error::invalid("request body does not match the expected fields")
                .detail(text)
                .hint("see /api/v1/openapi.json for the fields of this request")
                .into()
        }
        JsonRejection::JsonSyntaxError(_) => Error::invalid("request body is not valid JSON")
            .detail(text)
            .hint("send a JSON object, e.g. {\"name\": \"transport\"}")
            .into(),
        JsonRejection::MissingJsonContentType(_) => ApiError::with_status(
            Error::invalid("request body must be JSON")
                .detail(text)
                .hint("set the header Content-Type: application/json"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::with_status(
            Error::new(
                yunqi_types::ErrorCode::LimitExceeded,
                "request body is too large",
            )
            .detail(other.body_text())
            .hint("send a smaller body; the limit is request_body_bytes_max"),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        other => Error::invalid("request body cannot be read")
            .detail(other.body_text())
            .into(),
    }
}

/// A raw request body (an uploaded file), within the route's body limit.
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::with_status(
                Error::new(yunqi_types::ErrorCode::LimitExceeded, "file is too large to import at once")
                    .detail(r.body_text())
                    .hint("split the file and import the parts with mode=append; the limit is import_bytes_max"),
                StatusCode::PAYLOAD_TOO_LARGE,
            )),
            Err(r) => Err(Error::invalid("request body cannot be read").detail(r.body_text()).into()),
        }
    }
}

/// Query-string parameters.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    Error::invalid("query parameters are not valid")
        .detail(r.body_text())
        .hint("see /api/v1/openapi.json for the parameters of this endpoint")
        .into()
}

/// An authenticated caller. Failed authentication is audited and answered with 401.
pub struct Authed {
    /// Who.
    pub actor: Actor,
    /// The request.
    pub info: RequestInfo,
}

impl Authed {
    /// The audit context.
    pub fn ctx(&self) -> CallContext {
        self.info.ctx()
    }
}

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let info = request_info(parts);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        let result = match header {
            None => Err((
                Error::unauthenticated("authentication required")
                    .detail("the request has no Authorization header")
                    .hint(
                        "send `Authorization: Bearer TOKEN`; the admin token is in DIR/admin.token",
                    ),
                None,
            )),
            Some(h) => match h
                .strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
            {
                None => Err((
                    Error::unauthenticated("authentication scheme is not supported")
                        .detail("the Authorization header must use the Bearer scheme")
                        .hint("send `Authorization: Bearer TOKEN`"),
                    None,
                )),
                Some(token) => state.gov.authenticate_current(token).await,
            },
        };
        match result {
            Ok(actor) => {
                let _ = info.principal.set(actor.principal.name.to_string());
                Ok(Authed { actor, info })
            }
            Err((error, owner)) => {
                let principal = owner.and_then(|n| state.gov.principal_named(n.as_str()));
                let object = format!("http:{} {}", parts.method, parts.uri.path());
                if let Err(audit_error) = state
                    .gov
                    .record_denial(
                        principal.as_ref(),
                        "auth.token",
                        &object,
                        &error,
                        &info.ctx(),
                    )
                    .await
                {
                    return Err(audit_error.into());
                }
                Err(error.into())
            }
        }
    }
}

/// The `Idempotency-Key` header, checked (see `yunqi_sense::dedup::check_key`).
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<&str>, Error> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            // Non-ASCII bytes fail the check below with its hint.
            let k = v.to_str().unwrap_or(" ");
            yunqi_sense::dedup::check_key(k)?;
            Ok(Some(k))
        }
    }
}
