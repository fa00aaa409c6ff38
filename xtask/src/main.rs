//! Project tasks, run as `cargo xtask <task>`.

mod bench;
mod run_analysis;
mod validate_shaders;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "qwenlens project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Parse and validate every WGSL file under shaders/ with naga.
    ValidateShaders(validate_shaders::Args),
    /// Run the whole study end to end and write a report folder.
    RunAnalysis(run_analysis::Args),
    /// Time whole forward passes, generation and ablation sweeps on a real checkpoint.
    Bench(bench::Args),
}

/// Runs the task and prints an error as its chain of causes. It skips the backtrace that anyhow's
/// `Debug` adds when RUST_BACKTRACE is set, because a usage error is not a crash.
fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::ValidateShaders(args) => validate_shaders::run(args),
        Task::RunAnalysis(args) => run_analysis::run(args),
        Task::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
