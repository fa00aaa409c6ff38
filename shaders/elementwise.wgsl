// Element-wise kernels over one window of equally shaped f32 tensors. Every operand's binding starts
// at the same element, so one `base` offset (the window's start within its aligned binding) serves all.
//
// Bindings (group 0):
//   0  a    array<f32>  read        add: a; silu_mul: gate; select: mask
//   1  b    array<f32>  read        add: b; silu_mul: up;   select: x
//   2  c    array<f32>  read        select: replacement (unused by add and silu_mul)
//   3  out  array<f32>  read_write
//   4  p    Params      uniform
// Entry points: add (out = a + b), silu_mul (out = a / (1 + exp(−a)) · b),
// select_masked (out = c where a != 0, else b).
// Dispatch: one invocation per element, workgroup 64, (x, y) = (min(groups, max_x), ceil(groups / x)).

struct Params {
    n: u32,
    base: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * 64u + gid.x;
}

@compute @workgroup_size(64, 1, 1)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    out[p.base + i] = a[p.base + i] + b[p.base + i];
}

@compute @workgroup_size(64, 1, 1)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    let g = a[p.base + i];
    out[p.base + i] = g / (1.0 + exp(-g)) * b[p.base + i];
}

@compute @workgroup_size(64, 1, 1)
fn select_masked(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    out[p.base + i] = select(b[p.base + i], c[p.base + i], a[p.base + i] != 0.0);
}
