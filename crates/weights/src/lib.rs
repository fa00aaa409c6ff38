//! Qwen2 checkpoint loading: `config.json`, safetensors weights (single file or sharded, kept in their
//! stored dtype through memory maps), model sources (local folders and Hugging Face hub ids), the
//! tokenizer and the chat template.

mod chat;
mod checkpoint;
mod config;
mod dtype;
mod error;
mod safetensors;
mod source;
mod tokenizer;

pub use chat::{ChatMessage, VALID_ROLES, parse_chat_json, read_chat_file, validate_messages};
pub use checkpoint::{Checkpoint, EMBED_TOKENS, LM_HEAD, WeightFile, expected_tensors};
pub use config::{GenerationConfig, Qwen2Config};
pub use dtype::DType;
pub use error::{Result, WeightsError};
pub use safetensors::{MAX_HEADER_BYTES, TensorView};
pub use source::{DEFAULT_DOWNLOAD_TIMEOUT, HubSettings, ModelSource};
pub use tokenizer::Tokenizer;

#[cfg(test)]
mod tests {
    /// The model shares a checkpoint and a tokenizer across threads (for example behind an `Arc`).
    #[test]
    fn public_types_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::Checkpoint>();
        assert_send_sync::<crate::Tokenizer>();
        assert_send_sync::<crate::WeightsError>();
    }
}
