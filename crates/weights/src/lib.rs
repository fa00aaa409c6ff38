//! Qwen2 checkpoint loading: `config.json`, safetensors weights (single file or sharded, kept in their
//! stored dtype through memory maps), model sources (local folders and Hugging Face hub ids), the
//! tokenizer and the chat template.

mod dtype;

pub use dtype::DType;
