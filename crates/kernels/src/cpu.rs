//! Multi-threaded CPU backend: `gemm` for prefill matmuls, hand-vectorized GEMV that reads bf16 and
//! f16 weights directly for decode, and rayon over rows, heads and weight blocks for the rest.
//!
//! It is the reference the WGSL kernels are checked against and the backend for machines without a
//! GPU, so every operation is exact up to f32 rounding order (see [`crate::reference`]).

mod attention;
mod elementwise;
mod matmul;
mod simd;

use std::sync::Arc;

use rayon::ThreadPool;

use crate::backend::{AttentionOutput, AttentionParams, Backend, PatternOverride};
use crate::{DType, KernelError, Result, Tensor, Weight};

/// Name of this backend in [`KernelError::WrongBackend`].
const BACKEND: &str = "cpu";

/// Storage of a CPU [`Tensor`]: its f32 values, row-major.
#[derive(Debug)]
pub struct CpuTensorData(pub Vec<f32>);

/// Storage of a CPU [`Weight`], in the dtype the checkpoint stores (no f32 copy of a bf16 weight).
#[derive(Debug)]
pub enum CpuWeightData {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// IEEE half-precision bit patterns.
    F16(Vec<u16>),
}

impl CpuWeightData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) | Self::F16(v) => v.len(),
        }
    }

    /// Returns whether the weight has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts elements `range` to f32 into `out` (which must have the range's length).
    pub fn to_f32_into(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        match self {
            Self::F32(v) => out.copy_from_slice(&v[range]),
            Self::Bf16(v) => simd::bf16_to_f32(&v[range], out),
            Self::F16(v) => simd::f16_to_f32(&v[range], out),
        }
    }

    /// Converts all elements to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.to_f32_into(0..self.len(), &mut out);
        out
    }
}

/// The CPU implementation of [`Backend`].
///
/// Operations run on a rayon thread pool: the global one for [`CpuBackend::new`], a private one of
/// the requested size for [`CpuBackend::with_threads`].
pub struct CpuBackend {
    pool: Option<Arc<ThreadPool>>,
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .finish()
    }
}

impl CpuBackend {
    /// Creates a backend that uses all threads of rayon's global pool (one per core unless
    /// `RAYON_NUM_THREADS` sets another count).
    pub fn new() -> Self {
        Self {
            pool: None,
            threads: rayon::current_num_threads(),
        }
    }

    /// Creates a backend with a private pool of `threads` threads (0 means one per core).
    ///
    /// If the operating system fails to start the threads, this logs a warning and falls back to
    /// rayon's global pool.
    pub fn with_threads(threads: usize) -> Self {
        match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(pool) => Self {
                threads: pool.current_num_threads(),
                pool: Some(Arc::new(pool)),
            },
            Err(err) => {
                tracing::warn!(threads, %err, "failed to start a CPU thread pool; using rayon's global pool");
                Self::new()
            }
        }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Returns the f32 values of a tensor of this backend (no copy).
    pub fn tensor_data<'a>(&self, x: &'a Tensor) -> Result<&'a [f32]> {
        data(x, "tensor_data")
    }

    fn run<R: Send>(&self, op: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(op),
            None => op(),
        }
    }
}

/// An output buffer shared by parallel tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks only write disjoint elements (each caller's SAFETY comment says which), and the
// buffer outlives the parallel scope that uses the pointer.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn new(buffer: &mut [f32]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
        }
    }

    /// Pointer to element `offset`. Closures call this method instead of reading the field so
    /// that they capture the whole `Send` wrapper, not the raw pointer inside it.
    fn at(self, offset: usize) -> *mut f32 {
        assert!(
            offset <= self.len,
            "offset {offset} past a buffer of {}",
            self.len
        );
        self.ptr.wrapping_add(offset)
    }

    /// Elements `offset..offset + len`.
    ///
    /// # Safety
    /// No other live reference or task may access these elements.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        assert!(
            offset + len <= self.len,
            "range {offset}..{} past a buffer of {}",
            offset + len,
            self.len
        );
        // SAFETY: in bounds (checked above) and exclusive (the caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

/// Wraps f32 values in a CPU tensor.
fn tensor(shape: Vec<usize>, values: Vec<f32>) -> Tensor {
    debug_assert_eq!(shape.iter().product::<usize>(), values.len());
    Tensor::new(shape, Arc::new(CpuTensorData(values)))
}

fn data<'a>(x: &'a Tensor, op: &'static str) -> Result<&'a [f32]> {
    x.storage::<CpuTensorData>()
        .map(|d| d.0.as_slice())
        .ok_or(KernelError::WrongBackend {
            op,
            expected: BACKEND,
        })
}

fn weight_data<'a>(w: &'a Weight, op: &'static str) -> Result<&'a CpuWeightData> {
    w.storage::<CpuWeightData>()
        .ok_or(KernelError::WrongBackend {
            op,
            expected: BACKEND,
        })
}

fn shape_error(op: &'static str, detail: String) -> KernelError {
    KernelError::Shape { op, detail }
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor, names: (&str, &str)) -> Result<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(shape_error(
            op,
            format!(
                "{} has shape {:?} but {} has shape {:?}; they must be equal",
                names.0,
                a.shape(),
                names.1,
                b.shape()
            ),
        ))
    }
}

/// Checks that a weight is a vector of `len` elements (a bias or a norm weight).
fn check_vector(op: &'static str, name: &str, w: &Weight, len: usize) -> Result<()> {
    if w.shape() == [len] {
        Ok(())
    } else {
        Err(shape_error(
            op,
            format!("{name} has shape {:?}, expected [{len}]", w.shape()),
        ))
    }
}

fn decode_le(dtype: DType, bytes: &[u8]) -> CpuWeightData {
    match dtype {
        DType::F32 => CpuWeightData::F32(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        DType::BF16 => CpuWeightData::Bf16(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
        ),
        DType::F16 => CpuWeightData::F16(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
        ),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        let plural = if self.threads == 1 { "" } else { "s" };
        format!("cpu ({} thread{plural})", self.threads)
    }

    fn upload(&self, values: &[f32], shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(shape_error(
                "upload",
                format!(
                    "shape {shape:?} holds {numel} values but {} were given",
                    values.len()
                ),
            ));
        }
        Ok(tensor(shape.to_vec(), values.to_vec()))
    }

    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Weight> {
        let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if bytes.len() != expected {
            return Err(KernelError::ByteLength {
                op: "upload_weight",
                shape: shape.to_vec(),
                expected,
                found: bytes.len(),
            });
        }
        let storage = self.run(|| decode_le(dtype, bytes));
        Ok(Weight::new(shape.to_vec(), dtype, Arc::new(storage)))
    }

    fn read(&self, x: &Tensor) -> Result<Vec<f32>> {
        Ok(data(x, "read")?.to_vec())
    }

    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Tensor> {
        let op = "embedding";
        let values = weight_data(table, op)?;
        let &[vocab, d_model] = table.shape() else {
            return Err(shape_error(
                op,
                format!(
                    "table has shape {:?}, expected [vocab, d_model]",
                    table.shape()
                ),
            ));
        };
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(KernelError::OutOfRange {
                op,
                what: "token id",
                value: id as usize,
                limit: vocab,
            });
        }

        let mut out = vec![0.0; ids.len() * d_model];
        for (row, &id) in out.chunks_exact_mut(d_model.max(1)).zip(ids) {
            let start = id as usize * d_model;
            values.to_f32_into(start..start + d_model, row);
        }
        Ok(tensor(vec![ids.len(), d_model], out))
    }

    fn matmul(&self, x: &Tensor, w: &Weight, bias: Option<&Weight>) -> Result<Tensor> {
        let op = "matmul";
        let x_values = data(x, op)?;
        let w_values = weight_data(w, op)?;
        let &[n, k] = w.shape() else {
            return Err(shape_error(
                op,
                format!(
                    "weight has shape {:?}, expected [out_features, in_features]",
                    w.shape()
                ),
            ));
        };
        if x.shape().is_empty() || x.last_dim() != k {
            return Err(shape_error(
                op,
                format!(
                    "input has shape {:?} but the weight {:?} expects a last dimension of {k}",
                    x.shape(),
                    w.shape()
                ),
            ));
        }
        let bias_values = match bias {
            Some(b) => {
                check_vector(op, "bias", b, n)?;
                Some(weight_data(b, op)?.to_f32())
            }
            None => None,
        };

        let m = x.numel() / k.max(1);
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("checked non-empty") = n;
        let out = self.run(|| {
            matmul::matmul(
                x_values,
                m,
                k,
                w_values,
                n,
                bias_values.as_deref(),
                self.threads,
            )
        });
        Ok(tensor(out_shape, out))
    }

    fn rms_norm(&self, x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let values = data(x, "rms_norm")?;
        if x.shape().is_empty() || x.last_dim() == 0 {
            return Err(shape_error(
                "rms_norm",
                format!(
                    "input has shape {:?}; it needs a non-empty last dimension",
                    x.shape()
                ),
            ));
        }
        let (normalized, scale) = self.run(|| elementwise::rms_norm(values, x.last_dim(), eps));
        let mut scale_shape = x.shape().to_vec();
        *scale_shape.last_mut().expect("checked non-empty") = 1;
        Ok((
            tensor(x.shape().to_vec(), normalized),
            tensor(scale_shape, scale),
        ))
    }

    fn mul_weight(&self, x: &Tensor, w: &Weight) -> Result<Tensor> {
        let op = "mul_weight";
        let values = data(x, op)?;
        check_vector(op, "weight", w, x.last_dim())?;
        let weight = weight_data(w, op)?.to_f32();
        let out = self.run(|| elementwise::mul_rows(values, &weight));
        Ok(tensor(x.shape().to_vec(), out))
    }

    fn rope(&self, x: &Tensor, positions: &[u32], theta: f32) -> Result<Tensor> {
        let op = "rope";
        let values = data(x, op)?;
        let &[rows, n_heads, d_head] = x.shape() else {
            return Err(shape_error(
                op,
                format!(
                    "input has shape {:?}, expected [rows, n_heads, d_head]",
                    x.shape()
                ),
            ));
        };
        if d_head % 2 != 0 {
            return Err(shape_error(op, format!("d_head {d_head} must be even")));
        }
        if positions.len() != rows {
            return Err(shape_error(
                op,
                format!("{} positions given for {rows} rows", positions.len()),
            ));
        }
        let out = self.run(|| elementwise::rope(values, positions, n_heads, d_head, theta));
        Ok(tensor(x.shape().to_vec(), out))
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttentionParams,
        overrides: &[PatternOverride],
    ) -> Result<AttentionOutput> {
        let op = "attention";
        let (q_values, k_values, v_values) = (data(q, op)?, data(k, op)?, data(v, op)?);
        params.validate(q, k, v, overrides)?;
        let override_values = overrides
            .iter()
            .map(|o| Ok((o.head, data(&o.pattern, op)?)))
            .collect::<Result<Vec<_>>>()?;

        let out = self
            .run(|| attention::attention(q_values, k_values, v_values, params, &override_values));
        let p = params;
        let pattern_shape = vec![p.batch, p.n_heads, p.q_len, p.kv_len];
        Ok(AttentionOutput {
            z: tensor(vec![p.batch * p.q_len, p.n_heads, p.d_head], out.z),
            scores: out.scores.map(|s| tensor(pattern_shape.clone(), s)),
            pattern: out.pattern.map(|s| tensor(pattern_shape, s)),
        })
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let op = "silu_mul";
        let (g, u) = (data(gate, op)?, data(up, op)?);
        same_shape(op, gate, up, ("gate", "up"))?;
        let out = self.run(|| elementwise::zip_map(g, u, |g, u| g / (1.0 + (-g).exp()) * u));
        Ok(tensor(gate.shape().to_vec(), out))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let op = "add";
        let (a_values, b_values) = (data(a, op)?, data(b, op)?);
        same_shape(op, a, b, ("a", "b"))?;
        let out = self.run(|| elementwise::zip_map(a_values, b_values, |a, b| a + b));
        Ok(tensor(a.shape().to_vec(), out))
    }

    fn select(&self, mask: &Tensor, x: &Tensor, replacement: &Tensor) -> Result<Tensor> {
        let op = "select";
        let (m, x_values, r) = (data(mask, op)?, data(x, op)?, data(replacement, op)?);
        same_shape(op, mask, x, ("mask", "x"))?;
        same_shape(op, x, replacement, ("x", "replacement"))?;
        let out = m
            .iter()
            .zip(x_values.iter().zip(r))
            .map(|(&m, (&x, &r))| if m != 0.0 { r } else { x })
            .collect();
        Ok(tensor(x.shape().to_vec(), out))
    }

    fn concat_seq(&self, cache: &Tensor, new: &Tensor, batch: usize) -> Result<Tensor> {
        let op = "concat_seq";
        let (c, n) = (data(cache, op)?, data(new, op)?);
        let (cs, ns) = (cache.shape(), new.shape());
        if cs.is_empty() || ns.is_empty() || cs[1..] != ns[1..] {
            return Err(shape_error(
                op,
                format!("cache {cs:?} and new {ns:?} must agree in all but the first dimension"),
            ));
        }
        if batch == 0 || cs[0] % batch != 0 || ns[0] % batch != 0 {
            return Err(shape_error(
                op,
                format!(
                    "batch {batch} must be positive and divide the row counts of cache {cs:?} and new {ns:?}"
                ),
            ));
        }

        let row: usize = cs[1..].iter().product();
        let (cached_rows, new_rows) = (cs[0] / batch, ns[0] / batch);
        let mut out = Vec::with_capacity(c.len() + n.len());
        for b in 0..batch {
            out.extend_from_slice(&c[b * cached_rows * row..(b + 1) * cached_rows * row]);
            out.extend_from_slice(&n[b * new_rows * row..(b + 1) * new_rows * row]);
        }
        let mut shape = cs.to_vec();
        shape[0] = cs[0] + ns[0];
        Ok(tensor(shape, out))
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let op = "gather_rows";
        let values = data(x, op)?;
        let width = x.last_dim();
        if let Some(&row) = rows.iter().find(|&&r| r >= x.rows()) {
            return Err(KernelError::OutOfRange {
                op,
                what: "row",
                value: row,
                limit: x.rows(),
            });
        }
        let mut out = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            out.extend_from_slice(&values[r * width..(r + 1) * width]);
        }
        Ok(tensor(vec![rows.len(), width], out))
    }

    fn logsumexp(&self, x: &Tensor) -> Result<Tensor> {
        let values = data(x, "logsumexp")?;
        if x.shape().is_empty() || x.last_dim() == 0 {
            return Err(shape_error(
                "logsumexp",
                format!(
                    "input has shape {:?}; it needs a non-empty last dimension",
                    x.shape()
                ),
            ));
        }
        let out = self.run(|| elementwise::logsumexp(values, x.last_dim()));
        Ok(tensor(vec![x.rows()], out))
    }

    fn gather_cols(&self, x: &Tensor, cols: &[u32]) -> Result<Tensor> {
        let op = "gather_cols";
        let values = data(x, op)?;
        let width = x.last_dim();
        if cols.len() != x.rows() {
            return Err(shape_error(
                op,
                format!(
                    "{} columns given for {} rows of {:?}",
                    cols.len(),
                    x.rows(),
                    x.shape()
                ),
            ));
        }
        if let Some(&col) = cols.iter().find(|&&c| c as usize >= width) {
            return Err(KernelError::OutOfRange {
                op,
                what: "column",
                value: col as usize,
                limit: width,
            });
        }
        let out = cols
            .iter()
            .enumerate()
            .map(|(r, &c)| values[r * width + c as usize])
            .collect();
        Ok(tensor(vec![x.rows()], out))
    }
}
