//! The embedded audit chain: segment files in a directory, appended and made durable by one
//! committer thread (group commit).
//!
//! Each round the committer gathers what is queued, writes it with one `pwrite` into space
//! preallocated with zeros (so that `fdatasync` flushes data without a journal commit), calls
//! `fdatasync` once, rewrites the head, and acknowledges every record of the round. This disk
//! completes one flush at a time however many are issued, so the only way up is more records
//! per flush: right after acknowledging a round, the committer waits up to `COMMIT_WINDOW` for
//! about as many records as it acknowledged, because those writers are about to append again.
//! An append returns only after the `fdatasync` that covers its record has returned.
//!
//! Guarantees: sequence numbers are dense from 1; times never go backwards; an acknowledged
//! record survives `kill -9` and power loss; after a failed write or fsync the chain refuses all
//! further appends (the page cache can no longer be trusted) instead of writing a gap.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use yunqi_types::{AuditEvent, Clock, Error, Limits};

use crate::format::{self, FrameError, HASH_BYTES, Hash};

/// What the chain says of an appended record once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Sequence number of the (last) appended record.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Records made durable since start.
    pub records_appended: AtomicU64,
    /// Group commits (fdatasync calls on segments) since start.
    pub group_commits: AtomicU64,
    /// Total time spent in those fdatasync calls, in microseconds.
    pub sync_micros_total: AtomicU64,
    /// Checkpoints made for the witnesses (see `witness`).
    pub witness_checkpoints: AtomicU64,
    /// The record of the last checkpoint.
    pub witness_last_seq: AtomicU64,
    /// Checkpoint writes that failed or were dropped (a witness too slow).
    pub witness_failures: AtomicU64,
    /// Time stamps that failed.
    pub witness_tsa_failures: AtomicU64,
}

enum Events {
    One(AuditEvent),
    Many(Vec<AuditEvent>),
}

impl Events {
    fn len(&self) -> usize {
        match self {
            Events::One(_) => 1,
            Events::Many(v) => v.len(),
        }
    }
}

type Reply = oneshot::Sender<Result<Receipt, Error>>;

enum Msg {
    Append { events: Events, reply: Reply },
    Shutdown(oneshot::Sender<()>),
}

struct SyncJob {
    file: Arc<File>,
    /// Records written by this job.
    records: u64,
    last: Receipt,
    replies: Vec<(Reply, Receipt)>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// State shared by the handle, the writer and the syncer.
struct Shared {
    dir: PathBuf,
    /// Sequence number of the last durable record (0 for none).
    durable_seq: AtomicU64,
    durable_hash: Mutex<Hash>,
    failed: AtomicBool,
    stats: AuditStats,
}

/// The embedded audit chain. Cheap to share behind an `Arc`.
pub struct AuditChain {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Where the chain ended when it was opened.
struct Tail {
    file: File,
    /// End of the last frame: where the next one is written.
    segment_bytes: u64,
    /// Length of the file, preallocated zeros included.
    allocated: u64,
    last_seq: u64,
    last_hash: Hash,
    last_time_us: i64,
}

/// The segments of a chain directory, sorted by first sequence number.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(".seg")
            && let Ok(first) = stem.parse::<u64>()
        {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the head file: `None` when there is none yet.
pub fn read_head(dir: &Path) -> Result<Option<(u64, Hash)>, Error> {
    match fs::read(dir.join("head")) {
        Ok(bytes) => format::decode_head(&bytes).map(Some).map_err(|e| {
            Error::internal(format!("audit chain head in {} is damaged", dir.display()))
                .detail(e)
                .hint("run `yunqi audit verify --data DIR` to see what else is damaged")
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn damaged(dir: &Path, what: String) -> Error {
    Error::internal(format!("audit chain in {} is damaged", dir.display()))
        .detail(what)
        .hint(
            "yunqi will not append to a damaged chain; run `yunqi audit verify --data DIR` \
             to name the first bad record, and restore the audit directory from a backup",
        )
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn create_segment(dir: &Path, first_seq: u64) -> Result<File, Error> {
    let path = dir.join(format::segment_file_name(first_seq));
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    file.write_all_at(&format::segment_header(first_seq), 0)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// Scans a segment, checking frames, sequence numbers and links. Returns
/// `(first_seq, last (seq, hash, time) if any, end of the last good frame, the error after it)`.
type SegmentScan = (u64, Option<(u64, Hash, i64)>, usize, Option<FrameError>);

fn scan_segment(path: &Path, buf: &[u8]) -> Result<SegmentScan, Error> {
    let first = format::parse_segment_header(buf)
        .map_err(|e| damaged(path, format!("{}: {e}", path.display())))?;
    let mut offset = format::SEGMENT_HEADER_BYTES;
    let mut last: Option<(u64, Hash, i64)> = None;
    let mut error = None;
    while offset < buf.len() {
        match format::read_frame(buf, offset) {
            Ok(frame) => {
                let seq = format::body_seq(frame.body);
                let expected = last.map_or(first, |l| l.0 + 1);
                if seq != expected {
                    return Err(damaged(
                        path,
                        format!("record {expected} is missing: found record {seq} in its place"),
                    ));
                }
                if let Some((_, prev_hash, _)) = last
                    && format::body_prev(frame.body) != prev_hash
                {
                    return Err(damaged(
                        path,
                        format!("record {seq} does not link to record {}", seq - 1),
                    ));
                }
                let time_us = i64::from_le_bytes(frame.body[9..17].try_into().expect("8 bytes"));
                last = Some((
                    seq,
                    frame.stored_hash.try_into().expect("32 bytes"),
                    time_us,
                ));
                offset = frame.end;
            }
            Err(FrameError::End) if format::all_zero(&buf[offset..]) => break,
            Err(FrameError::End) => {
                error = Some(FrameError::BadLength);
                break;
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    Ok((first, last, offset, error))
}

fn recover(dir: &Path) -> Result<Tail, Error> {
    fs::create_dir_all(dir)?;
    let head = read_head(dir)?;
    let segments = list_segments(dir)?;
    let Some((_, last_path)) = segments.last().cloned() else {
        if let Some((seq, _)) = head
            && seq > 0
        {
            return Err(damaged(
                dir,
                format!("no segment files are left, but the head says record {seq} was written"),
            ));
        }
        let file = create_segment(dir, 1)?;
        return Ok(Tail {
            file,
            segment_bytes: format::SEGMENT_HEADER_BYTES as u64,
            allocated: format::SEGMENT_HEADER_BYTES as u64,
            last_seq: 0,
            last_hash: [0; HASH_BYTES],
            last_time_us: 0,
        });
    };
    let buf = fs::read(&last_path)?;
    let (first, mut last, valid_end, error) = scan_segment(&last_path, &buf)?;
    if last.is_none() && segments.len() > 1 {
        // A segment holding only its header: the chain continues from the one before.
        let (_, prev_path) = &segments[segments.len() - 2];
        let prev_buf = fs::read(prev_path)?;
        let (_, prev_last, _, prev_error) = scan_segment(prev_path, &prev_buf)?;
        if let Some(e) = prev_error {
            return Err(damaged(
                dir,
                format!("{}: {e:?} inside a closed segment", prev_path.display()),
            ));
        }
        last = prev_last;
    }
    let (last_seq, last_hash, last_time_us) = last.unwrap_or((first - 1, [0; HASH_BYTES], 0));
    if let Some(e) = error {
        // A bad frame after the last good one. If the head says it was acknowledged, this is
        // damage; if not, it is a write torn by a crash, never acknowledged, and is zeroed.
        let head_seq = head.map_or(0, |h| h.0);
        if head_seq > last_seq {
            return Err(damaged(
                dir,
                format!(
                    "record {} is unreadable ({e:?}) but was acknowledged",
                    last_seq + 1
                ),
            ));
        }
        tracing::warn!(
            segment = %last_path.display(),
            bytes = buf.len() - valid_end,
            "zeroing a torn, unacknowledged write at the end of the audit chain"
        );
        let f = OpenOptions::new().write(true).open(&last_path)?;
        f.write_all_at(&vec![0u8; buf.len() - valid_end], valid_end as u64)?;
        f.sync_all()?;
    }
    if let Some((head_seq, head_hash)) = head {
        if head_seq > last_seq {
            return Err(damaged(
                dir,
                format!(
                    "the chain ends at record {last_seq} but its head says record {head_seq} was written: records were removed from the end"
                ),
            ));
        }
        if head_seq == last_seq && head_hash != last_hash {
            return Err(damaged(
                dir,
                format!("record {head_seq} does not match the hash in the head"),
            ));
        }
    }
    let file = OpenOptions::new().read(true).write(true).open(&last_path)?;
    Ok(Tail {
        file,
        segment_bytes: valid_end as u64,
        allocated: buf.len() as u64,
        last_seq,
        last_hash,
        last_time_us,
    })
}

impl AuditChain {
    /// Opens (creating if needed) the chain in `dir`, recovering from a crash: a torn,
    /// unacknowledged write at the end is cut off; any other damage refuses to open.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>, limits: &Limits) -> Result<AuditChain, Error> {
        let tail = recover(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            durable_seq: AtomicU64::new(tail.last_seq),
            durable_hash: Mutex::new(tail.last_hash),
            failed: AtomicBool::new(false),
            stats: AuditStats::default(),
        });
        let head_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("head"))?;
        head_file.write_all_at(&format::encode_head(tail.last_seq, &tail.last_hash), 0)?;
        head_file.sync_data()?;
        sync_dir(dir)?;

        let (tx, rx) = mpsc::channel(limits.audit_queue_records_max.max(1));
        let writer = Writer {
            shared: shared.clone(),
            clock,
            file: Arc::new(tail.file),
            segment_bytes: tail.segment_bytes,
            allocated: tail.allocated,
            preallocate_bytes: limits.audit_preallocate_bytes.max(1),
            segment_bytes_max: limits.audit_segment_bytes_max,
            next_seq: tail.last_seq + 1,
            last_hash: tail.last_hash,
            last_time_us: tail.last_time_us,
            batch_records_max: limits.audit_batch_records_max.max(1),
            field_bytes_max: limits.audit_field_bytes_max,
            buf: Vec::with_capacity(1 << 20),
        };
        let committer = Committer {
            shared: shared.clone(),
            head_file,
            head_dirty: false,
            last_head_sync: Instant::now(),
            last_ack: Instant::now(),
            last_commit_records: 0,
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("audit-committer".into())
                .spawn(move || writer.run(rx, committer))?,
        ];
        Ok(AuditChain {
            tx,
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// The directory of the chain.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends one record; returns when it is durable.
    pub async fn append(&self, event: AuditEvent) -> Result<Receipt, Error> {
        self.submit(Events::One(event)).await
    }

    /// Appends several records, consecutive in the chain; returns the receipt of the last when
    /// all are durable.
    pub async fn append_many(&self, events: Vec<AuditEvent>) -> Result<Receipt, Error> {
        if events.is_empty() {
            return Ok(self.durable_head());
        }
        self.submit(Events::Many(events)).await
    }

    async fn submit(&self, events: Events) -> Result<Receipt, Error> {
        self.check_healthy()?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Append { events, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Appends one record from a thread that is not async; returns when it is durable.
    pub fn append_blocking(&self, event: AuditEvent) -> Result<Receipt, Error> {
        self.check_healthy()?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Msg::Append {
                events: Events::One(event),
                reply,
            })
            .map_err(|_| closed())?;
        rx.blocking_recv().map_err(|_| closed())?
    }

    fn check_healthy(&self) -> Result<(), Error> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(Error::unavailable("the audit chain cannot be written")
                .detail("a write or fsync of the audit chain failed earlier; to keep the chain whole, yunqi refuses every audited action until restarted")
                .hint("check the disk of the data directory (space, errors in the kernel log), then restart yunqi"));
        }
        Ok(())
    }

    /// Sequence number and hash of the last durable record.
    pub fn durable_head(&self) -> Receipt {
        Receipt {
            seq: self.shared.durable_seq.load(Ordering::Acquire),
            hash: *self.shared.durable_hash.lock().expect("head lock"),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &AuditStats {
        &self.shared.stats
    }

    /// Writes everything queued, makes it durable, syncs the head and stops the threads.
    /// Appends after this fail with `unavailable`. Calling it twice is harmless.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// [`AuditChain::shutdown`] for callers that are not async.
    pub fn shutdown_blocking(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.blocking_send(Msg::Shutdown(done)).is_ok() {
            let _ = wait.blocking_recv();
        }
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn closed() -> Error {
    Error::unavailable("the audit chain is shut down")
        .detail("yunqi is stopping; audited actions are no longer accepted")
        .hint("retry once yunqi has restarted")
}

/// Appends gathered for one group commit.
#[derive(Default)]
struct Gathered {
    batch: Vec<(Events, Reply)>,
    records: usize,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Gathered {
    fn add(&mut self, msg: Msg) {
        match msg {
            Msg::Append { events, reply } => {
                self.records += events.len();
                self.batch.push((events, reply));
            }
            Msg::Shutdown(done) => self.shutdown = Some(done),
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    file: Arc<File>,
    /// Where the next frame goes.
    segment_bytes: u64,
    /// Length of the segment file (zeros past `segment_bytes`).
    allocated: u64,
    preallocate_bytes: u64,
    segment_bytes_max: u64,
    next_seq: u64,
    last_hash: Hash,
    last_time_us: i64,
    batch_records_max: usize,
    field_bytes_max: usize,
    buf: Vec<u8>,
}

impl Writer {
    /// The committer loop: gather appends, write them with one `pwrite`, make them durable
    /// with one `fdatasync`, acknowledge them.
    fn run(mut self, mut rx: mpsc::Receiver<Msg>, mut committer: Committer) {
        let mut shutdown = None;
        while shutdown.is_none() {
            let first = loop {
                match rx.try_recv() {
                    Ok(msg) => break Some(msg),
                    Err(mpsc::error::TryRecvError::Disconnected) => break None,
                    // Writers just acknowledged are about to append again.
                    Err(mpsc::error::TryRecvError::Empty)
                        if committer.last_ack.elapsed() < COMMIT_WINDOW =>
                    {
                        std::thread::yield_now();
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Idle: a good moment to make the head durable.
                        committer.sync_head();
                        break rx.blocking_recv();
                    }
                }
            };
            let Some(first) = first else { break };
            let mut g = Gathered::default();
            g.add(first);
            while g.shutdown.is_none() && g.records < self.batch_records_max {
                match rx.try_recv() {
                    Ok(msg) => g.add(msg),
                    Err(_) => break,
                }
            }
            // Right after an acknowledgement, its writers are about to append again: wait a
            // little for as many records as were acknowledged, so that one fsync serves them.
            if g.shutdown.is_none() && committer.last_ack.elapsed() < COMMIT_WINDOW {
                let target = (committer.last_commit_records as usize).min(self.batch_records_max);
                let deadline = Instant::now() + COMMIT_WINDOW;
                while g.records < target && g.shutdown.is_none() && Instant::now() < deadline {
                    match rx.try_recv() {
                        Ok(msg) => g.add(msg),
                        Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    }
                }
            }
            shutdown = g.shutdown.take();
            let batch = g.batch;
            let job = self.write_batch(batch, shutdown.take());
            let is_shutdown = job.as_ref().is_some_and(|j| j.shutdown.is_some());
            if let Some(job) = job {
                committer.commit(job);
            }
            if is_shutdown {
                break;
            }
        }
        committer.sync_head();
        rx.close();
        // Fail whatever is still queued: the chain is closing.
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Append { reply, .. } = msg {
                let _ = reply.send(Err(closed()));
            }
        }
    }

    fn write_batch(
        &mut self,
        batch: Vec<(Events, Reply)>,
        shutdown: Option<oneshot::Sender<()>>,
    ) -> Option<SyncJob> {
        if self.shared.failed.load(Ordering::Acquire) {
            for (_, reply) in batch {
                let _ = reply.send(Err(Error::unavailable("the audit chain cannot be written")));
            }
            return shutdown.map(|s| SyncJob {
                file: self.file.clone(),
                records: 0,
                last: Receipt {
                    seq: self.next_seq - 1,
                    hash: self.last_hash,
                },
                replies: Vec::new(),
                shutdown: Some(s),
            });
        }
        if self.segment_bytes >= self.segment_bytes_max
            && !batch.is_empty()
            && let Err(e) = self.roll()
        {
            self.fail(batch, &e);
            return None;
        }
        self.buf.clear();
        let first_seq = self.next_seq;
        let now_us = self.clock.now().timestamp_micros();
        let time_us = now_us.max(self.last_time_us);
        let mut replies = Vec::with_capacity(batch.len());
        for (events, reply) in batch {
            let slice: &[AuditEvent] = match &events {
                Events::One(e) => std::slice::from_ref(e),
                Events::Many(v) => v,
            };
            for e in slice {
                let hash = format::encode_record(
                    &mut self.buf,
                    self.next_seq,
                    time_us,
                    &self.last_hash,
                    e,
                    self.field_bytes_max,
                );
                self.last_hash = hash;
                self.next_seq += 1;
            }
            replies.push((
                reply,
                Receipt {
                    seq: self.next_seq - 1,
                    hash: self.last_hash,
                },
            ));
        }
        self.last_time_us = time_us;
        if let Err(e) = self.write_at_end() {
            let err = Error::unavailable("the audit chain cannot be written")
                .detail(format!("writing the audit segment failed: {e}"));
            self.shared.failed.store(true, Ordering::Release);
            for (reply, _) in replies {
                let _ = reply.send(Err(err.clone()));
            }
            return None;
        }
        self.segment_bytes += self.buf.len() as u64;
        if self.buf.capacity() > (8 << 20) {
            self.buf = Vec::with_capacity(1 << 20);
        }
        Some(SyncJob {
            file: self.file.clone(),
            records: self.next_seq - first_seq,
            last: Receipt {
                seq: self.next_seq - 1,
                hash: self.last_hash,
            },
            replies,
            shutdown,
        })
    }

    /// Writes the encoded batch after the last frame, first growing the file with zeros when
    /// the batch would not fit: overwriting allocated zeros lets `fdatasync` skip the journal
    /// commit that a growing file needs, which halves its cost.
    fn write_at_end(&mut self) -> std::io::Result<()> {
        let end = self.segment_bytes + self.buf.len() as u64;
        if end > self.allocated {
            let target =
                end.max((self.allocated + self.preallocate_bytes).min(self.segment_bytes_max));
            static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
            let mut at = self.allocated;
            while at < target {
                let n = (target - at).min(ZEROS.len() as u64) as usize;
                self.file.write_all_at(&ZEROS[..n], at)?;
                at += n as u64;
            }
            self.allocated = target;
        }
        self.file.write_all_at(&self.buf, self.segment_bytes)
    }

    /// Starts a new segment. The old one is trimmed to its last frame and synced first, so
    /// that a sync of the new file never acknowledges records still unsynced in the old one.
    fn roll(&mut self) -> Result<(), Error> {
        self.file.set_len(self.segment_bytes)?;
        self.file.sync_all()?;
        let file = create_segment(&self.shared.dir, self.next_seq)?;
        self.file = Arc::new(file);
        self.segment_bytes = format::SEGMENT_HEADER_BYTES as u64;
        self.allocated = self.segment_bytes;
        Ok(())
    }

    fn fail(&self, batch: Vec<(Events, Reply)>, e: &Error) {
        self.shared.failed.store(true, Ordering::Release);
        for (_, reply) in batch {
            let _ = reply
                .send(Err(Error::unavailable("the audit chain cannot be written")
                    .detail(e.message.clone())));
        }
    }
}

/// How often, at least, the head file itself is fsynced under load (it is also fsynced
/// whenever the chain goes idle). The head is rewritten (in the page cache, which survives
/// `kill -9`) after every group commit; a power loss can lose at most this much of its progress,
/// which weakens the truncation check for that moment but never raises a false alarm, because
/// the head is written only after the records it names are durable.
const HEAD_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// The longest a group commit waits for more records before it writes. It waits only right
/// after an acknowledgement, and only for about as many records as that acknowledged: their
/// writers are likely to append again at once, and on a disk that completes one flush at a
/// time, one fsync for all of them beats one fsync per wave. PostgreSQL's `commit_delay` does
/// the same with a fixed delay.
const COMMIT_WINDOW: Duration = Duration::from_micros(150);

/// Makes written records durable and acknowledges them.
struct Committer {
    shared: Arc<Shared>,
    head_file: File,
    head_dirty: bool,
    last_head_sync: Instant,
    last_ack: Instant,
    last_commit_records: u64,
}

impl Committer {
    fn sync_head(&mut self) {
        if self.head_dirty {
            if let Err(e) = self.head_file.sync_data() {
                tracing::error!(error = %e, "fsync of the audit head failed");
            }
            self.head_dirty = false;
            self.last_head_sync = Instant::now();
        }
    }

    /// `fdatasync`, then the head, then the acknowledgements.
    fn commit(&mut self, job: SyncJob) {
        let shared = &self.shared;
        let started = Instant::now();
        let result = if shared.failed.load(Ordering::Acquire) {
            Err(std::io::Error::other("an earlier write failed"))
        } else {
            job.file.sync_data()
        };
        let sync_micros = started.elapsed().as_micros() as u64;
        match result {
            Ok(()) => {
                shared.stats.group_commits.fetch_add(1, Ordering::Relaxed);
                shared
                    .stats
                    .sync_micros_total
                    .fetch_add(sync_micros, Ordering::Relaxed);
                let last = job.last;
                if last.seq > shared.durable_seq.load(Ordering::Acquire) {
                    // The head may only name durable records: written after the fsync above.
                    if let Err(e) = self
                        .head_file
                        .write_all_at(&format::encode_head(last.seq, &last.hash), 0)
                    {
                        tracing::error!(error = %e, "writing the audit head failed");
                    }
                    self.head_dirty = true;
                    let previous = shared.durable_seq.swap(last.seq, Ordering::AcqRel);
                    *shared.durable_hash.lock().expect("head lock") = last.hash;
                    shared
                        .stats
                        .records_appended
                        .fetch_add(last.seq - previous, Ordering::Relaxed);
                }
                for (reply, receipt) in job.replies {
                    let _ = reply.send(Ok(receipt));
                }
                self.last_ack = Instant::now();
                self.last_commit_records = job.records;
            }
            Err(e) => {
                shared.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "fsync of the audit chain failed; refusing further appends");
                let err = Error::unavailable("the audit chain cannot be written")
                    .detail(format!("fsync of the audit segment failed: {e}"));
                for (reply, _) in job.replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
        if self.head_dirty && self.last_head_sync.elapsed() >= HEAD_SYNC_INTERVAL {
            self.sync_head();
        }
        if job.shutdown.is_some() {
            self.sync_head();
        }
        if let Some(done) = job.shutdown {
            let _ = done.send(());
        }
    }
}
