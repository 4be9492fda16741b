//! Routes of Serve: service definitions (stewards apply a TOML file; everyone signed in lists
//! them) and applications (`POST …/applications {"inputs": {…}}`, with an optional
//! `Idempotency-Key`; the caller lists their own).

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};
use yunqi_types::Error;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Authed, Json, RawBody};

type ApiResult<T> = Result<T, ApiError>;

/// `POST /api/v1/services`: applies a definition (the body, TOML); 201 with its version.
pub async fn apply(
    State(state): State<AppState>,
    auth: Authed,
    RawBody(body): RawBody,
) -> ApiResult<impl IntoResponse> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| Error::invalid("the definition is not UTF-8 text"))?;
    let applied = state.serve.apply(&auth.actor, text, &auth.ctx()).await?;
    Ok((axum::http::StatusCode::CREATED, axum::Json(applied)))
}

/// `GET /api/v1/services`: the live services.
/// Signed-in callers only (the extractor refuses others).
pub async fn list(State(state): State<AppState>, _auth: Authed) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(json!({ "services": state.serve.list() })))
}

/// `GET /api/v1/services/{department}/{name}`: one service's live definition.
pub async fn get(
    State(state): State<AppState>,
    _auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let s = state.serve.get(&format!("{department}.{name}"))?;
    Ok(axum::Json(serde_json::to_value(s).unwrap_or_default()))
}

/// An application.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApplication {
    /// The inputs, by name.
    pub inputs: serde_json::Map<String, Value>,
}

fn decision_json(d: &yunqi_serve::decider::Decision) -> Value {
    json!({
        "id": d.id,
        "service": d.service,
        "decision": d.decision,
        "decided_at": d.decided_at,
        "reasons": d.reasons,
        "explanation": {"inputs": d.inputs, "rules": d.rules, "data": d.data, "quotas": d.quotas},
        "document": d.document.as_ref().map_or(Value::Null, |x| json!({
            "token": x.token, "valid_from": x.valid_from, "valid_to": x.valid_to,
            "verify": "/api/v1/documents/verify?token=<token>",
        })),
    })
}

/// `GET /api/v1/documents/public-key` (no login): the key documents are signed with.
pub async fn public_key(State(state): State<AppState>) -> axum::Json<Value> {
    let (key, kid) = state.serve.public_key();
    axum::Json(
        json!({"algorithm": "Ed25519", "public_key": key, "kid": kid,
        "format": "base64url(claims JSON) \".\" base64url(signature of the first part)"}),
    )
}

/// A revocation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The decision whose document is withdrawn.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// `POST /api/v1/documents/revoke {"id", "reason"}`: withdraws a document (officers and
/// stewards of the service's department); its quota stays used.
pub async fn revoke(
    State(state): State<AppState>,
    auth: Authed,
    Json(req): Json<RevokeRequest>,
) -> ApiResult<axum::Json<Value>> {
    let r = state
        .serve
        .revoke(&auth.actor, &req.id, &req.reason, &auth.ctx())
        .await?;
    Ok(axum::Json(serde_json::to_value(r).unwrap_or_default()))
}

/// The token to verify.
#[derive(Debug, Deserialize)]
pub struct VerifyParams {
    /// The document's token.
    pub token: String,
}

/// `GET /api/v1/documents/verify?token=…` (no login): whether a document is genuine and valid
/// now, and what it says.
pub async fn verify(
    State(state): State<AppState>,
    crate::extract::Query(p): crate::extract::Query<VerifyParams>,
) -> axum::Json<yunqi_serve::Verification> {
    axum::Json(state.serve.verify(&p.token))
}

/// `POST /api/v1/services/{department}/{name}/applications`: applies; returns the decision,
/// durable, with its explanation.
pub async fn apply_for(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    Json(req): Json<NewApplication>,
) -> ApiResult<axum::Json<Value>> {
    let key = crate::extract::idempotency_key(&headers)?.map(str::to_string);
    let d = state
        .serve
        .apply_for(
            &auth.actor,
            &format!("{department}.{name}"),
            &req.inputs,
            key,
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(decision_json(&d)))
}

/// `GET /api/v1/services/{department}/{name}/applications`: the caller's own, newest first.
pub async fn my_applications(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let list = state
        .serve
        .my_applications(&auth.actor, &format!("{department}.{name}"))?;
    Ok(axum::Json(json!({
        "applications": list.iter().map(|d| decision_json(d)).collect::<Vec<_>>()
    })))
}
