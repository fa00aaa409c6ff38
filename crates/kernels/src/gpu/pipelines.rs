//! The embedded WGSL sources and the compute pipelines built from them once per backend.

use crate::DType;

macro_rules! shader {
    ($file:literal) => {
        (
            $file,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shaders/",
                $file
            )),
        )
    };
}

pub(super) const SHADER_FILES: &[(&str, &str)] = &[
    shader!("attention.wgsl"),
    shader!("elementwise.wgsl"),
    shader!("embedding.wgsl"),
    shader!("gemv.wgsl"),
    shader!("matmul.wgsl"),
    shader!("matmul_vec4.wgsl"),
    shader!("norm.wgsl"),
    shader!("rope.wgsl"),
    shader!("rows.wgsl"),
];

fn source(file: &str) -> &'static str {
    SHADER_FILES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, source)| *source)
        .expect("every shader file is listed in SHADER_FILES")
}

/// Value of the `DTYPE`/`W_DTYPE` override constants: 0 f32, 1 f16, 2 bf16.
pub(super) fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// One pipeline per weight dtype, indexed by [`dtype_code`].
pub(super) struct PerDType([wgpu::ComputePipeline; 3]);

impl PerDType {
    pub fn get(&self, dtype: DType) -> &wgpu::ComputePipeline {
        &self.0[dtype_code(dtype) as usize]
    }
}

pub(super) struct Pipelines {
    pub embedding: PerDType,
    pub matmul_reg4x4: PerDType,
    pub matmul_vec4: PerDType,
    pub matmul_tiled: PerDType,
    pub gemv: PerDType,
    pub gemv_coop: PerDType,
    pub gemv_vec4: PerDType,
    pub mul_weight: PerDType,
    pub rms_norm: wgpu::ComputePipeline,
    pub rope: wgpu::ComputePipeline,
    pub attn_scores: wgpu::ComputePipeline,
    pub attn_softmax: wgpu::ComputePipeline,
    pub apply_override: wgpu::ComputePipeline,
    pub attn_z: wgpu::ComputePipeline,
    pub add: wgpu::ComputePipeline,
    pub silu_mul: wgpu::ComputePipeline,
    pub select: wgpu::ComputePipeline,
    pub concat_seq: wgpu::ComputePipeline,
    pub gather_rows: wgpu::ComputePipeline,
    pub gather_cols: wgpu::ComputePipeline,
    pub logsumexp: wgpu::ComputePipeline,
}

struct Builder<'a> {
    device: &'a wgpu::Device,
    modules: Vec<(&'static str, wgpu::ShaderModule)>,
}

impl Builder<'_> {
    fn module(&mut self, file: &'static str) -> wgpu::ShaderModule {
        if let Some((_, module)) = self.modules.iter().find(|(name, _)| *name == file) {
            return module.clone();
        }
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(file),
                source: wgpu::ShaderSource::Wgsl(source(file).into()),
            });
        self.modules.push((file, module.clone()));
        module
    }

    fn pipeline(
        &mut self,
        file: &'static str,
        entry: &'static str,
        constants: &[(&str, f64)],
    ) -> wgpu::ComputePipeline {
        let module = self.module(file);
        self.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
    }

    fn per_dtype(&mut self, file: &'static str, entry: &'static str, constant: &str) -> PerDType {
        PerDType([0.0, 1.0, 2.0].map(|code| self.pipeline(file, entry, &[(constant, code)])))
    }
}

impl Pipelines {
    /// Builds every pipeline; wgpu errors surface in the caller's error scope.
    pub fn new(device: &wgpu::Device) -> Self {
        let mut b = Builder {
            device,
            modules: Vec::new(),
        };
        Self {
            embedding: b.per_dtype("embedding.wgsl", "embedding", "DTYPE"),
            matmul_reg4x4: b.per_dtype("matmul.wgsl", "matmul_reg4x4", "W_DTYPE"),
            matmul_vec4: b.per_dtype("matmul_vec4.wgsl", "matmul_vec4", "W_DTYPE"),
            matmul_tiled: b.per_dtype("matmul.wgsl", "matmul_tiled", "W_DTYPE"),
            gemv: b.per_dtype("matmul.wgsl", "gemv", "W_DTYPE"),
            gemv_coop: b.per_dtype("matmul.wgsl", "gemv_coop", "W_DTYPE"),
            gemv_vec4: b.per_dtype("gemv.wgsl", "gemv_vec4", "W_DTYPE"),
            mul_weight: b.per_dtype("norm.wgsl", "mul_weight", "DTYPE"),
            rms_norm: b.pipeline("norm.wgsl", "rms_norm", &[]),
            rope: b.pipeline("rope.wgsl", "rope", &[]),
            attn_scores: b.pipeline("attention.wgsl", "attn_scores", &[]),
            attn_softmax: b.pipeline("attention.wgsl", "attn_softmax", &[]),
            apply_override: b.pipeline("attention.wgsl", "apply_override", &[]),
            attn_z: b.pipeline("attention.wgsl", "attn_z", &[]),
            add: b.pipeline("elementwise.wgsl", "add", &[]),
            silu_mul: b.pipeline("elementwise.wgsl", "silu_mul", &[]),
            select: b.pipeline("elementwise.wgsl", "select_masked", &[]),
            concat_seq: b.pipeline("rows.wgsl", "concat_seq", &[]),
            gather_rows: b.pipeline("rows.wgsl", "gather_rows", &[]),
            gather_cols: b.pipeline("rows.wgsl", "gather_cols", &[]),
            logsumexp: b.pipeline("rows.wgsl", "logsumexp", &[]),
        }
    }
}
