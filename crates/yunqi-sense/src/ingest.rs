//! Events in: NDJSON and CSV decoded straight into Arrow columns of the stream's declared types,
//! event by event, so that one bad event is rejected with its index and reason while the rest
//! of the batch goes in (or, when the caller asks for it, the batch is refused whole).
//!
//! The decoders are written for the declared schema — no intermediate JSON values, no
//! per-event allocation except for text — because at millions of events per second the parse
//! is the cost.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::SchemaRef;
use yunqi_datasets::{ColumnType, StreamManifest};
use yunqi_types::Error;

/// An event that was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    /// Its position in the batch, from 0.
    pub index: usize,
    /// Why.
    pub reason: String,
}

/// What a batch decoded to.
#[derive(Debug)]
pub struct Decoded {
    /// The accepted events.
    pub batch: RecordBatch,
    /// The rejected ones.
    pub rejected: Vec<Rejected>,
}

/// Rejections listed in full; beyond this only counted.
pub const REJECTED_LISTED_MAX: usize = 1000;

enum Col {
    Int(Int64Builder),
    Float(Float64Builder),
    Text(StringBuilder),
    Bool(BooleanBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

/// A value as read, before it is appended.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Null,
    Int(i64),
    Float(f64),
    /// Text without escapes (a slice of the input).
    Str(&'a str),
    /// Text with escapes: decoded into the scratch buffer.
    Escaped,
    Bool(bool),
}

impl Col {
    fn new(t: ColumnType, capacity: usize) -> Col {
        match t {
            ColumnType::Int => Col::Int(Int64Builder::with_capacity(capacity)),
            ColumnType::Float => Col::Float(Float64Builder::with_capacity(capacity)),
            ColumnType::Text => Col::Text(StringBuilder::with_capacity(capacity, capacity * 8)),
            ColumnType::Bool => Col::Bool(BooleanBuilder::with_capacity(capacity)),
            ColumnType::Date => Col::Date(Date32Builder::with_capacity(capacity)),
            ColumnType::Timestamp => {
                Col::Ts(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Col::Int(b) => Arc::new(b.finish()),
            Col::Float(b) => Arc::new(b.finish()),
            Col::Text(b) => Arc::new(b.finish()),
            Col::Bool(b) => Arc::new(b.finish()),
            Col::Date(b) => Arc::new(b.finish()),
            Col::Ts(b) => Arc::new(b.finish()),
        }
    }

    fn len(&self) -> usize {
        use datafusion::arrow::array::ArrayBuilder;
        match self {
            Col::Int(b) => b.len(),
            Col::Float(b) => b.len(),
            Col::Text(b) => b.len(),
            Col::Bool(b) => b.len(),
            Col::Date(b) => b.len(),
            Col::Ts(b) => b.len(),
        }
    }
}

/// Builds a batch event by event: values are checked into a row buffer first and appended
/// only when the whole event is good.
struct Rows {
    schema: SchemaRef,
    types: Vec<ColumnType>,
    names: Vec<String>,
    event_time: usize,
    cols: Vec<Col>,
    /// The current event's values: parsed numbers, or text ranges into `text`.
    row: Vec<Cell>,
    text: String,
}

#[derive(Debug, Clone, Copy)]
enum Cell {
    Missing,
    Null,
    I(i64),
    F(f64),
    B(bool),
    /// Range in `Rows::text`.
    T(usize, usize),
}

impl Rows {
    fn new(m: &StreamManifest, capacity: usize) -> Rows {
        Rows {
            schema: m.arrow_schema(),
            types: m.columns.iter().map(|c| c.column_type).collect(),
            names: m.columns.iter().map(|c| c.name.clone()).collect(),
            event_time: m.column_index(&m.event_time).expect("checked stream"),
            cols: m
                .columns
                .iter()
                .map(|c| Col::new(c.column_type, capacity))
                .collect(),
            row: vec![Cell::Missing; m.columns.len()],
            text: String::new(),
        }
    }

    fn start(&mut self) {
        self.row.fill(Cell::Missing);
        self.text.clear();
    }

    /// Checks and stores one value of the current event.
    fn set(&mut self, c: usize, v: Value<'_>, escaped: &str) -> Result<(), String> {
        let t = self.types[c];
        let name = &self.names[c];
        let text_cell = |rows: &mut Rows, s: &str| {
            let a = rows.text.len();
            rows.text.push_str(s);
            Cell::T(a, rows.text.len())
        };
        let cell = match (t, v) {
            (_, Value::Null) => Cell::Null,
            (ColumnType::Int, Value::Int(i)) => Cell::I(i),
            (ColumnType::Int, Value::Float(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => {
                Cell::I(f as i64)
            }
            (ColumnType::Float, Value::Int(i)) => Cell::F(i as f64),
            (ColumnType::Float, Value::Float(f)) => Cell::F(f),
            (ColumnType::Bool, Value::Bool(b)) => Cell::B(b),
            (ColumnType::Text, Value::Str(s)) => text_cell(self, s),
            (ColumnType::Text, Value::Escaped) => text_cell(self, escaped),
            (ColumnType::Timestamp, Value::Str(s)) => {
                Cell::I(parse_timestamp_us(s).ok_or_else(|| {
                    format!(
                        "{name}: \"{s}\" is not an RFC 3339 timestamp (e.g. 2026-11-26T08:00:00Z)"
                    )
                })?)
            }
            (ColumnType::Timestamp, Value::Escaped) => Cell::I(
                parse_timestamp_us(escaped)
                    .ok_or_else(|| format!("{name}: \"{escaped}\" is not an RFC 3339 timestamp"))?,
            ),
            (ColumnType::Date, Value::Str(s)) => Cell::I(
                parse_date(s)
                    .ok_or_else(|| format!("{name}: \"{s}\" is not a date (YYYY-MM-DD)"))?
                    as i64,
            ),
            (t, v) => {
                return Err(format!(
                    "{name}: expected {}, got {}",
                    type_word(t),
                    match v {
                        Value::Null => "null",
                        Value::Int(_) if t == ColumnType::Int => "a number out of range",
                        Value::Int(_) | Value::Float(_) => "a number",
                        Value::Str(_) | Value::Escaped => "text",
                        Value::Bool(_) => "true/false",
                    }
                ));
            }
        };
        self.row[c] = cell;
        Ok(())
    }

    /// Appends the current event if it is whole.
    fn finish_row(&mut self) -> Result<(), String> {
        match self.row[self.event_time] {
            Cell::Missing | Cell::Null => {
                return Err(format!(
                    "{}: every event needs its event time",
                    self.names[self.event_time]
                ));
            }
            _ => {}
        }
        for (c, cell) in self.row.iter().enumerate() {
            match (&mut self.cols[c], *cell) {
                (col, Cell::Missing | Cell::Null) => match col {
                    Col::Int(b) => b.append_null(),
                    Col::Float(b) => b.append_null(),
                    Col::Text(b) => b.append_null(),
                    Col::Bool(b) => b.append_null(),
                    Col::Date(b) => b.append_null(),
                    Col::Ts(b) => b.append_null(),
                },
                (Col::Int(b), Cell::I(i)) => b.append_value(i),
                (Col::Float(b), Cell::F(f)) => b.append_value(f),
                (Col::Bool(b), Cell::B(v)) => b.append_value(v),
                (Col::Date(b), Cell::I(i)) => b.append_value(i as i32),
                (Col::Ts(b), Cell::I(i)) => b.append_value(i),
                (Col::Text(b), Cell::T(a, z)) => b.append_value(&self.text[a..z]),
                _ => unreachable!("cells are checked against the column type in set()"),
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<RecordBatch, Error> {
        let cols: Vec<ArrayRef> = self.cols.iter_mut().map(Col::finish).collect();
        RecordBatch::try_new(self.schema.clone(), cols)
            .map_err(|e| Error::internal(format!("events batch: {e}")))
    }

    fn rows(&self) -> usize {
        self.cols.first().map_or(0, Col::len)
    }
}

fn type_word(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Text => "text",
        ColumnType::Int => "an integer",
        ColumnType::Float => "a number",
        ColumnType::Bool => "true or false",
        ColumnType::Date => "a date (\"YYYY-MM-DD\")",
        ColumnType::Timestamp => "an RFC 3339 timestamp string",
    }
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut v: i64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v)
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// `YYYY-MM-DD` to days since 1970-01-01.
pub fn parse_date(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(&b[..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d) as i32)
}

/// An RFC 3339 timestamp (`2026-11-26T08:00:00Z`, `…T16:00:00.250+08:00`, a space for `T`)
/// to microseconds since the epoch.
pub fn parse_timestamp_us(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || (b[10] != b'T' && b[10] != b' ' && b[10] != b't') {
        return None;
    }
    let days = parse_date(&s[..10])? as i64;
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, se) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 6 {
                micros = micros * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset_s = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits(&b[i + 1..i + 3])?;
            let om = digits(&b[i + 4..i + 6])?;
            let o = oh * 3600 + om * 60;
            if *c == b'+' { o } else { -o }
        }
        _ => return None,
    };
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset_s) * 1_000_000 + micros)
}

/// A tiny cursor over one NDJSON line.
struct Json<'a> {
    b: &'a [u8],
    s: &'a str,
    i: usize,
}

impl<'a> Json<'a> {
    #[inline]
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\r') {
            self.i += 1;
        }
    }

    #[inline]
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// A string (the opening quote already seen): a slice when it has no escapes, else
    /// decoded into `buf`.
    fn string(&mut self, buf: &mut String) -> Result<Value<'a>, String> {
        let start = self.i;
        while self.i < self.b.len() {
            match self.b[self.i] {
                b'"' => {
                    let v = &self.s[start..self.i];
                    self.i += 1;
                    return Ok(Value::Str(v));
                }
                b'\\' => break,
                c if c < 0x20 => return Err("control character in a string".into()),
                _ => self.i += 1,
            }
        }
        buf.clear();
        buf.push_str(&self.s[start..self.i]);
        while self.i < self.b.len() {
            match self.b[self.i] {
                b'"' => {
                    self.i += 1;
                    return Ok(Value::Escaped);
                }
                b'\\' => {
                    let e = *self.b.get(self.i + 1).ok_or("unfinished escape")?;
                    self.i += 2;
                    match e {
                        b'"' => buf.push('"'),
                        b'\\' => buf.push('\\'),
                        b'/' => buf.push('/'),
                        b'b' => buf.push('\u{8}'),
                        b'f' => buf.push('\u{c}'),
                        b'n' => buf.push('\n'),
                        b'r' => buf.push('\r'),
                        b't' => buf.push('\t'),
                        b'u' => {
                            let hex = |j: usize| -> Result<u32, String> {
                                let h = self.s.get(j..j + 4).ok_or("short \\u escape")?;
                                u32::from_str_radix(h, 16).map_err(|_| "bad \\u escape".into())
                            };
                            let mut cp = hex(self.i)?;
                            self.i += 4;
                            if (0xD800..0xDC00).contains(&cp)
                                && self.b.get(self.i) == Some(&b'\\')
                                && self.b.get(self.i + 1) == Some(&b'u')
                            {
                                let lo = hex(self.i + 2)?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                                    self.i += 6;
                                }
                            }
                            buf.push(char::from_u32(cp).ok_or("invalid \\u escape")?);
                        }
                        _ => return Err("invalid escape in a string".into()),
                    }
                }
                c if c < 0x20 => return Err("control character in a string".into()),
                _ => {
                    let start = self.i;
                    while self.i < self.b.len() && !matches!(self.b[self.i], b'"' | b'\\') {
                        self.i += 1;
                    }
                    buf.push_str(&self.s[start..self.i]);
                }
            }
        }
        Err("unterminated string".into())
    }

    fn value(&mut self, buf: &mut String) -> Result<Value<'a>, String> {
        self.ws();
        let Some(&c) = self.b.get(self.i) else {
            return Err("missing value".into());
        };
        match c {
            b'"' => {
                self.i += 1;
                self.string(buf)
            }
            b't' if self.b[self.i..].starts_with(b"true") => {
                self.i += 4;
                Ok(Value::Bool(true))
            }
            b'f' if self.b[self.i..].starts_with(b"false") => {
                self.i += 5;
                Ok(Value::Bool(false))
            }
            b'n' if self.b[self.i..].starts_with(b"null") => {
                self.i += 4;
                Ok(Value::Null)
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                let neg = c == b'-';
                if neg {
                    self.i += 1;
                }
                let mut v: i64 = 0;
                let mut overflow = false;
                let digits_start = self.i;
                while self.i < self.b.len() && self.b[self.i].is_ascii_digit() {
                    let d = (self.b[self.i] - b'0') as i64;
                    match v.checked_mul(10).and_then(|x| x.checked_add(d)) {
                        Some(x) => v = x,
                        None => overflow = true,
                    }
                    self.i += 1;
                }
                if self.i == digits_start {
                    return Err("invalid number".into());
                }
                let is_float = matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E'));
                if !is_float && !overflow {
                    return Ok(Value::Int(if neg { -v } else { v }));
                }
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'
                    )
                {
                    self.i += 1;
                }
                let f: f64 = self.s[start..self.i]
                    .parse()
                    .map_err(|_| "invalid number".to_string())?;
                Ok(Value::Float(f))
            }
            b'{' | b'[' => Err("nested objects and arrays are not supported".into()),
            _ => Err("invalid JSON value".into()),
        }
    }

    /// Skips a nested value of an ignored field.
    fn skip_nested(&mut self) -> Result<(), String> {
        let mut depth = 0i32;
        let mut buf = String::new();
        loop {
            self.ws();
            match self.b.get(self.i) {
                None => return Err("unterminated object".into()),
                Some(b'{' | b'[') => {
                    depth += 1;
                    self.i += 1;
                }
                Some(b'}' | b']') => {
                    depth -= 1;
                    self.i += 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    self.string(&mut buf)?;
                }
                Some(_) => {
                    self.i += 1;
                }
            }
        }
    }
}

/// Finds a column by the key's bytes; `hint` is the column the same position held in the
/// previous event (events usually list their fields in the same order).
#[inline]
fn column_of(names: &[String], key: &str, hint: usize) -> Option<usize> {
    if names.get(hint).is_some_and(|n| n == key) {
        return Some(hint);
    }
    names.iter().position(|n| n == key)
}

fn ndjson_line(rows: &mut Rows, line: &str, buf: &mut String) -> Result<(), String> {
    let mut j = Json {
        b: line.as_bytes(),
        s: line,
        i: 0,
    };
    if !j.eat(b'{') {
        return Err("an event is a JSON object on one line".into());
    }
    rows.start();
    let mut position = 0usize;
    if !j.eat(b'}') {
        loop {
            if !j.eat(b'"') {
                return Err("expected a field name".into());
            }
            let key = match j.string(buf)? {
                Value::Str(k) => k.to_string(),
                _ => buf.clone(),
            };
            if !j.eat(b':') {
                return Err(format!("expected ':' after \"{key}\""));
            }
            match column_of(&rows.names, &key, position) {
                Some(c) => {
                    let v = j.value(buf)?;
                    rows.set(c, v, buf)?;
                    position = c + 1;
                }
                None => {
                    j.ws();
                    if matches!(j.b.get(j.i), Some(b'{' | b'[')) {
                        j.skip_nested()?;
                    } else {
                        j.value(buf)?;
                    }
                }
            }
            if j.eat(b',') {
                continue;
            }
            if j.eat(b'}') {
                break;
            }
            return Err("expected ',' or '}'".into());
        }
    }
    j.ws();
    if j.i != j.b.len() {
        return Err("text after the event's closing brace".into());
    }
    rows.finish_row()
}

/// Decodes NDJSON events (one object per line; blank lines skipped, not counted). Fields not
/// in the stream are ignored; missing ones are NULL except the event time.
pub fn decode_ndjson(m: &StreamManifest, bytes: &[u8]) -> Result<Decoded, Error> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::invalid(format!("events are not UTF-8 (byte {})", e.valid_up_to()))
            .hint("send UTF-8 NDJSON, one event per line")
    })?;
    let lines = bytecount_lines(bytes);
    let mut rows = Rows::new(m, lines);
    let mut rejected = Vec::new();
    let mut buf = String::new();
    let mut index = 0usize;
    for line in text.split('\n') {
        if line.trim().is_empty() {
            continue;
        }
        if let Err(reason) = ndjson_line(&mut rows, line, &mut buf) {
            rejected.push(Rejected { index, reason });
        }
        index += 1;
    }
    Ok(Decoded {
        batch: rows.finish()?,
        rejected,
    })
}

fn bytecount_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count() + 1
}

/// Decodes CSV events with a header naming the stream's columns (any order, extra columns
/// ignored). Values are read as in NDJSON; an empty field is NULL.
pub fn decode_csv(m: &StreamManifest, bytes: &[u8]) -> Result<Decoded, Error> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::invalid(format!("events are not UTF-8 (byte {})", e.valid_up_to())))?;
    let (header, body) = text.split_once('\n').unwrap_or((text, ""));
    decode_csv_with_header(m, header, body)
}

/// Decodes CSV lines (no header line) whose columns `header` names: a large file is decoded
/// in pieces that share the file's header.
pub fn decode_csv_with_header(
    m: &StreamManifest,
    header: &str,
    text: &str,
) -> Result<Decoded, Error> {
    let bytes = text.as_bytes();
    let lines = text.split('\n');
    let header = header.trim_end_matches('\r');
    let names: Vec<&str> = header
        .split(',')
        .map(|h| h.trim().trim_matches('"'))
        .collect();
    let map: Vec<Option<usize>> = names.iter().map(|n| m.column_index(n)).collect();
    if !map.iter().any(Option::is_some) {
        return Err(
            Error::invalid("the CSV header names none of the stream's columns").hint(format!(
                "the first line names the columns: {}",
                m.columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        );
    }
    let mut rows = Rows::new(m, bytecount_lines(bytes));
    let mut rejected = Vec::new();
    let mut index = 0usize;
    let mut field = String::new();
    for line in lines {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        rows.start();
        let r = (|| -> Result<(), String> {
            let mut rest = line;
            for (k, target) in map.iter().enumerate() {
                let (raw, quoted, next): (&str, bool, Option<&str>) = if rest.starts_with('"') {
                    field.clear();
                    let b = rest.as_bytes();
                    let mut i = 1;
                    loop {
                        match b.get(i) {
                            None => return Err("unterminated quoted field".into()),
                            Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                                field.push('"');
                                i += 2;
                            }
                            Some(b'"') => break,
                            Some(_) => {
                                let s = i;
                                while i < b.len() && b[i] != b'"' {
                                    i += 1;
                                }
                                field.push_str(&rest[s..i]);
                            }
                        }
                    }
                    let after = &rest[i + 1..];
                    let next = match after.strip_prefix(',') {
                        Some(n) => Some(n),
                        None if after.is_empty() => None,
                        None => return Err("text after a quoted field".into()),
                    };
                    ("", true, next)
                } else {
                    match rest.find(',') {
                        Some(p) => (&rest[..p], false, Some(&rest[p + 1..])),
                        None => (rest, false, None),
                    }
                };
                if let Some(c) = *target {
                    let v = if quoted {
                        Value::Escaped
                    } else if raw.is_empty() {
                        Value::Null
                    } else {
                        csv_value(rows.types[c], raw)
                    };
                    rows.set(c, v, &field)?;
                }
                match next {
                    Some(n) => rest = n,
                    None if k + 1 == map.len() => {}
                    None => {
                        return Err(format!(
                            "{} fields where the header has {}",
                            k + 1,
                            map.len()
                        ));
                    }
                }
                if next.is_none() {
                    break;
                }
            }
            rows.finish_row()
        })();
        if let Err(reason) = r {
            rejected.push(Rejected { index, reason });
        }
        index += 1;
    }
    let _ = rows.rows();
    Ok(Decoded {
        batch: rows.finish()?,
        rejected,
    })
}

/// Decodes an Arrow IPC stream of events: columns are matched by name and cast to the
/// declared types (a column that cannot be cast refuses the batch); an event without an event
/// time is rejected.
pub fn decode_arrow(m: &StreamManifest, bytes: &[u8]) -> Result<Decoded, Error> {
    use datafusion::arrow::array::{Array, BooleanArray};
    use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| {
                Error::invalid(format!("not an Arrow IPC stream: {e}")).hint(
                    "send the Arrow IPC streaming format (application/vnd.apache.arrow.stream)",
                )
            })?;
    let schema = m.arrow_schema();
    let et = m.column_index(&m.event_time).expect("checked stream");
    let mut batches = Vec::new();
    let mut rejected = Vec::new();
    let mut base = 0usize;
    for b in reader {
        let b = b.map_err(|e| Error::invalid(format!("Arrow IPC stream: {e}")))?;
        let mut cols = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let c = match b.column_by_name(f.name()) {
                Some(c) => cast(c, f.data_type()).map_err(|e| {
                    Error::invalid(format!(
                        "column \"{}\" cannot be read as {}: {e}",
                        f.name(),
                        f.data_type()
                    ))
                })?,
                None => datafusion::arrow::array::new_null_array(f.data_type(), b.num_rows()),
            };
            cols.push(c);
        }
        let ts = cols[et].clone();
        if ts.null_count() > 0 {
            for i in 0..ts.len() {
                if ts.is_null(i) {
                    rejected.push(Rejected {
                        index: base + i,
                        reason: format!("{}: every event needs its event time", m.event_time),
                    });
                }
            }
        }
        let nullable = std::sync::Arc::new(datafusion::arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(nullable, cols)
            .map_err(|e| Error::invalid(format!("Arrow IPC stream: {e}")))?;
        let batch = if ts.null_count() > 0 {
            let keep: BooleanArray = (0..ts.len()).map(|i| Some(ts.is_valid(i))).collect();
            filter_record_batch(&batch, &keep)
                .map_err(|e| Error::internal(format!("filter: {e}")))?
        } else {
            batch
        };
        let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
            .map_err(|e| Error::invalid(format!("Arrow IPC stream: {e}")))?;
        base += b.num_rows();
        batches.push(batch);
    }
    let batch = concat_batches(&schema, &batches)
        .map_err(|e| Error::internal(format!("events batch: {e}")))?;
    Ok(Decoded { batch, rejected })
}

/// A CSV field as a value of the column's type (text as text, numbers parsed).
fn csv_value(t: ColumnType, raw: &str) -> Value<'_> {
    match t {
        ColumnType::Int => match raw.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Str(raw),
        },
        ColumnType::Float => match raw.parse::<f64>() {
            Ok(f) => Value::Float(f),
            Err(_) => Value::Str(raw),
        },
        ColumnType::Bool => match raw {
            "true" | "TRUE" | "t" | "1" => Value::Bool(true),
            "false" | "FALSE" | "f" | "0" => Value::Bool(false),
            _ => Value::Str(raw),
        },
        _ => Value::Str(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp_us("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_timestamp_us("1970-01-01T08:00:01.5+08:00"),
            Some(1_500_000)
        );
        assert_eq!(
            parse_timestamp_us("2026-11-26T08:00:00Z"),
            Some(
                chrono::DateTime::parse_from_rfc3339("2026-11-26T08:00:00Z")
                    .unwrap()
                    .timestamp_micros()
            )
        );
        for bad in [
            "2026-11-26",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-26T08:00:00",
            "2026-11-26T08:00:00.Z",
            "2026-11-26T24:00:00Z",
        ] {
            assert_eq!(parse_timestamp_us(bad), None, "{bad}");
        }
        assert!(parse_timestamp_us("2024-02-29T00:00:00Z").is_some());
    }
}
