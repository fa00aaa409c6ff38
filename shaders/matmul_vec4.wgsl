// Register-blocked matrix multiplication `out = x · wᵀ (+ bias)` with 16-byte loads along k, for CPU
// adapters such as lavapipe.
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
// Override W_DTYPE selects the weight dtype: 0 f32, 1 f16, 2 bf16. Every row of x and w must start on
// a 16-byte boundary: k a multiple of 4 (f32) or 8 (f16, bf16); the host uses matmul_reg4x4 otherwise.
//
// Each invocation computes a ROWS × 4 output block (ROWS = 4). lavapipe (Mesa 22.3) runs 8
// invocations per SIMD vector, and a load whose address differs between them seems to cost about a
// load per lane, so the block reads each 16-byte vector once and reuses it four times. On lavapipe
// this ran 3–4 times faster than matmul_reg4x4, which loads one scalar per row and per k. With ROWS = 8 it ran about 15 %
// slower per CPU second on lavapipe, because the accumulators no longer fit in registers.
//
// Dispatch: workgroup 8×8, (ceil(nc / 32), ceil(m / (8 · ROWS)), 1).

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

// Elements 0, 2, 4, 6 (the low halves) of 8 packed f16 or bf16 values.
fn unpack_low(q: vec4<u32>) -> vec4<f32> {
    if W_DTYPE == 1u {
        return vec4<f32>(
            unpack2x16float(q.x).x,
            unpack2x16float(q.y).x,
            unpack2x16float(q.z).x,
            unpack2x16float(q.w).x,
        );
    }
    return bitcast<vec4<f32>>(q << vec4<u32>(16u));
}

// Elements 1, 3, 5, 7 (the high halves) of 8 packed f16 or bf16 values.
fn unpack_high(q: vec4<u32>) -> vec4<f32> {
    if W_DTYPE == 1u {
        return vec4<f32>(
            unpack2x16float(q.x).y,
            unpack2x16float(q.y).y,
            unpack2x16float(q.z).y,
            unpack2x16float(q.w).y,
        );
    }
    return bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
}

// Rows of x per invocation. The host's workgroup row count (8 · ROWS) must change with it.
const ROWS: u32 = 4u;

// Transposes four weight vectors: column kk of the result holds element kk of every weight row.
fn transpose(ws: array<vec4<f32>, 4>) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(
        vec4<f32>(ws[0].x, ws[1].x, ws[2].x, ws[3].x),
        vec4<f32>(ws[0].y, ws[1].y, ws[2].y, ws[3].y),
        vec4<f32>(ws[0].z, ws[1].z, ws[2].z, ws[3].z),
        vec4<f32>(ws[0].w, ws[1].w, ws[2].w, ws[3].w),
    );
}

@compute @workgroup_size(8, 8, 1)
fn matmul_vec4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.y * ROWS;
    let c0 = gid.x * 4u;
    if r0 >= p.m || c0 >= p.nc {
        return;
    }

    // Out-of-range rows and columns are clamped to the last valid one and never stored, so the inner
    // loop needs no branches. Indices count vec4 elements.
    let xk = p.k / 4u;
    var xr: array<u32, ROWS>;
    var wr: array<u32, 4>;
    let wk = select(p.k / 8u, p.k / 4u, W_DTYPE == 0u);
    for (var i = 0u; i < ROWS; i++) {
        xr[i] = p.x_base / 4u + min(r0 + i, p.m - 1u) * xk;
    }
    for (var j = 0u; j < 4u; j++) {
        wr[j] = min(c0 + j, p.nc - 1u) * wk;
    }

    var acc: array<vec4<f32>, ROWS>;
    if W_DTYPE == 0u {
        for (var t = 0u; t < wk; t++) {
            let wt = transpose(array<vec4<f32>, 4>(
                bitcast<vec4<f32>>(w[wr[0] + t]),
                bitcast<vec4<f32>>(w[wr[1] + t]),
                bitcast<vec4<f32>>(w[wr[2] + t]),
                bitcast<vec4<f32>>(w[wr[3] + t]),
            ));
            for (var i = 0u; i < ROWS; i++) {
                let xv = x[xr[i] + t];
                acc[i] += xv.x * wt[0] + xv.y * wt[1] + xv.z * wt[2] + xv.w * wt[3];
            }
        }
    } else {
        for (var t = 0u; t < wk; t++) {
            let q = array<vec4<u32>, 4>(w[wr[0] + t], w[wr[1] + t], w[wr[2] + t], w[wr[3] + t]);
            let lo = transpose(array<vec4<f32>, 4>(unpack_low(q[0]), unpack_low(q[1]), unpack_low(q[2]), unpack_low(q[3])));
            let hi = transpose(array<vec4<f32>, 4>(unpack_high(q[0]), unpack_high(q[1]), unpack_high(q[2]), unpack_high(q[3])));
            for (var i = 0u; i < ROWS; i++) {
                // x positions 0, 2, 4, 6 pair with the low halves, 1, 3, 5, 7 with the high ones.
                let a = x[xr[i] + 2u * t];
                let b = x[xr[i] + 2u * t + 1u];
                acc[i] += a.x * lo[0] + a.z * lo[1] + b.x * lo[2] + b.z * lo[3]
                    + a.y * hi[0] + a.w * hi[1] + b.y * hi[2] + b.w * hi[3];
            }
        }
    }

    for (var i = 0u; i < ROWS; i++) {
        if r0 + i < p.m {
            for (var j = 0u; j < 4u; j++) {
                if c0 + j < p.nc {
                    let col = p.n0 + c0 + j;
                    out[p.out_base + (r0 + i) * p.n + col] = acc[i][j] + load_bias(col);
                }
            }
        }
    }
}
