//! The paper's figures, drawn with plotters as PNG and SVG: cost against
//! token hand-offs with the baselines as lines (Fig. 2b), the ratio of cost
//! reduction against c_m (Fig. 2c), and rack-to-rack traffic heat maps
//! before and after migration (Fig. 2a/2d), and the capacity runs' reduction
//! against host fill. Text uses the DejaVu Sans font
//! shipped in `assets/` (no system font library needed).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Errors from drawing a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The backend failed (file I/O, encoding, a font problem).
    #[error("cannot draw {file}: {msg}")]
    Draw {
        /// The file being drawn.
        file: String,
        /// What the backend said.
        msg: String,
    },
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The font is shipped with the crate and known to parse; if it did
        // not, text would be missing but plots would still be written.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Line colours of the four policies and the baselines.
const PALETTE: [RGBColor; 7] = [
    RGBColor(230, 97, 1),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 86, 86),
    RGBColor(213, 94, 0),
    RGBColor(120, 94, 240),
];

/// Line colours of the fill figures (beyond the paper, docs/EVALUATION.md): more
/// lines than the policies' palette tells apart.
const FILL_PALETTE: [RGBColor; 9] = [
    RGBColor(230, 97, 1),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 86, 86),
    RGBColor(120, 94, 240),
    RGBColor(0, 0, 0),
    RGBColor(170, 20, 40),
    RGBColor(86, 180, 233),
];

/// What a drawing function returns: the error of the backend it draws on.
type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draws a figure into `<stem>.png` (with `png`) and `<stem>.svg` (with
/// `svg`): the same generic drawing function, once per backend.
fn both(
    stem: &Path,
    size: (u32, u32),
    png_draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult<BitMapBackend<'static>>,
    svg_draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult<SVGBackend<'static>>,
) -> Result<(), PlotError> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let err = |file: &Path, msg: String| PlotError::Draw {
        file: file.display().to_string(),
        msg,
    };
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        png_draw(&root).map_err(|e| err(&png, e.to_string()))?;
        root.present().map_err(|e| err(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        svg_draw(&root).map_err(|e| err(&svg, e.to_string()))?;
        root.present().map_err(|e| err(&svg, e.to_string()))?;
    }
    Ok(())
}

/// One curve of Fig. 2b: a name and the cost after every hand-off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Curve<'a> {
    /// Legend label.
    pub name: &'a str,
    /// Cost after hand-off 1, 2, ...
    pub costs: &'a [f64],
}

/// Keeps at most `max` points of a curve: per bucket the largest value, so
/// that the spikes of new flows stay visible.
fn downsample(costs: &[f64], max: usize) -> Vec<(f64, f64)> {
    let n = costs.len();
    if n <= max {
        return costs
            .iter()
            .enumerate()
            .map(|(i, &c)| ((i + 1) as f64, c))
            .collect();
    }
    let step = n.div_ceil(max);
    costs
        .chunks(step)
        .enumerate()
        .map(|(b, ch)| {
            let m = ch.iter().copied().fold(f64::MIN, f64::max);
            ((b * step + 1) as f64, m)
        })
        .collect()
}

/// Fig. 2b: total cost (normalised to the initial cost) against token
/// hand-offs, one curve per policy, one horizontal line per baseline.
/// `x_per_round` is the number of VMs (hand-offs in a round of the
/// round-based policies), used for the axis label.
pub(crate) fn cost_vs_handoffs(
    stem: &Path,
    title: &str,
    initial: f64,
    curves: &[Curve<'_>],
    baselines: &[(&str, f64)],
    x_per_round: u64,
) -> Result<(), PlotError> {
    let max_x = curves
        .iter()
        .map(|c| c.costs.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let series: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|c| {
            let mut pts = vec![(0.0, 1.0)];
            pts.extend(
                downsample(c.costs, 1500)
                    .into_iter()
                    .map(|(x, y)| (x, y / initial)),
            );
            pts
        })
        .collect();
    let y_max = series
        .iter()
        .flat_map(|s| s.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let args = CostArgs {
        title,
        curves,
        series: &series,
        baselines,
        initial,
        max_x,
        y_max,
        x_per_round,
    };
    both(
        stem,
        (1000, 620),
        |r| draw_cost(r, &args),
        |r| draw_cost(r, &args),
    )
}

struct CostArgs<'a> {
    title: &'a str,
    curves: &'a [Curve<'a>],
    series: &'a [Vec<(f64, f64)>],
    baselines: &'a [(&'a str, f64)],
    initial: f64,
    max_x: f64,
    y_max: f64,
    x_per_round: u64,
}

fn draw_cost<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    a: &CostArgs<'_>,
) -> DrawResult<DB> {
    let CostArgs {
        title,
        curves,
        series,
        baselines,
        initial,
        max_x,
        y_max,
        x_per_round,
    } = *a;
    {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..max_x, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(format!(
                "token hand-offs (one round = {x_per_round} hand-offs)"
            ))
            .y_desc("total cost / initial cost (eq. 1)")
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
            .draw()?;
        for (i, (c, pts)) in curves.iter().zip(series.iter()).enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(c.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        for (j, &(name, cost)) in baselines.iter().enumerate() {
            let color = PALETTE[(4 + 2 * j) % PALETTE.len()];
            let y = cost / initial;
            let dashes = dashed(0.0, max_x, y, 60);
            for seg in dashes.chunks(2) {
                chart.draw_series(LineSeries::new(seg.iter().copied(), color.stroke_width(2)))?;
            }
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, y), (0.0, y)],
                    color.stroke_width(2),
                )))?
                .label(format!("{name} (centralised)"))
                .legend(move |(x, yy)| {
                    PathElement::new(vec![(x, yy), (x + 8, yy)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    }
}

/// The peer protocol's cost curve beside the decision-only engine's, on
/// one world: cost (normalised to the initial cost) against token
/// hand-offs. The engine is drawn wide and light underneath, the protocol
/// narrow and dark on top, so that both show where they coincide.
pub(crate) fn protocol_beside_engine(
    stem: &Path,
    title: &str,
    initial: f64,
    protocol: &[f64],
    engine: &[f64],
    x_per_round: u64,
) -> Result<(), PlotError> {
    let series = |costs: &[f64]| {
        let mut pts = vec![(0.0, 1.0)];
        pts.extend(
            downsample(costs, 3000)
                .into_iter()
                .map(|(x, y)| (x, y / initial)),
        );
        pts
    };
    let (p, e) = (series(protocol), series(engine));
    let max_x = protocol.len().max(engine.len()).max(1) as f64;
    both(
        stem,
        (1000, 620),
        |r| draw_beside(r, title, &p, &e, max_x, x_per_round),
        |r| draw_beside(r, title, &p, &e, max_x, x_per_round),
    )
}

fn draw_beside<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    protocol: &[(f64, f64)],
    engine: &[(f64, f64)],
    max_x: f64,
    x_per_round: u64,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_x, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "token hand-offs (one round = {x_per_round} hand-offs)"
        ))
        .y_desc("total cost / initial cost (eq. 1)")
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
        .draw()?;
    let light = RGBColor(120, 190, 235);
    chart
        .draw_series(LineSeries::new(
            engine.iter().copied(),
            light.stroke_width(7),
        ))?
        .label("decision-only engine (score-sim)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light.stroke_width(7)));
    let dark = PALETTE[0];
    chart
        .draw_series(LineSeries::new(
            protocol.iter().copied(),
            dark.stroke_width(2),
        ))?
        .label("peer protocol (one score-core Node per host)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], dark.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// Points of a dashed horizontal line, in pairs (segment start, end).
fn dashed(x0: f64, x1: f64, y: f64, dashes: usize) -> Vec<(f64, f64)> {
    let step = (x1 - x0) / (2 * dashes) as f64;
    (0..dashes)
        .flat_map(|i| {
            let a = x0 + (2 * i) as f64 * step;
            [(a, y), (a + step, y)]
        })
        .collect()
}

/// One line of Fig. 2c: a reading of c_m and its (c_m %, ratio) points.
#[derive(Debug, Clone)]
pub(crate) struct SweepLine {
    /// Legend label.
    pub name: String,
    /// (c_m in percent, cost reduction / cost reduction at c_m = 0).
    pub points: Vec<(f64, f64)>,
}

/// Fig. 2c: ratio of cost reduction against c_m.
pub(crate) fn cm_sweep(stem: &Path, title: &str, lines: &[SweepLine]) -> Result<(), PlotError> {
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let axes = Axes {
        x: -0.5..x_max + 0.5,
        y: 0.0..1.1,
        x_desc: "c_m (% of the reference cost)",
        y_desc: "cost reduction / reduction at c_m = 0",
        legend: SeriesLabelPosition::MiddleRight,
        palette: &PALETTE,
    };
    both(
        stem,
        (900, 560),
        |r| draw_lines(r, title, lines, &axes),
        |r| draw_lines(r, title, lines, &axes),
    )
}

/// Beyond the paper (EVALUATION.md): cost reduction over the best centralised baseline's against
/// the fill of the hosts (x in percent), one line per variant.
pub(crate) fn fill_lines(stem: &Path, title: &str, lines: &[SweepLine]) -> Result<(), PlotError> {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let y_min = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::min);
    let axes = Axes {
        x: x_min - 1.0..x_max + 1.0,
        y: (y_min - 0.05).clamp(0.0, 0.9)..1.02,
        x_desc: "hosts' slots filled (%)",
        y_desc: "cost reduction / best centralised baseline's",
        legend: SeriesLabelPosition::LowerLeft,
        palette: &FILL_PALETTE,
    };
    both(
        stem,
        (900, 600),
        |r| draw_lines(r, title, lines, &axes),
        |r| draw_lines(r, title, lines, &axes),
    )
}

/// Migrations over the best baseline's moved VMs against fill (beyond the
/// paper, docs/EVALUATION.md): `lines` give (fill in percent, ratio).
pub(crate) fn fill_migration_lines(
    stem: &Path,
    title: &str,
    lines: &[SweepLine],
) -> Result<(), PlotError> {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    let axes = Axes {
        x: x_min - 1.0..x_max + 1.0,
        y: 0.0..y_max * 1.1,
        x_desc: "hosts' slots filled (%)",
        y_desc: "live migrations / VMs the best baseline moves",
        legend: SeriesLabelPosition::UpperLeft,
        palette: &FILL_PALETTE,
    };
    both(
        stem,
        (900, 600),
        |r| draw_lines(r, title, lines, &axes),
        |r| draw_lines(r, title, lines, &axes),
    )
}

/// Cost reduction against live migrations, a line per policy through its
/// c_m settings (docs/EVALUATION.md, "A migration cost from
/// measurements"): `lines` give (thousands of migrations, reduction in %).
pub(crate) fn migrations_vs_reduction(
    stem: &Path,
    title: &str,
    lines: &[SweepLine],
) -> Result<(), PlotError> {
    let pts = || lines.iter().flat_map(|l| l.points.iter().copied());
    let x_max = pts().map(|p| p.0).fold(1.0f64, f64::max);
    let (y_min, y_max) = pts().fold((100.0f64, 0.0f64), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let axes = Axes {
        x: 0.0..x_max * 1.05,
        y: (y_min - 3.0).max(0.0)..(y_max + 3.0).min(100.0),
        x_desc: "live migrations (thousands)",
        y_desc: "cost reduction (%)",
        legend: SeriesLabelPosition::LowerRight,
        palette: &PALETTE,
    };
    both(
        stem,
        (900, 600),
        |r| draw_lines(r, title, lines, &axes),
        |r| draw_lines(r, title, lines, &axes),
    )
}

/// Ranges, labels and legend place of a line chart.
struct Axes<'a> {
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    x_desc: &'a str,
    y_desc: &'a str,
    legend: SeriesLabelPosition,
    palette: &'a [RGBColor],
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    lines: &[SweepLine],
    axes: &Axes<'_>,
) -> DrawResult<DB> {
    {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(axes.x.clone(), axes.y.clone())?;
        chart
            .configure_mesh()
            .x_desc(axes.x_desc)
            .y_desc(axes.y_desc)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, l) in lines.iter().enumerate() {
            let color = axes.palette[i % axes.palette.len()];
            chart
                .draw_series(LineSeries::new(
                    l.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(l.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(l.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(axes.legend.clone())
            .draw()?;
        Ok(())
    }
}

/// A perceptually ordered colour ramp (viridis-like), `t` in [0, 1].
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 6] = [
        (68, 1, 84),
        (65, 68, 135),
        (42, 120, 142),
        (34, 168, 132),
        (122, 209, 81),
        (253, 231, 37),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: u8, y: u8| (f64::from(x) + (f64::from(y) - f64::from(x)) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Fig. 2a/2d: a rack-to-rack traffic matrix, normalised by `vmax` (shared
/// by the before and after maps so that they compare), square-root colour
/// scale so that the many small entries stay visible.
pub(crate) fn heatmap(
    stem: &Path,
    title: &str,
    m: &[Vec<f64>],
    vmax: f64,
) -> Result<(), PlotError> {
    let n = m.len().max(1);
    let vmax = if vmax > 0.0 { vmax } else { 1.0 };
    both(
        stem,
        (760, 700),
        |r| draw_heat(r, title, m, n, vmax),
        |r| draw_heat(r, title, m, n, vmax),
    )
}

fn draw_heat<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    m: &[Vec<f64>],
    n: usize,
    vmax: f64,
) -> DrawResult<DB> {
    {
        root.fill(&WHITE)?;
        let (main, bar) = root.split_horizontally(660);
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(0..n, 0..n)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("rack (ToR)")
            .y_desc("rack (ToR)")
            .label_style(("sans-serif", 13))
            .draw()?;
        chart.draw_series(m.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &v)| {
                Rectangle::new([(j, i), (j + 1, i + 1)], ramp((v / vmax).sqrt()).filled())
            })
        }))?;
        // Colour bar.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(40)
            .margin_bottom(50)
            .y_label_area_size(50)
            .build_cartesian_2d(0..1, 0.0..1.0)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_label_formatter(&|y| format!("{:.2}", y * y))
            .label_style(("sans-serif", 12))
            .draw()?;
        cb.draw_series((0..100).map(|k| {
            let a = f64::from(k) / 100.0;
            Rectangle::new([(0, a), (1, a + 0.01)], ramp(a).filled())
        }))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_keeps_spikes() {
        let mut c: Vec<f64> = (0..10_000).map(|i| 100.0 - f64::from(i) * 0.001).collect();
        c[5_003] = 500.0;
        let d = downsample(&c, 100);
        assert!(d.len() <= 100);
        assert!(d.iter().any(|p| p.1 == 500.0));
    }

    #[test]
    fn ramp_ends() {
        assert_eq!(ramp(0.0), RGBColor(68, 1, 84));
        assert_eq!(ramp(1.0), RGBColor(253, 231, 37));
        assert_eq!(ramp(7.0), RGBColor(253, 231, 37));
    }
}
