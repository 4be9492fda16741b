//! The NGSI-LD API subset FIWARE devices and agents use, under `/ngsi-ld/v1`: create an
//! entity, batch create and upsert, patch attributes, retrieve an entity, query entities by
//! type with `q`, list types. Entities live on their type's stream (see `yunqi_sense::ngsi`);
//! the caller's bearer token is checked like everywhere else, writes need the right to send
//! events to the stream, reads the right to query its entity table. Errors are NGSI-LD
//! ProblemDetails (`{"type", "title", "detail"}`, rendered by the request middleware).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use yunqi_sense::ngsi::{CORE_CONTEXT, Problem};
use yunqi_sense::{EntityOutcome, EntityQuery, WriteMode};
use yunqi_types::{Error, ErrorCode};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Authed, Query, RawBody};

type ApiResult<T> = Result<T, ApiError>;

/// Default page size of a query (NGSI-LD's).
const DEFAULT_LIMIT: usize = 20;

/// An error as NGSI-LD ProblemDetails.
pub fn problem_body(error: &Error, request_id: &str) -> Value {
    let kind = match error.code {
        ErrorCode::InvalidInput | ErrorCode::LimitExceeded => "BadRequestData",
        ErrorCode::NotFound => "ResourceNotFound",
        ErrorCode::AlreadyExists | ErrorCode::Conflict => "AlreadyExists",
        ErrorCode::Internal => "InternalError",
        ErrorCode::Unauthenticated => "Unauthorized",
        ErrorCode::PermissionDenied => "Forbidden",
        ErrorCode::Unavailable => "ServiceUnavailable",
    };
    let uri = match error.code {
        ErrorCode::Unauthenticated | ErrorCode::PermissionDenied | ErrorCode::Unavailable => {
            format!("urn:yunqi:error:{}", error.code.as_str())
        }
        _ => format!("https://uri.etsi.org/ngsi-ld/errors/{kind}"),
    };
    json!({
        "type": uri,
        "title": error.message,
        "detail": error.detail.clone().unwrap_or_else(|| error.message.clone()),
        "hint": error.hint,
        "request_id": request_id,
    })
}

fn problem_json(p: &Problem) -> Value {
    json!({"type": p.type_uri(), "title": p.title, "status": p.status(), "detail": p.detail})
}

fn parse_body(body: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(body).map_err(|e| {
        Error::invalid("request body is not valid JSON")
            .detail(e.to_string())
            .hint("send an NGSI-LD entity (or an array of them for entityOperations) as JSON")
    })
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    link_header(r.headers_mut());
    r
}

fn link_header(h: &mut HeaderMap) {
    if let Ok(v) = HeaderValue::from_str(&format!(
        "<{CORE_CONTEXT}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\""
    )) {
        h.insert(header::LINK, v);
    }
}

/// `options` and `format` parameters.
#[derive(Debug, Default, Deserialize)]
pub struct Options {
    /// Comma-separated: `keyValues`, `update`, `replace`, ...
    #[serde(default)]
    options: Option<String>,
    /// `simplified` (= keyValues) or `normalized`.
    #[serde(default)]
    format: Option<String>,
    /// Comma-separated attribute names.
    #[serde(default)]
    attrs: Option<String>,
    /// Comma-separated attribute names (NGSI-LD 1.8 name of `attrs`).
    #[serde(default)]
    pick: Option<String>,
}

impl Options {
    fn has(&self, o: &str) -> bool {
        self.options
            .as_deref()
            .is_some_and(|s| s.split(',').any(|x| x.trim() == o))
    }

    fn key_values(&self) -> bool {
        self.has("keyValues")
            || self.has("simplified")
            || matches!(self.format.as_deref(), Some("simplified" | "keyValues"))
    }

    fn attrs(&self) -> Option<Vec<String>> {
        self.attrs.as_deref().or(self.pick.as_deref()).map(|s| {
            s.split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect()
        })
    }
}

/// `POST /ngsi-ld/v1/entities`: creates one entity; 201 with its location, 409 if it exists.
pub async fn create_entity(
    State(state): State<AppState>,
    auth: Authed,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let v = parse_body(&body)?;
    let out = state
        .sense
        .ngsi_write(&auth.actor, vec![v], WriteMode::Create, None, &auth.ctx())
        .await?;
    let o = out
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("no outcome"))?;
    match o.result {
        Ok(_) => {
            let mut r = StatusCode::CREATED.into_response();
            if let Ok(loc) = HeaderValue::from_str(&format!("/ngsi-ld/v1/entities/{}", o.id)) {
                r.headers_mut().insert(header::LOCATION, loc);
            }
            Ok(r)
        }
        Err(p) => Ok(json_response(
            StatusCode::from_u16(p.status()).unwrap_or(StatusCode::BAD_REQUEST),
            problem_json(&p),
        )),
    }
}

/// The response of a batch operation: 201 with the created ids, 204 when every entity existed
/// already, 207 with `{"success", "errors"}` when some failed.
fn batch_response(out: Vec<EntityOutcome>, created_only: bool) -> Response {
    let mut success = Vec::new();
    let mut errors = Vec::new();
    let mut any_created = false;
    for o in out {
        match o.result {
            Ok(created) => {
                any_created |= created;
                success.push(Value::String(o.id));
            }
            Err(p) => errors.push(json!({"entityId": o.id, "error": problem_json(&p)})),
        }
    }
    if !errors.is_empty() {
        json_response(
            StatusCode::MULTI_STATUS,
            json!({"success": success, "errors": errors}),
        )
    } else if any_created || created_only {
        json_response(StatusCode::CREATED, Value::Array(success))
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

fn entity_array(body: &[u8]) -> Result<Vec<Value>, Error> {
    match parse_body(body)? {
        Value::Array(a) => Ok(a),
        _ => Err(
            Error::invalid("a batch operation takes a JSON array of entities")
                .hint("send [{\"id\": ..., \"type\": ...}, ...]"),
        ),
    }
}

/// `POST /ngsi-ld/v1/entityOperations/create`.
pub async fn batch_create(
    State(state): State<AppState>,
    auth: Authed,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let entities = entity_array(&body)?;
    let out = state
        .sense
        .ngsi_write(&auth.actor, entities, WriteMode::Create, None, &auth.ctx())
        .await?;
    Ok(batch_response(out, true))
}

/// `POST /ngsi-ld/v1/entityOperations/upsert?options=replace|update`.
pub async fn batch_upsert(
    State(state): State<AppState>,
    auth: Authed,
    Query(opts): Query<Options>,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let entities = entity_array(&body)?;
    let replace = !opts.has("update");
    let out = state
        .sense
        .ngsi_write(
            &auth.actor,
            entities,
            WriteMode::Upsert { replace },
            None,
            &auth.ctx(),
        )
        .await?;
    Ok(batch_response(out, false))
}

/// `PATCH /ngsi-ld/v1/entities/{id}/attrs`: changes the attributes sent; 204, or 207 with
/// `{"updated", "notUpdated"}` when some are not recorded by the type's stream.
pub async fn patch_attrs(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let v = parse_body(&body)?;
    if !v.is_object() {
        return Err(Error::invalid("PATCH …/attrs takes a JSON object of attributes").into());
    }
    let names: Vec<String> = v
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !matches!(k.as_str(), "id" | "type" | "@context" | "@id" | "@type"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let out = state
        .sense
        .ngsi_write(
            &auth.actor,
            vec![v],
            WriteMode::Patch,
            Some(&id),
            &auth.ctx(),
        )
        .await?;
    let o = out
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("no outcome"))?;
    if let Err(p) = &o.result {
        return Ok(json_response(
            StatusCode::from_u16(p.status()).unwrap_or(StatusCode::BAD_REQUEST),
            problem_json(p),
        ));
    }
    if o.not_updated.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let updated: Vec<&String> = names
        .iter()
        .filter(|n| !o.not_updated.iter().any(|(u, _)| u == *n))
        .collect();
    let not_updated: Vec<Value> = o
        .not_updated
        .iter()
        .map(|(a, r)| json!({"attributeName": a, "reason": r}))
        .collect();
    Ok(json_response(
        StatusCode::MULTI_STATUS,
        json!({"updated": updated, "notUpdated": not_updated}),
    ))
}

/// `GET /ngsi-ld/v1/entities/{id}?attrs=&options=keyValues`.
pub async fn get_entity(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
    Query(opts): Query<Options>,
) -> ApiResult<Response> {
    let attrs = opts.attrs();
    let v = state
        .sense
        .ngsi_get(
            &auth.actor,
            &id,
            attrs.as_deref(),
            opts.key_values(),
            &auth.ctx(),
        )
        .await?;
    Ok(json_response(StatusCode::OK, v))
}

/// Query parameters of `GET /ngsi-ld/v1/entities`.
#[derive(Debug, Default, Deserialize)]
pub struct QueryParams {
    #[serde(rename = "type")]
    entity_type: Option<String>,
    id: Option<String>,
    #[serde(rename = "idPattern")]
    id_pattern: Option<String>,
    q: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
    count: Option<bool>,
    georel: Option<String>,
    geometry: Option<String>,
    coordinates: Option<String>,
    geoproperty: Option<String>,
    #[serde(flatten)]
    options: Options,
}

/// `GET /ngsi-ld/v1/entities?type=T&q=…&attrs=&limit=&offset=&count=true&options=keyValues`:
/// entities of a type in id order; `NGSILD-Results-Count` with `count=true`.
pub async fn query_entities(
    State(state): State<AppState>,
    auth: Authed,
    Query(p): Query<QueryParams>,
) -> ApiResult<Response> {
    let Some(entity_type) = p.entity_type.clone() else {
        return Err(Error::invalid("a query needs type")
            .hint("add ?type=TrafficFlowObserved; GET /ngsi-ld/v1/types lists the types")
            .into());
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > yunqi_sense::entities::QUERY_LIMIT_MAX {
        return Err(Error::invalid(format!(
            "limit {limit} is above {}",
            yunqi_sense::entities::QUERY_LIMIT_MAX
        ))
        .hint("page with offset")
        .into());
    }
    let geo = match (&p.georel, &p.geometry, &p.coordinates) {
        (None, None, None) => None,
        (Some(r), Some(g), Some(c)) => Some(
            yunqi_sense::geo::parse(r, g, c, p.geoproperty.as_deref()).map_err(|e| {
                Error::invalid(format!("the geo-query is not valid: {e}")).hint(
                    "e.g. georel=near;maxDistance==500&geometry=Point&coordinates=[120.16,30.27]",
                )
            })?,
        ),
        _ => {
            return Err(Error::invalid("a geo-query needs georel, geometry and coordinates")
                .hint("e.g. georel=within&geometry=Polygon&coordinates=[[[120.1,30.2],[120.2,30.2],[120.2,30.3],[120.1,30.2]]]")
                .into());
        }
    };
    let query = EntityQuery {
        geo,
        entity_type,
        ids: p
            .id
            .as_deref()
            .map(|s| s.split(',').map(str::to_string).collect()),
        id_pattern: p.id_pattern.clone(),
        q: p.q.clone(),
        attrs: p.options.attrs(),
        offset: p.offset.unwrap_or(0),
        limit,
        key_values: p.options.key_values(),
    };
    let (entities, total) = state
        .sense
        .ngsi_query(&auth.actor, &query, &auth.ctx())
        .await?;
    let mut r = json_response(StatusCode::OK, Value::Array(entities));
    if p.count == Some(true)
        && let Ok(v) = HeaderValue::from_str(&total.to_string())
    {
        r.headers_mut().insert("ngsild-results-count", v);
    }
    Ok(r)
}

/// `GET /ngsi-ld/v1/types`: the entity types served, with their streams and tables.
pub async fn types(State(state): State<AppState>, auth: Authed) -> ApiResult<Response> {
    let types = state.sense.ngsi_types(&auth.actor)?;
    Ok(json_response(
        StatusCode::OK,
        json!({"id": "urn:yunqi:EntityTypeList", "type": "EntityTypeList",
               "typeList": types.iter().map(|t| t["typeName"].clone()).collect::<Vec<_>>(),
               "types": types}),
    ))
}

/// What a client asks an NGSI-LD response to be (ETSI GS CIM 009 §6.3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// `application/json`, `*/*` or no `Accept`: the `@context` in a `Link` header.
    Json,
    /// `application/ld+json` preferred: the `@context` in the body.
    JsonLd,
}

/// The representation `accept` asks for, or `None` when it accepts neither JSON form (406).
pub fn negotiate(accept: Option<&str>) -> Option<Wants> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(Wants::Json);
    };
    let mut json: f32 = -1.0;
    let mut ld: f32 = -1.0;
    for part in accept.split(',') {
        let mut it = part.split(';');
        let media = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/ld+json" => ld = ld.max(q),
            "application/json" | "application/*" | "*/*" => json = json.max(q),
            _ => {}
        }
    }
    if ld > 0.0 && ld > json {
        Some(Wants::JsonLd)
    } else if json > 0.0 || ld > 0.0 {
        Some(Wants::Json)
    } else {
        None
    }
}

/// A request body's media type must be one of the two JSON forms (415 otherwise).
pub fn content_type_ok(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => {
            let media = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            media == "application/json" || media == "application/ld+json"
        }
    }
}

/// The ProblemDetails response for a request refused before it is routed.
pub fn refused(status: StatusCode, title: &str, detail: String, request_id: &str) -> Response {
    let body = json!({
        "type": "https://uri.etsi.org/ngsi-ld/errors/InvalidRequest",
        "title": title,
        "detail": detail,
        "request_id": request_id,
    });
    let mut r = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str("application/problem+json") {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Rewrites a successful JSON response as JSON-LD: the `@context` moves from the `Link`
/// header into each entity (or the one object) of the body.
pub async fn as_json_ld(r: Response) -> Response {
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !r.status().is_success() || !is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "response body").into_response();
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let ctx = Value::String(CORE_CONTEXT.to_string());
    match &mut v {
        Value::Array(items) => {
            for i in items {
                if let Value::Object(o) = i {
                    o.insert("@context".into(), ctx.clone());
                }
            }
        }
        Value::Object(o) => {
            o.insert("@context".into(), ctx);
        }
        _ => {}
    }
    parts.headers.remove(header::LINK);
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Ok(ct) = HeaderValue::from_str("application/ld+json") {
        parts.headers.insert(header::CONTENT_TYPE, ct);
    }
    let body = serde_json::to_vec(&v).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// `DELETE /ngsi-ld/v1/entities/{id}`: 204, or 404 when no type records it.
pub async fn delete_entity(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let out = state
        .sense
        .ngsi_delete(&auth.actor, vec![id], &auth.ctx())
        .await?;
    let o = out
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("no outcome"))?;
    Ok(match o.result {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(p) => json_response(
            StatusCode::from_u16(p.status()).unwrap_or(StatusCode::BAD_REQUEST),
            problem_json(&p),
        ),
    })
}

/// `POST /ngsi-ld/v1/entityOperations/delete` with a JSON array of ids: 204 when all were
/// deleted, 207 with `{"success", "errors"}` otherwise.
pub async fn batch_delete(
    State(state): State<AppState>,
    auth: Authed,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let ids: Vec<String> = match parse_body(&body)? {
        Value::Array(a) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(
                    Error::invalid("a batch delete takes a JSON array of entity ids")
                        .hint("send [\"urn:ngsi-ld:T:1\", \"urn:ngsi-ld:T:2\"]"),
                ),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(
                Error::invalid("a batch delete takes a JSON array of entity ids")
                    .hint("send [\"urn:ngsi-ld:T:1\", \"urn:ngsi-ld:T:2\"]")
                    .into(),
            );
        }
    };
    let out = state
        .sense
        .ngsi_delete(&auth.actor, ids, &auth.ctx())
        .await?;
    Ok(batch_response(out, false))
}

/// `DELETE /ngsi-ld/v1/entities/{id}/attrs/{attrId}`: 204, or 404 when the entity or the
/// attribute does not exist.
pub async fn delete_attr(
    State(state): State<AppState>,
    auth: Authed,
    Path((id, attr)): Path<(String, String)>,
) -> ApiResult<Response> {
    let r = state
        .sense
        .ngsi_delete_attr(&auth.actor, &id, &attr, &auth.ctx())
        .await?;
    Ok(match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(p) => json_response(
            StatusCode::from_u16(p.status()).unwrap_or(StatusCode::BAD_REQUEST),
            problem_json(&p),
        ),
    })
}

/// Query parameters of `GET /ngsi-ld/v1/temporal/entities`.
#[derive(Debug, Default, Deserialize)]
pub struct TemporalParams {
    #[serde(rename = "type")]
    entity_type: Option<String>,
    id: Option<String>,
    timerel: Option<String>,
    #[serde(rename = "timeAt")]
    time_at: Option<String>,
    #[serde(rename = "endTimeAt")]
    end_time_at: Option<String>,
    #[serde(rename = "lastN")]
    last_n: Option<usize>,
    #[serde(rename = "aggrMethods")]
    aggr_methods: Option<String>,
    #[serde(rename = "aggrPeriodDuration")]
    aggr_period: Option<String>,
    #[serde(flatten)]
    options: Options,
}

/// An ISO 8601 duration `PnDTnHnMnS` (weeks `PnW` too) in microseconds; months and years are
/// refused (they have no fixed length).
fn duration_us(s: &str) -> Result<i64, Error> {
    let bad = || {
        Error::invalid(format!(
            "aggrPeriodDuration {s} is not an ISO 8601 duration"
        ))
        .hint("e.g. PT1M, PT1H, P1D or P1DT12H (months and years have no fixed length)")
    };
    let rest = s.strip_prefix('P').ok_or_else(bad)?;
    let (date, time) = rest.split_once('T').unwrap_or((rest, ""));
    let mut total = 0f64;
    let mut eat = |part: &str, units: &[(char, f64)]| -> Result<(), Error> {
        let mut num = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
            } else {
                let scale = units.iter().find(|(u, _)| *u == c).ok_or_else(bad)?.1;
                let n: f64 = num.parse().map_err(|_| bad())?;
                total += n * scale;
                num.clear();
            }
        }
        if num.is_empty() { Ok(()) } else { Err(bad()) }
    };
    eat(date, &[('W', 7.0 * 86_400e6), ('D', 86_400e6)])?;
    eat(time, &[('H', 3_600e6), ('M', 60e6), ('S', 1e6)])?;
    if total < 1.0 || (date.is_empty() && time.is_empty()) {
        return Err(bad());
    }
    Ok(total as i64)
}

fn instant(name: &str, v: Option<&String>) -> Result<i64, Error> {
    let v = v.ok_or_else(|| {
        Error::invalid(format!("timerel needs {name}"))
            .hint("e.g. timerel=after&timeAt=2026-12-06T08:00:00Z")
    })?;
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_micros())
        .map_err(|_| {
            Error::invalid(format!("{name} {v} is not a DateTime"))
                .hint("give an RFC 3339 time, e.g. 2026-12-06T08:00:00Z")
        })
}

fn temporal_query(
    p: &TemporalParams,
    id: Option<String>,
) -> Result<yunqi_sense::entities::TemporalQuery, Error> {
    use yunqi_sense::entities::TimeRel;
    let timerel = match p.timerel.as_deref() {
        None => None,
        Some("before") => Some(TimeRel::Before(instant("timeAt", p.time_at.as_ref())?)),
        Some("after") => Some(TimeRel::After(instant("timeAt", p.time_at.as_ref())?)),
        Some("between") => Some(TimeRel::Between(
            instant("timeAt", p.time_at.as_ref())?,
            instant("endTimeAt", p.end_time_at.as_ref())?,
        )),
        Some(other) => {
            return Err(Error::invalid(format!(
                "timerel {other} is not before, after or between"
            )));
        }
    };
    let ids = match id {
        Some(i) => Some(vec![i]),
        None => {
            p.id.as_deref()
                .map(|s| s.split(',').map(str::to_string).collect())
        }
    };
    let entity_type = match (&p.entity_type, &ids) {
        (Some(t), _) => t.clone(),
        (None, Some(_)) => String::new(),
        (None, None) => {
            return Err(Error::invalid("a temporal query needs type").hint(
                "add ?type=TrafficFlowObserved, or ask for one entity: /temporal/entities/{id}",
            ));
        }
    };
    Ok(yunqi_sense::entities::TemporalQuery {
        entity_type,
        ids,
        attrs: p.options.attrs(),
        timerel,
        last_n: p.last_n,
        temporal_values: p.options.has("temporalValues"),
        aggregate: match (&p.aggr_methods, p.options.has("aggregatedValues")) {
            (None, false) => None,
            (None, true) => {
                return Err(Error::invalid("aggregatedValues needs aggrMethods")
                    .hint("e.g. aggrMethods=totalCount,avg,max&aggrPeriodDuration=PT1H"));
            }
            (Some(m), _) => {
                let methods: Vec<String> = m.split(',').map(|x| x.trim().to_string()).collect();
                const KNOWN: [&str; 6] =
                    ["totalCount", "distinctCount", "sum", "avg", "min", "max"];
                if let Some(x) = methods.iter().find(|x| !KNOWN.contains(&x.as_str())) {
                    return Err(Error::invalid(format!("aggrMethods {x} is not served"))
                        .hint(format!("use {}", KNOWN.join(", "))));
                }
                let period = p.aggr_period.as_deref().map(duration_us).transpose()?;
                Some((methods, period))
            }
        },
    })
}

/// `GET /ngsi-ld/v1/temporal/entities?type=&id=&attrs=&timerel=&timeAt=&endTimeAt=&lastN=&options=temporalValues`:
/// the history of entities, each attribute's instances in time order.
pub async fn temporal_entities(
    State(state): State<AppState>,
    auth: Authed,
    Query(p): Query<TemporalParams>,
) -> ApiResult<Response> {
    let q = temporal_query(&p, None)?;
    let out = state
        .sense
        .ngsi_temporal(&auth.actor, &q, &auth.ctx())
        .await?;
    Ok(json_response(StatusCode::OK, Value::Array(out)))
}

/// `GET /ngsi-ld/v1/temporal/entities/{id}`: one entity's history; 404 if no type records it.
pub async fn temporal_entity(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
    Query(p): Query<TemporalParams>,
) -> ApiResult<Response> {
    let q = temporal_query(&p, Some(id.clone()))?;
    let out = state
        .sense
        .ngsi_temporal(&auth.actor, &q, &auth.ctx())
        .await?;
    match out.into_iter().next() {
        Some(e) => Ok(json_response(StatusCode::OK, e)),
        None => Err(Error::not_found("entity", &id)
            .hint("no change of it falls within the time asked for, or it does not exist")
            .into()),
    }
}

#[cfg(test)]
mod negotiation_tests {
    use super::*;

    #[test]
    fn durations_are_iso_8601() {
        assert_eq!(duration_us("PT1M").unwrap(), 60_000_000);
        assert_eq!(duration_us("P1DT12H").unwrap(), 36 * 3_600_000_000);
        assert_eq!(duration_us("PT0.5S").unwrap(), 500_000);
        for bad in ["P1M", "1H", "PT", "P", "PT1X", "PT0S"] {
            assert!(duration_us(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn accept_headers_pick_the_representation() {
        for (accept, want) in [
            (None, Some(Wants::Json)),
            (Some("application/json"), Some(Wants::Json)),
            (Some("application/ld+json"), Some(Wants::JsonLd)),
            (Some("*/*"), Some(Wants::Json)),
            (
                Some("application/ld+json, application/json;q=0.5"),
                Some(Wants::JsonLd),
            ),
            (
                Some("application/json, application/ld+json;q=0.9"),
                Some(Wants::Json),
            ),
            (Some("text/html"), None),
            (Some("application/xml, text/plain"), None),
        ] {
            assert_eq!(negotiate(accept), want, "{accept:?}");
        }
        assert!(content_type_ok(Some("application/ld+json; charset=utf-8")));
        assert!(content_type_ok(Some("application/json")));
        assert!(!content_type_ok(Some("text/plain")));
    }
}

/// Paging of `GET /ngsi-ld/v1/subscriptions`.
#[derive(Debug, Default, Deserialize)]
pub struct SubscriptionPage {
    limit: Option<usize>,
    offset: Option<usize>,
    count: Option<bool>,
}

/// `POST /ngsi-ld/v1/subscriptions`: 201 with `Location`.
pub async fn create_subscription(
    State(state): State<AppState>,
    auth: Authed,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let v = parse_body(&body)?;
    let id = state
        .sense
        .create_subscription(&auth.actor, &v, &auth.ctx())
        .await?;
    let mut r = StatusCode::CREATED.into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/ngsi-ld/v1/subscriptions/{id}")) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

/// `GET /ngsi-ld/v1/subscriptions`: the caller's subscriptions (an admin's: all).
pub async fn list_subscriptions(
    State(state): State<AppState>,
    auth: Authed,
    Query(p): Query<SubscriptionPage>,
) -> ApiResult<Response> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > 1000 {
        return Err(Error::invalid("limit is at most 1000").into());
    }
    let all = state.sense.subscriptions(&auth.actor);
    let total = all.len();
    let page: Vec<Value> = all
        .into_iter()
        .skip(p.offset.unwrap_or(0))
        .take(limit)
        .collect();
    let mut r = json_response(StatusCode::OK, Value::Array(page));
    if p.count == Some(true)
        && let Ok(v) = HeaderValue::from_str(&total.to_string())
    {
        r.headers_mut().insert("ngsild-results-count", v);
    }
    Ok(r)
}

/// `GET /ngsi-ld/v1/subscriptions/{id}`.
pub async fn get_subscription(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let v = state.sense.get_subscription(&auth.actor, &id)?;
    Ok(json_response(StatusCode::OK, v))
}

/// `PATCH /ngsi-ld/v1/subscriptions/{id}`: 204.
pub async fn patch_subscription(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let v = parse_body(&body)?;
    state
        .sense
        .update_subscription(&auth.actor, &id, &v, &auth.ctx())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /ngsi-ld/v1/subscriptions/{id}`: 204.
pub async fn delete_subscription(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    state
        .sense
        .delete_subscription(&auth.actor, &id, &auth.ctx())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
