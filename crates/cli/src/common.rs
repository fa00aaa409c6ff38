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

/// Sets up `tracing` output on stderr with the given filter.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
