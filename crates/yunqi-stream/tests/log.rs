//! The stream log at its boundary, on real files: round trips across segments, dense offsets
//! under concurrency, reopen, torn tails, damage, retention, committed offsets, names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use yunqi_stream::format::{self, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use yunqi_stream::{Appended, Entry, LogConfig, Retention, SegmentLog, StreamLog};
use yunqi_types::{Clock, ErrorCode, ManualClock, SystemClock};

const KEY: &str = "traffic.detections";

fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        preallocate_bytes: 4 << 10,
        ..LogConfig::default()
    }
}

fn open(root: &Path, config: LogConfig) -> Arc<SegmentLog> {
    SegmentLog::open(root, config, Arc::new(SystemClock)).unwrap()
}

/// A payload that names its stream position, `len` bytes long.
fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut p = format!("entry {i};").into_bytes();
    p.resize(len.max(p.len()), b'a' + (i % 26) as u8);
    p
}

/// Every entry of a stream from `from`, read in pages of `page_bytes`.
fn read_all(log: &dyn StreamLog, key: &str, from: u64, page_bytes: usize) -> Vec<Entry> {
    let end = log.end_offset(key);
    let mut out: Vec<Entry> = Vec::new();
    let mut at = from;
    while at < end {
        let page = log.read(key, at, page_bytes).unwrap();
        assert!(
            !page.is_empty(),
            "no entry at offset {at} before the end {end}"
        );
        for e in page {
            assert!(
                e.first <= at && e.end() > at,
                "entry {e:?} does not hold {at}"
            );
            at = e.end();
            out.push(e);
        }
    }
    assert!(log.read(key, end, page_bytes).unwrap().is_empty());
    out
}

fn segments(root: &Path, key: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join(key))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

/// (byte position, first offset, end offset) of every frame of a segment file.
fn frames(path: &Path) -> Vec<(usize, u64, u64)> {
    let buf = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER_BYTES;
    while pos + FRAME_HEADER_BYTES <= buf.len() {
        let Ok(h) = format::decode_frame_header(&buf[pos..]) else {
            assert!(format::all_zero(&buf[pos..]), "bad frame at {pos}");
            break;
        };
        out.push((pos, h.first, h.end()));
        pos += h.frame_bytes();
    }
    out
}

fn check_dense(appended: &[Appended], from: u64) -> u64 {
    let mut at = from;
    for a in appended {
        assert_eq!(a.first, at, "offsets are not dense: {appended:?}");
        assert!(a.end > a.first);
        at = a.end;
    }
    at
}

#[test]
fn entries_round_trip_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1024));
    let mut appended = Vec::new();
    let mut expected = Vec::new();
    for i in 0..120 {
        let count = (i % 5 + 1) as u32;
        let p = payload(i, i * 7 % 300);
        appended.push(log.append_blocking(KEY, count, p.clone()).unwrap());
        expected.push((count, p));
    }
    let end = check_dense(&appended, 0);
    assert_eq!(log.end_offset(KEY), end);
    assert_eq!(log.start_offset(KEY), 0);
    assert!(segments(dir.path(), KEY).len() > 10);

    for page_bytes in [0, 100, 1 << 20] {
        let entries = read_all(log.as_ref(), KEY, 0, page_bytes);
        assert_eq!(entries.len(), expected.len());
        for ((e, a), (count, p)) in entries.iter().zip(&appended).zip(&expected) {
            assert_eq!((e.first, e.count, &e.payload), (a.first, *count, p));
        }
    }
    // From within an entry: that entry, whole.
    let inside = appended[54].first + 3;
    assert!(appended[54].end > inside);
    let page = log.read(KEY, inside, 0).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].first, appended[54].first);
    // Past the end: an error, not an empty page.
    let err = log.read(KEY, end + 1, 1 << 20).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidInput, "{err:?}");

    // An entry larger than a segment gets a segment of its own.
    let big = log.append_blocking(KEY, 3, payload(1000, 5000)).unwrap();
    let after = log.append_blocking(KEY, 1, payload(1001, 10)).unwrap();
    let segs = segments(dir.path(), KEY);
    let big_seg = dir
        .path()
        .join(KEY)
        .join(format::segment_file_name(big.first));
    assert!(segs.contains(&big_seg), "{segs:?}");
    assert_eq!(
        frames(&big_seg),
        vec![(SEGMENT_HEADER_BYTES, big.first, big.end)]
    );
    assert_eq!(
        *segs.last().unwrap(),
        dir.path()
            .join(KEY)
            .join(format::segment_file_name(after.first))
    );
    let page = log.read(KEY, big.first, 0).unwrap();
    assert_eq!(page[0].payload, payload(1000, 5000));
    assert_eq!(
        log.stats()
            .appended_entries
            .load(std::sync::atomic::Ordering::Relaxed),
        122
    );
    // Unknown streams are empty.
    assert_eq!(log.end_offset("unknown"), 0);
    assert!(log.read("unknown", 0, 100).unwrap().is_empty());
}

#[test]
fn offsets_stay_dense_under_sixteen_appending_threads() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(16 << 10));
    const THREADS: usize = 16;
    const APPENDS: usize = 150;
    let results: Vec<Vec<(Appended, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let log = log.clone();
                s.spawn(move || {
                    (0..APPENDS)
                        .map(|i| {
                            let key = if t % 4 == 0 { "other.stream" } else { KEY };
                            let p = payload(t * 10_000 + i, 40 + (i * 13 + t) % 200);
                            let a = log
                                .append_blocking(key, (t % 3 + 1) as u32, p.clone())
                                .unwrap();
                            (a, p)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (key, threads) in [
        (KEY, (0..THREADS).filter(|t| t % 4 != 0).collect::<Vec<_>>()),
        ("other.stream", (0..THREADS).step_by(4).collect()),
    ] {
        let mut by_first = BTreeMap::new();
        for &t in &threads {
            let mine = &results[t];
            // Each thread's appends are ordered as it made them.
            assert!(mine.windows(2).all(|w| w[0].0.end <= w[1].0.first));
            for (a, p) in mine {
                assert!(by_first.insert(a.first, (*a, p.clone())).is_none());
            }
        }
        let all: Vec<Appended> = by_first.values().map(|(a, _)| *a).collect();
        let end = check_dense(&all, 0);
        assert_eq!(all.len(), threads.len() * APPENDS);
        assert_eq!(log.end_offset(key), end);
        let entries = read_all(log.as_ref(), key, 0, 64 << 10);
        assert_eq!(entries.len(), all.len());
        for e in entries {
            let (a, p) = &by_first[&e.first];
            assert_eq!((e.end(), &e.payload), (a.end, p));
        }
    }
    assert!(segments(dir.path(), KEY).len() > 2);
}

#[test]
fn appends_through_the_trait_from_async_tasks_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let log: Arc<dyn StreamLog> = open(dir.path(), config(8 << 10));
    rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in 0..20 {
                        out.push(log.append(KEY, 2, payload(t * 100 + i, 64)).await.unwrap());
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_by_key(|a| a.first);
        assert_eq!(check_dense(&all, 0), 32 * 20 * 2);
        log.shutdown().await;
        let err = log.append(KEY, 1, vec![1]).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
    });
    // Reads go on after shutdown.
    assert_eq!(read_all(log.as_ref(), KEY, 0, 1 << 20).len(), 640);
}

#[test]
fn reopen_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(2048));
    for i in 0..60 {
        log.append_blocking(KEY, 1 + (i % 2) as u32, payload(i, 100))
            .unwrap();
        log.append_blocking("b", 1, payload(i, 10)).unwrap();
    }
    let before_a = read_all(log.as_ref(), KEY, 0, 1 << 20);
    let before_b = read_all(log.as_ref(), "b", 0, 1 << 20);
    let end = log.end_offset(KEY);
    drop(log);

    let log = open(dir.path(), config(2048));
    assert_eq!(log.streams(), vec!["b".to_string(), KEY.to_string()]);
    assert_eq!(log.end_offset(KEY), end);
    assert_eq!(log.end_offset("b"), 60);
    // Small pages: the closed segments found at open are indexed on their first read.
    assert_eq!(read_all(log.as_ref(), KEY, 0, 50), before_a);
    assert_eq!(read_all(log.as_ref(), "b", 0, 1 << 20), before_b);
    let next = log.append_blocking(KEY, 4, payload(99, 100)).unwrap();
    assert_eq!(
        next,
        Appended {
            first: end,
            end: end + 4
        }
    );
    drop(log);
    let log = open(dir.path(), config(2048));
    assert_eq!(log.end_offset(KEY), end + 4);
    assert_eq!(log.read(KEY, end, 0).unwrap()[0].payload, payload(99, 100));
}

#[test]
fn a_tail_cut_mid_frame_is_recovered_to_the_last_whole_frame() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    let appended: Vec<Appended> = (0..10)
        .map(|i| log.append_blocking(KEY, 3, payload(i, 200)).unwrap())
        .collect();
    drop(log);
    let seg = segments(dir.path(), KEY).pop().unwrap();
    let f = frames(&seg);
    assert_eq!(f.len(), 10);
    let (last_pos, _, _) = f[9];
    // The cut goes through the last frame's payload.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len((last_pos + FRAME_HEADER_BYTES + 50) as u64)
        .unwrap();

    let log = open(dir.path(), config(1 << 20));
    assert_eq!(log.end_offset(KEY), appended[8].end);
    let entries = read_all(log.as_ref(), KEY, 0, 1 << 20);
    assert_eq!(entries.len(), 9);
    assert_eq!(entries[8].payload, payload(8, 200));
    let next = log.append_blocking(KEY, 2, payload(50, 200)).unwrap();
    assert_eq!(next.first, appended[8].end);
    drop(log);
    let log = open(dir.path(), config(1 << 20));
    assert_eq!(log.end_offset(KEY), next.end);
    let entries = read_all(log.as_ref(), KEY, 0, 1 << 20);
    assert_eq!(entries.len(), 10);
    assert_eq!(entries[9].payload, payload(50, 200));
}

#[test]
fn garbage_after_the_last_frame_is_cut_off() {
    for garbage_at_end_of_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), config(1 << 20));
        for i in 0..5 {
            log.append_blocking(KEY, 1, payload(i, 64)).unwrap();
        }
        drop(log);
        let seg = segments(dir.path(), KEY).pop().unwrap();
        let mut buf = std::fs::read(&seg).unwrap();
        let (pos, _, _) = *frames(&seg).last().unwrap();
        let end_of_frames = pos + format::frame_bytes(payload(4, 64).len());
        let garbage: Vec<u8> = (0..300u32).map(|i| (i * 37 % 251) as u8 + 1).collect();
        if garbage_at_end_of_file {
            buf.extend_from_slice(&garbage);
        } else {
            // A frame header that looks plausible, then junk: a torn write.
            let mut torn = Vec::new();
            format::encode_frame(&mut torn, 5, 1, 0, 0, &payload(5, 500));
            buf[end_of_frames..end_of_frames + 200].copy_from_slice(&torn[..200]);
        }
        std::fs::write(&seg, &buf).unwrap();

        let log = open(dir.path(), config(1 << 20));
        assert_eq!(log.end_offset(KEY), 5);
        let a = log.append_blocking(KEY, 1, payload(5, 64)).unwrap();
        assert_eq!(a.first, 5);
        drop(log);
        let log = open(dir.path(), config(1 << 20));
        assert_eq!(log.end_offset(KEY), 6);
        let entries = read_all(log.as_ref(), KEY, 0, 1 << 20);
        assert_eq!(
            entries
                .iter()
                .map(|e| e.payload.clone())
                .collect::<Vec<_>>(),
            (0..6).map(|i| payload(i, 64)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_segment_whose_creation_was_cut_short_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    for i in 0..3 {
        log.append_blocking(KEY, 2, payload(i, 10)).unwrap();
    }
    drop(log);
    let blank = dir.path().join(KEY).join(format::segment_file_name(6));
    std::fs::write(&blank, [0u8; 17]).unwrap();
    let log = open(dir.path(), config(1 << 20));
    assert!(!blank.exists());
    assert_eq!(log.end_offset(KEY), 6);
    assert_eq!(log.append_blocking(KEY, 1, vec![7]).unwrap().first, 6);
}

#[test]
fn a_flipped_byte_in_an_earlier_frame_is_reported_by_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    // One append per group commit; payloads a multiple of 8 bytes (no padding to flip).
    let appended: Vec<Appended> = (0..8)
        .map(|i| log.append_blocking(KEY, 2, payload(i, 48)).unwrap())
        .collect();
    drop(log);
    let seg = segments(dir.path(), KEY).pop().unwrap();
    let clean = std::fs::read(&seg).unwrap();
    let f = frames(&seg);
    for k in [0usize, 3, 6] {
        let (start, _, _) = f[k];
        let end = f[k + 1].0;
        for pos in start..end {
            let mut buf = clean.clone();
            buf[pos] ^= 0x10;
            std::fs::write(&seg, &buf).unwrap();
            let log = open(dir.path(), config(1 << 20));
            // Nothing was cut: the damage is followed by later group commits.
            assert_eq!(log.end_offset(KEY), 16, "flip at byte {pos}");
            let err = log.read(KEY, appended[k].first, 1 << 20).unwrap_err();
            assert_eq!(err.code, ErrorCode::Internal);
            assert!(
                err.message
                    .contains(&format!("offset {}", appended[k].first)),
                "{err:?}"
            );
            let detail = err.detail.clone().unwrap();
            assert!(
                detail.contains(seg.to_str().unwrap()) && detail.contains(&format!("byte {start}")),
                "{detail}"
            );
            let hint = err.hint.clone().unwrap();
            assert!(
                hint.contains(&format!("from offset {}", appended[k + 1].first)),
                "{hint}"
            );
            // Reads before the damage return what precedes it; reads after it work.
            match log.read(KEY, 0, 1 << 20) {
                Ok(before) => assert_eq!(before.len(), k),
                Err(e) => assert_eq!((k, e.code), (0, ErrorCode::Internal)),
            }
            let after = read_all(log.as_ref(), KEY, appended[k + 1].first, 1 << 20);
            assert_eq!(after.len(), 8 - k - 1);
            drop(log);
        }
    }
}

#[test]
fn damage_in_a_closed_segment_is_reported_by_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(512));
    let appended: Vec<Appended> = (0..30)
        .map(|i| log.append_blocking(KEY, 1, payload(i, 96)).unwrap())
        .collect();
    let segs = segments(dir.path(), KEY);
    assert!(segs.len() > 3);
    let (pos, first, _) = frames(&segs[1])[1];
    let mut buf = std::fs::read(&segs[1]).unwrap();
    buf[pos + FRAME_HEADER_BYTES + 10] ^= 1;
    std::fs::write(&segs[1], &buf).unwrap();
    // While open (the segment's index is in memory) and after reopening (it is scanned).
    let mut log = Some(log);
    for reopen in [false, true] {
        let log = match log.take() {
            Some(log) => log,
            None => open(dir.path(), config(512)),
        };
        let err = log.read(KEY, first, 1 << 20).unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(
            err.detail
                .as_deref()
                .unwrap()
                .contains(segs[1].to_str().unwrap()),
            "{err:?}"
        );
        assert!(
            err.detail
                .as_deref()
                .unwrap()
                .contains(&format!("byte {pos}")),
            "{err:?}"
        );
        let before = log.read(KEY, 0, 1 << 20).unwrap();
        assert_eq!(before.last().unwrap().end(), first);
        assert_eq!(log.read(KEY, first + 1, 0).unwrap()[0].first, first + 1);
        assert_eq!(log.end_offset(KEY), appended.last().unwrap().end);
        assert!(reopen || Arc::strong_count(&log) == 1);
    }
}

#[test]
fn retention_by_bytes_removes_the_oldest_closed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1024));
    for i in 0..50 {
        log.append_blocking(KEY, 1, payload(i, 200)).unwrap();
    }
    let before = segments(dir.path(), KEY);
    // Closed segments are trimmed to their frames; the active one counts up to its last frame.
    let mut sizes: Vec<u64> = before
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    let (pos, _, _) = *frames(before.last().unwrap()).last().unwrap();
    *sizes.last_mut().unwrap() = (pos + format::frame_bytes(200)) as u64;
    let total: u64 = sizes.iter().sum();
    let keep = 3000;
    let report = log
        .apply_retention(
            KEY,
            &Retention {
                max_bytes: Some(keep),
                max_age: None,
            },
            0,
        )
        .unwrap();
    let after = segments(dir.path(), KEY);
    assert!(report.segments_removed > 0);
    assert_eq!(after.len(), before.len() - report.segments_removed);
    assert_eq!(after[..], before[report.segments_removed..]);
    assert_eq!(
        report.bytes_removed,
        sizes[..report.segments_removed].iter().sum::<u64>()
    );
    // Removed while over the bound, and not one more.
    assert!(total - report.bytes_removed <= keep);
    assert!(total - report.bytes_removed + sizes[report.segments_removed - 1] > keep);
    assert_eq!(log.start_offset(KEY), report.start_offset);
    assert_eq!(
        before[report.segments_removed],
        dir.path()
            .join(KEY)
            .join(format::segment_file_name(report.start_offset))
    );

    // Reading below the start names the earliest offset kept.
    let err = log.read(KEY, 0, 1 << 20).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("removed by retention"), "{err:?}");
    assert!(
        err.detail
            .unwrap()
            .contains(&report.start_offset.to_string())
    );
    assert_eq!(
        read_all(log.as_ref(), KEY, report.start_offset, 1 << 20).len() as u64,
        50 - report.start_offset
    );

    // Never the segment being appended to.
    let report = log
        .apply_retention(
            KEY,
            &Retention {
                max_bytes: Some(0),
                max_age: None,
            },
            0,
        )
        .unwrap();
    assert_eq!(segments(dir.path(), KEY).len(), 1);
    assert!(report.start_offset < 50);
    assert_eq!(log.append_blocking(KEY, 1, vec![1]).unwrap().first, 50);
    drop(log);
    let log = open(dir.path(), config(1024));
    assert_eq!(log.start_offset(KEY), report.start_offset);
    assert_eq!(
        log.read(KEY, report.start_offset - 1, 0).unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[test]
fn retention_by_age_removes_segments_whose_last_entry_is_old() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Default::default());
    clock.advance_micros(1_000_000_000_000);
    let t0 = clock.now().timestamp_micros();
    // 4 frames of 104 bytes fill a segment: 40 + 4 * 104.
    let cfg = config(456);
    let log = SegmentLog::open(dir.path(), cfg.clone(), Arc::new(clock.clone())).unwrap();
    let hour = 3_600_000_000i64;
    let append = |n: usize| {
        for i in 0..n {
            log.append_blocking(KEY, 1, payload(i, 64)).unwrap();
        }
    };
    append(8); // era A: offsets 0..8, segments 0 and 4
    clock.advance_micros(hour);
    append(8); // era B: 8..16, segments 8 and 12
    clock.advance_micros(hour);
    append(2); // era C: 16..18, the active segment
    assert_eq!(segments(dir.path(), KEY).len(), 5);
    assert_eq!(log.read(KEY, 8, 0).unwrap()[0].appended_at_us, t0 + hour);
    let ninety_minutes = Retention {
        max_age: Some(Duration::from_secs(90 * 60)),
        max_bytes: None,
    };
    assert_eq!(
        log.apply_retention(KEY, &ninety_minutes, t0 + hour)
            .unwrap()
            .segments_removed,
        0
    );
    let now = clock.now().timestamp_micros();
    let report = log.apply_retention(KEY, &ninety_minutes, now).unwrap();
    assert_eq!((report.segments_removed, report.start_offset), (2, 8));
    drop(log);

    // After reopening, the age of closed segments comes from the next segment's header.
    let log = SegmentLog::open(dir.path(), cfg, Arc::new(clock.clone())).unwrap();
    clock.advance_micros(hour);
    let report = log
        .apply_retention(KEY, &ninety_minutes, clock.now().timestamp_micros())
        .unwrap();
    assert_eq!((report.segments_removed, report.start_offset), (2, 16));
    assert_eq!(log.read(KEY, 16, 1 << 20).unwrap().len(), 2);
}

#[test]
fn committed_offsets_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    for i in 0..5 {
        log.append_blocking(KEY, 10, payload(i, 8)).unwrap();
    }
    assert_eq!(log.committed_offset(KEY, "rollup").unwrap(), None);
    log.commit_offset(KEY, "rollup", 20).unwrap();
    log.commit_offset(KEY, "rollup", 40).unwrap();
    log.commit_offset(KEY, "archive", 50).unwrap();
    log.commit_offset("not.yet.written", "early", 0).unwrap();
    let err = log.commit_offset(KEY, "rollup", 51).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert_eq!(
        log.commit_offset(KEY, "Rollup", 1).unwrap_err().code,
        ErrorCode::InvalidInput
    );
    drop(log);
    let log = open(dir.path(), config(1 << 20));
    assert_eq!(log.committed_offset(KEY, "rollup").unwrap(), Some(40));
    assert_eq!(log.committed_offset(KEY, "archive").unwrap(), Some(50));
    assert_eq!(
        log.committed_offset("not.yet.written", "early").unwrap(),
        Some(0)
    );
    assert_eq!(log.committed_offset(KEY, "nobody").unwrap(), None);
    // A stream known only by its committed offsets is empty and takes appends.
    assert_eq!(log.end_offset("not.yet.written"), 0);
    assert_eq!(
        log.append_blocking("not.yet.written", 1, vec![])
            .unwrap()
            .first,
        0
    );
}

#[test]
fn invalid_stream_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    for bad in [
        "",
        "..",
        ".hidden",
        "Traffic",
        "a/b",
        "中文",
        &"x".repeat(129),
    ] {
        let err = log.append_blocking(bad, 1, vec![1]).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidInput, "{bad:?}");
        assert_eq!(
            log.read(bad, 0, 10).unwrap_err().code,
            ErrorCode::InvalidInput
        );
        assert_eq!(
            log.commit_offset(bad, "c", 0).unwrap_err().code,
            ErrorCode::InvalidInput
        );
        assert!(log.apply_retention(bad, &Retention::default(), 0).is_err());
    }
    assert_eq!(
        log.append_blocking(KEY, 0, vec![1]).unwrap_err().code,
        ErrorCode::InvalidInput
    );
    assert!(log.streams().is_empty());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(".lock")]);
}

#[test]
fn appends_are_refused_after_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    log.append_blocking(KEY, 1, vec![1]).unwrap();
    // A file where the new stream's directory must go: its creation fails.
    std::fs::write(dir.path().join("blocked"), b"x").unwrap();
    let err = log.append_blocking("blocked", 1, vec![1]).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
    let err = log.append_blocking(KEY, 1, vec![2]).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(err.message.contains("cannot be written"), "{err:?}");
    assert_eq!(log.end_offset(KEY), 1);
    assert_eq!(log.read(KEY, 0, 10).unwrap().len(), 1);
}

#[test]
fn a_second_open_of_the_same_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), config(1 << 20));
    let err = SegmentLog::open(dir.path(), config(1 << 20), Arc::new(SystemClock))
        .err()
        .expect("the root is locked");
    assert_eq!(err.code, ErrorCode::Unavailable);
    drop(log);
    assert!(SegmentLog::open(dir.path(), config(1 << 20), Arc::new(SystemClock)).is_ok());
}
