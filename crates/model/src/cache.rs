//! Activations on the host: [`HostTensor`] and the [`ActivationCache`] of a run.

use std::io::Write;
use std::path::Path;

use crate::error::{ModelError, Result};
use crate::hooks::HookPoint;

/// Element count of `shape`, an error when it overflows `usize`.
fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "a host tensor of shape {shape:?} has more elements than memory can address"
            ))
        })
}

/// An `f32` activation on the host, row-major, in TransformerLens shape (batch first).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Wraps `data`; an element count that does not match `shape` is an error.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<HostTensor> {
        let expected = checked_numel(&shape)?;
        if expected != data.len() {
            return Err(ModelError::InvalidArgument(format!(
                "a host tensor of shape {shape:?} needs {expected} values, found {}",
                data.len()
            )));
        }
        Ok(HostTensor { shape, data })
    }

    /// Returns a tensor of zeros.
    ///
    /// A shape whose element count overflows `usize` is an error.
    pub fn zeros(shape: Vec<usize>) -> Result<HostTensor> {
        let numel = checked_numel(&shape)?;
        Ok(HostTensor {
            shape,
            data: vec![0.0; numel],
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Returns the value at a multi-dimensional index, `None` when out of range.
    pub fn get(&self, index: &[usize]) -> Option<f32> {
        if index.len() != self.shape.len() {
            return None;
        }
        let mut offset = 0;
        for (i, dim) in index.iter().zip(&self.shape) {
            if i >= dim {
                return None;
            }
            offset = offset * dim + i;
        }
        self.data.get(offset).copied()
    }

    /// Returns the values with the first index fixed to `i` (one batch item, one row), `None` when
    /// out of range.
    pub fn slice_first(&self, i: usize) -> Option<&[f32]> {
        let first = *self.shape.first()?;
        if i >= first {
            return None;
        }
        let inner = self.numel() / first.max(1);
        Some(&self.data[i * inner..(i + 1) * inner])
    }
}

/// Activations recorded by a run, keyed by hook point, in forward order.
#[derive(Clone, Debug, Default)]
pub struct ActivationCache {
    entries: Vec<(HookPoint, HostTensor)>,
}

impl ActivationCache {
    /// Returns an empty cache.
    pub fn new() -> ActivationCache {
        ActivationCache::default()
    }

    /// Stores an activation, replacing an earlier one of the same hook point.
    pub fn insert(&mut self, point: HookPoint, tensor: HostTensor) {
        match self.entries.iter_mut().find(|(p, _)| *p == point) {
            Some(entry) => entry.1 = tensor,
            None => self.entries.push((point, tensor)),
        }
    }

    /// Returns the activation recorded under a TransformerLens name, if any.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        let point = name.parse::<HookPoint>().ok()?;
        self.get_point(point)
    }

    /// Returns the activation recorded for a hook point, if any.
    pub fn get_point(&self, point: HookPoint) -> Option<&HostTensor> {
        self.entries
            .iter()
            .find(|(p, _)| *p == point)
            .map(|(_, t)| t)
    }

    /// Returns the activation of a hook point, or an error listing what the cache holds.
    pub fn require(&self, point: HookPoint) -> Result<&HostTensor> {
        self.get_point(point).ok_or_else(|| ModelError::NotCached {
            name: point.to_string(),
            available: self.describe_contents(),
        })
    }

    /// Removes and returns the activation of a hook point.
    pub fn remove(&mut self, point: HookPoint) -> Option<HostTensor> {
        let index = self.entries.iter().position(|(p, _)| *p == point)?;
        Some(self.entries.remove(index).1)
    }

    /// TransformerLens names of the recorded hook points, in forward order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(p, _)| p.to_string()).collect()
    }

    /// Recorded hook points, in forward order.
    pub fn points(&self) -> Vec<HookPoint> {
        self.entries.iter().map(|(p, _)| *p).collect()
    }

    /// Iterates over (hook point, activation) in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (HookPoint, &HostTensor)> {
        self.entries.iter().map(|(p, t)| (*p, t))
    }

    /// Number of recorded hook points.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total size of the recorded activations in bytes (f32).
    pub fn size_in_bytes(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.numel() * 4).sum()
    }

    fn describe_contents(&self) -> String {
        if self.entries.is_empty() {
            return "nothing".to_string();
        }
        let names = self.names();
        let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if names.len() > 5 {
            format!("{} hooks: {shown}, ...", names.len())
        } else {
            shown
        }
    }

    /// Writes every activation to one safetensors file keyed by hook name (F32, TransformerLens
    /// shapes with the batch dimension, header metadata `{"format": "pt"}`), through a temporary
    /// file in the same folder renamed into place, so readers never see a partial file (see
    /// [`crate::write_atomic`] for the paths accepted).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".to_string(),
            serde_json::json!({ "format": "pt" }),
        );
        let mut offset = 0usize;
        for (point, tensor) in &self.entries {
            let end = offset + tensor.numel() * 4;
            header.insert(
                point.to_string(),
                serde_json::json!({ "dtype": "F32", "shape": tensor.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }

        // The header is padded with spaces to a multiple of 8 bytes, as the safetensors writer
        // does, so the data that follows is aligned.
        let mut header = serde_json::Value::Object(header).to_string().into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');

        crate::output::write_atomic(path, |file| {
            file.write_all(&(header.len() as u64).to_le_bytes())?;
            file.write_all(&header)?;
            let mut bytes = Vec::with_capacity(4 * 16384);
            for (_, tensor) in &self.entries {
                for chunk in tensor.data.chunks(16384) {
                    bytes.clear();
                    bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                    file.write_all(&bytes)?;
                }
            }
            Ok(())
        })?;
        tracing::info!(path = %path.display(), tensors = self.len(), bytes = self.size_in_bytes(), "wrote activation cache");
        Ok(())
    }
}
