//! The run's TensorBoard log: the step records and validations of `metrics.jsonl` as
//! TensorBoard scalars in an event file of the logging folder (`tensorboard --logdir
//! OUTPUT_DIR` shows the run live; earlier runs set aside under `previous-runs/` show as runs of
//! their own). Tags follow the Hugging Face Trainer's where it has one:
//!
//! - `train/loss`, `train/learning_rate`, `train/grad_norm` (before clipping),
//!   `train/grad_norm_clipped`, `train/epoch` (0-based, as in `metrics.jsonl`), and each
//!   unweighted loss term as `train/<term>` (`train/loss_mask`, ...);
//! - `grad_norm/<component>`: the gradient norm of each component's adapters;
//! - `perf/step_time_ms`, `perf/memory_gib` (the run's peak: the device's on CUDA);
//! - `val/loss`, `val/<term>` (the auxiliary and one-to-many terms too), `val/map`, `val/ap50`, `val/ap75`, `val/cgf1`, `val/pmf1`,
//!   `val/il_mcc`, and the pixel metrics as `val/pixel_<name>` (step 0: before training);
//! - `plugin/<plugin>/<metric>`: the numbers plugins report;
//! - `val_images/<image id>_<prompt>` (Images tab): the first validation image/prompt pairs with
//!   objects, the ground truth (red) beside the detections scoring 0.5 or more, at every
//!   validation (step 0: the model before training).
//!
//! Writing is best effort: a failed write is one warning, and the run (and `metrics.jsonl`,
//! the record lorahost reads back) goes on.

use crate::metrics::StepRecord;
use crate::tfevents::EventWriter;
use std::path::Path;

/// An open event file, or nothing (turned off, or it could not be written).
pub(super) struct TensorBoardLog {
    writer: Option<EventWriter>,
}

impl TensorBoardLog {
    /// A new event file in `dir`; `resumed_after`: the step a resumed run continues after (its
    /// file drops the abandoned branch's later points in TensorBoard).
    pub(super) fn open(dir: &Path, enabled: bool, resumed_after: Option<u64>) -> Self {
        if !enabled {
            return TensorBoardLog { writer: None };
        }
        match EventWriter::create(dir, resumed_after.map(|s| s + 1)) {
            Ok(w) => {
                tracing::info!(
                    "TensorBoard log: {} (tensorboard --logdir {})",
                    w.path().display(),
                    dir.display()
                );
                TensorBoardLog { writer: Some(w) }
            }
            Err(e) => {
                tracing::warn!(
                    "cannot create a TensorBoard event file in {} ({e}): training goes on without it (metrics.jsonl has every step)",
                    dir.display()
                );
                TensorBoardLog { writer: None }
            }
        }
    }

    /// Run `f` on the open file; a failure is one warning and closes the log.
    fn with_writer(&mut self, f: impl FnOnce(&mut EventWriter) -> std::io::Result<()>) {
        let Some(w) = &mut self.writer else { return };
        if let Err(e) = f(w) {
            tracing::warn!(
                "cannot append to {} ({e}): the TensorBoard log stops here (metrics.jsonl has every step)",
                w.path().display()
            );
            self.writer = None;
        }
    }

    fn write(&mut self, step: u64, values: &[(String, f64)]) {
        self.with_writer(|w| w.scalars(step, values));
    }

    /// Log an optimizer step's record.
    pub(super) fn step(&mut self, rec: &StepRecord) {
        if self.writer.is_some() {
            self.write(rec.step, &step_scalars(rec));
        }
    }

    /// Log a validation's pictures as PNG images tagged `val_images/<image id>_<prompt>`.
    pub(super) fn images(&mut self, step: u64, panels: &[super::validate::Panel]) {
        if self.writer.is_none() || panels.is_empty() {
            return;
        }
        let mut encoded = Vec::new();
        for p in panels {
            let (name, img) = (p.name(), &p.picture);
            let mut png = Vec::new();
            if let Err(e) = img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png) {
                tracing::warn!("cannot encode the validation picture {name}: {e}");
                continue;
            }
            encoded.push((format!("val_images/{name}"), png, img.width(), img.height()));
        }
        self.with_writer(|w| w.images(step, &encoded));
    }

    /// Log a validation (the `metrics.jsonl` event object: `loss`, `losses`, `metrics`, `pixel`).
    pub(super) fn validation(&mut self, step: u64, event: &serde_json::Value) {
        if self.writer.is_some() {
            self.write(step, &validation_scalars(event));
        }
    }
}

/// A step record's scalars by tag.
pub(super) fn step_scalars(rec: &StepRecord) -> Vec<(String, f64)> {
    let mut out = vec![
        ("train/loss".to_string(), rec.loss),
        ("train/learning_rate".to_string(), rec.lr),
        ("train/grad_norm".to_string(), rec.grad_norm),
    ];
    if let Some(c) = rec.grad_norm_clipped {
        out.push(("train/grad_norm_clipped".into(), c));
    }
    if let Some(e) = rec.epoch {
        out.push(("train/epoch".into(), f64::from(e)));
    }
    out.extend(rec.losses.iter().map(|(k, v)| (format!("train/{k}"), *v)));
    out.extend(rec.grad_groups.iter().map(|g| (format!("grad_norm/{}", g.name), g.l2_norm)));
    if let Some(ms) = rec.step_time_ms {
        out.push(("perf/step_time_ms".into(), ms));
    }
    if let Some(b) = rec.memory_bytes {
        out.push(("perf/memory_gib".into(), b as f64 / (1u64 << 30) as f64));
    }
    for (k, v) in &rec.extra {
        if let (Some(rest), Some(v)) = (k.strip_prefix("plugin."), v.as_f64()) {
            out.push((format!("plugin/{}", rest.replacen('.', "/", 1)), v));
        }
    }
    out
}

/// A validation event's scalars by tag (numbers only; the pixel metrics' settings and counts
/// are left out).
pub(super) fn validation_scalars(event: &serde_json::Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    if let Some(l) = event["loss"].as_f64() {
        out.push(("val/loss".to_string(), l));
    }
    let numbers = |v: &serde_json::Value, prefix: &str, skip: &[&str], out: &mut Vec<(String, f64)>| {
        for (k, x) in v.as_object().into_iter().flatten() {
            if let (false, Some(x)) = (skip.contains(&k.as_str()), x.as_f64()) {
                out.push((format!("val/{prefix}{k}"), x));
            }
        }
    };
    // The terms (their weights, the box count and the total, which is `loss`, left out).
    let terms: serde_json::Map<String, serde_json::Value> = event["losses"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !k.contains('/') && *k != "num_boxes" && *k != "total")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    numbers(&serde_json::Value::Object(terms), "", &[], &mut out);
    numbers(&event["metrics"], "", &["queries", "positives"], &mut out);
    numbers(&event["pixel"], "pixel_", &["pairs", "threshold", "tolerance"], &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::GradGroupRecord;

    /// The tags a step and a validation become; a read back through lorahost's TensorBoard reader
    /// finds the loss, LR, gradient norm (the total, not a component's), terms and validation.
    #[test]
    fn records_become_tags_that_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TensorBoardLog::open(dir.path(), true, None);
        log.validation(
            0,
            &serde_json::json!({"event": "validation", "step": 0, "loss": 9.0, "losses": {"loss_mask": 4.0}}),
        );
        for step in 1..=4u64 {
            let mut rec = StepRecord::new(step, 10.0 - step as f64, 1e-4 * step as f64, 2.0 * step as f64);
            rec.grad_norm_clipped = Some(1.0);
            rec.epoch = Some(0);
            rec.losses.insert("loss_mask".into(), 0.5);
            rec.losses.insert("loss_dice".into(), 0.25);
            rec.grad_groups = ["text_encoder", "vision"]
                .iter()
                .map(|n| GradGroupRecord {
                    name: n.to_string(),
                    l2_norm: 0.1,
                    max_abs: 0.0,
                    nonfinite: 0,
                    numel: 1,
                })
                .collect();
            rec.extra.insert("plugin.spike_guard.z".into(), serde_json::json!(0.5));
            rec.extra.insert("validation.loss".into(), serde_json::json!(9.0));
            let tags: Vec<String> = step_scalars(&rec).into_iter().map(|t| t.0).collect();
            assert!(tags.contains(&"plugin/spike_guard/z".to_string()), "{tags:?}");
            assert!(!tags.iter().any(|t| t.contains("validation")), "{tags:?}");
            log.step(&rec);
        }
        log.validation(
            4,
            &serde_json::json!({"event": "validation", "step": 4, "loss": 5.0, "losses": {"loss_mask": 2.0},
                "metrics": {"map": 0.25, "queries": 3}, "pixel": {"f1": 0.5, "tolerance": 2}}),
        );
        let v = validation_scalars(
            &serde_json::json!({"loss": 5.0, "losses": {"weight/loss_mask": 5.0, "total": 5.0, "num_boxes": 2.0}, "metrics": {"map": 0.25, "queries": 3}, "pixel": {"f1": 0.5, "tolerance": 2}}),
        );
        assert_eq!(
            v,
            [("val/loss".to_string(), 5.0), ("val/map".into(), 0.25), ("val/pixel_f1".into(), 0.5)]
        );
        let t = crate::metrics::Trace::read(dir.path()).unwrap();
        let steps: Vec<(u64, f64, f64, f64)> =
            t.steps.iter().map(|s| (s.step, s.loss, s.lr, s.grad_norm)).collect();
        assert_eq!(
            steps,
            [(1, 9.0, 1e-4, 2.0), (2, 8.0, 2e-4, 4.0), (3, 7.0, 3e-4, 6.0), (4, 6.0, 4e-4, 8.0)]
                .map(|(s, l, lr, g): (u64, f64, f64, f64)| (s, l, f64::from(lr as f32), g))
        );
        assert_eq!(t.steps[0].losses.keys().collect::<Vec<_>>(), ["loss_dice", "loss_mask"]);
        assert_eq!(t.validation, [(0, 9.0), (4, 5.0)]);
        assert_eq!(t.steps[3].epoch, Some(0), "the 0-based epoch, as metrics.jsonl has it");
    }

    /// Validation pictures become image summaries whose PNG decodes to the picture, beside
    /// scalars that still read back.
    #[test]
    fn pictures_are_written_as_png_image_summaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TensorBoardLog::open(dir.path(), true, None);
        let picture = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        log.images(
            3,
            &[super::super::validate::Panel {
                image_id: 5,
                prompt: "crack".into(),
                iou: 0.0,
                picture: picture.clone(),
            }],
        );
        log.step(&StepRecord::new(3, 1.5, 1e-4, 1.0));
        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let bytes = std::fs::read(&file).unwrap();
        // The PNG inside the record decodes to the same pixels (found by its signature).
        let sig = b"\x89PNG\r\n\x1a\n";
        let at = bytes.windows(8).position(|w| w == sig).expect("a PNG in the file");
        let decoded = image::load_from_memory(&bytes[at..]).unwrap().to_rgb8();
        assert_eq!(decoded, picture);
        let tag = b"val_images/5_crack";
        assert!(bytes.windows(tag.len()).any(|w| w == tag));
        let t = crate::metrics::Trace::read(dir.path()).unwrap();
        assert_eq!(t.steps.iter().map(|s| (s.step, s.loss)).collect::<Vec<_>>(), [(3, 1.5)]);
    }

    /// A resumed run's file drops the abandoned branch in TensorBoard and in lorahost's reader:
    /// the steps after the resume point come from the new file, later abandoned steps are gone.
    #[test]
    fn a_resumed_run_replaces_the_abandoned_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = TensorBoardLog::open(dir.path(), true, None);
        for step in 1..=6u64 {
            first.step(&StepRecord::new(step, 1.0, 1e-4, 1.0));
        }
        drop(first);
        let mut resumed = TensorBoardLog::open(dir.path(), true, Some(3));
        for step in 4..=5u64 {
            resumed.step(&StepRecord::new(step, 2.0, 1e-4, 1.0));
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let t = crate::metrics::Trace::read(dir.path()).unwrap();
        let steps: Vec<(u64, f64)> = t.steps.iter().map(|s| (s.step, s.loss)).collect();
        assert_eq!(steps, [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0)]);
        assert!(
            t.warnings.iter().any(|w| w.contains("after the step a later file restarts at")),
            "{:?}",
            t.warnings
        );
        // Turned off: no file.
        let off = tempfile::tempdir().unwrap();
        TensorBoardLog::open(off.path(), false, None).step(&StepRecord::new(1, 1.0, 1e-4, 1.0));
        assert_eq!(std::fs::read_dir(off.path()).unwrap().count(), 0);
    }
}
