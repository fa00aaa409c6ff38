//! Pictures: heatmaps with axis labels, a title and a colour scale, and grids of heatmaps, drawn
//! into `image` buffers with text rendered by `ab_glyph` from an embedded DejaVu Sans Mono.

mod color;
mod heatmap;
mod text;

pub use color::ColorScale;
pub use heatmap::{Heatmap, render_grid};
pub use text::{draw_text, text_width};
