//! The logit lens and direct logit attribution.
//!
//! Logit lens: each layer's residual stream goes through `ln_final` (each position divided by its
//! own RMS scale, then multiplied by the final norm weight) and the unembedding, as if the model
//! stopped there. The rows are `hook_resid_pre` of every block and, last, the final
//! `hook_resid_post`, whose lens logits are the model's logits.
//!
//! Direct logit attribution: the final residual stream at the last position is the sum of the
//! embedding, every head's `hook_result` and every `hook_mlp_out` (Qwen2 has no attention-output
//! or MLP bias). With the final scale `s` (`ln_final.hook_scale` at that position) frozen, the
//! target's logit is linear in that sum, so each component contributes
//! `component · (w ⊙ W_U[target]) / s`, `w` being the final RMSNorm weight, and the contributions
//! add up to the target's logit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use qwenlens_model::{
    BlockHook, HookFilter, HookPoint, LogitRows, Model, ModelError, RunOptions, TokenBatch,
};

use crate::attention_report::token_texts;
use crate::error::{AnalysisError, Result};
use crate::metrics::{argmax, log_softmax, rank_of, top_k};
use crate::output::{check_output_paths, write_json, write_png};
use crate::render::{ColorScale, Heatmap};
use crate::tokens::{DEFAULT_LABEL_WIDTH, position_labels, token_label};

/// A token with its lens logit and probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenScore {
    pub id: u32,
    pub text: String,
    pub logit: f32,
    pub prob: f32,
}

/// The lens at one residual-stream snapshot, at the last position.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LensLayer {
    /// Hook name of the snapshot (`blocks.3.hook_resid_pre`, or the last block's `hook_resid_post`).
    pub hook: String,
    pub top_tokens: Vec<TokenScore>,
    /// 0 when the target is the top token.
    pub target_rank: usize,
    pub target_logprob: f32,
}

/// One component's direct contribution to the target's logit at the last position.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attribution {
    /// `embed`, `L3H5` or `L3 MLP`.
    pub component: String,
    pub layer: Option<usize>,
    pub head: Option<usize>,
    pub contribution: f32,
}

/// Result of [`logit_lens`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogitLensReport {
    pub tokens: Vec<u32>,
    pub token_texts: Vec<String>,
    pub target: u32,
    pub target_text: String,
    /// The model's logit of the target at the last position.
    pub target_logit: f32,
    /// One entry per snapshot: `n_layers` `hook_resid_pre` and the final `hook_resid_post`.
    pub layers: Vec<LensLayer>,
    /// `[n_layers + 1, n]`: at each snapshot and position, the lens probability of the token that the
    /// full model predicts at that position.
    pub prediction_probs: Vec<f32>,
    /// The full model's greedy prediction at each position.
    pub predictions: Vec<u32>,
    /// Embedding, then per layer its heads and its MLP.
    pub attributions: Vec<Attribution>,
    /// Sum of all contributions; equals `target_logit` up to float rounding.
    pub attribution_total: f32,
    pub n_layers: usize,
    pub n_heads: usize,
}

/// Maximum number of tokens listed per layer. Each listed token is decoded on its own, which costs
/// tens of milliseconds with a full-size vocabulary, so longer lists make the lens slow.
pub const MAX_TOP: usize = 100;

/// Runs the logit lens and the direct logit attribution for `target` (default: the model's greedy
/// next token after the prompt), listing `top` tokens per layer.
pub fn logit_lens(
    model: &Model,
    tokens: &[u32],
    target: Option<u32>,
    top: usize,
) -> Result<LogitLensReport> {
    let config = model.config();
    let (n_layers, n_heads, d_vocab) = (config.n_layers(), config.n_heads(), config.d_vocab());
    let n = tokens.len();
    if n == 0 {
        return Err(AnalysisError::PromptTooShort {
            tokens: 0,
            min: 1,
            what: "the logit lens",
        });
    }
    if top == 0 || top > MAX_TOP {
        return Err(AnalysisError::InvalidArgument(format!(
            "--top {top} is out of range: list between 1 and {MAX_TOP} tokens per layer"
        )));
    }
    if let Some(id) = target
        && id as usize >= d_vocab
    {
        return Err(AnalysisError::TokenOutOfRange { id, d_vocab });
    }

    let final_point = HookPoint::block(n_layers - 1, BlockHook::ResidPost);
    let mut points = vec![HookPoint::Embed, HookPoint::LnFinalScale, final_point];
    for layer in 0..n_layers {
        points.push(HookPoint::block(layer, BlockHook::ResidPre));
        points.push(HookPoint::block(layer, BlockHook::Result));
        points.push(HookPoint::block(layer, BlockHook::MlpOut));
    }
    let run_options = RunOptions {
        cache: HookFilter::points(points),
        logit_rows: LogitRows::Last,
        ..RunOptions::default()
    };
    let mut output = model.run(&TokenBatch::single(tokens), &run_options)?;
    let cache = std::mem::take(&mut output.cache);
    let last_logits = output.into_logits()?.last(0)?;
    let target = target.unwrap_or_else(|| argmax(&last_logits));

    let texts = token_texts(model, tokens);
    // Layers share most of their top tokens, so each id is decoded once.
    let mut decoded: HashMap<u32, String> = HashMap::new();
    let mut decode = |id: u32| {
        decoded
            .entry(id)
            .or_insert_with(|| token_texts(model, &[id]).remove(0))
            .clone()
    };

    let mut snapshots: Vec<HookPoint> = (0..n_layers)
        .map(|l| HookPoint::block(l, BlockHook::ResidPre))
        .collect();
    snapshots.push(final_point);

    // The final snapshot's lens logits are the model's logits, whose argmax at each position is the
    // prediction that every snapshot is scored on.
    let mut predictions = Vec::with_capacity(n);
    lens_rows(model, cache.require(final_point)?, |_, row| {
        predictions.push(argmax(row));
    })?;

    let mut layers = Vec::with_capacity(snapshots.len());
    let mut prediction_probs = Vec::with_capacity(snapshots.len() * n);
    for &point in &snapshots {
        let mut last = Vec::new();
        lens_rows(model, cache.require(point)?, |p, row| {
            prediction_probs.push(crate::metrics::log_prob(row, predictions[p]).exp());
            if p == n - 1 {
                last = row.to_vec();
            }
        })?;

        let logprobs = log_softmax(&last);
        layers.push(LensLayer {
            hook: point.to_string(),
            top_tokens: top_k(&last, top)
                .into_iter()
                .map(|id| TokenScore {
                    id,
                    text: decode(id),
                    logit: last[id as usize],
                    prob: logprobs[id as usize].exp(),
                })
                .collect(),
            target_rank: rank_of(&last, target),
            target_logprob: logprobs[target as usize],
        });
    }

    let attributions = direct_logit_attribution(model, &cache, n, target)?;
    let attribution_total = attributions
        .iter()
        .map(|a| a.contribution as f64)
        .sum::<f64>() as f32;

    Ok(LogitLensReport {
        tokens: tokens.to_vec(),
        token_texts: texts,
        target,
        target_text: decode(target),
        target_logit: last_logits[target as usize],
        layers,
        prediction_probs,
        predictions,
        attributions,
        attribution_total,
        n_layers,
        n_heads,
    })
}

/// Largest lens logit block read back at once, in bytes. It keeps a long prompt's `[n, d_vocab]`
/// logits within the 128 MiB storage-buffer binding of software Vulkan (lavapipe).
const LENS_CHUNK_BYTES: usize = 64 << 20;

/// Puts a `[1, n, d_model]` residual stream through `ln_final` and the unembedding in chunks of
/// positions, calling `visit(position, logits_row)` for every position in order.
fn lens_rows(
    model: &Model,
    resid: &qwenlens_model::HostTensor,
    mut visit: impl FnMut(usize, &[f32]),
) -> Result<()> {
    let d_model = model.config().d_model();
    let d_vocab = model.config().d_vocab();
    let n = resid.numel() / d_model;
    let chunk_rows = (LENS_CHUNK_BYTES / (d_vocab * 4)).max(1);

    for start in (0..n).step_by(chunk_rows) {
        let rows = chunk_rows.min(n - start);
        let device = model
            .backend()
            .upload(
                &resid.data[start * d_model..(start + rows) * d_model],
                &[rows, d_model],
            )
            .map_err(ModelError::from)?;
        let logits = model
            .backend()
            .read(&model.unembed(&device)?)
            .map_err(ModelError::from)?;
        for (offset, row) in logits.chunks_exact(d_vocab).enumerate() {
            visit(start + offset, row);
        }
    }
    Ok(())
}

fn direct_logit_attribution(
    model: &Model,
    cache: &qwenlens_model::ActivationCache,
    n: usize,
    target: u32,
) -> Result<Vec<Attribution>> {
    let config = model.config();
    let (n_layers, n_heads, d_model) = (config.n_layers(), config.n_heads(), config.d_model());
    let last = n - 1;

    let unembedding = model.unembedding_rows(&[target])?;
    let scale = cache.require(HookPoint::LnFinalScale)?.data[last];
    let direction: Vec<f64> = unembedding
        .data
        .iter()
        .zip(model.final_norm_weight())
        .map(|(&u, &w)| u as f64 * w as f64 / scale as f64)
        .collect();
    let project = |x: &[f32]| -> f32 {
        x.iter()
            .zip(&direction)
            .map(|(&a, &b)| a as f64 * b)
            .sum::<f64>() as f32
    };

    let embed = cache.require(HookPoint::Embed)?;
    let mut attributions = vec![Attribution {
        component: "embed".to_string(),
        layer: None,
        head: None,
        contribution: project(&embed.data[last * d_model..(last + 1) * d_model]),
    }];

    for layer in 0..n_layers {
        // hook_result is [1, n, n_heads, d_model].
        let result = cache.require(HookPoint::block(layer, BlockHook::Result))?;
        for head in 0..n_heads {
            let offset = (last * n_heads + head) * d_model;
            attributions.push(Attribution {
                component: crate::attention::head_name(layer, head),
                layer: Some(layer),
                head: Some(head),
                contribution: project(&result.data[offset..offset + d_model]),
            });
        }

        let mlp = cache.require(HookPoint::block(layer, BlockHook::MlpOut))?;
        attributions.push(Attribution {
            component: format!("L{layer} MLP"),
            layer: Some(layer),
            head: None,
            contribution: project(&mlp.data[last * d_model..(last + 1) * d_model]),
        });
    }

    Ok(attributions)
}

impl LogitLensReport {
    /// Heatmap of `prediction_probs`: snapshots down, positions across.
    pub fn lens_heatmap(&self) -> Heatmap {
        let n = self.tokens.len();
        let rows: Vec<String> = (0..self.n_layers)
            .map(|l| format!("pre {l}"))
            .chain(["final".to_string()])
            .collect();
        Heatmap::new(
            "logit lens: probability of the model's final prediction",
            self.n_layers + 1,
            n,
            self.prediction_probs.clone(),
            ColorScale::Sequential { min: 0.0, max: 1.0 },
        )
        .with_axes(
            "residual stream",
            rows,
            "position (token)",
            position_labels(&self.token_texts, DEFAULT_LABEL_WIDTH),
        )
    }

    /// Heatmap of the head and MLP contributions, `[n_layers, n_heads + 1]`, the last column being
    /// the MLP.
    pub fn attribution_heatmap(&self) -> Heatmap {
        let cols = self.n_heads + 1;
        let mut values = vec![0.0; self.n_layers * cols];
        for attribution in &self.attributions {
            if let Some(layer) = attribution.layer {
                let col = attribution.head.unwrap_or(self.n_heads);
                values[layer * cols + col] = attribution.contribution;
            }
        }
        let embed = self.attributions.first().map_or(0.0, |a| a.contribution);
        let title = format!(
            "direct logit attribution to {} (logit {:.3}, embed {:.3})",
            token_label(&self.target_text, DEFAULT_LABEL_WIDTH),
            self.target_logit,
            embed
        );
        let col_labels = (0..self.n_heads)
            .map(|h| format!("H{h}"))
            .chain(["MLP".to_string()])
            .collect();

        Heatmap::new(
            title,
            self.n_layers,
            cols,
            values.clone(),
            ColorScale::diverging_for(&values),
        )
        .with_axes(
            "layer",
            (0..self.n_layers).map(|l| l.to_string()).collect(),
            "component",
            col_labels,
        )
    }

    /// Writes `logit_lens.json`, `logit_lens.png` and `dla.png` into `dir`; returns the paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let json = dir.join("logit_lens.json");
        let lens = dir.join("logit_lens.png");
        let dla = dir.join("dla.png");
        check_output_paths(&[&json, &lens, &dla])?;

        write_json(&json, self)?;
        write_png(&lens, &self.lens_heatmap().render())?;
        write_png(&dla, &self.attribution_heatmap().render())?;
        Ok(vec![json, lens, dla])
    }
}
