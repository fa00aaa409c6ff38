//! Readable labels for tokens on plot axes and in reports.

/// Default maximum label width in characters.
pub const DEFAULT_LABEL_WIDTH: usize = 12;

/// Turns decoded token text into a one-line label: a space becomes `·`, a newline `↵`, a carriage
/// return `␍`, a tab `→`, other control characters `␀`-style symbols, and an empty string `∅`.
/// Labels longer than `max_chars` keep their first `max_chars − 1` characters and end in `…`.
pub fn token_label(text: &str, max_chars: usize) -> String {
    let mut visible: Vec<char> = text
        .chars()
        .map(|c| match c {
            ' ' => '·',
            '\n' => '↵',
            '\r' => '␍',
            '\t' => '→',
            // U+2400 + code is the Control Pictures block (␀, ␁, ...).
            c if (c as u32) < 0x20 => char::from_u32(0x2400 + c as u32).unwrap_or('?'),
            c => c,
        })
        .collect();

    if visible.is_empty() {
        return "∅".to_string();
    }
    if visible.len() > max_chars.max(1) {
        visible.truncate(max_chars.max(2) - 1);
        visible.push('…');
    }
    visible.into_iter().collect()
}

/// Labels for every token with its position, e.g. `3 ·fox`, so repeated tokens stay apart.
pub fn position_labels(texts: &[String], max_chars: usize) -> Vec<String> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| format!("{i} {}", token_label(text, max_chars)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_gets_visible_markers() {
        assert_eq!(token_label(" the", 12), "·the");
        assert_eq!(token_label("\n\n", 12), "↵↵");
        assert_eq!(token_label("\t", 12), "→");
        assert_eq!(token_label("", 12), "∅");
        assert_eq!(token_label("\u{1b}", 12), "␛");
    }

    #[test]
    fn long_tokens_are_truncated() {
        let label = token_label("abcdefghijklmnop", 6);

        assert_eq!(label, "abcde…");
        assert_eq!(label.chars().count(), 6);
    }

    #[test]
    fn position_labels_number_tokens() {
        let labels = position_labels(&["a".to_string(), " b".to_string()], 12);

        assert_eq!(labels, vec!["0 a", "1 ·b"]);
    }
}
