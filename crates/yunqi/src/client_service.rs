//! Client commands of Serve: apply a service definition, list and show services.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::client::{Api, Reply, dataset_name, enc, finish, s};

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
            let (d, n) = dataset_name(&name)?;
            let reply: Reply = api.call(
                "GET",
                &format!("/api/v1/services/{}/{}", enc(&d), enc(&n)),
                None,
            )?;
            finish(reply, json, print_service)
        }
    }
}
