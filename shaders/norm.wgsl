// RMS normalization and the multiplication by the RMSNorm weight.
//
// rms_norm: normed[r, :] = x[r, :] / scale[r], scale[r] = sqrt(mean(x[r, :]²) + eps)
//   Bindings (group 0): 0 x array<f32> read [rows, d]; 1 normed array<f32> read_write [rows, d];
//   2 scale array<f32> read_write [rows]; 3 p NormParams uniform.
//   Dispatch: one invocation per row, workgroup 64, (x, y) = (min(groups, max_x), ceil(groups / x)).
//
// mul_weight: out[i] = x[x_base + i] * w[(first_row * d + i) % d] for the `n` elements of a row window
//   Bindings (group 0): 4 x array<f32> read; 5 w array<u32> read [d] in the dtype of override DTYPE
//   (0 f32, 1 f16, 2 bf16; f16/bf16 packed two per u32); 6 out array<f32> read_write;
//   7 q WeightParams uniform. `x_base` and `out_base` are the element offsets of the window in the
//   bindings, which start at the same row.
//   Dispatch: one invocation per element, workgroup 64, 2-D as above.

override DTYPE: u32 = 0u;

struct NormParams {
    rows: u32,
    d: u32,
    eps: f32,
    _pad: u32,
}

struct WeightParams {
    n: u32,
    d: u32,
    x_base: u32,
    out_base: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> normed: array<f32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<uniform> p: NormParams;

@group(0) @binding(4) var<storage, read> wx: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<u32>;
@group(0) @binding(6) var<storage, read_write> wout: array<f32>;
@group(0) @binding(7) var<uniform> q: WeightParams;

@compute @workgroup_size(64, 1, 1)
fn rms_norm(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.y * nwg.x * 64u + gid.x;
    if row >= p.rows {
        return;
    }

    let base = row * p.d;
    var sum_sq = 0.0;
    for (var i = 0u; i < p.d; i++) {
        let v = x[base + i];
        sum_sq += v * v;
    }

    let s = sqrt(sum_sq / f32(p.d) + p.eps);
    scale[row] = s;
    for (var i = 0u; i < p.d; i++) {
        normed[base + i] = x[base + i] / s;
    }
}

fn load_w(i: u32) -> f32 {
    if DTYPE == 0u {
        return bitcast<f32>(w[i]);
    }
    let word = w[i >> 1u];
    let odd = (i & 1u) == 1u;
    if DTYPE == 1u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, odd);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, odd));
}

@compute @workgroup_size(64, 1, 1)
fn mul_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * 64u + gid.x;
    if i >= q.n {
        return;
    }
    wout[q.out_base + i] = wx[q.x_base + i] * load_w(i % q.d);
}
