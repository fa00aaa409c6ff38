//! Logits on the device, with the reductions (log-sum-exp, gathers) that keep the full
//! `[pos, d_vocab]` matrix from being read back.

use std::sync::Arc;

use qwenlens_kernels::{Backend, Tensor};

use crate::cache::HostTensor;
use crate::error::{ModelError, Result};
use crate::tokens::TokenBatch;

/// Positions that get logits in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogitRows {
    /// Every position (needed for the loss and per-position log-probs).
    #[default]
    All,
    /// Only each batch item's last position (generation).
    Last,
    /// None (a run that only reads activations).
    None,
}

/// Logits of a run, `[batch, pos, d_vocab]`, kept on the device.
///
/// `pos` is the number of query positions of the pass (all of them for [`LogitRows::All`], 1 for
/// [`LogitRows::Last`]).
#[derive(Clone)]
pub struct Logits {
    tensor: Tensor,
    batch: usize,
    pos: usize,
    padding: Vec<usize>,
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Logits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logits")
            .field("batch", &self.batch)
            .field("pos", &self.pos)
            .field("d_vocab", &self.d_vocab())
            .finish()
    }
}

impl Logits {
    pub(crate) fn new(
        tensor: Tensor,
        batch: usize,
        pos: usize,
        padding: Vec<usize>,
        backend: Arc<dyn Backend>,
    ) -> Logits {
        Logits {
            tensor,
            batch,
            pos,
            padding,
            backend,
        }
    }

    /// Returns the device tensor, `[batch * pos, d_vocab]`.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Number of batch items.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of positions per batch item.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Vocabulary size.
    pub fn d_vocab(&self) -> usize {
        self.tensor.last_dim()
    }

    /// Returns all logits on the host, `[batch, pos, d_vocab]`.
    pub fn to_host(&self) -> Result<HostTensor> {
        let data = self.backend.read(&self.tensor)?;
        HostTensor::new(vec![self.batch, self.pos, self.d_vocab()], data)
    }

    /// Returns the logits row of batch item `b` at position index `p` (`0..pos`).
    pub fn row(&self, b: usize, p: usize) -> Result<Vec<f32>> {
        self.check_item(b)?;
        if p >= self.pos {
            return Err(ModelError::InvalidArgument(format!(
                "logits position {p} is out of range: the logits have {} positions",
                self.pos
            )));
        }
        let row = self
            .backend
            .gather_rows(&self.tensor, &[b * self.pos + p])?;
        Ok(self.backend.read(&row)?)
    }

    /// Returns the last position's logits row of batch item `b`.
    pub fn last(&self, b: usize) -> Result<Vec<f32>> {
        self.row(b, self.pos - 1)
    }

    /// Returns the last position's logits of every batch item, `[batch, d_vocab]`.
    pub fn last_rows(&self) -> Result<HostTensor> {
        let rows: Vec<usize> = (0..self.batch)
            .map(|b| b * self.pos + self.pos - 1)
            .collect();
        let gathered = self.backend.gather_rows(&self.tensor, &rows)?;
        HostTensor::new(
            vec![self.batch, self.d_vocab()],
            self.backend.read(&gathered)?,
        )
    }

    /// `logsumexp` over the vocabulary at every position, `[batch, pos]`.
    pub fn logsumexp(&self) -> Result<HostTensor> {
        let lse = self.backend.logsumexp(&self.tensor)?;
        HostTensor::new(vec![self.batch, self.pos], self.backend.read(&lse)?)
    }

    /// For each batch item, the log-probability of each next token: entry `i` is
    /// `log_softmax(logits[pad + i])[ids[pad + i + 1]]` over the item's real tokens, so an item of
    /// `n` real tokens gives `n − 1` values. `tokens` must be the batch the logits were computed
    /// for.
    pub fn next_token_logprobs(&self, tokens: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        if tokens.batch() != self.batch || tokens.seq_len() != self.pos {
            return Err(ModelError::ShapeMismatch {
                what: "tokens for next-token log-probs (they must be the batch the logits were computed on, with logits at every position)".to_string(),
                expected: vec![self.batch, self.pos],
                found: vec![tokens.batch(), tokens.seq_len()],
            });
        }

        let mut targets = Vec::with_capacity(self.batch * self.pos);
        for b in 0..self.batch {
            let row = tokens.row(b)?;
            for p in 0..self.pos {
                targets.push(if p + 1 < self.pos { row[p + 1] } else { 0 });
            }
        }
        let lse = self.backend.read(&self.backend.logsumexp(&self.tensor)?)?;
        let picked = self
            .backend
            .read(&self.backend.gather_cols(&self.tensor, &targets)?)?;

        let logprobs = (0..self.batch)
            .map(|b| {
                let start = self.padding.get(b).copied().unwrap_or(0);
                (start..self.pos.saturating_sub(1))
                    .map(|p| picked[b * self.pos + p] - lse[b * self.pos + p])
                    .collect()
            })
            .collect();
        Ok(logprobs)
    }

    /// TransformerLens's `lm_cross_entropy_loss` for each batch item: the mean over the item's real
    /// positions but the last of `−log_softmax(logits[i])[ids[i + 1]]`. An item of one real token
    /// has no next token to predict, which is an error.
    pub fn loss(&self, tokens: &TokenBatch) -> Result<Vec<f32>> {
        let logprobs = self.next_token_logprobs(tokens)?;
        if let Some(b) = logprobs.iter().position(Vec::is_empty) {
            return Err(ModelError::InvalidArgument(format!(
                "the loss of batch item {b} is undefined: it has one real token, so there is no \
                 next token to predict; give at least two tokens"
            )));
        }

        Ok(logprobs
            .iter()
            .map(|values| -values.iter().sum::<f32>() / values.len() as f32)
            .collect())
    }

    fn check_item(&self, b: usize) -> Result<()> {
        if b >= self.batch {
            return Err(ModelError::InvalidArgument(format!(
                "batch item {b} is out of range: the logits have {} items",
                self.batch
            )));
        }
        Ok(())
    }
}
