//! The error type of the analysis crate.

use std::path::PathBuf;

/// Errors of the analysis routines: invalid requests (layer, head, token or pattern out of range),
/// model failures and output files that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// A layer index outside the model.
    #[error("layer {layer} is out of range: the model has {n_layers} layers (valid: 0..={max})", max = n_layers.saturating_sub(1))]
    LayerOutOfRange { layer: usize, n_layers: usize },

    /// A query or KV head index outside the layer.
    #[error("{kind} head {head} is out of range: each layer has {count} {kind} heads (valid: 0..={max})", max = count.saturating_sub(1))]
    HeadOutOfRange {
        kind: &'static str,
        head: usize,
        count: usize,
    },

    /// A token id outside the vocabulary.
    #[error("token id {id} is out of range: the vocabulary has {d_vocab} entries")]
    TokenOutOfRange { id: u32, d_vocab: usize },

    /// A prompt too short for the requested analysis.
    #[error(
        "{what} needs a prompt of at least {}, but the prompt has {tokens}; use a longer prompt",
        count_tokens(*min)
    )]
    PromptTooShort {
        tokens: usize,
        min: usize,
        what: &'static str,
    },

    /// Clean and corrupted prompts of different token lengths.
    #[error(
        "the clean prompt has {clean} tokens and the corrupted prompt has {corrupted}; activation patching needs prompts of equal token length, so reword one of them"
    )]
    LengthMismatch { clean: usize, corrupted: usize },

    /// A pattern array that does not fit the request.
    #[error("invalid attention pattern {source_name}: {reason}")]
    InvalidPattern { source_name: String, reason: String },

    /// Any other invalid argument, with the value and the fix in the message.
    #[error("{0}")]
    InvalidArgument(String),

    /// The model failed (loading, a run, an intervention).
    #[error(transparent)]
    Model(#[from] qwenlens_model::ModelError),

    /// A file could not be read or written. The I/O error is part of the message and not a
    /// `source`, so an error chain printed with `{:#}` names it once.
    #[error("failed to {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },

    /// A PNG could not be encoded or decoded.
    #[error("failed to encode or decode the image {path}: {source}")]
    Image {
        path: PathBuf,
        source: image::ImageError,
    },

    /// A JSON document could not be serialized.
    #[error("failed to serialize {path} as JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// "1 token", "2 tokens": a token count with the noun in the right number.
pub fn count_tokens(n: usize) -> String {
    if n == 1 {
        "1 token".to_string()
    } else {
        format!("{n} tokens")
    }
}

/// Result alias of the analysis crate.
pub type Result<T, E = AnalysisError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_too_short_uses_the_singular_for_one_token() {
        let text = AnalysisError::PromptTooShort {
            tokens: 0,
            min: 1,
            what: "the logit lens",
        }
        .to_string();
        assert!(text.contains("at least 1 token,"), "{text}");

        let text = AnalysisError::PromptTooShort {
            tokens: 1,
            min: 2,
            what: "patching",
        }
        .to_string();
        assert!(text.contains("at least 2 tokens,"), "{text}");
    }

    #[test]
    fn io_errors_are_named_once_in_the_chain() {
        let error = AnalysisError::Io {
            action: "read",
            path: PathBuf::from("missing.npy"),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(error.to_string().contains("not found"), "{error}");
        assert!(std::error::Error::source(&error).is_none());
    }
}
