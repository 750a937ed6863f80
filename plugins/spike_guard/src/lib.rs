//! # spike_guard: skip (or damp) optimizer steps whose loss spikes
//!
//! Hook: `step-metrics` (`on-step`). After every optimizer step the guard compares the
//! step's loss, and its gradient norm, with a robust running baseline. A step that spikes
//! is answered with `skip` (the host rolls the update back) or `scale-lr`; repeated spikes
//! stop the run, because a run that keeps spiking needs a human, not more skipping.
//!
//! ## Detection
//!
//! The guard keeps the last `window` losses of steps that were *not* flagged. From them:
//!
//! - baseline = median of the window;
//! - scale = max(1.4826 × MAD, `rel_floor` × |median|, 1e-12), where MAD is the median
//!   absolute deviation (1.4826 × MAD estimates the standard deviation of normal noise,
//!   and ignores earlier outliers, unlike mean and std);
//! - z = (loss − median) / scale.
//!
//! A step is a spike when z > `z_threshold`. The test is one-sided: a sudden *drop* in loss
//! is good news and never flagged. A non-finite loss (NaN or ±inf) is always a spike. The
//! relative floor keeps a very quiet window (tiny MAD) from turning ordinary noise into
//! huge z values.
//!
//! The gradient norm (`grad-norm`, before clipping) is checked the same way against its own
//! window with `grad_z_threshold`; an infinite gradient norm (what the host reports for
//! gradients it could not compute) is a spike too. A NaN norm means the host does not know it
//! (a replayed trace that does not record it): only the loss is checked then.
//!
//! Warm-up awareness: nothing is flagged from a window holding fewer than `min_history`
//! values (except non-finite values). Flagged steps are not added to the windows, so a
//! spike cannot drag the baseline up after itself.
//!
//! ## Answers
//!
//! - no spike: `continue`;
//! - spike, `action = "skip"`: `skip(reason)`, the reason states the loss, the baseline
//!   median and z (or the same for the gradient norm);
//! - spike, `action = "scale_lr"`: `scale-lr(lr_factor)`, a permanent LR reduction;
//!   except for a non-finite loss or grad norm, which is always skipped (a smaller LR
//!   cannot undo a NaN update);
//! - when the spikes within the last `stop_window` steps (this one included) reach
//!   `stop_after`: `stop(reason)`.
//!
//! ## Config (every key optional)
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `window` | 32 | non-spike values kept for the baseline (loss and grad norm each) |
//! | `min_history` | 3 | values needed in a window before it flags anything (1..=`window`) |
//! | `z_threshold` | 6.0 | loss spike when z > this (> 0) |
//! | `rel_floor` | 0.05 | lower bound of the scale, as a fraction of \|median\| (>= 0) |
//! | `grad_z_threshold` | 10.0 | grad-norm spike when its z > this; 0 disables the check |
//! | `action` | `"skip"` | `"skip"` or `"scale_lr"` |
//! | `lr_factor` | 0.5 | LR multiplier answered with `"scale_lr"` (0 < f <= 10) |
//! | `stop_after` | 3 | spikes within `stop_window` steps that stop the run; 0 never stops |
//! | `stop_window` | 20 | steps over which spikes are counted for `stop_after` (>= 1) |
//!
//! A misspelled key is an error naming it.
//!
//! ## Metrics
//!
//! Each step: `spikes_total`, `spike` (1 when this step was flagged), and, once the windows
//! are warm, `baseline` (loss median), `z` (loss z) and `grad_z`.
//!
//! ## State
//!
//! Both windows, the steps of recent spikes and the spike count go into the snapshot, so
//! hot reload, crash recovery and checkpoint resume continue with the same baseline.

use lorahost_plugin::stats::RollingWindow;
use lorahost_plugin::{decode_state, encode_state, host, Action, Config, Hook, Plugin, RunInfo, StepMetrics};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// 1.4826 × MAD estimates the standard deviation of normally distributed values.
const MAD_TO_SIGMA: f64 = 1.4826;

/// What the guard answers on a spike (unless it stops the run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSpike {
    /// Roll the update back: `skip(reason)`.
    Skip,
    /// Multiply the LR of later steps by `lr_factor`: `scale-lr(lr_factor)`.
    ScaleLr,
}

/// The plugin's config section; see the crate docs for the meaning of each key.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Non-spike values kept for each baseline (default 32).
    pub window: usize,
    /// Values needed before a window flags anything (default 3).
    pub min_history: usize,
    /// Loss spike threshold on z (default 6.0).
    pub z_threshold: f64,
    /// Scale floor as a fraction of |median| (default 0.05).
    pub rel_floor: f64,
    /// Grad-norm spike threshold on z; 0 disables (default 10.0).
    pub grad_z_threshold: f64,
    /// Answer on a spike (default skip).
    pub action: OnSpike,
    /// LR factor answered with `scale_lr` (default 0.5).
    pub lr_factor: f64,
    /// Spikes within `stop_window` steps that stop the run; 0 never stops (default 3).
    pub stop_after: usize,
    /// Steps over which spikes are counted (default 20).
    pub stop_window: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            window: 32,
            min_history: 3,
            z_threshold: 6.0,
            rel_floor: 0.05,
            grad_z_threshold: 10.0,
            action: OnSpike::Skip,
            lr_factor: 0.5,
            stop_after: 3,
            stop_window: 20,
        }
    }
}

impl Settings {
    fn validate(&self) -> Result<(), String> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if self.window == 0 {
            return Err("`window` must be at least 1".into());
        }
        if self.min_history == 0 || self.min_history > self.window {
            return Err(format!("`min_history` must be in 1..={} (`window`)", self.window));
        }
        if !positive(self.z_threshold) {
            return Err("`z_threshold` must be a positive number".into());
        }
        if !(self.rel_floor.is_finite() && self.rel_floor >= 0.0) {
            return Err("`rel_floor` must be >= 0".into());
        }
        if !(self.grad_z_threshold.is_finite() && self.grad_z_threshold >= 0.0) {
            return Err("`grad_z_threshold` must be >= 0 (0 disables it)".into());
        }
        if !(positive(self.lr_factor) && self.lr_factor <= 10.0) {
            return Err("`lr_factor` must be in (0, 10]".into());
        }
        if self.stop_window == 0 {
            return Err("`stop_window` must be at least 1".into());
        }
        Ok(())
    }
}

/// Everything that must survive snapshot/restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Losses of recent non-spike steps.
    losses: RollingWindow,
    /// Gradient norms of recent non-spike steps.
    grad_norms: RollingWindow,
    /// Steps of the spikes within the last `stop_window` steps, oldest first.
    recent_spikes: VecDeque<u64>,
    /// Spikes since the start of the run.
    spikes_total: u64,
}

/// A value scored against a window.
#[derive(Debug, Clone, Copy)]
struct Score {
    median: f64,
    scale: f64,
    z: f64,
}

/// One-sided robust z of `value` against `window`; `None` while the window holds fewer
/// than `min_history` values.
fn robust_score(window: &RollingWindow, value: f64, min_history: usize, rel_floor: f64) -> Option<Score> {
    if window.len() < min_history {
        return None;
    }
    let median = window.median();
    let scale = (MAD_TO_SIGMA * window.mad()).max(rel_floor * median.abs()).max(1e-12);
    Some(Score { median, scale, z: (value - median) / scale })
}

/// Why `value` (named `what`) is a spike, or `None` when it is not.
fn spike_reason(what: &str, step: u64, value: f64, score: Option<Score>, threshold: f64) -> Option<String> {
    if !value.is_finite() {
        return Some(format!("non-finite {what} {value} at step {step}"));
    }
    let s = score.filter(|s| s.z > threshold)?;
    Some(format!(
        "{what} spike at step {step}: {what} {} vs baseline median {} (robust scale {}), z = {:.1} > {threshold}",
        num(value),
        num(s.median),
        num(s.scale),
        s.z
    ))
}

/// A number with about four significant digits, without scientific notation for ordinary sizes.
fn num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 || (1e-3..1e6).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.decimals$}")
    } else {
        format!("{x:.3e}")
    }
}

/// The spike guard; see the crate docs.
pub struct SpikeGuard {
    cfg: Settings,
    state: State,
}

impl SpikeGuard {
    /// Record a spike at `step` and choose the answer. `nonfinite`: the spike is a NaN or
    /// infinite value, which only a skip can keep out of the weights.
    fn answer_spike(&mut self, step: u64, reason: String, nonfinite: bool) -> Action {
        self.state.spikes_total += 1;
        self.state.recent_spikes.push_back(step);
        let recent = self.state.recent_spikes.len();
        if self.cfg.stop_after > 0 && recent >= self.cfg.stop_after {
            let steps: Vec<String> = self.state.recent_spikes.iter().map(u64::to_string).collect();
            let why = format!(
                "{recent} spikes within the last {} steps (steps {}); last: {reason}",
                self.cfg.stop_window,
                steps.join(", ")
            );
            host::warn(&format!("stopping the run: {why}"));
            return Action::Stop(why);
        }
        if nonfinite || self.cfg.action == OnSpike::Skip {
            host::warn(&format!("{reason}; skipping the update"));
            Action::Skip(reason)
        } else {
            host::warn(&format!("{reason}; scaling the LR by {}", self.cfg.lr_factor));
            Action::ScaleLr(self.cfg.lr_factor)
        }
    }
}

impl Plugin for SpikeGuard {
    const NAME: &'static str = "spike_guard";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "skips (or damps) steps whose loss or grad norm spikes above a robust running baseline";
    const HOOKS: &'static [Hook] = &[Hook::StepMetrics];

    fn init(config: &Config, _run: &RunInfo) -> Result<Self, String> {
        let cfg: Settings = config.parse()?;
        cfg.validate()?;
        let state = State {
            losses: RollingWindow::new(cfg.window),
            grad_norms: RollingWindow::new(cfg.window),
            recent_spikes: VecDeque::new(),
            spikes_total: 0,
        };
        Ok(Self { cfg, state })
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.state)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut state: State = decode_state(bytes)?;
        // The config may have changed on hot reload: the configured window size wins.
        state.losses.set_capacity(self.cfg.window);
        state.grad_norms.set_capacity(self.cfg.window);
        self.state = state;
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Action {
        let cfg = &self.cfg;
        // Forget spikes that fell out of the stop window.
        while let Some(&first) = self.state.recent_spikes.front() {
            if first + cfg.stop_window > m.step {
                break;
            }
            self.state.recent_spikes.pop_front();
        }

        let loss = robust_score(&self.state.losses, m.loss, cfg.min_history, cfg.rel_floor);
        let mut reasons: Vec<String> =
            spike_reason("loss", m.step, m.loss, loss, cfg.z_threshold).into_iter().collect();
        let mut nonfinite = !m.loss.is_finite();
        let mut grad = None;
        // NaN is a norm the host does not know (a replayed trace without one): no grad check.
        if cfg.grad_z_threshold > 0.0 && !m.grad_norm.is_nan() {
            nonfinite |= !m.grad_norm.is_finite();
            grad = robust_score(&self.state.grad_norms, m.grad_norm, cfg.min_history, cfg.rel_floor);
            reasons.extend(spike_reason("grad norm", m.step, m.grad_norm, grad, cfg.grad_z_threshold));
        }

        let action = if reasons.is_empty() {
            self.state.losses.push(m.loss);
            self.state.grad_norms.push(m.grad_norm);
            Action::Continue
        } else {
            self.answer_spike(m.step, reasons.join("; "), nonfinite)
        };

        let mut metrics = vec![
            ("spikes_total", self.state.spikes_total as f64),
            ("spike", if reasons.is_empty() { 0.0 } else { 1.0 }),
        ];
        if let Some(s) = loss.filter(|s| s.z.is_finite()) {
            metrics.extend([("baseline", s.median), ("z", s.z)]);
        }
        if let Some(s) = grad.filter(|s| s.z.is_finite()) {
            metrics.push(("grad_z", s.z));
        }
        host::emit_metrics(&metrics);
        action
    }
}

lorahost_plugin::export_plugin!(SpikeGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_plugin::stats::Rng;

    fn run_info() -> RunInfo {
        RunInfo {
            total_steps: 300,
            warmup_steps: 10,
            accumulation: 1,
            batch_size: 4,
            effective_batch_size: 4,
            base_lr: 1e-4,
            scheduler: "cosine".into(),
            dataset_size: 1200,
            steps_per_epoch: 300,
            seed: 0,
            start_step: 1,
        }
    }

    fn metrics(step: u64, loss: f64, grad_norm: f64) -> StepMetrics {
        StepMetrics {
            step,
            micro_steps: 1,
            epoch: 0,
            total_steps: 300,
            warmup_steps: 10,
            loss,
            losses: Vec::new(),
            lr: 1e-4,
            grad_norm,
            grad_norm_clipped: grad_norm,
            batch_size: 4,
            object_count: 10,
            step_time_ms: 100.0,
            memory_bytes: 0,
            extra: Vec::new(),
        }
    }

    fn guard(config: &str) -> SpikeGuard {
        SpikeGuard::init(&Config::from_json(config).unwrap(), &run_info()).unwrap()
    }

    fn is_continue(a: &Action) -> bool {
        matches!(a, Action::Continue)
    }

    #[test]
    fn flags_only_the_spike_in_a_real_trace() {
        let trace = [
            169.0, 141.0, 169.0, 242.0, 212.0, 182.0, 186.0, 161.0, 189.0, 181.0, 181.0, 172.0, 218.0, 186.0,
            175.0, 198.0,
        ];
        let mut g = guard("{}");
        for (i, &loss) in trace.iter().enumerate() {
            let step = i as u64 + 1;
            let a = g.on_step(&metrics(step, loss, 1.0));
            if step == 4 {
                match a {
                    Action::Skip(reason) => {
                        assert!(reason.contains("242"), "{reason}");
                        assert!(reason.contains("169"), "{reason}");
                        assert!(reason.contains("z = 8.6"), "{reason}");
                    }
                    other => panic!("step 4 should be skipped, got {other:?}"),
                }
            } else {
                assert!(is_continue(&a), "step {step} (loss {loss}) flagged: {a:?}");
            }
        }
        assert_eq!(g.state.spikes_total, 1);
    }

    #[test]
    fn smooth_noisy_curve_is_never_flagged() {
        let mut g = guard("{}");
        let mut rng = Rng::new(7);
        for step in 1..=300u64 {
            let s = step as f64;
            let noise = |rng: &mut Rng| 2.0 * rng.next_f64() - 1.0;
            let loss = (2.0 * (-s / 60.0).exp() + 0.3) * (1.0 + 0.02 * noise(&mut rng));
            let grad = (3.0 * (-s / 100.0).exp() + 0.5) * (1.0 + 0.05 * noise(&mut rng));
            let a = g.on_step(&metrics(step, loss, grad));
            assert!(is_continue(&a), "step {step} flagged: {a:?}");
        }
    }

    #[test]
    fn drops_are_not_spikes() {
        let mut g = guard("{}");
        for step in 1..=10 {
            g.on_step(&metrics(step, 1.0 + 0.01 * (step % 3) as f64, 1.0));
        }
        assert!(is_continue(&g.on_step(&metrics(11, 0.01, 0.01))));
    }

    #[test]
    fn quiet_until_min_history() {
        let mut g = guard(r#"{"min_history": 5}"#);
        for (step, loss) in [(1, 1.0), (2, 50.0), (3, 1.0), (4, 1.0)] {
            assert!(is_continue(&g.on_step(&metrics(step, loss, 1.0))));
        }
        assert!(is_continue(&g.on_step(&metrics(5, 1.0, 1.0))));
        assert!(matches!(g.on_step(&metrics(6, 50.0, 1.0)), Action::Skip(_)));
    }

    #[test]
    fn nan_and_inf_loss_are_spikes_even_without_history() {
        let mut g = guard("{}");
        assert!(matches!(g.on_step(&metrics(1, f64::NAN, 1.0)), Action::Skip(r) if r.contains("NaN")));
        assert!(matches!(g.on_step(&metrics(2, f64::INFINITY, 1.0)), Action::Skip(_)));
        // A non-finite value never enters the window.
        assert!(g.state.losses.is_empty());
    }

    /// A NaN grad norm is one the host does not know (a replayed trace without it): the loss
    /// alone decides, and the run is not stopped; an infinite one is a spike.
    #[test]
    fn an_unknown_grad_norm_is_not_a_spike_an_infinite_one_is() {
        let mut g = guard("{}");
        for step in 1..=30 {
            let loss = 1.0 + 0.01 * (step % 3) as f64;
            assert!(matches!(g.on_step(&metrics(step, loss, f64::NAN)), Action::Continue), "step {step}");
        }
        assert!(g.state.grad_norms.is_empty());
        // The loss is still checked without a grad norm.
        assert!(matches!(g.on_step(&metrics(31, 50.0, f64::NAN)), Action::Skip(r) if r.contains("loss")));
        assert!(
            matches!(g.on_step(&metrics(32, 1.0, f64::INFINITY)), Action::Skip(r) if r.contains("grad norm"))
        );
    }

    #[test]
    fn three_spikes_in_a_row_stop_the_run() {
        let mut g = guard("{}");
        for step in 1..=10 {
            assert!(is_continue(&g.on_step(&metrics(step, 1.0 + 0.01 * (step % 2) as f64, 1.0))));
        }
        assert!(matches!(g.on_step(&metrics(11, 10.0, 1.0)), Action::Skip(_)));
        assert!(matches!(g.on_step(&metrics(12, 10.0, 1.0)), Action::Skip(_)));
        match g.on_step(&metrics(13, 10.0, 1.0)) {
            Action::Stop(reason) => assert!(reason.contains("steps 11, 12, 13"), "{reason}"),
            other => panic!("expected stop, got {other:?}"),
        }
    }

    #[test]
    fn spikes_far_apart_do_not_stop() {
        let mut g = guard(r#"{"stop_window": 5}"#);
        for step in 1..=40u64 {
            let loss = if step % 10 == 0 { 10.0 } else { 1.0 };
            let a = g.on_step(&metrics(step, loss, 1.0));
            assert!(!matches!(a, Action::Stop(_)), "step {step}: {a:?}");
        }
        assert_eq!(g.state.spikes_total, 4);
    }

    #[test]
    fn grad_norm_spike_is_flagged_and_can_be_disabled() {
        let mut g = guard("{}");
        let mut quiet = guard(r#"{"grad_z_threshold": 0}"#);
        for step in 1..=10 {
            g.on_step(&metrics(step, 1.0, 2.0));
            quiet.on_step(&metrics(step, 1.0, 2.0));
        }
        assert!(matches!(g.on_step(&metrics(11, 1.0, 40.0)), Action::Skip(r) if r.contains("grad norm")));
        assert!(is_continue(&quiet.on_step(&metrics(11, 1.0, 40.0))));
    }

    #[test]
    fn scale_lr_action() {
        let mut g = guard(r#"{"action": "scale_lr", "lr_factor": 0.25}"#);
        for step in 1..=5 {
            g.on_step(&metrics(step, 1.0, 1.0));
        }
        assert!(matches!(g.on_step(&metrics(6, 5.0, 1.0)), Action::ScaleLr(f) if f == 0.25));
        // A NaN cannot be scaled away: it is always skipped.
        assert!(matches!(g.on_step(&metrics(7, f64::NAN, 1.0)), Action::Skip(_)));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err =
            |json: &str| SpikeGuard::init(&Config::from_json(json).unwrap(), &run_info()).err().unwrap();
        assert!(err(r#"{"windw": 10}"#).contains("windw"));
        assert!(err(r#"{"action": "panic"}"#).contains("panic"));
        assert!(err(r#"{"lr_factor": 0}"#).contains("lr_factor"));
        assert!(err(r#"{"min_history": 40}"#).contains("min_history"));
        // A wrong type names its key (serde's own message does not).
        let e = err(r#"{"window": 10, "z_threshold": "abc"}"#);
        assert!(e.contains("key `z_threshold`") && e.contains("expected f64"), "{e}");
    }

    #[test]
    fn snapshot_restore_continues_identically() {
        let loss = |step: u64| match step {
            14 | 22 | 23 | 24 => 9.0,
            _ => 1.0 + 0.03 * ((step * 7) % 5) as f64,
        };
        let mut a = guard("{}");
        for step in 1..=15 {
            a.on_step(&metrics(step, loss(step), 1.0));
        }
        let mut b = guard("{}");
        b.restore(&a.snapshot()).unwrap();
        for step in 16..=30 {
            let m = metrics(step, loss(step), 1.0);
            assert_eq!(format!("{:?}", a.on_step(&m)), format!("{:?}", b.on_step(&m)), "step {step}");
        }
        assert_eq!(a.snapshot(), b.snapshot());
        assert!(b.restore(b"not a state").is_err());
    }

    #[test]
    fn restore_applies_the_configured_window() {
        let mut a = guard(r#"{"window": 10}"#);
        for step in 1..=10 {
            a.on_step(&metrics(step, 1.0, 1.0));
        }
        let mut b = guard(r#"{"window": 4}"#);
        b.restore(&a.snapshot()).unwrap();
        assert_eq!(b.state.losses.len(), 4);
    }
}
