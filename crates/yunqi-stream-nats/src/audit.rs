//! A node's audit chain on NATS JetStream: [`NatsAudit`] implements [`AuditLog`] with the
//! embedded chain's records and guarantees, so that the chain outlives the node's disk and
//! every node's chain can be read and verified from the engine.
//!
//! Layout, under the cluster's prefix `P`: one JetStream stream per node, `P-audit-<node>`
//! (`_` in the name written `__`), on the subject `P.audit.<node>`. Its first message is an
//! empty genesis round; every later message is one *round* of the node's group commit: the
//! records queued while the previous round was in flight, framed exactly as in the embedded
//! chain's segment files (`yunqi_audit::format`), with headers `Yunqi-First` and `Yunqi-End`
//! (the round holds records `First + 1 ..= End`) and `Yunqi-At`.
//!
//! Exactly one process appends to a chain. Every round is published with
//! `Nats-Expected-Last-Sequence` (the round it follows) and a `Nats-Msg-Id`: a round whose
//! acknowledgement was lost is resent as it was and stored once; a round that could not be
//! confirmed in time is answered `unavailable` and resent, bytes unchanged, before anything
//! else is appended, so the chain never forks. A round refused because another message came
//! first, and that is not the round itself, means a second process appends under this node's
//! name: the chain then refuses every later append (the embedded chain does the same after
//! a failed write) and the operator is told.
//!
//! An append resolves only once JetStream has acknowledged its round: the write-ahead rule
//! (record durable before the change is applied or answered) holds as embedded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use yunqi_audit::cluster::{ChainCheck, NodeHead};
use yunqi_audit::format::{self, AuditRecord, HASH_BYTES, Hash};
use yunqi_audit::{AuditLog, AuditPage, AuditQuery, AuditStats, BoxFuture, Receipt};
use yunqi_types::{AuditEvent, Clock, Error, Limits};

use crate::frame::{HEADER_AT, HEADER_END, HEADER_FIRST, Headers};
use crate::{HEADROOM_BYTES, NatsConfig, OwnRuntime, block_on, connect, context, runtime};

/// Bound of the append queue (appends, each one or more records).
const QUEUE_MAX: usize = 65_536;

/// The JetStream stream holding `node`'s chain.
pub fn chain_stream(prefix: &str, node: &str) -> String {
    crate::stream_name(prefix, &format!("audit-{node}"))
}

fn chain_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.audit.{node}")
}

/// The node whose chain a JetStream stream holds, if it is one of `prefix`'s chains.
pub fn chain_node(prefix: &str, stream: &str) -> Option<String> {
    let key = crate::stream_key(prefix, stream)?;
    key.strip_prefix("audit-")
        .filter(|n| !n.contains('.'))
        .map(str::to_string)
}

fn unreachable(what: &str, e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "audit chain: {what} failed");
    Error::unavailable("the audit log (NATS JetStream) cannot be reached")
        .detail(format!("{what} did not complete; nothing was changed"))
        .hint("retry in a few seconds; a request sent with an Idempotency-Key is applied once however often it is sent")
}

fn damaged(node: &str, what: impl std::fmt::Display) -> Error {
    Error::internal(format!(
        "node {node}'s audit chain in the log engine is damaged"
    ))
    .detail(what.to_string())
    .hint("run `yunqi audit verify --cluster` to see where")
}

fn fenced(node: &str) -> Error {
    Error::unavailable("this node's audit chain is written by another process too")
        .detail(format!(
            "a round of node {node}'s chain was stored that this process did not write"
        ))
        .hint("two yunqi processes run under one node name: stop one, give each its own --node, and restart this one")
}

/// The end of a chain: where the next round goes.
#[derive(Debug, Clone, Copy)]
struct Tail {
    /// JetStream sequence of the last round.
    msg: u64,
    /// Its last record.
    seq: u64,
    hash: Hash,
    time_us: i64,
}

/// A framed round, kept as sent so that it can be sent again unchanged.
struct Round {
    id: String,
    first: u64,
    payload: Bytes,
    after: Tail,
    /// The receipt of each append's last record, in order.
    receipts: Vec<Receipt>,
}

type Reply = oneshot::Sender<Result<Receipt, Error>>;

enum Msg {
    Append(Vec<AuditEvent>, Reply),
    Shutdown(oneshot::Sender<()>),
}

struct Inner {
    js: jetstream::Context,
    config: NatsConfig,
    node: String,
    clock: Arc<dyn Clock>,
    field_bytes_max: usize,
    round_bytes_max: usize,
    durable: Mutex<Receipt>,
    failed: Mutex<Option<Error>>,
    closed: AtomicBool,
    stats: AuditStats,
}

/// One node's audit chain on NATS JetStream.
pub struct NatsAudit {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Msg>,
    runtime: OwnRuntime,
}

/// The last record of a round's payload: (sequence number, hash, time).
fn last_record(node: &str, payload: &[u8]) -> Result<Option<(u64, Hash, i64)>, Error> {
    let mut offset = 0;
    let mut last = None;
    while offset < payload.len() {
        let f = format::read_frame(payload, offset).map_err(|e| damaged(node, format!("{e:?}")))?;
        let r = format::decode_record(&f).map_err(|e| damaged(node, e))?;
        last = Some((
            r.seq,
            f.stored_hash.try_into().expect("32 bytes"),
            r.time.timestamp_micros(),
        ));
        offset = f.end;
    }
    Ok(last)
}

async fn get(
    js: &jetstream::Context,
    stream: &str,
    seq: u64,
) -> Result<Option<jetstream::message::StreamMessage>, Error> {
    let s = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| unreachable("reading the audit chain", e))?;
    crate::message_at(&s, seq)
        .await
        .map_err(|e| unreachable("reading the audit chain", e))
}

/// (first, last) JetStream sequence of a chain's stream; `None` when there is no such chain.
async fn bounds(js: &jetstream::Context, stream: &str) -> Result<Option<(u64, u64)>, Error> {
    match js.get_stream(stream).await {
        Ok(s) => {
            let st = &s.cached_info().state;
            Ok(Some((st.first_sequence, st.last_sequence)))
        }
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(unreachable("reading the audit chain", e)),
        },
    }
}

/// The tail of a chain's stream (genesis: record 0).
async fn read_tail(js: &jetstream::Context, node: &str, stream: &str) -> Result<Tail, Error> {
    let Some((_, last)) = bounds(js, stream).await? else {
        return Err(Error::not_found("audit chain", node));
    };
    let m = get(js, stream, last)
        .await?
        .ok_or_else(|| damaged(node, "its last round cannot be read"))?;
    let h = Headers::parse(&m)?;
    if h.end == 0 {
        return Ok(Tail {
            msg: m.sequence,
            seq: 0,
            hash: [0; HASH_BYTES],
            time_us: h.at,
        });
    }
    let (seq, hash, time_us) = last_record(node, &m.payload)?
        .ok_or_else(|| damaged(node, format!("round {} holds no records", m.sequence)))?;
    if seq != h.end {
        return Err(damaged(
            node,
            format!(
                "round {} ends at record {seq}, its header says {}",
                m.sequence, h.end
            ),
        ));
    }
    Ok(Tail {
        msg: m.sequence,
        seq,
        hash,
        time_us,
    })
}

fn headers(first: u64, end: u64, at: i64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_FIRST, first.to_string().as_str());
    h.insert(HEADER_END, end.to_string().as_str());
    h.insert(HEADER_AT, at.to_string().as_str());
    h
}

/// Creates the chain's stream and its genesis round when they do not exist yet.
async fn prepare(js: &jetstream::Context, config: &NatsConfig, node: &str) -> Result<(), Error> {
    let name = chain_stream(&config.prefix, node);
    let subject = chain_subject(&config.prefix, node);
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        description: Some(format!("yunqi audit chain of node {node}")),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: Duration::from_secs(120),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| unreachable("creating the audit chain", e))?;
    if bounds(js, &name).await?.is_some_and(|(_, last)| last > 0) {
        return Ok(());
    }
    let msg = jetstream::message::PublishMessage::build()
        .headers(headers(0, 0, 0))
        .payload(Bytes::new())
        .message_id("yunqi-audit-genesis");
    let ack = js
        .send_publish(subject, msg)
        .await
        .map_err(|e| unreachable("creating the audit chain", e))?
        .await
        .map_err(|e| unreachable("creating the audit chain", e))?;
    if ack.sequence != 1 {
        return Err(
            damaged(node, "its stream does not start with yunqi's genesis round").hint(
                "the stream was written by something other than yunqi; move it out of the prefix",
            ),
        );
    }
    Ok(())
}

impl NatsAudit {
    /// Opens (creating when new) the audit chain of `node` under `config.prefix`.
    pub fn open(
        config: NatsConfig,
        node: &str,
        clock: Arc<dyn Clock>,
        limits: &Limits,
    ) -> Result<NatsAudit, Error> {
        crate::check_prefix(&config.prefix)?;
        let rt = runtime()?;
        let (cfg, name) = (config.clone(), node.to_string());
        let (js, tail, max_payload) = block_on(rt.handle(), async move {
            let client = connect(&cfg).await?;
            let max_payload = client.server_info().max_payload;
            let js = context(client, &cfg);
            // Refuses an engine `yunqi cluster init` has not prepared, saying so.
            crate::offsets_store(&js, &cfg, false).await?;
            prepare(&js, &cfg, &name).await?;
            let tail = read_tail(&js, &name, &chain_stream(&cfg.prefix, &name)).await?;
            Ok((js, tail, max_payload))
        })?;
        let inner = Arc::new(Inner {
            js,
            config,
            node: node.to_string(),
            clock,
            field_bytes_max: limits.audit_field_bytes_max,
            round_bytes_max: max_payload.saturating_sub(HEADROOM_BYTES).max(64 * 1024),
            durable: Mutex::new(Receipt {
                seq: tail.seq,
                hash: tail.hash,
            }),
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
            stats: AuditStats::default(),
        });
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        rt.handle().spawn(writer(inner.clone(), tail, rx));
        Ok(NatsAudit {
            inner,
            tx,
            runtime: rt,
        })
    }

    /// The node whose chain this is.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The head of every node's chain under the prefix (for cluster checkpoints), read from
    /// the engine.
    pub fn heads(&self) -> Result<Vec<NodeHead>, Error> {
        let inner = self.inner.clone();
        block_on(self.runtime.handle(), async move {
            heads_of(&inner.js, &inner.config.prefix).await
        })
    }
}

/// The head of every chain under `prefix`.
pub(crate) async fn heads_of(
    js: &jetstream::Context,
    prefix: &str,
) -> Result<Vec<NodeHead>, Error> {
    let mut out = Vec::new();
    for node in chains(js, prefix).await? {
        let t = read_tail(js, &node, &chain_stream(prefix, &node)).await?;
        out.push(NodeHead {
            node,
            seq: t.seq,
            hash: hex::encode(t.hash),
        });
    }
    Ok(out)
}

/// The nodes that have a chain under `prefix`.
async fn chains(js: &jetstream::Context, prefix: &str) -> Result<Vec<String>, Error> {
    use futures::TryStreamExt;
    let names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| unreachable("listing the audit chains", e))?;
    let mut nodes: Vec<String> = names.iter().filter_map(|n| chain_node(prefix, n)).collect();
    nodes.sort();
    Ok(nodes)
}

/// Encodes `batch` after `tail` as one round.
fn encode(inner: &Inner, tail: Tail, batch: &[Vec<AuditEvent>]) -> Round {
    let now = inner.clock.now().timestamp_micros().max(tail.time_us);
    let mut payload = Vec::new();
    let (mut seq, mut hash) = (tail.seq, tail.hash);
    let mut receipts = Vec::with_capacity(batch.len());
    for events in batch {
        for e in events {
            seq += 1;
            hash = format::encode_record(&mut payload, seq, now, &hash, e, inner.field_bytes_max);
        }
        receipts.push(Receipt { seq, hash });
    }
    let mut id = [0u8; 8];
    let _ = getrandom::fill(&mut id);
    Round {
        id: format!("audit-{}-{}", tail.seq + 1, hex::encode(id)),
        first: tail.seq,
        payload: Bytes::from(payload),
        after: Tail {
            msg: 0,
            seq,
            hash,
            time_us: now,
        },
        receipts,
    }
}

enum Sent {
    Stored(u64),
    Transient(Error),
    Fatal(Error),
}

/// Publishes `round` after the round `expected`, retrying while NATS does not answer.
async fn send(inner: &Inner, round: &Round, expected: u64) -> Sent {
    let subject = chain_subject(&inner.config.prefix, &inner.node);
    let stream = chain_stream(&inner.config.prefix, &inner.node);
    let deadline = Instant::now() + inner.config.unavailable_after;
    let mut backoff = Duration::from_millis(25);
    loop {
        let msg = jetstream::message::PublishMessage::build()
            .headers(headers(round.first, round.after.seq, round.after.time_us))
            .payload(round.payload.clone())
            .message_id(&round.id)
            .expected_last_sequence(expected);
        let e: String = match inner.js.send_publish(subject.clone(), msg).await {
            Err(e) => e.to_string(),
            Ok(ack) => match ack.await {
                Ok(a) => return Sent::Stored(a.sequence),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    // Stored earlier (its acknowledgement lost, past the duplicate window),
                    // or another process's round: only the former is ours.
                    match bounds(&inner.js, &stream).await {
                        Ok(Some((_, last))) => match get(&inner.js, &stream, last).await {
                            Ok(Some(m))
                                if m.headers
                                    .get("Nats-Msg-Id")
                                    .is_some_and(|v| v.as_str() == round.id) =>
                            {
                                return Sent::Stored(m.sequence);
                            }
                            Ok(_) => return Sent::Fatal(fenced(&inner.node)),
                            Err(e) => e.message,
                        },
                        Ok(None) => return Sent::Fatal(fenced(&inner.node)),
                        Err(e) => e.message,
                    }
                }
                Err(e) => e.to_string(),
            },
        };
        if Instant::now() + backoff > deadline {
            return Sent::Transient(unreachable("storing audit records", e));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

async fn writer(inner: Arc<Inner>, mut tail: Tail, mut rx: mpsc::Receiver<Msg>) {
    // A round sent but not confirmed: it goes again, unchanged, before anything else.
    let mut stuck: Option<Round> = None;
    let mut carried: Option<(Vec<AuditEvent>, Reply)> = None;
    let mut stop: Option<oneshot::Sender<()>> = None;
    loop {
        let first = match carried.take() {
            Some(a) => a,
            None => match rx.recv().await {
                Some(Msg::Append(e, r)) => (e, r),
                Some(Msg::Shutdown(s)) => {
                    stop = Some(s);
                    break;
                }
                None => break,
            },
        };
        let mut bytes = 0usize;
        let size = |events: &[AuditEvent]| -> usize {
            events
                .iter()
                .map(|e| {
                    format::BODY_FIXED_BYTES
                        + format::FRAME_PREFIX_BYTES
                        + HASH_BYTES
                        + 14
                        + e.principal.len()
                        + e.department.len()
                        + e.action.len()
                        + e.object.len()
                        + e.purpose.len()
                        + e.detail.len()
                        + e.request_id.len()
                })
                .sum()
        };
        bytes += size(&first.0);
        let mut events = vec![first.0];
        let mut replies = vec![first.1];
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Append(e, r) => {
                    let more = size(&e);
                    if bytes + more > inner.round_bytes_max {
                        carried = Some((e, r));
                        break;
                    }
                    bytes += more;
                    events.push(e);
                    replies.push(r);
                }
                Msg::Shutdown(s) => {
                    stop = Some(s);
                    break;
                }
            }
        }
        let failed = inner.failed.lock().expect("failed lock").clone();
        if let Some(e) = failed {
            for r in replies {
                let _ = r.send(Err(e.clone()));
            }
        } else {
            commit(&inner, &mut tail, &mut stuck, &events, replies).await;
        }
        if stop.is_some() {
            break;
        }
    }
    // Whatever is still queued is refused.
    rx.close();
    if let Some((_, r)) = carried {
        let _ = r.send(Err(closed()));
    }
    while let Ok(m) = rx.try_recv() {
        match m {
            Msg::Append(_, r) => {
                let _ = r.send(Err(closed()));
            }
            Msg::Shutdown(s) => {
                let _ = s.send(());
            }
        }
    }
    if let Some(s) = stop {
        let _ = s.send(());
    }
}

fn closed() -> Error {
    Error::unavailable("the audit chain is shut down")
        .detail("yunqi is stopping; no change is accepted")
        .hint("retry once yunqi has restarted, or on another node")
}

async fn commit(
    inner: &Inner,
    tail: &mut Tail,
    stuck: &mut Option<Round>,
    events: &[Vec<AuditEvent>],
    replies: Vec<Reply>,
) {
    let began = Instant::now();
    let fail = |inner: &Inner, e: Error, replies: Vec<Reply>, fatal: bool| {
        if fatal {
            tracing::error!(node = %inner.node, "{}", e.message);
            *inner.failed.lock().expect("failed lock") = Some(e.clone());
        }
        for r in replies {
            let _ = r.send(Err(e.clone()));
        }
    };
    if let Some(r) = stuck.take() {
        match send(inner, &r, tail.msg).await {
            Sent::Stored(msg) => advance(inner, tail, &r, msg),
            Sent::Transient(e) => {
                *stuck = Some(r);
                return fail(inner, e, replies, false);
            }
            Sent::Fatal(e) => return fail(inner, e, replies, true),
        }
    }
    let round = encode(inner, *tail, events);
    match send(inner, &round, tail.msg).await {
        Sent::Stored(msg) => {
            advance(inner, tail, &round, msg);
            let stats = &inner.stats;
            stats.group_commits.fetch_add(1, Ordering::Relaxed);
            stats
                .sync_micros_total
                .fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
            for (r, receipt) in replies.into_iter().zip(round.receipts.iter()) {
                let _ = r.send(Ok(*receipt));
            }
        }
        Sent::Transient(e) => {
            *stuck = Some(round);
            fail(inner, e, replies, false)
        }
        Sent::Fatal(e) => fail(inner, e, replies, true),
    }
}

fn advance(inner: &Inner, tail: &mut Tail, round: &Round, msg: u64) {
    *tail = Tail { msg, ..round.after };
    inner
        .stats
        .records_appended
        .fetch_add(round.after.seq - round.first, Ordering::Relaxed);
    *inner.durable.lock().expect("durable lock") = Receipt {
        seq: tail.seq,
        hash: tail.hash,
    };
}

/// Reads records of `node`'s chain for `q`, considering records up to `durable`.
async fn query(
    js: &jetstream::Context,
    prefix: &str,
    node: &str,
    durable: Option<u64>,
    q: &AuditQuery,
) -> Result<AuditPage, Error> {
    let stream = chain_stream(prefix, node);
    let Some((first_msg, last_msg)) = bounds(js, &stream).await? else {
        return Err(Error::not_found("audit chain of node", node)
            .hint("`yunqi cluster status` lists the cluster's nodes"));
    };
    let durable = match durable {
        Some(d) => d,
        None => read_tail(js, node, &stream).await?.seq,
    };
    let limit = q.limit.max(1);
    let decode = |payload: &[u8]| -> Result<Vec<AuditRecord>, Error> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < payload.len() {
            let f =
                format::read_frame(payload, offset).map_err(|e| damaged(node, format!("{e:?}")))?;
            out.push(format::decode_record(&f).map_err(|e| damaged(node, e))?);
            offset = f.end;
        }
        Ok(out)
    };
    // The first round whose records end at or after `seq`.
    let stream = stream.as_str();
    let locate = |seq: u64| async move {
        let (mut lo, mut hi) = (first_msg, last_msg + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match get(js, stream, mid).await? {
                Some(m) if Headers::parse(&m)?.end >= seq => hi = mid,
                _ => lo = mid + 1,
            }
        }
        Ok::<u64, Error>(lo)
    };
    let mut records = Vec::new();
    let mut scanned_to_end = true;
    if !q.descending {
        let start = q.after.unwrap_or(0) + 1;
        let mut msg = locate(start).await?;
        'rounds: while msg <= last_msg {
            let Some(m) = get(js, stream, msg).await? else {
                break;
            };
            msg += 1;
            for r in decode(&m.payload)? {
                if r.seq < start {
                    continue;
                }
                if r.seq > durable || q.until.is_some_and(|t| r.time >= t) {
                    break 'rounds;
                }
                if q.matches(&r) {
                    records.push(r);
                    if records.len() == limit {
                        scanned_to_end = false;
                        break 'rounds;
                    }
                }
            }
        }
    } else {
        let end = q.before.unwrap_or(u64::MAX).min(durable.saturating_add(1));
        if end > 1 {
            let mut msg = locate(end - 1).await?.min(last_msg);
            'back: while msg >= first_msg {
                let Some(m) = get(js, stream, msg).await? else {
                    break;
                };
                for r in decode(&m.payload)?.into_iter().rev() {
                    if r.seq >= end {
                        continue;
                    }
                    if q.since.is_some_and(|t| r.time < t) {
                        break 'back;
                    }
                    if q.matches(&r) {
                        records.push(r);
                        if records.len() == limit {
                            scanned_to_end = false;
                            break 'back;
                        }
                    }
                }
                if msg == 0 {
                    break;
                }
                msg -= 1;
            }
        }
    }
    let next = if scanned_to_end {
        None
    } else {
        records.last().map(|r| r.seq)
    };
    Ok(AuditPage {
        records,
        next,
        next_cursor: None,
    })
}

/// A record's place in the cluster's merged order: time, node, sequence number.
type Key = (i64, String, u64);

fn key_of(r: &AuditRecord, node: &str) -> Key {
    (r.time.timestamp_micros(), node.to_string(), r.seq)
}

fn bad_cursor(c: &str) -> Error {
    Error::invalid(format!("audit cursor {c:?} is not valid"))
        .hint("pass the `next_cursor` of the previous page unchanged, with the same order")
}

/// `a` or `d`, then time, sequence number and node: `a1733560000000000-17-node-a`.
fn encode_cursor(descending: bool, k: &Key) -> String {
    format!(
        "{}{}-{}-{}",
        if descending { 'd' } else { 'a' },
        k.0,
        k.2,
        k.1
    )
}

fn decode_cursor(c: &str, descending: bool) -> Result<Key, Error> {
    let rest = c
        .strip_prefix(if descending { 'd' } else { 'a' })
        .ok_or_else(|| bad_cursor(c))?;
    let mut parts = rest.splitn(3, '-');
    let time = parts.next().and_then(|t| t.parse().ok());
    let seq = parts.next().and_then(|t| t.parse().ok());
    match (time, seq, parts.next()) {
        (Some(t), Some(s), Some(n)) if !n.is_empty() => Ok((t, n.to_string(), s)),
        _ => Err(bad_cursor(c)),
    }
}

/// Records of one chain for a merged page: in the order asked, past `from` (a key), up to
/// `limit`; whether the chain was read to its end (or its time bound).
async fn scan_chain(
    js: &jetstream::Context,
    prefix: &str,
    node: &str,
    durable: Option<u64>,
    q: &AuditQuery,
    from: Option<&Key>,
) -> Result<(Vec<AuditRecord>, bool), Error> {
    let stream = chain_stream(prefix, node);
    let Some((first_msg, last_msg)) = bounds(js, &stream).await? else {
        return Ok((Vec::new(), true));
    };
    let durable = match durable {
        Some(d) => d,
        None => read_tail(js, node, &stream).await?.seq,
    };
    let stream = stream.as_str();
    let limit = q.limit.max(1);
    // Rounds are in time order (a round's records carry its time): the first round at or
    // after `t`.
    let first_at = |t: i64| async move {
        let (mut lo, mut hi) = (first_msg, last_msg + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match get(js, stream, mid).await? {
                Some(m) if Headers::parse(&m)?.at >= t => hi = mid,
                _ => lo = mid + 1,
            }
        }
        Ok::<u64, Error>(lo)
    };
    let mut out = Vec::new();
    let passed = |r: &AuditRecord| match from {
        None => true,
        Some(k) if q.descending => key_of(r, node) < *k,
        Some(k) => key_of(r, node) > *k,
    };
    if !q.descending {
        let t = from
            .map(|k| k.0)
            .into_iter()
            .chain(q.since.map(|t| t.timestamp_micros()))
            .max()
            .unwrap_or(i64::MIN);
        let mut msg = first_at(t).await?;
        while msg <= last_msg {
            let Some(m) = get(js, stream, msg).await? else {
                break;
            };
            msg += 1;
            let mut offset = 0;
            while offset < m.payload.len() {
                let f = format::read_frame(&m.payload, offset)
                    .map_err(|e| damaged(node, format!("{e:?}")))?;
                offset = f.end;
                let r = format::decode_record(&f).map_err(|e| damaged(node, e))?;
                if r.seq > durable || q.until.is_some_and(|t| r.time >= t) {
                    return Ok((out, true));
                }
                if passed(&r) && q.matches(&r) {
                    out.push(r);
                    if out.len() == limit {
                        return Ok((out, false));
                    }
                }
            }
        }
        Ok((out, true))
    } else {
        let t = from
            .map(|k| k.0)
            .into_iter()
            .chain(q.until.map(|t| t.timestamp_micros() - 1))
            .min()
            .unwrap_or(i64::MAX);
        let mut msg = first_at(t.saturating_add(1)).await?.saturating_sub(1);
        while msg >= first_msg.max(1) {
            let Some(m) = get(js, stream, msg).await? else {
                break;
            };
            let mut records = Vec::new();
            let mut offset = 0;
            while offset < m.payload.len() {
                let f = format::read_frame(&m.payload, offset)
                    .map_err(|e| damaged(node, format!("{e:?}")))?;
                offset = f.end;
                records.push(format::decode_record(&f).map_err(|e| damaged(node, e))?);
            }
            for r in records.into_iter().rev() {
                if r.seq > durable {
                    continue;
                }
                if q.since.is_some_and(|t| r.time < t) {
                    return Ok((out, true));
                }
                if passed(&r) && q.matches(&r) {
                    out.push(r);
                    if out.len() == limit {
                        return Ok((out, false));
                    }
                }
            }
            msg -= 1;
        }
        Ok((out, true))
    }
}

/// A page of every node's records, merged in time order (then node, then sequence number).
async fn query_merged(inner: &Inner, q: &AuditQuery) -> Result<AuditPage, Error> {
    if q.after.is_some() || q.before.is_some() {
        return Err(Error::invalid(
            "`after` and `before` page one node's chain; every node's records are paged with `cursor`",
        )
        .hint("name the node (`node=`) to page by sequence number, or follow `next_cursor`"));
    }
    let from = q
        .cursor
        .as_deref()
        .map(|c| decode_cursor(c, q.descending))
        .transpose()?;
    let own = inner.durable.lock().expect("durable lock").seq;
    let mut all: Vec<(Key, AuditRecord)> = Vec::new();
    let mut more = false;
    for node in chains(&inner.js, &inner.config.prefix).await? {
        let durable = (node == inner.node).then_some(own);
        let (records, ended) = scan_chain(
            &inner.js,
            &inner.config.prefix,
            &node,
            durable,
            q,
            from.as_ref(),
        )
        .await?;
        more |= !ended;
        for mut r in records {
            r.node = Some(node.clone());
            all.push((key_of(&r, &node), r));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    if q.descending {
        all.reverse();
    }
    let limit = q.limit.max(1);
    more |= all.len() > limit;
    all.truncate(limit);
    let next_cursor = if more {
        all.last().map(|(k, _)| encode_cursor(q.descending, k))
    } else {
        None
    };
    Ok(AuditPage {
        records: all.into_iter().map(|(_, r)| r).collect(),
        next: None,
        next_cursor,
    })
}

impl AuditLog for NatsAudit {
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<Receipt, Error>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(self.durable_head());
            }
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(closed());
            }
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Msg::Append(events, tx))
                .await
                .map_err(|_| closed())?;
            rx.await.unwrap_or_else(|_| Err(closed()))
        })
    }

    fn query(&self, q: &AuditQuery) -> Result<AuditPage, Error> {
        let inner = self.inner.clone();
        let q = q.clone();
        block_on(self.runtime.handle(), async move {
            let Some(node) = q.node.clone() else {
                return query_merged(&inner, &q).await;
            };
            if q.cursor.is_some() {
                return Err(Error::invalid("`cursor` pages every node's records merged")
                    .hint("leave out `node` to follow `next_cursor`, or page one node's chain with `after`/`before`"));
            }
            let durable =
                (node == inner.node).then(|| inner.durable.lock().expect("durable lock").seq);
            query(&inner.js, &inner.config.prefix, &node, durable, &q).await
        })
    }

    fn durable_head(&self) -> Receipt {
        *self.inner.durable.lock().expect("durable lock")
    }

    fn chains(&self) -> Result<Vec<Option<String>>, Error> {
        let inner = self.inner.clone();
        let nodes = block_on(self.runtime.handle(), async move {
            chains(&inner.js, &inner.config.prefix).await
        })?;
        Ok(nodes.into_iter().map(Some).collect())
    }

    fn stats(&self) -> &AuditStats {
        &self.inner.stats
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.inner.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Msg::Shutdown(tx)).await.is_ok() {
                let _ = rx.await;
            }
        })
    }
}

/// What [`verify_chains`] found of one node's chain.
#[derive(Debug, Clone)]
pub struct ChainReport {
    /// The node.
    pub node: String,
    /// The check, with the hashes asked for.
    pub check: ChainCheck,
    /// Rounds read.
    pub rounds: u64,
    /// Payload bytes read.
    pub bytes: u64,
}

/// Reads and checks every node's chain under `config.prefix`, keeping the hashes of the
/// records `wanted` names for each node (checkpointed heads).
pub fn verify_chains(
    config: &NatsConfig,
    wanted: &std::collections::HashMap<String, Vec<u64>>,
) -> Result<Vec<ChainReport>, Error> {
    crate::check_prefix(&config.prefix)?;
    let rt = runtime()?;
    let config = config.clone();
    let wanted = wanted.clone();
    block_on(rt.handle(), async move {
        use futures::StreamExt;
        let client = connect(&config).await?;
        let js = context(client, &config);
        let mut nodes = chains(&js, &config.prefix).await?;
        for n in wanted.keys() {
            if !nodes.contains(n) {
                nodes.push(n.clone());
            }
        }
        nodes.sort();
        let mut out = Vec::new();
        for node in nodes {
            let mut report = ChainReport {
                node: node.clone(),
                check: ChainCheck::new(),
                rounds: 0,
                bytes: 0,
            };
            for seq in wanted.get(&node).into_iter().flatten() {
                report.check.want(*seq);
            }
            let stream = chain_stream(&config.prefix, &node);
            let Some((first, last)) = bounds(&js, &stream).await? else {
                out.push(report);
                continue;
            };
            if first > 1 {
                report.check.problem = Some((
                    1,
                    format!("the chain's first {} rounds were removed", first - 1),
                ));
            }
            if last >= first && report.check.problem.is_none() {
                let s = js
                    .get_stream_no_info(&stream)
                    .await
                    .map_err(|e| unreachable("reading the audit chain", e))?;
                let consumer = s
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: jetstream::consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| unreachable("reading the audit chain", e))?;
                let mut messages = consumer
                    .messages()
                    .await
                    .map_err(|e| unreachable("reading the audit chain", e))?;
                loop {
                    let m = match tokio::time::timeout(config.request_timeout, messages.next())
                        .await
                    {
                        Ok(Some(Ok(m))) => m,
                        Ok(Some(Err(e))) => return Err(unreachable("reading the audit chain", e)),
                        Ok(None) | Err(_) => {
                            return Err(unreachable("reading the audit chain", "no round in time"));
                        }
                    };
                    let sseq = m
                        .info()
                        .map_err(|e| unreachable("reading the audit chain", e))?
                        .stream_sequence;
                    let h = Headers::of(sseq, m.message.headers.as_ref())?;
                    report.rounds += 1;
                    report.bytes += m.message.payload.len() as u64;
                    if h.end > 0 || !m.message.payload.is_empty() {
                        report.check.feed(&m.message.payload, h.first + 1, h.end);
                    } else if sseq != 1 {
                        report.check.feed(&[], report.check.last_seq + 1, 0);
                    }
                    if sseq >= last {
                        break;
                    }
                }
            }
            out.push(report);
        }
        Ok(out)
    })
}
