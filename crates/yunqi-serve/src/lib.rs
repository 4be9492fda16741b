//! Serve, the one-stop services pillar (一网通办): services declared once, decided by rules over
//! what the city already knows, with quotas no concurrency or crash can over-spend.
//!
//! Built so far (see `docs/design/2026-11-26-serve.md` for the whole):
//! - [`cluster`]: on a cluster, each service decided by the node holding its lease, its
//!   decision log fenced so that a deposed node's decider cannot append;
//! - [`calendar`]: quota periods (natural day, month, year) and permit validity windows in the
//!   city's time zone, checked against a holiday calendar with make-up working days;
//! - [`definition`]: service definitions (TOML), checked whole with every problem named by
//!   its line;
//! - [`document`]: signed documents — compact Ed25519 tokens anyone can verify, online or
//!   offline with the published key;
//! - [`ledger`]: quota counters and money lines, changed a round of decisions at a time against
//!   the published state, so that one writer can decide a round, make it durable, then publish;
//! - [`decider`]: one writer per service deciding applications in order — rules, quotas spent
//!   all or nothing, idempotency keys — each round audited and logged durably before it is
//!   answered, the log replayed at start;
//! - [`lookup`]: lookups answered from in-memory indexes kept as fresh as their datasets and
//!   grants, each use audited with its decision;
//! - [`runtime`]: the services of a server — definitions applied by stewards and kept by
//!   version, applications checked, looked up in SQL as the service's department, decided;
//! - [`rules`]: the rule language (typed expressions over inputs, lookups, quotas and live
//!   values, with errors that say where).
#![deny(missing_docs)]

pub mod calendar;
pub mod cluster;
pub mod decider;
pub mod definition;
pub mod document;
pub mod explain;
pub mod ledger;
pub mod lookup;
pub mod rules;
pub mod runtime;

pub use cluster::{Route, ServeCluster};
pub use runtime::{Applied, Serve, Verification};
