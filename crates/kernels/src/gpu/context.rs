//! Device state shared by the kernels: buffers, binding windows, dispatches, error scopes, readback.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wgpu::util::DeviceExt;

use crate::{DType, KernelError, Result, Tensor, Weight};

use super::adapter::Opened;

/// Source of the ids that tie tensors to the backend that created them.
static NEXT_BACKEND_ID: AtomicU64 = AtomicU64::new(1);

/// Storage of a GPU [`Tensor`]: an f32 buffer of at least 4 bytes.
pub(super) struct GpuTensor {
    backend_id: u64,
    pub buffer: wgpu::Buffer,
}

/// Storage of a GPU [`Weight`]: consecutive row chunks, each its own buffer within the binding limit.
pub(super) struct GpuWeight {
    backend_id: u64,
    pub chunks: Vec<WeightChunk>,
}

/// Rows `row_start .. row_start + rows` of a weight, in its stored dtype, padded to whole `u32`s.
pub(super) struct WeightChunk {
    pub row_start: usize,
    pub rows: usize,
    pub buffer: wgpu::Buffer,
}

/// A binding of part of an f32 buffer: it starts at an aligned byte `offset` and the wanted elements
/// begin at element `base` inside it.
pub(super) struct Window<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    pub base: u32,
}

impl Window<'_> {
    pub fn resource(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.size),
        })
    }
}

/// The opened device with its limits.
pub(super) struct Context {
    id: u64,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Maximum bytes of one storage binding in use.
    pub max_binding: u64,
}

impl Context {
    pub fn new(opened: Opened, max_binding_bytes: Option<u64>) -> Result<Self> {
        let Opened {
            info,
            device,
            queue,
        } = opened;
        let limits = device.limits();

        let device_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding = max_binding_bytes.map_or(device_max, |bytes| bytes.min(device_max));
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        if max_binding < 2 * align {
            return Err(KernelError::Gpu(format!(
                "max_binding_bytes {max_binding} is too small: windows need at least twice the offset alignment ({align} bytes)"
            )));
        }

        // Errors outside an error scope (there should be none) are logged instead of wgpu's default
        // panic.
        device.on_uncaptured_error(Arc::new(
            |err| tracing::error!(%err, "uncaptured wgpu error"),
        ));

        Ok(Self {
            id: NEXT_BACKEND_ID.fetch_add(1, Ordering::Relaxed),
            device,
            queue,
            info,
            limits,
            max_binding,
        })
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns a captured wgpu error into
    /// [`KernelError::Gpu`].
    pub fn scoped<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);

        let result = f();

        let validation_error = pollster::block_on(validation_scope.pop());
        let oom_error = pollster::block_on(oom_scope.pop());
        if let Some(err) = oom_error {
            return Err(KernelError::Gpu(format!(
                "{op}: out of device memory: {err}"
            )));
        }
        if let Some(err) = validation_error {
            return Err(KernelError::Gpu(format!("{op}: {err}")));
        }
        result
    }

    /// Returns the buffer of a tensor created by this backend.
    pub fn tensor_buffer<'a>(&self, op: &'static str, x: &'a Tensor) -> Result<&'a wgpu::Buffer> {
        match x.storage::<GpuTensor>() {
            Some(storage) if storage.backend_id == self.id => Ok(&storage.buffer),
            _ => Err(KernelError::WrongBackend {
                op,
                expected: "this GPU backend",
            }),
        }
    }

    /// Returns the chunks of a weight created by this backend.
    pub fn weight_chunks<'a>(&self, op: &'static str, w: &'a Weight) -> Result<&'a [WeightChunk]> {
        match w.storage::<GpuWeight>() {
            Some(storage) if storage.backend_id == self.id => Ok(&storage.chunks),
            _ => Err(KernelError::WrongBackend {
                op,
                expected: "this GPU backend",
            }),
        }
    }

    /// Returns the single buffer of a weight that must fit one binding (a norm weight or a bias).
    pub fn weight_single<'a>(&self, op: &'static str, w: &'a Weight) -> Result<&'a wgpu::Buffer> {
        let chunks = self.weight_chunks(op, w)?;
        match chunks {
            [chunk] => Ok(&chunk.buffer),
            _ => Err(KernelError::DeviceLimit {
                op,
                bytes: (w.numel() * w.dtype().size_in_bytes()) as u64,
                limit: self.max_binding,
            }),
        }
    }

    fn create_f32_buffer(&self, op: &'static str, numel: usize) -> Result<wgpu::Buffer> {
        let bytes = (numel.max(1) * 4) as u64;
        if bytes > self.limits.max_buffer_size {
            return Err(KernelError::DeviceLimit {
                op,
                bytes,
                limit: self.limits.max_buffer_size,
            });
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(op),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// Creates a zero-filled tensor.
    pub fn new_tensor(&self, op: &'static str, shape: Vec<usize>) -> Result<Tensor> {
        let buffer = self.create_f32_buffer(op, shape.iter().product())?;
        Ok(self.wrap(shape, buffer))
    }

    fn wrap(&self, shape: Vec<usize>, buffer: wgpu::Buffer) -> Tensor {
        Tensor::new(
            shape,
            Arc::new(GpuTensor {
                backend_id: self.id,
                buffer,
            }),
        )
    }

    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(KernelError::Shape {
                op: "upload",
                detail: format!(
                    "shape {shape:?} holds {numel} values but {} were given",
                    data.len()
                ),
            });
        }

        let buffer = self.create_f32_buffer("upload", numel)?;
        if numel > 0 {
            self.queue
                .write_buffer(&buffer, 0, bytemuck::cast_slice(data));
        }
        Ok(self.wrap(shape.to_vec(), buffer))
    }

    /// Uploads `u32`s (token ids, indices) to a read-only storage buffer of at least one element.
    pub fn upload_u32(&self, label: &'static str, data: &[u32]) -> Result<wgpu::Buffer> {
        self.upload_words(label, if data.is_empty() { &[0] } else { data })
    }

    /// Uploads `f32`s to a read-only storage buffer of at least one element.
    pub fn upload_f32(&self, label: &'static str, data: &[f32]) -> Result<wgpu::Buffer> {
        self.upload_words(
            label,
            if data.is_empty() {
                &[0.0]
            } else {
                bytemuck::cast_slice(data)
            },
        )
    }

    fn upload_words<T: bytemuck::Pod>(
        &self,
        label: &'static str,
        data: &[T],
    ) -> Result<wgpu::Buffer> {
        let bytes = std::mem::size_of_val(data) as u64;
        if bytes > self.max_binding {
            return Err(KernelError::DeviceLimit {
                op: label,
                bytes,
                limit: self.max_binding,
            });
        }
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE,
            }))
    }

    /// Copies a weight in row chunks that each fit one storage binding.
    pub fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Weight> {
        let op = "upload_weight";
        let numel: usize = shape.iter().product();
        let elem = dtype.size_in_bytes();
        if bytes.len() != numel * elem {
            return Err(KernelError::ByteLength {
                op,
                shape: shape.to_vec(),
                expected: numel * elem,
                found: bytes.len(),
            });
        }

        let row_len = shape.last().copied().unwrap_or(1);
        let rows = numel.checked_div(row_len).unwrap_or(0);
        let row_bytes = (row_len * elem) as u64;
        // Keep 4 bytes spare for the padding of an odd number of half-precision values.
        let rows_per_chunk = (self.max_binding - 4)
            .checked_div(row_bytes)
            .map_or(rows.max(1), |rows| rows as usize);
        if rows_per_chunk == 0 {
            return Err(KernelError::DeviceLimit {
                op,
                bytes: row_bytes,
                limit: self.max_binding,
            });
        }

        let mut chunks = Vec::new();
        let mut row_start = 0;
        loop {
            let chunk_rows = rows_per_chunk.min(rows - row_start);
            let data =
                &bytes[row_start * row_len * elem..(row_start + chunk_rows) * row_len * elem];
            chunks.push(WeightChunk {
                row_start,
                rows: chunk_rows,
                buffer: self.create_padded(op, data),
            });
            row_start += chunk_rows;
            if row_start >= rows {
                break;
            }
        }

        tracing::trace!(?shape, %dtype, chunks = chunks.len(), "uploaded weight");
        Ok(Weight::new(
            shape.to_vec(),
            dtype,
            Arc::new(GpuWeight {
                backend_id: self.id,
                chunks,
            }),
        ))
    }

    /// Creates a read-only storage buffer with `data` padded with zeros to whole `u32`s (at least one).
    fn create_padded(&self, label: &'static str, data: &[u8]) -> wgpu::Buffer {
        let size = data.len().div_ceil(4).max(1) * 4;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: true,
        });
        {
            let mut view = buffer
                .slice(..)
                .get_mapped_range_mut()
                .expect("a buffer mapped at creation is mapped");
            view.slice(..data.len()).copy_from_slice(data);
        }
        buffer.unmap();
        buffer
    }

    /// Copies the tensor to a mappable buffer and reads it; only this tensor's bytes cross over.
    pub fn read(&self, x: &Tensor) -> Result<Vec<f32>> {
        let buffer = self.tensor_buffer("read", x)?;
        let bytes = (x.numel() * 4) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }

        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);

        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            // The receiver lives until after the poll below, so this send cannot fail.
            let _ = sender.send(result);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|err| {
                KernelError::Gpu(format!("read: waiting for the device failed: {err}"))
            })?;
        receiver
            .recv()
            .map_err(|_| KernelError::Gpu("read: the map callback never ran".to_owned()))?
            .map_err(|err| {
                KernelError::Gpu(format!("read: mapping the readback buffer failed: {err}"))
            })?;

        let data = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|err| KernelError::Gpu(format!("read: {err}")))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        Ok(data)
    }

    /// Binds the whole buffer, which must fit one binding.
    pub fn whole<'a>(&self, op: &'static str, buffer: &'a wgpu::Buffer) -> Result<Window<'a>> {
        if buffer.size() > self.max_binding {
            return Err(KernelError::DeviceLimit {
                op,
                bytes: buffer.size(),
                limit: self.max_binding,
            });
        }
        Ok(Window {
            buffer,
            offset: 0,
            size: buffer.size(),
            base: 0,
        })
    }

    /// Binds elements `start .. start + len` of an f32 buffer from the aligned offset below `start`.
    pub fn window<'a>(
        &self,
        op: &'static str,
        buffer: &'a wgpu::Buffer,
        start: usize,
        len: usize,
    ) -> Result<Window<'a>> {
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let start_bytes = start as u64 * 4;
        let offset = start_bytes / align * align;
        let end = (start_bytes + len.max(1) as u64 * 4).min(buffer.size());
        let size = end - offset;
        if size > self.max_binding {
            return Err(KernelError::DeviceLimit {
                op,
                bytes: size,
                limit: self.max_binding,
            });
        }
        Ok(Window {
            buffer,
            offset,
            size,
            base: ((start_bytes - offset) / 4) as u32,
        })
    }

    /// Splits `rows` rows of `row_len` f32 values into runs `(first_row, count)` whose windows fit one
    /// binding, alignment slack included.
    pub fn row_windows(
        &self,
        op: &'static str,
        rows: usize,
        row_len: usize,
    ) -> Result<Vec<(usize, usize)>> {
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let row_bytes = row_len.max(1) as u64 * 4;
        let per_window = ((self.max_binding - align) / row_bytes) as usize;
        if per_window == 0 {
            return Err(KernelError::DeviceLimit {
                op,
                bytes: row_bytes,
                limit: self.max_binding - align,
            });
        }

        Ok((0..rows)
            .step_by(per_window)
            .map(|first| (first, per_window.min(rows - first)))
            .collect())
    }

    /// Workgroup counts for `threads` invocations in workgroups of `workgroup` along x, spilling
    /// into y past the per-dimension limit (kernels rebuild the index from `num_workgroups`).
    pub fn grid(&self, op: &'static str, threads: usize, workgroup: usize) -> Result<[u32; 3]> {
        let groups = threads.div_ceil(workgroup) as u64;
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let x = groups.min(max);
        let y = if x == 0 { 0 } else { groups.div_ceil(x) };
        if y > max {
            return Err(KernelError::DeviceLimit {
                op,
                bytes: threads as u64 * 4,
                limit: max * max * workgroup as u64 * 4,
            });
        }
        Ok([x as u32, y as u32, 1])
    }

    /// Records one dispatch with its bindings and a uniform of `params` at binding `uniform_binding`.
    /// An empty grid records nothing.
    pub fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        bindings: &[(u32, &Window<'_>)],
        uniform_binding: u32,
        params: &[u32],
        grid: [u32; 3],
    ) {
        if grid.contains(&0) {
            return;
        }

        // A uniform struct's size rounds up to 16 bytes.
        let mut words = params.to_vec();
        words.resize(params.len().div_ceil(4).max(1) * 4, 0);
        let uniform = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            });

        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = bindings
            .iter()
            .map(|(binding, window)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: window.resource(),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: uniform_binding,
            resource: uniform.as_entire_binding(),
        });
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });

        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    }

    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&Default::default())
    }

    /// Blocks until the queue is idle.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|err| KernelError::Gpu(format!("waiting for the device failed: {err}")))
    }

    pub fn submit(&self, encoder: wgpu::CommandEncoder) {
        self.queue.submit([encoder.finish()]);
    }
}
