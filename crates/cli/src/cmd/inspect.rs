//! `qwenlens inspect`: a checkpoint's configuration and weight files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use qwenlens_weights::Checkpoint;
use serde::Serialize;

use crate::common::{ModelArgs, resolve_model_dir};

#[derive(clap::Args)]
#[command(mut_arg("device", |arg| arg.help(DEVICE_HELP)))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Help of `--device`, which `inspect` shares with the subcommands that run the model.
const DEVICE_HELP: &str = "Accepted for uniformity with the other subcommands and checked, but \
                           unused: inspect runs no model";

/// Everything `inspect` reports, in the order it is printed.
#[derive(Serialize)]
struct Report {
    model: String,
    folder: PathBuf,
    n_layers: usize,
    d_model: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    d_mlp: usize,
    d_vocab: usize,
    dtype: String,
    tied_embeddings: bool,
    unembedding: String,
    parameters: usize,
    rope_theta: f64,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    eos_token_ids: Vec<u32>,
    files: Vec<FileReport>,
    unexpected_tensors: Vec<String>,
}

#[derive(Serialize)]
struct FileReport {
    path: PathBuf,
    size: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = resolve_model_dir(&args.model)?;
    let checkpoint = Checkpoint::open(&dir)?;
    let config = checkpoint.config();

    let report = Report {
        model: args.model.model.clone(),
        folder: dir,
        n_layers: config.n_layers(),
        d_model: config.d_model(),
        n_heads: config.n_heads(),
        n_kv_heads: config.n_kv_heads(),
        d_head: config.d_head(),
        d_mlp: config.d_mlp(),
        d_vocab: config.d_vocab(),
        dtype: checkpoint.dtype().to_string(),
        tied_embeddings: checkpoint.is_tied(),
        unembedding: checkpoint.unembedding_name().to_string(),
        parameters: checkpoint.parameter_count(),
        rope_theta: config.rope_theta,
        rms_norm_eps: config.rms_norm_eps,
        max_position_embeddings: config.max_position_embeddings,
        eos_token_ids: checkpoint.eos_token_ids().to_vec(),
        files: checkpoint
            .files()
            .into_iter()
            .map(|file| FileReport {
                path: file.path,
                size: file.size,
            })
            .collect(),
        unexpected_tensors: checkpoint.unexpected_tensors().to_vec(),
    };

    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&report)?)
    } else {
        format_table(&report)
    };
    // `print!` panics when stdout is closed or full; a failed write is an ordinary error here.
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the report to stdout")?;
    Ok(())
}

fn format_table(report: &Report) -> String {
    let tied = if report.tied_embeddings {
        format!("yes (unembedding is {})", report.unembedding)
    } else {
        format!("no (unembedding is {})", report.unembedding)
    };
    let eos: Vec<String> = report.eos_token_ids.iter().map(u32::to_string).collect();
    let eos = if eos.is_empty() {
        "none (generation stops only at the token limit)".to_string()
    } else {
        eos.join(", ")
    };
    let rows = [
        ("model", report.model.clone()),
        ("folder", report.folder.display().to_string()),
        ("n_layers", report.n_layers.to_string()),
        ("d_model", report.d_model.to_string()),
        ("n_heads", report.n_heads.to_string()),
        ("n_kv_heads", report.n_kv_heads.to_string()),
        ("d_head", report.d_head.to_string()),
        ("d_mlp", report.d_mlp.to_string()),
        ("d_vocab", report.d_vocab.to_string()),
        ("dtype", report.dtype.clone()),
        ("tied", tied),
        ("parameters", group_thousands(report.parameters as u64)),
        ("rope_theta", report.rope_theta.to_string()),
        ("rms_norm_eps", format!("{:e}", report.rms_norm_eps)),
        (
            "max_position_embeddings",
            report.max_position_embeddings.to_string(),
        ),
        ("eos_token_ids", eos),
    ];

    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{key:<24} {value}\n"));
    }
    out.push_str("files\n");
    for file in &report.files {
        out.push_str(&format!(
            "  {}  {} bytes\n",
            file.path.display(),
            group_thousands(file.size)
        ));
    }
    if !report.unexpected_tensors.is_empty() {
        out.push_str("unexpected tensors (ignored)\n");
        for name in &report.unexpected_tensors {
            out.push_str(&format!("  {name}\n"));
        }
    }
    out
}

/// `494032768` as `494,032,768`.
fn group_thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::group_thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1000), "1,000");
        assert_eq!(group_thousands(494_032_768), "494,032,768");
    }
}
