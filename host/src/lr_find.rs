//! The learning-rate range test (`lorahost lr-find`): train from the config's starting point
//! with the LR rising exponentially from a tiny value to a large one, one value per optimizer
//! step, until the loss diverges; then read where the loss fell fastest. That LR (or a little
//! below the lowest-loss LR) trains well; the LR where the loss turns up is the ceiling. It
//! answers "which learning rate?" with a few minutes of the user's own data, model and batch
//! instead of a guess copied from another run (seed-trainer F10: the loss "fluctuates" or
//! never falls, and nobody can say whether the LR is to blame).
//!
//! The run itself is [`crate::train::train`] with [`LrRange`] set: no plugins, no validation, no
//! checkpoints; the metrics log (and TensorBoard file) in its own folder. [`suggest`] reads the
//! (LR, loss) points: the losses are smoothed with a centred window (no lag, unlike an EMA, so
//! the steepest point is not pushed to higher LRs), the slope is taken against log10 LR, and
//! the suggestion is the steepest descent before the smoothed minimum.

use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// An exponential LR sweep: `start` at step 1 to `end` at step `steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrRange {
    /// The first step's LR.
    pub start: f64,
    /// The last step's LR.
    pub end: f64,
    /// Optimizer steps of the sweep.
    pub steps: u64,
}

impl LrRange {
    /// A sweep; errors name the bad value.
    pub fn new(start: f64, end: f64, steps: u64) -> Result<Self, String> {
        if !(start.is_finite() && start > 0.0) {
            return Err(format!("--start-lr {start}: give a positive LR such as 1e-7"));
        }
        if !(end.is_finite() && end > start) {
            return Err(format!("--end-lr {end}: give an LR above --start-lr {start:e}, such as 1"));
        }
        if end > crate::plugin::MAX_LR {
            return Err(format!(
                "--end-lr {end}: training caps the LR at {}; give --end-lr {} or less",
                crate::plugin::MAX_LR,
                crate::plugin::MAX_LR
            ));
        }
        if steps < 10 {
            return Err(format!("--steps {steps}: the test needs at least 10 steps (100 is usual)"));
        }
        Ok(LrRange { start, end, steps })
    }

    /// The LR of optimizer step `step` (1-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let t = (step.max(1) - 1) as f64 / (self.steps - 1).max(1) as f64;
        self.start * (self.end / self.start).powf(t.min(1.0))
    }
}

/// Stops the sweep once the loss has clearly diverged: non-finite, or its smoothed value (a
/// bias-corrected moving average) above four times the lowest smoothed value seen.
#[derive(Debug, Default)]
pub struct DivergenceWatch {
    ema: f64,
    seen: i32,
    best: f64,
}

impl DivergenceWatch {
    /// Factor over the lowest smoothed loss that counts as diverged.
    pub const FACTOR: f64 = 4.0;
    const BETA: f64 = 0.8;

    /// Record a step's loss; `Some(why)` when the sweep should stop.
    pub fn observe(&mut self, loss: f64) -> Option<String> {
        if !loss.is_finite() {
            return Some("the loss is not finite".into());
        }
        self.seen += 1;
        self.ema = Self::BETA * self.ema + (1.0 - Self::BETA) * loss;
        let smoothed = self.ema / (1.0 - Self::BETA.powi(self.seen));
        if self.seen == 1 || smoothed < self.best {
            self.best = smoothed;
        }
        (self.seen >= 5 && self.best > 0.0 && smoothed > Self::FACTOR * self.best).then(|| {
            format!(
                "the loss diverged (smoothed {smoothed:.4}, over {} times its lowest, {:.4})",
                Self::FACTOR,
                self.best
            )
        })
    }
}

/// What the sweep's points say.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Suggestion {
    /// The LR of the steepest descent of the smoothed loss before its minimum (None when the
    /// loss never fell).
    pub lr: Option<f64>,
    /// The LR where the smoothed loss was lowest.
    pub min_loss_lr: f64,
    /// The lowest smoothed loss.
    pub min_loss: f64,
    /// The LR of the last point (where the sweep ended).
    pub last_lr: f64,
    /// The points as (LR, loss, smoothed loss).
    pub points: Vec<(f64, f64, f64)>,
}

/// Read a sweep's (LR, loss) points, in step order (non-finite losses end the curve). `None`
/// with fewer than 5 finite points.
pub fn suggest(points: &[(f64, f64)]) -> Option<Suggestion> {
    let pts: Vec<(f64, f64)> =
        points.iter().copied().take_while(|p| p.1.is_finite() && p.0 > 0.0 && p.0.is_finite()).collect();
    let n = pts.len();
    if n < 5 {
        return None;
    }
    // The first loss is the untrained model's, measured before any update: it says nothing
    // about an LR (and is often far above the next ones), so the curve starts after it.
    let skip = usize::from(n >= 10);
    let q = &pts[skip..];
    let m = q.len();
    // A centred window of about a twentieth of the sweep on each side (narrower at the ends),
    // two points at least: one batch's loss against its neighbours' is noise, not a slope.
    let h = (m / 20).max(2);
    let smooth: Vec<f64> = (0..m)
        .map(|i| {
            let w = h.min(i).min(m - 1 - i);
            let s = &q[i - w..=i + w];
            s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64
        })
        .collect();
    let x: Vec<f64> = q.iter().map(|p| p.0.log10()).collect();
    let i_min = (0..m).min_by(|&a, &b| smooth[a].total_cmp(&smooth[b])).unwrap_or(0);
    // Slopes against log10 LR (central differences), inside the window's reach of the ends.
    let slope = |i: usize| {
        let (a, b) = (i.saturating_sub(1), (i + 1).min(m - 1));
        (smooth[b] - smooth[a]) / (x[b] - x[a]).max(f64::MIN_POSITIVE)
    };
    let lr = (h..i_min.min(m.saturating_sub(1 + h)).saturating_add(1))
        .filter(|&i| i < m)
        .map(|i| (i, slope(i)))
        .filter(|(_, s)| *s < 0.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| q[i].0);
    let mut points: Vec<(f64, f64, f64)> = pts[..skip].iter().map(|p| (p.0, p.1, p.1)).collect();
    points.extend(q.iter().zip(&smooth).map(|(p, s)| (p.0, p.1, *s)));
    Some(Suggestion { lr, min_loss_lr: q[i_min].0, min_loss: smooth[i_min], last_lr: pts[n - 1].0, points })
}

/// What `lorahost lr-find` runs.
#[derive(Debug, Clone)]
pub struct LrFindOptions {
    /// The training YAML.
    pub config: PathBuf,
    /// Config overrides (`section.key=value`).
    pub overrides: Vec<String>,
    /// The sweep.
    pub range: LrRange,
    /// Where the test's logs, curve and report go (default `<output_dir>/lr-find`).
    pub out: Option<PathBuf>,
    /// Compiled-plugin cache (unused: the test loads no plugin).
    pub cache_dir: Option<PathBuf>,
}

/// What the test found (`lr_find.json`).
#[derive(Debug, Clone, Serialize)]
pub struct LrFindReport {
    /// The test's folder (metrics.jsonl, TensorBoard file, lr_find.png, lr_find.json).
    pub out: PathBuf,
    /// The sweep's first LR.
    pub start_lr: f64,
    /// The sweep's last planned LR.
    pub end_lr: f64,
    /// Steps planned.
    pub planned_steps: u64,
    /// Steps run.
    pub steps: u64,
    /// Why it stopped before the end (the loss diverged).
    pub stopped: Option<String>,
    /// The config's `training.learning_rate`.
    pub config_lr: f64,
    /// The reading of the curve (None with too few finite points).
    pub suggestion: Option<Suggestion>,
}

/// Run the range test and read its curve; writes `lr_find.json` and `lr_find.png` (atomically)
/// into the test's folder. The user's run folder is not touched: the test trains into its own.
pub fn run(opts: &LrFindOptions) -> anyhow::Result<LrFindReport> {
    let cfg = crate::train::load_config(&opts.config, &opts.overrides)?;
    let out = match &opts.out {
        Some(o) => o.clone(),
        None => cfg.output.output_dir.join("lr-find"),
    };
    let out = std::path::absolute(&out).unwrap_or(out);
    let mut overrides = opts.overrides.clone();
    // Quoted as YAML strings (a path is never read as a number or a date).
    let path = serde_json::to_string(&out.display().to_string())?;
    overrides.push(format!("output.output_dir={path}"));
    overrides.push(format!("output.logging_dir={path}"));
    overrides.push("output.save_lora_only=true".into());
    overrides.push("evaluation.save_predictions=false".into());
    tracing::info!(
        "LR range test: {} steps, LR {:e} to {:e} (exponential), into {}",
        opts.range.steps,
        opts.range.start,
        opts.range.end,
        out.display()
    );
    let summary = crate::train::train(&crate::train::TrainOptions {
        config: opts.config.clone(),
        overrides,
        hot_reload: false,
        cache_dir: opts.cache_dir.clone(),
        lr_range: Some(opts.range),
        ..Default::default()
    })?;
    let metrics = out.join("metrics.jsonl");
    let trace =
        crate::metrics::Trace::read(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let points: Vec<(f64, f64)> = trace.steps.iter().map(|s| (s.lr, s.loss)).collect();
    let suggestion = suggest(&points);
    let report = LrFindReport {
        out: out.clone(),
        start_lr: opts.range.start,
        end_lr: opts.range.end,
        planned_steps: opts.range.steps,
        steps: summary.steps,
        stopped: summary.stopped.clone(),
        config_lr: cfg.training.learning_rate,
        suggestion,
    };
    let json = out.join("lr_find.json");
    crate::fsutil::write_atomic(&json, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    let png = out.join("lr_find.png");
    let (pts, lr) = report.suggestion.as_ref().map(|s| (s.points.as_slice(), s.lr)).unwrap_or((&[], None));
    crate::train::plot::write_lr_curve(&png, pts, lr)
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(report)
}

/// The report as the console shows it: the suggestion, the config's LR against it, where the
/// files are, and the command to train with it.
pub fn describe(r: &LrFindReport, config: &Path) -> String {
    let mut s = format!(
        "LR range test: {} of {} steps, LR {:.1e} to {:.1e}{}\n",
        r.steps,
        r.planned_steps,
        r.start_lr,
        r.suggestion.as_ref().map_or(r.end_lr, |s| s.last_lr),
        r.stopped.as_ref().map(|w| format!(" (stopped: {w})")).unwrap_or_default()
    );
    let Some(sg) = &r.suggestion else {
        s.push_str("  too few steps with a finite loss to read a curve: lower --start-lr, or check the data with `lorahost doctor`\n");
        return s;
    };
    match sg.lr {
        Some(lr) => {
            s.push_str(&format!(
                "  suggested training.learning_rate: {lr:.1e} (where the smoothed loss fell fastest)\n"
            ));
            if sg.min_loss_lr >= sg.last_lr {
                s.push_str(&format!(
                    "  the smoothed loss was still at its lowest ({:.4}) at the sweep's last LR, {:.1e}: nothing above it was tried (a larger --end-lr shows where the loss turns)\n",
                    sg.min_loss, sg.min_loss_lr
                ));
            } else {
                s.push_str(&format!(
                    "  lowest smoothed loss {:.4} at LR {:.1e}; above it the loss rises (a tenth of it, {:.1e}, is the cautious choice)\n",
                    sg.min_loss,
                    sg.min_loss_lr,
                    sg.min_loss_lr / 10.0
                ));
            }
            if sg.points.len() < 40 {
                s.push_str(&format!(
                    "  a short sweep ({} points, each a factor of {:.1} in LR over one batch): the curve is noisy; --steps 100 reads it better\n",
                    sg.points.len(),
                    (sg.last_lr / sg.points[0].0).powf(1.0 / (sg.points.len() - 1).max(1) as f64)
                ));
            }
            let ratio = r.config_lr / lr;
            let verdict = if r.config_lr >= sg.min_loss_lr {
                "at or above the lowest-loss LR: expect the loss to rise or spike (seed-trainer F10)".to_string()
            } else if ratio < 0.1 {
                format!("{:.0}x below the suggestion: the loss will fall slowly", 1.0 / ratio)
            } else {
                "in the range where the loss falls".to_string()
            };
            s.push_str(&format!("  your config's learning_rate {:.1e} is {verdict}\n", r.config_lr));
            s.push_str(&format!(
                "  train with it: lorahost train --config {} --override training.learning_rate={lr:.1e}\n",
                config.display()
            ));
        }
        None => s.push_str(&format!(
            "  the loss did not fall at any LR from {:.1e} to {:.1e}: start lower (--start-lr), sweep longer (--steps), or check the data and the LoRA targets with `lorahost doctor`\n",
            r.start_lr, sg.last_lr
        )),
    }
    s.push_str(&format!(
        "  curve: {}; points: {}; TensorBoard: tensorboard --logdir {}\n",
        r.out.join("lr_find.png").display(),
        r.out.join("lr_find.json").display(),
        r.out.display()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sweep's LRs: the ends exact, evenly spaced in log LR between.
    #[test]
    fn the_sweep_is_exponential() {
        let r = LrRange::new(1e-6, 1e-2, 5).unwrap_err();
        assert!(r.contains("--steps 5"), "{r}");
        let r = LrRange::new(1e-6, 1e-2, 11).unwrap();
        assert!((r.lr_at(1) - 1e-6).abs() < 1e-18 && (r.lr_at(11) - 1e-2).abs() < 1e-14);
        assert!((r.lr_at(6) - 1e-4).abs() < 1e-16, "{}", r.lr_at(6));
        assert!(LrRange::new(1e-3, 1e-4, 100).unwrap_err().contains("--end-lr"));
        assert!(LrRange::new(0.0, 1.0, 100).unwrap_err().contains("--start-lr"));
        assert!(LrRange::new(1e-7, 100.0, 100).unwrap_err().contains("caps the LR at 10"));
    }

    /// A loss that falls fastest at LR 1e-4 (a tanh step in log LR, centred there), bottoms out
    /// near 1e-2 and then blows up, with ±4% deterministic noise: the suggestion lands within a
    /// factor of two of 1e-4 and the minimum near 1e-2; the watch stops once it blows up.
    #[test]
    fn the_steepest_descent_is_found_through_noise() {
        let range = LrRange::new(1e-7, 1.0, 100).unwrap();
        let mut state = 0x2545_f491u32;
        let mut noise = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f64 / u32::MAX as f64 - 0.5) * 0.08
        };
        let loss_at = |lr: f64| {
            let x = lr.log10();
            let base = 2.0 - (1.5 * (x + 4.0)).tanh();
            base + if x > -2.0 { (3.0 * (x + 2.0)).exp() - 1.0 } else { 0.0 }
        };
        let mut watch = DivergenceWatch::default();
        let mut points = Vec::new();
        let mut stopped = None;
        for step in 1..=range.steps {
            let lr = range.lr_at(step);
            let loss = loss_at(lr) * (1.0 + noise());
            points.push((lr, loss));
            if let Some(why) = watch.observe(loss) {
                stopped = Some((lr, why));
                break;
            }
        }
        let (stop_lr, why) = stopped.expect("the blow-up stops the sweep");
        assert!(stop_lr > 1e-2 && stop_lr < 1.0 && why.contains("diverged"), "{stop_lr} {why}");
        let s = suggest(&points).unwrap();
        let lr = s.lr.unwrap();
        assert!((lr / 1e-4).log10().abs() < 0.3, "suggested {lr:e}, want about 1e-4");
        assert!((s.min_loss_lr.log10() + 2.0).abs() < 0.6, "lowest at {:e}", s.min_loss_lr);
        assert_eq!(s.points.len(), points.len());
    }

    /// A loss that never falls has no suggestion; too few points have no reading; a NaN ends
    /// the curve.
    #[test]
    fn a_flat_or_short_sweep_suggests_nothing() {
        let rising: Vec<(f64, f64)> = (0..30).map(|i| (10f64.powi(i - 30), 1.0 + i as f64 * 0.01)).collect();
        assert_eq!(suggest(&rising).unwrap().lr, None);
        assert!(suggest(&rising[..4]).is_none());
        let mut cut = rising.clone();
        cut[6].1 = f64::NAN;
        assert_eq!(suggest(&cut).unwrap().points.len(), 6);
        let mut w = DivergenceWatch::default();
        assert!(w.observe(f64::INFINITY).is_some());
    }

    /// A short sweep (20 steps of the demo's lr-find, as it ran): the untrained first loss,
    /// far above the rest, and one batch's noise make no slope; the suggestion is where the
    /// curve falls (1e-3..0.1), not near the start LR.
    #[test]
    fn a_short_noisy_sweep_is_read_where_the_curve_falls() {
        let losses = [
            699.5, 439.8, 454.8, 405.4, 371.6, 636.3, 373.0, 532.9, 558.4, 436.9, 600.9, 360.2, 317.6, 302.5,
            292.7, 222.0, 174.3, 214.5, 227.6, 177.8,
        ];
        let range = LrRange::new(1e-7, 1.0, 20).unwrap();
        let points: Vec<(f64, f64)> =
            losses.iter().enumerate().map(|(i, l)| (range.lr_at(i as u64 + 1), *l)).collect();
        let s = suggest(&points).unwrap();
        let lr = s.lr.unwrap();
        assert!((1e-4..=0.1).contains(&lr), "suggested {lr:e}");
        assert_eq!(s.points.len(), 20);
    }
}
