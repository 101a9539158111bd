//! A run's curves: `loss.png` (train and test loss) and `accuracy.png` (train and test
//! top-1), one point per epoch.

use std::path::Path;

use plotters::style::{BLUE, RED};

use super::lines::{write_line_charts, Line, LineChart};
use crate::error::Result;
use crate::record::EpochRecord;

fn chart(title: &str, y_desc: &str, series: [(&str, Vec<(f64, f64)>); 2]) -> LineChart {
    let colors = [BLUE, RED];
    LineChart {
        title: title.into(),
        x_desc: "epoch".into(),
        y_desc: y_desc.into(),
        log_y: false,
        lines: series
            .into_iter()
            .zip(colors)
            .map(|((label, points), color)| Line {
                label: label.into(),
                color,
                dashed: false,
                points,
            })
            .collect(),
    }
}

/// Writes `loss.png` and (for classification) `accuracy.png` into `dir`, atomically.
///
/// # Errors
/// An unwritable directory.
pub fn write_curves(history: &[EpochRecord], dir: &Path) -> Result<()> {
    let pts = |f: &dyn Fn(&EpochRecord) -> f64| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter(|r| f(r).is_finite())
            .map(|r| (r.epoch as f64, f(r)))
            .collect()
    };
    write_line_charts(
        &dir.join("loss.png"),
        &[chart(
            "loss",
            "loss",
            [
                ("train", pts(&|r| r.train_loss)),
                ("test", pts(&|r| r.test_loss)),
            ],
        )],
    )?;
    let train_acc = pts(&|r| 100. * r.train_acc);
    let test_acc = pts(&|r| 100. * r.test_acc);
    if !train_acc.is_empty() || !test_acc.is_empty() {
        write_line_charts(
            &dir.join("accuracy.png"),
            &[chart(
                "top-1 accuracy",
                "accuracy (%)",
                [("train", train_acc), ("test", test_acc)],
            )],
        )?;
    }
    Ok(())
}
