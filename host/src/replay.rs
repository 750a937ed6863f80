//! `lorahost plugin replay`: feed a recorded run's per-step metrics through the plugins'
//! hooks, in the order training calls them, and report each step's answers.

use crate::metrics::{StepRecord, Trace};
use crate::plugin::{
    Action, GradGroup, GradReport, Hook, LossTerm, LrRequest, MicroBatchInfo, NamedValue, PluginEvent,
    PluginSet, RunInfo, StepMetrics,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// What the plugins answered for one recorded step.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayStep {
    /// Optimizer step.
    pub step: u64,
    /// The combined action: continue, skip, scale_lr, checkpoint or stop.
    pub action: &'static str,
    /// Reason for skip/stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Product of the scale-lr factors (present when not 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scale: Option<f64>,
    /// The plugin whose answer is `action`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Each plugin's step-metrics answer.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub answers: BTreeMap<String, String>,
    /// Recorded loss.
    #[serde(serialize_with = "finite_or_null")]
    pub loss: f64,
    /// LR the LR-schedule plugins would use for this step (present when one is loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Whether a gradient-inspection plugin vetoed the update, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_veto: Option<String>,
    /// Loss-weight factors per term (present when a loss-weights plugin is loaded).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub loss_factors: BTreeMap<String, f64>,
    /// Custom metrics the plugins emitted during this step.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Plugin failures and reloads during this step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// The run description a trace implies: its header if any, completed from the records.
pub fn run_info_for(trace: &Trace) -> RunInfo {
    let mut run = RunInfo::placeholder();
    let last = trace.steps.iter().map(|s| s.step).max().unwrap_or(0);
    let first = trace.steps.iter().map(|s| s.step).min().unwrap_or(1);
    run.start_step = first.max(1);
    run.total_steps = trace.steps.iter().find_map(|s| s.total_steps).unwrap_or(last);
    run.warmup_steps = trace.steps.iter().find_map(|s| s.warmup_steps).unwrap_or(0);
    run.accumulation = trace.steps.iter().find_map(|s| s.micro_steps).unwrap_or(1).max(1);
    run.base_lr = trace.steps.iter().map(|s| s.lr).filter(|l| l.is_finite()).fold(0.0, f64::max);
    if let Some(b) = trace.steps.iter().find_map(|s| s.batch_size) {
        run.effective_batch_size = b;
        run.batch_size = (b / run.accumulation).max(1);
    }
    if let Some(h) = &trace.run {
        run.total_steps = if h.total_steps > 0 { h.total_steps } else { run.total_steps };
        run.warmup_steps = h.warmup_steps;
        if h.accumulation > 0 {
            run.accumulation = h.accumulation;
        }
        if h.batch_size > 0 {
            run.batch_size = h.batch_size;
        }
        run.effective_batch_size = if h.effective_batch_size > 0 {
            h.effective_batch_size
        } else {
            run.batch_size * run.accumulation
        };
        if h.base_lr > 0.0 {
            run.base_lr = h.base_lr;
        }
        if !h.scheduler.is_empty() {
            run.scheduler = h.scheduler.clone();
        }
        run.dataset_size = h.dataset_size;
        run.steps_per_epoch = h.steps_per_epoch;
        run.seed = h.seed;
    }
    run
}

/// The hook input for a recorded step.
pub fn step_metrics(rec: &StepRecord, run: &RunInfo) -> StepMetrics {
    StepMetrics {
        step: rec.step,
        micro_steps: rec.micro_steps.unwrap_or(run.accumulation),
        epoch: rec.epoch.unwrap_or(0),
        total_steps: rec.total_steps.unwrap_or(run.total_steps),
        warmup_steps: rec.warmup_steps.unwrap_or(run.warmup_steps),
        loss: rec.loss,
        losses: loss_terms(rec),
        lr: rec.lr,
        grad_norm: rec.grad_norm,
        grad_norm_clipped: rec.grad_norm_clipped.unwrap_or(rec.grad_norm),
        batch_size: rec.batch_size.unwrap_or(run.effective_batch_size),
        object_count: rec.object_count.unwrap_or(0),
        step_time_ms: rec.step_time_ms.unwrap_or(0.0),
        memory_bytes: rec.memory_bytes.unwrap_or(0),
        extra: rec
            .extra
            .iter()
            .filter_map(|(k, v)| v.as_f64().map(|value| NamedValue { name: k.clone(), value }))
            .collect(),
    }
}

fn loss_terms(rec: &StepRecord) -> Vec<LossTerm> {
    rec.losses
        .iter()
        .map(|(name, value)| LossTerm {
            name: name.clone(),
            value: *value,
            weight: rec.loss_weights.get(name).copied().unwrap_or(1.0),
        })
        .collect()
}

fn grad_report(rec: &StepRecord) -> GradReport {
    let groups = if rec.grad_groups.is_empty() {
        // Without per-group statistics the global norm is the only group; it bounds max |g|.
        vec![GradGroup {
            name: "all".into(),
            l2_norm: rec.grad_norm,
            max_abs: rec.grad_norm,
            nonfinite: u64::from(!rec.grad_norm.is_finite()),
            numel: 0,
        }]
    } else {
        rec.grad_groups
            .iter()
            .map(|g| GradGroup {
                name: g.name.clone(),
                l2_norm: g.l2_norm,
                max_abs: g.max_abs,
                nonfinite: g.nonfinite,
                numel: g.numel,
            })
            .collect()
    };
    GradReport { step: rec.step, total_norm: rec.grad_norm, max_norm: 0.0, groups }
}

/// Replay every step of `trace` through `set`; with `halt_on_stop`, end at the first stop
/// (as training would).
pub fn replay(set: &mut PluginSet, trace: &Trace, run: &RunInfo, halt_on_stop: bool) -> Vec<ReplayStep> {
    let any = |set: &PluginSet, h: Hook| set.plugins().iter().any(|p| p.implements(h));
    let (has_lr, has_grads, has_weights) =
        (any(set, Hook::LrSchedule), any(set, Hook::GradInspect), any(set, Hook::LossWeights));
    let mut last_loss = f64::NAN;
    let mut out = Vec::with_capacity(trace.steps.len());
    for rec in &trace.steps {
        set.step_boundary();
        let lr = has_lr.then(|| {
            set.lr_for_step(&LrRequest {
                step: rec.step,
                total_steps: rec.total_steps.unwrap_or(run.total_steps),
                warmup_steps: rec.warmup_steps.unwrap_or(run.warmup_steps),
                base_lr: run.base_lr,
                scheduled_lr: rec.lr,
                last_loss,
            })
        });
        let mut loss_factors = BTreeMap::new();
        let terms = loss_terms(rec);
        if has_weights && !terms.is_empty() {
            let info = MicroBatchInfo { step: rec.step, micro_step: 0, epoch: rec.epoch.unwrap_or(0) };
            let factors = set.loss_weights(&info, &terms);
            loss_factors = terms.iter().zip(factors).map(|(t, f)| (t.name.clone(), f)).collect();
        }
        let grad_veto = if has_grads { set.on_grads(&grad_report(rec)).veto } else { None };
        let decision = set.on_step(&step_metrics(rec, run));
        last_loss = rec.loss;
        let (action, reason) = match (&grad_veto, &decision.action) {
            (_, Action::Stop(r)) => ("stop", Some(r.clone())),
            (Some((p, r)), _) => ("skip", Some(format!("gradient veto by {p}: {r}"))),
            (None, a @ Action::Skip(r)) => (a.kind(), Some(r.clone())),
            (None, a) => (a.kind(), None),
        };
        let decided_by = match (&grad_veto, &decision.action) {
            (_, Action::Stop(_)) | (None, _) => decision.decided_by.clone(),
            (Some((p, _)), _) => Some(p.clone()),
        };
        let events = set.take_events().iter().map(describe_event).collect();
        out.push(ReplayStep {
            step: rec.step,
            action,
            reason,
            lr_scale: (decision.lr_scale != 1.0).then_some(decision.lr_scale),
            decided_by,
            answers: decision.answers.iter().map(|(p, a)| (p.clone(), action_text(a))).collect(),
            loss: rec.loss,
            lr,
            grad_veto: grad_veto.map(|(p, r)| format!("{p}: {r}")),
            loss_factors,
            metrics: set.take_metrics().into_iter().collect(),
            events,
        });
        if halt_on_stop && action == "stop" {
            break;
        }
    }
    out
}

/// "skip: reason", "scale_lr(0.5)", "continue".
pub fn action_text(a: &Action) -> String {
    match a {
        Action::Continue | Action::Checkpoint => a.kind().to_string(),
        Action::ScaleLr(f) => format!("scale_lr({f})"),
        Action::Skip(r) | Action::Stop(r) => format!("{}: {r}", a.kind()),
    }
}

/// One line for a plugin event.
pub fn describe_event(e: &PluginEvent) -> String {
    match e {
        PluginEvent::Failed { plugin, hook, reason } => format!("{plugin}: {hook} failed: {reason}"),
        PluginEvent::Recovered { plugin, state_restored } => {
            format!("{plugin}: re-instantiated (state restored: {state_restored})")
        }
        PluginEvent::Disabled { plugin, reason } => format!("{plugin}: disabled: {reason}"),
        PluginEvent::Reloaded { plugin, from_version, to_version, state_carried, .. } => {
            format!("{plugin}: reloaded {from_version} -> {to_version} (state carried: {state_carried})")
        }
        PluginEvent::ReloadRejected { plugin, reason, .. } => {
            format!("{plugin}: new version rejected: {reason}")
        }
    }
}

/// Human-readable rendering of one replayed step.
pub fn render_text(s: &ReplayStep) -> String {
    let mut line = format!("step {:>5}  loss {:>10.4}", s.step, s.loss);
    if let Some(lr) = s.lr {
        line.push_str(&format!("  lr {lr:.3e}"));
    }
    line.push_str(&format!("  -> {:<10}", s.action));
    if let Some(p) = &s.decided_by {
        line.push_str(&format!(" [{p}]"));
    }
    if let Some(r) = &s.reason {
        line.push_str(&format!(" {r}"));
    }
    if let Some(f) = s.lr_scale {
        line.push_str(&format!(" (lr x{f})"));
    }
    if s.loss_factors.values().any(|f| *f != 1.0) {
        let f: Vec<String> = s.loss_factors.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
        line.push_str(&format!("  weights {}", f.join(" ")));
    }
    let mut line = line.trim_end().to_string();
    for e in &s.events {
        line.push_str(&format!("\n           ! {e}"));
    }
    line
}
