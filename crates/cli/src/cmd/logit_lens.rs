//! `qwenlens logit-lens`: each layer's residual stream read through the unembedding, and the
//! direct logit attribution of every head and MLP to a target token.

use std::path::PathBuf;

use qwenlens_analysis::logit_lens::logit_lens;
use qwenlens_analysis::tokens::{DEFAULT_LABEL_WIDTH, resolve_token, token_label};

use crate::common::{ModelArgs, PromptArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    /// Target token (text, or a number read as a token id) [default: the model's greedy next token].
    #[arg(long, value_name = "TOKEN")]
    pub target: Option<String>,

    /// Top tokens listed per layer (1 to 100).
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub top: usize,

    /// Output folder for logit_lens.json, logit_lens.png and dla.png (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    qwenlens_analysis::output::check_output_dir(&args.out)?;
    let model = crate::common::load_model(&args.model)?;
    let tokens = crate::common::prompt_ids(&model, &args.prompt)?;
    let target = args
        .target
        .as_deref()
        .map(|text| resolve_token(text, model.tokenizer(), model.config().d_vocab()))
        .transpose()?;

    let report = logit_lens(&model, &tokens, target, args.top)?;
    let written = report.write(&args.out)?;

    let label = |text: &str| token_label(text, DEFAULT_LABEL_WIDTH);
    println!(
        "target {} ({}), logit {:.4}",
        report.target,
        label(&report.target_text),
        report.target_logit
    );
    println!(
        "{:<28} {:>6} {:>10}  top tokens",
        "residual stream", "rank", "logprob"
    );
    for layer in &report.layers {
        let top: Vec<String> = layer
            .top_tokens
            .iter()
            .map(|t| format!("{} {:.3}", label(&t.text), t.prob))
            .collect();
        println!(
            "{:<28} {:>6} {:>10.4}  {}",
            layer.hook,
            layer.target_rank,
            layer.target_logprob,
            top.join(", ")
        );
    }

    let mut strongest: Vec<_> = report.attributions.iter().collect();
    strongest.sort_by(|a, b| b.contribution.abs().total_cmp(&a.contribution.abs()));
    println!(
        "largest direct contributions to the target logit (sum {:.4}):",
        report.attribution_total
    );
    for attribution in strongest.iter().take(10) {
        println!(
            "  {:<10} {:+.4}",
            attribution.component, attribution.contribution
        );
    }
    println!("wrote {} files to {}", written.len(), args.out.display());
    Ok(())
}
