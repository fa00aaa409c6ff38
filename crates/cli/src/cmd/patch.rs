//! `qwenlens patch`: replace one head's attention pattern and compare the loss and a continuation
//! with the clean model.

use std::path::PathBuf;

use anyhow::Context;
use qwenlens_analysis::output::write_json;
use qwenlens_analysis::patching::{
    Continuations, PatchSummary, PatternChoice, check_generation_length, check_heads,
    patch_patterns, pattern_hooks, warn_position_beyond_prompt,
};
use qwenlens_model::{Hooks, Sampling};

use crate::common::{ModelArgs, PromptArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    /// Layer of the patched head.
    #[arg(long)]
    pub layer: usize,

    /// Query head whose pattern is replaced.
    #[arg(long)]
    pub head: usize,

    /// Replacement pattern: uniform (causal), previous (token i−1, and position 0 attends to
    /// itself), first (token 0), self, position:P (token P, or itself before P), or a .npy or
    /// .safetensors file. The file contains one [k, k] float32 array that covers the prompt and the
    /// new tokens, and its rows are used as given, not renormalized.
    #[arg(long, value_name = "PATTERN")]
    pub pattern: String,

    /// New tokens generated with and without the patch; 0 skips generation.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub max_new_tokens: usize,

    /// Take the most likely token at every step instead of sampling with generation_config.json's
    /// settings (both runs share one seed when sampling).
    #[arg(long)]
    pub greedy: bool,

    /// Output folder for patch.json (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let choice: PatternChoice = args.pattern.parse()?;
    qwenlens_analysis::output::check_output_dir(&args.out)?;
    let model = crate::common::load_model(&args.model)?;
    let tokens = crate::common::prompt_ids(&model, &args.prompt)?;
    let heads = [(args.layer, args.head)];
    check_heads(&model, &heads)?;
    check_generation_length(&model, tokens.len(), args.max_new_tokens)?;
    warn_position_beyond_prompt(&choice, tokens.len());

    let spec = choice.to_spec(tokens.len() + args.max_new_tokens)?;
    let outcome = patch_patterns(&model, &tokens, &heads, &spec)?;
    let mut summary = PatchSummary::new(&heads, &choice, &outcome);

    println!(
        "patched L{}H{} with the {choice} pattern",
        args.layer, args.head
    );
    if tokens.len() >= 2 {
        println!(
            "loss on the prompt: clean {:.5}, patched {:.5}, change {:+.5}",
            outcome.clean_loss,
            outcome.patched_loss,
            outcome.loss_delta()
        );
    } else {
        println!("the prompt has one token, so it has no next-token loss");
    }
    println!(
        "KL divergence of the last position from the clean run: {:.6}",
        outcome.last_kl()
    );

    if args.max_new_tokens > 0 {
        let mut options = model.default_generate_options();
        options.max_new_tokens = args.max_new_tokens;
        if args.greedy {
            options.sampling = Sampling::greedy();
        } else if options.sampling.seed.is_none() {
            // One seed for both runs, so the continuations differ only through the patch.
            options.sampling.seed = Some(0);
        }

        let clean = model
            .generate(&tokens, &options, &Hooks::new(), |_, _| {})
            .context("generating the clean continuation")?;
        let patched = model
            .generate(&tokens, &options, &pattern_hooks(&heads, &spec), |_, _| {})
            .context("generating the patched continuation")?;

        println!("clean continuation:   {:?}", clean.text);
        println!("patched continuation: {:?}", patched.text);
        summary.continuations = Some(Continuations {
            max_new_tokens: args.max_new_tokens,
            greedy: !options.sampling.do_sample,
            clean_ids: clean.ids,
            clean_text: clean.text,
            patched_ids: patched.ids,
            patched_text: patched.text,
        });
    }

    let path = args.out.join("patch.json");
    write_json(&path, &summary)?;
    println!("wrote {}", path.display());
    Ok(())
}
