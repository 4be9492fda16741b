//! The HTTP API and the CLI against the real binary: identity flows, bad input, authentication
//! and authorisation failures (each a clear 4xx, nothing written, the denial audited), the data
//! directory lock, graceful shutdown, OpenAPI and metrics.

mod common;

use common::{BIN, Server, cli};
use serde_json::{Value, json};

/// One HTTP boundary case: the request and what must come back.
struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    token: Tok,
    body: Option<String>,
    status: u16,
    code: &'static str,
    message: &'static str,
}

#[derive(Clone, Copy)]
enum Tok {
    None,
    Admin,
    Steward,
    Analyst,
    Raw(&'static str),
}

fn check(server: &Server, tokens: &[(Tok, String)], case: &Case) {
    let token = match case.token {
        Tok::None => None,
        Tok::Raw(t) => Some(t.to_string()),
        t => tokens
            .iter()
            .find(|(k, _)| std::mem::discriminant(k) == std::mem::discriminant(&t))
            .map(|(_, v)| v.clone()),
    };
    let (status, v) = match &case.body {
        // One byte over the limit, so that the server has read it all when it answers.
        Some(b) if b.len() > 1 << 20 => common::post_over_limit(
            &server.url,
            case.path,
            token.as_deref().unwrap_or(""),
            (1 << 20) + 1,
        ),
        _ => server.call(
            case.method,
            case.path,
            token.as_deref(),
            case.body.as_deref(),
        ),
    };
    assert_eq!(status, case.status, "{}: {v}", case.what);
    let e = &v["error"];
    assert_eq!(e["code"], case.code, "{}: {v}", case.what);
    let message = e["message"].as_str().unwrap_or("");
    assert!(
        message.contains(case.message),
        "{}: message {message:?} lacks {:?}",
        case.what,
        case.message
    );
    assert!(
        e["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{}: no hint in {v}",
        case.what
    );
    assert!(
        e["request_id"].as_str().is_some_and(|r| r.len() == 16),
        "{}: no request id",
        case.what
    );
}

#[test]
fn identity_flows_and_every_bad_input_is_a_clear_4xx_that_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.dept("transport");
    server.dept("traffic");
    let steward = server.principal("sam", "steward", Some("transport"));
    let analyst = server.principal("ann", "analyst", Some("traffic"));
    let tokens = vec![
        (Tok::Admin, server.admin_token.clone()),
        (Tok::Steward, steward.clone()),
        (Tok::Analyst, analyst.clone()),
    ];

    // The steward creates an analyst in its own department and manages its tokens.
    let (status, v) = server.call(
        "POST",
        "/api/v1/principals",
        Some(&steward),
        Some(
            r#"{"name":"tom","role":"analyst","department":"transport","display_name":"Tom 汤姆"}"#,
        ),
    );
    assert_eq!(status, 201, "{v}");
    let tom_token = v["token"]["token"].as_str().unwrap().to_string();
    assert_eq!(v["principal"]["display_name"], "Tom 汤姆");
    let (status, v) = server.call("GET", "/api/v1/whoami", Some(&tom_token), None);
    assert_eq!(
        (status, v["principal"]["name"].as_str()),
        (200, Some("tom"))
    );
    let (status, v) = server.call("GET", "/api/v1/principals", Some(&steward), None);
    assert_eq!(status, 200);
    let names: Vec<&str> = v["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["sam", "tom"],
        "a steward sees its department only"
    );

    let long_title = format!(r#"{{"name":"longtitle","title":"{}"}}"#, "x".repeat(300));
    let huge = format!(r#"{{"name":"huge","title":"{}"}}"#, "x".repeat(2 << 20));
    let cases = [
        Case {
            what: "malformed JSON",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(r#"{"name": "#.into()),
            status: 400,
            code: "invalid_input",
            message: "not valid JSON",
        },
        Case {
            what: "wrong type",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(r#"{"name": 42}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "expected fields",
        },
        Case {
            what: "unknown field",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(r#"{"name": "health", "owner": "x"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "expected fields",
        },
        Case {
            what: "missing field",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Admin,
            body: Some(r#"{"name": "zed"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "expected fields",
        },
        Case {
            what: "oversized body",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(huge),
            status: 413,
            code: "limit_exceeded",
            message: "too large",
        },
        Case {
            what: "bad department name",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(r#"{"name": "Health-Insurance"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "invalid department name",
        },
        Case {
            what: "reserved name",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(r#"{"name": "select"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "invalid department name",
        },
        Case {
            what: "title too long",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(long_title),
            status: 400,
            code: "invalid_input",
            message: "title is too long",
        },
        Case {
            what: "bad role",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Admin,
            body: Some(r#"{"name": "zed", "role": "root"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "invalid role",
        },
        Case {
            what: "analyst without department",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Admin,
            body: Some(r#"{"name": "zed", "role": "analyst"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "needs a department",
        },
        Case {
            what: "citizen with bad ID number",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Admin,
            body: Some(
                r#"{"name": "zed", "role": "citizen", "id_number": "110105194912310021"}"#.into(),
            ),
            status: 400,
            code: "invalid_input",
            message: "invalid national ID number",
        },
        Case {
            what: "unknown department",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Admin,
            body: Some(r#"{"name": "zed", "role": "analyst", "department": "trafic"}"#.into()),
            status: 404,
            code: "not_found",
            message: "department \"trafic\" does not exist",
        },
        Case {
            what: "duplicate department",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: Some(r#"{"name": "transport"}"#.into()),
            status: 409,
            code: "already_exists",
            message: "already exists",
        },
        Case {
            what: "token expiry in the past",
            method: "POST",
            path: "/api/v1/principals/tom/tokens",
            token: Tok::Admin,
            body: Some(r#"{"expires_at": "2020-01-01T00:00:00Z"}"#.into()),
            status: 400,
            code: "invalid_input",
            message: "in the past",
        },
        Case {
            what: "bad query parameter",
            method: "GET",
            path: "/api/v1/audit?limit=abc",
            token: Tok::Admin,
            body: None,
            status: 400,
            code: "invalid_input",
            message: "query parameters",
        },
        Case {
            what: "unknown query parameter",
            method: "GET",
            path: "/api/v1/audit?colour=red",
            token: Tok::Admin,
            body: None,
            status: 400,
            code: "invalid_input",
            message: "query parameters",
        },
        Case {
            what: "page over the limit",
            method: "GET",
            path: "/api/v1/audit?limit=5000",
            token: Tok::Admin,
            body: None,
            status: 400,
            code: "limit_exceeded",
            message: "out of range",
        },
        Case {
            what: "unknown path",
            method: "GET",
            path: "/api/v1/nothing",
            token: Tok::Admin,
            body: None,
            status: 404,
            code: "not_found",
            message: "does not exist",
        },
        Case {
            what: "wrong method",
            method: "DELETE",
            path: "/api/v1/departments",
            token: Tok::Admin,
            body: None,
            status: 405,
            code: "invalid_input",
            message: "not allowed",
        },
        Case {
            what: "no token",
            method: "GET",
            path: "/api/v1/departments",
            token: Tok::None,
            body: None,
            status: 401,
            code: "unauthenticated",
            message: "authentication required",
        },
        Case {
            what: "no token on the OpenAPI document",
            method: "GET",
            path: "/api/v1/openapi.json",
            token: Tok::None,
            body: None,
            status: 401,
            code: "unauthenticated",
            message: "authentication required",
        },
        Case {
            what: "malformed token",
            method: "GET",
            path: "/api/v1/departments",
            token: Tok::Raw("letmein"),
            body: None,
            status: 401,
            code: "unauthenticated",
            message: "malformed",
        },
        Case {
            what: "unknown token",
            method: "GET",
            path: "/api/v1/departments",
            token: Tok::Raw(
                "yqt_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
            ),
            body: None,
            status: 401,
            code: "unauthenticated",
            message: "not valid",
        },
        Case {
            what: "analyst creates a department",
            method: "POST",
            path: "/api/v1/departments",
            token: Tok::Analyst,
            body: Some(r#"{"name": "health"}"#.into()),
            status: 403,
            code: "permission_denied",
            message: "create departments",
        },
        Case {
            what: "steward of transport creates in traffic",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Steward,
            body: Some(r#"{"name": "mole", "role": "analyst", "department": "traffic"}"#.into()),
            status: 403,
            code: "permission_denied",
            message: "department \"traffic\"",
        },
        Case {
            what: "steward creates an admin",
            method: "POST",
            path: "/api/v1/principals",
            token: Tok::Steward,
            body: Some(r#"{"name": "mole", "role": "admin"}"#.into()),
            status: 403,
            code: "permission_denied",
            message: "role \"admin\"",
        },
        Case {
            what: "steward mints a token for another department",
            method: "POST",
            path: "/api/v1/principals/ann/tokens",
            token: Tok::Steward,
            body: Some("{}".into()),
            status: 403,
            code: "permission_denied",
            message: "principal \"ann\"",
        },
        Case {
            what: "analyst mints a token for the admin",
            method: "POST",
            path: "/api/v1/principals/admin/tokens",
            token: Tok::Analyst,
            body: Some("{}".into()),
            status: 403,
            code: "permission_denied",
            message: "principal \"admin\"",
        },
        Case {
            what: "analyst reads a department's audit",
            method: "GET",
            path: "/api/v1/audit?department=traffic",
            token: Tok::Analyst,
            body: None,
            status: 403,
            code: "permission_denied",
            message: "audit records",
        },
        Case {
            what: "steward reads another department's audit",
            method: "GET",
            path: "/api/v1/audit?department=traffic",
            token: Tok::Steward,
            body: None,
            status: 403,
            code: "permission_denied",
            message: "audit records",
        },
        Case {
            what: "steward reads audit by prefix",
            method: "GET",
            path: "/api/v1/audit?department=tra*",
            token: Tok::Steward,
            body: None,
            status: 403,
            code: "permission_denied",
            message: "audit records",
        },
    ];
    let records_before = server.audit_all().len();
    for case in &cases {
        check(&server, &tokens, case);
    }

    // Nothing was written to the store.
    let (_, v) = server.admin("GET", "/api/v1/departments", None);
    let depts: Vec<&str> = v["departments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(depts, vec!["traffic", "transport"]);
    let (_, v) = server.admin("GET", "/api/v1/principals", None);
    let names: Vec<&str> = v["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["admin", "ann", "sam", "tom"]);
    let (_, v) = server.admin("GET", "/api/v1/tokens", None);
    assert_eq!(
        v["tokens"].as_array().unwrap().len(),
        4,
        "one token each: {v}"
    );

    // Every denial is in the audit chain with who, what and why; edge validation failures are not.
    let records = server.audit_all();
    let new: Vec<&Value> = records[records_before..].iter().collect();
    let denied = |action: &str, principal: &str| {
        new.iter()
            .filter(|r| {
                r["outcome"] == "denied" && r["action"] == action && r["principal"] == principal
            })
            .count()
    };
    assert_eq!(
        denied("auth.token", ""),
        4,
        "missing, malformed and unknown tokens"
    );
    assert_eq!(denied("department.create", "ann"), 1);
    assert_eq!(denied("principal.create", "sam"), 2);
    assert_eq!(denied("token.manage", "sam"), 1);
    assert_eq!(denied("token.manage", "ann"), 1);
    assert_eq!(denied("audit.read", "ann"), 1);
    assert_eq!(denied("audit.read", "sam"), 2);
    let sam_denial = new
        .iter()
        .find(|r| r["principal"] == "sam" && r["action"] == "principal.create")
        .unwrap();
    assert_eq!(sam_denial["department"], "transport");
    assert_eq!(sam_denial["object"], "principal:mole");
    assert!(sam_denial["request_id"].as_str().unwrap().len() == 16);
    assert!(
        new.iter()
            .all(|r| r["outcome"] != "ok" || r["action"] == "audit.read"),
        "nothing succeeded: {new:?}"
    );
    for w in records.windows(2) {
        assert_eq!(w[1]["prev_hash"], w[0]["hash"], "records chain");
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1
        );
    }
}

#[test]
fn tokens_expire_and_revoke_and_audit_is_scoped_by_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.dept("transport");
    let steward = server.principal("sam", "steward", Some("transport"));
    let analyst = server.principal("ann", "analyst", Some("transport"));

    // A token that expires in 2 seconds works, then stops.
    let expires = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let (status, v) = server.call(
        "POST",
        "/api/v1/principals/ann/tokens",
        Some(&steward),
        Some(&json!({"expires_at": expires}).to_string()),
    );
    assert_eq!(status, 201, "{v}");
    let short = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        server.call("GET", "/api/v1/whoami", Some(&short), None).0,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let (status, v) = server.call("GET", "/api/v1/whoami", Some(&short), None);
    assert_eq!(status, 401);
    assert_eq!(v["error"]["message"], "token has expired");

    // Revocation by the owner takes effect at once, and is idempotent.
    let (_, v) = server.call("GET", "/api/v1/tokens?principal=ann", Some(&analyst), None);
    let ids: Vec<String> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let analyst_id = &analyst[4..20];
    let (status, v) = server.call(
        "POST",
        &format!("/api/v1/tokens/{analyst_id}/revoke"),
        Some(&analyst),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["active"], false);
    let (status, v) = server.call("GET", "/api/v1/whoami", Some(&analyst), None);
    assert_eq!(
        (status, v["error"]["message"].as_str()),
        (401, Some("token was revoked"))
    );
    let (status, _) = server.call(
        "POST",
        &format!("/api/v1/tokens/{analyst_id}/revoke"),
        Some(&steward),
        None,
    );
    assert_eq!(status, 200);

    // The revoked and expired uses were audited under the token's principal.
    let records = server.audit_all();
    let auth_denials: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "auth.token")
        .collect();
    assert_eq!(auth_denials.len(), 2);
    assert!(
        auth_denials
            .iter()
            .all(|r| r["principal"] == "ann" && r["outcome"] == "denied")
    );

    // Stewards read their department's records, by default.
    let (status, v) = server.call("GET", "/api/v1/audit?limit=1000", Some(&steward), None);
    assert_eq!(status, 200, "{v}");
    let recs = v["records"].as_array().unwrap();
    assert!(!recs.is_empty() && recs.iter().all(|r| r["department"] == "transport"));
    // Filters and descending pages.
    let (_, v) = server.admin(
        "GET",
        "/api/v1/audit?action=token.*&order=desc&limit=2",
        None,
    );
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs[0]["seq"].as_u64() > recs[1]["seq"].as_u64());
    assert!(
        recs.iter()
            .all(|r| r["action"].as_str().unwrap().starts_with("token."))
    );
    let next = v["next"].as_u64().unwrap();
    let (_, v) = server.admin(
        "GET",
        &format!("/api/v1/audit?action=token.*&order=desc&limit=10&before={next}"),
        None,
    );
    assert!(
        v["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["seq"].as_u64().unwrap() < next)
    );
    let since = records[3]["time"].as_str().unwrap();
    let (_, v) = server.admin(
        "GET",
        &format!(
            "/api/v1/audit?since={}&limit=1000",
            since.replace('+', "%2B")
        ),
        None,
    );
    assert!(
        v["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["time"].as_str().unwrap() >= since)
    );
}

#[test]
fn citizens_have_valid_id_numbers_masked_for_others() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (status, v) = server.admin(
        "POST",
        "/api/v1/principals",
        Some(r#"{"name":"c_wang","role":"citizen","id_number":"11010519491231002x"}"#),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        v["principal"]["id_number"], "110105********002X",
        "masked for the admin"
    );
    assert_eq!(v["principal"]["department"], Value::Null);
    let citizen = v["token"]["token"].as_str().unwrap().to_string();
    let (_, v) = server.call("GET", "/api/v1/whoami", Some(&citizen), None);
    assert_eq!(
        v["principal"]["id_number"], "11010519491231002X",
        "the citizen sees its own"
    );
    let (status, v) = server.admin(
        "POST",
        "/api/v1/principals",
        Some(r#"{"name":"c_wang2","role":"citizen","id_number":"11010519491231002X"}"#),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("already_exists"))
    );
    let (status, _) = server.call(
        "POST",
        "/api/v1/departments",
        Some(&citizen),
        Some(r#"{"name":"x"}"#),
    );
    assert_eq!(status, 403);
}

#[test]
fn cli_manages_identities_with_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.admin_token.clone();
    let (code, out, _) = cli(
        &server,
        &admin,
        &[
            "--json",
            "dept",
            "create",
            "transport",
            "--title",
            "交通运输局",
        ],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["title"], "交通运输局");
    let (code, out, _) = cli(
        &server,
        &admin,
        &[
            "principal",
            "create",
            "alice",
            "--dept",
            "transport",
            "--role",
            "steward",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("created principal alice (steward of transport)"),
        "{out}"
    );
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:    "))
        .unwrap()
        .to_string();
    let (code, out, _) = cli(&server, &token, &["--json", "whoami"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["principal"]["name"],
        "alice"
    );
    let (code, out, _) = cli(
        &server,
        &admin,
        &["--json", "token", "create", "alice", "--expires", "30d"],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(v["expires_at"].as_str().is_some());
    let (code, out, _) = cli(&server, &admin, &["token", "revoke", &id]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = cli(
        &server,
        &admin,
        &["--json", "token", "list", "--principal", "alice"],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["active"] == true)
            .count(),
        1
    );
    let (code, out, _) = cli(&server, &admin, &["--json", "dept", "list"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["departments"][0]["name"],
        "transport"
    );
    // Errors: text says what to do, --json gives the error document, the exit code is 1.
    let (code, _, err) = cli(
        &server,
        &admin,
        &[
            "principal",
            "create",
            "bob",
            "--dept",
            "transprt",
            "--role",
            "analyst",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("department \"transprt\" does not exist")
            && err.contains("did you mean \"transport\"?"),
        "{err}"
    );
    let (code, out, _) = cli(&server, &admin, &["--json", "dept", "create", "Bad Name"]);
    assert_eq!(code, 1);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["error"]["code"],
        "invalid_input"
    );
    let (code, out, _) = cli(
        &server,
        &admin,
        &[
            "--json",
            "audit",
            "list",
            "--action",
            "principal.create",
            "--desc",
            "--limit",
            "1",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["records"][0]["outcome"],
        "failed"
    );
    // No token: the CLI says how to get one.
    let out = std::process::Command::new(BIN)
        .args(["dept", "list"])
        .env("YUNQI_URL", &server.url)
        .env_remove("YUNQI_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("YUNQI_TOKEN"));
}

#[test]
fn data_directory_is_locked_and_shutdown_is_graceful() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let meta = std::fs::metadata(dir.path().join("admin.token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let out = std::process::Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path())
        .args(["--http", "127.0.0.1:0", "--pg", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in use by another yunqi server")
            && err.contains(&format!("pid {}", server.child.id())),
        "{err}"
    );

    server.dept("transport");
    let token_before = server.admin_token.clone();
    assert_eq!(server.terminate(), Some(0), "SIGTERM exits cleanly");
    let records = {
        let out = std::process::Command::new(BIN)
            .args(["--json", "audit", "verify", "--data"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["records"]
            .as_u64()
            .unwrap()
    };
    assert!(!dir.path().join("endpoints.json").exists());

    // A restart keeps everything, and does not make a second admin token.
    let server = Server::start(dir.path());
    assert_eq!(server.admin_token, token_before);
    let (_, v) = server.admin("GET", "/api/v1/departments/transport", None);
    assert_eq!(v["name"], "transport");
    let all = server.audit_all();
    let stop = all
        .iter()
        .find(|r| r["action"] == "yunqi.stop")
        .expect("stop recorded");
    assert!(stop["seq"].as_u64().unwrap() <= records);
    assert_eq!(
        all.iter().filter(|r| r["action"] == "yunqi.start").count(),
        2
    );
}

#[test]
fn openapi_document_and_metrics_describe_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (status, doc) = server.admin("GET", "/api/v1/openapi.json", None);
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/departments",
        "/api/v1/principals",
        "/api/v1/principals/{name}/tokens",
        "/api/v1/tokens/{id}/revoke",
        "/api/v1/audit",
        "/healthz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let (status, v) = server.call("GET", "/healthz", None, None);
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    server.call("GET", "/api/v1/departments", None, None);
    let (status, text) = server.call("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_string();
    for needle in [
        "yunqi_http_requests_total{method=\"GET\",route=\"/api/v1/openapi.json\",status=\"200\"} 1",
        "yunqi_http_requests_total{method=\"GET\",route=\"/api/v1/departments\",status=\"401\"} 1",
        "yunqi_http_errors_total{code=\"unauthenticated\"} 1",
        "yunqi_http_request_duration_seconds_count{route=\"/healthz\"} 1",
        "yunqi_audit_records_appended_total",
        "yunqi_audit_last_seq",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}
