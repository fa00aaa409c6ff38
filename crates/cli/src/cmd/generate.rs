//! `qwenlens generate`: stream a completion, greedy or sampled.

use std::io::Write;

use anyhow::Context;
use qwenlens_model::{Generation, Hooks, Model, Sampling, StopReason};

use crate::common::{ModelArgs, PromptOrIdsArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptOrIdsArgs,

    /// Maximum number of new tokens [default: generation_config.json's max_new_tokens, else its
    /// max_length less the prompt, else 256, lowered to fit the model's context].
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = whole_number::<usize>
    )]
    pub max_new_tokens: Option<usize>,

    /// Take the most likely token at every step, ignoring the sampling defaults of
    /// generation_config.json (a --repetition-penalty given here still applies).
    #[arg(long)]
    pub greedy: bool,

    /// Softmax temperature, a positive number. This option, --top-k and --top-p turn sampling on
    /// [default: from generation_config.json, else 1.0].
    #[arg(
        long,
        value_name = "T",
        conflicts_with = "greedy",
        allow_negative_numbers = true
    )]
    pub temperature: Option<f64>,

    /// Sample only among the K most likely tokens; 0 disables [default: from
    /// generation_config.json, else 50].
    #[arg(
        long,
        value_name = "K",
        conflicts_with = "greedy",
        allow_negative_numbers = true,
        value_parser = whole_number::<usize>
    )]
    pub top_k: Option<usize>,

    /// Sample only among the most likely tokens whose probabilities sum to P, in (0, 1]
    /// [default: from generation_config.json, else 1.0].
    #[arg(
        long,
        value_name = "P",
        conflicts_with = "greedy",
        allow_negative_numbers = true
    )]
    pub top_p: Option<f64>,

    /// Divide the positive logits (and multiply the negative ones) of tokens already in the prompt
    /// or the output by R; 1.0 disables [default: from generation_config.json, else 1.0, and 1.0
    /// with --greedy].
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub repetition_penalty: Option<f64>,

    /// Seed of the random number generator, for reproducible sampling.
    #[arg(
        long,
        value_name = "S",
        allow_negative_numbers = true,
        value_parser = whole_number::<u64>
    )]
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
    let prompt_ids = crate::common::prompt_or_ids(&model, &args.prompt)?;

    let mut options = model.default_generate_options();
    options.sampling = sampling(&args, &model)?;
    // The default shrinks to fit the context, but an explicit value is checked as given.
    options.max_new_tokens = match args.max_new_tokens {
        Some(max_new_tokens) => max_new_tokens,
        None => model.default_max_new_tokens(prompt_ids.len())?,
    };
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

/// Parses a count or seed, with a message that names a negative value as the problem (clap's own
/// message reports only "invalid digit").
fn whole_number<T: std::str::FromStr>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    if text.trim_start().starts_with('-') {
        return Err(format!(
            "{text} is negative; expected a whole number, 0 or more"
        ));
    }
    text.parse()
        .map_err(|error| format!("{text:?} is not a valid whole number: {error}"))
}

/// Where a sampling value came from, for error messages.
#[derive(Clone, Copy)]
enum Source {
    Flag(&'static str),
    GenerationConfig,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "{flag}"),
            Source::GenerationConfig => f.write_str("generation_config.json"),
        }
    }
}

/// Overrides the checkpoint's sampling defaults with the command-line options, checking each value
/// before it is rounded to f32 and naming where it came from.
fn sampling(args: &Args, model: &Model) -> anyhow::Result<Sampling> {
    let config = model.generation_config();
    let mut sampling = if args.greedy {
        Sampling::greedy()
    } else {
        Sampling::from_generation_config(config)
    };

    // A sampling option asks for sampling even where generation_config.json sets do_sample false.
    if args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some() {
        sampling.do_sample = true;
    }

    let from = |flag: Option<f64>, name, file: Option<f64>| match flag {
        Some(value) => Some((value, Source::Flag(name))),
        None if args.greedy => None,
        None => file.map(|value| (value, Source::GenerationConfig)),
    };
    let advice = |source: Source, flag: &str| match source {
        Source::Flag(_) => String::new(),
        Source::GenerationConfig => format!("; pass {flag} to override it, or --greedy"),
    };

    if sampling.do_sample
        && let Some((value, source)) = from(args.temperature, "--temperature", config.temperature)
    {
        sampling.temperature = to_f32(value).filter(|t| *t > 0.0).ok_or_else(|| {
            anyhow::anyhow!(
                "invalid temperature {} from {source}: expected a positive number between \
                 {:e} and {:e}; for greedy decoding (temperature 0) use --greedy{}",
                number(value),
                f32::from_bits(1),
                f32::MAX,
                advice(source, "--temperature T")
            )
        })?;
    }
    if let Some(top_k) = args.top_k {
        sampling.top_k = (top_k > 0).then_some(top_k);
    }
    if sampling.do_sample
        && let Some((value, source)) = from(args.top_p, "--top-p", config.top_p)
    {
        let rounds_to_zero = to_f32(value).is_none_or(|p| p <= 0.0);
        if !(value > 0.0 && value <= 1.0) || rounds_to_zero {
            anyhow::bail!(
                "invalid top_p {} from {source}: expected a number in (0, 1], at least {:e}{}",
                number(value),
                f32::from_bits(1),
                advice(source, "--top-p P")
            );
        }
        sampling.top_p = Some(value as f32);
    }
    match from(
        args.repetition_penalty,
        "--repetition-penalty",
        config.repetition_penalty,
    ) {
        Some((value, source)) => {
            sampling.repetition_penalty = to_f32(value).filter(|r| *r > 0.0).ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid repetition_penalty {} from {source}: expected a positive \
                         number between {:e} and {:e} (1.0 disables the penalty){}",
                    number(value),
                    f32::from_bits(1),
                    f32::MAX,
                    advice(source, "--repetition-penalty R")
                )
            })?;
        }
        None if args.greedy => sampling.repetition_penalty = 1.0,
        None => {}
    }

    sampling.seed = args.seed;
    Ok(sampling)
}

/// Formats `value` as given on a command line: plain, or in exponent form when very small or large.
fn number(value: f64) -> String {
    if value == 0.0 || (1e-4..1e16).contains(&value.abs()) {
        value.to_string()
    } else {
        format!("{value:e}")
    }
}

/// Rounds `value` to f32, `None` when it is not finite there (NaN, or beyond f32::MAX) or when a
/// nonzero value rounds to zero.
fn to_f32(value: f64) -> Option<f32> {
    let rounded = value as f32;
    let lost = rounded == 0.0 && value != 0.0;
    (rounded.is_finite() && !lost).then_some(rounded)
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
