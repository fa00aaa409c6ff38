//! Grouped-query attention with causal mask, left padding and pattern overrides.

use rayon::prelude::*;

use super::OutPtr;
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

/// Query rows per rayon task: enough work to amortize the task, and enough tasks to balance the
/// causal rows (later rows see more keys) over the threads.
const ROWS_PER_TASK: usize = 16;

/// Runs attention on validated operands; `overrides` pairs a head with its `[batch, q_len, kv_len]`
/// pattern. Parallel over (batch item, query head, block of query rows).
pub(super) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    params: &AttentionParams,
    overrides: &[(usize, &[f32])],
) -> Outputs {
    let p = params;
    let (q_len, kv_len, d_head) = (p.q_len, p.kv_len, p.d_head);
    let pairs = p.batch * p.n_heads;
    let plane = q_len * kv_len;

    // Scores and pattern are only materialized when requested: at long contexts they are far
    // larger than q, k and v. Otherwise each task works on one row of scratch.
    let mut z = vec![0.0f32; pairs * q_len * d_head];
    let mut scores = p.want_scores.then(|| vec![0.0f32; pairs * plane]);
    let mut pattern = p.want_pattern.then(|| vec![0.0f32; pairs * plane]);
    if pairs == 0 || q_len == 0 {
        return Outputs { z, scores, pattern };
    }

    let z_out = OutPtr::new(&mut z);
    let scores_out = scores.as_mut().map(|s| OutPtr::new(s));
    let pattern_out = pattern.as_mut().map(|s| OutPtr::new(s));
    let blocks = q_len.div_ceil(ROWS_PER_TASK);
    let dot = simd::dot_f32_fn();

    (0..pairs * blocks).into_par_iter().for_each_init(
        || (vec![0.0f32; kv_len], vec![0.0f32; kv_len]),
        |(score_row, pattern_row), task| {
            let (pair, block) = (task / blocks, task % blocks);
            let (b, h) = (pair / p.n_heads, pair % p.n_heads);
            let kv_head = h / (p.n_heads / p.n_kv_heads);
            let head_override = overrides
                .iter()
                .find(|(head, _)| *head == h)
                .map(|(_, values)| &values[b * plane..(b + 1) * plane]);
            let key = |j: usize| ((b * kv_len + j) * p.n_kv_heads + kv_head) * d_head;

            for i in block * ROWS_PER_TASK..((block + 1) * ROWS_PER_TASK).min(q_len) {
                let last = kv_len - q_len + i;
                let first = p.key_start[b];
                let q_at = ((b * q_len + i) * p.n_heads + h) * d_head;
                let q_row = &q[q_at..q_at + d_head];

                score_row.fill(f32::NEG_INFINITY);
                pattern_row.fill(0.0);
                if first <= last {
                    for j in first..=last {
                        score_row[j] = p.scale * dot(q_row, &k[key(j)..key(j) + d_head]);
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

                // SAFETY: row `i` of head `h` of batch item `b` is written by this task only.
                let z_row = unsafe { z_out.slice(q_at, d_head) };
                for j in visible {
                    let weight = pattern_row[j];
                    if weight == 0.0 {
                        continue;
                    }
                    for (out, &value) in z_row.iter_mut().zip(&v[key(j)..key(j) + d_head]) {
                        *out += weight * value;
                    }
                }

                let plane_row = (pair * q_len + i) * kv_len;
                if let Some(out) = scores_out {
                    // SAFETY: as for `z_row`.
                    unsafe { out.slice(plane_row, kv_len) }.copy_from_slice(score_row);
                }
                if let Some(out) = pattern_out {
                    // SAFETY: as for `z_row`.
                    unsafe { out.slice(plane_row, kv_len) }.copy_from_slice(pattern_row);
                }
            }
        },
    );

    Outputs { z, scores, pattern }
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
