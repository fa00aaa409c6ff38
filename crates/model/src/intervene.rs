//! Interventions at per-position hooks, executed on the device: masks and replacement values are
//! built on the host, uploaded, and applied with the backend's `select` and `add`.

use qwenlens_kernels::Tensor;

use crate::cache::HostTensor;
use crate::error::{ModelError, Result};
use crate::forward::Pass;
use crate::hooks::HookPoint;
use crate::interventions::{Intervention, Scope};

impl Pass<'_> {
    /// Applies the interventions of one hook in order.
    ///
    /// Runs of head ablations (zero or mean) are merged into one `select` when the result cannot
    /// depend on their order, so an ablation sweep over a batch of B copies costs one upload per
    /// hook instead of B.
    pub(crate) fn intervene_all(
        &self,
        point: HookPoint,
        interventions: &[&Intervention],
        x: Tensor,
    ) -> Result<Tensor> {
        let mut x = x;
        let mut index = 0;
        while index < interventions.len() {
            let group = ablation_group(&interventions[index..]);
            if group > 0 {
                x = self.ablate_heads(&interventions[index..index + group], &x)?;
                index += group;
            } else {
                x = self.intervene(point, interventions[index], &x)?;
                index += 1;
            }
        }
        Ok(x)
    }

    /// Zero- and mean-ablates head blocks (`[rows, heads, d_head]` activations) with one `select`.
    /// The means are taken over the real positions of each batch item of `x` as it enters the group.
    fn ablate_heads(&self, group: &[&Intervention], x: &Tensor) -> Result<Tensor> {
        let rows = self.rows();
        let width = x.numel() / rows.max(1);
        let d_head = self.model().config().d_head();
        let needs_values = group
            .iter()
            .any(|i| matches!(i, Intervention::MeanAblateHeadZ { .. }));
        let values = if needs_values {
            Some(self.backend().read(x)?)
        } else {
            None
        };

        let mut mask = vec![0.0f32; rows * width];
        let mut replacement = vec![0.0f32; rows * width];
        for intervention in group {
            let (head, scope) = head_ablation(intervention).expect("groups hold head ablations");
            let columns = head * d_head..(head + 1) * d_head;

            for b in (0..self.batch).filter(|b| scope.has_item(*b)) {
                let item_rows: Vec<usize> = (b * self.q_len..(b + 1) * self.q_len)
                    .filter(|r| !self.is_padding_row(*r))
                    .collect();
                let mean = values
                    .as_ref()
                    .filter(|_| matches!(intervention, Intervention::MeanAblateHeadZ { .. }))
                    .map(|values| column_mean(values, &item_rows, width, columns.clone()));

                for row in item_rows.iter().filter(|r| self.row_in_scope(scope, **r)) {
                    let range = row * width + columns.start..row * width + columns.end;
                    mask[range.clone()].fill(1.0);
                    if let Some(mean) = &mean {
                        replacement[range].copy_from_slice(mean);
                    }
                }
            }
        }
        self.select(&mask, x, &replacement)
    }

    /// Applies one intervention other than a head ablation.
    fn intervene(
        &self,
        point: HookPoint,
        intervention: &Intervention,
        x: &Tensor,
    ) -> Result<Tensor> {
        match intervention {
            Intervention::ZeroHeadZ { .. }
            | Intervention::ZeroKvHeadV { .. }
            | Intervention::MeanAblateHeadZ { .. } => self.ablate_heads(&[intervention], x),

            Intervention::AddToHook { vector, scope, .. } => {
                let rows = self.rows();
                let width = x.numel() / rows.max(1);
                let mut delta = vec![0.0f32; rows * width];
                for row in (0..rows).filter(|r| self.row_in_scope(scope, *r)) {
                    delta[row * width..(row + 1) * width].copy_from_slice(vector);
                }
                let delta = self.backend().upload(&delta, x.shape())?;
                Ok(self.backend().add(x, &delta)?)
            }

            Intervention::PatchFromCache {
                source,
                heads,
                scope,
                ..
            } => {
                let (mask, replacement) =
                    self.patch_rows(point, source, heads.as_deref(), scope)?;
                self.select(&mask, x, &replacement)
            }

            Intervention::ReplacePattern { .. } => Err(ModelError::InvalidArgument(format!(
                "pattern replacement reached `{point}`; it acts only at hook_pattern"
            ))),
        }
    }

    /// Builds the mask and replacement values that copy `source` (TransformerLens shape `[batch or
    /// 1, pos ≥ kv_len, ...]`) into the in-scope rows of a per-position activation.
    fn patch_rows(
        &self,
        point: HookPoint,
        source: &HostTensor,
        heads: Option<&[usize]>,
        scope: &Scope,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let tl_shape = self.tl_shape(point);
        let inner = &tl_shape[2..];
        let width: usize = inner.iter().product();
        let shape_error = || ModelError::ShapeMismatch {
            what: format!(
                "patch source for `{point}` (batch {} or 1, at least {} positions)",
                self.batch,
                self.kv_len()
            ),
            expected: [vec![self.batch, self.kv_len()], inner.to_vec()].concat(),
            found: source.shape.clone(),
        };
        if source.shape.len() != tl_shape.len()
            || source.shape[2..] != *inner
            || (source.shape[0] != self.batch && source.shape[0] != 1)
            || source.shape[1] < self.kv_len()
        {
            return Err(shape_error());
        }

        let source_pos = source.shape[1];
        let rows = self.rows();
        let mut mask = vec![0.0f32; rows * width];
        let mut replacement = vec![0.0f32; rows * width];
        let (blocks, block_width) = match heads {
            Some(heads) => (heads.to_vec(), inner[1]),
            None => (vec![0], width),
        };
        for row in (0..rows).filter(|r| self.row_in_scope(scope, *r)) {
            let (b, i) = (row / self.q_len, row % self.q_len);
            let source_b = if source.shape[0] == 1 { 0 } else { b };
            let from = (source_b * source_pos + self.first + i) * width;
            let to = row * width;
            for block in &blocks {
                let range = block * block_width..(block + 1) * block_width;
                mask[to + range.start..to + range.end].fill(1.0);
                replacement[to + range.start..to + range.end]
                    .copy_from_slice(&source.data[from + range.start..from + range.end]);
            }
        }
        Ok((mask, replacement))
    }

    fn select(&self, mask: &[f32], x: &Tensor, replacement: &[f32]) -> Result<Tensor> {
        let backend = self.backend();
        let mask = backend.upload(mask, x.shape())?;
        let replacement = backend.upload(replacement, x.shape())?;
        Ok(backend.select(&mask, x, &replacement)?)
    }
}

/// The head and scope of a zero or mean head ablation.
fn head_ablation(intervention: &Intervention) -> Option<(usize, &Scope)> {
    match intervention {
        Intervention::ZeroHeadZ { head, scope, .. }
        | Intervention::MeanAblateHeadZ { head, scope, .. }
        | Intervention::ZeroKvHeadV {
            kv_head: head,
            scope,
            ..
        } => Some((*head, scope)),
        _ => None,
    }
}

/// Returns how many leading interventions form a group of head ablations whose order does not
/// matter: no mean ablation shares a head and a batch item with another member, because a mean
/// taken after another ablation of the same head would differ.
fn ablation_group(interventions: &[&Intervention]) -> usize {
    let mut length = 0;
    for (index, candidate) in interventions.iter().enumerate() {
        let Some((head, scope)) = head_ablation(candidate) else {
            break;
        };
        let candidate_is_mean = matches!(candidate, Intervention::MeanAblateHeadZ { .. });
        let conflicts = interventions[..index].iter().any(|member| {
            let (member_head, member_scope) = head_ablation(member).expect("members are ablations");
            let either_mean =
                candidate_is_mean || matches!(member, Intervention::MeanAblateHeadZ { .. });
            either_mean && member_head == head && items_overlap(scope, member_scope)
        });
        if conflicts {
            break;
        }
        length += 1;
    }
    length
}

fn items_overlap(a: &Scope, b: &Scope) -> bool {
    match (&a.batch, &b.batch) {
        (Some(a), Some(b)) => a.iter().any(|item| b.contains(item)),
        _ => true,
    }
}

/// Mean over `rows` of the columns `columns` of a `[rows, width]` matrix (accumulated in f64).
fn column_mean(
    values: &[f32],
    rows: &[usize],
    width: usize,
    columns: std::ops::Range<usize>,
) -> Vec<f32> {
    let mut sum = vec![0.0f64; columns.len()];
    for row in rows {
        let slice = &values[row * width + columns.start..row * width + columns.end];
        sum.iter_mut()
            .zip(slice)
            .for_each(|(s, v)| *s += f64::from(*v));
    }
    let count = rows.len().max(1) as f64;
    sum.iter().map(|s| (s / count) as f32).collect()
}
