//! Readable labels for tokens on plot axes and in reports.

use qwenlens_weights::Tokenizer;

use crate::error::{AnalysisError, Result};

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

/// Resolves a token given on the command line. A number is a token id. Other text is a vocabulary
/// string (`Ġthe`, `<|im_end|>`) or text that encodes to exactly one token (` the`).
pub fn resolve_token(text: &str, tokenizer: Option<&Tokenizer>, d_vocab: usize) -> Result<u32> {
    if let Ok(id) = text.parse::<u32>() {
        if id as usize >= d_vocab {
            return Err(AnalysisError::TokenOutOfRange { id, d_vocab });
        }
        return Ok(id);
    }

    let tokenizer = tokenizer.ok_or_else(|| {
        AnalysisError::InvalidArgument(format!(
            "token `{text}` is not a number and the model has no tokenizer to look it up; give a token id"
        ))
    })?;
    if let Some(id) = tokenizer.token_to_id(text) {
        return Ok(id);
    }

    let ids = tokenizer.encode(text).map_err(|error| {
        AnalysisError::InvalidArgument(format!("failed to tokenize `{text}`: {error}"))
    })?;
    match ids[..] {
        [id] => Ok(id),
        [] => Err(AnalysisError::InvalidArgument(
            "the token text is empty; give a token string such as \" Paris\" or a token id"
                .to_string(),
        )),
        _ => {
            let pieces = tokenizer.tokens(&ids).unwrap_or_default();
            Err(AnalysisError::InvalidArgument(format!(
                "`{text}` is {} tokens ({}), not one; give a single token (a leading space is often part of it, as in \" Paris\") or a token id",
                ids.len(),
                ids.iter()
                    .zip(
                        pieces
                            .iter()
                            .map(|p| p.as_str())
                            .chain(std::iter::repeat("?"))
                    )
                    .map(|(id, piece)| format!("{id} {piece:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
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
    fn token_ids_are_checked_against_the_vocabulary() {
        assert_eq!(resolve_token("42", None, 100).unwrap(), 42);
        assert!(
            resolve_token("100", None, 100)
                .unwrap_err()
                .to_string()
                .contains("100 entries")
        );
        assert!(
            resolve_token("Paris", None, 100)
                .unwrap_err()
                .to_string()
                .contains("no tokenizer")
        );
    }

    #[test]
    fn token_text_resolves_through_the_tokenizer() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/models/tiny-gqa"
        );
        let tokenizer = Tokenizer::from_dir(std::path::Path::new(dir)).unwrap();

        assert_eq!(
            resolve_token(" the", Some(&tokenizer), 151936).unwrap(),
            279
        );
        assert_eq!(
            resolve_token("Ġthe", Some(&tokenizer), 151936).unwrap(),
            279
        );
        assert_eq!(
            resolve_token("<|im_end|>", Some(&tokenizer), 151936).unwrap(),
            151645
        );
        let error = resolve_token("The quick brown", Some(&tokenizer), 151936)
            .unwrap_err()
            .to_string();
        assert!(error.contains("3 tokens"), "{error}");
    }

    #[test]
    fn position_labels_number_tokens() {
        let labels = position_labels(&["a".to_string(), " b".to_string()], 12);

        assert_eq!(labels, vec!["0 a", "1 ·b"]);
    }
}
