//! A training run's console output as a trace: what a `nohup.out`, a SLURM `.out` file or
//! `python train.py 2>&1 | tee train.log` holds, when the trainer wrote no metrics file.
//!
//! Two shapes are read, and may mix:
//! - **tqdm progress bars with the loss in the postfix**, as SAM3_LoRA prints it
//!   (`Epoch 3:  42%|████▏     | 41/98 [03:10<04:24,  4.64s/it, loss=169]`, one bar per epoch,
//!   `set_postfix` after each batch). Each display is `{desc}: {pct}%|{bar}| {n}/{total}
//!   [{elapsed}<{remaining}, {rate}, {key}={value}, ...]` (`{desc}: {n}it [{elapsed}, {rate},
//!   ...]` for a bar without a total), and a file keeps every refresh (separated by `\r` or `\n`).
//!   A display drawn below another bar (a cursor-up escape follows it: an inner batch bar under
//!   an epoch bar, an evaluation bar under the training bar) is read when it is the bar that
//!   carries the losses, and otherwise only gives the epoch (an outer `Epoch` bar's count).
//!   The values are tqdm's 3 significant digits. A bar whose description names validation,
//!   evaluation or testing is not training; a per-epoch line such as
//!   `Epoch 3/100 - Train Loss: 156.1, Val Loss: 17.0` gives a validation point at the end of
//!   that epoch. With `Training samples: N` printed, the batch size is the one that gives the
//!   bar's batches per epoch.
//!
//!   Which step a display's loss belongs to depends on the loop. SAM3_LoRA calls `set_postfix`
//!   (which redraws) before the bar counts the batch: while batch `i` (1-based) is trained the
//!   bar shows `n = i - 1`, so the last display with a given `n` carries the loss of step
//!   `n + 1`, and the first loss shows at `n = 0`. A loop that counts first (`update(1)` then
//!   `set_postfix`, Lightning) or whose postfix only shows at the next count
//!   (`set_postfix(..., refresh=False)`) shows the loss of step `n` at `n`, and its last new loss
//!   at `n = total`. The bars of a file vote (first loss at `n = 0`, new loss at `n = total`);
//!   without a vote the first reading holds. The count tqdm draws again after the loss (the next
//!   batch's count with the old postfix) is overwritten by the next loss, except at the end of a
//!   bar cut short (the run killed): that display makes no step. A bar whose displays were cut
//!   at the terminal's width keeps the postfix items shown whole, and a warning says how many
//!   steps could not be read.
//! - **Printed metric dictionaries**, as the Hugging Face Trainer prints them every
//!   `logging_steps` (`{'loss': 0.52, 'grad_norm': 3.1, 'learning_rate': 4.9e-05, 'epoch': 0.1}`,
//!   values quoted in recent versions; `eval_loss` for evaluations). tqdm's `write` redraws the
//!   bar below each one with its current count, so the step of a dictionary is the `n` of the
//!   next display of the training bar (not an evaluation bar nested under it). Their losses are
//!   means over the steps since the previous one. Without a bar (`disable_tqdm=True`) a
//!   dictionary's step is its epoch times the steps per epoch, which the end-of-training summary
//!   gives (`train_steps_per_second × train_runtime` steps over its `epoch`); without the
//!   summary the steps cannot be known ([`why_unreadable`] says so).
//!
//! A run resumed into the same file (`>> nohup.out`) restarts the training bar (same description
//! and total) at a count it had already passed: its steps are absolute, the ones from the resume
//! point on replace the earlier run's, and a warning says so. A CUDA out-of-memory error, the
//! shell's `Killed` or a Python traceback after the last training display is
//! [`Trace::ended_by`].

use crate::metrics::{RunHeader, RunSegment, StepRecord, Trace, TraceFormat};
use std::collections::{BTreeMap, BTreeSet, HashMap};

type Dict = serde_json::Map<String, serde_json::Value>;

/// One tqdm display.
#[derive(Debug, Clone, PartialEq)]
struct Bar {
    desc: String,
    n: u64,
    /// 0 for a bar without a total (`Epoch 1: 5it [00:01, 4.10it/s, loss=1.2]`).
    total: u64,
    /// `key=value` items after the rate.
    postfix: Vec<(String, String)>,
    /// Drawn below another bar (a cursor-up escape follows it).
    nested: bool,
    /// Cut off before its closing `]` (a terminal narrower than the bar: tqdm's `ncols`); the
    /// postfix keeps the items shown whole.
    cut: bool,
}

impl Bar {
    /// The training loss in the postfix (a key with `loss` that names no validation).
    fn loss(&self) -> Option<f64> {
        self.postfix
            .iter()
            .find(|(k, _)| {
                let k = k.to_ascii_lowercase();
                k.contains("loss") && !is_validation(&k)
            })
            .and_then(|(_, v)| crate::metrics::parse_number_text(v))
    }

    fn get(&self, names: &[&str]) -> Option<f64> {
        self.postfix
            .iter()
            .find(|(k, _)| names.contains(&k.to_ascii_lowercase().as_str()))
            .and_then(|(_, v)| crate::metrics::parse_number_text(v))
    }
}

/// Remove ANSI escape sequences (`ESC [ ... letter`), noting whether a cursor-up was among them.
fn strip_ansi(s: &str) -> (String, bool) {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    up |= d == 'A';
                    break;
                }
            }
        }
    }
    (out, up)
}

/// A tqdm display, or None.
fn parse_bar(segment: &str, nested: bool) -> Option<Bar> {
    let s = segment.trim();
    let (desc, n, total, bracket) = if let Some(pct_bar) = s.find("%|") {
        let desc_and_pct = &s[..pct_bar];
        let pct_start = desc_and_pct.rfind(|c: char| !c.is_ascii_digit() && c != '.').map_or(0, |i| i + 1);
        if pct_start == desc_and_pct.len() {
            return None;
        }
        let desc = desc_and_pct[..pct_start].trim().trim_end_matches(':').trim();
        let rest = &s[pct_bar + 2..];
        let rest = &rest[rest.find("| ")? + 2..];
        let (counts, bracket) = rest.split_once(" [")?;
        let (n, total) = counts.trim().split_once('/')?;
        (desc, n.trim().parse().ok()?, total.trim().parse().ok()?, bracket)
    } else {
        // No total: `{desc}: {n}{unit} [{elapsed}, {rate}{postfix}]`.
        let (head, bracket) = s.split_once(" [")?;
        let at = head.rfind(' ').map_or(0, |i| i + 1);
        let count = &head[at..];
        let digits = count.find(|c: char| !c.is_ascii_digit()).unwrap_or(count.len());
        let unit = &count[digits..];
        if digits == 0 || unit.is_empty() || !unit.chars().all(|c| c.is_ascii_alphabetic()) {
            return None;
        }
        let elapsed = bracket.split([',', ']']).next()?;
        if !elapsed.contains(':') || !elapsed.chars().all(|c| c.is_ascii_digit() || c == ':') {
            return None;
        }
        (head[..at].trim().trim_end_matches(':').trim(), count[..digits].parse().ok()?, 0, bracket)
    };
    let (inside, cut) = match bracket.find(']') {
        Some(end) => (&bracket[..end], false),
        None => (bracket, true),
    };
    // Cut short, the last item may be incomplete, unless its `, ` shows (trimmed to `,`).
    let (inside, whole) = match inside.strip_suffix(',') {
        Some(s) if cut => (s, true),
        _ => (inside, !cut),
    };
    let mut items: Vec<&str> = inside.split(", ").collect();
    if !whole {
        items.pop();
    }
    let postfix = items
        .into_iter()
        .skip(2)
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    Some(Bar { desc: desc.to_string(), n, total, postfix, nested, cut })
}

/// A printed Python dict of metrics (`{'loss': 0.5, 'epoch': '1.2'}`), as JSON.
fn parse_dict(segment: &str) -> Option<Dict> {
    let s = segment.trim();
    if !(s.starts_with("{'") && s.ends_with('}')) {
        return None;
    }
    // Python's repr: single quotes (no quotes inside metric names or numbers), bare nan / inf.
    let json = s.replace('\'', "\"");
    let json = json.replace(": nan", ": NaN").replace(": inf", ": Infinity").replace(": -inf", ": -Infinity");
    match crate::metrics::parse_json(&json).ok()? {
        serde_json::Value::Object(o) => Some(o),
        _ => None,
    }
}

fn value_of(v: Option<&serde_json::Value>) -> Option<f64> {
    crate::metrics::number(v?).ok().flatten()
}

fn is_validation(desc: &str) -> bool {
    let d = desc.to_ascii_lowercase();
    ["val", "eval", "test"].iter().any(|w| d.contains(w))
}

/// The 1-based epoch a bar's description names (`Epoch 3`, `epoch 3/100`).
fn epoch_of(desc: &str) -> Option<u32> {
    let d = desc.to_ascii_lowercase();
    let after = &d[d.find("epoch")? + 5..];
    let digits: String =
        after.trim_start_matches([' ', ':', '[']).chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The 0-based epoch of a Hugging Face `epoch` value (completed epochs after the step: 1.0 ends
/// the first epoch), as trainer_state.json is read.
fn hf_epoch(x: f64) -> Option<u32> {
    (x.is_finite() && x >= 0.0).then(|| ((x - 1e-6).ceil().max(1.0) - 1.0) as u32)
}

/// The number after `label` in `line` (case-insensitive), e.g. `Val Loss: 17.01`.
fn number_after(line: &str, label: &str) -> Option<f64> {
    let lower = line.to_ascii_lowercase();
    let at = lower.find(label)? + label.len();
    let tail = line[at..].trim_start_matches([' ', ':', '=']);
    let end = tail.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(tail.len());
    tail[..end].parse().ok()
}

fn segments(text: &str) -> impl Iterator<Item = (String, bool)> + '_ {
    text.split(['\n', '\r']).map(strip_ansi)
}

/// How telling a line is as the end of a run: 3 a CUDA out-of-memory error, 2 the shell's
/// `Killed` or SLURM cancelling the job, 1 a Python traceback's header (its last line is the
/// error), 0 none.
fn ending(line: &str) -> u8 {
    let t = line.trim();
    let lower = t.to_ascii_lowercase();
    if lower.contains("out of memory") || lower.contains("outofmemoryerror") {
        3
    } else if t == "Killed"
        || t.starts_with("Killed ")
        || (t.contains(" Killed ") && t.contains("line "))
        || (lower.starts_with("slurmstepd") && (lower.contains("cancelled") || lower.contains("oom")))
    {
        2
    } else if t.starts_with("Traceback (most recent call last)") {
        1
    } else {
        0
    }
}

/// One piece of the console output.
enum Event {
    Bar(Bar),
    Dict(Dict),
    Line(String),
}

fn events(text: &str) -> Vec<Event> {
    segments(text)
        .filter(|(s, _)| !s.trim().is_empty())
        .map(|(s, nested)| {
            if let Some(b) = parse_bar(&s, nested) {
                Event::Bar(b)
            } else if let Some(d) = parse_dict(&s) {
                Event::Dict(d)
            } else {
                Event::Line(s)
            }
        })
        .collect()
}

/// Whether `text` looks like console output this module reads: a tqdm bar carrying a loss, or
/// a printed metrics dictionary with one.
pub fn looks_like(text: &str) -> bool {
    segments(text).any(|(s, nested)| {
        parse_bar(&s, nested).is_some_and(|b| b.loss().is_some())
            || parse_dict(&s).is_some_and(|d| d.contains_key("loss") || d.contains_key("eval_loss"))
    })
}

/// Why console output that [`looks_like`] what this module reads gives no trace, for the
/// caller's error (None when [`parse`] reads it, or it is not such output).
pub fn why_unreadable(text: &str) -> Option<String> {
    if !looks_like(text) || parse(text).is_some() {
        return None;
    }
    let events = events(text);
    let dicts = events.iter().filter(|e| matches!(e, Event::Dict(d) if d.contains_key("loss"))).count();
    let bars = events.iter().any(|e| matches!(e, Event::Bar(b) if b.loss().is_some()));
    Some(if dicts > 0 && !bars {
        format!(
            "a trainer's console output with {dicts} printed {{'loss': ...}} dictionaries but no progress bar (a Hugging Face Trainer run with disable_tqdm=True): they carry the epoch but not the step, and without the end-of-training summary ({{'train_runtime': ..., 'train_steps_per_second': ...}}) the steps per epoch are unknown\n  fix: give the run's trainer_state.json (in its output_dir's checkpoint-* folders) or its TensorBoard logs, or run with disable_tqdm=False"
        )
    } else {
        "a trainer's console output whose progress bars and printed dictionaries give no training step\n  fix: give the run's metrics file (trainer_state.json, TensorBoard logs, metrics.csv)".to_string()
    })
}

/// The displays of one tqdm bar from its start (or restart) on.
#[derive(Debug, Default)]
struct Instance {
    desc: String,
    total: u64,
    nested: bool,
    /// Event indices of its displays.
    displays: Vec<usize>,
    last_n: u64,
    max_n: u64,
    /// The first count above 0.
    first_pos_n: Option<u64>,
    loss_displays: usize,
    /// Its steps are read (the bar carrying the losses, or the one the dictionaries follow).
    training: bool,
    /// Step of its count 0.
    offset: u64,
    /// A run resumed into the same file: its steps replace the earlier run's from its first on.
    resumed: bool,
    /// Its displays from this event on make no step (the count drawn again with the old loss,
    /// at the end of a bar cut short).
    stale_from: Option<usize>,
}

impl Instance {
    /// The steps it spans.
    fn extent(&self) -> u64 {
        if self.total > 0 {
            self.total
        } else {
            self.max_n
        }
    }
}

/// A step read: (loss, lr, grad_norm, epoch, the epoch is a description's, from a dictionary).
type Point = (f64, f64, f64, Option<u32>, bool, bool);

fn same(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || (a.is_nan() && b.is_nan()),
        (None, None) => true,
        _ => false,
    }
}

/// The steps per epoch and total steps the Hugging Face Trainer's end-of-training summary
/// gives (`train_steps_per_second × train_runtime` steps over `epoch` epochs).
fn summary_steps(dicts: &[&Dict]) -> Option<(f64, f64, u64)> {
    let s = dicts.iter().rev().find(|d| d.contains_key("train_runtime"))?;
    let total = (value_of(s.get("train_steps_per_second"))? * value_of(s.get("train_runtime"))?).round();
    let epochs = value_of(s.get("epoch"))?;
    (total.is_finite() && total >= 1.0 && epochs.is_finite() && epochs > 0.0)
        .then(|| (total / epochs, epochs, total as u64))
}

/// Read console output (see the module docs); None when it holds no training step.
pub fn parse(text: &str) -> Option<Trace> {
    let events = events(text);
    // The bars' instances.
    let mut insts: Vec<Instance> = Vec::new();
    let mut inst_of: Vec<Option<usize>> = vec![None; events.len()];
    let mut open: HashMap<(String, u64, bool), usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let Event::Bar(b) = e else { continue };
        let key = (b.desc.clone(), b.total, b.nested);
        let k = match open.get(&key) {
            Some(&k) if b.n >= insts[k].last_n => k,
            _ => {
                insts.push(Instance {
                    desc: b.desc.clone(),
                    total: b.total,
                    nested: b.nested,
                    ..Default::default()
                });
                open.insert(key, insts.len() - 1);
                insts.len() - 1
            }
        };
        let inst = &mut insts[k];
        inst_of[i] = Some(k);
        inst.displays.push(i);
        inst.last_n = b.n;
        inst.max_n = inst.max_n.max(b.n);
        if b.n > 0 && inst.first_pos_n.is_none() {
            inst.first_pos_n = Some(b.n);
        }
        inst.loss_displays += usize::from(b.loss().is_some());
    }
    let bar = |i: usize| match &events[i] {
        Event::Bar(b) => b,
        _ => unreachable!("instances hold bars"),
    };
    // The training bars: those carrying a loss (of the nesting level with the most losses), or,
    // without any, the top-level ones the printed dictionaries follow.
    let carrying = |inst: &Instance| inst.loss_displays > 0 && !is_validation(&inst.desc);
    let by_level = |nested: bool| -> usize {
        insts.iter().filter(|t| carrying(t) && t.nested == nested).map(|t| t.loss_displays).sum()
    };
    let (top, below) = (by_level(false), by_level(true));
    let dict_mode = top + below == 0;
    let level = below > top;
    for t in &mut insts {
        t.training =
            if dict_mode { !t.nested && !is_validation(&t.desc) } else { carrying(t) && t.nested == level };
    }
    // Which step a loss belongs to: the bars vote (see the module docs).
    let (mut at_n_plus_1, mut at_n) = (0, 0);
    for t in insts.iter().filter(|t| t.training && !dict_mode) {
        let shown: Vec<&Bar> = t.displays.iter().map(|&i| bar(i)).collect();
        if shown.iter().find(|b| b.loss().is_some()).is_some_and(|b| b.n == 0) {
            at_n_plus_1 += 1;
        }
        if t.total > 0
            && shown.windows(2).any(|w| {
                w[1].n == t.total
                    && w[0].loss().is_some()
                    && w[1].loss().is_some()
                    && !same(w[0].loss(), w[1].loss())
            })
        {
            at_n += 1;
        }
    }
    let postfix_first = at_n <= at_n_plus_1;
    // The end of a bar cut short: the count drawn again with the old loss makes no step.
    for t in insts.iter_mut().filter(|t| t.training && !dict_mode) {
        let shown: Vec<(usize, u64, Option<f64>)> =
            t.displays.iter().map(|&i| (i, bar(i).n, bar(i).loss())).filter(|d| d.2.is_some()).collect();
        let mut runs: Vec<&(usize, u64, Option<f64>)> = Vec::new();
        for d in &shown {
            if runs.last().is_none_or(|r| r.1 != d.1 || !same(r.2, d.2)) {
                runs.push(d);
            }
        }
        if let [.., prev, last] = runs[..] {
            if last.1 == prev.1 + 1 && same(last.2, prev.2) {
                t.stale_from = Some(last.0);
            }
        }
    }
    // Where each training bar's count 0 is: after the previous one, or, for a run resumed into
    // the same file, where the previous run's was.
    let ends: Vec<usize> = events
        .iter()
        .scan(0, |acc, e| {
            *acc += usize::from(matches!(e, Event::Line(l) if ending(l) > 0));
            Some(*acc)
        })
        .collect();
    let mut prev: Option<usize> = None;
    for k in 0..insts.len() {
        if !insts[k].training {
            continue;
        }
        if let Some(p) = prev {
            let (p_inst, t) = (&insts[p], &insts[k]);
            let ended_between = ends[t.displays[0]] > ends[*p_inst.displays.last().unwrap_or(&0)];
            let resumed = (&p_inst.desc, p_inst.total) == (&t.desc, t.total)
                && p_inst.total > 0
                && p_inst.max_n < p_inst.total
                && t.first_pos_n.is_some_and(|f| f <= p_inst.max_n && (dict_mode || f > 1 || ended_between));
            let offset = if resumed { p_inst.offset } else { p_inst.offset + p_inst.extent() };
            insts[k].offset = offset;
            insts[k].resumed = resumed;
        }
        prev = Some(k);
    }

    let mut steps: BTreeMap<u64, Point> = BTreeMap::new();
    let mut validation: Vec<(u64, f64)> = Vec::new();
    let mut nonfinite: Vec<u64> = Vec::new();
    let mut resumed_from: Vec<u64> = Vec::new();
    let mut started: Vec<bool> = vec![false; insts.len()];
    let mut per_epoch_total: Option<u64> = None;
    let mut samples: Option<u64> = None;
    let mut pending: Vec<Dict> = Vec::new();
    let mut all_dicts: Vec<&Dict> = Vec::new();
    let mut outer_epoch: Option<u32> = None;
    let mut last_step: Option<u64> = None;
    let mut last_training: Option<(usize, u64, Option<u64>)> = None;
    let mut last_position: Option<u64> = None;
    let mut ended: Option<(u8, String)> = None;
    let mut in_traceback = false;
    let mut finished = false;
    // Before a resumed run's first step, drop the earlier run's from there on.
    let mut resume_at = |k: Option<usize>,
                         at: u64,
                         steps: &mut BTreeMap<u64, Point>,
                         validation: &mut Vec<(u64, f64)>,
                         nonfinite: &mut Vec<u64>| {
        let Some(k) = k else { return };
        if insts[k].resumed && !started[k] {
            steps.split_off(&at);
            validation.retain(|v| v.0 < at);
            nonfinite.retain(|s| *s < at);
            resumed_from.push(at);
        }
        started[k] = true;
    };
    let place = |pending: &mut Vec<Dict>,
                 at: u64,
                 steps: &mut BTreeMap<u64, Point>,
                 validation: &mut Vec<(u64, f64)>,
                 nonfinite: &mut Vec<u64>| {
        for d in pending.drain(..) {
            if let Some(l) = value_of(d.get("eval_loss")) {
                validation.push((at, l));
            } else if let (Some(l), false) = (value_of(d.get("loss")), d.contains_key("train_runtime")) {
                let lr = value_of(d.get("learning_rate")).unwrap_or(f64::NAN);
                let gn = value_of(d.get("grad_norm"));
                let epoch = value_of(d.get("epoch")).and_then(hf_epoch);
                if at > 0 {
                    if gn.is_some_and(|g| !g.is_finite()) {
                        nonfinite.push(at);
                    }
                    steps.insert(at, (l, lr, gn.unwrap_or(f64::NAN), epoch, false, true));
                }
            }
        }
    };
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Bar(b) => {
                let k = inst_of[i];
                let Some(inst) = k.map(|k| &insts[k]).filter(|t| t.training) else {
                    if !b.nested && !is_validation(&b.desc) && b.desc.to_ascii_lowercase().contains("epoch") {
                        outer_epoch = u32::try_from(b.n).ok();
                    }
                    continue;
                };
                let signature = (k.unwrap_or(0), b.n, b.loss().map(f64::to_bits));
                if last_training != Some(signature) {
                    // Training went on: what came before was not the end.
                    ended = None;
                    in_traceback = false;
                    last_training = Some(signature);
                }
                let position = inst.offset + b.n;
                last_position = Some(position);
                if !pending.is_empty() {
                    resume_at(k, position, &mut steps, &mut validation, &mut nonfinite);
                    place(&mut pending, position, &mut steps, &mut validation, &mut nonfinite);
                }
                let Some(loss) = b.loss().filter(|_| inst.stale_from.is_none_or(|s| i < s)) else {
                    continue;
                };
                let at = if postfix_first {
                    (b.total == 0 || b.n < b.total).then_some(b.n + 1)
                } else {
                    (b.n > 0).then_some(b.n)
                };
                let Some(at) = at.map(|a| inst.offset + a) else { continue };
                let (desc_epoch, epoch) = match epoch_of(&b.desc) {
                    Some(e) => (true, Some(e)),
                    None => (false, outer_epoch),
                };
                if epoch.is_some() && b.total > 0 {
                    per_epoch_total = Some(b.total);
                }
                let lr = b.get(&["lr", "learning_rate"]).unwrap_or(f64::NAN);
                let gn = b.get(&["grad_norm", "gnorm", "grad"]);
                resume_at(k, at, &mut steps, &mut validation, &mut nonfinite);
                if gn.is_some_and(|g| !g.is_finite()) {
                    nonfinite.push(at);
                }
                steps.insert(at, (loss, lr, gn.unwrap_or(f64::NAN), epoch, desc_epoch, false));
                last_step = Some(at);
            }
            Event::Dict(d) => {
                if d.contains_key("loss") {
                    ended = None;
                    in_traceback = false;
                }
                if d.contains_key("train_runtime") {
                    finished = true;
                }
                all_dicts.push(d);
                pending.push(d.clone());
            }
            Event::Line(s) => {
                let how = ending(s);
                if !finished && how > 0 {
                    if how == 1 {
                        in_traceback = true;
                    } else if ended.as_ref().is_none_or(|e| e.0 <= how) {
                        ended = Some((how, s.trim().to_string()));
                    }
                } else if in_traceback && !s.starts_with([' ', '\t']) {
                    // The traceback's last line: the error.
                    in_traceback = false;
                    if ended.as_ref().is_none_or(|e| e.0 <= 1) {
                        ended = Some((1, s.trim().to_string()));
                    }
                }
                let lower = s.to_ascii_lowercase();
                if let Some(v) =
                    ["val loss", "val_loss", "validation loss"].iter().find_map(|l| number_after(s, l))
                {
                    if let Some(at) = last_step {
                        validation.push((at, v));
                    }
                } else if lower.contains("training samples") {
                    samples = number_after(s, "training samples").map(|n| n as u64);
                }
            }
        }
    }
    let mut warnings: Vec<String> = Vec::new();
    if let Some(at) = last_position {
        let k = insts.iter().rposition(|t| t.training);
        resume_at(k, at, &mut steps, &mut validation, &mut nonfinite);
        place(&mut pending, at, &mut steps, &mut validation, &mut nonfinite);
    } else if !pending.is_empty() {
        // No progress bar: the steps from the epochs.
        let (spe, epochs, total) = summary_steps(&all_dicts)?;
        let raw = |d: &Dict| value_of(d.get("epoch")).filter(|e| e.is_finite()).map(|e| e * spe);
        let losses: Vec<f64> = pending.iter().filter(|d| d.contains_key("loss")).filter_map(&raw).collect();
        // Logged every `logging_steps`: snap to its multiples when they all fit.
        let interval = losses.first().map_or(0.0, |r| r.round());
        let snap = interval >= 2.0
            && losses.iter().all(|r| (r - (r / interval).round() * interval).abs() <= (r * 0.003).max(1.0));
        for d in std::mem::take(&mut pending) {
            let Some(r) = raw(&d) else { continue };
            let at =
                if snap && d.contains_key("loss") { (r / interval).round() * interval } else { r.round() };
            place(&mut vec![d], at as u64, &mut steps, &mut validation, &mut nonfinite);
        }
        warnings.push(format!(
            "read from console output without a progress bar: each printed dictionary's step is its epoch times {spe:.6} steps per epoch (the run's summary: {total} steps over {epochs} epochs); the steps may be off by a few"
        ));
    }
    if steps.is_empty() {
        return None;
    }
    let interval_means = steps.values().any(|v| v.5);
    // Bars count epochs from 1 (SAM3_LoRA: `Epoch {epoch+1}`) unless one says `Epoch 0`
    // (Lightning's); the records count from 0.
    let first_epoch = steps.values().filter(|v| v.4).filter_map(|v| v.3).min();
    let shift = u32::from(first_epoch.is_some_and(|e| e > 0));
    for v in steps.values_mut().filter(|v| v.4) {
        v.3 = v.3.map(|e| e.saturating_sub(shift));
    }
    // Displays cut at the terminal's width.
    let last_event = events.len().saturating_sub(1);
    let cut = insts
        .iter()
        .filter(|t| t.training && !dict_mode)
        .flat_map(|t| t.displays.iter())
        .filter(|&&i| i != last_event && bar(i).cut)
        .count();
    if cut > 0 {
        let spanned: BTreeSet<u64> = insts
            .iter()
            .filter(|t| t.training)
            .flat_map(|t| {
                let reached = if t.total > 0 && t.max_n >= t.total { t.total } else { t.max_n };
                t.offset + 1..=t.offset + reached
            })
            .collect();
        let unread = spanned.iter().filter(|s| !steps.contains_key(s)).count();
        if unread > 0 {
            warnings.push(format!(
                "{cut} displays of the progress bar were cut off at the terminal's width before their postfix ended: {unread} of its {} steps have no loss\n  fix: run with a wider terminal or tqdm's dynamic_ncols=True (ncols=None), or log the loss to a file",
                spanned.len()
            ));
        }
    }
    if let Some(from) = resumed_from.first() {
        warnings.push(format!(
            "the log holds a resumed run (steps repeated from {from}): its steps replace the earlier run's from there on"
        ));
    }
    nonfinite.sort_unstable();
    nonfinite.dedup();
    nonfinite.retain(|s| steps.contains_key(s));
    let mut trace = Trace {
        format: TraceFormat::Console,
        loss_is_interval_mean: interval_means,
        hf_trainer: interval_means,
        validation,
        nonfinite_grad_steps: nonfinite,
        ended_by: ended.map(|e| e.1),
        ..Default::default()
    };
    trace.steps = steps
        .into_iter()
        .map(|(step, (loss, lr, gn, epoch, _, _))| {
            let mut r = StepRecord::new(step, loss, lr, gn);
            r.epoch = epoch;
            r
        })
        .collect();
    // One bar per epoch (SAM3_LoRA): its batches are the optimizer steps, and with the sample
    // count printed, the batch size follows.
    if let Some(total) = per_epoch_total.filter(|_| !interval_means) {
        let batch = samples.and_then(|n| (1..=n).find(|b| n.div_ceil(*b) == total)).unwrap_or(0);
        let header = RunHeader {
            steps_per_epoch: total,
            batch_size: batch as u32,
            effective_batch_size: batch as u32,
            dataset_size: samples.unwrap_or(0) as u32,
            ..Default::default()
        };
        trace.segments.push(RunSegment { from_step: 1, header: header.clone() });
        trace.run = Some(header);
    }
    trace.warnings.push(if interval_means {
        "read from console output: each loss is the mean over the steps since the previous printed one".into()
    } else {
        "read from console output: the losses are the progress bar's, to 3 significant digits".into()
    });
    trace.warnings.extend(warnings);
    Some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_count_from_zero_whichever_way_the_bars_count() {
        let bar = |desc: &str, n: u32, loss: f64| {
            format!("{desc}:  50%|#####     | {n}/4 [00:01<00:01,  2.00it/s, train_loss={loss}]\r")
        };
        let lightning: String =
            (0..2).flat_map(|e| (0..4).map(move |n| bar(&format!("Epoch {e}"), n, 1.0 + n as f64))).collect();
        let t = parse(&lightning).unwrap();
        let epochs: Vec<Option<u32>> = t.steps.iter().map(|s| s.epoch).collect();
        assert_eq!(epochs, [Some(0), Some(0), Some(0), Some(0), Some(1), Some(1), Some(1), Some(1)]);
        assert_eq!(t.steps[5].loss, 2.0);
        let sam3: String =
            (1..3).flat_map(|e| (0..4).map(move |n| bar(&format!("Epoch {e}"), n, 1.0))).collect();
        assert_eq!(parse(&sam3).unwrap().steps[4].epoch, Some(1));
    }

    #[test]
    fn bars_and_dicts_are_read_as_tqdm_and_python_print_them() {
        let b =
            parse_bar("Epoch 3:  42%|████▏     | 41/98 [03:10<04:24,  4.64s/it, loss=169, lr=1e-4] ", false)
                .unwrap();
        assert_eq!((b.desc.as_str(), b.n, b.total), ("Epoch 3", 41, 98));
        assert_eq!(b.postfix, [("loss".into(), "169".into()), ("lr".into(), "1e-4".into())]);
        let b = parse_bar(" 11%|#1        | 4/36 [00:00<00:03,  8.46it/s]", false).unwrap();
        assert_eq!((b.desc.as_str(), b.n, b.total, b.postfix.len()), ("", 4, 36, 0));
        assert_eq!(parse_bar("Loaded 100% of the data | 3/4 done", false), None);
        assert_eq!(strip_ansi("\u{1b}[A{'a': 1}"), ("{'a': 1}".to_string(), true));
        let d =
            parse_dict("{'loss': '5.231', 'grad_norm': 6.74, 'learning_rate': 1e-05, 'epoch': nan}").unwrap();
        assert_eq!(value_of(d.get("loss")), Some(5.231));
        assert_eq!(value_of(d.get("learning_rate")), Some(1e-5));
        assert!(value_of(d.get("epoch")).unwrap().is_nan());
        assert_eq!(epoch_of("Epoch 12/100"), Some(12));
        assert_eq!(number_after("Epoch 1/3 - Train Loss: 156.12, Val Loss: 17.01", "val loss"), Some(17.01));
        assert!(!looks_like("step,loss\n1,2.0\n"));
    }

    /// (step, loss) of each record.
    fn losses(t: &Trace) -> Vec<(u64, f64)> {
        t.steps.iter().map(|s| (s.step, s.loss)).collect()
    }

    fn counted(steps: std::ops::RangeInclusive<u64>) -> Vec<(u64, f64)> {
        steps.map(|s| (s, 100.0 + s as f64)).collect()
    }

    // Real tqdm 4.70 output (file not a terminal) of small loops; the loss of step s is 100 + s.

    /// `for e in trange(2, desc="Epoch"): p = tqdm(range(3), desc="Iteration", leave=False)`
    /// with `set_postfix(loss=...)` per batch: the inner bar, drawn below, carries the losses.
    const NESTED: &str = "\rEpoch:   0%|          | 0/2 [00:00<?, ?it/s]\n\rIteration:   0%|          | 0/3 [00:00<?, ?it/s]\u{1b}[A\n\rIteration:   0%|          | 0/3 [00:00<?, ?it/s, loss=101]\u{1b}[A\n\rIteration:  33%|###3      | 1/3 [00:00<00:00, 9000.65it/s, loss=101]\u{1b}[A\n\rIteration:  33%|###3      | 1/3 [00:00<00:00, 9000.65it/s, loss=102]\u{1b}[A\n\rIteration:  67%|######6   | 2/3 [00:00<00:00, 7496.13it/s, loss=102]\u{1b}[A\n\rIteration:  67%|######6   | 2/3 [00:00<00:00, 7496.13it/s, loss=103]\u{1b}[A\n\rIteration: 100%|##########| 3/3 [00:00<00:00, 7630.19it/s, loss=103]\u{1b}[A\n\r                                                                    \u{1b}[A\rEpoch:  50%|#####     | 1/2 [00:00<00:00, 1452.32it/s]\n\rIteration:   0%|          | 0/3 [00:00<?, ?it/s]\u{1b}[A\n\rIteration:   0%|          | 0/3 [00:00<?, ?it/s, loss=104]\u{1b}[A\n\rIteration:  33%|###3      | 1/3 [00:00<00:00, 13888.42it/s, loss=104]\u{1b}[A\n\rIteration:  33%|###3      | 1/3 [00:00<00:00, 13888.42it/s, loss=105]\u{1b}[A\n\rIteration:  67%|######6   | 2/3 [00:00<00:00, 9722.28it/s, loss=105] \u{1b}[A\n\rIteration:  67%|######6   | 2/3 [00:00<00:00, 9722.28it/s, loss=106]\u{1b}[A\n\rIteration: 100%|##########| 3/3 [00:00<00:00, 9574.44it/s, loss=106]\u{1b}[A\n\r                                                                    \u{1b}[A\rEpoch: 100%|##########| 2/2 [00:00<00:00, 1567.58it/s]\rEpoch: 100%|##########| 2/2 [00:00<00:00, 1468.34it/s]\n";

    /// SAM3_LoRA's loop (`set_postfix` after each batch of `tqdm(range(4))`), the process killed
    /// during step 7: tqdm had drawn the count 2 again with step 6's loss.
    const KILLED: &str = "\rEpoch 1:   0%|          | 0/4 [00:00<?, ?it/s]\rEpoch 1:   0%|          | 0/4 [00:00<?, ?it/s, loss=101]\rEpoch 1:  25%|##5       | 1/4 [00:00<00:00, 17623.13it/s, loss=101]\rEpoch 1:  25%|##5       | 1/4 [00:00<00:00, 17623.13it/s, loss=102]\rEpoch 1:  50%|#####     | 2/4 [00:00<00:00, 9614.77it/s, loss=102] \rEpoch 1:  50%|#####     | 2/4 [00:00<00:00, 9614.77it/s, loss=103]\rEpoch 1:  75%|#######5  | 3/4 [00:00<00:00, 9688.15it/s, loss=103]\rEpoch 1:  75%|#######5  | 3/4 [00:00<00:00, 9688.15it/s, loss=104]\rEpoch 1: 100%|##########| 4/4 [00:00<00:00, 8841.07it/s, loss=104]\rEpoch 1: 100%|##########| 4/4 [00:00<00:00, 8097.11it/s, loss=104]\n\rEpoch 2:   0%|          | 0/4 [00:00<?, ?it/s]\rEpoch 2:   0%|          | 0/4 [00:00<?, ?it/s, loss=105]\rEpoch 2:  25%|##5       | 1/4 [00:00<00:00, 16980.99it/s, loss=105]\rEpoch 2:  25%|##5       | 1/4 [00:00<00:00, 16980.99it/s, loss=106]\rEpoch 2:  50%|#####     | 2/4 [00:00<00:00, 11160.30it/s, loss=106]\nKilled\n\rEpoch 2:  50%|#####     | 2/4 [00:00<00:00, 8264.64it/s, loss=106] \n";

    #[test]
    fn a_nested_bar_with_the_losses_is_the_training_bar() {
        assert!(looks_like(NESTED));
        let t = parse(NESTED).unwrap();
        assert_eq!(losses(&t), counted(1..=6));
        // The outer bar's count is the epoch.
        assert_eq!(t.steps.iter().map(|s| s.epoch).collect::<Vec<_>>(), [0, 0, 0, 1, 1, 1].map(Some));
        assert_eq!(t.run.unwrap().steps_per_epoch, 3);
        assert!(t.warnings.iter().all(|w| !w.contains("resumed")), "{:?}", t.warnings);
    }

    #[test]
    fn the_loop_order_is_told_from_the_displays() {
        // `p.update(1); p.set_postfix(loss=...)`: the loss of step n shows at n.
        let update_then_postfix = "\rEpoch 1:   0%|          | 0/3 [00:00<?, ?it/s]\rEpoch 1:  33%|###3      | 1/3 [00:00<00:00, 246723.76it/s]\rEpoch 1:  33%|###3      | 1/3 [00:00<00:00, 246723.76it/s, loss=101]\rEpoch 1:  67%|######6   | 2/3 [00:00<00:00, 15709.00it/s, loss=101] \rEpoch 1:  67%|######6   | 2/3 [00:00<00:00, 15709.00it/s, loss=102]\rEpoch 1: 100%|##########| 3/3 [00:00<00:00, 10289.25it/s, loss=102]\rEpoch 1: 100%|##########| 3/3 [00:00<00:00, 10289.25it/s, loss=103]\rEpoch 1: 100%|##########| 3/3 [00:00<00:00, 8154.84it/s, loss=103] \n\rEpoch 2:   0%|          | 0/3 [00:00<?, ?it/s]\rEpoch 2:  33%|###3      | 1/3 [00:00<00:00, 113359.57it/s]\rEpoch 2:  33%|###3      | 1/3 [00:00<00:00, 113359.57it/s, loss=104]\rEpoch 2:  67%|######6   | 2/3 [00:00<00:00, 15470.42it/s, loss=104] \rEpoch 2:  67%|######6   | 2/3 [00:00<00:00, 15470.42it/s, loss=105]\rEpoch 2: 100%|##########| 3/3 [00:00<00:00, 12925.89it/s, loss=105]\rEpoch 2: 100%|##########| 3/3 [00:00<00:00, 12925.89it/s, loss=106]\rEpoch 2: 100%|##########| 3/3 [00:00<00:00, 9453.73it/s, loss=106] \n";
        assert_eq!(losses(&parse(update_then_postfix).unwrap()), counted(1..=6));
        // `set_postfix(..., refresh=False)` under tqdm's default 0.1 s between displays: the
        // loss shows with the count that follows it, every few steps.
        let not_refreshed = "\rEpoch 1:   0%|          | 0/8 [00:00<?, ?it/s]\rEpoch 1:  50%|#####     | 4/8 [00:00<00:00, 32.18it/s, loss=104]\rEpoch 1: 100%|##########| 8/8 [00:00<00:00, 32.62it/s, loss=108]\rEpoch 1: 100%|##########| 8/8 [00:00<00:00, 32.46it/s, loss=108]\n\rEpoch 2:   0%|          | 0/8 [00:00<?, ?it/s]\rEpoch 2:  50%|#####     | 4/8 [00:00<00:00, 33.04it/s, loss=112]\rEpoch 2: 100%|##########| 8/8 [00:00<00:00, 33.01it/s, loss=116]\rEpoch 2: 100%|##########| 8/8 [00:00<00:00, 32.97it/s, loss=116]\n";
        assert_eq!(losses(&parse(not_refreshed).unwrap()), [4, 8, 12, 16].map(|s| (s, 100.0 + s as f64)));
        // SAM3_LoRA's order (`set_postfix` before the count) reads as before.
        let sam3 = KILLED.split("\nKilled").next().unwrap();
        assert_eq!(losses(&parse(sam3).unwrap()), counted(1..=6));
    }

    #[test]
    fn a_run_cut_short_makes_no_step_of_the_last_redraw_and_says_how_it_ended() {
        let t = parse(KILLED).unwrap();
        assert_eq!(losses(&t), counted(1..=6));
        assert_eq!(t.ended_by.as_deref(), Some("Killed"));
        // The file cut in the middle of a display.
        let cut = &KILLED[..KILLED.find("11160.30it/s, loss=1").unwrap() + 20];
        let t = parse(cut).unwrap();
        assert_eq!(losses(&t), counted(1..=6));
        assert_eq!(t.ended_by, None);
        // Out of memory: the error, even with tqdm's last redraw after the traceback.
        let oom = KILLED.replace(
            "Killed\n",
            "Traceback (most recent call last):\n  File \"train_sam3_lora_native.py\", line 512, in <module>\n    loss.backward()\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n",
        );
        let t = parse(&oom).unwrap();
        assert_eq!(losses(&t), counted(1..=6));
        assert_eq!(
            t.ended_by.as_deref(),
            Some("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
        );
        // Another error: the traceback's last line.
        let error = oom.replace("torch.OutOfMemoryError: CUDA out of memory.", "ValueError: bad mask shape.");
        assert_eq!(
            parse(&error).unwrap().ended_by.as_deref(),
            Some("ValueError: bad mask shape. Tried to allocate 2.00 GiB.")
        );
        // An out-of-memory warning that training went on after is not the end.
        let early = KILLED.replacen(
            "\n\r",
            "\nRuntimeError: CUDA out of memory. Retrying with a smaller batch\n\r",
            1,
        );
        let early = early.replace("\nKilled\n", "\n");
        let t = parse(&early).unwrap();
        assert_eq!((t.steps.len(), t.ended_by), (6, None));
    }

    #[test]
    fn bars_without_a_total_are_read() {
        let unknown = "\rEpoch 1: 0it [00:00, ?it/s]\rEpoch 1: 0it [00:00, ?it/s, loss=101]\rEpoch 1: 1it [00:00, 22919.69it/s, loss=101]\rEpoch 1: 1it [00:00, 22919.69it/s, loss=102]\rEpoch 1: 2it [00:00, 13400.33it/s, loss=102]\rEpoch 1: 2it [00:00, 13400.33it/s, loss=103]\rEpoch 1: 3it [00:00, 14208.74it/s, loss=103]\rEpoch 1: 3it [00:00, 11705.03it/s, loss=103]\n\rEpoch 2: 0it [00:00, ?it/s]\rEpoch 2: 0it [00:00, ?it/s, loss=104]\rEpoch 2: 1it [00:00, 25890.77it/s, loss=104]\rEpoch 2: 1it [00:00, 25890.77it/s, loss=105]\rEpoch 2: 2it [00:00, 17374.07it/s, loss=105]\rEpoch 2: 2it [00:00, 17374.07it/s, loss=106]\rEpoch 2: 3it [00:00, 16307.21it/s, loss=106]\rEpoch 2: 3it [00:00, 13515.48it/s, loss=106]\n";
        assert!(looks_like(unknown));
        assert_eq!(losses(&parse(unknown).unwrap()), counted(1..=6));
        let b = parse_bar("Epoch 1: 5it [00:01, 4.10it/s, loss=1.2]", false).unwrap();
        assert_eq!((b.desc.as_str(), b.n, b.total, b.loss()), ("Epoch 1", 5, 0, Some(1.2)));
        assert_eq!(parse_bar("Saving [checkpoint-5]", false), None);
    }

    #[test]
    fn displays_cut_at_the_terminal_width_are_read_as_far_as_they_go_and_warned_of() {
        // ncols=60: `, lr=...` cut, the loss whole.
        let b = parse_bar("Epoch 1:  50%|5| 10/20 [00:00<00:00, 6091.83it/s, loss=110, ", false).unwrap();
        assert_eq!((b.n, b.loss(), b.cut), (10, Some(110.0), true));
        let b = parse_bar("Epoch 1:  45%|4| 9/20 [00:00<00:00, 6227.09it/s, loss=110, l", false).unwrap();
        assert_eq!((b.loss(), b.postfix.len()), (Some(110.0), 1));
        // ncols=50: the loss cut off after the first display.
        let narrow = "\rEpoch 1:   0%|              | 0/4 [00:00<?, ?it/s]\rEpoch 1:   0%| | 0/4 [00:00<?, ?it/s, loss=101, lr\rEpoch 1:  25%|2| 1/4 [00:00<00:00, 6403.52it/s, lo\rEpoch 1:  25%|2| 1/4 [00:00<00:00, 6403.52it/s, lo\rEpoch 1:  50%|5| 2/4 [00:00<00:00, 6490.96it/s, lo\rEpoch 1:  50%|5| 2/4 [00:00<00:00, 6490.96it/s, lo\rEpoch 1:  75%|7| 3/4 [00:00<00:00, 6819.50it/s, lo\rEpoch 1:  75%|7| 3/4 [00:00<00:00, 6819.50it/s, lo\rEpoch 1: 100%|#| 4/4 [00:00<00:00, 6846.07it/s, lo\rEpoch 1: 100%|#| 4/4 [00:00<00:00, 5698.78it/s, lo\n";
        let t = parse(narrow).unwrap();
        assert_eq!(losses(&t), [(1, 101.0)]);
        assert!(
            t.warnings.iter().any(|w| w.contains("cut off") && w.contains("3 of its 4 steps have no loss")),
            "{:?}",
            t.warnings
        );
        // A file cut in the middle of its last display is no narrow terminal.
        assert!(parse(&KILLED[..KILLED.find("11160.30it/s, loss=1").unwrap() + 20])
            .unwrap()
            .warnings
            .iter()
            .all(|w| !w.contains("cut off")));
    }

    /// A Hugging Face Trainer run (max_steps 100, logging_steps 5) killed after step 70 and
    /// resumed from checkpoint-50 into the same nohup.out (shortened: steps 15 to 55 left out).
    const RESUMED: &str = "\n  0%|          | 0/100 [00:00<?, ?it/s]\n                                       \n{'loss': '12.71', 'grad_norm': '3.594', 'learning_rate': '0.004', 'epoch': '0.1562'}\n\n  5%|5         | 5/100 [00:00<00:01, 58.70it/s]\n  7%|7         | 7/100 [00:00<00:01, 64.28it/s]\n                                               \n{'loss': '9.608', 'grad_norm': '6.843', 'learning_rate': '0.009', 'epoch': '0.3125'}\n\n 10%|#         | 10/100 [00:00<00:01, 64.28it/s]\n                                             \n{'loss': '2.345', 'grad_norm': '6.729', 'learning_rate': '0.004556', 'epoch': '1.875'}\n\n 60%|######    | 60/100 [00:00<00:00, 73.50it/s]\n                                                \n{'loss': '3.737', 'grad_norm': '9.78', 'learning_rate': '0.004', 'epoch': '2.031'}\n\n 65%|######5   | 65/100 [00:00<00:00, 73.50it/s]\n 68%|######8   | 68/100 [00:00<00:00, 83.50it/s]\n                                                \n{'loss': '1.664', 'grad_norm': '4.808', 'learning_rate': '0.003444', 'epoch': '2.188'}\n\n 70%|#######   | 70/100 [00:00<00:00, 83.50it/s]\n                                                \n\nKilled\n\n  0%|          | 0/100 [00:00<?, ?it/s]\n                                       \n{'loss': '2.425', 'grad_norm': '7.695', 'learning_rate': '0.005111', 'epoch': '1.719'}\n\n 55%|#####5    | 55/100 [00:00<00:00, 1440.23it/s]\n                                                  \n{'loss': '2.346', 'grad_norm': '6.729', 'learning_rate': '0.004556', 'epoch': '1.875'}\n\n 60%|######    | 60/100 [00:00<00:00, 1151.10it/s]\n                                                  \n{'loss': '1.359', 'grad_norm': '4.434', 'learning_rate': '0.002889', 'epoch': '2.344'}\n\n 75%|#######5  | 75/100 [00:00<00:00, 761.25it/s]\n 76%|#######6  | 76/100 [00:00<00:00, 746.03it/s]\n";

    #[test]
    fn a_run_resumed_into_the_same_file_keeps_its_steps() {
        let t = parse(RESUMED).unwrap();
        // The resumed run's steps from 55 on replace the first run's (60 read 2.345, now 2.346;
        // 65 and 70 were not reached again when the excerpt ends).
        assert_eq!(losses(&t), [(5, 12.71), (10, 9.608), (55, 2.425), (60, 2.346), (75, 1.359)]);
        assert!(
            t.warnings.iter().any(|w| w.contains("resumed run (steps repeated from 55)")),
            "{:?}",
            t.warnings
        );
        assert!(t.hf_trainer && t.loss_is_interval_mean);
        // Training went on after `Killed`.
        assert_eq!(t.ended_by, None);
        // Without the resumed run, the first ended with the shell's `Killed`.
        let first = &RESUMED[..RESUMED.find("Killed").unwrap() + 7];
        assert_eq!(parse(first).unwrap().ended_by.as_deref(), Some("Killed"));
    }

    #[test]
    fn hf_printed_dicts_without_a_bar_take_their_steps_from_the_epochs() {
        // `disable_tqdm=True`, max_steps 100, logging_steps 10 (lines left out).
        let log = "{'loss': '11.16', 'grad_norm': '6.843', 'learning_rate': '0.009', 'epoch': '0.3125'}\n{'loss': '8.916', 'grad_norm': '5.46', 'learning_rate': '0.009', 'epoch': '0.625'}\n{'loss': '3.228', 'grad_norm': '5.934', 'learning_rate': '0.005667', 'epoch': '1.562'}\n{'loss': '1.306', 'grad_norm': '2.461', 'learning_rate': '0.001222', 'epoch': '2.812'}\n{'loss': '1.509', 'grad_norm': '2.556', 'learning_rate': '0.0001111', 'epoch': '3.125'}\n";
        let summary = "{'train_runtime': '1.683', 'train_samples_per_second': '475.4', 'train_steps_per_second': '59.42', 'train_loss': '4.358', 'epoch': '3.125'}\n";
        let t = parse(&format!("{log}{summary}")).unwrap();
        assert_eq!(losses(&t), [(10, 11.16), (20, 8.916), (50, 3.228), (90, 1.306), (100, 1.509)]);
        assert!(t.hf_trainer && t.loss_is_interval_mean);
        assert_eq!(t.steps.iter().map(|s| s.epoch).collect::<Vec<_>>(), [0, 0, 1, 2, 3].map(Some));
        assert_eq!(why_unreadable(&format!("{log}{summary}")), None);
        // Still running or killed: no summary, no steps per epoch.
        assert!(looks_like(log) && parse(log).is_none());
        assert!(why_unreadable(log).unwrap().contains("disable_tqdm"));
    }

    #[test]
    fn hf_non_finite_gradient_norms_are_listed() {
        let log = " 42%|####1     | 50/120 [00:00<00:00, 102.85it/s]\n                                                 \n{'loss': '2.221', 'grad_norm': '7.372', 'learning_rate': '0.006', 'epoch': '1.719'}\n\n 46%|####5     | 55/120 [00:00<00:00, 102.85it/s]\n 48%|####7     | 57/120 [00:00<00:00, 162.38it/s]\n                                                 \n{'loss': '1.908', 'grad_norm': 'nan', 'learning_rate': '0.005545', 'epoch': '1.875'}\n\n 50%|#####     | 60/120 [00:00<00:00, 162.38it/s]\n                                                 \n{'loss': '0', 'grad_norm': nan, 'learning_rate': '0.005091', 'epoch': '2.031'}\n\n 54%|#####4    | 65/120 [00:00<00:00, 162.38it/s]\n";
        let t = parse(log).unwrap();
        assert_eq!(t.steps.iter().map(|s| s.step).collect::<Vec<_>>(), [55, 60, 65]);
        assert_eq!(t.nonfinite_grad_steps, [60, 65]);
        assert!(t.hf_trainer);
        // tqdm bars are not the Hugging Face Trainer's.
        assert!(!parse(NESTED).unwrap().hf_trainer);
    }
}
