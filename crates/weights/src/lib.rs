//! Qwen2 checkpoint loading: `config.json`, safetensors weights (single file or sharded, kept in their
//! stored dtype through memory maps), model sources (local folders and Hugging Face hub ids), the
//! tokenizer and the chat template.

mod checkpoint;
mod config;
mod dtype;
mod error;
mod safetensors;
mod source;

pub use checkpoint::{Checkpoint, EMBED_TOKENS, LM_HEAD, WeightFile, expected_tensors};
pub use config::{GenerationConfig, Qwen2Config};
pub use dtype::DType;
pub use error::{Result, WeightsError};
pub use safetensors::{MAX_HEADER_BYTES, TensorView};
pub use source::{HubSettings, ModelSource};
