//! TensorBoard event files as training logs, against event files written by the real writers
//! (`tools/gen_tfevents_fixtures.py`: transformers' TensorBoardCallback and
//! `torch.utils.tensorboard.SummaryWriter`) and the same runs in formats lorahost already reads
//! (the Hugging Face run's `trainer_state.json`; the SummaryWriter run's values as a metrics
//! log written by the generator).

use lorahost::doctor::{Report, Severity};
use lorahost::metrics::{Trace, TraceFormat};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tfevents")
}

/// |a − b| within float32 rounding of b (the event files hold 32-bit floats).
fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs().max(1e-30)
}

fn extra(s: &lorahost::metrics::StepRecord, k: &str) -> Option<f64> {
    s.extra.get(k).and_then(|v| lorahost::metrics::number(v).ok().flatten())
}

/// The Hugging Face Trainer's TensorBoard log (the run's folder, and its events file alone)
/// reads as the same steps as its trainer_state.json: loss, LR, gradient norm, epoch and the
/// evaluations reaching the steps after them.
#[test]
fn a_hugging_face_run_reads_as_its_trainer_state() {
    let dir = fixtures().join("hf");
    let want = Trace::read(&dir.join("trainer_state.json")).unwrap();
    let run = dir.join("runs/Nov29_12-00-00_fixture");
    let file = std::fs::read_dir(&run).unwrap().flatten().map(|e| e.path()).next().unwrap();
    // The output folder holding runs/<run>/ (one run) beside trainer_state.json, runs/, the
    // run's folder, the file.
    for path in [dir.clone(), dir.join("runs"), run.clone(), file] {
        let got = Trace::read(&path).unwrap();
        assert_eq!(got.format, TraceFormat::TensorBoard);
        assert_eq!(got.steps.len(), want.steps.len(), "{}", path.display());
        assert_eq!(want.steps.len(), 40);
        for (g, w) in got.steps.iter().zip(&want.steps) {
            assert_eq!(g.step, w.step);
            assert!(close(g.loss, w.loss), "step {}: loss {} vs {}", g.step, g.loss, w.loss);
            assert!(close(g.lr, w.lr), "step {}: lr {} vs {}", g.step, g.lr, w.lr);
            assert!(close(g.grad_norm, w.grad_norm), "step {}: grad norm", g.step);
            assert_eq!(g.epoch, w.epoch, "step {}", g.step);
            for k in ["validation.step", "validation.loss"] {
                match (extra(g, k), extra(w, k)) {
                    (Some(a), Some(b)) => assert!(close(a, b), "step {}: {k} {a} vs {b}", g.step),
                    (a, b) => assert_eq!(a, b, "step {}: {k}", g.step),
                }
            }
            assert!(g.step_time_ms.is_some() || g.step == 1);
        }
        // Evaluations after steps 10, 20, 30 and 40 (the last step), as in trainer_state.json.
        let vals = lorahost::run_diagnosis::validations(&path, &got);
        let hf = lorahost::run_diagnosis::validations(&dir.join("trainer_state.json"), &want);
        assert_eq!(vals.iter().map(|v| v.0).collect::<Vec<_>>(), [10, 20, 30, 40]);
        assert!(vals.iter().zip(&hf).all(|(a, b)| a.0 == b.0 && close(a.1, b.1)), "{vals:?} vs {hf:?}");
        let read = got.warnings.iter().find(|w| w.contains("tags read")).unwrap();
        assert!(read.contains("loss `train/loss`") && read.contains("LR `train/learning_rate`"), "{read}");
        assert!(read.contains("validation loss `eval/loss`"), "{read}");
        // The Trainer's arguments (the generator's TrainingArguments, written by its
        // TensorBoardCallback as the `args` text): the run's settings and its clipping.
        assert!(got.hf_trainer && got.loss_is_interval_mean);
        assert_eq!(got.max_grad_norm, Some(1.0));
        let h = got.run.as_ref().expect("a header from the Trainer's arguments");
        assert_eq!(
            (h.batch_size, h.accumulation, h.effective_batch_size, h.warmup_steps, h.total_steps),
            (4, 1, 4, 5, 40)
        );
        assert_eq!((h.base_lr, h.scheduler.as_str()), (0.05, "linear"));
    }
}

/// A SummaryWriter run logged like SAM2/SAM3's official trainer (0-based steps, loss terms,
/// old- and new-style scalars, histograms and text beside them) and resumed once into a
/// second event file: the same records as the generator's metrics log, the resumed values
/// replacing the first file's, step times from each file's own clock.
#[test]
fn a_resumed_summary_writer_run_reads_as_its_metrics_log() {
    let dir = fixtures().join("writer");
    let got = same_as_expected(&dir.join("run"), &dir.join("expected.jsonl"));
    assert_eq!(got.steps.len(), 100);
    assert!(got.warnings.iter().any(|w| w.contains("resumed run")), "{:?}", got.warnings);
}

/// SAM3's official trainer's logging (per-step tags at the 0-based step counter every
/// `log_scalar_frequency` steps, each epoch's summary at the epoch number with
/// `Trainer/steps_train`): the loss and its terms, the LR, the epoch of each step, and each
/// epoch's validation loss reaching the steps after that epoch, not the validation meters
/// logged at the validation step counter.
#[test]
fn sam3_official_trainer_logs_read_as_their_metrics_log() {
    let dir = fixtures().join("sam3_trainer");
    let got = same_as_expected(&dir.join("tensorboard"), &dir.join("expected.jsonl"));
    assert_eq!(got.steps.len(), 18);
    assert_eq!(
        got.steps.iter().map(|s| s.epoch.unwrap()).collect::<Vec<_>>(),
        [0; 6].iter().chain(&[1; 6]).chain(&[2; 6]).copied().collect::<Vec<u32>>()
    );
    // The third epoch's validation comes after the last step: no step carries it, the trace does.
    let vals = lorahost::run_diagnosis::validations(&dir.join("tensorboard"), &got);
    assert_eq!(vals.iter().map(|v| v.0).collect::<Vec<_>>(), [60, 120, 180]);
    let read = got.warnings.iter().find(|w| w.contains("tags read")).unwrap();
    assert!(
        read.contains("loss `Step_Losses/Losses/train_all_loss`")
            && read.contains("validation loss `Losses/val_all_loss`"),
        "{read}"
    );
}

/// The trace read from `events` against the metrics log `expected`, field by field (within
/// float32 rounding); returns the former.
fn same_as_expected(events: &Path, expected: &Path) -> Trace {
    let want = Trace::read(expected).unwrap();
    let got = Trace::read(events).unwrap();
    assert_eq!(got.steps.len(), want.steps.len());
    for (g, w) in got.steps.iter().zip(&want.steps) {
        assert_eq!(g.step, w.step);
        for (a, b, what) in
            [(g.loss, w.loss, "loss"), (g.lr, w.lr, "lr"), (g.grad_norm, w.grad_norm, "grad norm")]
        {
            assert!(close(a, b), "step {}: {what} {a} vs {b}", g.step);
        }
        assert_eq!(
            g.losses.keys().collect::<Vec<_>>(),
            w.losses.keys().collect::<Vec<_>>(),
            "step {}",
            g.step
        );
        for (k, v) in &w.losses {
            assert!(close(g.losses[k], *v), "step {}: {k}", g.step);
        }
        match (g.step_time_ms, w.step_time_ms) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-3, "step {}: step time {a} vs {b}", g.step),
            (a, b) => assert_eq!(a, b, "step {}: step time", g.step),
        }
        for k in ["validation.step", "validation.loss"] {
            match (extra(g, k), extra(w, k)) {
                (Some(a), Some(b)) => assert!(close(a, b), "step {}: {k} {a} vs {b}", g.step),
                (a, b) => assert_eq!(a, b, "step {}: {k}", g.step),
            }
        }
        if w.epoch.is_some() {
            assert_eq!(g.epoch, w.epoch, "step {}", g.step);
        }
    }
    got
}

/// `doctor --trace` on the resumed run: the slowdown from step 81 on (F14) is found from the
/// event files' wall clock, as from the metrics log.
#[test]
fn doctor_finds_the_slowdown_in_event_files() {
    let dir = fixtures().join("writer");
    for path in [dir.join("run"), dir.join("expected.jsonl")] {
        let trace = Trace::read(&path).unwrap();
        let validation = lorahost::run_diagnosis::validations(&path, &trace);
        let mut r = Report::default();
        lorahost::run_diagnosis::analyse_run(&trace, &validation, None, &mut r);
        let f14 = r.findings.iter().find(|f| f.code == "F14");
        assert!(
            f14.is_some_and(|f| f.severity >= Severity::Warning),
            "{}: {:?}",
            path.display(),
            r.findings.iter().map(|f| &f.code).collect::<Vec<_>>()
        );
    }
}

/// Bad input: a folder of several runs names them; a folder with event files but no loss
/// names the tags it has; a binary file that is no event file says so.
#[test]
fn several_runs_no_loss_and_foreign_binaries_are_clear_errors() {
    let tmp = std::env::temp_dir().join(format!("lorahost-tfevents-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let src = fixtures().join("hf/runs/Nov29_12-00-00_fixture");
    let file = std::fs::read_dir(&src).unwrap().flatten().map(|e| e.path()).next().unwrap();
    for run in ["version_0", "version_1"] {
        std::fs::create_dir_all(tmp.join("lightning_logs").join(run)).unwrap();
        std::fs::copy(&file, tmp.join("lightning_logs").join(run).join(file.file_name().unwrap())).unwrap();
    }
    let e = Trace::read(&tmp.join("lightning_logs")).unwrap_err().to_string();
    assert!(
        e.contains("2 runs") && e.contains("version_0") && e.contains("version_1") && e.contains("fix"),
        "{e}"
    );
    let ok = Trace::read(&tmp.join("lightning_logs/version_1")).unwrap();
    assert_eq!(ok.steps.len(), 40);
    let foreign = tmp.join("weights.bin");
    std::fs::write(
        &foreign,
        [0xffu8, 0xfe, 0x00, 0x81, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a],
    )
    .unwrap();
    let e = Trace::read(&foreign).unwrap_err().to_string();
    assert!(e.contains("weights.bin") && e.contains("nor a TensorBoard event file"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}
