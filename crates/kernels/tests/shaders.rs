//! Parses and validates every WGSL file under `shaders/` with naga (no GPU needed), and checks that
//! the backend embeds each of them.

use std::path::PathBuf;

fn shader_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shaders"))
}

fn wgsl_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shader_dir())
        .expect("the shaders folder is readable")
        .map(|entry| entry.expect("a readable folder entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wgsl"))
        .collect();
    files.sort();
    files
}

fn validate(path: &PathBuf) -> Result<naga::Module, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|err| format!("failed to read {}: {err}", path.display()))?;
    let name = path.display().to_string();
    let module = naga::front::wgsl::parse_str(&source)
        .map_err(|err| err.emit_to_string_with_path(&source, &name))?;

    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator
        .validate(&module)
        .map_err(|err| err.emit_to_string_with_path(&source, &name))?;
    Ok(module)
}

#[test]
fn every_shader_validates() {
    let files = wgsl_files();
    assert!(
        !files.is_empty(),
        "no .wgsl files in {}",
        shader_dir().display()
    );

    let failures: Vec<String> = files
        .iter()
        .filter_map(|path| validate(path).err())
        .collect();
    assert!(
        failures.is_empty(),
        "shader validation failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_shader_has_header_and_entry_points() {
    for path in wgsl_files() {
        let source = std::fs::read_to_string(&path).unwrap();
        let header: String = source
            .lines()
            .take_while(|line| line.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n")
            .to_lowercase();
        assert!(
            !header.is_empty(),
            "{} lacks its header comment",
            path.display()
        );
        assert!(
            header.contains("dispatch"),
            "{} header does not give the dispatch size",
            path.display()
        );
        assert!(
            header.contains("bindings"),
            "{} header does not list the bindings",
            path.display()
        );

        let module = validate(&path).unwrap();
        assert!(
            !module.entry_points.is_empty(),
            "{} has no entry point",
            path.display()
        );
    }
}

#[test]
fn entry_points_bind_at_most_eight_resources() {
    for path in wgsl_files() {
        let module = validate(&path).unwrap();
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        let info = validator.validate(&module).unwrap();
        for (index, entry) in module.entry_points.iter().enumerate() {
            let function_info = info.get_entry_point(index);
            let used = module
                .global_variables
                .iter()
                .filter(|(handle, var)| var.binding.is_some() && !function_info[*handle].is_empty())
                .count();
            assert!(
                used <= 8,
                "{} entry point {} binds {used} resources",
                path.display(),
                entry.name
            );
        }
    }
}

#[test]
fn backend_embeds_every_shader() {
    let embedded = qwenlens_kernels::gpu::SHADER_FILES;
    for path in wgsl_files() {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            embedded.iter().any(|(file, _)| *file == name),
            "{name} is not included in the GPU backend"
        );
    }
}
