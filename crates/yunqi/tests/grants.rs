//! Grants end to end, and the governance attack suite: a department reads another's dataset
//! through a real PostgreSQL client only as its grant allows — granted columns, rows passing
//! the grant's filter, personal data masked — and every way around that is denied or sees only
//! masked values, and is audited.

mod common;

use common::{Server, cli, cli_with_input, connect, psql};
use serde_json::{Value, json};
use tokio_postgres::SimpleQueryMessage;

/// A valid resident ID number (GB 11643 check character) from its first 17 digits.
fn id_number(first17: &str) -> String {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17
        .chars()
        .zip(W)
        .map(|(c, w)| c.to_digit(10).unwrap() * w)
        .sum();
    format!(
        "{first17}{}",
        "10X98765432".as_bytes()[(sum % 11) as usize] as char
    )
}

/// 30 vehicles: the even ones in 西湖区 (registered 2016–2024), the odd ones in 上城区, among
/// them one registered in 2015 (the only 2015 in the file).
fn vehicles_csv() -> (String, Vec<String>) {
    let mut csv = String::from("plate,owner_id,mobile,district,year\n");
    let mut ids = Vec::new();
    for i in 0..30u32 {
        let id = id_number(&format!("33010619{:02}0101{:03}", 70 + i, 100 + i));
        let (district, year) = if i % 2 == 0 {
            ("西湖区", 2016 + (i / 2) % 9)
        } else {
            ("上城区", if i == 1 { 2015 } else { 2018 })
        };
        csv.push_str(&format!(
            "浙A{:05},{id},138{:08},{district},{year}\n",
            10_000 + i,
            i
        ));
        ids.push(id);
    }
    (csv, ids)
}

/// Rows of a simple query as text.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let messages = client.simple_query(sql).await.map_err(|e| {
        e.as_db_error()
            .map(|d| format!("{}: {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string())
    })?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

fn column(rows: &[Vec<String>], i: usize) -> Vec<String> {
    rows.iter().map(|r| r[i].clone()).collect()
}

struct City {
    server: Server,
    /// transport steward (owner).
    ts: String,
    /// transport analyst (owner's staff).
    ta: String,
    /// police analyst (grantee).
    pa: String,
    /// police steward (grantee).
    ps: String,
    /// health analyst (another department).
    ha: String,
    ids: Vec<String>,
}

fn city(dir: &std::path::Path) -> City {
    let server = Server::start(dir);
    for d in ["transport", "police", "health"] {
        server.dept(d);
    }
    let ts = server.principal("ts", "steward", Some("transport"));
    let ta = server.principal("ta", "analyst", Some("transport"));
    let pa = server.principal("pa", "analyst", Some("police"));
    let ps = server.principal("ps", "steward", Some("police"));
    let ha = server.principal("ha", "analyst", Some("health"));
    let (csv, ids) = vehicles_csv();
    for (dept, name, token) in [
        ("transport", "vehicles", &ts),
        ("transport", "fines", &ts),
        ("police", "watchlist", &ps),
    ] {
        let (status, v) = server.call(
            "POST",
            "/api/v1/datasets",
            Some(token),
            Some(&json!({"department": dept, "name": name}).to_string()),
        );
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = server.call(
        "POST",
        "/api/v1/datasets/transport/vehicles/import",
        Some(&ts),
        Some(&csv),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = server.call(
        "POST",
        "/api/v1/datasets/transport/fines/import",
        Some(&ts),
        Some("plate,amount\n浙A10000,200\n"),
    );
    assert_eq!(status, 200, "{v}");
    // The police watch list holds real ID numbers of two owners, one in each district.
    let watch = format!("id_number,note\n{},a\n{},b\n", ids[0], ids[1]);
    let (status, v) = server.call(
        "POST",
        "/api/v1/datasets/police/watchlist/import",
        Some(&ps),
        Some(&watch),
    );
    assert_eq!(status, 200, "{v}");
    City {
        server,
        ts,
        ta,
        pa,
        ps,
        ha,
        ids,
    }
}

fn request(server: &Server, token: &str, body: Value) -> (u16, Value) {
    server.call(
        "POST",
        "/api/v1/grants",
        Some(token),
        Some(&body.to_string()),
    )
}

fn future_date(days: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::days(days))
        .date_naive()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_govern_what_another_department_reads_over_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let c = city(dir.path());
    let s = &c.server;
    let police = connect(s, "pa", &c.pa).await.unwrap();
    let mut cases = 0;
    let mut case = |name: &str| {
        cases += 1;
        eprintln!("case {cases}: {name}");
    };

    case("no grant: the dataset does not exist for another department");
    let e = rows(&police, "SELECT * FROM transport.vehicles")
        .await
        .unwrap_err();
    assert!(e.starts_with("42P01"), "{e}");

    // The request is validated at the edge.
    case("a row filter with a subquery is refused");
    let (status, v) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate"], "purpose": "p",
               "until": future_date(30), "rows": "plate IN (SELECT plate FROM police.watchlist)"}),
    );
    assert_eq!(status, 400, "{v}");
    case("a request without a purpose is refused");
    let (status, v) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate"], "purpose": " ",
               "until": future_date(30)}),
    );
    assert_eq!(
        (status, v["error"]["message"].as_str()),
        (400, Some("a purpose is required"))
    );
    case("a request beyond the longest grant is refused");
    let (status, v) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate"], "purpose": "p",
               "until": future_date(800)}),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("limit_exceeded")),
        "{v}"
    );
    case("the owner's own department needs no grant and may not ask for one");
    let (status, _) = request(
        s,
        &c.ta,
        json!({"dataset": "transport.vehicles", "columns": ["plate"], "purpose": "p",
               "until": future_date(30)}),
    );
    assert_eq!(status, 403);

    let (status, g) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate", "owner_id", "district", "year"],
               "rows": "district = '西湖区'", "purpose": "非浙A急事通: vehicle checks",
               "until": future_date(30)}),
    );
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_str().unwrap().to_string();
    assert_eq!(g["state"], "pending");

    case("a pending request gives nothing");
    assert!(
        rows(&police, "SELECT plate FROM transport.vehicles")
            .await
            .is_err()
    );
    case("the grantee cannot approve its own request");
    let (status, _) = s.call(
        "POST",
        &format!("/api/v1/grants/{id}/approve"),
        Some(&c.ps),
        None,
    );
    assert_eq!(status, 403);
    case("the admin does not decide who reads a department's data");
    let (status, _) = s.admin("POST", &format!("/api/v1/grants/{id}/approve"), None);
    assert_eq!(status, 403);
    let (status, g) = s.call(
        "POST",
        &format!("/api/v1/grants/{id}/approve"),
        Some(&c.ts),
        None,
    );
    assert_eq!((status, g["state"].as_str()), (200, Some("active")), "{g}");

    case("granted columns, filtered rows, masked ID numbers");
    let all = rows(&police, "SELECT * FROM transport.vehicles ORDER BY plate")
        .await
        .unwrap();
    assert_eq!(all.len(), 15, "only 西湖区 rows");
    assert_eq!(all[0].len(), 4, "only the granted columns: {:?}", all[0]);
    assert!(all.iter().all(|r| r[2] == "西湖区"));
    assert_eq!(all[0][1], format!("330106********{}", &c.ids[0][14..]));
    assert!(
        !all.iter().any(|r| c.ids.contains(&r[1])),
        "no ID number unmasked"
    );

    case("over HTTP, as CSV, the same masked rows");
    let (status, v) = s.call(
        "POST",
        "/api/v1/sql",
        Some(&c.pa),
        Some(r#"{"sql": "SELECT plate, owner_id FROM transport.vehicles ORDER BY plate LIMIT 1", "format": "csv"}"#),
    );
    assert_eq!(status, 200);
    assert_eq!(
        v.as_str().unwrap(),
        format!(
            "plate,owner_id\n浙A***00,330106********{}\n",
            &c.ids[0][14..]
        )
    );

    case("an ungranted column is not there");
    let e = rows(&police, "SELECT mobile FROM transport.vehicles")
        .await
        .unwrap_err();
    assert!(e.contains("mobile"), "{e}");

    case("filtering on the real value of a masked column finds nothing");
    let q = format!(
        "SELECT count(*) FROM transport.vehicles WHERE owner_id = '{}'",
        c.ids[0]
    );
    assert_eq!(
        rows(&police, &q).await.unwrap(),
        vec![vec!["0".to_string()]]
    );
    case("filtering on the hidden middle of a masked value finds nothing");
    let r = rows(
        &police,
        "SELECT count(*) FROM transport.vehicles WHERE substr(owner_id, 7, 4) = '1970'",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["0".to_string()]]);
    case("sorting by a masked column sorts masked values");
    let sorted = rows(
        &police,
        "SELECT owner_id FROM transport.vehicles ORDER BY owner_id",
    )
    .await
    .unwrap();
    let mut expect = column(&sorted, 0);
    expect.sort();
    assert_eq!(column(&sorted, 0), expect);
    assert!(sorted.iter().all(|r| r[0].contains("********")));
    case("grouping by a masked column groups masked values");
    let groups = rows(
        &police,
        "SELECT substr(owner_id, 7, 8), count(*) FROM transport.vehicles GROUP BY 1",
    )
    .await
    .unwrap();
    assert_eq!(groups, vec![vec!["********".to_string(), "15".to_string()]]);
    case("min/max of a masked column are masked");
    let r = rows(
        &police,
        "SELECT min(owner_id), max(owner_id) FROM transport.vehicles",
    )
    .await
    .unwrap();
    assert!(r[0].iter().all(|v| v.contains("********")), "{r:?}");
    case("joining a masked column with real values matches nothing");
    let r = rows(
        &police,
        "SELECT count(*) FROM transport.vehicles v JOIN police.watchlist w ON v.owner_id = w.id_number",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["0".to_string()]]);
    case("a scalar subquery with a real value matches nothing");
    let r = rows(
        &police,
        "SELECT count(*) FROM transport.vehicles WHERE owner_id IN (SELECT id_number FROM police.watchlist)",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["0".to_string()]]);
    case("rows outside the filter do not come back through a subquery");
    let r = rows(
        &police,
        "SELECT count(*) FROM (SELECT * FROM transport.vehicles) t",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["15".to_string()]]);
    case("nor through a UNION");
    let r = rows(
        &police,
        "SELECT district FROM transport.vehicles UNION SELECT district FROM transport.vehicles WHERE district <> '西湖区'",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["西湖区".to_string()]]);
    case("nor through a CTE");
    let r = rows(
        &police,
        "WITH x AS (SELECT * FROM transport.vehicles) SELECT count(*) FROM x WHERE district = '上城区'",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["0".to_string()]]);
    case("a count is of the visible rows, never of the file's");
    let r = rows(
        &police,
        "SELECT count(*), count(year) FROM transport.vehicles",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["15".to_string(), "15".to_string()]]);
    case("an error in the query's own predicate cannot probe hidden rows");
    // Only a hidden row has year 2015: a division by zero would reveal it.
    let r = rows(
        &police,
        "SELECT count(*) FROM transport.vehicles WHERE 10 / (year - 2015) > 0",
    )
    .await
    .unwrap();
    assert_eq!(r, vec![vec!["15".to_string()]]);
    case("quoted and fully qualified names reach the same governed table");
    for q in [
        "SELECT owner_id FROM \"transport\".\"vehicles\" LIMIT 1",
        "SELECT owner_id FROM yunqi.transport.vehicles LIMIT 1",
    ] {
        let r = rows(&police, q).await.unwrap();
        assert!(r[0][0].contains("********"), "{q}: {r:?}");
    }
    case("a casting trick does not unmask");
    let r = rows(
        &police,
        "SELECT arrow_cast(owner_id, 'LargeUtf8') FROM transport.vehicles LIMIT 1",
    )
    .await
    .unwrap();
    assert!(r[0][0].contains("********"));
    case("information_schema lists only granted tables and columns");
    let tables = rows(
        &police,
        "SELECT table_schema || '.' || table_name FROM information_schema.tables WHERE table_schema = 'transport' ORDER BY 1",
    )
    .await
    .unwrap();
    assert_eq!(tables, vec![vec!["transport.vehicles".to_string()]]);
    let cols = rows(
        &police,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'transport' ORDER BY ordinal_position",
    )
    .await
    .unwrap();
    assert_eq!(column(&cols, 0), ["plate", "owner_id", "district", "year"]);
    case("psql's \\dt and \\d show only what was granted");
    let (code, out, err) = psql(s, "pa", &c.pa, "yunqi", "\\dt transport.*");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "transport|vehicles|table|postgres", "{out}");
    let (code, out, err) = psql(s, "pa", &c.pa, "yunqi", "\\d transport.vehicles");
    assert_eq!(code, 0, "{err}");
    let columns: Vec<&str> = out.lines().map(|l| l.split('|').next().unwrap()).collect();
    assert_eq!(columns, ["plate", "owner_id", "district", "year"], "{out}");
    case("the owner's rejects and other datasets stay hidden");
    for q in [
        "SELECT * FROM transport.vehicles__rejects",
        "SELECT * FROM transport.fines",
    ] {
        let e = rows(&police, q).await.unwrap_err();
        assert!(e.starts_with("42P01"), "{q}: {e}");
    }
    case("copying the data into a table of one's own is refused");
    for q in [
        "CREATE TABLE police.copy AS SELECT * FROM transport.vehicles",
        "INSERT INTO police.watchlist SELECT owner_id, plate FROM transport.vehicles",
        "CREATE VIEW police.v AS SELECT * FROM transport.vehicles",
    ] {
        let e = rows(&police, q).await.unwrap_err();
        assert!(e.starts_with("42501"), "{q}: {e}");
    }
    case("injection in a table name stays a name");
    let e = rows(
        &police,
        "SELECT * FROM \"transport.vehicles; DROP TABLE x\"",
    )
    .await
    .unwrap_err();
    assert!(e.starts_with("42P01"), "{e}");

    case("another department's token sees nothing of it");
    let health = connect(s, "ha", &c.ha).await.unwrap();
    let e = rows(&health, "SELECT * FROM transport.vehicles")
        .await
        .unwrap_err();
    assert!(e.starts_with("42P01"), "{e}");
    case("a token used under another principal's name does not log in");
    assert!(connect(s, "pa", &c.ha).await.is_err());
    case("the admin reads no department's data");
    let admin = connect(s, "admin", &s.admin_token).await.unwrap();
    assert!(
        rows(&admin, "SELECT * FROM transport.vehicles")
            .await
            .is_err()
    );
    case("the owner's own staff read everything, unmasked");
    let owner = connect(s, "ta", &c.ta).await.unwrap();
    let r = rows(&owner, "SELECT count(*), count(DISTINCT owner_id) FROM transport.vehicles WHERE owner_id LIKE '330106%'").await.unwrap();
    assert_eq!(r, vec![vec!["30".to_string(), "30".to_string()]]);

    case("API parameters are validated, not interpreted");
    let (status, _) = s.call(
        "GET",
        "/api/v1/grants?state=active%27%20OR%201=1",
        Some(&c.pa),
        None,
    );
    assert_eq!(status, 400);
    let (status, _) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles' OR '1'='1", "columns": ["plate"], "purpose": "p",
               "until": future_date(3)}),
    );
    assert_eq!(status, 404);
    let (status, _) = s.call("GET", "/api/v1/grants/..%2F..%2Fmeta.db", Some(&c.pa), None);
    assert_eq!(status, 404);

    case("a grant revoked mid-session stops a prepared statement");
    let stmt = police
        .prepare("SELECT plate FROM transport.vehicles WHERE year > $1")
        .await
        .unwrap();
    assert_eq!(police.query(&stmt, &[&2000i64]).await.unwrap().len(), 15);
    let (status, g) = s.call(
        "POST",
        &format!("/api/v1/grants/{id}/revoke"),
        Some(&c.ts),
        Some(r#"{"reason": "no longer needed"}"#),
    );
    assert_eq!((status, g["state"].as_str()), (200, Some("revoked")), "{g}");
    let e = police.query(&stmt, &[&2000i64]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42501", "{e}");
    let e = rows(&police, "SELECT plate FROM transport.vehicles")
        .await
        .unwrap_err();
    assert!(e.starts_with("42P01"), "{e}");

    case("an expired grant gives nothing");
    let until = (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339();
    let (status, g) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate"], "purpose": "short check",
               "until": until}),
    );
    assert_eq!(status, 201, "{g}");
    let short = g["id"].as_str().unwrap().to_string();
    let (status, _) = s.call(
        "POST",
        &format!("/api/v1/grants/{short}/approve"),
        Some(&c.ts),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(
        rows(&police, "SELECT count(*) FROM transport.vehicles")
            .await
            .unwrap()[0][0],
        "30"
    );
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let e = rows(&police, "SELECT count(*) FROM transport.vehicles")
        .await
        .unwrap_err();
    assert!(e.starts_with("42P01"), "{e}");
    let (_, g) = s.call("GET", &format!("/api/v1/grants/{short}"), Some(&c.pa), None);
    assert_eq!(g["state"], "expired");

    case("unmasked only where the grant says so, with a reason");
    let (status, v) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate", "owner_id"], "purpose": "p",
               "until": future_date(10), "unmasked": ["owner_id"]}),
    );
    assert_eq!(status, 400, "{v}");
    let (status, g) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate", "owner_id", "mobile"], "purpose": "identify owners",
               "until": future_date(10), "unmasked": ["owner_id"], "unmasked_reason": "court order 2026-17"}),
    );
    assert_eq!(status, 201, "{g}");
    let full = g["id"].as_str().unwrap().to_string();
    let (status, _) = s.call(
        "POST",
        &format!("/api/v1/grants/{full}/approve"),
        Some(&c.ts),
        None,
    );
    assert_eq!(status, 200);
    let r = rows(
        &police,
        "SELECT owner_id, mobile FROM transport.vehicles ORDER BY plate LIMIT 1",
    )
    .await
    .unwrap();
    assert_eq!(r[0][0], c.ids[0]);
    assert_eq!(r[0][1], "138****0000");

    case("a refused request stays refused");
    let (status, g) = request(
        s,
        &c.ha,
        json!({"dataset": "transport.vehicles", "columns": ["*"], "purpose": "curiosity",
               "until": future_date(10)}),
    );
    assert_eq!(status, 201);
    let refused = g["id"].as_str().unwrap().to_string();
    let (status, _) = s.call(
        "POST",
        &format!("/api/v1/grants/{refused}/refuse"),
        Some(&c.ts),
        Some("{}"),
    );
    assert_eq!(status, 400, "a refusal needs a reason");
    let (status, g) = s.call(
        "POST",
        &format!("/api/v1/grants/{refused}/refuse"),
        Some(&c.ts),
        Some(r#"{"reason": "no legal basis"}"#),
    );
    assert_eq!((status, g["state"].as_str()), (200, Some("refused")));
    assert!(
        rows(&health, "SELECT * FROM transport.vehicles")
            .await
            .is_err()
    );
    case("grants are listed to the departments concerned only");
    let (_, v) = s.call("GET", "/api/v1/grants", Some(&c.ts), None);
    assert_eq!(v["grants"].as_array().unwrap().len(), 4);
    let (_, v) = s.call("GET", "/api/v1/grants", Some(&c.ha), None);
    assert_eq!(v["grants"].as_array().unwrap().len(), 1);
    let (status, _) = s.call("GET", &format!("/api/v1/grants/{id}"), Some(&c.ha), None);
    assert_eq!(status, 403);
    assert!(cases >= 30, "{cases} cases");

    // Everything above is in the audit chain: requests and decisions with their purposes,
    // queries with the grants they used, denials.
    let audit = s.audit_all();
    let has = |action: &str, outcome: &str, principal: &str, purpose: &str| {
        audit.iter().any(|r| {
            r["action"] == action
                && r["outcome"] == outcome
                && r["principal"] == principal
                && r["purpose"].as_str().unwrap_or("").contains(purpose)
        })
    };
    assert!(has("grant.request", "ok", "pa", "非浙A急事通"));
    assert!(has("grant.approve", "ok", "ts", "非浙A急事通"));
    assert!(has("grant.revoke", "ok", "ts", "非浙A急事通"));
    assert!(has("grant.refuse", "ok", "ts", "curiosity"));
    assert!(has("grant.decide", "denied", "ps", ""));
    assert!(has("sql.query", "ok", "pa", "非浙A急事通"));
    assert!(
        has("sql.query", "denied", "pa", ""),
        "the revoked prepared statement"
    );
    assert!(has("sql.query", "failed", "ha", ""));
    let used = audit
        .iter()
        .find(|r| {
            r["action"] == "sql.query"
                && r["principal"] == "pa"
                && r["outcome"] == "ok"
                && r["detail"].as_str().unwrap().contains("grants ")
        })
        .expect("a query under a grant");
    let detail = used["detail"].as_str().unwrap();
    assert!(
        detail.contains("rows in") && detail.contains("columns transport.vehicles."),
        "{detail}"
    );
}

#[test]
fn the_cli_asks_decides_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let c = city(dir.path());
    let s = &c.server;
    let until = future_date(30);
    let (code, out, err) = cli(
        s,
        &c.pa,
        &[
            "grant",
            "request",
            "transport.vehicles",
            "--columns",
            "plate,owner_id,district",
            "--purpose",
            "非浙A急事通",
            "--until",
            &until,
            "--rows",
            "district = '西湖区'",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    // Without --json, the id alone on standard output.
    let (code, out, _) = cli(
        s,
        &c.ha,
        &[
            "grant",
            "request",
            "transport.vehicles",
            "--columns",
            "*",
            "--purpose",
            "x",
            "--until",
            &until,
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.trim().starts_with("g_") && out.trim().lines().count() == 1,
        "{out}"
    );
    let (code, out, _) = cli(s, &c.ts, &["grant", "list", "--state", "pending"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("非浙A急事通"), "{out}");
    let (code, _, err) = cli(s, &c.pa, &["grant", "approve", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("permission denied"), "{err}");
    let (code, out, err) = cli(s, &c.ts, &["grant", "approve", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(active)"), "{out}");

    let (code, out, err) = cli(
        s,
        &c.pa,
        &[
            "sql",
            "SELECT plate, owner_id FROM transport.vehicles ORDER BY plate LIMIT 2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("浙A***00") && out.contains("330106********") && out.contains("(2 rows)"),
        "{out}"
    );
    let (code, out, _) = cli(
        s,
        &c.pa,
        &[
            "sql",
            "--csv",
            "SELECT count(*) AS n FROM transport.vehicles",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "n\n15\n"));
    // The shell: statements over several lines, \d, errors that do not stop it.
    let (code, out, err) = cli_with_input(
        s,
        &c.pa,
        &["sql"],
        "\\d\nSELECT count(*)\n  FROM transport.vehicles;\nSELECT mobile FROM transport.vehicles;\n\\d transport.vehicles\n",
    );
    assert_eq!(code, 1, "one statement failed: {out} {err}");
    assert!(out.contains("transport | vehicles"), "{out}");
    assert!(out.contains(" 15 "), "{out}");
    assert!(err.contains("mobile"), "{err}");
    assert!(
        out.contains("owner_id") && !out.contains("| mobile"),
        "{out}"
    );
    // The catalog shows the dataset with its grants to both departments, and finds it.
    let (code, out, err) = cli(s, &c.ts, &["catalog", "show", "transport.vehicles"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("grant {id} (active) to police")),
        "{out}"
    );
    let (code, out, _) = cli(
        s,
        &c.pa,
        &["catalog", "search", "owner_id", "--class", "personal"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("transport.vehicles"), "{out}");
    // Derived datasets: the owner derives from its own data and the lineage shows both ways;
    // a grantee cannot keep a copy of what it reads under a grant, nor an analyst write.
    let (code, _, err) = cli(
        s,
        &c.ps,
        &[
            "dataset",
            "derive",
            "police.copy",
            "--sql",
            "SELECT * FROM transport.vehicles",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("does not allow keeping a copy"), "{err}");
    let by_district =
        "SELECT district, count(*) AS vehicles FROM transport.vehicles GROUP BY district";
    let (code, _, err) = cli(
        s,
        &c.ta,
        &[
            "dataset",
            "derive",
            "transport.by_district",
            "--sql",
            by_district,
        ],
    );
    assert_eq!(code, 1, "analysts do not write datasets");
    assert!(err.contains("permission denied"), "{err}");
    let (code, out, err) = cli(
        s,
        &c.ts,
        &[
            "dataset",
            "derive",
            "transport.by_district",
            "--sql",
            by_district,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("derived from: transport.vehicles (version 1"),
        "{out}"
    );
    let (code, out, _) = cli(s, &c.ts, &["catalog", "show", "transport.vehicles"]);
    assert_eq!(code, 0);
    assert!(out.contains("used by: transport.by_district"), "{out}");
    let (status, v) = s.call(
        "POST",
        "/api/v1/sql",
        Some(&c.ta),
        Some(
            r#"{"sql": "SELECT district, vehicles FROM transport.by_district ORDER BY district"}"#,
        ),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"], json!([["上城区", 15], ["西湖区", 15]]));
    // Tags, set by the owner's steward, are searched too.
    let (code, out, err) = cli(
        s,
        &c.ts,
        &[
            "dataset",
            "tag",
            "transport.vehicles",
            "机动车",
            "open-data",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tags: 机动车, open-data"), "{out}");
    let (code, _, _) = cli(s, &c.pa, &["dataset", "tag", "transport.vehicles", "x"]);
    assert_eq!(code, 1, "only the owner's steward tags");
    let (code, out, _) = cli(s, &c.pa, &["catalog", "search", "机动车"]);
    assert_eq!(code, 0);
    assert!(out.contains("transport.vehicles"), "{out}");
    let (code, _, err) = cli(s, &c.ts, &["grant", "revoke", &id, "--reason", "done"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(s, &c.pa, &["sql", "SELECT 1 FROM transport.vehicles"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("not found") || err.contains("does not exist"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_sees_who_read_their_rows_and_for_what() {
    let dir = tempfile::tempdir().unwrap();
    let c = city(dir.path());
    let s = &c.server;
    // The ID number column was recognised at import and became the subject column.
    let (_, v) = s.call(
        "GET",
        "/api/v1/datasets/transport/vehicles",
        Some(&c.ta),
        None,
    );
    assert_eq!(v["subject"], "owner_id", "{v}");
    // Two citizens: the owner of the first vehicle (西湖区) and of the second (上城区).
    let mut citizens = Vec::new();
    for (name, id) in [("c0", &c.ids[0]), ("c1", &c.ids[1])] {
        let body = json!({"name": name, "role": "citizen", "id_number": id}).to_string();
        let (status, v) = s.admin("POST", "/api/v1/principals", Some(&body));
        assert_eq!(status, 201, "{v}");
        citizens.push(v["token"]["token"].as_str().unwrap().to_string());
    }
    let (status, g) = request(
        s,
        &c.pa,
        json!({"dataset": "transport.vehicles", "columns": ["plate", "district"],
               "rows": "district = '西湖区'", "purpose": "非浙A急事通: plate check",
               "until": future_date(30)}),
    );
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_str().unwrap();
    let (status, _) = s.call(
        "POST",
        &format!("/api/v1/grants/{id}/approve"),
        Some(&c.ts),
        None,
    );
    assert_eq!(status, 200);

    let police = connect(s, "pa", &c.pa).await.unwrap();
    // Returns the first vehicle's row (the subject column is not even granted).
    let r = rows(
        &police,
        "SELECT plate FROM transport.vehicles WHERE plate = '浙A***00'",
    )
    .await
    .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0],
        vec!["浙A***00".to_string()],
        "the carried subject column is not shown"
    );
    // The same through an alias, a sort and a limit, by prepared statement.
    let stmt = police
        .prepare("SELECT v.plate AS p FROM transport.vehicles v WHERE v.district = $1 ORDER BY p LIMIT 1")
        .await
        .unwrap();
    let got = police.query(&stmt, &[&"西湖区"]).await.unwrap();
    assert_eq!(got[0].columns().len(), 1);
    // An aggregate returns nobody's row.
    rows(&police, "SELECT count(*) FROM transport.vehicles")
        .await
        .unwrap();
    // The owner's staff reading the second vehicle's row unmasked.
    let owner = connect(s, "ta", &c.ta).await.unwrap();
    rows(
        &owner,
        &format!(
            "SELECT * FROM transport.vehicles WHERE owner_id = '{}'",
            c.ids[1]
        ),
    )
    .await
    .unwrap();

    let (status, v) = s.call("GET", "/api/v1/me/accesses", Some(&citizens[0]), None);
    assert_eq!(status, 200, "{v}");
    let list = v["accesses"].as_array().unwrap();
    assert_eq!(list.len(), 2, "the lookup and the prepared statement: {v}");
    assert!(
        list.iter().all(|a| a["principal"] == "pa"
            && a["department"] == "police"
            && a["purpose"].as_str().unwrap().contains("非浙A急事通")
            && a["object"] == "table:transport.vehicles"),
        "{v}"
    );
    let (_, v) = s.call("GET", "/api/v1/me/accesses", Some(&citizens[1]), None);
    let list = v["accesses"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(
        (list[0]["principal"].as_str(), list[0]["purpose"].as_str()),
        (Some("ta"), Some(""))
    );
    // Staff have no "my accesses"; the citizen's question is itself audited.
    let (status, _) = s.call("GET", "/api/v1/me/accesses", Some(&c.pa), None);
    assert_eq!(status, 403);
    let (code, out, _) = cli(s, &citizens[0], &["accesses"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("pa (police)") && out.contains("非浙A急事通"),
        "{out}"
    );
    // The audit holds keys, never the ID numbers themselves.
    let audit = s.audit_all();
    assert!(
        audit
            .iter()
            .any(|r| r["action"] == "subject.accesses" && r["principal"] == "c0")
    );
    let lookup = audit
        .iter()
        .find(|r| r["action"] == "sql.query" && r["detail"].as_str().unwrap().contains("subjects "))
        .unwrap();
    assert!(!lookup["detail"].as_str().unwrap().contains(&c.ids[0]));
    // A steward may move or clear the subject column.
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets/transport/vehicles/subject",
        Some(&c.ts),
        Some(r#"{"column": null}"#),
    );
    assert_eq!((status, v["subject"].is_null()), (200, true), "{v}");
    let (status, _) = s.call(
        "POST",
        "/api/v1/datasets/transport/vehicles/subject",
        Some(&c.ta),
        Some(r#"{"column": "owner_id"}"#),
    );
    assert_eq!(status, 403);
}
