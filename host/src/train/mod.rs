//! The training loop: `lorahost train`.
//!
//! What one optimizer step does, in order (units: a *micro-batch* is one forward/backward pass
//! of `batch_size` images; a *step* is one optimizer update after `gradient_accumulation_steps`
//! micro-batches; every cadence, warmup and schedule counts steps, 1-based):
//!
//! 1. for each micro-batch: the sampling hook may pick its images (`next-batch`), else they
//!    come from the epoch order (the plugin's `epoch-order` or a seeded shuffle); samples are
//!    built on `num_workers` threads; dropout is reseeded from (seed, step, micro-step); the
//!    forward pass runs in training mode with DAC (one-to-many) queries; Meta's loss is computed,
//!    the loss-weights hook may rescale its terms; backward; gradients are accumulated;
//!    `observe` tells samplers each image's loss;
//! 2. gradients are averaged over the micro-batches; per-component statistics (L2, max |g|,
//!    non-finite count) go to the grad-inspection hook, which may veto the update;
//! 3. non-finite gradients or loss: the step is skipped and the batch's image ids are dumped to
//!    `nonfinite_batches.jsonl` (fp16: the loss scale halves);
//! 4. global-norm clipping to `max_grad_norm` (norms before and after are logged);
//! 5. the LR: warmup + scheduler, then the LR hook chain, times the product of plugin
//!    `scale-lr` actions so far;
//! 6. AdamW update;
//! 7. the step-metrics hook sees the step; `skip` rolls the update back, `stop` ends the run
//!    (with a checkpoint), `checkpoint` saves one;
//! 8. the metrics line is appended to `metrics.jsonl`; validation and checkpoints follow their
//!    cadences; hot-reloaded plugins are swapped in at the step boundary.

pub mod adamw_cuda;
pub mod checkpoint;
pub mod evaluate;
pub mod interrupt;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod session;
pub mod slowdown;
pub mod stats_cuda;
mod tensorboard;
mod validate;

pub use validate::{validate, ValidationResult, ValidationSet};

use crate::data::batch::{build_sample, collate, Batch, Sample, SampleOptions};
use crate::data::coco::{Dataset, FindingKind, Severity, Split};
use crate::data::synthetic::{write_synthetic, SyntheticSpec};
use crate::data::SplitMix64;
use crate::lora::{Component, LoraConfig, LoraSet};
use crate::loss::{sam3_loss, LossOutput, LossWeights, Targets};
use crate::metrics::{GradGroupRecord, RunHeader, StepRecord};
use crate::plugin::{
    Action, BatchRequest, GradGroup, GradReport, LossTerm, LrRequest, MicroBatchInfo, NamedValue,
    PluginEvent, PluginSet, PluginSpec, RunInfo, Runtime, SampleMeta, StepDecision, StepMetrics,
};
use crate::sam3::model::{ForwardOptions, Sam3Inputs, Sam3Model, Semantics};
use crate::sam3::tokenizer::PromptTokenizer;
use crate::train_config::{Precision, TrainConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use checkpoint::{Best, TrainerState, CONFIG_RECORD};
use optim::{group_stats_many, AdamW, AdamWConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The loss terms plugins can reweight (each scales that term in every decoder layer and branch).
pub const WEIGHTED_TERMS: &[&str] =
    &["loss_ce", "presence_loss", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"];

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// The YAML config.
    pub config: PathBuf,
    /// Plugins from the command line (after the config's).
    pub plugins: Vec<PluginSpec>,
    /// Plugin settings from the command line (`--set`, `--plugin-config`, `--budget-ms`,
    /// `--memory-mb`), applied to the config's plugins and to [`Self::plugins`] alike.
    pub plugin_overrides: crate::plugin::PluginOverrides,
    /// Resume: a checkpoint directory, or the output directory's latest checkpoint.
    pub resume: Option<Resume>,
    /// Stop after this many optimizer steps in total (the schedule still spans the whole run).
    pub max_steps: Option<u64>,
    /// Watch plugin files and swap new versions in.
    pub hot_reload: bool,
    /// Overrides of config keys (`section.key=value`), applied before validation.
    pub overrides: Vec<String>,
    /// Compiled-plugin cache (None: no cache).
    pub cache_dir: Option<PathBuf>,
    /// An LR range test (`lorahost lr-find`) instead of the configured schedule: the LR rises
    /// exponentially over its steps, no plugin is loaded, nothing is validated or saved but the
    /// logs, and the run stops when the loss diverges ([`crate::lr_find`]).
    pub lr_range: Option<crate::lr_find::LrRange>,
}

/// Where to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest checkpoint under `<output_dir>/checkpoints`.
    Latest,
    /// This checkpoint directory.
    Dir(PathBuf),
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    /// Optimizer steps done (in total, counting resumed ones).
    pub steps: u64,
    /// Steps whose update was skipped or rolled back.
    pub skipped_steps: u64,
    /// Final validation, when there is a valid split.
    pub final_validation: Option<ValidationResult>,
    /// First validation loss of the run (before any update when validating at start).
    pub initial_validation_loss: Option<f64>,
    /// Output directory.
    pub output_dir: PathBuf,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// Whether it stopped on Ctrl-C / SIGTERM (see [`interrupt`]).
    pub interrupted: bool,
    /// A resume of a run that had already reached its last step: nothing was trained or written.
    pub already_complete: bool,
    /// It stopped because micro-batches kept running out of device memory
    /// ([`OOM_STOP_AFTER`] in a row); `stopped` says so, with the fix, and a checkpoint of the
    /// last step is saved.
    pub out_of_memory: bool,
}

/// `section.key=value` overrides from the command line as (key, value) pairs, which
/// [`TrainConfig::read`] applies over the file (each replacing the file's other spellings of the
/// same setting). `strict` (training): a key that names no setting is an error; otherwise
/// (doctor) it is kept and reported with the config's other unknown keys.
pub fn parse_overrides(overrides: &[String], strict: bool) -> Result<Vec<(String, serde_yaml::Value)>> {
    let mut out = Vec::with_capacity(overrides.len());
    for o in overrides {
        let (key, value) =
            o.split_once('=').with_context(|| format!("--override {o:?}: expected SECTION.KEY=VALUE"))?;
        let value: serde_yaml::Value = serde_yaml::from_str(value)
            .with_context(|| format!("--override {o:?}: the value is not YAML"))?;
        // A key typed on the command line that matches no setting is a mistake, not a warning.
        let mut alone = serde_yaml::Value::Mapping(Default::default());
        crate::train_config::set_path(&mut alone, key, value.clone());
        if let Some(unknown) = crate::train_config::unknown_keys(&alone).into_iter().next().filter(|_| strict)
        {
            let named = crate::train_config::settings_named(key);
            let hint = if named.is_empty() {
                " (the keys are listed in configs/full_lora_config.yaml)".to_string()
            } else {
                format!("; it needs its section: {}", named.join(" or "))
            };
            bail!("--override {o:?}: {}{hint}", unknown.replace(" ignored", ""));
        }
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// Read, override and validate the config; warnings are logged.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}; pass --config with a training YAML", path.display()))?;
    let overrides = parse_overrides(overrides, true).with_context(|| format!("{}", path.display()))?;
    // A byte-order mark (Windows editors) is not YAML content.
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if overrides.is_empty()
        && (body.trim().is_empty()
            || serde_yaml::from_str::<serde_yaml::Value>(body).is_ok_and(|v| v.is_null()))
    {
        tracing::warn!("{}: the config is empty: every setting is at its default", path.display());
    }
    let (mut cfg, notes) = TrainConfig::from_yaml_overridden(&text, path, &overrides)?;
    for w in notes.iter() {
        tracing::warn!("{}: {w}", path.display());
    }
    for n in cfg.resolve_relative_to(path) {
        tracing::info!("{}: {n}", path.display());
    }
    cfg.validate(path)?;
    Ok(cfg)
}

/// Whether `a` and `b` name the same directory (compared canonically when both exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Validation image/prompt pairs drawn for the TensorBoard log at each validation.
const VALIDATION_PANELS: usize = 4;

/// The outputs a run writes into `output_dir` (and `logging_dir`).
const RUN_OUTPUTS: &[&str] = &[
    "checkpoints",
    "adapter",
    "best",
    "merged",
    "run.json",
    "config.yaml",
    "loss_curve.png",
    "predictions.json",
    "nonfinite_batches.jsonl",
];

/// The run's own diagnosis at its end ([`crate::run_diagnosis`] on its metrics log): each
/// warning as one log line, and the command for the whole report. Silent on a short run (the
/// diagnosis needs a few steps) and when the log cannot be read.
fn run_diagnosis_summary(metrics: &Path, max_grad_norm: f64) {
    let Some(warnings) = diagnose_log(metrics, max_grad_norm) else { return };
    for f in &warnings {
        tracing::warn!("run diagnosis [{}]: {}; fix: {}", f.code, f.message, f.fix);
    }
    if !warnings.is_empty() {
        tracing::info!("the whole diagnosis of this run: lorahost doctor --trace {}", metrics.display());
    }
}

/// The run diagnosis ([`crate::run_diagnosis`]) of the metrics log as written so far: its
/// findings of warning severity or above; None when the log cannot be read or has fewer than 8
/// steps.
fn diagnose_log(metrics: &Path, max_grad_norm: f64) -> Option<Vec<crate::doctor::Finding>> {
    let trace = crate::metrics::Trace::read_quiet(metrics).ok()?;
    if trace.steps.len() < 8 {
        return None;
    }
    let mut r = crate::doctor::Report::default();
    let validation = crate::run_diagnosis::validations(metrics, &trace);
    crate::run_diagnosis::analyse_run(&trace, &validation, Some(max_grad_norm).filter(|m| *m > 0.0), &mut r);
    Some(r.findings.into_iter().filter(|f| f.severity >= crate::doctor::Severity::Warning).collect())
}

/// The diagnosis during training, at each validation: the findings of [`diagnose_log`] whose
/// code was not reported before in this run, each as a warning on the console and a
/// `diagnosis` event in the metrics log (`step`, `code`, `severity`, `message`, `evidence`,
/// `fix`), so a run going wrong says so while there is time to stop it.
fn live_diagnosis(
    metrics: &Path,
    max_grad_norm: f64,
    step: u64,
    reported: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for f in diagnose_log(metrics, max_grad_norm).unwrap_or_default() {
        if !reported.insert(f.code.clone()) {
            continue;
        }
        tracing::warn!("step {step}: diagnosis [{}]: {}; fix: {}", f.code, f.message, f.fix);
        let severity = if f.severity >= crate::doctor::Severity::Error { "error" } else { "warning" };
        lines.push(
            serde_json::json!({"event": "diagnosis", "step": step, "code": f.code, "severity": severity,
                "message": f.message, "evidence": f.evidence, "fix": f.fix})
            .to_string(),
        );
    }
    lines
}

/// Move an earlier run's outputs in `out_dir` (and its metrics log in `log_dir`) to
/// `out_dir/previous-runs/run-N/`, keeping the layout: a log in a `log_dir` other than
/// `out_dir` goes to the same relative folder (`logs/metrics.jsonl` → `run-N/logs/`; a
/// `log_dir` outside `out_dir` → `run-N/<its name>/`), so no file overwrites another. Returns
/// where they went, or None when there was no run. Refuses when only a `log_dir` outside
/// `out_dir` holds a log: that is another run's (its folder is elsewhere), which must neither
/// be moved into this run's folder nor written over.
fn set_aside_earlier_run(out_dir: &Path, log_dir: &Path) -> Result<Option<PathBuf>> {
    let is_log = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("metrics") && n.ends_with(".jsonl"))
            || crate::tfevents::is_event_file_name(p)
    };
    // (file, folder under run-N it goes to)
    let mut found: Vec<(PathBuf, PathBuf)> = RUN_OUTPUTS
        .iter()
        .map(|n| out_dir.join(n))
        .filter(|p| p.exists())
        .map(|p| (p, PathBuf::new()))
        .collect();
    let log_sub = if same_dir(log_dir, out_dir) {
        PathBuf::new()
    } else {
        match log_dir.strip_prefix(out_dir) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => PathBuf::from(log_dir.file_name().unwrap_or(std::ffi::OsStr::new("logs"))),
        }
    };
    for (dir, sub) in [(out_dir, PathBuf::new()), (log_dir, log_sub)] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if is_log(&e.path()) && !found.iter().any(|(p, _)| *p == e.path()) {
                found.push((e.path(), sub.clone()));
            }
        }
    }
    let outside = !same_dir(log_dir, out_dir) && log_dir.strip_prefix(out_dir).is_err();
    if outside && !found.is_empty() && found.iter().all(|(p, _)| p.parent() == Some(log_dir)) {
        bail!(
            "output.logging_dir {} holds another run's log ({}) and output.output_dir {} holds no run: this run would write over that log. Set output.logging_dir to a folder of this run (`logs` puts it inside output_dir) or to an empty folder; a config.yaml recorded by an earlier lorahost names the recorded run's own logging_dir. Nothing was written",
            log_dir.display(),
            found[0].0.display(),
            out_dir.display()
        );
    }
    // Only an empty checkpoints/ folder and nothing else: no run to keep.
    let ckpts = out_dir.join("checkpoints");
    if found.iter().all(|(p, _)| *p == ckpts) && checkpoint::list(&ckpts).is_empty() {
        return Ok(None);
    }
    let root = out_dir.join("previous-runs");
    if root.exists() && !root.is_dir() {
        bail!(
            "{} is a file, where lorahost keeps earlier runs: move or rename it (or choose another output.output_dir); nothing was moved",
            root.display()
        );
    }
    let to = crate::fsutil::first_free(|k| root.join(format!("run-{}", k + 1)));
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for (p, sub) in found {
        let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let dir = to.join(&sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dest = crate::fsutil::first_free(|k| {
            if k == 0 {
                dir.join(&name)
            } else {
                dir.join(format!("{}.{k}", name.to_string_lossy()))
            }
        });
        std::fs::rename(&p, &dest)
            .with_context(|| format!("moving {} to {}", p.display(), dest.display()))?;
    }
    Ok(Some(to))
}

/// Checkpoints after the resume point `step` belong to a branch this run abandons (its metrics
/// are cut back to the resume point too): set aside as `checkpoints/abandoned-step-N/`, so a
/// later plain `--resume` cannot pick them up, and `best/` restored to the resumed state's
/// `best` (it may hold the abandoned branch's). Called only after everything that can refuse
/// the resume, so a refused resume moves nothing.
fn set_aside_abandoned_branch(
    ckpt_root: &Path,
    out_dir: &Path,
    step: u64,
    best: Option<&Best>,
) -> Result<()> {
    let mut abandoned = 0;
    // (Incomplete ones too: this run's saves would otherwise replace them.)
    let later = checkpoint::list(ckpt_root).into_iter().chain(checkpoint::incomplete(ckpt_root));
    for (later_step, d) in later.filter(|(st, _)| *st > step) {
        let to = crate::fsutil::first_free(|k| match k {
            0 => ckpt_root.join(format!("abandoned-step-{later_step:08}")),
            k => ckpt_root.join(format!("abandoned-step-{later_step:08}-{k}")),
        });
        if std::fs::rename(&d, &to).is_ok() {
            tracing::warn!(
                "{} is newer than the resume point (step {step}): moved to {}",
                d.display(),
                to.display()
            );
            abandoned += 1;
        }
    }
    if let Some(b) = best.filter(|_| abandoned > 0) {
        let src = checkpoint::step_dir(ckpt_root, b.step);
        if src.is_dir() {
            let tmp = checkpoint::partial_dir(&out_dir.join("best"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)?;
            for f in ["adapter_model.safetensors", "adapter_config.json"] {
                std::fs::copy(src.join(f), tmp.join(f))
                    .with_context(|| format!("restoring best/ from {}", src.display()))?;
            }
            checkpoint::replace_dir(&tmp, &out_dir.join("best"))?;
            tracing::info!(
                "best/ restored from {} (best {} {:.4} at step {})",
                src.display(),
                b.metric,
                b.value,
                b.step
            );
        }
    }
    Ok(())
}

/// Whether `out_dir` (with its log in `log_dir`) holds a run: a checkpoint (complete or not)
/// or a metrics log.
fn holds_run(out_dir: &Path, log_dir: &Path) -> bool {
    let ckpts = out_dir.join("checkpoints");
    !checkpoint::list(&ckpts).is_empty()
        || !checkpoint::incomplete(&ckpts).is_empty()
        || log_dir.join("metrics.jsonl").is_file()
}

/// `--resume DIR` with a checkpoint from outside this run's `checkpoints/` folder (another
/// run's) into an `output_dir` that holds a run of its own is refused, moving nothing: resumed
/// here, the other run's state would be taken as a point in this run's history (this run's
/// later checkpoints set aside as abandoned, its log cut at that step and continued with the
/// other run's steps). Into an `output_dir` without a run it starts the run from there.
fn check_checkpoint_of_this_run(
    dir: &Path,
    given: &Path,
    out_dir: &Path,
    ckpt_root: &Path,
    log_dir: &Path,
) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if same_dir(parent, ckpt_root) || !holds_run(out_dir, log_dir) {
        return Ok(());
    }
    // The other run's folder: the one above its checkpoints/ folder.
    let other = if parent.file_name().is_some_and(|n| n == "checkpoints") {
        parent.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    } else {
        parent
    };
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    bail!(
        "--resume {}: that checkpoint is not one of this run's (they are in {}); it belongs to the run in {}, while output.output_dir {} holds a run of its own: resuming there would mix the two (this run's later checkpoints set aside as abandoned, its metrics log continued with the other run's steps). Nothing was moved. To continue that run, point output.output_dir at its folder (--override output.output_dir={}); to start a new run from that checkpoint, give an output_dir that holds no run (e.g. --override output.output_dir=NEW), or copy the checkpoint into one",
        given.display(),
        ckpt_root.display(),
        abs(other).display(),
        out_dir.display(),
        abs(other).display()
    )
}

/// A relative `output.output_dir` is read from the working directory (as SAM3_LoRA does);
/// relative inputs fall back to the config's folder. So a command run from another folder
/// than the run's first one would silently start a new run elsewhere: where the working
/// directory's `output_dir` holds no run but the same relative path from the config's folder,
/// or from a folder above it (a project's `configs/` folder: SAM3_LoRA runs from the project
/// root), does, `--resume` is refused naming both, and a new run is warned about.
fn check_output_dir_near_config(
    out_dir: &Path,
    config: &Path,
    resume: bool,
    log_dir_of: &dyn Fn(&Path) -> PathBuf,
) -> Result<()> {
    if out_dir.is_absolute() || holds_run(out_dir, &log_dir_of(out_dir)) {
        return Ok(());
    }
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let Some(config_dir) = abs(config).parent().map(Path::to_path_buf) else { return Ok(()) };
    // (The folder it is relative to: run from there, the config's output_dir is that run's.)
    let Some((root, near)) = config_dir
        .ancestors()
        .take(3)
        .map(|base| (base.to_path_buf(), base.join(out_dir)))
        .find(|(_, near)| !same_dir(near, out_dir) && holds_run(near, &log_dir_of(near)))
    else {
        return Ok(());
    };
    let near = abs(&near);
    let here = std::env::current_dir().map(|c| c.join(out_dir)).unwrap_or_else(|_| out_dir.to_path_buf());
    if resume {
        bail!(
            "--resume: output.output_dir {} is read from the working directory, where it ({}) holds no run, while the same path from {} holds one: {}. Nothing was written. Resume from that folder (cd {}), or with --override output.output_dir={} (or write an absolute output_dir in the config)",
            out_dir.display(),
            here.display(),
            root.display(),
            near.display(),
            root.display(),
            near.display()
        );
    }
    tracing::warn!(
        "output.output_dir {} is read from the working directory: this run writes to {}, while {} (the same path from {}) holds an earlier run (to continue that one instead, run from {} with --resume, or pass --override output.output_dir={})",
        out_dir.display(),
        here.display(),
        near.display(),
        root.display(),
        root.display(),
        near.display()
    );
    Ok(())
}

/// The first entry of `dir` (by name; inside a folder, its first entry, to name a file), or
/// None for a new or empty folder: the synthetic dataset is written only where there is nothing
/// yet (as `doctor`'s F12 says).
pub(crate) fn foreign_file(dir: &Path) -> Option<PathBuf> {
    let first = |d: &Path| std::fs::read_dir(d).ok()?.flatten().map(|e| e.path()).min();
    let mut entry = first(dir)?;
    for _ in 0..3 {
        match first(&entry) {
            Some(inner) if entry.is_dir() => entry = inner,
            _ => break,
        }
    }
    Some(entry)
}

/// `config.yaml`'s text: a comment saying what it is, then the settings.
fn config_record_text(record: &serde_yaml::Value, opts: &TrainOptions) -> String {
    let mut head = format!(
        "# The settings of this run as lorahost {} applied them (every key, defaults included), from\n# {}",
        env!("CARGO_PKG_VERSION"),
        opts.config.display()
    );
    for o in &opts.overrides {
        head.push_str(&format!(" --override {o}"));
    }
    if let Some(m) = opts.max_steps {
        head.push_str(&format!(" --max-steps {m}"));
    }
    head.push_str(".\n# Train the same run again: lorahost train --config <this file>\n");
    head + &serde_yaml::to_string(record).unwrap_or_default()
}

/// Whether validation `value` of `metric` ("loss": lower is better; others higher), with the
/// validation loss `loss`, beats the best so far. A non-finite value (diverged adapters) is
/// never the best, and a non-finite best (from an older run) is beaten by any finite value. An
/// equal value of mAP or cgF1 (e.g. 0 while nothing is detected yet) goes to the lower loss;
/// equal in both is no improvement. An mAP of -1 (cannot be computed) never selects a best.
fn is_better(metric: &str, value: f64, loss: f64, best: Option<&Best>) -> bool {
    value.is_finite()
        && computable(metric, value)
        && match best {
            None => true,
            Some(b) if !b.value.is_finite() || !computable(metric, b.value) => true,
            Some(b) if metric == "loss" => value < b.value,
            Some(b) => value > b.value || (value == b.value && b.loss.is_some_and(|l| loss < l)),
        }
}

/// Whether `value` of `metric` is a measurement: COCO's mAP is -1 where it cannot be computed
/// (no ground-truth mask in the validation split), which is no basis for choosing a best.
fn computable(metric: &str, value: f64) -> bool {
    !(metric == "map" && value < 0.0)
}

/// Why a run stopped on Ctrl-C / SIGTERM after `step`, with the command that continues it.
fn interrupted_reason(step: u64, opts: &TrainOptions) -> String {
    format!("interrupted (Ctrl-C / SIGTERM) after step {step}; continue with: {}", resume_command(opts))
}

/// The command line that continues this run: the same config, overrides and plugins, plus
/// `--resume`.
fn resume_command(opts: &TrainOptions) -> String {
    let quote = |s: String| if s.contains([' ', '"', '\'']) { format!("'{s}'") } else { s };
    let mut c = format!("lorahost train --config {}", quote(opts.config.display().to_string()));
    for o in &opts.overrides {
        c.push_str(&format!(" --override {}", quote(o.clone())));
    }
    for p in &opts.plugins {
        c.push_str(&format!(" --plugin {}", quote(p.path.display().to_string())));
    }
    c.push_str(" --resume");
    c
}

/// The prompt tokenizer beside the model (its directory, or the folder of a `sam3.pt`).
pub(crate) fn load_tokenizer(model_path: &Path) -> Result<PromptTokenizer> {
    let tok_dir = if model_path.is_file() {
        model_path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        model_path.to_path_buf()
    };
    PromptTokenizer::from_dir(&tok_dir).with_context(|| format!("tokenizer of {}", model_path.display()))
}

/// The tokenizer must fit the model's text embedding (a tokenizer.json of another model
/// would index past it).
fn check_tokenizer(tokenizer: &PromptTokenizer, model: &Sam3Model, model_path: &Path) -> Result<()> {
    tokenizer
        .check_model_vocab(model.config().text_config.vocab_size)
        .with_context(|| format!("tokenizer of {}", model_path.display()))
}

/// The dataset's prompts (categories and generic negatives) as the text encoder reads them:
/// two that become the same tokens (cut short alike) would be trained as present and absent
/// at once, an error; one cut short, a warning (doctor's F16).
fn check_prompts(tokenizer: &PromptTokenizer, dataset: &Dataset, context: usize) -> Result<()> {
    let fit = tokenizer.prompt_fit(&dataset.prompts(), context);
    for (p, n) in &fit.truncated {
        tracing::warn!(
            "the prompt {p:?} is {n} tokens, the text encoder reads {context}: it is cut short (shorten the category name to the words that name the object)"
        );
    }
    if let Some((a, b)) = fit.same.first() {
        bail!(
            "the prompts {a:?} and {b:?} read as the same {context} tokens to the text encoder: the model would be taught the one text as two classes, each the other's negative (F16); rename the categories (or training.generic_negatives words) so they differ within their first words"
        );
    }
    Ok(())
}

/// The side of the GT masks: the mask head predicts at the finest FPN level,
/// (image / patch) × scale_factors[0].
fn target_mask_size(model: &Sam3Model) -> usize {
    model.config().target_mask_size()
}

/// The `validation.*` extra values of a validation at `step` (0: before training).
fn validation_extra(step: u64, v: &validate::ValidationResult) -> Vec<NamedValue> {
    [("validation.step", step as f64), ("validation.loss", v.loss)]
        .into_iter()
        .chain(v.summary.iter().flat_map(|s| {
            [("validation.map", s.map), ("validation.ap50", s.ap50), ("validation.cgf1", s.cgf1)]
        }))
        .chain(v.pixel.iter().flat_map(|p| {
            [
                ("validation.pixel_f1", p.f1),
                ("validation.relaxed_f1", p.relaxed_f1),
                ("validation.cldice", p.cldice),
            ]
        }))
        .map(|(name, value)| NamedValue { name: name.into(), value })
        .collect()
}

/// Meta's loss weights with the config's `loss:` section applied. Every setting that cannot be
/// used is named in one error; a term lorahost does not compute, given weight 0 (off, as forks'
/// configs write it), is accepted with a warning.
pub fn loss_weights(cfg: &TrainConfig) -> Result<LossWeights> {
    let mut w = LossWeights::default();
    let mut problems = Vec::new();
    let mut unknown = Vec::new();
    for (k, v) in &cfg.loss {
        let number = v
            .as_f64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .filter(|f: &f64| f.is_finite() && *f >= 0.0);
        let mut set = |slot: &mut f64| match number {
            Some(f) => *slot = f,
            None => problems.push(format!("loss.{k}: {v} is not a number >= 0")),
        };
        if let Some(term) = w.term_mut(k) {
            set(term);
            continue;
        }
        match k.as_str() {
            "o2m_weight" => set(&mut w.o2m_weight),
            "pos_weight" => set(&mut w.pos_weight),
            "aux" => match v.as_bool() {
                Some(b) => w.aux = b,
                None => problems.push(format!("loss.aux: {v} is not true/false")),
            },
            _ if number == Some(0.0) => {
                tracing::warn!(
                    "loss.{k}: 0 — lorahost has no such loss term, and weight 0 leaves it off anyway"
                )
            }
            _ => unknown.push(format!("loss.{k}")),
        }
    }
    if !unknown.is_empty() {
        problems.push(format!(
            "{}: {} no loss term lorahost computes (a weight of 0 turns a term off); known: loss_bbox, \
             loss_giou, loss_ce, presence_loss, loss_mask, loss_dice, o2m_weight, pos_weight, aux",
            unknown.join(", "),
            if unknown.len() == 1 { "is" } else { "are" }
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(w)
}

/// The device the config asks for.
pub fn device_for(cfg: &TrainConfig) -> Result<Device> {
    let name = cfg.hardware.device.trim().to_ascii_lowercase();
    if let Some(ordinal) = cfg.hardware.cuda_ordinal() {
        // Half precision needs the GPU too: the CPU fix names both settings at once.
        let half = cfg.training.precision().is_some_and(|p| p != Precision::No);
        let cpu = if half {
            "set hardware.device: cpu and training.mixed_precision: no to train on the CPU"
        } else {
            "set hardware.device: cpu to train on the CPU"
        };
        return crate::gpu::open_cuda(ordinal, &format!("hardware.device is {name} ({cpu})"));
    }
    if name == "auto" {
        // The first GPU when this build and machine have one, else the CPU (said either way).
        return Ok(match crate::gpu::open_cuda(0, "hardware.device is auto") {
            Ok(d) => {
                tracing::info!("hardware.device auto: CUDA device 0");
                d
            }
            Err(e) => {
                // Half precision was asked for a GPU; on the CPU it would silently be f32.
                if cfg.training.precision().is_some_and(|p| p != Precision::No) {
                    bail!(
                        "hardware.device is auto and no CUDA device is usable ({e:#}); training.mixed_precision {} needs one (candle's CPU backend has no half-precision matmul): set training.mixed_precision: no to train on the CPU",
                        cfg.training.mixed_precision
                    );
                }
                tracing::info!("hardware.device auto: the CPU ({e:#})");
                Device::Cpu
            }
        });
    }
    Ok(Device::Cpu)
}

/// The dtype the frozen base runs in: `mixed_precision` bf16 / fp16 on CUDA, f32 otherwise.
/// LoRA weights, optimizer state, loss and gradient statistics are always f32.
pub fn compute_dtype(precision: Precision, device: &Device) -> DType {
    match (precision, device.is_cpu()) {
        (_, true) | (Precision::No, _) => DType::F32,
        (Precision::Bf16, false) => DType::BF16,
        (Precision::Fp16, false) => DType::F16,
    }
}

/// Where the base model lives: `model.path`, else `model.name` in the Hugging Face cache
/// (`model.cache_dir`, `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
pub fn resolve_model(cfg: &TrainConfig) -> Result<PathBuf> {
    if let Some(p) = &cfg.model.path {
        if !p.exists() {
            let resolved = if p.is_relative() {
                std::env::current_dir()
                    .map(|d| format!(" (relative to the working directory: {})", d.join(p).display()))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            bail!("model.path {} does not exist{resolved}; point it at a directory with config.json, model.safetensors and tokenizer.json (or at sam3.pt); relative paths in a config are read from the directory lorahost runs in", p.display());
        }
        return Ok(p.clone());
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(c) = &cfg.model.cache_dir {
        roots.push(c.clone());
    }
    if let Some(c) = std::env::var_os("HF_HUB_CACHE") {
        roots.push(c.into());
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        roots.push(PathBuf::from(h).join("hub"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(h).join(".cache/huggingface/hub"));
    }
    let repo = format!("models--{}", cfg.model.name.replace('/', "--"));
    for r in &roots {
        let snaps = r.join(&repo).join("snapshots");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&snaps)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("config.json").is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    bail!(
        "model {:?} not found: set model.path to a local model directory, or download it first \
         (`huggingface-cli download {}`); looked in {}",
        cfg.model.name,
        cfg.model.name,
        roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Tokenized prompts of a batch and which image each belongs to.
pub struct PromptBatch {
    /// (Q, T) i64.
    pub input_ids: Tensor,
    /// (Q, T) i64.
    pub attention_mask: Tensor,
    /// (Q,) u32.
    pub image_index: Tensor,
    /// The host's copy of each prompt's tokens (the text cache's keys).
    pub keys: Vec<crate::sam3::text::PromptKey>,
}

/// Tokenize a batch's queries.
pub fn prompts(batch: &Batch, tok: &PromptTokenizer, ctx: usize, device: &Device) -> Result<PromptBatch> {
    let q = batch.queries.len();
    let (mut ids, mut mask, mut idx) = (Vec::new(), Vec::new(), Vec::new());
    for query in &batch.queries {
        let (i, m) = tok.encode(&query.prompt, ctx);
        ids.extend(i.iter().map(|&v| v as i64));
        mask.extend(m.iter().map(|&v| v as i64));
        idx.push(query.image_index as u32);
    }
    let keys = crate::sam3::text::PromptKey::rows(&ids, &mask, ctx);
    Ok(PromptBatch {
        input_ids: Tensor::from_vec(ids, (q, ctx), device)?,
        attention_mask: Tensor::from_vec(mask, (q, ctx), device)?,
        image_index: Tensor::from_vec(idx, q, device)?,
        keys,
    })
}

/// Exemplar box prompts for a batch: query `i` gets its first target box as a positive visual
/// exemplar (besides its text) when `exemplar[i]` is true and it has a target; others get a
/// padding slot. None when no query gets one.
fn exemplar_boxes(batch: &Batch, exemplar: &[bool], device: &Device) -> Result<Option<(Tensor, Tensor)>> {
    let mut any = false;
    let (mut boxes, mut labels) = (Vec::new(), Vec::new());
    for (i, q) in batch.queries.iter().enumerate() {
        match (exemplar.get(i).copied().unwrap_or(false), q.boxes.first()) {
            (true, Some(b)) => {
                any = true;
                boxes.extend_from_slice(b);
                labels.push(1i64);
            }
            _ => {
                boxes.extend_from_slice(&[0.5, 0.5, 0.1, 0.1]);
                labels.push(crate::sam3::geometry::PAD_LABEL);
            }
        }
    }
    if !any {
        return Ok(None);
    }
    let q = batch.queries.len();
    Ok(Some((Tensor::from_vec(boxes, (q, 1, 4), device)?, Tensor::from_vec(labels, (q, 1), device)?)))
}

/// Forward a batch and compute the loss. `exemplar[i]` gives query `i` a box exemplar prompt
/// (see `training.box_prompt_prob`); empty for text-only prompts.
pub fn batch_loss(
    model: &Sam3Model,
    batch: &Batch,
    tok: &PromptTokenizer,
    weights: &LossWeights,
    train: bool,
    exemplar: &[bool],
) -> Result<(LossOutput, crate::sam3::model::Sam3Outputs)> {
    if batch.queries.is_empty() {
        return Err(anyhow::anyhow!(
            "a batch without prompts (images without usable objects and no negatives): nothing to compute a loss on"
        ));
    }
    let device = batch.pixel_values.device().clone();
    let ctx = model.config().text_config.max_position_embeddings;
    let p = prompts(batch, tok, ctx, &device)?;
    let (input_boxes, input_boxes_labels) = match exemplar_boxes(batch, exemplar, &device)? {
        Some((b, l)) => (Some(b), Some(l)),
        None => (None, None),
    };
    let inputs = Sam3Inputs {
        pixel_values: batch.pixel_values.clone(),
        input_ids: p.input_ids,
        attention_mask: p.attention_mask,
        input_boxes,
        input_boxes_labels,
        prompt_keys: Some(p.keys),
    };
    let out = model.forward_indexed(&inputs, Some(&p.image_index), ForwardOptions { train, dac: true })?;
    let loss = sam3_loss(&out, &batch_targets(batch), weights)?;
    Ok((loss, out))
}

/// `ids` split into the images that get at least one query (a positive, or a negative when
/// `num_negatives` > 0 and a category is absent) and the count of those that get none.
fn with_prompts(split: &Split, ids: Vec<usize>, num_negatives: usize) -> (Vec<usize>, usize) {
    let n = ids.len();
    let kept: Vec<usize> =
        ids.into_iter().filter(|&i| !split.queries(i, num_negatives, 0).is_empty()).collect();
    let dropped = n - kept.len();
    (kept, dropped)
}

/// Build the samples of `indices` on up to `workers` threads (order kept).
fn build_samples(
    split: &Split,
    indices: &[usize],
    opts: &[SampleOptions],
    workers: usize,
) -> Result<Vec<Sample>> {
    let build = |k: usize| {
        build_sample(split, indices[k], &opts[k]).with_context(|| {
            let im = &split.images[indices[k]];
            format!("building sample image {} ({})", im.id, im.path.display())
        })
    };
    if workers <= 1 || indices.len() <= 1 {
        return (0..indices.len()).map(build).collect();
    }
    let mut out: Vec<Option<Result<Sample>>> = (0..indices.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let chunks: Vec<Vec<usize>> = (0..workers.min(indices.len()))
            .map(|w| (w..indices.len()).step_by(workers.min(indices.len())).collect())
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|ks| {
                let build = &build;
                s.spawn(move || ks.into_iter().map(|k| (k, build(k))).collect::<Vec<_>>())
            })
            .collect();
        for h in handles {
            if let Ok(done) = h.join() {
                for (k, r) in done {
                    out[k] = Some(r);
                }
            }
        }
    });
    out.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("a data worker panicked")))).collect()
}

/// A seeded permutation of 0..n.
fn shuffled(n: usize, parts: &[u64]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut r = SplitMix64::from_parts(parts);
    for i in (1..n).rev() {
        let j = r.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// Progress on stderr: a redrawn line on a terminal, nothing otherwise (logs carry it).
struct Progress {
    tty: bool,
    start: Instant,
    total: u64,
    first: u64,
    /// The step this run stops at (`--max-steps`), which the ETA counts to.
    end: u64,
}

/// A duration for the console: `45s`, `12m05s`, `3h04m`.
fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    fn draw(&self, step: u64, epoch: u32, loss: f64, lr: f64) {
        if !self.tty {
            return;
        }
        let done = step.saturating_sub(self.first) as f64;
        let per = self.start.elapsed().as_secs_f64() / done.max(1.0);
        let eta = short_duration(per * self.end.saturating_sub(step) as f64);
        let width = 30usize;
        let filled = ((step as f64 / self.total.max(1) as f64) * width as f64).round() as usize;
        let bar: String = (0..width).map(|i| if i < filled { '#' } else { '-' }).collect();
        eprint!(
            "\r[{bar}] step {step}/{} epoch {epoch} loss {loss:.4} lr {lr:.2e} {per:.2}s/step ETA {eta}   ",
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Appends lines to the metrics file (one JSON object per line, flushed per line).
struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    /// Open `path`; on resume keep the header and the steps up to `keep_until`, else start fresh.
    fn open(path: &Path, header: &RunHeader, keep_until: Option<u64>) -> Result<Self> {
        let mut kept = Vec::new();
        if let Some(last) = keep_until {
            // The log is rewritten below: one that exists but cannot be read is an error, never
            // replaced by an empty one.
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => bail!(
                    "cannot read {} ({e}) to continue it: make it readable (or move it away to start its log afresh)",
                    path.display()
                ),
            };
            let text = String::from_utf8_lossy(&bytes);
            let (mut dropped, mut unreadable) = (Vec::new(), Vec::new());
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    unreadable.push(line);
                    continue;
                };
                let step = v.get("step").and_then(|s| s.as_u64());
                if v.get("run").is_some() || step.is_some_and(|s| s <= last) {
                    kept.push(line.to_string());
                } else {
                    dropped.push(line);
                }
            }
            // The records after the resume point belong to the abandoned branch (its
            // checkpoints are set aside too), and lines that are not JSON records: kept beside
            // the log, not lost.
            let set_aside = |lines: &[&str], what: &str, name: &dyn Fn(usize) -> String| -> Result<()> {
                if lines.is_empty() {
                    return Ok(());
                }
                let dir = path.parent().unwrap_or(Path::new("."));
                let to = crate::fsutil::first_free(|k| dir.join(name(k)));
                let mut body = lines.join("\n");
                body.push('\n');
                crate::fsutil::write_atomic(&to, body.as_bytes())
                    .with_context(|| format!("writing {}", to.display()))?;
                tracing::warn!("{}: {} {what} moved to {}", path.display(), lines.len(), to.display());
                Ok(())
            };
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let numbered = |base: String| {
                move |k: usize| if k == 0 { format!("{base}.jsonl") } else { format!("{base}-{k}.jsonl") }
            };
            set_aside(
                &dropped,
                &format!("record(s) after step {last} (the resume point)"),
                &numbered(format!("{stem}.abandoned-after-step-{last}")),
            )?;
            set_aside(
                &unreadable,
                "line(s) that are not JSON records",
                &numbered(format!("{stem}.unreadable")),
            )?;
        }
        if kept.is_empty() {
            kept.push(serde_json::json!({ "run": header }).to_string());
        }
        let mut text = kept.join("\n");
        text.push('\n');
        crate::fsutil::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { file })
    }

    fn line(&mut self, v: &str) {
        if let Err(e) = writeln!(self.file, "{v}") {
            tracing::warn!("cannot append to the metrics file: {e}");
        }
    }
}

fn grad_groups(lora: &LoraSet) -> Vec<(String, Vec<usize>)> {
    // Group variable indices by component (the order of `lora.vars()`).
    let mut groups: BTreeMap<Component, Vec<usize>> = BTreeMap::new();
    for (i, key) in lora.vars().keys().enumerate() {
        let path = key.trim_start_matches("base_model.model.");
        if let Some(c) = Component::of(path) {
            groups.entry(c).or_default().push(i);
        }
    }
    groups.into_iter().map(|(c, v)| (c.name().replace(' ', "_").replace('+', "and"), v)).collect()
}

/// The position `micro_in_epoch` (micro-batches of `old_batch` samples into the epoch, with
/// `old_accum` of them per step) in micro-batches of `batch` samples, `accum` per step; None
/// unless both group the same number of samples per step (so the steps stay the same) and the
/// position falls on a whole new micro-batch. Unknown old values are taken as unchanged.
fn regroup(
    micro_in_epoch: u64,
    old_batch: Option<usize>,
    old_accum: Option<usize>,
    batch: usize,
    accum: usize,
) -> Option<u64> {
    let (ob, oa) = (old_batch.unwrap_or(batch), old_accum.unwrap_or(accum));
    if ob * oa != batch * accum || batch == 0 {
        return None;
    }
    let samples = micro_in_epoch * ob as u64;
    samples.is_multiple_of(batch as u64).then_some(samples / batch as u64)
}

/// Run training as configured. Returns what happened; errors name the file and the fix.
///
/// The run's `metrics.jsonl` gets a `session` record when this process starts writing it and
/// an `end` record when it stops, however it stops short of being killed ([`session`]).
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let mut end = SessionEnd::default();
    let result = train_session(opts, &mut end);
    end.finish(&result);
    result.map_err(|e| {
        if crate::sam3::layer_op::out_of_memory(&format!("{e:#}")) {
            e.context(format!("the device ran out of memory: {OOM_FIX}"))
        } else {
            e
        }
    })
}

/// What to do when a micro-batch does not fit on the device.
pub const OOM_FIX: &str = "lower training.batch_size and raise gradient_accumulation_steps as much (a run resumes with the same product: --resume --override training.batch_size=B/2 --override training.gradient_accumulation_steps=2A), turn on training.gradient_checkpointing (true, or mlp), train in training.mixed_precision: bf16, or cap the objects per image; `lorahost doctor --config C` predicts the peak for your card (F13)";

/// Micro-batches in a row that ran out of device memory (each skipped) after which the run
/// finishes the step, saves a checkpoint and stops.
pub const OOM_STOP_AFTER: u32 = 3;

/// The end record of this process's session of a run ([`session::end_record`]): written by
/// [`train`] when `train_session` returns, and on unwinding from a panic.
#[derive(Default)]
struct SessionEnd {
    /// The log, once the session record is in it.
    metrics: Option<PathBuf>,
    /// The last step recorded.
    step: u64,
    /// Why it ended when it returns normally (`completed`, `max_steps`, `stopped`, ...).
    reason: Option<&'static str>,
    /// The stop's reason.
    detail: Option<String>,
    written: bool,
}

impl SessionEnd {
    fn write(&mut self, reason: &str, detail: Option<&str>) {
        let Some(path) = self.metrics.as_ref().filter(|_| !self.written) else { return };
        self.written = true;
        let line = session::end_record(self.step, reason, detail);
        let appended =
            std::fs::OpenOptions::new().append(true).open(path).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            tracing::warn!("cannot append the session's end to {}: {e}", path.display());
        }
    }

    fn finish(&mut self, result: &Result<TrainSummary>) {
        match result {
            Ok(_) => {
                let detail = self.detail.take();
                self.write(self.reason.unwrap_or("completed"), detail.as_deref());
            }
            Err(e)
                if e.downcast_ref::<interrupt::StoppedBeforeFirstStep>().is_some()
                    || validate::is_interrupted(e) =>
            {
                self.write("interrupted", None)
            }
            Err(e) => self.write("error", Some(&format!("{e:#}"))),
        }
    }
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.write("panic", None);
        }
    }
}

/// The micro-batch size to try after `batch` images did not fit: the largest divisor of the
/// samples per optimizer step (`batch` × `accum`, which must stay) that is at most half of
/// `batch`; None at one image.
fn smaller_micro_batch(batch: usize, accum: usize) -> Option<usize> {
    let per_step = batch * accum;
    (1..=batch / 2).rev().find(|d| per_step.is_multiple_of(*d))
}

/// After micro-batch `at` = (step, micro) failed with `e`: when the device ran out of memory,
/// the micro-batch is reported (console, an `out_of_memory` event in the log; whether smaller
/// micro-batches follow, `shrinks`) and counted in `streak`, and training goes on; any other
/// error is passed on.
fn skip_out_of_memory(
    e: anyhow::Error,
    at: (u64, u32),
    ids: &[u64],
    objects: u32,
    shrinks: bool,
    streak: &mut u32,
    log: &mut MetricsLog,
) -> Result<()> {
    let text = format!("{e:#}");
    if !crate::sam3::layer_op::out_of_memory(&text) {
        return Err(e);
    }
    crate::sam3::recompute::clear_side_grads();
    *streak += 1;
    let (step, micro) = at;
    log.line(
        &serde_json::json!({"event": "out_of_memory", "step": step, "micro_step": micro, "images": ids.len(),
            "objects": objects, "image_ids": ids, "error": text})
        .to_string(),
    );
    let then = if shrinks {
        "; the micro-batches are made smaller from the next step on".to_string()
    } else if *streak == 1 {
        format!(" ({streak} in a row; {OOM_STOP_AFTER} in a row stop the run). Fix: {OOM_FIX}")
    } else {
        format!(" ({streak} in a row; {OOM_STOP_AFTER} in a row stop the run)")
    };
    tracing::warn!(
        "step {step}: micro-batch {} ({} images, {objects} objects; image ids {ids:?}) ran out of device memory and is skipped{then}",
        micro + 1,
        ids.len(),
    );
    Ok(())
}

/// `LORAHOST_INJECT_NAN_UPDATE=STEP`: the optimizer update of that step leaves NaN in the
/// first adapter tensor, to rehearse the guard against an update that breaks the weights.
fn injected_nan_update() -> Option<u64> {
    std::env::var("LORAHOST_INJECT_NAN_UPDATE").ok()?.trim().parse().ok()
}

/// The component groups whose adapter weights hold NaN/Inf entries, as "name (bad of all)":
/// the gradient statistics' kernel run over the weights (one launch on CUDA).
fn nonfinite_weights(groups: &[(String, Vec<usize>)], vars: &[Var]) -> Result<Vec<String>> {
    let members: Vec<Vec<&Tensor>> =
        groups.iter().map(|(_, ix)| ix.iter().map(|&i| vars[i].as_tensor()).collect()).collect();
    let named: Vec<(&str, &[&Tensor])> =
        groups.iter().zip(&members).map(|((name, _), ps)| (name.as_str(), ps.as_slice())).collect();
    Ok(group_stats_many(&named)?
        .into_iter()
        .filter(|g| g.nonfinite > 0)
        .map(|g| format!("{} ({} of {})", g.name, g.nonfinite, g.numel))
        .collect())
}

/// `LORAHOST_INJECT_OOM=STEP[.MICRO],...`: the named micro-batches (every micro-batch of a
/// bare STEP) fail as if the device had run out of memory, to rehearse what a run does then
/// (the tests; a pipeline's handling of the outcome) on any device.
fn injected_oom() -> Vec<(u64, Option<u32>)> {
    let Ok(spec) = std::env::var("LORAHOST_INJECT_OOM") else { return Vec::new() };
    spec.split(',')
        .filter_map(|p| {
            let p = p.trim();
            match p.split_once('.') {
                Some((s, m)) => Some((s.parse().ok()?, Some(m.parse().ok()?))),
                None => Some((p.parse().ok()?, None)),
            }
        })
        .collect()
}

fn train_session(opts: &TrainOptions, end: &mut SessionEnd) -> Result<TrainSummary> {
    let cfg = load_config(&opts.config, &opts.overrides)?;
    let t = &cfg.training;
    let seed = t.seed as u64;
    let device = device_for(&cfg)?;
    let precision = t.precision().unwrap_or(Precision::No);
    let dtype = compute_dtype(precision, &device);
    if !device.is_cpu() {
        device.set_seed(seed).context("seeding the CUDA generator")?;
    }
    if cfg.hardware.use_compile {
        tracing::warn!("hardware.use_compile: candle has no graph compiler; the setting is ignored");
    }
    if cfg.hardware.dataloader_pin_memory {
        tracing::info!(
            "hardware.dataloader_pin_memory: batches are copied to the device synchronously{}",
            if device.is_cpu() {
                " (nothing to pin on the CPU)"
            } else {
                " (candle has no pinned staging buffers)"
            }
        );
    }
    tracing::info!("data: {} loader thread(s) (training.num_workers)", t.num_workers.max(1));
    tracing::info!("data: augmentation: {} (training.augment)", t.augment.describe());

    // Data.
    // Only where nothing is there yet: a folder in the annotation file's place is Dataset::load's
    // error to report (with its fix), not something to write into.
    if t.synthetic && !t.data_dir.join("train").join(crate::data::coco::ANNOTATION_FILE).exists() {
        // Never into a folder of the user's: the synthetic set would mix with their files.
        if let Some(f) = foreign_file(&t.data_dir) {
            bail!(
                "training.synthetic is true and training.data_dir {} holds no train/{} but other files ({}): lorahost writes its synthetic dataset only into a new or empty folder, never among other files. Set training.data_dir to a new folder for the synthetic set (or empty this one), or set training.synthetic: false to train on your own data (it needs train/{} in COCO format); nothing was written",
                t.data_dir.display(),
                crate::data::coco::ANNOTATION_FILE,
                f.display(),
                crate::data::coco::ANNOTATION_FILE
            );
        }
        let spec = SyntheticSpec { seed, ..SyntheticSpec::default() };
        let spec = SyntheticSpec { train_images: 24, valid_images: 8, size: 112, max_cracks: 2, ..spec };
        write_synthetic(&t.data_dir, &spec)
            .with_context(|| format!("writing the synthetic dataset to {}", t.data_dir.display()))?;
        tracing::info!("wrote the synthetic crack dataset to {}", t.data_dir.display());
    }
    let dataset =
        Dataset::load(&t.data_dir).with_context(|| format!("training.data_dir {}", t.data_dir.display()))?;
    let dataset = dataset.with_generic_negatives(&t.generic_negatives);
    let fp = dataset.fingerprint();
    tracing::info!("dataset fingerprint: {}", serde_json::to_string(&fp).unwrap_or_default());
    // Training reads train/ and valid/ only; test/ is doctor's business.
    let findings = dataset.preflight_of(&["train", "valid"]);
    let mut unusable: HashMap<(String, u64), String> = HashMap::new();
    for f in &findings {
        match f.severity {
            Severity::Error => tracing::error!("{}", f.located()),
            Severity::Warning => tracing::warn!("{}", f.located()),
        }
        // Images that cannot be read are left out, each named above. (A segmentation that
        // cannot be decoded leaves a box-only object: it does not cost the image.)
        if matches!(f.kind, FindingKind::MissingImage | FindingKind::CorruptImage) {
            if let Some(id) = f.image_id {
                unusable.insert((f.split.clone(), id), f.to_string());
            }
        }
    }
    for f in &dataset.skipped {
        tracing::warn!("{}", f.located());
    }
    let train_split = dataset.split("train").context("no train split")?.clone();
    let usable = |s: &Split| -> Vec<usize> {
        (0..s.images.len()).filter(|&i| !unusable.contains_key(&(s.name.clone(), s.images[i].id))).collect()
    };
    let train_ids = usable(&train_split);
    if train_ids.is_empty() {
        bail!(
            "{}: no usable training images (see the preflight errors above)",
            train_split.annotation_file.display()
        );
    }
    if train_ids.len() < train_split.images.len() {
        tracing::warn!(
            "{} of {} training images cannot be read or decoded and are left out (listed above by file and id)",
            train_split.images.len() - train_ids.len(),
            train_split.images.len()
        );
    }
    if train_ids.iter().all(|&i| train_split.images[i].objects.is_empty()) {
        // doctor's F1.
        bail!(
            "{}: the training split has no usable objects (no annotation with a usable bbox, segmentation and category): the loss would be near zero and nothing is learned; check the annotation file (bbox/segmentation/category_id fields, see the warnings above)",
            train_split.annotation_file.display()
        );
    }
    let (train_ids, promptless) = with_prompts(&train_split, train_ids, t.num_negatives);
    if promptless > 0 {
        tracing::warn!(
            "{promptless} training images have no usable objects and get no prompt (training.num_negatives is {}): they are left out",
            t.num_negatives
        );
    }
    let valid_split = dataset.split("valid").cloned().filter(|_| opts.lr_range.is_none());
    if valid_split.is_none() && opts.lr_range.is_none() {
        // Other names people give the validation folder (Roboflow's is valid/).
        let other = ["val", "validation", "eval", "dev"].into_iter().find(|n| t.data_dir.join(n).is_dir());
        tracing::warn!(
            "{}: no valid split: validation and the best checkpoint are off ({})",
            t.data_dir.display(),
            match other {
                Some(n) => format!("there is a {n}/ folder: rename it to valid/"),
                None => "add valid/_annotations.coco.json".to_string(),
            }
        );
    }
    let valid_ids =
        valid_split.as_ref().map(|s| with_prompts(s, usable(s), t.num_negatives).0).unwrap_or_default();
    if let Some(v) = valid_split.as_ref().filter(|_| valid_ids.is_empty()) {
        tracing::warn!(
            "{}: no valid image is usable (see the preflight above): validation and the best checkpoint are off",
            v.annotation_file.display()
        );
    }

    // Model and adapters.
    let model_path = resolve_model(&cfg)?;
    let tokenizer = load_tokenizer(&model_path)?;
    let mut model = Sam3Model::load_dir(&model_path, &device, dtype)?.with_semantics(Semantics::Original);
    check_tokenizer(&tokenizer, &model, &model_path)?;
    check_prompts(&tokenizer, &dataset, model.config().text_config.max_position_embeddings)?;
    model.set_vit_checkpointing(cfg.training.gradient_checkpointing)?;
    let lora_cfg = LoraConfig::from_section(&cfg.lora);
    let lora = LoraSet::attach_seeded(&mut model, &lora_cfg, seed, &device)
        .with_context(|| format!("{}: lora section", opts.config.display()))?;
    for p in lora.unmatched_patterns() {
        tracing::warn!(
            "{}: lora.target_modules entry {p:?} adapts no module in the enabled components (names are transformers' SAM3 module names: q_proj, k_proj, v_proj, o_proj, fc1, fc2, out_proj, or a dotted path / glob); the other entries matched",
            opts.config.display()
        );
    }
    tracing::info!(
        "LoRA r={} alpha={}{} (scale {}) dropout={}: {} modules, {} trainable parameters",
        lora_cfg.rank,
        lora_cfg.alpha,
        if lora_cfg.use_rslora { " rsLoRA" } else { "" },
        lora_cfg.scale(),
        lora_cfg.dropout,
        lora.modules.len(),
        lora.num_params()
    );
    // The shape of the run for the per-micro-batch memory estimate (debug log `lorahost::memory`).
    let memory_shape = crate::memory::RunShape {
        base_params: crate::memory::parameter_count(model.config())?,
        lora_params: lora.num_params(),
        dtype,
        adapted: crate::memory::Adapted::of(lora.modules.iter().map(|m| m.1)),
        vision_checkpointing: cfg.training.gradient_checkpointing,
        base: 0,
        cuda: device.is_cuda(),
    };
    for (c, m, p) in lora.component_table() {
        tracing::info!("  {:<22} {:>5} modules {:>12} parameters", c.name(), m, p);
    }
    let image_size = model.image_size();
    let mask_size = target_mask_size(&model);

    // Schedule.
    let eff = cfg.effective(train_ids.len());
    let (total, warmup) = match opts.lr_range {
        Some(r) => (r.steps, 0),
        None => (eff.total_steps as u64, eff.warmup_steps as u64),
    };
    let accum = t.gradient_accumulation_steps.max(1);
    let scheduler = t.scheduler().unwrap_or(crate::train_config::Scheduler::Cosine);
    tracing::info!(
        "effective hyperparameters: batch {} x accumulation {} = {} images per optimizer step; {} micro-batches and {} optimizer steps per epoch; {} epochs = {} optimizer steps; warmup {} steps ({:.2} epochs); lr {:e} ({:?}); AdamW betas ({}, {}) eps {:e} weight decay {}; clip {}; precision {} (frozen weights in {}); seed {}",
        t.batch_size, accum, eff.effective_batch_size, eff.micro_batches_per_epoch, eff.steps_per_epoch,
        // (An LR range test runs its own number of steps, without warmup.)
        if opts.lr_range.is_some() { total.div_ceil(eff.steps_per_epoch.max(1) as u64) as usize } else { t.num_epochs },
        total, warmup, warmup as f64 / eff.steps_per_epoch.max(1) as f64, t.learning_rate, scheduler, t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.weight_decay, t.max_grad_norm, t.mixed_precision, dtype.as_str(), seed
    );
    if opts.lr_range.is_none() && t.learning_rate > 5e-2 {
        // (doctor's D3 error: far above LoRA's range the adapters diverge within steps.)
        tracing::warn!(
            "training.learning_rate {:e} is far above the usual LoRA range (SAM3 LoRA runs use 5e-5 .. 2e-4): expect the loss to diverge; `lorahost lr-find` measures the range on this model and data",
            t.learning_rate
        );
    }
    if warmup >= total && total > 0 {
        tracing::warn!(
            "warmup ({warmup} steps) covers the whole run ({total} steps): the LR never reaches its peak"
        );
    }
    if accum > eff.micro_batches_per_epoch && eff.micro_batches_per_epoch > 0 {
        // An optimizer step ends with its epoch (D2 in `lorahost doctor`).
        tracing::warn!(
            "gradient_accumulation_steps {accum} is more than the {} micro-batches of an epoch: each optimizer step has {} images ({} training images), not {}; lower gradient_accumulation_steps to {} or below",
            eff.micro_batches_per_epoch,
            train_ids.len(),
            train_ids.len(),
            eff.effective_batch_size,
            eff.micro_batches_per_epoch
        );
    }
    let base_weights = loss_weights(&cfg)?;

    // Output.
    let out_dir = cfg.output.output_dir.clone();
    let log_dir_of = |out: &Path| match &cfg.output.logging_dir {
        Some(d) if d.is_absolute() => d.clone(),
        Some(d) => out.join(d),
        None => out.to_path_buf(),
    };
    check_output_dir_near_config(&out_dir, &opts.config, opts.resume.is_some(), &log_dir_of)?;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating output.output_dir {}", out_dir.display()))?;
    let ckpt_root = out_dir.join("checkpoints");
    let log_dir = log_dir_of(&out_dir);
    // A run still writing this folder keeps it; one that was killed is told what killed it.
    match session::ending(&log_dir.join("metrics.jsonl")) {
        session::Ending::Running(s) => bail!(
            "{} is in use: process {} on {} is still training into it (its session started at step {}); wait for it to finish, stop it (Ctrl-C in its terminal, or kill {} to save a checkpoint and stop), or give this run another output.output_dir",
            out_dir.display(),
            s.pid,
            s.host,
            s.step,
            s.pid
        ),
        e => {
            if let Some(text) = e.describe() {
                tracing::warn!("{}: {text}", out_dir.display());
            }
        }
    }
    for p in checkpoint::clean_partials(&ckpt_root).into_iter().chain(checkpoint::clean_partials(&out_dir)) {
        tracing::warn!("removed {} left by an interrupted save", p.display());
    }
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    // PEFT's base_model_name_or_path: the hub name (model.path is usually a local copy of it,
    // and a path would not travel with the adapters; run.json records the path).
    let base_name = cfg.model.name.clone();

    // Optimizer and state.
    let var_list: Vec<(String, Var)> = lora.vars().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let vars: Vec<Var> = var_list.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        var_list,
        AdamWConfig {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
    )?;
    let groups = grad_groups(&lora);
    let mut state = TrainerState {
        format: checkpoint::STATE_FORMAT,
        step: 0,
        epoch: 0,
        micro_in_epoch: 0,
        epoch_order: Vec::new(),
        optimizer_updates: 0,
        lr_scale: 1.0,
        loss_scale: if precision == Precision::Fp16 && !device.is_cpu() { 65536.0 } else { 1.0 },
        loss_scale_good_steps: 0,
        skipped_steps: 0,
        last_loss: None,
        sample_stats: vec![(None, 0); train_ids.len()],
        best: None,
        plugin_states: BTreeMap::new(),
        seed,
        train_sha256: train_split.sha256.clone(),
        batch_size: Some(t.batch_size),
        accumulation: Some(accum),
    };
    let resume_dir = match &opts.resume {
        None => None,
        Some(Resume::Dir(d)) => Some(d.clone()),
        Some(Resume::Latest) => {
            let usable = checkpoint::list(&ckpt_root);
            let newest = usable.last().map(|(step, _)| *step);
            // A step-N folder without its state (an interrupted or damaged save): skipped, said.
            let damaged: Vec<String> = checkpoint::incomplete(&ckpt_root)
                .into_iter()
                .filter(|(step, _)| newest.is_none_or(|n| *step > n))
                .map(|(_, d)| d.display().to_string())
                .collect();
            match usable.last() {
                Some((step, d)) => {
                    if !damaged.is_empty() {
                        tracing::warn!(
                            "--resume: {} hold(s) no {} (an interrupted or damaged save): resuming from step {step} instead",
                            damaged.join(", "),
                            checkpoint::STATE_FILE
                        );
                    }
                    Some(d.clone())
                }
                // Nothing was trained here yet: --resume starts the run.
                None if damaged.is_empty() && !log_dir.join("metrics.jsonl").exists() => {
                    tracing::info!(
                        "--resume: no checkpoint under {} yet: starting the run",
                        ckpt_root.canonicalize().unwrap_or_else(|_| ckpt_root.clone()).display()
                    );
                    None
                }
                None => bail!(
                    "--resume: {} holds an earlier run but no checkpoint it can continue from{}: resume from a checkpoint directory with --resume DIR, or run without --resume to start afresh (the earlier outputs are then moved to previous-runs/)",
                    out_dir.display(),
                    if damaged.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} hold(s) no {})", damaged.join(", "), checkpoint::STATE_FILE)
                    }
                ),
            }
        }
    };
    if let (Some(Resume::Dir(d)), Some(dir)) = (&opts.resume, &resume_dir) {
        check_checkpoint_of_this_run(dir, d, &out_dir, &ckpt_root, &log_dir)?;
    }
    // The record of this run's settings (`config.yaml` beside the outputs and in each checkpoint).
    // The plugins: the config's (with their own limits), then the command line's, with the
    // command line's settings over both.
    let mut specs: Vec<PluginSpec> = cfg
        .plugins
        .iter()
        .map(|p| {
            let mut spec = PluginSpec { config: p.config.clone(), ..PluginSpec::new(&p.path) };
            if let Some(ms) = p.budget_ms {
                spec.limits.call_budget = std::time::Duration::from_millis(ms.max(1));
            }
            if let Some(mb) = p.memory_mb {
                spec.limits.memory_bytes = mb.max(2) << 20;
            }
            spec
        })
        .collect();
    specs.extend(opts.plugins.iter().cloned());
    if opts.lr_range.is_some() && !specs.is_empty() {
        tracing::info!(
            "LR range test: the {} plugin(s) are not loaded (the test sets the LR itself)",
            specs.len()
        );
        specs.clear();
    }
    opts.plugin_overrides.apply(&mut specs).map_err(anyhow::Error::msg)?;
    let mut record = cfg.snapshot(&[]);
    // The plugins as they run (command-line plugins and settings folded in).
    let mut with_plugins = cfg.clone();
    with_plugins.plugins = specs
        .iter()
        .map(|s| {
            let default = crate::plugin::Limits::default();
            crate::train_config::PluginEntry {
                path: s.path.clone(),
                config: s.config.clone(),
                budget_ms: (s.limits.call_budget != default.call_budget)
                    .then_some(s.limits.call_budget.as_millis() as u64),
                memory_mb: (s.limits.memory_bytes != default.memory_bytes)
                    .then_some(s.limits.memory_bytes >> 20),
            }
        })
        .collect();
    record["plugins"] = with_plugins.snapshot(&[])["plugins"].clone();
    // The loss weights in effect (Meta's defaults included), not just the ones the YAML set.
    let w = &base_weights;
    let loss: BTreeMap<&str, serde_yaml::Value> = [
        ("loss_bbox", w.loss_bbox),
        ("loss_giou", w.loss_giou),
        ("loss_ce", w.loss_ce),
        ("presence_loss", w.presence_loss),
        ("loss_mask", w.loss_mask),
        ("loss_dice", w.loss_dice),
        ("o2m_weight", w.o2m_weight),
        ("pos_weight", w.pos_weight),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.into()))
    .chain([("aux", w.aux.into())])
    .collect();
    record["loss"] = serde_yaml::to_value(loss).unwrap_or_default();
    let record_text = config_record_text(&record, opts);
    let mut header_changed = false;
    if let Some(dir) = &resume_dir {
        let (s, tensors) = checkpoint::load(dir)?;
        if s.train_sha256 != train_split.sha256 {
            bail!(
                "{}: the checkpoint was trained on other data ({} has changed); resume with the same dataset or start a new output_dir",
                dir.display(),
                train_split.annotation_file.display()
            );
        }
        if s.sample_stats.len() != train_ids.len() {
            bail!(
                "{}: the checkpoint has {} training samples, the dataset {}",
                dir.display(),
                s.sample_stats.len(),
                train_ids.len()
            );
        }
        let n = train_ids.len();
        let order_ok = s.epoch_order.is_empty()
            || (s.epoch_order.len() == n && s.epoch_order.iter().all(|&k| (k as usize) < n));
        if !order_ok || s.optimizer_updates > s.step {
            bail!(
                "{}: {} does not fit this run ({n} training samples): the state is damaged; resume from another checkpoint or start a new run",
                dir.display(),
                checkpoint::STATE_FILE
            );
        }
        // The settings the checkpoint was made with: its own record, else the metrics header.
        let old_header = crate::metrics::Trace::read(&log_dir.join("metrics.jsonl")).ok().and_then(|t| t.run);
        let from_header =
            |f: fn(&RunHeader) -> u32| old_header.as_ref().map(|h| f(h) as usize).filter(|v| *v > 0);
        let old_batch = s.batch_size.or_else(|| from_header(|h| h.batch_size));
        let old_accum = s.accumulation.or_else(|| from_header(|h| h.accumulation));
        let mut s = s;
        if old_batch.is_some_and(|b| b != t.batch_size) || old_accum.is_some_and(|a| a != accum) {
            // The same samples per optimizer step, grouped in other micro-batches (the way out
            // of running out of memory): the same steps, the same samples in each, the
            // schedule unchanged; the position in the epoch is counted again in the new
            // micro-batches.
            match regroup(s.micro_in_epoch, old_batch, old_accum, t.batch_size, accum) {
                Some(micro) => {
                    tracing::warn!(
                        "{}: resuming with batch_size {} x gradient_accumulation_steps {} where the checkpoint had {} x {}: the same {} samples per optimizer step in other micro-batches (the same steps and samples; dropout and the batch statistics differ)",
                        dir.display(),
                        t.batch_size,
                        accum,
                        old_batch.unwrap_or(t.batch_size),
                        old_accum.unwrap_or(accum),
                        t.batch_size * accum
                    );
                    s.micro_in_epoch = micro;
                    // The log's header governs the steps after it: this run's grouping.
                    header_changed = true;
                }
                None => bail!(
                    "{}: the checkpoint was made with batch_size {} x gradient_accumulation_steps {}, this config has {} x {}: the position in the epoch is counted in those micro-batches and the steps in their product, so resuming would skip or repeat samples; resume with the original values or with the same product (e.g. half the batch_size and twice the accumulation), or start a new run in another output_dir",
                    dir.display(),
                    old_batch.map_or("?".into(), |b| b.to_string()),
                    old_accum.map_or("?".into(), |a| a.to_string()),
                    t.batch_size,
                    accum
                ),
            }
        }
        // The adapters and the optimizer state first: a checkpoint of another LoRA layout (rank,
        // alpha, target modules, components) is refused here, before anything is moved or cut.
        lora.load_peft(dir).with_context(|| {
            format!(
                "--resume {}: its adapters do not fit this config's lora section (a run continues with the LoRA layout it was trained with; nothing was moved)",
                dir.display()
            )
        })?;
        opt.load_state(&tensors, s.optimizer_updates)
            .with_context(|| format!("optimizer state of {} (nothing was moved)", dir.display()))?;
        let stop_at = opts.max_steps.map_or(total, |m| m.min(total));
        if s.step >= stop_at {
            tracing::warn!(
                "{} is at step {}: the run is already complete ({} steps{}); nothing to train, and the outputs are left as they are. To train longer, raise training.num_epochs (or --max-steps)",
                dir.display(),
                s.step,
                total,
                opts.max_steps.map(|m| format!(", --max-steps {m}")).unwrap_or_default()
            );
            return Ok(TrainSummary {
                steps: s.step,
                skipped_steps: s.skipped_steps,
                output_dir: out_dir.clone(),
                already_complete: true,
                ..Default::default()
            });
        }
        // What changed since the checkpoint: its config record, else (older runs) the metrics
        // header's settings.
        let recorded = std::fs::read_to_string(dir.join(CONFIG_RECORD))
            .ok()
            .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok());
        let mut changed = Vec::new();
        if let Some(old) = &recorded {
            changed = crate::train_config::snapshot_changes(old, &record);
        } else if let Some(h) = &old_header {
            let mut note = |what: &str, old: String, new: String| {
                if old != new {
                    changed.push(format!("{what} {old} -> {new}"));
                }
            };
            note("total steps (num_epochs)", h.total_steps.to_string(), total.to_string());
            note("warmup steps", h.warmup_steps.to_string(), warmup.to_string());
            note("learning_rate", format!("{:e}", h.base_lr), format!("{:e}", t.learning_rate));
            note("lr_scheduler", h.scheduler.clone(), t.lr_scheduler.clone());
            note("seed", h.seed.to_string(), seed.to_string());
        }
        if !changed.is_empty() {
            tracing::warn!(
                "resuming with changed settings: {}; training continues from step {} with the new values (a changed schedule makes the LR jump)",
                changed.join(", "),
                s.step
            );
            header_changed = true;
        }
        tracing::info!(
            "resumed from {} at step {} (epoch {}, micro-batch {} of it)",
            dir.display(),
            s.step,
            s.epoch + 1,
            s.micro_in_epoch
        );
        state = s;
        // The settings of this run from here on.
        state.seed = seed;
        state.batch_size = Some(t.batch_size);
        state.accumulation = Some(accum);
    }

    // Plugins.
    let run_info = RunInfo {
        total_steps: total,
        warmup_steps: warmup,
        accumulation: accum as u32,
        batch_size: t.batch_size as u32,
        effective_batch_size: eff.effective_batch_size as u32,
        base_lr: t.learning_rate,
        scheduler: t.lr_scheduler.clone(),
        dataset_size: train_ids.len() as u32,
        steps_per_epoch: eff.steps_per_epoch as u64,
        seed,
        start_step: state.step + 1,
    };
    let runtime = Runtime::new(opts.cache_dir.clone())?;
    let mut plugins = PluginSet::load(runtime, &specs, &run_info)?;
    // (After everything that can refuse to start, the plugins included: a start that fails
    // leaves the folder as it was.)
    // A fresh run into a folder that holds an earlier run: the earlier run's outputs are set
    // aside, so the two never mix (pruning, --resume and best/ would otherwise pick across them)
    // and nothing written before is lost.
    // A resume from an earlier checkpoint sets the branch after it aside (only now, after
    // everything that can refuse the resume: a refused one moves nothing).
    if resume_dir.is_some() {
        set_aside_abandoned_branch(&ckpt_root, &out_dir, state.step, state.best.as_ref())?;
    } else if let Some(to) = set_aside_earlier_run(&out_dir, &log_dir)? {
        tracing::warn!(
            "{} held an earlier run: its outputs were moved to {} (to continue a run instead, pass --resume)",
            out_dir.display(),
            to.display()
        );
    }
    for p in plugins.plugins() {
        tracing::info!("plugin {} {} ({})", p.name(), p.manifest().version, p.path().display());
    }
    // Several LR plugins form a chain: each gets the LR the one before settled on.
    let lr_chain: Vec<&str> = plugins
        .plugins()
        .iter()
        .filter(|p| p.manifest().hooks.contains(&crate::plugin::Hook::LrSchedule))
        .map(|p| p.name())
        .collect();
    if lr_chain.len() > 1 {
        tracing::warn!(
            "{} plugins set the LR: {} (in this order, each is handed the previous one's LR as scheduled_lr; the last one that answers decides)",
            lr_chain.len(),
            lr_chain.join(" -> ")
        );
    }
    if !state.plugin_states.is_empty() {
        let states: HashMap<String, Vec<u8>> =
            state.plugin_states.iter().filter_map(|(k, v)| Some((k.clone(), unhex(v)?))).collect();
        let restored = plugins.restore(&states);
        if !restored.is_empty() {
            tracing::info!("restored plugin state: {}", restored.join(", "));
        }
        let loaded: Vec<String> = plugins.plugins().iter().map(|p| p.name().to_string()).collect();
        for name in states.keys().filter(|k| !restored.contains(k)) {
            if loaded.contains(name) {
                tracing::warn!("plugin {name} did not accept its checkpoint state: it starts fresh");
            } else {
                tracing::warn!(
                    "the checkpoint holds state for plugin {name}, which this run does not load: that state is dropped (add the plugin back to keep it)"
                );
            }
        }
    }
    if opts.hot_reload && !plugins.is_empty() {
        plugins.enable_hot_reload()?;
    }
    plugins.step_boundary();

    let header = RunHeader {
        total_steps: total,
        warmup_steps: warmup,
        accumulation: accum as u32,
        batch_size: t.batch_size as u32,
        effective_batch_size: eff.effective_batch_size as u32,
        base_lr: t.learning_rate,
        scheduler: t.lr_scheduler.clone(),
        dataset_size: train_ids.len() as u32,
        steps_per_epoch: eff.steps_per_epoch as u64,
        seed,
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    crate::fsutil::write_atomic(&out_dir.join(CONFIG_RECORD), record_text.as_bytes())
        .with_context(|| format!("writing {}", out_dir.join(CONFIG_RECORD).display()))?;
    let metrics_path = log_dir.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics_path, &header, resume_dir.as_ref().map(|_| state.step))?;
    let this_session = session::Session::now(state.step);
    log.line(&this_session.record());
    let mut memory_watch = session::MemoryWatch::default();
    end.metrics = Some(metrics_path.clone());
    end.step = state.step;
    let mut tensorboard = tensorboard::TensorBoardLog::open(
        &log_dir,
        cfg.output.tensorboard(),
        resume_dir.as_ref().map(|_| state.step),
    );
    let mut train_curve: Vec<(u64, f64)> = Vec::new();

    let mut val_curve: Vec<(u64, f64)> = Vec::new();
    // A resumed run keeps its history: the loss curves, the validation before training, and
    // the latest validation for the plugins (as if the run had not stopped).
    let mut resumed_initial: Option<f64> = None;
    let mut resumed_val_extra: Vec<NamedValue> = Vec::new();
    if resume_dir.is_some() {
        if header_changed {
            log.line(&serde_json::json!({ "run": header }).to_string());
        }
        if let Ok(trace) = crate::metrics::Trace::read(&metrics_path) {
            train_curve = trace.steps.iter().map(|s| (s.step, s.loss)).collect();
        }
        for line in std::fs::read_to_string(&metrics_path).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let (Some("validation"), Some(at), Some(loss)) =
                (v["event"].as_str(), v["step"].as_u64(), v["loss"].as_f64())
            else {
                continue;
            };
            if at > state.step {
                continue;
            }
            if at == 0 {
                resumed_initial = Some(loss);
            }
            val_curve.push((at, loss));
            let mut extra = vec![
                NamedValue { name: "validation.step".into(), value: at as f64 },
                NamedValue { name: "validation.loss".into(), value: loss },
            ];
            for k in ["map", "ap50", "cgf1"] {
                if let Some(x) = v["metrics"][k].as_f64() {
                    extra.push(NamedValue { name: format!("validation.{k}"), value: x });
                }
            }
            for (k, name) in [("f1", "pixel_f1"), ("relaxed_f1", "relaxed_f1"), ("cldice", "cldice")] {
                if let Some(x) = v["pixel"][k].as_f64() {
                    extra.push(NamedValue { name: format!("validation.{name}"), value: x });
                }
            }
            resumed_val_extra = extra;
        }
    }

    let metric_name = cfg.evaluation.metric.to_ascii_lowercase();
    let metric_name = if metric_name == "iou" { "map".to_string() } else { metric_name };
    let want_metrics_during = cfg.evaluation.compute_metrics_during_training || metric_name != "loss";
    let mut uncomputable_warned = false;
    if let Some(b) = state.best.as_ref().filter(|b| b.metric != metric_name) {
        tracing::warn!(
            "evaluation.metric is now {metric_name}, the checkpoint's best was chosen by {} ({:.4} at step {}): best/ is replaced at the next validation, and compared by {metric_name} from then on",
            b.metric,
            b.value,
            b.step
        );
        state.best = None;
    }
    let sample_opts = |index_in_split: usize, epoch: u32, split: &Split| {
        SampleOptions::plain(
            image_size,
            mask_size,
            t.num_negatives,
            SplitMix64::from_parts(&[seed, epoch as u64, split.images[index_in_split].id]).next_u64(),
        )
    };
    let mut summary = TrainSummary { output_dir: out_dir.clone(), ..Default::default() };
    let run_validation = |model: &Sam3Model, with_metrics: bool| -> Result<Option<ValidationResult>> {
        let Some(vs) = valid_split.as_ref() else { return Ok(None) };
        if valid_ids.is_empty() {
            return Ok(None);
        }
        lora.set_training(false);
        let set = ValidationSet {
            split: vs,
            ids: &valid_ids,
            tokenizer: &tokenizer,
            image_size,
            mask_size,
            negatives: t.num_negatives,
            seed,
            batch_size: t.batch_size,
            // Pictures of the predictions for the TensorBoard log.
            panels: if cfg.output.tensorboard() {
                validate::Panels::First(VALIDATION_PANELS)
            } else {
                validate::Panels::None
            },
        };
        let r = validate(model, &set, &base_weights, with_metrics)?;
        Ok(Some(r))
    };

    // The latest validation results, handed to every later step's hook (and recorded with it)
    // as `validation.*` extra values: what an early-stopping plugin reads.
    let mut val_extra: Vec<NamedValue> = resumed_val_extra;
    summary.initial_validation_loss = resumed_initial;
    let mut slow_watch = slowdown::SlowdownWatch::default();
    // Baseline validation before any update (fresh runs).
    if state.step == 0 {
        let baseline = match run_validation(&model, false) {
            Err(e) if validate::is_interrupted(&e) => {
                return Err(interrupt::StoppedBeforeFirstStep("during the validation before training").into())
            }
            r => r?,
        };
        if let Some(v) = baseline {
            tracing::info!("validation before training: loss {:.4}", v.loss);
            summary.initial_validation_loss = Some(v.loss);
            val_curve.push((0, v.loss));
            val_extra = validation_extra(0, &v);
            let event =
                serde_json::json!({"event": "validation", "step": 0, "loss": v.loss, "losses": v.terms});
            log.line(&event.to_string());
            tensorboard.validation(0, &event);
            tensorboard.images(0, &v.panels);
        }
    }

    let stop_at = opts.max_steps.map_or(total, |m| m.min(total));
    let progress = Progress {
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        start: Instant::now(),
        total,
        first: state.step,
        end: stop_at,
    };
    // The micro-batches: the config's, until one does not fit on the device (then smaller ones,
    // as many more, for the same samples per optimizer step).
    let (mut micro_size, mut micro_accum) = (t.batch_size, accum);
    let mut micro_per_epoch = eff.micro_batches_per_epoch as u64;
    let mut consecutive_nonfinite = 0u32;
    // Micro-batches in a row that ran out of device memory, and the ones to fail on purpose.
    let mut oom_streak = 0u32;
    let inject_oom = injected_oom();
    let inject_nan_update = injected_nan_update();
    let mut range_watch = crate::lr_find::DivergenceWatch::default();
    // Diagnosis codes already reported during this run.
    let mut diagnosed: BTreeSet<String> = BTreeSet::new();
    let mut lr_capped_warned = false;
    let save = |state: &TrainerState, opt: &AdamW, plugins: &mut PluginSet| -> Result<PathBuf> {
        let mut s = state.clone();
        s.plugin_states = plugins.snapshots().into_iter().map(|(k, v)| (k, crate::fsutil::hex(&v))).collect();
        let dir = checkpoint::save(&ckpt_root, &lora, &base_name, opt, &s, &record_text)?;
        let removed = checkpoint::prune(&ckpt_root, t.save_total_limit, s.best.as_ref().map(|b| b.step));
        for r in removed {
            tracing::debug!("save_total_limit {}: removed {}", t.save_total_limit, r.display());
        }
        tracing::info!("checkpoint {}", dir.display());
        Ok(dir)
    };

    // Ctrl-C while starting up (loading, the validation before training): nothing trained in
    // this run yet, nothing to save.
    if interrupt::requested() {
        return Err(interrupt::StoppedBeforeFirstStep("before the first step of this run").into());
    }
    'outer: while state.step < stop_at {
        let step = state.step + 1;
        let step_start = Instant::now();
        let mut step_heap_peak = crate::alloc_stats::live();
        // A new epoch: its order.
        if state.micro_in_epoch == 0 || state.epoch_order.is_empty() {
            let metas: Vec<SampleMeta> = train_ids
                .iter()
                .enumerate()
                .map(|(k, &i)| {
                    let im = &train_split.images[i];
                    let mut cats: Vec<u32> = im.objects.iter().map(|o| o.category_id as u32).collect();
                    cats.sort_unstable();
                    cats.dedup();
                    SampleMeta {
                        index: k as u32,
                        object_count: im.objects.len() as u32,
                        categories: cats,
                        last_loss: state.sample_stats[k].0.unwrap_or(f64::NAN),
                        times_seen: state.sample_stats[k].1,
                    }
                })
                .collect();
            state.epoch_order = plugins
                .epoch_order(state.epoch, &metas)
                .unwrap_or_else(|| shuffled(train_ids.len(), &[seed, 0xE70C, state.epoch as u64]));
        }
        // Micro-batches of this step.
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut micro = 0u32;
        // Micro-batches that reached the gradients (not skipped for memory).
        let mut done = 0u32;
        let mut loss_sum = 0.0;
        let mut term_sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut applied_weights: BTreeMap<String, f64> = BTreeMap::new();
        let mut images = 0u32;
        let mut objects = 0u32;
        let mut batch_ids: Vec<u64> = Vec::new();
        let epoch_of_step = state.epoch;
        let mut oom_in_step = false;
        let mut regrouped: Option<RunHeader> = None;
        while (micro as usize) < micro_accum && state.micro_in_epoch < micro_per_epoch {
            let pos = (state.micro_in_epoch as usize) * micro_size;
            let mut ks: Vec<u32> = state.epoch_order.iter().skip(pos).take(micro_size).copied().collect();
            if let Some(ids) = plugins.next_batch(&BatchRequest {
                step,
                micro_step: micro,
                epoch: state.epoch,
                batch_size: ks.len() as u32,
                dataset_size: train_ids.len() as u32,
            }) {
                ks = ids;
            }
            let idx: Vec<usize> = ks.iter().map(|&k| train_ids[k as usize]).collect();
            let sopts: Vec<SampleOptions> = idx
                .iter()
                .map(|&i| {
                    let draw = t.augment.draw(seed, state.epoch, train_split.images[i].id);
                    sample_opts(i, state.epoch, &train_split).augmented(&draw)
                })
                .collect();
            let heap_data = crate::alloc_stats::live();
            crate::alloc_stats::reset_peak();
            let samples = build_samples(&train_split, &idx, &sopts, t.num_workers.max(1))?;
            let batch = collate(&samples, mask_size, &device)?;
            let data_peak = crate::alloc_stats::peak().saturating_sub(heap_data);
            step_heap_peak = step_heap_peak.max(crate::alloc_stats::peak());
            let micro_objects: u32 =
                samples.iter().flat_map(|s| &s.queries).map(|q| q.boxes.len() as u32).sum();

            crate::rng::reseed(&[seed, step, micro as u64]);
            lora.set_training(true);
            let mut weights = base_weights.clone();
            let exemplar: Vec<bool> = (0..batch.queries.len())
                .map(|qi| {
                    t.box_prompt_prob > 0.0
                        && SplitMix64::from_parts(&[seed, 0xB0C5, step, micro as u64, qi as u64]).next_f64()
                            < t.box_prompt_prob
                })
                .collect();
            crate::sam3::recompute::clear_side_grads(); // nothing left from an aborted backward
            let heap_before = crate::alloc_stats::live();
            crate::alloc_stats::reset_peak();
            // A micro-batch that does not fit on the device is skipped (its graph dropped); the
            // step goes on with the others (so it ends where it would have in the epoch), and
            // the run stops after it when too many in a row failed.
            let ids: Vec<u64> = samples.iter().map(|s| s.image_id).collect();
            let shrinks = smaller_micro_batch(micro_size, micro_accum).is_some();
            let skipped = |e: anyhow::Error, streak: &mut u32, log: &mut MetricsLog| {
                skip_out_of_memory(e, (step, micro), &ids, micro_objects, shrinks, streak, log)
            };
            let injected = inject_oom.iter().any(|&(s, m)| s == step && m.is_none_or(|m| m == micro));
            // The layer ops' LoRA gradients go to the side store, merged after backward.
            let forward = if injected {
                Err(anyhow::anyhow!(
                    "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (injected by LORAHOST_INJECT_OOM)"
                ))
            } else {
                crate::sam3::recompute::with_side_grads(|| {
                    batch_loss(&model, &batch, &tokenizer, &weights, true, &exemplar)
                })
            };
            let (mut loss, out) = match forward {
                Ok(v) => v,
                Err(e) => {
                    skipped(e, &mut oom_streak, &mut log)?;
                    oom_in_step = true;
                    micro += 1;
                    state.micro_in_epoch += 1;
                    continue;
                }
            };
            let heap_forward = crate::alloc_stats::live();
            if !plugins.is_empty() {
                let terms: Vec<LossTerm> = WEIGHTED_TERMS
                    .iter()
                    .map(|n| LossTerm {
                        name: n.to_string(),
                        value: loss.terms.get(*n).copied().unwrap_or(0.0),
                        weight: weights.term_mut(n).map(|w| *w).unwrap_or(0.0),
                    })
                    .collect();
                let factors = plugins
                    .loss_weights(&MicroBatchInfo { step, micro_step: micro, epoch: state.epoch }, &terms);
                if factors.iter().any(|f| *f != 1.0) {
                    for (n, f) in WEIGHTED_TERMS.iter().zip(&factors) {
                        if let Some(w) = weights.term_mut(n) {
                            *w *= f;
                        }
                    }
                    loss = sam3_loss(&out, &batch_targets(&batch), &weights)?;
                }
            }
            for n in WEIGHTED_TERMS {
                if let Some(w) = weights.term_mut(n) {
                    applied_weights.insert(n.to_string(), *w);
                }
            }
            let scaled =
                if state.loss_scale != 1.0 { (&loss.total * state.loss_scale)? } else { loss.total.clone() };
            let backward = scaled.backward().map_err(anyhow::Error::from).and_then(|mut grads| {
                crate::sam3::recompute::merge_side_grads(&mut grads)?;
                Ok(grads)
            });
            drop(scaled);
            let grads = match backward {
                Ok(g) => g,
                Err(e) => {
                    drop((loss, out));
                    skipped(e, &mut oom_streak, &mut log)?;
                    oom_in_step = true;
                    micro += 1;
                    state.micro_in_epoch += 1;
                    continue;
                }
            };
            oom_streak = 0;
            done += 1;
            images += samples.len() as u32;
            objects += micro_objects;
            batch_ids.extend(&ids);
            let lv = loss.terms.get("total").copied().unwrap_or(f64::NAN);
            loss_sum += lv;
            for (k, v) in &loss.terms {
                *term_sums.entry(k.clone()).or_default() += v;
            }
            let heap_peak = crate::alloc_stats::peak();
            step_heap_peak = step_heap_peak.max(heap_peak);
            if tracing::enabled!(target: "lorahost::memory", tracing::Level::DEBUG) {
                // What `lorahost doctor` predicts for this very micro-batch, beside what it held.
                let queries = batch.queries.len();
                let e = crate::memory::estimate(model.config(), &memory_shape, samples.len(), queries);
                let mib = |b: u64| b as f64 / 1048576.0;
                let f = crate::memory::features_by_part(model.config(), samples.len(), queries);
                tracing::debug!(
                    target: "lorahost::memory",
                    step,
                    micro,
                    images = samples.len(),
                    queries,
                    data_pipeline_mib = mib(data_peak),
                    before_mib = mib(heap_before),
                    forward_graph_mib = mib(heap_forward.saturating_sub(heap_before)),
                    peak_mib = mib(heap_peak),
                    estimate_graph_mib = mib(e.activations),
                    estimate_peak_mib = mib(e.total),
                    largest_attention_mib = 4.0
                        * crate::memory::largest_attention(model.config(), &memory_shape.adapted, samples.len(), queries)
                        / 1048576.0,
                    features = serde_json::to_string(&f).unwrap_or_default(),
                    "heap during the micro-batch"
                );
            }
            for (a, v) in acc.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *a = Some(match a.take() {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    });
                }
            }
            // Each image's own loss for the data-sampling hooks (its queries through the loss
            // alone, detached); without a sampler plugin, the micro-batch's loss.
            let samplers = plugins.plugins().iter().any(|p| p.implements(crate::plugin::Hook::DataSampling));
            let per_image = if samplers {
                per_image_losses(&out, &batch, &weights, ks.len())?
            } else {
                vec![lv; ks.len()]
            };
            plugins.observe(&ks, &per_image);
            for (&k, &l) in ks.iter().zip(&per_image) {
                let s = &mut state.sample_stats[k as usize];
                s.0 = Some(l);
                s.1 += 1;
            }
            micro += 1;
            state.micro_in_epoch += 1;
        }
        if state.micro_in_epoch >= micro_per_epoch {
            state.epoch += 1;
            state.micro_in_epoch = 0;
        }
        // A micro-batch ran out of device memory: smaller ones from the next step on, as many
        // more, so each optimizer step keeps its samples (what `--resume` with the same product
        // does, done at once).
        if let Some(smaller) = smaller_micro_batch(micro_size, micro_accum).filter(|_| oom_in_step) {
            let more = micro_size * micro_accum / smaller;
            if let Some(position) =
                regroup(state.micro_in_epoch, Some(micro_size), Some(micro_accum), smaller, more)
            {
                tracing::warn!(
                    "step {step}: micro-batches of {micro_size} images do not fit on the device: from step {} on, {smaller} images x {more} micro-batches per optimizer step (the same {} samples per step; to start so: training.batch_size: {smaller}, gradient_accumulation_steps: {more})",
                    step + 1,
                    smaller * more
                );
                log.line(
                    &serde_json::json!({"event": "micro_batches", "step": step, "batch_size": smaller,
                        "accumulation": more, "from": {"batch_size": micro_size, "accumulation": micro_accum}})
                    .to_string(),
                );
                // A header for the steps after this one (readers take each header's grouping).
                regrouped = Some(RunHeader {
                    batch_size: smaller as u32,
                    accumulation: more as u32,
                    ..header.clone()
                });
                (micro_size, micro_accum) = (smaller, more);
                micro_per_epoch = train_ids.len().div_ceil(smaller) as u64;
                state.micro_in_epoch = position;
                state.batch_size = Some(smaller);
                state.accumulation = Some(more);
                oom_streak = 0;
            }
        }
        let n_micro = done.max(1) as f64;
        let loss = if done == 0 { f64::NAN } else { loss_sum / n_micro };
        let losses: BTreeMap<String, f64> = term_sums.into_iter().map(|(k, v)| (k, v / n_micro)).collect();

        // Gradients: average, inspect, guard, clip. A parameter no micro-batch reached has no
        // gradient: zeros for the statistics, and the optimizer leaves it alone.
        let has_grad: Vec<bool> = acc.iter().map(Option::is_some).collect();
        let grads: Vec<Tensor> = acc
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| match g {
                // (One kernel per tensor saved when there is nothing to divide by.)
                Some(g) if n_micro * state.loss_scale == 1.0 => Ok(g),
                Some(g) => g / (n_micro * state.loss_scale),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let members: Vec<Vec<&Tensor>> =
            groups.iter().map(|(_, ix)| ix.iter().map(|&i| &grads[i]).collect()).collect();
        let named: Vec<(&str, &[&Tensor])> =
            groups.iter().zip(&members).map(|((name, _), gs)| (name.as_str(), gs.as_slice())).collect();
        let stats = group_stats_many(&named)?;
        let total_norm = stats.iter().map(|s| s.sum_sq).sum::<f64>().sqrt();
        if step == 1 {
            // F9: an adapter whose B gets no gradient on the first step is on no path to the loss.
            let dead = dead_adapters(lora.vars().keys(), &grads)?;
            if !dead.is_empty() {
                tracing::warn!(
                    "F9: {} adapted module(s) got no gradient on step 1 (not on the path from the prompts to the loss; e.g. geometry box projections with text-only prompts, see training.box_prompt_prob): {}",
                    dead.len(),
                    dead.join(", ")
                );
            }
        }
        let nonfinite: u64 = stats.iter().map(|s| s.nonfinite).sum();
        // Plugins read NaN as "not known" (a replayed trace without it): a norm training could
        // not compute is +inf to them.
        let hook_norm = if total_norm.is_finite() { total_norm } else { f64::INFINITY };
        let report = GradReport {
            step,
            total_norm: hook_norm,
            max_norm: t.max_grad_norm,
            groups: stats
                .iter()
                .map(|s| GradGroup {
                    name: s.name.clone(),
                    l2_norm: s.sum_sq.sqrt(),
                    max_abs: s.max_abs,
                    nonfinite: s.nonfinite,
                    numel: s.numel,
                })
                .collect(),
        };
        let veto = if done == 0 { None } else { plugins.on_grads(&report).veto };
        let mut action = "continue".to_string();
        let mut reason: Option<String> = None;
        let mut decided_by: Option<String> = None;
        let mut applied = false;
        let scheduled = match opts.lr_range {
            Some(r) => r.lr_at(step),
            None => schedule::lr_at(scheduler, t.learning_rate, step, warmup, total),
        };
        let lr = plugins.lr_for_step(&LrRequest {
            step,
            total_steps: total,
            warmup_steps: warmup,
            base_lr: t.learning_rate,
            scheduled_lr: scheduled,
            last_loss: state.last_loss.unwrap_or(f64::NAN),
        }) * state.lr_scale;
        // scale-lr answers compound; the LR used stays within the bound a plugin's own LR has.
        let lr = if lr > crate::plugin::MAX_LR {
            if !lr_capped_warned {
                tracing::warn!(
                    "step {step}: the LR after plugin scale-lr factors ({lr:.3e}, scale {}) is above {}; capped there",
                    state.lr_scale,
                    crate::plugin::MAX_LR
                );
                lr_capped_warned = true;
            }
            crate::plugin::MAX_LR
        } else {
            lr
        };
        let mut clipped_norm = total_norm;
        let mut diverged: Option<String> = None;
        let mut optimizer_failed: Option<String> = None;
        if done == 0 {
            // Every micro-batch ran out of memory: nothing to apply, and nothing diverged.
            state.skipped_steps += 1;
            action = "skip".into();
            reason = Some("every micro-batch ran out of device memory".into());
        } else if nonfinite > 0 || !loss.is_finite() {
            consecutive_nonfinite += 1;
            state.skipped_steps += 1;
            action = "skip".into();
            reason = Some(if loss.is_finite() {
                format!("{nonfinite} non-finite gradient entries")
            } else {
                "non-finite loss".to_string()
            });
            let dump = out_dir.join("nonfinite_batches.jsonl");
            let line = serde_json::json!({"step": step, "epoch": epoch_of_step, "image_ids": batch_ids, "loss": if loss.is_finite() { Some(loss) } else { None }, "nonfinite_grads": nonfinite});
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&dump) {
                let _ = writeln!(f, "{line}");
            }
            if state.loss_scale > 1.0 {
                state.loss_scale /= 2.0;
                state.loss_scale_good_steps = 0;
                tracing::warn!("step {step}: non-finite fp16 gradients; loss scale now {}", state.loss_scale);
            } else {
                tracing::warn!("step {step}: non-finite loss or gradients ({nonfinite} entries); update skipped, image ids in {}", dump.display());
            }
            if consecutive_nonfinite >= 10 {
                // Stops after this step's record is written.
                diverged = Some(format!(
                    "{consecutive_nonfinite} non-finite steps in a row (see {}): training diverged; lower training.learning_rate (now {}), check the loss weights (`loss:`) and the images listed there, and resume from the last good checkpoint",
                    dump.display(),
                    t.learning_rate
                ));
            }
        } else if let Some((plugin, why)) = veto {
            state.skipped_steps += 1;
            action = "skip".into();
            tracing::warn!("step {step}: update vetoed by plugin {plugin}: {why}");
            reason = Some(why);
            decided_by = Some(plugin);
            consecutive_nonfinite = 0;
        } else {
            consecutive_nonfinite = 0;
            let clip = if t.max_grad_norm > 0.0 && total_norm > t.max_grad_norm {
                let f = t.max_grad_norm / (total_norm + 1e-6);
                clipped_norm = total_norm * f;
                f
            } else {
                1.0
            };
            let present: Vec<Option<&Tensor>> =
                grads.iter().zip(&has_grad).map(|(g, h)| h.then_some(g)).collect();
            opt.step_scaled(&present, lr, clip)?;
            applied = true;
            // The update itself must leave finite weights (the gradients were): one more pass of
            // the statistics kernel over the adapters. Otherwise the optimizer, not the data, made
            // them NaN/Inf (e.g. AdamW's 0/0 with adam_epsilon 0): undone, and the run stops
            // rather than training on, and saving, broken adapters.
            if inject_nan_update == Some(step) {
                vars[0].set(&(vars[0].as_tensor() * f64::NAN)?)?;
            }
            let bad = nonfinite_weights(&groups, &vars)?;
            if !bad.is_empty() {
                opt.rollback()?;
                applied = false;
                state.skipped_steps += 1;
                action = "skip".into();
                let why = format!(
                    "step {step}: the AdamW update turned LoRA weights NaN/Inf in {} although the loss and the gradients were finite: the optimizer step, not the images, caused it: check training.adam_epsilon ({:e}; it must be well above 0, the default is 1e-8), the learning rate applied ({lr:e}) and training.weight_decay ({}). The update was undone and the run stopped; nothing of this step is saved. Fix the setting, then resume from the last checkpoint (--resume) or start again",
                    bad.join(", "),
                    t.adam_epsilon,
                    t.weight_decay
                );
                reason = Some("the optimizer update made LoRA weights non-finite".into());
                optimizer_failed = Some(why);
            }
            if state.loss_scale > 1.0 {
                state.loss_scale_good_steps += 1;
                if state.loss_scale_good_steps >= 2000 {
                    state.loss_scale *= 2.0;
                    state.loss_scale_good_steps = 0;
                }
            }
        }
        state.step = step;
        state.last_loss = Some(loss);

        // The step-metrics hook.
        let step_ms = step_start.elapsed().as_secs_f64() * 1e3;
        if let Some(slow) = slow_watch.observe(step_ms) {
            tracing::warn!(
                "step {step}: steps now take {:.1}x as long as at the start of this run ({:.0} ms -> {:.0} ms, medians): on Windows this is GPU memory spilling into shared system memory (lower training.batch_size or turn on training.gradient_checkpointing); otherwise look for another process on the device, or thermal throttling (seed-trainer F14)",
                slow.factor(),
                slow.baseline_ms,
                slow.recent_ms
            );
            log.line(
                &serde_json::json!({"event": "slowdown", "step": step, "baseline_ms": slow.baseline_ms, "recent_ms": slow.recent_ms})
                    .to_string(),
            );
        }
        // The host's memory against what the OOM killer allows: said before it acts.
        let host = session::HostMemory::now(this_session.memory_limit_bytes);
        // The run's peak so far: the device's tensor memory on CUDA, else the process's.
        let mem = crate::gpu::peak_memory(&device).map(|(held, _)| held).unwrap_or(host.peak);
        if let Some(warning) = memory_watch.observe(&host) {
            tracing::warn!("step {step}: {warning}");
            log.line(
                &serde_json::json!({"event": "memory_pressure", "step": step, "rss_bytes": host.rss,
                    "limit_bytes": host.limit, "available_bytes": host.available, "total_bytes": host.total,
                    "message": warning})
                .to_string(),
            );
        }
        let terms_for_hook: Vec<LossTerm> = WEIGHTED_TERMS
            .iter()
            .map(|n| LossTerm {
                name: n.to_string(),
                value: losses.get(*n).copied().unwrap_or(0.0),
                weight: applied_weights.get(*n).copied().unwrap_or(0.0),
            })
            .collect();
        // A step that trained nothing (every micro-batch out of memory) is not shown to the
        // plugins: its loss is not a value they could judge.
        let neutral = StepDecision {
            action: Action::Continue,
            decided_by: None,
            lr_scale: 1.0,
            checkpoint: false,
            answers: Vec::new(),
        };
        let decision = if done == 0 {
            neutral
        } else {
            plugins.on_step(&StepMetrics {
                step,
                micro_steps: done,
                epoch: epoch_of_step,
                total_steps: total,
                warmup_steps: warmup,
                loss,
                losses: terms_for_hook,
                lr,
                grad_norm: hook_norm,
                grad_norm_clipped: if clipped_norm.is_finite() { clipped_norm } else { f64::INFINITY },
                batch_size: images,
                object_count: objects,
                step_time_ms: step_ms,
                memory_bytes: mem,
                extra: std::iter::once(NamedValue {
                    name: "skipped_steps".into(),
                    value: state.skipped_steps as f64,
                })
                .chain(val_extra.iter().cloned())
                .collect(),
            })
        };
        let mut stop: Option<String> = None;
        let mut want_checkpoint = decision.checkpoint;
        // A step already skipped (non-finite, vetoed) stays `skip` under a milder answer.
        let milder =
            matches!(decision.action, Action::ScaleLr(_) | Action::Checkpoint) && action != "continue";
        if !matches!(decision.action, Action::Continue) && !milder {
            decided_by = decision.decided_by.clone();
        }
        match &decision.action {
            Action::Skip(why) => {
                if applied {
                    opt.rollback()?;
                    state.skipped_steps += 1;
                }
                action = "skip".into();
                tracing::warn!(
                    "step {step}: plugin {} skipped the step: {why}",
                    decision.decided_by.as_deref().unwrap_or("?")
                );
                reason = Some(why.clone());
            }
            Action::Stop(why) => {
                // Another plugin's skip on the same step still rolls the update back.
                if applied && decision.answers.iter().any(|(_, a)| matches!(a, Action::Skip(_))) {
                    opt.rollback()?;
                    state.skipped_steps += 1;
                }
                action = "stop".into();
                stop = Some(format!("plugin {}: {why}", decision.decided_by.as_deref().unwrap_or("?")));
                want_checkpoint = true;
                reason = Some(why.clone());
            }
            _ if milder => {}
            Action::ScaleLr(_) => {
                action = "scale_lr".into();
                reason = Some(format!("LR scaled by {}", decision.lr_scale));
            }
            Action::Checkpoint => {
                action = "checkpoint".into();
                reason = Some("checkpoint requested".into());
            }
            Action::Continue => {}
        }
        if oom_streak >= OOM_STOP_AFTER && stop.is_none() {
            let why = format!(
                "{OOM_STOP_AFTER} micro-batches in a row ran out of device memory (micro-batches of {micro_size} images); a checkpoint of step {step} is saved. Fix: {OOM_FIX}"
            );
            action = "stop".into();
            reason = Some(why.clone());
            stop = Some(why);
            want_checkpoint = true;
            summary.out_of_memory = true;
        }
        if decision.lr_scale != 1.0 {
            state.lr_scale *= decision.lr_scale;
            tracing::info!("step {step}: LR scale now {} (plugin scale-lr)", state.lr_scale);
        }
        state.optimizer_updates = opt.updates();

        // Record.
        let mut rec = StepRecord::new(step, loss, lr, total_norm);
        rec.grad_norm_clipped = Some(clipped_norm);
        rec.micro_steps = Some(done);
        rec.epoch = Some(epoch_of_step);
        rec.total_steps = Some(total);
        rec.warmup_steps = Some(warmup);
        rec.losses =
            WEIGHTED_TERMS.iter().filter_map(|n| losses.get(*n).map(|v| (n.to_string(), *v))).collect();
        rec.loss_weights = applied_weights.clone();
        rec.batch_size = Some(images);
        rec.object_count = Some(objects);
        rec.step_time_ms = Some(step_ms);
        rec.memory_bytes = Some(mem);
        if !device.is_cpu() {
            // The host's side too: what the OOM killer goes by (read back by `session`).
            rec.extra.insert("host_peak_bytes".into(), serde_json::json!(host.peak));
        }
        rec.heap_peak_bytes = Some(step_heap_peak.max(crate::alloc_stats::peak())).filter(|p| *p > 0);
        rec.grad_groups = report
            .groups
            .iter()
            .map(|g| GradGroupRecord {
                name: g.name.clone(),
                l2_norm: g.l2_norm,
                max_abs: g.max_abs,
                nonfinite: g.nonfinite,
                numel: g.numel,
            })
            .collect();
        for v in &val_extra {
            rec.extra.insert(v.name.clone(), serde_json::json!(v.value));
        }
        rec.action = Some(action.clone());
        rec.reason = reason;
        rec.decided_by = decided_by;
        for (k, v) in plugins.take_metrics() {
            rec.extra.insert(k, serde_json::json!(v));
        }
        for e in plugins.take_events() {
            log.line(&event_json(step, &e).to_string());
        }
        log.line(&rec.to_json_line());
        if let Some(h) = regrouped.take() {
            log.line(&serde_json::json!({ "run": h }).to_string());
        }
        end.step = step;
        tensorboard.step(&rec);
        if let Some(why) = optimizer_failed.take() {
            bail!(why);
        }
        if let Some(why) = diverged.take() {
            summary.stopped = Some(why);
            break 'outer;
        }
        if let Some(why) = opts.lr_range.and_then(|_| range_watch.observe(loss)) {
            tracing::info!("LR range test: stopping after step {step} at LR {lr:.3e}: {why}");
            summary.stopped = Some(why);
            break 'outer;
        }
        train_curve.push((step, loss));
        progress.draw(step, epoch_of_step + 1, loss, lr);
        if t.logging_steps > 0 && step.is_multiple_of(t.logging_steps as u64) {
            // Epochs are counted from 1 on the console, like steps (0-based in the state).
            let epoch_shown = epoch_of_step + 1;
            let epochs = if opts.lr_range.is_some() {
                total.div_ceil(eff.steps_per_epoch.max(1) as u64) as usize
            } else {
                t.num_epochs
            };
            tracing::info!("step {step}/{total} epoch {epoch_shown}/{epochs} loss {loss:.4} lr {lr:.3e} grad_norm {total_norm:.3} -> {clipped_norm:.3} {step_ms:.0} ms {action}");
        }

        // Ctrl-C / SIGTERM (installed by the command line): save and stop after this step,
        // without the validation a normal last step gets.
        if stop.is_none() && interrupt::requested() {
            progress.finish();
            tracing::warn!(
                "interrupted: saving a checkpoint at step {step}, then stopping (Ctrl-C again quits at once)"
            );
            stop = Some(interrupted_reason(step, opts));
            want_checkpoint = true;
            summary.interrupted = true;
        }

        // Cadences.
        let epoch_done = state.micro_in_epoch == 0;
        let last = state.step >= stop_at || stop.is_some();
        let eval_now = if t.eval_steps > 0 { step.is_multiple_of(t.eval_steps as u64) } else { epoch_done };
        // An interrupted step still runs its scheduled validation (a resume would not redo it),
        // but not the extra one of a last step.
        if (eval_now || (last && !summary.interrupted)) && valid_split.is_some() {
            let validation = match run_validation(&model, want_metrics_during || last) {
                // Ctrl-C during the validation: it is dropped, the step is saved, the run stops.
                Err(e) if validate::is_interrupted(&e) => {
                    progress.finish();
                    tracing::warn!(
                        "interrupted during the validation of step {step}: it is not recorded; saving a checkpoint at step {step}, then stopping (Ctrl-C again quits at once)"
                    );
                    if stop.is_none() {
                        stop = Some(interrupted_reason(step, opts));
                    }
                    want_checkpoint = true;
                    summary.interrupted = true;
                    None
                }
                r => r?,
            };
            if let Some(v) = validation {
                progress.finish();
                tracing::info!(
                    "step {step}: validation loss {:.4}{}{}",
                    v.loss,
                    v.summary
                        .map(|s| format!(
                            " mAP {:.4} AP50 {:.4} cgF1 {:.2} (pmF1 {:.3}, IL_MCC {:.3})",
                            s.map, s.ap50, s.cgf1, s.pmf1, s.il_mcc
                        ))
                        .unwrap_or_default(),
                    v.pixel
                        .map(|p| format!(
                            "; pixel F1 {:.3}, ±{} px {:.3}, clDice {:.3}",
                            p.f1, p.tolerance, p.relaxed_f1, p.cldice
                        ))
                        .unwrap_or_default()
                );
                val_curve.push((step, v.loss));
                val_extra = validation_extra(step, &v);
                let event = serde_json::json!({"event": "validation", "step": step, "loss": v.loss, "losses": v.terms, "metrics": v.summary, "pixel": v.pixel});
                log.line(&event.to_string());
                if opts.lr_range.is_none() {
                    for line in live_diagnosis(&metrics_path, t.max_grad_norm, step, &mut diagnosed) {
                        log.line(&line);
                    }
                }
                tensorboard.validation(step, &event);
                tensorboard.images(step, &v.panels);
                let value = match metric_name.as_str() {
                    "map" => v.summary.map(|s| s.map),
                    "cgf1" => v.summary.map(|s| s.cgf1),
                    "pixel_f1" => v.pixel.map(|p| p.f1),
                    "relaxed_f1" => v.pixel.map(|p| p.relaxed_f1),
                    "cldice" => v.pixel.map(|p| p.cldice),
                    _ => Some(v.loss),
                };
                if let Some(value) = value {
                    if !computable(&metric_name, value) && !uncomputable_warned {
                        uncomputable_warned = true;
                        tracing::warn!(
                            "step {step}: evaluation.metric {metric_name} cannot be computed on this validation split (COCO mask mAP is {value}: no validation object has a usable mask); best/ is not chosen by it. Use evaluation.metric: loss (or add masks to the validation annotations)"
                        );
                    }
                    let previous = state.best.clone();
                    let better = is_better(&metric_name, value, v.loss, previous.as_ref());
                    if better {
                        state.best =
                            Some(Best { metric: metric_name.clone(), value, step, loss: Some(v.loss) });
                        write_adapter_dir(&out_dir.join("best"), &lora, &base_name)?;
                        // A tie in the metric goes to the lower validation loss: said so.
                        let tie =
                            match previous.as_ref().filter(|b| b.metric == metric_name && b.value == value) {
                                Some(b) => format!(
                                    " (tied with step {}; lower validation loss {:.4} < {:.4})",
                                    b.step,
                                    v.loss,
                                    b.loss.unwrap_or(f64::NAN)
                                ),
                                None => String::new(),
                            };
                        tracing::info!(
                            "new best {metric_name} {value:.4} at step {step}{tie}: {}",
                            out_dir.join("best").display()
                        );
                    }
                }
                summary.final_validation = Some(v);
            }
        }
        let save_now = if t.save_steps > 0 { step.is_multiple_of(t.save_steps as u64) } else { epoch_done };
        if opts.lr_range.is_none() && (save_now || want_checkpoint || last) {
            save(&state, &opt, &mut plugins)?;
        }
        plugins.step_boundary();
        if let Some(reason) = stop {
            tracing::warn!("stopping after step {step}: {reason}");
            summary.stopped = Some(reason);
            break;
        }
    }
    progress.finish();

    // Final outputs (an LR range test's adapters are not a model anyone should use).
    if opts.lr_range.is_none() {
        write_adapter_dir(&out_dir.join("adapter"), &lora, &base_name)?;
    }
    if !cfg.output.save_lora_only && !summary.interrupted && opts.lr_range.is_none() {
        let merged = out_dir.join("merged");
        crate::export::write_merged(&model_path, &lora, &merged)?;
        tracing::info!("merged full weights: {}", merged.display());
    }
    if cfg.evaluation.save_predictions && !summary.interrupted && opts.lr_range.is_none() {
        if let Some(vs) = valid_split.as_ref() {
            lora.set_training(false);
            let path = out_dir.join("predictions.json");
            let set = ValidationSet {
                split: vs,
                ids: &valid_ids,
                tokenizer: &tokenizer,
                image_size,
                mask_size,
                negatives: t.num_negatives,
                seed,
                batch_size: t.batch_size,
                panels: validate::Panels::None,
            };
            match validate::write_predictions(&model, &set, &path) {
                Err(e) if validate::is_interrupted(&e) => {
                    tracing::warn!(
                        "interrupted: the validation predictions are not written (the adapters are)"
                    );
                    summary.interrupted = true;
                }
                r => {
                    r?;
                    tracing::info!("validation predictions: {}", path.display());
                }
            }
        }
    }
    if state.step < total && state.step >= stop_at && summary.stopped.is_none() && !summary.interrupted {
        tracing::info!(
            "stopped at --max-steps {} (step {} of {total}); continue with: {}",
            stop_at,
            state.step,
            resume_command(opts)
        );
    }
    let png = out_dir.join("loss_curve.png");
    plot::write_loss_curve(&png, &train_curve, &val_curve)?;
    tracing::info!("loss curve: {} (training loss per step, light blue; smoothed, dark blue; validation, orange; log scale)", png.display());
    if opts.lr_range.is_none() {
        run_diagnosis_summary(&metrics_path, cfg.training.max_grad_norm);
    }
    summary.steps = state.step;
    end.reason = Some(if summary.interrupted {
        "interrupted"
    } else if summary.out_of_memory {
        "out_of_memory"
    } else if summary.stopped.is_some() {
        "stopped"
    } else if state.step >= total {
        "completed"
    } else {
        "max_steps"
    });
    end.detail = summary.stopped.clone();
    summary.skipped_steps = state.skipped_steps;
    let run_json = serde_json::json!({
        "config": std::path::absolute(&opts.config).unwrap_or_else(|_| opts.config.clone()),
        "model": {"name": cfg.model.name, "path": model_path},
        "hub_model_id": cfg.output.hub_model_id,
        "dataset": fp,
        "lora": {"modules": lora.modules.len(), "parameters": lora.num_params(), "rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "use_rslora": lora_cfg.use_rslora},
        "effective": {"batch_size": eff.effective_batch_size, "total_steps": total, "warmup_steps": warmup, "steps_per_epoch": eff.steps_per_epoch},
        "precision": t.mixed_precision.to_ascii_lowercase(),
        "dtype": dtype.as_str(),
        "device": cfg.hardware.device,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "best": state.best,
        "stopped": summary.stopped,
        "initial_validation_loss": summary.initial_validation_loss,
        "final_validation": summary.final_validation,
    });
    crate::fsutil::write_atomic(
        &out_dir.join("run.json"),
        serde_json::to_string_pretty(&run_json)?.as_bytes(),
    )?;
    Ok(summary)
}

/// Modules whose `lora_B` gradient is exactly zero (names without the PEFT prefix/suffix).
pub fn dead_adapters<'a>(keys: impl Iterator<Item = &'a String>, grads: &[Tensor]) -> Result<Vec<String>> {
    let mut dead = Vec::new();
    for (k, g) in keys.zip(grads) {
        if let Some(module) = k.strip_suffix(".lora_B.weight") {
            if g.abs()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? == 0.0 {
                dead.push(module.trim_start_matches("base_model.model.").to_string());
            }
        }
    }
    Ok(dead)
}

/// The loss of each of a micro-batch's `images` on its own: the outputs and targets of its
/// queries (detached) through [`sam3_loss`] as a batch of those queries. NaN for an image
/// without a query.
fn per_image_losses(
    out: &crate::sam3::model::Sam3Outputs,
    batch: &Batch,
    weights: &LossWeights,
    images: usize,
) -> Result<Vec<f64>> {
    let targets = batch_targets(batch);
    let device = out.pred_logits.device();
    let mut losses = Vec::with_capacity(images);
    for i in 0..images {
        let idx: Vec<u32> = batch
            .queries
            .iter()
            .enumerate()
            .filter(|(_, q)| q.image_index == i)
            .map(|(k, _)| k as u32)
            .collect();
        if idx.is_empty() {
            losses.push(f64::NAN);
            continue;
        }
        let ix = Tensor::new(idx.as_slice(), device)?;
        let pick = |t: &Tensor, dim: usize| t.detach().contiguous()?.index_select(&ix, dim);
        let own = crate::sam3::model::Sam3Outputs {
            pred_logits: pick(&out.pred_logits, 0)?,
            pred_boxes: pick(&out.pred_boxes, 0)?,
            presence_logits: pick(&out.presence_logits, 0)?,
            pred_masks: pick(&out.pred_masks, 0)?,
            semantic_seg: pick(&out.semantic_seg, 0)?,
            all_logits: pick(&out.all_logits, 1)?,
            all_boxes_cxcywh: pick(&out.all_boxes_cxcywh, 1)?,
            all_presence: pick(&out.all_presence, 1)?,
            all_masks: pick(&out.all_masks, 0)?,
            num_o2m: out.num_o2m,
        };
        let own_targets: Vec<Targets> = idx.iter().map(|&k| targets[k as usize].clone()).collect();
        let l = sam3_loss(&own, &own_targets, weights)?;
        losses.push(l.terms.get("total").copied().unwrap_or(f64::NAN));
    }
    Ok(losses)
}

fn batch_targets(batch: &Batch) -> Vec<Targets> {
    batch
        .boxes
        .iter()
        .zip(&batch.masks)
        .zip(&batch.queries)
        .map(|((b, m), q)| Targets {
            boxes: b.clone(),
            masks: Some(m.clone()),
            mask_valid: if q.mask_valid.iter().all(|v| *v) { None } else { Some(q.mask_valid.clone()) },
        })
        .collect()
}

/// Write a PEFT adapter directory atomically (replacing an older one only once complete).
pub fn write_adapter_dir(dir: &Path, lora: &LoraSet, base: &str) -> Result<()> {
    let tmp = checkpoint::partial_dir(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    lora.save_peft(&tmp, base)?;
    checkpoint::replace_dir(&tmp, dir)?;
    Ok(())
}

fn event_json(step: u64, e: &PluginEvent) -> serde_json::Value {
    match e {
        PluginEvent::Failed { plugin, hook, reason } => {
            serde_json::json!({"event": "plugin_failed", "step": step, "plugin": plugin, "hook": hook, "reason": reason})
        }
        PluginEvent::Recovered { plugin, state_restored } => {
            serde_json::json!({"event": "plugin_recovered", "step": step, "plugin": plugin, "state_restored": state_restored})
        }
        PluginEvent::Disabled { plugin, reason } => {
            serde_json::json!({"event": "plugin_disabled", "step": step, "plugin": plugin, "reason": reason})
        }
        PluginEvent::Reloaded { plugin, from_version, to_version, sha256, state_carried, .. } => {
            serde_json::json!({
                "event": "plugin_reloaded", "step": step, "plugin": plugin, "from_version": from_version,
                "to_version": to_version, "sha256": sha256, "state_carried": state_carried
            })
        }
        PluginEvent::ReloadRejected { plugin, path, reason } => serde_json::json!({
            "event": "plugin_reload_rejected", "step": step, "plugin": plugin, "path": path, "reason": reason
        }),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_micro_batch_that_does_not_fit_is_halved_where_the_step_allows() {
        assert_eq!(smaller_micro_batch(8, 2), Some(4));
        assert_eq!(smaller_micro_batch(2, 1), Some(1));
        // 6 x 1: 3 divides 6; 3 x 1: only 1.
        assert_eq!(smaller_micro_batch(6, 1), Some(3));
        assert_eq!(smaller_micro_batch(3, 1), Some(1));
        // 5 x 2 = 10: 2 (5 is not at most half of 5).
        assert_eq!(smaller_micro_batch(5, 2), Some(2));
        assert_eq!(smaller_micro_batch(1, 16), None);
    }

    #[test]
    fn micro_batches_regroup_only_into_the_same_steps() {
        // 3 micro-batches of 4 (6 of 2, 12 of 1) into the epoch, 8 samples per step either way.
        assert_eq!(regroup(3, Some(4), Some(2), 2, 4), Some(6));
        assert_eq!(regroup(4, Some(1), Some(8), 4, 2), Some(1));
        assert_eq!(regroup(0, Some(4), Some(2), 8, 1), Some(0));
        // A position inside a new micro-batch, another product: no.
        assert_eq!(regroup(1, Some(2), Some(4), 4, 2), None);
        assert_eq!(regroup(2, Some(4), Some(2), 2, 2), None);
        // An old value not recorded is taken as unchanged.
        assert_eq!(regroup(2, None, Some(2), 4, 2), Some(2));
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short_duration(44.6), "45s");
        assert_eq!(short_duration(725.0), "12m05s");
        assert_eq!(short_duration(3.0 * 3600.0 + 4.0 * 60.0 + 59.0), "3h04m");
        assert_eq!(short_duration(-1.0), "0s");
    }

    #[test]
    fn device_strings_open_what_they_name() {
        let with = |d: &str| TrainConfig {
            hardware: crate::train_config::HardwareSection { device: d.into(), ..Default::default() },
            ..Default::default()
        };
        assert!(device_for(&with("cpu")).unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            // auto falls back to the CPU; a named GPU is an error naming the setting.
            assert!(device_for(&with("auto")).unwrap().is_cpu());
            let e = format!("{:#}", device_for(&with("cuda:1")).unwrap_err());
            assert!(e.contains("cuda:1"), "{e}");
        }
    }

    #[test]
    fn a_diverged_validation_is_never_the_best() {
        let best = |value| Best { metric: "loss".into(), value, step: 1, loss: Some(5.0) };
        assert!(!is_better("loss", f64::NAN, 1.0, None));
        assert!(!is_better("map", f64::INFINITY, 1.0, Some(&best(0.1))));
        assert!(is_better("loss", 2.0, 2.0, Some(&best(f64::NAN))));
        assert!(
            is_better("loss", 2.0, 2.0, Some(&best(3.0))) && !is_better("loss", 4.0, 4.0, Some(&best(3.0)))
        );
        assert!(
            is_better("map", 0.4, 9.0, Some(&best(0.3))) && !is_better("map", 0.2, 1.0, Some(&best(0.3)))
        );
        // A tie in mAP goes to the lower validation loss; an older best without a loss keeps it.
        assert!(
            is_better("map", 0.0, 4.0, Some(&best(0.0))) && !is_better("map", 0.0, 6.0, Some(&best(0.0)))
        );
        assert!(!is_better("map", 0.0, 4.0, Some(&Best { loss: None, ..best(0.0) })));
        // A tie in both the metric and the loss is no improvement.
        assert!(
            !is_better("map", 0.0, 5.0, Some(&best(0.0))) && !is_better("loss", 5.0, 5.0, Some(&best(5.0)))
        );
        // mAP -1 (cannot be computed: no ground-truth masks) never selects a best, and a stored
        // -1 is beaten by any measured mAP; another metric's -1 is a value (cgF1 is signed).
        assert!(!is_better("map", -1.0, 1.0, None) && !is_better("map", -1.0, 1.0, Some(&best(-1.0))));
        assert!(is_better("map", 0.0, 9.0, Some(&best(-1.0))));
        assert!(is_better("cgf1", -1.0, 1.0, None));
    }

    /// Continuing a metrics log keeps the records up to the resume point and sets aside, never
    /// drops, the later records and the lines that are not JSON (bytes that are not UTF-8
    /// included); a log that exists but cannot be read is an error, not replaced.
    #[test]
    fn metrics_log_on_resume_loses_no_line() {
        let dir = std::env::temp_dir().join(format!("lorahost-metrics-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let mut body = b"{\"run\":{}}\n{\"step\":1}\n{\"step\":2}\n".to_vec();
        body.extend_from_slice(b"\xff\xfe garbage\n{\"step\":3}\n");
        std::fs::write(&path, &body).unwrap();
        drop(MetricsLog::open(&path, &RunHeader::default(), Some(2)).unwrap());
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("metrics.jsonl").lines().count(), 3, "{}", read("metrics.jsonl"));
        assert_eq!(read("metrics.abandoned-after-step-2.jsonl").trim(), "{\"step\":3}");
        assert!(read("metrics.unreadable.jsonl").contains("garbage"));
        let blocked = dir.join("blocked.jsonl");
        std::fs::create_dir_all(&blocked).unwrap();
        let e = MetricsLog::open(&blocked, &RunHeader::default(), Some(2)).map(|_| ()).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Training's overrides: a key that names no setting is an error that says where the key
    /// lives; doctor's lenient mode keeps it; the command line wins over the file, whichever
    /// name the file gives the setting (SAM3_LoRA's aliases and legacy keys).
    #[test]
    fn overrides_refuse_unknown_keys_and_replace_every_spelling() {
        let set = |o: &[&str]| o.iter().map(|o| o.to_string()).collect::<Vec<_>>();
        let e = parse_overrides(&set(&["batch_size=2"]), true).unwrap_err().to_string();
        assert!(e.contains("--override") && e.contains("training.batch_size"), "{e}");
        let e = parse_overrides(&set(&["training.batch_sise=2"]), true).unwrap_err().to_string();
        assert!(e.contains("training.batch_size"), "{e}");
        assert_eq!(parse_overrides(&set(&["training.batch_sise=2"]), false).unwrap().len(), 1);
        let e = parse_overrides(&set(&["training.batch_size"]), true).unwrap_err().to_string();
        assert!(e.contains("SECTION.KEY=VALUE"), "{e}");
        let read = |yaml: &str, o: &[&str]| {
            let o = parse_overrides(&set(o), true).unwrap();
            TrainConfig::from_yaml_overridden(yaml, Path::new("c.yaml"), &o)
        };
        let (c, _) = read("training:\n  batch_size: 4\n", &["training.batch_size=2"]).unwrap();
        assert_eq!(c.training.batch_size, 2);
        let (c, _) = read("", &["lora.rank=8"]).unwrap();
        assert_eq!(c.lora.rank, 8);
        // SAM3_LoRA's legacy data paths, its standalone layout and an alias: replaced, said so.
        let legacy = "training:\n  train_data_path: data/train\n  val_data_path: data/valid\n  epochs: 3\n";
        let (c, notes) = read(legacy, &["training.data_dir=/elsewhere", "training.num_epochs=5"]).unwrap();
        assert_eq!(c.training.data_dir, Path::new("/elsewhere"));
        assert_eq!(c.training.num_epochs, 5);
        let said: Vec<&String> =
            notes.read_as.iter().filter(|n| n.contains("replaced by --override")).collect();
        assert_eq!(said.len(), 3, "{notes:?}");
        let standalone = "dataset:\n  data_root: ./data\ncheckpoint:\n  save_dir: ./ck\n";
        let (c, notes) = read(standalone, &["training.data_dir=/d", "output.output_dir=/o"]).unwrap();
        assert_eq!(
            (c.training.data_dir.as_path(), c.output.output_dir.as_path()),
            (Path::new("/d"), Path::new("/o"))
        );
        assert!(notes.iter().all(|n| !n.contains("not read")), "{notes:?}");
        // An override given under the alias replaces lorahost's own key in the file.
        let (c, _) = read("training:\n  num_epochs: 10\n", &["training.epochs=2"]).unwrap();
        assert_eq!(c.training.num_epochs, 2);
        let (c, _) = read("training:\n  mixed_precision: bf16\n", &["training.fp16=true"]).unwrap();
        assert_eq!(c.training.mixed_precision, "fp16");
    }
}
