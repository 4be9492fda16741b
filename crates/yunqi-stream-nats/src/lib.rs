//! The stream log on NATS JetStream: [`NatsLog`] implements [`StreamLog`] so that the nodes of
//! a cluster share every stream's events.
//!
//! Layout, under a prefix `P` (one per cluster; tests use one each):
//!
//! - one JetStream stream `P-<key>` per yunqi stream (`.` in the key written `_d`, `_` as
//!   `__`), file storage, on the subject `P.stream.<key>`;
//! - each JetStream message is one *round*: the entries one node's writer gathered while the
//!   previous round was in flight (group commit), framed as `count u32 · length u32 · payload`
//!   each, with headers `Yunqi-First`, `Yunqi-End` (event offsets) and `Yunqi-At` (append
//!   time, microseconds);
//! - the first message of every stream is an empty *genesis* round (offsets 0..0), published
//!   with a fixed message id so that racing creators store one;
//! - consumer offsets live in the key-value bucket `P-offsets`, key `<stream>/<consumer>`;
//! - each node's audit chain is the stream `P-audit-<node>` ([`audit`]).
//!
//! Offsets stay dense and strictly increasing although several nodes append to one stream:
//! every round is published with `Nats-Expected-Last-Sequence` set to the sequence of the round
//! it follows, so JetStream stores it only if no other node's round came in between; on a
//! conflict the writer reads the new tail and frames the round again. Every round carries a
//! `Nats-Msg-Id` kept across its retries, so a round whose acknowledgement was lost (a timeout,
//! a reconnect) and is sent again is stored once: JetStream answers "duplicate" with the first
//! copy's sequence, whose offsets the writer then reads back.
//!
//! An append resolves once JetStream has acknowledged its round, that is once the round is
//! stored on the stream's replicas (a quorum of them for R3). A single NATS server keeps the
//! embedded log's power-loss guarantee only with `sync_interval: always` in its JetStream
//! settings; ARCHITECTURE.md says which setting the project's scripts use.
//!
//! When NATS cannot be reached, appends retry for up to [`NatsConfig::unavailable_after`] and
//! then fail with `unavailable` (HTTP 503) and a hint; nothing half-written is left behind
//! (a round is one message: stored whole or not at all). The client reconnects by itself, so
//! yunqi resumes without a restart once NATS is back.
#![deny(missing_docs)]

pub mod audit;
mod frame;
pub mod server;

pub use audit::NatsAudit;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use yunqi_stream::{
    Appended, BoxFuture, Entry, LogStats, Retention, RetentionReport, StreamLog,
    validate_consumer_name, validate_stream_key,
};
use yunqi_types::{Clock, Error};

pub use frame::{FRAME_ENTRY_HEADER_BYTES, HEADER_AT, HEADER_END, HEADER_FIRST};

/// Bytes of a message kept for headers when a round is sized against the server's
/// `max_payload`.
const HEADROOM_BYTES: usize = 1024;

/// How long an idle reader's consumer is kept for the next sequential read.
const READER_IDLE: Duration = Duration::from_secs(2);

/// Bytes a reader's consumer asks for at once (its batch is this over the stream's average
/// message size).
const READER_BATCH_BYTES: u64 = 16 << 20;

/// How long a cached stream end is trusted before `end_offset` asks JetStream again (another
/// node may have appended).
const END_FRESH: Duration = Duration::from_millis(50);

/// Most rounds one writer frames again after conflicts with other nodes before it gives up on
/// the batch (each conflict means another node's round was stored: the cluster progresses).
const CONFLICTS_MAX: usize = 10_000;

/// Settings of a [`NatsLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URLs, comma separated (`nats://127.0.0.1:4222,nats://10.0.0.2:4222`).
    pub urls: String,
    /// Prefix of every JetStream stream, subject and bucket yunqi makes: one per cluster.
    pub prefix: String,
    /// Replicas of each JetStream stream: 1 on a single server, 3 on a JetStream cluster.
    pub replicas: usize,
    /// Bound of each stream's append queue.
    pub queue_appends_max: usize,
    /// Timeout of one JetStream request (a publish's acknowledgement, a read).
    pub request_timeout: Duration,
    /// How long an append keeps retrying while NATS cannot be reached before it fails.
    pub unavailable_after: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: "nats://127.0.0.1:4222".into(),
            prefix: "yunqi".into(),
            replicas: 1,
            queue_appends_max: 4_096,
            request_timeout: Duration::from_secs(2),
            unavailable_after: Duration::from_secs(6),
        }
    }
}

/// What [`init`] found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The server's version.
    pub server_version: String,
    /// Whether the offsets bucket was created now (false: it existed).
    pub created_offsets_bucket: bool,
    /// yunqi streams already in JetStream under the prefix.
    pub streams: usize,
    /// The server's largest message, bytes (bounds one entry).
    pub max_payload: usize,
}

/// The stream log on NATS JetStream.
pub struct NatsLog {
    inner: Arc<Inner>,
    runtime: OwnRuntime,
}

struct Inner {
    js: jetstream::Context,
    offsets: kv::Store,
    config: NatsConfig,
    clock: Arc<dyn Clock>,
    round_bytes_max: usize,
    writers: Mutex<HashMap<String, mpsc::Sender<Pending>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    streams: Mutex<HashMap<String, Arc<Cached>>>,
    closed: AtomicBool,
    stats: LogStats,
}

/// What this node knows of a stream without asking: its tail and where a sequential reader
/// left off.
#[derive(Default)]
struct Cached {
    /// (last sequence, end offset, when learned).
    tail: Mutex<Option<(u64, u64, Instant)>>,
    /// (end offset of the last round read, the sequence after it).
    cursor: Mutex<Option<(u64, u64)>>,
    /// A sequential reader's consumer, positioned after the rounds it delivered.
    reader: tokio::sync::Mutex<Option<Reader>>,
}

/// An ordered consumer of one stream: rounds delivered in sequence without a request each.
struct Reader {
    next: u64,
    used: Instant,
    messages: jetstream::consumer::pull::Ordered,
}

struct Pending {
    count: u32,
    payload: Vec<u8>,
    /// Where the stream must end for this entry to be stored (fenced appends); such an entry
    /// is a round of its own.
    expect: Option<u64>,
    tx: oneshot::Sender<Result<Appended, Error>>,
}

/// An append ready to queue: its writer's queue, the append, where its outcome arrives.
type Prepared = (
    mpsc::Sender<Pending>,
    Pending,
    oneshot::Receiver<Result<Appended, Error>>,
);

/// The tail a writer appends after.
#[derive(Clone, Copy)]
struct Tail {
    seq: u64,
    end: u64,
    at: i64,
}

/// The log's own runtime; dropped without waiting, so that it may be dropped anywhere (an
/// async caller's thread included).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime until drop").handle()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> Result<OwnRuntime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("yunqi-stream-nats")
        .enable_all()
        .build()
        .map(|rt| OwnRuntime(Some(rt)))
        .map_err(|e| Error::internal(format!("cannot start the stream engine's runtime: {e}")))
}

/// Runs `f` on `rt` and waits for it from any thread, async runtime workers included.
fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    f: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| Error::internal("the stream engine's task ended"))?
}

/// The error callers see when NATS cannot be reached; what went wrong goes to the log only
/// (it names servers and subjects).
pub(crate) fn unreachable(what: &str, e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "stream engine: {what} failed");
    Error::unavailable("the stream engine (NATS JetStream) cannot be reached")
        .detail(format!("{what} did not complete"))
        .hint("retry in a few seconds; events sent with an Idempotency-Key are kept once however often they are sent")
}

fn closed() -> Error {
    Error::unavailable("the stream log is shut down")
        .detail("yunqi is stopping; events are no longer accepted")
        .hint("retry once yunqi has restarted, or on another node")
}

/// The JetStream stream of a yunqi stream key.
pub fn stream_name(prefix: &str, key: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 1 + key.len() * 2);
    s.push_str(prefix);
    s.push('-');
    for c in key.chars() {
        match c {
            '_' => s.push_str("__"),
            '.' => s.push_str("_d"),
            c => s.push(c),
        }
    }
    s
}

/// The yunqi stream key of a JetStream stream name, if it is one of `prefix`'s.
pub fn stream_key(prefix: &str, name: &str) -> Option<String> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let mut key = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '_' => match chars.next()? {
                '_' => key.push('_'),
                'd' => key.push('.'),
                _ => return None,
            },
            c => key.push(c),
        }
    }
    validate_stream_key(&key).ok()?;
    Some(key)
}

fn subject(prefix: &str, key: &str) -> String {
    format!("{prefix}.stream.{key}")
}

fn offsets_bucket(prefix: &str) -> String {
    format!("{prefix}-offsets")
}

fn check_prefix(prefix: &str) -> Result<(), Error> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && prefix.as_bytes()[0].is_ascii_alphabetic();
    if ok {
        Ok(())
    } else {
        Err(
            Error::invalid(format!("the NATS prefix {prefix:?} is not valid")).hint(
                "use 1 to 32 letters, digits and '_', starting with a letter, e.g. \"yunqi\"",
            ),
        )
    }
}

async fn connect(config: &NatsConfig) -> Result<async_nats::Client, Error> {
    let urls: Vec<async_nats::ServerAddr> = config
        .urls
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            Error::invalid(format!("the NATS URL {:?} is not valid: {e}", config.urls))
                .hint("e.g. nats://127.0.0.1:4222, several separated by commas")
        })?;
    async_nats::ConnectOptions::new()
        .name("yunqi")
        .connection_timeout(config.request_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .connect(urls)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot connect to NATS");
            Error::unavailable("cannot connect to the stream engine (NATS JetStream)")
                .detail(format!("no server of {} answered", config.urls))
                .hint("start NATS with JetStream (nats-server -js), or correct [cluster] nats")
        })
}

fn context(client: async_nats::Client, config: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .build(client)
}

async fn offsets_store(
    js: &jetstream::Context,
    config: &NatsConfig,
    create: bool,
) -> Result<(kv::Store, bool), Error> {
    let bucket = offsets_bucket(&config.prefix);
    match js.get_key_value(&bucket).await {
        Ok(s) => return Ok((s, false)),
        Err(e) if !create => {
            return Err(
                Error::unavailable("the stream engine is not prepared for yunqi")
                    .detail(format!(
                        "the key-value bucket {bucket} cannot be opened: {e}"
                    ))
                    .hint("run `yunqi cluster init` once against these engines"),
            );
        }
        Err(_) => {}
    }
    let store = js
        .create_or_update_key_value(kv::Config {
            bucket: bucket.clone(),
            description: "yunqi: consumer offsets of streams".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| unreachable("creating the offsets bucket", e))?;
    Ok((store, true))
}

/// Prepares JetStream for yunqi under `config.prefix` (the offsets bucket; streams are made on
/// first append); safe to run again and from several processes at once.
pub fn init(config: &NatsConfig) -> Result<InitReport, Error> {
    check_prefix(&config.prefix)?;
    let rt = runtime()?;
    let config = config.clone();
    block_on(rt.handle(), async move {
        let client = connect(&config).await?;
        let info = client.server_info();
        let js = context(client.clone(), &config);
        js.query_account().await.map_err(|e| {
            tracing::warn!(error = %e, "JetStream account query failed");
            Error::unavailable("the NATS server does not offer JetStream")
                .hint("start nats-server with -js (JetStream enabled)")
        })?;
        let (_, created) = offsets_store(&js, &config, true).await?;
        let streams = count_streams(&js, &config.prefix).await?;
        Ok(InitReport {
            server_version: info.version,
            created_offsets_bucket: created,
            streams,
            max_payload: info.max_payload,
        })
    })
}

/// What [`status`] reports of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The server's version.
    pub server_version: String,
    /// yunqi streams under the prefix.
    pub streams: usize,
    /// Every node's audit chain: its last record.
    pub audit: Vec<yunqi_audit::cluster::NodeHead>,
}

/// Connects and counts yunqi's streams: what `yunqi cluster status` shows of NATS.
pub fn status(config: &NatsConfig) -> Result<Status, Error> {
    check_prefix(&config.prefix)?;
    let rt = runtime()?;
    let config = config.clone();
    block_on(rt.handle(), async move {
        let client = connect(&config).await?;
        let js = context(client.clone(), &config);
        let streams = count_streams(&js, &config.prefix).await?;
        Ok(Status {
            server_version: client.server_info().version,
            streams,
            audit: audit::heads_of(&js, &config.prefix).await?,
        })
    })
}

async fn count_streams(js: &jetstream::Context, prefix: &str) -> Result<usize, Error> {
    use futures::TryStreamExt;
    let names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| unreachable("listing streams", e))?;
    // Streams' keys are `<department>.<stream>`; audit chains' have no '.'.
    Ok(names
        .iter()
        .filter(|n| stream_key(prefix, n).is_some_and(|k| k.contains('.')))
        .count())
}

impl NatsLog {
    /// [`StreamLog::end_offset`] from what this node learnt less than `fresh` ago.
    fn end_within(&self, stream: &str, fresh: Duration) -> u64 {
        if validate_stream_key(stream).is_err() {
            return 0;
        }
        let inner = self.inner.clone();
        let key = stream.to_string();
        match block_on(
            self.handle(),
            async move { inner.end_offset(&key, fresh).await },
        ) {
            Ok(end) => end,
            // Unreachable: what this node knew last.
            Err(_) => self
                .cached(stream)
                .tail
                .lock()
                .expect("tail lock")
                .map(|t| t.1)
                .unwrap_or(0),
        }
    }

    /// Connects to NATS and opens the log under `config.prefix`; the engine must have been
    /// prepared by [`init`].
    pub fn open(config: NatsConfig, clock: Arc<dyn Clock>) -> Result<NatsLog, Error> {
        check_prefix(&config.prefix)?;
        if config.replicas == 0 || config.queue_appends_max == 0 {
            return Err(Error::invalid(
                "the stream engine's replicas and queue bound are at least 1",
            ));
        }
        let rt = runtime()?;
        let cfg = config.clone();
        let (js, offsets, max_payload) = block_on(rt.handle(), async move {
            let client = connect(&cfg).await?;
            let max_payload = client.server_info().max_payload;
            let js = context(client, &cfg);
            let (offsets, _) = offsets_store(&js, &cfg, false).await?;
            Ok((js, offsets, max_payload))
        })?;
        let round_bytes_max = max_payload.saturating_sub(HEADROOM_BYTES);
        if round_bytes_max < 64 * 1024 {
            return Err(
                Error::invalid("the NATS server's max_payload is too small for yunqi")
                    .detail(format!("max_payload is {max_payload} bytes"))
                    .hint("set max_payload to at least 1MB (8MB recommended) in the NATS server's settings"),
            );
        }
        Ok(NatsLog {
            inner: Arc::new(Inner {
                js,
                offsets,
                config,
                clock,
                round_bytes_max,
                writers: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
                streams: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                stats: LogStats::default(),
            }),
            runtime: rt,
        })
    }

    /// The largest entry this log takes: the server's `max_payload` less framing.
    pub fn entry_bytes_max(&self) -> usize {
        self.inner.round_bytes_max - FRAME_ENTRY_HEADER_BYTES
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// Checks an append and finds its stream's writer (starting it): the queue to send the
    /// append to, and where its outcome arrives. The caller waits for room in the bounded queue
    /// (async callers asynchronously, blocking ones blocking).
    fn prepare(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
        expect: Option<u64>,
    ) -> Result<Prepared, Error> {
        validate_stream_key(stream)?;
        if payload.len() > self.entry_bytes_max() {
            return Err(Error::invalid(format!(
                "an entry of {} bytes is larger than the stream engine takes",
                payload.len()
            ))
            .detail(format!(
                "the NATS server takes messages of up to {} bytes",
                self.inner.round_bytes_max + HEADROOM_BYTES
            ))
            .hint(
                "send fewer events per request, or raise max_payload in the NATS server's settings",
            ));
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let sender = {
            let mut writers = self.inner.writers.lock().expect("writers lock");
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(closed());
            }
            match writers.get(stream) {
                Some(s) => s.clone(),
                None => {
                    let (tx, rx) = mpsc::channel(self.inner.config.queue_appends_max);
                    let task =
                        self.handle()
                            .spawn(writer(self.inner.clone(), stream.to_string(), rx));
                    self.inner.tasks.lock().expect("tasks lock").push(task);
                    writers.insert(stream.to_string(), tx.clone());
                    tx
                }
            }
        };
        let (tx, rx) = oneshot::channel();
        Ok((
            sender,
            Pending {
                count,
                payload,
                expect,
                tx,
            },
            rx,
        ))
    }

    fn cached(&self, stream: &str) -> Arc<Cached> {
        self.inner.cached(stream)
    }
}

impl Inner {
    fn cached(&self, stream: &str) -> Arc<Cached> {
        self.streams
            .lock()
            .expect("streams lock")
            .entry(stream.to_string())
            .or_default()
            .clone()
    }

    fn stream(&self, key: &str) -> stream::Stream<()> {
        // No I/O: only checks the name, which validate_stream_key already did.
        use futures::FutureExt;
        self.js
            .get_stream_no_info(stream_name(&self.config.prefix, key))
            .now_or_never()
            .expect("ready at once")
            .expect("a valid stream name")
    }

    fn stream_config(&self, key: &str) -> stream::Config {
        stream::Config {
            name: stream_name(&self.config.prefix, key),
            description: Some(format!("yunqi stream {key}")),
            subjects: vec![subject(&self.config.prefix, key)],
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas,
            duplicate_window: Duration::from_secs(120),
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }
    }

    /// The tail of `key`, creating the stream (and its genesis round) when it does not exist.
    async fn fetch_tail(&self, key: &str) -> Result<Tail, Attempt> {
        let s = self.stream(key);
        for _ in 0..3 {
            match s
                .get_last_raw_message_by_subject(&subject(&self.config.prefix, key))
                .await
            {
                Ok(m) => {
                    let h = frame::Headers::parse(&m).map_err(Attempt::Fatal)?;
                    return Ok(Tail {
                        seq: m.sequence,
                        end: h.end,
                        at: h.at,
                    });
                }
                Err(e) => match e.kind() {
                    stream::LastRawMessageErrorKind::NoMessageFound => {
                        self.genesis(key).await?;
                    }
                    stream::LastRawMessageErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        self.js
                            .get_or_create_stream(self.stream_config(key))
                            .await
                            .map_err(|e| Attempt::Transient(e.to_string()))?;
                        self.genesis(key).await?;
                    }
                    _ => return Err(Attempt::Transient(e.to_string())),
                },
            }
        }
        Err(Attempt::Transient(
            "the stream's tail could not be read".into(),
        ))
    }

    async fn genesis(&self, key: &str) -> Result<(), Attempt> {
        let msg = frame::round(0, 0, 0, &[]).message_id("yunqi-genesis");
        let ack = self
            .js
            .send_publish(subject(&self.config.prefix, key), msg)
            .await
            .map_err(|e| Attempt::Transient(e.to_string()))?
            .await
            .map_err(|e| Attempt::Transient(e.to_string()))?;
        if ack.sequence != 1 {
            return Err(Attempt::Fatal(
                Error::internal(format!(
                    "the stream engine's stream for {key} does not start with yunqi's genesis round"
                ))
                .hint("the stream was written by something other than yunqi; move it out of the prefix"),
            ));
        }
        Ok(())
    }

    async fn get(
        &self,
        key: &str,
        seq: u64,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, Error> {
        message_at(&self.stream(key), seq)
            .await
            .map_err(|e| unreachable("reading a stream", e))
    }

    /// The state of a stream; `None` when it does not exist.
    async fn state(&self, key: &str) -> Result<Option<stream::State>, Error> {
        match self
            .js
            .get_stream(stream_name(&self.config.prefix, key))
            .await
        {
            Ok(s) => Ok(Some(s.cached_info().state.clone())),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(unreachable("reading a stream's state", e)),
            },
        }
    }

    /// (first sequence, last sequence) of a stream; `None` when it does not exist.
    async fn bounds(&self, key: &str) -> Result<Option<(u64, u64)>, Error> {
        Ok(self
            .state(key)
            .await?
            .map(|s| (s.first_sequence, s.last_sequence)))
    }

    /// The stream's end, from what this node learnt less than `fresh` ago, else from JetStream.
    async fn end_offset(&self, key: &str, fresh: Duration) -> Result<u64, Error> {
        let cached = self.cached(key);
        let known = *cached.tail.lock().expect("tail lock");
        if let Some((_, end, at)) = known
            && at.elapsed() < fresh
        {
            return Ok(end);
        }
        let Some((_, last)) = self.bounds(key).await? else {
            return Ok(0);
        };
        if let Some((seq, end, _)) = known
            && seq == last
        {
            *cached.tail.lock().expect("tail lock") = Some((seq, end, Instant::now()));
            return Ok(end);
        }
        let Some(m) = self.get(key, last).await? else {
            return Ok(known.map(|k| k.1).unwrap_or(0));
        };
        let h = frame::Headers::parse(&m)?;
        *cached.tail.lock().expect("tail lock") = Some((m.sequence, h.end, Instant::now()));
        Ok(h.end)
    }

    async fn start_offset(&self, key: &str) -> Result<u64, Error> {
        let Some((first, _)) = self.bounds(key).await? else {
            return Ok(0);
        };
        match self.get(key, first).await? {
            Some(m) => Ok(frame::Headers::parse(&m)?.first),
            None => Ok(0),
        }
    }

    /// The sequence of the first round whose events end after `from`, by binary search.
    async fn locate(
        &self,
        key: &str,
        from: u64,
        state: &stream::State,
    ) -> Result<Option<u64>, Error> {
        if let Some((end, next)) = *self.cached(key).cursor.lock().expect("cursor lock")
            && end == from
        {
            return Ok(Some(next));
        }
        let (mut lo, mut hi) = (state.first_sequence, state.last_sequence);
        if hi == 0 || hi < lo {
            return Ok(None);
        }
        // Invariant: every round before lo ends at or before `from`; answer in [lo, hi + 1].
        hi += 1;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(key, mid).await? {
                Some(m) => {
                    if frame::Headers::parse(&m)?.end > from {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }
                // Removed by retention while searching: look later.
                None => lo = mid + 1,
            }
        }
        Ok(Some(lo))
    }

    async fn read(&self, key: &str, from: u64, max_bytes: usize) -> Result<Vec<Entry>, Error> {
        let Some(state) = self.state(key).await? else {
            return Ok(Vec::new());
        };
        // At the end (a caught-up reader, an idempotency check): no search.
        if let Some((seq, end, _)) = *self.cached(key).tail.lock().expect("tail lock")
            && seq == state.last_sequence
            && end <= from
        {
            return Ok(Vec::new());
        }
        let Some(seq) = self.locate(key, from, &state).await? else {
            return Ok(Vec::new());
        };
        let last = state.last_sequence;
        if seq > last {
            return Ok(Vec::new());
        }
        let cached = self.cached(key);
        let mut reader = cached.reader.lock().await;
        if reader
            .as_ref()
            .is_none_or(|r| r.next != seq || r.used.elapsed() > READER_IDLE)
        {
            *reader = None;
            let batch = READER_BATCH_BYTES / (state.bytes / state.messages.max(1)).max(1);
            *reader = Some(
                self.open_reader(key, seq, batch.clamp(1, 1_000) as i64)
                    .await?,
            );
        }
        let r = reader.as_mut().expect("a reader");
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last_end;
        loop {
            use futures::StreamExt;
            let m = match tokio::time::timeout(self.config.request_timeout, r.messages.next()).await
            {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    *reader = None;
                    return Err(unreachable("reading a stream", e));
                }
                Ok(None) | Err(_) => {
                    *reader = None;
                    return Err(unreachable("reading a stream", "no round arrived in time"));
                }
            };
            let (sseq, pending) = match m.info() {
                Ok(i) => (i.stream_sequence, i.pending),
                Err(e) => {
                    *reader = None;
                    return Err(unreachable("reading a stream", e));
                }
            };
            let h = frame::Headers::of(sseq, m.message.headers.as_ref())?;
            for e in frame::entries(key, &h, &m.message.payload)? {
                if e.end() > from {
                    bytes += e.payload.len();
                    out.push(e);
                }
            }
            last_end = h.end;
            r.next = sseq + 1;
            if sseq >= last || pending == 0 || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
        }
        r.used = Instant::now();
        *cached.cursor.lock().expect("cursor lock") = Some((last_end, r.next));
        Ok(out)
    }

    async fn open_reader(&self, key: &str, seq: u64, batch: i64) -> Result<Reader, Error> {
        use jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let stream = self.stream(key);
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subject(&self.config.prefix, key),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
                max_batch: batch,
                ..Default::default()
            })
            .await
            .map_err(|e| unreachable("opening a reader of a stream", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unreachable("opening a reader of a stream", e))?;
        Ok(Reader {
            next: seq,
            used: Instant::now(),
            messages,
        })
    }
}

/// Message `seq` of a stream; `None` when it (or the stream) does not exist.
pub(crate) async fn message_at(
    s: &stream::Stream<()>,
    seq: u64,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, stream::RawMessageError> {
    match s.get_raw_message(seq).await {
        Ok(m) => Ok(Some(m)),
        Err(e) => match e.kind() {
            stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            stream::LastRawMessageErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

/// How one attempt at storing a round went wrong.
enum Attempt {
    /// Another node's round came first: read the tail and frame again.
    Conflict,
    /// NATS did not answer in time or the connection broke: retry the same round.
    Transient(String),
    /// Nothing retrying can fix.
    Fatal(Error),
}

async fn writer(inner: Arc<Inner>, key: String, mut rx: mpsc::Receiver<Pending>) {
    let mut tail: Option<Tail> = None;
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let mut bytes = first.payload.len() + FRAME_ENTRY_HEADER_BYTES;
        let alone = first.expect.is_some();
        let mut batch = vec![first];
        while !alone && let Ok(p) = rx.try_recv() {
            let more = p.payload.len() + FRAME_ENTRY_HEADER_BYTES;
            if p.expect.is_some() || bytes + more > inner.round_bytes_max {
                carried = Some(p);
                break;
            }
            bytes += more;
            batch.push(p);
        }
        commit(&inner, &key, &mut tail, batch).await;
    }
}

async fn commit(inner: &Inner, key: &str, tail: &mut Option<Tail>, batch: Vec<Pending>) {
    let mut id = [0u8; 16];
    let _ = getrandom::fill(&mut id);
    let id = hex::encode(id);
    let events: u64 = batch.iter().map(|p| u64::from(p.count)).sum();
    let expect = batch.first().and_then(|p| p.expect);
    let began = Instant::now();
    let deadline = began + inner.config.unavailable_after;
    let mut backoff = Duration::from_millis(25);
    let mut conflicts = 0usize;
    let outcome: Result<(u64, i64), Error> = loop {
        let attempt = async {
            let t = match *tail {
                Some(t) => t,
                None => {
                    let t = inner.fetch_tail(key).await?;
                    *tail = Some(t);
                    t
                }
            };
            let at = inner.clock.now().timestamp_micros().max(t.at);
            let first = t.end;
            if let Some(x) = expect
                && x != first
            {
                return Err(Attempt::Fatal(yunqi_stream::deposed(key, x, first)));
            }
            let parts: Vec<(u32, &[u8])> = batch
                .iter()
                .map(|p| (p.count, p.payload.as_slice()))
                .collect();
            let msg = frame::round(first, first + events, at, &parts)
                .message_id(&id)
                .expected_last_sequence(t.seq);
            let ack = inner
                .js
                .send_publish(subject(&inner.config.prefix, key), msg)
                .await
                .map_err(|e| Attempt::Transient(e.to_string()))?
                .await
                .map_err(|e| match e.kind() {
                    jetstream::context::PublishErrorKind::WrongLastSequence => Attempt::Conflict,
                    _ => Attempt::Transient(e.to_string()),
                })?;
            if ack.duplicate {
                // An earlier attempt of this round was stored: its offsets are the ones.
                let m = inner
                    .get(key, ack.sequence)
                    .await
                    .map_err(|e| Attempt::Transient(e.message))?
                    .ok_or_else(|| Attempt::Transient("the stored round is gone".into()))?;
                let h = frame::Headers::parse(&m).map_err(Attempt::Fatal)?;
                *tail = None;
                return Ok((h.first, h.at));
            }
            *tail = Some(Tail {
                seq: ack.sequence,
                end: first + events,
                at,
            });
            Ok((first, at))
        }
        .await;
        match attempt {
            Ok(x) => break Ok(x),
            Err(Attempt::Conflict) => {
                *tail = None;
                conflicts += 1;
                if conflicts >= CONFLICTS_MAX {
                    break Err(Error::unavailable("the stream is too busy to append to")
                        .detail("other nodes' appends came first every time")
                        .hint("retry"));
                }
            }
            Err(Attempt::Transient(e)) => {
                *tail = None;
                if Instant::now() + backoff > deadline {
                    break Err(unreachable("storing events", e));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(Attempt::Fatal(e)) => break Err(e),
        }
    };
    match outcome {
        Ok((first, _)) => {
            let stats = &inner.stats;
            stats.group_commits.fetch_add(1, Ordering::Relaxed);
            stats
                .sync_micros_total
                .fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
            let mut next = first;
            if let Some(t) = tail {
                *inner.cached(key).tail.lock().expect("tail lock") =
                    Some((t.seq, t.end, Instant::now()));
            }
            for p in batch {
                let end = next + u64::from(p.count);
                stats.appended_entries.fetch_add(1, Ordering::Relaxed);
                stats
                    .appended_events
                    .fetch_add(u64::from(p.count), Ordering::Relaxed);
                stats
                    .appended_bytes
                    .fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                let _ = p.tx.send(Ok(Appended { first: next, end }));
                next = end;
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.tx.send(Err(e.clone()));
            }
        }
    }
}

fn offset_key(stream: &str, consumer: &str) -> String {
    format!("{stream}/{consumer}")
}

impl StreamLog for NatsLog {
    fn append(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, Result<Appended, Error>> {
        let prepared = self.prepare(stream, count, payload, None);
        Box::pin(async move {
            let (sender, pending, rx) = prepared?;
            sender.send(pending).await.map_err(|_| closed())?;
            rx.await
                .unwrap_or_else(|_| Err(Error::internal("the stream engine's writer ended")))
        })
    }

    fn append_expecting(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
        expected_first: u64,
    ) -> BoxFuture<'_, Result<Appended, Error>> {
        let prepared = self.prepare(stream, count, payload, Some(expected_first));
        Box::pin(async move {
            let (sender, pending, rx) = prepared?;
            sender.send(pending).await.map_err(|_| closed())?;
            rx.await
                .unwrap_or_else(|_| Err(Error::internal("the stream engine's writer ended")))
        })
    }

    fn append_blocking(
        &self,
        stream: &str,
        count: u32,
        payload: Vec<u8>,
    ) -> Result<Appended, Error> {
        let (sender, pending, rx) = self.prepare(stream, count, payload, None)?;
        sender.blocking_send(pending).map_err(|_| closed())?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(Error::internal("the stream engine's writer ended")))
    }

    fn read(&self, stream: &str, from: u64, max_bytes: usize) -> Result<Vec<Entry>, Error> {
        validate_stream_key(stream)?;
        let inner = self.inner.clone();
        let key = stream.to_string();
        block_on(self.handle(), async move {
            inner.read(&key, from, max_bytes).await
        })
    }

    fn end_offset(&self, stream: &str) -> u64 {
        self.end_within(stream, END_FRESH)
    }

    fn current_end_offset(&self, stream: &str) -> u64 {
        self.end_within(stream, Duration::ZERO)
    }

    fn start_offset(&self, stream: &str) -> u64 {
        if validate_stream_key(stream).is_err() {
            return 0;
        }
        let inner = self.inner.clone();
        let key = stream.to_string();
        block_on(self.handle(), async move { inner.start_offset(&key).await }).unwrap_or(0)
    }

    fn commit_offset(&self, stream: &str, consumer: &str, offset: u64) -> Result<(), Error> {
        validate_stream_key(stream)?;
        validate_consumer_name(consumer)?;
        let store = self.inner.offsets.clone();
        let k = offset_key(stream, consumer);
        block_on(self.handle(), async move {
            store
                .put(k, Bytes::from(offset.to_string()))
                .await
                .map_err(|e| unreachable("committing a consumer offset", e))?;
            Ok(())
        })
    }

    fn committed_offset(&self, stream: &str, consumer: &str) -> Result<Option<u64>, Error> {
        validate_stream_key(stream)?;
        validate_consumer_name(consumer)?;
        let store = self.inner.offsets.clone();
        let k = offset_key(stream, consumer);
        block_on(self.handle(), async move {
            let v = store
                .get(k)
                .await
                .map_err(|e| unreachable("reading a consumer offset", e))?;
            match v {
                None => Ok(None),
                Some(b) => std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map(Some)
                    .ok_or_else(|| {
                        Error::internal("a consumer offset in the stream engine is damaged")
                    }),
            }
        })
    }

    fn apply_retention(
        &self,
        stream: &str,
        retention: &Retention,
        now_us: i64,
    ) -> Result<RetentionReport, Error> {
        validate_stream_key(stream)?;
        let inner = self.inner.clone();
        let key = stream.to_string();
        let retention = *retention;
        block_on(self.handle(), async move {
            retention::apply(&inner, &key, &retention, now_us).await
        })
    }

    fn stats(&self) -> &LogStats {
        &self.inner.stats
    }

    fn shared(&self) -> bool {
        true
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            // Dropping the senders ends each writer once its queue is committed.
            self.inner.writers.lock().expect("writers lock").clear();
            let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
            for t in tasks {
                let _ = t.await;
            }
        })
    }
}

impl Drop for NatsLog {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.writers.lock().expect("writers lock").clear();
    }
}

mod retention;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_round_trip_without_collisions() {
        let keys = [
            "a.b",
            "a_b",
            "a__b",
            "a._b",
            "a_.b",
            "x.y.z",
            "traffic.detections",
            "a_db",
        ];
        let names: Vec<String> = keys.iter().map(|k| stream_name("yunqi", k)).collect();
        for (k, n) in keys.iter().zip(&names) {
            assert!(!n.contains('.'), "{n}");
            assert_eq!(stream_key("yunqi", n).as_deref(), Some(*k));
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(stream_key("yunqi", "other-a"), None);
        assert_eq!(stream_key("yunqi", "yunqi-offsets"), Some("offsets".into()));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("yunqi").is_ok());
        assert!(check_prefix("t_1").is_ok());
        for bad in ["", "1a", "a-b", "a.b", "a b", &"a".repeat(33)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
