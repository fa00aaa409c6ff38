//! `cargo xtask validate-shaders`: parses and validates every `shaders/*.wgsl` with naga, the WGSL
//! front end wgpu itself uses, so shader errors show up without a GPU.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct Args {
    /// Folder of the WGSL files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../shaders"))]
    dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let files = wgsl_files(&args.dir)?;
    if files.is_empty() {
        bail!("no .wgsl files found in {}", args.dir.display());
    }

    let mut failed = 0;
    for path in &files {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        match validate(&source, &path.display().to_string()) {
            Ok(()) => println!("ok      {}", path.display()),
            Err(report) => {
                failed += 1;
                println!("FAILED  {}\n{report}", path.display());
            }
        }
    }

    if failed > 0 {
        bail!("{failed} of {} shader files failed validation", files.len());
    }
    println!("{} shader files are valid", files.len());
    Ok(())
}

fn wgsl_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("failed to read the shader folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "wgsl") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses and validates one WGSL source, returning naga's rendered diagnostic on failure.
fn validate(source: &str, name: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|err| err.emit_to_string_with_path(source, name))?;

    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator
        .validate(&module)
        .map(|_| ())
        .map_err(|err| err.emit_to_string_with_path(source, name))
}
