//! Routes of Serve: service definitions (stewards apply a TOML file; everyone signed in lists
//! them) and applications (`POST …/applications {"inputs": {…}}`, with an optional
//! `Idempotency-Key`; the caller lists their own).

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};
use yunqi_serve::explain::Lang;
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
pub async fn list(State(state): State<AppState>, auth: Authed) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(
        json!({ "services": state.serve.list(&auth.actor)? }),
    ))
}

/// `GET /api/v1/services/{department}/{name}`: one service's live definition.
pub async fn get(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let s = state
        .serve
        .get(&auth.actor, &format!("{department}.{name}"))?;
    Ok(axum::Json(serde_json::to_value(s).unwrap_or_default()))
}

/// An application.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApplication {
    /// The inputs, by name.
    pub inputs: serde_json::Map<String, Value>,
}

/// The language an `Accept-Language` header asks for.
fn lang(headers: &axum::http::HeaderMap) -> Lang {
    Lang::from_accept_language(
        headers
            .get(axum::http::header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok()),
    )
}

/// A decision with its readable explanation (`readable`, in the language asked for).
fn decision_read(state: &AppState, d: &yunqi_serve::decider::Decision, lang: Lang) -> Value {
    let mut v = decision_json(d);
    v["readable"] = state.serve.readable(d, lang);
    v
}

fn decision_json(d: &yunqi_serve::decider::Decision) -> Value {
    let mut v = json!({
        "id": d.id,
        "service": d.service,
        "applicant": d.applicant,
        "decision": d.decision,
        "decided_at": d.decided_at,
        "reasons": d.reasons,
        "explanation": {"inputs": d.inputs, "rules": d.rules, "data": d.data, "quotas": d.quotas},
        "document": d.document.as_ref().map_or(Value::Null, |x| {
            let mut doc = json!({
                "token": x.token, "valid_from": x.valid_from, "valid_to": x.valid_to,
                "verify": "/api/v1/documents/verify?token=<token>",
            });
            if let Some(c) = &x.code {
                doc["code"] = json!(c);
            }
            doc
        }),
    });
    if let Some(due) = d.due_at {
        v["due_at"] = json!(due);
    }
    if let Some(r) = &d.review {
        v["review"] = json!(r);
    }
    if let Some(dr) = &d.draw {
        v["draw"] = json!({
            "line": dr.line,
            "yuan": dr.fen as f64 / 100.0,
            "repaid_yuan": dr.repaid_fen as f64 / 100.0,
            "owed_yuan": dr.owed() as f64 / 100.0,
            "due_at": dr.due_at,
        });
    }
    v
}

fn application_id(department: &str, name: &str, number: &str) -> Result<String, Error> {
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            Error::invalid(format!("\"{number}\" is not an application number"))
                .hint("an application's URL ends with its number, e.g. …/applications/42"),
        );
    }
    Ok(format!("{department}.{name}/{number}"))
}

/// `GET /api/v1/services/{department}/{name}/applications/{number}`: one application (its
/// applicant, the person it concerns, or the department's officers).
pub async fn application(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name, number)): Path<(String, String, String)>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let id = application_id(&department, &name, &number)?;
    let d = state
        .serve
        .application(&auth.actor, &id, &auth.ctx())
        .await?;
    Ok(axum::Json(decision_read(&state, &d, lang(&headers))))
}

/// What an act on an application carries.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActBody {
    /// Why (approve, refuse).
    #[serde(default)]
    pub reason: Option<String>,
    /// To whom (assign).
    #[serde(default)]
    pub assignee: Option<String>,
    /// How much, yuan (repay; default all that is owed).
    #[serde(default)]
    pub amount: Option<f64>,
}

/// `POST /api/v1/services/{department}/{name}/applications/{number}/{act}` with `act` one of
/// `assign {"assignee"}`, `approve {"reason"?}`, `refuse {"reason"}`, `repay {"amount"?}`:
/// returns the application as it now stands, durable.
pub async fn act(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name, number, act)): Path<(String, String, String, String)>,
    headers: axum::http::HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<axum::Json<Value>> {
    let key = crate::extract::idempotency_key(&headers)?.map(str::to_string);
    use yunqi_serve::decider::ActKind;
    let id = application_id(&department, &name, &number)?;
    let kind = match act.as_str() {
        "assign" => ActKind::Assign,
        "approve" => ActKind::Approve,
        "refuse" => ActKind::Refuse,
        "repay" => ActKind::Repay,
        other => {
            return Err(Error::not_found("action", other)
                .hint("POST …/applications/{number}/assign, approve, refuse or repay")
                .into());
        }
    };
    let b: ActBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Error::invalid(format!("the body is not valid: {e}"))
                .hint("send {\"reason\": …}, {\"assignee\": …} or {\"amount\": yuan}")
        })?
    };
    let d = state
        .serve
        .act(
            &auth.actor,
            &id,
            kind,
            b.reason,
            b.assignee,
            b.amount,
            key,
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(decision_read(&state, &d, lang(&headers))))
}

/// `GET /api/v1/services/{department}/{name}/reviews`: the applications waiting for review,
/// the earliest deadline first, each with `overdue`.
pub async fn reviews(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let q = state
        .serve
        .review_queue(&auth.actor, &format!("{department}.{name}"), &auth.ctx())
        .await?;
    let now = chrono::Utc::now();
    Ok(axum::Json(json!({
        "pending": q.iter().map(|d| {
            let mut v = decision_json(d);
            v["overdue"] = json!(d.due_at.is_some_and(|t| t <= now));
            v
        }).collect::<Vec<_>>()
    })))
}

/// `GET /api/v1/me/consents`: the consents the caller (a citizen) has given.
pub async fn my_consents(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(
        json!({"consents": state.serve.my_consents(&auth.actor)?}),
    ))
}

/// `PUT /api/v1/me/consents/{department}/{name}`: the caller (a citizen) consents to the
/// service (e.g. hospitals charging visits to their credit line).
pub async fn give_consent(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    set_consent(&state, &auth, &department, &name, true).await
}

/// `DELETE /api/v1/me/consents/{department}/{name}`: withdraws the caller's consent.
pub async fn withdraw_consent(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    set_consent(&state, &auth, &department, &name, false).await
}

async fn set_consent(
    state: &AppState,
    auth: &Authed,
    department: &str,
    name: &str,
    given: bool,
) -> ApiResult<axum::Json<Value>> {
    let service = format!("{department}.{name}");
    state
        .serve
        .set_consent(&auth.actor, &service, given, &auth.ctx())
        .await?;
    Ok(axum::Json(json!({"service": service, "given": given})))
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
    Ok(axum::Json(decision_read(&state, &d, lang(&headers))))
}

/// `GET /api/v1/services/{department}/{name}/applications`: the caller's own, newest first.
pub async fn my_applications(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let list = state
        .serve
        .my_applications(&auth.actor, &format!("{department}.{name}"))?;
    let lang = lang(&headers);
    Ok(axum::Json(json!({
        "applications": list.iter().map(|d| decision_read(&state, d, lang)).collect::<Vec<_>>()
    })))
}
