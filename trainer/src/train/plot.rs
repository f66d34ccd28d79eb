//! PNG plots of a run (training loss, validation Dice) and of an ablation
//! (validation Dice per arm), drawn with plotters.
//!
//! plotters draws text with a TrueType font that must be registered first;
//! infl8 ships none, so it uses the first of `INFL8_PLOT_FONT` and the usual
//! DejaVu/Liberation paths that exists, and draws the plot without text when
//! there is none (the numbers are in the CSV either way).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font once; `true` when text can be drawn.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let env = std::env::var("INFL8_PLOT_FONT").ok();
        let paths = env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied());
        for p in paths {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps a 'static reference; the font lives for the
                // whole process anyway.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!(
            "no TrueType font found for plot labels (set INFL8_PLOT_FONT); plotting without text"
        );
        false
    })
}

#[derive(Debug, thiserror::Error)]
#[error("{}: cannot draw the plot: {detail}", .path.display())]
pub struct PlotError {
    pub path: std::path::PathBuf,
    pub detail: String,
}

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn range(points: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in points.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let m = (hi - lo) * pad;
    (lo - m, hi + m)
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
    text: bool,
) -> Result<(), String> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = range(all().map(|p| p.0), 0.0);
    let (y0, y1) = y_range.unwrap_or_else(|| range(all().map(|p| p.1), 0.05));
    let mut b = ChartBuilder::on(area);
    b.margin(12);
    if text {
        b.caption(title, ("sans-serif", 18))
            .x_label_area_size(32)
            .y_label_area_size(48);
    }
    let mut chart = b
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc(y_desc);
    } else {
        mesh.disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        let drawn = chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if text {
            drawn.label(s.name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
            });
        }
        if pts.len() < 40 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    if text && series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Training loss (raw and a moving average) beside validation Dice.
pub fn plot_run(path: &Path, loss: &[(f64, f64)], dice: &[(f64, f64)]) -> Result<(), PlotError> {
    let err = |detail: String| PlotError {
        path: path.to_path_buf(),
        detail,
    };
    let text = font_ready();
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(500);
    let window = (loss.len() / 20).max(1);
    let smooth: Vec<(f64, f64)> = (0..loss.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let chunk = &loss[lo..=i];
            (
                loss[i].0,
                chunk.iter().map(|p| p.1).sum::<f64>() / chunk.len() as f64,
            )
        })
        .collect();
    panel(
        &left,
        "training loss (Dice + CE)",
        "loss",
        &[
            Series {
                name: "per step".into(),
                points: loss.to_vec(),
            },
            Series {
                name: format!("mean of {window}"),
                points: smooth,
            },
        ],
        None,
        text,
    )
    .map_err(&err)?;
    panel(
        &right,
        "validation Dice (foreground)",
        "Dice",
        &[Series {
            name: "validation".into(),
            points: dice.to_vec(),
        }],
        Some((0.0, 1.0)),
        text,
    )
    .map_err(&err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Validation Dice against step, one line per arm.
pub fn plot_arms(path: &Path, arms: &[Series]) -> Result<(), PlotError> {
    let err = |detail: String| PlotError {
        path: path.to_path_buf(),
        detail,
    };
    let text = font_ready();
    let root = BitMapBackend::new(path, (720, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    panel(
        &root,
        "validation Dice by initialisation",
        "Dice",
        arms,
        Some((0.0, 1.0)),
        text,
    )
    .map_err(&err)?;
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_png_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.png");
        let loss: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
            .collect();
        plot_run(&p, &loss, &[(25.0, 0.5), (50.0, 0.8)]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let q = dir.path().join("arms.png");
        plot_arms(
            &q,
            &[Series {
                name: "inflated".into(),
                points: vec![(10.0, 0.4), (20.0, 0.7)],
            }],
        )
        .unwrap();
        assert!(q.is_file());
        let e = plot_run(&dir.path().join("missing/dir/x.png"), &loss, &[]).unwrap_err();
        assert!(e.to_string().contains("x.png"), "{e}");
    }
}
