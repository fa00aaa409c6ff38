//! WGSL compute kernels run through wgpu.
