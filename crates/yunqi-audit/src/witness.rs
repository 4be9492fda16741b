//! Witnesses: signed checkpoints of the chain's head, kept outside the data directory, so a
//! rewrite of the chain by someone who can write the data directory is detected.
//!
//! The chain checks itself only: whoever rewrites a record and recomputes every later hash,
//! checksum and the head file leaves a chain that verifies. A checkpoint is the chain's last
//! durable record (sequence number and hash) at a moment, with a short digest (the first 4
//! bytes of the hash) of every record since the previous checkpoint, signed with the node's
//! Ed25519 key; yunqi writes one every `every` seconds or `records` records, whichever first,
//! and at shutdown, to every witness the operator names: a file (JSON lines, fsynced), an HTTP
//! endpoint (POST, from a thread of its own: a slow witness never holds up the chain), and —
//! optionally — stamped by an RFC 3161 time-stamp authority, which proves when.
//!
//! [`verify_witnessed`] compares a chain with checkpoints: the first record whose hash differs
//! from the witnessed digest is the first record a rewrite touched; a chain that ends before a
//! checkpoint's record was truncated.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use yunqi_types::Error;

use crate::chain::{AuditChain, list_segments};
use crate::format;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Bytes of each record's hash a checkpoint carries.
pub const DIGEST_BYTES: usize = 4;

/// Most records whose digests one checkpoint carries (older ones: only the head is witnessed).
pub const DIGESTS_MAX: u64 = 1_000_000;

/// The file a directory witness appends to.
pub const WITNESS_FILE: &str = "audit-checkpoints.jsonl";

/// A signed checkpoint of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version (1).
    pub v: u32,
    /// The last record's sequence number.
    pub seq: u64,
    /// Its hash, hex.
    pub hash: String,
    /// When the checkpoint was made (RFC 3339, UTC).
    pub time: String,
    /// The first record whose digest `digests` carries.
    pub from: u64,
    /// The first [`DIGEST_BYTES`] bytes of the hash of every record `from..=seq`, base64.
    pub digests: String,
    /// The node's public key, base64.
    pub key: String,
    /// Ed25519 signature of [`Checkpoint::message`], base64.
    pub sig: String,
    /// An RFC 3161 time-stamp response over SHA-256 of the message, base64 DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsa: Option<String>,
}

impl Checkpoint {
    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        let digests = hex::encode(sha2::Sha256::digest(self.digests.as_bytes()));
        format!(
            "yunqi audit checkpoint v{}\nseq {}\nhash {}\ntime {}\nfrom {}\ndigests {digests}\n",
            self.v, self.seq, self.hash, self.time, self.from
        )
        .into_bytes()
    }

    /// SHA-256 of the message: what a time-stamp authority stamps.
    pub fn imprint(&self) -> [u8; 32] {
        sha2::Sha256::digest(self.message()).into()
    }

    /// Whether the signature is the key's.
    pub fn signature_ok(&self) -> bool {
        signed_by(&self.key, &self.sig, &self.message())
    }

    fn digests(&self) -> Vec<u8> {
        B64.decode(&self.digests).unwrap_or_default()
    }
}

/// Whether `sig` (base64 Ed25519 signature) is `key`'s (base64 public key) over `message`.
pub(crate) fn signed_by(key: &str, sig: &str, message: &[u8]) -> bool {
    let key = B64
        .decode(key)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .and_then(|k| VerifyingKey::from_bytes(&k).ok());
    let sig = B64
        .decode(sig)
        .ok()
        .and_then(|s| <[u8; 64]>::try_from(s).ok())
        .map(|s| Signature::from_bytes(&s));
    match (key, sig) {
        (Some(k), Some(s)) => k.verify(message, &s).is_ok(),
        _ => false,
    }
}

/// The node's signing key: `node.key` in the data directory (32 random bytes, mode 0600),
/// created on first use.
pub fn node_key(data: &Path) -> Result<SigningKey, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data.join("node.key");
    let io = |e: std::io::Error, what: &str| Error::internal(format!("{what} the node key: {e}"));
    let seed: [u8; 32] = match std::fs::read(&path) {
        Ok(b) => b
            .try_into()
            .map_err(|_| Error::internal("the node key is not 32 bytes"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| Error::internal(format!("random: {e}")))?;
            let tmp = data.join(".node.key.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io(e, "create"))?;
            f.write_all(&seed).map_err(|e| io(e, "write"))?;
            f.sync_all().map_err(|e| io(e, "sync"))?;
            std::fs::rename(&tmp, &path).map_err(|e| io(e, "publish"))?;
            seed
        }
        Err(e) => return Err(io(e, "read")),
    };
    Ok(SigningKey::from_bytes(&seed))
}

/// Where checkpoints go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A file, appended to (a directory: [`WITNESS_FILE`] in it).
    File(PathBuf),
    /// An HTTP endpoint, POSTed to.
    Http(String),
}

impl Target {
    /// A witness as the operator names it: an `http://` URL, or a file or directory outside
    /// the data directory `data`.
    pub fn parse(s: &str, data: &Path) -> Result<Target, Error> {
        if s.starts_with("http://") {
            return Ok(Target::Http(s.to_string()));
        }
        if s.starts_with("https://") {
            return Err(Error::invalid("https witnesses are not served")
                .hint("use an http:// endpoint on a trusted network, or a file witness"));
        }
        let path = PathBuf::from(s);
        let path = if path.is_dir() {
            path.join(WITNESS_FILE)
        } else {
            path
        };
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let parent = parent.canonicalize().map_err(|e| {
            Error::invalid(format!("witness {s}: its directory cannot be used: {e}"))
                .hint("create the directory first")
        })?;
        let data = data.canonicalize().unwrap_or_else(|_| data.to_path_buf());
        if parent.starts_with(&data) {
            return Err(Error::invalid(format!(
                "witness {s} is inside the data directory"
            ))
            .hint("a witness must be where whoever can write the data directory cannot: another disk, host or account"));
        }
        Ok(Target::File(path))
    }
}

/// How and where to witness.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// Where.
    pub targets: Vec<Target>,
    /// A checkpoint at least this often while records are appended.
    pub every: Duration,
    /// A checkpoint at least every this many records.
    pub records: u64,
    /// An RFC 3161 time-stamp authority (`http://…`).
    pub tsa: Option<String>,
}

/// Reads the checkpoints of a file witness (a directory: its [`WITNESS_FILE`]); lines that
/// are not checkpoints are reported by line number.
pub fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>, Error> {
    let path = if path.is_dir() {
        path.join(WITNESS_FILE)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::invalid(format!("witness {} cannot be read: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                Error::invalid(format!(
                    "witness {} line {} is not a checkpoint: {e}",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

/// Every record's `(seq, hash)` in the chain's segments, in order, up to the first bad frame.
fn chain_hashes(dir: &Path) -> Result<Vec<(u64, [u8; 32])>, Error> {
    hashes_between(dir, 0, u64::MAX)
}

/// The `(seq, hash)` of records `from..=to` (reading only the segments that hold them).
fn hashes_between(dir: &Path, from: u64, to: u64) -> Result<Vec<(u64, [u8; 32])>, Error> {
    let mut out = Vec::new();
    let segments = list_segments(dir)?;
    let first = segments
        .partition_point(|(first, _)| *first <= from)
        .saturating_sub(1);
    for (start, path) in &segments[first..] {
        if *start > to {
            break;
        }
        let buf = std::fs::read(path)?;
        let mut offset = format::SEGMENT_HEADER_BYTES;
        while offset < buf.len() {
            let Ok(frame) = format::read_frame(&buf, offset) else {
                break;
            };
            let mut h = [0u8; 32];
            if frame.stored_hash.len() == 32 {
                h.copy_from_slice(frame.stored_hash);
            }
            let seq = format::body_seq(frame.body);
            if seq > to {
                return Ok(out);
            }
            if seq >= from {
                out.push((seq, h));
            }
            offset = frame.end;
        }
    }
    Ok(out)
}

/// What the witnesses say of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WitnessReport {
    /// Checkpoints read.
    pub checkpoints: usize,
    /// The highest record witnessed.
    pub witnessed_seq: u64,
    /// When the last checkpoint was made.
    pub last_time: Option<String>,
    /// The signing keys (base64), in the order first seen.
    pub keys: Vec<String>,
    /// Whether the data directory's node key signed every checkpoint (`None`: no key there).
    pub node_key_matches: Option<bool>,
    /// Checkpoints stamped by a time-stamp authority whose stamp covers them.
    pub stamped: usize,
    /// The first record that differs from what a witness saw (rewritten), or that is missing.
    pub first_touched: Option<u64>,
    /// What is wrong, in a sentence; `None` when the chain is what the witnesses saw.
    pub problem: Option<String>,
}

impl WitnessReport {
    /// Whether the chain matches every checkpoint.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Checks the chain in `dir` against `checkpoints`. Checkpoints whose signature fails are a
/// problem of their own (a forged witness); the earliest record any checkpoint contradicts is
/// named.
pub fn verify_witnessed(
    dir: &Path,
    data: &Path,
    mut checkpoints: Vec<Checkpoint>,
) -> Result<WitnessReport, Error> {
    checkpoints.sort_by_key(|c| c.seq);
    let mut keys: Vec<String> = Vec::new();
    for c in &checkpoints {
        if !keys.contains(&c.key) {
            keys.push(c.key.clone());
        }
    }
    let node_key_matches = match std::fs::read(data.join("node.key")) {
        Ok(seed) => <[u8; 32]>::try_from(seed).ok().map(|s| {
            let k = B64.encode(SigningKey::from_bytes(&s).verifying_key().as_bytes());
            keys.iter().all(|x| *x == k)
        }),
        Err(_) => None,
    };
    let mut report = WitnessReport {
        checkpoints: checkpoints.len(),
        witnessed_seq: checkpoints.last().map_or(0, |c| c.seq),
        last_time: checkpoints.last().map(|c| c.time.clone()),
        keys,
        node_key_matches,
        stamped: checkpoints
            .iter()
            .filter(|c| {
                c.tsa
                    .as_ref()
                    .and_then(|t| B64.decode(t).ok())
                    .is_some_and(|der| tsa::covers(&der, &c.imprint()))
            })
            .count(),
        first_touched: None,
        problem: None,
    };
    if let Some(bad) = checkpoints.iter().find(|c| !c.signature_ok()) {
        report.problem = Some(format!(
            "the checkpoint of record {} ({}) is not signed by its key: the witness was altered",
            bad.seq, bad.time
        ));
        return Ok(report);
    }
    let hashes = chain_hashes(dir)?;
    let first = hashes.first().map_or(1, |(s, _)| *s);
    let last = hashes.last().map_or(0, |(s, _)| *s);
    let hash_at = |seq: u64| -> Option<&[u8; 32]> {
        if seq < first || seq > last {
            return None;
        }
        hashes.get((seq - first) as usize).map(|(_, h)| h)
    };
    // The earliest contradiction over all checkpoints.
    let mut found: Option<(u64, String)> = None;
    let mut note = |seq: u64, why: String| {
        if found.as_ref().is_none_or(|(s, _)| seq < *s) {
            found = Some((seq, why));
        }
    };
    for c in &checkpoints {
        let digests = c.digests();
        let mut flagged = false;
        for (i, d) in digests.chunks(DIGEST_BYTES).enumerate() {
            let seq = c.from + i as u64;
            match hash_at(seq) {
                Some(h) if h[..DIGEST_BYTES] == *d => {}
                Some(_) => {
                    note(
                        seq,
                        format!(
                            "record {seq} is not the record the witness saw at {}: the chain was rewritten from record {seq} on",
                            c.time
                        ),
                    );
                    flagged = true;
                    break;
                }
                None => {
                    note(
                        seq,
                        format!(
                            "record {seq} is missing, but the witness saw records up to {} at {}: the chain was cut",
                            c.seq, c.time
                        ),
                    );
                    flagged = true;
                    break;
                }
            }
        }
        if flagged {
            continue;
        }
        // Digests that all match but a head that does not: the record at the head changed.
        match hash_at(c.seq) {
            None => note(
                (last + 1).min(c.seq),
                format!(
                    "the chain ends at record {last}, but the witness saw records up to {} at {}: the chain was cut",
                    c.seq, c.time
                ),
            ),
            Some(h) if hex::encode(h) != c.hash => note(
                c.seq,
                format!(
                    "record {} is not the record the witness saw at {}: the chain was rewritten",
                    c.seq, c.time
                ),
            ),
            Some(_) => {}
        }
    }
    if let Some((seq, why)) = found {
        report.first_touched = Some(seq);
        report.problem = Some(why);
    }
    Ok(report)
}

/// The witnessing thread of a running server.
pub struct Witnesser {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .max_redirects(0)
        .http_status_as_error(false)
        .user_agent(concat!("yunqi/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

struct State {
    seq: u64,
    made: Instant,
}

impl Witnesser {
    /// Starts witnessing `chain` with `key`. Without targets nothing is started.
    pub fn start(
        chain: Arc<AuditChain>,
        key: SigningKey,
        cfg: WitnessConfig,
    ) -> Result<Witnesser, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        if cfg.targets.is_empty() {
            return Ok(Witnesser {
                stop,
                thread: Mutex::new(None),
            });
        }
        // HTTP witnesses each get a thread and a short queue; a full queue drops (counted).
        let mut http: Vec<std::sync::mpsc::SyncSender<String>> = Vec::new();
        for t in &cfg.targets {
            if let Target::Http(url) = t {
                let (tx, rx) = std::sync::mpsc::sync_channel::<String>(64);
                let (url, chain) = (url.clone(), chain.clone());
                std::thread::Builder::new()
                    .name("yunqi-witness-http".into())
                    .spawn(move || {
                        let agent = http_agent();
                        for body in rx {
                            let ok = agent
                                .post(&url)
                                .header("Content-Type", "application/json")
                                .send(body.as_str())
                                .is_ok_and(|r| r.status().is_success());
                            if !ok {
                                chain.stats().witness_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%url, "audit checkpoint not accepted by the witness");
                            }
                        }
                    })
                    .map_err(|e| Error::internal(format!("start witness thread: {e}")))?;
                http.push(tx);
            }
        }
        let files: Vec<PathBuf> = cfg
            .targets
            .iter()
            .filter_map(|t| match t {
                Target::File(p) => Some(p.clone()),
                Target::Http(_) => None,
            })
            .collect();
        // Continue after the last checkpoint a file witness holds, if any.
        let start_seq = files
            .iter()
            .filter_map(|p| read_checkpoints(p).ok())
            .filter_map(|cs| cs.iter().map(|c| c.seq).max())
            .max()
            .unwrap_or(0)
            .min(chain.durable_head().seq);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("yunqi-witness".into())
            .spawn(move || {
                let agent = http_agent();
                let stats2 = chain.stats();
                let mut st = State {
                    seq: start_seq,
                    made: Instant::now(),
                };
                loop {
                    let stopping = stop2.load(Ordering::Acquire);
                    let head = chain.durable_head();
                    let due = head.seq > st.seq
                        && (stopping
                            || head.seq - st.seq >= cfg.records
                            || st.made.elapsed() >= cfg.every);
                    if due {
                        match checkpoint(&chain, &key, st.seq, head, cfg.tsa.as_deref(), &agent) {
                            Ok(c) => {
                                let line = serde_json::to_string(&c).unwrap_or_default();
                                for f in &files {
                                    if let Err(e) = append_line(f, &line) {
                                        stats2.witness_failures.fetch_add(1, Ordering::Relaxed);
                                        tracing::error!(witness = %f.display(), error = %e, "audit checkpoint not written");
                                    }
                                }
                                for tx in &http {
                                    if tx.try_send(line.clone()).is_err() {
                                        stats2.witness_failures.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                stats2.witness_checkpoints.fetch_add(1, Ordering::Relaxed);
                                stats2.witness_last_seq.store(c.seq, Ordering::Relaxed);
                                st = State {
                                    seq: c.seq,
                                    made: Instant::now(),
                                };
                            }
                            Err(e) => {
                                stats2.witness_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::error!(error = %e.message, "audit checkpoint not made");
                                st.made = Instant::now();
                            }
                        }
                    }
                    if stopping {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(http);
            })
            .map_err(|e| Error::internal(format!("start witness thread: {e}")))?;
        Ok(Witnesser {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Makes a last checkpoint of what is durable and stops.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().expect("witness lock").take() {
            let _ = t.join();
        }
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

/// Makes a signed checkpoint of `head`, with the digests of the records after `after`.
fn checkpoint(
    chain: &AuditChain,
    key: &SigningKey,
    after: u64,
    head: crate::Receipt,
    tsa: Option<&str>,
    agent: &ureq::Agent,
) -> Result<Checkpoint, Error> {
    let from = (after + 1)
        .max(head.seq.saturating_sub(DIGESTS_MAX - 1))
        .max(1);
    let mut digests = Vec::with_capacity(((head.seq + 1 - from) as usize) * DIGEST_BYTES);
    for (_, h) in hashes_between(chain.dir(), from, head.seq)? {
        digests.extend_from_slice(&h[..DIGEST_BYTES]);
    }
    if digests.len() != ((head.seq + 1 - from) as usize) * DIGEST_BYTES {
        return Err(Error::internal(
            "the chain's records do not match its head while checkpointing",
        ));
    }
    let mut c = Checkpoint {
        v: 1,
        seq: head.seq,
        hash: hex::encode(head.hash),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        from,
        digests: B64.encode(&digests),
        key: B64.encode(key.verifying_key().as_bytes()),
        sig: String::new(),
        tsa: None,
    };
    c.sig = B64.encode(key.sign(&c.message()).to_bytes());
    if let Some(url) = tsa {
        match tsa::stamp(agent, url, &c.imprint()) {
            Ok(der) => c.tsa = Some(B64.encode(der)),
            Err(e) => {
                chain
                    .stats()
                    .witness_tsa_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%url, error = %e, "audit checkpoint not time-stamped");
            }
        }
    }
    Ok(c)
}

/// RFC 3161 time-stamp protocol: the request yunqi sends, and what it checks of the answer.
pub mod tsa {
    /// DER of `AlgorithmIdentifier { id-sha256, NULL }`.
    const SHA256_ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
    ];

    /// A `TimeStampReq` (version 1, SHA-256 imprint, a nonce, the TSA's certificate asked for).
    pub fn request(imprint: &[u8; 32], nonce: [u8; 8]) -> Vec<u8> {
        let mut imprint_seq = vec![0x30, (SHA256_ALG.len() + 34) as u8];
        imprint_seq.extend_from_slice(&SHA256_ALG);
        imprint_seq.extend_from_slice(&[0x04, 0x20]);
        imprint_seq.extend_from_slice(imprint);
        let mut body = vec![0x02, 0x01, 0x01];
        body.extend_from_slice(&imprint_seq);
        body.extend_from_slice(&[0x02, 0x08]);
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&[0x01, 0x01, 0xff]);
        let mut out = vec![0x30, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }

    /// Reads a DER length at `i`; returns (length, offset of the contents).
    fn length(der: &[u8], i: usize) -> Option<(usize, usize)> {
        let b = *der.get(i)? as usize;
        if b < 0x80 {
            return Some((b, i + 1));
        }
        let n = b & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for k in 0..n {
            len = (len << 8) | *der.get(i + 1 + k)? as usize;
        }
        Some((len, i + 1 + n))
    }

    /// The PKIStatus of a `TimeStampResp` (0 granted, 1 granted with modifications).
    pub fn status(der: &[u8]) -> Option<u64> {
        if *der.first()? != 0x30 {
            return None;
        }
        let (_, i) = length(der, 1)?;
        if *der.get(i)? != 0x30 {
            return None;
        }
        let (_, j) = length(der, i + 1)?;
        if *der.get(j)? != 0x02 {
            return None;
        }
        let (n, k) = length(der, j + 1)?;
        let mut v = 0u64;
        for b in der.get(k..k + n)? {
            v = (v << 8) | *b as u64;
        }
        Some(v)
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// Whether a granted response stamps `imprint` (its TSTInfo carries it as its message
    /// imprint). The TSA's signature is checked with the TSA's certificate by `openssl ts
    /// -verify` or any RFC 3161 verifier; this checks the response is about this checkpoint.
    pub fn covers(der: &[u8], imprint: &[u8; 32]) -> bool {
        let mut needle = vec![0x04, 0x20];
        needle.extend_from_slice(imprint);
        matches!(status(der), Some(0 | 1)) && find(der, &needle).is_some()
    }

    /// The time the TSA stamped (`genTime`, GeneralizedTime as written), if found.
    pub fn gen_time(der: &[u8], imprint: &[u8; 32]) -> Option<String> {
        let mut needle = vec![0x04, 0x20];
        needle.extend_from_slice(imprint);
        let at = find(der, &needle)? + needle.len();
        let rest = der.get(at..)?;
        (0..rest.len().saturating_sub(2)).find_map(|i| {
            let len = rest[i + 1] as usize;
            (rest[i] == 0x18 && (15..=24).contains(&len))
                .then(|| rest.get(i + 2..i + 2 + len))
                .flatten()
                .and_then(|t| std::str::from_utf8(t).ok())
                .filter(|t| t.ends_with('Z') && t.as_bytes()[..8].iter().all(u8::is_ascii_digit))
                .map(str::to_string)
        })
    }

    /// Asks the TSA at `url` to stamp `imprint`; the DER `TimeStampResp` when granted.
    pub fn stamp(agent: &ureq::Agent, url: &str, imprint: &[u8; 32]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
        nonce[0] = (nonce[0] & 0x7f) | 0x01;
        let mut r = agent
            .post(url)
            .header("Content-Type", "application/timestamp-query")
            .send(&request(imprint, nonce)[..])
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status().as_u16()));
        }
        let der = r
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        match status(&der) {
            Some(0 | 1) => {}
            Some(s) => return Err(format!("the authority refused (PKIStatus {s})")),
            None => return Err("the answer is not a TimeStampResp".into()),
        }
        let mut n = vec![0x02, 0x08];
        n.extend_from_slice(&nonce);
        if !covers(&der, imprint) || find(&der, &n).is_none() {
            return Err("the stamp is not for this request (imprint or nonce differ)".into());
        }
        Ok(der)
    }
}
