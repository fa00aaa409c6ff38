//! Hook points with TransformerLens names (`blocks.3.attn.hook_z`), and filters selecting them.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use regex::Regex;

use crate::error::{ModelError, Result};

/// A hook point inside one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockHook {
    /// `hook_resid_pre`: residual stream entering the block, `[batch, pos, d_model]`.
    ResidPre,
    /// `ln1.hook_scale`: RMS scale of the residual stream, `[batch, pos, 1]`.
    Ln1Scale,
    /// `ln1.hook_normalized`: residual stream divided by its scale, before the RMSNorm weight.
    Ln1Normalized,
    /// `attn.hook_q`: queries before RoPE, `[batch, pos, n_heads, d_head]`.
    Q,
    /// `attn.hook_k`: keys before RoPE, `[batch, pos, n_kv_heads, d_head]`.
    K,
    /// `attn.hook_v`: values, `[batch, pos, n_kv_heads, d_head]`.
    V,
    /// `attn.hook_rot_q`: queries after RoPE.
    RotQ,
    /// `attn.hook_rot_k`: keys after RoPE.
    RotK,
    /// `attn.hook_attn_scores`: `[batch, n_heads, query_pos, key_pos]`, `-inf` where masked.
    AttnScores,
    /// `attn.hook_pattern`: attention pattern, `[batch, n_heads, query_pos, key_pos]`.
    Pattern,
    /// `attn.hook_z`: per-head attention output before W_O, `[batch, pos, n_heads, d_head]`.
    Z,
    /// `attn.hook_result`: each head's `z · W_O`, `[batch, pos, n_heads, d_model]`; computed only
    /// when a filter, closure or intervention requests it.
    Result,
    /// `hook_attn_out`: attention output, `[batch, pos, d_model]`.
    AttnOut,
    /// `hook_resid_mid`: residual stream after attention.
    ResidMid,
    /// `ln2.hook_scale`.
    Ln2Scale,
    /// `ln2.hook_normalized`.
    Ln2Normalized,
    /// `mlp.hook_pre`: gate pre-activation before SiLU, `[batch, pos, d_mlp]`.
    MlpPre,
    /// `mlp.hook_pre_linear`: up projection, `[batch, pos, d_mlp]`.
    MlpPreLinear,
    /// `mlp.hook_post`: `silu(pre) * pre_linear`, `[batch, pos, d_mlp]`.
    MlpPost,
    /// `hook_mlp_out`: MLP output, `[batch, pos, d_model]`.
    MlpOut,
    /// `hook_resid_post`: residual stream leaving the block.
    ResidPost,
}

impl BlockHook {
    /// Every block hook in forward order, `hook_result` included.
    pub const ALL: [BlockHook; 21] = [
        BlockHook::ResidPre,
        BlockHook::Ln1Scale,
        BlockHook::Ln1Normalized,
        BlockHook::Q,
        BlockHook::K,
        BlockHook::V,
        BlockHook::RotQ,
        BlockHook::RotK,
        BlockHook::AttnScores,
        BlockHook::Pattern,
        BlockHook::Z,
        BlockHook::Result,
        BlockHook::AttnOut,
        BlockHook::ResidMid,
        BlockHook::Ln2Scale,
        BlockHook::Ln2Normalized,
        BlockHook::MlpPre,
        BlockHook::MlpPreLinear,
        BlockHook::MlpPost,
        BlockHook::MlpOut,
        BlockHook::ResidPost,
    ];

    /// Name after `blocks.L.` (`attn.hook_z`).
    pub fn suffix(self) -> &'static str {
        match self {
            BlockHook::ResidPre => "hook_resid_pre",
            BlockHook::Ln1Scale => "ln1.hook_scale",
            BlockHook::Ln1Normalized => "ln1.hook_normalized",
            BlockHook::Q => "attn.hook_q",
            BlockHook::K => "attn.hook_k",
            BlockHook::V => "attn.hook_v",
            BlockHook::RotQ => "attn.hook_rot_q",
            BlockHook::RotK => "attn.hook_rot_k",
            BlockHook::AttnScores => "attn.hook_attn_scores",
            BlockHook::Pattern => "attn.hook_pattern",
            BlockHook::Z => "attn.hook_z",
            BlockHook::Result => "attn.hook_result",
            BlockHook::AttnOut => "hook_attn_out",
            BlockHook::ResidMid => "hook_resid_mid",
            BlockHook::Ln2Scale => "ln2.hook_scale",
            BlockHook::Ln2Normalized => "ln2.hook_normalized",
            BlockHook::MlpPre => "mlp.hook_pre",
            BlockHook::MlpPreLinear => "mlp.hook_pre_linear",
            BlockHook::MlpPost => "mlp.hook_post",
            BlockHook::MlpOut => "hook_mlp_out",
            BlockHook::ResidPost => "hook_resid_post",
        }
    }

    fn from_suffix(suffix: &str) -> Option<BlockHook> {
        BlockHook::ALL
            .into_iter()
            .find(|hook| hook.suffix() == suffix)
    }
}

/// A TransformerLens hook point of a Qwen2 model.
///
/// `Display` and `FromStr` convert to and from the TransformerLens names. Parsing checks the syntax
/// only; [`HookPoint::validate`] (called by every model entry point) checks the layer against the
/// model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings, `[batch, pos, d_model]`.
    Embed,
    /// `blocks.{layer}.{hook}`.
    Block { layer: usize, hook: BlockHook },
    /// `ln_final.hook_scale`.
    LnFinalScale,
    /// `ln_final.hook_normalized`.
    LnFinalNormalized,
    /// `unembed.hook_in`: final residual stream after the final RMSNorm weight.
    UnembedIn,
}

impl HookPoint {
    /// Returns the block hook `hook` of layer `layer`.
    pub fn block(layer: usize, hook: BlockHook) -> HookPoint {
        HookPoint::Block { layer, hook }
    }

    /// Number of `f32` values this hook holds for `batch` sequences of `pos` positions in a model
    /// of `config`, from its TransformerLens shape (saturating instead of overflowing).
    pub fn numel(self, config: &qwenlens_weights::Qwen2Config, batch: usize, pos: usize) -> u64 {
        let [batch, pos] = [batch as u64, pos as u64];
        let d_model = config.d_model() as u64;
        let rows = batch.saturating_mul(pos);
        let per_row = match self {
            HookPoint::Embed | HookPoint::UnembedIn => d_model,
            HookPoint::LnFinalScale => 1,
            HookPoint::LnFinalNormalized => d_model,
            HookPoint::Block { hook, .. } => {
                let n_heads = config.n_heads() as u64;
                let n_kv_heads = config.n_kv_heads() as u64;
                let d_head = config.d_head() as u64;
                match hook {
                    BlockHook::Ln1Scale | BlockHook::Ln2Scale => 1,
                    BlockHook::Q | BlockHook::RotQ | BlockHook::Z => n_heads * d_head,
                    BlockHook::K | BlockHook::V | BlockHook::RotK => n_kv_heads * d_head,
                    BlockHook::AttnScores | BlockHook::Pattern => n_heads.saturating_mul(pos),
                    BlockHook::Result => n_heads * d_model,
                    BlockHook::MlpPre | BlockHook::MlpPreLinear | BlockHook::MlpPost => {
                        config.d_mlp() as u64
                    }
                    _ => d_model,
                }
            }
        };
        rows.saturating_mul(per_row)
    }

    /// Returns the layer of a block hook.
    pub fn layer(self) -> Option<usize> {
        match self {
            HookPoint::Block { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// Returns every hook point that TransformerLens's `run_with_cache` records by default
    /// (everything but `attn.hook_result`), in forward order.
    pub fn defaults(n_layers: usize) -> Vec<HookPoint> {
        HookPoint::all_points(n_layers, false)
    }

    /// Returns every hook point, `attn.hook_result` included, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        HookPoint::all_points(n_layers, true)
    }

    fn all_points(n_layers: usize, with_result: bool) -> Vec<HookPoint> {
        let mut points = vec![HookPoint::Embed];
        for layer in 0..n_layers {
            for hook in BlockHook::ALL {
                if hook != BlockHook::Result || with_result {
                    points.push(HookPoint::block(layer, hook));
                }
            }
        }
        points.extend([
            HookPoint::LnFinalScale,
            HookPoint::LnFinalNormalized,
            HookPoint::UnembedIn,
        ]);
        points
    }

    /// Checks the layer of a block hook against the model's number of layers.
    pub fn validate(self, n_layers: usize) -> Result<HookPoint> {
        match self {
            HookPoint::Block { layer, .. } if layer >= n_layers => {
                Err(ModelError::LayerOutOfRange {
                    what: self.to_string(),
                    layer,
                    n_layers,
                })
            }
            _ => Ok(self),
        }
    }

    /// Parses a name and checks its layer against the model's number of layers.
    pub fn parse_for(name: &str, n_layers: usize) -> Result<HookPoint> {
        name.parse::<HookPoint>()?.validate(n_layers)
    }

    /// Returns whether the activation has one row per token (`[batch, pos, ...]`), as opposed to
    /// the `[batch, n_heads, query_pos, key_pos]` attention scores and pattern.
    pub fn is_per_position(self) -> bool {
        !matches!(
            self,
            HookPoint::Block {
                hook: BlockHook::AttnScores | BlockHook::Pattern,
                ..
            }
        )
    }

    /// Returns whether the activation is split into heads (`[batch, pos, heads, ...]` or the
    /// attention scores and pattern), so that a patch can be limited to some heads.
    pub fn is_per_head(self) -> bool {
        matches!(
            self,
            HookPoint::Block {
                hook: BlockHook::Q
                    | BlockHook::K
                    | BlockHook::V
                    | BlockHook::RotQ
                    | BlockHook::RotK
                    | BlockHook::AttnScores
                    | BlockHook::Pattern
                    | BlockHook::Z
                    | BlockHook::Result,
                ..
            }
        )
    }

    /// Returns whether the activation is the residual stream or one of its `d_model`-wide summands
    /// (`hook_embed`, `hook_resid_*`, `hook_attn_out`, `hook_mlp_out`, `unembed.hook_in`), the
    /// hooks a steering vector can be added to.
    pub fn is_residual(self) -> bool {
        match self {
            HookPoint::Embed | HookPoint::UnembedIn => true,
            HookPoint::Block { hook, .. } => matches!(
                hook,
                BlockHook::ResidPre
                    | BlockHook::ResidMid
                    | BlockHook::ResidPost
                    | BlockHook::AttnOut
                    | BlockHook::MlpOut
            ),
            _ => false,
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => f.write_str("hook_embed"),
            HookPoint::Block { layer, hook } => write!(f, "blocks.{layer}.{}", hook.suffix()),
            HookPoint::LnFinalScale => f.write_str("ln_final.hook_scale"),
            HookPoint::LnFinalNormalized => f.write_str("ln_final.hook_normalized"),
            HookPoint::UnembedIn => f.write_str("unembed.hook_in"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = ModelError;

    fn from_str(name: &str) -> Result<HookPoint> {
        match name {
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_scale" => return Ok(HookPoint::LnFinalScale),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinalNormalized),
            "unembed.hook_in" => return Ok(HookPoint::UnembedIn),
            _ => {}
        }

        if let Some(rest) = name.strip_prefix("blocks.")
            && let Some((layer, suffix)) = rest.split_once('.')
            && let Ok(layer) = layer.parse::<usize>()
            && let Some(hook) = BlockHook::from_suffix(suffix)
        {
            return Ok(HookPoint::block(layer, hook));
        }

        Err(ModelError::UnknownHook {
            name: name.to_string(),
            suggestion: nearest_hook_name(name),
        })
    }
}

/// Returns the valid hook name closest to `name` (normalized Levenshtein similarity), keeping the
/// layer number the name contains so that `blocks.3.attn.hook_zz` suggests `blocks.3.attn.hook_z`.
fn nearest_hook_name(name: &str) -> String {
    let layer = name
        .strip_prefix("blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|layer| layer.parse::<usize>().ok())
        .unwrap_or(0);

    let mut candidates: Vec<String> = BlockHook::ALL
        .iter()
        .map(|hook| HookPoint::block(layer, *hook).to_string())
        .collect();
    candidates.extend(
        [
            HookPoint::Embed,
            HookPoint::LnFinalScale,
            HookPoint::LnFinalNormalized,
            HookPoint::UnembedIn,
        ]
        .iter()
        .map(HookPoint::to_string),
    );

    candidates
        .into_iter()
        .map(|candidate| (strsim::normalized_levenshtein(name, &candidate), candidate))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
        .unwrap_or_else(|| "hook_embed".to_string())
}

/// Selection of the hook points that a run reads back into its [`crate::ActivationCache`].
#[derive(Clone, Debug, Default)]
pub enum HookFilter {
    /// No hook point (plain forward).
    #[default]
    None,
    /// Every hook point that TransformerLens records by default: all but `attn.hook_result`, which
    /// costs one extra matmul per head and is recorded only when named by a set or a regex.
    All,
    /// The given hook points.
    Set(BTreeSet<HookPoint>),
    /// Hook points whose TransformerLens name matches the regex (`hook_result` included).
    Regex(Regex),
}

impl HookFilter {
    /// Returns a filter of the given hook points.
    pub fn points(points: impl IntoIterator<Item = HookPoint>) -> HookFilter {
        HookFilter::Set(points.into_iter().collect())
    }

    /// Returns a filter of the hook points named (TransformerLens names); an unknown name is an
    /// error.
    pub fn names<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<HookFilter> {
        let points = names
            .into_iter()
            .map(|name| name.as_ref().parse::<HookPoint>())
            .collect::<Result<BTreeSet<_>>>()?;
        Ok(HookFilter::Set(points))
    }

    /// Returns a filter of the hook points whose names match `pattern`; an invalid regex is an
    /// error.
    pub fn regex(pattern: &str) -> Result<HookFilter> {
        Regex::new(pattern)
            .map(HookFilter::Regex)
            .map_err(|error| ModelError::InvalidRegex {
                pattern: pattern.to_string(),
                message: error.to_string(),
            })
    }

    /// Returns whether the filter selects `point`.
    pub fn contains(&self, point: HookPoint) -> bool {
        match self {
            HookFilter::None => false,
            HookFilter::All => !matches!(
                point,
                HookPoint::Block {
                    hook: BlockHook::Result,
                    ..
                }
            ),
            HookFilter::Set(points) => points.contains(&point),
            HookFilter::Regex(regex) => regex.is_match(&point.to_string()),
        }
    }

    /// Returns the hook points of a model with `n_layers` layers that the filter selects, in
    /// forward order.
    pub fn selected(&self, n_layers: usize) -> Vec<HookPoint> {
        HookPoint::all(n_layers)
            .into_iter()
            .filter(|point| self.contains(*point))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for point in HookPoint::all(3) {
            let name = point.to_string();
            assert_eq!(name.parse::<HookPoint>().unwrap(), point, "{name}");
        }
    }

    #[test]
    fn unknown_name_suggests_nearest() {
        let error = "blocks.1.attn.hook_zz".parse::<HookPoint>().unwrap_err();
        match error {
            ModelError::UnknownHook { suggestion, .. } => {
                assert_eq!(suggestion, "blocks.1.attn.hook_z")
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn layer_out_of_range_names_layer_count() {
        let error = HookPoint::parse_for("blocks.5.hook_resid_pre", 2).unwrap_err();
        assert!(error.to_string().contains("2 layers"), "{error}");
    }

    #[test]
    fn all_filter_skips_result() {
        let selected = HookFilter::All.selected(2);
        assert_eq!(selected.len(), 2 * 20 + 4);
        assert!(
            !selected
                .iter()
                .any(|p| p.to_string().ends_with("hook_result"))
        );
        let regex = HookFilter::regex("hook_result").unwrap().selected(2);
        assert_eq!(regex.len(), 2);
    }
}
