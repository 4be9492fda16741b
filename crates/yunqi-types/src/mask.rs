//! Masks for personal data, applied whenever a viewer has no grant to see the value itself.

/// A national ID number with the birth date and sequence hidden: `330106********1234`.
pub fn national_id(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 10 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 10))
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
}
