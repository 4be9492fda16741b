//! The incremental engine: events in, closed windows out.
//!
//! Per batch: the WHERE condition (a DataFusion physical expression) drops rows; each key
//! column's values become small ids and each combination of ids a group number
//! ([`crate::keys`]); each event's windows are found by integer arithmetic on its event time;
//! then one tight loop per aggregate updates plain vectors indexed by group number, in the
//! window's state. Only the finest grouping set is kept; the coarser sets (district, city) are
//! made when a window closes by merging the finer partial states — never by re-reading events.
//!
//! Event time: the watermark is the largest event time seen minus the stream's delay, advanced
//! event by event (so batch boundaries change nothing). A window closes once the watermark
//! passes its end plus the allowed lateness; an event for a closed window is counted in the
//! late table, never folded in, never dropped silently. Float sums are kept in fixed point
//! (10⁻⁹) so that any arrival order gives the same bits.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch,
    TimestampMicrosecondArray,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::physical_plan::PhysicalExpr;
use datafusion::prelude::SessionContext;
use yunqi_datasets::ColumnType;
use yunqi_types::Error;

use crate::hll::{self, Hll};
use crate::keys::{Groups, KeyDict, int_values};
use crate::plan::{Func, OutputKind, ViewPlan};

/// Fixed-point scale of float sums.
const FIXED: f64 = 1e9;

/// One aggregate's state in one window, by group number.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Acc {
    /// Non-null inputs (count, and whether sum/min/max are NULL).
    n: Vec<u64>,
    /// Integer sums, minima, maxima.
    i: Vec<i64>,
    /// Fixed-point float sums.
    x: Vec<i128>,
    /// Float minima, maxima.
    f: Vec<f64>,
    /// Distinct-count sketches.
    h: Vec<Hll>,
    /// Hashes not yet in their group's sketch. A sketch's 4 KiB of registers is a cache miss
    /// per event when thousands of groups are updated in turn; folding a group's hashes
    /// [`PENDING_MAX`] at a time loads its registers once for all of them. The result is the
    /// same: a sketch does not depend on the order of its inserts.
    #[serde(default)]
    p: Vec<Vec<u64>>,
}

/// Hashes a group buffers before they go into its sketch.
const PENDING_MAX: usize = 256;

/// How an aggregate is computed, by function and input type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    CountStar,
    Count,
    SumInt,
    SumFloat,
    MinInt,
    MaxInt,
    MinFloat,
    MaxFloat,
    Avg,
    Distinct,
}

fn kind(func: Func, t: Option<ColumnType>) -> Kind {
    let float = t == Some(ColumnType::Float);
    match func {
        Func::CountStar => Kind::CountStar,
        Func::Count => Kind::Count,
        Func::Sum if float => Kind::SumFloat,
        Func::Sum => Kind::SumInt,
        Func::Min if float => Kind::MinFloat,
        Func::Min => Kind::MinInt,
        Func::Max if float => Kind::MaxFloat,
        Func::Max => Kind::MaxInt,
        Func::Avg => Kind::Avg,
        Func::ApproxDistinct => Kind::Distinct,
    }
}

impl Acc {
    fn grow(&mut self, kind: Kind, groups: usize) {
        if self.n.len() >= groups {
            return;
        }
        match kind {
            Kind::CountStar => {}
            Kind::Count => self.n.resize(groups, 0),
            Kind::SumInt => {
                self.n.resize(groups, 0);
                self.i.resize(groups, 0);
            }
            Kind::MinInt => {
                self.n.resize(groups, 0);
                self.i.resize(groups, i64::MAX);
            }
            Kind::MaxInt => {
                self.n.resize(groups, 0);
                self.i.resize(groups, i64::MIN);
            }
            Kind::SumFloat | Kind::Avg => {
                self.n.resize(groups, 0);
                self.x.resize(groups, 0);
            }
            Kind::MinFloat | Kind::MaxFloat => {
                // The first value is stored as it is (n = 0 marks "none yet"), so that no
                // infinity needs to go through the checkpoint's JSON.
                self.n.resize(groups, 0);
                self.f.resize(groups, 0.0);
            }
            Kind::Distinct => {
                self.n.resize(groups, 0);
                self.h.resize(groups, Hll::default());
                self.p.resize(groups, Vec::new());
            }
        }
    }

    /// Puts every buffered hash into its sketch.
    fn flush(&mut self) {
        for (h, p) in self.h.iter_mut().zip(self.p.iter_mut()) {
            for x in p.drain(..) {
                h.insert(x);
            }
        }
    }
}

/// The state of one open window.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Window {
    /// Window number: its start is `index × slide`.
    index: i64,
    /// Events per group (count(*)).
    rows: Vec<u64>,
    accs: Vec<Acc>,
}

/// Late events of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Late {
    /// Events that arrived after the window closed.
    pub events: u64,
    /// The latest event time among them, microseconds.
    pub last_event_us: i64,
    /// How far behind the watermark the latest of them was, microseconds.
    pub max_behind_us: i64,
}

/// Windows closed by one call, as rows of the view.
#[derive(Debug, Clone)]
pub struct Closed {
    /// The rows, in the view's output schema.
    pub batch: RecordBatch,
    /// Number of windows closed.
    pub windows: usize,
    /// End of the last window closed, microseconds.
    pub through_end_us: i64,
}

/// Checkpointable state: everything [`Engine`] needs to continue exactly where it was.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct State {
    dicts: Vec<KeyDict>,
    groups: Groups,
    windows: Vec<Window>,
    /// Largest event time seen (i64::MIN for none).
    max_event_us: i64,
    /// Windows with a smaller number are closed.
    closed_below: i64,
    late: BTreeMap<i64, Late>,
    /// Events folded into windows, events late, events filtered out.
    events_in: u64,
    events_late: u64,
    events_filtered: u64,
}

/// Counters of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    /// Events folded into windows.
    pub events_in: u64,
    /// Events that arrived for closed windows (per window they fell in).
    pub events_late: u64,
    /// Events the WHERE condition dropped.
    pub events_filtered: u64,
    /// Open windows.
    pub open_windows: usize,
    /// Groups seen (finest grouping set).
    pub groups: usize,
    /// The watermark, microseconds (None before the first event).
    pub watermark_us: Option<i64>,
}

/// An incremental continuous view.
pub struct Engine {
    plan: Arc<ViewPlan>,
    kinds: Vec<Kind>,
    input: SchemaRef,
    output: SchemaRef,
    filter: Option<Arc<dyn PhysicalExpr>>,
    s: State,
    // Scratch buffers, reused across batches.
    key_ids: Vec<Vec<u32>>,
    gids: Vec<u32>,
    limits: Vec<i64>,
    wms: Vec<i64>,
    slots: Vec<u32>,
}

const LATE: u32 = u32::MAX;

#[inline]
fn floor_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b)
}

impl Engine {
    /// A fresh engine for a view.
    pub fn new(plan: Arc<ViewPlan>) -> Result<Engine, Error> {
        let dicts = plan
            .keys
            .iter()
            .map(|k| KeyDict::new(k.column_type == ColumnType::Text))
            .collect();
        let state = State {
            dicts,
            groups: Groups::new(plan.keys.len()),
            windows: Vec::new(),
            max_event_us: i64::MIN,
            closed_below: i64::MIN,
            late: BTreeMap::new(),
            events_in: 0,
            events_late: 0,
            events_filtered: 0,
        };
        Engine::with_state(plan, state)
    }

    fn with_state(plan: Arc<ViewPlan>, s: State) -> Result<Engine, Error> {
        let input = Arc::new(Schema::new(
            plan.stream_columns
                .iter()
                .map(|c| Field::new(&c.name, c.column_type.arrow(), true))
                .collect::<Vec<_>>(),
        ));
        let output = output_schema(&plan);
        let filter = match &plan.filter {
            None => None,
            Some(sql) => Some(compile_filter(sql, &input)?),
        };
        let kinds = plan
            .aggs
            .iter()
            .map(|a| kind(a.func, a.input_type))
            .collect();
        Ok(Engine {
            key_ids: vec![Vec::new(); plan.keys.len()],
            plan,
            kinds,
            input,
            output,
            filter,
            s,
            gids: Vec::new(),
            limits: Vec::new(),
            wms: Vec::new(),
            slots: Vec::new(),
        })
    }

    /// The view's plan.
    pub fn plan(&self) -> &Arc<ViewPlan> {
        &self.plan
    }

    /// The schema of the view's rows.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// The watermark: largest event time seen minus the stream's delay.
    pub fn watermark_us(&self) -> Option<i64> {
        (self.s.max_event_us != i64::MIN).then(|| self.s.max_event_us - self.plan.watermark_us)
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            events_in: self.s.events_in,
            events_late: self.s.events_late,
            events_filtered: self.s.events_filtered,
            open_windows: self.s.windows.len(),
            groups: self.s.groups.count,
            watermark_us: self.watermark_us(),
        }
    }

    /// Windows numbered below this are closed once the watermark is `wm`.
    fn close_limit(&self, wm: i64) -> i64 {
        let w = &self.plan.window;
        // Window i closes when i*slide + size + lateness <= wm.
        floor_div(
            wm.saturating_sub(w.size_us)
                .saturating_sub(self.plan.lateness_us),
            w.slide_us,
        ) + 1
    }

    /// Folds a batch of events (columns by the stream's names) into the open windows.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<(), Error> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = self.conform(batch)?;
        let batch = match &self.filter {
            None => batch,
            Some(f) => {
                let mask = f
                    .evaluate(&batch)
                    .and_then(|v| v.into_array(batch.num_rows()))
                    .map_err(|e| Error::invalid(format!("the view's WHERE failed: {e}")))?;
                let mask: &BooleanArray = mask.as_boolean();
                let kept = filter_record_batch(&batch, mask)
                    .map_err(|e| Error::internal(format!("filter: {e}")))?;
                self.s.events_filtered += (batch.num_rows() - kept.num_rows()) as u64;
                kept
            }
        };
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let ts_col = int_values(batch.column(self.plan.event_time))?;
        let ts_arr = ts_col.as_primitive::<Int64Type>();
        if ts_arr.null_count() > 0 {
            return Err(
                Error::invalid("events without an event time cannot be windowed")
                    .hint("every event needs its event-time column"),
            );
        }
        let ts = ts_arr.values();

        // Keys → group numbers.
        for (k, key) in self.plan.keys.iter().enumerate() {
            let col = batch.column(key.column);
            self.s.dicts[k].intern(col, &mut self.key_ids[k])?;
        }
        self.s.groups.assign(&self.key_ids, n, &mut self.gids);
        let groups = self.s.groups.count;

        // Watermark, event by event: the close limit each event sees.
        self.limits.clear();
        self.wms.clear();
        let mut max = self.s.max_event_us;
        let mut limit = self.s.closed_below;
        let delay = self.plan.watermark_us;
        for &t in ts {
            if t > max {
                max = t;
                limit = limit.max(self.close_limit(t - delay));
            }
            self.limits.push(limit);
            self.wms.push(max.saturating_sub(delay));
        }

        // Each pass folds every event into its j-th window.
        let slide = self.plan.window.slide_us;
        let passes = self.plan.window.per_event();
        for j in 0..passes {
            self.slots.clear();
            let mut last_index = i64::MIN;
            let mut last_slot = 0u32;
            for i in 0..n {
                let w = floor_div(ts[i], slide) - j;
                if w < self.limits[i] {
                    let start = w * slide;
                    let late = self.s.late.entry(start).or_default();
                    late.events += 1;
                    late.last_event_us = late.last_event_us.max(ts[i]);
                    let closes_at = start + self.plan.window.size_us + self.plan.lateness_us;
                    let behind = self.wms[i].saturating_sub(closes_at).max(0);
                    late.max_behind_us = late.max_behind_us.max(behind);
                    self.s.events_late += 1;
                    self.slots.push(LATE);
                    continue;
                }
                if w != last_index {
                    last_slot = self.window_slot(w, groups);
                    last_index = w;
                }
                self.slots.push(last_slot);
            }
            for win in &mut self.s.windows {
                if win.rows.len() < groups {
                    win.rows.resize(groups, 0);
                }
                for (acc, &k) in win.accs.iter_mut().zip(&self.kinds) {
                    acc.grow(k, groups);
                }
            }
            let wins = &mut self.s.windows;
            let slots = &self.slots;
            let gids = &self.gids;
            let mut folded = 0u64;
            for (i, &s) in slots.iter().enumerate() {
                if s != LATE {
                    wins[s as usize].rows[gids[i] as usize] += 1;
                    folded += 1;
                }
            }
            if j == 0 {
                self.s.events_in += folded;
            }
            for (a, agg) in self.plan.aggs.iter().enumerate() {
                let k = self.kinds[a];
                let Some(c) = agg.column else { continue };
                fold(k, a, batch.column(c), wins, slots, gids)?;
            }
        }
        self.s.max_event_us = max;
        Ok(())
    }

    /// The slot of window `index` in `windows`, created if new.
    fn window_slot(&mut self, index: i64, groups: usize) -> u32 {
        if let Some(p) = self.s.windows.iter().position(|w| w.index == index) {
            return p as u32;
        }
        self.s.windows.push(Window {
            index,
            rows: vec![0; groups],
            accs: self
                .kinds
                .iter()
                .map(|&k| {
                    let mut a = Acc::default();
                    a.grow(k, groups);
                    a
                })
                .collect(),
        });
        (self.s.windows.len() - 1) as u32
    }

    /// The batch's columns in the stream's order (by name), cast to the declared types.
    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch, Error> {
        if batch.schema().fields().len() == self.input.fields().len()
            && batch
                .schema()
                .fields()
                .iter()
                .zip(self.input.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type())
        {
            return RecordBatch::try_new(self.input.clone(), batch.columns().to_vec())
                .map_err(|e| Error::internal(format!("events batch: {e}")));
        }
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.input.fields().len());
        for f in self.input.fields() {
            let c = batch
                .column_by_name(f.name())
                .ok_or_else(|| Error::invalid(format!("events have no column \"{}\"", f.name())))?;
            // Text keys may come dictionary-encoded; keep them so (the key dictionary reads
            // them directly); everything else takes the declared type.
            let keep = self.filter.is_none()
                && matches!(c.data_type(), DataType::Dictionary(_, v) if **v == DataType::Utf8)
                && f.data_type() == &DataType::Utf8;
            cols.push(if keep || c.data_type() == f.data_type() {
                c.clone()
            } else {
                cast(c, f.data_type())
                    .map_err(|e| Error::invalid(format!("column \"{}\": {e}", f.name())))?
            });
        }
        let fields: Vec<Field> = self
            .input
            .fields()
            .iter()
            .zip(&cols)
            .map(|(f, c)| Field::new(f.name(), c.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
            .map_err(|e| Error::internal(format!("events batch: {e}")))
    }

    /// Closes the windows the watermark has passed (end + allowed lateness ≤ watermark).
    pub fn close_ready(&mut self) -> Result<Option<Closed>, Error> {
        let Some(wm) = self.watermark_us() else {
            return Ok(None);
        };
        let limit = self.close_limit(wm);
        self.close_below(limit)
    }

    /// Closes every open window (end of a finite input).
    pub fn close_all(&mut self) -> Result<Option<Closed>, Error> {
        self.close_below(i64::MAX)
    }

    fn close_below(&mut self, limit: i64) -> Result<Option<Closed>, Error> {
        if limit > self.s.closed_below {
            self.s.closed_below = limit;
        }
        let mut closing: Vec<Window> = Vec::new();
        let mut i = 0;
        while i < self.s.windows.len() {
            if self.s.windows[i].index < limit {
                closing.push(self.s.windows.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if closing.is_empty() {
            return Ok(None);
        }
        closing.sort_by_key(|w| w.index);
        for w in &mut closing {
            w.accs.iter_mut().for_each(Acc::flush);
        }
        let through_end_us = closing.last().expect("one").index * self.plan.window.slide_us
            + self.plan.window.size_us;
        let windows = closing.len();
        let batch = self.emit(&closing)?;
        Ok(Some(Closed {
            batch,
            windows,
            through_end_us,
        }))
    }

    /// The late table: one row per window that received late events.
    pub fn late_rows(&self) -> Result<RecordBatch, Error> {
        let size = self.plan.window.size_us;
        let starts: Vec<i64> = self.s.late.keys().copied().collect();
        let ends: Vec<i64> = starts.iter().map(|s| s + size).collect();
        let late: Vec<&Late> = self.s.late.values().collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(TimestampMicrosecondArray::from(starts).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from(ends).with_timezone("UTC")),
            Arc::new(Int64Array::from_iter_values(
                late.iter().map(|l| l.events as i64),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(late.iter().map(|l| l.last_event_us))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from_iter_values(
                late.iter().map(|l| l.max_behind_us / 1000),
            )),
        ];
        RecordBatch::try_new(late_schema(), cols)
            .map_err(|e| Error::internal(format!("late table: {e}")))
    }

    fn emit(&self, windows: &[Window]) -> Result<RecordBatch, Error> {
        let plan = &self.plan;
        let width = plan.keys.len();
        let full: u64 = if width == 0 { 0 } else { (1u64 << width) - 1 };
        // Output rows: (window, set, groups merged into it).
        struct Row {
            window: usize,
            set: usize,
            key: Vec<u32>,
            groups: Vec<u32>,
        }
        let mut rows: Vec<Row> = Vec::new();
        for (wi, w) in windows.iter().enumerate() {
            for (si, &mask) in plan.sets.iter().enumerate() {
                if mask == full {
                    for (g, &c) in w.rows.iter().enumerate() {
                        if c > 0 {
                            rows.push(Row {
                                window: wi,
                                set: si,
                                key: self.s.groups.key(g).to_vec(),
                                groups: vec![g as u32],
                            });
                        }
                    }
                } else {
                    let mut at: crate::keys::FxMap<Vec<u32>, usize> = Default::default();
                    for (g, &c) in w.rows.iter().enumerate() {
                        if c == 0 {
                            continue;
                        }
                        let key: Vec<u32> = self
                            .s
                            .groups
                            .key(g)
                            .iter()
                            .enumerate()
                            .map(|(k, &id)| if mask & (1 << k) != 0 { id } else { 0 })
                            .collect();
                        match at.get(&key) {
                            Some(&r) => rows[r].groups.push(g as u32),
                            None => {
                                at.insert(key.clone(), rows.len());
                                rows.push(Row {
                                    window: wi,
                                    set: si,
                                    key,
                                    groups: vec![g as u32],
                                });
                            }
                        }
                    }
                }
            }
        }
        let slide = plan.window.slide_us;
        let size = plan.window.size_us;
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(plan.outputs.len());
        for o in &plan.outputs {
            let col: ArrayRef = match o.kind {
                OutputKind::WindowStart => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        rows.iter().map(|r| windows[r.window].index * slide),
                    )
                    .with_timezone("UTC"),
                ),
                OutputKind::WindowEnd => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        rows.iter().map(|r| windows[r.window].index * slide + size),
                    )
                    .with_timezone("UTC"),
                ),
                OutputKind::Grouping(k) => Arc::new(Int64Array::from_iter_values(
                    rows.iter()
                        .map(|r| i64::from(plan.sets[r.set] & (1 << k) == 0)),
                )),
                OutputKind::Key(k) => {
                    let present = |r: &Row| plan.sets[r.set] & (1 << k) != 0;
                    match &self.s.dicts[k] {
                        KeyDict::Str { values, .. } => Arc::new(
                            rows.iter()
                                .map(|r| {
                                    if present(r) {
                                        values[r.key[k] as usize].as_deref()
                                    } else {
                                        None
                                    }
                                })
                                .collect::<datafusion::arrow::array::StringArray>(),
                        ),
                        KeyDict::Int { values, .. } => {
                            let ints: Int64Array = rows
                                .iter()
                                .map(|r| {
                                    if present(r) {
                                        values[r.key[k] as usize]
                                    } else {
                                        None
                                    }
                                })
                                .collect();
                            typed(Arc::new(ints), o.column_type)?
                        }
                    }
                }
                OutputKind::Agg(a) => {
                    let k = self.kinds[a];
                    let acc = |r: &Row| &windows[r.window].accs[a];
                    match k {
                        Kind::CountStar => {
                            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| {
                                r.groups
                                    .iter()
                                    .map(|&g| windows[r.window].rows[g as usize])
                                    .sum::<u64>() as i64
                            })))
                        }
                        Kind::Count => {
                            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| {
                                r.groups.iter().map(|&g| acc(r).n[g as usize]).sum::<u64>() as i64
                            })))
                        }
                        Kind::SumInt | Kind::MinInt | Kind::MaxInt => {
                            let ints: Int64Array = rows
                                .iter()
                                .map(|r| {
                                    let a = acc(r);
                                    let mut n = 0u64;
                                    let mut v: i64 = match k {
                                        Kind::SumInt => 0,
                                        Kind::MinInt => i64::MAX,
                                        _ => i64::MIN,
                                    };
                                    for &g in &r.groups {
                                        let g = g as usize;
                                        n += a.n[g];
                                        v = match k {
                                            Kind::SumInt => v.wrapping_add(a.i[g]),
                                            Kind::MinInt => v.min(a.i[g]),
                                            _ => v.max(a.i[g]),
                                        };
                                    }
                                    (n > 0).then_some(v)
                                })
                                .collect();
                            typed(Arc::new(ints), o.column_type)?
                        }
                        Kind::SumFloat | Kind::Avg => {
                            let floats: Float64Array = rows
                                .iter()
                                .map(|r| {
                                    let a = acc(r);
                                    let mut n = 0u64;
                                    let mut x: i128 = 0;
                                    for &g in &r.groups {
                                        n += a.n[g as usize];
                                        x += a.x[g as usize];
                                    }
                                    let sum = x as f64 / FIXED;
                                    (n > 0)
                                        .then(|| if k == Kind::Avg { sum / n as f64 } else { sum })
                                })
                                .collect();
                            Arc::new(floats)
                        }
                        Kind::MinFloat | Kind::MaxFloat => {
                            let floats: Float64Array = rows
                                .iter()
                                .map(|r| {
                                    let a = acc(r);
                                    let mut n = 0u64;
                                    let mut v = if k == Kind::MinFloat {
                                        f64::INFINITY
                                    } else {
                                        f64::NEG_INFINITY
                                    };
                                    for &g in &r.groups {
                                        if a.n[g as usize] == 0 {
                                            continue;
                                        }
                                        n += a.n[g as usize];
                                        v = if k == Kind::MinFloat {
                                            v.min(a.f[g as usize])
                                        } else {
                                            v.max(a.f[g as usize])
                                        };
                                    }
                                    (n > 0).then_some(v)
                                })
                                .collect();
                            Arc::new(floats)
                        }
                        Kind::Distinct => {
                            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| {
                                let a = acc(r);
                                if let [g] = r.groups.as_slice() {
                                    return a.h[*g as usize].estimate() as i64;
                                }
                                let mut h = Hll::default();
                                for &g in &r.groups {
                                    h.merge(&a.h[g as usize]);
                                }
                                h.estimate() as i64
                            })))
                        }
                    }
                }
            };
            cols.push(col);
        }
        RecordBatch::try_new(self.output.clone(), cols)
            .map_err(|e| Error::internal(format!("view rows: {e}")))
    }

    /// The engine's state, to be stored in a checkpoint.
    pub fn snapshot(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(&self.s).map_err(|e| Error::internal(format!("checkpoint: {e}")))
    }

    /// An engine continuing from a [`Engine::snapshot`].
    pub fn restore(plan: Arc<ViewPlan>, bytes: &[u8]) -> Result<Engine, Error> {
        let mut s: State = serde_json::from_slice(bytes)
            .map_err(|e| Error::internal(format!("checkpoint is unreadable: {e}")))?;
        if s.dicts.len() != plan.keys.len() || s.groups.width != plan.keys.len() {
            return Err(Error::internal("checkpoint does not match the view's keys"));
        }
        for d in &mut s.dicts {
            d.reindex();
        }
        s.groups.reindex();
        Engine::with_state(plan, s)
    }
}

/// A float in fixed point (10⁻⁹ units), rounded half away from zero. Converting through
/// `i64` keeps this to a few instructions (`f64 as i128` and `round` are library calls on
/// baseline x86-64); values beyond ±9·10⁹ take the slow path.
#[inline]
fn fixed(v: f64) -> i128 {
    let x = v * FIXED;
    if x.abs() < 9.0e18 {
        let t = x as i64;
        let f = x - t as f64;
        (if f >= 0.5 {
            t + 1
        } else if f <= -0.5 {
            t - 1
        } else {
            t
        }) as i128
    } else {
        x.round() as i128
    }
}

/// Folds one aggregate's input column into the windows.
fn fold(
    k: Kind,
    a: usize,
    column: &ArrayRef,
    wins: &mut [Window],
    slots: &[u32],
    gids: &[u32],
) -> Result<(), Error> {
    let n = slots.len();
    let valid = |i: usize| column.is_valid(i);
    let no_nulls = column.null_count() == 0;
    match k {
        Kind::CountStar => {}
        Kind::Count => {
            for i in 0..n {
                let s = slots[i];
                if s != LATE && (no_nulls || valid(i)) {
                    wins[s as usize].accs[a].n[gids[i] as usize] += 1;
                }
            }
        }
        Kind::SumInt | Kind::MinInt | Kind::MaxInt => {
            let ints = int_values(column)?;
            let v = ints.as_primitive::<Int64Type>().values();
            for i in 0..n {
                let s = slots[i];
                if s == LATE || !(no_nulls || valid(i)) {
                    continue;
                }
                let acc = &mut wins[s as usize].accs[a];
                let g = gids[i] as usize;
                acc.n[g] += 1;
                acc.i[g] = match k {
                    Kind::SumInt => acc.i[g].wrapping_add(v[i]),
                    Kind::MinInt => acc.i[g].min(v[i]),
                    _ => acc.i[g].max(v[i]),
                };
            }
        }
        Kind::SumFloat | Kind::Avg | Kind::MinFloat | Kind::MaxFloat => {
            let floats = cast(column, &DataType::Float64)
                .map_err(|e| Error::internal(format!("float column: {e}")))?;
            let v = floats.as_primitive::<Float64Type>().values();
            for i in 0..n {
                let s = slots[i];
                if s == LATE || !(no_nulls || valid(i)) {
                    continue;
                }
                let acc = &mut wins[s as usize].accs[a];
                let g = gids[i] as usize;
                match k {
                    Kind::MinFloat if acc.n[g] == 0 => acc.f[g] = v[i],
                    Kind::MaxFloat if acc.n[g] == 0 => acc.f[g] = v[i],
                    Kind::MinFloat => acc.f[g] = acc.f[g].min(v[i]),
                    Kind::MaxFloat => acc.f[g] = acc.f[g].max(v[i]),
                    _ => acc.x[g] += fixed(v[i]),
                }
                acc.n[g] += 1;
            }
        }
        Kind::Distinct => {
            let hashes = hash_column(column)?;
            for i in 0..n {
                let s = slots[i];
                if s == LATE || !(no_nulls || valid(i)) {
                    continue;
                }
                let acc = &mut wins[s as usize].accs[a];
                let g = gids[i] as usize;
                acc.n[g] += 1;
                let p = &mut acc.p[g];
                p.push(hashes[i]);
                if p.len() >= PENDING_MAX {
                    let h = &mut acc.h[g];
                    for x in p.drain(..) {
                        h.insert(x);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A 64-bit hash of each value (0 for NULL).
fn hash_column(column: &ArrayRef) -> Result<Vec<u64>, Error> {
    let n = column.len();
    Ok(match column.data_type() {
        DataType::Utf8 => {
            let s = column.as_string::<i32>();
            (0..n)
                .map(|i| hll::hash_bytes(s.value(i).as_bytes()))
                .collect()
        }
        DataType::Dictionary(_, v) if **v == DataType::Utf8 => {
            let d = crate::keys::dictionary(column)?;
            let values = d.values().as_string::<i32>();
            let hv: Vec<u64> = (0..values.len())
                .map(|i| hll::hash_bytes(values.value(i).as_bytes()))
                .collect();
            d.keys().values().iter().map(|&k| hv[k as usize]).collect()
        }
        DataType::Float64 | DataType::Float32 => {
            let f = cast(column, &DataType::Float64)
                .map_err(|e| Error::internal(format!("float column: {e}")))?;
            f.as_primitive::<Float64Type>()
                .values()
                .iter()
                .map(|v| hll::hash64(v.to_bits() as i64))
                .collect()
        }
        DataType::LargeUtf8 | DataType::Utf8View => {
            let c = cast(column, &DataType::Utf8)
                .map_err(|e| Error::internal(format!("text column: {e}")))?;
            return hash_column(&c);
        }
        _ => {
            let ints = int_values(column)?;
            ints.as_primitive::<Int64Type>()
                .values()
                .iter()
                .map(|&v| hll::hash64(v))
                .collect()
        }
    })
}

/// An Int64 column in a column type's Arrow type.
fn typed(ints: ArrayRef, t: ColumnType) -> Result<ArrayRef, Error> {
    if t == ColumnType::Int {
        return Ok(ints);
    }
    let target = t.arrow();
    let via = match t {
        ColumnType::Timestamp => {
            let a = ints.as_primitive::<Int64Type>();
            return Ok(Arc::new(
                TimestampMicrosecondArray::new(a.values().clone(), a.nulls().cloned())
                    .with_timezone("UTC"),
            ));
        }
        ColumnType::Date => cast(&ints, &DataType::Int32),
        _ => Ok(ints),
    }
    .map_err(|e| Error::internal(format!("cast: {e}")))?;
    cast(&via, &target).map_err(|e| Error::internal(format!("cast: {e}")))
}

/// The view's output schema.
pub fn output_schema(plan: &ViewPlan) -> SchemaRef {
    Arc::new(Schema::new(
        plan.outputs
            .iter()
            .map(|o| Field::new(&o.name, o.column_type.arrow(), true))
            .collect::<Vec<_>>(),
    ))
}

/// The schema of a view's late table.
pub fn late_schema() -> SchemaRef {
    let ts = ColumnType::Timestamp.arrow();
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts.clone(), false),
        Field::new("late_events", DataType::Int64, false),
        Field::new("last_event_time", ts, false),
        Field::new("max_behind_ms", DataType::Int64, false),
    ]))
}

/// Compiles the WHERE condition against the stream's schema with DataFusion.
fn compile_filter(sql: &str, input: &SchemaRef) -> Result<Arc<dyn PhysicalExpr>, Error> {
    let ctx = SessionContext::new();
    let df_schema = DFSchema::try_from(input.as_ref().clone())
        .map_err(|e| Error::internal(format!("schema: {e}")))?;
    let expr = ctx
        .parse_sql_expr(sql, &df_schema)
        .map_err(|e| Error::invalid(format!("WHERE {sql}: {e}")))?;
    let physical = ctx
        .create_physical_expr(expr, &df_schema)
        .map_err(|e| Error::invalid(format!("WHERE {sql}: {e}")))?;
    let t = physical
        .data_type(input)
        .map_err(|e| Error::invalid(format!("WHERE {sql}: {e}")))?;
    if t != DataType::Boolean {
        return Err(Error::invalid(format!(
            "WHERE {sql} is {t}, not a condition"
        )));
    }
    Ok(physical)
}
