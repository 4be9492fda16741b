//! Audit witnesses over the real binary: a server writes signed checkpoints of its chain to a
//! directory outside its data directory and to an HTTP endpoint, each stamped by a local
//! RFC 3161 time-stamp authority (OpenSSL's `ts`, behind a small HTTP front), and at shutdown.
//! Then a forger with write access to the data directory rewrites one record consistently
//! (every later hash, checksum and the head recomputed) — the chain verifies by itself, but
//! not against the witness, which names the record — and another cuts whole records off the
//! end, which the witness catches too.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{BIN, Server};
use yunqi_audit::Checkpoint;
use yunqi_audit::format::{self, Hash};
use yunqi_types::AuditEvent;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A tiny HTTP server: POST /cp records checkpoints; POST /tsa answers time-stamp requests
/// with `openssl ts -reply`.
fn endpoints(tsa_dir: PathBuf) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for (n, s) in l.incoming().flatten().enumerate() {
            let (g, tsa_dir) = (g.clone(), tsa_dir.clone());
            std::thread::spawn(move || {
                let mut out = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut k = 0;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        let h = h.trim_end().to_ascii_lowercase();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let (ct, answer) = if path == "/tsa" {
                        k += 1;
                        let q = tsa_dir.join(format!("q{n}-{k}.tsq"));
                        let a = tsa_dir.join(format!("q{n}-{k}.tsr"));
                        std::fs::write(&q, &body).unwrap();
                        let st = Command::new("openssl")
                            .args(["ts", "-reply", "-config"])
                            .arg(tsa_dir.join("tsa.cnf"))
                            .arg("-queryfile")
                            .arg(&q)
                            .arg("-out")
                            .arg(&a)
                            .output()
                            .unwrap();
                        assert!(
                            st.status.success(),
                            "{}",
                            String::from_utf8_lossy(&st.stderr)
                        );
                        ("application/timestamp-reply", std::fs::read(&a).unwrap())
                    } else {
                        g.lock().unwrap().push(String::from_utf8(body).unwrap());
                        ("text/plain", Vec::new())
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    out.write_all(head.as_bytes()).unwrap();
                    out.write_all(&answer).unwrap();
                }
            });
        }
    });
    (port, got)
}

/// A time-stamp authority's key, certificate and OpenSSL configuration in `dir`.
fn make_tsa(dir: &Path) {
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=yunqi test TSA"])
        .args(["-addext", "extendedKeyUsage=critical,timeStamping"])
        .arg("-keyout")
        .arg(dir.join("tsa.key"))
        .arg("-out")
        .arg(dir.join("tsa.crt"))
        .output()
        .expect("openssl (installed by scripts/services.sh)");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::write(dir.join("tsaserial"), "01\n").unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("tsa.cnf"),
        format!(
            "[ tsa ]\ndefault_tsa = tsa1\n[ tsa1 ]\nserial = {d}/tsaserial\ncrypto_device = builtin\n\
             signer_cert = {d}/tsa.crt\nsigner_key = {d}/tsa.key\nsigner_digest = sha256\n\
             default_policy = 1.2.3.4.1\ndigests = sha256\naccuracy = secs:1\nordering = no\n\
             tsa_name = no\ness_cert_id_chain = no\ness_cert_id_alg = sha256\n"
        ),
    )
    .unwrap();
}

fn verify(data: &Path, witness: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data"])
        .arg(data)
        .arg("--witness")
        .arg(witness)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn verify_alone(data: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data"])
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Every record of the chain in `audit`, by segment: (segment path, its length, records).
type Segments = Vec<(PathBuf, usize, Vec<format::AuditRecord>)>;

fn read_chain(audit: &Path) -> Segments {
    let mut out = Vec::new();
    for (_, path) in yunqi_audit::chain::list_segments(audit).unwrap() {
        let buf = std::fs::read(&path).unwrap();
        let mut offset = format::SEGMENT_HEADER_BYTES;
        let mut records = Vec::new();
        while offset < buf.len() {
            let Ok(frame) = format::read_frame(&buf, offset) else {
                break;
            };
            records.push(format::decode_record(&frame).unwrap());
            offset = frame.end;
        }
        out.push((path, buf.len(), records));
    }
    out
}

/// Writes `segments` back as a forger would: every hash, checksum and the head recomputed.
fn forge(audit: &Path, segments: &Segments) {
    let mut prev: Hash = [0u8; 32];
    let mut last = 0;
    let first_prev = segments[0].2[0].prev_hash;
    prev.copy_from_slice(&first_prev);
    for (path, len, records) in segments {
        let first = records.first().map_or(last + 1, |r| r.seq);
        let mut buf = format::segment_header(first).to_vec();
        for r in records {
            let e = AuditEvent {
                principal: r.principal.clone(),
                department: r.department.clone(),
                action: r.action.clone(),
                object: r.object.clone(),
                outcome: Some(r.outcome),
                purpose: r.purpose.clone(),
                detail: r.detail.clone(),
                request_id: r.request_id.clone(),
            };
            prev = format::encode_record(
                &mut buf,
                r.seq,
                r.time.timestamp_micros(),
                &prev,
                &e,
                usize::MAX,
            );
            last = r.seq;
        }
        buf.resize(buf.len().max(*len), 0);
        std::fs::write(path, &buf).unwrap();
    }
    std::fs::write(audit.join("head"), format::encode_head(last, &prev)).unwrap();
}

#[test]
fn audit_witnesses_catch_a_consistent_rewrite_and_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (data, outside, tsa_dir) = (
        dir.path().join("data"),
        dir.path().join("witness"),
        dir.path().join("tsa"),
    );
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&tsa_dir).unwrap();
    make_tsa(&tsa_dir);
    let (port, posted) = endpoints(tsa_dir.clone());

    // A witness inside the data directory is refused.
    std::fs::create_dir_all(&data).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(&data)
        .args([
            "--http",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
            "--audit-witness",
        ])
        .arg(data.join("w.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inside the data directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cp_url = format!("http://127.0.0.1:{port}/cp");
    let tsa_url = format!("http://127.0.0.1:{port}/tsa");
    let witness_arg = outside.display().to_string();
    let args = [
        "--audit-witness",
        &witness_arg,
        "--audit-witness",
        &cp_url,
        "--audit-tsa",
        &tsa_url,
        "--audit-checkpoint-secs",
        "1",
        "--audit-checkpoint-records",
        "25",
    ];
    let mut s = Server::start_with(&data, &args);
    let file = outside.join(yunqi_audit::witness::WITNESS_FILE);
    for (round, want) in [(0, 1), (1, 2)] {
        for i in 0..40 {
            s.dept(&format!("dept{round}_{i}"));
        }
        let t = Instant::now();
        while yunqi_audit::witness::read_checkpoints(&file).map_or(0, |c| c.len()) < want {
            assert!(t.elapsed() < Duration::from_secs(20), "no checkpoints");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (status, metrics) = s.call("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let m = metrics.as_str().unwrap_or_default().to_string();
    assert!(m.contains("yunqi_audit_witness_checkpoints_total"), "{m}");
    assert_eq!(s.terminate(), Some(0));

    // The last checkpoint is of the last record, made at shutdown; each is signed and stamped.
    let cps = yunqi_audit::witness::read_checkpoints(&file).unwrap();
    let head = yunqi_audit::chain::read_head(&data.join("audit"))
        .unwrap()
        .unwrap();
    let last = cps.last().unwrap();
    assert_eq!((last.seq, last.hash.clone()), (head.0, hex::encode(head.1)));
    for (a, b) in cps.iter().zip(cps.iter().skip(1)) {
        assert_eq!(b.from, a.seq + 1, "digests cover every record once");
    }
    assert!(cps.iter().all(Checkpoint::signature_ok));
    let mut forged = last.clone();
    forged.seq += 1;
    assert!(
        !forged.signature_ok(),
        "a changed checkpoint fails its signature"
    );
    // The HTTP witness got the same checkpoints.
    let t = Instant::now();
    while posted.lock().unwrap().len() < cps.len() {
        assert!(t.elapsed() < Duration::from_secs(10), "HTTP witness behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    let over_http: Vec<Checkpoint> = posted
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(over_http, cps);
    // The time stamp is the TSA's, over this checkpoint: OpenSSL's own verifier says so.
    let der = B64.decode(last.tsa.as_ref().expect("stamped")).unwrap();
    let resp = tsa_dir.join("last.tsr");
    std::fs::write(&resp, der).unwrap();
    let v = Command::new("openssl")
        .args(["ts", "-verify", "-in"])
        .arg(&resp)
        .args(["-digest", &hex::encode(last.imprint()), "-CAfile"])
        .arg(tsa_dir.join("tsa.crt"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert!(
        v.status.success() && said.contains("Verification: OK"),
        "{said}"
    );
    let v = Command::new("openssl")
        .args(["ts", "-verify", "-in"])
        .arg(&resp)
        .args(["-digest", &hex::encode([7u8; 32]), "-CAfile"])
        .arg(tsa_dir.join("tsa.crt"))
        .output()
        .unwrap();
    assert!(
        !v.status.success(),
        "another digest is not what was stamped"
    );

    let (code, out) = verify(&data, &outside);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("witnessed: OK"), "{out}");
    assert!(
        out.contains(&format!("{} time-stamped", cps.len())),
        "{out}"
    );

    // A consistent rewrite of record 12: the chain verifies by itself, not against the witness.
    let audit = data.join("audit");
    let pristine = dir.path().join("pristine");
    copy_dir(&audit, &pristine);
    let mut segments = read_chain(&audit);
    let target = 12u64;
    for (_, _, records) in segments.iter_mut() {
        for r in records.iter_mut() {
            if r.seq == target {
                assert_ne!(r.detail, "nothing happened here");
                r.detail = "nothing happened here".into();
            }
        }
    }
    forge(&audit, &segments);
    let (code, out) = verify_alone(&data);
    assert_eq!(code, 0, "the forger's chain is self-consistent: {out}");
    let (code, out) = verify(&data, &outside);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("first touched record: 12"), "{out}");
    assert!(out.contains("rewritten"), "{out}");

    // Whole records cut off the end (head rewritten): caught, named.
    std::fs::remove_dir_all(&audit).unwrap();
    copy_dir(&pristine, &audit);
    let mut segments = read_chain(&audit);
    let keep = head.0 - 5;
    for (_, _, records) in segments.iter_mut() {
        records.retain(|r| r.seq <= keep);
    }
    segments.retain(|(_, _, r)| !r.is_empty());
    forge(&audit, &segments);
    // Files of segments that held only cut records go too, as a forger would remove them.
    for (_, path) in yunqi_audit::chain::list_segments(&audit).unwrap() {
        if !segments.iter().any(|(p, _, _)| *p == path) {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (code, out) = verify_alone(&data);
    assert_eq!(code, 0, "the cut chain is self-consistent: {out}");
    let (code, out) = verify(&data, &outside);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("first touched record: {}", keep + 1)),
        "{out}"
    );
    assert!(out.contains("cut"), "{out}");

    // A witness line altered: its signature fails, said so.
    std::fs::remove_dir_all(&audit).unwrap();
    copy_dir(&pristine, &audit);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<Checkpoint> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[0].hash = hex::encode([1u8; 32]);
    let altered = dir.path().join("altered.jsonl");
    std::fs::write(
        &altered,
        lines
            .iter()
            .map(|c| serde_json::to_string(c).unwrap() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let (code, out) = verify(&data, &altered);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not signed by its key"), "{out}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
