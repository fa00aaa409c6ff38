//! The Hugging Face `tokenizer.json` tokenizer and the chat template of `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{Result, WeightsError};

/// A byte-level BPE tokenizer with the model's chat template.
///
/// Encoding adds no special tokens (Qwen2 has no BOS), but special tokens written in the text, such
/// as `<|im_start|>`, are matched as single tokens. Decoding skips nothing and does not clean up
/// spaces, so `decode(encode(text)) == text` up to the tokenizer's NFC normalisation.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<ChatTemplate>,
    /// Number of tokens, added tokens included, counted once at load: the tokenizers crate rebuilds
    /// its whole vocabulary map on every `get_vocab_size` call (about 40 ms for Qwen2.5).
    vocab_size: usize,
    /// `vocab_size` of the model's `config.json`, when the tokenizer came from a model folder.
    model_vocab_size: Option<usize>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, the chat template of `tokenizer_config.json` from
    /// the model folder `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config_path = config_path.is_file().then_some(config_path);
        let mut tokenizer = Self::from_files(&dir.join("tokenizer.json"), config_path.as_deref())?;

        // Only the size is needed here; `Checkpoint::open` reports a broken config.json.
        tokenizer.model_vocab_size = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|config| config.get("vocab_size")?.as_u64())
            .and_then(|size| usize::try_from(size).ok());
        Ok(tokenizer)
    }

    /// Loads the tokenizer from `tokenizer_json` and the chat template from `tokenizer_config`.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.is_file() {
            return Err(WeightsError::MissingFile {
                path: tokenizer_json.to_path_buf(),
                hint: "the model folder has no tokenizer.json (the Hugging Face fast tokenizer); \
                       copy it and tokenizer_config.json from the original model into the folder"
                    .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|error| {
            WeightsError::Tokenizer {
                path: tokenizer_json.to_path_buf(),
                message: format!("failed to load: {error}"),
            }
        })?;

        let chat_template = match tokenizer_config {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|error| WeightsError::io(path, error))?;
                let config: serde_json::Value =
                    serde_json::from_str(&text).map_err(|source| WeightsError::Json {
                        path: path.to_path_buf(),
                        source,
                    })?;
                ChatTemplate::from_tokenizer_config(&config, path)?
            }
        };

        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            inner,
            path: tokenizer_json.to_path_buf(),
            chat_template,
            model_vocab_size: None,
        })
    }

    fn error(&self, message: String) -> WeightsError {
        WeightsError::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|error| self.error(format!("failed to encode {text:?}: {error}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes `ids` to text, special tokens included. Byte-level pieces are joined before UTF-8
    /// decoding, so a character split across tokens decodes whole.
    ///
    /// Ids the tokenizer does not know but the model's embedding has, such as the padding rows
    /// between Qwen2.5's 151665 tokens and its `d_vocab` of 151936, are skipped, because a model
    /// can predict them. Larger ids are an error. The model's `d_vocab` is known when the tokenizer
    /// came from [`Tokenizer::from_dir`] on a folder with `config.json`; otherwise every id
    /// outside the tokenizer's vocabulary is an error, as in [`Tokenizer::tokens`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let limit = self
            .vocab_size()
            .max(self.model_vocab_size.unwrap_or_default());
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= limit) {
            let model = self
                .model_vocab_size
                .map(|size| format!(" and the model's vocab_size of {size}"))
                .unwrap_or_default();
            return Err(self.error(format!(
                "cannot decode token id {id}: it is outside the tokenizer's vocabulary of {} \
                 tokens{model}",
                self.vocab_size()
            )));
        }

        self.inner
            .decode(ids, false)
            .map_err(|error| self.error(format!("failed to decode {} ids: {error}", ids.len())))
    }

    /// Returns the vocabulary string of each id (byte-level, e.g. `Ġthe` for " the"), or an error
    /// naming the first id outside the vocabulary.
    pub fn tokens(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter()
            .map(|&id| {
                self.id_to_token(id).ok_or_else(|| {
                    self.error(format!(
                        "token id {id} is outside the tokenizer's vocabulary of {} tokens",
                        self.vocab_size()
                    ))
                })
            })
            .collect()
    }

    /// The vocabulary string of `id`, if the tokenizer has one.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the vocabulary string `token` (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of tokens, added tokens included (151665 for Qwen2.5, fewer than the model's
    /// `d_vocab` of 151936: the remaining rows are padding and never produced by the tokenizer).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether `tokenizer_config.json` provided a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, byte-identical to transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(WeightsError::ChatTemplate {
                path: self.path.with_file_name("tokenizer_config.json"),
                message: "no chat_template found (neither in tokenizer_config.json nor in \
                          chat_template.jinja); use plain text instead of a chat"
                    .into(),
            });
        };
        template.render(messages, add_generation_prompt)
    }

    /// Token ids of the rendered chat (the template writes the special tokens itself).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let prompt = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&prompt)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.chat_template.is_some())
            .field("model_vocab_size", &self.model_vocab_size)
            .finish()
    }
}
