//! The operations of a Qwen2 forward pass behind one object-safe [`Backend`] trait, implemented twice:
//! [`cpu::CpuBackend`] (multi-threaded, SIMD matmuls through `gemm`) and [`gpu::GpuBackend`] (WGSL
//! compute kernels from `shaders/`, run through `wgpu`).
//!
//! Activations are always `f32` [`Tensor`]s, row-major, batch first. Weights are [`Weight`]s kept in
//! their stored dtype (bf16, f16 or f32) and unpacked inside the kernels.

mod backend;
mod device;
mod error;
mod tensor;

pub mod cpu;
pub mod gpu;
pub mod reference;

pub use backend::{AttentionOutput, AttentionParams, Backend, PatternOverride};
pub use device::{Device, ParseDeviceError, create_backend};
pub use error::{KernelError, Result};
pub use qwenlens_weights::DType;
pub use tensor::{Tensor, Weight};
