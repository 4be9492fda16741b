//! Client commands: talk to a running server over its HTTP API, print text or `--json`.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// An HTTP client for the API.
pub struct Api {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

/// Files from this size on show a progress bar while they upload.
const PROGRESS_BYTES_MIN: usize = 8 << 20;

/// Reads a file's bytes for the upload and draws `[#####     ] 48% 123/256 MiB` on stderr.
struct Progress<'a> {
    bytes: &'a [u8],
    sent: usize,
    shown: usize,
    show: bool,
}

impl std::io::Read for Progress<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.bytes.len() - self.sent).min(1 << 20);
        buf[..n].copy_from_slice(&self.bytes[self.sent..self.sent + n]);
        self.sent += n;
        let percent = self.sent * 100 / self.bytes.len().max(1);
        if self.show && percent != self.shown {
            self.shown = percent;
            let bar = "#".repeat(percent / 5) + &" ".repeat(20 - percent / 5);
            eprint!(
                "\r[{bar}] {percent:>3}% {}/{} MiB{}",
                self.sent >> 20,
                self.bytes.len() >> 20,
                if self.sent == self.bytes.len() {
                    " uploaded; importing…"
                } else {
                    ""
                }
            );
        }
        Ok(n)
    }
}

/// What the server said: a body, or an error body with its status.
pub enum Reply {
    Ok(Value),
    Error(u16, Value),
}

impl Api {
    pub fn new(url: &str, token: Option<&str>) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        Api {
            agent,
            base: url.trim_end_matches('/').to_string(),
            token: token.map(|t| t.trim().to_string()),
        }
    }

    /// A GET that needs no login (public endpoints).
    pub fn get_public(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut r = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("cannot reach yunqi at {}", self.base))?;
        let text = r.body_mut().read_to_string().unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn auth(&self) -> anyhow::Result<String> {
        match &self.token {
            Some(t) if !t.is_empty() => Ok(format!("Bearer {t}")),
            _ => bail!(
                "no token given\nhint: set YUNQI_TOKEN (the admin's is in DATA/admin.token: export YUNQI_TOKEN=$(cat yunqi-data/admin.token)) or pass --token"
            ),
        }
    }

    /// POSTs a file as the raw body, with a progress bar on a terminal for large files.
    pub fn upload(&self, path: &str, bytes: &[u8]) -> anyhow::Result<Reply> {
        use std::io::IsTerminal;
        let url = format!("{}{path}", self.base);
        let auth = self.auth()?;
        let show = std::io::stderr().is_terminal() && bytes.len() >= PROGRESS_BYTES_MIN;
        let mut reader = Progress {
            bytes,
            sent: 0,
            shown: usize::MAX,
            show,
        };
        let mut response = self
            .agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", bytes.len().to_string())
            .send(ureq::SendBody::from_reader(&mut reader))
            .with_context(|| format!("cannot reach yunqi at {}\nhint: is `yunqi serve` running? set YUNQI_URL to its address", self.base))?;
        if show {
            eprintln!();
        }
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(if (200..300).contains(&status) {
            Reply::Ok(value)
        } else {
            Reply::Error(status, value)
        })
    }

    /// POSTs a body with its content type.
    pub fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.base);
        let auth = self.auth()?;
        let mut request = self
            .agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", content_type);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut response = request
            .send(body)
            .with_context(|| format!("cannot reach yunqi at {}\nhint: is `yunqi serve` running? set YUNQI_URL to its address", self.base))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(if (200..300).contains(&status) {
            Reply::Ok(value)
        } else {
            Reply::Error(status, value)
        })
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.base);
        let auth = self.auth()?;
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(&b),
            ("POST", None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
            ("PUT", _) => self
                .agent
                .put(&url)
                .header("Authorization", &auth)
                .send_empty(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            _ => bail!("unsupported method {method}"),
        };
        let mut response = result.with_context(|| {
            format!("cannot reach yunqi at {}\nhint: is `yunqi serve` running? set YUNQI_URL to its address", self.base)
        })?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(if (200..300).contains(&status) {
            Reply::Ok(value)
        } else {
            Reply::Error(status, value)
        })
    }
}

/// Prints a reply: `ok` renders a success in text mode. Returns the exit code.
pub(crate) fn finish(
    reply: Reply,
    json: bool,
    ok: impl FnOnce(&Value),
) -> anyhow::Result<ExitCode> {
    match reply {
        Reply::Ok(v) => {
            if json {
                println!("{v}");
            } else {
                ok(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error(status, v) => {
            if json {
                println!("{v}");
            } else {
                let e = &v["error"];
                match e["message"].as_str() {
                    Some(m) => {
                        eprintln!("error: {m}");
                        if let Some(d) = e["detail"].as_str() {
                            eprintln!("detail: {d}");
                        }
                        if let Some(h) = e["hint"].as_str() {
                            eprintln!("hint: {h}");
                        }
                    }
                    None => eprintln!("error: HTTP {status}: {v}"),
                }
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(crate) fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'*' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses `--expires`: a duration like `30d`, `12h`, `90m`, or an RFC 3339 time or a date.
pub fn parse_expiry(raw: &str) -> anyhow::Result<String> {
    let now = chrono::Utc::now();
    let unit_seconds = match raw.chars().last() {
        Some('d') => Some(86_400),
        Some('h') => Some(3_600),
        Some('m') => Some(60),
        Some('s') => Some(1),
        _ => None,
    };
    if let Some(unit) = unit_seconds
        && let Ok(n) = raw[..raw.len() - 1].parse::<i64>()
    {
        return Ok((now + chrono::Duration::seconds(n * unit)).to_rfc3339());
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(raw) {
        return Ok(t.to_rfc3339());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .to_rfc3339());
    }
    bail!(
        "invalid expiry {raw:?}\nhint: use a duration (30d, 12h, 90m) or a date (2027-01-31) or an RFC 3339 time"
    )
}

#[derive(Subcommand)]
pub enum DeptCommand {
    /// Create a department (admin).
    Create {
        /// Name: a lowercase identifier, the SQL schema name.
        name: String,
        /// Human title.
        #[arg(long)]
        title: Option<String>,
    },
    /// List departments.
    List,
    /// Show one department.
    Show { name: String },
}

pub fn dept(api: &Api, cmd: DeptCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        DeptCommand::Create { name, title } => {
            let r = api.call(
                "POST",
                "/api/v1/departments",
                Some(json!({"name": name, "title": title})),
            )?;
            finish(r, json, |v| {
                println!("created department {} ({})", s(&v["name"]), s(&v["title"]))
            })
        }
        DeptCommand::List => {
            let r = api.call("GET", "/api/v1/departments", None)?;
            finish(r, json, |v| {
                println!("{:<24} {:<40} created", "name", "title");
                for d in v["departments"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<40} {}",
                        s(&d["name"]),
                        s(&d["title"]),
                        s(&d["created_at"])
                    );
                }
            })
        }
        DeptCommand::Show { name } => {
            let r = api.call("GET", &format!("/api/v1/departments/{}", enc(&name)), None)?;
            finish(r, json, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
    }
}

#[derive(Subcommand)]
pub enum PrincipalCommand {
    /// Create a principal; prints its token once.
    Create {
        /// Name: a lowercase identifier; the user name over the PostgreSQL wire protocol.
        name: String,
        /// Role: admin, steward, analyst, officer, service or citizen.
        #[arg(long)]
        role: String,
        /// Department (steward, analyst, officer, service).
        #[arg(long)]
        dept: Option<String>,
        /// National ID number (citizens).
        #[arg(long)]
        id_number: Option<String>,
        /// Display name.
        #[arg(long)]
        display_name: Option<String>,
        /// When the token expires: 30d, 12h, a date or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List the principals you may see.
    List {
        /// Only this department.
        #[arg(long)]
        dept: Option<String>,
    },
    /// Show one principal.
    Show { name: String },
}

pub fn principal(api: &Api, cmd: PrincipalCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        PrincipalCommand::Create {
            name,
            role,
            dept,
            id_number,
            display_name,
            expires,
        } => {
            let expires = expires.as_deref().map(parse_expiry).transpose()?;
            let body = json!({
                "name": name, "role": role, "department": dept, "id_number": id_number,
                "display_name": display_name, "token_expires_at": expires,
            });
            let r = api.call("POST", "/api/v1/principals", Some(body))?;
            finish(r, json, |v| {
                let p = &v["principal"];
                let t = &v["token"];
                println!(
                    "created principal {} ({}{})",
                    s(&p["name"]),
                    s(&p["role"]),
                    p["department"]
                        .as_str()
                        .map(|d| format!(" of {d}"))
                        .unwrap_or_default()
                );
                println!("token id: {}", s(&t["id"]));
                println!("token:    {}", s(&t["token"]));
                println!("(the token is shown only now; store it safely)");
            })
        }
        PrincipalCommand::List { dept } => {
            let path = match dept {
                Some(d) => format!("/api/v1/principals?department={}", enc(&d)),
                None => "/api/v1/principals".into(),
            };
            let r = api.call("GET", &path, None)?;
            finish(r, json, |v| {
                println!(
                    "{:<24} {:<10} {:<20} display name",
                    "name", "role", "department"
                );
                for p in v["principals"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<10} {:<20} {}",
                        s(&p["name"]),
                        s(&p["role"]),
                        p["department"].as_str().unwrap_or("-"),
                        s(&p["display_name"])
                    );
                }
            })
        }
        PrincipalCommand::Show { name } => {
            let r = api.call("GET", &format!("/api/v1/principals/{}", enc(&name)), None)?;
            finish(r, json, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token for a principal; prints it once.
    Create {
        /// The principal.
        principal: String,
        /// When it expires: 30d, 12h, a date or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        /// Only this principal's.
        #[arg(long)]
        principal: Option<String>,
    },
    /// Revoke a token by id. Idempotent.
    Revoke { id: String },
}

pub fn token(api: &Api, cmd: TokenCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create { principal, expires } => {
            let expires = expires.as_deref().map(parse_expiry).transpose()?;
            let r = api.call(
                "POST",
                &format!("/api/v1/principals/{}/tokens", enc(&principal)),
                Some(json!({"expires_at": expires})),
            )?;
            finish(r, json, |v| {
                println!("token id: {}", s(&v["id"]));
                println!("token:    {}", s(&v["token"]));
                println!("(the token is shown only now; store it safely)");
            })
        }
        TokenCommand::List { principal } => {
            let path = match principal {
                Some(p) => format!("/api/v1/tokens?principal={}", enc(&p)),
                None => "/api/v1/tokens".into(),
            };
            let r = api.call("GET", &path, None)?;
            finish(r, json, |v| {
                println!(
                    "{:<18} {:<24} {:<8} {:<27} expires",
                    "id", "principal", "active", "created"
                );
                for t in v["tokens"].as_array().into_iter().flatten() {
                    println!(
                        "{:<18} {:<24} {:<8} {:<27} {}",
                        s(&t["id"]),
                        s(&t["principal"]),
                        t["active"].as_bool().unwrap_or(false),
                        s(&t["created_at"]),
                        t["expires_at"].as_str().unwrap_or("never")
                    );
                }
            })
        }
        TokenCommand::Revoke { id } => {
            let r = api.call("POST", &format!("/api/v1/tokens/{}/revoke", enc(&id)), None)?;
            finish(r, json, |v| {
                println!(
                    "revoked token {} of {} at {}",
                    s(&v["id"]),
                    s(&v["principal"]),
                    s(&v["revoked_at"])
                )
            })
        }
    }
}

#[derive(Args)]
pub struct AuditListArgs {
    /// Acting principal (exact, or prefix ending in *).
    #[arg(long)]
    principal: Option<String>,
    /// Acting department.
    #[arg(long)]
    dept: Option<String>,
    /// Action, e.g. token.revoke or principal.*.
    #[arg(long)]
    action: Option<String>,
    /// Object, e.g. department:transport or token:*.
    #[arg(long)]
    object: Option<String>,
    /// ok, denied or failed.
    #[arg(long)]
    outcome: Option<String>,
    /// From this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Newest first.
    #[arg(long)]
    desc: bool,
    /// Records per page.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Cursor: after (ascending) or before (descending) this sequence number; in a cluster,
    /// the cursor the previous page printed.
    #[arg(long)]
    cursor: Option<String>,
    /// In a cluster, one node's chain (default: every node's records, merged in time order).
    #[arg(long)]
    node: Option<String>,
}

pub fn audit_list(api: &Api, a: AuditListArgs, json: bool) -> anyhow::Result<ExitCode> {
    let mut q = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("principal", &a.principal),
        ("department", &a.dept),
        ("action", &a.action),
        ("object", &a.object),
        ("outcome", &a.outcome),
        ("since", &a.since),
        ("until", &a.until),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(v)));
        }
    }
    if a.desc {
        q.push("order=desc".into());
    }
    if let Some(n) = &a.node {
        q.push(format!("node={}", enc(n)));
    }
    match &a.cursor {
        Some(c) if c.parse::<u64>().is_ok() => {
            q.push(format!("{}={c}", if a.desc { "before" } else { "after" }))
        }
        Some(c) => q.push(format!("cursor={}", enc(c))),
        None => {}
    }
    let r = api.call("GET", &format!("/api/v1/audit?{}", q.join("&")), None)?;
    finish(r, json, |v| {
        for r in v["records"].as_array().into_iter().flatten() {
            let seq = match r["node"].as_str() {
                Some(n) => format!("{n}/{}", r["seq"]),
                None => r["seq"].to_string(),
            };
            println!(
                "{:>8} {} {:<16} {:<12} {:<18} {:<32} {:<7} {}",
                seq,
                s(&r["time"]),
                s(&r["principal"]),
                s(&r["department"]),
                s(&r["action"]),
                s(&r["object"]),
                s(&r["outcome"]),
                s(&r["detail"])
            );
        }
        if let Some(n) = v["next"].as_u64() {
            println!("more: --cursor {n}");
        } else if let Some(c) = v["next_cursor"].as_str() {
            println!("more: --cursor {c}");
        }
    })
}

pub fn whoami(api: &Api, json: bool) -> anyhow::Result<ExitCode> {
    let r = api.call("GET", "/api/v1/whoami", None)?;
    finish(r, json, |v| {
        let p = &v["principal"];
        println!(
            "{} ({}{}), token {}",
            s(&p["name"]),
            s(&p["role"]),
            p["department"]
                .as_str()
                .map(|d| format!(" of {d}"))
                .unwrap_or_default(),
            s(&v["token_id"])
        );
    })
}

/// Splits `department.dataset`.
pub(crate) fn dataset_name(raw: &str) -> anyhow::Result<(String, String)> {
    match raw.split_once('.') {
        Some((d, n)) if !d.is_empty() && !n.is_empty() && !n.contains('.') => {
            Ok((d.to_string(), n.to_string()))
        }
        _ => bail!(
            "invalid dataset name {raw:?}\nhint: name a dataset as DEPARTMENT.DATASET, e.g. transport.vehicles"
        ),
    }
}

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Create a dataset (stewards of its department).
    Create {
        /// DEPARTMENT.DATASET
        name: String,
        /// What it holds.
        #[arg(long)]
        description: Option<String>,
        /// A column: NAME:TYPE or NAME:TYPE:CLASS (types text, int, float, bool, date, timestamp;
        /// classes public, internal, personal, sensitive). Repeat; leave out to take the columns
        /// from the first import.
        #[arg(long = "column")]
        columns: Vec<String>,
        /// A tag (searchable); repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Derive a dataset from a query over your department's datasets (its lineage is kept).
    Derive {
        /// DEPARTMENT.DATASET (created if needed).
        name: String,
        /// The query.
        #[arg(long)]
        sql: String,
    },
    /// Replace a dataset's tags.
    Tag {
        /// DEPARTMENT.DATASET
        name: String,
        /// The tags.
        tags: Vec<String>,
    },
    /// The catalog: every dataset with its rows and versions.
    List {
        /// Words to find in names, descriptions, column names and headers.
        #[arg(long)]
        search: Option<String>,
        /// Only datasets with a column of this class (e.g. sensitive).
        #[arg(long)]
        class: Option<String>,
    },
    /// One dataset: schema with classes, versions.
    Show {
        /// DEPARTMENT.DATASET
        name: String,
    },
    /// Add a column at the end of the schema (earlier versions read it as NULL).
    AddColumn {
        /// DEPARTMENT.DATASET
        name: String,
        /// NAME:TYPE or NAME:TYPE:CLASS.
        column: String,
    },
    /// Declare the subject column (the person each row is about), or none.
    Subject {
        /// DEPARTMENT.DATASET
        name: String,
        /// The column; leave out with --none.
        column: Option<String>,
        /// No subject column.
        #[arg(long, conflicts_with = "column")]
        none: bool,
    },
    /// Declare a column's class.
    Classify {
        /// DEPARTMENT.DATASET
        name: String,
        /// The column.
        column: String,
        /// public, internal, personal or sensitive.
        class: String,
    },
}

pub fn dataset(api: &Api, cmd: DatasetCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCommand::Derive { name, sql } => {
            let (department, name) = dataset_name(&name)?;
            let r = api.call(
                "POST",
                &format!(
                    "/api/v1/datasets/{}/{}/derive",
                    enc(&department),
                    enc(&name)
                ),
                Some(json!({ "sql": sql })),
            )?;
            finish(r, json, print_dataset)
        }
        DatasetCommand::Tag { name, tags } => {
            let (department, name) = dataset_name(&name)?;
            let r = api.call(
                "POST",
                &format!("/api/v1/datasets/{}/{}/tags", enc(&department), enc(&name)),
                Some(json!({ "tags": tags })),
            )?;
            finish(r, json, print_dataset)
        }
        DatasetCommand::AddColumn { name, column } => {
            let (department, name) = dataset_name(&name)?;
            let spec = match column.split(':').collect::<Vec<_>>().as_slice() {
                [n, t] => json!({"name": n, "type": t}),
                [n, t, class] => json!({"name": n, "type": t, "class": class}),
                _ => {
                    bail!("give the column as NAME:TYPE or NAME:TYPE:CLASS, e.g. color:text:public")
                }
            };
            let r = api.call(
                "POST",
                &format!(
                    "/api/v1/datasets/{}/{}/columns",
                    enc(&department),
                    enc(&name)
                ),
                Some(spec),
            )?;
            finish(r, json, print_dataset)
        }
        DatasetCommand::Subject { name, column, none } => {
            if column.is_none() && !none {
                bail!("name the subject column, or pass --none");
            }
            let (department, name) = dataset_name(&name)?;
            let r = api.call(
                "POST",
                &format!(
                    "/api/v1/datasets/{}/{}/subject",
                    enc(&department),
                    enc(&name)
                ),
                Some(json!({ "column": column })),
            )?;
            finish(r, json, print_dataset)
        }
        DatasetCommand::Create {
            name,
            description,
            columns,
            tags,
        } => {
            let (department, name) = dataset_name(&name)?;
            let mut cols = Vec::new();
            for c in &columns {
                let parts: Vec<&str> = c.split(':').collect();
                match parts.as_slice() {
                    [n, t] => cols.push(json!({"name": n, "type": t})),
                    [n, t, class] => cols.push(json!({"name": n, "type": t, "class": class})),
                    _ => bail!(
                        "invalid column {c:?}\nhint: write NAME:TYPE or NAME:TYPE:CLASS, e.g. plate:text:personal"
                    ),
                }
            }
            let body = json!({"department": department, "name": name, "description": description, "columns": cols, "tags": tags});
            let r = api.call("POST", "/api/v1/datasets", Some(body))?;
            finish(r, json, |v| {
                println!("created dataset {}", s(&v["sql_name"]))
            })
        }
        DatasetCommand::List { search, class } => {
            let mut q = Vec::new();
            if let Some(t) = &search {
                q.push(format!("q={}", enc(t)));
            }
            if let Some(c) = &class {
                q.push(format!("class={}", enc(c)));
            }
            let path = if q.is_empty() {
                "/api/v1/datasets".to_string()
            } else {
                format!("/api/v1/datasets?{}", q.join("&"))
            };
            let r = api.call("GET", &path, None)?;
            finish(r, json, |v| {
                println!(
                    "{:<36} {:>10} {:>8}  description",
                    "dataset", "rows", "versions"
                );
                for d in v["datasets"].as_array().into_iter().flatten() {
                    println!(
                        "{:<36} {:>10} {:>8}  {}",
                        s(&d["sql_name"]),
                        d["rows"],
                        d["versions"].as_array().map_or(0, Vec::len),
                        s(&d["description"])
                    );
                }
            })
        }
        DatasetCommand::Show { name } => {
            let (department, name) = dataset_name(&name)?;
            let r = api.call(
                "GET",
                &format!("/api/v1/datasets/{}/{}", enc(&department), enc(&name)),
                None,
            )?;
            finish(r, json, print_dataset)
        }
        DatasetCommand::Classify {
            name,
            column,
            class,
        } => {
            let (department, name) = dataset_name(&name)?;
            let r = api.call(
                "POST",
                &format!(
                    "/api/v1/datasets/{}/{}/columns/{}/class",
                    enc(&department),
                    enc(&name),
                    enc(&column)
                ),
                Some(json!({"class": class})),
            )?;
            finish(r, json, print_dataset)
        }
    }
}

fn print_dataset(v: &Value) {
    println!("{}  {}", s(&v["sql_name"]), s(&v["description"]));
    let tags: Vec<&str> = v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !tags.is_empty() {
        println!("tags: {}", tags.join(", "));
    }
    if let Some(d) = v["derived_from"].as_object() {
        let sources: Vec<&str> = d["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "derived from: {} (version {}, by {} at {}): {}",
            sources.join(", "),
            d["version"],
            d["by"].as_str().unwrap_or(""),
            d["at"].as_str().unwrap_or(""),
            d["sql"].as_str().unwrap_or("")
        );
    }
    let used: Vec<&str> = v["used_by"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !used.is_empty() {
        println!("used by: {}", used.join(", "));
    }
    if let Some(subject) = v["subject"].as_str() {
        println!("subject column: {subject} (queries returning few rows record whose rows)");
    }
    println!(
        "{:<20} {:<10} {:<10} {:<12} header",
        "column", "type", "class", "detected"
    );
    for c in v["columns"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<10} {:<10} {:<12} {}",
            s(&c["name"]),
            s(&c["type"]),
            format!(
                "{}{}",
                s(&c["class"]),
                if c["class_declared"] == true { "*" } else { "" }
            ),
            c["detected"].as_str().unwrap_or("-"),
            c["label"].as_str().unwrap_or("")
        );
    }
    for ver in v["versions"].as_array().into_iter().flatten() {
        println!(
            "version {} {} by {} ({}): {} rows, {} rejected",
            ver["version"],
            s(&ver["created_at"]),
            s(&ver["created_by"]),
            s(&ver["mode"]),
            ver["rows"],
            ver["rejected"]
        );
    }
    for g in v["grants"].as_array().into_iter().flatten() {
        println!(
            "grant {} ({}) to {} until {}: {} — {}",
            s(&g["id"]),
            s(&g["state"]),
            s(&g["grantee"]),
            s(&g["expires_at"]),
            g["columns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| s(c).to_string())
                .collect::<Vec<_>>()
                .join(", "),
            s(&g["purpose"])
        );
    }
}

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Find datasets by words in names, descriptions and columns (Chinese or English), or by
    /// column class.
    Search {
        /// Words, all of which must appear.
        words: Vec<String>,
        /// Only datasets with a column of this class (e.g. personal).
        #[arg(long)]
        class: Option<String>,
    },
    /// One dataset: owner, schema with classes, rows, size, versions, grants and requests.
    Show {
        /// DEPARTMENT.DATASET
        name: String,
    },
}

pub fn catalog(api: &Api, cmd: CatalogCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        CatalogCommand::Search { words, class } => dataset(
            api,
            DatasetCommand::List {
                search: (!words.is_empty()).then(|| words.join(" ")),
                class,
            },
            json,
        ),
        CatalogCommand::Show { name } => dataset(api, DatasetCommand::Show { name }, json),
    }
}

#[derive(Args)]
pub struct ImportArgs {
    /// DEPARTMENT.DATASET
    dataset: String,
    /// A CSV file (UTF-8 or GBK; the delimiter and a header row are detected), an NDJSON file
    /// or a Parquet file.
    file: std::path::PathBuf,
    /// append (default), replace, or upsert (with --key).
    #[arg(long, default_value = "append")]
    mode: String,
    /// Key columns of an upsert, comma-separated: a new row replaces the row with its key.
    #[arg(long)]
    key: Option<String>,
    /// Import the good rows and keep the bad ones in the rejects, instead of refusing the file.
    #[arg(long)]
    lenient: bool,
    /// Field delimiter: , ; | or tab.
    #[arg(long)]
    delimiter: Option<String>,
    /// csv, ndjson or parquet (detected when left out).
    #[arg(long)]
    format: Option<String>,
}

pub fn import(api: &Api, a: ImportArgs, json: bool) -> anyhow::Result<ExitCode> {
    let (department, name) = dataset_name(&a.dataset)?;
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut q = vec![format!("mode={}", enc(&a.mode))];
    if a.lenient {
        q.push("lenient=true".into());
    }
    if let Some(k) = &a.key {
        q.push(format!("key={}", enc(k)));
    }
    if let Some(d) = &a.delimiter {
        q.push(format!("delimiter={}", enc(d)));
    }
    if let Some(f) = &a.format {
        q.push(format!("format={}", enc(f)));
    }
    let r = api.upload(
        &format!(
            "/api/v1/datasets/{}/{}/import?{}",
            enc(&department),
            enc(&name),
            q.join("&")
        ),
        &bytes,
    )?;
    finish(r, json, |v| {
        println!(
            "{} version {}: {} rows imported{}, {} rejected, {} in all ({})",
            s(&v["dataset"]),
            v["version"],
            v["rows_imported"],
            match v["rows_replaced"].as_u64() {
                Some(n) if n > 0 => format!(" ({n} replacing rows with the same key)"),
                _ => String::new(),
            },
            v["rows_rejected"],
            v["rows_total"],
            match s(&v["format"]) {
                "csv" => format!(
                    "CSV, {}, delimiter {:?}{}",
                    s(&v["encoding"]),
                    s(&v["delimiter"]),
                    if v["header"] == true {
                        ", header row"
                    } else {
                        ""
                    }
                ),
                "ndjson" => format!("NDJSON, {}", s(&v["encoding"])),
                other => other.to_string(),
            }
        );
        for r in v["rejects"].as_array().into_iter().flatten() {
            println!(
                "  rejected line {}: {}{}",
                r["line"],
                r["column"]
                    .as_str()
                    .map(|c| format!("column {c}: "))
                    .unwrap_or_default(),
                s(&r["reason"])
            );
        }
    })
}

#[derive(Subcommand)]
pub enum GrantCommand {
    /// Ask for columns (and optionally rows) of another department's dataset; prints the
    /// request's id.
    Request {
        /// The dataset, DEPARTMENT.DATASET.
        dataset: String,
        /// Columns, comma-separated (* for all).
        #[arg(long, value_delimiter = ',', required = true)]
        columns: Vec<String>,
        /// Why the data is needed.
        #[arg(long)]
        purpose: String,
        /// Last day of the grant, YYYY-MM-DD.
        #[arg(long)]
        until: String,
        /// Only rows passing this SQL condition, e.g. "district = '西湖区'".
        #[arg(long)]
        rows: Option<String>,
        /// Personal or sensitive columns needed unmasked, comma-separated.
        #[arg(long, value_delimiter = ',')]
        unmasked: Vec<String>,
        /// Why unmasked values are needed (required with --unmasked).
        #[arg(long)]
        unmasked_reason: Option<String>,
    },
    /// Approve a pending request (a steward of the owning department).
    Approve { id: String },
    /// Refuse a pending request.
    Refuse {
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Revoke an approved grant.
    Revoke {
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List grants and requests of your department.
    List {
        /// Only in this state: pending, active, refused, revoked, superseded, expired.
        #[arg(long)]
        state: Option<String>,
        /// Only on this dataset.
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Show one grant.
    Show { id: String },
}

fn print_grant(g: &Value) {
    println!("grant {} ({})", s(&g["id"]), s(&g["state"]));
    println!(
        "  dataset:    {} (owner {})",
        s(&g["dataset"]),
        s(&g["owner"])
    );
    println!("  grantee:    {}", s(&g["grantee"]));
    let list = |k: &str| {
        g[k].as_array()
            .into_iter()
            .flatten()
            .map(|c| s(c).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  columns:    {}", list("columns"));
    if let Some(r) = g["rows"].as_str() {
        println!("  rows:       {r}");
    }
    let unmasked = list("unmasked");
    if !unmasked.is_empty() {
        println!(
            "  unmasked:   {unmasked} ({})",
            g["unmasked_reason"].as_str().unwrap_or("")
        );
    }
    println!("  purpose:    {}", s(&g["purpose"]));
    println!("  until:      {}", s(&g["expires_at"]));
    println!(
        "  requested:  {} by {}",
        s(&g["requested_at"]),
        s(&g["requested_by"])
    );
    if let Some(by) = g["decided_by"].as_str() {
        println!("  decided:    {} by {by}", s(&g["decided_at"]));
    }
    if let Some(by) = g["revoked_by"].as_str() {
        println!("  revoked:    {} by {by}", s(&g["revoked_at"]));
    }
    if let Some(r) = g["reason"].as_str() {
        println!("  reason:     {r}");
    }
}

pub fn grant(api: &Api, cmd: GrantCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        GrantCommand::Request {
            dataset,
            columns,
            purpose,
            until,
            rows,
            unmasked,
            unmasked_reason,
        } => {
            let r = api.call(
                "POST",
                "/api/v1/grants",
                Some(json!({
                    "dataset": dataset,
                    "columns": columns,
                    "purpose": purpose,
                    "until": until,
                    "rows": rows,
                    "unmasked": unmasked,
                    "unmasked_reason": unmasked_reason,
                })),
            )?;
            finish(r, json, |v| {
                println!("{}", s(&v["id"]));
                eprintln!(
                    "asked department {} for {}; a steward there decides with `yunqi grant approve {}`",
                    s(&v["owner"]),
                    s(&v["dataset"]),
                    s(&v["id"])
                );
            })
        }
        GrantCommand::Approve { id } => {
            let r = api.call(
                "POST",
                &format!("/api/v1/grants/{}/approve", enc(&id)),
                None,
            )?;
            finish(r, json, print_grant)
        }
        GrantCommand::Refuse { id, reason } => {
            let r = api.call(
                "POST",
                &format!("/api/v1/grants/{}/refuse", enc(&id)),
                Some(json!({ "reason": reason })),
            )?;
            finish(r, json, print_grant)
        }
        GrantCommand::Revoke { id, reason } => {
            let r = api.call(
                "POST",
                &format!("/api/v1/grants/{}/revoke", enc(&id)),
                Some(json!({ "reason": reason })),
            )?;
            finish(r, json, print_grant)
        }
        GrantCommand::List { state, dataset } => {
            let mut query = Vec::new();
            if let Some(st) = state {
                query.push(format!("state={}", enc(&st)));
            }
            if let Some(d) = dataset {
                query.push(format!("dataset={}", enc(&d)));
            }
            let path = if query.is_empty() {
                "/api/v1/grants".to_string()
            } else {
                format!("/api/v1/grants?{}", query.join("&"))
            };
            let r = api.call("GET", &path, None)?;
            finish(r, json, |v| {
                println!(
                    "{:<16} {:<11} {:<28} {:<14} {:<26} purpose",
                    "id", "state", "dataset", "grantee", "until"
                );
                for g in v["grants"].as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:<11} {:<28} {:<14} {:<26} {}",
                        s(&g["id"]),
                        s(&g["state"]),
                        s(&g["dataset"]),
                        s(&g["grantee"]),
                        s(&g["expires_at"]),
                        s(&g["purpose"])
                    );
                }
            })
        }
        GrantCommand::Show { id } => {
            let r = api.call("GET", &format!("/api/v1/grants/{}", enc(&id)), None)?;
            finish(r, json, print_grant)
        }
    }
}

#[derive(Args)]
pub struct SqlArgs {
    /// A query to run; without one, a shell reads statements (ended by `;`) from the terminal
    /// or standard input. In the shell, `\d` lists tables, `\d NAME` describes one, `\q` quits.
    query: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
}

/// Display width of a cell: CJK and other wide characters take two columns.
fn width(s: &str) -> usize {
    s.chars()
        .map(|c| {
            let u = c as u32;
            if (0x1100..=0x115F).contains(&u)
                || (0x2E80..=0xA4CF).contains(&u)
                || (0xAC00..=0xD7A3).contains(&u)
                || (0xF900..=0xFAFF).contains(&u)
                || (0xFE30..=0xFE4F).contains(&u)
                || (0xFF00..=0xFF60).contains(&u)
                || (0xFFE0..=0xFFE6).contains(&u)
            {
                2
            } else {
                1
            }
        })
        .sum()
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(v: &Value) {
    let headers: Vec<String> = v["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| s(&c["name"]).to_string())
        .collect();
    let rows: Vec<Vec<String>> = v["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().into_iter().flatten().map(cell).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(width(c));
            }
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!(" {c}{} ", " ".repeat(w - width(c))))
            .collect::<Vec<_>>()
            .join("|")
    };
    println!("{}", line(&headers));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    for r in &rows {
        println!("{}", line(r));
    }
    let n = rows.len();
    println!(
        "({n} row{}{})",
        if n == 1 { "" } else { "s" },
        if v["truncated"].as_bool() == Some(true) {
            ", truncated at the server's limit"
        } else {
            ""
        }
    );
}

fn run_sql(api: &Api, query: &str, csv: bool, json: bool) -> anyhow::Result<ExitCode> {
    let format = if csv { "csv" } else { "json" };
    let r = api.call(
        "POST",
        "/api/v1/sql",
        Some(json!({"sql": query, "format": format})),
    )?;
    finish(r, json, |v| match v {
        Value::String(text) => print!("{text}"),
        _ => print_table(v),
    })
}

/// `\d` and `\d NAME` of the shell, as queries over information_schema.
fn meta_query(command: &str) -> Option<String> {
    let rest = command.strip_prefix("\\d")?.trim();
    if rest.is_empty() {
        return Some(
            "SELECT table_schema AS schema, table_name AS name FROM information_schema.tables \
             WHERE table_schema <> 'information_schema' ORDER BY 1, 2"
                .into(),
        );
    }
    let (schema, table) = rest.split_once('.').unwrap_or(("system", rest));
    let quote = |s: &str| s.replace('\'', "''");
    Some(format!(
        "SELECT column_name AS column, data_type AS type, is_nullable AS nullable \
         FROM information_schema.columns WHERE table_schema = '{}' AND table_name = '{}' \
         ORDER BY ordinal_position",
        quote(schema),
        quote(table)
    ))
}

pub fn sql(api: &Api, a: SqlArgs, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, IsTerminal, Write};
    if let Some(q) = a.query {
        return run_sql(api, &q, a.csv, json);
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!(
            "yunqi SQL at {} — end statements with ;  \\d lists tables, \\q quits",
            api.base
        );
    }
    let mut buffer = String::new();
    let mut status = ExitCode::SUCCESS;
    let prompt = |buffer: &str| {
        if interactive {
            eprint!(
                "{}",
                if buffer.is_empty() {
                    "yunqi> "
                } else {
                    "  ...> "
                }
            );
            let _ = std::io::stderr().flush();
        }
    };
    prompt(&buffer);
    for line in stdin.lock().lines() {
        let line = line?;
        let trimmed = line.trim();
        if buffer.is_empty() && trimmed.starts_with('\\') {
            if trimmed == "\\q" {
                break;
            }
            match meta_query(trimmed) {
                Some(q) => {
                    run_sql(api, &q, a.csv, json)?;
                }
                None => eprintln!("unknown command {trimmed}; \\d, \\d NAME and \\q are known"),
            }
            prompt(&buffer);
            continue;
        }
        if !trimmed.is_empty() {
            buffer.push_str(&line);
            buffer.push('\n');
        }
        if trimmed.ends_with(';') {
            let q = buffer.trim().trim_end_matches(';').to_string();
            buffer.clear();
            if run_sql(api, &q, a.csv, json)? != ExitCode::SUCCESS {
                status = ExitCode::FAILURE;
            }
        }
        prompt(&buffer);
    }
    if !buffer.trim().is_empty() && run_sql(api, buffer.trim(), a.csv, json)? != ExitCode::SUCCESS {
        status = ExitCode::FAILURE;
    }
    Ok(status)
}

/// `yunqi accesses`: for a citizen, who read their data.
pub fn accesses(api: &Api, json: bool) -> anyhow::Result<ExitCode> {
    let r = api.call("GET", "/api/v1/me/accesses", None)?;
    finish(r, json, |v| {
        let list = v["accesses"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            println!("no recorded reads of your data");
        }
        for a in list {
            println!(
                "{}  {} ({})  {}  {}",
                s(&a["time"]),
                s(&a["principal"]),
                s(&a["department"]),
                s(&a["object"]).trim_start_matches("table:"),
                a["purpose"]
                    .as_str()
                    .filter(|p| !p.is_empty())
                    .unwrap_or("(own department)")
            );
        }
    })
}
