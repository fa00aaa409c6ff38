//! Grouped-query attention with causal mask, left padding and pattern overrides.

use rayon::prelude::*;

use gemm::Parallelism;

use super::OutPtr;
use crate::backend::AttentionParams;

/// Outputs of [`attention`] as flat buffers.
pub(super) struct Outputs {
    pub z: Vec<f32>,
    pub scores: Option<Vec<f32>>,
    pub pattern: Option<Vec<f32>>,
}

/// Query rows per rayon task: enough rows for `gemm` to reach its speed, few enough that the
/// causal triangle wastes little (a block computes scores up to its last row's keys) and that the
/// tasks balance over the threads.
const ROWS_PER_TASK: usize = 32;

/// Per-task scratch: the `[rows, keys]` scores and pattern of one block of query rows.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    pattern: Vec<f32>,
}

/// Runs attention on validated operands; `overrides` pairs a head with its `[batch, q_len, kv_len]`
/// pattern. Parallel over (batch item, query head, block of query rows); within a task `q · kᵀ`
/// and `pattern · v` are two `gemm` calls over the keys the block can see.
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
    // larger than q, k and v.
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
    let q_stride = p.n_heads * d_head;
    let kv_stride = p.n_kv_heads * d_head;

    (0..pairs * blocks)
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            let (pair, block) = (task / blocks, task % blocks);
            let (b, h) = (pair / p.n_heads, pair % p.n_heads);
            let kv_head = h / (p.n_heads / p.n_kv_heads);
            let first_row = block * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(q_len - first_row);
            let head_override = overrides
                .iter()
                .find(|(head, _)| *head == h)
                .map(|(_, values)| &values[b * plane..(b + 1) * plane]);

            // Keys `key_start[b]..=kv_len - q_len + i` are visible to query row `i`. An overridden
            // pattern may weight any key, so its `z` sums over all of them.
            let first_key = p.key_start[b].min(kv_len);
            let end_key = kv_len - q_len + first_row + rows;
            let (sum_from, sum_to) = match head_override {
                Some(_) => (0, kv_len),
                None => (first_key, end_key.max(first_key)),
            };
            let keys = sum_to - sum_from;

            scratch.scores.clear();
            scratch.scores.resize(rows * keys, 0.0);
            scratch.pattern.clear();
            scratch.pattern.resize(rows * keys, 0.0);
            let q_block = &q[((b * q_len + first_row) * p.n_heads + h) * d_head..];
            let k_block = &k[((b * kv_len + sum_from) * p.n_kv_heads + kv_head) * d_head..];
            let v_block = &v[((b * kv_len + sum_from) * p.n_kv_heads + kv_head) * d_head..];
            if keys > 0 {
                // SAFETY: lhs is rows `first_row..first_row + rows` of head `h` in `q` (row stride
                // n_heads * d_head), rhs is keys `sum_from..sum_to` of KV head `kv_head` transposed
                // (column stride n_kv_heads * d_head); both lie inside the validated operands, and dst
                // is the task's own `[rows, keys]` scratch.
                unsafe {
                    gemm::gemm(
                        rows,
                        keys,
                        d_head,
                        scratch.scores.as_mut_ptr(),
                        1,
                        keys as isize,
                        false,
                        q_block.as_ptr(),
                        1,
                        q_stride as isize,
                        k_block.as_ptr(),
                        kv_stride as isize,
                        1,
                        0.0,
                        p.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }

            for r in 0..rows {
                let i = first_row + r;
                let last_key = kv_len - q_len + i;
                let score_row = &mut scratch.scores[r * keys..(r + 1) * keys];
                let pattern_row = &mut scratch.pattern[r * keys..(r + 1) * keys];
                for (j, score) in (sum_from..sum_to).zip(score_row.iter_mut()) {
                    if j < first_key || j > last_key {
                        *score = f32::NEG_INFINITY;
                    }
                }
                if first_key <= last_key && first_key < kv_len {
                    let visible = first_key - sum_from..last_key + 1 - sum_from;
                    softmax(&score_row[visible.clone()], &mut pattern_row[visible]);
                }

                let plane_row = (pair * q_len + i) * kv_len;
                if let Some(out) = scores_out {
                    // SAFETY: row `i` of head `h` of batch item `b` is written by this task only.
                    let out = unsafe { out.slice(plane_row, kv_len) };
                    out.fill(f32::NEG_INFINITY);
                    out[sum_from..sum_to].copy_from_slice(score_row);
                }
                if let Some(values) = head_override {
                    pattern_row.copy_from_slice(&values[i * kv_len..(i + 1) * kv_len]);
                }
                if let Some(out) = pattern_out {
                    // SAFETY: as above.
                    let out = unsafe { out.slice(plane_row, kv_len) };
                    out.fill(0.0);
                    out[sum_from..sum_to].copy_from_slice(pattern_row);
                }
            }

            if keys > 0 {
                // SAFETY: dst is rows `first_row..first_row + rows` of head `h` in `z` (row stride
                // n_heads * d_head), written by this task only; lhs is the task's `[rows, keys]`
                // pattern; rhs is keys `sum_from..sum_to` of KV head `kv_head` in `v`.
                unsafe {
                    gemm::gemm(
                        rows,
                        d_head,
                        keys,
                        z_out.at(((b * q_len + first_row) * p.n_heads + h) * d_head),
                        1,
                        q_stride as isize,
                        false,
                        scratch.pattern.as_ptr(),
                        1,
                        keys as isize,
                        v_block.as_ptr(),
                        1,
                        kv_stride as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });

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
