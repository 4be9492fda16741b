//! The stream log: the durable, ordered record of events under yunqi's streams (sensor
//! detections and the like), read back by offset.
//!
//! [`StreamLog`] is the narrow interface the rest of yunqi uses; [`SegmentLog`] is the embedded
//! implementation (per-stream segment files under a root directory, one committer thread with
//! group commit, the audit chain's design without its hash chain). Another implementation (a NATS
//! JetStream stream) only has to keep the same guarantees:
//!
//! - the log is format-agnostic: an entry is an opaque payload (yunqi puts one Arrow IPC batch in
//!   it) carrying `count` events; offsets count events, so an entry appended when a stream ends at
//!   `E` covers `[E, E + count)`, and offsets are dense and strictly increasing per stream;
//! - `append` resolves only once its entry is durable; an acknowledged entry survives `kill -9`
//!   and power loss; readers see only durable entries;
//! - damage is reported, never skipped silently.
#![deny(missing_docs)]

pub mod format;
mod log;
mod read;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use log::SegmentLog;
use yunqi_types::Error;

/// A boxed future, for the object-safe [`StreamLog`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Longest stream key or consumer name.
pub const NAME_BYTES_MAX: usize = 128;

/// Settings and limits of a [`SegmentLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Size at which a stream starts a new segment file. An entry larger than this gets a
    /// segment of its own.
    pub segment_bytes: u64,
    /// Whether appends are made durable with `fdatasync` before they are acknowledged. `false`
    /// only for benchmarks: acknowledged entries can then be lost on power loss.
    pub fsync: bool,
    /// Largest payload of one entry.
    pub entry_bytes_max: usize,
    /// Bound of the append queue; async callers wait when it is full, blocking callers block.
    pub queue_appends_max: usize,
    /// Payload bytes after which a group commit stops gathering more appends (it always takes
    /// at least one).
    pub round_bytes_max: usize,
    /// How far ahead of its last frame a segment is grown with zeros (capped at
    /// `segment_bytes`).
    pub preallocate_bytes: u64,
    /// Most streams in one log.
    pub streams_max: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 << 20,
            fsync: true,
            entry_bytes_max: 64 << 20,
            queue_appends_max: 4_096,
            round_bytes_max: 64 << 20,
            preallocate_bytes: 8 << 20,
            streams_max: 10_000,
        }
    }
}

/// How long a stream keeps its entries. Either bound removes whole closed segments, oldest
/// first; the segment being appended to is never removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove a closed segment once its last entry is older than this.
    pub max_age: Option<Duration>,
    /// Remove closed segments while the stream's segments take more than this.
    pub max_bytes: Option<u64>,
}

/// What [`StreamLog::apply_retention`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segment files removed.
    pub segments_removed: usize,
    /// Their bytes.
    pub bytes_removed: u64,
    /// The first offset the stream still keeps.
    pub start_offset: u64,
}

/// The offsets an append was given once it is durable: `[first, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the entry's first event.
    pub first: u64,
    /// Offset just past its last event: the stream's end right after it.
    pub end: u64,
}

/// One durable entry, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Offset of its first event.
    pub first: u64,
    /// Its number of events.
    pub count: u32,
    /// When it was appended, microseconds since the Unix epoch (from the log's clock; never
    /// decreasing within a log).
    pub appended_at_us: i64,
    /// The payload, as appended.
    pub payload: Vec<u8>,
}

impl Entry {
    /// The offset just past its last event.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Entries made durable since start.
    pub appended_entries: AtomicU64,
    /// Events in those entries.
    pub appended_events: AtomicU64,
    /// Payload bytes of those entries.
    pub appended_bytes: AtomicU64,
    /// Group commits that made appends durable.
    pub group_commits: AtomicU64,
    /// Total time spent in `fdatasync` calls, in microseconds.
    pub sync_micros_total: AtomicU64,
}

/// What yunqi needs of a stream log (`yunqi-stream-nats` implements it on NATS JetStream).
pub trait StreamLog: Send + Sync + 'static {
    /// Appends one entry of `count` events to `stream` (created on first append); resolves to
    /// its offsets once it is durable.
    fn append(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, Result<Appended, Error>>;
    /// [`StreamLog::append`] only if the stream ends at `expected_first` when the entry is
    /// stored, else a `conflict` error naming [`DEPOSED`]: how a single writer that other
    /// processes may replace (a service's decider, owned by a lease) is fenced off — once its
    /// successor has appended, its own appends fail. The default suits logs of one process,
    /// where nobody appends between the check and the append.
    fn append_expecting(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
        expected_first: u64,
    ) -> BoxFuture<'_, Result<Appended, Error>> {
        let end = self.end_offset(stream);
        if end != expected_first {
            let e = deposed(stream, expected_first, end);
            return Box::pin(async move { Err(e) });
        }
        self.append(stream, count, payload)
    }
    /// [`StreamLog::append`] for threads that are not async; must not be called from within an
    /// async runtime's worker thread.
    fn append_blocking(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> Result<Appended, Error>;
    /// Durable entries whose range ends after `from`, in order, up to about `max_bytes` of
    /// payload; at least one entry when any exists, even one larger than `max_bytes`. An entry
    /// holding `from` is returned whole: the caller skips the events it has seen. Empty at the
    /// end of the stream. Blocking: call from a blocking context.
    fn read(&self, stream: &str, from: u64, max_bytes: usize) -> Result<Vec<Entry>, Error>;
    /// The durable end of a stream: the offset the next append gets (0 for an unknown stream).
    fn end_offset(&self, stream: &str) -> u64;
    /// The end of a stream as stored now, for a reader who must see every append already
    /// acknowledged anywhere (a shared log asks its engine rather than answer from what it
    /// learnt a moment ago). Not for hot loops: use [`StreamLog::end_offset`] there.
    fn current_end_offset(&self, stream: &str) -> u64 {
        self.end_offset(stream)
    }
    /// The first offset the stream still keeps (retention removes older ones).
    fn start_offset(&self, stream: &str) -> u64;
    /// Durably records that `consumer` has processed `stream` up to `offset` (exclusive).
    fn commit_offset(&self, stream: &str, consumer: &str, offset: u64) -> Result<(), Error>;
    /// The offset last committed by `consumer`, if any.
    fn committed_offset(&self, stream: &str, consumer: &str) -> Result<Option<u64>, Error>;
    /// Removes whole closed segments, oldest first, whose last entry is older than
    /// `retention.max_age` at `now_us`, or while the stream takes more than
    /// `retention.max_bytes`. Never removes the segment being appended to.
    fn apply_retention(
        &self,
        stream: &str,
        retention: &Retention,
        now_us: i64,
    ) -> Result<RetentionReport, Error>;
    /// Counters for metrics.
    fn stats(&self) -> &LogStats;
    /// Makes everything queued durable and stops; later appends fail with `unavailable`.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// Whether other processes (the other nodes of a cluster) append to the same streams, so
    /// that what this process has not appended may appear at the end.
    fn shared(&self) -> bool {
        false
    }
}

/// The detail of the error [`StreamLog::append_expecting`] fails with when another writer
/// appended first.
pub const DEPOSED: &str = "another writer appended to the stream first";

/// The error of an append that found the stream longer than its writer expected.
pub fn deposed(stream: &str, expected: u64, end: u64) -> Error {
    Error::new(
        yunqi_types::ErrorCode::Conflict,
        format!("the log {stream} ends at {end}, not at {expected}"),
    )
    .detail(DEPOSED)
}

/// Checks a stream key: 1 to [`NAME_BYTES_MAX`] characters of `a-z`, `0-9`, `_`, `.` and `-`,
/// starting with a letter or a digit (a key is a directory name: no `.`, `..` or hidden files).
pub fn validate_stream_key(key: &str) -> Result<(), Error> {
    validate_name("stream", key)
}

/// Checks a consumer name (the same rules as [`validate_stream_key`]).
pub fn validate_consumer_name(name: &str) -> Result<(), Error> {
    validate_name("consumer", name)
}

fn name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

fn validate_name(kind: &str, name: &str) -> Result<(), Error> {
    if name_is_valid(name) {
        return Ok(());
    }
    let shown: String = name.chars().take(NAME_BYTES_MAX + 8).collect();
    let mut err = Error::invalid(format!("{kind} name \"{shown}\" is not valid")).detail(format!(
        "a {kind} name is 1 to {NAME_BYTES_MAX} characters of a-z, 0-9, '_', '.' and '-', \
         starting with a letter or a digit"
    ));
    let lower = name.to_ascii_lowercase();
    if lower != name && name_is_valid(&lower) {
        err = err.hint(format!("did you mean \"{lower}\"?"));
    } else {
        err = err.hint(format!(
            "name the {kind} like \"traffic.detections\": lowercase words joined by '.', '_' or '-'"
        ));
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["traffic.detections", "a", "0-x_y.z", &"a".repeat(128)] {
            assert!(validate_stream_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "A",
            "é",
            &"a".repeat(129),
        ] {
            assert!(validate_stream_key(bad).is_err(), "{bad}");
        }
        let e = validate_stream_key("Traffic.Detections").unwrap_err();
        assert_eq!(
            e.hint.as_deref(),
            Some("did you mean \"traffic.detections\"?")
        );
    }
}
