//! The CPU backend against the scalar references on seeded random inputs, with shapes that are not
//! multiples of any block or vector width.

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{
    AttentionParams, Backend, DType, PatternOverride, Tensor, Weight, reference,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Uploads `values` as a weight of `dtype` and returns it with its values after rounding to `dtype`.
fn weight(
    backend: &CpuBackend,
    dtype: DType,
    shape: &[usize],
    values: &[f32],
) -> (Weight, Vec<f32>) {
    let bytes = reference::f32_to_weight_bytes(dtype, values);
    let rounded = reference::weight_to_f32(dtype, &bytes);
    (
        backend.upload_weight(dtype, shape, &bytes).unwrap(),
        rounded,
    )
}

fn upload(backend: &CpuBackend, values: &[f32], shape: &[usize]) -> Tensor {
    backend.upload(values, shape).unwrap()
}

/// Asserts `|actual - expected| <= tolerance · max(1, |expected|)` element-wise.
#[track_caller]
fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if a == e {
            continue;
        }
        assert!(e.is_finite(), "{what}[{i}]: got {a}, expected {e}");
        let bound = tolerance * e.abs().max(1.0);
        assert!(
            (a - e).abs() <= bound,
            "{what}[{i}]: got {a}, expected {e} (tolerance {bound})"
        );
    }
}

#[test]
fn matmul_matches_reference_all_dtypes_and_row_counts() {
    let mut rng = StdRng::seed_from_u64(1);
    let backend = CpuBackend::with_threads(2);
    // (m, k, n): decode (GEMV path) and prefill (gemm path) with odd sizes.
    let cases = [
        (1, 37, 53),
        (3, 896, 67),
        (4, 9, 1),
        (5, 37, 53),
        (33, 130, 301),
        (64, 64, 1000),
    ];
    for dtype in DTYPES {
        for &(m, k, n) in &cases {
            let x = random(&mut rng, m * k);
            let (w, w_values) = weight(&backend, dtype, &[n, k], &random(&mut rng, n * k));
            let (bias, bias_values) = weight(&backend, dtype, &[n], &random(&mut rng, n));
            let xt = upload(&backend, &x, &[m, k]);

            let out = backend.matmul(&xt, &w, Some(&bias)).unwrap();
            assert_eq!(out.shape(), &[m, n]);
            let expected = reference::matmul(&x, &w_values, Some(&bias_values), m, k, n);
            let tolerance = 1e-5 * (k as f32).sqrt();
            assert_close(
                &backend.read(&out).unwrap(),
                &expected,
                tolerance,
                &format!("{dtype} {m}x{k}x{n}"),
            );

            let no_bias = backend.matmul(&xt, &w, None).unwrap();
            let expected = reference::matmul(&x, &w_values, None, m, k, n);
            assert_close(
                &backend.read(&no_bias).unwrap(),
                &expected,
                tolerance,
                "no bias",
            );
        }
    }
}

#[test]
fn matmul_keeps_leading_dimensions() {
    let mut rng = StdRng::seed_from_u64(2);
    let backend = CpuBackend::new();
    let x = random(&mut rng, 2 * 3 * 8);
    let (w, _) = weight(&backend, DType::BF16, &[5, 8], &random(&mut rng, 40));
    let out = backend
        .matmul(&upload(&backend, &x, &[2, 3, 8]), &w, None)
        .unwrap();
    assert_eq!(out.shape(), &[2, 3, 5]);
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let backend = CpuBackend::new();
    let x = upload(&backend, &[0.0; 12], &[3, 4]);
    let (w, _) = weight(&backend, DType::F32, &[2, 5], &[0.0; 10]);
    let err = backend.matmul(&x, &w, None).unwrap_err();
    assert!(err.to_string().contains("last dimension of 5"), "{err}");

    let (w, _) = weight(&backend, DType::F32, &[2, 4], &[0.0; 8]);
    let (bias, _) = weight(&backend, DType::F32, &[3], &[0.0; 3]);
    assert!(backend.matmul(&x, &w, Some(&bias)).is_err());

    let (w3, _) = weight(&backend, DType::F32, &[1, 2, 4], &[0.0; 8]);
    assert!(backend.matmul(&x, &w3, None).is_err());
}

#[test]
fn rms_norm_and_mul_weight_match_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    let backend = CpuBackend::with_threads(2);
    for (rows, width) in [(1, 896), (33, 67), (2000, 24)] {
        let x = random(&mut rng, rows * width);
        let (normalized, scale) = backend
            .rms_norm(&upload(&backend, &x, &[rows, width]), 1e-6)
            .unwrap();
        assert_eq!(scale.shape(), &[rows, 1]);
        let (expected_normalized, expected_scale) = reference::rms_norm(&x, width, 1e-6);
        assert_close(
            &backend.read(&normalized).unwrap(),
            &expected_normalized,
            1e-5,
            "normalized",
        );
        assert_close(
            &backend.read(&scale).unwrap(),
            &expected_scale,
            1e-5,
            "scale",
        );

        for dtype in DTYPES {
            let (w, w_values) = weight(&backend, dtype, &[width], &random(&mut rng, width));
            let out = backend.mul_weight(&normalized, &w).unwrap();
            let expected = reference::mul_weight(&backend.read(&normalized).unwrap(), &w_values);
            assert_eq!(backend.read(&out).unwrap(), expected, "{dtype}");
        }
    }
}

#[test]
fn mul_weight_rejects_wrong_length() {
    let backend = CpuBackend::new();
    let x = upload(&backend, &[1.0; 6], &[2, 3]);
    let (w, _) = weight(&backend, DType::F32, &[4], &[1.0; 4]);
    assert!(backend.mul_weight(&x, &w).is_err());
}

#[test]
fn rope_matches_reference() {
    let mut rng = StdRng::seed_from_u64(4);
    let backend = CpuBackend::with_threads(2);
    for (rows, heads, d_head) in [(1, 14, 64), (33, 2, 16), (7, 3, 6)] {
        let x = random(&mut rng, rows * heads * d_head);
        let positions: Vec<u32> = (0..rows as u32).map(|r| r * 97 + 3).collect();
        let out = backend
            .rope(
                &upload(&backend, &x, &[rows, heads, d_head]),
                &positions,
                1e6,
            )
            .unwrap();
        let expected = reference::rope(&x, &positions, heads, d_head, 1e6);
        assert_close(&backend.read(&out).unwrap(), &expected, 1e-6, "rope");
    }
}

/// Position 0 leaves a vector unchanged, and any rotation keeps its norm.
#[test]
fn rope_rotation_properties() {
    let mut rng = StdRng::seed_from_u64(5);
    let backend = CpuBackend::new();
    let x = random(&mut rng, 2 * 8);
    let out = backend
        .read(
            &backend
                .rope(&upload(&backend, &x, &[2, 1, 8]), &[0, 1000], 1e4)
                .unwrap(),
        )
        .unwrap();
    assert_eq!(&out[..8], &x[..8]);
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
    assert!((norm(&out[8..]) - norm(&x[8..])).abs() < 1e-5);
    assert_ne!(&out[8..], &x[8..]);
}

#[test]
fn rope_rejects_bad_shapes() {
    let backend = CpuBackend::new();
    let x = upload(&backend, &[0.0; 12], &[2, 1, 6]);
    assert!(
        backend.rope(&x, &[0], 1e6).is_err(),
        "one position for two rows"
    );
    let odd = upload(&backend, &[0.0; 10], &[2, 1, 5]);
    assert!(backend.rope(&odd, &[0, 1], 1e6).is_err(), "odd d_head");
    let flat = upload(&backend, &[0.0; 12], &[2, 6]);
    assert!(backend.rope(&flat, &[0, 1], 1e6).is_err(), "two dimensions");
}

struct AttentionCase {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    key_start: Vec<usize>,
    override_heads: Vec<usize>,
}

fn check_attention(case: AttentionCase, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let backend = CpuBackend::with_threads(2);
    let c = &case;
    let q = random(&mut rng, c.batch * c.q_len * c.n_heads * c.d_head);
    let k = random(&mut rng, c.batch * c.kv_len * c.n_kv_heads * c.d_head);
    let v = random(&mut rng, c.batch * c.kv_len * c.n_kv_heads * c.d_head);
    let params = AttentionParams {
        batch: c.batch,
        q_len: c.q_len,
        kv_len: c.kv_len,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        d_head: c.d_head,
        key_start: c.key_start.clone(),
        scale: 1.0 / (c.d_head as f32).sqrt(),
        want_scores: true,
        want_pattern: true,
    };
    let override_values: Vec<(usize, Vec<f32>)> = c
        .override_heads
        .iter()
        .map(|&h| {
            (
                h,
                random(&mut rng, c.batch * c.q_len * c.kv_len)
                    .iter()
                    .map(|v| v.abs())
                    .collect(),
            )
        })
        .collect();
    let overrides: Vec<PatternOverride> = override_values
        .iter()
        .map(|(head, values)| PatternOverride {
            head: *head,
            pattern: upload(&backend, values, &[c.batch, c.q_len, c.kv_len]),
        })
        .collect();

    let out = backend
        .attention(
            &upload(&backend, &q, &[c.batch * c.q_len, c.n_heads, c.d_head]),
            &upload(&backend, &k, &[c.batch * c.kv_len, c.n_kv_heads, c.d_head]),
            &upload(&backend, &v, &[c.batch * c.kv_len, c.n_kv_heads, c.d_head]),
            &params,
            &overrides,
        )
        .unwrap();
    let expected = reference::attention(&q, &k, &v, &params, &override_values);

    let tolerance = 1e-5 * (c.kv_len as f32).sqrt();
    assert_eq!(out.z.shape(), &[c.batch * c.q_len, c.n_heads, c.d_head]);
    assert_eq!(
        out.pattern.as_ref().unwrap().shape(),
        &[c.batch, c.n_heads, c.q_len, c.kv_len]
    );
    let scores = backend.read(out.scores.as_ref().unwrap()).unwrap();
    assert_close(&scores, &expected.scores, tolerance, "scores");
    assert_close(
        &backend.read(out.pattern.as_ref().unwrap()).unwrap(),
        &expected.pattern,
        tolerance,
        "pattern",
    );
    assert_close(&backend.read(&out.z).unwrap(), &expected.z, tolerance, "z");
}

#[test]
fn attention_gqa_prefill_33_tokens() {
    let case = AttentionCase {
        batch: 1,
        q_len: 33,
        kv_len: 33,
        n_heads: 14,
        n_kv_heads: 2,
        d_head: 64,
        key_start: vec![0],
        override_heads: vec![],
    };
    check_attention(case, 10);
}

#[test]
fn attention_single_token() {
    let case = AttentionCase {
        batch: 1,
        q_len: 1,
        kv_len: 1,
        n_heads: 14,
        n_kv_heads: 2,
        d_head: 64,
        key_start: vec![0],
        override_heads: vec![],
    };
    check_attention(case, 11);
}

#[test]
fn attention_cached_keys_with_left_padding() {
    let case = AttentionCase {
        batch: 3,
        q_len: 2,
        kv_len: 9,
        n_heads: 6,
        n_kv_heads: 2,
        d_head: 16,
        key_start: vec![0, 4, 8],
        override_heads: vec![],
    };
    check_attention(case, 12);
}

#[test]
fn attention_padding_rows_are_zero() {
    // key_start 5 hides every key from the first queries of batch item 1.
    let case = AttentionCase {
        batch: 2,
        q_len: 7,
        kv_len: 7,
        n_heads: 4,
        n_kv_heads: 4,
        d_head: 6,
        key_start: vec![0, 5],
        override_heads: vec![],
    };
    check_attention(case, 13);

    let backend = CpuBackend::new();
    let params = AttentionParams {
        batch: 1,
        q_len: 3,
        kv_len: 3,
        n_heads: 1,
        n_kv_heads: 1,
        d_head: 2,
        key_start: vec![2],
        scale: 1.0,
        want_scores: true,
        want_pattern: true,
    };
    let qkv = upload(&backend, &[1.0; 6], &[3, 1, 2]);
    let out = backend.attention(&qkv, &qkv, &qkv, &params, &[]).unwrap();
    let z = backend.read(&out.z).unwrap();
    assert_eq!(&z[..4], &[0.0; 4], "queries 0 and 1 see no key");
    assert_eq!(&z[4..], &[1.0, 1.0]);
    let scores = backend.read(out.scores.as_ref().unwrap()).unwrap();
    assert!(scores[..8].iter().all(|s| *s == f32::NEG_INFINITY));
    assert_eq!(
        backend.read(out.pattern.as_ref().unwrap()).unwrap()[..8],
        [0.0; 8]
    );
}

#[test]
fn attention_pattern_overrides() {
    let case = AttentionCase {
        batch: 2,
        q_len: 5,
        kv_len: 8,
        n_heads: 14,
        n_kv_heads: 2,
        d_head: 8,
        key_start: vec![1, 0],
        override_heads: vec![0, 9],
    };
    check_attention(case, 14);
}

#[test]
fn attention_long_padded_batch_with_override() {
    // 40 queries span two blocks of query rows, and cached keys shift the causal diagonal.
    let case = AttentionCase {
        batch: 2,
        q_len: 40,
        kv_len: 45,
        n_heads: 14,
        n_kv_heads: 2,
        d_head: 64,
        key_start: vec![0, 10],
        override_heads: vec![3],
    };
    check_attention(case, 15);
}

#[test]
fn attention_rejects_bad_operands() {
    let backend = CpuBackend::new();
    let params = AttentionParams {
        batch: 1,
        q_len: 2,
        kv_len: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_head: 4,
        key_start: vec![0],
        scale: 0.5,
        want_scores: false,
        want_pattern: false,
    };
    let q = upload(&backend, &[0.0; 32], &[2, 4, 4]);
    let kv = upload(&backend, &[0.0; 16], &[2, 2, 4]);
    assert!(backend.attention(&q, &kv, &kv, &params, &[]).is_ok());
    assert!(
        backend.attention(&kv, &kv, &kv, &params, &[]).is_err(),
        "q with kv shape"
    );

    let bad = AttentionParams {
        n_kv_heads: 3,
        ..params.clone()
    };
    assert!(
        backend.attention(&q, &kv, &kv, &bad, &[]).is_err(),
        "4 heads on 3 KV heads"
    );
    let bad = AttentionParams {
        key_start: vec![],
        ..params.clone()
    };
    assert!(
        backend.attention(&q, &kv, &kv, &bad, &[]).is_err(),
        "key_start length"
    );
    let bad = AttentionParams {
        q_len: 3,
        ..params.clone()
    };
    assert!(
        backend.attention(&q, &kv, &kv, &bad, &[]).is_err(),
        "q_len > kv_len"
    );

    let pattern = upload(&backend, &[0.0; 4], &[1, 2, 2]);
    let out_of_range = [PatternOverride {
        head: 4,
        pattern: pattern.clone(),
    }];
    assert!(
        backend
            .attention(&q, &kv, &kv, &params, &out_of_range)
            .is_err()
    );
    let wrong_shape = [PatternOverride {
        head: 1,
        pattern: upload(&backend, &[0.0; 4], &[4]),
    }];
    assert!(
        backend
            .attention(&q, &kv, &kv, &params, &wrong_shape)
            .is_err()
    );
}

#[test]
fn elementwise_ops_match_reference() {
    let mut rng = StdRng::seed_from_u64(6);
    let backend = CpuBackend::with_threads(2);
    let n = 40_001;
    let (a, b) = (random(&mut rng, n), random(&mut rng, n));
    let mask: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let (ta, tb, tm) = (
        upload(&backend, &a, &[n]),
        upload(&backend, &b, &[n]),
        upload(&backend, &mask, &[n]),
    );

    let silu = backend.read(&backend.silu_mul(&ta, &tb).unwrap()).unwrap();
    assert_close(&silu, &reference::silu_mul(&a, &b), 1e-6, "silu_mul");
    assert_eq!(
        backend.read(&backend.add(&ta, &tb).unwrap()).unwrap(),
        reference::add(&a, &b)
    );
    let selected = backend
        .read(&backend.select(&tm, &ta, &tb).unwrap())
        .unwrap();
    assert_eq!(selected, reference::select(&mask, &a, &b));

    let short = upload(&backend, &a[..10], &[10]);
    assert!(backend.add(&ta, &short).is_err());
    assert!(backend.silu_mul(&short, &ta).is_err());
    assert!(backend.select(&tm, &ta, &short).is_err());
}

#[test]
fn concat_seq_appends_per_batch_item() {
    let mut rng = StdRng::seed_from_u64(7);
    let backend = CpuBackend::new();
    let (batch, t, added, heads, d) = (3, 5, 2, 2, 3);
    let cache = random(&mut rng, batch * t * heads * d);
    let new = random(&mut rng, batch * added * heads * d);
    let out = backend
        .concat_seq(
            &upload(&backend, &cache, &[batch * t, heads, d]),
            &upload(&backend, &new, &[batch * added, heads, d]),
            batch,
        )
        .unwrap();
    assert_eq!(out.shape(), &[batch * (t + added), heads, d]);
    assert_eq!(
        backend.read(&out).unwrap(),
        reference::concat_seq(&cache, &new, batch, heads * d)
    );

    let empty = upload(&backend, &[], &[0, heads, d]);
    let first = backend.concat_seq(
        &empty,
        &upload(&backend, &new, &[batch * added, heads, d]),
        batch,
    );
    assert_eq!(backend.read(&first.unwrap()).unwrap(), new);

    let other_width = upload(&backend, &new[..batch * added * d], &[batch * added, 1, d]);
    assert!(
        backend
            .concat_seq(
                &upload(&backend, &cache, &[batch * t, heads, d]),
                &other_width,
                batch
            )
            .is_err()
    );
    assert!(
        backend.concat_seq(&empty, &other_width, 4).is_err(),
        "batch does not divide rows"
    );
    assert!(
        backend.concat_seq(&empty, &other_width, 0).is_err(),
        "zero batch"
    );
}

#[test]
fn gather_and_logsumexp_match_reference() {
    let mut rng = StdRng::seed_from_u64(8);
    let backend = CpuBackend::with_threads(2);
    let (rows, width) = (5, 151_936);
    let x: Vec<f32> = random(&mut rng, rows * width)
        .iter()
        .map(|v| v * 30.0)
        .collect();
    let t = upload(&backend, &x, &[rows, width]);

    let lse = backend.read(&backend.logsumexp(&t).unwrap()).unwrap();
    assert_close(&lse, &reference::logsumexp(&x, width), 1e-6, "logsumexp");

    let picked = [4, 0, 4];
    let gathered = backend.gather_rows(&t, &picked).unwrap();
    assert_eq!(gathered.shape(), &[3, width]);
    assert_eq!(
        backend.read(&gathered).unwrap(),
        reference::gather_rows(&x, width, &picked)
    );
    assert!(backend.gather_rows(&t, &[5]).is_err());

    let cols = [0, 151_935, 7, 100, 3];
    assert_eq!(
        backend
            .read(&backend.gather_cols(&t, &cols).unwrap())
            .unwrap(),
        reference::gather_cols(&x, width, &cols)
    );
    assert!(
        backend.gather_cols(&t, &[0, 1]).is_err(),
        "one column per row"
    );
    assert!(
        backend.gather_cols(&t, &[0, 0, 0, 0, 151_936]).is_err(),
        "column out of range"
    );
}

#[test]
fn embedding_reads_all_dtypes() {
    let mut rng = StdRng::seed_from_u64(9);
    let backend = CpuBackend::new();
    let (vocab, d_model) = (50, 13);
    for dtype in DTYPES {
        let (table, values) = weight(
            &backend,
            dtype,
            &[vocab, d_model],
            &random(&mut rng, vocab * d_model),
        );
        let ids = [3, 49, 0, 3];
        let out = backend.embedding(&table, &ids).unwrap();
        assert_eq!(out.shape(), &[4, d_model]);
        assert_eq!(
            backend.read(&out).unwrap(),
            reference::embedding(&values, d_model, &ids),
            "{dtype}"
        );

        let err = backend.embedding(&table, &[1, 50]).unwrap_err();
        assert!(err.to_string().contains("token id 50"), "{err}");
    }
}

#[test]
fn upload_checks_lengths() {
    let backend = CpuBackend::new();
    assert!(backend.upload(&[1.0; 5], &[2, 3]).is_err());
    let err = backend
        .upload_weight(DType::BF16, &[2, 3], &[0; 11])
        .unwrap_err();
    assert!(err.to_string().contains("expected 12 bytes"), "{err}");
    assert!(backend.upload_weight(DType::F32, &[2, 3], &[0; 24]).is_ok());
}

#[test]
fn name_reports_threads() {
    assert_eq!(CpuBackend::with_threads(3).name(), "cpu (3 threads)");
    assert_eq!(CpuBackend::with_threads(1).name(), "cpu (1 thread)");
}

#[test]
fn foreign_tensors_are_rejected() {
    let backend = CpuBackend::new();
    let foreign = Tensor::new(vec![2, 2], std::sync::Arc::new(0u8));
    let foreign_weight = Weight::new(vec![2, 2], DType::F32, std::sync::Arc::new(0u8));
    let own = upload(&backend, &[1.0; 4], &[2, 2]);
    let is_wrong_backend = |e: qwenlens_kernels::KernelError| {
        matches!(e, qwenlens_kernels::KernelError::WrongBackend { .. })
    };

    assert!(is_wrong_backend(backend.read(&foreign).unwrap_err()));
    assert!(is_wrong_backend(backend.add(&own, &foreign).unwrap_err()));
    assert!(is_wrong_backend(
        backend.matmul(&own, &foreign_weight, None).unwrap_err()
    ));
    assert!(is_wrong_backend(
        backend.embedding(&foreign_weight, &[0]).unwrap_err()
    ));
    assert!(is_wrong_backend(
        backend.rms_norm(&foreign, 1e-6).unwrap_err()
    ));
}
