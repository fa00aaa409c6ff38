//! The summary table printed on the terminal at the end of a run.

use std::fmt::Write as _;

use super::summary::{RunStatus, Summary};

/// Renders the steps with their wall times and the main results as a plain-text table.
pub fn render_table(summary: &Summary, folder: &str) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();

    for step in &summary.steps {
        let outcome = if step.ok { "" } else { "  FAILED" };
        rows.push((
            format!("{}. {}", step.index, step.name),
            format!("{:.2} s{outcome}", step.seconds),
        ));
    }
    let total: f64 = summary.steps.iter().map(|s| s.seconds).sum();
    rows.push(("total".to_string(), format!("{total:.2} s")));
    rows.push((String::new(), String::new()));

    if let Some(model) = &summary.model {
        rows.push(("model".into(), model.source.clone()));
        rows.push(("backend".into(), model.backend.clone()));
    }
    rows.push(("prompt tokens".into(), summary.prompt_ids.len().to_string()));
    if let Some(generation) = &summary.generation {
        rows.push((
            "generation".into(),
            format!(
                "{} tokens, {:.2} tokens/s: {}",
                generation.ids.len(),
                generation.tokens_per_second,
                one_line(&generation.text, 60)
            ),
        ));
    }
    if let Some(importance) = &summary.importance {
        let top: Vec<String> = importance
            .top_heads
            .iter()
            .take(3)
            .map(|s| format!("L{}H{} {:+.3}", s.layer, s.head, s.delta))
            .collect();
        rows.push((
            "top heads (Δ loss)".into(),
            format!(
                "{} (clean loss {:.3})",
                top.join(", "),
                importance.loss_clean
            ),
        ));
    }
    if let Some(head) = &summary.most_important_head {
        rows.push((
            "most important head".into(),
            format!("layer {} head {}", head.layer, head.head),
        ));
    }
    if let Some(patch) = &summary.patch {
        rows.push((
            format!(
                "patched L{}H{} ({})",
                patch.layer, patch.head, patch.pattern
            ),
            format!(
                "loss {:.4} → {:.4} (Δ {:+.4}): {}",
                patch.loss_clean,
                patch.loss_patched,
                patch.loss_patched - patch.loss_clean,
                one_line(&patch.text, 40)
            ),
        ));
    }
    match &summary.status {
        RunStatus::Stopped {
            step, step_name, ..
        } => rows.push((
            "status".into(),
            format!("stopped at step {step} ({step_name})"),
        )),
        RunStatus::Complete => rows.push(("status".into(), "complete".into())),
        RunStatus::Running => rows.push(("status".into(), "running".into())),
    }
    rows.push(("report".into(), folder.to_string()));

    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut table = String::new();
    for (key, value) in rows {
        if key.is_empty() {
            table.push('\n');
            continue;
        }
        let _ = writeln!(table, "{key:<width$}  {value}");
    }
    table
}

/// Shows `text` on one line, newlines as ↵, cut to `max_chars` characters with an ellipsis.
fn one_line(text: &str, max_chars: usize) -> String {
    let flat = text.replace('\n', "↵");
    if flat.chars().count() <= max_chars {
        return flat;
    }
    let cut: String = flat.chars().take(max_chars).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::summary::StepRecord;

    #[test]
    fn table_lists_steps_and_total() {
        let summary = Summary {
            steps: vec![
                StepRecord {
                    index: 1,
                    name: "load model".into(),
                    seconds: 1.5,
                    ok: true,
                },
                StepRecord {
                    index: 2,
                    name: "format chat".into(),
                    seconds: 0.25,
                    ok: false,
                },
            ],
            ..Summary::default()
        };

        let table = render_table(&summary, "runs/x");

        assert!(table.contains("1. load model"), "{table}");
        assert!(table.contains("0.25 s  FAILED"), "{table}");
        assert!(table.contains("1.75 s"), "{table}");
    }

    #[test]
    fn one_line_cuts_long_text() {
        assert_eq!(one_line("a\nbc", 10), "a↵bc");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }
}
