//! Line charts, one or more panels side by side in one PNG: several runs' curves (solid or
//! dashed, a colour each), on a linear or logarithmic y axis.

use std::ops::Range;
use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::{msg, save_png, Area};
use crate::error::Result;

/// One curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Its legend entry.
    pub label: String,
    /// Its colour (see [`super::PALETTE`]).
    pub color: RGBColor,
    /// Dashed instead of solid.
    pub dashed: bool,
    /// (x, y) points in order; non-finite ones (and non-positive ones on a log axis) are
    /// left out.
    pub points: Vec<(f64, f64)>,
}

/// One panel.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    /// The caption.
    pub title: String,
    /// The x axis' description.
    pub x_desc: String,
    /// The y axis' description.
    pub y_desc: String,
    /// A logarithmic y axis.
    pub log_y: bool,
    /// The curves.
    pub lines: Vec<Line>,
}

impl LineChart {
    /// The points each line actually draws (finite; positive on a log axis).
    pub fn drawn_points(&self, line: &Line) -> Vec<(f64, f64)> {
        line.points
            .iter()
            .copied()
            .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || y > 0.))
            .collect()
    }
}

/// Panel size in pixels.
const PANEL: (u32, u32) = (640, 480);

/// Writes `charts` side by side into one PNG at `path`, atomically.
///
/// # Errors
/// A drawing error or an unwritable destination.
pub fn write_line_charts(path: &Path, charts: &[LineChart]) -> Result<()> {
    let n = charts.len().max(1);
    save_png(path, (PANEL.0 * n as u32, PANEL.1), |root| {
        for (area, chart) in root.split_evenly((1, n)).iter().zip(charts) {
            draw(area, chart)?;
        }
        Ok(())
    })
}

fn draw(area: &Area<'_>, chart: &LineChart) -> std::result::Result<(), String> {
    let pts: Vec<(f64, f64)> = chart
        .lines
        .iter()
        .flat_map(|l| chart.drawn_points(l))
        .collect();
    if pts.is_empty() {
        return area
            .titled(&chart.title, ("sans-serif", 20))
            .map(|_| ())
            .map_err(msg);
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let xpad = ((x1 - x0) * 0.03).max(0.5);
    let x = (x0 - xpad)..(x1 + xpad);
    let fy = |y: f64| {
        let (a, b, v) = if chart.log_y {
            (y0.ln(), y1.ln(), y.ln())
        } else {
            (y0, y1, y)
        };
        (v - a) / (b - a).max(1e-300)
    };
    let fx = |v: f64| (v - x0) / (x1 - x0).max(1e-300);
    let legend = legend_corner(pts.iter().map(|&(x, y)| (fx(x), fy(y))));
    if chart.log_y {
        plot(area, chart, x, ((y0 / 1.5)..(y1 * 1.5)).log_scale(), legend)
    } else {
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        plot(area, chart, x, (y0 - pad)..(y1 + pad), legend)
    }
}

fn plot<Y>(
    area: &Area<'_>,
    chart: &LineChart,
    x: Range<f64>,
    y: Y,
    legend: SeriesLabelPosition,
) -> std::result::Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut c = ChartBuilder::on(area)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(msg)?;
    let log = chart.log_y;
    // Whole-number x data (epochs, layer numbers): label whole numbers only.
    let whole = chart
        .lines
        .iter()
        .flat_map(|l| &l.points)
        .all(|p| p.0.fract() == 0.);
    c.configure_mesh()
        .max_light_lines(if log { 1 } else { 4 })
        .y_labels(8)
        .x_label_formatter(&|v| {
            if whole && v.fract() != 0. {
                String::new()
            } else {
                tick(*v, false)
            }
        })
        .y_label_formatter(&|v| tick(*v, log))
        .x_desc(chart.x_desc.as_str())
        .y_desc(chart.y_desc.as_str())
        .draw()
        .map_err(msg)?;
    for line in &chart.lines {
        let points = chart.drawn_points(line);
        if points.is_empty() {
            continue;
        }
        let color = line.color;
        let style = color.stroke_width(2);
        let anno = if line.dashed {
            c.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))
                .map_err(msg)?
        } else {
            c.draw_series(LineSeries::new(points.clone(), style))
                .map_err(msg)?
        };
        let anno = anno.label(line.label.as_str());
        if line.dashed {
            anno.legend(move |(x, y)| {
                plotters::element::DashedPathElement::new(
                    vec![(x, y), (x + 22, y)],
                    6,
                    4,
                    color.stroke_width(2),
                )
            });
        } else {
            anno.legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
            });
        }
        if points.len() <= 40 {
            c.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(msg)?;
        }
    }
    c.configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(msg)?;
    Ok(())
}

/// An axis label: `1e-5` on a log axis, whole numbers without decimals, else 1-3 decimals.
fn tick(v: f64, log: bool) -> String {
    let a = v.abs();
    if log {
        format!("{v:.0e}")
    } else if v.fract() == 0. || a >= 100. {
        format!("{v:.0}")
    } else if a >= 1. {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The corner of the plot (points given as fractions of the data's range) that the fewest
/// points fall into: where the legend hides the least.
fn legend_corner(points: impl Iterator<Item = (f64, f64)>) -> SeriesLabelPosition {
    use SeriesLabelPosition::{LowerLeft, LowerRight, UpperLeft, UpperRight};
    let mut counts = [0usize; 4];
    for (x, y) in points {
        let right = x > 0.5;
        let (upper, lower) = (y > 0.6, y < 0.4);
        for (i, hit) in [
            right && upper,
            right && lower,
            !right && upper,
            !right && lower,
        ]
        .into_iter()
        .enumerate()
        {
            counts[i] += usize::from(hit);
        }
    }
    let corners = [UpperRight, LowerRight, UpperLeft, LowerLeft];
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    corners.into_iter().nth(best).unwrap_or(UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legend_goes_where_the_curves_are_not() {
        // Accuracy-like curves: high on the right.
        let high = (0..10).map(|i| (f64::from(i) / 9., 0.7 + 0.03 * f64::from(i)));
        assert!(matches!(
            legend_corner(high),
            SeriesLabelPosition::LowerRight
        ));
        // Loss-like curves: low on the right.
        let low = (0..10).map(|i| (f64::from(i) / 9., 1. - f64::from(i) / 9.));
        assert!(matches!(
            legend_corner(low),
            SeriesLabelPosition::UpperRight
        ));
    }
}
