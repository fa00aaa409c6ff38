//! Attention patterns of a prompt read from the model, with their statistics, heatmaps and JSON.

use std::path::{Path, PathBuf};

use serde::Serialize;

use qwenlens_model::{BlockHook, HookFilter, HookPoint, HostTensor, Model, TokenBatch};

use crate::attention::{HeadStats, head_name, head_stats};
use crate::error::{AnalysisError, Result};
use crate::output::{check_output_paths, write_json, write_png};
use crate::render::{ColorScale, Heatmap, render_grid};
use crate::tokens::{DEFAULT_LABEL_WIDTH, position_labels};

/// Patterns and statistics of the chosen heads of one layer.
#[derive(Clone, Debug)]
pub struct LayerAttention {
    pub layer: usize,
    /// Query heads analysed, ascending.
    pub heads: Vec<usize>,
    /// `blocks.{layer}.attn.hook_pattern` of the prompt, `[n_heads, n, n]` (all heads).
    pub patterns: HostTensor,
    /// One entry per analysed head.
    pub stats: Vec<HeadStats>,
}

/// Attention of one prompt in the chosen layers.
#[derive(Clone, Debug)]
pub struct AttentionReport {
    pub tokens: Vec<u32>,
    /// Decoded text of each token (`#id` when the model has no tokenizer).
    pub token_texts: Vec<String>,
    pub layers: Vec<LayerAttention>,
}

/// Decodes each token on its own for labels; without a tokenizer, or for a token that does not
/// decode, the label is `#id`.
pub fn token_texts(model: &Model, tokens: &[u32]) -> Vec<String> {
    tokens
        .iter()
        .map(|&id| match model.tokenizer() {
            Some(tokenizer) => tokenizer.decode(&[id]).unwrap_or_else(|_| format!("#{id}")),
            None => format!("#{id}"),
        })
        .collect()
}

/// Checks layer and head indices against the model.
pub fn check_layers_and_heads(
    model: &Model,
    layers: &[usize],
    heads: Option<&[usize]>,
) -> Result<()> {
    let n_layers = model.config().n_layers();
    let n_heads = model.config().n_heads();
    if let Some(&layer) = layers.iter().find(|&&l| l >= n_layers) {
        return Err(AnalysisError::LayerOutOfRange { layer, n_layers });
    }
    if let Some(&head) = heads.into_iter().flatten().find(|&&h| h >= n_heads) {
        return Err(AnalysisError::HeadOutOfRange {
            kind: "query",
            head,
            count: n_heads,
        });
    }
    Ok(())
}

/// Runs the prompt once, recording the patterns of `layers`, and computes the statistics of `heads`
/// (all query heads when `None`).
pub fn analyze_attention(
    model: &Model,
    tokens: &[u32],
    layers: &[usize],
    heads: Option<&[usize]>,
) -> Result<AttentionReport> {
    check_layers_and_heads(model, layers, heads)?;
    if tokens.len() < 2 {
        return Err(AnalysisError::PromptTooShort {
            tokens: tokens.len(),
            min: 2,
            what: "attention statistics",
        });
    }

    let mut layers = layers.to_vec();
    layers.sort_unstable();
    layers.dedup();
    let n_heads = model.config().n_heads();
    let mut heads: Vec<usize> = heads
        .map(<[usize]>::to_vec)
        .unwrap_or_else(|| (0..n_heads).collect());
    heads.sort_unstable();
    heads.dedup();

    let points = layers
        .iter()
        .map(|&l| HookPoint::block(l, BlockHook::Pattern));
    let (_, mut cache) =
        model.run_with_cache(&TokenBatch::single(tokens), HookFilter::points(points))?;

    let n = tokens.len();
    let mut result = Vec::with_capacity(layers.len());
    for &layer in &layers {
        let point = HookPoint::block(layer, BlockHook::Pattern);
        let pattern = cache.remove(point).ok_or_else(|| {
            AnalysisError::InvalidArgument(format!("the run recorded no {point}"))
        })?;
        let patterns = HostTensor::new(vec![n_heads, n, n], pattern.data)?;

        let stats = heads
            .iter()
            .map(|&head| {
                head_stats(
                    layer,
                    head,
                    &patterns.data[head * n * n..(head + 1) * n * n],
                    tokens,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        result.push(LayerAttention {
            layer,
            heads: heads.clone(),
            patterns,
            stats,
        });
    }

    Ok(AttentionReport {
        tokens: tokens.to_vec(),
        token_texts: token_texts(model, tokens),
        layers: result,
    })
}

impl AttentionReport {
    /// Heatmap of one head's pattern; masked entries (key after query) are drawn grey.
    pub fn head_heatmap(
        &self,
        layer: &LayerAttention,
        head: usize,
        cell_size: Option<u32>,
    ) -> Heatmap {
        let n = self.tokens.len();
        let values: Vec<f32> = (0..n * n)
            .map(|k| {
                let (query, key) = (k / n, k % n);
                if key > query {
                    f32::NAN
                } else {
                    layer.patterns.data[head * n * n + k]
                }
            })
            .collect();
        let labels = position_labels(&self.token_texts, DEFAULT_LABEL_WIDTH);

        let stats = layer.stats.iter().find(|s| s.head == head);
        let title = match stats.and_then(|s| s.label) {
            Some(label) => format!("{} ({})", head_name(layer.layer, head), label.name()),
            None => head_name(layer.layer, head),
        };

        let mut heatmap = Heatmap::new(
            title,
            n,
            n,
            values,
            ColorScale::Sequential { min: 0.0, max: 1.0 },
        )
        .with_axes("query position", labels.clone(), "key position", labels);
        heatmap.cell_size = cell_size;
        heatmap
    }

    /// Writes `attention.json`, one `L{l}H{h}.png` per analysed head and one `L{l}_grid.png` per
    /// layer into `dir`; returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();

        let json_path = dir.join("attention.json");
        let mut paths = vec![json_path.clone()];
        for layer in &self.layers {
            paths.extend(
                layer
                    .heads
                    .iter()
                    .map(|&head| dir.join(format!("{}.png", head_name(layer.layer, head)))),
            );
            paths.push(dir.join(format!("L{}_grid.png", layer.layer)));
        }
        check_output_paths(&paths)?;

        write_json(&json_path, &self.to_json())?;
        written.push(json_path);

        for layer in &self.layers {
            let mut panels = Vec::with_capacity(layer.heads.len());
            for &head in &layer.heads {
                let image = self.head_heatmap(layer, head, None).render();
                let path = dir.join(format!("{}.png", head_name(layer.layer, head)));
                write_png(&path, &image)?;
                written.push(path);

                // Grid panels use smaller cells so a whole layer fits on one page.
                let cell = (320 / self.tokens.len().max(1) as u32).clamp(3, 16);
                panels.push(self.head_heatmap(layer, head, Some(cell)).render());
            }

            let columns = (layer.heads.len() as f64).sqrt().ceil() as usize;
            let grid = render_grid(
                &format!("layer {} attention patterns", layer.layer),
                &panels,
                columns,
            );
            let path = dir.join(format!("L{}_grid.png", layer.layer));
            write_png(&path, &grid)?;
            written.push(path);
        }

        Ok(written)
    }

    fn to_json(&self) -> impl Serialize + '_ {
        #[derive(Serialize)]
        struct Document<'a> {
            tokens: &'a [u32],
            token_texts: &'a [String],
            thresholds: Thresholds,
            heads: Vec<&'a HeadStats>,
        }

        #[derive(Serialize)]
        struct Thresholds {
            previous_token: f32,
            self_token: f32,
            sink: f32,
            induction: f32,
            min_induction_positions: usize,
        }

        Document {
            tokens: &self.tokens,
            token_texts: &self.token_texts,
            thresholds: Thresholds {
                previous_token: crate::attention::PREVIOUS_TOKEN_THRESHOLD,
                self_token: crate::attention::SELF_THRESHOLD,
                sink: crate::attention::SINK_THRESHOLD,
                induction: crate::attention::INDUCTION_THRESHOLD,
                min_induction_positions: crate::attention::MIN_INDUCTION_POSITIONS,
            },
            heads: self.layers.iter().flat_map(|l| &l.stats).collect(),
        }
    }
}
