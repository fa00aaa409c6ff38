//! Generation against the fixture goldens: greedy ids with and without the KV cache on both
//! backends, seeded sampling, eos stopping, streaming, and pattern replacement during generation.

use std::sync::{Arc, OnceLock};

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{Backend, Device, create_backend};
use qwenlens_model::{
    GenerateOptions, Hooks, Intervention, Model, PatternSpec, RunOptions, Sampling, Scope,
    StopReason, TextStream, TokenBatch,
};
use qwenlens_tests::{fixture_model, fixtures_dir};
use qwenlens_weights::{Checkpoint, Tokenizer};
use safetensors::{Dtype, SafeTensors};

const MODELS: [&str; 3] = ["tiny-gqa", "tiny-untied-sharded", "tiny-mha-f16"];

/// Returns the CPU backend, created once.
fn cpu() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    BACKEND.get_or_init(|| Arc::new(CpuBackend::new())).clone()
}

/// Returns the GPU backend (lavapipe without a GPU), created once because compiling its kernels
/// is slow.
fn gpu() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            create_backend(Device::Gpu).expect("GPU backend (install mesa-vulkan-drivers)")
        })
        .clone()
}

fn load(name: &str, backend: Arc<dyn Backend>) -> Model {
    let checkpoint = Checkpoint::open(fixture_model(name)).expect("fixture checkpoint");
    Model::from_checkpoint(&checkpoint, backend).expect("model")
}

/// Reads the `len7` golden file of a fixture model.
fn golden_bytes(model: &str) -> Vec<u8> {
    let path = fixtures_dir()
        .join("goldens")
        .join(model)
        .join("len7.safetensors");
    std::fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

fn golden_ids(bytes: &[u8], name: &str) -> Vec<u32> {
    let tensors = SafeTensors::deserialize(bytes).expect("golden safetensors");
    let view = tensors.tensor(name).expect("golden tensor");
    assert_eq!(view.dtype(), Dtype::I64, "{name}");
    view.data()
        .chunks_exact(8)
        .map(|chunk| i64::from_le_bytes(chunk.try_into().unwrap()) as u32)
        .collect()
}

fn golden_f32(bytes: &[u8], name: &str) -> Vec<f32> {
    let tensors = SafeTensors::deserialize(bytes).expect("golden safetensors");
    let view = tensors.tensor(name).expect("golden tensor");
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    view.data()
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

/// Reads the prompt and the 12 greedy tokens of a model's `len7` golden.
fn prompt_and_golden(model: &str) -> (Vec<u32>, Vec<u32>) {
    let bytes = golden_bytes(model);
    (
        golden_ids(&bytes, "input_ids"),
        golden_ids(&bytes, "generated_ids"),
    )
}

fn greedy(use_kv_cache: bool) -> GenerateOptions {
    GenerateOptions {
        use_kv_cache,
        ..GenerateOptions::greedy(12)
    }
}

fn generate_ids(model: &Model, prompt: &[u32], options: &GenerateOptions) -> Vec<u32> {
    model
        .generate(prompt, options, &Hooks::default(), |_, _| {})
        .expect("generation")
        .ids
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &value) in row.iter().enumerate() {
        if value > row[best] {
            best = index;
        }
    }
    best as u32
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_greedy_golden(backend: fn() -> Arc<dyn Backend>, backend_name: &str) {
    for name in MODELS {
        let model = load(name, backend());
        let (prompt, golden) = prompt_and_golden(name);

        for use_kv_cache in [true, false] {
            let generation = model
                .generate(&prompt, &greedy(use_kv_cache), &Hooks::default(), |_, _| {})
                .expect("generation");

            assert_eq!(
                generation.ids, golden,
                "{name} on {backend_name}, use_kv_cache {use_kv_cache}"
            );
            assert_eq!(generation.prompt_ids, prompt, "{name}");
            assert_eq!(generation.stop_reason, StopReason::MaxNewTokens, "{name}");
        }
    }
}

#[test]
fn greedy_matches_golden_cpu() {
    check_greedy_golden(cpu, "cpu");
}

#[test]
fn greedy_matches_golden_gpu() {
    check_greedy_golden(gpu, "gpu");
}

#[test]
fn greedy_text_decodes_ids() {
    let model = load("tiny-gqa", cpu());
    let (prompt, golden) = prompt_and_golden("tiny-gqa");
    let tokenizer = model.tokenizer().expect("tiny-gqa has a tokenizer");

    let mut streamed = String::new();
    let mut streamed_ids = Vec::new();
    let generation = model
        .generate(&prompt, &greedy(true), &Hooks::default(), |id, piece| {
            streamed_ids.push(id);
            streamed.push_str(piece);
        })
        .unwrap();

    assert_eq!(streamed_ids, golden);
    assert_eq!(generation.text, tokenizer.decode(&golden).unwrap());
    assert_eq!(streamed, generation.text);
}

#[test]
fn sampling_with_seed_is_reproducible() {
    let model = load("tiny-mha-f16", cpu());
    let (prompt, _) = prompt_and_golden("tiny-mha-f16");
    let options = |seed| GenerateOptions {
        sampling: Sampling {
            do_sample: true,
            temperature: 1.5,
            seed: Some(seed),
            ..Sampling::greedy()
        },
        ..GenerateOptions::greedy(12)
    };

    let first = generate_ids(&model, &prompt, &options(3));
    let again = generate_ids(&model, &prompt, &options(3));
    let others: Vec<Vec<u32>> = (4..8)
        .map(|seed| generate_ids(&model, &prompt, &options(seed)))
        .collect();

    assert_eq!(first, again);
    assert!(
        others.iter().any(|ids| *ids != first),
        "five seeds gave the same 12 tokens at temperature 1.5: {first:?}"
    );
}

#[test]
fn top_k_one_equals_greedy() {
    for name in MODELS {
        let model = load(name, cpu());
        let (prompt, golden) = prompt_and_golden(name);
        let options = GenerateOptions {
            sampling: Sampling {
                do_sample: true,
                temperature: 2.0,
                top_k: Some(1),
                seed: Some(1),
                ..Sampling::greedy()
            },
            ..GenerateOptions::greedy(12)
        };

        assert_eq!(generate_ids(&model, &prompt, &options), golden, "{name}");
    }
}

#[test]
fn repetition_penalty_changes_repeats() {
    let model = load("tiny-mha-f16", cpu());
    let (prompt, golden) = prompt_and_golden("tiny-mha-f16");
    let options = GenerateOptions {
        sampling: Sampling {
            repetition_penalty: 100.0,
            ..Sampling::greedy()
        },
        ..GenerateOptions::greedy(12)
    };

    let ids = generate_ids(&model, &prompt, &options);

    // A penalty of 100 pushes every seen token far below the unseen ones, so no token of the
    // context comes back. The golden, without a penalty, repeats its first token.
    let mut seen: Vec<u32> = prompt.clone();
    let repeats = ids
        .iter()
        .filter(|&&id| {
            let repeat = seen.contains(&id);
            seen.push(id);
            repeat
        })
        .count();
    assert_ne!(ids, golden);
    assert_eq!(repeats, 0, "{ids:?}");
}

#[test]
fn eos_stops_generation() {
    let model = load("tiny-gqa", cpu());
    let (prompt, golden) = prompt_and_golden("tiny-gqa");
    let eos = golden[3];
    let first_eos = golden.iter().position(|&id| id == eos).unwrap();
    let options = GenerateOptions {
        stop_on_eos: true,
        eos_ids: vec![151_645, eos],
        ..GenerateOptions::greedy(12)
    };

    let mut calls = 0;
    let generation = model
        .generate(&prompt, &options, &Hooks::default(), |_, _| calls += 1)
        .unwrap();

    assert_eq!(generation.ids, golden[..=first_eos]);
    assert_eq!(generation.stop_reason, StopReason::Eos(eos));
    assert_eq!(calls, first_eos + 1);
    let tokenizer = model.tokenizer().unwrap();
    assert_eq!(
        generation.text,
        tokenizer.decode(&golden[..first_eos]).unwrap()
    );
}

#[test]
fn zero_new_tokens_is_empty() {
    let model = load("tiny-mha-f16", cpu());
    let (prompt, _) = prompt_and_golden("tiny-mha-f16");

    let generation = model
        .generate(
            &prompt,
            &GenerateOptions::greedy(0),
            &Hooks::default(),
            |_, _| {},
        )
        .unwrap();

    assert!(generation.ids.is_empty());
    assert_eq!(generation.stop_reason, StopReason::MaxNewTokens);
}

#[test]
fn context_overflow_is_error() {
    let model = load("tiny-mha-f16", cpu());
    let max_positions = model.config().max_position_embeddings;
    let prompt = vec![1u32; 10];

    let error = model
        .generate(
            &prompt,
            &GenerateOptions::greedy(max_positions),
            &Hooks::default(),
            |_, _| {},
        )
        .unwrap_err()
        .to_string();

    assert!(error.contains("max_position_embeddings"), "{error}");
    assert!(
        error.contains(&format!("at most {}", max_positions - 10)),
        "{error}"
    );
}

#[test]
fn prompt_longer_than_context_is_error() {
    let model = load("tiny-mha-f16", cpu());
    let max_positions = model.config().max_position_embeddings;
    let prompt = vec![1u32; max_positions + 1];

    let error = model
        .generate(
            &prompt,
            &GenerateOptions::greedy(1),
            &Hooks::default(),
            |_, _| {},
        )
        .unwrap_err()
        .to_string();

    assert!(error.contains(&(max_positions + 1).to_string()), "{error}");
    assert!(error.contains("max_position_embeddings"), "{error}");
}

#[test]
fn empty_prompt_is_error() {
    let model = load("tiny-mha-f16", cpu());

    let error = model
        .generate(
            &[],
            &GenerateOptions::greedy(1),
            &Hooks::default(),
            |_, _| {},
        )
        .unwrap_err()
        .to_string();

    assert!(error.contains("empty prompt"), "{error}");
}

#[test]
fn invalid_sampling_is_error() {
    let model = load("tiny-mha-f16", cpu());
    let (prompt, _) = prompt_and_golden("tiny-mha-f16");
    let options = GenerateOptions {
        sampling: Sampling {
            do_sample: true,
            temperature: -1.0,
            ..Sampling::greedy()
        },
        ..GenerateOptions::greedy(4)
    };

    let error = model
        .generate(&prompt, &options, &Hooks::default(), |_, _| {})
        .unwrap_err()
        .to_string();

    assert!(error.contains("temperature"), "{error}");
}

fn uniform_pattern_hooks() -> Hooks {
    Hooks::from_interventions(vec![Intervention::replace_pattern(
        1,
        1,
        PatternSpec::Uniform,
    )])
}

/// Runs a full forward pass over `tokens` and returns the logits of its last position.
fn full_forward_last(model: &Model, tokens: &[u32], hooks: &Hooks) -> Vec<f32> {
    let options = RunOptions {
        hooks: hooks.clone(),
        ..RunOptions::default()
    };
    let output = model.run(&TokenBatch::single(tokens), &options).unwrap();
    output.into_logits().unwrap().last(0).unwrap()
}

fn check_pattern_replacement(backend: fn() -> Arc<dyn Backend>, backend_name: &str) {
    let mut changed_models = Vec::new();
    for name in MODELS {
        let model = load(name, backend());
        let bytes = golden_bytes(name);
        let prompt = golden_ids(&bytes, "input_ids");
        let hooks = uniform_pattern_hooks();

        let cached = model
            .generate(&prompt, &greedy(true), &hooks, |_, _| {})
            .unwrap();
        let recomputed = model
            .generate(&prompt, &greedy(false), &hooks, |_, _| {})
            .unwrap();
        assert_eq!(cached.ids, recomputed.ids, "{name} on {backend_name}");

        // Step by step: the cached step's logits equal a full forward over the same tokens, both
        // with the pattern of layer 1 head 1 replaced.
        let step_options = RunOptions {
            hooks: hooks.clone(),
            ..RunOptions::default()
        };
        let mut kv_cache = model.new_kv_cache();
        let mut sequence = prompt.clone();
        let mut pending = prompt.clone();
        for (step, &token) in cached.ids.iter().enumerate() {
            let output = model
                .run_step(&mut kv_cache, &TokenBatch::single(&pending), &step_options)
                .unwrap();
            let step_logits = output.into_logits().unwrap().last(0).unwrap();
            let full_logits = full_forward_last(&model, &sequence, &hooks);

            let diff = max_abs_diff(&step_logits, &full_logits);
            assert!(
                diff <= 2e-4,
                "{name} on {backend_name}, step {step}: max |cached - recomputed| = {diff}"
            );
            assert_eq!(
                argmax(&full_logits),
                token,
                "{name} on {backend_name}, step {step}"
            );
            if step == 0 {
                let golden = golden_f32(&bytes, "patch_uniform_logits_last");
                let diff = max_abs_diff(&step_logits, &golden);
                assert!(
                    diff <= 2e-4,
                    "{name} on {backend_name}: max |step 0 - patch_uniform_logits_last| = {diff}"
                );
            }

            sequence.push(token);
            pending = vec![token];
        }

        if cached.ids != golden_ids(&bytes, "generated_ids") {
            changed_models.push(name);
        }
    }

    // If no generation changed, the checks above would also pass when generate ignored the hooks.
    assert!(
        !changed_models.is_empty(),
        "the pattern replacement changed no generation"
    );
}

#[test]
fn pattern_replacement_matches_recompute_cpu() {
    check_pattern_replacement(cpu, "cpu");
}

#[test]
fn pattern_replacement_matches_recompute_gpu() {
    check_pattern_replacement(gpu, "gpu");
}

#[test]
fn text_stream_reproduces_tokenizer_cases() {
    let tokenizer = Tokenizer::from_dir(fixture_model("tiny-gqa")).expect("tiny-gqa tokenizer");
    let path = fixtures_dir().join("tokenizer/qwen2.5/cases.json");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("cases.json")).unwrap();

    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let decoded = case["decoded"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();

        let mut stream = TextStream::default();
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(stream.push(id, |ids| tokenizer.decode(ids)).unwrap());
        }
        let rest = stream.finish(|ids| tokenizer.decode(ids)).unwrap();

        assert_eq!(pieces.concat() + &rest, decoded, "{name}");
        assert!(
            rest.is_empty(),
            "{name}: text held back until finish: {rest:?}"
        );
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}'),
                "{name}: partial character in {piece:?}"
            );
        }
    }
}

/// Mean ablation of every head of layer 1, whose mean covers every position of the sequence.
fn mean_ablation_hooks(model: &Model) -> Hooks {
    let interventions = (0..model.config().n_heads())
        .map(|head| Intervention::mean_ablate_head(1, head))
        .collect();
    Hooks::from_interventions(interventions)
}

#[test]
fn mean_ablation_generation_is_the_same_with_and_without_kv_cache() {
    let model = load("tiny-gqa", cpu());
    let (prompt, _) = prompt_and_golden("tiny-gqa");
    let hooks = mean_ablation_hooks(&model);
    let run = |use_kv_cache| {
        model
            .generate(&prompt, &greedy(use_kv_cache), &hooks, |_, _| {})
            .expect("generation")
            .ids
    };

    let with_cache = run(true);
    let without_cache = run(false);

    assert_eq!(with_cache, without_cache);
    assert_eq!(with_cache.len(), 12);
}

#[test]
fn overflowing_temperature_error_names_the_step() {
    let model = load("tiny-gqa", cpu());
    let (prompt, _) = prompt_and_golden("tiny-gqa");
    let options = GenerateOptions {
        sampling: Sampling {
            do_sample: true,
            temperature: 1e-40,
            seed: Some(1),
            ..Sampling::greedy()
        },
        ..GenerateOptions::greedy(4)
    };

    let error = model
        .generate(&prompt, &options, &Hooks::default(), |_, _| {})
        .unwrap_err()
        .to_string();

    assert!(error.contains("generation step 0"), "{error}");
    assert!(
        error.contains("+inf after dividing by the temperature 1e-40"),
        "{error}"
    );
}

#[test]
fn scope_may_name_a_position_generated_later() {
    let model = load("tiny-gqa", cpu());
    let (prompt, _) = prompt_and_golden("tiny-gqa");
    let zero_at = |position: usize| {
        Hooks::from_interventions(vec![Intervention::ZeroHeadZ {
            layer: 0,
            head: 0,
            scope: Scope::all().with_positions(vec![position]),
        }])
    };
    let options = GenerateOptions::greedy(3);

    let later = model.generate(&prompt, &options, &zero_at(prompt.len() + 2), |_, _| {});
    let beyond = model
        .generate(&prompt, &options, &zero_at(prompt.len() + 3), |_, _| {})
        .unwrap_err()
        .to_string();

    assert!(later.is_ok(), "{:?}", later.err());
    assert!(
        beyond.contains(&format!(
            "names position {}, but the sequence has {} positions",
            prompt.len() + 3,
            prompt.len() + 3
        )),
        "{beyond}"
    );
}

#[test]
fn generation_config_max_length_sets_the_default_new_tokens() {
    let source = fixture_model("tiny-gqa");
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 151645, "max_length": 10}"#,
    )
    .unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let model = Model::from_checkpoint(&checkpoint, cpu()).unwrap();

    let error = model.default_max_new_tokens(10).unwrap_err().to_string();

    assert_eq!(model.generation_max_length(), Some(10));
    assert_eq!(model.default_max_new_tokens(4).unwrap(), 6);
    assert!(error.contains("already reaches max_length 10"), "{error}");
    assert_eq!(
        load("tiny-gqa", cpu()).default_max_new_tokens(4).unwrap(),
        256.min(load("tiny-gqa", cpu()).config().max_position_embeddings - 4)
    );
}
