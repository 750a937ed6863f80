//! The per-step metrics log: one JSON object per line (JSONL). `lorahost train` writes it and
//! `lorahost plugin replay` reads it; `docs/metrics-schema.md` documents every field.
//!
//! A line is one of:
//! - a **step record**: an object with a `step` field (see [`StepRecord`]);
//! - a **run header**: `{"run": {...}}` with the fields of the contract's `run-info`
//!   (see [`RunHeader`]), written once at the start of a run;
//! - anything else with an `event` field (plugin events, evaluations): ignored by readers
//!   that do not know it.
//!
//! Non-finite numbers are written as `null` (JSON has no NaN) and read back as NaN.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One optimizer step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Total weighted loss of the step (`null` when non-finite).
    #[serde(deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub loss: f64,
    /// Learning rate the step was taken with.
    #[serde(deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub grad_norm: f64,
    /// Global gradient L2 norm after clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm_clipped: Option<f64>,
    /// Micro-batches (forward/backward passes) in the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_steps: Option<u32>,
    /// Epoch (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    /// Total optimizer steps planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Warmup length in optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Unweighted per-term losses, e.g. `{"loss_mask": 0.12, "loss_dice": 0.4}` (`null` when
    /// non-finite).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable_map")]
    pub losses: BTreeMap<String, f64>,
    /// Weights applied to the terms in `losses`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable_map")]
    pub loss_weights: BTreeMap<String, f64>,
    /// Samples in the step (all micro-batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Annotated objects in the step's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_count: Option<u32>,
    /// Wall time of the step in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_time_ms: Option<f64>,
    /// Peak memory during the step, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Peak heap bytes held during the step (the `lorahost` binary's counting allocator; the
    /// tensors, without allocator slack), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heap_peak_bytes: Option<u64>,
    /// Per-group gradient statistics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grad_groups: Vec<GradGroupRecord>,
    /// What the trainer did after the plugins answered (`continue`, `skip`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Why the step was not a plain `continue` (the plugin's reason, or the trainer's for a
    /// non-finite step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The plugin whose answer is `action` (absent when the trainer decided itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Any other fields (numbers become the hook's `extra` values).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Gradient statistics of one parameter group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradGroupRecord {
    /// Group name (e.g. `vision`, `detr_decoder`).
    pub name: String,
    /// L2 norm (`null` when non-finite).
    #[serde(deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub l2_norm: f64,
    /// Largest |g| (`null` when non-finite).
    #[serde(default, deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub max_abs: f64,
    /// NaN/inf entries.
    #[serde(default)]
    pub nonfinite: u64,
    /// Entries.
    #[serde(default)]
    pub numel: u64,
}

/// The run header line: `{"run": {...}}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunHeader {
    /// Total optimizer steps.
    pub total_steps: u64,
    /// Warmup in optimizer steps.
    pub warmup_steps: u64,
    /// Gradient accumulation.
    pub accumulation: u32,
    /// Samples per micro-batch.
    pub batch_size: u32,
    /// Samples per optimizer step.
    pub effective_batch_size: u32,
    /// Peak LR.
    pub base_lr: f64,
    /// Scheduler name.
    pub scheduler: String,
    /// Training samples.
    pub dataset_size: u32,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Seed.
    pub seed: u64,
}

fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn nullable_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// A parsed metrics log.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The run header, when the log has one.
    pub run: Option<RunHeader>,
    /// Step records in file order.
    pub steps: Vec<StepRecord>,
}

/// Why a metrics log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// I/O.
    #[error("cannot read metrics log {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// A bad line.
    #[error("{path}:{line}: {reason}\n  fix: each line must be a JSON object with at least `step`, `loss`, `lr` and `grad_norm` (see docs/metrics-schema.md)")]
    Line {
        /// File.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No step record at all.
    #[error("{0}: no step records found (expected JSON lines with a `step` field, or a Hugging Face trainer_state.json whose log_history has `loss` entries)")]
    Empty(PathBuf),
}

impl Trace {
    /// Read a JSONL metrics log.
    pub fn read(path: &Path) -> Result<Trace, TraceError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| TraceError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parse JSONL text (`origin` names it in errors). A Hugging Face Trainer
    /// `trainer_state.json` (one JSON object with `log_history`) is read too, see
    /// [`Trace::from_hf_trainer_state`].
    pub fn parse(text: &str, origin: &Path) -> Result<Trace, TraceError> {
        if text.trim_start().starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
                if v.get("log_history").is_some_and(|h| h.is_array()) {
                    return Self::from_hf_trainer_state(&v, origin);
                }
            }
        }
        let mut trace = Trace::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| TraceError::Line { path: origin.into(), line: i + 1, reason };
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
            let obj = value.as_object().ok_or_else(|| err("not a JSON object".into()))?;
            if let Some(run) = obj.get("run") {
                trace.run = Some(
                    serde_json::from_value(run.clone()).map_err(|e| err(format!("bad run header: {e}")))?,
                );
            } else if obj.contains_key("event") {
                // Events (validation, plugin reloads, ...) carry a `step` too; not step records.
                continue;
            } else if obj.contains_key("step") {
                let rec: StepRecord = serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
                // A step at or before the last one: a run resumed from a checkpoint appended to
                // the same file; its records replace the ones it ran again.
                if trace.steps.last().is_some_and(|l| rec.step <= l.step) {
                    let dropped = trace.steps.iter().filter(|s| s.step >= rec.step).count();
                    tracing::warn!(
                        "{} line {}: step {} again after step {} (a resumed run): its records replace the {dropped} earlier ones from step {} on",
                        origin.display(),
                        i + 1,
                        rec.step,
                        trace.steps.last().map_or(0, |l| l.step),
                        rec.step
                    );
                    trace.steps.retain(|s| s.step < rec.step);
                }
                trace.steps.push(rec);
            } else {
                return Err(err("no `step` field".into()));
            }
        }
        if trace.steps.is_empty() {
            return Err(TraceError::Empty(origin.into()));
        }
        Ok(trace)
    }
}

impl Trace {
    /// A Hugging Face Trainer `trainer_state.json`: each `log_history` entry with `loss` becomes a
    /// step record (`step`, `loss`, `learning_rate`, `grad_norm`, `epoch`; the Trainer logs every
    /// `logging_steps`, so steps may be sparse), and each `eval_loss` entry is handed to the
    /// following steps as `validation.step` / `validation.loss` extra values, as lorahost's own
    /// trainer does (so `early_stopping` replays). `max_steps` and `logging_steps` fill the run
    /// header; the base LR is the largest LR logged.
    pub fn from_hf_trainer_state(v: &serde_json::Value, origin: &Path) -> Result<Trace, TraceError> {
        let num = |e: &serde_json::Value, k: &str| e.get(k).and_then(serde_json::Value::as_f64);
        let mut trace = Trace::default();
        let mut validation: Option<(f64, f64)> = None;
        for (i, e) in v["log_history"].as_array().into_iter().flatten().enumerate() {
            let Some(step) = e.get("step").and_then(serde_json::Value::as_u64) else { continue };
            if let Some(l) = num(e, "eval_loss") {
                validation = Some((step as f64, l));
            }
            let Some(loss) = num(e, "loss") else { continue };
            let lr = num(e, "learning_rate").unwrap_or(f64::NAN);
            let mut rec = StepRecord::new(step, loss, lr, num(e, "grad_norm").unwrap_or(f64::NAN));
            rec.epoch = num(e, "epoch").map(|x| x.floor() as u32);
            if let Some((at, l)) = validation {
                rec.extra.insert("validation.step".into(), serde_json::json!(at));
                rec.extra.insert("validation.loss".into(), serde_json::json!(l));
            }
            if trace.steps.last().is_some_and(|p| p.step >= step) {
                return Err(TraceError::Line {
                    path: origin.into(),
                    line: i + 1,
                    reason: format!("log_history[{i}]: step {step} does not increase"),
                });
            }
            trace.steps.push(rec);
        }
        if trace.steps.is_empty() {
            return Err(TraceError::Empty(origin.into()));
        }
        let base_lr = trace.steps.iter().map(|s| s.lr).filter(|l| l.is_finite()).fold(0.0, f64::max);
        trace.run = Some(RunHeader {
            total_steps: v.get("max_steps").and_then(serde_json::Value::as_u64).unwrap_or(0),
            base_lr,
            accumulation: 1,
            batch_size: v.get("train_batch_size").and_then(serde_json::Value::as_u64).unwrap_or(0) as u32,
            ..Default::default()
        });
        Ok(trace)
    }
}

impl StepRecord {
    /// A record with only the four required fields.
    pub fn new(step: u64, loss: f64, lr: f64, grad_norm: f64) -> Self {
        StepRecord {
            step,
            loss,
            lr,
            grad_norm,
            grad_norm_clipped: None,
            micro_steps: None,
            epoch: None,
            total_steps: None,
            warmup_steps: None,
            losses: BTreeMap::new(),
            loss_weights: BTreeMap::new(),
            batch_size: None,
            object_count: None,
            step_time_ms: None,
            memory_bytes: None,
            heap_peak_bytes: None,
            grad_groups: Vec::new(),
            action: None,
            reason: None,
            decided_by: None,
            extra: BTreeMap::new(),
        }
    }

    /// One JSONL line (no newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_trainer_state_reads_as_a_trace() {
        // The shape transformers' Trainer writes (logging_steps 10, an eval at step 20).
        let text = r#"{"best_metric": null, "epoch": 0.6, "global_step": 30, "max_steps": 50,
            "logging_steps": 10, "train_batch_size": 8, "log_history": [
            {"epoch": 0.2, "grad_norm": 3.5, "learning_rate": 4e-05, "loss": 1.25, "step": 10},
            {"epoch": 0.4, "grad_norm": 2.5, "learning_rate": 5e-05, "loss": 0.75, "step": 20},
            {"epoch": 0.4, "eval_loss": 0.9, "eval_runtime": 1.0, "step": 20},
            {"epoch": 1.2, "learning_rate": 3e-05, "loss": 0.5, "step": 30}]}"#;
        let t = Trace::parse(text, Path::new("trainer_state.json")).unwrap();
        let steps: Vec<(u64, f64, f64)> = t.steps.iter().map(|s| (s.step, s.loss, s.lr)).collect();
        assert_eq!(steps, vec![(10, 1.25, 4e-5), (20, 0.75, 5e-5), (30, 0.5, 3e-5)]);
        assert_eq!(t.steps[0].grad_norm, 3.5);
        assert!(t.steps[2].grad_norm.is_nan(), "older Trainers log no grad_norm");
        assert_eq!(t.steps[2].epoch, Some(1));
        // The evaluation at step 20 reaches the steps after it.
        assert!(!t.steps[1].extra.contains_key("validation.loss"));
        assert_eq!(t.steps[2].extra["validation.loss"].as_f64(), Some(0.9));
        assert_eq!(t.steps[2].extra["validation.step"].as_f64(), Some(20.0));
        let run = t.run.unwrap();
        assert_eq!((run.total_steps, run.base_lr, run.batch_size), (50, 5e-5, 8));
        // A state without loss entries is named.
        let e = Trace::parse(r#"{"log_history": [{"eval_loss": 1.0, "step": 5}]}"#, Path::new("s.json"))
            .unwrap_err();
        assert!(e.to_string().contains("trainer_state.json"), "{e}");
    }

    #[test]
    fn parses_minimal_and_rich_lines() {
        let text = r#"{"run": {"total_steps": 10, "warmup_steps": 2, "base_lr": 0.001}}
{"step": 1, "loss": 2.5, "lr": 0.0005, "grad_norm": 3.0}
{"event": "plugin_reloaded", "plugin": "x"}
{"step": 2, "loss": null, "lr": 0.001, "grad_norm": 1.5, "losses": {"loss_mask": 0.2}, "custom": 7}
"#;
        let t = Trace::parse(text, Path::new("t.jsonl")).unwrap();
        assert_eq!(t.run.as_ref().unwrap().total_steps, 10);
        assert_eq!(t.steps.len(), 2);
        assert!(t.steps[1].loss.is_nan());
        assert_eq!(t.steps[1].losses["loss_mask"], 0.2);
        assert_eq!(t.steps[1].extra["custom"], serde_json::json!(7));
    }

    /// A resumed run appends steps it ran again: the later records replace the earlier ones.
    #[test]
    fn a_resumed_run_replaces_the_steps_it_ran_again() {
        let line = |step: u64, loss: f64| {
            format!("{{\"step\": {step}, \"loss\": {loss}, \"lr\": 0.1, \"grad_norm\": 1.0}}\n")
        };
        let text: String =
            [line(1, 5.0), line(2, 4.0), line(3, 3.0), line(2, 4.5), line(3, 3.5), line(4, 2.5)].concat();
        let t = Trace::parse(&text, Path::new("m.jsonl")).unwrap();
        let got: Vec<(u64, f64)> = t.steps.iter().map(|s| (s.step, s.loss)).collect();
        assert_eq!(got, [(1, 5.0), (2, 4.5), (3, 3.5), (4, 2.5)]);
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let text =
            "{\"step\": 1, \"loss\": 1.0, \"lr\": 0.1, \"grad_norm\": 1.0}\n{\"step\": 2, \"lr\": 0.1}\n";
        let e = Trace::parse(text, Path::new("m.jsonl")).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:2"), "{e}");
        assert!(e.contains("loss"), "{e}");
    }

    #[test]
    fn a_non_finite_step_roundtrips() {
        let mut r = StepRecord::new(3, f64::INFINITY, 0.1, f64::NAN);
        r.losses.insert("loss_mask".into(), f64::NAN);
        r.grad_groups.push(GradGroupRecord {
            name: "g".into(),
            l2_norm: f64::NAN,
            max_abs: f64::INFINITY,
            nonfinite: 2,
            numel: 4,
        });
        let back = Trace::parse(&r.to_json_line(), Path::new("x")).unwrap();
        assert!(back.steps[0].losses["loss_mask"].is_nan() && back.steps[0].grad_groups[0].l2_norm.is_nan());
    }

    #[test]
    fn nan_roundtrips_as_null() {
        let r = StepRecord::new(3, f64::NAN, 0.1, 2.0);
        let line = r.to_json_line();
        assert!(line.contains("\"loss\":null"), "{line}");
        let back = Trace::parse(&line, Path::new("x")).unwrap();
        assert!(back.steps[0].loss.is_nan());
    }
}
