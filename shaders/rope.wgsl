// Rotary position embedding, rotate-half convention (as in Hugging Face's Qwen2):
//   out[r, h, i]        = x[r, h, i] · cos[r, i] − x[r, h, i + half] · sin[r, i]
//   out[r, h, i + half] = x[r, h, i + half] · cos[r, i] + x[r, h, i] · sin[r, i]
// for i < half = d_head / 2.
//
// The host computes the angle position · theta^(−2i / d_head) in f32 and its cosine and sine in f64
// rounded to f32, because GPU sin/cos lose accuracy on the large angles of late positions.
//
// Bindings (group 0):
//   0  x    array<f32>  read        [rows, n_heads, d_head]
//   1  cs   array<f32>  read        [rows, half, 2]: cos, sin
//   2  out  array<f32>  read_write  [rows, n_heads, d_head]
//   3  p    Params      uniform
// Dispatch: one invocation per (row, head, i < half), workgroup 64, (x, y) = (min(groups, max_x),
// ceil(groups / x)).

struct Params {
    rows: u32,
    n_heads: u32,
    d_head: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> cs: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64, 1, 1)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.d_head / 2u;
    let idx = gid.y * nwg.x * 64u + gid.x;
    if idx >= p.rows * p.n_heads * half {
        return;
    }

    let i = idx % half;
    let rh = idx / half;
    let row = rh / p.n_heads;
    let base = rh * p.d_head;
    let c = cs[(row * half + i) * 2u];
    let s = cs[(row * half + i) * 2u + 1u];
    let a = x[base + i];
    let b = x[base + i + half];
    out[base + i] = a * c - b * s;
    out[base + i + half] = b * c + a * s;
}
