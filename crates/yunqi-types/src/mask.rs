//! Masks for personal data, applied whenever a viewer has no grant to see the value itself.

/// A national ID number with the birth date and sequence hidden: `330106********1234`.
pub fn national_id(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    // Too short to keep 6 + 4 characters and still hide something: hide it all.
    if chars.len() <= 10 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 10))
}

/// Keeps `head` characters and `tail` characters, stars in between.
fn keep(value: &str, head: usize, tail: usize) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= head + tail {
        return "*".repeat(chars.len());
    }
    let mut out: String = chars[..head].iter().collect();
    out.push_str(&"*".repeat(chars.len() - head - tail));
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// A mobile number with the middle four digits hidden: `138****5678`.
pub fn mobile(value: &str) -> String {
    keep(value, 3, 4)
}

/// A plate with the middle hidden: `浙A***45`.
pub fn plate(value: &str) -> String {
    keep(value, 2, 2)
}

/// A bank card with all but the first six and last four digits hidden.
pub fn bank_card(value: &str) -> String {
    keep(value, 6, 4)
}

/// An e-mail address with the local part hidden but its first character: `w***@example.com`.
pub fn email(value: &str) -> String {
    match value.split_once('@') {
        Some((local, domain)) => format!("{}***@{domain}", local.chars().next().unwrap_or('*')),
        None => "***".into(),
    }
}

/// A person's name with all but the family name hidden: `张*`, `欧阳**`.
pub fn person_name(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    match chars.len() {
        0 => String::new(),
        1 => "*".into(),
        2 | 3 => format!("{}{}", chars[0], "*".repeat(chars.len() - 1)),
        n => format!("{}{}{}", chars[0], chars[1], "*".repeat(n - 2)),
    }
}

/// Any other value: fully hidden, keeping only its length class.
pub fn other(value: &str) -> String {
    "*".repeat(value.chars().count().clamp(1, 8))
}

/// Writes `value` with its characters from `head` to `len - tail` replaced by `*` into `out`
/// (all stars when it is too short), without allocating.
fn keep_into(value: &str, head: usize, tail: usize, out: &mut String) {
    let len = value.chars().count();
    if len <= head + tail {
        out.extend(std::iter::repeat_n('*', len));
        return;
    }
    let start = value
        .char_indices()
        .nth(head)
        .map_or(value.len(), |(i, _)| i);
    let end = value
        .char_indices()
        .nth(len - tail)
        .map_or(value.len(), |(i, _)| i);
    out.push_str(&value[..start]);
    out.extend(std::iter::repeat_n('*', len - head - tail));
    out.push_str(&value[end..]);
}

/// Writes the mask of `value` of a detected kind into `out` (cleared first): the same result as
/// [`by_kind`], for masking columns of millions of values without an allocation each.
pub fn by_kind_into(kind: Option<crate::Detected>, value: &str, out: &mut String) {
    use crate::Detected as D;
    out.clear();
    match kind {
        Some(D::IdNumber) => {
            keep_into(value, 6, 4, out);
        }
        Some(D::Mobile) => keep_into(value, 3, 4, out),
        Some(D::Plate) => keep_into(value, 2, 2, out),
        Some(D::BankCard) => keep_into(value, 6, 4, out),
        Some(D::Email) => match value.split_once('@') {
            Some((local, domain)) => {
                out.push(local.chars().next().unwrap_or('*'));
                out.push_str("***@");
                out.push_str(domain);
            }
            None => out.push_str("***"),
        },
        Some(D::PersonName) => {
            let n = value.chars().count();
            let keep = match n {
                0 => 0,
                1 => 0,
                2 | 3 => 1,
                _ => 2,
            };
            let cut = value
                .char_indices()
                .nth(keep)
                .map_or(value.len(), |(i, _)| i);
            out.push_str(&value[..cut]);
            out.extend(std::iter::repeat_n('*', n - keep));
        }
        Some(D::CreditCode) | None => {
            out.extend(std::iter::repeat_n('*', value.chars().count().clamp(1, 8)));
        }
    }
}

/// The mask for a value of a detected kind.
pub fn by_kind(kind: Option<crate::Detected>, value: &str) -> String {
    use crate::Detected as D;
    match kind {
        Some(D::IdNumber) => national_id(value),
        Some(D::Mobile) => mobile(value),
        Some(D::Plate) => plate(value),
        Some(D::BankCard) => bank_card(value),
        Some(D::Email) => email(value),
        Some(D::PersonName) => person_name(value),
        Some(D::CreditCode) | None => other(value),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn national_id_keeps_region_and_last_four() {
        assert_eq!(
            super::national_id("11010519491231002X"),
            "110105********002X"
        );
        assert_eq!(super::national_id("123"), "***");
    }

    #[test]
    fn the_allocation_free_masks_equal_the_others() {
        use crate::Detected as D;
        let kinds = [
            None,
            Some(D::IdNumber),
            Some(D::Mobile),
            Some(D::Plate),
            Some(D::BankCard),
            Some(D::Email),
            Some(D::PersonName),
            Some(D::CreditCode),
        ];
        let values = [
            "",
            "a",
            "张",
            "张三",
            "欧阳娜娜",
            "浙A12345",
            "13812345678",
            "11010519491231002X",
            "6222021234567890123",
            "wang@hz.gov.cn",
            "no-at-sign",
            "91330106MA2B3C4D5E",
            "123",
        ];
        let mut out = String::new();
        for k in kinds {
            for v in values {
                super::by_kind_into(k, v, &mut out);
                assert_eq!(out, super::by_kind(k, v), "{k:?} {v:?}");
            }
        }
    }

    #[test]
    fn masks_of_each_kind() {
        assert_eq!(super::mobile("13812345678"), "138****5678");
        assert_eq!(super::plate("浙A12345"), "浙A***45");
        assert_eq!(
            super::bank_card("6222021234567890123"),
            "622202*********0123"
        );
        assert_eq!(super::email("wang@hz.gov.cn"), "w***@hz.gov.cn");
        assert_eq!(super::person_name("张三"), "张*");
        assert_eq!(super::person_name("欧阳娜娜"), "欧阳**");
    }
}
