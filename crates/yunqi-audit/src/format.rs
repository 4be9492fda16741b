//! The persisted format of the audit chain (version 1). Changing it means a new version number
//! and a reader for the old one.
//!
//! A chain is a directory of segment files named by the sequence number of their first record
//! (`00000000000000000001.seg`), and a `head` file.
//!
//! Segment header, 32 bytes: magic `YQAUDSEG`, format version `u32`, `u32` zero, first sequence
//! number `u64`, `u32` zero, CRC-32C of the preceding 28 bytes. All integers little-endian.
//!
//! Then frames, one per record: body length `u32`, CRC-32C of body and hash `u32`, the body, and
//! the record's hash (32 bytes, SHA-256 of the body). A segment is grown ahead of its frames in
//! zero-filled steps, so that an fsync overwrites allocated blocks instead of journaling a new
//! file size; a body length of 0 marks the end of the frames, and only zeros may follow it.
//! A closed segment is trimmed to its last frame. The body: format version `u8`, sequence
//! number `u64`, time in microseconds since the Unix epoch `i64`, outcome `u8`, the previous
//! record's hash (32 bytes; zeros for record 1), then principal, department, action, object,
//! purpose, detail and request id, each a `u16` length and UTF-8 bytes.
//!
//! The head file, 64 bytes, rewritten in place after every group commit: magic `YQAUDHED`,
//! sequence number `u64` and hash (32 bytes) of the last durable record, CRC-32C of those 48
//! bytes, zero padding. The head anchors the end of the chain: a chain that ends before its
//! head was cut.

use sha2::{Digest, Sha256};
use yunqi_types::{AuditEvent, Outcome};

/// Version of the segment and record format.
pub const FORMAT_VERSION: u8 = 1;
/// Segment file magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"YQAUDSEG";
/// Head file magic.
pub const HEAD_MAGIC: &[u8; 8] = b"YQAUDHED";
/// Segment header length.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Head file length.
pub const HEAD_BYTES: usize = 64;
/// Frame overhead before the body: length and CRC.
pub const FRAME_PREFIX_BYTES: usize = 8;
/// Hash length.
pub const HASH_BYTES: usize = 32;
/// Offset of the sequence number in the body.
const BODY_SEQ_OFFSET: usize = 1;
/// Offset of the previous hash in the body.
const BODY_PREV_OFFSET: usize = 1 + 8 + 8 + 1;
/// Length of the fixed part of the body.
pub const BODY_FIXED_BYTES: usize = BODY_PREV_OFFSET + HASH_BYTES;
/// Largest body accepted when reading (7 fields of at most `u16::MAX` bytes).
pub const BODY_BYTES_MAX: usize = BODY_FIXED_BYTES + 7 * (2 + u16::MAX as usize);

/// A SHA-256 hash.
pub type Hash = [u8; HASH_BYTES];

/// A record as stored, decoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// When it was appended (UTC); never earlier than the record before.
    pub time: chrono::DateTime<chrono::Utc>,
    /// Acting principal ("" if none could be established).
    pub principal: String,
    /// Acting principal's department ("" for none).
    pub department: String,
    /// Action, `kind.verb`.
    pub action: String,
    /// Object, `kind:name`.
    pub object: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Purpose of the access, if any.
    pub purpose: String,
    /// Explanation.
    pub detail: String,
    /// Request id.
    pub request_id: String,
    /// Hash of the previous record, hex.
    #[serde(serialize_with = "hex_hash")]
    pub prev_hash: Hash,
    /// Hash of this record, hex.
    #[serde(serialize_with = "hex_hash")]
    pub hash: Hash,
    /// In a cluster, the node whose chain holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn hex_hash<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

/// Encodes a segment header.
pub fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&u32::from(FORMAT_VERSION).to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header; returns the first sequence number.
pub fn parse_segment_header(h: &[u8]) -> Result<u64, String> {
    if h.len() < SEGMENT_HEADER_BYTES {
        return Err("segment header is truncated".into());
    }
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("segment header has the wrong magic bytes".into());
    }
    let crc = u32::from_le_bytes(h[28..32].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&h[..28]) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != u32::from(FORMAT_VERSION) {
        return Err(format!("segment format version {version} is not supported"));
    }
    Ok(u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")))
}

/// Appends one framed record to `out` and returns its hash.
pub fn encode_record(
    out: &mut Vec<u8>,
    seq: u64,
    time_us: i64,
    prev: &Hash,
    event: &AuditEvent,
    field_bytes_max: usize,
) -> Hash {
    let frame_start = out.len();
    out.extend_from_slice(&[0u8; FRAME_PREFIX_BYTES]);
    let body_start = out.len();
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_us.to_le_bytes());
    out.push(event.outcome.unwrap_or(Outcome::Ok).to_byte());
    out.extend_from_slice(prev);
    let limit = field_bytes_max.min(u16::MAX as usize);
    for field in [
        &event.principal,
        &event.department,
        &event.action,
        &event.object,
        &event.purpose,
        &event.detail,
        &event.request_id,
    ] {
        let s = truncate_at_char(field, limit);
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let hash: Hash = Sha256::digest(&out[body_start..]).into();
    out.extend_from_slice(&hash);
    let body_len = (out.len() - body_start - HASH_BYTES) as u32;
    let crc = crc32c::crc32c(&out[body_start..]);
    out[frame_start..frame_start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[frame_start + 4..frame_start + 8].copy_from_slice(&crc.to_le_bytes());
    hash
}

fn truncate_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One frame located in a buffer, not yet checked beyond its length and CRC.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The body (hashed bytes).
    pub body: &'a [u8],
    /// The stored hash.
    pub stored_hash: &'a [u8],
    /// Offset of the frame in the buffer.
    pub offset: usize,
    /// Offset just past the frame.
    pub end: usize,
}

/// Why a frame could not be read at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is 0: the end of the frames (preallocated space follows).
    End,
    /// Fewer bytes remain than the frame needs: a torn write at the tail, or a cut.
    Truncated,
    /// The length field is impossible.
    BadLength,
    /// The checksum does not match: the bytes were changed or torn.
    BadChecksum,
}

/// Reads the frame at `offset` of `buf`.
pub fn read_frame(buf: &[u8], offset: usize) -> Result<Frame<'_>, FrameError> {
    let rest = &buf[offset..];
    if rest.len() < FRAME_PREFIX_BYTES {
        return Err(FrameError::Truncated);
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(FrameError::End);
    }
    if !(BODY_FIXED_BYTES + 14..=BODY_BYTES_MAX).contains(&len) {
        return Err(FrameError::BadLength);
    }
    let total = FRAME_PREFIX_BYTES + len + HASH_BYTES;
    if rest.len() < total {
        return Err(FrameError::Truncated);
    }
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let covered = &rest[FRAME_PREFIX_BYTES..total];
    if crc32c::crc32c(covered) != crc {
        return Err(FrameError::BadChecksum);
    }
    Ok(Frame {
        body: &covered[..len],
        stored_hash: &covered[len..],
        offset,
        end: offset + total,
    })
}

/// Whether every byte is zero (preallocated, never written).
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// The sequence number of a body (the body is at least `BODY_FIXED_BYTES` long).
pub fn body_seq(body: &[u8]) -> u64 {
    u64::from_le_bytes(
        body[BODY_SEQ_OFFSET..BODY_SEQ_OFFSET + 8]
            .try_into()
            .expect("8 bytes"),
    )
}

/// The previous-hash field of a body.
pub fn body_prev(body: &[u8]) -> &[u8] {
    &body[BODY_PREV_OFFSET..BODY_PREV_OFFSET + HASH_BYTES]
}

/// Decodes a frame into a record. Fails on an unknown version or malformed fields.
pub fn decode_record(frame: &Frame<'_>) -> Result<AuditRecord, String> {
    let b = frame.body;
    if b[0] != FORMAT_VERSION {
        return Err(format!("record format version {} is not supported", b[0]));
    }
    let seq = body_seq(b);
    let time_us = i64::from_le_bytes(b[9..17].try_into().expect("8 bytes"));
    let outcome = Outcome::from_byte(b[17]).ok_or("unknown outcome byte")?;
    let prev_hash: Hash = body_prev(b).try_into().expect("32 bytes");
    let mut pos = BODY_FIXED_BYTES;
    let mut fields: [String; 7] = Default::default();
    for f in fields.iter_mut() {
        if pos + 2 > b.len() {
            return Err("record fields are truncated".into());
        }
        let n = u16::from_le_bytes([b[pos], b[pos + 1]]) as usize;
        pos += 2;
        let bytes = b
            .get(pos..pos + n)
            .ok_or("record field overruns the body")?;
        *f = std::str::from_utf8(bytes)
            .map_err(|_| "record field is not UTF-8")?
            .to_string();
        pos += n;
    }
    if pos != b.len() {
        return Err("record has trailing bytes".into());
    }
    let [
        principal,
        department,
        action,
        object,
        purpose,
        detail,
        request_id,
    ] = fields;
    Ok(AuditRecord {
        seq,
        time: chrono::DateTime::from_timestamp_micros(time_us).ok_or("time out of range")?,
        principal,
        department,
        action,
        object,
        outcome,
        purpose,
        detail,
        request_id,
        prev_hash,
        hash: frame.stored_hash.try_into().expect("32 bytes"),
        node: None,
    })
}

/// Encodes the head file.
pub fn encode_head(seq: u64, hash: &Hash) -> [u8; HEAD_BYTES] {
    let mut h = [0u8; HEAD_BYTES];
    h[0..8].copy_from_slice(HEAD_MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..48].copy_from_slice(hash);
    let crc = crc32c::crc32c(&h[..48]);
    h[48..52].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes the head file: the sequence number and hash of the last durable record.
pub fn decode_head(h: &[u8]) -> Result<(u64, Hash), String> {
    if h.len() != HEAD_BYTES || &h[0..8] != HEAD_MAGIC {
        return Err("the head file is malformed".into());
    }
    let crc = u32::from_le_bytes(h[48..52].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&h[..48]) {
        return Err("the head file checksum does not match".into());
    }
    Ok((
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
        h[16..48].try_into().expect("32 bytes"),
    ))
}

/// The file name of the segment whose first record is `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}
