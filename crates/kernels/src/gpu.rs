//! WGSL compute kernels run through wgpu.
//!
//! Every kernel family lives in one file under `shaders/` (embedded with `include_str!`). Tensors are
//! f32 storage buffers. Weights keep their stored dtype and are split into row chunks that each fit one
//! storage binding, so the 151936 × 896 unembedding works under lavapipe's 128 MiB binding limit.
//! Activations larger than one binding (the logits of a long prompt) are bound in windows of whole
//! rows by the kernels that meet them: matmul, mul_weight, the element-wise kernels, gather_rows,
//! gather_cols and logsumexp.

mod adapter;
mod attention;
mod context;
mod matmul;
mod ops;
mod pipelines;

use crate::{
    AttentionOutput, AttentionParams, Backend, DType, PatternOverride, Result, Tensor, Weight,
};

pub use adapter::adapter_is_hardware;
use context::Context;
use pipelines::Pipelines;

/// The WGSL sources embedded in the backend, by file name.
pub const SHADER_FILES: &[(&str, &str)] = pipelines::SHADER_FILES;

/// Matmul kernel family: the kernel for inputs with more rows than [`GpuOptions::gemv_max_rows`]
/// and the GEMV kernel that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// 4×4 output blocks per invocation without workgroup memory, and a GEMV without workgroup
    /// memory (4 output columns per invocation). Both load 16 bytes at a time where rows allow it
    /// (see [`GpuOptions::vec4_loads`]). Fastest on lavapipe and other CPU adapters, where workgroup
    /// barriers are expensive.
    RegisterBlocked,
    /// 16×16 tiles staged in workgroup memory, and a GEMV whose workgroup shares each output element.
    /// The usual choice on real GPUs.
    Tiled,
}

/// Options of [`GpuBackend::new`].
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name; `None` reads `WGPU_ADAPTER_NAME`.
    pub adapter_name: Option<String>,
    /// Graphics APIs to search; `None` reads `WGPU_BACKEND` (e.g. `vulkan`, `gl`) and defaults to all.
    pub backends: Option<wgpu::Backends>,
    /// Accept only hardware adapters (discrete, integrated or virtual GPUs), never a software one.
    pub hardware_only: bool,
    /// Maximum bytes of one storage binding, capped by the device's own limit (`None`: the device
    /// limit). Weights are split into row chunks of at most this size, and large activations are
    /// bound in windows of at most this size. Tests set it small to exercise the chunking.
    pub max_binding_bytes: Option<u64>,
    /// Matmul kernel for prefill-sized inputs; `None` picks by adapter type.
    pub matmul_kernel: Option<MatmulKernel>,
    /// Let the register-blocked matmul and its GEMV load x and w 16 bytes at a time where every row
    /// starts on a 16-byte boundary (k a multiple of 4 for f32, of 8 for f16 and bf16). `false`
    /// keeps the scalar-load kernels, for comparing the two.
    pub vec4_loads: bool,
    /// Inputs with at most this many rows use the GEMV kernel.
    // NOTE: the default of 1 is a guess for batched decoding; the crossover at 2 to 8 rows is unmeasured.
    pub gemv_max_rows: usize,
    /// Dispatch every pipeline once at creation, because some drivers (lavapipe, GL) compile shaders at
    /// their first dispatch.
    pub warm_up: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            adapter_name: None,
            backends: None,
            hardware_only: false,
            max_binding_bytes: None,
            matmul_kernel: None,
            vec4_loads: true,
            gemv_max_rows: 1,
            warm_up: true,
        }
    }
}

/// The wgpu backend: one device, its queue and the cached compute pipelines.
pub struct GpuBackend {
    ctx: Context,
    pipelines: Pipelines,
    matmul_kernel: MatmulKernel,
    vec4_loads: bool,
    gemv_max_rows: usize,
}

impl GpuBackend {
    /// Opens the best adapter allowed by `options` and compiles (and optionally warms up) every
    /// pipeline.
    ///
    /// Fails with [`crate::KernelError::NoAdapter`] when no adapter matches, and with
    /// [`crate::KernelError::Gpu`] when the device cannot be opened.
    pub fn new(options: GpuOptions) -> Result<Self> {
        let opened = adapter::open(&options)?;
        let is_cpu = opened.info.device_type == wgpu::DeviceType::Cpu;
        let ctx = Context::new(opened, options.max_binding_bytes)?;
        let pipelines = ctx.scoped("create pipelines", || Ok(Pipelines::new(&ctx.device)))?;
        let matmul_kernel = options.matmul_kernel.unwrap_or(if is_cpu {
            MatmulKernel::RegisterBlocked
        } else {
            MatmulKernel::Tiled
        });

        let backend = Self {
            ctx,
            pipelines,
            matmul_kernel,
            vec4_loads: options.vec4_loads,
            gemv_max_rows: options.gemv_max_rows,
        };
        tracing::debug!(
            ?matmul_kernel,
            vec4_loads = options.vec4_loads,
            gemv_max_rows = options.gemv_max_rows,
            "GPU kernel variants"
        );

        if options.warm_up {
            let start = std::time::Instant::now();
            backend.warm_up()?;
            tracing::debug!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "warmed up GPU pipelines"
            );
        }
        Ok(backend)
    }

    /// Information about the adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// Limits of the opened device (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// Maximum bytes of one storage binding in use (device limit or [`GpuOptions::max_binding_bytes`]).
    pub fn max_binding_bytes(&self) -> u64 {
        self.ctx.max_binding
    }

    /// Matmul kernel used for prefill-sized inputs.
    pub fn matmul_kernel(&self) -> MatmulKernel {
        self.matmul_kernel
    }

    /// Blocks until every submitted dispatch has finished. Kernels return once their work is
    /// submitted, so timing a kernel needs this (or a [`Backend::read`]) before the clock stops.
    pub fn wait(&self) -> Result<()> {
        self.ctx.wait()
    }

    /// Runs every pipeline this backend uses once on tiny inputs and waits for the device.
    fn warm_up(&self) -> Result<()> {
        let x = self.upload(&[0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.0, 1.0], &[2, 4])?;
        let x_row = self.upload(&[0.5, -1.0, 2.0, 0.25], &[1, 4])?;
        let x_row8 = self.upload(&[0.5; 8], &[1, 8])?;
        let x_rows8 = self.upload(&[0.5; 16], &[2, 8])?;
        let f32_bytes: Vec<u8> = (0..8)
            .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
            .collect();
        let half_bytes: Vec<u8> = (0..8u16)
            .flat_map(|i| (0x3c00u16 + i).to_le_bytes())
            .collect();

        for (dtype, bytes) in [
            (DType::F32, &f32_bytes[..]),
            (DType::F16, &half_bytes[..]),
            (DType::BF16, &half_bytes[..]),
        ] {
            let w = self.upload_weight(dtype, &[2, 4], bytes)?;
            let v = self.upload_weight(dtype, &[4], &bytes[..4 * dtype.size_in_bytes()])?;
            let bias = self.upload_weight(dtype, &[2], &bytes[..2 * dtype.size_in_bytes()])?;
            self.embedding(&w, &[1, 0])?;
            self.matmul(&x, &w, Some(&bias))?;
            self.matmul(&x_row, &w, None)?;
            // Rows of 8 elements start on 16-byte boundaries in every dtype, which selects the
            // kernels with 16-byte loads where the adapter uses them.
            let w8 = self.upload_weight(dtype, &[1, 8], bytes)?;
            self.matmul(&x_row8, &w8, None)?;
            self.matmul(&x_rows8, &w8, None)?;
            self.mul_weight(&x, &v)?;
        }

        let (normed, _) = self.rms_norm(&x, 1e-6)?;
        let heads = normed.reshape(vec![2, 1, 4]).expect("8 elements");
        let roped = self.rope(&heads, &[0, 1], 10000.0)?;
        let params = AttentionParams {
            batch: 1,
            q_len: 2,
            kv_len: 2,
            n_heads: 1,
            n_kv_heads: 1,
            d_head: 4,
            key_start: vec![0],
            scale: 0.5,
            want_scores: true,
            want_pattern: true,
        };
        let pattern = self.upload(&[1.0, 0.0, 0.5, 0.5], &[1, 2, 2])?;
        let overrides = [PatternOverride { head: 0, pattern }];
        let attn = self.attention(&roped, &roped, &roped, &params, &overrides)?;

        let y = self.silu_mul(&x, &normed)?;
        let y = self.add(&y, &x)?;
        let y = self.select(&x, &y, &normed)?;
        let y = self.concat_seq(&y, &attn.z.reshape(vec![2, 4]).expect("8 elements"), 1)?;
        let y = self.gather_rows(&y, &[3, 0])?;
        self.logsumexp(&y)?;
        self.gather_cols(&y, &[1, 2])?;

        // Reading back waits for every submitted dispatch.
        self.read(&y)?;
        Ok(())
    }
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("adapter", &self.ctx.info.name)
            .finish_non_exhaustive()
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> String {
        format!("wgpu: {} ({:?})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.ctx.scoped("upload", || self.ctx.upload(data, shape))
    }

    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Weight> {
        self.ctx.scoped("upload_weight", || {
            self.ctx.upload_weight(dtype, shape, bytes)
        })
    }

    fn read(&self, x: &Tensor) -> Result<Vec<f32>> {
        self.ctx.scoped("read", || self.ctx.read(x))
    }

    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Tensor> {
        self.ctx
            .scoped("embedding", || self.embedding_impl(table, ids))
    }

    fn matmul(&self, x: &Tensor, w: &Weight, bias: Option<&Weight>) -> Result<Tensor> {
        self.ctx.scoped("matmul", || self.matmul_impl(x, w, bias))
    }

    fn rms_norm(&self, x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        self.ctx.scoped("rms_norm", || self.rms_norm_impl(x, eps))
    }

    fn mul_weight(&self, x: &Tensor, w: &Weight) -> Result<Tensor> {
        self.ctx.scoped("mul_weight", || self.mul_weight_impl(x, w))
    }

    fn rope(&self, x: &Tensor, positions: &[u32], theta: f32) -> Result<Tensor> {
        self.ctx
            .scoped("rope", || self.rope_impl(x, positions, theta))
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttentionParams,
        overrides: &[PatternOverride],
    ) -> Result<AttentionOutput> {
        self.ctx.scoped("attention", || {
            self.attention_impl(q, k, v, params, overrides)
        })
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.ctx.scoped("silu_mul", || {
            self.elementwise("silu_mul", &self.pipelines.silu_mul, gate, up, None)
        })
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.ctx.scoped("add", || {
            self.elementwise("add", &self.pipelines.add, a, b, None)
        })
    }

    fn select(&self, mask: &Tensor, x: &Tensor, replacement: &Tensor) -> Result<Tensor> {
        self.ctx.scoped("select", || {
            self.elementwise("select", &self.pipelines.select, mask, x, Some(replacement))
        })
    }

    fn concat_seq(&self, cache: &Tensor, new: &Tensor, batch: usize) -> Result<Tensor> {
        self.ctx
            .scoped("concat_seq", || self.concat_seq_impl(cache, new, batch))
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        self.ctx
            .scoped("gather_rows", || self.gather_rows_impl(x, rows))
    }

    fn logsumexp(&self, x: &Tensor) -> Result<Tensor> {
        self.ctx.scoped("logsumexp", || self.logsumexp_impl(x))
    }

    fn gather_cols(&self, x: &Tensor, cols: &[u32]) -> Result<Tensor> {
        self.ctx
            .scoped("gather_cols", || self.gather_cols_impl(x, cols))
    }
}
