//! A training run's console output as a trace: what a `nohup.out`, a SLURM `.out` file or
//! `python train.py 2>&1 | tee train.log` holds, when the trainer wrote no metrics file.
//!
//! Two shapes are read, and may mix:
//! - **tqdm progress bars with the loss in the postfix**, as SAM3_LoRA prints it
//!   (`Epoch 3:  42%|████▏     | 41/98 [03:10<04:24,  4.64s/it, loss=169]`, one bar per epoch,
//!   `set_postfix` after each batch). Each display is `{desc}: {pct}%|{bar}| {n}/{total}
//!   [{elapsed}<{remaining}, {rate}, {key}={value}, ...]`, and a file keeps every refresh
//!   (separated by `\r`). While batch `i` (0-based) is trained the bar shows `n = i`, and
//!   `set_postfix` redraws it with that batch's loss, so the last display with a given `n` carries
//!   the loss of step `n + 1` of the epoch (a later display with `n + 1` and the old loss is
//!   overwritten by the next batch's). The values are tqdm's 3 significant digits. A bar whose
//!   description names validation, evaluation or testing is not training; a per-epoch line such as
//!   `Epoch 3/100 - Train Loss: 156.1, Val Loss: 17.0` gives a validation point at the end of
//!   that epoch. With `Training samples: N` printed, the batch size is the one that gives the
//!   bar's batches per epoch.
//! - **Printed metric dictionaries**, as the Hugging Face Trainer prints them every
//!   `logging_steps` (`{'loss': 0.52, 'grad_norm': 3.1, 'learning_rate': 4.9e-05, 'epoch': 0.1}`,
//!   values quoted in recent versions; `eval_loss` for evaluations). tqdm's `write` redraws the
//!   bar below each one with its current count, so the step of a dictionary is the `n` of the
//!   next display of the training bar (nested bars, marked by a cursor-up escape, are not it).
//!   Their losses are means over the steps since the previous one.

use crate::metrics::{RunHeader, RunSegment, StepRecord, Trace, TraceFormat};
use std::collections::BTreeMap;

/// One tqdm display.
#[derive(Debug, Clone, PartialEq)]
struct Bar {
    desc: String,
    n: u64,
    total: u64,
    /// `key=value` items after the rate.
    postfix: Vec<(String, String)>,
    /// Drawn below another bar (a cursor-up escape follows it).
    nested: bool,
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
    let pct_bar = s.find("%|")?;
    let desc_and_pct = &s[..pct_bar];
    let pct_start = desc_and_pct.rfind(|c: char| !c.is_ascii_digit() && c != '.').map_or(0, |i| i + 1);
    if pct_start == desc_and_pct.len() {
        return None;
    }
    let desc = desc_and_pct[..pct_start].trim().trim_end_matches(':').trim().to_string();
    let rest = &s[pct_bar + 2..];
    let rest = &rest[rest.find("| ")? + 2..];
    let (counts, bracket) = rest.split_once(" [")?;
    let (n, total) = counts.trim().split_once('/')?;
    let (n, total) = (n.trim().parse().ok()?, total.trim().parse().ok()?);
    let inside = bracket.trim_end().strip_suffix(']')?;
    let postfix = inside
        .split(", ")
        .skip(2)
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    Some(Bar { desc, n, total, postfix, nested })
}

/// A printed Python dict of metrics (`{'loss': 0.5, 'epoch': '1.2'}`), as JSON.
fn parse_dict(segment: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
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

/// Whether `text` looks like console output this module reads: a tqdm bar carrying a loss, or
/// a printed metrics dictionary with one.
pub fn looks_like(text: &str) -> bool {
    segments(text).any(|(s, nested)| {
        parse_bar(&s, nested)
            .is_some_and(|b| b.postfix.iter().any(|(k, _)| k.to_ascii_lowercase().contains("loss")))
            || parse_dict(&s).is_some_and(|d| d.contains_key("loss") || d.contains_key("eval_loss"))
    })
}

/// Read console output (see the module docs); None when it holds no training step.
pub fn parse(text: &str) -> Option<Trace> {
    // Per step: (loss, lr, grad_norm, epoch, from a dictionary).
    let mut steps: BTreeMap<u64, (f64, f64, f64, Option<u32>, bool)> = BTreeMap::new();
    let mut validation: Vec<(u64, f64)> = Vec::new();
    let mut offset = 0u64;
    let mut current: Option<(String, u64)> = None;
    let mut last_n = 0u64;
    let mut per_epoch_total: Option<u64> = None;
    let mut samples: Option<u64> = None;
    let mut pending: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    let place = |pending: &mut Vec<serde_json::Map<String, serde_json::Value>>,
                 at: u64,
                 steps: &mut BTreeMap<u64, (f64, f64, f64, Option<u32>, bool)>,
                 validation: &mut Vec<(u64, f64)>| {
        for d in pending.drain(..) {
            if let Some(l) = value_of(d.get("eval_loss")) {
                validation.push((at, l));
            } else if let (Some(l), false) = (value_of(d.get("loss")), d.contains_key("train_runtime")) {
                let lr = value_of(d.get("learning_rate")).unwrap_or(f64::NAN);
                let gn = value_of(d.get("grad_norm")).unwrap_or(f64::NAN);
                let epoch = value_of(d.get("epoch")).map(|e| e.floor() as u32);
                if at > 0 {
                    steps.insert(at, (l, lr, gn, epoch, true));
                }
            }
        }
    };
    for (s, nested) in segments(text) {
        if let Some(bar) = parse_bar(&s, nested) {
            if bar.nested || is_validation(&bar.desc) {
                continue;
            }
            let key = (bar.desc.clone(), bar.total);
            match &current {
                Some((desc, total)) if (desc, *total) == (&key.0, key.1) && bar.n >= last_n => {}
                Some((_, total)) => {
                    offset += total;
                    current = Some(key);
                }
                None => current = Some(key),
            }
            last_n = bar.n;
            place(&mut pending, offset + bar.n, &mut steps, &mut validation);
            let get = |names: &[&str]| {
                bar.postfix
                    .iter()
                    .find(|(k, _)| names.contains(&k.to_ascii_lowercase().as_str()))
                    .and_then(|(_, v)| crate::metrics::parse_number_text(v))
            };
            let loss = bar
                .postfix
                .iter()
                .find(|(k, _)| {
                    let k = k.to_ascii_lowercase();
                    k.contains("loss") && !is_validation(&k)
                })
                .and_then(|(_, v)| crate::metrics::parse_number_text(v));
            if let (Some(l), true) = (loss, bar.n < bar.total) {
                // (As printed: 1-based in SAM3_LoRA's bars, 0-based in Lightning's; see below.)
                let epoch = epoch_of(&bar.desc);
                if epoch.is_some() {
                    per_epoch_total = Some(bar.total);
                }
                let lr = get(&["lr", "learning_rate"]).unwrap_or(f64::NAN);
                let gn = get(&["grad_norm", "gnorm", "grad"]).unwrap_or(f64::NAN);
                steps.insert(offset + bar.n + 1, (l, lr, gn, epoch, false));
            }
            continue;
        }
        if let Some(d) = parse_dict(&s) {
            pending.push(d);
            continue;
        }
        let lower = s.to_ascii_lowercase();
        if let Some(v) = ["val loss", "val_loss", "validation loss"].iter().find_map(|l| number_after(&s, l))
        {
            if let Some((&at, _)) = steps.last_key_value() {
                validation.push((at, v));
            }
        } else if lower.contains("training samples") {
            samples = number_after(&s, "training samples").map(|n| n as u64);
        }
    }
    place(&mut pending, offset + last_n, &mut steps, &mut validation);
    if steps.is_empty() {
        return None;
    }
    let interval_means = steps.values().any(|v| v.4);
    // Bars count epochs from 1 (SAM3_LoRA: `Epoch {epoch+1}`) unless one says `Epoch 0`
    // (Lightning's); the records count from 0.
    let first_epoch = steps.values().filter(|v| !v.4).filter_map(|v| v.3).min();
    let shift = u32::from(first_epoch.is_some_and(|e| e > 0));
    for v in steps.values_mut().filter(|v| !v.4) {
        v.3 = v.3.map(|e| e.saturating_sub(shift));
    }
    let mut trace = Trace {
        format: TraceFormat::Console,
        loss_is_interval_mean: interval_means,
        validation,
        ..Default::default()
    };
    trace.steps = steps
        .into_iter()
        .map(|(step, (loss, lr, gn, epoch, _))| {
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
}
