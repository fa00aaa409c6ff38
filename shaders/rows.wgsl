// Row operations: KV-cache append, row and column gathers, log-sum-exp.
//
// Tensors that may exceed the storage-binding limit (logits) are bound one window of whole rows at a
// time: `row_start` is the window's first row, `rows` its number of rows and `base` the element offset
// of that row within the binding (bindings start at aligned byte offsets).
//
// concat_seq: out[b, s] = cache[b, s] for s < t, else new[b, s − t], rows of `row_len` elements
//   Bindings: 0 cache, 1 new (array<f32> read), 2 out (array<f32> read_write), 3 cp ConcatParams.
//   Dispatch: one invocation per output element.
// gather_rows: out[i, :] = src[indices[i], :] for the indices inside the window
//   Bindings: 4 src (array<f32> read, windowed), 5 indices (array<u32> read), 6 out (array<f32>
//   read_write), 7 wp WindowParams (n = number of indices). Dispatch: one invocation per output element.
// gather_cols: out[r] = src[r, cols[r]] for the rows r of the window
//   Bindings: 8 src (windowed), 9 cols (array<u32> read), 10 out (array<f32> read_write), 11 wp2
//   WindowParams. Dispatch: one invocation per window row.
// logsumexp: out[r] = log Σ exp(src[r, :]) for the rows of the window (−inf for a row of −inf)
//   Bindings: 12 src (windowed), 13 out (array<f32> read_write), 14 wp3 WindowParams.
//   Dispatch: one workgroup of 64 per window row, laid out like the invocations below.
// All use workgroup 64 and (x, y) = (min(groups, max_x), ceil(groups / x)).

struct ConcatParams {
    batch: u32,
    t: u32,
    n: u32,
    row_len: u32,
}

struct WindowParams {
    n: u32,
    row_len: u32,
    row_start: u32,
    rows: u32,
    base: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> cache: array<f32>;
@group(0) @binding(1) var<storage, read> new_rows: array<f32>;
@group(0) @binding(2) var<storage, read_write> concat_out: array<f32>;
@group(0) @binding(3) var<uniform> cp: ConcatParams;

@group(0) @binding(4) var<storage, read> rows_src: array<f32>;
@group(0) @binding(5) var<storage, read> indices: array<u32>;
@group(0) @binding(6) var<storage, read_write> rows_out: array<f32>;
@group(0) @binding(7) var<uniform> wp: WindowParams;

@group(0) @binding(8) var<storage, read> cols_src: array<f32>;
@group(0) @binding(9) var<storage, read> cols: array<u32>;
@group(0) @binding(10) var<storage, read_write> cols_out: array<f32>;
@group(0) @binding(11) var<uniform> wp2: WindowParams;

@group(0) @binding(12) var<storage, read> lse_src: array<f32>;
@group(0) @binding(13) var<storage, read_write> lse_out: array<f32>;
@group(0) @binding(14) var<uniform> wp3: WindowParams;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * 64u + gid.x;
}

@compute @workgroup_size(64, 1, 1)
fn concat_seq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = index(gid, nwg);
    let per_item = cp.t + cp.n;
    if idx >= cp.batch * per_item * cp.row_len {
        return;
    }

    let e = idx % cp.row_len;
    let r = idx / cp.row_len;
    let b = r / per_item;
    let s = r % per_item;
    if s < cp.t {
        concat_out[idx] = cache[(b * cp.t + s) * cp.row_len + e];
    } else {
        concat_out[idx] = new_rows[(b * cp.n + s - cp.t) * cp.row_len + e];
    }
}

@compute @workgroup_size(64, 1, 1)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = index(gid, nwg);
    if idx >= wp.n * wp.row_len {
        return;
    }

    let i = idx / wp.row_len;
    let e = idx % wp.row_len;
    let r = indices[i];
    if r < wp.row_start || r >= wp.row_start + wp.rows {
        return;
    }
    rows_out[idx] = rows_src[wp.base + (r - wp.row_start) * wp.row_len + e];
}

@compute @workgroup_size(64, 1, 1)
fn gather_cols(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let local_row = index(gid, nwg);
    if local_row >= wp2.rows {
        return;
    }

    let r = wp2.row_start + local_row;
    cols_out[r] = cols_src[wp2.base + local_row * wp2.row_len + cols[r]];
}

var<workgroup> partial_max: array<f32, 64>;
var<workgroup> partial_sum: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn logsumexp(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // The row index is uniform across the workgroup, so the early return keeps barriers uniform.
    let local_row = wid.y * nwg.x + wid.x;
    if local_row >= wp3.rows {
        return;
    }

    let neg_inf = bitcast<f32>(0xff800000u);
    let base = wp3.base + local_row * wp3.row_len;

    // Online max and sum over a strided slice of the row.
    var m = neg_inf;
    var s = 0.0;
    for (var j = lid; j < wp3.row_len; j += 64u) {
        let v = lse_src[base + j];
        if v > m {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else if v != neg_inf {
            s += exp(v - m);
        }
    }
    partial_max[lid] = m;
    partial_sum[lid] = s;
    workgroupBarrier();

    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            let m1 = partial_max[lid];
            let m2 = partial_max[lid + stride];
            let mm = max(m1, m2);
            if mm != neg_inf {
                partial_sum[lid] = partial_sum[lid] * exp(m1 - mm) + partial_sum[lid + stride] * exp(m2 - mm);
            }
            partial_max[lid] = mm;
        }
        workgroupBarrier();
    }

    if lid == 0u {
        let mm = partial_max[0];
        if mm == neg_inf {
            lse_out[wp3.row_start + local_row] = neg_inf;
        } else {
            lse_out[wp3.row_start + local_row] = mm + log(partial_sum[0]);
        }
    }
}
