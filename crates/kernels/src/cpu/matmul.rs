//! `x · Wᵀ (+ bias)`: a GEMV over rows of W for decode, `gemm` on f32 blocks of W for prefill.

use gemm::Parallelism;
use rayon::prelude::*;

use super::simd::{self, DotFn};
use super::{CpuWeightData, OutPtr};

/// Up to this many input rows the GEMV path runs: it reads each weight row once from memory in its
/// stored dtype and reuses it for all input rows while it sits in L1.
const GEMV_MAX_ROWS: usize = 4;

/// Size in bytes of the f32 copy of one block of weight rows in the prefill path, chosen to stay in
/// a core's L2 cache next to the packed operands of `gemm`.
const BLOCK_BYTES: usize = 384 * 1024;

/// Output columns per rayon task in the GEMV path: large enough to amortize the task, small enough
/// for load balance over 151 936 vocabulary rows.
const GEMV_ROWS_PER_TASK: usize = 64;

/// Computes `x · wᵀ + bias` for `x` `[m, k]` and `w` `[n, k]`: returns `[m, n]`.
pub(super) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &CpuWeightData,
    n: usize,
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let mut out = if m == 0 || n == 0 || k == 0 {
        vec![0.0; m * n]
    } else if m <= GEMV_MAX_ROWS {
        match w {
            CpuWeightData::F32(values) => gemv(x, m, k, values, n, simd::dot_f32_fn()),
            CpuWeightData::Bf16(values) => gemv(x, m, k, values, n, simd::dot_bf16_fn()),
            CpuWeightData::F16(values) => gemv(x, m, k, values, n, simd::dot_f16_fn()),
        }
    } else {
        match w {
            CpuWeightData::F32(values) => gemm_f32(x, m, k, values, n, threads),
            _ => gemm_blocked(x, m, k, w, n),
        }
    };

    if let Some(bias) = bias {
        out.par_chunks_mut(n.max(1)).for_each(|row| {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        });
    }
    out
}

/// Few input rows: each task takes a run of weight rows and dots each with every input row.
fn gemv<T: Sync>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, dot: DotFn<T>) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    let out_ptr = OutPtr::new(&mut out);

    (0..n.div_ceil(GEMV_ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let first = task * GEMV_ROWS_PER_TASK;
            for col in first..(first + GEMV_ROWS_PER_TASK).min(n) {
                let w_row = &w[col * k..(col + 1) * k];
                for row in 0..m {
                    let value = dot(&x[row * k..(row + 1) * k], w_row);
                    // SAFETY: `row * n + col` is in bounds, and only this task writes column `col`.
                    unsafe { *out_ptr.at(row * n + col) = value };
                }
            }
        });
    out
}

/// f32 weights: one `gemm` call over the whole product, parallelized by `gemm` itself.
fn gemm_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, threads: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: dst is `[m, n]` row-major, lhs `x` is `[m, k]` row-major and rhs is `wᵀ` (`[k, n]`,
    // element `(i, j)` at `w[j * k + i]`); all three buffers hold exactly those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    out
}

/// bf16 and f16 weights with many input rows: each task converts a block of weight rows to f32 in
/// its own scratch buffer and runs a single-threaded `gemm` on it. The conversion costs O(n·k)
/// against the O(m·n·k) product, and no f32 copy of the whole weight is ever made.
fn gemm_blocked(x: &[f32], m: usize, k: usize, w: &CpuWeightData, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    let out_ptr = OutPtr::new(&mut out);
    let block_rows = (BLOCK_BYTES / (4 * k)).clamp(16, 512) / 16 * 16;
    let block_rows = block_rows.min(
        n.div_ceil(2 * rayon::current_num_threads())
            .next_multiple_of(16),
    );

    (0..n.div_ceil(block_rows)).into_par_iter().for_each_init(
        Vec::new,
        |scratch: &mut Vec<f32>, block| {
            let first = block * block_rows;
            let rows = block_rows.min(n - first);
            scratch.resize(rows * k, 0.0);
            w.to_f32_into(first * k..(first + rows) * k, scratch);

            // SAFETY: dst is columns `first..first + rows` of the `[m, n]` output (row stride n), which
            // no other task writes; lhs is `x` `[m, k]`; rhs is the block transposed (`[k, rows]`).
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    out_ptr.at(first),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    scratch.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
    out
}
