//! # cosine_schedule: linear warmup, then cosine decay (the template LR plugin)
//!
//! Hook: `lr-schedule` (`lr-for-step`). This crate is meant to be copied: it is the
//! smallest complete plugin, and every part of it is commented. To write your own
//! schedule, copy this directory, rename the crate and [`CosineSchedule::NAME`], and
//! replace [`lr_at`].
//!
//! ## The schedule
//!
//! With `base` the peak LR, `W` the warmup length, `T` the total steps and `min` =
//! `min_lr_ratio` × `base` (steps are optimizer steps, counted from 1):
//!
//! - warmup, step <= W: `lr = base · (start + (1 − start) · step / W)`, a straight line
//!   from `warmup_start_factor` × `base` up to `base` at step W. Even with the default
//!   start of 0 the LR of step 1 is `base / W`, never exactly 0 (a step at LR 0 is wasted).
//! - decay, W < step <= T: `lr = min + (base − min) · ½ · (1 + cos(π · q))` with
//!   `q = (step − W − 1) / (T − W)`: step W + 1 runs at the peak and step T just above `min`
//!   (as lorahost's built-in schedules: no step is spent at the final LR). With `cycles` =
//!   c > 1 the decay phase is cut into c equal cycles and `q` restarts from 0 at each (the LR
//!   jumps back to `base`; "SGDR", Loshchilov & Hutter 2017).
//! - after T: `min`.
//!
//! The answer is always finite and >= 0. When the total step count is unknown (0 from
//! the host and no `total_steps` in the config) the plugin answers "none" and the host
//! uses the config's scheduler.
//!
//! ## Config (every key optional)
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `base_lr` | the request's `base-lr` | peak LR (> 0) |
//! | `warmup_steps` | the request's `warmup-steps` | warmup length in optimizer steps |
//! | `total_steps` | the request's `total-steps` | step at which the LR reaches `min` |
//! | `warmup_start_factor` | 0.0 | LR at step 0 as a fraction of `base_lr` (0..=1) |
//! | `min_lr_ratio` | 0.0 | final LR as a fraction of `base_lr` (0..=1) |
//! | `cycles` | 1 | cosine cycles in the decay phase (>= 1) |
//!
//! A misspelled key is an error naming it.
//!
//! ## State
//!
//! None: the LR is a pure function of the step, so hot reload, crash recovery and resume
//! need nothing from `snapshot`. (A schedule that reacts to the loss would keep what it
//! learned in a state struct and implement `snapshot`/`restore`; see `spike_guard`.)

// `Plugin` is the trait every plugin implements; `LrRequest` is what `lr-for-step` gets.
use lorahost_plugin::{host, Config, Hook, LrRequest, Plugin, RunInfo};
use serde::Deserialize;
use std::f64::consts::PI;

/// The plugin's config section, parsed from the JSON the host passes to `init`.
///
/// `#[serde(default)]` fills missing keys from [`Default`], and `deny_unknown_fields`
/// turns a misspelled key into an error that names it, instead of silently ignoring it.
/// `Option` fields mean "not set: take the value from the request".
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Peak LR (default: the request's `base-lr`).
    pub base_lr: Option<f64>,
    /// Warmup length in optimizer steps (default: the request's `warmup-steps`).
    pub warmup_steps: Option<u64>,
    /// Step at which the LR reaches its minimum (default: the request's `total-steps`).
    pub total_steps: Option<u64>,
    /// LR at step 0 as a fraction of the peak (default 0.0).
    pub warmup_start_factor: f64,
    /// Final LR as a fraction of the peak (default 0.0).
    pub min_lr_ratio: f64,
    /// Cosine cycles in the decay phase (default 1).
    pub cycles: u32,
}

impl Default for Settings {
    /// The documented defaults.
    fn default() -> Self {
        Self {
            base_lr: None,
            warmup_steps: None,
            total_steps: None,
            warmup_start_factor: 0.0,
            min_lr_ratio: 0.0,
            cycles: 1,
        }
    }
}

impl Settings {
    /// Reject values that cannot give a sensible schedule. The error reaches the user, so
    /// it names the key.
    fn validate(&self) -> Result<(), String> {
        if let Some(lr) = self.base_lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!("`base_lr` must be a positive number, got {lr}"));
            }
        }
        if !(0.0..=1.0).contains(&self.warmup_start_factor) {
            return Err("`warmup_start_factor` must be in [0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err("`min_lr_ratio` must be in [0, 1]".into());
        }
        if self.cycles == 0 {
            return Err("`cycles` must be at least 1".into());
        }
        Ok(())
    }
}

/// The schedule's parameters for one request, after config overrides.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Peak LR.
    pub base: f64,
    /// Warmup length (optimizer steps).
    pub warmup: u64,
    /// Step at which the LR reaches its minimum.
    pub total: u64,
    /// Warmup starts from `start × base`.
    pub start: f64,
    /// Final LR as a fraction of `base`.
    pub min_ratio: f64,
    /// Cosine cycles in the decay phase.
    pub cycles: u32,
}

/// The LR of optimizer `step` (1-based). A pure function: easy to test, and it makes the
/// plugin stateless. Replace this function to write another schedule.
pub fn lr_at(s: &Schedule, step: u64) -> f64 {
    let min = s.min_ratio * s.base;

    // Warmup: a straight line from start × base (at step 0) to base (at step `warmup`).
    // (`warmup > 0` also keeps us from dividing by zero when there is no warmup.)
    if s.warmup > 0 && step <= s.warmup {
        let t = step as f64 / s.warmup as f64;
        return s.base * (s.start + (1.0 - s.start) * t);
    }

    // Past the end: stay at the minimum (never negative, never NaN).
    if step > s.total {
        return min;
    }

    // Decay: the decay phase has `len` steps and we are `done` steps into it (0 on the first
    // step after warmup). Here warmup < step <= total, so `len` > 0. (`step` 0 without warmup
    // counts as the first decay step.)
    let len = (s.total - s.warmup) as u128;
    let done = step.saturating_sub(s.warmup + 1) as u128;
    // `q` is the position inside the current cycle, 0 → 1. Integer arithmetic makes the
    // restarts land exactly on their steps (no float rounding just below a cycle's end).
    let cycles = s.cycles.max(1) as u128;
    let q = ((done * cycles) % len) as f64 / len as f64;
    // Half a cosine period: from 1 (q = 0) down to 0 (q = 1).
    let cosine = 0.5 * (1.0 + (PI * q).cos());
    min + (s.base - min) * cosine
}

/// The plugin itself: only its settings, no state.
pub struct CosineSchedule {
    cfg: Settings,
}

impl CosineSchedule {
    /// Combine the request (the host's view of the run) with the config overrides.
    fn schedule(&self, req: &LrRequest) -> Schedule {
        Schedule {
            base: self.cfg.base_lr.unwrap_or(req.base_lr),
            warmup: self.cfg.warmup_steps.unwrap_or(req.warmup_steps),
            total: self.cfg.total_steps.unwrap_or(req.total_steps),
            start: self.cfg.warmup_start_factor,
            min_ratio: self.cfg.min_lr_ratio,
            cycles: self.cfg.cycles,
        }
    }
}

impl Plugin for CosineSchedule {
    // The manifest: `describe` returns these. NAME is used in logs, metrics and
    // checkpoints; HOOKS lists the hooks the host will call (only these).
    const NAME: &'static str = "cosine_schedule";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "linear warmup, then cosine decay to min_lr_ratio x base_lr (optional restarts)";
    const HOOKS: &'static [Hook] = &[Hook::LrSchedule];

    /// Called once, before any hook. An `Err` is shown to the user and disables the plugin
    /// (on hot reload, the old version keeps running).
    fn init(config: &Config, run: &RunInfo) -> Result<Self, String> {
        let cfg: Settings = config.parse()?;
        cfg.validate()?;
        // Say once what schedule will run; the host tags the line with the plugin's name.
        let base = cfg.base_lr.unwrap_or(run.base_lr);
        let warmup = cfg.warmup_steps.unwrap_or(run.warmup_steps);
        let total = cfg.total_steps.unwrap_or(run.total_steps);
        host::info(&format!(
            "cosine schedule: base_lr {base:e}, warmup {warmup} steps, \
             decay to {:e} at step {total}, {} cycle(s)",
            cfg.min_lr_ratio * base,
            cfg.cycles
        ));
        Ok(Self { cfg })
    }

    // `snapshot`/`restore` keep their defaults (empty state): nothing to carry.

    /// The LR of the next optimizer step, or `None` to defer to the config's scheduler.
    fn lr_for_step(&mut self, req: &LrRequest) -> Option<f64> {
        let schedule = self.schedule(req);
        if schedule.total == 0 || !(schedule.base.is_finite() && schedule.base > 0.0) {
            // Unknown run length (or no usable LR): let the host's scheduler decide.
            return None;
        }
        // The host rejects a negative or non-finite LR; make sure we never send one.
        let lr = lr_at(&schedule, req.step);
        lr.is_finite().then_some(lr.max(0.0))
    }
}

lorahost_plugin::export_plugin!(CosineSchedule);

// Unit tests run natively (`cargo test`): call the trait methods directly on the struct.
#[cfg(test)]
mod tests {
    use super::*;

    const BASE: f64 = 2e-4;

    fn run_info() -> RunInfo {
        RunInfo {
            total_steps: 100,
            warmup_steps: 10,
            accumulation: 1,
            batch_size: 4,
            effective_batch_size: 4,
            base_lr: BASE,
            scheduler: "cosine".into(),
            dataset_size: 400,
            steps_per_epoch: 100,
            seed: 0,
            start_step: 1,
        }
    }

    /// A request as the host would send it for `step` of a 100-step run with 10 warmup steps.
    fn request(step: u64) -> LrRequest {
        LrRequest {
            step,
            total_steps: 100,
            warmup_steps: 10,
            base_lr: BASE,
            scheduled_lr: BASE,
            last_loss: f64::NAN,
        }
    }

    fn plugin(config: &str) -> CosineSchedule {
        CosineSchedule::init(&Config::from_json(config).unwrap(), &run_info()).unwrap()
    }

    fn lr(p: &mut CosineSchedule, step: u64) -> f64 {
        p.lr_for_step(&request(step)).expect("an LR")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
    }

    #[test]
    fn reaches_base_lr_at_the_end_of_warmup() {
        let mut p = plugin("{}");
        assert!(close(lr(&mut p, 10), BASE));
        assert!(close(lr(&mut p, 11), BASE), "the peak right after warmup, as the host's schedule");
        assert!(lr(&mut p, 12) < BASE);
    }

    #[test]
    fn warmup_is_increasing_and_never_zero() {
        let mut p = plugin("{}");
        assert!(close(lr(&mut p, 1), BASE / 10.0), "step 1 is base / warmup, not 0");
        let warmup: Vec<f64> = (1..=10).map(|s| lr(&mut p, s)).collect();
        assert!(warmup.windows(2).all(|w| w[1] > w[0]), "{warmup:?}");
        let mut from_half = plugin(r#"{"warmup_start_factor": 0.5}"#);
        assert!(close(lr(&mut from_half, 1), BASE * 0.55));
    }

    #[test]
    fn decays_monotonically_to_the_minimum() {
        let mut p = plugin(r#"{"min_lr_ratio": 0.1}"#);
        let decay: Vec<f64> = (11..=101).map(|s| lr(&mut p, s)).collect();
        assert!(decay.windows(2).all(|w| w[1] < w[0]), "{decay:?}");
        // The last step (100) is just above the minimum, not at it; after it, the minimum.
        assert!(lr(&mut p, 100) > 0.1 * BASE && lr(&mut p, 100) < 0.101 * BASE);
        assert!(close(lr(&mut p, 101), 0.1 * BASE));
        // Halfway through the decay the cosine is at the midpoint.
        assert!(close(lr(&mut p, 56), 0.55 * BASE));
    }

    #[test]
    fn never_negative_or_nan_beyond_total() {
        let mut p = plugin("{}");
        for step in [0, 1, 50, 99, 100, 101, 1_000, u64::MAX] {
            let v = lr(&mut p, step);
            assert!(v.is_finite() && v >= 0.0, "step {step}: {v}");
        }
        assert_eq!(lr(&mut p, 1_000), 0.0);
    }

    #[test]
    fn defers_when_total_steps_is_unknown() {
        let mut p = plugin("{}");
        let mut req = request(5);
        req.total_steps = 0;
        assert_eq!(p.lr_for_step(&req), None);
        // A configured total makes it answer again.
        let mut q = plugin(r#"{"total_steps": 50}"#);
        assert!(q.lr_for_step(&req).is_some());
    }

    #[test]
    fn config_overrides_the_request() {
        let mut p = plugin(r#"{"base_lr": 1e-3, "warmup_steps": 4, "total_steps": 20}"#);
        assert!(close(lr(&mut p, 4), 1e-3));
        assert!(close(lr(&mut p, 2), 0.5e-3));
        assert!(lr(&mut p, 20) > 0.0, "the last step still moves");
        assert_eq!(lr(&mut p, 21), 0.0);
    }

    #[test]
    fn no_warmup_starts_at_base() {
        let mut p = plugin(r#"{"warmup_steps": 0}"#);
        assert!(close(lr(&mut p, 0), BASE));
        assert!(close(lr(&mut p, 1), BASE), "the first step runs at the peak");
        assert!(lr(&mut p, 2) < BASE && lr(&mut p, 2) > 0.99 * BASE);
    }

    #[test]
    fn cycles_restart_at_base() {
        // 90 decay steps in 3 cycles of 30: restarts at steps 41 and 71.
        let mut p = plugin(r#"{"cycles": 3}"#);
        assert!(lr(&mut p, 40) < 0.01 * BASE);
        assert!(close(lr(&mut p, 41), BASE));
        assert!(close(lr(&mut p, 71), BASE));
        assert!(lr(&mut p, 100) < 0.01 * BASE && lr(&mut p, 100) > 0.0);
        assert_eq!(lr(&mut p, 101), 0.0);
    }

    #[test]
    fn bad_config_is_rejected_with_the_key() {
        let err =
            |json: &str| CosineSchedule::init(&Config::from_json(json).unwrap(), &run_info()).err().unwrap();
        assert!(err(r#"{"warmup_step": 10}"#).contains("warmup_step"));
        assert!(err(r#"{"min_lr_ratio": 2}"#).contains("min_lr_ratio"));
        assert!(err(r#"{"cycles": 0}"#).contains("cycles"));
        assert!(err(r#"{"base_lr": -1}"#).contains("base_lr"));
    }
}
