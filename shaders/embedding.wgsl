// Embedding gather: out[i, :] = table[ids[i], :] for the ids that fall in one row chunk of the table.
//
// Bindings (group 0):
//   0  table  array<u32>  read        rows row_start .. row_start + rows of the [vocab, d] table; f32 as
//                                     bits, f16/bf16 packed two per u32 (element i in word i / 2)
//   1  ids    array<u32>  read        token ids [n_ids]
//   2  out    array<f32>  read_write  [n_ids, d]
//   3  p      Params      uniform
// Override DTYPE selects the table dtype: 0 f32, 1 f16, 2 bf16.
//
// Dispatch: one invocation per output element, workgroup 64, (x, y) = (min(groups, max_x), ceil(groups
// / x)) with groups = ceil(n_ids * d / 64). Every chunk of the table is one dispatch; ids outside the
// chunk are left to the other dispatches.

override DTYPE: u32 = 0u;

struct Params {
    n_ids: u32,
    d: u32,
    row_start: u32,
    rows: u32,
}

@group(0) @binding(0) var<storage, read> table: array<u32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn load(i: u32) -> f32 {
    if DTYPE == 0u {
        return bitcast<f32>(table[i]);
    }
    let word = table[i >> 1u];
    let odd = (i & 1u) == 1u;
    if DTYPE == 1u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, odd);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, odd));
}

@compute @workgroup_size(64, 1, 1)
fn embedding(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if idx >= p.n_ids * p.d {
        return;
    }

    let i = idx / p.d;
    let c = idx % p.d;
    let id = ids[i];
    if id < p.row_start || id >= p.row_start + p.rows {
        return;
    }
    out[idx] = load((id - p.row_start) * p.d + c);
}
