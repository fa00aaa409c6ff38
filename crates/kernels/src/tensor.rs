use std::any::Any;
use std::sync::Arc;

use qwenlens_weights::DType;

/// An `f32` activation tensor living on one backend.
///
/// The storage is opaque here: each backend stores its own type and downcasts it with
/// [`Tensor::storage`]. Cloning is cheap (the storage is shared).
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<dyn Any + Send + Sync>,
}

impl Tensor {
    /// Wraps backend storage holding `shape.iter().product()` f32 values.
    pub fn new(shape: Vec<usize>, storage: Arc<dyn Any + Send + Sync>) -> Self {
        Self { shape, storage }
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows when the tensor is viewed as `[numel / last_dim, last_dim]`.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }

    /// The backend storage, if it is of type `T`.
    pub fn storage<T: Any>(&self) -> Option<&T> {
        self.storage.downcast_ref::<T>()
    }

    /// The same storage under another shape with the same number of elements.
    pub fn reshape(&self, shape: Vec<usize>) -> Option<Tensor> {
        (shape.iter().product::<usize>() == self.numel()).then(|| Tensor {
            shape,
            storage: self.storage.clone(),
        })
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// A weight matrix or vector on one backend, in its stored dtype.
#[derive(Clone)]
pub struct Weight {
    shape: Vec<usize>,
    dtype: DType,
    storage: Arc<dyn Any + Send + Sync>,
}

impl Weight {
    /// Wraps backend storage for a weight of the given shape and stored dtype.
    pub fn new(shape: Vec<usize>, dtype: DType, storage: Arc<dyn Any + Send + Sync>) -> Self {
        Self {
            shape,
            dtype,
            storage,
        }
    }

    /// Dimensions in the checkpoint's layout (`[out_features, in_features]` for matrices).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Stored element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The backend storage, if it is of type `T`.
    pub fn storage<T: Any>(&self) -> Option<&T> {
        self.storage.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weight")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}
