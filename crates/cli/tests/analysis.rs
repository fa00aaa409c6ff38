//! The analysis subcommands (`attention`, `ablate`, `patch`, `activation-patch`, `logit-lens`) run
//! as a binary on the tiny-gqa fixture: the files they write, and their errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwenlens_tests::fixtures_dir;

use qwenlens_analysis::output::read_png;

const LEN7_TEXT: &str = "The quick brown fox jumps over the";

fn tiny_gqa() -> String {
    fixtures_dir().join("models/tiny-gqa").display().to_string()
}

/// Runs `qwenlens SUBCOMMAND --model tiny-gqa --device cpu ARGS...`.
fn qwenlens(subcommand: &str, args: &[&str]) -> Output {
    let model = tiny_gqa();
    Command::new(env!("CARGO_BIN_EXE_qwenlens"))
        .arg(subcommand)
        .args(["--model", &model, "--device", "cpu"])
        .args(args)
        .output()
        .expect("running qwenlens")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "qwenlens failed\nstdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
}

fn assert_failure_mentions(output: &Output, needles: &[&str]) {
    assert!(
        !output.status.success(),
        "qwenlens succeeded on bad input\nstdout:\n{}",
        stdout(output)
    );
    let message = stderr(output);
    for needle in needles {
        assert!(
            message.contains(needle),
            "stderr lacks {needle:?}:\n{message}"
        );
    }
}

/// Creates a fresh folder under the system temporary folder, unique to this process and test.
fn temp_folder(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qwenlens-cli-analysis-{}-{test}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a temporary folder");
    dir
}

/// Decodes a PNG and checks its size and that it is not one flat colour.
fn assert_png(path: &Path) {
    let image = read_png(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        image.width() >= 100 && image.height() >= 60,
        "{}: {}x{}",
        path.display(),
        image.width(),
        image.height()
    );
    let background = *image.get_pixel(0, 0);
    let drawn = image.pixels().filter(|p| **p != background).count();
    assert!(
        drawn > 500,
        "{}: only {drawn} pixels differ from the background",
        path.display()
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn attention_writes_json_and_heatmaps() {
    let out = temp_folder("attention");

    let output = qwenlens(
        "attention",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layers",
            "0,1",
            "--heads",
            "1,3",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let json = read_json(&out.join("attention.json"));
    let names: Vec<&str> = json["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["L0H1", "L0H3", "L1H1", "L1H3"]);
    for name in ["L0H1", "L0H3", "L1H1", "L1H3", "L0_grid", "L1_grid"] {
        assert_png(&out.join(format!("{name}.png")));
    }
    assert!(
        !out.join("L0H0.png").exists(),
        "only the chosen heads get pictures"
    );
    assert!(stdout(&output).contains("L1H3"));
}

#[test]
fn attention_rejects_layer_out_of_range() {
    let out = temp_folder("attention-layer");

    let output = qwenlens(
        "attention",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layers",
            "5",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["layer 5", "2 layers"]);
}

#[test]
fn attention_rejects_head_out_of_range() {
    let out = temp_folder("attention-head");

    let output = qwenlens(
        "attention",
        &[
            "--prompt",
            LEN7_TEXT,
            "--heads",
            "4",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["head 4", "4 query heads"]);
}

#[test]
fn ablate_writes_table_json_and_heatmap() {
    let out = temp_folder("ablate");

    let output = qwenlens(
        "ablate",
        &["--prompt", LEN7_TEXT, "--out", out.to_str().unwrap()],
    );

    assert_success(&output);
    let csv = std::fs::read_to_string(out.join("importance.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "layer,head,clean,ablated,delta");
    assert_eq!(lines.len(), 1 + 2 * 4, "one row per query head");
    for line in &lines[1..] {
        let fields: Vec<f64> = line.split(',').map(|f| f.parse().unwrap()).collect();
        assert!(
            (fields[4] - (fields[3] - fields[2])).abs() < 1e-4,
            "delta = ablated − clean: {line}"
        );
    }
    let json = read_json(&out.join("importance.json"));
    assert_eq!(json["metric"]["kind"], "loss");
    assert_eq!(json["mode"], "zero");
    assert!(
        json["what_was_ablated"]
            .as_str()
            .unwrap()
            .contains("hook_z")
    );
    assert_png(&out.join("importance.png"));
    assert!(stdout(&output).contains("top 10"));
}

#[test]
fn ablate_kv_group_rows() {
    let out = temp_folder("ablate-kv");

    let output = qwenlens(
        "ablate",
        &[
            "--prompt",
            LEN7_TEXT,
            "--level",
            "kv-group",
            "--metric",
            "logprob",
            "--target",
            " lazy",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let csv = std::fs::read_to_string(out.join("importance.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 2);
    let json = read_json(&out.join("importance.json"));
    assert_eq!(json["level"], "kv-group");
    assert!(
        json["what_was_ablated"]
            .as_str()
            .unwrap()
            .contains("hook_v")
    );
}

#[test]
fn ablate_logit_diff_needs_two_tokens() {
    let out = temp_folder("ablate-logit-diff");

    let output = qwenlens(
        "ablate",
        &[
            "--prompt",
            LEN7_TEXT,
            "--metric",
            "logit-diff",
            "--target",
            " lazy",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["--distractor"]);
}

#[test]
fn ablate_rejects_layer_out_of_range() {
    let out = temp_folder("ablate-layer");

    let output = qwenlens(
        "ablate",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layers",
            "0,2",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["layer 2", "2 layers"]);
    assert!(
        !out.join("importance.csv").exists(),
        "no table after a rejected request"
    );
}

#[test]
fn ablate_sweeps_chosen_layers_only() {
    let out = temp_folder("ablate-layers");

    let output = qwenlens(
        "ablate",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layers",
            "1",
            "--mode",
            "mean",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let csv = std::fs::read_to_string(out.join("importance.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4);
    assert!(
        csv.lines().skip(1).all(|line| line.starts_with("1,")),
        "{csv}"
    );
    assert_eq!(read_json(&out.join("importance.json"))["mode"], "mean");
}

#[test]
fn ablate_rejects_target_unused_by_metric() {
    let out = temp_folder("ablate-unused-target");

    let output = qwenlens(
        "ablate",
        &[
            "--prompt",
            LEN7_TEXT,
            "--metric",
            "kl",
            "--target",
            " lazy",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["--target is read only by"]);
}

#[test]
fn attention_rejects_one_token_prompt() {
    let out = temp_folder("attention-short");

    let output = qwenlens(
        "attention",
        &["--prompt", "Hello", "--out", out.to_str().unwrap()],
    );

    assert_failure_mentions(&output, &["at least 2 tokens", "has 1"]);
}

#[test]
fn patch_reports_loss_and_continuations() {
    let out = temp_folder("patch");

    let output = qwenlens(
        "patch",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layer",
            "1",
            "--head",
            "1",
            "--pattern",
            "uniform",
            "--max-new-tokens",
            "4",
            "--greedy",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let json = read_json(&out.join("patch.json"));
    assert!(
        json["loss_delta"].as_f64().unwrap().abs() > 1e-4,
        "the uniform pattern changes the loss"
    );
    assert!(
        (json["loss_delta"].as_f64().unwrap()
            - (json["patched_loss"].as_f64().unwrap() - json["clean_loss"].as_f64().unwrap()))
        .abs()
            < 1e-5
    );
    assert_eq!(
        json["continuations"]["clean_ids"].as_array().unwrap().len(),
        4
    );
    assert_eq!(
        json["continuations"]["patched_ids"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert!(stdout(&output).contains("patched continuation"));
}

/// Writes a `[k, k]` float32 array as a version 1.0 `.npy` file.
fn write_npy(path: &Path, k: usize, values: &[f32]) {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({k}, {k}), }}");
    // The magic string, version and length take 10 bytes. Spaces and a final newline pad the
    // whole preamble to a multiple of 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');

    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn patch_file_pattern_matches_builtin() {
    let out = temp_folder("patch-npy");
    let k = 12;
    let identity: Vec<f32> = (0..k * k)
        .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
        .collect();
    let file = out.join("self.npy");
    write_npy(&file, k, &identity);
    let run = |pattern: &str, dir: &str| {
        let dir = out.join(dir);
        let args = [
            "--prompt",
            LEN7_TEXT,
            "--layer",
            "1",
            "--head",
            "2",
            "--pattern",
            pattern,
            "--max-new-tokens",
            "3",
            "--greedy",
        ];
        let output = qwenlens(
            "patch",
            &[&args[..], &["--out", dir.to_str().unwrap()]].concat(),
        );
        assert_success(&output);
        read_json(&dir.join("patch.json"))
    };

    let from_file = run(file.to_str().unwrap(), "file");
    let builtin = run("self", "builtin");

    assert_eq!(from_file["patched_loss"], builtin["patched_loss"]);
    assert_eq!(
        from_file["continuations"]["patched_ids"],
        builtin["continuations"]["patched_ids"]
    );
    assert!(from_file["loss_delta"].as_f64().unwrap().abs() > 1e-4);
}

#[test]
fn patch_rejects_too_small_pattern_file() {
    let out = temp_folder("patch-small-npy");
    let file = out.join("small.npy");
    write_npy(&file, 2, &[1.0, 0.0, 0.0, 1.0]);

    let output = qwenlens(
        "patch",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layer",
            "0",
            "--head",
            "0",
            "--pattern",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["small.npy", "[10, 10]"]);
}

#[test]
fn attention_accepts_chat_file() {
    let out = temp_folder("attention-chat");
    let chat = out.join("chat.json");
    std::fs::write(&chat, r#"[{"role": "user", "content": "Count to three."}]"#).unwrap();

    let output = qwenlens(
        "attention",
        &[
            "--chat",
            chat.to_str().unwrap(),
            "--out",
            out.join("pictures").to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let json = read_json(&out.join("pictures/attention.json"));
    assert_eq!(
        json["tokens"].as_array().unwrap().len(),
        33,
        "the chat template's 33 tokens"
    );
    assert_eq!(json["token_texts"][0], "<|im_start|>");
    assert_png(&out.join("pictures/L0_grid.png"));
}

#[test]
fn patch_rejects_unknown_pattern() {
    let out = temp_folder("patch-pattern");

    let output = qwenlens(
        "patch",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layer",
            "1",
            "--head",
            "1",
            "--pattern",
            "diagonal",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["unknown pattern `diagonal`", "position:P"]);
}

#[test]
fn patch_rejects_head_out_of_range() {
    let out = temp_folder("patch-head");

    let output = qwenlens(
        "patch",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layer",
            "1",
            "--head",
            "9",
            "--pattern",
            "first",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["head 9"]);
}

#[test]
fn patch_rejects_missing_pattern_file() {
    let out = temp_folder("patch-file");
    let missing = out.join("missing.npy");

    let output = qwenlens(
        "patch",
        &[
            "--prompt",
            LEN7_TEXT,
            "--layer",
            "0",
            "--head",
            "0",
            "--pattern",
            missing.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["missing.npy"]);
}

#[test]
fn activation_patch_writes_heatmaps() {
    let out = temp_folder("activation-patch");

    let output = qwenlens(
        "activation-patch",
        &[
            "--clean",
            "The quick brown fox jumps",
            "--corrupted",
            "The slow brown fox jumps",
            "--answer",
            " over",
            "--wrong",
            " the",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let json = read_json(&out.join("activation_patching.json"));
    assert_eq!(json["grids"].as_array().unwrap().len(), 4);
    for name in ["resid_pre", "attn_out", "mlp_out", "head_z"] {
        assert_png(&out.join(format!("{name}.png")));
    }
}

#[test]
fn activation_patch_rejects_unequal_lengths() {
    let out = temp_folder("activation-patch-lengths");

    let output = qwenlens(
        "activation-patch",
        &[
            "--clean",
            "The quick brown fox jumps",
            "--corrupted",
            "A fox",
            "--answer",
            " over",
            "--wrong",
            " the",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["5 tokens", "has 2"]);
}

#[test]
fn logit_lens_writes_json_and_pictures() {
    let out = temp_folder("logit-lens");

    let output = qwenlens(
        "logit-lens",
        &[
            "--prompt",
            LEN7_TEXT,
            "--target",
            " lazy",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_success(&output);
    let json = read_json(&out.join("logit_lens.json"));
    assert_eq!(json["layers"].as_array().unwrap().len(), 3);
    assert_eq!(json["target_text"], " lazy");
    assert_png(&out.join("logit_lens.png"));
    assert_png(&out.join("dla.png"));
}

#[test]
fn logit_lens_rejects_multi_token_target() {
    let out = temp_folder("logit-lens-target");

    let output = qwenlens(
        "logit-lens",
        &[
            "--prompt",
            LEN7_TEXT,
            "--target",
            "quick brown",
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_failure_mentions(&output, &["2 tokens"]);
}

#[test]
fn attention_accepts_all_and_ranges_and_states_the_syntax() {
    let out = temp_folder("attention-layer-syntax");
    let dir = out.to_str().unwrap();

    let all = qwenlens(
        "attention",
        &["--prompt", LEN7_TEXT, "--layers", "all", "--out", dir],
    );
    assert_success(&all);
    assert!(out.join("L1_grid.png").is_file());

    let range = qwenlens(
        "attention",
        &["--prompt", LEN7_TEXT, "--layers", "0-1", "--out", dir],
    );
    assert_success(&range);

    let bad = qwenlens(
        "attention",
        &["--prompt", LEN7_TEXT, "--layers", "one", "--out", dir],
    );
    assert_failure_mentions(&bad, &["'one'", "all, or layers and ranges such as 0, 0,5"]);
}

#[test]
fn patch_accepts_the_run_analysis_spellings() {
    let out = temp_folder("patch-spellings");

    for pattern in ["previous-token", "first-token"] {
        let output = qwenlens(
            "patch",
            &[
                "--prompt",
                LEN7_TEXT,
                "--layer",
                "0",
                "--head",
                "0",
                "--pattern",
                pattern,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert_success(&output);
    }
}

#[test]
fn patch_checks_max_new_tokens_and_warns_on_a_late_position() {
    let out = temp_folder("patch-max-new-tokens");
    let args = |max_new_tokens: &'static str, pattern: &'static str| {
        qwenlens(
            "patch",
            &[
                "--prompt",
                LEN7_TEXT,
                "--layer",
                "0",
                "--head",
                "0",
                "--pattern",
                pattern,
                "--max-new-tokens",
                max_new_tokens,
                "--greedy",
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };

    let too_long = args("100000", "position:3");
    assert_failure_mentions(&too_long, &["--max-new-tokens 100000 is too large"]);

    let late = args("2", "position:999");
    assert_success(&late);
    assert!(
        stderr(&late).contains("warning: --pattern position:999 lies beyond the prompt"),
        "{}",
        stderr(&late)
    );
}

#[test]
fn logit_lens_rejects_top_out_of_range() {
    let out = temp_folder("logit-lens-top");

    for top in ["0", "101"] {
        let output = qwenlens(
            "logit-lens",
            &[
                "--prompt",
                LEN7_TEXT,
                "--top",
                top,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert_failure_mentions(&output, &[&format!("--top {top}"), "between 1 and 100"]);
    }
}

#[test]
fn logit_lens_checks_every_output_before_writing() {
    let out = temp_folder("logit-lens-outputs");
    std::fs::create_dir_all(out.join("dla.png")).unwrap();

    let output = qwenlens(
        "logit-lens",
        &["--prompt", LEN7_TEXT, "--out", out.to_str().unwrap()],
    );

    assert_failure_mentions(&output, &["dla.png"]);
    assert!(!out.join("logit_lens.json").exists());
    assert!(!out.join("logit_lens.png").exists());
}

#[test]
fn out_that_is_a_file_is_named_as_such() {
    let dir = temp_folder("out-file");
    let file = dir.join("afile");
    std::fs::write(&file, b"x").unwrap();

    for subcommand in ["attention", "ablate", "logit-lens"] {
        let output = qwenlens(
            subcommand,
            &["--prompt", LEN7_TEXT, "--out", file.to_str().unwrap()],
        );
        assert_failure_mentions(&output, &["afile is a file", "must name a folder"]);
    }
}

#[test]
fn identical_answer_and_wrong_tokens_are_rejected() {
    let out = temp_folder("identical-tokens");

    let patch = qwenlens(
        "activation-patch",
        &[
            "--clean",
            "The quick brown fox jumps",
            "--corrupted",
            "The slow brown fox jumps",
            "--answer",
            " the",
            "--wrong",
            " the",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_failure_mentions(&patch, &["the same token", "--wrong"]);

    let ablate = qwenlens(
        "ablate",
        &[
            "--prompt",
            LEN7_TEXT,
            "--metric",
            "logit-diff",
            "--target",
            " lazy",
            "--distractor",
            " lazy",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_failure_mentions(&ablate, &["the same token", "--distractor"]);
    assert!(!out.join("importance.csv").exists());
}
