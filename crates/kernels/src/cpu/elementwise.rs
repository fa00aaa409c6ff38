//! Row-wise and element-wise operations, parallel over rows once the tensor is large enough.

use rayon::prelude::*;

/// Below this many elements an operation runs on the calling thread: a rayon task costs about a
/// microsecond, which a few thousand element operations do not pay back.
const PARALLEL_MIN: usize = 1 << 14;

/// Minimum number of rows per rayon task for an operation over rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (PARALLEL_MIN / width.max(1)).max(1)
}

/// `(x / scale, scale)` per row, `scale = sqrt(mean(x²) + eps)`.
pub(super) fn rms_norm(x: &[f32], width: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut normalized = vec![0.0f32; x.len()];
    let mut scale = vec![0.0f32; x.len() / width];
    normalized
        .par_chunks_mut(width)
        .zip(scale.par_iter_mut())
        .zip(x.par_chunks(width))
        .with_min_len(rows_per_task(width))
        .for_each(|((out, s), row)| {
            let sum_sq = super::simd::dot_f32(row, row);
            *s = (sum_sq / width as f32 + eps).sqrt();
            for (o, &v) in out.iter_mut().zip(row) {
                *o = v / *s;
            }
        });
    (normalized, scale)
}

/// Multiplies every row by `weight`.
pub(super) fn mul_rows(x: &[f32], weight: &[f32]) -> Vec<f32> {
    let width = weight.len().max(1);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .with_min_len(rows_per_task(width))
        .for_each(|(out, row)| {
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
                *o = v * w;
            }
        });
    out
}

/// Applies `f` to pairs of elements.
pub(super) fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    out.par_iter_mut()
        .zip(a.par_iter().zip(b))
        .with_min_len(PARALLEL_MIN)
        .for_each(|(o, (&a, &b))| *o = f(a, b));
    out
}

/// Rotate-half rotary embedding of `x` `[rows, n_heads, d_head]`.
///
/// As in Hugging Face transformers, the inverse frequencies are rounded to f32 and the angle is the
/// f32 product `position · inv_freq`, so large positions match its rounding.
pub(super) fn rope(
    x: &[f32],
    positions: &[u32],
    n_heads: usize,
    d_head: usize,
    theta: f32,
) -> Vec<f32> {
    let half = d_head / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| (theta as f64).powf(-2.0 * i as f64 / d_head as f64) as f32)
        .collect();
    let width = n_heads * d_head;
    let mut out = vec![0.0f32; x.len()];
    if width == 0 {
        return out;
    }

    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .zip(positions.par_iter())
        .with_min_len(rows_per_task(width))
        .for_each_init(
            || vec![(0.0f32, 0.0f32); half],
            |cos_sin, ((out, row), &position)| {
                for (cs, &f) in cos_sin.iter_mut().zip(&inv_freq) {
                    let angle = position as f32 * f;
                    *cs = (angle.cos(), angle.sin());
                }
                for (out_head, head) in out.chunks_exact_mut(d_head).zip(row.chunks_exact(d_head)) {
                    let (lo, hi) = head.split_at(half);
                    let (out_lo, out_hi) = out_head.split_at_mut(half);
                    for i in 0..half {
                        let (cos, sin) = cos_sin[i];
                        out_lo[i] = lo[i] * cos - hi[i] * sin;
                        out_hi[i] = hi[i] * cos + lo[i] * sin;
                    }
                }
            },
        );
    out
}

/// `log Σ exp(x)` per row, computed around the row max so that it never overflows.
pub(super) fn logsumexp(x: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len() / width];
    out.par_iter_mut()
        .zip(x.par_chunks(width))
        .with_min_len(rows_per_task(width))
        .for_each(|(o, row)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *o = if max == f32::NEG_INFINITY || max.is_nan() {
                max
            } else if max == f32::INFINITY {
                f32::INFINITY
            } else {
                // An f64 sum keeps the rounding error independent of the vocabulary size.
                let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
                max + sum.ln() as f32
            };
        });
    out
}
