//! Grouped-query attention: scores, softmax, pattern overrides and z, in one command buffer.

use crate::{AttentionOutput, AttentionParams, PatternOverride, Result, Tensor};

use super::GpuBackend;

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
        p.validate(q, k, v, overrides)?;

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
