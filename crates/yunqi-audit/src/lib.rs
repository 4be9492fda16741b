//! The audit chain: an append-only, hash-chained record of every state change, access and
//! denial in yunqi.
//!
//! [`AuditLog`] is the narrow interface the rest of yunqi uses; [`AuditChain`] is the embedded
//! implementation (segment files in the data directory, group commit). Another implementation
//! (`yunqi-stream-nats` keeps each node's chain in NATS JetStream) only has to keep the same guarantees: dense
//! sequence numbers, each record holding the hash of the one before, and `append` returning only
//! once the record is durable.
#![deny(missing_docs)]

pub mod chain;
pub mod cluster;
pub mod format;
pub mod query;
pub mod verify;
pub mod witness;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use chain::{AuditChain, AuditStats, Receipt};
pub use format::{AuditRecord, Hash};
pub use query::{AuditPage, AuditQuery};
pub use verify::{Problem, VerifyReport, verify};
pub use witness::{Checkpoint, Target, WitnessConfig, WitnessReport, Witnesser, verify_witnessed};
use yunqi_types::{AuditEvent, Error};

/// A boxed future, for the object-safe [`AuditLog`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What yunqi needs of an audit log.
pub trait AuditLog: Send + Sync + 'static {
    /// Appends records, consecutive in the log; resolves to the receipt of the last when all
    /// are durable.
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<Receipt, Error>>;
    /// Reads a page of durable records. Blocking: call from a blocking context.
    fn query(&self, q: &AuditQuery) -> Result<AuditPage, Error>;
    /// The last durable record.
    fn durable_head(&self) -> Receipt;
    /// Counters for metrics.
    fn stats(&self) -> &AuditStats;
    /// Flushes and stops; later appends fail.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// The chains a reader of the whole log must query (`AuditQuery::node`): `[None]`, this
    /// log's one chain, unless the log keeps one chain per node of a cluster. Blocking.
    fn chains(&self) -> Result<Vec<Option<String>>, Error> {
        Ok(vec![None])
    }
}

impl AuditLog for AuditChain {
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<Receipt, Error>> {
        Box::pin(async move {
            if events.len() == 1 {
                let e = events.into_iter().next().expect("one event");
                AuditChain::append(self, e).await
            } else {
                self.append_many(events).await
            }
        })
    }
    fn query(&self, q: &AuditQuery) -> Result<AuditPage, Error> {
        if q.cursor.is_some() {
            return Err(Error::invalid(
                "this server is not a cluster node: `cursor` pages a cluster's merged audit",
            )
            .hint("page with `after` (ascending) or `before` (descending)"));
        }
        if let Some(node) = &q.node {
            return Err(Error::invalid(format!(
                "this server is not a cluster node: it has no chain of node {node:?}"
            ))
            .hint("leave out `node`: an embedded server has one audit chain"));
        }
        query::query(self.dir(), self.durable_head().seq, q)
    }
    fn durable_head(&self) -> Receipt {
        AuditChain::durable_head(self)
    }
    fn stats(&self) -> &AuditStats {
        AuditChain::stats(self)
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(AuditChain::shutdown(self))
    }
}

/// A shared audit log.
pub type SharedAuditLog = Arc<dyn AuditLog>;
