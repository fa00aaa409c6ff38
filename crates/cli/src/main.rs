//! `qwenlens`: mechanistic interpretability of Qwen2 models from the command line.

mod cmd;
mod common;

use clap::{Parser, Subcommand};

/// Mechanistic interpretability for Qwen2-architecture models: tokenize, inspect, generate, cache
/// activations, and analyse attention heads.
#[derive(Parser)]
#[command(name = "qwenlens", version, about, long_about = None)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace), or a tracing directive.
    #[arg(long, global = true, default_value = "warn", env = "QWENLENS_LOG")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn text or a chat into token ids.
    Tokenize(cmd::tokenize::Args),
    /// Print a checkpoint's configuration and weight files.
    Inspect(cmd::inspect::Args),
    /// Generate a completion, streaming the text.
    Generate(cmd::generate::Args),
    /// Run one forward pass and save chosen activations to a safetensors file.
    Cache(cmd::cache::Args),
    /// Attention-pattern statistics and heatmaps.
    Attention(cmd::attention::Args),
    /// Rank heads by the effect of ablating them.
    Ablate(cmd::ablate::Args),
    /// Replace a head's attention pattern and compare the outputs.
    Patch(cmd::patch::Args),
    /// Patch activations from a clean prompt into a corrupted one.
    ActivationPatch(cmd::activation_patch::Args),
    /// Logit lens and direct logit attribution of every head.
    LogitLens(cmd::logit_lens::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    common::init_logging(&cli.log);

    let result = match cli.command {
        Command::Tokenize(args) => cmd::tokenize::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Cache(args) => cmd::cache::run(args),
        Command::Attention(args) => cmd::attention::run(args),
        Command::Ablate(args) => cmd::ablate::run(args),
        Command::Patch(args) => cmd::patch::run(args),
        Command::ActivationPatch(args) => cmd::activation_patch::run(args),
        Command::LogitLens(args) => cmd::logit_lens::run(args),
    };

    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
