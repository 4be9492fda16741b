//! Serve on a cluster: every service decided by one node at a time, any node answering.
//!
//! A service's definitions live in the cluster's store ([`DefinitionStore`]), its decision log
//! on the shared stream log, and its decider on the node that holds the service's lease
//! ([`Leases`], `serve:<department>.<service>`). [`Serve::route`] tells a node's API where a
//! request for a service goes: here (this node holds the lease, or takes it now because nobody
//! holds it in force: its decider replays the log first), or the holder's address, to which the
//! API forwards the request as it came.
//!
//! The lease is renewed every [`RENEW_EVERY`]; a node that cannot renew in time stops deciding
//! the service, and a node that is gone loses it after [`LEASE_TTL`], when the next request for
//! the service, on any node, takes it over. The lease alone would not make two deciders
//! impossible (a paused node may wake up still believing it holds it): the decision log is
//! appended to with the end the decider read or wrote last
//! ([`yunqi_stream::StreamLog::append_expecting`]), so that once a successor has appended, the
//! deposed decider's appends fail and nothing it decided after that is answered or counted.

use std::sync::Arc;
use std::time::Duration;

pub use yunqi_store::Route;
use yunqi_store::{DefinitionStore, HeldLeases, Leases, StoredDefinition};
use yunqi_types::Error;

use crate::definition;
use crate::runtime::Serve;

/// How long a service's lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often a node renews the leases it holds (and looks for newer definitions of its
/// services applied on other nodes).
pub const RENEW_EVERY: Duration = Duration::from_millis(1000);

/// How long a node trusts what it learnt of another node's lease before asking again.
const HOLDER_FRESH: Duration = Duration::from_millis(1000);

/// The cluster's stores a server's services use.
pub struct ServeCluster {
    /// The service leases this node holds (`serve:<department>.<service>`).
    pub(crate) leases: HeldLeases,
    pub(crate) definitions: Arc<dyn DefinitionStore>,
}

impl ServeCluster {
    /// Services on `leases` and `definitions` (one cluster's stores).
    pub fn new(leases: Arc<dyn Leases>, definitions: Arc<dyn DefinitionStore>) -> ServeCluster {
        ServeCluster {
            leases: HeldLeases::new(leases, "serve", LEASE_TTL),
            definitions,
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        self.leases.node()
    }

    pub(crate) fn holds(&self, service: &str) -> bool {
        self.leases.holds(service)
    }

    /// The latest stored definition of a service, parsed.
    pub(crate) fn definition(
        &self,
        service: &str,
    ) -> Result<Option<(definition::Service, u32)>, Error> {
        self.definitions
            .latest_of(service)?
            .map(|d| parse(&d).map(|s| (s, d.version)))
            .transpose()
    }
}

pub(crate) fn parse(d: &StoredDefinition) -> Result<definition::Service, Error> {
    definition::parse(&d.text).map_err(|e| {
        e.detail(format!(
            "version {} of {} in the cluster's store no longer reads",
            d.version, d.service
        ))
    })
}

impl Serve {
    /// Where a request for `service` goes: here, or the node that decides it. On a cluster a
    /// service nobody decides in force is taken here (its decider replays its log). Blocking
    /// (asks the cluster's store): call from a blocking context.
    pub fn route(&self, service: &str) -> Result<Route, Error> {
        let Some(c) = self.cluster() else {
            return Ok(Route::Here);
        };
        if self.decides(service) {
            return Ok(Route::Here);
        }
        if let Some(h) = c.leases.fresh_holder(service, HOLDER_FRESH)
            && let Some(url) = h.base_url()
        {
            return Ok(Route::At { node: h.node, url });
        }
        let _one = c.leases.taking();
        if self.decides(service) {
            return Ok(Route::Here);
        }
        let Some((definition, version)) = c.definition(service)? else {
            return Ok(Route::Here);
        };
        match c.leases.acquire(service)? {
            Ok(epoch) => {
                if let Err(e) = self.take_over(Arc::new(definition), version) {
                    c.leases.release(service);
                    return Err(e);
                }
                tracing::info!(service, epoch, "this node decides the service now");
                Ok(Route::Here)
            }
            Err(h) if h.live => {
                let Some(url) = h.base_url() else {
                    tracing::warn!(service, node = %h.node, "the deciding node is not registered");
                    return Err(
                        Error::unavailable(format!("service {service} is changing nodes"))
                            .hint("retry shortly"),
                    );
                };
                Ok(Route::At { node: h.node, url })
            }
            Err(_) => Err(
                Error::unavailable(format!("service {service} is changing nodes")).hint("retry"),
            ),
        }
    }

    /// Whether this node decides `service` now: it holds the lease in force and its decider
    /// is deciding. A decider that stopped (fenced off by a successor) is let go here.
    fn decides(&self, service: &str) -> bool {
        let Some(c) = self.cluster() else {
            return true;
        };
        if !c.holds(service) {
            return false;
        }
        if self.decider_broken(service) {
            self.let_go(service);
            return false;
        }
        true
    }

    /// Stops deciding `service` here and gives its lease up.
    pub(crate) fn let_go(&self, service: &str) {
        let Some(c) = self.cluster() else { return };
        self.stop_decider(service);
        c.leases.release(service);
    }

    /// One pass of the renewing thread: every lease held renewed (a lease lost or not renewed
    /// in time lets the service go), and newer definitions applied on other nodes taken up.
    pub(crate) fn renew_once(&self) {
        let Some(c) = self.cluster() else { return };
        for service in c.leases.renew_all() {
            self.let_go(&service);
        }
        for service in c.leases.held() {
            if !c.holds(&service) {
                continue;
            }
            // A newer version applied on another node: parsed (and started) only then.
            let newer = match c.definitions.latest_of(&service) {
                Ok(Some(d)) if d.version > self.live_version(&service).unwrap_or(0) => d,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(service, error = %e.message, "definitions not read");
                    continue;
                }
            };
            let _one = c.leases.taking();
            if let Err(e) = parse(&newer).and_then(|d| self.take_over(Arc::new(d), newer.version)) {
                tracing::warn!(service, error = %e.message, "a newer definition could not start");
            }
        }
    }

    /// Gives every lease up (the server stopping, its deciders already stopped).
    pub(crate) fn release_all(&self) {
        if let Some(c) = self.cluster() {
            c.leases.release_all();
        }
    }
}

/// Starts the thread that renews a server's leases; it ends when the server is dropped.
pub(crate) fn start_renewing(serve: &Arc<Serve>) {
    let weak = Arc::downgrade(serve);
    let _ = std::thread::Builder::new()
        .name("serve leases".into())
        .spawn(move || {
            loop {
                std::thread::sleep(RENEW_EVERY);
                let Some(s) = weak.upgrade() else { return };
                if s.is_stopping() {
                    return;
                }
                s.renew_once();
            }
        });
}
