//! Replay against traces: hook order, run headers per segment, the LR scale, failure counts.
mod common;

use common::{load, plugin, repo};
use lorahost::metrics::Trace;
use lorahost::replay;
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn trace(text: &str) -> Trace {
    Trace::parse(text, Path::new("t.jsonl")).unwrap()
}

/// Training calls loss-weights once per micro-batch, then on-grads, lr-for-step, on-step.
#[test]
fn loss_weights_run_once_per_micro_batch_before_the_step() {
    let t = trace(
        r#"{"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "micro_steps": 3, "losses": {"loss_mask": 0.5}}
{"step": 2, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "losses": {"loss_mask": 0.5}}
"#,
    );
    let run = replay::run_info_for(&t);
    let mut set = load(&[("steer", json!({"mask_factor": 0.5}))]);
    let steps = replay::replay(&mut set, &t, &run, true);
    // steer counts its calls and emits the counts from on-step.
    assert_eq!(steps[0].metrics["plugin.steer.loss_weights"], 3.0, "{:?}", steps[0].metrics);
    assert_eq!(steps[0].metrics["plugin.steer.on_grads"], 1.0);
    assert_eq!(steps[0].metrics["plugin.steer.lr"], 1.0);
    // Without micro_steps: the run's accumulation (inferred from the records: 3).
    assert_eq!(run.accumulation, 3);
    assert_eq!(steps[1].metrics["plugin.steer.loss_weights"], 6.0);
    assert_eq!(steps[1].loss_factors["loss_mask"], 0.5);
}

/// A resumed run whose settings changed: each header governs its own steps; init gets the first.
#[test]
fn each_run_header_governs_its_own_steps() {
    let mut text = String::from(
        r#"{"run": {"total_steps": 10, "warmup_steps": 2, "base_lr": 0.003, "scheduler": "cosine"}}"#,
    );
    text.push('\n');
    for s in 1..=5 {
        text.push_str(&format!("{{\"step\": {s}, \"loss\": 1.0, \"lr\": 0.001, \"grad_norm\": 1.0}}\n"));
    }
    text.push_str(
        r#"{"run": {"total_steps": 10, "warmup_steps": 2, "base_lr": 0.001, "scheduler": "cosine"}}"#,
    );
    text.push('\n');
    for s in 4..=10 {
        text.push_str(&format!("{{\"step\": {s}, \"loss\": 1.0, \"lr\": 0.001, \"grad_norm\": 1.0}}\n"));
    }
    let t = trace(&text);
    assert_eq!(t.segments.len(), 2);
    assert_eq!(t.segments[1].from_step, 4);
    let run = replay::run_info_for(&t);
    assert_eq!((run.base_lr, run.start_step), (0.003, 1));
    let mut set = load(&[("cosine_schedule", json!({}))]);
    let steps = replay::replay(&mut set, &t, &run, true);
    let lr = |s: u64| steps.iter().find(|r| r.step == s).unwrap().lr.unwrap();
    assert!((lr(2) - 0.003).abs() < 1e-12, "the first header's peak at the end of warmup: {}", lr(2));
    assert!(lr(3) > 0.0025, "{}", lr(3));
    assert!(lr(4) <= 0.001 + 1e-12, "the second header's base_lr from step 4 on: {}", lr(4));
    assert!(steps.iter().find(|r| r.step == 4).unwrap().notes[0].contains("new run header"));
    // As a resumed training: the plugins are initialised again with the second header and get
    // their state back (steer's call counts go on; its init saw the new base_lr).
    let specs = [lorahost::plugin::PluginSpec::new(plugin("steer"))];
    let mut set = lorahost::plugin::PluginSet::load(common::runtime(), &specs, &run).unwrap();
    let steps = replay::replay(&mut set, &t, &run, true);
    let m = |s: u64, k: &str| steps.iter().find(|r| r.step == s).unwrap().metrics[k];
    assert_eq!(m(3, "plugin.steer.init_base_lr"), 0.003);
    assert_eq!(m(4, "plugin.steer.init_base_lr"), 0.001);
    assert_eq!(m(4, "plugin.steer.on_step"), m(3, "plugin.steer.on_step") + 1.0);
    let note = &steps.iter().find(|r| r.step == 4).unwrap().notes[0];
    assert!(note.contains("initialised again") && note.contains("steer"), "{note}");
}

/// A Hugging Face log whose first logged step is 10 is not a resume.
#[test]
fn a_log_that_starts_late_is_not_a_resume() {
    let t = Trace::parse(
        r#"{"max_steps": 30, "log_history": [{"step": 10, "loss": 1.0, "learning_rate": 1e-4, "epoch": 0.5}]}"#,
        Path::new("trainer_state.json"),
    )
    .unwrap();
    assert_eq!(replay::run_info_for(&t).start_step, 1);
}

/// scale-lr answers compound, as training's persistent LR scale does.
#[test]
fn replay_shows_the_lr_training_would_use_after_scale_lr() {
    let t = Trace::read(&repo().join("examples/traces/diagnosis.jsonl")).unwrap();
    let run = replay::run_info_for(&t);
    let mut set = load(&[("spike_guard", json!({"action": "scale_lr", "lr_factor": 0.5}))]);
    let steps = replay::replay(&mut set, &t, &run, true);
    let spike = steps.iter().position(|s| s.action == "scale_lr").expect("the diagnosis spike");
    assert_eq!(steps[spike].lr_scale_total, Some(0.5));
    assert_eq!(steps[spike].lr, None, "the spike step itself still runs at the recorded LR");
    let next = &steps[spike + 1];
    assert_eq!(next.lr, Some(t.steps[spike + 1].lr * 0.5), "{next:?}");
    assert_eq!(next.lr_scale_total, Some(0.5));
}

/// A plugin that keeps failing: its failures count, its switch-off does not add one.
#[test]
fn the_summary_counts_failures_not_the_switch_off() {
    let out = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["plugin", "replay"])
        .arg(plugin("hostile"))
        .arg("--trace")
        .arg(repo().join("examples/traces/diagnosis.jsonl"))
        .args(["--set", "hostile.mode=trap"])
        .env("LORAHOST_CACHE_DIR", std::env::temp_dir().join("lorahost-replay-traces-cache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let events: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with('!')).collect();
    let failed = events.iter().filter(|e| e.contains(" failed: ")).count();
    assert!(events.iter().any(|e| e.contains("disabled")), "{stdout}");
    assert!(stdout.contains(&format!("; {failed} plugin failure(s)")), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("{failed} plugin failure(s) during the replay")), "{stderr}");
}

/// A trace without LRs: a failing LR plugin's failure names the missing LR.
#[test]
fn an_lr_failure_on_a_step_without_a_recorded_lr_says_so() {
    let t = trace("{\"step\": 1, \"loss\": 1.0}\n{\"step\": 2, \"loss\": 1.0}\n");
    assert!(t.steps[0].lr.is_nan() && t.steps[0].grad_norm.is_nan());
    let run = replay::run_info_for(&t);
    let mut set = load(&[("hostile", json!({"mode": "nan_lr", "hook": "lr_for_step"}))]);
    let steps = replay::replay(&mut set, &t, &run, true);
    assert!(steps[0].events[0].contains("the trace has no LR for this step"), "{:?}", steps[0].events);
    assert_eq!(replay::failure_count(&steps), 2);
    // A scheduler that answers for the unknown LR: the LR stays unknown (it used to show as
    // the cap, 10).
    let mut set = load(&[("cosine_schedule", json!({}))]);
    let steps = replay::replay(&mut set, &t, &run, true);
    assert!(steps.iter().all(|s| s.lr.is_none()), "{:?}", steps.iter().map(|s| s.lr).collect::<Vec<_>>());
}

/// A trace that records no gradient norm (HF Trainer before 4.38, a hand-written loss log):
/// spike_guard judges the loss alone, as with the norms recorded, instead of reading the
/// missing norm as a non-finite gradient and stopping the run.
#[test]
fn a_trace_without_grad_norms_is_judged_by_its_loss() {
    let text = std::fs::read_to_string(repo().join("examples/traces/diagnosis.jsonl")).unwrap();
    let without: String = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(m) = v.as_object_mut() {
                m.remove("grad_norm");
            }
            format!("{v}\n")
        })
        .collect();
    let actions = |t: &str| -> Vec<(u64, &'static str)> {
        let t = trace(t);
        let run = replay::run_info_for(&t);
        let mut set = load(&[("spike_guard", json!({}))]);
        replay::replay(&mut set, &t, &run, true).iter().map(|s| (s.step, s.action)).collect()
    };
    let (with, without) = (actions(&text), actions(&without));
    assert_eq!(with.len(), 16);
    assert_eq!(with, without);
    assert_eq!(without.iter().filter(|(_, a)| *a != "continue").count(), 1, "{without:?}");
}

fn console_fixture(name: &str) -> std::path::PathBuf {
    repo().join("host/tests/fixtures/console_logs").join(name)
}

/// SAM3_LoRA's console output (tqdm through `tools/gen_console_log_fixtures.py`): every batch's
/// loss at its step, to tqdm's three digits, the epoch summaries' validation losses at the end of
/// each epoch, and the batch size from the sample count.
#[test]
fn sam3_lora_console_output_is_read_step_by_step() {
    let t = Trace::read(&console_fixture("sam3_lora_stdout.log")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(console_fixture("sam3_lora_losses.json")).unwrap())
            .unwrap();
    let losses: Vec<f64> =
        expected["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(t.steps.len(), losses.len());
    let per_epoch = expected["batches_per_epoch"].as_u64().unwrap();
    for (i, (s, want)) in t.steps.iter().zip(&losses).enumerate() {
        assert_eq!(s.step, i as u64 + 1);
        // tqdm prints 3 significant digits.
        assert!(((s.loss - want) / want).abs() < 5e-3, "step {}: {} vs {want}", s.step, s.loss);
        assert_eq!(s.epoch, Some((i as u64 / per_epoch) as u32));
    }
    let val: Vec<f64> =
        expected["val_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let at: Vec<u64> = (1..=val.len() as u64).map(|e| e * per_epoch).collect();
    assert_eq!(t.validation.iter().map(|v| v.0).collect::<Vec<_>>(), at);
    for ((_, got), want) in t.validation.iter().zip(&val) {
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    let h = t.run.unwrap();
    assert_eq!((h.batch_size, h.steps_per_epoch, h.dataset_size), (1, per_epoch, 12));
    assert!(!t.loss_is_interval_mean);
}

/// The Hugging Face Trainer's console output: each printed `{'loss': ...}` at the step the
/// trainer's own trainer_state.json (saved by the same run) records it, with its LR and gradient
/// norm, and each `eval_loss` as a validation point.
#[test]
fn hf_trainer_console_output_matches_its_trainer_state() {
    let console = Trace::read(&console_fixture("hf_trainer_stdout.log")).unwrap();
    let state = Trace::read(&console_fixture("hf_trainer_state.json")).unwrap();
    assert!(console.loss_is_interval_mean && state.loss_is_interval_mean);
    let brief = |t: &Trace| -> Vec<(u64, f64, f64, f64)> {
        t.steps.iter().map(|s| (s.step, s.loss, s.lr, s.grad_norm)).collect()
    };
    let (got, want) = (brief(&console), brief(&state));
    assert_eq!(got.len(), want.len(), "{got:?}\n{want:?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0, "{got:?}\n{want:?}");
        for (a, b) in [(g.1, w.1), (g.2, w.2), (g.3, w.3)] {
            // Printed to 4 significant digits.
            assert!(((a - b) / b).abs() < 1e-3, "step {}: {a} vs {b}", g.0);
        }
    }
    // The Trainer clips by default and logs the norm before: its logs cannot show "no clipping".
    for log in ["hf_trainer_stdout.log", "hf_trainer_state.json"] {
        let report = lorahost::doctor::diagnose_trace(&console_fixture(log)).unwrap().to_text();
        assert!(report.contains("[F10]") && !report.contains("no clipping"), "{log}: {report}");
    }
    assert_eq!(console.validation.iter().map(|v| v.0).collect::<Vec<_>>(), [12, 24, 36]);
    for (c, s) in console.validation.iter().zip(&state.validation) {
        assert_eq!(c.0, s.0);
        assert!(((c.1 - s.1) / s.1).abs() < 1e-3, "{c:?} vs {s:?}");
    }
}

/// `doctor --trace` on SAM3_LoRA's console output: the run's fluctuation and its causes.
#[test]
fn doctor_diagnoses_a_console_log() {
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["doctor", "--trace"])
        .arg(console_fixture("sam3_lora_stdout.log"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("a trainer's console output") && out.contains("steps 36"), "{out}");
    assert!(out.contains("[F10]") && out.contains("an effective batch of 1 sample"), "{out}");
    assert!(out.contains("[F15]"), "SAM3_LoRA's training loss against its eval-mode validation loss: {out}");
}

fn hf_fixture(run: &str, log: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_traces").join(run).join(log)
}

/// A real Hugging Face run whose loss turned NaN at its 60th step (tools/gen_hf_trace_fixtures.py):
/// each of its logs (trainer_state.json, the TensorBoard folder with the Trainer's arguments,
/// the console) gives F21 at step 60, and names the zero losses the Trainer's NaN filter logged
/// afterwards.
#[test]
fn a_hugging_face_run_that_went_nan_is_f21_in_each_of_its_logs() {
    for log in ["trainer_state.json", "runs", "console.log"] {
        let r = lorahost::doctor::diagnose_trace(&hf_fixture("nan", log)).unwrap();
        let f21 = r.with_code("F21");
        assert_eq!(f21.len(), 1, "{log}: {}", r.to_text());
        assert_eq!(f21[0].severity, lorahost::doctor::Severity::Error);
        assert!(f21[0].message.contains("the first at step 60"), "{log}: {}", f21[0].message);
        assert!(f21[0].evidence.contains("logging_nan_inf_filter"), "{log}: {}", f21[0].evidence);
    }
}

/// A real Hugging Face run with warmup_steps 50 logged every 50 steps: its first logged LR is
/// near the peak, which is no sign of a missing warmup; it clipped (the Trainer's default), so
/// no log of it gets "no clipping"; the three logs measure the same step noise.
#[test]
fn a_hugging_face_run_logged_sparsely_is_not_told_it_lacks_warmup_or_clipping() {
    let mut noise = Vec::new();
    for log in ["trainer_state.json", "runs", "console.log"] {
        let r = lorahost::doctor::diagnose_trace(&hf_fixture("warmup50", log)).unwrap();
        let text = r.to_text();
        assert!(!text.contains("no warmup") && !text.contains("no clipping"), "{log}: {text}");
        let f10 = r.with_code("F10");
        assert_eq!(f10.len(), 1, "{log}: {text}");
        let per_step: f64 =
            f10[0].message.split("about ").nth(1).unwrap().split('%').next().unwrap().parse().unwrap();
        noise.push(per_step);
    }
    assert!(noise.iter().all(|n| (n - noise[0]).abs() <= 2.0), "{noise:?}");
}
