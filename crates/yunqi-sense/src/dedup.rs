//! Idempotent producers: a batch of events sent with an idempotency key is appended once, however
//! often it is retried — concurrently, or after the server crashed between the append and the
//! answer. The key travels inside the log entry (the Arrow IPC schema's metadata), so the log
//! alone says which keys it holds: after a restart a stream's recent keys are read back from
//! its last [`SCAN_EVENTS`] events the first time a keyed batch arrives for it.
//!
//! In memory, per stream, at most [`KEYS_MAX`] keys, oldest forgotten first. A retry of a key
//! whose first attempt is still in flight waits for it; if the first attempt fails, the retry
//! appends itself.
//!
//! On a shared log (cluster mode: other nodes append to the same stream) a key this node does
//! not know may have been appended by another node — the producer's first attempt went there,
//! and that node died before answering. So before appending a key it has not seen, a node reads
//! the keys of the entries appended since it last looked (its own appends excepted: it knows
//! their keys). Two attempts of one key on two nodes *at the same moment* can still both
//! append; a producer retries after an answer or a timeout, not in parallel across nodes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use yunqi_stream::StreamLog;
use yunqi_types::Error;

/// Schema metadata key of the idempotency key.
pub const KEY_METADATA: &str = "yunqi.idempotency_key";
/// Schema metadata key of the number of events rejected from the keyed batch.
pub const REJECTED_METADATA: &str = "yunqi.rejected";

/// Keys remembered per stream.
pub const KEYS_MAX: usize = 100_000;

/// How far back a stream's log is read for keys after a restart, in events.
pub const SCAN_EVENTS: u64 = 2_000_000;

/// Longest idempotency key.
pub const KEY_BYTES_MAX: usize = 128;

/// What a keyed batch did the first time: `[first, end)` offsets, accepted and rejected counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Offset of the first accepted event.
    pub first: u64,
    /// Offset past the last.
    pub end: u64,
    /// Events rejected by validation.
    pub rejected: u64,
}

type Slot = tokio::sync::watch::Receiver<Option<Done>>;

#[derive(Default)]
struct Keys {
    loaded: bool,
    /// Every key appended before this offset is in `map` (or was forgotten as too old).
    scanned: u64,
    map: HashMap<String, Slot>,
    order: VecDeque<String>,
}

impl Keys {
    fn remember(&mut self, found: Vec<(String, Done)>) {
        for (key, done) in found {
            let (_tx, rx) = tokio::sync::watch::channel(Some(done));
            if let std::collections::hash_map::Entry::Vacant(v) = self.map.entry(key.clone()) {
                v.insert(rx);
                self.order.push_back(key);
            }
        }
        while self.order.len() > KEYS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// The keys of every stream.
#[derive(Default)]
pub struct Dedup {
    streams: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    keys: Mutex<HashMap<String, Keys>>,
}

/// Either the outcome of an earlier attempt, or the right (and duty) to append.
pub enum Claim {
    /// Appended before.
    Duplicate(Done),
    /// Append, then call [`Ticket::done`] (dropping the ticket without it lets a retry try).
    First(Ticket),
}

/// The right to append a keyed batch.
pub struct Ticket {
    dedup: Arc<Dedup>,
    stream: String,
    key: String,
    tx: Option<tokio::sync::watch::Sender<Option<Done>>>,
}

impl Ticket {
    /// Records what the append did.
    pub fn done(mut self, done: Done) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(done));
            let mut keys = self.dedup.keys.lock().expect("dedup lock");
            if let Some(k) = keys.get_mut(&self.stream)
                && k.scanned == done.first
            {
                k.scanned = done.end;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Not done: forget the key, so the next attempt appends; waiters wake and retry.
        if self.tx.take().is_some() {
            let mut keys = self.dedup.keys.lock().expect("dedup lock");
            if let Some(k) = keys.get_mut(&self.stream) {
                k.map.remove(&self.key);
                // Rare (a failed append): a scan keeps the order free of forgotten keys.
                if let Some(i) = k.order.iter().rposition(|x| x == &self.key) {
                    k.order.remove(i);
                }
            }
        }
    }
}

/// Checks an idempotency key: 1 to [`KEY_BYTES_MAX`] printable ASCII characters.
pub fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty()
        || key.len() > KEY_BYTES_MAX
        || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(Error::invalid("invalid idempotency key").hint(format!(
            "use 1 to {KEY_BYTES_MAX} printable ASCII characters without spaces, e.g. a UUID"
        )));
    }
    Ok(())
}

impl Dedup {
    /// Claims `key` on `stream`: the earlier outcome, or a ticket to append.
    pub async fn claim(
        self: &Arc<Self>,
        log: &Arc<dyn StreamLog>,
        stream: &str,
        key: &str,
    ) -> Result<Claim, Error> {
        self.load(log, stream).await?;
        if log.shared() {
            self.catch_up(log, stream, key).await?;
        }
        loop {
            let waiting = {
                let mut all = self.keys.lock().expect("dedup lock");
                let keys = all.entry(stream.to_string()).or_default();
                match keys.map.get(key) {
                    Some(slot) => slot.clone(),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        keys.map.insert(key.to_string(), rx);
                        keys.order.push_back(key.to_string());
                        while keys.order.len() > KEYS_MAX {
                            if let Some(old) = keys.order.pop_front() {
                                keys.map.remove(&old);
                            }
                        }
                        return Ok(Claim::First(Ticket {
                            dedup: self.clone(),
                            stream: stream.to_string(),
                            key: key.to_string(),
                            tx: Some(tx),
                        }));
                    }
                }
            };
            let mut rx = waiting;
            // Resolves with the outcome, or errs when the first attempt gave up.
            match rx.wait_for(Option::is_some).await {
                Ok(v) => return Ok(Claim::Duplicate(v.expect("waited for some"))),
                Err(_) => continue,
            }
        }
    }

    /// The lock that serialises reading a stream's keys.
    fn gate(&self, stream: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.streams
            .lock()
            .expect("dedup lock")
            .entry(stream.to_string())
            .or_default()
            .clone()
    }

    /// Reads a stream's recent keys from its log, once per stream per process.
    async fn load(&self, log: &Arc<dyn StreamLog>, stream: &str) -> Result<(), Error> {
        let gate = self.gate(stream);
        let _g = gate.lock().await;
        if self
            .keys
            .lock()
            .expect("dedup lock")
            .get(stream)
            .is_some_and(|k| k.loaded)
        {
            return Ok(());
        }
        self.scan_from(log, stream, |log, s| {
            log.end_offset(s)
                .saturating_sub(SCAN_EVENTS)
                .max(log.start_offset(s))
        })
        .await?;
        if let Some(k) = self.keys.lock().expect("dedup lock").get_mut(stream) {
            k.loaded = true;
        }
        Ok(())
    }

    /// Reads the keys from the offset `from` picks to the end and remembers them.
    async fn scan_from(
        &self,
        log: &Arc<dyn StreamLog>,
        stream: &str,
        from: impl FnOnce(&dyn StreamLog, &str) -> u64 + Send + 'static,
    ) -> Result<(), Error> {
        let (log2, s) = (log.clone(), stream.to_string());
        let (found, scanned) = tokio::task::spawn_blocking(move || {
            let from = from(log2.as_ref(), &s);
            scan(log2.as_ref(), &s, from)
        })
        .await
        .map_err(|e| Error::internal(format!("idempotency scan failed: {e}")))??;
        let mut all = self.keys.lock().expect("dedup lock");
        let keys = all.entry(stream.to_string()).or_default();
        keys.remember(found);
        keys.scanned = keys.scanned.max(scanned);
        Ok(())
    }

    /// On a shared log: learns the keys other nodes appended since this node last looked,
    /// unless `key` is known already.
    async fn catch_up(
        &self,
        log: &Arc<dyn StreamLog>,
        stream: &str,
        key: &str,
    ) -> Result<(), Error> {
        let known = |d: &Dedup| {
            d.keys
                .lock()
                .expect("dedup lock")
                .get(stream)
                .is_some_and(|k| k.map.contains_key(key))
        };
        if known(self) {
            return Ok(());
        }
        let gate = self.gate(stream);
        let _g = gate.lock().await;
        if known(self) {
            return Ok(());
        }
        let from = self
            .keys
            .lock()
            .expect("dedup lock")
            .get(stream)
            .map(|k| k.scanned)
            .unwrap_or(0);
        // A shared log reads from its first kept offset when `from` was removed by retention.
        self.scan_from(log, stream, move |_, _| from).await
    }
}

/// The keys of a stream's entries from `from` to its end, oldest first, and the offset
/// the scan reached.
fn scan(
    log: &dyn StreamLog,
    stream: &str,
    mut from: u64,
) -> Result<(Vec<(String, Done)>, u64), Error> {
    let mut out = Vec::new();
    loop {
        let entries = log.read(stream, from, 8 << 20)?;
        if entries.is_empty() {
            return Ok((out, from));
        }
        for e in entries {
            from = e.end();
            if let Some((key, rejected)) = entry_key(&e.payload) {
                out.push((
                    key,
                    Done {
                        first: e.first,
                        end: e.end(),
                        rejected,
                    },
                ));
            }
        }
    }
}

/// The key (and rejected count) an entry's payload carries, if any: only the IPC schema is read.
pub fn entry_key(payload: &[u8]) -> Option<(String, u64)> {
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(payload), None)
            .ok()?;
    let schema = reader.schema();
    let md = schema.metadata();
    let key = md.get(KEY_METADATA)?.clone();
    let rejected = md
        .get(REJECTED_METADATA)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Some((key, rejected))
}
