//! `report.html` of `cargo xtask run-analysis`, rendered in headless Chromium: the attention viewer
//! shows the prompt's tokens, applies the URL fragment, and changes its weights with the head.
//! Also the `summary.json` keys that other tools read.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;
use xtask::report::{
    GenerationSummary, HeadRef, HeadScore, ImportanceSummary, LayerAttention, LayerPatterns,
    Message, ModelInfo, PatchSummary, PromptInfo, RunStatus, SamplingSummary, StepRecord, Summary,
    render_html, write_atomic,
};

const TOKENS: [&str; 7] = [
    "<|im_start|>",
    "user",
    "\n",
    "Capital",
    " of",
    " France",
    "?",
];
const N_HEADS: usize = 3;

/// Head 0 attends to the previous token, head 1 to the first token, head 2 uniformly.
fn patterns() -> LayerPatterns {
    let n = TOKENS.len();
    let mut weights = vec![0.0f32; N_HEADS * n * n];
    for query in 0..n {
        let row = |head: usize| (head * n + query) * n;
        weights[row(0) + query.saturating_sub(1)] = 1.0;
        weights[row(1)] = 1.0;
        for key in 0..=query {
            weights[row(2) + key] = 1.0 / (query + 1) as f32;
        }
    }
    LayerPatterns {
        layer: 0,
        n_heads: N_HEADS,
        n_tokens: n,
        weights,
    }
}

fn write_png(path: &Path, colour: [u8; 3]) {
    let picture = image::RgbImage::from_fn(48, 32, |x, y| {
        if (x + y) % 8 < 4 {
            image::Rgb(colour)
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    picture.save(path).unwrap();
}

fn summary() -> Summary {
    let table = vec![vec![0.02, 1.25, -0.1], vec![0.4, 0.0, 0.03]];
    Summary {
        schema_version: xtask::report::SCHEMA_VERSION,
        created_utc: "2026-01-02T03:04:05Z".into(),
        command: vec!["run-analysis".into()],
        status: RunStatus::Complete,
        model: Some(ModelInfo {
            source: "Qwen/Qwen2.5-0.5B-Instruct".into(),
            folder: "/models/qwen".into(),
            backend: "cpu (2 threads)".into(),
            n_layers: 2,
            n_heads: N_HEADS,
            n_kv_heads: 1,
            d_model: 48,
            d_head: 16,
            d_mlp: 96,
            d_vocab: 1000,
            parameters: 123_456,
        }),
        prompt: Some(PromptInfo {
            messages: vec![Message {
                role: "user".into(),
                content: "Capital of France?".into(),
            }],
            text: TOKENS.concat(),
        }),
        prompt_ids: (0..TOKENS.len() as u32).map(|i| 100 + i).collect(),
        prompt_tokens: TOKENS.iter().map(|t| t.to_string()).collect(),
        generation: Some(GenerationSummary {
            ids: vec![59604, 151645],
            text: "Paris<|im_end|>".into(),
            tokens: vec!["Paris".into(), "<|im_end|>".into()],
            sampling: SamplingSummary {
                greedy: true,
                ..SamplingSummary::default()
            },
            max_new_tokens: 8,
            stop_reason: "eos".into(),
            tokens_per_second: 3.5,
        }),
        attention: vec![LayerAttention {
            layer: 0,
            heads: Vec::new(),
            pictures: (0..N_HEADS)
                .map(|h| format!("attention/layer00_head{h:02}.png"))
                .collect(),
        }],
        importance: Some(ImportanceSummary {
            metric: "loss(ablated) - loss(clean), nats".into(),
            scored_tokens: "prompt and completion".into(),
            sweep: "fast".into(),
            loss_clean: 2.5,
            top_heads: ImportanceSummary::rank_heads(&table, 3),
            table,
            kv_groups: vec![vec![1.5], vec![0.5]],
            csv: "importance.csv".into(),
            heatmap: Some("importance.png".into()),
        }),
        most_important_head: Some(HeadRef { layer: 0, head: 1 }),
        patch: Some(PatchSummary {
            layer: 0,
            head: 1,
            pattern: "uniform".into(),
            scored_tokens: "prompt and completion".into(),
            loss_clean: 2.5,
            loss_patched: 3.75,
            ids: vec![59604, 13],
            text: "Paris.".into(),
            tokens: vec!["Paris".into(), ".".into()],
            first_difference: Some(1),
        }),
        steps: vec![StepRecord {
            index: 1,
            name: "load model".into(),
            seconds: 1.0,
            ok: true,
        }],
        files: vec!["summary.json".into()],
    }
}

/// Writes the report and its pictures into a new folder and returns the folder and the page.
fn write_report() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("attention")).unwrap();
    for head in 0..N_HEADS {
        let path = dir
            .path()
            .join(format!("attention/layer00_head{head:02}.png"));
        write_png(&path, [40 * head as u8, 90, 200]);
    }
    write_png(&dir.path().join("importance.png"), [200, 40, 40]);

    let page = render_html(&summary(), &[patterns()], dir.path()).unwrap();
    let path = dir.path().join("report.html");
    write_atomic(&path, page.as_bytes()).unwrap();
    (dir, path)
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("QWENLENS_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "Chromium not found at {}; install Debian's chromium package or set QWENLENS_CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `extra` flags and returns its standard output.
fn run_chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("failed to start Chromium");

    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("Chromium timed out after 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "Chromium failed on {url}: {:?}",
        output.status
    );
    String::from_utf8(output.stdout).unwrap()
}

fn dump_dom(page: &Path, fragment: &str) -> String {
    run_chromium(
        &format!("file://{}#{fragment}", page.display()),
        &["--dump-dom".to_string()],
    )
}

/// One token of the viewer as the page left it.
#[derive(Debug)]
struct ViewerToken {
    index: usize,
    weight: String,
    text: String,
}

fn viewer_tokens(dom: &str) -> Vec<ViewerToken> {
    let span = Regex::new(
        r#"<span class="token[^"]*" data-index="(\d+)" data-weight="([^"]*)"[^>]*>([^<]*)</span>"#,
    )
    .unwrap();
    span.captures_iter(dom)
        .map(|c| ViewerToken {
            index: c[1].parse().unwrap(),
            weight: c[2].to_string(),
            text: c[3].to_string(),
        })
        .collect()
}

fn viewer_attribute(dom: &str, name: &str) -> String {
    let pattern = Regex::new(&format!(r#"<div id="viewer"[^>]*\b{name}="([^"]*)""#)).unwrap();
    match pattern.captures(dom) {
        Some(c) => c[1].to_string(),
        None => panic!("#viewer has no {name} attribute in the rendered page"),
    }
}

fn weights(tokens: &[ViewerToken], hover: usize) -> Vec<f32> {
    tokens[..=hover]
        .iter()
        .map(|t| t.weight.parse::<f32>().unwrap())
        .collect()
}

#[test]
fn viewer_shows_prompt_tokens() {
    let (_dir, page) = write_report();

    let dom = dump_dom(&page, "layer=0&head=0&hover=4");
    let tokens = viewer_tokens(&dom);

    assert_eq!(tokens.len(), TOKENS.len(), "viewer tokens: {tokens:?}");
    for (index, token) in tokens.iter().enumerate() {
        assert_eq!(token.index, index);
    }
    let texts: Vec<&str> = tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "&lt;|im_start|&gt;",
            "user",
            "↵",
            "Capital",
            " of",
            " France",
            "?"
        ]
    );
}

#[test]
fn viewer_applies_url_fragment() {
    let (_dir, page) = write_report();

    let dom = dump_dom(&page, "layer=0&head=2&hover=4");
    let tokens = viewer_tokens(&dom);

    assert_eq!(viewer_attribute(&dom, "data-layer"), "0");
    assert_eq!(viewer_attribute(&dom, "data-head"), "2");
    assert_eq!(viewer_attribute(&dom, "data-hover"), "4");
    for weight in weights(&tokens, 4) {
        assert!((weight - 0.2).abs() < 1e-4, "uniform head, weight {weight}");
    }
    for token in &tokens[5..] {
        assert_eq!(
            token.weight, "masked",
            "key {} is after the query",
            token.index
        );
    }
}

#[test]
fn viewer_weights_change_with_head() {
    let (_dir, page) = write_report();

    let previous_token = weights(
        &viewer_tokens(&dump_dom(&page, "layer=0&head=0&hover=4")),
        4,
    );
    let first_token = weights(
        &viewer_tokens(&dump_dom(&page, "layer=0&head=1&hover=4")),
        4,
    );

    assert_eq!(previous_token, [0.0, 0.0, 0.0, 1.0, 0.0]);
    assert_eq!(first_token, [1.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn viewer_ignores_invalid_fragment() {
    let (_dir, page) = write_report();

    let dom = dump_dom(&page, "layer=7&head=99&hover=-1");

    assert_eq!(viewer_attribute(&dom, "data-layer"), "0");
    assert_eq!(viewer_attribute(&dom, "data-head"), "0");
    assert_eq!(
        viewer_attribute(&dom, "data-hover"),
        (TOKENS.len() - 1).to_string()
    );
}

#[test]
fn page_embeds_pictures_and_generations() {
    let (_dir, page) = write_report();

    let dom = dump_dom(&page, "layer=0&head=1&hover=6");

    assert!(
        Regex::new(r#"<img id="head-picture"[^>]*src="data:image/png;base64,"#)
            .unwrap()
            .is_match(&dom),
        "the selected head's picture is not embedded"
    );
    assert!(dom.contains(r#"id="importance-heatmap" src="data:image/png;base64,"#));
    assert!(dom.contains("Most important head: layer 0, head 1."));
    assert!(dom.contains("Paris<mark>.</mark>"), "patched generation");
    assert!(
        dom.contains("Paris<mark>&lt;|im_end|&gt;</mark>"),
        "clean generation"
    );
    assert!(
        !dom.contains("src=\"http"),
        "the page loads a remote resource"
    );
}

#[test]
fn page_screenshot_renders() {
    let (dir, page) = write_report();
    let screenshot = dir.path().join("screenshot.png");

    run_chromium(
        &format!("file://{}#layer=0&head=2&hover=5", page.display()),
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,1800".to_string(),
        ],
    );

    let picture = image::open(&screenshot).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (1280, 1800));
    let coloured = picture
        .pixels()
        .filter(|p| p[2] > p[0].saturating_add(60))
        .count();
    assert!(
        coloured > 500,
        "only {coloured} blue pixels: the viewer drew no weights"
    );
    if let Some(folder) = std::env::var_os("QWENLENS_KEEP_SCREENSHOT") {
        std::fs::copy(
            &screenshot,
            Path::new(&folder).join("report-screenshot.png"),
        )
        .unwrap();
    }
}

#[test]
fn summary_json_has_documented_keys() {
    let json = serde_json::to_value(summary()).unwrap();

    for pointer in [
        "/prompt_ids",
        "/generation/ids",
        "/generation/text",
        "/importance/table",
        "/importance/kv_groups",
        "/most_important_head/layer",
        "/most_important_head/head",
        "/patch/pattern",
        "/patch/loss_clean",
        "/patch/loss_patched",
        "/patch/text",
        "/steps/0/seconds",
    ] {
        assert!(
            json.pointer(pointer).is_some(),
            "summary.json lacks {pointer}"
        );
    }
    assert_eq!(json["importance"]["table"][0][1], 1.25);
}

#[test]
fn stopped_run_report_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let mut summary = summary();
    summary.status = RunStatus::Stopped {
        step: 6,
        step_name: "rank heads".into(),
        error: "out of memory".into(),
    };
    summary.importance = None;
    summary.patch = None;
    summary.attention.clear();

    let page = render_html(&summary, &[patterns()], dir.path()).unwrap();

    assert!(page.contains("The run stopped at step 6 (rank heads): out of memory."));
    assert!(page.contains("The ablation sweep did not run."));
    assert!(page.contains("The patch step did not run."));
}

#[test]
fn top_heads_rank_largest_delta() {
    let summary = summary();

    let top = &summary.importance.unwrap().top_heads;

    assert_eq!(
        top[0],
        HeadScore {
            layer: 0,
            head: 1,
            delta: 1.25
        }
    );
    assert_eq!((top[1].layer, top[1].head), (1, 0));
}
