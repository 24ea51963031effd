//! PNG line plots of training curves, with no plotting or font library (only `png` to encode).
//!
//! Layout, in pixels from the top left of a `WIDTH` x `HEIGHT` white canvas: the title is centred
//! in the top margin; the plot area is the rectangle `Layout::area`, whose left edge leaves room
//! for the rotated y label and the widest y tick label, and whose bottom edge leaves room for the x
//! tick labels and the x label. Each axis runs from its first to its last tick: the data range
//! widened to the enclosing "nice" values (1, 2 or 5 times a power of ten), so the extreme ticks
//! lie on the frame. x maps linearly, y linearly or by log10. Series are 2-px polylines in palette
//! order, clipped to the plot area; a series with a single drawable point gets a square marker.
//! The legend is a white box in the upper right corner of the plot area, drawn over the data, or
//! in another corner when that one hides fewer data pixels.
//!
//! Points that cannot be drawn are skipped and their neighbours joined: non-finite coordinates,
//! and on a log axis y <= 0. An axis without data shows 0..1 (1..10 on a log axis); a flat range
//! is widened around its value.
//!
//! Text uses the hand-made bitmap font `GLYPHS` (5 columns, 9 rows: cap height 7 above the
//! baseline, 2 rows of descender) for ASCII 32..=126, drawn at an integer scale and spaced
//! proportionally: a glyph advances by its inked width plus one column, a space by 3 columns.
//! Characters outside the table are drawn as `?`.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Result;

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
    let canvas = render(plot, series);
    crate::io::write_file(path, |file| encode(&canvas, file))
}

fn encode(canvas: &Canvas, file: &mut fs::File) -> Result<()> {
    let mut out = BufWriter::new(file);
    let mut encoder = png::Encoder::new(&mut out, canvas.width as u32, canvas.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&canvas.pixels)?;
    writer.finish()?;
    out.flush()?;
    Ok(())
}

const WIDTH: usize = 900;
const HEIGHT: usize = 560;
/// Outer margin of the canvas.
const MARGIN: i64 = 12;
/// Scale of the tick labels, axis labels and legend text (a 10 x 14 px capital).
const TEXT_SCALE: i64 = 2;
/// Length of the tick marks outside the frame, and the gap between a mark and its label.
const TICK_LEN: i64 = 5;
const TICK_GAP: i64 = 6;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [25, 25, 25];
const FRAME: Rgb = [70, 70, 70];
const GRID: Rgb = [228, 228, 228];
const LEGEND_BORDER: Rgb = [170, 170, 170];
/// Series colors, in order (the "tab10" qualitative palette); the 11th series reuses the first.
const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// An RGB8 image, rows top to bottom, 3 bytes a pixel. Writes outside it are dropped.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    fn get(&self, x: i64, y: i64) -> Option<Rgb> {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            Some([self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]])
        } else {
            None
        }
    }

    /// Fills the `w` x `h` rectangle whose top left pixel is (x, y).
    fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        let x0 = x.max(0);
        let y0 = y.max(0);
        let x1 = (x + w).min(self.width as i64);
        let y1 = (y + h).min(self.height as i64);
        for yy in y0..y1 {
            for xx in x0..x1 {
                self.set(xx, yy, c);
            }
        }
    }

    /// The 1-px outline of `r`.
    fn outline(&mut self, r: Rect, c: Rgb) {
        self.fill(r.left, r.top, r.right - r.left + 1, 1, c);
        self.fill(r.left, r.bottom, r.right - r.left + 1, 1, c);
        self.fill(r.left, r.top, 1, r.bottom - r.top + 1, c);
        self.fill(r.right, r.top, 1, r.bottom - r.top + 1, c);
    }

    /// A 2-px wide segment from `a` to `b` (Bresenham, each step stamping a 2 x 2 block whose top
    /// left is the line pixel), clipped to `clip`.
    fn line(&mut self, a: (i64, i64), b: (i64, i64), c: Rgb, clip: Rect) {
        let (mut x, mut y) = a;
        let dx = (b.0 - a.0).abs();
        let dy = -(b.1 - a.1).abs();
        let sx = if a.0 < b.0 { 1 } else { -1 };
        let sy = if a.1 < b.1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                if clip.contains(x + ox, y + oy) {
                    self.set(x + ox, y + oy, c);
                }
            }
            if (x, y) == b {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// A pixel rectangle, all four edges inclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.left && x <= self.right && y >= self.top && y <= self.bottom
    }
}

// ---------------------------------------------------------------------------------------------
// Axes and ticks

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log10,
}

#[derive(Debug, Clone, PartialEq)]
struct Tick {
    value: f64,
    label: String,
}

/// An axis runs from `lo` to `hi` (the first and last tick, or on a log axis of less than a decade
/// possibly the data's minimum) with `ticks` in between, in increasing order.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    scale: Scale,
    ticks: Vec<Tick>,
}

impl Axis {
    /// Where `v` lies between `lo` (0) and `hi` (1) in the axis' scale.
    fn fraction(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log10 => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
        }
    }
}

/// Intervals aimed at between ticks on the x and the y axis; the 1-2-5 rounding yields at most
/// two more.
const X_INTERVALS: f64 = 6.0;
const Y_INTERVALS: f64 = 5.0;

/// The smallest of 1, 2, 5, 10 times a power of ten that is at least `raw` (> 0).
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// Ticks at multiples of a 1-2-5 step over [lo, hi] (lo < hi, both finite), about `intervals`
/// of them, the ends widened to the enclosing multiples. The step is at least `min_step`.
/// Returns (first, last, step, values).
fn linear_ticks(lo: f64, hi: f64, intervals: f64, min_step: f64) -> (f64, f64, f64, Vec<f64>) {
    let step = nice_step((hi - lo) / intervals).max(min_step);
    if !step.is_finite() || step <= 0.0 {
        return (lo, hi, hi - lo, vec![lo, hi]);
    }
    // Tick k is k * step, computed from k rather than accumulated, so 0.6 is 0.6000000000000001 at
    // worst (the labels round that away). A bound within 1e-9 step of a multiple is that multiple.
    let first = (lo / step + 1e-9).floor();
    let last = (hi / step - 1e-9).ceil();
    let count = ((last - first) as i64).clamp(1, 100);
    let values = (0..=count).map(|k| (first + k as f64) * step).collect();
    (first * step, (first + count as f64) * step, step, values)
}

/// How tick labels of a given magnitude are written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Notation {
    /// 0.25, 120
    Plain,
    /// 12k, 1.5M, 3G: the value divided by 1e3, 1e6 or 1e9.
    Suffix(f64, &'static str),
    /// 1e-4, 2.5e-5, 1e15
    Exponent,
}

impl Notation {
    fn for_magnitude(a: f64) -> Notation {
        if a == 0.0 {
            Notation::Plain
        } else if !(1e-3..1e12).contains(&a) {
            Notation::Exponent
        } else if a >= 1e9 {
            Notation::Suffix(1e9, "G")
        } else if a >= 1e6 {
            Notation::Suffix(1e6, "M")
        } else if a >= 1e4 {
            Notation::Suffix(1e3, "k")
        } else {
            Notation::Plain
        }
    }
}

/// Writes `v` with as many decimals as `resolution` (the smallest difference the label must show)
/// needs, trailing zeros removed.
fn format_tick(v: f64, resolution: f64, notation: Notation) -> String {
    fn decimals(resolution: f64, max: i64) -> usize {
        (-resolution.log10() - 1e-9).ceil().clamp(0.0, max as f64) as usize
    }
    fn trim(s: String) -> String {
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s == "-0" { "0".to_string() } else { s }
    }
    if v == 0.0 || v.abs() < resolution.abs() * 1e-6 {
        return "0".to_string();
    }
    match notation {
        Notation::Plain => trim(format!("{v:.*}", decimals(resolution, 12))),
        Notation::Suffix(unit, suffix) => {
            trim(format!("{:.*}", decimals(resolution / unit, 3), v / unit)) + suffix
        }
        Notation::Exponent => {
            let mut exp = (v.abs().log10() + 1e-9).floor() as i32;
            let mut mantissa = v / 10f64.powi(exp);
            let d = decimals(resolution / 10f64.powi(exp), 3);
            let mut text = trim(format!("{mantissa:.d$}"));
            if text.trim_start_matches('-').starts_with("10") {
                exp += 1;
                mantissa /= 10.0;
                text = trim(format!("{mantissa:.d$}"));
            }
            format!("{text}e{exp}")
        }
    }
}

/// A linear axis over the data range [lo, hi] (lo <= hi, finite).
fn linear_axis(lo: f64, hi: f64, intervals: f64, min_step: f64) -> Axis {
    let (lo, hi) = widen_flat(lo, hi);
    let (first, last, step, values) = linear_ticks(lo, hi, intervals, min_step);
    let notation = Notation::for_magnitude(first.abs().max(last.abs()));
    let ticks = values
        .into_iter()
        .map(|value| Tick {
            value,
            label: format_tick(value, step, notation),
        })
        .collect();
    Axis {
        lo: first,
        hi: last,
        scale: Scale::Linear,
        ticks,
    }
}

/// [lo, hi] itself, or around lo when it is (nearly) a single value.
fn widen_flat(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo > lo.abs().max(hi.abs()) * 1e-12 {
        (lo, hi)
    } else if lo == 0.0 {
        (-1.0, 1.0)
    } else {
        let pad = lo.abs() * 0.1;
        (lo - pad, hi + pad)
    }
}

/// A log10 axis over the data range [lo, hi] (0 < lo <= hi, finite). Less than a decade: linear
/// 1-2-5 ticks (the axis starts at `lo` when the first multiple would be <= 0). Up to three
/// decades: ticks at 1, 2 and 5 times powers of ten. More: powers of ten, every k-th decade so
/// that there are at most 8 intervals.
fn log_axis(lo: f64, hi: f64) -> Axis {
    let (lo, hi) = if hi / lo > 1.0 + 1e-12 {
        (lo, hi)
    } else {
        (lo / 2.0, hi * 2.0)
    };
    let (a, b) = (lo.log10(), hi.log10());
    let (first, last, values, step) = if b - a < 1.0 {
        let (first, last, step, values) = linear_ticks(lo, hi, Y_INTERVALS, 0.0);
        let first = if first > 0.0 { first } else { lo };
        let values: Vec<f64> = values
            .into_iter()
            .filter(|&v| v >= first * (1.0 - 1e-12))
            .collect();
        (first, last, values, Some(step))
    } else if b - a <= 3.0 {
        let candidates: Vec<f64> = ((a.floor() as i32)..=(b.ceil() as i32))
            .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
            .collect();
        let first = candidates
            .iter()
            .copied()
            .rfind(|&c| c <= lo * (1.0 + 1e-9))
            .unwrap_or(candidates[0]);
        let last = candidates
            .iter()
            .copied()
            .find(|&c| c >= hi * (1.0 - 1e-9))
            .unwrap_or(candidates[candidates.len() - 1]);
        let values = candidates
            .into_iter()
            .filter(|&c| c >= first && c <= last)
            .collect();
        (first, last, values, None)
    } else {
        let k = ((b.ceil() - a.floor()) / 8.0).ceil().max(1.0);
        let e0 = ((a + 1e-9).floor() / k).floor() * k;
        let e1 = ((b - 1e-9).ceil() / k).ceil() * k;
        let count = ((e1 - e0) / k).round() as i32;
        let values = (0..=count)
            .map(|i| 10f64.powi((e0 + k * f64::from(i)) as i32))
            .collect();
        (10f64.powi(e0 as i32), 10f64.powi(e1 as i32), values, None)
    };
    let ticks = values
        .into_iter()
        .map(|value: f64| {
            // Sub-decade ticks share a step; 1-2-5 and decade ticks each show their own value.
            let (resolution, notation) = match step {
                Some(s) => (s, Notation::for_magnitude(last.abs())),
                None => (value, Notation::for_magnitude(value)),
            };
            Tick {
                value,
                label: format_tick(value, resolution, notation),
            }
        })
        .collect();
    Axis {
        lo: first,
        hi: last,
        scale: Scale::Log10,
        ticks,
    }
}

// ---------------------------------------------------------------------------------------------
// Layout and rendering

/// Where everything goes; `area` is the plot area, whose frame is drawn on its edge pixels.
#[derive(Debug, Clone)]
struct Layout {
    area: Rect,
    x: Axis,
    y: Axis,
    title_scale: i64,
}

impl Layout {
    fn new(plot: &Plot<'_>, series: &[Series]) -> Layout {
        let log = if plot.log_y {
            Scale::Log10
        } else {
            Scale::Linear
        };
        let points = || drawable(series, log);
        let range = |v: &mut dyn Iterator<Item = f64>| {
            v.fold(None, |r: Option<(f64, f64)>, v| match r {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            })
        };
        let (x_lo, x_hi) = range(&mut points().map(|p| p.0)).unwrap_or((0.0, 1.0));
        let integer_x = points().next().is_some() && points().all(|p| p.0.fract() == 0.0);
        let x = linear_axis(x_lo, x_hi, X_INTERVALS, if integer_x { 1.0 } else { 0.0 });
        let y = match range(&mut points().map(|p| p.1)) {
            None if plot.log_y => log_axis(1.0, 10.0),
            None => linear_axis(0.0, 1.0, Y_INTERVALS, 0.0),
            Some((lo, hi)) if plot.log_y => log_axis(lo, hi),
            Some((lo, hi)) => linear_axis(lo, hi, Y_INTERVALS, 0.0),
        };

        let title_scale = if text_width(plot.title, 3) <= WIDTH as i64 - 2 * MARGIN {
            3
        } else {
            2
        };
        let top = if plot.title.is_empty() {
            2 * MARGIN
        } else {
            MARGIN + GLYPH_ROWS as i64 * title_scale + MARGIN
        };
        let y_label_room = if plot.y_label.is_empty() {
            0
        } else {
            GLYPH_ROWS as i64 * TEXT_SCALE + 8
        };
        let widest_y_tick = y
            .ticks
            .iter()
            .map(|t| text_width(&t.label, TEXT_SCALE))
            .max()
            .unwrap_or(0);
        let left = MARGIN + y_label_room + widest_y_tick + TICK_GAP + TICK_LEN;
        // The last x tick label is centred on the right edge of the frame.
        let last_x_tick = x
            .ticks
            .last()
            .map_or(0, |t| text_width(&t.label, TEXT_SCALE));
        let right = WIDTH as i64 - 1 - (MARGIN + 8).max(last_x_tick / 2 + MARGIN);
        let x_label_room = if plot.x_label.is_empty() {
            0
        } else {
            GLYPH_ROWS as i64 * TEXT_SCALE + 6
        };
        let bottom = HEIGHT as i64
            - 1
            - MARGIN
            - x_label_room
            - GLYPH_ROWS as i64 * TEXT_SCALE
            - TICK_GAP
            - TICK_LEN;
        Layout {
            area: Rect {
                left,
                top,
                right,
                bottom,
            },
            x,
            y,
            title_scale,
        }
    }

    /// The pixel of data point (x, y), not rounded; may lie outside the plot area.
    fn to_pixel(&self, x: f64, y: f64) -> (f64, f64) {
        let a = self.area;
        (
            a.left as f64 + self.x.fraction(x) * (a.right - a.left) as f64,
            a.bottom as f64 - self.y.fraction(y) * (a.bottom - a.top) as f64,
        )
    }
}

/// The points that can be drawn on a y axis of scale `y`, series after series.
fn drawable(series: &[Series], y: Scale) -> impl Iterator<Item = (f64, f64)> + '_ {
    series.iter().flat_map(move |s| drawable_points(s, y))
}

fn drawable_points(s: &Series, y: Scale) -> impl Iterator<Item = (f64, f64)> + '_ {
    s.points.iter().copied().filter(move |&(px, py)| {
        px.is_finite() && py.is_finite() && (y == Scale::Linear || py > 0.0)
    })
}

fn render(plot: &Plot<'_>, series: &[Series]) -> Canvas {
    draw(plot, series).0
}

/// The finished canvas, and where its legend went.
fn draw(plot: &Plot<'_>, series: &[Series]) -> (Canvas, Option<Legend>) {
    let layout = Layout::new(plot, series);
    let area = layout.area;
    let mut canvas = Canvas::new(WIDTH, HEIGHT);

    let x_px = |v: f64| layout.to_pixel(v, layout.y.lo).0.round() as i64;
    let y_px = |v: f64| layout.to_pixel(layout.x.lo, v).1.round() as i64;
    for t in &layout.x.ticks {
        canvas.fill(x_px(t.value), area.top, 1, area.bottom - area.top, GRID);
    }
    for t in &layout.y.ticks {
        canvas.fill(area.left, y_px(t.value), area.right - area.left, 1, GRID);
    }

    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // Clamped so that a wild coordinate cannot make Bresenham walk for ever.
        let limit = (4 * WIDTH.max(HEIGHT)) as f64;
        let pixels: Vec<(i64, i64)> = drawable_points(s, layout.y.scale)
            .map(|(x, y)| {
                let (px, py) = layout.to_pixel(x, y);
                (
                    px.clamp(-limit, limit).round() as i64,
                    py.clamp(-limit, limit).round() as i64,
                )
            })
            .collect();
        match pixels.as_slice() {
            [] => {}
            [(x, y)] => {
                for dy in -3..=3 {
                    for dx in -3..=3 {
                        if area.contains(x + dx, y + dy) {
                            canvas.set(x + dx, y + dy, color);
                        }
                    }
                }
            }
            _ => {
                for pair in pixels.windows(2) {
                    canvas.line(pair[0], pair[1], color, area);
                }
            }
        }
    }

    canvas.outline(area, FRAME);
    let cap = CAP_ROWS as i64 * TEXT_SCALE;
    let mut free_from = i64::MIN;
    for t in &layout.x.ticks {
        let x = x_px(t.value);
        canvas.fill(x, area.bottom + 1, 1, TICK_LEN, FRAME);
        let w = text_width(&t.label, TEXT_SCALE);
        let start = x - w / 2;
        // A label that would touch the previous one is left out (its tick stays).
        if start >= free_from {
            let y = area.bottom + 1 + TICK_LEN + TICK_GAP;
            draw_text(
                &mut canvas,
                &t.label,
                start,
                y,
                TEXT_SCALE,
                INK,
                Direction::Right,
            );
            free_from = start + w + 3 * TEXT_SCALE;
        }
    }
    let mut free_above = i64::MAX;
    for t in &layout.y.ticks {
        let y = y_px(t.value);
        canvas.fill(area.left - TICK_LEN, y, TICK_LEN, 1, FRAME);
        let top = y - cap / 2;
        if top + cap + TEXT_SCALE <= free_above {
            let w = text_width(&t.label, TEXT_SCALE);
            let x = area.left - TICK_LEN - TICK_GAP - w;
            draw_text(
                &mut canvas,
                &t.label,
                x,
                top,
                TEXT_SCALE,
                INK,
                Direction::Right,
            );
            free_above = top - TEXT_SCALE;
        }
    }

    let plot_w = area.right - area.left;
    let plot_h = area.bottom - area.top;
    let x_label = fit_text(plot.x_label, TEXT_SCALE, plot_w);
    let w = text_width(&x_label, TEXT_SCALE);
    let y = HEIGHT as i64 - MARGIN - GLYPH_ROWS as i64 * TEXT_SCALE;
    let x = area.left + (plot_w - w) / 2;
    draw_text(
        &mut canvas,
        &x_label,
        x,
        y,
        TEXT_SCALE,
        INK,
        Direction::Right,
    );
    let y_label = fit_text(plot.y_label, TEXT_SCALE, plot_h);
    let w = text_width(&y_label, TEXT_SCALE);
    let y = area.top + (plot_h - w) / 2;
    draw_text(
        &mut canvas,
        &y_label,
        MARGIN,
        y,
        TEXT_SCALE,
        INK,
        Direction::Up,
    );
    let title = fit_text(plot.title, layout.title_scale, WIDTH as i64 - 2 * MARGIN);
    let w = text_width(&title, layout.title_scale);
    let x = (WIDTH as i64 - w) / 2;
    draw_text(
        &mut canvas,
        &title,
        x,
        MARGIN,
        layout.title_scale,
        INK,
        Direction::Right,
    );

    let legend = Legend::new(series, area, &canvas);
    if let Some(legend) = &legend {
        legend.draw(&mut canvas);
    }
    (canvas, legend)
}

/// The legend box: one row per series (a color swatch, then the name), as many as fit in the plot
/// area; when some do not fit, the last row says how many were left out. It goes in the upper
/// right corner of the plot area unless another corner hides fewer data pixels (a rising curve).
#[derive(Debug, Clone)]
struct Legend {
    area: Rect,
    rows: Vec<(Option<Rgb>, String)>,
}

const LEGEND_PAD: i64 = 8;
const LEGEND_ROW: i64 = 20;
const SWATCH: i64 = 22;
/// Distance between the legend box and the frame.
const LEGEND_INSET: i64 = 10;

/// Pixels of `r` that are neither background nor grid, i.e. data, on a canvas without a legend.
fn hidden_data(canvas: &Canvas, r: Rect) -> usize {
    (r.top..=r.bottom)
        .flat_map(|y| (r.left..=r.right).map(move |x| (x, y)))
        .filter(|&(x, y)| !matches!(canvas.get(x, y), Some(WHITE | GRID) | None))
        .count()
}

impl Legend {
    fn new(series: &[Series], plot: Rect, canvas: &Canvas) -> Option<Legend> {
        if series.is_empty() {
            return None;
        }
        let room = (plot.bottom - plot.top - 2 * LEGEND_PAD - 20) / LEGEND_ROW;
        let fit = (room.max(1) as usize).min(series.len());
        let shown = if fit < series.len() { fit - 1 } else { fit };
        let max_name = (plot.right - plot.left) / 2;
        let mut rows: Vec<(Option<Rgb>, String)> = series[..shown]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let color = PALETTE[i % PALETTE.len()];
                (Some(color), fit_text(&s.name, TEXT_SCALE, max_name))
            })
            .collect();
        if shown < series.len() {
            rows.push((None, format!("+{} more", series.len() - shown)));
        }
        let text_w = rows
            .iter()
            .map(|(_, t)| text_width(t, TEXT_SCALE))
            .max()
            .unwrap_or(0);
        let w = LEGEND_PAD + SWATCH + LEGEND_PAD + text_w + LEGEND_PAD;
        let h = 2 * LEGEND_PAD + rows.len() as i64 * LEGEND_ROW
            - (LEGEND_ROW - CAP_ROWS as i64 * TEXT_SCALE);
        // Corners in order of preference; the first that hides the fewest data pixels wins.
        let (left, right) = (plot.left + LEGEND_INSET, plot.right - LEGEND_INSET - w);
        let (top, bottom) = (plot.top + LEGEND_INSET, plot.bottom - LEGEND_INSET - h);
        let area = [(right, top), (right, bottom), (left, top), (left, bottom)]
            .into_iter()
            .map(|(x, y)| Rect {
                left: x,
                top: y,
                right: x + w,
                bottom: y + h,
            })
            .min_by_key(|&r| hidden_data(canvas, r))?;
        Some(Legend { area, rows })
    }

    /// The top left corner of row `i`'s text.
    fn text_at(&self, i: usize) -> (i64, i64) {
        (
            self.area.left + LEGEND_PAD + SWATCH + LEGEND_PAD,
            self.area.top + LEGEND_PAD + i as i64 * LEGEND_ROW,
        )
    }

    fn draw(&self, canvas: &mut Canvas) {
        let a = self.area;
        canvas.fill(
            a.left,
            a.top,
            a.right - a.left + 1,
            a.bottom - a.top + 1,
            WHITE,
        );
        canvas.outline(a, LEGEND_BORDER);
        let cap = CAP_ROWS as i64 * TEXT_SCALE;
        for (i, (color, text)) in self.rows.iter().enumerate() {
            let (x, y) = self.text_at(i);
            if let Some(c) = color {
                canvas.fill(a.left + LEGEND_PAD, y + cap / 2 - 1, SWATCH, 3, *c);
            }
            draw_text(canvas, text, x, y, TEXT_SCALE, INK, Direction::Right);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text

#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    /// Left to right; (x, y) is the top left of the glyph cells.
    Right,
    /// Bottom to top (rotated a quarter turn counter-clockwise); (x, y) is the top left of the
    /// rotated box, whose left edge is the top of the glyph cells.
    Up,
}

const GLYPH_COLUMNS: u32 = 5;
const GLYPH_ROWS: usize = 9;
/// Rows above the baseline; the last two rows of a glyph are its descender.
const CAP_ROWS: usize = 7;

fn glyph(c: char) -> &'static [u8; GLYPH_ROWS] {
    let i = match c {
        ' '..='~' => c as usize - 32,
        _ => '?' as usize - 32,
    };
    &GLYPHS[i]
}

/// The first and last inked columns of `c` (0 = leftmost), or None for a blank glyph.
fn ink_columns(c: char) -> Option<(u32, u32)> {
    let mask = glyph(c).iter().fold(0u8, |m, row| m | row);
    if mask == 0 {
        return None;
    }
    let first = mask.leading_zeros() - (8 - GLYPH_COLUMNS);
    let last = GLYPH_COLUMNS - 1 - mask.trailing_zeros();
    Some((first, last))
}

/// Columns that `c` advances the pen: its inked width and a one-column gap.
fn advance(c: char) -> i64 {
    match ink_columns(c) {
        Some((first, last)) => i64::from(last - first + 2),
        None => 3,
    }
}

/// Pixels along the baseline that `text` covers at `scale`, without the gap after the last glyph.
fn text_width(text: &str, scale: i64) -> i64 {
    let columns: i64 = text.chars().map(advance).sum();
    (columns - 1).max(0) * scale
}

/// `text`, or its longest prefix followed by ".." that is at most `max` pixels wide.
fn fit_text(text: &str, scale: i64, max: i64) -> String {
    if text_width(text, scale) <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().collect();
    while !out.is_empty() {
        out.pop();
        let candidate = format!("{}..", out.trim_end());
        if text_width(&candidate, scale) <= max {
            return candidate;
        }
    }
    String::new()
}

fn draw_text(canvas: &mut Canvas, text: &str, x: i64, y: i64, scale: i64, c: Rgb, dir: Direction) {
    let width = text_width(text, scale);
    let mut pen = 0i64;
    for ch in text.chars() {
        if let Some((first, last)) = ink_columns(ch) {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in first..=last {
                    if bits & (1 << (GLYPH_COLUMNS - 1 - col)) == 0 {
                        continue;
                    }
                    // (u, v): offset along the text and down the glyph, in pixels.
                    let u = pen + i64::from(col - first) * scale;
                    let v = row as i64 * scale;
                    match dir {
                        Direction::Right => canvas.fill(x + u, y + v, scale, scale, c),
                        Direction::Up => canvas.fill(x + v, y + width - u - scale, scale, scale, c),
                    }
                }
            }
        }
        pen += advance(ch) * scale;
    }
}

/// The bitmap font, indexed by `char - 32`: 9 rows of 5 columns each, bit 4 the leftmost column.
/// Rows 0..7 stand on the baseline; rows 7 and 8 hold descenders (g j p q y , ;) and `_`.
#[rustfmt::skip]
const GLYPHS: [[u8; GLYPH_ROWS]; 95] = [
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // space
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100, 0b00000, 0b00000], // !
    [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // "
    [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010, 0b00000, 0b00000], // #
    [0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100, 0b00000, 0b00000], // $
    [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011, 0b00000, 0b00000], // %
    [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101, 0b00000, 0b00000], // &
    [0b00100, 0b00100, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '
    [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010, 0b00000, 0b00000], // (
    [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000, 0b00000, 0b00000], // )
    [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000, 0b00000, 0b00000], // *
    [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000, 0b00000, 0b00000], // +
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000], // ,
    [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // -
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000], // .
    [0b00001, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b10000, 0b00000, 0b00000], // /
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110, 0b00000, 0b00000], // 0
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // 1
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000, 0b00000], // 2
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110, 0b00000, 0b00000], // 3
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010, 0b00000, 0b00000], // 4
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110, 0b00000, 0b00000], // 5
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // 6
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00000, 0b00000], // 7
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // 8
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100, 0b00000, 0b00000], // 9
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000, 0b00000], // :
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000, 0b00000], // ;
    [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00000, 0b00000], // <
    [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000], // =
    [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000, 0b00000, 0b00000], // >
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100, 0b00000, 0b00000], // ?
    [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110, 0b00000, 0b00000], // @
    [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // A
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110, 0b00000, 0b00000], // B
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000, 0b00000], // C
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100, 0b00000, 0b00000], // D
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, 0b00000, 0b00000], // E
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000, 0b00000], // F
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111, 0b00000, 0b00000], // G
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // H
    [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // I
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100, 0b00000, 0b00000], // J
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, 0b00000, 0b00000], // K
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, 0b00000, 0b00000], // L
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // M
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b00000, 0b00000], // N
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // O
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000, 0b00000], // P
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101, 0b00000, 0b00000], // Q
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, 0b00000, 0b00000], // R
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110, 0b00000, 0b00000], // S
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00000], // T
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // U
    [0b10001, 0b10001, 0b10001, 0b01010, 0b01010, 0b00100, 0b00100, 0b00000, 0b00000], // V
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, 0b00000, 0b00000], // W
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001, 0b00000, 0b00000], // X
    [0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00000], // Y
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111, 0b00000, 0b00000], // Z
    [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110, 0b00000, 0b00000], // [
    [0b10000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00001, 0b00000, 0b00000], // backslash
    [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110, 0b00000, 0b00000], // ]
    [0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // ^
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111, 0b00000], // _
    [0b01000, 0b00100, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // `
    [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111, 0b00000, 0b00000], // a
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110, 0b00000, 0b00000], // b
    [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000, 0b00000], // c
    [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111, 0b00000, 0b00000], // d
    [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110, 0b00000, 0b00000], // e
    [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000, 0b00000, 0b00000], // f
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // g
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // h
    [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // i
    [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // j
    [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b00000, 0b00000], // k
    [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // l
    [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001, 0b00000, 0b00000], // m
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // n
    [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // o
    [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000], // p
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001], // q
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000, 0b00000, 0b00000], // r
    [0b00000, 0b00000, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110, 0b00000, 0b00000], // s
    [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110, 0b00000, 0b00000], // t
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101, 0b00000, 0b00000], // u
    [0b00000, 0b00000, 0b10001, 0b10001, 0b01010, 0b01010, 0b00100, 0b00000, 0b00000], // v
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010, 0b00000, 0b00000], // w
    [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b00000, 0b00000], // x
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // y
    [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000, 0b00000], // z
    [0b00010, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00010, 0b00000, 0b00000], // {
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00000], // |
    [0b01000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b01000, 0b00000, 0b00000], // }
    [0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000], // ~
];

#[cfg(test)]
mod tests {
    use super::*;

    fn values(axis: &Axis) -> Vec<f64> {
        axis.ticks.iter().map(|t| t.value).collect()
    }

    fn labels(axis: &Axis) -> Vec<&str> {
        axis.ticks.iter().map(|t| t.label.as_str()).collect()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

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

    fn count(canvas: &Canvas, r: Rect, c: Rgb) -> usize {
        (r.top..=r.bottom)
            .flat_map(|y| (r.left..=r.right).map(move |x| (x, y)))
            .filter(|&(x, y)| canvas.get(x, y) == Some(c))
            .count()
    }

    fn whole(canvas: &Canvas) -> Rect {
        Rect {
            left: 0,
            top: 0,
            right: canvas.width as i64 - 1,
            bottom: canvas.height as i64 - 1,
        }
    }

    #[test]
    fn linear_ticks_are_1_2_5_multiples_covering_the_data() {
        let a = linear_axis(0.0, 1.0, 5.0, 0.0);
        assert_close(&values(&a), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(labels(&a), ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));

        // Widened to the enclosing multiples of the step.
        let a = linear_axis(0.13, 0.87, 5.0, 0.0);
        assert_close(&values(&a), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let a = linear_axis(-3.0, 17.0, 5.0, 0.0);
        assert_close(&values(&a), &[-5.0, 0.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(labels(&a), ["-5", "0", "5", "10", "15", "20"]);

        let a = linear_axis(0.0, 120_000.0, 6.0, 0.0);
        assert_eq!(
            labels(&a),
            ["0", "20k", "40k", "60k", "80k", "100k", "120k"]
        );
        let a = linear_axis(0.0, 5e-4, 5.0, 0.0);
        assert_eq!(labels(&a), ["0", "1e-4", "2e-4", "3e-4", "4e-4", "5e-4"]);
        let a = linear_axis(0.01, 0.05, 4.0, 0.0);
        assert_eq!(labels(&a), ["0.01", "0.02", "0.03", "0.04", "0.05"]);

        // Integer steps: the x axis of 0..2 steps does not get half steps.
        let a = linear_axis(0.0, 2.0, 6.0, 1.0);
        assert_close(&values(&a), &[0.0, 1.0, 2.0]);
    }

    #[test]
    fn a_flat_range_is_widened_around_its_value() {
        let a = linear_axis(2.5, 2.5, 5.0, 0.0);
        assert!(a.lo < 2.5 && a.hi > 2.5, "{a:?}");
        assert!(a.ticks.len() >= 3, "{a:?}");
        let a = linear_axis(0.0, 0.0, 5.0, 0.0);
        assert_close(&values(&a), &[-1.0, -0.5, 0.0, 0.5, 1.0]);
        let a = log_axis(1.0, 1.0);
        assert!(a.lo < 1.0 && a.hi > 1.0 && a.lo > 0.0, "{a:?}");
    }

    #[test]
    fn log_ticks_by_decade_count() {
        let a = log_axis(0.01, 100.0);
        assert_close(&values(&a), &[0.01, 0.1, 1.0, 10.0, 100.0]);
        assert_eq!(labels(&a), ["0.01", "0.1", "1", "10", "100"]);

        let a = log_axis(0.05, 2.3);
        assert_close(&values(&a), &[0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]);
        assert_eq!((a.lo, a.hi), (0.05, 5.0));

        // 20 decades: every third, from the enclosing multiples of 3.
        let a = log_axis(1e-10, 1e10);
        let want: Vec<f64> = (-4..=4).map(|k| 10f64.powi(3 * k)).collect();
        assert_close(&values(&a), &want);
        assert_eq!(labels(&a)[..3], ["1e-12", "1e-9", "1e-6"]);
        assert_eq!(labels(&a)[3..6], ["0.001", "1", "1000"]);
        assert_eq!(labels(&a)[6..], ["1M", "1G", "1e12"]);

        // Less than a decade: linear ticks, the axis kept above 0.
        let a = log_axis(0.8, 2.3);
        assert_close(&values(&a), &[0.5, 1.0, 1.5, 2.0, 2.5]);
        let a = log_axis(1.8, 10.5);
        assert_eq!(a.lo, 1.8);
        assert_close(&values(&a), &[2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        assert!(a.ticks.iter().all(|t| t.value > 0.0));
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(format_tick(1.5, 0.5, Notation::Plain), "1.5");
        assert_eq!(format_tick(0.6000000000000001, 0.2, Notation::Plain), "0.6");
        assert_eq!(format_tick(0.02, 0.01, Notation::Plain), "0.02");
        assert_eq!(format_tick(-0.5, 0.5, Notation::Plain), "-0.5");
        assert_eq!(
            format_tick(1e-4, 1e-4, Notation::for_magnitude(1e-4)),
            "1e-4"
        );
        assert_eq!(format_tick(2.5e-5, 5e-6, Notation::Exponent), "2.5e-5");
        assert_eq!(format_tick(9.9999999e-5, 1e-5, Notation::Exponent), "1e-4");
        assert_eq!(
            format_tick(1e15, 1e15, Notation::for_magnitude(1e15)),
            "1e15"
        );
        assert_eq!(
            format_tick(12_000.0, 2000.0, Notation::for_magnitude(12e3)),
            "12k"
        );
        assert_eq!(
            format_tick(1.5e6, 5e5, Notation::for_magnitude(1.5e6)),
            "1.5M"
        );
        assert_eq!(format_tick(1e-17, 0.1, Notation::Plain), "0");
    }

    #[test]
    fn the_glyph_table_covers_printable_ascii() {
        assert_eq!(ink_columns(' '), None);
        let mut seen = std::collections::HashMap::new();
        for c in '!'..='~' {
            assert!(ink_columns(c).is_some(), "{c:?} has no glyph");
            if let Some(other) = seen.insert(*glyph(c), c) {
                panic!("{c:?} and {other:?} have the same glyph");
            }
        }
        // Descenders only where they belong.
        for c in '!'..='~' {
            let descends = glyph(c)[CAP_ROWS..].iter().any(|&r| r != 0);
            assert_eq!(descends, "gjpqy,;_".contains(c), "{c:?}");
        }
        assert_eq!(glyph('\u{e9}'), glyph('?'));
        assert_eq!(text_width("", 2), 0);
        assert_eq!(text_width("i", 1), 3);
        assert_eq!(text_width("ii", 2), 2 * (3 + 1 + 3));
    }

    #[test]
    fn upward_text_is_the_rotated_horizontal_text() {
        let (w, h) = (60, 30);
        let mut right = Canvas::new(w, h);
        let mut up = Canvas::new(h, w);
        draw_text(&mut right, "Lg7", 0, 0, 2, INK, Direction::Right);
        draw_text(&mut up, "Lg7", 0, 0, 2, INK, Direction::Up);
        let tw = text_width("Lg7", 2);
        let mut inked = 0;
        for y in 0..h as i64 {
            for x in 0..tw {
                assert_eq!(right.get(x, y), up.get(y, tw - 1 - x), "({x}, {y})");
                inked += usize::from(right.get(x, y) == Some(INK));
            }
        }
        assert!(inked > 0);
    }

    #[test]
    fn the_written_file_is_a_png_of_the_canvas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let series = [curve("train", &[(0.0, 2.0), (50.0, 1.0), (100.0, 0.5)])];
        write_png(&path, &PLOT, &series).unwrap();
        let file = std::io::BufReader::new(fs::File::open(&path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH as u32, HEIGHT as u32));
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        assert_eq!(
            &buf[..info.buffer_size()],
            &render(&PLOT, &series).pixels[..]
        );
        // Nothing but the plot is left in the directory.
        let names: Vec<_> = fs::read_dir(dir.path())
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
        let series = [
            curve("a", &[(0.0, 0.0), (10.0, 1.0)]),
            curve("b", &[(0.0, 1.0), (10.0, 0.0)]),
        ];
        for log_y in [false, true] {
            let series = if log_y {
                [
                    curve("a", &[(0.0, 0.01), (10.0, 1.0)]),
                    curve("b", &[(0.0, 1.0), (10.0, 0.01)]),
                ]
            } else {
                series.clone()
            };
            let plot = Plot { log_y, ..PLOT };
            let layout = Layout::new(&plot, &series);
            let canvas = render(&plot, &series);
            for (i, s) in series.iter().enumerate() {
                let ((x0, y0), (x1, y1)) = (
                    layout.to_pixel(s.points[0].0, s.points[0].1),
                    layout.to_pixel(s.points[1].0, s.points[1].1),
                );
                // Away from the crossing in the middle and from the legend in the upper right.
                for t in [0.1, 0.2, 0.3, 0.4] {
                    let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
                    let near = Rect {
                        left: x.round() as i64 - 1,
                        top: y.round() as i64 - 1,
                        right: x.round() as i64 + 1,
                        bottom: y.round() as i64 + 1,
                    };
                    assert!(
                        count(&canvas, near, PALETTE[i]) > 0,
                        "series {i} at t={t} log={log_y}"
                    );
                }
            }
            // And nowhere far from its line: a corner of the plot area that no line passes.
            let a = layout.area;
            let mid_left = Rect {
                left: a.left + 2,
                top: (a.top + a.bottom) / 2 - 20,
                right: a.left + 40,
                bottom: (a.top + a.bottom) / 2 + 20,
            };
            assert_eq!(count(&canvas, mid_left, PALETTE[0]), 0);
            assert_eq!(count(&canvas, mid_left, PALETTE[1]), 0);
        }
    }

    #[test]
    fn the_legend_shows_each_name_beside_its_color() {
        let series = [
            curve("train", &[(0.0, 3.0), (100.0, 1.0)]),
            curve("eval", &[(0.0, 3.2), (100.0, 1.4)]),
        ];
        let layout = Layout::new(&PLOT, &series);
        let (canvas, legend) = draw(&PLOT, &series);
        let legend = legend.unwrap();
        let a = legend.area;
        // Falling curves leave the upper right corner free.
        assert_eq!(
            (a.right, a.top),
            (
                layout.area.right - LEGEND_INSET,
                layout.area.top + LEGEND_INSET
            )
        );
        assert!(a.left > layout.area.left && a.right < layout.area.right);
        assert!(a.top > layout.area.top && a.bottom < layout.area.bottom);
        for (i, s) in series.iter().enumerate() {
            let (x, y) = legend.text_at(i);
            let text = Rect {
                left: x,
                top: y,
                right: x + text_width(&s.name, TEXT_SCALE) - 1,
                bottom: y + LEGEND_ROW - 1,
            };
            // Exactly the name's glyph pixels are inked there.
            let bits: u32 = s
                .name
                .chars()
                .map(|c| glyph(c).iter().map(|r| r.count_ones()).sum::<u32>())
                .sum();
            let inked = count(&canvas, text, INK);
            assert_eq!(
                inked,
                bits as usize * (TEXT_SCALE * TEXT_SCALE) as usize,
                "{}",
                s.name
            );
            let swatch = Rect {
                left: a.left,
                top: y,
                right: x - 1,
                bottom: y + LEGEND_ROW - 1,
            };
            assert!(
                count(&canvas, swatch, PALETTE[i]) >= SWATCH as usize,
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn the_legend_moves_off_a_rising_curve() {
        let series = [curve("accuracy", &[(0.0, 0.0), (100.0, 1.0)])];
        let layout = Layout::new(&PLOT, &series);
        let legend = draw(&PLOT, &series).1.unwrap().area;
        let blank = Canvas::new(WIDTH, HEIGHT);
        let upper_right = Legend::new(&series, layout.area, &blank).unwrap().area;
        assert_eq!(upper_right.right, layout.area.right - LEGEND_INSET);
        assert_eq!(upper_right.top, layout.area.top + LEGEND_INSET);
        // The diagonal crosses the upper right and lower left corners' boxes, not the others; the
        // lower right comes next in preference.
        assert_eq!(legend.right, upper_right.right);
        assert_eq!(legend.bottom, layout.area.bottom - LEGEND_INSET);
        let mut line_only = Canvas::new(WIDTH, HEIGHT);
        let (a, b) = (layout.to_pixel(0.0, 0.0), layout.to_pixel(100.0, 1.0));
        let px = |p: (f64, f64)| (p.0.round() as i64, p.1.round() as i64);
        line_only.line(px(a), px(b), PALETTE[0], layout.area);
        assert_eq!(hidden_data(&line_only, legend), 0);
        assert!(hidden_data(&line_only, upper_right) > 0);
    }

    #[test]
    fn a_long_series_list_ends_with_a_count_of_the_rest() {
        let series: Vec<Series> = (0..40)
            .map(|i| curve(&format!("run {i}"), &[(0.0, f64::from(i)), (1.0, 1.0)]))
            .collect();
        let layout = Layout::new(&PLOT, &series);
        let legend = draw(&PLOT, &series).1.unwrap();
        assert!(legend.area.bottom < layout.area.bottom);
        let (_, last) = legend.rows.last().unwrap();
        assert_eq!(*last, format!("+{} more", 40 - (legend.rows.len() - 1)));
    }

    #[test]
    fn degenerate_inputs_still_draw_axes() {
        let dark = |canvas: &Canvas| count(canvas, whole(canvas), INK);
        // No series: the frame, ticks and labels, no legend, no series color.
        let empty = render(&PLOT, &[]);
        assert!(dark(&empty) > 0);
        let area = Layout::new(&PLOT, &[]).area;
        assert_eq!(
            count(&empty, area, FRAME),
            2 * (area.right - area.left + 1 + area.bottom - area.top - 1) as usize
        );
        for c in PALETTE {
            assert_eq!(count(&empty, whole(&empty), c), 0);
        }
        assert_close(
            &values(&Layout::new(&PLOT, &[]).x),
            &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        );
        let log_empty = render(
            &Plot {
                log_y: true,
                ..PLOT
            },
            &[],
        );
        assert!(dark(&log_empty) > 0);

        // A single point gets a marker; non-finite points and, on a log axis, y <= 0 are skipped.
        let single = [curve("one", &[(5.0, 0.3)])];
        let layout = Layout::new(&PLOT, &single);
        let canvas = render(&PLOT, &single);
        let (x, y) = layout.to_pixel(5.0, 0.3);
        assert_eq!(
            canvas.get(x.round() as i64, y.round() as i64),
            Some(PALETTE[0])
        );

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
        let layout = Layout::new(&plot, &messy);
        assert_eq!((layout.x.lo, layout.x.hi), (0.0, 3.0));
        assert_eq!((layout.y.lo, layout.y.hi), (1e-3, 1.0));
        assert!(count(&render(&plot, &messy), whole(&empty), PALETTE[0]) > 0);
        let linear = Layout::new(&PLOT, &messy);
        assert_eq!((linear.x.lo, linear.x.hi), (0.0, 4.0));
        assert!(linear.y.lo <= -1.0);

        // Extremes of f64 neither panic nor loop for long.
        let extreme = [curve(
            "e",
            &[(0.0, 1e308), (1.0, -1e308), (f64::MAX, 5e-324)],
        )];
        render(&PLOT, &extreme);
        render(
            &Plot {
                log_y: true,
                ..PLOT
            },
            &extreme,
        );

        // Huge and tiny values: labels stay short enough to leave the plot most of the width.
        let wide = [curve("w", &[(0.0, 1e-9), (1e7, 3e9)])];
        let layout = Layout::new(&PLOT, &wide);
        assert!(
            layout.area.right - layout.area.left > WIDTH as i64 * 3 / 4,
            "{layout:?}"
        );
        assert!(
            labels(&layout.x).iter().all(|l| l.len() <= 4),
            "{:?}",
            labels(&layout.x)
        );
        assert!(
            labels(&layout.y).iter().all(|l| l.len() <= 4),
            "{:?}",
            labels(&layout.y)
        );
    }
}
