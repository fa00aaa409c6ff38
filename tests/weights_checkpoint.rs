//! Loading and validating the fixture checkpoints and the stand-in.

use qwenlens_tests::{fixture_model, standin_dir};
use qwenlens_weights::{Checkpoint, DType, ModelSource};

#[test]
fn tiny_gqa_bf16_tied() {
    let checkpoint = Checkpoint::open(fixture_model("tiny-gqa")).unwrap();
    let config = checkpoint.config();
    assert_eq!(config.n_layers(), 2);
    assert_eq!(config.d_model(), 64);
    assert_eq!(config.n_heads(), 4);
    assert_eq!(config.n_kv_heads(), 2);
    assert_eq!(config.d_head(), 16);
    assert_eq!(config.d_mlp(), 128);
    assert_eq!(config.d_vocab(), 151936);
    assert_eq!(config.rope_theta, 1e6);
    assert_eq!(config.rms_norm_eps, 1e-6);
    assert_eq!(config.bos_token_id, Some(151643));
    assert_eq!(config.eos_token_ids, vec![151645]);
    assert!(checkpoint.is_tied());
    assert_eq!(checkpoint.dtype(), DType::BF16);
    assert_eq!(checkpoint.unembedding_name(), "model.embed_tokens.weight");
    assert!(checkpoint.unexpected_tensors().is_empty());
    assert_eq!(checkpoint.files().len(), 1);

    let generation = checkpoint.generation_config();
    assert_eq!(generation.eos_token_ids, vec![151645, 151643]);
    assert_eq!(generation.pad_token_id, Some(151643));
    assert_eq!(generation.do_sample, Some(true));
    assert_eq!(generation.temperature, Some(0.7));
    assert_eq!(generation.top_k, Some(20));
    assert_eq!(generation.top_p, Some(0.8));
    assert_eq!(generation.repetition_penalty, Some(1.1));
    assert_eq!(checkpoint.eos_token_ids(), &[151645, 151643]);

    let embed = checkpoint.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.dtype, DType::BF16);
    assert_eq!(embed.shape, &[151936, 64]);
    assert_eq!(embed.data.len(), 151936 * 64 * 2);
    let norm = checkpoint.tensor("model.norm.weight").unwrap().to_f32_vec();
    assert_eq!(norm.len(), 64);
    // RMSNorm weights were drawn from N(1, 0.2^2), so their mean is near 1.
    let mean = norm.iter().sum::<f32>() / norm.len() as f32;
    assert!(
        (mean - 1.0).abs() < 0.15,
        "mean of model.norm.weight is {mean}"
    );
}

#[test]
fn tiny_untied_sharded_f32() {
    let checkpoint = Checkpoint::open(fixture_model("tiny-untied-sharded")).unwrap();
    let config = checkpoint.config();
    assert_eq!(
        (
            config.n_layers(),
            config.d_model(),
            config.n_heads(),
            config.n_kv_heads()
        ),
        (3, 96, 6, 2)
    );
    assert_eq!(
        (config.d_head(), config.d_mlp(), config.d_vocab()),
        (16, 256, 1000)
    );
    assert_eq!(config.rope_theta, 1e6);
    assert_eq!(config.bos_token_id, None);
    assert!(config.eos_token_ids.is_empty());
    assert!(!checkpoint.is_tied());
    assert_eq!(checkpoint.dtype(), DType::F32);
    assert_eq!(checkpoint.unembedding_name(), "lm_head.weight");
    assert_eq!(checkpoint.parameter_count(), 488064);

    let files = checkpoint.files();
    assert_eq!(files.len(), 2);
    assert!(files[0].path.ends_with("model-00001-of-00002.safetensors"));
    assert!(files[1].path.ends_with("model-00002-of-00002.safetensors"));
    let total_data: u64 = files.iter().map(|f| f.size).sum();
    assert!(total_data > 1952256, "files hold {total_data} bytes");

    // Layer 1 is split across the shards; both halves must resolve.
    let down = checkpoint
        .tensor("model.layers.1.mlp.down_proj.weight")
        .unwrap();
    assert_eq!(down.shape, &[96, 256]);
    let q = checkpoint
        .tensor("model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, &[96, 96]);
    let lm_head = checkpoint.tensor("lm_head.weight").unwrap();
    assert_eq!(lm_head.shape, &[1000, 96]);
    assert_eq!(lm_head.to_f32_vec().len(), 96_000);
}

#[test]
fn tiny_mha_f16() {
    let checkpoint = Checkpoint::open(fixture_model("tiny-mha-f16")).unwrap();
    let config = checkpoint.config();
    assert_eq!(config.n_heads(), 4);
    assert_eq!(config.n_kv_heads(), 4);
    assert_eq!(config.kv_group_size(), 1);
    assert_eq!(config.d_mlp(), 160);
    assert!(checkpoint.is_tied());
    assert_eq!(checkpoint.dtype(), DType::F16);
    let k = checkpoint
        .tensor("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.dtype, DType::F16);
    assert_eq!(k.shape, &[64, 64]);
    assert!(checkpoint.generation_config().eos_token_ids.is_empty());
}

#[test]
fn tensor_unknown_name_is_error() {
    let checkpoint = Checkpoint::open(fixture_model("tiny-mha-f16")).unwrap();
    let error = checkpoint.tensor("lm_head.weight").unwrap_err().to_string();
    assert!(error.contains("lm_head.weight"), "{error}");
    assert!(error.contains("not found"), "{error}");
}

#[test]
fn standin_loads_with_parameter_count() {
    let checkpoint = Checkpoint::load(&ModelSource::Local(standin_dir())).unwrap();
    let config = checkpoint.config();
    assert_eq!(config.n_layers(), 24);
    assert_eq!(config.d_model(), 896);
    assert_eq!(config.n_heads(), 14);
    assert_eq!(config.n_kv_heads(), 2);
    assert_eq!(config.d_head(), 64);
    assert_eq!(config.d_mlp(), 4864);
    assert_eq!(config.d_vocab(), 151936);
    assert_eq!(checkpoint.dtype(), DType::BF16);
    assert!(checkpoint.is_tied());
    assert_eq!(checkpoint.parameter_count(), 494_032_768);
}
