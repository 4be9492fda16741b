//! Dataset schemas and the manifest: the persisted description of a dataset and its versions
//! (format version 1, JSON, replaced atomically).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use yunqi_types::{ColumnClass, Detected, Error, Name};

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// UTF-8 text.
    Text,
    /// 64-bit integer.
    Int,
    /// 64-bit float.
    Float,
    /// true / false.
    Bool,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// A point in time (UTC, microseconds), RFC 3339.
    Timestamp,
}

impl ColumnType {
    /// The Arrow type.
    pub fn arrow(self) -> DataType {
        match self {
            ColumnType::Text => DataType::Utf8,
            ColumnType::Int => DataType::Int64,
            ColumnType::Float => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }

    /// Parses a type name (`text`, `int`, `float`, `bool`, `date`, `timestamp` and the common
    /// SQL spellings).
    pub fn parse(raw: &str) -> Result<ColumnType, Error> {
        Ok(match raw.trim().to_ascii_lowercase().as_str() {
            "text" | "string" | "varchar" | "utf8" => ColumnType::Text,
            "int" | "integer" | "bigint" | "int64" => ColumnType::Int,
            "float" | "double" | "real" | "float64" | "numeric" | "decimal" => ColumnType::Float,
            "bool" | "boolean" => ColumnType::Bool,
            "date" => ColumnType::Date,
            "timestamp" | "timestamptz" | "datetime" => ColumnType::Timestamp,
            other => {
                return Err(Error::invalid(format!("invalid column type \"{other}\""))
                    .hint("use text, int, float, bool, date or timestamp"));
            }
        })
    }
}

/// A column.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Column {
    /// SQL name, a lowercase identifier.
    pub name: String,
    /// The header it came from, when that was not a valid name (e.g. `姓名`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Type.
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    /// Class.
    pub class: ColumnClass,
    /// Whether a steward set the class (imports never change it then).
    #[serde(default)]
    pub class_declared: bool,
    /// What the detectors recognised, which also picks the mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected: Option<Detected>,
}

/// One version of a dataset: the complete list of its files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    /// Number, from 1.
    pub version: u64,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// Who made it.
    pub created_by: String,
    /// `replace` or `append`.
    pub mode: String,
    /// Data files, relative to the dataset directory.
    pub files: Vec<String>,
    /// Rows in this version.
    pub rows: u64,
    /// Bytes of its data files.
    pub bytes: u64,
    /// Rows the import that made it rejected (lenient imports).
    pub rejected: u64,
    /// File of the rejected rows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejects_file: Option<String>,
    /// For a continuous view's rows: the end of the last window this version holds
    /// (microseconds), so that a view resuming after a crash knows what it already wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through_us: Option<i64>,
}

/// What a continuous view (or its late table) computes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ViewSource {
    /// The `CREATE CONTINUOUS VIEW` statement.
    pub sql: String,
    /// The stream it reads, `department.stream`.
    pub stream: String,
    /// For a late table: the view whose late events it counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_table_of: Option<String>,
    /// For an entity table: the NGSI-LD stream whose latest state per entity it holds
    /// (`sql` is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities_of: Option<String>,
}

/// A dataset derived by a query: its lineage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Derivation {
    /// The query.
    pub sql: String,
    /// The datasets it read, `department.dataset`.
    pub sources: Vec<String>,
    /// The version it made.
    pub version: u64,
    /// Who ran it.
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// Everything known about a dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Owning department.
    pub department: String,
    /// Name within it.
    pub name: String,
    /// Description (searchable).
    #[serde(default)]
    pub description: String,
    /// Tags (searchable), e.g. `车辆`, `open-data`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Columns.
    pub columns: Vec<Column>,
    /// Versions, oldest first; version 0 (empty) is implied.
    pub versions: Vec<Version>,
    /// The column naming the person each row is about (a resident ID number): queries that
    /// return few rows record whose rows they returned, so citizens can see who read their
    /// data. Suggested at import when one column holds ID numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Whether a steward set `subject` (imports never change it then).
    #[serde(default)]
    pub subject_declared: bool,
    /// How the current version was derived by SQL from other datasets, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_from: Option<Derivation>,
    /// When the dataset was created.
    pub created_at: DateTime<Utc>,
    /// Set when the dataset is the result of a continuous view: its rows are written by the
    /// view, never imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<ViewSource>,
}

impl Manifest {
    /// `department.name`.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", self.department, self.name)
    }

    /// The current version, if any data was imported.
    pub fn current(&self) -> Option<&Version> {
        self.versions.last()
    }

    /// A version by number.
    pub fn version(&self, n: u64) -> Result<&Version, Error> {
        self.versions
            .iter()
            .find(|v| v.version == n)
            .ok_or_else(|| {
                Error::not_found("version", &format!("{} of dataset {}", n, self.sql_name())).hint(
                    format!(
                        "versions are 1 to {}",
                        self.versions.last().map_or(0, |v| v.version)
                    ),
                )
            })
    }

    /// The Arrow schema.
    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.column_type.arrow(), true))
                .collect::<Vec<_>>(),
        ))
    }

    /// The position of the column named exactly `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The column named `name` (or labelled so).
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns
            .iter()
            .find(|c| c.name == name || c.label.as_deref() == Some(name))
    }
}

/// A column name from a header: the header if it is a valid name, a name made from it if
/// one can be, else `c<position>` with the header kept as the label.
pub fn column_name(header: &str, position: usize) -> (String, Option<String>) {
    let trimmed = header.trim();
    if let Ok(n) = Name::parse("column", trimmed) {
        return (n.to_string(), None);
    }
    let made: String = trimmed
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect::<String>()
        .split('_')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("_");
    match Name::parse("column", &made) {
        Ok(n) if trimmed.is_ascii() => (n.to_string(), None),
        _ => (format!("c{}", position + 1), Some(trimmed.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_names_from_headers() {
        assert_eq!(column_name("plate", 0), ("plate".into(), None));
        assert_eq!(column_name("Owner Name", 1), ("owner_name".into(), None));
        assert_eq!(column_name("姓名", 2), ("c3".into(), Some("姓名".into())));
        assert_eq!(column_name("1st", 3), ("c4".into(), Some("1st".into())));
    }
}
