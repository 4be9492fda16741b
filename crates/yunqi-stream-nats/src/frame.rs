//! A round's message: headers with its event offsets and append time, a payload of framed
//! entries (`count u32 LE · length u32 LE · bytes`, repeated).

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use yunqi_stream::Entry;
use yunqi_types::Error;

/// Header: offset of the round's first event.
pub const HEADER_FIRST: &str = "Yunqi-First";
/// Header: offset past the round's last event.
pub const HEADER_END: &str = "Yunqi-End";
/// Header: when the round was appended, microseconds since the Unix epoch.
pub const HEADER_AT: &str = "Yunqi-At";
/// Framing bytes before each entry's payload.
pub const FRAME_ENTRY_HEADER_BYTES: usize = 8;

/// A round's headers, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Headers {
    pub first: u64,
    pub end: u64,
    pub at: i64,
}

fn damaged(what: &str) -> Error {
    Error::internal("a round in the stream engine is damaged")
        .detail(what.to_string())
        .hint("the stream was changed by something other than yunqi; restore it from a backup")
}

impl Headers {
    pub(crate) fn parse(m: &StreamMessage) -> Result<Headers, Error> {
        Headers::of(m.sequence, Some(&m.headers))
    }

    /// The headers of message `seq`.
    pub(crate) fn of(seq: u64, headers: Option<&HeaderMap>) -> Result<Headers, Error> {
        let get = |name: &str| -> Result<&str, Error> {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
                .ok_or_else(|| damaged(&format!("message {seq} has no {name} header")))
        };
        let num = |name: &str| -> Result<i64, Error> {
            get(name)?
                .parse::<i64>()
                .map_err(|_| damaged(&format!("message {seq} has a bad {name} header")))
        };
        let (first, end, at) = (num(HEADER_FIRST)?, num(HEADER_END)?, num(HEADER_AT)?);
        if first < 0 || end < first {
            return Err(damaged(&format!(
                "message {seq} covers offsets {first}..{end}"
            )));
        }
        Ok(Headers {
            first: first as u64,
            end: end as u64,
            at,
        })
    }
}

/// The message of one round: entries `(count, payload)` starting at offset `first`.
pub(crate) fn round(first: u64, end: u64, at: i64, entries: &[(u32, &[u8])]) -> Publish {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_FIRST, first.to_string().as_str());
    headers.insert(HEADER_END, end.to_string().as_str());
    headers.insert(HEADER_AT, at.to_string().as_str());
    Publish::build()
        .headers(headers)
        .payload(Bytes::from(frame(entries)))
}

/// The payload of a round.
pub(crate) fn frame(entries: &[(u32, &[u8])]) -> Vec<u8> {
    let len: usize = entries
        .iter()
        .map(|(_, p)| p.len() + FRAME_ENTRY_HEADER_BYTES)
        .sum();
    let mut payload = Vec::with_capacity(len);
    for (count, p) in entries {
        payload.extend_from_slice(&count.to_le_bytes());
        payload.extend_from_slice(&(p.len() as u32).to_le_bytes());
        payload.extend_from_slice(p);
    }
    payload
}

/// The entries of a round, checked against its headers.
pub(crate) fn entries(key: &str, h: &Headers, payload: &[u8]) -> Result<Vec<Entry>, Error> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut next = h.first;
    while at < payload.len() {
        if payload.len() - at < FRAME_ENTRY_HEADER_BYTES {
            return Err(damaged(&format!("a round of {key} ends inside a frame")));
        }
        let count = u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(payload[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        at += FRAME_ENTRY_HEADER_BYTES;
        if payload.len() - at < len {
            return Err(damaged(&format!("a round of {key} ends inside an entry")));
        }
        out.push(Entry {
            first: next,
            count,
            appended_at_us: h.at,
            payload: payload[at..at + len].to_vec(),
        });
        next += u64::from(count);
        at += len;
    }
    if next != h.end {
        return Err(damaged(&format!(
            "a round of {key} holds events {}..{next}, its headers say ..{}",
            h.first, h.end
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_frames_and_unframes_its_entries() {
        let payload = frame(&[(3, b"abc"), (4, b""), (0, b"x")]);
        let h = Headers {
            first: 10,
            end: 17,
            at: 5,
        };
        let e = entries("s", &h, &payload).unwrap();
        assert_eq!(
            e.iter()
                .map(|e| (e.first, e.count, e.payload.clone()))
                .collect::<Vec<_>>(),
            vec![
                (10, 3, b"abc".to_vec()),
                (13, 4, vec![]),
                (17, 0, b"x".to_vec())
            ]
        );
        assert!(entries("s", &Headers { end: 18, ..h }, &payload).is_err());
        assert!(entries("s", &h, &payload[..payload.len() - 1]).is_err());
        assert!(entries("s", &h, &payload[..5]).is_err());
        assert!(
            entries(
                "s",
                &Headers {
                    first: 0,
                    end: 0,
                    at: 0
                },
                &[]
            )
            .unwrap()
            .is_empty()
        );
    }
}
