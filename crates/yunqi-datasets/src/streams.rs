//! Stream definitions: the schema, event-time column and watermark delay a steward declares
//! for a stream of events (`CREATE STREAM traffic.detections (…) WITH (…)`). The events
//! themselves are in the stream log; this is the catalog entry, one JSON file per stream,
//! replaced atomically.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use yunqi_types::{Error, suggest};

use crate::schema::{Column, ColumnType};

/// Version of the stream manifest format.
pub const STREAM_FORMAT: u32 = 1;

/// A declared stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamManifest {
    /// Format version.
    pub format: u32,
    /// Owning department.
    pub department: String,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// The events' columns, with their classes.
    pub columns: Vec<Column>,
    /// The event-time column (a timestamp column).
    pub event_time: String,
    /// How long after an event time the stream may still deliver events of that time: the
    /// watermark trails the largest event time seen by this much.
    pub watermark_ms: u64,
    /// Events older than this (by arrival) are removed from the log; `None` keeps them.
    #[serde(default)]
    pub retention_secs: Option<u64>,
    /// The log is trimmed, oldest first, to this size; `None` for no limit.
    #[serde(default)]
    pub retention_bytes: Option<u64>,
    /// The NGSI-LD entity type whose entities this stream records (one event per change,
    /// holding the entity's whole state); `None` for a plain stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ngsi_type: Option<String>,
    /// When it was declared.
    pub created_at: DateTime<Utc>,
    /// Who declared it.
    pub created_by: String,
}

impl StreamManifest {
    /// `department.name`.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", self.department, self.name)
    }

    /// The Arrow schema of its events (every column nullable but the event time).
    pub fn arrow_schema(&self) -> SchemaRef {
        std::sync::Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.column_type.arrow(), c.name != self.event_time))
                .collect::<Vec<_>>(),
        ))
    }

    /// Position of a column.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Checks the declaration: names, an event-time column of type timestamp, no column twice.
    pub fn check(&self) -> Result<(), Error> {
        if self.columns.is_empty() {
            return Err(Error::invalid(format!("stream {} has no columns", self.sql_name()))
                .hint("declare them: CREATE STREAM d.s (plate TEXT, ts TIMESTAMP) WITH (event_time = 'ts')"));
        }
        for (i, c) in self.columns.iter().enumerate() {
            yunqi_types::Name::parse("column", &c.name)?;
            if self.columns[..i].iter().any(|o| o.name == c.name) {
                return Err(
                    Error::invalid(format!("column \"{}\" is declared twice", c.name))
                        .hint("give each column its own name"),
                );
            }
        }
        match self.columns.iter().find(|c| c.name == self.event_time) {
            None => {
                let e = Error::invalid(format!(
                    "event_time names \"{}\", which is not a column of {}",
                    self.event_time,
                    self.sql_name()
                ));
                Err(
                    match suggest::did_you_mean(
                        &self.event_time,
                        self.columns.iter().map(|c| c.name.as_str()),
                    ) {
                        Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                        None => e.hint("name a TIMESTAMP column: WITH (event_time = 'ts')"),
                    },
                )
            }
            Some(c) if c.column_type != ColumnType::Timestamp => Err(Error::invalid(format!(
                "event_time column \"{}\" is {:?}, not a timestamp",
                c.name, c.column_type
            ))
            .hint("declare the event-time column as TIMESTAMP")),
            Some(_) => Ok(()),
        }?;
        if let Some(t) = &self.ngsi_type {
            check_ngsi_type(t)?;
            match self.columns.iter().find(|c| c.name == "id") {
                Some(c) if c.column_type == ColumnType::Text => {}
                _ => {
                    return Err(Error::invalid(format!(
                        "stream {} records NGSI-LD entities but has no TEXT column \"id\"",
                        self.sql_name()
                    ))
                    .hint("add the column: CREATE STREAM d.s (id TEXT, ...)"));
                }
            }
        }
        Ok(())
    }

    /// The name of the dataset holding the latest state of each entity of an NGSI-LD stream.
    pub fn entities_table(&self) -> Option<String> {
        self.ngsi_type
            .as_ref()
            .map(|_| format!("{}_latest", self.name))
    }
}

/// Longest NGSI-LD entity type name.
pub const NGSI_TYPE_BYTES_MAX: usize = 256;

/// Checks an NGSI-LD entity type name: 1 to [`NGSI_TYPE_BYTES_MAX`] characters, letters,
/// digits and `_ - . : / #` (a short name such as `TrafficFlowObserved` or an expanded URI).
pub fn check_ngsi_type(t: &str) -> Result<(), Error> {
    let ok = !t.is_empty()
        && t.len() <= NGSI_TYPE_BYTES_MAX
        && t.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/' | '#'));
    if ok {
        Ok(())
    } else {
        Err(
            Error::invalid(format!("\"{t}\" is not an NGSI-LD entity type"))
                .hint("name it like TrafficFlowObserved: letters and digits, or a URI"),
        )
    }
}

/// The stream definitions of a data directory.
pub struct StreamCatalog {
    dir: PathBuf,
    streams: RwLock<BTreeMap<String, StreamManifest>>,
}

fn io(e: std::io::Error, what: &str) -> Error {
    Error::internal(format!("stream catalog: {what}: {e}")).hint("check the data directory's disk")
}

impl StreamCatalog {
    /// Opens (creating) the catalog in `dir` and reads every definition.
    pub fn open(dir: &Path) -> Result<StreamCatalog, Error> {
        fs::create_dir_all(dir).map_err(|e| io(e, "create directory"))?;
        let mut streams = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| io(e, "list"))? {
            let path = entry.map_err(|e| io(e, "list"))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(|e| io(e, "read a definition"))?;
            let m: StreamManifest = serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(format!(
                    "stream definition {} is unreadable: {e}",
                    path.display()
                ))
            })?;
            streams.insert(m.sql_name(), m);
        }
        Ok(StreamCatalog {
            dir: dir.to_path_buf(),
            streams: RwLock::new(streams),
        })
    }

    /// Stores a new stream's definition; refuses one that exists.
    pub fn create(&self, m: StreamManifest) -> Result<StreamManifest, Error> {
        m.check()?;
        let mut streams = self.streams.write().expect("streams lock");
        if streams.contains_key(&m.sql_name()) {
            return Err(Error::already_exists("stream", &m.sql_name())
                .hint("pick another name, or send events to the existing stream"));
        }
        let path = self.dir.join(format!("{}.json", m.sql_name()));
        let tmp = self.dir.join(format!(".{}.json.tmp", m.sql_name()));
        let bytes = serde_json::to_vec_pretty(&m).map_err(|e| Error::internal(e.to_string()))?;
        fs::write(&tmp, &bytes).map_err(|e| io(e, "write"))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(e, "sync"))?;
        fs::rename(&tmp, &path).map_err(|e| io(e, "rename"))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(e, "sync directory"))?;
        streams.insert(m.sql_name(), m.clone());
        Ok(m)
    }

    /// A stream's definition by `department.name`.
    pub fn get(&self, sql_name: &str) -> Result<StreamManifest, Error> {
        let streams = self.streams.read().expect("streams lock");
        streams
            .get(sql_name)
            .cloned()
            .ok_or_else(|| not_found(sql_name, streams.keys().map(String::as_str)))
    }

    /// Every stream, by name.
    pub fn list(&self) -> Vec<StreamManifest> {
        self.streams
            .read()
            .expect("streams lock")
            .values()
            .cloned()
            .collect()
    }
}

/// The error for a stream that is not declared, suggesting a near name among `known`.
pub fn not_found<'a>(sql_name: &str, known: impl Iterator<Item = &'a str>) -> Error {
    let e = Error::not_found("stream", sql_name);
    match suggest::did_you_mean(sql_name, known) {
        Some(s) => e.hint(format!("did you mean \"{s}\"?")),
        None => e.hint("declare it with CREATE STREAM, or list streams with `yunqi stream list`"),
    }
}

/// Where streams are declared: [`StreamCatalog`] in the data directory, or the cluster's shared
/// catalog (`yunqi-store-pg`). Declarations are never changed or removed once made.
pub trait StreamDeclarations: Send + Sync + 'static {
    /// Stores a new stream's definition; refuses one that exists.
    fn create(&self, m: StreamManifest) -> Result<StreamManifest, Error>;
    /// A stream's definition by `department.name`.
    fn get(&self, sql_name: &str) -> Result<StreamManifest, Error>;
    /// Every stream, by name.
    fn list(&self) -> Vec<StreamManifest>;
}

impl StreamDeclarations for StreamCatalog {
    fn create(&self, m: StreamManifest) -> Result<StreamManifest, Error> {
        StreamCatalog::create(self, m)
    }
    fn get(&self, sql_name: &str) -> Result<StreamManifest, Error> {
        StreamCatalog::get(self, sql_name)
    }
    fn list(&self) -> Vec<StreamManifest> {
        StreamCatalog::list(self)
    }
}
