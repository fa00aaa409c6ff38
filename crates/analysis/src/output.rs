//! Output files written atomically: the data goes to a temporary file in the target folder, which
//! is then renamed over the target, so a reader never sees a half-written file.

use std::io::Write;
use std::path::Path;

use image::RgbImage;
use serde::Serialize;

use crate::error::{AnalysisError, Result};

/// Checks that the folder `dir` can hold output files: it is a folder already, or it can be
/// created because every part of its path that exists is a folder. Run before the work, so a wrong
/// `--out` fails at once rather than after the forward passes.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    for ancestor in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        match std::fs::metadata(ancestor) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) if ancestor == dir => {
                return Err(AnalysisError::InvalidArgument(format!(
                    "--out {} is a file, but it must name a folder (created if missing); choose another path",
                    dir.display()
                )));
            }
            Ok(_) => {
                return Err(AnalysisError::InvalidArgument(format!(
                    "cannot create the output folder {}: {} is a file, not a folder; choose another --out",
                    dir.display(),
                    ancestor.display()
                )));
            }
            Err(_) => continue,
        }
    }
    Ok(())
}

/// Checks every path of a command's output files before any is written, so a path that cannot be
/// written (its folder is a file, or a folder stands where the file goes) fails the command
/// without leaving some of the other files behind.
pub fn check_output_paths<P: AsRef<Path>>(paths: &[P]) -> Result<()> {
    for path in paths {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            check_output_dir(dir)?;
        }
        if let Ok(meta) = std::fs::metadata(path)
            && !meta.is_file()
        {
            return Err(AnalysisError::InvalidArgument(format!(
                "cannot write {}: a folder or other non-file is in the way; remove it or choose another --out",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same folder renamed into place,
/// creating the folder first. The model crate's [`qwenlens_model::write_atomic`] does the write, so
/// a symbolic link's target is written and a folder, FIFO or device in the way is rejected.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|error| AnalysisError::Io {
            action: "create the folder of",
            path: path.to_path_buf(),
            error,
        })?;
    }

    qwenlens_model::write_atomic(path, |writer| writer.write_all(bytes))?;
    tracing::debug!(path = %path.display(), bytes = bytes.len(), "wrote file");
    Ok(())
}

/// Writes `value` as pretty-printed JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|source| AnalysisError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Writes a CSV table: the header line, then one line per row. Fields are numbers or plain words,
/// so no quoting is needed; a field containing a comma, quote or newline is quoted anyway.
pub fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut text = String::new();
    push_csv_line(&mut text, header.iter().copied());
    for row in rows {
        push_csv_line(&mut text, row.iter().map(String::as_str));
    }
    write_atomic(path, text.as_bytes())
}

fn push_csv_line<'a>(text: &mut String, fields: impl Iterator<Item = &'a str>) {
    for (i, field) in fields.enumerate() {
        if i > 0 {
            text.push(',');
        }
        if field.contains([',', '"', '\n', '\r']) {
            text.push('"');
            text.push_str(&field.replace('"', "\"\""));
            text.push('"');
        } else {
            text.push_str(field);
        }
    }
    text.push('\n');
}

/// Encodes an RGB image as PNG and writes it.
pub fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|source| AnalysisError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    write_atomic(path, &bytes)
}

/// Reads a PNG back as RGB, for checking written pictures.
pub fn read_png(path: &Path) -> Result<RgbImage> {
    let image = image::open(path).map_err(|source| AnalysisError::Image {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(image.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_special_fields() {
        let dir = std::env::temp_dir().join(format!("qwenlens-csv-{}", std::process::id()));
        let path = dir.join("table.csv");
        let rows = vec![
            vec!["1".to_string(), "a,b".to_string()],
            vec!["2".to_string(), "say \"hi\"".to_string()],
        ];

        write_csv(&path, &["id", "text"], &rows).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "id,text\n1,\"a,b\"\n2,\"say \"\"hi\"\"\"\n");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left behind: {leftovers:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_atomic_rejects_a_folder_in_the_way() {
        let dir = std::env::temp_dir().join(format!("qwenlens-folder-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("out.png")).unwrap();

        let error = write_atomic(&dir.join("out.png"), b"png")
            .unwrap_err()
            .to_string();

        assert!(error.contains("not a regular file"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_checks_name_the_file_in_the_way() {
        let dir = std::env::temp_dir().join(format!("qwenlens-check-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("out/dla.png")).unwrap();
        std::fs::write(dir.join("afile"), b"x").unwrap();

        let error = check_output_dir(&dir.join("afile"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("must name a folder"), "{error}");
        let error = check_output_dir(&dir.join("afile/sub"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("afile is a file"), "{error}");
        check_output_dir(&dir.join("new/sub")).unwrap();

        let out = dir.join("out");
        let paths = [out.join("logit_lens.json"), out.join("dla.png")];
        let error = check_output_paths(&paths).unwrap_err().to_string();
        assert!(error.contains("dla.png"), "{error}");
        assert!(!out.join("logit_lens.json").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_atomic_replaces_existing_file() {
        let dir = std::env::temp_dir().join(format!("qwenlens-atomic-{}", std::process::id()));
        let path = dir.join("out.json");

        write_atomic(&path, b"old").unwrap();
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();

        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(value["a"], 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod png_tests {
    use super::*;
    use crate::render::{ColorScale, Heatmap};
    use crate::tokens::position_labels;

    #[test]
    fn png_decodes_back_to_the_rendered_image() {
        let dir = std::env::temp_dir().join(format!("qwenlens-png-{}", std::process::id()));
        let path = dir.join("pattern.png");
        let words: Vec<String> = ["The", " quick", " brown", " fox", "\n", " jumps"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let n = words.len();
        let values: Vec<f32> = (0..n * n)
            .map(|k| {
                if k % n <= k / n {
                    1.0 / (k / n + 1) as f32
                } else {
                    f32::NAN
                }
            })
            .collect();
        let labels = position_labels(&words, 12);
        let image = Heatmap::new(
            "L0H3",
            n,
            n,
            values,
            ColorScale::Sequential { min: 0.0, max: 1.0 },
        )
        .with_axes("query", labels.clone(), "key", labels)
        .render();

        write_png(&path, &image).unwrap();

        let decoded = read_png(&path).unwrap();
        assert_eq!(decoded.dimensions(), image.dimensions());
        assert_eq!(decoded.as_raw(), image.as_raw());
        if let Some(keep) = std::env::var_os("QWENLENS_KEEP_PNG") {
            std::fs::copy(&path, keep).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
