//! Figures: line charts and heat maps are real PNGs with the data's colours, written
//! atomically; bad input is an error.

use anyhow::Result;
use plotters::style::colors::colormaps::ViridisRGB;
use plotters::style::RGBColor;
use resblock_train::plot::{write_heatmaps, write_line_charts, Heatmap, Line, LineChart, PALETTE};

fn pixels_of(path: &std::path::Path, c: RGBColor) -> Result<usize> {
    let img = image::open(path)?.to_rgb8();
    Ok(img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count())
}

#[test]
fn line_charts_draw_every_curve_dashed_or_solid_on_a_log_axis() -> Result<()> {
    let dir = resblock_testing::scratch_dir!("plot-tests", "lines");
    let path = dir.join("lines.png");
    let line = |i: usize, dashed: bool, k: f64| Line {
        label: format!("line {i}"),
        color: PALETTE[i],
        dashed,
        points: (1..=10)
            .map(|x| (f64::from(x), k * f64::from(x).powi(3)))
            .collect(),
    };
    let charts = [
        LineChart {
            title: "linear".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            log_y: false,
            lines: vec![line(0, false, 1.), line(1, true, 2.)],
        },
        LineChart {
            title: "log".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            log_y: true,
            lines: vec![line(2, false, 1e-6), line(3, true, 1.)],
        },
    ];
    write_line_charts(&path, &charts)?;
    let img = image::open(&path)?;
    assert_eq!((img.width(), img.height()), (1280, 480));
    for c in &PALETTE[..4] {
        assert!(pixels_of(&path, *c)? > 50, "colour {c:?} is drawn");
    }
    // Non-positive points are left out on a log axis.
    let mut bad = charts[1].clone();
    bad.lines[0].points.push((11., 0.));
    assert_eq!(bad.drawn_points(&bad.lines[0]).len(), 10);
    Ok(())
}

#[test]
fn heat_maps_share_one_colour_scale_and_check_their_shape() -> Result<()> {
    let dir = resblock_testing::scratch_dir!("plot-tests", "heat");
    let path = dir.join("heat.png");
    let map = |title: &str, v: f64| Heatmap {
        title: title.into(),
        rows: vec!["a".into(), "b".into()],
        columns: vec!["0".into(), "1".into(), "2".into()],
        x_desc: "epoch".into(),
        values: vec![vec![v, v, v], vec![v, f64::NAN, v]],
    };
    write_heatmaps(&path, &[map("low", 0.), map("high", 2.)], "ratio")?;
    let lo = ViridisRGB::get_color_normalized(0f64, 0., 2.);
    let hi = ViridisRGB::get_color_normalized(2f64, 0., 2.);
    assert!(pixels_of(&path, lo)? > 1000 && pixels_of(&path, hi)? > 1000);
    assert!(
        pixels_of(&path, RGBColor(200, 200, 200))? > 500,
        "NaN cells are grey"
    );
    // Values that do not match the labels: an error, and the figure there stays.
    let before = std::fs::read(&path)?;
    let mut bad = map("bad", 1.);
    bad.values[1].pop();
    let e = write_heatmaps(&path, &[bad], "ratio").expect_err("shape");
    assert!(e.to_string().contains("\"bad\""), "{e}");
    assert_eq!(std::fs::read(&path)?, before);
    Ok(())
}
