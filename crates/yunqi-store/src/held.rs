//! A node's side of the cluster's [`Leases`], for every kind of leased work (services'
//! deciders, continuous views' runners): the leases it holds, each with its epoch and the
//! instant it lapses by this node's clock; what it last learnt of other nodes' leases; taking,
//! renewing and giving them up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use yunqi_types::Error;

use crate::{LeaseHolder, Leases};

/// The leases of one kind of work a node holds; work is named (`department.service`), its
/// lease is `<kind>:<name>`.
pub struct HeldLeases {
    leases: Arc<dyn Leases>,
    kind: &'static str,
    ttl: Duration,
    /// Work → (epoch, in force until, by this node's clock).
    held: Mutex<HashMap<String, (u64, Instant)>>,
    /// Other nodes' leases as last read: work → (holder, when read).
    holders: Mutex<HashMap<String, (LeaseHolder, Instant)>>,
    /// Serialises taking leases, so that one node starts one piece of work once.
    taking: Mutex<()>,
}

impl HeldLeases {
    /// Leases `<kind>:<name>` on `leases`, each for `ttl` from its last renewal.
    pub fn new(leases: Arc<dyn Leases>, kind: &'static str, ttl: Duration) -> HeldLeases {
        HeldLeases {
            leases,
            kind,
            ttl,
            held: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            taking: Mutex::new(()),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        self.leases.node()
    }

    fn lease(&self, name: &str) -> String {
        format!("{}:{name}", self.kind)
    }

    /// Whether this node holds `name`'s lease in force, by its own clock.
    pub fn holds(&self, name: &str) -> bool {
        self.held
            .lock()
            .expect("held lock")
            .get(name)
            .is_some_and(|(_, until)| *until > Instant::now())
    }

    /// Another node holding `name`'s lease in force, as learnt less than `fresh` ago.
    pub fn fresh_holder(&self, name: &str, fresh: Duration) -> Option<LeaseHolder> {
        self.holders
            .lock()
            .expect("holders lock")
            .get(name)
            .filter(|(h, at)| h.live && at.elapsed() < fresh)
            .map(|(h, _)| h.clone())
    }

    /// Who holds `name`'s lease, asking the store.
    pub fn holder(&self, name: &str) -> Result<Option<LeaseHolder>, Error> {
        self.leases.holder(&self.lease(name))
    }

    /// Held while taking leases and starting their work.
    pub fn taking(&self) -> MutexGuard<'_, ()> {
        self.taking.lock().expect("taking lock")
    }

    /// Takes `name`'s lease if nobody holds it in force: `Ok(epoch)`, now held here (the lease
    /// counted from before it was asked for, by this node's clock); else `Err(holder)`,
    /// remembered. A lease released between the two statements of an acquisition is tried
    /// once more.
    pub fn acquire(&self, name: &str) -> Result<Result<u64, LeaseHolder>, Error> {
        let began = Instant::now();
        let mut taken = self.leases.acquire(&self.lease(name), self.ttl)?;
        if matches!(&taken, Err(h) if !h.live) {
            taken = self.leases.acquire(&self.lease(name), self.ttl)?;
        }
        match &taken {
            Ok(epoch) => {
                self.held
                    .lock()
                    .expect("held lock")
                    .insert(name.to_string(), (*epoch, began + self.ttl));
            }
            Err(h) => {
                self.holders
                    .lock()
                    .expect("holders lock")
                    .insert(name.to_string(), (h.clone(), Instant::now()));
            }
        }
        Ok(taken)
    }

    /// Forgets `name`'s lease here and gives it up (its work stopped).
    pub fn release(&self, name: &str) {
        if let Some((epoch, _)) = self.held.lock().expect("held lock").remove(name) {
            let _ = self.leases.release(&self.lease(name), epoch);
        }
    }

    /// Renews every lease held; answers the work whose lease was lost or not renewed in time
    /// (its work must stop, and [`HeldLeases::release`] be called).
    pub fn renew_all(&self) -> Vec<String> {
        let held: Vec<(String, u64, Instant)> = self
            .held
            .lock()
            .expect("held lock")
            .iter()
            .map(|(n, (e, u))| (n.clone(), *e, *u))
            .collect();
        let mut lost = Vec::new();
        for (name, epoch, until) in held {
            let began = Instant::now();
            match self.leases.renew(&self.lease(&name), epoch, self.ttl) {
                Ok(true) => {
                    if let Some(h) = self.held.lock().expect("held lock").get_mut(&name)
                        && h.0 == epoch
                    {
                        h.1 = began + self.ttl;
                    }
                }
                Ok(false) => {
                    tracing::warn!(lease = %self.lease(&name), epoch, "lease lost: this node stops its work");
                    lost.push(name);
                }
                Err(e) if Instant::now() >= until => {
                    tracing::warn!(lease = %self.lease(&name), error = %e.message, "lease not renewed in time");
                    lost.push(name);
                }
                Err(_) => {}
            }
        }
        lost
    }

    /// The work whose leases this node holds.
    pub fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .expect("held lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Gives every lease up (the node stopping, its work already stopped).
    pub fn release_all(&self) {
        let held: Vec<(String, u64)> = self
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(n, (e, _))| (n, e))
            .collect();
        for (name, epoch) in held {
            let _ = self.leases.release(&self.lease(&name), epoch);
        }
    }
}
