//! Statistics of attention patterns, per layer and query head, and labels for the clear cases.
//!
//! A pattern is one head's `[n, n]` matrix for a single unpadded sequence (row = query position,
//! column = key position, causal). Query row 0 has a single visible key, so every score that
//! measures a choice among keys averages over rows `1..n`, and the prompt needs at least two tokens.
//!
//! Labels use these thresholds, chosen so that a label means the behaviour dominates the head:
//! - previous-token head: mean weight on key `i − 1` at least [`PREVIOUS_TOKEN_THRESHOLD`];
//! - self head: mean weight on the query's own position at least [`SELF_THRESHOLD`];
//! - sink head: mean weight on key 0 at least [`SINK_THRESHOLD`];
//! - induction candidate: induction score at least [`INDUCTION_THRESHOLD`], measured on at least
//!   [`MIN_INDUCTION_POSITIONS`] repeated positions.
//!
//! When several apply, the first in this order wins: induction, previous-token, self, sink. Sink
//! comes last because a head that parks its spare attention on the first token can still do its
//! real work elsewhere.

use serde::Serialize;

use crate::error::{AnalysisError, Result};

/// Minimum mean weight on the previous token for the previous-token label.
pub const PREVIOUS_TOKEN_THRESHOLD: f32 = 0.5;

/// Minimum mean weight on the query's own position for the self label.
pub const SELF_THRESHOLD: f32 = 0.5;

/// Minimum mean weight on the first token for the sink label.
pub const SINK_THRESHOLD: f32 = 0.5;

/// Minimum induction score for the induction-candidate label.
pub const INDUCTION_THRESHOLD: f32 = 0.4;

/// Fewest repeated positions over which an induction score is trusted for a label.
pub const MIN_INDUCTION_POSITIONS: usize = 4;

/// Behaviour that clearly dominates a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadLabel {
    /// Attends mostly to the previous token.
    PreviousToken,
    /// Attends mostly to its own position.
    #[serde(rename = "self")]
    SelfToken,
    /// Attends mostly to the first token (an attention sink).
    Sink,
    /// Attends from a repeated token to the token after its earlier occurrence.
    InductionCandidate,
}

impl HeadLabel {
    /// Returns the label as written in JSON and on pictures.
    pub fn name(self) -> &'static str {
        match self {
            HeadLabel::PreviousToken => "previous-token",
            HeadLabel::SelfToken => "self",
            HeadLabel::Sink => "sink",
            HeadLabel::InductionCandidate => "induction-candidate",
        }
    }
}

/// Statistics of one query head's pattern on one prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeadStats {
    pub layer: usize,
    pub head: usize,
    /// TransformerLens-style name, e.g. `L0H3`.
    pub name: String,
    /// Mean over query rows `1..n` of the row entropy `−Σ p log p`, in nats.
    pub entropy: f32,
    /// Mean over rows `1..n` of the row entropy divided by `ln(i + 1)`, the entropy of a uniform
    /// row over its `i + 1` visible keys: 0 for one-hot rows, 1 for uniform rows.
    pub normalized_entropy: f32,
    /// Mean weight on key 0 (the first token) over rows `1..n`.
    pub sink_score: f32,
    /// Mean weight on key `i − 1` over rows `1..n`.
    pub previous_token_score: f32,
    /// Mean weight on key `i` (the query itself) over rows `1..n`.
    pub self_score: f32,
    /// Mean over rows `1..n` of `Σ_j p[i, j] · (i − j)`, in tokens.
    pub mean_distance: f32,
    /// Mean weight from each repeated token to the token after its earlier occurrence, when the
    /// prompt repeats tokens (see [`induction_targets`]).
    pub induction_score: Option<f32>,
    /// The clear behaviour, if any (thresholds in the module documentation).
    pub label: Option<HeadLabel>,
}

/// Lists the `(query, key)` pairs that an induction head attends along. Each position `i` whose
/// token occurred before is paired with key `j + 1`, `j` being that token's most recent earlier
/// occurrence. Pairs with `j + 1 = i` are skipped, because a token repeated right away gives no
/// information.
///
/// For a random sequence repeated twice, these are exactly the second copy's positions, each paired
/// with the position one after its twin in the first copy.
pub fn induction_targets(tokens: &[u32]) -> Vec<(usize, usize)> {
    let mut last_seen = std::collections::HashMap::new();
    let mut targets = Vec::new();

    for (i, &token) in tokens.iter().enumerate() {
        if let Some(&j) = last_seen.get(&token)
            && j + 1 < i
        {
            targets.push((i, j + 1));
        }
        last_seen.insert(token, i);
    }

    targets
}

/// Statistics of one head's `[n, n]` pattern (row-major) on `tokens`.
pub fn head_stats(layer: usize, head: usize, pattern: &[f32], tokens: &[u32]) -> Result<HeadStats> {
    let n = tokens.len();
    if n < 2 {
        return Err(AnalysisError::PromptTooShort {
            tokens: n,
            min: 2,
            what: "attention statistics",
        });
    }
    if pattern.len() != n * n {
        return Err(AnalysisError::InvalidPattern {
            source_name: format!("L{layer}H{head}"),
            reason: format!(
                "expected {n}×{n} = {} weights, found {}",
                n * n,
                pattern.len()
            ),
        });
    }

    let mut entropy = 0.0f64;
    let mut normalized_entropy = 0.0f64;
    let mut sink = 0.0f64;
    let mut previous = 0.0f64;
    let mut self_weight = 0.0f64;
    let mut distance = 0.0f64;

    for i in 1..n {
        let row = &pattern[i * n..i * n + i + 1];

        let row_entropy: f64 = row
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -(p as f64) * (p as f64).ln())
            .sum();
        entropy += row_entropy;
        normalized_entropy += row_entropy / ((i + 1) as f64).ln();

        sink += row[0] as f64;
        previous += row[i - 1] as f64;
        self_weight += row[i] as f64;
        distance += row
            .iter()
            .enumerate()
            .map(|(j, &p)| p as f64 * (i - j) as f64)
            .sum::<f64>();
    }

    let rows = (n - 1) as f64;
    let targets = induction_targets(tokens);
    let induction_score = (!targets.is_empty()).then(|| {
        let total: f64 = targets
            .iter()
            .map(|&(i, j)| pattern[i * n + j] as f64)
            .sum();
        (total / targets.len() as f64) as f32
    });

    let mut stats = HeadStats {
        layer,
        head,
        name: head_name(layer, head),
        entropy: (entropy / rows) as f32,
        normalized_entropy: (normalized_entropy / rows) as f32,
        sink_score: (sink / rows) as f32,
        previous_token_score: (previous / rows) as f32,
        self_score: (self_weight / rows) as f32,
        mean_distance: (distance / rows) as f32,
        induction_score,
        label: None,
    };
    stats.label = classify(&stats, targets.len());
    Ok(stats)
}

fn classify(stats: &HeadStats, induction_positions: usize) -> Option<HeadLabel> {
    let induction = stats.induction_score.is_some_and(|score| {
        score >= INDUCTION_THRESHOLD && induction_positions >= MIN_INDUCTION_POSITIONS
    });

    if induction {
        Some(HeadLabel::InductionCandidate)
    } else if stats.previous_token_score >= PREVIOUS_TOKEN_THRESHOLD {
        Some(HeadLabel::PreviousToken)
    } else if stats.self_score >= SELF_THRESHOLD {
        Some(HeadLabel::SelfToken)
    } else if stats.sink_score >= SINK_THRESHOLD {
        Some(HeadLabel::Sink)
    } else {
        None
    }
}

/// TransformerLens-style head name: `L{layer}H{head}`.
pub fn head_name(layer: usize, head: usize) -> String {
    format!("L{layer}H{head}")
}

/// Statistics of every head of one layer from its `[n_heads, n, n]` pattern.
pub fn layer_stats(
    layer: usize,
    patterns: &[f32],
    n_heads: usize,
    tokens: &[u32],
) -> Result<Vec<HeadStats>> {
    let n = tokens.len();
    if patterns.len() != n_heads * n * n {
        return Err(AnalysisError::InvalidPattern {
            source_name: format!("blocks.{layer}.attn.hook_pattern"),
            reason: format!(
                "expected [{n_heads}, {n}, {n}] = {} weights, found {}",
                n_heads * n * n,
                patterns.len()
            ),
        });
    }

    (0..n_heads)
        .map(|head| {
            head_stats(
                layer,
                head,
                &patterns[head * n * n..(head + 1) * n * n],
                tokens,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern_from(n: usize, row: impl Fn(usize) -> Vec<f32>) -> Vec<f32> {
        let mut pattern = vec![0.0; n * n];
        for i in 0..n {
            let weights = row(i);
            pattern[i * n..i * n + weights.len()].copy_from_slice(&weights);
        }
        pattern
    }

    fn uniform(n: usize) -> Vec<f32> {
        pattern_from(n, |i| vec![1.0 / (i + 1) as f32; i + 1])
    }

    fn previous(n: usize) -> Vec<f32> {
        pattern_from(n, |i| {
            let mut row = vec![0.0; i + 1];
            row[i.saturating_sub(1)] = 1.0;
            row
        })
    }

    #[test]
    fn uniform_pattern_has_normalized_entropy_one() {
        let tokens: Vec<u32> = (0..8).collect();

        let stats = head_stats(0, 0, &uniform(8), &tokens).unwrap();

        assert!((stats.normalized_entropy - 1.0).abs() < 1e-5, "{stats:?}");
        assert_eq!(stats.label, None);
        assert_eq!(stats.induction_score, None);
    }

    #[test]
    fn previous_token_pattern_is_labelled() {
        let tokens: Vec<u32> = (0..6).collect();

        let stats = head_stats(1, 2, &previous(6), &tokens).unwrap();

        assert_eq!(stats.previous_token_score, 1.0);
        assert_eq!(stats.entropy, 0.0);
        assert_eq!(stats.mean_distance, 1.0);
        assert_eq!(stats.label, Some(HeadLabel::PreviousToken));
        assert_eq!(stats.name, "L1H2");
    }

    #[test]
    fn first_token_pattern_is_a_sink() {
        let tokens: Vec<u32> = (0..5).collect();
        let pattern = pattern_from(5, |i| {
            let mut row = vec![0.0; i + 1];
            row[0] = 1.0;
            row
        });

        let stats = head_stats(0, 0, &pattern, &tokens).unwrap();

        assert_eq!(stats.sink_score, 1.0);
        assert_eq!(stats.self_score, 0.0);
        assert!((stats.mean_distance - 2.5).abs() < 1e-6);
        assert_eq!(stats.label, Some(HeadLabel::Sink));
    }

    #[test]
    fn self_pattern_is_labelled() {
        let tokens: Vec<u32> = (0..5).collect();
        let pattern = pattern_from(5, |i| {
            let mut row = vec![0.0; i + 1];
            row[i] = 1.0;
            row
        });

        let stats = head_stats(0, 0, &pattern, &tokens).unwrap();

        assert_eq!(stats.self_score, 1.0);
        assert_eq!(stats.label, Some(HeadLabel::SelfToken));
        assert_eq!(stats.label.unwrap().name(), "self");
        assert_eq!(serde_json::to_value(stats.label).unwrap(), "self");
    }

    #[test]
    fn induction_targets_of_repeated_sequence() {
        let tokens = [7, 3, 9, 4, 7, 3, 9, 4];

        let targets = induction_targets(&tokens);

        assert_eq!(targets, vec![(4, 1), (5, 2), (6, 3), (7, 4)]);
        assert!(induction_targets(&[1, 1, 2]).is_empty());
    }

    #[test]
    fn induction_pattern_is_labelled() {
        let tokens = [7, 3, 9, 4, 5, 7, 3, 9, 4, 5];
        let targets = induction_targets(&tokens);
        let pattern = pattern_from(10, |i| {
            let mut row = vec![0.0; i + 1];
            match targets.iter().find(|&&(q, _)| q == i) {
                Some(&(_, key)) => row[key] = 1.0,
                None => row[i] = 1.0,
            }
            row
        });

        let stats = head_stats(0, 0, &pattern, &tokens).unwrap();

        assert_eq!(stats.induction_score, Some(1.0));
        assert_eq!(stats.label, Some(HeadLabel::InductionCandidate));
    }

    #[test]
    fn short_prompt_is_rejected() {
        let error = head_stats(0, 0, &[1.0], &[5]).unwrap_err();

        assert!(error.to_string().contains("at least 2"), "{error}");
    }

    #[test]
    fn layer_stats_checks_shape() {
        let tokens = [1, 2, 3];

        assert!(layer_stats(0, &[0.0; 17], 2, &tokens).is_err());
        assert_eq!(
            layer_stats(0, &[uniform(3), previous(3)].concat(), 2, &tokens)
                .unwrap()
                .len(),
            2
        );
    }
}
