//! Grouped-query attention: scores, softmax, pattern overrides and z, in one command buffer.

use crate::{AttentionOutput, AttentionParams, KernelError, PatternOverride, Result, Tensor};

use super::GpuBackend;

fn check_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttentionParams,
    overrides: &[PatternOverride],
) -> Result<()> {
    let op = "attention";
    let shape_error = |detail: String| Err(KernelError::Shape { op, detail });

    if p.batch == 0 || p.n_heads == 0 || p.n_kv_heads == 0 || p.d_head == 0 {
        return shape_error(format!(
            "batch ({}), n_heads ({}), n_kv_heads ({}) and d_head ({}) must be positive",
            p.batch, p.n_heads, p.n_kv_heads, p.d_head
        ));
    }
    if !p.n_heads.is_multiple_of(p.n_kv_heads) {
        return shape_error(format!(
            "n_heads {} is not a multiple of n_kv_heads {}",
            p.n_heads, p.n_kv_heads
        ));
    }
    if p.q_len > p.kv_len {
        return shape_error(format!("q_len {} exceeds kv_len {}", p.q_len, p.kv_len));
    }
    if q.numel() != p.batch * p.q_len * p.n_heads * p.d_head {
        return shape_error(format!(
            "q {:?} is not [batch * q_len, n_heads, d_head] = [{} * {}, {}, {}]",
            q.shape(),
            p.batch,
            p.q_len,
            p.n_heads,
            p.d_head
        ));
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.numel() != p.batch * p.kv_len * p.n_kv_heads * p.d_head {
            return shape_error(format!(
                "{name} {:?} is not [batch * kv_len, n_kv_heads, d_head] = [{} * {}, {}, {}]",
                t.shape(),
                p.batch,
                p.kv_len,
                p.n_kv_heads,
                p.d_head
            ));
        }
    }
    if p.key_start.len() != p.batch {
        return shape_error(format!(
            "key_start has {} entries for batch {}",
            p.key_start.len(),
            p.batch
        ));
    }
    if let Some(&start) = p.key_start.iter().find(|&&start| start > p.kv_len) {
        return Err(KernelError::OutOfRange {
            op,
            what: "key_start",
            value: start,
            limit: p.kv_len + 1,
        });
    }
    for (index, o) in overrides.iter().enumerate() {
        if overrides[..index]
            .iter()
            .any(|earlier| earlier.head == o.head)
        {
            return shape_error(format!(
                "two pattern overrides for head {}; give at most one per head",
                o.head
            ));
        }
        if o.head >= p.n_heads {
            return Err(KernelError::OutOfRange {
                op,
                what: "override head",
                value: o.head,
                limit: p.n_heads,
            });
        }
        if o.pattern.numel() != p.batch * p.q_len * p.kv_len {
            return shape_error(format!(
                "override pattern of head {} is {:?}, expected [batch, q_len, kv_len] = [{}, {}, {}]",
                o.head,
                o.pattern.shape(),
                p.batch,
                p.q_len,
                p.kv_len
            ));
        }
    }
    Ok(())
}

impl GpuBackend {
    pub(super) fn attention_impl(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        overrides: &[PatternOverride],
    ) -> Result<AttentionOutput> {
        let op = "attention";
        check_shapes(q, k, v, p, overrides)?;

        let map_shape = vec![p.batch, p.n_heads, p.q_len, p.kv_len];
        let scores = self.ctx.new_tensor(op, map_shape.clone())?;
        let pattern = self.ctx.new_tensor(op, map_shape)?;
        let z = self
            .ctx
            .new_tensor(op, vec![p.batch * p.q_len, p.n_heads, p.d_head])?;

        let q_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, q)?)?;
        let k_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, k)?)?;
        let v_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, v)?)?;
        // NOTE: scores and pattern are bound whole, so batch · n_heads · q_len · kv_len f32 values must
        // fit one storage binding (128 MiB on lavapipe: about 2.4 M entries per head for 14 heads).
        let scores_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &scores)?)?;
        let pattern_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &pattern)?)?;
        let z_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &z)?)?;
        let key_start: Vec<u32> = p.key_start.iter().map(|&start| start as u32).collect();
        let key_start_buffer = self.ctx.upload_u32("key_start", &key_start)?;
        let key_start_window = self.ctx.whole(op, &key_start_buffer)?;

        let params = |head: usize| {
            [
                p.batch as u32,
                p.q_len as u32,
                p.kv_len as u32,
                p.n_heads as u32,
                p.n_kv_heads as u32,
                p.d_head as u32,
                p.scale.to_bits(),
                head as u32,
            ]
        };
        let map_len = p.batch * p.n_heads * p.q_len * p.kv_len;

        let mut encoder = self.ctx.encoder();
        self.ctx.dispatch(
            &mut encoder,
            &self.pipelines.attn_scores,
            &[
                (0, &q_window),
                (1, &k_window),
                (2, &key_start_window),
                (3, &scores_window),
            ],
            4,
            &params(0),
            self.ctx.grid(op, map_len, 64)?,
        );
        self.ctx.dispatch(
            &mut encoder,
            &self.pipelines.attn_softmax,
            &[(5, &scores_window), (6, &pattern_window)],
            4,
            &params(0),
            self.ctx.grid(op, p.batch * p.n_heads * p.q_len, 64)?,
        );

        // Overrides stay on the device.
        for o in overrides {
            let replacement_window = self
                .ctx
                .whole(op, self.ctx.tensor_buffer(op, &o.pattern)?)?;
            self.ctx.dispatch(
                &mut encoder,
                &self.pipelines.apply_override,
                &[(7, &replacement_window), (6, &pattern_window)],
                4,
                &params(o.head),
                self.ctx.grid(op, p.batch * p.q_len * p.kv_len, 64)?,
            );
        }

        self.ctx.dispatch(
            &mut encoder,
            &self.pipelines.attn_z,
            &[(6, &pattern_window), (8, &v_window), (9, &z_window)],
            4,
            &params(0),
            self.ctx.grid(op, z.numel(), 64)?,
        );
        self.ctx.submit(encoder);

        Ok(AttentionOutput {
            z,
            scores: p.want_scores.then_some(scores),
            pattern: p.want_pattern.then_some(pattern),
        })
    }
}
