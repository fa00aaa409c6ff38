//! Replacement attention patterns read from `.npy` or `.safetensors` files.
//!
//! The file contains one `[k, k]` array (f32, or f64 converted to f32) whose row `i` is the pattern of
//! query position `i`. `k` must cover the longest sequence the pattern will see (prompt plus
//! generated tokens). For a sequence of length `n` the model uses the top-left `[n, n]` block, and the
//! rows are used as given, not renormalized, so a row that does not sum to 1 scales that head's `z`.

use std::path::Path;

use qwenlens_model::HostTensor;

use crate::error::{AnalysisError, Result};

/// Name of the tensor read from a safetensors file that contains more than one.
pub const SAFETENSORS_PATTERN_NAME: &str = "pattern";

/// Reads a `[k, k]` pattern array from a `.npy` or `.safetensors` file and checks that
/// `k ≥ min_len` and that every weight is finite.
pub fn load_pattern_file(path: &Path, min_len: usize) -> Result<HostTensor> {
    let invalid = |reason: String| AnalysisError::InvalidPattern {
        source_name: path.display().to_string(),
        reason,
    };

    let bytes = std::fs::read(path).map_err(|error| AnalysisError::Io {
        action: "read the pattern file",
        path: path.to_path_buf(),
        error,
    })?;

    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (shape, data) = match extension.as_str() {
        "npy" => read_npy(&bytes).map_err(invalid)?,
        "safetensors" => read_safetensors(&bytes).map_err(invalid)?,
        _ => {
            return Err(invalid(format!(
                "unknown file type `.{extension}`; give a .npy or .safetensors file with one [k, k] float32 array"
            )));
        }
    };

    let [rows, cols] = shape[..] else {
        return Err(invalid(format!(
            "expected a 2-D [k, k] array, found shape {shape:?}"
        )));
    };
    if rows != cols {
        return Err(invalid(format!(
            "expected a square [k, k] array, found [{rows}, {cols}]"
        )));
    }
    if rows < min_len {
        return Err(invalid(format!(
            "the array is [{rows}, {rows}] but the sequence reaches {min_len} tokens; give at least a [{min_len}, {min_len}] array"
        )));
    }
    if let Some(index) = data.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!(
            "weight [{}, {}] is {}; every weight must be finite",
            index / cols,
            index % cols,
            data[index]
        )));
    }

    HostTensor::new(vec![rows, cols], data).map_err(|error| invalid(error.to_string()))
}

fn read_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("not a valid .npy file: {e}"))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let dtype = npy.dtype().descr();

    let data: Vec<f32> = match npy.try_data::<f32>() {
        Ok(reader) => reader
            .collect::<std::io::Result<Vec<f32>>>()
            .map_err(|e| format!("failed to read the float32 data: {e}"))?,
        Err(npy) => match npy.try_data::<f64>() {
            Ok(reader) => reader
                .map(|v| v.map(|v| v as f32))
                .collect::<std::io::Result<Vec<f32>>>()
                .map_err(|e| format!("failed to read the float64 data: {e}"))?,
            Err(_) => {
                return Err(format!(
                    "unsupported dtype {dtype}; save the array as float32 (numpy '<f4')"
                ));
            }
        },
    };

    // A Fortran-order 2-D array stores columns first; transposing gives the row-major layout.
    let data = match (fortran, &shape[..]) {
        (true, &[rows, cols]) => (0..rows * cols)
            .map(|k| data[(k % cols) * rows + k / cols])
            .collect(),
        _ => data,
    };
    Ok((shape, data))
}

fn read_safetensors(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let names = tensors.names();

    let name = match names.as_slice() {
        [only] => only.to_string(),
        _ if names.contains(&SAFETENSORS_PATTERN_NAME) => SAFETENSORS_PATTERN_NAME.to_string(),
        _ => {
            return Err(format!(
                "the file holds {} tensors ({}); keep one, or name the pattern `{SAFETENSORS_PATTERN_NAME}`",
                names.len(),
                names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    };

    let view = tensors
        .tensor(&name)
        .map_err(|e| format!("failed to read tensor `{name}`: {e}"))?;
    let data = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::F64 => view
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8 bytes")) as f32)
            .collect(),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other:?}; save it as F32"
            ));
        }
    };
    Ok((view.shape().to_vec(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("qwenlens-pattern-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn write_npy(path: &Path, shape: &[u64], data: &[f32]) {
        write_npy_ordered(path, shape, data, npyz::Order::C);
    }

    fn write_npy_ordered(path: &Path, shape: &[u64], data: &[f32], order: npyz::Order) {
        use npyz::WriterBuilder;

        let mut bytes = Vec::new();
        {
            let mut writer = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .order(order)
                .shape(shape)
                .writer(&mut bytes)
                .begin_nd()
                .unwrap();
            writer.extend(data.iter().copied()).unwrap();
            writer.finish().unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn npy_pattern_round_trips() {
        let path = temp_path("previous.npy");
        let data: Vec<f32> = (0..16).map(|k| k as f32 / 16.0).collect();
        write_npy(&path, &[4, 4], &data);

        let pattern = load_pattern_file(&path, 3).unwrap();

        assert_eq!(pattern.shape, vec![4, 4]);
        assert_eq!(pattern.data, data);
    }

    #[test]
    fn fortran_order_npy_is_transposed() {
        let path = temp_path("fortran.npy");
        // Column-major storage of [[1, 2], [3, 4]].
        write_npy_ordered(&path, &[2, 2], &[1.0, 3.0, 2.0, 4.0], npyz::Order::Fortran);

        let pattern = load_pattern_file(&path, 2).unwrap();

        assert_eq!(pattern.data, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn safetensors_pattern_round_trips() {
        let path = temp_path("uniform.safetensors");
        let data: Vec<f32> = vec![1.0, 0.0, 0.5, 0.5];
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &bytes)
                .unwrap();
        safetensors::serialize_to_file([("p", view)], None, &path).unwrap();

        let pattern = load_pattern_file(&path, 2).unwrap();

        assert_eq!(pattern.data, data);
    }

    #[test]
    fn too_small_pattern_names_the_needed_size() {
        let path = temp_path("small.npy");
        write_npy(&path, &[2, 2], &[1.0, 0.0, 0.0, 1.0]);

        let error = load_pattern_file(&path, 5).unwrap_err().to_string();

        assert!(error.contains("[5, 5]"), "{error}");
    }

    #[test]
    fn non_square_and_non_finite_are_rejected() {
        let path = temp_path("wide.npy");
        write_npy(&path, &[2, 3], &[0.0; 6]);
        let nan = temp_path("nan.npy");
        write_npy(&nan, &[2, 2], &[1.0, f32::NAN, 0.0, 1.0]);

        assert!(
            load_pattern_file(&path, 2)
                .unwrap_err()
                .to_string()
                .contains("square")
        );
        assert!(
            load_pattern_file(&nan, 2)
                .unwrap_err()
                .to_string()
                .contains("finite")
        );
    }

    #[test]
    fn unknown_extension_is_rejected() {
        let path = temp_path("pattern.txt");
        std::fs::write(&path, "1 0\n0 1\n").unwrap();

        let error = load_pattern_file(&path, 2).unwrap_err().to_string();

        assert!(error.contains(".npy or .safetensors"), "{error}");
    }
}
