//! PNG line plots of training curves, drawn by `plotters` into an RGB buffer and encoded by `png`.
//!
//! A plot is a `WIDTH` x `HEIGHT` white canvas: the title above, the plot area with its mesh, tick
//! labels and axis labels, each series a 2-px polyline in palette order (tab10), a series with a
//! single drawable point a square marker. x is linear; y linear or log10 (`Plot::log_y`, what
//! loss curves over orders of magnitude want). Each axis spans the drawable data exactly; an axis
//! without data shows 0..1 (1..10 on a log axis), a flat range is widened around its value.
//!
//! Points that cannot be drawn are skipped and their neighbours joined: non-finite coordinates,
//! and on a log axis y <= 0. A run whose loss went NaN still gets its plot, of the finite part.
//!
//! The legend is a white box in the corner of the plot area that the curves cross least (upper
//! right unless a curve passes there), with at most `LEGEND_ROWS` rows, the last saying how many
//! series were left out.
//!
//! Text is drawn by ab_glyph from `assets/fonts/DejaVuSans-ascii.ttf`, compiled into the binary
//! (DejaVu Sans subset to ASCII, see `assets/fonts/LICENSE-DejaVu.txt`): no system font is looked
//! up, so the output is the same on every machine.

use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One curve: `points` are (x, y) in drawing order.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// The labels of a plot and the scale of its y axis (x is always linear).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plot<'a> {
    pub(crate) title: &'a str,
    pub(crate) x_label: &'a str,
    pub(crate) y_label: &'a str,
    pub(crate) log_y: bool,
}

/// Writes the plot of `series` as an RGB8 PNG of `WIDTH` x `HEIGHT` pixels to `path`, atomically
/// (`crate::io::write_file`): on error `path` is left as it was.
pub(crate) fn write_png(path: &Path, plot: &Plot<'_>, series: &[Series]) -> Result<()> {
    let pixels = render(plot, series, &[])?.pixels;
    crate::io::write_file(path, |file| {
        let mut out = BufWriter::new(file);
        let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
        out.flush()?;
        Ok(())
    })
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 560;
const FONT: &str = "sans-serif";
const TITLE_SIZE: u32 = 26;
const TEXT_SIZE: u32 = 17;
/// Legend rows at most; with more series the last row counts the rest.
const LEGEND_ROWS: usize = 12;

const INK: RGBColor = RGBColor(25, 25, 25);
const GRID: RGBColor = RGBColor(228, 228, 228);
const LEGEND_BORDER: RGBColor = RGBColor(170, 170, 170);
/// Series colors, in order (the "tab10" qualitative palette); the 11th series reuses the first.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Registers the embedded font under `FONT` once per process.
fn font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let bytes = include_bytes!("../assets/fonts/DejaVuSans-ascii.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the embedded plot font is not a valid TrueType font"
        ))
    }
}

/// A drawn plot: RGB8 rows top to bottom, the pixel ranges of the plot area, and where the
/// `probes` given to `render` (data coordinates) landed. Only the tests read more than `pixels`.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
struct Rendered {
    pixels: Vec<u8>,
    area: PixelArea,
    probes: Vec<(i32, i32)>,
    corner: Corner,
}

/// The points that can be drawn on a y axis that is log10 when `log_y`.
fn drawable(s: &Series, log_y: bool) -> impl Iterator<Item = (f64, f64)> + '_ {
    s.points
        .iter()
        .copied()
        .filter(move |&(x, y)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0))
}

/// The range of `values`: `empty` without any, widened around a single value, its span kept
/// finite (a range from -1e308 to 1e308 is clamped to half of f64's range).
fn axis_range(values: impl Iterator<Item = f64>, empty: (f64, f64), log: bool) -> Range<f64> {
    let (lo, hi) = values
        .fold(None, |r: Option<(f64, f64)>, v| match r {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
        .unwrap_or(empty);
    let (lo, hi) = if log {
        if hi / lo > 1.0 + 1e-12 {
            (lo, hi)
        } else {
            (lo / 2.0, hi * 2.0)
        }
    } else if hi - lo > lo.abs().max(hi.abs()) * 1e-12 {
        (lo, hi)
    } else if lo == 0.0 {
        (-1.0, 1.0)
    } else {
        (lo - lo.abs() * 0.1, hi + hi.abs() * 0.1)
    };
    if (hi - lo).is_finite() {
        lo..hi
    } else {
        lo.max(-f64::MAX / 2.0)..hi.min(f64::MAX / 2.0)
    }
}

/// A tick label: at most 4 significant digits, trailing zeros removed, exponent notation below
/// 1e-3 and from 1e5 on (`2.5e-5`, `1e6`).
fn tick_label(v: f64) -> String {
    fn trim(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    let a = v.abs();
    if a < 1e-300 {
        return "0".to_string();
    }
    if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        let s = format!("{v:.decimals$}");
        let s = trim(&s);
        return if s == "-0" { "0" } else { s }.to_string();
    }
    let s = format!("{v:.3e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    format!("{}e{exp}", trim(mantissa))
}

/// Ticks of a log10 axis over [lo, hi] (0 < lo < hi): powers of ten, every k-th decade so that
/// there are at most 9 of them; where that gives fewer than 3 ticks, 1, 2 and 5 times powers of
/// ten, and then 1..9 times (less than a decade).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let k = ((b - a + 7) / 8).max(1);
    let within = |v: &f64| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9);
    let decades: Vec<f64> = (a..=b)
        .filter(|e| e.rem_euclid(k) == 0)
        .map(|e| 10f64.powi(e))
        .filter(within)
        .collect();
    if decades.len() >= 3 {
        return decades;
    }
    let with = |ms: &[f64]| -> Vec<f64> {
        (a..=b)
            .flat_map(|e| ms.iter().map(move |m| m * 10f64.powi(e)))
            .filter(within)
            .collect()
    };
    let ticks = with(&[1.0, 2.0, 5.0]);
    if ticks.len() >= 3 {
        ticks
    } else {
        with(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    }
}

/// A corner of the plot area, for the legend; in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corner {
    UpperRight,
    LowerRight,
    UpperLeft,
    LowerLeft,
}

impl Corner {
    const ALL: [Corner; 4] = [
        Corner::UpperRight,
        Corner::LowerRight,
        Corner::UpperLeft,
        Corner::LowerLeft,
    ];

    fn position(self) -> SeriesLabelPosition {
        match self {
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
        }
    }

    /// Whether (fx, fy), fractions of the plot area from the lower left, lies in the box of
    /// `w` x `h` (fractions too) in this corner.
    fn contains(self, (fx, fy): (f64, f64), w: f64, h: f64) -> bool {
        let right = matches!(self, Corner::UpperRight | Corner::LowerRight);
        let upper = matches!(self, Corner::UpperRight | Corner::UpperLeft);
        let in_x = if right { fx >= 1.0 - w } else { fx <= w };
        let in_y = if upper { fy >= 1.0 - h } else { fy <= h };
        in_x && in_y
    }
}

/// The legend's rows: the names of the first series, and when they are more than `LEGEND_ROWS`,
/// a last row `+k more` (None for its color).
fn legend_rows(series: &[Series]) -> Vec<(Option<usize>, String)> {
    let shown = if series.len() > LEGEND_ROWS {
        LEGEND_ROWS - 1
    } else {
        series.len()
    };
    let mut rows: Vec<_> = series[..shown]
        .iter()
        .enumerate()
        .map(|(i, s)| (Some(i), s.name.clone()))
        .collect();
    if shown < series.len() {
        rows.push((None, format!("+{} more", series.len() - shown)));
    }
    rows
}

/// The corner whose legend box (`rows` rows) the curves cross least: each segment, in fractions
/// of the plot area, is sampled at 64 points; ties go to the earlier corner of `Corner::ALL`.
fn legend_corner(curves: &[Vec<(f64, f64)>], rows: usize) -> Corner {
    let (w, h) = (0.3, (0.06 + 0.055 * rows as f64).min(0.9));
    let samples = || {
        curves.iter().flat_map(|c| {
            c.windows(2).flat_map(|p| {
                (0..=64).map(move |k| {
                    let t = f64::from(k) / 64.0;
                    (
                        p[0].0 + t * (p[1].0 - p[0].0),
                        p[0].1 + t * (p[1].1 - p[0].1),
                    )
                })
            })
        })
    };
    Corner::ALL
        .into_iter()
        .min_by_key(|c| samples().filter(|&p| c.contains(p, w, h)).count())
        .unwrap_or(Corner::UpperRight)
}

fn render(plot: &Plot<'_>, series: &[Series], probes: &[(f64, f64)]) -> Result<Rendered> {
    font()?;
    let points = || series.iter().flat_map(|s| drawable(s, plot.log_y));
    let x = axis_range(points().map(|p| p.0), (0.0, 1.0), false);
    let empty_y = if plot.log_y { (1.0, 10.0) } else { (0.0, 1.0) };
    let y = axis_range(points().map(|p| p.1), empty_y, plot.log_y);
    // The curves in fractions of the plot area, for the legend's corner.
    let fraction = |(px, py): (f64, f64)| {
        let fy = if plot.log_y {
            (py.log10() - y.start.log10()) / (y.end.log10() - y.start.log10())
        } else {
            (py - y.start) / (y.end - y.start)
        };
        ((px - x.start) / (x.end - x.start), fy)
    };
    let curves: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| drawable(s, plot.log_y).map(fraction).collect())
        .collect();
    let rows = legend_rows(series);
    let corner = legend_corner(&curves, rows.len());

    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    let (area, probes) = {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root);
        chart
            .margin(14)
            .x_label_area_size(52)
            .y_label_area_size(if plot.y_label.is_empty() { 60 } else { 86 });
        if !plot.title.is_empty() {
            chart.caption(plot.title, (FONT, TITLE_SIZE).into_font().color(&INK));
        }
        let drawn = if plot.log_y {
            let ticks = log_ticks(y.start, y.end);
            let y = y.log_scale().with_key_points(ticks);
            let chart = chart.build_cartesian_2d(x, y)?;
            draw_chart(chart, plot, series, &rows, corner, probes)?
        } else {
            let chart = chart.build_cartesian_2d(x, y)?;
            draw_chart(chart, plot, series, &rows, corner, probes)?
        };
        root.present()?;
        drawn
    };
    Ok(Rendered {
        pixels,
        area,
        probes,
        corner,
    })
}

/// The x and y pixel ranges of the plot area.
type PixelArea = (Range<i32>, Range<i32>);

type Chart<'a, 'b, Y> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// Draws the mesh, the series and the legend on `chart`; returns the plot area's pixel ranges and
/// the pixels of `probes`.
fn draw_chart<'a, Y>(
    mut chart: Chart<'a, 'a, Y>,
    plot: &Plot<'_>,
    series: &[Series],
    rows: &[(Option<usize>, String)],
    corner: Corner,
    probes: &[(f64, f64)],
) -> Result<(PixelArea, Vec<(i32, i32)>)>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let text = || (FONT, TEXT_SIZE).into_font().color(&INK);
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .x_labels(8)
        .y_labels(8)
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .label_style(text())
        .axis_desc_style(text())
        .bold_line_style(GRID)
        .light_line_style(WHITE)
        .axis_style(INK)
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = drawable(s, plot.log_y).collect();
        let drawn = if let [p] = points[..] {
            let marker = EmptyElement::at(p) + Rectangle::new([(-3, -3), (3, 3)], color.filled());
            chart.draw_series(std::iter::once(marker))?
        } else {
            chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?
        };
        if i < rows.len() && rows[i].0 == Some(i) {
            drawn.label(s.name.as_str()).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 22, y)], color.stroke_width(3))
            });
        }
    }
    if let Some((None, more)) = rows.last() {
        chart
            .draw_series(std::iter::empty::<
                EmptyElement<(f64, f64), BitMapBackend<'a>>,
            >())?
            .label(more.as_str())
            .legend(|(x, y)| EmptyElement::at((x, y)));
    }
    if !rows.is_empty() {
        chart
            .configure_series_labels()
            .position(corner.position())
            .margin(10)
            .legend_area_size(28)
            .label_font(text())
            .background_style(WHITE.filled())
            .border_style(LEGEND_BORDER)
            .draw()?;
    }
    let area = chart.plotting_area().get_pixel_range();
    let probes = probes.iter().map(|p| chart.backend_coord(p)).collect();
    Ok((area, probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_string(),
            points: points.to_vec(),
        }
    }

    const PLOT: Plot<'static> = Plot {
        title: "Loss",
        x_label: "step",
        y_label: "loss",
        log_y: false,
    };

    fn pixel(r: &Rendered, (x, y): (i32, i32)) -> [u8; 3] {
        let i = 3 * (y as usize * WIDTH as usize + x as usize);
        [r.pixels[i], r.pixels[i + 1], r.pixels[i + 2]]
    }

    /// Pixels of the box [x0, x1) x [y0, y1) for which `keep` holds.
    fn count(
        r: &Rendered,
        xs: Range<i32>,
        ys: Range<i32>,
        keep: impl Fn([u8; 3]) -> bool,
    ) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|&p| keep(pixel(r, p)))
            .count()
    }

    fn rgb(c: RGBColor) -> [u8; 3] {
        [c.0, c.1, c.2]
    }

    /// Text and axes: dark gray, antialiased text included.
    fn dark(p: [u8; 3]) -> bool {
        p.iter().all(|&c| c < 110)
    }

    fn everywhere(r: &Rendered, c: RGBColor) -> usize {
        count(r, 0..WIDTH as i32, 0..HEIGHT as i32, |p| p == rgb(c))
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick_label(1.5), "1.5");
        assert_eq!(tick_label(0.6000000000000001), "0.6");
        assert_eq!(tick_label(0.02), "0.02");
        assert_eq!(tick_label(-0.5), "-0.5");
        assert_eq!(tick_label(120.0), "120");
        assert_eq!(tick_label(12_000.0), "12000");
        assert_eq!(tick_label(1e-4), "1e-4");
        assert_eq!(tick_label(2.5e-5), "2.5e-5");
        assert_eq!(tick_label(1.5e6), "1.5e6");
        assert_eq!(tick_label(1e15), "1e15");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(-1e-301), "0");
    }

    #[test]
    fn log_ticks_by_decade_count() {
        let close = |got: Vec<f64>, want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-12 * w, "{got:?} vs {want:?}");
            }
        };
        close(log_ticks(0.01, 100.0), &[0.01, 0.1, 1.0, 10.0, 100.0]);
        close(log_ticks(0.07, 3.1), &[0.1, 0.2, 0.5, 1.0, 2.0]);
        close(log_ticks(0.8, 2.3), &[0.8, 0.9, 1.0, 2.0]);
        // 20 decades: every third.
        let want: Vec<f64> = (-3..=3).map(|k| 10f64.powi(3 * k)).collect();
        close(log_ticks(1e-10, 1e10), &want);
    }

    #[test]
    fn axis_ranges_span_the_drawable_data() {
        let r = axis_range([3.0, -1.0, 2.0].into_iter(), (0.0, 1.0), false);
        assert_eq!(r, -1.0..3.0);
        assert_eq!(axis_range(std::iter::empty(), (0.0, 1.0), false), 0.0..1.0);
        // Flat ranges are widened around their value, on a log axis by a factor of 2.
        assert_eq!(axis_range([0.0].into_iter(), (0.0, 1.0), false), -1.0..1.0);
        let r = axis_range([2.5, 2.5].into_iter(), (0.0, 1.0), false);
        assert!(r.start < 2.5 && r.end > 2.5, "{r:?}");
        assert_eq!(axis_range([1.0].into_iter(), (1.0, 10.0), true), 0.5..2.0);
        // The span stays finite.
        let r = axis_range([-1e308, 1e308].into_iter(), (0.0, 1.0), false);
        assert!((r.end - r.start).is_finite() && r.start < 0.0 && r.end > 0.0);
    }

    #[test]
    fn the_written_file_is_a_png_of_the_rendered_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let series = [curve("train", &[(0.0, 2.0), (50.0, 1.0), (100.0, 0.5)])];
        write_png(&path, &PLOT, &series).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        let rendered = render(&PLOT, &series, &[]).unwrap();
        assert_eq!(&buf[..info.buffer_size()], &rendered.pixels[..]);
        // The plot area holds the curve; the background is white.
        let (xs, ys) = rendered.area.clone();
        assert!(count(&rendered, xs, ys, |p| p == rgb(PALETTE[0])) > 300);
        assert_eq!(pixel(&rendered, (2, 2)), [255, 255, 255]);
        // Nothing but the plot is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["loss.png"]);

        let missing = dir.path().join("no/such/dir/loss.png");
        let err = write_png(&missing, &PLOT, &series).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn each_series_is_drawn_along_its_segments_in_its_color() {
        for log_y in [false, true] {
            let (lo, hi) = if log_y { (0.01, 1.0) } else { (0.0, 1.0) };
            let series = [
                curve("a", &[(0.0, lo), (10.0, hi)]),
                curve("b", &[(0.0, hi), (10.0, lo)]),
            ];
            let plot = Plot { log_y, ..PLOT };
            // Points at t = 0.1..0.4 along each segment, in the axis' scale: away from the
            // crossing in the middle and from the legend in a corner.
            let along = |(x0, y0): (f64, f64), (x1, y1): (f64, f64), t: f64| {
                let y = if log_y {
                    10f64.powf(y0.log10() + t * (y1.log10() - y0.log10()))
                } else {
                    y0 + t * (y1 - y0)
                };
                (x0 + t * (x1 - x0), y)
            };
            let ts = [0.1, 0.2, 0.3, 0.4];
            let probes: Vec<(f64, f64)> = series
                .iter()
                .flat_map(|s| ts.map(|t| along(s.points[0], s.points[1], t)))
                .collect();
            let r = render(&plot, &series, &probes).unwrap();
            for (k, &(px, py)) in r.probes.iter().enumerate() {
                let i = k / ts.len();
                let near = count(&r, px - 2..px + 3, py - 2..py + 3, |p| p == rgb(PALETTE[i]));
                assert!(near > 0, "series {i} probe {k} log={log_y}");
            }
            // And nowhere far from its line: the middle of the left edge, which no line passes.
            let (xs, ys) = r.area.clone();
            let mid = (ys.start + ys.end) / 2;
            let box_ = (xs.start + 3..xs.start + 40, mid - 20..mid + 20);
            for c in &PALETTE[..2] {
                assert_eq!(
                    count(&r, box_.0.clone(), box_.1.clone(), |p| p == rgb(*c)),
                    0
                );
            }
        }
    }

    #[test]
    fn a_log_axis_puts_the_geometric_mean_halfway() {
        let series = [curve("loss", &[(0.0, 0.01), (1.0, 1.0)])];
        let probes = [(0.0, 0.01), (0.0, 0.1), (0.0, 1.0)];
        let log = render(
            &Plot {
                log_y: true,
                ..PLOT
            },
            &series,
            &probes,
        )
        .unwrap();
        let [a, b, c] = [0, 1, 2].map(|i| log.probes[i].1);
        assert!(a > b && b > c, "{a} {b} {c}");
        assert!(((a - b) - (b - c)).abs() <= 1, "{a} {b} {c}");
        // On a linear axis 0.1 is near the bottom.
        let lin = render(&PLOT, &series, &probes).unwrap();
        let [a, b, c] = [0, 1, 2].map(|i| lin.probes[i].1);
        assert!((a - b) * 8 < b - c, "{a} {b} {c}");
    }

    #[test]
    fn the_legend_names_each_series_beside_its_color_in_a_free_corner() {
        let series = [
            curve("train", &[(0.0, 3.0), (100.0, 1.0)]),
            curve("eval", &[(0.0, 3.2), (100.0, 1.4)]),
        ];
        let r = render(&PLOT, &series, &[]).unwrap();
        // Falling curves leave the upper right corner free: text and both swatches there.
        assert_eq!(r.corner, Corner::UpperRight);
        let (xs, ys) = r.area.clone();
        let (bx, by) = (
            xs.end - xs.len() as i32 / 4..xs.end,
            ys.start..ys.start + 80,
        );
        assert!(count(&r, bx.clone(), by.clone(), dark) > 50);
        for c in &PALETTE[..2] {
            assert!(count(&r, bx.clone(), by.clone(), |p| p == rgb(*c)) >= 22);
        }
        let border = rgb(LEGEND_BORDER);
        assert!(count(&r, bx, by, |p| p == border) > 40);

        // A rising curve crosses the upper right and lower left; the lower right comes next.
        let rising = [curve("accuracy", &[(0.0, 0.0), (100.0, 1.0)])];
        assert_eq!(
            render(&PLOT, &rising, &[]).unwrap().corner,
            Corner::LowerRight
        );
        assert_eq!(legend_corner(&[], 1), Corner::UpperRight);
    }

    #[test]
    fn a_long_series_list_ends_with_a_count_of_the_rest() {
        let series: Vec<Series> = (0..40)
            .map(|i| curve(&format!("run {i}"), &[(0.0, f64::from(i)), (1.0, 1.0)]))
            .collect();
        let rows = legend_rows(&series);
        assert_eq!(rows.len(), LEGEND_ROWS);
        assert_eq!(
            rows[LEGEND_ROWS - 2],
            (Some(LEGEND_ROWS - 2), "run 10".to_string())
        );
        assert_eq!(
            rows[LEGEND_ROWS - 1],
            (None, format!("+{} more", 40 - (LEGEND_ROWS - 1)))
        );
        assert_eq!(legend_rows(&series[..3]).len(), 3);
        // All 40 are drawn; the 11th reuses the first color.
        let r = render(&PLOT, &series, &[]).unwrap();
        assert!(everywhere(&r, PALETTE[9]) > 0);
    }

    #[test]
    fn degenerate_inputs_still_draw_axes() {
        // No series: the frame, ticks and labels, no legend, no series color.
        for log_y in [false, true] {
            let empty = render(&Plot { log_y, ..PLOT }, &[], &[]).unwrap();
            assert!(everywhere(&empty, INK) > 500);
            // (The gray of the palette occurs in antialiased text.)
            for c in PALETTE.iter().filter(|c| c.0 != c.1) {
                assert_eq!(everywhere(&empty, *c), 0);
            }
        }

        // A single point gets a marker.
        let single = [curve("one", &[(5.0, 0.3)])];
        let r = render(&PLOT, &single, &[(5.0, 0.3)]).unwrap();
        let (x, y) = r.probes[0];
        assert!(count(&r, x - 1..x + 2, y - 1..y + 2, |p| p == rgb(PALETTE[0])) == 9);

        // Non-finite points and, on a log axis, y <= 0 are skipped and their neighbours joined.
        let messy = [curve(
            "messy",
            &[
                (0.0, 1.0),
                (1.0, f64::NAN),
                (f64::INFINITY, 2.0),
                (2.0, -1.0),
                (3.0, 1e-3),
                (4.0, 0.0),
            ],
        )];
        let plot = Plot {
            log_y: true,
            ..PLOT
        };
        let r = render(&plot, &messy, &[(0.0, 1.0), (3.0, 1e-3)]).unwrap();
        let (xs, ys) = r.area.clone();
        // (0, 1) and (3, 1e-3) are the corners of the plot area: x and y span exactly the points.
        assert!((r.probes[0].0 - xs.start).abs() <= 1 && (r.probes[0].1 - ys.start).abs() <= 1);
        assert!((r.probes[1].0 - (xs.end - 1)).abs() <= 1);
        assert!((r.probes[1].1 - (ys.end - 1)).abs() <= 1);
        assert!(everywhere(&r, PALETTE[0]) > 200);
        let r = render(&PLOT, &messy, &[(0.0, 1.0), (4.0, 0.0), (2.0, -1.0)]).unwrap();
        assert!((r.probes[1].0 - (r.area.0.end - 1)).abs() <= 1);
        assert!((r.probes[2].1 - (r.area.1.end - 1)).abs() <= 1);

        // Extremes of f64 neither fail nor loop for long.
        let extreme = [curve(
            "e",
            &[(0.0, 1e308), (1.0, -1e308), (f64::MAX, 5e-324)],
        )];
        for log_y in [false, true] {
            render(&Plot { log_y, ..PLOT }, &extreme, &[]).unwrap();
        }
    }
}
