// GEMV for decode-sized inputs on CPU adapters: out = x · wᵀ (+ bias) with 16-byte weight loads.
//
// Bindings (group 0), as in matmul.wgsl except for the weight's element type:
//   0  x      array<f32>        read        activations [m, k], starting at element `x_base`
//   1  w      array<vec4<u32>>  read        one row chunk of the weight, rows n0 .. n0 + nc of [n, k];
//                                           f32 as bits (4 per vec4), f16/bf16 packed two per u32 (8 per
//                                           vec4, low half first)
//   2  bias   array<u32>        read        bias [n] in the dtype given by `bias_mode` (a dummy when 0)
//   3  out    array<f32>        read_write  [m, n], starting at element `out_base`; columns n0 .. n0 + nc
//   4  p      Params            uniform
// Override W_DTYPE selects the weight dtype: 0 f32, 1 f16, 2 bf16. Every weight row must start on a
// 16-byte boundary: k a multiple of 4 (f32) or 8 (f16, bf16); the host falls back to `gemv` otherwise.
//
// Dispatch: workgroup 64, one invocation per output element: (ceil(nc / 64), m, 1).

override W_DTYPE: u32 = 0u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    n0: u32,
    nc: u32,
    x_base: u32,
    out_base: u32,
    // 0: no bias, 1: f32, 2: f16, 3: bf16.
    bias_mode: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> bias: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

fn load_bias(j: u32) -> f32 {
    if p.bias_mode == 0u {
        return 0.0;
    }
    if p.bias_mode == 1u {
        return bitcast<f32>(bias[j]);
    }
    let word = bias[j >> 1u];
    let odd = (j & 1u) == 1u;
    if p.bias_mode == 2u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, odd);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, odd));
}

@compute @workgroup_size(64, 1, 1)
fn gemv_vec4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if col >= p.nc || row >= p.m {
        return;
    }

    let xb = p.x_base + row * p.k;
    var acc = vec4<f32>(0.0);
    if W_DTYPE == 0u {
        let wb = col * p.k / 4u;
        for (var t = 0u; t < p.k / 4u; t++) {
            let xi = xb + 4u * t;
            let xv = vec4<f32>(x[xi], x[xi + 1u], x[xi + 2u], x[xi + 3u]);
            acc += xv * bitcast<vec4<f32>>(w[wb + t]);
        }
    } else {
        let wb = col * p.k / 8u;
        for (var t = 0u; t < p.k / 8u; t++) {
            let q = w[wb + t];
            let xi = xb + 8u * t;
            // Even elements are the low halves of the four words, odd elements the high halves.
            let x_even = vec4<f32>(x[xi], x[xi + 2u], x[xi + 4u], x[xi + 6u]);
            let x_odd = vec4<f32>(x[xi + 1u], x[xi + 3u], x[xi + 5u], x[xi + 7u]);
            var lo: vec4<f32>;
            var hi: vec4<f32>;
            if W_DTYPE == 1u {
                let h0 = unpack2x16float(q.x);
                let h1 = unpack2x16float(q.y);
                let h2 = unpack2x16float(q.z);
                let h3 = unpack2x16float(q.w);
                lo = vec4<f32>(h0.x, h1.x, h2.x, h3.x);
                hi = vec4<f32>(h0.y, h1.y, h2.y, h3.y);
            } else {
                lo = bitcast<vec4<f32>>(q << vec4<u32>(16u));
                hi = bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
            }
            acc += x_even * lo + x_odd * hi;
        }
    }

    let sum = acc.x + acc.y + acc.z + acc.w;
    out[p.out_base + row * p.n + p.n0 + col] = sum + load_bias(p.n0 + col);
}
