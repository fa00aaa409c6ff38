//! `qwenlens cache`: one forward pass, chosen activations saved to a safetensors file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use qwenlens_model::{BlockHook, HookFilter, HookPoint, LogitRows, RunOptions, TokenBatch};

use crate::common::{ModelArgs, PromptArgs};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(false)))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Raw prompt text, tokenized without a chat template.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,

    /// JSON file with a list of {"role", "content"} messages, formatted with the model's chat template.
    #[arg(long, group = "input")]
    pub chat: Option<PathBuf>,

    /// Token ids separated by commas, e.g. 785,3974,13876.
    #[arg(long, group = "input", value_delimiter = ',', num_args = 1..)]
    pub ids: Option<Vec<u32>>,

    /// Regular expression selecting hook names, TransformerLens strings such as
    /// `blocks.0.attn.hook_pattern`. It matches anywhere in the name, so anchor it with ^ and $ for
    /// an exact match [default: the hooks TransformerLens caches by default, all but
    /// attn.hook_result].
    #[arg(long, value_name = "REGEX")]
    pub names: Option<String>,

    /// Output safetensors file, one tensor per hook name, float32, batch dimension of 1 kept.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_output_folder(&args.out)?;

    let model = crate::common::load_model(&args.model)?;
    let n_layers = model.config().n_layers();
    let points = selected_points(args.names.as_deref(), n_layers)?;

    let prompt_ids = match &args.ids {
        Some(ids) => ids.clone(),
        None => {
            let prompt = PromptArgs {
                prompt: args.prompt.clone(),
                chat: args.chat.clone(),
            };
            crate::common::prompt_ids(&model, &prompt)?
        }
    };
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
    println!(
        "wrote {} activations ({bytes} bytes) to {}",
        cache.len(),
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
