//! Sense, the city brain: continuous SQL views over event streams.
//!
//! - [`plan`]: `CREATE STREAM` and `CREATE CONTINUOUS VIEW` from SQL to a [`plan::ViewPlan`],
//!   with errors that name what is not supported;
//! - [`engine`]: yunqi's incremental engine — windows in event time, the finest grouping set
//!   updated per event, coarser levels merged from it at window close, late events counted;
//! - [`ingest`]: NDJSON and CSV events decoded to the stream's columns, bad events rejected
//!   one by one;
//! - [`runtime`]: events in (audited, durable), one runner per view (`runner.rs`: log →
//!   engine → the view's dataset, live feed, checkpoint), exactly once across crashes; on a
//!   cluster each shared view runs on the node holding its lease ([`cluster`]);
//! - [`ngsi`], [`q`], [`entities`]: NGSI-LD entities on a stream — attributes mapped to
//!   columns, the `q` query language, the latest state per entity (written through the log,
//!   snapshotted as the stream's entity table);
//! - [`subscriptions`]: NGSI-LD subscriptions, matched in the entity writer and delivered
//!   over HTTP by one task per subscription (`notify`);
//! - [`hll`]: the mergeable approximate distinct count;
//! - [`keys`]: group keys to dense group numbers.
#![deny(missing_docs)]

pub mod cluster;
pub mod dedup;
pub mod engine;
pub mod entities;
pub mod geo;
pub mod hll;
pub mod ingest;
pub mod keys;
pub mod ngsi;
mod notify;
pub mod plan;
pub mod q;
mod runner;
pub mod runtime;
pub mod subscriptions;
pub mod validate;

pub use engine::{Closed, Engine, EngineStats, Late};
pub use entities::{EntityOutcome, EntityQuery, WriteMode};
pub use plan::{DdlKind, ViewPlan, ddl_kind, parse_create_stream};
pub use runtime::{AppendReport, DdlOutcome, EventFormat, Sense, ViewStatus};
