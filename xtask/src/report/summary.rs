//! The schema of `summary.json`: every number that one `cargo xtask run-analysis` study produced.
//!
//! Sections of steps that did not run are `null` (or empty lists), so a run that stopped midway
//! still writes a valid summary that records where it stopped.

use serde::{Deserialize, Serialize};

/// Version of this schema, bumped when a field changes meaning or is removed.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything one study measured, as written to `summary.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub schema_version: u32,
    /// Start of the run, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created_utc: String,
    /// The command line that produced this run.
    pub command: Vec<String>,
    pub status: RunStatus,
    pub model: Option<ModelInfo>,
    pub prompt: Option<PromptInfo>,
    /// Token ids of the rendered prompt.
    pub prompt_ids: Vec<u32>,
    /// Each prompt token decoded on its own, in the order of `prompt_ids`.
    pub prompt_tokens: Vec<String>,
    pub generation: Option<GenerationSummary>,
    /// Attention statistics of every analysed layer.
    pub attention: Vec<LayerAttention>,
    pub importance: Option<ImportanceSummary>,
    pub most_important_head: Option<HeadRef>,
    pub patch: Option<PatchSummary>,
    /// Wall time and outcome of every step that started.
    pub steps: Vec<StepRecord>,
    /// Files of the report folder, relative to it, in the order they were written.
    pub files: Vec<String>,
}

/// Whether the run finished or where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunStatus {
    /// Steps are still running (the value while a run is in progress).
    #[default]
    Running,
    /// Every step finished.
    Complete,
    /// A step failed, so the steps after it did not run.
    Stopped {
        /// 1-based index of the failed step.
        step: usize,
        step_name: String,
        error: String,
    },
}

/// The checkpoint and the backend that ran it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `--model` as given: a hub id or a folder.
    pub source: String,
    /// The local folder the weights were read from.
    pub folder: String,
    /// Backend name, e.g. `cpu (2 threads)`.
    pub backend: String,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_model: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub d_vocab: usize,
    pub parameters: u64,
}

/// The chat that was rendered into the prompt.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PromptInfo {
    pub messages: Vec<Message>,
    /// The chat template's output, generation prompt included.
    pub text: String,
}

/// One chat message.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The completion of the unmodified model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GenerationSummary {
    /// New token ids, without the prompt.
    pub ids: Vec<u32>,
    /// The new tokens decoded together, without an end-of-sequence token that stopped generation.
    pub text: String,
    /// Each new token decoded on its own.
    pub tokens: Vec<String>,
    pub sampling: SamplingSummary,
    pub max_new_tokens: usize,
    /// Why generation stopped: `eos` or `max_new_tokens`.
    pub stop_reason: String,
    /// New tokens per second of wall time, prefill included.
    pub tokens_per_second: f64,
}

/// The decoding settings of both generations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SamplingSummary {
    pub greedy: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Attention statistics of one layer on the prompt, with its pictures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LayerAttention {
    pub layer: usize,
    pub heads: Vec<HeadAttention>,
    /// One picture per head, relative to the report folder, in head order.
    pub pictures: Vec<String>,
}

/// Statistics of one query head's pattern on the prompt. Scores average over the query rows after
/// the first, because row 0 sees only key 0.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeadAttention {
    pub head: usize,
    /// The KV head this query head reads (its GQA group).
    pub kv_group: usize,
    /// Mean row entropy, in nats.
    pub entropy: f32,
    /// Mean row entropy divided by that of a uniform row over the same keys (0 one-hot, 1 uniform).
    pub normalized_entropy: f32,
    /// Mean weight on the first token.
    pub sink_score: f32,
    /// Mean weight on the previous token.
    pub previous_token_score: f32,
    /// Mean weight of a query on its own position.
    pub self_score: f32,
    /// Mean distance from query to key, in tokens.
    pub mean_distance: f32,
    /// Mean weight along induction targets, when the prompt repeats tokens.
    pub induction_score: Option<f32>,
    /// The clear behaviour (`previous-token`, `self`, `sink`, `induction-candidate`), if any.
    pub label: Option<String>,
}

/// Zero-ablation importance of every query head and KV group.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImportanceSummary {
    /// What a delta measures, e.g. `loss(ablated) - loss(clean), nats`.
    pub metric: String,
    /// The tokens the loss is computed on.
    pub scored_tokens: String,
    /// Sweep algorithm: `fast` or `naive`.
    pub sweep: String,
    pub loss_clean: f32,
    /// Loss deltas, `[n_layers][n_heads]`, from zeroing one query head's `hook_z`. Layers the
    /// sweep skipped hold NaN, written as `null`.
    #[serde(deserialize_with = "deserialize_table")]
    pub table: Vec<Vec<f32>>,
    /// Loss deltas, `[n_layers][n_kv_heads]`, from zeroing one KV head's `v` (all query heads of
    /// its group at once), `null` where skipped.
    #[serde(deserialize_with = "deserialize_table")]
    pub kv_groups: Vec<Vec<f32>>,
    /// The heads with the largest deltas, largest first.
    pub top_heads: Vec<HeadScore>,
    /// `importance.csv`, relative to the report folder.
    pub csv: String,
    /// The heatmap picture, relative to the report folder.
    pub heatmap: Option<String>,
}

/// A query head and its loss delta.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadScore {
    pub layer: usize,
    pub head: usize,
    pub delta: f32,
}

/// A query head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRef {
    pub layer: usize,
    pub head: usize,
}

/// One head's attention pattern replaced, and the generation that followed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PatchSummary {
    pub layer: usize,
    pub head: usize,
    /// The replacement pattern, e.g. `uniform` (uniform over the causal keys).
    pub pattern: String,
    /// The tokens the losses are computed on.
    pub scored_tokens: String,
    pub loss_clean: f32,
    pub loss_patched: f32,
    /// New token ids of the patched generation.
    pub ids: Vec<u32>,
    /// The patched completion, without an end-of-sequence token that stopped generation.
    pub text: String,
    /// Each new token decoded on its own.
    pub tokens: Vec<String>,
    /// Index of the first new token that differs from the clean generation, if any.
    pub first_difference: Option<usize>,
}

/// Wall time and outcome of one step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step number.
    pub index: usize,
    pub name: String,
    pub seconds: f64,
    pub ok: bool,
}

/// Reads a table whose `null` entries (how serde_json writes NaN) stand for skipped values.
fn deserialize_table<'de, D>(deserializer: D) -> Result<Vec<Vec<f32>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let table: Vec<Vec<Option<f32>>> = Deserialize::deserialize(deserializer)?;
    Ok(table
        .into_iter()
        .map(|row| row.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
        .collect())
}

impl Summary {
    /// Creates an empty summary of a run that is starting now.
    pub fn new(created_utc: String, command: Vec<String>) -> Self {
        Summary {
            schema_version: SCHEMA_VERSION,
            created_utc,
            command,
            ..Summary::default()
        }
    }
}

impl ImportanceSummary {
    /// Lists the `count` heads of `table` with the largest deltas, largest first, leaving out NaN
    /// deltas (heads the sweep skipped).
    pub fn rank_heads(table: &[Vec<f32>], count: usize) -> Vec<HeadScore> {
        let mut scores: Vec<HeadScore> = table
            .iter()
            .enumerate()
            .flat_map(|(layer, row)| {
                row.iter()
                    .enumerate()
                    .map(move |(head, &delta)| HeadScore { layer, head, delta })
            })
            .filter(|score| !score.delta.is_nan())
            .collect();

        scores.sort_by(|a, b| b.delta.total_cmp(&a.delta));
        scores.truncate(count);
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_heads_largest_first() {
        let table = vec![vec![0.1, f32::NAN, -0.5], vec![0.7, 0.2, 0.3]];

        let ranked = ImportanceSummary::rank_heads(&table, 4);

        let order: Vec<(usize, usize)> = ranked.iter().map(|s| (s.layer, s.head)).collect();
        assert_eq!(order, vec![(1, 0), (1, 2), (1, 1), (0, 0)]);
    }

    #[test]
    fn rank_heads_skips_nan() {
        let table = vec![vec![f32::NAN, -3.0]];

        let ranked = ImportanceSummary::rank_heads(&table, 2);

        assert_eq!(ranked.len(), 1);
        assert_eq!((ranked[0].layer, ranked[0].head), (0, 1));
    }

    #[test]
    fn importance_nan_round_trip() {
        let importance = ImportanceSummary {
            table: vec![vec![0.5, f32::NAN]],
            kv_groups: vec![vec![f32::NAN]],
            ..ImportanceSummary::default()
        };

        let json = serde_json::to_string(&importance).unwrap();
        let back: ImportanceSummary = serde_json::from_str(&json).unwrap();

        assert!(json.contains("[[0.5,null]]"), "{json}");
        assert_eq!(back.table[0][0], 0.5);
        assert!(back.table[0][1].is_nan());
        assert!(back.kv_groups[0][0].is_nan());
    }

    #[test]
    fn stopped_status_json() {
        let status = RunStatus::Stopped {
            step: 3,
            step_name: "generate".into(),
            error: "out of memory".into(),
        };

        let json = serde_json::to_value(&status).unwrap();

        assert_eq!(json["state"], "stopped");
        assert_eq!(json["step"], 3);
    }
}
