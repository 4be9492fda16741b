//! NGSI-LD entities on a stream: how an entity type's attributes map to the stream's columns,
//! entities as they arrive (normalized or key-value JSON) checked against them, an entity's
//! state as a row, and rows rendered back as NGSI-LD.
//!
//! A stream records one entity type (`WITH (ngsi_type = 'TrafficFlowObserved')`); its TEXT
//! column `id` holds the entity id and every other column is one attribute, named in
//! snake_case for camelCase attribute names (`averageVehicleSpeed` ↔ `average_vehicle_speed`).
//! A TEXT column named `ref_…` is a Relationship (its value the target's id), one named
//! `location` (or ending in `_location`) a GeoProperty (its value GeoJSON, kept as text), every
//! other column a Property. Each change appends the entity's whole state as one event; the event
//! time is the event-time attribute when sent, else the latest `observedAt` of the attributes
//! sent, else the time of arrival.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder,
    RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{
    Date32Type, Float64Type, Int64Type, SchemaRef, TimestampMicrosecondType,
};
use serde_json::{Map, Value};
use yunqi_datasets::{Column, ColumnType, StreamManifest};
use yunqi_types::{ColumnClass, Error, Grant};

use crate::ingest::{parse_date, parse_timestamp_us};

/// Longest entity id.
pub const ENTITY_ID_BYTES_MAX: usize = 256;

/// The NGSI-LD core context, named in responses' `Link` header.
pub const CORE_CONTEXT: &str = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld";

/// How an attribute is represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrKind {
    /// A value.
    Property,
    /// A link to another entity, by id.
    Relationship,
    /// A GeoJSON geometry.
    GeoProperty,
}

impl AttrKind {
    fn word(self) -> &'static str {
        match self {
            AttrKind::Property => "Property",
            AttrKind::Relationship => "Relationship",
            AttrKind::GeoProperty => "GeoProperty",
        }
    }
}

/// One column as an attribute.
#[derive(Debug, Clone)]
pub struct AttrColumn {
    /// The column.
    pub column: Column,
    /// The attribute name (camelCase of the column's).
    pub attr: String,
    /// Its representation.
    pub kind: AttrKind,
}

/// An entity type mapped to its stream.
#[derive(Debug)]
pub struct EntitySchema {
    /// The stream.
    pub stream: StreamManifest,
    /// The entity type.
    pub entity_type: String,
    /// Every column, in the stream's order.
    pub cols: Vec<AttrColumn>,
    by_key: HashMap<String, usize>,
    /// Position of `id`.
    pub id_col: usize,
    /// Position of the event-time column.
    pub time_col: usize,
    /// The events' Arrow schema.
    pub arrow: SchemaRef,
}

/// `averageVehicleSpeed` → `average_vehicle_speed` (the key attributes are matched by).
pub fn snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_uppercase() {
            if prev_lower {
                out.push('_');
            }
            out.extend(c.to_lowercase());
            prev_lower = false;
        } else {
            prev_lower = c.is_lowercase() || c.is_ascii_digit();
            out.push(c);
        }
    }
    out
}

/// `average_vehicle_speed` → `averageVehicleSpeed`.
pub fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut up = false;
    for c in name.chars() {
        if c == '_' && !out.is_empty() {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

impl EntitySchema {
    /// The mapping of a stream declared with an `ngsi_type`.
    pub fn new(stream: &StreamManifest) -> Result<EntitySchema, Error> {
        let entity_type = stream.ngsi_type.clone().ok_or_else(|| {
            Error::invalid(format!(
                "stream {} does not record entities",
                stream.sql_name()
            ))
        })?;
        let cols: Vec<AttrColumn> = stream
            .columns
            .iter()
            .map(|c| {
                let text = c.column_type == ColumnType::Text;
                let kind = if text && c.name.starts_with("ref_") {
                    AttrKind::Relationship
                } else if text && (c.name == "location" || c.name.ends_with("_location")) {
                    AttrKind::GeoProperty
                } else {
                    AttrKind::Property
                };
                AttrColumn {
                    column: c.clone(),
                    attr: camel(&c.name),
                    kind,
                }
            })
            .collect();
        let by_key = cols
            .iter()
            .enumerate()
            .map(|(i, c)| (c.column.name.clone(), i))
            .collect();
        let id_col = stream
            .column_index("id")
            .ok_or_else(|| Error::invalid("an NGSI-LD stream needs a TEXT column \"id\""))?;
        let time_col = stream
            .column_index(&stream.event_time)
            .ok_or_else(|| Error::internal("stream without its event-time column"))?;
        Ok(EntitySchema {
            stream: stream.clone(),
            entity_type,
            cols,
            by_key,
            id_col,
            time_col,
            arrow: stream.arrow_schema(),
        })
    }

    /// The column of an attribute name as sent (`averageVehicleSpeed` or `average_vehicle_speed`).
    pub fn column_of(&self, attr: &str) -> Option<usize> {
        self.by_key
            .get(attr)
            .or_else(|| self.by_key.get(&snake(attr)))
            .copied()
    }

    pub(crate) fn attr_names(&self) -> String {
        self.cols
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.id_col)
            .map(|(_, c)| c.attr.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One value of an entity's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// Not set.
    Null,
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// Text (a Relationship's target, a geometry's GeoJSON).
    Text(Box<str>),
    /// true / false.
    Bool(bool),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since the epoch.
    Ts(i64),
}

/// An entity's state: one value per column of its stream.
pub type Row = Box<[Val]>;

/// Why one entity (or one attribute) was not taken, in NGSI-LD's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `BadRequestData`, `AlreadyExists`, `ResourceNotFound`, ...
    pub kind: &'static str,
    /// A short title.
    pub title: String,
    /// What exactly.
    pub detail: String,
}

impl Problem {
    /// A request-data problem.
    pub fn bad(title: impl Into<String>, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "BadRequestData",
            title: title.into(),
            detail: detail.into(),
        }
    }

    /// The error URI.
    pub fn type_uri(&self) -> String {
        format!("https://uri.etsi.org/ngsi-ld/errors/{}", self.kind)
    }

    /// The HTTP status NGSI-LD gives it.
    pub fn status(&self) -> u16 {
        match self.kind {
            "AlreadyExists" => 409,
            "ResourceNotFound" => 404,
            _ => 400,
        }
    }
}

/// An entity as sent, checked against its stream.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Its id.
    pub id: String,
    /// The attributes sent, by column.
    pub attrs: Vec<(usize, Val)>,
    /// The latest `observedAt` among them.
    pub observed_at: Option<i64>,
    /// Attributes the stream does not record: `(name, reason)`.
    pub unknown: Vec<(String, String)>,
}

/// Checks an entity id: a URI (`urn:ngsi-ld:Type:x`) of at most [`ENTITY_ID_BYTES_MAX`] bytes
/// without spaces or control characters.
pub fn check_entity_id(id: &str) -> Result<(), Problem> {
    let scheme_ok = id.split_once(':').is_some_and(|(s, rest)| {
        !rest.is_empty()
            && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    if id.len() > ENTITY_ID_BYTES_MAX
        || !scheme_ok
        || id.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        let shown: String = id.chars().take(64).collect();
        return Err(Problem::bad(
            "invalid entity id",
            format!(
                "\"{shown}\" is not a URI of at most {ENTITY_ID_BYTES_MAX} bytes \
                 (e.g. urn:ngsi-ld:TrafficFlowObserved:seg-12)"
            ),
        ));
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The typed value `@type`/`@value` objects carry (`{"@type": "DateTime", "@value": "…"}`).
fn unwrap_typed(v: &Value) -> &Value {
    match v {
        Value::Object(o) if o.contains_key("@value") => &o["@value"],
        _ => v,
    }
}

/// Converts one attribute value to its column's type.
pub fn to_val(col: &AttrColumn, v: &Value) -> Result<Val, String> {
    let name = &col.attr;
    if col.kind == AttrKind::GeoProperty {
        return match v {
            Value::Null => Ok(Val::Null),
            Value::String(s) => Ok(Val::Text(s.as_str().into())),
            Value::Object(_) => Ok(Val::Text(v.to_string().into())),
            other => Err(format!(
                "{name}: expected a GeoJSON geometry, got {}",
                json_kind(other)
            )),
        };
    }
    let v = unwrap_typed(v);
    let t = col.column.column_type;
    let bad = || {
        format!(
            "{name}: expected {}, got {}",
            match t {
                ColumnType::Text => "text",
                ColumnType::Int => "an integer",
                ColumnType::Float => "a number",
                ColumnType::Bool => "true or false",
                ColumnType::Date => "a date (\"YYYY-MM-DD\")",
                ColumnType::Timestamp => "a DateTime (e.g. \"2026-11-26T08:00:00Z\")",
            },
            json_kind(v)
        )
    };
    Ok(match (t, v) {
        (_, Value::Null) => Val::Null,
        (_, Value::String(s)) if s == "urn:ngsi-ld:null" => Val::Null,
        (ColumnType::Text, Value::String(s)) => Val::Text(s.as_str().into()),
        (ColumnType::Int, Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Val::Int(i),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => Val::Int(f as i64),
            _ => return Err(bad()),
        },
        (ColumnType::Float, Value::Number(n)) => Val::Float(n.as_f64().ok_or_else(bad)?),
        (ColumnType::Bool, Value::Bool(b)) => Val::Bool(*b),
        (ColumnType::Timestamp, Value::String(s)) => {
            Val::Ts(parse_timestamp_us(s).ok_or_else(|| {
                format!("{name}: \"{s}\" is not a DateTime (e.g. 2026-11-26T08:00:00Z)")
            })?)
        }
        (ColumnType::Date, Value::String(s)) => Val::Date(
            parse_date(s).ok_or_else(|| format!("{name}: \"{s}\" is not a date (YYYY-MM-DD)"))?,
        ),
        _ => return Err(bad()),
    })
}

/// Checks one entity as sent (normalized or key-value). `expect_id` is the id of the URL, when
/// the body may omit it.
pub fn parse_entity(
    schema: &EntitySchema,
    v: &Value,
    expect_id: Option<&str>,
) -> Result<Incoming, Problem> {
    let Value::Object(obj) = v else {
        return Err(Problem::bad(
            "not an entity",
            format!("expected a JSON object, got {}", json_kind(v)),
        ));
    };
    let id = match (obj.get("id").or_else(|| obj.get("@id")), expect_id) {
        (Some(Value::String(s)), Some(e)) if s != e => {
            return Err(Problem::bad(
                "id mismatch",
                format!("the body names entity \"{s}\" but the URL names \"{e}\""),
            ));
        }
        (Some(Value::String(s)), _) => s.clone(),
        (None, Some(e)) => e.to_string(),
        (Some(other), _) => {
            return Err(Problem::bad(
                "invalid entity id",
                format!("id must be text, got {}", json_kind(other)),
            ));
        }
        (None, None) => {
            return Err(Problem::bad(
                "entity without id",
                "every entity needs an \"id\" (e.g. urn:ngsi-ld:TrafficFlowObserved:seg-12)",
            ));
        }
    };
    check_entity_id(&id)?;
    let mut inc = Incoming {
        id,
        attrs: Vec::with_capacity(obj.len()),
        observed_at: None,
        unknown: Vec::new(),
    };
    for (key, value) in obj {
        match key.as_str() {
            "id" | "@id" | "@context" | "createdAt" | "modifiedAt" | "scope" => continue,
            "type" | "@type" => {
                let t = value.as_str().unwrap_or_default();
                if t != schema.entity_type {
                    return Err(Problem::bad(
                        "wrong entity type",
                        format!(
                            "entity {} has type {}, expected {}",
                            inc.id, value, schema.entity_type
                        ),
                    ));
                }
                continue;
            }
            _ => {}
        }
        let Some(c) = schema.column_of(key).filter(|c| *c != schema.id_col) else {
            inc.unknown.push((
                key.clone(),
                format!(
                    "stream {} does not record attribute \"{key}\"; it records: {}",
                    schema.stream.sql_name(),
                    schema.attr_names()
                ),
            ));
            continue;
        };
        let col = &schema.cols[c];
        let (kind, raw, observed) = match value {
            Value::Object(o)
                if matches!(
                    o.get("type").and_then(Value::as_str),
                    Some("Property" | "Relationship" | "GeoProperty")
                ) =>
            {
                let kind = match o["type"].as_str() {
                    Some("Relationship") => AttrKind::Relationship,
                    Some("GeoProperty") => AttrKind::GeoProperty,
                    _ => AttrKind::Property,
                };
                let member = if kind == AttrKind::Relationship {
                    "object"
                } else {
                    "value"
                };
                let raw = o.get(member).ok_or_else(|| {
                    Problem::bad(
                        "attribute without value",
                        format!("{key}: a {} needs \"{member}\"", kind.word()),
                    )
                })?;
                let observed = match o.get("observedAt") {
                    None => None,
                    Some(t) => Some(t.as_str().and_then(parse_timestamp_us).ok_or_else(|| {
                        Problem::bad(
                            "invalid observedAt",
                            format!("{key}.observedAt: {t} is not a DateTime"),
                        )
                    })?),
                };
                (Some(kind), raw, observed)
            }
            other => (None, other, None),
        };
        if let Some(kind) = kind
            && kind != col.kind
        {
            return Err(Problem::bad(
                "wrong attribute type",
                format!(
                    "{key} is recorded as a {}, not a {}",
                    col.kind.word(),
                    kind.word()
                ),
            ));
        }
        let val = to_val(col, raw).map_err(|e| Problem::bad("invalid attribute value", e))?;
        if c == schema.time_col && val == Val::Null {
            return Err(Problem::bad(
                "invalid attribute value",
                format!("{key}: the event-time attribute cannot be null"),
            ));
        }
        if let Some(t) = observed {
            inc.observed_at = Some(inc.observed_at.map_or(t, |o| o.max(t)));
        }
        inc.attrs.push((c, val));
    }
    Ok(inc)
}

/// The state after applying `inc` to `prev` (`None` for a new entity): with `replace`, the
/// attributes not sent are cleared. The event time is set as the module says.
pub fn merge(
    schema: &EntitySchema,
    prev: Option<&Row>,
    inc: &Incoming,
    replace: bool,
    now_us: i64,
) -> Row {
    let mut row: Row = match prev {
        Some(p) if !replace => p.clone(),
        _ => vec![Val::Null; schema.cols.len()].into_boxed_slice(),
    };
    row[schema.id_col] = Val::Text(inc.id.as_str().into());
    let mut time_sent = false;
    for (c, v) in &inc.attrs {
        row[*c] = v.clone();
        time_sent |= *c == schema.time_col;
    }
    if !time_sent {
        row[schema.time_col] = Val::Ts(inc.observed_at.unwrap_or(now_us));
    }
    row
}

/// Rows as a batch of the stream's events.
pub fn rows_to_batch(schema: &EntitySchema, rows: &[&Row]) -> Result<RecordBatch, Error> {
    let n = rows.len();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.cols.len());
    for (c, col) in schema.cols.iter().enumerate() {
        let values = rows.iter().map(|r| &r[c]);
        let a: ArrayRef = match col.column.column_type {
            ColumnType::Text => {
                let mut b = StringBuilder::with_capacity(n, n * 16);
                for v in values {
                    match v {
                        Val::Text(s) => b.append_value(s),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Int => {
                let mut b = Int64Builder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Val::Int(i) = v { Some(*i) } else { None })
                });
                Arc::new(b.finish())
            }
            ColumnType::Float => {
                let mut b = Float64Builder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Val::Float(f) = v {
                        Some(*f)
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Bool => {
                let mut b = BooleanBuilder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Val::Bool(x) = v { Some(*x) } else { None })
                });
                Arc::new(b.finish())
            }
            ColumnType::Date => {
                let mut b = Date32Builder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Val::Date(d) = v { Some(*d) } else { None })
                });
                Arc::new(b.finish())
            }
            ColumnType::Timestamp => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
                values.for_each(|v| {
                    b.append_option(if let Val::Ts(t) = v { Some(*t) } else { None })
                });
                Arc::new(b.finish())
            }
        };
        arrays.push(a);
    }
    RecordBatch::try_new(schema.arrow.clone(), arrays)
        .map_err(|e| Error::internal(format!("entity batch: {e}")))
}

/// The rows of a batch of the stream's events (columns matched by name).
pub fn batch_to_rows(schema: &EntitySchema, batch: &RecordBatch) -> Result<Vec<Row>, Error> {
    let n = batch.num_rows();
    let mut rows: Vec<Vec<Val>> = (0..n)
        .map(|_| Vec::with_capacity(schema.cols.len()))
        .collect();
    for col in &schema.cols {
        let name = &col.column.name;
        let a = batch
            .column_by_name(name)
            .ok_or_else(|| Error::internal(format!("entity batch without column {name}")))?;
        let mismatch = || Error::internal(format!("entity batch: column {name} has another type"));
        for (i, row) in rows.iter_mut().enumerate() {
            let v = if a.is_null(i) {
                Val::Null
            } else {
                match col.column.column_type {
                    ColumnType::Text => Val::Text(
                        a.as_string_opt::<i32>()
                            .ok_or_else(mismatch)?
                            .value(i)
                            .into(),
                    ),
                    ColumnType::Int => Val::Int(
                        a.as_primitive_opt::<Int64Type>()
                            .ok_or_else(mismatch)?
                            .value(i),
                    ),
                    ColumnType::Float => Val::Float(
                        a.as_primitive_opt::<Float64Type>()
                            .ok_or_else(mismatch)?
                            .value(i),
                    ),
                    ColumnType::Bool => {
                        Val::Bool(a.as_boolean_opt().ok_or_else(mismatch)?.value(i))
                    }
                    ColumnType::Date => Val::Date(
                        a.as_primitive_opt::<Date32Type>()
                            .ok_or_else(mismatch)?
                            .value(i),
                    ),
                    ColumnType::Timestamp => Val::Ts(
                        a.as_primitive_opt::<TimestampMicrosecondType>()
                            .ok_or_else(mismatch)?
                            .value(i),
                    ),
                }
            };
            row.push(v);
        }
    }
    Ok(rows.into_iter().map(Vec::into_boxed_slice).collect())
}

/// What a reader may see of each column: whole, masked (text of a detected kind), or nothing.
#[derive(Debug, Clone)]
pub struct View {
    shown: Vec<Option<bool>>,
}

impl View {
    /// Everything, unmasked (the stream's own department).
    pub fn whole(schema: &EntitySchema) -> View {
        View {
            shown: vec![Some(false); schema.cols.len()],
        }
    }

    /// What `grant` lets its holder see, with the classes of the entity table's columns.
    pub fn granted(schema: &EntitySchema, table: &[Column], grant: &Grant) -> View {
        let shown = schema
            .cols
            .iter()
            .map(|c| {
                let name = &c.column.name;
                if !grant.columns.contains(name) {
                    return None;
                }
                let class = table
                    .iter()
                    .find(|t| &t.name == name)
                    .map_or(ColumnClass::Sensitive, |t| t.class);
                Some(class >= ColumnClass::Personal && !grant.is_unmasked(name))
            })
            .collect();
        View { shown }
    }

    /// Whether a column is seen at all.
    pub fn sees(&self, c: usize) -> bool {
        self.shown[c].is_some()
    }

    /// Whether column `c` is shown unmasked.
    pub fn sees_clear(&self, c: usize) -> bool {
        self.shown[c] == Some(false)
    }
}

pub(crate) fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

fn date_string(d: i32) -> String {
    chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163)
        .map(|d| d.to_string())
        .unwrap_or_default()
}

/// Renders an entity. `attrs` limits the attributes (by column); `key_values` gives the
/// simplified form. Values the view masks are masked; columns it hides are left out.
pub fn render(
    schema: &EntitySchema,
    table: &[Column],
    row: &Row,
    attrs: Option<&[usize]>,
    key_values: bool,
    view: &View,
) -> Value {
    let mut out = Map::new();
    if let Val::Text(id) = &row[schema.id_col] {
        out.insert("id".into(), Value::String(id.to_string()));
    }
    out.insert("type".into(), Value::String(schema.entity_type.clone()));
    let mut buf = String::new();
    for (c, col) in schema.cols.iter().enumerate() {
        if c == schema.id_col || attrs.is_some_and(|a| !a.contains(&c)) {
            continue;
        }
        let Some(masked) = view.shown[c] else {
            continue;
        };
        let v = &row[c];
        if *v == Val::Null {
            continue;
        }
        let value = if masked {
            match v {
                Val::Text(s) => {
                    let detected = table
                        .iter()
                        .find(|t| t.name == col.column.name)
                        .and_then(|t| t.detected);
                    yunqi_types::mask::by_kind_into(detected, s, &mut buf);
                    Value::String(buf.clone())
                }
                // Masked values of other types are withheld whole.
                _ => continue,
            }
        } else {
            match v {
                Val::Null => continue,
                Val::Int(i) => Value::from(*i),
                Val::Float(f) => Value::from(*f),
                Val::Bool(b) => Value::Bool(*b),
                Val::Text(s) if col.kind == AttrKind::GeoProperty => {
                    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
                }
                Val::Text(s) => Value::String(s.to_string()),
                Val::Date(d) if key_values => Value::String(date_string(*d)),
                Val::Ts(t) if key_values => Value::String(rfc3339(*t)),
                Val::Date(d) => serde_json::json!({"@type": "Date", "@value": date_string(*d)}),
                Val::Ts(t) => serde_json::json!({"@type": "DateTime", "@value": rfc3339(*t)}),
            }
        };
        let rendered = if key_values {
            value
        } else {
            let member = if col.kind == AttrKind::Relationship {
                "object"
            } else {
                "value"
            };
            let mut a = Map::new();
            a.insert("type".into(), Value::String(col.kind.word().into()));
            a.insert(member.into(), value);
            Value::Object(a)
        };
        out.insert(col.attr.clone(), rendered);
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> EntitySchema {
        let m = crate::plan::parse_create_stream(
            "CREATE STREAM traffic.flow (id TEXT, date_observed TIMESTAMP, intensity INT, \
             average_vehicle_speed DOUBLE, district TEXT, ref_road_segment TEXT, location TEXT, \
             congested BOOLEAN) WITH (event_time = 'date_observed', ngsi_type = 'TrafficFlowObserved')",
            "steward",
            chrono::Utc::now(),
        )
        .unwrap();
        EntitySchema::new(&m).unwrap()
    }

    #[test]
    fn names_map_both_ways() {
        assert_eq!(snake("averageVehicleSpeed"), "average_vehicle_speed");
        assert_eq!(snake("refRoadSegment"), "ref_road_segment");
        assert_eq!(snake("speed"), "speed");
        assert_eq!(snake("NO2"), "no2");
        assert_eq!(camel("average_vehicle_speed"), "averageVehicleSpeed");
        assert_eq!(camel("id"), "id");
        let s = schema();
        assert_eq!(s.column_of("averageVehicleSpeed"), Some(3));
        assert_eq!(s.column_of("average_vehicle_speed"), Some(3));
        assert_eq!(s.cols[5].kind, AttrKind::Relationship);
        assert_eq!(s.cols[6].kind, AttrKind::GeoProperty);
        assert_eq!(s.cols[7].kind, AttrKind::Property);
    }

    #[test]
    fn normalized_and_key_values_read_the_same() {
        let s = schema();
        let normalized = serde_json::json!({
            "id": "urn:ngsi-ld:TrafficFlowObserved:seg-1",
            "type": "TrafficFlowObserved",
            "@context": "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld",
            "intensity": {"type": "Property", "value": 12, "observedAt": "2026-11-26T08:00:05Z"},
            "averageVehicleSpeed": {"type": "Property", "value": 41.5},
            "refRoadSegment": {"type": "Relationship", "object": "urn:ngsi-ld:RoadSegment:1"},
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [120.1, 30.2]}}
        });
        let kv = serde_json::json!({
            "id": "urn:ngsi-ld:TrafficFlowObserved:seg-1",
            "type": "TrafficFlowObserved",
            "intensity": 12,
            "averageVehicleSpeed": 41.5,
            "refRoadSegment": "urn:ngsi-ld:RoadSegment:1",
            "location": {"type": "Point", "coordinates": [120.1, 30.2]},
            "dateObserved": "2026-11-26T08:00:05Z"
        });
        let a = parse_entity(&s, &normalized, None).unwrap();
        let b = parse_entity(&s, &kv, None).unwrap();
        let ra = merge(&s, None, &a, false, 0);
        let rb = merge(&s, None, &b, false, 0);
        assert_eq!(ra, rb);
        assert_eq!(
            ra[1],
            Val::Ts(parse_timestamp_us("2026-11-26T08:00:05Z").unwrap())
        );
        // Rendered back, normalized, it reads as it came in.
        let back = render(&s, &s.stream.columns, &ra, None, false, &View::whole(&s));
        assert_eq!(back["intensity"]["value"], 12);
        assert_eq!(
            back["refRoadSegment"]["object"],
            "urn:ngsi-ld:RoadSegment:1"
        );
        assert_eq!(back["location"]["value"]["coordinates"][0], 120.1);
        assert_eq!(
            back["dateObserved"]["value"]["@value"],
            "2026-11-26T08:00:05Z"
        );
        let kv_back = render(&s, &s.stream.columns, &ra, None, true, &View::whole(&s));
        assert_eq!(kv_back["averageVehicleSpeed"], 41.5);
        assert!(
            kv_back.get("congested").is_none(),
            "unset attributes are left out"
        );
        // Through a batch and back.
        let batch = rows_to_batch(&s, &[&ra]).unwrap();
        assert_eq!(batch_to_rows(&s, &batch).unwrap(), vec![ra]);
    }

    #[test]
    fn merge_keeps_or_replaces() {
        let s = schema();
        let first = parse_entity(
            &s,
            &serde_json::json!({"id": "urn:x:1", "intensity": 3, "district": "西湖"}),
            None,
        )
        .unwrap();
        let row = merge(&s, None, &first, false, 77);
        assert_eq!(
            row[1],
            Val::Ts(77),
            "arrival time when nothing says otherwise"
        );
        let patch =
            parse_entity(&s, &serde_json::json!({"intensity": 4}), Some("urn:x:1")).unwrap();
        let merged = merge(&s, Some(&row), &patch, false, 99);
        assert_eq!(merged[2], Val::Int(4));
        assert_eq!(merged[4], Val::Text("西湖".into()));
        let replaced = merge(&s, Some(&row), &patch, true, 99);
        assert_eq!(replaced[4], Val::Null);
    }

    #[test]
    fn bad_entities_say_why() {
        let s = schema();
        let cases = [
            (
                serde_json::json!({"type": "TrafficFlowObserved"}),
                "entity without id",
            ),
            (serde_json::json!({"id": "no scheme"}), "invalid entity id"),
            (
                serde_json::json!({"id": "urn:x:1", "type": "Other"}),
                "wrong entity type",
            ),
            (
                serde_json::json!({"id": "urn:x:1", "intensity": "many"}),
                "invalid attribute value",
            ),
            (
                serde_json::json!({"id": "urn:x:1", "intensity": 1.5}),
                "invalid attribute value",
            ),
            (
                serde_json::json!({"id": "urn:x:1", "refRoadSegment": {"type": "Property", "value": "x"}}),
                "wrong attribute type",
            ),
            (
                serde_json::json!({"id": "urn:x:1", "intensity": {"type": "Property"}}),
                "attribute without value",
            ),
            (
                serde_json::json!({"id": "urn:x:1", "dateObserved": null}),
                "invalid attribute value",
            ),
            (serde_json::json!([1]), "not an entity"),
        ];
        for (v, title) in cases {
            let e = parse_entity(&s, &v, None).unwrap_err();
            assert_eq!(e.title, title, "{v}: {e:?}");
        }
        let inc = parse_entity(
            &s,
            &serde_json::json!({"id": "urn:x:1", "colour": "red"}),
            None,
        )
        .unwrap();
        assert_eq!(inc.unknown.len(), 1);
        assert!(
            inc.unknown[0].1.contains("averageVehicleSpeed"),
            "{:?}",
            inc.unknown
        );
    }
}
