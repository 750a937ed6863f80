//! # warmup_validator: check that LR warmup does what the config says
//!
//! Hook: `step-metrics` (`on-step`). Warmup bugs are common and silent: schedulers that
//! advance once per micro-batch (accelerate #963), once per data-parallel replica
//! (accelerate #1382), or example scripts that multiply the warmup length inconsistently
//! (diffusers #2632). This plugin watches the LR the host actually used and reports when
//! it does not match the configured warmup, counted in *optimizer* steps.
//!
//! ## At init (advisories: logged, never counted as violations, never stop the run)
//!
//! - logs the effective batch size `batch_size × accumulation`, compares it with the
//!   host's `effective-batch-size` (which also multiplies data-parallel replicas: an exact
//!   multiple is logged as replicas, anything else is a warning), and emits the metric
//!   `effective_batch_size`;
//! - warns when `warmup_steps >= total_steps` (warmup longer than training), or when
//!   warmup covers more than half of training.
//!
//! ## Per step (violations)
//!
//! Each of these is reported once per run:
//!
//! - **early peak**: during warmup the LR reaches 99% of `base_lr` at a step before
//!   0.9 × `warmup_steps`, after starting below it. With `accumulation > 1` this is the
//!   signature of warmup counted in micro-batches; with `accumulation == 1` of a scheduler
//!   stepped more than once per optimizer step.
//! - **accumulation not applied**: the step's `micro-steps` differs from the configured
//!   `accumulation` (a shorter step at the end of an epoch is tolerated).
//! - **no ramp**: warmup is configured (>= 2 steps) but the LR did not increase over the
//!   first min(`warmup_steps`, 10) steps.
//! - **LR decreases** from one warmup step to the next.
//! - **wrong peak**: at step == `warmup_steps` the LR is not within 5% of `base_lr`.
//!
//! And each time it happens:
//!
//! - **gradient explosion during warmup**: `grad-norm` > `explosion_factor` × the median
//!   of the previous grad norms (once at least 3 are known), or an infinite grad norm (what
//!   the host reports for gradients that were not finite). A NaN grad norm is one the host
//!   does not know (a replayed trace that does not record it): it is not checked.
//!
//! Note that another plugin answering `scale-lr` during warmup (e.g. `spike_guard`) changes
//! the LR too and may trigger "LR decreases" or "wrong peak".
//!
//! ## Answers
//!
//! `continue`, always, unless `strict` is true: then a step with a violation answers
//! `stop(reason)`.
//!
//! ## Config (every key optional)
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `explosion_factor` | 10.0 | explosion threshold, times the running grad-norm median (> 1; 0 disables) |
//! | `strict` | false | stop the run on a violation instead of only warning |
//!
//! A misspelled key is an error naming it.
//!
//! ## Metrics
//!
//! `effective_batch_size` at init; `violations` (count so far) every step.
//!
//! ## State
//!
//! The violation count, which checks already reported, the first and previous LR seen and
//! the grad-norm history go into the snapshot.

use lorahost_plugin::stats::RollingWindow;
use lorahost_plugin::{decode_state, encode_state, host, Action, Config, Hook, Plugin, RunInfo, StepMetrics};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Grad norms kept for the running median.
const GRAD_HISTORY: usize = 64;
/// Grad norms needed before the explosion check starts.
const MIN_GRAD_HISTORY: usize = 3;
/// Relative tolerance for "the LR changed" (float noise in schedulers).
const LR_EPS: f64 = 1e-6;

/// The plugin's config section; see the crate docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Grad-norm explosion threshold, times the running median; 0 disables (default 10.0).
    pub explosion_factor: f64,
    /// Stop the run on a violation instead of only warning (default false).
    pub strict: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { explosion_factor: 10.0, strict: false }
    }
}

/// The checks that are reported at most once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Check {
    EarlyPeak,
    Accumulation,
    NoRamp,
    LrDecrease,
    WrongPeak,
}

/// Everything that must survive snapshot/restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Violations reported so far.
    violations: u64,
    /// One-shot checks already reported.
    reported: BTreeSet<Check>,
    /// First warmup step seen, and its LR.
    first: Option<(u64, f64)>,
    /// Previous step seen, and its LR.
    prev: Option<(u64, f64)>,
    /// Whether the LR has risen above its first value.
    ramped: bool,
    /// Recent grad norms during warmup.
    grad_norms: RollingWindow,
}

/// The warmup validator; see the crate docs.
pub struct WarmupValidator {
    cfg: Settings,
    accumulation: u32,
    base_lr: f64,
    steps_per_epoch: u64,
    state: State,
}

impl WarmupValidator {
    /// Add `message` to `found` unless `check` was already reported.
    fn once(&mut self, check: Check, found: &mut Vec<String>, message: impl FnOnce() -> String) {
        if self.state.reported.insert(check) {
            found.push(message());
        }
    }

    fn check_accumulation(&mut self, m: &StepMetrics, found: &mut Vec<String>) {
        let a = self.accumulation;
        let epoch_end = self.steps_per_epoch > 0 && m.step.is_multiple_of(self.steps_per_epoch);
        if m.micro_steps == a || (m.micro_steps < a && epoch_end) {
            return;
        }
        self.once(Check::Accumulation, found, || {
            format!(
                "accumulation not applied: step {} was made of {} micro-steps, \
                 configured accumulation is {a}",
                m.step, m.micro_steps
            )
        });
    }

    /// The LR ramps: rises at least once early on, never falls, ends at base_lr.
    fn check_ramp(&mut self, m: &StepMetrics, warmup: u64, found: &mut Vec<String>) {
        let (first_step, first_lr) = *self.state.first.get_or_insert((m.step, m.lr));
        if let Some((prev_step, prev_lr)) = self.state.prev {
            if prev_step + 1 == m.step && m.lr < prev_lr * (1.0 - LR_EPS) {
                self.once(Check::LrDecrease, found, || {
                    format!(
                        "LR decreases during warmup: {prev_lr:e} at step {prev_step}, {:e} at step {}",
                        m.lr, m.step
                    )
                });
            }
        }
        if m.lr > first_lr * (1.0 + LR_EPS) {
            self.state.ramped = true;
        }
        let check_at = warmup.min(first_step + 9);
        if warmup >= 2 && m.step >= check_at && m.step > first_step && !self.state.ramped {
            self.once(Check::NoRamp, found, || {
                format!(
                    "warmup configured ({warmup} steps) but the LR does not ramp: \
                     it is {first_lr:e} at step {first_step} and {:e} at step {}",
                    m.lr, m.step
                )
            });
        }
        if m.step == warmup && self.base_lr > 0.0 && (m.lr - self.base_lr).abs() > 0.05 * self.base_lr {
            let base = self.base_lr;
            self.once(Check::WrongPeak, found, || {
                format!(
                    "at the end of warmup (step {warmup}) the LR is {:e}, \
                     expected base_lr {base:e} (within 5%)",
                    m.lr
                )
            });
        }
    }

    /// The LR reaches its peak well before the configured end of warmup.
    fn check_early_peak(&mut self, m: &StepMetrics, warmup: u64, found: &mut Vec<String>) {
        let peak = 0.99 * self.base_lr;
        let started_low = self.state.first.is_some_and(|(_, lr)| lr < peak);
        if self.base_lr <= 0.0
            || !started_low
            || m.step < 2
            || m.step as f64 >= 0.9 * warmup as f64
            || m.lr < peak
        {
            return;
        }
        let a = self.accumulation;
        self.once(Check::EarlyPeak, found, || {
            if a > 1 {
                format!(
                    "warmup appears to be counted in micro-batches: LR reached peak at step {} \
                     of {warmup} configured warmup steps (accumulation {a})",
                    m.step
                )
            } else {
                format!(
                    "LR reached peak at step {} of {warmup} configured warmup steps: is the \
                     scheduler stepped more than once per optimizer step (e.g. once per \
                     data-parallel replica)?",
                    m.step
                )
            }
        });
    }

    fn check_explosion(&mut self, m: &StepMetrics, found: &mut Vec<String>) {
        let factor = self.cfg.explosion_factor;
        if factor <= 0.0 {
            return;
        }
        let history = &mut self.state.grad_norms;
        // NaN: the host does not know the norm (a replayed trace without it), nothing to check.
        if m.grad_norm.is_nan() {
            return;
        }
        if !m.grad_norm.is_finite() {
            found.push(format!("non-finite gradient norm {} at step {} during warmup", m.grad_norm, m.step));
        } else if history.len() >= MIN_GRAD_HISTORY && m.grad_norm > factor * history.median() {
            found.push(format!(
                "gradient norm explosion during warmup at step {}: grad_norm {:.4e} > \
                 {factor} x running median {:.4e} of the previous {} steps",
                m.step,
                m.grad_norm,
                history.median(),
                history.len()
            ));
        }
        history.push(m.grad_norm);
    }
}

impl Plugin for WarmupValidator {
    const NAME: &'static str = "warmup_validator";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "checks that LR warmup is counted in optimizer steps, ramps to base_lr, and that gradients stay sane";
    const HOOKS: &'static [Hook] = &[Hook::StepMetrics];

    fn init(config: &Config, run: &RunInfo) -> Result<Self, String> {
        let cfg: Settings = config.parse()?;
        let f = cfg.explosion_factor;
        if !(f.is_finite() && (f == 0.0 || f > 1.0)) {
            return Err("`explosion_factor` must be > 1 (or 0 to disable the check)".into());
        }

        let (bs, acc, host_eff) =
            (run.batch_size as u64, run.accumulation as u64, run.effective_batch_size as u64);
        let eff = bs * acc;
        host::info(&format!(
            "effective batch size = batch_size {bs} x accumulation {acc} = {eff} samples per optimizer step"
        ));
        if host_eff != eff {
            if eff > 0 && host_eff > eff && host_eff.is_multiple_of(eff) {
                host::info(&format!(
                    "host reports effective batch size {host_eff} = {eff} x {} data-parallel replicas",
                    host_eff / eff
                ));
            } else {
                host::warn(&format!(
                    "effective batch size mismatch: batch_size x accumulation = {eff}, \
                     host reports {host_eff}"
                ));
            }
        }
        host::emit_metrics(&[("effective_batch_size", eff as f64)]);

        let (w, t) = (run.warmup_steps, run.total_steps);
        if w > 0 && t > 0 && w >= t {
            host::warn(&format!("warmup ({w} steps) is as long as or longer than training ({t} steps)"));
        } else if w > 0 && t > 0 && 2 * w > t {
            host::warn(&format!(
                "warmup ({w} steps) covers {:.0}% of training ({t} steps)",
                100.0 * w as f64 / t as f64
            ));
        }

        Ok(Self {
            cfg,
            accumulation: run.accumulation.max(1),
            base_lr: run.base_lr,
            steps_per_epoch: run.steps_per_epoch,
            state: State {
                violations: 0,
                reported: BTreeSet::new(),
                first: None,
                prev: None,
                ramped: false,
                grad_norms: RollingWindow::new(GRAD_HISTORY),
            },
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.state)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.state = decode_state(bytes)?;
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Action {
        let mut found = Vec::new();
        self.check_accumulation(m, &mut found);
        let warmup = m.warmup_steps;
        if warmup > 0 && m.step <= warmup {
            self.check_ramp(m, warmup, &mut found);
            self.check_early_peak(m, warmup, &mut found);
            self.check_explosion(m, &mut found);
        }
        self.state.prev = Some((m.step, m.lr));

        for message in &found {
            host::warn(message);
        }
        self.state.violations += found.len() as u64;
        host::emit_metrics(&[("violations", self.state.violations as f64)]);
        if self.cfg.strict && !found.is_empty() {
            Action::Stop(found.join("; "))
        } else {
            Action::Continue
        }
    }
}

lorahost_plugin::export_plugin!(WarmupValidator);

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: f64 = 1e-4;
    const WARMUP: u64 = 20;
    const TOTAL: u64 = 200;

    fn run_info(accumulation: u32) -> RunInfo {
        RunInfo {
            total_steps: TOTAL,
            warmup_steps: WARMUP,
            accumulation,
            batch_size: 2,
            effective_batch_size: 2 * accumulation,
            base_lr: BASE,
            scheduler: "cosine".into(),
            dataset_size: 800,
            steps_per_epoch: 100,
            seed: 0,
            start_step: 1,
        }
    }

    fn metrics(step: u64, lr: f64, grad_norm: f64, micro_steps: u32) -> StepMetrics {
        StepMetrics {
            step,
            micro_steps,
            epoch: 0,
            total_steps: TOTAL,
            warmup_steps: WARMUP,
            loss: 1.0,
            losses: Vec::new(),
            lr,
            grad_norm,
            grad_norm_clipped: grad_norm,
            batch_size: 2 * micro_steps,
            object_count: 10,
            step_time_ms: 100.0,
            memory_bytes: 0,
            extra: Vec::new(),
        }
    }

    fn validator(config: &str, accumulation: u32) -> WarmupValidator {
        WarmupValidator::init(&Config::from_json(config).unwrap(), &run_info(accumulation)).unwrap()
    }

    /// A correct schedule: linear warmup over WARMUP optimizer steps, then cosine.
    fn good_lr(step: u64) -> f64 {
        if step <= WARMUP {
            BASE * step as f64 / WARMUP as f64
        } else {
            let p = (step - WARMUP) as f64 / (TOTAL - WARMUP) as f64;
            BASE * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }

    /// Grad norms with mild deterministic wobble.
    fn grad(step: u64) -> f64 {
        1.0 + 0.1 * ((step * 7) % 5) as f64
    }

    /// Feed `steps` and return every answer.
    fn feed(v: &mut WarmupValidator, steps: impl IntoIterator<Item = StepMetrics>) -> Vec<Action> {
        steps.into_iter().map(|m| v.on_step(&m)).collect()
    }

    #[test]
    fn good_warmup_has_no_violations() {
        let mut v = validator(r#"{"strict": true}"#, 4);
        let answers = feed(&mut v, (1..=TOTAL).map(|s| metrics(s, good_lr(s), grad(s), 4)));
        assert!(answers.iter().all(|a| matches!(a, Action::Continue)));
        assert_eq!(v.state.violations, 0);
    }

    #[test]
    fn warmup_counted_in_micro_batches_is_detected() {
        // The scheduler advanced once per micro-batch: peak after WARMUP / 4 steps.
        let mut v = validator("{}", 4);
        let lr = |s: u64| BASE * (4.0 * s as f64 / WARMUP as f64).min(1.0);
        let answers = feed(&mut v, (1..=WARMUP + 5).map(|s| metrics(s, lr(s), grad(s), 4)));
        assert!(answers.iter().all(|a| matches!(a, Action::Continue)), "not strict: never stops");
        assert_eq!(v.state.violations, 1, "reported once");
        assert!(v.state.reported.contains(&Check::EarlyPeak));
    }

    #[test]
    fn strict_mode_stops_with_the_reason() {
        let mut v = validator(r#"{"strict": true}"#, 4);
        let lr = |s: u64| BASE * (4.0 * s as f64 / WARMUP as f64).min(1.0);
        let answers = feed(&mut v, (1..=5).map(|s| metrics(s, lr(s), grad(s), 4)));
        assert!(answers[..4].iter().all(|a| matches!(a, Action::Continue)));
        match &answers[4] {
            Action::Stop(reason) => assert!(
                reason.contains(
                    "counted in micro-batches: LR reached peak at step 5 of 20 configured warmup steps \
                     (accumulation 4)"
                ),
                "{reason}"
            ),
            other => panic!("expected stop, got {other:?}"),
        }
    }

    #[test]
    fn flat_lr_during_warmup_is_detected() {
        let mut v = validator("{}", 1);
        feed(&mut v, (1..=WARMUP + 5).map(|s| metrics(s, BASE, grad(s), 1)));
        assert_eq!(v.state.violations, 1);
        assert!(v.state.reported.contains(&Check::NoRamp));
    }

    #[test]
    fn decreasing_lr_during_warmup_is_detected() {
        let mut v = validator("{}", 1);
        let lr = |s: u64| if s == 8 { good_lr(6) } else { good_lr(s) };
        feed(&mut v, (1..=WARMUP).map(|s| metrics(s, lr(s), grad(s), 1)));
        assert_eq!(v.state.reported.iter().copied().collect::<Vec<_>>(), vec![Check::LrDecrease]);
    }

    #[test]
    fn warmup_ending_below_base_lr_is_detected() {
        let mut v = validator("{}", 1);
        feed(&mut v, (1..=WARMUP).map(|s| metrics(s, 0.5 * good_lr(s), grad(s), 1)));
        assert_eq!(v.state.reported.iter().copied().collect::<Vec<_>>(), vec![Check::WrongPeak]);
    }

    #[test]
    fn gradient_explosion_during_warmup_is_detected() {
        let mut v = validator("{}", 1);
        let g = |s: u64| if s == 6 { 50.0 } else { grad(s) };
        feed(&mut v, (1..=WARMUP).map(|s| metrics(s, good_lr(s), g(s), 1)));
        assert_eq!(v.state.violations, 1);
        // After warmup, big grad norms are someone else's business (e.g. spike_guard).
        feed(&mut v, [metrics(WARMUP + 1, good_lr(WARMUP + 1), 500.0, 1)]);
        assert_eq!(v.state.violations, 1);
    }

    /// A NaN grad norm is unknown (a replayed trace without norms): no violation, no stop in
    /// strict mode, the history untouched; an infinite one is still a violation.
    #[test]
    fn an_unknown_grad_norm_is_not_a_violation() {
        let mut v = validator(r#"{"strict": true}"#, 1);
        let answers = feed(&mut v, (1..=WARMUP).map(|s| metrics(s, good_lr(s), f64::NAN, 1)));
        assert!(answers.iter().all(|a| matches!(a, Action::Continue)), "{answers:?}");
        assert_eq!(v.state.violations, 0);
        assert_eq!(v.state.grad_norms.len(), 0);
        let mut v = validator("{}", 1);
        feed(&mut v, (1..=3).map(|s| metrics(s, good_lr(s), f64::INFINITY, 1)));
        assert_eq!(v.state.violations, 3);
    }

    #[test]
    fn missing_accumulation_is_detected_once() {
        let mut v = validator("{}", 4);
        feed(&mut v, (1..=WARMUP + 5).map(|s| metrics(s, good_lr(s), grad(s), 1)));
        assert_eq!(v.state.reported.iter().copied().collect::<Vec<_>>(), vec![Check::Accumulation]);
        assert_eq!(v.state.violations, 1);
    }

    #[test]
    fn short_last_step_of_an_epoch_is_tolerated() {
        let mut v = validator("{}", 4);
        let micro = |s: u64| if s == 100 { 2 } else { 4 };
        feed(&mut v, (1..=120).map(|s| metrics(s, good_lr(s), grad(s), micro(s))));
        assert_eq!(v.state.violations, 0);
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = |json: &str| {
            WarmupValidator::init(&Config::from_json(json).unwrap(), &run_info(1)).err().unwrap()
        };
        assert!(err(r#"{"strikt": true}"#).contains("strikt"));
        assert!(err(r#"{"explosion_factor": 0.5}"#).contains("explosion_factor"));
    }

    #[test]
    fn snapshot_restore_keeps_state() {
        let mut a = validator("{}", 1);
        feed(&mut a, (1..=12).map(|s| metrics(s, BASE, grad(s), 1)));
        assert_eq!(a.state.violations, 1);
        let mut b = validator("{}", 1);
        b.restore(&a.snapshot()).unwrap();
        // Already reported: the restored instance does not report the flat LR again.
        feed(&mut b, (13..=WARMUP).map(|s| metrics(s, BASE, grad(s), 1)));
        assert_eq!(b.state.violations, 1);
        feed(&mut a, (13..=WARMUP).map(|s| metrics(s, BASE, grad(s), 1)));
        assert_eq!(a.snapshot(), b.snapshot());
    }
}
