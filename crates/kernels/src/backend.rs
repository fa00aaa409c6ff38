use crate::{DType, KernelError, Result, Tensor, Weight};

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

impl AttentionParams {
    /// Checks `q`, `k`, `v` and the pattern overrides against these parameters, so that every backend
    /// rejects the same inputs with the same errors before any work starts. Operands may be
    /// `[rows, heads, d_head]` or flat `[rows, heads * d_head]`.
    pub fn validate(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        overrides: &[PatternOverride],
    ) -> Result<()> {
        let p = self;
        if p.batch == 0 || p.n_heads == 0 || p.n_kv_heads == 0 || p.d_head == 0 {
            return Err(attention_shape_error(format!(
                "batch ({}), n_heads ({}), n_kv_heads ({}) and d_head ({}) must be positive",
                p.batch, p.n_heads, p.n_kv_heads, p.d_head
            )));
        }
        if !p.n_heads.is_multiple_of(p.n_kv_heads) {
            return Err(attention_shape_error(format!(
                "n_heads {} must be a multiple of n_kv_heads {}",
                p.n_heads, p.n_kv_heads
            )));
        }
        if p.q_len > p.kv_len {
            return Err(attention_shape_error(format!(
                "q_len {} exceeds kv_len {}: queries must be the last q_len of the kv_len positions",
                p.q_len, p.kv_len
            )));
        }
        if p.key_start.len() != p.batch {
            return Err(attention_shape_error(format!(
                "key_start has {} entries for a batch of {}",
                p.key_start.len(),
                p.batch
            )));
        }
        if let Some(&start) = p.key_start.iter().find(|&&start| start > p.kv_len) {
            return Err(KernelError::OutOfRange {
                op: "attention",
                what: "key_start",
                value: start,
                limit: p.kv_len + 1,
            });
        }
        check_attention_operand("q", q, p.batch * p.q_len, p.n_heads, p.d_head)?;
        check_attention_operand("k", k, p.batch * p.kv_len, p.n_kv_heads, p.d_head)?;
        check_attention_operand("v", v, p.batch * p.kv_len, p.n_kv_heads, p.d_head)?;

        let mut seen = vec![false; p.n_heads];
        for o in overrides {
            if o.head >= p.n_heads {
                return Err(KernelError::OutOfRange {
                    op: "attention",
                    what: "override head",
                    value: o.head,
                    limit: p.n_heads,
                });
            }
            if std::mem::replace(&mut seen[o.head], true) {
                return Err(attention_shape_error(format!(
                    "two pattern overrides for head {}; give at most one per head",
                    o.head
                )));
            }
            if o.pattern.shape() != [p.batch, p.q_len, p.kv_len] {
                return Err(attention_shape_error(format!(
                    "override pattern of head {} has shape {:?}, expected [{}, {}, {}] (batch, q_len, kv_len)",
                    o.head,
                    o.pattern.shape(),
                    p.batch,
                    p.q_len,
                    p.kv_len
                )));
            }
        }
        Ok(())
    }
}

fn attention_shape_error(detail: String) -> KernelError {
    KernelError::Shape {
        op: "attention",
        detail,
    }
}

/// Checks that `x` is `[rows, heads, d_head]` or its flat form `[rows, heads * d_head]`.
fn check_attention_operand(
    name: &str,
    x: &Tensor,
    rows: usize,
    heads: usize,
    d_head: usize,
) -> Result<()> {
    let shape = x.shape();
    if shape == [rows, heads, d_head] || shape == [rows, heads * d_head] {
        return Ok(());
    }
    Err(attention_shape_error(format!(
        "{name} has shape {shape:?}, expected [{rows}, {heads}, {d_head}] (batch * len, heads, d_head)"
    )))
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
