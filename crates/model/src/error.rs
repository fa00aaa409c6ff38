use std::path::PathBuf;

use qwenlens_kernels::KernelError;

/// Errors of the model: loading, bad inputs, hooks and interventions, and the backend's failures.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The checkpoint, config or tokenizer could not be loaded.
    #[error(transparent)]
    Weights(#[from] qwenlens_weights::WeightsError),

    /// A backend operation failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// A hook name that is not a TransformerLens hook point of a Qwen2 model.
    #[error("unknown hook point `{name}`; did you mean `{suggestion}`?")]
    UnknownHook { name: String, suggestion: String },

    /// A layer index beyond the model's layers.
    #[error("{what}: layer {layer} is out of range; the model has {n_layers} layers (0..={max})", max = n_layers.saturating_sub(1))]
    LayerOutOfRange {
        what: String,
        layer: usize,
        n_layers: usize,
    },

    /// A query or KV head index beyond the model's heads.
    #[error("{what}: head {head} is out of range; the model has {n_heads} {kind} heads per layer")]
    HeadOutOfRange {
        what: String,
        head: usize,
        n_heads: usize,
        kind: &'static str,
    },

    /// A tensor given by the user (replacement, patch source, steering vector, pattern) has the
    /// wrong shape.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        what: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A prompt without tokens.
    #[error("empty prompt: batch item {item} has no tokens; give at least one token")]
    EmptyPrompt { item: usize },

    /// A token id that the embedding has no row for.
    #[error("token id {token} at batch item {item}, position {position} is out of range: the vocabulary has {d_vocab} ids (0..={max})", max = d_vocab.saturating_sub(1))]
    TokenOutOfRange {
        token: u32,
        item: usize,
        position: usize,
        d_vocab: usize,
    },

    /// A sequence longer than the model's context.
    #[error(
        "sequence of {len} tokens is longer than the model's context of {max} tokens (max_position_embeddings); shorten the prompt"
    )]
    PromptTooLong { len: usize, max: usize },

    /// A run whose activations would not fit in the device's memory.
    #[error(
        "{what} needs about {bytes} bytes on the device, above the limit of {limit} bytes; {advice}"
    )]
    DeviceLimit {
        what: String,
        bytes: u64,
        limit: u64,
        advice: String,
    },

    /// An invalid argument (scope, option, intervention) other than the cases above.
    #[error("{0}")]
    InvalidArgument(String),

    /// A regex for hook names that does not compile.
    #[error("invalid hook name regex `{pattern}`: {message}")]
    InvalidRegex { pattern: String, message: String },

    /// A cache lookup for a hook the cache does not hold.
    #[error("the activation cache has no `{name}`; it holds {available}")]
    NotCached { name: String, available: String },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    /// Serializing the activation cache to safetensors failed.
    #[error("writing safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
