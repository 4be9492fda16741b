//! Continuous views on a cluster. A view whose results are a shared dataset (streams in the
//! shared log, datasets in object storage: [`yunqi_governance::Governance::shared_views`]) is
//! run by one node at a time, the holder of its lease `view:<department>.<view>`; every node
//! reads its results, which are an ordinary shared dataset, and a request for its progress or
//! its live feed goes to the node that runs it ([`Sense::route_view`]).
//!
//! Every second each node renews the leases it holds (a lease lost, or not renewed within its
//! time to live by this node's clock, ends the runner here) and takes any shared view nobody
//! runs — a new view, or one whose node is gone — restoring its checkpoint from the object
//! store and reading the log on from there. The lease keeps two runners apart in the normal
//! course; should a paused node's runner outlive its lease, the dataset's compare-and-set and
//! its mark keep every window written once (see `runner.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use yunqi_store::{LeaseHolder, Leases, Route};
use yunqi_types::Error;

use crate::plan::ViewPlan;
use crate::runtime::Sense;

/// How long a view's lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often a node renews its view leases and looks for views nobody runs.
pub const KEEP_EVERY: Duration = Duration::from_millis(1000);

/// How long a node trusts what it learnt of another node's lease before asking again.
const HOLDER_FRESH: Duration = Duration::from_millis(1000);

fn lease_name(view: &str) -> String {
    format!("view:{view}")
}

/// The view leases of a node.
pub(crate) struct ViewLeases {
    leases: Arc<dyn Leases>,
    /// Leases this node holds: view → (epoch, in force until, by this node's clock).
    held: Mutex<HashMap<String, (u64, Instant)>>,
    /// Other nodes' leases as last read: view → (holder, when read).
    holders: Mutex<HashMap<String, (LeaseHolder, Instant)>>,
    /// Serialises taking leases, so that one node starts one runner per view.
    taking: Mutex<()>,
}

impl ViewLeases {
    pub(crate) fn new(leases: Arc<dyn Leases>) -> ViewLeases {
        ViewLeases {
            leases,
            held: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            taking: Mutex::new(()),
        }
    }

    fn holds(&self, view: &str) -> bool {
        self.held
            .lock()
            .expect("held lock")
            .get(view)
            .is_some_and(|(_, until)| *until > Instant::now())
    }

    fn fresh_holder(&self, view: &str) -> Option<LeaseHolder> {
        self.holders
            .lock()
            .expect("holders lock")
            .get(view)
            .filter(|(h, at)| h.live && at.elapsed() < HOLDER_FRESH)
            .map(|(h, _)| h.clone())
    }
}

impl Sense {
    /// This node's name, on a cluster whose views are shared.
    pub fn cluster_node(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.leases.node())
    }

    /// Where a request for view `view` (`department.view`) goes: here (this node runs it, or
    /// takes it now because nobody does; or it is not a shared view), or the node that runs
    /// it. Blocking (asks the cluster's store): call from a blocking context.
    pub fn route_view(self: &Arc<Self>, view: &str) -> Result<Route, Error> {
        let Some(c) = &self.cluster else {
            return Ok(Route::Here);
        };
        if self.runs_view(view) {
            return Ok(Route::Here);
        }
        let at =
            |h: LeaseHolder| match h.base_url() {
                Some(url) => Ok(Route::At { node: h.node, url }),
                None => Err(Error::unavailable(format!("view {view} is changing nodes"))
                    .hint("retry shortly")),
            };
        if let Some(h) = c.fresh_holder(view) {
            return at(h);
        }
        let Some(plan) = self.shared_view_plan(view)? else {
            return Ok(Route::Here);
        };
        match self.take_view(Arc::new(plan))? {
            None => Ok(Route::Here),
            Some(h) if h.live => at(h),
            Some(_) => {
                Err(Error::unavailable(format!("view {view} is changing nodes")).hint("retry"))
            }
        }
    }

    /// Whether this node runs `view` now, under a lease in force.
    fn runs_view(&self, view: &str) -> bool {
        let Some(c) = &self.cluster else {
            return true;
        };
        if !c.holds(view) {
            return false;
        }
        self.views
            .read()
            .expect("views lock")
            .get(view)
            .is_some_and(|h| !h.stop.load(Ordering::Acquire))
    }

    /// The plan of a shared view, from its dataset's manifest (`None`: no such shared view).
    fn shared_view_plan(&self, view: &str) -> Result<Option<ViewPlan>, Error> {
        let Some((d, n)) = view.split_once('.') else {
            return Ok(None);
        };
        let store = self.gov.dataset_store();
        let Ok(m) = store.get(d, n) else {
            return Ok(None);
        };
        let Some(v) = &m.view else { return Ok(None) };
        if v.late_table_of.is_some() || v.entities_of.is_some() || !store.is_shared_dataset(d, n) {
            return Ok(None);
        }
        ViewPlan::parse(&v.sql, &|name| self.gov.stream_definition(name))
            .map(Some)
            .map_err(|e| e.detail(format!("view {view} no longer plans")))
    }

    /// Takes `plan`'s lease and starts its runner here if nobody holds it in force: `None`
    /// when this node runs it now, else the holder.
    pub(crate) fn take_view(
        self: &Arc<Self>,
        plan: Arc<ViewPlan>,
    ) -> Result<Option<LeaseHolder>, Error> {
        let Some(c) = &self.cluster else {
            self.start(plan)?;
            return Ok(None);
        };
        let view = plan.sql_name();
        let _one = c.taking.lock().expect("taking lock");
        if self.runs_view(&view) {
            return Ok(None);
        }
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::unavailable("this node is stopping").hint("retry on another node"));
        }
        // The lease runs from before it was asked for, by this node's clock (conservative).
        let began = Instant::now();
        let mut taken = c.leases.acquire(&lease_name(&view), LEASE_TTL)?;
        // A lease released between the two statements of `acquire` is tried once more.
        if matches!(&taken, Err(h) if !h.live) {
            taken = c.leases.acquire(&lease_name(&view), LEASE_TTL)?;
        }
        match taken {
            Ok(epoch) => {
                c.held
                    .lock()
                    .expect("held lock")
                    .insert(view.clone(), (epoch, began + LEASE_TTL));
                self.stop_runner(&view);
                if let Err(e) = self.start(plan) {
                    c.held.lock().expect("held lock").remove(&view);
                    let _ = c.leases.release(&lease_name(&view), epoch);
                    return Err(e);
                }
                tracing::info!(view, epoch, "this node runs the view now");
                Ok(None)
            }
            Err(h) => {
                c.holders
                    .lock()
                    .expect("holders lock")
                    .insert(view, (h.clone(), Instant::now()));
                Ok(Some(h))
            }
        }
    }

    /// Ends `view`'s runner here, if one runs (it may write its checkpoint first).
    fn stop_runner(&self, view: &str) {
        let handle = self.views.write().expect("views lock").remove(view);
        if let Some(h) = handle {
            h.stop.store(true, Ordering::Release);
            self.wake.notify();
            if let Some(t) = h.thread.lock().expect("thread lock").take() {
                let _ = t.join();
            }
        }
    }

    /// Stops running `view` here and gives its lease up.
    fn let_view_go(&self, view: &str) {
        let Some(c) = &self.cluster else { return };
        self.stop_runner(view);
        if let Some((epoch, _)) = c.held.lock().expect("held lock").remove(view) {
            let _ = c.leases.release(&lease_name(view), epoch);
        }
    }

    /// One pass of the keeping thread: every lease held renewed (a lease lost or not renewed
    /// in time ends the view here), then every shared view nobody runs taken.
    pub(crate) fn keep_views_once(self: &Arc<Self>) {
        let Some(c) = &self.cluster else { return };
        let held: Vec<(String, u64, Instant)> = c
            .held
            .lock()
            .expect("held lock")
            .iter()
            .map(|(v, (e, u))| (v.clone(), *e, *u))
            .collect();
        for (view, epoch, until) in held {
            let began = Instant::now();
            match c.leases.renew(&lease_name(&view), epoch, LEASE_TTL) {
                Ok(true) => {
                    if let Some(h) = c.held.lock().expect("held lock").get_mut(&view)
                        && h.0 == epoch
                    {
                        h.1 = began + LEASE_TTL;
                    }
                }
                Ok(false) => {
                    tracing::warn!(view, epoch, "view lease lost: this node stops running it");
                    self.let_view_go(&view);
                }
                Err(e) if Instant::now() >= until => {
                    tracing::warn!(view, error = %e.message, "view lease not renewed in time");
                    self.let_view_go(&view);
                }
                Err(_) => {}
            }
        }
        let manifests = match self.gov.dataset_store().list() {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e.message, "views not listed");
                return;
            }
        };
        for m in manifests {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let view = m.sql_name();
            if m.view.is_none() || self.runs_view(&view) || c.fresh_holder(&view).is_some() {
                continue;
            }
            let plan = match self.shared_view_plan(&view) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(view, error = %e.message, "a shared view cannot start");
                    continue;
                }
            };
            if let Err(e) = self.take_view(Arc::new(plan)) {
                tracing::debug!(view, error = %e.message, "view not taken");
            }
        }
    }

    /// Gives every view lease up (the server stopping, its runners already ended).
    pub(crate) fn release_views(&self) {
        let Some(c) = &self.cluster else { return };
        let held: Vec<(String, u64)> = c
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(v, (e, _))| (v, e))
            .collect();
        for (view, epoch) in held {
            let _ = c.leases.release(&lease_name(&view), epoch);
        }
    }

    /// Views this node knows of that another node runs, with that node's base URL (the API
    /// asks them for their progress).
    pub fn views_elsewhere(&self) -> Vec<(String, String)> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let Ok(manifests) = self.gov.dataset_store().list() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in manifests {
            let view = m.sql_name();
            let is_view = m
                .view
                .as_ref()
                .is_some_and(|v| v.late_table_of.is_none() && v.entities_of.is_none());
            if !is_view
                || !self
                    .gov
                    .dataset_store()
                    .is_shared_dataset(&m.department, &m.name)
                || self.runs_view(&view)
            {
                continue;
            }
            let holder = match c.fresh_holder(&view) {
                Some(h) => Some(h),
                None => c.leases.holder(&lease_name(&view)).ok().flatten(),
            };
            if let Some(url) = holder.filter(|h| h.live).and_then(|h| h.base_url()) {
                out.push((view, url));
            }
        }
        out
    }
}

/// Starts the thread that keeps a server's view leases; it ends when the server stops.
pub(crate) fn start_keeping(sense: &Arc<Sense>) {
    let weak = Arc::downgrade(sense);
    let _ = std::thread::Builder::new()
        .name("view leases".into())
        .spawn(move || {
            loop {
                std::thread::sleep(KEEP_EVERY);
                let Some(s) = weak.upgrade() else { return };
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                s.keep_views_once();
            }
        });
}
