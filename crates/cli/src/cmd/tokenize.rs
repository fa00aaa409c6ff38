//! `qwenlens tokenize`: token ids of a text or of a chat rendered with the model's chat template.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use qwenlens_weights::{Tokenizer, read_chat_file};
use serde::Serialize;

use crate::common::{ModelArgs, resolve_model_dir};

#[derive(clap::Args)]
#[command(mut_arg("device", |arg| arg.help(DEVICE_HELP)))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub input: Input,

    /// With --chat: do not append the assistant header (`<|im_start|>assistant\n`) after the last
    /// message.
    #[arg(long, conflicts_with = "text")]
    pub no_generation_prompt: bool,
}

/// Help of `--device`, which `tokenize` shares with the subcommands that run the model.
const DEVICE_HELP: &str = "Accepted for uniformity with the other subcommands and checked, but \
                           unused: tokenize runs no model";

/// The input to tokenize: raw text or a chat file.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Input {
    /// Text to tokenize as is (no chat template, no special tokens added; special tokens written in
    /// the text, such as <|im_start|>, become single tokens).
    #[arg(long)]
    pub text: Option<String>,

    /// JSON file with a list of {"role", "content"} messages, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<PathBuf>,
}

/// Output for `--text`.
#[derive(Serialize)]
struct TextOutput {
    ids: Vec<u32>,
    tokens: Vec<String>,
}

/// Output for `--chat`.
#[derive(Serialize)]
struct ChatOutput {
    prompt: String,
    ids: Vec<u32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = resolve_model_dir(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;

    let json = match (&args.input.text, &args.input.chat) {
        (Some(text), _) => {
            let ids = tokenizer.encode(text)?;
            let tokens = tokenizer.tokens(&ids)?;
            serde_json::to_string(&TextOutput { ids, tokens })?
        }
        (None, Some(path)) => {
            let messages = read_chat_file(path)?;
            let prompt = tokenizer
                .apply_chat_template(&messages, !args.no_generation_prompt)
                .with_context(|| format!("formatting the chat in {}", path.display()))?;
            let ids = tokenizer.encode(&prompt)?;
            serde_json::to_string(&ChatOutput { prompt, ids })?
        }
        (None, None) => anyhow::bail!("nothing to tokenize; pass --text TEXT or --chat FILE"),
    };

    // `println!` panics when stdout is closed or full; a failed write is an ordinary error here.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}")
        .and_then(|()| stdout.flush())
        .context("writing the token ids to stdout")?;
    Ok(())
}
