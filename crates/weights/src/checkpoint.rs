//! A Qwen2 checkpoint folder: configuration, memory-mapped weight files and the validated tensor set.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{GenerationConfig, Qwen2Config};
use crate::dtype::DType;
use crate::error::{Result, WeightsError};
use crate::safetensors::{SafetensorsFile, TensorView};
use crate::source::ModelSource;

/// Name of the unembedding of untied checkpoints.
pub const LM_HEAD: &str = "lm_head.weight";

/// Name of the token embedding, which tied checkpoints also use as the unembedding.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

/// A weight file of a checkpoint, as `qwenlens inspect` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFile {
    /// Absolute or as-given path of the safetensors file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// `model.safetensors.index.json`.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// A loaded Qwen2 checkpoint: validated configuration and every expected tensor present with the
/// expected shape and a supported dtype. Tensors stay in the memory maps until a caller reads them.
pub struct Checkpoint {
    dir: PathBuf,
    config: Qwen2Config,
    generation_config: GenerationConfig,
    files: Vec<SafetensorsFile>,
    /// Tensor name to index into `files`.
    locations: HashMap<String, usize>,
    unexpected: Vec<String>,
    dtype: DType,
}

impl Checkpoint {
    /// Opens the checkpoint in folder `dir`: reads `config.json` and `generation_config.json` (if
    /// present), maps `model.safetensors` or the shards listed in `model.safetensors.index.json`, and
    /// checks every tensor against the configuration.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let hint = if dir.exists() {
                "this is a file, but a checkpoint is a folder holding config.json and the \
                 safetensors weights"
            } else {
                "the model folder does not exist"
            };
            return Err(WeightsError::MissingFile {
                path: dir.to_path_buf(),
                hint: hint.into(),
            });
        }

        let config = Qwen2Config::from_file(&dir.join("config.json"))?;
        let generation_path = dir.join("generation_config.json");
        let generation_config = if generation_path.is_file() {
            GenerationConfig::from_file(&generation_path)?
        } else {
            tracing::debug!(dir = %dir.display(), "no generation_config.json; using no generation defaults");
            GenerationConfig::default()
        };

        check_token_ids(&generation_config, &generation_path, config.vocab_size)?;

        let (files, locations) = map_weight_files(dir)?;
        let mut checkpoint = Self {
            dir: dir.to_path_buf(),
            config,
            generation_config,
            files,
            locations,
            unexpected: Vec::new(),
            dtype: DType::F32,
        };
        checkpoint.validate()?;
        tracing::info!(
            dir = %dir.display(),
            dtype = %checkpoint.dtype,
            parameters = checkpoint.parameter_count(),
            "checkpoint opened"
        );
        Ok(checkpoint)
    }

    /// Resolves `source` to a local folder (downloading or reading the hub cache if needed) and
    /// opens it.
    pub fn load(source: &ModelSource) -> Result<Self> {
        let dir = source.resolve()?;
        Self::open(dir)
    }

    /// Checks that every expected tensor is present with the expected shape and a supported dtype,
    /// and records the tensors no Qwen2 model uses.
    fn validate(&mut self) -> Result<()> {
        let expected = expected_tensors(&self.config);
        let mut dtype_counts: HashMap<DType, usize> = HashMap::new();

        for (name, shape) in &expected {
            let Some(&file_index) = self.locations.get(name) else {
                return Err(WeightsError::MissingTensor {
                    name: name.clone(),
                    expected: shape.clone(),
                    location: self.describe_files(),
                });
            };
            let file = &self.files[file_index];
            let entry = &file.tensors[name];

            let Some(dtype) = entry.dtype else {
                return Err(WeightsError::UnsupportedDType {
                    path: file.path.clone(),
                    name: name.clone(),
                    found: entry.dtype_name.clone(),
                });
            };
            if &entry.shape != shape {
                return Err(WeightsError::ShapeMismatch {
                    path: file.path.clone(),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: entry.shape.clone(),
                });
            }
            *dtype_counts.entry(dtype).or_default() += 1;
        }

        let expected_names: std::collections::HashSet<&str> =
            expected.iter().map(|(name, _)| name.as_str()).collect();
        let mut unexpected: Vec<String> = self
            .locations
            .keys()
            .filter(|name| !expected_names.contains(name.as_str()))
            .cloned()
            .collect();
        unexpected.sort();
        if !unexpected.is_empty() {
            tracing::warn!(
                dir = %self.dir.display(),
                count = unexpected.len(),
                names = ?unexpected,
                "checkpoint has tensors that a Qwen2 model does not use; they are ignored"
            );
        }
        self.unexpected = unexpected;

        if dtype_counts.len() > 1 {
            tracing::warn!(dir = %self.dir.display(), dtypes = ?dtype_counts, "checkpoint mixes dtypes");
        }
        self.dtype = dtype_counts
            .into_iter()
            .max_by_key(|&(dtype, count)| (count, dtype.size_in_bytes()))
            .map(|(dtype, _)| dtype)
            .unwrap_or(DType::F32);
        Ok(())
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        names.join(", ")
    }

    /// The checkpoint folder (also where `tokenizer.json` is looked for).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated `config.json`.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// `generation_config.json`, or all defaults when the file is absent.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_config
    }

    /// Token ids that end generation: those of `generation_config.json`, else those of
    /// `config.json`.
    pub fn eos_token_ids(&self) -> &[u32] {
        if self.generation_config.eos_token_ids.is_empty() {
            &self.config.eos_token_ids
        } else {
            &self.generation_config.eos_token_ids
        }
    }

    /// The most common dtype among the model's tensors (all of them in every known checkpoint).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The tensor named `name`, borrowed from its memory map in the stored dtype.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let not_found = || WeightsError::TensorNotFound {
            name: name.to_string(),
            dir: self.dir.clone(),
        };
        let &file_index = self.locations.get(name).ok_or_else(not_found)?;
        let file = &self.files[file_index];
        let (stored_name, entry) = file.tensors.get_key_value(name).ok_or_else(not_found)?;
        let dtype = entry.dtype.ok_or_else(|| WeightsError::UnsupportedDType {
            path: file.path.clone(),
            name: name.to_string(),
            found: entry.dtype_name.clone(),
        })?;
        Ok(TensorView {
            name: stored_name,
            dtype,
            shape: &entry.shape,
            data: &file.mmap[entry.start..entry.end],
        })
    }

    /// Whether the checkpoint contains a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// Name of the unembedding matrix `[d_vocab, d_model]`: `lm_head.weight`, or
    /// `model.embed_tokens.weight` when the embeddings are tied.
    pub fn unembedding_name(&self) -> &'static str {
        if self.config.tie_word_embeddings {
            EMBED_TOKENS
        } else {
            LM_HEAD
        }
    }

    /// Whether the unembedding reuses the token embedding.
    pub fn is_tied(&self) -> bool {
        self.config.tie_word_embeddings
    }

    /// Number of parameters of the model's tensors (a tied unembedding counted once).
    pub fn parameter_count(&self) -> usize {
        expected_tensors(&self.config)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// The safetensors files, in load order.
    pub fn files(&self) -> Vec<WeightFile> {
        self.files
            .iter()
            .map(|file| WeightFile {
                path: file.path.clone(),
                size: file.size,
            })
            .collect()
    }

    /// Tensors in the files that a Qwen2 model does not use (sorted); they are ignored.
    pub fn unexpected_tensors(&self) -> &[String] {
        &self.unexpected
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.locations.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .field("files", &self.files())
            .finish_non_exhaustive()
    }
}

/// Checks that the special token ids of `generation_config.json` lie inside the vocabulary.
fn check_token_ids(
    generation_config: &GenerationConfig,
    path: &Path,
    vocab_size: usize,
) -> Result<()> {
    let named_ids = generation_config
        .eos_token_ids
        .iter()
        .map(|&id| ("eos_token_id", id))
        .chain(
            generation_config
                .bos_token_id
                .map(|id| ("bos_token_id", id)),
        )
        .chain(
            generation_config
                .pad_token_id
                .map(|id| ("pad_token_id", id)),
        );
    for (key, id) in named_ids {
        if id as usize >= vocab_size {
            return Err(WeightsError::InvalidConfig {
                path: path.to_path_buf(),
                message: format!(
                    "{key} {id} is outside the vocabulary of vocab_size {vocab_size} tokens \
                     (config.json); fix or remove the key"
                ),
            });
        }
    }
    Ok(())
}

/// Maps the weight files of `dir`: the shards of `model.safetensors.index.json` when it exists,
/// else `model.safetensors`. Returns the files and each tensor's file index.
fn map_weight_files(dir: &Path) -> Result<(Vec<SafetensorsFile>, HashMap<String, usize>)> {
    let index_path = dir.join("model.safetensors.index.json");
    let single_path = dir.join("model.safetensors");

    if !index_path.is_file() {
        if !single_path.is_file() {
            return Err(WeightsError::MissingFile {
                path: single_path,
                hint: "a model folder needs model.safetensors, or model.safetensors.index.json \
                       and its shards"
                    .into(),
            });
        }
        let file = SafetensorsFile::open(&single_path)?;
        let locations = file.tensors.keys().map(|name| (name.clone(), 0)).collect();
        return Ok((vec![file], locations));
    }

    let text = std::fs::read_to_string(&index_path)
        .map_err(|error| WeightsError::io(&index_path, error))?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|source| WeightsError::Json {
        path: index_path.clone(),
        source,
    })?;
    let invalid = |message: String| WeightsError::InvalidIndex {
        path: index_path.clone(),
        message,
    };
    if index.weight_map.is_empty() {
        return Err(invalid(
            "weight_map is empty, so no tensor can be located".into(),
        ));
    }

    // Shards in name order, so `model-00001-of-00002` comes first.
    let mut shard_names: Vec<&String> = index.weight_map.values().collect();
    shard_names.sort();
    shard_names.dedup();

    let mut files = Vec::with_capacity(shard_names.len());
    let mut shard_of: HashMap<&str, usize> = HashMap::new();
    for shard_name in shard_names {
        let relative = Path::new(shard_name);
        if !crate::source::is_plain_file_name(shard_name) {
            return Err(invalid(format!(
                "shard {shard_name:?} is not a plain file name inside the model folder"
            )));
        }
        let path = dir.join(relative);
        if !path.is_file() {
            return Err(invalid(format!(
                "shard {shard_name} listed in weight_map is missing from {}",
                dir.display()
            )));
        }
        shard_of.insert(shard_name.as_str(), files.len());
        files.push(SafetensorsFile::open(&path)?);
    }

    let mut locations = HashMap::new();
    for (name, shard_name) in &index.weight_map {
        let file_index = shard_of[shard_name.as_str()];
        if !files[file_index].tensors.contains_key(name) {
            return Err(invalid(format!(
                "weight_map puts tensor {name} in {shard_name}, but that file does not contain it"
            )));
        }
        locations.insert(name.clone(), file_index);
    }
    for (file_index, file) in files.iter().enumerate() {
        for name in file.tensors.keys() {
            if !locations.contains_key(name) {
                tracing::warn!(
                    tensor = %name,
                    file = %file.path.display(),
                    "tensor is in a shard but not in the index's weight_map; using it anyway"
                );
                locations.insert(name.clone(), file_index);
            }
        }
    }
    Ok((files, locations))
}

/// Every tensor a Qwen2 model with `config` needs, with its shape (Hugging Face layout).
pub fn expected_tensors(config: &Qwen2Config) -> Vec<(String, Vec<usize>)> {
    let d = config.d_model();
    let q_width = config.n_heads() * config.d_head();
    let kv_width = config.n_kv_heads() * config.d_head();
    let d_mlp = config.d_mlp();

    let mut tensors = vec![(EMBED_TOKENS.to_string(), vec![config.d_vocab(), d])];
    for layer in 0..config.n_layers() {
        let prefix = format!("model.layers.{layer}");
        let per_layer = [
            ("input_layernorm.weight", vec![d]),
            ("self_attn.q_proj.weight", vec![q_width, d]),
            ("self_attn.q_proj.bias", vec![q_width]),
            ("self_attn.k_proj.weight", vec![kv_width, d]),
            ("self_attn.k_proj.bias", vec![kv_width]),
            ("self_attn.v_proj.weight", vec![kv_width, d]),
            ("self_attn.v_proj.bias", vec![kv_width]),
            ("self_attn.o_proj.weight", vec![d, q_width]),
            ("post_attention_layernorm.weight", vec![d]),
            ("mlp.gate_proj.weight", vec![d_mlp, d]),
            ("mlp.up_proj.weight", vec![d_mlp, d]),
            ("mlp.down_proj.weight", vec![d, d_mlp]),
        ];
        for (suffix, shape) in per_layer {
            tensors.push((format!("{prefix}.{suffix}"), shape));
        }
    }
    tensors.push(("model.norm.weight".to_string(), vec![d]));
    if !config.tie_word_embeddings {
        tensors.push((LM_HEAD.to_string(), vec![config.d_vocab(), d]));
    }
    tensors
}
