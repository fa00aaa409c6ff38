//! Qwen2 model with TransformerLens hook points: the forward pass on any
//! [`qwenlens_kernels::Backend`], an activation cache, interventions executed on the device, user
//! hook closures, and an incremental forward against a KV cache for generation.
//!
//! Activations use TransformerLens names (`blocks.3.attn.hook_z`) and shapes (batch first). Batches
//! of unequal length are left-padded ([`TokenBatch`]); padding gets no attention and positions
//! count from each sequence's first real token, so a batched run equals running each sequence
//! alone.

mod cache;
mod error;
mod forward;
mod generate;
mod hooks;
mod intervene;
mod interventions;
mod limits;
mod logits;
mod model;
mod output;
mod patterns;
pub mod sampling;
mod tokens;

pub use cache::{ActivationCache, HostTensor};
pub use error::{ModelError, Result};
pub use forward::{KvCache, RunOptions, RunOutput};
pub use generate::{GenerateOptions, Generation, StopReason, TextStream};
pub use hooks::{BlockHook, HookFilter, HookPoint};
pub use interventions::{HookContext, HookFn, Hooks, Intervention, PatternFn, PatternSpec, Scope};
pub use limits::DeviceLimits;
pub use logits::{LogitRows, Logits};
pub use model::Model;
pub use output::{output_target, write_atomic};
pub use sampling::{Sampler, Sampling};
pub use tokens::TokenBatch;
