//! The eight steps of a study, each filling its section of the summary.

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use qwenlens_analysis::attention::{HeadStats, head_name, head_stats, layer_stats};
use qwenlens_analysis::layers::LayerSelection;
use qwenlens_analysis::output::{write_csv, write_png};
use qwenlens_analysis::patching::check_generation_length;
use qwenlens_analysis::pattern_file::load_pattern_file;
use qwenlens_analysis::render::{ColorScale, Heatmap};
use qwenlens_analysis::tokens::position_labels;
use qwenlens_kernels::{Device, create_backend};
use qwenlens_model::{
    BlockHook, GenerateOptions, HookFilter, HookPoint, Hooks, Intervention, Model, PatternSpec,
    StopReason, TokenBatch,
};
use qwenlens_weights::{ChatMessage, Checkpoint, ModelSource, read_chat_file};
use xtask::report::{
    GenerationSummary, HeadAttention, HeadRef, ImportanceSummary, LayerAttention, LayerPatterns,
    Message, ModelInfo, PatchSummary, PromptInfo, SamplingSummary,
};

use super::runner::Runner;
use super::sweep::{self, SweepResult};
use super::{Args, DEFAULT_QUESTION};

pub use super::sweep::SweepMode;

/// Largest token label on the axes of the attention pictures, in characters.
const LABEL_CHARS: usize = 12;

/// Description of the tokens the losses are computed on, as written to the summary.
const SCORED_TOKENS: &str = "the prompt followed by the clean completion";

/// The rendered chat's token ids, and each token decoded on its own.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
}

/// The replacement pattern of `--pattern`, before the file (if any) is read.
#[derive(Clone, Debug, PartialEq)]
pub enum PatternChoice {
    Uniform,
    PreviousToken,
    FirstToken,
    SelfToken,
    Position(usize),
    File(std::path::PathBuf),
}

impl PatternChoice {
    /// Parses `--pattern`.
    pub fn parse(text: &str) -> anyhow::Result<PatternChoice> {
        let choice = match text {
            "uniform" => PatternChoice::Uniform,
            // The qwenlens CLI spellings are accepted too, so one --pattern works everywhere.
            "previous-token" | "previous" => PatternChoice::PreviousToken,
            "first-token" | "first" => PatternChoice::FirstToken,
            "self" => PatternChoice::SelfToken,
            _ => {
                if let Some(position) = text.strip_prefix("position:") {
                    let position = position.parse().with_context(|| {
                        format!("invalid --pattern {text:?}: position:N needs a token position such as position:0")
                    })?;
                    PatternChoice::Position(position)
                } else if Path::new(text).is_file() {
                    PatternChoice::File(text.into())
                } else {
                    bail!(
                        "invalid --pattern {text:?}: expected uniform, previous-token, first-token, self, \
                         position:N, or an existing .npy/.safetensors file"
                    );
                }
            }
        };
        Ok(choice)
    }

    /// Builds the pattern spec; a file must cover `min_len` positions.
    fn spec(&self, min_len: usize) -> anyhow::Result<PatternSpec> {
        Ok(match self {
            PatternChoice::Uniform => PatternSpec::Uniform,
            PatternChoice::PreviousToken => PatternSpec::PreviousToken,
            PatternChoice::FirstToken => PatternSpec::FirstToken,
            PatternChoice::SelfToken => PatternSpec::SelfToken,
            PatternChoice::Position(p) => PatternSpec::Position(*p),
            PatternChoice::File(path) => PatternSpec::Fixed(load_pattern_file(path, min_len)?),
        })
    }

    fn describe(&self) -> String {
        match self {
            PatternChoice::Uniform => "uniform".into(),
            PatternChoice::PreviousToken => "previous-token".into(),
            PatternChoice::FirstToken => "first-token".into(),
            PatternChoice::SelfToken => "self".into(),
            PatternChoice::Position(p) => format!("position:{p}"),
            PatternChoice::File(path) => format!("file {}", path.display()),
        }
    }
}

/// Options checked before the run starts, so a typo fails before the model loads.
pub struct Plan {
    pub device: Device,
    pub source: ModelSource,
    pub layers: LayerSelection,
    pub sweep_layers: LayerSelection,
    pub pattern: PatternChoice,
}

impl Plan {
    /// Parses the options of `args` that need no model.
    pub fn from_args(args: &Args) -> anyhow::Result<Plan> {
        if args.max_new_tokens == 0 {
            bail!("invalid --max-new-tokens 0: the study needs at least one new token");
        }
        if let Some(chat) = &args.chat
            && !chat.is_file()
        {
            bail!(
                "chat file {} not found; give a JSON list of {{\"role\", \"content\"}} messages",
                chat.display()
            );
        }
        Ok(Plan {
            device: args.device.parse()?,
            source: ModelSource::parse(&args.model, &args.revision)?,
            layers: args.layers.parse().context("in --layers")?,
            sweep_layers: args.sweep_layers.parse().context("in --sweep-layers")?,
            pattern: PatternChoice::parse(&args.pattern)?,
        })
    }
}

/// Runs every step in order; the first failure stops the run.
pub fn run_steps(args: &Args, plan: &Plan, runner: &mut Runner) -> anyhow::Result<()> {
    let (model, layers, sweep_layers) =
        runner.step("load the model", |run| load_model(args, plan, run))?;

    // The pattern is built here, as soon as the sequence length is known, so a file that cannot
    // cover the prompt plus --max-new-tokens fails before generation and the sweep.
    let (prompt, spec) = runner.step("format the chat", |run| {
        let prompt = format_chat(args, &model, run)?;
        check_generation_length(&model, prompt.ids.len(), args.max_new_tokens)?;
        let spec = plan.pattern.spec(prompt.ids.len() + args.max_new_tokens)?;
        warn_position_beyond_prompt(&plan.pattern, prompt.ids.len());
        Ok((prompt, spec))
    })?;
    let options = generate_options(args, &model);
    let generation = runner.step("generate", |run| {
        generate_clean(&model, &prompt, &options, run)
    })?;

    runner.step("analyse attention patterns", |run| {
        analyse_attention(&model, &prompt, &layers, run)
    })?;
    runner.step("draw attention heads", |run| draw_heads(&prompt, run))?;

    let mut scored = prompt.ids.clone();
    scored.extend_from_slice(&generation);
    let sweep = runner.step("rank heads by ablation", |run| {
        rank_heads(args, &model, &sweep_layers, &scored, run)
    })?;
    let head = runner.step("name the most important head", |run| {
        name_head(&model, &prompt, &sweep, run)
    })?;
    runner.step("patch the head and generate again", |run| {
        patch_head(plan, spec, &model, &prompt, &scored, head, &options, run)
    })?;
    Ok(())
}

/// Warns when `position:P` lies beyond the prompt: each query then attends to itself until the
/// generation reaches P, which equals `self` on the prompt and is easy to pick by mistake.
fn warn_position_beyond_prompt(choice: &PatternChoice, prompt_len: usize) {
    if let PatternChoice::Position(position) = choice
        && *position >= prompt_len
    {
        eprintln!(
            "warning: --pattern position:{position} lies beyond the prompt's {prompt_len} tokens (0 to {}); until the generation reaches it, each query attends to itself as with --pattern self",
            prompt_len.saturating_sub(1)
        );
    }
}

/// Loads the model and resolves --layers and --sweep-layers against its config before the weights
/// are uploaded, so a layer that does not exist fails at once.
fn load_model(
    args: &Args,
    plan: &Plan,
    run: &mut Runner,
) -> anyhow::Result<(Model, Vec<usize>, Vec<usize>)> {
    let checkpoint = Checkpoint::load(&plan.source)
        .with_context(|| format!("failed to load model {}", args.model))?;
    let n_layers = checkpoint.config().n_layers();
    let layers = plan.layers.resolve(n_layers, "--layers")?;
    let sweep_layers = plan.sweep_layers.resolve(n_layers, "--sweep-layers")?;
    let backend = create_backend(plan.device)
        .with_context(|| format!("failed to create the {} backend", args.device))?;
    eprintln!(
        "      model {} from {}",
        args.model,
        checkpoint.dir().display()
    );
    eprintln!("      backend {}", backend.name());

    let model = Model::from_checkpoint(&checkpoint, backend)
        .with_context(|| format!("failed to upload the weights of {}", args.model))?;
    if model.tokenizer().is_none() {
        bail!(
            "model folder {} has no tokenizer.json; copy the tokenizer files next to the weights",
            checkpoint.dir().display()
        );
    }

    let config = model.config();
    run.summary.model = Some(ModelInfo {
        source: args.model.clone(),
        folder: checkpoint.dir().display().to_string(),
        backend: model.backend().name(),
        n_layers: config.n_layers(),
        n_heads: config.n_heads(),
        n_kv_heads: config.n_kv_heads(),
        d_model: config.d_model(),
        d_head: config.d_head(),
        d_mlp: config.d_mlp(),
        d_vocab: config.d_vocab(),
        parameters: checkpoint.parameter_count() as u64,
    });
    Ok((model, layers, sweep_layers))
}

fn format_chat(args: &Args, model: &Model, run: &mut Runner) -> anyhow::Result<Prompt> {
    let tokenizer = model.tokenizer().context("the model has no tokenizer")?;
    let messages = match (&args.chat, &args.prompt) {
        (Some(path), _) => read_chat_file(path)?,
        (None, user) => vec![
            ChatMessage {
                role: "system".into(),
                content: args.system.clone(),
            },
            ChatMessage {
                role: "user".into(),
                content: user.clone().unwrap_or_else(|| DEFAULT_QUESTION.to_string()),
            },
        ],
    };

    let text = tokenizer.apply_chat_template(&messages, true)?;
    let ids = tokenizer.encode(&text)?;
    let tokens = decode_each(model, &ids)?;
    eprintln!("      {} messages, {} tokens", messages.len(), ids.len());

    run.summary.prompt = Some(PromptInfo {
        messages: messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect(),
        text,
    });
    run.summary.prompt_ids = ids.clone();
    run.summary.prompt_tokens = tokens.clone();
    Ok(Prompt { ids, tokens })
}

/// Decodes each id on its own, special tokens included.
fn decode_each(model: &Model, ids: &[u32]) -> anyhow::Result<Vec<String>> {
    let tokenizer = model.tokenizer().context("the model has no tokenizer")?;
    ids.iter().map(|&id| Ok(tokenizer.decode(&[id])?)).collect()
}

fn generate_options(args: &Args, model: &Model) -> GenerateOptions {
    let mut options = model.default_generate_options();
    options.max_new_tokens = args.max_new_tokens;
    if args.greedy {
        options.sampling.do_sample = false;
    }
    // Both generations share one seed, so a difference between them comes from the patch.
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    options.sampling.seed = Some(seed);
    options
}

fn sampling_summary(options: &GenerateOptions) -> SamplingSummary {
    let sampling = &options.sampling;
    SamplingSummary {
        greedy: !sampling.do_sample,
        temperature: sampling.temperature,
        top_k: sampling.top_k.unwrap_or(0),
        top_p: sampling.top_p.unwrap_or(1.0),
        repetition_penalty: sampling.repetition_penalty,
        seed: sampling.seed.unwrap_or(0),
    }
}

/// Generates from the prompt with `hooks`, streaming the text to the terminal.
fn stream_generation(
    model: &Model,
    prompt: &Prompt,
    options: &GenerateOptions,
    hooks: &Hooks,
) -> anyhow::Result<(qwenlens_model::Generation, f64)> {
    let started = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let _ = write!(stdout, "      ");
    let generation = model.generate(&prompt.ids, options, hooks, |_, text| {
        let _ = write!(stdout, "{}", text.replace('\n', "\n      "));
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    Ok((generation, started.elapsed().as_secs_f64()))
}

fn generate_clean(
    model: &Model,
    prompt: &Prompt,
    options: &GenerateOptions,
    run: &mut Runner,
) -> anyhow::Result<Vec<u32>> {
    let (generation, seconds) = stream_generation(model, prompt, options, &Hooks::new())?;
    let tokens = decode_each(model, &generation.ids)?;
    run.write_file("generation.txt", generation.text.as_bytes())?;

    run.summary.generation = Some(GenerationSummary {
        ids: generation.ids.clone(),
        text: generation.text.clone(),
        tokens,
        sampling: sampling_summary(options),
        max_new_tokens: options.max_new_tokens,
        stop_reason: stop_reason(generation.stop_reason),
        tokens_per_second: generation.ids.len() as f64 / seconds.max(1e-9),
    });
    Ok(generation.ids)
}

fn stop_reason(reason: StopReason) -> String {
    match reason {
        StopReason::Eos(id) => format!("eos (token {id})"),
        StopReason::MaxNewTokens => "max_new_tokens".to_string(),
    }
}

fn pattern_point(layer: usize) -> HookPoint {
    HookPoint::block(layer, BlockHook::Pattern)
}

/// Reads the `[n_heads, n, n]` pattern of each layer from one forward over the prompt.
fn prompt_patterns(model: &Model, ids: &[u32], layers: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
    let filter = HookFilter::points(layers.iter().map(|&l| pattern_point(l)));
    let (_, cache) = model.run_with_cache(&TokenBatch::single(ids), filter)?;
    layers
        .iter()
        .map(|&layer| Ok(cache.require(pattern_point(layer))?.data.clone()))
        .collect()
}

fn head_attention(stats: &HeadStats, group_size: usize) -> HeadAttention {
    HeadAttention {
        head: stats.head,
        kv_group: stats.head / group_size,
        entropy: stats.entropy,
        normalized_entropy: stats.normalized_entropy,
        sink_score: stats.sink_score,
        previous_token_score: stats.previous_token_score,
        self_score: stats.self_score,
        mean_distance: stats.mean_distance,
        induction_score: stats.induction_score,
        label: stats.label.map(label_name),
    }
}

fn label_name(label: qwenlens_analysis::attention::HeadLabel) -> String {
    label.name().to_string()
}

fn analyse_attention(
    model: &Model,
    prompt: &Prompt,
    layers: &[usize],
    run: &mut Runner,
) -> anyhow::Result<()> {
    if prompt.ids.len() < 2 {
        bail!(
            "the prompt has {} token; attention statistics need at least 2",
            prompt.ids.len()
        );
    }
    let n_heads = model.config().n_heads();
    let group_size = model.config().kv_group_size();
    let patterns = prompt_patterns(model, &prompt.ids, layers)?;

    for (&layer, weights) in layers.iter().zip(patterns) {
        let stats = layer_stats(layer, &weights, n_heads, &prompt.ids)?;
        let labelled: Vec<String> = stats
            .iter()
            .filter_map(|s| s.label.map(|l| format!("{} {}", s.name, label_name(l))))
            .collect();
        eprintln!(
            "      layer {layer}: {}",
            if labelled.is_empty() {
                "no head with a clear label".to_string()
            } else {
                labelled.join(", ")
            }
        );

        run.summary.attention.push(LayerAttention {
            layer,
            heads: stats
                .iter()
                .map(|s| head_attention(s, group_size))
                .collect(),
            pictures: Vec::new(),
        });
        run.patterns.push(LayerPatterns {
            layer,
            n_heads,
            n_tokens: prompt.ids.len(),
            weights,
        });
    }
    Ok(())
}

fn progress_bar(length: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    let style = ProgressStyle::with_template(&format!(
        "      {{bar:40}} {{pos}}/{{len}} {what} ({{elapsed}}, about {{eta}} left)"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn draw_heads(prompt: &Prompt, run: &mut Runner) -> anyhow::Result<()> {
    let labels = position_labels(&prompt.tokens, LABEL_CHARS);
    let n = prompt.ids.len();
    let total: usize = run.patterns.iter().map(|p| p.n_heads).sum();
    let bar = progress_bar(total as u64, "pictures");

    for index in 0..run.patterns.len() {
        let layer = run.patterns[index].layer;
        let mut pictures = Vec::new();
        for head in 0..run.patterns[index].n_heads {
            let weights = &run.patterns[index].weights[head * n * n..(head + 1) * n * n];
            // Keys after the query are masked: NaN draws them grey instead of as zero weights.
            let values: Vec<f32> = (0..n * n)
                .map(|i| if i % n > i / n { f32::NAN } else { weights[i] })
                .collect();
            let picture = Heatmap::new(
                format!(
                    "Layer {layer} head {head} ({}) attention pattern",
                    head_name(layer, head)
                ),
                n,
                n,
                values,
                ColorScale::Sequential { min: 0.0, max: 1.0 },
            )
            .with_axes("query", labels.clone(), "key", labels.clone())
            .render();

            let name = format!("attention/layer{layer:02}_head{head:02}.png");
            let path = run.out().join(&name);
            std::fs::create_dir_all(path.parent().context("picture path has no folder")?)?;
            write_png(&path, &picture)?;
            run.note_file(&name);
            pictures.push(name);
            bar.inc(1);
        }
        if let Some(entry) = run.summary.attention.iter_mut().find(|a| a.layer == layer) {
            entry.pictures = pictures;
        }
    }
    bar.finish_and_clear();
    eprintln!(
        "      {total} pictures in {}",
        run.out().join("attention").display()
    );
    Ok(())
}

fn rank_heads(
    args: &Args,
    model: &Model,
    sweep_layers: &[usize],
    scored: &[u32],
    run: &mut Runner,
) -> anyhow::Result<SweepResult> {
    let config = model.config();
    let total = sweep_layers.len() * (config.n_heads() + config.n_kv_heads());
    let bar = progress_bar(total as u64, "ablations");
    let result = sweep::zero_ablation_sweep(model, scored, sweep_layers, args.sweep, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();

    let top_heads = ImportanceSummary::rank_heads(&result.heads, args.top);
    let group_size = config.kv_group_size();

    let mut rows = Vec::new();
    for (layer, row) in result.heads.iter().enumerate() {
        for (head, delta) in row.iter().enumerate() {
            if delta.is_nan() {
                continue;
            }
            rows.push(vec![
                "head".to_string(),
                layer.to_string(),
                head.to_string(),
                (head / group_size).to_string(),
                format!("{delta}"),
            ]);
        }
    }
    for (layer, row) in result.kv_groups.iter().enumerate() {
        for (group, delta) in row.iter().enumerate() {
            if delta.is_nan() {
                continue;
            }
            rows.push(vec![
                "kv_group".to_string(),
                layer.to_string(),
                String::new(),
                group.to_string(),
                format!("{delta}"),
            ]);
        }
    }
    write_csv(
        &run.out().join("importance.csv"),
        &["ablation", "layer", "head", "kv_group", "delta_loss"],
        &rows,
    )?;
    run.note_file("importance.csv");

    let flat: Vec<f32> = result.heads.iter().flatten().copied().collect();
    let picture = Heatmap::new(
        format!(
            "Loss change from zero-ablating each head (clean loss {:.3})",
            result.loss_clean
        ),
        config.n_layers(),
        config.n_heads(),
        flat.clone(),
        ColorScale::diverging_for(&flat),
    )
    .with_axes(
        "layer",
        (0..config.n_layers()).map(|l| l.to_string()).collect(),
        "head",
        (0..config.n_heads()).map(|h| h.to_string()).collect(),
    )
    .render();
    write_png(&run.out().join("importance.png"), &picture)?;
    run.note_file("importance.png");

    for score in top_heads.iter().take(5) {
        eprintln!(
            "      {} Δ loss {:+.4}",
            head_name(score.layer, score.head),
            score.delta
        );
    }
    run.summary.importance = Some(ImportanceSummary {
        metric: "loss(ablated) - loss(clean), nats".into(),
        scored_tokens: SCORED_TOKENS.into(),
        sweep: args.sweep.name().into(),
        loss_clean: result.loss_clean,
        table: result.heads.clone(),
        kv_groups: result.kv_groups.clone(),
        top_heads,
        csv: "importance.csv".into(),
        heatmap: Some("importance.png".into()),
    });
    Ok(result)
}

fn name_head(
    model: &Model,
    prompt: &Prompt,
    sweep: &SweepResult,
    run: &mut Runner,
) -> anyhow::Result<HeadRef> {
    let Some(best) = ImportanceSummary::rank_heads(&sweep.heads, 1).pop() else {
        bail!("the ablation sweep returned no heads");
    };
    if !best.delta.is_finite() {
        bail!(
            "the ablation sweep returned no finite loss change (best {})",
            best.delta
        );
    }
    let head = HeadRef {
        layer: best.layer,
        head: best.head,
    };

    let stats = match run
        .summary
        .attention
        .iter()
        .find(|a| a.layer == head.layer)
        .and_then(|a| a.heads.get(head.head))
    {
        Some(stats) => stats.clone(),
        None => {
            let pattern = prompt_patterns(model, &prompt.ids, &[head.layer])?.remove(0);
            let n = prompt.ids.len();
            let stats = head_stats(
                head.layer,
                head.head,
                &pattern[head.head * n * n..(head.head + 1) * n * n],
                &prompt.ids,
            )?;
            head_attention(&stats, model.config().kv_group_size())
        }
    };

    let role = stats.label.clone().map_or_else(
        || "no clear attention label".to_string(),
        |l| format!("a {l} head"),
    );
    eprintln!(
        "      {} (KV group {}): Δ loss {:+.4}, {role}; previous-token {:.2}, first-token {:.2}, self {:.2}, entropy {:.2} nats",
        head_name(head.layer, head.head),
        stats.kv_group,
        best.delta,
        stats.previous_token_score,
        stats.sink_score,
        stats.self_score,
        stats.entropy
    );
    run.summary.most_important_head = Some(head);
    Ok(head)
}

#[allow(clippy::too_many_arguments)]
fn patch_head(
    plan: &Plan,
    spec: PatternSpec,
    model: &Model,
    prompt: &Prompt,
    scored: &[u32],
    head: HeadRef,
    options: &GenerateOptions,
    run: &mut Runner,
) -> anyhow::Result<()> {
    let hooks = Hooks::from_interventions(vec![Intervention::replace_pattern(
        head.layer, head.head, spec,
    )]);

    let tokens = TokenBatch::single(scored);
    let loss_clean = model.forward(&tokens)?.loss(&tokens)?[0];
    let loss_patched = model
        .run_with_hooks(&tokens, hooks.clone())?
        .loss(&tokens)?[0];
    eprintln!("      loss {loss_clean:.4} → {loss_patched:.4} nats on {SCORED_TOKENS}");

    let (generation, _) = stream_generation(model, prompt, options, &hooks)?;
    let tokens = decode_each(model, &generation.ids)?;
    run.write_file("patched_generation.txt", generation.text.as_bytes())?;

    let clean = run
        .summary
        .generation
        .as_ref()
        .map(|g| g.ids.clone())
        .unwrap_or_default();
    let first_difference = first_difference(&clean, &generation.ids);
    run.summary.patch = Some(PatchSummary {
        layer: head.layer,
        head: head.head,
        pattern: plan.pattern.describe(),
        scored_tokens: SCORED_TOKENS.into(),
        loss_clean,
        loss_patched,
        ids: generation.ids,
        text: generation.text,
        tokens,
        first_difference,
    });
    Ok(())
}

/// Index of the first position where the two sequences differ, counting a length difference.
fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(index) => Some(index),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    /// `run-analysis` options as parsed from a command line.
    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn tiny_model() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/models/tiny-gqa"
        ))
    }

    /// Runs the study on the tiny GQA fixture (2 layers, 4 query heads, 2 KV heads) into `out`.
    fn run_tiny(out: &Path, extra: &[&str]) -> (anyhow::Result<()>, Runner) {
        let model = tiny_model();
        let mut argv = vec![
            "run-analysis".to_string(),
            "--model".to_string(),
            model.display().to_string(),
            "--device".to_string(),
            "cpu".to_string(),
            "--max-new-tokens".to_string(),
            "4".to_string(),
            "--greedy".to_string(),
            "--layers".to_string(),
            "all".to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let args = Command::parse_from(argv).args;

        let plan = Plan::from_args(&args).unwrap();
        let mut runner =
            Runner::new(out.to_path_buf(), xtask::report::Summary::default(), 8).unwrap();
        let result = run_steps(&args, &plan, &mut runner);
        (result, runner)
    }

    #[test]
    fn tiny_model_run_writes_every_file() {
        let dir = tempfile::tempdir().unwrap();

        let (result, runner) = run_tiny(dir.path(), &[]);

        result.unwrap();
        for file in [
            "summary.json",
            "generation.txt",
            "attention/layer00_head00.png",
            "attention/layer01_head03.png",
            "importance.csv",
            "importance.png",
            "patched_generation.txt",
        ] {
            assert!(dir.path().join(file).is_file(), "{file} is missing");
        }
        let summary = &runner.summary;
        assert_eq!(summary.steps.len(), 8);
        assert_eq!(summary.generation.as_ref().unwrap().ids.len(), 4);
        let importance = summary.importance.as_ref().unwrap();
        assert_eq!(importance.table.len(), 2);
        assert_eq!(importance.table[0].len(), 4);
        assert_eq!(importance.kv_groups[1].len(), 2);
        assert!(importance.table.iter().flatten().all(|d| d.is_finite()));
        let head = summary.most_important_head.unwrap();
        assert_eq!(importance.top_heads[0].layer, head.layer);
        assert_eq!(importance.top_heads[0].head, head.head);
        let patch = summary.patch.as_ref().unwrap();
        assert_ne!(
            patch.loss_clean, patch.loss_patched,
            "the patch changed nothing"
        );
        assert_eq!(runner.patterns.len(), 2);
    }

    /// Reads back the `summary.json` that a run left in `out`.
    fn saved_status(out: &Path) -> serde_json::Value {
        let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["status"].clone()
    }

    #[test]
    fn small_pattern_file_fails_once_the_chat_is_formatted() {
        let dir = tempfile::tempdir().unwrap();
        // A [2, 2] pattern cannot cover the prompt, so the run stops before generating.
        let pattern = dir.path().join("small.npy");
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
        let padded = format!("{header:<117}\n");
        npy.extend_from_slice(&(padded.len() as u16).to_le_bytes());
        npy.extend_from_slice(padded.as_bytes());
        for value in [1.0f32, 0.0, 0.5, 0.5] {
            npy.extend_from_slice(&value.to_le_bytes());
        }
        std::fs::write(&pattern, npy).unwrap();
        let out = dir.path().join("run");

        let (result, runner) = run_tiny(&out, &["--pattern", pattern.to_str().unwrap()]);

        let error = result.unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("stopped at step 2 of 8"), "{message}");
        assert!(message.contains("[2, 2]"), "{message}");
        assert!(out.join("report.html").is_file());
        assert!(!out.join("generation.txt").exists());
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".partial")),
            "a temporary file was left: {names:?}"
        );
        assert!(runner.summary.generation.is_none());
        assert_eq!(saved_status(&out)["state"], "stopped");
    }

    #[test]
    fn missing_layer_stops_the_run_before_the_weights_load() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");

        let (result, runner) = run_tiny(&out, &["--sweep-layers", "5"]);

        let message = format!("{:#}", result.unwrap_err());
        assert!(message.contains("stopped at step 1 of 8"), "{message}");
        assert!(
            message.contains("invalid --sweep-layers: layer 5 does not exist"),
            "{message}"
        );
        assert!(runner.summary.model.is_none());
        let status = saved_status(&out);
        assert_eq!(status["state"], "stopped", "{status}");
    }

    #[test]
    fn options_fail_before_the_run_with_the_option_named() {
        for (flag, value, expected) in [
            ("--layers", "x", "in --layers"),
            ("--sweep-layers", "3-1", "in --sweep-layers"),
        ] {
            let args = Command::parse_from(["xtask", flag, value]).args;
            let error = Plan::from_args(&args).err().expect("accepted a bad value");
            let message = format!("{error:#}");
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("0-3,23"), "{message}");
        }
    }

    #[test]
    fn pattern_choice_names() {
        assert_eq!(
            PatternChoice::parse("uniform").unwrap(),
            PatternChoice::Uniform
        );
        assert_eq!(
            PatternChoice::parse("position:3").unwrap(),
            PatternChoice::Position(3)
        );
        assert_eq!(
            PatternChoice::parse("previous").unwrap(),
            PatternChoice::PreviousToken
        );
        assert_eq!(
            PatternChoice::parse("first").unwrap(),
            PatternChoice::FirstToken
        );
        assert!(PatternChoice::parse("position:x").is_err());
        assert!(PatternChoice::parse("no-such-pattern").is_err());
    }

    #[test]
    fn first_difference_cases() {
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_difference(&[1, 2], &[1, 2, 3]), Some(2));
    }
}
