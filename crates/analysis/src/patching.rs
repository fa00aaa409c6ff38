//! Attention-pattern patching: replace chosen heads' patterns by a built-in or user pattern and
//! compare the loss, the last position's distribution and a generated continuation with the clean
//! run.

use std::path::Path;

use serde::Serialize;

use qwenlens_model::{Hooks, Intervention, LogitRows, Model, PatternSpec, RunOptions, TokenBatch};

use crate::error::{AnalysisError, Result};
use crate::metrics::{argmax, kl_divergence};
use crate::pattern_file::load_pattern_file;

/// A pattern named on the command line: `uniform`, `previous`, `first`, `self`, `position:P`, or the
/// path of a `.npy`/`.safetensors` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatternChoice {
    Uniform,
    Previous,
    First,
    SelfToken,
    Position(usize),
    File(std::path::PathBuf),
}

impl std::str::FromStr for PatternChoice {
    type Err = AnalysisError;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "uniform" => return Ok(PatternChoice::Uniform),
            // The run-analysis spellings are accepted too, so one --pattern works everywhere.
            "previous" | "previous-token" => return Ok(PatternChoice::Previous),
            "first" | "first-token" => return Ok(PatternChoice::First),
            "self" => return Ok(PatternChoice::SelfToken),
            _ => {}
        }

        if let Some(position) = text.strip_prefix("position:") {
            return position.parse().map(PatternChoice::Position).map_err(|_| {
                AnalysisError::InvalidArgument(format!(
                    "invalid pattern `{text}`: the position must be a non-negative integer, as in position:3"
                ))
            });
        }

        let is_file = [".npy", ".safetensors"]
            .iter()
            .any(|ext| text.to_ascii_lowercase().ends_with(ext));
        if is_file {
            return Ok(PatternChoice::File(text.into()));
        }
        Err(AnalysisError::InvalidArgument(format!(
            "unknown pattern `{text}`; use uniform, previous, first, self, position:P, or a .npy or .safetensors file"
        )))
    }
}

impl std::fmt::Display for PatternChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PatternChoice::Uniform => f.write_str("uniform"),
            PatternChoice::Previous => f.write_str("previous"),
            PatternChoice::First => f.write_str("first"),
            PatternChoice::SelfToken => f.write_str("self"),
            PatternChoice::Position(p) => write!(f, "position:{p}"),
            PatternChoice::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl PatternChoice {
    /// The model's pattern spec; a file is read here and must cover `max_len` tokens.
    pub fn to_spec(&self, max_len: usize) -> Result<PatternSpec> {
        Ok(match self {
            PatternChoice::Uniform => PatternSpec::Uniform,
            PatternChoice::Previous => PatternSpec::PreviousToken,
            PatternChoice::First => PatternSpec::FirstToken,
            PatternChoice::SelfToken => PatternSpec::SelfToken,
            PatternChoice::Position(p) => PatternSpec::Position(*p),
            PatternChoice::File(path) => {
                PatternSpec::Fixed(load_pattern_file(Path::new(path), max_len)?)
            }
        })
    }
}

/// Loss and last-position logits of the clean and the patched run.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchOutcome {
    /// Mean next-token loss of the clean run (NaN for a one-token prompt).
    pub clean_loss: f32,
    /// Mean next-token loss with the patterns replaced.
    pub patched_loss: f32,
    pub clean_last_logits: Vec<f32>,
    pub patched_last_logits: Vec<f32>,
}

impl PatchOutcome {
    /// `patched_loss − clean_loss`.
    pub fn loss_delta(&self) -> f32 {
        self.patched_loss - self.clean_loss
    }

    /// KL divergence of the patched last-position distribution from the clean one.
    pub fn last_kl(&self) -> f32 {
        kl_divergence(&self.clean_last_logits, &self.patched_last_logits)
    }
}

/// Builds the interventions that give each `(layer, head)` the pattern `spec`.
pub fn pattern_hooks(heads: &[(usize, usize)], spec: &PatternSpec) -> Hooks {
    Hooks::from_interventions(
        heads
            .iter()
            .map(|&(layer, head)| Intervention::replace_pattern(layer, head, spec.clone()))
            .collect(),
    )
}

/// Checks that `prompt_len` tokens plus `max_new_tokens` fit the model's context
/// (max_position_embeddings), before any forward pass runs.
pub fn check_generation_length(
    model: &Model,
    prompt_len: usize,
    max_new_tokens: usize,
) -> Result<()> {
    let max_positions = model.config().max_position_embeddings;
    if prompt_len.saturating_add(max_new_tokens) > max_positions {
        return Err(AnalysisError::InvalidArgument(format!(
            "--max-new-tokens {max_new_tokens} is too large: the prompt's {prompt_len} tokens plus \
             {max_new_tokens} new ones exceed the model's context of {max_positions} tokens; use \
             --max-new-tokens {} or less",
            max_positions.saturating_sub(prompt_len)
        )));
    }
    Ok(())
}

/// Warns on stderr when `position:P` lies beyond the prompt: until generation reaches P each query
/// attends to itself, the same as the `self` pattern, which is easy to pick by mistake.
pub fn warn_position_beyond_prompt(choice: &PatternChoice, prompt_len: usize) -> bool {
    match choice {
        PatternChoice::Position(position) if *position >= prompt_len => {
            eprintln!(
                "warning: --pattern position:{position} lies beyond the prompt's {prompt_len} tokens \
                 (positions 0 to {}); until the generation reaches it, each query attends to \
                 itself as with --pattern self",
                prompt_len.saturating_sub(1)
            );
            true
        }
        _ => false,
    }
}

/// Checks `(layer, head)` pairs against the model.
pub fn check_heads(model: &Model, heads: &[(usize, usize)]) -> Result<()> {
    let n_layers = model.config().n_layers();
    let n_heads = model.config().n_heads();
    for &(layer, head) in heads {
        if layer >= n_layers {
            return Err(AnalysisError::LayerOutOfRange { layer, n_layers });
        }
        if head >= n_heads {
            return Err(AnalysisError::HeadOutOfRange {
                kind: "query",
                head,
                count: n_heads,
            });
        }
    }
    Ok(())
}

/// Runs the prompt clean and with the patterns of `heads` replaced by `spec`.
pub fn patch_patterns(
    model: &Model,
    tokens: &[u32],
    heads: &[(usize, usize)],
    spec: &PatternSpec,
) -> Result<PatchOutcome> {
    check_heads(model, heads)?;
    if tokens.is_empty() {
        return Err(AnalysisError::PromptTooShort {
            tokens: 0,
            min: 1,
            what: "pattern patching",
        });
    }

    let batch = TokenBatch::single(tokens);
    let run = |hooks: Hooks| -> Result<(f32, Vec<f32>)> {
        let options = RunOptions {
            hooks,
            logit_rows: LogitRows::All,
            ..RunOptions::default()
        };
        let logits = model.run(&batch, &options)?.into_logits()?;
        let loss = if tokens.len() >= 2 {
            logits.loss(&batch)?[0]
        } else {
            f32::NAN
        };
        Ok((loss, logits.last(0)?))
    };

    let (clean_loss, clean_last_logits) = run(Hooks::new())?;
    let (patched_loss, patched_last_logits) = run(pattern_hooks(heads, spec))?;
    tracing::info!(clean_loss, patched_loss, "pattern patch done");

    Ok(PatchOutcome {
        clean_loss,
        patched_loss,
        clean_last_logits,
        patched_last_logits,
    })
}

/// A summary of a pattern patch for `patch.json`.
#[derive(Clone, Debug, Serialize)]
pub struct PatchSummary {
    pub heads: Vec<String>,
    pub pattern: String,
    pub clean_loss: f32,
    pub patched_loss: f32,
    pub loss_delta: f32,
    pub last_position_kl: f32,
    pub clean_next_token: u32,
    pub patched_next_token: u32,
    /// Clean and patched continuations, when generation ran.
    pub continuations: Option<Continuations>,
}

/// Generated continuations of the prompt without and with the patch.
#[derive(Clone, Debug, Serialize)]
pub struct Continuations {
    pub max_new_tokens: usize,
    pub greedy: bool,
    pub clean_ids: Vec<u32>,
    pub clean_text: String,
    pub patched_ids: Vec<u32>,
    pub patched_text: String,
}

impl PatchSummary {
    /// Builds the summary of an outcome.
    pub fn new(heads: &[(usize, usize)], pattern: &PatternChoice, outcome: &PatchOutcome) -> Self {
        PatchSummary {
            heads: heads
                .iter()
                .map(|&(l, h)| crate::attention::head_name(l, h))
                .collect(),
            pattern: pattern.to_string(),
            clean_loss: outcome.clean_loss,
            patched_loss: outcome.patched_loss,
            loss_delta: outcome.loss_delta(),
            last_position_kl: outcome.last_kl(),
            clean_next_token: argmax(&outcome.clean_last_logits),
            patched_next_token: argmax(&outcome.patched_last_logits),
            continuations: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_choices_parse() {
        assert_eq!(
            "uniform".parse::<PatternChoice>().unwrap(),
            PatternChoice::Uniform
        );
        assert_eq!(
            "previous".parse::<PatternChoice>().unwrap(),
            PatternChoice::Previous
        );
        assert_eq!(
            "self".parse::<PatternChoice>().unwrap(),
            PatternChoice::SelfToken
        );
        assert_eq!(
            "position:4".parse::<PatternChoice>().unwrap(),
            PatternChoice::Position(4)
        );
        assert_eq!(
            "my/p.npy".parse::<PatternChoice>().unwrap(),
            PatternChoice::File("my/p.npy".into())
        );
    }

    #[test]
    fn run_analysis_spellings_parse() {
        assert_eq!(
            "previous-token".parse::<PatternChoice>().unwrap(),
            PatternChoice::Previous
        );
        assert_eq!(
            "first-token".parse::<PatternChoice>().unwrap(),
            PatternChoice::First
        );
    }

    #[test]
    fn position_beyond_the_prompt_is_flagged() {
        assert!(warn_position_beyond_prompt(&PatternChoice::Position(4), 4));
        assert!(!warn_position_beyond_prompt(&PatternChoice::Position(3), 4));
        assert!(!warn_position_beyond_prompt(&PatternChoice::Uniform, 4));
    }

    #[test]
    fn unknown_pattern_lists_choices() {
        let error = "diagonal".parse::<PatternChoice>().unwrap_err().to_string();

        assert!(
            error.contains("uniform, previous, first, self, position:P"),
            "{error}"
        );
    }

    #[test]
    fn bad_position_is_rejected() {
        let error = "position:-1"
            .parse::<PatternChoice>()
            .unwrap_err()
            .to_string();

        assert!(error.contains("position:3"), "{error}");
    }
}
