//! # early_stopping: stop when validation stops improving
//!
//! Hook: `step-metrics` (`on-step`). Small fine-tuning sets over-train quickly (the seed
//! trainer's failure mode F27: validation loss converges in 2–3 epochs while the README
//! suggests up to 100). This plugin watches a validation metric and answers `stop` when its
//! (optionally smoothed) value has not improved for `patience` evaluations. The trainer keeps
//! the best adapters in the run's `best/` folder on its own (chosen by `evaluation.metric`),
//! so stopping loses nothing.
//!
//! ## What it reads
//!
//! After each validation the host adds the latest results to every later step's `extra`
//! values: `validation.step` (the step validated at), `validation.loss`, and when metrics are
//! computed (`evaluation.compute_metrics_during_training: true`, or an `evaluation.metric`
//! other than `loss`) `validation.map`, `validation.ap50`, `validation.cgf1`, and the pixel
//! metrics for thin structures `validation.pixel_f1`, `validation.relaxed_f1`,
//! `validation.cldice` (watch one of those for cracks: `metric: validation.cldice`). The validation
//! before training counts as step 0. A validation at step N is
//! therefore seen at step N + 1, and a stop takes effect after that step. An evaluation is
//! *new* when `validation.step` changes (or, for traces without it, when the value changes).
//! Any other numeric `extra` name can be watched too. When validations have run (the step
//! metrics carry `validation.step`) but the watched metric is not among them (e.g. `val_loss`
//! for `validation.loss`, or `validation.map` without metrics computed), a warning names the
//! values that are there, once.
//!
//! ## Config (every key optional)
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `metric` | `"validation.loss"` | the `extra` value to watch |
//! | `mode` | `"min"` for names ending in `loss`, else `"max"` | whether lower or higher is better |
//! | `patience` | 3 | evaluations without improvement before stopping (>= 1) |
//! | `min_delta` | 0.0 | an improvement must beat the best by more than this (absolute) |
//! | `min_rel_delta` | 0.0 | ... and by more than this fraction of the best's magnitude |
//! | `smoothing` | 0.0 | EMA factor in [0, 1): `s = smoothing · s + (1 − smoothing) · value`; 0 = raw values |
//! | `min_step` | 0 | never stop before this optimizer step |
//!
//! With smoothing, a plateau still creeps towards its value, so pair it with a `min_delta` or
//! `min_rel_delta` above the noise. A misspelled key is an error naming it.
//!
//! ## Metrics
//!
//! `best` (best smoothed value so far), `bad_evals` (evaluations since it) and `smoothed`,
//! each time a new evaluation arrives.
//!
//! ## State
//!
//! The best value and its step, the count of evaluations since, the smoothed value and the
//! last evaluation seen go into the snapshot, so `--resume` continues the count.

use lorahost_plugin::{decode_state, encode_state, host, Action, Config, Hook, Plugin, RunInfo, StepMetrics};
use serde::{Deserialize, Serialize};

/// Whether lower or higher values are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Lower is better (losses).
    Min,
    /// Higher is better (mAP, cgF1).
    Max,
}

/// The plugin's config section; see the crate docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The `extra` value to watch (default `validation.loss`).
    pub metric: String,
    /// Lower or higher is better (default: by the metric's name).
    pub mode: Option<Mode>,
    /// Evaluations without improvement before stopping (default 3).
    pub patience: u32,
    /// Absolute improvement needed (default 0).
    pub min_delta: f64,
    /// Relative improvement needed, as a fraction of |best| (default 0).
    pub min_rel_delta: f64,
    /// EMA factor in [0, 1) (default 0: raw values).
    pub smoothing: f64,
    /// No stop before this step (default 0).
    pub min_step: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            metric: "validation.loss".into(),
            mode: None,
            patience: 3,
            min_delta: 0.0,
            min_rel_delta: 0.0,
            smoothing: 0.0,
            min_step: 0,
        }
    }
}

/// Everything that must survive snapshot/restore.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// Best smoothed value so far and the step of its evaluation.
    best: Option<(f64, u64)>,
    /// Evaluations since the best.
    bad_evals: u32,
    /// The smoothed value.
    smoothed: Option<f64>,
    /// The last evaluation seen: its `validation.step` (or step seen) and raw value.
    last: Option<(u64, f64)>,
}

/// The early-stopping plugin; see the crate docs.
pub struct EarlyStopping {
    cfg: Settings,
    mode: Mode,
    state: State,
    /// Whether the missing-metric warning was given (once per process, not snapshotted).
    warned_missing: bool,
}

impl EarlyStopping {
    fn extra(m: &StepMetrics, name: &str) -> Option<f64> {
        m.extra.iter().find(|v| v.name == name).map(|v| v.value)
    }

    /// The warning for step metrics `m` from after a validation (`validation.step` present)
    /// that lack the watched metric: it names the values there are.
    fn missing_metric_warning(&self, m: &StepMetrics) -> Option<String> {
        if Self::extra(m, "validation.step").is_none() || Self::extra(m, &self.cfg.metric).is_some() {
            return None;
        }
        let mut names: Vec<&str> = m
            .extra
            .iter()
            .map(|v| v.name.as_str())
            .filter(|n| *n != "validation.step" && !n.starts_with("plugin."))
            .collect();
        names.sort_unstable();
        let (validation, other): (Vec<&str>, Vec<&str>) =
            names.into_iter().partition(|n| n.starts_with("validation."));
        let hint = if self.cfg.metric.starts_with("validation.") {
            " (validation.map, .ap50 and .cgf1 need evaluation.compute_metrics_during_training: true)"
        } else {
            ""
        };
        Some(format!(
            "`{}` is not among the step metrics after validation, so it never stops the run; \
             validation gives: {}{}; set early_stopping.metric to one of them{hint}",
            self.cfg.metric,
            if validation.is_empty() {
                "nothing besides validation.step".to_string()
            } else {
                validation.join(", ")
            },
            if other.is_empty() { String::new() } else { format!(" (other values: {})", other.join(", ")) }
        ))
    }

    /// The improvement an evaluation must make, in words: "improved" alone without margins,
    /// else by how much (the larger of min_delta and min_rel_delta × |best|).
    fn improvement_needed(&self, best: f64) -> String {
        let (abs, rel) = (self.cfg.min_delta, self.cfg.min_rel_delta);
        let margin = abs.max(rel * best.abs());
        match (abs > 0.0, rel > 0.0) {
            (false, false) => "improved".into(),
            (true, false) => format!("improved by more than min_delta {abs}"),
            (false, true) => format!("improved by more than min_rel_delta {rel} × |best| = {margin:.6}"),
            (true, true) => format!(
                "improved by more than max(min_delta {abs}, min_rel_delta {rel} × |best|) = {margin:.6}"
            ),
        }
    }

    /// Whether `value` beats `best` by the configured margins.
    fn improves(&self, value: f64, best: f64) -> bool {
        let margin = self.cfg.min_delta.max(self.cfg.min_rel_delta * best.abs());
        match self.mode {
            Mode::Min => value < best - margin,
            Mode::Max => value > best + margin,
        }
    }
}

impl Plugin for EarlyStopping {
    const NAME: &'static str = "early_stopping";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "stops training when a (smoothed) validation metric has not improved for `patience` evaluations";
    const HOOKS: &'static [Hook] = &[Hook::StepMetrics];

    fn init(config: &Config, run: &RunInfo) -> Result<Self, String> {
        let cfg: Settings = config.parse()?;
        if cfg.metric.trim().is_empty() {
            return Err(
                "`metric` is empty: name an extra value, e.g. validation.loss or validation.cgf1".into()
            );
        }
        if cfg.patience == 0 {
            return Err("`patience` must be at least 1 (evaluations without improvement)".into());
        }
        for (key, v) in [("min_delta", cfg.min_delta), ("min_rel_delta", cfg.min_rel_delta)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("`{key}` must be a number >= 0, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&cfg.smoothing) {
            return Err(format!("`smoothing` must be in [0, 1), got {}", cfg.smoothing));
        }
        let mode = cfg.mode.unwrap_or(if cfg.metric.ends_with("loss") { Mode::Min } else { Mode::Max });
        host::info(&format!(
            "watching {} ({}), stop after {} evaluation(s) without improvement{}",
            cfg.metric,
            if mode == Mode::Min { "lower is better" } else { "higher is better" },
            cfg.patience,
            if run.total_steps > 0 { format!(" (run of {} steps)", run.total_steps) } else { String::new() }
        ));
        Ok(Self { cfg, mode, state: State::default(), warned_missing: false })
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_state(&self.state)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.state = decode_state(bytes)?;
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Action {
        if !self.warned_missing {
            if let Some(w) = self.missing_metric_warning(m) {
                host::warn(&w);
                self.warned_missing = true;
            }
        }
        let Some(value) = Self::extra(m, &self.cfg.metric).filter(|v| v.is_finite()) else {
            return Action::Continue;
        };
        let eval_step = Self::extra(m, "validation.step").map(|s| s as u64);
        let new = match (self.state.last, eval_step) {
            (None, _) => true,
            (Some((last_step, _)), Some(s)) => s != last_step,
            (Some((_, last_value)), None) => value != last_value,
        };
        if new {
            self.update(value, eval_step.unwrap_or(m.step));
        }
        // Checked on every step, so a `min_step` that holds a stop back releases it on time.
        match self.state.best {
            Some((best, best_at))
                if self.state.bad_evals >= self.cfg.patience && m.step >= self.cfg.min_step =>
            {
                Action::Stop(format!(
                    "{} has not {} for {} evaluations (best {best:.6} at step {best_at}, now {:.6}); \
                     the best adapters are in the run's best/ folder (chosen by evaluation.metric)",
                    self.cfg.metric,
                    self.improvement_needed(best),
                    self.state.bad_evals,
                    self.state.smoothed.unwrap_or(value)
                ))
            }
            _ => Action::Continue,
        }
    }
}

impl EarlyStopping {
    /// Take a new evaluation `value` made at step `at`.
    fn update(&mut self, value: f64, at: u64) {
        self.state.last = Some((at, value));
        let s = self.cfg.smoothing;
        let smoothed = match self.state.smoothed {
            Some(prev) if s > 0.0 => s * prev + (1.0 - s) * value,
            _ => value,
        };
        self.state.smoothed = Some(smoothed);
        match self.state.best {
            Some((best, _)) if !self.improves(smoothed, best) => self.state.bad_evals += 1,
            _ => {
                self.state.best = Some((smoothed, at));
                self.state.bad_evals = 0;
            }
        }
        let best = self.state.best.map_or(smoothed, |b| b.0);
        host::emit_metrics(&[
            ("best", best),
            ("bad_evals", self.state.bad_evals as f64),
            ("smoothed", smoothed),
        ]);
    }
}

lorahost_plugin::export_plugin!(EarlyStopping);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_plugin::NamedValue;

    fn run_info() -> RunInfo {
        RunInfo {
            total_steps: 100,
            warmup_steps: 0,
            accumulation: 1,
            batch_size: 2,
            effective_batch_size: 2,
            base_lr: 1e-4,
            scheduler: "cosine".into(),
            dataset_size: 20,
            steps_per_epoch: 10,
            seed: 0,
            start_step: 1,
        }
    }

    fn plugin(config: &str) -> EarlyStopping {
        EarlyStopping::init(&Config::from_json(config).unwrap(), &run_info()).unwrap()
    }

    fn step(step: u64, extra: &[(&str, f64)]) -> StepMetrics {
        StepMetrics {
            step,
            micro_steps: 1,
            epoch: 0,
            total_steps: 100,
            warmup_steps: 0,
            loss: 1.0,
            losses: Vec::new(),
            lr: 1e-4,
            grad_norm: 1.0,
            grad_norm_clipped: 1.0,
            batch_size: 2,
            object_count: 3,
            step_time_ms: 10.0,
            memory_bytes: 0,
            extra: extra.iter().map(|(n, v)| NamedValue { name: n.to_string(), value: *v }).collect(),
        }
    }

    /// Feed one evaluation per `every` steps (validated at step k·every, seen a step later, and
    /// repeated on the steps in between, as the host does); return the step that stopped.
    fn run(p: &mut EarlyStopping, metric: &str, values: &[f64], every: u64) -> Option<(u64, String)> {
        let mut latest: Option<(u64, f64)> = None;
        for s in 1..=(values.len() as u64 + 1) * every {
            let extra: Vec<(&str, f64)> =
                latest.map(|(at, v)| vec![("validation.step", at as f64), (metric, v)]).unwrap_or_default();
            if let Action::Stop(r) = p.on_step(&step(s, &extra)) {
                return Some((s, r));
            }
            if s % every == 0 {
                if let Some(v) = values.get((s / every - 1) as usize) {
                    latest = Some((s, *v));
                }
            }
        }
        None
    }

    #[test]
    fn stops_after_patience_evaluations_without_improvement() {
        let mut p = plugin(r#"{"patience": 2}"#);
        // Evaluations at 5, 10, 15, 20, 25: best at 10, then 2 worse ones (15, 20).
        let (at, why) = run(&mut p, "validation.loss", &[3.0, 2.0, 2.5, 2.1, 1.0], 5).unwrap();
        assert_eq!(at, 21, "the evaluation at 20 is seen at step 21");
        assert!(why.contains("best 2.000000 at step 10") && why.contains("2 evaluations"), "{why}");
    }

    #[test]
    fn improvements_reset_the_count_and_a_falling_loss_never_stops() {
        let mut p = plugin(r#"{"patience": 2}"#);
        assert!(run(&mut p, "validation.loss", &[3.0, 3.1, 2.9, 3.0, 2.8, 2.7, 2.6], 3).is_none());
        assert_eq!(p.state.best, Some((2.6, 21)));
    }

    #[test]
    fn higher_is_better_for_metrics_and_margins_apply() {
        // cgF1 is maximised by default.
        let mut p = plugin(r#"{"metric": "validation.cgf1", "patience": 1}"#);
        let (at, _) = run(&mut p, "validation.cgf1", &[10.0, 20.0, 19.0], 1).unwrap();
        assert_eq!(at, 4);
        // A 5% relative margin: 20 -> 20.5 is not an improvement.
        let mut p = plugin(r#"{"metric": "validation.cgf1", "patience": 1, "min_rel_delta": 0.05}"#);
        assert!(run(&mut p, "validation.cgf1", &[20.0, 20.5], 1).is_some());
        let mut p = plugin(r#"{"metric": "validation.cgf1", "patience": 1, "min_delta": 0.4}"#);
        assert!(run(&mut p, "validation.cgf1", &[20.0, 20.5], 1).is_none());
        // An explicit mode wins over the name.
        let mut p = plugin(r#"{"metric": "validation.loss", "mode": "max", "patience": 1}"#);
        assert!(run(&mut p, "validation.loss", &[2.0, 1.0], 1).is_some());
    }

    #[test]
    fn smoothing_rides_out_a_single_noisy_evaluation() {
        let values = [5.0, 4.0, 3.0, 3.6, 2.8, 2.6];
        // Raw values: the bump at the 4th evaluation counts as a bad one and stops with patience 1.
        assert!(run(&mut plugin(r#"{"patience": 1}"#), "validation.loss", &values, 2).is_some());
        // EMA 0.5: 5, 4.5, 3.75, 3.675, 3.2375, ... keeps improving.
        assert!(
            run(&mut plugin(r#"{"patience": 1, "smoothing": 0.5}"#), "validation.loss", &values, 2).is_none()
        );
    }

    #[test]
    fn min_step_holds_the_stop_back() {
        let mut p = plugin(r#"{"patience": 1, "min_step": 8}"#);
        let (at, _) = run(&mut p, "validation.loss", &[1.0, 2.0, 2.0, 2.0, 2.0, 2.0], 2).unwrap();
        assert_eq!(at, 8);
    }

    #[test]
    fn repeated_values_are_one_evaluation_and_state_survives_a_restore() {
        let mut p = plugin(r#"{"patience": 2}"#);
        let seen =
            |s: u64, at: u64, v: f64| step(s, &[("validation.step", at as f64), ("validation.loss", v)]);
        for s in 2..=5 {
            assert!(matches!(p.on_step(&seen(s, 1, 1.0)), Action::Continue));
        }
        assert_eq!(p.state.bad_evals, 0, "the same evaluation repeated is not a bad one");
        assert!(matches!(p.on_step(&seen(6, 5, 1.5)), Action::Continue));
        let snap = p.snapshot();
        let mut q = plugin(r#"{"patience": 2}"#);
        q.restore(&snap).unwrap();
        assert!(matches!(q.on_step(&seen(10, 9, 1.2)), Action::Stop(_)), "the count went on");
        // Traces without validation.step: a changed value is a new evaluation.
        let mut p = plugin(r#"{"patience": 1}"#);
        assert!(matches!(p.on_step(&step(1, &[("validation.loss", 1.0)])), Action::Continue));
        assert!(matches!(p.on_step(&step(2, &[("validation.loss", 1.0)])), Action::Continue));
        assert!(matches!(p.on_step(&step(3, &[("validation.loss", 1.1)])), Action::Stop(_)));
        // No metric, no action.
        assert!(matches!(plugin("{}").on_step(&step(1, &[])), Action::Continue));
    }

    /// The stop message names the margin an evaluation had to beat and where the best
    /// adapters are (no placeholder).
    #[test]
    fn the_stop_message_says_the_margin_and_the_best_folder() {
        let mut p = plugin(r#"{"metric": "validation.cgf1", "patience": 1, "min_rel_delta": 0.05}"#);
        let (_, why) = run(&mut p, "validation.cgf1", &[20.0, 20.5], 1).unwrap();
        assert!(
            why.contains("has not improved by more than min_rel_delta 0.05 × |best| = 1.000000"),
            "{why}"
        );
        assert!(why.contains("the run's best/ folder (chosen by evaluation.metric)"), "{why}");
        assert!(!why.contains("OUTPUT"), "{why}");
        let mut p = plugin(r#"{"patience": 1, "min_delta": 0.5, "min_rel_delta": 0.1}"#);
        let (_, why) = run(&mut p, "validation.loss", &[2.0, 1.9], 1).unwrap();
        assert!(why.contains("max(min_delta 0.5, min_rel_delta 0.1 × |best|) = 0.500000"), "{why}");
        let mut p = plugin(r#"{"patience": 1}"#);
        let (_, why) = run(&mut p, "validation.loss", &[2.0, 2.1], 1).unwrap();
        assert!(why.contains("has not improved for 1 evaluations"), "{why}");
    }

    /// A watched metric that never comes (`val_loss` where the host sends `validation.loss`) is
    /// warned about once validations have run, naming what is there; not before, not twice,
    /// not when it is there.
    #[test]
    fn a_metric_that_never_comes_is_warned_about_once() {
        let mut p = plugin(r#"{"metric": "val_loss"}"#);
        assert_eq!(p.missing_metric_warning(&step(1, &[])), None, "no validation yet");
        let after = step(
            2,
            &[
                ("validation.step", 0.0),
                ("validation.loss", 1.0),
                ("plugin.x.y", 2.0),
                ("skipped_steps", 0.0),
            ],
        );
        let w = p.missing_metric_warning(&after).unwrap();
        assert!(
            w.contains("`val_loss`")
                && w.contains("validation gives: validation.loss (other values: skipped_steps);"),
            "{w}"
        );
        assert!(!w.contains("plugin.x.y"), "{w}");
        assert!(matches!(p.on_step(&after), Action::Continue));
        assert!(p.warned_missing);
        let q = plugin(r#"{"metric": "validation.map"}"#);
        let w = q.missing_metric_warning(&after).unwrap();
        assert!(w.contains("compute_metrics_during_training"), "{w}");
        let ok = plugin("{}");
        assert_eq!(ok.missing_metric_warning(&after), None);
        let mut fresh = plugin("{}");
        assert!(matches!(fresh.on_step(&after), Action::Continue));
        assert!(!fresh.warned_missing);
    }

    #[test]
    fn config_errors_name_the_key() {
        let err =
            |json: &str| EarlyStopping::init(&Config::from_json(json).unwrap(), &run_info()).err().unwrap();
        assert!(err(r#"{"patiense": 2}"#).contains("patiense"));
        assert!(err(r#"{"patience": 0}"#).contains("patience"));
        assert!(err(r#"{"smoothing": 1.0}"#).contains("smoothing"));
        assert!(err(r#"{"min_delta": -1}"#).contains("min_delta"));
        assert!(err(r#"{"mode": "lowest"}"#).contains("lowest"));
        assert!(err(r#"{"metric": " "}"#).contains("metric"));
    }
}
