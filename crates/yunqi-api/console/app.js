// The yunqi console: one page, no build step, talking to the HTTP API with the user's token.
// Everything shown comes from the API as that principal: roles, grants and masks apply there.
// The DOM is built with textContent only (no innerHTML), so nothing from the data is markup.
"use strict";

const I18N = {
  zh: {
    brand: "云栖 · 城市政务云", logout: "退出", "nav.catalog": "数据目录", "nav.sql": "SQL",
    "nav.grants": "授权", "nav.services": "办事", "nav.dashboard": "城市大脑", "nav.audit": "审计",
    "nav.verify": "验证电子证照", "login.title": "登录", "login.token": "令牌（token）",
    "login.help": "粘贴您的令牌。演示城市的令牌在 DIR/demo/credentials.json。", "login.go": "登录", "login.empty": "请先粘贴令牌，再点登录。",
    "catalog.title": "数据目录", "catalog.search": "搜索数据集", "catalog.go": "搜索",
    "catalog.rows": "行", "catalog.columns": "字段", "catalog.versions": "版本",
    "catalog.lineage": "血缘", "catalog.from": "来源", "catalog.usedby": "被使用",
    "catalog.class": "分级", "catalog.type": "类型", "sql.title": "SQL 查询", "sql.run": "运行",
    "sql.history": "查询历史", "sql.masked": "🔒 表示已脱敏（授权未允许明文）",
    "grants.title": "数据授权", "grants.inbox": "待我审批", "grants.mine": "本部门的授权",
    "grants.request": "申请授权", "grants.dataset": "数据集（部门.名称）", "grants.columns": "字段（逗号分隔）",
    "grants.purpose": "用途", "grants.until": "有效期至", "grants.send": "提交申请",
    "grants.approve": "批准", "grants.refuse": "拒绝", "grants.reason": "拒绝理由", "grants.expiring": "即将到期",
    "services.title": "办事服务", "services.apply": "申请", "services.mine": "我的申请",
    "services.decision": "办理结果", "services.rules": "规则", "services.data": "使用的数据",
    "services.quotas": "额度", "services.document": "电子凭证", "services.queue": "待审核",
    "decision.approved": "已通过", "decision.refused": "未通过", "decision.pending": "审核中",
    "verify.title": "验证电子证照", "verify.token": "凭证（token）", "verify.go": "验证",
    "status.valid": "有效", "status.invalid": "无效", "status.revoked": "已作废",
    "status.expired": "已过期", "status.not_yet_valid": "尚未生效",
    "dash.title": "城市大脑 · 实时路况", "dash.byDistrict": "各区每分钟车流量",
    "dash.segments": "最拥堵路段", "dash.zone": "限行区车流 / 阈值", "dash.permits": "今日签发通行凭证",
    "dash.window": "窗口", "audit.title": "审计", "audit.mine": "谁访问了我的数据",
    "audit.search": "按操作筛选（如 sql.*）", "audit.go": "查询", "none": "暂无", "review.mine": "分配给我",
    "services.inputs": "申请信息", "services.expressions": "规则表达式与原始数据（工作人员）", "services.valid": "有效期",
    "services.qr": "电子凭证二维码", "decision.number": "受理编号", "sql.maskedcell": "已脱敏",
  },
  en: {
    brand: "yunqi · City Cloud", logout: "Log out", "nav.catalog": "Catalog", "nav.sql": "SQL",
    "nav.grants": "Grants", "nav.services": "Services", "nav.dashboard": "City brain", "nav.audit": "Audit",
    "nav.verify": "Verify a document", "login.title": "Log in", "login.token": "Token",
    "login.help": "Paste your token. The demo city's tokens are in DIR/demo/credentials.json.", "login.go": "Log in", "login.empty": "Paste a token first, then log in.",
    "catalog.title": "Catalog", "catalog.search": "Search datasets", "catalog.go": "Search",
    "catalog.rows": "rows", "catalog.columns": "Columns", "catalog.versions": "Versions",
    "catalog.lineage": "Lineage", "catalog.from": "Derived from", "catalog.usedby": "Used by",
    "catalog.class": "Class", "catalog.type": "Type", "sql.title": "SQL", "sql.run": "Run",
    "sql.history": "History", "sql.masked": "🔒 marks masked values (the grant does not allow them in clear)",
    "grants.title": "Grants", "grants.inbox": "Waiting for me", "grants.mine": "My department's grants",
    "grants.request": "Request a grant", "grants.dataset": "Dataset (department.name)", "grants.columns": "Columns (comma-separated)",
    "grants.purpose": "Purpose", "grants.until": "Until", "grants.send": "Send the request",
    "grants.approve": "Approve", "grants.refuse": "Refuse", "grants.reason": "Reason for refusing", "grants.expiring": "expires soon",
    "services.title": "Services", "services.apply": "Apply", "services.mine": "My applications",
    "services.decision": "Decision", "services.rules": "Rules", "services.data": "Data used",
    "services.quotas": "Quotas", "services.document": "Document", "services.queue": "Waiting for review",
    "decision.approved": "Approved", "decision.refused": "Refused", "decision.pending": "Pending",
    "verify.title": "Verify a document", "verify.token": "Token", "verify.go": "Verify",
    "status.valid": "Valid", "status.invalid": "Invalid", "status.revoked": "Revoked",
    "status.expired": "Expired", "status.not_yet_valid": "Not yet valid",
    "dash.title": "City brain · live traffic", "dash.byDistrict": "Vehicles per minute by district",
    "dash.segments": "Most loaded segments", "dash.zone": "Restricted zone load / threshold", "dash.permits": "Permits issued today",
    "dash.window": "Window", "audit.title": "Audit", "audit.mine": "Who accessed my data",
    "audit.search": "Filter by action (e.g. sql.*)", "audit.go": "Search", "none": "None", "review.mine": "Assign to me",
    "services.inputs": "What you gave", "services.expressions": "Rule expressions and raw data (staff)", "services.valid": "Valid",
    "services.qr": "QR code of the document", "decision.number": "No.", "sql.maskedcell": "masked",
  },
};

let lang = localStorage.getItem("yunqi.lang") ||
  ((navigator.languages || [navigator.language || "en"]).some((l) => l.toLowerCase().startsWith("zh")) ? "zh" : "en");
const t = (k) => (I18N[lang] && I18N[lang][k]) || I18N.en[k] || k;
let me = null;
let timer = null;

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function token() { return sessionStorage.getItem("yunqi.token"); }

async function api(method, path, body, extra) {
  const headers = Object.assign({ Authorization: "Bearer " + token(), "Accept-Language": lang === "en" ? "en" : "zh-CN" }, extra || {});
  let payload;
  if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const r = await fetch(path, { method, headers, body: payload });
  const text = await r.text();
  let v; try { v = JSON.parse(text); } catch { v = text; }
  if (!r.ok) {
    const e = (v && v.error) || {};
    throw new Error([e.message || r.status, e.detail, e.hint && ("→ " + e.hint)].filter(Boolean).join("\n"));
  }
  return v;
}

function errorBox(e) { return h("p", { class: "error", role: "alert", text: e.message || String(e) }); }

function render(...kids) {
  const main = document.getElementById("main");
  main.replaceChildren(...kids.flat(Infinity).filter((k) => k !== null && k !== undefined));
}

function applyI18n() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((e) => { e.textContent = t(e.dataset.i18n); });
  document.getElementById("lang").textContent = lang === "zh" ? "EN" : "中文";
}

function table(columns, rows, cell) {
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((v, i) => cell ? cell(v, i) : h("td", { text: v === null ? "" : String(v) }))))));
}

// ---- pages ----

function loginPage() {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", "aria-describedby": "token-help" });
  const out = h("div", {});
  const form = h("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    const tok = input.value.trim();
    if (!tok) { out.replaceChildren(errorBox(new Error(t("login.empty")))); input.focus(); return; }
    sessionStorage.setItem("yunqi.token", tok);
    const e = ++epoch;
    try { if (await loadMe(e)) location.hash = me.principal.role === "citizen" ? "#/services" : "#/catalog"; }
    catch (err) { if (e === epoch) { sessionStorage.removeItem("yunqi.token"); out.replaceChildren(errorBox(err)); } }
  } },
  h("label", { for: "token", text: t("login.token") }), input,
  h("p", { id: "token-help", class: "muted", text: t("login.help") }),
  h("button", { class: "primary", type: "submit", text: t("login.go") }), out);
  render(h("h1", { text: t("login.title") }), form);
  input.focus();
}

async function catalogPage(q) {
  const input = h("input", { id: "q", type: "search", value: q || "", "aria-label": t("catalog.search"), placeholder: t("catalog.search") });
  const list = h("div", {});
  const search = async () => {
    try {
      const v = await api("GET", "/api/v1/datasets" + (input.value ? "?q=" + encodeURIComponent(input.value) : ""));
      list.replaceChildren(...(v.datasets.length ? v.datasets.map((d) => h("div", { class: "card" },
        h("a", { href: "#/dataset/" + d.department + "/" + d.name, text: d.sql_name }), " ",
        h("span", { class: "muted", text: `${d.rows} ${t("catalog.rows")} · ${d.tags.join(", ")}` }),
        h("div", { text: d.description }))) : [h("p", { class: "muted", text: t("none") })]));
    } catch (e) { list.replaceChildren(errorBox(e)); }
  };
  render(h("h1", { text: t("catalog.title") }),
    h("form", { onsubmit: (ev) => { ev.preventDefault(); search(); } }, input, " ", h("button", { type: "submit", text: t("catalog.go") })), list);
  search();
}

// A lineage graph: the datasets this one is derived from on the left, those derived from it
// on the right, each a link to its page.
function lineageGraph(sources, self, users) {
  const NS = "http://www.w3.org/2000/svg";
  const rows = Math.max(sources.length, users.length, 1);
  const W = 760, RH = 44, H = rows * RH + 10, BW = 200;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("class", "lineage");
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", t("catalog.lineage"));
  const el = (parent, tag, attrs, text) => { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; parent.append(e); return e; };
  const node = (x, y, label, link) => {
    const g = link ? el(svg, "a", { href: "#/dataset/" + label.replace(".", "/") }) : svg;
    el(g, "rect", { x, y, width: BW, height: RH - 14, rx: 6, fill: link ? "#f6f8fa" : "#0b5cad", stroke: "#0b5cad" });
    el(g, "text", { x: x + 10, y: y + 20, "font-size": 14, fill: link ? "#0b5cad" : "#ffffff" }, label);
  };
  const cy = (H - (RH - 14)) / 2;
  sources.forEach((s, i) => { const y = 5 + i * RH; node(0, y, s, true); el(svg, "line", { x1: BW, y1: y + 15, x2: (W - BW) / 2, y2: cy + 15, stroke: "#57606a", "marker-end": "" }); });
  users.forEach((u, i) => { const y = 5 + i * RH; node(W - BW, y, u, true); el(svg, "line", { x1: (W + BW) / 2, y1: cy + 15, x2: W - BW, y2: y + 15, stroke: "#57606a" }); });
  node((W - BW) / 2, cy, self, false);
  return svg;
}

async function datasetPage(dept, name) {
  try {
    const d = await api("GET", `/api/v1/datasets/${dept}/${name}`);
    const sources = d.derived_from ? (d.derived_from.sources || []) : [];
    const users = d.used_by || [];
    const lineage = [];
    if (sources.length || users.length) lineage.push(lineageGraph(sources, d.sql_name, users));
    if (d.derived_from) lineage.push(h("p", {}, t("catalog.from") + ": ", sources.join(", "), h("br"), h("code", { text: d.derived_from.sql || "" })));
    if (users.length) lineage.push(h("p", { text: t("catalog.usedby") + ": " + users.join(", ") }));
    let grants = h("p", { class: "muted", text: t("none") });
    try {
      const g = await api("GET", "/api/v1/grants?dataset=" + encodeURIComponent(d.sql_name));
      if (g.grants.length) grants = table(["id", "grantee", "state", "columns", "purpose", "expires_at"], g.grants.map((x) => [x.id, x.grantee, x.state, x.columns.join(", "), x.purpose, x.expires_at]));
    } catch (e) { grants = errorBox(e); }
    render(h("h1", { text: d.sql_name }), h("p", { text: d.description }),
      h("p", { class: "muted", text: `${d.rows} ${t("catalog.rows")}` }),
      h("h2", { text: t("catalog.columns") }),
      table(["name", t("catalog.type"), t("catalog.class")], d.columns.map((c) => [c.name, c.type || c.column_type, c.class])),
      h("h2", { text: t("catalog.lineage") }), lineage.length ? lineage : h("p", { class: "muted", text: t("none") }),
      h("h2", { text: t("catalog.versions") }),
      table(["version", "rows", "mode", "created_at"], d.versions.map((v) => [v.version, v.rows, v.mode, v.created_at])),
      h("h2", { text: t("nav.grants") }), grants);
  } catch (e) { render(errorBox(e)); }
}

const MASK = /\*{2,}/;

async function sqlPage() {
  const history = JSON.parse(localStorage.getItem("yunqi.sql") || "[]");
  const box = h("textarea", { id: "sql", "aria-label": "SQL", spellcheck: "false" });
  box.value = history[0] || "SELECT * FROM traffic.district_load_1m ORDER BY window_end DESC LIMIT 20";
  const out = h("div", { "aria-live": "polite" });
  const hist = h("ul", {});
  const showHistory = () => hist.replaceChildren(...history.slice(0, 10).map((q) => h("li", {}, h("a", { href: "#/sql", onclick: (ev) => { ev.preventDefault(); box.value = q; }, text: q }))));
  const run = async () => {
    const q = box.value.trim();
    out.replaceChildren(h("p", { class: "muted", text: "…" }));
    try {
      const v = await api("POST", "/api/v1/sql", { sql: q });
      const masked = v.rows.some((r) => r.some((c) => typeof c === "string" && MASK.test(c)));
      out.replaceChildren(h("p", { class: "muted", text: `${v.row_count} rows${v.truncated ? " (truncated)" : ""}` }),
        table(v.columns.map((c) => c.name), v.rows, (c) => {
          const isMasked = typeof c === "string" && MASK.test(c);
          return h("td", { class: isMasked ? "masked" : null, title: isMasked ? "masked" : null, text: c === null ? "NULL" : String(c) });
        }), masked ? h("p", { class: "muted", text: t("sql.masked") }) : null);
      const i = history.indexOf(q); if (i >= 0) history.splice(i, 1);
      history.unshift(q); localStorage.setItem("yunqi.sql", JSON.stringify(history.slice(0, 20))); showHistory();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  showHistory();
  render(h("h1", { text: t("sql.title") }), box, h("p", {}, h("button", { class: "primary", id: "run", onclick: run, text: t("sql.run") })), out,
    h("h2", { text: t("sql.history") }), hist);
}

async function grantsPage() {
  const inbox = h("div", {}), mine = h("div", {}), out = h("div", { "aria-live": "polite" });
  const load = async () => {
    try {
      const pending = await api("GET", "/api/v1/grants?state=pending");
      const mineDept = me.principal.department;
      const toMe = pending.grants.filter((g) => g.owner === mineDept);
      inbox.replaceChildren(...(toMe.length ? toMe.map((g) => {
        const reason = h("input", { "aria-label": t("grants.reason"), placeholder: t("grants.reason") });
        return h("div", { class: "card" }, h("strong", { text: `${g.grantee} → ${g.dataset}` }),
          h("div", { text: `${g.columns.join(", ")} · ${g.purpose} · ${g.expires_at}` }),
          h("button", { class: "primary", onclick: async () => { try { await api("POST", `/api/v1/grants/${g.id}/approve`); load(); } catch (e) { out.replaceChildren(errorBox(e)); } }, text: t("grants.approve") }), " ",
          reason, " ", h("button", { onclick: async () => { try { await api("POST", `/api/v1/grants/${g.id}/refuse`, { reason: reason.value }); load(); } catch (e) { out.replaceChildren(errorBox(e)); } }, text: t("grants.refuse") }));
      }) : [h("p", { class: "muted", text: t("none") })]));
      const all = await api("GET", "/api/v1/grants");
      const soon = (g) => g.state === "active" && (new Date(g.expires_at) - Date.now()) < 30 * 86400000;
      mine.replaceChildren(table(["id", "dataset", "grantee", "state", "purpose", "expires_at"],
        all.grants.map((g) => [g.id, g.dataset, g.grantee, g.state, g.purpose, (soon(g) ? "⚠ " + t("grants.expiring") + " " : "") + g.expires_at])));
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  const f = { dataset: h("input", { id: "g-dataset" }), columns: h("input", { id: "g-columns" }), purpose: h("input", { id: "g-purpose" }), until: h("input", { id: "g-until", type: "date" }) };
  const form = h("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const g = await api("POST", "/api/v1/grants", { dataset: f.dataset.value.trim(), columns: f.columns.value.split(",").map((s) => s.trim()).filter(Boolean), purpose: f.purpose.value, until: f.until.value });
      out.replaceChildren(h("p", { text: `${g.id}: ${g.state}` })); load();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  } },
  h("label", { for: "g-dataset", text: t("grants.dataset") }), f.dataset,
  h("label", { for: "g-columns", text: t("grants.columns") }), f.columns,
  h("label", { for: "g-purpose", text: t("grants.purpose") }), f.purpose,
  h("label", { for: "g-until", text: t("grants.until") }), f.until,
  h("p", {}, h("button", { class: "primary", type: "submit", text: t("grants.send") })));
  render(h("h1", { text: t("grants.title") }), out, h("h2", { text: t("grants.inbox") }), inbox,
    h("h2", { text: t("grants.request") }), form, h("h2", { text: t("grants.mine") }), mine);
  load();
}

// A moment in the city's time zone (北京时间), as people read it.
function cityTime(iso) {
  if (!iso) return "";
  const f = new Intl.DateTimeFormat(lang === "en" ? "en-GB" : "zh-CN", { timeZone: "Asia/Shanghai", year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hour12: false });
  return f.format(new Date(iso)) + (lang === "en" ? " (Beijing time)" : "（北京时间）");
}

// The side of a "中文 / English" label for the console's language.
function pick(label) {
  if (!label) return "";
  let m = label.split(" / ");
  if (m.length < 2) { const k = label.indexOf("）/ "); if (k >= 0) m = [label.slice(0, k + 1), label.slice(k + 3)]; }
  return m.length < 2 ? label : (lang === "en" ? m.slice(1).join(" / ") : m[0]).trim();
}

// A decision as the applicant reads it (the API's `readable`, in the console's language);
// officers and stewards can also open the expressions and raw data.
function decisionCard(d) {
  const r = d.readable || {};
  const kids = [h("h2", {}, t("services.decision") + " ", h("span", { class: "badge " + d.decision, id: "decision", text: r.decision || t("decision." + d.decision) })),
    h("p", { class: "muted", text: (r.service || d.service) + " · " + (r.decided_at || d.decided_at) + " · " + t("decision.number") + " " + d.id.split("/").pop() })];
  for (const x of r.reasons || d.reasons || []) kids.push(h("p", { class: "reason", text: "• " + x }));
  if (r.due) kids.push(h("p", { class: "muted", text: "⏱ " + r.due }));
  if (d.document) {
    const doc = r.document || {};
    kids.push(h("h3", { text: doc.title || t("services.document") }),
      h("div", { class: "row" }, h("img", { class: "qr", id: "qr", alt: t("services.qr"), src: "/api/v1/documents/qr?token=" + encodeURIComponent(d.document.token) }),
        h("div", { class: "grow" }, doc.code ? h("p", { text: doc.code.label + " " + doc.code.value }) : null,
          h("p", { class: "valid-window", text: t("services.valid") + " " + (doc.valid || "") }),
          h("a", { class: "button", href: "#/verify/" + encodeURIComponent(d.document.token), text: t("nav.verify") }))));
  }
  kids.push(h("h3", { text: t("services.rules") }),
    h("ul", { class: "checks", id: "rules" }, (r.rules || []).map((x) => h("li", { class: x.met === true ? "met" : (x.met === false ? "unmet" : "unknown") },
      h("span", { class: "mark", "aria-hidden": "true", text: x.met === true ? "✓" : (x.met === false ? "✗" : "?") }),
      h("span", {}, h("span", { text: x.label }), h("span", { class: "muted", text: " · " + x.result }), x.reason ? h("div", { class: "reason", text: x.reason }) : null)))));
  kids.push(h("h3", { text: t("services.inputs") }),
    h("dl", { class: "fields" }, (r.inputs || []).map((x) => [h("dt", { text: x.label }), h("dd", { text: x.value })])));
  kids.push(h("h3", { text: t("services.data") }), ...(r.data || []).map((x) => h("div", { class: "source" },
    h("div", { class: "source-title", text: x.label }),
    x.found ? h("dl", { class: "fields" }, x.fields.map((f) => [h("dt", { text: f.label }), h("dd", { class: f.masked ? "masked" : "", title: f.masked ? t("sql.maskedcell") : "", text: f.value })]))
      : h("p", { class: "muted", text: x.note || t("none") }))));
  if ((r.quotas || []).length) kids.push(h("h3", { text: t("services.quotas") }), h("ul", { class: "quotas" }, r.quotas.map((q) => h("li", { text: q.text }))));
  if (me && me.principal.role !== "citizen") {
    const ex = d.explanation || {};
    const data = Object.entries(ex.data || {}).map(([k, v]) => [k, v.found === false ? "—" : JSON.stringify(Object.fromEntries(Object.entries(v).filter(([y]) => y !== "source" && y !== "found"))), v.source ? v.source.datasets.join(", ") + " · " + (v.source.grants || []).join("; ") : ""]);
    kids.push(h("details", { class: "officer" }, h("summary", { text: t("services.expressions") }),
      h("div", { class: "scroll" }, table(["rule", "require", "met", "reason"], (ex.rules || []).map((x) => [x.rule, x.require, x.met === null ? "?" : (x.met ? "✓" : "✗"), x.reason || ""]))),
      h("div", { class: "scroll" }, table(["lookup", "values", "source"], data)),
      (ex.quotas || []).length ? h("div", { class: "scroll" }, table(["quota", "key", "period", "used", "limit"], ex.quotas.map((q) => [q.quota, q.key, q.period, q.used, q.limit]))) : null));
  }
  return h("div", { class: "card decision" }, kids);
}

function inputFor(i) {
  const id = "in-" + i.name;
  const k = i.kind || {};
  let e;
  if (k.type === "enum") e = h("select", { id }, k.values.map((v) => h("option", { value: v, text: pick((k.labels || {})[v]) || v })));
  else if (k.type === "date") {
    const d = new Date(Date.now() + 86400000 * Math.max(1, k.min_days || 0));
    e = h("input", { id, type: "date", value: d.toISOString().slice(0, 10) });
  } else if (k.type === "money") e = h("input", { id, type: "number", step: "0.01", min: "0" });
  else e = h("input", { id, type: "text" });
  return [h("label", { for: id, text: pick(i.label) || i.name }), e];
}

async function servicesPage(which) {
  try {
    const v = await api("GET", "/api/v1/services");
    const list = h("ul", {}, v.services.map((s) => h("li", {}, h("a", { href: "#/services/" + s.service, text: (lang === "en" && s.definition.title_en) || s.definition.title }), h("span", { class: "muted", text: " " + s.service }))));
    if (!which) { render(h("h1", { text: t("services.title") }), list); return; }
    const s = v.services.find((x) => x.service === which);
    if (!s) { render(errorBox(new Error(which))); return; }
    const [dept, name] = which.split(".");
    const def = s.definition;
    const fields = def.inputs.map(inputFor);
    const out = h("div", { "aria-live": "polite" });
    const mine = h("div", {});
    const loadMine = async () => {
      try {
        const m = await api("GET", `/api/v1/services/${dept}/${name}/applications`);
        mine.replaceChildren(h("ul", { class: "apps" }, m.applications.map((a) => h("li", {}, h("span", { class: "badge " + a.decision, text: (a.readable && a.readable.decision) || t("decision." + a.decision) }), " ",
          h("span", { text: (a.readable && a.readable.decided_at) || cityTime(a.decided_at) }), h("span", { class: "muted", text: " · " + t("decision.number") + " " + a.id.split("/").pop() })))));
      } catch (e) { mine.replaceChildren(errorBox(e)); }
    };
    const form = h("form", { id: "apply", onsubmit: async (ev) => {
      ev.preventDefault();
      const inputs = {};
      for (const i of def.inputs) { const val = document.getElementById("in-" + i.name).value; if (val !== "") inputs[i.name] = val; }
      try {
        const d = await api("POST", `/api/v1/services/${dept}/${name}/applications`, { inputs }, { "Idempotency-Key": crypto.randomUUID() });
        out.replaceChildren(decisionCard(d)); loadMine();
      } catch (e) { out.replaceChildren(errorBox(e)); }
    } }, fields, h("p", {}, h("button", { class: "primary", type: "submit", text: t("services.apply") })));
    const kids = [h("h1", { text: (lang === "en" && def.title_en) || def.title }), h("p", { class: "muted", text: def.description })];
    if (me.principal.role === "officer" || me.principal.role === "steward") {
      const q = h("div", {});
      const loadQueue = async () => {
        try {
          const r = await api("GET", `/api/v1/services/${dept}/${name}/reviews`);
          const act = (p, what, body) => async () => {
            try { await api("POST", `/api/v1/services/${dept}/${name}/applications/${p.id.split("/")[1]}/${what}`, body()); loadQueue(); }
            catch (e) { q.prepend(errorBox(e)); }
          };
          q.replaceChildren(...(r.pending.length ? r.pending.map((p) => {
            const reason = h("input", { "aria-label": t("grants.reason"), placeholder: t("grants.reason") });
            return h("div", { class: "card review" }, h("strong", { text: p.id }), " ",
              h("span", { class: p.overdue ? "badge refused" : "badge pending", text: (p.overdue ? "⚠ " : "⏱ ") + cityTime(p.due_at) }),
              h("div", { text: (p.reasons || []).join("; ") }),
              h("div", { class: "muted", text: JSON.stringify(p.explanation.inputs) + ((p.review && p.review.assignee) ? " · → " + p.review.assignee : "") }),
              h("button", { onclick: act(p, "assign", () => ({ assignee: me.principal.name })), text: t("review.mine") }), " ",
              h("button", { class: "primary", onclick: act(p, "approve", () => ({})), text: t("grants.approve") }), " ",
              reason, " ", h("button", { onclick: act(p, "refuse", () => ({ reason: reason.value })), text: t("grants.refuse") }));
          }) : [h("p", { class: "muted", text: t("none") })]));
        } catch (e) { q.replaceChildren(errorBox(e)); }
      };
      await loadQueue();
      kids.push(h("h2", { text: t("services.queue") }), q);
    }
    kids.push(form, out, h("h2", { text: t("services.mine") }), mine);
    render(...kids);
    loadMine();
  } catch (e) { render(errorBox(e)); }
}

async function verifyPage(tok) {
  const box = h("textarea", { id: "vtoken", "aria-label": t("verify.token") });
  if (tok) box.value = decodeURIComponent(tok);
  const out = h("div", { "aria-live": "polite" });
  const go = async () => {
    try {
      const r = await fetch("/api/v1/documents/verify?token=" + encodeURIComponent(box.value.trim()));
      const v = await r.json();
      const c = v.claims || {};
      out.replaceChildren(h("div", { class: "card" }, h("span", { class: "badge " + v.status, id: "vstatus", text: t("status." + v.status) }),
        v.reason ? h("p", { text: v.reason }) : null, c.title ? h("h2", { text: c.title }) : null,
        c.fields ? table(["", ""], Object.entries(c.fields)) : null,
        c.valid_from ? h("p", { class: "muted", text: `${c.valid_from} → ${c.valid_to}` }) : null));
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  render(h("h1", { text: t("verify.title") }), h("label", { for: "vtoken", text: t("verify.token") }), box,
    h("p", {}, h("button", { class: "primary", onclick: go, text: t("verify.go") })), out);
  if (tok) go();
}

// Charts: Apache ECharts, drawn as SVG (inspectable, sharp on a wall screen).
let charts = [];
function chart(el) {
  const c = echarts.init(el, null, { renderer: "svg" });
  charts.push(c);
  return c;
}
window.addEventListener("resize", () => charts.forEach((c) => c.resize()));

async function dashboardPage() {
  charts.forEach((c) => c.dispose());
  charts = [];
  const tiles = h("div", { class: "tiles" }), out = h("div", {});
  const dist = h("div", { id: "chart-districts", class: "chart" });
  const segs = h("div", { id: "chart-segments", class: "chart" });
  const zone = h("div", { id: "chart-zone", class: "chart small" });
  const q = async (sql) => (await api("POST", "/api/v1/sql", { sql })).rows;
  render(h("h1", { text: t("dash.title") }), out, tiles,
    h("h2", { text: t("dash.byDistrict") }), dist,
    h("div", { class: "row" }, h("div", { class: "grow" }, h("h2", { text: t("dash.segments") }), segs),
      h("div", { class: "grow" }, h("h2", { text: t("dash.zone") }), zone)));
  const cd = chart(dist), cs = chart(segs), cz = chart(zone);
  const hhmm = (ts) => String(ts).slice(11, 16);
  const refresh = async () => {
    try {
      const rows = await q("SELECT window_end, district, vehicles FROM traffic.district_load_1m WHERE window_end >= (SELECT max(window_end) FROM traffic.district_load_1m) - INTERVAL '30' MINUTE ORDER BY window_end");
      if (!rows.length) { out.replaceChildren(h("p", { class: "muted", text: "…" })); return; }
      const times = [...new Set(rows.map((r) => String(r[0])))];
      const end = times[times.length - 1];
      const byDistrict = new Map();
      for (const [w, d, n] of rows) {
        if (!byDistrict.has(d)) byDistrict.set(d, new Map());
        byDistrict.get(d).set(String(w), Number(n));
      }
      const latest = rows.filter((r) => String(r[0]) === end);
      const s = await q("SELECT segment, district, vehicles FROM traffic.segment_load_1m WHERE window_end = (SELECT max(window_end) FROM traffic.segment_load_1m) ORDER BY vehicles DESC LIMIT 10");
      const z = await q("SELECT window_end, vehicles FROM traffic.zone_load_1m WHERE window_end >= (SELECT max(window_end) FROM traffic.zone_load_1m) - INTERVAL '30' MINUTE ORDER BY window_end");
      const permit = await api("GET", "/api/v1/services/traffic/urgent-entry-permit");
      const total = latest.reduce((a, r) => a + Number(r[2]), 0);
      const zoneNow = z.length ? Number(z[z.length - 1][1]) : 0;
      tiles.replaceChildren(
        h("div", { class: "tile" }, h("div", { class: "muted", text: t("dash.window") }), h("div", { class: "n", id: "window", text: hhmm(end) })),
        h("div", { class: "tile" }, h("div", { class: "muted", text: t("dash.byDistrict") }), h("div", { class: "n", id: "total", text: String(total) })),
        h("div", { class: "tile" }, h("div", { class: "muted", text: t("dash.zone") }), h("div", { class: "n", id: "zone", text: `${zoneNow} / 5000` })),
        h("div", { class: "tile" }, h("div", { class: "muted", text: t("dash.permits") }), h("div", { class: "n", id: "permits", text: permit.stats ? String(permit.stats.approved_today) : "—" })));
      cd.setOption({
        animation: false, tooltip: { trigger: "axis" }, legend: { type: "scroll", top: 0 },
        grid: { left: 50, right: 20, top: 40, bottom: 30 },
        xAxis: { type: "category", data: times.map(hhmm) }, yAxis: { type: "value", name: "veh/min" },
        series: [...byDistrict.entries()].map(([d, m]) => ({ name: d, type: "line", showSymbol: false, data: times.map((w) => m.get(w) ?? null) })),
      }, true);
      cs.setOption({
        animation: false, tooltip: {}, grid: { left: 120, right: 30, top: 10, bottom: 20 },
        xAxis: { type: "value" }, yAxis: { type: "category", inverse: true, data: s.map((r) => `#${r[0]} ${r[1]}`) },
        series: [{ type: "bar", data: s.map((r) => Number(r[2])), itemStyle: { color: "#0b5cad" } }],
      }, true);
      cz.setOption({
        animation: false, tooltip: { trigger: "axis" }, grid: { left: 50, right: 30, top: 20, bottom: 30 },
        xAxis: { type: "category", data: z.map((r) => hhmm(r[0])) }, yAxis: { type: "value", max: (v) => Math.max(v.max, 5500) },
        series: [{ type: "line", data: z.map((r) => Number(r[1])), areaStyle: {},
          markLine: { symbol: "none", lineStyle: { color: "#b3261e", type: "dashed" }, data: [{ yAxis: 5000, name: "threshold" }] } }],
      }, true);
      out.replaceChildren();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  await refresh();
  timer = setInterval(refresh, 5000);
}

async function auditPage() {
  const out = h("div", {});
  if (me.principal.role === "citizen") {
    try {
      const v = await api("GET", "/api/v1/me/accesses");
      out.replaceChildren(v.accesses.length ? table(["time", "principal", "object", "purpose"], v.accesses.map((a) => [a.time, a.principal, a.object, a.purpose])) : h("p", { class: "muted", text: t("none") }));
    } catch (e) { out.replaceChildren(errorBox(e)); }
    render(h("h1", { text: t("audit.mine") }), out);
    return;
  }
  const input = h("input", { id: "action", placeholder: t("audit.search"), "aria-label": t("audit.search") });
  const search = async () => {
    try {
      const v = await api("GET", "/api/v1/audit?desc=true&limit=100" + (input.value ? "&action=" + encodeURIComponent(input.value) : ""));
      out.replaceChildren(table(["seq", "time", "principal", "action", "object", "outcome", "detail"], (v.records || []).map((r) => [r.seq, r.time, r.principal, r.action, r.object, r.outcome, r.detail])));
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  render(h("h1", { text: t("audit.title") }), h("form", { onsubmit: (ev) => { ev.preventDefault(); search(); } }, input, " ", h("button", { type: "submit", text: t("audit.go") })), out);
  search();
}

// ---- shell ----

// Each login and logout starts a new epoch: an answer to an older whoami (a logout clicked while the
// page was still loading, a second token typed quickly) must not log the page back in or out.
let epoch = 0;

async function loadMe(e) {
  const v = await api("GET", "/api/v1/whoami");
  if (e !== epoch) return false;
  me = v;
  const p = me.principal;
  document.getElementById("who").textContent = `${p.display_name || p.name} · ${p.role}${p.department ? " · " + p.department : ""}`;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  return true;
}

async function route() {
  if (timer) { clearInterval(timer); timer = null; }
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  document.querySelectorAll("#nav a").forEach((a) => a.toggleAttribute("aria-current", a.getAttribute("href") === "#/" + parts[0]));
  if (parts[0] === "verify") { verifyPage(parts[1]); return; }
  if (!token()) { loginPage(); return; }
  if (!me) {
    const e = epoch;
    try { if (!(await loadMe(e))) return; }
    catch { if (e === epoch) { sessionStorage.removeItem("yunqi.token"); loginPage(); } return; }
  }
  switch (parts[0]) {
    case "catalog": return catalogPage();
    case "dataset": return datasetPage(parts[1], parts[2]);
    case "sql": return sqlPage();
    case "grants": return grantsPage();
    case "services": return servicesPage(parts[1]);
    case "dashboard": return dashboardPage();
    case "audit": return auditPage();
    default: location.hash = me.principal.role === "citizen" ? "#/services" : "#/catalog";
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("lang").addEventListener("click", () => {
    lang = lang === "zh" ? "en" : "zh"; localStorage.setItem("yunqi.lang", lang); applyI18n(); route();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem("yunqi.token"); me = null; epoch++;
    document.getElementById("nav").hidden = true; document.getElementById("logout").hidden = true;
    document.getElementById("who").textContent = ""; location.hash = "#/"; route();
  });
  applyI18n();
  route();
});
