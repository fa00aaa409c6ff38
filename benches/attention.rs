//! `attention` throughput with the head layout of Qwen2.5-0.5B (14 query heads on 2 KV heads,
//! d_head 64): causal prefill over 64 and 512 tokens, and one decode query over 512 cached keys.
//!
//! Elements are FLOP: `4·d_head` per visible (query, key) pair and head (`q·k` plus `p·v`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qwenlens_benches::{backends, prepare, random_tensor};
use qwenlens_kernels::AttentionParams;

const N_HEADS: usize = 14;
const N_KV_HEADS: usize = 2;
const D_HEAD: usize = 64;

/// FLOP of one causal call, counting only visible keys.
fn flops(q_len: usize, kv_len: usize) -> u64 {
    let visible_pairs: usize = (0..q_len).map(|i| kv_len - q_len + i + 1).sum();
    (visible_pairs * N_HEADS * 4 * D_HEAD) as u64
}

fn attention(c: &mut Criterion) {
    for target in backends() {
        let backend = target.backend.as_ref();
        let mut group = c.benchmark_group(format!("attention_{}", target.label()));
        if target.is_gpu {
            group.sample_size(10);
        }
        group.measurement_time(Duration::from_secs(4));

        for (name, q_len, kv_len) in [
            ("prefill_64", 64, 64),
            ("prefill_512", 512, 512),
            ("decode_1_of_512", 1, 512),
        ] {
            let params = AttentionParams {
                batch: 1,
                q_len,
                kv_len,
                n_heads: N_HEADS,
                n_kv_heads: N_KV_HEADS,
                d_head: D_HEAD,
                key_start: vec![0],
                scale: 1.0 / (D_HEAD as f32).sqrt(),
                want_scores: false,
                want_pattern: false,
            };
            let Some((q, k, v)) = prepare(&target, name, || {
                let q = random_tensor(backend, 1, &[q_len, N_HEADS, D_HEAD])?;
                let k = random_tensor(backend, 2, &[kv_len, N_KV_HEADS, D_HEAD])?;
                let v = random_tensor(backend, 3, &[kv_len, N_KV_HEADS, D_HEAD])?;
                backend.attention(&q, &k, &v, &params, &[])?;
                Ok((q, k, v))
            }) else {
                continue;
            };
            group.throughput(Throughput::Elements(flops(q_len, kv_len)));
            group.bench_function(name, |b| {
                b.iter(|| {
                    black_box(
                        backend
                            .attention(&q, &k, &v, &params, &[])
                            .expect("attention"),
                    )
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, attention);
criterion_main!(benches);
