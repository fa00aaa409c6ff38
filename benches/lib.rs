//! Shared helpers of the benchmarks: the backends to run on and seeded random operands.

use std::sync::Arc;

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{Backend, DType, Device, Result, Tensor, Weight, create_backend, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A backend under benchmark and whether it is a GPU (whose group gets smaller sample counts,
/// because lavapipe, the software Vulkan driver, is slow).
pub struct BenchBackend {
    pub backend: Arc<dyn Backend>,
    pub is_gpu: bool,
}

impl BenchBackend {
    /// Short label for benchmark ids: `cpu` or `gpu`.
    pub fn label(&self) -> &'static str {
        if self.is_gpu { "gpu" } else { "cpu" }
    }
}

/// Environment variable naming the backends to benchmark, comma-separated (`cpu`, `gpu`); both
/// when unset.
pub const DEVICES_VAR: &str = "QWENLENS_BENCH_DEVICES";

/// Returns the backends to benchmark: the CPU backend with all threads, and the GPU backend when
/// `create_backend(Device::Gpu)` opens one (lavapipe counts). A GPU that fails to open is reported
/// on stderr and skipped.
pub fn backends() -> Vec<BenchBackend> {
    let requested = std::env::var(DEVICES_VAR).unwrap_or_else(|_| "cpu,gpu".to_string());
    let wants = |name: &str| {
        requested
            .split(',')
            .any(|d| d.trim().eq_ignore_ascii_case(name))
    };
    let mut selected = Vec::new();

    if wants("cpu") {
        selected.push(BenchBackend {
            backend: Arc::new(CpuBackend::new()),
            is_gpu: false,
        });
    }
    if wants("gpu") {
        match create_backend(Device::Gpu) {
            Ok(backend) => selected.push(BenchBackend {
                backend,
                is_gpu: true,
            }),
            Err(err) => eprintln!("skipping the GPU backend: {err}"),
        }
    }
    for target in &selected {
        eprintln!("benchmarking {}", target.backend.name());
    }
    selected
}

/// Runs `prepare` (uploads and one warm-up call) and returns its value, or reports on stderr that
/// the backend does not support the case and returns `None`. A GPU rejects a weight larger than
/// its maximum storage buffer binding, for example.
pub fn prepare<T>(
    target: &BenchBackend,
    case: &str,
    prepare: impl FnOnce() -> Result<T>,
) -> Option<T> {
    match prepare() {
        Ok(value) => Some(value),
        Err(err) => {
            eprintln!("skipping {case} on {}: {err}", target.backend.name());
            None
        }
    }
}

/// Uniform values in `[-1, 1)` from a fixed seed.
pub fn random_values(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Uploads a random activation tensor.
pub fn random_tensor(backend: &dyn Backend, seed: u64, shape: &[usize]) -> Result<Tensor> {
    let values = random_values(seed, shape.iter().product());
    backend.upload(&values, shape)
}

/// Uploads a random weight in `dtype`.
pub fn random_weight(
    backend: &dyn Backend,
    seed: u64,
    dtype: DType,
    shape: &[usize],
) -> Result<Weight> {
    let values = random_values(seed, shape.iter().product());
    let bytes = reference::f32_to_weight_bytes(dtype, &values);
    backend.upload_weight(dtype, shape, &bytes)
}
