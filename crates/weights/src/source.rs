//! Model sources: a local folder, or a Hugging Face hub id resolved through the same cache that
//! Python's `huggingface_hub` uses.

use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Result, WeightsError};

/// Files a model folder needs, fetched from the hub in this order. The weights follow separately
/// because they are either `model.safetensors` or an index plus its shards.
const REQUIRED_FILES: [&str; 1] = ["config.json"];
const OPTIONAL_FILES: [&str; 3] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];
const SINGLE_WEIGHTS: &str = "model.safetensors";
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// How long a download may go without receiving data, unless `HF_HUB_DOWNLOAD_TIMEOUT` sets
/// another value. It is the default of Python's `huggingface_hub`.
pub const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A model given on the command line: a folder on disk, or a hub id with a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder holding `config.json`, the safetensors weights and usually the tokenizer.
    Local(PathBuf),
    /// A Hugging Face hub model such as `Qwen/Qwen2.5-0.5B-Instruct`.
    Hub {
        /// The id, `org/name`.
        id: String,
        /// Branch, tag or commit hash.
        revision: String,
    },
}

/// Settings for resolving hub ids: the cache folder, whether the network may be used, and the
/// endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache folder (`.../huggingface/hub`), laid out as `huggingface_hub` does it:
    /// `models--org--name/{refs/<revision>, snapshots/<commit>/<file>, blobs/}`.
    pub cache_dir: PathBuf,
    /// Only read the cache, never contact the hub.
    pub offline: bool,
    /// Hub URL, `https://huggingface.co` unless `HF_ENDPOINT` sets another.
    pub endpoint: String,
    /// Maximum time without any data arriving (while connecting, waiting for the response or
    /// receiving a file) before the download fails as timed out.
    pub download_timeout: Duration,
}

impl HubSettings {
    /// Settings from the environment, with the same precedence as `huggingface_hub`: the cache is
    /// `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. `HF_HUB_OFFLINE` set to
    /// 1, true, yes or on makes it offline; `HF_ENDPOINT` replaces the hub URL;
    /// `HF_HUB_DOWNLOAD_TIMEOUT` (positive seconds) sets `download_timeout`, which is
    /// [`DEFAULT_DOWNLOAD_TIMEOUT`] otherwise.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());

        let cache_dir =
            if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
                PathBuf::from(dir)
            } else if let Some(home) = var("HF_HOME") {
                PathBuf::from(home).join("hub")
            } else if let Some(xdg) = var("XDG_CACHE_HOME") {
                PathBuf::from(xdg).join("huggingface").join("hub")
            } else {
                PathBuf::from(var("HOME").unwrap_or_default())
                    .join(".cache")
                    .join("huggingface")
                    .join("hub")
            };

        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|value| {
            matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".to_string());

        let download_timeout = match std::env::var("HF_HUB_DOWNLOAD_TIMEOUT") {
            Err(_) => DEFAULT_DOWNLOAD_TIMEOUT,
            Ok(text) => match text.trim().parse::<f64>() {
                Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds < 1e9 => {
                    Duration::from_secs_f64(seconds)
                }
                _ => {
                    tracing::warn!(
                        value = text,
                        default_seconds = DEFAULT_DOWNLOAD_TIMEOUT.as_secs(),
                        "HF_HUB_DOWNLOAD_TIMEOUT is not a positive number of seconds; using the default"
                    );
                    DEFAULT_DOWNLOAD_TIMEOUT
                }
            },
        };

        Self {
            cache_dir,
            offline,
            endpoint,
            download_timeout,
        }
    }
}

impl ModelSource {
    /// Interprets `text` as an existing folder, else as a hub id `org/name` at `revision`.
    ///
    /// Text that looks like a path (starts with `/`, `.` or `~`, or has more than one `/`) is never
    /// taken as a hub id. If it is not an existing folder, the error reports a missing folder. A hub
    /// id needs a revision that is a valid git ref name or commit hash (not empty, no `..`).
    pub fn parse(text: &str, revision: &str) -> Result<Self> {
        let path = Path::new(text);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }

        let looks_like_path =
            text.starts_with(['/', '.', '~', '\\']) || text.matches('/').count() > 1;
        if looks_like_path {
            let message = if path.exists() {
                "this is a file; --model takes a folder holding config.json, the safetensors \
                 weights and tokenizer.json"
            } else {
                "no such folder; pass an existing model folder or a hub id such as \
                 Qwen/Qwen2.5-0.5B-Instruct"
            };
            return Err(WeightsError::InvalidSource {
                text: text.to_string(),
                message: message.into(),
            });
        }

        let valid_part = |part: &str| {
            !part.is_empty()
                && !part.starts_with(['.', '-'])
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let (org, name) = text.split_once('/').unwrap_or_default();
        if !valid_part(org) || !valid_part(name) {
            return Err(WeightsError::InvalidSource {
                text: text.to_string(),
                message: "not an existing folder, and not a hub id of the form org/name \
                          (letters, digits, '-', '_' and '.')"
                    .into(),
            });
        }

        // The revision becomes a path under `refs/` in the cache, so it must not be able to leave
        // that folder; git's own ref-name rules already exclude these forms.
        let revision_problem = if revision.is_empty() {
            Some("the revision is empty")
        } else if revision
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            Some("the revision contains whitespace")
        } else if revision.starts_with('/')
            || revision
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            Some("the revision has an empty, '.' or '..' path segment")
        } else {
            None
        };
        if let Some(problem) = revision_problem {
            return Err(WeightsError::InvalidSource {
                text: format!("{text}@{revision}"),
                message: format!(
                    "{problem}; pass a branch, tag or commit hash to --revision, such as main"
                ),
            });
        }

        Ok(Self::Hub {
            id: text.to_string(),
            revision: revision.to_string(),
        })
    }

    /// Returns a local folder holding the model, with hub settings from the environment.
    pub fn resolve(&self) -> Result<PathBuf> {
        self.resolve_with(&HubSettings::from_env())
    }

    /// Returns a local folder holding the model: the folder itself, or the hub cache's snapshot
    /// folder (downloading the files into the cache first unless `settings.offline`).
    pub fn resolve_with(&self, settings: &HubSettings) -> Result<PathBuf> {
        match self {
            Self::Local(dir) => Ok(dir.clone()),
            Self::Hub { id, revision } => {
                match cached_snapshot(&settings.cache_dir, id, revision) {
                    Snapshot::Complete(dir) => {
                        tracing::info!(id, revision, dir = %dir.display(), "using cached hub snapshot");
                        Ok(dir)
                    }
                    Snapshot::Incomplete { dir, missing } if settings.offline => {
                        Err(WeightsError::IncompleteSnapshot {
                            id: id.clone(),
                            revision: revision.clone(),
                            dir,
                            missing,
                        })
                    }
                    Snapshot::Incomplete { dir, missing } => {
                        tracing::warn!(
                            id,
                            revision,
                            dir = %dir.display(),
                            missing,
                            "cached hub snapshot is incomplete; fetching the missing files"
                        );
                        download(settings, id, revision)
                    }
                    Snapshot::Absent if settings.offline => Err(WeightsError::NotCached {
                        id: id.clone(),
                        revision: revision.clone(),
                        cache_dir: settings.cache_dir.clone(),
                    }),
                    Snapshot::Absent => download(settings, id, revision),
                }
            }
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(dir) => write!(f, "{}", dir.display()),
            Self::Hub { id, revision } if revision == "main" => f.write_str(id),
            Self::Hub { id, revision } => write!(f, "{id}@{revision}"),
        }
    }
}

/// Whether `name` is a single plain file name, so that joining it to a folder stays inside that
/// folder. The local loader and the hub download apply the same rule to shard names.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.ends_with('/')
}

/// The distinct shard file names of the `weight_map` of the index at `index_path`, sorted. Every
/// name must be a plain file name, so a hostile index cannot point outside the model folder.
pub(crate) fn read_shard_names(index_path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: std::collections::BTreeMap<String, String>,
    }

    let text =
        std::fs::read_to_string(index_path).map_err(|error| WeightsError::io(index_path, error))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let index: ShardIndex = serde_json::from_str(text).map_err(|source| WeightsError::Json {
        path: index_path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| WeightsError::InvalidIndex {
        path: index_path.to_path_buf(),
        message,
    };
    if index.weight_map.is_empty() {
        return Err(invalid(
            "weight_map is empty, so no tensor can be located".into(),
        ));
    }

    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort_unstable();
    names.dedup();
    if let Some(bad) = names.iter().find(|name| !is_plain_file_name(name)) {
        return Err(invalid(format!(
            "shard {bad:?} is not a plain file name inside the model folder"
        )));
    }
    Ok(names)
}

/// What the cache holds of one hub model at one revision.
enum Snapshot {
    /// `config.json` and every weight file are present.
    Complete(PathBuf),
    /// The snapshot has `config.json` and a shard index, but a shard is missing.
    Incomplete { dir: PathBuf, missing: String },
    /// No snapshot with `config.json` and weights.
    Absent,
}

/// The snapshot folder of `id` at `revision` in the cache, and whether it contains `config.json`
/// and every weight file.
///
/// A branch or tag goes through `refs/<revision>`; a commit hash names its snapshot folder directly,
/// as in `huggingface_hub`.
fn cached_snapshot(cache_dir: &Path, id: &str, revision: &str) -> Snapshot {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = cache_dir.join(repo.folder_name());

    let from_ref = Cache::new(cache_dir.to_path_buf())
        .repo(repo.clone())
        .get("config.json")
        .and_then(|config| config.parent().map(Path::to_path_buf));
    // `huggingface_hub` writes refs without a newline, but tolerate one written by other tools.
    let from_trimmed_ref = || {
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
        Some(repo_dir.join("snapshots").join(commit.trim()))
    };
    let from_commit = || {
        let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
        is_commit.then(|| repo_dir.join("snapshots").join(revision))
    };

    let Some(snapshot) = from_ref.or_else(from_trimmed_ref).or_else(from_commit) else {
        return Snapshot::Absent;
    };
    if !snapshot.join("config.json").is_file() {
        tracing::debug!(snapshot = %snapshot.display(), "cached snapshot lacks config.json");
        return Snapshot::Absent;
    }

    let index_path = snapshot.join(SHARD_INDEX);
    if index_path.is_file() {
        // An unreadable or invalid index is left to `Checkpoint::open`, which names the problem.
        let Ok(shards) = read_shard_names(&index_path) else {
            return Snapshot::Complete(snapshot);
        };
        if let Some(missing) = shards
            .into_iter()
            .find(|name| !snapshot.join(name).is_file())
        {
            return Snapshot::Incomplete {
                dir: snapshot,
                missing,
            };
        }
        return Snapshot::Complete(snapshot);
    }
    if snapshot.join(SINGLE_WEIGHTS).is_file() {
        return Snapshot::Complete(snapshot);
    }
    tracing::debug!(snapshot = %snapshot.display(), "cached snapshot lacks the weights");
    Snapshot::Absent
}

/// Downloads the model files into the cache with `hf-hub` and returns the snapshot folder. Files
/// already in the cache are not fetched again.
fn download(settings: &HubSettings, id: &str, revision: &str) -> Result<PathBuf> {
    let unavailable = |message: String| WeightsError::HubUnavailable {
        id: id.to_string(),
        revision: revision.to_string(),
        cache_dir: settings.cache_dir.clone(),
        message,
    };

    // NOTE: hf-hub 0.4.3 builds its ureq agent itself and offers no connect or read timeout, so
    // `fetch` watches the download from another thread instead.
    let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        // A progress bar only helps a person watching a terminal; in logs it is noise.
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|error| unavailable(error.to_string()))?;
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());

    tracing::info!(id, revision, cache = %settings.cache_dir.display(), "downloading from the hub");
    let mut snapshot = None;
    for file in REQUIRED_FILES {
        let path = fetch(&api, &repo, file, settings).map_err(unavailable)?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    let Some(snapshot) = snapshot else {
        return Err(unavailable(
            "the hub returned no path for config.json".into(),
        ));
    };

    for file in OPTIONAL_FILES {
        if let Err(error) = fetch(&api, &repo, file, settings) {
            tracing::warn!(id, file, %error, "optional file not downloaded");
        }
    }

    match fetch(&api, &repo, SHARD_INDEX, settings) {
        Ok(index_path) => {
            // Every name is checked before the first shard is fetched: hf-hub joins the name to
            // the snapshot folder and would write a link outside the cache for `../` names.
            let shards = read_shard_names(&index_path)?;
            for shard in &shards {
                fetch(&api, &repo, shard, settings).map_err(unavailable)?;
            }
        }
        Err(index_error) => {
            tracing::debug!(id, %index_error, "no shard index; fetching the single weights file");
            fetch(&api, &repo, SINGLE_WEIGHTS, settings).map_err(|error| {
                unavailable(format!("{error} (and {SHARD_INDEX}: {index_error})"))
            })?;
        }
    }

    Ok(snapshot)
}

/// Returns the cached path of `file`, downloading it first if the cache lacks it.
///
/// The download runs on a worker thread while this thread watches the bytes arriving in the
/// repository's `blobs` folder, and fails as timed out when none arrive for
/// `settings.download_timeout`. A panic inside hf-hub ends the worker and becomes an error too.
fn fetch(
    api: &Api,
    repo: &Repo,
    file: &str,
    settings: &HubSettings,
) -> std::result::Result<PathBuf, String> {
    let cache_repo = Cache::new(settings.cache_dir.clone()).repo(repo.clone());
    if let Some(path) = cache_repo.get(file) {
        return Ok(path);
    }
    remove_dangling_link(&settings.cache_dir, repo, file);

    let (sender, receiver) = mpsc::channel();
    let worker_api = api.clone();
    let worker_repo = repo.clone();
    let worker_file = file.to_string();
    // NOTE: a worker that timed out stays blocked in its socket read until the process exits,
    // because ureq offers no way to cancel a request from another thread.
    std::thread::Builder::new()
        .name(format!("hub-download {file}"))
        .spawn(move || {
            let result = worker_api
                .repo(worker_repo)
                .download(&worker_file)
                .map_err(|error| error.to_string());
            // The receiver is gone only after a timeout, when nobody waits for the result.
            let _ = sender.send(result);
        })
        .map_err(|error| format!("fetching {file}: failed to start a download thread: {error}"))?;

    let blobs = settings.cache_dir.join(repo.folder_name()).join("blobs");
    let timeout = settings.download_timeout;
    let poll = timeout.min(Duration::from_millis(100));
    let mut received = blob_bytes(&blobs);
    let mut last_progress = Instant::now();
    loop {
        match receiver.recv_timeout(poll) {
            Ok(result) => return result.map_err(|error| format!("fetching {file}: {error}")),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!(
                    "fetching {file}: the hf-hub client stopped without a result (it panicked)"
                ));
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = blob_bytes(&blobs);
                if now != received {
                    received = now;
                    last_progress = Instant::now();
                } else if last_progress.elapsed() >= timeout {
                    return Err(format!(
                        "fetching {file} timed out: no data arrived from {} for {:.1} s (set \
                         HF_HUB_DOWNLOAD_TIMEOUT to a larger number of seconds to wait longer)",
                        settings.endpoint,
                        timeout.as_secs_f64()
                    ));
                }
            }
        }
    }
}

/// Total size of the files in a repository's `blobs` folder, partial downloads included.
fn blob_bytes(blobs: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(blobs) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// Removes the snapshot link of `file` when its blob is gone, because hf-hub skips creating a link
/// where one exists and would then fail to create it.
fn remove_dangling_link(cache_dir: &Path, repo: &Repo, file: &str) {
    let Some(commit) = std::fs::read_to_string(
        cache_dir
            .join(repo.folder_name())
            .join("refs")
            .join(repo.revision()),
    )
    .ok() else {
        return;
    };
    let link = cache_dir
        .join(repo.folder_name())
        .join("snapshots")
        .join(commit.trim())
        .join(file);
    let dangling = link.symlink_metadata().is_ok() && !link.exists();
    if dangling {
        tracing::debug!(link = %link.display(), "removing a snapshot link whose blob is gone");
        if let Err(error) = std::fs::remove_file(&link) {
            tracing::warn!(link = %link.display(), %error, "failed to remove a dangling snapshot link");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_hub_id() {
        let source = ModelSource::parse("Qwen/Qwen2.5-0.5B-Instruct", "main").unwrap();
        assert_eq!(
            source,
            ModelSource::Hub {
                id: "Qwen/Qwen2.5-0.5B-Instruct".into(),
                revision: "main".into()
            }
        );
    }

    #[test]
    fn parse_missing_folder_says_so() {
        let error = ModelSource::parse("./no/such/model", "main")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no such folder"), "{error}");
        let error = ModelSource::parse("org/", "main").unwrap_err().to_string();
        assert!(
            error.contains("not a hub id of the form org/name"),
            "{error}"
        );
    }

    #[test]
    fn parse_existing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().to_str().unwrap();
        assert_eq!(
            ModelSource::parse(text, "main").unwrap(),
            ModelSource::Local(dir.path().to_path_buf())
        );
    }

    #[test]
    fn parse_missing_path_rejected() {
        for text in [
            "./no/such/model",
            "/no/such/model",
            "a/b/c",
            "justaname",
            "org/",
            "/org/name",
        ] {
            let error = ModelSource::parse(text, "main").unwrap_err().to_string();
            assert!(error.contains("invalid model source"), "{text}: {error}");
        }
    }
}
