//! How the programs show a [`Trainer`](resblock_train::Trainer)'s progress: a bar per epoch
//! on a terminal (stderr) and one line per epoch on stdout, prefixed with the run's name
//! when a program trains several.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use resblock_train::record::format_record;
use resblock_train::Progress;

/// A progress callback for [`resblock_train::Trainer::on_progress`].
pub fn terminal() -> impl FnMut(&Progress<'_>) {
    labelled("")
}

/// As [`terminal`], with every bar and line prefixed by `label` (none when empty).
pub fn labelled(label: &str) -> impl FnMut(&Progress<'_>) {
    let prefix = if label.is_empty() {
        String::new()
    } else {
        format!("{label} ")
    };
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    move |p| match *p {
        Progress::Step {
            epoch,
            epochs,
            step,
            steps,
            loss,
            acc,
            images_per_sec,
        } if tty && !crate::distributed::quiet() => {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(steps as u64);
                let style = ProgressStyle::with_template(&format!(
                    "{prefix}epoch {epoch}/{epochs} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                b.set_style(style);
                b
            });
            b.set_position(step as u64);
            let acc = if acc.is_finite() {
                format!(" acc {:.2}%", 100. * acc)
            } else {
                String::new()
            };
            b.set_message(format!("loss {loss:.4}{acc} {images_per_sec:.0} img/s"));
        }
        Progress::Step { .. } => {}
        Progress::Epoch { record, epochs } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            crate::say!("{prefix}{}", format_record(record, epochs));
        }
    }
}
