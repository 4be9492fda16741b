//! The route handlers: parse wire types into domain values (validation at the edge), call
//! governance, map the result back to wire types.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use yunqi_audit::AuditQuery;
use yunqi_governance::PrincipalSpec;
use yunqi_types::{Error, Name, NationalId, Outcome, Role};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Authed, Json, Query, RawBody};
use crate::wire::*;

type ApiResult<T> = Result<T, ApiError>;

fn title(raw: Option<String>, fallback: &str, max: usize) -> Result<String, Error> {
    let t = raw.unwrap_or_else(|| fallback.to_string());
    if t.len() > max {
        return Err(Error::invalid("title is too long")
            .detail(format!("it is {} bytes, the most is {max}", t.len()))
            .hint("shorten it"));
    }
    if t.chars().any(char::is_control) {
        return Err(Error::invalid("title contains control characters").hint("remove them"));
    }
    Ok(t)
}

/// Liveness and the audit position. A cluster node that cannot confirm it is current answers
/// 503 with status `fenced`, so that a load balancer sends requests elsewhere.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, axum::Json<Health>) {
    let serving = state.gov.serving();
    (
        if serving {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        axum::Json(Health {
            status: if serving { "ok" } else { "fenced" }.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            audit_seq: state.gov.audit().durable_head().seq,
        }),
    )
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let audit = state.gov.audit();
    let body = state
        .metrics
        .render(audit.stats(), audit.durable_head().seq);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "OpenAPI 3.1 document"), (status = 401, body = ErrorBody)))]
pub async fn openapi(_auth: Authed) -> impl IntoResponse {
    axum::Json(crate::openapi_document())
}

/// Who the token belongs to.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
pub async fn whoami(auth: Authed) -> axum::Json<WhoAmI> {
    axum::Json(WhoAmI {
        principal: PrincipalView::of(auth.actor.principal.clone(), &auth.actor.principal),
        token_id: auth.actor.token_id,
    })
}

/// Creates a department (admin).
#[utoipa::path(post, path = "/api/v1/departments", tag = "identity", security(("bearer" = [])),
    request_body = CreateDepartment,
    responses((status = 201, body = DepartmentView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_department(
    State(state): State<AppState>,
    auth: Authed,
    Json(req): Json<CreateDepartment>,
) -> ApiResult<(StatusCode, axum::Json<DepartmentView>)> {
    let name = Name::parse("department", &req.name)?;
    let title = title(req.title, name.as_str(), state.limits.title_bytes_max)?;
    let d = state
        .gov
        .create_department(&auth.actor, name, title, &auth.ctx())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(d.into())))
}

/// Lists departments.
#[utoipa::path(get, path = "/api/v1/departments", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = DepartmentList), (status = 401, body = ErrorBody)))]
pub async fn list_departments(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<axum::Json<DepartmentList>> {
    let departments = state.gov.list_departments(&auth.actor)?;
    Ok(axum::Json(DepartmentList {
        departments: departments.into_iter().map(Into::into).collect(),
    }))
}

/// One department.
#[utoipa::path(get, path = "/api/v1/departments/{name}", tag = "identity", security(("bearer" = [])),
    params(("name" = String, Path, description = "department name")),
    responses((status = 200, body = DepartmentView), (status = 404, body = ErrorBody)))]
pub async fn get_department(
    State(state): State<AppState>,
    auth: Authed,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<DepartmentView>> {
    Ok(axum::Json(
        state.gov.get_department(&auth.actor, &name)?.into(),
    ))
}

/// Creates a principal and returns its first token (shown once).
#[utoipa::path(post, path = "/api/v1/principals", tag = "identity", security(("bearer" = [])),
    request_body = CreatePrincipal,
    responses((status = 201, body = PrincipalCreated), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_principal(
    State(state): State<AppState>,
    auth: Authed,
    Json(req): Json<CreatePrincipal>,
) -> ApiResult<(StatusCode, axum::Json<PrincipalCreated>)> {
    let name = Name::parse("principal", &req.name)?;
    let role: Role = req.role.parse()?;
    let department = req
        .department
        .as_deref()
        .map(|d| Name::parse("department", d))
        .transpose()?;
    let id_number = req
        .id_number
        .as_deref()
        .map(NationalId::parse)
        .transpose()?;
    let display_name = match req.display_name {
        Some(d) => Some(title(Some(d), "", state.limits.title_bytes_max)?),
        None => None,
    };
    let spec = PrincipalSpec {
        name,
        role,
        department,
        id_number,
        display_name,
        token_expires_at: req.token_expires_at,
    };
    let (principal, token) = state
        .gov
        .create_principal(&auth.actor, spec, &auth.ctx())
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(PrincipalCreated {
            principal: PrincipalView::of(principal, &auth.actor.principal),
            token: token.into(),
        }),
    ))
}

/// Lists the principals the caller may see.
#[utoipa::path(get, path = "/api/v1/principals", tag = "identity", security(("bearer" = [])),
    params(PrincipalFilter),
    responses((status = 200, body = PrincipalList), (status = 401, body = ErrorBody)))]
pub async fn list_principals(
    State(state): State<AppState>,
    auth: Authed,
    Query(filter): Query<PrincipalFilter>,
) -> ApiResult<axum::Json<PrincipalList>> {
    let list = state
        .gov
        .list_principals(&auth.actor, filter.department.as_deref())?;
    Ok(axum::Json(PrincipalList {
        principals: list
            .into_iter()
            .take(state.limits.list_items_max)
            .map(|p| PrincipalView::of(p, &auth.actor.principal))
            .collect(),
    }))
}

/// One principal.
#[utoipa::path(get, path = "/api/v1/principals/{name}", tag = "identity", security(("bearer" = [])),
    params(("name" = String, Path, description = "principal name")),
    responses((status = 200, body = PrincipalView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_principal(
    State(state): State<AppState>,
    auth: Authed,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<PrincipalView>> {
    let p = state
        .gov
        .get_principal(&auth.actor, &name, &auth.ctx())
        .await?;
    Ok(axum::Json(PrincipalView::of(p, &auth.actor.principal)))
}

/// Creates a token for a principal (shown once).
#[utoipa::path(post, path = "/api/v1/principals/{name}/tokens", tag = "identity", security(("bearer" = [])),
    params(("name" = String, Path, description = "principal name")),
    request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_token(
    State(state): State<AppState>,
    auth: Authed,
    Path(name): Path<String>,
    Json(req): Json<CreateToken>,
) -> ApiResult<(StatusCode, axum::Json<TokenCreated>)> {
    let token = state
        .gov
        .create_token(&auth.actor, &name, req.expires_at, &auth.ctx())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(token.into())))
}

/// Lists tokens (without secrets) the caller may manage.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "identity", security(("bearer" = [])),
    params(TokenFilter),
    responses((status = 200, body = TokenList), (status = 403, body = ErrorBody)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    auth: Authed,
    Query(filter): Query<TokenFilter>,
) -> ApiResult<axum::Json<TokenList>> {
    let now = state.gov.now();
    let tokens = state
        .gov
        .list_tokens(&auth.actor, filter.principal.as_deref())?;
    Ok(axum::Json(TokenList {
        tokens: tokens
            .into_iter()
            .take(state.limits.list_items_max)
            .map(|t| TokenView::of(t, now))
            .collect(),
    }))
}

/// Revokes a token. Idempotent.
#[utoipa::path(post, path = "/api/v1/tokens/{id}/revoke", tag = "identity", security(("bearer" = [])),
    params(("id" = String, Path, description = "token id")),
    responses((status = 200, body = TokenView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<TokenView>> {
    let info = state
        .gov
        .revoke_token(&auth.actor, &id, &auth.ctx())
        .await?;
    Ok(axum::Json(TokenView::of(info, state.gov.now())))
}

/// Reads the audit chain. Admins read everything, stewards their department's records,
/// everyone else their own.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", security(("bearer" = [])),
    params(AuditFilter),
    responses((status = 200, body = AuditPageView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn audit(
    State(state): State<AppState>,
    auth: Authed,
    Query(f): Query<AuditFilter>,
) -> ApiResult<axum::Json<AuditPageView>> {
    let max = state.limits.audit_page_records_max;
    let limit = f.limit.unwrap_or(100);
    if limit == 0 || limit > max {
        return Err(Error::limit(
            "audit_page_records_max",
            max as u64,
            format!("limit {limit} is out of range"),
        )
        .hint(format!(
            "ask for 1 to {max} records and follow `next` for more"
        ))
        .into());
    }
    let outcome = match f.outcome.as_deref() {
        None => None,
        Some("ok") => Some(Outcome::Ok),
        Some("denied") => Some(Outcome::Denied),
        Some("failed") => Some(Outcome::Failed),
        Some(other) => {
            return Err(Error::invalid(format!("invalid outcome \"{other}\""))
                .hint("use ok, denied or failed")
                .into());
        }
    };
    let descending = match f.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(Error::invalid(format!("invalid order \"{other}\""))
                .hint("use asc or desc")
                .into());
        }
    };
    let q = AuditQuery {
        principal: f.principal,
        department: f.department,
        action: f.action,
        object: f.object,
        outcome,
        since: f.since,
        until: f.until,
        after: f.after,
        before: f.before,
        descending,
        limit,
        node: f.node,
        cursor: f.cursor,
    };
    let page = state.gov.query_audit(&auth.actor, q, &auth.ctx()).await?;
    Ok(axum::Json(AuditPageView {
        records: page.records.into_iter().map(Into::into).collect(),
        next: page.next,
        next_cursor: page.next_cursor,
    }))
}

/// Runs one SQL query over the tables the caller may see. Audited. Results as JSON (default),
/// CSV or an Arrow IPC stream (`format`, or the `Accept` header).
#[utoipa::path(post, path = "/api/v1/sql", tag = "sql", security(("bearer" = [])),
    request_body = SqlRequest,
    responses((status = 200, body = SqlResult), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn sql(
    State(state): State<AppState>,
    auth: Authed,
    headers: axum::http::HeaderMap,
    Json(req): Json<SqlRequest>,
) -> ApiResult<axum::response::Response> {
    const ARROW: &str = "application/vnd.apache.arrow.stream";
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = match req.format.as_deref() {
        Some("json") => "json",
        Some("csv") => "csv",
        Some("arrow") => "arrow",
        Some(other) => {
            return Err(Error::invalid(format!("invalid format \"{other}\""))
                .hint("use json, csv or arrow")
                .into());
        }
        None if accept.contains("text/csv") => "csv",
        None if accept.contains(ARROW) => "arrow",
        None => "json",
    };
    if yunqi_sense::ddl_kind(&req.sql).is_some() {
        let out = state
            .sense
            .execute_ddl(&auth.actor, &req.sql, &auth.ctx())
            .await?;
        return Ok(axum::Json(out).into_response());
    }
    let result = state.sql.query(&auth.actor, &req.sql, &auth.ctx()).await?;
    let truncated = if result.truncated { "true" } else { "false" };
    let (content_type, body) = match format {
        "csv" => (
            "text/csv; charset=utf-8",
            yunqi_sql::convert::to_csv(&result.schema, &result.batches)?,
        ),
        "arrow" => (
            ARROW,
            yunqi_sql::convert::to_arrow_ipc(&result.schema, &result.batches)?,
        ),
        _ => return sql_json(result).map(IntoResponse::into_response),
    };
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (
                axum::http::HeaderName::from_static("x-yunqi-truncated"),
                truncated,
            ),
        ],
        body,
    )
        .into_response())
}
fn sql_json(result: yunqi_sql::QueryResult) -> ApiResult<axum::Json<SqlResult>> {
    let rows = yunqi_sql::convert::rows_to_json(&result.batches)
        .map_err(|e| Error::internal(format!("cannot render the result: {e}")))?;
    Ok(axum::Json(SqlResult {
        columns: result
            .schema
            .fields()
            .iter()
            .map(|f| SqlColumn {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
            })
            .collect(),
        row_count: rows.len(),
        rows,
        truncated: result.truncated,
    }))
}

/// A declared column from its wire form.
fn column_of(c: ColumnSpec) -> Result<yunqi_datasets::Column, Error> {
    let declared = c.class.is_some();
    Ok(yunqi_datasets::Column {
        name: Name::parse("column", &c.name)?.to_string(),
        label: None,
        column_type: yunqi_datasets::ColumnType::parse(&c.column_type)?,
        class: c
            .class
            .as_deref()
            .map(str::parse)
            .transpose()?
            .unwrap_or(yunqi_types::ColumnClass::Internal),
        class_declared: declared,
        detected: None,
    })
}

/// Creates a dataset (stewards of its department).
#[utoipa::path(post, path = "/api/v1/datasets", tag = "datasets", security(("bearer" = [])),
    request_body = CreateDataset,
    responses((status = 201, body = DatasetView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_dataset(
    State(state): State<AppState>,
    auth: Authed,
    Json(req): Json<CreateDataset>,
) -> ApiResult<(StatusCode, axum::Json<DatasetView>)> {
    let department = Name::parse("department", &req.department)?;
    let name = Name::parse("dataset", &req.name)?;
    let description = title(req.description, "", 4096)?;
    let columns = req
        .columns
        .into_iter()
        .map(column_of)
        .collect::<Result<Vec<_>, _>>()?;
    let subject = req
        .subject
        .map(|s| Name::parse("column", &s).map(|n| n.to_string()))
        .transpose()?;
    let spec = yunqi_datasets::DatasetSpec {
        on_node: false,
        department,
        name,
        description,
        columns,
        subject,
        tags: req.tags,
    };
    let m = state
        .gov
        .create_dataset(&auth.actor, spec, &auth.ctx())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(m.into())))
}

/// The catalog: every dataset's schema, classes and versions (not its data), optionally
/// searched.
#[utoipa::path(get, path = "/api/v1/datasets", tag = "datasets", security(("bearer" = [])),
    params(CatalogFilter),
    responses((status = 200, body = DatasetList), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_datasets(
    State(state): State<AppState>,
    auth: Authed,
    Query(f): Query<CatalogFilter>,
) -> ApiResult<axum::Json<DatasetList>> {
    let class: Option<yunqi_types::ColumnClass> = f.class.as_deref().map(str::parse).transpose()?;
    let words: Vec<String> =
        f.q.as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_lowercase)
            .collect();
    let list = state.gov.catalog(&auth.actor)?;
    let datasets = list
        .into_iter()
        .filter(|m| class.is_none_or(|c| m.columns.iter().any(|col| col.class == c)))
        .filter(|m| {
            let text = std::iter::once(m.sql_name())
                .chain(std::iter::once(m.description.clone()))
                .chain(m.tags.iter().cloned())
                .chain(
                    m.columns
                        .iter()
                        .flat_map(|c| std::iter::once(c.name.clone()).chain(c.label.clone())),
                )
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase();
            words.iter().all(|w| text.contains(w.as_str()))
        })
        .map(Into::into)
        .collect();
    Ok(axum::Json(DatasetList { datasets }))
}

/// One dataset.
#[utoipa::path(get, path = "/api/v1/datasets/{department}/{name}", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = DatasetView), (status = 404, body = ErrorBody)))]
pub async fn get_dataset(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<DatasetView>> {
    let m = state.gov.catalog_entry(&auth.actor, &department, &name)?;
    let filter = yunqi_governance::GrantFilter {
        state: None,
        dataset: Some(m.sql_name()),
    };
    let now = state.gov.now();
    let grants = state
        .gov
        .list_grants(&auth.actor, &filter)?
        .into_iter()
        .map(|g| GrantView::new(g, now))
        .collect();
    let name = m.sql_name();
    let used_by = state
        .gov
        .catalog(&auth.actor)?
        .into_iter()
        .filter(|d| {
            d.derived_from
                .as_ref()
                .is_some_and(|x| x.sources.contains(&name))
        })
        .map(|d| d.sql_name())
        .collect();
    let mut view: DatasetView = m.into();
    view.grants = Some(grants);
    view.used_by = Some(used_by);
    Ok(axum::Json(view))
}

/// Imports a file (CSV in UTF-8 or GBK, or NDJSON) as a new version. The body is the file.
#[utoipa::path(post, path = "/api/v1/datasets/{department}/{name}/import", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path), ImportParams),
    request_body(content = String, content_type = "text/csv"),
    responses((status = 200, description = "the import report"), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn import_dataset(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    Query(p): Query<ImportParams>,
    RawBody(body): RawBody,
) -> ApiResult<axum::Json<yunqi_datasets::ImportReport>> {
    let mode = match p.mode.as_deref() {
        None | Some("append") => yunqi_datasets::Mode::Append,
        Some("replace") => yunqi_datasets::Mode::Replace,
        Some("upsert") => yunqi_datasets::Mode::Upsert,
        Some(other) => {
            return Err(Error::invalid(format!("invalid mode \"{other}\""))
                .hint("use append, replace or upsert")
                .into());
        }
    };
    let key: Vec<String> = p
        .key
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    let delimiter = match p.delimiter.as_deref() {
        None => None,
        Some("tab") | Some("\t") => Some(b'\t'),
        Some(d) if d.len() == 1 && ",;|".contains(d) => Some(d.as_bytes()[0]),
        Some(other) => {
            return Err(Error::invalid(format!("invalid delimiter \"{other}\""))
                .hint("use , ; | or tab")
                .into());
        }
    };
    let format = match p.format.as_deref() {
        None => None,
        Some("csv") => Some(yunqi_datasets::Format::Csv),
        Some("ndjson") | Some("jsonl") => Some(yunqi_datasets::Format::Ndjson),
        Some("parquet") => Some(yunqi_datasets::Format::Parquet),
        Some(other) => {
            return Err(Error::invalid(format!("invalid format \"{other}\""))
                .hint("use csv, ndjson or parquet")
                .into());
        }
    };
    let options = yunqi_datasets::ImportOptions {
        mode,
        key,
        lenient: p.lenient.unwrap_or(false),
        delimiter,
        header: p.header,
        format,
    };
    let report = state
        .gov
        .import_dataset(
            &auth.actor,
            &department,
            &name,
            body.to_vec(),
            options,
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(report))
}

/// Declares a column's class; imports never change a declared class.
#[utoipa::path(post, path = "/api/v1/datasets/{department}/{name}/columns/{column}/class", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path), ("column" = String, Path)),
    request_body = SetClass,
    responses((status = 200, body = DatasetView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_class(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name, column)): Path<(String, String, String)>,
    Json(req): Json<SetClass>,
) -> ApiResult<axum::Json<DatasetView>> {
    let class: yunqi_types::ColumnClass = req.class.parse()?;
    let m = state
        .gov
        .classify_column(&auth.actor, &department, &name, &column, class, &auth.ctx())
        .await?;
    Ok(axum::Json(m.into()))
}

/// Unknown paths.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    Error::new(
        yunqi_types::ErrorCode::NotFound,
        format!("path \"{}\" does not exist", uri.path()),
    )
    .hint("the API is under /api/v1/; its paths are listed in /api/v1/openapi.json")
    .into()
}

/// Known paths with an unsupported method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::with_status(
        Error::invalid(format!(
            "method {method} is not allowed on \"{}\"",
            uri.path()
        ))
        .hint("see /api/v1/openapi.json for the methods of each path"),
        StatusCode::METHOD_NOT_ALLOWED,
    )
}

/// Asks for a grant on another department's dataset.
#[utoipa::path(post, path = "/api/v1/grants", tag = "grants", security(("bearer" = [])),
    request_body = RequestGrant,
    responses((status = 201, body = GrantView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn request_grant(
    State(state): State<AppState>,
    auth: Authed,
    Json(req): Json<RequestGrant>,
) -> ApiResult<(StatusCode, axum::Json<GrantView>)> {
    let request = yunqi_governance::GrantRequest {
        until: parse_until(&req.until)?,
        dataset: req.dataset,
        columns: req.columns,
        rows: req.rows,
        purpose: req.purpose,
        unmasked: req.unmasked,
        unmasked_reason: req.unmasked_reason,
    };
    let g = state
        .gov
        .request_grant(&auth.actor, request, &auth.ctx())
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(GrantView::new(g, state.gov.now())),
    ))
}

/// Grants and requests of the caller's department (as owner or grantee); all for the admin.
#[utoipa::path(get, path = "/api/v1/grants", tag = "grants", security(("bearer" = [])),
    params(GrantListFilter),
    responses((status = 200, body = GrantList), (status = 400, body = ErrorBody)))]
pub async fn list_grants(
    State(state): State<AppState>,
    auth: Authed,
    Query(f): Query<GrantListFilter>,
) -> ApiResult<axum::Json<GrantList>> {
    let filter = yunqi_governance::GrantFilter {
        state: f
            .state
            .as_deref()
            .map(yunqi_types::GrantState::parse)
            .transpose()?,
        dataset: f.dataset,
    };
    let now = state.gov.now();
    let grants = state
        .gov
        .list_grants(&auth.actor, &filter)?
        .into_iter()
        .map(|g| GrantView::new(g, now))
        .collect();
    Ok(axum::Json(GrantList { grants }))
}

/// One grant.
#[utoipa::path(get, path = "/api/v1/grants/{id}", tag = "grants", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = GrantView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_grant(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<GrantView>> {
    let g = state.gov.get_grant(&auth.actor, &id, &auth.ctx()).await?;
    Ok(axum::Json(GrantView::new(g, state.gov.now())))
}

/// Approves a pending request (a steward of the owning department).
#[utoipa::path(post, path = "/api/v1/grants/{id}/approve", tag = "grants", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = GrantView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn approve_grant(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<GrantView>> {
    let g = state
        .gov
        .approve_grant(&auth.actor, &id, &auth.ctx())
        .await?;
    Ok(axum::Json(GrantView::new(g, state.gov.now())))
}

/// Refuses a pending request with a reason (a steward of the owning department).
#[utoipa::path(post, path = "/api/v1/grants/{id}/refuse", tag = "grants", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = GrantDecision,
    responses((status = 200, body = GrantView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn refuse_grant(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
    Json(d): Json<GrantDecision>,
) -> ApiResult<axum::Json<GrantView>> {
    let g = state
        .gov
        .refuse_grant(
            &auth.actor,
            &id,
            d.reason.as_deref().unwrap_or(""),
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(GrantView::new(g, state.gov.now())))
}

/// Revokes an approved grant (stewards of the owner or the grantee, the admin). Idempotent.
#[utoipa::path(post, path = "/api/v1/grants/{id}/revoke", tag = "grants", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = GrantDecision,
    responses((status = 200, body = GrantView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn revoke_grant(
    State(state): State<AppState>,
    auth: Authed,
    Path(id): Path<String>,
    Json(d): Json<GrantDecision>,
) -> ApiResult<axum::Json<GrantView>> {
    let g = state
        .gov
        .revoke_grant(&auth.actor, &id, d.reason.as_deref(), &auth.ctx())
        .await?;
    Ok(axum::Json(GrantView::new(g, state.gov.now())))
}

/// Declares (or, with `null`, clears) a dataset's subject column: the column naming the person
/// each row is about.
#[utoipa::path(post, path = "/api/v1/datasets/{department}/{name}/subject", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    request_body = SetSubject,
    responses((status = 200, body = DatasetView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_subject(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    Json(req): Json<SetSubject>,
) -> ApiResult<axum::Json<DatasetView>> {
    let m = state
        .gov
        .set_subject(
            &auth.actor,
            &department,
            &name,
            req.column.as_deref(),
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(m.into()))
}

/// For a citizen: who read my data, when, for what purpose — the queries that returned rows
/// about the caller, newest first.
#[utoipa::path(get, path = "/api/v1/me/accesses", tag = "audit", security(("bearer" = [])),
    responses((status = 200, body = AccessList), (status = 403, body = ErrorBody)))]
pub async fn my_accesses(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<axum::Json<AccessList>> {
    let records = state
        .gov
        .accesses_of(
            &auth.actor,
            state.limits.audit_page_records_max,
            &auth.ctx(),
        )
        .await?;
    Ok(axum::Json(AccessList {
        accesses: records
            .into_iter()
            .map(|r| AccessView {
                seq: r.seq,
                time: r.time,
                principal: r.principal,
                department: r.department,
                object: r.object,
                purpose: r.purpose,
            })
            .collect(),
    }))
}

/// Adds a column at the end of a dataset's schema; earlier versions read it as NULL.
#[utoipa::path(post, path = "/api/v1/datasets/{department}/{name}/columns", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    request_body = ColumnSpec,
    responses((status = 200, body = DatasetView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add_column(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    Json(req): Json<ColumnSpec>,
) -> ApiResult<axum::Json<DatasetView>> {
    let column = column_of(req)?;
    let m = state
        .gov
        .add_column(&auth.actor, &department, &name, column, &auth.ctx())
        .await?;
    Ok(axum::Json(m.into()))
}

/// Replaces a dataset's tags (searchable in the catalog).
#[utoipa::path(post, path = "/api/v1/datasets/{department}/{name}/tags", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    request_body = SetTags,
    responses((status = 200, body = DatasetView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_tags(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    Json(req): Json<SetTags>,
) -> ApiResult<axum::Json<DatasetView>> {
    let m = state
        .gov
        .set_tags(&auth.actor, &department, &name, req.tags, &auth.ctx())
        .await?;
    Ok(axum::Json(m.into()))
}

/// Derives the dataset from a query over the department's own datasets: the result becomes
/// its next version (the dataset is created if needed), and the query and the datasets it read
/// are kept as its lineage.
#[utoipa::path(post, path = "/api/v1/datasets/{department}/{name}/derive", tag = "datasets", security(("bearer" = [])),
    params(("department" = String, Path), ("name" = String, Path)),
    request_body = Derive,
    responses((status = 200, body = DatasetView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn derive(
    State(state): State<AppState>,
    auth: Authed,
    Path((department, name)): Path<(String, String)>,
    Json(req): Json<Derive>,
) -> ApiResult<axum::Json<DatasetView>> {
    let m = state
        .sql
        .derive(&auth.actor, &department, &name, &req.sql, &auth.ctx())
        .await?;
    Ok(axum::Json(m.into()))
}
