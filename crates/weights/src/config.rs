//! `config.json` and `generation_config.json` of a Qwen2 checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, WeightsError};

/// A token id or a list of them, as `eos_token_id` is written in Hugging Face configs.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a token id (a non-negative integer) or a list of token ids"
)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

/// `rope_parameters` as transformers 5 writes it.
#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// `config.json` as written, before validation. Unknown keys are ignored.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A validated Qwen2 model configuration (`config.json`).
///
/// Field names follow Hugging Face; the TransformerLens-style accessors (`d_model()`, `n_heads()`,
/// ...) return the same numbers under the names the rest of qwenlens uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2Config {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (equal to `num_attention_heads` without grouped-query attention).
    pub num_key_value_heads: usize,
    /// Dimension of one head (`hidden_size / num_attention_heads` when the key is absent).
    pub head_dim: usize,
    /// Rows of the embedding and unembedding matrices.
    pub vocab_size: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Epsilon inside every RMSNorm.
    pub rms_norm_eps: f64,
    /// Maximum context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the unembedding reuses `model.embed_tokens.weight` (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id, if any (Qwen2.5 never prepends it).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids from `config.json` (empty when `null` or absent).
    pub eos_token_ids: Vec<u32>,
    /// The `torch_dtype` (or transformers 5 `dtype`) entry, e.g. `bfloat16`, if present.
    pub torch_dtype: Option<String>,
}

impl Qwen2Config {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(WeightsError::MissingFile {
                    path: path.to_path_buf(),
                    hint: "a model folder needs config.json (the Hugging Face model configuration)"
                        .into(),
                });
            }
            Err(error) => return Err(WeightsError::io(path, error)),
        };
        Self::from_json(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| WeightsError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| WeightsError::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };

        let is_qwen2_type = raw.model_type.as_deref() == Some("qwen2");
        let is_qwen2_arch = raw
            .architectures
            .as_ref()
            .is_some_and(|archs| archs.iter().any(|a| a == "Qwen2ForCausalLM"));
        if !is_qwen2_type && !is_qwen2_arch {
            return Err(invalid(format!(
                "model_type is {:?} and architectures is {:?}; expected model_type \"qwen2\" or \
                 architectures [\"Qwen2ForCausalLM\"]",
                raw.model_type, raw.architectures
            )));
        }
        // One Qwen2 marker is enough to load the model, but a second marker naming another
        // architecture suggests a converted or mislabelled checkpoint whose outputs may be wrong.
        let other_type = raw.model_type.as_deref().filter(|kind| *kind != "qwen2");
        let other_archs: Vec<&str> = raw
            .architectures
            .iter()
            .flatten()
            .map(String::as_str)
            .filter(|arch| *arch != "Qwen2ForCausalLM")
            .collect();
        if other_type.is_some() || !other_archs.is_empty() {
            tracing::warn!(
                path = %path.display(),
                model_type = ?raw.model_type,
                architectures = ?raw.architectures,
                "config.json names an architecture other than Qwen2; loading it as Qwen2"
            );
        }

        let required = |value: Option<usize>, key: &str| -> Result<usize> {
            match value {
                Some(0) => Err(invalid(format!("{key} is 0; expected a positive integer"))),
                Some(value) => Ok(value),
                None => Err(invalid(format!("required key {key} is missing"))),
            }
        };
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        // transformers defaults num_key_value_heads to num_attention_heads (plain multi-head attention).
        let num_key_value_heads = match raw.num_key_value_heads {
            None => num_attention_heads,
            value => required(value, "num_key_value_heads")?,
        };

        if hidden_size % num_attention_heads != 0 {
            return Err(invalid(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(format!(
                "num_attention_heads {num_attention_heads} is not divisible by num_key_value_heads \
                 {num_key_value_heads}; each KV head must serve the same number of query heads"
            )));
        }
        let head_dim = match raw.head_dim {
            None => hidden_size / num_attention_heads,
            value => required(value, "head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(invalid(format!(
                "head_dim {head_dim} is odd; rotary embeddings need an even head dimension"
            )));
        }

        // Tensor sizes and the parameter count are computed with plain arithmetic later, so a
        // hostile config must not be able to overflow them.
        let attention_width = num_attention_heads.checked_mul(head_dim);
        let per_layer = attention_width
            .and_then(|width| width.checked_mul(hidden_size))
            .and_then(|q| q.checked_mul(4))
            .and_then(|attention| {
                let mlp = intermediate_size.checked_mul(hidden_size)?.checked_mul(3)?;
                attention.checked_add(mlp)
            });
        let total = per_layer
            .and_then(|layer| layer.checked_mul(num_hidden_layers))
            .and_then(|layers| {
                let embeddings = vocab_size.checked_mul(hidden_size)?.checked_mul(2)?;
                layers.checked_add(embeddings)
            });
        if total.is_none_or(|count| count > isize::MAX as usize) {
            return Err(invalid(format!(
                "the sizes (hidden_size {hidden_size}, intermediate_size {intermediate_size}, \
                 num_hidden_layers {num_hidden_layers}, num_attention_heads {num_attention_heads}, \
                 head_dim {head_dim}, vocab_size {vocab_size}) describe more parameters than fit \
                 in memory"
            )));
        }

        let rope_theta = match (raw.rope_theta, &raw.rope_parameters) {
            (Some(theta), _) => theta,
            (
                None,
                Some(RopeParameters {
                    rope_theta: Some(theta),
                    ..
                }),
            ) => *theta,
            _ => {
                return Err(invalid(
                    "neither rope_theta nor rope_parameters.rope_theta is present".into(),
                ));
            }
        };
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(invalid(format!(
                "rope_theta {rope_theta} must be a positive number"
            )));
        }
        let rope_type = raw
            .rope_parameters
            .as_ref()
            .and_then(|rope| rope.rope_type.as_deref());
        if rope_type.is_some_and(|kind| kind != "default") {
            return Err(invalid(format!(
                "rope_parameters.rope_type is {rope_type:?}; only \"default\" RoPE is supported"
            )));
        }
        if raw
            .rope_scaling
            .as_ref()
            .is_some_and(|scaling| !scaling.is_null())
        {
            return Err(invalid(format!(
                "rope_scaling {} is set; only unscaled RoPE is supported",
                raw.rope_scaling
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(invalid(
                "use_sliding_window is true; sliding-window attention is not supported".into(),
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(invalid(format!(
                "hidden_act is {act:?}; only \"silu\" is supported"
            )));
        }

        let max_position_embeddings = match raw.max_position_embeddings {
            None => 32768,
            value => required(value, "max_position_embeddings")?,
        };
        let eos_token_ids = raw
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        let named_ids = eos_token_ids
            .iter()
            .map(|&id| ("eos_token_id", id))
            .chain(raw.bos_token_id.map(|id| ("bos_token_id", id)));
        for (key, id) in named_ids {
            if id as usize >= vocab_size {
                return Err(invalid(format!(
                    "{key} {id} is outside the vocabulary (vocab_size {vocab_size}); expected an \
                     id below {vocab_size}"
                )));
            }
        }

        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(invalid(format!(
                "rms_norm_eps {rms_norm_eps} must be a non-negative number"
            )));
        }

        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rope_theta,
            rms_norm_eps,
            max_position_embeddings,
            // transformers' Qwen2Config defaults tie_word_embeddings to false.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// Number of transformer blocks.
    pub fn n_layers(&self) -> usize {
        self.num_hidden_layers
    }

    /// Width of the residual stream.
    pub fn d_model(&self) -> usize {
        self.hidden_size
    }

    /// Number of query heads.
    pub fn n_heads(&self) -> usize {
        self.num_attention_heads
    }

    /// Number of key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads
    }

    /// Query heads per KV head (`n_heads / n_kv_heads`); query head `h` reads KV head `h / group`.
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Dimension of one head.
    pub fn d_head(&self) -> usize {
        self.head_dim
    }

    /// Width of the MLP's hidden layer.
    pub fn d_mlp(&self) -> usize {
        self.intermediate_size
    }

    /// Vocabulary size (rows of the embedding and unembedding).
    pub fn d_vocab(&self) -> usize {
        self.vocab_size
    }
}

/// `generation_config.json` as written, before normalisation.
#[derive(Deserialize)]
struct RawGenerationConfig {
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: Option<f64>,
    max_new_tokens: Option<usize>,
}

/// Decoding defaults from `generation_config.json`; every field is `None` (or empty) when the file
/// or the key is absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Whether to sample (true) or decode greedily (false).
    pub do_sample: Option<bool>,
    /// Softmax temperature for sampling.
    pub temperature: Option<f64>,
    /// Sample only among the `top_k` most likely tokens.
    pub top_k: Option<usize>,
    /// Nucleus sampling: sample from the smallest set with this total probability.
    pub top_p: Option<f64>,
    /// CTRL-style repetition penalty (1.0 means none).
    pub repetition_penalty: Option<f64>,
    /// Default limit on generated tokens.
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| WeightsError::io(path, error))?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `generation_config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawGenerationConfig =
            serde_json::from_str(text).map_err(|source| WeightsError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            pad_token_id: raw.pad_token_id,
            do_sample: raw.do_sample,
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
            repetition_penalty: raw.repetition_penalty,
            max_new_tokens: raw.max_new_tokens,
        })
    }
}
