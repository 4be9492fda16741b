//! The dataset store at its boundary: CSV in, versions and Parquet files out, every bad row
//! accounted for, nothing half-written.

use std::sync::Arc;

use chrono::Utc;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use yunqi_datasets::{Column, ColumnType, DatasetSpec, DatasetStore, ImportOptions, Mode};
use yunqi_types::{ColumnClass, Detected, ErrorCode, Name};

const VEHICLES: &str = "plate,owner_id,姓名,mobile,seats,registered\n\
浙A12345,11010519491231002X,张三,13812345678,5,2020-01-02\n\
沪B54321,11010519491231002X,李四,13912345678,7,2019-05-06\n\
浙AD1234,11010519491231002X,王五,15012345678,5,2021-11-30\n";

/// name, label, type, class, detected
type ColumnRow<'a> = (
    &'a str,
    Option<&'a str>,
    ColumnType,
    ColumnClass,
    Option<Detected>,
);

fn store() -> (tempfile::TempDir, Arc<DatasetStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = DatasetStore::open(&dir.path().join("datasets"), 64 << 20).unwrap();
    (dir, store)
}

fn spec(name: &str, columns: Vec<Column>) -> DatasetSpec {
    DatasetSpec {
        on_node: false,
        department: Name::parse("department", "transport").unwrap(),
        name: Name::parse("dataset", name).unwrap(),
        description: "registered vehicles".into(),
        columns,
        subject: None,
        tags: vec![],
    }
}

fn strict(mode: Mode) -> ImportOptions {
    ImportOptions {
        mode,
        key: vec![],
        lenient: false,
        delimiter: None,
        header: None,
        format: None,
    }
}

fn rows_in(store: &DatasetStore, dataset: &str) -> usize {
    let m = store.get("transport", dataset).unwrap();
    store
        .files(&m, None)
        .unwrap()
        .iter()
        .map(|p| {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap())
                .unwrap()
                .build()
                .unwrap();
            reader.map(|b| b.unwrap().num_rows()).sum::<usize>()
        })
        .sum()
}

fn declared(name: &str, t: ColumnType) -> Column {
    Column {
        name: name.into(),
        label: None,
        column_type: t,
        class: ColumnClass::Internal,
        class_declared: false,
        detected: None,
    }
}

#[test]
fn the_first_import_infers_types_and_classes() {
    let (_d, store) = store();
    store.create(spec("vehicles", vec![]), Utc::now()).unwrap();
    let report = store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "li_wei",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(
        (report.version, report.rows_imported, report.rows_rejected),
        (1, 3, 0)
    );
    let got: Vec<ColumnRow<'_>> = report
        .columns
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.label.as_deref(),
                c.column_type,
                c.class,
                c.detected,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "plate",
                None,
                ColumnType::Text,
                ColumnClass::Personal,
                Some(Detected::Plate)
            ),
            (
                "owner_id",
                None,
                ColumnType::Text,
                ColumnClass::Sensitive,
                Some(Detected::IdNumber)
            ),
            (
                "c3",
                Some("姓名"),
                ColumnType::Text,
                ColumnClass::Personal,
                Some(Detected::PersonName)
            ),
            (
                "mobile",
                None,
                ColumnType::Text,
                ColumnClass::Personal,
                Some(Detected::Mobile)
            ),
            ("seats", None, ColumnType::Int, ColumnClass::Internal, None),
            (
                "registered",
                None,
                ColumnType::Date,
                ColumnClass::Internal,
                None
            ),
        ]
    );
    assert_eq!(rows_in(&store, "vehicles"), 3);
    let m = store.get("transport", "vehicles").unwrap();
    assert_eq!(m.versions[0].created_by, "li_wei");
    assert!(m.versions[0].bytes > 0);
}

#[test]
fn a_strict_import_with_bad_rows_changes_nothing_and_names_them() {
    let (_d, store) = store();
    store.create(spec("vehicles", vec![]), Utc::now()).unwrap();
    store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    let bad = "plate,owner_id,姓名,mobile,seats,registered\n浙A11111,11010519491231002X,赵六,13812345678,five,2020-01-02\n浙A22222,only,three\n浙A33333,11010519491231002X,孙七,13812345678,4,2020-13-45\n";
    let e = store
        .import_csv(
            "transport",
            "vehicles",
            bad.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(
        e.message.contains("3 of 3 rows are invalid"),
        "{}",
        e.message
    );
    let detail = e.detail.unwrap();
    assert!(
        detail.contains("line 2, column seats: \"five\" is not an integer"),
        "{detail}"
    );
    assert!(
        detail.contains("line 3: expected 6 fields, found 3"),
        "{detail}"
    );
    assert!(detail.contains("line 4, column registered"), "{detail}");
    assert!(e.hint.unwrap().contains("--lenient"));
    let m = store.get("transport", "vehicles").unwrap();
    assert_eq!(m.versions.len(), 1, "no version was made");
    assert_eq!(rows_in(&store, "vehicles"), 3);
}

#[test]
fn a_lenient_import_keeps_good_rows_and_every_bad_one_in_the_rejects() {
    let (_d, store) = store();
    store.create(spec("vehicles", vec![]), Utc::now()).unwrap();
    store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    let mixed = "浙A11111,11010519491231002X,赵六,13812345678,five,2020-01-02\n浙A44444,11010519491231002X,周八,13812345678,2,2022-02-02\n";
    let r = store
        .import_csv(
            "transport",
            "vehicles",
            mixed.as_bytes(),
            ImportOptions {
                lenient: true,
                ..strict(Mode::Append)
            },
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(
        (r.version, r.rows_imported, r.rows_rejected, r.rows_total),
        (2, 1, 1, 4)
    );
    assert!(!r.header, "no header: fields are positional");
    assert_eq!(r.rejects[0].line, 1);
    assert_eq!(r.rejects[0].column.as_deref(), Some("seats"));
    let m = store.get("transport", "vehicles").unwrap();
    let rejects = m.versions[1].rejects_file.clone().expect("rejects kept");
    let path = _d
        .path()
        .join("datasets")
        .join(&m.department)
        .join(&m.name)
        .join(rejects);
    let batches: Vec<_> =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let batch = &batches[0];
    assert_eq!(batch.num_rows(), 1);
    let reason = batch.column_by_name("reason").unwrap();
    let reason = reason
        .as_any()
        .downcast_ref::<datafusion::arrow::array::StringArray>()
        .unwrap();
    assert_eq!(reason.value(0), "\"five\" is not an integer");
    assert_eq!(rows_in(&store, "vehicles"), 4);
    // Replacing leaves only the new rows, older versions stay readable.
    store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Replace),
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(rows_in(&store, "vehicles"), 3);
    let m = store.get("transport", "vehicles").unwrap();
    assert_eq!(
        m.versions.iter().map(|v| v.rows).collect::<Vec<_>>(),
        vec![3, 4, 3]
    );
    assert_eq!(store.files(&m, Some(2)).unwrap().len(), 2);
    assert_eq!(
        store.files(&m, Some(9)).unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[test]
fn gbk_files_tabs_and_headers_in_another_order_are_read() {
    let (_d, store) = store();
    store
        .create(
            spec(
                "permits",
                vec![
                    declared("plate", ColumnType::Text),
                    declared("days", ColumnType::Int),
                    declared("ok", ColumnType::Bool),
                ],
            ),
            Utc::now(),
        )
        .unwrap();
    let text = "ok\tplate\tdays\n是\t浙A12345\t3\n否\t沪B54321\t12\n";
    let (gbk, _, unmappable) = encoding_rs::GBK.encode(text);
    assert!(!unmappable);
    assert!(
        std::str::from_utf8(&gbk).is_err(),
        "the test file really is GBK"
    );
    let r = store
        .import_csv(
            "transport",
            "permits",
            &gbk,
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_or_else(|e| panic!("{}: {:?}", e.message, e.detail));
    assert_eq!(
        (
            r.rows_imported,
            r.encoding.as_str(),
            r.delimiter.as_str(),
            r.header
        ),
        (2, "GB18030", "\t", true)
    );
    assert_eq!(
        r.columns.iter().find(|c| c.name == "plate").unwrap().class,
        ColumnClass::Personal
    );
    let semi = "\u{feff}plate;days;ok\n浙A99999;1;true\n";
    let r = store
        .import_csv(
            "transport",
            "permits",
            semi.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(
        (r.rows_total, r.delimiter.as_str(), r.encoding.as_str()),
        (3, ";", "UTF-8")
    );
    // A two-byte GBK character cut in half at the end: that line is readable as neither
    // encoding, and is a bad row (the rest of the file is GBK).
    let garbage = b"plate;days;ok\n\xd5\xe3A1;1;true\n\xd5";
    let e = store
        .import_csv(
            "transport",
            "permits",
            garbage,
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(
        e.detail
            .as_deref()
            .unwrap_or("")
            .contains("line 3: the line is neither UTF-8 nor GBK"),
        "{} {:?}",
        e.message,
        e.detail
    );
    // Nothing readable at all is refused whole.
    let e = store
        .import_csv(
            "transport",
            "permits",
            b"\xd5",
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(e.message.contains("neither UTF-8 nor GBK"), "{}", e.message);
}

#[test]
fn declared_classes_stay_and_orphans_from_a_crash_are_removed() {
    let (dir, store) = store();
    store.create(spec("vehicles", vec![]), Utc::now()).unwrap();
    store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    store
        .set_class("transport", "vehicles", "plate", ColumnClass::Public)
        .unwrap();
    store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    let m = store.get("transport", "vehicles").unwrap();
    assert_eq!(
        m.column("plate").unwrap().class,
        ColumnClass::Public,
        "a declared class is kept"
    );
    assert_eq!(
        store
            .set_class("transport", "vehicles", "plat", ColumnClass::Public)
            .unwrap_err()
            .hint
            .unwrap(),
        "did you mean \"plate\"?"
    );
    // A file an interrupted import left behind is not part of any version and goes at the next open.
    let orphan = dir
        .path()
        .join("datasets/transport/vehicles/data/v000009-dead.parquet");
    std::fs::write(&orphan, b"half").unwrap();
    drop(store);
    let store = DatasetStore::open(&dir.path().join("datasets"), 64 << 20).unwrap();
    assert!(!orphan.exists());
    assert_eq!(rows_in(&store, "vehicles"), 6);
}

#[test]
fn limits_and_names() {
    let (_d, store) = store();
    store.create(spec("vehicles", vec![]), Utc::now()).unwrap();
    let e = store
        .create(spec("vehicles", vec![]), Utc::now())
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyExists);
    let e = store
        .create(spec("vehicles__rejects", vec![]), Utc::now())
        .unwrap_err();
    assert!(e.detail.unwrap().contains("__rejects"));
    let e = store.get("transport", "vehicle").unwrap_err();
    assert_eq!(e.hint.unwrap(), "did you mean \"transport.vehicles\"?");
    let small = DatasetStore::open(&_d.path().join("small"), 10).unwrap();
    small.create(spec("t", vec![]), Utc::now()).unwrap();
    let e = small
        .import_csv(
            "transport",
            "t",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.detail.unwrap().contains("import_bytes_max"));
}

#[test]
fn ndjson_is_read_like_csv_with_the_same_checks() {
    let (_d, store) = store();
    store.create(spec("events", vec![]), Utc::now()).unwrap();
    let first = r#"{"plate": "浙A12345", "speed": 42.5, "count": 3, "ok": true, "seen": "2026-11-26T08:00:00+08:00"}
{"plate": "沪B54321", "speed": 61, "count": 1, "ok": false, "seen": "2026-11-26T09:30:00Z"}

{"plate": "浙AD1234", "count": 2}
"#;
    let r = store
        .import_csv(
            "transport",
            "events",
            first.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(
        (r.format, r.rows_imported, r.rows_rejected),
        (yunqi_datasets::Format::Ndjson, 3, 0)
    );
    let types: Vec<(&str, ColumnType, ColumnClass)> = r
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.column_type, c.class))
        .collect();
    assert_eq!(
        types,
        vec![
            ("plate", ColumnType::Text, ColumnClass::Personal),
            ("speed", ColumnType::Float, ColumnClass::Internal),
            ("count", ColumnType::Int, ColumnClass::Internal),
            ("ok", ColumnType::Bool, ColumnClass::Internal),
            ("seen", ColumnType::Timestamp, ColumnClass::Internal),
        ]
    );
    let bad = r#"{"plate": "浙A00001", "count": "many"}
{"plate": "浙A00002", "colour": "red"}
{"plate": ["浙A00003"]}
not json
[1, 2]
{"plate": "浙A00004", "count": 7}
"#;
    let e = store
        .import_csv(
            "transport",
            "events",
            bad.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(
        e.message.contains("5 of 6 rows are invalid"),
        "{}",
        e.message
    );
    let r = store
        .import_csv(
            "transport",
            "events",
            bad.as_bytes(),
            ImportOptions {
                lenient: true,
                ..strict(Mode::Append)
            },
            "x",
            Utc::now(),
        )
        .unwrap();
    let reasons: Vec<(u64, String)> = r
        .rejects
        .iter()
        .map(|j| (j.line, j.reason.clone()))
        .collect();
    assert_eq!(reasons[0], (1, "\"many\" is not an integer".to_string()));
    assert_eq!(reasons[1], (2, "unknown field \"colour\"".to_string()));
    assert_eq!(
        reasons[2],
        (3, "is an array or object, not a value".to_string())
    );
    assert!(
        reasons[3].1.starts_with("the line is not valid JSON"),
        "{reasons:?}"
    );
    assert_eq!(reasons[4], (5, "the line is not a JSON object".to_string()));
    assert_eq!((r.rows_imported, r.rows_total), (1, 4));
}

/// A Parquet file of `batch`.
fn parquet_bytes(batch: &datafusion::arrow::array::RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
    out
}

#[test]
fn parquet_files_are_detected_typed_classified_and_checked() {
    use datafusion::arrow::array::{Int32Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let (_d, store) = store();
    store.create(spec("owners", vec![]), Utc::now()).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("plate", DataType::Utf8, true),
        Field::new("owner_id", DataType::Utf8, true),
        Field::new("seats", DataType::Int32, true),
    ]));
    let first = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["浙A12345", "沪B54321"])),
            Arc::new(StringArray::from(vec![
                "11010519491231002X",
                "11010519491231002X",
            ])),
            Arc::new(Int32Array::from(vec![5, 7])),
        ],
    )
    .unwrap();
    let r = store
        .import_csv(
            "transport",
            "owners",
            &parquet_bytes(&first),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(
        (r.format, r.rows_imported),
        (yunqi_datasets::Format::Parquet, 2)
    );
    let got: Vec<(&str, ColumnType, ColumnClass)> = r
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.column_type, c.class))
        .collect();
    assert_eq!(
        got,
        [
            ("plate", ColumnType::Text, ColumnClass::Personal),
            ("owner_id", ColumnType::Text, ColumnClass::Sensitive),
            ("seats", ColumnType::Int, ColumnClass::Internal),
        ]
    );
    assert_eq!(
        store.get("transport", "owners").unwrap().subject.as_deref(),
        Some("owner_id")
    );

    // Seats as text, one of them not a number; columns in another order; one missing.
    let schema = Arc::new(Schema::new(vec![
        Field::new("seats", DataType::Utf8, true),
        Field::new("plate", DataType::Utf8, true),
    ]));
    let second = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![Some("4"), Some("four"), None])),
            Arc::new(StringArray::from(vec!["浙A11111", "浙A22222", "浙A33333"])),
        ],
    )
    .unwrap();
    let bytes = parquet_bytes(&second);
    let e = store
        .import_csv(
            "transport",
            "owners",
            &bytes,
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(
        e.detail.unwrap().contains("line 2, column seats"),
        "{}",
        e.message
    );
    let r = store
        .import_csv(
            "transport",
            "owners",
            &bytes,
            ImportOptions {
                lenient: true,
                ..strict(Mode::Append)
            },
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!((r.rows_imported, r.rows_rejected, r.rows_total), (2, 1, 4));
    assert_eq!(rows_in(&store, "owners"), 4);

    // A column the dataset does not have is refused with what to do; a cut file too.
    let schema = Arc::new(Schema::new(vec![Field::new("color", DataType::Utf8, true)]));
    let third =
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["red"]))]).unwrap();
    let e = store
        .import_csv(
            "transport",
            "owners",
            &parquet_bytes(&third),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(e.hint.unwrap().contains("add-column"), "{}", e.message);
    let mut cut = parquet_bytes(&first);
    cut.truncate(cut.len() - 10);
    let e = store
        .import_csv(
            "transport",
            "owners",
            &cut,
            ImportOptions {
                format: Some(yunqi_datasets::Format::Parquet),
                ..strict(Mode::Append)
            },
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput, "{}", e.message);
    assert_eq!(rows_in(&store, "owners"), 4, "nothing changed");
}

#[test]
fn upserts_replace_rows_by_key_and_reject_key_conflicts() {
    let (_d, store) = store();
    store.create(spec("vehicles", vec![]), Utc::now()).unwrap();
    store
        .import_csv(
            "transport",
            "vehicles",
            VEHICLES.as_bytes(),
            strict(Mode::Append),
            "x",
            Utc::now(),
        )
        .unwrap();
    let upsert = |key: &[&str]| ImportOptions {
        key: key.iter().map(|k| k.to_string()).collect(),
        ..strict(Mode::Upsert)
    };
    // No key, or a key the dataset does not have: refused, saying what to do.
    let change = "plate,owner_id,姓名,mobile,seats,registered\n\
沪B54321,11010519491231002X,李四,13912345678,9,2019-05-06\n\
浙B00001,11010519491231002X,赵六,13712345678,4,2022-01-01\n";
    let e = store
        .import_csv(
            "transport",
            "vehicles",
            change.as_bytes(),
            upsert(&[]),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(e.hint.unwrap().contains("--key"));
    let e = store
        .import_csv(
            "transport",
            "vehicles",
            change.as_bytes(),
            upsert(&["plat"]),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    assert!(e.hint.unwrap().contains("plate"));
    // One row replaced, one added.
    let r = store
        .import_csv(
            "transport",
            "vehicles",
            change.as_bytes(),
            upsert(&["plate"]),
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!((r.rows_imported, r.rows_replaced, r.rows_total), (2, 1, 4));
    assert_eq!(rows_in(&store, "vehicles"), 4);
    let m = store.get("transport", "vehicles").unwrap();
    assert_eq!(m.current().unwrap().mode, "upsert by plate");
    // A key twice in one file, or an empty key: strict refuses naming the lines; lenient
    // keeps the first and rejects the rest.
    let conflict = "plate,owner_id,姓名,mobile,seats,registered\n\
浙A12345,11010519491231002X,张三,13812345678,6,2020-01-02\n\
浙A12345,11010519491231002X,张三,13812345678,8,2020-01-02\n\
,11010519491231002X,无名,13812345678,8,2020-01-02\n";
    let e = store
        .import_csv(
            "transport",
            "vehicles",
            conflict.as_bytes(),
            upsert(&["plate"]),
            "x",
            Utc::now(),
        )
        .unwrap_err();
    let detail = e.detail.unwrap();
    assert!(
        detail.contains("line 3: key (plate) repeats the row of line 2")
            && detail.contains("line 4: key (plate) is empty"),
        "{detail}"
    );
    let r = store
        .import_csv(
            "transport",
            "vehicles",
            conflict.as_bytes(),
            ImportOptions {
                lenient: true,
                ..upsert(&["plate"])
            },
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!(
        (
            r.rows_imported,
            r.rows_rejected,
            r.rows_replaced,
            r.rows_total
        ),
        (1, 2, 1, 4)
    );
}

#[test]
fn malformed_files_are_refused_or_kept_aside_never_dropped() {
    let (_d, store) = store();
    let lenient = ImportOptions {
        lenient: true,
        ..strict(Mode::Append)
    };
    let import = |name: &str, bytes: &[u8], options: ImportOptions| {
        if store.get("transport", name).is_err() {
            store.create(spec(name, vec![]), Utc::now()).unwrap();
        }
        store.import_csv("transport", name, bytes, options, "x", Utc::now())
    };

    // A BOM and CRLF line ends: read as if neither were there.
    let crlf = format!("\u{feff}{}", VEHICLES.replace('\n', "\r\n"));
    let r = import("bom", crlf.as_bytes(), strict(Mode::Append)).unwrap();
    assert_eq!((r.rows_imported, r.encoding.as_str()), (3, "UTF-8"));
    assert_eq!(
        r.columns[0].name, "plate",
        "the BOM is not part of the first header"
    );
    assert_eq!(
        r.columns[5].column_type,
        ColumnType::Date,
        "no \\r left in the last field"
    );

    // A file cut in the middle of its last row: that row is ragged.
    let cut = &VEHICLES[..VEHICLES.len() - 20];
    let e = import("cut", cut.as_bytes(), strict(Mode::Append)).unwrap_err();
    assert!(
        e.detail
            .unwrap()
            .contains("line 4: expected 6 fields, found"),
        "{}",
        e.message
    );
    let r = import("cut", cut.as_bytes(), lenient.clone()).unwrap();
    assert_eq!((r.rows_imported, r.rows_rejected), (2, 1));

    // A UTF-8 file with one row pasted from a GBK file: that row is rejected, the rest read
    // as UTF-8 (never garbled by guessing GBK for the whole file).
    let (gbk_row, _, _) =
        encoding_rs::GBK.encode("浙A99999,11010519491231002X,王二,13812345678,5,2020-01-02\n");
    let mut mixed = VEHICLES.as_bytes().to_vec();
    mixed.extend_from_slice(&gbk_row);
    let e = import("mixed", &mixed, strict(Mode::Append)).unwrap_err();
    assert!(
        e.detail
            .unwrap()
            .contains("line 5: the line is not valid UTF-8"),
        "{}",
        e.message
    );
    let r = import("mixed", &mixed, lenient.clone()).unwrap();
    assert_eq!(
        (r.rows_imported, r.rows_rejected, r.encoding.as_str()),
        (3, 1, "UTF-8")
    );
    let names: Vec<String> = rows_text(&store, "mixed", 2);
    assert_eq!(names, ["张三", "李四", "王五"]);

    // A huge field is data like any other; a rejected row's raw text is cut at 1 KiB.
    let huge = "备".repeat(300_000);
    import("huge", VEHICLES.as_bytes(), strict(Mode::Append)).unwrap();
    let file = format!(
        "浙A77777,11010519491231002X,{huge},13812345678,5,2020-01-02\n浙A88888,11010519491231002X,{huge},13812345678,many,2020-01-02\n"
    );
    let r = import("huge", file.as_bytes(), lenient).unwrap();
    assert_eq!((r.rows_imported, r.rows_rejected, r.rows_total), (1, 1, 4));
    assert_eq!(rows_text(&store, "huge", 2)[3].len(), huge.len());
    assert!(r.rejects[0].raw.len() <= 1024);

    // Random bytes and an empty file are refused with a reason, not a panic.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(import("noise", &noise, strict(Mode::Append)).is_err());
    let e = import("empty", b"", strict(Mode::Append)).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput, "{}", e.message);
}

/// The text values of column `column` of a dataset's current version, in file order.
fn rows_text(store: &DatasetStore, dataset: &str, column: usize) -> Vec<String> {
    use datafusion::arrow::array::AsArray;
    let m = store.get("transport", dataset).unwrap();
    let mut out = Vec::new();
    for p in store.files(&m, None).unwrap() {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            out.extend(
                b.column(column)
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap_or("").to_string()),
            );
        }
    }
    out
}

#[test]
fn a_large_import_is_split_over_files_and_cores_without_losing_a_row() {
    let (_d, store) = store();
    store.create(spec("big", vec![]), Utc::now()).unwrap();
    let rows = yunqi_datasets::PARALLEL_ROWS_MIN as usize + 1000;
    let mut csv = String::from("plate,seats\n");
    for i in 0..rows {
        csv.push_str(&format!("浙A{:05},{}\n", i % 100_000, i % 9));
    }
    csv.push_str("浙A99999,many\n");
    let r = store
        .import_csv(
            "transport",
            "big",
            csv.as_bytes(),
            ImportOptions {
                lenient: true,
                ..strict(Mode::Append)
            },
            "x",
            Utc::now(),
        )
        .unwrap();
    assert_eq!((r.rows_imported as usize, r.rows_rejected), (rows, 1));
    assert_eq!(r.rejects[0].line as usize, rows + 2);
    assert_eq!(rows_in(&store, "big"), rows);
    let m = store.get("transport", "big").unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    assert_eq!(m.current().unwrap().files.len(), threads);
}
