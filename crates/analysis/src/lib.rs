//! Analysis routines on top of `qwenlens-model`: attention-pattern statistics, head ablation
//! (per query head or per KV group), attention-pattern patching, activation patching between a
//! clean and a corrupted prompt, the logit lens and direct logit attribution, and the pictures and
//! files that report them.
//!
//! The pieces that need no model (metrics over logit vectors, pattern statistics, heatmaps,
//! output files) work on plain slices, so they can be tested and reused on their own.

pub mod ablation;
pub mod activation_patching;
pub mod attention;
pub mod attention_report;
pub mod error;
pub mod layers;
pub mod logit_lens;
pub mod metrics;
pub mod output;
pub mod patching;
pub mod pattern_file;
pub mod render;
pub mod tokens;

pub use error::{AnalysisError, Result};
