//! Routes of Sense: streams (declare, list, send events) and continuous views (list, status,
//! live feed over Server-Sent Events).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Deserialize;
use yunqi_datasets::{Column, ColumnType, StreamManifest};
use yunqi_sense::EventFormat;
use yunqi_types::{ColumnClass, Error};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Authed, Json, Query, RawBody};

type ApiResult<T> = Result<T, ApiError>;

/// A column of a new stream.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewStreamColumn {
    /// Name.
    pub name: String,
    /// `text`, `int`, `float`, `bool`, `date` or `timestamp`.
    #[serde(rename = "type")]
    pub column_type: String,
    /// `public`, `internal` (default), `personal` or `sensitive`.
    #[serde(default)]
    pub class: Option<String>,
}

/// A new stream, as JSON (or send `CREATE STREAM …` to `/api/v1/sql`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewStream {
    /// Owning department.
    pub department: String,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// The events' columns.
    pub columns: Vec<NewStreamColumn>,
    /// The event-time column (a timestamp column).
    pub event_time: String,
    /// Watermark delay, e.g. `5 seconds` (default 0).
    #[serde(default)]
    pub watermark: Option<String>,
    /// Retention by age, e.g. `7 days` (default), or `forever`.
    #[serde(default)]
    pub retention: Option<String>,
    /// The NGSI-LD entity type this stream records (it then needs a TEXT column `id`); its
    /// entities are served under `/ngsi-ld/v1`, their latest state is the dataset
    /// `<name>_latest`.
    #[serde(default)]
    pub ngsi_type: Option<String>,
}

/// Declares a stream.
#[utoipa::path(post, path = "/api/v1/streams", tag = "streams", security(("bearer" = [])),
    request_body = NewStream,
    responses((status = 201, description = "the stream's definition"), (status = 400, body = crate::wire::ErrorBody),
        (status = 403, body = crate::wire::ErrorBody), (status = 409, body = crate::wire::ErrorBody)))]
pub async fn create_stream(
    State(state): State<AppState>,
    auth: Authed,
    Json(req): Json<NewStream>,
) -> ApiResult<impl IntoResponse> {
    let mut columns = Vec::new();
    for c in req.columns {
        let class = match c.class.as_deref() {
            None => ColumnClass::Internal,
            Some(raw) => raw.parse::<ColumnClass>()?,
        };
        columns.push(Column {
            name: c.name.to_lowercase(),
            label: None,
            column_type: ColumnType::parse(&c.column_type)?,
            class,
            class_declared: c.class.is_some(),
            detected: None,
        });
    }
    let watermark_ms = match &req.watermark {
        Some(w) => (yunqi_sense::plan::parse_duration_us(w)? / 1000) as u64,
        None => 0,
    };
    let retention_secs = match req.retention.as_deref() {
        None => Some(7 * 86_400),
        Some("forever" | "none") => None,
        Some(r) => Some((yunqi_sense::plan::parse_duration_us(r)? / 1_000_000) as u64),
    };
    yunqi_types::Name::parse("department", &req.department)?;
    yunqi_types::Name::parse("stream", &req.name)?;
    let m = StreamManifest {
        format: yunqi_datasets::streams::STREAM_FORMAT,
        department: req.department,
        name: req.name,
        description: req.description,
        columns,
        event_time: req.event_time.to_lowercase(),
        watermark_ms,
        retention_secs,
        retention_bytes: None,
        ngsi_type: req.ngsi_type,
        created_at: state.gov.now(),
        created_by: auth.actor.principal.name.to_string(),
    };
    let m = state
        .sense
        .create_stream(&auth.actor, m, &auth.ctx())
        .await?;
    Ok((axum::http::StatusCode::CREATED, axum::Json(m)))
}

/// Lists streams, with their log's end offset.
#[utoipa::path(get, path = "/api/v1/streams", tag = "streams", security(("bearer" = [])),
    responses((status = 200, description = "{\"streams\": [...]}")))]
pub async fn list_streams(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let streams: Vec<serde_json::Value> = state
        .gov
        .list_streams(&auth.actor)?
        .into_iter()
        .map(|m| stream_json(&state, m))
        .collect();
    Ok(axum::Json(serde_json::json!({ "streams": streams })))
}

fn stream_json(state: &AppState, m: StreamManifest) -> serde_json::Value {
    let end = state.sense.end_offset(&m.sql_name());
    let mut v = serde_json::to_value(&m).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("sql_name".into(), m.sql_name().into());
        o.insert("events".into(), end.into());
    }
    v
}

/// One stream.
#[utoipa::path(get, path = "/api/v1/streams/{department}/{name}", tag = "streams", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "the stream's definition"), (status = 404, body = crate::wire::ErrorBody)))]
pub async fn get_stream(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let m = state
        .gov
        .get_stream(&auth.actor, &format!("{department}.{name}"))?;
    Ok(axum::Json(stream_json(&state, m)))
}

/// Parameters of an events batch.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct EventsParams {
    /// `ndjson` (default), `csv` or `arrow`; otherwise taken from Content-Type.
    pub format: Option<String>,
    /// Refuse the whole batch if any event is invalid (default false: accept the good ones).
    #[serde(default)]
    pub atomic: bool,
}

/// Sends a batch of events: NDJSON (RFC 3339 timestamps), CSV with a header, or an Arrow IPC
/// stream. Answers once the accepted events are durable, listing rejected events by index with
/// their reason.
#[utoipa::path(post, path = "/api/v1/streams/{department}/{name}/events", tag = "streams", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path), EventsParams),
    request_body(content = String, content_type = "application/x-ndjson"),
    responses((status = 200, description = "accepted, rejected (index, reason), offsets"), (status = 400, body = crate::wire::ErrorBody),
        (status = 403, body = crate::wire::ErrorBody), (status = 404, body = crate::wire::ErrorBody)))]
pub async fn append_events(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    Query(p): Query<EventsParams>,
    headers: axum::http::HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<axum::Json<yunqi_sense::AppendReport>> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = match p.format.as_deref() {
        Some("ndjson" | "jsonl" | "json") => EventFormat::Ndjson,
        Some("csv") => EventFormat::Csv,
        Some("arrow") => EventFormat::Arrow,
        Some(other) => {
            return Err(Error::invalid(format!("invalid format \"{other}\""))
                .hint("use ndjson, csv or arrow")
                .into());
        }
        None if content_type.starts_with("text/csv") => EventFormat::Csv,
        None if content_type.starts_with("application/vnd.apache.arrow") => EventFormat::Arrow,
        None => EventFormat::Ndjson,
    };
    let stream = format!("{department}.{name}");
    let key = crate::extract::idempotency_key(&headers)?;
    let report = state
        .sense
        .append(
            &auth.actor,
            &stream,
            format,
            &body,
            p.atomic,
            key,
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(report))
}

/// Lists continuous views with their progress.
#[utoipa::path(get, path = "/api/v1/views", tag = "streams", security(("bearer" = [])),
    responses((status = 200, description = "{\"views\": [...]}")))]
pub async fn list_views(
    State(state): State<AppState>,
    auth: Authed,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let mut views: Vec<serde_json::Value> = state
        .sense
        .list_views(&auth.actor)?
        .into_iter()
        .filter_map(|v| serde_json::to_value(v).ok())
        .collect();
    // On a cluster, the views other nodes run, each as its node reports it.
    if let Some(node) = state.sense.cluster_node().map(str::to_string) {
        let sense = state.sense.clone();
        let authorization = headers.get(axum::http::header::AUTHORIZATION).cloned();
        let remote = tokio::task::spawn_blocking(move || {
            sense
                .views_elsewhere()
                .into_iter()
                .filter_map(|(view, url)| {
                    let (d, n) = view.split_once('.')?;
                    let path = format!("/api/v1/views/{d}/{n}");
                    match crate::forward::fetch_json(&url, &path, authorization.as_ref(), &node) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::debug!(view, error = %e, "a view's node did not answer");
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        views.extend(remote);
        views.sort_by(|a, b| a["view"].as_str().cmp(&b["view"].as_str()));
    }
    Ok(axum::Json(serde_json::json!({ "views": views })))
}

/// One continuous view's progress: offset, watermark, windows written, late events.
#[utoipa::path(get, path = "/api/v1/views/{department}/{name}", tag = "streams", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "the view's status"), (status = 404, body = crate::wire::ErrorBody)))]
pub async fn get_view(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<yunqi_sense::ViewStatus>> {
    Ok(axum::Json(state.sense.view_status(
        &auth.actor,
        &format!("{department}.{name}"),
    )?))
}

/// The view's newly closed windows, live, as Server-Sent Events (`event: windows`, data: JSON
/// `{"view", "through", "rows": [...]}`), for the view's own department.
#[utoipa::path(get, path = "/api/v1/views/{department}/{name}/live", tag = "streams", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "text/event-stream"), (status = 403, body = crate::wire::ErrorBody), (status = 404, body = crate::wire::ErrorBody)))]
pub async fn live(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let rx = state
        .sense
        .subscribe(&auth.actor, &format!("{department}.{name}"), &auth.ctx())
        .await?;
    let closing = state.sense.closing();
    let stream = futures::stream::unfold((rx, closing), |(mut rx, mut closing)| async move {
        if *closing.borrow() {
            return None;
        }
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = closing.changed() => return None,
        };
        let ev = match msg {
            Ok(msg) => Event::default().event("windows").data(msg.as_ref()),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{{\"missed\":{n}}}")),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<Event, Infallible>(ev), (rx, closing)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
