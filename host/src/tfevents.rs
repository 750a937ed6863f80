//! TensorBoard event files (`events.out.tfevents.*`) read as a training log, so that
//! `lorahost doctor --trace` and `lorahost plugin replay --trace` take the runs people log to
//! TensorBoard: SAM3's and SAM2's official trainers, the Hugging Face Trainer's
//! `report_to="tensorboard"`, Lightning's `TensorBoardLogger`, any `SummaryWriter`.
//!
//! An event file is a sequence of TFRecords (a little-endian u64 length, its masked CRC-32C, the
//! data, the data's masked CRC-32C), each an `Event` protocol buffer (wall time, step, and a
//! `Summary` of tagged values). Scalars come either as `simple_value` (the writers' default) or
//! as a one-element tensor (TensorFlow 2, and `new_style=True`: float, double, integer, half or
//! bfloat16, in the value fields or in `tensor_content`); histograms, images, text and tensors
//! of more than one element are skipped. Only the fields needed are decoded, by hand (a few
//! dozen lines against a protobuf code generator and TensorFlow's schema files).
//!
//! The tags are matched to a step record by name ([`Trace`]'s fields): the training loss is the
//! tag with `loss` in its name and no validation word (`val`, `eval`, `test`, ...) that has the
//! most points, the total rather than a component (`train/loss` before `train/loss_mask`), the
//! shorter name on a tie; the other loss tags logged at as many steps become the record's
//! `losses`. The LR is a tag with `lr` or `learning_rate` in its name (held between its points),
//! the gradient norm one with `grad` and `norm`, the epoch a tag named `epoch`, the validation
//! loss a loss tag with a validation word (it reaches the steps after it, as
//! `validation.step` / `validation.loss`). Which tags were read is in [`Trace::warnings`].
//! SAM2/SAM3's official trainer (recognised by its `Trainer/steps_train` tag) logs each
//! epoch's summary (`Losses/`, `Trainer/`, `Meters_*/`) at the epoch number, not a step: those
//! tags are placed at the epoch's last step (the validation loss is the summary's, not the
//! validation meters logged at the validation step counter), and a step's epoch is the number
//! of epochs ended before it.
//!
//! Steps are the writer's global steps; a run whose loss starts at step 0 (SAM2/SAM3's trainer,
//! Lightning) is shifted to lorahost's 1-based steps. A step's time is the wall-clock time
//! since the loss's previous point in the same file over the steps between them, so a resumed
//! run's restart is not counted as a slow step. A folder is read with all its event files
//! (those of a resumed run in the same folder are merged, the later file's points replacing the
//! earlier file's at the same step); a folder holding several runs' folders is an error that
//! names them. A file cut off in its last record (the run still writing) loses that record with
//! a warning; a record whose checksum fails ends the file's reading with a warning. A file that
//! starts with a session START (`SummaryWriter(purge_step=N)`, a resumed lorahost run) drops the
//! earlier files' points from that step on, as TensorBoard does.
//!
//! [`EventWriter`] writes such files: `lorahost train` logs its runs to TensorBoard with it.

use crate::log_columns::{
    is_epoch, is_grad_norm, is_loss, is_lr, is_total, is_validation, pick, prefers_total_norm,
};
use crate::metrics::{RunHeader, RunSegment, StepRecord, Trace, TraceError, TraceFormat};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Whether `path`'s file name is a TensorBoard event file's (`events.out.tfevents.*`).
pub fn is_event_file_name(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("tfevents"))
}

/// Whether `bytes` begin with a TFRecord whose length checksum holds (a TensorBoard event file
/// whatever its name).
pub fn looks_like_event_file(bytes: &[u8]) -> bool {
    bytes.len() >= 12
        && masked_crc(&bytes[..8]) == u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default())
}

/// CRC-32C (Castagnoli), the checksum TFRecords carry.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of an event file (`origin` for messages), and a warning when the end was cut
/// off or a checksum failed (what came before is kept).
fn records<'a>(bytes: &'a [u8], origin: &Path) -> Result<(Vec<&'a [u8]>, Option<String>), TraceError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let cut = |at: usize| {
        format!(
            "{}: the last record (from byte {at}) is cut off (the run still writing, or a copy of a file being written): dropped",
            origin.display()
        )
    };
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 12 {
            return Ok((out, Some(cut(at))));
        }
        let header_ok =
            masked_crc(&rest[..8]) == u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default());
        if !header_ok {
            if out.is_empty() {
                return Err(TraceError::Format {
                    path: origin.into(),
                    reason: "not a TensorBoard event file: its first record's length checksum does not hold\n  fix: give an events.out.tfevents.* file written by TensorBoard's SummaryWriter (or its folder)".into(),
                });
            }
            let w = format!(
                "{}: the record at byte {at} is corrupt (its length checksum does not hold): the file is read up to there",
                origin.display()
            );
            return Ok((out, Some(w)));
        }
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let Some(end) =
            usize::try_from(len).ok().and_then(|l| l.checked_add(16)).filter(|&e| e <= rest.len())
        else {
            return Ok((out, Some(cut(at))));
        };
        let data = &rest[12..end - 4];
        if masked_crc(data) != u32::from_le_bytes(rest[end - 4..end].try_into().unwrap_or_default()) {
            let w = format!(
                "{}: the record at byte {at} is corrupt (its data checksum does not hold): the file is read up to there",
                origin.display()
            );
            return Ok((out, Some(w)));
        }
        out.push(data);
        at += end;
    }
    Ok((out, None))
}

/// A malformed protocol buffer.
#[derive(Debug)]
struct Malformed;

/// A protocol buffer field's value by wire type.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// The fields of one protocol buffer message, in order.
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn of(buf: &'a [u8]) -> Self {
        Fields { buf, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at).ok_or(Malformed)?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(Malformed)?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Field<'a>), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        let mut read = || -> Result<(u64, Field<'a>), Malformed> {
            let key = self.varint()?;
            let field = match key & 7 {
                0 => Field::Varint(self.varint()?),
                1 => Field::Fixed64(self.take(8)?.try_into().map_err(|_| Malformed)?),
                2 => {
                    let n = usize::try_from(self.varint()?).map_err(|_| Malformed)?;
                    Field::Bytes(self.take(n)?)
                }
                5 => Field::Fixed32(self.take(4)?.try_into().map_err(|_| Malformed)?),
                _ => return Err(Malformed),
            };
            Ok((key >> 3, field))
        };
        let r = read();
        if r.is_err() {
            self.at = self.buf.len();
        }
        Some(r)
    }
}

/// IEEE half precision bits as a number.
fn f16_value(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// The number in a `TensorProto` holding one element of a numeric type, else `None` (a
/// histogram, text, an image, a tensor of several elements).
fn tensor_scalar(buf: &[u8]) -> Result<Option<f64>, Malformed> {
    // TensorFlow's DataType numbers.
    const FLOAT: u64 = 1;
    const DOUBLE: u64 = 2;
    const INT32: u64 = 3;
    const UINT8: u64 = 4;
    const INT16: u64 = 5;
    const INT8: u64 = 6;
    const INT64: u64 = 9;
    const BFLOAT16: u64 = 14;
    const HALF: u64 = 19;
    let (mut dtype, mut elements, mut content) = (0u64, 1u64, None);
    let mut values: Vec<f64> = Vec::new();
    let mut halves: Vec<u16> = Vec::new();
    for f in Fields::of(buf) {
        match f? {
            (1, Field::Varint(v)) => dtype = v,
            (2, Field::Bytes(shape)) => {
                for d in Fields::of(shape) {
                    if let (2, Field::Bytes(dim)) = d? {
                        for s in Fields::of(dim) {
                            if let (1, Field::Varint(size)) = s? {
                                elements = elements.saturating_mul(size);
                            }
                        }
                    }
                }
            }
            (4, Field::Bytes(c)) => content = Some(c),
            (5, Field::Fixed32(b)) => values.push(f64::from(f32::from_le_bytes(b))),
            (5, Field::Bytes(p)) => values
                .extend(p.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
            (6, Field::Fixed64(b)) => values.push(f64::from_le_bytes(b)),
            (6, Field::Bytes(p)) => values.extend(p.chunks_exact(8).map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b)
            })),
            // int_val (int32 and narrower) and int64_val: varints, packed or not.
            (7 | 10, Field::Varint(v)) => values.push(v as i64 as f64),
            (7 | 10, Field::Bytes(p)) => {
                let mut r = Fields::of(p);
                while r.at < p.len() {
                    values.push(r.varint()? as i64 as f64);
                }
            }
            // half_val: the 16 bits of a half or bfloat16 per varint.
            (13, Field::Varint(v)) => halves.push(v as u16),
            (13, Field::Bytes(p)) => {
                let mut r = Fields::of(p);
                while r.at < p.len() {
                    halves.push(r.varint()? as u16);
                }
            }
            _ => {}
        }
    }
    if elements != 1 {
        return Ok(None);
    }
    let half = |bits: u16| {
        if dtype == BFLOAT16 {
            f64::from(f32::from_bits(u32::from(bits) << 16))
        } else {
            f16_value(bits)
        }
    };
    if let Some(c) = content {
        let v = match (dtype, c.len()) {
            (FLOAT, 4) => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            (DOUBLE, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b)
            }
            (INT32, 4) => f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            (INT64, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                i64::from_le_bytes(b) as f64
            }
            (INT16, 2) => f64::from(i16::from_le_bytes([c[0], c[1]])),
            (UINT8, 1) => f64::from(c[0]),
            (INT8, 1) => f64::from(c[0] as i8),
            (HALF | BFLOAT16, 2) => half(u16::from_le_bytes([c[0], c[1]])),
            _ => return Ok(None),
        };
        return Ok(Some(v));
    }
    Ok(match dtype {
        FLOAT | DOUBLE | INT32 | INT64 | INT16 | INT8 | UINT8 if values.len() == 1 => Some(values[0]),
        HALF | BFLOAT16 if halves.len() == 1 => Some(half(halves[0])),
        _ => None,
    })
}

/// One scalar point of a tag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalarPoint {
    /// The writer's global step.
    pub step: i64,
    /// Seconds since the epoch when it was written.
    pub wall_time: f64,
    /// The value.
    pub value: f64,
    /// Milliseconds per step since the tag's previous point in the same file (`None` for a
    /// file's first point of the tag, or a step that did not advance).
    pub ms_per_step: Option<f64>,
}

/// The scalars of one event file by tag, each tag's points in the file's order.
#[derive(Debug, Default)]
pub struct EventFile {
    /// The file.
    pub path: PathBuf,
    /// The tags' points.
    pub scalars: BTreeMap<String, Vec<ScalarPoint>>,
    /// The wall time of its first scalar (orders a folder's files), +∞ without any.
    pub first_wall_time: f64,
    /// A cut-off end or a failed checksum.
    pub warning: Option<String>,
    /// Its text summaries by tag (the last one of each), e.g. the Hugging Face Trainer's
    /// `args/text_summary`: its `TrainingArguments` as JSON.
    pub texts: BTreeMap<String, String>,
    /// The step of its first `SessionLog` START (a resumed run's restart, what
    /// `SummaryWriter(purge_step=N)` writes): earlier files' points from that step on belong to
    /// an abandoned run and are dropped, as TensorBoard drops them.
    pub purge_from: Option<i64>,
}

/// Read one event file's scalars.
pub fn read_event_file(path: &Path) -> Result<EventFile, TraceError> {
    let bytes = std::fs::read(path).map_err(|error| TraceError::Read { path: path.into(), error })?;
    parse_event_file(&bytes, path)
}

/// The scalars of an event file's bytes (`origin` names it in messages).
pub fn parse_event_file(bytes: &[u8], origin: &Path) -> Result<EventFile, TraceError> {
    let (recs, warning) = records(bytes, origin)?;
    let mut file =
        EventFile { path: origin.into(), first_wall_time: f64::INFINITY, warning, ..Default::default() };
    let malformed = |i: usize| {
        TraceError::Format {
        path: origin.into(),
        reason: format!(
            "record {} is not a readable TensorBoard event (its checksum holds, its contents do not)\n  fix: give an events.out.tfevents.* file written by TensorBoard's SummaryWriter",
            i + 1
        ),
    }
    };
    for (i, rec) in recs.iter().enumerate() {
        let (wall, step, values, start) = event(rec).map_err(|_| malformed(i))?;
        if start && file.purge_from.is_none() {
            file.purge_from = Some(step);
        }
        let mut scalars = Vec::with_capacity(values.len());
        for v in values {
            match v {
                Value::Scalar(tag, x) => scalars.push((tag, x)),
                Value::Text(tag, text) => {
                    file.texts.insert(tag, text);
                }
            }
        }
        for (tag, value) in scalars {
            file.first_wall_time = file.first_wall_time.min(wall);
            let points = file.scalars.entry(tag).or_default();
            let ms_per_step = points
                .last()
                .filter(|p| step > p.step)
                .map(|p| (wall - p.wall_time) * 1000.0 / (step - p.step) as f64);
            points.push(ScalarPoint { step, wall_time: wall, value, ms_per_step });
        }
    }
    Ok(file)
}

/// An event's wall time, step, scalar values by tag, and whether it is a session's START.
type EventScalars = (f64, i64, Vec<Value>, bool);

/// A summary value this reader keeps.
enum Value {
    /// A scalar's tag and number.
    Scalar(String, f64),
    /// A text summary's tag and text.
    Text(String, String),
}

fn event(buf: &[u8]) -> Result<EventScalars, Malformed> {
    let (mut wall, mut step, mut values, mut start) = (0.0, 0i64, Vec::new(), false);
    for f in Fields::of(buf) {
        match f? {
            (1, Field::Fixed64(b)) => wall = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => step = v as i64,
            (5, Field::Bytes(summary)) => {
                for v in Fields::of(summary) {
                    if let (1, Field::Bytes(value)) = v? {
                        if let Some(tv) = summary_value(value)? {
                            values.push(tv);
                        }
                    }
                }
            }
            (7, Field::Bytes(session_log)) => {
                for f in Fields::of(session_log) {
                    start |= matches!(f?, (1, Field::Varint(1)));
                }
            }
            _ => {}
        }
    }
    Ok((wall, step, values, start))
}

/// A `Summary.Value`'s tag and number when it is a scalar, or its text when it is one string.
fn summary_value(buf: &[u8]) -> Result<Option<Value>, Malformed> {
    let (mut tag, mut value, mut text) = (None, None, None);
    for f in Fields::of(buf) {
        match f? {
            (1, Field::Bytes(t)) => tag = Some(String::from_utf8_lossy(t).into_owned()),
            (2, Field::Fixed32(b)) => value = Some(f64::from(f32::from_le_bytes(b))),
            (8, Field::Bytes(t)) => {
                value = tensor_scalar(t)?;
                text = tensor_text(t)?;
            }
            _ => {}
        }
    }
    Ok(match (tag, value, text) {
        (Some(tag), Some(v), _) => Some(Value::Scalar(tag, v)),
        (Some(tag), None, Some(text)) => Some(Value::Text(tag, text)),
        _ => None,
    })
}

/// The string in a `TensorProto` of one string (`add_text`'s summaries), else `None`.
fn tensor_text(buf: &[u8]) -> Result<Option<String>, Malformed> {
    const STRING: u64 = 7;
    let (mut dtype, mut strings) = (0u64, Vec::new());
    for f in Fields::of(buf) {
        match f? {
            (1, Field::Varint(v)) => dtype = v,
            (8, Field::Bytes(s)) => strings.push(s),
            _ => {}
        }
    }
    Ok((dtype == STRING && strings.len() == 1).then(|| String::from_utf8_lossy(strings[0]).into_owned()))
}

/// The event files under `dir` (its subfolders too, four levels down) of one run: several
/// folders holding event files are several runs, an error naming them.
pub fn event_files_in(dir: &Path) -> Result<Vec<PathBuf>, TraceError> {
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(d) else { return };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() && depth < 4 {
                walk(&p, depth + 1, out);
            } else if p.is_file() && is_event_file_name(&p) {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    let mut folders: Vec<&Path> = files.iter().filter_map(|f| f.parent()).collect();
    folders.dedup();
    if folders.len() > 1 {
        let names: Vec<String> = folders
            .iter()
            .map(|f| {
                let n = files.iter().filter(|p| p.parent() == Some(*f)).count();
                format!("{} ({n} event file{})", f.display(), if n == 1 { "" } else { "s" })
            })
            .collect();
        return Err(TraceError::Format {
            path: dir.into(),
            reason: format!(
                "holds the TensorBoard logs of {} runs: {}\n  fix: give one run's folder (or one events file)",
                names.len(),
                names.join(", ")
            ),
        });
    }
    Ok(files)
}

/// The tags' points merged over `files` (ordered by their first scalar's wall time; a later
/// file's point replaces an earlier one at the same step, and a file that starts with a
/// session START drops the earlier files' points from its step on), and how many points were
/// replaced or dropped.
fn merge(mut files: Vec<EventFile>) -> (BTreeMap<String, BTreeMap<i64, ScalarPoint>>, usize) {
    files.sort_by(|a, b| a.first_wall_time.total_cmp(&b.first_wall_time).then_with(|| a.path.cmp(&b.path)));
    let mut out: BTreeMap<String, BTreeMap<i64, ScalarPoint>> = BTreeMap::new();
    let mut replaced = 0;
    for (i, f) in files.into_iter().enumerate() {
        if let Some(from) = f.purge_from {
            for series in out.values_mut() {
                let dropped = series.split_off(&from);
                replaced += dropped.len();
            }
        }
        for (tag, points) in f.scalars {
            let series = out.entry(tag).or_default();
            for p in points {
                if series.insert(p.step, p).is_some() && i > 0 {
                    replaced += 1;
                }
            }
        }
    }
    (out, replaced)
}

/// The tag of SAM2/SAM3's official trainer with the steps done by each epoch's end.
const SAM_STEPS_TRAIN: &str = "Trainer/steps_train";

/// A [`Trace`] from TensorBoard event files (`origin`: the file or folder given; see the
/// module docs for how tags become step records).
pub fn trace_from_event_files(paths: &[PathBuf], origin: &Path) -> Result<Trace, TraceError> {
    let mut warnings = Vec::new();
    let mut files = Vec::new();
    for p in paths {
        let f = read_event_file(p)?;
        warnings.extend(f.warning.clone());
        files.push(f);
    }
    // The later file's text of a tag wins (a resumed run's arguments).
    let texts: BTreeMap<String, String> = files.iter().flat_map(|f| f.texts.clone()).collect();
    let (series, replaced) = merge(files);
    // SAM2/SAM3's official trainer logs its per-step tags (`Step_Losses/`, `Step_Stats/`,
    // `Optim/`) at the step counter and each epoch's summary (`Losses/`, `Trainer/`,
    // `Meters_*/`) at the epoch number, with `Trainer/steps_train`, the steps done by the
    // epoch's end: the summaries are placed at those steps.
    let epoch_ends: Option<&BTreeMap<i64, ScalarPoint>> = series.get(SAM_STEPS_TRAIN);
    let epoch_level = |t: &str| {
        epoch_ends.is_some()
            && (t.starts_with("Losses/") || t.starts_with("Trainer/") || t.starts_with("Meters_"))
    };
    let counts: Vec<(&str, usize)> = series.iter().map(|(t, s)| (t.as_str(), s.len())).collect();
    let losses: Vec<(&str, usize)> =
        counts.iter().copied().filter(|(t, _)| is_loss(t) && !is_validation(t) && !epoch_level(t)).collect();
    let Some(loss_tag) = pick(&losses, is_total) else {
        let detail = if counts.is_empty() {
            format!("{} TensorBoard event file(s) without any scalar", paths.len())
        } else {
            let tags: Vec<&str> = counts.iter().map(|t| t.0).collect();
            format!(
                "TensorBoard event files whose scalar tags have no training loss (a tag with `loss` in its name and no val/eval/test): {}",
                tags.join(", ")
            )
        };
        return Err(TraceError::Empty { path: origin.into(), detail });
    };
    let loss = &series[loss_tag];
    let n_loss = loss.len();
    let leaf = |t: &'_ str| t.rsplit('/').next().unwrap_or(t).to_string();
    // Terms: the other loss tags logged as often (not the same loss under another name).
    let components: Vec<&str> = losses
        .iter()
        .filter(|(t, n)| *t != loss_tag && *n * 2 >= n_loss && leaf(t) != leaf(loss_tag))
        .map(|t| t.0)
        .collect();
    let others = |f: &dyn Fn(&str) -> bool| -> Vec<(&str, usize)> {
        counts.iter().copied().filter(|(t, _)| *t != loss_tag && !epoch_level(t) && f(t)).collect()
    };
    let lr_tag = pick(&others(&|t| !is_validation(t) && is_lr(t)), |_| true);
    let gn_tag = pick(&others(&|t| !is_validation(t) && is_grad_norm(t)), prefers_total_norm);
    let epoch_tag = pick(&others(&|t| !is_validation(t) && is_epoch(t)), |_| true);
    let val_tag = match epoch_ends {
        // The epoch summaries' validation loss (its per-step meters count validation steps).
        Some(_) => pick(
            &counts
                .iter()
                .copied()
                .filter(|(t, _)| epoch_level(t) && is_loss(t) && is_validation(t))
                .collect::<Vec<_>>(),
            is_total,
        ),
        None => pick(&others(&|t| is_loss(t) && is_validation(t)), is_total),
    };
    // 0-based writers (SAM2/SAM3's trainer, Lightning) to lorahost's 1-based steps.
    let shift = i64::from(loss.keys().next().is_some_and(|&s| s == 0));
    let negative = loss.keys().filter(|&&s| s + shift < 1).count();
    if negative > 0 {
        warnings.push(format!("{}: {negative} loss point(s) at negative steps: dropped", origin.display()));
    }
    let get = |tag: Option<&str>, step: i64| tag.and_then(|t| series[t].get(&step)).map(|p| p.value);
    let held = |tag: Option<&str>, step: i64| {
        tag.and_then(|t| series[t].range(..=step).next_back()).map(|(_, p)| p.value)
    };
    // The step (raw) of a validation point: an epoch summary's is the epoch's last step.
    let validation_step = |s: i64| match epoch_ends {
        Some(ends) => ends.get(&s).map(|n| n.value as i64 - 1),
        None => Some(s),
    };
    let mut validations: Vec<(i64, f64)> = val_tag
        .map(|t| {
            series[t].iter().filter_map(|(&s, p)| Some((validation_step(s)? + shift, p.value))).collect()
        })
        .unwrap_or_default();
    validations.sort_by_key(|v| v.0);
    // Hugging Face logs the epochs completed as a fraction (1.0 ends the first epoch, whose
    // 0-based number is 0); Lightning and most loops the 0-based epoch.
    let fractional_epochs = epoch_tag.is_some_and(|t| series[t].values().any(|p| p.value.fract() != 0.0));
    let mut steps = Vec::with_capacity(n_loss);
    for (&s, p) in loss.iter().filter(|(&s, _)| s + shift >= 1) {
        let mut rec = StepRecord::new(
            (s + shift) as u64,
            p.value,
            held(lr_tag, s).unwrap_or(f64::NAN),
            get(gn_tag, s).unwrap_or(f64::NAN),
        );
        rec.step_time_ms = p.ms_per_step.filter(|t| t.is_finite() && *t >= 0.0);
        rec.epoch = match epoch_ends {
            // The epochs that ended before this step.
            Some(ends) => Some(ends.values().filter(|n| n.value <= s as f64).count() as u32),
            None => held(epoch_tag, s).filter(|e| e.is_finite() && *e >= 0.0).map(|e| {
                if fractional_epochs {
                    ((e - 1e-6).ceil().max(1.0) - 1.0) as u32
                } else {
                    e as u32
                }
            }),
        };
        for c in &components {
            if let Some(v) = get(Some(c), s) {
                rec.losses.insert(leaf(c), v);
            }
        }
        let before = validations.partition_point(|(at, _)| *at < s + shift);
        if let Some(&(at, v)) = before.checked_sub(1).map(|i| &validations[i]) {
            rec.extra.insert("validation.step".into(), serde_json::json!(at as f64));
            rec.extra.insert("validation.loss".into(), serde_json::json!(v));
        }
        steps.push(rec);
    }
    if steps.is_empty() {
        return Err(TraceError::Empty {
            path: origin.into(),
            detail: format!("the loss tag `{loss_tag}` has no point at a step >= 0"),
        });
    }
    let name = |t: Option<&str>| t.map_or_else(|| "none".to_string(), |t| format!("`{t}`"));
    let mut read = format!(
        "{}: TensorBoard tags read: loss `{loss_tag}` ({n_loss} points), LR {}, gradient norm {}, epoch {}, validation loss {}",
        origin.display(),
        name(lr_tag),
        name(gn_tag),
        if epoch_ends.is_some() { format!("`{SAM_STEPS_TRAIN}`") } else { name(epoch_tag) },
        name(val_tag)
    );
    if !components.is_empty() {
        read.push_str(&format!(
            ", loss terms {}",
            components.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    warnings.push(read);
    if replaced > 0 {
        warnings.push(format!(
            "{}: {replaced} point(s) logged again at the same step by a later event file, or after the step a later file restarts at (a resumed run): the later file's values are used",
            origin.display()
        ));
    }
    if lr_tag.is_none() {
        warnings.push(format!(
            "{}: no LR tag (a scalar named `lr` or `learning_rate`): the LR is unknown (NaN); LR-schedule plugins get scheduled_lr NaN",
            origin.display()
        ));
    }
    // transformers' TensorBoardCallback (its tag names) logs the mean loss since its last log,
    // and its `TrainingArguments` as the text `args`.
    let args = hf_training_arguments(&texts);
    let hf_trainer = args.is_some() || (loss_tag == "train/loss" && lr_tag == Some("train/learning_rate"));
    let (header, max_grad_norm) = match &args {
        Some(a) => {
            warnings.push(format!(
                "{}: the Hugging Face Trainer's arguments (the `args` text) read: batch {} per device, gradient accumulation {}, warmup {} steps, max_grad_norm {}",
                origin.display(),
                a.0.batch_size,
                a.0.accumulation,
                a.0.warmup_steps,
                a.1
            ));
            (Some(a.0.clone()), Some(a.1))
        }
        None => (None, None),
    };
    let segments = match (&header, steps.first()) {
        (Some(h), Some(first)) => vec![RunSegment { from_step: first.step, header: h.clone() }],
        _ => Vec::new(),
    };
    let validation = validations.iter().filter(|v| v.0 >= 0).map(|&(s, v)| (s as u64, v)).collect();
    let nonfinite_grad_steps = gn_tag
        .map(|t| {
            series[t]
                .iter()
                .filter(|(&s, p)| s + shift >= 1 && !p.value.is_finite())
                .map(|(&s, _)| (s + shift) as u64)
                .collect()
        })
        .unwrap_or_default();
    Ok(Trace {
        run: header,
        segments,
        steps,
        format: TraceFormat::TensorBoard,
        warnings,
        loss_is_interval_mean: hf_trainer,
        validation,
        hf_trainer,
        max_grad_norm,
        nonfinite_grad_steps,
        ended_by: None,
    })
}

/// The Hugging Face Trainer's `TrainingArguments` from an event file's text summaries (its
/// TensorBoardCallback writes them as JSON under `args`): the run header they give and
/// `max_grad_norm`.
fn hf_training_arguments(texts: &BTreeMap<String, String>) -> Option<(RunHeader, f64)> {
    let args = texts.iter().filter(|(t, _)| t.starts_with("args")).find_map(|(_, text)| {
        let v: serde_json::Value = crate::metrics::parse_json(text).ok()?;
        (v.get("max_grad_norm").is_some() && v.get("logging_steps").is_some()).then_some(v)
    })?;
    let num = |k: &str| args.get(k).and_then(|x| crate::metrics::number(x).ok().flatten());
    let count = |k: &str| num(k).filter(|x| x.is_finite() && *x >= 0.0).map_or(0, |x| x.round() as u64);
    let total = num("max_steps").filter(|x| *x > 0.0).map_or(0, |x| x as u64);
    // `warmup_steps` below 1 is a ratio of the run (transformers 5), as `warmup_ratio` is.
    let warmup = match num("warmup_steps").unwrap_or(0.0) {
        w if w >= 1.0 => w.round() as u64,
        w if w > 0.0 => (w * total as f64).ceil() as u64,
        _ => (num("warmup_ratio").unwrap_or(0.0).max(0.0) * total as f64).ceil() as u64,
    };
    let batch = count("per_device_train_batch_size") as u32;
    let accumulation = (count("gradient_accumulation_steps") as u32).max(1);
    let header = RunHeader {
        total_steps: total,
        warmup_steps: warmup,
        accumulation,
        batch_size: batch,
        effective_batch_size: batch * accumulation,
        base_lr: num("learning_rate").unwrap_or(0.0),
        scheduler: args.get("lr_scheduler_type").and_then(|s| s.as_str()).unwrap_or_default().to_string(),
        seed: count("seed"),
        ..Default::default()
    };
    Some((header, num("max_grad_norm").unwrap_or(1.0)))
}

/// A protocol buffer field (key and value) as bytes (`wire`: 0 varint, 1 fixed 64-bit, 2 bytes,
/// 5 fixed 32-bit; a varint's `body` is already encoded).
fn field(num: u64, wire: u64, body: &[u8]) -> Vec<u8> {
    let mut out = varint((num << 3) | wire);
    if wire == 2 {
        out.extend(varint(body.len() as u64));
    }
    out.extend_from_slice(body);
    out
}

/// A protocol buffer varint.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// One TFRecord: the length, its masked CRC, the data, the data's masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = len.to_vec();
    out.extend(masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend(masked_crc(data).to_le_bytes());
    out
}

/// An `Event` with its wall time, step and one `what` field (`num`, bytes).
fn event_bytes(wall: f64, step: u64, num: u64, what: &[u8]) -> Vec<u8> {
    let mut e = field(1, 1, &wall.to_le_bytes());
    e.extend(field(2, 0, &varint(step)));
    e.extend(field(num, 2, what));
    e
}

/// Seconds since the Unix epoch, as event files record wall time.
fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Appends scalars to a new TensorBoard event file, so that `tensorboard --logdir DIR` shows a
/// run while it trains. Each [`EventWriter::scalars`] call is one `Event` (one step's values
/// under their tags, as `simple_value`) written whole with one `write` and flushed: TensorBoard
/// reads the file as it grows, and a run killed mid-write leaves at most a cut-off last record,
/// which TensorBoard and [`parse_event_file`] skip. A resumed run writes a new file that starts
/// with a `SessionLog` START at the first step it will log: TensorBoard then drops the earlier
/// files' points from that step on (the abandoned branch after the resume point), as
/// `SummaryWriter(purge_step=...)` does, and [`trace_from_event_files`] does the same.
#[derive(Debug)]
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Create `events.out.tfevents.<seconds>.<host>.<pid>.lorahost` (a free name) in `dir`, with
    /// its version record and, when `purge_from` is given, the START record at that step.
    pub fn create(dir: &Path, purge_from: Option<u64>) -> std::io::Result<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .map(|h| {
                h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
            })
            .filter(|h: &String| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let wall = now();
        let base = format!("events.out.tfevents.{}.{host}.{}", wall as u64, std::process::id());
        let mut k = 0;
        let (file, path) = loop {
            let path =
                dir.join(if k == 0 { format!("{base}.lorahost") } else { format!("{base}.{k}.lorahost") });
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 1000 => k += 1,
                Err(e) => return Err(e),
            }
        };
        let mut w = EventWriter { file, path };
        let step = purge_from.unwrap_or(0);
        w.write(&event_bytes(wall, step, 3, b"brain.Event:2"))?;
        if let Some(step) = purge_from {
            // SessionLog { status: START (1) }.
            w.write(&event_bytes(wall, step, 7, &field(1, 0, &varint(1))))?;
        }
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `values` (tag, number; non-finite numbers as they are) as one event at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> std::io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = field(1, 2, tag.as_bytes());
            value.extend(field(2, 5, &(*v as f32).to_le_bytes()));
            summary.extend(field(1, 2, &value));
        }
        self.write(&event_bytes(now(), step, 5, &summary))
    }

    /// Write `images` (tag, PNG bytes, width, height) as one event at `step`: TensorBoard's
    /// Images tab shows them, with a slider over the steps logged under the same tag.
    pub fn images(&mut self, step: u64, images: &[(String, Vec<u8>, u32, u32)]) -> std::io::Result<()> {
        if images.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, png, w, h) in images {
            // Summary.Image { height, width, colorspace (3: RGB), encoded_image_string }.
            let mut image = field(1, 0, &varint(u64::from(*h)));
            image.extend(field(2, 0, &varint(u64::from(*w))));
            image.extend(field(3, 0, &varint(3)));
            image.extend(field(4, 2, png));
            let mut value = field(1, 2, tag.as_bytes());
            value.extend(field(4, 2, &image));
            summary.extend(field(1, 2, &value));
        }
        self.write(&event_bytes(now(), step, 5, &summary))
    }

    fn write(&mut self, event: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.file.write_all(&record(event))?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_event(wall: f64, step: u64, tag: &str, value: &[u8]) -> Vec<u8> {
        let mut v = field(1, 2, tag.as_bytes());
        v.extend_from_slice(value);
        event_bytes(wall, step, 5, &field(1, 2, &v))
    }

    /// CRC-32C's check value, and TFRecord's masking of it.
    #[test]
    fn crc32c_matches_its_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    /// Every tensor encoding TensorBoard writers use for a scalar gives its number; tensors of
    /// several elements and strings give none.
    #[test]
    fn one_element_tensors_of_each_type_are_scalars() {
        let tensor = |dtype: u64, rest: Vec<u8>| {
            let mut t = field(1, 0, &varint(dtype));
            t.extend(rest);
            tensor_scalar(&t).unwrap()
        };
        let dims = |sizes: &[u64]| {
            let mut shape = Vec::new();
            for s in sizes {
                shape.extend(field(2, 2, &field(1, 0, &varint(*s))));
            }
            field(2, 2, &shape)
        };
        assert_eq!(tensor(1, field(5, 2, &2.5f32.to_le_bytes())), Some(2.5));
        assert_eq!(tensor(1, field(5, 5, &(-1.25f32).to_le_bytes())), Some(-1.25));
        assert_eq!(tensor(2, field(6, 2, &0.1f64.to_le_bytes())), Some(0.1));
        assert_eq!(tensor(1, field(4, 2, &3.0f32.to_le_bytes())), Some(3.0));
        assert_eq!(tensor(9, field(10, 0, &varint(-7i64 as u64))), Some(-7.0));
        assert_eq!(tensor(3, field(7, 2, &varint(42))), Some(42.0));
        // Half 1.5 = 0x3e00; bfloat16 1.5 = 0x3fc0.
        assert_eq!(tensor(19, field(13, 0, &varint(0x3e00))), Some(1.5));
        assert_eq!(tensor(14, field(4, 2, &0x3fc0u16.to_le_bytes())), Some(1.5));
        let mut one = dims(&[1]);
        one.extend(field(5, 2, &4.0f32.to_le_bytes()));
        assert_eq!(tensor(1, one), Some(4.0));
        let mut three = dims(&[3]);
        three.extend(field(5, 2, &[1f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()));
        assert_eq!(tensor(1, three), None);
        assert_eq!(tensor(7, field(8, 2, b"text")), None);
        assert_eq!(f16_value(0x7c00), f64::INFINITY);
        assert_eq!(f16_value(0x0001), 2f64.powi(-24));
    }

    /// A cut-off last record is dropped with a warning, a corrupt one ends the reading there, a
    /// file that is not a TFRecord file is an error naming it.
    #[test]
    fn cut_corrupt_and_foreign_files() {
        let path = Path::new("run/events.out.tfevents.1");
        let mut bytes = Vec::new();
        for s in 1..=3u64 {
            bytes.extend(record(&scalar_event(
                100.0 + s as f64,
                s,
                "loss",
                &field(2, 5, &(s as f32).to_le_bytes()),
            )));
        }
        let whole = parse_event_file(&bytes, path).unwrap();
        assert_eq!(whole.scalars["loss"].len(), 3);
        assert!(whole.warning.is_none());
        assert_eq!(whole.scalars["loss"][2].ms_per_step, Some(1000.0));
        let cut = parse_event_file(&bytes[..bytes.len() - 5], path).unwrap();
        assert_eq!(cut.scalars["loss"].len(), 2);
        assert!(cut.warning.unwrap().contains("cut off"));
        let mut corrupt = bytes.clone();
        let second = record(&scalar_event(101.0, 1, "loss", &field(2, 5, &1f32.to_le_bytes()))).len();
        corrupt[second + 14] ^= 0x40;
        let c = parse_event_file(&corrupt, path).unwrap();
        assert_eq!(c.scalars["loss"].len(), 1);
        assert!(c.warning.unwrap().contains("corrupt"));
        let e = parse_event_file(b"step,loss\n1,2.0\n", path).unwrap_err().to_string();
        assert!(e.contains("events.out.tfevents.1") && e.contains("not a TensorBoard event file"), "{e}");
        assert!(!looks_like_event_file(b"step,loss\n1,2.0\n") && looks_like_event_file(&bytes));
    }

    /// Event files whose scalars have no training loss: an error naming the tags there are;
    /// a run logged from step 0 is shifted to 1-based steps, the LR held between its points.
    #[test]
    fn no_loss_tag_names_the_tags_and_zero_based_steps_shift() {
        let dir = std::env::temp_dir().join(format!("lorahost-tfevents-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f32v = |v: f32| field(2, 5, &v.to_le_bytes());
        let mut bytes = Vec::new();
        for s in 0..4u64 {
            bytes.extend(record(&scalar_event(10.0 + s as f64, s, "metrics/accuracy", &f32v(0.5))));
        }
        let path = dir.join("events.out.tfevents.1.host");
        std::fs::write(&path, &bytes).unwrap();
        let e = trace_from_event_files(std::slice::from_ref(&path), &dir).unwrap_err().to_string();
        assert!(e.contains("no training loss") && e.contains("metrics/accuracy"), "{e}");
        for s in 0..4u64 {
            bytes.extend(record(&scalar_event(10.0 + s as f64, s, "loss", &f32v(4.0 - s as f32))));
            if s % 2 == 0 {
                bytes.extend(record(&scalar_event(
                    10.0 + s as f64,
                    s,
                    "lr-AdamW",
                    &f32v(0.1 * (s + 1) as f32),
                )));
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let t = trace_from_event_files(std::slice::from_ref(&path), &dir).unwrap();
        let got: Vec<(u64, f64, f64)> =
            t.steps.iter().map(|s| (s.step, s.loss, (s.lr * 1e6).round() / 1e6)).collect();
        assert_eq!(got, vec![(1, 4.0, 0.1), (2, 3.0, 0.1), (3, 2.0, 0.3), (4, 1.0, 0.3)]);
        assert!(t.steps.iter().all(|s| s.grad_norm.is_nan()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
