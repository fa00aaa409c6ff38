//! Model sources: a local folder, or a Hugging Face hub id resolved through the same cache that
//! Python's `huggingface_hub` uses.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
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
}

impl HubSettings {
    /// Settings from the environment, with the same precedence as `huggingface_hub`: the cache is
    /// `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. `HF_HUB_OFFLINE` set to
    /// 1, true, yes or on makes it offline; `HF_ENDPOINT` replaces the hub URL.
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

        Self {
            cache_dir,
            offline,
            endpoint,
        }
    }
}

impl ModelSource {
    /// Interprets `text` as an existing folder, else as a hub id `org/name` at `revision`.
    ///
    /// Text that looks like a path (starts with `/`, `.` or `~`, or has more than one `/`) is never
    /// taken as a hub id. If it is not an existing folder, the error reports a missing folder.
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
                if let Some(dir) = cached_snapshot(&settings.cache_dir, id, revision) {
                    tracing::info!(id, revision, dir = %dir.display(), "using cached hub snapshot");
                    return Ok(dir);
                }
                if settings.offline {
                    return Err(WeightsError::NotCached {
                        id: id.clone(),
                        revision: revision.clone(),
                        cache_dir: settings.cache_dir.clone(),
                    });
                }
                download(settings, id, revision)
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

/// The snapshot folder of `id` at `revision` in the cache, if it contains `config.json` and weights.
///
/// A branch or tag goes through `refs/<revision>`; a commit hash names its snapshot folder directly,
/// as in `huggingface_hub`.
fn cached_snapshot(cache_dir: &Path, id: &str, revision: &str) -> Option<PathBuf> {
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

    let snapshot = from_ref.or_else(from_trimmed_ref).or_else(from_commit)?;
    let complete = snapshot.join("config.json").is_file()
        && (snapshot.join(SINGLE_WEIGHTS).is_file() || snapshot.join(SHARD_INDEX).is_file());
    if !complete {
        tracing::debug!(snapshot = %snapshot.display(), "cached snapshot lacks config.json or weights");
        return None;
    }
    Some(snapshot)
}

/// Downloads the model files into the cache with `hf-hub` and returns the snapshot folder.
fn download(settings: &HubSettings, id: &str, revision: &str) -> Result<PathBuf> {
    let unavailable = |message: String| WeightsError::HubUnavailable {
        id: id.to_string(),
        revision: revision.to_string(),
        cache_dir: settings.cache_dir.clone(),
        message,
    };

    let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        // A progress bar only helps a person watching a terminal; in logs it is noise.
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|error| unavailable(error.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));

    tracing::info!(id, revision, cache = %settings.cache_dir.display(), "downloading from the hub");
    let mut snapshot = None;
    for file in REQUIRED_FILES {
        let path = repo
            .get(file)
            .map_err(|error| unavailable(format!("fetching {file}: {error}")))?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    for file in OPTIONAL_FILES {
        if let Err(error) = repo.get(file) {
            tracing::warn!(id, file, %error, "optional file not downloaded");
        }
    }

    match repo.get(SHARD_INDEX) {
        Ok(index_path) => {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|error| WeightsError::io(&index_path, error))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| WeightsError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let mut shards: Vec<&str> = index["weight_map"]
                .as_object()
                .map(|map| map.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard)
                    .map_err(|error| unavailable(format!("fetching {shard}: {error}")))?;
            }
        }
        Err(index_error) => {
            tracing::debug!(id, %index_error, "no shard index; fetching the single weights file");
            repo.get(SINGLE_WEIGHTS).map_err(|error| {
                unavailable(format!(
                    "fetching {SINGLE_WEIGHTS}: {error} (and {SHARD_INDEX}: {index_error})"
                ))
            })?;
        }
    }

    snapshot.ok_or_else(|| unavailable("the hub returned no path for config.json".into()))
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
