//! `lorahost export --merge`: fold trained adapters into the base weights
//! (`W' = W + (alpha / r) · B A` for every adapted linear layer) and write a transformers-format
//! model directory (`model.safetensors`, `config.json`, the tokenizer files) that loads without
//! PEFT. The directory is built aside and renamed into place when complete.

use crate::lora::LoraSet;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Merge `lora` into the weights of the transformers model directory `model_dir` and write the
/// result to `out`.
/// Written beside a merged model's weights: which adapters are merged in.
pub const MERGED_RECORD: &str = "lorahost_merged.json";

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

pub fn write_merged(model_dir: &Path, lora: &LoraSet, out: &Path) -> Result<()> {
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
    let tmp = crate::train::checkpoint::partial_dir(out);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))?;
    crate::train::checkpoint::set_created_permissions(&tmp.join("model.safetensors"))?;
    for e in std::fs::read_dir(model_dir)?.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let is_meta = p.extension().is_some_and(|x| x == "json" || x == "txt" || x == "model")
            && name != "model.safetensors.index.json"
            && !name.starts_with("adapter_");
        if p.is_file() && is_meta {
            std::fs::copy(&p, tmp.join(&name)).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    // A record that adapters are merged in, so applying them again can be warned about.
    let record = serde_json::json!({
        "merged_by": format!("lorahost {}", env!("CARGO_PKG_VERSION")),
        "base_model": model_dir,
        "lora": lora.peft_config(&model_dir.display().to_string()),
    });
    crate::fsutil::write_atomic(&tmp.join(MERGED_RECORD), serde_json::to_string_pretty(&record)?.as_bytes())?;
    crate::train::checkpoint::replace_dir(&tmp, out)?;
    tracing::info!("merged {merged} adapters into {}", out.display());
    Ok(())
}

/// Refuse an `--out` whose replacement would lose something. The export replaces `--out` as a
/// whole (built aside, renamed into place), so every file already in it would go: a file, a
/// directory that is or contains one of `protected` (the adapter being exported, the base
/// model), or one holding anything but a previous export's files (weights and metadata, no
/// subdirectories) is always refused; a previous export's files are replaced only with
/// `overwrite` (`--overwrite`), and are named otherwise. An empty directory is written into.
pub fn check_target(out: &Path, protected: &[&Path], overwrite: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let fix = "choose a new --out directory (or remove the old one yourself)";
    if !out.is_dir() {
        bail!("--out {} is an existing file, not a directory: {fix}", out.display());
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let out_c = canon(out);
    for p in protected {
        if canon(p).starts_with(&out_c) {
            bail!(
                "--out {} is or contains {}, which this export reads: writing there would replace it; {fix}",
                out.display(),
                p.display()
            );
        }
    }
    let foreign: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .flatten()
        .filter(|e| {
            let p = e.path();
            let export_file = p.is_file()
                && p.extension()
                    .is_some_and(|x| ["safetensors", "json", "txt", "model", "md"].iter().any(|k| x == *k));
            !export_file
        })
        .map(|e| e.file_name().to_string_lossy().to_string())
        .take(3)
        .collect();
    if !foreign.is_empty() {
        bail!(
            "--out {} already holds files that are not an export ({}): it would be replaced as a whole; {fix}",
            out.display(),
            foreign.join(", ")
        );
    }
    if !overwrite {
        let mut existing: Vec<String> = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        if !existing.is_empty() {
            existing.sort();
            let n = existing.len();
            let mut names = existing.into_iter().take(6).collect::<Vec<_>>().join(", ");
            if n > 6 {
                names.push_str(&format!(" and {} more", n - 6));
            }
            bail!(
                "--out {} already holds {names}: the export would replace them; pass --overwrite to replace them, or {fix}",
                out.display()
            );
        }
    }
    Ok(())
}

/// `lorahost export`: load the base model of `config`, attach the adapter folder's own LoRA
/// layout (rank, alpha and modules from the folder; a `lora:` section that differs is warned
/// about), load it strictly, and write either the merged model (`merge`) or a checked copy of
/// the adapter. An `--out` holding files is replaced only with `overwrite` (see
/// [`check_target`]).
pub fn export(config: &Path, adapter: &Path, merge: bool, out: &Path, overwrite: bool) -> Result<()> {
    let cfg = crate::train::load_config(config, &[])?;
    let model_path = crate::train::resolve_model(&cfg)?;
    check_target(out, &[adapter, &model_path], overwrite)?;
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
    if merge {
        write_merged(&model_path, &lora, out)?;
        println!("merged {} adapters into {}", lora.modules.len(), out.display());
    } else {
        crate::train::write_adapter_dir(out, &lora, &cfg.model.name)?;
        // The adapter's own config, as it was: it is what these weights mean in PEFT (its
        // dropout, base model name and options), which a regenerated one could change.
        let original = std::fs::read(adapter.join(crate::lora::ADAPTER_CONFIG))
            .with_context(|| format!("reading {}", adapter.join(crate::lora::ADAPTER_CONFIG).display()))?;
        crate::fsutil::write_atomic(&out.join(crate::lora::ADAPTER_CONFIG), &original)?;
        println!("adapter ({} modules) checked and written to {}", lora.modules.len(), out.display());
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

    /// `--out` is replaced only when nothing would be lost: absent, or a previous export's files;
    /// a file, foreign files, a subdirectory, or the adapter's own directory are refused with
    /// the fix.
    #[test]
    fn export_target_is_refused_when_replacing_it_would_lose_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let adapter = d.join("run/best");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
        for overwrite in [false, true] {
            assert!(check_target(&d.join("new"), &[&adapter], overwrite).is_ok());
            std::fs::create_dir_all(d.join("empty")).unwrap();
            assert!(check_target(&d.join("empty"), &[&adapter], overwrite).is_ok());
        }
        let previous = d.join("previous");
        std::fs::create_dir_all(&previous).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json", "model.safetensors", "merges.txt"] {
            std::fs::write(previous.join(f), "x").unwrap();
        }
        // A previous export is replaced only when asked, and named otherwise.
        let e = check_target(&previous, &[&adapter], false).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json, adapter_model.safetensors, merges.txt, model.safetensors")
                && e.contains("--overwrite"),
            "{e}"
        );
        assert!(check_target(&previous, &[&adapter], true).is_ok());
        std::fs::write(d.join("notes.txt"), "keep").unwrap();
        for overwrite in [false, true] {
            let e = check_target(&d.join("notes.txt"), &[&adapter], overwrite).unwrap_err().to_string();
            assert!(e.contains("existing file") && e.contains("new --out"), "{e}");
        }
        let mine = d.join("mine");
        std::fs::create_dir_all(mine.join("sub")).unwrap();
        std::fs::write(mine.join("thesis.docx"), "keep").unwrap();
        for overwrite in [false, true] {
            let e = check_target(&mine, &[&adapter], overwrite).unwrap_err().to_string();
            assert!(e.contains("not an export") && e.contains("thesis.docx") && e.contains("sub"), "{e}");
            let e = check_target(&d.join("run"), &[&adapter], overwrite).unwrap_err().to_string();
            assert!(e.contains("which this export reads"), "{e}");
        }
        assert!(d.join("run/best/adapter_config.json").exists() && mine.join("thesis.docx").exists());
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
