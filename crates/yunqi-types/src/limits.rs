//! Every limit of the platform, in one place. Names end with their unit. Exceeding a limit is a
//! typed [`crate::ErrorCode::LimitExceeded`] error, never an out-of-memory or an endless wait.

/// The named limits. `Limits::default()` holds the values a fresh install uses; the `[limits]`
/// section of `yunqi.toml` sets any of them by name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest HTTP request body.
    pub request_body_bytes_max: usize,
    /// Most records returned by one page of `GET /api/v1/audit`.
    pub audit_page_records_max: usize,
    /// Bound of the audit chain's append queue; callers wait (async) when it is full.
    pub audit_queue_records_max: usize,
    /// Most records written in one group commit.
    pub audit_batch_records_max: usize,
    /// Largest text field (principal, action, object, purpose, detail) of one audit record.
    pub audit_field_bytes_max: usize,
    /// Size at which the audit chain starts a new segment file.
    pub audit_segment_bytes_max: u64,
    /// How far ahead of its last record an audit segment is grown with zeros.
    pub audit_preallocate_bytes: u64,
    /// Longest display name or title.
    pub title_bytes_max: usize,
    /// Most principals, departments or tokens returned by one list call.
    pub list_items_max: usize,
    /// Largest file one import takes.
    pub import_bytes_max: usize,
    /// Most rows a SQL query returns over HTTP (the PostgreSQL protocol streams).
    pub sql_result_rows_max: usize,
    /// Longest a SQL query may run.
    pub query_timeout_ms: u64,
    /// Memory one SQL query may use for sorting, grouping and joining.
    pub query_memory_bytes_max: usize,
    /// Longest SQL text.
    pub sql_text_bytes_max: usize,
    /// Most PostgreSQL protocol connections at once.
    pub pg_connections_max: usize,
    /// Longest time a request may take before it is cut with 503.
    pub request_timeout_ms: u64,
    /// Most requests handled at once; more wait in the kernel's accept queue.
    pub requests_in_flight_max: usize,
    /// Longest a grant may run, from its request to its expiry.
    pub grant_days_max: u32,
    /// Queries returning at most this many rows record, for datasets with a subject column,
    /// whose rows they returned (so citizens can see who read their data).
    pub subject_rows_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_body_bytes_max: 1 << 20,
            audit_page_records_max: 1_000,
            audit_queue_records_max: 65_536,
            audit_batch_records_max: 4_096,
            audit_field_bytes_max: 4_096,
            audit_segment_bytes_max: 128 << 20,
            audit_preallocate_bytes: 4 << 20,
            title_bytes_max: 256,
            list_items_max: 10_000,
            import_bytes_max: 256 << 20,
            sql_result_rows_max: 100_000,
            query_timeout_ms: 30_000,
            query_memory_bytes_max: 512 << 20,
            sql_text_bytes_max: 256 << 10,
            pg_connections_max: 256,
            request_timeout_ms: 30_000,
            requests_in_flight_max: 1_024,
            grant_days_max: 366,
            subject_rows_max: 100,
        }
    }
}
