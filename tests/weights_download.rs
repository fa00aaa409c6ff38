//! Downloading hub models into an empty cache from a fake hub served on the loopback interface.
//! It serves the requests `hf-hub` makes (`GET /{id}/resolve/{revision}/{file}` with a Range
//! header) from the fixture model folders.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qwenlens_tests::fixture_model;
use qwenlens_weights::{Checkpoint, HubSettings, ModelSource, Tokenizer, WeightsError};

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A fake hub on 127.0.0.1 serving `test-org/<fixture name>` at revision `main`, with the log of
/// request paths it has received.
struct FakeHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    fn start() -> Self {
        Self::start_with(None, false)
    }

    /// A fake hub that looks for `test-org/<name>` in `models/<name>` before the fixture models.
    fn start_with_models(models: Option<PathBuf>) -> Self {
        Self::start_with(models, false)
    }

    /// A fake hub as [`FakeHub::start_with_models`] describes. With `cut_bodies`, every response
    /// longer than one byte closes the connection after half of its body.
    fn start_with(models: Option<PathBuf>, cut_bodies: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));

        let log = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = Arc::clone(&log);
                let models = models.clone();
                std::thread::spawn(move || serve(stream, &log, models.as_deref(), cut_bodies));
            }
        });
        Self { endpoint, requests }
    }

    fn request_count(&self, file: &str) -> usize {
        let suffix = format!("/resolve/main/{file}");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|path| path.ends_with(&suffix))
            .count()
    }

    fn requested(&self, file: &str) -> bool {
        let suffix = format!("/resolve/main/{file}");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .any(|path| path.ends_with(&suffix))
    }
}

/// Serves one HTTP/1.1 request and closes the connection.
fn serve(mut stream: TcpStream, log: &Mutex<Vec<String>>, models: Option<&Path>, cut_bodies: bool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();

    // `Range: bytes=START-` or `bytes=START-END`.
    let mut range: (usize, Option<usize>) = (0, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        if let Some(spec) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (start, end) = spec.trim().split_once('-').unwrap();
            range = (start.parse().unwrap(), end.parse().ok());
        }
    }
    log.lock().unwrap().push(path.clone());

    let Some(file) = fixture_file(&path, models) else {
        let body = "Entry not found";
        let head = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        return;
    };

    let bytes = std::fs::read(&file).unwrap();
    let (start, end) = (range.0, range.1.unwrap_or(bytes.len() - 1));
    let body = &bytes[start..=end];
    // The etag names the blob in the cache, so it must differ between files.
    let etag = format!(
        "{}-{}",
        file.file_name().unwrap().to_string_lossy(),
        bytes.len()
    );
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
         Content-Range: bytes {start}-{end}/{}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\n\
         Connection: close\r\n\r\n",
        body.len(),
        bytes.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let sent = if cut_bodies && body.len() > 1 {
        &body[..body.len() / 2]
    } else {
        body
    };
    // The client may hang up early, so a failed write is no test failure.
    let _ = stream.write_all(sent);
}

/// The file for `/test-org/<model>/resolve/main/<file>` in `models` or the fixture models, if it
/// exists.
fn fixture_file(path: &str, models: Option<&Path>) -> Option<PathBuf> {
    let rest = path.strip_prefix("/test-org/")?;
    let (model, rest) = rest.split_once('/')?;
    let file = rest.strip_prefix("resolve/main/")?;
    if let Some(candidate) = models.map(|models| models.join(model).join(file))
        && candidate.is_file()
    {
        return Some(candidate);
    }
    let candidate = fixture_model(model).join(file);
    candidate.is_file().then_some(candidate)
}

fn online(cache: &tempfile::TempDir, hub: &FakeHub) -> HubSettings {
    HubSettings {
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        endpoint: hub.endpoint.clone(),
        download_timeout: Duration::from_secs(10),
    }
}

#[test]
fn download_single_file_model() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::parse("test-org/tiny-gqa", "main").unwrap();

    let dir = source.resolve_with(&online(&cache, &hub)).unwrap();
    assert_eq!(
        dir,
        cache
            .path()
            .join("models--test-org--tiny-gqa/snapshots")
            .join(COMMIT)
    );
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model.safetensors",
    ] {
        assert!(hub.requested(file), "{file} was not requested");
    }

    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.config().n_layers(), 2);
    let original = Checkpoint::open(fixture_model("tiny-gqa")).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    assert_eq!(
        checkpoint.tensor(name).unwrap().data,
        original.tensor(name).unwrap().data
    );
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tokenizer.encode("<|im_start|>").unwrap(), vec![151644]);

    // The cache now resolves the model offline, through the ref that the download wrote.
    let offline = HubSettings {
        offline: true,
        ..online(&cache, &hub)
    };
    assert_eq!(source.resolve_with(&offline).unwrap(), dir);
}

#[test]
fn download_sharded_model() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::parse("test-org/tiny-untied-sharded", "main").unwrap();

    let dir = source.resolve_with(&online(&cache, &hub)).unwrap();
    assert!(hub.requested("model-00001-of-00002.safetensors"));
    assert!(hub.requested("model-00002-of-00002.safetensors"));
    // Optional files the model lacks are skipped without failing the download.
    assert!(hub.requested("tokenizer.json"));
    assert!(!dir.join("tokenizer.json").exists());

    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.files().len(), 2);
    assert_eq!(checkpoint.parameter_count(), 488064);
}

#[test]
fn download_unknown_model_is_error() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::parse("test-org/no-such-model", "main").unwrap();

    let error = source
        .resolve_with(&online(&cache, &hub))
        .unwrap_err()
        .to_string();
    assert!(error.contains("test-org/no-such-model"), "{error}");
    assert!(error.contains("fetching config.json"), "{error}");
    assert!(error.contains("404"), "{error}");
}

#[test]
fn download_rejects_index_pointing_outside() {
    let models = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("pwned.txt");
    let evil = models.path().join("evil");
    std::fs::create_dir(&evil).unwrap();
    std::fs::copy(
        fixture_model("tiny-untied-sharded").join("config.json"),
        evil.join("config.json"),
    )
    .unwrap();
    let escape = format!("../../../../../../../../..{}", target.display());
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": escape,
        }
    });
    std::fs::write(evil.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(
        evil.join("model-00001-of-00002.safetensors"),
        b"not fetched",
    )
    .unwrap();

    let hub = FakeHub::start_with_models(Some(models.path().to_path_buf()));
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::parse("test-org/evil", "main").unwrap();
    let error = source.resolve_with(&online(&cache, &hub)).unwrap_err();

    assert!(
        matches!(error, WeightsError::InvalidIndex { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("not a plain file name"), "{message}");
    assert!(message.contains("pwned.txt"), "{message}");
    // No shard is fetched once one name is invalid, and nothing appears outside the cache.
    assert!(!hub.requested("model-00001-of-00002.safetensors"));
    assert!(!target.exists() && target.symlink_metadata().is_err());
}

#[test]
fn download_refetches_missing_shard() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::parse("test-org/tiny-untied-sharded", "main").unwrap();
    let shard = "model-00002-of-00002.safetensors";
    let dir = source.resolve_with(&online(&cache, &hub)).unwrap();
    assert_eq!(hub.request_count(shard), 2, "metadata and body requests");

    // An interrupted download: the link and its blob are gone.
    let blob = std::fs::canonicalize(dir.join(shard)).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let offline = HubSettings {
        offline: true,
        ..online(&cache, &hub)
    };
    let error = source.resolve_with(&offline).unwrap_err();
    assert!(
        matches!(error, WeightsError::IncompleteSnapshot { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(shard), "{message}");
    assert!(message.contains("delete the folder"), "{message}");
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");

    // Online, the missing shard is fetched again and the model opens.
    assert_eq!(source.resolve_with(&online(&cache, &hub)).unwrap(), dir);
    assert_eq!(hub.request_count(shard), 4);
    assert_eq!(Checkpoint::open(&dir).unwrap().files().len(), 2);
}

#[test]
fn download_from_silent_server_times_out() {
    // A server that accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming().flatten() {
            open.push(stream);
        }
    });

    let cache = tempfile::tempdir().unwrap();
    let settings = HubSettings {
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        endpoint,
        download_timeout: Duration::from_millis(500),
    };
    let started = std::time::Instant::now();
    let error = ModelSource::parse("test-org/tiny-gqa", "main")
        .unwrap()
        .resolve_with(&settings)
        .unwrap_err();

    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(error, WeightsError::HubUnavailable { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("fetching config.json timed out"),
        "{message}"
    );
    assert!(message.contains("HF_HUB_DOWNLOAD_TIMEOUT"), "{message}");
}

#[test]
fn download_cut_off_reports_failed_download() {
    let hub = FakeHub::start_with(None, true);
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::parse("test-org/tiny-gqa", "main").unwrap();

    let error = source.resolve_with(&online(&cache, &hub)).unwrap_err();
    assert!(
        matches!(error, WeightsError::HubUnavailable { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("downloading it failed"), "{message}");
    assert!(message.contains("fetching config.json"), "{message}");
    assert!(!message.contains("not reachable"), "{message}");
}
