// Matrix multiplication `out = x · wᵀ (+ bias)` with the weight in its stored dtype.
//
// Bindings (group 0):
//   0  x      array<f32>  read        activations [m, k], starting at element `x_base` of the binding
//   1  w      array<u32>  read        one row chunk of the weight, rows n0 .. n0 + nc of [n, k];
//                                     f32 as bits, f16/bf16 packed two per u32 (element i in word i / 2,
//                                     low half first, as in little-endian safetensors bytes)
//   2  bias   array<u32>  read        bias [n] in the dtype given by `bias_mode` (a 4-byte dummy when 0)
//   3  out    array<f32>  read_write  [m, n], starting at element `out_base`; the chunk writes columns
//                                     n0 .. n0 + nc
//   4  p      Params      uniform
// Override W_DTYPE selects the weight dtype: 0 f32, 1 f16, 2 bf16. Accumulation is f32.
//
// Entry points and dispatch sizes:
//   matmul_reg4x4  workgroup 8×8, each invocation a 4×4 output block, no workgroup memory, for CPU
//                  adapters when rows do not start on 16-byte boundaries (matmul_vec4.wgsl covers
//                  the aligned case): dispatch (ceil(nc / 32), ceil(m / 32), 1)
//   matmul_tiled   workgroup 16×16, 16×16 tiles of x and w staged in workgroup memory (real GPUs):
//                  dispatch (ceil(nc / 16), ceil(m / 16), 1)
//   gemv           workgroup 64, one invocation per output element, for decode-sized m on CPU
//                  adapters when weight rows do not start on 16-byte boundaries (gemv.wgsl covers the
//                  aligned case): dispatch (ceil(nc / 64), m, 1)
//   gemv_coop      workgroup 64 sharing one output element (coalesced weight reads, reduction in
//                  workgroup memory), for decode-sized m on real GPUs: dispatch (x, y, m) with
//                  x · y ≥ nc, x = min(nc, max workgroups per dimension)

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
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> bias: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

fn unpack_half(word: u32, odd: bool, dtype: u32) -> f32 {
    if dtype == 1u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, odd);
    }
    // bf16 is the upper half of an f32.
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, odd));
}

fn load_w(i: u32) -> f32 {
    if W_DTYPE == 0u {
        return bitcast<f32>(w[i]);
    }
    return unpack_half(w[i >> 1u], (i & 1u) == 1u, W_DTYPE);
}

fn load_bias(j: u32) -> f32 {
    if p.bias_mode == 0u {
        return 0.0;
    }
    if p.bias_mode == 1u {
        return bitcast<f32>(bias[j]);
    }
    return unpack_half(bias[j >> 1u], (j & 1u) == 1u, p.bias_mode - 1u);
}

fn store(row: u32, col: u32, acc: f32) {
    out[p.out_base + row * p.n + p.n0 + col] = acc + load_bias(p.n0 + col);
}

@compute @workgroup_size(8, 8, 1)
fn matmul_reg4x4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.y * 4u;
    let c0 = gid.x * 4u;
    if r0 >= p.m || c0 >= p.nc {
        return;
    }

    // Out-of-range rows and columns are clamped to the last valid one and never stored, so the inner
    // loop needs no branches.
    var xr: array<u32, 4>;
    var wr: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xr[i] = p.x_base + min(r0 + i, p.m - 1u) * p.k;
        wr[i] = min(c0 + i, p.nc - 1u) * p.k;
    }

    var acc: array<vec4<f32>, 4>;
    for (var kk = 0u; kk < p.k; kk++) {
        let wv = vec4<f32>(load_w(wr[0] + kk), load_w(wr[1] + kk), load_w(wr[2] + kk), load_w(wr[3] + kk));
        acc[0] += x[xr[0] + kk] * wv;
        acc[1] += x[xr[1] + kk] * wv;
        acc[2] += x[xr[2] + kk] * wv;
        acc[3] += x[xr[3] + kk] * wv;
    }

    for (var i = 0u; i < 4u; i++) {
        if r0 + i < p.m {
            for (var j = 0u; j < 4u; j++) {
                if c0 + j < p.nc {
                    store(r0 + i, c0 + j, acc[i][j]);
                }
            }
        }
    }
}

const TILE: u32 = 16u;
var<workgroup> x_tile: array<array<f32, 16>, 16>;
var<workgroup> w_tile: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let row = wid.y * TILE + lid.y;
    let col = wid.x * TILE + lid.x;
    // The invocation that loads the w tile entry (lid.y, lid.x) reads weight row wid.x * TILE + lid.y.
    let w_row = wid.x * TILE + lid.y;

    var acc = 0.0;
    let tiles = (p.k + TILE - 1u) / TILE;
    for (var t = 0u; t < tiles; t++) {
        let kk = t * TILE + lid.x;
        var xv = 0.0;
        if row < p.m && kk < p.k {
            xv = x[p.x_base + row * p.k + kk];
        }
        var wv = 0.0;
        if w_row < p.nc && kk < p.k {
            wv = load_w(w_row * p.k + kk);
        }
        x_tile[lid.y][lid.x] = xv;
        w_tile[lid.y][lid.x] = wv;
        workgroupBarrier();

        for (var i = 0u; i < TILE; i++) {
            acc += x_tile[lid.y][i] * w_tile[lid.x][i];
        }
        workgroupBarrier();
    }

    if row < p.m && col < p.nc {
        store(row, col, acc);
    }
}

@compute @workgroup_size(64, 1, 1)
fn gemv(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if col >= p.nc || row >= p.m {
        return;
    }

    let xb = p.x_base + row * p.k;
    let wb = col * p.k;
    var acc = 0.0;
    if W_DTYPE != 0u && (p.k & 1u) == 0u {
        // Even k: every weight row starts on a word boundary, so unpack both halves of each word.
        let words = p.k / 2u;
        let wwb = wb / 2u;
        for (var t = 0u; t < words; t++) {
            let word = w[wwb + t];
            acc += x[xb + 2u * t] * unpack_half(word, false, W_DTYPE);
            acc += x[xb + 2u * t + 1u] * unpack_half(word, true, W_DTYPE);
        }
    } else {
        for (var kk = 0u; kk < p.k; kk++) {
            acc += x[xb + kk] * load_w(wb + kk);
        }
    }
    store(row, col, acc);
}

var<workgroup> gemv_partial: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn gemv_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // The output element is uniform across the workgroup, so the early return keeps barriers uniform.
    let col = wid.y * nwg.x + wid.x;
    let row = wid.z;
    if col >= p.nc || row >= p.m {
        return;
    }

    let xb = p.x_base + row * p.k;
    let wb = col * p.k;
    var acc = 0.0;
    if W_DTYPE != 0u && (p.k & 1u) == 0u {
        let wwb = wb / 2u;
        for (var t = lid; t < p.k / 2u; t += 64u) {
            let word = w[wwb + t];
            acc += x[xb + 2u * t] * unpack_half(word, false, W_DTYPE);
            acc += x[xb + 2u * t + 1u] * unpack_half(word, true, W_DTYPE);
        }
    } else {
        for (var kk = lid; kk < p.k; kk += 64u) {
            acc += x[xb + kk] * load_w(wb + kk);
        }
    }
    gemv_partial[lid] = acc;
    workgroupBarrier();

    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            gemv_partial[lid] += gemv_partial[lid + stride];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        store(row, col, gemv_partial[0]);
    }
}
