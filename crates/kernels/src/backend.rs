use crate::{DType, Result, Tensor, Weight};

/// Shape and masking of one attention call.
///
/// Queries are the last `q_len` positions of each sequence's `kv_len` keys: query `i` of batch item
/// `b` sits at key index `kv_len - q_len + i` and sees keys `key_start[b] ..= kv_len - q_len + i`
/// (causal mask plus left padding). A query row that sees no key (a padding row) gets a zero pattern
/// row and a zero `z`.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionParams {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    /// First visible key of each batch item (its number of left-padding tokens); length `batch`.
    pub key_start: Vec<usize>,
    /// Multiplier of `q · k`, normally `1 / sqrt(d_head)`.
    pub scale: f32,
    /// Return the scores (`-inf` where masked), TransformerLens's `hook_attn_scores`.
    pub want_scores: bool,
    /// Return the pattern (after any override), TransformerLens's `hook_pattern`.
    pub want_pattern: bool,
}

/// A replacement for one query head's attention pattern, applied after the softmax and before `z`.
#[derive(Clone, Debug)]
pub struct PatternOverride {
    /// Query head index, `0..n_heads`.
    pub head: usize,
    /// Pattern of shape `[batch, q_len, kv_len]`; entries of masked keys are used as given.
    pub pattern: Tensor,
}

/// Outputs of [`Backend::attention`].
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// `[batch * q_len, n_heads, d_head]`.
    pub z: Tensor,
    /// `[batch, n_heads, q_len, kv_len]` when requested.
    pub scores: Option<Tensor>,
    /// `[batch, n_heads, q_len, kv_len]` when requested.
    pub pattern: Option<Tensor>,
}

/// The operations of a Qwen2 forward pass.
///
/// Every method checks its operands' shapes and returns [`crate::KernelError::Shape`] instead of
/// panicking. "Rows" means the tensor viewed as `[numel / last_dim, last_dim]`.
pub trait Backend: Send + Sync {
    /// Human-readable name, e.g. `cpu (2 threads)` or `wgpu: llvmpipe (Vulkan)`.
    fn name(&self) -> String;

    /// Copies host `f32` data to a new tensor.
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor>;

    /// Copies a weight in its stored dtype (little-endian bytes, as in safetensors).
    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Weight>;

    /// Reads a whole tensor back to the host.
    fn read(&self, x: &Tensor) -> Result<Vec<f32>>;

    /// Gathers rows `ids` of a `[vocab, d]` table: `[ids.len(), d]`.
    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Tensor>;

    /// `x · wᵀ (+ bias)` with `x` of shape `[..., k]`, `w` of shape `[n, k]` and `bias` of shape
    /// `[n]`: result `[..., n]`, accumulated in f32.
    fn matmul(&self, x: &Tensor, w: &Weight, bias: Option<&Weight>) -> Result<Tensor>;

    /// RMS normalization of each row without the weight: returns `(x / scale, scale)`, `scale` of
    /// shape `[..., 1]` being `sqrt(mean(x²) + eps)` (TransformerLens's `hook_normalized` and
    /// `hook_scale`).
    fn rms_norm(&self, x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)>;

    /// Multiplies every row by a weight vector of length `last_dim` (the RMSNorm weight).
    fn mul_weight(&self, x: &Tensor, w: &Weight) -> Result<Tensor>;

    /// Rotary embedding, rotate-half convention, on `x` of shape `[rows, n_heads, d_head]`:
    /// row `r` is rotated by angle `positions[r] · theta^(-2k / d_head)`.
    fn rope(&self, x: &Tensor, positions: &[u32], theta: f32) -> Result<Tensor>;

    /// Grouped-query attention: `q` `[batch * q_len, n_heads, d_head]`, `k` and `v`
    /// `[batch * kv_len, n_kv_heads, d_head]`; query head `h` reads KV head
    /// `h / (n_heads / n_kv_heads)`. Softmax in f32.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttentionParams,
        overrides: &[PatternOverride],
    ) -> Result<AttentionOutput>;

    /// `silu(gate) * up`, element-wise.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// `a + b`, element-wise, same shapes.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// Element-wise `if mask != 0 { replacement } else { x }`; all three of the same shape.
    fn select(&self, mask: &Tensor, x: &Tensor, replacement: &Tensor) -> Result<Tensor>;

    /// Appends along the sequence: `cache` `[batch * t, ...]` and `new` `[batch * n, ...]` give
    /// `[batch * (t + n), ...]`, each batch item's new rows after its cached rows (KV-cache append).
    fn concat_seq(&self, cache: &Tensor, new: &Tensor, batch: usize) -> Result<Tensor>;

    /// Copies the chosen rows: `[rows.len(), last_dim]` (e.g. the last position's logits).
    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor>;

    /// Log-sum-exp of each row: `[rows]`.
    fn logsumexp(&self, x: &Tensor) -> Result<Tensor>;

    /// Picks one column per row, `out[r] = x[r, cols[r]]`: `[rows]`.
    fn gather_cols(&self, x: &Tensor, cols: &[u32]) -> Result<Tensor>;
}
