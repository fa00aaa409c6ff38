//! `qwenlens generate`: stream a completion, greedy or sampled.

use std::io::Write;

use anyhow::Context;
use qwenlens_model::{Generation, Hooks, Sampling, StopReason};

use crate::common::{ModelArgs, PromptArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    /// Maximum number of new tokens [default: generation_config.json's max_new_tokens, else 256,
    /// lowered to fit the model's context].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,

    /// Take the most likely token at every step, ignoring the sampling defaults of
    /// generation_config.json (a --repetition-penalty given here still applies).
    #[arg(long)]
    pub greedy: bool,

    /// Softmax temperature, a positive number. This option, --top-k and --top-p turn sampling on
    /// [default: from generation_config.json, else 1.0].
    #[arg(long, value_name = "T", conflicts_with = "greedy")]
    pub temperature: Option<f32>,

    /// Sample only among the K most likely tokens; 0 disables [default: from
    /// generation_config.json, else 50].
    #[arg(long, value_name = "K", conflicts_with = "greedy")]
    pub top_k: Option<usize>,

    /// Sample only among the most likely tokens whose probabilities sum to P, in (0, 1]
    /// [default: from generation_config.json, else 1.0].
    #[arg(long, value_name = "P", conflicts_with = "greedy")]
    pub top_p: Option<f32>,

    /// Divide the positive logits (and multiply the negative ones) of tokens already in the prompt
    /// or the output by R; 1.0 disables [default: from generation_config.json, else 1.0, and 1.0
    /// with --greedy].
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,

    /// Seed of the random number generator, for reproducible sampling.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Recompute the whole sequence at every step instead of using the KV cache (slower; for
    /// checking).
    #[arg(long)]
    pub no_kv_cache: bool,

    /// After the streamed text, print a JSON object with the prompt ids, the new ids, the text and
    /// the stop reason on its own last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = crate::common::load_model(&args.model)?;
    let prompt_ids = crate::common::prompt_ids(&model, &args.prompt)?;

    let mut options = model.default_generate_options();
    options.sampling = sampling(&args, options.sampling);
    match args.max_new_tokens {
        Some(max_new_tokens) => options.max_new_tokens = max_new_tokens,
        None => {
            // The default shrinks to fit the context, but an explicit value is checked as given.
            let room = model
                .config()
                .max_position_embeddings
                .saturating_sub(prompt_ids.len());
            options.max_new_tokens = options.max_new_tokens.min(room);
        }
    }
    options.stop_on_eos = !args.ignore_eos;
    options.use_kv_cache = !args.no_kv_cache;
    tracing::info!(prompt_tokens = prompt_ids.len(), ?options, "generating");

    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let generation = model.generate(&prompt_ids, &options, &Hooks::default(), |_, piece| {
        if write_error.is_none()
            && let Err(error) = stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
        {
            write_error = Some(error);
        }
    })?;
    if let Some(error) = write_error {
        return Err(error).context("writing the generated text to stdout");
    }

    writeln!(stdout)?;
    if args.json {
        writeln!(stdout, "{}", generation_json(&generation))?;
    }
    Ok(())
}

/// Overrides the checkpoint's sampling defaults with the command-line options.
fn sampling(args: &Args, defaults: Sampling) -> Sampling {
    let mut sampling = if args.greedy {
        Sampling::greedy()
    } else {
        defaults
    };

    // A sampling option asks for sampling even where generation_config.json sets do_sample false.
    if args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some() {
        sampling.do_sample = true;
    }
    if let Some(temperature) = args.temperature {
        sampling.temperature = temperature;
    }
    if let Some(top_k) = args.top_k {
        sampling.top_k = (top_k > 0).then_some(top_k);
    }
    if let Some(top_p) = args.top_p {
        sampling.top_p = Some(top_p);
    }
    if let Some(repetition_penalty) = args.repetition_penalty {
        sampling.repetition_penalty = repetition_penalty;
    }
    sampling.seed = args.seed;
    sampling
}

fn generation_json(generation: &Generation) -> serde_json::Value {
    let stop_reason = match generation.stop_reason {
        StopReason::Eos(_) => "eos",
        StopReason::MaxNewTokens => "max_new_tokens",
    };

    serde_json::json!({
        "prompt_ids": generation.prompt_ids,
        "ids": generation.ids,
        "text": generation.text,
        "stop_reason": stop_reason,
    })
}
