//! The reference plugins load through the host and every hook point is exercised.
mod common;

use common::*;
use lorahost::metrics::Trace;
use lorahost::plugin::{
    Action, BatchRequest, GradGroup, GradReport, Hook, LrRequest, MicroBatchInfo, SampleMeta,
};
use lorahost::replay;
use serde_json::json;

const REFERENCE: [&str; 5] =
    ["spike_guard", "warmup_validator", "balanced_sampler", "cosine_schedule", "early_stopping"];

fn samples(n: u32) -> Vec<SampleMeta> {
    (0..n)
        .map(|i| SampleMeta {
            index: i,
            object_count: if i % 2 == 0 { 0 } else { 7 },
            categories: vec![i % 3],
            last_loss: f64::NAN,
            times_seen: 0,
        })
        .collect()
}

#[test]
fn every_reference_plugin_loads_and_describes_itself() {
    let set = load(&REFERENCE.map(|n| (n, json!({}))));
    let names: Vec<&str> = set.plugins().iter().map(|p| p.name()).collect();
    assert_eq!(names, REFERENCE);
    let implements =
        |name: &str, h: Hook| set.plugins().iter().find(|p| p.name() == name).unwrap().implements(h);
    assert!(implements("spike_guard", Hook::StepMetrics));
    assert!(implements("warmup_validator", Hook::StepMetrics));
    assert!(implements("balanced_sampler", Hook::DataSampling));
    assert!(implements("cosine_schedule", Hook::LrSchedule));
    assert!(implements("early_stopping", Hook::StepMetrics));
    for p in set.plugins() {
        assert!(!p.manifest().version.is_empty() && !p.manifest().description.is_empty());
    }
}

#[test]
fn all_hooks_are_called_with_all_reference_plugins_loaded() {
    let mut set = load(&REFERENCE.map(|n| (n, json!({}))));
    let n = 20;
    let order = set.epoch_order(0, &samples(n)).expect("balanced_sampler orders the epoch");
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation without importance sampling");
    // Stratified: consecutive pairs mix the zero-object and the many-object halves.
    let mixed = order.chunks(2).filter(|c| c.len() == 2 && (c[0] % 2) != (c[1] % 2)).count();
    assert!(mixed >= 8, "order not stratified: {order:?}");

    let mut lrs = Vec::new();
    for step in 1..=12u64 {
        set.step_boundary();
        let req = BatchRequest { step, micro_step: 0, epoch: 0, batch_size: 2, dataset_size: n };
        assert_eq!(set.next_batch(&req), None, "balanced_sampler defers per-batch choice");
        let info = MicroBatchInfo { step, micro_step: 0, epoch: 0 };
        assert_eq!(set.loss_weights(&info, &terms()), vec![1.0, 1.0]);
        set.observe(&[0, 1], &[0.5, 2.0]);
        let report = GradReport {
            step,
            total_norm: 1.0,
            max_norm: 1.0,
            groups: vec![GradGroup {
                name: "vision".into(),
                l2_norm: 1.0,
                max_abs: 0.1,
                nonfinite: 0,
                numel: 100,
            }],
        };
        assert!(set.on_grads(&report).veto.is_none());
        let lr = set.lr_for_step(&LrRequest {
            step,
            total_steps: 100,
            warmup_steps: 10,
            base_lr: 1e-4,
            scheduled_lr: 1e-4,
            last_loss: 1.0,
        });
        lrs.push(lr);
        let d = set.on_step(&metrics(step, 1.0 - step as f64 * 0.01));
        assert!(matches!(d.action, Action::Continue), "step {step}: {:?}", d.action);
    }
    // cosine_schedule: ramps during the 10 warmup steps, peaks at the base LR, then decays.
    assert!(lrs.windows(2).take(9).all(|w| w[1] > w[0]), "{lrs:?}");
    assert!((lrs[9] - 1e-4).abs() < 1e-9, "{lrs:?}");
    assert!(lrs[11] < lrs[9]);
    let events = set.take_events();
    assert!(events.is_empty(), "no plugin failed: {events:?}");
}

#[test]
fn spike_guard_flags_the_diagnosis_spike_and_nothing_else() {
    let trace = Trace::read(&repo().join("examples/traces/diagnosis.jsonl")).unwrap();
    let run = replay::run_info_for(&trace);
    let mut set = load(&[("spike_guard", json!({}))]);
    let steps = replay::replay(&mut set, &trace, &run, true);
    assert_eq!(steps.len(), 16);
    let flagged: Vec<(u64, &str)> =
        steps.iter().filter(|s| s.action != "continue").map(|s| (s.step, s.action)).collect();
    assert_eq!(flagged, vec![(4, "skip")]);
}

#[test]
fn spike_guard_leaves_a_smooth_run_alone() {
    let trace = Trace::read(&repo().join("examples/traces/smooth.jsonl")).unwrap();
    let run = replay::run_info_for(&trace);
    let mut set = load(&[("spike_guard", json!({})), ("warmup_validator", json!({}))]);
    let steps = replay::replay(&mut set, &trace, &run, true);
    assert_eq!(steps.len(), 300);
    let flagged: Vec<u64> = steps.iter().filter(|s| s.action != "continue").map(|s| s.step).collect();
    assert!(flagged.is_empty(), "flagged {flagged:?}");
}

#[test]
fn plugin_state_survives_snapshot_and_restore_across_sets() {
    // A checkpoint/resume in miniature: snapshots from one set restore into a fresh one.
    let trace = Trace::read(&repo().join("examples/traces/diagnosis.jsonl")).unwrap();
    let run = replay::run_info_for(&trace);
    let mut first = load(&[("spike_guard", json!({}))]);
    let mut head = trace.clone();
    head.steps.truncate(3);
    replay::replay(&mut first, &head, &run, true);
    let states = first.snapshots();
    let mut resumed = load(&[("spike_guard", json!({}))]);
    assert_eq!(resumed.restore(&states), vec!["spike_guard".to_string()]);
    let mut tail = trace.clone();
    tail.steps.drain(..3);
    let steps = replay::replay(&mut resumed, &tail, &run, true);
    assert_eq!(steps[0].step, 4);
    assert_eq!(steps[0].action, "skip", "the resumed guard still knows the baseline");
}
