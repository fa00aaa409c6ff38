//! `cargo xtask bench`: whole-model benchmarks on a real checkpoint. Every measurement runs in a
//! fresh child process (this binary with `--child NAME`), so each reports its own peak resident
//! memory (`VmHWM`) and no measurement inherits another's caches or allocations.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use qwenlens_kernels::{Device, create_backend};
use qwenlens_model::{GenerateOptions, HookFilter, Hooks, Model, TokenBatch};
use qwenlens_weights::{ChatMessage, Checkpoint, ModelSource};
use serde::{Deserialize, Serialize};

use crate::run_analysis::sweep::{SweepMode, zero_ablation_sweep};
use crate::run_analysis::{DEFAULT_QUESTION, DEFAULT_SYSTEM};

/// Text repeated to build the prefill inputs; any prose works, the token count is what matters.
const FILLER: &str = "The residual stream carries information from layer to layer, and each attention \
head reads from it, moves information between positions, and writes its result back. ";

/// Marker of the result line a child prints on standard output.
const RESULT_PREFIX: &str = "QWENLENS_BENCH_RESULT ";

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder or Hugging Face hub id.
    #[arg(long, default_value = "Qwen/Qwen2.5-0.5B-Instruct")]
    pub model: String,

    /// Hub revision when --model is a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Backend: auto, gpu or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Timed repetitions of each forward measurement (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,

    /// New tokens of the decode measurement.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,

    /// Measurements to run, comma-separated (default: all). Names: prefill-64, prefill-512, decode,
    /// run-with-cache-64, sweep-fast, sweep-naive.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,

    /// JSON output file (default: runs/bench-<UTC timestamp>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Runs one measurement in this process and prints its result (used by the parent process).
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

/// Every measurement, in the order they run.
const MEASUREMENTS: [&str; 6] = [
    "prefill-64",
    "prefill-512",
    "decode",
    "run-with-cache-64",
    "sweep-fast",
    "sweep-naive",
];

/// One measurement's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    pub name: String,
    /// Description of the timed work.
    pub description: String,
    /// Median wall time of the timed part, in seconds.
    pub seconds: f64,
    /// Every timed repetition, in seconds.
    pub samples: Vec<f64>,
    /// Throughput derived from the median, with its unit (e.g. `tokens/s`), if it has one.
    pub rate: Option<f64>,
    pub rate_unit: Option<String>,
    /// Wall time of loading the model in the child, in seconds.
    pub load_seconds: f64,
    /// Peak resident memory of the child process (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
    /// Extra numbers of this measurement (e.g. the loss of a sweep).
    pub details: serde_json::Value,
}

/// The whole benchmark report, as written to JSON.
#[derive(Debug, Serialize)]
struct Report {
    model: String,
    backend: String,
    machine: Machine,
    build_profile: &'static str,
    measurements: Vec<Measurement>,
    /// Measurements that failed, with their errors.
    failures: Vec<String>,
}

/// The machine a benchmark ran on.
#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    logical_cpus: usize,
    memory_bytes: u64,
    load_average_start: String,
    load_average_end: String,
}

/// Runs the benchmarks (or, with `--child`, one measurement).
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(name) = &args.child {
        let measurement = measure(&args, name)?;
        println!("{RESULT_PREFIX}{}", serde_json::to_string(&measurement)?);
        return Ok(());
    }

    let selected: Vec<&str> = if args.only.is_empty() {
        MEASUREMENTS.to_vec()
    } else {
        for name in &args.only {
            if !MEASUREMENTS.contains(&name.as_str()) {
                bail!(
                    "unknown measurement {name:?} in --only; choose from {}",
                    MEASUREMENTS.join(", ")
                );
            }
        }
        MEASUREMENTS
            .iter()
            .copied()
            .filter(|m| args.only.iter().any(|o| o == m))
            .collect()
    };
    let device: Device = args.device.parse()?;
    let backend_name = create_backend(device)?.name();

    let load_average_start = load_average();
    eprintln!("load average before: {load_average_start}");
    let mut measurements = Vec::new();
    let mut failures = Vec::new();
    for name in selected {
        eprintln!("measuring {name} ...");
        match run_child(&args, name) {
            Ok(measurement) => {
                eprintln!("  {}", row(&measurement));
                measurements.push(measurement);
            }
            // The other measurements still run, so one failure does not cost the whole session.
            Err(error) => {
                eprintln!("  {name} failed: {error:#}");
                failures.push(format!("{name}: {error:#}"));
            }
        }
    }

    let report = Report {
        model: args.model.clone(),
        backend: backend_name,
        machine: Machine {
            cpu: cpu_name(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: meminfo_total(),
            load_average_start,
            load_average_end: load_average(),
        },
        build_profile: if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        },
        measurements,
        failures: failures.clone(),
    };

    println!("{}", table(&report));
    let out = args.out.clone().unwrap_or_else(|| {
        let timestamp = crate::run_analysis::utc_timestamp(std::time::SystemTime::now());
        PathBuf::from("runs").join(format!("bench-{}.json", timestamp.compact))
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    xtask::report::write_atomic(&out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("wrote {}", out.display());
    if !failures.is_empty() {
        bail!(
            "{} measurements failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

/// Runs one measurement in a fresh process of this binary and parses its result line.
fn run_child(args: &Args, name: &str) -> anyhow::Result<Measurement> {
    // /proc/self/exe still runs this binary after cargo rebuilds (and so deletes) the file on disk.
    let proc_exe = PathBuf::from("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe
    } else {
        std::env::current_exe().context("cannot find the running xtask binary")?
    };
    let output = Command::new(exe)
        .args([
            "bench",
            "--model",
            &args.model,
            "--revision",
            &args.revision,
        ])
        .args([
            "--device",
            &args.device,
            "--repeats",
            &args.repeats.to_string(),
        ])
        .args([
            "--decode-tokens",
            &args.decode_tokens.to_string(),
            "--child",
            name,
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start the {name} measurement"))?;
    if !output.status.success() {
        bail!("the {name} measurement failed ({})", output.status);
    }

    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .with_context(|| format!("the {name} measurement printed no result"))?;
    serde_json::from_str(line).with_context(|| format!("invalid result of the {name} measurement"))
}

fn load_model(args: &Args) -> anyhow::Result<(Model, f64)> {
    let started = Instant::now();
    let source = ModelSource::parse(&args.model, &args.revision)?;
    let checkpoint = Checkpoint::load(&source)
        .with_context(|| format!("failed to load model {}", args.model))?;
    let backend = create_backend(args.device.parse()?)?;
    let model = Model::from_checkpoint(&checkpoint, backend)?;
    Ok((model, started.elapsed().as_secs_f64()))
}

/// Prompt ids of exactly `n` tokens, from repeated prose.
fn filler_ids(model: &Model, n: usize) -> anyhow::Result<Vec<u32>> {
    let tokenizer = model
        .tokenizer()
        .context("the model has no tokenizer.json")?;
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < n {
        text.push_str(FILLER);
        ids = tokenizer.encode(&text)?;
    }
    ids.truncate(n);
    Ok(ids)
}

/// The prompt ids of the default run-analysis chat (a system message and the France question).
fn france_ids(model: &Model) -> anyhow::Result<Vec<u32>> {
    let tokenizer = model
        .tokenizer()
        .context("the model has no tokenizer.json")?;
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: DEFAULT_SYSTEM.into(),
        },
        ChatMessage {
            role: "user".into(),
            content: DEFAULT_QUESTION.into(),
        },
    ];
    let text = tokenizer.apply_chat_template(&messages, true)?;
    Ok(tokenizer.encode(&text)?)
}

/// Times `body` once to warm up, then `repeats` times; returns the samples in seconds.
fn time_repeated(
    repeats: usize,
    mut body: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    body()?;
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        body()?;
        samples.push(started.elapsed().as_secs_f64());
    }
    Ok(samples)
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// Runs the measurement `name` in this process.
fn measure(args: &Args, name: &str) -> anyhow::Result<Measurement> {
    let (model, load_seconds) = load_model(args)?;
    let mut details = serde_json::json!({});

    let (description, samples, rate_tokens) = match name {
        "prefill-64" | "prefill-512" => {
            let n: usize = name["prefill-".len()..].parse()?;
            let tokens = TokenBatch::single(&filler_ids(&model, n)?);
            let samples = time_repeated(args.repeats, || {
                model.forward(&tokens)?.last(0)?;
                Ok(())
            })?;
            (
                format!("forward over {n} tokens, logits read back"),
                samples,
                Some(n as f64),
            )
        }
        "decode" => {
            let prompt = france_ids(&model)?;
            let n = args.decode_tokens.max(1);
            // Generating one token costs the prefill; the rest of a longer generation is decode.
            let mut prefill = Vec::new();
            let mut total = Vec::new();
            for _ in 0..args.repeats.max(1) + 1 {
                let started = Instant::now();
                model.generate(
                    &prompt,
                    &GenerateOptions::greedy(1),
                    &Hooks::new(),
                    |_, _| {},
                )?;
                prefill.push(started.elapsed().as_secs_f64());
                let started = Instant::now();
                model.generate(
                    &prompt,
                    &GenerateOptions::greedy(n + 1),
                    &Hooks::new(),
                    |_, _| {},
                )?;
                total.push(started.elapsed().as_secs_f64());
            }
            // The first pair is the warm-up.
            let samples: Vec<f64> = total[1..]
                .iter()
                .zip(&prefill[1..])
                .map(|(t, p)| t - p)
                .collect();
            details = serde_json::json!({ "prompt_tokens": prompt.len(), "prefill_seconds": median(&prefill[1..]) });
            (
                format!(
                    "{n} greedy tokens after the {}-token France chat, KV cache",
                    prompt.len()
                ),
                samples,
                Some(n as f64),
            )
        }
        "run-with-cache-64" => {
            let tokens = TokenBatch::single(&filler_ids(&model, 64)?);
            let mut cache_bytes = 0;
            let samples = time_repeated(args.repeats, || {
                let (_, cache) = model.run_with_cache(&tokens, HookFilter::All)?;
                cache_bytes = cache.size_in_bytes();
                Ok(())
            })?;
            details = serde_json::json!({ "cache_bytes": cache_bytes });
            (
                "run_with_cache of every default hook over 64 tokens".to_string(),
                samples,
                Some(64.0),
            )
        }
        "sweep-fast" | "sweep-naive" => {
            let mode = if name == "sweep-fast" {
                SweepMode::Fast
            } else {
                SweepMode::Naive
            };
            let ids = france_ids(&model)?;
            let started = Instant::now();
            let layers: Vec<usize> = (0..model.n_layers()).collect();
            let result = zero_ablation_sweep(&model, &ids, &layers, mode, |_| {})?;
            let seconds = started.elapsed().as_secs_f64();
            let config = model.config();
            let ablations = config.n_layers() * (config.n_heads() + config.n_kv_heads());
            details = serde_json::json!({
                "prompt_tokens": ids.len(),
                "ablations": ablations,
                "loss_clean": result.loss_clean,
                "heads": result.heads,
                "kv_groups": result.kv_groups,
            });
            (
                format!(
                    "zero-ablation of {} query heads and {} KV groups on the {}-token France chat, {} sweep",
                    config.n_layers() * config.n_heads(),
                    config.n_layers() * config.n_kv_heads(),
                    ids.len(),
                    mode.name()
                ),
                vec![seconds],
                None,
            )
        }
        _ => bail!(
            "unknown measurement {name:?}; choose from {}",
            MEASUREMENTS.join(", ")
        ),
    };

    let seconds = median(&samples);
    Ok(Measurement {
        name: name.to_string(),
        description,
        seconds,
        samples,
        rate: rate_tokens.map(|tokens| tokens / seconds),
        rate_unit: rate_tokens.map(|_| "tokens/s".to_string()),
        load_seconds,
        peak_rss_bytes: vm_hwm()?,
        details,
    })
}

/// Peak resident memory of this process, from `VmHWM` in `/proc/self/status`.
fn vm_hwm() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("/proc/self/status has no VmHWM line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("invalid VmHWM line")?
        .parse()
        .context("invalid VmHWM value")?;
    Ok(kib * 1024)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn meminfo_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn row(m: &Measurement) -> String {
    let rate = match (&m.rate, &m.rate_unit) {
        (Some(rate), Some(unit)) => format!("{rate:.1} {unit}"),
        _ => String::new(),
    };
    format!(
        "{:<18} {:>10.3} s {:>18} {:>9.2} GB peak RSS",
        m.name,
        m.seconds,
        rate,
        m.peak_rss_bytes as f64 / 1e9
    )
}

fn table(report: &Report) -> String {
    let mut text = format!(
        "{} on {} ({}, {} logical CPUs, {} build; load average {} before, {} after)\n",
        report.model,
        report.backend,
        report.machine.cpu,
        report.machine.logical_cpus,
        report.build_profile,
        report.machine.load_average_start,
        report.machine.load_average_end
    );
    text.push_str(&format!(
        "{:<18} {:>12} {:>18} {:>22}\n",
        "measurement", "median", "rate", "peak memory"
    ));
    for m in &report.measurements {
        text.push_str(&row(m));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn vm_hwm_is_positive() {
        assert!(vm_hwm().unwrap() > 0);
    }
}
