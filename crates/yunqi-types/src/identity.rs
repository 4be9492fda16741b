//! Identities: departments (tenants), principals with their role, tokens, and the national ID
//! number that identifies a citizen.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};

use crate::error::Error;
use crate::name::Name;

/// What a principal is to the platform. The policy (in `yunqi-governance`) decides what each
/// role may do; the roles themselves carry no permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Operates the platform: departments, principals, health. Belongs to no department.
    Admin,
    /// Owns a department's data: publishes datasets and streams, approves sharing requests.
    Steward,
    /// Queries data with SQL.
    Analyst,
    /// Works on citizen services: reviews applications.
    Officer,
    /// A service account (an application or a hospital system).
    Service,
    /// A citizen, identified by national ID number; belongs to no department.
    Citizen,
}

impl Role {
    /// Every role, in a stable order (for help texts and errors).
    pub const ALL: [Role; 6] = [
        Role::Admin,
        Role::Steward,
        Role::Analyst,
        Role::Officer,
        Role::Service,
        Role::Citizen,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Steward => "steward",
            Role::Analyst => "analyst",
            Role::Officer => "officer",
            Role::Service => "service",
            Role::Citizen => "citizen",
        }
    }

    /// Whether principals of this role must belong to a department.
    pub fn needs_department(self) -> bool {
        !matches!(self, Role::Admin | Role::Citizen)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!("invalid role \"{s}\"")).hint(format!(
                    "use one of: {}",
                    Role::ALL.map(Role::as_str).join(", ")
                ))
            })
    }
}

/// A department (委办局): the tenant that owns datasets, streams, services and principals.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Department {
    /// SQL schema name, e.g. `transport`.
    pub name: Name,
    /// Human title, e.g. `交通运输局 Transport Bureau`.
    pub title: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A person, citizen or service account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Principal {
    /// Unique name; the user name over the PostgreSQL wire protocol.
    pub name: Name,
    /// Role.
    pub role: Role,
    /// Department; `None` for admins and citizens.
    pub department: Option<Name>,
    /// For citizens, the national ID number.
    pub id_number: Option<NationalId>,
    /// Display name.
    pub display_name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// What the platform knows of a token. The secret itself is never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    /// Public id, shown in lists and used to revoke (`yunqi token revoke ID`).
    pub id: String,
    /// The principal it authenticates.
    pub principal: Name,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenInfo {
    /// Whether the token authenticates at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }
}

/// A Chinese resident identity card number (GB 11643-1999): 17 digits and a check character
/// (`0`–`9` or `X`) computed with ISO 7064 MOD 11-2. Digits 1–6 are the region code, 7–14 the
/// birth date.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct NationalId(String);

impl NationalId {
    /// The ISO 7064 MOD 11-2 check character of the first 17 digits.
    pub fn check_char(first17: &[u8]) -> char {
        const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
        const CHECK: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];
        let sum: u32 = first17
            .iter()
            .zip(WEIGHTS)
            .map(|(d, w)| u32::from(d - b'0') * w)
            .sum();
        CHECK[(sum % 11) as usize]
    }

    /// Validates an ID number: length, digits, birth date and check character.
    pub fn parse(raw: &str) -> Result<NationalId, Error> {
        let upper = raw.trim().to_ascii_uppercase();
        let bytes = upper.as_bytes();
        let bad = |why: &str| {
            Error::invalid(format!("invalid national ID number \"{raw}\""))
                .detail(why.to_string())
                .hint("a resident ID number has 17 digits and a check character 0-9 or X")
        };
        if bytes.len() != 18 {
            return Err(bad(&format!("it has {} characters, not 18", bytes.len())));
        }
        if !bytes[..17].iter().all(u8::is_ascii_digit) {
            return Err(bad("the first 17 characters must be digits"));
        }
        let birth = &upper[6..14];
        if NaiveDate::parse_from_str(birth, "%Y%m%d").is_err() {
            return Err(bad(&format!(
                "characters 7-14 ({birth}) are not a valid birth date"
            )));
        }
        let expected = Self::check_char(&bytes[..17]);
        if bytes[17] as char != expected {
            return Err(bad(&format!(
                "the check character is {}, the digits give {expected}",
                bytes[17] as char
            )));
        }
        Ok(NationalId(upper))
    }

    /// The number as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NationalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn national_id_check_character() {
        // The standard's published example.
        assert!(NationalId::parse("11010519491231002X").is_ok());
        assert!(NationalId::parse("11010519491231002x").is_ok());
        let e = NationalId::parse("110105194912310021").unwrap_err();
        assert!(e.detail.unwrap().contains("check character"));
        assert!(NationalId::parse("110105194913310021").is_err(), "month 13");
        assert!(NationalId::parse("1101051949123100").is_err(), "short");
    }

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        let e = "root".parse::<Role>().unwrap_err();
        assert!(e.hint.unwrap().contains("steward"));
    }
}
