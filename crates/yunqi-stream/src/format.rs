//! The persisted format of the stream log (version 1). Changing it means a new version number and
//! a reader for the old one.
//!
//! A log is a root directory holding one directory per stream, named by the stream's key
//! (`traffic.detections/`). A stream directory holds segment files named by the offset of their
//! first event, zero-padded to 20 digits (`00000000000000000000.seg`), and a `consumers/`
//! directory of committed offsets. Offsets count events, not entries: an entry of `count` events
//! appended when the stream ends at `E` covers the offsets `[E, E + count)`.
//!
//! Segment header, 40 bytes: magic `YQSTMSEG`, format version `u32`, `u32` zero, the first offset
//! `u64`, the append time of the previous segment's last entry `i64` (microseconds since the Unix
//! epoch; 0 for a stream's first segment: it lets retention by age judge a closed segment
//! without reading it), `u32` zero, CRC-32C of the preceding 36 bytes. Integers little-endian.
//!
//! Then frames, one per entry, each starting at a multiple of 8 bytes:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | payload length `u32` |
//! | 4..8 | event count `u32`, never 0 |
//! | 8..16 | first offset `u64` |
//! | 16..24 | append time `i64`, microseconds since the Unix epoch, never decreasing |
//! | 24..28 | round delta `u32`: events of the same stream written before this entry in the same group commit (saturating) |
//! | 28..32 | CRC-32C of the payload |
//! | 32..36 | `u32` zero |
//! | 36..40 | CRC-32C of bytes 0..36 (the header fields and, through its CRC, the payload) |
//! | 40.. | payload, then zero padding to a multiple of 8 |
//!
//! The header has a CRC of its own so that a reader can find the next whole frame after a damaged
//! one by checking 8-aligned candidates cheaply. The round delta tells recovery whether a damaged
//! frame was acknowledged: a valid frame of a later group commit after it proves that the
//! damaged frame's commit completed its fsync (see [`scan`]).
//!
//! A segment is grown ahead of its frames with zeros, so that an fsync overwrites allocated blocks
//! instead of journaling a new file size; only zeros may follow the last frame. A segment is
//! trimmed to its last frame when the next one is started.
//!
//! A committed offset is a file `consumers/<consumer>.offset`, 32 bytes: magic `YQSTMOFF`, format
//! version `u32`, `u32` zero, the offset `u64`, `u32` zero, CRC-32C of the preceding 28 bytes. It
//! is replaced by writing a temporary file (`.<consumer>.offset.tmp<n>`, removed at open if a
//! crash left it), fsyncing it, renaming it over the old one and fsyncing the directory.

use std::fmt;

/// Version of the segment, frame and offset file formats.
pub const FORMAT_VERSION: u32 = 1;
/// Segment file magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"YQSTMSEG";
/// Segment header length.
pub const SEGMENT_HEADER_BYTES: usize = 40;
/// Frame header length (the payload follows).
pub const FRAME_HEADER_BYTES: usize = 40;
/// Frames start at multiples of this.
pub const FRAME_ALIGN_BYTES: usize = 8;
/// Committed offset file magic.
pub const OFFSET_MAGIC: &[u8; 8] = b"YQSTMOFF";
/// Committed offset file length.
pub const OFFSET_FILE_BYTES: usize = 32;

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Offset of the first event in the segment.
    pub first: u64,
    /// Append time of the last entry of the previous segment (0 when there was none).
    pub prev_last_appended_at_us: i64,
}

/// Encodes a segment header.
pub fn encode_segment_header(h: &SegmentHeader) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut b = [0u8; SEGMENT_HEADER_BYTES];
    b[0..8].copy_from_slice(SEGMENT_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&h.first.to_le_bytes());
    b[24..32].copy_from_slice(&h.prev_last_appended_at_us.to_le_bytes());
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a segment header.
pub fn decode_segment_header(b: &[u8]) -> Result<SegmentHeader, String> {
    if b.len() < SEGMENT_HEADER_BYTES {
        return Err(format!(
            "the segment header is truncated ({} of {SEGMENT_HEADER_BYTES} bytes)",
            b.len()
        ));
    }
    if &b[0..8] != SEGMENT_MAGIC {
        return Err("the segment header has the wrong magic bytes".into());
    }
    if u32_at(b, 36) != crc32c::crc32c(&b[..36]) {
        return Err("the segment header checksum does not match".into());
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(format!("segment format version {version} is not supported"));
    }
    Ok(SegmentHeader {
        first: u64_at(b, 16),
        prev_last_appended_at_us: u64_at(b, 24) as i64,
    })
}

/// The file name of the segment whose first offset is `first`.
pub fn segment_file_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// The first offset named by a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Bytes a frame takes in a segment, padding included.
pub fn frame_bytes(payload_len: usize) -> usize {
    FRAME_HEADER_BYTES + payload_len.next_multiple_of(FRAME_ALIGN_BYTES)
}

/// Appends one frame to `out`, which must end at a multiple of 8 bytes.
pub fn encode_frame(
    out: &mut Vec<u8>,
    first: u64,
    count: u32,
    round_delta: u32,
    appended_at_us: i64,
    payload: &[u8],
) {
    debug_assert!(out.len().is_multiple_of(FRAME_ALIGN_BYTES));
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&count.to_le_bytes());
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..24].copy_from_slice(&appended_at_us.to_le_bytes());
    h[24..28].copy_from_slice(&round_delta.to_le_bytes());
    h[28..32].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let padding = payload.len().next_multiple_of(FRAME_ALIGN_BYTES) - payload.len();
    out.extend_from_slice(&[0u8; FRAME_ALIGN_BYTES][..padding]);
}

/// A frame header whose own checksum matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length.
    pub payload_len: u32,
    /// Events in the entry.
    pub count: u32,
    /// Offset of the first event.
    pub first: u64,
    /// Append time, microseconds since the Unix epoch.
    pub appended_at_us: i64,
    /// Events of the same stream written earlier in the same group commit.
    pub round_delta: u32,
    /// CRC-32C of the payload.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// The offset just past the entry.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }
    /// Bytes the frame takes, padding included.
    pub fn frame_bytes(&self) -> usize {
        frame_bytes(self.payload_len as usize)
    }
    /// The first offset written by this entry's group commit to its stream (a lower bound when
    /// the delta saturated).
    pub fn round_first(&self) -> u64 {
        self.first.saturating_sub(u64::from(self.round_delta))
    }
}

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes remain than the frame header or the frame needs.
    Truncated,
    /// The header checksum does not match, or a field is impossible.
    BadHeader,
    /// The payload checksum does not match.
    BadPayload,
    /// A whole frame, but not the entry expected at this place (wrong first offset).
    Misplaced,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::Truncated => "the frame is cut short",
            FrameError::BadHeader => "the frame header fails its checksum",
            FrameError::BadPayload => "the entry's payload fails its checksum",
            FrameError::Misplaced => "the frame holds a different offset than expected here",
        })
    }
}

/// Decodes the frame header at the start of `b`, checking its checksum (not the payload's).
pub fn decode_frame_header(b: &[u8]) -> Result<FrameHeader, FrameError> {
    if b.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated);
    }
    if u32_at(b, 36) != crc32c::crc32c(&b[..36]) || u32_at(b, 32) != 0 || u32_at(b, 4) == 0 {
        return Err(FrameError::BadHeader);
    }
    Ok(FrameHeader {
        payload_len: u32_at(b, 0),
        count: u32_at(b, 4),
        first: u64_at(b, 8),
        appended_at_us: u64_at(b, 16) as i64,
        round_delta: u32_at(b, 24),
        payload_crc: u32_at(b, 28),
    })
}

/// Decodes and fully checks the frame at the start of `b`; returns its header and payload.
pub fn decode_frame(b: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    let h = decode_frame_header(b)?;
    if b.len() < h.frame_bytes() {
        return Err(FrameError::Truncated);
    }
    let payload = &b[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + h.payload_len as usize];
    if crc32c::crc32c(payload) != h.payload_crc {
        return Err(FrameError::BadPayload);
    }
    Ok((h, payload))
}

/// A point of a segment's sparse index: the entry starting at `offset` starts at byte `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexPoint {
    /// First offset of the entry.
    pub offset: u64,
    /// Byte position of its frame in the segment file.
    pub pos: u64,
}

/// A damaged place found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Damage {
    /// Byte position where the frames stop making sense.
    pub pos: u64,
    /// The offset expected there.
    pub offset: u64,
    /// What is wrong.
    pub error: FrameError,
    /// The next whole frame after it (byte position, first offset), if any.
    pub resumed: Option<IndexPoint>,
    /// Whether a frame of a later group commit follows: the damaged frames were then made
    /// durable (and acknowledged) before, so this is corruption, not a torn write.
    pub proven: bool,
}

/// What [`scan`] found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Sparse index: the first frame, every frame at least `index_interval_bytes` after the last
    /// point, and every frame found after damage.
    pub points: Vec<IndexPoint>,
    /// End of the last whole frame.
    pub end_pos: u64,
    /// Offset just past the last whole frame's entry.
    pub end_offset: u64,
    /// Append time of the last whole frame.
    pub last_appended_at_us: Option<i64>,
    /// Damaged places, in order.
    pub damage: Vec<Damage>,
}

/// Scans the frames of a whole segment file (`buf`, header included, whose first offset is
/// `first`). Stops at the end of the buffer or where only zeros follow. At a frame that is not
/// whole, or not the entry expected, it records [`Damage`] and looks for the next whole frame
/// (8-aligned, header checksum, then payload checksum, first offset at or past the one
/// expected), and goes on from there.
///
/// A damaged place is `proven` when a whole frame after it was written by a later group commit
/// than every damaged frame could have been (its `round_first` is at or past the first offset of
/// the frame found after the damage): the committer writes a commit only after the previous
/// one's fsync returned, so the damaged frames were durable and acknowledged. An unproven place
/// at the end of the active segment is a write torn by a crash, never acknowledged.
pub fn scan(buf: &[u8], first: u64, index_interval_bytes: u64) -> Scan {
    let mut out = Scan {
        points: Vec::new(),
        end_pos: SEGMENT_HEADER_BYTES as u64,
        end_offset: first,
        last_appended_at_us: None,
        damage: Vec::new(),
    };
    let mut pos = SEGMENT_HEADER_BYTES;
    let mut expected = first;
    let mut last_point: Option<usize> = None;
    let mut force_point = true;
    while pos < buf.len() {
        match check_frame(&buf[pos..], expected) {
            Ok(h) => {
                if force_point
                    || last_point.is_none_or(|p| (pos - p) as u64 >= index_interval_bytes)
                {
                    out.points.push(IndexPoint {
                        offset: h.first,
                        pos: pos as u64,
                    });
                    last_point = Some(pos);
                    force_point = false;
                }
                for d in out.damage.iter_mut().filter(|d| !d.proven) {
                    if d.resumed.is_some_and(|r| h.round_first() >= r.offset) {
                        d.proven = true;
                    }
                }
                expected = h.end();
                pos += h.frame_bytes();
                out.end_pos = pos as u64;
                out.end_offset = expected;
                out.last_appended_at_us = Some(h.appended_at_us);
            }
            Err(error) => {
                if all_zero(&buf[pos..]) {
                    break;
                }
                let resumed = resync(buf, pos + FRAME_ALIGN_BYTES, expected);
                out.damage.push(Damage {
                    pos: pos as u64,
                    offset: expected,
                    error,
                    resumed,
                    proven: false,
                });
                let Some(r) = resumed else { break };
                pos = r.pos as usize;
                expected = r.offset;
                force_point = true;
            }
        }
    }
    out
}

/// Checks the whole frame at the start of `b` and that it holds the entry starting at `expected`.
fn check_frame(b: &[u8], expected: u64) -> Result<FrameHeader, FrameError> {
    let (h, _) = decode_frame(b)?;
    if h.first != expected {
        return Err(FrameError::Misplaced);
    }
    Ok(h)
}

/// The next whole frame at or after `from` (rounded up to the frame alignment) whose first offset
/// is at least `expected`.
fn resync(buf: &[u8], from: usize, expected: u64) -> Option<IndexPoint> {
    let mut pos = from.next_multiple_of(FRAME_ALIGN_BYTES);
    while pos + FRAME_HEADER_BYTES <= buf.len() {
        if let Ok(h) = decode_frame_header(&buf[pos..])
            && h.first >= expected
            && decode_frame(&buf[pos..]).is_ok()
        {
            return Some(IndexPoint {
                offset: h.first,
                pos: pos as u64,
            });
        }
        pos += FRAME_ALIGN_BYTES;
    }
    None
}

/// Whether every byte is zero (preallocated, never written).
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// Encodes a committed offset file.
pub fn encode_offset_file(offset: u64) -> [u8; OFFSET_FILE_BYTES] {
    let mut b = [0u8; OFFSET_FILE_BYTES];
    b[0..8].copy_from_slice(OFFSET_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a committed offset file.
pub fn decode_offset_file(b: &[u8]) -> Result<u64, String> {
    if b.len() != OFFSET_FILE_BYTES || &b[0..8] != OFFSET_MAGIC {
        return Err("the committed offset file is malformed".into());
    }
    if u32_at(b, 28) != crc32c::crc32c(&b[..28]) {
        return Err("the committed offset file checksum does not match".into());
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "offset file format version {version} is not supported"
        ));
    }
    Ok(u64_at(b, 16))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(frames: &[(u64, u32, u32, &[u8])]) -> Vec<u8> {
        let mut b = encode_segment_header(&SegmentHeader {
            first: frames.first().map_or(0, |f| f.0),
            prev_last_appended_at_us: 0,
        })
        .to_vec();
        for (first, count, delta, payload) in frames {
            encode_frame(&mut b, *first, *count, *delta, 7, payload);
        }
        b
    }

    #[test]
    fn frames_round_trip_and_scan_to_the_end() {
        let mut b = segment(&[(0, 3, 0, b"abc"), (3, 1, 0, b""), (4, 9, 0, b"0123456789")]);
        b.extend_from_slice(&[0u8; 100]);
        let s = scan(&b, 0, 1);
        assert!(s.damage.is_empty());
        assert_eq!(s.end_offset, 13);
        assert_eq!(s.end_pos as usize, b.len() - 100);
        assert_eq!(s.points.len(), 3);
        let (h, p) = decode_frame(&b[s.points[2].pos as usize..]).unwrap();
        assert_eq!((h.first, h.count, p), (4, 9, &b"0123456789"[..]));
    }

    #[test]
    fn damage_followed_by_a_later_commit_is_proven() {
        // Three commits of one entry each; the middle one damaged.
        let mut b = segment(&[(0, 1, 0, b"aaaa"), (1, 1, 0, b"bbbb"), (2, 1, 0, b"cccc")]);
        let second = SEGMENT_HEADER_BYTES + frame_bytes(4);
        b[second + FRAME_HEADER_BYTES + 1] ^= 0x40;
        let s = scan(&b, 0, 1 << 20);
        assert_eq!(s.damage.len(), 1);
        let d = s.damage[0];
        assert_eq!(
            (d.pos as usize, d.offset, d.error),
            (second, 1, FrameError::BadPayload)
        );
        assert_eq!(d.resumed.map(|r| r.offset), Some(2));
        assert!(d.proven);
        assert_eq!(s.end_offset, 3);
    }

    #[test]
    fn damage_followed_only_by_its_own_commit_is_not_proven() {
        // One commit of three entries (deltas 0, 1, 2); the middle one damaged.
        let mut b = segment(&[(0, 1, 0, b"aaaa"), (1, 1, 1, b"bbbb"), (2, 1, 2, b"cccc")]);
        let second = SEGMENT_HEADER_BYTES + frame_bytes(4);
        b[second + 2] ^= 1;
        let s = scan(&b, 0, 1 << 20);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].error, FrameError::BadHeader);
        assert!(!s.damage[0].proven);
    }

    #[test]
    fn headers_and_offset_files_reject_damage() {
        let h = SegmentHeader {
            first: 42,
            prev_last_appended_at_us: -5,
        };
        let mut b = encode_segment_header(&h);
        assert_eq!(decode_segment_header(&b), Ok(h));
        b[17] ^= 1;
        assert!(decode_segment_header(&b).is_err());
        let mut o = encode_offset_file(99);
        assert_eq!(decode_offset_file(&o), Ok(99));
        o[16] ^= 1;
        assert!(decode_offset_file(&o).is_err());
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.seg"), None);
    }
}
