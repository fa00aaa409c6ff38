//! One module per subcommand, each with its clap `Args` and a `run` function.

pub mod ablate;
pub mod activation_patch;
pub mod attention;
pub mod cache;
pub mod generate;
pub mod inspect;
pub mod logit_lens;
pub mod patch;
pub mod tokenize;
