//! The audit chain at its boundary: append, reopen, query, and verification of every kind of
//! tampering (flip, delete, reorder, truncate, forged hash), with the first bad record named.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use yunqi_audit::format::{self, read_frame};
use yunqi_audit::{AuditChain, AuditQuery, verify};
use yunqi_types::{AuditEvent, Limits, Outcome, SystemClock};

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        principal: format!("p{}", i % 7),
        department: if i.is_multiple_of(2) {
            "transport".into()
        } else {
            "traffic".into()
        },
        action: if i.is_multiple_of(3) {
            "token.create".into()
        } else {
            "department.create".into()
        },
        object: format!("department:d{i}"),
        outcome: Some(if i.is_multiple_of(5) {
            Outcome::Denied
        } else {
            Outcome::Ok
        }),
        purpose: String::new(),
        detail: format!("record number {i} 审计"),
        request_id: format!("req-{i}"),
    }
}

fn open(dir: &Path, limits: &Limits) -> AuditChain {
    AuditChain::open(dir, Arc::new(SystemClock), limits).unwrap()
}

/// Writes `n` records into a fresh chain and closes it.
fn chain_with(n: usize, limits: &Limits) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let chain = open(dir.path(), limits);
    for i in 1..=n {
        let r = chain.append_blocking(event(i)).unwrap();
        assert_eq!(r.seq, i as u64);
    }
    chain.shutdown_blocking();
    dir
}

fn only_segment(dir: &Path) -> PathBuf {
    let segs = yunqi_audit::chain::list_segments(dir).unwrap();
    assert_eq!(segs.len(), 1);
    segs[0].1.clone()
}

/// (offset, end) of each frame of a segment file.
fn frames(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut offset = format::SEGMENT_HEADER_BYTES;
    while offset < buf.len() {
        match read_frame(buf, offset) {
            Ok(f) => {
                out.push((f.offset, f.end));
                offset = f.end;
            }
            Err(format::FrameError::End) => break,
            Err(e) => panic!("{e:?} at {offset}"),
        }
    }
    out
}

/// Recomputes hash and CRC of the frame at `range` after its body was edited.
fn reseal(buf: &mut [u8], (start, end): (usize, usize)) {
    let body = start + format::FRAME_PREFIX_BYTES..end - format::HASH_BYTES;
    let hash: [u8; 32] = Sha256::digest(&buf[body.clone()]).into();
    buf[body.end..end].copy_from_slice(&hash);
    let crc = crc32c::crc32c(&buf[body.start..end]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn problem_seq(dir: &Path) -> (Option<u64>, String) {
    let report = verify(dir, 2).unwrap();
    let p = report.problem.expect("verify must find the problem");
    (p.seq, p.reason)
}

#[test]
fn appends_survive_reopen_and_continue_the_chain() {
    let limits = Limits::default();
    let dir = chain_with(50, &limits);
    let chain = open(dir.path(), &limits);
    assert_eq!(chain.durable_head().seq, 50);
    assert_eq!(chain.append_blocking(event(51)).unwrap().seq, 51);
    chain.shutdown_blocking();
    let report = verify(dir.path(), 2).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 51);
    assert_eq!(report.head_seq, Some(51));
}

#[test]
fn a_flipped_byte_anywhere_in_a_record_names_that_record() {
    // A small preallocation: the file is rewritten for every flipped byte.
    let limits = Limits {
        audit_preallocate_bytes: 8 << 10,
        ..Limits::default()
    };
    let dir = chain_with(20, &limits);
    let seg = only_segment(dir.path());
    let clean = std::fs::read(&seg).unwrap();
    let frames = frames(&clean);
    for (k, (start, end)) in frames.iter().enumerate() {
        // Every byte of a few records; a sample of the others.
        let positions: Vec<usize> = if k < 2 || k == frames.len() - 1 {
            (*start..*end).collect()
        } else {
            vec![*start, start + 5, start + 20, (start + end) / 2, end - 1]
        };
        for pos in positions {
            let mut buf = clean.clone();
            buf[pos] ^= 0x40;
            std::fs::write(&seg, &buf).unwrap();
            let (seq, reason) = problem_seq(dir.path());
            assert_eq!(
                seq,
                Some(k as u64 + 1),
                "flip at byte {pos} of record {}: {reason}",
                k + 1
            );
        }
    }
    std::fs::write(&seg, &clean).unwrap();
    assert!(verify(dir.path(), 2).unwrap().ok());
}

#[test]
fn a_removed_record_is_named() {
    let dir = chain_with(20, &Limits::default());
    let seg = only_segment(dir.path());
    let mut buf = std::fs::read(&seg).unwrap();
    let (start, end) = frames(&buf)[6];
    buf.drain(start..end);
    std::fs::write(&seg, &buf).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, Some(7));
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn reordered_records_are_named() {
    let dir = chain_with(20, &Limits::default());
    let seg = only_segment(dir.path());
    let buf = std::fs::read(&seg).unwrap();
    let f = frames(&buf);
    let (a, b) = (f[9], f[10]);
    let mut swapped = buf[..a.0].to_vec();
    swapped.extend_from_slice(&buf[b.0..b.1]);
    swapped.extend_from_slice(&buf[a.0..a.1]);
    swapped.extend_from_slice(&buf[b.1..]);
    std::fs::write(&seg, &swapped).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, Some(10));
    assert!(reason.contains("out of order"), "{reason}");
}

#[test]
fn a_cut_tail_is_detected_against_the_head() {
    let dir = chain_with(20, &Limits::default());
    let seg = only_segment(dir.path());
    let buf = std::fs::read(&seg).unwrap();
    let f = frames(&buf);
    // Cut cleanly at a record boundary: the rest of the chain is consistent.
    std::fs::write(&seg, &buf[..f[16].0]).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, Some(17));
    assert!(reason.contains("cut after record 16"), "{reason}");
    // yunqi refuses to append to it.
    let err = AuditChain::open(dir.path(), Arc::new(SystemClock), &Limits::default())
        .err()
        .expect("open must refuse a cut chain");
    assert!(err.detail.unwrap().contains("removed from the end"));
    // Cut in the middle of an acknowledged record.
    std::fs::write(&seg, &buf[..f[16].0 + 10]).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, Some(17));
    assert!(reason.contains("truncated"), "{reason}");
}

#[test]
fn a_forged_record_with_recomputed_hash_is_named() {
    let dir = chain_with(20, &Limits::default());
    let seg = only_segment(dir.path());
    let mut buf = std::fs::read(&seg).unwrap();
    let f = frames(&buf);
    // Change the principal of record 5 ("p5" → "p6"), recompute its hash and checksum.
    let (start, end) = f[4];
    let pos = buf[start..end].windows(2).position(|w| w == b"p5").unwrap() + start;
    buf[pos + 1] = b'6';
    reseal(&mut buf, (start, end));
    std::fs::write(&seg, &buf).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, Some(5), "{reason}");
    assert!(reason.contains("forged"), "{reason}");
    // Forging the next record's link too only moves the break one record on.
    let (s6, e6) = f[5];
    let prev_at = s6 + format::FRAME_PREFIX_BYTES + 18;
    let h5 = buf[end - 32..end].to_vec();
    buf[prev_at..prev_at + 32].copy_from_slice(&h5);
    reseal(&mut buf, (s6, e6));
    std::fs::write(&seg, &buf).unwrap();
    let (seq, _) = problem_seq(dir.path());
    assert_eq!(seq, Some(6));
}

#[test]
fn a_missing_head_is_reported() {
    let dir = chain_with(3, &Limits::default());
    std::fs::remove_file(dir.path().join("head")).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, None);
    assert!(reason.contains("head file is missing"));
}

#[test]
fn a_torn_unacknowledged_tail_is_cut_on_open() {
    let dir = chain_with(10, &Limits::default());
    let seg = only_segment(dir.path());
    let mut buf = std::fs::read(&seg).unwrap();
    let last = *frames(&buf).last().unwrap();
    // Half of a record that was never acknowledged (the head says 10), written over the
    // preallocated zeros after the last record, as a crash mid-write leaves it.
    let half: Vec<u8> = buf[last.0..last.0 + (last.1 - last.0) / 2].to_vec();
    buf[last.1..last.1 + half.len()].copy_from_slice(&half);
    std::fs::write(&seg, &buf).unwrap();
    let report = verify(dir.path(), 2).unwrap();
    assert!(report.ok() && report.torn_tail, "{report:?}");
    let chain = open(dir.path(), &Limits::default());
    assert_eq!(chain.append_blocking(event(11)).unwrap().seq, 11);
    chain.shutdown_blocking();
    let report = verify(dir.path(), 2).unwrap();
    assert!(
        report.ok() && !report.torn_tail && report.records == 11,
        "{report:?}"
    );
}

#[test]
fn segments_roll_and_a_missing_segment_is_named() {
    let limits = Limits {
        audit_segment_bytes_max: 2_000,
        ..Limits::default()
    };
    let dir = chain_with(200, &limits);
    let segs = yunqi_audit::chain::list_segments(dir.path()).unwrap();
    assert!(segs.len() > 5, "{} segments", segs.len());
    let report = verify(dir.path(), 2).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 200);
    // Reopening continues in the last segment and links across.
    let chain = open(dir.path(), &limits);
    assert_eq!(chain.append_blocking(event(201)).unwrap().seq, 201);
    chain.shutdown_blocking();
    assert!(verify(dir.path(), 2).unwrap().ok());
    let (first, path) = &segs[2];
    std::fs::remove_file(path).unwrap();
    let (seq, reason) = problem_seq(dir.path());
    assert_eq!(seq, Some(*first), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_dense_unique_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let chain = Arc::new(open(dir.path(), &Limits::default()));
    let mut tasks = Vec::new();
    for w in 0..64 {
        let chain = chain.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..50 {
                seqs.push(chain.append(event(w * 1000 + i)).await.unwrap().seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=3200).collect::<Vec<u64>>());
    let many = chain
        .append_many((0..10).map(event).collect())
        .await
        .unwrap();
    assert_eq!(many.seq, 3210);
    chain.shutdown().await;
    assert!(
        chain.append(event(1)).await.is_err(),
        "appends after shutdown fail"
    );
    let report = verify(dir.path(), 2).unwrap();
    assert!(report.ok() && report.records == 3210, "{report:?}");
}

#[test]
fn queries_filter_and_paginate_both_ways() {
    let limits = Limits {
        audit_segment_bytes_max: 3_000,
        ..Limits::default()
    };
    let dir = chain_with(100, &limits);
    let q = |f: AuditQuery| yunqi_audit::query::query(dir.path(), 100, &f).unwrap();
    // Ascending, paginated.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = q(AuditQuery {
            department: Some("transport".into()),
            after,
            limit: 7,
            ..Default::default()
        });
        seen.extend(page.records.iter().map(|r| r.seq));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, (2..=100).step_by(2).collect::<Vec<u64>>());
    // Descending with a prefix filter and an outcome.
    let page = q(AuditQuery {
        object: Some("department:d1*".into()),
        outcome: Some(Outcome::Denied),
        descending: true,
        limit: 100,
        ..Default::default()
    });
    let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![100, 15, 10]);
    assert_eq!(page.next, None);
    let page = q(AuditQuery {
        before: Some(4),
        descending: true,
        limit: 2,
        ..Default::default()
    });
    assert_eq!(
        page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![3, 2]
    );
    assert_eq!(page.next, Some(2));
    let r = &q(AuditQuery {
        after: Some(41),
        limit: 1,
        ..Default::default()
    })
    .records[0];
    assert_eq!(
        (r.seq, r.principal.as_str(), r.detail.as_str()),
        (42, "p0", "record number 42 审计")
    );
    // Only durable records are returned.
    let page = yunqi_audit::query::query(
        dir.path(),
        10,
        &AuditQuery {
            limit: 1000,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(page.records.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_segments_are_walked_in_two_halves_and_still_name_the_first_bad_record() {
    // Over 8 MiB in one segment: verification walks it from both ends of its middle.
    let dir = tempfile::tempdir().unwrap();
    let chain = open(dir.path(), &Limits::default());
    for batch in 0..12 {
        chain
            .append_many((0..4096).map(|i| event(batch * 4096 + i)).collect())
            .await
            .unwrap();
    }
    chain.shutdown().await;
    let report = verify(dir.path(), 2).unwrap();
    assert!(report.ok() && report.records == 12 * 4096, "{report:?}");
    let seg = only_segment(dir.path());
    let mut buf = std::fs::read(&seg).unwrap();
    assert!(buf.len() > 8 << 20);
    let f = frames(&buf);
    for k in [100usize, f.len() / 2 + 1, f.len() - 10] {
        let (start, end) = f[k];
        buf[(start + end) / 2] ^= 1;
        std::fs::write(&seg, &buf).unwrap();
        let (seq, reason) = problem_seq(dir.path());
        assert_eq!(seq, Some(k as u64 + 1), "{reason}");
        buf[(start + end) / 2] ^= 1;
    }
    std::fs::write(&seg, &buf).unwrap();
    assert!(verify(dir.path(), 2).unwrap().ok());
}

#[test]
fn fields_over_the_limit_are_cut_at_a_character_boundary() {
    let limits = Limits {
        audit_field_bytes_max: 10,
        ..Limits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let chain = open(dir.path(), &limits);
    let mut e = event(1);
    e.detail = "审计审计审计".into(); // 18 bytes: cut to 9 (three characters), not 10
    e.object = "x".repeat(100);
    chain.append_blocking(e).unwrap();
    chain.shutdown_blocking();
    let page = yunqi_audit::query::query(
        dir.path(),
        1,
        &AuditQuery {
            limit: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(page.records[0].detail, "审计审");
    assert_eq!(page.records[0].object, "x".repeat(10));
    assert!(verify(dir.path(), 1).unwrap().ok());
}
