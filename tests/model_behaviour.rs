//! Behaviour of the hooked model beyond the goldens: batching with left padding, hook closures,
//! starting and stopping at a layer, the KV cache, scoped interventions, hook names, bad inputs and
//! the safetensors export of the activation cache.

use std::sync::{Arc, Mutex, OnceLock};

use qwenlens_kernels::cpu::CpuBackend;
use qwenlens_kernels::{Backend, Device, create_backend};
use qwenlens_model::{
    BlockHook, DeviceLimits, HookFilter, HookPoint, Hooks, HostTensor, Intervention, LogitRows,
    Model, ModelError, PatternSpec, RunOptions, Scope, TokenBatch,
};
use qwenlens_tests::fixture_model;
use qwenlens_weights::Checkpoint;

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

fn load(name: &str, backend: Arc<dyn Backend>) -> Model {
    let checkpoint = Checkpoint::open(fixture_model(name)).expect("opening fixture model");
    Model::from_checkpoint(&checkpoint, backend).expect("loading model")
}

fn cpu_model(name: &str) -> Model {
    load(name, cpu_backend())
}

/// Pseudo-random ids below `d_vocab` (a linear congruential sequence, so the test needs no RNG).
fn ids(count: usize, seed: u32, d_vocab: usize) -> Vec<u32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (state >> 8) % d_vocab as u32
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tolerance: f32) {
    let diff = max_abs_diff(a, b);
    assert!(
        diff <= tolerance,
        "{what}: max abs difference {diff} > {tolerance}"
    );
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn all_logits(model: &Model, tokens: &TokenBatch, hooks: Hooks) -> HostTensor {
    model
        .run_with_hooks(tokens, hooks)
        .unwrap()
        .to_host()
        .unwrap()
}

fn check_batched_equals_single(model: &Model) {
    let d_vocab = model.config().d_vocab();
    let short = ids(4, 1, d_vocab);
    let long = ids(9, 2, d_vocab);
    let batch = TokenBatch::left_padded(&[short.clone(), long.clone()], 0);
    let filter =
        HookFilter::names(["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]).unwrap();
    let (logits, cache) = model.run_with_cache(&batch, filter.clone()).unwrap();
    let batched = logits.to_host().unwrap();
    let batched_loss = logits.loss(&batch).unwrap();
    let n = long.len();
    let d_model = model.config().d_model();

    for (b, sequence) in [short, long].iter().enumerate() {
        let single = TokenBatch::single(sequence);
        let (single_logits, single_cache) = model.run_with_cache(&single, filter.clone()).unwrap();
        let expected = single_logits.to_host().unwrap();
        let pad = n - sequence.len();
        let rows = &batched.data[(b * n + pad) * d_vocab..(b + 1) * n * d_vocab];
        assert_close(&format!("item {b} logits"), rows, &expected.data, 1e-4);

        let resid = cache.get("blocks.1.hook_resid_post").unwrap();
        let single_resid = single_cache.get("blocks.1.hook_resid_post").unwrap();
        assert_close(
            &format!("item {b} resid_post"),
            &resid.data[(b * n + pad) * d_model..(b + 1) * n * d_model],
            &single_resid.data,
            1e-4,
        );

        // The batched pattern row of query p covers all n keys; the padding keys must get zero.
        let pattern = cache.get("blocks.1.attn.hook_pattern").unwrap();
        let single_pattern = single_cache.get("blocks.1.attn.hook_pattern").unwrap();
        let len = sequence.len();
        for head in 0..model.config().n_heads() {
            for query in 0..len {
                let start = ((b * model.config().n_heads() + head) * n + pad + query) * n;
                let row = &pattern.data[start..start + n];
                assert!(
                    row[..pad].iter().all(|v| *v == 0.0),
                    "item {b} head {head}: padding key attended"
                );
                let expected_start = (head * len + query) * len;
                assert_close(
                    &format!("item {b} head {head} query {query} pattern"),
                    &row[pad..],
                    &single_pattern.data[expected_start..expected_start + len],
                    2e-5,
                );
            }
        }

        let single_loss = single_logits.loss(&single).unwrap()[0];
        assert!(
            (batched_loss[b] - single_loss).abs() < 5e-5,
            "item {b} loss {} vs {single_loss}",
            batched_loss[b]
        );
    }
}

#[test]
fn batched_equals_single_cpu() {
    check_batched_equals_single(&cpu_model("tiny-untied-sharded"));
    check_batched_equals_single(&cpu_model("tiny-gqa"));
}

#[test]
fn batched_equals_single_gpu() {
    check_batched_equals_single(&load("tiny-untied-sharded", gpu_backend()));
}

#[test]
fn identity_closures_keep_logits_bit_identical() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(11, 3, model.config().d_vocab()));
    let clean = all_logits(&model, &tokens, Hooks::new());

    let calls = Arc::new(Mutex::new(0usize));
    let mut hooks = Hooks::new();
    for point in HookPoint::all(model.n_layers()) {
        let calls = calls.clone();
        hooks = hooks.with_closure(point, move |tensor, context| {
            assert_eq!(context.point, point);
            assert_eq!(tensor.shape[0], 1);
            *calls.lock().unwrap() += 1;
        });
    }
    let hooked = all_logits(&model, &tokens, hooks);

    assert_eq!(
        *calls.lock().unwrap(),
        HookPoint::all(model.n_layers()).len()
    );
    assert_eq!(bits(&hooked.data), bits(&clean.data));
}

#[test]
fn closure_replacement_changes_downstream() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(6, 4, model.config().d_vocab()));
    let point = HookPoint::block(0, BlockHook::Z);

    let by_closure = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(point, |tensor, _| {
            // Zero head 2 of every position: [batch, pos, n_heads, d_head].
            let d_head = tensor.shape[3];
            let n_heads = tensor.shape[2];
            for row in tensor.data.chunks_mut(n_heads * d_head) {
                row[2 * d_head..3 * d_head].fill(0.0);
            }
        }),
    );
    let by_intervention = all_logits(
        &model,
        &tokens,
        Hooks::from_interventions(vec![Intervention::zero_head(0, 2)]),
    );
    let clean = all_logits(&model, &tokens, Hooks::new());

    assert_eq!(bits(&by_closure.data), bits(&by_intervention.data));
    assert!(
        max_abs_diff(&by_closure.data, &clean.data) > 1e-3,
        "zeroing a head changed nothing"
    );
}

#[test]
fn stop_and_start_at_layer_reproduce_forward() {
    let model = cpu_model("tiny-untied-sharded");
    let tokens = TokenBatch::left_padded(&[ids(5, 5, 1000), ids(8, 6, 1000)], 0);
    let clean = all_logits(&model, &tokens, Hooks::new());

    for layer in 0..=model.n_layers() {
        let stopped = model
            .run(
                &tokens,
                &RunOptions {
                    stop_at_layer: Some(layer),
                    ..RunOptions::default()
                },
            )
            .unwrap();
        assert!(stopped.logits.is_none());
        let resid = stopped
            .resid
            .expect("stop_at_layer returns the residual stream");
        assert_eq!(resid.shape(), [2 * 8, model.config().d_model()]);

        let resumed = model
            .run(
                &tokens,
                &RunOptions {
                    start_at_layer: Some((layer, resid)),
                    ..RunOptions::default()
                },
            )
            .unwrap()
            .into_logits()
            .unwrap()
            .to_host()
            .unwrap();
        assert_eq!(
            bits(&resumed.data),
            bits(&clean.data),
            "restarting at layer {layer}"
        );
    }
}

#[test]
fn stop_at_layer_matches_cached_resid_pre() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(7, 7, model.config().d_vocab()));
    let (_, cache) = model
        .run_with_cache(&tokens, HookFilter::regex("hook_resid_pre").unwrap())
        .unwrap();
    let output = model
        .run(
            &tokens,
            &RunOptions {
                stop_at_layer: Some(1),
                ..RunOptions::default()
            },
        )
        .unwrap();
    let resid = model
        .backend()
        .read(output.resid.as_ref().unwrap())
        .unwrap();
    assert_eq!(
        bits(&resid),
        bits(&cache.get("blocks.1.hook_resid_pre").unwrap().data)
    );
}

fn check_kv_cache_steps_match_forward(model: &Model) {
    let d_vocab = model.config().d_vocab();
    let prompt = ids(5, 8, d_vocab);
    let continuation = ids(4, 9, d_vocab);
    let full: Vec<u32> = prompt.iter().chain(&continuation).copied().collect();
    let hooks = Hooks::from_interventions(vec![
        Intervention::replace_pattern(1, 1, PatternSpec::PreviousToken),
        Intervention::zero_head(0, 0),
    ]);
    let expected = all_logits(model, &TokenBatch::single(&full), hooks.clone());

    let options = RunOptions {
        hooks,
        cache: HookFilter::names(["blocks.1.attn.hook_pattern"]).unwrap(),
        ..RunOptions::default()
    };
    let mut cache = model.new_kv_cache();
    let first = model
        .run_step(&mut cache, &TokenBatch::single(&prompt), &options)
        .unwrap();
    assert_eq!(cache.len(), prompt.len());
    let first_logits = first.logits.unwrap().to_host().unwrap();
    assert_close(
        "prompt logits",
        &first_logits.data,
        &expected.data[..prompt.len() * d_vocab],
        1e-4,
    );

    for (step, token) in continuation.iter().enumerate() {
        let output = model
            .run_step(&mut cache, &TokenBatch::single(&[*token]), &options)
            .unwrap();
        let position = prompt.len() + step;
        let logits = output.logits.unwrap().last(0).unwrap();
        assert_close(
            &format!("step {step} logits"),
            &logits,
            &expected.data[position * d_vocab..(position + 1) * d_vocab],
            1e-4,
        );

        // The replaced previous-token pattern, rebuilt for one query over position + 1 keys.
        let pattern = output.cache.get("blocks.1.attn.hook_pattern").unwrap();
        assert_eq!(
            pattern.shape,
            vec![1, model.config().n_heads(), 1, position + 1]
        );
        let head = &pattern.data[position + 1..2 * (position + 1)];
        let mut expected_row = vec![0.0; position + 1];
        expected_row[position - 1] = 1.0;
        assert_eq!(head, expected_row.as_slice(), "step {step}");
    }
    assert_eq!(cache.len(), full.len());
}

#[test]
fn kv_cache_steps_match_forward_cpu() {
    check_kv_cache_steps_match_forward(&cpu_model("tiny-gqa"));
}

#[test]
fn kv_cache_steps_match_forward_gpu() {
    check_kv_cache_steps_match_forward(&load("tiny-mha-f16", gpu_backend()));
}

#[test]
fn kv_cache_with_padded_prompt() {
    let model = cpu_model("tiny-untied-sharded");
    let (a, b) = (ids(3, 10, 1000), ids(6, 11, 1000));
    let (next_a, next_b) = (17u32, 23u32);
    let options = RunOptions {
        logit_rows: LogitRows::Last,
        ..RunOptions::default()
    };

    let mut cache = model.new_kv_cache();
    model
        .run_step(
            &mut cache,
            &TokenBatch::left_padded(&[a.clone(), b.clone()], 0),
            &options,
        )
        .unwrap();
    let step = model
        .run_step(
            &mut cache,
            &TokenBatch::left_padded(&[vec![next_a], vec![next_b]], 0),
            &options,
        )
        .unwrap();
    let batched = step.logits.unwrap().last_rows().unwrap();

    for (item, (prompt, next)) in [(a, next_a), (b, next_b)].into_iter().enumerate() {
        let sequence: Vec<u32> = prompt.iter().copied().chain([next]).collect();
        let alone = model
            .forward(&TokenBatch::single(&sequence))
            .unwrap()
            .last(0)
            .unwrap();
        assert_close(
            &format!("item {item}"),
            batched.slice_first(item).unwrap(),
            &alone,
            1e-4,
        );
    }

    let padded_step = model.run_step(
        &mut cache,
        &TokenBatch::left_padded(&[vec![1], vec![2, 3]], 0),
        &options,
    );
    assert!(
        matches!(padded_step, Err(ModelError::InvalidArgument(_))),
        "{padded_step:?}"
    );
    assert_eq!(
        cache.len(),
        7,
        "a failed step must leave the cache unchanged"
    );
}

#[test]
fn scoped_ablation_batch_equals_single_runs() {
    let model = cpu_model("tiny-gqa");
    let prompt = ids(9, 12, model.config().d_vocab());
    let n_heads = model.config().n_heads();
    let batch = TokenBatch::repeated(&prompt, n_heads);
    let single = TokenBatch::single(&prompt);

    for mean in [false, true] {
        let interventions = (0..n_heads)
            .map(|head| {
                let intervention = if mean {
                    Intervention::mean_ablate_head(1, head)
                } else {
                    Intervention::zero_head(1, head)
                };
                intervention.with_scope(Scope::batch_item(head))
            })
            .collect();
        let losses = model
            .run_with_hooks(&batch, Hooks::from_interventions(interventions))
            .unwrap()
            .loss(&batch)
            .unwrap();

        for (head, loss) in losses.iter().enumerate() {
            let intervention = if mean {
                Intervention::mean_ablate_head(1, head)
            } else {
                Intervention::zero_head(1, head)
            };
            let alone = model
                .run_with_hooks(&single, Hooks::from_interventions(vec![intervention]))
                .unwrap()
                .loss(&single)
                .unwrap()[0];
            assert!(
                (loss - alone).abs() < 5e-5,
                "head {head} (mean {mean}): batched {loss}, alone {alone}"
            );
        }
    }
}

#[test]
fn kv_group_ablation_equals_zeroing_its_heads() {
    let model = cpu_model("tiny-untied-sharded");
    let tokens = TokenBatch::single(&ids(10, 13, 1000));
    let group = model.config().n_heads() / model.config().n_kv_heads();
    let kv = model
        .run_with_hooks(
            &tokens,
            Hooks::from_interventions(vec![Intervention::zero_kv_head(0, 1)]),
        )
        .unwrap();
    let heads = (group..2 * group)
        .map(|head| Intervention::zero_head(0, head))
        .collect();
    let z = model
        .run_with_hooks(&tokens, Hooks::from_interventions(heads))
        .unwrap();
    assert_close(
        "logits",
        &kv.to_host().unwrap().data,
        &z.to_host().unwrap().data,
        1e-4,
    );
}

#[test]
fn pattern_scope_limits_rows() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::repeated(&ids(6, 14, model.config().d_vocab()), 2);
    let filter = HookFilter::names(["blocks.1.attn.hook_pattern"]).unwrap();
    let options = RunOptions {
        hooks: Hooks::from_interventions(vec![
            Intervention::replace_pattern(1, 1, PatternSpec::FirstToken)
                .with_scope(Scope::batch_item(1).with_positions(vec![3, 4])),
        ]),
        cache: filter.clone(),
        ..RunOptions::default()
    };
    let patched = model.run(&tokens, &options).unwrap().cache;
    let (_, clean) = model.run_with_cache(&tokens, filter).unwrap();
    let patched = patched.get("blocks.1.attn.hook_pattern").unwrap();
    let clean = clean.get("blocks.1.attn.hook_pattern").unwrap();

    let n_heads = model.config().n_heads();
    for b in 0..2 {
        for head in 0..n_heads {
            for query in 0..6 {
                let start = ((b * n_heads + head) * 6 + query) * 6;
                let row = &patched.data[start..start + 6];
                if b == 1 && head == 1 && (query == 3 || query == 4) {
                    assert_eq!(row, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], "patched row {query}");
                } else {
                    assert_eq!(
                        bits(row),
                        bits(&clean.data[start..start + 6]),
                        "item {b} head {head} query {query}"
                    );
                }
            }
        }
    }
}

#[test]
fn patch_from_own_cache_changes_nothing() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(8, 15, model.config().d_vocab()));
    let (logits, cache) = model.run_with_cache(&tokens, HookFilter::All).unwrap();
    let clean = logits.to_host().unwrap();

    for name in [
        "blocks.0.attn.hook_z",
        "blocks.1.attn.hook_pattern",
        "blocks.0.hook_resid_mid",
        "blocks.1.attn.hook_v",
    ] {
        let point: HookPoint = name.parse().unwrap();
        let patch = Intervention::patch_from_cache(&cache, point, None).unwrap();
        let patched = all_logits(&model, &tokens, Hooks::from_interventions(vec![patch]));
        assert_close(name, &patched.data, &clean.data, 1e-5);
    }
}

#[test]
fn patch_heads_from_other_prompt() {
    let model = cpu_model("tiny-gqa");
    let d_vocab = model.config().d_vocab();
    let clean_tokens = TokenBatch::single(&ids(7, 16, d_vocab));
    let corrupt_tokens = TokenBatch::single(&ids(7, 17, d_vocab));
    let point = HookPoint::block(1, BlockHook::Z);
    let (_, clean_cache) = model
        .run_with_cache(&clean_tokens, HookFilter::points([point]))
        .unwrap();
    let source = clean_cache.get_point(point).unwrap().clone();

    let patch = Intervention::patch_from_cache(&clean_cache, point, Some(vec![0, 3])).unwrap();
    let patched = all_logits(
        &model,
        &corrupt_tokens,
        Hooks::from_interventions(vec![patch]),
    );
    let by_closure = all_logits(
        &model,
        &corrupt_tokens,
        Hooks::new().with_closure(point, move |tensor, _| {
            let d_head = tensor.shape[3];
            let width = tensor.shape[2] * d_head;
            for (row, source_row) in tensor.data.chunks_mut(width).zip(source.data.chunks(width)) {
                for head in [0, 3] {
                    row[head * d_head..(head + 1) * d_head]
                        .copy_from_slice(&source_row[head * d_head..(head + 1) * d_head]);
                }
            }
        }),
    );
    assert_eq!(bits(&patched.data), bits(&by_closure.data));
}

#[test]
fn steering_vector_equals_closure() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(5, 18, model.config().d_vocab()));
    let d_model = model.config().d_model();
    let vector: Vec<f32> = (0..d_model).map(|i| (i as f32 * 0.37).sin()).collect();
    let point = HookPoint::block(1, BlockHook::ResidPre);

    let steered = all_logits(
        &model,
        &tokens,
        Hooks::from_interventions(vec![
            Intervention::add_to_hook(point, vector.clone())
                .with_scope(Scope::all().with_positions(vec![2, 4])),
        ]),
    );
    let by_closure = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(point, move |tensor, _| {
            for position in [2, 4] {
                let row = &mut tensor.data[position * d_model..(position + 1) * d_model];
                row.iter_mut().zip(&vector).for_each(|(x, v)| *x += v);
            }
        }),
    );
    assert_eq!(bits(&steered.data), bits(&by_closure.data));
}

#[test]
fn head_results_sum_to_attn_out() {
    let model = cpu_model("tiny-untied-sharded");
    let tokens = TokenBatch::single(&ids(6, 19, 1000));
    let (_, cache) = model
        .run_with_cache(
            &tokens,
            HookFilter::regex(r"^blocks\.2\.(attn\.hook_result|hook_attn_out)$").unwrap(),
        )
        .unwrap();
    assert_eq!(
        cache.names(),
        ["blocks.2.attn.hook_result", "blocks.2.hook_attn_out"]
    );

    let result = cache.get("blocks.2.attn.hook_result").unwrap();
    let attn_out = cache.get("blocks.2.hook_attn_out").unwrap();
    let (n_heads, d_model) = (model.config().n_heads(), model.config().d_model());
    assert_eq!(result.shape, vec![1, 6, n_heads, d_model]);
    let sums: Vec<f32> = result
        .data
        .chunks(n_heads * d_model)
        .flat_map(|row| {
            (0..d_model).map(move |i| (0..n_heads).map(|h| row[h * d_model + i]).sum::<f32>())
        })
        .collect();
    assert_close("sum of hook_result", &sums, &attn_out.data, 1e-4);
}

#[test]
fn hook_names_round_trip() {
    for point in HookPoint::all(24) {
        let name = point.to_string();
        assert_eq!(HookPoint::parse_for(&name, 24).unwrap(), point, "{name}");
    }
    assert_eq!(HookPoint::defaults(2).len(), 2 * 20 + 4);
}

#[test]
fn unknown_hook_suggests_nearest() {
    for (name, nearest) in [
        ("blocks.3.attn.hook_patern", "blocks.3.attn.hook_pattern"),
        ("blocks.0.hook_resid_pos", "blocks.0.hook_resid_post"),
        ("ln_final.hook_scal", "ln_final.hook_scale"),
        ("hook_embedding", "hook_embed"),
    ] {
        match name.parse::<HookPoint>() {
            Err(ModelError::UnknownHook { suggestion, .. }) => {
                assert_eq!(suggestion, nearest, "{name}")
            }
            other => panic!("{name}: expected an unknown-hook error, got {other:?}"),
        }
    }
    let message = "blocks.0.attn.hook_zz"
        .parse::<HookPoint>()
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("did you mean `blocks.0.attn.hook_z`"),
        "{message}"
    );
}

#[test]
fn bad_layer_and_head_are_errors() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&[1, 2, 3]);

    let layer = HookPoint::parse_for("blocks.2.hook_resid_pre", model.n_layers()).unwrap_err();
    assert!(
        matches!(
            layer,
            ModelError::LayerOutOfRange {
                layer: 2,
                n_layers: 2,
                ..
            }
        ),
        "{layer}"
    );
    assert!(layer.to_string().contains("2 layers"), "{layer}");

    let filter = HookFilter::points([HookPoint::block(5, BlockHook::Z)]);
    let cached = model.run_with_cache(&tokens, filter).unwrap_err();
    assert!(
        matches!(cached, ModelError::LayerOutOfRange { layer: 5, .. }),
        "{cached}"
    );

    let head = model
        .run_with_hooks(
            &tokens,
            Hooks::from_interventions(vec![Intervention::zero_head(0, 4)]),
        )
        .unwrap_err();
    assert!(
        matches!(
            head,
            ModelError::HeadOutOfRange {
                head: 4,
                n_heads: 4,
                ..
            }
        ),
        "{head}"
    );

    let kv_head = model
        .run_with_hooks(
            &tokens,
            Hooks::from_interventions(vec![Intervention::zero_kv_head(1, 2)]),
        )
        .unwrap_err();
    assert!(
        matches!(
            kv_head,
            ModelError::HeadOutOfRange {
                head: 2,
                n_heads: 2,
                ..
            }
        ),
        "{kv_head}"
    );

    let scope = Intervention::zero_head(0, 0).with_scope(Scope::batch_item(1));
    let item = model
        .run_with_hooks(&tokens, Hooks::from_interventions(vec![scope]))
        .unwrap_err();
    assert!(matches!(item, ModelError::InvalidArgument(_)), "{item}");

    let stop = model
        .run(
            &tokens,
            &RunOptions {
                stop_at_layer: Some(3),
                ..RunOptions::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(stop, ModelError::LayerOutOfRange { layer: 3, .. }),
        "{stop}"
    );
}

#[test]
fn wrong_replacement_shapes_are_errors() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&[1, 2, 3]);

    let closure =
        Hooks::new().with_closure(HookPoint::block(0, BlockHook::MlpPost), |tensor, _| {
            tensor.data.pop();
        });
    let error = model.run_with_hooks(&tokens, closure).unwrap_err();
    assert!(matches!(error, ModelError::ShapeMismatch { .. }), "{error}");

    let reshaped = Hooks::new().with_closure(HookPoint::block(0, BlockHook::Z), |tensor, _| {
        tensor.shape = vec![3, 64]
    });
    let error = model.run_with_hooks(&tokens, reshaped).unwrap_err();
    assert!(matches!(error, ModelError::ShapeMismatch { .. }), "{error}");

    let steering =
        Intervention::add_to_hook(HookPoint::block(0, BlockHook::ResidPost), vec![0.0; 5]);
    let error = model
        .run_with_hooks(&tokens, Hooks::from_interventions(vec![steering]))
        .unwrap_err();
    assert!(matches!(error, ModelError::ShapeMismatch { .. }), "{error}");

    let short_source = Intervention::PatchFromCache {
        hook: HookPoint::block(0, BlockHook::ResidMid),
        source: Arc::new(HostTensor::zeros(vec![1, 2, 64]).unwrap()),
        heads: None,
        scope: Scope::all(),
    };
    let error = model
        .run_with_hooks(&tokens, Hooks::from_interventions(vec![short_source]))
        .unwrap_err();
    assert!(matches!(error, ModelError::ShapeMismatch { .. }), "{error}");

    let small_table = Intervention::replace_pattern(
        1,
        0,
        PatternSpec::Fixed(HostTensor::zeros(vec![2, 2]).unwrap()),
    );
    let error = model
        .run_with_hooks(&tokens, Hooks::from_interventions(vec![small_table]))
        .unwrap_err();
    assert!(matches!(error, ModelError::ShapeMismatch { .. }), "{error}");
}

#[test]
fn bad_prompts_are_errors() {
    let model = cpu_model("tiny-untied-sharded");

    let empty = model.forward(&TokenBatch::single(&[])).unwrap_err();
    assert!(
        matches!(empty, ModelError::EmptyPrompt { item: 0 }),
        "{empty}"
    );

    let padded_empty = model
        .forward(&TokenBatch::left_padded(&[vec![1, 2], vec![]], 0))
        .unwrap_err();
    assert!(
        matches!(padded_empty, ModelError::EmptyPrompt { item: 1 }),
        "{padded_empty}"
    );

    let token = model
        .forward(&TokenBatch::single(&[1, 1000, 2]))
        .unwrap_err();
    assert!(
        matches!(
            token,
            ModelError::TokenOutOfRange {
                token: 1000,
                position: 1,
                d_vocab: 1000,
                ..
            }
        ),
        "{token}"
    );

    let max = model.config().max_position_embeddings;
    let long = model
        .forward(&TokenBatch::single(&vec![1; max + 1]))
        .unwrap_err();
    assert!(matches!(long, ModelError::PromptTooLong { .. }), "{long}");
    assert!(long.to_string().contains(&max.to_string()), "{long}");
}

#[test]
fn oversized_run_is_device_limit_error() {
    let mut model = cpu_model("tiny-gqa");
    model.set_device_limits(DeviceLimits {
        max_buffer_bytes: 1 << 20,
        max_total_bytes: u64::MAX,
    });
    let tokens = TokenBatch::single(&[1, 2, 3, 4]);

    // 4 positions of 151936 logits are 2.4 MB, above the 1 MiB buffer limit.
    let error = model.forward(&tokens).unwrap_err();
    assert!(matches!(error, ModelError::DeviceLimit { .. }), "{error}");
    assert!(error.to_string().contains("last position"), "{error}");

    // The last position alone fits.
    let last = model
        .run(
            &tokens,
            &RunOptions {
                logit_rows: LogitRows::Last,
                ..RunOptions::default()
            },
        )
        .unwrap();
    assert_eq!(last.logits.unwrap().pos(), 1);

    model.set_device_limits(DeviceLimits {
        max_buffer_bytes: u64::MAX,
        max_total_bytes: 1 << 16,
    });
    let error = model.forward(&tokens).unwrap_err();
    assert!(matches!(error, ModelError::DeviceLimit { .. }), "{error}");
}

#[test]
fn cache_saved_to_safetensors_loads_back() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&[9707, 11, 1879]);
    let (_, cache) = model
        .run_with_cache(
            &tokens,
            HookFilter::regex(r"^blocks\.1\.attn\.|^hook_embed$").unwrap(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.safetensors");
    cache.save_safetensors(&path).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    names.sort();
    let mut expected = cache.names();
    expected.sort();
    assert_eq!(names, expected);
    assert!(
        names.contains(&"blocks.1.attn.hook_result".to_string()),
        "regex selects hook_result"
    );

    for (point, tensor) in cache.iter() {
        let view = file.tensor(&point.to_string()).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        assert_eq!(view.shape(), tensor.shape.as_slice(), "{point}");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(bits(&values), bits(&tensor.data), "{point}");
    }
    assert_eq!(
        file.tensor("blocks.1.attn.hook_pattern").unwrap().shape(),
        [1, model.config().n_heads(), 3, 3]
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left behind"
    );
}

#[test]
fn score_and_pattern_closures_match_replacement() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(7, 20, model.config().d_vocab()));
    let n_heads = model.config().n_heads();
    let replaced = all_logits(
        &model,
        &tokens,
        Hooks::from_interventions(vec![Intervention::replace_pattern(
            1,
            2,
            PatternSpec::FirstToken,
        )]),
    );

    // Scores of -inf on every key but 0 make the softmax attend to the first token only.
    let by_scores = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(
            HookPoint::block(1, BlockHook::AttnScores),
            move |scores, _| {
                let (q_len, k_len) = (scores.shape[2], scores.shape[3]);
                let head = &mut scores.data[2 * q_len * k_len..3 * q_len * k_len];
                for row in head.chunks_mut(k_len) {
                    row[1..].fill(f32::NEG_INFINITY);
                }
            },
        ),
    );
    assert_close("scores closure", &by_scores.data, &replaced.data, 1e-5);

    let by_pattern = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(
            HookPoint::block(1, BlockHook::Pattern),
            move |pattern, _| {
                assert_eq!(pattern.shape[1], n_heads);
                let (q_len, k_len) = (pattern.shape[2], pattern.shape[3]);
                let head = &mut pattern.data[2 * q_len * k_len..3 * q_len * k_len];
                for row in head.chunks_mut(k_len) {
                    row.fill(0.0);
                    row[0] = 1.0;
                }
            },
        ),
    );
    assert_close("pattern closure", &by_pattern.data, &replaced.data, 1e-5);
}

#[test]
fn scale_closure_rescales_normalized() {
    let model = cpu_model("tiny-untied-sharded");
    let tokens = TokenBatch::single(&ids(5, 21, 1000));
    let by_scale = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(HookPoint::block(1, BlockHook::Ln2Scale), |scale, _| {
            scale.data.iter_mut().for_each(|s| *s *= 2.0);
        }),
    );
    let by_normalized = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(
            HookPoint::block(1, BlockHook::Ln2Normalized),
            |normalized, _| {
                normalized.data.iter_mut().for_each(|x| *x *= 0.5);
            },
        ),
    );
    let clean = all_logits(&model, &tokens, Hooks::new());
    assert_close(
        "halved normalization",
        &by_scale.data,
        &by_normalized.data,
        1e-5,
    );
    assert!(
        max_abs_diff(&by_scale.data, &clean.data) > 1e-3,
        "the scale closure had no effect"
    );
}

#[test]
fn result_closure_replaces_attn_out() {
    let model = cpu_model("tiny-untied-sharded");
    let tokens = TokenBatch::single(&ids(6, 22, 1000));
    let (n_heads, d_model) = (model.config().n_heads(), model.config().d_model());
    let by_result = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(HookPoint::block(0, BlockHook::Result), move |result, _| {
            for row in result.data.chunks_mut(n_heads * d_model) {
                row[4 * d_model..5 * d_model].fill(0.0);
            }
        }),
    );
    let by_z = all_logits(
        &model,
        &tokens,
        Hooks::from_interventions(vec![Intervention::zero_head(0, 4)]),
    );
    assert_close("zeroed head result", &by_result.data, &by_z.data, 1e-4);
}

#[test]
fn ablations_at_one_hook_apply_in_order() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&ids(6, 23, model.config().d_vocab()));
    let interventions = vec![
        Intervention::zero_head(1, 0).with_scope(Scope::all().with_positions(vec![2])),
        Intervention::zero_head(1, 3),
        Intervention::mean_ablate_head(1, 0),
    ];
    let by_interventions = all_logits(&model, &tokens, Hooks::from_interventions(interventions));

    // The mean of head 0 is taken after its position 2 was zeroed.
    let by_closure = all_logits(
        &model,
        &tokens,
        Hooks::new().with_closure(HookPoint::block(1, BlockHook::Z), |z, _| {
            let (n_heads, d_head) = (z.shape[2], z.shape[3]);
            let width = n_heads * d_head;
            z.data[2 * width..2 * width + d_head].fill(0.0);
            for row in z.data.chunks_mut(width) {
                row[3 * d_head..4 * d_head].fill(0.0);
            }
            let rows = z.data.len() / width;
            let mean: Vec<f32> = (0..d_head)
                .map(|i| {
                    let sum: f64 = (0..rows).map(|r| f64::from(z.data[r * width + i])).sum();
                    (sum / rows as f64) as f32
                })
                .collect();
            for row in z.data.chunks_mut(width) {
                row[..d_head].copy_from_slice(&mean);
            }
        }),
    );
    assert_close(
        "ordered ablations",
        &by_interventions.data,
        &by_closure.data,
        1e-6,
    );
}

#[test]
fn custom_and_fixed_patterns_match_builtin() {
    let model = cpu_model("tiny-mha-f16");
    let tokens = TokenBatch::single(&ids(8, 24, 1000));
    let with_pattern = |spec: PatternSpec| {
        all_logits(
            &model,
            &tokens,
            Hooks::from_interventions(vec![Intervention::replace_pattern(1, 3, spec)]),
        )
    };
    let uniform = with_pattern(PatternSpec::Uniform);

    let custom = with_pattern(PatternSpec::Custom(Arc::new(|query, key_len| {
        (0..key_len)
            .map(|key| {
                if key <= query {
                    1.0 / (query + 1) as f32
                } else {
                    0.0
                }
            })
            .collect()
    })));
    assert_eq!(
        bits(&custom.data),
        bits(&uniform.data),
        "custom uniform rows"
    );

    // A table larger than the prompt is cut to the current length.
    let size = 12;
    let mut table = HostTensor::zeros(vec![size, size]).unwrap();
    for query in 0..size {
        for key in 0..=query {
            table.data[query * size + key] = 1.0 / (query + 1) as f32;
        }
    }
    let fixed = with_pattern(PatternSpec::Fixed(table));
    assert_eq!(
        bits(&fixed.data),
        bits(&uniform.data),
        "fixed uniform table"
    );

    // Position(0) is the first-token pattern; Position(p) before position p attends to itself.
    assert_eq!(
        bits(&with_pattern(PatternSpec::Position(0)).data),
        bits(&with_pattern(PatternSpec::FirstToken).data)
    );
    assert_eq!(
        bits(&with_pattern(PatternSpec::Position(100)).data),
        bits(&with_pattern(PatternSpec::SelfToken).data)
    );
    assert!(max_abs_diff(&with_pattern(PatternSpec::Position(3)).data, &uniform.data) > 1e-4);
}

#[test]
fn patched_scores_give_source_pattern() {
    let model = cpu_model("tiny-gqa");
    let d_vocab = model.config().d_vocab();
    let source_tokens = TokenBatch::single(&ids(7, 25, d_vocab));
    let target_tokens = TokenBatch::single(&ids(7, 26, d_vocab));
    let scores = HookPoint::block(0, BlockHook::AttnScores);
    let pattern = HookPoint::block(0, BlockHook::Pattern);
    let (_, source) = model
        .run_with_cache(&source_tokens, HookFilter::points([scores, pattern]))
        .unwrap();

    let options = RunOptions {
        hooks: Hooks::from_interventions(vec![
            Intervention::patch_from_cache(&source, scores, Some(vec![1])).unwrap(),
        ]),
        cache: HookFilter::points([pattern]),
        ..RunOptions::default()
    };
    let patched = model.run(&target_tokens, &options).unwrap().cache;
    let (_, clean) = model
        .run_with_cache(&target_tokens, HookFilter::points([pattern]))
        .unwrap();

    let block = 7 * 7;
    let patched = &patched.get_point(pattern).unwrap().data;
    let source_pattern = &source.get_point(pattern).unwrap().data;
    let clean = &clean.get_point(pattern).unwrap().data;
    assert_close(
        "patched head",
        &patched[block..2 * block],
        &source_pattern[block..2 * block],
        1e-6,
    );
    assert_eq!(
        bits(&patched[..block]),
        bits(&clean[..block]),
        "head 0 untouched"
    );
    assert_eq!(
        bits(&patched[2 * block..]),
        bits(&clean[2 * block..]),
        "heads 2 and 3 untouched"
    );
}

#[test]
fn token_batch_item_out_of_range_is_error() {
    let batch = TokenBatch::left_padded(&[vec![1, 2, 3], vec![4]], 0);

    let row_error = batch.row(2).unwrap_err().to_string();
    let tokens_error = batch.tokens(5).unwrap_err().to_string();

    assert_eq!(batch.tokens(1).unwrap(), &[4]);
    assert_eq!(batch.row(1).unwrap(), &[0, 0, 4]);
    assert!(
        row_error.contains("batch item 2 is out of range"),
        "{row_error}"
    );
    assert!(
        tokens_error.contains("the token batch has 2 items"),
        "{tokens_error}"
    );
}

#[test]
fn host_tensor_with_overflowing_shape_is_error() {
    let zeros = HostTensor::zeros(vec![usize::MAX, 2])
        .unwrap_err()
        .to_string();
    let new = HostTensor::new(vec![usize::MAX, 3], vec![0.0])
        .unwrap_err()
        .to_string();

    assert!(
        zeros.contains("more elements than memory can address"),
        "{zeros}"
    );
    assert!(
        new.contains("more elements than memory can address"),
        "{new}"
    );
}

#[test]
fn scope_position_out_of_range_or_empty_is_error() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&[9707, 11, 1879]);
    let run = |scope: Scope| {
        let hooks = Hooks::new().with_intervention(Intervention::ZeroHeadZ {
            layer: 0,
            head: 0,
            scope,
        });
        model.run_with_hooks(&tokens, hooks)
    };

    let beyond = run(Scope::all().with_positions(vec![1, 1000])).unwrap_err();
    let no_positions = run(Scope::all().with_positions(Vec::new())).unwrap_err();
    let no_items = run(Scope::all().with_batch(Vec::new())).unwrap_err();

    assert!(run(Scope::all().with_positions(vec![2])).is_ok());
    assert!(
        beyond
            .to_string()
            .contains("names position 1000, but the sequence has 3 positions"),
        "{beyond}"
    );
    assert!(
        no_positions.to_string().contains("empty list of positions"),
        "{no_positions}"
    );
    assert!(
        no_items.to_string().contains("empty list of batch items"),
        "{no_items}"
    );
}

#[test]
fn loss_of_one_token_item_is_error() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::left_padded(&[vec![9707, 11], vec![1879]], 0);

    let logits = model.forward(&tokens).unwrap();
    let error = logits.loss(&tokens).unwrap_err().to_string();
    let single = TokenBatch::single(&[9707, 11]);
    let loss = model.forward(&single).unwrap().loss(&single).unwrap();

    assert!(error.contains("batch item 1"), "{error}");
    assert!(error.contains("one real token"), "{error}");
    assert!(loss[0].is_finite());
}

#[test]
fn run_step_rejects_mean_ablation_after_the_prompt() {
    let model = cpu_model("tiny-gqa");
    let options = RunOptions {
        hooks: Hooks::new().with_intervention(Intervention::mean_ablate_head(1, 0)),
        logit_rows: LogitRows::Last,
        ..RunOptions::default()
    };
    let mut cache = model.new_kv_cache();

    let prompt = model.run_step(&mut cache, &TokenBatch::single(&[9707, 11, 1879]), &options);
    let step = model
        .run_step(&mut cache, &TokenBatch::single(&[13]), &options)
        .unwrap_err()
        .to_string();

    assert!(prompt.is_ok(), "{:?}", prompt.err());
    assert!(
        step.contains("mean ablation cannot run against a KV cache"),
        "{step}"
    );
    assert_eq!(cache.len(), 3, "a rejected step leaves the cache unchanged");
}

#[test]
fn hook_numel_matches_cached_activations() {
    let model = cpu_model("tiny-gqa");
    let tokens = TokenBatch::single(&[9707, 11, 1879, 13]);
    let points = HookPoint::all(model.n_layers());
    let (_, cache) = model
        .run_with_cache(&tokens, HookFilter::points(points.clone()))
        .unwrap();

    for point in points {
        let cached = cache.get_point(point).unwrap().numel() as u64;
        assert_eq!(point.numel(model.config(), 1, 4), cached, "{point}");
    }
}
