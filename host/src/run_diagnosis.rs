//! Diagnosing a recorded run (`lorahost doctor --trace FILE`): the analysis a person does by
//! hand on a loss log that "fluctuates and nobody can say why", done from the log alone.
//!
//! The log is any that [`crate::metrics::Trace`] reads: lorahost's `metrics.jsonl`, the
//! SAM3_LoRA fork's `train_step` JSONL, a Hugging Face `trainer_state.json`, a Lightning
//! `metrics.csv`, TensorBoard event files, or a trainer's console output
//! ([`crate::console_log`]). The findings use the SAM3_LoRA catalogue's codes:
//! - **F10** how much the loss moves from step to step (the robust spread of relative step
//!   differences about zero, so a falling trend does not count as noise; a log whose points are
//!   means over the steps between them, the Hugging Face Trainer's, scaled back to single
//!   steps), whether the gradient norm moves
//!   with it, and which of the catalogue's causes the log shows (an effective batch of a few
//!   samples, no warmup, no clipping, a constant LR), with the fix for each;
//! - **F11** settings the log's header names but the steps do not show (warmup without a ramp,
//!   accumulation with one micro-batch per step, a scheduler with a constant LR, another LR);
//! - **D10** whether the loss improves at all beneath the noise, or rises;
//! - **D11** spikes (a step far above its recent median) and whether the LR was at its peak
//!   without warmup when they came;
//! - **F14** steps that became several times slower;
//! - **F15** a training loss many times the validation loss in a SAM3_LoRA log (its validation
//!   drops the auxiliary and one-to-many terms);
//! - **F27** a validation loss that rose again while the training loss fell;
//! - and the probe's checks on the same steps (F21 non-finite steps, F1/F2 loss magnitude, F9
//!   zero gradients, D5 clipping on most steps).

use crate::doctor::{Report, Severity};
use crate::metrics::{StepRecord, Trace, TraceFormat};
use std::path::Path;

use crate::train::slowdown::median;

/// The facts key of a recorded run's step statistics.
pub(crate) const TRACE_FACTS: &str = "trace_steps";

/// Robust standard deviation (1.4826 × the median absolute deviation).
fn robust_sd(v: &[f64]) -> f64 {
    let m = median(v);
    let dev: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
    1.4826 * median(&dev)
}

/// Mean of `v` without its lowest and highest 20% (spikes do not move it).
fn trimmed_mean(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let cut = v.len() / 5;
    let kept = &v[cut..v.len() - cut];
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

/// Pearson correlation of the pairs (NaN when undefined).
fn correlation(pairs: &[(f64, f64)]) -> f64 {
    let n = pairs.len() as f64;
    if n < 3.0 {
        return f64::NAN;
    }
    let (mx, my) = (pairs.iter().map(|p| p.0).sum::<f64>() / n, pairs.iter().map(|p| p.1).sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx).powi(2);
        syy += (y - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

/// Validation losses of the run, by step: lorahost's `validation` events in a JSONL file and
/// the `validation.step` / `validation.loss` values other formats attach to their steps.
pub fn validations(path: &Path, trace: &Trace) -> Vec<(u64, f64)> {
    let mut out: Vec<(u64, f64)> = Vec::new();
    if trace.format == TraceFormat::Lorahost {
        // A run's folder is read through its metrics.jsonl (`Trace::read`).
        let file = if path.is_dir() { path.join("metrics.jsonl") } else { path.to_path_buf() };
        if let Ok(text) = std::fs::read_to_string(file) {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                if v["event"] == "validation" {
                    if let (Some(s), Some(l)) = (v["step"].as_u64(), v["loss"].as_f64()) {
                        out.push((s, l));
                    }
                }
            }
        }
    }
    for s in &trace.steps {
        let get = |k: &str| s.extra.get(k).and_then(|v| crate::metrics::number(v).ok().flatten());
        if let (Some(at), Some(l)) = (get("validation.step"), get("validation.loss")) {
            out.push((at as u64, l));
        }
    }
    // With the ones no step carries (after the last step).
    out.extend(trace.validation.iter().copied());
    out.sort_by_key(|v| v.0);
    out.dedup_by_key(|v| v.0);
    out.retain(|v| v.1.is_finite());
    out
}

/// The recorded run's findings (see the module docs) into `r`; `max_norm` is the clipping
/// threshold when known (else read from the clipped norms the log has).
pub fn analyse_run(trace: &Trace, validation: &[(u64, f64)], max_norm: Option<f64>, r: &mut Report) {
    // Steps that trained nothing (every micro-batch ran out of device memory) say nothing
    // about the loss or the gradients (`doctor` reports them under F13).
    let trained = Trace {
        steps: trace.steps.iter().filter(|s| s.micro_steps != Some(0)).cloned().collect(),
        ..trace.clone()
    };
    let trace = &trained;
    let steps = &trace.steps;
    let given_norm = max_norm;
    let max_norm = max_norm.unwrap_or_else(|| {
        let clip = steps
            .iter()
            .filter_map(|s| s.grad_norm_clipped.filter(|c| *c < s.grad_norm * 0.999))
            .fold(0.0, f64::max);
        // The clipped norms carry the float rounding of the scaling: six significant digits.
        format!("{clip:.5e}").parse().unwrap_or(clip)
    });
    // The step statistics go under `trace_steps` (a probe in the same report keeps `probe`).
    crate::doctor::analyse_recorded_steps(steps, max_norm, false, TRACE_FACTS, r);
    nonfinite(trace, r);
    if let Some(line) = &trace.ended_by {
        let oom = line.to_ascii_lowercase().contains("out of memory");
        let killed = line.trim() == "Killed" || line.contains("Killed");
        r.add(
            "F13",
            Severity::Error,
            if oom {
                "the run ended out of device memory"
            } else if killed {
                "the run was killed (the shell's `Killed`: usually the OOM killer, out of host memory)"
            } else {
                "the run ended with an error"
            },
            format!("the log's last words after its last step ({}): {}", trace.steps.last().map_or(0, |s| s.step), line.trim()),
            if oom || killed {
                "lower training.batch_size (raise gradient_accumulation_steps to keep the effective batch), use bf16 and gradient checkpointing, or fewer workers for host memory; `lorahost doctor --config` predicts the peak memory; lorahost skips a micro-batch that does not fit and makes them smaller instead of dying"
            } else {
                "see the traceback in the log"
            },
        );
    }
    let finite: Vec<(u64, f64)> =
        steps.iter().filter(|s| s.loss.is_finite() && s.loss > 0.0).map(|s| (s.step, s.loss)).collect();
    let noise = fluctuation(trace, &finite, given_norm, r);
    header_checks(trace, r);
    progress(&finite, noise, r);
    spikes(steps, noise.unwrap_or(0.0), r);
    slowdown(steps, r);
    validation_checks(trace, &finite, validation, r);
    r.facts.insert(
        "trace".into(),
        serde_json::json!({
            "format": trace.format.describe(), "steps": steps.len(), "header": trace.run,
            "validation_points": validation.len(), "relative_step_noise": noise,
            "warnings": trace.warnings,
        }),
    );
}

/// F21: steps whose loss or logged gradient norm is NaN or infinite (and the steps lorahost's
/// trainer skipped as such), with the first one; a Hugging Face log's zero losses after it
/// are its NaN filter's.
fn nonfinite(trace: &Trace, r: &mut Report) {
    let skipped_by_trainer =
        |s: &StepRecord| s.action.as_deref() == Some("skip") && s.decided_by.is_none() && s.reason.is_some();
    let mut at: Vec<u64> = trace
        .steps
        .iter()
        .filter(|s| !s.loss.is_finite() || (trace.format == TraceFormat::Lorahost && skipped_by_trainer(s)))
        .map(|s| s.step)
        .collect();
    at.extend(trace.nonfinite_grad_steps.iter().copied());
    at.sort_unstable();
    at.dedup();
    let Some(&first) = at.first() else { return };
    let listed: Vec<String> = at.iter().take(8).map(u64::to_string).collect();
    let mut evidence = format!(
        "{} of {} logged steps: {}{}",
        at.len(),
        trace.steps.len().max(at.len()),
        listed.join(", "),
        if at.len() > 8 { ", ..." } else { "" }
    );
    let zeros = trace.steps.iter().filter(|s| s.step > first && s.loss == 0.0).count();
    if trace.hf_trainer && zeros > 0 {
        evidence.push_str(&format!(
            "; after it the Trainer logged a loss of exactly 0 at {zeros} point(s): its logging_nan_inf_filter leaves non-finite losses out of the logged mean, so from step {first} on the run trained on NaN (the weights it saved after that are NaN)"
        ));
    }
    let fix = if trace.format == TraceFormat::Lorahost {
        "lorahost skipped those steps (the weights stay finite): see nonfinite_batches.jsonl in the run's folder for their image ids; check degenerate annotations (zero-area boxes, empty masks); lower the LR".to_string()
    } else {
        format!(
            "resume from a checkpoint saved before step {first} with a lower learning_rate, a warmup and clipping (max_grad_norm: 1.0); with fp16, use bf16 or a loss scaler; check the batches around step {first} for degenerate annotations (zero-area boxes, empty masks); lorahost skips such steps and names their images"
        )
    };
    r.add(
        "F21",
        Severity::Error,
        format!("non-finite loss or gradients at {} logged step(s), the first at step {first}", at.len()),
        evidence,
        fix,
    );
}

/// Whether the log shows a run without warmup: its first LR was already near the peak at
/// step 1 or 2, or at a later first logged step that is under 1% of the run (a warmup, if
/// any, shorter than that). Its description when so.
fn no_warmup(steps: &[StepRecord]) -> Option<String> {
    let peak = lrs(steps).into_iter().fold(0.0, f64::max);
    let first = steps.iter().find(|s| s.lr.is_finite())?;
    let last = steps.last()?.step;
    if peak <= 0.0 || first.lr < 0.9 * peak {
        return None;
    }
    if first.step <= 2 {
        Some("no warmup (the first step ran at the peak LR)".into())
    } else if first.step * 100 <= last {
        Some(format!(
            "no warmup, or one shorter than {} steps ({:.1}% of the run): the LR was at its peak by the first logged step, {}",
            first.step,
            100.0 * first.step as f64 / last as f64,
            first.step
        ))
    } else {
        None
    }
}

/// The LR logged at `step` (None if that step has no record with one).
fn lr_at(steps: &[StepRecord], step: u64) -> Option<f64> {
    steps.iter().find(|s| s.step == step).map(|s| s.lr).filter(|l| l.is_finite())
}

/// The samples per optimizer step, from the header or the steps.
fn effective_batch(trace: &Trace) -> Option<u32> {
    let h = trace.run.as_ref();
    h.map(|h| h.effective_batch_size)
        .filter(|b| *b > 0)
        .or_else(|| h.map(|h| h.batch_size * h.accumulation.max(1)).filter(|b| *b > 0))
        .or_else(|| {
            let b: Vec<f64> = trace.steps.iter().filter_map(|s| s.batch_size).map(f64::from).collect();
            (!b.is_empty()).then(|| median(&b) as u32)
        })
}

/// The LRs applied, in step order (finite ones).
fn lrs(steps: &[StepRecord]) -> Vec<f64> {
    steps.iter().map(|s| s.lr).filter(|l| l.is_finite()).collect()
}

/// F10: the relative noise of the loss from one logged point to the next and its causes in the
/// log. Returns that noise (1.4826 × the median of |lₜ − lₜ₋₁| / mean(lₜ, lₜ₋₁), over √2).
/// A log whose points are each the mean over the steps since the previous one (the Hugging
/// Face Trainer's, every `logging_steps`) has 1/√n of one step's noise for n steps a point:
/// the finding is about the steps (×√n), the returned noise about the points (what the other
/// checks compare).
fn fluctuation(trace: &Trace, finite: &[(u64, f64)], max_norm: Option<f64>, r: &mut Report) -> Option<f64> {
    if finite.len() < 8 {
        return None;
    }
    // Second differences of the log loss: a level that moves smoothly (a falling trend, however
    // steep) cancels out, independent noise of relative size σ per point leaves a spread of
    // √6·σ (centred on zero, so taken about zero: a two-valued series has no spread about its
    // median).
    let logs: Vec<f64> = finite.iter().map(|p| p.1.ln()).collect();
    let second: Vec<f64> = logs.windows(3).map(|w| (w[2] - 2.0 * w[1] + w[0]).abs()).collect();
    let noise = 1.4826 * median(&second) / 6f64.sqrt();
    // The logging interval: the median step gap between points.
    let gaps: Vec<f64> = finite.windows(2).map(|w| w[1].0.saturating_sub(w[0].0) as f64).collect();
    let every = median(&gaps).max(1.0).round();
    let averaged = trace.loss_is_interval_mean && every > 1.0;
    let per_step = if averaged { noise * every.sqrt() } else { noise };
    if per_step < 0.05 {
        return Some(noise);
    }
    let steps = &trace.steps;
    let mut causes = Vec::new();
    let mut fixes = Vec::new();
    let batch = effective_batch(trace);
    // trainer_state.json has the per-step batch but not the gradient accumulation.
    let accumulation_unknown = trace.hf_trainer
        && trace.run.as_ref().is_none_or(|h| h.accumulation <= 1)
        && trace.max_grad_norm.is_none();
    if let Some(b) = batch.filter(|b| *b < 16) {
        let k = 16u32.div_ceil(b.max(1));
        let accumulation = if accumulation_unknown {
            causes.push(format!(
                "a batch of {b} sample(s) per step (train_batch_size; trainer_state.json does not record gradient_accumulation_steps, so this is the effective batch if that was 1)"
            ));
            format!("gradient_accumulation_steps: {k}× what it was")
        } else {
            causes.push(format!("an effective batch of {b} sample(s) per optimizer step"));
            match trace.run.as_ref().filter(|h| h.accumulation > 0) {
                Some(h) => {
                    format!("gradient_accumulation_steps: {} (now {})", h.accumulation * k, h.accumulation)
                }
                None => format!("{k}× the gradient accumulation"),
            }
        };
        fixes.push(format!(
            "{accumulation}, for an effective batch of {}: the noise falls about as 1/√batch, to ~{:.0}%",
            b * k,
            100.0 * per_step / (k as f64).sqrt()
        ));
    }
    let lr = lrs(steps);
    let warmup = trace.run.as_ref().map(|h| h.warmup_steps);
    if let Some(none) = no_warmup(steps) {
        causes.push(match warmup {
            Some(w) if w > 0 && steps.first().is_some_and(|s| s.step <= 2) => {
                format!("no LR ramp at the start although the header says warmup_steps {w}")
            }
            _ => none,
        });
        fixes.push("warmup_steps: about 5% of the run".into());
    }
    let norms: Vec<f64> = steps.iter().map(|s| s.grad_norm).filter(|g| g.is_finite() && *g > 0.0).collect();
    let clipped = steps.iter().any(|s| s.grad_norm_clipped.is_some_and(|c| c < s.grad_norm * 0.999));
    // Whether the run clipped, when its settings say (a threshold of 0 is no clipping). Else:
    // the Hugging Face Trainer clips (max_grad_norm 1.0 unless set otherwise) and logs the
    // norm before clipping, nothing after, so its logs cannot show whether it clipped.
    let clipping_known_on = match max_norm.or(trace.max_grad_norm) {
        Some(m) => m > 0.0,
        None => trace.hf_trainer,
    };
    if !clipped && !clipping_known_on && norms.len() >= 8 {
        let mut sorted = norms.clone();
        sorted.sort_by(f64::total_cmp);
        let (p10, p90) = (sorted[sorted.len() / 10], sorted[sorted.len() * 9 / 10]);
        if p90 > 1.5 * p10 {
            causes.push(format!("no clipping while the gradient norm ranges {p10:.3}..{p90:.3} (p10..p90)"));
            fixes.push(format!("max_grad_norm: {:.2} (the median norm) or 1.0", median(&norms)));
        }
    }
    if lr.len() >= 8 && lr.iter().all(|l| (l - lr[0]).abs() <= 1e-12 * lr[0].abs().max(1e-30)) {
        causes.push("a constant LR over the whole run".into());
        fixes.push("lr_scheduler: cosine".into());
    }
    // Step-to-step changes of the two (logs), so a trend both share does not count.
    let logged: Vec<(f64, f64)> = steps
        .iter()
        .filter(|s| s.loss.is_finite() && s.loss > 0.0 && s.grad_norm.is_finite() && s.grad_norm > 0.0)
        .map(|s| (s.loss.ln(), s.grad_norm.ln()))
        .collect();
    let pairs: Vec<(f64, f64)> = logged.windows(2).map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1)).collect();
    let corr = correlation(&pairs);
    let with_norm = if corr > 0.7 {
        format!("; the gradient norm moves with the loss (r = {corr:.2}): high-loss batches make large steps, so the fluctuation is batch-to-batch difficulty that a larger effective batch averages out")
    } else {
        String::new()
    };
    if trace.format == TraceFormat::Sam3LoraEvents {
        causes.push("SAM3_LoRA's raw per-batch total (6 layers × one-to-one and one-to-many terms, divided by the batch's few boxes)".into());
    }
    let severity = if per_step >= 0.1 { Severity::Warning } else { Severity::Info };
    let shown = if causes.is_empty() {
        String::new()
    } else {
        format!(", and the log shows {} cause(s) of it", causes.len())
    };
    let message = if averaged {
        format!(
            "the loss moves by about {:.0}% from one step to the next (the log's points, each the mean of the {every} steps since the previous one, by {:.0}%){shown}",
            100.0 * per_step,
            100.0 * noise
        )
    } else if every > 1.0 {
        format!("the loss moves by about {:.0}% from one logged step to the next (logged every {every} steps){shown}", 100.0 * noise)
    } else {
        format!("the loss moves by about {:.0}% from one step to the next{shown}", 100.0 * noise)
    };
    let per_step_note = if averaged {
        format!(" (each point the mean of {every} steps: ×√{every} = {per_step:.3} for single steps, if they vary independently)")
    } else {
        String::new()
    };
    let evidence = format!(
        "robust spread of the relative differences between {} logged points{}: {:.3}{per_step_note}{with_norm}{}",
        finite.len(),
        if every > 1.0 { format!(" (every {every} steps)") } else { String::new() },
        noise,
        if causes.is_empty() { String::new() } else { format!("; causes: {}", causes.join("; ")) }
    );
    if fixes.is_empty() {
        fixes.push(
            "judge progress on the smoothed curve (loss_curve.png) and the validation loss, not single steps"
                .into(),
        );
    }
    r.add("F10", severity, message, evidence, fixes.join("; "));
    Some(noise)
}

/// F11: what the header says was set against what the steps show.
fn header_checks(trace: &Trace, r: &mut Report) {
    // Each header against the steps it governs (a run resumed with other settings writes a
    // new one: its LR is not the earlier steps').
    let segments: Vec<(&crate::metrics::RunHeader, Vec<StepRecord>)> = if trace.segments.is_empty() {
        trace.run.iter().map(|h| (h, trace.steps.clone())).collect()
    } else {
        trace
            .segments
            .iter()
            .enumerate()
            .map(|(i, seg)| {
                let end = trace.segments.get(i + 1).map_or(u64::MAX, |next| next.from_step);
                let steps =
                    trace.steps.iter().filter(|s| (seg.from_step..end).contains(&s.step)).cloned().collect();
                (&seg.header, steps)
            })
            .collect()
    };
    for (h, steps) in segments {
        let mut found = Report::default();
        segment_checks(h, &steps, &mut found);
        for f in found.findings {
            if !r.findings.iter().any(|g| g.code == f.code && g.message == f.message) {
                r.findings.push(f);
            }
        }
    }
}

/// [`header_checks`] of one header and its steps.
fn segment_checks(h: &crate::metrics::RunHeader, steps: &[StepRecord], r: &mut Report) {
    let lr = lrs(steps);
    let peak = lr.iter().copied().fold(0.0, f64::max);
    let w = h.warmup_steps as usize;
    // The LRs at steps 1 and w as logged (a log every few steps may have neither).
    if let (true, Some(l1), Some(lw)) = (w >= 2 && peak > 0.0, lr_at(steps, 1), lr_at(steps, w as u64)) {
        if l1 >= 0.99 * lw && lr.len() > w {
            r.add(
                "F11",
                Severity::Warning,
                format!("warmup_steps {w} is in the run's header, but the LR did not ramp up"),
                format!("LR at step 1: {l1:e}, at step {w}: {lw:e}"),
                "the trainer parsed warmup but never applied it (SAM3_LoRA's trainer does this): train with one that applies it (lorahost does)",
            );
        }
    }
    let micro: Vec<u32> = steps.iter().filter_map(|s| s.micro_steps).collect();
    if h.accumulation > 1 && !micro.is_empty() && micro.iter().all(|m| *m == 1) {
        r.add(
            "F11",
            Severity::Warning,
            format!(
                "gradient accumulation {} is in the header, but every step ran one micro-batch",
                h.accumulation
            ),
            format!("{} steps, all with micro_steps 1", micro.len()),
            "the setting was not applied: the effective batch is the micro-batch alone",
        );
    }
    let sched = h.scheduler.to_ascii_lowercase();
    let after: Vec<f64> =
        steps.iter().filter(|s| s.step > w as u64).map(|s| s.lr).filter(|l| l.is_finite()).collect();
    if !sched.is_empty()
        && !sched.contains("constant")
        && after.len() >= 8
        && after.iter().all(|l| (l - after[0]).abs() <= 1e-9 * after[0].abs().max(1e-30))
    {
        {
            r.add(
                "F11",
                Severity::Warning,
                format!(
                    "the header names the {} scheduler, but the LR stayed at {:e} after warmup",
                    h.scheduler, after[0]
                ),
                format!("{} steps after warmup at one LR", after.len()),
                "the scheduler was not applied",
            );
        }
    }
    if h.base_lr > 0.0 && peak > 0.0 && (peak / h.base_lr > 2.0 || h.base_lr / peak > 2.0) {
        r.add(
            "F11",
            Severity::Warning,
            format!("the LR applied peaks at {peak:e}, the header's base LR is {:e}", h.base_lr),
            format!("{} steps with an LR", lr.len()),
            "check how the LR reaches the optimizer (a string \"1e-4\" in YAML, a scale applied twice)",
        );
    }
}

/// D10: whether the loss improves beneath its noise (first against last quarter, trimmed means).
fn progress(finite: &[(u64, f64)], noise: Option<f64>, r: &mut Report) {
    let n = finite.len();
    if n < 20 {
        return;
    }
    let m = n / 4;
    let first = trimmed_mean(finite[..m].iter().map(|p| p.1).collect());
    let last = trimmed_mean(finite[n - m..].iter().map(|p| p.1).collect());
    let change = last / first - 1.0;
    // The standard error of a quarter's trimmed mean (≈1.2 σ/√m), three times, for the ratio.
    let tolerance = (3.0 * 1.2 * noise.unwrap_or(0.0) * (2.0 / m as f64).sqrt()).max(0.02);
    let evidence = format!(
        "mean loss {first:.4} over steps {}..{} and {last:.4} over steps {}..{} (20% trimmed; {:+.1}%; the noise allows ±{:.1}%)",
        finite[0].0,
        finite[m - 1].0,
        finite[n - m].0,
        finite[n - 1].0,
        100.0 * change,
        100.0 * tolerance
    );
    if change > tolerance {
        r.add(
            "D10",
            Severity::Warning,
            "the loss rose over the run: training is diverging",
            evidence,
            "lower the learning rate (and warm up, clip): `lorahost lr-find --config C.yaml` measures where the loss stops falling on your data; look for the step where it turned (D11 spikes)",
        );
    } else if change.abs() <= tolerance && n >= 50 {
        r.add(
            "D10",
            Severity::Warning,
            "no measurable improvement: the loss ends where it started, within its noise",
            evidence,
            "check that the adapters get gradients (F9) and the LR is not ~0; a larger LR (`lorahost lr-find --config C.yaml` measures the range on your data) or more epochs; check the data reaches the loss (doctor without --trace)",
        );
    } else {
        r.add(
            "D10",
            Severity::Info,
            format!(
                "the loss fell {:.0}% from the first to the last quarter of the run, beyond its noise",
                -100.0 * change
            ),
            evidence,
            "none needed",
        );
    }
}

/// D11: steps far above their recent median (more than six times the local or the run's
/// step noise, and at least 1.5×).
fn spikes(steps: &[StepRecord], noise: f64, r: &mut Report) {
    const WINDOW: usize = 20;
    let finite: Vec<&StepRecord> = steps.iter().filter(|s| s.loss.is_finite() && s.loss > 0.0).collect();
    if finite.len() < 12 {
        return;
    }
    let peak_lr = lrs(steps).into_iter().fold(0.0, f64::max);
    let mut found: Vec<(u64, f64, f64, bool)> = Vec::new();
    for i in 8..finite.len() {
        let prev: Vec<f64> = finite[i.saturating_sub(WINDOW)..i].iter().map(|s| s.loss.ln()).collect();
        let base = median(&prev);
        let spread = robust_sd(&prev).max(noise).max(0.02);
        let x = finite[i].loss.ln();
        if x - base > (6.0 * spread).max(0.5f64.ln_1p()) {
            let at_peak = peak_lr > 0.0 && finite[i].lr >= 0.95 * peak_lr;
            found.push((finite[i].step, finite[i].loss, base.exp(), at_peak));
        }
    }
    if found.is_empty() {
        return;
    }
    let listed: Vec<String> = found
        .iter()
        .take(5)
        .map(|(s, l, b, _)| format!("step {s}: {l:.4} against a recent median {b:.4} ({:.1}×)", l / b))
        .collect();
    let at_peak = found.iter().filter(|f| f.3).count();
    let no_warmup = no_warmup(steps).is_some();
    let mut fix = "load the spike_guard plugin (skips a step whose loss or gradient norm jumps); keep clipping on (max_grad_norm)".to_string();
    if no_warmup && at_peak > 0 {
        fix.push_str("; warm up: the spikes came at the peak LR from the first step");
    }
    r.add(
        "D11",
        if found.len() * 20 > finite.len() { Severity::Warning } else { Severity::Info },
        format!("{} loss spike(s): steps far above their recent median", found.len()),
        format!(
            "{}{}; {at_peak} at the peak LR",
            listed.join("; "),
            if found.len() > 5 { "; ..." } else { "" }
        ),
        fix,
    );
}

/// F14: steps several times slower than the run's first ones, found as training finds them
/// ([`crate::train::slowdown::SlowdownWatch`]: the median of the last few steps against the
/// first steps' median); the worst one reported.
fn slowdown(steps: &[StepRecord], r: &mut Report) {
    let mut watch = crate::train::slowdown::SlowdownWatch::default();
    let mut first: Option<u64> = None;
    let mut worst: Option<(u64, crate::train::slowdown::Slowdown)> = None;
    for s in steps {
        let Some(t) = s.step_time_ms else { continue };
        if let Some(found) = watch.observe(t) {
            first.get_or_insert(s.step);
            worst = Some((s.step, found));
        }
    }
    let (Some(from), Some((at, s))) = (first, worst) else { return };
    // Steps of a few milliseconds (a log's wall clock at its resolution, a toy run) say
    // nothing about memory spilling.
    if s.recent_ms < 50.0 {
        return;
    }
    r.add(
        "F14",
        Severity::Warning,
        format!("steps became {:.1}× slower over the run", s.factor()),
        format!(
            "median step {:.0} ms over the first steps, {:.0} ms by step {at} (first past {}× at step {from})",
            s.baseline_ms,
            s.recent_ms,
            crate::train::slowdown::FACTOR
        ),
        "device memory spilling into shared host memory (Windows WDDM) or a memory leak: check the peak memory per step against the card, lower the batch, or enable gradient checkpointing",
    );
}

/// F15 and F27 from the validation losses.
fn validation_checks(trace: &Trace, finite: &[(u64, f64)], validation: &[(u64, f64)], r: &mut Report) {
    let Some(&(last_at, last_val)) = validation.last() else { return };
    // The training loss around a step: the median of up to 20 steps up to it.
    let train_at = |at: u64| -> Option<f64> {
        let upto: Vec<f64> = finite.iter().filter(|p| p.0 <= at).rev().take(20).map(|p| p.1).collect();
        (!upto.is_empty()).then(|| median(&upto))
    };
    if trace.format != TraceFormat::Lorahost {
        if let Some(t) = train_at(last_at).filter(|t| *t > 5.0 * last_val) {
            r.add(
                "F15",
                Severity::Info,
                format!("the training loss is {:.0}× the validation loss", t / last_val),
                format!("training {t:.4} (median of the steps up to {last_at}) against validation {last_val:.4}"),
                "SAM3_LoRA's validation runs in eval mode, which drops the auxiliary layers and the one-to-many terms: the two are not comparable (lorahost computes both with the same terms)",
            );
        }
    }
    if validation.len() < 3 {
        return;
    }
    let (best_at, best) =
        validation.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((last_at, last_val));
    if best_at < last_at && last_val > 1.1 * best {
        let train_falls = matches!((train_at(best_at), train_at(last_at)), (Some(a), Some(b)) if b < a);
        r.add(
            "F27",
            Severity::Warning,
            format!(
                "the validation loss rose {:.0}% since its best at step {best_at}{}",
                100.0 * (last_val / best - 1.0),
                if train_falls { " while the training loss kept falling: over-training" } else { "" }
            ),
            format!(
                "validation {}",
                validation.iter().map(|(s, v)| format!("{s}: {v:.4}")).collect::<Vec<_>>().join(", ")
            ),
            "keep the best checkpoint (evaluation.metric: loss), stop early (the early_stopping plugin), fewer epochs or more data",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(header: &str, steps: &[String]) -> Trace {
        let mut text = String::new();
        if !header.is_empty() {
            text.push_str(&format!("{{\"run\": {header}}}\n"));
        }
        for s in steps {
            text.push_str(s);
            text.push('\n');
        }
        Trace::parse(&text, Path::new("t.jsonl")).unwrap()
    }

    fn codes(r: &Report) -> Vec<(String, Severity)> {
        r.findings.iter().map(|f| (f.code.clone(), f.severity)).collect()
    }

    /// splitmix64 in [0, 1).
    fn uniform(seed: u64) -> f64 {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The diagnosed run (the shipped trace): ±15% step noise with the catalogue's causes,
    /// each named with its fix; the gradient norm moving with the loss.
    #[test]
    fn the_diagnosis_trace_gets_its_causes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/traces/diagnosis.jsonl");
        let t = Trace::read(&path).unwrap();
        let mut r = Report::default();
        analyse_run(&t, &validations(&path, &t), None, &mut r);
        let f10 = r.with_code("F10");
        assert_eq!(f10.len(), 1, "{}", r.to_text());
        let f = f10[0];
        assert_eq!(f.severity, Severity::Warning, "{}", r.to_text());
        for cause in
            ["effective batch of 1", "no warmup", "no clipping", "constant LR", "moves with the loss"]
        {
            assert!(f.evidence.contains(cause), "{cause}: {}", f.evidence);
        }
        assert!(
            f.fix.contains("gradient_accumulation_steps: 16") && f.fix.contains("max_grad_norm"),
            "{}",
            f.fix
        );
    }

    /// A Hugging Face log every 10 steps, each point the mean of 10 steps whose loss varies by
    /// 20%: the points vary by ~6%, the finding is about the steps (~20%, a warning); the same
    /// points as single logged steps (another format) are reported as they are (~6%, info).
    #[test]
    fn interval_means_are_scaled_back_to_single_steps() {
        let gauss = |i: u64| {
            let (u, v) = (uniform(2 * i).max(1e-12), uniform(2 * i + 1));
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        };
        let mut history = Vec::new();
        let mut jsonl = Vec::new();
        for p in 1..=200u64 {
            let mean = (0..10).map(|k| 10.0 * (1.0 + 0.2 * gauss(p * 10 + k))).sum::<f64>() / 10.0;
            let step = p * 10;
            history.push(serde_json::json!({"step": step, "loss": mean, "learning_rate": 1e-4, "epoch": step as f64 / 100.0}));
            jsonl.push(format!(r#"{{"step": {step}, "loss": {mean}, "lr": 0.0001, "grad_norm": 1.0}}"#));
        }
        let state = serde_json::json!({"log_history": history, "max_steps": 2000, "train_batch_size": 4});
        let hf = Trace::parse(&state.to_string(), Path::new("trainer_state.json")).unwrap();
        assert!(hf.loss_is_interval_mean);
        let mut r = Report::default();
        analyse_run(&hf, &[], None, &mut r);
        let f = r.with_code("F10")[0].clone();
        assert_eq!(f.severity, Severity::Warning, "{}", r.to_text());
        let per_step: f64 =
            f.message.split("about ").nth(1).unwrap().split('%').next().unwrap().parse().unwrap();
        assert!((15.0..=26.0).contains(&per_step), "{}", f.message);
        assert!(f.message.contains("mean of the 10 steps"), "{}", f.message);
        assert!(f.evidence.contains("does not record gradient_accumulation_steps"), "{}", f.evidence);
        assert!(f.fix.contains("gradient_accumulation_steps: 4× what it was"), "{}", f.fix);
        let plain = trace("", &jsonl);
        assert!(!plain.loss_is_interval_mean);
        let mut r = Report::default();
        analyse_run(&plain, &[], None, &mut r);
        let f = r.with_code("F10")[0].clone();
        assert_eq!(f.severity, Severity::Info, "{}", r.to_text());
        let points: f64 =
            f.message.split("about ").nth(1).unwrap().split('%').next().unwrap().parse().unwrap();
        assert!(
            (4.0..=9.0).contains(&points) && f.message.contains("logged every 10 steps"),
            "{}",
            f.message
        );
    }

    /// A smooth falling curve is not "fluctuating" (its trend is not noise), improves (D10
    /// info), and has no spikes.
    #[test]
    fn a_smooth_falling_loss_is_improvement_not_noise() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/traces/smooth.jsonl");
        let t = Trace::read(&path).unwrap();
        let mut r = Report::default();
        analyse_run(&t, &[], None, &mut r);
        assert!(r.with_code("F10").is_empty() && r.with_code("D11").is_empty(), "{}", r.to_text());
        assert!(r.with_code("F11").is_empty(), "{}", r.to_text());
        let d10 = r.with_code("D10");
        assert_eq!(d10.len(), 1);
        assert_eq!(d10[0].severity, Severity::Info, "{}", r.to_text());
    }

    /// A falling curve logged as interval means every 50 steps (the Hugging Face Trainer's),
    /// without noise: its trend is not step noise (×√50 would make it a large one), and the
    /// gradient norm falling with it is no batch-to-batch difficulty. Steps of a few
    /// milliseconds that get slower are no F14.
    #[test]
    fn a_steep_trend_logged_sparsely_is_not_noise_and_tiny_steps_are_not_slow() {
        let history: Vec<serde_json::Value> = (1..=20u64)
            .map(|p| {
                let step = p * 50;
                let loss = 1.0 + 2.0 * (-(step as f64) / 300.0).exp();
                serde_json::json!({"step": step, "loss": loss, "grad_norm": 3.0 * loss, "learning_rate": 1e-3, "epoch": p as f64 / 2.0})
            })
            .collect();
        let state = serde_json::json!({"log_history": history, "max_steps": 1000, "train_batch_size": 4});
        let t = Trace::parse(&state.to_string(), Path::new("trainer_state.json")).unwrap();
        let mut r = Report::default();
        analyse_run(&t, &[], None, &mut r);
        assert!(r.with_code("F10").is_empty(), "{}", r.to_text());
        assert_eq!(r.with_code("D10").len(), 1, "{}", r.to_text());
        let steps: Vec<String> = (1..=200)
            .map(|s| {
                format!(
                    r#"{{"step": {s}, "loss": {}, "lr": 0.0001, "step_time_ms": {}}}"#,
                    10.0 - 0.01 * s as f64,
                    if s > 100 { 8.0 } else { 1.0 }
                )
            })
            .collect();
        let mut r = Report::default();
        analyse_run(&trace("", &steps), &[], None, &mut r);
        assert!(r.with_code("F14").is_empty(), "{}", r.to_text());
    }

    /// A run resumed with a lower learning_rate writes a new header: each header is held
    /// against its own steps (no "the LR applied peaks at 3e-3, the header's is 1e-3"); a header
    /// whose steps ran at a third of its LR still is F11.
    #[test]
    fn each_header_is_checked_against_its_own_steps() {
        let header = |lr: f64| {
            format!(r#"{{"run": {{"total_steps": 40, "base_lr": {lr}, "scheduler": "constant"}}}}"#)
        };
        let step =
            |s: u64, lr: f64| format!(r#"{{"step": {s}, "loss": {}, "lr": {lr}}}"#, 10.0 - 0.1 * s as f64);
        let mut lines = vec![header(3e-3)];
        lines.extend((1..=20).map(|s| step(s, 3e-3)));
        lines.push(header(1e-3));
        lines.extend((21..=40).map(|s| step(s, 1e-3)));
        let mut r = Report::default();
        analyse_run(&trace("", &lines), &[], None, &mut r);
        assert!(r.with_code("F11").is_empty(), "{}", r.to_text());
        let last = lines.len() - 1;
        lines[last] = step(40, 3e-3);
        lines[21] = header(1e-3);
        for (i, s) in (21..=40).enumerate() {
            lines[22 + i] = step(s, 3e-3);
        }
        let mut r = Report::default();
        analyse_run(&trace("", &lines), &[], None, &mut r);
        let f11 = r.with_code("F11");
        assert!(f11.len() == 1 && f11[0].message.contains("base LR is 1e-3"), "{}", r.to_text());
    }

    /// A log that says how its run ended early (a console log's CUDA out-of-memory error, the
    /// shell's `Killed`) is F13 with that line; one that does not, none.
    #[test]
    fn a_log_that_ends_out_of_memory_or_killed_is_f13() {
        let steps: Vec<String> = (1..=20)
            .map(|s| format!(r#"{{"step": {s}, "loss": {}, "lr": 0.0001}}"#, 10.0 - 0.1 * s as f64))
            .collect();
        let mut t = trace("", &steps);
        let mut r = Report::default();
        analyse_run(&t, &[], None, &mut r);
        assert!(r.with_code("F13").is_empty(), "{}", r.to_text());
        for (line, want) in [
            (
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
                "out of device memory",
            ),
            ("Killed", "killed"),
        ] {
            t.ended_by = Some(line.into());
            let mut r = Report::default();
            analyse_run(&t, &[], None, &mut r);
            let f13 = r.with_code("F13");
            assert!(f13.len() == 1 && f13[0].message.contains(want), "{}", r.to_text());
            assert!(
                f13[0].evidence.contains("step (20)") && f13[0].evidence.contains(line),
                "{}",
                f13[0].evidence
            );
        }
    }

    /// Settings in the header that the steps do not show are F11; a flat noisy loss is D10
    /// "no improvement"; a rising one "diverging"; one big jump is a D11 spike at the peak LR.
    #[test]
    fn unapplied_settings_stalls_divergence_and_spikes() {
        let header = r#"{"total_steps": 60, "warmup_steps": 10, "accumulation": 4, "batch_size": 2, "effective_batch_size": 8, "base_lr": 0.0001, "scheduler": "cosine"}"#;
        let steps: Vec<String> = (1..=60)
            .map(|s| {
                let loss = 100.0 * (1.0 + 0.2 * (uniform(s) - 0.5)) * if s == 40 { 4.0 } else { 1.0 };
                format!(
                    r#"{{"step": {s}, "loss": {loss}, "lr": 0.0001, "grad_norm": 1.0, "micro_steps": 1}}"#
                )
            })
            .collect();
        let t = trace(header, &steps);
        let mut r = Report::default();
        analyse_run(&t, &[], None, &mut r);
        let text = r.to_text();
        let f11: Vec<&str> = r.with_code("F11").iter().map(|f| f.message.as_str()).collect();
        assert_eq!(f11.len(), 3, "{text}");
        assert!(f11.iter().any(|m| m.contains("warmup_steps 10")), "{text}");
        assert!(f11.iter().any(|m| m.contains("accumulation 4")), "{text}");
        assert!(f11.iter().any(|m| m.contains("cosine")), "{text}");
        assert!(r.with_code("D10")[0].message.contains("no measurable improvement"), "{text}");
        let d11 = r.with_code("D11");
        assert!(d11.len() == 1 && d11[0].evidence.starts_with("step 40:"), "{text}");
        assert!(d11[0].fix.contains("warm up"), "{text}");
        // Rising by half over the run: diverging.
        let steps: Vec<String> = (1..=60)
            .map(|s| {
                format!(
                    r#"{{"step": {s}, "loss": {}, "lr": 0.0001}}"#,
                    100.0 + s as f64 * (1.0 + 0.1 * uniform(s))
                )
            })
            .collect();
        let mut r = Report::default();
        analyse_run(&trace("", &steps), &[], None, &mut r);
        assert!(r.with_code("D10")[0].message.contains("diverging"), "{}", r.to_text());
        assert!(codes(&r).iter().all(|(c, _)| c != "F11"));
    }

    /// A validation loss that turns up while training falls is F27; a SAM3_LoRA log whose
    /// training loss is 10× its validation loss is F15; slower and slower steps are F14.
    #[test]
    fn over_training_incomparable_losses_and_slowdown() {
        let steps: Vec<String> = (1..=40)
            .map(|s| {
                format!(
                    r#"{{"step": {s}, "loss": {}, "lr": 0.0001, "step_time_ms": {}}}"#,
                    200.0 - 3.0 * s as f64,
                    if s > 30 { 4000.0 } else { 1000.0 }
                )
            })
            .collect();
        let t = trace("", &steps);
        let val = [(10, 12.0), (20, 10.0), (30, 11.0), (40, 13.5)];
        let mut r = Report::default();
        analyse_run(&t, &val, None, &mut r);
        let text = r.to_text();
        let f27 = r.with_code("F27");
        assert!(
            f27.len() == 1 && f27[0].message.contains("best at step 20 while the training loss kept falling"),
            "{text}"
        );
        assert!(r.with_code("F15").is_empty(), "lorahost's own validation has the same terms: {text}");
        assert!(r.with_code("F14").len() == 1 && r.with_code("F14")[0].message.contains("4.0×"), "{text}");
        let mut sam = t.clone();
        sam.format = TraceFormat::Sam3LoraEvents;
        let mut r = Report::default();
        analyse_run(&sam, &val, None, &mut r);
        assert!(
            r.with_code("F15").first().is_some_and(|f| f.message.contains("training loss is 8×")),
            "{}",
            r.to_text()
        );
    }

    /// lorahost's own validation events are read from the file, beside the steps.
    #[test]
    fn validation_events_are_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"step\": 1, \"loss\": 3.0}\n{\"event\": \"validation\", \"step\": 1, \"loss\": 2.5}\n{\"step\": 2, \"loss\": 2.0}\n",
        )
        .unwrap();
        let t = Trace::read(&p).unwrap();
        assert_eq!(validations(&p, &t), vec![(1, 2.5)]);
    }
}
