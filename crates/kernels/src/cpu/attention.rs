//! Grouped-query attention with causal mask, left padding and pattern overrides.

use rayon::prelude::*;

use super::simd;
use crate::backend::{AttentionParams, PatternOverride};
use crate::{KernelError, Result, Tensor};

/// Outputs of [`attention`] as flat buffers.
pub(super) struct Outputs {
    pub z: Vec<f32>,
    pub scores: Option<Vec<f32>>,
    pub pattern: Option<Vec<f32>>,
}

fn shape_error(detail: String) -> KernelError {
    KernelError::Shape {
        op: "attention",
        detail,
    }
}

/// Checks that `x` is `[rows, heads, d_head]` (or its flat form `[rows, heads * d_head]`).
fn check_operand(name: &str, x: &Tensor, rows: usize, heads: usize, d_head: usize) -> Result<()> {
    let shape = x.shape();
    if shape == [rows, heads, d_head] || shape == [rows, heads * d_head] {
        Ok(())
    } else {
        Err(shape_error(format!(
            "{name} has shape {shape:?}, expected [{rows}, {heads}, {d_head}] (batch * len, heads, d_head)"
        )))
    }
}

/// Checks the operands against `params` before any work starts.
pub(super) fn validate(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &AttentionParams,
    overrides: &[PatternOverride],
) -> Result<()> {
    let p = params;
    if p.d_head == 0 {
        return Err(shape_error("d_head must be positive".to_string()));
    }
    if p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
        return Err(shape_error(format!(
            "n_heads {} must be a positive multiple of n_kv_heads {}",
            p.n_heads, p.n_kv_heads
        )));
    }
    if p.q_len > p.kv_len {
        return Err(shape_error(format!(
            "q_len {} exceeds kv_len {}: queries must be the last q_len of the kv_len positions",
            p.q_len, p.kv_len
        )));
    }
    if p.key_start.len() != p.batch {
        return Err(shape_error(format!(
            "key_start has {} entries for a batch of {}",
            p.key_start.len(),
            p.batch
        )));
    }
    check_operand("q", q, p.batch * p.q_len, p.n_heads, p.d_head)?;
    check_operand("k", k, p.batch * p.kv_len, p.n_kv_heads, p.d_head)?;
    check_operand("v", v, p.batch * p.kv_len, p.n_kv_heads, p.d_head)?;

    let mut seen = vec![false; p.n_heads];
    for o in overrides {
        if o.head >= p.n_heads {
            return Err(KernelError::OutOfRange {
                op: "attention",
                what: "override head",
                value: o.head,
                limit: p.n_heads,
            });
        }
        if std::mem::replace(&mut seen[o.head], true) {
            return Err(shape_error(format!(
                "two pattern overrides for head {}; give at most one per head",
                o.head
            )));
        }
        if o.pattern.shape() != [p.batch, p.q_len, p.kv_len] {
            return Err(shape_error(format!(
                "override pattern of head {} has shape {:?}, expected [{}, {}, {}] (batch, q_len, kv_len)",
                o.head,
                o.pattern.shape(),
                p.batch,
                p.q_len,
                p.kv_len
            )));
        }
    }
    Ok(())
}

/// Runs attention on validated operands; `overrides` pairs a head with its `[batch, q_len, kv_len]`
/// pattern. Parallel over (batch item, query head).
pub(super) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    params: &AttentionParams,
    overrides: &[(usize, &[f32])],
) -> Outputs {
    let p = params;
    let (q_len, kv_len, d_head) = (p.q_len, p.kv_len, p.d_head);
    let group = p.n_heads / p.n_kv_heads;
    let pairs = p.batch * p.n_heads;
    let plane = q_len * kv_len;
    if pairs == 0 || q_len == 0 {
        return Outputs {
            z: Vec::new(),
            scores: p.want_scores.then(Vec::new),
            pattern: p.want_pattern.then(Vec::new),
        };
    }

    // Each (batch item, head) pair owns one contiguous `[q_len, kv_len]` plane of scores and pattern
    // (the `[batch, n_heads, q_len, kv_len]` layout) and one `[q_len, d_head]` block of z, which is
    // interleaved into `[batch * q_len, n_heads, d_head]` afterwards.
    let mut scores = vec![0.0f32; pairs * plane];
    let mut pattern = vec![0.0f32; pairs * plane];
    let mut z_by_head = vec![0.0f32; pairs * q_len * d_head];

    scores
        .par_chunks_mut(plane.max(1))
        .zip(pattern.par_chunks_mut(plane.max(1)))
        .zip(z_by_head.par_chunks_mut((q_len * d_head).max(1)))
        .enumerate()
        .for_each(|(pair, ((scores, pattern), z))| {
            let (b, h) = (pair / p.n_heads, pair % p.n_heads);
            let kv_head = h / group;
            let head_override = overrides
                .iter()
                .find(|(head, _)| *head == h)
                .map(|(_, values)| &values[b * plane..(b + 1) * plane]);

            for i in 0..q_len {
                let last = kv_len - q_len + i;
                let first = p.key_start[b];
                let q_row = &q[((b * q_len + i) * p.n_heads + h) * d_head..][..d_head];
                let key = |j: usize| ((b * kv_len + j) * p.n_kv_heads + kv_head) * d_head;
                let score_row = &mut scores[i * kv_len..(i + 1) * kv_len];
                let pattern_row = &mut pattern[i * kv_len..(i + 1) * kv_len];

                score_row.fill(f32::NEG_INFINITY);
                if first <= last {
                    for j in first..=last {
                        score_row[j] = p.scale * simd::dot_f32(q_row, &k[key(j)..key(j) + d_head]);
                    }
                    softmax(&score_row[first..=last], &mut pattern_row[first..=last]);
                }

                let visible = match head_override {
                    Some(values) => {
                        pattern_row.copy_from_slice(&values[i * kv_len..(i + 1) * kv_len]);
                        0..kv_len
                    }
                    None if first <= last => first..last + 1,
                    None => 0..0,
                };

                let z_row = &mut z[i * d_head..(i + 1) * d_head];
                for j in visible {
                    let weight = pattern_row[j];
                    if weight == 0.0 {
                        continue;
                    }
                    for (out, &value) in z_row.iter_mut().zip(&v[key(j)..key(j) + d_head]) {
                        *out += weight * value;
                    }
                }
            }
        });

    let mut z = vec![0.0f32; z_by_head.len()];
    for (pair, block) in z_by_head.chunks_exact(q_len * d_head).enumerate() {
        let (b, h) = (pair / p.n_heads, pair % p.n_heads);
        for (i, row) in block.chunks_exact(d_head).enumerate() {
            let start = ((b * q_len + i) * p.n_heads + h) * d_head;
            z[start..start + d_head].copy_from_slice(row);
        }
    }

    Outputs {
        z,
        scores: p.want_scores.then_some(scores),
        pattern: p.want_pattern.then_some(pattern),
    }
}

/// Softmax of `scores` into `out`, in f32 after subtracting the max.
fn softmax(scores: &[f32], out: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (o, &s) in out.iter_mut().zip(scores) {
        *o = (s - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}
