//! Analysis routines against the shared fixtures: the ablation and pattern-patching goldens on the
//! CPU backend (and the GPU backend when an adapter exists), the fast sweep against the naive one,
//! and the reports with their pictures.

use std::path::Path;
use std::sync::Arc;

use qwenlens_analysis::ablation::{
    AblationLevel, AblationMode, AblationReport, SweepOptions, SweepStrategy,
    ablation_intervention, sweep,
};
use qwenlens_analysis::activation_patching::{
    ActivationPatchOptions, PatchTarget, activation_patching,
};
use qwenlens_analysis::attention::induction_targets;
use qwenlens_analysis::attention_report::analyze_attention;
use qwenlens_analysis::logit_lens::logit_lens;
use qwenlens_analysis::metrics::Metric;
use qwenlens_analysis::patching::patch_patterns;
use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{Backend, Device, create_backend};
use qwenlens_model::{
    BlockHook, HookFilter, HookPoint, Hooks, Intervention, Model, PatternSpec, Scope, TokenBatch,
};
use qwenlens_tests::{fixture_model, fixtures_dir, standin_dir};
use qwenlens_weights::Checkpoint;
use safetensors::SafeTensors;

const MODELS: [&str; 3] = ["tiny-gqa", "tiny-untied-sharded", "tiny-mha-f16"];
const LOSS_TOLERANCE: f32 = 5e-5;
const LOGITS_TOLERANCE: f32 = 2e-4;

fn load_model(name: &str, backend: Arc<dyn Backend>) -> Model {
    let checkpoint = Checkpoint::open(fixture_model(name)).unwrap();
    Model::from_checkpoint(&checkpoint, backend).unwrap()
}

fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new())
}

/// Creates the GPU backend, or returns `None` with a message when this machine has no adapter.
fn gpu() -> Option<Arc<dyn Backend>> {
    match create_backend(Device::Gpu) {
        Ok(backend) => Some(backend),
        Err(error) => {
            eprintln!("skipping the GPU backend: {error}");
            None
        }
    }
}

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(model: &str, case: &str) -> Golden {
        let path = fixtures_dir()
            .join("goldens")
            .join(model)
            .join(format!("{case}.safetensors"));
        Golden {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let tensors = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = tensors
            .tensor(name)
            .unwrap_or_else(|e| panic!("golden {name}: {e}"));
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn ids(&self) -> Vec<u32> {
        let tensors = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = tensors.tensor("input_ids").unwrap();
        view.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    }
}

fn assert_close(what: &str, actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tolerance,
            "{what}[{i}]: {a} vs golden {e} (difference {}, tolerance {tolerance})",
            (a - e).abs()
        );
    }
}

fn ablated_losses(report: &AblationReport) -> Vec<f32> {
    report.effects.iter().map(|e| e.ablated).collect()
}

fn options(mode: AblationMode, level: AblationLevel) -> SweepOptions {
    SweepOptions {
        mode,
        level,
        metric: Metric::Loss,
        ..SweepOptions::default()
    }
}

/// Checks every ablation and pattern golden of every model and case on one backend.
fn check_goldens(backend: Arc<dyn Backend>) {
    for name in MODELS {
        let model = load_model(name, backend.clone());
        for case in ["len7", "len33"] {
            let golden = Golden::open(name, case);
            let tokens = golden.ids();
            let what = |golden: &str| format!("{name} {case} {golden} on {}", backend.name());

            let zero = sweep(
                &model,
                &tokens,
                &options(AblationMode::Zero, AblationLevel::Head),
                |_| {},
            )
            .unwrap();
            assert_close(
                &what("loss_ablate_z"),
                &ablated_losses(&zero),
                &golden.f32s("loss_ablate_z"),
                LOSS_TOLERANCE,
            );
            assert!(
                (zero.baseline - golden.f32s("loss")[0]).abs() <= LOSS_TOLERANCE,
                "{}",
                what("loss")
            );

            let mean = sweep(
                &model,
                &tokens,
                &options(AblationMode::Mean, AblationLevel::Head),
                |_| {},
            )
            .unwrap();
            assert_close(
                &what("loss_mean_ablate_z"),
                &ablated_losses(&mean),
                &golden.f32s("loss_mean_ablate_z"),
                LOSS_TOLERANCE,
            );

            let group = sweep(
                &model,
                &tokens,
                &options(AblationMode::Zero, AblationLevel::KvGroup),
                |_| {},
            )
            .unwrap();
            assert_close(
                &what("loss_ablate_v_group"),
                &ablated_losses(&group),
                &golden.f32s("loss_ablate_v_group"),
                LOSS_TOLERANCE,
            );

            for (spec, prefix) in [
                (PatternSpec::Uniform, "patch_uniform"),
                (PatternSpec::PreviousToken, "patch_prevtok"),
            ] {
                let outcome = patch_patterns(&model, &tokens, &[(1, 1)], &spec).unwrap();
                let loss = golden.f32s(&format!("{prefix}_loss"))[0];
                assert!(
                    (outcome.patched_loss - loss).abs() <= LOSS_TOLERANCE,
                    "{}: {} vs {loss}",
                    what(&format!("{prefix}_loss")),
                    outcome.patched_loss
                );
                assert_close(
                    &what(&format!("{prefix}_logits_last")),
                    &outcome.patched_last_logits,
                    &golden.f32s(&format!("{prefix}_logits_last")),
                    LOGITS_TOLERANCE,
                );
            }
        }
    }
}

#[test]
fn goldens_on_cpu() {
    check_goldens(cpu());
}

#[test]
fn goldens_on_gpu() {
    if let Some(backend) = gpu() {
        check_goldens(backend);
    }
}

#[test]
fn fast_sweep_equals_naive_sweep() {
    let model = load_model("tiny-untied-sharded", cpu());
    let tokens = Golden::open("tiny-untied-sharded", "len33").ids();
    let metrics = [
        Metric::Loss,
        Metric::Kl,
        Metric::LogProb { target: 17 },
        Metric::LogitDiff {
            answer: 3,
            wrong: 900,
        },
    ];

    for metric in metrics {
        for (mode, level) in [
            (AblationMode::Zero, AblationLevel::Head),
            (AblationMode::Mean, AblationLevel::Head),
            (AblationMode::Zero, AblationLevel::KvGroup),
            (AblationMode::Mean, AblationLevel::KvGroup),
        ] {
            let mut fast = SweepOptions {
                mode,
                level,
                metric,
                strategy: SweepStrategy::Fast,
                layers: None,
                // Two copies per pass, so a layer's heads take several passes.
                batch_size: Some(2),
            };
            let fast_report = sweep(&model, &tokens, &fast, |_| {}).unwrap();
            fast.strategy = SweepStrategy::Naive;
            let naive_report = sweep(&model, &tokens, &fast, |_| {}).unwrap();

            let what = format!("{} {mode:?} {level:?}", metric.name());
            assert_eq!(
                fast_report.effects.len(),
                naive_report.effects.len(),
                "{what}"
            );
            assert_close(
                &what,
                &ablated_losses(&fast_report),
                &ablated_losses(&naive_report),
                2e-5,
            );
            let moved = fast_report
                .effects
                .iter()
                .filter(|e| e.delta.abs() > 1e-4)
                .count();
            assert!(moved > 0, "{what}: no ablation moved the metric");
        }
    }
}

#[test]
fn kv_group_equals_all_its_heads_zeroed() {
    let model = load_model("tiny-untied-sharded", cpu());
    let tokens = Golden::open("tiny-untied-sharded", "len7").ids();
    let batch = TokenBatch::single(&tokens);
    let config = model.config();
    let group_size = config.n_heads() / config.n_kv_heads();

    for layer in 0..config.n_layers() {
        for kv_head in 0..config.n_kv_heads() {
            let group = ablation_intervention(
                layer,
                kv_head,
                AblationMode::Zero,
                AblationLevel::KvGroup,
                None,
            )
            .unwrap();
            let heads: Vec<Intervention> = (kv_head * group_size..(kv_head + 1) * group_size)
                .map(|head| Intervention::zero_head(layer, head))
                .collect();

            let by_group = model
                .run_with_hooks(&batch, Hooks::from_interventions(vec![group]))
                .unwrap()
                .loss(&batch)
                .unwrap()[0];
            let by_heads = model
                .run_with_hooks(&batch, Hooks::from_interventions(heads))
                .unwrap()
                .loss(&batch)
                .unwrap()[0];

            assert!(
                (by_group - by_heads).abs() < 1e-5,
                "layer {layer} KV head {kv_head}: {by_group} vs {by_heads}"
            );
        }
    }
}

#[test]
fn custom_pattern_function_matches_builtin() {
    let model = load_model("tiny-gqa", cpu());
    let golden = Golden::open("tiny-gqa", "len7");
    let tokens = golden.ids();
    let uniform = PatternSpec::Custom(Arc::new(|query: usize, key_len: usize| {
        let visible = (query + 1).min(key_len);
        (0..key_len)
            .map(|key| {
                if key < visible {
                    1.0 / visible as f32
                } else {
                    0.0
                }
            })
            .collect()
    }));

    let outcome = patch_patterns(&model, &tokens, &[(1, 1)], &uniform).unwrap();

    let expected = golden.f32s("patch_uniform_loss")[0];
    assert!(
        (outcome.patched_loss - expected).abs() <= LOSS_TOLERANCE,
        "{} vs golden {expected}",
        outcome.patched_loss
    );
}

#[test]
fn uniform_pattern_on_one_token_changes_nothing() {
    for name in MODELS {
        let model = load_model(name, cpu());
        let tokens = Golden::open(name, "len1").ids();

        let outcome =
            patch_patterns(&model, &tokens, &[(0, 0), (1, 1)], &PatternSpec::Uniform).unwrap();

        assert_close(
            name,
            &outcome.patched_last_logits,
            &outcome.clean_last_logits,
            1e-6,
        );
    }
}

/// Decodes a written PNG and checks its size and that it is not one flat colour.
fn assert_png(path: &Path, min_width: u32, min_height: u32) {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert!(
        image.width() >= min_width && image.height() >= min_height,
        "{}: {}x{} is smaller than {min_width}x{min_height}",
        path.display(),
        image.width(),
        image.height()
    );
    let first = image.get_pixel(0, 0);
    let differing = image.pixels().filter(|p| p != &first).count();
    assert!(
        differing > 500,
        "{}: only {differing} pixels differ from the background",
        path.display()
    );
}

#[test]
fn attention_report_writes_readable_files() {
    let model = load_model("tiny-gqa", cpu());
    let tokens = Golden::open("tiny-gqa", "len33").ids();
    let dir = tempfile::tempdir().unwrap();

    let report = analyze_attention(&model, &tokens, &[0, 1], None).unwrap();
    let written = report.write(dir.path()).unwrap();

    assert_eq!(written.len(), 1 + 2 * (4 + 1));
    for path in written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        assert_png(path, 300, 300);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("attention.json")).unwrap()).unwrap();
    assert_eq!(json["heads"].as_array().unwrap().len(), 8);
    assert_eq!(json["token_texts"][0], "<|im_start|>");
    let entropy = json["heads"][0]["normalized_entropy"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&entropy),
        "normalized entropy {entropy}"
    );
}

#[test]
fn attention_stats_see_induction_on_repeated_tokens() {
    let model = load_model("tiny-gqa", cpu());
    let first: Vec<u32> = vec![785, 3974, 13876, 38835, 34208, 916, 279, 9707, 1879];
    let tokens = [first.clone(), first].concat();

    let report = analyze_attention(&model, &tokens, &[1], None).unwrap();

    assert_eq!(induction_targets(&tokens).len(), 9);
    for stats in &report.layers[0].stats {
        let score = stats
            .induction_score
            .expect("a repeated prompt has an induction score");
        assert!((0.0..=1.0).contains(&score), "{}: {score}", stats.name);
    }
}

#[test]
fn ablation_report_writes_files() {
    let model = load_model("tiny-gqa", cpu());
    let tokens = Golden::open("tiny-gqa", "len7").ids();
    let dir = tempfile::tempdir().unwrap();

    let report = sweep(&model, &tokens, &SweepOptions::default(), |_| {}).unwrap();
    report
        .write_csv(&dir.path().join("importance.csv"))
        .unwrap();
    report
        .write_json(&dir.path().join("importance.json"))
        .unwrap();
    let png = dir.path().join("importance.png");
    qwenlens_analysis::output::write_png(&png, &report.heatmap().render()).unwrap();

    let csv = std::fs::read_to_string(dir.path().join("importance.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "layer,head,clean,ablated,delta");
    assert_eq!(lines.len(), 1 + 2 * 4);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("importance.json")).unwrap())
            .unwrap();
    assert_eq!(json["top_heads"].as_array().unwrap().len(), 8);
    assert_eq!(json["level"], "head");
    assert_png(&png, 100, 60);
}

#[test]
fn logit_lens_attribution_adds_up() {
    let model = load_model("tiny-gqa", cpu());
    let tokens = Golden::open("tiny-gqa", "len7").ids();
    let dir = tempfile::tempdir().unwrap();

    let report = logit_lens(&model, &tokens, None, 5).unwrap();

    let golden_last = Golden::open("tiny-gqa", "len7").f32s("logits_last");
    assert!((report.target_logit - golden_last[report.target as usize]).abs() < LOGITS_TOLERANCE);
    assert!(
        (report.attribution_total - report.target_logit).abs() < 1e-3,
        "attributions sum to {}, logit is {}",
        report.attribution_total,
        report.target_logit
    );
    let last = report.layers.last().unwrap();
    assert_eq!(
        last.target_rank, 0,
        "the default target is the final top token"
    );
    assert_eq!(last.top_tokens[0].id, report.target);
    assert_eq!(report.layers.len(), model.config().n_layers() + 1);

    for path in report
        .write(dir.path())
        .unwrap()
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        assert_png(path, 150, 100);
    }
}

#[test]
fn logit_lens_long_prompt_matches_forward() {
    let model = load_model("tiny-gqa", cpu());
    // 165 tokens, more than one 64 MiB block of lens logits (110 rows of 151936).
    let tokens = Golden::open("tiny-gqa", "len33").ids().repeat(5);

    let report = logit_lens(&model, &tokens, None, 3).unwrap();

    let logits = model
        .forward(&TokenBatch::single(&tokens))
        .unwrap()
        .to_host()
        .unwrap();
    let d_vocab = logits.shape[2];
    for (p, &predicted) in report.predictions.iter().enumerate() {
        let row = &logits.data[p * d_vocab..(p + 1) * d_vocab];
        assert_eq!(
            predicted,
            qwenlens_analysis::metrics::argmax(row),
            "position {p}"
        );
    }
    assert_eq!(report.prediction_probs.len(), 3 * tokens.len());
}

#[test]
fn activation_patching_restores_a_changed_token() {
    let model = load_model("tiny-gqa", cpu());
    let clean = Golden::open("tiny-gqa", "len7").ids();
    let mut corrupted = clean.clone();
    corrupted[3] = 17_338;
    let last = model
        .forward(&TokenBatch::single(&clean))
        .unwrap()
        .last(0)
        .unwrap();
    let answer = qwenlens_analysis::metrics::argmax(&last);
    let options = ActivationPatchOptions {
        answer,
        wrong: 11,
        targets: PatchTarget::ALL.to_vec(),
        batch_size: None,
    };
    let dir = tempfile::tempdir().unwrap();

    let report = activation_patching(&model, &clean, &corrupted, &options, |_| {}).unwrap();

    let resid = &report.grids[0];
    assert_eq!(resid.target, PatchTarget::ResidPre);
    assert!(
        (resid.normalized[3] - 1.0).abs() < 1e-3,
        "patching the changed token restores it: {}",
        resid.normalized[3]
    );
    for position in [0, 1, 2] {
        assert!(
            resid.normalized[position].abs() < 1e-4,
            "position {position} did not change: {}",
            resid.normalized[position]
        );
    }
    let heads = &report.grids[3];
    assert_eq!((heads.rows, heads.cols), (2, 4));
    for path in report
        .write(dir.path())
        .unwrap()
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        assert_png(path, 100, 60);
    }
}

#[test]
fn activation_patching_equals_full_patched_runs() {
    let model = load_model("tiny-untied-sharded", cpu());
    let clean = Golden::open("tiny-untied-sharded", "len7").ids();
    let corrupted: Vec<u32> = clean.iter().map(|&id| (id + 7) % 1000).collect();
    let options = ActivationPatchOptions {
        answer: 5,
        wrong: 6,
        targets: PatchTarget::ALL.to_vec(),
        batch_size: Some(3),
    };

    let report = activation_patching(&model, &clean, &corrupted, &options, |_| {}).unwrap();

    let hooks = [
        BlockHook::ResidPre,
        BlockHook::AttnOut,
        BlockHook::MlpOut,
        BlockHook::Z,
    ];
    let points: Vec<HookPoint> = (0..3)
        .flat_map(|layer| hooks.iter().map(move |&hook| HookPoint::block(layer, hook)))
        .collect();
    let (_, clean_cache) = model
        .run_with_cache(&TokenBatch::single(&clean), HookFilter::points(points))
        .unwrap();
    let corrupted_batch = TokenBatch::single(&corrupted);
    for (grid, hook) in report.grids.iter().zip(hooks) {
        for (layer, index) in [(0, 2), (1, 0), (2, 3), (1, 1)] {
            let point = HookPoint::block(layer, hook);
            let (heads, scope) = match hook {
                BlockHook::Z => (Some(vec![index]), Scope::all()),
                _ => (None, Scope::all().with_positions(vec![index])),
            };
            let patch = Intervention::PatchFromCache {
                hook: point,
                source: Arc::new(clean_cache.require(point).unwrap().clone()),
                heads,
                scope,
            };

            let last = model
                .run_with_hooks(&corrupted_batch, Hooks::from_interventions(vec![patch]))
                .unwrap()
                .last(0)
                .unwrap();

            let expected = last[5] - last[6];
            let actual = grid.logit_diff[layer * grid.cols + index];
            assert!(
                (actual - expected).abs() < 1e-4,
                "{point} index {index}: {actual} vs full run {expected}"
            );
        }
    }
}

#[test]
fn activation_patching_rejects_unequal_lengths() {
    let model = load_model("tiny-gqa", cpu());
    let options = ActivationPatchOptions {
        answer: 1,
        wrong: 2,
        targets: vec![PatchTarget::ResidPre],
        batch_size: None,
    };

    let error = activation_patching(&model, &[1, 2, 3], &[1, 2], &options, |_| {})
        .unwrap_err()
        .to_string();

    assert!(
        error.contains("3 tokens") && error.contains("has 2"),
        "{error}"
    );
}

#[test]
fn standin_france_lens_and_attention() {
    let checkpoint = Checkpoint::open(standin_dir()).unwrap();
    let model = Model::from_checkpoint(&checkpoint, cpu()).unwrap();
    let chat =
        qwenlens_weights::read_chat_file(fixtures_dir().join("standin/france.json")).unwrap();
    let tokens = model.tokenizer().unwrap().encode_chat(&chat, true).unwrap();
    let paris = 59_604;

    let lens = logit_lens(&model, &tokens, None, 5).unwrap();

    assert_eq!(lens.target, paris, "the greedy answer is \"Paris\"");
    assert_eq!(lens.target_text, "Paris");
    assert_eq!(lens.layers.last().unwrap().target_rank, 0);
    assert!(
        lens.layers[0].target_rank > 100,
        "the embedding alone does not predict Paris"
    );
    // The residual stream reaches magnitudes near 2000 in the middle layers, so the attribution
    // sum carries more float32 rounding than on the tiny fixtures.
    assert!(
        (lens.attribution_total - lens.target_logit).abs() < 1e-2,
        "attributions sum to {}, logit is {}",
        lens.attribution_total,
        lens.target_logit
    );

    let attention = analyze_attention(&model, &tokens, &[0], None).unwrap();
    let labels: Vec<_> = attention.layers[0]
        .stats
        .iter()
        .filter_map(|s| s.label)
        .collect();
    assert!(
        labels.contains(&qwenlens_analysis::attention::HeadLabel::PreviousToken),
        "layer 0 has a previous-token head: {labels:?}"
    );
}
