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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use yunqi_datasets::Manifest;
use yunqi_store::{HeldLeases, LeaseHolder, Leases, Route};
use yunqi_types::Error;

use crate::plan::ViewPlan;
use crate::runtime::Sense;

/// How long a view's lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often a node renews its view leases and looks for views nobody runs.
pub const KEEP_EVERY: Duration = Duration::from_millis(1000);

/// How long a node trusts what it learnt of another node's lease before asking again.
const HOLDER_FRESH: Duration = Duration::from_millis(1000);

/// A node's view leases on `leases` (`view:<department>.<view>`).
pub(crate) fn view_leases(leases: Arc<dyn Leases>) -> HeldLeases {
    HeldLeases::new(leases, "view", LEASE_TTL)
}

/// Whether `m` is a continuous view's own dataset (not its late table, not an entity table)
/// in the cluster's shared store.
fn is_shared_view(store: &yunqi_datasets::DatasetStore, m: &Manifest) -> bool {
    m.view
        .as_ref()
        .is_some_and(|v| v.late_table_of.is_none() && v.entities_of.is_none())
        && store.is_shared_dataset(&m.department, &m.name)
}

impl Sense {
    /// This node's name, on a cluster whose views are shared.
    pub fn cluster_node(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.node())
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
        if let Some(h) = c.fresh_holder(view, HOLDER_FRESH) {
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
        match self.gov.dataset_store().get(d, n) {
            Ok(m) => self.plan_of(&m),
            Err(_) => Ok(None),
        }
    }

    /// `m`'s plan, if it is a shared view.
    fn plan_of(&self, m: &Manifest) -> Result<Option<ViewPlan>, Error> {
        let (Some(v), true) = (&m.view, is_shared_view(self.gov.dataset_store(), m)) else {
            return Ok(None);
        };
        ViewPlan::parse(&v.sql, &|name| self.gov.stream_definition(name))
            .map(Some)
            .map_err(|e| e.detail(format!("view {} no longer plans", m.sql_name())))
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
        let _one = c.taking();
        if self.runs_view(&view) {
            return Ok(None);
        }
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::unavailable("this node is stopping").hint("retry on another node"));
        }
        match c.acquire(&view)? {
            Ok(epoch) => {
                self.stop_runner(&view);
                if let Err(e) = self.start(plan) {
                    c.release(&view);
                    return Err(e);
                }
                tracing::info!(view, epoch, "this node runs the view now");
                Ok(None)
            }
            Err(h) => Ok(Some(h)),
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
        c.release(view);
    }

    /// One pass of the keeping thread: every lease held renewed (a lease lost or not renewed
    /// in time ends the view here), then every shared view nobody runs taken.
    pub(crate) fn keep_views_once(self: &Arc<Self>) {
        let Some(c) = &self.cluster else { return };
        for view in c.renew_all() {
            self.let_view_go(&view);
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
            if self.runs_view(&view) || c.fresh_holder(&view, HOLDER_FRESH).is_some() {
                continue;
            }
            let plan = match self.plan_of(&m) {
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
        if let Some(c) = &self.cluster {
            c.release_all();
        }
    }

    /// Views this node knows of that another node runs, with that node's base URL (the API
    /// asks them for their progress).
    pub fn views_elsewhere(&self) -> Vec<(String, String)> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let store = self.gov.dataset_store();
        let Ok(manifests) = store.list() else {
            return Vec::new();
        };
        manifests
            .iter()
            .filter(|m| is_shared_view(store, m) && !self.runs_view(&m.sql_name()))
            .filter_map(|m| {
                let view = m.sql_name();
                let holder = match c.fresh_holder(&view, HOLDER_FRESH) {
                    Some(h) => Some(h),
                    None => c.holder(&view).ok().flatten(),
                };
                let url = holder.filter(|h| h.live)?.base_url()?;
                Some((view, url))
            })
            .collect()
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
