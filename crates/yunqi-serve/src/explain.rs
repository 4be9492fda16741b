//! Decisions as an applicant reads them: every rule as the sentence its definition gives, the
//! data used as labelled fields (masked where the grant masks them), inputs with their
//! labels and enum values named, quotas in words, and every time in the city's time zone
//! (北京时间), in Chinese or English. Officers and stewards also get the expressions, in the
//! decision's `explanation`; this is what a citizen sees on a phone.
//!
//! Labels are written `"中文 / English"` in definitions (rules have `label` and `label_en`);
//! [`pick`] takes the side for the language.

use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{Map, Value as Json, json};

use crate::decider::{Decision, Verdict};
use crate::definition::{InputType, Service};

/// The language of a readable explanation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// 中文 (the default).
    Zh,
    /// English.
    En,
}

impl Lang {
    /// The language an `Accept-Language` header asks for: the first of `zh`/`en` by quality,
    /// Chinese when neither is named.
    pub fn from_accept_language(header: Option<&str>) -> Lang {
        let Some(h) = header else {
            return Lang::Zh;
        };
        let mut best: Option<(f32, usize, Lang)> = None;
        for (i, part) in h.split(',').enumerate() {
            let mut pieces = part.trim().split(';');
            let tag = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = pieces
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let lang = match tag.split('-').next() {
                Some("zh") => Lang::Zh,
                Some("en") => Lang::En,
                _ => continue,
            };
            if q <= 0.0 {
                continue;
            }
            // Highest quality first; among equals, the one written first.
            if best.is_none_or(|(bq, bi, _)| q > bq || (q == bq && i < bi)) {
                best = Some((q, i, lang));
            }
        }
        best.map_or(Lang::Zh, |(_, _, l)| l)
    }

    /// `zh` or `en`.
    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        }
    }
}

/// The side of a `"中文 / English"` label for `lang` (the whole label when it has one side).
pub fn pick(label: &str, lang: Lang) -> &str {
    // `中文 / English`, or `中文（注）/ English` where the Chinese ends in a full-width bracket.
    let halves = match label.split_once(" / ") {
        Some(h) => Some(h),
        None => label.find("）/ ").map(|i| {
            let cut = i + "）".len();
            (&label[..cut], &label[cut + "/ ".len()..])
        }),
    };
    match halves {
        Some((zh, en)) => match lang {
            Lang::Zh => zh.trim(),
            Lang::En => en.trim(),
        },
        None => label.trim(),
    }
}

/// The city's time zone: UTC+8 (China has no daylight saving time).
fn city_time(t: DateTime<Utc>) -> DateTime<FixedOffset> {
    t.with_timezone(&FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset"))
}

/// A moment in the city's time, as a citizen reads it: `2026年12月7日 00:00（北京时间）` or
/// `7 Dec 2026, 00:00 (Beijing time)`.
pub fn local_time(t: DateTime<Utc>, lang: Lang) -> String {
    let l = city_time(t);
    match lang {
        Lang::Zh => l.format("%Y年%-m月%-d日 %H:%M（北京时间）").to_string(),
        Lang::En => l.format("%-d %b %Y, %H:%M (Beijing time)").to_string(),
    }
}

/// A date `YYYY-MM-DD` as a citizen reads it.
fn local_date(s: &str, lang: Lang) -> String {
    match chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(d) => match lang {
            Lang::Zh => d.format("%Y年%-m月%-d日").to_string(),
            Lang::En => d.format("%-d %b %Y").to_string(),
        },
        Err(_) => s.to_string(),
    }
}

fn words(zh: &str, en: &str, lang: Lang) -> String {
    match lang {
        Lang::Zh => zh.to_string(),
        Lang::En => en.to_string(),
    }
}

fn text_of(v: &Json, lang: Lang) -> String {
    match v {
        Json::Null => words("（无）", "(none)", lang),
        Json::Bool(b) => words(
            if *b { "是" } else { "否" },
            if *b { "yes" } else { "no" },
            lang,
        ),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether a value is shown masked (yunqi's masks replace characters by runs of `*`).
fn looks_masked(v: &Json) -> bool {
    v.as_str().is_some_and(|s| s.contains("**"))
}

/// The readable explanation of `d`, a decision of `service`. `class_of(lookup, column)` gives a
/// looked-up column's class (`public`, `internal`, `personal`, `sensitive`) where known.
pub fn readable(
    service: &Service,
    d: &Decision,
    lang: Lang,
    class_of: &dyn Fn(&str, &str) -> Option<String>,
) -> Json {
    let verdict = match d.decision {
        Verdict::Approved => words("已通过", "Approved", lang),
        Verdict::Refused => words("未通过", "Refused", lang),
        Verdict::Pending => words("审核中", "Waiting for an officer", lang),
    };
    let title = match lang {
        Lang::En => service
            .title_en
            .clone()
            .unwrap_or_else(|| service.title.clone()),
        Lang::Zh => service.title.clone(),
    };

    let mut inputs = Vec::new();
    for i in &service.inputs {
        let Some(v) = d.inputs.get(&i.name) else {
            continue;
        };
        let value = match (&i.kind, v) {
            (InputType::Enum { labels, .. }, Json::String(s)) => labels
                .get(s)
                .map_or_else(|| s.clone(), |l| pick(l, lang).to_string()),
            (InputType::Date { .. }, Json::String(s)) => local_date(s, lang),
            (InputType::Money { .. }, v) => match v.as_f64() {
                Some(y) => words(&format!("{y:.2} 元"), &format!("¥{y:.2}"), lang),
                None => text_of(v, lang),
            },
            (_, v) => text_of(v, lang),
        };
        inputs.push(json!({
            "name": i.name,
            "label": i.label.as_deref().map_or(i.name.as_str(), |l| pick(l, lang)),
            "value": value,
        }));
    }

    let mut rules = Vec::new();
    for r in &d.rules {
        let def = service.rules.iter().find(|x| x.name == r.rule);
        let label = match (def, r.rule.as_str()) {
            (Some(x), _) => match lang {
                Lang::Zh => x.label.clone(),
                Lang::En => x.label_en.clone(),
            },
            (None, "consent") => words(
                "本人已同意办理该事项",
                "The person concerned has consented",
                lang,
            ),
            (None, other) => other.to_string(),
        };
        let result = match r.met {
            Some(true) => words("符合", "met", lang),
            Some(false) => words("不符合", "not met", lang),
            None => words("无法判断（缺少数据）", "unknown (data missing)", lang),
        };
        let mut o = json!({"label": label, "met": r.met, "result": result});
        if r.met != Some(true) {
            let reason = match (def, lang) {
                (Some(x), Lang::En) => x.reason_en.clone().unwrap_or_else(|| x.reason.clone()),
                (Some(x), Lang::Zh) => x.reason.clone(),
                (None, _) => r
                    .reason
                    .as_deref()
                    .map(|s| pick(s, lang).to_string())
                    .unwrap_or_default(),
            };
            o["reason"] = json!(reason);
        }
        rules.push(o);
    }

    let mut data = Vec::new();
    for l in &service.lookups {
        let Some(Json::Object(row)) = d.data.get(&l.name) else {
            continue;
        };
        let found = row.get("found").and_then(Json::as_bool).unwrap_or(false);
        let mut fields = Vec::new();
        for (c, v) in row {
            if c == "found" || c == "source" {
                continue;
            }
            let mut f = json!({
                "label": l.fields.get(c).map_or(c.as_str(), |x| pick(x, lang)),
                "value": text_of(v, lang),
            });
            if let Some(class) = class_of(&l.name, c) {
                f["class"] = json!(class);
            }
            if looks_masked(v) {
                f["masked"] = json!(true);
            }
            fields.push(f);
        }
        let mut item = json!({
            "label": l.label.as_deref().map_or(l.name.as_str(), |x| pick(x, lang)),
            "found": found,
            "fields": fields,
        });
        if !found {
            item["note"] = json!(words("未查到记录", "no record found", lang));
        }
        data.push(item);
    }

    let mut quotas = Vec::new();
    for q in &d.quotas {
        let def = service.quotas.iter().find(|x| x.name == q.quota);
        let (zh, en) = match def.map(|x| x.period) {
            Some(crate::calendar::Period::Year) => {
                (format!("{}年度", q.period), format!("in {}", q.period))
            }
            Some(crate::calendar::Period::Month) => {
                let (y, m) = q.period.split_once('-').unwrap_or((&q.period, ""));
                let en = chrono::NaiveDate::parse_from_str(&format!("{}-01", q.period), "%Y-%m-%d")
                    .map_or_else(|_| q.period.clone(), |d| d.format("%B %Y").to_string());
                (
                    format!("{y}年{}月", m.trim_start_matches('0')),
                    format!("in {en}"),
                )
            }
            Some(crate::calendar::Period::Day) => (
                local_date(&q.period, Lang::Zh),
                format!("on {}", local_date(&q.period, Lang::En)),
            ),
            _ => ("累计".to_string(), "in total".to_string()),
        };
        quotas.push(json!({
            "text": words(
                &format!("{zh}已用 {} 次，上限 {} 次", q.used, q.limit),
                &format!("{} of {} used {en}", q.used, q.limit),
                lang,
            ),
            "used": q.used,
            "limit": q.limit,
        }));
    }

    let reasons: Vec<String> = d
        .reasons
        .iter()
        .map(|r| match service.rules.iter().find(|x| &x.reason == r) {
            Some(x) if lang == Lang::En => x.reason_en.clone().unwrap_or_else(|| r.clone()),
            Some(_) => r.clone(),
            None => pick(r, lang).to_string(),
        })
        .collect();

    let mut out = json!({
        "language": lang.code(),
        "service": title,
        "decision": verdict,
        "decided_at": local_time(d.decided_at, lang),
        "reasons": reasons,
        "inputs": inputs,
        "rules": rules,
        "data": data,
        "quotas": quotas,
    });
    if let Some(due) = d.due_at {
        out["due"] = json!(words(
            &format!("请于 {} 前办结", local_time(due, Lang::Zh)),
            &format!("an officer decides by {}", local_time(due, Lang::En)),
            lang,
        ));
    }
    if let Some(doc) = &d.document {
        let mut m = Map::new();
        if let Some(t) = service.document.as_ref().map(|x| x.title.clone()) {
            m.insert("title".into(), json!(t));
        }
        match (doc.valid_from, doc.valid_to) {
            (Some(a), Some(b)) => {
                m.insert(
                    "valid".into(),
                    json!(words(
                        &format!("{} 至 {}", local_time(a, Lang::Zh), local_time(b, Lang::Zh)),
                        &format!(
                            "from {} to {}",
                            local_time(a, Lang::En),
                            local_time(b, Lang::En)
                        ),
                        lang,
                    )),
                );
            }
            _ => {
                m.insert(
                    "valid".into(),
                    json!(words("长期有效", "no end date", lang)),
                );
            }
        }
        if let Some(c) = &doc.code {
            m.insert(
                "code".into(),
                json!({"label": words("统一社会信用代码", "Unified social credit code", lang), "value": c}),
            );
        }
        out["document"] = Json::Object(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_are_picked_by_quality() {
        for (h, want) in [
            (None, Lang::Zh),
            (Some("en-US,en;q=0.9"), Lang::En),
            (Some("zh-CN,zh;q=0.9,en;q=0.8"), Lang::Zh),
            (Some("fr-FR, en;q=0.5, zh;q=0.4"), Lang::En),
            (Some("en;q=0.2, zh-TW;q=0.8"), Lang::Zh),
            (Some("de"), Lang::Zh),
            (Some("en;q=0"), Lang::Zh),
        ] {
            assert_eq!(Lang::from_accept_language(h), want, "{h:?}");
        }
    }

    #[test]
    fn times_are_the_citys() {
        let t: DateTime<Utc> = "2026-12-06T16:00:00Z".parse().unwrap();
        assert_eq!(local_time(t, Lang::Zh), "2026年12月7日 00:00（北京时间）");
        assert_eq!(local_time(t, Lang::En), "7 Dec 2026, 00:00 (Beijing time)");
        assert_eq!(pick("车牌号 / Plate", Lang::En), "Plate");
        assert_eq!(pick("车牌号 / Plate", Lang::Zh), "车牌号");
        assert_eq!(pick("车牌号", Lang::En), "车牌号");
        assert_eq!(pick("费用（元）/ Amount (yuan)", Lang::Zh), "费用（元）");
        assert_eq!(pick("费用（元）/ Amount (yuan)", Lang::En), "Amount (yuan)");
    }
}
