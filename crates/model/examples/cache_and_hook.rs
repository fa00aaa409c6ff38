//! Cache two activations, then zero-ablate one head and read its effect on the loss.
//!
//! Run with a model folder or hub id: `cargo run -p qwenlens-model --example cache_and_hook -- MODEL`.

use qwenlens_kernels::{Device, create_backend};
use qwenlens_model::{HookFilter, Hooks, Intervention, Model, TokenBatch};
use qwenlens_weights::ModelSource;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model_arg = std::env::args()
        .nth(1)
        .ok_or("usage: cache_and_hook MODEL (a folder or a hub id)")?;
    let backend = create_backend(Device::Auto)?;
    let model = Model::load(&ModelSource::parse(&model_arg, "main")?, backend)?;

    let tokenizer = model
        .tokenizer()
        .ok_or("this model has no tokenizer.json")?;
    let tokens = TokenBatch::single(&tokenizer.encode("The capital of France is Paris.")?);

    // Only the chosen hooks leave the device.
    let filter = HookFilter::names(["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"])?;
    let (logits, cache) = model.run_with_cache(&tokens, filter)?;
    for name in cache.names() {
        println!("{name}: {:?}", cache.get(&name).map(|t| t.shape.clone()));
    }

    // Silence query head 3 of layer 0 through its own hook_z; its KV head keeps serving the others.
    let ablated = model.run_with_hooks(
        &tokens,
        Hooks::new().with_intervention(Intervention::zero_head(0, 3)),
    )?;
    println!(
        "loss clean {:.4}, with L0H3 ablated {:.4}",
        logits.loss(&tokens)?[0],
        ablated.loss(&tokens)?[0]
    );
    Ok(())
}
