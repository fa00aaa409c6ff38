//! Text drawing with the embedded DejaVu Sans Mono.

use std::sync::LazyLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage};

/// DejaVu Sans Mono 2.37 (Bitstream Vera license, see `assets/DejaVuSansMono-LICENSE.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

static FONT: LazyLock<FontRef<'static>> = LazyLock::new(|| {
    // The font is compiled in and parsed by a unit test, so a failure here is a build defect.
    FontRef::try_from_slice(FONT_BYTES)
        .expect("the embedded DejaVu Sans Mono font is a valid TrueType file")
});

/// Width of `text` in pixels at a font size of `px` pixels.
pub fn text_width(text: &str, px: f32) -> u32 {
    let scaled = FONT.as_scaled(PxScale::from(px));
    let width: f32 = text
        .chars()
        .map(|c| scaled.h_advance(scaled.glyph_id(c)))
        .sum();
    width.ceil() as u32
}

/// Draws `text` with its top-left corner at `(x, y)`, blending the glyph coverage over the image.
/// Pixels that fall outside the image are skipped.
pub fn draw_text(image: &mut RgbImage, x: i32, y: i32, text: &str, px: f32, color: Rgb<u8>) {
    let scale = PxScale::from(px);
    let scaled = FONT.as_scaled(scale);
    let baseline = y as f32 + scaled.ascent();
    let mut caret = x as f32;

    for c in text.chars() {
        let id = scaled.glyph_id(c);
        let glyph = id.with_scale_and_position(scale, point(caret, baseline));
        caret += scaled.h_advance(id);

        let Some(outlined) = FONT.outline_glyph(glyph) else {
            continue;
        };
        let bounds = outlined.px_bounds();
        outlined.draw(|gx, gy, coverage| {
            let px = bounds.min.x as i32 + gx as i32;
            let py = bounds.min.y as i32 + gy as i32;
            if px < 0 || py < 0 || px >= image.width() as i32 || py >= image.height() as i32 {
                return;
            }
            let pixel = image.get_pixel_mut(px as u32, py as u32);
            for k in 0..3 {
                let blended = pixel[k] as f32 * (1.0 - coverage) + color[k] as f32 * coverage;
                pixel[k] = blended.round() as u8;
            }
        });
    }
}

/// Height of one text line in pixels at a font size of `px` pixels.
pub(crate) fn line_height(px: f32) -> u32 {
    let scaled = FONT.as_scaled(PxScale::from(px));
    (scaled.ascent() - scaled.descent()).ceil() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_draws_dark_pixels() {
        let mut image = RgbImage::from_pixel(60, 20, Rgb([255, 255, 255]));

        draw_text(&mut image, 2, 2, "L0H3 ·↵", 12.0, Rgb([0, 0, 0]));

        let dark = image.pixels().filter(|p| p[0] < 128).count();
        assert!(dark > 20, "only {dark} dark pixels");
    }

    #[test]
    fn width_grows_with_length() {
        assert!(text_width("abcd", 12.0) > text_width("ab", 12.0));
        assert!(line_height(12.0) >= 12);
    }
}
