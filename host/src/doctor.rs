//! `lorahost doctor`: the diagnosis of a training setup that people did by hand, automated.
//!
//! Findings carry the failure-mode codes of `../shared/docs/seed-trainer.md` §8 (F1..F27) where
//! one applies, otherwise a lorahost code (`D1`..), each with a severity, a message, the
//! evidence and the fix. Checks, in order:
//!
//! - **config** (F11, F10, F7, F25, F26, D1..D4): the YAML parses; unknown keys; each
//!   contradiction as its own finding with its own fix (the other checks still run, except those
//!   that need a value named by one); what `train` refuses at start (an unknown `loss:` term,
//!   `hardware.device: cuda` on a build without CUDA or a machine without a device); the
//!   effective batch, total length and warmup in optimizer steps and epochs (warmup longer than
//!   training, an effective batch larger than the training set, an effective batch of 1), LR and
//!   clipping sanity, LoRA scale, adapters already in `output_dir` with another rank/alpha;
//! - **data** (F12, F1, F4, F5, F6, F7, F20, F21, F23, F24, F26, D6, D8, D9): `data_dir` and its splits,
//!   the fingerprint (compared with `--expect-fingerprint`), the preflight (by file and id; boxes
//!   in another format for most objects are an error), box-only objects (no mask loss, mAP −1),
//!   train/valid prompts that differ or classes numbered differently, the negatives per image
//!   the data actually gives; with `--gt-overlays DIR` pictures of the targets as training
//!   builds them (boxes and masks on the model input) for a person to look at;
//! - **LoRA** (F8, F9, F7): the module table built from the real model code over the
//!   checkpoint's shapes (no weights are read), zero matches, flags that match nothing, the
//!   trainable fraction;
//! - **plugins** (D7): each configured plugin loads as training would load it;
//! - **probe** (`--probe-steps N`, F10, F1, F2, F9, F21, D5): N real optimizer steps in a scratch
//!   directory, then loss variation, per-term losses, gradient-norm distribution, how often
//!   clipping engaged and the LR actually applied, with recommendations;
//! - **trace** (`--trace FILE`, F10, F11, F14, F15, F27, D10, D11 and the probe's checks): a
//!   recorded run's metrics log, alone or beside a config ([`crate::run_diagnosis`]).
//!
//! | lorahost code | meaning |
//! |---|---|
//! | D1 | warmup as long as or longer than the run, or most of it |
//! | D2 | effective batch larger than the training set (one partial optimizer step per epoch) |
//! | D3 | LR outside the usual LoRA range |
//! | D4 | LoRA scale alpha / rank outside [0.5, 4] (changing rank without alpha changes the step size) |
//! | D5 | clipping engaged on most probe steps (the effective LR is lower than configured) |
//! | D6 | no validation split |
//! | D7 | a configured plugin is missing or does not load (contract, compile, `init` refuses its config) |
//! | D8 | train and valid prompts differ (validation measures prompts never trained on), or the splits number their classes differently |
//! | D9 | an image with more objects of one prompt than the decoder has queries |
//! | D10 | a recorded run's loss does not improve beneath its noise, or rises |
//! | D11 | loss spikes in a recorded run |
//! | D12 | with the config's `target_modules`, SAM3_LoRA adapted other layers than lorahost (it matched them against Meta's original names) |

use crate::data::coco::{Dataset, FindingKind, Severity as DataSeverity};
use crate::lora::{Component, LoraConfig, LoraSet};
use crate::plugin::{PluginSet, PluginSpec, RunInfo, Runtime};
use crate::train::TrainOptions;
use crate::train_config::{TrainConfig, TrainConfigError};
use anyhow::Result;
use candle_core::{DType, Device};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Training runs but likely not as intended.
    Warning,
    /// Training fails or is wrong.
    Error,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// F-code from seed-trainer.md §8 or a lorahost D-code (module docs).
    pub code: String,
    /// Severity.
    pub severity: Severity,
    /// What is wrong.
    pub message: String,
    /// What shows it (numbers, files, ids).
    pub evidence: String,
    /// What to do.
    pub fix: String,
}

/// What to diagnose.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// The training YAML.
    pub config: PathBuf,
    /// `section.key=value` overrides.
    pub overrides: Vec<String>,
    /// The dataset fingerprint (`content_sha256`) the run is meant to use.
    pub expect_fingerprint: Option<String>,
    /// Real optimizer steps to run and analyse (0 = none).
    pub probe_steps: u64,
    /// Memory of the training device in GiB (default: available host memory on the CPU;
    /// unknown on CUDA unless given).
    pub device_memory_gb: Option<f64>,
    /// Host RAM in GiB (default: what the machine has available now).
    pub host_memory_gb: Option<f64>,
    /// Where compiled plugins are cached (None: no cache), as for `train`.
    pub cache_dir: Option<PathBuf>,
    /// Write ground-truth overlays (the images as training sees them, targets drawn) here.
    pub gt_overlays: Option<PathBuf>,
    /// Images per split to draw with `gt_overlays` (0: 8).
    pub gt_overlay_images: usize,
    /// A recorded run's metrics log to diagnose as well ([`crate::run_diagnosis`]).
    pub trace: Option<PathBuf>,
}

/// The report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Findings, most severe first.
    pub findings: Vec<Finding>,
    /// Key numbers (effective hyperparameters, LoRA table, fingerprint, probe statistics).
    pub facts: BTreeMap<String, serde_json::Value>,
}

impl Report {
    /// Add a finding.
    pub(crate) fn add(
        &mut self,
        code: &str,
        severity: Severity,
        message: impl Into<String>,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.findings.push(Finding {
            code: code.into(),
            severity,
            message: message.into(),
            evidence: evidence.into(),
            fix: fix.into(),
        });
    }

    /// Whether any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// Findings with `code`.
    pub fn with_code(&self, code: &str) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.code == code).collect()
    }

    /// Human-readable text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if self.findings.is_empty() {
            s.push_str("no findings\n");
        }
        for f in &self.findings {
            let sev = match f.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "warning",
                Severity::Info => "info",
            };
            s.push_str(&format!(
                "[{}] {sev}: {}\n    evidence: {}\n    fix: {}\n",
                f.code, f.message, f.evidence, f.fix
            ));
        }
        // The key numbers, one line each (the full list of data findings and nested details are
        // for --json; the findings above summarize them).
        let facts: Vec<_> = self.facts.iter().filter(|(k, _)| k.as_str() != "data_findings").collect();
        if !facts.is_empty() {
            s.push_str("\nfacts (--json prints them in full):\n");
        }
        for (k, v) in facts {
            s.push_str(&format!("  {k}: {}\n", fact_line(v)));
        }
        s
    }
}

/// A fact on one line: scalars as they are, an object's scalar entries as `key value`, nested
/// values counted; cut at 200 characters.
fn fact_line(v: &serde_json::Value) -> String {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) | Value::Null => Some(v.to_string()),
        Value::Array(a) => Some(format!("[{} items]", a.len())),
        Value::Object(_) => None,
    };
    let line = match v {
        Value::Object(m) => {
            m.iter().filter_map(|(k, v)| scalar(v).map(|s| format!("{k} {s}"))).collect::<Vec<_>>().join(", ")
        }
        other => scalar(other).unwrap_or_default(),
    };
    if line.chars().count() > 200 {
        format!("{}…", line.chars().take(200).collect::<String>())
    } else {
        line
    }
}

/// Run every check (see the module docs). Errors only for problems that stop the diagnosis
/// itself; everything about the setup is a finding.
pub fn diagnose(opts: &DoctorOptions) -> Result<Report> {
    let mut r = Report::default();
    let (cfg, broken) = match config_checks(opts, &mut r) {
        Some(c) => c,
        None => return Ok(finish(r)),
    };
    // Each check runs on the parsed config unless it needs a value the config got wrong
    // (already reported above, one finding per contradiction).
    let data_ok = if broken.any(&["training.data_dir"]) { false } else { data_checks(&cfg, opts, &mut r) };
    if let Some(dir) = opts.gt_overlays.as_deref().filter(|_| data_ok) {
        gt_overlays(&cfg, dir, opts.gt_overlay_images, &mut r);
    }
    let lora_ok = if broken.any(&["lora.rank", "lora.target_modules", "lora.apply_to"]) {
        false
    } else {
        let memory = !broken.any(&[
            "training.batch_size",
            "training.mixed_precision",
            "hardware.device",
            "training.data_dir",
        ]);
        lora_checks(&cfg, &mut r, (opts.device_memory_gb, opts.host_memory_gb), memory)
    };
    let plugins_ok = plugin_checks(&cfg, opts, &mut r);
    if opts.probe_steps > 0 {
        if data_ok && lora_ok && plugins_ok && !r.has_errors() {
            probe(&cfg, opts, &mut r);
        } else {
            r.add(
                "D0",
                Severity::Info,
                "probe skipped",
                "the checks above found errors",
                "fix them, then run doctor --probe-steps again",
            );
        }
    }
    if let Some(path) = &opts.trace {
        trace_checks(path, Some(cfg.training.max_grad_norm), &mut r)?;
    }
    Ok(finish(r))
}

/// `doctor --trace FILE` without a config: the recorded run alone ([`crate::run_diagnosis`]).
pub fn diagnose_trace(path: &std::path::Path) -> Result<Report> {
    let mut r = Report::default();
    trace_checks(path, None, &mut r)?;
    Ok(finish(r))
}

fn trace_checks(path: &std::path::Path, max_norm: Option<f64>, r: &mut Report) -> Result<()> {
    let trace =
        crate::metrics::Trace::read(path).map_err(|e| anyhow::anyhow!("--trace {}: {e}", path.display()))?;
    if trace.steps.is_empty() {
        anyhow::bail!("--trace {}: the log has no step records to diagnose", path.display());
    }
    let validation = crate::run_diagnosis::validations(path, &trace);
    // The config's threshold, else the one the log's own record of the settings names.
    let max_norm = max_norm.or(trace.max_grad_norm);
    crate::run_diagnosis::analyse_run(&trace, &validation, max_norm.filter(|m| *m > 0.0), r);
    let log = if path.is_dir() { path.join("metrics.jsonl") } else { path.to_path_buf() };
    ending_checks(&log, r);
    Ok(())
}

/// F13 / D13 from a lorahost log: how its last session ended ([`crate::train::session`]) and
/// the micro-batches that ran out of device memory.
fn ending_checks(log: &std::path::Path, r: &mut Report) {
    use crate::train::session::Ending;
    let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("\"event\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let named = |name: &'static str| events.iter().filter(move |v| v["event"] == name);
    let ooms: Vec<u64> = named("out_of_memory").filter_map(|v| v["step"].as_u64()).collect();
    if !ooms.is_empty() {
        let mut steps = ooms.clone();
        steps.dedup();
        // The micro-batches the run made smaller, the last of them.
        let smaller = named("micro_batches").next_back();
        let (then, fix) = match &smaller {
            Some(v) => (
                format!(
                    "; from step {} on the run trained in micro-batches of {} x {}",
                    v["step"].as_u64().unwrap_or(0) + 1,
                    v["batch_size"],
                    v["accumulation"]
                ),
                format!(
                    "start such runs with micro-batches that fit (training.batch_size: {}, gradient_accumulation_steps: {}) so that no micro-batch is lost, or: {}",
                    v["batch_size"],
                    v["accumulation"],
                    crate::train::OOM_FIX
                ),
            ),
            None => (String::new(), crate::train::OOM_FIX.to_string()),
        };
        r.add(
            "F13",
            Severity::Warning,
            format!("{} micro-batch(es) ran out of device memory and were skipped", ooms.len()),
            format!(
                "`out_of_memory` events at step(s) {} (each with its images and objects in the log){then}",
                steps.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            ),
            fix,
        );
    }
    if let Some(v) = named("memory_pressure").next() {
        r.add(
            "F13",
            Severity::Warning,
            format!("the host's memory was nearly exhausted at step {}", v["step"]),
            v["message"].as_str().unwrap_or("").split(". Fix: ").next().unwrap_or("").to_string(),
            crate::train::session::MEMORY_FIX,
        );
    }
    let ending = crate::train::session::ending_of(&text, &crate::train::session::Session::now(0));
    match &ending {
        Ending::Unrecorded { .. } => {
            let evidence = ending.describe().unwrap_or_default();
            if ending.oom_killed() {
                r.add(
                    "F13",
                    Severity::Error,
                    "the run was killed by the OOM killer",
                    evidence,
                    crate::train::session::MEMORY_FIX,
                );
            } else {
                r.add(
                    "D13",
                    Severity::Warning,
                    "the run's last session ended without a record: killed or crashed",
                    evidence,
                    "`lorahost train --config C --resume` continues from its newest checkpoint; if memory ran out, lower training.batch_size (doctor --config C predicts the peak)",
                );
            }
        }
        Ending::Running(s) => r.add(
            "D13",
            Severity::Info,
            "the run is still going",
            format!(
                "process {} on {} is writing this log (its session started at step {})",
                s.pid, s.host, s.step
            ),
            "none needed",
        ),
        Ending::Recorded { step, reason, detail }
            if reason == "out_of_memory" || reason == "error" || reason == "panic" =>
        {
            let (code, severity) =
                if reason == "out_of_memory" { ("F13", Severity::Error) } else { ("D13", Severity::Warning) };
            r.add(
                code,
                severity,
                format!("the run's last session failed at step {step} ({reason})"),
                detail
                    .as_deref()
                    .map(|d| d.split(". Fix: ").next().unwrap_or(d).to_string())
                    .unwrap_or_else(|| "no message recorded (a panic: its message is on that run's stderr)".into()),
                if reason == "out_of_memory" { crate::train::OOM_FIX } else { "see the message; `lorahost train --config C --resume` continues from the newest checkpoint" },
            );
        }
        _ => {}
    }
}

/// F5/F24/F6: pictures of the targets as training builds them (the model's square input, and
/// with `training.augment` also the flipped, zoomed-out variant), for a person to look at, of
/// the train, valid and test splits. Images that cannot be read are skipped, each listed in
/// The config of the model `cfg` names, when it resolves and reads (the LoRA checks report
/// why not).
fn model_config(cfg: &TrainConfig) -> Option<crate::sam3::config::Sam3Config> {
    let path = crate::train::resolve_model(cfg).ok()?;
    crate::sam3::config::Sam3Config::from_file(&model_config_path(&path)).ok().map(|(c, _)| c)
}

/// overlays.json with its error and counted in the finding.
fn gt_overlays(cfg: &TrainConfig, dir: &std::path::Path, images: usize, r: &mut Report) {
    use crate::data::batch::SampleOptions;
    // The folder, or a folder on its way that would have to be created inside a file.
    if let Some(file) = dir.ancestors().find(|a| a.exists() && !a.is_dir()) {
        r.add(
            "F5",
            Severity::Warning,
            "ground-truth overlays could not be written",
            if file == dir {
                format!("--gt-overlays {}: a file, not a folder", dir.display())
            } else {
                format!("--gt-overlays {}: {} is a file, not a folder", dir.display(), file.display())
            },
            "give --gt-overlays a folder (it is created if missing) for the overlay PNGs and overlays.json",
        );
        return;
    }
    let model_config = model_config(cfg);
    // Without the model's config (reported by the LoRA checks) SAM3's own sizes are drawn.
    let (image_size, mask_size) = model_config
        .map(|c| (c.vision_config.backbone_config.image_size, c.target_mask_size()))
        .unwrap_or((1008, 288));
    let Ok(ds) = Dataset::load(&cfg.training.data_dir) else { return };
    let t = &cfg.training;
    let ds = ds.with_generic_negatives(&t.generic_negatives);
    let base = SampleOptions::plain(image_size, mask_size, t.num_negatives, t.seed as u64);
    let images = if images == 0 { 8 } else { images };
    // An image that cannot be read is listed with its error and skipped: the others are drawn.
    let mut entries = Vec::new();
    for name in ["train", "valid", "test"] {
        let Some(split) = ds.split(name) else { continue };
        let augment = if name == "train" { t.augment } else { crate::data::augment::Augmentation::NONE };
        match crate::data::overlay::write_overlays(split, &base, images, &augment, dir) {
            Ok(e) => entries.extend(e),
            Err(e) => {
                r.add(
                    "F5",
                    Severity::Warning,
                    "ground-truth overlays could not be written",
                    e.to_string(),
                    "see the message (a folder or file that cannot be written)",
                );
                return;
            }
        }
    }
    let written: Vec<_> = entries.iter().filter_map(|e| e.written()).collect();
    let failed: Vec<_> = entries.iter().filter_map(|e| e.failed()).collect();
    let index = dir.join("overlays.json");
    let body = serde_json::to_vec_pretty(&entries).unwrap_or_default();
    if let Err(e) = crate::fsutil::write_atomic(&index, &body) {
        r.add(
            "F5",
            Severity::Warning,
            "the overlay index could not be written",
            format!("{}: {e}", index.display()),
            "check the folder's permissions",
        );
    }
    let mut legend: BTreeMap<String, [u8; 3]> = BTreeMap::new();
    for q in written.iter().flat_map(|w| &w.queries) {
        if let Some(c) = q.color {
            legend.insert(q.prompt.clone(), c);
        }
    }
    r.facts.insert(
        "gt_overlays".into(),
        serde_json::json!({
            "dir": dir,
            "images": written.len(),
            "skipped": failed.len(),
            "index": index,
            "colors": legend,
        }),
    );
    let skipped = if failed.is_empty() {
        String::new()
    } else {
        format!(
            "; {} image(s) could not be read and are skipped (listed in overlays.json with the error): {}{}",
            failed.len(),
            failed.iter().take(3).map(|f| f.error.as_str()).collect::<Vec<_>>().join("; "),
            if failed.len() > 3 { format!("; and {} more", failed.len() - 3) } else { String::new() }
        )
    };
    r.add(
        "F5",
        if written.is_empty() && !failed.is_empty() { Severity::Warning } else { Severity::Info },
        format!(
            "wrote {} ground-truth overlays ({image_size}² model input, {mask_size}² masks) to {}{}",
            written.len(),
            dir.display(),
            if failed.is_empty() { String::new() } else { format!(", {} image(s) skipped", failed.len()) }
        ),
        format!(
            "colours: {}; overlays.json lists each image's prompts, objects and box-only objects{skipped}",
            legend.iter().map(|(p, c)| format!("{p:?} rgb({}, {}, {})", c[0], c[1], c[2])).collect::<Vec<_>>().join(", ")
        ),
        "look at them: every box should sit on its object, every mask inside its box, each colour on its own class; a shifted or oversized box means a box-format problem (F4/F5), a rotated mask an EXIF one (F24)",
    );
}

/// D7: the config's plugins load as `train` will load them: the file is a component of this
/// contract, it compiles, and `init` accepts its config section for this run. Training refuses
/// to start on any of these, so they are errors here.
fn plugin_checks(cfg: &TrainConfig, opts: &DoctorOptions, r: &mut Report) -> bool {
    if cfg.plugins.is_empty() {
        return true;
    }
    let runtime = match Runtime::new(opts.cache_dir.clone()) {
        Ok(rt) => rt,
        Err(e) => {
            r.add("D7", Severity::Error, "the plugin runtime cannot start", e.to_string(), "see the message");
            return false;
        }
    };
    let t = &cfg.training;
    let n =
        Dataset::load(&t.data_dir).ok().and_then(|d| d.split("train").map(|s| s.images.len())).unwrap_or(0);
    let e = cfg.effective(n);
    let run = RunInfo {
        total_steps: e.total_steps as u64,
        warmup_steps: e.warmup_steps as u64,
        accumulation: t.gradient_accumulation_steps.max(1) as u32,
        batch_size: t.batch_size as u32,
        effective_batch_size: e.effective_batch_size as u32,
        base_lr: t.learning_rate,
        scheduler: t.lr_scheduler.clone(),
        dataset_size: n as u32,
        steps_per_epoch: e.steps_per_epoch as u64,
        seed: t.seed as u64,
        start_step: 1,
    };
    let specs: Vec<PluginSpec> = cfg
        .plugins
        .iter()
        .map(|p| PluginSpec { config: p.config.clone(), ..PluginSpec::new(&p.path) })
        .collect();
    let mut ok = true;
    let mut loaded = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let key = format!("plugins[{i}] ({})", spec.path.display());
        if !spec.path.is_file() {
            r.add(
                "D7",
                Severity::Error,
                format!("{key} does not exist"),
                format!("no file at {}", spec.path.display()),
                "build the plugin (cargo build --release --target wasm32-wasip2) or fix plugins[].path; relative paths are read from the working directory or the config's folder",
            );
            ok = false;
            continue;
        }
        match crate::plugin::check(runtime.clone(), spec, &run) {
            Ok(p) => loaded.push(serde_json::json!({
                "name": p.name(),
                "version": p.manifest().version,
                "hooks": p.manifest().hooks.iter().map(|h| h.wit_name()).collect::<Vec<_>>(),
                "path": spec.path,
            })),
            Err(e) => {
                r.add(
                    "D7",
                    Severity::Error,
                    format!("{key} does not load"),
                    format!("{e:#}"),
                    "fix the plugin or its config section (`lorahost plugin check FILE --config JSON` shows the same); train refuses to start with it",
                );
                ok = false;
            }
        }
    }
    if ok && specs.len() > 1 {
        // Names must differ (state, metrics and reload are keyed by name).
        if let Err(e) = PluginSet::load(runtime, &specs, &run) {
            r.add(
                "D7",
                Severity::Error,
                "the plugins cannot be loaded together",
                e.to_string(),
                "see the message",
            );
            ok = false;
        }
    }
    r.facts.insert("plugins".into(), serde_json::json!(loaded));
    ok
}

fn finish(mut r: Report) -> Report {
    r.findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    r
}

/// The config keys named by its contradictions (`training.batch_size`, `lora.apply_to_*`):
/// the checks that need one of them are skipped, the others run.
#[derive(Debug, Default)]
struct Broken(Vec<String>);

impl Broken {
    /// Whether any broken key starts with one of `prefixes`.
    fn any(&self, prefixes: &[&str]) -> bool {
        self.0.iter().any(|k| prefixes.iter().any(|p| k.starts_with(p)))
    }
}

/// One config problem as its own F11 error (`what: the problem's head`, its fix), the key it
/// names marked broken so the checks that need it are skipped.
/// The byte offsets just after each `sep` in `s` that is not inside backticks (a quoted
/// `key: value` is not where a message's head ends).
fn unquoted_ends(s: &str, sep: &str) -> Vec<usize> {
    s.match_indices(sep)
        .filter(|(i, _)| s[..*i].matches('`').count().is_multiple_of(2))
        .map(|(i, m)| i + m.len())
        .collect()
}

fn setting_problem(r: &mut Report, broken: &mut Broken, path: &Path, what: &str, problem: &str) {
    let (key, fix) = contradiction_fix(problem);
    let message = unquoted_ends(problem, ": ").first().map_or(problem, |&i| &problem[..i - 2]);
    r.add(
        "F11",
        Severity::Error,
        format!("{what}: {message}"),
        format!("{}: {problem}", path.display()),
        fix,
    );
    broken.0.push(key);
}

/// The config key a contradiction names (its first `section.key` word) and the fix it carries:
/// the part from its first imperative ("set ...", "use ..."), else one for the key.
fn contradiction_fix(problem: &str) -> (String, String) {
    let key = problem
        .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
        .map(|w| w.trim_matches('`'))
        .find(|w| {
            let section = w.split('.').next().unwrap_or("");
            w.contains('.')
                && ["model", "lora", "training", "output", "hardware", "evaluation", "loss", "plugins"]
                    .contains(&section)
        })
        .unwrap_or("")
        .to_string();
    let imperative = ["set ", "use ", "list ", "enable ", "give ", "remove ", "rename "];
    let from = unquoted_ends(problem, ": ")
        .into_iter()
        .chain(unquoted_ends(problem, "; "))
        .filter(|&i| imperative.iter().any(|v| problem[i..].starts_with(v)))
        .min();
    if let Some(i) = from {
        return (key, problem[i..].to_string());
    }
    let fix = match key.as_str() {
        "training.batch_size" => {
            "set training.batch_size >= 1 (e.g. 2; gradient_accumulation_steps keeps a larger effective batch)".into()
        }
        "training.num_epochs" => "set training.num_epochs >= 1".into(),
        "training.gradient_accumulation_steps" => "set training.gradient_accumulation_steps >= 1".into(),
        "lora.dropout" => "set lora.dropout in [0, 1) (0.0 .. 0.1 is usual)".into(),
        "training.learning_rate" => "set training.learning_rate to a LoRA rate such as 1e-4 (typically 1e-5 .. 1e-3)".into(),
        "training.max_grad_norm" => "set training.max_grad_norm >= 0 (1.0 is usual; 0 disables clipping)".into(),
        "training.box_prompt_prob" => "set training.box_prompt_prob in [0, 1]".into(),
        "training.weight_decay" => "set training.weight_decay >= 0 (e.g. 0.01)".into(),
        k if k.starts_with("training.adam_beta") => {
            "set training.adam_beta1 and adam_beta2 in [0, 1) (e.g. 0.9 and 0.999)".into()
        }
        "" => "change the setting the message names".into(),
        k => {
            let tail = unquoted_ends(problem, ": ").first().map_or("", |&i| &problem[i..]);
            if tail.is_empty() {
                format!("change {k}")
            } else {
                format!("{k}: {tail}")
            }
        }
    };
    (key, fix)
}

fn config_checks(opts: &DoctorOptions, r: &mut Report) -> Option<(TrainConfig, Broken)> {
    let path = &opts.config;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            r.add(
                "F26",
                Severity::Error,
                format!("cannot read {}", path.display()),
                e.to_string(),
                "pass --config with a training YAML (see configs/)",
            );
            return None;
        }
    };
    // Lenient: an override naming no setting is reported with the config's unknown keys
    // (F11 warning, with a suggestion) and the diagnosis goes on.
    let overrides = match crate::train::parse_overrides(&opts.overrides, false) {
        Ok(o) => o,
        Err(e) => {
            r.add("F11", Severity::Error, "bad --override", e.to_string(), "use SECTION.KEY=VALUE");
            return None;
        }
    };
    // `train` refuses an override that names no setting (a typo on the command line): an
    // error here too, the diagnosis going on without it.
    if let Err(e) = crate::train::parse_overrides(&opts.overrides, true) {
        r.add(
            "F11",
            Severity::Error,
            "train refuses this --override (it names no setting)",
            format!("{e:#}"),
            "spell the key as the config names it (SECTION.KEY), or drop the override",
        );
    }
    // Each value that cannot be used is its own finding; the rest of the config is still read
    // (the value at its default) and checked.
    let read = match TrainConfig::read(&text, path, &overrides) {
        Ok(c) => c,
        Err(e) => {
            r.add(
                "F11",
                Severity::Error,
                "the config does not parse",
                e.to_string(),
                "fix the YAML as the message says",
            );
            return None;
        }
    };
    let mut broken = Broken::default();
    for p in &read.problems {
        setting_problem(r, &mut broken, path, "a setting lorahost cannot use", p);
    }
    let (mut cfg, notes) = (read.config, read.notes);
    for w in notes.unknown {
        r.add(
            "F11",
            Severity::Warning,
            "a key lorahost does not know is ignored",
            w,
            "rename or remove the key (a typo here is a setting that silently does nothing)",
        );
    }
    for w in notes.ignored {
        r.add(
            "F11",
            Severity::Warning,
            "a key lorahost knows but does not apply",
            w,
            "do what the evidence says instead, and remove the key",
        );
    }
    for w in notes.defaulted {
        r.add(
            "D0",
            Severity::Info,
            "a setting left to lorahost's default",
            w,
            "nothing to do if the default suits",
        );
    }
    for w in notes.read_as {
        r.add(
            "D0",
            Severity::Info,
            "a key read under lorahost's name, or a value read as lorahost takes it",
            w,
            "nothing to do when this is what you meant (write it as lorahost names it to silence this)",
        );
    }
    for n in cfg.resolve_relative_to(path) {
        r.add("D0", Severity::Info, "a relative path was found next to the config", n, "nothing to do");
    }
    // Every contradiction on its own, with its own fix; the diagnosis goes on with the checks
    // that do not need the values named.
    match cfg.validate(path) {
        Ok(()) => {}
        Err(TrainConfigError::Contradiction { problems, .. }) => {
            for p in &problems {
                // (A key already named as unusable gets no second finding for its consequence,
                // e.g. regex target_modules read as none.)
                let key = contradiction_fix(p).0;
                if key.is_empty() || !broken.0.contains(&key) {
                    setting_problem(r, &mut broken, path, "contradictory or impossible setting", p);
                }
            }
        }
        Err(e) => {
            r.add("F11", Severity::Error, "the config is invalid", e.to_string(), "fix the value named above")
        }
    }
    // What `train` rejects when it starts, beyond the config's own validation.
    if let Err(e) = crate::train::loss_weights(&cfg) {
        let msg = format!("{e:#}");
        let key = msg.split(':').next().unwrap_or("loss").to_string();
        r.add(
            "F11",
            Severity::Error,
            format!("{key} is refused by train (it stops before the first step)"),
            format!("{}: {msg}", path.display()),
            format!(
                "remove {key} or rename it to a term lorahost has (loss_bbox, loss_giou, loss_ce, presence_loss, loss_mask, loss_dice, o2m_weight, pos_weight, aux){}",
                if key.contains("cldice") {
                    "; lorahost has no clDice term (loss_mask and loss_dice weight the mask losses)"
                } else {
                    ""
                }
            ),
        );
        broken.0.push(key);
    }
    if !broken.any(&["hardware.device"]) {
        device_check(&cfg, r);
    }
    let t = &cfg.training;
    // Planning numbers need the dataset size; use the train split when it loads.
    let n =
        Dataset::load(&t.data_dir).ok().and_then(|d| d.split("train").map(|s| s.images.len())).unwrap_or(0);
    let shape_ok =
        !broken.any(&["training.batch_size", "training.gradient_accumulation_steps", "training.num_epochs"]);
    if n > 0 && shape_ok {
        let e = cfg.effective(n);
        r.facts.insert(
            "effective".into(),
            serde_json::json!({
                "train_images": n, "batch_size": t.batch_size, "accumulation": t.gradient_accumulation_steps,
                "effective_batch_size": e.effective_batch_size, "micro_batches_per_epoch": e.micro_batches_per_epoch,
                "steps_per_epoch": e.steps_per_epoch, "total_steps": e.total_steps, "warmup_steps": e.warmup_steps,
                "warmup_epochs": e.warmup_epochs, "lora_scale": e.lora_scale,
            }),
        );
        let ev = format!(
            "warmup_steps {} (optimizer steps) = {:.2} epochs; the run is {} optimizer steps ({} epochs × {} steps; {} images / batch {} / accumulation {})",
            e.warmup_steps, e.warmup_epochs, e.total_steps, t.num_epochs, e.steps_per_epoch, n, t.batch_size, t.gradient_accumulation_steps
        );
        if e.warmup_steps >= e.total_steps && e.total_steps > 0 {
            r.add(
                "D1",
                Severity::Error,
                "warmup is as long as the whole run: the LR never reaches its peak",
                ev,
                format!(
                    "set training.warmup_steps below {} (e.g. {})",
                    e.total_steps,
                    (e.total_steps / 10).max(1).min(e.total_steps - 1)
                ),
            );
        } else if e.warmup_steps * 5 > e.total_steps {
            r.add(
                "D1",
                Severity::Warning,
                format!(
                    "warmup takes {:.0}% of the run (more than a fifth: usually a units mistake)",
                    100.0 * e.warmup_steps as f64 / e.total_steps.max(1) as f64
                ),
                ev,
                match (e.total_steps / 10).max(1) {
                    // A tenth of the run is no shorter: the run itself is short.
                    tenth if tenth >= e.warmup_steps => format!(
                        "the run is only {} optimizer steps: train longer (training.num_epochs) or set training.warmup_steps: 0",
                        e.total_steps
                    ),
                    tenth => format!(
                        "warmup counts optimizer steps, not micro-batches: e.g. training.warmup_steps: {tenth}"
                    ),
                },
            );
        } else if e.warmup_steps > 0 {
            r.add("D1", Severity::Info, "warmup length in optimizer steps", ev, "none needed");
        }
        if e.effective_batch_size > n {
            // Then an epoch is one optimizer step: gradients are averaged over the micro-batches
            // the step actually ran, the whole training set.
            let (b, micro) = (t.batch_size.min(n), e.micro_batches_per_epoch);
            let last = n - (micro - 1) * t.batch_size;
            let batches = if last == b {
                format!("{micro} micro-batch(es) of {b} images")
            } else {
                format!("{} micro-batch(es) of {b} images and one of {last}", micro - 1)
            };
            r.add(
                "D2",
                Severity::Warning,
                format!(
                    "{}the effective batch ({} × {} = {} images) is larger than the training set ({n} images): each epoch is one optimizer step over {n} images, not {}",
                    if t.gradient_accumulation_steps > micro {
                        "gradient accumulation is longer than an epoch: "
                    } else {
                        ""
                    },
                    t.batch_size,
                    t.gradient_accumulation_steps,
                    e.effective_batch_size,
                    e.effective_batch_size
                ),
                format!(
                    "an epoch is {batches}{}, fewer than the {} a step accumulates, so the step is partial; {} epochs = {} optimizer steps in all",
                    if t.batch_size > n { format!(" (not batch_size {})", t.batch_size) } else { String::new() },
                    t.gradient_accumulation_steps,
                    t.num_epochs,
                    e.total_steps
                ),
                format!(
                    "lower batch_size × gradient_accumulation_steps to at most {n}, better a fraction of it so an epoch has several steps (e.g. batch_size: {} with gradient_accumulation_steps: 1), or add training images",
                    t.batch_size.min(n.div_ceil(4).max(1))
                ),
            );
        }
    }
    if shape_ok && t.batch_size * t.gradient_accumulation_steps <= 1 {
        r.add(
            "F10",
            Severity::Warning,
            "an effective batch of one image: every step follows one image's gradient, so the loss fluctuates",
            format!("batch_size {} × gradient_accumulation_steps {}", t.batch_size, t.gradient_accumulation_steps),
            "use gradient_accumulation_steps: 8 (or a larger batch): lorahost applies accumulation",
        );
    }
    if t.max_grad_norm == 0.0 {
        r.add(
            "F10",
            Severity::Warning,
            "gradient clipping is off",
            "training.max_grad_norm: 0",
            "set training.max_grad_norm: 1.0 (lorahost clips the global norm and logs it before and after)",
        );
    }
    if t.warmup_steps == 0 && t.warmup_ratio <= 0.0 {
        // The warmup settings as given (file, then overrides, which win), so the evidence shows
        // what was written; none given: the default applies, and the evidence says so.
        let given = warmup_settings(&text, &overrides);
        r.add(
            "F10",
            Severity::Info,
            "no warmup: the first steps run at the peak LR",
            if given.is_empty() {
                format!(
                    "{}: neither training.warmup_steps nor training.warmup_ratio is set (no warmup setting; training.warmup_steps defaults to 0)",
                    path.display()
                )
            } else {
                given.join("; ")
            },
            "a short warmup (e.g. 5% of the steps) steadies the first updates: training.warmup_steps",
        );
    }
    if !broken.any(&["training.learning_rate"]) && (t.learning_rate > 1e-3 || t.learning_rate < 1e-6) {
        // Far above the range (50×) the adapters diverge within steps: an error, not a hint.
        r.add(
            "D3",
            if t.learning_rate > 5e-2 { Severity::Error } else { Severity::Warning },
            "learning rate outside the usual LoRA range [1e-6, 1e-3]",
            format!("training.learning_rate {:e}", t.learning_rate),
            "SAM3 LoRA runs use 5e-5 .. 2e-4; `lorahost lr-find` measures the range on this model and data",
        );
    }
    // (With use_rslora the scale is alpha/√rank by design, larger at high ranks.)
    let scale = cfg.lora.alpha / cfg.lora.rank.max(1) as f64;
    if !broken.any(&["lora.rank", "lora.alpha"]) && !cfg.lora.use_rslora && !(0.5..=4.0).contains(&scale) {
        r.add(
            "D4",
            Severity::Warning,
            "LoRA scale alpha/rank is unusual: the update size scales with it",
            format!("lora.alpha {} / lora.rank {} = {scale}", cfg.lora.alpha, cfg.lora.rank),
            format!(
                "change alpha with rank (alpha = 2 × rank is the usual choice: alpha {})",
                2 * cfg.lora.rank
            ),
        );
    }
    if cfg.lora.apply_to_text_encoder {
        r.add(
            "F7",
            Severity::Warning,
            "LoRA on the text encoder erodes prompt discrimination (objects found for any prompt)",
            "lora.apply_to_text_encoder: true",
            "keep the text encoder frozen (apply_to_text_encoder: false) unless prompts are new words",
        );
    }
    if t.num_negatives == 0 {
        r.add(
            "F7",
            Severity::Warning,
            "no hard-negative prompts: the model is never shown an absent category",
            "training.num_negatives: 0",
            "training.num_negatives: 2 or 3",
        );
    }
    // The run's adapters in the output folder (a fresh `train` moves them to previous-runs/;
    // `--resume`, `export` and `evaluate` read them).
    let mut other_layout = Vec::new();
    for dir in ["adapter", "best"] {
        let p = cfg.output.output_dir.join(dir).join("adapter_config.json");
        let Ok(text) = std::fs::read(&p) else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else { continue };
        let (fr, fa) = (v["r"].as_u64(), v["lora_alpha"].as_f64());
        let frs = v["use_rslora"].as_bool().unwrap_or(false);
        if fr != Some(cfg.lora.rank as u64) || fa != Some(cfg.lora.alpha) || frs != cfg.lora.use_rslora {
            let shown = |x: Option<String>| x.unwrap_or_else(|| "(none)".into());
            other_layout.push(format!(
                "{}: r {} alpha {} use_rslora {frs}",
                p.display(),
                shown(fr.map(|r| r.to_string())),
                shown(fa.map(|a| a.to_string())),
            ));
        }
    }
    if !other_layout.is_empty() {
        r.add(
            "F25",
            Severity::Warning,
            "the output directory holds adapters of another LoRA layout: --resume, export and evaluate of them will not load with this config",
            format!(
                "{}; config: r {} alpha {} use_rslora {}",
                other_layout.join("; "),
                cfg.lora.rank,
                cfg.lora.alpha,
                cfg.lora.use_rslora
            ),
            "a new run is fine (train moves them to previous-runs/); to continue or use them, set the rank/alpha (and use_rslora) they were trained with, or use a new output.output_dir",
        );
    }
    Some((cfg, broken))
}

/// F26: `hardware.device: cuda` opens the device as `train` does; a build without CUDA support,
/// or a machine without a usable device, is an error here, not at the first step.
fn device_check(cfg: &TrainConfig, r: &mut Report) {
    // `cuda` / `cuda:N`; `auto` falls back to the CPU by itself, unless half precision is asked
    // for (the CPU has none: train refuses).
    let auto_half = cfg.hardware.device.trim().eq_ignore_ascii_case("auto")
        && cfg.training.precision().is_some_and(|p| p != crate::train_config::Precision::No);
    if cfg.hardware.cuda_ordinal().is_none() && !auto_half {
        return;
    }
    if let Err(e) = crate::train::device_for(cfg) {
        if auto_half {
            r.add(
                "F26",
                Severity::Error,
                "hardware.device is auto with half precision, and no CUDA device is usable: train stops before the first step",
                format!("{e:#}"),
                "set training.mixed_precision: no to train on the CPU, or run on a machine (and a --features cuda build) with a GPU",
            );
            return;
        }
        let fix = if cfg!(feature = "cuda") {
            "no CUDA device could be opened: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or set hardware.device: cpu (with training.mixed_precision: no)"
        } else {
            "rebuild lorahost with CUDA (`cargo build --release --features cuda`, needs nvcc; see ../shared/gpu/README.md), or set hardware.device: cpu (with training.mixed_precision: no)"
        };
        r.add(
            "F26",
            Severity::Error,
            if cfg!(feature = "cuda") {
                "hardware.device is cuda but no CUDA device can be opened: train stops before the first step"
            } else {
                "hardware.device is cuda but this lorahost was built without CUDA: train stops before the first step"
            },
            format!("{e:#}"),
            fix,
        );
    }
}

/// F16: the dataset's prompts (category names and generic negative words) as the model reads
/// them: cut short by the text encoder's context, or two that become one prompt (then one is
/// trained as present and absent at once).
fn token_checks(cfg: &TrainConfig, ds: &Dataset, r: &mut Report) {
    let (Some(config), Ok(model_path)) = (model_config(cfg), crate::train::resolve_model(cfg)) else {
        return;
    };
    let Ok(tokenizer) = crate::train::load_tokenizer(&model_path) else { return };
    let ctx = config.text_config.max_position_embeddings;
    let fit = tokenizer.prompt_fit(&ds.prompts(), ctx);
    if !fit.same.is_empty() {
        let pairs: Vec<String> = fit.same.iter().map(|(a, b)| format!("{a:?} and {b:?}")).collect();
        r.add(
            "F16",
            Severity::Error,
            "prompts the model cannot tell apart: they are trained as different classes (and as each other's negatives) with the same text",
            format!("the text encoder reads {ctx} tokens: {}", pairs.join("; ")),
            "rename the categories (or training.generic_negatives words) so they differ within their first words",
        );
    }
    if !fit.truncated.is_empty() {
        let long: Vec<String> = fit.truncated.iter().map(|(p, n)| format!("{p:?} ({n} tokens)")).collect();
        r.add(
            "F16",
            Severity::Warning,
            "prompts longer than the text encoder's context are cut short",
            format!("context {ctx} tokens (start and end included): {}", long.join("; ")),
            "shorten the category names to the words that name the object (SAM3 expects short noun phrases)",
        );
    }
}

fn data_checks(cfg: &TrainConfig, opts: &DoctorOptions, r: &mut Report) -> bool {
    let dir = &cfg.training.data_dir;
    let has_train = dir.join("train").join(crate::data::coco::ANNOTATION_FILE).exists();
    if cfg.training.synthetic && !has_train && !dir.is_file() {
        // `train` writes the synthetic set there on first use (into a new or empty folder).
        if let Some(file) = crate::train::foreign_file(dir) {
            r.add(
                "F12",
                Severity::Error,
                "training.synthetic is true, but training.data_dir holds other files and no train/ split",
                format!("{} holds {}", dir.display(), file.display()),
                "train writes its synthetic dataset only into a new or empty folder: set training.data_dir to one, or training.synthetic: false for your own data",
            );
            return false;
        }
        r.add(
            "D0",
            Severity::Info,
            "training.synthetic: train writes the synthetic crack dataset into training.data_dir on first use",
            dir.display().to_string(),
            "none needed (the data checks run once it exists)",
        );
        return true;
    }
    if !dir.is_dir() {
        let (what, fix) = if dir.is_file() {
            (
                "training.data_dir is a file, not a folder",
                "point training.data_dir at the folder holding train/ and valid/ (each with _annotations.coco.json), not at a file in it",
            )
        } else {
            (
                "training.data_dir does not exist",
                "point training.data_dir at the folder holding train/ and valid/ (each with _annotations.coco.json)",
            )
        };
        r.add("F12", Severity::Error, what, dir.display().to_string(), fix);
        return false;
    }
    let ds = match Dataset::load(dir) {
        Ok(d) => d.with_generic_negatives(&cfg.training.generic_negatives),
        Err(e) => {
            r.add(
                "F12",
                Severity::Error,
                "the dataset does not load",
                e.to_string(),
                "see the message: the file and the fix are named",
            );
            return false;
        }
    };
    token_checks(cfg, &ds, r);
    let fp = ds.fingerprint();
    r.facts.insert("dataset".into(), serde_json::to_value(&fp).unwrap_or_default());
    if let Some(want) = &opts.expect_fingerprint {
        // Hex compares without case; an empty prefix would match every dataset.
        let want = want.trim().to_ascii_lowercase();
        if !valid_fingerprint(&want) {
            r.add(
                "F12",
                Severity::Error,
                if want.is_empty() {
                    "--expect-fingerprint is empty: it would match any dataset".to_string()
                } else {
                    format!("--expect-fingerprint {want:?} is not a fingerprint prefix")
                },
                format!("this dataset's content_sha256 is {}", fp.content_sha256),
                "give at least 8 hex digits of the content_sha256 the run is meant to use (doctor prints it under dataset)",
            );
        } else if !fp.content_sha256.to_ascii_lowercase().starts_with(&want) {
            r.add(
                "F12",
                Severity::Error,
                "the dataset is not the expected one (wrong data_dir?)",
                format!(
                    "{}: content {} ({} categories: {}; {}), expected {}",
                    dir.display(),
                    &fp.content_sha256[..16.min(fp.content_sha256.len())],
                    fp.categories.len(),
                    fp.categories.join(", "),
                    fp.splits
                        .iter()
                        .map(|s| format!("{} {} images / {} annotations", s.name, s.images, s.annotations))
                        .collect::<Vec<_>>()
                        .join(", "),
                    want
                ),
                "set training.data_dir to the dataset the fingerprint belongs to",
            );
        }
    }
    if ds.split("valid").is_none() {
        let other = ["val", "validation", "eval", "dev"].into_iter().find(|n| dir.join(n).is_dir());
        r.add(
            "D6",
            Severity::Warning,
            "no valid/ split: no validation loss, metrics or best checkpoint",
            dir.display().to_string(),
            match other {
                _ if dir.join("valid").is_dir() => format!(
                    "valid/ has no _annotations.coco.json: add {} (the COCO file of those images), or export the validation split again",
                    dir.join("valid").join("_annotations.coco.json").display()
                ),
                Some(n) => format!(
                    "rename {n}/ to valid/ (lorahost reads the Roboflow layout: train/, valid/, test/)"
                ),
                None => "export a validation split (Roboflow: valid/)".to_string(),
            },
        );
    }
    let findings = ds.preflight();
    type Kind = (String, &'static str, &'static str, &'static str);
    let mut by_kind: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
    for f in &findings {
        let (code, label, fix): (&str, &str, &str) = match f.kind {
            FindingKind::MissingImage | FindingKind::CorruptImage => (
                "F26",
                "images that cannot be read or decoded",
                "restore or re-export those files (they are left out of training, each named)",
            ),
            FindingKind::MissingBox => (
                "F23",
                "annotations without a usable bbox",
                "give each annotation a bbox [x, y, w, h] in pixels (they are dropped)",
            ),
            FindingKind::DerivedBox => (
                "F23",
                "annotations without a usable bbox whose box is derived from the segmentation",
                "nothing to do (pycocotools and Roboflow derive it the same way); re-export with boxes to make them explicit",
            ),
            FindingKind::UndecodableMask => (
                "F23",
                "annotations whose segmentation cannot be used",
                "fix the segmentation (polygons [[x1, y1, ...]] or RLE {size: [h, w], counts}); meanwhile those objects train box and class only",
            ),
            FindingKind::DegenerateBox => (
                "F21",
                "degenerate boxes (w or h <= 0, non-finite)",
                "fix the boxes (those annotations are dropped)",
            ),
            FindingKind::EmptyMask => (
                "F21",
                "masks with no pixels",
                "check those polygons (tiny or outside the image); the objects train box and class only",
            ),
            FindingKind::BoxOutsideImage => (
                "F4",
                "boxes reaching outside the image (wrong units or format?)",
                "boxes are clipped to the image; if many are far outside, the boxes are in another unit or format",
            ),
            FindingKind::PolygonOutsideImage => (
                "F4",
                "polygons with points far outside the image (wrong units or format?)",
                "the masks are clipped to the image; points this far out mean the polygons are in another unit or format: fix the export",
            ),
            FindingKind::BoxFormat => (
                "F5",
                "boxes that disagree with their masks like [x0, y0, x1, y1] or normalized boxes",
                "write bbox as COCO [x, y, width, height] in pixels (re-export, or convert the file)",
            ),
            FindingKind::SizeMismatch => (
                "F24",
                "decoded image size differs from the JSON (EXIF rotation?)",
                "re-export with the orientation applied, or correct width/height in the JSON",
            ),
            FindingKind::PoorPrompt | FindingKind::DuplicatePrompt => (
                "F6",
                "category names that make poor prompts",
                "rename the categories to short noun phrases (\"crack\", \"rust stain\")",
            ),
            FindingKind::ImageWithoutAnnotations => (
                "F1",
                "images without annotations (only negatives)",
                "expected for background images; otherwise their annotations were lost in the export",
            ),
            FindingKind::UnknownCategory | FindingKind::UnknownImage | FindingKind::DuplicateId => (
                "F23",
                "inconsistent ids in the COCO file",
                "give every image, annotation and category a unique integer id, and refer only to existing ones",
            ),
            FindingKind::UnusedCategory => {
                ("F6", "categories no annotation uses", "nothing to do (Roboflow's super-category 0 is one)")
            }
            FindingKind::Crowd => (
                "F23",
                "crowd annotations (iscrowd: 1)",
                "drop them if they outline groups of objects: SAM3 trains each as one instance",
            ),
            FindingKind::UnusedSplit => (
                "F26",
                "a split that does not load (not used by training)",
                "fix or remove the file; training uses only train/ and valid/",
            ),
        };
        let sev = match f.severity {
            DataSeverity::Error => "error",
            DataSeverity::Warning => "warning",
        };
        by_kind.entry((code.to_string(), label, sev, fix)).or_default().push(f.to_string());
    }
    // Every finding, machine-readable (file, image and annotation id, kind, message).
    r.facts.insert("data_findings".into(), serde_json::json!(findings));
    // Objects whose box can be compared with a mask (F5 needs one).
    let with_mask: usize = ds
        .splits
        .iter()
        .flat_map(|s| &s.images)
        .flat_map(|i| &i.objects)
        .filter(|o| o.segmentation.is_some())
        .count();
    for ((code, label, sev, fix), items) in by_kind {
        let sev0 = if sev == "error" { Severity::Error } else { Severity::Warning };
        let mut severity =
            if code == "F1" || label.starts_with("categories no") || label.starts_with("a split") {
                Severity::Info
            } else {
                sev0
            };
        // Most boxes in another format: every box target is wrong, silently.
        let most = " (most of the objects: their box targets are wrong)";
        if code == "F5" && items.len() * 2 > with_mask {
            severity = Severity::Error;
        }
        let shown: Vec<&String> = items.iter().take(5).collect();
        r.add(
            &code,
            severity,
            format!("{} × {label}{}", items.len(), if severity > sev0 { most } else { "" }),
            format!(
                "{}{}",
                shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; "),
                if items.len() > 5 {
                    format!("; and {} more (all in --json facts.data_findings)", items.len() - 5)
                } else {
                    String::new()
                }
            ),
            fix,
        );
    }
    if let Some(train) = ds.split("train") {
        let objects: usize = train.images.iter().map(|i| i.objects.len()).sum();
        if objects == 0 {
            r.add("F1", Severity::Error, "the training split has no usable objects: the loss would be near zero and nothing is learned", train.annotation_file.display().to_string(), "check the annotation file (bbox/segmentation/category_id fields)");
        }
    }
    mask_checks(cfg, &ds, r);
    thin_structure_check(cfg, &ds, r);
    crowding_check(cfg, &ds, r);
    prompt_checks(&ds, r);
    negative_checks(cfg, &ds, r);
    true
}

/// F23: objects without a mask (`segmentation: []`, or one that cannot be used) train box and
/// class only, and their image/prompt pairs are left out of mask mAP and cgF1.
fn mask_checks(cfg: &TrainConfig, ds: &Dataset, r: &mut Report) {
    for name in ["train", "valid"] {
        let Some(s) = ds.split(name) else { continue };
        let objects: Vec<&crate::data::coco::Object> = s.images.iter().flat_map(|i| &i.objects).collect();
        let box_only: Vec<u64> =
            objects.iter().filter(|o| o.segmentation.is_none()).map(|o| o.ann_id).collect();
        if objects.is_empty() || box_only.is_empty() {
            continue;
        }
        let ids = box_only.iter().take(5).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let evidence = format!(
            "{}: {} of {} objects have no usable segmentation (annotations {ids}{})",
            s.annotation_file.display(),
            box_only.len(),
            objects.len(),
            if box_only.len() > 5 { ", ..." } else { "" }
        );
        let fix = "export the dataset with instance masks (segmentation as COCO polygons [[x1, y1, ...]] or RLE); a box-only dataset trains boxes and classes only";
        if box_only.len() < objects.len() {
            r.add(
                "F23",
                Severity::Info,
                format!("{} box-only objects in {name}/: no mask loss for them, and their image/prompt pairs are left out of mask mAP", box_only.len()),
                evidence,
                "expected for annotations without masks; otherwise restore their segmentation",
            );
        } else if name == "train" {
            r.add(
                "F23",
                Severity::Warning,
                "no training object has a mask: the mask and dice losses cannot be computed (only boxes and classes train)",
                evidence,
                fix,
            );
        } else {
            let metric = cfg.evaluation.metric.to_ascii_lowercase();
            let by_metric = metric != "loss" && crate::train_config::METRICS.contains(&metric.as_str());
            r.add(
                "F23",
                if by_metric { Severity::Error } else { Severity::Warning },
                format!(
                    "no validation object has a mask: mask mAP and cgF1 cannot be computed (every image/prompt pair with objects is left out; training reports mAP -1, COCO's value for nothing scored){}",
                    if by_metric {
                        format!(", so evaluation.metric {metric} cannot pick a best checkpoint")
                    } else {
                        String::new()
                    }
                ),
                evidence,
                if by_metric {
                    format!("{fix}; or select by the loss: evaluation.metric: loss")
                } else {
                    fix.to_string()
                },
            );
        }
    }
}

/// The warmup keys lorahost reads (`training.warmup_steps`, `training.warmup_ratio`) as the
/// config file (merge keys applied) and then the overrides give them: `key: value` each, an
/// override as `--override key=value`.
fn warmup_settings(text: &str, overrides: &[(String, serde_yaml::Value)]) -> Vec<String> {
    const KEYS: [&str; 2] = ["warmup_steps", "warmup_ratio"];
    let show = |v: &serde_yaml::Value| match v {
        serde_yaml::Value::Null => "null (the default, 0)".to_string(),
        serde_yaml::Value::String(s) => format!("{s:?}"),
        v => serde_yaml::to_string(v).map(|s| s.trim().to_string()).unwrap_or_default(),
    };
    let mut doc =
        serde_yaml::from_str::<serde_yaml::Value>(text.trim_start_matches('\u{feff}')).unwrap_or_default();
    let _ = doc.apply_merge();
    let mut out: Vec<String> = KEYS
        .iter()
        .filter_map(|k| {
            doc.get("training").and_then(|t| t.get(k)).map(|v| format!("training.{k}: {}", show(v)))
        })
        .collect();
    for (k, v) in overrides {
        if KEYS.iter().any(|w| k == &format!("training.{w}")) {
            out.push(format!("--override {k}={}", show(v)));
        }
    }
    out
}

/// Objects sampled by [`thin_structure_check`].
const THIN_SAMPLE: usize = 100;

/// F20: thin structures (cracks, vessels, wires) measured on the model's mask grid (288² for
/// SAM3), where the loss and the metrics see them. A mask with no pixel left there trains as a
/// box-only object; one or two pixels wide there, COCO mAP judges it harshly.
fn thin_structure_check(cfg: &TrainConfig, ds: &Dataset, r: &mut Report) {
    let Some(train) = ds.split("train") else { return };
    let m = model_config(cfg).map(|c| c.target_mask_size()).unwrap_or(288);
    // Objects with a mask and an image size in the JSON, spread over the split.
    let objects: Vec<(&crate::data::coco::Object, (u32, u32))> = train
        .images
        .iter()
        .filter_map(|i| i.json_size.map(|size| (i, size)))
        .flat_map(|(i, size)| i.objects.iter().filter(|o| o.segmentation.is_some()).map(move |o| (o, size)))
        .collect();
    if objects.is_empty() {
        return;
    }
    let step = objects.len().div_ceil(THIN_SAMPLE);
    let (mut widths, mut vanished, mut sampled) = (Vec::new(), Vec::new(), 0usize);
    for (o, (w, h)) in objects.iter().step_by(step) {
        let Some(full) = o.segmentation.as_ref().and_then(|s| s.decode(*h as usize, *w as usize).ok()) else {
            continue;
        };
        if !full.contains(&true) {
            continue;
        }
        sampled += 1;
        let grid = crate::data::batch::resize_mask_nearest(&full, *h as usize, *w as usize, m, false);
        match crate::pixel_metrics::mean_width(&grid, m, m) {
            Some(width) => widths.push(width),
            None => vanished.push(o.ann_id),
        }
    }
    if sampled == 0 {
        return;
    }
    widths.sort_by(f64::total_cmp);
    let median = widths.get(widths.len() / 2).copied();
    let evidence = format!(
        "{}: of {sampled} masks sampled, {} have no pixel on the {m}×{m} mask grid{}{}",
        train.annotation_file.display(),
        vanished.len(),
        if vanished.is_empty() {
            String::new()
        } else {
            format!(
                " (annotations {}{})",
                vanished.iter().take(5).map(|i| i.to_string()).collect::<Vec<_>>().join(", "),
                if vanished.len() > 5 { ", ..." } else { "" }
            )
        },
        median.map(|w| format!("; the others' median width there is {w:.1} px")).unwrap_or_default()
    );
    let tile = "tile the images so the structures stay several pixels wide at the mask grid: `lorahost tile --data-dir DATA --out TILES` (1008-pixel crops with overlap, some object-free tiles kept as negatives), then train with training.data_dir: TILES";
    if vanished.len() * 10 >= sampled {
        r.add(
            "F20",
            Severity::Warning,
            format!(
                "{:.0}% of the training masks vanish when resized to the {m}×{m} mask grid: they train as box-only objects (no mask or dice loss)",
                100.0 * vanished.len() as f64 / sampled as f64
            ),
            evidence,
            tile,
        );
    } else if median.is_some_and(|w| w < 3.0) {
        r.add(
            "F20",
            Severity::Info,
            "thin structures: at the mask grid most masks are under 3 px wide, where a one-pixel offset fails COCO's IoU thresholds",
            evidence,
            format!("judge the model by the pixel metrics validation and `lorahost evaluate` report (±{} px relaxed F1, clDice) rather than mAP; or {tile}", crate::pixel_metrics::TOLERANCE),
        );
    }
}

/// D12: where SAM3_LoRA, given the same `target_modules`, adapts other layers than lorahost
/// ([`crate::lora::sam3_lora_differences`]): a config brought from SAM3_LoRA trains other
/// adapters here, which a user comparing the two runs must know; the fix names SAM3_LoRA's
/// layers by component.
fn sam3_lora_target_check(cfg: &TrainConfig, lora: &LoraSet, r: &mut Report) {
    let l = &cfg.lora;
    let on = LoraConfig::from_section(l).components;
    let adapted: Vec<&str> = lora.modules.iter().map(|m| m.0.as_str()).collect();
    let diffs = crate::lora::sam3_lora_differences(&l.target_modules, &on, &adapted);
    if diffs.is_empty() {
        return;
    }
    let list = |k: &[&str]| if k.is_empty() { "none".to_string() } else { k.join(", ") };
    let evidence: Vec<String> = diffs
        .iter()
        .map(|(c, here, theirs)| {
            format!("{}: lorahost adapts {}; SAM3_LoRA adapted {}", c.name(), list(here), list(theirs))
        })
        .collect();
    // SAM3_LoRA's layers by component, each in lorahost's names.
    let prefix = |c: Component| match c {
        Component::Vision => "vision_encoder",
        Component::Text => "text_encoder",
        Component::Geometry => "geometry_encoder",
        Component::DetrEncoder => "detr_encoder",
        Component::DetrDecoder => "detr_decoder",
        Component::MaskDecoder => "mask_decoder",
    };
    let mut globs = Vec::new();
    for c in &on {
        let kinds: Vec<&str> = match diffs.iter().find(|d| d.0 == *c) {
            Some(d) => d.2.clone(),
            None => {
                let mut k: Vec<&str> = adapted
                    .iter()
                    .filter(|p| Component::of(p) == Some(*c))
                    .map(|p| p.rsplit('.').next().unwrap_or(p))
                    .collect();
                k.sort();
                k.dedup();
                k
            }
        };
        for k in kinds {
            let k = if k == "o_proj" && *c == Component::Text { "out_proj" } else { k };
            globs.push(format!("\"{}.*.{k}\"", prefix(*c)));
        }
    }
    r.add(
        "D12",
        Severity::Info,
        "with these lora.target_modules, SAM3_LoRA adapted other layers than lorahost does: lorahost reads the names as transformers' SAM3 layers (what they name), SAM3_LoRA matched them as parts of Meta's original layer names (its ViT attention is one fused `qkv` and a `proj`, its DETR and geometry MLPs `linear1`/`linear2`, CLIP's `c_fc`/`c_proj`)",
        evidence.join("; "),
        format!(
            "nothing, to train what the names say; to train the layers SAM3_LoRA trained (e.g. to compare runs), target them by component: target_modules: [{}]",
            globs.join(", ")
        ),
    );
}

/// D9: an image with more objects of one prompt than the decoder has queries (200 for SAM3):
/// each query is matched to one object, so the rest are never matched, train nothing, and
/// still count in the loss's normalisation. Usually speckle noise that a mask conversion made
/// into objects.
fn crowding_check(cfg: &TrainConfig, ds: &Dataset, r: &mut Report) {
    let queries = model_config(cfg).and_then(|c| c.detr_decoder_config.num_queries).unwrap_or(200);
    let mut crowded: Vec<(String, String, u64, usize)> = Vec::new();
    for split in ["train", "valid"].iter().filter_map(|n| ds.split(n)) {
        for im in &split.images {
            let mut per: BTreeMap<u64, usize> = BTreeMap::new();
            for o in &im.objects {
                *per.entry(o.category_id).or_default() += 1;
            }
            for (cat, n) in per.into_iter().filter(|(_, n)| *n > queries) {
                let name = split.category(cat).map_or_else(|| cat.to_string(), |c| c.prompt.clone());
                crowded.push((split.name.clone(), format!("{} (\"{name}\")", im.file_name), im.id, n));
            }
        }
    }
    if crowded.is_empty() {
        return;
    }
    let worst = crowded.iter().map(|c| c.3).max().unwrap_or(0);
    let listed: Vec<String> = crowded
        .iter()
        .take(5)
        .map(|(split, file, id, n)| format!("{split}/{file} image {id}: {n} objects"))
        .collect();
    r.add(
        "D9",
        Severity::Warning,
        format!(
            "{} image(s) have more objects of one prompt than the model's {queries} queries (up to {worst}): the extra objects are never matched, train nothing and still dilute the loss",
            crowded.len()
        ),
        format!("{}{}", listed.join("; "), if crowded.len() > 5 { "; ..." } else { "" }),
        "these are usually specks of mask noise made into objects: re-import with a larger `lorahost import --min-pixels` or `--instances whole`, drop the tiny annotations, or tile the images (`lorahost tile`) so each tile holds fewer",
    );
}

/// D8: validation measures the prompts the model was trained on only where train and valid
/// share them (splits exported from different projects, or renamed classes).
fn prompt_checks(ds: &Dataset, r: &mut Report) {
    let (Some(train), Some(valid)) = (ds.split("train"), ds.split("valid")) else { return };
    let prompts = |s: &crate::data::coco::Split| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in s.images.iter().flat_map(|i| &i.objects) {
            if let Some(c) = s.category(o.category_id) {
                *m.entry(c.prompt.clone()).or_default() += 1;
            }
        }
        m
    };
    id_table_check(train, valid, r);
    let (tp, vp) = (prompts(train), prompts(valid));
    if tp.is_empty() || vp.is_empty() {
        return;
    }
    let untrained: Vec<(&String, &usize)> = vp.iter().filter(|(p, _)| !tp.contains_key(*p)).collect();
    if untrained.is_empty() {
        return;
    }
    let unseen: usize = untrained.iter().map(|(_, n)| **n).sum();
    let total: usize = vp.values().sum();
    let list = |m: &BTreeMap<String, usize>| {
        m.iter().map(|(p, n)| format!("{p:?} ({n})")).collect::<Vec<_>>().join(", ")
    };
    let evidence = format!(
        "train prompts (objects): {}; valid prompts: {}; {unseen} of {total} validation objects have a prompt never trained on",
        list(&tp),
        list(&vp)
    );
    let fix = "export train/ and valid/ from the same project with the same class names (compare the categories of both _annotations.coco.json files), or point data_dir at the matching dataset";
    let shared = vp.keys().filter(|p| tp.contains_key(*p)).count();
    if shared == 0 {
        r.add(
            "D8",
            Severity::Error,
            "train and valid share no prompt: validation measures prompts never trained on (its loss, metrics and best checkpoint say nothing about this training)",
            evidence,
            fix,
        );
    } else if unseen * 2 > total {
        r.add(
            "D8",
            Severity::Warning,
            "most validation objects have prompts never trained on: validation mostly measures prompts the run does not learn",
            evidence,
            fix,
        );
    } else {
        r.add(
            "D8",
            Severity::Info,
            "some validation prompts never occur in training",
            evidence,
            "expected for a zero-shot check; otherwise align the class names of the splits",
        );
    }
}

/// D8: the splits give the same class names other ids ("crack" is 0 in train and 1 in valid).
/// One Roboflow export numbers its classes once for all splits; different tables mean the
/// files were exported apart or edited, and when one split's annotations were made with the
/// other's table its labels are swapped. lorahost reads each split by its own table, so this is
/// only a warning.
fn id_table_check(train: &crate::data::coco::Split, valid: &crate::data::coco::Split, r: &mut Report) {
    let ids = |s: &crate::data::coco::Split| -> BTreeMap<String, Vec<u64>> {
        let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for c in &s.categories {
            m.entry(c.prompt.clone()).or_default().push(c.id);
        }
        m
    };
    let (ti, vi) = (ids(train), ids(valid));
    let moved: Vec<String> = ti
        .iter()
        .filter_map(|(p, t)| {
            let v = vi.get(p)?;
            let used = train.categories.iter().chain(&valid.categories).any(|c| c.used && &c.prompt == p);
            (t != v && used).then(|| {
                let list = |x: &[u64]| x.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("/");
                format!("{p:?} is id {} in train and {} in valid", list(t), list(v))
            })
        })
        .collect();
    if moved.is_empty() {
        return;
    }
    r.add(
        "D8",
        Severity::Warning,
        "train and valid number their classes differently: if one split's annotations were made with the other's class table, its labels are swapped",
        format!(
            "{}; {}: {}",
            moved.join(", "),
            valid.annotation_file.display(),
            "each split is read by its own category table"
        ),
        "export train/ and valid/ together (one Roboflow export numbers the classes once), or check a few valid annotations against their images (`lorahost doctor --gt-overlays DIR` draws them)",
    );
}

/// F7: the negative prompts the data actually gives per training image, drawn as training
/// draws them ([`crate::data::coco::Split::queries`]): fewer than `num_negatives` when the pool
/// of absent prompts is small; "hard" ones are the dataset's other categories.
fn negative_checks(cfg: &TrainConfig, ds: &Dataset, r: &mut Report) {
    let t = &cfg.training;
    let Some(train) = ds.split("train") else { return };
    if t.num_negatives == 0 || train.images.is_empty() {
        return;
    }
    let mut prompts: Vec<&str> =
        train.categories.iter().filter(|c| c.used).map(|c| c.prompt.as_str()).collect();
    prompts.sort_unstable();
    prompts.dedup();
    let (mut negs, mut hard) = (Vec::new(), Vec::new());
    for i in 0..train.images.len() {
        let q = train.queries(i, t.num_negatives, t.seed as u64);
        let n: Vec<&str> = q.iter().filter(|q| q.negative).map(|q| q.prompt.as_str()).collect();
        hard.push(n.iter().filter(|p| prompts.contains(p)).count());
        negs.push(n.len());
    }
    let stats = |v: &[usize]| {
        let (min, max) = (v.iter().copied().min().unwrap_or(0), v.iter().copied().max().unwrap_or(0));
        (min, max, v.iter().sum::<usize>() as f64 / v.len().max(1) as f64)
    };
    let ((min, max, mean), (_, hard_max, hard_mean)) = (stats(&negs), stats(&hard));
    r.facts.insert(
        "negatives_per_image".into(),
        serde_json::json!({"requested": t.num_negatives, "min": min, "max": max, "mean": mean, "hard_mean": hard_mean}),
    );
    let evidence = format!(
        "training.num_negatives {}; per training image the data gives {min}..{max} negatives (mean {mean:.2}), {hard_mean:.2} of them other categories of the dataset (hard negatives); the training split has {} prompt(s): {}",
        t.num_negatives,
        prompts.len(),
        prompts.join(", ")
    );
    let more =
        "add images annotated with other (confusable) categories, e.g. merge a dataset of other defects";
    if max == 0 {
        r.add(
            "F7",
            Severity::Warning,
            format!(
                "training.num_negatives {} gives 0 negatives per image: no absent prompt exists to draw, so the model is never shown an absent category",
                t.num_negatives
            ),
            evidence,
            format!("{more}; raising num_negatives does not help"),
        );
    } else if min < t.num_negatives {
        r.add(
            "F7",
            Severity::Info,
            format!(
                "training.num_negatives {} gives {mean:.1} negatives per image on average ({min}..{max}): the data has too few absent prompts for more",
                t.num_negatives
            ),
            evidence,
            format!("training.num_negatives: {max} says what the data gives; {more}"),
        );
    } else if hard_max == 0 {
        r.add(
            "F7",
            Severity::Info,
            "no hard negatives: every negative prompt is a generic word, as the dataset has no other category to draw",
            evidence,
            format!("{more}: a confusable absent category teaches more than an unrelated word"),
        );
    }
}

/// The `config.json` of a model path: in the directory, or beside a `sam3.pt` file.
fn model_config_path(model_path: &std::path::Path) -> PathBuf {
    if model_path.is_file() {
        model_path.with_file_name("config.json")
    } else {
        model_path.join("config.json")
    }
}

fn lora_checks(cfg: &TrainConfig, r: &mut Report, budgets: (Option<f64>, Option<f64>), memory: bool) -> bool {
    let model_path = match crate::train::resolve_model(cfg) {
        Ok(p) => p,
        Err(e) => {
            r.add(
                "F26",
                Severity::Error,
                "the base model cannot be found",
                format!("{e:#}"),
                "set model.path, or download the model into the Hugging Face cache",
            );
            return false;
        }
    };
    let config = match crate::sam3::config::Sam3Config::from_file(&model_config_path(&model_path)) {
        Ok((c, _)) => c,
        Err(e) => {
            r.add(
                "F26",
                Severity::Error,
                "the model config does not load",
                e.to_string(),
                "use a transformers Sam3Model/Sam3VideoModel config.json",
            );
            return false;
        }
    };
    let params = Arc::new(Mutex::new(0usize));
    let vb = crate::memory::shape_only_var_builder(params.clone());
    let mut model = match crate::sam3::model::Sam3Model::load(vb, &config) {
        Ok(m) => m,
        Err(e) => {
            r.add(
                "F26",
                Severity::Error,
                "the model cannot be built from its config",
                e.to_string(),
                "check config.json",
            );
            return false;
        }
    };
    let total = params.lock().map(|p| *p).unwrap_or(0);
    let lcfg = LoraConfig::from_section(&cfg.lora);
    let lora = match LoraSet::attach(&mut model, &lcfg, &Device::Cpu) {
        Ok(l) => l,
        Err(e) => {
            r.add("F9", Severity::Error, "LoRA matches no module", e.to_string(), "list module names that exist (q_proj, k_proj, v_proj, o_proj, fc1, fc2) or globs like detr_decoder.*");
            return false;
        }
    };
    let unmatched = lora.unmatched_patterns();
    if !unmatched.is_empty() {
        r.add(
            "F9",
            Severity::Warning,
            format!(
                "{} lora.target_modules {} no module",
                unmatched.len(),
                if unmatched.len() == 1 { "entry adapts" } else { "entries adapt" }
            ),
            format!("{} (the other entries matched {} modules)", unmatched.join(", "), lora.modules.len()),
            "use transformers' SAM3 module names (q_proj, k_proj, v_proj, o_proj, fc1, fc2, out_proj), a dotted path suffix (detr_decoder.layers.0.self_attn.q_proj) or a glob (detr_decoder.*); or turn on the component that has them",
        );
    }
    let table: Vec<serde_json::Value> = lora
        .component_table()
        .iter()
        .map(|(c, m, p)| serde_json::json!({"component": c.name(), "modules": m, "parameters": p}))
        .collect();
    let trainable = lora.num_params();
    let fraction = trainable as f64 / total.max(1) as f64;
    r.facts.insert(
        "lora".into(),
        serde_json::json!({"modules": lora.modules.len(), "trainable": trainable, "base_parameters": total, "trainable_fraction": fraction, "components": table}),
    );
    for (flag, on, comp) in [
        ("apply_to_vision_encoder", cfg.lora.apply_to_vision_encoder, Component::Vision),
        ("apply_to_text_encoder", cfg.lora.apply_to_text_encoder, Component::Text),
        ("apply_to_geometry_encoder", cfg.lora.apply_to_geometry_encoder, Component::Geometry),
        ("apply_to_detr_encoder", cfg.lora.apply_to_detr_encoder, Component::DetrEncoder),
        ("apply_to_detr_decoder", cfg.lora.apply_to_detr_decoder, Component::DetrDecoder),
        ("apply_to_mask_decoder", cfg.lora.apply_to_mask_decoder, Component::MaskDecoder),
    ] {
        if on && !lora.modules.iter().any(|(_, c, _, _)| *c == comp) {
            r.add(
                "F9",
                Severity::Warning,
                format!("lora.{flag} is on but no target module matches in the {}", comp.name()),
                format!("target_modules: {}", cfg.lora.target_modules.join(", ")),
                format!("add module names of the {} to target_modules, or turn the flag off", comp.name()),
            );
        }
    }
    sam3_lora_target_check(cfg, &lora, r);
    // A rank at or above a layer's smaller side adds parameters but no expressiveness: the
    // update B·A already spans every matrix of that shape.
    let rank = cfg.lora.rank;
    let saturated: Vec<&(String, Component, usize, usize)> =
        lora.modules.iter().filter(|(_, _, i, o)| rank >= (*i).min(*o)).collect();
    if !saturated.is_empty() {
        let smallest = saturated.iter().map(|(_, _, i, o)| (*i).min(*o)).min().unwrap_or(0);
        r.add(
            "D4",
            Severity::Warning,
            format!("lora.rank {rank} is at least the width of {} adapted layer(s)", saturated.len()),
            format!(
                "e.g. {} ({}→{}); the narrowest is {smallest} wide",
                saturated[0].0, saturated[0].2, saturated[0].3
            ),
            format!("a rank below {smallest} (typically 8-64) gives the same updates with fewer parameters"),
        );
    }
    let adapted = crate::memory::Adapted::of(lora.modules.iter().map(|m| m.1));
    if memory {
        memory_check(cfg, &config, &model_path, (total, trainable, adapted), r, budgets);
    }
    if fraction > 0.2 {
        r.add(
            "F8",
            Severity::Warning,
            "a large share of the model is trainable",
            format!("{trainable} of {total} parameters ({:.1}%)", fraction * 100.0),
            "LoRA should train a few percent: lower the rank or the targets",
        );
    }
    true
}

/// F13: the predicted peak of a micro-batch against the device's memory.
fn memory_check(
    cfg: &TrainConfig,
    config: &crate::sam3::config::Sam3Config,
    model_path: &std::path::Path,
    (base_params, lora_params, adapted): (usize, usize, crate::memory::Adapted),
    r: &mut Report,
    (device_memory_gb, host_memory_gb): (Option<f64>, Option<f64>),
) {
    let t = &cfg.training;
    let cuda = cfg.hardware.cuda_ordinal().is_some();
    let precision = t.precision().unwrap_or(crate::train_config::Precision::No);
    let dtype = match (cuda, precision) {
        (false, _) | (_, crate::train_config::Precision::No) => DType::F32,
        (true, crate::train_config::Precision::Bf16) => DType::BF16,
        (true, crate::train_config::Precision::Fp16) => DType::F16,
    };
    // Queries per image: its distinct categories plus the hard negatives it can get. The peak is
    // set by the heaviest micro-batch: the images with the most queries together.
    let mut per_image: Vec<usize> = Dataset::load(&t.data_dir)
        .map(|d| d.with_generic_negatives(&t.generic_negatives))
        .ok()
        .and_then(|d| {
            let s = d.split("train")?;
            Some((0..s.images.len()).map(|i| s.queries(i, t.num_negatives, 0).len()).collect())
        })
        .unwrap_or_default();
    // A micro-batch holds at most the whole training set.
    let images =
        if per_image.is_empty() { t.batch_size.max(1) } else { t.batch_size.clamp(1, per_image.len()) };
    if per_image.is_empty() {
        per_image.push(1 + t.num_negatives);
    }
    per_image.sort_unstable_by(|a, b| b.cmp(a));
    let qpi = per_image[0].max(1) as f64;
    let mean_qpi = per_image.iter().sum::<usize>() as f64 / per_image.len() as f64;
    let base = if cuda { 600 << 20 } else { crate::memory::CPU_BASE };
    let queries: usize = per_image.iter().cycle().take(images).sum::<usize>().max(images);
    let run = crate::memory::RunShape {
        base_params,
        lora_params,
        dtype,
        adapted,
        vision_checkpointing: t.gradient_checkpointing,
        base,
        cuda,
    };
    let e = crate::memory::estimate(config, &run, images, queries);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let budget = device_memory_gb.map(|g| (g * (1u64 << 30) as f64) as u64).or(if cuda {
        None
    } else {
        crate::memory::host_available()
    });
    r.facts.insert(
        "memory".into(),
        serde_json::json!({
            "device": cfg.hardware.device, "dtype": format!("{dtype:?}"), "images": images, "queries": queries,
            "queries_per_image": mean_qpi, "max_queries_per_image": qpi, "run": run, "estimate_bytes": e,
            "features": crate::memory::features_by_part(config, images, queries), "estimate_gib": gib(e.total), "budget_gib": budget.map(gib),
        }),
    );
    let evidence = format!(
        "heaviest micro-batch, {images} images{} / {queries} queries in {dtype:?}: weights {:.2} GiB, LoRA state {:.2} GiB, activations {:.2} GiB, backward {:.2} GiB, base {:.2} GiB = {:.2} GiB{}",
        if images < t.batch_size { format!(" (the whole training set; batch_size {})", t.batch_size) } else { String::new() },
        gib(e.weights),
        gib(e.lora_state),
        gib(e.activations),
        gib(e.backward),
        gib(e.base),
        gib(e.total),
        budget.map(|b| format!(" against {:.1} GiB available", gib(b))).unwrap_or_default()
    );
    match budget {
        Some(b) if e.total > b => {
            let fits = crate::memory::max_batch(config, &run, qpi, b);
            let eff = t.batch_size * t.gradient_accumulation_steps;
            let mut fix = if fits == 0 {
                "not even one image fits: use bf16 on CUDA (mixed_precision: bf16), a card with more memory, or a smaller image size".to_string()
            } else {
                format!(
                    "training.batch_size: {fits} with gradient_accumulation_steps: {} keeps the effective batch of {eff} (LoRA rank barely matters: activations dominate)",
                    eff.div_ceil(fits)
                )
            };
            use crate::sam3::vit_block::Checkpointing;
            if adapted.vision && t.gradient_checkpointing != Checkpointing::Full {
                // The cheaper setting first: fc1's outputs recomputed (CUDA), then whole blocks.
                let mut best = fits;
                let options = [
                    (
                        Checkpointing::Mlp,
                        "mlp (fc1's outputs are recomputed in backward, one more fc1 product per ViT block)",
                    ),
                    (Checkpointing::Full, "true (the ViT blocks are recomputed in backward)"),
                ];
                for (c, what) in options {
                    if c == t.gradient_checkpointing || (c == Checkpointing::Mlp && !cuda) {
                        continue;
                    }
                    let with = crate::memory::max_batch(
                        config,
                        &crate::memory::RunShape { vision_checkpointing: c, ..run },
                        qpi,
                        b,
                    );
                    if with > best {
                        fix.push_str(&format!(
                            "; or training.gradient_checkpointing: {what}, which fits a batch of {with}"
                        ));
                        best = with;
                    }
                }
            }
            r.add("F13", Severity::Error, "the predicted peak memory of a micro-batch exceeds the device's memory (an OOM kill: exit 137 on the host, CUDA out of memory on the GPU)", evidence, fix);
        }
        Some(_) => r.add(
            "F13",
            Severity::Info,
            "predicted peak memory of a training micro-batch",
            evidence,
            "none needed",
        ),
        None => r.add(
            "F13",
            Severity::Info,
            "predicted peak memory of a training micro-batch (the device's memory is unknown: not compared)",
            evidence,
            "pass --device-memory-gb G (the card's memory, e.g. 24) to check that the micro-batch fits",
        ),
    }
    host_memory_check(cfg, config, model_path, if cuda { None } else { Some(&e) }, host_memory_gb, r);
}

/// F13 on the host: RAM for the checkpoint load, the data pipeline and (on the CPU) training,
/// against what the machine has available.
fn host_memory_check(
    cfg: &TrainConfig,
    config: &crate::sam3::config::Sam3Config,
    model_path: &std::path::Path,
    training: Option<&crate::memory::MemoryEstimate>,
    host_memory_gb: Option<f64>,
    r: &mut Report,
) {
    let t = &cfg.training;
    let file_len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let checkpoint_bytes = if model_path.is_file() {
        file_len(model_path)
    } else {
        std::fs::read_dir(model_path)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .map(|p| file_len(&p))
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut h = crate::memory::HostInputs {
        batch: t.batch_size.max(1),
        workers: t.num_workers.max(1),
        image_size: config.vision_config.backbone_config.image_size,
        mask_size: config.target_mask_size(),
        checkpoint_bytes,
        ..Default::default()
    };
    if let Ok(d) = Dataset::load(&t.data_dir) {
        for name in ["train", "valid"] {
            let Some(s) = d.split(name) else { continue };
            h.annotation_bytes += file_len(&s.annotation_file);
            for im in &s.images {
                // The file's header is the truth (a JSON size can be stale); the JSON is the
                // fallback for a file that cannot be read.
                let (w, hh) = image::image_dimensions(&im.path).ok().or(im.json_size).unwrap_or((0, 0));
                h.max_image_pixels = h.max_image_pixels.max(w as u64 * hh as u64);
                h.max_objects = h.max_objects.max(im.objects.len());
            }
        }
    }
    let e = crate::memory::host_estimate(&h, training);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let available =
        host_memory_gb.map(|g| (g * (1u64 << 30) as f64) as u64).or_else(crate::memory::host_available);
    r.facts.insert(
        "host_memory".into(),
        serde_json::json!({"inputs": h, "estimate_bytes": e, "available_bytes": available}),
    );
    let evidence = format!(
        "process {:.2} GiB + annotations {:.2} GiB + max(checkpoint load {:.2} GiB, data pipeline {:.2} GiB ({} loader thread(s), largest image {:.1} MP, {} objects){}) = {:.2} GiB{}",
        gib(e.process),
        gib(e.dataset),
        gib(e.model_load),
        gib(e.data_pipeline),
        h.workers.min(h.batch),
        h.max_image_pixels as f64 / 1e6,
        h.max_objects,
        if training.is_some() { format!(" + training {:.2} GiB", gib(e.training)) } else { String::new() },
        gib(e.total),
        available.map(|a| format!(" against {:.1} GiB available", gib(a))).unwrap_or_default()
    );
    match available {
        Some(a) if e.total > a => r.add(
            "F13",
            Severity::Error,
            "the predicted host memory exceeds what this machine has available: the run would be killed (exit 137, SIGKILL by the OOM killer)",
            evidence,
            if training.is_some() {
                "train on the GPU (hardware.device: cuda), or lower training.batch_size (with gradient_accumulation_steps to keep the effective batch)"
            } else {
                "lower training.num_workers or training.batch_size, or downscale very large images on disk"
            },
        ),
        _ => r.add("F13", Severity::Info, "predicted host memory (RAM) of the run", evidence, "none needed"),
    }
}

fn probe(cfg: &TrainConfig, opts: &DoctorOptions, r: &mut Report) {
    let scratch = std::env::temp_dir().join(format!("lorahost-doctor-{}", std::process::id()));
    let mut overrides = opts.overrides.clone();
    overrides.push(format!("output.output_dir={}", scratch.display()));
    // The logs too (an absolute logging_dir would put the probe's log beside the user's).
    overrides.push(format!("output.logging_dir={}", scratch.display()));
    overrides.push("training.eval_steps=1000000000".into());
    overrides.push("training.save_steps=1000000000".into());
    overrides.push("output.save_lora_only=true".into());
    overrides.push("evaluation.save_predictions=false".into());
    let t = TrainOptions {
        config: opts.config.clone(),
        overrides,
        max_steps: Some(opts.probe_steps),
        hot_reload: false,
        cache_dir: opts.cache_dir.clone(),
        ..Default::default()
    };
    let outcome = crate::train::train(&t);
    let metrics = scratch.join("metrics.jsonl");
    let trace = crate::metrics::Trace::read(&metrics);
    if outcome.is_ok() {
        // Micro-batches out of memory, and a probe stopped by them (F13).
        ending_checks(&metrics, r);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if crate::train::interrupt::requested() {
        let done = trace.as_ref().map_or(0, |t| t.steps.len());
        r.add(
            "D0",
            Severity::Warning,
            format!("the probe was interrupted (Ctrl-C) after {done} of {} step(s)", opts.probe_steps),
            "its scratch run was removed",
            "run doctor --probe-steps again to finish the probe",
        );
        if done == 0 {
            return;
        }
    } else if let Err(e) = outcome {
        let msg = format!("{e:#}");
        let code = if msg.contains("out of memory") { "F13" } else { "F26" };
        r.add(code, Severity::Error, "the probe run failed", msg, "see the message");
        return;
    }
    let Ok(trace) = trace else { return };
    analyse_steps(&trace.steps, cfg.training.max_grad_norm, r);
}

/// Findings from recorded steps (the probe's).
pub fn analyse_steps(steps: &[crate::metrics::StepRecord], max_norm: f64, r: &mut Report) {
    analyse_recorded_steps(steps, max_norm, true, "probe", r)
}

/// [`analyse_steps`], with its coarse fluctuation check (F10 on the coefficient of variation)
/// only when `fluctuation` ([`crate::run_diagnosis`] has its own), the step statistics under
/// the fact `facts_key`.
pub(crate) fn analyse_recorded_steps(
    steps: &[crate::metrics::StepRecord],
    max_norm: f64,
    fluctuation: bool,
    facts_key: &str,
    r: &mut Report,
) {
    // (Steps that trained nothing, every micro-batch out of memory, are F13's.)
    let trained: Vec<crate::metrics::StepRecord> =
        steps.iter().filter(|s| s.micro_steps != Some(0)).cloned().collect();
    let steps = &trained[..];
    if steps.is_empty() {
        return;
    }
    let losses: Vec<f64> = steps.iter().map(|s| s.loss).filter(|l| l.is_finite()).collect();
    // Skips the trainer decided (non-finite loss or gradients); a plugin's skips are its own.
    let skipped = |s: &&crate::metrics::StepRecord| s.action.as_deref() == Some("skip");
    let nonfinite =
        steps.iter().filter(|s| !s.loss.is_finite() || (skipped(s) && s.decided_by.is_none())).count();
    let mut by_plugin: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for s in steps.iter().filter(skipped) {
        if let Some(p) = s.decided_by.as_deref() {
            let e = by_plugin.entry(p).or_insert((0, s.reason.as_deref().unwrap_or("")));
            e.0 += 1;
        }
    }
    for (p, (count, reason)) in by_plugin {
        r.add(
            "D0",
            Severity::Info,
            format!("plugin {p} skipped {count} of {} probe steps", steps.len()),
            format!("first reason: {reason}"),
            "expected if the plugin guards against spikes; otherwise check its config",
        );
    }
    let mean = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
    let sd = (losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / losses.len().max(1) as f64).sqrt();
    let cv = if mean != 0.0 { sd / mean.abs() } else { 0.0 };
    let mut norms: Vec<f64> = steps.iter().map(|s| s.grad_norm).filter(|g| g.is_finite()).collect();
    norms.sort_by(f64::total_cmp);
    let q =
        |p: f64| norms.get(((norms.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    let clipped =
        steps.iter().filter(|s| s.grad_norm_clipped.is_some_and(|c| c < s.grad_norm * 0.999)).count();
    let mut terms: BTreeMap<String, f64> = BTreeMap::new();
    for s in steps {
        for (k, v) in &s.losses {
            *terms.entry(k.clone()).or_default() += v / steps.len() as f64;
        }
    }
    r.facts.insert(
        facts_key.into(),
        serde_json::json!({
            "steps": steps.len(), "loss_mean": mean, "loss_cv": cv, "loss_first": losses.first(), "loss_last": losses.last(),
            "grad_norm_p10_p50_p90": [q(0.1), q(0.5), q(0.9)], "clipped_steps": clipped,
            "lr_applied": steps.iter().map(|s| s.lr).collect::<Vec<_>>(), "terms_mean": terms,
        }),
    );
    // (A recorded run's are named with its steps by `run_diagnosis`.)
    if nonfinite > 0 && facts_key != crate::run_diagnosis::TRACE_FACTS {
        r.add(
            "F21",
            Severity::Error,
            "non-finite loss or gradients in the probe",
            format!("{nonfinite} of {} steps skipped", steps.len()),
            "see nonfinite_batches.jsonl for the image ids; check degenerate annotations; lower the LR",
        );
    }
    if mean.is_finite() && mean.abs() < 1e-3 {
        r.add(
            "F1",
            Severity::Error,
            "the loss is suspiciously tiny: likely no targets reach the loss",
            format!("mean loss {mean:e}"),
            "check that annotations load (doctor's data section) and that prompts match categories",
        );
    }
    if mean > 1e4 {
        r.add(
            "F2",
            Severity::Error,
            "the loss is orders of magnitude above SAM3's usual range (10..1000)",
            format!("mean loss {mean:.1}; terms {terms:?}"),
            "check box units (normalized cxcywh) and the loss normalization",
        );
    }
    if norms.last().is_some_and(|g| *g == 0.0) {
        r.add(
            "F9",
            Severity::Error,
            "zero gradient: the adapters are not on the path to the loss",
            format!("grad norms {norms:?}"),
            "check lora targets and components",
        );
    }
    if fluctuation && cv > 0.3 && steps.len() >= 4 {
        r.add(
            "F10",
            Severity::Warning,
            "the loss fluctuates strongly from step to step",
            format!(
                "coefficient of variation {cv:.2} over {} steps (mean {mean:.1}, sd {sd:.1})",
                steps.len()
            ),
            "raise the effective batch (gradient_accumulation_steps), keep clipping on, use warmup",
        );
    }
    if max_norm > 0.0 && clipped * 2 > steps.len() {
        r.add(
            "D5",
            Severity::Info,
            "clipping engaged on most steps: the effective step size is set by max_grad_norm, not the LR",
            format!(
                "{clipped} of {} steps clipped; median norm {:.3} vs max_grad_norm {max_norm}",
                steps.len(),
                q(0.5)
            ),
            format!(
                "fine early in training; if it persists, raise max_grad_norm towards {:.2} or lower the LR",
                q(0.5)
            ),
        );
    }
}

/// Parse the `--expect-fingerprint` value: a sha-256 prefix (8+ hex digits).
pub fn valid_fingerprint(s: &str) -> bool {
    let s = s.trim();
    s.len() >= 8 && s.chars().all(|c| c.is_ascii_hexdigit())
}
