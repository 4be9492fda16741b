//! Client commands of Sense: streams (list, show, replay a file of events) and continuous
//! views (list, show).

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;

use crate::client::{Api, Reply, dataset_name, enc, finish, s};

#[derive(Subcommand)]
pub enum StreamCommand {
    /// Streams, with the events each holds. Declare one in SQL:
    /// `yunqi sql "CREATE STREAM traffic.detections (…) WITH (event_time = 'ts', watermark = '5 seconds')"`.
    List,
    /// One stream's declaration.
    Show {
        /// `department.stream`.
        name: String,
    },
    /// Send a file of events (NDJSON, or CSV with a header) in batches; each batch is
    /// acknowledged once durable. Bad events are listed with their line number.
    Replay {
        /// `department.stream`.
        name: String,
        /// The file.
        file: std::path::PathBuf,
        /// Events per request.
        #[arg(long, default_value_t = 50_000)]
        batch: usize,
        /// Refuse a batch whole if any event in it is bad.
        #[arg(long)]
        atomic: bool,
        /// Send the events even if this file was replayed before. Without it each batch
        /// carries an idempotency key made of the file's content and the batch's place in it,
        /// so re-running an interrupted replay appends only what is missing.
        #[arg(long)]
        again: bool,
    },
}

#[derive(Subcommand)]
pub enum ViewCommand {
    /// Continuous views with their progress. Create one in SQL:
    /// `yunqi sql "CREATE CONTINUOUS VIEW traffic.flow_1m AS SELECT … FROM TUMBLE(…) GROUP BY …"`.
    List,
    /// One view's progress: offset, watermark, windows written, late events.
    Show {
        /// `department.view`.
        name: String,
    },
}

fn print_view(v: &Value) {
    println!(
        "{}  over {}: offset {}, watermark {}, written through {}, {} windows written, {} events in, {} late, {} filtered{}",
        s(&v["view"]),
        s(&v["stream"]),
        v["offset"],
        v["watermark"].as_str().unwrap_or("-"),
        v["written_through"].as_str().unwrap_or("-"),
        v["windows_written"],
        v["events_in"],
        v["events_late"],
        v["events_filtered"],
        v["error"]
            .as_str()
            .map(|e| format!("\n  error: {e}"))
            .unwrap_or_default()
    );
}

pub fn view(api: &Api, c: ViewCommand, json: bool) -> anyhow::Result<ExitCode> {
    match c {
        ViewCommand::List => finish(api.call("GET", "/api/v1/views", None)?, json, |v| {
            for x in v["views"].as_array().into_iter().flatten() {
                print_view(x);
            }
        }),
        ViewCommand::Show { name } => {
            let (d, n) = dataset_name(&name)?;
            finish(
                api.call(
                    "GET",
                    &format!("/api/v1/views/{}/{}", enc(&d), enc(&n)),
                    None,
                )?,
                json,
                print_view,
            )
        }
    }
}

fn print_stream(v: &Value) {
    let cols: Vec<String> = v["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{} {}", s(&c["name"]), s(&c["type"])))
        .collect();
    println!(
        "{} ({})  event time {}, watermark {} ms, {} events",
        s(&v["sql_name"]),
        cols.join(", "),
        s(&v["event_time"]),
        v["watermark_ms"],
        v["events"]
    );
}

pub fn stream(api: &Api, c: StreamCommand, json: bool) -> anyhow::Result<ExitCode> {
    match c {
        StreamCommand::List => finish(api.call("GET", "/api/v1/streams", None)?, json, |v| {
            for x in v["streams"].as_array().into_iter().flatten() {
                print_stream(x);
            }
        }),
        StreamCommand::Show { name } => {
            let (d, n) = dataset_name(&name)?;
            finish(
                api.call(
                    "GET",
                    &format!("/api/v1/streams/{}/{}", enc(&d), enc(&n)),
                    None,
                )?,
                json,
                print_stream,
            )
        }
        StreamCommand::Replay {
            name,
            file,
            batch,
            atomic,
            again,
        } => replay(api, &name, &file, batch.max(1), atomic, again, json),
    }
}

fn replay(
    api: &Api,
    name: &str,
    file: &std::path::Path,
    batch: usize,
    atomic: bool,
    again: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (d, n) = dataset_name(name)?;
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read {} (events are UTF-8 NDJSON or CSV)",
            file.display()
        )
    })?;
    let csv = !text.trim_start().starts_with('{');
    let (header, body) = if csv {
        let (h, b) = text.split_once('\n').unwrap_or((&text, ""));
        (Some(h), b)
    } else {
        (None, text.as_str())
    };
    let path = format!(
        "/api/v1/streams/{}/{}/events?format={}{}",
        enc(&d),
        enc(&n),
        if csv { "csv" } else { "ndjson" },
        if atomic { "&atomic=true" } else { "" }
    );
    let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
    let file_key = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(text.as_bytes());
        digest[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let (mut accepted, mut rejected, mut end, mut duplicates) = (0u64, 0u64, 0u64, 0u64);
    let mut shown = Vec::new();
    let started = std::time::Instant::now();
    for (k, chunk) in lines.chunks(batch).enumerate() {
        let mut payload =
            String::with_capacity(chunk.iter().map(|l| l.len() + 1).sum::<usize>() + 64);
        if let Some(h) = header {
            payload.push_str(h);
            payload.push('\n');
        }
        for l in chunk {
            payload.push_str(l);
            payload.push('\n');
        }
        let ct = if csv {
            "text/csv"
        } else {
            "application/x-ndjson"
        };
        let key = format!("replay-{file_key}-{batch}-{k}");
        let headers: &[(&str, &str)] = if again {
            &[]
        } else {
            &[("Idempotency-Key", key.as_str())]
        };
        match api.post_raw(&path, ct, headers, payload.as_bytes())? {
            Reply::Ok(v) if v["duplicate"] == true => {
                duplicates += v["accepted"].as_u64().unwrap_or(0);
                end = v["end_offset"].as_u64().unwrap_or(end);
            }
            Reply::Ok(v) => {
                accepted += v["accepted"].as_u64().unwrap_or(0);
                rejected += v["rejected"].as_u64().unwrap_or(0);
                end = v["end_offset"].as_u64().unwrap_or(end);
                for r in v["rejections"].as_array().into_iter().flatten() {
                    if shown.len() < 20 {
                        let line = k * batch
                            + r["index"].as_u64().unwrap_or(0) as usize
                            + 1
                            + usize::from(csv);
                        shown.push(format!("  line {line}: {}", s(&r["reason"])));
                    }
                }
            }
            err @ Reply::Error(..) => return finish(err, json, |_| {}),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let out = serde_json::json!({"stream": name, "accepted": accepted, "rejected": rejected,
        "already_sent": duplicates, "end_offset": end, "seconds": secs});
    finish(Reply::Ok(out), json, |_| {
        println!(
            "{name}: {accepted} events sent and durable, {rejected} rejected, in {secs:.1} s ({:.0} events/s); the stream ends at offset {end}",
            accepted as f64 / secs.max(1e-9)
        );
        if duplicates > 0 {
            println!(
                "{duplicates} events of this file were in the stream already (an earlier replay sent them; --again sends them anyway)"
            );
        }
        for l in &shown {
            println!("{l}");
        }
    })
}
