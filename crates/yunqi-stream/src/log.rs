//! The embedded stream log: one directory per stream under a root, segment files appended and
//! made durable by one committer thread (group commit).
//!
//! Each round the committer gathers every queued append (up to `round_bytes_max` of payload),
//! groups them by stream in arrival order, gives each entry the next offsets of its stream,
//! encodes the frames of a stream into one buffer and writes it with one `pwrite` per touched
//! segment into space preallocated with zeros (so that `fdatasync` overwrites allocated blocks
//! instead of journaling a new file size), then calls `fdatasync` once per touched segment, and
//! only then publishes the new ends to readers and acknowledges the appends.
//!
//! One committer thread serves the whole log rather than one per stream: streams are created by
//! users, so per-stream threads would be unbounded, and they would all wait on the same device's
//! flushes anyway; one thread keeps the offset assignment trivially race-free and lets a single
//! round cover every stream. The cost is that the fsyncs of several streams in one round run one
//! after the other; if that shows in measurements, a round's fsyncs can be issued in parallel
//! without changing the format or the guarantees.
//!
//! Guarantees: per stream, offsets are dense and strictly increasing; an acknowledged append
//! survives `kill -9` and power loss; readers see only durable entries; after a failed write or
//! fsync the log refuses every further append (the page cache can no longer be trusted) instead
//! of leaving a gap. At open, a write torn by a crash at the end of a stream is cut off (it was
//! never acknowledged); damage anywhere else is kept and reported by the reads that reach it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use yunqi_types::{Clock, Error};

use crate::format::{self, IndexPoint, SEGMENT_HEADER_BYTES, SegmentHeader};
use crate::{
    Appended, BoxFuture, Entry, LogConfig, LogStats, Retention, RetentionReport, StreamLog,
    name_is_valid, validate_consumer_name, validate_stream_key,
};

/// Bytes of frames between two points of a segment's in-memory index: a read walks at most
/// this much before the entry it wants.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 64 << 10;

/// Name of the lock file in the root directory: one process opens a log at a time.
const LOCK_FILE: &str = ".lock";

/// State shared by the handle, the committer and the readers.
pub(crate) struct Shared {
    pub(crate) root: PathBuf,
    pub(crate) config: LogConfig,
    pub(crate) streams: RwLock<HashMap<String, Arc<StreamState>>>,
    failed: AtomicBool,
    closed: AtomicBool,
    pub(crate) stats: LogStats,
    /// Makes the names of temporary offset files unique.
    temp_seq: AtomicU64,
    /// Holds the root's lock for as long as the log is open.
    _lock: File,
}

impl Shared {
    pub(crate) fn stream(&self, key: &str) -> Option<Arc<StreamState>> {
        self.streams.read().expect("streams lock").get(key).cloned()
    }
}

/// One stream, as readers see it.
pub(crate) struct StreamState {
    pub(crate) key: String,
    pub(crate) dir: PathBuf,
    /// The durable end offset.
    pub(crate) end: AtomicU64,
    /// The stream's segments, oldest first; the last is the one being appended to. A segment
    /// appears here only once some of its entries are durable.
    pub(crate) segments: RwLock<Vec<Arc<Segment>>>,
    /// Serializes retention runs of this stream.
    retention: Mutex<()>,
}

impl StreamState {
    fn new(key: &str, dir: PathBuf, end: u64, segments: Vec<Arc<Segment>>) -> Self {
        StreamState {
            key: key.to_string(),
            dir,
            end: AtomicU64::new(end),
            segments: RwLock::new(segments),
            retention: Mutex::new(()),
        }
    }

    pub(crate) fn start_offset(&self) -> u64 {
        let segments = self.segments.read().expect("segments lock");
        match segments.first() {
            Some(s) => s.first,
            None => self.end.load(Ordering::Acquire),
        }
    }

    /// The segment holding `offset`: the last one starting at or before it.
    pub(crate) fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segments = self.segments.read().expect("segments lock");
        let i = segments.partition_point(|s| s.first <= offset);
        (i > 0).then(|| segments[i - 1].clone())
    }
}

/// One segment file.
pub(crate) struct Segment {
    pub(crate) first: u64,
    pub(crate) path: PathBuf,
    pub(crate) meta: Mutex<SegmentMeta>,
}

/// What readers need of a segment, changed together under one lock.
pub(crate) struct SegmentMeta {
    /// Open handle, shared by readers (opened on first read for segments found at open).
    pub(crate) file: Option<Arc<File>>,
    /// End of its durable frames (for a closed segment found at open: its file length).
    pub(crate) bytes: u64,
    /// The offset just past its last durable entry.
    pub(crate) end: u64,
    /// Append time of its last entry.
    pub(crate) last_appended_at_us: i64,
    /// Sparse index; `None` for a closed segment until its first read scans it.
    pub(crate) index: Option<Vec<IndexPoint>>,
}

type Reply = oneshot::Sender<Result<Appended, Error>>;

enum Msg {
    Append {
        stream: String,
        count: u32,
        payload: Vec<u8>,
        reply: Reply,
    },
    Shutdown(oneshot::Sender<()>),
}

/// The embedded stream log. See the module documentation.
pub struct SegmentLog {
    /// `None` only while dropping.
    tx: Option<mpsc::Sender<Msg>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SegmentLog {
    /// Opens (creating if needed) the log under `root`, discovering its streams and recovering
    /// from a crash: a torn, unacknowledged write at the end of a stream is cut off; damage
    /// elsewhere is kept for reads to report. Refuses a root another log holds open, and a
    /// segment whose header is damaged.
    pub fn open(
        root: &Path,
        config: LogConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<SegmentLog>, Error> {
        check_config(&config)?;
        fs::create_dir_all(root).map_err(|e| {
            io_failed(
                &format!("creating the stream log directory {}", root.display()),
                &e,
            )
        })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::unavailable(format!(
                    "the stream log in {} is in use",
                    root.display()
                ))
                .detail("another yunqi process, or another log in this process, has it open")
                .hint("stop the other process, or give this one its own data directory"));
            }
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }

        let mut streams = HashMap::new();
        let mut tails = HashMap::new();
        let mut last_time_us = 0i64;
        for entry in fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(key) = name.to_str() else { continue };
            if key == LOCK_FILE {
                continue;
            }
            if !entry.file_type()?.is_dir() || !name_is_valid(key) {
                tracing::warn!(path = %entry.path().display(), "ignoring a file that is not a stream in the stream log directory");
                continue;
            }
            let (state, tail) = open_stream(root, key)?;
            if let Some(tail) = tail {
                last_time_us = last_time_us.max(tail.last_at);
                tails.insert(key.to_string(), tail);
            }
            streams.insert(key.to_string(), state);
        }
        if streams.len() > config.streams_max {
            return Err(Error::limit(
                "streams_max",
                config.streams_max as u64,
                format!(
                    "the stream log in {} holds {} streams",
                    root.display(),
                    streams.len()
                ),
            )
            .hint("raise the limit, or remove streams that are no longer used"));
        }

        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            config,
            streams: RwLock::new(streams),
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stats: LogStats::default(),
            temp_seq: AtomicU64::new(0),
            _lock: lock,
        });
        let (tx, rx) = mpsc::channel(shared.config.queue_appends_max);
        let committer = Committer {
            shared: shared.clone(),
            clock,
            tails,
            last_time_us,
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("stream-committer".into())
            .spawn(move || committer.run(rx))?;
        Ok(Arc::new(SegmentLog {
            tx: Some(tx),
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The root directory of the log.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// The keys of the streams the log holds, sorted.
    pub fn streams(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .shared
            .streams
            .read()
            .expect("streams lock")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    fn sender(&self) -> &mpsc::Sender<Msg> {
        self.tx
            .as_ref()
            .expect("the sender lives until the log is dropped")
    }

    fn check_append(&self, stream: &str, count: u32, payload_bytes: usize) -> Result<(), Error> {
        validate_stream_key(stream)?;
        if count == 0 {
            return Err(Error::invalid(format!(
                "an entry of stream \"{stream}\" must hold at least one event"
            ))
            .detail("the entry's event count is 0")
            .hint("append only non-empty batches"));
        }
        let max = self.shared.config.entry_bytes_max;
        if payload_bytes > max {
            return Err(Error::limit(
                "entry_bytes_max",
                max as u64,
                format!("an entry of {payload_bytes} bytes is too large for stream \"{stream}\""),
            )
            .hint("split the batch into smaller ones"));
        }
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(failed());
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        Ok(())
    }

    /// Appends one entry; resolves once it is durable.
    pub async fn append(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> Result<Appended, Error> {
        self.check_append(stream, count, payload.len())?;
        let (reply, rx) = oneshot::channel();
        self.sender()
            .send(Msg::Append {
                stream: stream.to_string(),
                count,
                payload,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Appends one entry from a thread that is not async; returns once it is durable.
    pub fn append_blocking(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> Result<Appended, Error> {
        self.check_append(stream, count, payload.len())?;
        let (reply, rx) = oneshot::channel();
        self.sender()
            .blocking_send(Msg::Append {
                stream: stream.to_string(),
                count,
                payload,
                reply,
            })
            .map_err(|_| closed())?;
        rx.blocking_recv().map_err(|_| closed())?
    }

    /// The durable end of a stream (0 for an unknown one).
    pub fn end_offset(&self, stream: &str) -> u64 {
        self.shared
            .stream(stream)
            .map_or(0, |s| s.end.load(Ordering::Acquire))
    }

    /// The first offset a stream still keeps (0 for an unknown one).
    pub fn start_offset(&self, stream: &str) -> u64 {
        self.shared.stream(stream).map_or(0, |s| s.start_offset())
    }

    /// Durably records the offset `consumer` has processed `stream` up to.
    pub fn commit_offset(&self, stream: &str, consumer: &str, offset: u64) -> Result<(), Error> {
        validate_stream_key(stream)?;
        validate_consumer_name(consumer)?;
        let end = self.end_offset(stream);
        if offset > end {
            return Err(Error::invalid(format!(
                "offset {offset} is past the end of stream \"{stream}\""
            ))
            .detail(format!(
                "the stream ends at offset {end}; consumer \"{consumer}\" can only have read up to there"
            ))
            .hint("commit the end offset of the last entry the consumer processed"));
        }
        let fsync = self.shared.config.fsync;
        let stream_dir = self.shared.root.join(stream);
        let dir = stream_dir.join("consumers");
        let what =
            format!("committing the offset of consumer \"{consumer}\" of stream \"{stream}\"");
        let fail = |e: std::io::Error| io_failed(&what, &e);
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(fail)?;
            if fsync {
                sync_dir(&stream_dir).map_err(fail)?;
                sync_dir(&self.shared.root).map_err(fail)?;
            }
        }
        let seq = self.shared.temp_seq.fetch_add(1, Ordering::Relaxed);
        // A leading dot: no consumer's file can be taken for a temporary one.
        let temp = dir.join(format!(".{consumer}.offset.tmp{seq}"));
        let result = (|| {
            let f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&temp)?;
            f.write_all_at(&format::encode_offset_file(offset), 0)?;
            if fsync {
                f.sync_all()?;
            }
            fs::rename(&temp, dir.join(format!("{consumer}.offset")))?;
            if fsync {
                sync_dir(&dir)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(fail)
    }

    /// The offset `consumer` last committed on `stream`, if any.
    pub fn committed_offset(&self, stream: &str, consumer: &str) -> Result<Option<u64>, Error> {
        validate_stream_key(stream)?;
        validate_consumer_name(consumer)?;
        let path = self
            .shared
            .root
            .join(stream)
            .join("consumers")
            .join(format!("{consumer}.offset"));
        match fs::read(&path) {
            Ok(bytes) => format::decode_offset_file(&bytes).map(Some).map_err(|e| {
                Error::internal(format!(
                    "the committed offset of consumer \"{consumer}\" of stream \"{stream}\" is damaged"
                ))
                .detail(format!("{}: {e}", path.display()))
                .hint("commit the consumer's offset again, or remove the file to start it from its default position")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_failed(
                &format!("reading the committed offset of consumer \"{consumer}\""),
                &e,
            )),
        }
    }

    /// Removes old closed segments of a stream; see [`StreamLog::apply_retention`].
    pub fn apply_retention(
        &self,
        stream: &str,
        retention: &Retention,
        now_us: i64,
    ) -> Result<RetentionReport, Error> {
        validate_stream_key(stream)?;
        let Some(state) = self.shared.stream(stream) else {
            return Ok(RetentionReport::default());
        };
        let _serial = state.retention.lock().expect("retention lock");
        let segments: Vec<Arc<Segment>> = state.segments.read().expect("segments lock").clone();
        let sizes: Vec<(u64, i64)> = segments
            .iter()
            .map(|s| {
                let m = s.meta.lock().expect("segment lock");
                (m.bytes, m.last_appended_at_us)
            })
            .collect();
        let cutoff_us = retention
            .max_age
            .map(|age| now_us.saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX)));
        let mut total: u64 = sizes.iter().map(|s| s.0).sum();
        let mut remove = 0;
        // Never the last segment: it is the one being appended to.
        while remove + 1 < segments.len() {
            let (bytes, last_at) = sizes[remove];
            let too_old = cutoff_us.is_some_and(|c| last_at < c);
            let too_big = retention.max_bytes.is_some_and(|m| total > m);
            if !(too_old || too_big) {
                break;
            }
            total -= bytes;
            remove += 1;
        }
        let start_offset = segments
            .get(remove)
            .map_or_else(|| state.start_offset(), |s| s.first);
        if remove == 0 {
            return Ok(RetentionReport {
                start_offset,
                ..RetentionReport::default()
            });
        }
        {
            let mut current = state.segments.write().expect("segments lock");
            // Only retention removes segments, and runs of one stream are serialized; the
            // committer only adds at the end.
            assert!(
                current.len() >= segments.len()
                    && current
                        .iter()
                        .zip(&segments[..remove])
                        .all(|(a, b)| Arc::ptr_eq(a, b)),
                "the segments of stream {stream:?} changed under retention"
            );
            current.drain(..remove);
        }
        let mut bytes_removed = 0;
        for (segment, (bytes, _)) in segments.iter().zip(&sizes).take(remove) {
            fs::remove_file(&segment.path).map_err(|e| {
                io_failed(&format!("removing segment {}", segment.path.display()), &e)
            })?;
            bytes_removed += bytes;
        }
        if self.shared.config.fsync {
            sync_dir(&state.dir)
                .map_err(|e| io_failed(&format!("syncing {}", state.dir.display()), &e))?;
        }
        tracing::info!(
            stream,
            segments = remove,
            bytes = bytes_removed,
            start_offset,
            "retention removed old segments"
        );
        Ok(RetentionReport {
            segments_removed: remove,
            bytes_removed,
            start_offset,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &LogStats {
        &self.shared.stats
    }

    /// Makes everything queued durable and stops the committer. Appends after this fail with
    /// `unavailable`; reads go on working. Calling it twice is harmless.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.sender().send(Msg::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// [`SegmentLog::shutdown`] for callers that are not async.
    pub fn shutdown_blocking(&self) {
        let (done, wait) = oneshot::channel();
        if self.sender().blocking_send(Msg::Shutdown(done)).is_ok() {
            let _ = wait.blocking_recv();
        }
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for SegmentLog {
    /// Closes the queue and waits for the committer to finish what was queued, so that the
    /// root's lock is free when the drop returns.
    fn drop(&mut self) {
        drop(self.tx.take());
        let thread = self.thread.get_mut().map(|t| t.take()).unwrap_or_default();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl StreamLog for SegmentLog {
    fn append(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, Result<Appended, Error>> {
        let stream = stream.to_string();
        Box::pin(async move { SegmentLog::append(self, &stream, count, payload).await })
    }
    fn append_blocking(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> Result<Appended, Error> {
        SegmentLog::append_blocking(self, stream, count, payload)
    }
    fn read(&self, stream: &str, from: u64, max_bytes: usize) -> Result<Vec<Entry>, Error> {
        crate::read::read(&self.shared, stream, from, max_bytes)
    }
    fn end_offset(&self, stream: &str) -> u64 {
        SegmentLog::end_offset(self, stream)
    }
    fn start_offset(&self, stream: &str) -> u64 {
        SegmentLog::start_offset(self, stream)
    }
    fn commit_offset(&self, stream: &str, consumer: &str, offset: u64) -> Result<(), Error> {
        SegmentLog::commit_offset(self, stream, consumer, offset)
    }
    fn committed_offset(&self, stream: &str, consumer: &str) -> Result<Option<u64>, Error> {
        SegmentLog::committed_offset(self, stream, consumer)
    }
    fn apply_retention(
        &self,
        stream: &str,
        retention: &Retention,
        now_us: i64,
    ) -> Result<RetentionReport, Error> {
        SegmentLog::apply_retention(self, stream, retention, now_us)
    }
    fn stats(&self) -> &LogStats {
        SegmentLog::stats(self)
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(SegmentLog::shutdown(self))
    }
}

fn check_config(config: &LogConfig) -> Result<(), Error> {
    let bad = |what: &str| {
        Err(
            Error::invalid(format!("the stream log setting {what} is not valid"))
                .detail(format!("{config:?}")),
        )
    };
    if config.segment_bytes < (SEGMENT_HEADER_BYTES + format::FRAME_HEADER_BYTES) as u64 {
        return bad("segment_bytes");
    }
    if config.entry_bytes_max > u32::MAX as usize - format::FRAME_HEADER_BYTES {
        return bad("entry_bytes_max");
    }
    if config.queue_appends_max == 0 {
        return bad("queue_appends_max");
    }
    Ok(())
}

fn closed() -> Error {
    Error::unavailable("the stream log is shut down")
        .detail("yunqi is stopping; events are no longer accepted")
        .hint("retry once yunqi has restarted")
}

fn failed() -> Error {
    Error::unavailable("the stream log cannot be written")
        .detail(
            "a write or fsync of a stream segment failed earlier; to keep every stream without \
             gaps, yunqi refuses all appends until restarted",
        )
        .hint("check the disk of the data directory (space, errors in the kernel log), then restart yunqi")
}

fn io_failed(what: &str, e: &std::io::Error) -> Error {
    Error::internal(format!("{what} failed")).detail(e.to_string())
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes zeros over `[from, to)`.
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The segment files of a stream directory, sorted by first offset.
fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(first) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(format::parse_segment_file_name)
        {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

fn damaged_header(key: &str, path: &Path, what: &str) -> Error {
    Error::internal(format!("a segment file of stream \"{key}\" is damaged"))
        .detail(format!("{}: {what}", path.display()))
        .hint(
            "yunqi will not open a stream log with a damaged segment header; restore the file \
             from a backup, or move it out of the stream's directory to give up its entries",
        )
}

/// Where the committer appends to a stream.
struct Tail {
    state: Arc<StreamState>,
    segment: Arc<Segment>,
    file: Arc<File>,
    /// Where the next frame goes (frames written, durable or not).
    bytes: u64,
    /// Length of the file, preallocated zeros included.
    allocated: u64,
    /// The next offset.
    next: u64,
    /// Append time of the last entry.
    last_at: i64,
    /// Byte position of the segment's last index point.
    last_point: Option<u64>,
    /// Whether the segment is in the stream's list yet.
    published: bool,
}

/// Discovers one stream directory: its segments, and where appends continue.
fn open_stream(root: &Path, key: &str) -> Result<(Arc<StreamState>, Option<Tail>), Error> {
    let dir = root.join(key);
    let consumers = dir.join("consumers");
    if consumers.is_dir() {
        for entry in fs::read_dir(&consumers)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                fs::remove_file(&path)?;
            }
        }
    }
    let mut segments = list_segments(&dir)?;
    let mut base = 0;
    // The last segment, read whole: a segment whose creation a crash cut short (zeros or a
    // part of its header, nothing after) is removed; it never held an entry.
    let mut tail_buf = Vec::new();
    while let Some((first, path)) = segments.last() {
        let buf = fs::read(path)?;
        let header_ok = format::decode_segment_header(&buf).is_ok();
        let rest_zero = format::all_zero(buf.get(SEGMENT_HEADER_BYTES..).unwrap_or(&[]));
        if header_ok || !rest_zero {
            tail_buf = buf;
            break;
        }
        tracing::warn!(stream = key, segment = %path.display(), "removing a segment file whose creation was cut short by a crash");
        fs::remove_file(path)?;
        sync_dir(&dir)?;
        base = *first;
        segments.pop();
    }
    if segments.is_empty() {
        return Ok((Arc::new(StreamState::new(key, dir, base, Vec::new())), None));
    }

    let mut headers = Vec::with_capacity(segments.len());
    for (i, (first, path)) in segments.iter().enumerate() {
        let header = if i + 1 == segments.len() {
            format::decode_segment_header(&tail_buf)
        } else {
            let mut b = [0u8; SEGMENT_HEADER_BYTES];
            match File::open(path)?.read_exact_at(&mut b, 0) {
                Ok(()) => format::decode_segment_header(&b),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err("the file is shorter than a segment header".to_string())
                }
                Err(e) => return Err(e.into()),
            }
        }
        .map_err(|e| damaged_header(key, path, &e))?;
        if header.first != *first {
            return Err(damaged_header(
                key,
                path,
                &format!(
                    "the header says the segment starts at offset {}",
                    header.first
                ),
            ));
        }
        headers.push(header);
    }

    let mut list = Vec::with_capacity(segments.len());
    for i in 0..segments.len() - 1 {
        let (first, path) = &segments[i];
        list.push(Arc::new(Segment {
            first: *first,
            path: path.clone(),
            meta: Mutex::new(SegmentMeta {
                file: None,
                bytes: fs::metadata(path)?.len(),
                end: segments[i + 1].0,
                last_appended_at_us: headers[i + 1].prev_last_appended_at_us,
                index: None,
            }),
        }));
    }

    let (first, path) = segments.last().expect("a segment").clone();
    let header = *headers.last().expect("a header");
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let allocated = tail_buf.len() as u64;
    let mut scan = format::scan(&tail_buf, first, INDEX_INTERVAL_BYTES);
    if let Some(cut) = scan.damage.iter().find(|d| !d.proven).copied() {
        tracing::warn!(
            stream = key,
            segment = %path.display(),
            byte = cut.pos,
            offset = cut.offset,
            bytes = allocated - cut.pos,
            error = %cut.error,
            "cutting off a write torn by a crash at the end of a stream (it was never acknowledged)"
        );
        write_zeros(&file, cut.pos, allocated)?;
        file.sync_all()?;
        tail_buf.truncate(cut.pos as usize);
        scan = format::scan(&tail_buf, first, INDEX_INTERVAL_BYTES);
    }
    for d in &scan.damage {
        tracing::error!(
            stream = key,
            segment = %path.display(),
            byte = d.pos,
            offset = d.offset,
            error = %d.error,
            "damaged entry in the active segment of a stream: reads of it will fail"
        );
    }
    let last_at = scan
        .last_appended_at_us
        .unwrap_or(header.prev_last_appended_at_us);
    let file = Arc::new(file);
    let segment = Arc::new(Segment {
        first,
        path,
        meta: Mutex::new(SegmentMeta {
            file: Some(file.clone()),
            bytes: scan.end_pos,
            end: scan.end_offset,
            last_appended_at_us: last_at,
            index: Some(scan.points.clone()),
        }),
    });
    list.push(segment.clone());
    let state = Arc::new(StreamState::new(key, dir, scan.end_offset, list));
    let tail = Tail {
        state: state.clone(),
        segment,
        file,
        bytes: scan.end_pos,
        allocated,
        next: scan.end_offset,
        last_at,
        last_point: scan.points.last().map(|p| p.pos),
        published: true,
    };
    Ok((state, Some(tail)))
}

/// Creates a segment file holding only its header.
fn create_segment(
    dir: &Path,
    header: &SegmentHeader,
    fsync: bool,
) -> std::io::Result<(File, PathBuf)> {
    let path = dir.join(format::segment_file_name(header.first));
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    file.write_all_at(&format::encode_segment_header(header), 0)?;
    if fsync {
        file.sync_all()?;
        sync_dir(dir)?;
    }
    Ok((file, path))
}

struct Pending {
    count: u32,
    payload: Vec<u8>,
    reply: Reply,
}

/// Why a stream's part of a round failed.
enum Failure {
    /// This stream's appends are refused; the log goes on.
    Refused(Error),
    /// A write failed: the log refuses everything from now on.
    Io(Error),
}

/// What a round wrote into one segment, published to readers after the fsync.
struct SegmentWrite {
    segment: Arc<Segment>,
    /// Add the segment to the stream's list (it is new).
    publish: bool,
    points: Vec<IndexPoint>,
    bytes: u64,
    end: u64,
    last_at: i64,
}

/// What a round wrote for one stream.
struct Job {
    state: Arc<StreamState>,
    writes: Vec<SegmentWrite>,
    /// The segment to fsync (earlier ones of the round were synced when rolled over).
    sync: Arc<File>,
    appended: Vec<Appended>,
    events: u64,
    bytes: u64,
}

impl Job {
    fn publish(self, stats: &LogStats) -> Vec<Appended> {
        for w in self.writes {
            {
                let mut m = w.segment.meta.lock().expect("segment lock");
                m.bytes = w.bytes;
                m.end = w.end;
                m.last_appended_at_us = w.last_at;
                m.index.get_or_insert_with(Vec::new).extend(w.points);
            }
            if w.publish {
                self.state
                    .segments
                    .write()
                    .expect("segments lock")
                    .push(w.segment);
            }
        }
        let end = self.appended.last().map_or(0, |a| a.end);
        let previous = self.state.end.swap(end, Ordering::AcqRel);
        assert!(
            previous <= end,
            "the end of stream {:?} went backwards",
            self.state.key
        );
        stats
            .appended_entries
            .fetch_add(self.appended.len() as u64, Ordering::Relaxed);
        stats
            .appended_events
            .fetch_add(self.events, Ordering::Relaxed);
        stats
            .appended_bytes
            .fetch_add(self.bytes, Ordering::Relaxed);
        self.appended
    }
}

/// The committer thread's state.
struct Committer {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    tails: HashMap<String, Tail>,
    /// Append times never go backwards, whatever the clock does.
    last_time_us: i64,
    buf: Vec<u8>,
}

impl Committer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut shutdown = None;
        while let Some(first) = rx.blocking_recv() {
            let mut groups: Vec<(String, Vec<Pending>)> = Vec::new();
            let mut group_of: HashMap<String, usize> = HashMap::new();
            let mut bytes = 0usize;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Append {
                        stream,
                        count,
                        payload,
                        reply,
                    } => {
                        bytes += payload.len();
                        let pending = Pending {
                            count,
                            payload,
                            reply,
                        };
                        match group_of.get(&stream) {
                            Some(&i) => groups[i].1.push(pending),
                            None => {
                                group_of.insert(stream.clone(), groups.len());
                                groups.push((stream, vec![pending]));
                            }
                        }
                    }
                    Msg::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if bytes < self.shared.config.round_bytes_max {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(groups);
            if shutdown.is_some() {
                break;
            }
        }
        self.shared.closed.store(true, Ordering::Release);
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Append { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
                Msg::Shutdown(done) => {
                    let _ = done.send(());
                }
            }
        }
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    /// One group commit: write every stream's entries, fsync each touched segment, publish,
    /// acknowledge.
    fn commit(&mut self, groups: Vec<(String, Vec<Pending>)>) {
        if groups.is_empty() {
            return;
        }
        if self.shared.failed.load(Ordering::Acquire) {
            for (_, pending) in groups {
                for p in pending {
                    let _ = p.reply.send(Err(failed()));
                }
            }
            return;
        }
        let now_us = self.clock.now().timestamp_micros().max(self.last_time_us);
        self.last_time_us = now_us;
        let mut done: Vec<(Job, Vec<Reply>)> = Vec::with_capacity(groups.len());
        let mut unanswered: Vec<Reply> = Vec::new();
        let mut io_failure: Option<Error> = None;
        for (key, pending) in groups {
            let (items, replies): (Vec<(u32, Vec<u8>)>, Vec<Reply>) = pending
                .into_iter()
                .map(|p| ((p.count, p.payload), p.reply))
                .unzip();
            if io_failure.is_some() {
                unanswered.extend(replies);
                continue;
            }
            match self.write_stream(&key, &items, now_us) {
                Ok(job) => done.push((job, replies)),
                Err(Failure::Refused(e)) => {
                    for r in replies {
                        let _ = r.send(Err(e.clone()));
                    }
                }
                Err(Failure::Io(e)) => {
                    io_failure = Some(e);
                    unanswered.extend(replies);
                }
            }
        }
        if io_failure.is_none() && self.shared.config.fsync {
            for (job, _) in &done {
                let started = Instant::now();
                let result = job.sync.sync_data();
                self.shared
                    .stats
                    .sync_micros_total
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = result {
                    io_failure = Some(failed().detail(format!(
                        "fsync of a segment of stream \"{}\" failed: {e}",
                        job.state.key
                    )));
                    break;
                }
            }
        }
        if let Some(e) = io_failure {
            self.shared.failed.store(true, Ordering::Release);
            tracing::error!(error = %e.detail.as_deref().unwrap_or(&e.message), "a write or fsync of the stream log failed; refusing further appends");
            let replies = unanswered
                .into_iter()
                .chain(done.into_iter().flat_map(|(_, r)| r));
            for r in replies {
                let _ = r.send(Err(e.clone()));
            }
            return;
        }
        if !done.is_empty() {
            self.shared
                .stats
                .group_commits
                .fetch_add(1, Ordering::Relaxed);
        }
        for (job, replies) in done {
            let appended = job.publish(&self.shared.stats);
            for (r, a) in replies.into_iter().zip(appended) {
                let _ = r.send(Ok(a));
            }
        }
    }

    /// The tail of a stream, creating the stream or its first segment if needed.
    fn tail(&mut self, key: &str) -> Result<&mut Tail, Failure> {
        if !self.tails.contains_key(key) {
            let shared = &self.shared;
            let fsync = shared.config.fsync;
            let state = match shared.stream(key) {
                Some(state) => state,
                None => {
                    let count = shared.streams.read().expect("streams lock").len();
                    if count >= shared.config.streams_max {
                        return Err(Failure::Refused(
                            Error::limit(
                                "streams_max",
                                shared.config.streams_max as u64,
                                format!("stream \"{key}\" cannot be created: the stream log holds as many streams as it may"),
                            )
                            .hint("remove streams that are no longer used, or raise the limit"),
                        ));
                    }
                    let dir = shared.root.join(key);
                    let created = fs::create_dir_all(&dir).and_then(|()| {
                        if fsync {
                            sync_dir(&shared.root)?;
                        }
                        Ok(())
                    });
                    created.map_err(|e| {
                        Failure::Io(failed().detail(format!(
                            "creating the directory of stream \"{key}\" failed: {e}"
                        )))
                    })?;
                    let state = Arc::new(StreamState::new(key, dir, 0, Vec::new()));
                    shared
                        .streams
                        .write()
                        .expect("streams lock")
                        .insert(key.to_string(), state.clone());
                    state
                }
            };
            // A stream without a tail has no segments yet.
            let next = state.end.load(Ordering::Acquire);
            let header = SegmentHeader {
                first: next,
                prev_last_appended_at_us: 0,
            };
            let (file, path) = create_segment(&state.dir, &header, fsync).map_err(|e| {
                Failure::Io(failed().detail(format!(
                    "creating the first segment of stream \"{key}\" failed: {e}"
                )))
            })?;
            let tail = new_tail(state, file, path, next, self.last_time_us);
            self.tails.insert(key.to_string(), tail);
        }
        Ok(self.tails.get_mut(key).expect("tail just ensured"))
    }

    /// Encodes and writes one stream's entries of a round; the fsync comes after.
    fn write_stream(
        &mut self,
        key: &str,
        items: &[(u32, Vec<u8>)],
        now_us: i64,
    ) -> Result<Job, Failure> {
        let config = self.shared.config.clone();
        let mut buf = std::mem::take(&mut self.buf);
        let tail = self.tail(key)?;
        let io = |what: &str, e: std::io::Error| {
            Failure::Io(failed().detail(format!("{what} of stream \"{key}\" failed: {e}")))
        };
        let round_first = tail.next;
        let mut writes = Vec::new();
        let mut write = start_write(tail);
        let mut appended = Vec::with_capacity(items.len());
        let mut events = 0u64;
        let mut bytes = 0u64;
        buf.clear();
        for (count, payload) in items {
            let frame = format::frame_bytes(payload.len()) as u64;
            let used = tail.bytes + buf.len() as u64;
            if used > SEGMENT_HEADER_BYTES as u64 && used + frame > config.segment_bytes {
                write_at_end(tail, &buf, &config).map_err(|e| io("writing a segment", e))?;
                buf.clear();
                writes.push(finish_write(write, tail));
                roll(tail, config.fsync).map_err(|e| io("starting a new segment", e))?;
                write = start_write(tail);
            }
            let pos = tail.bytes + buf.len() as u64;
            if tail
                .last_point
                .is_none_or(|p| pos - p >= INDEX_INTERVAL_BYTES)
            {
                write.points.push(IndexPoint {
                    offset: tail.next,
                    pos,
                });
                tail.last_point = Some(pos);
            }
            let delta = u32::try_from(tail.next - round_first).unwrap_or(u32::MAX);
            format::encode_frame(&mut buf, tail.next, *count, delta, now_us, payload);
            let first = tail.next;
            tail.next += u64::from(*count);
            tail.last_at = now_us;
            appended.push(Appended {
                first,
                end: tail.next,
            });
            events += u64::from(*count);
            bytes += payload.len() as u64;
        }
        write_at_end(tail, &buf, &config).map_err(|e| io("writing a segment", e))?;
        writes.push(finish_write(write, tail));
        let job = Job {
            state: tail.state.clone(),
            writes,
            sync: tail.file.clone(),
            appended,
            events,
            bytes,
        };
        if buf.capacity() > config.round_bytes_max.max(1 << 20) * 2 {
            buf = Vec::new();
        }
        self.buf = buf;
        Ok(job)
    }
}

fn new_tail(state: Arc<StreamState>, file: File, path: PathBuf, first: u64, last_at: i64) -> Tail {
    let file = Arc::new(file);
    let segment = Arc::new(Segment {
        first,
        path,
        meta: Mutex::new(SegmentMeta {
            file: Some(file.clone()),
            bytes: SEGMENT_HEADER_BYTES as u64,
            end: first,
            last_appended_at_us: last_at,
            index: Some(Vec::new()),
        }),
    });
    Tail {
        state,
        segment,
        file,
        bytes: SEGMENT_HEADER_BYTES as u64,
        allocated: SEGMENT_HEADER_BYTES as u64,
        next: first,
        last_at,
        last_point: None,
        published: false,
    }
}

fn start_write(tail: &mut Tail) -> SegmentWrite {
    let publish = !tail.published;
    tail.published = true;
    SegmentWrite {
        segment: tail.segment.clone(),
        publish,
        points: Vec::new(),
        bytes: tail.bytes,
        end: tail.next,
        last_at: tail.last_at,
    }
}

fn finish_write(mut write: SegmentWrite, tail: &Tail) -> SegmentWrite {
    write.bytes = tail.bytes;
    write.end = tail.next;
    write.last_at = tail.last_at;
    write
}

/// Writes `buf` after the last frame, then grows the file with zeros past it when it went beyond
/// the allocated length: the next rounds then overwrite allocated blocks, and their `fdatasync`
/// skips the journal commit a growing file needs.
fn write_at_end(tail: &mut Tail, buf: &[u8], config: &LogConfig) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let end = tail.bytes + buf.len() as u64;
    tail.file.write_all_at(buf, tail.bytes)?;
    if end > tail.allocated {
        let target = (tail.allocated + config.preallocate_bytes)
            .min(config.segment_bytes)
            .max(end);
        write_zeros(&tail.file, end, target)?;
        tail.allocated = target;
    }
    tail.bytes = end;
    Ok(())
}

/// Starts a new segment. The old one is trimmed to its last frame and synced first, so that a
/// sync of the new file never acknowledges entries still unsynced in the old one.
fn roll(tail: &mut Tail, fsync: bool) -> std::io::Result<()> {
    tail.file.set_len(tail.bytes)?;
    if fsync {
        tail.file.sync_all()?;
    }
    let header = SegmentHeader {
        first: tail.next,
        prev_last_appended_at_us: tail.last_at,
    };
    let (file, path) = create_segment(&tail.state.dir, &header, fsync)?;
    let state = tail.state.clone();
    *tail = new_tail(state, file, path, tail.next, tail.last_at);
    Ok(())
}
