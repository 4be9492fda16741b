//! The rule language of service definitions: small, typed, explainable expressions over an
//! application's inputs, its lookups, its quotas and live view values.
//!
//! ```text
//! starts_with(plate, "浙A")                      vehicle.found and vehicle.kind == "car"
//! days(today(), date) <= 60                      quota.monthly.left > 0
//! not is_rest_day(date)                          zone.load < 0.8 or reason != ""
//! district in ["西湖区", "上城区"]                amount <= credit.line - credit.drawn
//! ```
//!
//! Values are null, booleans, integers, numbers, text, dates and lists. `and`/`or` short-circuit;
//! comparing with null is null, and a rule whose condition is null is treated as not met (its
//! reason says which value was missing). Names are checked when a definition is applied, so a
//! typo is an error naming the line, not a surprise at the first application.

use std::fmt;

use chrono::{Datelike, Duration, NaiveDate};

/// A value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Missing.
    Null,
    /// true / false.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number.
    Num(f64),
    /// Text.
    Text(String),
    /// A calendar date.
    Date(NaiveDate),
    /// A list.
    List(Vec<Value>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Num(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "\"{s}\""),
            Value::Date(d) => write!(f, "{d}"),
            Value::List(v) => {
                write!(f, "[")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{x}")?;
                }
                write!(f, "]")
            }
        }
    }
}

/// What an expression reads: names resolved by the service (inputs, lookups, quotas, views).
pub trait Env {
    /// The value of a dotted name (`plate`, `vehicle.kind`, `quota.monthly.left`); `None` if
    /// the name does not exist (a definition error), `Some(Value::Null)` if it has no value.
    fn get(&self, path: &[&str]) -> Option<Value>;
    /// Today, in the city's time zone.
    fn today(&self) -> NaiveDate;
    /// Whether a date is a rest day of the city's calendar.
    fn is_rest_day(&self, date: NaiveDate) -> bool;
}

/// A binary operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `or`
    Or,
    /// `and`
    And,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `in` (a list)
    In,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal.
    Lit(Value),
    /// A dotted name.
    Name(Vec<String>),
    /// `not e`.
    Not(Box<Expr>),
    /// `-e`.
    Neg(Box<Expr>),
    /// A binary operation.
    Bin(Box<Expr>, Op, Box<Expr>),
    /// A function call.
    Call(String, Vec<Expr>),
    /// `[a, b]`.
    List(Vec<Expr>),
}

/// A parse or evaluation problem, with the byte position in the expression when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// What.
    pub message: String,
    /// Where (byte offset), if it is about one place.
    pub at: Option<usize>,
}

fn err<T>(message: impl Into<String>, at: usize) -> Result<T, RuleError> {
    Err(RuleError {
        message: message.into(),
        at: Some(at),
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Str(String),
    Ident(String),
    Sym(&'static str),
    End,
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, RuleError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Num(src[start..i].replace('_', "")), start));
            continue;
        }
        if c == b'"' || c == b'\'' {
            i += 1;
            let mut s = String::new();
            loop {
                let Some(ch) = src[i..].chars().next() else {
                    return err("unterminated text", start);
                };
                i += ch.len_utf8();
                if ch as u32 == c as u32 {
                    break;
                }
                if ch == '\\' {
                    let Some(e) = src[i..].chars().next() else {
                        return err("unterminated text", start);
                    };
                    i += e.len_utf8();
                    s.push(e);
                } else {
                    s.push(ch);
                }
            }
            out.push((Tok::Str(s), start));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(src[start..i].to_string()), start));
            continue;
        }
        let two = src.get(i..i + 2).unwrap_or("");
        let sym: &'static str = match two {
            "==" => "==",
            "!=" => "!=",
            "<=" => "<=",
            ">=" => ">=",
            "&&" | "||" => {
                return err(format!("use `and` / `or`, not `{two}`"), start);
            }
            _ => match c {
                b'<' => "<",
                b'>' => ">",
                b'+' => "+",
                b'-' => "-",
                b'*' => "*",
                b'/' => "/",
                b'(' => "(",
                b')' => ")",
                b'[' => "[",
                b']' => "]",
                b',' => ",",
                b'.' => ".",
                b'=' => return err("use `==` to compare", start),
                _ => {
                    let ch = src[i..].chars().next().unwrap_or('?');
                    return err(format!("unexpected character '{ch}'"), start);
                }
            },
        };
        i += sym.len();
        out.push((Tok::Sym(sym), start));
    }
    out.push((Tok::End, src.len()));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    i: usize,
}

/// Functions and their arities.
const FUNCTIONS: &[(&str, usize)] = &[
    ("starts_with", 2),
    ("ends_with", 2),
    ("contains", 2),
    ("len", 1),
    ("today", 0),
    ("days", 2),
    ("year", 1),
    ("month", 1),
    ("weekday", 1),
    ("is_rest_day", 1),
    ("exists", 1),
    ("coalesce", 2),
];

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.i].0
    }
    fn at(&self) -> usize {
        self.toks[self.i].1
    }
    fn sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Tok::Sym(x) if *x == s) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Tok::Ident(x) if x == w) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.and()?;
        while self.word("or") {
            e = Expr::Bin(Box::new(e), Op::Or, Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.not()?;
        while self.word("and") {
            e = Expr::Bin(Box::new(e), Op::And, Box::new(self.not()?));
        }
        Ok(e)
    }
    fn not(&mut self) -> Result<Expr, RuleError> {
        if self.word("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, RuleError> {
        let l = self.add()?;
        let op = match self.peek() {
            Tok::Sym("==") => Op::Eq,
            Tok::Sym("!=") => Op::Ne,
            Tok::Sym("<") => Op::Lt,
            Tok::Sym("<=") => Op::Le,
            Tok::Sym(">") => Op::Gt,
            Tok::Sym(">=") => Op::Ge,
            Tok::Ident(w) if w == "in" => Op::In,
            _ => return Ok(l),
        };
        self.i += 1;
        Ok(Expr::Bin(Box::new(l), op, Box::new(self.add()?)))
    }
    fn add(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.mul()?;
        loop {
            let op = if self.sym("+") {
                Op::Add
            } else if self.sym("-") {
                Op::Sub
            } else {
                return Ok(e);
            };
            e = Expr::Bin(Box::new(e), op, Box::new(self.mul()?));
        }
    }
    fn mul(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.unary()?;
        loop {
            let op = if self.sym("*") {
                Op::Mul
            } else if self.sym("/") {
                Op::Div
            } else {
                return Ok(e);
            };
            e = Expr::Bin(Box::new(e), op, Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Expr, RuleError> {
        if self.sym("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        self.primary()
    }
    fn primary(&mut self) -> Result<Expr, RuleError> {
        let at = self.at();
        let tok = self.peek().clone();
        self.i += 1;
        match tok {
            Tok::Num(n) => {
                if let Ok(i) = n.parse::<i64>() {
                    Ok(Expr::Lit(Value::Int(i)))
                } else if let Ok(x) = n.parse::<f64>() {
                    Ok(Expr::Lit(Value::Num(x)))
                } else {
                    err(format!("\"{n}\" is not a number"), at)
                }
            }
            Tok::Str(s) => Ok(Expr::Lit(Value::Text(s))),
            Tok::Sym("(") => {
                let e = self.or()?;
                if !self.sym(")") {
                    return err("expected ')'", self.at());
                }
                Ok(e)
            }
            Tok::Sym("[") => {
                let mut items = Vec::new();
                if !self.sym("]") {
                    loop {
                        items.push(self.or()?);
                        if self.sym("]") {
                            break;
                        }
                        if !self.sym(",") {
                            return err("expected ',' or ']'", self.at());
                        }
                    }
                }
                Ok(Expr::List(items))
            }
            Tok::Ident(w) => match w.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                "and" | "or" | "not" | "in" => err(format!("expected a value, found `{w}`"), at),
                _ if self.sym("(") => {
                    let Some(&(_, arity)) = FUNCTIONS.iter().find(|(f, _)| *f == w) else {
                        let names: Vec<&str> = FUNCTIONS.iter().map(|f| f.0).collect();
                        return err(
                            format!("unknown function {w}(); functions: {}", names.join(", ")),
                            at,
                        );
                    };
                    let mut args = Vec::new();
                    if !self.sym(")") {
                        loop {
                            args.push(self.or()?);
                            if self.sym(")") {
                                break;
                            }
                            if !self.sym(",") {
                                return err("expected ',' or ')'", self.at());
                            }
                        }
                    }
                    if args.len() != arity {
                        return err(
                            format!("{w}() takes {arity} argument(s), not {}", args.len()),
                            at,
                        );
                    }
                    Ok(Expr::Call(w, args))
                }
                _ => {
                    let mut path = vec![w];
                    while self.sym(".") {
                        match self.peek().clone() {
                            Tok::Ident(n) => {
                                self.i += 1;
                                path.push(n);
                            }
                            _ => return err("expected a name after '.'", self.at()),
                        }
                    }
                    Ok(Expr::Name(path))
                }
            },
            Tok::End => err("the expression ends too early", at),
            Tok::Sym(s) => err(format!("unexpected '{s}'"), at),
        }
    }
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Expr, RuleError> {
    let mut p = Parser {
        toks: lex(src)?,
        i: 0,
    };
    let e = p.or()?;
    if p.peek() != &Tok::End {
        return err("unexpected text after the expression", p.at());
    }
    Ok(e)
}

impl Expr {
    /// Every dotted name the expression reads.
    pub fn names(&self, out: &mut Vec<Vec<String>>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Name(p) => out.push(p.clone()),
            Expr::Not(e) | Expr::Neg(e) => e.names(out),
            Expr::Bin(a, _, b) => {
                a.names(out);
                b.names(out);
            }
            Expr::Call(_, args) | Expr::List(args) => args.iter().for_each(|a| a.names(out)),
        }
    }

    /// Evaluates against `env`.
    pub fn eval(&self, env: &dyn Env) -> Result<Value, RuleError> {
        let fail = |m: String| {
            Err(RuleError {
                message: m,
                at: None,
            })
        };
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Name(p) => {
                let parts: Vec<&str> = p.iter().map(String::as_str).collect();
                match env.get(&parts) {
                    Some(v) => v,
                    None => return fail(format!("unknown name {}", p.join("."))),
                }
            }
            Expr::Not(e) => match e.eval(env)? {
                Value::Bool(b) => Value::Bool(!b),
                Value::Null => Value::Null,
                v => return fail(format!("`not` needs true or false, got {v}")),
            },
            Expr::Neg(e) => match e.eval(env)? {
                Value::Int(i) => Value::Int(-i),
                Value::Num(x) => Value::Num(-x),
                Value::Null => Value::Null,
                v => return fail(format!("cannot negate {v}")),
            },
            Expr::Bin(a, Op::And, b) => match a.eval(env)? {
                Value::Bool(false) => Value::Bool(false),
                l => match (l, b.eval(env)?) {
                    (_, Value::Bool(false)) => Value::Bool(false),
                    (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                    (Value::Null | Value::Bool(true), Value::Null | Value::Bool(true)) => {
                        Value::Null
                    }
                    (l, r) => return fail(format!("`and` needs true or false, got {l} and {r}")),
                },
            },
            Expr::Bin(a, Op::Or, b) => match a.eval(env)? {
                Value::Bool(true) => Value::Bool(true),
                l => match (l, b.eval(env)?) {
                    (_, Value::Bool(true)) => Value::Bool(true),
                    (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                    (Value::Null | Value::Bool(false), Value::Null | Value::Bool(false)) => {
                        Value::Null
                    }
                    (l, r) => return fail(format!("`or` needs true or false, got {l} and {r}")),
                },
            },
            Expr::Bin(a, op, b) => binary(op, a.eval(env)?, b.eval(env)?).or_else(fail)?,
            Expr::List(items) => Value::List(
                items
                    .iter()
                    .map(|e| e.eval(env))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Call(f, args) => {
                let v: Vec<Value> = args.iter().map(|e| e.eval(env)).collect::<Result<_, _>>()?;
                call(f, &v, env).or_else(fail)?
            }
        })
    }
}

fn as_date(v: &Value) -> Option<NaiveDate> {
    match v {
        Value::Date(d) => Some(*d),
        Value::Text(s) => s.parse().ok(),
        _ => None,
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::Num(y)) => (*x as f64).partial_cmp(y),
        (Value::Num(x), Value::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Value::Num(x), Value::Num(y)) => x.partial_cmp(y),
        (Value::Text(x), Value::Text(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Date(_), _) | (_, Value::Date(_)) => as_date(a)?.partial_cmp(&as_date(b)?),
        _ => None,
    }
}

fn binary(op: &Op, a: Value, b: Value) -> Result<Value, String> {
    use std::cmp::Ordering::*;
    if op == &Op::In {
        return match b {
            Value::List(items) if a == Value::Null => Ok(if items.is_empty() {
                Value::Bool(false)
            } else {
                Value::Null
            }),
            Value::List(items) => Ok(Value::Bool(
                items.iter().any(|x| compare(&a, x) == Some(Equal)),
            )),
            other => Err(format!("`in` needs a list on its right, got {other}")),
        };
    }
    if a == Value::Null || b == Value::Null {
        return Ok(Value::Null);
    }
    let ord = compare(&a, &b);
    let cmp_result = |want: &[std::cmp::Ordering]| match ord {
        Some(o) => Ok(Value::Bool(want.contains(&o))),
        None => Err(format!("cannot compare {a} with {b}")),
    };
    match op {
        Op::Eq => Ok(Value::Bool(ord == Some(Equal))),
        Op::Ne => Ok(Value::Bool(ord != Some(Equal))),
        Op::Lt => cmp_result(&[Less]),
        Op::Le => cmp_result(&[Less, Equal]),
        Op::Gt => cmp_result(&[Greater]),
        Op::Ge => cmp_result(&[Greater, Equal]),
        Op::Add | Op::Sub | Op::Mul | Op::Div => arith(op, &a, &b),
        Op::And | Op::Or | Op::In => unreachable!("handled by the caller"),
    }
}

fn arith(op: &Op, a: &Value, b: &Value) -> Result<Value, String> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => match op {
            Op::Add => x.checked_add(*y),
            Op::Sub => x.checked_sub(*y),
            Op::Mul => x.checked_mul(*y),
            _ => {
                return if *y == 0 {
                    Err("division by zero".into())
                } else {
                    Ok(Value::Num(*x as f64 / *y as f64))
                };
            }
        }
        .map(Value::Int)
        .ok_or_else(|| format!("{a} and {b}: integer overflow")),
        (Value::Int(_) | Value::Num(_), Value::Int(_) | Value::Num(_)) => {
            let f = |v: &Value| match v {
                Value::Int(i) => *i as f64,
                Value::Num(x) => *x,
                _ => 0.0,
            };
            let (x, y) = (f(a), f(b));
            match op {
                Op::Add => Ok(Value::Num(x + y)),
                Op::Sub => Ok(Value::Num(x - y)),
                Op::Mul => Ok(Value::Num(x * y)),
                _ if y == 0.0 => Err("division by zero".into()),
                _ => Ok(Value::Num(x / y)),
            }
        }
        (Value::Date(d), Value::Int(n)) if matches!(op, Op::Add | Op::Sub) => {
            let n = if *op == Op::Sub { -n } else { *n };
            d.checked_add_signed(Duration::days(n))
                .map(Value::Date)
                .ok_or_else(|| "date out of range".into())
        }
        (Value::Text(x), Value::Text(y)) if *op == Op::Add => Ok(Value::Text(format!("{x}{y}"))),
        _ => Err(format!("cannot compute {a} {op:?} {b}")),
    }
}

fn call(f: &str, v: &[Value], env: &dyn Env) -> Result<Value, String> {
    let text = |i: usize| match &v[i] {
        Value::Text(s) => Ok(Some(s.as_str())),
        Value::Null => Ok(None),
        other => Err(format!("{f}() needs text, got {other}")),
    };
    let date = |i: usize| match &v[i] {
        Value::Null => Ok(None),
        other => as_date(other)
            .map(Some)
            .ok_or_else(|| format!("{f}() needs a date, got {other}")),
    };
    Ok(match f {
        "starts_with" | "ends_with" | "contains" => match (text(0)?, text(1)?) {
            (Some(s), Some(p)) => Value::Bool(match f {
                "starts_with" => s.starts_with(p),
                "ends_with" => s.ends_with(p),
                _ => s.contains(p),
            }),
            _ => Value::Null,
        },
        "len" => match &v[0] {
            Value::List(l) => Value::Int(l.len() as i64),
            _ => text(0)?.map_or(Value::Null, |s| Value::Int(s.chars().count() as i64)),
        },
        "today" => Value::Date(env.today()),
        "days" => match (date(0)?, date(1)?) {
            (Some(a), Some(b)) => Value::Int((b - a).num_days()),
            _ => Value::Null,
        },
        "year" => date(0)?.map_or(Value::Null, |d| Value::Int(d.year() as i64)),
        "month" => date(0)?.map_or(Value::Null, |d| Value::Int(d.month() as i64)),
        "weekday" => date(0)?.map_or(Value::Null, |d| {
            Value::Int(d.weekday().number_from_monday() as i64)
        }),
        "is_rest_day" => date(0)?.map_or(Value::Null, |d| Value::Bool(env.is_rest_day(d))),
        "exists" => Value::Bool(v[0] != Value::Null),
        "coalesce" => {
            if v[0] == Value::Null {
                v[1].clone()
            } else {
                v[0].clone()
            }
        }
        other => return Err(format!("unknown function {other}()")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E;
    impl Env for E {
        fn get(&self, path: &[&str]) -> Option<Value> {
            Some(match path {
                ["plate"] => Value::Text("沪B12345".into()),
                ["date"] => Value::Date("2026-11-28".parse().unwrap()),
                ["vehicle", "found"] => Value::Bool(true),
                ["vehicle", "kind"] => Value::Text("car".into()),
                ["vehicle", "owner"] => Value::Null,
                ["quota", "monthly", "left"] => Value::Int(2),
                ["zone", "load"] => Value::Num(0.75),
                _ => return None,
            })
        }
        fn today(&self) -> NaiveDate {
            "2026-11-26".parse().unwrap()
        }
        fn is_rest_day(&self, d: NaiveDate) -> bool {
            d.weekday().number_from_monday() >= 6
        }
    }

    fn ev(src: &str) -> Value {
        parse(src)
            .unwrap_or_else(|e| panic!("{src}: {e:?}"))
            .eval(&E)
            .unwrap_or_else(|e| panic!("{src}: {e:?}"))
    }

    #[test]
    fn evaluates() {
        let t = Value::Bool(true);
        let f = Value::Bool(false);
        for (src, want) in [
            ("starts_with(plate, \"浙A\")", f.clone()),
            ("not starts_with(plate, '浙A')", t.clone()),
            ("vehicle.found and vehicle.kind == \"car\"", t.clone()),
            (
                "days(today(), date) <= 60 and days(today(), date) >= 0",
                t.clone(),
            ),
            ("is_rest_day(date)", t.clone()),
            ("weekday(date)", Value::Int(6)),
            ("quota.monthly.left > 0", t.clone()),
            ("zone.load < 0.8 or false", t.clone()),
            ("1 + 2 * 3", Value::Int(7)),
            ("(1 + 2) * 3 - 10 / 4", Value::Num(6.5)),
            ("-quota.monthly.left", Value::Int(-2)),
            ("vehicle.kind in [\"car\", \"van\"]", t.clone()),
            ("len(plate)", Value::Int(7)),
            ("date + 3 == \"2026-12-01\"", t.clone()),
            ("year(date) * 100 + month(date)", Value::Int(202611)),
            ("vehicle.owner == \"x\"", Value::Null),
            ("vehicle.owner == \"x\" or true", t.clone()),
            ("vehicle.owner == \"x\" and false", f.clone()),
            ("exists(vehicle.owner)", f.clone()),
            (
                "coalesce(vehicle.owner, 'none')",
                Value::Text("none".into()),
            ),
        ] {
            assert_eq!(ev(src), want, "{src}");
        }
        // Names are collected for checking against the definition.
        let mut names = Vec::new();
        parse("vehicle.found and quota.monthly.left > 0")
            .unwrap()
            .names(&mut names);
        assert_eq!(
            names,
            vec![vec!["vehicle", "found"], vec!["quota", "monthly", "left"]]
        );
    }

    #[test]
    fn errors_say_where_and_what() {
        for (src, says, at) in [
            ("plate = 'x'", "use `==`", Some(6)),
            ("a && b", "use `and`", Some(2)),
            ("starts_with(plate)", "takes 2 argument", Some(0)),
            (
                "startswith(plate, 'x')",
                "unknown function startswith()",
                Some(0),
            ),
            ("(1 + 2", "expected ')'", Some(6)),
            ("1 +", "ends too early", Some(3)),
            ("'open", "unterminated", Some(0)),
            ("1 2", "unexpected text", Some(2)),
            ("plate ^ 2", "unexpected character", Some(6)),
        ] {
            let e = parse(src).unwrap_err();
            assert!(e.message.contains(says), "{src}: {e:?}");
            assert_eq!(e.at, at, "{src}: {e:?}");
        }
        for (src, says) in [
            ("nosuch > 1", "unknown name nosuch"),
            ("plate > 1", "cannot compare"),
            ("1 / 0", "division by zero"),
            ("not 1", "true or false"),
            ("9223372036854775807 + 1", "overflow"),
        ] {
            let e = parse(src).unwrap().eval(&E).unwrap_err();
            assert!(e.message.contains(says), "{src}: {e:?}");
        }
    }
}
