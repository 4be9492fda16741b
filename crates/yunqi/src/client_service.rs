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
    /// Apply for a service: `yunqi service request traffic.urgent-entry-permit plate=沪B12345
    /// date=2026-12-01 window=day reason=送货`. Prints the decision and its reasons.
    Request {
        /// `department.service`.
        name: String,
        /// Inputs as NAME=VALUE.
        inputs: Vec<String>,
        /// Sent as the Idempotency-Key: a retry with the same key gets the same decision.
        #[arg(long)]
        key: Option<String>,
    },
    /// One application (`department.service/N`): yours, about you, or your department's.
    Application {
        /// The application's id.
        id: String,
    },
    /// The applications waiting for review (officers and stewards of the department), the
    /// earliest deadline first.
    Queue {
        /// `department.service`.
        name: String,
    },
    /// Review an application: assign it to an officer, approve it, or refuse it with a reason.
    Review {
        /// The application's id (`department.service/N`).
        id: String,
        /// assign, approve or refuse.
        #[arg(value_parser = ["assign", "approve", "refuse"])]
        action: String,
        /// Why (required to refuse; the applicant reads it).
        #[arg(long)]
        reason: Option<String>,
        /// The officer (assign).
        #[arg(long)]
        to: Option<String>,
    },
    /// Repay money an application drew on its line (all that is owed, or --amount yuan).
    Repay {
        /// The application's id.
        id: String,
        /// Yuan.
        #[arg(long)]
        amount: Option<f64>,
    },
}

#[derive(Subcommand)]
pub enum ConsentCommand {
    /// Consent to a service that asks for it (e.g. health.credit-healthcare); citizens only.
    Give {
        /// `department.service`.
        name: String,
    },
    /// Withdraw a consent.
    Withdraw {
        /// `department.service`.
        name: String,
    },
    /// The consents you have given.
    List,
}

fn service_path(name: &str) -> anyhow::Result<String> {
    let (d, n) = dataset_name(name).map_err(|_| {
        anyhow::anyhow!(
            "invalid service name {name:?}\nhint: name a service as DEPARTMENT.SERVICE, e.g. traffic.urgent-entry-permit"
        )
    })?;
    Ok(format!("/api/v1/services/{}/{}", enc(&d), enc(&n)))
}

fn application_path(id: &str) -> anyhow::Result<String> {
    let (service, n) = id.split_once('/').ok_or_else(|| {
        anyhow::anyhow!(
            "invalid application id {id:?}\nhint: an application id looks like market.business-registration/42"
        )
    })?;
    Ok(format!(
        "{}/applications/{}",
        service_path(service)?,
        enc(n)
    ))
}

fn print_decision(v: &serde_json::Value) {
    println!("{} {}", s(&v["id"]), s(&v["decision"]));
    for r in v["reasons"].as_array().into_iter().flatten() {
        println!("  reason: {}", s(r));
    }
    if let Some(due) = v["due_at"].as_str() {
        println!("  review due by {due}");
    }
    if let Some(by) = v["review"]["decided_by"].as_str() {
        println!("  reviewed by {by}");
    } else if let Some(a) = v["review"]["assignee"].as_str() {
        println!("  assigned to {a}");
    }
    if !v["draw"].is_null() {
        println!(
            "  drew {} yuan on line {}, owes {} by {}",
            v["draw"]["yuan"],
            s(&v["draw"]["line"]),
            v["draw"]["owed_yuan"],
            s(&v["draw"]["due_at"])
        );
    }
    if let Some(code) = v["document"]["code"].as_str() {
        println!("  code: {code}");
    }
    if let Some(t) = v["document"]["token"].as_str() {
        println!("  document: {t}");
    }
}

pub fn consent(api: &Api, c: ConsentCommand, json: bool) -> anyhow::Result<ExitCode> {
    let (method, name) = match c {
        ConsentCommand::List => {
            return finish(api.call("GET", "/api/v1/me/consents", None)?, json, |v| {
                for c in v["consents"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  since {}",
                        s(&c["service"]),
                        s(&c["title"]),
                        s(&c["given_at"])
                    );
                }
            });
        }
        ConsentCommand::Give { name } => ("PUT", name),
        ConsentCommand::Withdraw { name } => ("DELETE", name),
    };
    let path = service_path(&name)?.replace("/api/v1/services/", "/api/v1/me/consents/");
    finish(api.call(method, &path, None)?, json, |v| {
        println!(
            "{} {}",
            if v["given"] == true {
                "consented to"
            } else {
                "withdrew consent to"
            },
            s(&v["service"])
        );
    })
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
                for w in v["warnings"].as_array().into_iter().flatten() {
                    eprintln!("warning: {}", w.as_str().unwrap_or_default());
                }
            })
        }
        ServiceCommand::List => finish(api.call("GET", "/api/v1/services", None)?, json, |v| {
            for x in v["services"].as_array().into_iter().flatten() {
                print_service(x);
            }
        }),
        ServiceCommand::Show { name } => {
            let reply: Reply = api.call("GET", &service_path(&name)?, None)?;
            finish(reply, json, print_service)
        }
        ServiceCommand::Request { name, inputs, key } => {
            let mut map = serde_json::Map::new();
            for i in &inputs {
                let (k, v) = i.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("input {i:?} is not NAME=VALUE\nhint: e.g. plate=沪B12345")
                })?;
                // Sent as text: every input type reads text (money too).
                map.insert(k.to_string(), serde_json::json!(v));
            }
            let body = serde_json::to_vec(&serde_json::json!({ "inputs": map }))?;
            let headers: Vec<(&str, &str)> = key
                .iter()
                .map(|k| ("Idempotency-Key", k.as_str()))
                .collect();
            let reply = api.post_raw(
                &format!("{}/applications", service_path(&name)?),
                "application/json",
                &headers,
                &body,
            )?;
            finish(reply, json, print_decision)
        }
        ServiceCommand::Application { id } => finish(
            api.call("GET", &application_path(&id)?, None)?,
            json,
            print_decision,
        ),
        ServiceCommand::Queue { name } => finish(
            api.call("GET", &format!("{}/reviews", service_path(&name)?), None)?,
            json,
            |v| {
                let list = v["pending"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("nothing waits for review");
                }
                for d in &list {
                    println!(
                        "{}  due {}{}  {}  {}",
                        s(&d["id"]),
                        s(&d["due_at"]),
                        if d["overdue"] == true {
                            " (OVERDUE)"
                        } else {
                            ""
                        },
                        d["review"]["assignee"].as_str().unwrap_or("unassigned"),
                        d["reasons"]
                            .as_array()
                            .map(|r| r.iter().map(s).collect::<Vec<_>>().join("; "))
                            .unwrap_or_default()
                    );
                }
            },
        ),
        ServiceCommand::Review {
            id,
            action,
            reason,
            to,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(r) = reason {
                body.insert("reason".into(), r.into());
            }
            if let Some(t) = to {
                body.insert("assignee".into(), t.into());
            }
            let path = format!("{}/{action}", application_path(&id)?);
            finish(
                api.call("POST", &path, Some(serde_json::Value::Object(body)))?,
                json,
                print_decision,
            )
        }
        ServiceCommand::Repay { id, amount } => {
            let body = match amount {
                Some(a) => serde_json::json!({ "amount": a }),
                None => serde_json::json!({}),
            };
            let path = format!("{}/repay", application_path(&id)?);
            finish(api.call("POST", &path, Some(body))?, json, print_decision)
        }
    }
}
