//! Matmul kernel variants of the GPU backend side by side on one adapter (written for lavapipe), in
//! wall time and process CPU time per call.
//!
//! On a shared machine, wall time also measures the other processes. The variants therefore
//! alternate round by round (A B A B ...) on the same inputs, so load changes hit both alike. Each
//! call is followed by `GpuBackend::wait`, because kernels return once their work is submitted.
//! Process CPU time is utime + stime from `/proc/self/stat`, the same accounting as
//! `getrusage(RUSAGE_SELF)`: it includes lavapipe's worker threads and not time spent descheduled.
//! With `LP_NUM_THREADS` threads and an otherwise idle machine, wall ≈ CPU / threads.
//!
//! ```text
//! LP_NUM_THREADS=2 cargo bench -p qwenlens-benches --bench lavapipe
//! LAVAPIPE_BENCH_CASES=gemm,prefill LAVAPIPE_BENCH_ROUNDS=4 cargo bench -p qwenlens-benches --bench lavapipe
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use qwenlens_benches::{random_tensor, random_weight};
use qwenlens_kernels::gpu::{GpuBackend, GpuOptions, MatmulKernel};
use qwenlens_kernels::{Backend, DType};

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on x86-64 and arm64 Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Minimum wall time of one round of one variant; at least two calls run per round.
const ROUND_TIME: Duration = Duration::from_millis(1500);

/// One benchmarked product `x[m, k] · w[n, k]ᵀ`.
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    dtype: DType,
}

const CASES: [Case; 7] = [
    // Almost no arithmetic: the time per call is the overhead of one matmul (output and uniform
    // buffers, bind group, error scopes, submit and wait).
    Case {
        name: "overhead f32 1x8x8",
        m: 1,
        k: 8,
        n: 8,
        dtype: DType::F32,
    },
    Case {
        name: "gemm f32 1024x1024x1024",
        m: 1024,
        k: 1024,
        n: 1024,
        dtype: DType::F32,
    },
    Case {
        name: "prefill f32 64x896x4864",
        m: 64,
        k: 896,
        n: 4864,
        dtype: DType::F32,
    },
    Case {
        name: "prefill bf16 64x896x4864",
        m: 64,
        k: 896,
        n: 4864,
        dtype: DType::BF16,
    },
    Case {
        name: "decode bf16 1x896x4864",
        m: 1,
        k: 896,
        n: 4864,
        dtype: DType::BF16,
    },
    Case {
        name: "decode f32 1x896x151936",
        m: 1,
        k: 896,
        n: 151_936,
        dtype: DType::F32,
    },
    Case {
        name: "decode bf16 1x896x151936",
        m: 1,
        k: 896,
        n: 151_936,
        dtype: DType::BF16,
    },
];

/// A kernel variant under comparison.
struct Variant {
    label: &'static str,
    backend: GpuBackend,
}

/// User plus system CPU ticks of this process (all threads), or `None` off Linux.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name start at field 3 (state); utime and stime are
    // fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Wall and CPU seconds per call over one round.
fn measure_round(mut call: impl FnMut()) -> (f64, f64) {
    let started = Instant::now();
    let start_ticks = cpu_ticks().unwrap_or(0);
    let mut calls = 0u32;
    while calls < 2 || started.elapsed() < ROUND_TIME {
        call();
        calls += 1;
    }
    let wall = started.elapsed().as_secs_f64() / f64::from(calls);
    let ticks = cpu_ticks().unwrap_or(0) - start_ticks;
    (wall, ticks as f64 / TICKS_PER_SECOND / f64::from(calls))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn open(label: &'static str, kernel: MatmulKernel, vec4_loads: bool) -> Option<Variant> {
    let options = GpuOptions {
        matmul_kernel: Some(kernel),
        vec4_loads,
        ..GpuOptions::default()
    };
    match GpuBackend::new(options) {
        Ok(backend) => Some(Variant { label, backend }),
        Err(err) => {
            eprintln!("lavapipe bench: no GPU adapter for {label}: {err}");
            None
        }
    }
}

fn main() {
    let requested_cases: Vec<String> = std::env::var("LAVAPIPE_BENCH_CASES")
        .map(|list| list.split(',').map(|s| s.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let rounds: usize = std::env::var("LAVAPIPE_BENCH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);

    let variants: Vec<Variant> = [
        open("scalar loads", MatmulKernel::RegisterBlocked, false),
        open("vec4 loads", MatmulKernel::RegisterBlocked, true),
    ]
    .into_iter()
    .flatten()
    .collect();
    let Some(first) = variants.first() else {
        return;
    };
    println!(
        "# {} with LP_NUM_THREADS={}, {rounds} rounds per variant, load average at start {}",
        first.backend.name(),
        std::env::var("LP_NUM_THREADS").unwrap_or_else(|_| "unset".to_owned()),
        load_average()
    );
    println!(
        "{:26} {:13} {:>11} {:>11} {:>11} {:>9} {:>9}",
        "case", "variant", "wall best", "wall med", "CPU med", "GFLOP/s", "per CPU"
    );

    for case in &CASES {
        if !requested_cases.is_empty()
            && !requested_cases
                .iter()
                .any(|requested| case.name.contains(requested.as_str()))
        {
            continue;
        }

        // Each variant gets its own copies, since a tensor belongs to the backend that made it.
        let operands: Vec<_> = variants
            .iter()
            .map(|variant| {
                let backend = &variant.backend;
                let x = random_tensor(backend, 1, &[case.m, case.k]).expect("upload x");
                let w = random_weight(backend, 2, case.dtype, &[case.n, case.k]).expect("upload w");
                (x, w)
            })
            .collect();

        // One warm-up call per variant, whose outputs must agree.
        let outputs: Vec<Vec<f32>> = variants
            .iter()
            .zip(&operands)
            .map(|(variant, (x, w))| {
                let y = variant.backend.matmul(x, w, None).expect("matmul");
                variant.backend.read(&y).expect("read")
            })
            .collect();
        let max_diff = outputs
            .iter()
            .skip(1)
            .flat_map(|other| other.iter().zip(&outputs[0]).map(|(a, b)| (a - b).abs()))
            .fold(0.0f32, f32::max);

        let mut walls = vec![Vec::new(); variants.len()];
        let mut cpus = vec![Vec::new(); variants.len()];
        for _ in 0..rounds {
            for (index, (variant, (x, w))) in variants.iter().zip(&operands).enumerate() {
                let (wall, cpu) = measure_round(|| {
                    black_box(variant.backend.matmul(x, w, None).expect("matmul"));
                    variant.backend.wait().expect("wait");
                });
                walls[index].push(wall);
                cpus[index].push(cpu);
            }
        }

        let flop = 2.0 * (case.m * case.k * case.n) as f64;
        for (index, variant) in variants.iter().enumerate() {
            let best = walls[index].iter().copied().fold(f64::INFINITY, f64::min);
            let wall = median(&mut walls[index]);
            let cpu = median(&mut cpus[index]);
            println!(
                "{:26} {:13} {:>9.2}ms {:>9.2}ms {:>9.2}ms {:>4.2}/{:<4.2} {:>9.2}",
                case.name,
                variant.label,
                best * 1e3,
                wall * 1e3,
                cpu * 1e3,
                flop / best / 1e9,
                flop / wall / 1e9,
                flop / cpu / 1e9
            );
        }
        println!("{:26} max |difference| between variants {max_diff:.2e}", "");
    }
    println!("# load average at end {}", load_average());
}
