//! `qwenlens activation-patch`: patch activations from a clean prompt into a corrupted one and show
//! which layers, positions and heads carry the difference.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use qwenlens_analysis::activation_patching::{
    ActivationPatchOptions, PatchTarget, activation_patching,
};
use qwenlens_analysis::tokens::resolve_token;

use crate::common::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Clean prompt (raw text); it must have as many tokens as the corrupted one.
    #[arg(long, value_name = "TEXT")]
    pub clean: String,

    /// Corrupted prompt (raw text).
    #[arg(long, value_name = "TEXT")]
    pub corrupted: String,

    /// Token (text, or a number read as a token id) that the clean prompt should predict next.
    #[arg(long, value_name = "TOKEN")]
    pub answer: String,

    /// Token (text, or a number read as a token id) that the corrupted prompt should predict next.
    #[arg(long, value_name = "TOKEN")]
    pub wrong: String,

    /// Patched runs per batched forward pass [default: as many as keep the largest buffer under
    /// 96 MiB].
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,

    /// Output folder for activation_patching.json and the heatmaps (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == Some(0) {
        anyhow::bail!("--batch-size must be at least 1");
    }
    qwenlens_analysis::output::check_output_dir(&args.out)?;
    let model = crate::common::load_model(&args.model)?;
    let tokenizer = model.tokenizer().ok_or_else(|| {
        anyhow::anyhow!(
            "the model folder has no tokenizer.json, so the prompts cannot be tokenized"
        )
    })?;
    let clean = tokenizer.encode(&args.clean)?;
    let corrupted = tokenizer.encode(&args.corrupted)?;

    let d_vocab = model.config().d_vocab();
    let options = ActivationPatchOptions {
        answer: resolve_token(&args.answer, Some(tokenizer), d_vocab)?,
        wrong: resolve_token(&args.wrong, Some(tokenizer), d_vocab)?,
        targets: PatchTarget::ALL.to_vec(),
        batch_size: args.batch_size,
    };

    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("patching [{bar:40}] {pos}/{len} runs ({eta} left)")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    );
    let report = activation_patching(&model, &clean, &corrupted, &options, |step| {
        progress.set_length(step.total as u64);
        progress.set_position(step.done as u64);
    })?;
    progress.finish_and_clear();
    let written = report.write(&args.out)?;

    println!(
        "logit difference (answer − wrong): clean {:.4}, corrupted {:.4}",
        report.clean_logit_diff, report.corrupted_logit_diff
    );
    for grid in &report.grids {
        let (best, score) = grid
            .normalized
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, &s)| (i, s))
            .unwrap_or((0, f32::NAN));
        let (layer, index) = (best / grid.cols, best % grid.cols);
        let place = match grid.target {
            PatchTarget::HeadZ => format!("L{layer}H{index}"),
            _ => format!(
                "layer {layer}, position {index} ({:?})",
                report.clean_texts[index]
            ),
        };
        println!(
            "{:<10} strongest patch: {place}, normalized score {score:.3}",
            grid.target.name()
        );
    }
    println!("wrote {} files to {}", written.len(), args.out.display());
    Ok(())
}
