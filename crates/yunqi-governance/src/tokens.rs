//! Bearer tokens: `yqt_` + a 16-hex-digit public id + `_` + 64 hex digits of secret (256 random
//! bits from the operating system). Only the SHA-256 of the secret is stored; the id finds the
//! token, the hash comparison is constant-time.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use yunqi_store::StoredToken;
use yunqi_types::{Error, Name, TokenInfo};

const PREFIX: &str = "yqt_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A token just created: the only moment its secret is known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NewToken {
    /// Public id.
    pub id: String,
    /// The whole token, to be shown once.
    pub token: String,
    /// Its principal.
    pub principal: Name,
    /// When it expires, if ever.
    pub expires_at: Option<DateTime<Utc>>,
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| {
        Error::internal(format!("the operating system's random source failed: {e}"))
    })?;
    Ok(hex::encode(buf))
}

/// Issues a token for `principal`.
pub fn issue(
    principal: &Name,
    now: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(NewToken, StoredToken), Error> {
    let id = random_hex(ID_HEX / 2)?;
    let secret = random_hex(SECRET_HEX / 2)?;
    let stored = StoredToken {
        info: TokenInfo {
            id: id.clone(),
            principal: principal.clone(),
            created_at: now,
            expires_at,
            revoked_at: None,
        },
        secret_hash: Sha256::digest(secret.as_bytes()).into(),
    };
    Ok((
        NewToken {
            token: format!("{PREFIX}{id}_{secret}"),
            id,
            principal: principal.clone(),
            expires_at,
        },
        stored,
    ))
}

/// Splits a token into its id and the hash of its secret.
pub fn parse(token: &str) -> Result<(String, [u8; 32]), Error> {
    let malformed = || {
        Error::unauthenticated("token is malformed")
            .detail(format!(
                "a yunqi token is \"{PREFIX}\", {ID_HEX} hex digits, \"_\" and {SECRET_HEX} hex digits"
            ))
            .hint("copy the whole token as printed when it was created")
    };
    let rest = token.trim().strip_prefix(PREFIX).ok_or_else(malformed)?;
    let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if !is_hex(id, ID_HEX) || !is_hex(secret, SECRET_HEX) {
        return Err(malformed());
    }
    Ok((id.to_string(), Sha256::digest(secret.as_bytes()).into()))
}

/// Compares two hashes in constant time.
pub fn hash_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_parse_round_trip() {
        let name = Name::parse("principal", "alice").unwrap();
        let (token, stored) = issue(&name, Utc::now(), None).unwrap();
        assert!(token.token.starts_with("yqt_"));
        assert_eq!(token.token.len(), 4 + 16 + 1 + 64);
        let (id, hash) = parse(&token.token).unwrap();
        assert_eq!(id, stored.info.id);
        assert!(hash_eq(&hash, &stored.secret_hash));
        let (other, _) = issue(&name, Utc::now(), None).unwrap();
        assert_ne!(other.token, token.token, "tokens are random");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "yqt_",
            "abc",
            "yqt_0123456789abcdef_xyz",
            &format!("yqt_0123456789ABCDEF_{}", "a".repeat(64)),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.message, "token is malformed");
        }
    }
}
