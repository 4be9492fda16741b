//! Client commands of Serve: apply a service definition, list and show services.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::client::{Api, Reply, dataset_name, enc, finish, s};

#[derive(Subcommand)]
pub enum DocumentCommand {
    /// Verify a document's signature and validity, offline: with --public-key (published at
    /// /api/v1/documents/public-key) nothing is sent anywhere; without it the key is fetched
    /// from the server first.
    Verify {
        /// The document's token.
        token: String,
        /// The issuing server's public key (base64url).
        #[arg(long)]
        public_key: Option<String>,
    },
}

pub fn document(api: &Api, c: DocumentCommand, json: bool) -> anyhow::Result<ExitCode> {
    let DocumentCommand::Verify { token, public_key } = c;
    let key = match public_key {
        Some(k) => k,
        None => s(&api.get_public("/api/v1/documents/public-key")?["public_key"]).to_string(),
    };
    let claims = match yunqi_serve::document::verify(&token, &key) {
        Ok(c) => c,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "reason": e.message})
                );
            } else {
                eprintln!("not valid: {}", e.message);
            }
            return Ok(ExitCode::from(1));
        }
    };
    let now = chrono::Utc::now();
    let status = if claims.valid_from.is_some_and(|f| now < f) {
        "not yet valid"
    } else if claims.valid_to.is_some_and(|t| now >= t) {
        "expired"
    } else {
        "valid"
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"valid": status == "valid", "status": status, "claims": claims})
        );
    } else {
        println!(
            "{status}: {} ({}), signed by key {}",
            claims.title, claims.id, claims.kid
        );
        for (k, v) in &claims.fields {
            println!("  {k}: {v}");
        }
        if let (Some(f), Some(t)) = (claims.valid_from, claims.valid_to) {
            println!("  valid from {f} until {t}");
        }
    }
    Ok(if status == "valid" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Apply a service definition (a TOML file; see services/ for examples). It is checked
    /// whole — every problem is named with its line — and becomes the service's next version.
    Apply {
        /// The file.
        file: std::path::PathBuf,
    },
    /// The live services.
    List,
    /// One service's live definition.
    Show {
        /// `department.service`.
        name: String,
    },
}

fn print_service(v: &serde_json::Value) {
    let d = &v["definition"];
    println!(
        "{} v{}  {}  ({} inputs, {} lookups, {} quotas, {} rules)",
        s(&v["service"]),
        v["version"],
        s(&d["title"]),
        d["inputs"].as_array().map_or(0, Vec::len),
        d["lookups"].as_array().map_or(0, Vec::len),
        d["quotas"].as_array().map_or(0, Vec::len),
        d["rules"].as_array().map_or(0, Vec::len),
    );
}

pub fn service(api: &Api, c: ServiceCommand, json: bool) -> anyhow::Result<ExitCode> {
    match c {
        ServiceCommand::Apply { file } => {
            let text =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let reply = api.post_raw("/api/v1/services", "application/toml", &[], &text)?;
            finish(reply, json, |v| {
                print!("applied: ");
                print_service(v);
            })
        }
        ServiceCommand::List => finish(api.call("GET", "/api/v1/services", None)?, json, |v| {
            for x in v["services"].as_array().into_iter().flatten() {
                print_service(x);
            }
        }),
        ServiceCommand::Show { name } => {
            let (d, n) = dataset_name(&name).map_err(|_| {
                anyhow::anyhow!(
                    "invalid service name {name:?}\nhint: name a service as DEPARTMENT.SERVICE, e.g. traffic.urgent-entry-permit"
                )
            })?;
            let reply: Reply = api.call(
                "GET",
                &format!("/api/v1/services/{}/{}", enc(&d), enc(&n)),
                None,
            )?;
            finish(reply, json, print_service)
        }
    }
}
