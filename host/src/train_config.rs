//! The training YAML: the schema of the SAM3_LoRA trainer our users come from (every key of its
//! configs, numbers written as strings such as "5e-5" accepted), plus lorahost's additions.
//! Unknown keys are warnings that name the key (and the likely intended one); contradictions
//! are errors. Every key has an effect in lorahost; see `../shared/docs/seed-trainer.md` §2
//! for what each meant there.

use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// Why a training config is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TrainConfigError {
    /// I/O.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// Malformed YAML or a value of the wrong type.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What and where.
        reason: String,
    },
    /// Settings that contradict each other or cannot work.
    #[error("{path}: {}", .problems.join("; "))]
    Contradiction {
        /// File.
        path: PathBuf,
        /// Each problem with its fix.
        problems: Vec<String>,
    },
}

/// A number given as a number or a string ("5e-5": YAML 1.1 reads that as a string).
fn num<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        F(f64),
        S(String),
    }
    match N::deserialize(d)? {
        N::F(f) => Ok(f),
        N::S(s) => s.trim().parse().map_err(|_| serde::de::Error::custom(format!("{s:?} is not a number"))),
    }
}

/// `mixed_precision`: a name, or a YAML boolean (`false` = "no"; `true` names no precision).
fn precision_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        B(bool),
        S(String),
    }
    Ok(match P::deserialize(d)? {
        P::B(false) => "no".into(),
        P::B(true) => "true".into(), // ambiguous: the validation error lists the choices
        P::S(s) => s,
    })
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let f = num(d)?;
    if f < 0.0 || f.fract() != 0.0 || !f.is_finite() {
        return Err(serde::de::Error::custom(format!("{f} is not a whole number >= 0")));
    }
    Ok(f as usize)
}

/// `model:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ModelSection {
    /// Hub id of the base model ("facebook/sam3"); informational unless `path` is empty.
    pub name: String,
    /// Hub cache directory (accepted for compatibility).
    pub cache_dir: Option<PathBuf>,
    /// lorahost: local model directory (config.json + weights + tokenizer.json) or sam3.pt.
    pub path: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection { name: "facebook/sam3".into(), cache_dir: None, path: None }
    }
}

/// `lora:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct LoraSection {
    /// Rank r.
    #[serde(deserialize_with = "count")]
    pub rank: usize,
    /// Scaling numerator: scale = alpha / rank.
    #[serde(deserialize_with = "num")]
    pub alpha: f64,
    /// Dropout on the LoRA branch input.
    #[serde(deserialize_with = "num")]
    pub dropout: f64,
    /// Module names or glob patterns (`*`, `?`) over module paths; a plain name matches the last
    /// path component exactly (e.g. `q_proj`), a pattern with a dot matches the full path.
    pub target_modules: Vec<String>,
    /// Adapt the ViT.
    pub apply_to_vision_encoder: bool,
    /// Adapt the CLIP text encoder.
    pub apply_to_text_encoder: bool,
    /// Adapt the geometry encoder.
    pub apply_to_geometry_encoder: bool,
    /// Adapt the fusion encoder.
    pub apply_to_detr_encoder: bool,
    /// Adapt the DETR decoder.
    pub apply_to_detr_decoder: bool,
    /// Adapt the mask head (in SAM3_LoRA this flag matched nothing; here it does).
    pub apply_to_mask_decoder: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: 16,
            alpha: 32.0,
            dropout: 0.1,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2"]
                .map(String::from)
                .to_vec(),
            apply_to_vision_encoder: true,
            apply_to_text_encoder: false,
            apply_to_geometry_encoder: true,
            apply_to_detr_encoder: true,
            apply_to_detr_decoder: true,
            apply_to_mask_decoder: true,
        }
    }
}

/// Mixed precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 everywhere.
    No,
    /// bf16 frozen weights and activations; LoRA weights, optimizer state, norms and loss in f32.
    Bf16,
    /// fp16 with dynamic loss scaling.
    Fp16,
}

/// LR scheduler after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Cosine decay to 0.
    Cosine,
    /// Linear decay to 0.
    Linear,
    /// Constant.
    Constant,
    /// 1/√step (Meta's recipe).
    InverseSqrt,
}

/// `training:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct TrainingSection {
    /// Dataset root with train/, valid/, test/ (each with _annotations.coco.json).
    pub data_dir: PathBuf,
    /// Hard-negative prompts per image.
    #[serde(deserialize_with = "count")]
    pub num_negatives: usize,
    /// Images per micro-batch.
    #[serde(deserialize_with = "count")]
    pub batch_size: usize,
    /// Data-loading threads.
    #[serde(deserialize_with = "count")]
    pub num_workers: usize,
    /// Peak learning rate.
    #[serde(deserialize_with = "num")]
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    #[serde(deserialize_with = "num")]
    pub weight_decay: f64,
    /// AdamW β1.
    #[serde(deserialize_with = "num")]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[serde(deserialize_with = "num")]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[serde(deserialize_with = "num")]
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping (0 = off).
    #[serde(deserialize_with = "num")]
    pub max_grad_norm: f64,
    /// Epochs.
    #[serde(deserialize_with = "count")]
    pub num_epochs: usize,
    /// Warmup, in optimizer steps.
    #[serde(deserialize_with = "count")]
    pub warmup_steps: usize,
    /// "cosine", "linear", "constant", "inverse_sqrt".
    pub lr_scheduler: String,
    /// Metrics cadence, optimizer steps.
    #[serde(deserialize_with = "count")]
    pub logging_steps: usize,
    /// Validation cadence, optimizer steps (0 = once per epoch).
    #[serde(deserialize_with = "count")]
    pub eval_steps: usize,
    /// Checkpoint cadence, optimizer steps (0 = once per epoch).
    #[serde(deserialize_with = "count")]
    pub save_steps: usize,
    /// Checkpoints kept (0 = all).
    #[serde(deserialize_with = "count")]
    pub save_total_limit: usize,
    /// "no", "bf16", "fp16" (YAML `false` reads as "no").
    #[serde(deserialize_with = "precision_name")]
    pub mixed_precision: String,
    /// Seed of everything random.
    #[serde(deserialize_with = "count")]
    pub seed: usize,
    /// Micro-batches per optimizer step.
    #[serde(deserialize_with = "count")]
    pub gradient_accumulation_steps: usize,
    /// Augmentation: horizontal flip (p = 0.5) and zoom-out (p = 0.5: content scaled by
    /// U[0.5, 1) into the top-left of the square input, the rest padded), seeded per image
    /// and epoch.
    pub augment: bool,
    /// lorahost: when `data_dir` has no `train/` split yet, write the bundled synthetic crack
    /// dataset there first (demo and tests).
    pub synthetic: bool,
    /// lorahost: probability that a positive query also gets one of its target boxes as a
    /// visual exemplar prompt (SAM3's geometry path); 0 = text prompts only. Without exemplars the
    /// geometry encoder's box projections and self-attention receive no gradient.
    #[serde(deserialize_with = "num")]
    pub box_prompt_prob: f64,
    /// lorahost: activation checkpointing of the ViT blocks: each keeps only its input and is
    /// recomputed in backward (about one more ViT forward per step for a much smaller peak).
    pub gradient_checkpointing: bool,
}

impl Default for TrainingSection {
    fn default() -> Self {
        TrainingSection {
            data_dir: PathBuf::from("data"),
            num_negatives: 2,
            batch_size: 2,
            num_workers: 2,
            learning_rate: 1e-4,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            num_epochs: 10,
            warmup_steps: 0,
            lr_scheduler: "cosine".into(),
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 3,
            mixed_precision: "no".into(),
            seed: 42,
            gradient_accumulation_steps: 1,
            augment: false,
            synthetic: false,
            box_prompt_prob: 0.0,
            gradient_checkpointing: false,
        }
    }
}

impl TrainingSection {
    /// The precision setting.
    pub fn precision(&self) -> Option<Precision> {
        match self.mixed_precision.trim().to_ascii_lowercase().as_str() {
            "no" | "none" | "fp32" | "f32" | "false" | "" => Some(Precision::No),
            "bf16" | "bfloat16" => Some(Precision::Bf16),
            "fp16" | "float16" | "f16" => Some(Precision::Fp16),
            _ => None,
        }
    }

    /// The scheduler setting.
    pub fn scheduler(&self) -> Option<Scheduler> {
        match self.lr_scheduler.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "cosine" => Some(Scheduler::Cosine),
            "linear" => Some(Scheduler::Linear),
            "constant" | "none" => Some(Scheduler::Constant),
            "inverse_sqrt" | "rsqrt" => Some(Scheduler::InverseSqrt),
            _ => None,
        }
    }
}

/// `output:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct OutputSection {
    /// Where checkpoints, adapters and the metrics log go.
    pub output_dir: PathBuf,
    /// Log directory (default: output_dir).
    pub logging_dir: Option<PathBuf>,
    /// Save adapters only (lorahost always does; full weights via `export --merge`).
    pub save_lora_only: bool,
    /// Accepted for compatibility; lorahost never uploads.
    pub push_to_hub: bool,
    /// Accepted for compatibility.
    pub hub_model_id: Option<String>,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            output_dir: PathBuf::from("outputs/lorahost"),
            logging_dir: None,
            save_lora_only: true,
            push_to_hub: false,
            hub_model_id: None,
        }
    }
}

/// `evaluation:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct EvaluationSection {
    /// Model-selection metric: "loss", "map" (COCO mask mAP), "cgf1", "iou".
    pub metric: String,
    /// Write predictions of the validation set.
    pub save_predictions: bool,
    /// Compute metrics (not only the loss) during training.
    pub compute_metrics_during_training: bool,
}

impl Default for EvaluationSection {
    fn default() -> Self {
        EvaluationSection {
            metric: "loss".into(),
            save_predictions: false,
            compute_metrics_during_training: true,
        }
    }
}

/// `hardware:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct HardwareSection {
    /// "cpu" or "cuda".
    pub device: String,
    /// Accepted for compatibility (no effect in Rust).
    pub dataloader_pin_memory: bool,
    /// Accepted for compatibility (no effect in Rust).
    pub use_compile: bool,
}

impl Default for HardwareSection {
    fn default() -> Self {
        HardwareSection { device: "cpu".into(), dataloader_pin_memory: true, use_compile: false }
    }
}

/// One plugin of the run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PluginEntry {
    /// The .wasm component.
    pub path: PathBuf,
    /// Its config section.
    #[serde(default)]
    pub config: serde_json::Value,
    /// CPU budget per hook call in milliseconds (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ms: Option<u64>,
    /// Memory limit in MiB (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<usize>,
}

/// A whole training config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default)]
pub struct TrainConfig {
    /// Base model.
    pub model: ModelSection,
    /// Adapters.
    pub lora: LoraSection,
    /// Optimization and data.
    pub training: TrainingSection,
    /// Outputs.
    pub output: OutputSection,
    /// Validation.
    pub evaluation: EvaluationSection,
    /// Device.
    pub hardware: HardwareSection,
    /// Loss weights by term name (Meta's defaults for terms not given).
    pub loss: std::collections::BTreeMap<String, serde_json::Value>,
    /// Plugins, in call order.
    pub plugins: Vec<PluginEntry>,
}

/// Keys each section knows (for unknown-key warnings).
const KNOWN: &[(&str, &[&str])] = &[
    ("model", &["name", "cache_dir", "path"]),
    (
        "lora",
        &[
            "rank",
            "alpha",
            "dropout",
            "target_modules",
            "apply_to_vision_encoder",
            "apply_to_text_encoder",
            "apply_to_geometry_encoder",
            "apply_to_detr_encoder",
            "apply_to_detr_decoder",
            "apply_to_mask_decoder",
        ],
    ),
    (
        "training",
        &[
            "data_dir",
            "num_negatives",
            "batch_size",
            "num_workers",
            "learning_rate",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "max_grad_norm",
            "num_epochs",
            "warmup_steps",
            "lr_scheduler",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "mixed_precision",
            "seed",
            "gradient_accumulation_steps",
            "augment",
            "synthetic",
            "box_prompt_prob",
            "gradient_checkpointing",
        ],
    ),
    ("output", &["output_dir", "logging_dir", "save_lora_only", "push_to_hub", "hub_model_id"]),
    ("evaluation", &["metric", "save_predictions", "compute_metrics_during_training"]),
    ("hardware", &["device", "dataloader_pin_memory", "use_compile"]),
];

/// Keys of SAM3_LoRA's legacy layouts that lorahost reads under another name.
const LEGACY: &[(&str, &str)] = &[
    ("training.train_data_path", "training.data_dir (the dataset root with train/ and valid/)"),
    ("training.val_data_path", "training.data_dir (the dataset root with train/ and valid/)"),
];

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn suggest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (distance(key, k), *k)).filter(|(d, _)| *d <= 3).min().map(|(_, k)| k)
}

/// The `section.key` names of the settings called `key`, in any section.
pub(crate) fn settings_named(key: &str) -> Vec<String> {
    KNOWN.iter().filter(|(_, keys)| keys.contains(&key)).map(|(s, _)| format!("{s}.{key}")).collect()
}

/// Warnings for the keys of `v` that name no setting (with a suggestion when one is close).
pub(crate) fn unknown_keys(v: &serde_yaml::Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(top) = v.as_mapping() else { return out };
    let sections: Vec<&str> = KNOWN.iter().map(|(s, _)| *s).chain(["loss", "plugins"]).collect();
    for (k, val) in top {
        let Some(k) = k.as_str() else { continue };
        if k == "plugins" {
            const ENTRY: &[&str] = &["path", "config", "budget_ms", "memory_mb"];
            for (i, e) in val.as_sequence().into_iter().flatten().enumerate() {
                for sub in e.as_mapping().into_iter().flat_map(|m| m.keys()).filter_map(|k| k.as_str()) {
                    if !ENTRY.contains(&sub) {
                        let hint = suggest(sub, ENTRY)
                            .map(|s| format!(" (did you mean `{s}`?)"))
                            .unwrap_or_default();
                        out.push(format!("unknown key `plugins[{i}].{sub}` ignored{hint}"));
                    }
                }
            }
            continue;
        }
        let Some((_, keys)) = KNOWN.iter().find(|(s, _)| *s == k) else {
            if !sections.contains(&k) {
                let hint =
                    suggest(k, &sections).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
                out.push(format!("unknown section `{k}` ignored{hint}"));
            }
            continue;
        };
        let Some(m) = val.as_mapping() else { continue };
        for (sub, _) in m {
            let Some(sub) = sub.as_str() else { continue };
            if keys.contains(&sub) {
                continue;
            }
            let full = format!("{k}.{sub}");
            if let Some((_, instead)) = LEGACY.iter().find(|(l, _)| *l == full) {
                out.push(format!("`{full}` is a legacy key and is ignored; use {instead}"));
            } else {
                let hint =
                    suggest(sub, keys).map(|s| format!(" (did you mean `{k}.{s}`?)")).unwrap_or_default();
                out.push(format!("unknown key `{full}` ignored{hint}"));
            }
        }
    }
    out
}

impl TrainConfig {
    /// Read a YAML file: the config and the warnings (unknown keys) to show.
    pub fn from_file(path: &Path) -> Result<(Self, Vec<String>), TrainConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TrainConfigError::Read { path: path.into(), source })?;
        Self::from_yaml(&text, path)
    }

    /// Parse YAML text (`origin` names it in messages).
    pub fn from_yaml(text: &str, origin: &Path) -> Result<(Self, Vec<String>), TrainConfigError> {
        let (cfg, warnings) = Self::from_yaml_unvalidated(text, origin)?;
        cfg.validate(origin)?;
        Ok((cfg, warnings))
    }

    /// Parse YAML text into a config without [`Self::validate`] (so every contradiction can
    /// be listed on its own, as `doctor` does): the warnings (unknown keys, keys read under
    /// another name) with it.
    pub fn from_yaml_unvalidated(text: &str, origin: &Path) -> Result<(Self, Vec<String>), TrainConfigError> {
        let invalid = |reason: String| TrainConfigError::Invalid { path: origin.into(), reason };
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| invalid(format!("not valid YAML: {e}")))?;
        let value = if value.is_null() { serde_yaml::Value::Mapping(Default::default()) } else { value };
        if !value.is_mapping() {
            return Err(invalid(
                "the config must be a mapping of sections (model, lora, training, ...)".into(),
            ));
        }
        let warnings = unknown_keys(&value);
        let cfg: TrainConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| invalid(format!("{}: {}", e.path(), e.inner())))?;
        Ok((cfg, warnings))
    }

    /// Relative input paths (`training.data_dir`, `model.path`, `model.cache_dir`, each plugin's
    /// `path`) are read from the working directory, as SAM3_LoRA does. One that does not exist
    /// there but does next to the config file (`origin`) is taken from there instead, so a config
    /// works from any working directory; the notes say which paths were moved. Output paths are
    /// left alone: they are created where they point.
    pub fn resolve_relative_to(&mut self, origin: &Path) -> Vec<String> {
        let Some(base) = origin.parent().filter(|b| !b.as_os_str().is_empty()) else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        let mut fix = |key: String, p: &mut PathBuf| {
            if p.as_os_str().is_empty() || p.is_absolute() || p.exists() {
                return;
            }
            let near = base.join(&*p);
            if near.exists() {
                notes.push(format!(
                    "{key} {} is not in the working directory; using {} (next to the config)",
                    p.display(),
                    near.display()
                ));
                *p = near;
            }
        };
        fix("training.data_dir".into(), &mut self.training.data_dir);
        if let Some(p) = self.model.path.as_mut() {
            fix("model.path".into(), p);
        }
        if let Some(p) = self.model.cache_dir.as_mut() {
            fix("model.cache_dir".into(), p);
        }
        for (i, e) in self.plugins.iter_mut().enumerate() {
            fix(format!("plugins[{i}].path"), &mut e.path);
        }
        notes
    }

    /// Errors for settings that cannot work together, each with its fix.
    pub fn validate(&self, origin: &Path) -> Result<(), TrainConfigError> {
        let mut p = Vec::new();
        let (l, t) = (&self.lora, &self.training);
        if t.data_dir.as_os_str().is_empty() {
            p.push(
                "training.data_dir is empty: set the dataset directory (with train/_annotations.coco.json)"
                    .to_string(),
            );
        }
        if self.output.output_dir.as_os_str().is_empty() {
            p.push(
                "output.output_dir is empty: set the directory for checkpoints, adapters and logs (e.g. outputs/run1)"
                    .to_string(),
            );
        }
        if l.rank == 0 {
            p.push("lora.rank is 0: set a rank >= 1 (e.g. 16)".to_string());
        }
        if l.alpha.is_nan() || l.alpha <= 0.0 {
            p.push(format!("lora.alpha is {}: set alpha > 0 (scale = alpha / rank)", l.alpha));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            p.push(format!("lora.dropout is {}: must be in [0, 1)", l.dropout));
        }
        let any_component = l.apply_to_vision_encoder
            || l.apply_to_text_encoder
            || l.apply_to_geometry_encoder
            || l.apply_to_detr_encoder
            || l.apply_to_detr_decoder
            || l.apply_to_mask_decoder;
        if !any_component {
            p.push("every lora.apply_to_* flag is false: LoRA would adapt nothing; enable at least one component".into());
        }
        if l.target_modules.iter().all(|m| m.trim().is_empty()) {
            p.push("lora.target_modules is empty: list module names such as q_proj, v_proj, fc1".into());
        }
        if t.batch_size == 0 {
            p.push("training.batch_size is 0".into());
        }
        if t.gradient_accumulation_steps == 0 {
            p.push("training.gradient_accumulation_steps is 0: use 1 for no accumulation".into());
        }
        if t.num_epochs == 0 {
            p.push("training.num_epochs is 0".into());
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            p.push(format!("training.learning_rate is {}: must be > 0", t.learning_rate));
        } else if t.learning_rate > 1.0 {
            p.push(format!(
                "training.learning_rate is {}: AdamW moves every weight by about the learning rate per step, so the adapters diverge at once; LoRA rates are typically 1e-5 .. 1e-3",
                t.learning_rate
            ));
        }
        if t.max_grad_norm.is_nan() || t.max_grad_norm < 0.0 {
            p.push(format!(
                "training.max_grad_norm is {}: must be >= 0 (0 disables clipping)",
                t.max_grad_norm
            ));
        }
        if !(0.0..=1.0).contains(&t.box_prompt_prob) {
            p.push(format!("training.box_prompt_prob is {}: must be in [0, 1]", t.box_prompt_prob));
        }
        if t.weight_decay < 0.0 {
            p.push(format!("training.weight_decay is {}: must be >= 0", t.weight_decay));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            p.push("training.adam_beta1/adam_beta2 must be in [0, 1)".into());
        }
        if t.precision().is_none() {
            p.push(format!("training.mixed_precision {:?}: use no, bf16 or fp16", t.mixed_precision));
        }
        if t.scheduler().is_none() {
            p.push(format!(
                "training.lr_scheduler {:?}: use cosine, linear, constant or inverse_sqrt",
                t.lr_scheduler
            ));
        }
        if t.precision().is_some_and(|p| p != Precision::No)
            && self.hardware.device.eq_ignore_ascii_case("cpu")
        {
            p.push(format!(
                "training.mixed_precision {} with hardware.device cpu: candle's CPU backend has no half-precision matmul; use mixed_precision: no on the CPU",
                t.mixed_precision
            ));
        }
        if !["cpu", "cuda"].contains(&self.hardware.device.to_ascii_lowercase().as_str()) {
            p.push(format!("hardware.device {:?}: use cpu or cuda", self.hardware.device));
        }
        if !["loss", "iou", "map", "cgf1"].contains(&self.evaluation.metric.to_ascii_lowercase().as_str()) {
            p.push(format!("evaluation.metric {:?}: use loss, iou, map or cgf1", self.evaluation.metric));
        }
        if self.output.push_to_hub {
            p.push("output.push_to_hub is true: lorahost does not upload; set it to false".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(TrainConfigError::Contradiction { path: origin.into(), problems: p })
        }
    }

    /// Effective hyperparameters for a training set of `train_samples` images.
    pub fn effective(&self, train_samples: usize) -> Effective {
        let t = &self.training;
        let micro_batches_per_epoch = train_samples.div_ceil(t.batch_size.max(1));
        let steps_per_epoch = micro_batches_per_epoch.div_ceil(t.gradient_accumulation_steps.max(1));
        let total_steps = steps_per_epoch * t.num_epochs;
        Effective {
            effective_batch_size: t.batch_size * t.gradient_accumulation_steps,
            micro_batches_per_epoch,
            steps_per_epoch,
            total_steps,
            warmup_steps: t.warmup_steps,
            warmup_epochs: if steps_per_epoch == 0 {
                0.0
            } else {
                t.warmup_steps as f64 / steps_per_epoch as f64
            },
            lora_scale: self.lora.alpha / self.lora.rank.max(1) as f64,
        }
    }

    /// The config as a run records it (`config.yaml` in the output directory and in each
    /// checkpoint): every setting, defaults included, paths made absolute, and `extra_plugins`
    /// (the command line's) appended to `plugins`, so `lorahost train --config` on the record
    /// trains the same run from any working directory.
    pub fn snapshot(&self, extra_plugins: &[PluginEntry]) -> serde_yaml::Value {
        let mut c = self.clone();
        c.plugins.extend(extra_plugins.iter().cloned());
        let abs = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() {
                if let Ok(a) = std::path::absolute(&*p) {
                    *p = lexically_normal(&a);
                }
            }
        };
        abs(&mut c.training.data_dir);
        abs(&mut c.output.output_dir);
        for p in [&mut c.model.path, &mut c.model.cache_dir, &mut c.output.logging_dir].into_iter().flatten()
        {
            abs(p);
        }
        for p in &mut c.plugins {
            abs(&mut p.path);
        }
        serde_yaml::to_value(&c).unwrap_or_default()
    }
}

/// `p` without `.` components and with `..` applied to the component before it.
fn lexically_normal(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The settings that differ between two config records ([`TrainConfig::snapshot`]), each as
/// `key old -> new`, keys as dotted paths (`training.learning_rate`, `plugins[0].config.z`).
pub fn snapshot_changes(old: &serde_yaml::Value, new: &serde_yaml::Value) -> Vec<String> {
    fn flatten(v: &serde_yaml::Value, key: String, out: &mut std::collections::BTreeMap<String, String>) {
        use serde_yaml::Value as V;
        match v {
            // An empty mapping or list sets nothing: as if absent.
            V::Mapping(m) => {
                for (k, v) in m {
                    let k = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
                    flatten(v, if key.is_empty() { k } else { format!("{key}.{k}") }, out);
                }
            }
            V::Sequence(s) => {
                for (i, v) in s.iter().enumerate() {
                    flatten(v, format!("{key}[{i}]"), out);
                }
            }
            V::Tagged(t) => flatten(&t.value, key, out),
            v => {
                let text = serde_yaml::to_string(v).unwrap_or_default();
                out.insert(key, text.trim().to_string());
            }
        }
    }
    let (mut a, mut b) = (Default::default(), Default::default());
    flatten(old, String::new(), &mut a);
    flatten(new, String::new(), &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = "(absent)".to_string();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&absent), b.get(k).unwrap_or(&absent));
            (x != y).then(|| format!("{k} {x} -> {y}"))
        })
        .collect()
}

/// What the settings mean for a given dataset, printed at start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effective {
    /// Images per optimizer step.
    pub effective_batch_size: usize,
    /// Forward/backward passes per epoch.
    pub micro_batches_per_epoch: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
    /// Optimizer steps in the run.
    pub total_steps: usize,
    /// Warmup in optimizer steps.
    pub warmup_steps: usize,
    /// Warmup in epochs.
    pub warmup_epochs: f64,
    /// alpha / rank.
    pub lora_scale: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_config(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name)
    }

    /// The run's record reads back as the same config (paths made absolute), with no warning,
    /// and the changes between two records are exactly the keys that differ.
    #[test]
    fn config_record_round_trips_and_names_changes() {
        let (mut cfg, _) = TrainConfig::from_file(&repo_config("full_lora_config.yaml")).unwrap();
        cfg.training.data_dir = "./data/../cracks".into();
        cfg.loss.insert("loss_mask".into(), serde_json::json!(100.0));
        let cli = PluginEntry {
            path: "p/guard.wasm".into(),
            config: serde_json::json!({"z": 4}),
            budget_ms: Some(500),
            memory_mb: None,
        };
        let rec = cfg.snapshot(std::slice::from_ref(&cli));
        let text = serde_yaml::to_string(&rec).unwrap();
        let (back, warnings) = TrainConfig::from_yaml(&text, Path::new("config.yaml")).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(back.training.data_dir, cwd.join("cracks"));
        assert_eq!(back.output.output_dir, cwd.join(&cfg.output.output_dir));
        assert_eq!(back.plugins, vec![PluginEntry { path: cwd.join("p/guard.wasm"), ..cli.clone() }]);
        let same = TrainConfig {
            training: back.training.clone(),
            output: back.output.clone(),
            plugins: vec![],
            ..back.clone()
        };
        assert_eq!(
            same,
            TrainConfig { training: same.training.clone(), output: same.output.clone(), ..cfg.clone() }
        );
        assert!(snapshot_changes(&rec, &back.snapshot(&[])).is_empty());

        let mut other = back.clone();
        other.training.learning_rate = 2e-4;
        other.plugins[0].config = serde_json::json!({"z": 5, "w": true});
        other.loss.clear();
        let changes = snapshot_changes(&rec, &other.snapshot(&[]));
        assert_eq!(
            changes,
            [
                "loss.loss_mask 100.0 -> (absent)",
                "plugins[0].config.w (absent) -> true",
                "plugins[0].config.z 4 -> 5",
                &format!(
                    "training.learning_rate {} -> 0.0002",
                    serde_yaml::to_string(&cfg.training.learning_rate).unwrap().trim()
                ),
            ],
        );
    }

    #[test]
    fn shipped_configs_parse_without_warnings() {
        for name in ["full_lora_config.yaml", "light_lora_config.yaml"] {
            let (cfg, warnings) = TrainConfig::from_file(&repo_config(name)).unwrap();
            assert!(warnings.is_empty(), "{name}: {warnings:?}");
            assert_eq!(cfg.training.precision(), Some(Precision::Bf16), "{name}");
            assert_eq!(cfg.training.scheduler(), Some(Scheduler::Cosine), "{name}");
        }
        let (light, _) = TrainConfig::from_file(&repo_config("light_lora_config.yaml")).unwrap();
        // The diagnosis' fixes.
        assert_eq!((light.lora.rank, light.lora.alpha), (32, 64.0));
        assert_eq!((light.training.batch_size, light.training.gradient_accumulation_steps), (2, 8));
    }

    #[test]
    fn relative_inputs_missing_here_are_found_next_to_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg_dir = tmp.path().join("project/configs");
        std::fs::create_dir_all(cfg_dir.join("lorahost_test_data_near_config/train")).unwrap();
        std::fs::write(cfg_dir.join("lorahost_test_plugin_near.wasm"), b"").unwrap();
        let origin = cfg_dir.join("c.yaml");
        let (mut c, _) = TrainConfig::from_yaml(
            "training:\n  data_dir: lorahost_test_data_near_config\nmodel:\n  path: lorahost_test_no_such_model\n\
             plugins:\n  - path: lorahost_test_plugin_near.wasm\noutput:\n  output_dir: out_here\n",
            &origin,
        )
        .unwrap();
        let notes = c.resolve_relative_to(&origin);
        assert_eq!(c.training.data_dir, cfg_dir.join("lorahost_test_data_near_config"));
        assert_eq!(c.plugins[0].path, cfg_dir.join("lorahost_test_plugin_near.wasm"));
        // Missing in both places: left as written, so the error names what the user wrote.
        assert_eq!(c.model.path.as_deref(), Some(Path::new("lorahost_test_no_such_model")));
        assert_eq!(c.output.output_dir, PathBuf::from("out_here"), "outputs are not moved");
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("training.data_dir lorahost_test_data_near_config"), "{notes:?}");
        // A path that exists from the working directory wins (SAM3_LoRA's meaning).
        let (mut here, _) = TrainConfig::from_yaml("training:\n  data_dir: src\n", &origin).unwrap();
        assert!(here.resolve_relative_to(&origin).is_empty());
        assert_eq!(here.training.data_dir, PathBuf::from("src"));
    }

    #[test]
    fn numbers_as_strings_are_accepted() {
        let (c, _) = TrainConfig::from_yaml(
            "training:\n  learning_rate: \"5e-5\"\n  batch_size: \"4\"\n  max_grad_norm: 1\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(c.training.learning_rate, 5e-5);
        assert_eq!(c.training.batch_size, 4);
        let e =
            TrainConfig::from_yaml("training:\n  learning_rate: fast\n", Path::new("c.yaml")).unwrap_err();
        assert!(e.to_string().contains("training.learning_rate") && e.to_string().contains("fast"), "{e}");
    }

    #[test]
    fn unknown_keys_warn_by_name_with_a_suggestion() {
        let (_, w) = TrainConfig::from_yaml(
            "training:\n  warmup_stpes: 10\n  train_data_path: x\nlora:\n  rnak: 4\nloras: {}\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let all = w.join("\n");
        assert!(all.contains("`training.warmup_stpes`") && all.contains("`training.warmup_steps`"), "{all}");
        assert!(all.contains("`lora.rnak`") && all.contains("`lora.rank`"), "{all}");
        assert!(all.contains("training.train_data_path") && all.contains("legacy"), "{all}");
        assert!(all.contains("`loras`") && all.contains("`lora`"), "{all}");
    }

    #[test]
    fn contradictions_are_errors_with_fixes() {
        let e = TrainConfig::from_yaml(
            "lora:\n  rank: 0\n  apply_to_vision_encoder: false\n  apply_to_geometry_encoder: false\n  apply_to_detr_encoder: false\n  apply_to_detr_decoder: false\n  apply_to_mask_decoder: false\ntraining:\n  gradient_accumulation_steps: 0\n  mixed_precision: bf16\n  lr_scheduler: warmup_cosine\n",
            Path::new("bad.yaml"),
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "bad.yaml",
            "lora.rank is 0",
            "adapt nothing",
            "gradient_accumulation_steps is 0",
            "lr_scheduler",
            "bf16 with hardware.device cpu",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in {e}");
        }
    }

    #[test]
    fn effective_hyperparameters_count_optimizer_steps() {
        let (c, _) = TrainConfig::from_yaml(
            "training:\n  batch_size: 2\n  gradient_accumulation_steps: 8\n  num_epochs: 10\n  warmup_steps: 20\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let e = c.effective(778);
        assert_eq!(e.effective_batch_size, 16);
        assert_eq!(e.micro_batches_per_epoch, 389);
        assert_eq!(e.steps_per_epoch, 49);
        assert_eq!(e.total_steps, 490);
        assert!((e.warmup_epochs - 20.0 / 49.0).abs() < 1e-12);
    }

    #[test]
    fn malformed_yaml_names_the_file() {
        let e =
            TrainConfig::from_yaml("training: [1, 2\n", Path::new("broken.yaml")).unwrap_err().to_string();
        assert!(e.contains("broken.yaml") && e.contains("YAML"), "{e}");
    }
}
