//! The audit event: what a caller hands to the audit chain. The chain (crate `yunqi-audit`)
//! adds the sequence number, the time and the hashes.

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Allowed and done.
    Ok,
    /// Refused by authentication or by the policy.
    Denied,
    /// Allowed but failed (invalid input, conflict, internal error).
    Failed,
}

impl Outcome {
    /// Stable one-byte encoding used by persisted formats.
    pub fn to_byte(self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Denied => 1,
            Outcome::Failed => 2,
        }
    }
    /// Decodes [`Outcome::to_byte`].
    pub fn from_byte(b: u8) -> Option<Outcome> {
        match b {
            0 => Some(Outcome::Ok),
            1 => Some(Outcome::Denied),
            2 => Some(Outcome::Failed),
            _ => None,
        }
    }
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One audited action, as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEvent {
    /// Who acted: a principal name, or empty when no principal could be established.
    pub principal: String,
    /// The acting principal's department, empty for none.
    pub department: String,
    /// What was done, as `kind.verb`: `department.create`, `token.revoke`, `auth.login`.
    pub action: String,
    /// On what: `department:transport`, `principal:alice`, `token:0a1b…`.
    pub object: String,
    /// How it ended.
    pub outcome: Option<Outcome>,
    /// Why the data was accessed (grants carry a purpose); empty when none applies.
    pub purpose: String,
    /// A short explanation, e.g. the denial reason.
    pub detail: String,
    /// The id of the request that caused it.
    pub request_id: String,
}
