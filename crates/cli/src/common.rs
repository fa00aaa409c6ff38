//! Options and helpers shared by the subcommands.

use std::path::PathBuf;

/// Where the model comes from and which backend runs it.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model folder (config.json, safetensors, tokenizer.json) or Hugging Face hub id such as
    /// Qwen/Qwen2.5-0.5B-Instruct.
    #[arg(long)]
    pub model: String,

    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Backend: auto (a real GPU if present, else the CPU), gpu (WGSL through wgpu) or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// The prompt, given as text, a chat file or token ids.
#[derive(clap::Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Raw prompt text, tokenized without a chat template.
    #[arg(long)]
    pub prompt: Option<String>,

    /// JSON file with a list of {"role", "content"} messages, formatted with the model's chat template.
    #[arg(long)]
    pub chat: Option<PathBuf>,
}

/// The prompt of `generate` and `cache`: text, a chat file, or token ids (for a model without a
/// tokenizer).
#[derive(clap::Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct PromptOrIdsArgs {
    /// Raw prompt text, tokenized without a chat template.
    #[arg(long)]
    pub prompt: Option<String>,

    /// JSON file with a list of {"role", "content"} messages, formatted with the model's chat template.
    #[arg(long)]
    pub chat: Option<PathBuf>,

    /// Token ids separated by commas, e.g. 785,3974,13876 (works without a tokenizer).
    #[arg(long, value_delimiter = ',', num_args = 1.., allow_negative_numbers = true)]
    pub ids: Option<Vec<u32>>,
}

/// wgpu's own crates log adapter probing failures (EGL, Vulkan) at error level, even when the
/// backend falls back to the CPU as intended, so they are silenced unless the filter names them.
const QUIET_WGPU: [&str; 2] = ["wgpu_hal=off", "wgpu_core=off"];

/// Sets up `tracing` output on stderr with the given filter.
pub fn init_logging(filter: &str) {
    let mut directives = filter.to_string();
    for quiet in QUIET_WGPU {
        let target = quiet.split('=').next().unwrap_or_default();
        if !filter.contains(target) {
            directives.push(',');
            directives.push_str(quiet);
        }
    }

    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,wgpu_hal=off,wgpu_core=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Parses `--model` and `--revision` into a model source (an existing folder or a hub id).
pub fn model_source(args: &ModelArgs) -> anyhow::Result<qwenlens_weights::ModelSource> {
    Ok(qwenlens_weights::ModelSource::parse(
        &args.model,
        &args.revision,
    )?)
}

/// Returns the local folder of `--model`, reading or filling the Hugging Face cache for hub ids.
///
/// `--device` is checked too, so a typo in it is reported by subcommands that run on no backend.
pub fn resolve_model_dir(args: &ModelArgs) -> anyhow::Result<PathBuf> {
    let _device: qwenlens_kernels::Device = args.device.parse()?;
    let source = model_source(args)?;
    Ok(source.resolve()?)
}

/// Loads the model named by `--model` onto the backend chosen by `--device`.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<qwenlens_model::Model> {
    use anyhow::Context;

    let device: qwenlens_kernels::Device = args.device.parse()?;
    let source = qwenlens_weights::ModelSource::parse(&args.model, &args.revision)?;
    let backend = qwenlens_kernels::create_backend(device)
        .with_context(|| format!("creating the {device} backend"))?;

    tracing::info!(model = %args.model, backend = %backend.name(), "loading the model");
    qwenlens_model::Model::load(&source, backend)
        .with_context(|| format!("loading model {}", args.model))
}

/// Tokenizes `--prompt` as raw text, or renders `--chat` with the model's chat template and a
/// generation prompt.
pub fn prompt_ids(model: &qwenlens_model::Model, prompt: &PromptArgs) -> anyhow::Result<Vec<u32>> {
    let tokenizer = model.tokenizer().ok_or_else(|| {
        anyhow::anyhow!(
            "the model folder has no tokenizer.json, so --prompt and --chat cannot be tokenized; \
             add the tokenizer files to the folder"
        )
    })?;

    match (&prompt.prompt, &prompt.chat) {
        (Some(text), _) => Ok(tokenizer.encode(text)?),
        (None, Some(path)) => {
            let messages = qwenlens_weights::read_chat_file(path)?;
            Ok(tokenizer.encode_chat(&messages, true)?)
        }
        (None, None) => anyhow::bail!("no prompt given; pass --prompt TEXT or --chat FILE"),
    }
}

/// Returns the ids of `--ids`, or tokenizes `--prompt` / `--chat` as [`prompt_ids`] does; a model
/// without a tokenizer gets advice to pass `--ids`.
pub fn prompt_or_ids(
    model: &qwenlens_model::Model,
    prompt: &PromptOrIdsArgs,
) -> anyhow::Result<Vec<u32>> {
    if let Some(ids) = &prompt.ids {
        return Ok(ids.clone());
    }
    if model.tokenizer().is_none() {
        anyhow::bail!(
            "the model folder has no tokenizer.json, so --prompt and --chat cannot be tokenized; \
             pass token ids with --ids 1,2,3, or add the tokenizer files to the folder"
        );
    }

    let text_prompt = PromptArgs {
        prompt: prompt.prompt.clone(),
        chat: prompt.chat.clone(),
    };
    prompt_ids(model, &text_prompt)
}
