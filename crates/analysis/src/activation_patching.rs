//! Activation patching between a clean and a corrupted prompt of equal token length. Each patch
//! copies one clean activation (one layer and position, or one layer and head) into the corrupted
//! run, and its score measures how much of the clean logit difference comes back.
//!
//! The score is `(patched − corrupted) / (clean − corrupted)` on the logit difference
//! `logits[answer] − logits[wrong]` at the last position: 1 when the patch restores the clean
//! behaviour fully, 0 when it changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use qwenlens_model::{
    BlockHook, HookFilter, HookPoint, Hooks, HostTensor, Intervention, LogitRows, Model,
    ModelError, RunOptions, Scope, TokenBatch,
};

use crate::error::{AnalysisError, Result};
use crate::metrics::logit_difference;
use crate::output::{check_output_paths, write_json, write_png};
use crate::render::{ColorScale, Heatmap};
use crate::tokens::{DEFAULT_LABEL_WIDTH, position_labels};

/// Activation that a patch copies from the clean run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchTarget {
    /// `blocks.L.hook_resid_pre`, one layer and position at a time.
    ResidPre,
    /// `blocks.L.hook_attn_out`, one layer and position at a time.
    AttnOut,
    /// `blocks.L.hook_mlp_out`, one layer and position at a time.
    MlpOut,
    /// `blocks.L.attn.hook_z` of one query head, all positions.
    HeadZ,
}

impl PatchTarget {
    /// Every target, in the order the report lists them.
    pub const ALL: [PatchTarget; 4] = [
        PatchTarget::ResidPre,
        PatchTarget::AttnOut,
        PatchTarget::MlpOut,
        PatchTarget::HeadZ,
    ];

    /// Short name used for files (`resid_pre.png`).
    pub fn name(self) -> &'static str {
        match self {
            PatchTarget::ResidPre => "resid_pre",
            PatchTarget::AttnOut => "attn_out",
            PatchTarget::MlpOut => "mlp_out",
            PatchTarget::HeadZ => "head_z",
        }
    }

    fn block_hook(self) -> BlockHook {
        match self {
            PatchTarget::ResidPre => BlockHook::ResidPre,
            PatchTarget::AttnOut => BlockHook::AttnOut,
            PatchTarget::MlpOut => BlockHook::MlpOut,
            PatchTarget::HeadZ => BlockHook::Z,
        }
    }
}

/// Options of [`activation_patching`].
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationPatchOptions {
    /// Token whose logit the clean prompt favours.
    pub answer: u32,
    /// Token whose logit the corrupted prompt favours.
    pub wrong: u32,
    pub targets: Vec<PatchTarget>,
    /// Patched runs per batched pass; `None` picks the most that keep the largest buffer under
    /// [`crate::ablation::DEFAULT_PASS_BUDGET_BYTES`].
    pub batch_size: Option<usize>,
}

/// Scores of one target: a `[n_layers, cols]` matrix, `cols` being positions or query heads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PatchGrid {
    pub target: PatchTarget,
    pub rows: usize,
    pub cols: usize,
    /// Normalized scores, row-major.
    pub normalized: Vec<f32>,
    /// Patched logit differences, row-major.
    pub logit_diff: Vec<f32>,
}

/// Result of [`activation_patching`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivationPatchReport {
    pub clean_tokens: Vec<u32>,
    pub corrupted_tokens: Vec<u32>,
    pub clean_texts: Vec<String>,
    pub corrupted_texts: Vec<String>,
    pub answer: u32,
    pub wrong: u32,
    pub clean_logit_diff: f32,
    pub corrupted_logit_diff: f32,
    pub grids: Vec<PatchGrid>,
}

/// Progress of the patching runs, reported after every pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchProgress {
    pub done: usize,
    pub total: usize,
}

/// One patched run: the target, its layer and the position or head.
#[derive(Clone, Copy, Debug)]
struct Job {
    target: PatchTarget,
    layer: usize,
    index: usize,
}

/// Runs every patch of `options.targets` and scores it.
pub fn activation_patching(
    model: &Model,
    clean: &[u32],
    corrupted: &[u32],
    options: &ActivationPatchOptions,
    mut on_progress: impl FnMut(PatchProgress),
) -> Result<ActivationPatchReport> {
    if clean.len() != corrupted.len() {
        return Err(AnalysisError::LengthMismatch {
            clean: clean.len(),
            corrupted: corrupted.len(),
        });
    }
    if clean.is_empty() {
        return Err(AnalysisError::PromptTooShort {
            tokens: 0,
            min: 1,
            what: "activation patching",
        });
    }
    let d_vocab = model.config().d_vocab();
    for id in [options.answer, options.wrong] {
        if id as usize >= d_vocab {
            return Err(AnalysisError::TokenOutOfRange { id, d_vocab });
        }
    }
    if options.answer == options.wrong {
        return Err(AnalysisError::InvalidArgument(format!(
            "the answer and the wrong token are the same token (id {}), so their logit difference is always 0; pass a different --wrong token",
            options.answer
        )));
    }

    let n_layers = model.config().n_layers();
    let n_heads = model.config().n_heads();
    let n = clean.len();

    let points: Vec<HookPoint> = options
        .targets
        .iter()
        .flat_map(|t| (0..n_layers).map(move |l| HookPoint::block(l, t.block_hook())))
        .collect();
    let clean_batch = TokenBatch::single(clean);
    let clean_options = RunOptions {
        cache: HookFilter::points(points),
        logit_rows: LogitRows::Last,
        ..RunOptions::default()
    };
    let mut clean_output = model.run(&clean_batch, &clean_options)?;
    let clean_cache = std::mem::take(&mut clean_output.cache);
    let clean_last = clean_output.into_logits()?.last(0)?;
    let clean_logit_diff = logit_difference(&clean_last, options.answer, options.wrong);

    // The corrupted residual stream entering each layer lets every patched run start at its
    // patch's layer, because the layers before it see no difference from the corrupted run.
    let corrupted_options = RunOptions {
        cache: HookFilter::points((0..n_layers).map(|l| HookPoint::block(l, BlockHook::ResidPre))),
        logit_rows: LogitRows::Last,
        ..RunOptions::default()
    };
    let mut corrupted_output = model.run(&TokenBatch::single(corrupted), &corrupted_options)?;
    let corrupted_cache = std::mem::take(&mut corrupted_output.cache);
    let corrupted_last = corrupted_output.into_logits()?.last(0)?;
    let corrupted_logit_diff = logit_difference(&corrupted_last, options.answer, options.wrong);
    let corrupted_resid = (0..n_layers)
        .map(|l| {
            Ok(corrupted_cache
                .require(HookPoint::block(l, BlockHook::ResidPre))?
                .clone())
        })
        .collect::<Result<Vec<HostTensor>>>()?;

    let denominator = clean_logit_diff - corrupted_logit_diff;
    if denominator.abs() < 1e-6 {
        return Err(AnalysisError::InvalidArgument(format!(
            "the clean and corrupted prompts give the same logit difference ({clean_logit_diff}) between the answer and the wrong token, so no patch can be scored; choose prompts that favour different tokens"
        )));
    }
    tracing::info!(
        clean_logit_diff,
        corrupted_logit_diff,
        "clean and corrupted runs done"
    );

    let mut sources = HashMap::new();
    for (point, tensor) in clean_cache.iter() {
        sources.insert(point, Arc::new(tensor.clone()));
    }

    let mut jobs = Vec::new();
    for &target in &options.targets {
        let cols = if target == PatchTarget::HeadZ {
            n_heads
        } else {
            n
        };
        for layer in 0..n_layers {
            jobs.extend((0..cols).map(|index| Job {
                target,
                layer,
                index,
            }));
        }
    }

    let batch_size = options
        .batch_size
        .unwrap_or_else(|| crate::ablation::copies_per_pass(model, n, 1))
        .max(1);
    let mut diffs = vec![f32::NAN; jobs.len()];
    let mut progress = PatchProgress {
        done: 0,
        total: jobs.len(),
    };
    // Passes hold jobs of one layer each, so that they can all start at that layer.
    for (layer, start_resid) in corrupted_resid.iter().enumerate() {
        let indices: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].layer == layer)
            .collect();
        for chunk in indices.chunks(batch_size) {
            let chunk_jobs: Vec<Job> = chunk.iter().map(|&i| jobs[i]).collect();
            let context = PassContext {
                model,
                corrupted,
                start_resid,
                sources: &sources,
                options,
            };
            let values = patched_pass(&context, layer, &chunk_jobs)?;
            for (&i, value) in chunk.iter().zip(values) {
                diffs[i] = value;
            }
            progress.done += chunk.len();
            on_progress(progress);
        }
    }

    let mut grids = Vec::new();
    let mut offset = 0;
    for &target in &options.targets {
        let cols = if target == PatchTarget::HeadZ {
            n_heads
        } else {
            n
        };
        let logit_diff = diffs[offset..offset + n_layers * cols].to_vec();
        offset += n_layers * cols;
        grids.push(PatchGrid {
            target,
            rows: n_layers,
            cols,
            normalized: logit_diff
                .iter()
                .map(|d| (d - corrupted_logit_diff) / denominator)
                .collect(),
            logit_diff,
        });
    }

    let texts = |tokens: &[u32]| crate::attention_report::token_texts(model, tokens);
    Ok(ActivationPatchReport {
        clean_tokens: clean.to_vec(),
        corrupted_tokens: corrupted.to_vec(),
        clean_texts: texts(clean),
        corrupted_texts: texts(corrupted),
        answer: options.answer,
        wrong: options.wrong,
        clean_logit_diff,
        corrupted_logit_diff,
        grids,
    })
}

/// Inputs shared by every patched pass.
struct PassContext<'a> {
    model: &'a Model,
    corrupted: &'a [u32],
    /// The corrupted run's `hook_resid_pre` of the pass's layer, `[1, n, d_model]`.
    start_resid: &'a HostTensor,
    sources: &'a HashMap<HookPoint, Arc<HostTensor>>,
    options: &'a ActivationPatchOptions,
}

/// Runs one batch of patched corrupted runs of one layer, starting at that layer, and returns each
/// run's logit difference. A batch that the model reports as too large for the device is split in
/// two.
fn patched_pass(context: &PassContext<'_>, layer: usize, jobs: &[Job]) -> Result<Vec<f32>> {
    let model = context.model;
    let n = context.corrupted.len();
    let d_model = model.config().d_model();

    // A resid_pre patch replaces one row of the starting residual stream; the other targets patch
    // their hook inside the layer through an intervention on their batch item.
    let mut start = Vec::with_capacity(jobs.len() * n * d_model);
    let mut interventions = Vec::new();
    for (item, job) in jobs.iter().enumerate() {
        let point = HookPoint::block(layer, job.target.block_hook());
        let source = context.sources.get(&point).ok_or_else(|| {
            AnalysisError::InvalidArgument(format!("the clean run recorded no {point}"))
        })?;

        let mut resid = context.start_resid.data.clone();
        match job.target {
            PatchTarget::ResidPre => {
                let row = job.index * d_model..(job.index + 1) * d_model;
                resid[row.clone()].copy_from_slice(&source.data[row]);
            }
            PatchTarget::AttnOut | PatchTarget::MlpOut => {
                interventions.push(Intervention::PatchFromCache {
                    hook: point,
                    source: Arc::clone(source),
                    heads: None,
                    scope: Scope::batch_item(item).with_positions(vec![job.index]),
                })
            }
            PatchTarget::HeadZ => interventions.push(Intervention::PatchFromCache {
                hook: point,
                source: Arc::clone(source),
                heads: Some(vec![job.index]),
                scope: Scope::batch_item(item),
            }),
        }
        start.extend(resid);
    }

    let start_tensor = model
        .backend()
        .upload(&start, &[jobs.len() * n, d_model])
        .map_err(ModelError::from)?;
    let batch = TokenBatch::left_padded(&vec![context.corrupted.to_vec(); jobs.len()], 0);
    let run_options = RunOptions {
        hooks: Hooks::from_interventions(interventions),
        logit_rows: LogitRows::Last,
        start_at_layer: Some((layer, start_tensor)),
        ..RunOptions::default()
    };

    match model.run(&batch, &run_options) {
        Err(ModelError::DeviceLimit { .. }) if jobs.len() > 1 => {
            let (first, second) = jobs.split_at(jobs.len() / 2);
            let mut diffs = patched_pass(context, layer, first)?;
            diffs.extend(patched_pass(context, layer, second)?);
            Ok(diffs)
        }
        Err(error) => Err(error.into()),
        Ok(output) => {
            let last = output.into_logits()?.last_rows()?;
            let d_vocab = last.shape[1];
            let (answer, wrong) = (context.options.answer, context.options.wrong);
            Ok((0..jobs.len())
                .map(|i| {
                    logit_difference(&last.data[i * d_vocab..(i + 1) * d_vocab], answer, wrong)
                })
                .collect())
        }
    }
}

impl ActivationPatchReport {
    /// Heatmap of one grid's normalized scores.
    pub fn heatmap(&self, grid: &PatchGrid) -> Heatmap {
        let limit = grid
            .normalized
            .iter()
            .filter(|v| v.is_finite())
            .fold(1.0f32, |acc, v| acc.max(v.abs()));
        let title = format!(
            "activation patching: {} (normalized logit diff; clean {:.3}, corrupted {:.3})",
            grid.target.name(),
            self.clean_logit_diff,
            self.corrupted_logit_diff
        );
        let (col_axis, col_labels) = match grid.target {
            PatchTarget::HeadZ => (
                "query head",
                (0..grid.cols).map(|h| format!("H{h}")).collect(),
            ),
            _ => (
                "position (clean token)",
                position_labels(&self.clean_texts, DEFAULT_LABEL_WIDTH),
            ),
        };

        Heatmap::new(
            title,
            grid.rows,
            grid.cols,
            grid.normalized.clone(),
            ColorScale::Diverging { limit },
        )
        .with_axes(
            "layer",
            (0..grid.rows).map(|l| l.to_string()).collect(),
            col_axis,
            col_labels,
        )
    }

    /// Writes `activation_patching.json` and one `{target}.png` per grid into `dir`; returns the
    /// paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();

        let json = dir.join("activation_patching.json");
        let mut paths = vec![json.clone()];
        paths.extend(
            self.grids
                .iter()
                .map(|grid| dir.join(format!("{}.png", grid.target.name()))),
        );
        check_output_paths(&paths)?;

        write_json(&json, self)?;
        written.push(json);

        for grid in &self.grids {
            let path = dir.join(format!("{}.png", grid.target.name()));
            write_png(&path, &self.heatmap(grid).render())?;
            written.push(path);
        }
        Ok(written)
    }
}
