//! The `qwenlens generate` and `qwenlens cache` commands run as a binary on the tiny-gqa fixture
//! and the stand-in checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LEN7_TEXT: &str = "The quick brown fox jumps over the";

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("QWENLENS_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    }
}

fn tiny_gqa() -> String {
    fixtures_dir().join("models/tiny-gqa").display().to_string()
}

fn qwenlens(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwenlens"))
        .args(args)
        .output()
        .expect("running qwenlens")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Creates a fresh folder under the system temporary folder, unique to this process and test.
fn temp_folder(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwenlens-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a temporary folder");
    dir
}

/// Reads the header of a safetensors file: tensor name to (dtype, shape), metadata left out.
fn safetensors_header(path: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();

    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let dtype = info["dtype"].as_str().unwrap().to_string();
            let shape = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|dim| dim.as_u64().unwrap() as usize)
                .collect();
            (name.clone(), (dtype, shape))
        })
        .collect()
}

/// Reads an I64 tensor of a safetensors file through its header's data offsets.
fn safetensors_i64(path: &Path, name: &str) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let info = &header[name];
    assert_eq!(info["dtype"], "I64", "{name}");

    let start = 8 + header_len + info["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + header_len + info["data_offsets"][1].as_u64().unwrap() as usize;
    bytes[start..end]
        .chunks_exact(8)
        .map(|chunk| i64::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

#[test]
fn generate_greedy_json_matches_golden() {
    let golden_path = fixtures_dir().join("goldens/tiny-gqa/len7.safetensors");
    let golden = safetensors_i64(&golden_path, "generated_ids");
    let prompt = safetensors_i64(&golden_path, "input_ids");

    let model = tiny_gqa();
    let output = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt",
        LEN7_TEXT,
        "--greedy",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    let stdout = stdout(&output);
    let (streamed, json_line) = stdout
        .trim_end()
        .rsplit_once('\n')
        .expect("text, then JSON");
    let json: serde_json::Value = serde_json::from_str(json_line).expect("JSON on the last line");
    let ids: Vec<i64> = serde_json::from_value(json["ids"].clone()).unwrap();
    let prompt_ids: Vec<i64> = serde_json::from_value(json["prompt_ids"].clone()).unwrap();

    assert_eq!(ids, golden);
    assert_eq!(prompt_ids, prompt);
    assert_eq!(json["stop_reason"], "max_new_tokens");
    assert_eq!(json["text"].as_str().unwrap(), streamed);
}

#[test]
fn generate_invalid_temperature_is_error() {
    let model = tiny_gqa();
    let output = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "2",
    ]);

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("temperature"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn generate_over_context_is_error() {
    let model = tiny_gqa();
    let output = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--greedy",
        "--max-new-tokens",
        "40000",
    ]);

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("max_position_embeddings"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn cache_writes_requested_names() {
    let dir = temp_folder("cache-names");
    let out = dir.join("cache.safetensors");

    let model = tiny_gqa();
    let output = qwenlens(&[
        "cache",
        "--model",
        &model,
        "--device",
        "cpu",
        "--ids",
        "785,3974,13876",
        "--names",
        r"^blocks\.1\.attn\.hook_(q|k|pattern)$",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    let header = safetensors_header(&out);
    let expected: BTreeMap<String, (String, Vec<usize>)> = [
        ("blocks.1.attn.hook_q", vec![1, 3, 4, 16]),
        ("blocks.1.attn.hook_k", vec![1, 3, 2, 16]),
        ("blocks.1.attn.hook_pattern", vec![1, 4, 3, 3]),
    ]
    .into_iter()
    .map(|(name, shape)| (name.to_string(), ("F32".to_string(), shape)))
    .collect();
    assert_eq!(header, expected);
    assert!(
        stdout(&output).contains("3 activations"),
        "{}",
        stdout(&output)
    );

    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["cache.safetensors"],
        "temporary files left behind"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_prompt_default_names() {
    let dir = temp_folder("cache-prompt");
    let out = dir.join("all.safetensors");

    let model = tiny_gqa();
    let output = qwenlens(&[
        "cache",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    // TransformerLens's default hooks: hook_embed, 20 per block (no hook_result) and 3 final ones.
    let header = safetensors_header(&out);
    assert_eq!(header.len(), 1 + 2 * 20 + 3);
    assert_eq!(header["hook_embed"].1, vec![1, 1, 64]);
    assert!(!header.contains_key("blocks.0.attn.hook_result"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_missing_output_folder_is_error() {
    let dir = temp_folder("cache-missing");
    let out = dir.join("no-such-folder/cache.safetensors");

    let model = tiny_gqa();
    let output = qwenlens(&[
        "cache",
        "--model",
        &model,
        "--ids",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ]);

    assert!(!output.status.success());
    let stderr = stderr(&output);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("no-such-folder"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_bad_regex_is_error() {
    let dir = temp_folder("cache-regex");
    let out = dir.join("cache.safetensors");

    let model = tiny_gqa();
    let output = qwenlens(&[
        "cache",
        "--model",
        &model,
        "--ids",
        "1,2",
        "--names",
        "hook_(z",
        "--out",
        out.to_str().unwrap(),
    ]);

    assert!(!output.status.success());
    let stderr = stderr(&output);
    assert!(stderr.contains("hook_(z"), "{stderr}");
    assert!(stderr.contains("regex"), "{stderr}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_regex_matching_nothing_lists_names() {
    let dir = temp_folder("cache-nomatch");
    let out = dir.join("cache.safetensors");

    let model = tiny_gqa();
    let output = qwenlens(&[
        "cache",
        "--model",
        &model,
        "--ids",
        "1,2",
        "--names",
        "hook_nothing",
        "--out",
        out.to_str().unwrap(),
    ]);

    assert!(!output.status.success());
    let stderr = stderr(&output);
    assert!(stderr.contains("matches no hook point"), "{stderr}");
    assert!(stderr.contains("blocks.1.hook_resid_post"), "{stderr}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Returns the stand-in checkpoint folder: `$QWENLENS_STANDIN`, or the default output of
/// `fetch-standin`.
fn standin_dir() -> PathBuf {
    match std::env::var_os("QWENLENS_STANDIN") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/qwenlens/qwen2.5-0.5b-instruct-standin"),
    }
}

fn ids_of_json_line(stdout: &str) -> Vec<i64> {
    let json_line = stdout.trim_end().lines().last().expect("a JSON line");
    let json: serde_json::Value = serde_json::from_str(json_line).expect("JSON on the last line");
    serde_json::from_value(json["ids"].clone()).unwrap()
}

#[test]
fn generate_seeded_sampling_is_reproducible() {
    let model = tiny_gqa();
    let run = |seed: &str| {
        let output = qwenlens(&[
            "generate",
            "--model",
            &model,
            "--device",
            "cpu",
            "--prompt",
            LEN7_TEXT,
            "--temperature",
            "1.5",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--seed",
            seed,
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        ids_of_json_line(&stdout(&output))
    };

    let first = run("11");

    assert_eq!(first.len(), 8);
    assert_eq!(run("11"), first);
}

#[test]
fn generate_chat_on_standin_answers_paris() {
    let chat = fixtures_dir().join("standin/france.json");
    let model = standin_dir().display().to_string();
    let output = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--chat",
        chat.to_str().unwrap(),
        "--greedy",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    let stdout = stdout(&output);
    assert_eq!(ids_of_json_line(&stdout), [59_604, 151_645]);
    assert!(stdout.starts_with("Paris\n"), "{stdout}");
}

#[test]
fn generate_hub_id_offline_uses_cache() {
    let hf_home =
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/qwenlens/hf-home");
    let chat = fixtures_dir().join("standin/france.json");
    let output = Command::new(env!("CARGO_BIN_EXE_qwenlens"))
        .args([
            "generate",
            "--model",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "--device",
            "cpu",
        ])
        .args([
            "--chat",
            chat.to_str().unwrap(),
            "--greedy",
            "--max-new-tokens",
            "4",
            "--json",
        ])
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .expect("running qwenlens");

    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(ids_of_json_line(&stdout(&output)), [59_604, 151_645]);
}

#[test]
fn generate_temperature_turns_sampling_on() {
    // A copy of tiny-gqa whose generation_config.json asks for greedy decoding.
    let dir = temp_folder("greedy-config");
    let source = fixtures_dir().join("models/tiny-gqa");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::os::unix::fs::symlink(source.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"do_sample": false, "eos_token_id": [151645, 151643]}"#,
    )
    .unwrap();
    let golden_path = fixtures_dir().join("goldens/tiny-gqa/len7.safetensors");
    let golden = safetensors_i64(&golden_path, "generated_ids");

    let model = dir.display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--device",
            "cpu",
            "--prompt",
            LEN7_TEXT,
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        let output = qwenlens(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        ids_of_json_line(&stdout(&output))
    };

    // At temperature 50 the 12 draws are close to uniform over 151936 ids, so they cannot all
    // land on the greedy tokens.
    assert_eq!(run(&[]), golden);
    assert_ne!(run(&["--temperature", "50", "--seed", "5"]), golden);
    std::fs::remove_dir_all(&dir).unwrap();
}
