//! Plain scalar implementations of every [`crate::Backend`] operation on host slices, the ground
//! truth that the CPU and GPU backends are tested against.
//!
//! They are written for clarity, not speed: one element at a time, dot products and sums
//! accumulated in f64, and no shape checks beyond debug assertions (the caller passes consistent
//! dimensions). Weights are host bytes in their stored dtype, as in safetensors.

use half::{bf16, f16};

use crate::{AttentionParams, DType};

/// Decodes little-endian weight bytes of `dtype` to f32.
pub fn weight_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as little-endian bytes of `dtype`, rounding to nearest even.
pub fn f32_to_weight_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Gathers rows `ids` of a `[vocab, d_model]` table: `[ids.len(), d_model]`.
pub fn embedding(table: &[f32], d_model: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * d_model..(id as usize + 1) * d_model]
                .iter()
                .copied()
        })
        .collect()
}

/// Computes `x · wᵀ + bias` for `x` `[m, k]` and `w` `[n, k]`: `[m, n]`.
pub fn matmul(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0.0f64;
            for l in 0..k {
                sum += f64::from(x[i * k + l]) * f64::from(w[j * k + l]);
            }
            let b = bias.map_or(0.0, |b| f64::from(b[j]));
            out[i * n + j] = (sum + b) as f32;
        }
    }
    out
}

/// `(x / scale, scale)` per row of `width`, `scale = sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], width: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut normalized = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / width);
    for row in x.chunks_exact(width) {
        let mean_sq = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / width as f64;
        let scale = (mean_sq + f64::from(eps)).sqrt();
        scales.push(scale as f32);
        normalized.extend(row.iter().map(|&v| (f64::from(v) / scale) as f32));
    }
    (normalized, scales)
}

/// Multiplies every row of `x` by `weight`, element-wise.
pub fn mul_weight(x: &[f32], weight: &[f32]) -> Vec<f32> {
    x.chunks_exact(weight.len())
        .flat_map(|row| row.iter().zip(weight).map(|(&a, &b)| a * b))
        .collect()
}

/// Applies the rotate-half rotary embedding to `x` `[rows, n_heads, d_head]`, row `r` at position
/// `positions[r]`.
///
/// The angle is `positions[r] · inv_freq[k]` as an f32 product with
/// `inv_freq[k] = theta^(-2k / d_head)` rounded to f32, as Hugging Face transformers computes it.
pub fn rope(x: &[f32], positions: &[u32], n_heads: usize, d_head: usize, theta: f32) -> Vec<f32> {
    let half = d_head / 2;
    let mut out = vec![0.0f32; x.len()];
    for (r, &position) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let base = (r * n_heads + h) * d_head;
            for i in 0..half {
                let inv_freq = (f64::from(theta)).powf(-2.0 * i as f64 / d_head as f64) as f32;
                let angle = position as f32 * inv_freq;
                let (sin, cos) = (f64::from(angle.sin()), f64::from(angle.cos()));
                let (lo, hi) = (f64::from(x[base + i]), f64::from(x[base + half + i]));
                out[base + i] = (lo * cos - hi * sin) as f32;
                out[base + half + i] = (hi * cos + lo * sin) as f32;
            }
        }
    }
    out
}

/// Outputs of [`attention`]: `z` `[batch * q_len, n_heads, d_head]`, scores (`-inf` where masked)
/// and pattern `[batch, n_heads, q_len, kv_len]`.
#[derive(Clone, Debug)]
pub struct AttentionReference {
    pub z: Vec<f32>,
    pub scores: Vec<f32>,
    pub pattern: Vec<f32>,
}

/// Grouped-query attention with the masking rules of [`AttentionParams`]; `overrides` pairs a query
/// head with its `[batch, q_len, kv_len]` replacement pattern.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &AttentionParams,
    overrides: &[(usize, Vec<f32>)],
) -> AttentionReference {
    let (d, kv_len, q_len) = (p.d_head, p.kv_len, p.q_len);
    let group = p.n_heads / p.n_kv_heads;
    let plane_len = p.batch * p.n_heads * q_len * kv_len;
    let mut scores = vec![f32::NEG_INFINITY; plane_len];
    let mut pattern = vec![0.0f32; plane_len];
    let mut z = vec![0.0f32; p.batch * q_len * p.n_heads * d];

    for b in 0..p.batch {
        for h in 0..p.n_heads {
            let kv_head = h / group;
            for i in 0..q_len {
                let row = ((b * p.n_heads + h) * q_len + i) * kv_len;
                let q_at = ((b * q_len + i) * p.n_heads + h) * d;
                let key_at = |j: usize| ((b * kv_len + j) * p.n_kv_heads + kv_head) * d;
                let last = kv_len - q_len + i;
                let visible: Vec<usize> = (p.key_start[b]..kv_len).filter(|&j| j <= last).collect();

                let mut logits = Vec::with_capacity(visible.len());
                for &j in &visible {
                    let dot: f64 = (0..d)
                        .map(|l| f64::from(q[q_at + l]) * f64::from(k[key_at(j) + l]))
                        .sum();
                    let score = dot * f64::from(p.scale);
                    scores[row + j] = score as f32;
                    logits.push(score);
                }
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|&s| (s - max).exp()).sum();
                for (&j, &s) in visible.iter().zip(&logits) {
                    pattern[row + j] = ((s - max).exp() / total) as f32;
                }

                if let Some((_, values)) = overrides.iter().find(|(head, _)| *head == h) {
                    let from = (b * q_len + i) * kv_len;
                    pattern[row..row + kv_len].copy_from_slice(&values[from..from + kv_len]);
                }

                for l in 0..d {
                    let sum: f64 = (0..kv_len)
                        .map(|j| f64::from(pattern[row + j]) * f64::from(v[key_at(j) + l]))
                        .sum();
                    z[q_at + l] = sum as f32;
                }
            }
        }
    }
    AttentionReference { z, scores, pattern }
}

/// `silu(gate) · up`, element-wise.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = f64::from(g);
            (g / (1.0 + (-g).exp()) * f64::from(u)) as f32
        })
        .collect()
}

/// `a + b`, element-wise.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(&a, &b)| a + b).collect()
}

/// `replacement` where `mask != 0`, else `x`.
pub fn select(mask: &[f32], x: &[f32], replacement: &[f32]) -> Vec<f32> {
    (0..x.len())
        .map(|i| if mask[i] != 0.0 { replacement[i] } else { x[i] })
        .collect()
}

/// Appends `new` `[batch * n, row]` after `cache` `[batch * t, row]` per batch item.
pub fn concat_seq(cache: &[f32], new: &[f32], batch: usize, row: usize) -> Vec<f32> {
    let cached = cache.len() / batch / row;
    let added = new.len() / batch / row;
    let mut out = Vec::new();
    for b in 0..batch {
        out.extend_from_slice(&cache[b * cached * row..(b + 1) * cached * row]);
        out.extend_from_slice(&new[b * added * row..(b + 1) * added * row]);
    }
    out
}

/// Gathers rows `rows` of `x` viewed as `[_, width]`.
pub fn gather_rows(x: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| x[r * width..(r + 1) * width].iter().copied())
        .collect()
}

/// `log Σ exp` of each row of `width`, in f64.
pub fn logsumexp(x: &[f32], width: usize) -> Vec<f32> {
    x.chunks_exact(width)
        .map(|row| {
            let max = row
                .iter()
                .map(|&v| f64::from(v))
                .fold(f64::NEG_INFINITY, f64::max);
            if !max.is_finite() {
                return max as f32;
            }
            let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            (max + sum.ln()) as f32
        })
        .collect()
}

/// Picks `x[r, cols[r]]` for each row of `width`.
pub fn gather_cols(x: &[f32], width: usize, cols: &[u32]) -> Vec<f32> {
    cols.iter()
        .enumerate()
        .map(|(r, &c)| x[r * width + c as usize])
        .collect()
}
