//! Resolving hub ids through a Hugging Face cache: a fake cache laid out in a temporary folder with
//! a fixture model, and the stand-in's cache. No test here reads or sets environment variables;
//! `weights_hub_env.rs` covers those.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qwenlens_tests::{fixture_model, standin_dir};
use qwenlens_weights::{Checkpoint, HubSettings, ModelSource, Tokenizer, WeightsError};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO_ID: &str = "test-org/tiny-gqa";

/// A hub cache (`.../hub`) holding `test-org/tiny-gqa` at `refs/main` and `refs/v1`, laid out as
/// `huggingface_hub` writes it, with files linked to the fixture model.
fn fake_hub_cache() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--test-org--tiny-gqa");
    let snapshot = repo.join("snapshots").join(COMMIT);
    fs::create_dir_all(&snapshot).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), COMMIT).unwrap();
    fs::write(repo.join("refs/v1"), format!("{COMMIT}\n")).unwrap();

    for entry in fs::read_dir(fixture_model("tiny-gqa")).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    cache
}

fn offline(cache_dir: &Path) -> HubSettings {
    HubSettings {
        cache_dir: cache_dir.to_path_buf(),
        offline: true,
        endpoint: "https://huggingface.co".into(),
        download_timeout: Duration::from_secs(10),
    }
}

fn hub(id: &str, revision: &str) -> ModelSource {
    ModelSource::parse(id, revision).unwrap()
}

#[test]
fn fake_cache_resolves_main_offline() {
    let cache = fake_hub_cache();
    let dir = hub(REPO_ID, "main")
        .resolve_with(&offline(cache.path()))
        .unwrap();
    assert_eq!(
        dir,
        cache
            .path()
            .join("models--test-org--tiny-gqa/snapshots")
            .join(COMMIT)
    );

    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.config().n_kv_heads(), 2);
    assert_eq!(checkpoint.dir(), dir.as_path());
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tokenizer.encode("Hello").unwrap(), vec![9707]);
}

#[test]
fn fake_cache_resolves_tag_and_commit() {
    let cache = fake_hub_cache();
    let settings = offline(cache.path());
    let expected: PathBuf = cache
        .path()
        .join("models--test-org--tiny-gqa/snapshots")
        .join(COMMIT);

    // refs/v1 ends with a newline; the commit hash names the snapshot folder directly.
    assert_eq!(
        hub(REPO_ID, "v1").resolve_with(&settings).unwrap(),
        expected
    );
    assert_eq!(
        hub(REPO_ID, COMMIT).resolve_with(&settings).unwrap(),
        expected
    );
}

#[test]
fn offline_missing_revision_is_error() {
    let cache = fake_hub_cache();
    let error = hub(REPO_ID, "v2")
        .resolve_with(&offline(cache.path()))
        .unwrap_err();
    assert!(matches!(error, WeightsError::NotCached { .. }), "{error:?}");

    let message = error.to_string();
    assert!(
        message.contains("test-org/tiny-gqa (revision v2)"),
        "{message}"
    );
    assert!(
        message.contains(&cache.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
    assert!(
        message.contains("download it on a connected machine"),
        "{message}"
    );
    assert!(message.contains("pass a local folder"), "{message}");
}

#[test]
fn offline_missing_model_is_error() {
    let cache = fake_hub_cache();
    let error = hub("test-org/other-model", "main")
        .resolve_with(&offline(cache.path()))
        .unwrap_err()
        .to_string();
    assert!(error.contains("test-org/other-model"), "{error}");
    assert!(
        error.contains("is not in the Hugging Face cache"),
        "{error}"
    );
}

#[test]
fn snapshot_without_weights_is_not_cached() {
    let cache = fake_hub_cache();
    let snapshot = cache
        .path()
        .join("models--test-org--tiny-gqa/snapshots")
        .join(COMMIT);
    fs::remove_file(snapshot.join("model.safetensors")).unwrap();

    let error = hub(REPO_ID, "main")
        .resolve_with(&offline(cache.path()))
        .unwrap_err();
    assert!(matches!(error, WeightsError::NotCached { .. }), "{error:?}");
}

#[test]
fn unreachable_hub_is_error() {
    let cache = tempfile::tempdir().unwrap();
    // Nothing listens on port 1 of the loopback interface, so the connection is refused at once.
    let settings = HubSettings {
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        endpoint: "http://127.0.0.1:1".into(),
        download_timeout: Duration::from_secs(10),
    };
    let error = hub(REPO_ID, "main").resolve_with(&settings).unwrap_err();
    assert!(
        matches!(error, WeightsError::HubUnavailable { .. }),
        "{error:?}"
    );

    let message = error.to_string();
    assert!(message.contains("test-org/tiny-gqa"), "{message}");
    assert!(message.contains("downloading it failed"), "{message}");
    assert!(message.contains("config.json"), "{message}");
    assert!(message.contains("pass a local folder"), "{message}");
}

#[test]
fn online_uses_cache_without_network() {
    // A cached model resolves even when the endpoint is unreachable.
    let cache = fake_hub_cache();
    let settings = HubSettings {
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        endpoint: "http://127.0.0.1:1".into(),
        download_timeout: Duration::from_secs(10),
    };
    assert!(hub(REPO_ID, "main").resolve_with(&settings).is_ok());
}

#[test]
fn standin_hub_cache_resolves_offline() {
    let hf_home = standin_dir()
        .parent()
        .expect("stand-in folder has a parent")
        .join("hf-home");
    let source = hub("Qwen/Qwen2.5-0.5B-Instruct", "main");
    let dir = source.resolve_with(&offline(&hf_home.join("hub"))).unwrap();
    assert!(dir.starts_with(hf_home.join("hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots")));

    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.parameter_count(), 494_032_768);
}

#[test]
fn parse_rejects_bad_revisions() {
    for revision in [
        "",
        " ",
        "../../etc",
        "main/..",
        "/main",
        "a//b",
        "has space",
    ] {
        let error = ModelSource::parse(REPO_ID, revision).unwrap_err();
        assert!(
            matches!(error, WeightsError::InvalidSource { .. }),
            "{revision:?}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("--revision"), "{revision:?}: {message}");
    }
    for revision in [
        "main",
        "v1.0",
        "refs/pr/1",
        "fedcba9876543210fedcba9876543210fedcba98",
    ] {
        assert!(ModelSource::parse(REPO_ID, revision).is_ok(), "{revision}");
    }
}
