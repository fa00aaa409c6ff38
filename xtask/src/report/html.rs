//! `report.html`: one self-contained page (inline CSS and JavaScript, data embedded as JSON,
//! pictures as base64 data URIs) that works offline.
//!
//! The attention viewer reads its state from the URL fragment on load
//! (`report.html#layer=0&head=3&hover=5`) and writes it back to the DOM, so a headless browser can
//! check it. `#viewer` carries `data-layer`, `data-head` and `data-hover`, and every token of
//! `#viewer-tokens` carries the hovered query's attention weight in `data-weight`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use serde::Serialize;

use super::summary::{RunStatus, Summary};

/// Attention patterns of one layer on the prompt, for the interactive viewer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPatterns {
    pub layer: usize,
    pub n_heads: usize,
    pub n_tokens: usize,
    /// Row-major `[n_heads, n_tokens (query), n_tokens (key)]`.
    pub weights: Vec<f32>,
}

/// Data of the page's script: the viewer's patterns and pictures.
#[derive(Serialize)]
struct PageData<'a> {
    tokens: &'a [String],
    /// Patterns rounded to 4 decimals, `[layer][head][query][key]`.
    layers: Vec<ViewerLayer>,
    importance: Option<&'a [Vec<f32>]>,
}

#[derive(Serialize)]
struct ViewerLayer {
    layer: usize,
    patterns: Vec<Vec<Vec<f32>>>,
    /// Data URI of each head's picture, `null` where the picture is missing.
    pictures: Vec<Option<String>>,
}

const STYLE: &str = include_str!("report.css");
const SCRIPT: &str = include_str!("report.js");

/// Renders `report.html` for `summary`, embedding the pictures it lists (read from `folder`) and
/// the attention `patterns` of the analysed layers.
///
/// A picture that cannot be read is left out with a note on the page, so a partial run still gets a
/// report.
pub fn render_html(
    summary: &Summary,
    patterns: &[LayerPatterns],
    folder: &Path,
) -> anyhow::Result<String> {
    for layer in patterns {
        let expected = layer.n_heads * layer.n_tokens * layer.n_tokens;
        anyhow::ensure!(
            layer.weights.len() == expected,
            "attention patterns of layer {} hold {} values, expected {} heads × {} × {} = {expected}",
            layer.layer,
            layer.weights.len(),
            layer.n_heads,
            layer.n_tokens,
            layer.n_tokens
        );
        anyhow::ensure!(
            layer.n_tokens == summary.prompt_tokens.len(),
            "attention patterns of layer {} cover {} tokens but the prompt has {}",
            layer.layer,
            layer.n_tokens,
            summary.prompt_tokens.len()
        );
    }

    let mut missing = Vec::new();
    let data = PageData {
        tokens: &summary.prompt_tokens,
        layers: patterns
            .iter()
            .map(|layer| viewer_layer(summary, layer, folder, &mut missing))
            .collect(),
        importance: summary.importance.as_ref().map(|i| i.table.as_slice()),
    };
    let json = serde_json::to_string(&data).context("failed to serialize the report data")?;

    let mut page = String::with_capacity(json.len() + 64 * 1024);
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    page.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(page, "<title>{}</title>", escape(&title(summary)));
    let _ = writeln!(page, "<style>\n{STYLE}</style>\n</head>\n<body>");
    let _ = writeln!(page, "<h1>{}</h1>", escape(&title(summary)));

    page.push_str(&status_section(summary));
    page.push_str(&prompt_section(summary));
    page.push_str(&viewer_section(patterns));
    page.push_str(&importance_section(summary, folder, &mut missing));
    page.push_str(&generation_section(summary));
    page.push_str(&steps_section(summary));

    if !missing.is_empty() {
        page.push_str("<section><h2>Missing pictures</h2><ul>");
        for note in &missing {
            let _ = write!(page, "<li>{}</li>", escape(note));
        }
        page.push_str("</ul></section>\n");
    }

    // `<` only occurs inside JSON strings, where `\u003c` means the same, so the data cannot
    // close the script element early.
    let _ = writeln!(
        page,
        "<script type=\"application/json\" id=\"report-data\">{}</script>",
        json.replace('<', "\\u003c")
    );
    let _ = writeln!(page, "<script>\n{SCRIPT}</script>\n</body>\n</html>");
    Ok(page)
}

fn title(summary: &Summary) -> String {
    match &summary.model {
        Some(model) => format!("qwenlens run-analysis: {}", model.source),
        None => "qwenlens run-analysis".to_string(),
    }
}

fn viewer_layer(
    summary: &Summary,
    layer: &LayerPatterns,
    folder: &Path,
    missing: &mut Vec<String>,
) -> ViewerLayer {
    let n = layer.n_tokens;
    let patterns = (0..layer.n_heads)
        .map(|head| {
            (0..n)
                .map(|query| {
                    let start = (head * n + query) * n;
                    layer.weights[start..start + n]
                        .iter()
                        .map(|w| (w * 1e4).round() / 1e4)
                        .collect()
                })
                .collect()
        })
        .collect();

    let listed = summary
        .attention
        .iter()
        .find(|a| a.layer == layer.layer)
        .map(|a| a.pictures.as_slice())
        .unwrap_or_default();
    let pictures = (0..layer.n_heads)
        .map(|head| {
            let name = listed.get(head)?;
            embed_png(folder, name, missing)
        })
        .collect();

    ViewerLayer {
        layer: layer.layer,
        patterns,
        pictures,
    }
}

fn embed_png(folder: &Path, name: &str, missing: &mut Vec<String>) -> Option<String> {
    match std::fs::read(folder.join(name)) {
        Ok(bytes) => Some(format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )),
        Err(error) => {
            missing.push(format!("{name}: {error}"));
            None
        }
    }
}

fn status_section(summary: &Summary) -> String {
    let mut html = String::from("<section id=\"status\">");
    match &summary.status {
        RunStatus::Complete => html.push_str("<p class=\"ok\">Every step finished.</p>"),
        RunStatus::Running => html.push_str(
            "<p class=\"warn\">This report was written while the run was in progress.</p>",
        ),
        RunStatus::Stopped {
            step,
            step_name,
            error,
        } => {
            let _ = write!(
                html,
                "<p class=\"error\">The run stopped at step {step} ({}): {}. The sections below show what finished.</p>",
                escape(step_name),
                escape(error)
            );
        }
    }

    if let Some(model) = &summary.model {
        let _ = write!(
            html,
            "<table class=\"facts\"><tr><th>model</th><td>{}</td></tr><tr><th>folder</th><td>{}</td></tr>\
             <tr><th>backend</th><td>{}</td></tr><tr><th>shape</th><td>{} layers, {} query heads, {} KV heads, \
             d_model {}, d_head {}, d_mlp {}, d_vocab {}, {} parameters</td></tr><tr><th>started</th><td>{}</td></tr></table>",
            escape(&model.source),
            escape(&model.folder),
            escape(&model.backend),
            model.n_layers,
            model.n_heads,
            model.n_kv_heads,
            model.d_model,
            model.d_head,
            model.d_mlp,
            model.d_vocab,
            model.parameters,
            escape(&summary.created_utc)
        );
    }
    html.push_str("</section>\n");
    html
}

fn prompt_section(summary: &Summary) -> String {
    let mut html = String::from("<section id=\"prompt\"><h2>Prompt</h2>");
    if let Some(prompt) = &summary.prompt {
        html.push_str("<dl class=\"chat\">");
        for message in &prompt.messages {
            let _ = write!(
                html,
                "<dt>{}</dt><dd>{}</dd>",
                escape(&message.role),
                escape(&message.content)
            );
        }
        html.push_str("</dl>");
    }

    let _ = write!(
        html,
        "<p>{} tokens (each decoded on its own; ↵ is a newline):</p><div class=\"tokens\" id=\"prompt-tokens\">",
        summary.prompt_tokens.len()
    );
    for (index, (token, id)) in summary
        .prompt_tokens
        .iter()
        .zip(&summary.prompt_ids)
        .enumerate()
    {
        let _ = write!(
            html,
            "<span class=\"token\" title=\"position {index}, id {id}\">{}</span>",
            escape(&visible(token))
        );
    }
    html.push_str("</div></section>\n");
    html
}

fn viewer_section(patterns: &[LayerPatterns]) -> String {
    if patterns.is_empty() {
        return "<section id=\"attention\"><h2>Attention</h2><p>No attention patterns were recorded.</p></section>\n"
            .to_string();
    }

    let mut html = String::from(
        "<section id=\"attention\"><h2>Attention patterns</h2>\
         <p>Hover a token (the query) to colour every key token by the attention weight it gets from that query; \
         later tokens are masked. Keys: ←/→ move the query, ↑/↓ change the head.</p>\
         <div class=\"controls\"><label>Layer <select id=\"layer-select\">",
    );
    for layer in patterns {
        let _ = write!(html, "<option value=\"{0}\">{0}</option>", layer.layer);
    }
    html.push_str("</select></label> <span>Head</span> <span id=\"head-buttons\"></span></div>");
    html.push_str(
        "<div id=\"viewer\" data-layer=\"\" data-head=\"\" data-hover=\"\">\
         <div class=\"tokens\" id=\"viewer-tokens\"></div>\
         <p id=\"viewer-caption\"></p>\
         <div class=\"viewer-pictures\"><figure><canvas id=\"pattern-canvas\" width=\"420\" height=\"420\"></canvas>\
         <figcaption>Pattern of the selected head (rows: queries, columns: keys); the outlined row is the hovered query.</figcaption></figure>\
         <figure><img id=\"head-picture\" alt=\"picture of the selected head\"><figcaption id=\"head-picture-caption\"></figcaption></figure></div>\
         </div></section>\n",
    );
    html
}

fn importance_section(summary: &Summary, folder: &Path, missing: &mut Vec<String>) -> String {
    let Some(importance) = &summary.importance else {
        return "<section id=\"importance\"><h2>Head importance</h2><p>The ablation sweep did not run.</p></section>\n"
            .to_string();
    };

    let mut html = String::from("<section id=\"importance\"><h2>Head importance</h2>");
    let _ = write!(
        html,
        "<p>Metric: {}, on {}; clean loss {:.4} nats; {} sweep.</p>",
        escape(&importance.metric),
        escape(&importance.scored_tokens),
        importance.loss_clean,
        escape(&importance.sweep)
    );
    if let Some(head) = &summary.most_important_head {
        let _ = write!(
            html,
            "<p class=\"headline\" id=\"most-important\">Most important head: layer {}, head {}.</p>",
            head.layer, head.head
        );
    }

    html.push_str("<div class=\"importance-row\"><div><h3>Top heads</h3><table id=\"top-heads\"><tr><th>rank</th><th>layer</th><th>head</th><th>Δ loss</th></tr>");
    for (rank, score) in importance.top_heads.iter().enumerate() {
        let _ = write!(
            html,
            "<tr data-layer=\"{}\" data-head=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{:+.4}</td></tr>",
            score.layer,
            score.head,
            rank + 1,
            score.layer,
            score.head,
            score.delta
        );
    }
    html.push_str("</table></div>");

    if let Some(name) = &importance.heatmap
        && let Some(uri) = embed_png(folder, name, missing)
    {
        let _ = write!(
            html,
            "<figure><img id=\"importance-heatmap\" src=\"{uri}\" alt=\"importance heatmap\"><figcaption>{}</figcaption></figure>",
            escape(name)
        );
    }
    html.push_str("</div><h3>Every query head</h3><p>Red: ablating the head raises the loss; blue: lowers it. Click a cell to open the head in the viewer when its layer was analysed.</p><div id=\"importance-grid\"></div>");

    html.push_str("<h3>KV groups</h3><table class=\"grid\" id=\"kv-groups\"><tr><th>layer</th>");
    let n_kv = importance.kv_groups.first().map_or(0, Vec::len);
    for group in 0..n_kv {
        let _ = write!(html, "<th>{group}</th>");
    }
    html.push_str("</tr>");
    for (layer, row) in importance.kv_groups.iter().enumerate() {
        let _ = write!(html, "<tr><th>{layer}</th>");
        for delta in row {
            if delta.is_nan() {
                html.push_str("<td title=\"not swept\">–</td>");
            } else {
                let _ = write!(html, "<td>{delta:+.4}</td>");
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></section>\n");
    html
}

fn generation_section(summary: &Summary) -> String {
    let mut html = String::from("<section id=\"generations\"><h2>Generations</h2>");
    let Some(generation) = &summary.generation else {
        html.push_str("<p>Generation did not run.</p></section>\n");
        return html;
    };

    let sampling = &generation.sampling;
    let decoding = if sampling.greedy {
        "greedy".to_string()
    } else {
        format!(
            "sampled: temperature {}, top-k {}, top-p {}, repetition penalty {}, seed {}",
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            sampling.repetition_penalty,
            sampling.seed
        )
    };
    let _ = write!(
        html,
        "<p>Decoding: {}; at most {} new tokens.</p><div class=\"side-by-side\">",
        escape(&decoding),
        generation.max_new_tokens
    );

    let first_difference = summary.patch.as_ref().and_then(|p| p.first_difference);
    let _ = write!(
        html,
        "<div class=\"column\" id=\"clean-generation\"><h3>Clean</h3><p class=\"meta\">{} tokens, stopped by {}, {:.2} tokens/s</p><pre>{}</pre></div>",
        generation.ids.len(),
        escape(&generation.stop_reason),
        generation.tokens_per_second,
        marked_tokens(&generation.tokens, first_difference)
    );

    match &summary.patch {
        Some(patch) => {
            let _ = write!(
                html,
                "<div class=\"column\" id=\"patched-generation\"><h3>Layer {} head {} patched ({})</h3>\
                 <p class=\"meta\">loss {:.4} → {:.4} nats (Δ {:+.4}) on {}</p><pre>{}</pre></div>",
                patch.layer,
                patch.head,
                escape(&patch.pattern),
                patch.loss_clean,
                patch.loss_patched,
                patch.loss_patched - patch.loss_clean,
                escape(&patch.scored_tokens),
                marked_tokens(&patch.tokens, patch.first_difference)
            );
        }
        None => html.push_str(
            "<div class=\"column\" id=\"patched-generation\"><h3>Patched</h3><p>The patch step did not run.</p></div>",
        ),
    }
    html.push_str("</div>");
    if first_difference.is_some() {
        html.push_str(
            "<p class=\"meta\">Highlighted: the tokens from the first difference on.</p>",
        );
    }
    html.push_str("</section>\n");
    html
}

/// Joins tokens as text, wrapping those from `first_difference` on in a highlight.
fn marked_tokens(tokens: &[String], first_difference: Option<usize>) -> String {
    let split = first_difference.unwrap_or(tokens.len()).min(tokens.len());
    let same: String = tokens[..split].concat();
    let different: String = tokens[split..].concat();
    if different.is_empty() {
        escape(&same)
    } else {
        format!("{}<mark>{}</mark>", escape(&same), escape(&different))
    }
}

fn steps_section(summary: &Summary) -> String {
    let mut html = String::from(
        "<section id=\"steps\"><h2>Steps</h2><table><tr><th>step</th><th>name</th><th>wall time</th><th>outcome</th></tr>",
    );
    for step in &summary.steps {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{:.2} s</td><td>{}</td></tr>",
            step.index,
            escape(&step.name),
            step.seconds,
            if step.ok { "done" } else { "failed" }
        );
    }
    html.push_str("</table><h3>Files</h3><ul>");
    for file in &summary.files {
        let _ = write!(html, "<li>{}</li>", escape(file));
    }
    html.push_str("</ul></section>\n");
    html
}

/// Shows whitespace-only and empty tokens: newlines as ↵, and an empty token as ∅.
fn visible(token: &str) -> String {
    if token.is_empty() {
        return "∅".to_string();
    }
    token.replace('\n', "↵")
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_html_specials() {
        assert_eq!(
            escape("<|im_start|> & \"x\""),
            "&lt;|im_start|&gt; &amp; &quot;x&quot;"
        );
    }

    #[test]
    fn marked_tokens_from_difference() {
        let tokens = vec!["Par".to_string(), "is".to_string(), "<".to_string()];

        assert_eq!(marked_tokens(&tokens, Some(1)), "Par<mark>is&lt;</mark>");
        assert_eq!(marked_tokens(&tokens, None), "Paris&lt;");
    }

    #[test]
    fn render_rejects_wrong_pattern_size() {
        let summary = Summary {
            prompt_tokens: vec!["a".into(), "b".into()],
            prompt_ids: vec![1, 2],
            ..Summary::default()
        };
        let patterns = [LayerPatterns {
            layer: 0,
            n_heads: 2,
            n_tokens: 2,
            weights: vec![0.5; 7],
        }];

        let error = render_html(&summary, &patterns, Path::new(".")).unwrap_err();

        assert!(error.to_string().contains("expected 2 heads"), "{error}");
    }

    #[test]
    fn render_script_data_cannot_close_element() {
        let summary = Summary {
            prompt_tokens: vec!["</script>".into()],
            prompt_ids: vec![1],
            ..Summary::default()
        };
        let patterns = [LayerPatterns {
            layer: 0,
            n_heads: 1,
            n_tokens: 1,
            weights: vec![1.0],
        }];

        let page = render_html(&summary, &patterns, Path::new(".")).unwrap();

        assert_eq!(page.matches("</script>").count(), 2, "{page}");
    }

    #[test]
    fn unswept_heads_are_marked_alike_in_both_tables() {
        // The query-head grid is drawn by the script: an unswept head (null delta) gets the
        // KV-groups table's dash and "not swept", never a "?" or a click handler.
        let grid = &SCRIPT[SCRIPT.find("buildImportanceGrid").unwrap()..];
        let unswept = grid.find("if (!Number.isFinite(delta))").unwrap();
        let click = grid.find("addEventListener(\"click\"").unwrap();
        assert!(unswept < click);
        assert!(grid[unswept..click].contains("\"not swept\""));
        assert!(grid[unswept..click].contains("\\u2013"));
        assert!(!grid.contains("\"?\""));
    }
}
