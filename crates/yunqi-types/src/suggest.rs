//! "Did you mean …" suggestions for names, by edit distance.

/// Levenshtein distance between two strings, by characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b_chars: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b_chars.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous_diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b_chars.iter().enumerate() {
            let substitution = previous_diagonal + usize::from(ca != *cb);
            previous_diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b_chars.len()]
}

/// The closest candidate within a distance of a third of the name's length (at least 1, at
/// most 3), if any.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let budget = (name.chars().count() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= budget)
        .min()
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("traffic", "traffic"), 0);
        assert_eq!(edit_distance("trafic", "traffic"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("交通", "交警"), 1);
    }

    #[test]
    fn suggestion() {
        let names = ["traffic", "transport", "health"];
        assert_eq!(did_you_mean("trafic", names), Some("traffic".into()));
        assert_eq!(did_you_mean("zzz", names), None);
    }
}
