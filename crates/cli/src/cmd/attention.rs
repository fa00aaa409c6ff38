//! `qwenlens attention`: attention-pattern statistics and heatmaps of one prompt.

use std::path::PathBuf;

use qwenlens_analysis::attention_report::analyze_attention;
use qwenlens_analysis::layers::LayerSelection;

use crate::common::{ModelArgs, PromptArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    /// Layers to analyse: all, or layers and ranges such as 0, 0,5 or 0-3,23.
    #[arg(long, default_value = "0", value_name = "LAYERS")]
    pub layers: LayerSelection,

    /// Query heads to analyse, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_name = "H,...")]
    pub heads: Option<Vec<usize>>,

    /// Output folder for attention.json, one L{layer}H{head}.png per head and one L{layer}_grid.png
    /// per layer (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    qwenlens_analysis::output::check_output_dir(&args.out)?;
    let model = crate::common::load_model(&args.model)?;
    let tokens = crate::common::prompt_ids(&model, &args.prompt)?;

    let layers = args.layers.resolve(model.config().n_layers(), "--layers")?;
    let report = analyze_attention(&model, &tokens, &layers, args.heads.as_deref())?;
    let written = report.write(&args.out)?;

    println!(
        "{:<8} {:>8} {:>9} {:>6} {:>6} {:>6} {:>6} {:>9}  label",
        "head", "entropy", "norm.ent", "sink", "prev", "self", "dist", "induction"
    );
    for stats in report.layers.iter().flat_map(|layer| &layer.stats) {
        let induction = stats
            .induction_score
            .map_or("-".to_string(), |s| format!("{s:.3}"));
        println!(
            "{:<8} {:>8.3} {:>9.3} {:>6.3} {:>6.3} {:>6.3} {:>6.2} {:>9}  {}",
            stats.name,
            stats.entropy,
            stats.normalized_entropy,
            stats.sink_score,
            stats.previous_token_score,
            stats.self_score,
            stats.mean_distance,
            induction,
            stats.label.map_or("", |label| label.name())
        );
    }
    println!("wrote {} files to {}", written.len(), args.out.display());
    Ok(())
}
