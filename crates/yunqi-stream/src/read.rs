//! Reading a stream by offset.
//!
//! A read finds the segment holding its offset (binary search over the stream's segments), the
//! last index point at or before the offset (binary search over the segment's sparse index, at
//! most [`INDEX_INTERVAL_BYTES`] of frames before it), and then reads whole ranges of the file
//! with large `pread`s into one buffer sized to the bytes asked for. Segment files stay open
//! between reads. Every returned payload is checked against its CRC; frames skipped on the way to
//! the offset are checked by their header CRC.
//!
//! A read sees only durable entries: it stops at the end the committer published after the
//! fsync. Damage is never skipped: a read that meets it returns the entries before it, and a read
//! starting at it fails with an internal error naming the segment file, the byte position, and
//! the offset from which the stream can be read again.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use yunqi_types::{Error, ErrorCode};

use crate::format::{self, FRAME_HEADER_BYTES, FrameError, IndexPoint, SEGMENT_HEADER_BYTES};
use crate::log::{INDEX_INTERVAL_BYTES, Segment, SegmentMeta, Shared, StreamState};
use crate::{Entry, validate_stream_key};

/// Smallest `pread` a read issues.
const READ_CHUNK_BYTES_MIN: usize = 64 << 10;
/// Largest `pread` a read issues, unless one frame is larger.
const READ_CHUNK_BYTES_MAX: usize = 16 << 20;

pub(crate) fn read(
    shared: &Shared,
    key: &str,
    from: u64,
    max_bytes: usize,
) -> Result<Vec<Entry>, Error> {
    validate_stream_key(key)?;
    let Some(stream) = shared.stream(key) else {
        return if from == 0 {
            Ok(Vec::new())
        } else {
            Err(past_end(key, from, 0))
        };
    };
    let end = stream.end.load(Ordering::Acquire);
    if from > end {
        return Err(past_end(key, from, end));
    }
    let start = stream.start_offset();
    if from < start {
        return Err(removed(key, from, start));
    }
    let mut reader = Reader {
        stream: &stream,
        from,
        max_bytes,
        used: 0,
        out: Vec::new(),
        window: Vec::new(),
        window_pos: 0,
    };
    let mut at = from;
    let mut previous: Option<Arc<Segment>> = None;
    loop {
        let Some(segment) = stream.segment_for(at) else {
            // Retention removed the segment since the checks above.
            let start = stream.start_offset();
            if reader.out.is_empty() && at < start {
                return Err(removed(key, at, start));
            }
            break;
        };
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, &segment)) {
            break;
        }
        match reader.read_segment(&segment, at)? {
            Step::Full => break,
            Step::Exhausted(segment_end) => {
                at = at.max(segment_end);
                previous = Some(segment);
            }
        }
    }
    Ok(reader.out)
}

enum Step {
    /// Enough bytes were read, or the read stopped before damage.
    Full,
    /// The segment was read to its end, this offset.
    Exhausted(u64),
}

struct Reader<'a> {
    stream: &'a StreamState,
    from: u64,
    max_bytes: usize,
    used: usize,
    out: Vec<Entry>,
    /// Bytes of the segment being read, starting at `window_pos`.
    window: Vec<u8>,
    window_pos: u64,
}

impl Reader<'_> {
    fn read_segment(&mut self, segment: &Segment, at: u64) -> Result<Step, Error> {
        let (file, bytes, segment_end, point) = {
            let mut m = segment.meta.lock().expect("segment lock");
            if m.index.is_none() {
                build_index(self.stream, segment, &mut m)?;
            }
            let file = match &m.file {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(File::open(&segment.path).map_err(|e| self.io(segment, e))?);
                    m.file = Some(f.clone());
                    f
                }
            };
            let index = m.index.as_deref().unwrap_or_default();
            let i = index.partition_point(|p| p.offset <= at);
            let point = if i == 0 {
                IndexPoint {
                    offset: segment.first,
                    pos: SEGMENT_HEADER_BYTES as u64,
                }
            } else {
                index[i - 1]
            };
            (file, m.bytes, m.end, point)
        };
        if at >= segment_end {
            return Ok(Step::Exhausted(segment_end));
        }
        self.window.clear();
        let chunk = self
            .max_bytes
            .saturating_sub(self.used)
            .saturating_add(INDEX_INTERVAL_BYTES as usize + FRAME_HEADER_BYTES)
            .clamp(READ_CHUNK_BYTES_MIN, READ_CHUNK_BYTES_MAX);
        let mut pos = point.pos;
        let mut expected = point.offset;
        loop {
            if pos >= bytes {
                if expected != segment_end {
                    return self.damaged(
                        segment,
                        pos,
                        expected,
                        "the segment ends early: its entries stop before the next segment starts",
                    );
                }
                return Ok(Step::Exhausted(segment_end));
            }
            let header = match self.get(segment, &file, pos, FRAME_HEADER_BYTES, bytes, chunk)? {
                Some(b) => format::decode_frame_header(b),
                None => Err(FrameError::Truncated),
            };
            let h = match header {
                Ok(h) if h.first == expected => h,
                Ok(_) => return self.damaged(segment, pos, expected, FrameError::Misplaced),
                Err(e) => return self.damaged(segment, pos, expected, e),
            };
            let frame_bytes = h.frame_bytes();
            if pos + frame_bytes as u64 > bytes {
                return self.damaged(segment, pos, expected, FrameError::Truncated);
            }
            if h.end() > self.from.max(at) {
                let len = h.payload_len as usize;
                if !self.out.is_empty() && self.used + len > self.max_bytes {
                    return Ok(Step::Full);
                }
                let frame = self
                    .get(segment, &file, pos, frame_bytes, bytes, chunk)?
                    .expect("the frame lies within the segment");
                let payload = &frame[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
                let payload = (crc32c::crc32c(payload) == h.payload_crc).then(|| payload.to_vec());
                let Some(payload) = payload else {
                    return self.damaged(segment, pos, expected, FrameError::BadPayload);
                };
                self.out.push(Entry {
                    first: h.first,
                    count: h.count,
                    appended_at_us: h.appended_at_us,
                    payload,
                });
                self.used += len;
            }
            pos += frame_bytes as u64;
            expected = h.end();
            if !self.out.is_empty() && self.used >= self.max_bytes {
                return Ok(Step::Full);
            }
        }
    }

    /// `len` bytes of the segment at `pos`, read with one `pread` of at least `chunk` bytes
    /// (within `limit`) when the window does not hold them; `None` past `limit`.
    fn get(
        &mut self,
        segment: &Segment,
        file: &File,
        pos: u64,
        len: usize,
        limit: u64,
        chunk: usize,
    ) -> Result<Option<&[u8]>, Error> {
        if pos + len as u64 > limit {
            return Ok(None);
        }
        let window_end = self.window_pos + self.window.len() as u64;
        if pos < self.window_pos || pos + len as u64 > window_end {
            let want = (len.max(chunk) as u64).min(limit - pos) as usize;
            self.window.clear();
            self.window.resize(want, 0);
            if let Err(e) = file.read_exact_at(&mut self.window, pos) {
                self.window.clear();
                return Err(self.io(segment, e));
            }
            self.window_pos = pos;
        }
        let at = (pos - self.window_pos) as usize;
        Ok(Some(&self.window[at..at + len]))
    }

    /// Damage at `pos`: the entries read so far are returned; a read starting at it fails.
    fn damaged(
        &self,
        segment: &Segment,
        pos: u64,
        offset: u64,
        what: impl std::fmt::Display,
    ) -> Result<Step, Error> {
        if !self.out.is_empty() {
            return Ok(Step::Full);
        }
        let resume = {
            let m = segment.meta.lock().expect("segment lock");
            m.index
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.pos > pos)
                .map_or(m.end, |p| p.offset)
        };
        Err(Error::internal(format!(
            "stream \"{}\" has a damaged entry at offset {offset}",
            self.stream.key
        ))
        .detail(format!(
            "segment file {}, byte {pos}: {what}",
            segment.path.display()
        ))
        .hint(format!(
            "the stream can be read again from offset {resume}: a consumer may skip to it once \
             the loss is accepted; restore the stream's directory from a backup to recover the \
             damaged entries"
        )))
    }

    fn io(&self, segment: &Segment, e: std::io::Error) -> Error {
        Error::internal(format!("reading stream \"{}\" failed", self.stream.key))
            .detail(format!("{}: {e}", segment.path.display()))
    }
}

/// Scans a closed segment found at open, on its first read: builds its index and finds damage.
fn build_index(stream: &StreamState, segment: &Segment, m: &mut SegmentMeta) -> Result<(), Error> {
    let buf = fs::read(&segment.path).map_err(|e| {
        Error::internal(format!("reading stream \"{}\" failed", stream.key))
            .detail(format!("{}: {e}", segment.path.display()))
    })?;
    let scan = format::scan(&buf, segment.first, INDEX_INTERVAL_BYTES);
    for d in &scan.damage {
        tracing::error!(
            stream = %stream.key,
            segment = %segment.path.display(),
            byte = d.pos,
            offset = d.offset,
            error = %d.error,
            "damaged entry in a closed stream segment: reads of it will fail"
        );
    }
    // Damage with nothing readable after it stays within the bytes reads walk, so that they
    // meet it; otherwise trailing zeros are not part of the segment.
    m.bytes = if scan.damage.last().is_some_and(|d| d.resumed.is_none()) {
        buf.len() as u64
    } else {
        scan.end_pos
    };
    if let Some(t) = scan.last_appended_at_us {
        m.last_appended_at_us = t;
    }
    m.index = Some(scan.points);
    Ok(())
}

fn past_end(key: &str, from: u64, end: u64) -> Error {
    Error::invalid(format!("offset {from} is past the end of stream \"{key}\""))
        .detail(format!("the stream ends at offset {end}"))
        .hint("read from an offset a previous read or append returned")
}

fn removed(key: &str, from: u64, start: u64) -> Error {
    Error::new(
        ErrorCode::NotFound,
        format!("offset {from} of stream \"{key}\" was removed by retention"),
    )
    .detail(format!("the earliest offset the stream still keeps is {start}"))
    .hint(format!(
        "read from offset {start}; the events before it are gone (keep them longer with the stream's retention)"
    ))
}
