//! The GPU backend under a forced 1 KiB storage-binding limit: weights split into row chunks and
//! activations bound in windows, the way the 151936 × 896 unembedding and long-prompt logits run under
//! lavapipe's 128 MiB limit, here with tiny data.

use std::sync::OnceLock;

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::gpu::{GpuBackend, GpuOptions};
use qwenlens_kernels::{AttentionParams, Backend, DType, KernelError, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LIMIT: u64 = 1024;
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn gpu() -> &'static GpuBackend {
    static GPU: OnceLock<GpuBackend> = OnceLock::new();
    GPU.get_or_init(|| {
        let options = GpuOptions {
            max_binding_bytes: Some(LIMIT),
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

#[track_caller]
fn compare(tolerance: f32, what: &str, op: impl Fn(&dyn Backend) -> Vec<Vec<f32>>) {
    let expected = op(cpu());
    let actual = op(gpu());
    for (index, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert_close(a, e, tolerance, &format!("{what} output {index}"));
    }
}

#[test]
fn forced_limit_is_in_effect() {
    assert_eq!(gpu().max_binding_bytes(), LIMIT);
}

#[test]
fn chunked_matmul_matches_cpu() {
    let mut rng = StdRng::seed_from_u64(21);
    // f32 weights of 37 × 24 take 3552 bytes (4 chunks); k = 23 gives half-precision rows that end
    // mid-word; 9 × 37 f32 outputs take 1332 bytes, more than one binding.
    for dtype in DTYPES {
        for (m, k, n) in [
            (9, 24, 37),
            (9, 23, 37),
            (1, 23, 37),
            (1, 24, 37),
            (30, 5, 11),
        ] {
            let x = random(&mut rng, m * k);
            let w = reference::f32_to_weight_bytes(dtype, &random(&mut rng, n * k));
            let bias = reference::f32_to_weight_bytes(dtype, &random(&mut rng, n));
            assert!(
                w.len() as u64 > LIMIT || (m * n * 4) as u64 > LIMIT,
                "case {m}x{k}x{n} must exceed the limit"
            );
            compare(1e-4, &format!("chunked matmul {dtype} {m}x{k}x{n}"), |b| {
                let x = b.upload(&x, &[m, k]).unwrap();
                let w = b.upload_weight(dtype, &[n, k], &w).unwrap();
                let bias = b.upload_weight(dtype, &[n], &bias).unwrap();
                vec![b.read(&b.matmul(&x, &w, Some(&bias)).unwrap()).unwrap()]
            });
        }
    }
}

#[test]
fn chunked_embedding_matches_cpu() {
    let mut rng = StdRng::seed_from_u64(22);
    let (vocab, d) = (41, 23);
    let table = random(&mut rng, vocab * d);
    let ids = [40u32, 0, 13, 27, 40, 5];
    for dtype in DTYPES {
        let bytes = reference::f32_to_weight_bytes(dtype, &table);
        compare(0.0, &format!("chunked embedding {dtype}"), |b| {
            let w = b.upload_weight(dtype, &[vocab, d], &bytes).unwrap();
            vec![b.read(&b.embedding(&w, &ids).unwrap()).unwrap()]
        });
    }
}

#[test]
fn windowed_row_ops_match_cpu() {
    let mut rng = StdRng::seed_from_u64(23);
    let (rows, width) = (9, 37);
    let logits: Vec<f32> = random(&mut rng, rows * width)
        .iter()
        .map(|v| v * 10.0)
        .collect();
    let other = random(&mut rng, rows * width);
    let weight = reference::f32_to_weight_bytes(DType::BF16, &random(&mut rng, width));
    let cols: Vec<u32> = (0..rows as u32).map(|r| (r * 7) % width as u32).collect();
    compare(1e-5, "windowed row ops", |b| {
        let x = b.upload(&logits, &[rows, width]).unwrap();
        let y = b.upload(&other, &[rows, width]).unwrap();
        let w = b.upload_weight(DType::BF16, &[width], &weight).unwrap();
        vec![
            b.read(&x).unwrap(),
            b.read(&b.logsumexp(&x).unwrap()).unwrap(),
            b.read(&b.gather_rows(&x, &[8, 0, 4, 8]).unwrap()).unwrap(),
            b.read(&b.gather_cols(&x, &cols).unwrap()).unwrap(),
            b.read(&b.add(&x, &y).unwrap()).unwrap(),
            b.read(&b.silu_mul(&x, &y).unwrap()).unwrap(),
            b.read(&b.mul_weight(&x, &w).unwrap()).unwrap(),
        ]
    });
}

#[test]
fn weight_row_over_limit_is_device_limit_error() {
    let bytes = vec![0u8; 2 * 300 * 4];
    let err = gpu()
        .upload_weight(DType::F32, &[2, 300], &bytes)
        .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::DeviceLimit {
                op: "upload_weight",
                limit: LIMIT,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn attention_over_limit_is_device_limit_error() {
    // Scores of 1 × 2 × 16 × 16 f32 values take 2048 bytes, more than one binding.
    let params = AttentionParams {
        batch: 1,
        q_len: 16,
        kv_len: 16,
        n_heads: 2,
        n_kv_heads: 1,
        d_head: 2,
        key_start: vec![0],
        scale: 0.5,
        want_scores: false,
        want_pattern: false,
    };
    let q = gpu().upload(&[0.1; 16 * 2 * 2], &[16, 2, 2]).unwrap();
    let kv = gpu().upload(&[0.1; 16 * 2], &[16, 1, 2]).unwrap();
    let err = gpu().attention(&q, &kv, &kv, &params, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::DeviceLimit {
                op: "attention",
                ..
            }
        ),
        "{err}"
    );
}
