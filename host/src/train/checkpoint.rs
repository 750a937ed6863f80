//! Training checkpoints: `<output_dir>/checkpoints/step-NNNNNNNN/` holds the adapters in PEFT's
//! format, the optimizer moments, `trainer_state.json` (step, epoch, position in the epoch's
//! order, the order itself, per-sample statistics, LR scale, best metric, plugin snapshots) and
//! `config.yaml`, the settings the checkpoint was trained with.
//! A checkpoint is written into a hidden `.partial` directory and renamed into place when
//! complete, so a crash mid-save leaves every earlier checkpoint intact; leftovers of such a
//! crash are removed at the next start.

use crate::fsutil::write_atomic;
use crate::lora::LoraSet;
use crate::train::optim::AdamW;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Optimizer moments file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file.
pub const STATE_FILE: &str = "trainer_state.json";
/// The record of the run's settings (in the output directory and in each checkpoint).
pub const CONFIG_RECORD: &str = "config.yaml";
/// Version of the state format.
pub const STATE_FORMAT: u32 = 1;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file problem.
    #[error("{path}: {reason}")]
    File {
        /// File or directory.
        path: PathBuf,
        /// What went wrong (and the fix).
        reason: String,
    },
}

fn file_err(path: &Path, reason: impl ToString) -> CheckpointError {
    CheckpointError::File { path: path.into(), reason: reason.to_string() }
}

/// The best validation result so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Best {
    /// The selection metric (`loss`, `map`, `cgf1`).
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// The optimizer step it was measured at.
    pub step: u64,
    /// The validation loss then: it decides between equal values of another metric (absent in
    /// checkpoints written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: u32,
    /// Micro-batches of that epoch already consumed.
    pub micro_in_epoch: u64,
    /// The epoch's visit order.
    pub epoch_order: Vec<u32>,
    /// Updates the optimizer applied (skipped steps apply none).
    pub optimizer_updates: u64,
    /// Product of plugin `scale-lr` actions so far.
    pub lr_scale: f64,
    /// fp16 loss scale.
    pub loss_scale: f64,
    /// Good steps since the loss scale last changed.
    pub loss_scale_good_steps: u64,
    /// Steps skipped (non-finite, veto, plugin skip).
    pub skipped_steps: u64,
    /// Loss of the last step (for the LR hook).
    pub last_loss: Option<f64>,
    /// Per training sample: last loss and times seen.
    pub sample_stats: Vec<(Option<f64>, u32)>,
    /// Best validation result.
    pub best: Option<Best>,
    /// Plugin snapshots by plugin name (hex).
    pub plugin_states: BTreeMap<String, String>,
    /// The run's seed.
    pub seed: u64,
    /// sha-256 of the training annotation file (a resume on other data is refused).
    pub train_sha256: String,
    /// `training.batch_size` of the run (the epoch position counts micro-batches of this size).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// `training.gradient_accumulation_steps` of the run.
    #[serde(default)]
    pub accumulation: Option<usize>,
}

/// Give a file the permissions of any other file lorahost creates: 0o666 less the umask
/// (0644 under the usual 022). candle writes `.safetensors` through a private temporary file
/// (mode 0600), which would keep checkpoints, adapters and merged models from teammates.
/// Nothing to do off unix.
pub fn set_created_permissions(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// The process umask, from `/proc/self/status` (reading it with umask(2) would change it for
/// a moment under other threads); 022 where that is not available.
#[cfg(unix)]
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
            })
            .map_or(0o022, |m| m & 0o777)
    })
}

/// Directory of step `step`'s checkpoint.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Completed checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    step_dirs(root).into_iter().filter(|(_, d)| d.join(STATE_FILE).is_file()).collect()
}

/// Every `step-N` directory under `root`, by step.
fn step_dirs(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The `step-N` directories under `root` that hold no [`STATE_FILE`] (a save that did not
/// finish, or a damaged checkpoint), by step.
pub fn incomplete(root: &Path) -> Vec<(u64, PathBuf)> {
    step_dirs(root).into_iter().filter(|(_, d)| !d.join(STATE_FILE).is_file()).collect()
}

/// Remove leftovers of interrupted saves (hidden `.partial` / `.old` directories).
pub fn clean_partials(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with('.') {
            continue;
        }
        // `.<name>.<pid>.old` is a complete directory moved aside by [`replace_dir`]. If the
        // process died before its replacement was renamed into place, it is the only copy:
        // put it back instead of deleting it.
        if let Some(target) = name.strip_suffix(".old").and_then(|n| n[1..].rsplit_once('.')).map(|(t, _)| t)
        {
            let dst = root.join(target);
            if !target.is_empty() && !dst.exists() && std::fs::rename(e.path(), &dst).is_ok() {
                tracing::warn!(
                    "restored {} from {} (an interrupted replacement)",
                    dst.display(),
                    e.path().display()
                );
                continue;
            }
        }
        if (name.contains(".partial") || name.ends_with(".old")) && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

/// Replace directory `dst` with the complete directory `src` (both on one filesystem): the old
/// one is moved aside first and removed only after the new one is in place.
pub fn replace_dir(src: &Path, dst: &Path) -> Result<(), CheckpointError> {
    let old = dst.with_file_name(format!(
        ".{}.{}.old",
        dst.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        std::process::id()
    ));
    let had = dst.exists();
    if had {
        std::fs::rename(dst, &old).map_err(|e| file_err(dst, e))?;
    }
    std::fs::rename(src, dst).map_err(|e| file_err(dst, e))?;
    if had {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// A hidden scratch directory next to `dst` for building it.
pub fn partial_dir(dst: &Path) -> PathBuf {
    dst.with_file_name(format!(
        ".{}.partial-{}",
        dst.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        std::process::id()
    ))
}

/// Test hook: `LORAHOST_TEST_CRASH_DURING_SAVE=<stage>[:<n>]` aborts the process half-way
/// through the n-th save (default the first) at `stage` (`adapters` or `state`), which is what a
/// kill at the worst moment leaves behind.
fn maybe_crash(stage: &str) {
    static SAVES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(v) = std::env::var("LORAHOST_TEST_CRASH_DURING_SAVE") else { return };
    let (want, nth) = v.split_once(':').map_or((v.as_str(), 1), |(s, n)| (s, n.parse().unwrap_or(1)));
    if want != stage {
        return;
    }
    let count = SAVES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if count == nth {
        eprintln!("LORAHOST_TEST_CRASH_DURING_SAVE={v}: aborting mid-save");
        std::process::abort();
    }
}

/// Write a checkpoint for `state.step` under `root` atomically (see the module docs).
pub fn save(
    root: &Path,
    lora: &LoraSet,
    base_model: &str,
    opt: &AdamW,
    state: &TrainerState,
    config_record: &str,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(root).map_err(|e| file_err(root, e))?;
    let dst = step_dir(root, state.step);
    let tmp = partial_dir(&dst);
    let _ = std::fs::remove_dir_all(&tmp);
    lora.save_peft(&tmp, base_model).map_err(|e| file_err(&tmp, e))?;
    maybe_crash("adapters");
    let mut tensors = HashMap::new();
    for (k, t) in opt.state_tensors() {
        tensors.insert(k, t.to_device(&Device::Cpu).map_err(|e| file_err(&tmp, e))?);
    }
    let opt_path = tmp.join(OPTIMIZER_FILE);
    candle_core::safetensors::save(&tensors, &opt_path).map_err(|e| file_err(&opt_path, e))?;
    set_created_permissions(&opt_path).map_err(|e| file_err(&opt_path, e))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| file_err(&tmp, e))?;
    write_atomic(&tmp.join(STATE_FILE), &json).map_err(|e| file_err(&tmp.join(STATE_FILE), e))?;
    let cfg_path = tmp.join(CONFIG_RECORD);
    write_atomic(&cfg_path, config_record.as_bytes()).map_err(|e| file_err(&cfg_path, e))?;
    maybe_crash("state");
    replace_dir(&tmp, &dst)?;
    Ok(dst)
}

/// Read a checkpoint's state and optimizer tensors (adapters are loaded by the caller).
pub fn load(dir: &Path) -> Result<(TrainerState, HashMap<String, Tensor>), CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(|e| {
        // A run folder or its checkpoints/ folder: name the newest checkpoint in it.
        let newest = [dir.join("checkpoints"), dir.to_path_buf()]
            .iter()
            .find_map(|root| list(root).pop())
            .map(|(_, p)| format!(" (the newest here is {}; or give --resume alone for it)", p.display()))
            .unwrap_or_default();
        file_err(
            &state_path,
            format!("{e}; point --resume at a checkpoint directory (checkpoints/step-*){newest}"),
        )
    })?;
    let damaged = |what: String| {
        let older = list(dir.parent().unwrap_or(Path::new(".")))
            .into_iter()
            .rev()
            .find(|(_, p)| p.as_path() != dir)
            .map(|(_, p)| format!("--resume {} (another checkpoint of the run) or ", p.display()))
            .unwrap_or_default();
        format!("{what}: this checkpoint is damaged; resume from {older}start a new run")
    };
    let state: TrainerState =
        serde_json::from_slice(&text).map_err(|e| file_err(&state_path, damaged(e.to_string())))?;
    if state.format != STATE_FORMAT {
        return Err(file_err(
            &state_path,
            format!("state format {} (this lorahost reads {STATE_FORMAT})", state.format),
        ));
    }
    let opt_path = dir.join(OPTIMIZER_FILE);
    let tensors = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .map_err(|e| file_err(&opt_path, damaged(format!("not a readable safetensors file: {e}"))))?;
    Ok((state, tensors))
}

/// Delete the oldest checkpoints beyond `limit` (0 keeps all), never the newest (where a resume
/// continues) nor the one at `keep_step` (the best): with both kept, `limit` 1 leaves two.
/// Returns the removed directories.
pub fn prune(root: &Path, limit: usize, keep_step: Option<u64>) -> Vec<PathBuf> {
    if limit == 0 {
        return Vec::new();
    }
    let all = list(root);
    // The newest checkpoint is where a resume continues: never pruned, like the best.
    let newest = all.last().map(|(s, _)| *s);
    let mut removable: Vec<&(u64, PathBuf)> =
        all.iter().filter(|(s, _)| Some(*s) != keep_step && Some(*s) != newest).collect();
    let kept = all.len() - removable.len();
    let mut removed = Vec::new();
    while removable.len() + kept > limit && !removable.is_empty() {
        let (_, p) = removable.remove(0);
        if std::fs::remove_dir_all(p).is_ok() {
            removed.push(p.clone());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of a checkpoint (adapters, optimizer moments, state) has the mode of a file
    /// lorahost creates (0644 under umask 022), not candle's private 0600 for `.safetensors`.
    #[cfg(unix)]
    #[test]
    fn checkpoint_files_are_readable_like_the_json_beside_them() {
        use crate::lora::{Component, LoraConfig};
        use std::os::unix::fs::PermissionsExt;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam3/tiny_a");
        let mut model =
            crate::sam3::model::Sam3Model::load_dir(&fixture, &Device::Cpu, candle_core::DType::F32).unwrap();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into()],
            components: vec![Component::DetrDecoder],
            use_rslora: false,
        };
        let lora = LoraSet::attach(&mut model, &cfg, &Device::Cpu).unwrap();
        let vars = lora.vars().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let opt = AdamW::new(
            vars,
            crate::train::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        )
        .unwrap();
        let state = TrainerState {
            format: STATE_FORMAT,
            step: 3,
            epoch: 0,
            micro_in_epoch: 3,
            epoch_order: vec![0, 1, 2],
            optimizer_updates: 3,
            lr_scale: 1.0,
            loss_scale: 1.0,
            loss_scale_good_steps: 0,
            skipped_steps: 0,
            last_loss: None,
            sample_stats: Vec::new(),
            best: None,
            plugin_states: BTreeMap::new(),
            seed: 0,
            train_sha256: String::new(),
            batch_size: None,
            accumulation: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let ckpt = save(dir.path(), &lora, "tiny", &opt, &state, "model: {}\n").unwrap();
        let mode = |f: &str| std::fs::metadata(ckpt.join(f)).unwrap().permissions().mode() & 0o777;
        std::fs::write(dir.path().join("probe"), b"x").unwrap();
        let want = std::fs::metadata(dir.path().join("probe")).unwrap().permissions().mode() & 0o777;
        for f in [crate::lora::ADAPTER_WEIGHTS, OPTIMIZER_FILE, STATE_FILE] {
            assert_eq!(mode(f), want, "{f}: {:o}, a created file gets {want:o}", mode(f));
        }
    }

    /// Pruning keeps the newest (resume point) and the best besides the limit's newest others.
    #[test]
    fn prune_keeps_the_newest_and_the_best() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for step in 1..=5u64 {
            let d = root.join(format!("step-{step:08}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(STATE_FILE), "{}").unwrap();
        }
        let steps = || list(root).into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(prune(root, 0, Some(2)).len(), 0);
        assert_eq!(prune(root, 1, Some(2)).len(), 3);
        assert_eq!(steps(), [2, 5]);
        let d = root.join("step-00000006");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(STATE_FILE), "{}").unwrap();
        // Limit 2 with the best kept: the best and the newest.
        prune(root, 2, Some(2));
        assert_eq!(steps(), [2, 6]);
        // No best: the newest `limit`.
        prune(root, 1, None);
        assert_eq!(steps(), [6]);
    }

    /// A kill between the two renames of `replace_dir` leaves only the moved-aside copy: the
    /// next start puts it back. Scratch directories are removed, and an `.old` whose target
    /// exists is a leftover.
    #[test]
    fn an_interrupted_replacement_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".best.4242.old")).unwrap();
        std::fs::write(root.join(".best.4242.old/adapter_model.safetensors"), b"weights").unwrap();
        std::fs::create_dir_all(root.join(".best.partial-4242")).unwrap();
        std::fs::create_dir_all(root.join("adapter")).unwrap();
        std::fs::create_dir_all(root.join(".adapter.17.old")).unwrap();
        let removed = clean_partials(root);
        assert_eq!(std::fs::read(root.join("best/adapter_model.safetensors")).unwrap(), b"weights");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!root.join(".adapter.17.old").exists() && root.join("adapter").exists());
    }
}
