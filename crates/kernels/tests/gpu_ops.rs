//! Every WGSL kernel against the CPU backend on seeded random inputs, with odd shapes: sizes that are
//! not multiples of any tile, one row, 14 query heads on 2 KV heads, cached plus new tokens, left
//! padding, pattern overrides and all three weight dtypes.
//!
//! These tests need a GPU adapter (lavapipe from `mesa-vulkan-drivers` is enough) and fail without one.

use std::sync::OnceLock;

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::gpu::{GpuBackend, GpuOptions, MatmulKernel};
use qwenlens_kernels::{AttentionParams, Backend, DType, KernelError, PatternOverride, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The backend shared by every test of this binary (kernel variant chosen for the adapter).
fn gpu() -> &'static GpuBackend {
    static GPU: OnceLock<GpuBackend> = OnceLock::new();
    GPU.get_or_init(|| {
        GpuBackend::new(GpuOptions::default()).expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

/// A second backend forced to the other prefill matmul kernel, so both variants run here.
fn gpu_other_kernel() -> &'static GpuBackend {
    static GPU: OnceLock<GpuBackend> = OnceLock::new();
    GPU.get_or_init(|| {
        let other = match gpu().matmul_kernel() {
            MatmulKernel::RegisterBlocked => MatmulKernel::Tiled,
            MatmulKernel::Tiled => MatmulKernel::RegisterBlocked,
        };
        let options = GpuOptions {
            matmul_kernel: Some(other),
            warm_up: false,
            ..GpuOptions::default()
        };
        GpuBackend::new(options).expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

fn cpu() -> &'static CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(CpuBackend::new)
}

fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Asserts `|actual - expected| <= tolerance · max(1, |expected|)` element-wise; infinities must
/// match exactly.
#[track_caller]
fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if a == e {
            continue;
        }
        let bound = tolerance * e.abs().max(1.0);
        assert!(
            (a - e).abs() <= bound,
            "{what}[{i}]: got {a}, expected {e} (tolerance {bound})"
        );
    }
}

/// Runs `op` on the GPU and the CPU backend and compares every output it returns.
#[track_caller]
fn compare_with(
    gpu: &dyn Backend,
    tolerance: f32,
    what: &str,
    op: impl Fn(&dyn Backend) -> Vec<Vec<f32>>,
) {
    let expected = op(cpu());
    let actual = op(gpu);
    assert_eq!(actual.len(), expected.len(), "{what}: number of outputs");
    for (index, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert_close(a, e, tolerance, &format!("{what} output {index}"));
    }
}

#[track_caller]
fn compare(tolerance: f32, what: &str, op: impl Fn(&dyn Backend) -> Vec<Vec<f32>>) {
    compare_with(gpu(), tolerance, what, op);
}

#[test]
fn gpu_backend_names_adapter() {
    let name = gpu().name();
    assert!(name.starts_with("wgpu: "), "unexpected name {name}");
    assert!(
        name.contains(&gpu().adapter_info().name),
        "{name} lacks the adapter name"
    );
}

#[test]
fn upload_read_round_trip() {
    let mut rng = StdRng::seed_from_u64(1);
    let data = random(&mut rng, 3 * 5 * 7);
    let x = gpu().upload(&data, &[3, 5, 7]).unwrap();
    assert_eq!(x.shape(), [3, 5, 7]);
    assert_eq!(gpu().read(&x).unwrap(), data);

    let empty = gpu().upload(&[], &[0, 4]).unwrap();
    assert!(gpu().read(&empty).unwrap().is_empty());
}

#[test]
fn embedding_matches_cpu_all_dtypes() {
    let mut rng = StdRng::seed_from_u64(2);
    let (vocab, d) = (37, 13);
    let table = random(&mut rng, vocab * d);
    let ids = [0u32, 36, 5, 5, 17, 1, 30];
    for dtype in DTYPES {
        let bytes = reference::f32_to_weight_bytes(dtype, &table);
        compare(0.0, &format!("embedding {dtype}"), |b| {
            let w = b.upload_weight(dtype, &[vocab, d], &bytes).unwrap();
            vec![b.read(&b.embedding(&w, &ids).unwrap()).unwrap()]
        });
    }
}

#[test]
fn embedding_rejects_out_of_range_id() {
    let w = gpu()
        .upload_weight(DType::F32, &[4, 2], &[0u8; 32])
        .unwrap();
    let err = gpu().embedding(&w, &[1, 4]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::OutOfRange {
                value: 4,
                limit: 4,
                ..
            }
        ),
        "{err}"
    );
}

/// (m, k, n): one row (GEMV), a few rows, and sizes off every tile multiple.
const MATMUL_CASES: [(usize, usize, usize); 6] = [
    (1, 37, 53),
    (1, 64, 8),
    (2, 9, 1),
    (5, 24, 19),
    (33, 45, 70),
    (64, 32, 64),
];

fn check_matmul(backend: &dyn Backend, label: &str) {
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in DTYPES {
        for (m, k, n) in MATMUL_CASES {
            let x = random(&mut rng, m * k);
            let w = reference::f32_to_weight_bytes(dtype, &random(&mut rng, n * k));
            let bias = reference::f32_to_weight_bytes(dtype, &random(&mut rng, n));
            compare_with(
                backend,
                1e-4,
                &format!("{label} matmul {dtype} {m}x{k}x{n}"),
                |b| {
                    let x = b.upload(&x, &[m, k]).unwrap();
                    let w = b.upload_weight(dtype, &[n, k], &w).unwrap();
                    let bias = b.upload_weight(dtype, &[n], &bias).unwrap();
                    let plain = b.matmul(&x, &w, None).unwrap();
                    let biased = b.matmul(&x, &w, Some(&bias)).unwrap();
                    assert_eq!(biased.shape(), [m, n]);
                    vec![b.read(&plain).unwrap(), b.read(&biased).unwrap()]
                },
            );
        }
    }
}

#[test]
fn matmul_matches_cpu_all_dtypes() {
    check_matmul(gpu(), "default kernel");
}

#[test]
fn matmul_other_kernel_matches_cpu() {
    check_matmul(gpu_other_kernel(), "other kernel");
}

#[test]
fn matmul_keeps_leading_dims_and_mixed_bias_dtype() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = random(&mut rng, 2 * 3 * 11);
    let w = reference::f32_to_weight_bytes(DType::BF16, &random(&mut rng, 7 * 11));
    let bias = reference::f32_to_weight_bytes(DType::F32, &random(&mut rng, 7));
    compare(1e-4, "matmul bf16 weight, f32 bias", |b| {
        let x = b.upload(&x, &[2, 3, 11]).unwrap();
        let w = b.upload_weight(DType::BF16, &[7, 11], &w).unwrap();
        let bias = b.upload_weight(DType::F32, &[7], &bias).unwrap();
        let y = b.matmul(&x, &w, Some(&bias)).unwrap();
        assert_eq!(y.shape(), [2, 3, 7]);
        vec![b.read(&y).unwrap()]
    });
}

#[test]
fn matmul_rejects_mismatched_k() {
    let x = gpu().upload(&[0.0; 6], &[2, 3]).unwrap();
    let w = gpu()
        .upload_weight(DType::F32, &[2, 4], &[0u8; 32])
        .unwrap();
    let err = gpu().matmul(&x, &w, None).unwrap_err();
    assert!(
        matches!(err, KernelError::Shape { op: "matmul", .. }),
        "{err}"
    );
}

#[test]
fn rms_norm_and_mul_weight_match_cpu() {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, d) = (7, 45);
    let x = random(&mut rng, rows * d);
    let weight = random(&mut rng, d);
    for dtype in DTYPES {
        let bytes = reference::f32_to_weight_bytes(dtype, &weight);
        compare(1e-5, &format!("rms_norm + mul_weight {dtype}"), |b| {
            let x = b.upload(&x, &[1, rows, d]).unwrap();
            let (normed, scale) = b.rms_norm(&x, 1e-6).unwrap();
            assert_eq!(scale.shape(), [1, rows, 1]);
            let w = b.upload_weight(dtype, &[d], &bytes).unwrap();
            let y = b.mul_weight(&normed, &w).unwrap();
            vec![
                b.read(&normed).unwrap(),
                b.read(&scale).unwrap(),
                b.read(&y).unwrap(),
            ]
        });
    }
}

#[test]
fn rope_matches_cpu_at_late_positions() {
    let mut rng = StdRng::seed_from_u64(6);
    let (rows, n_heads, d_head) = (5, 14, 10);
    let x = random(&mut rng, rows * n_heads * d_head);
    let positions = [0u32, 1, 2, 4095, 31999];
    compare(1e-5, "rope", |b| {
        let x = b.upload(&x, &[rows, n_heads, d_head]).unwrap();
        vec![
            b.read(&b.rope(&x, &positions, 1_000_000.0).unwrap())
                .unwrap(),
        ]
    });
}

#[test]
fn rope_rejects_wrong_position_count() {
    let x = gpu().upload(&[0.0; 8], &[2, 1, 4]).unwrap();
    let err = gpu().rope(&x, &[0], 10000.0).unwrap_err();
    assert!(
        matches!(err, KernelError::Shape { op: "rope", .. }),
        "{err}"
    );
}

struct AttentionCase {
    name: &'static str,
    params: AttentionParams,
    override_heads: Vec<usize>,
}

fn attention_case(
    name: &'static str,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    key_start: Vec<usize>,
    override_heads: Vec<usize>,
) -> AttentionCase {
    let (n_heads, n_kv_heads, d_head) = (14, 2, 8);
    AttentionCase {
        name,
        params: AttentionParams {
            batch,
            q_len,
            kv_len,
            n_heads,
            n_kv_heads,
            d_head,
            key_start,
            scale: 1.0 / (d_head as f32).sqrt(),
            want_scores: true,
            want_pattern: true,
        },
        override_heads,
    }
}

#[test]
fn attention_matches_cpu_and_reference() {
    let cases = [
        attention_case("one token", 1, 1, 1, vec![0], vec![]),
        attention_case("33 tokens", 1, 33, 33, vec![0], vec![]),
        attention_case("cached plus new", 2, 3, 8, vec![0, 0], vec![]),
        attention_case("decode step", 2, 1, 9, vec![0, 4], vec![]),
        attention_case("left padding", 3, 6, 6, vec![0, 2, 5], vec![]),
        attention_case("overrides", 2, 4, 7, vec![0, 3], vec![3, 13]),
    ];
    let mut rng = StdRng::seed_from_u64(7);
    for case in cases {
        let p = &case.params;
        let q = random(&mut rng, p.batch * p.q_len * p.n_heads * p.d_head);
        let k = random(&mut rng, p.batch * p.kv_len * p.n_kv_heads * p.d_head);
        let v = random(&mut rng, p.batch * p.kv_len * p.n_kv_heads * p.d_head);
        let overrides: Vec<(usize, Vec<f32>)> = case
            .override_heads
            .iter()
            .map(|&head| (head, random(&mut rng, p.batch * p.q_len * p.kv_len)))
            .collect();

        let run = |b: &dyn Backend| {
            let qt = b
                .upload(&q, &[p.batch * p.q_len, p.n_heads, p.d_head])
                .unwrap();
            let kt = b
                .upload(&k, &[p.batch * p.kv_len, p.n_kv_heads, p.d_head])
                .unwrap();
            let vt = b
                .upload(&v, &[p.batch * p.kv_len, p.n_kv_heads, p.d_head])
                .unwrap();
            let ov: Vec<PatternOverride> = overrides
                .iter()
                .map(|(head, pattern)| PatternOverride {
                    head: *head,
                    pattern: b.upload(pattern, &[p.batch, p.q_len, p.kv_len]).unwrap(),
                })
                .collect();
            let out = b.attention(&qt, &kt, &vt, p, &ov).unwrap();
            assert_eq!(out.z.shape(), [p.batch * p.q_len, p.n_heads, p.d_head]);
            vec![
                b.read(&out.z).unwrap(),
                b.read(out.scores.as_ref().unwrap()).unwrap(),
                b.read(out.pattern.as_ref().unwrap()).unwrap(),
            ]
        };
        compare(1e-5, case.name, run);

        let expected = reference::attention(&q, &k, &v, p, &overrides);
        let actual = run(gpu());
        assert_close(
            &actual[0],
            &expected.z,
            1e-5,
            &format!("{} z vs reference", case.name),
        );
        assert_close(
            &actual[1],
            &expected.scores,
            1e-5,
            &format!("{} scores vs reference", case.name),
        );
        assert_close(
            &actual[2],
            &expected.pattern,
            1e-5,
            &format!("{} pattern vs reference", case.name),
        );
    }
}

#[test]
fn attention_padding_rows_are_zero() {
    let p = attention_case("padding", 2, 4, 4, vec![0, 3], vec![]).params;
    let mut rng = StdRng::seed_from_u64(8);
    let b = gpu();
    let q = b
        .upload(&random(&mut rng, 2 * 4 * 14 * 8), &[8, 14, 8])
        .unwrap();
    let k = b
        .upload(&random(&mut rng, 2 * 4 * 2 * 8), &[8, 2, 8])
        .unwrap();
    let v = b
        .upload(&random(&mut rng, 2 * 4 * 2 * 8), &[8, 2, 8])
        .unwrap();
    let out = b.attention(&q, &k, &v, &p, &[]).unwrap();
    let z = b.read(&out.z).unwrap();
    let pattern = b.read(out.pattern.as_ref().unwrap()).unwrap();
    let scores = b.read(out.scores.as_ref().unwrap()).unwrap();

    // Batch item 1 has 3 padding tokens: its queries 0..3 see no key.
    for i in 0..3 {
        let z_row = &z[(4 + i) * 14 * 8..(5 + i) * 14 * 8];
        assert!(
            z_row.iter().all(|&x| x == 0.0),
            "z of padding query {i} is not zero"
        );
        for h in 0..14 {
            let row = ((14 + h) * 4 + i) * 4;
            assert!(
                pattern[row..row + 4].iter().all(|&x| x == 0.0),
                "pattern of padding query {i} head {h}"
            );
            assert!(
                scores[row..row + 4].iter().all(|&x| x == f32::NEG_INFINITY),
                "scores of padding query {i} head {h}"
            );
        }
    }
}

#[test]
fn attention_rejects_bad_override_head() {
    let p = attention_case("bad override", 1, 1, 1, vec![0], vec![]).params;
    let b = gpu();
    let q = b.upload(&[0.0; 14 * 8], &[1, 14, 8]).unwrap();
    let kv = b.upload(&[0.0; 2 * 8], &[1, 2, 8]).unwrap();
    let pattern = b.upload(&[1.0], &[1, 1, 1]).unwrap();
    let overrides = [PatternOverride { head: 14, pattern }];
    let err = b.attention(&q, &kv, &kv, &p, &overrides).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::OutOfRange {
                value: 14,
                limit: 14,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn attention_rejects_two_overrides_of_one_head() {
    let p = attention_case("duplicate override", 1, 1, 1, vec![0], vec![]).params;
    let b = gpu();
    let q = b.upload(&[0.0; 14 * 8], &[1, 14, 8]).unwrap();
    let kv = b.upload(&[0.0; 2 * 8], &[1, 2, 8]).unwrap();
    let pattern = b.upload(&[1.0], &[1, 1, 1]).unwrap();
    let overrides = [
        PatternOverride {
            head: 5,
            pattern: pattern.clone(),
        },
        PatternOverride { head: 5, pattern },
    ];
    let err = b.attention(&q, &kv, &kv, &p, &overrides).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Shape {
                op: "attention",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn elementwise_ops_match_cpu() {
    let mut rng = StdRng::seed_from_u64(9);
    let shape = [3, 67];
    let a: Vec<f32> = random(&mut rng, 201).iter().map(|v| v * 12.0).collect();
    let c = random(&mut rng, 201);
    let mask: Vec<f32> = (0..201)
        .map(|i| if i % 3 == 0 { 1.0 } else { 0.0 })
        .collect();
    compare(1e-6, "silu_mul, add, select", |b| {
        let at = b.upload(&a, &shape).unwrap();
        let ct = b.upload(&c, &shape).unwrap();
        let mt = b.upload(&mask, &shape).unwrap();
        vec![
            b.read(&b.silu_mul(&at, &ct).unwrap()).unwrap(),
            b.read(&b.add(&at, &ct).unwrap()).unwrap(),
            b.read(&b.select(&mt, &at, &ct).unwrap()).unwrap(),
        ]
    });
}

#[test]
fn add_rejects_unequal_shapes() {
    let a = gpu().upload(&[0.0; 6], &[2, 3]).unwrap();
    let b = gpu().upload(&[0.0; 6], &[3, 2]).unwrap();
    let err = gpu().add(&a, &b).unwrap_err();
    assert!(matches!(err, KernelError::Shape { op: "add", .. }), "{err}");
}

#[test]
fn concat_seq_matches_cpu() {
    let mut rng = StdRng::seed_from_u64(10);
    // (batch, cached tokens, new tokens) with rows of [2 KV heads, 5 dims].
    for (batch, t, n) in [(1, 0, 4), (2, 3, 1), (3, 5, 2)] {
        let cache = random(&mut rng, batch * t * 10);
        let new = random(&mut rng, batch * n * 10);
        compare(0.0, &format!("concat_seq batch {batch} t {t} n {n}"), |b| {
            let cache = b.upload(&cache, &[batch * t, 2, 5]).unwrap();
            let new = b.upload(&new, &[batch * n, 2, 5]).unwrap();
            let out = b.concat_seq(&cache, &new, batch).unwrap();
            assert_eq!(out.shape(), [batch * (t + n), 2, 5]);
            vec![b.read(&out).unwrap()]
        });
    }
}

#[test]
fn row_ops_match_cpu() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, width) = (6, 301);
    let mut x: Vec<f32> = random(&mut rng, rows * width)
        .iter()
        .map(|v| v * 20.0)
        .collect();
    // A fully masked row: its log-sum-exp is -inf.
    x[2 * width..3 * width].fill(f32::NEG_INFINITY);
    let cols = [0u32, 300, 7, 150, 42, 299];
    compare(1e-5, "gather_rows, logsumexp, gather_cols", |b| {
        let xt = b.upload(&x, &[2, 3, width]).unwrap();
        let picked = b.gather_rows(&xt, &[5, 0, 5, 3]).unwrap();
        assert_eq!(picked.shape(), [4, width]);
        vec![
            b.read(&picked).unwrap(),
            b.read(&b.logsumexp(&xt).unwrap()).unwrap(),
            b.read(&b.gather_cols(&xt, &cols).unwrap()).unwrap(),
        ]
    });
}

#[test]
fn gather_ops_reject_out_of_range() {
    let x = gpu().upload(&[0.0; 6], &[2, 3]).unwrap();
    let err = gpu().gather_rows(&x, &[2]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::OutOfRange {
                value: 2,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = gpu().gather_cols(&x, &[0, 3]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::OutOfRange {
                value: 3,
                limit: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn operands_of_other_backends_are_rejected() {
    let on_cpu = cpu().upload(&[1.0, 2.0], &[1, 2]).unwrap();
    let on_gpu = gpu().upload(&[1.0, 2.0], &[1, 2]).unwrap();
    let err = gpu().add(&on_cpu, &on_gpu).unwrap_err();
    assert!(
        matches!(err, KernelError::WrongBackend { op: "add", .. }),
        "{err}"
    );

    // A tensor of another GPU backend instance is rejected too.
    let on_other_gpu = gpu_other_kernel().upload(&[1.0, 2.0], &[1, 2]).unwrap();
    let err = gpu().read(&on_other_gpu).unwrap_err();
    assert!(matches!(err, KernelError::WrongBackend { .. }), "{err}");
}
