//! Activations on the host: [`HostTensor`] and the [`ActivationCache`] of a run.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::hooks::HookPoint;

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
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(ModelError::InvalidArgument(format!(
                "a host tensor of shape {shape:?} needs {expected} values, found {}",
                data.len()
            )));
        }
        Ok(HostTensor { shape, data })
    }

    /// Returns a tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> HostTensor {
        let numel = shape.iter().product();
        HostTensor {
            shape,
            data: vec![0.0; numel],
        }
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
    /// file in the same folder renamed into place, so readers never see a partial file.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let views: Vec<(String, F32View<'_>)> = self
            .entries
            .iter()
            .map(|(point, tensor)| (point.to_string(), F32View(tensor)))
            .collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);

        let temporary = temporary_path(path);
        let written = safetensors::serialize_to_file(views, Some(metadata), &temporary);
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                message: error.to_string(),
            });
        }

        sync_file(&temporary)?;
        std::fs::rename(&temporary, path).map_err(|source| {
            let _ = std::fs::remove_file(&temporary);
            ModelError::Io {
                action: "renaming the temporary file into",
                path: path.to_path_buf(),
                source,
            }
        })?;
        tracing::info!(path = %path.display(), tensors = self.len(), bytes = self.size_in_bytes(), "wrote activation cache");
        Ok(())
    }
}

/// `NAME.tmp-PID` beside `path`, so the final rename stays on one file system.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_file(path: &Path) -> Result<()> {
    let io_error = |source| ModelError::Io {
        action: "flushing",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_error)?;
    file.flush().map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

/// A [`HostTensor`] seen as a safetensors F32 tensor.
struct F32View<'a>(&'a HostTensor);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.0.numel() * 4
    }
}
