//! The Qwen2 model on a backend: loading the weights and the entry points of a run.

use std::sync::Arc;

use qwenlens_kernels::{Backend, Tensor, Weight};
use qwenlens_weights::{Checkpoint, GenerationConfig, ModelSource, Qwen2Config, Tokenizer};

use crate::cache::{ActivationCache, HostTensor};
use crate::error::{ModelError, Result};
use crate::forward::{self, KvCache, RunOptions, RunOutput};
use crate::hooks::HookFilter;
use crate::interventions::Hooks;
use crate::limits::DeviceLimits;
use crate::logits::Logits;
use crate::tokens::TokenBatch;

/// Weights of one transformer block, in the checkpoint's layout (`[out_features, in_features]`).
pub(crate) struct BlockWeights {
    pub input_norm: Weight,
    pub q: Weight,
    pub q_bias: Weight,
    pub k: Weight,
    pub k_bias: Weight,
    pub v: Weight,
    pub v_bias: Weight,
    pub o: Weight,
    pub post_attention_norm: Weight,
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

/// A Qwen2 model with its weights on one backend.
pub struct Model {
    pub(crate) config: Qwen2Config,
    generation_config: GenerationConfig,
    generation_max_length: Option<usize>,
    eos_token_ids: Vec<u32>,
    tokenizer: Option<Tokenizer>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) embed: Weight,
    pub(crate) blocks: Vec<BlockWeights>,
    pub(crate) final_norm: Weight,
    final_norm_host: Vec<f32>,
    pub(crate) unembed: Weight,
    pub(crate) limits: DeviceLimits,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a model from a folder or hub id onto `backend`; the tokenizer is loaded when the
    /// folder has `tokenizer.json`.
    pub fn load(source: &ModelSource, backend: Arc<dyn Backend>) -> Result<Model> {
        let checkpoint = Checkpoint::load(source)?;
        Model::from_checkpoint(&checkpoint, backend)
    }

    /// Uploads the weights of an opened checkpoint to `backend`, each in its stored dtype. A tied
    /// unembedding shares the embedding's upload.
    pub fn from_checkpoint(checkpoint: &Checkpoint, backend: Arc<dyn Backend>) -> Result<Model> {
        let config = checkpoint.config().clone();
        let generation_max_length = read_generation_max_length(checkpoint.dir())?;
        let upload = |name: &str| -> Result<Weight> {
            let view = checkpoint.tensor(name)?;
            Ok(backend.upload_weight(view.dtype, view.shape, view.data)?)
        };

        let embed = upload("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(config.n_layers());
        for layer in 0..config.n_layers() {
            let name = |suffix: &str| format!("model.layers.{layer}.{suffix}");
            blocks.push(BlockWeights {
                input_norm: upload(&name("input_layernorm.weight"))?,
                q: upload(&name("self_attn.q_proj.weight"))?,
                q_bias: upload(&name("self_attn.q_proj.bias"))?,
                k: upload(&name("self_attn.k_proj.weight"))?,
                k_bias: upload(&name("self_attn.k_proj.bias"))?,
                v: upload(&name("self_attn.v_proj.weight"))?,
                v_bias: upload(&name("self_attn.v_proj.bias"))?,
                o: upload(&name("self_attn.o_proj.weight"))?,
                post_attention_norm: upload(&name("post_attention_layernorm.weight"))?,
                gate: upload(&name("mlp.gate_proj.weight"))?,
                up: upload(&name("mlp.up_proj.weight"))?,
                down: upload(&name("mlp.down_proj.weight"))?,
            });
        }
        let final_norm = upload("model.norm.weight")?;
        let final_norm_host = checkpoint.tensor("model.norm.weight")?.to_f32_vec();
        let unembed = if checkpoint.is_tied() {
            embed.clone()
        } else {
            upload(checkpoint.unembedding_name())?
        };

        let tokenizer = match Tokenizer::from_dir(checkpoint.dir()) {
            Ok(tokenizer) => Some(tokenizer),
            Err(error) => {
                tracing::info!(dir = %checkpoint.dir().display(), %error, "model loaded without a tokenizer");
                None
            }
        };

        let limits = DeviceLimits::for_backend(backend.as_ref());
        tracing::info!(
            backend = %backend.name(),
            layers = config.n_layers(),
            d_model = config.d_model(),
            dtype = %checkpoint.dtype(),
            tied = checkpoint.is_tied(),
            "model loaded"
        );
        Ok(Model {
            generation_config: checkpoint.generation_config().clone(),
            generation_max_length,
            eos_token_ids: checkpoint.eos_token_ids().to_vec(),
            config,
            tokenizer,
            backend,
            embed,
            blocks,
            final_norm,
            final_norm_host,
            unembed,
            limits,
        })
    }

    /// Returns the validated `config.json`.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// `generation_config.json` (defaults when the checkpoint has none).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_config
    }

    /// `max_length` of `generation_config.json`: the total length (prompt plus new tokens) that
    /// generation stops at when no `max_new_tokens` is given.
    pub fn generation_max_length(&self) -> Option<usize> {
        self.generation_max_length
    }

    /// Token ids that end generation (`generation_config.json`, else `config.json`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Returns the tokenizer, when the model folder has `tokenizer.json`.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Returns the backend the weights live on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Number of transformer blocks.
    pub fn n_layers(&self) -> usize {
        self.config.n_layers()
    }

    /// Returns the memory limits runs are checked against before they start.
    pub fn device_limits(&self) -> DeviceLimits {
        self.limits
    }

    /// Replaces the memory limits runs are checked against (e.g. a real GPU's memory size).
    pub fn set_device_limits(&mut self, limits: DeviceLimits) {
        self.limits = limits;
    }

    /// Returns the unembedding matrix `[d_vocab, d_model]` on the device (`lm_head.weight`, or the
    /// embedding when tied).
    pub fn unembedding(&self) -> &Weight {
        &self.unembed
    }

    /// Returns the final RMSNorm weight (`model.norm.weight`) on the host, `[d_model]`.
    pub fn final_norm_weight(&self) -> &[f32] {
        &self.final_norm_host
    }

    /// Rows `ids` of the unembedding (the logit directions of those tokens), `[ids.len(),
    /// d_model]`.
    pub fn unembedding_rows(&self, ids: &[u32]) -> Result<HostTensor> {
        self.check_token_ids(ids)?;
        let rows = self.backend.embedding(&self.unembed, ids)?;
        let data = self.backend.read(&rows)?;
        HostTensor::new(vec![ids.len(), self.config.d_model()], data)
    }

    /// Applies the final RMSNorm and the unembedding to residual-stream rows `[rows, d_model]`
    /// (the logit lens): `[rows, d_vocab]`.
    pub fn unembed(&self, resid: &Tensor) -> Result<Tensor> {
        let d_model = self.config.d_model();
        if resid.last_dim() != d_model {
            return Err(ModelError::ShapeMismatch {
                what: "residual stream given to unembed".to_string(),
                expected: vec![resid.rows(), d_model],
                found: resid.shape().to_vec(),
            });
        }
        let (normalized, _) = self
            .backend
            .rms_norm(resid, self.config.rms_norm_eps as f32)?;
        let scaled = self.backend.mul_weight(&normalized, &self.final_norm)?;
        Ok(self.backend.matmul(&scaled, &self.unembed, None)?)
    }

    pub(crate) fn check_token_ids(&self, ids: &[u32]) -> Result<()> {
        let d_vocab = self.config.d_vocab();
        match ids.iter().position(|id| *id as usize >= d_vocab) {
            Some(position) => Err(ModelError::TokenOutOfRange {
                token: ids[position],
                item: 0,
                position,
                d_vocab,
            }),
            None => Ok(()),
        }
    }

    /// Runs the model over a batch with hooks, interventions, caching and the layer range given in
    /// `options`.
    pub fn run(&self, tokens: &TokenBatch, options: &RunOptions) -> Result<RunOutput> {
        forward::run(self, tokens, None, options, None)
    }

    /// Runs new tokens against a KV cache and appends their keys and values to it. The first call
    /// on an empty cache runs the prompt (which may be a left-padded batch); later calls run one or
    /// more new tokens per batch item (no padding). Hooks, interventions and caching work as in
    /// [`Model::run`]; `stop_at_layer` and `start_at_layer` are not allowed here, nor mean
    /// ablation after the first call (its mean would cover only the new tokens). On error the
    /// cache is left unchanged.
    pub fn run_step(
        &self,
        cache: &mut KvCache,
        tokens: &TokenBatch,
        options: &RunOptions,
    ) -> Result<RunOutput> {
        forward::run(self, tokens, Some(cache), options, None)
    }

    /// Returns an empty KV cache for [`Model::run_step`].
    pub fn new_kv_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layers())
    }

    /// Logits of a plain forward pass.
    pub fn forward(&self, tokens: &TokenBatch) -> Result<Logits> {
        let output = self.run(tokens, &RunOptions::default())?;
        output.into_logits()
    }

    /// Logits and the activations the filter selects.
    pub fn run_with_cache(
        &self,
        tokens: &TokenBatch,
        filter: HookFilter,
    ) -> Result<(Logits, ActivationCache)> {
        let options = RunOptions {
            cache: filter,
            ..RunOptions::default()
        };
        let output = self.run(tokens, &options)?;
        let cache = output.cache;
        let logits = output.logits.ok_or_else(missing_logits)?;
        Ok((logits, cache))
    }

    /// Logits of a forward pass with hooks and interventions.
    pub fn run_with_hooks(&self, tokens: &TokenBatch, hooks: Hooks) -> Result<Logits> {
        let options = RunOptions {
            hooks,
            ..RunOptions::default()
        };
        self.run(tokens, &options)?.into_logits()
    }
}

pub(crate) fn missing_logits() -> ModelError {
    ModelError::InvalidArgument(
        "the run computed no logits (stop_at_layer or LogitRows::None was set)".to_string(),
    )
}

/// Reads `max_length` from the folder's `generation_config.json`, if both exist.
// NOTE: read here because qwenlens_weights::GenerationConfig has no max_length field yet.
fn read_generation_max_length(dir: &std::path::Path) -> Result<Option<usize>> {
    #[derive(serde::Deserialize)]
    struct MaxLength {
        max_length: Option<usize>,
    }

    let path = dir.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModelError::Io {
                action: "reading",
                path,
                source,
            });
        }
    };
    let parsed: MaxLength = serde_json::from_str(&text).map_err(|error| {
        ModelError::InvalidArgument(format!(
            "invalid max_length in {}: {error}; expected a positive whole number",
            path.display()
        ))
    })?;
    if parsed.max_length == Some(0) {
        return Err(ModelError::InvalidArgument(format!(
            "invalid max_length 0 in {}: expected a positive whole number",
            path.display()
        )));
    }
    Ok(parsed.max_length)
}
