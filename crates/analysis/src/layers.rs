//! Layer selections as the command line spells them: `all`, or layers and ranges such as `0`,
//! `0,5` or `0-3,23`. The `qwenlens` subcommands and `cargo xtask run-analysis` share this syntax.

use crate::error::{AnalysisError, Result};

/// The syntax accepted by [`LayerSelection`], for error messages and help texts.
pub const LAYER_SYNTAX: &str = "all, or layers and ranges such as 0, 0,5 or 0-3,23";

/// A set of layers before it is checked against a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSelection {
    /// Every layer of the model.
    All,
    /// These layers, sorted and without repeats.
    List(Vec<usize>),
}

impl std::str::FromStr for LayerSelection {
    type Err = AnalysisError;

    fn from_str(text: &str) -> Result<Self> {
        if text.trim() == "all" {
            return Ok(LayerSelection::All);
        }

        let mut layers = Vec::new();
        for part in text.split(',').map(str::trim) {
            let invalid = || {
                AnalysisError::InvalidArgument(format!(
                    "invalid layers {text:?} (at {part:?}): expected {LAYER_SYNTAX}"
                ))
            };
            let number = |s: &str| s.trim().parse::<usize>().map_err(|_| invalid());
            match part.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(invalid());
                    }
                    layers.extend(first..=last);
                }
                None => layers.push(number(part)?),
            }
        }
        layers.sort_unstable();
        layers.dedup();
        Ok(LayerSelection::List(layers))
    }
}

impl LayerSelection {
    /// Lists the layers, checked against the model's `n_layers`; `flag` names the option in the
    /// error (`--layers`).
    pub fn resolve(&self, n_layers: usize, flag: &str) -> Result<Vec<usize>> {
        match self {
            LayerSelection::All => Ok((0..n_layers).collect()),
            LayerSelection::List(layers) => {
                if let Some(&bad) = layers.iter().find(|&&l| l >= n_layers) {
                    return Err(AnalysisError::InvalidArgument(format!(
                        "invalid {flag}: layer {bad} does not exist, the model has {n_layers} layers (0 to {})",
                        n_layers.saturating_sub(1)
                    )));
                }
                Ok(layers.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_lists_and_ranges() {
        assert_eq!(
            "all".parse::<LayerSelection>().unwrap(),
            LayerSelection::All
        );
        assert_eq!(
            "5, 0-2,2".parse::<LayerSelection>().unwrap(),
            LayerSelection::List(vec![0, 1, 2, 5])
        );
    }

    #[test]
    fn rejects_bad_input_and_states_the_syntax() {
        for text in ["", "x", "3-1", "1-", "-2", "all,1"] {
            let error = text.parse::<LayerSelection>().unwrap_err().to_string();
            assert!(error.contains(LAYER_SYNTAX), "{text:?}: {error}");
        }
    }

    #[test]
    fn resolve_checks_the_range() {
        let error = LayerSelection::List(vec![0, 24])
            .resolve(24, "--sweep-layers")
            .unwrap_err()
            .to_string();
        assert!(error.contains("--sweep-layers"), "{error}");
        assert!(error.contains("layer 24 does not exist"), "{error}");
        assert_eq!(LayerSelection::All.resolve(2, "--layers").unwrap(), [0, 1]);
    }
}
