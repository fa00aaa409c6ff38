//! Colour scales for heatmaps.

use image::Rgb;
use serde::Serialize;

/// Colour of a missing value (NaN), e.g. a masked attention entry.
pub const MISSING: Rgb<u8> = Rgb([228, 228, 228]);

/// Mapping from values to colours.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ColorScale {
    /// Dark purple at `min` through teal to yellow at `max` (viridis-like), for values with a
    /// natural zero such as attention weights.
    Sequential { min: f32, max: f32 },
    /// Blue at `−limit`, white at 0, red at `+limit`, for signed changes.
    Diverging { limit: f32 },
}

// Anchor colours of matplotlib's viridis at 0, 1/8, ..., 1 (rounded), interpolated linearly.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

// Blue, white and red of ColorBrewer's RdBu, from the negative to the positive end.
const DIVERGING: [[u8; 3]; 5] = [
    [33, 102, 172],
    [146, 197, 222],
    [247, 247, 247],
    [244, 165, 130],
    [178, 24, 43],
];

impl ColorScale {
    /// Builds a sequential scale over the finite range of `values` (0 to 1 when all are equal or missing).
    pub fn sequential_for(values: &[f32]) -> Self {
        let (min, max) = finite_range(values).unwrap_or((0.0, 1.0));
        if min == max {
            return ColorScale::Sequential {
                min,
                max: min + 1.0,
            };
        }
        ColorScale::Sequential { min, max }
    }

    /// Builds a diverging scale symmetric around zero that covers every finite value.
    pub fn diverging_for(values: &[f32]) -> Self {
        let limit = values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f32, |acc, v| acc.max(v.abs()));
        ColorScale::Diverging {
            limit: if limit > 0.0 { limit } else { 1.0 },
        }
    }

    /// Lowest and highest value of the scale.
    pub fn range(&self) -> (f32, f32) {
        match *self {
            ColorScale::Sequential { min, max } => (min, max),
            ColorScale::Diverging { limit } => (-limit, limit),
        }
    }

    /// Colour of `value`; values outside the range are clamped and NaN is light grey.
    pub fn color(&self, value: f32) -> Rgb<u8> {
        if value.is_nan() {
            return MISSING;
        }

        let (low, high) = self.range();
        let t = if high > low {
            ((value - low) / (high - low)).clamp(0.0, 1.0)
        } else {
            0.5
        };

        match self {
            ColorScale::Sequential { .. } => interpolate(&VIRIDIS, t),
            ColorScale::Diverging { .. } => interpolate(&DIVERGING, t),
        }
    }
}

fn finite_range(values: &[f32]) -> Option<(f32, f32)> {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold(None, |range, &v| match range {
            None => Some((v, v)),
            Some((low, high)) => Some((low.min(v), high.max(v))),
        })
}

fn interpolate(anchors: &[[u8; 3]], t: f32) -> Rgb<u8> {
    let position = t * (anchors.len() - 1) as f32;
    let index = (position.floor() as usize).min(anchors.len() - 2);
    let fraction = position - index as f32;

    let (a, b) = (anchors[index], anchors[index + 1]);
    let channel = |k: usize| (a[k] as f32 + (b[k] as f32 - a[k] as f32) * fraction).round() as u8;
    Rgb([channel(0), channel(1), channel(2)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverging_scale_is_white_at_zero() {
        let scale = ColorScale::Diverging { limit: 2.0 };

        assert_eq!(scale.color(0.0), Rgb([247, 247, 247]));
        assert_eq!(scale.color(-5.0), Rgb([33, 102, 172]));
        assert_eq!(scale.color(2.0), Rgb([178, 24, 43]));
    }

    #[test]
    fn sequential_scale_spans_viridis() {
        let scale = ColorScale::sequential_for(&[0.0, 0.5, 1.0, f32::NAN]);

        assert_eq!(scale.color(0.0), Rgb([68, 1, 84]));
        assert_eq!(scale.color(1.0), Rgb([253, 231, 37]));
        assert_eq!(scale.color(f32::NAN), MISSING);
    }

    #[test]
    fn constant_values_get_a_nonempty_range() {
        let (low, high) = ColorScale::sequential_for(&[3.0, 3.0]).range();

        assert!(high > low);
        assert_eq!(ColorScale::diverging_for(&[0.0]).range(), (-1.0, 1.0));
    }
}
