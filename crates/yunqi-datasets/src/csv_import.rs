//! CSV to Arrow with validation. Every row either goes whole into the batch or is rejected
//! with its line number, column and reason; nothing is dropped silently.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use yunqi_types::{Error, classify};

use crate::schema::{Column, ColumnType, column_name};

/// Rows sampled per column to suggest its class.
pub const SAMPLE_ROWS: usize = 1000;

/// A rejected row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reject {
    /// Line of the file where the row starts (1-based).
    pub line: u64,
    /// The column at fault, if one is.
    pub column: Option<String>,
    /// Why.
    pub reason: String,
    /// The row as it was (truncated to 1 KiB).
    pub raw: String,
}

/// What parsing produced.
#[derive(Debug)]
pub struct Parsed {
    /// The good rows (empty while they are still in `pieces`).
    pub batch: RecordBatch,
    /// The good rows in pieces, as a parallel parse left them, when `batch` has not been made;
    /// see [`Parsed::unify`].
    pub pieces: Vec<RecordBatch>,
    /// The line (row number for Parquet) each good row came from.
    pub lines: Vec<u64>,
    /// The rejected rows.
    pub rejects: Vec<Reject>,
    /// Up to [`SAMPLE_ROWS`] non-empty values per column, for classification.
    pub samples: Vec<Vec<String>>,
    /// Whether the first row was a header.
    pub header: bool,
    /// The delimiter used.
    pub delimiter: u8,
}

/// Text decoded from a file, and the lines that could not be decoded.
pub type Decoded<'a> = (Cow<'a, str>, &'static str, Vec<Reject>);

/// Decodes file bytes: UTF-8 (a BOM is skipped), else GB18030 (a superset of GBK and GB2312).
/// A file that is UTF-8 but for some lines (a mixed file, e.g. GBK rows pasted into a UTF-8
/// file) is read as UTF-8, and those lines become rejected rows — never guessed at. Lines are
/// kept as empty lines so that line numbers stay right.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, Error> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok((Cow::Borrowed(s), "UTF-8", Vec::new()));
    }
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    let (mut utf8, mut not_utf8) = (0usize, 0usize);
    for l in &lines {
        if l.is_ascii() {
            continue;
        }
        if std::str::from_utf8(l).is_ok() {
            utf8 += 1;
        } else {
            not_utf8 += 1;
        }
    }
    let reject = |i: usize, line: &[u8], reason: &str| Reject {
        line: i as u64 + 1,
        column: None,
        reason: reason.to_string(),
        raw: short_bytes(String::from_utf8_lossy(line).trim_end(), 1024),
    };
    if utf8 > 0 && utf8 >= not_utf8 {
        let mut text = String::with_capacity(bytes.len());
        let mut bad = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            match std::str::from_utf8(l) {
                Ok(s) => text.push_str(s),
                Err(_) => {
                    bad.push(reject(
                        i,
                        l,
                        "the line is not valid UTF-8 (the rest of the file is)",
                    ));
                    if l.ends_with(b"\n") {
                        text.push('\n');
                    }
                }
            }
        }
        return Ok((Cow::Owned(text), "UTF-8", bad));
    }
    let (text, _, had_errors) = encoding_rs::GB18030.decode(bytes);
    if !had_errors {
        return Ok((text, "GB18030", Vec::new()));
    }
    let mut text = String::with_capacity(bytes.len());
    let mut bad = Vec::new();
    let mut good_non_ascii = 0;
    for (i, l) in lines.iter().enumerate() {
        let (s, _, errors) = encoding_rs::GB18030.decode(l);
        if errors {
            bad.push(reject(
                i,
                l,
                "the line is neither UTF-8 nor GBK/GB18030 text",
            ));
            if l.ends_with(b"\n") {
                text.push('\n');
            }
        } else {
            good_non_ascii += usize::from(!l.is_ascii());
            text.push_str(&s);
        }
    }
    if good_non_ascii == 0 {
        return Err(Error::invalid("file is neither UTF-8 nor GBK/GB18030 text")
            .detail(format!(
                "{} lines cannot be read, the first is line {}",
                bad.len(),
                bad.first().map_or(0, |r| r.line)
            ))
            .hint("save the file as UTF-8 (or GBK) text"));
    }
    Ok((Cow::Owned(text), "GB18030", bad))
}

/// Picks the delimiter (`,` tab `;` `|`) that splits the first lines into the same number of
/// fields, most fields first.
pub fn detect_delimiter(text: &str) -> u8 {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(20)
        .collect();
    let mut best = (b',', 0usize);
    for d in [b',', b'\t', b';', b'|'] {
        let counts: Vec<usize> = lines
            .iter()
            .map(|l| l.bytes().filter(|b| *b == d).count())
            .collect();
        if let Some(&first) = counts.first()
            && first > 0
            && counts.iter().all(|c| *c == first)
            && first > best.1
        {
            best = (d, first);
        }
    }
    best.0
}

#[derive(Debug, Clone, Copy)]
enum Cell<'a> {
    Null,
    Text(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Date(i32),
    Timestamp(i64),
}

fn parse_date(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(s, "%Y/%m/%d"))
        .ok()
}

fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y/%m/%d %H:%M:%S",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .map(|t| t.and_utc())
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" | "是" => Some(true),
        "false" | "f" | "no" | "n" | "0" | "否" => Some(false),
        _ => None,
    }
}

const EPOCH: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");

fn parse_cell<'a>(raw: &'a str, t: ColumnType) -> Result<Cell<'a>, String> {
    let v = raw.trim();
    if v.is_empty() {
        return Ok(Cell::Null);
    }
    match t {
        ColumnType::Text => Ok(Cell::Text(raw)),
        ColumnType::Int => v
            .parse::<i64>()
            .map(Cell::Int)
            .map_err(|_| format!("\"{}\" is not an integer", short(v))),
        ColumnType::Float => v
            .parse::<f64>()
            .map(Cell::Float)
            .map_err(|_| format!("\"{}\" is not a number", short(v))),
        ColumnType::Bool => parse_bool(v)
            .map(Cell::Bool)
            .ok_or_else(|| format!("\"{}\" is not true or false", short(v))),
        ColumnType::Date => parse_date(v)
            .map(|d| Cell::Date((d - EPOCH).num_days() as i32))
            .ok_or_else(|| format!("\"{}\" is not a date (YYYY-MM-DD)", short(v))),
        ColumnType::Timestamp => parse_timestamp(v)
            .map(|t| Cell::Timestamp(t.timestamp_micros()))
            .ok_or_else(|| {
                format!(
                    "\"{}\" is not a time (RFC 3339, e.g. 2026-11-26T08:00:00+08:00)",
                    short(v)
                )
            }),
    }
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The narrowest type all sampled values fit.
fn infer_type<'a>(values: impl Iterator<Item = &'a str> + Clone) -> ColumnType {
    let non_empty = values.filter(|v| !v.trim().is_empty());
    if non_empty.clone().next().is_none() {
        return ColumnType::Text;
    }
    for t in [
        ColumnType::Int,
        ColumnType::Float,
        ColumnType::Bool,
        ColumnType::Date,
        ColumnType::Timestamp,
    ] {
        // Leading zeros (ID numbers, codes) stay text.
        if t == ColumnType::Int
            && non_empty
                .clone()
                .any(|v| v.trim().len() > 1 && v.trim().starts_with('0'))
        {
            continue;
        }
        if t == ColumnType::Int && non_empty.clone().any(|v| v.trim().len() > 15) {
            continue;
        }
        if non_empty.clone().all(|v| parse_cell(v, t).is_ok()) {
            return t;
        }
    }
    ColumnType::Text
}

fn reader(text: &str, delimiter: u8) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes())
}

/// Columns for a file that creates a dataset: names from the header, types from the first
/// rows, classes from the detectors.
pub fn infer_columns(text: &str, delimiter: u8) -> Result<Vec<Column>, Error> {
    let mut rows = reader(text, delimiter).into_records();
    let header = match rows.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => return Err(Error::invalid(format!("the header cannot be read: {e}"))),
        None => {
            return Err(
                Error::invalid("the file is empty").hint("send a CSV file with a header row")
            );
        }
    };
    let sample: Vec<csv::StringRecord> = rows.take(SAMPLE_ROWS).filter_map(Result::ok).collect();
    let mut seen = std::collections::HashSet::new();
    let mut columns = Vec::new();
    for (i, h) in header.iter().enumerate() {
        let (name, label) = column_name(h, i);
        if !seen.insert(name.clone()) {
            return Err(
                Error::invalid(format!("column \"{name}\" appears twice in the header"))
                    .hint("give every column a different name"),
            );
        }
        columns.push(infer_column(
            name,
            label,
            h,
            sample.iter().filter_map(|r| r.get(i)),
        ));
    }
    Ok(columns)
}

/// A column whose type and class come from a sample of its values.
pub(crate) fn infer_column<'a>(
    name: String,
    label: Option<String>,
    header: &str,
    values: impl Iterator<Item = &'a str> + Clone,
) -> Column {
    let suggestion = classify::suggest(header, values.clone());
    // Phone, card and ID numbers are identifiers, not quantities: they stay text.
    let column_type = match suggestion.detected {
        Some(_) => ColumnType::Text,
        None => infer_type(values),
    };
    Column {
        name,
        label,
        column_type,
        class: suggestion.class,
        class_declared: false,
        detected: suggestion.detected,
    }
}

enum Builder {
    Text(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl Builder {
    fn new(t: ColumnType) -> Builder {
        match t {
            ColumnType::Text => Builder::Text(StringBuilder::new()),
            ColumnType::Int => Builder::Int(Int64Builder::new()),
            ColumnType::Float => Builder::Float(Float64Builder::new()),
            ColumnType::Bool => Builder::Bool(BooleanBuilder::new()),
            ColumnType::Date => Builder::Date(Date32Builder::new()),
            ColumnType::Timestamp => {
                Builder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
        }
    }

    fn append(&mut self, cell: Cell<'_>) {
        match (self, cell) {
            (Builder::Text(b), Cell::Text(v)) => b.append_value(v),
            (Builder::Int(b), Cell::Int(v)) => b.append_value(v),
            (Builder::Float(b), Cell::Float(v)) => b.append_value(v),
            (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
            (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
            (Builder::Timestamp(b), Cell::Timestamp(v)) => b.append_value(v),
            (Builder::Text(b), _) => b.append_null(),
            (Builder::Int(b), _) => b.append_null(),
            (Builder::Float(b), _) => b.append_null(),
            (Builder::Bool(b), _) => b.append_null(),
            (Builder::Date(b), _) => b.append_null(),
            (Builder::Timestamp(b), _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Builder::Text(mut b) => Arc::new(b.finish()),
            Builder::Int(mut b) => Arc::new(b.finish()),
            Builder::Float(mut b) => Arc::new(b.finish()),
            Builder::Bool(mut b) => Arc::new(b.finish()),
            Builder::Date(mut b) => Arc::new(b.finish()),
            Builder::Timestamp(mut b) => Arc::new(b.finish()),
        }
    }
}

/// Parses `text` into rows of `columns`. A first row naming the columns (by name or label, in
/// any order) is a header and maps fields to columns; otherwise fields are positional.
pub fn parse(
    text: &str,
    delimiter: u8,
    columns: &[Column],
    header: Option<bool>,
) -> Result<Parsed, Error> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    parse_on(text, delimiter, columns, header, threads)
}

/// [`parse`] on up to `threads` threads (files under [`PARALLEL_BYTES_MIN`] on one).
fn parse_on(
    text: &str,
    delimiter: u8,
    columns: &[Column],
    header: Option<bool>,
    threads: usize,
) -> Result<Parsed, Error> {
    let mut records = reader(text, delimiter).into_records().peekable();
    // Field i of each row goes to column mapping[i].
    let mut mapping: Vec<usize> = (0..columns.len()).collect();
    let first_is_header = match records.peek() {
        Some(Ok(first)) => {
            let names: Vec<Option<usize>> = first
                .iter()
                .map(|f| {
                    let f = f.trim();
                    columns
                        .iter()
                        .position(|c| c.name == f || c.label.as_deref() == Some(f))
                })
                .collect();
            let looks_like_header =
                names.iter().all(Option::is_some) && names.len() == columns.len();
            match header {
                Some(false) => false,
                Some(true) | None if looks_like_header => {
                    mapping = names.into_iter().map(|n| n.expect("all named")).collect();
                    true
                }
                Some(true) => {
                    let missing: Vec<&str> = columns
                        .iter()
                        .filter(|c| {
                            !first
                                .iter()
                                .any(|f| f.trim() == c.name || Some(f.trim()) == c.label.as_deref())
                        })
                        .map(|c| c.name.as_str())
                        .collect();
                    return Err(Error::invalid("the header does not match the dataset's columns")
                        .detail(format!("missing or misnamed: {}", missing.join(", ")))
                        .hint("name each column of the dataset once in the header, or import without --header"));
                }
                None => false,
            }
        }
        _ => false,
    };
    if first_is_header {
        records.next();
    }
    let data_start = if first_is_header {
        let mut r = reader(text, delimiter);
        let mut header_record = csv::StringRecord::new();
        let _ = r.read_record(&mut header_record);
        r.position().byte() as usize
    } else {
        0
    };
    if threads > 1
        && text.len() - data_start >= PARALLEL_BYTES_MIN
        && text.is_char_boundary(data_start)
    {
        return parse_parallel(
            text,
            data_start,
            threads,
            delimiter,
            columns,
            &mapping,
            first_is_header,
        );
    }
    type_stream(
        |record, rejects| loop {
            match records.next() {
                Some(Ok(r)) => {
                    *record = r;
                    return true;
                }
                Some(Err(e)) => rejects.push(unreadable(&e)),
                None => return false,
            }
        },
        Vec::new(),
        columns,
        &mapping,
        delimiter,
        first_is_header,
    )
}

/// Files from this size on are parsed on several threads.
pub const PARALLEL_BYTES_MIN: usize = 4 << 20;

/// A record the CSV reader could not read (not UTF-8, say), as a rejected row.
fn unreadable(e: &csv::Error) -> Reject {
    Reject {
        line: e.position().map_or(0, |p| p.line()),
        column: None,
        reason: format!("cannot be read: {e}"),
        raw: String::new(),
    }
}

/// Splits `data` into about `parts` pieces that end at record boundaries: at a line end that
/// is not inside a quoted field (quotes are counted; `""` inside a field counts twice).
fn chunk_bounds(data: &str, parts: usize) -> Vec<(usize, usize)> {
    let bytes = data.as_bytes();
    let mut bounds = Vec::with_capacity(parts);
    let mut start = 0;
    if !bytes.contains(&b'"') {
        for i in 1..parts {
            let target = (bytes.len() * i / parts).max(start);
            match bytes[target..].iter().position(|b| *b == b'\n') {
                Some(p) if target + p + 1 < bytes.len() => {
                    bounds.push((start, target + p + 1));
                    start = target + p + 1;
                }
                _ => break,
            }
        }
    } else {
        let mut quoted = false;
        let mut next = 1;
        let mut target = bytes.len() / parts;
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'"' {
                quoted = !quoted;
            } else if b == b'\n' && !quoted && i >= target && i + 1 < bytes.len() {
                bounds.push((start, i + 1));
                start = i + 1;
                next += 1;
                if next >= parts {
                    break;
                }
                target = bytes.len() * next / parts;
            }
        }
    }
    bounds.push((start, bytes.len()));
    bounds
}

/// [`parse`] of the rows after `data_start`, a piece per thread; line numbers stay those of
/// the file.
fn parse_parallel(
    text: &str,
    data_start: usize,
    threads: usize,
    delimiter: u8,
    columns: &[Column],
    mapping: &[usize],
    header: bool,
) -> Result<Parsed, Error> {
    let data = &text[data_start..];
    let base = text.as_bytes()[..data_start]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64;
    let bounds = chunk_bounds(data, threads);
    let pieces: Vec<Result<(Parsed, u64), Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds
            .iter()
            .map(|&(a, b)| {
                let chunk = &data[a..b];
                scope.spawn(move || {
                    let newlines = chunk.as_bytes().iter().filter(|c| **c == b'\n').count() as u64;
                    let mut rdr = reader(chunk, delimiter);
                    type_stream(
                        |record, rejects| loop {
                            match rdr.read_record(record) {
                                Ok(more) => return more,
                                Err(e) => rejects.push(unreadable(&e)),
                            }
                        },
                        Vec::new(),
                        columns,
                        mapping,
                        delimiter,
                        header,
                    )
                    .map(|p| (p, newlines))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::internal("an import thread panicked")))
            })
            .collect()
    });
    let mut offset = base;
    let mut batches = Vec::with_capacity(pieces.len());
    let mut merged: Option<Parsed> = None;
    for piece in pieces {
        let (mut p, newlines) = piece?;
        for r in &mut p.rejects {
            r.line += offset;
        }
        for l in &mut p.lines {
            *l += offset;
        }
        offset += newlines;
        batches.push(p.batch.clone());
        match &mut merged {
            None => merged = Some(p),
            Some(m) => {
                m.rejects.append(&mut p.rejects);
                m.lines.append(&mut p.lines);
                for (s, more) in m.samples.iter_mut().zip(p.samples) {
                    let room = SAMPLE_ROWS.saturating_sub(s.len());
                    s.extend(more.into_iter().take(room));
                }
            }
        }
    }
    let mut merged = merged.ok_or_else(|| Error::internal("no pieces to import"))?;
    merged.batch = RecordBatch::new_empty(merged.batch.schema());
    merged.pieces = batches;
    merged.rejects.sort_by_key(|r| r.line);
    Ok(merged)
}

/// Types raw rows into Arrow columns. Field `i` of a row goes to column `mapping[i]`; a row
/// with a bad field is rejected whole.
pub(crate) fn type_rows(
    owned: &[csv::StringRecord],
    rejects: Vec<Reject>,
    columns: &[Column],
    mapping: &[usize],
    delimiter: u8,
    header: bool,
) -> Result<Parsed, Error> {
    let mut records = owned.iter();
    type_stream(
        |record, _| match records.next() {
            Some(r) => {
                record.clone_from(r);
                true
            }
            None => false,
        },
        rejects,
        columns,
        mapping,
        delimiter,
        header,
    )
}

/// [`type_rows`] of records as `next` reads them into one reused record (`next` returns false
/// at the end, and keeps rows it cannot read as rejects).
pub(crate) fn type_stream(
    mut next: impl FnMut(&mut csv::StringRecord, &mut Vec<Reject>) -> bool,
    mut rejects: Vec<Reject>,
    columns: &[Column],
    mapping: &[usize],
    delimiter: u8,
    header: bool,
) -> Result<Parsed, Error> {
    let mut builders: Vec<Builder> = columns
        .iter()
        .map(|c| Builder::new(c.column_type))
        .collect();
    let mut samples: Vec<Vec<String>> = vec![Vec::new(); columns.len()];
    let mut rows = 0usize;
    let mut lines = Vec::new();
    let mut reused = csv::StringRecord::new();
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(columns.len());
    'rows: while next(&mut reused, &mut rejects) {
        let record = &reused;
        let line = record.position().map_or(0, |p| p.line());
        let raw = || {
            let joined = record
                .iter()
                .collect::<Vec<_>>()
                .join(std::str::from_utf8(&[delimiter]).unwrap_or(","));
            short_bytes(&joined, 1024)
        };
        if record.len() == 1 && record.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue;
        }
        if record.len() != columns.len() {
            rejects.push(Reject {
                line,
                column: None,
                reason: format!("expected {} fields, found {}", columns.len(), record.len()),
                raw: raw(),
            });
            continue;
        }
        // One allocation for the cells of every row: `spare` lends it to this row's cells
        // (which borrow from the record) and gets it back empty.
        let mut cells: Vec<Cell<'_>> = std::mem::take(&mut spare);
        cells.resize(columns.len(), Cell::Null);
        let mut bad = None;
        for (i, field) in record.iter().enumerate() {
            let c = mapping[i];
            match parse_cell(field, columns[c].column_type) {
                Ok(cell) => cells[c] = cell,
                Err(reason) => {
                    bad = Some((c, reason));
                    break;
                }
            }
        }
        if bad.is_none() {
            for (c, cell) in cells.iter().enumerate() {
                builders[c].append(*cell);
            }
        }
        cells.clear();
        spare = cells.into_iter().map(|_| Cell::Null).collect();
        if let Some((c, reason)) = bad {
            rejects.push(Reject {
                line,
                column: Some(columns[c].name.clone()),
                reason,
                raw: raw(),
            });
            continue 'rows;
        }
        for (i, field) in record.iter().enumerate() {
            let s = &mut samples[mapping[i]];
            if s.len() < SAMPLE_ROWS && !field.trim().is_empty() {
                s.push(field.to_string());
            }
        }
        rows += 1;
        lines.push(line);
    }
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(
        columns
            .iter()
            .map(|c| datafusion::arrow::datatypes::Field::new(&c.name, c.column_type.arrow(), true))
            .collect::<Vec<_>>(),
    ));
    // Rows unreadable before typing and rows refused by it, in file order.
    rejects.sort_by_key(|r| r.line);
    let arrays: Vec<ArrayRef> = builders.into_iter().map(Builder::finish).collect();
    let batch = RecordBatch::try_new(schema, arrays)
        .map_err(|e| Error::internal(format!("cannot assemble rows: {e}")))?;
    debug_assert_eq!(batch.num_rows(), rows);
    Ok(Parsed {
        batch,
        pieces: Vec::new(),
        lines,
        rejects,
        samples,
        header,
        delimiter,
    })
}

impl Parsed {
    /// Good rows.
    pub fn rows(&self) -> usize {
        self.batch.num_rows() + self.pieces.iter().map(RecordBatch::num_rows).sum::<usize>()
    }

    /// Puts the pieces together into `batch` (a copy), for work that needs one batch.
    pub fn unify(&mut self) -> Result<(), Error> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        let mut all = vec![self.batch.clone()];
        all.append(&mut self.pieces);
        self.batch = datafusion::arrow::compute::concat_batches(&self.batch.schema(), &all)
            .map_err(|e| Error::internal(format!("cannot assemble rows: {e}")))?;
        Ok(())
    }
}

fn short_bytes(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Raises the classes of undeclared columns to what the new values suggest (never lowers one:
/// a column that once held ID numbers stays sensitive).
pub fn update_classes(columns: &mut [Column], samples: &[Vec<String>]) {
    for (c, sample) in columns.iter_mut().zip(samples) {
        if c.class_declared {
            continue;
        }
        let header = c.label.clone().unwrap_or_else(|| c.name.clone());
        let s = classify::suggest(&header, sample.iter().map(String::as_str));
        if s.class > c.class {
            c.class = s.class;
            c.detected = s.detected;
        } else if s.class == c.class && c.detected.is_none() {
            c.detected = s.detected;
        }
    }
}

#[cfg(test)]
mod parallel_tests {
    use super::*;
    use crate::schema::ColumnType;

    #[test]
    fn pieces_give_the_rows_rejects_and_lines_of_one_pass() {
        let columns: Vec<Column> = [
            ("plate", ColumnType::Text),
            ("note", ColumnType::Text),
            ("n", ColumnType::Int),
        ]
        .into_iter()
        .map(|(name, t)| Column {
            name: name.into(),
            label: None,
            column_type: t,
            class: yunqi_types::ColumnClass::Internal,
            class_declared: false,
            detected: None,
        })
        .collect();
        let mut text = String::from("plate,note,n\n");
        for i in 0..200_000 {
            match i % 5_000 {
                // A quoted field over two lines, with a quote inside.
                7 => text.push_str(&format!("浙A{i:05},\"two\nlines, \"\"quoted\"\"\",{i}\r\n")),
                // A bad number and a ragged row.
                11 => text.push_str(&format!("浙A{i:05},x,not-a-number\n")),
                13 => text.push_str(&format!("浙A{i:05},x\n")),
                _ => text.push_str(&format!("浙A{i:05},some note,{i}\n")),
            }
        }
        assert!(text.len() > PARALLEL_BYTES_MIN);
        let one = parse_on(&text, b',', &columns, None, 1).unwrap();
        for threads in [2, 3, 7] {
            let mut many = parse_on(&text, b',', &columns, None, threads).unwrap();
            assert_eq!(many.rows(), one.rows());
            many.unify().unwrap();
            assert_eq!(many.batch, one.batch, "{threads} threads");
            assert_eq!(many.rejects, one.rejects, "{threads} threads");
            assert_eq!(many.lines, one.lines, "{threads} threads");
        }
        assert_eq!(one.rejects.len(), 80);
        assert_eq!(one.batch.num_rows(), 200_000 - 80);
        // Line numbers count the quoted field's extra line.
        assert_eq!(one.rejects[0].line, 2 + 11 + 1);
    }
}
