//! The Qwen2 forward pass with hook points: one code path for full forwards and KV-cache steps.

use qwenlens_kernels::{AttentionParams, Backend, Tensor};

use crate::cache::{ActivationCache, HostTensor};
use crate::error::{ModelError, Result};
use crate::hooks::{BlockHook, HookFilter, HookPoint};
use crate::interventions::{HookContext, Hooks, Intervention};
use crate::limits::{self, PassSize};
use crate::logits::{LogitRows, Logits};
use crate::model::{Model, missing_logits};
use crate::patterns;
use crate::tokens::TokenBatch;

/// Options of a run besides the forward pass itself.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Interventions and closures.
    pub hooks: Hooks,
    /// Hook points read back into the run's [`ActivationCache`]; the others stay on the device.
    pub cache: HookFilter,
    /// Stop before block `l` and return the residual stream entering it (`l = n_layers`: the final
    /// residual stream before `ln_final`); no logits are computed.
    pub stop_at_layer: Option<usize>,
    /// Start at block `l` from the given residual stream `[batch * pos, d_model]` instead of the
    /// embeddings; the tokens still set the positions and the padding mask.
    pub start_at_layer: Option<(usize, Tensor)>,
    /// Positions that get logits.
    pub logit_rows: LogitRows,
}

/// Results of a run.
#[derive(Debug)]
pub struct RunOutput {
    /// The logits, unless `stop_at_layer` or [`LogitRows::None`] was given.
    pub logits: Option<Logits>,
    /// The activations the filter selected.
    pub cache: ActivationCache,
    /// With `stop_at_layer`, the residual stream entering that layer, `[batch * pos, d_model]`.
    pub resid: Option<Tensor>,
}

impl RunOutput {
    /// Returns the logits, or an error when the run computed none.
    pub fn into_logits(self) -> Result<Logits> {
        self.logits.ok_or_else(missing_logits)
    }
}

/// Keys and values of the tokens seen so far, for incremental forwards ([`Model::run_step`]).
///
/// Each layer contains k (after RoPE) and v of shape `[batch * len, n_kv_heads, d_head]`, each batch
/// item's rows contiguous; `padding` is each item's number of left-padding tokens (its first
/// visible key).
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    batch: usize,
    len: usize,
    padding: Vec<usize>,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize) -> KvCache {
        KvCache {
            layers: vec![None; n_layers],
            batch: 0,
            len: 0,
            padding: Vec::new(),
        }
    }

    /// Number of positions cached per batch item (padding included); the next token's sequence
    /// position.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether no token has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of batch items (0 before the first step).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of left-padding tokens of each batch item.
    pub fn padding(&self) -> &[usize] {
        &self.padding
    }

    /// Keys and values of layer `layer`, each `[batch * len, n_kv_heads, d_head]`.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.as_ref().map(|(k, v)| (k, v))
    }
}

/// Runs `tokens` through the model, against `kv` when given.
///
/// Intervention scopes may name positions below `position_limit` (default: the tokens cached plus
/// these); generation passes the final length, so a scope can name a token not generated yet.
pub(crate) fn run(
    model: &Model,
    tokens: &TokenBatch,
    kv: Option<&mut KvCache>,
    options: &RunOptions,
    position_limit: Option<usize>,
) -> Result<RunOutput> {
    let config = &model.config;
    let n_layers = config.n_layers();
    let first = kv.as_ref().map_or(0, |cache| cache.len);
    let q_len = tokens.seq_len();

    tokens.validate(config.d_vocab(), first, config.max_position_embeddings)?;
    let padding = step_padding(kv.as_deref(), tokens)?;
    let position_limit = position_limit.unwrap_or(first + q_len);
    validate_options(model, options, tokens.batch(), kv.is_some(), position_limit)?;
    if first > 0 && needs_whole_sequence(&options.hooks) {
        return Err(ModelError::InvalidArgument(format!(
            "mean ablation cannot run against a KV cache that already holds {first} positions: \
             the mean is over the positions of one pass, which here is only the new tokens, so it \
             would differ from the mean over the whole sequence; run the whole sequence with \
             Model::run instead (generation does this by itself)"
        )));
    }

    let with_result = (0..n_layers).any(|layer| needs_result(options, layer));
    let logit_rows = match options.logit_rows {
        _ if options.stop_at_layer.is_some() => 0,
        LogitRows::All => tokens.batch() * q_len,
        LogitRows::Last => tokens.batch(),
        LogitRows::None => 0,
    };
    let size = PassSize {
        batch: tokens.batch(),
        q_len,
        kv_len: first + q_len,
        logit_rows,
        attention_outputs: 2,
        with_kv_cache: kv.is_some(),
        with_result,
    };
    limits::check(config, &size, model.limits)?;

    let mut pass = Pass::new(model, options, tokens, first, padding.clone());
    let start = options
        .start_at_layer
        .as_ref()
        .map_or(0, |(layer, _)| *layer);
    let stop = options.stop_at_layer.unwrap_or(n_layers);

    let mut resid = match &options.start_at_layer {
        Some((_, resid)) => {
            let expected = [pass.rows(), config.d_model()];
            if resid.shape() != expected {
                return Err(ModelError::ShapeMismatch {
                    what: "start_at_layer residual stream".to_string(),
                    expected: expected.to_vec(),
                    found: resid.shape().to_vec(),
                });
            }
            resid.clone()
        }
        None => pass.embed(tokens)?,
    };

    let mut new_kv: Vec<Option<(Tensor, Tensor)>> = Vec::with_capacity(n_layers);
    for layer in start..stop {
        let cached = kv.as_ref().and_then(|cache| cache.layers[layer].clone());
        let (next, keys_values) = pass.block(layer, resid, cached)?;
        resid = next;
        new_kv.push(Some(keys_values));
    }

    if options.stop_at_layer.is_some() {
        return Ok(RunOutput {
            logits: None,
            cache: pass.cache,
            resid: Some(resid),
        });
    }

    let logits = pass.unembed(resid)?;
    if let Some(cache) = kv {
        cache.layers = new_kv;
        cache.batch = tokens.batch();
        cache.len = first + q_len;
        cache.padding = padding;
    }
    Ok(RunOutput {
        logits,
        cache: pass.cache,
        resid: None,
    })
}

/// Returns each batch item's padding for a pass: the tokens' own for a full forward or a KV
/// cache's first step, else the cache's (new tokens appended to a cache have no padding).
fn step_padding(kv: Option<&KvCache>, tokens: &TokenBatch) -> Result<Vec<usize>> {
    let Some(cache) = kv.filter(|cache| !cache.is_empty()) else {
        return Ok(tokens.padding().to_vec());
    };
    if tokens.batch() != cache.batch {
        return Err(ModelError::InvalidArgument(format!(
            "the KV cache contains {} batch items but the new tokens have {}",
            cache.batch,
            tokens.batch()
        )));
    }
    if tokens.padding().iter().any(|p| *p > 0) {
        return Err(ModelError::InvalidArgument(
            "tokens appended to a KV cache cannot have padding; pad only the prompt".to_string(),
        ));
    }
    Ok(cache.padding.clone())
}

/// Returns whether an intervention reads statistics over the whole sequence (mean ablation), which a
/// KV-cache step of new tokens alone cannot compute.
pub(crate) fn needs_whole_sequence(hooks: &Hooks) -> bool {
    hooks
        .interventions
        .iter()
        .any(|i| matches!(i, Intervention::MeanAblateHeadZ { .. }))
}

fn needs_result(options: &RunOptions, layer: usize) -> bool {
    let point = HookPoint::block(layer, BlockHook::Result);
    options.cache.contains(point) || options.hooks.acts_at(point)
}

/// Checks every hook point, layer, head and scope before any work is done.
fn validate_options(
    model: &Model,
    options: &RunOptions,
    batch: usize,
    with_kv: bool,
    position_limit: usize,
) -> Result<()> {
    let config = &model.config;
    let n_layers = config.n_layers();

    if with_kv && (options.stop_at_layer.is_some() || options.start_at_layer.is_some()) {
        return Err(ModelError::InvalidArgument(
            "stop_at_layer and start_at_layer cannot be used with a KV cache, which needs every layer".to_string(),
        ));
    }
    if let Some(stop) = options.stop_at_layer
        && stop > n_layers
    {
        return Err(ModelError::LayerOutOfRange {
            what: "stop_at_layer".to_string(),
            layer: stop,
            n_layers,
        });
    }
    if let Some((start, _)) = &options.start_at_layer {
        if *start > n_layers {
            return Err(ModelError::LayerOutOfRange {
                what: "start_at_layer".to_string(),
                layer: *start,
                n_layers,
            });
        }
        if let Some(stop) = options.stop_at_layer
            && stop < *start
        {
            return Err(ModelError::InvalidArgument(format!(
                "stop_at_layer {stop} is before start_at_layer {start}"
            )));
        }
    }

    if let HookFilter::Set(points) = &options.cache {
        for point in points {
            point.validate(n_layers)?;
        }
    }
    for (point, _) in &options.hooks.closures {
        point.validate(n_layers)?;
    }
    for intervention in &options.hooks.interventions {
        validate_intervention(model, intervention)?;
        intervention.scope().validate(batch, position_limit)?;
    }
    Ok(())
}

fn validate_intervention(model: &Model, intervention: &Intervention) -> Result<()> {
    let config = &model.config;
    let point = intervention.hook_point().validate(config.n_layers())?;
    let check_head = |head: usize, n_heads: usize, kind: &'static str| {
        if head >= n_heads {
            Err(ModelError::HeadOutOfRange {
                what: point.to_string(),
                head,
                n_heads,
                kind,
            })
        } else {
            Ok(())
        }
    };

    match intervention {
        Intervention::ZeroHeadZ { head, .. }
        | Intervention::MeanAblateHeadZ { head, .. }
        | Intervention::ReplacePattern { head, .. } => check_head(*head, config.n_heads(), "query"),
        Intervention::ZeroKvHeadV { kv_head, .. } => {
            check_head(*kv_head, config.n_kv_heads(), "KV")
        }
        Intervention::AddToHook { hook, vector, .. } => {
            if !hook.is_residual() {
                return Err(ModelError::InvalidArgument(format!(
                    "a steering vector can only be added to a residual-stream hook (hook_embed, hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, unembed.hook_in), not `{hook}`"
                )));
            }
            if vector.len() != config.d_model() {
                return Err(ModelError::ShapeMismatch {
                    what: format!("steering vector for `{hook}`"),
                    expected: vec![config.d_model()],
                    found: vec![vector.len()],
                });
            }
            Ok(())
        }
        Intervention::PatchFromCache { hook, heads, .. } => {
            let Some(heads) = heads else { return Ok(()) };
            if !hook.is_per_head() {
                return Err(ModelError::InvalidArgument(format!(
                    "`{hook}` has no heads; patch it without a head list"
                )));
            }
            let (n_heads, kind) = match hook {
                HookPoint::Block {
                    hook: BlockHook::K | BlockHook::V | BlockHook::RotK,
                    ..
                } => (config.n_kv_heads(), "KV"),
                _ => (config.n_heads(), "query"),
            };
            heads
                .iter()
                .try_for_each(|head| check_head(*head, n_heads, kind))
        }
    }
}

/// State of one forward pass.
pub(crate) struct Pass<'a> {
    model: &'a Model,
    backend: &'a dyn Backend,
    options: &'a RunOptions,
    pub(crate) batch: usize,
    pub(crate) q_len: usize,
    /// Sequence position of the first query row (the KV cache's length).
    pub(crate) first: usize,
    pub(crate) padding: Vec<usize>,
    positions: Vec<u32>,
    cache: ActivationCache,
    /// Mask and zeros of the per-head expansion of `z` used by `hook_result`, built once per pass.
    result_mask: Option<(Tensor, Tensor)>,
}

impl<'a> Pass<'a> {
    fn new(
        model: &'a Model,
        options: &'a RunOptions,
        tokens: &TokenBatch,
        first: usize,
        padding: Vec<usize>,
    ) -> Pass<'a> {
        let batch = tokens.batch();
        let q_len = tokens.seq_len();

        // RoPE positions count from each item's first real token; padding rows get position 0
        // (they are never attended to).
        let mut positions = Vec::with_capacity(batch * q_len);
        for pad in &padding {
            for i in 0..q_len {
                positions.push((first + i).saturating_sub(*pad) as u32);
            }
        }

        Pass {
            model,
            backend: model.backend.as_ref(),
            options,
            batch,
            q_len,
            first,
            padding,
            positions,
            cache: ActivationCache::new(),
            result_mask: None,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.batch * self.q_len
    }

    pub(crate) fn kv_len(&self) -> usize {
        self.first + self.q_len
    }

    /// Returns whether the row `r` (`b * q_len + i`) is a real token inside `scope`.
    pub(crate) fn row_in_scope(&self, scope: &crate::Scope, row: usize) -> bool {
        let (b, i) = (row / self.q_len, row % self.q_len);
        scope.has_item(b) && scope.has_position(self.first + i)
    }

    /// Returns whether row `r` is a padding token.
    pub(crate) fn is_padding_row(&self, row: usize) -> bool {
        let (b, i) = (row / self.q_len, row % self.q_len);
        self.first + i < self.padding[b]
    }

    fn context(&self, point: HookPoint) -> HookContext {
        HookContext {
            point,
            batch: self.batch,
            first_position: self.first,
            q_len: self.q_len,
            padding: self.padding.clone(),
        }
    }

    /// Returns the TransformerLens shape of a hook's activation in this pass.
    pub(crate) fn tl_shape(&self, point: HookPoint) -> Vec<usize> {
        let config = &self.model.config;
        let (b, q) = (self.batch, self.q_len);
        let d_model = config.d_model();
        match point {
            HookPoint::Embed | HookPoint::LnFinalNormalized | HookPoint::UnembedIn => {
                vec![b, q, d_model]
            }
            HookPoint::LnFinalScale => vec![b, q, 1],
            HookPoint::Block { hook, .. } => match hook {
                BlockHook::ResidPre
                | BlockHook::Ln1Normalized
                | BlockHook::AttnOut
                | BlockHook::ResidMid
                | BlockHook::Ln2Normalized
                | BlockHook::MlpOut
                | BlockHook::ResidPost => vec![b, q, d_model],
                BlockHook::Ln1Scale | BlockHook::Ln2Scale => vec![b, q, 1],
                BlockHook::Q | BlockHook::RotQ | BlockHook::Z => {
                    vec![b, q, config.n_heads(), config.d_head()]
                }
                BlockHook::K | BlockHook::V | BlockHook::RotK => {
                    vec![b, q, config.n_kv_heads(), config.d_head()]
                }
                BlockHook::AttnScores | BlockHook::Pattern => {
                    vec![b, config.n_heads(), q, self.kv_len()]
                }
                BlockHook::Result => vec![b, q, config.n_heads(), d_model],
                BlockHook::MlpPre | BlockHook::MlpPreLinear | BlockHook::MlpPost => {
                    vec![b, q, config.d_mlp()]
                }
            },
        }
    }

    /// Runs the interventions and closures of `point` on `x`, and records `x` when the filter
    /// selects it. Returns the (possibly replaced) activation and whether anything changed it.
    fn hook(&mut self, point: HookPoint, x: Tensor) -> Result<(Tensor, bool)> {
        let hooks = &self.options.hooks;
        let record = self.options.cache.contains(point);
        if !record && !hooks.acts_at(point) {
            return Ok((x, false));
        }

        let interventions: Vec<&Intervention> = hooks.interventions_at(point).collect();
        let mut changed = !interventions.is_empty();
        let mut x = self.intervene_all(point, &interventions, x)?;

        let tl_shape = self.tl_shape(point);
        let mut host: Option<HostTensor> = None;
        if hooks.closures_at(point).next().is_some() {
            let mut tensor = HostTensor {
                shape: tl_shape.clone(),
                data: self.backend.read(&x)?,
            };

            // Upload only a real change, so a closure that returns its input leaves every later
            // activation bit-identical.
            if self.run_closures(point, &mut tensor)? {
                x = self.backend.upload(&tensor.data, x.shape())?;
                changed = true;
            }
            host = Some(tensor);
        }

        if record {
            let tensor = match host {
                Some(tensor) => tensor,
                None => HostTensor {
                    shape: tl_shape,
                    data: self.backend.read(&x)?,
                },
            };
            self.cache.insert(point, tensor);
        }
        Ok((x, changed))
    }

    /// Records a host activation computed outside [`Pass::hook`] (attention scores and pattern).
    pub(crate) fn record(&mut self, point: HookPoint, tensor: HostTensor) {
        if self.options.cache.contains(point) {
            self.cache.insert(point, tensor);
        }
    }

    pub(crate) fn records(&self, point: HookPoint) -> bool {
        self.options.cache.contains(point)
    }

    pub(crate) fn hooks(&self) -> &'a Hooks {
        &self.options.hooks
    }

    pub(crate) fn backend(&self) -> &'a dyn Backend {
        self.backend
    }

    pub(crate) fn model(&self) -> &'a Model {
        self.model
    }

    /// Runs the closures of `point` on a host tensor, in place; returns whether one changed it.
    pub(crate) fn run_closures(&self, point: HookPoint, tensor: &mut HostTensor) -> Result<bool> {
        let shape = tensor.shape.clone();
        let original = tensor.data.clone();
        let context = self.context(point);
        for closure in self.options.hooks.closures_at(point) {
            closure(tensor, &context);
            check_replacement(point, &shape, tensor)?;
        }
        Ok(!bit_equal(&tensor.data, &original))
    }

    fn embed(&mut self, tokens: &TokenBatch) -> Result<Tensor> {
        let d_vocab = self.model.config.d_vocab() as u32;

        // Padding ids are never validated, so any id works as padding: out-of-range ones read row
        // 0.
        let ids: Vec<u32> = tokens
            .ids()
            .iter()
            .map(|id| if *id < d_vocab { *id } else { 0 })
            .collect();
        let embedded = self.backend.embedding(&self.model.embed, &ids)?;
        Ok(self.hook(HookPoint::Embed, embedded)?.0)
    }

    /// RMS normalization with its two hooks; returns `normalized * weight`.
    fn rms_norm(
        &mut self,
        x: &Tensor,
        scale_point: HookPoint,
        normalized_point: HookPoint,
        weight: &qwenlens_kernels::Weight,
    ) -> Result<Tensor> {
        let eps = self.model.config.rms_norm_eps as f32;
        let (normalized, scale) = self.backend.rms_norm(x, eps)?;
        let (scale, scale_changed) = self.hook(scale_point, scale)?;

        // A replaced scale divides the residual stream as TransformerLens does (`x / scale` after
        // `hook_scale`); the backend has no division, so this rare path runs on the host.
        let normalized = if scale_changed {
            let values = self.backend.read(x)?;
            let scales = self.backend.read(&scale)?;
            let width = x.last_dim();
            let divided: Vec<f32> = values
                .chunks(width)
                .zip(&scales)
                .flat_map(|(row, s)| row.iter().map(move |v| v / s))
                .collect();
            self.backend.upload(&divided, x.shape())?
        } else {
            normalized
        };

        let (normalized, _) = self.hook(normalized_point, normalized)?;
        Ok(self.backend.mul_weight(&normalized, weight)?)
    }

    /// Runs one transformer block; returns the residual stream leaving it and the layer's keys and
    /// values (cached ones followed by this pass's).
    fn block(
        &mut self,
        layer: usize,
        resid: Tensor,
        cached: Option<(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let model = self.model;
        let config = &model.config;
        let weights = &model.blocks[layer];
        let backend = self.backend;
        let point = |hook| HookPoint::block(layer, hook);
        let rows = self.rows();
        let (n_heads, n_kv_heads, d_head) =
            (config.n_heads(), config.n_kv_heads(), config.d_head());

        let (resid_pre, _) = self.hook(point(BlockHook::ResidPre), resid)?;
        let h = self.rms_norm(
            &resid_pre,
            point(BlockHook::Ln1Scale),
            point(BlockHook::Ln1Normalized),
            &weights.input_norm,
        )?;

        let q = backend.matmul(&h, &weights.q, Some(&weights.q_bias))?;
        let k = backend.matmul(&h, &weights.k, Some(&weights.k_bias))?;
        let v = backend.matmul(&h, &weights.v, Some(&weights.v_bias))?;
        let q = reshape(&q, vec![rows, n_heads, d_head])?;
        let k = reshape(&k, vec![rows, n_kv_heads, d_head])?;
        let v = reshape(&v, vec![rows, n_kv_heads, d_head])?;
        let (q, _) = self.hook(point(BlockHook::Q), q)?;
        let (k, _) = self.hook(point(BlockHook::K), k)?;
        let (v, _) = self.hook(point(BlockHook::V), v)?;

        let theta = config.rope_theta as f32;
        let rot_q = backend.rope(&q, &self.positions, theta)?;
        let rot_k = backend.rope(&k, &self.positions, theta)?;
        let (rot_q, _) = self.hook(point(BlockHook::RotQ), rot_q)?;
        let (rot_k, _) = self.hook(point(BlockHook::RotK), rot_k)?;

        let (keys, values) = match cached {
            Some((cached_k, cached_v)) => (
                backend.concat_seq(&cached_k, &rot_k, self.batch)?,
                backend.concat_seq(&cached_v, &v, self.batch)?,
            ),
            None => (rot_k, v),
        };

        let params = AttentionParams {
            batch: self.batch,
            q_len: self.q_len,
            kv_len: self.kv_len(),
            n_heads,
            n_kv_heads,
            d_head,
            key_start: self.padding.clone(),
            scale: 1.0 / (d_head as f32).sqrt(),
            want_scores: false,
            want_pattern: false,
        };
        let z = patterns::attention(self, layer, &rot_q, &keys, &values, params)?;
        let (z, _) = self.hook(point(BlockHook::Z), z)?;
        let z_flat = reshape(&z, vec![rows, n_heads * d_head])?;

        let attn_out = if needs_result(self.options, layer) {
            let result = self.head_results(&z_flat, &weights.o)?;
            let (result, result_changed) = self.hook(point(BlockHook::Result), result)?;
            if result_changed {
                self.sum_heads(&result)?
            } else {
                backend.matmul(&z_flat, &weights.o, None)?
            }
        } else {
            backend.matmul(&z_flat, &weights.o, None)?
        };
        let (attn_out, _) = self.hook(point(BlockHook::AttnOut), attn_out)?;

        let resid_mid = backend.add(&resid_pre, &attn_out)?;
        let (resid_mid, _) = self.hook(point(BlockHook::ResidMid), resid_mid)?;
        let h2 = self.rms_norm(
            &resid_mid,
            point(BlockHook::Ln2Scale),
            point(BlockHook::Ln2Normalized),
            &weights.post_attention_norm,
        )?;

        let gate = backend.matmul(&h2, &weights.gate, None)?;
        let (gate, _) = self.hook(point(BlockHook::MlpPre), gate)?;
        let up = backend.matmul(&h2, &weights.up, None)?;
        let (up, _) = self.hook(point(BlockHook::MlpPreLinear), up)?;
        let post = backend.silu_mul(&gate, &up)?;
        let (post, _) = self.hook(point(BlockHook::MlpPost), post)?;
        let mlp_out = backend.matmul(&post, &weights.down, None)?;
        let (mlp_out, _) = self.hook(point(BlockHook::MlpOut), mlp_out)?;

        let resid_post = backend.add(&resid_mid, &mlp_out)?;
        let (resid_post, _) = self.hook(point(BlockHook::ResidPost), resid_post)?;
        Ok((resid_post, (keys, values)))
    }

    /// Computes each head's `z · W_O` as `[rows, n_heads, d_model]`: every row of `z` is repeated
    /// once per head with the other heads' columns zeroed, so one matmul with W_O gives all heads'
    /// results.
    fn head_results(&mut self, z_flat: &Tensor, o: &qwenlens_kernels::Weight) -> Result<Tensor> {
        let config = &self.model.config;
        let (rows, n_heads, d_head) = (self.rows(), config.n_heads(), config.d_head());
        let width = n_heads * d_head;

        if self.result_mask.is_none() {
            let mut mask = vec![1.0f32; rows * n_heads * width];
            for (index, row) in mask.chunks_mut(width).enumerate() {
                let head = index % n_heads;
                row[head * d_head..(head + 1) * d_head].fill(0.0);
            }
            let shape = [rows * n_heads, width];
            let mask = self.backend.upload(&mask, &shape)?;
            let zeros = self
                .backend
                .upload(&vec![0.0; rows * n_heads * width], &shape)?;
            self.result_mask = Some((mask, zeros));
        }
        let (mask, zeros) = self.result_mask.as_ref().expect("result mask built above");

        let repeated_rows: Vec<usize> = (0..rows)
            .flat_map(|r| std::iter::repeat_n(r, n_heads))
            .collect();
        let repeated = self.backend.gather_rows(z_flat, &repeated_rows)?;
        let per_head = self.backend.select(mask, &repeated, zeros)?;
        let result = self.backend.matmul(&per_head, o, None)?;
        reshape(&result, vec![rows, n_heads, config.d_model()])
    }

    /// `hook_attn_out` as the sum of a replaced `hook_result` over heads.
    fn sum_heads(&self, result: &Tensor) -> Result<Tensor> {
        let config = &self.model.config;
        let (n_heads, d_model) = (config.n_heads(), config.d_model());
        let values = self.backend.read(result)?;
        let mut sums = vec![0.0f32; self.rows() * d_model];
        for (row, sum) in values
            .chunks(n_heads * d_model)
            .zip(sums.chunks_mut(d_model))
        {
            for head in row.chunks(d_model) {
                sum.iter_mut().zip(head).for_each(|(s, v)| *s += v);
            }
        }
        Ok(self.backend.upload(&sums, &[self.rows(), d_model])?)
    }

    /// Final RMSNorm with its hooks and the unembedding.
    fn unembed(&mut self, resid: Tensor) -> Result<Option<Logits>> {
        let model = self.model;
        let x = self.rms_norm(
            &resid,
            HookPoint::LnFinalScale,
            HookPoint::LnFinalNormalized,
            &model.final_norm,
        )?;
        let (x, _) = self.hook(HookPoint::UnembedIn, x)?;

        let (rows, pos) = match self.options.logit_rows {
            LogitRows::All => (x, self.q_len),
            LogitRows::Last => {
                let last: Vec<usize> = (0..self.batch)
                    .map(|b| b * self.q_len + self.q_len - 1)
                    .collect();
                (self.backend.gather_rows(&x, &last)?, 1)
            }
            LogitRows::None => return Ok(None),
        };
        let logits = self.backend.matmul(&rows, &model.unembed, None)?;
        Ok(Some(Logits::new(
            logits,
            self.batch,
            pos,
            self.padding.clone(),
            model.backend.clone(),
        )))
    }
}

/// Checks that a closure left the activation's shape and element count alone.
pub(crate) fn check_replacement(
    point: HookPoint,
    expected: &[usize],
    tensor: &HostTensor,
) -> Result<()> {
    let numel: usize = expected.iter().product();
    if tensor.shape != expected || tensor.data.len() != numel {
        return Err(ModelError::ShapeMismatch {
            what: format!("replacement for `{point}` returned by a hook closure"),
            expected: expected.to_vec(),
            found: if tensor.shape.iter().product::<usize>() == tensor.data.len() {
                tensor.shape.clone()
            } else {
                vec![tensor.data.len()]
            },
        });
    }
    Ok(())
}

pub(crate) fn bit_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn reshape(x: &Tensor, shape: Vec<usize>) -> Result<Tensor> {
    let found = x.shape().to_vec();
    x.reshape(shape.clone()).ok_or(ModelError::ShapeMismatch {
        what: "internal reshape".to_string(),
        expected: shape,
        found,
    })
}
