//! A classifier's confusion matrix: accuracy, per-class precision and recall, a printed
//! table and a PNG heat map (`evaluate`).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Counts of (true class, predicted class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    /// `counts[t][p]`: samples of true class `t` predicted as `p`.
    pub counts: Vec<Vec<u64>>,
}

/// Precision, recall and support of one class.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClassStats {
    /// Of the samples predicted as this class, the fraction that are (0 when none is).
    pub precision: f64,
    /// Of the samples of this class, the fraction predicted as it (0 when there are none).
    pub recall: f64,
    /// Samples of this class.
    pub support: u64,
}

impl ConfusionMatrix {
    /// An empty matrix for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            counts: vec![vec![0; classes]; classes],
        }
    }

    /// Counts one prediction.
    ///
    /// # Errors
    /// A class index out of range.
    pub fn add(&mut self, truth: usize, predicted: usize) -> Result<()> {
        let n = self.counts.len();
        if truth >= n || predicted >= n {
            return Err(Error::config(format!(
                "class {truth} or {predicted} is out of range for {n} classes"
            )));
        }
        self.counts[truth][predicted] += 1;
        Ok(())
    }

    /// All counted samples.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Fraction of samples on the diagonal (0 when empty).
    pub fn accuracy(&self) -> f64 {
        let hits: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        hits as f64 / self.total().max(1) as f64
    }

    /// Per-class precision, recall and support, in class order.
    pub fn per_class(&self) -> Vec<ClassStats> {
        let n = self.counts.len();
        (0..n)
            .map(|c| {
                let tp = self.counts[c][c] as f64;
                let support: u64 = self.counts[c].iter().sum();
                let predicted: u64 = (0..n).map(|t| self.counts[t][c]).sum();
                ClassStats {
                    precision: if predicted > 0 {
                        tp / predicted as f64
                    } else {
                        0.
                    },
                    recall: if support > 0 { tp / support as f64 } else { 0. },
                    support,
                }
            })
            .collect()
    }

    /// The matrix as a text table (rows: true class, columns: predicted), names cut to 12
    /// characters.
    pub fn table(&self, names: &[String]) -> String {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let width = self
            .counts
            .iter()
            .flatten()
            .map(|c| c.to_string().len())
            .max()
            .unwrap_or(1)
            .max(3);
        let label_w = names
            .iter()
            .map(|n| short(n).len())
            .max()
            .unwrap_or(4)
            .max(10);
        let mut out = format!("{:>label_w$} ", "true\\pred");
        for i in 0..self.counts.len() {
            out.push_str(&format!(" {:>width$}", i));
        }
        out.push('\n');
        for (t, row) in self.counts.iter().enumerate() {
            let name = names.get(t).map_or_else(|| t.to_string(), |n| short(n));
            out.push_str(&format!("{name:>label_w$} "));
            for c in row {
                out.push_str(&format!(" {c:>width$}"));
            }
            out.push('\n');
        }
        out
    }

    /// Draws the matrix as a heat map (rows true, columns predicted, each cell shaded by its
    /// share of its row, with its count) into `path`, atomically.
    ///
    /// # Errors
    /// An unwritable destination.
    pub fn save_png(&self, names: &[String], path: &Path) -> Result<()> {
        let n = self.counts.len().max(1);
        let cell = (720 / n).clamp(4, 60) as i32;
        let margin = 150;
        let size = (margin + cell * n as i32 + 20) as u32;
        crate::plot::save_png(path, (size, size), |root| {
            let fail = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
            let font = ("sans-serif", (cell / 3).clamp(8, 16)).into_font();
            root.draw(&Text::new(
                "rows: true class, columns: predicted",
                (10, 10),
                ("sans-serif", 16).into_font(),
            ))
            .map_err(fail)?;
            for (t, row) in self.counts.iter().enumerate() {
                let total = row.iter().sum::<u64>().max(1) as f64;
                let y = margin + cell * t as i32;
                if n <= 40 {
                    let label: String = names
                        .get(t)
                        .map_or_else(|| t.to_string(), |s| s.chars().take(14).collect());
                    root.draw(&Text::new(label.clone(), (10, y + cell / 3), font.clone()))
                        .map_err(fail)?;
                    let x = margin + cell * t as i32;
                    root.draw(&Text::new(label, (x + 2, margin - 24), font.clone()))
                        .map_err(fail)?;
                }
                for (p, &c) in row.iter().enumerate() {
                    let share = c as f64 / total;
                    let shade = (255. * (1. - share)) as u8;
                    let x = margin + cell * p as i32;
                    let color = if t == p {
                        RGBColor(shade, 255, shade)
                    } else {
                        RGBColor(255, shade, shade)
                    };
                    root.draw(&Rectangle::new(
                        [(x, y), (x + cell, y + cell)],
                        color.filled(),
                    ))
                    .map_err(fail)?;
                    if cell >= 24 && c > 0 {
                        root.draw(&Text::new(
                            c.to_string(),
                            (x + 3, y + cell / 3),
                            font.clone(),
                        ))
                        .map_err(fail)?;
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_recall_and_accuracy_by_hand() -> Result<()> {
        // truth 0: predicted 0, 0, 1; truth 1: predicted 1; truth 2: predicted 0.
        let mut m = ConfusionMatrix::new(3);
        for (t, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (2, 0)] {
            m.add(t, p)?;
        }
        assert_eq!(m.total(), 5);
        assert!((m.accuracy() - 0.6).abs() < 1e-12);
        let s = m.per_class();
        assert!((s[0].precision - 2. / 3.).abs() < 1e-12);
        assert!((s[0].recall - 2. / 3.).abs() < 1e-12);
        assert_eq!((s[1].precision, s[1].recall, s[1].support), (0.5, 1., 1));
        assert_eq!((s[2].precision, s[2].recall), (0., 0.));
        assert!(m.add(3, 0).is_err());
        assert!(m
            .table(&["a".into(), "b".into(), "c".into()])
            .contains("true\\pred"));
        Ok(())
    }
}
