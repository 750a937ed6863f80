//! The loss-curve PNG written at the end of a run: training loss per optimizer step (blue, with
//! a smoothed line in dark blue) and validation loss (orange dots) on a log-scaled y axis, with
//! light grid lines at powers of ten. Drawn with the `image` crate; no font, so the axes are
//! explained in the run log.

use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 900;
const H: u32 = 480;
const PAD: u32 = 40;

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

/// Draw `train` (step, loss) and `val` (step, loss) and write a PNG atomically.
pub fn write_loss_curve(path: &Path, train: &[(u64, f64)], val: &[(u64, f64)]) -> anyhow::Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let finite = |v: &(u64, f64)| v.1.is_finite() && v.1 > 0.0;
    let pts: Vec<(u64, f64)> = train.iter().chain(val).copied().filter(finite).collect();
    if !pts.is_empty() {
        let max_step = pts.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
        let lo = pts.iter().map(|p| p.1.log10()).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.1.log10()).fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if hi - lo < 1e-9 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
        let (pw, ph) = ((W - 2 * PAD) as f64, (H - 2 * PAD) as f64);
        let map = |s: u64, v: f64| {
            (PAD as f64 + pw * s as f64 / max_step, PAD as f64 + ph * (hi - v.log10()) / (hi - lo))
        };
        for decade in (lo.floor() as i64)..=(hi.ceil() as i64) {
            let (_, y) = map(0, 10f64.powi(decade as i32));
            if y >= PAD as f64 && y <= (H - PAD) as f64 {
                line(&mut img, (PAD as f64, y), ((W - PAD) as f64, y), Rgb([225, 225, 225]));
            }
        }
        let axis = Rgb([60, 60, 60]);
        line(&mut img, (PAD as f64, PAD as f64), (PAD as f64, (H - PAD) as f64), axis);
        line(&mut img, (PAD as f64, (H - PAD) as f64), ((W - PAD) as f64, (H - PAD) as f64), axis);
        let tr: Vec<(u64, f64)> = train.iter().copied().filter(finite).collect();
        for w in tr.windows(2) {
            line(&mut img, map(w[0].0, w[0].1), map(w[1].0, w[1].1), Rgb([150, 180, 230]));
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
                line(&mut img, q, p, Rgb([20, 60, 160]));
            }
            prev = Some(p);
        }
        for &(s, v) in val.iter().filter(|v| finite(v)) {
            let (x, y) = map(s, v);
            for dx in -3..=3 {
                for dy in -3..=3 {
                    if dx * dx + dy * dy <= 9 {
                        put(&mut img, x as i64 + dx, y as i64 + dy, Rgb([240, 130, 20]));
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::fsutil::write_atomic(path, &bytes)?;
    Ok(())
}
