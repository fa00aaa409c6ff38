//! `cargo xtask run-analysis`: the whole study in one command. It loads the model, formats the chat,
//! streams a completion, analyses and draws the attention patterns, ranks every head by ablation,
//! names the most important one, patches its pattern, and generates again. Everything lands in a
//! report folder (`summary.json`, text files, pictures, `importance.csv`, `report.html`).

mod runner;
mod steps;
pub mod sweep;

use std::path::PathBuf;

use xtask::report::{RunStatus, Summary, render_table};

use runner::Runner;

/// The default chat: a system message and one question with a one-word answer.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";
pub const DEFAULT_QUESTION: &str = "What is the capital of France? Answer in one word.";

/// Number of steps of a run, for the `[n/total]` progress lines.
const STEPS: usize = 8;

/// Options of `cargo xtask run-analysis`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (config.json, safetensors, tokenizer.json) or Hugging Face hub id. A hub id is
    /// downloaded once into the hub cache (HF_HOME) and read from there afterwards.
    #[arg(long, default_value = "Qwen/Qwen2.5-0.5B-Instruct")]
    pub model: String,

    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Backend: auto (a real GPU if present, else the CPU), gpu (WGSL through wgpu) or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// JSON file with a list of {"role", "content"} messages, formatted with the model's chat
    /// template.
    #[arg(long, conflicts_with = "prompt")]
    pub chat: Option<PathBuf>,

    /// The user message, sent after the --system message (default: a question about France).
    #[arg(long)]
    pub prompt: Option<String>,

    /// The system message used with --prompt and with the default question.
    #[arg(long, default_value = DEFAULT_SYSTEM)]
    pub system: String,

    /// Decode greedily instead of sampling with the settings of generation_config.json.
    #[arg(long)]
    pub greedy: bool,

    /// Seed of the sampler, used for both generations (default: drawn at random and recorded).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Maximum number of new tokens of each generation.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,

    /// Layers whose attention patterns are analysed and drawn: `all`, or numbers and ranges such as
    /// `0`, `0,5` or `0-3,23`.
    #[arg(long, default_value = "0")]
    pub layers: String,

    /// Replacement pattern for the most important head: uniform (uniform over the causal keys),
    /// previous-token, first-token, self, position:N, or a .npy/.safetensors file with a [k, k]
    /// array that covers the prompt plus --max-new-tokens.
    #[arg(long, default_value = "uniform")]
    pub pattern: String,

    /// Ablation sweep: fast (batched, each layer started from the cached residual stream) or naive
    /// (one full forward per head).
    #[arg(long, value_enum, default_value_t = steps::SweepMode::Fast)]
    pub sweep: steps::SweepMode,

    /// Layers whose heads the ablation sweep ranks (same syntax as --layers); the others stay
    /// empty in the importance table. Fewer layers make a quick check on a slow backend.
    #[arg(long, default_value = "all")]
    pub sweep_layers: String,

    /// Number of heads listed as the top heads.
    #[arg(long, default_value_t = 10)]
    pub top: usize,

    /// Report folder (default: runs/<UTC timestamp>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the study and prints the summary table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let plan = steps::Plan::from_args(&args)?;
    let started = utc_timestamp(std::time::SystemTime::now());
    let out = match &args.out {
        Some(out) => out.clone(),
        None => default_out_dir(&started.compact),
    };
    let command: Vec<String> = std::env::args().skip(1).collect();
    let mut runner = Runner::new(out, Summary::new(started.iso, command), STEPS)?;
    eprintln!("report folder: {}", runner.out().display());

    let result = steps::run_steps(&args, &plan, &mut runner);
    if result.is_ok() {
        runner.summary.status = RunStatus::Complete;
        runner.save_report()?;
        runner.save_summary()?;
    }

    println!(
        "\n{}",
        render_table(&runner.summary, &runner.out().display().to_string())
    );
    result
}

/// A UTC time as ISO 8601 (`2026-12-04T21:30:00Z`) and as a folder name (`20261204-213000`).
pub struct Timestamp {
    pub iso: String,
    pub compact: String,
}

pub fn utc_timestamp(time: std::time::SystemTime) -> Timestamp {
    let seconds = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    Timestamp {
        iso: format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z"),
        compact: format!("{year:04}{month:02}{day:02}-{hour:02}{minute:02}{second:02}"),
    }
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days` algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `runs/<timestamp>`, with a numeric suffix when a run started in the same second.
fn default_out_dir(timestamp: &str) -> PathBuf {
    let base = PathBuf::from("runs").join(timestamp);
    let mut candidate = base.clone();
    let mut suffix = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{}-{suffix}", base.display()));
        suffix += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_from_days_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
    }

    #[test]
    fn utc_timestamp_formats() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(20_791 * 86_400 + 77_405);

        let timestamp = utc_timestamp(time);

        assert_eq!(timestamp.iso, "2026-12-04T21:30:05Z");
        assert_eq!(timestamp.compact, "20261204-213005");
    }
}
