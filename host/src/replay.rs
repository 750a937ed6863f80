//! `lorahost plugin replay`: feed a recorded run's per-step metrics through the plugins'
//! hooks, in the order training calls them, and report each step's answers.
//!
//! Per optimizer step, as `train` does: for each micro-batch of the step (the record's
//! `micro_steps`, else the run's accumulation, else 1) `loss-weights`; then `on-grads`;
//! then `lr-for-step` (its answer times the product of every earlier `scale-lr`, the LR
//! training would use); then `on-step`. What a trace cannot reproduce: the data-sampling
//! hooks (`epoch-order`, `next-batch`, `observe` need the dataset and per-sample losses, so
//! they are not called), the per-micro-batch losses (each micro-batch sees the step's mean
//! per-term losses), the configured loss weights (the recorded, already applied ones are
//! passed). At a later run header (a resumed run) every plugin is initialised again with that
//! header's settings and gets its state back, as a resumed training does.

use crate::metrics::{number, RunHeader, StepRecord, Trace};
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
    /// Product of this step's scale-lr factors (present when not 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scale: Option<f64>,
    /// The LR scale in force after this step: the product of every scale-lr so far, which
    /// training multiplies into the LR of each later step (present when not 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scale_total: Option<f64>,
    /// The plugin whose answer is `action`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Each plugin's step-metrics answer.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub answers: BTreeMap<String, String>,
    /// Recorded loss.
    #[serde(serialize_with = "finite_or_null")]
    pub loss: f64,
    /// LR training would use for this step: the LR-schedule plugins' answer (the recorded LR
    /// without one) times the LR scale of earlier scale-lr actions (present when an LR-schedule
    /// plugin is loaded or the scale is not 1).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_finite_or_null")]
    pub lr: Option<f64>,
    /// Whether a gradient-inspection plugin vetoed the update, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_veto: Option<String>,
    /// Loss-weight factors per term of the step's last micro-batch (present when a
    /// loss-weights plugin is loaded and the record has per-term losses).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub loss_factors: BTreeMap<String, f64>,
    /// Custom metrics the plugins emitted during this step.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Plugin failures and reloads during this step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// What replay notes about this step (a new run header starts here, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

fn opt_finite_or_null<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) if x.is_finite() => s.serialize_f64(*x),
        _ => s.serialize_none(),
    }
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// The run description a trace implies, given to the plugins' `init`: its first run header if
/// any (the settings the run started with), completed from the records. `start_step` is 1:
/// replay starts every plugin fresh, as a fresh run does; a trace whose first record is later
/// (a Hugging Face log that starts at its first logging step) is not a resume.
pub fn run_info_for(trace: &Trace) -> RunInfo {
    let header = trace.segments.first().map(|s| &s.header).or(trace.run.as_ref());
    run_info_with(trace, header)
}

/// The run description for the steps a header governs.
fn run_info_with(trace: &Trace, header: Option<&RunHeader>) -> RunInfo {
    let mut run = RunInfo::placeholder();
    let last = trace.steps.iter().map(|s| s.step).max().unwrap_or(0);
    run.start_step = 1;
    run.total_steps = trace.steps.iter().find_map(|s| s.total_steps).unwrap_or(last);
    run.warmup_steps = trace.steps.iter().find_map(|s| s.warmup_steps).unwrap_or(0);
    run.accumulation = trace.steps.iter().find_map(|s| s.micro_steps).unwrap_or(1).max(1);
    run.base_lr = trace.steps.iter().map(|s| s.lr).filter(|l| l.is_finite()).fold(0.0, f64::max);
    if let Some(b) = trace.steps.iter().find_map(|s| s.batch_size) {
        run.effective_batch_size = b;
        run.batch_size = (b / run.accumulation).max(1);
    }
    if let Some(h) = header {
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
            .filter_map(|(k, v)| number(v).ok().flatten().map(|value| NamedValue { name: k.clone(), value }))
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
            // NaN: the trace has no norm (not a non-finite gradient); ±inf: one was non-finite.
            nonfinite: u64::from(rec.grad_norm.is_infinite()),
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

/// Most micro-batches replayed per step (a corrupt `micro_steps` must not stall the replay).
const MAX_MICRO_STEPS: u32 = 1024;

/// Replay every step of `trace` through `set`; with `halt_on_stop`, end at the first stop
/// (as training would). `run` is what the plugins were initialised with; steps governed by a
/// later run header of the trace get that header's settings.
pub fn replay(set: &mut PluginSet, trace: &Trace, run: &RunInfo, halt_on_stop: bool) -> Vec<ReplayStep> {
    let any = |set: &PluginSet, h: Hook| set.plugins().iter().any(|p| p.implements(h));
    let (has_lr, has_grads, has_weights) =
        (any(set, Hook::LrSchedule), any(set, Hook::GradInspect), any(set, Hook::LossWeights));
    for p in set.plugins().iter().filter(|p| p.implements(Hook::DataSampling)) {
        tracing::warn!(
            "plugin {} implements data-sampling: replay cannot call epoch-order, next-batch or observe (a trace has no dataset or per-sample losses); its other hooks run",
            p.name()
        );
    }
    let no_lr = trace.steps.iter().filter(|s| s.lr.is_nan()).count();
    if has_lr && no_lr > 0 {
        tracing::warn!(
            "{no_lr} of {} steps of the trace ({}) have no recorded LR: LR-schedule plugins get scheduled_lr NaN there (training always passes its scheduler's LR); a failure at such a step is marked as caused by the trace",
            trace.steps.len(),
            trace.format.describe()
        );
    }
    // Run info per run header (segment 0 is what the plugins were initialised with).
    let segments: Vec<(u64, RunInfo)> = trace
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| (s.from_step, if i == 0 { run.clone() } else { run_info_with(trace, Some(&s.header)) }))
        .collect();
    let mut segment = 0usize;
    let mut last_loss = f64::NAN;
    let mut lr_scale = 1.0f64;
    let mut out = Vec::with_capacity(trace.steps.len());
    for rec in &trace.steps {
        let mut notes = Vec::new();
        while segments.get(segment + 1).is_some_and(|(from, _)| rec.step >= *from) {
            segment += 1;
            let (prev, now) = (&segments[segment - 1].1, &segments[segment].1);
            // As a resumed training: every plugin starts again with the new header's settings
            // and gets its state back.
            let reinit = match set.reinit(now) {
                Ok(restored) => format!(
                    "the plugins were initialised again with it{}",
                    if restored.is_empty() {
                        String::new()
                    } else {
                        format!(" and got their state back ({})", restored.join(", "))
                    }
                ),
                Err(e) => format!("re-initialising the plugins with it failed, the running ones go on: {e}"),
            };
            notes.push(format!(
                "new run header from here (a resumed run): base_lr {:e} -> {:e}, total_steps {} -> {}, warmup_steps {} -> {}; {reinit}",
                prev.base_lr, now.base_lr, prev.total_steps, now.total_steps, prev.warmup_steps, now.warmup_steps
            ));
        }
        let run = segments.get(segment).map_or(run, |(_, r)| r);
        set.step_boundary();
        // 1. Each micro-batch: the loss-weights hook (training calls it after the forward pass).
        let micro_steps = rec.micro_steps.unwrap_or(run.accumulation).clamp(1, MAX_MICRO_STEPS);
        let mut loss_factors = BTreeMap::new();
        let terms = loss_terms(rec);
        if has_weights && !terms.is_empty() {
            for micro_step in 0..micro_steps {
                let info = MicroBatchInfo { step: rec.step, micro_step, epoch: rec.epoch.unwrap_or(0) };
                let factors = set.loss_weights(&info, &terms);
                loss_factors = terms.iter().zip(factors).map(|(t, f)| (t.name.clone(), f)).collect();
            }
        }
        // 2. The accumulated gradients.
        let grad_veto = if has_grads { set.on_grads(&grad_report(rec)).veto } else { None };
        // 3. The LR: the plugins' chain on the recorded LR, times the scale so far.
        let chained = if has_lr {
            set.lr_for_step(&LrRequest {
                step: rec.step,
                total_steps: rec.total_steps.unwrap_or(run.total_steps),
                warmup_steps: rec.warmup_steps.unwrap_or(run.warmup_steps),
                base_lr: run.base_lr,
                scheduled_lr: rec.lr,
                last_loss,
            })
        } else {
            rec.lr
        };
        // As training: the product of scale-lr answers compounds, the LR used is capped.
        // (An unknown LR stays unknown: `NaN.min(x)` is x.)
        let lr_used =
            if chained.is_nan() { chained } else { (chained * lr_scale).min(crate::plugin::MAX_LR) };
        // 4. The step's metrics, with the LR training would have used.
        let mut metrics = step_metrics(rec, run);
        metrics.lr = lr_used;
        let decision = set.on_step(&metrics);
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
        let lr_shown = (has_lr || lr_scale != 1.0).then_some(lr_used).filter(|l| !l.is_nan());
        // Training keeps the product of every scale-lr (each factor in (0, 10], checked by the
        // host; the LR it gives is capped at MAX_LR above).
        lr_scale *= decision.lr_scale;
        let events = set
            .take_events()
            .iter()
            .map(|e| {
                let mut text = describe_event(e);
                if let PluginEvent::Failed { hook: "lr-for-step", .. } = e {
                    if rec.lr.is_nan() {
                        text.push_str(" (the trace has no LR for this step: scheduled_lr was NaN, which training never sends)");
                    }
                }
                text
            })
            .collect();
        out.push(ReplayStep {
            step: rec.step,
            action,
            reason,
            lr_scale: (decision.lr_scale != 1.0).then_some(decision.lr_scale),
            lr_scale_total: (lr_scale != 1.0).then_some(lr_scale),
            decided_by,
            answers: decision.answers.iter().map(|(p, a)| (p.clone(), action_text(a))).collect(),
            loss: rec.loss,
            lr: lr_shown,
            grad_veto: grad_veto.map(|(p, r)| format!("{p}: {r}")),
            loss_factors,
            metrics: set.take_metrics().into_iter().collect(),
            events,
            notes,
        });
        if halt_on_stop && action == "stop" {
            break;
        }
    }
    out
}

/// Plugin failures in a replay (failed calls; a plugin switched off after them is not another).
pub fn failure_count(steps: &[ReplayStep]) -> usize {
    steps.iter().flat_map(|s| &s.events).filter(|e| e.contains(" failed: ")).count()
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
        // Not "disabled: ": the switch-off follows failures already counted (see failure_count).
        PluginEvent::Disabled { plugin, reason } => {
            format!("{plugin}: disabled ({reason}); the replay goes on without it")
        }
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
        match s.lr_scale_total {
            Some(t) if t != f => line.push_str(&format!(" (lr x{f}, now x{t} of the schedule)")),
            _ => line.push_str(&format!(" (lr x{f})")),
        }
    }
    if s.loss_factors.values().any(|f| *f != 1.0) {
        let f: Vec<String> = s.loss_factors.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
        line.push_str(&format!("  weights {}", f.join(" ")));
    }
    let mut line = line.trim_end().to_string();
    for e in &s.events {
        line.push_str(&format!("\n           ! {e}"));
    }
    for n in &s.notes {
        line.push_str(&format!("\n           * {n}"));
    }
    line
}
