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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use yunqi_store::Route;
use yunqi_store::{DefinitionStore, LeaseHolder, Leases, StoredDefinition};
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
    pub(crate) leases: Arc<dyn Leases>,
    pub(crate) definitions: Arc<dyn DefinitionStore>,
    /// Leases this node holds: service → (epoch, in force until, by this node's clock).
    pub(crate) held: Mutex<HashMap<String, (u64, Instant)>>,
    /// Other nodes' leases as last read: service → (holder, when read).
    holders: Mutex<HashMap<String, (LeaseHolder, Instant)>>,
    /// Serialises taking leases, so that one node opens one decider per service.
    taking: Mutex<()>,
}

impl ServeCluster {
    /// Services on `leases` and `definitions` (one cluster's stores).
    pub fn new(leases: Arc<dyn Leases>, definitions: Arc<dyn DefinitionStore>) -> ServeCluster {
        ServeCluster {
            leases,
            definitions,
            held: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            taking: Mutex::new(()),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        self.leases.node()
    }

    pub(crate) fn holds(&self, service: &str) -> bool {
        self.held
            .lock()
            .expect("held lock")
            .get(service)
            .is_some_and(|(_, until)| *until > Instant::now())
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

pub(crate) fn lease_name(service: &str) -> String {
    format!("serve:{service}")
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
        if let Some((h, at)) = c.holders.lock().expect("holders lock").get(service)
            && at.elapsed() < HOLDER_FRESH
            && let Some(url) = h.base_url()
        {
            return Ok(Route::At {
                node: h.node.clone(),
                url,
            });
        }
        let _one = c.taking.lock().expect("taking lock");
        if self.decides(service) {
            return Ok(Route::Here);
        }
        let Some((definition, version)) = c.definition(service)? else {
            return Ok(Route::Here);
        };
        // The lease runs from before it was asked for, by this node's clock (conservative).
        let began = Instant::now();
        // A lease released between the two statements of `acquire` is tried once more.
        let mut taken = c.leases.acquire(&lease_name(service), LEASE_TTL)?;
        if matches!(&taken, Err(h) if !h.live) {
            taken = c.leases.acquire(&lease_name(service), LEASE_TTL)?;
        }
        match taken {
            Ok(epoch) => {
                c.held
                    .lock()
                    .expect("held lock")
                    .insert(service.to_string(), (epoch, began + LEASE_TTL));
                if let Err(e) = self.take_over(Arc::new(definition), version) {
                    c.held.lock().expect("held lock").remove(service);
                    let _ = c.leases.release(&lease_name(service), epoch);
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
                c.holders
                    .lock()
                    .expect("holders lock")
                    .insert(service.to_string(), (h.clone(), Instant::now()));
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
        if let Some((epoch, _)) = c.held.lock().expect("held lock").remove(service) {
            let _ = c.leases.release(&lease_name(service), epoch);
        }
    }

    /// One pass of the renewing thread: every lease held renewed (a lease lost or not renewed
    /// in time lets the service go), and newer definitions applied on other nodes taken up.
    pub(crate) fn renew_once(&self) {
        let Some(c) = self.cluster() else { return };
        let held: Vec<(String, u64, Instant)> = c
            .held
            .lock()
            .expect("held lock")
            .iter()
            .map(|(s, (e, u))| (s.clone(), *e, *u))
            .collect();
        for (service, epoch, until) in held {
            let began = Instant::now();
            match c.leases.renew(&lease_name(&service), epoch, LEASE_TTL) {
                Ok(true) => {
                    if let Some(h) = c.held.lock().expect("held lock").get_mut(&service)
                        && h.0 == epoch
                    {
                        h.1 = began + LEASE_TTL;
                    }
                }
                Ok(false) => {
                    tracing::warn!(service, epoch, "lease lost: this node stops deciding");
                    self.let_go(&service);
                    continue;
                }
                Err(e) if Instant::now() >= until => {
                    tracing::warn!(service, error = %e.message, "lease not renewed in time");
                    self.let_go(&service);
                    continue;
                }
                Err(_) => continue,
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
            let _one = c.taking.lock().expect("taking lock");
            if let Err(e) = parse(&newer).and_then(|d| self.take_over(Arc::new(d), newer.version)) {
                tracing::warn!(service, error = %e.message, "a newer definition could not start");
            }
        }
    }

    /// Gives every lease up (the server stopping, its deciders already stopped).
    pub(crate) fn release_all(&self) {
        let Some(c) = self.cluster() else { return };
        let held: Vec<(String, u64)> = c
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(s, (e, _))| (s, e))
            .collect();
        for (service, epoch) in held {
            let _ = c.leases.release(&lease_name(&service), epoch);
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
