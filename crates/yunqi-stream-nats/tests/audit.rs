//! A node's audit chain on a real NATS server (2.15, started per test): concurrent appends get
//! dense receipts and the chain verifies; reads page both ways; a restarted node continues its
//! chain; the server killed under load loses nothing acknowledged and forks nothing; a second
//! process under the same node name is refused; a removed round is named by the verifier.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use yunqi_audit::format::Hash;
use yunqi_audit::{AuditLog, AuditQuery, Receipt};
use yunqi_stream_nats::audit::{chain_stream, verify_chains};
use yunqi_stream_nats::server::NatsServer;
use yunqi_stream_nats::{NatsAudit, NatsConfig, init};
use yunqi_types::{AuditEvent, ErrorCode, Limits, SystemClock};

fn config(server: &NatsServer, prefix: &str) -> NatsConfig {
    NatsConfig {
        urls: server.url(),
        prefix: prefix.into(),
        unavailable_after: Duration::from_secs(2),
        ..NatsConfig::default()
    }
}

fn open(c: &NatsConfig, node: &str) -> NatsAudit {
    init(c).expect("init");
    NatsAudit::open(c.clone(), node, Arc::new(SystemClock), &Limits::default()).expect("open")
}

fn event(action: &str, i: u64) -> AuditEvent {
    AuditEvent {
        principal: format!("p{}", i % 3),
        action: action.into(),
        object: format!("thing:{i}"),
        detail: format!("event {i}"),
        ..Default::default()
    }
}

fn verified(c: &NatsConfig, node: &str) -> (u64, Hash) {
    let reports = verify_chains(c, &HashMap::new()).expect("verify");
    let r = reports
        .iter()
        .find(|r| r.node == node)
        .expect("the node's chain");
    assert_eq!(r.check.problem, None, "the chain verifies");
    (r.check.last_seq, r.check.last_hash)
}

#[test]
fn appends_are_dense_durable_readable_and_continue_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let c = config(&server, "t_audit");
    let audit = Arc::new(open(&c, "node-a"));
    assert_eq!(audit.durable_head().seq, 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // 16 writers, 40 appends each, every fifth a batch of 3 records.
    let receipts: Vec<(u64, Receipt, usize)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..16u64 {
            let audit = audit.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..40u64 {
                    let n = if i % 5 == 0 { 3 } else { 1 };
                    let events = (0..n)
                        .map(|k| event("test.write", w * 1000 + i * 10 + k))
                        .collect();
                    out.push((w, audit.append(events).await.expect("append"), n as usize));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let total: u64 = receipts.iter().map(|r| r.2 as u64).sum();
    let mut seqs: Vec<u64> = receipts.iter().map(|r| r.1.seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), receipts.len(), "one receipt per append");
    assert_eq!(audit.durable_head().seq, total);
    let rounds = audit
        .stats()
        .group_commits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        rounds < receipts.len() as u64,
        "appends share rounds ({rounds})"
    );

    // What verification reads is what the receipts said.
    let (last, hash) = verified(&c, "node-a");
    assert_eq!((last, hash), (total, audit.durable_head().hash));
    let page = audit
        .query(&AuditQuery {
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.records.len() as u64, total);
    let by_seq: HashMap<u64, Hash> = page.records.iter().map(|r| (r.seq, r.hash)).collect();
    for (_, r, _) in &receipts {
        assert_eq!(by_seq[&r.seq], r.hash);
    }

    // Pages ascending and descending, with a filter.
    let mut after = None;
    let mut asc = Vec::new();
    loop {
        let p = audit
            .query(&AuditQuery {
                principal: Some("p1".into()),
                after,
                limit: 37,
                node: Some("node-a".into()),
                ..Default::default()
            })
            .unwrap();
        asc.extend(p.records.iter().map(|r| r.seq));
        match p.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<u64> = page
        .records
        .iter()
        .filter(|r| r.principal == "p1")
        .map(|r| r.seq)
        .collect();
    assert_eq!(asc, expected);
    let desc = audit
        .query(&AuditQuery {
            descending: true,
            before: Some(total - 5),
            limit: 4,
            node: Some("node-a".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        desc.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![total - 6, total - 7, total - 8, total - 9]
    );
    assert_eq!(desc.next, Some(total - 9));

    // Another node's chain is read by name; an unknown node is not found.
    let b = open(&c, "node-b");
    rt.block_on(b.append(vec![event("test.b", 1)])).unwrap();
    let from_a = audit
        .query(&AuditQuery {
            node: Some("node-b".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(from_a.records.len(), 1);
    assert_eq!(from_a.records[0].action, "test.b");
    let e = audit
        .query(&AuditQuery {
            node: Some("node-z".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    // Without a node: every node's records merged in time order, paged by cursor, both ways.
    rt.block_on(b.append(vec![event("test.b", 2)])).unwrap();
    let merged = |descending: bool| {
        let mut cursor = None;
        let mut out = Vec::new();
        loop {
            let p = audit
                .query(&AuditQuery {
                    limit: 50,
                    descending,
                    cursor: cursor.clone(),
                    ..Default::default()
                })
                .unwrap();
            out.extend(
                p.records
                    .iter()
                    .map(|r| (r.time, r.node.clone().unwrap(), r.seq)),
            );
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        out
    };
    let asc = merged(false);
    assert_eq!(asc.len() as u64, total + 2);
    assert!(
        asc.windows(2).all(|w| w[0] < w[1]),
        "in time order, each once"
    );
    assert_eq!(asc.last().unwrap().1, "node-b");
    let mut desc = merged(true);
    desc.reverse();
    assert_eq!(desc, asc);
    let e = audit
        .query(&AuditQuery {
            after: Some(3),
            limit: 10,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput, "{e:?}");
    let heads = audit.heads().unwrap();
    assert_eq!(
        heads
            .iter()
            .map(|h| (h.node.as_str(), h.seq))
            .collect::<Vec<_>>(),
        vec![("node-a", total), ("node-b", 2)]
    );

    // A restart continues the chain where it ended.
    rt.block_on(audit.shutdown());
    assert!(rt.block_on(audit.append(vec![event("late", 0)])).is_err());
    drop(audit);
    let again = open(&c, "node-a");
    assert_eq!(again.durable_head().seq, total);
    let r = rt
        .block_on(again.append(vec![event("test.after", 0)]))
        .unwrap();
    assert_eq!(r.seq, total + 1);
    assert_eq!(verified(&c, "node-a").0, total + 1);
}

#[test]
fn the_server_killed_under_load_loses_nothing_acknowledged_and_forks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path());
    let c = config(&server, "t_audit_kill");
    let audit = Arc::new(open(&c, "node-a"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (audit, stop) = (audit.clone(), stop.clone());
            rt.spawn(async move {
                let (mut ok, mut failed) = (Vec::new(), 0u64);
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    match audit
                        .append(vec![event("test.load", w * 100_000 + i)])
                        .await
                    {
                        Ok(r) => ok.push(r),
                        Err(e) => {
                            assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        server.kill();
        std::thread::sleep(Duration::from_millis(2500));
        server.restart();
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = 0;
    for w in writers {
        let (ok, f) = rt.block_on(w).unwrap();
        acked.extend(ok);
        failed += f;
    }
    assert!(failed > 0, "appends failed while the server was down");
    // After the outages appends work again, and the chain is one chain.
    let r = rt
        .block_on(audit.append(vec![event("test.after", 0)]))
        .unwrap();
    let (last, _) = verified(&c, "node-a");
    assert_eq!(last, r.seq);
    let page = audit
        .query(&AuditQuery {
            limit: 1_000_000,
            ..Default::default()
        })
        .unwrap();
    let by_seq: HashMap<u64, Hash> = page.records.iter().map(|r| (r.seq, r.hash)).collect();
    for a in &acked {
        assert_eq!(
            by_seq.get(&a.seq),
            Some(&a.hash),
            "acknowledged record {} kept",
            a.seq
        );
    }
}

#[test]
fn a_second_process_under_the_same_name_is_refused_and_a_removed_round_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let c = config(&server, "t_audit_twice");
    let a = open(&c, "node-a");
    let b = open(&c, "node-a");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for i in 0..5 {
        rt.block_on(a.append(vec![event("test.a", i)])).unwrap();
    }
    let e = rt.block_on(b.append(vec![event("test.b", 0)])).unwrap_err();
    assert!(e.message.contains("written by another process"), "{e:?}");
    assert!(
        rt.block_on(b.append(vec![event("test.b", 1)])).is_err(),
        "refused from then on"
    );
    assert_eq!(verified(&c, "node-a").0, 5);

    // Remove round 3 (records 2 and on are each a round here): the verifier names record 2.
    rt.block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let s = js
            .get_stream(chain_stream("t_audit_twice", "node-a"))
            .await
            .unwrap();
        s.delete_message(3).await.unwrap();
    });
    let reports = verify_chains(&c, &HashMap::new()).unwrap();
    let (seq, why) = reports[0].check.problem.clone().expect("a problem");
    assert_eq!(seq, 2, "{why}");
    assert!(why.contains("record 2 is missing"), "{why}");
}
