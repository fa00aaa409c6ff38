//! Every kind of broken checkpoint, config, tokenizer and chat file gives a clear error, checked by
//! message content. The broken files are copies of the fixtures in temporary folders.

use std::fs;
use std::path::{Path, PathBuf};

use qwenlens_tests::{fixture_model, fixtures_dir};
use qwenlens_weights::{Checkpoint, Tokenizer, WeightsError, read_chat_file};
use safetensors::{Dtype, SafeTensors};

/// A temporary copy of a fixture model folder.
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture_model(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn open_error(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened without an error", dir.display()),
        Err(error) => error.to_string(),
    }
}

/// Rewrites `dir/model.safetensors` with `edit` applied to the list of (name, dtype, shape, data).
fn rewrite_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();

    edit(&mut tensors);

    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
            (name.clone(), view)
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    fs::write(&path, out).unwrap();
}

/// Rewrites the top-level keys of `dir/config.json`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

fn set_header_length(path: &Path, length: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[..8].copy_from_slice(&length.to_le_bytes());
    fs::write(path, bytes).unwrap();
}

fn weights_path(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

#[test]
fn truncated_data_is_error() {
    let dir = copy_model("tiny-mha-f16");
    let path = weights_path(dir.path());
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

    let error = open_error(dir.path());
    assert!(error.contains("model.safetensors"), "{error}");
    assert!(error.contains("outside the"), "{error}");
    assert!(error.contains("truncated file?"), "{error}");
}

#[test]
fn truncated_inside_header_is_error() {
    let dir = copy_model("tiny-mha-f16");
    let path = weights_path(dir.path());
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..100]).unwrap();

    let error = open_error(dir.path());
    assert!(error.contains("but the file has only 92"), "{error}");
}

#[test]
fn truncated_below_length_field_is_error() {
    for length in [0, 5] {
        let dir = copy_model("tiny-mha-f16");
        let path = weights_path(dir.path());
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..length]).unwrap();

        let error = open_error(dir.path());
        assert!(
            error.contains(&format!("file is {length} bytes, too short")),
            "{error}"
        );
    }
}

#[test]
fn header_longer_than_file_is_error() {
    let dir = copy_model("tiny-mha-f16");
    let path = weights_path(dir.path());
    let file_len = fs::metadata(&path).unwrap().len();
    set_header_length(&path, file_len);

    let error = open_error(dir.path());
    assert!(
        error.contains(&format!("header claims {file_len} bytes")),
        "{error}"
    );
    assert!(error.contains(&format!("only {}", file_len - 8)), "{error}");
}

#[test]
fn header_length_over_cap_is_error() {
    let dir = copy_model("tiny-mha-f16");
    let path = weights_path(dir.path());
    set_header_length(&path, 1 << 40);

    let error = open_error(dir.path());
    assert!(
        error.contains("header length 1099511627776 bytes"),
        "{error}"
    );
    assert!(
        error.contains("exceeds the 104857600-byte limit"),
        "{error}"
    );
}

#[test]
fn header_not_json_is_error() {
    let dir = copy_model("tiny-mha-f16");
    let path = weights_path(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[8] = b'#';
    fs::write(&path, bytes).unwrap();

    let error = open_error(dir.path());
    assert!(error.contains("header is not a JSON object"), "{error}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let dir = copy_model("tiny-mha-f16");
    rewrite_tensors(dir.path(), |tensors| {
        let o_proj = tensors
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.self_attn.o_proj.weight")
            .unwrap();
        o_proj.2 = vec![32, 128];
    });

    let error = open_error(dir.path());
    assert!(
        error.contains("model.layers.1.self_attn.o_proj.weight"),
        "{error}"
    );
    assert!(error.contains("model.safetensors"), "{error}");
    assert!(
        error.contains("has shape [32, 128], expected [64, 64]"),
        "{error}"
    );
}

#[test]
fn unsupported_dtype_names_tensor() {
    for (dtype, name) in [(Dtype::F64, "F64"), (Dtype::I64, "I64")] {
        let dir = copy_model("tiny-mha-f16");
        rewrite_tensors(dir.path(), |tensors| {
            let norm = tensors
                .iter_mut()
                .find(|t| t.0 == "model.norm.weight")
                .unwrap();
            norm.1 = dtype;
            norm.3 = vec![0; 64 * 8];
        });

        let error = open_error(dir.path());
        assert!(error.contains("model.norm.weight"), "{error}");
        assert!(
            error.contains(&format!("has dtype {name}, expected one of BF16, F16, F32")),
            "{error}"
        );
    }
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = copy_model("tiny-mha-f16");
    rewrite_tensors(dir.path(), |tensors| {
        tensors.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    });

    let error = open_error(dir.path());
    assert!(
        error.contains(
            "tensor model.layers.1.mlp.up_proj.weight (expected shape [160, 64]) not found"
        ),
        "{error}"
    );
    assert!(error.contains("model.safetensors"), "{error}");
}

#[test]
fn untied_without_lm_head_is_error() {
    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert("tie_word_embeddings".into(), false.into());
    });

    let error = open_error(dir.path());
    assert!(error.contains("tensor lm_head.weight"), "{error}");
}

#[test]
fn unexpected_tensor_is_listed_not_rejected() {
    let dir = copy_model("tiny-mha-f16");
    rewrite_tensors(dir.path(), |tensors| {
        tensors.push((
            "model.rotary_emb.inv_freq".into(),
            Dtype::F32,
            vec![8],
            vec![0; 32],
        ));
    });

    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        checkpoint.unexpected_tensors(),
        &["model.rotary_emb.inv_freq".to_string()]
    );
    assert!(checkpoint.contains("model.rotary_emb.inv_freq"));
}

#[test]
fn missing_config_is_error() {
    let dir = copy_model("tiny-mha-f16");
    fs::remove_file(dir.path().join("config.json")).unwrap();

    let error = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(error, WeightsError::MissingFile { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("config.json not found"), "{message}");
}

#[test]
fn missing_weights_is_error() {
    let dir = copy_model("tiny-mha-f16");
    fs::remove_file(weights_path(dir.path())).unwrap();

    let error = open_error(dir.path());
    assert!(error.contains("model.safetensors not found"), "{error}");
    assert!(error.contains("model.safetensors.index.json"), "{error}");
}

#[test]
fn heads_not_divisible_by_kv_heads_is_error() {
    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert("num_key_value_heads".into(), 3.into());
    });

    let error = open_error(dir.path());
    assert!(error.contains("config.json"), "{error}");
    assert!(
        error.contains("num_attention_heads 4 is not divisible by num_key_value_heads 3"),
        "{error}"
    );
}

#[test]
fn config_problems_are_errors() {
    type Edit = fn(&mut serde_json::Map<String, serde_json::Value>);
    let cases: [(Edit, &str); 7] = [
        (
            |c| {
                c.insert("vocab_size".into(), (u64::MAX / 2).into());
            },
            "describe more parameters than fit in memory",
        ),
        (
            |c| {
                c.insert("hidden_size".into(), 66.into());
            },
            "hidden_size 66 is not divisible by num_attention_heads 4",
        ),
        (
            |c| {
                c.remove("intermediate_size");
            },
            "required key intermediate_size is missing",
        ),
        (
            |c| {
                c.insert("model_type".into(), "llama".into());
                c.insert(
                    "architectures".into(),
                    serde_json::json!(["LlamaForCausalLM"]),
                );
            },
            "expected model_type \"qwen2\"",
        ),
        (
            |c| {
                c.remove("rope_parameters");
            },
            "neither rope_theta nor rope_parameters.rope_theta",
        ),
        (
            |c| {
                c.insert("num_attention_heads".into(), 0.into());
            },
            "num_attention_heads is 0",
        ),
        (
            |c| {
                c.insert("vocab_size".into(), "many".into());
            },
            "invalid JSON",
        ),
    ];
    for (edit, expected) in cases {
        let dir = copy_model("tiny-mha-f16");
        edit_config(dir.path(), edit);
        let error = open_error(dir.path());
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
    }
}

#[test]
fn shard_index_naming_missing_shard_is_error() {
    let dir = copy_model("tiny-untied-sharded");
    fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();

    let error = open_error(dir.path());
    assert!(error.contains("model.safetensors.index.json"), "{error}");
    assert!(
        error.contains("shard model-00002-of-00002.safetensors listed in weight_map is missing"),
        "{error}"
    );
}

#[test]
fn shard_index_wrong_file_is_error() {
    let dir = copy_model("tiny-untied-sharded");
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
    fs::write(&index_path, index.to_string()).unwrap();

    let error = open_error(dir.path());
    assert!(
        error.contains("puts tensor lm_head.weight in model-00001-of-00002.safetensors"),
        "{error}"
    );
}

#[test]
fn missing_tokenizer_json_is_error() {
    let dir = copy_model("tiny-mha-f16");
    let error = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("tokenizer.json not found"), "{error}");
}

#[test]
fn corrupt_tokenizer_json_is_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let error = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("tokenizer.json"), "{error}");
    assert!(error.contains("failed to load"), "{error}");
}

#[test]
fn malformed_chat_file_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.json");
    fs::write(&path, "[{\"role\": \"user\", \"content\": \"hi\"},").unwrap();

    let error = read_chat_file(&path).unwrap_err().to_string();
    assert!(error.contains("chat.json"), "{error}");
    assert!(error.contains("not valid JSON"), "{error}");
    assert!(error.contains("line 1"), "{error}");
}

#[test]
fn chat_file_unknown_role_lists_valid_roles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.json");
    fs::write(&path, r#"[{"role": "User", "content": "hi"}]"#).unwrap();

    let error = read_chat_file(&path).unwrap_err().to_string();
    assert!(error.contains("chat.json"), "{error}");
    assert!(error.contains("unknown role \"User\""), "{error}");
    assert!(
        error.contains("valid roles are system, user, assistant, tool"),
        "{error}"
    );
}

#[test]
fn chat_file_missing_is_error() {
    let path = fixtures_dir().join("no-such-chat.json");
    let error = read_chat_file(&path).unwrap_err().to_string();
    assert!(error.contains("no-such-chat.json"), "{error}");
}

#[test]
fn shard_index_empty_weight_map_is_error() {
    let dir = copy_model("tiny-untied-sharded");
    fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {}}"#,
    )
    .unwrap();

    let error = open_error(dir.path());
    assert!(error.contains("weight_map is empty"), "{error}");
}

#[test]
fn open_on_file_or_missing_folder_is_error() {
    let file = fixture_model("tiny-gqa").join("config.json");
    let error = open_error(&file);
    assert!(error.contains("this is a file"), "{error}");

    let missing = fixture_model("no-such-model");
    let error = open_error(&missing);
    assert!(error.contains("the model folder does not exist"), "{error}");
}

/// The message of `error` followed by the messages of its sources, as anyhow's `{:#}` prints it.
fn message_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn io_error_cause_printed_once() {
    let path = fixtures_dir().join("no-such-chat.json");
    let error = read_chat_file(&path).unwrap_err();
    let chain = message_chain(&error);

    assert!(chain.contains("no-such-chat.json"), "{chain}");
    assert_eq!(chain.matches("os error 2").count(), 1, "{chain}");
}

#[test]
fn json_error_cause_printed_once() {
    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert("vocab_size".into(), "many".into());
    });

    let error = Checkpoint::open(dir.path()).unwrap_err();
    let chain = message_chain(&error);
    assert!(chain.contains("invalid JSON in"), "{chain}");
    assert_eq!(chain.matches("invalid type").count(), 1, "{chain}");
}

#[test]
fn bad_eos_token_id_names_expected_form() {
    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert("eos_token_id".into(), "end".into());
    });

    let chain = message_chain(&Checkpoint::open(dir.path()).unwrap_err());
    assert!(chain.contains("config.json"), "{chain}");
    assert!(chain.contains("a token id"), "{chain}");
    assert!(!chain.contains("untagged"), "{chain}");
}

#[test]
fn zero_max_position_embeddings_is_error() {
    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert("max_position_embeddings".into(), 0.into());
    });

    let error = open_error(dir.path());
    assert!(error.contains("config.json"), "{error}");
    assert!(error.contains("max_position_embeddings is 0"), "{error}");
}

#[test]
fn special_token_ids_outside_vocabulary_are_errors() {
    // tiny-mha-f16 has vocab_size 1000.
    for (key, value) in [
        ("eos_token_id", serde_json::json!(999_999_999)),
        ("eos_token_id", serde_json::json!([5, 1000])),
        ("bos_token_id", serde_json::json!(1000)),
    ] {
        let dir = copy_model("tiny-mha-f16");
        edit_config(dir.path(), |config| {
            config.insert(key.into(), value.clone());
        });

        let error = open_error(dir.path());
        assert!(error.contains("config.json"), "{key} {value}: {error}");
        assert!(error.contains(key), "{key} {value}: {error}");
        assert!(
            error.contains("outside the vocabulary (vocab_size 1000)"),
            "{key} {value}: {error}"
        );
    }

    let dir = copy_model("tiny-mha-f16");
    fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [151645]}"#,
    )
    .unwrap();
    let error = open_error(dir.path());
    assert!(error.contains("generation_config.json"), "{error}");
    assert!(error.contains("eos_token_id 151645"), "{error}");
}

#[test]
fn other_model_type_with_qwen2_architecture_loads() {
    // A second marker naming another architecture only warns, as long as one marker is Qwen2.
    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert("model_type".into(), "llama".into());
    });
    assert!(Checkpoint::open(dir.path()).is_ok());

    let dir = copy_model("tiny-mha-f16");
    edit_config(dir.path(), |config| {
        config.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
    });
    assert!(Checkpoint::open(dir.path()).is_ok());
}

#[test]
fn chat_file_with_byte_order_mark_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.json");
    fs::write(&path, "\u{feff}[{\"role\": \"user\", \"content\": \"hi\"}]").unwrap();

    let messages = read_chat_file(&path).unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].content, "hi");
}

/// A folder with the Qwen2.5 tokenizer and a `tokenizer_config.json` holding `chat_template`.
fn tokenizer_with_template(chat_template: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures_dir().join("tokenizer/qwen2.5/tokenizer.json");
    fs::copy(source, dir.path().join("tokenizer.json")).unwrap();
    let config = serde_json::json!({ "chat_template": chat_template });
    fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn endless_chat_template_stops_with_error() {
    let dir = tokenizer_with_template(
        "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}\
         {% endfor %}{% endfor %}{% endfor %}",
    );
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();

    let started = std::time::Instant::now();
    let error = tokenizer
        .apply_chat_template(&[qwenlens_weights::ChatMessage::user("hi")], true)
        .unwrap_err()
        .to_string();
    assert!(error.contains("tokenizer_config.json"), "{error}");
    assert!(error.contains("rendering stopped after"), "{error}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "the template ran for {:?}",
        started.elapsed()
    );
}
