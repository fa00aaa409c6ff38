//! Runs the numbered steps of a study: times each one, saves `summary.json` after each, and when a
//! step fails, records where the run stopped and keeps the files already written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use xtask::report::{LayerPatterns, RunStatus, StepRecord, Summary, render_html, write_atomic};

/// The report folder and the summary of a study in progress.
pub struct Runner {
    out: PathBuf,
    /// Every number of the run so far; steps fill in their sections.
    pub summary: Summary,
    /// Attention patterns for the report's viewer.
    pub patterns: Vec<LayerPatterns>,
    total_steps: usize,
}

impl Runner {
    /// Starts a run that writes into `out` (created if missing) and has `total_steps` steps.
    pub fn new(out: PathBuf, summary: Summary, total_steps: usize) -> anyhow::Result<Runner> {
        std::fs::create_dir_all(&out)
            .with_context(|| format!("failed to create the report folder {}", out.display()))?;
        Ok(Runner {
            out,
            summary,
            patterns: Vec::new(),
            total_steps,
        })
    }

    /// Returns the report folder.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Runs the next step, timing it and saving the summary afterwards.
    ///
    /// On error the step is recorded as failed, the summary and the report are written with what
    /// finished, and the error names the step that stopped the run and which files it kept.
    pub fn step<T>(
        &mut self,
        name: &str,
        body: impl FnOnce(&mut Runner) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let index = self.summary.steps.len() + 1;
        eprintln!("\n[{index}/{}] {name}", self.total_steps);
        tracing::info!(step = index, name, "step started");

        let started = Instant::now();
        let result = body(self);
        let seconds = started.elapsed().as_secs_f64();
        self.summary.steps.push(StepRecord {
            index,
            name: name.to_string(),
            seconds,
            ok: result.is_ok(),
        });

        match result {
            Ok(value) => {
                eprintln!("      done in {seconds:.2} s");
                self.save_summary()?;
                Ok(value)
            }
            Err(error) => {
                tracing::error!(
                    step = index,
                    name,
                    error = format!("{error:#}"),
                    "step failed"
                );
                self.summary.status = RunStatus::Stopped {
                    step: index,
                    step_name: name.to_string(),
                    error: format!("{error:#}"),
                };
                let kept = self.save_partial();
                Err(error.context(format!(
                    "the run stopped at step {index} of {} ({name}); {kept}",
                    self.total_steps
                )))
            }
        }
    }

    /// Writes `bytes` to `relative` inside the report folder (through a temporary file) and lists
    /// it in the summary.
    pub fn write_file(&mut self, relative: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.out.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        write_atomic(&path, bytes)?;
        self.note_file(relative);
        Ok(path)
    }

    /// Lists a file that another function wrote into the report folder.
    pub fn note_file(&mut self, relative: &str) {
        if !self.summary.files.iter().any(|f| f == relative) {
            self.summary.files.push(relative.to_string());
        }
    }

    /// Writes `summary.json`.
    pub fn save_summary(&mut self) -> anyhow::Result<()> {
        self.note_file("summary.json");
        let json =
            serde_json::to_vec_pretty(&self.summary).context("failed to serialize the summary")?;
        write_atomic(&self.out.join("summary.json"), &json)
    }

    /// Writes `report.html` from the summary and the patterns.
    pub fn save_report(&mut self) -> anyhow::Result<()> {
        self.note_file("report.html");
        let page = render_html(&self.summary, &self.patterns, &self.out)?;
        write_atomic(&self.out.join("report.html"), page.as_bytes())
    }

    /// Saves the summary and the report of a stopped run and describes the files kept.
    fn save_partial(&mut self) -> String {
        let mut problems = Vec::new();
        if let Err(error) = self.save_report() {
            problems.push(format!("report.html could not be written: {error:#}"));
        }
        if let Err(error) = self.save_summary() {
            problems.push(format!("summary.json could not be written: {error:#}"));
        }

        let mut kept = format!(
            "kept in {}: {}",
            self.out.display(),
            self.summary.files.join(", ")
        );
        for problem in problems {
            kept.push_str("; ");
            kept.push_str(&problem);
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_step_keeps_earlier_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut runner = Runner::new(dir.path().join("run"), Summary::default(), 3).unwrap();

        runner
            .step("first", |run| {
                run.write_file("generation.txt", b"Paris")?;
                Ok(())
            })
            .unwrap();
        let error = runner
            .step("second", |_| -> anyhow::Result<()> {
                anyhow::bail!("out of memory")
            })
            .unwrap_err();

        let message = format!("{error:#}");
        assert!(
            message.contains("stopped at step 2 of 3 (second)"),
            "{message}"
        );
        assert!(message.contains("generation.txt"), "{message}");
        assert!(message.contains("out of memory"), "{message}");
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("run/summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["status"]["state"], "stopped");
        assert_eq!(summary["status"]["step"], 2);
        assert_eq!(summary["steps"][1]["ok"], false);
        assert!(dir.path().join("run/report.html").is_file());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("run/generation.txt")).unwrap(),
            "Paris"
        );
    }

    #[test]
    fn step_records_time_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut runner = Runner::new(dir.path().to_path_buf(), Summary::default(), 1).unwrap();

        let value = runner
            .step("only", |run| {
                run.write_file("attention/layer00_head00.png", b"png")?;
                Ok(7)
            })
            .unwrap();

        assert_eq!(value, 7);
        assert_eq!(runner.summary.steps.len(), 1);
        assert!(runner.summary.steps[0].ok);
        assert!(
            runner
                .summary
                .files
                .contains(&"attention/layer00_head00.png".to_string())
        );
        assert!(dir.path().join("summary.json").is_file());
    }
}
