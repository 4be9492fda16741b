//! Reads records back, filtered and paginated by sequence number. Only durable records are
//! returned. Reads go to the segment files directly and never block the writer.

use std::path::Path;

use chrono::{DateTime, Utc};
use yunqi_types::{Error, Outcome};

use crate::chain::list_segments;
use crate::format::{self, AuditRecord};

/// A text filter: exact, or a prefix when it ends with `*`.
fn text_matches(filter: &Option<String>, value: &str) -> bool {
    match filter {
        None => true,
        Some(f) => match f.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => value == f,
        },
    }
}

/// What to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Acting principal, exact or `prefix*`.
    pub principal: Option<String>,
    /// Acting department, exact or `prefix*`.
    pub department: Option<String>,
    /// Action, exact or `prefix*` (`principal.*`).
    pub action: Option<String>,
    /// Object, exact or `prefix*` (`department:*`).
    pub object: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records before this time.
    pub until: Option<DateTime<Utc>>,
    /// Cursor: records with a sequence number above this (ascending order).
    pub after: Option<u64>,
    /// Cursor: records with a sequence number below this (descending order).
    pub before: Option<u64>,
    /// Newest first.
    pub descending: bool,
    /// Most records to return.
    pub limit: usize,
    /// In a cluster: the node whose chain to read; without it, every node's records merged
    /// in time order, paged with `cursor`.
    pub node: Option<String>,
    /// In a cluster, reading every node's records: where the previous page ended
    /// ([`AuditPage::next_cursor`]).
    pub cursor: Option<String>,
}

/// One page of records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditPage {
    /// The records, in the order asked for.
    pub records: Vec<AuditRecord>,
    /// The cursor for the next page (`after` ascending, `before` descending), if there may be
    /// more.
    pub next: Option<u64>,
    /// Reading every node of a cluster: the `cursor` of the next page, if there may be more.
    pub next_cursor: Option<String>,
}

impl AuditQuery {
    /// Whether a record passes the filters (not the cursors).
    pub fn matches(&self, r: &AuditRecord) -> bool {
        text_matches(&self.principal, &r.principal)
            && text_matches(&self.department, &r.department)
            && text_matches(&self.action, &r.action)
            && text_matches(&self.object, &r.object)
            && self.outcome.is_none_or(|o| o == r.outcome)
            && self.since.is_none_or(|t| r.time >= t)
            && self.until.is_none_or(|t| r.time < t)
    }
}

/// Reads a page of the chain in `dir`, considering records up to `durable_seq`.
pub fn query(dir: &Path, durable_seq: u64, q: &AuditQuery) -> Result<AuditPage, Error> {
    let limit = q.limit.max(1);
    let segments = list_segments(dir)?;
    let mut records = Vec::new();
    let mut scanned_to_end = true;
    if !q.descending {
        let start = q.after.unwrap_or(0) + 1;
        let first_index = segments
            .partition_point(|(first, _)| *first <= start)
            .saturating_sub(1);
        'segments: for (_, path) in &segments[first_index..] {
            let buf = std::fs::read(path)?;
            for frame in frames(&buf) {
                let seq = format::body_seq(frame.body);
                if seq < start {
                    continue;
                }
                if seq > durable_seq {
                    break 'segments;
                }
                let r = decode(&frame, path)?;
                if q.until.is_some_and(|t| r.time >= t) {
                    break 'segments;
                }
                if q.matches(&r) {
                    records.push(r);
                    if records.len() == limit {
                        scanned_to_end = false;
                        break 'segments;
                    }
                }
            }
        }
    } else {
        let end = q
            .before
            .unwrap_or(u64::MAX)
            .min(durable_seq.saturating_add(1));
        'segments: for (first, path) in segments.iter().rev() {
            if *first >= end {
                continue;
            }
            let buf = std::fs::read(path)?;
            let all: Vec<_> = frames(&buf).collect();
            for frame in all.iter().rev() {
                let seq = format::body_seq(frame.body);
                if seq >= end {
                    continue;
                }
                let r = decode(frame, path)?;
                if q.since.is_some_and(|t| r.time < t) {
                    break 'segments;
                }
                if q.matches(&r) {
                    records.push(r);
                    if records.len() == limit {
                        scanned_to_end = false;
                        break 'segments;
                    }
                }
            }
        }
    }
    let next = if scanned_to_end {
        None
    } else {
        records.last().map(|r| r.seq)
    };
    Ok(AuditPage {
        records,
        next,
        next_cursor: None,
    })
}

fn decode(frame: &format::Frame<'_>, path: &Path) -> Result<AuditRecord, Error> {
    format::decode_record(frame).map_err(|e| {
        Error::internal(format!("audit record in {} cannot be read", path.display()))
            .detail(e)
            .hint("run `yunqi audit verify --data DIR`")
    })
}

/// The good frames of a segment buffer, stopping at the first bad one (a torn tail).
fn frames(buf: &[u8]) -> impl Iterator<Item = format::Frame<'_>> {
    let mut offset = format::SEGMENT_HEADER_BYTES;
    std::iter::from_fn(move || {
        if offset >= buf.len() {
            return None;
        }
        let frame = format::read_frame(buf, offset).ok()?;
        offset = frame.end;
        Some(frame)
    })
}
