//! `lorahost evaluate`: the metrics of trained adapters (or of a model alone: the base model, or
//! one with adapters merged in, `--model`) on a split, as
//! training's validation computes them (the same loss terms, fixed negatives, COCO mask
//! mAP/AP50/AP75 and cgF1 at the model's mask resolution, box-only pairs left out). The
//! counterpart of SAM3_LoRA's `validate_sam3_lora.py`, with the presence score applied and the
//! adapters loaded strictly, with the rank, alpha and modules their folder says.

use super::{
    check_tokenizer, device_for, load_config, load_tokenizer, loss_weights, resolve_model, target_mask_size,
    validate, with_prompts, ValidationSet,
};
use crate::data::coco::{Dataset, FindingKind, Severity};
use crate::evaluation::EvalSummary;
use crate::lora::{LoraConfig, LoraSet};
use crate::sam3::model::{Sam3Model, Semantics};
use crate::train_config::Precision;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

/// What to evaluate.
#[derive(Debug, Clone, Default)]
pub struct EvaluateOptions {
    /// The training YAML (model, lora, data and evaluation settings).
    pub config: PathBuf,
    /// `section.key=value` overrides.
    pub overrides: Vec<String>,
    /// PEFT adapter directory (e.g. OUTPUT/best); None evaluates the model alone. Its rank,
    /// alpha and modules come from the folder (a `lora:` section that differs is warned about).
    pub adapter: Option<PathBuf>,
    /// A model directory instead of the config's `model.path` (e.g. a merged model).
    pub model: Option<PathBuf>,
    /// Split name; None: `test` when present, else `valid`.
    pub split: Option<String>,
    /// Write pictures of the worst image/prompt pairs (ground truth beside detections) here.
    pub panels: Option<PathBuf>,
    /// How many pairs `panels` gets (the lowest pixel IoU first).
    pub panel_count: usize,
}

/// One picture `evaluate --panels` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PanelRecord {
    /// The PNG.
    pub file: PathBuf,
    /// The image (COCO id and file).
    pub image_id: u64,
    /// The image file.
    pub image: PathBuf,
    /// The prompt.
    pub prompt: String,
    /// Pixel IoU of the detections (score ≥ 0.5) with the ground truth, at the mask resolution.
    pub iou: f64,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateReport {
    /// The split evaluated.
    pub split: String,
    /// Its annotation file.
    pub annotation_file: PathBuf,
    /// The model directory evaluated (`--model`, or the config's model).
    pub model: PathBuf,
    /// Whether that model has adapters merged into its weights (`export --merge` wrote it).
    pub merged: bool,
    /// The adapters evaluated on it (None: the model alone).
    pub adapter: Option<PathBuf>,
    /// Images evaluated (readable, with at least one prompt).
    pub images: usize,
    /// Images of the split left out (unreadable, or no prompt).
    pub images_left_out: usize,
    /// Loss over the training terms (mean per batch).
    pub loss: f64,
    /// Mean per-term losses.
    pub terms: BTreeMap<String, f64>,
    /// mAP / AP50 / AP75 / cgF1 / pmF1 / IL_MCC; None when no pair could be scored.
    pub metrics: Option<EvalSummary>,
    /// The same per prompt (category).
    pub per_prompt: BTreeMap<String, EvalSummary>,
    /// Prompts without ground truth in the split (generic negatives): their false positives.
    pub negative_only: BTreeMap<String, crate::evaluation::NegativeOnly>,
    /// Pixel metrics (strict, relaxed, clDice) over the pairs of the dataset's categories.
    pub pixel: Option<crate::pixel_metrics::PixelMetrics>,
    /// Side of the square mask grid the masks are scored on (288 for SAM3).
    pub mask_size: usize,
    /// The pictures `--panels` wrote, worst first (index in `<panels>/panels.json`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub panels: Vec<PanelRecord>,
}

/// Evaluate (see the module docs).
pub fn evaluate(opts: &EvaluateOptions) -> Result<EvaluateReport> {
    let cfg = load_config(&opts.config, &opts.overrides)?;
    let t = &cfg.training;
    let device = device_for(&cfg)?;
    let dtype = super::compute_dtype(t.precision().unwrap_or(Precision::No), &device);
    let dataset =
        Dataset::load(&t.data_dir).with_context(|| format!("training.data_dir {}", t.data_dir.display()))?;
    let dataset = dataset.with_generic_negatives(&t.generic_negatives);
    let name = match &opts.split {
        Some(s) => s.clone(),
        None if dataset.split("test").is_some() => "test".into(),
        None => "valid".into(),
    };
    let Some(split) = dataset.split(&name) else {
        let have: Vec<&str> = dataset.splits.iter().map(|s| s.name.as_str()).collect();
        let guess = match name.to_ascii_lowercase().as_str() {
            "val" | "validation" | "eval" | "dev" if have.contains(&"valid") => " (did you mean valid?)",
            "testing" | "tests" if have.contains(&"test") => " (did you mean test?)",
            "training" if have.contains(&"train") => " (did you mean train?)",
            _ => "",
        };
        bail!(
            "{}: no {name} split to evaluate{guess} (found: {}); pass --split with one of them",
            t.data_dir.display(),
            have.join(", ")
        );
    };
    let mut unusable = HashSet::new();
    for f in dataset.preflight_of(&[name.as_str()]) {
        match f.severity {
            Severity::Error => tracing::error!("{}", f.located()),
            Severity::Warning => tracing::warn!("{}", f.located()),
        }
        if matches!(f.kind, FindingKind::MissingImage | FindingKind::CorruptImage) {
            unusable.extend(f.image_id);
        }
    }
    let usable: Vec<usize> =
        (0..split.images.len()).filter(|&i| !unusable.contains(&split.images[i].id)).collect();
    let (ids, _) = with_prompts(split, usable, t.num_negatives);
    if ids.is_empty() {
        bail!("{}: no usable image to evaluate (see the preflight above)", split.annotation_file.display());
    }

    let model_path = match &opts.model {
        Some(dir) => {
            if !dir.exists() {
                bail!("--model {} does not exist; give a model directory (config.json, model.safetensors, tokenizer.json), e.g. one `export --merge` wrote", dir.display());
            }
            crate::sam3::model::check_not_adapter(dir)?;
            dir.clone()
        }
        None => resolve_model(&cfg)?,
    };
    let merged = model_path.join(crate::export::MERGED_RECORD).is_file();
    let tokenizer = load_tokenizer(&model_path)?;
    let mut model = Sam3Model::load_dir(&model_path, &device, dtype)?.with_semantics(Semantics::Original);
    check_tokenizer(&tokenizer, &model, &model_path)?;
    let _adapters = match &opts.adapter {
        Some(dir) => {
            crate::export::warn_if_merged(&model_path, dir);
            let lora = LoraSet::attach_peft_for_config(
                &mut model,
                dir,
                &device,
                &LoraConfig::from_section(&cfg.lora),
                &opts.config.display().to_string(),
            )
            .with_context(|| format!("loading the adapters in {}", dir.display()))?;
            tracing::info!(
                "evaluating {} adapted modules from {} on {}",
                lora.modules.len(),
                dir.display(),
                model_path.display()
            );
            Some(lora)
        }
        None if merged => {
            tracing::info!("evaluating the merged model {} (adapters in its weights)", model_path.display());
            None
        }
        None => {
            tracing::info!("evaluating the model {} alone (no --adapter)", model_path.display());
            None
        }
    };
    let image_size = model.image_size();
    let mask_size = target_mask_size(&model);
    let set = ValidationSet {
        split,
        ids: &ids,
        tokenizer: &tokenizer,
        image_size,
        mask_size,
        negatives: t.num_negatives,
        seed: t.seed as u64,
        batch_size: t.batch_size,
        panels: match opts.panels {
            Some(_) => super::validate::Panels::Worst(opts.panel_count),
            None => super::validate::Panels::None,
        },
    };
    if let Some(dir) = &opts.panels {
        check_panel_dir(dir)?;
    }
    let r = validate(&model, &set, &loss_weights(&cfg)?, true)?;
    let panels = match &opts.panels {
        Some(dir) => write_panels(dir, split, &r.panels)?,
        None => Vec::new(),
    };
    Ok(EvaluateReport {
        split: name,
        annotation_file: split.annotation_file.clone(),
        model: model_path,
        merged,
        adapter: opts.adapter.clone(),
        images: ids.len(),
        images_left_out: split.images.len() - ids.len(),
        loss: r.loss,
        terms: r.terms,
        metrics: r.summary,
        per_prompt: r.per_prompt,
        negative_only: r.negative_only,
        pixel: r.pixel,
        mask_size,
        panels,
    })
}

/// The index `evaluate --panels` writes beside its pictures.
const PANEL_INDEX: &str = "panels.json";

/// A panels folder to write into: new, empty, or one an earlier `evaluate --panels` wrote (it
/// has the index). A folder holding other files is refused before the evaluation runs.
fn check_panel_dir(dir: &std::path::Path) -> Result<()> {
    if !dir.join(PANEL_INDEX).is_file() && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--panels {}: the folder holds other files; give a new or empty folder (or one an earlier `evaluate --panels` wrote)",
            dir.display()
        );
    }
    // Writable: found now, not after the whole evaluation ran.
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--panels {}: cannot create the folder", dir.display()))?;
    let probe = dir.join(format!(".lorahost-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!("--panels {}: cannot write there; make it writable, or give another folder", dir.display())
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Write `panels` (worst first) as `NNN_<image>_<prompt>.png` and the index, each atomically;
/// then remove the pictures an earlier index listed that this one does not (only those, by
/// name, in this folder: nothing is removed before the new pictures are written).
fn write_panels(
    dir: &std::path::Path,
    split: &crate::data::coco::Split,
    panels: &[super::validate::Panel],
) -> Result<Vec<PanelRecord>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let index = dir.join(PANEL_INDEX);
    let earlier: Vec<std::ffi::OsString> = std::fs::read(&index)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| std::path::Path::new(v["file"].as_str()?).file_name().map(|n| n.to_os_string()))
        .collect();
    let mut out = Vec::new();
    for (k, p) in panels.iter().enumerate() {
        let image = split.images.iter().find(|im| im.id == p.image_id);
        let path = image.map(|im| im.path.clone()).unwrap_or_default();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.image_id.to_string());
        let sanitize = crate::data::overlay::sanitize;
        let file = dir.join(format!("{:03}_{}_{}.png", k + 1, sanitize(&stem), sanitize(&p.prompt)));
        let mut png = Vec::new();
        p.picture.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        crate::fsutil::write_atomic(&file, &png).with_context(|| format!("writing {}", file.display()))?;
        out.push(PanelRecord {
            file,
            image_id: p.image_id,
            image: path,
            prompt: p.prompt.clone(),
            iou: p.iou,
        });
    }
    crate::fsutil::write_atomic(&index, serde_json::to_string_pretty(&out)?.as_bytes())
        .with_context(|| format!("writing {}", index.display()))?;
    for name in earlier {
        if !out.iter().any(|r| r.file.file_name() == Some(name.as_os_str())) {
            let _ = std::fs::remove_file(dir.join(&name));
        }
    }
    Ok(out)
}
