//! The model against the TransformerLens goldens of the three fixture models: every hook point,
//! the logits and their reductions, the loss, and the ablation and pattern-patching goldens, on each
//! backend.
//!
//! Tolerances are about 5–10× the f32 error measured against a float64 reference: activations
//! `1e-4 + 1e-4·|g|`, attention scores the same on visible keys and exactly `-inf` on masked ones,
//! patterns `2e-5`, logits and log-probs `2e-4`, losses `5e-5`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{Backend, Device, create_backend};
use qwenlens_model::{HookFilter, HookPoint, Hooks, Intervention, Model, PatternSpec, TokenBatch};
use qwenlens_tests::{fixture_model, fixtures_dir};
use qwenlens_weights::Checkpoint;
use safetensors::{Dtype, SafeTensors};

const MODELS: [&str; 3] = ["tiny-gqa", "tiny-untied-sharded", "tiny-mha-f16"];
const CASES: [&str; 3] = ["len1", "len7", "len33"];

/// Golden tensors checked elsewhere (greedy generation, in the generation tests).
const CHECKED_ELSEWHERE: [&str; 3] = [
    "generated_ids",
    "generated_top1_logit",
    "generated_top2_margin",
];

/// How a tensor is compared.
#[derive(Clone, Copy, Debug)]
enum Tolerance {
    /// `|a − g| ≤ abs + rel·|g|`; a `-inf` golden requires `-inf`.
    Relative { abs: f32, rel: f32 },
    /// `|a − g| ≤ abs`.
    Absolute(f32),
}

const ACTIVATION: Tolerance = Tolerance::Relative {
    abs: 1e-4,
    rel: 1e-4,
};
const PATTERN: Tolerance = Tolerance::Absolute(2e-5);
const LOGITS: Tolerance = Tolerance::Absolute(2e-4);
const LOSS: Tolerance = Tolerance::Absolute(5e-5);

fn cpu_backend() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    BACKEND.get_or_init(|| Arc::new(CpuBackend::new())).clone()
}

/// Returns the GPU backend (lavapipe on machines without a GPU), created once because its shaders
/// compile at first use.
fn gpu_backend() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            create_backend(Device::Gpu)
                .expect("creating the GPU backend (install mesa-vulkan-drivers for lavapipe)")
        })
        .clone()
}

/// Golden tensors of one case: f32 values with their shapes, and the input ids.
struct Golden {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    input_ids: Vec<u32>,
}

fn load_golden(model: &str, case: &str) -> Golden {
    let path = fixtures_dir()
        .join("goldens")
        .join(model)
        .join(format!("{case}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));

    let mut tensors = BTreeMap::new();
    let mut input_ids = Vec::new();
    for (name, view) in file.tensors() {
        match view.dtype() {
            Dtype::F32 => {
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                tensors.insert(name, (view.shape().to_vec(), values));
            }
            Dtype::I64 => {
                let values: Vec<i64> = view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                if name == "input_ids" {
                    input_ids = values.iter().map(|v| u32::try_from(*v).unwrap()).collect();
                }
            }
            other => panic!("{}: unexpected dtype {other:?} of {name}", path.display()),
        }
    }
    assert!(!input_ids.is_empty(), "{} has no input_ids", path.display());
    Golden { tensors, input_ids }
}

/// Compares `actual` with `golden`; on failure returns the worst element's index and values.
fn compare(name: &str, actual: &[f32], golden: &[f32], tolerance: Tolerance) -> Result<(), String> {
    if actual.len() != golden.len() {
        return Err(format!(
            "{name}: {} values, golden has {}",
            actual.len(),
            golden.len()
        ));
    }

    let mut worst: Option<(usize, f32)> = None;
    for (index, (a, g)) in actual.iter().zip(golden).enumerate() {
        let excess = match tolerance {
            Tolerance::Relative { .. } | Tolerance::Absolute(_) if g.is_infinite() => {
                if a == g {
                    continue;
                }
                f32::INFINITY
            }
            Tolerance::Relative { abs, rel } => (a - g).abs() - (abs + rel * g.abs()),
            Tolerance::Absolute(abs) => (a - g).abs() - abs,
        };
        let excess = if excess.is_nan() {
            f32::INFINITY
        } else {
            excess
        };
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((index, excess));
        }
    }

    match worst {
        None => Ok(()),
        Some((index, _)) => Err(format!(
            "{name}: worst at flat index {index}: got {}, golden {} ({tolerance:?})",
            actual[index], golden[index]
        )),
    }
}

fn hook_tolerance(name: &str) -> Tolerance {
    if name.ends_with("hook_pattern") {
        PATTERN
    } else {
        ACTIVATION
    }
}

/// Compares results with one golden file and collects the failures.
struct Checker<'a> {
    label: String,
    golden: &'a Golden,
    checked: Vec<String>,
    failures: Vec<String>,
}

impl Checker<'_> {
    fn check(&mut self, name: &str, actual: &[f32], tolerance: Tolerance) {
        self.checked.push(name.to_string());
        let Some((_, golden)) = self.golden.tensors.get(name) else {
            self.fail(&format!("{name} is missing from the golden file"));
            return;
        };
        if let Err(message) = compare(name, actual, golden, tolerance) {
            self.fail(&message);
        }
    }

    fn fail(&mut self, message: &str) {
        self.failures.push(format!("{}: {message}", self.label));
    }
}

/// Checks one (model, case) on one backend; returns every failure.
fn check_case(backend: &Arc<dyn Backend>, model_name: &str, case: &str) -> Vec<String> {
    let checkpoint = Checkpoint::open(fixture_model(model_name)).expect("opening fixture model");
    let model = Model::from_checkpoint(&checkpoint, backend.clone()).expect("loading model");
    let golden = load_golden(model_name, case);
    let tokens = TokenBatch::single(&golden.input_ids);
    let n = golden.input_ids.len();
    let mut checker = Checker {
        label: format!("{model_name}/{case} on {}", backend.name()),
        golden: &golden,
        checked: CHECKED_ELSEWHERE.iter().map(|s| s.to_string()).collect(),
        failures: Vec::new(),
    };

    let (logits, cache) = model
        .run_with_cache(&tokens, HookFilter::All)
        .expect("forward with cache");
    let all_logits = logits.to_host().expect("reading logits");
    let d_vocab = all_logits.shape[2];

    for point in HookPoint::defaults(model.n_layers()) {
        let name = point.to_string();
        let actual = cache
            .get_point(point)
            .expect("every default hook is cached");
        if let Some((golden_shape, _)) = golden.tensors.get(&name)
            && (actual.shape[0] != 1 || actual.shape[1..] != golden_shape[..])
        {
            checker.fail(&format!(
                "{name}: shape {:?}, golden {golden_shape:?} plus batch",
                actual.shape
            ));
            continue;
        }
        checker.check(&name, &actual.data, hook_tolerance(&name));
    }

    if golden.tensors.contains_key("logits") {
        checker.check("logits", &all_logits.data, LOGITS);
    } else {
        let head: Vec<f32> = all_logits
            .data
            .chunks(d_vocab)
            .flat_map(|row| row[..2048].to_vec())
            .collect();
        checker.check("logits_head", &head, LOGITS);
        checker.check("logits_last", &logits.last(0).unwrap(), LOGITS);
    }
    checker.check("logsumexp", &logits.logsumexp().unwrap().data, LOGITS);

    if n > 1 {
        let logprobs = logits.next_token_logprobs(&tokens).unwrap();
        checker.check("next_token_logprob", &logprobs[0], LOGITS);
        checker.check("loss", &logits.loss(&tokens).unwrap(), LOSS);
        check_interventions(&model, &tokens, &mut checker);
    }

    for name in golden.tensors.keys() {
        if !checker.checked.contains(name) {
            checker.fail(&format!("{name} is in the golden file but was not checked"));
        }
    }
    checker.failures
}

/// Runs the ablation and pattern-patching goldens (layer 1, head 1 for the patterns).
fn check_interventions(model: &Model, tokens: &TokenBatch, checker: &mut Checker<'_>) {
    let config = model.config();
    let loss_with = |interventions: Vec<Intervention>| -> f32 {
        let logits = model
            .run_with_hooks(tokens, Hooks::from_interventions(interventions))
            .unwrap();
        logits.loss(tokens).unwrap()[0]
    };

    let mut zero = Vec::new();
    let mut mean = Vec::new();
    let mut kv_group = Vec::new();
    for layer in 0..config.n_layers() {
        for head in 0..config.n_heads() {
            zero.push(loss_with(vec![Intervention::zero_head(layer, head)]));
            mean.push(loss_with(vec![Intervention::mean_ablate_head(layer, head)]));
        }
        for kv_head in 0..config.n_kv_heads() {
            kv_group.push(loss_with(vec![Intervention::zero_kv_head(layer, kv_head)]));
        }
    }
    checker.check("loss_ablate_z", &zero, LOSS);
    checker.check("loss_mean_ablate_z", &mean, LOSS);
    checker.check("loss_ablate_v_group", &kv_group, LOSS);

    for (name, spec) in [
        ("uniform", PatternSpec::Uniform),
        ("prevtok", PatternSpec::PreviousToken),
    ] {
        let hooks = Hooks::from_interventions(vec![Intervention::replace_pattern(1, 1, spec)]);
        let logits = model.run_with_hooks(tokens, hooks).unwrap();
        checker.check(
            &format!("patch_{name}_logits_last"),
            &logits.last(0).unwrap(),
            LOGITS,
        );
        checker.check(
            &format!("patch_{name}_loss"),
            &logits.loss(tokens).unwrap(),
            LOSS,
        );
    }
}

fn check_model(backend: Arc<dyn Backend>, model: &str) {
    let failures: Vec<String> = CASES
        .iter()
        .flat_map(|case| check_case(&backend, model, case))
        .collect();
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn cpu_tiny_gqa() {
    check_model(cpu_backend(), MODELS[0]);
}

#[test]
fn cpu_tiny_untied_sharded() {
    check_model(cpu_backend(), MODELS[1]);
}

#[test]
fn cpu_tiny_mha_f16() {
    check_model(cpu_backend(), MODELS[2]);
}

#[test]
fn gpu_tiny_gqa() {
    check_model(gpu_backend(), MODELS[0]);
}

#[test]
fn gpu_tiny_untied_sharded() {
    check_model(gpu_backend(), MODELS[1]);
}

#[test]
fn gpu_tiny_mha_f16() {
    check_model(gpu_backend(), MODELS[2]);
}
