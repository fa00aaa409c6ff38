//! Zero-ablation sweeps over every query head (`hook_z`) and every KV group (`hook_v`), scored by
//! the loss on one sequence, through `qwenlens_analysis::ablation`.

use qwenlens_analysis::ablation::{
    AblationLevel, AblationMode, AblationReport, SweepOptions, SweepStrategy, sweep,
};
use qwenlens_analysis::metrics::Metric;
use qwenlens_model::Model;

/// Strategy of the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepMode {
    /// Each layer's ablations batched, started from the clean residual stream entering the layer.
    Fast,
    /// One full forward per ablation.
    Naive,
}

impl SweepMode {
    /// Returns the name that `--sweep` takes.
    pub fn name(self) -> &'static str {
        match self {
            SweepMode::Fast => "fast",
            SweepMode::Naive => "naive",
        }
    }

    fn strategy(self) -> SweepStrategy {
        match self {
            SweepMode::Fast => SweepStrategy::Fast,
            SweepMode::Naive => SweepStrategy::Naive,
        }
    }
}

/// Loss deltas of every ablation.
#[derive(Clone, Debug)]
pub struct SweepResult {
    /// Loss of the unmodified model, in nats.
    pub loss_clean: f32,
    /// `loss(ablated) − loss(clean)` for each query head, `[n_layers][n_heads]`, NaN in the layers
    /// left out.
    pub heads: Vec<Vec<f32>>,
    /// `loss(ablated) − loss(clean)` for each KV group, `[n_layers][n_kv_heads]`, NaN in the
    /// layers left out.
    pub kv_groups: Vec<Vec<f32>>,
}

/// Zero-ablates every query head, then every KV group, of the given `layers` on the sequence
/// `ids`. `progress` is called with the number of ablations done so far, out of
/// `layers.len() × (n_heads + n_kv_heads)`.
pub fn zero_ablation_sweep(
    model: &Model,
    ids: &[u32],
    layers: &[usize],
    mode: SweepMode,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<SweepResult> {
    let config = model.config();
    let run = |level: AblationLevel, offset: usize, progress: &mut dyn FnMut(usize)| {
        let options = SweepOptions {
            mode: AblationMode::Zero,
            level,
            metric: Metric::Loss,
            strategy: mode.strategy(),
            layers: Some(layers.to_vec()),
            batch_size: None,
        };
        sweep(model, ids, &options, |p| progress(offset + p.done))
    };

    let heads = run(AblationLevel::Head, 0, &mut progress)?;
    let offset = layers.len() * config.n_heads();
    let kv_groups = run(AblationLevel::KvGroup, offset, &mut progress)?;

    Ok(SweepResult {
        loss_clean: heads.baseline,
        heads: table(&heads, config.n_layers(), config.n_heads()),
        kv_groups: table(&kv_groups, config.n_layers(), config.n_kv_heads()),
    })
}

/// Arranges the deltas of a report as `[n_layers][width]`, NaN where the sweep did not run.
fn table(report: &AblationReport, n_layers: usize, width: usize) -> Vec<Vec<f32>> {
    let mut table = vec![vec![f32::NAN; width]; n_layers];
    for effect in &report.effects {
        table[effect.layer][effect.head] = effect.delta;
    }
    table
}
