//! The loss-curve PNG written at the end of a run: training loss per optimizer step (light blue,
//! with a smoothed line in dark blue) and validation loss (orange dots) on a log-scaled y axis,
//! with grid lines and labelled ticks on both axes, axis titles and a legend. Drawn with the
//! `image` crate and a small built-in 5×7 bitmap font (no font files).

use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 900;
const H: u32 = 500;
/// Plot area margins: left (tick labels + y title), right, top (legend), bottom (ticks + x title).
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 52.0;

const TRAIN: Rgb<u8> = Rgb([150, 180, 230]);
const SMOOTH: Rgb<u8> = Rgb([20, 60, 160]);
const VAL: Rgb<u8> = Rgb([240, 130, 20]);
const INK: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);

/// 5×7 glyphs, one row per string ('#' set), for the characters the labels use.
fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c {
        '0' => [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
        '1' => ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        '2' => [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
        '3' => ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
        '4' => ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
        '5' => ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
        '6' => ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
        '7' => ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
        '8' => [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
        '9' => [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
        '.' => ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
        '-' => ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
        '+' => ["     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "],
        '(' => ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
        ')' => [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
        ',' => ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "],
        ' ' => ["     "; 7],
        'a' => ["     ", "     ", " ### ", "    #", " ####", "#   #", " ####"],
        'c' => ["     ", "     ", " ### ", "#    ", "#    ", "#   #", " ### "],
        'd' => ["    #", "    #", " ## #", "#  ##", "#   #", "#   #", " ####"],
        'f' => ["  ## ", " #   ", "#### ", " #   ", " #   ", " #   ", " #   "],
        'e' => ["     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "],
        'g' => ["     ", "     ", " ####", "#   #", " ####", "    #", " ### "],
        'h' => ["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'i' => ["  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "],
        'k' => ["#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # "],
        'l' => [" ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        'm' => ["     ", "     ", "## # ", "# # #", "# # #", "#   #", "#   #"],
        'n' => ["     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'o' => ["     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### "],
        'p' => ["     ", "     ", "#### ", "#   #", "#### ", "#    ", "#    "],
        'r' => ["     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    "],
        's' => ["     ", "     ", " ####", "#    ", " ### ", "    #", "#### "],
        't' => [" #   ", " #   ", "###  ", " #   ", " #   ", " #  #", "  ## "],
        'u' => ["     ", "     ", "#   #", "#   #", "#   #", "#  ##", " ## #"],
        'v' => ["     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  "],
        'x' => ["     ", "     ", "#   #", " # # ", "  #  ", " # # ", "#   #"],
        'z' => ["     ", "     ", "#####", "   # ", "  #  ", " #   ", "#####"],
        _ => return None,
    })
}

/// Advance per character, pixels.
const ADVANCE: i64 = 6;

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * ADVANCE - 1
}

/// Draw `s` with its top-left corner at (x, y); characters without a glyph are left blank.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch.to_ascii_lowercase()) else { continue };
        for (dy, row) in rows.iter().enumerate() {
            for (dx, b) in row.bytes().enumerate() {
                if b == b'#' {
                    put(img, x + i as i64 * ADVANCE + dx as i64, y + dy as i64, c);
                }
            }
        }
    }
}

/// Draw `s` rotated a quarter turn counter-clockwise (read bottom to top), its glyph tops at
/// column `x`, centred on row `cy`.
fn text_vertical(img: &mut RgbImage, x: i64, cy: i64, s: &str, c: Rgb<u8>) {
    let y0 = cy + text_width(s) / 2;
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch.to_ascii_lowercase()) else { continue };
        for (dy, row) in rows.iter().enumerate() {
            for (dx, b) in row.bytes().enumerate() {
                if b == b'#' {
                    put(img, x + dy as i64, y0 - i as i64 * ADVANCE - dx as i64, c);
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(img, (x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64, c);
    }
}

fn dot(img: &mut RgbImage, (x, y): (f64, f64), c: Rgb<u8>) {
    for dx in -3..=3 {
        for dy in -3..=3 {
            if dx * dx + dy * dy <= 9 {
                put(img, x as i64 + dx, y as i64 + dy, c);
            }
        }
    }
}

/// A loss value as a short label: 3 significant digits in plain notation between 1e-3 and 1e5,
/// else scientific (`2e-05`).
fn value_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let e = a.log10().floor() as i32;
        let m = v / 10f64.powi(e);
        let m = if (m.round() - m).abs() < 1e-6 { format!("{}", m.round()) } else { format!("{m:.1}") };
        return format!("{m}e{e}");
    }
    let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Y ticks (loss values) for a log axis spanning [10^lo, 10^hi]: powers of ten, with 2× and 5×
/// added while there are few, and 1.5/3/7 for a narrow range; at most about 8 (a range too
/// narrow for any of those gets two ticks near its ends).
fn y_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mantissas: [&[f64]; 3] = [&[1.0], &[1.0, 2.0, 5.0], &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]];
    let mut best = Vec::new();
    for ms in mantissas {
        let mut t = Vec::new();
        for d in (lo.floor() as i32 - 1)..=(hi.ceil() as i32) {
            for m in ms {
                let v = m * 10f64.powi(d);
                let l = v.log10();
                if l >= lo - 1e-9 && l <= hi + 1e-9 {
                    t.push(v);
                }
            }
        }
        if t.len() > 8 && !best.is_empty() {
            break;
        }
        best = t;
        if best.len() >= 4 {
            break;
        }
    }
    if best.len() < 2 {
        // A very narrow range: label its two ends.
        best = vec![10f64.powf(lo + (hi - lo) * 0.1), 10f64.powf(hi - (hi - lo) * 0.1)];
    }
    best
}

/// X ticks (steps) for [0, max]: a 1/2/5 × 10^k spacing giving at most about 8 intervals.
fn x_ticks(max: u64) -> Vec<u64> {
    let mut spacing = 1u64;
    'outer: loop {
        for m in [1, 2, 5] {
            let s = spacing * m;
            if max / s <= 8 {
                spacing = s;
                break 'outer;
            }
        }
        spacing *= 10;
    }
    (0..=max / spacing).map(|i| i * spacing).collect()
}

/// The plot area's grid lines, tick marks and labels (`xs`, `ys`: pixel position and label), and
/// its two axis lines.
fn axes(img: &mut RgbImage, xs: &[(f64, String)], ys: &[(f64, String)]) {
    let (x0, x1, y0, y1) = (LEFT, W as f64 - RIGHT, TOP, H as f64 - BOTTOM);
    for (y, l) in ys {
        line(img, (x0, *y), (x1, *y), GRID);
        line(img, (x0 - 4.0, *y), (x0, *y), INK);
        text(img, x0 as i64 - 7 - text_width(l), *y as i64 - 3, l, INK);
    }
    for (x, l) in xs {
        line(img, (*x, y0), (*x, y1), GRID);
        line(img, (*x, y1), (*x, y1 + 4.0), INK);
        text(img, *x as i64 - text_width(l) / 2, y1 as i64 + 8, l, INK);
    }
    line(img, (x0, y0), (x0, y1), INK);
    line(img, (x0, y1), (x1, y1), INK);
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Key {
    Line,
    Dot,
    Mark,
}

/// Titles of both axes and a legend of (label, colour, key).
fn frame(img: &mut RgbImage, x_title: &str, y_title: &str, legend: &[(&str, Rgb<u8>, Key)]) {
    let (x0, x1, y0, y1) = (LEFT, W as f64 - RIGHT, TOP, H as f64 - BOTTOM);
    text(img, ((x0 + x1) / 2.0) as i64 - text_width(x_title) / 2, H as i64 - 14, x_title, INK);
    text_vertical(img, 6, ((y0 + y1) / 2.0) as i64, y_title, INK);
    let mut lx = x0 as i64 + 4;
    for &(label, c, key) in legend {
        match key {
            Key::Mark => line(img, (lx as f64 + 8.0, 9.0), (lx as f64 + 8.0, 21.0), c),
            Key::Dot => dot(img, (lx as f64 + 8.0, 15.0), c),
            Key::Line => {
                for dy in 0..2 {
                    line(img, (lx as f64, 14.0 + dy as f64), (lx as f64 + 16.0, 14.0 + dy as f64), c);
                }
            }
        }
        text(img, lx + 22, 12, label, INK);
        lx += 22 + text_width(label) + 18;
    }
}

/// The LR range test's curve (`lorahost lr-find`): each step's loss (light blue) and the
/// smoothed loss (dark blue) against the LR, both axes log-scaled, with the suggested LR as a
/// vertical orange line; written as a PNG atomically. `points`: (LR, loss, smoothed loss).
pub fn write_lr_curve(path: &Path, points: &[(f64, f64, f64)], suggested: Option<f64>) -> anyhow::Result<()> {
    let img = render_lr(points, suggested);
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::fsutil::write_atomic(path, &bytes)?;
    Ok(())
}

fn render_lr(points: &[(f64, f64, f64)], suggested: Option<f64>) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    frame(
        &mut img,
        "learning rate (log scale)",
        "loss (log scale)",
        &[("loss", TRAIN, Key::Line), ("smoothed", SMOOTH, Key::Line), ("suggested", VAL, Key::Mark)],
    );
    let ok = |v: f64| v.is_finite() && v > 0.0;
    let pts: Vec<(f64, f64, f64)> =
        points.iter().copied().filter(|p| ok(p.0) && ok(p.1) && ok(p.2)).collect();
    let (x0, x1, y0, y1) = (LEFT, W as f64 - RIGHT, TOP, H as f64 - BOTTOM);
    if pts.len() < 2 {
        text(&mut img, ((x0 + x1) / 2.0) as i64 - 60, ((y0 + y1) / 2.0) as i64, "no finite loss values", INK);
        return img;
    }
    let range = |f: &dyn Fn(&(f64, f64, f64)) -> f64| {
        let lo = pts.iter().map(f).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.04).max(0.02);
        (lo - pad, hi + pad)
    };
    let (xlo, xhi) = range(&|p| p.0.log10());
    let (ylo, yhi) = range(&|p| p.1.log10().min(p.2.log10()));
    let (ylo, yhi) = (ylo.min(range(&|p| p.2.log10()).0), yhi);
    let map = |lr: f64, v: f64| {
        (x0 + (x1 - x0) * (lr.log10() - xlo) / (xhi - xlo), y0 + (y1 - y0) * (yhi - v.log10()) / (yhi - ylo))
    };
    let ys: Vec<(f64, String)> =
        y_ticks(ylo, yhi).into_iter().map(|v| (map(1.0, v).1, value_label(v))).collect();
    let xs: Vec<(f64, String)> =
        y_ticks(xlo, xhi).into_iter().map(|v| (map(v, 1.0).0, value_label(v))).collect();
    axes(&mut img, &xs, &ys);
    for w in pts.windows(2) {
        line(&mut img, map(w[0].0, w[0].1), map(w[1].0, w[1].1), TRAIN);
    }
    for w in pts.windows(2) {
        line(&mut img, map(w[0].0, w[0].2), map(w[1].0, w[1].2), SMOOTH);
    }
    if let Some(lr) = suggested.filter(|lr| ok(*lr)) {
        let (x, _) = map(lr, 1.0);
        for dx in 0..2 {
            line(&mut img, (x + dx as f64, y0), (x + dx as f64, y1), VAL);
        }
    }
    img
}

/// Draw `train` (step, loss) and `val` (step, loss) and write a PNG atomically.
pub fn write_loss_curve(path: &Path, train: &[(u64, f64)], val: &[(u64, f64)]) -> anyhow::Result<()> {
    let img = render(train, val);
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::fsutil::write_atomic(path, &bytes)?;
    Ok(())
}

fn render(train: &[(u64, f64)], val: &[(u64, f64)]) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let finite = |v: &(u64, f64)| v.1.is_finite() && v.1 > 0.0;
    let pts: Vec<(u64, f64)> = train.iter().chain(val).copied().filter(finite).collect();
    let (x0, x1, y0, y1) = (LEFT, W as f64 - RIGHT, TOP, H as f64 - BOTTOM);
    // Axis titles and legend, drawn even when there is nothing to plot.
    frame(
        &mut img,
        "optimizer step",
        "loss (log scale)",
        &[("training", TRAIN, Key::Line), ("smoothed", SMOOTH, Key::Line), ("validation", VAL, Key::Dot)],
    );
    if pts.is_empty() {
        text(&mut img, ((x0 + x1) / 2.0) as i64 - 60, ((y0 + y1) / 2.0) as i64, "no finite loss values", INK);
        return img;
    }
    let max_step = pts.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let lo = pts.iter().map(|p| p.1.log10()).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1.log10()).fold(f64::NEG_INFINITY, f64::max);
    // A little headroom so the extremes do not sit on the frame.
    let pad = ((hi - lo) * 0.04).max(0.02);
    let (lo, hi) = (lo - pad, hi + pad);
    let map = |s: u64, v: f64| {
        (x0 + (x1 - x0) * s as f64 / max_step as f64, y0 + (y1 - y0) * (hi - v.log10()) / (hi - lo))
    };
    let ys: Vec<(f64, String)> = y_ticks(lo, hi).into_iter().map(|v| (map(0, v).1, value_label(v))).collect();
    let xs: Vec<(f64, String)> =
        x_ticks(max_step).into_iter().map(|s| (map(s, 1.0).0, s.to_string())).collect();
    axes(&mut img, &xs, &ys);
    let tr: Vec<(u64, f64)> = train.iter().copied().filter(finite).collect();
    for w in tr.windows(2) {
        line(&mut img, map(w[0].0, w[0].1), map(w[1].0, w[1].1), TRAIN);
    }
    // Bias-corrected exponential moving average of log loss (no lag from a zero start).
    let beta = if tr.len() > 100 { 0.95 } else { 0.7 };
    let (mut ema, mut k) = (0.0f64, 0i32);
    let mut prev: Option<(f64, f64)> = None;
    for &(s, v) in &tr {
        k += 1;
        ema = beta * ema + (1.0 - beta) * v.log10();
        let p = map(s, 10f64.powf(ema / (1.0 - beta.powi(k))));
        if let Some(q) = prev {
            line(&mut img, q, p, SMOOTH);
        }
        prev = Some(p);
    }
    for &(s, v) in val.iter().filter(|v| finite(v)) {
        dot(&mut img, map(s, v), VAL);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_labels_are_short_and_exact_for_round_numbers() {
        assert_eq!(value_label(100.0), "100");
        assert_eq!(value_label(0.5), "0.5");
        assert_eq!(value_label(1.5), "1.5");
        assert_eq!(value_label(0.002), "0.002");
        assert_eq!(value_label(2e-5), "2e-5");
        assert_eq!(value_label(3e6), "3e6");
        assert_eq!(value_label(318.7), "319");
    }

    #[test]
    fn ticks_cover_the_range_in_round_steps() {
        // 150..320: one decade line (100 is outside), so 2/5 mantissas fill in.
        let t = y_ticks(150f64.log10(), 320f64.log10());
        assert_eq!(t, vec![150.0, 200.0, 300.0]);
        let t = y_ticks(-3.0, 2.0);
        assert_eq!(t, vec![0.001, 0.01, 0.1, 1.0, 10.0, 100.0]);
        assert_eq!(x_ticks(96), vec![0, 20, 40, 60, 80]);
        assert_eq!(x_ticks(7), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(x_ticks(1000), (0..=5).map(|i| i * 200).collect::<Vec<_>>());
    }

    #[test]
    fn every_label_character_has_a_glyph() {
        for s in [
            "optimizer step",
            "loss (log scale)",
            "training",
            "smoothed",
            "validation",
            "no finite loss values",
            "learning rate (log scale)",
            "loss",
            "suggested",
        ] {
            for c in s.chars() {
                assert!(glyph(c).is_some(), "no glyph for {c:?} in {s:?}");
            }
        }
        for c in "0123456789.-e".chars() {
            assert!(glyph(c).is_some());
        }
    }

    #[test]
    fn curve_and_labels_are_drawn() {
        let train: Vec<(u64, f64)> = (1..=50).map(|s| (s, 300.0 / (s as f64).sqrt())).collect();
        let val = vec![(25, 80.0), (50, 50.0)];
        let img = render(&train, &val);
        let count = |c: Rgb<u8>| img.pixels().filter(|p| **p == c).count();
        assert!(count(TRAIN) > 100 && count(SMOOTH) > 100, "curves missing");
        assert!(count(VAL) > 2 * 29, "validation dots missing");
        // Tick labels left of the y axis and below the x axis.
        let ink_in = |xr: std::ops::Range<u32>, yr: std::ops::Range<u32>| {
            xr.flat_map(|x| yr.clone().map(move |y| (x, y)))
                .filter(|&(x, y)| *img.get_pixel(x, y) == INK)
                .count()
        };
        assert!(ink_in(20..(LEFT as u32 - 6), TOP as u32..(H - BOTTOM as u32)) > 50, "no y tick labels");
        assert!(
            ink_in(LEFT as u32..(W - RIGHT as u32), (H - BOTTOM as u32 + 6)..(H - 20)) > 50,
            "no x tick labels"
        );
        // Nothing to plot: still a valid image with the titles.
        let empty = render(&[(1, f64::NAN)], &[]);
        assert!(empty.pixels().any(|p| *p == INK));
    }

    /// The LR curve: both curves, the suggestion's line at its place on the log LR axis.
    #[test]
    fn lr_curve_marks_the_suggestion() {
        let pts: Vec<(f64, f64, f64)> =
            (0..60).map(|i| (10f64.powf(-7.0 + i as f64 / 10.0), 2.0 + (i % 3) as f64 * 0.1, 2.1)).collect();
        let img = render_lr(&pts, Some(1e-4));
        let count = |c: Rgb<u8>| img.pixels().filter(|p| **p == c).count();
        assert!(count(TRAIN) > 100 && count(SMOOTH) > 100, "curves missing");
        // The LR axis spans 1e-7..~8e-2 (padded): 1e-4 sits a bit past the middle.
        let (x0, x1) = (LEFT, W as f64 - RIGHT);
        let (lo, hi) = (-7.0 - 0.236, (-7.0f64 + 5.9) + 0.236);
        let want = x0 + (x1 - x0) * (-4.0 - lo) / (hi - lo);
        let column =
            |x: u32| (TOP as u32..(H - BOTTOM as u32)).filter(|&y| *img.get_pixel(x, y) == VAL).count();
        assert!(column(want.round() as u32) > 300, "no suggestion line at x {want}");
        assert!(render_lr(&[], None).pixels().any(|p| *p == INK));
    }
}
