//! Metrics over plain logit vectors: log-softmax, next-token loss, log-probability of a target,
//! KL divergence from a clean distribution and logit difference. Sums run in f64 so that a
//! 151936-entry vocabulary adds no visible rounding error to f32 inputs.

use serde::{Deserialize, Serialize};

/// Log-sum-exp of a logit row, computed stably around its maximum.
pub fn logsumexp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return max;
    }
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln()
}

/// Log-softmax of a logit row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = logsumexp(logits);
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Log-probability of `target` under the softmax of `logits`.
pub fn log_prob(logits: &[f32], target: u32) -> f32 {
    (logits[target as usize] as f64 - logsumexp(logits)) as f32
}

/// Mean next-token cross-entropy of a `[n, d_vocab]` logit matrix against `tokens` (length n):
/// the mean over positions `0..n-1` of `-log p(tokens[i + 1] | logits[i])`, TransformerLens's
/// `lm_cross_entropy_loss`. Returns `None` for fewer than two tokens.
pub fn next_token_loss(logits: &[f32], d_vocab: usize, tokens: &[u32]) -> Option<f32> {
    if tokens.len() < 2 {
        return None;
    }

    let total: f64 = tokens
        .windows(2)
        .enumerate()
        .map(|(i, pair)| {
            let row = &logits[i * d_vocab..(i + 1) * d_vocab];
            -(log_prob(row, pair[1]) as f64)
        })
        .sum();
    Some((total / (tokens.len() - 1) as f64) as f32)
}

/// KL divergence `KL(clean ‖ other) = Σ p_clean · (log p_clean − log p_other)` of two logit rows:
/// how far the distribution moved away from the clean one, in nats.
pub fn kl_divergence(clean_logits: &[f32], other_logits: &[f32]) -> f32 {
    let clean_lse = logsumexp(clean_logits);
    let other_lse = logsumexp(other_logits);

    let kl: f64 = clean_logits
        .iter()
        .zip(other_logits)
        .map(|(&c, &o)| {
            let log_p = c as f64 - clean_lse;
            let log_q = o as f64 - other_lse;
            log_p.exp() * (log_p - log_q)
        })
        .sum();

    // Rounding can leave a tiny negative value for identical rows; KL is never negative.
    kl.max(0.0) as f32
}

/// `logits[answer] − logits[wrong]`.
pub fn logit_difference(logits: &[f32], answer: u32, wrong: u32) -> f32 {
    logits[answer as usize] - logits[wrong as usize]
}

/// Index of the largest logit (the greedy next token).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of the `k` largest values, largest first.
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut indices: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    indices.select_nth_unstable_by(k - 1, |&a, &b| {
        values[b as usize].total_cmp(&values[a as usize])
    });
    indices.truncate(k);
    indices.sort_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]));
    indices
}

/// Rank of `target` among the values: 0 when it is the largest. Ties count in its favour.
pub fn rank_of(values: &[f32], target: u32) -> usize {
    let value = values[target as usize];
    values.iter().filter(|&&x| x > value).count()
}

/// Quantity that a head-importance sweep measures on every run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Metric {
    /// Mean next-token loss over the prompt.
    Loss,
    /// Log-probability of `target` at the last position.
    LogProb { target: u32 },
    /// KL divergence of the last position's distribution from the clean run's.
    Kl,
    /// `logits[answer] − logits[wrong]` at the last position.
    LogitDiff { answer: u32, wrong: u32 },
}

impl Metric {
    /// Short name, as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::LogProb { .. } => "logprob",
            Metric::Kl => "kl",
            Metric::LogitDiff { .. } => "logit-diff",
        }
    }

    /// Token ids the metric reads, for range checks.
    pub fn tokens(&self) -> Vec<u32> {
        match *self {
            Metric::Loss | Metric::Kl => Vec::new(),
            Metric::LogProb { target } => vec![target],
            Metric::LogitDiff { answer, wrong } => vec![answer, wrong],
        }
    }

    /// Evaluates the metric on one run from its prompt loss and last-position logits; `clean_last`
    /// is the clean run's last-position logits (read by [`Metric::Kl`] only).
    pub fn evaluate(&self, loss: f32, last_logits: &[f32], clean_last: &[f32]) -> f32 {
        match *self {
            Metric::Loss => loss,
            Metric::LogProb { target } => log_prob(last_logits, target),
            Metric::Kl => kl_divergence(clean_last, last_logits),
            Metric::LogitDiff { answer, wrong } => logit_difference(last_logits, answer, wrong),
        }
    }

    /// Importance of a change `delta = ablated − clean`: positive when the intervention hurt the
    /// model (the loss or the KL rose, the log-probability or the logit difference fell).
    pub fn importance(&self, delta: f32) -> f32 {
        match self {
            Metric::Loss | Metric::Kl => delta,
            Metric::LogProb { .. } | Metric::LogitDiff { .. } => -delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_sums_to_one() {
        let logits = [1.0, 2.0, 3.0, -40.0];

        let total: f64 = log_softmax(&logits).iter().map(|&x| (x as f64).exp()).sum();

        assert!((total - 1.0).abs() < 1e-6, "total {total}");
    }

    #[test]
    fn log_prob_matches_closed_form() {
        let logits = [0.0, 0.0, 0.0, 0.0];

        assert!((log_prob(&logits, 2) - (0.25f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn next_token_loss_averages_positions() {
        // Two positions over a vocabulary of two: p(1 | row 0) = 1/2, p(0 | row 1) = 1/(1 + e).
        let logits = [0.0, 0.0, 0.0, 1.0, 7.0, 7.0];

        let loss = next_token_loss(&logits, 2, &[0, 1, 0]).unwrap();

        let expected = (2f64.ln() + (1.0 + 1f64.exp()).ln()) / 2.0;
        assert!(
            (loss as f64 - expected).abs() < 1e-6,
            "loss {loss}, expected {expected}"
        );
        assert_eq!(next_token_loss(&logits, 2, &[0]), None);
    }

    #[test]
    fn kl_zero_only_for_equal_rows() {
        let clean = [1.0, 2.0, 0.5];
        let other = [2.0, 1.0, 0.5];

        assert_eq!(kl_divergence(&clean, &clean), 0.0);
        assert!(kl_divergence(&clean, &other) > 0.1);
    }

    #[test]
    fn kl_matches_closed_form_for_two_outcomes() {
        // p = (1/2, 1/2), q = (1/(1+e), e/(1+e)).
        let kl = kl_divergence(&[0.0, 0.0], &[0.0, 1.0]) as f64;

        let q0 = 1.0 / (1.0 + 1f64.exp());
        let expected = 0.5 * (0.5 / q0).ln() + 0.5 * (0.5 / (1.0 - q0)).ln();
        assert!((kl - expected).abs() < 1e-6, "kl {kl}, expected {expected}");
    }

    #[test]
    fn top_k_and_rank_agree() {
        let values = [0.1, 5.0, -1.0, 3.0, 5.0];

        let top = top_k(&values, 3);

        assert_eq!(values[top[0] as usize], 5.0);
        assert_eq!(values[top[2] as usize], 3.0);
        assert_eq!(rank_of(&values, 3), 2);
        assert_eq!(rank_of(&values, 1), 0);
        assert_eq!(argmax(&values), 1);
    }

    #[test]
    fn importance_points_towards_damage() {
        assert!(Metric::Loss.importance(0.5) > 0.0);
        assert!(Metric::LogProb { target: 0 }.importance(-0.5) > 0.0);
        assert!(
            Metric::LogitDiff {
                answer: 0,
                wrong: 1
            }
            .importance(-0.5)
                > 0.0
        );
        assert!(Metric::Kl.importance(0.5) > 0.0);
    }
}
