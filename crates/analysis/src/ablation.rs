//! Head importance by ablation: silence one query head (its `hook_z`) or one KV group (its KV
//! head's `hook_v`) and measure how a metric moves.
//!
//! Zeroing a query head's `z` silences that head alone, while its KV head keeps serving the other
//! query heads of the group. Zeroing a KV head's `v` silences every query head of its group
//! (`n_heads / n_kv_heads` of them, 7 in Qwen2.5-0.5B), and is the same as zeroing all their `z`
//! at once, because `z = pattern · v` and the pattern does not read `v`.
//!
//! The fast sweep relies on ablations in layer `l` leaving layers `0..l` untouched. It runs layers
//! `l..n_layers` only, starting from the clean run's `hook_resid_pre` of layer `l`. It also ablates
//! several heads per pass, one per copy of the prompt in a batch: copy `i` ablates head `i` through
//! an intervention scoped to batch item `i`.

use std::sync::Arc;

use serde::Serialize;

use qwenlens_model::{
    BlockHook, HookFilter, HookPoint, Hooks, HostTensor, Intervention, LogitRows, Model,
    ModelError, RunOptions, Scope, TokenBatch,
};

use crate::attention::head_name;
use crate::error::{AnalysisError, Result};
use crate::metrics::Metric;
use crate::output::{write_csv, write_json};
use crate::render::{ColorScale, Heatmap};

/// Upper bound, in bytes, on the largest activation buffer of one batched sweep pass (the logits, the
/// attention scores or the MLP activations). It stays below the 128 MiB storage-buffer binding of
/// software Vulkan (lavapipe), the smallest limit among the supported backends.
pub const DEFAULT_PASS_BUDGET_BYTES: u64 = 96 << 20;

/// Replacement of the ablated activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AblationMode {
    /// Zeros.
    Zero,
    /// The activation's mean over the prompt's positions in the same forward pass.
    Mean,
}

/// Unit that one ablation silences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AblationLevel {
    /// One query head's `hook_z`; its KV head keeps serving the rest of its group.
    Head,
    /// One KV head's `hook_v`, which silences every query head of its group.
    KvGroup,
}

/// Execution strategy of a sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SweepStrategy {
    /// Resume from the clean residual stream at the ablated layer and batch several ablations per
    /// pass.
    Fast,
    /// One full forward pass per ablation (the reference the fast sweep is tested against).
    Naive,
}

/// Options of a head-importance sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepOptions {
    pub mode: AblationMode,
    pub level: AblationLevel,
    pub metric: Metric,
    pub strategy: SweepStrategy,
    /// Layers to sweep; `None` for all.
    pub layers: Option<Vec<usize>>,
    /// Ablations per batched pass; `None` picks the most that keep the largest buffer under
    /// [`DEFAULT_PASS_BUDGET_BYTES`].
    pub batch_size: Option<usize>,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            mode: AblationMode::Zero,
            level: AblationLevel::Head,
            metric: Metric::Loss,
            strategy: SweepStrategy::Fast,
            layers: None,
            batch_size: None,
        }
    }
}

/// Effect of one ablation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeadEffect {
    pub layer: usize,
    /// Query head (level `head`) or KV head (level `kv-group`).
    pub head: usize,
    /// `L{layer}H{head}` for a query head, `L{layer}KV{head}` for a KV group.
    pub name: String,
    /// The metric on the clean run.
    pub clean: f32,
    /// The metric with this head or group ablated.
    pub ablated: f32,
    /// `ablated − clean`.
    pub delta: f32,
    /// `delta` signed so that positive means the ablation hurt (see [`Metric::importance`]).
    pub importance: f32,
}

/// Result of a sweep: one [`HeadEffect`] per layer and head (or KV group), in layer-major order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AblationReport {
    pub mode: AblationMode,
    pub level: AblationLevel,
    pub metric: Metric,
    pub strategy: SweepStrategy,
    /// The metric on the clean run.
    pub baseline: f32,
    /// Swept layers, ascending.
    pub layers: Vec<usize>,
    /// Query heads per layer (level `head`) or KV heads per layer (level `kv-group`).
    pub heads_per_layer: usize,
    /// Query heads silenced by one ablation: 1, or `n_heads / n_kv_heads` for a KV group.
    pub query_heads_per_ablation: usize,
    pub effects: Vec<HeadEffect>,
}

/// Progress of a sweep, reported after every pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepProgress {
    pub done: usize,
    pub total: usize,
}

/// Builds the intervention that ablates `head` (a query head or a KV head, by `level`) of `layer`.
///
/// Mean ablation of a KV group replaces its `hook_v` by the clean mean over positions, which
/// `clean_v` (the clean run's `blocks.{layer}.attn.hook_v`, `[1, n, n_kv_heads, d_head]`) provides.
pub fn ablation_intervention(
    layer: usize,
    head: usize,
    mode: AblationMode,
    level: AblationLevel,
    clean_v: Option<&HostTensor>,
) -> Result<Intervention> {
    match (level, mode) {
        (AblationLevel::Head, AblationMode::Zero) => Ok(Intervention::zero_head(layer, head)),
        (AblationLevel::Head, AblationMode::Mean) => {
            Ok(Intervention::mean_ablate_head(layer, head))
        }
        (AblationLevel::KvGroup, AblationMode::Zero) => Ok(Intervention::zero_kv_head(layer, head)),
        (AblationLevel::KvGroup, AblationMode::Mean) => {
            let clean_v = clean_v.ok_or_else(|| {
                AnalysisError::InvalidArgument(format!(
                    "mean ablation of KV group {head} in layer {layer} needs the clean run's hook_v"
                ))
            })?;
            Ok(Intervention::PatchFromCache {
                hook: HookPoint::block(layer, BlockHook::V),
                source: Arc::new(position_mean(clean_v)?),
                heads: Some(vec![head]),
                scope: Scope::all(),
            })
        }
    }
}

/// Replaces every position of a `[1, n, ...]` activation by its mean over the `n` positions.
fn position_mean(activation: &HostTensor) -> Result<HostTensor> {
    let (n, inner) = match activation.shape[..] {
        [1, n, ..] if n > 0 => (n, activation.numel() / n),
        _ => {
            return Err(AnalysisError::InvalidArgument(format!(
                "expected a single-sequence activation [1, pos, ...], found shape {:?}",
                activation.shape
            )));
        }
    };

    let mut mean = vec![0.0f64; inner];
    for p in 0..n {
        for (m, &x) in mean
            .iter_mut()
            .zip(&activation.data[p * inner..(p + 1) * inner])
        {
            *m += x as f64;
        }
    }
    let row: Vec<f32> = mean.iter().map(|&m| (m / n as f64) as f32).collect();
    let data = row.iter().copied().cycle().take(n * inner).collect();
    Ok(HostTensor::new(activation.shape.clone(), data)?)
}

/// Runs a head-importance sweep over one prompt. `on_progress` is called after every pass.
pub fn sweep(
    model: &Model,
    tokens: &[u32],
    options: &SweepOptions,
    mut on_progress: impl FnMut(SweepProgress),
) -> Result<AblationReport> {
    let config = model.config();
    let n_layers = config.n_layers();
    check_prompt(model, tokens, options)?;

    let layers = match &options.layers {
        Some(layers) => {
            for &layer in layers {
                if layer >= n_layers {
                    return Err(AnalysisError::LayerOutOfRange { layer, n_layers });
                }
            }
            let mut layers = layers.clone();
            layers.sort_unstable();
            layers.dedup();
            layers
        }
        None => (0..n_layers).collect(),
    };
    let heads_per_layer = match options.level {
        AblationLevel::Head => config.n_heads(),
        AblationLevel::KvGroup => config.n_kv_heads(),
    };

    let clean = clean_run(model, tokens, options, &layers)?;
    let baseline = options
        .metric
        .evaluate(clean.loss, &clean.last_logits, &clean.last_logits);
    tracing::info!(
        metric = options.metric.name(),
        baseline,
        layers = layers.len(),
        heads_per_layer,
        "clean run done"
    );

    let total = layers.len() * heads_per_layer;
    let mut values = Vec::with_capacity(total);
    let mut progress = SweepProgress { done: 0, total };

    for &layer in &layers {
        let clean_v = clean.cache_v(layer);
        let mut head = 0;
        while head < heads_per_layer {
            let chunk: Vec<usize> = match options.strategy {
                SweepStrategy::Naive => vec![head],
                SweepStrategy::Fast => {
                    let batch = options
                        .batch_size
                        .unwrap_or_else(|| auto_batch_size(model, tokens.len(), options.metric));
                    (head..(head + batch.max(1)).min(heads_per_layer)).collect()
                }
            };

            let chunk_values = match options.strategy {
                SweepStrategy::Naive => vec![naive_pass(
                    model, tokens, options, layer, chunk[0], clean_v, &clean,
                )?],
                SweepStrategy::Fast => {
                    fast_pass_with_retry(model, tokens, options, layer, &chunk, clean_v, &clean)?
                }
            };

            head += chunk.len();
            values.extend(
                chunk
                    .iter()
                    .copied()
                    .zip(chunk_values)
                    .map(|(h, v)| (layer, h, v)),
            );
            progress.done += chunk.len();
            on_progress(progress);
        }
    }

    let effects = values
        .into_iter()
        .map(|(layer, head, ablated)| {
            let delta = ablated - baseline;
            HeadEffect {
                layer,
                head,
                name: unit_name(options.level, layer, head),
                clean: baseline,
                ablated,
                delta,
                importance: options.metric.importance(delta),
            }
        })
        .collect();

    Ok(AblationReport {
        mode: options.mode,
        level: options.level,
        metric: options.metric,
        strategy: options.strategy,
        baseline,
        layers,
        heads_per_layer,
        query_heads_per_ablation: match options.level {
            AblationLevel::Head => 1,
            AblationLevel::KvGroup => config.n_heads() / config.n_kv_heads(),
        },
        effects,
    })
}

fn check_prompt(model: &Model, tokens: &[u32], options: &SweepOptions) -> Result<()> {
    if options.metric == Metric::Loss && tokens.len() < 2 {
        return Err(AnalysisError::PromptTooShort {
            tokens: tokens.len(),
            min: 2,
            what: "the loss metric",
        });
    }
    if tokens.is_empty() {
        return Err(AnalysisError::PromptTooShort {
            tokens: 0,
            min: 1,
            what: "an ablation sweep",
        });
    }

    let d_vocab = model.config().d_vocab();
    for id in options.metric.tokens() {
        if id as usize >= d_vocab {
            return Err(AnalysisError::TokenOutOfRange { id, d_vocab });
        }
    }
    if let Metric::LogitDiff { answer, wrong } = options.metric
        && answer == wrong
    {
        return Err(AnalysisError::InvalidArgument(format!(
            "the target and the distractor are the same token (id {answer}), so the logit difference is always 0; pass a different --distractor"
        )));
    }
    Ok(())
}

/// Name of an ablated unit: `L3H5` for a query head, `L3KV1` for a KV group.
pub fn unit_name(level: AblationLevel, layer: usize, head: usize) -> String {
    match level {
        AblationLevel::Head => head_name(layer, head),
        AblationLevel::KvGroup => format!("L{layer}KV{head}"),
    }
}

/// Values the sweep keeps from the clean run.
struct CleanRun {
    loss: f32,
    last_logits: Vec<f32>,
    resid_pre: Vec<Option<HostTensor>>,
    v: Vec<Option<HostTensor>>,
}

impl CleanRun {
    fn cache_v(&self, layer: usize) -> Option<&HostTensor> {
        self.v[layer].as_ref()
    }
}

fn clean_run(
    model: &Model,
    tokens: &[u32],
    options: &SweepOptions,
    layers: &[usize],
) -> Result<CleanRun> {
    let n_layers = model.config().n_layers();
    let mut points = Vec::new();
    if options.strategy == SweepStrategy::Fast {
        points.extend(
            layers
                .iter()
                .map(|&l| HookPoint::block(l, BlockHook::ResidPre)),
        );
    }
    if options.level == AblationLevel::KvGroup && options.mode == AblationMode::Mean {
        points.extend(layers.iter().map(|&l| HookPoint::block(l, BlockHook::V)));
    }

    let batch = TokenBatch::single(tokens);
    let run_options = RunOptions {
        cache: HookFilter::points(points),
        logit_rows: logit_rows(options.metric),
        ..RunOptions::default()
    };
    let mut output = model.run(&batch, &run_options)?;
    let mut cache = std::mem::take(&mut output.cache);
    let logits = output.into_logits()?;

    let loss = if options.metric == Metric::Loss {
        logits.loss(&batch)?[0]
    } else {
        f32::NAN
    };
    let last_logits = logits.last(0)?;

    let mut resid_pre = vec![None; n_layers];
    let mut v = vec![None; n_layers];
    for &layer in layers {
        resid_pre[layer] = cache.remove(HookPoint::block(layer, BlockHook::ResidPre));
        v[layer] = cache.remove(HookPoint::block(layer, BlockHook::V));
    }
    Ok(CleanRun {
        loss,
        last_logits,
        resid_pre,
        v,
    })
}

/// Picks the logit rows a metric reads: every position for the loss, else the last one.
fn logit_rows(metric: Metric) -> LogitRows {
    match metric {
        Metric::Loss => LogitRows::All,
        _ => LogitRows::Last,
    }
}

fn naive_pass(
    model: &Model,
    tokens: &[u32],
    options: &SweepOptions,
    layer: usize,
    head: usize,
    clean_v: Option<&HostTensor>,
    clean: &CleanRun,
) -> Result<f32> {
    let batch = TokenBatch::single(tokens);
    let intervention = ablation_intervention(layer, head, options.mode, options.level, clean_v)?;
    let run_options = RunOptions {
        hooks: Hooks::from_interventions(vec![intervention]),
        logit_rows: logit_rows(options.metric),
        ..RunOptions::default()
    };
    let logits = model.run(&batch, &run_options)?.into_logits()?;

    let loss = if options.metric == Metric::Loss {
        logits.loss(&batch)?[0]
    } else {
        f32::NAN
    };
    Ok(options
        .metric
        .evaluate(loss, &logits.last(0)?, &clean.last_logits))
}

/// Runs [`fast_pass`], halving the batch while the model reports that the pass would not fit.
fn fast_pass_with_retry(
    model: &Model,
    tokens: &[u32],
    options: &SweepOptions,
    layer: usize,
    heads: &[usize],
    clean_v: Option<&HostTensor>,
    clean: &CleanRun,
) -> Result<Vec<f32>> {
    match fast_pass(model, tokens, options, layer, heads, clean_v, clean) {
        Err(AnalysisError::Model(ModelError::DeviceLimit { .. })) if heads.len() > 1 => {
            let (first, second) = heads.split_at(heads.len() / 2);
            tracing::debug!(
                layer,
                batch = heads.len(),
                "sweep pass too large for the device; splitting it"
            );
            let mut values =
                fast_pass_with_retry(model, tokens, options, layer, first, clean_v, clean)?;
            values.extend(fast_pass_with_retry(
                model, tokens, options, layer, second, clean_v, clean,
            )?);
            Ok(values)
        }
        other => other,
    }
}

/// Runs one batched pass over layers `layer..n_layers`, in which copy `i` of the prompt ablates
/// `heads[i]`.
fn fast_pass(
    model: &Model,
    tokens: &[u32],
    options: &SweepOptions,
    layer: usize,
    heads: &[usize],
    clean_v: Option<&HostTensor>,
    clean: &CleanRun,
) -> Result<Vec<f32>> {
    let resid = clean.resid_pre[layer].as_ref().ok_or_else(|| {
        AnalysisError::InvalidArgument(format!(
            "the clean run recorded no blocks.{layer}.hook_resid_pre"
        ))
    })?;

    let copies = heads.len();
    let sequences = vec![tokens.to_vec(); copies];
    let batch = TokenBatch::left_padded(&sequences, 0);
    let n_rows = copies * tokens.len();
    let d_model = model.config().d_model();
    let start_resid = model
        .backend()
        .upload(&resid.data.repeat(copies), &[n_rows, d_model])
        .map_err(ModelError::from)?;

    let interventions = heads
        .iter()
        .enumerate()
        .map(|(i, &head)| {
            Ok(
                ablation_intervention(layer, head, options.mode, options.level, clean_v)?
                    .with_scope(Scope::batch_item(i)),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let run_options = RunOptions {
        hooks: Hooks::from_interventions(interventions),
        logit_rows: logit_rows(options.metric),
        start_at_layer: Some((layer, start_resid)),
        ..RunOptions::default()
    };
    let logits = model.run(&batch, &run_options)?.into_logits()?;

    let losses = if options.metric == Metric::Loss {
        logits.loss(&batch)?
    } else {
        vec![f32::NAN; copies]
    };
    let last = logits.last_rows()?;
    let d_vocab = model.config().d_vocab();

    Ok((0..copies)
        .map(|i| {
            options.metric.evaluate(
                losses[i],
                &last.data[i * d_vocab..(i + 1) * d_vocab],
                &clean.last_logits,
            )
        })
        .collect())
}

/// Returns the number of prompt copies per sweep pass that keeps the largest buffer of the pass (logits,
/// attention scores or MLP activations) under [`DEFAULT_PASS_BUDGET_BYTES`].
pub fn auto_batch_size(model: &Model, n_tokens: usize, metric: Metric) -> usize {
    let logit_rows = if metric == Metric::Loss { n_tokens } else { 1 };
    copies_per_pass(model, n_tokens, logit_rows)
}

/// Returns the number of copies of an `n_tokens` prompt per pass, each with `logit_rows` rows of
/// logits, that keeps the largest buffer under [`DEFAULT_PASS_BUDGET_BYTES`]. The result is
/// between 1 and 64.
pub fn copies_per_pass(model: &Model, n_tokens: usize, logit_rows: usize) -> usize {
    let config = model.config();
    let n = n_tokens as u64;

    let per_copy = [
        logit_rows as u64 * config.d_vocab() as u64,
        config.n_heads() as u64 * n * n,
        n * config.d_mlp() as u64,
    ]
    .into_iter()
    .max()
    .unwrap_or(1)
        * 4;

    (DEFAULT_PASS_BUDGET_BYTES / per_copy.max(1)).clamp(1, 64) as usize
}

impl AblationReport {
    /// The effects with the largest importance first, at most `k` of them.
    pub fn top(&self, k: usize) -> Vec<&HeadEffect> {
        let mut sorted: Vec<&HeadEffect> = self.effects.iter().collect();
        sorted.sort_by(|a, b| b.importance.total_cmp(&a.importance));
        sorted.truncate(k);
        sorted
    }

    /// `delta` as a `[layers.len(), heads_per_layer]` matrix.
    pub fn delta_matrix(&self) -> Vec<f32> {
        self.effects.iter().map(|e| e.delta).collect()
    }

    /// Writes `layer,head,clean,ablated,delta`, one row per ablated head or KV group.
    pub fn write_csv(&self, path: &std::path::Path) -> Result<()> {
        let rows: Vec<Vec<String>> = self
            .effects
            .iter()
            .map(|e| {
                vec![
                    e.layer.to_string(),
                    e.head.to_string(),
                    e.clean.to_string(),
                    e.ablated.to_string(),
                    e.delta.to_string(),
                ]
            })
            .collect();
        write_csv(path, &["layer", "head", "clean", "ablated", "delta"], &rows)
    }

    /// Writes the full report with the 10 most important heads.
    pub fn write_json(&self, path: &std::path::Path) -> Result<()> {
        #[derive(Serialize)]
        struct Document<'a> {
            #[serde(flatten)]
            report: &'a AblationReport,
            what_was_ablated: String,
            top_heads: Vec<&'a HeadEffect>,
        }

        let what_was_ablated = match (self.level, self.mode) {
            (AblationLevel::Head, AblationMode::Zero) => "each query head's attn.hook_z set to zero; its KV head still serves the other heads of its group".to_string(),
            (AblationLevel::Head, AblationMode::Mean) => "each query head's attn.hook_z replaced by its mean over the prompt's positions; its KV head still serves the other heads of its group".to_string(),
            (AblationLevel::KvGroup, AblationMode::Zero) => format!("each KV head's attn.hook_v set to zero, silencing the {} query heads of its group", self.query_heads_per_ablation),
            (AblationLevel::KvGroup, AblationMode::Mean) => format!("each KV head's attn.hook_v replaced by its mean over the prompt's positions, for all {} query heads of its group", self.query_heads_per_ablation),
        };
        write_json(
            path,
            &Document {
                report: self,
                what_was_ablated,
                top_heads: self.top(10),
            },
        )
    }

    /// A `[layers × heads]` heatmap of `delta` on a diverging scale.
    pub fn heatmap(&self) -> Heatmap {
        let deltas = self.delta_matrix();
        let unit = match self.level {
            AblationLevel::Head => "query head",
            AblationLevel::KvGroup => "KV head (group)",
        };
        let title = format!(
            "{} ablation ({}): Δ {} (baseline {:.4})",
            match self.mode {
                AblationMode::Zero => "zero",
                AblationMode::Mean => "mean",
            },
            match self.level {
                AblationLevel::Head => "per head",
                AblationLevel::KvGroup => "per KV group",
            },
            self.metric.name(),
            self.baseline
        );
        Heatmap::new(
            title,
            self.layers.len(),
            self.heads_per_layer,
            deltas.clone(),
            ColorScale::diverging_for(&deltas),
        )
        .with_axes(
            "layer",
            self.layers.iter().map(|l| l.to_string()).collect(),
            unit,
            (0..self.heads_per_layer).map(|h| h.to_string()).collect(),
        )
    }
}
