//! PNG figures: a run's curves ([`write_curves`]), line charts of several runs side by side
//! ([`lines`]), heat maps ([`heatmap`]). Every figure is drawn into memory, encoded as PNG
//! and written with the project's one atomic writer. Text uses the bundled DejaVu Sans Mono
//! (assets/, with its licence), so no system font library is needed.

pub mod curves;
pub mod heatmap;
pub mod lines;

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};

pub use curves::write_curves;
pub use heatmap::{write_heatmaps, Heatmap};
pub use lines::{write_line_charts, Line, LineChart};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// Registers the bundled font once.
pub(crate) fn ensure_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // A failure only means text is not drawn; the figure still is.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Distinct line colours, in order of use.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A drawing area over an in-memory RGB bitmap.
pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws a `width` x `height` figure with `draw` and writes it to `path` as PNG,
/// atomically (an error leaves a previous file there untouched).
///
/// # Errors
/// A drawing error or an unwritable destination, naming `path`.
pub(crate) fn save_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> std::result::Result<(), String>,
) -> Result<()> {
    ensure_font();
    let fail = |msg: String| Error::Checkpoint {
        path: path.display().to_string(),
        msg,
    };
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        draw(&root).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| fail("the bitmap has the wrong size".into()))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))?;
    crate::checkpoint::write_atomic(path, &png)
}

/// Maps any displayable drawing error to its text.
pub(crate) fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}
