//! The workspace's layers: a crate may depend only on crates of lower layers. A new crate must
//! be given a layer here (and a heading in ARCHITECTURE.md's codemap).

use std::collections::HashMap;

/// Layer of each workspace crate: types → storage → governance → engines → front ends →
/// binary.
const LAYERS: &[(&str, u8)] = &[
    ("yunqi-types", 0),
    ("yunqi-audit", 1),
    ("yunqi-store", 1),
    ("yunqi-datasets", 1),
    ("yunqi-stream", 1),
    ("yunqi-store-pg", 2),
    ("yunqi-stream-nats", 2),
    ("yunqi-store-s3", 2),
    ("yunqi-governance", 3),
    ("yunqi-sql", 4),
    ("yunqi-sense", 4),
    ("yunqi-serve", 5),
    ("yunqi-api", 6),
    ("yunqi-pg", 6),
    ("yunqi", 7),
];

#[test]
fn crates_depend_only_on_lower_layers() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers: HashMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut problems = Vec::new();
    for package in meta["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap();
        let Some(&layer) = layers.get(name) else {
            problems.push(format!(
                "crate {name} has no layer: add it to LAYERS in this test and to ARCHITECTURE.md"
            ));
            continue;
        };
        for dep in package["dependencies"].as_array().unwrap() {
            let dep_name = dep["name"].as_str().unwrap();
            if dep["kind"].as_str() == Some("dev") {
                continue;
            }
            if let Some(&dep_layer) = layers.get(dep_name)
                && dep_layer >= layer
            {
                problems.push(format!(
                    "{name} (layer {layer}) depends on {dep_name} (layer {dep_layer})"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn library_crates_document_every_public_item_and_every_module() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let mut problems = Vec::new();
    for (name, _) in LAYERS {
        let src = root.join(name).join("src");
        let lib = src.join("lib.rs");
        if lib.exists()
            && !std::fs::read_to_string(&lib)
                .unwrap()
                .contains("#![deny(missing_docs)]")
        {
            problems.push(format!("{name}/src/lib.rs lacks #![deny(missing_docs)]"));
        }
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if !text.trim_start().starts_with("//!") {
                    problems.push(format!(
                        "{} does not start with a //! module comment",
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
