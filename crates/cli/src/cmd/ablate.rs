//! `qwenlens ablate`: rank heads (or KV groups) by the effect of ablating them.

use std::path::PathBuf;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use qwenlens_analysis::ablation::{
    AblationLevel, AblationMode, SweepOptions, SweepStrategy, sweep,
};
use qwenlens_analysis::layers::LayerSelection;
use qwenlens_analysis::metrics::{Metric, argmax};
use qwenlens_analysis::output::{check_output_paths, write_png};
use qwenlens_analysis::tokens::{DEFAULT_LABEL_WIDTH, resolve_token, token_label};
use qwenlens_model::TokenBatch;

use crate::common::{ModelArgs, PromptArgs};

/// The metric measured on every ablated run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricArg {
    /// Mean next-token loss over the prompt.
    Loss,
    /// Log-probability of --target at the last position.
    Logprob,
    /// KL divergence of the last position's distribution from the clean one.
    Kl,
    /// logit(--target) − logit(--distractor) at the last position.
    LogitDiff,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// Replace the activation by zeros.
    Zero,
    /// Replace the activation by its mean over the prompt's positions.
    Mean,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelArg {
    /// One query head at a time (its attn.hook_z); its KV head keeps serving the rest of the group.
    Head,
    /// One KV head at a time (its attn.hook_v), silencing its whole group of query heads.
    KvGroup,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    /// Metric measured on every ablated run.
    #[arg(long, value_enum, default_value = "loss")]
    pub metric: MetricArg,

    /// Target token of logprob and logit-diff, as text or as a number read as a token id
    /// [default for logprob: the model's greedy next token].
    #[arg(long, value_name = "TOKEN")]
    pub target: Option<String>,

    /// Second token (text, or a number read as a token id) of logit-diff.
    #[arg(long, value_name = "TOKEN")]
    pub distractor: Option<String>,

    /// Replacement of the ablated activation.
    #[arg(long, value_enum, default_value = "zero")]
    pub mode: ModeArg,

    /// Ablate query heads or whole KV groups.
    #[arg(long, value_enum, default_value = "head")]
    pub level: LevelArg,

    /// Layers to sweep: all, or layers and ranges such as 0, 0,5 or 0-3,23 [default: all].
    #[arg(long, value_name = "LAYERS")]
    pub layers: Option<LayerSelection>,

    /// Ablations per batched forward pass [default: as many as keep the largest buffer under
    /// 96 MiB].
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,

    /// Run one full forward pass per ablation instead of the batched sweep from the clean residual
    /// stream (slower; for checking).
    #[arg(long)]
    pub naive: bool,

    /// Output folder for importance.csv, importance.json and importance.png (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    qwenlens_analysis::output::check_output_dir(&args.out)?;
    let model = crate::common::load_model(&args.model)?;
    let tokens = crate::common::prompt_ids(&model, &args.prompt)?;
    let metric = metric(&args, &model, &tokens)?;

    let options = SweepOptions {
        mode: match args.mode {
            ModeArg::Zero => AblationMode::Zero,
            ModeArg::Mean => AblationMode::Mean,
        },
        level: match args.level {
            LevelArg::Head => AblationLevel::Head,
            LevelArg::KvGroup => AblationLevel::KvGroup,
        },
        metric,
        strategy: if args.naive {
            SweepStrategy::Naive
        } else {
            SweepStrategy::Fast
        },
        layers: args
            .layers
            .as_ref()
            .map(|layers| layers.resolve(model.config().n_layers(), "--layers"))
            .transpose()?,
        batch_size: args.batch_size,
    };
    if options.batch_size == Some(0) {
        anyhow::bail!("--batch-size must be at least 1");
    }

    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ablations ({eta} left)")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    );
    progress.set_message("ablating");
    let report = sweep(&model, &tokens, &options, |step| {
        progress.set_length(step.total as u64);
        progress.set_position(step.done as u64);
    })?;
    progress.finish_and_clear();

    let paths = ["importance.csv", "importance.json", "importance.png"].map(|n| args.out.join(n));
    check_output_paths(&paths)?;
    report.write_csv(&paths[0])?;
    report.write_json(&paths[1])?;
    write_png(&paths[2], &report.heatmap().render())?;

    let unit = match options.level {
        AblationLevel::Head => "query head (hook_z)",
        AblationLevel::KvGroup => "KV group (hook_v)",
    };
    println!(
        "{} ablation per {unit}, metric {} (clean {:.5}); top 10 by importance:",
        args.mode
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        metric.name(),
        report.baseline
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12}",
        "head", "clean", "ablated", "delta"
    );
    for effect in report.top(10) {
        println!(
            "{:<8} {:>12.5} {:>12.5} {:>+12.5}",
            effect.name, effect.clean, effect.ablated, effect.delta
        );
    }
    println!(
        "wrote importance.csv, importance.json and importance.png to {}",
        args.out.display()
    );
    Ok(())
}

fn metric(args: &Args, model: &qwenlens_model::Model, tokens: &[u32]) -> anyhow::Result<Metric> {
    let d_vocab = model.config().d_vocab();
    let resolve = |text: &str| resolve_token(text, model.tokenizer(), d_vocab);

    let uses_target = matches!(args.metric, MetricArg::Logprob | MetricArg::LogitDiff);
    if args.target.is_some() && !uses_target {
        anyhow::bail!(
            "--target is read only by --metric logprob and --metric logit-diff; drop it or change the metric"
        );
    }
    if args.distractor.is_some() && args.metric != MetricArg::LogitDiff {
        anyhow::bail!(
            "--distractor is read only by --metric logit-diff; drop it or change the metric"
        );
    }

    Ok(match args.metric {
        MetricArg::Loss => Metric::Loss,
        MetricArg::Kl => Metric::Kl,
        MetricArg::Logprob => {
            let target = match &args.target {
                Some(text) => resolve(text)?,
                None => {
                    let last = model.forward(&TokenBatch::single(tokens))?.last(0)?;
                    let greedy = argmax(&last);
                    let text = qwenlens_analysis::attention_report::token_texts(model, &[greedy])
                        .remove(0);
                    eprintln!(
                        "target: the greedy next token {greedy} ({})",
                        token_label(&text, DEFAULT_LABEL_WIDTH)
                    );
                    greedy
                }
            };
            Metric::LogProb { target }
        }
        MetricArg::LogitDiff => {
            let (Some(answer), Some(wrong)) = (&args.target, &args.distractor) else {
                anyhow::bail!("--metric logit-diff needs two tokens: --target A --distractor B");
            };
            Metric::LogitDiff {
                answer: resolve(answer)?,
                wrong: resolve(wrong)?,
            }
        }
    })
}
