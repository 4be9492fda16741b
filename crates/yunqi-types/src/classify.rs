//! Column classes and the detectors that suggest them at import.
//!
//! A column is `public`, `internal`, `personal` or `sensitive`; personal and sensitive values are
//! masked for grantees unless a grant allows them. At import each column's values are sampled
//! and a class is suggested from what they are: resident ID numbers (GB 11643 check character),
//! mobile numbers, vehicle plates, unified social credit codes (GB 32100 check character), bank
//! card numbers (Luhn), e-mail addresses, and person names where the header says so. Anything
//! else is `internal`: secure by default, a steward may declare it public.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::identity::NationalId;

/// How a column may be shown.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ColumnClass {
    /// Anyone with access to the dataset sees it.
    Public,
    /// The department and its grantees see it.
    Internal,
    /// Personal data: masked for grantees unless the grant allows it.
    Personal,
    /// Sensitive personal data: masked for grantees unless the grant allows it.
    Sensitive,
}

impl ColumnClass {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnClass::Public => "public",
            ColumnClass::Internal => "internal",
            ColumnClass::Personal => "personal",
            ColumnClass::Sensitive => "sensitive",
        }
    }
    /// Whether grantees see it masked by default.
    pub fn masked_by_default(self) -> bool {
        matches!(self, ColumnClass::Personal | ColumnClass::Sensitive)
    }
}

impl fmt::Display for ColumnClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ColumnClass {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "public" => Ok(ColumnClass::Public),
            "internal" => Ok(ColumnClass::Internal),
            "personal" => Ok(ColumnClass::Personal),
            "sensitive" => Ok(ColumnClass::Sensitive),
            other => Err(Error::invalid(format!("invalid column class \"{other}\""))
                .hint("use public, internal, personal or sensitive")),
        }
    }
}

/// What a detector recognised in a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detected {
    /// Resident identity card number.
    IdNumber,
    /// Mainland mobile number.
    Mobile,
    /// Vehicle plate.
    Plate,
    /// Unified social credit code of an organisation.
    CreditCode,
    /// Bank card number.
    BankCard,
    /// E-mail address.
    Email,
    /// A person's name (by header).
    PersonName,
}

impl Detected {
    /// The class suggested for it.
    pub fn class(self) -> ColumnClass {
        match self {
            Detected::IdNumber | Detected::BankCard => ColumnClass::Sensitive,
            Detected::Mobile | Detected::Plate | Detected::Email | Detected::PersonName => {
                ColumnClass::Personal
            }
            // Organisations' codes are published in the national credit registry.
            Detected::CreditCode => ColumnClass::Public,
        }
    }
}

/// Provinces' one-character abbreviations, the first character of a plate.
const PROVINCES: &str = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼";

/// Whether `s` is a mainland mobile number (11 digits from 13x–19x, optionally `+86`).
pub fn is_mobile(s: &str) -> bool {
    let s = s.strip_prefix("+86").unwrap_or(s).trim();
    let b = s.as_bytes();
    b.len() == 11
        && b[0] == b'1'
        && (b'3'..=b'9').contains(&b[1])
        && b.iter().all(u8::is_ascii_digit)
}

/// Whether `s` is a vehicle plate: a province, a letter, then 5 (ordinary) or 6 (new energy)
/// letters or digits (no I or O).
pub fn is_plate(s: &str) -> bool {
    let mut chars = s.chars();
    let (Some(p), Some(letter)) = (chars.next(), chars.next()) else {
        return false;
    };
    let rest: Vec<char> = chars.collect();
    let ok = |c: &char| (c.is_ascii_uppercase() && *c != 'I' && *c != 'O') || c.is_ascii_digit();
    PROVINCES.contains(p)
        && letter.is_ascii_uppercase()
        && matches!(rest.len(), 5 | 6)
        && rest.iter().all(ok)
}

/// Whether `s` is a unified social credit code with a correct check character (GB 32100).
pub fn is_credit_code(s: &str) -> bool {
    const CHARSET: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const WEIGHTS: [u32; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let b = s.as_bytes();
    if b.len() != 18 {
        return false;
    }
    let mut values = [0u32; 18];
    for (i, c) in b.iter().enumerate() {
        match CHARSET.iter().position(|x| x == c) {
            Some(v) => values[i] = v as u32,
            None => return false,
        }
    }
    let sum: u32 = values[..17].iter().zip(WEIGHTS).map(|(v, w)| v * w).sum();
    let check = (31 - sum % 31) % 31;
    values[17] == check
}

/// The check character of the first 17 characters of a credit code (for generating data).
pub fn credit_code_check(first17: &str) -> Option<char> {
    const CHARSET: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const WEIGHTS: [u32; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let b = first17.as_bytes();
    if b.len() != 17 {
        return None;
    }
    let mut sum = 0;
    for (c, w) in b.iter().zip(WEIGHTS) {
        sum += CHARSET.iter().position(|x| x == c)? as u32 * w;
    }
    Some(CHARSET[((31 - sum % 31) % 31) as usize] as char)
}

/// Whether `s` is a bank card number: 16 to 19 digits passing the Luhn check.
pub fn is_bank_card(s: &str) -> bool {
    let b = s.as_bytes();
    if !(16..=19).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `s` looks like an e-mail address.
pub fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !s.contains(char::is_whitespace)
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
}

/// Whether a header names a person's name.
pub fn is_name_header(header: &str) -> bool {
    let h = header.trim().to_lowercase();
    const EXACT: &[&str] = &[
        "name",
        "full_name",
        "姓名",
        "名字",
        "联系人",
        "户主",
        "车主",
        "法定代表人",
        "申请人",
        "患者姓名",
    ];
    const PEOPLE: &[&str] = &[
        "owner",
        "driver",
        "applicant",
        "contact",
        "person",
        "patient",
        "holder",
        "citizen",
        "resident",
        "legal_rep",
    ];
    EXACT.contains(&h.as_str())
        || h.ends_with("姓名")
        || h.strip_suffix("_name").is_some_and(|p| PEOPLE.contains(&p))
}

/// What a single value is, by the detectors that look at values.
pub fn detect_value(value: &str) -> Option<Detected> {
    let v = value.trim();
    if v.len() == 18 && NationalId::parse(v).is_ok() {
        return Some(Detected::IdNumber);
    }
    if is_credit_code(v) {
        return Some(Detected::CreditCode);
    }
    if is_mobile(v) {
        return Some(Detected::Mobile);
    }
    if is_bank_card(v) {
        return Some(Detected::BankCard);
    }
    if is_plate(v) {
        return Some(Detected::Plate);
    }
    if is_email(v) {
        return Some(Detected::Email);
    }
    None
}

/// A suggested class for a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Suggestion {
    /// The class.
    pub class: ColumnClass,
    /// What was recognised, if anything.
    pub detected: Option<Detected>,
}

/// Suggests a class from the header and a sample of non-empty values: a detector wins when it
/// matches at least 80% of the sample.
pub fn suggest<'a>(header: &str, sample: impl IntoIterator<Item = &'a str>) -> Suggestion {
    let mut counts: [(Detected, usize); 6] = [
        (Detected::IdNumber, 0),
        (Detected::CreditCode, 0),
        (Detected::Mobile, 0),
        (Detected::BankCard, 0),
        (Detected::Plate, 0),
        (Detected::Email, 0),
    ];
    let mut total = 0usize;
    for v in sample {
        if v.trim().is_empty() {
            continue;
        }
        total += 1;
        if let Some(d) = detect_value(v)
            && let Some(c) = counts.iter_mut().find(|(k, _)| *k == d)
        {
            c.1 += 1;
        }
    }
    if total > 0
        && let Some((d, n)) = counts.iter().max_by_key(|(_, n)| *n)
        && *n * 5 >= total * 4
    {
        return Suggestion {
            class: d.class(),
            detected: Some(*d),
        };
    }
    if is_name_header(header) {
        return Suggestion {
            class: ColumnClass::Personal,
            detected: Some(Detected::PersonName),
        };
    }
    Suggestion {
        class: ColumnClass::Internal,
        detected: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detectors_accept_real_shapes_and_refuse_near_misses() {
        assert!(is_mobile("13812345678") && is_mobile("+8619912345678"));
        assert!(!is_mobile("12812345678") && !is_mobile("1381234567"));
        assert!(is_plate("浙A12345") && is_plate("浙AD12345") && is_plate("京B2C3D4"));
        assert!(!is_plate("XA12345") && !is_plate("浙A1234") && !is_plate("浙AI2345"));
        let code = format!(
            "91330106MA27XK2X7{}",
            credit_code_check("91330106MA27XK2X7").unwrap()
        );
        assert!(is_credit_code(&code));
        let mut wrong = code.clone().into_bytes();
        wrong[17] = if wrong[17] == b'0' { b'1' } else { b'0' };
        assert!(!is_credit_code(std::str::from_utf8(&wrong).unwrap()));
        assert!(is_bank_card("4111111111111111"));
        assert!(!is_bank_card("4111111111111112"));
        assert!(is_email("wang@hangzhou.gov.cn") && !is_email("wang@") && !is_email("a b@c.d"));
        assert!(is_name_header("姓名") && is_name_header("owner_name") && is_name_header("Name"));
        assert!(!is_name_header("dataset_name") && !is_name_header("street"));
    }

    #[test]
    fn suggestions_need_a_clear_majority() {
        let ids = ["11010519491231002X", "11010519491231002X", ""];
        assert_eq!(suggest("id", ids).class, ColumnClass::Sensitive);
        let mixed = ["13812345678", "hello", "world", "13812345678"];
        assert_eq!(
            suggest("contact", mixed),
            Suggestion {
                class: ColumnClass::Internal,
                detected: None
            }
        );
        assert_eq!(
            suggest("车主", ["张三", "李四"]).detected,
            Some(Detected::PersonName)
        );
        assert_eq!(
            suggest("plate", ["浙A12345", "沪B54321"]).class,
            ColumnClass::Personal
        );
        assert_eq!(
            suggest("amount", ["12.5", "3"]).class,
            ColumnClass::Internal
        );
    }
}
