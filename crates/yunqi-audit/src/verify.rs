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
    let mut frames = Vec::new();
    for (index, (_, path)) in segments.iter().enumerate() {
        let segment = map_segment(path, threads.max(1))?;
        let buf = &segment[..];
        report.segments += 1;
        report.bytes += buf.len() as u64;
        let is_last_segment = index + 1 == segment_count;
        let problem = |seq: u64, offset: usize, reason: String| Problem {
            seq: Some(seq),
            segment: Some(path.clone()),
            offset: Some(offset as u64),
            reason,
        };
        let first = match format::parse_segment_header(buf) {
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
        frames.clear();
        let walk_error = walk_split(buf, &mut frames, threads.max(1));

        // 2. Checksums and hashes, in parallel.
        let bad = first_bad_frames(buf, &frames, threads.max(1), last_seq + 1, &last_hash);

        // 3. Every frame before the first bad one is good; name the first bad one.
        let good = bad.map_or(frames.len(), |(i, _)| i);
        let stored =
            |f: &FrameRef| -> Hash { buf[f.body.end..f.total_end].try_into().expect("32 bytes") };
        if good > 0 {
            let first_seq = last_seq + 1;
            if let Some((head_seq, _)) = head
                && head_seq >= first_seq
                && head_seq < first_seq + good as u64
            {
                head_hash_seen = Some(stored(&frames[(head_seq - first_seq) as usize]));
            }
            last_seq = first_seq + good as u64 - 1;
            last_hash = stored(&frames[good - 1]);
            report.records += good as u64;
        }
        let acknowledged = |seq: u64| head.is_some_and(|h| h.0 >= seq);
        if let Some((i, kind)) = bad {
            let f = &frames[i];
            let expected = last_seq + 1;
            if is_last_segment && matches!(kind, BadFrame::Checksum) && !acknowledged(expected) {
                // A write torn by a crash before it was acknowledged; the next start zeroes it.
                report.torn_tail = true;
                break;
            }
            let seq = format::body_seq(&buf[f.body.clone()]);
            let (named, reason) = match kind {
                BadFrame::Checksum => (
                    expected,
                    format!("record {expected} is damaged: its checksum does not match its bytes"),
                ),
                BadFrame::Hash => (
                    expected,
                    format!("record {expected} was altered: its contents do not match its hash"),
                ),
                BadFrame::Sequence => (
                    expected,
                    if frames
                        .get(i + 1)
                        .is_some_and(|n| format::body_seq(&buf[n.body.clone()]) == expected)
                    {
                        format!("records {expected} and {seq} are out of order")
                    } else if seq > expected {
                        format!("record {expected} is missing: found record {seq} in its place")
                    } else {
                        format!("record {seq} appears again where record {expected} should be")
                    },
                ),
                BadFrame::Link => (
                    last_seq,
                    format!(
                        "record {last_seq} does not match the hash chained into record {seq}: \
                         one of them was altered and its hash forged"
                    ),
                ),
            };
            report.problem = Some(problem(named, f.offset, reason));
            break;
        }
        if report.problem.is_some() {
            break;
        }
        if let Some((offset, kind)) = walk_error {
            if is_last_segment && !acknowledged(last_seq + 1) {
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
    Sequence,
    Link,
}

/// Walks frames from `offset` by their length fields, appending them to `frames`, until
/// `stop_at` or the end of the frames. Returns where it stopped and why, if not cleanly.
fn walk(
    buf: &[u8],
    mut offset: usize,
    stop_at: usize,
    frames: &mut Vec<FrameRef>,
) -> (usize, Option<(usize, FrameError)>) {
    while offset < buf.len() && offset < stop_at {
        let rest = &buf[offset..];
        if rest.len() < format::FRAME_PREFIX_BYTES {
            return (offset, Some((offset, FrameError::Truncated)));
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            // The end of the frames: only preallocated zeros may follow.
            if !format::all_zero(rest) {
                return (offset, Some((offset, FrameError::BadLength)));
            }
            return (buf.len(), None);
        }
        if !(format::BODY_FIXED_BYTES + 14..=format::BODY_BYTES_MAX).contains(&len) {
            return (offset, Some((offset, FrameError::BadLength)));
        }
        let total = format::FRAME_PREFIX_BYTES + len + HASH_BYTES;
        if rest.len() < total {
            return (offset, Some((offset, FrameError::Truncated)));
        }
        let body_start = offset + format::FRAME_PREFIX_BYTES;
        frames.push(FrameRef {
            offset,
            body: body_start..body_start + len,
            total_end: offset + total,
        });
        offset += total;
    }
    (offset, None)
}

/// Walks a segment's frames, in two halves at once when it is large: a second thread finds
/// the first whole frame (length, checksum, version) after the middle and walks from there.
/// The split is used only if the first walk arrives exactly at that frame, so a false match
/// can cost time but never change the result.
fn walk_split(
    buf: &[u8],
    frames: &mut Vec<FrameRef>,
    threads: usize,
) -> Option<(usize, FrameError)> {
    let start = format::SEGMENT_HEADER_BYTES;
    let middle = buf.len() / 2;
    if threads < 2 || buf.len() < (8 << 20) {
        return walk(buf, start, usize::MAX, frames).1;
    }
    let sync = (middle..(middle + format::BODY_BYTES_MAX + 64).min(buf.len()))
        .find(|&q| format::read_frame(buf, q).is_ok_and(|f| f.body[0] == format::FORMAT_VERSION));
    let Some(sync) = sync else {
        return walk(buf, start, usize::MAX, frames).1;
    };
    let (first, second) = std::thread::scope(|s| {
        let second = s.spawn(|| {
            let mut tail = Vec::new();
            let (_, error) = walk(buf, sync, usize::MAX, &mut tail);
            (tail, error)
        });
        let first = walk(buf, start, sync, frames);
        (first, second.join().expect("walking thread"))
    });
    match first {
        (end, None) if end == sync => {
            let (tail, error) = second;
            frames.extend(tail);
            error
        }
        (_, Some(error)) => Some(error),
        _ => {
            // The walk stepped over the supposed frame: it was not one. Walk the rest alone.
            frames.clear();
            walk(buf, start, usize::MAX, frames).1
        }
    }
}

/// Maps a segment read-only and fills its page tables on `threads` threads at once (one
/// thread faulting in 128 MiB is a good part of the work of verifying it). Mapping instead of
/// reading saves copying every byte out of the page cache.
#[allow(unsafe_code)]
fn map_segment(path: &Path, threads: usize) -> Result<memmap2::Mmap, Error> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Err(Error::internal(format!(
            "segment {} is empty",
            path.display()
        )));
    }
    // SAFETY: the map is only read. Segments are append-only: a running yunqi only appends,
    // which does not change mapped bytes, and zeroes or trims only while it holds the data
    // directory lock at start-up, before it serves. A file truncated under the map by anything
    // else would end verification with SIGBUS rather than a wrong answer.
    let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
    const PAGE: usize = 4096;
    let chunk = len.div_ceil(threads.max(1)).div_ceil(PAGE) * PAGE;
    std::thread::scope(|s| {
        for start in (0..len).step_by(chunk.max(PAGE)) {
            let map = &map;
            s.spawn(move || {
                // Best effort: older kernels lack MADV_POPULATE_READ and fault lazily instead.
                let _ =
                    map.advise_range(memmap2::Advice::PopulateRead, start, chunk.min(len - start));
            });
        }
    });
    Ok(map)
}

/// Indexes of frames whose hash or CRC is wrong (only the first per thread matters, as the
/// sequential pass stops at the first problem). The SHA-256 covers every byte the CRC does but
/// the stored hash, so the CRC is computed only to tell a damaged frame (bad CRC: torn or
/// flipped) from an altered one (good CRC, bad hash: rewritten with a recomputed checksum).
fn first_bad_frames(
    buf: &[u8],
    frames: &[FrameRef],
    threads: usize,
    first_seq: u64,
    prev_hash: &Hash,
) -> Option<(usize, BadFrame)> {
    let stored = |i: usize| &buf[frames[i].body.end..frames[i].total_end];
    let check = |range: std::ops::Range<usize>| -> Option<(usize, BadFrame)> {
        for i in range {
            let f = &frames[i];
            let body = &buf[f.body.clone()];
            let hash = Sha256::digest(body);
            let crc =
                u32::from_le_bytes(buf[f.offset + 4..f.offset + 8].try_into().expect("4 bytes"));
            if crc32c::crc32c(&buf[f.body.start..f.total_end]) != crc {
                return Some((i, BadFrame::Checksum));
            }
            if hash.as_slice() != stored(i) {
                return Some((i, BadFrame::Hash));
            }
            if format::body_seq(body) != first_seq + i as u64 {
                return Some((i, BadFrame::Sequence));
            }
            let prev: &[u8] = if i == 0 { prev_hash } else { stored(i - 1) };
            if format::body_prev(body) != prev {
                return Some((i, BadFrame::Link));
            }
        }
        None
    };
    if threads == 1 || frames.len() < 4096 {
        return check(0..frames.len());
    }
    let chunk = frames.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..frames.len())
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(frames.len());
                s.spawn(move || check(start..end))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("hashing thread"))
            .min_by_key(|(i, _)| *i)
    })
}
