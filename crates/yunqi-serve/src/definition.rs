//! Service definitions: one TOML file per service (事项), read and checked whole before it is
//! applied. Every problem is reported with the line it is on and what to do; nothing is
//! half-applied.
//!
//! ```toml
//! [service]
//! department = "traffic"
//! name = "urgent-entry-permit"
//! title = "非浙A急事通"
//! applicants = ["citizen"]
//!
//! [[inputs]]
//! name = "plate"
//! type = "plate"
//!
//! [[lookups]]
//! name = "vehicle"
//! sql = "SELECT plate, owner_id FROM transport.vehicles WHERE plate = :plate"
//!
//! [[quotas]]
//! name = "monthly"
//! key = "plate"
//! limit = 3
//! period = "month"
//! date = "date"
//!
//! [[rules]]
//! name = "non_local"
//! require = "not starts_with(plate, '浙A')"
//! reason = "浙A号牌无需办理"
//!
//! [outcome]
//! decide = "automatic"
//! ```
//!
//! Names a rule may read: every input by name; `<lookup>.found` and `<lookup>.<column>`;
//! `quota.<name>.used`, `.left` and `.limit`. Lookup columns are checked when the lookup's SQL
//! is planned, as the service's department.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;
use yunqi_types::Error;

use crate::calendar::Period;
use crate::rules::{self, Expr};

/// Longest service name.
pub const SERVICE_NAME_BYTES_MAX: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    service: Header,
    #[serde(default)]
    inputs: Vec<InputDef>,
    #[serde(default)]
    lookups: Vec<LookupDef>,
    #[serde(default)]
    quotas: Vec<QuotaDef>,
    #[serde(default)]
    lines: Vec<LineDef>,
    #[serde(default)]
    consent: Option<ConsentDef>,
    #[serde(default)]
    behalf: Option<BehalfDef>,
    #[serde(default)]
    cancel_on: Vec<CancelDef>,
    #[serde(default)]
    rules: Vec<RuleDef>,
    outcome: OutcomeDef,
    #[serde(default)]
    document: Option<DocumentDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    department: Spanned<String>,
    name: Spanned<String>,
    title: String,
    #[serde(default)]
    title_en: Option<String>,
    #[serde(default)]
    description: String,
    applicants: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    applicant_departments: Option<Vec<String>>,
    #[serde(default)]
    calendar: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputDef {
    name: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    values: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    value_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    min_days: Option<i64>,
    #[serde(default)]
    max_days: Option<i64>,
    #[serde(default)]
    max_chars: Option<usize>,
    #[serde(default)]
    max_yuan: Option<f64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupDef {
    name: Spanned<String>,
    sql: Spanned<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaDef {
    name: Spanned<String>,
    key: Spanned<String>,
    limit: u32,
    period: Spanned<String>,
    #[serde(default)]
    date: Option<Spanned<String>>,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineDef {
    name: Spanned<String>,
    key: Spanned<String>,
    limit: Spanned<String>,
    amount: Spanned<String>,
    due_days: u32,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelDef {
    stream: Spanned<String>,
    column: Spanned<String>,
    input: Spanned<String>,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentDef {
    subject: Spanned<String>,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BehalfDef {
    subject: Spanned<String>,
    #[serde(default)]
    citizen: Option<Spanned<String>>,
    #[serde(default)]
    officer: Option<Spanned<String>>,
    #[serde(default)]
    enterprise: Option<Spanned<String>>,
    #[serde(default)]
    agents: Option<Spanned<String>>,
    reason: String,
    #[serde(default)]
    reason_en: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    name: Spanned<String>,
    require: Spanned<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    label_en: Option<String>,
    reason: String,
    #[serde(default)]
    reason_en: Option<String>,
    #[serde(default)]
    otherwise: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeDef {
    decide: Spanned<String>,
    #[serde(default)]
    review_hours: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentDef {
    title: String,
    fields: Spanned<Vec<String>>,
    #[serde(default)]
    valid_window: Option<Spanned<String>>,
    #[serde(default)]
    credit_code_region: Option<Spanned<String>>,
}

/// Who may apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applicant {
    /// A citizen, for themself.
    Citizen,
    /// An enterprise's account.
    Enterprise,
    /// An officer, on someone's behalf.
    Officer,
}

impl Applicant {
    /// As written in definitions.
    pub fn as_str(self) -> &'static str {
        match self {
            Applicant::Citizen => "citizen",
            Applicant::Enterprise => "enterprise",
            Applicant::Officer => "officer",
        }
    }
}

/// The type of an input.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputType {
    /// A Chinese vehicle plate.
    Plate,
    /// A resident ID number (checksum verified).
    IdNumber,
    /// A date `YYYY-MM-DD`, within `[today + min_days, today + max_days]` when given.
    Date {
        /// Earliest, days from today.
        min_days: Option<i64>,
        /// Latest, days from today.
        max_days: Option<i64>,
    },
    /// One of the values.
    Enum {
        /// The values.
        values: Vec<String>,
        /// What each value means, for the applicant (`"全天 / All day"`).
        labels: BTreeMap<String, String>,
    },
    /// Money in yuan (kept in fen), up to a maximum.
    Money {
        /// Largest amount, yuan.
        max_yuan: Option<f64>,
    },
    /// Free text, up to a length.
    Text {
        /// Longest, characters.
        max_chars: usize,
    },
}

/// An input.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Input {
    /// Its name (what rules read).
    pub name: String,
    /// Its type and limits.
    pub kind: InputType,
    /// Shown to applicants.
    pub label: Option<String>,
    /// Whether it must be given.
    pub required: bool,
}

/// A lookup: SQL with `:input` parameters, run as the service's department.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Lookup {
    /// Its name (rules read `<name>.found`, `<name>.<column>`).
    pub name: String,
    /// The SQL.
    pub sql: String,
    /// The inputs its parameters name, in order of first use.
    pub params: Vec<String>,
    /// The SQL with its parameters as `$1, $2, …` in that order, as it is planned.
    #[serde(skip)]
    pub positional: String,
    /// What it reads, for the applicant (`"机动车登记 / Vehicle registration"`).
    pub label: Option<String>,
    /// Each column's label for the applicant; `service apply` checks every column has one.
    pub fields: BTreeMap<String, String>,
}

/// A quota.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Quota {
    /// Its name (rules read `quota.<name>.used|left|limit`).
    pub name: String,
    /// The input it counts by.
    pub key: String,
    /// Units per period.
    pub limit: u32,
    /// The period.
    pub period: Period,
    /// The date input that says which period a grant counts in (default: today).
    pub date: Option<String>,
    /// Shown when it is used up.
    pub reason: String,
}

/// A money line: a credit account per key (e.g. per patient), drawn by each granted
/// application and repaid later.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Line {
    /// Its name (rules read `line.<name>.left|limit|outstanding|overdue`).
    pub name: String,
    /// The input the account is keyed by.
    pub key: String,
    /// The line's size in yuan, as written (an expression over inputs and lookups).
    pub limit: String,
    /// Parsed.
    #[serde(skip)]
    pub limit_expr: Expr,
    /// The money input each application draws.
    pub amount: String,
    /// Days each draw has to be repaid.
    pub due_days: u32,
    /// Shown when a draw does not fit.
    pub reason: String,
}

/// The recorded consent an application needs: that of the person whose ID number an input
/// holds (e.g. the patient a hospital charges).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Consent {
    /// The `id_number` input naming the person.
    pub subject: String,
    /// Shown when it is missing.
    pub reason: String,
}

/// The fields of the applicant that lookups (`:applicant.id_number`) and rules
/// (`applicant.id_number`) read. yunqi fills them in from the authenticated principal, never
/// from the inputs.
pub const APPLICANT_FIELDS: [&str; 5] = ["id_number", "name", "principal", "role", "department"];

/// Whom an application is for: the person an `id_number` input names, or the person a
/// lookup's row belongs to (its dataset's subject column, e.g. a vehicle's owner).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Subject {
    /// An `id_number` input.
    Input(String),
    /// A lookup whose dataset declares a subject column.
    Lookup(String),
}

/// On whose behalf one kind of applicant may apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BehalfMode {
    /// Only for themself: the subject must be the applicant (a citizen's own ID number).
    Own,
    /// For anyone (an officer at a service counter, who checks papers); audited.
    Anyone,
    /// For a person who has consented to the service (`[consent]`, e.g. a hospital for its
    /// patient).
    Consented,
    /// For themself, or for a person who authorised them in the service's agents dataset.
    Agents,
    /// Not at all.
    Nobody,
}

/// Who may apply on whose behalf (`[behalf]`). Checked before anything is decided: an
/// application for someone the applicant may not act for is refused as a denial, audited, and
/// spends nothing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Behalf {
    /// Whom the application is for.
    pub subject: Subject,
    /// For citizens (default: only themselves).
    pub citizen: BehalfMode,
    /// For officers (default: anyone).
    pub officer: BehalfMode,
    /// For enterprises' accounts (default: a consented person with `[consent]`, else nobody).
    pub enterprise: BehalfMode,
    /// The dataset of authorised agents (`agent_id`, `subject_id`: ID numbers; `until`: an
    /// optional DATE), `department.name`, read as the service's department.
    pub agents: Option<String>,
    /// Shown when the applicant may not apply for the subject; says nothing of who it is.
    pub reason: String,
    /// The same in English.
    pub reason_en: Option<String>,
}

impl Behalf {
    /// The mode for a kind of applicant.
    pub fn mode(&self, applicant: Applicant) -> BehalfMode {
        match applicant {
            Applicant::Citizen => self.citizen,
            Applicant::Officer => self.officer,
            Applicant::Enterprise => self.enterprise,
        }
    }
}

/// Events that cancel documents: an event of `stream` whose `column` equals a document's
/// `input` and whose event time falls within the document's validity revokes it (the quota
/// it used stays used).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cancel {
    /// The stream (`department.name`, of the service's own department).
    pub stream: String,
    /// Its column matched.
    pub column: String,
    /// The input it is matched against.
    pub input: String,
    /// The reason the revocation gives.
    pub reason: String,
}

/// What happens when a rule is not met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Otherwise {
    /// The application is refused.
    Refuse,
    /// An officer reviews it.
    Review,
}

/// A rule.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// The condition, as written.
    pub require: String,
    /// Parsed.
    #[serde(skip)]
    pub expr: Expr,
    /// What it checks, as a sentence an applicant reads (`车辆不是浙A号牌`).
    pub label: String,
    /// The same in English.
    pub label_en: String,
    /// Shown when it is not met.
    pub reason: String,
    /// The same in English.
    pub reason_en: Option<String>,
    /// What happens when it is not met.
    pub otherwise: Otherwise,
}

/// How applications are decided.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "decide", rename_all = "snake_case")]
pub enum Outcome {
    /// By the rules alone.
    Automatic,
    /// By an officer, within a deadline.
    Review {
        /// Hours an officer has (办结时限).
        hours: f64,
    },
}

/// The document a granted application gets.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Document {
    /// Its title.
    pub title: String,
    /// The inputs it shows.
    pub fields: Vec<String>,
    /// The `window`-like input that sets its validity, if any.
    pub valid_window: Option<String>,
    /// When set, the document carries a new unified social credit code (统一社会信用代码)
    /// registered in this administrative region (six digits, e.g. `330106`).
    pub credit_code_region: Option<String>,
}

/// A checked service definition.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Service {
    /// Department.
    pub department: String,
    /// Name (`urgent-entry-permit`).
    pub name: String,
    /// Title.
    pub title: String,
    /// Title in English.
    pub title_en: Option<String>,
    /// Description.
    pub description: String,
    /// Who may apply.
    pub applicants: Vec<Applicant>,
    /// When set, applicants that belong to a department (officers, service accounts) must
    /// belong to one of these (e.g. hospitals are accounts of `health`).
    pub applicant_departments: Option<Vec<String>>,
    /// The dataset of holidays and make-up working days (`day` DATE, `kind` 'holiday' or
    /// 'workday') that `is_rest_day` reads, `department.dataset`.
    pub calendar: Option<String>,
    /// Inputs.
    pub inputs: Vec<Input>,
    /// Lookups.
    pub lookups: Vec<Lookup>,
    /// Quotas.
    pub quotas: Vec<Quota>,
    /// Money lines.
    pub lines: Vec<Line>,
    /// The consent an application needs, if any.
    pub consent: Option<Consent>,
    /// Who may apply on whose behalf, if declared.
    pub behalf: Option<Behalf>,
    /// Events that cancel issued documents.
    pub cancel_on: Vec<Cancel>,
    /// Rules, in the order they are evaluated.
    pub rules: Vec<Rule>,
    /// How it decides.
    pub outcome: Outcome,
    /// Hours an officer has to decide an application sent to review (by the outcome, or by a
    /// rule with `otherwise = "review"`).
    pub review_hours: f64,
    /// What it issues.
    pub document: Option<Document>,
}

impl Service {
    /// `department.name`.
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.department, self.name)
    }

    /// What `service apply` warns about: quotas and money lines counted by an input that
    /// names a person or a vehicle which nothing ties to the applicant — the `[behalf]`
    /// subject, the consent's subject, or a rule that reads the applicant. Without a tie,
    /// anyone can spend anyone's quota.
    pub fn warnings(&self) -> Vec<String> {
        let names_someone = |input: &str| {
            self.inputs.iter().any(|i| {
                i.name == input && matches!(i.kind, InputType::Plate | InputType::IdNumber)
            })
        };
        // The lookups keyed by an input: their rows are what the input names.
        let keyed_by = |input: &str| -> Vec<&str> {
            self.lookups
                .iter()
                .filter(|l| l.params.iter().any(|p| p == input))
                .map(|l| l.name.as_str())
                .collect()
        };
        let tied = |input: &str| {
            let lookups = keyed_by(input);
            let by_behalf = self.behalf.as_ref().is_some_and(|b| match &b.subject {
                Subject::Input(i) => i == input,
                Subject::Lookup(l) => lookups.contains(&l.as_str()),
            });
            let by_consent = self.consent.as_ref().is_some_and(|c| c.subject == input);
            let by_rule = self.rules.iter().any(|r| {
                let mut names = Vec::new();
                r.expr.names(&mut names);
                names
                    .iter()
                    .any(|n| n.first().is_some_and(|f| f == "applicant"))
                    && names.iter().any(|n| match n.as_slice() {
                        [one] => one == input,
                        [l, _] => lookups.contains(&l.as_str()),
                        _ => false,
                    })
            });
            by_behalf || by_consent || by_rule
        };
        let mut out = Vec::new();
        let counted = self
            .quotas
            .iter()
            .map(|q| ("quota", &q.name, &q.key))
            .chain(self.lines.iter().map(|l| ("money line", &l.name, &l.key)));
        for (what, name, key) in counted {
            if names_someone(key) && !tied(key) {
                out.push(format!(
                    "{what} {name} is counted by the input {key}, which nothing ties to the applicant: anyone may spend another person's {what}; declare [behalf] with the subject it belongs to, or a rule that compares it with applicant.id_number"
                ));
            }
        }
        out
    }
}

/// Problems found in a definition, each on its line.
struct Problems<'a> {
    src: &'a str,
    list: Vec<String>,
}

impl Problems<'_> {
    fn line(&self, at: usize) -> usize {
        self.src[..at.min(self.src.len())].matches('\n').count() + 1
    }
    fn add(&mut self, span: Range<usize>, what: impl Into<String>) {
        let line = self.line(span.start);
        self.list.push(format!("line {line}: {}", what.into()));
    }
}

fn check_name(kind: &str, raw: &str) -> Result<(), String> {
    let ok = !raw.is_empty()
        && raw.len() <= SERVICE_NAME_BYTES_MAX
        && raw.as_bytes()[0].is_ascii_lowercase()
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} \"{raw}\" is not a valid name: use lowercase letters, digits, '-' and '_', starting with a letter"
        ))
    }
}

/// The `:name` parameters of a lookup's SQL (outside quoted text, `::` casts left alone), in
/// order of first use, and the SQL with each written as `$n`, its place in that order.
fn params(sql: &str) -> (Vec<String>, String) {
    let b = sql.as_bytes();
    let mut names: Vec<String> = Vec::new();
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' => quote = Some(c),
            None if c == b':' && i + 1 < b.len() && b[i + 1] == b':' => i += 1, // a cast
            None if c == b':' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                // `:applicant.id_number`: a field of the applicant.
                if &sql[start..j] == "applicant"
                    && j + 1 < b.len()
                    && b[j] == b'.'
                    && (b[j + 1].is_ascii_alphabetic() || b[j + 1] == b'_')
                {
                    j += 1;
                    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                        j += 1;
                    }
                }
                if j > start {
                    let p = &sql[start..j];
                    let n = match names.iter().position(|x| x == p) {
                        Some(k) => k + 1,
                        None => {
                            names.push(p.to_string());
                            names.len()
                        }
                    };
                    out.push_str(&sql[copied..i]);
                    out.push_str(&format!("${n}"));
                    copied = j;
                }
                i = j;
                continue;
            }
            None => {}
        }
        i += 1;
    }
    out.push_str(&sql[copied..]);
    (names, out)
}

/// Reads and checks a definition. The error lists every problem found, each with its line.
pub fn parse(src: &str) -> Result<Service, Error> {
    let file: File = toml::from_str(src).map_err(|e| {
        let line = e
            .span()
            .map(|s| src[..s.start.min(src.len())].matches('\n').count() + 1);
        Error::invalid(match line {
            Some(l) => format!("the definition is not valid at line {l}"),
            None => "the definition is not valid".to_string(),
        })
        .detail(e.message().to_string())
        .hint("see the services/ directory of the repository for complete examples")
    })?;
    let mut p = Problems {
        src,
        list: Vec::new(),
    };
    let h = &file.service;
    if let Err(e) = yunqi_types::Name::parse("department", h.department.get_ref()) {
        p.add(h.department.span(), e.message);
    }
    if let Err(e) = check_name("service", h.name.get_ref()) {
        p.add(h.name.span(), e);
    }
    let mut applicants = Vec::new();
    for a in h.applicants.get_ref() {
        match a.get_ref().as_str() {
            "citizen" => applicants.push(Applicant::Citizen),
            "enterprise" => applicants.push(Applicant::Enterprise),
            "officer" => applicants.push(Applicant::Officer),
            other => p.add(
                a.span(),
                format!("unknown applicant \"{other}\": use citizen, enterprise or officer"),
            ),
        }
    }
    if let Some(c) = &h.calendar
        && c.get_ref().split('.').count() != 2
    {
        p.add(
            c.span(),
            "calendar names a dataset: calendar = \"city.holidays\"",
        );
    }
    if h.applicants.get_ref().is_empty() {
        p.add(
            h.applicants.span(),
            "say who may apply: applicants = [\"citizen\"]",
        );
    }

    let mut taken: HashSet<String> = HashSet::new();
    let mut claim = |p: &mut Problems, name: &Spanned<String>, what: &str| {
        if let Err(e) = check_name(what, name.get_ref()) {
            p.add(name.span(), e);
        } else if !taken.insert(name.get_ref().clone()) {
            p.add(
                name.span(),
                format!(
                    "\"{}\" is declared twice (inputs, lookups and quotas share names)",
                    name.get_ref()
                ),
            );
        } else if matches!(
            name.get_ref().as_str(),
            "quota" | "line" | "consent" | "applicant" | "behalf"
        ) {
            p.add(
                name.span(),
                format!(
                    "\"{}\" is reserved: rules read quota.<name>.left, line.<name>.left and applicant.id_number",
                    name.get_ref()
                ),
            );
        }
    };

    let mut inputs = Vec::new();
    for i in &file.inputs {
        claim(&mut p, &i.name, "input");
        let kind = match i.kind.get_ref().as_str() {
            "plate" => InputType::Plate,
            "id_number" => InputType::IdNumber,
            "date" => InputType::Date {
                min_days: i.min_days,
                max_days: i.max_days,
            },
            "enum" => match &i.values {
                Some(v) if !v.get_ref().is_empty() => {
                    let labels = i.value_labels.clone().unwrap_or_default();
                    let missing: Vec<&str> = v
                        .get_ref()
                        .iter()
                        .filter(|x| !labels.contains_key(*x))
                        .map(String::as_str)
                        .collect();
                    if !missing.is_empty() {
                        p.add(
                            i.kind.span(),
                            format!(
                                "input {}: label every value for applicants, e.g. value_labels = {{ {} = \"… / …\" }} (missing: {})",
                                i.name.get_ref(),
                                missing[0],
                                missing.join(", ")
                            ),
                        );
                    }
                    InputType::Enum {
                        values: v.get_ref().clone(),
                        labels,
                    }
                }
                _ => {
                    p.add(
                        i.kind.span(),
                        format!("input {}: an enum needs values = [\"…\"]", i.name.get_ref()),
                    );
                    continue;
                }
            },
            "money" => InputType::Money {
                max_yuan: i.max_yuan,
            },
            "text" => InputType::Text {
                max_chars: i.max_chars.unwrap_or(500),
            },
            other => {
                p.add(
                    i.kind.span(),
                    format!("unknown input type \"{other}\": use plate, id_number, date, enum, money or text"),
                );
                continue;
            }
        };
        if let (Some(a), Some(b)) = (i.min_days, i.max_days)
            && a > b
        {
            p.add(
                i.name.span(),
                format!("input {}: min_days is after max_days", i.name.get_ref()),
            );
        }
        inputs.push(Input {
            name: i.name.get_ref().clone(),
            kind,
            label: i.label.clone(),
            required: i.required,
        });
    }
    let input_names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();

    let mut lookups = Vec::new();
    for l in &file.lookups {
        claim(&mut p, &l.name, "lookup");
        let (ps, positional) = params(l.sql.get_ref());
        for q in &ps {
            if let Some(field) = q.strip_prefix("applicant.") {
                if !APPLICANT_FIELDS.contains(&field) {
                    p.add(
                        l.sql.span(),
                        format!(
                            "lookup {}: :{q} is not a field of the applicant; fields: {}",
                            l.name.get_ref(),
                            APPLICANT_FIELDS.join(", ")
                        ),
                    );
                }
            } else if !input_names.contains(&q.as_str()) {
                p.add(
                    l.sql.span(),
                    format!(
                        "lookup {}: :{q} is not an input; inputs: {} (and :applicant.id_number, the applicant's own)",
                        l.name.get_ref(),
                        input_names.join(", ")
                    ),
                );
            }
        }
        lookups.push(Lookup {
            name: l.name.get_ref().clone(),
            sql: l.sql.get_ref().clone(),
            params: ps,
            positional,
            label: l.label.clone(),
            fields: l.fields.clone(),
        });
    }

    let mut quotas = Vec::new();
    for q in &file.quotas {
        claim(&mut p, &q.name, "quota");
        if !input_names.contains(&q.key.get_ref().as_str()) {
            p.add(
                q.key.span(),
                format!(
                    "quota {}: key {} is not an input",
                    q.name.get_ref(),
                    q.key.get_ref()
                ),
            );
        }
        if let Some(d) = &q.date {
            match inputs.iter().find(|i| &i.name == d.get_ref()) {
                Some(Input {
                    kind: InputType::Date { .. },
                    ..
                }) => {}
                _ => p.add(
                    d.span(),
                    format!(
                        "quota {}: date {} is not a date input",
                        q.name.get_ref(),
                        d.get_ref()
                    ),
                ),
            }
        }
        if q.limit == 0 {
            p.add(
                q.name.span(),
                format!("quota {}: a limit of 0 grants nothing", q.name.get_ref()),
            );
        }
        // A bad period is reported; the quota is still declared, so rules reading it are not
        // reported as well.
        let period = Period::parse(q.period.get_ref()).unwrap_or_else(|e| {
            p.add(q.period.span(), e.message);
            Period::Total
        });
        quotas.push(Quota {
            name: q.name.get_ref().clone(),
            key: q.key.get_ref().clone(),
            limit: q.limit,
            period,
            date: q.date.as_ref().map(|d| d.get_ref().clone()),
            reason: q.reason.clone(),
        });
    }

    let lookup_names: Vec<&str> = lookups.iter().map(|l| l.name.as_str()).collect();
    let input_of = |n: &str| inputs.iter().find(|i| i.name == n).map(|i| &i.kind);
    let mut lines = Vec::new();
    for l in &file.lines {
        claim(&mut p, &l.name, "line");
        if input_of(l.key.get_ref()).is_none() {
            p.add(
                l.key.span(),
                format!(
                    "line {}: key {} is not an input",
                    l.name.get_ref(),
                    l.key.get_ref()
                ),
            );
        }
        if !matches!(input_of(l.amount.get_ref()), Some(InputType::Money { .. })) {
            p.add(
                l.amount.span(),
                format!(
                    "line {}: amount {} is not a money input",
                    l.name.get_ref(),
                    l.amount.get_ref()
                ),
            );
        }
        if l.due_days == 0 || l.due_days > 3650 {
            p.add(
                l.name.span(),
                format!(
                    "line {}: due_days must be at least 1 and at most 3650",
                    l.name.get_ref()
                ),
            );
        }
        let limit_expr = match rules::parse(l.limit.get_ref()) {
            Ok(e) => {
                let mut names = Vec::new();
                e.names(&mut names);
                for n in names {
                    let known = match n.as_slice() {
                        [one] => input_names.contains(&one.as_str()),
                        [l, _] => lookup_names.contains(&l.as_str()),
                        _ => false,
                    };
                    if !known {
                        p.add(
                            l.limit.span(),
                            format!(
                                "line {}: its limit reads {}, which is not an input or a lookup's column",
                                l.name.get_ref(),
                                n.join(".")
                            ),
                        );
                    }
                }
                e
            }
            Err(e) => {
                let at = l.limit.span().start + 1 + e.at.unwrap_or(0);
                p.add(at..at, format!("line {}: {}", l.name.get_ref(), e.message));
                continue;
            }
        };
        lines.push(Line {
            name: l.name.get_ref().clone(),
            key: l.key.get_ref().clone(),
            limit: l.limit.get_ref().clone(),
            limit_expr,
            amount: l.amount.get_ref().clone(),
            due_days: l.due_days,
            reason: l.reason.clone(),
        });
    }
    if let Some(extra) = file.lines.get(1) {
        p.add(
            extra.name.span(),
            "a service draws on one money line at most",
        );
    }
    let consent = file.consent.as_ref().map(|c| {
        if !matches!(input_of(c.subject.get_ref()), Some(InputType::IdNumber)) {
            p.add(
                c.subject.span(),
                format!(
                    "consent subject {} is not an id_number input",
                    c.subject.get_ref()
                ),
            );
        }
        Consent {
            subject: c.subject.get_ref().clone(),
            reason: c.reason.clone(),
        }
    });
    let behalf = file.behalf.as_ref().map(|b| {
        let subject = b.subject.get_ref();
        let subject = if matches!(input_of(subject), Some(InputType::IdNumber)) {
            Subject::Input(subject.clone())
        } else if lookup_names.contains(&subject.as_str()) {
            Subject::Lookup(subject.clone())
        } else {
            p.add(
                b.subject.span(),
                format!(
                    "behalf subject {subject} is neither an id_number input nor a lookup: name the input that holds the person's ID number, or the lookup whose row belongs to them"
                ),
            );
            Subject::Input(subject.clone())
        };
        let mut mode = |v: &Option<Spanned<String>>, default: BehalfMode| match v
            .as_ref()
            .map(|m| (m, m.get_ref().as_str()))
        {
            None => default,
            Some((_, "own")) => BehalfMode::Own,
            Some((_, "anyone")) => BehalfMode::Anyone,
            Some((_, "consented")) => BehalfMode::Consented,
            Some((_, "agents")) => BehalfMode::Agents,
            Some((_, "nobody")) => BehalfMode::Nobody,
            Some((m, other)) => {
                p.add(
                    m.span(),
                    format!("behalf \"{other}\": use own, agents, consented, anyone or nobody"),
                );
                BehalfMode::Nobody
            }
        };
        let consented_default = if consent.is_some() {
            BehalfMode::Consented
        } else {
            BehalfMode::Nobody
        };
        let behalf = Behalf {
            citizen: mode(&b.citizen, BehalfMode::Own),
            officer: mode(&b.officer, BehalfMode::Anyone),
            enterprise: mode(&b.enterprise, consented_default),
            subject,
            agents: b.agents.as_ref().map(|a| a.get_ref().clone()),
            reason: b.reason.clone(),
            reason_en: b.reason_en.clone(),
        };
        let modes = [behalf.citizen, behalf.officer, behalf.enterprise];
        if modes.contains(&BehalfMode::Consented)
            && consent.as_ref().map(|c| Subject::Input(c.subject.clone())) != Some(behalf.subject.clone())
        {
            p.add(
                b.subject.span(),
                "behalf \"consented\" needs a [consent] section naming the same subject",
            );
        }
        match (&b.agents, modes.contains(&BehalfMode::Agents)) {
            (None, true) => p.add(
                b.subject.span(),
                "behalf \"agents\" needs agents = \"department.dataset\", the dataset of authorised agents",
            ),
            (Some(a), _) if a.get_ref().split('.').count() != 2 => p.add(
                a.span(),
                "agents names a dataset: agents = \"market.authorised_agents\"",
            ),
            (Some(a), _) if matches!(behalf.subject, Subject::Lookup(_)) => p.add(
                a.span(),
                "agents are matched by ID number: make the behalf subject an id_number input",
            ),
            _ => {}
        }
        behalf
    });
    let mut cancel_on = Vec::new();
    for c in &file.cancel_on {
        match c.stream.get_ref().split_once('.') {
            Some((d, _)) if d == h.department.get_ref() => {}
            _ => p.add(
                c.stream.span(),
                format!(
                    "cancel_on stream {} is not a stream of department {}: name one of its own streams, department.name",
                    c.stream.get_ref(),
                    h.department.get_ref()
                ),
            ),
        }
        if input_of(c.input.get_ref()).is_none() {
            p.add(
                c.input.span(),
                format!("cancel_on input {} is not an input", c.input.get_ref()),
            );
        }
        if file.document.is_none() {
            p.add(
                c.stream.span(),
                "cancel_on cancels documents: the service issues none ([document] is missing)",
            );
        }
        cancel_on.push(Cancel {
            stream: c.stream.get_ref().clone(),
            column: c.column.get_ref().clone(),
            input: c.input.get_ref().clone(),
            reason: c.reason.clone(),
        });
    }
    let line_names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
    let quota_names: Vec<&str> = quotas.iter().map(|q| q.name.as_str()).collect();
    let mut rules_out = Vec::new();
    let mut rule_names = HashSet::new();
    for r in &file.rules {
        if let Err(e) = check_name("rule", r.name.get_ref()) {
            p.add(r.name.span(), e);
        } else if !rule_names.insert(r.name.get_ref().clone()) {
            p.add(
                r.name.span(),
                format!("rule \"{}\" is declared twice", r.name.get_ref()),
            );
        }
        let expr = match rules::parse(r.require.get_ref()) {
            Ok(e) => e,
            Err(e) => {
                // The span covers the quotes: the expression starts one byte in.
                let at = r.require.span().start + 1 + e.at.unwrap_or(0);
                p.add(at..at, format!("rule {}: {}", r.name.get_ref(), e.message));
                continue;
            }
        };
        let mut names = Vec::new();
        expr.names(&mut names);
        for n in names {
            let known = match n.as_slice() {
                [one] => input_names.contains(&one.as_str()),
                [q, name, what] if q == "quota" => {
                    quota_names.contains(&name.as_str())
                        && matches!(what.as_str(), "used" | "left" | "limit")
                }
                [l, name, what] if l == "line" => {
                    line_names.contains(&name.as_str())
                        && matches!(what.as_str(), "left" | "limit" | "outstanding" | "overdue")
                }
                [a, field] if a == "applicant" => APPLICANT_FIELDS.contains(&field.as_str()),
                [l, _] => lookup_names.contains(&l.as_str()),
                _ => false,
            };
            if !known {
                p.add(
                    r.require.span(),
                    format!(
                        "rule {}: {} is not something a rule can read (inputs: {}; lookups: {}; quotas: {})",
                        r.name.get_ref(),
                        n.join("."),
                        input_names.join(", "),
                        lookup_names.iter().map(|l| format!("{l}.<column>")).collect::<Vec<_>>().join(", "),
                        quota_names.iter().map(|q| format!("quota.{q}.left")).collect::<Vec<_>>().join(", "),
                    ),
                );
            }
        }
        let (label, label_en) = match (&r.label, &r.label_en) {
            (Some(zh), Some(en)) if !zh.trim().is_empty() && !en.trim().is_empty() => {
                (zh.clone(), en.clone())
            }
            _ => {
                p.add(
                    r.name.span(),
                    format!(
                        "rule {}: say what it checks in words an applicant reads, in Chinese and English: label = \"车辆不是浙A号牌\" and label_en = \"The vehicle does not have a local 浙A plate\"",
                        r.name.get_ref()
                    ),
                );
                (String::new(), String::new())
            }
        };
        let otherwise = match r.otherwise.as_ref().map(|o| o.get_ref().as_str()) {
            None | Some("refuse") => Otherwise::Refuse,
            Some("review") => Otherwise::Review,
            Some(other) => {
                if let Some(o) = &r.otherwise {
                    p.add(
                        o.span(),
                        format!("otherwise = \"{other}\": use refuse or review"),
                    );
                }
                Otherwise::Refuse
            }
        };
        rules_out.push(Rule {
            name: r.name.get_ref().clone(),
            require: r.require.get_ref().clone(),
            expr,
            label,
            label_en,
            reason: r.reason.clone(),
            reason_en: r.reason_en.clone(),
            otherwise,
        });
    }

    let outcome = match file.outcome.decide.get_ref().as_str() {
        "automatic" => Outcome::Automatic,
        "review" => Outcome::Review {
            hours: file.outcome.review_hours.unwrap_or(24.0),
        },
        other => {
            p.add(
                file.outcome.decide.span(),
                format!("decide = \"{other}\": use automatic or review"),
            );
            Outcome::Automatic
        }
    };
    let review_hours = match outcome {
        Outcome::Review { hours } => Some(hours),
        Outcome::Automatic => file.outcome.review_hours.or_else(|| {
            file.rules
                .iter()
                .any(|r| {
                    r.otherwise
                        .as_ref()
                        .is_some_and(|o| o.get_ref() == "review")
                })
                .then_some(24.0)
        }),
    };
    if let Some(h) = review_hours
        && !(h > 0.0 && h <= 24.0 * 366.0)
    {
        p.add(
            file.outcome.decide.span(),
            format!(
                "review_hours = {h}: give the hours an officer has, more than 0 and at most a year"
            ),
        );
    }
    let document = file.document.as_ref().map(|d| {
        if let Some(r) = &d.credit_code_region
            && !(r.get_ref().len() == 6 && r.get_ref().bytes().all(|b| b.is_ascii_digit()))
        {
            p.add(
                r.span(),
                "credit_code_region is a six-digit administrative division code, e.g. \"330106\"",
            );
        }
        for f in d.fields.get_ref() {
            if !input_names.contains(&f.as_str()) {
                p.add(
                    d.fields.span(),
                    format!("document field {f} is not an input"),
                );
            }
        }
        if let Some(w) = &d.valid_window
            && !input_names.contains(&w.get_ref().as_str())
        {
            p.add(
                w.span(),
                format!("valid_window {} is not an input", w.get_ref()),
            );
        }
        Document {
            title: d.title.clone(),
            fields: d.fields.get_ref().clone(),
            valid_window: d.valid_window.as_ref().map(|w| w.get_ref().clone()),
            credit_code_region: d.credit_code_region.as_ref().map(|r| r.get_ref().clone()),
        }
    });

    if !p.list.is_empty() {
        let n = p.list.len();
        return Err(Error::invalid(format!(
            "the definition has {n} problem{}",
            if n == 1 { "" } else { "s" }
        ))
        .detail(p.list.join("\n"))
        .hint("fix the lines named and apply it again; nothing was applied"));
    }
    Ok(Service {
        department: h.department.get_ref().clone(),
        name: h.name.get_ref().clone(),
        title: h.title.clone(),
        title_en: h.title_en.clone(),
        description: h.description.clone(),
        applicants,
        applicant_departments: h.applicant_departments.clone(),
        calendar: h.calendar.as_ref().map(|c| c.get_ref().clone()),
        inputs,
        lookups,
        quotas,
        lines,
        consent,
        behalf,
        cancel_on,
        rules: rules_out,
        review_hours: review_hours.unwrap_or(24.0),
        outcome,
        document,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERMIT: &str = include_str!("../../../services/traffic.urgent-entry-permit.toml");

    #[test]
    fn the_permit_service_reads() {
        let s = parse(PERMIT).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(s.full_name(), "traffic.urgent-entry-permit");
        assert_eq!(s.applicants, vec![Applicant::Citizen]);
        let names: Vec<&str> = s.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["plate", "date", "window", "reason"]);
        assert_eq!(
            s.quotas
                .iter()
                .map(|q| (q.name.as_str(), q.limit, q.period))
                .collect::<Vec<_>>(),
            [("yearly", 12, Period::Year), ("monthly", 3, Period::Month)]
        );
        assert!(s.rules.len() >= 4);
        assert_eq!(s.lookups[0].params, ["plate"]);
        assert!(s.lookups[0].positional.ends_with("WHERE plate = $1"));
        assert_eq!(
            params("SELECT ':a', x::text FROM t WHERE a = :a AND b = :bb OR c = :a"),
            (
                vec!["a".to_string(), "bb".to_string()],
                "SELECT ':a', x::text FROM t WHERE a = $1 AND b = $2 OR c = $1".to_string()
            )
        );
    }

    #[test]
    fn services_are_bound_to_the_applicant() {
        let s = parse(PERMIT).unwrap();
        let b = s.behalf.as_ref().unwrap();
        assert_eq!(b.subject, Subject::Lookup("vehicle".into()));
        assert_eq!(
            (b.citizen, b.officer, b.enterprise),
            (BehalfMode::Own, BehalfMode::Anyone, BehalfMode::Nobody)
        );
        assert_eq!(s.warnings(), Vec::<String>::new());
        // Without [behalf], both quotas count by a plate nothing ties to the applicant.
        let start = PERMIT.find("[behalf]").unwrap();
        let end = start + PERMIT[start..].find("\n\n").unwrap();
        let loose = format!("{}{}", &PERMIT[..start], &PERMIT[end..]);
        let w = parse(&loose).unwrap().warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("quota yearly is counted by the input plate"),
            "{w:?}"
        );
        // A rule that reads the applicant ties the lookup keyed by the plate.
        let ruled = loose.replace(
            "name = \"vehicle_known\"\nrequire = \"vehicle.found\"",
            "name = \"vehicle_known\"\nrequire = \"vehicle.found and vehicle.owner == applicant.id_number\"",
        );
        assert_ne!(ruled, loose);
        assert_eq!(parse(&ruled).unwrap().warnings(), Vec::<String>::new());
        assert_eq!(
            params("SELECT a FROM t WHERE id = :applicant.id_number AND p = :plate"),
            (
                vec!["applicant.id_number".to_string(), "plate".to_string()],
                "SELECT a FROM t WHERE id = $1 AND p = $2".to_string()
            )
        );
        // Bad declarations are named.
        let bad = PERMIT
            .replace("subject = \"vehicle\"", "subject = \"plate\"")
            .replace("citizen = \"own\"", "citizen = \"friends\"")
            .replace(
                "WHERE plate = :plate\"",
                "WHERE plate = :plate AND owner_id = :applicant.phone\"",
            );
        let d = parse(&bad).unwrap_err().detail.unwrap();
        for want in [
            "behalf subject plate is neither an id_number input nor a lookup",
            "behalf \"friends\": use own, agents, consented, anyone or nobody",
            ":applicant.phone is not a field of the applicant",
        ] {
            assert!(d.contains(want), "missing {want:?} in:\n{d}");
        }
        let agents = PERMIT.replace("citizen = \"own\"", "citizen = \"agents\"");
        let d = parse(&agents).unwrap_err().detail.unwrap();
        assert!(d.contains("needs agents = "), "{d}");
    }

    #[test]
    fn lines_consent_and_cancellation_are_checked() {
        let bad = r#"[service]
department = "health"
name = "pay-later"
title = "x"
applicants = ["enterprise"]

[[inputs]]
name = "patient"
type = "text"

[[inputs]]
name = "amount"
type = "text"

[[lines]]
name = "credit"
key = "patient"
limit = "score.line + quota.x.left"
amount = "amount"
due_days = 0
reason = "x"

[consent]
subject = "patient"
reason = "x"

[[cancel_on]]
stream = "traffic.violations"
column = "plate"
input = "plate"
reason = "x"

[[rules]]
name = "r"
require = "line.credit.overdue or line.debit.left > 0"
reason = "x"

[outcome]
decide = "review"
review_hours = 0
"#;
        let d = parse(bad).unwrap_err().detail.unwrap();
        for want in [
            "line 19: line credit: amount amount is not a money input",
            "line credit: due_days must be at least 1",
            "line 18: line credit: its limit reads score.line",
            "line 24: consent subject patient is not an id_number input",
            "line 28: cancel_on stream traffic.violations is not a stream of department health",
            "line 30: cancel_on input plate is not an input",
            "cancel_on cancels documents: the service issues none",
            "rule r: line.debit.left is not something a rule can read",
            "review_hours = 0",
        ] {
            assert!(d.contains(want), "missing {want:?} in:\n{d}");
        }
        assert!(!d.contains("line.credit.overdue"), "{d}");
    }

    #[test]
    fn the_demo_services_read() {
        for (file, src) in [
            (
                "market.business-registration",
                include_str!("../../../services/market.business-registration.toml"),
            ),
            (
                "health.credit-healthcare",
                include_str!("../../../services/health.credit-healthcare.toml"),
            ),
        ] {
            let s = parse(src).unwrap_or_else(|e| panic!("{file}: {e:?} {:?}", e.detail));
            assert_eq!(s.full_name(), file);
            assert_eq!(s.warnings(), Vec::<String>::new(), "{file}");
            assert!(s.behalf.is_some(), "{file}");
        }
    }

    #[test]
    fn problems_are_named_with_their_lines() {
        let bad = r#"[service]
department = "traffic"
name = "Urgent Permit"
title = "x"
applicants = ["citizen", "robot"]

[[inputs]]
name = "plate"
type = "plate"

[[inputs]]
name = "plate"
type = "colour"

[[lookups]]
name = "vehicle"
sql = "SELECT * FROM transport.vehicles WHERE plate = :plat AND x::text = 'a:b'"

[[quotas]]
name = "monthly"
key = "plates"
limit = 3
period = "week"
reason = "used up"

[[rules]]
name = "local"
require = "starts_with(plate, '浙A') and quota.monthly.left > 0 and vehicle.kind == 'car'"
reason = "x"

[[rules]]
name = "typo"
require = "plate = 'x'"
reason = "x"

[[rules]]
name = "unknown"
require = "vehicel.kind == 'car' or quota.yearly.left > 0"
reason = "x"

[outcome]
decide = "sometimes"
"#;
        let e = parse(bad).unwrap_err();
        let d = e.detail.unwrap();
        for want in [
            "line 3: service \"Urgent Permit\" is not a valid name",
            "line 5: unknown applicant \"robot\"",
            "line 12: \"plate\" is declared twice",
            "line 13: unknown input type \"colour\"",
            "line 17: lookup vehicle: :plat is not an input",
            "line 21: quota monthly: key plates is not an input",
            "line 23: unknown quota period \"week\"",
            "line 33: rule typo: use `==` to compare",
            "line 38: rule unknown: vehicel.kind is not something a rule can read",
            "line 38: rule unknown: quota.yearly.left is not something",
            "line 42: decide = \"sometimes\"",
        ] {
            assert!(d.contains(want), "missing {want:?} in:\n{d}");
        }
        assert!(
            !d.lines()
                .any(|l| l.contains("rule local") && !l.contains("say what it checks")),
            "the good rule is fine but for its label:\n{d}"
        );
        assert!(d.contains("line 27: rule local: say what it checks"), "{d}");
        assert!(e.message.contains("problems"));
        // Syntax and unknown fields: the TOML error, with its line.
        let e = parse("[service]\ndepartment = \"traffic\"\nname = \"x\"\ntitle = \"x\"\napplicants = [\"citizen\"]\ncolour = 1\n[outcome]\ndecide = \"automatic\"\n").unwrap_err();
        assert!(e.message.contains("line 6"), "{e:?}");
        assert!(e.detail.unwrap().contains("colour"));
    }
}
