//! Attention with the `hook_attn_scores` and `hook_pattern` hooks: recording them, and replacing
//! patterns through the backend's pattern overrides.
//!
//! Two paths: when every pattern intervention covers a whole head (all batch items, all positions)
//! and no closure or score patch is active, the overrides are built on the host and the attention
//! runs once. Otherwise the clean pattern is read back, edited on the host (score patches and
//! closures, then pattern interventions in order, then pattern closures), and the heads whose
//! pattern changed are overridden in a second attention call.

use qwenlens_kernels::{AttentionParams, PatternOverride, Tensor};

use crate::cache::HostTensor;
use crate::error::{ModelError, Result};
use crate::forward::{Pass, bit_equal};
use crate::hooks::{BlockHook, HookPoint};
use crate::interventions::{Intervention, PatternSpec, Scope};

/// Runs one layer's attention with its score and pattern hooks; returns `z`,
/// `[batch * q_len, n_heads, d_head]`.
pub(crate) fn attention(
    pass: &mut Pass<'_>,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: AttentionParams,
) -> Result<Tensor> {
    let scores_point = HookPoint::block(layer, BlockHook::AttnScores);
    let pattern_point = HookPoint::block(layer, BlockHook::Pattern);
    let hooks = pass.hooks();
    let backend = pass.backend();

    let score_patches: Vec<&Intervention> = hooks.interventions_at(scores_point).collect();
    let scores_closures = hooks.closures_at(scores_point).count() > 0;
    let pattern_interventions: Vec<&Intervention> = hooks.interventions_at(pattern_point).collect();
    let pattern_closures = hooks.closures_at(pattern_point).count() > 0;
    let edits_scores = !score_patches.is_empty() || scores_closures;

    let whole_heads = pattern_interventions.iter().all(|i| covers_whole_heads(i));
    if !edits_scores && !pattern_closures && whole_heads {
        let mut edited = HostPatterns::new(pass, None)?;
        for intervention in &pattern_interventions {
            edited.apply(pass, pattern_point, intervention)?;
        }
        let overrides = edited.overrides(pass)?;
        let params = AttentionParams {
            want_scores: pass.records(scores_point),
            want_pattern: pass.records(pattern_point),
            ..params
        };
        let output = backend.attention(q, k, v, &params, &overrides)?;
        if let Some(scores) = &output.scores {
            let tensor = read_attention(pass, scores)?;
            pass.record(scores_point, tensor);
        }
        if let Some(pattern) = &output.pattern {
            let tensor = read_attention(pass, pattern)?;
            pass.record(pattern_point, tensor);
        }
        return Ok(output.z);
    }

    // Host path: read the clean pattern (and scores), edit them, override what changed.
    let clean_params = AttentionParams {
        want_scores: edits_scores || pass.records(scores_point),
        want_pattern: true,
        ..params.clone()
    };
    let clean = backend.attention(q, k, v, &clean_params, &[])?;
    let clean_pattern = read_attention(pass, clean.pattern.as_ref().expect("pattern requested"))?;
    let mut pattern = clean_pattern.clone();

    if let Some(scores) = &clean.scores {
        let mut scores = read_attention(pass, scores)?;
        if edits_scores {
            let original = scores.clone();
            let mut edited = HostPatterns::new(pass, Some(scores))?;
            for intervention in &score_patches {
                edited.apply(pass, scores_point, intervention)?;
            }
            scores = edited.tensor;
            pass.run_closures(scores_point, &mut scores)?;
            softmax_changed_rows(&original, &scores, &mut pattern, params.kv_len);
        }
        pass.record(scores_point, scores);
    }

    let mut edited = HostPatterns::new(pass, Some(pattern))?;
    for intervention in &pattern_interventions {
        edited.apply(pass, pattern_point, intervention)?;
    }
    let mut pattern = edited.tensor;
    pass.run_closures(pattern_point, &mut pattern)?;

    let heads = changed_heads(&clean_pattern, &pattern, params.n_heads);
    let overrides = heads
        .iter()
        .map(|head| head_override(pass, &pattern, *head))
        .collect::<Result<Vec<_>>>()?;
    pass.record(pattern_point, pattern);
    if overrides.is_empty() {
        return Ok(clean.z);
    }

    let params = AttentionParams {
        want_scores: false,
        want_pattern: false,
        ..params
    };
    Ok(backend.attention(q, k, v, &params, &overrides)?.z)
}

/// Returns whether a pattern intervention replaces whole heads (every batch item and query row).
fn covers_whole_heads(intervention: &Intervention) -> bool {
    match intervention {
        Intervention::ReplacePattern { scope, .. } | Intervention::PatchFromCache { scope, .. } => {
            scope.is_all()
        }
        _ => false,
    }
}

fn read_attention(pass: &Pass<'_>, tensor: &Tensor) -> Result<HostTensor> {
    let data = pass.backend().read(tensor)?;
    HostTensor::new(tensor.shape().to_vec(), data)
}

/// A `[batch, n_heads, q_len, kv_len]` pattern (or scores) on the host, with the heads touched by
/// interventions so far.
struct HostPatterns {
    tensor: HostTensor,
    touched: Vec<bool>,
}

impl HostPatterns {
    fn new(pass: &Pass<'_>, tensor: Option<HostTensor>) -> Result<HostPatterns> {
        let n_heads = pass.model().config().n_heads();
        let tensor = match tensor {
            Some(tensor) => tensor,
            None => HostTensor::zeros(vec![pass.batch, n_heads, pass.q_len, pass.kv_len()])?,
        };
        Ok(HostPatterns {
            tensor,
            touched: vec![false; n_heads],
        })
    }

    fn row_mut(&mut self, b: usize, head: usize, i: usize) -> &mut [f32] {
        let [_, n_heads, q_len, kv_len] = self.tensor.shape[..] else {
            unreachable!("attention tensors have four dimensions")
        };
        let start = ((b * n_heads + head) * q_len + i) * kv_len;
        &mut self.tensor.data[start..start + kv_len]
    }

    /// Applies a pattern replacement or a patch from a cache to the in-scope rows.
    fn apply(
        &mut self,
        pass: &Pass<'_>,
        point: HookPoint,
        intervention: &Intervention,
    ) -> Result<()> {
        match intervention {
            Intervention::ReplacePattern {
                head,
                pattern,
                scope,
                ..
            } => self.replace(pass, *head, pattern, scope),
            Intervention::PatchFromCache {
                source,
                heads,
                scope,
                ..
            } => {
                let n_heads = self.touched.len();
                let all: Vec<usize> = (0..n_heads).collect();
                self.patch(pass, point, source, heads.as_deref().unwrap_or(&all), scope)
            }
            other => Err(ModelError::InvalidArgument(format!(
                "{other:?} cannot act at `{point}`; attention scores and patterns take pattern replacements and patches"
            ))),
        }
    }

    fn replace(
        &mut self,
        pass: &Pass<'_>,
        head: usize,
        spec: &PatternSpec,
        scope: &Scope,
    ) -> Result<()> {
        let kv_len = pass.kv_len();
        for b in (0..pass.batch).filter(|b| scope.has_item(*b)) {
            let pad = pass.padding[b];
            for i in 0..pass.q_len {
                let key = pass.first + i;
                if !scope.has_position(key) {
                    continue;
                }
                let row = self.row_mut(b, head, i);
                row.fill(0.0);

                // Padding queries see no key: their row stays zero, as the backend leaves it.
                if key >= pad {
                    spec.fill_row(key - pad, kv_len - pad, &mut row[pad..])?;
                }
            }
        }
        self.touched[head] = true;
        Ok(())
    }

    /// Copies rows of `source` (`[batch or 1, n_heads, Q, K]`, covering this pass's query rows and
    /// keys; its query `r` sits at sequence position `K − Q + r`).
    fn patch(
        &mut self,
        pass: &Pass<'_>,
        point: HookPoint,
        source: &HostTensor,
        heads: &[usize],
        scope: &Scope,
    ) -> Result<()> {
        let n_heads = self.touched.len();
        let kv_len = pass.kv_len();
        let shape_error = || ModelError::ShapeMismatch {
            what: format!(
                "patch source for `{point}` (batch {} or 1, {n_heads} heads, covering query positions {}..{} and {kv_len} keys)",
                pass.batch, pass.first, kv_len
            ),
            expected: vec![pass.batch, n_heads, pass.q_len, kv_len],
            found: source.shape.clone(),
        };
        let [source_batch, source_heads, source_q, source_k] = source.shape[..] else {
            return Err(shape_error());
        };
        let offset = source_k.checked_sub(source_q).ok_or_else(shape_error)?;
        if (source_batch != pass.batch && source_batch != 1)
            || source_heads != n_heads
            || source_k < kv_len
            || pass.first < offset
            || pass.first + pass.q_len - offset > source_q
        {
            return Err(shape_error());
        }

        for b in (0..pass.batch).filter(|b| scope.has_item(*b)) {
            let source_b = if source_batch == 1 { 0 } else { b };
            for &head in heads {
                for i in (0..pass.q_len).filter(|i| scope.has_position(pass.first + i)) {
                    let source_row = pass.first + i - offset;
                    let start = ((source_b * n_heads + head) * source_q + source_row) * source_k;
                    let values = &source.data[start..start + kv_len];
                    self.row_mut(b, head, i).copy_from_slice(values);
                }
                self.touched[head] = true;
            }
        }
        Ok(())
    }

    /// Pattern overrides for the touched heads (fast path: every touched head is fully replaced).
    fn overrides(&self, pass: &Pass<'_>) -> Result<Vec<PatternOverride>> {
        (0..self.touched.len())
            .filter(|head| self.touched[*head])
            .map(|head| head_override(pass, &self.tensor, head))
            .collect()
    }
}

/// Uploads one head's `[batch, q_len, kv_len]` slice of a host pattern as an override.
fn head_override(pass: &Pass<'_>, pattern: &HostTensor, head: usize) -> Result<PatternOverride> {
    let [batch, n_heads, q_len, kv_len] = pattern.shape[..] else {
        unreachable!("attention tensors have four dimensions")
    };
    let block = q_len * kv_len;
    let mut values = Vec::with_capacity(batch * block);
    for b in 0..batch {
        let start = (b * n_heads + head) * block;
        values.extend_from_slice(&pattern.data[start..start + block]);
    }
    let tensor = pass.backend().upload(&values, &[batch, q_len, kv_len])?;
    Ok(PatternOverride {
        head,
        pattern: tensor,
    })
}

/// Heads whose pattern differs (bitwise) between `clean` and `edited`.
fn changed_heads(clean: &HostTensor, edited: &HostTensor, n_heads: usize) -> Vec<usize> {
    let [batch, _, q_len, kv_len] = clean.shape[..] else {
        unreachable!("attention tensors have four dimensions")
    };
    let block = q_len * kv_len;
    (0..n_heads)
        .filter(|head| {
            (0..batch).any(|b| {
                let start = (b * n_heads + head) * block;
                !bit_equal(
                    &clean.data[start..start + block],
                    &edited.data[start..start + block],
                )
            })
        })
        .collect()
}

/// Recomputes the pattern rows whose scores changed: softmax over the keys, where `-inf` scores get
/// weight 0 and a row of only `-inf` gets a zero row.
fn softmax_changed_rows(
    original: &HostTensor,
    scores: &HostTensor,
    pattern: &mut HostTensor,
    kv_len: usize,
) {
    for ((old, new), out) in original
        .data
        .chunks(kv_len)
        .zip(scores.data.chunks(kv_len))
        .zip(pattern.data.chunks_mut(kv_len))
    {
        if bit_equal(old, new) {
            continue;
        }
        let max = new.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            out.fill(0.0);
            continue;
        }
        let mut sum = 0.0f32;
        for (o, s) in out.iter_mut().zip(new) {
            *o = (s - max).exp();
            sum += *o;
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
}
