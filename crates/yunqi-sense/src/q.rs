//! NGSI-LD's query language (`q`), over an entity's row: `intensity>100;district=="西湖"`,
//! `(a<3|b==true);c~="^urn:"`, `speed==10..20`, `district=="西湖","上城"`, a bare attribute
//! for "is set". `;` is AND and binds tighter than `|` (OR); parentheses group. Comparisons are
//! `== != > >= < <=`, `~=` and `!~=` (regular expression). Values are numbers, quoted text,
//! `true`/`false`, and DateTimes or dates (quoted or not); lists (`a,b`) and ranges (`a..b`)
//! go with `==` and `!=`. A comparison of values of different types is false; `!=` is false on
//! an attribute that is not set.

use regex::Regex;
use yunqi_datasets::ColumnType;

use crate::ingest::{parse_date, parse_timestamp_us};
use crate::ngsi::{EntitySchema, Problem, Row, Val};

/// Longest `q` accepted.
pub const Q_BYTES_MAX: usize = 4096;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Match,
    NoMatch,
}

/// A literal, converted to the column's type at parse time.
#[derive(Debug, Clone)]
enum Lit {
    One(Val),
    List(Vec<Val>),
    Range(Val, Val),
    Pattern(Regex),
}

/// A parsed `q`.
#[derive(Debug, Clone)]
pub enum Query {
    /// All of.
    And(Vec<Query>),
    /// Any of.
    Or(Vec<Query>),
    /// The attribute is set.
    Exists(usize),
    /// A comparison.
    Cmp(usize, OpLit),
}

/// An operator with its value.
#[derive(Debug, Clone)]
pub struct OpLit {
    op: Op,
    lit: Lit,
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
    schema: &'a EntitySchema,
}

fn bad(detail: impl Into<String>) -> Problem {
    Problem::bad("invalid q", detail)
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        // Byte scanning stops at ASCII delimiters, so `i` is on a character boundary
        // whenever the rest is shown.
        self.s.get(self.i..).unwrap_or("")
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn or(&mut self) -> Result<Query, Problem> {
        let mut terms = vec![self.and()?];
        while self.peek() == Some(b'|') {
            self.i += 1;
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one")
        } else {
            Query::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Query, Problem> {
        let mut terms = vec![self.term()?];
        while self.peek() == Some(b';') {
            self.i += 1;
            terms.push(self.term()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one")
        } else {
            Query::And(terms)
        })
    }

    fn term(&mut self) -> Result<Query, Problem> {
        if self.peek() == Some(b'(') {
            self.i += 1;
            let q = self.or()?;
            if self.peek() != Some(b')') {
                return Err(bad(format!("expected ')' at position {} of q", self.i + 1)));
            }
            self.i += 1;
            return Ok(q);
        }
        let start = self.i;
        while let Some(b) = self.peek() {
            if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 {
                self.i += 1;
            } else {
                break;
            }
        }
        let name = &self.s[start..self.i];
        if name.is_empty() {
            return Err(bad(format!(
                "expected an attribute name at position {} of q, found \"{}\"",
                start + 1,
                self.rest().chars().take(16).collect::<String>()
            )));
        }
        if matches!(self.peek(), Some(b'.' | b'[')) {
            return Err(bad(format!(
                "\"{}\": sub-attribute and compound-value paths are not supported; \
                 yunqi records flat attributes",
                &self.s[start..]
                    .split([';', '|', ')', '=', '<', '>', '!', '~'])
                    .next()
                    .unwrap_or(name)
            )));
        }
        let col = self.schema.column_of(name).ok_or_else(|| {
            bad(format!(
                "q names attribute \"{name}\", which stream {} does not record",
                self.schema.stream.sql_name()
            ))
        })?;
        let op = match self.rest().as_bytes() {
            [b'=', b'=', ..] => (Op::Eq, 2),
            [b'!', b'=', ..] => (Op::Ne, 2),
            [b'>', b'=', ..] => (Op::Ge, 2),
            [b'<', b'=', ..] => (Op::Le, 2),
            [b'>', ..] => (Op::Gt, 1),
            [b'<', ..] => (Op::Lt, 1),
            [b'~', b'=', ..] => (Op::Match, 2),
            [b'!', b'~', b'=', ..] => (Op::NoMatch, 3),
            [] | [b';' | b'|' | b')', ..] => return Ok(Query::Exists(col)),
            _ => {
                return Err(bad(format!(
                    "unknown operator at position {} of q (use == != > >= < <= ~= !~=)",
                    self.i + 1
                )));
            }
        };
        self.i += op.1;
        let op = op.0;
        let lit = self.literal(col, op)?;
        Ok(Query::Cmp(col, OpLit { op, lit }))
    }

    /// One value: quoted text (with `\"` escapes) or an unquoted run up to `; | ) , ..`.
    fn value_text(&mut self) -> Result<(String, bool), Problem> {
        if self.peek() == Some(b'"') {
            self.i += 1;
            let mut out = String::new();
            let mut chars = self.rest().char_indices();
            loop {
                match chars.next() {
                    None => return Err(bad("unterminated quoted value in q")),
                    Some((k, '"')) => {
                        self.i += k + 1;
                        return Ok((out, true));
                    }
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => out.push(c),
                        None => return Err(bad("unterminated quoted value in q")),
                    },
                    Some((_, c)) => out.push(c),
                }
            }
        }
        let start = self.i;
        while let Some(b) = self.peek() {
            if matches!(b, b';' | b'|' | b')' | b',')
                || self.s.as_bytes()[self.i..].starts_with(b"..")
            {
                break;
            }
            self.i += 1;
        }
        let raw = &self.s[start..self.i];
        if raw.is_empty() {
            return Err(bad(format!(
                "expected a value at position {} of q",
                start + 1
            )));
        }
        Ok((raw.to_string(), false))
    }

    fn literal(&mut self, col: usize, op: Op) -> Result<Lit, Problem> {
        let c = &self.schema.cols[col];
        let (first, quoted) = self.value_text()?;
        if matches!(op, Op::Match | Op::NoMatch) {
            let re = Regex::new(&first).map_err(|e| {
                bad(format!(
                    "{}: {first} is not a regular expression: {e}",
                    c.attr
                ))
            })?;
            return Ok(Lit::Pattern(re));
        }
        let first = typed(c.column.column_type, &c.attr, &first, quoted)?;
        if self.s.as_bytes()[self.i..].starts_with(b"..") {
            self.i += 2;
            let (hi, q) = self.value_text()?;
            let hi = typed(c.column.column_type, &c.attr, &hi, q)?;
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(bad("a range (a..b) goes with == or !="));
            }
            return Ok(Lit::Range(first, hi));
        }
        if self.peek() == Some(b',') {
            let mut list = vec![first];
            while self.peek() == Some(b',') {
                self.i += 1;
                let (v, q) = self.value_text()?;
                list.push(typed(c.column.column_type, &c.attr, &v, q)?);
            }
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(bad("a list (a,b) goes with == or !="));
            }
            return Ok(Lit::List(list));
        }
        Ok(Lit::One(first))
    }
}

/// A literal as a value of the column's type.
fn typed(t: ColumnType, attr: &str, raw: &str, quoted: bool) -> Result<Val, Problem> {
    let wrong = |what: &str| bad(format!("{attr} is {what}; \"{raw}\" is not"));
    Ok(match t {
        ColumnType::Text if quoted => Val::Text(raw.into()),
        ColumnType::Text => {
            return Err(bad(format!("{attr} is text: quote the value (\"{raw}\")")));
        }
        ColumnType::Int => match raw.parse::<i64>() {
            Ok(i) if !quoted => Val::Int(i),
            _ => match raw.parse::<f64>() {
                Ok(f) if !quoted => Val::Float(f),
                _ => return Err(wrong("a number")),
            },
        },
        ColumnType::Float => match raw.parse::<f64>() {
            Ok(f) if !quoted => Val::Float(f),
            _ => return Err(wrong("a number")),
        },
        ColumnType::Bool => match raw {
            "true" if !quoted => Val::Bool(true),
            "false" if !quoted => Val::Bool(false),
            _ => return Err(wrong("true or false")),
        },
        ColumnType::Timestamp => Val::Ts(
            parse_timestamp_us(raw).ok_or_else(|| wrong("a DateTime (2026-11-26T08:00:00Z)"))?,
        ),
        ColumnType::Date => Val::Date(parse_date(raw).ok_or_else(|| wrong("a date (YYYY-MM-DD)"))?),
    })
}

/// Parses `q` for entities of `schema`.
pub fn parse(schema: &EntitySchema, q: &str) -> Result<Query, Problem> {
    if q.len() > Q_BYTES_MAX {
        return Err(bad(format!("q is longer than {Q_BYTES_MAX} bytes")));
    }
    let mut p = Parser { s: q, i: 0, schema };
    let query = p.or()?;
    if p.i != q.len() {
        return Err(bad(format!(
            "unexpected \"{}\" at position {} of q",
            p.rest().chars().take(16).collect::<String>(),
            p.i + 1
        )));
    }
    Ok(query)
}

fn cmp(a: &Val, b: &Val) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::Int(x), Val::Float(y)) => (*x as f64).partial_cmp(y),
        (Val::Float(x), Val::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Val::Float(x), Val::Float(y)) => x.partial_cmp(y),
        (Val::Text(x), Val::Text(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Date(x), Val::Date(y)) => Some(x.cmp(y)),
        (Val::Ts(x), Val::Ts(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Query {
    /// Whether an entity matches.
    pub fn matches(&self, row: &Row) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Query::And(qs) => qs.iter().all(|q| q.matches(row)),
            Query::Or(qs) => qs.iter().any(|q| q.matches(row)),
            Query::Exists(c) => row[*c] != Val::Null,
            Query::Cmp(c, OpLit { op, lit }) => {
                let v = &row[*c];
                if *v == Val::Null {
                    return false;
                }
                let eq = |x: &Val| cmp(v, x) == Some(Equal);
                let hit = match lit {
                    Lit::Pattern(re) => {
                        let Val::Text(s) = v else { return false };
                        return re.is_match(s) == (*op == Op::Match);
                    }
                    Lit::One(x) => match op {
                        Op::Eq | Op::Ne => eq(x),
                        Op::Gt => return cmp(v, x) == Some(Greater),
                        Op::Ge => return matches!(cmp(v, x), Some(Greater | Equal)),
                        Op::Lt => return cmp(v, x) == Some(Less),
                        Op::Le => return matches!(cmp(v, x), Some(Less | Equal)),
                        Op::Match | Op::NoMatch => unreachable!("patterns are Lit::Pattern"),
                    },
                    Lit::List(xs) => xs.iter().any(eq),
                    Lit::Range(lo, hi) => {
                        matches!(cmp(v, lo), Some(Greater | Equal))
                            && matches!(cmp(v, hi), Some(Less | Equal))
                    }
                };
                hit == (*op == Op::Eq)
            }
        }
    }

    /// The columns it reads (for checking a grant's columns).
    pub fn columns(&self, out: &mut Vec<usize>) {
        match self {
            Query::And(qs) | Query::Or(qs) => qs.iter().for_each(|q| q.columns(out)),
            Query::Exists(c) | Query::Cmp(c, _) => out.push(*c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ngsi::{merge, parse_entity};

    fn schema() -> EntitySchema {
        let m = crate::plan::parse_create_stream(
            "CREATE STREAM traffic.flow (id TEXT, date_observed TIMESTAMP, intensity INT, \
             speed DOUBLE, district TEXT, congested BOOLEAN, day DATE) \
             WITH (event_time = 'date_observed', ngsi_type = 'TrafficFlowObserved')",
            "steward",
            chrono::Utc::now(),
        )
        .unwrap();
        EntitySchema::new(&m).unwrap()
    }

    fn row(s: &EntitySchema, v: serde_json::Value) -> Row {
        merge(s, None, &parse_entity(s, &v, None).unwrap(), false, 0)
    }

    #[test]
    fn evaluates() {
        let s = schema();
        let r = row(
            &s,
            serde_json::json!({"id": "urn:x:1", "intensity": 120, "speed": 41.5,
                "district": "西湖", "congested": true, "day": "2026-11-26",
                "dateObserved": "2026-11-26T08:00:00Z"}),
        );
        let cases = [
            ("intensity>100", true),
            ("intensity>120", false),
            ("intensity>=120", true),
            ("intensity<=119.5", false),
            ("speed<41.6;speed>41.4", true),
            ("district==\"西湖\"", true),
            ("district!=\"西湖\"", false),
            ("district==\"上城\",\"西湖\"", true),
            ("district!=\"上城\",\"拱墅\"", true),
            ("intensity==100..200", true),
            ("intensity==121..200", false),
            ("intensity!=121..200", true),
            ("congested==true", true),
            ("congested==false|intensity==120", true),
            ("congested==false;intensity==120", false),
            ("(congested==false|intensity==120);speed>40", true),
            ("congested==false|intensity==120;speed>50", false),
            ("district~=\"^西\"", true),
            ("district!~=\"^西\"", false),
            ("day==2026-11-26", true),
            ("dateObserved>2026-11-26T07:59:59Z", true),
            ("dateObserved<\"2026-11-26T07:59:59Z\"", false),
            ("speed", true),
            ("dayOfWeek", false),
        ];
        for (q, want) in cases {
            match parse(&s, q) {
                Ok(query) => assert_eq!(query.matches(&r), want, "{q}"),
                Err(e) if q == "dayOfWeek" => assert!(e.detail.contains("does not record")),
                Err(e) => panic!("{q}: {e:?}"),
            }
        }
        let unset = row(&s, serde_json::json!({"id": "urn:x:2"}));
        assert!(!parse(&s, "intensity!=5").unwrap().matches(&unset));
        assert!(!parse(&s, "intensity").unwrap().matches(&unset));
    }

    #[test]
    fn refuses_with_reasons() {
        let s = schema();
        for (q, says) in [
            ("intensity>", "expected a value"),
            ("(intensity>1", "expected ')'"),
            ("district==西湖", "quote the value"),
            ("intensity==\"many\"", "a number"),
            ("intensity>1..5", "range"),
            ("district.name==\"x\"", "sub-attribute"),
            ("intensity=1", "unknown operator"),
            ("district~=\"(\"", "regular expression"),
            ("intensity>1)", "unexpected"),
            ("", "attribute name"),
        ] {
            let e = parse(&s, q).unwrap_err();
            assert!(e.detail.contains(says), "{q}: {}", e.detail);
        }
    }
}
