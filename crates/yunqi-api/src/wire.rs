//! Wire types: the JSON the HTTP API reads and writes. Separate from the domain types so that
//! the API can stay stable while the domain changes. Request types reject unknown fields.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use yunqi_types::{Department, Principal, TokenInfo, mask};

/// `POST /api/v1/departments`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDepartment {
    /// Lowercase identifier, the SQL schema name: `transport`.
    pub name: String,
    /// Human title: `交通运输局 Transport Bureau`.
    #[serde(default)]
    pub title: Option<String>,
}

/// A department.
#[derive(Debug, Serialize, ToSchema)]
pub struct DepartmentView {
    /// Name.
    pub name: String,
    /// Title.
    pub title: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl From<Department> for DepartmentView {
    fn from(d: Department) -> Self {
        DepartmentView {
            name: d.name.to_string(),
            title: d.title,
            created_at: d.created_at,
        }
    }
}

/// A list of departments.
#[derive(Debug, Serialize, ToSchema)]
pub struct DepartmentList {
    /// The departments, by name.
    pub departments: Vec<DepartmentView>,
}

/// `POST /api/v1/principals`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePrincipal {
    /// Lowercase identifier; the user name over the PostgreSQL wire protocol.
    pub name: String,
    /// One of admin, steward, analyst, officer, service, citizen.
    pub role: String,
    /// Department; required for steward, analyst, officer, service.
    #[serde(default)]
    pub department: Option<String>,
    /// National ID number; required for citizens.
    #[serde(default)]
    pub id_number: Option<String>,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// When the first token expires (RFC 3339); never if absent.
    #[serde(default)]
    pub token_expires_at: Option<DateTime<Utc>>,
}

/// A principal. The national ID number is masked unless the viewer is the principal itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrincipalView {
    /// Name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Department.
    pub department: Option<String>,
    /// National ID number (citizens), masked for everyone but the citizen.
    pub id_number: Option<String>,
    /// Display name.
    pub display_name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl PrincipalView {
    /// The view of `p` as `viewer` may see it.
    pub fn of(p: Principal, viewer: &Principal) -> Self {
        let own = p.name == viewer.name;
        PrincipalView {
            id_number: p.id_number.map(|id| {
                if own {
                    id.to_string()
                } else {
                    mask::national_id(id.as_str())
                }
            }),
            name: p.name.to_string(),
            role: p.role.to_string(),
            department: p.department.map(|d| d.to_string()),
            display_name: p.display_name,
            created_at: p.created_at,
        }
    }
}

/// A list of principals.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrincipalList {
    /// The principals the caller may see, by name.
    pub principals: Vec<PrincipalView>,
}

/// A token just created. `token` is shown this once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    /// Public id (for `yunqi token revoke ID`).
    pub id: String,
    /// The bearer token.
    pub token: String,
    /// Its principal.
    pub principal: String,
    /// Expiry, if any.
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<yunqi_governance::NewToken> for TokenCreated {
    fn from(t: yunqi_governance::NewToken) -> Self {
        TokenCreated {
            id: t.id,
            token: t.token,
            principal: t.principal.to_string(),
            expires_at: t.expires_at,
        }
    }
}

/// A principal just created, with its first token.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrincipalCreated {
    /// The principal.
    pub principal: PrincipalView,
    /// Its first token.
    pub token: TokenCreated,
}

/// `POST /api/v1/principals/{name}/tokens`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// When the token expires (RFC 3339); never if absent.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A token, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    /// Public id.
    pub id: String,
    /// Principal.
    pub principal: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Revocation time.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether it authenticates now.
    pub active: bool,
}

impl TokenView {
    /// The view of a token at `now`.
    pub fn of(t: TokenInfo, now: DateTime<Utc>) -> Self {
        TokenView {
            active: t.is_active(now),
            id: t.id,
            principal: t.principal.to_string(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// A list of tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// Tokens the caller may manage, oldest first.
    pub tokens: Vec<TokenView>,
}

/// `GET /api/v1/principals` filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PrincipalFilter {
    /// Only principals of this department.
    pub department: Option<String>,
}

/// `GET /api/v1/tokens` filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TokenFilter {
    /// Only tokens of this principal.
    pub principal: Option<String>,
}

/// `GET /api/v1/audit` filters. Text filters match exactly, or by prefix when they end in `*`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// Acting principal.
    pub principal: Option<String>,
    /// Acting principal's department.
    pub department: Option<String>,
    /// Action (`token.revoke`, `principal.*`).
    pub action: Option<String>,
    /// Object (`department:transport`, `token:*`).
    pub object: Option<String>,
    /// ok, denied or failed.
    pub outcome: Option<String>,
    /// Records at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Records before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// Cursor for ascending pages: records after this sequence number.
    pub after: Option<u64>,
    /// Cursor for descending pages: records before this sequence number.
    pub before: Option<u64>,
    /// `asc` (default) or `desc` (newest first).
    pub order: Option<String>,
    /// Records per page, at most 1000 (default 100).
    pub limit: Option<usize>,
    /// In a cluster, the node whose chain to read (each node keeps its own, paged by `after`
    /// and `before`); without it, every node's records merged in time order, paged by `cursor`.
    pub node: Option<String>,
    /// In a cluster without `node`: the `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One audit record.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditRecordView {
    /// Sequence number, dense from 1.
    pub seq: u64,
    /// Time.
    pub time: DateTime<Utc>,
    /// Acting principal ("" if none was established).
    pub principal: String,
    /// Its department.
    pub department: String,
    /// Action.
    pub action: String,
    /// Object.
    pub object: String,
    /// ok, denied or failed.
    pub outcome: String,
    /// Purpose of the access.
    pub purpose: String,
    /// Explanation.
    pub detail: String,
    /// Request id.
    pub request_id: String,
    /// Hash of the previous record (hex).
    pub prev_hash: String,
    /// Hash of this record (hex).
    pub hash: String,
    /// In a cluster, the node whose chain holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl From<yunqi_audit::AuditRecord> for AuditRecordView {
    fn from(r: yunqi_audit::AuditRecord) -> Self {
        AuditRecordView {
            seq: r.seq,
            time: r.time,
            principal: r.principal,
            department: r.department,
            action: r.action,
            object: r.object,
            outcome: r.outcome.as_str().to_string(),
            purpose: r.purpose,
            detail: r.detail,
            request_id: r.request_id,
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
            node: r.node,
        }
    }
}

/// A page of audit records.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPageView {
    /// Records.
    pub records: Vec<AuditRecordView>,
    /// Cursor for the next page (`after` ascending, `before` descending), null at the end.
    pub next: Option<u64>,
    /// In a cluster, reading every node's records: `cursor` for the next page, absent at the
    /// end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Who is calling.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The principal.
    pub principal: PrincipalView,
    /// The token used.
    pub token_id: String,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `fenced` (a cluster node that cannot confirm it is current: it refuses requests).
    pub status: String,
    /// yunqi version.
    pub version: String,
    /// Sequence number of the last durable audit record.
    pub audit_seq: u64,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: invalid_input, unauthenticated, permission_denied, not_found,
    /// already_exists, conflict, limit_exceeded, unavailable, internal.
    pub code: String,
    /// Lowercase primary message naming the object.
    pub message: String,
    /// Explanation.
    pub detail: Option<String>,
    /// What to do.
    pub hint: Option<String>,
    /// The request id, also in the `x-request-id` header and the server log.
    pub request_id: String,
}

/// `POST /api/v1/sql`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One query, e.g. `SELECT name, title FROM system.departments`.
    pub sql: String,
    /// `json` (the default), `csv` (with a header line) or `arrow` (an Arrow IPC stream).
    /// Without it, the `Accept` header decides (`text/csv`,
    /// `application/vnd.apache.arrow.stream`).
    #[serde(default)]
    pub format: Option<String>,
}

/// A result column.
#[derive(Debug, Serialize, ToSchema)]
pub struct SqlColumn {
    /// Name.
    pub name: String,
    /// Type (Arrow's name for it: Utf8, Int64, Timestamp(µs, "UTC"), …).
    #[serde(rename = "type")]
    pub data_type: String,
}

/// A query's result.
#[derive(Debug, Serialize, ToSchema)]
pub struct SqlResult {
    /// Columns, in order.
    pub columns: Vec<SqlColumn>,
    /// Rows: one array per row, one value per column (numbers, booleans, strings, null).
    #[schema(value_type = Vec<Vec<Object>>)]
    pub rows: Vec<serde_json::Value>,
    /// Number of rows returned.
    pub row_count: usize,
    /// Whether rows past `sql_result_rows_max` were left out.
    pub truncated: bool,
}

/// A declared column of `POST /api/v1/datasets`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Lowercase identifier.
    pub name: String,
    /// text, int, float, bool, date or timestamp.
    #[serde(rename = "type")]
    pub column_type: String,
    /// public, internal, personal or sensitive; suggested at import when absent.
    #[serde(default)]
    pub class: Option<String>,
}

/// `POST /api/v1/datasets`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDataset {
    /// Owning department.
    pub department: String,
    /// Name, a lowercase identifier; the SQL name is `department.name`.
    pub name: String,
    /// What it holds (searchable).
    #[serde(default)]
    pub description: Option<String>,
    /// Columns; taken from the first import when absent.
    #[serde(default)]
    pub columns: Vec<ColumnSpec>,
    /// The column naming the person each row is about (a resident ID number column).
    #[serde(default)]
    pub subject: Option<String>,
    /// Tags (searchable).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `POST /api/v1/datasets/{department}/{name}/derive`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Derive {
    /// One query over the department's own datasets; its result becomes the dataset.
    pub sql: String,
}

/// `POST /api/v1/datasets/{department}/{name}/tags`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTags {
    /// The dataset's tags (replacing the ones it had).
    pub tags: Vec<String>,
}

/// `POST /api/v1/datasets/{department}/{name}/subject`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSubject {
    /// The subject column; `null` for none.
    pub column: Option<String>,
}

/// One access to the caller's data.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccessView {
    /// Audit sequence number.
    pub seq: u64,
    /// When.
    pub time: DateTime<Utc>,
    /// Who read it.
    pub principal: String,
    /// Their department.
    pub department: String,
    /// What they read (`table:…`).
    pub object: String,
    /// For what purpose (the grants' purposes).
    pub purpose: String,
}

/// `GET /api/v1/me/accesses`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccessList {
    /// Newest first.
    pub accesses: Vec<AccessView>,
}

/// `POST /api/v1/datasets/{department}/{name}/import` parameters. The body is the file.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// `append` (default), `replace` or `upsert` (with `key`).
    pub mode: Option<String>,
    /// Key columns of an upsert, comma-separated.
    pub key: Option<String>,
    /// Import the good rows and keep the bad ones in the rejects, instead of refusing the file.
    pub lenient: Option<bool>,
    /// `,` `;` `|` or `tab`; detected when absent.
    pub delimiter: Option<String>,
    /// Whether the first row is a header; detected when absent.
    pub header: Option<bool>,
    /// `csv`, `ndjson` (one JSON object per line) or `parquet`; detected when absent.
    pub format: Option<String>,
}

/// `POST /api/v1/datasets/{department}/{name}/columns/{column}/class`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetClass {
    /// public, internal, personal or sensitive.
    pub class: String,
}

/// A dataset: its schema with classes and its versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetView {
    /// `department.name`.
    pub sql_name: String,
    /// Department.
    pub department: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Columns with types and classes.
    #[schema(value_type = Vec<Object>)]
    pub columns: Vec<yunqi_datasets::Column>,
    /// Rows in the current version.
    pub rows: u64,
    /// Bytes of the current version.
    pub bytes: u64,
    /// Versions, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub versions: Vec<yunqi_datasets::Version>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The subject column, if any.
    pub subject: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Lineage: the query and datasets its current version was derived from, if it was.
    #[schema(value_type = Option<Object>)]
    pub derived_from: Option<yunqi_datasets::Derivation>,
    /// Lineage: datasets derived from this one (one dataset's page only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_by: Option<Vec<String>>,
    /// Grants and requests on it that the caller may see (one dataset's page only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<GrantView>>,
}

impl From<yunqi_datasets::Manifest> for DatasetView {
    fn from(m: yunqi_datasets::Manifest) -> Self {
        DatasetView {
            sql_name: m.sql_name(),
            rows: m.current().map_or(0, |v| v.rows),
            bytes: m.current().map_or(0, |v| v.bytes),
            department: m.department,
            name: m.name,
            description: m.description,
            columns: m.columns,
            versions: m.versions,
            created_at: m.created_at,
            subject: m.subject,
            tags: m.tags,
            derived_from: m.derived_from,
            used_by: None,
            grants: None,
        }
    }
}

/// The catalog.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetList {
    /// Datasets, by SQL name.
    pub datasets: Vec<DatasetView>,
}

/// `GET /api/v1/datasets` filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CatalogFilter {
    /// Words to find in the name, description, column names or headers (case-insensitive,
    /// Chinese or English); every word must match.
    pub q: Option<String>,
    /// Only datasets with a column of this class.
    pub class: Option<String>,
}

/// `POST /api/v1/grants`: a request for a grant.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestGrant {
    /// The dataset, `department.name`.
    pub dataset: String,
    /// Columns wanted (`["*"]` for all).
    pub columns: Vec<String>,
    /// Optional row filter: a SQL condition over the dataset's columns.
    #[serde(default)]
    pub rows: Option<String>,
    /// Why the data is needed.
    pub purpose: String,
    /// Last day of the grant, `YYYY-MM-DD` (it holds until that day ends, UTC+8), or an
    /// RFC 3339 time.
    pub until: String,
    /// Personal or sensitive columns wanted unmasked.
    #[serde(default)]
    pub unmasked: Vec<String>,
    /// Why unmasked values are needed (required with `unmasked`).
    #[serde(default)]
    pub unmasked_reason: Option<String>,
}

/// `POST /api/v1/grants/{id}/refuse` and `/revoke`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantDecision {
    /// Why (required to refuse).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A grant or a request for one.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantView {
    /// Id.
    pub id: String,
    /// The dataset.
    pub dataset: String,
    /// The department owning it.
    pub owner: String,
    /// The department the grant is for.
    pub grantee: String,
    /// pending, active, refused, revoked, superseded or expired.
    pub state: String,
    /// Granted columns.
    pub columns: Vec<String>,
    /// Row filter, if any.
    pub rows: Option<String>,
    /// Purpose.
    pub purpose: String,
    /// When it ends.
    pub expires_at: DateTime<Utc>,
    /// Columns readable unmasked.
    pub unmasked: Vec<String>,
    /// Why unmasked values are needed.
    pub unmasked_reason: Option<String>,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: DateTime<Utc>,
    /// Who approved or refused.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<DateTime<Utc>>,
    /// Why it was refused, revoked or superseded.
    pub reason: Option<String>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// When it was revoked or superseded.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl GrantView {
    /// The view of `g` at `now`.
    pub fn new(g: yunqi_types::Grant, now: DateTime<Utc>) -> GrantView {
        GrantView {
            state: g.state(now).to_string(),
            id: g.id,
            dataset: g.dataset,
            owner: g.owner,
            grantee: g.grantee,
            columns: g.columns,
            rows: g.rows,
            purpose: g.purpose,
            expires_at: g.expires_at,
            unmasked: g.unmasked,
            unmasked_reason: g.unmasked_reason,
            requested_by: g.requested_by,
            requested_at: g.requested_at,
            decided_by: g.decided_by,
            decided_at: g.decided_at,
            reason: g.reason,
            revoked_by: g.revoked_by,
            revoked_at: g.revoked_at,
        }
    }
}

/// `GET /api/v1/grants`.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantList {
    /// Grants, oldest first.
    pub grants: Vec<GrantView>,
}

/// Filters of `GET /api/v1/grants`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GrantListFilter {
    /// Only grants in this state (pending, active, refused, revoked, superseded, expired).
    pub state: Option<String>,
    /// Only grants on this dataset, `department.name`.
    pub dataset: Option<String>,
}

/// Parses an expiry: a date (the end of that day, city time) or an RFC 3339 time.
pub fn parse_until(raw: &str) -> Result<DateTime<Utc>, yunqi_types::Error> {
    let raw = raw.trim();
    if let Ok(d) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return Ok(yunqi_types::grant::end_of_city_day(d));
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            yunqi_types::Error::invalid(format!("invalid date \"{raw}\""))
                .hint("give the last day as YYYY-MM-DD, e.g. 2027-06-30")
        })
}
