//! Governed SQL through real PostgreSQL clients (`psql`, `tokio-postgres` with prepared
//! statements) and over HTTP: logins with tokens, SQLSTATEs with hints, read-only, only what
//! the principal may see, every query and login audited.

mod common;

use common::{Server, connect, psql};
use serde_json::Value;

#[test]
fn psql_logs_in_with_a_token_and_sees_what_the_principal_may_see() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.dept("transport");
    server.dept("traffic");
    let analyst = server.principal("ann", "analyst", Some("transport"));
    let admin = server.admin_token.clone();

    let (code, out, err) = psql(
        &server,
        "admin",
        &admin,
        "yunqi",
        "SELECT name, title FROM system.departments ORDER BY name",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "traffic|traffic\ntransport|transport\n");
    let (code, out, _) = psql(
        &server,
        "admin",
        &admin,
        "yunqi",
        "SELECT count(*) FROM system.principals",
    );
    assert_eq!((code, out.trim()), (0, "2"));
    // Several statements, session statements included, as psql scripts send them.
    let (code, out, err) = psql(
        &server,
        "admin",
        &admin,
        "yunqi",
        "SET application_name = 'x'; BEGIN; SELECT 1 + 1; COMMIT",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "SET\nBEGIN\n2\nCOMMIT",
        "command tags as PostgreSQL sends them"
    );

    // An analyst sees itself only, and only the system tables in information_schema.
    let (code, out, _) = psql(
        &server,
        "ann",
        &analyst,
        "yunqi",
        "SELECT name FROM system.principals",
    );
    assert_eq!((code, out.trim()), (0, "ann"));
    let (code, out, _) = psql(
        &server,
        "ann",
        &analyst,
        "yunqi",
        "SELECT table_schema || '.' || table_name FROM information_schema.tables WHERE table_schema <> 'information_schema' ORDER BY 1",
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "system.departments\nsystem.principals\nsystem.tokens\n")
    );

    // Refused logins say why, and are audited.
    let (code, _, err) = psql(
        &server,
        "admin",
        "yqt_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
        "yunqi",
        "SELECT 1",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("password authentication failed for user \"admin\""),
        "{err}"
    );
    let (code, _, err) = psql(&server, "admin", &analyst, "yunqi", "SELECT 1");
    assert_eq!(code, 2, "a token of ann cannot log in as admin");
    assert!(err.contains("password authentication failed"), "{err}");
    let (code, _, err) = psql(&server, "admin", &admin, "postgres", "SELECT 1");
    assert_eq!(code, 2);
    assert!(
        err.contains("database \"postgres\" does not exist"),
        "{err}"
    );

    // Errors carry a hint; DDL is refused; nothing was created.
    let (code, _, err) = psql(
        &server,
        "admin",
        &admin,
        "yunqi",
        "SELECT * FROM system.departmnts",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("table \"system.departmnts\" does not exist")
            && err.contains("did you mean \"system.departments\""),
        "{err}"
    );
    let (code, _, err) = psql(
        &server,
        "admin",
        &admin,
        "yunqi",
        "CREATE TABLE t AS SELECT 1",
    );
    assert_eq!(code, 1);
    assert!(err.contains("only queries may run here"), "{err}");
    let (code, _, err) = psql(&server, "admin", &admin, "yunqi", "SELEC 1");
    assert_eq!(code, 1);
    assert!(err.contains("syntax error"), "{err}");

    let records = server.audit_all();
    let logins = |outcome: &str| {
        records
            .iter()
            .filter(|r| r["action"] == "auth.login" && r["outcome"] == outcome)
            .count()
    };
    assert!(logins("ok") >= 8, "successful logins audited");
    assert_eq!(logins("denied"), 3, "refused logins audited");
    let ann_denied = records
        .iter()
        .find(|r| {
            r["action"] == "auth.login" && r["outcome"] == "denied" && r["principal"] == "ann"
        })
        .expect("denial under the token's owner");
    assert_eq!(ann_denied["object"], "pg");
    let query = records
        .iter()
        .find(|r| {
            r["action"] == "sql.query"
                && r["principal"] == "ann"
                && r["object"] == "table:system.principals"
        })
        .expect("query audited");
    assert_eq!(query["outcome"], "ok");
    assert!(
        query["detail"]
            .as_str()
            .unwrap()
            .contains("SELECT name FROM system.principals")
    );
    assert!(records.iter().any(|r| r["action"] == "sql.query"
        && r["outcome"] == "denied"
        && r["detail"].as_str().unwrap().contains("CREATE TABLE")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_parameters_and_sqlstates() {
    let dir = tempfile::tempdir().unwrap();
    let server = tokio::task::spawn_blocking({
        let path = dir.path().to_path_buf();
        move || {
            let s = Server::start(&path);
            s.dept("transport");
            s.principal("sam", "steward", Some("transport"));
            s.principal("ann", "analyst", Some("transport"));
            s
        }
    })
    .await
    .unwrap();
    let client = connect(&server, "admin", &server.admin_token)
        .await
        .unwrap();
    let stmt = client
        .prepare("SELECT name, role FROM system.principals WHERE role = $1 ORDER BY name")
        .await
        .unwrap();
    assert_eq!(stmt.params(), &[tokio_postgres::types::Type::TEXT]);
    let rows = client.query(&stmt, &[&"analyst"]).await.unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    assert_eq!(names, vec!["ann"]);
    let rows = client.query(&stmt, &[&"steward"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    // Typed values come back typed (binary format).
    let row = client
        .query_one(
            "SELECT count(*) AS n, max(created_at) IS NOT NULL AS any FROM system.tokens",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>("n"), 3);
    assert!(row.get::<_, bool>("any"));
    let row = client
        .query_one("SELECT 40 + $1::BIGINT AS x", &[&2i64])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>("x"), 42);

    // SQLSTATEs, with the hint.
    let e = client
        .query("SELECT * FROM system.nope", &[])
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("database error");
    assert_eq!(db.code().code(), "42P01");
    assert!(db.hint().is_some());
    let e = client
        .query("DROP TABLE system.tokens", &[])
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42501");
    let e = client.batch_execute("SELEC 1").await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42601");
    // The connection is still usable after errors.
    let row = client
        .query_one("SELECT name FROM system.departments", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "transport");

    // A wrong password is refused with 28P01.
    let e = connect(
        &server,
        "admin",
        "yqt_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code().to_string()),
        Some("28P01".to_string())
    );
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

#[test]
fn sql_over_http_returns_typed_rows_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.dept("transport");
    let (status, v) = server.admin("POST", "/api/v1/sql", Some(r#"{"sql": "SELECT name, 1 + 1 AS two, name = 'transport' AS t, NULL AS nothing FROM system.departments"}"#));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["columns"][1],
        serde_json::json!({"name": "two", "type": "Int64"})
    );
    assert_eq!(v["rows"], serde_json::json!([["transport", 2, true, null]]));
    assert_eq!(
        (v["row_count"].as_u64(), v["truncated"].as_bool()),
        (Some(1), Some(false))
    );
    let cases: [(&str, u16, &str, &str); 5] = [
        (
            r#"{"sql": "SELECT * FROM system.departements"}"#,
            404,
            "not_found",
            "did you mean \"system.departments\"?",
        ),
        (
            r#"{"sql": "SELECT 1; SELECT 2"}"#,
            400,
            "invalid_input",
            "send one query per request",
        ),
        (
            r#"{"sql": "INSERT INTO system.departments VALUES ('x', 'y', now())"}"#,
            403,
            "permission_denied",
            "yunqi SQL reads data",
        ),
        (r#"{"sql": ""}"#, 400, "invalid_input", "send a query"),
        (
            r#"{"sql": "SELECT nme FROM system.departments"}"#,
            400,
            "invalid_input",
            "check the names",
        ),
    ];
    for (body, status, code, hint) in cases {
        let (s, v) = server.admin("POST", "/api/v1/sql", Some(body));
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
        assert!(
            v["error"]["hint"].as_str().unwrap_or("").contains(hint),
            "{body}: {v}"
        );
    }
    let (status, _) = server.call("POST", "/api/v1/sql", None, Some(r#"{"sql": "SELECT 1"}"#));
    assert_eq!(status, 401);
    let audited: Vec<Value> = server
        .audit_all()
        .into_iter()
        .filter(|r| r["action"] == "sql.query")
        .collect();
    assert_eq!(
        audited.len(),
        4,
        "every query that reached planning is audited (parse errors are edge validation): {audited:?}"
    );
}

#[test]
fn tls_is_offered_when_a_certificate_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("pg.crt"), dir.path().join("pg.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/services.sh installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let data = dir.path().join("data");
    let server = Server::start_with(
        &data,
        &[
            "--pg-tls-cert",
            cert.to_str().unwrap(),
            "--pg-tls-key",
            key.to_str().unwrap(),
        ],
    );
    let admin = server.admin_token.clone();
    let (host, port) = server.pg.rsplit_once(':').unwrap();
    let run = |sslmode: &str| {
        std::process::Command::new("psql")
            .arg(format!(
                "host={host} port={port} user=admin dbname=yunqi sslmode={sslmode}"
            ))
            .args([
                "-X",
                "-A",
                "-t",
                "-c",
                "\\conninfo",
                "-c",
                "SELECT count(*) FROM system.departments",
            ])
            .env("PGPASSWORD", &admin)
            .output()
            .expect("psql")
    };
    let out = run("require");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SSL connection (protocol: TLSv1.3"), "{text}");
    assert!(text.trim_end().ends_with('0'), "{text}");
    // Plain connections still work for clients that do not ask for TLS.
    let out = run("disable");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SSL connection"));
    // A missing key file stops the server at start with a clear message.
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--data"])
        .arg(dir.path().join("other"))
        .args([
            "--http",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
            "--pg-tls-cert",
        ])
        .arg(&cert)
        .args(["--pg-tls-key", "/nonexistent/key.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read the TLS key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
