//! `qwenlens`: mechanistic interpretability of Qwen2 models from the command line.

mod cmd;
mod common;

use clap::{Parser, Subcommand};

/// Mechanistic interpretability for Qwen2-architecture models: tokenize, inspect, generate, cache
/// activations, and analyse attention heads.
#[derive(Parser)]
#[command(name = "qwenlens", version, about, long_about = None)]
struct Cli {
    /// Log level filter (off, error, warn, info, debug, trace), or comma-separated tracing
    /// directives such as warn,qwenlens_weights=debug.
    #[arg(
        long,
        global = true,
        default_value = "warn",
        env = "QWENLENS_LOG",
        value_parser = parse_log_filter
    )]
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

/// Checks a `--log` filter. `EnvFilter` takes any bare word as a target name, so a misspelt level
/// such as `warning` would silently show nothing; a bare word must therefore be a level.
fn parse_log_filter(text: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

    if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(text) {
        return Err(format!(
            "invalid filter ({error}); expected a level ({}) or directives such as \
             warn,qwenlens_weights=debug",
            LEVELS.join(", ")
        ));
    }
    for directive in text.split(',').map(str::trim) {
        let is_bare_word = !directive.is_empty() && !directive.contains(['=', '[', ':']);
        let is_level = LEVELS.contains(&directive.to_ascii_lowercase().as_str())
            || directive.parse::<u8>().is_ok_and(|number| number <= 5);
        if is_bare_word && !is_level {
            return Err(format!(
                "{directive:?} is not a level; use one of {}, or TARGET=LEVEL to set the level \
                 of one module, such as qwenlens_weights=debug",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(text.to_string())
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
