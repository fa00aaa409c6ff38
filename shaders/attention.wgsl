// Grouped-query attention in four passes: scores, softmax, pattern overrides, z.
//
// Layouts: q [batch * q_len, n_heads, d_head]; k and v [batch * kv_len, n_kv_heads, d_head];
// scores and pattern [batch, n_heads, q_len, kv_len]; z [batch * q_len, n_heads, d_head].
// Query i of batch item b sits at key index kv_len − q_len + i and sees keys
// key_start[b] ..= kv_len − q_len + i; query head h reads KV head h / (n_heads / n_kv_heads).
//
// Bindings (group 0), all passes share the uniform at binding 4:
//   scores:  0 q, 1 k (array<f32> read), 2 key_start (array<u32> read [batch]),
//            3 scores (array<f32> read_write)
//   softmax: 5 scores (array<f32> read), 6 pattern (array<f32> read_write)
//   apply_override: 7 replacement (array<f32> read [batch, q_len, kv_len]), 6 pattern; writes head `head`
//   z:       6 pattern, 8 v (array<f32> read), 9 z (array<f32> read_write)
//
// Dispatch: workgroup 64, one invocation per output element (scores: batch·n_heads·q_len·kv_len;
// softmax: one per pattern row; apply_override: batch·q_len·kv_len; z: batch·q_len·n_heads·d_head),
// laid out as (x, y) = (min(groups, max_x), ceil(groups / x)).

struct Params {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    n_heads: u32,
    n_kv_heads: u32,
    d_head: u32,
    scale: f32,
    head: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> key_start: array<u32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read> scores_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> pattern: array<f32>;
@group(0) @binding(7) var<storage, read> replacement: array<f32>;
@group(0) @binding(8) var<storage, read> v: array<f32>;
@group(0) @binding(9) var<storage, read_write> z: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * 64u + gid.x;
}

fn neg_inf() -> f32 {
    // WGSL has no infinity literal.
    return bitcast<f32>(0xff800000u);
}

@compute @workgroup_size(64, 1, 1)
fn attn_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = index(gid, nwg);
    if idx >= p.batch * p.n_heads * p.q_len * p.kv_len {
        return;
    }

    let j = idx % p.kv_len;
    let i = (idx / p.kv_len) % p.q_len;
    let h = (idx / (p.kv_len * p.q_len)) % p.n_heads;
    let b = idx / (p.kv_len * p.q_len * p.n_heads);
    let last_visible = p.kv_len - p.q_len + i;
    if j < key_start[b] || j > last_visible {
        scores[idx] = neg_inf();
        return;
    }

    let kv_head = h / (p.n_heads / p.n_kv_heads);
    let qb = ((b * p.q_len + i) * p.n_heads + h) * p.d_head;
    let kb = ((b * p.kv_len + j) * p.n_kv_heads + kv_head) * p.d_head;
    var dot = 0.0;
    for (var d = 0u; d < p.d_head; d++) {
        dot += q[qb + d] * k[kb + d];
    }
    scores[idx] = dot * p.scale;
}

@compute @workgroup_size(64, 1, 1)
fn attn_softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = index(gid, nwg);
    if row >= p.batch * p.n_heads * p.q_len {
        return;
    }

    let base = row * p.kv_len;
    var m = neg_inf();
    for (var j = 0u; j < p.kv_len; j++) {
        m = max(m, scores_in[base + j]);
    }

    // A query that sees no key (a padding row) gets a zero row instead of 0 / 0.
    if m == neg_inf() {
        for (var j = 0u; j < p.kv_len; j++) {
            pattern[base + j] = 0.0;
        }
        return;
    }

    var sum = 0.0;
    for (var j = 0u; j < p.kv_len; j++) {
        let e = exp(scores_in[base + j] - m);
        pattern[base + j] = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for (var j = 0u; j < p.kv_len; j++) {
        pattern[base + j] *= inv;
    }
}

@compute @workgroup_size(64, 1, 1)
fn apply_override(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = index(gid, nwg);
    let per_item = p.q_len * p.kv_len;
    if idx >= p.batch * per_item {
        return;
    }

    let b = idx / per_item;
    let rest = idx % per_item;
    pattern[(b * p.n_heads + p.head) * per_item + rest] = replacement[idx];
}

@compute @workgroup_size(64, 1, 1)
fn attn_z(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = index(gid, nwg);
    if idx >= p.batch * p.q_len * p.n_heads * p.d_head {
        return;
    }

    let d = idx % p.d_head;
    let h = (idx / p.d_head) % p.n_heads;
    let row = idx / (p.d_head * p.n_heads);
    let b = row / p.q_len;
    let i = row % p.q_len;
    let kv_head = h / (p.n_heads / p.n_kv_heads);
    let pb = ((b * p.n_heads + h) * p.q_len + i) * p.kv_len;

    // Every key is summed, masked ones included, because an override may give them weight.
    var acc = 0.0;
    for (var j = 0u; j < p.kv_len; j++) {
        acc += pattern[pb + j] * v[((b * p.kv_len + j) * p.n_kv_heads + kv_head) * p.d_head + d];
    }
    z[idx] = acc;
}
