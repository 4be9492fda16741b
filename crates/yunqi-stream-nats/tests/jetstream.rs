//! NatsLog against a real NATS server (2.15, started per test): the StreamLog contract, two
//! nodes appending to one stream, the server killed mid-append, and the server down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use yunqi_stream::{Retention, StreamLog};
use yunqi_stream_nats::server::NatsServer;
use yunqi_stream_nats::{NatsConfig, NatsLog, init};
use yunqi_types::{Clock, ErrorCode, SystemClock};

fn config(server: &NatsServer, prefix: &str) -> NatsConfig {
    NatsConfig {
        urls: server.url(),
        prefix: prefix.into(),
        ..NatsConfig::default()
    }
}

fn open(server: &NatsServer, prefix: &str) -> NatsLog {
    let c = config(server, prefix);
    init(&c).expect("init");
    NatsLog::open(c, Arc::new(SystemClock)).expect("open")
}

fn payload(i: u64) -> Vec<u8> {
    format!("entry-{i}").into_bytes()
}

/// Every entry of a stream, checked dense: (first, count, payload) in order.
fn all(log: &NatsLog, stream: &str) -> Vec<(u64, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = log.start_offset(stream);
    loop {
        let got = log.read(stream, from, 1 << 16).expect("read");
        if got.is_empty() {
            break;
        }
        for e in got {
            assert_eq!(e.first, from, "offsets are dense");
            from = e.end();
            out.push((e.first, e.count, e.payload));
        }
    }
    // A node's end may trail another node's appends by up to 50 ms (END_FRESH), never lead.
    assert!(log.end_offset(stream) <= from);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(from, log.end_offset(stream));
    out
}

/// Every acknowledged append `(first, tag)` is stored where its acknowledgement said, and no
/// entry is stored twice (a retried round is deduplicated by its message id); returns how
/// many entries are stored.
fn check_acknowledged(stored: &[(u64, u32, Vec<u8>)], acked: &[(u64, u64)]) -> usize {
    let by_first: std::collections::HashMap<u64, &Vec<u8>> =
        stored.iter().map(|(f, _, p)| (*f, p)).collect();
    for (first, tag) in acked {
        assert_eq!(
            by_first.get(first),
            Some(&&payload(*tag)),
            "acknowledged at {first}"
        );
    }
    let mut payloads: Vec<&Vec<u8>> = stored.iter().map(|(_, _, p)| p).collect();
    payloads.sort();
    let n = payloads.len();
    payloads.dedup();
    assert_eq!(payloads.len(), n, "no entry stored twice");
    n
}

#[test]
fn the_stream_log_contract_holds_on_jetstream() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open(&server, "t_contract");
    let s = "traffic.detections";
    assert_eq!(log.end_offset(s), 0);
    assert!(log.read(s, 0, 1024).unwrap().is_empty());
    let a = log.append_blocking(s, 3, b"abc".to_vec()).unwrap();
    assert_eq!((a.first, a.end), (0, 3));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let b = rt.block_on(log.append(s, 2, b"de".to_vec())).unwrap();
    assert_eq!((b.first, b.end), (3, 5));
    assert_eq!(log.end_offset(s), 5);
    // An entry holding `from` comes whole; the reader skips what it has seen.
    let e = log.read(s, 4, 1024).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].first, e[0].count, e[0].payload.as_slice()),
        (3, 2, &b"de"[..])
    );
    assert!(log.read(s, 5, 1024).unwrap().is_empty());
    // Group commit: concurrent appends are stored in few rounds, offsets still dense.
    let futures: Vec<_> = (0..200u64).map(|i| log.append(s, 1, payload(i))).collect();
    let done = rt.block_on(futures::future::join_all(futures));
    let mut firsts: Vec<u64> = done.iter().map(|r| r.as_ref().unwrap().first).collect();
    firsts.sort();
    assert_eq!(firsts, (5..205).collect::<Vec<_>>());
    let stats = log.stats();
    assert!(
        stats
            .group_commits
            .load(std::sync::atomic::Ordering::Relaxed)
            < 202,
        "appends were grouped"
    );
    let entries = all(&log, s);
    assert_eq!(entries.len(), 202);
    // At least one entry larger than max_bytes comes back.
    assert_eq!(log.read(s, 0, 1).unwrap().len(), 1);
    // Appended-at never decreases.
    let mut at = i64::MIN;
    for e in log.read(s, 0, usize::MAX).unwrap() {
        assert!(e.appended_at_us >= at);
        at = e.appended_at_us;
    }
    // Consumer offsets.
    assert_eq!(log.committed_offset(s, "view.a").unwrap(), None);
    log.commit_offset(s, "view.a", 100).unwrap();
    log.commit_offset(s, "view.a", 150).unwrap();
    assert_eq!(log.committed_offset(s, "view.a").unwrap(), Some(150));
    assert!(log.commit_offset("Bad/Name", "x", 1).is_err());
    // A second log (another node, or this one restarted) sees the same stream.
    let other = open(&server, "t_contract");
    assert_eq!(other.end_offset(s), 205);
    assert_eq!(all(&other, s), entries);
    assert_eq!(other.committed_offset(s, "view.a").unwrap(), Some(150));
    // Another prefix is another cluster.
    let elsewhere = open(&server, "t_elsewhere");
    assert_eq!(elsewhere.end_offset(s), 0);
    // Oversized entries are refused with a hint, before anything is sent.
    let big = vec![0u8; log.entry_bytes_max() + 1];
    let e = log.append_blocking(s, 1, big).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(e.hint.is_some());
    rt.block_on(log.shutdown());
    let e = log.append_blocking(s, 1, b"late".to_vec()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable);
}

#[test]
fn retention_removes_old_rounds_but_never_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open(&server, "t_retention");
    let s = "air.quality";
    for i in 0..5 {
        log.append_blocking(s, 10, payload(i)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(20));
    let now = SystemClock.now().timestamp_micros();
    let r = log
        .apply_retention(
            s,
            &Retention {
                max_age: Some(Duration::from_millis(1)),
                max_bytes: None,
            },
            now,
        )
        .unwrap();
    // Everything is old, yet the last round stays: the stream's end lives in it.
    assert_eq!(r.start_offset, 40);
    assert!(r.segments_removed >= 5, "{r:?}");
    assert_eq!(log.start_offset(s), 40);
    assert_eq!(log.end_offset(s), 50);
    let e = log.read(s, 0, 1024).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].first, 40);
    let a = log.append_blocking(s, 1, b"more".to_vec()).unwrap();
    assert_eq!(a.first, 50);
    // Nothing old: nothing removed.
    let r = log
        .apply_retention(
            s,
            &Retention {
                max_age: Some(Duration::from_secs(3600)),
                max_bytes: None,
            },
            SystemClock.now().timestamp_micros(),
        )
        .unwrap();
    assert_eq!((r.segments_removed, r.start_offset), (0, 40));
}

#[test]
fn two_nodes_appending_to_one_stream_keep_offsets_dense() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let a = Arc::new(open(&server, "t_race"));
    let b = Arc::new(open(&server, "t_race"));
    let s = "parking.events";
    let mut threads = Vec::new();
    for (node, log) in [(0u64, a.clone()), (1, b.clone())] {
        for t in 0..2u64 {
            let log = log.clone();
            threads.push(std::thread::spawn(move || {
                let mut got = Vec::new();
                for i in 0..150u64 {
                    let tag = node * 1_000_000 + t * 1_000 + i;
                    let count = (i % 3 + 1) as u32;
                    let r = log.append_blocking(s, count, payload(tag)).unwrap();
                    assert_eq!(r.end - r.first, u64::from(count));
                    got.push((r.first, tag));
                }
                got
            }));
        }
    }
    let mut acknowledged: Vec<(u64, u64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    acknowledged.sort();
    let stored = all(&a, s);
    assert_eq!(stored.len(), 600, "each append stored once");
    // Every acknowledged append is where its acknowledgement said, with its own payload.
    for ((first, tag), (sf, _, p)) in acknowledged.iter().zip(&stored) {
        assert_eq!(first, sf);
        assert_eq!(p, &payload(*tag));
    }
    assert_eq!(all(&b, s), stored);
}

#[test]
fn a_fenced_append_fails_once_another_writer_appended() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let a = open(&server, "t_fence");
    let b = open(&server, "t_fence");
    let s = "serve.police.permit";
    let block = |f: yunqi_stream::BoxFuture<'_, _>| futures::executor::block_on(f);
    // The owner appends where it knows the log ends.
    let r = block(a.append_expecting(s, 2, payload(1), 0)).unwrap();
    assert_eq!((r.first, r.end), (0, 2));
    let r = block(a.append_expecting(s, 1, payload(2), 2)).unwrap();
    assert_eq!((r.first, r.end), (2, 3));
    // A successor that read the log to 3 appends; the deposed owner, still believing the log
    // ends at 3, is refused and nothing of it is stored.
    block(b.append_expecting(s, 1, payload(3), 3)).unwrap();
    let e = block(a.append_expecting(s, 1, payload(4), 3)).unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.detail.as_deref(), Some(yunqi_stream::DEPOSED));
    // Unfenced appends are not held up by a refused one queued before them.
    let r = block(a.append(s, 1, payload(5))).unwrap();
    assert_eq!(r.first, 4);
    let stored = all(&a, s);
    assert_eq!(
        stored.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>(),
        vec![payload(1), payload(2), payload(3), payload(5)]
    );
}

#[test]
fn a_killed_server_loses_nothing_acknowledged_and_a_stopped_one_gives_503s() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path());
    let c = NatsConfig {
        unavailable_after: Duration::from_secs(2),
        ..config(&server, "t_faults")
    };
    init(&c).unwrap();
    let log = Arc::new(NatsLog::open(c, Arc::new(SystemClock)).unwrap());
    let s = "bus.positions";
    // Writers append while the server is killed twice and restarted.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut failed = 0u64;
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tag = w * 1_000_000 + i;
                    match log.append_blocking(s, 1, payload(tag)) {
                        Ok(r) => acked.push((r.first, tag)),
                        Err(e) => {
                            assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                            assert!(e.hint.is_some());
                            failed += 1;
                        }
                    }
                    i += 1;
                }
                (acked, failed)
            })
        })
        .collect();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        server.kill();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = 0;
    for w in writers {
        let (a, f) = w.join().unwrap();
        acked.extend(a);
        failed += f;
    }
    eprintln!("acknowledged {}, failed {failed}", acked.len());
    assert!(!acked.is_empty());
    let stored = all(&log, s);
    let n = check_acknowledged(&stored, &acked);
    eprintln!("stored {n}");

    // Stopped: appends fail within the configured time with 503 and a hint; reads too.
    server.stop();
    let began = Instant::now();
    let e = log
        .append_blocking(s, 1, b"while down".to_vec())
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("cannot be reached"), "{e:?}");
    assert!(
        !format!("{e:?}").contains("127.0.0.1"),
        "no server address shown: {e:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(10));
    assert_eq!(log.read(s, 0, 10).unwrap_err().code, ErrorCode::Unavailable);
    // The end is still what this node knew.
    assert!(log.end_offset(s) >= stored.len() as u64);
    // Back: appends resume without reopening the log.
    server.restart();
    let began = Instant::now();
    let r = loop {
        match log.append_blocking(s, 1, b"after".to_vec()) {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable);
                assert!(began.elapsed() < Duration::from_secs(20), "did not resume");
            }
        }
    };
    let end = stored
        .last()
        .map(|(f, c, _)| f + u64::from(*c))
        .unwrap_or(0);
    assert!(r.first >= end, "{} after {end}", r.first);
    let e = all(&log, s);
    assert_eq!(e.last().unwrap().2, b"after".to_vec());
}

#[test]
fn open_refuses_an_engine_not_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let e = NatsLog::open(config(&server, "t_unprepared"), Arc::new(SystemClock))
        .err()
        .expect("refused");
    assert_eq!(
        e.hint.as_deref(),
        Some("run `yunqi cluster init` once against these engines")
    );
    let report = init(&config(&server, "t_unprepared")).unwrap();
    assert!(report.created_offsets_bucket);
    assert!(report.server_version.starts_with("2."));
    let again = init(&config(&server, "t_unprepared")).unwrap();
    assert!(!again.created_offsets_bucket, "init is idempotent");
    let e = NatsLog::open(
        NatsConfig {
            urls: "nats://127.0.0.1:1".into(),
            request_timeout: Duration::from_millis(300),
            ..NatsConfig::default()
        },
        Arc::new(SystemClock),
    )
    .err()
    .expect("refused");
    assert_eq!(e.code, ErrorCode::Unavailable);
}

/// Three NATS servers, R3 streams: each server in turn is killed with SIGKILL while three
/// writers append, then restarted; every acknowledged append is stored once where its
/// acknowledgement said, offsets stay dense.
#[test]
fn r3_streams_lose_nothing_acknowledged_when_a_server_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = yunqi_stream_nats::server::NatsCluster::start(dir.path(), 3);
    let c = NatsConfig {
        urls: cluster.urls(),
        prefix: "t_r3".into(),
        replicas: 3,
        unavailable_after: Duration::from_secs(3),
        ..NatsConfig::default()
    };
    // The cluster elects its JetStream leader first.
    let began = Instant::now();
    while let Err(e) = init(&c) {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no JetStream cluster: {e:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = Arc::new(NatsLog::open(c, Arc::new(SystemClock)).unwrap());
    let s = "emergency.calls";
    // The stream is made (R3) before the faults begin.
    let began = Instant::now();
    while log.append_blocking(s, 1, b"first".to_vec()).is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "the R3 stream was not created"
        );
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tag = w * 1_000_000 + i;
                    if let Ok(r) = log.append_blocking(s, 2, payload(tag)) {
                        acked.push((r.first, tag));
                    }
                    i += 1;
                }
                acked
            })
        })
        .collect();
    for victim in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        cluster.servers[victim].kill();
        std::thread::sleep(Duration::from_millis(1500));
        cluster.servers[victim].restart();
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<(u64, u64)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    eprintln!("acknowledged {} appends across three kills", acked.len());
    assert!(!acked.is_empty());
    let began = Instant::now();
    let stored = loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| all(&log, s))) {
            Ok(v) => break v,
            Err(_) => {
                assert!(
                    began.elapsed() < Duration::from_secs(60),
                    "the stream stayed unreadable"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    };
    check_acknowledged(&stored, &acked);
}
