//! Datasets end to end against the real binary: a steward creates and imports (CLI and HTTP),
//! its department queries (HTTP and psql), other departments and the platform admin see the
//! catalog entry but not the data, and every step is audited.

mod common;

use common::{Server, cli, psql};
use serde_json::Value;

const VEHICLES: &str = "plate,owner_id,姓名,mobile,seats,registered\n\
浙A12345,11010519491231002X,张三,13812345678,5,2020-01-02\n\
沪B54321,11010519491231002X,李四,13912345678,7,2019-05-06\n\
浙AD1234,11010519491231002X,王五,15012345678,5,2021-11-30\n";

fn sql(server: &Server, token: &str, q: &str) -> (u16, Value) {
    server.call(
        "POST",
        "/api/v1/sql",
        Some(token),
        Some(&serde_json::json!({"sql": q}).to_string()),
    )
}

#[test]
fn a_department_publishes_and_queries_its_dataset_and_nobody_else_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.dept("transport");
    server.dept("traffic");
    let li = server.principal("li_wei", "steward", Some("transport"));
    let ann = server.principal("ann", "analyst", Some("transport"));
    let tom = server.principal("tom", "analyst", Some("traffic"));

    // Create with the CLI, import a file with the CLI.
    let (code, out, err) = cli(
        &server,
        &li,
        &[
            "dataset",
            "create",
            "transport.vehicles",
            "--description",
            "机动车登记 registered vehicles",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let file = dir.path().join("vehicles.csv");
    std::fs::write(&file, VEHICLES).unwrap();
    let (code, out, err) = cli(
        &server,
        &li,
        &[
            "--json",
            "import",
            "transport.vehicles",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["version"].as_u64(), report["rows_imported"].as_u64()),
        (Some(1), Some(3))
    );
    let classes: Vec<(&str, &str)> = report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["class"].as_str().unwrap()))
        .collect();
    assert_eq!(
        classes,
        vec![
            ("plate", "personal"),
            ("owner_id", "sensitive"),
            ("c3", "personal"),
            ("mobile", "personal"),
            ("seats", "internal"),
            ("registered", "internal")
        ]
    );

    // A strict import with a bad row is refused, naming the line; a lenient one keeps it aside.
    let bad = "浙A77777,11010519491231002X,赵六,13812345678,five,2020-01-02\n浙A88888,11010519491231002X,钱七,13812345678,4,2020-01-03\n";
    let path = "/api/v1/datasets/transport/vehicles/import";
    let (status, v) = server.call("POST", path, Some(&li), Some(bad));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("line 1, column seats"),
        "{v}"
    );
    let (status, v) = server.call(
        "POST",
        &format!("{path}?lenient=true"),
        Some(&li),
        Some(bad),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["version"].as_u64(),
            v["rows_rejected"].as_u64(),
            v["rows_total"].as_u64()
        ),
        (Some(2), Some(1), Some(4))
    );

    // The department queries it, over HTTP and psql.
    let (status, v) = sql(
        &server,
        &ann,
        "SELECT plate, seats FROM transport.vehicles WHERE seats > 4 ORDER BY plate",
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["rows"],
        serde_json::json!([["沪B54321", 7], ["浙A12345", 5], ["浙AD1234", 5]])
    );
    let (code, out, err) = psql(
        &server,
        "ann",
        &ann,
        "yunqi",
        "SELECT count(*), min(registered) FROM transport.vehicles",
    );
    assert_eq!((code, out.trim()), (0, "4|2019-05-06"), "{err}");

    // The rejected row is kept, with its version, line, column and reason, for the department.
    let (status, v) = sql(
        &server,
        &li,
        "SELECT version, line, \"column\", reason FROM transport.vehicles__rejects",
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["rows"],
        serde_json::json!([[2, 1, "seats", "\"five\" is not an integer"]])
    );

    // Another department sees the catalog entry, not the data; so does the platform admin.
    let (status, v) = server.call(
        "GET",
        "/api/v1/datasets/transport/vehicles",
        Some(&tom),
        None,
    );
    assert_eq!((status, v["rows"].as_u64()), (200, Some(4)));
    for token in [&tom, &server.admin_token] {
        let (status, v) = sql(&server, token, "SELECT * FROM transport.vehicles");
        assert_eq!(status, 404, "{v}");
        assert_eq!(
            v["error"]["message"],
            "table \"transport.vehicles\" does not exist"
        );
    }
    let (status, v) = sql(
        &server,
        &tom,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'transport'",
    );
    assert_eq!((status, v["rows"][0][0].as_i64()), (200, Some(0)));
    let (status, v) = server.call("POST", path, Some(&tom), Some(bad));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("permission_denied"))
    );
    let (status, _) = server.call(
        "POST",
        "/api/v1/datasets",
        Some(&ann),
        Some(r#"{"department":"transport","name":"x"}"#),
    );
    assert_eq!(status, 403, "an analyst does not create datasets");

    // A declared class stays; the catalog lists the dataset.
    let (code, out, err) = cli(
        &server,
        &li,
        &[
            "--json",
            "dataset",
            "classify",
            "transport.vehicles",
            "seats",
            "public",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&server, &tom, &["--json", "dataset", "list"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["datasets"][0]["sql_name"], "transport.vehicles");
    assert_eq!(list["datasets"][0]["columns"][4]["class"], "public");

    // Catalog search by words (Chinese or English, names, headers) and by class.
    for (query, found) in [
        ("q=%E6%9C%BA%E5%8A%A8%E8%BD%A6", 1),
        ("q=VEHICLES%20seats", 1),
        ("q=%E5%A7%93%E5%90%8D", 1),
        ("q=permits", 0),
        ("class=sensitive", 1),
        ("class=sensitive&q=hospital", 0),
    ] {
        let (status, v) = server.call(
            "GET",
            &format!("/api/v1/datasets?{query}"),
            Some(&tom),
            None,
        );
        assert_eq!(
            (status, v["datasets"].as_array().map(Vec::len)),
            (200, Some(found)),
            "{query}: {v}"
        );
    }
    let (status, v) = server.call("GET", "/api/v1/datasets?class=secret", Some(&tom), None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_input"))
    );
    let (code, out, _) = cli(
        &server,
        &tom,
        &[
            "--json",
            "dataset",
            "list",
            "--search",
            "机动车",
            "--class",
            "personal",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["datasets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Audited: creation, both imports (refused and accepted), the classification, the query, the denial.
    let records = server.audit_all();
    let has = |action: &str, outcome: &str, principal: &str| {
        records.iter().any(|r| {
            r["action"] == action
                && r["outcome"] == outcome
                && r["principal"] == principal
                && r["object"]
                    .as_str()
                    .unwrap_or("")
                    .contains("transport.vehicles")
        })
    };
    assert!(has("dataset.create", "ok", "li_wei"));
    assert!(has("dataset.import", "ok", "li_wei"));
    assert!(has("dataset.import", "failed", "li_wei"));
    assert!(has("dataset.classify", "ok", "li_wei"));
    assert!(has("sql.query", "ok", "ann"));
    assert!(has("dataset.write", "denied", "tom"));
}

#[test]
fn the_cli_upserts_adds_columns_and_reads_older_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.dept("transport");
    let li = server.principal("li_wei", "steward", Some("transport"));
    let ann = server.principal("ann", "analyst", Some("transport"));
    let (code, _, err) = cli(&server, &li, &["dataset", "create", "transport.vehicles"]);
    assert_eq!(code, 0, "{err}");
    let file = dir.path().join("vehicles.csv");
    std::fs::write(&file, VEHICLES).unwrap();
    let f = file.to_str().unwrap();
    let (code, _, err) = cli(&server, &li, &["import", "transport.vehicles", f]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(
        &server,
        &li,
        &[
            "dataset",
            "add-column",
            "transport.vehicles",
            "color:text:public",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("color"), "{out}");
    let change = dir.path().join("change.csv");
    std::fs::write(
        &change,
        "plate,owner_id,姓名,mobile,seats,registered,color\n沪B54321,11010519491231002X,李四,13912345678,9,2019-05-06,red\n",
    )
    .unwrap();
    let (code, _, err) = cli(
        &server,
        &li,
        &[
            "import",
            "transport.vehicles",
            change.to_str().unwrap(),
            "--mode",
            "upsert",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--key"), "{err}");
    let (code, out, err) = cli(
        &server,
        &li,
        &[
            "import",
            "transport.vehicles",
            change.to_str().unwrap(),
            "--mode",
            "upsert",
            "--key",
            "plate",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 replacing rows with the same key") && out.contains("3 in all"),
        "{out}"
    );
    let (status, v) = sql(
        &server,
        &ann,
        "SELECT seats, color FROM transport.vehicles WHERE plate = '沪B54321'",
    );
    assert_eq!(
        (status, v["rows"].clone()),
        (200, serde_json::json!([[9, "red"]]))
    );
    let (status, v) = sql(
        &server,
        &ann,
        "SELECT seats, color FROM transport.vehicles__v1 WHERE plate = '沪B54321'",
    );
    assert_eq!(
        (status, v["rows"].clone()),
        (200, serde_json::json!([[7, null]])),
        "{v}"
    );
}
