//! Single-threaded CPU time per `matmul` and `attention` call on the CPU backend, at the shapes of
//! the criterion benches.
//!
//! Wall-clock benchmarks on a shared machine measure the other processes as much as the kernel.
//! Process CPU time of a one-thread backend does not count time spent descheduled, so it compares
//! per-core efficiency even under load; `benches/openblas.py --cpu-time` measures numpy the same
//! way. Linux only (it reads `/proc/self/stat`).
//!
//! ```text
//! cargo bench -p qwenlens-benches --bench cpu_time
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use qwenlens_benches::{random_tensor, random_weight};
use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{AttentionParams, Backend, DType};

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on x86-64 and arm64 Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time to spend per case: 150 ticks, so the 10 ms tick adds under 1 % error.
const CPU_TICKS_PER_CASE: u64 = 150;

/// User plus system CPU ticks of this process, or `None` off Linux.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name start at field 3 (state); utime and stime are
    // fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Returns CPU seconds per call of `call`, measured over `CPU_TICKS_PER_CASE` ticks (or a minute
/// of wall time, whichever comes first).
fn cpu_seconds_per_call(mut call: impl FnMut()) -> Option<f64> {
    call();
    let started = Instant::now();
    let start = cpu_ticks()?;
    let mut calls = 0u64;
    while cpu_ticks()? - start < CPU_TICKS_PER_CASE && started.elapsed() < Duration::from_secs(60) {
        call();
        calls += 1;
    }
    Some((cpu_ticks()? - start) as f64 / TICKS_PER_SECOND / calls as f64)
}

fn main() {
    // Criterion-style flags such as `--bench` are passed by cargo and ignored here.
    let backend = CpuBackend::with_threads(1);
    if cpu_ticks().is_none() {
        eprintln!("cpu_time: /proc/self/stat is not readable; this benchmark runs on Linux only");
        return;
    }
    println!("# {} (process CPU time per call)", backend.name());

    let matmuls = [
        ("gemm f32 1024x1024x1024", 1024, 1024, 1024, DType::F32),
        ("prefill f32 64x896->4864", 64, 896, 4864, DType::F32),
        ("prefill bf16 64x896->4864", 64, 896, 4864, DType::BF16),
        ("decode bf16 1x896->4864", 1, 896, 4864, DType::BF16),
        ("decode bf16 1x896->151936", 1, 896, 151_936, DType::BF16),
        ("decode f32 1x896->151936", 1, 896, 151_936, DType::F32),
    ];
    for (name, m, k, n, dtype) in matmuls {
        let x = random_tensor(&backend, 1, &[m, k]).expect("upload to the CPU backend");
        let w = random_weight(&backend, 2, dtype, &[n, k]).expect("upload to the CPU backend");
        let Some(seconds) = cpu_seconds_per_call(|| {
            black_box(backend.matmul(&x, &w, None).expect("matmul"));
        }) else {
            return;
        };
        let flops = 2.0 * (m * k * n) as f64;
        let weight_bytes = (n * k * dtype.size_in_bytes()) as f64;
        println!(
            "{name:28} {:10.1} us {:7.2} GFLOP/s {:6.2} GB/s of weights",
            seconds * 1e6,
            flops / seconds / 1e9,
            weight_bytes / seconds / 1e9
        );
    }

    let (n_heads, n_kv_heads, d_head) = (14, 2, 64);
    for (name, q_len, kv_len) in [
        ("attention prefill 64", 64, 64),
        ("attention prefill 512", 512, 512),
        ("attention decode 1 of 512", 1, 512),
    ] {
        let q = random_tensor(&backend, 1, &[q_len, n_heads, d_head])
            .expect("upload to the CPU backend");
        let k = random_tensor(&backend, 2, &[kv_len, n_kv_heads, d_head])
            .expect("upload to the CPU backend");
        let v = random_tensor(&backend, 3, &[kv_len, n_kv_heads, d_head])
            .expect("upload to the CPU backend");
        let params = AttentionParams {
            batch: 1,
            q_len,
            kv_len,
            n_heads,
            n_kv_heads,
            d_head,
            key_start: vec![0],
            scale: 1.0 / (d_head as f32).sqrt(),
            want_scores: false,
            want_pattern: false,
        };
        let Some(seconds) = cpu_seconds_per_call(|| {
            black_box(
                backend
                    .attention(&q, &k, &v, &params, &[])
                    .expect("attention"),
            );
        }) else {
            return;
        };
        let visible_pairs: usize = (0..q_len).map(|i| kv_len - q_len + i + 1).sum();
        let flops = (visible_pairs * n_heads * 4 * d_head) as f64;
        println!(
            "{name:28} {:10.1} us {:7.2} GFLOP/s",
            seconds * 1e6,
            flops / seconds / 1e9
        );
    }
}
