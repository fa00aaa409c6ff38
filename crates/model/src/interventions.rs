//! Interventions executed on the device, user closures run on the host, and the attention patterns
//! that replace a head's pattern.

use std::fmt;
use std::sync::Arc;

use crate::cache::{ActivationCache, HostTensor};
use crate::error::{ModelError, Result};
use crate::hooks::HookPoint;

/// Batch items and sequence positions that an intervention changes.
///
/// Positions index the left-padded sequence and count the tokens already in a KV cache, so position
/// `t` is the same token in a full forward and in a generation step. `None` means all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Batch items, `None` for all.
    pub batch: Option<Vec<usize>>,
    /// Sequence positions, `None` for all.
    pub positions: Option<Vec<usize>>,
}

impl Scope {
    /// Returns every batch item and position.
    pub fn all() -> Scope {
        Scope::default()
    }

    /// Returns one batch item, all positions (copy `b` of an ablation sweep).
    pub fn batch_item(b: usize) -> Scope {
        Scope {
            batch: Some(vec![b]),
            positions: None,
        }
    }

    /// Limits the scope to the given positions.
    pub fn with_positions(mut self, positions: Vec<usize>) -> Scope {
        self.positions = Some(positions);
        self
    }

    /// Limits the scope to the given batch items.
    pub fn with_batch(mut self, batch: Vec<usize>) -> Scope {
        self.batch = Some(batch);
        self
    }

    /// Returns whether batch item `b` is in scope.
    pub fn has_item(&self, b: usize) -> bool {
        self.batch.as_ref().is_none_or(|items| items.contains(&b))
    }

    /// Returns whether position `p` is in scope.
    pub fn has_position(&self, p: usize) -> bool {
        self.positions
            .as_ref()
            .is_none_or(|positions| positions.contains(&p))
    }

    /// Returns whether the scope covers everything.
    pub fn is_all(&self) -> bool {
        self.batch.is_none() && self.positions.is_none()
    }

    /// Checks the scope against a batch of `batch` items and sequences of `seq_len` positions: an
    /// item or position beyond them, or an empty list (which would change nothing), is an error.
    pub(crate) fn validate(&self, batch: usize, seq_len: usize) -> Result<()> {
        if let Some(b) = self.batch.iter().flatten().find(|b| **b >= batch) {
            return Err(ModelError::InvalidArgument(format!(
                "intervention scope names batch item {b}, but the batch has {batch} items"
            )));
        }
        if let Some(p) = self.positions.iter().flatten().find(|p| **p >= seq_len) {
            return Err(ModelError::InvalidArgument(format!(
                "intervention scope names position {p}, but the sequence has {seq_len} positions \
                 (0..={})",
                seq_len.saturating_sub(1)
            )));
        }
        if self.batch.as_ref().is_some_and(Vec::is_empty) {
            return Err(ModelError::InvalidArgument(
                "intervention scope has an empty list of batch items, so it changes nothing; \
                 give at least one item, or None for all"
                    .to_string(),
            ));
        }
        if self.positions.as_ref().is_some_and(Vec::is_empty) {
            return Err(ModelError::InvalidArgument(
                "intervention scope has an empty list of positions, so it changes nothing; \
                 give at least one position, or None for all"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// A user function giving one query row of a replacement pattern: called with the query's position
/// and the number of keys (both counted from the sequence's first real token), it returns one
/// weight per key. Weights after the query's position are used as given, so a causal pattern puts
/// zeros there.
pub type PatternFn = Arc<dyn Fn(usize, usize) -> Vec<f32> + Send + Sync>;

/// A replacement attention pattern for one head, built for whatever query positions and key length
/// a pass has, so the same spec works for a full forward and for each KV-cache generation step.
///
/// Positions count from each sequence's first real token; padding keys always get weight 0.
#[derive(Clone)]
pub enum PatternSpec {
    /// Uniform causal: query `i` gives `1 / (i + 1)` to keys `0..=i`.
    Uniform,
    /// Query `i ≥ 1` attends to key `i − 1`; query 0 attends to itself.
    PreviousToken,
    /// Every query attends to key 0.
    FirstToken,
    /// Every query attends to itself.
    SelfToken,
    /// Query `i` attends to key `p` when `p ≤ i`, and to itself before position `p` exists (no
    /// query ever attends to a future key).
    Position(usize),
    /// A `[q, k]` array covering at least the longest sequence; query `i` takes row `i` cut to the
    /// current number of keys, used as given (not renormalized).
    Fixed(HostTensor),
    /// A user function giving each query row.
    Custom(PatternFn),
}

impl fmt::Debug for PatternSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternSpec::Uniform => f.write_str("Uniform"),
            PatternSpec::PreviousToken => f.write_str("PreviousToken"),
            PatternSpec::FirstToken => f.write_str("FirstToken"),
            PatternSpec::SelfToken => f.write_str("SelfToken"),
            PatternSpec::Position(p) => write!(f, "Position({p})"),
            PatternSpec::Fixed(t) => write!(f, "Fixed({:?})", t.shape),
            PatternSpec::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl PatternSpec {
    /// Writes the pattern row of the query at position `query` over keys `0..key_len` into `row`
    /// (length `key_len`).
    pub fn fill_row(&self, query: usize, key_len: usize, row: &mut [f32]) -> Result<()> {
        row.fill(0.0);
        let last = query.min(key_len.saturating_sub(1));
        match self {
            PatternSpec::Uniform => {
                let weight = 1.0 / (last + 1) as f32;
                row[..=last].fill(weight);
            }
            PatternSpec::PreviousToken => row[last.saturating_sub(1)] = 1.0,
            PatternSpec::FirstToken => row[0] = 1.0,
            PatternSpec::SelfToken => row[last] = 1.0,
            PatternSpec::Position(p) => row[if *p <= last { *p } else { last }] = 1.0,
            PatternSpec::Fixed(table) => {
                let [rows, cols] = table.shape[..] else {
                    return Err(ModelError::ShapeMismatch {
                        what: "fixed replacement pattern".to_string(),
                        expected: vec![query + 1, key_len],
                        found: table.shape.clone(),
                    });
                };
                if query >= rows || key_len > cols {
                    return Err(ModelError::ShapeMismatch {
                        what: format!(
                            "fixed replacement pattern (must cover query position {query} and {key_len} keys)"
                        ),
                        expected: vec![query + 1, key_len],
                        found: table.shape.clone(),
                    });
                }
                row.copy_from_slice(&table.data[query * cols..query * cols + key_len]);
            }
            PatternSpec::Custom(function) => {
                let values = function(query, key_len);
                if values.len() != key_len {
                    return Err(ModelError::ShapeMismatch {
                        what: format!("custom pattern row for query position {query}"),
                        expected: vec![key_len],
                        found: vec![values.len()],
                    });
                }
                row.copy_from_slice(&values);
            }
        }
        Ok(())
    }
}

/// An intervention executed on the device at one hook point.
///
/// Masks and replacement tensors are built on the host and applied with the backend's `select`,
/// `add` and attention pattern overrides. Several interventions at one hook are applied in the
/// order given.
#[derive(Clone, Debug)]
pub enum Intervention {
    /// Zero one query head's `attn.hook_z` (silences that head alone).
    ZeroHeadZ {
        layer: usize,
        head: usize,
        scope: Scope,
    },
    /// Replace one query head's `attn.hook_z` by its mean over the positions of the same forward
    /// pass (per batch item, padding excluded; in a KV-cache step, over that step's positions).
    MeanAblateHeadZ {
        layer: usize,
        head: usize,
        scope: Scope,
    },
    /// Zero one KV head's `attn.hook_v`, which silences every query head of its group.
    ZeroKvHeadV {
        layer: usize,
        kv_head: usize,
        scope: Scope,
    },
    /// Replace one query head's attention pattern; `z` is recomputed from the new pattern.
    ReplacePattern {
        layer: usize,
        head: usize,
        pattern: PatternSpec,
        scope: Scope,
    },
    /// Add a vector (steering vector) at every in-scope position of a residual-stream hook
    /// (`hook_embed`, `hook_resid_pre/mid/post`, `hook_attn_out`, `hook_mlp_out`,
    /// `unembed.hook_in`); its length is d_model.
    AddToHook {
        hook: HookPoint,
        vector: Vec<f32>,
        scope: Scope,
    },
    /// Copy an activation recorded by another run (TransformerLens shape, batch first), optionally
    /// only some heads of a per-head hook. A source with one batch item is copied to every in-scope
    /// item; for per-position hooks the source may be longer than the pass (positions are looked up
    /// by sequence position, which fits KV-cache steps).
    PatchFromCache {
        hook: HookPoint,
        source: Arc<HostTensor>,
        heads: Option<Vec<usize>>,
        scope: Scope,
    },
}

impl Intervention {
    /// Zero-ablation of query head `head` in layer `layer`, everywhere.
    pub fn zero_head(layer: usize, head: usize) -> Intervention {
        Intervention::ZeroHeadZ {
            layer,
            head,
            scope: Scope::all(),
        }
    }

    /// Mean-ablation of query head `head` in layer `layer`, everywhere.
    pub fn mean_ablate_head(layer: usize, head: usize) -> Intervention {
        Intervention::MeanAblateHeadZ {
            layer,
            head,
            scope: Scope::all(),
        }
    }

    /// Zero-ablation of KV head `kv_head` in layer `layer`, everywhere.
    pub fn zero_kv_head(layer: usize, kv_head: usize) -> Intervention {
        Intervention::ZeroKvHeadV {
            layer,
            kv_head,
            scope: Scope::all(),
        }
    }

    /// Pattern replacement of query head `head` in layer `layer`, everywhere.
    pub fn replace_pattern(layer: usize, head: usize, pattern: PatternSpec) -> Intervention {
        Intervention::ReplacePattern {
            layer,
            head,
            pattern,
            scope: Scope::all(),
        }
    }

    /// Steering: adds `vector` at a residual-stream hook, everywhere.
    pub fn add_to_hook(hook: HookPoint, vector: Vec<f32>) -> Intervention {
        Intervention::AddToHook {
            hook,
            vector,
            scope: Scope::all(),
        }
    }

    /// Patches `hook` from `cache` (optionally only `heads`), everywhere.
    pub fn patch_from_cache(
        cache: &ActivationCache,
        hook: HookPoint,
        heads: Option<Vec<usize>>,
    ) -> Result<Intervention> {
        Ok(Intervention::PatchFromCache {
            hook,
            source: Arc::new(cache.require(hook)?.clone()),
            heads,
            scope: Scope::all(),
        })
    }

    /// Returns the same intervention limited to `scope`.
    pub fn with_scope(mut self, new_scope: Scope) -> Intervention {
        *self.scope_mut() = new_scope;
        self
    }

    /// Returns the intervention's scope.
    pub fn scope(&self) -> &Scope {
        match self {
            Intervention::ZeroHeadZ { scope, .. }
            | Intervention::MeanAblateHeadZ { scope, .. }
            | Intervention::ZeroKvHeadV { scope, .. }
            | Intervention::ReplacePattern { scope, .. }
            | Intervention::AddToHook { scope, .. }
            | Intervention::PatchFromCache { scope, .. } => scope,
        }
    }

    fn scope_mut(&mut self) -> &mut Scope {
        match self {
            Intervention::ZeroHeadZ { scope, .. }
            | Intervention::MeanAblateHeadZ { scope, .. }
            | Intervention::ZeroKvHeadV { scope, .. }
            | Intervention::ReplacePattern { scope, .. }
            | Intervention::AddToHook { scope, .. }
            | Intervention::PatchFromCache { scope, .. } => scope,
        }
    }

    /// Returns the hook point where the intervention acts.
    pub fn hook_point(&self) -> HookPoint {
        use crate::hooks::BlockHook;
        match self {
            Intervention::ZeroHeadZ { layer, .. } | Intervention::MeanAblateHeadZ { layer, .. } => {
                HookPoint::block(*layer, BlockHook::Z)
            }
            Intervention::ZeroKvHeadV { layer, .. } => HookPoint::block(*layer, BlockHook::V),
            Intervention::ReplacePattern { layer, .. } => {
                HookPoint::block(*layer, BlockHook::Pattern)
            }
            Intervention::AddToHook { hook, .. } | Intervention::PatchFromCache { hook, .. } => {
                *hook
            }
        }
    }
}

/// Context passed to a hook closure with the activation.
#[derive(Clone, Debug)]
pub struct HookContext {
    /// The hook point.
    pub point: HookPoint,
    /// Number of batch items.
    pub batch: usize,
    /// Sequence position of the pass's first query row (the KV cache length; 0 for a full forward).
    pub first_position: usize,
    /// Number of query positions in this pass.
    pub q_len: usize,
    /// Number of left-padding tokens of each batch item.
    pub padding: Vec<usize>,
}

/// A closure that reads, and may replace in place, an activation on the host (TransformerLens
/// shape). Replacing it with a tensor of another shape is an error of the run.
pub type HookFn = Arc<dyn Fn(&mut HostTensor, &HookContext) + Send + Sync>;

/// Interventions and closures active during a run. At each hook point the interventions run first
/// (in order), then the closures (in order).
#[derive(Clone, Default)]
pub struct Hooks {
    /// Interventions executed on the device.
    pub interventions: Vec<Intervention>,
    /// Closures run on the host, each at its hook point.
    pub closures: Vec<(HookPoint, HookFn)>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("interventions", &self.interventions)
            .field(
                "closures",
                &self
                    .closures
                    .iter()
                    .map(|(p, _)| p.to_string())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Hooks {
    /// No hooks.
    pub fn new() -> Hooks {
        Hooks::default()
    }

    /// Hooks made of interventions only.
    pub fn from_interventions(interventions: Vec<Intervention>) -> Hooks {
        Hooks {
            interventions,
            closures: Vec::new(),
        }
    }

    /// Adds an intervention.
    pub fn with_intervention(mut self, intervention: Intervention) -> Hooks {
        self.interventions.push(intervention);
        self
    }

    /// Adds a closure at `point`.
    pub fn with_closure(
        mut self,
        point: HookPoint,
        closure: impl Fn(&mut HostTensor, &HookContext) + Send + Sync + 'static,
    ) -> Hooks {
        self.closures.push((point, Arc::new(closure)));
        self
    }

    /// Returns whether there is no intervention and no closure.
    pub fn is_empty(&self) -> bool {
        self.interventions.is_empty() && self.closures.is_empty()
    }

    /// Returns whether anything acts at `point`.
    pub(crate) fn acts_at(&self, point: HookPoint) -> bool {
        self.interventions.iter().any(|i| i.hook_point() == point)
            || self.closures.iter().any(|(p, _)| *p == point)
    }

    pub(crate) fn interventions_at(&self, point: HookPoint) -> impl Iterator<Item = &Intervention> {
        self.interventions
            .iter()
            .filter(move |i| i.hook_point() == point)
    }

    pub(crate) fn closures_at(&self, point: HookPoint) -> impl Iterator<Item = &HookFn> {
        self.closures
            .iter()
            .filter(move |(p, _)| *p == point)
            .map(|(_, f)| f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(spec: &PatternSpec, query: usize, key_len: usize) -> Vec<f32> {
        let mut row = vec![0.0; key_len];
        spec.fill_row(query, key_len, &mut row).unwrap();
        row
    }

    #[test]
    fn builtin_pattern_rows() {
        assert_eq!(row(&PatternSpec::Uniform, 1, 3), vec![0.5, 0.5, 0.0]);
        assert_eq!(row(&PatternSpec::PreviousToken, 0, 3), vec![1.0, 0.0, 0.0]);
        assert_eq!(row(&PatternSpec::PreviousToken, 2, 3), vec![0.0, 1.0, 0.0]);
        assert_eq!(row(&PatternSpec::FirstToken, 2, 3), vec![1.0, 0.0, 0.0]);
        assert_eq!(row(&PatternSpec::SelfToken, 1, 3), vec![0.0, 1.0, 0.0]);
        assert_eq!(row(&PatternSpec::Position(1), 0, 3), vec![1.0, 0.0, 0.0]);
        assert_eq!(row(&PatternSpec::Position(1), 2, 3), vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn fixed_pattern_too_small_is_error() {
        let table = HostTensor::zeros(vec![2, 2]).unwrap();
        let mut out = vec![0.0; 3];
        let error = PatternSpec::Fixed(table)
            .fill_row(2, 3, &mut out)
            .unwrap_err();
        assert!(matches!(error, ModelError::ShapeMismatch { .. }), "{error}");
    }
}
