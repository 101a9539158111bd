//! Heat maps, one or more panels side by side in one PNG with a shared colour scale:
//! a value per (row, column) cell, e.g. a per-block measurement per epoch.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use super::{msg, save_png, Area};
use crate::error::{Error, Result};

/// One panel: `values[row][column]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// The caption.
    pub title: String,
    /// Row labels, top to bottom.
    pub rows: Vec<String>,
    /// Column labels, left to right.
    pub columns: Vec<String>,
    /// The columns' axis description.
    pub x_desc: String,
    /// One row of values per row label, one value per column; NaN cells are grey.
    pub values: Vec<Vec<f64>>,
}

const PANEL_WIDTH: u32 = 560;
const LEFT: i32 = 96;
const TOP: i32 = 40;
const BOTTOM: i32 = 48;
const BAR_WIDTH: u32 = 140;

/// Writes `maps` side by side into one PNG at `path`, atomically, with a colour bar for the
/// common scale (`scale_desc`, from the smallest to the largest finite value of all maps).
///
/// # Errors
/// A map whose values do not match its labels, a drawing error or an unwritable destination.
pub fn write_heatmaps(path: &Path, maps: &[Heatmap], scale_desc: &str) -> Result<()> {
    for m in maps {
        if m.values.len() != m.rows.len() || m.values.iter().any(|r| r.len() != m.columns.len()) {
            return Err(Error::config(format!(
                "heat map {:?}: {} row labels and {} column labels, but values of {} rows",
                m.title,
                m.rows.len(),
                m.columns.len(),
                m.values.len()
            )));
        }
    }
    let finite = maps
        .iter()
        .flat_map(|m| m.values.iter().flatten())
        .copied()
        .filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi {
        (0., 1.)
    } else {
        (lo, hi.max(lo + 1e-12))
    };
    let rows = maps.iter().map(|m| m.rows.len()).max().unwrap_or(1);
    let height = (TOP + BOTTOM) as u32 + (rows as u32 * 16).max(300);
    let width = PANEL_WIDTH * maps.len().max(1) as u32 + BAR_WIDTH;
    save_png(path, (width, height), |root| {
        let (panels, bar) = root.split_horizontally(width - BAR_WIDTH);
        for (area, m) in panels.split_evenly((1, maps.len().max(1))).iter().zip(maps) {
            draw(area, m, lo, hi)?;
        }
        colour_bar(&bar, lo, hi, scale_desc)
    })
}

fn colour(v: f64, lo: f64, hi: f64) -> RGBColor {
    if v.is_finite() {
        ViridisRGB::get_color_normalized(v, lo, hi)
    } else {
        RGBColor(200, 200, 200)
    }
}

fn draw(area: &Area<'_>, m: &Heatmap, lo: f64, hi: f64) -> std::result::Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    let font = ("sans-serif", 13).into_font();
    area.draw(&Text::new(
        m.title.clone(),
        (LEFT, 10),
        ("sans-serif", 18).into_font(),
    ))
    .map_err(msg)?;
    let (nr, nc) = (m.rows.len().max(1) as i32, m.columns.len().max(1) as i32);
    let cw = ((w as i32 - LEFT - 16) / nc).max(1);
    let ch = ((h as i32 - TOP - BOTTOM) / nr).max(1);
    // Label every k-th row and column so that labels do not overlap.
    let row_step = (14 / ch + 1) as usize;
    let col_step = (36 / cw + 1) as usize;
    for (r, row) in m.values.iter().enumerate() {
        let y = TOP + ch * r as i32;
        if r % row_step == 0 {
            area.draw(&Text::new(
                m.rows[r].clone(),
                (6, y + ch / 2 - 6),
                font.clone(),
            ))
            .map_err(msg)?;
        }
        for (c, &v) in row.iter().enumerate() {
            let x = LEFT + cw * c as i32;
            area.draw(&Rectangle::new(
                [(x, y), (x + cw, y + ch)],
                colour(v, lo, hi).filled(),
            ))
            .map_err(msg)?;
        }
    }
    let y = TOP + ch * nr + 4;
    for (c, label) in m.columns.iter().enumerate() {
        if c % col_step == 0 {
            let x = LEFT + cw * c as i32 + cw / 2 - 4;
            area.draw(&Text::new(label.clone(), (x, y), font.clone()))
                .map_err(msg)?;
        }
    }
    area.draw(&Text::new(
        m.x_desc.clone(),
        (LEFT + cw * nc / 2 - 20, y + 20),
        font,
    ))
    .map_err(msg)
}

fn colour_bar(area: &Area<'_>, lo: f64, hi: f64, desc: &str) -> std::result::Result<(), String> {
    let font = ("sans-serif", 13).into_font();
    let (top, bottom) = (TOP, TOP + 240);
    let steps = 120;
    for i in 0..steps {
        let v = hi - (hi - lo) * f64::from(i) / f64::from(steps - 1);
        let y = top + (bottom - top) * i / steps;
        area.draw(&Rectangle::new(
            [(10, y), (34, y + (bottom - top) / steps + 1)],
            colour(v, lo, hi).filled(),
        ))
        .map_err(msg)?;
    }
    area.draw(&Text::new(format!("{hi:.3}"), (40, top - 4), font.clone()))
        .map_err(msg)?;
    area.draw(&Text::new(
        format!("{lo:.3}"),
        (40, bottom - 10),
        font.clone(),
    ))
    .map_err(msg)?;
    area.draw(&Text::new(desc.to_string(), (4, bottom + 12), font))
        .map_err(msg)
}
