//! A continuous view's runner: one thread reading the stream's log into the incremental
//! engine, writing closed windows to the view's dataset, sending them live, checkpointing.
//!
//! Exactly once: the runner writes closed windows as a version of the view's dataset marked
//! with the end of the last window it holds, then checkpoints the engine's state with the log
//! offset it reflects. After a crash, or on another node of a cluster, a runner restores the
//! checkpoint and re-reads the log from its offset; processing is deterministic (the watermark
//! advances with the events, never with the wall clock), so the windows it closes again are the
//! same, and those already in the dataset — ending at or before the mark — are not written
//! twice. The late table is rewritten whole from the state, so it is exact too.
//!
//! Where the checkpoint lives: a file in the server's views directory (written to a temporary
//! name, fsynced, renamed), or, for a cluster's shared view, an object beside the shared
//! datasets, so that the node taking the view over resumes from it. A shared view's dataset is
//! committed by compare-and-set on its manifest: should two runners ever write one view (a
//! node paused past its lease), the one behind is refused, reads the mark again and writes
//! only windows after it — never a window twice. A checkpoint is the state at one offset, so an
//! older one written late only makes the next runner read more of the log again.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::arrow::util::display::array_value_to_string;
use yunqi_datasets::Blobs;
use yunqi_types::Error;

use crate::engine::{Closed, Engine};
use crate::plan::ViewPlan;
use crate::runtime::{Sense, ViewHandle, decode_ipc, rfc3339, system_actor_name};

/// How often a runner checkpoints when windows are open but none closed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Bytes of log a runner reads at once.
const READ_BYTES: usize = 8 << 20;

/// A checkpoint that cannot be read. The view can be recomputed: its written windows stay
/// (the dataset's mark skips them) and the rest is re-read from the log, while it still holds
/// the stream from its start.
fn damaged_checkpoint(place: &Checkpoint, why: &str) -> Error {
    match place {
        Checkpoint::File(path) => {
            Error::internal(format!("checkpoint {} is unreadable: {why}", path.display())).hint(
                "stop yunqi and move the file aside: the view then recomputes from the start of the stream's log, without writing a window twice",
            )
        }
        Checkpoint::Shared { key, .. } => Error::internal(format!(
            "the view's checkpoint in the object store ({key}) is unreadable: {why}"
        ))
        .hint(
            "remove that object: the view then recomputes from the start of the stream's log, without writing a window twice",
        ),
    }
}

/// The checkpoint's first line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointHeader {
    /// Log offset the state reflects.
    offset: u64,
    /// Windows written so far.
    windows_written: u64,
}

/// Where a view's checkpoint is kept.
pub(crate) enum Checkpoint {
    /// A file of this node's (embedded, or a view that stays on its node).
    File(PathBuf),
    /// An object in the cluster's object store, under `key`.
    Shared {
        /// The store.
        blobs: Arc<dyn Blobs>,
        /// `views/<department>.<view>/checkpoint`.
        key: String,
    },
}

impl Checkpoint {
    /// The checkpoint's bytes, `None` before the first.
    fn read(&self) -> Result<Option<Vec<u8>>, Error> {
        match self {
            Checkpoint::File(path) => match std::fs::read(path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::internal(format!(
                    "read checkpoint {}: {e}",
                    path.display()
                ))),
            },
            Checkpoint::Shared { blobs, key } => {
                if !blobs.list(key)?.iter().any(|b| &b.key == key) {
                    return Ok(None);
                }
                Ok(Some(blobs.get(key)?.to_vec()))
            }
        }
    }

    /// Replaces the checkpoint with `bytes`, durably, whole or not at all.
    fn write(&self, bytes: Vec<u8>) -> Result<(), Error> {
        match self {
            Checkpoint::File(path) => {
                let tmp = path.with_extension("checkpoint.tmp");
                let io = |e: std::io::Error| Error::internal(format!("write checkpoint: {e}"));
                let mut f = std::fs::File::create(&tmp).map_err(io)?;
                f.write_all(&bytes).map_err(io)?;
                f.sync_data().map_err(io)?;
                drop(f);
                std::fs::rename(&tmp, path).map_err(io)?;
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io)?;
                }
                Ok(())
            }
            // An object store's put replaces the object whole.
            Checkpoint::Shared { blobs, key } => blobs.put(key, bytes.into()),
        }
    }
}

/// The object key of a shared view's checkpoint.
pub(crate) fn shared_checkpoint_key(view: &str) -> String {
    format!("views/{view}/checkpoint")
}

pub(crate) struct Runner {
    sense: Arc<Sense>,
    handle: Arc<ViewHandle>,
    engine: Engine,
    offset: u64,
    /// End of the last window in the dataset (from its manifest).
    written_through: i64,
    windows_written: u64,
    checkpoint: Checkpoint,
    /// Windows closed by the engine whose write failed: written first on the next pass.
    pending: Option<Closed>,
    late_written: usize,
    late_events_written: u64,
    /// Events removed by retention before this view read them (since start).
    lost: u64,
}

impl Runner {
    pub(crate) fn open(
        sense: Arc<Sense>,
        handle: Arc<ViewHandle>,
        checkpoint: Checkpoint,
    ) -> Result<Runner, Error> {
        let plan = handle.plan.clone();
        let (engine, offset, windows_written) = match checkpoint.read()? {
            Some(bytes) => {
                let nl = bytes
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or_else(|| damaged_checkpoint(&checkpoint, "no header line"))?;
                let header: CheckpointHeader = serde_json::from_slice(&bytes[..nl])
                    .map_err(|e| damaged_checkpoint(&checkpoint, &e.to_string()))?;
                (
                    Engine::restore(plan.clone(), &bytes[nl + 1..])
                        .map_err(|e| damaged_checkpoint(&checkpoint, &e.message))?,
                    header.offset,
                    header.windows_written,
                )
            }
            None => (Engine::new(plan.clone())?, 0, 0),
        };
        let late_events_written = engine.stats().events_late;
        let mut runner = Runner {
            sense,
            handle,
            engine,
            offset,
            written_through: i64::MIN,
            windows_written,
            checkpoint,
            pending: None,
            late_written: usize::MAX,
            late_events_written,
            lost: 0,
        };
        runner.read_mark()?;
        Ok(runner)
    }

    /// Reads the end of the last window written from the view's dataset (on a cluster, as
    /// committed by any node).
    fn read_mark(&mut self) -> Result<(), Error> {
        let plan = &self.handle.plan;
        let store = self.sense.gov.dataset_store();
        store.sync()?;
        let m = store.get(&plan.department, &plan.name)?;
        let through = m.current().and_then(|v| v.through_us).unwrap_or(i64::MIN);
        self.written_through = self.written_through.max(through);
        Ok(())
    }

    /// Whether the runner should end now: the server stops, or (on a cluster) this node let
    /// the view go.
    fn stopping(&self) -> bool {
        self.sense.stop.load(Ordering::Acquire) || self.handle.stop.load(Ordering::Acquire)
    }

    /// After a failed read or write: says so, waits a second (or ends, when stopping: false)
    /// and reads the mark again, since another runner may have written meanwhile.
    fn after_error(&mut self, what: &str, e: &Error) -> bool {
        tracing::error!(view = %self.handle.plan.sql_name(), error = %e.message, "{what}; retrying");
        self.status(Some(e.message.clone()));
        if self.stopping() {
            return false;
        }
        std::thread::sleep(Duration::from_secs(1));
        if let Err(e) = self.read_mark() {
            tracing::debug!(view = %self.handle.plan.sql_name(), error = %e.message, "the view's mark not read");
        }
        true
    }

    pub(crate) fn run(mut self) {
        let stream = self.handle.plan.stream.clone();
        let mut last_checkpoint = Instant::now();
        let mut checkpointed_offset = self.offset;
        let mut seen = self.sense.wake.current();
        loop {
            let stopping = self.stopping();
            let end = self.sense.log_for(&stream).end_offset(&stream);
            let mut progressed = false;
            if self.offset < end {
                match self.step(&stream) {
                    Ok(()) => progressed = true,
                    Err(_) if self.offset < self.sense.log_for(&stream).start_offset(&stream) => {
                        // Retention removed events this view had not read: say so and go on
                        // from what is left, rather than stop for good.
                        let start = self.sense.log_for(&stream).start_offset(&stream);
                        let lost = start - self.offset;
                        tracing::error!(view = %self.handle.plan.sql_name(), lost, "events were removed by retention before the view read them");
                        self.lost += lost;
                        self.offset = start;
                        continue;
                    }
                    Err(e) => {
                        if !self.after_error("view stopped on an error", &e) {
                            break;
                        }
                        continue;
                    }
                }
            }
            let closed = match self.close() {
                Ok(c) => c,
                Err(e) => {
                    if !self.after_error("writing the view's rows failed", &e) {
                        break;
                    }
                    continue;
                }
            };
            if (closed || stopping || last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
                && self.offset != checkpointed_offset
            {
                if let Err(e) = self.write_checkpoint() {
                    tracing::error!(view = %self.handle.plan.sql_name(), error = %e.message, "checkpoint failed");
                } else {
                    checkpointed_offset = self.offset;
                    last_checkpoint = Instant::now();
                }
            }
            self.status(None);
            if stopping {
                break;
            }
            if !progressed {
                seen = self.sense.wake.wait(seen, Duration::from_millis(200));
            }
        }
    }

    /// Reads a chunk of the log into the engine.
    fn step(&mut self, stream: &str) -> Result<(), Error> {
        let entries = self
            .sense
            .log_for(stream)
            .read(stream, self.offset, READ_BYTES)?;
        for e in entries {
            let skip = self.offset.saturating_sub(e.first) as usize;
            if skip >= e.count as usize {
                continue;
            }
            let mut skipped = 0usize;
            for b in decode_ipc(&e.payload)? {
                let rows = b.num_rows();
                if skipped + rows <= skip {
                    skipped += rows;
                    continue;
                }
                let from = skip.saturating_sub(skipped);
                skipped += rows;
                self.engine.process(&b.slice(from, rows - from))?;
            }
            self.offset = e.first + e.count as u64;
        }
        Ok(())
    }

    /// Closes ready windows and writes them (those not written before a restart); windows
    /// whose write failed are kept and written first next time.
    fn close(&mut self) -> Result<bool, Error> {
        let plan = self.handle.plan.clone();
        let store = self.sense.gov.dataset_store().clone();
        let now = self.sense.gov.now();
        let mut wrote = false;
        if self.pending.is_none() {
            self.pending = self.engine.close_ready()?;
        }
        if let Some(closed) = self.pending.take() {
            if let Err(e) = self.write_closed(&closed, &store, now) {
                self.pending = Some(closed);
                return Err(e);
            }
            wrote = true;
        }
        let late = self.engine.stats().events_late;
        if late != self.late_events_written || self.late_written == usize::MAX {
            let table = self.engine.late_rows()?;
            if table.num_rows() > 0 || self.late_written == usize::MAX {
                store.replace_view_rows(
                    &plan.department,
                    &format!("{}_late", plan.name),
                    &table,
                    system_actor_name(),
                    now,
                )?;
            }
            self.late_written = table.num_rows();
            self.late_events_written = late;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Writes closed windows not yet in the dataset (after its mark as committed, so that no
    /// window is written twice whichever runner wrote last), and sends them live.
    fn write_closed(
        &mut self,
        closed: &Closed,
        store: &yunqi_datasets::DatasetStore,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), Error> {
        let plan = self.handle.plan.clone();
        let known = self.written_through;
        if closed.through_end_us <= known {
            return Ok(());
        }
        let after = |mark: i64| unwritten(&closed.batch, &plan, mark.max(known));
        let written = store.append_view_rows(
            &plan.department,
            &plan.name,
            &after,
            closed.through_end_us,
            system_actor_name(),
            now,
        )?;
        self.written_through = self.written_through.max(closed.through_end_us);
        self.windows_written += closed.windows as u64;
        if let Some(rows) = written.filter(|r| r.num_rows() > 0) {
            let _ =
                self.handle
                    .live
                    .send(Arc::from(live_message(&plan, &rows, closed.through_end_us)));
        }
        Ok(())
    }

    fn write_checkpoint(&self) -> Result<(), Error> {
        let header = CheckpointHeader {
            offset: self.offset,
            windows_written: self.windows_written,
        };
        let mut bytes = serde_json::to_vec(&header).map_err(|e| Error::internal(e.to_string()))?;
        bytes.push(b'\n');
        bytes.extend_from_slice(&self.engine.snapshot()?);
        self.checkpoint.write(bytes)
    }

    fn status(&self, error: Option<String>) {
        let s = self.engine.stats();
        let mut st = self.handle.status.lock().expect("status lock");
        st.offset = self.offset;
        st.watermark = s.watermark_us.map(rfc3339);
        st.written_through =
            (self.written_through != i64::MIN).then(|| rfc3339(self.written_through));
        st.events_in = s.events_in;
        st.events_late = s.events_late;
        st.events_filtered = s.events_filtered;
        st.open_windows = s.open_windows;
        st.windows_written = self.windows_written;
        st.error = error.or_else(|| {
            (self.lost > 0).then(|| {
                format!(
                    "{} events were removed by the stream's retention before this view read them",
                    self.lost
                )
            })
        });
    }
}

/// The rows of windows ending after `through` (those not yet in the dataset).
fn unwritten(batch: &RecordBatch, plan: &ViewPlan, through: i64) -> Result<RecordBatch, Error> {
    if through == i64::MIN {
        return Ok(batch.clone());
    }
    let Some(i) = plan
        .outputs
        .iter()
        .position(|o| o.kind == crate::plan::OutputKind::WindowStart)
    else {
        return Ok(batch.clone());
    };
    let starts = batch.column(i).as_primitive::<TimestampMicrosecondType>();
    let size = plan.window.size_us;
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|r| Some(starts.value(r) + size > through))
        .collect();
    filter_record_batch(batch, &keep).map_err(|e| Error::internal(format!("filter: {e}")))
}

/// The live feed's message for newly closed windows.
fn live_message(plan: &ViewPlan, rows: &RecordBatch, through: i64) -> String {
    let mut out = String::with_capacity(rows.num_rows() * 96 + 128);
    out.push_str(&format!(
        "{{\"view\":\"{}\",\"through\":\"{}\",\"rows\":[",
        plan.sql_name(),
        rfc3339(through)
    ));
    for r in 0..rows.num_rows() {
        if r > 0 {
            out.push(',');
        }
        out.push('{');
        for (c, f) in rows.schema().fields().iter().enumerate() {
            if c > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(f.name()).unwrap_or_default());
            out.push(':');
            let col = rows.column(c);
            if col.is_null(r) {
                out.push_str("null");
                continue;
            }
            let v = array_value_to_string(col, r).unwrap_or_default();
            match f.data_type() {
                DataType::Int64 | DataType::Float64 => out.push_str(&v),
                _ => out.push_str(&serde_json::to_string(&v).unwrap_or_default()),
            }
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}
