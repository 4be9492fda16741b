//! NDJSON (one JSON object per line) to Arrow, through the same row typing as CSV: the same
//! validation, rejects with line and reason, and classification.

use serde_json::{Map, Value};
use yunqi_types::Error;

use crate::csv_import::{Parsed, Reject, SAMPLE_ROWS, infer_column, type_rows};
use crate::schema::{Column, column_name};

/// Whether text looks like NDJSON: its first non-blank character opens an object.
pub fn looks_like_ndjson(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// A scalar JSON value as the text the typing reads; `None` for a nested value.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some(String::new()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

fn objects(text: &str) -> impl Iterator<Item = (u64, &str, Result<Map<String, Value>, String>)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let parsed = match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) => Err("is not a JSON object".to_string()),
                Err(e) => Err(format!("is not valid JSON: {e}")),
            };
            (i as u64 + 1, line, parsed)
        })
}

/// Columns for a file that creates a dataset: the keys in order of first appearance over the
/// first lines, types and classes from their values.
pub fn infer_columns(text: &str) -> Result<Vec<Column>, Error> {
    let mut keys: Vec<String> = Vec::new();
    let mut values: Vec<Vec<String>> = Vec::new();
    for (_, _, object) in objects(text).take(SAMPLE_ROWS) {
        let Ok(object) = object else { continue };
        for (k, v) in object {
            let i = match keys.iter().position(|x| *x == k) {
                Some(i) => i,
                None => {
                    keys.push(k);
                    values.push(Vec::new());
                    keys.len() - 1
                }
            };
            if let Some(s) = scalar(&v) {
                values[i].push(s);
            }
        }
    }
    if keys.is_empty() {
        return Err(
            Error::invalid("the file holds no JSON object").hint("send one JSON object per line")
        );
    }
    let mut seen = std::collections::HashSet::new();
    let mut columns = Vec::new();
    for (i, (key, sample)) in keys.iter().zip(&values).enumerate() {
        let (name, label) = column_name(key, i);
        if !seen.insert(name.clone()) {
            return Err(Error::invalid(format!(
                "field \"{key}\" gives the column name \"{name}\" twice"
            ))
            .hint("give every field a different name"));
        }
        columns.push(infer_column(
            name,
            label,
            key,
            sample.iter().map(String::as_str),
        ));
    }
    Ok(columns)
}

/// Parses NDJSON into rows of `columns`. A field matches a column by name or by its original
/// header label; a missing field is null; an unknown or nested field rejects the row.
pub fn parse(text: &str, columns: &[Column]) -> Result<Parsed, Error> {
    let mut rejects = Vec::new();
    let mut records = Vec::new();
    'lines: for (line, raw, object) in objects(text) {
        let reject = |reason: String, column: Option<String>| Reject {
            line,
            column,
            reason,
            raw: raw.chars().take(1024).collect(),
        };
        let object = match object {
            Ok(o) => o,
            Err(reason) => {
                rejects.push(reject(format!("the line {reason}"), None));
                continue;
            }
        };
        let mut fields = vec![String::new(); columns.len()];
        for (k, v) in &object {
            let Some(c) = columns
                .iter()
                .position(|c| c.name == *k || c.label.as_deref() == Some(k.as_str()))
            else {
                rejects.push(reject(format!("unknown field \"{k}\""), None));
                continue 'lines;
            };
            match scalar(v) {
                Some(s) => fields[c] = s,
                None => {
                    rejects.push(reject(
                        "is an array or object, not a value".into(),
                        Some(columns[c].name.clone()),
                    ));
                    continue 'lines;
                }
            }
        }
        let mut record = csv::StringRecord::from(fields);
        let mut position = csv::Position::new();
        position.set_line(line);
        record.set_position(Some(position));
        records.push(record);
    }
    let mapping: Vec<usize> = (0..columns.len()).collect();
    type_rows(&records, rejects, columns, &mapping, b',', false)
}
