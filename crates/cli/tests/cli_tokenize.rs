//! `qwenlens tokenize` and `qwenlens inspect` run as a binary against the tokenizer goldens, the
//! fixture models and the stand-in's hub cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwenlens_tests::{fixtures_dir, standin_dir};

use serde_json::Value;

fn fixture_model(name: &str) -> String {
    qwenlens_tests::fixture_model(name).display().to_string()
}

fn qwenlens(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qwenlens"));
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running qwenlens")
}

/// Runs `qwenlens` and parses its stdout as JSON, failing with its stderr if it exits non-zero.
fn qwenlens_json(args: &[&str], env: &[(&str, &str)]) -> Value {
    let output = qwenlens(args, env);
    assert!(
        output.status.success(),
        "qwenlens {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

fn failure_message(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = qwenlens(args, env);
    assert!(!output.status.success(), "qwenlens {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn load_cases(name: &str) -> Vec<Value> {
    let path = fixtures_dir().join("tokenizer/qwen2.5").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).expect("goldens")).expect("JSON goldens")
}

/// Writes `contents` to a file unique to this test under Cargo's temporary folder.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-tokenize-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("writing a temporary file");
    path
}

#[test]
fn tokenize_text_matches_goldens() {
    let model = fixture_model("tiny-gqa");
    let cases = load_cases("cases.json");
    let sample = [
        "empty",
        "leading_spaces_3",
        "sentence",
        "python_indent",
        "crlf",
        "cjk_zh",
        "emoji_zwj",
        "combining_nfc",
        "special_im",
        "special_like_not_special",
    ];
    for name in sample {
        let case = cases
            .iter()
            .find(|case| case["name"] == name)
            .unwrap_or_else(|| panic!("case {name} not in cases.json"));
        let text = case["text"].as_str().unwrap();
        let output = qwenlens_json(&["tokenize", "--model", &model, "--text", text], &[]);
        assert_eq!(output["ids"], case["ids"], "{name}: ids");
        assert_eq!(output["tokens"], case["tokens"], "{name}: tokens");
    }
}

#[test]
fn tokenize_chat_matches_goldens() {
    let model = fixture_model("tiny-gqa");
    for case in load_cases("chat_cases.json") {
        let name = case["name"].as_str().unwrap();
        let chat = temp_file(&format!("{name}.json"), &case["messages"].to_string());
        let mut args = vec![
            "tokenize",
            "--model",
            &model,
            "--chat",
            chat.to_str().unwrap(),
        ];
        if case["add_generation_prompt"] == false {
            args.push("--no-generation-prompt");
        }

        let output = qwenlens_json(&args, &[]);
        assert_eq!(output["prompt"], case["rendered"], "{name}: prompt");
        assert_eq!(output["ids"], case["ids"], "{name}: ids");
    }
}

#[test]
fn tokenize_chat_errors() {
    let model = fixture_model("tiny-gqa");

    let bad_json = temp_file("bad.json", "[{\"role\": \"user\", \"content\": ");
    let error = failure_message(
        &[
            "tokenize",
            "--model",
            &model,
            "--chat",
            bad_json.to_str().unwrap(),
        ],
        &[],
    );
    assert!(error.contains("bad.json"), "{error}");
    assert!(error.contains("not valid JSON"), "{error}");

    let bad_role = temp_file("role.json", r#"[{"role": "bot", "content": "hi"}]"#);
    let error = failure_message(
        &[
            "tokenize",
            "--model",
            &model,
            "--chat",
            bad_role.to_str().unwrap(),
        ],
        &[],
    );
    assert!(error.contains("unknown role \"bot\""), "{error}");
    assert!(error.contains("system, user, assistant, tool"), "{error}");
}

#[test]
fn tokenize_without_tokenizer_is_error() {
    let error = failure_message(
        &[
            "tokenize",
            "--model",
            &fixture_model("tiny-mha-f16"),
            "--text",
            "hi",
        ],
        &[],
    );
    assert!(error.contains("tokenizer.json not found"), "{error}");
}

#[test]
fn tokenize_accepts_device() {
    let output = qwenlens_json(
        &[
            "tokenize",
            "--model",
            &fixture_model("tiny-gqa"),
            "--text",
            "Hello",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert_eq!(output["ids"], serde_json::json!([9707]));
}

#[test]
fn inspect_fixture_json() {
    let report = qwenlens_json(
        &[
            "inspect",
            "--model",
            &fixture_model("tiny-untied-sharded"),
            "--json",
            "--device",
            "gpu",
        ],
        &[],
    );
    assert_eq!(report["n_layers"], 3);
    assert_eq!(report["d_model"], 96);
    assert_eq!(report["n_heads"], 6);
    assert_eq!(report["n_kv_heads"], 2);
    assert_eq!(report["d_head"], 16);
    assert_eq!(report["d_mlp"], 256);
    assert_eq!(report["d_vocab"], 1000);
    assert_eq!(report["dtype"], "F32");
    assert_eq!(report["tied_embeddings"], false);
    assert_eq!(report["parameters"], 488064);
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert!(
        files[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("model-00001-of-00002.safetensors")
    );
    assert!(files[0]["size"].as_u64().unwrap() > 0);
}

#[test]
fn inspect_standin_hub_id_offline() {
    let hf_home = standin_dir().parent().unwrap().join("hf-home");
    let env = [
        ("HF_HOME", hf_home.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let output = qwenlens(&["inspect", "--model", "Qwen/Qwen2.5-0.5B-Instruct"], &env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("494,032,768"), "{stdout}");
    assert!(stdout.contains("BF16"), "{stdout}");
    assert!(
        stdout.contains("models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/"),
        "{stdout}"
    );

    let report = qwenlens_json(
        &["inspect", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--json"],
        &env,
    );
    assert_eq!(report["parameters"], 494_032_768u64);
    assert_eq!(report["n_layers"], 24);
    assert_eq!(report["tied_embeddings"], true);
}

#[test]
fn inspect_uncached_hub_id_offline_is_error() {
    let empty = Path::new(env!("CARGO_TARGET_TMPDIR")).join("empty-hf-home");
    let error = failure_message(
        &[
            "inspect",
            "--model",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "--revision",
            "v9",
        ],
        &[
            ("HF_HOME", empty.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(
        error.contains("Qwen/Qwen2.5-0.5B-Instruct (revision v9)"),
        "{error}"
    );
    assert!(error.contains("empty-hf-home/hub"), "{error}");
    assert!(error.contains("pass a local folder"), "{error}");
}

#[test]
fn inspect_bad_device_is_error() {
    let error = failure_message(
        &[
            "inspect",
            "--model",
            &fixture_model("tiny-gqa"),
            "--device",
            "tpu",
        ],
        &[],
    );
    assert!(error.contains("tpu"), "{error}");
}

/// Runs `qwenlens` with stdout written to `/dev/full`, so every write fails.
fn qwenlens_to_full_disk(args: &[&str]) -> Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("opening /dev/full");
    Command::new(env!("CARGO_BIN_EXE_qwenlens"))
        .args(args)
        .stdout(full)
        .output()
        .expect("running qwenlens")
}

#[test]
fn failed_stdout_write_is_error() {
    let model = fixture_model("tiny-gqa");
    for args in [
        vec!["tokenize", "--model", &model, "--text", "Hello"],
        vec!["inspect", "--model", &model],
        vec!["inspect", "--model", &model, "--json"],
    ] {
        let output = qwenlens_to_full_disk(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.contains("to stdout"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("No space left on device"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn invalid_log_filter_is_error() {
    let model = fixture_model("tiny-gqa");
    for (filter, expected) in [
        ("bogus", "\"bogus\" is not a level"),
        ("warning", "\"warning\" is not a level"),
        ("foo=[", "invalid filter"),
    ] {
        let stderr = failure_message(
            &[
                "--log", filter, "tokenize", "--model", &model, "--text", "a",
            ],
            &[],
        );
        assert!(stderr.contains(expected), "{filter}: {stderr}");
        assert!(stderr.contains("--log"), "{filter}: {stderr}");
    }
    for filter in [
        "debug",
        "off",
        "warn,qwenlens_weights=debug",
        "qwenlens_weights::source",
        "3",
    ] {
        let output = qwenlens(
            &[
                "--log", filter, "tokenize", "--model", &model, "--text", "a",
            ],
            &[],
        );
        assert!(
            output.status.success(),
            "{filter}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn device_help_says_unused() {
    for command in ["tokenize", "inspect"] {
        let output = qwenlens(&[command, "--help"], &[]);
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command}");
        assert!(
            help.contains("Accepted for uniformity") && help.contains("unused"),
            "{command}: {help}"
        );
    }
}

#[test]
fn inspect_without_eos_says_none() {
    let output = qwenlens(&["inspect", "--model", &fixture_model("tiny-mha-f16")], &[]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with("eos_token_ids"))
        .expect("an eos_token_ids line");
    assert!(line.contains("none"), "{line}");
}

#[test]
fn inspect_warns_on_other_architecture() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-inspect-llama-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = fixtures_dir().join("models/tiny-mha-f16");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["model_type"] = "llama".into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        source.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();

    let output = qwenlens(&["inspect", "--model", dir.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(
        stderr.contains("names an architecture other than Qwen2"),
        "{stderr}"
    );
}

#[test]
fn tokenize_chat_file_with_byte_order_mark() {
    let chat = temp_file(
        "bom-chat.json",
        "\u{feff}[{\"role\": \"user\", \"content\": \"Hello\"}]",
    );
    let output = qwenlens_json(
        &[
            "tokenize",
            "--model",
            &fixture_model("tiny-gqa"),
            "--chat",
            chat.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        output["prompt"].as_str().unwrap().contains("Hello"),
        "{output}"
    );
}
