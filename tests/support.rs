//! Shared helpers of the integration tests: where the fixtures and the stand-in model are.

use std::path::PathBuf;

/// The shared fixtures folder: `$QWENLENS_FIXTURES`, or `../shared/fixtures` beside the repository.
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QWENLENS_FIXTURES") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    assert!(
        dir.join("README.md").is_file(),
        "fixtures not found at {}; set QWENLENS_FIXTURES to the shared fixtures folder",
        dir.display()
    );
    dir
}

/// Folder of a tiny fixture model (`tiny-gqa`, `tiny-untied-sharded`, `tiny-mha-f16`).
pub fn fixture_model(name: &str) -> PathBuf {
    fixtures_dir().join("models").join(name)
}

/// The stand-in Qwen2.5-0.5B checkpoint built by `fetch-standin`: `$QWENLENS_STANDIN`, or its default
/// output folder.
pub fn standin_dir() -> PathBuf {
    let dir = match std::env::var_os("QWENLENS_STANDIN") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/qwenlens/qwen2.5-0.5b-instruct-standin"),
    };
    assert!(
        dir.join("model.safetensors").is_file(),
        "stand-in model not found at {}; build it with ../shared/scripts/fetch-standin or set QWENLENS_STANDIN",
        dir.display()
    );
    dir
}
