//! The audit chains of a cluster: one chain per node (in the shared log engine), and signed
//! **cluster checkpoints** that chain every node's head together (kept in PostgreSQL).
//!
//! A node's chain has the embedded chain's records and rules — dense sequence numbers from 1,
//! each record holding the hash of the one before — so [`ChainCheck`] checks it as
//! [`crate::verify`] checks a directory, one buffer of frames at a time, in order.
//!
//! A cluster checkpoint names, for every node, the sequence number and hash of its last
//! record at the time, the hash of the checkpoint before it, and is signed with the key of the
//! node that made it. Rewriting a node's history (or cutting it) afterwards makes the chain
//! disagree with every checkpoint made since; removing or altering a checkpoint breaks the
//! checkpoints' own chain. [`check_checkpoints`] checks both.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::{self, FrameError, HASH_BYTES, Hash};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Checks a chain read in order, buffer by buffer (each buffer: whole frames, as the segment
/// files and the shared engine's messages hold them).
#[derive(Debug, Clone)]
pub struct ChainCheck {
    /// Records checked and found good.
    pub records: u64,
    /// Sequence number of the last good record (0: none).
    pub last_seq: u64,
    /// Its hash.
    pub last_hash: Hash,
    /// The first problem: (sequence number of the first bad record, what is wrong).
    pub problem: Option<(u64, String)>,
    /// Hashes of the records asked for with [`ChainCheck::want`], once seen.
    pub wanted: HashMap<u64, Hash>,
}

impl Default for ChainCheck {
    fn default() -> Self {
        ChainCheck::new()
    }
}

impl ChainCheck {
    /// A check from the first record.
    pub fn new() -> ChainCheck {
        ChainCheck {
            records: 0,
            last_seq: 0,
            last_hash: [0; HASH_BYTES],
            problem: None,
            wanted: HashMap::new(),
        }
    }

    /// Asks to keep the hash of record `seq` when it is seen (for checkpoints).
    pub fn want(&mut self, seq: u64) {
        self.wanted.entry(seq).or_insert([0; HASH_BYTES]);
    }

    /// Checks the frames of `buf`, which claims to hold records `first..=last`. After the first
    /// problem, later buffers are ignored.
    pub fn feed(&mut self, buf: &[u8], first: u64, last: u64) {
        if self.problem.is_some() {
            return;
        }
        let expected = self.last_seq + 1;
        if first != expected && !(buf.is_empty() && first > last) {
            self.problem = Some((
                expected,
                if first > expected {
                    format!("record {expected} is missing: the next round starts at record {first}")
                } else {
                    format!("record {first} appears again where record {expected} should be")
                },
            ));
            return;
        }
        let mut offset = 0;
        while offset < buf.len() {
            let expected = self.last_seq + 1;
            let frame = match format::read_frame(buf, offset) {
                Ok(f) => f,
                Err(FrameError::BadChecksum) => {
                    self.problem = Some((
                        expected,
                        format!(
                            "record {expected} is damaged: its checksum does not match its bytes"
                        ),
                    ));
                    return;
                }
                Err(e) => {
                    self.problem = Some((
                        expected,
                        format!("record {expected} cannot be read ({e:?})"),
                    ));
                    return;
                }
            };
            let seq = format::body_seq(frame.body);
            if seq != expected {
                self.problem = Some((
                    expected,
                    if seq > expected {
                        format!("record {expected} is missing: found record {seq} in its place")
                    } else {
                        format!("record {seq} appears again where record {expected} should be")
                    },
                ));
                return;
            }
            let hash: Hash = Sha256::digest(frame.body).into();
            if hash[..] != *frame.stored_hash {
                self.problem = Some((
                    seq,
                    format!("record {seq} was altered: its contents do not match its hash"),
                ));
                return;
            }
            if format::body_prev(frame.body) != self.last_hash {
                self.problem = Some((
                    self.last_seq,
                    format!(
                        "record {} does not match the hash chained into record {seq}: \
                         one of them was altered and its hash forged",
                        self.last_seq
                    ),
                ));
                return;
            }
            if let Some(w) = self.wanted.get_mut(&seq) {
                *w = hash;
            }
            self.last_seq = seq;
            self.last_hash = hash;
            self.records += 1;
            offset = frame.end;
        }
        if self.last_seq != last {
            self.problem = Some((
                self.last_seq + 1,
                format!(
                    "a round said to end at record {last} ends at record {}",
                    self.last_seq
                ),
            ));
        }
    }

    /// The hash of a wanted record, if it was seen.
    pub fn hash_of(&self, seq: u64) -> Option<Hash> {
        (seq <= self.last_seq && seq > 0)
            .then(|| self.wanted.get(&seq).copied())
            .flatten()
    }
}

/// One node's head in a cluster checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHead {
    /// The node.
    pub node: String,
    /// Sequence number of its last record.
    pub seq: u64,
    /// Its hash, hex.
    pub hash: String,
}

/// A signed checkpoint of every node's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCheckpoint {
    /// Format version (1).
    pub v: u32,
    /// Position in the checkpoints' chain, from 1.
    pub id: u64,
    /// When it was made (RFC 3339, UTC).
    pub time: String,
    /// Hash of the checkpoint before it, hex (zeros for the first).
    pub prev: String,
    /// Every node's head, sorted by node.
    pub heads: Vec<NodeHead>,
    /// The node that made and signed it.
    pub by: String,
    /// That node's public key, base64.
    pub key: String,
    /// Ed25519 signature of [`ClusterCheckpoint::message`], base64.
    pub sig: String,
}

impl ClusterCheckpoint {
    /// Makes and signs the checkpoint after `prev` over `heads` (a node missing from `heads`
    /// keeps its head in `prev`; a head behind the one in `prev` is replaced by it, so that
    /// heads never go backwards whichever node read them when).
    pub fn make(
        prev: Option<&ClusterCheckpoint>,
        heads: Vec<NodeHead>,
        by: &str,
        key: &SigningKey,
        time: chrono::DateTime<chrono::Utc>,
    ) -> ClusterCheckpoint {
        let mut merged: BTreeMap<String, NodeHead> = BTreeMap::new();
        for h in prev.map(|p| p.heads.clone()).unwrap_or_default() {
            merged.insert(h.node.clone(), h);
        }
        for h in heads {
            match merged.get(&h.node) {
                Some(old) if old.seq >= h.seq => {}
                _ => {
                    merged.insert(h.node.clone(), h);
                }
            }
        }
        let mut c = ClusterCheckpoint {
            v: 1,
            id: prev.map_or(1, |p| p.id + 1),
            time: time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            prev: prev.map_or_else(|| hex::encode([0u8; HASH_BYTES]), |p| p.hash()),
            heads: merged.into_values().collect(),
            by: by.to_string(),
            key: B64.encode(key.verifying_key().as_bytes()),
            sig: String::new(),
        };
        c.sig = B64.encode(key.sign(&c.message()).to_bytes());
        c
    }

    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        let mut m = format!(
            "yunqi cluster audit checkpoint v{}\nid {}\ntime {}\nprev {}\nby {}\n",
            self.v, self.id, self.time, self.prev, self.by
        );
        for h in &self.heads {
            m.push_str(&format!("head {} {} {}\n", h.node, h.seq, h.hash));
        }
        m.into_bytes()
    }

    /// SHA-256 of the message and the signature, hex: what the next checkpoint chains.
    pub fn hash(&self) -> String {
        let mut d = Sha256::new();
        d.update(self.message());
        d.update(self.sig.as_bytes());
        hex::encode(d.finalize())
    }

    /// Whether the signature is the key's.
    pub fn signature_ok(&self) -> bool {
        crate::witness::signed_by(&self.key, &self.sig, &self.message())
    }

    /// The head of `node`, if the checkpoint names it.
    pub fn head(&self, node: &str) -> Option<&NodeHead> {
        self.heads.iter().find(|h| h.node == node)
    }
}

/// Checks the checkpoints' own chain (in id order): ids dense, each naming the hash of the
/// one before, signatures good, no node's head going backwards. Returns the problems found,
/// each naming the checkpoint.
pub fn check_checkpoints(checkpoints: &[ClusterCheckpoint]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut prev: Option<&ClusterCheckpoint> = None;
    for c in checkpoints {
        match prev {
            None if c.id != 1 => problems.push(format!(
                "checkpoint {} is the first one kept: checkpoints 1 to {} are missing",
                c.id,
                c.id - 1
            )),
            None if c.prev != hex::encode([0u8; HASH_BYTES]) => {
                problems.push("checkpoint 1 names a checkpoint before it".into())
            }
            Some(p) if c.id != p.id + 1 => problems.push(format!(
                "checkpoint {} follows checkpoint {}: the ones between are missing",
                c.id, p.id
            )),
            Some(p) if c.prev != p.hash() => problems.push(format!(
                "checkpoint {} does not chain checkpoint {}: one of them was altered",
                c.id, p.id
            )),
            _ => {}
        }
        if !c.signature_ok() {
            problems.push(format!(
                "checkpoint {} is not signed by the key it names (node {})",
                c.id, c.by
            ));
        }
        if let Some(p) = prev {
            for h in &p.heads {
                match c.head(&h.node) {
                    None => problems.push(format!(
                        "checkpoint {} leaves out node {}, which checkpoint {} named",
                        c.id, h.node, p.id
                    )),
                    Some(n) if n.seq < h.seq => problems.push(format!(
                        "checkpoint {} puts node {}'s chain at record {}, behind record {} in checkpoint {}",
                        c.id, h.node, n.seq, h.seq, p.id
                    )),
                    _ => {}
                }
            }
        }
        prev = Some(c);
    }
    problems
}

/// Checks one node's verified chain against every checkpoint that names it: the chain must
/// reach each checkpointed record and hold the checkpointed hash there. `check` must have
/// been given [`ChainCheck::want`] for every checkpointed sequence number of the node.
pub fn check_chain_against(
    node: &str,
    check: &ChainCheck,
    checkpoints: &[ClusterCheckpoint],
) -> Vec<String> {
    let mut problems = Vec::new();
    for c in checkpoints {
        let Some(h) = c.head(node) else { continue };
        if h.seq == 0 {
            continue;
        }
        if h.seq > check.last_seq {
            problems.push(format!(
                "node {node}'s chain ends at record {}, but checkpoint {} saw record {}: the chain was cut",
                check.last_seq, c.id, h.seq
            ));
            break;
        }
        match check.hash_of(h.seq) {
            Some(hash) if hex::encode(hash) == h.hash => {}
            _ => {
                problems.push(format!(
                    "node {node}'s record {} is not the one checkpoint {} saw: the chain was rewritten",
                    h.seq, c.id
                ));
                break;
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunqi_types::AuditEvent;

    fn event(detail: String) -> AuditEvent {
        AuditEvent {
            action: "test.event".into(),
            detail,
            ..Default::default()
        }
    }

    fn chain(n: u64) -> (Vec<u8>, Vec<Hash>) {
        let mut buf = Vec::new();
        let mut prev = [0u8; HASH_BYTES];
        let mut hashes = Vec::new();
        for seq in 1..=n {
            let e = event(format!("record {seq}"));
            prev = format::encode_record(&mut buf, seq, seq as i64, &prev, &e, 4096);
            hashes.push(prev);
        }
        (buf, hashes)
    }

    #[test]
    fn a_good_chain_in_pieces_checks_and_a_changed_byte_is_named() {
        let (buf, hashes) = chain(10);
        let cut = format::read_frame(&buf, 0).unwrap().end;
        let mut c = ChainCheck::new();
        c.want(7);
        c.feed(&buf[..cut], 1, 1);
        c.feed(&buf[cut..], 2, 10);
        assert_eq!(c.problem, None);
        assert_eq!((c.records, c.last_seq, c.last_hash), (10, 10, hashes[9]));
        assert_eq!(c.hash_of(7), Some(hashes[6]));

        let mut bad = buf.clone();
        bad[cut + 30] ^= 1;
        let mut c = ChainCheck::new();
        c.feed(&bad, 1, 10);
        assert_eq!(c.problem.as_ref().map(|p| p.0), Some(2));

        // A missing round.
        let mut c = ChainCheck::new();
        c.feed(&buf[cut..], 2, 10);
        assert!(c.problem.unwrap().1.contains("record 1 is missing"));
    }

    #[test]
    fn checkpoints_chain_and_catch_a_rewritten_or_cut_chain() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let now = chrono::Utc::now();
        let (_, a) = chain(10);
        let head = |node: &str, seq: u64, h: &Hash| NodeHead {
            node: node.into(),
            seq,
            hash: hex::encode(h),
        };
        let c1 = ClusterCheckpoint::make(None, vec![head("a", 4, &a[3])], "a", &key, now);
        // A stale read of a's head does not move it back; b joins.
        let c2 = ClusterCheckpoint::make(
            Some(&c1),
            vec![head("a", 2, &a[1]), head("b", 0, &[0; 32])],
            "b",
            &key,
            now,
        );
        assert_eq!(c2.head("a").unwrap().seq, 4);
        let c3 = ClusterCheckpoint::make(Some(&c2), vec![head("a", 9, &a[8])], "a", &key, now);
        let all = vec![c1.clone(), c2.clone(), c3.clone()];
        assert!(check_checkpoints(&all).is_empty());

        let (buf, _) = chain(10);
        let mut good = ChainCheck::new();
        for c in &all {
            for h in &c.heads {
                good.want(h.seq);
            }
        }
        good.feed(&buf, 1, 10);
        assert!(check_chain_against("a", &good, &all).is_empty());

        // Cut after record 5: checkpoint 3 saw record 9.
        let end5 = (0..5).fold(0, |o, _| format::read_frame(&buf, o).unwrap().end);
        let mut cut_check = ChainCheck::new();
        cut_check.wanted = good.wanted.keys().map(|k| (*k, [0; 32])).collect();
        cut_check.feed(&buf[..end5], 1, 5);
        let p = check_chain_against("a", &cut_check, &all);
        assert!(p[0].contains("was cut"), "{p:?}");

        // A chain rebuilt with other contents (hashes forged throughout) disagrees.
        let mut other = Vec::new();
        let mut prev = [0u8; HASH_BYTES];
        for seq in 1..=10 {
            let e = event(format!("rewritten {seq}"));
            prev = format::encode_record(&mut other, seq, seq as i64, &prev, &e, 4096);
        }
        let mut forged = ChainCheck::new();
        forged.wanted = good.wanted.keys().map(|k| (*k, [0; 32])).collect();
        forged.feed(&other, 1, 10);
        assert_eq!(forged.problem, None);
        assert!(check_chain_against("a", &forged, &all)[0].contains("rewritten"));

        // A removed or altered checkpoint.
        assert!(!check_checkpoints(&[c1.clone(), c3.clone()]).is_empty());
        let mut altered = c2.clone();
        altered.heads[0].seq = 3;
        let p = check_checkpoints(&[c1, altered, c3]);
        assert!(p.iter().any(|p| p.contains("not signed")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("does not chain")), "{p:?}");
    }
}
