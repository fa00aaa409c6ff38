//! Matmul (prefill kernels and GEMV) and the embedding gather, both over row-chunked weights.

use crate::{KernelError, Result, Tensor, Weight};

use super::pipelines::dtype_code;
use super::{GpuBackend, MatmulKernel};

impl GpuBackend {
    pub(super) fn embedding_impl(&self, table: &Weight, ids: &[u32]) -> Result<Tensor> {
        let op = "embedding";
        let chunks = self.ctx.weight_chunks(op, table)?;
        let [vocab, d] = table.shape() else {
            return Err(KernelError::Shape {
                op,
                detail: format!("table must be [vocab, d], got {:?}", table.shape()),
            });
        };
        let (vocab, d) = (*vocab, *d);
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(KernelError::OutOfRange {
                op,
                what: "token id",
                value: id as usize,
                limit: vocab,
            });
        }

        let out = self.ctx.new_tensor(op, vec![ids.len(), d])?;
        if ids.is_empty() || d == 0 {
            return Ok(out);
        }

        let out_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &out)?)?;
        let ids_buffer = self.ctx.upload_u32("token ids", ids)?;
        let ids_window = self.ctx.whole(op, &ids_buffer)?;
        let grid = self.ctx.grid(op, ids.len() * d, 64)?;
        let pipeline = self.pipelines.embedding.get(table.dtype());

        let mut encoder = self.ctx.encoder();
        for chunk in chunks {
            let table_window = self.ctx.whole(op, &chunk.buffer)?;
            let params = [
                ids.len() as u32,
                d as u32,
                chunk.row_start as u32,
                chunk.rows as u32,
            ];
            self.ctx.dispatch(
                &mut encoder,
                pipeline,
                &[(0, &table_window), (1, &ids_window), (2, &out_window)],
                3,
                &params,
                grid,
            );
        }
        self.ctx.submit(encoder);
        Ok(out)
    }

    pub(super) fn matmul_impl(
        &self,
        x: &Tensor,
        w: &Weight,
        bias: Option<&Weight>,
    ) -> Result<Tensor> {
        let op = "matmul";
        let chunks = self.ctx.weight_chunks(op, w)?;
        let [n, k] = w.shape() else {
            return Err(KernelError::Shape {
                op,
                detail: format!("weight must be [n, k], got {:?}", w.shape()),
            });
        };
        let (n, k) = (*n, *k);
        if x.shape().is_empty() || x.last_dim() != k {
            return Err(KernelError::Shape {
                op,
                detail: format!(
                    "x {:?} does not end in k = {k} of weight {:?}",
                    x.shape(),
                    w.shape()
                ),
            });
        }
        if let Some(bias) = bias
            && bias.shape() != [n]
        {
            return Err(KernelError::Shape {
                op,
                detail: format!(
                    "bias {:?} does not match n = {n} of weight {:?}",
                    bias.shape(),
                    w.shape()
                ),
            });
        }

        let m = x.rows();
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("x has a last dimension") = n;
        let out = self.ctx.new_tensor(op, out_shape)?;
        if m == 0 || n == 0 {
            return Ok(out);
        }

        let x_buffer = self.ctx.tensor_buffer(op, x)?;
        let out_buffer = self.ctx.tensor_buffer(op, &out)?;
        let dummy_bias;
        let (bias_window, bias_mode) = match bias {
            Some(bias) => (
                self.ctx.whole(op, self.ctx.weight_single(op, bias)?)?,
                dtype_code(bias.dtype()) + 1,
            ),
            None => {
                dummy_bias = self.ctx.upload_u32("no bias", &[])?;
                (self.ctx.whole(op, &dummy_bias)?, 0)
            }
        };

        // The GEMV variant follows the prefill kernel: adapters that favour workgroup memory also
        // favour a workgroup cooperating on each output element. The kernels with 16-byte loads need
        // every weight row, and so every x row, to start on a 16-byte boundary.
        let use_gemv = m <= self.gemv_max_rows;
        let rows_aligned = (k * w.dtype().size_in_bytes()).is_multiple_of(16);
        let vec4 = self.vec4_loads && rows_aligned;
        // Each pipeline comes with the output columns and rows that one workgroup covers.
        let (pipelines, block) = match (use_gemv, self.matmul_kernel) {
            (true, MatmulKernel::RegisterBlocked) => (&self.pipelines.gemv, (64, 1)),
            (true, MatmulKernel::Tiled) => (&self.pipelines.gemv_coop, (1, 1)),
            (false, MatmulKernel::RegisterBlocked) => (&self.pipelines.matmul_reg4x4, (32, 32)),
            (false, MatmulKernel::Tiled) => (&self.pipelines.matmul_tiled, (16, 16)),
        };
        let vec4_variant = match (use_gemv, self.matmul_kernel) {
            // 4 columns per invocation in workgroups of 64.
            (true, MatmulKernel::RegisterBlocked) if vec4 => {
                Some((&self.pipelines.gemv_vec4, (256, 1)))
            }
            // 4 × 4 outputs per invocation in workgroups of 8 × 8.
            (false, MatmulKernel::RegisterBlocked) if vec4 => {
                Some((&self.pipelines.matmul_vec4, (32, 32)))
            }
            _ => None,
        };

        // Windows of whole rows must fit both x (row length k) and the output (row length n).
        let x_runs = self.ctx.row_windows(op, m, k)?;
        let out_runs = self.ctx.row_windows(op, m, n)?;
        let rows_per_run = x_runs[0].1.min(out_runs[0].1);

        let mut encoder = self.ctx.encoder();
        for m0 in (0..m).step_by(rows_per_run) {
            let mc = rows_per_run.min(m - m0);
            let x_window = self.ctx.window(op, x_buffer, m0 * k, mc * k)?;
            let out_window = self.ctx.window(op, out_buffer, m0 * n, mc * n)?;
            // The vec4 kernels index x in whole vectors, so the window must start on one.
            let (pipeline, block) = match vec4_variant {
                Some((vec4_pipelines, vec4_block)) if x_window.base.is_multiple_of(4) => {
                    (vec4_pipelines.get(w.dtype()), vec4_block)
                }
                _ => (pipelines.get(w.dtype()), block),
            };
            for chunk in chunks {
                let w_window = self.ctx.whole(op, &chunk.buffer)?;
                let params = [
                    mc as u32,
                    n as u32,
                    k as u32,
                    chunk.row_start as u32,
                    chunk.rows as u32,
                    x_window.base,
                    out_window.base,
                    bias_mode,
                ];
                let (block_cols, block_rows) = block;
                let grid = if use_gemv && block_cols == 1 {
                    let [x, y, _] = self.ctx.grid(op, chunk.rows, 1)?;
                    [x, y, mc as u32]
                } else {
                    [
                        chunk.rows.div_ceil(block_cols) as u32,
                        mc.div_ceil(block_rows) as u32,
                        1,
                    ]
                };
                self.check_grid(op, grid)?;
                self.ctx.dispatch(
                    &mut encoder,
                    pipeline,
                    &[
                        (0, &x_window),
                        (1, &w_window),
                        (2, &bias_window),
                        (3, &out_window),
                    ],
                    4,
                    &params,
                    grid,
                );
            }
        }
        self.ctx.submit(encoder);
        Ok(out)
    }

    fn check_grid(&self, op: &'static str, grid: [u32; 3]) -> Result<()> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension;
        match grid.iter().find(|&&groups| groups > max) {
            Some(&groups) => Err(KernelError::Shape {
                op,
                detail: format!(
                    "{groups} workgroups in one dimension exceed the device maximum of {max}"
                ),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The kernels with 16-byte loads against the reference matmul, at shapes the integration tests
    //! leave out: partial 4-column groups of the GEMV, more than one GEMV workgroup, and x bound in
    //! several windows next to a chunked weight.

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::{GpuBackend, GpuOptions, MatmulKernel};
    use crate::{Backend, DType, reference};

    fn backend(vec4_loads: bool, max_binding_bytes: Option<u64>) -> GpuBackend {
        let options = GpuOptions {
            matmul_kernel: Some(MatmulKernel::RegisterBlocked),
            vec4_loads,
            max_binding_bytes,
            warm_up: false,
            ..GpuOptions::default()
        };
        GpuBackend::new(options).expect("a GPU adapter (install mesa-vulkan-drivers)")
    }

    fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Checks `x · wᵀ + bias` on `gpu` for every dtype against the reference on the rounded weights.
    #[track_caller]
    fn check(gpu: &GpuBackend, m: usize, k: usize, n: usize, label: &str) {
        let mut rng = StdRng::seed_from_u64((m * 1_000_003 + k * 1009 + n) as u64);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let x = random(&mut rng, m * k);
            let w_bytes = reference::f32_to_weight_bytes(dtype, &random(&mut rng, n * k));
            let bias_bytes = reference::f32_to_weight_bytes(dtype, &random(&mut rng, n));
            let w = reference::weight_to_f32(dtype, &w_bytes);
            let bias = reference::weight_to_f32(dtype, &bias_bytes);
            let expected = reference::matmul(&x, &w, Some(&bias), m, k, n);

            let x = gpu.upload(&x, &[m, k]).unwrap();
            let w = gpu.upload_weight(dtype, &[n, k], &w_bytes).unwrap();
            let bias = gpu.upload_weight(dtype, &[n], &bias_bytes).unwrap();
            let actual = gpu.read(&gpu.matmul(&x, &w, Some(&bias)).unwrap()).unwrap();

            assert_eq!(actual.len(), expected.len(), "{label} {dtype} {m}x{k}x{n}");
            for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
                let bound = 1e-4 * e.abs().max(1.0);
                assert!(
                    (a - e).abs() <= bound,
                    "{label} {dtype} {m}x{k}x{n} [{i}]: got {a}, expected {e}"
                );
            }
        }
    }

    /// (m, k, n) with k a multiple of 8, so every dtype takes the 16-byte-load kernels.
    const ALIGNED_CASES: [(usize, usize, usize); 5] = [
        (1, 16, 7),
        (1, 8, 301),
        (6, 16, 9),
        (37, 24, 41),
        (33, 32, 64),
    ];

    #[test]
    fn vec4_kernels_match_reference() {
        let gpu = backend(true, None);
        for (m, k, n) in ALIGNED_CASES {
            check(&gpu, m, k, n, "vec4 loads");
        }
    }

    #[test]
    fn scalar_kernels_match_reference() {
        let gpu = backend(false, None);
        for (m, k, n) in ALIGNED_CASES {
            check(&gpu, m, k, n, "scalar loads");
        }
    }

    #[test]
    fn vec4_kernels_match_reference_in_windows() {
        // 1 KiB bindings: the weight splits into row chunks and x into windows of whole rows.
        let gpu = backend(true, Some(1024));
        for (m, k, n) in [(1, 16, 70), (40, 16, 50), (9, 24, 13)] {
            check(&gpu, m, k, n, "vec4 loads, 1 KiB bindings");
        }
    }
}
