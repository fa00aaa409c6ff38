//! Autoregressive generation with hooks and interventions active at every step.
//!
//! The prompt runs once, then each new token runs against the KV cache. For checking, the whole
//! sequence can instead be recomputed at every step, as it is for mean ablation, whose mean covers
//! every position. The text is streamed as it becomes complete
//! UTF-8.

use crate::forward;
use crate::sampling::{Sampler, Sampling};
use crate::{Hooks, KvCache, LogitRows, Model, ModelError, Result, RunOptions, TokenBatch};

/// Options of [`Model::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Maximum number of new tokens; the prompt plus these must fit in `max_position_embeddings`.
    pub max_new_tokens: usize,
    /// Token choice: greedy or sampled, with its options.
    pub sampling: Sampling,
    /// Run each new token against the keys and values cached so far (`true`), or recompute the whole
    /// sequence at every step (`false`: slower, for checking the cache).
    pub use_kv_cache: bool,
    /// Stop after the first token in `eos_ids`.
    pub stop_on_eos: bool,
    /// End-of-sequence token ids (Qwen2.5-Instruct: 151645 `<|im_end|>` and 151643 `<|endoftext|>`).
    pub eos_ids: Vec<u32>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens` with the KV cache and no eos stopping.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::greedy(),
            use_kv_cache: true,
            stop_on_eos: false,
            eos_ids: Vec::new(),
        }
    }
}

/// Reason that generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The last new token is this end-of-sequence id.
    Eos(u32),
    /// `max_new_tokens` tokens were generated.
    MaxNewTokens,
}

/// The result of [`Model::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The new token ids, including the end-of-sequence token that stopped generation.
    pub ids: Vec<u32>,
    /// The decoded new tokens, without a final end-of-sequence token that stopped generation; empty
    /// when the model has no tokenizer.
    pub text: String,
    /// Reason that generation ended.
    pub stop_reason: StopReason,
}

impl Model {
    /// Builds the generation options of the checkpoint's `generation_config.json`: its sampling
    /// defaults, its `max_new_tokens` (else 256), and its end-of-sequence ids (else those of
    /// `config.json`), stopping on them, with the KV cache.
    pub fn default_generate_options(&self) -> GenerateOptions {
        let generation_config = self.generation_config();

        GenerateOptions {
            max_new_tokens: generation_config.max_new_tokens.unwrap_or(256),
            sampling: Sampling::from_generation_config(generation_config),
            use_kv_cache: true,
            stop_on_eos: true,
            eos_ids: self.eos_token_ids().to_vec(),
        }
    }

    /// The default number of new tokens after a prompt of `prompt_len` tokens, as transformers
    /// picks it: `generation_config.json`'s `max_new_tokens`, else its `max_length` (the total
    /// length) less the prompt, else 256; lowered to fit `max_position_embeddings`. A prompt that
    /// already reaches `max_length` is an error.
    pub fn default_max_new_tokens(&self, prompt_len: usize) -> Result<usize> {
        let room = self
            .config()
            .max_position_embeddings
            .saturating_sub(prompt_len);
        if let Some(max_new_tokens) = self.generation_config().max_new_tokens {
            return Ok(max_new_tokens.min(room));
        }

        let Some(max_length) = self.generation_max_length() else {
            return Ok(256.min(room));
        };
        if prompt_len >= max_length {
            return Err(ModelError::InvalidArgument(format!(
                "the prompt of {prompt_len} tokens already reaches max_length {max_length} of \
                 generation_config.json (the total length), so no token can be generated; give \
                 the number of new tokens explicitly (--max-new-tokens)"
            )));
        }
        Ok((max_length - prompt_len).min(room))
    }

    /// Generates up to `options.max_new_tokens` tokens after `prompt`, with `hooks` active at every
    /// step.
    ///
    /// `on_token` is called once per new token with its id and the text that it completes: a token
    /// holding part of a multi-byte character gives an empty string, and the character comes with
    /// the token that completes it. An end-of-sequence token that stops generation is not decoded:
    /// it gives only the text still held back, as does the last token.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        hooks: &Hooks,
        mut on_token: impl FnMut(u32, &str),
    ) -> Result<Generation> {
        self.check_generation_length(prompt, options.max_new_tokens)?;
        let mut sampler = Sampler::new(options.sampling.clone())?;
        let mut stream = TextStream::default();

        let mut sequence = prompt.to_vec();
        let mut ids = Vec::with_capacity(options.max_new_tokens);
        let mut stop_reason = StopReason::MaxNewTokens;

        // Built once, so the hooks are cloned once per generation rather than once per step.
        let run_options = RunOptions {
            hooks: hooks.clone(),
            logit_rows: LogitRows::Last,
            ..RunOptions::default()
        };
        let use_kv_cache = options.use_kv_cache && !forward::needs_whole_sequence(hooks);
        if options.use_kv_cache && !use_kv_cache {
            tracing::info!(
                "mean ablation needs every position at each step; generating without the KV cache"
            );
        }
        let mut kv_cache = use_kv_cache.then(|| self.new_kv_cache());
        let mut pending = prompt.to_vec();
        let final_len = prompt.len() + options.max_new_tokens;

        while ids.len() < options.max_new_tokens {
            let mut logits = match kv_cache.as_mut() {
                Some(kv_cache) => self.step_logits(kv_cache, &pending, &run_options, final_len)?,
                None => self.full_logits(&sequence, &run_options, final_len)?,
            };

            let step = ids.len();
            let token = sampler
                .next_token(&mut logits, &sequence)
                .map_err(|error| match error {
                    ModelError::InvalidArgument(message) => ModelError::InvalidArgument(format!(
                        "generation step {step} (new token {} after a prompt of {} tokens): {message}",
                        step + 1,
                        prompt.len()
                    )),
                    other => other,
                })?;
            sequence.push(token);
            ids.push(token);
            pending = vec![token];

            let is_stop = options.stop_on_eos && options.eos_ids.contains(&token);
            let is_last = is_stop || ids.len() == options.max_new_tokens;
            let piece = match self.tokenizer() {
                Some(tokenizer) => {
                    let decode = |ids: &[u32]| tokenizer.decode(ids);
                    let mut piece = if is_stop {
                        String::new()
                    } else {
                        stream.push(token, decode)?
                    };
                    if is_last {
                        piece.push_str(&stream.finish(decode)?);
                    }
                    piece
                }
                None => String::new(),
            };
            on_token(token, &piece);

            if is_stop {
                stop_reason = StopReason::Eos(token);
                break;
            }
        }

        let text_ids = match stop_reason {
            StopReason::Eos(_) => &ids[..ids.len() - 1],
            StopReason::MaxNewTokens => &ids[..],
        };
        let text = match self.tokenizer() {
            Some(tokenizer) => tokenizer.decode(text_ids)?,
            None => String::new(),
        };

        tracing::debug!(new_tokens = ids.len(), ?stop_reason, "generation finished");
        Ok(Generation {
            prompt_ids: prompt.to_vec(),
            ids,
            text,
            stop_reason,
        })
    }

    /// Rejects an empty prompt, and a prompt that with `max_new_tokens` more tokens would not fit in
    /// `max_position_embeddings`.
    fn check_generation_length(&self, prompt: &[u32], max_new_tokens: usize) -> Result<()> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt { item: 0 });
        }

        let max_positions = self.config().max_position_embeddings;
        if prompt.len() > max_positions {
            return Err(ModelError::PromptTooLong {
                len: prompt.len(),
                max: max_positions,
            });
        }
        if prompt.len().saturating_add(max_new_tokens) > max_positions {
            return Err(ModelError::InvalidArgument(format!(
                "a prompt of {} tokens plus max_new_tokens {max_new_tokens} exceeds the model's \
                 context of {max_positions} tokens (max_position_embeddings); set max_new_tokens \
                 to at most {}",
                prompt.len(),
                max_positions - prompt.len()
            )));
        }

        Ok(())
    }

    /// Runs the tokens not yet in `kv_cache` and returns the logits of the last one. Scopes may
    /// name positions up to `final_len`, the length the sequence has when generation ends.
    fn step_logits(
        &self,
        kv_cache: &mut KvCache,
        tokens: &[u32],
        options: &RunOptions,
        final_len: usize,
    ) -> Result<Vec<f32>> {
        let batch = TokenBatch::single(tokens);
        let output = forward::run(self, &batch, Some(kv_cache), options, Some(final_len))?;
        output.into_logits()?.last(0)
    }

    /// Runs the whole sequence and returns the logits of its last position.
    fn full_logits(
        &self,
        sequence: &[u32],
        options: &RunOptions,
        final_len: usize,
    ) -> Result<Vec<f32>> {
        let batch = TokenBatch::single(sequence);
        let output = forward::run(self, &batch, None, options, Some(final_len))?;
        output.into_logits()?.last(0)
    }
}

/// Incremental detokenizer: turns a stream of token ids into text pieces that are complete UTF-8.
///
/// A byte-level BPE token can hold part of a multi-byte character (an emoji often spans several
/// tokens), and decoding such a prefix gives U+FFFD. Each push decodes only a short window: the
/// tokens since the last emitted text, with the tokens of the previous piece as context, and emits
/// the new text once it no longer ends in U+FFFD.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decoding window: the first token of the last emitted piece.
    prefix_offset: usize,
    /// End of the emitted tokens: everything before it has been returned as text.
    read_offset: usize,
}

impl TextStream {
    /// Adds one token and returns the text it completes (possibly empty). `decode` turns ids into
    /// text, concatenating the tokens' bytes before converting them to UTF-8.
    pub fn push<E>(
        &mut self,
        id: u32,
        decode: impl Fn(&[u32]) -> std::result::Result<String, E>,
    ) -> std::result::Result<String, E> {
        self.ids.push(id);

        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;

        // NOTE: a model that generates U+FFFD itself has its text held back until the next token
        // that ends in a complete character, or until `finish`.
        if full.len() <= prefix.len() || full.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }

        let Some(piece) = full
            .get(prefix.len()..)
            .filter(|_| full.starts_with(&prefix))
        else {
            // Decoding is not a concatenation here (a normalizing decoder): wait for more tokens.
            return Ok(String::new());
        };

        let piece = piece.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }

    /// Returns the text of the tokens not yet emitted, incomplete characters included as U+FFFD.
    pub fn finish<E>(
        &mut self,
        decode: impl Fn(&[u32]) -> std::result::Result<String, E>,
    ) -> std::result::Result<String, E> {
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;

        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes ids as bytes: token `b` is the single byte `b`.
    fn decode_bytes(ids: &[u32]) -> std::result::Result<String, std::convert::Infallible> {
        let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn stream_pieces(text: &str) -> Vec<String> {
        let mut stream = TextStream::default();
        text.bytes()
            .map(|byte| stream.push(u32::from(byte), decode_bytes).unwrap())
            .collect()
    }

    #[test]
    fn text_stream_emits_ascii_per_token() {
        assert_eq!(stream_pieces("abc"), vec!["a", "b", "c"]);
    }

    #[test]
    fn text_stream_holds_partial_emoji() {
        let pieces = stream_pieces("a😀b");

        assert_eq!(pieces, vec!["a", "", "", "", "😀", "b"]);
    }

    #[test]
    fn text_stream_joins_to_full_text() {
        let text = "Grüße, 日本語 👩‍👩‍👧 🇫🇷!";

        assert_eq!(stream_pieces(text).concat(), text);
    }

    #[test]
    fn text_stream_finish_flushes_incomplete_character() {
        let mut stream = TextStream::default();
        let emoji = "😀".as_bytes();

        let first = stream.push(u32::from(b'x'), decode_bytes).unwrap();
        let partial = stream.push(u32::from(emoji[0]), decode_bytes).unwrap();
        let rest = stream.finish(decode_bytes).unwrap();

        assert_eq!(first, "x");
        assert_eq!(partial, "");
        assert_eq!(rest, "\u{FFFD}");
    }
}
