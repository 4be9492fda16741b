//! Grants: department B may read columns C of dataset X (optionally only rows R), for purpose P,
//! until T. A grant starts as a request from B and is decided by X's steward.

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};

use crate::error::Error;

/// The city's civil time zone (China Standard Time, UTC+8): a grant `--until 2027-01-31` holds
/// until the end of that day here.
pub fn city_offset() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// The first instant after `date` ends in the city's time zone.
pub fn end_of_city_day(date: NaiveDate) -> DateTime<Utc> {
    let next = date.succ_opt().unwrap_or(date);
    next.and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_local_timezone(city_offset())
        .single()
        .expect("a fixed offset has one midnight")
        .with_timezone(&Utc)
}

/// Where a grant stands, as stored. Expiry is not stored: it follows from `expires_at`
/// (see [`Grant::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    /// Requested, not yet decided.
    Pending,
    /// Approved by the owner's steward.
    Approved,
    /// Refused by the owner's steward.
    Refused,
    /// Revoked after approval.
    Revoked,
    /// Replaced by a newer approved grant of the same dataset to the same department.
    Superseded,
}

/// Where a grant stands at a given time: its status, with approved and pending grants past
/// their expiry shown as expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// Requested, not yet decided.
    Pending,
    /// In force: queries of the grantee department use it.
    Active,
    /// Refused.
    Refused,
    /// Revoked.
    Revoked,
    /// Replaced by a newer grant.
    Superseded,
    /// Past its expiry (approved or never decided).
    Expired,
}

impl GrantState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Pending => "pending",
            GrantState::Active => "active",
            GrantState::Refused => "refused",
            GrantState::Revoked => "revoked",
            GrantState::Superseded => "superseded",
            GrantState::Expired => "expired",
        }
    }

    /// Parses a wire name.
    pub fn parse(raw: &str) -> Result<GrantState, Error> {
        Ok(match raw {
            "pending" => GrantState::Pending,
            "active" => GrantState::Active,
            "refused" => GrantState::Refused,
            "revoked" => GrantState::Revoked,
            "superseded" => GrantState::Superseded,
            "expired" => GrantState::Expired,
            other => {
                return Err(Error::invalid(format!("invalid grant state \"{other}\""))
                    .hint("use pending, active, refused, revoked, superseded or expired"));
            }
        })
    }
}

impl std::fmt::Display for GrantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A grant (or a request for one).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// Id, `g_` and 12 hex digits.
    pub id: String,
    /// The dataset, `department.name`.
    pub dataset: String,
    /// The department that owns the dataset (and decides).
    pub owner: String,
    /// The department the grant is for.
    pub grantee: String,
    /// The principal that asked.
    pub requested_by: String,
    /// When.
    pub requested_at: DateTime<Utc>,
    /// Columns the grantee may read, in the dataset's order.
    pub columns: Vec<String>,
    /// Row filter: a SQL predicate over the dataset's columns; only rows passing it are seen.
    #[serde(default)]
    pub rows: Option<String>,
    /// Why the data is needed (required; recorded with every query that uses the grant).
    pub purpose: String,
    /// When the grant stops holding.
    pub expires_at: DateTime<Utc>,
    /// Personal or sensitive columns the grantee may read unmasked.
    #[serde(default)]
    pub unmasked: Vec<String>,
    /// Why unmasked values are needed (required when `unmasked` is not empty).
    #[serde(default)]
    pub unmasked_reason: Option<String>,
    /// Status.
    pub status: GrantStatus,
    /// Who approved or refused it.
    #[serde(default)]
    pub decided_by: Option<String>,
    /// When.
    #[serde(default)]
    pub decided_at: Option<DateTime<Utc>>,
    /// Why it was refused, revoked or superseded.
    #[serde(default)]
    pub reason: Option<String>,
    /// Who revoked it.
    #[serde(default)]
    pub revoked_by: Option<String>,
    /// When it was revoked or superseded.
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Grant {
    /// Where the grant stands at `now`.
    pub fn state(&self, now: DateTime<Utc>) -> GrantState {
        match self.status {
            GrantStatus::Pending | GrantStatus::Approved if now >= self.expires_at => {
                GrantState::Expired
            }
            GrantStatus::Pending => GrantState::Pending,
            GrantStatus::Approved => GrantState::Active,
            GrantStatus::Refused => GrantState::Refused,
            GrantStatus::Revoked => GrantState::Revoked,
            GrantStatus::Superseded => GrantState::Superseded,
        }
    }

    /// Whether queries may use it at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.state(now) == GrantState::Active
    }

    /// Whether `column` is read unmasked.
    pub fn is_unmasked(&self, column: &str) -> bool {
        self.unmasked.iter().any(|c| c == column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_a_date_means_the_end_of_that_day_in_the_city() {
        let d = NaiveDate::from_ymd_opt(2027, 1, 31).unwrap();
        assert_eq!(end_of_city_day(d).to_rfc3339(), "2027-01-31T16:00:00+00:00");
    }

    #[test]
    fn approved_grants_expire() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut g = Grant {
            id: "g_1".into(),
            dataset: "transport.vehicles".into(),
            owner: "transport".into(),
            grantee: "police".into(),
            requested_by: "p".into(),
            requested_at: t0,
            columns: vec!["plate".into()],
            rows: None,
            purpose: "x".into(),
            expires_at: t0 + chrono::Duration::days(1),
            unmasked: vec![],
            unmasked_reason: None,
            status: GrantStatus::Approved,
            decided_by: None,
            decided_at: None,
            reason: None,
            revoked_by: None,
            revoked_at: None,
        };
        assert!(g.is_active(t0));
        assert_eq!(g.state(g.expires_at), GrantState::Expired);
        g.status = GrantStatus::Revoked;
        assert_eq!(g.state(t0), GrantState::Revoked);
    }
}
