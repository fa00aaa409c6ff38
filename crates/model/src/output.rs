//! Output files written atomically: the data goes to a temporary file in the target's folder, which
//! is then renamed over the target, so a reader never sees a half-written file.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Returns the file that writing `path` replaces, or an error when `path` is not a place for an
/// output file.
///
/// A missing path or a regular file is returned as is. A symbolic link is resolved and its target
/// is written (the link stays a link), so the target must be a regular file too. A folder, FIFO,
/// socket or device is rejected, because renaming a new file over it would replace it instead of
/// writing to it.
pub fn output_target(path: &Path) -> Result<PathBuf> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(path.to_path_buf());
        }
        Err(source) => {
            return Err(ModelError::Io {
                action: "reading the metadata of",
                path: path.to_path_buf(),
                source,
            });
        }
    };

    if metadata.file_type().is_symlink() {
        let target = std::fs::canonicalize(path).map_err(|source| ModelError::Io {
            action: "resolving the symbolic link",
            path: path.to_path_buf(),
            source,
        })?;
        let kind = file_kind(
            &std::fs::metadata(&target).map_err(|source| ModelError::Io {
                action: "reading the metadata of",
                path: target.clone(),
                source,
            })?,
        );
        if kind != "regular file" {
            return Err(ModelError::InvalidArgument(format!(
                "output path {} is a symbolic link to {}, which is a {kind}, not a regular file; \
                 choose another output path",
                path.display(),
                target.display()
            )));
        }
        return Ok(target);
    }

    let kind = file_kind(&metadata);
    if kind != "regular file" {
        return Err(ModelError::InvalidArgument(format!(
            "output path {} is a {kind}, not a regular file; choose another output path",
            path.display()
        )));
    }
    Ok(path.to_path_buf())
}

/// Writes a file through a temporary file beside the target that `write` fills, then renames it
/// over the target (see [`output_target`] for the paths accepted). The new file gets the
/// permissions of a plain create (0666 less the umask). Errors name `path`, never the temporary
/// file; on error the temporary file is removed and the target is unchanged.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let target = output_target(path)?;
    let temporary = temporary_path(&target);
    let io_error = |action: &'static str| {
        move |source| ModelError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };

    // `create_new` with the default mode: the umask applies, as for `File::create`.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .map_err(io_error("creating a temporary file to write"))?;

    let written = (|| {
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|error| error.into_error())?;
        file.sync_all()
    })();
    if let Err(source) = written {
        // The partial temporary file is garbage; failing to remove it changes nothing for the user.
        let _ = std::fs::remove_file(&temporary);
        return Err(io_error("writing")(source));
    }

    if let Err(source) = std::fs::rename(&temporary, &target) {
        let _ = std::fs::remove_file(&temporary);
        return Err(io_error("renaming the temporary file into")(source));
    }
    Ok(())
}

/// `.NAME.tmp-PID` beside `path`, so the final rename stays on one file system.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn file_kind(metadata: &std::fs::Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return "regular file";
    }
    if file_type.is_dir() {
        return "folder";
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "FIFO";
        }
        if file_type.is_socket() {
            return "socket";
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return "device";
        }
    }
    "special file"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("qwenlens-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_text(path: &Path, text: &str) -> Result<()> {
        write_atomic(path, |file| file.write_all(text.as_bytes()))
    }

    #[test]
    fn writes_new_and_replaces_regular_file() {
        let dir = scratch("regular");
        let path = dir.join("out.txt");

        write_text(&path, "one").unwrap();
        write_text(&path, "two").unwrap();

        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "the temporary file must be gone");
    }

    #[cfg(unix)]
    #[test]
    fn new_file_gets_default_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let path = dir.join("out.txt");
        let probe = dir.join("probe.txt");

        write_text(&path, "x").unwrap();
        File::create(&probe).unwrap();

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&probe));
    }

    #[test]
    fn folder_is_rejected() {
        let dir = scratch("folder");

        let error = write_text(&dir, "x").unwrap_err().to_string();

        assert!(error.contains("is a folder, not a regular file"), "{error}");
    }

    #[cfg(unix)]
    #[test]
    fn fifo_and_device_are_rejected_and_left_alone() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());

        let error = write_text(&fifo, "x").unwrap_err().to_string();
        let device_error = write_text(Path::new("/dev/null"), "x")
            .unwrap_err()
            .to_string();

        assert!(error.contains("is a FIFO"), "{error}");
        assert!(device_error.contains("is a device"), "{device_error}");
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo()
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlink_writes_its_target_and_stays_a_link() {
        let dir = scratch("link");
        let target = dir.join("target.txt");
        let link = dir.join("link.txt");
        std::fs::write(&target, "old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();

        write_text(&link, "new").unwrap();

        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
    }

    #[test]
    fn write_error_names_the_target_not_the_temporary_file() {
        let dir = scratch("error");
        let path = dir.join("out.txt");

        let error = write_atomic(&path, |_| Err(std::io::Error::other("disk full")))
            .unwrap_err()
            .to_string();

        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(!error.contains(".tmp-"), "{error}");
        assert!(!path.exists());
    }
}
