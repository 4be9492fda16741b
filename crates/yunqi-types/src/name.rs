//! Validated names of departments, principals and (later) datasets, streams and views.
//!
//! A name is a lowercase SQL identifier: it starts with a letter `a`–`z`, continues with
//! `a`–`z`, `0`–`9` or `_`, and is at most [`NAME_BYTES_MAX`] bytes long, so that it can be used
//! unquoted in SQL (`transport.vehicles`) and in URLs without escaping.

use std::fmt;

use crate::error::Error;

/// The longest name, in bytes (PostgreSQL's identifier limit).
pub const NAME_BYTES_MAX: usize = 63;

/// Words that cannot be names because SQL or yunqi gives them a meaning.
const RESERVED: &[&str] = &[
    "all",
    "and",
    "as",
    "by",
    "from",
    "group",
    "information_schema",
    "join",
    "not",
    "null",
    "or",
    "order",
    "pg_catalog",
    "public",
    "select",
    "system",
    "table",
    "union",
    "where",
    "yunqi",
];

/// A validated lowercase identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// Validates `raw` as the name of an object of `kind` (used in the error message).
    pub fn parse(kind: &str, raw: &str) -> Result<Name, Error> {
        let problem = if raw.is_empty() {
            Some("it is empty".to_string())
        } else if raw.len() > NAME_BYTES_MAX {
            Some(format!(
                "it is {} bytes long, the most is {NAME_BYTES_MAX}",
                raw.len()
            ))
        } else if !raw.as_bytes()[0].is_ascii_lowercase() {
            Some("it must start with a lowercase letter a-z".to_string())
        } else if let Some(c) = raw
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
        {
            Some(format!(
                "it contains {c:?}; only a-z, 0-9 and _ are allowed"
            ))
        } else if RESERVED.contains(&raw) {
            Some("it is a reserved word".to_string())
        } else {
            None
        };
        match problem {
            None => Ok(Name(raw.to_string())),
            Some(why) => {
                let suggestion = suggest_name(raw);
                let mut err = Error::invalid(format!("invalid {kind} name \"{raw}\""))
                    .detail(format!("{why}; names are lowercase identifiers"));
                err = match suggestion {
                    Some(s) if s != raw => err.hint(format!("use a name such as \"{s}\"")),
                    _ => err.hint("use a name like \"transport\" or \"traffic_police\""),
                };
                Err(err)
            }
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A valid name close to `raw`, if one can be made by lowercasing and replacing separators.
fn suggest_name(raw: &str) -> Option<String> {
    let mut out = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if matches!(c, '-' | ' ' | '.' | '_') && !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    let out = out.trim_end_matches('_').to_string();
    if out.is_empty() || !out.as_bytes()[0].is_ascii_lowercase() || out.len() > NAME_BYTES_MAX {
        return None;
    }
    if RESERVED.contains(&out.as_str()) {
        return None;
    }
    Some(out)
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for ok in ["transport", "traffic_police", "a", "d2", &"x".repeat(63)] {
            assert_eq!(Name::parse("department", ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn invalid_names_say_why_and_suggest() {
        let e = Name::parse("department", "Traffic-Police").unwrap_err();
        assert_eq!(e.message, "invalid department name \"Traffic-Police\"");
        assert_eq!(
            e.hint.as_deref(),
            Some("use a name such as \"traffic_police\"")
        );
        for bad in ["", "1abc", "a b", "交通", "select", &"x".repeat(64), "_x"] {
            assert!(Name::parse("department", bad).is_err(), "{bad:?} accepted");
        }
    }
}
