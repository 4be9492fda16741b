//! Retention on JetStream: whole rounds are purged from the front, never the last one (its
//! headers hold the stream's end, which a later append continues from).
//!
//! JetStream's own `max_age`/`max_bytes` are not used: they may remove the last message too,
//! and yunqi's offsets would then be lost with it.

use yunqi_stream::{Retention, RetentionReport};
use yunqi_types::Error;

use crate::{Inner, frame, unreachable};

pub(crate) async fn apply(
    inner: &Inner,
    key: &str,
    retention: &Retention,
    now_us: i64,
) -> Result<RetentionReport, Error> {
    let s = inner.stream(key);
    let Some(before) = inner.state(key).await? else {
        return Ok(RetentionReport::default());
    };
    let (first, last) = (before.first_sequence, before.last_sequence);
    if last == 0 || first >= last {
        return Ok(RetentionReport {
            start_offset: inner.start_offset(key).await?,
            ..Default::default()
        });
    }
    let mut cut = first;
    if let Some(age) = retention.max_age {
        let cutoff = now_us.saturating_sub(age.as_micros().min(i64::MAX as u128) as i64);
        // First round in [first, last] appended at or after the cutoff; `at` never decreases.
        let (mut lo, mut hi) = (first, last);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match inner.get(key, mid).await? {
                Some(m) if frame::Headers::parse(&m)?.at >= cutoff => hi = mid,
                _ => lo = mid + 1,
            }
        }
        cut = cut.max(lo);
    }
    if let Some(max) = retention.max_bytes
        && before.bytes > max
        && before.messages > 0
    {
        let average = (before.bytes / before.messages).max(1);
        let over = (before.bytes - max).div_ceil(average);
        cut = cut.max(first.saturating_add(over));
    }
    let cut = cut.min(last);
    if cut <= first {
        return Ok(RetentionReport {
            start_offset: inner.start_offset(key).await?,
            ..Default::default()
        });
    }
    let purged = s
        .purge()
        .sequence(cut)
        .await
        .map_err(|e| unreachable("removing old events", e))?;
    let after_bytes = inner
        .state(key)
        .await?
        .map(|s| s.bytes)
        .unwrap_or(before.bytes);
    Ok(RetentionReport {
        segments_removed: purged.purged as usize,
        bytes_removed: before.bytes.saturating_sub(after_bytes),
        start_offset: inner.start_offset(key).await?,
    })
}
