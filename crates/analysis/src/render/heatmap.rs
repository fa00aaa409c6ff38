//! Heatmaps: a matrix of coloured cells with a title, row and column labels, axis names and a
//! colour bar.

use image::{Rgb, RgbImage, imageops};

use super::color::ColorScale;
use super::text::{draw_text, line_height, text_width};

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const GRID_LINE: Rgb<u8> = Rgb([255, 255, 255]);
const MARGIN: u32 = 12;
const TITLE_PX: f32 = 16.0;
const LABEL_PX: f32 = 11.0;
const AXIS_PX: f32 = 12.0;
const BAR_WIDTH: u32 = 16;
const BAR_TICKS: usize = 5;

/// A `[rows, cols]` matrix to draw. NaN cells are drawn light grey (e.g. masked attention entries).
#[derive(Clone, Debug)]
pub struct Heatmap {
    pub title: String,
    pub rows: usize,
    pub cols: usize,
    /// Row-major values, `rows * cols` of them.
    pub values: Vec<f32>,
    /// One label per row, drawn left of the cells.
    pub row_labels: Vec<String>,
    /// One label per column, drawn below the cells and rotated to read upwards.
    pub col_labels: Vec<String>,
    /// Name of the row axis (e.g. `query`), drawn rotated at the left edge.
    pub row_axis: String,
    /// Name of the column axis (e.g. `key`), drawn under the column labels.
    pub col_axis: String,
    pub scale: ColorScale,
    /// Side of one cell in pixels; `None` picks one that keeps the matrix near 640 pixels.
    pub cell_size: Option<u32>,
}

impl Heatmap {
    /// Creates a heatmap with numbered row and column labels and no axis names.
    pub fn new(
        title: impl Into<String>,
        rows: usize,
        cols: usize,
        values: Vec<f32>,
        scale: ColorScale,
    ) -> Self {
        Heatmap {
            title: title.into(),
            rows,
            cols,
            values,
            row_labels: (0..rows).map(|i| i.to_string()).collect(),
            col_labels: (0..cols).map(|j| j.to_string()).collect(),
            row_axis: String::new(),
            col_axis: String::new(),
            scale,
            cell_size: None,
        }
    }

    /// Sets the labels and names of both axes.
    pub fn with_axes(
        mut self,
        row_axis: impl Into<String>,
        row_labels: Vec<String>,
        col_axis: impl Into<String>,
        col_labels: Vec<String>,
    ) -> Self {
        self.row_axis = row_axis.into();
        self.row_labels = row_labels;
        self.col_axis = col_axis.into();
        self.col_labels = col_labels;
        self
    }

    /// Sets the side of one cell in pixels.
    pub fn with_cell_size(mut self, cell_size: u32) -> Self {
        self.cell_size = Some(cell_size);
        self
    }

    /// Draws the heatmap.
    ///
    /// # Panics
    /// If `values`, `row_labels` or `col_labels` do not match `rows` and `cols`, a caller bug.
    pub fn render(&self) -> RgbImage {
        assert_eq!(
            self.values.len(),
            self.rows * self.cols,
            "heatmap values do not match its shape"
        );
        assert_eq!(self.row_labels.len(), self.rows, "one row label per row");
        assert_eq!(
            self.col_labels.len(),
            self.cols,
            "one column label per column"
        );

        let cell = self
            .cell_size
            .unwrap_or_else(|| (640 / self.rows.max(self.cols).max(1) as u32).clamp(3, 40));
        let label_line = line_height(LABEL_PX);
        // Label every k-th row or column when the cells are smaller than a line of text.
        let label_step = label_line.div_ceil(cell).max(1) as usize;

        let row_label_width = self
            .row_labels
            .iter()
            .map(|l| text_width(l, LABEL_PX))
            .max()
            .unwrap_or(0);
        let col_label_height = self
            .col_labels
            .iter()
            .map(|l| text_width(l, LABEL_PX))
            .max()
            .unwrap_or(0);
        let title_height = if self.title.is_empty() {
            0
        } else {
            line_height(TITLE_PX) + 8
        };
        let axis_line = line_height(AXIS_PX);
        let row_axis_width = if self.row_axis.is_empty() {
            0
        } else {
            axis_line + 6
        };
        let col_axis_height = if self.col_axis.is_empty() {
            0
        } else {
            axis_line + 6
        };

        let tick_labels: Vec<String> = (0..BAR_TICKS)
            .map(|k| {
                let (low, high) = self.scale.range();
                format_tick(high - (high - low) * k as f32 / (BAR_TICKS - 1) as f32)
            })
            .collect();
        let tick_width = tick_labels
            .iter()
            .map(|l| text_width(l, LABEL_PX))
            .max()
            .unwrap_or(0);

        let grid_width = cell * self.cols as u32;
        let grid_height = cell * self.rows as u32;
        let bar_height = grid_height.max(5 * label_line);

        let grid_x = MARGIN + row_axis_width + row_label_width + 4;
        let grid_y = MARGIN + title_height;
        let bar_x = grid_x + grid_width + 14;
        let width = bar_x + BAR_WIDTH + 6 + tick_width + MARGIN;
        let title_width = MARGIN * 2 + text_width(&self.title, TITLE_PX);
        let width = width.max(title_width);
        let height =
            grid_y + bar_height.max(grid_height + 4 + col_label_height + col_axis_height) + MARGIN;

        let mut image = RgbImage::from_pixel(width, height, BACKGROUND);

        draw_text(
            &mut image,
            MARGIN as i32,
            MARGIN as i32,
            &self.title,
            TITLE_PX,
            INK,
        );
        self.draw_cells(&mut image, grid_x, grid_y, cell);
        self.draw_row_labels(&mut image, grid_x, grid_y, cell, label_step);
        self.draw_col_labels(
            &mut image,
            grid_x,
            grid_y + grid_height + 4,
            cell,
            label_step,
        );

        if !self.row_axis.is_empty() {
            let label = rotated_text(&self.row_axis, AXIS_PX);
            let y = grid_y as i64 + (grid_height as i64 - label.height() as i64) / 2;
            imageops::overlay(&mut image, &label, MARGIN as i64, y.max(grid_y as i64));
        }
        if !self.col_axis.is_empty() {
            let x = grid_x as i64
                + (grid_width as i64 - text_width(&self.col_axis, AXIS_PX) as i64) / 2;
            let y = grid_y + grid_height + 4 + col_label_height + 4;
            draw_text(
                &mut image,
                x.max(0) as i32,
                y as i32,
                &self.col_axis,
                AXIS_PX,
                INK,
            );
        }

        self.draw_color_bar(&mut image, bar_x, grid_y, bar_height, &tick_labels);
        image
    }

    fn draw_cells(&self, image: &mut RgbImage, x0: u32, y0: u32, cell: u32) {
        // Cells of 6 pixels or more get a one-pixel white gap, which keeps neighbours apart.
        let gap = u32::from(cell >= 6);
        for row in 0..self.rows {
            for col in 0..self.cols {
                let color = self.scale.color(self.values[row * self.cols + col]);
                let x = x0 + col as u32 * cell;
                let y = y0 + row as u32 * cell;
                for dy in 0..cell - gap {
                    for dx in 0..cell - gap {
                        image.put_pixel(x + dx, y + dy, color);
                    }
                }
                if gap == 1 {
                    for d in 0..cell {
                        image.put_pixel(x + cell - 1, y + d, GRID_LINE);
                        image.put_pixel(x + d, y + cell - 1, GRID_LINE);
                    }
                }
            }
        }
    }

    fn draw_row_labels(
        &self,
        image: &mut RgbImage,
        grid_x: u32,
        grid_y: u32,
        cell: u32,
        step: usize,
    ) {
        let line = line_height(LABEL_PX) as i32;
        for (row, label) in self.row_labels.iter().enumerate().step_by(step) {
            let x = grid_x as i32 - 4 - text_width(label, LABEL_PX) as i32;
            let y = grid_y as i32 + row as i32 * cell as i32 + (cell as i32 - line) / 2;
            draw_text(image, x, y, label, LABEL_PX, INK);
        }
    }

    fn draw_col_labels(&self, image: &mut RgbImage, grid_x: u32, top: u32, cell: u32, step: usize) {
        for (col, label) in self.col_labels.iter().enumerate().step_by(step) {
            let rotated = rotated_text(label, LABEL_PX);
            let x = grid_x as i64
                + col as i64 * cell as i64
                + (cell as i64 - rotated.width() as i64) / 2;
            // The rotated text ends at its top edge, so every label ends right under the matrix.
            imageops::overlay(image, &rotated, x, top as i64);
        }
    }

    fn draw_color_bar(&self, image: &mut RgbImage, x: u32, y: u32, height: u32, ticks: &[String]) {
        let (low, high) = self.scale.range();
        for dy in 0..height {
            let value = high - (high - low) * dy as f32 / (height - 1).max(1) as f32;
            let color = self.scale.color(value);
            for dx in 0..BAR_WIDTH {
                image.put_pixel(x + dx, y + dy, color);
            }
        }

        let line = line_height(LABEL_PX) as i32;
        for (k, tick) in ticks.iter().enumerate() {
            let tick_y =
                y as i32 + ((height - 1) as f32 * k as f32 / (ticks.len() - 1) as f32) as i32;
            for dx in 0..4 {
                image.put_pixel(x + BAR_WIDTH + dx, tick_y as u32, INK);
            }
            let text_y =
                (tick_y - line / 2).clamp(y as i32 - line / 2, (y + height) as i32 - line / 2);
            draw_text(
                image,
                (x + BAR_WIDTH + 6) as i32,
                text_y,
                tick,
                LABEL_PX,
                INK,
            );
        }
    }
}

/// Lays panels out in rows of `columns` under a title, each panel top-left aligned in its slot.
pub fn render_grid(title: &str, panels: &[RgbImage], columns: usize) -> RgbImage {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns);
    let slot_width = panels.iter().map(RgbImage::width).max().unwrap_or(1);
    let slot_height = panels.iter().map(RgbImage::height).max().unwrap_or(1);
    let title_height = line_height(TITLE_PX + 4.0) + 12;

    let width = (slot_width * columns as u32 + MARGIN * 2)
        .max(text_width(title, TITLE_PX + 4.0) + MARGIN * 2);
    let height = title_height + slot_height * rows as u32 + MARGIN * 2;
    let mut image = RgbImage::from_pixel(width, height, BACKGROUND);

    draw_text(
        &mut image,
        MARGIN as i32,
        MARGIN as i32,
        title,
        TITLE_PX + 4.0,
        INK,
    );
    for (i, panel) in panels.iter().enumerate() {
        let x = MARGIN + (i % columns) as u32 * slot_width;
        let y = MARGIN + title_height + (i / columns) as u32 * slot_height;
        imageops::overlay(&mut image, panel, x as i64, y as i64);
    }
    image
}

/// `text` drawn on a white tile and turned 90° counter-clockwise, so it reads upwards.
fn rotated_text(text: &str, px: f32) -> RgbImage {
    let width = text_width(text, px).max(1);
    let height = line_height(px);
    let mut tile = RgbImage::from_pixel(width, height, BACKGROUND);
    draw_text(&mut tile, 0, 0, text, px, INK);
    imageops::rotate270(&tile)
}

fn format_tick(value: f32) -> String {
    let magnitude = value.abs();
    if value == 0.0 {
        "0".to_string()
    } else if !(0.01..1000.0).contains(&magnitude) {
        format!("{value:.1e}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct_colors(image: &RgbImage) -> usize {
        let mut colors: Vec<[u8; 3]> = image.pixels().map(|p| p.0).collect();
        colors.sort_unstable();
        colors.dedup();
        colors.len()
    }

    #[test]
    fn heatmap_has_cells_labels_and_bar() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let heatmap = Heatmap::new(
            "L0H3",
            3,
            4,
            values,
            ColorScale::Sequential {
                min: 0.0,
                max: 11.0,
            },
        )
        .with_axes(
            "query",
            vec!["a".into(), "b".into(), "c".into()],
            "key",
            vec!["w".into(), "x".into(), "y".into(), "z".into()],
        )
        .with_cell_size(20);

        let image = heatmap.render();

        assert!(
            image.width() > 80 && image.height() > 60,
            "{}x{}",
            image.width(),
            image.height()
        );
        assert!(distinct_colors(&image) > 20);
        let yellow = image.pixels().filter(|p| p.0 == [253, 231, 37]).count();
        assert!(
            yellow >= 19 * 19,
            "the largest cell is drawn in the top colour ({yellow} pixels)"
        );
    }

    #[test]
    fn tiny_cells_still_render() {
        let heatmap = Heatmap::new(
            "big",
            300,
            300,
            vec![0.5; 300 * 300],
            ColorScale::Diverging { limit: 1.0 },
        );

        let image = heatmap.render();

        assert!(image.width() >= 900);
    }

    #[test]
    fn grid_places_every_panel() {
        let panel = RgbImage::from_pixel(30, 20, Rgb([0, 0, 0]));

        let grid = render_grid("layer 0", &[panel.clone(), panel.clone(), panel], 2);

        let black = grid.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert_eq!(black, 3 * 30 * 20);
    }

    #[test]
    fn ticks_are_compact() {
        assert_eq!(format_tick(0.5), "0.500");
        assert_eq!(format_tick(-12.34), "-12.3");
        assert_eq!(format_tick(0.0001), "1.0e-4");
        assert_eq!(format_tick(0.0), "0");
    }
}
