//! Batches of token sequences, left-padded to one length.

use crate::error::{ModelError, Result};

/// Token ids of `batch` sequences left-padded to `seq_len`, with each sequence's padding length.
///
/// Padding tokens get no attention, and positions (RoPE) count from each sequence's first real
/// token, so a padded sequence gives the same activations as the sequence run alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    ids: Vec<u32>,
    batch: usize,
    seq_len: usize,
    pad: Vec<usize>,
}

impl TokenBatch {
    /// Returns one sequence without padding.
    pub fn single(ids: &[u32]) -> TokenBatch {
        TokenBatch {
            ids: ids.to_vec(),
            batch: 1,
            seq_len: ids.len(),
            pad: vec![0],
        }
    }

    /// Sequences of any lengths, left-padded with `pad_id` to the longest.
    pub fn left_padded<S: AsRef<[u32]>>(sequences: &[S], pad_id: u32) -> TokenBatch {
        let seq_len = sequences
            .iter()
            .map(|s| s.as_ref().len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * seq_len);
        let mut pad = Vec::with_capacity(sequences.len());
        for sequence in sequences {
            let sequence = sequence.as_ref();
            let padding = seq_len - sequence.len();
            ids.extend(std::iter::repeat_n(pad_id, padding));
            ids.extend_from_slice(sequence);
            pad.push(padding);
        }
        TokenBatch {
            ids,
            batch: sequences.len(),
            seq_len,
            pad,
        }
    }

    /// `copies` copies of one sequence (the batch of an ablation sweep).
    pub fn repeated(ids: &[u32], copies: usize) -> TokenBatch {
        TokenBatch {
            ids: ids.repeat(copies),
            batch: copies,
            seq_len: ids.len(),
            pad: vec![0; copies],
        }
    }

    /// Already padded ids `[batch * seq_len]` with each item's number of left-padding tokens.
    pub fn from_padded(ids: Vec<u32>, batch: usize, pad: Vec<usize>) -> Result<TokenBatch> {
        if batch == 0 || !ids.len().is_multiple_of(batch) || pad.len() != batch {
            return Err(ModelError::InvalidArgument(format!(
                "padded token batch: {} ids, batch {batch} and {} padding lengths do not fit together",
                ids.len(),
                pad.len()
            )));
        }
        let seq_len = ids.len() / batch;
        if let Some(p) = pad.iter().find(|p| **p > seq_len) {
            return Err(ModelError::InvalidArgument(format!(
                "padding of {p} tokens is longer than the sequence length {seq_len}"
            )));
        }
        Ok(TokenBatch {
            ids,
            batch,
            seq_len,
            pad,
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Padded length of every sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Returns all ids, `[batch * seq_len]`, padding included.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Returns the padded row of batch item `b`; an item beyond the batch is an error.
    pub fn row(&self, b: usize) -> Result<&[u32]> {
        if b >= self.batch {
            return Err(ModelError::InvalidArgument(format!(
                "batch item {b} is out of range: the token batch has {} items",
                self.batch
            )));
        }
        Ok(self.padded_row(b))
    }

    /// Returns the real tokens of batch item `b`, without padding; an item beyond the batch is an
    /// error.
    pub fn tokens(&self, b: usize) -> Result<&[u32]> {
        Ok(&self.row(b)?[self.pad[b]..])
    }

    fn padded_row(&self, b: usize) -> &[u32] {
        &self.ids[b * self.seq_len..(b + 1) * self.seq_len]
    }

    /// Number of left-padding tokens of each item.
    pub fn padding(&self) -> &[usize] {
        &self.pad
    }

    /// Checks the batch against the model: no empty sequence, every id below `d_vocab`, and
    /// `cached + seq_len` (the tokens already in a KV cache plus these) at most `max_len`.
    pub(crate) fn validate(&self, d_vocab: usize, cached: usize, max_len: usize) -> Result<()> {
        if self.batch == 0 {
            return Err(ModelError::InvalidArgument(
                "empty batch: give at least one sequence".to_string(),
            ));
        }
        for b in 0..self.batch {
            if self.pad[b] >= self.seq_len {
                return Err(ModelError::EmptyPrompt { item: b });
            }
            for (position, &token) in self.padded_row(b).iter().enumerate().skip(self.pad[b]) {
                if token as usize >= d_vocab {
                    return Err(ModelError::TokenOutOfRange {
                        token,
                        item: b,
                        position,
                        d_vocab,
                    });
                }
            }
        }
        if cached + self.seq_len > max_len {
            return Err(ModelError::PromptTooLong {
                len: cached + self.seq_len,
                max: max_len,
            });
        }
        Ok(())
    }
}

impl From<&[u32]> for TokenBatch {
    fn from(ids: &[u32]) -> TokenBatch {
        TokenBatch::single(ids)
    }
}

impl From<&Vec<u32>> for TokenBatch {
    fn from(ids: &Vec<u32>) -> TokenBatch {
        TokenBatch::single(ids)
    }
}

impl From<Vec<u32>> for TokenBatch {
    fn from(ids: Vec<u32>) -> TokenBatch {
        TokenBatch::single(&ids)
    }
}
