//! Memory-mapped safetensors files with a defensive header parser.
//!
//! The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
//! `{dtype, shape, data_offsets}`, then the raw little-endian data. Every length and offset is
//! checked against the file size before anything is allocated or sliced, so a truncated or hostile
//! file gives an error, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Result, WeightsError};

/// Largest header accepted. Real headers are a few hundred bytes per tensor (about 60 KB for
/// Qwen2.5-0.5B's 290 tensors), so anything bigger is a corrupt length, not a real header.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor entry of a safetensors header.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Where one tensor lives inside a [`SafetensorsFile`].
#[derive(Clone, Debug)]
pub(crate) struct TensorEntry {
    /// The dtype string from the header (`BF16`, `F32`, `I64`, ...).
    pub dtype_name: String,
    /// The dtype, when it is one the kernels read.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    /// Byte range inside the memory map (header already skipped).
    pub start: usize,
    pub end: usize,
}

/// A memory-mapped safetensors file and its parsed header.
pub(crate) struct SafetensorsFile {
    pub path: PathBuf,
    pub size: u64,
    pub mmap: Mmap,
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|error| WeightsError::io(path, error))?;
        let size = file
            .metadata()
            .map_err(|error| WeightsError::io(path, error))?
            .len();

        // SAFETY: the map is read-only and lives as long as this struct. Like every memory-mapped
        // reader, this relies on nobody truncating or rewriting the checkpoint while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|error| WeightsError::io(path, error))?;

        let tensors = parse_header(&mmap, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            size,
            mmap,
            tensors,
        })
    }
}

/// Parses and checks the header of a whole safetensors file held in `bytes`.
fn parse_header(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, TensorEntry>> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(WeightsError::safetensors(
            path,
            format!(
                "file is {file_len} bytes, too short for the 8-byte header length (truncated file?)"
            ),
        ));
    }

    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("slice of 8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(WeightsError::safetensors(
            path,
            format!(
                "header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit; the \
                 file is corrupt or not a safetensors file"
            ),
        ));
    }
    if 8 + header_len > file_len {
        return Err(WeightsError::safetensors(
            path,
            format!(
                "header claims {header_len} bytes but the file has only {} after the length field \
                 (truncated file?)",
                file_len - 8
            ),
        ));
    }

    let header_end = 8 + header_len as usize;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|error| {
            WeightsError::safetensors(path, format!("header is not a JSON object: {error}"))
        })?;

    let data_len = file_len - header_end as u64;
    let mut tensors = BTreeMap::new();
    let mut ranges = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }

        let raw: RawEntry = serde_json::from_value(value).map_err(|error| {
            WeightsError::safetensors(
                path,
                format!("header entry for tensor {name} is invalid: {error}"),
            )
        })?;
        let [start, end] = raw.data_offsets;
        if start > end || end > data_len {
            return Err(WeightsError::safetensors(
                path,
                format!(
                    "tensor {name} has data_offsets [{start}, {end}] outside the {data_len} data \
                     bytes (truncated file?)"
                ),
            ));
        }

        let dtype = parse_dtype(&raw.dtype);
        if let Some(element_size) = element_size(&raw.dtype) {
            let expected_bytes = raw
                .shape
                .iter()
                .try_fold(element_size as u64, |acc, &dim| acc.checked_mul(dim as u64));
            if expected_bytes != Some(end - start) {
                return Err(WeightsError::safetensors(
                    path,
                    format!(
                        "tensor {name} of dtype {} and shape {:?} should occupy {} bytes but its \
                         data_offsets [{start}, {end}] span {}",
                        raw.dtype,
                        raw.shape,
                        expected_bytes.map_or("more than 2^64".to_string(), |n| n.to_string()),
                        end - start
                    ),
                ));
            }
        }

        ranges.push((start, end, name.clone()));
        tensors.insert(
            name,
            TensorEntry {
                dtype_name: raw.dtype,
                dtype,
                shape: raw.shape,
                start: header_end + start as usize,
                end: header_end + end as usize,
            },
        );
    }

    ranges.sort();
    for pair in ranges.windows(2) {
        let (_, previous_end, previous) = &pair[0];
        let (start, _, name) = &pair[1];
        if start < previous_end {
            return Err(WeightsError::safetensors(
                path,
                format!("the data of tensors {previous} and {name} overlap"),
            ));
        }
    }

    Ok(tensors)
}

fn parse_dtype(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

/// Element size of every dtype safetensors defines, so even unsupported tensors are bounds-checked.
fn element_size(name: &str) -> Option<usize> {
    match name {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => Some(1),
        "U16" | "I16" | "F16" | "BF16" => Some(2),
        "U32" | "I32" | "F32" => Some(4),
        "U64" | "I64" | "F64" => Some(8),
        _ => None,
    }
}

/// A tensor borrowed from a memory-mapped checkpoint, in its stored dtype.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: &'a str,
    /// Stored element type.
    pub dtype: DType,
    /// Shape, row-major, in the Hugging Face layout (`[out_features, in_features]` for weights).
    pub shape: &'a [usize],
    /// Raw little-endian elements, `numel() * dtype.size_in_bytes()` bytes, with no alignment
    /// guarantee.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Copies the elements into a new `Vec<f32>`, widening bf16 and f16 exactly.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let size = self.dtype.size_in_bytes();
        let chunks = self.data.chunks_exact(size);
        match self.dtype {
            DType::F32 => chunks
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => chunks
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => chunks
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    #[test]
    fn header_valid_parses() {
        let bytes = file_with_header(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}"#,
            12,
        );
        let tensors = parse_header(&bytes, Path::new("x.safetensors")).unwrap();
        assert_eq!(tensors["a"].shape, vec![2, 3]);
        assert_eq!(tensors["a"].dtype, Some(DType::BF16));
        assert_eq!(tensors["a"].end - tensors["a"].start, 12);
    }

    #[test]
    fn header_offsets_inconsistent_with_shape() {
        let bytes = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}}"#,
            12,
        );
        let error = parse_header(&bytes, Path::new("x.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("should occupy 24 bytes"), "{error}");
    }

    #[test]
    fn header_shape_overflow_rejected() {
        let bytes = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#,
            4,
        );
        let error = parse_header(&bytes, Path::new("x.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than 2^64"), "{error}");
    }

    #[test]
    fn header_overlapping_tensors_rejected() {
        let bytes = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        let error = parse_header(&bytes, Path::new("x.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("overlap"), "{error}");
    }

    #[test]
    fn bf16_and_f16_widen_exactly() {
        let bf16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let view = TensorView {
            name: "t",
            dtype: DType::BF16,
            shape: &[2],
            data: &bf16,
        };
        assert_eq!(view.to_f32_vec(), vec![1.5, -2.0]);

        let f16: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let view = TensorView {
            name: "t",
            dtype: DType::F16,
            shape: &[2],
            data: &f16,
        };
        assert_eq!(view.to_f32_vec(), vec![0.25, 3.0]);
    }
}
