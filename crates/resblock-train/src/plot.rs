//! PNG curves of a run: `loss.png` (train and test loss) and `accuracy.png` (train and test
//! top-1), one point per epoch. Text uses the bundled DejaVu Sans Mono (assets/, with its
//! licence), so no system font library is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};
use crate::record::EpochRecord;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

pub(crate) fn ensure_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // A failure only means text is not drawn; the curves still are.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn draw(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[Series<'_>],
    epochs: usize,
) -> Result<()> {
    let fail = |e: String| Error::Checkpoint {
        path: path.display().to_string(),
        msg: e,
    };
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    let (lo, hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("plot.png");
    let tmp = path.with_file_name(format!(".tmp{}-{name}", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5..epochs as f64 + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_desc)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (label, color, points) in series.iter().filter(|s| !s.2.is_empty()) {
            let c = *color;
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|e| fail(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))
}

/// Writes `loss.png` and (for classification) `accuracy.png` into `dir`, atomically.
///
/// # Errors
/// An unwritable directory.
pub fn write_curves(history: &[EpochRecord], dir: &Path) -> Result<()> {
    ensure_font();
    let pts = |f: &dyn Fn(&EpochRecord) -> f64| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter(|r| f(r).is_finite())
            .map(|r| (r.epoch as f64, f(r)))
            .collect()
    };
    let epochs = history.last().map_or(1, |r| r.epoch);
    draw(
        &dir.join("loss.png"),
        "loss",
        "loss",
        &[
            ("train", BLUE, pts(&|r| r.train_loss)),
            ("test", RED, pts(&|r| r.test_loss)),
        ],
        epochs,
    )?;
    let train_acc = pts(&|r| 100. * r.train_acc);
    let test_acc = pts(&|r| 100. * r.test_acc);
    if !train_acc.is_empty() || !test_acc.is_empty() {
        draw(
            &dir.join("accuracy.png"),
            "top-1 accuracy",
            "accuracy (%)",
            &[("train", BLUE, train_acc), ("test", RED, test_acc)],
            epochs,
        )?;
    }
    Ok(())
}
