//! Estimates of a run's device memory, checked before the run starts so that an oversized prompt
//! fails with advice instead of deep inside a kernel.

use qwenlens_kernels::Backend;
use qwenlens_weights::Qwen2Config;

use crate::error::{ModelError, Result};

/// Memory a run may use on its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Largest single buffer in bytes.
    pub max_buffer_bytes: u64,
    /// All activation buffers alive at once, in bytes (weights not included).
    pub max_total_bytes: u64,
}

impl DeviceLimits {
    /// No limit.
    pub fn unlimited() -> DeviceLimits {
        DeviceLimits {
            max_buffer_bytes: u64::MAX,
            max_total_bytes: u64::MAX,
        }
    }

    /// Default limits for a backend: the host's available memory for everything, and for GPU
    /// backends also wgpu's usual largest buffer (2 GiB − 1, the value lavapipe reports).
    ///
    /// NOTE: real GPUs may allow larger buffers and have less memory than the host; call
    /// [`crate::Model::set_device_limits`] with the adapter's numbers when they are known.
    pub fn for_backend(backend: &dyn Backend) -> DeviceLimits {
        let total = available_host_memory().unwrap_or(u64::MAX);
        let is_cpu = backend.name().starts_with("cpu");
        DeviceLimits {
            max_buffer_bytes: if is_cpu { u64::MAX } else { (1 << 31) - 1 },
            max_total_bytes: total,
        }
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux only).
fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kib * 1024)
}

/// The shape of one pass, as far as its memory is concerned.
pub(crate) struct PassSize {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub logit_rows: usize,
    pub attention_outputs: usize,
    pub with_kv_cache: bool,
    pub with_result: bool,
}

/// Checks the estimated buffers of a pass against the limits.
pub(crate) fn check(config: &Qwen2Config, size: &PassSize, limits: DeviceLimits) -> Result<()> {
    let f32_bytes = 4u64;
    let rows = (size.batch * size.q_len) as u64;
    let kv_rows = (size.batch * size.kv_len) as u64;
    let d_model = config.d_model() as u64;
    let d_head = config.d_head() as u64;
    let n_heads = config.n_heads() as u64;
    let n_kv_heads = config.n_kv_heads() as u64;

    let attention_matrix =
        size.batch as u64 * n_heads * size.q_len as u64 * size.kv_len as u64 * f32_bytes;
    let logits = size.logit_rows as u64 * config.d_vocab() as u64 * f32_bytes;
    let mlp = rows * config.d_mlp() as u64 * f32_bytes;
    let residual = rows * d_model * f32_bytes;
    let keys = kv_rows * n_kv_heads * d_head * f32_bytes;
    let result = if size.with_result {
        rows * n_heads * (n_heads * d_head).max(d_model) * f32_bytes
    } else {
        0
    };
    let kv_cache = if size.with_kv_cache {
        config.n_layers() as u64 * 2 * keys
    } else {
        0
    };

    let buffers = [
        ("the logits", logits),
        ("the attention scores", attention_matrix),
        ("the MLP activations", mlp),
        ("hook_result", result),
    ];
    let (largest_name, largest) = buffers
        .iter()
        .copied()
        .max_by_key(|(_, bytes)| *bytes)
        .unwrap_or(("the residual stream", residual));
    let total = logits
        + attention_matrix * (1 + size.attention_outputs as u64)
        + 3 * mlp
        + 6 * residual
        + 4 * keys
        + 3 * result
        + kv_cache;

    let advice = format!(
        "use a shorter prompt or a smaller batch (now {} × {} tokens){}",
        size.batch,
        size.q_len,
        if size.logit_rows > size.batch {
            ", or compute only the last position's logits"
        } else {
            ""
        }
    );
    if largest > limits.max_buffer_bytes {
        return Err(ModelError::DeviceLimit {
            what: format!("the largest buffer ({largest_name})"),
            bytes: largest,
            limit: limits.max_buffer_bytes,
            advice,
        });
    }
    if total > limits.max_total_bytes {
        return Err(ModelError::DeviceLimit {
            what: "this run's activations".to_string(),
            bytes: total,
            limit: limits.max_total_bytes,
            advice,
        });
    }
    Ok(())
}
