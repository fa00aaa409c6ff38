//! `qwenlens cache`: one forward pass, chosen activations saved to a safetensors file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use qwenlens_model::{BlockHook, HookFilter, HookPoint, LogitRows, RunOptions, TokenBatch};

use crate::common::{ModelArgs, PromptOrIdsArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptOrIdsArgs,

    /// Regular expression selecting hook names, TransformerLens strings such as
    /// `blocks.0.attn.hook_pattern`. It matches anywhere in the name, so anchor it with ^ and $ for
    /// an exact match [default: the hooks TransformerLens caches by default, all but
    /// attn.hook_result].
    #[arg(long, value_name = "REGEX")]
    pub names: Option<String>,

    /// Output safetensors file, one tensor per hook name, float32, batch dimension of 1 kept.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Largest output file to write, in bytes; the size is estimated before the run and a larger
    /// cache is rejected (it also needs about that much memory).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BYTES)]
    pub max_bytes: u64,
}

/// 2 GB: the default --names on Qwen2.5-0.5B write about this much for a prompt of 300 tokens.
const DEFAULT_MAX_BYTES: u64 = 2_000_000_000;

pub fn run(args: Args) -> anyhow::Result<()> {
    check_output_folder(&args.out)?;

    let model = crate::common::load_model(&args.model)?;
    let n_layers = model.config().n_layers();
    let points = selected_points(args.names.as_deref(), n_layers)?;

    let prompt_ids = crate::common::prompt_or_ids(&model, &args.prompt)?;
    check_size(&model, &points, prompt_ids.len(), args.max_bytes)?;
    tracing::info!(
        tokens = prompt_ids.len(),
        hooks = points.len(),
        "caching activations"
    );

    // Only the activations are saved, so no logits are computed.
    let options = RunOptions {
        cache: HookFilter::points(points),
        logit_rows: LogitRows::None,
        ..RunOptions::default()
    };
    let cache = model.run(&TokenBatch::single(&prompt_ids), &options)?.cache;
    cache
        .save_safetensors(&args.out)
        .with_context(|| format!("saving the activation cache to {}", args.out.display()))?;

    let bytes = std::fs::metadata(&args.out)
        .with_context(|| format!("reading the size of {}", args.out.display()))?
        .len();
    let count = cache.len();
    let noun = if count == 1 {
        "activation"
    } else {
        "activations"
    };
    println!(
        "wrote {count} {noun} ({bytes} bytes) to {}",
        args.out.display()
    );
    Ok(())
}

/// Checks, before the model is loaded, that the output path is a file in an existing folder.
fn check_output_folder(out: &Path) -> anyhow::Result<()> {
    let folder = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };

    if !folder.is_dir() {
        anyhow::bail!(
            "output folder {} does not exist; create it or choose another --out path",
            folder.display()
        );
    }
    if out.is_dir() {
        anyhow::bail!(
            "--out {} is a folder; give a file path such as cache.safetensors",
            out.display()
        );
    }
    qwenlens_model::output_target(out).context("checking --out")?;
    Ok(())
}

/// Rejects a cache whose file would be larger than `max_bytes`, before anything runs.
fn check_size(
    model: &qwenlens_model::Model,
    points: &[HookPoint],
    n_tokens: usize,
    max_bytes: u64,
) -> anyhow::Result<()> {
    let config = model.config();
    let bytes = points
        .iter()
        .map(|point| point.numel(config, 1, n_tokens).saturating_mul(4))
        .fold(0u64, u64::saturating_add);
    tracing::info!(bytes, "estimated activation cache size");

    if bytes > max_bytes {
        anyhow::bail!(
            "the {} selected activations of {n_tokens} tokens would take about {bytes} bytes \
             ({:.1} GB) on disk and in memory, above --max-bytes {max_bytes}; select fewer hooks \
             with --names, shorten the prompt, or raise --max-bytes",
            points.len(),
            bytes as f64 / 1e9
        );
    }
    Ok(())
}

/// Selects the hook points whose names `pattern` matches, or without a pattern those that
/// TransformerLens records by default (all but `attn.hook_result`).
fn selected_points(pattern: Option<&str>, n_layers: usize) -> anyhow::Result<Vec<HookPoint>> {
    let Some(pattern) = pattern else {
        return Ok(HookPoint::defaults(n_layers));
    };

    let selected = HookFilter::regex(pattern)?.selected(n_layers);
    if selected.is_empty() {
        let examples = [
            HookPoint::Embed,
            HookPoint::block(0, BlockHook::Pattern),
            HookPoint::block(0, BlockHook::Z),
            HookPoint::block(n_layers.saturating_sub(1), BlockHook::ResidPost),
            HookPoint::UnembedIn,
        ];
        let examples: Vec<String> = examples.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "--names `{pattern}` matches no hook point; valid names include {}",
            examples.join(", ")
        );
    }
    Ok(selected)
}
