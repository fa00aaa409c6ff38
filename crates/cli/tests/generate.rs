//! The `qwenlens generate` and `qwenlens cache` commands run as a binary on the tiny-gqa fixture
//! and the stand-in checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwenlens_tests::{fixtures_dir, standin_dir};

const LEN7_TEXT: &str = "The quick brown fox jumps over the";

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

/// A copy of tiny-gqa with the given generation_config.json and, when asked, its tokenizer.
fn tiny_gqa_copy(test: &str, generation_config: &str, with_tokenizer: bool) -> PathBuf {
    let source = fixtures_dir().join("models/tiny-gqa");
    let dir = temp_folder(test);
    let mut files = vec!["config.json", "model.safetensors"];
    if with_tokenizer {
        files.extend(["tokenizer.json", "tokenizer_config.json"]);
    }
    for file in files {
        std::fs::copy(source.join(file), dir.join(file)).expect("copying the fixture");
    }
    std::fs::write(dir.join("generation_config.json"), generation_config)
        .expect("writing generation_config.json");
    dir
}

fn cache_ids_to(out: &Path) -> Output {
    let model = tiny_gqa();
    qwenlens(&[
        "cache",
        "--model",
        &model,
        "--device",
        "cpu",
        "--ids",
        "1,2",
        "--names",
        "^hook_embed$",
        "--out",
        &out.display().to_string(),
    ])
}

#[cfg(unix)]
#[test]
fn cache_rejects_fifo_and_device_outputs() {
    use std::os::unix::fs::FileTypeExt;
    let dir = temp_folder("fifo-out");
    let fifo = dir.join("out.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());

    let fifo_output = cache_ids_to(&fifo);
    let device_output = cache_ids_to(Path::new("/dev/null"));

    assert!(!fifo_output.status.success());
    assert!(
        stderr(&fifo_output).contains("is a FIFO, not a regular file"),
        "{}",
        stderr(&fifo_output)
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(!device_output.status.success());
    assert!(
        stderr(&device_output).contains("is a device"),
        "{}",
        stderr(&device_output)
    );
}

#[cfg(unix)]
#[test]
fn cache_through_a_symlink_writes_its_target() {
    let dir = temp_folder("link-out");
    let target = dir.join("target.safetensors");
    let link = dir.join("link.safetensors");
    std::fs::write(&target, "old").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let output = cache_ids_to(&link);

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(safetensors_header(&target).contains_key("hook_embed"));
}

#[cfg(unix)]
#[test]
fn cache_file_gets_the_permissions_of_a_plain_create() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_folder("mode-out");
    let out = dir.join("cache.safetensors");
    let probe = dir.join("probe");
    std::fs::File::create(&probe).unwrap();

    let output = cache_ids_to(&out);

    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(mode(&out), mode(&probe));
}

#[test]
fn cache_of_one_hook_says_activation() {
    let dir = temp_folder("singular");
    let out = dir.join("cache.safetensors");

    let output = cache_ids_to(&out);

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).starts_with("wrote 1 activation ("),
        "{}",
        stdout(&output)
    );
}

#[test]
fn cache_above_max_bytes_is_rejected() {
    let dir = temp_folder("max-bytes");
    let out = dir.join("cache.safetensors");
    let model = tiny_gqa();
    let args = |max_bytes: &str| {
        qwenlens(&[
            "cache",
            "--model",
            &model,
            "--device",
            "cpu",
            "--ids",
            "1,2",
            "--names",
            "^hook_embed$",
            "--out",
            &out.display().to_string(),
            "--max-bytes",
            max_bytes,
        ])
    };

    let rejected = args("100");
    let rejected_wrote = out.exists();
    let allowed = args("1000000");

    assert!(!rejected.status.success());
    assert!(!rejected_wrote, "a rejected cache writes nothing");
    let d_model = safetensors_header(&{
        assert!(allowed.status.success(), "{}", stderr(&allowed));
        out.clone()
    })["hook_embed"]
        .1[2];
    let estimate = format!("about {} bytes", 2 * d_model * 4);
    assert!(
        stderr(&rejected).contains(&estimate),
        "{}",
        stderr(&rejected)
    );
    assert!(
        stderr(&rejected).contains("--max-bytes 100"),
        "{}",
        stderr(&rejected)
    );
}

#[test]
fn negative_numbers_get_the_validation_message() {
    let model = tiny_gqa();
    for (flag, expected) in [
        ("--temperature", "invalid temperature -1 from --temperature"),
        ("--top-p", "invalid top_p -1 from --top-p"),
        ("--repetition-penalty", "invalid repetition_penalty -1 from"),
        ("--top-k", "-1 is negative; expected a whole number"),
        (
            "--max-new-tokens",
            "-1 is negative; expected a whole number",
        ),
        ("--seed", "-1 is negative; expected a whole number"),
        ("--ids", "-1 is not in 0.."),
    ] {
        let output = qwenlens(&[
            "generate", "--model", &model, "--device", "cpu", "--ids", "1", flag, "-1",
        ]);

        assert!(!output.status.success(), "{flag}");
        assert!(
            !stderr(&output).contains("unexpected argument"),
            "{flag}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{flag}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn generation_config_temperature_error_names_the_file() {
    let model = tiny_gqa_copy(
        "genconfig-temperature",
        r#"{"do_sample": true, "temperature": 0.0}"#,
        false,
    );
    let model = model.display().to_string();

    let from_file = qwenlens(&[
        "generate", "--model", &model, "--device", "cpu", "--ids", "1",
    ]);
    let tiny_flag = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--ids",
        "1",
        "--temperature",
        "1e-46",
    ]);
    let greedy = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--ids",
        "1",
        "--greedy",
        "--max-new-tokens",
        "2",
    ]);

    assert!(!from_file.status.success());
    let message = stderr(&from_file);
    assert!(
        message.contains("invalid temperature 0 from generation_config.json"),
        "{message}"
    );
    assert!(message.contains("--greedy"), "{message}");
    assert!(message.contains("--temperature T"), "{message}");
    assert!(
        stderr(&tiny_flag).contains("invalid temperature 1e-46 from --temperature"),
        "{}",
        stderr(&tiny_flag)
    );
    assert!(greedy.status.success(), "{}", stderr(&greedy));
}

#[test]
fn generation_config_max_length_limits_new_tokens() {
    let model = tiny_gqa_copy("genconfig-max-length", r#"{"max_length": 5}"#, false);
    let model = model.display().to_string();

    let output = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--ids",
        "1,2",
        "--greedy",
        "--json",
        "--ignore-eos",
    ]);

    assert!(output.status.success(), "{}", stderr(&output));
    let last_line = stdout(&output).lines().last().unwrap().to_string();
    assert_eq!(ids_of_json_line(&last_line).len(), 3, "{last_line}");
}

#[test]
fn model_without_tokenizer_takes_ids_and_suggests_them() {
    let model = tiny_gqa_copy("no-tokenizer", "{}", false);
    let model = model.display().to_string();
    let out = temp_folder("no-tokenizer-out").join("cache.safetensors");

    let generated = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--ids",
        "1,2",
        "--greedy",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    let cached = qwenlens(&[
        "cache",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--out",
        &out.display().to_string(),
    ]);

    assert!(generated.status.success(), "{}", stderr(&generated));
    let last_line = stdout(&generated).lines().last().unwrap().to_string();
    assert_eq!(ids_of_json_line(&last_line).len(), 2, "{last_line}");
    assert!(!cached.status.success());
    assert!(stderr(&cached).contains("--ids"), "{}", stderr(&cached));
}

#[test]
fn auto_device_prints_no_wgpu_errors() {
    let model = tiny_gqa();

    let output = qwenlens(&[
        "generate",
        "--model",
        &model,
        "--ids",
        "1,2",
        "--greedy",
        "--max-new-tokens",
        "1",
        "--log",
        "error",
    ]);

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("wgpu_hal"), "{}", stderr(&output));
    assert!(!stderr(&output).contains("EGL"), "{}", stderr(&output));
}
