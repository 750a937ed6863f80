//! `lorahost export --merge`: fold trained adapters into the base weights
//! (`W' = W + (alpha / r) · B A` for every adapted linear layer) and write a transformers-format
//! model directory (`model.safetensors`, `config.json`, the tokenizer files) that loads without
//! PEFT. A new directory is built aside and renamed into place when complete; an existing one
//! (empty, or an earlier export being overwritten) is written into file by file (see
//! [`Target`]).

use crate::lora::LoraSet;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Written beside a merged model's weights: which adapters are merged in (and which files the
/// export wrote).
pub const MERGED_RECORD: &str = "lorahost_merged.json";

/// The weights file of a merged model.
const MERGED_WEIGHTS: &str = "model.safetensors";

/// Hidden entries an export makes inside an existing `--out` while it works: the files being
/// built, and an earlier export's files set aside until the new ones are in place.
const SCRATCH_PREFIX: &str = ".lorahost-export-partial-";
const ASIDE_PREFIX: &str = ".lorahost-export-old-";

/// A warning when `model_dir` is a merged model (its adapters already in the weights) and
/// `adapter` is about to be applied on top of it.
pub fn warn_if_merged(model_dir: &Path, adapter: &Path) {
    if model_dir.join(MERGED_RECORD).is_file() {
        tracing::warn!(
            "{} already has adapters merged into its weights ({}); {} is applied on top of them: that is right only for adapters trained on this merged model (to evaluate the merged adapters, leave --adapter out)",
            model_dir.display(),
            MERGED_RECORD,
            adapter.display()
        );
    }
}

/// The metadata files of the model directory `model_dir` a merged export copies beside its
/// weights (config, tokenizer, processor: `.json`, `.txt`, `.model`; not a shard index or an
/// adapter's files).
fn meta_files(model_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(model_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            p.is_file()
                && p.extension().is_some_and(|x| x == "json" || x == "txt" || x == "model")
                && name != "model.safetensors.index.json"
                && name != MERGED_RECORD
                && !name.starts_with("adapter_")
        })
        .collect();
    out.sort();
    out
}

/// The weights of `model_dir` with `lora` merged in, and how many adapters were merged.
fn merged_tensors(model_dir: &Path, lora: &LoraSet) -> Result<(HashMap<String, Tensor>, usize)> {
    if !model_dir.is_dir() {
        bail!(
            "{}: merging needs a transformers-format model directory (config.json + safetensors); convert sam3.pt first or keep the adapter",
            model_dir.display()
        );
    }
    // The weight files the model loader reads (other .safetensors beside them are not the
    // model's).
    let files = crate::sam3::weights::weight_files(model_dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        tensors.extend(
            candle_core::safetensors::load(f, &Device::Cpu)
                .with_context(|| format!("reading {}", f.display()))?,
        );
    }
    let vars = lora.vars();
    let scale = lora.config.scale();
    let mut merged = 0;
    for (path, _, _, _) in &lora.modules {
        let key = format!("base_model.model.{path}");
        let (Some(a), Some(b)) =
            (vars.get(&format!("{key}.lora_A.weight")), vars.get(&format!("{key}.lora_B.weight")))
        else {
            bail!("adapter for {path} is incomplete");
        };
        // The module's own weight: its key, or under Sam3VideoModel's `detector_model.` (never
        // a mere suffix match: `text_projection.weight` ends `text_encoder.text_projection.weight`
        // too).
        let want = format!("{path}.weight");
        let Some(k) =
            [want.clone(), format!("detector_model.{want}")].into_iter().find(|k| tensors.contains_key(k))
        else {
            bail!("{}: no tensor `{want}` to merge the adapter into", model_dir.display());
        };
        let w = &tensors[&k];
        let delta =
            (b.as_tensor().to_device(&Device::Cpu)?.matmul(&a.as_tensor().to_device(&Device::Cpu)?)?
                * scale)?;
        if delta.dims() != w.dims() {
            bail!("{k}: weight {:?} but adapter product {:?}", w.dims(), delta.dims());
        }
        let dt = w.dtype();
        let new = (w.to_dtype(DType::F32)? + delta)?.to_dtype(dt)?;
        // Finite factors can still overflow (a huge product, or the sum out of an f16 range):
        // no model with NaN/Inf weights is written.
        let finite = new.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
        if !finite {
            bail!(
                "{k}: merging the adapter gives NaN/Inf weights ({dt:?}); the adapter is out of range for this model: use an earlier checkpoint's adapter (output_dir/checkpoints/step-N/adapter)"
            );
        }
        tensors.insert(k, new);
        merged += 1;
    }
    Ok((tensors, merged))
}

/// Write the merged model (`tensors`, the metadata files of `model_dir` and the
/// [`MERGED_RECORD`]) into the directory `dir` (a scratch directory: the files are written in
/// place).
fn write_merged_files(
    model_dir: &Path,
    lora: &LoraSet,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights = dir.join(MERGED_WEIGHTS);
    candle_core::safetensors::save(tensors, &weights)
        .with_context(|| format!("cannot write {}", weights.display()))?;
    crate::train::checkpoint::set_created_permissions(&weights)
        .with_context(|| format!("cannot set the permissions of {}", weights.display()))?;
    let mut files = vec![MERGED_WEIGHTS.to_string(), MERGED_RECORD.to_string()];
    for p in meta_files(model_dir) {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        std::fs::copy(&p, dir.join(&name))
            .with_context(|| format!("cannot copy {} to {}", p.display(), dir.join(&name).display()))?;
        files.push(name);
    }
    files.sort();
    // A record that adapters are merged in, so applying them again can be warned about.
    let record = serde_json::json!({
        "merged_by": format!("lorahost {}", env!("CARGO_PKG_VERSION")),
        "base_model": model_dir,
        "lora": lora.peft_config(&model_dir.display().to_string()),
        "files": files,
    });
    crate::fsutil::write_atomic(&dir.join(MERGED_RECORD), serde_json::to_string_pretty(&record)?.as_bytes())?;
    Ok(())
}

/// Merge `lora` into the weights of the transformers model directory `model_dir` and write the
/// result to `out`, replacing an older `out` as a whole once the new one is complete (a run's
/// own `merged/`; `lorahost export` goes through [`check_target`] instead).
pub fn write_merged(model_dir: &Path, lora: &LoraSet, out: &Path) -> Result<()> {
    let (tensors, merged) = merged_tensors(model_dir, lora)?;
    let tmp = crate::train::checkpoint::partial_dir(out);
    let _ = std::fs::remove_dir_all(&tmp);
    let written = write_merged_files(model_dir, lora, &tensors, &tmp)
        .and_then(|()| crate::train::checkpoint::replace_dir(&tmp, out).map_err(anyhow::Error::from));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    tracing::info!("merged {merged} adapters into {}", out.display());
    Ok(())
}

/// Where an export goes, as [`check_target`] found it: the directory `--out` names (a link
/// followed to the directory it points to, which is written into and the link kept), whether it
/// exists, and the files of an earlier export in it that `--overwrite` replaces.
///
/// A directory that does not exist yet is built aside (a hidden sibling) and renamed into place
/// when complete. One that exists (empty, or an earlier export) is never renamed (it may be a
/// mount point, or in a folder that cannot be written): the files are built in a hidden
/// directory inside it and then renamed into it one by one, the earlier export's files set
/// aside first and removed only once all new ones are in place. On any failure the partial
/// copy is removed and what was there before is put back.
#[derive(Debug)]
pub struct Target {
    /// `--out` as given (for messages).
    out: PathBuf,
    /// The directory written.
    dir: PathBuf,
    exists: bool,
    /// The earlier export's files in `dir` (replaced).
    previous: Vec<String>,
}

impl Target {
    /// The directory the export is written to (`--out`, a link followed).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Build the export with `build` (which writes its files into the directory it is given)
    /// and put it in place.
    pub fn install(&self, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let fix = "check that it can be written, or choose another --out";
        if !self.exists {
            let scratch = crate::train::checkpoint::partial_dir(&self.dir);
            let _ = std::fs::remove_dir_all(&scratch);
            let built = std::fs::create_dir_all(&scratch)
                .map_err(|e| {
                    io_error(
                        e,
                        format!("cannot create {} to build --out {}", scratch.display(), self.out.display()),
                        fix,
                    )
                })
                .and_then(|()| build(&scratch))
                .and_then(|()| {
                    std::fs::rename(&scratch, &self.dir).map_err(|e| {
                        io_error(
                            e,
                            format!(
                                "cannot move the finished export {} to {}",
                                scratch.display(),
                                self.dir.display()
                            ),
                            &format!("nothing was written there; {fix}"),
                        )
                    })
                });
            if built.is_err() {
                let _ = std::fs::remove_dir_all(&scratch);
            }
            return built;
        }
        let pid = std::process::id();
        let scratch = self.dir.join(format!("{SCRATCH_PREFIX}{pid}"));
        let _ = std::fs::remove_dir_all(&scratch);
        let built = std::fs::create_dir(&scratch)
            .map_err(|e| {
                io_error(
                    e,
                    format!("cannot create {} in --out {}", scratch.display(), self.out.display()),
                    fix,
                )
            })
            .and_then(|()| build(&scratch));
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        let result = self.move_in(&scratch, &self.dir.join(format!("{ASIDE_PREFIX}{pid}")));
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// Rename the files built in `scratch` into the target, the earlier export's files first
    /// set aside in `aside` (and put back on failure).
    fn move_in(&self, scratch: &Path, aside: &Path) -> Result<()> {
        let mut new: Vec<String> = std::fs::read_dir(scratch)
            .with_context(|| format!("cannot read {}", scratch.display()))?
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        new.sort();
        let rename = |from: &Path, to: &Path| {
            std::fs::rename(from, to)
                .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
        };
        let mut set_aside: Vec<&String> = Vec::new();
        let mut moved_in: Vec<&String> = Vec::new();
        let mut step = || -> Result<()> {
            if !self.previous.is_empty() {
                std::fs::create_dir(aside).with_context(|| format!("cannot create {}", aside.display()))?;
            }
            for f in &self.previous {
                rename(&self.dir.join(f), &aside.join(f))?;
                set_aside.push(f);
            }
            for f in &new {
                rename(&scratch.join(f), &self.dir.join(f))?;
                moved_in.push(f);
            }
            Ok(())
        };
        let result = step();
        let Err(e) = result else {
            let _ = std::fs::remove_dir_all(aside);
            return Ok(());
        };
        // Undo: the new files out, the earlier ones back.
        for f in moved_in {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        let not_restored: Vec<&String> = set_aside
            .into_iter()
            .filter(|f| std::fs::rename(aside.join(f), self.dir.join(f)).is_err())
            .collect();
        if not_restored.is_empty() {
            let _ = std::fs::remove_dir_all(aside);
            Err(anyhow::anyhow!(
                "{e:#}; the export was not written to --out {} (what was there is as it was): check that it can be written, or choose another --out",
                self.out.display()
            ))
        } else {
            Err(anyhow::anyhow!(
                "{e:#}; the export was not written to --out {}; the earlier export's files {} could not be put back and are in {}: move them back by hand",
                self.out.display(),
                not_restored.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                aside.display()
            ))
        }
    }
}

/// What an interrupted export (a process no longer running) left inside `dir`: a scratch
/// directory is removed, an earlier export's files set aside are put back where nothing has
/// taken their place (then the rest removed). Errors are ignored (the check that follows names
/// what is left).
fn clean_interrupted(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // Another export at work in this directory now: its files are left alone (and named
        // by the check that follows).
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists()) {
            continue;
        }
        if name.starts_with(ASIDE_PREFIX) {
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let back = dir.join(f.file_name());
                if !back.exists() && std::fs::rename(f.path(), &back).is_ok() {
                    tracing::warn!("restored {} (set aside by an interrupted export)", back.display());
                }
            }
            let _ = std::fs::remove_dir_all(e.path());
        } else if name.starts_with(SCRATCH_PREFIX) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The names an earlier export in a directory holding `names` wrote (an adapter export:
/// `adapter_config.json` + `adapter_model.safetensors`; a merged export: `model.safetensors`
/// with lorahost's [`MERGED_RECORD`] or a `config.json`, and the metadata files it copies, as
/// its record lists them or as its base model or `base_model` holds them), or `None` when it
/// is no export.
fn export_files(dir: &Path, names: &BTreeSet<String>, base_model: Option<&Path>) -> Option<BTreeSet<String>> {
    let has = |n: &str| names.contains(n) && dir.join(n).is_file();
    let mut own = BTreeSet::new();
    if has(crate::lora::ADAPTER_CONFIG) && has(crate::lora::ADAPTER_WEIGHTS) {
        own.extend([crate::lora::ADAPTER_CONFIG.to_string(), crate::lora::ADAPTER_WEIGHTS.to_string()]);
    }
    if has(MERGED_WEIGHTS) && (has(MERGED_RECORD) || has("config.json")) {
        own.extend([MERGED_WEIGHTS.to_string(), MERGED_RECORD.to_string(), "config.json".to_string()]);
        let record: serde_json::Value = std::fs::read(dir.join(MERGED_RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        own.extend(
            record["files"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).map(String::from),
        );
        let recorded_base = record["base_model"].as_str().map(PathBuf::from);
        for base in recorded_base.as_deref().into_iter().chain(base_model) {
            own.extend(
                meta_files(base)
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().to_string()),
            );
        }
    }
    // Only regular files are an export's.
    own.retain(|n| names.contains(n) && dir.join(n).is_file());
    (!own.is_empty()).then_some(own)
}

/// An IO error as "what: error; fix".
fn io_error(e: std::io::Error, what: String, fix: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {e}; {fix}")
}

/// A list of names for a message: the first six, then how many more.
fn name_list(names: &[String]) -> String {
    let mut s = names.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 6 {
        s.push_str(&format!(" and {} more", names.len() - 6));
    }
    s
}

/// Check `--out` before an export and say where it goes ([`Target`]); refuse it when writing
/// there would lose something. Absent: built aside and renamed into place. A link is followed
/// to its directory (which is written into; the link stays). An existing directory is written
/// into: an empty one as it is; one holding an earlier export (see [`export_files`];
/// `base_model` is the model a merged export copies its metadata from) only with `overwrite`
/// (`--overwrite`), which replaces exactly that export's files, and the files are named
/// otherwise. Always refused, `--overwrite` or not: a file; a directory that is or contains one
/// of `protected` (the adapter being exported, the base model); a directory holding anything
/// that is not an earlier export's file (named). A directory that cannot be written is named
/// before any work is done.
pub fn check_target(
    out: &Path,
    protected: &[&Path],
    base_model: Option<&Path>,
    overwrite: bool,
) -> Result<Target> {
    let fix = "choose a new --out directory (or move those files away yourself)";
    let is_link = out.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink());
    if is_link && !out.exists() {
        let to = std::fs::read_link(out).map(|p| p.display().to_string()).unwrap_or_default();
        bail!(
            "--out {} is a link to {to}, which does not exist: create that directory first, or choose another --out",
            out.display()
        );
    }
    if !out.exists() {
        // Can it be built beside where it goes? (Creates the parent, as the export would.)
        let scratch = crate::train::checkpoint::partial_dir(out);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| {
            io_error(
                e,
                format!("cannot create {} to build --out {}", scratch.display(), out.display()),
                "choose another --out",
            )
        })?;
        let _ = std::fs::remove_dir(&scratch);
        return Ok(Target {
            out: out.to_path_buf(),
            dir: out.to_path_buf(),
            exists: false,
            previous: vec![],
        });
    }
    if !out.is_dir() {
        bail!("--out {} is an existing file, not a directory: choose a new --out directory", out.display());
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // A link is written through: the directory it points to, the link kept.
    let dir = if is_link { canon(out) } else { out.to_path_buf() };
    let out_c = canon(out);
    for p in protected {
        if canon(p).starts_with(&out_c) {
            bail!(
                "--out {} is or contains {}, which this export reads: writing there would replace it; choose a new --out directory",
                out.display(),
                p.display()
            );
        }
    }
    clean_interrupted(&dir);
    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read --out {}", out.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    let own = export_files(&dir, &names, base_model);
    let foreign: Vec<String> =
        names.iter().filter(|n| !own.as_ref().is_some_and(|o| o.contains(*n))).cloned().collect();
    if !foreign.is_empty() {
        if own.is_some() {
            bail!(
                "--out {} holds an earlier export and other files ({}): an export replaces only its own files, even with --overwrite, and would mix with these; {fix}",
                out.display(),
                name_list(&foreign)
            );
        }
        bail!(
            "--out {} already holds files that are not an earlier export ({}): nothing of them is replaced, even with --overwrite; {fix}",
            out.display(),
            name_list(&foreign)
        );
    }
    let previous: Vec<String> = own.into_iter().flatten().collect();
    if !previous.is_empty() && !overwrite {
        bail!(
            "--out {} already holds {} (an earlier export): pass --overwrite to replace them, or choose a new --out directory",
            out.display(),
            name_list(&previous)
        );
    }
    // Can it be written? (Before the model is loaded and merged, not after.)
    let probe = dir.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&probe);
    std::fs::create_dir(&probe).map_err(|e| {
        io_error(
            e,
            format!("cannot write in --out {} (creating {})", out.display(), probe.display()),
            "make it writable, or choose another --out",
        )
    })?;
    let _ = std::fs::remove_dir(&probe);
    Ok(Target { out: out.to_path_buf(), dir, exists: true, previous })
}

/// `lorahost export`: load the base model of `config`, attach the adapter folder's own LoRA
/// layout (rank, alpha and modules from the folder; a `lora:` section that differs is warned
/// about), load it strictly, and write either the merged model (`merge`) or a checked copy of
/// the adapter. An `--out` holding an earlier export is replaced only with `overwrite`, and one
/// holding anything else never (see [`check_target`]).
pub fn export(config: &Path, adapter: &Path, merge: bool, out: &Path, overwrite: bool) -> Result<()> {
    let cfg = crate::train::load_config(config, &[])?;
    let model_path = crate::train::resolve_model(&cfg)?;
    let target = check_target(out, &[adapter, &model_path], Some(&model_path), overwrite)?;
    let mut model = crate::sam3::model::Sam3Model::load_dir(&model_path, &Device::Cpu, DType::F32)?;
    warn_if_merged(&model_path, adapter);
    let lora = LoraSet::attach_peft_for_config(
        &mut model,
        adapter,
        &Device::Cpu,
        &crate::lora::LoraConfig::from_section(&cfg.lora),
        &config.display().to_string(),
    )
    .with_context(|| format!("loading {}", adapter.display()))?;
    let shown = if target.dir() == out {
        out.display().to_string()
    } else {
        format!("{} ({})", out.display(), target.dir().display())
    };
    if merge {
        let (tensors, merged) = merged_tensors(&model_path, &lora)?;
        target.install(|dir| write_merged_files(&model_path, &lora, &tensors, dir))?;
        tracing::info!("merged {merged} adapters into {shown}");
        println!("merged {} adapters into {shown}", lora.modules.len());
    } else {
        // The adapter's own config, as it was: it is what these weights mean in PEFT (its
        // dropout, base model name and options), which a regenerated one could change.
        let config_path = adapter.join(crate::lora::ADAPTER_CONFIG);
        let original =
            std::fs::read(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
        target.install(|dir| {
            lora.save_peft(dir, &cfg.model.name)?;
            crate::fsutil::write_atomic(&dir.join(crate::lora::ADAPTER_CONFIG), &original)?;
            Ok(())
        })?;
        println!("adapter ({} modules) checked and written to {shown}", lora.modules.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny fixture model (tests/fixtures/sam3/tiny_a) and one rank-2 adapter on its
    /// `text_projection`, on the CPU.
    fn text_projection_adapter() -> (std::path::PathBuf, LoraSet, Device) {
        use crate::lora::{Component, LoraConfig};
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam3/tiny_a");
        let dev = Device::Cpu;
        let mut model = crate::sam3::model::Sam3Model::load_dir(&fixture, &dev, DType::F32).unwrap();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["text_projection".into()],
            components: vec![Component::Text],
            use_rslora: false,
        };
        let lora = LoraSet::attach(&mut model, &cfg, &dev).unwrap();
        (fixture, lora, dev)
    }

    /// The merge changes the adapted module's own weight, never another tensor whose key merely
    /// ends the same (`text_encoder.text_projection.weight` vs `text_projection.weight`), reads
    /// only the model's weight files (not other .safetensors beside them) and records itself.
    #[test]
    fn merge_targets_the_exact_weight_and_only_the_model_files() {
        let (fixture, lora, dev) = text_projection_adapter();
        assert_eq!(lora.modules.len(), 1);
        for v in lora.vars().values() {
            v.set(&Tensor::randn(0f32, 1.0, v.dims(), &dev).unwrap()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        // Several times: a map's iteration order must not decide.
        for _ in 0..4 {
            write_merged(&fixture, &lora, &out).unwrap();
            let before = candle_core::safetensors::load(fixture.join("model.safetensors"), &dev).unwrap();
            let after = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
            let changed: Vec<&String> = before
                .iter()
                .filter(|(k, t)| {
                    let d = (*t - &after[*k]).unwrap().abs().unwrap().max_all().unwrap();
                    d.to_scalar::<f32>().unwrap() > 0.0
                })
                .map(|(k, _)| k)
                .collect();
            assert_eq!(changed, ["text_projection.weight"]);
            assert_eq!(after.len(), before.len(), "the fixture's inputs/outputs files are not weights");
            assert!(out.join(MERGED_RECORD).is_file());
            // As readable as the JSON files beside it (not candle's private 0600).
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode("model.safetensors"), mode(MERGED_RECORD));
            }
        }
    }

    /// Finite factors whose merged weight overflows (to Inf in f32) write no model: the merge
    /// names the weight.
    #[test]
    fn a_merge_that_overflows_writes_nothing() {
        let (fixture, lora, dev) = text_projection_adapter();
        for v in lora.vars().values() {
            v.set(&Tensor::full(1e30f32, v.dims(), &dev).unwrap()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        let e = write_merged(&fixture, &lora, &out).unwrap_err().to_string();
        assert!(e.contains("text_projection.weight") && e.contains("NaN/Inf"), "{e}");
        assert!(!out.exists());
    }

    /// `--out` is written only when nothing would be lost: absent, empty, or an earlier
    /// export's own files (with --overwrite); a file, files that are no export's (even with
    /// --overwrite, and even beside an export), a subdirectory, or the adapter's own directory
    /// are refused, naming the files and the fix.
    #[test]
    fn export_target_is_refused_when_replacing_it_would_lose_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let adapter = d.join("run/best");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
        let base = d.join("base");
        std::fs::create_dir_all(&base).unwrap();
        for f in ["config.json", "merges.txt", "model.safetensors", "model.safetensors.index.json"] {
            std::fs::write(base.join(f), "x").unwrap();
        }
        let check = |out: &Path, overwrite| check_target(out, &[&adapter], Some(&base), overwrite);
        for overwrite in [false, true] {
            assert!(!check(&d.join("new"), overwrite).unwrap().exists);
            std::fs::create_dir_all(d.join("empty")).unwrap();
            assert!(check(&d.join("empty"), overwrite).unwrap().previous.is_empty());
        }
        // An earlier adapter export, and an earlier merged export (its metadata as the base
        // model holds it), are replaced only when asked, and named otherwise.
        let adapter_export = d.join("adapter-export");
        let merged_export = d.join("merged-export");
        std::fs::create_dir_all(&adapter_export).unwrap();
        std::fs::create_dir_all(&merged_export).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::write(adapter_export.join(f), "x").unwrap();
        }
        for f in ["model.safetensors", MERGED_RECORD, "config.json", "merges.txt"] {
            std::fs::write(merged_export.join(f), "{}").unwrap();
        }
        for (out, names) in [
            (&adapter_export, "adapter_config.json, adapter_model.safetensors"),
            (&merged_export, "config.json, lorahost_merged.json, merges.txt, model.safetensors"),
        ] {
            let e = check(out, false).unwrap_err().to_string();
            assert!(e.contains(names) && e.contains("--overwrite"), "{e}");
            let t = check(out, true).unwrap();
            assert_eq!(t.previous.join(", "), names);
        }
        // Files of the user's that look like metadata (a labels folder) are no export.
        let labels = d.join("labels");
        std::fs::create_dir_all(&labels).unwrap();
        for f in ["img1.json", "img2.json", "NOTES.md"] {
            std::fs::write(labels.join(f), "{}").unwrap();
        }
        // ... nor beside an export; nor a model.safetensors with no config or record.
        std::fs::write(merged_export.join("NOTES.md"), "mine").unwrap();
        let bare = d.join("bare");
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::write(bare.join("model.safetensors"), "x").unwrap();
        for overwrite in [false, true] {
            let e = check(&labels, overwrite).unwrap_err().to_string();
            assert!(
                e.contains("not an earlier export") && e.contains("NOTES.md, img1.json, img2.json"),
                "{e}"
            );
            assert!(e.contains("even with --overwrite") && e.contains("new --out"), "{e}");
            let e = check(&merged_export, overwrite).unwrap_err().to_string();
            assert!(e.contains("earlier export and other files (NOTES.md)"), "{e}");
            let e = check(&bare, overwrite).unwrap_err().to_string();
            assert!(e.contains("not an earlier export (model.safetensors)"), "{e}");
        }
        std::fs::write(d.join("notes.txt"), "keep").unwrap();
        for overwrite in [false, true] {
            let e = check(&d.join("notes.txt"), overwrite).unwrap_err().to_string();
            assert!(e.contains("existing file") && e.contains("new --out"), "{e}");
        }
        let mine = d.join("mine");
        std::fs::create_dir_all(mine.join("sub")).unwrap();
        std::fs::write(mine.join("thesis.docx"), "keep").unwrap();
        for overwrite in [false, true] {
            let e = check(&mine, overwrite).unwrap_err().to_string();
            assert!(
                e.contains("not an earlier export") && e.contains("thesis.docx") && e.contains("sub"),
                "{e}"
            );
            let e = check(&d.join("run"), overwrite).unwrap_err().to_string();
            assert!(e.contains("which this export reads"), "{e}");
        }
        assert!(d.join("run/best/adapter_config.json").exists() && mine.join("thesis.docx").exists());
        assert_eq!(std::fs::read_dir(&labels).unwrap().count(), 3);
    }

    /// An existing `--out` (a mount point, a link's directory) is written into, never renamed
    /// or replaced: the directory stays the same one, the link stays a link, and an earlier
    /// export's files are replaced (a stale one the new export does not write is removed). A
    /// build that fails leaves what was there as it was, with no partial copy.
    #[cfg(unix)]
    #[test]
    fn an_existing_out_is_written_into_and_a_failed_build_changes_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = d.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let ino = std::fs::metadata(&out).unwrap().ino();
        let write = |dir: &Path, files: &[(&str, &str)]| -> Result<()> {
            for (f, body) in files {
                crate::fsutil::write_atomic(&dir.join(f), body.as_bytes())?;
            }
            Ok(())
        };
        let t = check_target(&out, &[], None, false).unwrap();
        t.install(|dir| write(dir, &[("adapter_config.json", "1"), ("adapter_model.safetensors", "1")]))
            .unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().ino(), ino, "the directory itself was replaced");
        assert_eq!(std::fs::read_to_string(out.join("adapter_config.json")).unwrap(), "1");
        // Overwritten by a merged export: the adapter's files go, the new ones come.
        let t = check_target(&out, &[], None, true).unwrap();
        t.install(|dir| {
            write(dir, &[("model.safetensors", "2"), (MERGED_RECORD, "{}"), ("config.json", "2")])
        })
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into())
            .collect();
        names.sort();
        assert_eq!(names, ["config.json", MERGED_RECORD, "model.safetensors"]);
        assert_eq!(std::fs::metadata(&out).unwrap().ino(), ino);
        // A failed build: nothing changes, nothing is left behind.
        let t = check_target(&out, &[], None, true).unwrap();
        let e = t
            .install(|dir| {
                write(dir, &[("model.safetensors", "3")])?;
                bail!("disk full")
            })
            .unwrap_err();
        assert!(e.to_string().contains("disk full"));
        let mut after: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into())
            .collect();
        after.sort();
        assert_eq!(after, names);
        assert_eq!(std::fs::read_to_string(out.join("model.safetensors")).unwrap(), "2");
        // Through a link: into the directory it points to, the link kept.
        let real = d.join("disk/merged");
        std::fs::create_dir_all(&real).unwrap();
        let link = d.join("merged");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let t = check_target(&link, &[], None, false).unwrap();
        t.install(|dir| write(dir, &[("model.safetensors", "4"), ("config.json", "4")])).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(real.join("model.safetensors")).unwrap(), "4");
        // A new directory: built aside and renamed into place, nothing else left beside it.
        let fresh = d.join("fresh/sub");
        let t = check_target(&fresh, &[], None, false).unwrap();
        assert!(t.install(|dir| write(dir, &[("a.json", "5")])).is_ok());
        assert_eq!(std::fs::read_dir(d.join("fresh")).unwrap().count(), 1);
        assert!(fresh.join("a.json").is_file());
        // A dangling link is named.
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
        let e = check_target(&dangling, &[], None, false).unwrap_err().to_string();
        assert!(e.contains("does not exist") && e.contains("nowhere"), "{e}");
    }

    /// `lorahost export` end to end on the tiny model: an --out holding a previous export
    /// (a merged model, or an adapter) is refused without --overwrite, naming the files, and
    /// left as it was; with --overwrite it is replaced. A diverged (NaN) adapter is refused
    /// naming the tensor, and no merged model is written.
    #[test]
    fn export_keeps_an_existing_out_unless_overwrite_and_refuses_nan_adapters() {
        use crate::lora::{Component, LoraConfig};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = d.join("data");
        let spec = crate::data::synthetic::SyntheticSpec {
            seed: 3,
            train_images: 2,
            valid_images: 2,
            size: 112,
            max_cracks: 2,
        };
        crate::data::synthetic::write_synthetic(&data, &spec).unwrap();
        let model_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny_sam3");
        let dev = Device::Cpu;
        let mut model = crate::sam3::model::Sam3Model::load_dir(&model_dir, &dev, DType::F32).unwrap();
        let trained = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            components: vec![Component::DetrEncoder, Component::DetrDecoder],
            use_rslora: false,
        };
        let lora = LoraSet::attach(&mut model, &trained, &dev).unwrap();
        for v in lora.vars().values() {
            v.set(&(Tensor::randn(0f32, 1.0, v.shape(), &dev).unwrap() * 0.5).unwrap()).unwrap();
        }
        let adapter = d.join("best");
        lora.save_peft(&adapter, "tiny").unwrap();
        let cfg = d.join("c.yaml");
        std::fs::write(
            &cfg,
            format!(
                "model:\n  name: tiny\n  path: {}\nlora:\n  rank: 2\n  alpha: 4\n  target_modules: [q_proj, v_proj]\n\
                 training:\n  data_dir: {}\n  batch_size: 2\n  num_negatives: 1\n  num_workers: 1\n  seed: 5\n\
                 output:\n  output_dir: {}\nhardware:\n  device: cpu\nevaluation:\n  metric: loss\n",
                model_dir.display(),
                data.display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        for (merge, kept) in [(true, "model.safetensors"), (false, "adapter_model.safetensors")] {
            let out = d.join(format!("out-{merge}"));
            export(&cfg, &adapter, merge, &out, false).unwrap();
            let before = std::fs::read(out.join(kept)).unwrap();
            // A previous export is not replaced unasked.
            let e = format!("{:#}", export(&cfg, &adapter, merge, &out, false).unwrap_err());
            assert!(e.contains(kept) && e.contains("--overwrite"), "{e}");
            assert_eq!(std::fs::read(out.join(kept)).unwrap(), before);
            // A merged model where an adapter export goes (and the reverse) is named too.
            let other = d.join(format!("out-{}", !merge));
            if other.exists() {
                let e = format!("{:#}", export(&cfg, &adapter, merge, &other, false).unwrap_err());
                assert!(e.contains("already holds"), "{e}");
            }
            export(&cfg, &adapter, merge, &out, true).unwrap();
            assert!(out.join(kept).is_file());
        }
        // A diverged adapter: refused with the tensor named, and nothing is written.
        let weights = adapter.join(crate::lora::ADAPTER_WEIGHTS);
        let mut tensors = candle_core::safetensors::load(&weights, &dev).unwrap();
        let key = tensors.keys().min().unwrap().clone();
        let t = &tensors[&key];
        let nan = Tensor::full(f32::NAN, t.dims(), &dev).unwrap();
        tensors.insert(key.clone(), nan);
        candle_core::safetensors::save(&tensors, &weights).unwrap();
        let out = d.join("merged-nan");
        let e = format!("{:#}", export(&cfg, &adapter, true, &out, false).unwrap_err());
        assert!(e.contains("NaN/Inf") && e.contains(&key) && e.contains("adapter_model.safetensors"), "{e}");
        assert!(!out.exists());
    }
}
