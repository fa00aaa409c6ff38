//! Normalization, rotary embedding, element-wise and row kernels.

use crate::{KernelError, Result, Tensor, Weight};

use super::GpuBackend;

fn shape_error(op: &'static str, detail: String) -> KernelError {
    KernelError::Shape { op, detail }
}

impl GpuBackend {
    pub(super) fn rms_norm_impl(&self, x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let op = "rms_norm";
        let d = x.last_dim();
        if x.shape().is_empty() || d == 0 {
            return Err(shape_error(
                op,
                format!("x {:?} needs a non-empty last dimension", x.shape()),
            ));
        }

        let rows = x.rows();
        let mut scale_shape = x.shape().to_vec();
        *scale_shape.last_mut().expect("x has a last dimension") = 1;
        let normed = self.ctx.new_tensor(op, x.shape().to_vec())?;
        let scale = self.ctx.new_tensor(op, scale_shape)?;

        let x_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, x)?)?;
        let normed_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &normed)?)?;
        let scale_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &scale)?)?;
        let params = [rows as u32, d as u32, eps.to_bits(), 0];
        let grid = self.ctx.grid(op, rows, 64)?;

        let mut encoder = self.ctx.encoder();
        self.ctx.dispatch(
            &mut encoder,
            &self.pipelines.rms_norm,
            &[(0, &x_window), (1, &normed_window), (2, &scale_window)],
            3,
            &params,
            grid,
        );
        self.ctx.submit(encoder);
        Ok((normed, scale))
    }

    pub(super) fn mul_weight_impl(&self, x: &Tensor, w: &Weight) -> Result<Tensor> {
        let op = "mul_weight";
        let d = x.last_dim();
        if x.shape().is_empty() || w.shape() != [d] {
            return Err(shape_error(
                op,
                format!(
                    "weight {:?} must be [{d}], the last dimension of x {:?}",
                    w.shape(),
                    x.shape()
                ),
            ));
        }

        let out = self.ctx.new_tensor(op, x.shape().to_vec())?;
        if d == 0 || x.numel() == 0 {
            return Ok(out);
        }

        let x_buffer = self.ctx.tensor_buffer(op, x)?;
        let out_buffer = self.ctx.tensor_buffer(op, &out)?;
        let w_window = self.ctx.whole(op, self.ctx.weight_single(op, w)?)?;
        let pipeline = self.pipelines.mul_weight.get(w.dtype());

        let mut encoder = self.ctx.encoder();
        for (first, count) in self.ctx.row_windows(op, x.rows(), d)? {
            let x_window = self.ctx.window(op, x_buffer, first * d, count * d)?;
            let out_window = self.ctx.window(op, out_buffer, first * d, count * d)?;
            let params = [(count * d) as u32, d as u32, x_window.base, out_window.base];
            let grid = self.ctx.grid(op, count * d, 64)?;
            self.ctx.dispatch(
                &mut encoder,
                pipeline,
                &[(4, &x_window), (5, &w_window), (6, &out_window)],
                7,
                &params,
                grid,
            );
        }
        self.ctx.submit(encoder);
        Ok(out)
    }

    pub(super) fn rope_impl(&self, x: &Tensor, positions: &[u32], theta: f32) -> Result<Tensor> {
        let op = "rope";
        let [rows, n_heads, d_head] = x.shape() else {
            return Err(shape_error(
                op,
                format!("x must be [rows, n_heads, d_head], got {:?}", x.shape()),
            ));
        };
        let (rows, n_heads, d_head) = (*rows, *n_heads, *d_head);
        if d_head % 2 != 0 {
            return Err(shape_error(op, format!("d_head {d_head} must be even")));
        }
        if positions.len() != rows {
            return Err(shape_error(
                op,
                format!(
                    "{} positions given for {rows} rows of x {:?}",
                    positions.len(),
                    x.shape()
                ),
            ));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(shape_error(
                op,
                format!("rope theta {theta} must be positive and finite"),
            ));
        }

        let out = self.ctx.new_tensor(op, x.shape().to_vec())?;
        let half = d_head / 2;
        if x.numel() == 0 {
            return Ok(out);
        }

        // The angle is an f32 product, as in Hugging Face transformers. Its cos and sin are computed on
        // the host because GPU sin/cos lose accuracy on the large angles of late positions.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| f64::from(theta).powf(-2.0 * i as f64 / d_head as f64) as f32)
            .collect();
        let mut cos_sin = Vec::with_capacity(rows * half * 2);
        for &position in positions {
            for &freq in &inv_freq {
                let angle = f64::from(position as f32 * freq);
                cos_sin.push(angle.cos() as f32);
                cos_sin.push(angle.sin() as f32);
            }
        }

        let x_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, x)?)?;
        let out_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &out)?)?;
        let table = self.ctx.upload_f32("rope cos/sin", &cos_sin)?;
        let table_window = self.ctx.whole(op, &table)?;
        let params = [rows as u32, n_heads as u32, d_head as u32, 0];
        let grid = self.ctx.grid(op, rows * n_heads * half, 64)?;

        let mut encoder = self.ctx.encoder();
        self.ctx.dispatch(
            &mut encoder,
            &self.pipelines.rope,
            &[(0, &x_window), (1, &table_window), (2, &out_window)],
            3,
            &params,
            grid,
        );
        self.ctx.submit(encoder);
        Ok(out)
    }

    /// Runs one kernel of `elementwise.wgsl` over equally shaped operands, window by window.
    pub(super) fn elementwise(
        &self,
        op: &'static str,
        pipeline: &wgpu::ComputePipeline,
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
    ) -> Result<Tensor> {
        for other in std::iter::once(b).chain(c) {
            if other.shape() != a.shape() {
                return Err(shape_error(
                    op,
                    format!(
                        "operands must have equal shapes, got {:?} and {:?}",
                        a.shape(),
                        other.shape()
                    ),
                ));
            }
        }

        let out = self.ctx.new_tensor(op, a.shape().to_vec())?;
        let numel = a.numel();
        let buffers = [
            Some(self.ctx.tensor_buffer(op, a)?),
            Some(self.ctx.tensor_buffer(op, b)?),
            c.map(|c| self.ctx.tensor_buffer(op, c)).transpose()?,
        ];
        let out_buffer = self.ctx.tensor_buffer(op, &out)?;

        let mut encoder = self.ctx.encoder();
        for (first, count) in self.ctx.row_windows(op, numel, 1)? {
            // Every operand has the same size, so its window starts at the same aligned offset.
            let mut windows = Vec::new();
            for (binding, buffer) in buffers.iter().enumerate() {
                if let Some(buffer) = buffer {
                    windows.push((binding as u32, self.ctx.window(op, buffer, first, count)?));
                }
            }
            let out_window = self.ctx.window(op, out_buffer, first, count)?;
            let base = out_window.base;
            windows.push((3, out_window));

            let bindings: Vec<(u32, &_)> = windows
                .iter()
                .map(|(binding, window)| (*binding, window))
                .collect();
            let grid = self.ctx.grid(op, count, 64)?;
            self.ctx.dispatch(
                &mut encoder,
                pipeline,
                &bindings,
                4,
                &[count as u32, base, 0, 0],
                grid,
            );
        }
        self.ctx.submit(encoder);
        Ok(out)
    }

    pub(super) fn concat_seq_impl(
        &self,
        cache: &Tensor,
        new: &Tensor,
        batch: usize,
    ) -> Result<Tensor> {
        let op = "concat_seq";
        if batch == 0 {
            return Err(shape_error(op, "batch must be at least 1".to_owned()));
        }
        let (Some((&cache_rows, cache_rest)), Some((&new_rows, new_rest))) =
            (cache.shape().split_first(), new.shape().split_first())
        else {
            return Err(shape_error(
                op,
                "cache and new need a sequence dimension".to_owned(),
            ));
        };
        if cache_rest != new_rest || cache_rows % batch != 0 || new_rows % batch != 0 {
            return Err(shape_error(
                op,
                format!(
                    "cache {:?} and new {:?} must be [batch * t, ...] and [batch * n, ...] with equal trailing dimensions and batch = {batch}",
                    cache.shape(),
                    new.shape()
                ),
            ));
        }

        let (t, n) = (cache_rows / batch, new_rows / batch);
        let row_len: usize = cache_rest.iter().product();
        let mut out_shape = vec![cache_rows + new_rows];
        out_shape.extend_from_slice(cache_rest);
        let out = self.ctx.new_tensor(op, out_shape)?;

        let cache_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, cache)?)?;
        let new_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, new)?)?;
        let out_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &out)?)?;
        let params = [batch as u32, t as u32, n as u32, row_len as u32];
        let grid = self.ctx.grid(op, batch * (t + n) * row_len, 64)?;

        let mut encoder = self.ctx.encoder();
        self.ctx.dispatch(
            &mut encoder,
            &self.pipelines.concat_seq,
            &[(0, &cache_window), (1, &new_window), (2, &out_window)],
            3,
            &params,
            grid,
        );
        self.ctx.submit(encoder);
        Ok(out)
    }

    pub(super) fn gather_rows_impl(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let op = "gather_rows";
        if x.shape().is_empty() {
            return Err(shape_error(
                op,
                "x must have at least one dimension".to_owned(),
            ));
        }
        let (n_rows, row_len) = (x.rows(), x.last_dim());
        if let Some(&row) = rows.iter().find(|&&row| row >= n_rows) {
            return Err(KernelError::OutOfRange {
                op,
                what: "row",
                value: row,
                limit: n_rows,
            });
        }

        let out = self.ctx.new_tensor(op, vec![rows.len(), row_len])?;
        if rows.is_empty() || row_len == 0 {
            return Ok(out);
        }

        let indices: Vec<u32> = rows.iter().map(|&row| row as u32).collect();
        let index_buffer = self.ctx.upload_u32("row indices", &indices)?;
        let index_window = self.ctx.whole(op, &index_buffer)?;
        let out_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &out)?)?;
        let x_buffer = self.ctx.tensor_buffer(op, x)?;
        let grid = self.ctx.grid(op, rows.len() * row_len, 64)?;

        let mut encoder = self.ctx.encoder();
        for (first, count) in self.ctx.row_windows(op, n_rows, row_len)? {
            // Skip windows no requested row falls in.
            if !rows
                .iter()
                .any(|&row| (first..first + count).contains(&row))
            {
                continue;
            }
            let x_window = self
                .ctx
                .window(op, x_buffer, first * row_len, count * row_len)?;
            let params = [
                rows.len() as u32,
                row_len as u32,
                first as u32,
                count as u32,
                x_window.base,
            ];
            self.ctx.dispatch(
                &mut encoder,
                &self.pipelines.gather_rows,
                &[(4, &x_window), (5, &index_window), (6, &out_window)],
                7,
                &params,
                grid,
            );
        }
        self.ctx.submit(encoder);
        Ok(out)
    }

    pub(super) fn gather_cols_impl(&self, x: &Tensor, cols: &[u32]) -> Result<Tensor> {
        let op = "gather_cols";
        if x.shape().is_empty() {
            return Err(shape_error(
                op,
                "x must have at least one dimension".to_owned(),
            ));
        }
        let (n_rows, row_len) = (x.rows(), x.last_dim());
        if cols.len() != n_rows {
            return Err(shape_error(
                op,
                format!(
                    "{} columns given for the {n_rows} rows of x {:?}",
                    cols.len(),
                    x.shape()
                ),
            ));
        }
        if let Some(&col) = cols.iter().find(|&&col| col as usize >= row_len) {
            return Err(KernelError::OutOfRange {
                op,
                what: "column",
                value: col as usize,
                limit: row_len,
            });
        }

        let out = self.ctx.new_tensor(op, vec![n_rows])?;
        if n_rows == 0 {
            return Ok(out);
        }

        let col_buffer = self.ctx.upload_u32("column indices", cols)?;
        let col_window = self.ctx.whole(op, &col_buffer)?;
        let out_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &out)?)?;
        let x_buffer = self.ctx.tensor_buffer(op, x)?;

        let mut encoder = self.ctx.encoder();
        for (first, count) in self.ctx.row_windows(op, n_rows, row_len)? {
            let x_window = self
                .ctx
                .window(op, x_buffer, first * row_len, count * row_len)?;
            let params = [
                n_rows as u32,
                row_len as u32,
                first as u32,
                count as u32,
                x_window.base,
            ];
            let grid = self.ctx.grid(op, count, 64)?;
            self.ctx.dispatch(
                &mut encoder,
                &self.pipelines.gather_cols,
                &[(8, &x_window), (9, &col_window), (10, &out_window)],
                11,
                &params,
                grid,
            );
        }
        self.ctx.submit(encoder);
        Ok(out)
    }

    pub(super) fn logsumexp_impl(&self, x: &Tensor) -> Result<Tensor> {
        let op = "logsumexp";
        if x.shape().is_empty() || x.last_dim() == 0 {
            return Err(shape_error(
                op,
                format!("x {:?} needs a non-empty last dimension", x.shape()),
            ));
        }
        let (n_rows, row_len) = (x.rows(), x.last_dim());
        let out = self.ctx.new_tensor(op, vec![n_rows])?;

        let out_window = self.ctx.whole(op, self.ctx.tensor_buffer(op, &out)?)?;
        let x_buffer = self.ctx.tensor_buffer(op, x)?;

        let mut encoder = self.ctx.encoder();
        for (first, count) in self.ctx.row_windows(op, n_rows, row_len)? {
            let x_window = self
                .ctx
                .window(op, x_buffer, first * row_len, count * row_len)?;
            let params = [
                n_rows as u32,
                row_len as u32,
                first as u32,
                count as u32,
                x_window.base,
            ];
            // One workgroup per row.
            let grid = self.ctx.grid(op, count, 1)?;
            self.ctx.dispatch(
                &mut encoder,
                &self.pipelines.logsumexp,
                &[(12, &x_window), (13, &out_window)],
                14,
                &params,
                grid,
            );
        }
        self.ctx.submit(encoder);
        Ok(out)
    }
}
