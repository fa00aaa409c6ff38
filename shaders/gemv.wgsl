// GEMV for decode-sized inputs on CPU adapters: out = x · wᵀ (+ bias) with 16-byte loads of
// x and the weight.
//
// Bindings (group 0), as in matmul.wgsl except for the element types of x and w:
//   0  x      array<vec4<f32>>  read        activations [m, k]; element `x_base` of the binding (a
//                                           multiple of 4) is x[0, 0]
//   1  w      array<vec4<u32>>  read        one row chunk of the weight, rows n0 .. n0 + nc of [n, k];
//                                           f32 as bits (4 per vec4), f16/bf16 packed two per u32 (8 per
//                                           vec4, low half first)
//   2  bias   array<u32>        read        bias [n] in the dtype given by `bias_mode` (a dummy when 0)
//   3  out    array<f32>        read_write  [m, n], starting at element `out_base`; columns n0 .. n0 + nc
//   4  p      Params            uniform
// Override W_DTYPE selects the weight dtype: 0 f32, 1 f16, 2 bf16. Every weight row must start on a
// 16-byte boundary: k a multiple of 4 (f32) or 8 (f16, bf16), and so must x; the host falls back to
// `gemv` in matmul.wgsl otherwise.
//
// Each invocation computes 4 adjacent output columns of one row, so one load of x serves four weight
// rows.
//
// Dispatch: workgroup 64, (ceil(nc / 256), m, 1).

override W_DTYPE: u32 = 0u;

// Output columns per invocation, which share each load of x.
const COLS: u32 = 4u;

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

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
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

// Adds one weight row's products with the x vector over 8 packed f16 or bf16 values: x_even holds x at
// the even positions (the low halves of the words), x_odd at the odd ones.
fn dot_half(q: vec4<u32>, x_even: vec4<f32>, x_odd: vec4<f32>) -> vec4<f32> {
    if W_DTYPE == 1u {
        let h0 = unpack2x16float(q.x);
        let h1 = unpack2x16float(q.y);
        let h2 = unpack2x16float(q.z);
        let h3 = unpack2x16float(q.w);
        return x_even * vec4<f32>(h0.x, h1.x, h2.x, h3.x) + x_odd * vec4<f32>(h0.y, h1.y, h2.y, h3.y);
    }
    let lo = bitcast<vec4<f32>>(q << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
    return x_even * lo + x_odd * hi;
}

@compute @workgroup_size(64, 1, 1)
fn gemv_vec4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c0 = gid.x * COLS;
    let row = gid.y;
    if c0 >= p.nc || row >= p.m {
        return;
    }

    // Columns past the chunk are clamped to its last row and never stored, so the loop needs no
    // branches. Indices count vec4 elements.
    let xb = p.x_base / 4u + row * (p.k / 4u);
    let wk = select(p.k / 8u, p.k / 4u, W_DTYPE == 0u);
    var wr: array<u32, COLS>;
    for (var j = 0u; j < COLS; j++) {
        wr[j] = min(c0 + j, p.nc - 1u) * wk;
    }

    var acc: array<vec4<f32>, COLS>;
    if W_DTYPE == 0u {
        for (var t = 0u; t < wk; t++) {
            let xv = x[xb + t];
            for (var j = 0u; j < COLS; j++) {
                acc[j] += xv * bitcast<vec4<f32>>(w[wr[j] + t]);
            }
        }
    } else {
        for (var t = 0u; t < wk; t++) {
            let a = x[xb + 2u * t];
            let b = x[xb + 2u * t + 1u];
            let x_even = vec4<f32>(a.x, a.z, b.x, b.z);
            let x_odd = vec4<f32>(a.y, a.w, b.y, b.w);
            for (var j = 0u; j < COLS; j++) {
                acc[j] += dot_half(w[wr[j] + t], x_even, x_odd);
            }
        }
    }

    for (var j = 0u; j < COLS; j++) {
        if c0 + j < p.nc {
            let col = p.n0 + c0 + j;
            let sum = acc[j].x + acc[j].y + acc[j].z + acc[j].w;
            out[p.out_base + row * p.n + col] = sum + load_bias(col);
        }
    }
}
