//! The stand-in Qwen2.5-0.5B checkpoint on the CPU backend: the France chat's token ids,
//! activations, last-position logits and greedy generation against its golden file.

use std::sync::{Arc, OnceLock};

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_model::{
    BlockHook, GenerateOptions, HookFilter, HookPoint, Hooks, Model, Sampling, StopReason,
    TokenBatch,
};
use qwenlens_tests::{fixtures_dir, standin_dir};
use qwenlens_weights::{Checkpoint, Tokenizer, parse_chat_json};
use safetensors::{Dtype, SafeTensors};

/// `<|im_end|>`, the end of an assistant turn.
const IM_END: u32 = 151_645;
/// "Paris".
const PARIS: u32 = 59_604;

/// Returns the stand-in on the CPU backend, loaded once for all tests.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let checkpoint = Checkpoint::open(standin_dir()).expect("stand-in checkpoint");
        Model::from_checkpoint(&checkpoint, Arc::new(CpuBackend::new())).expect("stand-in model")
    })
}

fn golden_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let path = fixtures_dir().join("standin/france.safetensors");
        std::fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
    })
}

/// Reads a golden tensor's shape and values as f32 (ids converted from I64).
fn golden(name: &str) -> (Vec<usize>, Vec<f32>) {
    let tensors = SafeTensors::deserialize(golden_bytes()).expect("golden safetensors");
    let view = tensors.tensor(name).expect("golden tensor");
    let values = match view.dtype() {
        Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
            .collect(),
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|chunk| i64::from_le_bytes(chunk.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

fn golden_ids(name: &str) -> Vec<u32> {
    golden(name).1.into_iter().map(|id| id as u32).collect()
}

fn france_prompt() -> Vec<u32> {
    let path = fixtures_dir().join("standin/france.json");
    let text = std::fs::read_to_string(&path).expect("france.json");
    let messages = parse_chat_json(&text).expect("chat messages");
    let tokenizer = Tokenizer::from_dir(standin_dir()).expect("stand-in tokenizer");
    tokenizer
        .encode_chat(&messages, true)
        .expect("chat template")
}

/// Checks `|actual - golden| <= atol + rtol * |golden|` everywhere, naming the worst index.
fn assert_close(name: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) {
    assert_eq!(actual.len(), expected.len(), "{name}: length");

    let mut worst = (0usize, 0.0f32);
    for (index, (&a, &g)) in actual.iter().zip(expected).enumerate() {
        let excess = (a - g).abs() - (atol + rtol * g.abs());
        if excess > worst.1 || a.is_nan() {
            worst = (index, if a.is_nan() { f32::INFINITY } else { excess });
        }
    }

    let (index, excess) = worst;
    assert!(
        excess <= 0.0,
        "{name}: index {index}: actual {} vs golden {} exceeds {atol} + {rtol}·|g| by {excess}",
        actual[index],
        expected[index]
    );
}

#[test]
fn france_chat_tokens_match_golden() {
    assert_eq!(france_prompt(), golden_ids("input_ids"));
}

#[test]
fn france_activations_match_golden() {
    let model = model();
    let prompt = golden_ids("input_ids");
    let last_layer = model.config().n_layers() - 1;
    let resid_posts =
        [0, 11, last_layer].map(|layer| HookPoint::block(layer, BlockHook::ResidPost));
    let pattern = HookPoint::block(0, BlockHook::Pattern);
    let filter = HookFilter::points([HookPoint::Embed, pattern].into_iter().chain(resid_posts));

    let (logits, cache) = model
        .run_with_cache(&TokenBatch::single(&prompt), filter)
        .expect("forward pass");

    let logits_last = logits.last(0).unwrap();
    assert_close(
        "logits_last",
        &logits_last,
        &golden("logits_last").1,
        1e-3,
        0.0,
    );

    let checks = [
        (HookPoint::Embed, 1e-5, 0.0),
        (pattern, 2e-4, 0.0),
        (resid_posts[0], 5e-3, 1e-5),
        (resid_posts[1], 5e-3, 1e-5),
        (resid_posts[2], 5e-3, 1e-5),
    ];
    for (point, atol, rtol) in checks {
        let name = point.to_string();
        let (shape, expected) = golden(&name);
        let actual = cache
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not cached"));

        // The golden drops the batch dimension, the cache keeps it.
        assert_eq!(actual.shape[0], 1, "{name}: batch");
        assert_eq!(actual.shape[1..], shape[..], "{name}: shape");
        assert_close(&name, &actual.data, &expected, atol, rtol);
    }
}

#[test]
fn france_greedy_matches_golden() {
    let model = model();
    let prompt = golden_ids("input_ids");
    let expected = golden_ids("greedy_ids");
    let options = GenerateOptions::greedy(expected.len());

    let generation = model
        .generate(&prompt, &options, &Hooks::default(), |_, _| {})
        .expect("generation");

    assert_eq!(generation.ids[..2], [PARIS, IM_END]);
    assert_eq!(generation.ids, expected);
}

#[test]
fn france_generation_stops_at_im_end() {
    let model = model();
    let prompt = france_prompt();
    let options = GenerateOptions {
        sampling: Sampling::greedy(),
        ..model.default_generate_options()
    };

    let mut streamed = String::new();
    let generation = model
        .generate(&prompt, &options, &Hooks::default(), |_, piece| {
            streamed.push_str(piece)
        })
        .expect("generation");

    assert_eq!(generation.ids, [PARIS, IM_END]);
    assert_eq!(generation.stop_reason, StopReason::Eos(IM_END));
    assert_eq!(generation.text, "Paris");
    assert_eq!(streamed, "Paris");
}
