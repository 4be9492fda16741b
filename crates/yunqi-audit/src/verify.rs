//! Checks a whole chain offline and names the first bad record.
//!
//! Per record it checks: the frame (length and CRC-32C: any flipped byte), the sequence number
//! (removed or reordered records), the stored hash against the SHA-256 of the body (an altered
//! record whose checksum was recomputed), and the link to the previous record (an altered record
//! whose hash was forged too). At the end it checks the head: a chain shorter than its head was
//! cut. Hashing runs on all cores; the other checks are a sequential pass over fixed offsets.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use yunqi_types::Error;

use crate::chain::{list_segments, read_head};
use crate::format::{self, FrameError, HASH_BYTES, Hash};

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Sequence number of the first bad (or missing) record; `None` when the problem is not a
    /// record's (a missing head file).
    pub seq: Option<u64>,
    /// The segment file it was found in.
    pub segment: Option<PathBuf>,
    /// Byte offset in that file.
    pub offset: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Records checked and found good.
    pub records: u64,
    /// Segment files read.
    pub segments: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Sequence number of the last good record.
    pub last_seq: u64,
    /// Hash of the last good record, hex.
    pub last_hash: String,
    /// What the head file says: sequence number.
    pub head_seq: Option<u64>,
    /// The first problem, if any.
    pub problem: Option<Problem>,
    /// A torn write after the head: a crash in the middle of an unacknowledged append. Not
    /// damage; the next start cuts it off.
    pub torn_tail: bool,
}

impl VerifyReport {
    /// Whether the chain is whole.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

struct FrameRef {
    offset: usize,
    body: std::ops::Range<usize>,
    total_end: usize,
}

/// Verifies the chain in `dir` using `threads` threads for hashing.
pub fn verify(dir: &Path, threads: usize) -> Result<VerifyReport, Error> {
    if !dir.is_dir() {
        return Err(
            Error::not_found("audit directory", &dir.display().to_string())
                .hint("pass the data directory of a yunqi server with --data DIR"),
        );
    }
    let head = read_head(dir);
    let segments = list_segments(dir)?;
    let mut report = VerifyReport {
        records: 0,
        segments: 0,
        bytes: 0,
        last_seq: 0,
        last_hash: hex::encode([0u8; HASH_BYTES]),
        head_seq: None,
        problem: None,
        torn_tail: false,
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            report.problem = Some(Problem {
                seq: None,
                segment: None,
                offset: None,
                reason: format!("{}: {}", e.message, e.detail.unwrap_or_default()),
            });
            return Ok(report);
        }
    };
    report.head_seq = head.map(|h| h.0);
    let mut last_seq = 0u64;
    let mut last_hash: Hash = [0; HASH_BYTES];
    let mut head_hash_seen: Option<Hash> = None;
    let segment_count = segments.len();
    for (index, (_, path)) in segments.iter().enumerate() {
        let buf = std::fs::read(path)?;
        report.segments += 1;
        report.bytes += buf.len() as u64;
        let is_last_segment = index + 1 == segment_count;
        let problem = |seq: u64, offset: usize, reason: String| Problem {
            seq: Some(seq),
            segment: Some(path.clone()),
            offset: Some(offset as u64),
            reason,
        };
        let first = match format::parse_segment_header(&buf) {
            Ok(f) => f,
            Err(e) => {
                report.problem = Some(problem(last_seq + 1, 0, format!("segment header: {e}")));
                break;
            }
        };
        if first != last_seq + 1 {
            report.problem = Some(problem(
                last_seq + 1,
                0,
                if first > last_seq + 1 {
                    format!(
                        "record {} is missing: the next segment starts at record {first}",
                        last_seq + 1
                    )
                } else {
                    format!("segment starts at record {first}, which came before")
                },
            ));
            break;
        }

        // 1. Walk the frames by their length fields.
        let mut frames = Vec::new();
        let mut offset = format::SEGMENT_HEADER_BYTES;
        let mut walk_error = None;
        while offset < buf.len() {
            let rest = &buf[offset..];
            if rest.len() < format::FRAME_PREFIX_BYTES {
                walk_error = Some((offset, FrameError::Truncated));
                break;
            }
            let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            if !(format::BODY_FIXED_BYTES + 14..=format::BODY_BYTES_MAX).contains(&len) {
                walk_error = Some((offset, FrameError::BadLength));
                break;
            }
            let total = format::FRAME_PREFIX_BYTES + len + HASH_BYTES;
            if rest.len() < total {
                walk_error = Some((offset, FrameError::Truncated));
                break;
            }
            let body_start = offset + format::FRAME_PREFIX_BYTES;
            frames.push(FrameRef {
                offset,
                body: body_start..body_start + len,
                total_end: offset + total,
            });
            offset += total;
        }

        // 2. Checksums and hashes, in parallel.
        let bad = first_bad_frames(&buf, &frames, threads.max(1));

        // 3. Sequence numbers and links, in order.
        let mut i = 0;
        while i < frames.len() {
            let f = &frames[i];
            let expected = last_seq + 1;
            if let Some(kind) = bad.get(&i) {
                let reason = match kind {
                    BadFrame::Checksum => format!(
                        "record {expected} is damaged: its checksum does not match its bytes"
                    ),
                    BadFrame::Hash => {
                        format!("record {expected} was altered: its contents do not match its hash")
                    }
                };
                report.problem = Some(problem(expected, f.offset, reason));
                break;
            }
            let body = &buf[f.body.clone()];
            let seq = format::body_seq(body);
            if seq != expected {
                let reason = if frames
                    .get(i + 1)
                    .is_some_and(|n| format::body_seq(&buf[n.body.clone()]) == expected)
                {
                    format!("records {expected} and {seq} are out of order")
                } else if seq > expected {
                    format!("record {expected} is missing: found record {seq} in its place")
                } else {
                    format!("record {seq} appears again where record {expected} should be")
                };
                report.problem = Some(problem(expected, f.offset, reason));
                break;
            }
            if format::body_prev(body) != last_hash {
                report.problem = Some(problem(
                    last_seq,
                    f.offset,
                    format!(
                        "record {last_seq} does not match the hash chained into record {seq}: \
                         one of them was altered and its hash forged"
                    ),
                ));
                break;
            }
            last_seq = seq;
            last_hash = buf[f.body.end..f.total_end].try_into().expect("32 bytes");
            if head.is_some_and(|h| h.0 == seq) {
                head_hash_seen = Some(last_hash);
            }
            report.records += 1;
            i += 1;
        }
        if report.problem.is_some() {
            break;
        }
        if let Some((offset, kind)) = walk_error {
            let acknowledged = head.is_some_and(|h| h.0 > last_seq);
            if is_last_segment && !acknowledged && kind == FrameError::Truncated {
                report.torn_tail = true;
            } else {
                report.problem = Some(problem(
                    last_seq + 1,
                    offset,
                    match kind {
                        FrameError::Truncated => format!("record {} is truncated", last_seq + 1),
                        _ => format!(
                            "record {} is damaged: its length field is impossible",
                            last_seq + 1
                        ),
                    },
                ));
                break;
            }
        }
    }
    report.last_seq = last_seq;
    report.last_hash = hex::encode(last_hash);
    if report.problem.is_none() {
        match head {
            None if last_seq > 0 => {
                report.problem = Some(Problem {
                    seq: None,
                    segment: None,
                    offset: None,
                    reason: "the head file is missing: whether records were cut from the end cannot be checked".into(),
                });
            }
            Some((head_seq, _)) if head_seq > last_seq => {
                report.problem = Some(Problem {
                    seq: Some(last_seq + 1),
                    segment: None,
                    offset: None,
                    reason: format!(
                        "records {} to {head_seq} are missing: the chain was cut after record {last_seq}",
                        last_seq + 1
                    ),
                });
            }
            Some((head_seq, head_hash)) if head_seq > 0 && head_hash_seen != Some(head_hash) => {
                report.problem = Some(Problem {
                    seq: Some(head_seq),
                    segment: None,
                    offset: None,
                    reason: format!(
                        "record {head_seq} does not match the hash recorded in the head"
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(report)
}

#[derive(Debug, Clone, Copy)]
enum BadFrame {
    Checksum,
    Hash,
}

/// Indexes of frames whose CRC or hash is wrong (only the first per thread matters, as the
/// sequential pass stops at the first problem).
fn first_bad_frames(
    buf: &[u8],
    frames: &[FrameRef],
    threads: usize,
) -> std::collections::HashMap<usize, BadFrame> {
    let check = |range: std::ops::Range<usize>| -> Option<(usize, BadFrame)> {
        for i in range {
            let f = &frames[i];
            let covered = &buf[f.body.start..f.total_end];
            let crc =
                u32::from_le_bytes(buf[f.offset + 4..f.offset + 8].try_into().expect("4 bytes"));
            if crc32c::crc32c(covered) != crc {
                return Some((i, BadFrame::Checksum));
            }
            let hash = Sha256::digest(&buf[f.body.clone()]);
            if hash.as_slice() != &buf[f.body.end..f.total_end] {
                return Some((i, BadFrame::Hash));
            }
        }
        None
    };
    let chunk = frames.len().div_ceil(threads).max(1);
    let mut out = std::collections::HashMap::new();
    if threads == 1 || frames.len() < 4096 {
        out.extend(check(0..frames.len()));
        return out;
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..frames.len())
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(frames.len());
                s.spawn(move || check(start..end))
            })
            .collect();
        for h in handles {
            out.extend(h.join().expect("hashing thread"));
        }
    });
    out
}
