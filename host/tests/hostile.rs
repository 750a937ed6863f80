//! Hostile plugins never crash or hang the host: every misbehaviour is contained, answered
//! with the hook's default, reported with the plugin's name, and training goes on.
mod common;

use common::*;
use lorahost::plugin::{
    Action, BatchRequest, Limits, LrRequest, MicroBatchInfo, PluginError, PluginEvent, PluginSet, PluginSpec,
    SampleMeta,
};
use serde_json::json;
use std::time::Duration;

fn hostile(config: serde_json::Value) -> PluginSet {
    load(&[("hostile", config)])
}

fn failures(set: &mut PluginSet) -> Vec<String> {
    set.take_events()
        .into_iter()
        .filter_map(|e| match e {
            PluginEvent::Failed { plugin, hook, reason } => Some(format!("{plugin}/{hook}: {reason}")),
            _ => None,
        })
        .collect()
}

#[test]
fn infinite_loop_is_cut_off_by_the_cpu_budget() {
    within(60, || {
        let mut set = hostile(json!({"mode": "loop", "at_steps": [2]}));
        assert!(matches!(set.on_step(&metrics(1, 1.0)).action, Action::Continue));
        set.step_boundary();
        let t = std::time::Instant::now();
        let d = set.on_step(&metrics(2, 1.0));
        assert!(matches!(d.action, Action::Continue), "default answer expected");
        assert!(t.elapsed() < Duration::from_secs(5), "budget not enforced: {:?}", t.elapsed());
        let f = failures(&mut set);
        assert!(f.iter().any(|m| m.contains("hostile/on-step") && m.contains("CPU budget")), "{f:?}");
        // It was re-instantiated with its state: the next step counts on from 1.
        set.step_boundary();
        set.on_step(&metrics(3, 1.0));
        assert_eq!(metric(&set.take_metrics(), "plugin.hostile.seen"), Some(2.0));
    });
}

#[test]
fn memory_bomb_hits_the_memory_cap() {
    within(60, || {
        // A generous CPU budget, so only the memory cap can stop it even on a loaded machine.
        let spec = PluginSpec {
            config: json!({"mode": "memory_bomb"}),
            limits: Limits { call_budget: Duration::from_secs(20), ..Limits::default() },
            ..PluginSpec::new(plugin("hostile"))
        };
        let mut set = PluginSet::load(runtime(), &[spec], &run_info()).unwrap();
        let d = set.on_step(&metrics(1, 1.0));
        assert!(matches!(d.action, Action::Continue));
        let f = failures(&mut set);
        assert!(f.iter().any(|m| m.contains("out of memory") && m.contains("64 MiB")), "{f:?}");
    });
}

#[test]
fn trap_recovers_from_the_last_good_snapshot() {
    let mut set = hostile(json!({"mode": "trap", "at_steps": [3]}));
    for step in 1..=5 {
        set.step_boundary();
        let d = set.on_step(&metrics(step, 1.0));
        assert!(matches!(d.action, Action::Continue));
    }
    let events = set.take_events();
    assert!(events
        .iter()
        .any(|e| matches!(e, PluginEvent::Failed { reason, .. } if reason.contains("trapped"))));
    assert!(events.iter().any(|e| matches!(e, PluginEvent::Recovered { state_restored: true, .. })));
    // Steps 1, 2, 4, 5 were counted; the count from before the trap was restored.
    assert_eq!(metric(&set.take_metrics(), "plugin.hostile.seen"), Some(4.0));
    assert!(set.plugins()[0].disabled().is_none());
}

#[test]
fn a_plugin_that_keeps_failing_is_disabled_and_training_goes_on() {
    let mut set = hostile(json!({"mode": "trap"}));
    for step in 1..=6 {
        set.step_boundary();
        assert!(matches!(set.on_step(&metrics(step, 1.0)).action, Action::Continue));
    }
    let events = set.take_events();
    let fails = events.iter().filter(|e| matches!(e, PluginEvent::Failed { .. })).count();
    assert_eq!(fails, Limits::default().max_consecutive_failures as usize, "no calls after disabling");
    assert!(events.iter().any(|e| matches!(e, PluginEvent::Disabled { plugin, .. } if plugin == "hostile")));
    assert!(set.plugins()[0].disabled().is_some());
}

/// Failures count per hook: an LR hook that fails on every step is disabled after three even
/// though the plugin's other hooks answer fine in between.
#[test]
fn a_hook_that_keeps_failing_is_not_excused_by_the_other_hooks() {
    let mut set = hostile(json!({"mode": "negative_lr", "hook": "lr_for_step"}));
    for step in 1..=6 {
        set.step_boundary();
        assert_eq!(set.lr_for_step(&lr_request(step)), 5e-5);
        assert!(matches!(set.on_step(&metrics(step, 1.0)).action, Action::Continue));
    }
    let events = set.take_events();
    let fails = events.iter().filter(|e| matches!(e, PluginEvent::Failed { .. })).count();
    assert_eq!(fails, Limits::default().max_consecutive_failures as usize, "{events:?}");
    let why = set.plugins()[0].disabled().map(str::to_string).unwrap_or_default();
    assert!(why.contains("lr-for-step"), "{why}");
}

fn lr_request(step: u64) -> LrRequest {
    LrRequest { step, total_steps: 100, warmup_steps: 10, base_lr: 1e-4, scheduled_lr: 5e-5, last_loss: 1.0 }
}

#[test]
fn invalid_learning_rates_fall_back_to_the_schedule() {
    for mode in ["nan_lr", "negative_lr", "inf_lr"] {
        let mut set = hostile(json!({"mode": mode, "hook": "lr_for_step"}));
        assert_eq!(set.lr_for_step(&lr_request(1)), 5e-5, "{mode}");
        let f = failures(&mut set);
        assert!(
            f.iter().any(|m| m.contains("invalid answer") && m.contains("learning rate")),
            "{mode}: {f:?}"
        );
    }
}

fn samples(n: u32) -> Vec<SampleMeta> {
    (0..n)
        .map(|i| SampleMeta {
            index: i,
            object_count: i % 4,
            categories: vec![i % 3],
            last_loss: f64::NAN,
            times_seen: 0,
        })
        .collect()
}

#[test]
fn out_of_range_and_wrong_length_indices_are_rejected() {
    for mode in ["bad_indices", "wrong_length"] {
        let mut set = hostile(json!({"mode": mode, "hook": "epoch_order"}));
        assert_eq!(set.epoch_order(0, &samples(10)), None, "{mode}");
        let mut set = hostile(json!({"mode": mode, "hook": "next_batch"}));
        let req = BatchRequest { step: 1, micro_step: 0, epoch: 0, batch_size: 4, dataset_size: 10 };
        assert_eq!(set.next_batch(&req), None, "{mode}");
        let f = failures(&mut set);
        assert!(f.iter().any(|m| m.contains("next-batch") && m.contains("invalid answer")), "{mode}: {f:?}");
    }
}

#[test]
fn unknown_or_invalid_loss_weights_are_rejected() {
    let info = MicroBatchInfo { step: 1, micro_step: 0, epoch: 0 };
    for mode in ["unknown_term", "nan_weight", "negative_weight"] {
        let mut set = hostile(json!({"mode": mode, "hook": "loss_weights"}));
        assert_eq!(set.loss_weights(&info, &terms()), vec![1.0, 1.0], "{mode}");
        let f = failures(&mut set);
        assert!(
            f.iter().any(|m| m.contains("loss-weights") && m.contains("invalid answer")),
            "{mode}: {f:?}"
        );
    }
}

#[test]
fn enormous_outputs_are_bounded() {
    within(120, || {
        // A 64 MiB answer list cannot even be built inside the memory cap.
        let mut set = hostile(json!({"mode": "huge_list", "hook": "epoch_order"}));
        assert_eq!(set.epoch_order(0, &samples(10)), None);
        assert!(!failures(&mut set).is_empty());
        // An 8 MiB reason string is cut to a readable length.
        let mut set = hostile(json!({"mode": "huge_reason"}));
        match set.on_step(&metrics(1, 1.0)).action {
            Action::Stop(r) => assert!(r.len() < 2048, "reason not truncated: {} bytes", r.len()),
            a => panic!("expected stop, got {a:?}"),
        }
        // Log and metric floods are capped per call.
        let mut set = hostile(json!({"mode": "log_flood"}));
        assert!(matches!(set.on_step(&metrics(1, 1.0)).action, Action::Continue));
        let ms = set.take_metrics();
        assert!(ms.len() <= 256, "{} metrics recorded", ms.len());
    });
}

#[test]
fn bad_scale_lr_answer_is_replaced_by_continue() {
    let mut set = hostile(json!({"mode": "bad_scale"}));
    let d = set.on_step(&metrics(1, 1.0));
    assert!(matches!(d.action, Action::Continue));
    assert_eq!(d.lr_scale, 1.0);
}

#[test]
fn init_failures_are_clear_errors() {
    within(60, || {
        for (mode, needle) in
            [("init_error", "refuses to start"), ("init_trap", "trapped"), ("init_loop", "CPU budget")]
        {
            let spec = PluginSpec { config: json!({"mode": mode}), ..PluginSpec::new(plugin("hostile")) };
            let err = PluginSet::load(runtime(), &[spec], &run_info()).err().expect(mode);
            assert!(matches!(err, PluginError::Init { .. }), "{mode}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("hostile") && msg.contains(needle), "{mode}: {msg}");
        }
        // A misspelled config key is named.
        let spec = PluginSpec { config: json!({"mdoe": "trap"}), ..PluginSpec::new(plugin("hostile")) };
        let msg = PluginSet::load(runtime(), &[spec], &run_info()).err().unwrap().to_string();
        assert!(msg.contains("mdoe"), "{msg}");
    });
}

#[test]
fn broken_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm at all").unwrap();
    let truncated = dir.path().join("truncated.wasm");
    let good = std::fs::read(plugin("hostile")).unwrap();
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let core = dir.path().join("core.wasm");
    // The smallest valid core module: magic + version 1.
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let missing = dir.path().join("missing.wasm");
    for (path, needle) in [
        (&garbage, "not a WebAssembly component"),
        (&truncated, "not a valid plugin"),
        (&core, "core wasm module"),
        (&missing, "cannot read plugin"),
    ] {
        let err =
            PluginSet::load(runtime(), &[PluginSpec::new(path)], &run_info()).err().unwrap().to_string();
        assert!(err.contains(needle), "{}: {err}", path.display());
        assert!(err.contains(&*path.file_name().unwrap().to_string_lossy()), "{err}");
    }
}
