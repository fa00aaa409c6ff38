//! `matmul` throughput: a square f32 GEMM, the prefill shape of an MLP projection, and the decode
//! GEMVs of an MLP projection and of the unembedding.
//!
//! GEMM cases report elements as FLOP (`2·m·k·n` per call); GEMV cases report the weight bytes
//! read per call, since they are memory-bound.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qwenlens_benches::{backends, prepare, random_tensor, random_weight};
use qwenlens_kernels::DType;

/// One benchmarked product `x[m, k] · w[n, k]ᵀ`.
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    dtype: DType,
}

const CASES: [Case; 6] = [
    Case {
        name: "gemm_f32_1024x1024x1024",
        m: 1024,
        k: 1024,
        n: 1024,
        dtype: DType::F32,
    },
    Case {
        name: "prefill_f32_64x896x4864",
        m: 64,
        k: 896,
        n: 4864,
        dtype: DType::F32,
    },
    Case {
        name: "prefill_bf16_64x896x4864",
        m: 64,
        k: 896,
        n: 4864,
        dtype: DType::BF16,
    },
    Case {
        name: "decode_bf16_1x896x4864",
        m: 1,
        k: 896,
        n: 4864,
        dtype: DType::BF16,
    },
    Case {
        name: "decode_bf16_1x896x151936",
        m: 1,
        k: 896,
        n: 151_936,
        dtype: DType::BF16,
    },
    Case {
        name: "decode_f32_1x896x151936",
        m: 1,
        k: 896,
        n: 151_936,
        dtype: DType::F32,
    },
];

fn matmul(c: &mut Criterion) {
    for target in backends() {
        let backend = target.backend.as_ref();
        let mut group = c.benchmark_group(format!("matmul_{}", target.label()));
        if target.is_gpu {
            group.sample_size(10);
        }
        group.measurement_time(Duration::from_secs(4));

        for case in &CASES {
            let Some((x, w)) = prepare(&target, case.name, || {
                let x = random_tensor(backend, 1, &[case.m, case.k])?;
                let w = random_weight(backend, 2, case.dtype, &[case.n, case.k])?;
                backend.matmul(&x, &w, None)?;
                Ok((x, w))
            }) else {
                continue;
            };
            let throughput = if case.m == 1 {
                Throughput::Bytes((case.n * case.k * case.dtype.size_in_bytes()) as u64)
            } else {
                Throughput::Elements((2 * case.m * case.k * case.n) as u64)
            };
            group.throughput(throughput);
            group.bench_function(case.name, |b| {
                b.iter(|| black_box(backend.matmul(&x, &w, None).expect("matmul")))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, matmul);
criterion_main!(benches);
