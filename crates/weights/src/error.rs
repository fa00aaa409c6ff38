//! The error type of every fallible operation in this crate.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = WeightsError> = std::result::Result<T, E>;

/// What went wrong while reading a checkpoint, resolving a model source or tokenizing.
///
/// Every variant names the file (or hub id) and the value involved, so the message alone shows
/// the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file could not be opened or read. The message leaves the cause to `source()`, so print
    /// the error with its chain (`{:#}` under anyhow) to see it.
    #[error("failed to read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A required file is absent from the model folder.
    #[error("{path} not found: {hint}")]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
        /// The purpose of the file and how to provide it.
        hint: String,
    },

    /// A JSON file is not valid JSON or does not have the expected structure. The parser's error
    /// is the `source()`.
    #[error("invalid JSON in {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// `config.json` parses but describes a model this crate cannot run.
    #[error("invalid model configuration in {path}: {message}")]
    InvalidConfig {
        /// The `config.json` file.
        path: PathBuf,
        /// The key, its value and the rule it breaks.
        message: String,
    },

    /// A safetensors file is malformed (truncated, inconsistent header, offsets outside the file).
    #[error("invalid safetensors file {path}: {message}")]
    InvalidSafetensors {
        /// The safetensors file.
        path: PathBuf,
        /// The inconsistency, with the values found.
        message: String,
    },

    /// `model.safetensors.index.json` is malformed or names a shard that does not exist.
    #[error("invalid shard index {path}: {message}")]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// The problem, with the values found.
        message: String,
    },

    /// A tensor that a Qwen2 model needs is in none of the weight files.
    #[error("tensor {name} (expected shape {expected:?}) not found in {location}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The weight files that were searched.
        location: String,
    },

    /// A tensor has a shape other than the one `config.json` implies.
    #[error("tensor {name} in {path} has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The weight file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A weight tensor is stored in a dtype the kernels cannot read.
    #[error(
        "tensor {name} in {path} has dtype {found}, expected one of BF16, F16, F32; \
         convert the checkpoint to a supported dtype"
    )]
    UnsupportedDType {
        /// The weight file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype string from the safetensors header.
        found: String,
    },

    /// `Checkpoint::tensor` was asked for a name the checkpoint does not contain.
    #[error("tensor {name} not found in checkpoint {dir}")]
    TensorNotFound {
        /// The requested name.
        name: String,
        /// The checkpoint folder.
        dir: PathBuf,
    },

    /// A hub model is not in the local cache and the hub may not be contacted.
    #[error(
        "model {id} (revision {revision}) is not in the Hugging Face cache at {cache_dir} and \
         HF_HUB_OFFLINE is set; download it on a connected machine (for example with \
         `huggingface-cli download {id}`) into that cache, or pass a local folder to --model"
    )]
    NotCached {
        /// The hub id.
        id: String,
        /// The requested revision.
        revision: String,
        /// The hub cache folder that was searched.
        cache_dir: PathBuf,
    },

    /// A hub model is not (completely) in the cache and downloading it failed: the hub was not
    /// reachable, answered with an error, timed out or broke off a transfer.
    #[error(
        "model {id} (revision {revision}) is not in the Hugging Face cache at {cache_dir}, and \
         downloading it failed: {message}; check the network and the id, download the model on a \
         connected machine into that cache, or pass a local folder to --model"
    )]
    HubUnavailable {
        /// The hub id.
        id: String,
        /// The requested revision.
        revision: String,
        /// The hub cache folder.
        cache_dir: PathBuf,
        /// The download error.
        message: String,
    },

    /// A cached hub snapshot lacks a file that its shard index lists, and the hub may not be
    /// contacted to fetch it again.
    #[error(
        "the cached snapshot {dir} of model {id} (revision {revision}) is incomplete: {missing} is \
         missing (an interrupted download?); delete the folder {dir} and download the model again, \
         or unset HF_HUB_OFFLINE so that the missing file is fetched"
    )]
    IncompleteSnapshot {
        /// The hub id.
        id: String,
        /// The requested revision.
        revision: String,
        /// The snapshot folder.
        dir: PathBuf,
        /// The missing file name.
        missing: String,
    },

    /// A model source string is neither an existing folder nor a valid hub id.
    #[error("invalid model source {text:?}: {message}")]
    InvalidSource {
        /// The text as given.
        text: String,
        /// The reason it is neither a folder nor a hub id, and what to pass instead.
        message: String,
    },

    /// `tokenizer.json` could not be loaded, or encoding or decoding failed.
    #[error("tokenizer error ({path}): {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The `tokenizers` crate's message.
        message: String,
    },

    /// The chat template is missing, invalid, or failed to render.
    #[error("chat template error ({path}): {message}")]
    ChatTemplate {
        /// The `tokenizer_config.json` file.
        path: PathBuf,
        /// What failed.
        message: String,
    },

    /// A chat (list of messages) is malformed.
    #[error("invalid chat{}: {message}", source_name.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    InvalidChat {
        /// The chat file, when the chat came from one.
        source_name: Option<PathBuf>,
        /// The problem, with the message index.
        message: String,
    },
}

impl WeightsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn safetensors(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::InvalidSafetensors {
            path: path.into(),
            message: message.into(),
        }
    }
}
