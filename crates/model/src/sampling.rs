//! Choosing the next token from a row of logits: greedy decoding, or sampling after a repetition
//! penalty, temperature, top-k and top-p, in the order and with the semantics of Hugging Face
//! transformers' logits processors (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
//! `TopKLogitsWarper`, `TopPLogitsWarper`).

use qwenlens_weights::GenerationConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{ModelError, Result};

/// Options for choosing the next token at each generation step.
///
/// With `do_sample == false` the choice is the argmax of the logits after the repetition penalty
/// (temperature, top-k and top-p cannot change the argmax, so they are ignored). With
/// `do_sample == true` the token is drawn from the softmax of the processed logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Draw the token at random (`true`) or take the most likely one (`false`).
    pub do_sample: bool,
    /// Divisor of the logits before the softmax; must be positive and finite. 1.0 leaves them as is.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (and any tied with the k-th); `None` or 0 disables.
    pub top_k: Option<usize>,
    /// Keep the most likely tokens whose cumulative probability reaches `p`, in `(0, 1]`; `None`
    /// or 1.0 disables.
    pub top_p: Option<f32>,
    /// Penalty on every token already in the prompt or the generated text: positive logits are
    /// divided by it, negative ones multiplied. Must be positive; 1.0 disables.
    pub repetition_penalty: f32,
    /// Seed of the random number generator; `None` picks one at random (logged at debug level).
    pub seed: Option<u64>,
}

impl Sampling {
    /// Greedy decoding without any penalty.
    pub fn greedy() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: None,
        }
    }

    /// Reads the defaults of a checkpoint's `generation_config.json`. Fields it leaves out take the
    /// transformers defaults (greedy, temperature 1, top-k 50, top-p 1, no penalty).
    pub fn from_generation_config(config: &GenerationConfig) -> Self {
        Self {
            do_sample: config.do_sample.unwrap_or(false),
            temperature: config.temperature.map_or(1.0, |t| t as f32),
            top_k: Some(config.top_k.unwrap_or(50)),
            top_p: config.top_p.map(|p| p as f32),
            repetition_penalty: config.repetition_penalty.map_or(1.0, |r| r as f32),
            seed: None,
        }
    }

    /// Checks that every option in use is in its valid range. Greedy decoding ignores temperature
    /// and top-p (a `generation_config.json` with `do_sample: false` may set temperature 0), so
    /// only sampling checks them.
    pub fn validate(&self) -> Result<()> {
        if self.do_sample && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(invalid(
                "temperature",
                self.temperature.to_string(),
                "a positive finite number (use greedy decoding instead of temperature 0)",
            ));
        }

        if let Some(top_p) = self.top_p
            && self.do_sample
            && !(top_p > 0.0 && top_p <= 1.0)
        {
            return Err(invalid("top_p", top_p.to_string(), "a number in (0, 1]"));
        }

        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(
                "repetition_penalty",
                self.repetition_penalty.to_string(),
                "a positive finite number (1.0 disables the penalty)",
            ));
        }

        Ok(())
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

fn invalid(option: &'static str, value: String, expected: &'static str) -> ModelError {
    ModelError::InvalidArgument(format!(
        "invalid sampling option {option} = {value}: expected {expected}"
    ))
}

/// Chooses tokens one step at a time with a [`Sampling`] configuration and its own seeded random
/// number generator, so a run with a fixed seed is reproducible.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// Validates the options and seeds the random number generator.
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;

        let seed = sampling.seed.unwrap_or_else(|| rand::rng().random());
        if sampling.do_sample && sampling.seed.is_none() {
            tracing::debug!(seed, "sampling with a random seed");
        }

        Ok(Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Returns the options this sampler applies.
    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// Chooses the next token from one row of logits (modified in place) given every token so far
    /// (prompt and generated), which the repetition penalty reads.
    pub fn next_token(&mut self, logits: &mut [f32], context: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ModelError::InvalidArgument(
                "cannot choose a token from an empty logits row".to_string(),
            ));
        }
        if let Some(index) = logits.iter().position(|x| x.is_nan()) {
            return Err(ModelError::InvalidArgument(format!(
                "the logit of token {index} is NaN, so no token can be chosen; \
                 the forward pass produced non-finite values"
            )));
        }

        check_finite_choice(logits, "in the forward pass output")?;

        let penalty = self.sampling.repetition_penalty;
        apply_repetition_penalty(logits, context, penalty);
        check_finite_choice(
            logits,
            &format!(
                "after the repetition penalty {} (too far from 1.0 for the logits' range)",
                number(penalty)
            ),
        )?;

        if !self.sampling.do_sample {
            return Ok(argmax(logits) as u32);
        }

        let temperature = self.sampling.temperature;
        apply_temperature(logits, temperature);
        check_finite_choice(
            logits,
            &format!(
                "after dividing by the temperature {} (too small for the logits' range)",
                number(temperature)
            ),
        )?;
        if let Some(k) = self.sampling.top_k {
            apply_top_k(logits, k);
        }
        if let Some(p) = self.sampling.top_p {
            apply_top_p(logits, p);
        }

        let probs = softmax(logits);
        Ok(draw(&probs, self.rng.random::<f64>()) as u32)
    }
}

/// Formats an option value readably: plain, or in exponent form when very small or large.
fn number(value: f32) -> String {
    if value == 0.0 || (1e-4..1e16).contains(&value.abs()) {
        value.to_string()
    } else {
        format!("{value:e}")
    }
}

/// Rejects a row from which no token can be chosen fairly: a logit of +inf (every finite one gets
/// probability 0 and ties between infinities are arbitrary) or every logit -inf (no probability
/// mass at all). `stage` says where in the processing the row went wrong.
fn check_finite_choice(logits: &[f32], stage: &str) -> Result<()> {
    if let Some(index) = logits.iter().position(|x| *x == f32::INFINITY) {
        return Err(ModelError::InvalidArgument(format!(
            "the logit of token {index} is +inf {stage}, so no token can be chosen; \
             use values that keep the logits finite"
        )));
    }
    if logits.iter().all(|x| *x == f32::NEG_INFINITY) {
        return Err(ModelError::InvalidArgument(format!(
            "every logit is -inf {stage}, so no token can be chosen; \
             use values that keep the logits finite"
        )));
    }
    Ok(())
}

/// Applies transformers' repetition penalty: each distinct token of `context` has its logit divided
/// by `penalty` when positive and multiplied by it when negative. Ids outside the row are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }

    let mut seen = vec![false; logits.len()];
    for &id in context {
        let id = id as usize;
        if id >= logits.len() || seen[id] {
            continue;
        }
        seen[id] = true;

        let logit = logits[id];
        logits[id] = if logit < 0.0 {
            logit * penalty
        } else {
            logit / penalty
        };
    }
}

/// Divides every logit by `temperature`.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature == 1.0 {
        return;
    }
    for logit in logits.iter_mut() {
        *logit /= temperature;
    }
}

/// Sets to `-inf` every logit below the `k`-th largest, so tokens tied with the k-th stay. `k == 0`
/// or `k >= logits.len()` leaves the row unchanged.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }

    let mut sorted = logits.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];

    for logit in logits.iter_mut() {
        if *logit < threshold {
            *logit = f32::NEG_INFINITY;
        }
    }
}

/// Applies nucleus (top-p) filtering as transformers does. With the tokens sorted by increasing
/// probability, it removes those whose cumulative probability is at most `1 - top_p`, always
/// keeping the most likely token. `top_p >= 1` leaves the row unchanged.
pub fn apply_top_p(logits: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }

    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));

    // The cut is made in f64 so that a long tail of tiny probabilities sums without drift.
    let cut = 1.0 - f64::from(top_p);
    let mut cumulative = 0.0f64;
    for &index in &order[..order.len() - 1] {
        cumulative += f64::from(probs[index]);
        if cumulative > cut {
            break;
        }
        logits[index] = f32::NEG_INFINITY;
    }
}

/// Returns the index of the largest logit, the first one on ties.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (index, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = index;
        }
    }
    best
}

/// Computes the softmax of a row in f64 and returns it in f32. `-inf` logits get probability 0.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }

    let exps: Vec<f64> = logits
        .iter()
        .map(|&x| (f64::from(x) - f64::from(max)).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

/// Draws by inverse CDF, returning the first index whose cumulative probability exceeds `u` in
/// `[0, 1)`. Rounding can leave the total a little under 1, so a `u` beyond it falls on the last
/// token of nonzero probability.
fn draw(probs: &[f32], u: f64) -> usize {
    let mut cumulative = 0.0f64;
    let mut last_nonzero = 0;
    for (index, &p) in probs.iter().enumerate() {
        if p <= 0.0 {
            continue;
        }
        cumulative += f64::from(p);
        last_nonzero = index;
        if u < cumulative {
            return index;
        }
    }
    last_nonzero
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG_INF: f32 = f32::NEG_INFINITY;

    fn sampling(do_sample: bool) -> Sampling {
        Sampling {
            do_sample,
            seed: Some(7),
            ..Sampling::greedy()
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut logits = vec![2.0, -2.0, 1.0, 0.0, 4.0];

        apply_repetition_penalty(&mut logits, &[0, 1, 3, 0, 0], 2.0);

        assert_eq!(logits, vec![1.0, -4.0, 1.0, 0.0, 4.0]);
    }

    #[test]
    fn repetition_penalty_ignores_ids_beyond_row() {
        let mut logits = vec![3.0, 3.0];

        apply_repetition_penalty(&mut logits, &[1, 151_645], 1.5);

        assert_eq!(logits, vec![3.0, 2.0]);
    }

    #[test]
    fn repetition_penalty_one_is_identity() {
        let mut logits = vec![3.0, -1.0];

        apply_repetition_penalty(&mut logits, &[0, 1], 1.0);

        assert_eq!(logits, vec![3.0, -1.0]);
    }

    #[test]
    fn temperature_divides_logits() {
        let mut logits = vec![1.0, -3.0, 0.5];

        apply_temperature(&mut logits, 0.5);

        assert_eq!(logits, vec![2.0, -6.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_k_largest() {
        let mut logits = vec![0.1, 3.0, -1.0, 2.0, 0.5];

        apply_top_k(&mut logits, 2);

        assert_eq!(logits, vec![NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF]);
    }

    #[test]
    fn top_k_keeps_ties_with_kth() {
        let mut logits = vec![1.0, 5.0, 1.0, 0.0];

        apply_top_k(&mut logits, 2);

        assert_eq!(logits, vec![1.0, 5.0, 1.0, NEG_INF]);
    }

    #[test]
    fn top_k_zero_or_large_is_identity() {
        let original = vec![0.1, 3.0, -1.0];

        let mut zero = original.clone();
        apply_top_k(&mut zero, 0);
        let mut large = original.clone();
        apply_top_k(&mut large, 3);

        assert_eq!(zero, original);
        assert_eq!(large, original);
    }

    #[test]
    fn top_p_cuts_low_probability_tail() {
        // Probabilities 0.5, 0.25, 0.15, 0.1 (the logits are their natural logarithms).
        let probs = [0.5f32, 0.25, 0.15, 0.1];
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();

        // Ascending cumulative sums are 0.1, 0.25, 0.5, 1.0; with top_p 0.7 the cut is 0.3, so the
        // tokens of 0.1 and 0.15 (cumulative 0.1 and 0.25) go and the token of 0.25 (0.5) stays.
        apply_top_p(&mut logits, 0.7);

        assert!(logits[0].is_finite());
        assert!(logits[1].is_finite());
        assert_eq!(logits[2], NEG_INF);
        assert_eq!(logits[3], NEG_INF);
    }

    #[test]
    fn top_p_keeps_token_reaching_boundary() {
        let probs = [0.5f32, 0.25, 0.15, 0.1];
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();

        // The cut is 0.2: only the 0.1 token has a cumulative probability at most 0.2.
        apply_top_p(&mut logits, 0.8);

        assert!(logits[..3].iter().all(|x| x.is_finite()));
        assert_eq!(logits[3], NEG_INF);
    }

    #[test]
    fn top_p_always_keeps_most_likely() {
        let mut logits = vec![0.0, 10.0, 1.0];

        apply_top_p(&mut logits, 1e-6);

        assert_eq!(logits, vec![NEG_INF, 10.0, NEG_INF]);
    }

    #[test]
    fn softmax_sums_to_one_and_zeroes_neg_inf() {
        let probs = softmax(&[1.0, NEG_INF, 1.0, 1.0]);

        let total: f32 = probs.iter().sum();
        assert!((total - 1.0).abs() < 1e-6, "sum {total}");
        assert_eq!(probs[1], 0.0);
        assert!((probs[0] - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn draw_walks_cumulative_probabilities() {
        let probs = [0.2f32, 0.0, 0.5, 0.3];

        assert_eq!(draw(&probs, 0.0), 0);
        assert_eq!(draw(&probs, 0.19), 0);
        assert_eq!(draw(&probs, 0.21), 2);
        assert_eq!(draw(&probs, 0.71), 3);
        assert_eq!(draw(&probs, 0.999_999_9), 3);
    }

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[NEG_INF, NEG_INF]), 0);
    }

    #[test]
    fn greedy_applies_repetition_penalty() {
        let mut sampler = Sampler::new(Sampling {
            repetition_penalty: 2.0,
            ..sampling(false)
        })
        .unwrap();

        // Token 0 leads, but it was seen, and 3.0 / 2 falls below token 1's 2.0.
        let mut logits = vec![3.0, 2.0, -1.0];

        assert_eq!(sampler.next_token(&mut logits, &[0]).unwrap(), 1);
    }

    #[test]
    fn sampling_with_seed_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draws = |seed| {
            let mut sampler = Sampler::new(Sampling {
                seed: Some(seed),
                ..sampling(true)
            })
            .unwrap();
            (0..40)
                .map(|_| sampler.next_token(&mut logits.clone(), &[]).unwrap())
                .collect::<Vec<_>>()
        };

        let first = draws(11);

        assert_eq!(first, draws(11));
        assert_ne!(first, draws(12));
    }

    #[test]
    fn sampling_follows_probabilities() {
        let mut sampler = Sampler::new(sampling(true)).unwrap();
        let logits = [0.0f32, 2.0_f32.ln(), f32::NEG_INFINITY];

        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let id = sampler.next_token(&mut logits.clone(), &[]).unwrap();
            counts[id as usize] += 1;
        }

        // Expected 1000 and 2000; five standard deviations are about 130.
        assert!((870..=1130).contains(&counts[0]), "counts {counts:?}");
        assert_eq!(counts[2], 0, "counts {counts:?}");
    }

    #[test]
    fn top_k_one_sampling_equals_greedy() {
        let mut sampler = Sampler::new(Sampling {
            top_k: Some(1),
            temperature: 5.0,
            ..sampling(true)
        })
        .unwrap();

        for step in 0..20 {
            // 7 and 31 are coprime, so the 31 logits are distinct and the argmax is unique.
            let logits: Vec<f32> = (0..31).map(|i| ((i * 7 + step) % 31) as f32).collect();
            let expected = argmax(&logits) as u32;

            assert_eq!(
                sampler.next_token(&mut logits.clone(), &[]).unwrap(),
                expected
            );
        }
    }

    #[test]
    fn infinite_logits_after_processing_are_errors() {
        let overflowing_temperature = Sampling {
            temperature: 1e-40,
            ..sampling(true)
        };
        let overflowing_penalty = Sampling {
            repetition_penalty: 1e-40,
            ..sampling(false)
        };
        let mut sampler = Sampler::new(overflowing_temperature).unwrap();
        let mut greedy = Sampler::new(overflowing_penalty).unwrap();
        let mut all_negative = Sampler::new(sampling(false)).unwrap();

        let temperature_error = sampler.next_token(&mut [1.0, 2.0], &[]).unwrap_err();
        let penalty_error = greedy.next_token(&mut [1.0, 2.0], &[1]).unwrap_err();
        let neg_error = all_negative
            .next_token(&mut [f32::NEG_INFINITY; 3], &[])
            .unwrap_err();

        assert!(
            temperature_error
                .to_string()
                .contains("+inf after dividing by the temperature"),
            "{temperature_error}"
        );
        assert!(
            penalty_error
                .to_string()
                .contains("+inf after the repetition penalty"),
            "{penalty_error}"
        );
        assert!(
            neg_error
                .to_string()
                .contains("every logit is -inf in the forward pass output"),
            "{neg_error}"
        );
    }

    #[test]
    fn nan_logit_is_error() {
        let mut sampler = Sampler::new(sampling(false)).unwrap();

        let error = sampler.next_token(&mut [0.0, f32::NAN], &[]).unwrap_err();

        assert!(error.to_string().contains("token 1"), "{error}");
    }

    #[test]
    fn invalid_options_are_rejected() {
        let cases = [
            (
                Sampling {
                    temperature: 0.0,
                    ..sampling(true)
                },
                "temperature",
            ),
            (
                Sampling {
                    temperature: f32::NAN,
                    ..sampling(true)
                },
                "temperature",
            ),
            (
                Sampling {
                    top_p: Some(0.0),
                    ..sampling(true)
                },
                "top_p",
            ),
            (
                Sampling {
                    top_p: Some(1.5),
                    ..sampling(true)
                },
                "top_p",
            ),
            (
                Sampling {
                    repetition_penalty: 0.0,
                    ..sampling(true)
                },
                "repetition_penalty",
            ),
            (
                Sampling {
                    repetition_penalty: -1.0,
                    ..sampling(false)
                },
                "repetition_penalty",
            ),
        ];

        for (options, option) in cases {
            let error = Sampler::new(options.clone()).unwrap_err();
            assert!(error.to_string().contains(option), "{options:?}: {error}");
        }
    }

    #[test]
    fn greedy_ignores_sampling_only_options() {
        let options = Sampling {
            temperature: 0.0,
            top_p: Some(0.0),
            ..sampling(false)
        };

        let mut sampler = Sampler::new(options).unwrap();

        assert_eq!(sampler.next_token(&mut [1.0, 2.0], &[]).unwrap(), 1);
    }
}
