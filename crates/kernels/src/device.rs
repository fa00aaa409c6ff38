//! Choosing a backend: a real GPU when one exists, otherwise the CPU.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::cpu::CpuBackend;
use crate::gpu::{GpuBackend, GpuOptions};
use crate::{Backend, KernelError, Result};

/// Backend choice of [`create_backend`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// A hardware GPU when one exists, otherwise the CPU backend. Software adapters such as lavapipe
    /// are skipped, because they are slower than the CPU backend, and only Vulkan, Metal and DX12
    /// are probed unless `WGPU_BACKEND` says otherwise.
    #[default]
    Auto,
    /// The best GPU adapter, software adapters included; an error when there is none.
    Gpu,
    /// The multi-threaded CPU backend.
    Cpu,
}

impl Device {
    /// The accepted spellings, as `FromStr` and `Display` use them.
    pub const NAMES: [&'static str; 3] = ["auto", "gpu", "cpu"];
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Gpu => "gpu",
            Device::Cpu => "cpu",
        })
    }
}

/// A device name that is not one of [`Device::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device {value:?}: expected one of auto, gpu, cpu")]
pub struct ParseDeviceError {
    /// The rejected text.
    pub value: String,
}

impl FromStr for Device {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Device::Auto),
            "gpu" => Ok(Device::Gpu),
            "cpu" => Ok(Device::Cpu),
            _ => Err(ParseDeviceError {
                value: s.to_owned(),
            }),
        }
    }
}

/// Opens the backend for `device` with default options.
///
/// `Auto` falls back to the CPU backend when no hardware GPU exists or opening it fails, and logs a
/// warning in the second case. `Gpu` returns [`KernelError::NoAdapter`] or [`KernelError::Gpu`]
/// instead.
pub fn create_backend(device: Device) -> Result<Arc<dyn Backend>> {
    let backend: Arc<dyn Backend> = match device {
        Device::Cpu => Arc::new(CpuBackend::new()),
        Device::Gpu => Arc::new(GpuBackend::new(GpuOptions::default())?),
        Device::Auto => {
            // Only the native APIs are probed: probing GL opens EGL, which logs errors on a
            // machine without a display, and a GL adapter would lose to the CPU backend anyway.
            // WGPU_BACKEND still chooses when set.
            // NOTE: without XDG_RUNTIME_DIR, libwayland-client prints "XDG_RUNTIME_DIR is invalid"
            // to stderr itself while the Vulkan adapters are enumerated; no log filter reaches it.
            let backends = std::env::var_os("WGPU_BACKEND")
                .is_none()
                .then_some(wgpu::Backends::PRIMARY);
            let options = GpuOptions {
                hardware_only: true,
                backends,
                ..GpuOptions::default()
            };
            match GpuBackend::new(options) {
                Ok(gpu) => Arc::new(gpu),
                Err(KernelError::NoAdapter { detail }) => {
                    tracing::info!(%detail, "no hardware GPU; using the CPU backend");
                    Arc::new(CpuBackend::new())
                }
                Err(err) => {
                    tracing::warn!(%err, "failed to open the GPU; using the CPU backend");
                    Arc::new(CpuBackend::new())
                }
            }
        }
    };
    tracing::info!(%device, backend = %backend.name(), "selected compute backend");
    Ok(backend)
}
