//! From SQL to a plan: `CREATE STREAM` and `CREATE CONTINUOUS VIEW` statements are parsed with
//! sqlparser (the parser DataFusion uses) and checked against the stream's declaration; the
//! view's query is also planned by DataFusion as the equivalent batch query (see
//! [`ViewPlan::batch_sql`]), so type errors are DataFusion's own. What the incremental engine
//! cannot compute is refused with an error that names the construct.

use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, ObjectName,
    SelectItem, SetExpr, SqlOption, Statement, TableFactor,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use yunqi_datasets::{Column, ColumnType, StreamManifest};
use yunqi_types::{ColumnClass, Error, Name, suggest};

/// What a statement is, by its first words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlKind {
    /// `CREATE STREAM …`
    CreateStream,
    /// `CREATE CONTINUOUS VIEW …`
    CreateContinuousView,
}

/// Recognises the statements this crate handles (the SQL endpoints route them here).
pub fn ddl_kind(sql: &str) -> Option<DdlKind> {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(3)
        .map(str::to_ascii_uppercase)
        .collect();
    match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["CREATE", "STREAM", ..] => Some(DdlKind::CreateStream),
        ["CREATE", "CONTINUOUS", "VIEW"] => Some(DdlKind::CreateContinuousView),
        _ => None,
    }
}

/// Replaces the first `n` words of `sql` (as [`ddl_kind`] saw them) by `with`.
fn replace_words(sql: &str, n: usize, with: &str) -> String {
    let mut rest = sql.trim_start();
    for _ in 0..n {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest = &rest[end..];
    }
    format!("{with}{rest}")
}

fn parse_one(sql: &str) -> Result<Statement, Error> {
    let mut statements = Parser::parse_sql(&GenericDialect {}, sql)
        .map_err(|e| Error::invalid(format!("SQL syntax error: {e}")))?;
    if statements.len() != 1 {
        return Err(Error::invalid("send one statement at a time"));
    }
    Ok(statements.remove(0))
}

/// `department.name` from a two-part SQL name.
fn two_part(name: &ObjectName, what: &str) -> Result<(Name, Name), Error> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| {
            p.as_ident()
                .map(|i| i.value.clone())
                .unwrap_or_else(|| p.to_string())
        })
        .collect();
    match parts.as_slice() {
        [d, n] => Ok((
            Name::parse("department", &d.to_lowercase())?,
            Name::parse(what, &n.to_lowercase())?,
        )),
        _ => Err(
            Error::invalid(format!("a {what} is named department.name, not \"{name}\"")).hint(
                format!(
                    "e.g. traffic.{}",
                    if what == "stream" {
                        "detections"
                    } else {
                        "flow_1m"
                    }
                ),
            ),
        ),
    }
}

/// Text of a literal option value (`'5 seconds'`, `5`, `ts`).
fn option_text(e: &Expr) -> String {
    let s = e.to_string();
    s.trim_matches('\'').to_string()
}

fn options(opts: &ast::CreateTableOptions) -> Result<Vec<(String, String)>, Error> {
    let list: &[SqlOption] = match opts {
        ast::CreateTableOptions::None => &[],
        ast::CreateTableOptions::With(l)
        | ast::CreateTableOptions::Options(l)
        | ast::CreateTableOptions::Plain(l)
        | ast::CreateTableOptions::TableProperties(l) => l,
    };
    list.iter()
        .map(|o| match o {
            SqlOption::KeyValue { key, value } => {
                Ok((key.value.to_ascii_lowercase(), option_text(value)))
            }
            other => Err(
                Error::invalid(format!("option `{other}` is not understood"))
                    .hint("options are key = 'value' pairs"),
            ),
        })
        .collect()
}

/// Parses a duration: `5 seconds`, `1 minute`, `500 ms`, `2 hours`, `1 day`, `INTERVAL '1' MINUTE`.
pub fn parse_duration_us(raw: &str) -> Result<i64, Error> {
    let text = raw.trim();
    let text = text
        .strip_prefix("INTERVAL")
        .or_else(|| text.strip_prefix("interval"))
        .unwrap_or(text);
    let cleaned: String = text.replace('\'', " ");
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    let bad = || {
        Error::invalid(format!("\"{raw}\" is not a duration"))
            .hint("write a number and a unit, e.g. '5 seconds', '1 minute', INTERVAL '1' HOUR")
    };
    let (number, unit) = match words.as_slice() {
        [n, u] => (*n, u.to_ascii_lowercase()),
        [nu] => {
            let split = nu
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(nu.len());
            (&nu[..split], nu[split..].to_ascii_lowercase())
        }
        _ => return Err(bad()),
    };
    let n: f64 = number.parse().map_err(|_| bad())?;
    let unit_us: f64 = match unit.trim_end_matches('s') {
        "m" if unit == "ms" => 1e3,
        "millisecond" | "milli" => 1e3,
        "" | "second" | "sec" => 1e6,
        "minute" | "min" | "m" => 60e6,
        "hour" | "h" | "hr" => 3600e6,
        "day" | "d" => 86_400e6,
        _ => return Err(bad()),
    };
    let us = n * unit_us;
    if !(0.0..=366.0 * 86_400e6).contains(&us) {
        return Err(bad().detail("durations are between 0 and 366 days"));
    }
    Ok(us.round() as i64)
}

/// A `CREATE STREAM` statement, parsed.
pub fn parse_create_stream(
    sql: &str,
    by: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<StreamManifest, Error> {
    let rewritten = replace_words(sql, 2, "CREATE TABLE");
    let ct = match parse_one(&rewritten)? {
        Statement::CreateTable(ct) => ct,
        _ => return Err(Error::invalid("not a CREATE STREAM statement")),
    };
    let (department, name) = two_part(&ct.name, "stream")?;
    let mut columns = Vec::new();
    for c in &ct.columns {
        let raw = c.data_type.to_string().to_ascii_lowercase();
        let base = raw.split('(').next().unwrap_or("").trim();
        let base = if base == "double precision" {
            "double"
        } else {
            base
        };
        let column_type = ColumnType::parse(base)
            .map_err(|e| e.detail(format!("column \"{}\"", c.name.value)))?;
        columns.push(Column {
            name: c.name.value.to_lowercase(),
            label: None,
            column_type,
            class: ColumnClass::Internal,
            class_declared: false,
            detected: None,
        });
    }
    let mut m = StreamManifest {
        format: yunqi_datasets::streams::STREAM_FORMAT,
        department: department.to_string(),
        name: name.to_string(),
        description: String::new(),
        columns,
        event_time: String::new(),
        watermark_ms: 0,
        retention_secs: Some(7 * 86_400),
        retention_bytes: None,
        ngsi_type: None,
        created_at: now,
        created_by: by.to_string(),
    };
    let mut watermark_set = false;
    for (k, v) in options(&ct.table_options)? {
        match k.as_str() {
            "event_time" => m.event_time = v.to_lowercase(),
            "watermark" => {
                m.watermark_ms = (parse_duration_us(&v)? / 1000) as u64;
                watermark_set = true;
            }
            "retention" => {
                m.retention_secs = match v.to_ascii_lowercase().as_str() {
                    "forever" | "none" => None,
                    _ => Some((parse_duration_us(&v)? / 1_000_000) as u64),
                }
            }
            "retention_bytes" => {
                m.retention_bytes = Some(v.parse().map_err(|_| {
                    Error::invalid(format!("retention_bytes = '{v}' is not a number of bytes"))
                })?)
            }
            "description" => m.description = v,
            "ngsi_type" => m.ngsi_type = Some(v),
            other => {
                return Err(
                    Error::invalid(format!("unknown stream option \"{other}\"")).hint(
                        "options: event_time, watermark, retention, retention_bytes, description, \
                         ngsi_type",
                    ),
                );
            }
        }
    }
    if m.event_time.is_empty() {
        return Err(Error::invalid("a stream needs an event-time column")
            .hint("add WITH (event_time = 'ts', watermark = '5 seconds')"));
    }
    if !watermark_set {
        m.watermark_ms = 0;
    }
    m.check()?;
    Ok(m)
}

/// How events fall into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSpec {
    /// Window length, microseconds.
    pub size_us: i64,
    /// Distance between window starts (= size for tumbling windows), microseconds.
    pub slide_us: i64,
}

impl WindowSpec {
    /// How many windows each event falls in.
    pub fn per_event(&self) -> i64 {
        self.size_us / self.slide_us
    }
}

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Func {
    /// `count(*)`
    CountStar,
    /// `count(col)`: non-null values.
    Count,
    /// `sum(col)`
    Sum,
    /// `min(col)`
    Min,
    /// `max(col)`
    Max,
    /// `avg(col)`
    Avg,
    /// `approx_count_distinct(col)`: a HyperLogLog sketch, exact below 64 distinct values.
    ApproxDistinct,
}

/// One aggregate of the view.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Agg {
    /// The function.
    pub func: Func,
    /// Its argument: a stream column's position (none for `count(*)`).
    pub column: Option<usize>,
    /// The argument's type.
    pub input_type: Option<ColumnType>,
}

impl Agg {
    /// The result's type.
    pub fn output_type(&self) -> ColumnType {
        match (self.func, self.input_type) {
            (Func::CountStar | Func::Count | Func::ApproxDistinct, _) => ColumnType::Int,
            (Func::Avg, _) => ColumnType::Float,
            (Func::Sum, Some(t)) => t,
            (Func::Min | Func::Max, Some(t)) => t,
            (_, None) => ColumnType::Int,
        }
    }
}

/// A grouping key: a stream column.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Key {
    /// Column name.
    pub name: String,
    /// Its position in the stream.
    pub column: usize,
    /// Its type.
    pub column_type: ColumnType,
}

/// What an output column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutputKind {
    /// The window's start.
    WindowStart,
    /// The window's end (exclusive).
    WindowEnd,
    /// A grouping key (NULL in rows of grouping sets without it).
    Key(usize),
    /// An aggregate.
    Agg(usize),
    /// `grouping(key)`: 1 in rows of grouping sets without the key, else 0.
    Grouping(usize),
}

/// An output column.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Output {
    /// Its name.
    pub name: String,
    /// What it holds.
    pub kind: OutputKind,
    /// Its type.
    pub column_type: ColumnType,
}

/// A continuous view, ready for the engine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ViewPlan {
    /// Owning department (the stream's).
    pub department: String,
    /// The view's name.
    pub name: String,
    /// The `CREATE CONTINUOUS VIEW` statement.
    pub sql: String,
    /// `department.name` of the stream it reads.
    pub stream: String,
    /// The stream's declaration when the view was created.
    pub stream_columns: Vec<Column>,
    /// Position of the event-time column.
    pub event_time: usize,
    /// The windows.
    pub window: WindowSpec,
    /// Watermark delay of the stream, microseconds.
    pub watermark_us: i64,
    /// How long after the watermark passes a window's end it still accepts events.
    pub lateness_us: i64,
    /// The WHERE condition, as SQL over the stream's columns.
    pub filter: Option<String>,
    /// The grouping keys: every column of any grouping set.
    pub keys: Vec<Key>,
    /// The grouping sets, as bit masks over `keys` (bit i = key i present).
    pub sets: Vec<u64>,
    /// The aggregates.
    pub aggs: Vec<Agg>,
    /// The output columns, in order.
    pub outputs: Vec<Output>,
}

fn unsupported(what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("continuous views do not support {what}"))
        .hint("a continuous view is SELECT window_start, window_end, keys, aggregates FROM TUMBLE|HOP(stream, time, INTERVAL …) [WHERE …] GROUP BY window_start, window_end, keys | ROLLUP(…) | GROUPING SETS (…)")
}

fn ident_of(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(i.value.to_lowercase()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.to_lowercase()),
        Expr::Nested(inner) => ident_of(inner),
        _ => None,
    }
}

fn function_args(f: &ast::Function) -> Result<Vec<&FunctionArgExpr>, Error> {
    match &f.args {
        FunctionArguments::None => Ok(vec![]),
        FunctionArguments::Subquery(_) => Err(unsupported("subqueries")),
        FunctionArguments::List(list) => {
            if list.duplicate_treatment == Some(ast::DuplicateTreatment::Distinct) {
                return Err(unsupported(format!("`{f}` (DISTINCT inside an aggregate)"))
                    .hint("use approx_count_distinct(col): it merges across windows and levels"));
            }
            if !list.clauses.is_empty() {
                return Err(unsupported(format!("`{f}`")));
            }
            list.args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(e) => Ok(e),
                    _ => Err(unsupported(format!("named arguments in `{f}`"))),
                })
                .collect()
        }
    }
}

impl ViewPlan {
    /// Parses `CREATE CONTINUOUS VIEW dept.name [WITH (allowed_lateness = '…')] AS SELECT …`;
    /// `stream` finds a stream's declaration by `department.name`.
    pub fn parse(
        sql: &str,
        stream: &dyn Fn(&str) -> Result<StreamManifest, Error>,
    ) -> Result<ViewPlan, Error> {
        if ddl_kind(sql) != Some(DdlKind::CreateContinuousView) {
            return Err(Error::invalid("not a CREATE CONTINUOUS VIEW statement"));
        }
        let rewritten = replace_words(sql, 3, "CREATE VIEW");
        let cv = match parse_one(&rewritten)? {
            Statement::CreateView(cv) => cv,
            _ => return Err(Error::invalid("not a CREATE CONTINUOUS VIEW statement")),
        };
        let (department, name) = two_part(&cv.name, "view")?;
        if name.as_str().ends_with("_late") {
            return Err(
                Error::invalid(format!("view names may not end in _late (\"{name}\")"))
                    .hint("yunqi names each view's late-event table VIEW_late"),
            );
        }
        let mut lateness_us = 0;
        for (k, v) in options(&cv.options)? {
            match k.as_str() {
                "allowed_lateness" => lateness_us = parse_duration_us(&v)?,
                other => {
                    return Err(Error::invalid(format!("unknown view option \"{other}\""))
                        .hint("options: allowed_lateness"));
                }
            }
        }
        let q = &cv.query;
        if q.with.is_some() {
            return Err(unsupported("WITH (common table expressions)"));
        }
        if q.order_by.is_some() {
            return Err(unsupported("ORDER BY").hint("order when you query the view"));
        }
        if q.limit_clause.is_some() || q.fetch.is_some() {
            return Err(unsupported("LIMIT").hint("limit when you query the view"));
        }
        let select = match q.body.as_ref() {
            SetExpr::Select(s) => s,
            SetExpr::SetOperation { op, .. } => return Err(unsupported(format!("{op}"))),
            other => return Err(unsupported(format!("`{other}`"))),
        };
        if select.distinct.is_some() {
            return Err(unsupported("SELECT DISTINCT"));
        }
        if select.having.is_some() {
            return Err(unsupported("HAVING").hint("filter when you query the view"));
        }
        if select.qualify.is_some() || !select.named_window.is_empty() {
            return Err(unsupported("window functions (OVER/QUALIFY)"));
        }
        let [from] = select.from.as_slice() else {
            return Err(if select.from.is_empty() {
                unsupported("a query without FROM")
            } else {
                unsupported("several tables in FROM (joins)")
            });
        };
        if !from.joins.is_empty() {
            return Err(unsupported("JOIN"));
        }
        let TableFactor::Table {
            name: fname,
            args: Some(targs),
            ..
        } = &from.relation
        else {
            return Err(Error::invalid("a continuous view reads a stream through a window")
                .hint("FROM TUMBLE(dept.stream, ts, INTERVAL '1' MINUTE) or HOP(dept.stream, ts, INTERVAL '10' SECOND, INTERVAL '1' MINUTE)"));
        };
        let fname = fname.to_string().to_ascii_uppercase();
        let args: Vec<&Expr> = targs
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
                other => Err(unsupported(format!("window argument `{other}`"))),
            })
            .collect::<Result<_, _>>()?;
        let (stream_expr, time_expr, window) = match (fname.as_str(), args.as_slice()) {
            ("TUMBLE", [s, t, size]) => {
                let size = parse_duration_us(&size.to_string())?;
                (
                    s,
                    t,
                    WindowSpec {
                        size_us: size,
                        slide_us: size,
                    },
                )
            }
            ("HOP", [s, t, slide, size]) => {
                let slide = parse_duration_us(&slide.to_string())?;
                let size = parse_duration_us(&size.to_string())?;
                (
                    s,
                    t,
                    WindowSpec {
                        size_us: size,
                        slide_us: slide,
                    },
                )
            }
            ("TUMBLE", _) => {
                return Err(Error::invalid("TUMBLE takes (stream, time column, size)")
                    .hint("TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE)"));
            }
            ("HOP", _) => {
                return Err(
                    Error::invalid("HOP takes (stream, time column, slide, size)").hint(
                        "HOP(traffic.detections, ts, INTERVAL '10' SECOND, INTERVAL '1' MINUTE)",
                    ),
                );
            }
            (other, _) => {
                return Err(unsupported(format!("the window function {other}"))
                    .hint("use TUMBLE(…) or HOP(…)"));
            }
        };
        if window.size_us <= 0 || window.slide_us <= 0 {
            return Err(Error::invalid("a window must be longer than zero"));
        }
        if window.size_us % window.slide_us != 0 {
            return Err(
                Error::invalid("a HOP window's size must be a whole number of slides")
                    .hint("e.g. slide 10 seconds, size 1 minute"),
            );
        }
        if window.per_event() > 64 {
            return Err(Error::invalid(
                "a HOP window may overlap at most 64 others (size / slide ≤ 64)",
            ));
        }
        let stream_name = match stream_expr {
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => format!(
                "{}.{}",
                parts[0].value.to_lowercase(),
                parts[1].value.to_lowercase()
            ),
            other => {
                return Err(Error::invalid(format!(
                    "the window's first argument names a stream as department.name, not `{other}`"
                )));
            }
        };
        let s = stream(&stream_name)?;
        if s.department != department.as_str() {
            return Err(Error::invalid(format!(
                "view {department}.{name} reads stream {stream_name} of another department"
            ))
            .hint(format!(
                "create the view in {}: views belong to their stream's department",
                s.department
            )));
        }
        let time_col = ident_of(time_expr).unwrap_or_default();
        if time_col != s.event_time {
            return Err(Error::invalid(format!(
                "windows are over the stream's event time \"{}\", not `{time_expr}`",
                s.event_time
            ))
            .hint(format!("write TUMBLE({stream_name}, {}, …)", s.event_time)));
        }
        let column = |n: &str| -> Result<(usize, ColumnType), Error> {
            match s.column_index(n) {
                Some(i) => Ok((i, s.columns[i].column_type)),
                None => {
                    let e = Error::not_found("column", &format!("{stream_name}.{n}"));
                    Err(
                        match suggest::did_you_mean(n, s.columns.iter().map(|c| c.name.as_str())) {
                            Some(x) => e.hint(format!("did you mean \"{x}\"?")),
                            None => e,
                        },
                    )
                }
            }
        };

        // GROUP BY: plain columns, ROLLUP, GROUPING SETS, CUBE.
        let GroupByExpr::Expressions(items, modifiers) = &select.group_by else {
            return Err(unsupported("GROUP BY ALL"));
        };
        if !modifiers.is_empty() {
            return Err(unsupported("GROUP BY … WITH modifiers")
                .hint("write ROLLUP(a, b) in the GROUP BY list"));
        }
        if items.is_empty() {
            return Err(Error::invalid("a continuous view groups by window")
                .hint("GROUP BY window_start, window_end[, keys]"));
        }
        let mut keys: Vec<Key> = Vec::new();
        let mut key_of = |n: &str| -> Result<usize, Error> {
            if let Some(i) = keys.iter().position(|k| k.name == n) {
                return Ok(i);
            }
            let (c, t) = column(n)?;
            if keys.len() == 63 {
                return Err(Error::invalid("a view groups by at most 63 columns"));
            }
            keys.push(Key {
                name: n.to_string(),
                column: c,
                column_type: t,
            });
            Ok(keys.len() - 1)
        };
        let mut sets: Vec<u64> = vec![0];
        let mut has_window = false;
        let set_of = |list: &[Expr], key_of: &mut dyn FnMut(&str) -> Result<usize, Error>| {
            let mut m = 0u64;
            for e in list {
                let n = ident_of(e).ok_or_else(|| {
                    unsupported(format!("grouping by the expression `{e}`"))
                        .hint("group by columns of the stream")
                })?;
                m |= 1 << key_of(&n)?;
            }
            Ok::<u64, Error>(m)
        };
        for item in items {
            let alternatives: Vec<u64> = match item {
                Expr::Rollup(lists) => {
                    let mut alts = vec![0u64];
                    let mut acc = 0u64;
                    for l in lists {
                        acc |= set_of(l, &mut key_of)?;
                        alts.push(acc);
                    }
                    alts.reverse();
                    alts
                }
                Expr::Cube(lists) => {
                    let parts: Vec<u64> = lists
                        .iter()
                        .map(|l| set_of(l, &mut key_of))
                        .collect::<Result<_, _>>()?;
                    if parts.len() > 8 {
                        return Err(Error::invalid("CUBE of more than 8 columns"));
                    }
                    let mut alts = Vec::new();
                    for bits in (0..1u32 << parts.len()).rev() {
                        let mut m = 0;
                        for (i, p) in parts.iter().enumerate() {
                            if bits & (1 << i) != 0 {
                                m |= p;
                            }
                        }
                        alts.push(m);
                    }
                    alts
                }
                Expr::GroupingSets(lists) => lists
                    .iter()
                    .map(|l| set_of(l, &mut key_of))
                    .collect::<Result<_, _>>()?,
                e => match ident_of(e).as_deref() {
                    Some("window_start" | "window_end") => {
                        has_window = true;
                        vec![0]
                    }
                    Some(n) => vec![1 << key_of(n)?],
                    None => {
                        return Err(unsupported(format!("grouping by the expression `{e}`"))
                            .hint("group by columns of the stream"));
                    }
                },
            };
            let mut next = Vec::with_capacity(sets.len() * alternatives.len());
            for s in &sets {
                for a in &alternatives {
                    next.push(s | a);
                }
            }
            if next.len() > 256 {
                return Err(Error::invalid("a view has at most 256 grouping sets"));
            }
            sets = next;
        }
        if !has_window {
            return Err(Error::invalid("a continuous view groups by its window")
                .hint("add window_start, window_end to GROUP BY"));
        }

        // SELECT list.
        let mut aggs: Vec<Agg> = Vec::new();
        let mut outputs: Vec<Output> = Vec::new();
        for item in &select.projection {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(e) => (e, None),
                SelectItem::ExprWithAlias { expr, alias } => {
                    (expr, Some(alias.value.to_lowercase()))
                }
                other => {
                    return Err(unsupported(format!("`{other}` in the SELECT list"))
                        .hint("name each column: window_start, window_end, keys and aggregates"));
                }
            };
            let (kind, column_type, default_name) = match expr {
                e if ident_of(e).is_some() => {
                    let n = ident_of(e).expect("identifier");
                    match n.as_str() {
                        "window_start" => (OutputKind::WindowStart, ColumnType::Timestamp, n),
                        "window_end" => (OutputKind::WindowEnd, ColumnType::Timestamp, n),
                        _ => match keys.iter().position(|k| k.name == n) {
                            Some(i) => (OutputKind::Key(i), keys[i].column_type, n),
                            None => {
                                column(&n)?;
                                return Err(Error::invalid(format!(
                                    "column \"{n}\" is selected but not grouped by"
                                ))
                                .hint(format!("add {n} to GROUP BY, or aggregate it")));
                            }
                        },
                    }
                }
                Expr::Function(f) => {
                    if f.over.is_some() {
                        return Err(unsupported("window functions (OVER)"));
                    }
                    if f.filter.is_some() {
                        return Err(unsupported(format!("`{f}` (FILTER)"))
                            .hint("put the condition in WHERE"));
                    }
                    let fname = f.name.to_string().to_ascii_lowercase();
                    let args = function_args(f)?;
                    if fname == "grouping" {
                        let [FunctionArgExpr::Expr(a)] = args.as_slice() else {
                            return Err(Error::invalid("grouping() takes one grouped column"));
                        };
                        let n = ident_of(a).unwrap_or_default();
                        let Some(i) = keys.iter().position(|k| k.name == n) else {
                            return Err(Error::invalid(format!(
                                "grouping({a}) names a column the view does not group by"
                            )));
                        };
                        (OutputKind::Grouping(i), ColumnType::Int, String::new())
                    } else {
                        let func = match fname.as_str() {
                            "count" => Func::Count,
                            "sum" => Func::Sum,
                            "min" => Func::Min,
                            "max" => Func::Max,
                            "avg" | "mean" => Func::Avg,
                            "approx_count_distinct" | "approx_distinct" => Func::ApproxDistinct,
                            other => {
                                return Err(unsupported(format!("the function {other}()"))
                                    .hint("continuous views compute count, sum, min, max, avg and approx_count_distinct"));
                            }
                        };
                        let agg = match (func, args.as_slice()) {
                            (Func::Count, [FunctionArgExpr::Wildcard] | []) => Agg {
                                func: Func::CountStar,
                                column: None,
                                input_type: None,
                            },
                            (Func::Count, [FunctionArgExpr::Expr(Expr::Value(_))]) => Agg {
                                func: Func::CountStar,
                                column: None,
                                input_type: None,
                            },
                            (_, [FunctionArgExpr::Expr(a)]) => {
                                let n = ident_of(a).ok_or_else(|| {
                                    unsupported(format!("`{f}`: aggregates take a column"))
                                })?;
                                let (c, t) = column(&n)?;
                                let ok = match func {
                                    Func::Count | Func::ApproxDistinct => true,
                                    Func::Sum | Func::Avg => {
                                        matches!(t, ColumnType::Int | ColumnType::Float)
                                    }
                                    Func::Min | Func::Max => matches!(
                                        t,
                                        ColumnType::Int
                                            | ColumnType::Float
                                            | ColumnType::Timestamp
                                            | ColumnType::Date
                                    ),
                                    Func::CountStar => true,
                                };
                                if !ok {
                                    return Err(Error::invalid(format!(
                                        "{fname}({n}): {n} is {t:?}, which {fname} does not take"
                                    ))
                                    .hint(match func {
                                        Func::Sum | Func::Avg => {
                                            "sum and avg take int or float columns"
                                        }
                                        _ => {
                                            "min and max take int, float, date or timestamp columns"
                                        }
                                    }));
                                }
                                Agg {
                                    func,
                                    column: Some(c),
                                    input_type: Some(t),
                                }
                            }
                            _ => {
                                return Err(Error::invalid(format!("`{f}` takes one column")));
                            }
                        };
                        let t = agg.output_type();
                        let i = match aggs.iter().position(|a| *a == agg) {
                            Some(i) => i,
                            None => {
                                aggs.push(agg);
                                aggs.len() - 1
                            }
                        };
                        (OutputKind::Agg(i), t, String::new())
                    }
                }
                other => {
                    return Err(unsupported(format!("the expression `{other}` in the SELECT list"))
                        .hint("select window_start, window_end, grouped columns and aggregates of columns; compute over them when you query the view"));
                }
            };
            let name = match alias {
                Some(a) => a,
                None if !default_name.is_empty() => default_name,
                None => {
                    return Err(Error::invalid(format!("give `{expr}` a name"))
                        .hint(format!("{expr} AS some_name")));
                }
            };
            Name::parse("column", &name)?;
            if outputs.iter().any(|o| o.name == name) {
                return Err(
                    Error::invalid(format!("two output columns are named \"{name}\""))
                        .hint("give each its own alias"),
                );
            }
            outputs.push(Output {
                name,
                kind,
                column_type,
            });
        }
        if !outputs.iter().any(|o| o.kind == OutputKind::WindowStart) {
            return Err(Error::invalid("a continuous view selects window_start")
                .hint("SELECT window_start, window_end, …"));
        }
        let filter = select.selection.as_ref().map(|e| e.to_string());
        Ok(ViewPlan {
            department: department.to_string(),
            name: name.to_string(),
            sql: sql.trim().to_string(),
            stream: stream_name,
            stream_columns: s.columns.clone(),
            event_time: s.column_index(&s.event_time).expect("checked stream"),
            window,
            watermark_us: s.watermark_ms as i64 * 1000,
            lateness_us,
            filter,
            keys,
            sets,
            aggs,
            outputs,
        })
    }

    /// `department.name`.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", self.department, self.name)
    }

    /// The output columns as dataset columns (keys keep their stream class).
    pub fn output_columns(&self) -> Vec<Column> {
        self.outputs
            .iter()
            .map(|o| {
                let class = match o.kind {
                    OutputKind::Key(i) => self.stream_columns[self.keys[i].column].class,
                    _ => ColumnClass::Internal,
                };
                Column {
                    name: o.name.clone(),
                    label: None,
                    column_type: o.column_type,
                    class,
                    class_declared: true,
                    detected: None,
                }
            })
            .collect()
    }

    /// The same aggregation as a batch query over a table `table` holding the stream's events:
    /// what the view must contain once every window has closed. DataFusion plans it when the
    /// view is created (so its type errors are DataFusion's) and the tests use it as the
    /// oracle. `exact_distinct` counts distinct values exactly instead of approximately.
    pub fn batch_sql(&self, table: &str, exact_distinct: bool) -> String {
        let ts = &self.stream_columns[self.event_time].name;
        let t = format!("CAST(\"{ts}\" AS BIGINT)");
        let slide = self.window.slide_us;
        let size = self.window.size_us;
        let floor = format!("({t} - ((({t} % {slide}) + {slide}) % {slide}))");
        let k = self.window.per_event();
        let (start, hop_join) = if k == 1 {
            (floor, String::new())
        } else {
            let values: Vec<String> = (0..k).map(|j| format!("({j})")).collect();
            (
                format!("({floor} - __hop.j * {slide})"),
                format!(" CROSS JOIN (VALUES {}) AS __hop(j)", values.join(", ")),
            )
        };
        let filter = self
            .filter
            .as_ref()
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default();
        let key = |i: usize| format!("\"{}\"", self.keys[i].name);
        let select: Vec<String> = self
            .outputs
            .iter()
            .map(|o| {
                let e = match o.kind {
                    OutputKind::WindowStart => "window_start".to_string(),
                    OutputKind::WindowEnd => "window_end".to_string(),
                    OutputKind::Key(i) => key(i),
                    OutputKind::Grouping(i) => format!("grouping({})", key(i)),
                    OutputKind::Agg(i) => {
                        let a = &self.aggs[i];
                        let c = a
                            .column
                            .map(|c| format!("\"{}\"", self.stream_columns[c].name))
                            .unwrap_or_default();
                        match a.func {
                            Func::CountStar => "count(*)".to_string(),
                            Func::Count => format!("count({c})"),
                            Func::Sum => format!("sum({c})"),
                            Func::Min => format!("min({c})"),
                            Func::Max => format!("max({c})"),
                            Func::Avg => format!("avg({c})"),
                            Func::ApproxDistinct if exact_distinct => {
                                format!("count(DISTINCT {c})")
                            }
                            Func::ApproxDistinct => format!("approx_distinct({c})"),
                        }
                    }
                };
                format!("{e} AS \"{}\"", o.name)
            })
            .collect();
        let sets: Vec<String> = self
            .sets
            .iter()
            .map(|m| {
                let cols: Vec<String> = std::iter::once("window_start".to_string())
                    .chain(std::iter::once("window_end".to_string()))
                    .chain((0..self.keys.len()).filter(|i| m & (1 << i) != 0).map(key))
                    .collect();
                format!("({})", cols.join(", "))
            })
            .collect();
        format!(
            "SELECT {} FROM (SELECT *, arrow_cast({start}, '{TS}') AS window_start, \
             arrow_cast({start} + {size}, '{TS}') AS window_end FROM {table}{hop_join}{filter}) AS __w \
             GROUP BY GROUPING SETS ({})",
            select.join(", "),
            sets.join(", "),
            TS = "Timestamp(Microsecond, Some(\"UTC\"))",
        )
    }
}
