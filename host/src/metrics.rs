//! The per-step metrics log: one JSON object per line (JSONL). `lorahost train` writes it and
//! `lorahost plugin replay` reads it; `docs/metrics-schema.md` documents every field.
//!
//! A line is one of:
//! - a **step record**: an object with a `step` field (see [`StepRecord`]);
//! - a **run header**: `{"run": {...}}` with the fields of the contract's `run-info`
//!   (see [`RunHeader`]), written at the start of a run and again when a resumed run's
//!   settings changed;
//! - anything else with an `event` field (plugin events, evaluations): ignored by readers
//!   that do not know it.
//!
//! Non-finite numbers are written as `null` (JSON has no NaN) and read back as NaN. The reader
//! also takes Python's bare `NaN` / `Infinity` / `-Infinity`, numbers written as strings
//! (`"1e-4"`, `"NaN"`), a UTF-8 BOM, CRLF line ends and a truncated last line (a run killed
//! mid-write: dropped with a warning). Besides lorahost's own log it reads a Hugging Face
//! `trainer_state.json`, the SAM3_LoRA fork's (TC4451) JSONL with `train_step` events, a
//! PyTorch Lightning `metrics.csv` (see [`Trace::parse`]) and TensorBoard event files
//! ([`crate::tfevents`], through [`Trace::read`]).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One optimizer step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Optimizer step (1-based).
    #[serde(deserialize_with = "de_step")]
    pub step: u64,
    /// Total weighted loss of the step (`null` when non-finite).
    #[serde(deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub loss: f64,
    /// Learning rate the step was taken with (NaN when the log has none).
    #[serde(default = "nan", deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping (NaN when the log has none).
    #[serde(default = "nan", deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub grad_norm: f64,
    /// Global gradient L2 norm after clipping.
    #[serde(default, deserialize_with = "opt_f64", skip_serializing_if = "Option::is_none")]
    pub grad_norm_clipped: Option<f64>,
    /// Micro-batches (forward/backward passes) in the step.
    #[serde(default, deserialize_with = "opt_u32", skip_serializing_if = "Option::is_none")]
    pub micro_steps: Option<u32>,
    /// Epoch (0-based).
    #[serde(default, deserialize_with = "opt_u32", skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    /// Total optimizer steps planned.
    #[serde(default, deserialize_with = "opt_u64", skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Warmup length in optimizer steps.
    #[serde(default, deserialize_with = "opt_u64", skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Unweighted per-term losses, e.g. `{"loss_mask": 0.12, "loss_dice": 0.4}` (`null` when
    /// non-finite).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable_map")]
    pub losses: BTreeMap<String, f64>,
    /// Weights applied to the terms in `losses`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable_map")]
    pub loss_weights: BTreeMap<String, f64>,
    /// Samples in the step (all micro-batches).
    #[serde(default, deserialize_with = "opt_u32", skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Annotated objects in the step's samples.
    #[serde(default, deserialize_with = "opt_u32", skip_serializing_if = "Option::is_none")]
    pub object_count: Option<u32>,
    /// Wall time of the step in milliseconds.
    #[serde(default, deserialize_with = "opt_f64", skip_serializing_if = "Option::is_none")]
    pub step_time_ms: Option<f64>,
    /// Peak memory during the step, bytes.
    #[serde(default, deserialize_with = "opt_u64", skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Peak heap bytes held during the step (the `lorahost` binary's counting allocator; the
    /// tensors, without allocator slack), when known.
    #[serde(default, deserialize_with = "opt_u64", skip_serializing_if = "Option::is_none")]
    pub heap_peak_bytes: Option<u64>,
    /// Per-group gradient statistics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grad_groups: Vec<GradGroupRecord>,
    /// What the trainer did after the plugins answered (`continue`, `skip`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Why the step was not a plain `continue` (the plugin's reason, or the trainer's for a
    /// non-finite step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The plugin whose answer is `action` (absent when the trainer decided itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Any other fields (numbers, and strings holding one, become the hook's `extra` values).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Gradient statistics of one parameter group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradGroupRecord {
    /// Group name (e.g. `vision`, `detr_decoder`).
    pub name: String,
    /// L2 norm (`null` when non-finite).
    #[serde(deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub l2_norm: f64,
    /// Largest |g| (`null` when non-finite).
    #[serde(default, deserialize_with = "nullable_f64", serialize_with = "finite_or_null")]
    pub max_abs: f64,
    /// NaN/inf entries.
    #[serde(default, deserialize_with = "u64_or_0")]
    pub nonfinite: u64,
    /// Entries.
    #[serde(default, deserialize_with = "u64_or_0")]
    pub numel: u64,
}

/// The run header line: `{"run": {...}}`. Every field is optional (0 / empty when absent);
/// numbers may be given as strings; unknown fields are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunHeader {
    /// Total optimizer steps.
    #[serde(deserialize_with = "u64_or_0")]
    pub total_steps: u64,
    /// Warmup in optimizer steps.
    #[serde(deserialize_with = "u64_or_0")]
    pub warmup_steps: u64,
    /// Gradient accumulation.
    #[serde(deserialize_with = "u32_or_0")]
    pub accumulation: u32,
    /// Samples per micro-batch.
    #[serde(deserialize_with = "u32_or_0")]
    pub batch_size: u32,
    /// Samples per optimizer step.
    #[serde(deserialize_with = "u32_or_0")]
    pub effective_batch_size: u32,
    /// Peak LR.
    #[serde(deserialize_with = "f64_or_0")]
    pub base_lr: f64,
    /// Scheduler name.
    #[serde(deserialize_with = "string_or_empty")]
    pub scheduler: String,
    /// Training samples.
    #[serde(deserialize_with = "u32_or_0")]
    pub dataset_size: u32,
    /// Optimizer steps per epoch.
    #[serde(deserialize_with = "u64_or_0")]
    pub steps_per_epoch: u64,
    /// Seed.
    #[serde(deserialize_with = "u64_or_0")]
    pub seed: u64,
}

/// A JSON number, or a string holding one (`"1e-4"`, `"NaN"`, `"Infinity"`, `"-inf"`); `null`
/// is None. Anything else is an error naming what was found.
pub fn number(v: &Value) -> Result<Option<f64>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_f64()),
        Value::String(s) => parse_number_text(s).map(Some).ok_or_else(|| format!("{s:?} is not a number")),
        Value::Bool(_) => Err(format!("expected a number, found `{v}`")),
        Value::Array(_) => Err("expected a number, found a list".into()),
        Value::Object(_) => Err("expected a number, found an object".into()),
    }
}

/// A number's text: what Rust and Python print (`1e-4`, `nan`, `NaN`, `inf`, `Infinity`, ...).
pub(crate) fn parse_number_text(s: &str) -> Option<f64> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "nan" | "+nan" | "-nan" => Some(f64::NAN),
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        _ => t.parse::<f64>().ok().filter(|x| x.is_finite()),
    }
}

/// A whole number >= 0 (`3`, `3.0`, `"3"`); `null` is None.
fn whole(v: &Value) -> Result<Option<u64>, String> {
    if let Some(n) = v.as_u64() {
        return Ok(Some(n));
    }
    match number(v)? {
        None => Ok(None),
        Some(x) if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 9.0e15 => Ok(Some(x as u64)),
        Some(x) => Err(format!("{x} is not a whole number >= 0")),
    }
}

fn nan() -> f64 {
    f64::NAN
}

fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(number(&v).map_err(D::Error::custom)?.unwrap_or(f64::NAN))
}

fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    number(&Value::deserialize(d)?).map_err(D::Error::custom)
}

fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    whole(&Value::deserialize(d)?).map_err(D::Error::custom)
}

fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match opt_u64(d)? {
        Some(n) => u32::try_from(n).map(Some).map_err(|_| D::Error::custom(format!("{n} is too large"))),
        None => Ok(None),
    }
}

fn u64_or_0<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(opt_u64(d)?.unwrap_or(0))
}

fn u32_or_0<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(opt_u32(d)?.unwrap_or(0))
}

fn f64_or_0<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(opt_f64(d)?.unwrap_or(0.0))
}

fn string_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    })
}

fn de_step<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    match whole(&v) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(D::Error::custom("`step` is null: steps are optimizer steps counted from 1")),
        Err(e) => Err(D::Error::custom(format!("`step` {v}: {e}; steps are optimizer steps counted from 1"))),
    }
}

fn nullable_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Value>::deserialize(d)?;
    m.into_iter()
        .map(|(k, v)| match number(&v) {
            Ok(x) => Ok((k, x.unwrap_or(f64::NAN))),
            Err(e) => Err(D::Error::custom(format!("`{k}`: {e}"))),
        })
        .collect()
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// A parsed metrics log.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The last run header (a resumed run whose settings changed writes a new one), when the
    /// log has one.
    pub run: Option<RunHeader>,
    /// Every run header with the first step it applies to, in file order: the header of a
    /// resumed run whose settings changed governs the steps from its first record on.
    pub segments: Vec<RunSegment>,
    /// Step records, ordered by step (a repeated step replaces the earlier records).
    pub steps: Vec<StepRecord>,
    /// What kind of log this was.
    pub format: TraceFormat,
    /// What the reader had to drop or guess (also logged as warnings).
    pub warnings: Vec<String>,
    /// Each record's loss is the mean over the steps since the previous record, not one
    /// step's loss (the Hugging Face Trainer logs so every `logging_steps`).
    pub loss_is_interval_mean: bool,
    /// Validation losses as (the step after which it was measured, loss), from the formats that
    /// log them beside the steps (Hugging Face `eval_loss`, Lightning `val_loss`, SAM3_LoRA's
    /// epoch summaries, TensorBoard), including one after the last step, which no step record
    /// carries as `validation.loss`. lorahost's own `validation` events are read by
    /// [`crate::run_diagnosis::validations`].
    pub validation: Vec<(u64, f64)>,
    /// The log is the Hugging Face Trainer's, whatever the file (trainer_state.json, its
    /// console, TensorBoard or W&B logs): its losses are means over the logging interval, and it
    /// clips (`max_grad_norm` 1.0 unless set otherwise) while logging the norm before clipping.
    pub hf_trainer: bool,
    /// The clipping threshold the log's own record of the trainer's settings names (the
    /// Hugging Face Trainer's arguments in a TensorBoard file; 0 = no clipping), when it has one.
    pub max_grad_norm: Option<f64>,
    /// Steps whose logged gradient norm was NaN or infinite (formats that write an absent norm
    /// as NaN too cannot show it on the step record).
    pub nonfinite_grad_steps: Vec<u64>,
    /// How the log says the run ended early, when it does (a console log's CUDA out-of-memory
    /// error, the shell's `Killed`, a Python traceback): the line that says so.
    pub ended_by: Option<String>,
}

/// A run header and the steps it governs (from `from_step` to the next segment's).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSegment {
    /// First step the header applies to.
    pub from_step: u64,
    /// The header.
    pub header: RunHeader,
}

/// The kinds of log [`Trace::parse`] reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TraceFormat {
    /// lorahost's own `metrics.jsonl` (or any JSONL of step records).
    #[default]
    Lorahost,
    /// A Hugging Face Trainer `trainer_state.json`.
    HuggingFace,
    /// The SAM3_LoRA fork's (TC4451) JSONL: `train_step` events.
    Sam3LoraEvents,
    /// A PyTorch Lightning CSVLogger `metrics.csv`.
    LightningCsv,
    /// Another CSV metrics log (a W&B history export, a TensorBoard scalar download).
    Csv,
    /// TensorBoard event files (`events.out.tfevents.*`), see [`crate::tfevents`].
    TensorBoard,
    /// A trainer's console output (tqdm bars, printed metric dictionaries), see
    /// [`crate::console_log`].
    Console,
}

impl TraceFormat {
    /// Short description for messages.
    pub fn describe(self) -> &'static str {
        match self {
            TraceFormat::Lorahost => "a lorahost metrics log",
            TraceFormat::HuggingFace => "a Hugging Face trainer_state.json",
            TraceFormat::Sam3LoraEvents => "a SAM3_LoRA (TC4451) train_step log",
            TraceFormat::LightningCsv => "a Lightning metrics.csv",
            TraceFormat::Csv => "a CSV metrics export",
            TraceFormat::TensorBoard => "TensorBoard event files",
            TraceFormat::Console => "a trainer's console output",
        }
    }
}

/// What the reader accepts, for error messages.
pub const SUPPORTED_FORMATS: &str = "lorahost's metrics.jsonl (one JSON object per line with `step` and `loss`), a Hugging Face Trainer trainer_state.json (`log_history`), the SAM3_LoRA fork's JSONL (`{\"event\": \"train_step\", \"step\": N, \"loss\": ...}` lines) a CSV log (a PyTorch Lightning metrics.csv, a W&B or TensorBoard CSV export: a `step` column and a column with `loss` in its name) TensorBoard event files (an events.out.tfevents.* file or its folder) or a trainer's console output (nohup.out, a SLURM .out file: tqdm bars with the loss, as SAM3_LoRA prints them, or the Hugging Face Trainer's printed {'loss': ...} lines); see docs/metrics-schema.md";

/// Why a metrics log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// I/O.
    #[error("cannot read metrics log {path}: {error}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error (shown in the message, not chained, so it is printed once).
        error: std::io::Error,
    },
    /// A bad line.
    #[error("{path}:{line}: {reason}\n  fix: each line must be a JSON object with at least `step` and `loss` (see docs/metrics-schema.md)")]
    Line {
        /// File.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A file that is not (or not entirely) a readable trace; the reason says where and the fix.
    #[error("{path}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong, where, and what to do.
        reason: String,
    },
    /// No step record at all.
    #[error(
        "{path}: no step records found: {detail}\n  fix: give a per-step training log: {SUPPORTED_FORMATS}"
    )]
    Empty {
        /// File.
        path: PathBuf,
        /// What the file held instead.
        detail: String,
    },
}

/// Python's `json` writes NaN and infinities as bare `NaN`, `Infinity`, `-Infinity`, which
/// JSON does not have: quote them (outside strings) so that [`number`] maps them back. None
/// when there is nothing to quote.
fn quote_non_finite(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let (mut in_str, mut esc, mut copied) = (false, false, 0usize);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let tok = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| {
            boundary
                && b[i..].starts_with(t.as_bytes())
                && b.get(i + t.len()).is_none_or(|n| !(n.is_ascii_alphanumeric() || *n == b'_'))
        });
        if let Some(t) = tok {
            let o = out.get_or_insert_with(String::new);
            o.push_str(&text[copied..i]);
            o.push('"');
            o.push_str(t);
            o.push('"');
            i += t.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// Parse JSON, taking Python's bare non-finite numbers too.
pub(crate) fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(e) => match quote_non_finite(text) {
            Some(q) => serde_json::from_str(&q).map_err(|_| e),
            None => Err(e),
        },
    }
}

/// The keys of an object, for messages.
fn keys_of(o: &serde_json::Map<String, Value>) -> String {
    let mut k: Vec<&str> = o.keys().map(String::as_str).take(12).collect();
    if o.len() > 12 {
        k.push("...");
    }
    k.join(", ")
}

/// Repeated steps, reported once per file.
#[derive(Default)]
struct Repeats {
    lines: usize,
    replaced: usize,
    first: Option<String>,
}

impl Repeats {
    /// Add `rec` to `steps`; a step at or before the last one (a resumed run appended to the
    /// same file, or a log with one line per micro-batch) replaces the records from it on.
    fn push(&mut self, steps: &mut Vec<StepRecord>, rec: StepRecord, at: impl FnOnce() -> String) {
        if let Some(last) = steps.last().map(|l| l.step).filter(|l| rec.step <= *l) {
            let keep = steps.partition_point(|s| s.step < rec.step);
            self.replaced += steps.len() - keep;
            self.lines += 1;
            if self.first.is_none() {
                self.first = Some(format!("{}: step {} after step {last}", at(), rec.step));
            }
            steps.truncate(keep);
        }
        steps.push(rec);
    }

    fn warning(&self, origin: &Path) -> Option<String> {
        let first = self.first.as_ref()?;
        Some(format!(
            "{}: {} record(s) repeat an earlier step (first at {first}): a resumed run appended to the log, or a log with one line per micro-batch; the later records replace the earlier ones ({} replaced)",
            origin.display(),
            self.lines,
            self.replaced
        ))
    }
}

impl Trace {
    /// Read a metrics log (any format [`Trace::parse`] takes).
    ///
    /// A folder is read through its `metrics.jsonl` when it has one (a lorahost run's
    /// logging folder, which also holds its TensorBoard files), else as TensorBoard logs when it
    /// (or a subfolder) holds event files; a file named `*tfevents*` or holding TFRecords is
    /// read as TensorBoard logs too ([`crate::tfevents`]).
    pub fn read(path: &Path) -> Result<Trace, TraceError> {
        if path.is_dir() {
            let candidate = path.join("metrics.jsonl");
            if candidate.is_file() {
                return Self::read(&candidate);
            }
            let events = crate::tfevents::event_files_in(path)?;
            if !events.is_empty() {
                return Self::logged(crate::tfevents::trace_from_event_files(&events, path)?);
            }
            return Err(TraceError::Format {
                path: path.into(),
                reason: "is a directory without a metrics log; name the metrics file (lorahost writes <output_dir>/metrics.jsonl; TensorBoard logs are read from an events.out.tfevents.* file or its folder)".into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|error| TraceError::Read { path: path.into(), error })?;
        let text = std::str::from_utf8(&bytes);
        if crate::tfevents::is_event_file_name(path)
            || (text.is_err() && crate::tfevents::looks_like_event_file(&bytes))
        {
            return Self::logged(crate::tfevents::trace_from_event_files(&[path.to_path_buf()], path)?);
        }
        match text {
            Ok(text) => Self::parse(text, path),
            Err(e) => Err(TraceError::Format {
                path: path.into(),
                reason: format!(
                    "not a text file (invalid UTF-8 at byte {}) nor a TensorBoard event file\n  fix: give {SUPPORTED_FORMATS}",
                    e.valid_up_to()
                ),
            }),
        }
    }

    /// `trace` after logging its warnings.
    fn logged(trace: Trace) -> Result<Trace, TraceError> {
        for w in &trace.warnings {
            tracing::warn!("{w}");
        }
        Ok(trace)
    }

    /// Parse a metrics log (`origin` names it in errors and warnings):
    /// - JSONL: lorahost's `metrics.jsonl`, or the SAM3_LoRA fork's (TC4451) event lines, whose
    ///   `train_step` events are step records;
    /// - one JSON document: a Hugging Face Trainer `trainer_state.json` (see
    ///   [`Trace::from_hf_trainer_state`]) or a JSON list of step records;
    /// - CSV: a PyTorch Lightning `metrics.csv` (see [`Trace::from_lightning_csv`]).
    ///
    /// Warnings (dropped truncated last line, repeated steps, step 0) are logged and kept in
    /// [`Trace::warnings`].
    pub fn parse(text: &str, origin: &Path) -> Result<Trace, TraceError> {
        Self::logged(Self::parse_quiet(text, origin)?)
    }

    /// [`Trace::read`] of a text log without logging its warnings (they stay in
    /// [`Trace::warnings`]): for a log read again and again while it is written.
    pub fn read_quiet(path: &Path) -> Result<Trace, TraceError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| TraceError::Read { path: path.into(), error })?;
        Self::parse_quiet(&text, path)
    }

    fn parse_quiet(text: &str, origin: &Path) -> Result<Trace, TraceError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let data = |l: &&str| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#')
        };
        let Some(first) = text.lines().find(data).map(str::trim) else {
            let what = if text.trim().is_empty() { "the file is empty" } else { "only blank and # lines" };
            return Err(TraceError::Empty { path: origin.into(), detail: what.into() });
        };
        let several = text.lines().filter(data).nth(1).is_some();
        let first_value = parse_json(first).ok();
        if first_value.is_none() && crate::console_log::looks_like(text) {
            if let Some(trace) = crate::console_log::parse(text) {
                return Ok(trace);
            }
        }
        if let Some(reason) =
            first_value.is_none().then(|| crate::console_log::why_unreadable(text)).flatten()
        {
            return Err(TraceError::Format { path: origin.into(), reason });
        }
        if first_value.is_none() && (first.starts_with('{') || first.starts_with('[')) {
            // A JSON document over several lines (a pretty-printed trainer_state.json), unless
            // the next line is JSON on its own: JSONL whose first line is bad.
            let whole = parse_json(text);
            if whole.is_err()
                && text.lines().filter(data).nth(1).is_some_and(|l| parse_json(l.trim()).is_ok())
            {
                return Self::from_jsonl(text, origin);
            }
            let v = whole.map_err(|e| TraceError::Format {
                path: origin.into(),
                reason: format!(
                    "line {} column {}: not valid JSON: {}\n  the file starts with `{}` on a line of its own, so it was read as one JSON document (such as a Hugging Face trainer_state.json) rather than one object per line\n  fix: repair the file there, or give {SUPPORTED_FORMATS}",
                    e.line(),
                    e.column(),
                    e.to_string().split(" at line ").next().unwrap_or_default(),
                    &first[..1]
                ),
            })?;
            return Self::from_document(&v, origin);
        }
        if let Some(v) = &first_value {
            let doc = v.is_array()
                || v.get("log_history").is_some()
                || v.get("epoch_order").is_some()
                || v.get("optimizer_updates").is_some();
            if doc && !several {
                return Self::from_document(v, origin);
            }
        }
        if first_value.is_none() && first.contains(',') && !first.contains('{') {
            return Self::from_lightning_csv(text, origin);
        }
        Self::from_jsonl(text, origin)
    }

    /// One JSON document: a trainer_state.json or a list of step records.
    fn from_document(v: &Value, origin: &Path) -> Result<Trace, TraceError> {
        let format_err = |reason: String| TraceError::Format { path: origin.into(), reason };
        match v {
            Value::Object(o) if o.get("log_history").is_some_and(Value::is_array) => {
                Self::from_hf_trainer_state(v, origin)
            }
            Value::Object(o) if o.contains_key("epoch_order") || o.contains_key("optimizer_updates") => {
                let out = origin
                    .parent()
                    .and_then(Path::parent)
                    .filter(|c| c.file_name().is_some_and(|n| n == "checkpoints"))
                    .and_then(Path::parent)
                    .map(|d| d.join("metrics.jsonl").display().to_string())
                    .unwrap_or_else(|| "<output_dir>/metrics.jsonl".into());
                Err(format_err(format!(
                    "this is a lorahost checkpoint's state (checkpoints/step-N/trainer_state.json: position, optimizer and plugin state), not a per-step log\n  fix: replay the run's metrics log, {out} (or <logging_dir>/metrics.jsonl when training.logging_dir is set)"
                )))
            }
            Value::Array(items) => {
                let mut r = JsonlReader::new(origin);
                for (i, item) in items.iter().enumerate() {
                    r.item(item.clone(), format!("[{i}]"), &|reason| {
                        format_err(format!("[{i}] (item {} of the list): {reason}", i + 1))
                    })?;
                }
                r.finish()
            }
            Value::Object(o) if o.contains_key("step") => {
                let mut r = JsonlReader::new(origin);
                r.item(v.clone(), "the JSON object".into(), &|reason| {
                    format_err(format!("the JSON object: {reason}"))
                })?;
                r.finish()
            }
            Value::Object(o) => Err(format_err(format!(
                "one JSON object with keys {} (no `log_history`, no `step`): not a per-step training log\n  fix: give {SUPPORTED_FORMATS}",
                keys_of(o)
            ))),
            other => Err(format_err(format!(
                "a JSON {} is not a training log\n  fix: give {SUPPORTED_FORMATS}",
                match other {
                    Value::String(_) => "string",
                    Value::Number(_) => "number",
                    Value::Bool(_) => "boolean",
                    _ => "null",
                }
            ))),
        }
    }

    fn from_jsonl(text: &str, origin: &Path) -> Result<Trace, TraceError> {
        let lines: Vec<&str> = text.lines().collect();
        let last_data = lines.iter().rposition(|l| !l.trim().is_empty() && !l.trim().starts_with('#'));
        let mut r = JsonlReader::new(origin);
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| TraceError::Line { path: origin.into(), line: i + 1, reason };
            let value = match parse_json(line) {
                Ok(v) => v,
                // A run killed mid-write leaves a cut-off last line; `train --resume` skips it too.
                Err(e) if Some(i) == last_data && e.classify() == serde_json::error::Category::Eof => {
                    let shown: String = line.chars().take(80).collect();
                    r.warnings.push(format!(
                        "{}:{}: the last line is cut off (a run killed while writing it?) and is dropped: {shown}{}",
                        origin.display(),
                        i + 1,
                        if shown.len() < line.len() { "..." } else { "" }
                    ));
                    break;
                }
                Err(e) => {
                    let hint = if r.items == 0 {
                        format!("\n  this does not look like a metrics log; supported: {SUPPORTED_FORMATS}")
                    } else {
                        String::new()
                    };
                    return Err(err(format!("not JSON: {e}{hint}")));
                }
            };
            r.item(value, format!("line {}", i + 1), &err)?;
        }
        r.finish()
    }
}

/// Reads JSON objects (lines of a JSONL file, or items of a list) into a trace.
struct JsonlReader<'a> {
    origin: &'a Path,
    trace: Trace,
    repeats: Repeats,
    warnings: Vec<String>,
    /// Objects seen.
    items: usize,
    /// `event` values seen, with counts.
    events: BTreeMap<String, usize>,
    headers: usize,
    /// A header waiting for its first step.
    pending: Option<RunHeader>,
    zero_step: Option<String>,
    /// SAM3_LoRA (TC4451) events: the `run_start` line, the epoch numbering (0- or 1-based),
    /// the last validation loss (from `epoch_summary`), the last step of a restarted count.
    tc_start: Option<serde_json::Map<String, Value>>,
    tc_epoch_base: Option<u64>,
    tc_validation: Option<(u64, f64)>,
    tc_last: Option<(u64, u64)>,
    tc_steps_per_epoch: Option<u64>,
}

impl<'a> JsonlReader<'a> {
    fn new(origin: &'a Path) -> Self {
        JsonlReader {
            origin,
            trace: Trace::default(),
            repeats: Repeats::default(),
            warnings: Vec::new(),
            items: 0,
            events: BTreeMap::new(),
            headers: 0,
            pending: None,
            zero_step: None,
            tc_start: None,
            tc_epoch_base: None,
            tc_validation: None,
            tc_last: None,
            tc_steps_per_epoch: None,
        }
    }

    /// One object; `at` says where it is ("line 3"), `err` makes an error there.
    fn item(
        &mut self,
        value: Value,
        at: String,
        err: &dyn Fn(String) -> TraceError,
    ) -> Result<(), TraceError> {
        self.items += 1;
        let Value::Object(obj) = value else {
            return Err(err("not a JSON object".into()));
        };
        if let Some(run) = obj.get("run") {
            let h: RunHeader =
                serde_json::from_value(run.clone()).map_err(|e| err(format!("bad run header: {e}")))?;
            self.headers += 1;
            self.trace.run = Some(h.clone());
            self.pending = Some(h);
            return Ok(());
        }
        if let Some(event) = obj.get("event") {
            let name = event.as_str().map_or_else(|| event.to_string(), str::to_string);
            *self.events.entry(name.clone()).or_default() += 1;
            match name.as_str() {
                "train_step" => return self.tc_step(obj, at, err),
                "run_start" => self.tc_start = Some(obj),
                "epoch_summary" => {
                    if let (Some(v), Some((last, _))) =
                        (obj.get("val_loss").and_then(|v| number(v).ok().flatten()), self.tc_last)
                    {
                        self.tc_validation = Some((last, v));
                        self.trace.validation.push((last, v));
                    }
                }
                // Events (validation, plugin reloads, ...) carry a `step` too; not step records.
                _ => {}
            }
            return Ok(());
        }
        if !obj.contains_key("step") {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            let per_epoch = !keys.is_empty()
                && keys.iter().all(|k| ["epoch", "train_loss", "val_loss"].contains(k))
                && obj.contains_key("epoch");
            let what = if per_epoch {
                "one object per epoch (`epoch`, `train_loss`, `val_loss`: SAM3_LoRA's val_stats.json?): per-epoch losses are not per-step records and cannot be replayed; give the run's per-step log".to_string()
            } else {
                format!("no `step` field (keys: {}); supported: {SUPPORTED_FORMATS}", keys_of(&obj))
            };
            return Err(err(what));
        }
        let rec: StepRecord = serde_json::from_value(Value::Object(obj)).map_err(|e| err(e.to_string()))?;
        self.push(rec, at);
        Ok(())
    }

    fn push(&mut self, rec: StepRecord, at: String) {
        if rec.step == 0 && self.zero_step.is_none() {
            self.zero_step = Some(at.clone());
        }
        if let Some(h) = self.pending.take() {
            self.trace.segments.push(RunSegment { from_step: rec.step, header: h });
        }
        self.repeats.push(&mut self.trace.steps, rec, || at);
    }

    /// A SAM3_LoRA (TC4451) `train_step` event: `step` counts the batches of the epoch (1-based,
    /// `epoch` 1-based, `steps_per_epoch` given), or `global_step` is the optimizer step.
    fn tc_step(
        &mut self,
        mut obj: serde_json::Map<String, Value>,
        at: String,
        err: &dyn Fn(String) -> TraceError,
    ) -> Result<(), TraceError> {
        self.trace.format = TraceFormat::Sam3LoraEvents;
        let get = |o: &serde_json::Map<String, Value>, k: &str| -> Result<Option<u64>, TraceError> {
            o.get(k).map_or(Ok(None), |v| whole(v).map_err(|e| err(format!("`{k}`: {e}"))))
        };
        let step = get(&obj, "step")?;
        let global = get(&obj, "global_step")?;
        let epoch = get(&obj, "epoch")?;
        let per_epoch = get(&obj, "steps_per_epoch")?;
        if per_epoch.is_some() {
            self.tc_steps_per_epoch = per_epoch;
        }
        let base =
            *self.tc_epoch_base.get_or_insert(if epoch == Some(0) || global.is_some() { 0 } else { 1 });
        let epoch0 = epoch.map(|e| e.saturating_sub(base));
        let step = match (global, step, epoch0, per_epoch) {
            (Some(g), _, _, _) => g,
            (None, Some(s), Some(e), Some(n)) => e * n + s,
            (None, Some(s), _, _) => s,
            (None, None, _, _) => {
                return Err(err("a train_step event without `step` or `global_step`".into()))
            }
        };
        if let (Some((last, last_epoch)), Some(e)) = (self.tc_last, epoch0) {
            if step <= last && e > last_epoch {
                return Err(err(format!(
                    "step {step} in epoch {e} after step {last} in epoch {last_epoch}: the step count restarts each epoch and the line has neither `global_step` nor `steps_per_epoch` to number the run's steps"
                )));
            }
        }
        self.tc_last = Some((step, epoch0.unwrap_or(0)));
        obj.remove("event");
        obj.insert("step".into(), step.into());
        if let Some(e) = epoch0 {
            obj.insert("epoch".into(), e.into());
        }
        if !obj.contains_key("lr") {
            if let Some(lr) = obj.get("learning_rate").cloned() {
                obj.insert("lr".into(), lr);
            }
        }
        if !obj.contains_key("step_time_ms") {
            if let Some(t) = ["iter_time_sec", "iter_time"].iter().find_map(|k| obj.get(*k)) {
                if let Ok(Some(s)) = number(t) {
                    obj.insert("step_time_ms".into(), Value::from(s * 1e3));
                }
            }
        }
        if let Some((at, loss)) = self.tc_validation {
            obj.insert("validation.step".into(), Value::from(at as f64));
            obj.insert("validation.loss".into(), Value::from(loss));
        }
        let rec: StepRecord = serde_json::from_value(Value::Object(obj)).map_err(|e| err(e.to_string()))?;
        self.push(rec, at);
        Ok(())
    }

    fn finish(mut self) -> Result<Trace, TraceError> {
        let origin = self.origin;
        if self.trace.steps.is_empty() {
            let mut seen = Vec::new();
            if self.headers > 0 {
                seen.push(format!("{} run header(s)", self.headers));
            }
            if !self.events.is_empty() {
                let ev: Vec<String> = self.events.iter().map(|(k, n)| format!("{k} ({n})")).collect();
                seen.push(format!("lines with `event` values {}", ev.join(", ")));
            }
            let detail = if seen.is_empty() {
                format!("{} JSON object(s), none a step record", self.items)
            } else {
                format!("the file has {} but no step records", seen.join(" and "))
            };
            return Err(TraceError::Empty { path: origin.into(), detail });
        }
        if let Some(at) = &self.zero_step {
            self.warnings.push(format!(
                "{} {at}: step 0: lorahost counts optimizer steps from 1 (a 0-based log?); the records are replayed with the steps as written, and plugins see a step 0 that training never sends",
                origin.display()
            ));
        }
        self.warnings.extend(self.repeats.warning(origin));
        if self.trace.format == TraceFormat::Sam3LoraEvents && self.trace.segments.is_empty() {
            let start = self.tc_start.unwrap_or_default();
            let training = start.get("config").and_then(|c| c.get("training"));
            let pick = |keys: &[&str]| {
                keys.iter().find_map(|k| {
                    start
                        .get(*k)
                        .or_else(|| training.and_then(|t| t.get(*k)))
                        .and_then(|v| number(v).ok().flatten())
                })
            };
            let spe = self.tc_steps_per_epoch.unwrap_or(0);
            let epochs = pick(&["epochs", "num_epochs"]).unwrap_or(0.0) as u64;
            let h = RunHeader {
                total_steps: epochs * spe,
                accumulation: 1,
                batch_size: pick(&["batch_size_per_gpu", "batch_size"]).unwrap_or(0.0) as u32,
                effective_batch_size: pick(&["global_batch_size"]).unwrap_or(0.0) as u32,
                base_lr: pick(&["learning_rate", "lr"]).unwrap_or(0.0),
                dataset_size: pick(&["train_samples"]).unwrap_or(0.0) as u32,
                steps_per_epoch: spe,
                ..Default::default()
            };
            self.trace.segments.push(RunSegment { from_step: self.trace.steps[0].step, header: h.clone() });
            self.trace.run = Some(h);
        }
        self.trace.warnings = self.warnings;
        Ok(self.trace)
    }
}

impl Trace {
    /// A Hugging Face Trainer `trainer_state.json`: each `log_history` entry with `loss` becomes a
    /// step record (`step`, `loss`, `learning_rate`, `grad_norm`, `epoch`; the Trainer logs every
    /// `logging_steps`, so steps may be sparse), and each `eval_loss` entry is handed to the
    /// following steps as `validation.step` / `validation.loss` extra values, as lorahost's own
    /// trainer does (so `early_stopping` replays). The run header: `max_steps` as total steps,
    /// `train_batch_size`, the largest LR logged as the base LR, and the steps per epoch from
    /// the logged epoch fractions (`logging_steps` and the rest are not run-info fields). HF's
    /// `epoch` is the fraction of epochs completed after the step (1.0 = the last step of the
    /// first epoch), so a step's 0-based epoch is ceil(epoch) - 1. A repeated step (a resumed
    /// run) replaces the earlier records, as in JSONL; entries without `learning_rate` give NaN
    /// (a warning says so).
    pub fn from_hf_trainer_state(v: &Value, origin: &Path) -> Result<Trace, TraceError> {
        // The Trainer logs the mean loss since its previous log.
        let mut trace = Trace {
            format: TraceFormat::HuggingFace,
            loss_is_interval_mean: true,
            hf_trainer: true,
            ..Default::default()
        };
        let mut repeats = Repeats::default();
        let mut validation: Option<(f64, f64)> = None;
        let mut spe: Option<(u64, f64)> = None;
        let mut no_lr = 0usize;
        let history = v["log_history"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, e) in history.iter().enumerate() {
            let err = |reason: String| {
                TraceError::Format {
                path: origin.into(),
                reason: format!(
                    "log_history[{i}] (entry {} of the list): {reason}\n  fix: each log_history entry needs a whole `step` >= 1; a training entry a numeric `loss`",
                    i + 1
                ),
            }
            };
            let num = |k: &str| -> Result<Option<f64>, TraceError> {
                e.get(k).map_or(Ok(None), |x| number(x).map_err(|m| err(format!("`{k}`: {m}"))))
            };
            let Some(step) = e.get("step") else { continue };
            let step = whole(step).map_err(|m| err(format!("`step`: {m}")))?.unwrap_or(0);
            if let Some(l) = num("eval_loss")? {
                validation = Some((step as f64, l));
                trace.validation.push((step, l));
            }
            if e.get("loss").is_none() {
                continue;
            }
            let loss = num("loss")?.unwrap_or(f64::NAN);
            let lr = num("learning_rate")?;
            no_lr += usize::from(lr.is_none());
            let grad_norm = num("grad_norm")?;
            if grad_norm.is_some_and(|g| !g.is_finite()) {
                trace.nonfinite_grad_steps.push(step);
            }
            let mut rec = StepRecord::new(step, loss, lr.unwrap_or(f64::NAN), grad_norm.unwrap_or(f64::NAN));
            if let Some(x) = num("epoch")?.filter(|x| x.is_finite() && *x >= 0.0) {
                // Completed epochs after this step; 1.0 ends the first epoch (0-based epoch 0).
                rec.epoch = Some(((x - 1e-6).ceil().max(1.0) - 1.0) as u32);
                if x > 0.0 && step > 0 {
                    spe = Some((step, x));
                }
            }
            if let Some((at, l)) = validation {
                rec.extra.insert("validation.step".into(), serde_json::json!(at));
                rec.extra.insert("validation.loss".into(), serde_json::json!(l));
            }
            repeats.push(&mut trace.steps, rec, || format!("log_history[{i}]"));
        }
        if trace.steps.is_empty() {
            let detail = if history.is_empty() {
                "its log_history is empty (a Hugging Face trainer_state.json written before the first logging step?)".to_string()
            } else {
                format!(
                    "a Hugging Face trainer_state.json whose log_history has {} entries but none with a training `loss` (only evaluations or the final summary)",
                    history.len()
                )
            };
            return Err(TraceError::Empty { path: origin.into(), detail });
        }
        if trace.steps[0].step == 0 {
            trace.warnings.push(format!(
                "{}: step 0 in log_history: Hugging Face counts steps from 1",
                origin.display()
            ));
        }
        trace.warnings.extend(repeats.warning(origin));
        if no_lr > 0 {
            trace.warnings.push(format!(
                "{}: {no_lr} of {} training entries have no `learning_rate`: their LR is unknown (NaN); LR-schedule plugins get scheduled_lr NaN for those steps",
                origin.display(),
                trace.steps.len()
            ));
        }
        let base_lr = trace.steps.iter().map(|s| s.lr).filter(|l| l.is_finite()).fold(0.0, f64::max);
        let header = RunHeader {
            total_steps: v.get("max_steps").and_then(|x| whole(x).ok().flatten()).unwrap_or(0),
            base_lr,
            accumulation: 1,
            batch_size: v.get("train_batch_size").and_then(|x| whole(x).ok().flatten()).unwrap_or(0) as u32,
            steps_per_epoch: spe.map_or(0, |(s, x)| (s as f64 / x).round() as u64),
            ..Default::default()
        };
        trace.segments.push(RunSegment { from_step: trace.steps[0].step, header: header.clone() });
        trace.run = Some(header);
        Ok(trace)
    }

    /// A CSV metrics log: a PyTorch Lightning CSVLogger `metrics.csv`, a W&B history export, or
    /// a TensorBoard scalar download (`Wall time,Step,Value`).
    ///
    /// The step column is `step` (Lightning's global step when an `epoch` column is beside it,
    /// 0-based: the number of optimizer steps done before the row, so a row at step s is
    /// lorahost's step s + 1), or `Step`, `global_step`, `trainer/global_step`,
    /// `train/global_step`, `_step` (an export's, and a `step` without Lightning's `epoch`;
    /// shifted to 1-based only when the loss starts at step 0). A W&B export's
    /// `<run> - <metric>` columns are named by their metric. The other columns are matched by the words
    /// of their names as TensorBoard tags are ([`crate::log_columns`]): the training loss
    /// (`train_loss_step` before `train_loss_epoch`, the total before a term), the LR (`lr-*`
    /// from LearningRateMonitor, held over rows without one), the gradient norm, `epoch`, the
    /// validation loss (reaching the following steps as `validation.step` / `validation.loss`);
    /// W&B's `__MIN` / `__MAX` columns are skipped. A TensorBoard download's `Value` is taken
    /// as the loss (with a warning) and its `Wall time` gives the step times. Rows of the same
    /// step are merged (Lightning writes one row per log call). Quoted cells may hold commas.
    pub fn from_lightning_csv(text: &str, origin: &Path) -> Result<Trace, TraceError> {
        use crate::log_columns::{
            is_epoch, is_grad_norm, is_loss, is_lr, is_total, is_validation, pick, prefers_total_norm,
        };
        let format_err = |reason: String| TraceError::Format { path: origin.into(), reason };
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, head) = lines.next().ok_or_else(|| format_err("empty CSV".into()))?;
        let names = csv_cells(head);
        // A W&B export names each column `<run name> - <metric>`: the metric is the name (the
        // run's name may hold any word, `test` or `val` included).
        let cols: Vec<String> = names
            .iter()
            .map(|c| c.rsplit_once(" - ").map_or(c.as_str(), |(_, metric)| metric.trim()).to_string())
            .collect();
        let rows: Vec<(usize, Vec<String>)> = lines.map(|(i, l)| (i, csv_cells(l))).collect();
        let find =
            |names: &[&str]| names.iter().find_map(|n| cols.iter().position(|c| c.eq_ignore_ascii_case(n)));
        // Lightning's CSVLogger writes `step` and `epoch` on every row.
        let lightning = cols.iter().any(|c| c == "step") && cols.iter().any(|c| c == "epoch");
        // The Hugging Face Trainer's W&B / CSV logs: `train/global_step`, or its metric names.
        let hf_trainer = find(&["train/global_step"]).is_some()
            || ["train/loss", "train/grad_norm", "train/learning_rate", "train/epoch"]
                .iter()
                .all(|n| cols.iter().any(|c| c == n));
        let Some(step_col) =
            find(&["step", "global_step", "trainer/global_step", "train/global_step", "_step"])
        else {
            return Err(format_err(format!(
                "a CSV file with columns {} but no `step` column: unsupported format\n  fix: give {SUPPORTED_FORMATS}",
                column_list(&names)
            )));
        };
        // Non-empty cells per column: how often each series was logged.
        let counts: Vec<(&str, usize)> = cols
            .iter()
            .enumerate()
            .filter(|(c, name)| *c != step_col && !name.ends_with("__MIN") && !name.ends_with("__MAX"))
            .map(|(c, name)| {
                (name.as_str(), rows.iter().filter(|(_, r)| r.get(c).is_some_and(|v| !v.is_empty())).count())
            })
            .collect();
        let role = |f: &dyn Fn(&str) -> bool, prefer: &dyn Fn(&str) -> bool| {
            let c: Vec<(&str, usize)> = counts.iter().copied().filter(|(t, n)| *n > 0 && f(t)).collect();
            pick(&c, prefer).and_then(|name| cols.iter().position(|c| c == name))
        };
        let mut warnings = Vec::new();
        let loss_col = role(&|t| is_loss(t) && !is_validation(t), &is_total);
        let wall_col = find(&["wall time", "wall_time"]);
        let loss_col = match (loss_col, find(&["value"])) {
            (Some(c), _) => c,
            (None, Some(v)) => {
                warnings.push(format!(
                    "{}: a `{}` column and no loss column (a TensorBoard scalar download): its values are taken as the training loss",
                    origin.display(),
                    names[v]
                ));
                v
            }
            (None, None) => {
                return Err(format_err(format!(
                    "a CSV file with columns {} but no loss column (a name with the word `loss`, e.g. `train_loss_step`, `train_loss` or `loss`)\n  fix: give {SUPPORTED_FORMATS}",
                    column_list(&names)
                )))
            }
        };
        let not_loss = |t: &str| t != cols[loss_col];
        let lr_col = role(&|t| not_loss(t) && !is_validation(t) && is_lr(t), &|_| true);
        let gn_col = role(&|t| not_loss(t) && !is_validation(t) && is_grad_norm(t), &prefers_total_norm);
        let val_col = role(&|t| not_loss(t) && is_loss(t) && is_validation(t), &is_total);
        let epoch_col = role(&|t| !is_validation(t) && is_epoch(t), &|_| true);
        // Per step: (loss, lr, grad_norm, epoch, wall time).
        let mut merged: Vec<(u64, [Option<f64>; 5])> = Vec::new();
        let mut validations: Vec<(u64, f64)> = Vec::new();
        for (i, cells) in &rows {
            let cell = |c: Option<usize>| -> Result<Option<f64>, TraceError> {
                let Some(s) = c.and_then(|c| cells.get(c)).filter(|s| !s.is_empty()) else { return Ok(None) };
                parse_number_text(s).map(Some).ok_or_else(|| TraceError::Line {
                    path: origin.into(),
                    line: i + 1,
                    reason: format!("column `{}`: {s:?} is not a number", names[c.unwrap_or(0)]),
                })
            };
            let step = cell(Some(step_col))?
                .filter(|s| s.is_finite() && *s >= 0.0 && s.fract() == 0.0)
                .ok_or_else(|| TraceError::Line {
                    path: origin.into(),
                    line: i + 1,
                    reason: format!("`{}` is not a whole number >= 0", names[step_col]),
                })? as u64;
            if let Some(v) = cell(val_col)? {
                validations.push((step, v));
            }
            let vals =
                [cell(Some(loss_col))?, cell(lr_col)?, cell(gn_col)?, cell(epoch_col)?, cell(wall_col)?];
            match merged.last_mut() {
                Some((s, have)) if *s == step => {
                    for (h, v) in have.iter_mut().zip(vals) {
                        if v.is_some() {
                            *h = v;
                        }
                    }
                }
                _ => merged.push((step, vals)),
            }
        }
        // Lightning's step counts the steps done before the row; an export's is the writer's
        // global step, 0-based only if the loss starts there.
        let first_loss = merged.iter().find(|(_, v)| v[0].is_some()).map(|(s, _)| *s);
        let shift = u64::from(lightning || first_loss == Some(0));
        let validations: Vec<(u64, f64)> =
            validations.into_iter().map(|(s, v)| (if lightning { s } else { s + shift }, v)).collect();
        let format = if lightning { TraceFormat::LightningCsv } else { TraceFormat::Csv };
        let mut validations = validations;
        validations.sort_by_key(|v| v.0);
        let mut trace = Trace {
            format,
            validation: validations.clone(),
            hf_trainer,
            loss_is_interval_mean: hf_trainer,
            ..Default::default()
        };
        let mut repeats = Repeats::default();
        let mut lr_carry = None;
        let mut prev_wall: Option<(u64, f64)> = None;
        for (s, [loss, lr, gn, epoch, wall]) in merged {
            // LearningRateMonitor may log on rows without a loss: the LR holds until it changes.
            lr_carry = lr.or(lr_carry);
            let Some(loss) = loss else { continue };
            let step = s + shift;
            if gn.is_some_and(|g| !g.is_finite()) {
                trace.nonfinite_grad_steps.push(step);
            }
            let mut rec = StepRecord::new(step, loss, lr_carry.unwrap_or(f64::NAN), gn.unwrap_or(f64::NAN));
            rec.epoch = epoch.filter(|e| *e >= 0.0).map(|e| e as u32);
            if let Some(w) = wall {
                if let Some((ps, pw)) = prev_wall.filter(|(ps, _)| step > *ps) {
                    rec.step_time_ms = Some((w - pw) * 1000.0 / (step - ps) as f64).filter(|t| *t >= 0.0);
                }
                prev_wall = Some((step, w));
            }
            // The last validation before the step (sorted by step: a binary search, as an
            // export may have one in every row).
            let before = trace.validation.partition_point(|(at, _)| *at < step);
            if let Some((at, v)) = before.checked_sub(1).map(|i| trace.validation[i]) {
                rec.extra.insert("validation.step".into(), serde_json::json!(at as f64));
                rec.extra.insert("validation.loss".into(), serde_json::json!(v));
            }
            repeats.push(&mut trace.steps, rec, || format!("step {s} (column `{}`)", names[step_col]));
        }
        if trace.steps.is_empty() {
            return Err(TraceError::Empty {
                path: origin.into(),
                detail: format!("a CSV log whose `{}` column is empty in every row", names[loss_col]),
            });
        }
        trace.warnings = warnings;
        trace.warnings.extend(repeats.warning(origin));
        let name = |c: Option<usize>| c.map_or_else(|| "none".to_string(), |c| format!("`{}`", names[c]));
        if !lightning {
            trace.warnings.push(format!(
                "{}: CSV columns read: step `{}`, loss `{}`, LR {}, gradient norm {}, epoch {}, validation loss {}",
                origin.display(),
                names[step_col],
                names[loss_col],
                name(lr_col),
                name(gn_col),
                name(epoch_col),
                name(val_col)
            ));
        }
        if lr_col.is_none() {
            trace.warnings.push(format!(
                "{}: no LR column (Lightning: add LearningRateMonitor, which writes `lr-*`): the LR is unknown (NaN); LR-schedule plugins get scheduled_lr NaN",
                origin.display()
            ));
        }
        Ok(trace)
    }
}

/// A CSV header's column names for a message: the first dozen, each cut to 60 characters (a
/// file that is not CSV at all has one long "column").
fn column_list(names: &[String]) -> String {
    let cut = |c: &String| {
        if c.chars().count() > 60 {
            format!("{}…", c.chars().take(60).collect::<String>())
        } else {
            c.clone()
        }
    };
    let mut out: Vec<String> = names.iter().take(12).map(cut).collect();
    if names.len() > 12 {
        out.push(format!("… ({} in all)", names.len()));
    }
    out.join(", ")
}

/// The cells of a CSV line: comma-separated, a cell in double quotes may hold commas and `""`
/// for a quote; cells trimmed.
fn csv_cells(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = line.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cell).trim().to_string()),
            c => cell.push(c),
        }
    }
    out.push(cell.trim().to_string());
    out
}

impl StepRecord {
    /// A record with only the four required fields.
    pub fn new(step: u64, loss: f64, lr: f64, grad_norm: f64) -> Self {
        StepRecord {
            step,
            loss,
            lr,
            grad_norm,
            grad_norm_clipped: None,
            micro_steps: None,
            epoch: None,
            total_steps: None,
            warmup_steps: None,
            losses: BTreeMap::new(),
            loss_weights: BTreeMap::new(),
            batch_size: None,
            object_count: None,
            step_time_ms: None,
            memory_bytes: None,
            heap_peak_bytes: None,
            grad_groups: Vec::new(),
            action: None,
            reason: None,
            decided_by: None,
            extra: BTreeMap::new(),
        }
    }

    /// One JSONL line (no newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_trainer_state_reads_as_a_trace() {
        // The shape transformers' Trainer writes (logging_steps 10, an eval at step 20).
        let text = r#"{"best_metric": null, "epoch": 0.6, "global_step": 30, "max_steps": 50,
            "logging_steps": 10, "train_batch_size": 8, "log_history": [
            {"epoch": 0.2, "grad_norm": 3.5, "learning_rate": 4e-05, "loss": 1.25, "step": 10},
            {"epoch": 0.4, "grad_norm": 2.5, "learning_rate": 5e-05, "loss": 0.75, "step": 20},
            {"epoch": 0.4, "eval_loss": 0.9, "eval_runtime": 1.0, "step": 20},
            {"epoch": 1.2, "learning_rate": 3e-05, "loss": 0.5, "step": 30}]}"#;
        let t = Trace::parse(text, Path::new("trainer_state.json")).unwrap();
        let steps: Vec<(u64, f64, f64)> = t.steps.iter().map(|s| (s.step, s.loss, s.lr)).collect();
        assert_eq!(steps, vec![(10, 1.25, 4e-5), (20, 0.75, 5e-5), (30, 0.5, 3e-5)]);
        assert_eq!(t.steps[0].grad_norm, 3.5);
        assert!(t.steps[2].grad_norm.is_nan(), "older Trainers log no grad_norm");
        assert_eq!(t.steps[2].epoch, Some(1));
        // The evaluation at step 20 reaches the steps after it.
        assert!(!t.steps[1].extra.contains_key("validation.loss"));
        assert_eq!(t.steps[2].extra["validation.loss"].as_f64(), Some(0.9));
        assert_eq!(t.steps[2].extra["validation.step"].as_f64(), Some(20.0));
        let run = t.run.unwrap();
        assert_eq!((run.total_steps, run.base_lr, run.batch_size), (50, 5e-5, 8));
        // A state without loss entries is named.
        let e = Trace::parse(r#"{"log_history": [{"eval_loss": 1.0, "step": 5}]}"#, Path::new("s.json"))
            .unwrap_err();
        assert!(e.to_string().contains("trainer_state.json"), "{e}");
    }

    #[test]
    fn parses_minimal_and_rich_lines() {
        let text = r#"{"run": {"total_steps": 10, "warmup_steps": 2, "base_lr": 0.001}}
{"step": 1, "loss": 2.5, "lr": 0.0005, "grad_norm": 3.0}
{"event": "plugin_reloaded", "plugin": "x"}
{"step": 2, "loss": null, "lr": 0.001, "grad_norm": 1.5, "losses": {"loss_mask": 0.2}, "custom": 7}
"#;
        let t = Trace::parse(text, Path::new("t.jsonl")).unwrap();
        assert_eq!(t.run.as_ref().unwrap().total_steps, 10);
        assert_eq!(t.steps.len(), 2);
        assert!(t.steps[1].loss.is_nan());
        assert_eq!(t.steps[1].losses["loss_mask"], 0.2);
        assert_eq!(t.steps[1].extra["custom"], serde_json::json!(7));
    }

    /// A resumed run appends steps it ran again: the later records replace the earlier ones.
    #[test]
    fn a_resumed_run_replaces_the_steps_it_ran_again() {
        let line = |step: u64, loss: f64| {
            format!("{{\"step\": {step}, \"loss\": {loss}, \"lr\": 0.1, \"grad_norm\": 1.0}}\n")
        };
        let text: String =
            [line(1, 5.0), line(2, 4.0), line(3, 3.0), line(2, 4.5), line(3, 3.5), line(4, 2.5)].concat();
        let t = Trace::parse(&text, Path::new("m.jsonl")).unwrap();
        let got: Vec<(u64, f64)> = t.steps.iter().map(|s| (s.step, s.loss)).collect();
        assert_eq!(got, [(1, 5.0), (2, 4.5), (3, 3.5), (4, 2.5)]);
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let text =
            "{\"step\": 1, \"loss\": 1.0, \"lr\": 0.1, \"grad_norm\": 1.0}\n{\"step\": 2, \"lr\": 0.1}\n";
        let e = Trace::parse(text, Path::new("m.jsonl")).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:2"), "{e}");
        assert!(e.contains("loss"), "{e}");
    }

    #[test]
    fn a_non_finite_step_roundtrips() {
        let mut r = StepRecord::new(3, f64::INFINITY, 0.1, f64::NAN);
        r.losses.insert("loss_mask".into(), f64::NAN);
        r.grad_groups.push(GradGroupRecord {
            name: "g".into(),
            l2_norm: f64::NAN,
            max_abs: f64::INFINITY,
            nonfinite: 2,
            numel: 4,
        });
        let back = Trace::parse(&r.to_json_line(), Path::new("x")).unwrap();
        assert!(back.steps[0].losses["loss_mask"].is_nan() && back.steps[0].grad_groups[0].l2_norm.is_nan());
    }

    #[test]
    fn nan_roundtrips_as_null() {
        let r = StepRecord::new(3, f64::NAN, 0.1, 2.0);
        let line = r.to_json_line();
        assert!(line.contains("\"loss\":null"), "{line}");
        let back = Trace::parse(&line, Path::new("x")).unwrap();
        assert!(back.steps[0].loss.is_nan());
    }

    fn lines(recs: &[&str]) -> String {
        recs.iter().map(|r| format!("{r}\n")).collect()
    }

    #[test]
    fn python_non_finite_literals_are_read_in_jsonl_and_whole_files() {
        let t = Trace::parse(
            &lines(&[
                r#"{"step": 1, "loss": NaN, "lr": 0.1, "grad_norm": Infinity, "note": "NaN stays text"}"#,
                r#"{"step": 2, "loss": -Infinity, "lr": 0.1, "grad_norm": 1.0}"#,
            ]),
            Path::new("m.jsonl"),
        )
        .unwrap();
        assert!(t.steps[0].loss.is_nan() && t.steps[0].grad_norm == f64::INFINITY);
        assert_eq!(t.steps[1].loss, f64::NEG_INFINITY);
        assert_eq!(t.steps[0].extra["note"], "NaN stays text");
        // Python's json.dump(indent=2) of a trainer state with an fp16 overflow.
        let hf = "{\n  \"max_steps\": 20,\n  \"log_history\": [\n    {\"step\": 10, \"loss\": NaN, \"grad_norm\": Infinity, \"learning_rate\": 1e-4, \"epoch\": 0.5}\n  ]\n}\n";
        let t = Trace::parse(hf, Path::new("trainer_state.json")).unwrap();
        assert!(t.steps[0].loss.is_nan() && t.steps[0].grad_norm.is_infinite());
        assert_eq!(quote_non_finite(r#"{"a": "NaN", "NaNb": 1}"#), None, "only bare tokens outside strings");
    }

    #[test]
    fn a_broken_pretty_printed_file_names_the_real_json_error() {
        let text = "{\n  \"log_history\": [\n    {\"step\": 1, \"loss\": 1.0,}\n  ]\n}\n";
        let e = Trace::parse(text, Path::new("trainer_state.json")).unwrap_err().to_string();
        assert!(e.contains("line 3 column"), "{e}");
        assert!(e.contains("trailing comma"), "{e}");
        assert!(!e.contains(":1:"), "not a JSONL error at line 1: {e}");
    }

    #[test]
    fn a_lorahost_checkpoint_state_points_to_the_metrics_log() {
        let text = "{\n  \"format\": 1,\n  \"step\": 36,\n  \"epoch_order\": [1, 0],\n  \"optimizer_updates\": 36\n}\n";
        let p = Path::new("/runs/a/checkpoints/step-00000036/trainer_state.json");
        let e = Trace::parse(text, p).unwrap_err().to_string();
        assert!(e.contains("lorahost checkpoint") && e.contains("/runs/a/metrics.jsonl"), "{e}");
    }

    #[test]
    fn sam3_lora_train_step_events_are_step_records() {
        // The fork's shape: `step` counts the epoch's batches, `epoch` is 1-based.
        let text = lines(&[
            r#"{"event": "run_start", "epochs": 2, "batch_size_per_gpu": 2, "global_batch_size": 2, "train_samples": 6, "config": {"training": {"learning_rate": 5e-05}}}"#,
            r#"{"event": "train_step", "epoch": 1, "step": 1, "steps_per_epoch": 3, "loss": 2.0, "running_loss": 2.0, "iter_time_sec": 0.8}"#,
            r#"{"event": "train_step", "epoch": 1, "step": 3, "steps_per_epoch": 3, "loss": 1.8}"#,
            r#"{"event": "val_step", "epoch": 1, "step": 1, "val_loss": 1.9}"#,
            r#"{"event": "epoch_summary", "epoch": 1, "train_loss": 1.9, "val_loss": 1.7}"#,
            r#"{"event": "train_step", "epoch": 2, "step": 1, "steps_per_epoch": 3, "loss": 1.6}"#,
        ]);
        let t = Trace::parse(&text, Path::new("metrics.jsonl")).unwrap();
        assert_eq!(t.format, TraceFormat::Sam3LoraEvents);
        let got: Vec<(u64, Option<u32>)> = t.steps.iter().map(|s| (s.step, s.epoch)).collect();
        assert_eq!(got, [(1, Some(0)), (3, Some(0)), (4, Some(1))]);
        assert!(t.steps[0].grad_norm.is_nan() && t.steps[0].lr.is_nan());
        assert_eq!(t.steps[0].step_time_ms, Some(800.0));
        assert_eq!(t.steps[0].extra["running_loss"], 2.0);
        assert!(!t.steps[0].extra.contains_key("event"));
        assert_eq!(t.steps[2].extra["validation.loss"], 1.7);
        assert_eq!(t.steps[2].extra["validation.step"], 3.0);
        let run = t.run.unwrap();
        assert_eq!((run.base_lr, run.total_steps, run.steps_per_epoch), (5e-5, 6, 3));
        // Events only: the error names what the file has.
        let e = Trace::parse(
            &lines(&[r#"{"event": "run_start"}"#, r#"{"event": "val_step", "step": 1}"#]),
            Path::new("m.jsonl"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`event` values run_start (1), val_step (1) but no step records"), "{e}");
        assert!(e.contains("trainer_state.json") && e.contains("metrics.csv"), "{e}");
    }

    #[test]
    fn lightning_csv_reads_and_other_files_are_named_unsupported() {
        let csv = "epoch,lr-AdamW,step,train_loss_step,val_loss\n0,5e-05,0,1.5,\n0,4e-05,1,1.4,\n0,,1,,1.3\n1,3e-05,2,nan,\n";
        let t = Trace::parse(csv, Path::new("metrics.csv")).unwrap();
        let got: Vec<(u64, f64)> = t.steps.iter().map(|s| (s.step, s.lr)).collect();
        assert_eq!(got, [(1, 5e-5), (2, 4e-5), (3, 3e-5)]);
        assert!(t.steps[2].loss.is_nan());
        // The validation row at Lightning step 1 (after one optimizer step) reaches step 2 on.
        assert_eq!(t.steps[1].extra["validation.loss"], 1.3);
        assert_eq!(t.steps[1].extra["validation.step"], 1.0);
        assert!(!t.steps[0].extra.contains_key("validation.loss"));
        let e = Trace::parse("epoch,val_acc\n0,0.5\n", Path::new("x.csv")).unwrap_err().to_string();
        assert!(e.contains("no `step` column") && e.contains("trainer_state.json"), "{e}");
        let e = Trace::parse(
            &lines(&[r#"{"epoch": 1, "train_loss": 2.0, "val_loss": 1.8}"#]),
            Path::new("val_stats.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("val_stats.json:1") && e.contains("per-epoch"), "{e}");
    }

    /// CSV logs other than Lightning's fixed columns: the series by their names' words
    /// (the per-step loss over the per-epoch one, LR, gradient norm, validation loss); a W&B
    /// chart export (`Step`, `<run> - train/loss`, its `__MIN`/`__MAX`, a quoted name with a
    /// comma), 1-based as written; a TensorBoard scalar download (`Wall time,Step,Value`) from
    /// step 0, shifted, with step times from its wall clock.
    #[test]
    fn csv_columns_are_matched_by_their_words() {
        let csv = "epoch,step,train_loss_epoch,train_loss_step,lr-AdamW/pg1,grad_2.0_norm_total,val/loss\n\
                   0,0,,2.0,0.1,5.0,\n0,1,,1.8,,4.0,\n0,1,1.9,,,,\n0,1,,,,,1.7\n1,2,,1.6,0.05,3.0,\n";
        let t = Trace::parse(csv, Path::new("metrics.csv")).unwrap();
        assert_eq!(t.format, TraceFormat::LightningCsv);
        let got: Vec<(u64, f64, f64, f64)> =
            t.steps.iter().map(|s| (s.step, s.loss, s.lr, s.grad_norm)).collect();
        assert_eq!(got, [(1, 2.0, 0.1, 5.0), (2, 1.8, 0.1, 4.0), (3, 1.6, 0.05, 3.0)]);
        assert_eq!(t.steps[2].extra["validation.loss"], 1.7);
        assert_eq!(t.validation, [(1, 1.7)]);

        let wandb = "\"Step\",\"run-a, lr 1e-4 - train/loss\",\"run-a, lr 1e-4 - train/loss__MIN\",\"run-a, lr 1e-4 - train/loss__MAX\",\"run-a, lr 1e-4 - train/learning_rate\"\n\
                     \"10\",\"2.5\",\"2.4\",\"2.6\",\"0.0001\"\n\"20\",\"2.25\",\"2.2\",\"2.3\",\"0.0001\"\n";
        let t = Trace::parse(wandb, Path::new("wandb_export.csv")).unwrap();
        assert_eq!(t.format, TraceFormat::Csv);
        let got: Vec<(u64, f64, f64)> = t.steps.iter().map(|s| (s.step, s.loss, s.lr)).collect();
        assert_eq!(got, [(10, 2.5, 1e-4), (20, 2.25, 1e-4)]);
        assert!(
            t.warnings.iter().any(|w| w.contains("loss `run-a, lr 1e-4 - train/loss`")),
            "{:?}",
            t.warnings
        );

        // A run named with a validation word; the Hugging Face Trainer's metric names (its loss
        // points are interval means, its clipping on by default); a NaN gradient norm.
        let hf = "Step,lora-test-2 - train/loss,lora-test-2 - train/grad_norm,lora-test-2 - train/learning_rate,lora-test-2 - train/epoch\n\
                  5,2.0,1.5,0.001,0.1\n10,1.9,nan,0.001,0.2\n";
        let t = Trace::parse(hf, Path::new("wandb_export.csv")).unwrap();
        let got: Vec<(u64, f64)> = t.steps.iter().map(|s| (s.step, s.loss)).collect();
        assert_eq!(got, [(5, 2.0), (10, 1.9)]);
        assert!(t.hf_trainer && t.loss_is_interval_mean);
        assert_eq!(t.nonfinite_grad_steps, [10]);
        // `step` without Lightning's `epoch` beside it: a 1-based log as written.
        let t = Trace::parse("step,total_loss,lr\n1,3.0,0.1\n2,2.5,0.1\n", Path::new("log.csv")).unwrap();
        assert_eq!(t.format, TraceFormat::Csv);
        assert_eq!(t.steps.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2]);

        let tb = "Wall time,Step,Value\n1700000000.0,0,3.0\n1700000001.5,1,2.5\n1700000004.5,3,2.0\n";
        let t = Trace::parse(tb, Path::new("run-.-tag-train_loss.csv")).unwrap();
        let got: Vec<(u64, f64, Option<f64>)> =
            t.steps.iter().map(|s| (s.step, s.loss, s.step_time_ms)).collect();
        assert_eq!(got, [(1, 3.0, None), (2, 2.5, Some(1500.0)), (4, 2.0, Some(1500.0))]);
        assert!(t.warnings.iter().any(|w| w.contains("taken as the training loss")), "{:?}", t.warnings);
        let e = Trace::parse("Step,accuracy\n1,0.5\n", Path::new("x.csv")).unwrap_err().to_string();
        assert!(e.contains("no loss column") && e.contains("accuracy"), "{e}");
    }

    #[test]
    fn a_cut_off_last_line_is_dropped_with_a_warning_but_not_elsewhere() {
        let good = r#"{"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0}"#;
        let cut = r#"{"step": 2, "loss": 1.0, "lr": 0.0"#;
        let t = Trace::parse(&format!("{good}\n{cut}"), Path::new("m.jsonl")).unwrap();
        assert_eq!(t.steps.len(), 1);
        assert!(t.warnings[0].contains("m.jsonl:2") && t.warnings[0].contains("cut off"), "{:?}", t.warnings);
        let e = Trace::parse(&format!("{cut}\n{good}\n"), Path::new("m.jsonl")).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:1"), "{e}");
    }

    #[test]
    fn hf_repeats_epochs_and_locations() {
        let text = r#"{"max_steps": 60, "logging_steps": 10, "log_history": [
            {"epoch": 0.5, "learning_rate": 4e-05, "loss": 1.4, "step": 10},
            {"epoch": 1.0, "learning_rate": 3e-05, "loss": 1.2, "step": 20},
            {"epoch": 1.0, "learning_rate": 3e-05, "loss": 1.25, "step": 20},
            {"epoch": 1.5, "learning_rate": 2e-05, "loss": 1.1, "step": 30}]}"#;
        let t = Trace::parse(text, Path::new("trainer_state.json")).unwrap();
        let got: Vec<(u64, f64, Option<u32>)> = t.steps.iter().map(|s| (s.step, s.loss, s.epoch)).collect();
        assert_eq!(got, [(10, 1.4, Some(0)), (20, 1.25, Some(0)), (30, 1.1, Some(1))]);
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("log_history[2]"), "{:?}", t.warnings);
        assert_eq!(t.run.as_ref().unwrap().steps_per_epoch, 20);
        let bad = r#"{"log_history": [{"loss": 1.0, "step": 1}, {"loss": 1.0, "step": "x"}]}"#;
        let e = Trace::parse(bad, Path::new("s.json")).unwrap_err().to_string();
        assert!(e.contains("log_history[1]") && !e.contains("s.json:2"), "{e}");
        // No learning_rate: NaN, and a warning says so.
        let t = Trace::parse(r#"{"log_history": [{"loss": 1.0, "step": 1}]}"#, Path::new("s.json")).unwrap();
        assert!(t.steps[0].lr.is_nan() && t.warnings.iter().any(|w| w.contains("learning_rate")));
    }

    #[test]
    fn small_things_bom_strings_float_steps_repeats_and_step_zero() {
        let text = "\u{feff}".to_string()
            + &lines(&[
                r#"{"run": {"total_steps": "16", "base_lr": "1e-4"}}"#,
                r#"{"step": 0, "loss": "NaN", "lr": "1e-4", "grad_norm": 1}"#,
                r#"{"step": 1.0, "loss": 1, "lr": 1e-4, "grad_norm": 1}"#,
                r#"{"step": 1, "loss": 2, "lr": 1e-4, "grad_norm": 1}"#,
                r#"{"step": 1, "loss": 3, "lr": 1e-4, "grad_norm": 1, "micro_steps": "2"}"#,
            ]);
        let t = Trace::parse(&text, Path::new("m.jsonl")).unwrap();
        assert_eq!((t.run.as_ref().unwrap().total_steps, t.run.as_ref().unwrap().base_lr), (16, 1e-4));
        assert!(t.steps[0].loss.is_nan());
        let got: Vec<(u64, f64)> = t.steps.iter().map(|s| (s.step, s.loss)).collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(got[1].1, 3.0, "the last repeat wins");
        assert_eq!(t.steps[1].micro_steps, Some(2));
        assert_eq!(t.warnings.iter().filter(|w| w.contains("repeat")).count(), 1, "{:?}", t.warnings);
        assert!(t.warnings.iter().any(|w| w.contains("line 2: step 0")), "{:?}", t.warnings);
        let e = Trace::parse(r#"{"step": -1, "loss": 1}"#, Path::new("m.jsonl")).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:1") && e.contains("counted from 1"), "{e}");
    }

    #[test]
    fn a_directory_is_named_once() {
        let dir = std::env::temp_dir().join(format!("lorahost-trace-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Trace::read(&dir).unwrap_err();
        assert!(std::error::Error::source(&e).is_none());
        assert!(e.to_string().contains("is a directory"), "{e}");
        // A lorahost run's folder: its metrics.jsonl, not the TensorBoard files beside it.
        std::fs::write(dir.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 2.5}\n").unwrap();
        let mut w = crate::tfevents::EventWriter::create(&dir, None).unwrap();
        w.scalars(1, &[("train/loss".into(), 7.0)]).unwrap();
        let t = Trace::read(&dir).unwrap();
        assert_eq!((t.format, t.steps[0].loss), (TraceFormat::Lorahost, 2.5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
