//! Step-time regression detector (seed-trainer F14: epoch 2 of a run became 22× slower when
//! GPU memory spilled into shared system memory under Windows' WDDM, and nothing said so).
//!
//! The baseline is the median wall time of the run's first [`BASELINE`] steps after the first
//! (which pays for allocation and warm-up); afterwards the median of the last [`RECENT`] steps is
//! compared with it. A slowdown of [`FACTOR`]× or more is reported once, and again each time it
//! doubles.

/// Steps (after the first) that form the baseline.
pub const BASELINE: usize = 10;
/// Steps in the rolling window.
pub const RECENT: usize = 5;
/// Slowdown factor that is reported.
pub const FACTOR: f64 = 3.0;

/// Watches step times; see the module docs.
#[derive(Debug, Default)]
pub struct SlowdownWatch {
    seen: usize,
    baseline: Vec<f64>,
    recent: Vec<f64>,
    reported: Option<f64>,
}

/// A reported slowdown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slowdown {
    /// Median step time of the baseline, ms.
    pub baseline_ms: f64,
    /// Median step time of the last steps, ms.
    pub recent_ms: f64,
}

impl Slowdown {
    /// recent / baseline.
    pub fn factor(&self) -> f64 {
        self.recent_ms / self.baseline_ms
    }
}

/// Median of `v` (NaN when empty).
pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl SlowdownWatch {
    /// Record one step's wall time; Some when a (new, or doubled) slowdown is to be reported.
    pub fn observe(&mut self, step_ms: f64) -> Option<Slowdown> {
        self.seen += 1;
        if self.seen == 1 || !step_ms.is_finite() {
            return None;
        }
        if self.baseline.len() < BASELINE {
            self.baseline.push(step_ms);
            return None;
        }
        self.recent.push(step_ms);
        if self.recent.len() > RECENT {
            self.recent.remove(0);
        }
        if self.recent.len() < RECENT {
            return None;
        }
        let s = Slowdown { baseline_ms: median(&self.baseline), recent_ms: median(&self.recent) };
        if s.baseline_ms <= 0.0 || s.factor() < FACTOR {
            return None;
        }
        match self.reported {
            Some(f) if s.factor() < 2.0 * f => None,
            _ => {
                self.reported = Some(s.factor());
                Some(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_runs_are_quiet_and_a_lasting_slowdown_is_reported_once_per_doubling() {
        let mut w = SlowdownWatch::default();
        // A slow first step, then a steady 100 ms with noise and one hiccup.
        assert_eq!(w.observe(5000.0), None);
        for i in 0..30 {
            let t = if i == 15 { 900.0 } else { 100.0 + (i % 3) as f64 };
            assert_eq!(w.observe(t), None, "step {i}");
        }
        // Spilling: 400 ms steps. Reported when the window's median crosses 3x, once.
        let hits: Vec<usize> = (0..20).filter(|_| w.observe(400.0).is_some()).collect::<Vec<_>>();
        assert_eq!(hits.len(), 1);
        // Twice as bad again: reported again.
        let again: Vec<Slowdown> = (0..10).filter_map(|_| w.observe(1000.0)).collect();
        assert_eq!(again.len(), 1);
        assert!((again[0].baseline_ms - 101.0).abs() < 1.0 && again[0].recent_ms == 1000.0, "{again:?}");
    }
}
