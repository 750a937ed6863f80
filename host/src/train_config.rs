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
    /// Rank-stabilized LoRA (PEFT's `use_rslora`): scale = alpha / √rank, so a higher rank does
    /// not shrink the update.
    pub use_rslora: bool,
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
            use_rslora: false,
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
    /// lorahost: the words that fill the `num_negatives` negative prompts of an image when the
    /// dataset has too few categories absent from it (a one-class dataset has none). Each is
    /// trained as "not in this image", so list things that never appear in your images; a word
    /// naming one of the dataset's categories is never used. Empty: no generic fillers.
    /// Default: [`crate::data::coco::GENERIC_NEGATIVES`].
    pub generic_negatives: Vec<String>,
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
    /// Warmup as a fraction of the run's optimizer steps (transformers' `warmup_ratio`):
    /// `ceil(ratio × total)`, used when `warmup_steps` is 0.
    #[serde(deserialize_with = "num")]
    pub warmup_ratio: f64,
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
    /// Augmentation of training images: `true` = horizontal flip and zoom-out (p = 0.5 each),
    /// or a mapping of `hflip`, `vflip`, `zoom_out` (probabilities), `brightness` and
    /// `contrast` (amounts); see [`crate::data::augment`]. Seeded per image and epoch.
    pub augment: crate::data::augment::Augmentation,
    /// lorahost: when `data_dir` has no `train/` split yet, write the bundled synthetic crack
    /// dataset there first (demo and tests).
    pub synthetic: bool,
    /// lorahost: probability that a positive query also gets one of its target boxes as a
    /// visual exemplar prompt (SAM3's geometry path); 0 = text prompts only. Without exemplars the
    /// geometry encoder's box projections and self-attention receive no gradient.
    #[serde(deserialize_with = "num")]
    pub box_prompt_prob: f64,
    /// lorahost: activation checkpointing of the ViT blocks. `true`: each keeps only its input
    /// and is recomputed in backward (about one more ViT forward per step for a much smaller
    /// peak); `mlp`: each keeps all but fc1's output, recomputed in backward (one more fc1
    /// product per block, about 40% less ViT activation memory); `false`: everything kept.
    pub gradient_checkpointing: crate::sam3::vit_block::Checkpointing,
}

impl Default for TrainingSection {
    fn default() -> Self {
        TrainingSection {
            data_dir: PathBuf::from("data"),
            num_negatives: 2,
            generic_negatives: crate::data::coco::GENERIC_NEGATIVES.iter().map(|w| w.to_string()).collect(),
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
            warmup_ratio: 0.0,
            lr_scheduler: "cosine".into(),
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 3,
            mixed_precision: "no".into(),
            seed: 42,
            gradient_accumulation_steps: 1,
            augment: crate::data::augment::Augmentation::NONE,
            synthetic: false,
            box_prompt_prob: 0.0,
            gradient_checkpointing: Default::default(),
        }
    }
}

impl TrainingSection {
    /// The precision setting.
    pub fn precision(&self) -> Option<Precision> {
        match self.mixed_precision.trim().to_ascii_lowercase().as_str() {
            "no" | "none" | "fp32" | "f32" | "float32" | "false" | "off" | "" => Some(Precision::No),
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
    /// What the run logs to besides `metrics.jsonl` (transformers' `report_to`): `tensorboard`
    /// (the default: event files in `logging_dir`) or `none`. Written as a name or a list.
    pub report_to: Vec<String>,
}

impl OutputSection {
    /// Whether the run writes TensorBoard event files: `report_to` names `tensorboard` or
    /// `all`, or only integrations lorahost does not have (their tools import TensorBoard
    /// logs); not with `none` or an empty list.
    pub fn tensorboard(&self) -> bool {
        let names: Vec<String> = self.report_to.iter().map(|n| n.trim().to_ascii_lowercase()).collect();
        if names.iter().any(|n| n == "none") || names.is_empty() {
            return false;
        }
        names.iter().any(|n| n == "tensorboard" || n == "all")
            || names.iter().all(|n| OTHER_TRACKERS.contains(&n.as_str()))
    }
}

/// `report_to` names transformers takes that lorahost has no integration for.
const OTHER_TRACKERS: &[&str] = &[
    "wandb",
    "mlflow",
    "comet_ml",
    "clearml",
    "neptune",
    "dvclive",
    "azure_ml",
    "codecarbon",
    "dagshub",
    "flyte",
    "trackio",
    "swanlab",
];

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            output_dir: PathBuf::from("outputs/lorahost"),
            logging_dir: None,
            save_lora_only: true,
            push_to_hub: false,
            hub_model_id: None,
            report_to: vec!["tensorboard".into()],
        }
    }
}

/// `evaluation:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct EvaluationSection {
    /// Model-selection metric: "loss", "map" (COCO mask mAP), "cgf1", "iou" (= map), or the
    /// pixel metrics "pixel_f1", "relaxed_f1", "cldice" ([`crate::pixel_metrics`]).
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
    /// "cpu", "cuda", "cuda:N" (GPU N) or "auto".
    pub device: String,
    /// Accepted for compatibility (no effect in Rust).
    pub dataloader_pin_memory: bool,
    /// Accepted for compatibility (no effect in Rust).
    pub use_compile: bool,
}

impl HardwareSection {
    /// The GPU number of `device: cuda:N` (`cuda` alone: 0); `None` for cpu, auto and others.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        let d = self.device.trim().to_ascii_lowercase();
        if d == "cuda" {
            return Some(0);
        }
        d.strip_prefix("cuda:")?.trim().parse().ok()
    }
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
            "use_rslora",
        ],
    ),
    (
        "training",
        &[
            "data_dir",
            "num_negatives",
            "generic_negatives",
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
            "warmup_ratio",
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
    ("output", &["output_dir", "logging_dir", "save_lora_only", "push_to_hub", "hub_model_id", "report_to"]),
    ("evaluation", &["metric", "save_predictions", "compute_metrics_during_training"]),
    ("hardware", &["device", "dataloader_pin_memory", "use_compile"]),
];

/// The names `evaluation.metric` takes.
pub const METRICS: [&str; 7] = ["loss", "iou", "map", "cgf1", "pixel_f1", "relaxed_f1", "cldice"];

/// Keys that [`TrainConfig::from_yaml_unvalidated`] reads under lorahost's name or answers
/// with what to do instead (so they are not "unknown", in a config or an `--override`).
fn migrated(section: &str, key: &str) -> bool {
    ALIASES.iter().any(|(s, k, ..)| *s == section && *k == key)
        || pointer(section, key, &Value::Null, &Mapping::new()).is_some()
        || matches!(
            (section, key),
            ("training", "fp16" | "bf16" | "betas" | "train_data_path" | "val_data_path")
        )
}

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
            if k.starts_with('_') || k.starts_with("x-") {
                out.push(format!(
                    "section `{k}` is not a lorahost section (ignored; fine when it only holds YAML anchors for `<<:` merges)"
                ));
            } else if ["dataset", "checkpoint"].contains(&k) {
                // SAM3_LoRA's standalone layout: read by from_yaml_unvalidated.
            } else if k == "data" {
                out.push(
                    "unknown section `data` ignored: lorahost reads the dataset folder from training.data_dir (holding train/ and valid/)"
                        .into(),
                );
            } else if !sections.contains(&k) {
                // A key written at the top level instead of inside its section.
                let home = KNOWN.iter().find(|(_, keys)| keys.contains(&k)).map(|(s, _)| format!("{s}.{k}"));
                let hint = match home {
                    Some(h) => format!(
                        " (`{k}` is a key of a section: did you mean `{h}`, indented under `{}:`?)",
                        h.split('.').next().unwrap_or_default()
                    ),
                    None => {
                        suggest(k, &sections).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
                    }
                };
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
            if migrated(k, sub) {
                continue;
            }
            let hint = suggest(sub, keys).map(|s| format!(" (did you mean `{k}.{s}`?)")).unwrap_or_default();
            out.push(format!("unknown key `{k}.{sub}` ignored{hint}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reading other trainers' YAML: everything below runs inside `from_yaml_unvalidated`, on the
// parsed document, before the key checks and the typed read, and says what it did as warnings.
// ---------------------------------------------------------------------------------------------

use serde_yaml::{Mapping, Value};

/// Keys of SAM3_LoRA's forks, PEFT and transformers read under lorahost's name:
/// (section, key, lorahost's section, lorahost's key, what differs).
const ALIASES: &[(&str, &str, &str, &str, &str)] = &[
    ("lora", "r", "lora", "rank", ""),
    ("lora", "lora_alpha", "lora", "alpha", ""),
    ("lora", "lora_dropout", "lora", "dropout", ""),
    ("training", "lr", "training", "learning_rate", ""),
    ("training", "epochs", "training", "num_epochs", ""),
    ("training", "num_train_epochs", "training", "num_epochs", ""),
    ("training", "per_device_train_batch_size", "training", "batch_size", ""),
    ("training", "dataloader_num_workers", "training", "num_workers", ""),
    ("training", "lr_scheduler_type", "training", "lr_scheduler", ""),
    ("training", "grad_clip", "training", "max_grad_norm", ""),
    ("training", "clip_grad_norm", "training", "max_grad_norm", ""),
    ("training", "max_norm", "training", "max_grad_norm", ""),
    ("training", "gradient_clip", "training", "max_grad_norm", ""),
    ("training", "gradient_clip_val", "training", "max_grad_norm", ""),
    ("training", "max_epochs", "training", "num_epochs", ""),
    ("training", "scheduler", "training", "lr_scheduler", ""),
    ("training", "log_every_n_steps", "training", "logging_steps", " (counted in optimizer steps)"),
    ("output", "log_every_n_steps", "training", "logging_steps", " (counted in optimizer steps)"),
    (
        "training",
        "validate_every_n_iterations",
        "training",
        "eval_steps",
        " (counted in optimizer steps; 0 = once per epoch)",
    ),
    (
        "training",
        "eval_every_n_steps",
        "training",
        "eval_steps",
        " (counted in optimizer steps; 0 = once per epoch)",
    ),
    (
        "training",
        "keep_last_n_epoch_ckpts",
        "training",
        "save_total_limit",
        " (the newest N checkpoints are kept, 0 = all; with training.save_steps: 0 there is one per epoch)",
    ),
    (
        "output",
        "keep_last_n_epoch_ckpts",
        "training",
        "save_total_limit",
        " (the newest N checkpoints are kept, 0 = all; with training.save_steps: 0 there is one per epoch)",
    ),
    ("dataset", "data_root", "training", "data_dir", " (SAM3_LoRA's standalone layout)"),
    ("checkpoint", "save_dir", "output", "output_dir", " (SAM3_LoRA's standalone layout)"),
];

/// Keys of SAM3_LoRA's forks that lorahost does differently: what to do instead. The key is
/// not read. `active` values only: `false`, `null` and "" say nothing.
fn pointer(section: &str, key: &str, v: &Value, t: &Mapping) -> Option<Option<String>> {
    // A feature section of a fork (`srf_lite: {enabled: true, ...}`) is on unless it says
    // `enabled: false`.
    let switch = v.as_mapping().map(|m| m.get("enabled").and_then(as_bool) != Some(false));
    let shown = if v.is_mapping() { "{...}".to_string() } else { show(v) };
    let active = switch.unwrap_or_else(|| {
        !matches!(v, Value::Null | Value::Bool(false))
            && v.as_str().is_none_or(|s| !s.trim().is_empty() && !is_false_word(s))
    });
    let text = match (section, key) {
        ("model", "srf_lite") => {
            "lorahost has no SRF-lite adapters (jeb223's fork): this run trains the LoRA adapters only".into()
        }
        ("model", "depth_guidance") => {
            "lorahost has no depth-guidance branch (jeb223's fork): it trains on the RGB images only".into()
        }
        ("training", "boundary_optimization" | "semantic_optimization" | "depth_optimization") => {
            "lorahost has no boundary, semantic or depth auxiliary losses (jeb223's fork): it trains Meta's SAM3 loss, whose terms the `loss:` section weights".into()
        }
        ("training", "low_light_augmentation") => {
            "lorahost has no low-light augmentation (jeb223's fork); training.augment has brightness and contrast jitter, e.g. `augment: {hflip: 0.5, brightness: 0.3, contrast: 0.25}`".into()
        }
        ("training" | "output", "auto_resume") => {
            "lorahost resumes when asked: `lorahost train --config ... --resume` continues from the newest checkpoint in output_dir".to_string()
        }
        ("training" | "output", "resume_from") => format!(
            "pass it on the command line instead: `lorahost train --config ... --resume {}` (a checkpoint directory, output_dir/checkpoints/step-N)",
            v.as_str().unwrap_or("DIR")
        ),
        ("training" | "output", "save_every_epoch") => {
            let steps = t.get("save_steps").map(show).unwrap_or_else(|| "0".into());
            format!(
                "lorahost saves a checkpoint every training.save_steps optimizer steps, and once per epoch with save_steps: 0 (the default; here save_steps is {steps})"
            )
        }
        ("training" | "output", "save_resume_checkpoint" | "resume_checkpoint_name") => {
            "every lorahost checkpoint (output_dir/checkpoints/step-N) holds the whole training state that --resume continues from".into()
        }
        ("training" | "output", "save_config_each_run" | "config_snapshot_name") => {
            "lorahost always records the config as config.yaml in output_dir and in each checkpoint".into()
        }
        ("training" | "output", "epoch_ckpt_subdir" | "epoch_ckpt_name") => {
            "lorahost names its checkpoints output_dir/checkpoints/step-N".into()
        }
        ("training" | "output", "print_metrics_to_console") => {
            "lorahost logs the metrics every training.logging_steps to the console and to output_dir/metrics.jsonl".into()
        }
        ("training", "optimizer") => {
            if v.as_str().is_some_and(|s| s.trim().eq_ignore_ascii_case("adamw")) {
                return Some(None); // what lorahost does
            }
            "lorahost's optimizer is AdamW (training.weight_decay, adam_beta1, adam_beta2, adam_epsilon); there is no other".into()
        }
        ("hardware", "tf32" | "allow_tf32" | "cudnn_benchmark" | "use_fused_adamw" | "channels_last") => {
            "a PyTorch switch: no effect in lorahost (candle has no such setting); remove it".into()
        }
        ("hardware", "persistent_workers" | "prefetch_factor") => {
            "a PyTorch DataLoader setting: no effect in lorahost (its loader threads live for the whole run; training.num_workers sets how many)".into()
        }
        ("lora", "bias") => {
            if v.as_str().is_some_and(|s| s.trim().eq_ignore_ascii_case("none")) {
                return Some(None); // what lorahost does
            }
            "lorahost trains no biases (PEFT's bias: none); remove it".into()
        }
        _ => return None,
    };
    Some(active.then(|| format!("`{section}.{key}: {shown}` is not read: {text}")))
}

/// `s` is one of YAML 1.1's words for false.
fn is_false_word(s: &str) -> bool {
    matches!(s.trim().to_ascii_lowercase().as_str(), "false" | "no" | "n" | "off")
}

/// A YAML 1.1 boolean as PyYAML reads it (and 0/1).
fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "on" => Some(true),
            "false" | "no" | "n" | "off" => Some(false),
            _ => None,
        },
        Value::Number(n) => match n.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A number written as text: "5e-5" (YAML 1.1 reads it as a string), "1_000" (underscores
/// between digits, as Python's float() accepts).
fn number_text(s: &str) -> Option<f64> {
    let s = s.trim();
    s.parse().ok().or_else(|| s.replace('_', "").parse().ok()).filter(|_| !s.is_empty())
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => number_text(s),
        _ => None,
    }
}

/// A value as the user wrote it, for messages (no type names).
fn show(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(s) => format!("a list of {}", s.len()),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("{} {}", t.tag, show(&t.value)),
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (as_number(a), as_number(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (as_bool(a), as_bool(b)) {
            (Some(x), Some(y)) if !a.is_number() && !b.is_number() => x == y,
            _ => a == b || a.as_str().zip(b.as_str()).is_some_and(|(x, y)| x.trim() == y.trim()),
        },
    }
}

/// YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`), applied everywhere as PyYAML does: the
/// mapping's own keys win, then the merged mappings in order. Merged mappings are resolved
/// first, so chains of merges work.
fn apply_merges(v: &mut Value) -> Result<(), String> {
    match v {
        Value::Mapping(m) => {
            for (_, child) in m.iter_mut() {
                apply_merges(child)?;
            }
            if let Some(merge) = m.remove("<<") {
                let sources = match merge {
                    Value::Mapping(s) => vec![s],
                    Value::Sequence(list) => list
                        .into_iter()
                        .map(|e| match e {
                            Value::Mapping(s) => Ok(s),
                            other => Err(format!("`<<:` merges mappings; got {}", show(&other))),
                        })
                        .collect::<Result<_, _>>()?,
                    other => {
                        return Err(format!("`<<:` merges a mapping (`<<: *anchor`); got {}", show(&other)))
                    }
                };
                for s in sources {
                    for (k, val) in s {
                        m.entry(k).or_insert(val);
                    }
                }
            }
        }
        Value::Sequence(s) => {
            for e in s {
                apply_merges(e)?;
            }
        }
        Value::Tagged(t) => apply_merges(&mut t.value)?,
        _ => {}
    }
    Ok(())
}

/// What a setting holds.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Bool,
    Count,
    Number,
    Text,
    OptText,
    Path,
    OptPath,
    List,
    Precision,
    Checkpointing,
    Augment,
}

fn kind_of(section: &str, key: &str) -> Option<Kind> {
    use Kind::*;
    Some(match (section, key) {
        ("model", "name")
        | ("training", "lr_scheduler")
        | ("evaluation", "metric")
        | ("hardware", "device") => Text,
        ("model", "cache_dir" | "path") | ("output", "logging_dir") => OptPath,
        ("output", "hub_model_id") => OptText,
        ("training", "data_dir") | ("output", "output_dir") => Path,
        ("lora", "rank")
        | (
            "training",
            "num_negatives"
            | "batch_size"
            | "num_workers"
            | "num_epochs"
            | "warmup_steps"
            | "logging_steps"
            | "eval_steps"
            | "save_steps"
            | "save_total_limit"
            | "seed"
            | "gradient_accumulation_steps",
        ) => Count,
        ("lora", "alpha" | "dropout")
        | (
            "training",
            "learning_rate" | "weight_decay" | "adam_beta1" | "adam_beta2" | "adam_epsilon" | "max_grad_norm"
            | "box_prompt_prob" | "warmup_ratio",
        ) => Number,
        ("lora", "target_modules") | ("training", "generic_negatives") | ("output", "report_to") => List,
        ("training", "mixed_precision") => Precision,
        ("lora", k) if k.starts_with("apply_to_") || k == "use_rslora" => Bool,
        ("training", "gradient_checkpointing") => Checkpointing,
        ("training", "augment") => Augment,
        ("training", "synthetic")
        | ("output", "save_lora_only" | "push_to_hub")
        | ("evaluation", "save_predictions" | "compute_metrics_during_training")
        | ("hardware", "dataloader_pin_memory" | "use_compile") => Bool,
        _ => return None,
    })
}

/// Bring every known setting to the shape the typed read takes, as PyYAML would have read it:
/// YAML 1.1 booleans (yes/no/on/off/y/n), numbers written as text, `null` = the default
/// (`max_grad_norm: null` = no clipping, as in transformers). Errors name the key and what it
/// expected, never a Rust type.
fn normalize(doc: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let defaults = serde_yaml::to_value(TrainConfig::default()).unwrap_or_default();
    for (section, _) in KNOWN {
        let Some(sec) = doc.get_mut(*section) else { continue };
        if sec.is_null() {
            *sec = Value::Mapping(Mapping::new());
            continue;
        }
        let Some(m) = sec.as_mapping_mut() else {
            errors.push(format!("{section}: expected a mapping of `key: value` lines, got {}", show(sec)));
            doc.remove(*section);
            continue;
        };
        let keys: Vec<String> = m.keys().filter_map(|k| k.as_str().map(str::to_string)).collect();
        for key in keys {
            let Some(kind) = kind_of(section, &key) else { continue };
            let before = errors.len();
            normalize_value(m, section, &key, kind, &defaults, notes, errors);
            // A value lorahost cannot use is reported and dropped: the rest is still read.
            if errors.len() > before {
                m.remove(key.as_str());
            }
        }
    }
    normalize_plugins_and_loss(doc, errors);
}

/// [`normalize`] for one known key of `section` in `m`.
fn normalize_value(
    m: &mut Mapping,
    section: &str,
    key: &str,
    kind: Kind,
    defaults: &Value,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    {
        {
            let name = format!("{section}.{key}");
            let Some(v) = m.get_mut(key) else { return };
            if let Value::Tagged(t) = v {
                let inner = std::mem::replace(&mut t.value, Value::Null);
                *v = inner;
            }
            if v.is_null() && !matches!(kind, Kind::OptPath | Kind::OptText) {
                if name == "training.max_grad_norm" {
                    notes.push(
                        "`training.max_grad_norm: null` read as 0: no gradient clipping (as in transformers)"
                            .into(),
                    );
                    *v = Value::from(0.0);
                } else {
                    if name != "training.data_dir" {
                        let d = defaults.get(section).and_then(|s| s.get(key));
                        let d = d.map(|d| serde_yaml::to_string(d).unwrap_or_default().trim().to_string());
                        notes.push(format!("`{name}: null` read as its default ({})", d.unwrap_or_default()));
                    }
                    m.remove(key);
                }
                return;
            }
            let got = show(v);
            let bad = |what: &str| format!("{name}: expected {what}, got {got}");
            match kind {
                Kind::Bool => match as_bool(v) {
                    Some(b) => *v = Value::Bool(b),
                    None => errors.push(bad("true or false (yes/no, on/off also read)")),
                },
                Kind::Count => match as_number(v).filter(|_| !v.is_bool()) {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f.is_finite() => *v = Value::from(f as u64),
                    Some(_) => errors.push(bad("a whole number >= 0")),
                    None => errors.push(bad("a whole number")),
                },
                Kind::Number => match as_number(v) {
                    Some(f) => *v = Value::from(f),
                    None => errors.push(bad("a number")),
                },
                Kind::Text | Kind::OptText | Kind::Path | Kind::OptPath => match v {
                    Value::String(_) | Value::Null => {}
                    Value::Number(n) => *v = Value::String(n.to_string()),
                    _ => errors.push(bad(if matches!(kind, Kind::Path | Kind::OptPath) {
                        "a path"
                    } else {
                        "text"
                    })),
                },
                Kind::List => {
                    let (item, example) = if name == "training.generic_negatives" {
                        ("a word", "a list of words such as [teapot, violin] ([] for none)")
                    } else if name == "output.report_to" {
                        ("a name", "tensorboard or none")
                    } else {
                        ("a module name", "a list of module names such as [q_proj, v_proj]")
                    };
                    match v {
                        Value::Sequence(items) => {
                            for (i, e) in items.iter_mut().enumerate() {
                                match e {
                                    Value::String(_) => {}
                                    Value::Number(n) => *e = Value::String(n.to_string()),
                                    other => errors
                                        .push(format!("{name}[{i}]: expected {item}, got {}", show(other))),
                                }
                            }
                        }
                        _ => errors.push(bad(example)),
                    }
                }
                Kind::Checkpointing => match (as_bool(v), v.as_str().map(str::to_ascii_lowercase)) {
                    (Some(b), _) => *v = Value::Bool(b),
                    (None, Some(t)) if t == "mlp" => *v = Value::String(t),
                    (None, Some(t)) if t == "full" => *v = Value::Bool(true),
                    _ => errors.push(bad("true, false or mlp (fc1's output recomputed)")),
                },
                Kind::Augment => normalize_augment(v, notes, errors),
                Kind::Precision => match (v.as_str(), as_bool(v)) {
                    // YAML 1.1 `off` / `no` (and `false`) mean no mixed precision.
                    (_, Some(false)) => *v = Value::String("no".into()),
                    (_, Some(true)) => *v = Value::String("true".into()),
                    (Some(_), None) => {}
                    (None, None) => errors.push(bad("no, bf16 or fp16")),
                },
            }
        }
    }
}

/// [`normalize`] for `training.augment`: a boolean, or a mapping whose values become numbers
/// (`true` in a mapping = 0.5 for a flip or zoom-out, 0.1 for brightness or contrast).
fn normalize_augment(v: &mut Value, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    use crate::data::augment::Augmentation;
    if let Some(b) = as_bool(v) {
        *v = Value::Bool(b);
        return;
    }
    let Some(m) = v.as_mapping_mut() else {
        errors.push(format!(
            "training.augment: expected true, false or a mapping of hflip, vflip, zoom_out (probabilities) and brightness, contrast (amounts), got {}",
            show(v)
        ));
        return;
    };
    let keys: Vec<Value> = m.keys().cloned().collect();
    for key in keys {
        let name = key.as_str().unwrap_or_default().to_string();
        let Some(x) = m.get_mut(&key) else { continue };
        let photometric = matches!(name.as_str(), "brightness" | "contrast");
        let value = match (as_bool(x), as_number(x)) {
            _ if x.is_null() => Some(0.0),
            (Some(b), _) if x.is_bool() || x.is_string() => {
                let on = if photometric { 0.1 } else { 0.5 };
                if b {
                    notes.push(format!("`training.augment.{name}: true` read as {on}"));
                }
                Some(if b { on } else { 0.0 })
            }
            (_, Some(n)) if Augmentation::accepts(&name, n) => Some(n),
            _ => None,
        };
        match value {
            Some(n) => *x = Value::from(n),
            None => errors.push(format!(
                "training.augment.{name}: expected {}, got {}",
                Augmentation::expected(&name),
                show(x)
            )),
        }
    }
}

/// [`normalize`] for `plugins:` and `loss:`: wrong shapes are errors and are dropped.
fn normalize_plugins_and_loss(doc: &mut Mapping, errors: &mut Vec<String>) {
    if let Some(list) = doc.get_mut("plugins").and_then(Value::as_sequence_mut) {
        let mut i = 0;
        list.retain_mut(|p| {
            let keep = normalize_plugin(i, p, errors);
            i += 1;
            keep
        });
    }
    if let Some(p) = doc.get("plugins").filter(|p| !p.is_sequence() && !p.is_null()) {
        errors.push(format!("plugins: expected a list (- path: plugin.wasm), got {}", show(p)));
        doc.remove("plugins");
    }
    if let Some(l) = doc.get("loss").filter(|l| !l.is_mapping() && !l.is_null()) {
        errors.push(format!("loss: expected a mapping of loss term weights, got {}", show(l)));
        doc.remove("loss");
    }
    for k in ["plugins", "loss"] {
        if doc.get(k).is_some_and(Value::is_null) {
            doc.remove(k);
        }
    }
}

/// One `plugins:` entry brought to shape; `false` (after an error) when it cannot be used.
fn normalize_plugin(i: usize, p: &mut Value, errors: &mut Vec<String>) -> bool {
    let Some(m) = p.as_mapping_mut() else {
        errors.push(format!(
            "plugins[{i}]: expected a mapping with a path (- path: plugin.wasm), got {}",
            show(p)
        ));
        return false;
    };
    if !m.get("path").is_some_and(|p| p.is_string()) {
        errors.push(format!("plugins[{i}].path: expected the path of a .wasm plugin"));
        return false;
    }
    for key in ["budget_ms", "memory_mb"] {
        if let Some(v) = m.get_mut(key) {
            match as_number(v).filter(|f| *f >= 0.0 && f.fract() == 0.0 && !v.is_bool()) {
                Some(f) => *v = Value::from(f as u64),
                None if v.is_null() => {
                    m.remove(key);
                }
                None => {
                    errors.push(format!("plugins[{i}].{key}: expected a whole number, got {}", show(v)));
                    m.remove(key);
                }
            }
        }
    }
    true
}

/// The section `name` of `doc`, created when missing (a `null` section becomes empty).
fn section<'a>(doc: &'a mut Mapping, name: &str) -> Option<&'a mut Mapping> {
    let v = doc.entry(Value::String(name.into())).or_insert(Value::Null);
    if v.is_null() {
        *v = Value::Mapping(Mapping::new());
    }
    v.as_mapping_mut()
}

/// Whether `doc[section][key]` is set (and not null).
fn has(doc: &Mapping, section: &str, key: &str) -> bool {
    doc.get(section).and_then(|s| s.get(key)).is_some_and(|v| !v.is_null())
}

/// Read `from` as `to`: moved when `to` is not given, compared when it is.
fn alias(
    doc: &mut Mapping,
    (sec, key, to_sec, to_key, extra): (&str, &str, &str, &str, &str),
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    let Some(v) = doc.get_mut(sec).and_then(Value::as_mapping_mut).and_then(|m| m.remove(key)) else {
        return;
    };
    let (from, to) = (format!("{sec}.{key}"), format!("{to_sec}.{to_key}"));
    // `null` says nothing (as for every other key): the setting keeps its own value or default.
    if v.is_null() {
        drop_empty_foreign_section(doc, sec);
        return;
    }
    let existing = doc.get(to_sec).and_then(|s| s.get(to_key)).filter(|v| !v.is_null()).cloned();
    match existing {
        Some(e) if !same_value(&e, &v) => errors.push(format!(
            "`{from}: {}` and `{to}: {}` are both given and differ ({from} is read as {to}): keep one",
            show(&v),
            show(&e)
        )),
        Some(_) => {
            notes.push(format!("`{from}` read as `{to}`{extra}; {to} gives the same value: remove {from}"))
        }
        None => {
            notes.push(format!("`{from}: {}` read as `{to}`{extra}", show(&v)));
            if let Some(t) = section(doc, to_sec) {
                t.insert(Value::String(to_key.into()), v);
            }
        }
    }
    drop_empty_foreign_section(doc, sec);
}

/// Remove `sec` when it is another layout's section (not lorahost's) and nothing is left in it.
fn drop_empty_foreign_section(doc: &mut Mapping, sec: &str) {
    if doc.get(sec).and_then(Value::as_mapping).is_some_and(Mapping::is_empty)
        && !KNOWN.iter().any(|(s, _)| *s == sec)
    {
        doc.remove(sec);
    }
}

/// The dataset root a legacy `train_data_path` / `val_data_path` names: the folder holding
/// `train/` (or `valid/`), given as that split folder or its annotation file.
fn legacy_root(path: &str, split: &str) -> Result<PathBuf, String> {
    let mut p = PathBuf::from(path.trim().trim_end_matches(['/', '\\']));
    let file = crate::data::coco::ANNOTATION_FILE;
    if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        if p.file_name().is_some_and(|n| n != file) {
            return Err(format!(
                "lorahost reads <data_dir>/{split}/{file}; rename the annotation file to {file}"
            ));
        }
        p.pop();
    }
    match p.file_name().and_then(|n| n.to_str()) {
        Some(n) if n == split => {}
        Some(n @ ("val" | "validation" | "valid_set")) if split == "valid" => {
            return Err(format!(
                "lorahost reads the validation split from <data_dir>/valid/ (Roboflow's name), not {n}/: rename the folder and set training.data_dir"
            ))
        }
        _ => {
            return Err(format!(
                "lorahost reads <data_dir>/train/{file} and <data_dir>/valid/{file}; this path is not such a {split}/ folder: set training.data_dir to the folder holding train/ and valid/"
            ))
        }
    }
    p.pop();
    Ok(if p.as_os_str().is_empty() { PathBuf::from(".") } else { p })
}

/// Two paths name the same folder (as written, from the working directory).
fn same_dir(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| {
        let a = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let a = lexically_normal(&a);
        std::fs::canonicalize(&a).unwrap_or(a)
    };
    norm(a) == norm(b)
}

/// SAM3_LoRA's legacy `training.train_data_path` / `val_data_path`: they give `data_dir` when it
/// is not set, and must agree with it when it is.
fn legacy_data_paths(doc: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let Some(t) = doc.get_mut("training").and_then(Value::as_mapping_mut) else { return };
    let mut roots = Vec::new();
    for (key, split) in [("train_data_path", "train"), ("val_data_path", "valid")] {
        let Some(v) = t.remove(key) else { continue };
        match v {
            Value::Null => {}
            Value::String(p) => match legacy_root(&p, split) {
                Ok(root) => roots.push((key, p, root)),
                Err(e) => errors.push(format!("training.{key} {p:?} (SAM3_LoRA's legacy layout): {e}")),
            },
            other => errors.push(format!("training.{key}: expected a path, got {}", show(&other))),
        }
    }
    if roots.is_empty() {
        return;
    }
    if let Some(dd) = t.get("data_dir").and_then(Value::as_str).map(PathBuf::from) {
        for (key, p, root) in roots {
            if same_dir(&dd, &root) {
                notes.push(format!(
                    "`training.{key}` (legacy) agrees with training.data_dir {}, which is what lorahost reads: remove {key}",
                    dd.display()
                ));
            } else {
                errors.push(format!(
                    "training.{key} {p:?} is not under training.data_dir {} (lorahost reads <data_dir>/train and <data_dir>/valid; the legacy key says the dataset is {}): make them agree or remove {key}",
                    dd.display(),
                    root.display()
                ));
            }
        }
        return;
    }
    let (key, p, root) = roots[0].clone();
    for (k2, p2, r2) in &roots[1..] {
        if !same_dir(&root, r2) {
            errors.push(format!(
                "training.{key} {p:?} and training.{k2} {p2:?} are in different folders; lorahost reads both splits from one training.data_dir (<data_dir>/train, <data_dir>/valid): set it"
            ));
            return;
        }
    }
    notes.push(format!(
        "training.data_dir is not set: read as {} from the legacy training.{key} {p:?} (the folder holding train/ and valid/); write `data_dir: {}` instead",
        root.display(),
        root.display()
    ));
    t.insert(Value::String("data_dir".into()), Value::String(root.display().to_string()));
}

/// A `training.augment:` mapping in other trainers' words: flip aliases read under lorahost's
/// names, `enabled: false` switches augmentation off, and transforms lorahost does not have are
/// named and left out. (Values are checked by [`normalize_augment`].)
fn augment_mapping(doc: &mut Mapping, notes: &mut Vec<String>, ignored: &mut Vec<String>) {
    let Some(t) = doc.get_mut("training").and_then(Value::as_mapping_mut) else { return };
    let Some(Value::Mapping(m)) = t.get("augment").cloned() else { return };
    let mut out = Mapping::new();
    let mut unsupported = Vec::new();
    let mut enabled = true;
    for (k, v) in &m {
        let k = k.as_str().map(str::to_string).unwrap_or_else(|| show(k));
        let name = match k.as_str() {
            "horizontal_flip" | "fliplr" | "h_flip" | "random_horizontal_flip" => "hflip",
            "vertical_flip" | "flipud" | "v_flip" | "random_vertical_flip" => "vflip",
            "enabled" | "enable" => {
                enabled = as_bool(v) != Some(false);
                continue;
            }
            k if crate::data::augment::KEYS.contains(&k) => k,
            _ => {
                if !v.is_null() && as_bool(v) != Some(false) && as_number(v) != Some(0.0) {
                    unsupported.push(k);
                }
                continue;
            }
        };
        if name != k {
            notes.push(format!("`training.augment.{k}` read as `training.augment.{name}`"));
        }
        out.insert(Value::String(name.into()), v.clone());
    }
    if !unsupported.is_empty() {
        ignored.push(format!(
            "training.augment: {} not an augmentation lorahost has (it has {}; ignored)",
            unsupported.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                + if unsupported.len() == 1 { " is" } else { " are" },
            crate::data::augment::KEYS.join(", ")
        ));
    }
    if !enabled {
        notes.push("`training.augment.enabled: false`: no augmentation".into());
        out = Mapping::new();
    }
    t.insert(Value::String("augment".into()), Value::Mapping(out));
}

/// transformers' `fp16: true` / `bf16: true` flags.
fn precision_flags(doc: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let Some(t) = doc.get_mut("training").and_then(Value::as_mapping_mut) else { return };
    let mut want = Vec::new();
    for key in ["fp16", "bf16"] {
        let Some(v) = t.remove(key) else { continue };
        match as_bool(&v) {
            Some(true) => want.push(key),
            Some(false) => notes.push(format!(
                "`training.{key}: false` has no effect: training.mixed_precision sets the precision"
            )),
            None if v.is_null() => {}
            None => errors.push(format!("training.{key}: expected true or false, got {}", show(&v))),
        }
    }
    match want.as_slice() {
        [] => {}
        [a, b] => errors.push(format!(
            "training.{a} and training.{b} are both true: keep one (or set training.mixed_precision)"
        )),
        [w] => {
            let existing = t.get("mixed_precision").filter(|v| !v.is_null()).cloned();
            match existing {
                Some(e) => {
                    let name = e.as_str().map(|s| s.trim().to_ascii_lowercase()).unwrap_or_default();
                    let same = matches!(
                        (*w, name.as_str()),
                        ("fp16", "fp16" | "float16" | "f16") | ("bf16", "bf16" | "bfloat16")
                    );
                    if same {
                        notes.push(format!("`training.{w}: true` read as `training.mixed_precision: {w}`, which is given too: remove {w}"));
                    } else {
                        errors.push(format!(
                            "`training.{w}: true` and `training.mixed_precision: {}` are both given and differ: keep one",
                            show(&e)
                        ));
                    }
                }
                None => {
                    notes.push(format!("`training.{w}: true` read as `training.mixed_precision: {w}`"));
                    t.insert(Value::String("mixed_precision".into()), Value::String((*w).into()));
                }
            }
        }
        _ => unreachable!(),
    }
}

/// `training.betas: [b1, b2]` (SAM3_LoRA's standalone layout).
fn betas(doc: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let Some(t) = doc.get_mut("training").and_then(Value::as_mapping_mut) else { return };
    let Some(v) = t.remove("betas") else { return };
    let pair = v.as_sequence().filter(|s| s.len() == 2);
    let Some(pair) = pair.map(|s| (s[0].clone(), s[1].clone())) else {
        errors.push(format!("training.betas: expected [beta1, beta2], got {}", show(&v)));
        return;
    };
    let mut moved = Vec::new();
    for (key, b) in [("adam_beta1", pair.0), ("adam_beta2", pair.1)] {
        match t.get(key).filter(|e| !e.is_null()) {
            Some(e) if !same_value(e, &b) => errors.push(format!(
                "`training.betas` gives {key} {} but `training.{key}: {}` is also given: keep one",
                show(&b),
                show(e)
            )),
            Some(_) => {}
            None => {
                moved.push(format!("{key} {}", show(&b)));
                t.insert(Value::String(key.into()), b);
            }
        }
    }
    notes.push(format!(
        "`training.betas` read as training.adam_beta1 / adam_beta2{}",
        if moved.is_empty() { String::new() } else { format!(" ({})", moved.join(", ")) }
    ));
}

/// transformers' scheduler names.
fn scheduler_names(doc: &mut Mapping, notes: &mut Vec<String>) {
    let Some(t) = doc.get_mut("training").and_then(Value::as_mapping_mut) else { return };
    let Some(Value::String(s)) = t.get_mut("lr_scheduler") else { return };
    let name = s.trim().to_ascii_lowercase().replace('-', "_");
    let to = match name.as_str() {
        "constant_with_warmup" | "constant_schedule_with_warmup" => "constant",
        "linear_with_warmup" | "linear_schedule_with_warmup" | "warmup_linear" => "linear",
        "cosine_with_warmup" | "cosine_schedule_with_warmup" | "warmup_cosine" => "cosine",
        _ => return,
    };
    let steps = t.get("warmup_steps").map(show).unwrap_or_else(|| "0".into());
    notes.push(format!(
        "`training.lr_scheduler: {name}` read as {to}: every lorahost schedule first warms up linearly over training.warmup_steps optimizer steps (here {steps})"
    ));
    t.insert(Value::String("lr_scheduler".into()), Value::String(to.into()));
}

/// A `target_modules` entry written as a regular expression (PEFT's string form).
fn looks_like_regex(p: &str) -> bool {
    p.starts_with('.') || p.contains(['|', '(', ')', '^', '$', '\\', '[', ']', '+', '{', '}'])
}

/// The glob patterns a simple regular expression means (alternatives become list entries).
fn regex_to_globs(re: &str) -> Vec<String> {
    let re = re.trim().trim_start_matches('^').trim_end_matches('$');
    // One level of alternation: a|b, or prefix(a|b)suffix.
    let alts: Vec<String> = match (re.find('('), re.rfind(')')) {
        (Some(o), Some(c)) if o < c && !re[..o].contains('|') && !re[c + 1..].contains('|') => re[o + 1..c]
            .trim_start_matches("?:")
            .split('|')
            .map(|a| format!("{}{a}{}", &re[..o], &re[c + 1..]))
            .collect(),
        _ => re.split('|').map(str::to_string).collect(),
    };
    alts.iter()
        .map(|a| {
            let mut out = String::new();
            let mut chars = a.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    '.' if matches!(chars.peek(), Some('*' | '+')) => {
                        chars.next();
                        out.push('*');
                    }
                    '.' => out.push('?'),
                    '(' | ')' | '^' | '$' => {}
                    c => out.push(c),
                }
            }
            out
        })
        .collect()
}

/// `lora.target_modules` as a string ("all-linear", one name) and regex entries.
fn target_modules(doc: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let Some(l) = doc.get_mut("lora").and_then(Value::as_mapping_mut) else { return };
    let Some(v) = l.get_mut("target_modules") else { return };
    let all_linear = |s: &str| matches!(s.trim().to_ascii_lowercase().as_str(), "all-linear" | "all_linear");
    let regex_error = |s: &str| {
        let globs: Vec<String> = regex_to_globs(s).into_iter().map(|g| format!("{g:?}")).collect();
        format!(
            "lora.target_modules {s:?} looks like a regular expression: lorahost does not take regex patterns; it takes module names and globs (`*` = any run of characters, `?` = one), matched against the last part of the module path, or against the whole dotted path when the pattern has a dot (e.g. \"*.self_attn.q_proj\"); as globs this is [{}]",
            globs.join(", ")
        )
    };
    if let Value::String(s) = v {
        let s = s.trim().to_string();
        if all_linear(&s) {
            notes.push(format!("`lora.target_modules: {s}` read as [\"*\"]: every linear layer of the components the lora.apply_to_* flags enable"));
            *v = Value::Sequence(vec![Value::String("*".into())]);
        } else if looks_like_regex(&s) {
            errors.push(regex_error(&s));
            *v = Value::Sequence(Vec::new()); // reported; no second error about the type
        } else {
            // No module name holds a comma or a space: "q_proj, v_proj" lists two.
            let parts: Vec<String> = s
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            let shown: Vec<String> = parts.iter().map(|p| format!("{p:?}")).collect();
            notes.push(format!("`lora.target_modules: {s}` read as the list [{}]", shown.join(", ")));
            *v = Value::Sequence(parts.into_iter().map(Value::String).collect());
        }
        return;
    }
    let Some(items) = v.as_sequence_mut() else { return };
    for e in items {
        let Some(s) = e.as_str().map(str::to_string) else { continue };
        if all_linear(&s) {
            notes.push(format!("lora.target_modules entry {s:?} read as \"*\": every linear layer of the components the lora.apply_to_* flags enable"));
            *e = Value::String("*".into());
        } else if looks_like_regex(s.trim()) {
            errors.push(regex_error(&s));
        }
    }
}

/// `output.report_to` as transformers takes it: a name, `"a, b"`, or a list; lower case. Names
/// of other trackers get a note (TensorBoard event files are written, which they import); an
/// unknown name is an error with the names taken.
fn report_to(doc: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let Some(v) = doc.get_mut("output").and_then(Value::as_mapping_mut).and_then(|o| o.get_mut("report_to"))
    else {
        return;
    };
    let names: Vec<String> = match v {
        Value::Null => vec!["tensorboard".into()],
        Value::String(s) => s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        Value::Sequence(items) => items.iter().filter_map(|e| e.as_str().map(str::to_string)).collect(),
        _ => return, // the type check names it
    };
    let names: Vec<String> = names.iter().map(|n| n.trim().to_ascii_lowercase()).collect();
    for n in &names {
        if OTHER_TRACKERS.contains(&n.as_str()) {
            let import = match n.as_str() {
                "wandb" => " (`wandb sync --sync-tensorboard <logging_dir>` uploads them to W&B)",
                "mlflow" | "comet_ml" | "clearml" | "neptune" => " (its TensorBoard import reads them)",
                _ => "",
            };
            notes.push(format!(
                "output.report_to: lorahost has no {n} integration; it writes TensorBoard event files to the logging_dir instead{import}"
            ));
        } else if !matches!(n.as_str(), "tensorboard" | "all" | "none") {
            let hint = suggest(n, &["tensorboard", "none", "all"])
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            errors.push(format!(
                "output.report_to: `{n}` is not a logger lorahost knows{hint}: use tensorboard (event files in the logging_dir, the default) or none"
            ));
        }
    }
    *v = Value::Sequence(names.into_iter().map(Value::String).collect());
}

/// What reading a config found besides the values: every message about a key, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigNotes {
    /// Keys that name no setting: ignored (with a suggestion when one is close).
    pub unknown: Vec<String>,
    /// Keys lorahost knows from other trainers but does not apply, with what to do instead.
    pub ignored: Vec<String>,
    /// Keys read under lorahost's name, and values read as lorahost takes them.
    pub read_as: Vec<String>,
    /// Settings the config leaves out whose lorahost default does something SAM3_LoRA's
    /// trainer did not (a run that moves over behaves differently): not in [`Self::iter`],
    /// `doctor` lists them.
    pub defaulted: Vec<String>,
}

impl ConfigNotes {
    /// Every message: the unknown keys, then the ignored ones, then how keys were read.
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.unknown.iter().chain(&self.ignored).chain(&self.read_as)
    }

    /// Nothing to say.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

/// A config as [`TrainConfig::read`] could read it.
#[derive(Debug, Clone)]
pub struct ConfigRead {
    /// The settings (a value that could not be used is at its default).
    pub config: TrainConfig,
    /// What was said about keys.
    pub notes: ConfigNotes,
    /// Values lorahost cannot use, and settings that contradict each other, each with its fix.
    pub problems: Vec<String>,
}

/// Set `key` (dot-separated path) in `doc` to `value`, creating mappings on the way.
pub(crate) fn set_path(doc: &mut Value, key: &str, value: Value) {
    let mut node = doc;
    for part in key.split('.') {
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        let Some(map) = node.as_mapping_mut() else { return };
        node = map.entry(Value::String(part.to_string())).or_insert(Value::Null);
    }
    *node = value;
}

/// The setting a dotted key gives (lorahost's own name for SAM3_LoRA's aliases and legacy keys).
fn setting_of(key: &str) -> String {
    let (sec, k) = key.split_once('.').unwrap_or(("", key));
    if let Some((.., to_sec, to_key, _)) = ALIASES.iter().find(|(s, a, ..)| *s == sec && *a == k) {
        return format!("{to_sec}.{to_key}");
    }
    match (sec, k) {
        ("training", "train_data_path" | "val_data_path") => "training.data_dir".into(),
        ("training", "fp16" | "bf16") => "training.mixed_precision".into(),
        _ => key.to_string(),
    }
}

/// Every spelling of settings that other trainers' configs have ([`setting_of`] reads them).
fn spellings() -> impl Iterator<Item = String> {
    let aliases = ALIASES.iter().flat_map(|(s, k, ts, tk, _)| [format!("{s}.{k}"), format!("{ts}.{tk}")]);
    let legacy = ["train_data_path", "val_data_path", "fp16", "bf16"].map(|k| format!("training.{k}"));
    aliases.chain(legacy)
}

/// A command-line override: `key` set to `value` in `doc`, and every other spelling of the
/// same setting in the file removed (the command line wins over the file, whichever name the
/// file used).
fn apply_override(doc: &mut Mapping, key: &str, value: Value, notes: &mut Vec<String>) {
    // `training.augment.vflip=0.5` over the file's `augment: true` adds to what `true` means.
    if key.starts_with("training.augment.") {
        if let Some(a) = doc.get_mut("training").and_then(|t| t.get_mut("augment")) {
            if let Some(on) = as_bool(a) {
                let policy =
                    if on { crate::data::augment::Augmentation::DEFAULT } else { Default::default() };
                let m: Mapping = crate::data::augment::KEYS
                    .iter()
                    .zip(policy.values())
                    .map(|(k, v)| (Value::String(k.to_string()), Value::from(v)))
                    .collect();
                *a = Value::Mapping(m);
            }
        }
    }
    let setting = setting_of(key);
    let mut seen = std::collections::BTreeSet::new();
    let candidates = spellings().chain(std::iter::once(setting.clone()));
    for other in candidates.filter(|o| o != key && setting_of(o) == setting) {
        if !seen.insert(other.clone()) {
            continue;
        }
        let Some((sec, k)) = other.split_once('.') else { continue };
        let removed = doc.get_mut(sec).and_then(Value::as_mapping_mut).and_then(|m| m.remove(k));
        if removed.is_some_and(|v| !v.is_null()) {
            notes.push(format!("`{other}` in the file is replaced by --override {key}"));
        }
        drop_empty_foreign_section(doc, sec);
    }
    let mut v = Value::Mapping(std::mem::take(doc));
    set_path(&mut v, key, value);
    if let Value::Mapping(m) = v {
        *doc = m;
    }
}

/// [`ConfigNotes::defaulted`] for `doc`.
fn defaults_unlike_sam3_lora(doc: &Mapping) -> Vec<String> {
    let d = TrainingSection::default();
    [
        (
            "lr_scheduler",
            format!("a {} LR schedule", d.lr_scheduler),
            "kept the learning rate constant (its scheduler keys were never applied, F10)",
        ),
        (
            "max_grad_norm",
            format!("gradient clipping at norm {}", d.max_grad_norm),
            "did not clip gradients (F10)",
        ),
        ("seed", format!("seed {}", d.seed), "was not seeded (each run differed)"),
    ]
    .into_iter()
    .filter(|(key, ..)| !has(doc, "training", key))
    .map(|(key, what, theirs)| {
        format!("training.{key} is not given: lorahost applies its default, {what}; SAM3_LoRA's trainer {theirs}. Set training.{key} to choose")
    })
    .chain(lora_defaults(doc))
    .collect()
}

/// The LoRA keys SAM3_LoRA requires (it stops with a KeyError without them) that the config
/// leaves out, with the default lorahost applies instead.
fn lora_defaults(doc: &Mapping) -> Vec<String> {
    let d = LoraSection::default();
    [
        ("rank", d.rank.to_string()),
        ("alpha", d.alpha.to_string()),
        ("dropout", d.dropout.to_string()),
        ("target_modules", format!("[{}]", d.target_modules.join(", "))),
    ]
    .into_iter()
    .filter(|(key, _)| !has(doc, "lora", key))
    .map(|(key, value)| {
        format!("lora.{key} is not given: lorahost applies its default, {value}; SAM3_LoRA's trainer requires it (it stops with a KeyError). Set lora.{key} to choose")
    })
    .collect()
}

/// What [`migrate`] and [`normalize`] found: notes by kind, and the values lorahost cannot use
/// (each such key is dropped, so the rest of the config can still be read and checked).
#[derive(Default)]
struct Reading {
    notes: ConfigNotes,
    errors: Vec<String>,
}

/// Sections and keys of the standalone layout, TC4451's and others that have a lorahost
/// equivalent: read, pointed at, or warned about by name.
fn migrate(doc: &mut Mapping, r: &mut Reading) {
    let (notes, errors) = (&mut r.notes.read_as, &mut r.errors);
    for a in ALIASES {
        alias(doc, *a, notes, errors);
    }
    for sec in ["dataset", "checkpoint"] {
        if let Some(v) = doc.remove(sec) {
            let keys: Vec<String> = v
                .as_mapping()
                .into_iter()
                .flat_map(|m| m.keys())
                .map(|k| k.as_str().map(str::to_string).unwrap_or_else(|| show(k)))
                .collect();
            if !keys.is_empty() {
                let read = if sec == "dataset" { "dataset.data_root" } else { "checkpoint.save_dir" };
                r.notes.ignored.push(format!(
                    "{} not read: lorahost reads only {read} of SAM3_LoRA's standalone `{sec}:` section",
                    keys.iter().map(|k| format!("`{sec}.{k}`")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    precision_flags(doc, notes, errors);
    betas(doc, notes, errors);
    for sec in ["model", "training", "output", "hardware", "lora"] {
        let Some(m) = doc.get(sec).and_then(Value::as_mapping).cloned() else { continue };
        let t = doc.get("training").and_then(Value::as_mapping).cloned().unwrap_or_default();
        for (k, v) in &m {
            let Some(k) = k.as_str() else { continue };
            if let Some(note) = pointer(sec, k, v, &t) {
                r.notes.ignored.extend(note);
                if let Some(m) = doc.get_mut(sec).and_then(Value::as_mapping_mut) {
                    m.remove(k);
                }
            }
        }
    }
    augment_mapping(doc, notes, &mut r.notes.ignored);
    scheduler_names(doc, notes);
    target_modules(doc, notes, errors);
    report_to(doc, notes, errors);
    legacy_data_paths(doc, notes, errors);
    mask_decoder_flag(doc, notes);
}

/// `lora.apply_to_mask_decoder: false`: lorahost applies it; SAM3_LoRA's flag matched no module,
/// so runs there adapted the segmentation head's prompt cross-attention regardless.
fn mask_decoder_flag(doc: &Mapping, notes: &mut Vec<String>) {
    let v = doc.get("lora").and_then(|l| l.get("apply_to_mask_decoder"));
    if v.and_then(as_bool) == Some(false) {
        notes.push(
            "`lora.apply_to_mask_decoder: false` is applied: no adapters in the mask decoder (segmentation head). SAM3_LoRA's flag matched no module (F9), so its runs adapted the head's prompt cross-attention anyway; set it true to train what those runs trained"
                .into(),
        );
    }
}

/// The key of a YAML line (`key: value`, `- key: value`), unquoted.
fn line_key(t: &str) -> Option<&str> {
    let end = t.find(": ").or_else(|| t.strip_suffix(':').map(str::len))?;
    let k = t[..end].trim();
    Some(k.trim_matches(|c| c == '"' || c == '\''))
}

/// Where `key` is given twice in one mapping of `text`: (line of the second, line of the first).
fn duplicate_key_lines(text: &str, key: &str) -> Option<(usize, usize)> {
    let mut seen = std::collections::HashMap::new();
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start_matches(' ');
        if t.trim().is_empty() || t.starts_with('#') {
            continue;
        }
        let mut indent = line.len() - t.len();
        while stack.last().is_some_and(|(ind, _)| *ind >= indent) {
            stack.pop();
        }
        let mut t = t;
        if let Some(rest) = t.strip_prefix("- ") {
            stack.push((indent, i));
            indent += 2 + (rest.len() - rest.trim_start().len());
            t = rest.trim_start();
        }
        let parent = stack.last().map(|(_, l)| *l);
        if line_key(t) == Some(key) {
            if let Some(first) = seen.insert((indent, parent), i + 1) {
                return Some((i + 1, first));
            }
        }
        stack.push((indent, i));
    }
    None
}

/// A YAML parse error as the user can act on it: the duplicate key's own line, and what YAML
/// does not allow when the file has TAB indentation, Python docstrings or several documents.
fn yaml_error(text: &str, e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    if let Some(rest) = msg.split("duplicate entry with key \"").nth(1) {
        if let Some(key) = rest.split('"').next() {
            if let Some((line, first)) = duplicate_key_lines(text, key) {
                return format!(
                    "not valid YAML: line {line}: `{key}` is given a second time in the same mapping (first at line {first}); each key may appear once: keep one"
                );
            }
        }
    }
    if msg.contains(" as u128") || msg.contains(" as i128") {
        // serde_yaml's words for a whole number beyond 64 bits.
        let at = e.location().map(|l| format!("line {}: ", l.line())).unwrap_or_default();
        let number = msg.split('`').nth(1).unwrap_or("a number");
        return format!(
            "{at}{number} is too large a whole number (at most 18446744073709551615): give a smaller value"
        );
    }
    let mut out = format!("not valid YAML: {msg}");
    let lines: Vec<&str> = text.lines().collect();
    let err_line = e.location().map(|l| l.line());
    let tabbed = |l: &str| l.chars().take_while(|c| c.is_whitespace()).any(|c| c == '\t');
    let tab_line = err_line
        .filter(|n| lines.get(n.wrapping_sub(1)).is_some_and(|l| tabbed(l)))
        .or_else(|| lines.iter().position(|l| tabbed(l)).map(|i| i + 1));
    if let Some(n) = tab_line {
        out += &format!(
            " (line {n} is indented with a TAB: YAML does not allow TABs in indentation; indent with spaces)"
        );
    }
    if let Some(i) = lines.iter().position(|l| {
        let t = l.trim_start();
        t.starts_with("\"\"\"") || t.starts_with("'''")
    }) {
        out += &format!(" (line {}: a Python \"\"\"docstring\"\"\" is not YAML; make it a # comment)", i + 1);
    }
    if msg.contains("more than one document") {
        out += " (the file holds several YAML documents separated by `---`; PyYAML's safe_load refuses that too: keep one)";
    }
    out
}

impl TrainConfig {
    /// Read a YAML file: the config and the warnings (unknown keys) to show.
    pub fn from_file(path: &Path) -> Result<(Self, ConfigNotes), TrainConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TrainConfigError::Read { path: path.into(), source })?;
        Self::from_yaml(&text, path)
    }

    /// Parse YAML text (`origin` names it in messages).
    pub fn from_yaml(text: &str, origin: &Path) -> Result<(Self, ConfigNotes), TrainConfigError> {
        let (cfg, warnings) = Self::from_yaml_unvalidated(text, origin)?;
        cfg.validate(origin)?;
        Ok((cfg, warnings))
    }

    /// Parse YAML text into a config without [`Self::validate`] (so every contradiction can
    /// be listed on its own, as `doctor` does): the notes (unknown keys, keys read under
    /// another name) with it. A value lorahost cannot use is an error.
    pub fn from_yaml_unvalidated(text: &str, origin: &Path) -> Result<(Self, ConfigNotes), TrainConfigError> {
        Self::from_yaml_overridden(text, origin, &[])
    }

    /// [`Self::from_yaml_unvalidated`] with command-line `overrides` (a dotted key and its value)
    /// applied over the file's values (see [`ConfigRead`]).
    pub fn from_yaml_overridden(
        text: &str,
        origin: &Path,
        overrides: &[(String, Value)],
    ) -> Result<(Self, ConfigNotes), TrainConfigError> {
        let read = Self::read(text, origin, overrides)?;
        if !read.problems.is_empty() {
            return Err(TrainConfigError::Contradiction { path: origin.into(), problems: read.problems });
        }
        Ok((read.config, read.notes))
    }

    /// Read YAML text as far as it can be read: `overrides` (a dotted key and its value, from
    /// `--override`) replace the file's value and every other spelling of the same setting in
    /// the file (SAM3_LoRA's aliases and legacy keys); each value lorahost cannot use is a
    /// problem, dropped so that the rest is still read (as `doctor` lists them). Only YAML that
    /// does not parse, or a config that is not a mapping, is an error.
    pub fn read(
        text: &str,
        origin: &Path,
        overrides: &[(String, Value)],
    ) -> Result<ConfigRead, TrainConfigError> {
        let invalid = |reason: String| TrainConfigError::Invalid { path: origin.into(), reason };
        // A UTF-8 byte-order mark (Windows editors write one) is not part of the document.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut value: Value = serde_yaml::from_str(text).map_err(|e| invalid(yaml_error(text, &e)))?;
        if value.is_null() {
            value = Value::Mapping(Mapping::new());
        }
        apply_merges(&mut value).map_err(|e| invalid(format!("YAML merge key: {e}")))?;
        let Value::Mapping(doc) = &mut value else {
            return Err(invalid(
                "the config must be a mapping of sections (model, lora, training, ...)".into(),
            ));
        };
        let mut r = Reading::default();
        for (key, v) in overrides {
            apply_override(doc, key, v.clone(), &mut r.notes.read_as);
        }
        migrate(doc, &mut r);
        normalize(doc, &mut r.notes.read_as, &mut r.errors);
        // SAM3_LoRA requires data_dir; lorahost's default is only for configs built in code.
        let data_dir_given = has(doc, "training", "data_dir");
        r.notes.defaulted = defaults_unlike_sam3_lora(doc);
        r.notes.unknown = unknown_keys(&value);
        let mut config: TrainConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| invalid(format!("{}: {}", e.path(), e.inner())))?;
        if !data_dir_given {
            config.training.data_dir = PathBuf::new();
        }
        Ok(ConfigRead { config, notes: r.notes, problems: r.errors })
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
                "training.data_dir is not set (SAM3_LoRA requires it too): set it to the dataset folder holding train/_annotations.coco.json and valid/"
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
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            p.push(format!("training.weight_decay is {}: must be >= 0", t.weight_decay));
        }
        // (The update runs in f32, where an ε below its smallest number is 0 too.)
        if !(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite() && t.adam_epsilon as f32 > 0.0) {
            // AdamW divides by √v̂ + ε: with ε = 0 an adapter whose gradient is exactly 0 (every
            // LoRA A while its B is still 0, at the first step) gets 0/0 = NaN.
            p.push(format!(
                "training.adam_epsilon is {}: must be > 0 and finite, and representable in f32 (AdamW divides by sqrt(v) + epsilon, so with 0 every adapter whose gradient is 0, e.g. each LoRA A at the first step while B is still 0, becomes NaN); use the default 1e-8",
                t.adam_epsilon
            ));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            p.push("training.adam_beta1/adam_beta2 must be in [0, 1)".into());
        }
        if t.precision().is_none() {
            p.push(format!("training.mixed_precision {:?}: use no, bf16 or fp16", t.mixed_precision));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            p.push(format!(
                "training.warmup_ratio {} must be in [0, 1) (the fraction of the run's optimizer steps spent warming up)",
                t.warmup_ratio
            ));
        }
        if t.scheduler().is_none() {
            p.push(format!(
                "training.lr_scheduler {:?}: lorahost has cosine, linear, constant and inverse_sqrt (each after a linear warmup of training.warmup_steps); another schedule can be written as a schedule plugin (plugins/cosine_schedule is the reference)",
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
        let device = self.hardware.device.trim().to_ascii_lowercase();
        if device == "mps" || device.starts_with("mps:") {
            p.push(format!(
                "hardware.device {:?}: Apple GPUs (Metal) are not supported by lorahost's candle build; use cpu",
                self.hardware.device
            ));
        } else if !["cpu", "cuda", "auto"].contains(&device.as_str())
            && self.hardware.cuda_ordinal().is_none()
        {
            p.push(format!(
                "hardware.device {:?}: use cpu, cuda, cuda:N (the GPU numbered N) or auto",
                self.hardware.device
            ));
        }
        if !METRICS.contains(&self.evaluation.metric.to_ascii_lowercase().as_str()) {
            p.push(format!(
                "evaluation.metric {:?}: use loss, iou (= map), map, cgf1, or for thin structures pixel_f1, relaxed_f1 or cldice",
                self.evaluation.metric
            ));
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
        // transformers' rule: warmup_steps when given (> 0), else ceil(warmup_ratio × total).
        let warmup_steps = if t.warmup_steps > 0 || t.warmup_ratio <= 0.0 {
            t.warmup_steps
        } else {
            (t.warmup_ratio * total_steps as f64).ceil() as usize
        };
        Effective {
            effective_batch_size: t.batch_size * t.gradient_accumulation_steps,
            micro_batches_per_epoch,
            steps_per_epoch,
            total_steps,
            warmup_steps,
            warmup_epochs: if steps_per_epoch == 0 {
                0.0
            } else {
                warmup_steps as f64 / steps_per_epoch as f64
            },
            lora_scale: crate::lora::lora_scale(self.lora.alpha, self.lora.rank, self.lora.use_rslora),
        }
    }

    /// The config as a run records it (`config.yaml` in the output directory and in each
    /// checkpoint): every setting, defaults included, paths made absolute, and `extra_plugins`
    /// (the command line's) appended to `plugins`, so `lorahost train --config` on the record
    /// trains the same run from any working directory. A `logging_dir` inside `output_dir` is
    /// recorded relative to it (as training resolves a relative one), so the record run with
    /// another `output_dir` logs there, not into the recorded run's folder.
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
        if let Some(l) = c.output.logging_dir.as_mut() {
            // Relative to output_dir where it lies inside it (a relative one always does).
            let inside = if l.is_relative() { c.output.output_dir.join(&*l) } else { l.clone() };
            let inside = lexically_normal(&inside);
            match inside.strip_prefix(&c.output.output_dir) {
                Ok(rel) if !rel.as_os_str().is_empty() => *l = rel.to_path_buf(),
                Ok(_) => *l = PathBuf::from("."),
                Err(_) => abs(l),
            }
        }
        for p in [&mut c.model.path, &mut c.model.cache_dir].into_iter().flatten() {
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
        cfg.output.logging_dir = Some("logs".into());
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
        // A logging_dir inside output_dir stays relative to it, as training resolves it (so the
        // record run with another output_dir logs there).
        assert_eq!(back.output.logging_dir, Some(PathBuf::from("logs")));
        let mut inside = cfg.clone();
        inside.output.logging_dir = Some(cwd.join(&cfg.output.output_dir).join("tb/../logs2"));
        assert_eq!(
            inside.snapshot(&[]).get("output").unwrap().get("logging_dir").unwrap().as_str(),
            Some("logs2")
        );
        let mut outside = cfg.clone();
        outside.output.logging_dir = Some("/var/log/runs".into());
        assert_eq!(
            outside.snapshot(&[]).get("output").unwrap().get("logging_dir").unwrap().as_str(),
            Some("/var/log/runs")
        );
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
        let (_, warnings) = TrainConfig::from_file(&repo_config("demo.yaml")).unwrap();
        assert!(warnings.is_empty(), "demo.yaml: {warnings:?}");
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
            "training:\n  data_dir: d\n  learning_rate: \"5e-5\"\n  batch_size: \"4\"\n  max_grad_norm: 1\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(c.training.learning_rate, 5e-5);
        assert_eq!(c.training.batch_size, 4);
        let e =
            TrainConfig::from_yaml("training:\n  data_dir: d\n  learning_rate: fast\n", Path::new("c.yaml"))
                .unwrap_err();
        assert!(e.to_string().contains("training.learning_rate") && e.to_string().contains("fast"), "{e}");
    }

    #[test]
    fn unknown_keys_warn_by_name_with_a_suggestion() {
        let (_, w) = TrainConfig::from_yaml(
            "training:\n  data_dir: d\n  warmup_stpes: 10\nlora:\n  rnak: 4\nloras: {}\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(w.unknown.len(), 3, "{w:?}");
        let all = w.unknown.join("\n");
        assert!(all.contains("`training.warmup_stpes`") && all.contains("`training.warmup_steps`"), "{all}");
        assert!(all.contains("`lora.rnak`") && all.contains("`lora.rank`"), "{all}");
        assert!(all.contains("`loras`") && all.contains("`lora`"), "{all}");
    }

    #[test]
    fn contradictions_are_errors_with_fixes() {
        let e = TrainConfig::from_yaml(
            "lora:\n  rank: 0\n  apply_to_vision_encoder: false\n  apply_to_geometry_encoder: false\n  apply_to_detr_encoder: false\n  apply_to_detr_decoder: false\n  apply_to_mask_decoder: false\ntraining:\n  gradient_accumulation_steps: 0\n  mixed_precision: bf16\n  lr_scheduler: cosine_with_restarts\n",
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

    /// ε = 0 makes AdamW write 0/0 = NaN into every adapter whose gradient is 0 (each LoRA A
    /// at the first step): refused at load, naming the key and the fix.
    #[test]
    fn a_zero_or_non_finite_adam_epsilon_is_refused() {
        for eps in ["0", "-1e-8", ".nan", ".inf", "1e-300"] {
            let e = TrainConfig::from_yaml(
                &format!("training:\n  data_dir: d\n  adam_epsilon: {eps}\n"),
                Path::new("eps.yaml"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("training.adam_epsilon is") && e.contains("1e-8"), "{eps}: {e}");
        }
        let (c, _) = TrainConfig::from_yaml(
            "training:\n  data_dir: d\n  adam_epsilon: 1e-12\n",
            Path::new("eps.yaml"),
        )
        .unwrap();
        assert_eq!(c.training.adam_epsilon, 1e-12);
    }

    #[test]
    fn effective_hyperparameters_count_optimizer_steps() {
        let (c, _) = TrainConfig::from_yaml(
            "training:\n  data_dir: d\n  batch_size: 2\n  gradient_accumulation_steps: 8\n  num_epochs: 10\n  warmup_steps: 20\n",
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
    fn parse(yaml: &str) -> Result<(TrainConfig, Vec<String>), String> {
        TrainConfig::from_yaml_unvalidated(yaml, Path::new("c.yaml"))
            .map(|(c, notes)| (c, notes.iter().cloned().collect()))
            .map_err(|e| e.to_string())
    }

    /// No message about a key lorahost reads or answers calls it unknown or a typo.
    fn no_typo_text(w: &[String]) {
        for m in w {
            assert!(!m.contains("unknown") && !m.contains("typo") && !m.contains("did you mean"), "{m}");
        }
    }

    /// SAM3_LoRA's minimal/base configs give the dataset only as legacy train_data_path /
    /// val_data_path: they set data_dir (never a silent ./data), and contradict it loudly.
    #[test]
    fn legacy_data_paths_give_data_dir_or_contradict_it() {
        for train in ["/d/pothole/train", "/d/pothole/train/", "/d/pothole/train/_annotations.coco.json"] {
            let (c, w) =
                parse(&format!("training:\n  train_data_path: {train}\n  val_data_path: /d/pothole/valid\n"))
                    .unwrap();
            assert_eq!(c.training.data_dir, PathBuf::from("/d/pothole"), "{train}");
            assert!(w.iter().any(|m| m.contains("train_data_path") && m.contains("/d/pothole")), "{w:?}");
            no_typo_text(&w);
        }
        let (c, _) = parse("training:\n  val_data_path: data/valid\n").unwrap();
        assert_eq!(c.training.data_dir, PathBuf::from("data"));
        let (c, w) =
            parse("training:\n  data_dir: /d/pothole\n  train_data_path: /d/pothole/train\n").unwrap();
        assert_eq!(c.training.data_dir, PathBuf::from("/d/pothole"));
        assert!(w.iter().any(|m| m.contains("agrees")), "{w:?}");
        for (yaml, needle) in [
            (
                "training:\n  data_dir: /d/cracks\n  train_data_path: /d/pothole/train\n",
                "not under training.data_dir",
            ),
            ("training:\n  train_data_path: /a/train\n  val_data_path: /b/valid\n", "different folders"),
            ("training:\n  train_data_path: /d/images\n", "set training.data_dir"),
            ("training:\n  val_data_path: /d/val\n", "valid/"),
            ("training:\n  train_data_path: /d/train/annotations.json\n", "_annotations.coco.json"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(needle) && e.contains("_data_path"), "{yaml}: {e}");
        }
        // Without data_dir and without a legacy key: an error naming the key (SAM3_LoRA
        // requires it), reported by validation so doctor lists it with the others.
        let (c, _) = parse("training:\n  batch_size: 2\n").unwrap();
        assert_eq!(c.training.data_dir, PathBuf::new());
        let e = TrainConfig::from_yaml("training:\n  batch_size: 2\n", Path::new("c.yaml")).unwrap_err();
        assert!(e.to_string().contains("training.data_dir is not set"), "{e}");
        let e = TrainConfig::from_yaml("", Path::new("c.yaml")).unwrap_err();
        assert!(e.to_string().contains("training.data_dir"), "{e}");
    }

    /// PyYAML applies `<<: *anchor` merges; so does lorahost (nested and listed ones too),
    /// before the key checks.
    #[test]
    fn yaml_merge_keys_are_applied() {
        let (c, w) = parse(
            "_base: &base\n  data_dir: d\n  batch_size: 4\n  learning_rate: 3e-3\n\
             _more: &more\n  <<: *base\n  num_epochs: 7\n\
             _last: &last\n  seed: 5\n  batch_size: 9\n\
             training:\n  <<: [*more, *last]\n  learning_rate: 2e-3\n\
             lora:\n  rank: &r 4\n  alpha: *r\n",
        )
        .unwrap();
        let t = &c.training;
        assert_eq!(t.data_dir, PathBuf::from("d"));
        assert_eq!((t.batch_size, t.num_epochs, t.seed), (4, 7, 5), "the first merge wins");
        assert_eq!(t.learning_rate, 2e-3, "the mapping's own key wins");
        assert_eq!((c.lora.rank, c.lora.alpha), (4, 4.0));
        assert!(w.iter().all(|m| !m.contains("training.<<")), "{w:?}");
        assert!(parse("training:\n  <<: 3\n").unwrap_err().contains("<<"));
    }

    /// Fork, PEFT and transformers names are read as lorahost's, with a note; both names with
    /// different values are an error; keys lorahost does differently say what to do.
    /// Notes come by kind; `null` on another layout's key and an empty standalone section say
    /// nothing; forks' names for the scheduler, clipping and epochs are read; each value that
    /// cannot be used is its own problem, dropped so that the rest is still read.
    #[test]
    fn notes_by_kind_nulls_and_problems_read_leniently() {
        let read = |y: &str| TrainConfig::read(y, Path::new("c.yaml"), &[]).unwrap();
        let r = read(
            "dataset:\n  data_root: null\ncheckpoint: {}\ntraining:\n  data_dir: d\n  scheduler: linear\n\
             \x20\x20gradient_clip: 0.5\n  max_epochs: 3\n  auto_resume: true\n  warmup_stpes: 1\n",
        );
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let t = &r.config.training;
        assert_eq!((t.data_dir.as_path(), t.max_grad_norm, t.num_epochs), (Path::new("d"), 0.5, 3));
        assert_eq!(t.scheduler(), Some(Scheduler::Linear));
        assert_eq!(r.notes.unknown.len(), 1, "{:?}", r.notes);
        assert!(r.notes.unknown[0].contains("warmup_stpes"));
        assert_eq!(r.notes.ignored.len(), 1, "{:?}", r.notes);
        assert!(r.notes.ignored[0].contains("auto_resume"));
        assert_eq!(r.notes.read_as.len(), 3, "{:?}", r.notes);
        assert!(
            r.notes.iter().all(|n| !n.contains("dataset.") && !n.contains("checkpoint.")),
            "{:?}",
            r.notes
        );
        // Three unusable values: three problems, each key at its default, the rest read.
        let r = read(
            "training:\n  data_dir: d\n  batch_size: many\n  learning_rate: 3e-4\n  fp16: true\n  bf16: true\n\
             lora: 7\nplugins:\n  - path: a.wasm\n    budget_ms: soon\n  - 3\n",
        );
        assert_eq!(r.problems.len(), 5, "{:?}", r.problems);
        assert_eq!(r.config.training.batch_size, TrainingSection::default().batch_size);
        assert_eq!(r.config.training.learning_rate, 3e-4);
        assert_eq!(r.config.lora, LoraSection::default());
        assert_eq!(r.config.plugins.len(), 1);
        assert!(r.config.plugins[0].budget_ms.is_none());
        let e = TrainConfig::from_yaml_unvalidated("training:\n  batch_size: many\n", Path::new("c.yaml"));
        assert!(matches!(e, Err(TrainConfigError::Contradiction { .. })));
        // SAM3_LoRA's mask-decoder flag matched nothing there; lorahost applies it, and says so.
        let r = read("lora:\n  apply_to_mask_decoder: false\ndata:\n  root: d\n");
        assert!(r.notes.read_as.iter().any(|n| n.contains("F9")), "{:?}", r.notes);
        assert!(r.notes.unknown.iter().any(|n| n.contains("training.data_dir")), "{:?}", r.notes);
        // A section's key at the top level names its section.
        let r = read("learning_rate: 1e-4\ntraining:\n  batch_size: 2\n");
        assert!(
            r.notes.unknown.iter().any(|n| n.contains("did you mean `training.learning_rate`")),
            "{:?}",
            r.notes
        );
        // Left out: lorahost's schedule, clipping and seed, and the LoRA keys SAM3_LoRA requires,
        // said apart from the other notes.
        assert_eq!(r.notes.defaulted.len(), 7, "{:?}", r.notes);
        assert!(r.notes.defaulted.iter().any(|n| n.contains("lora.rank is not given") && n.contains("16")));
        assert!(r.notes.iter().all(|n| !n.contains("is not given")));
        let r = read("training:\n  lr_scheduler: constant\n  max_grad_norm: 0\n  seed: 1\nlora:\n  r: 8\n  lora_alpha: 16\n  dropout: 0\n  target_modules: [q_proj]\n");
        assert!(r.notes.defaulted.is_empty(), "{:?}", r.notes);
        // A whole number beyond 64 bits: its line and a plain fix, no serde wording.
        let e = TrainConfig::from_yaml("training:\n  seed: 99999999999999999999\n", Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("99999999999999999999 is too large") && !e.contains("u128"), "{e}");
    }

    #[test]
    fn fork_and_peft_keys_are_read_or_pointed_at() {
        let (c, w) = parse(
            "lora:\n  r: 4\n  lora_alpha: 8\n  lora_dropout: 0.05\n  bias: none\n\
             training:\n  data_dir: d\n  lr: 3e-4\n  epochs: 5\n  grad_clip: 0.5\n  fp16: true\n\
             \x20\x20log_every_n_steps: 7\n  validate_every_n_iterations: 50\n  keep_last_n_epoch_ckpts: 2\n\
             \x20\x20warmup_ratio: 0.1\n  optimizer: adamw\n",
        )
        .unwrap();
        let (l, t) = (&c.lora, &c.training);
        assert_eq!((l.rank, l.alpha, l.dropout), (4, 8.0, 0.05));
        assert_eq!((t.learning_rate, t.num_epochs, t.max_grad_norm), (3e-4, 5, 0.5));
        assert_eq!((t.logging_steps, t.eval_steps, t.save_total_limit), (7, 50, 2));
        assert_eq!(t.precision(), Some(Precision::Fp16));
        let all = w.join("\n");
        for (from, to) in [
            ("lora.r", "lora.rank"),
            ("lora.lora_alpha", "lora.alpha"),
            ("training.lr", "training.learning_rate"),
            ("training.grad_clip", "training.max_grad_norm"),
            ("training.fp16", "training.mixed_precision"),
            ("training.validate_every_n_iterations", "training.eval_steps"),
            ("training.keep_last_n_epoch_ckpts", "training.save_total_limit"),
        ] {
            assert!(
                w.iter().any(|m| m.contains(from) && m.contains("read as") && m.contains(to)),
                "{from}: {all}"
            );
        }
        // transformers' warmup_ratio is a lorahost key: ceil(0.1 × total) when warmup_steps is 0.
        assert!(!all.contains("warmup_ratio"), "{all}");
        assert_eq!(t.warmup_ratio, 0.1);
        assert_eq!(
            c.effective(100).warmup_steps,
            (0.1f64 * c.effective(100).total_steps as f64).ceil() as usize
        );
        let mut with_steps = c.clone();
        with_steps.training.warmup_steps = 3;
        assert_eq!(with_steps.effective(100).warmup_steps, 3, "warmup_steps > 0 wins, as in transformers");
        no_typo_text(&w);
        for (yaml, needle) in [
            ("training:\n  lr: 1e-4\n  learning_rate: 2e-4\n", "training.lr"),
            ("lora:\n  r: 4\n  rank: 8\n", "lora.r"),
            ("training:\n  fp16: yes\n  mixed_precision: bf16\n", "training.fp16"),
            ("training:\n  fp16: true\n  bf16: true\n", "both true"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(needle) && e.contains("keep one"), "{yaml}: {e}");
        }
        let (c, w) = parse("training:\n  lr: \"1e-4\"\n  learning_rate: 0.0001\n  bf16: on\n").unwrap();
        assert_eq!(c.training.precision(), Some(Precision::Bf16));
        assert!(w.iter().any(|m| m.contains("same value")), "{w:?}");

        // TC4451's output keys, Mrxiaoyuer's hardware keys, the standalone layout.
        let (c, w) = parse(
            "dataset:\n  data_root: /data/x\n  image_size: 1008\ncheckpoint:\n  save_dir: ckpt\n\
             training:\n  betas: [0.9, 0.95]\n\
             output:\n  auto_resume: true\n  resume_from: runs/a/checkpoints/step-10\n  save_every_epoch: true\n\
             \x20\x20keep_last_n_epoch_ckpts: 3\n  epoch_ckpt_name: e.pt\n\
             hardware:\n  allow_tf32: true\n  cudnn_benchmark: true\n  use_fused_adamw: true\n",
        )
        .unwrap();
        assert_eq!(c.training.data_dir, PathBuf::from("/data/x"));
        assert_eq!(c.output.output_dir, PathBuf::from("ckpt"));
        assert_eq!(
            (c.training.adam_beta1, c.training.adam_beta2, c.training.save_total_limit),
            (0.9, 0.95, 3)
        );
        let all = w.join("\n");
        for needle in [
            "`dataset.data_root: \"/data/x\"` read as `training.data_dir`",
            "`checkpoint.save_dir: \"ckpt\"` read as `output.output_dir`",
            "`dataset.image_size`",
            "--resume` continues",
            "--resume runs/a/checkpoints/step-10",
            "save_steps: 0",
            "hardware.allow_tf32",
            "hardware.use_fused_adamw",
            "candle",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
        no_typo_text(&w);
        // An override of such a key is not refused as unknown.
        assert!(unknown_keys(&serde_yaml::from_str("training:\n  lr: 1\n  fp16: true\n").unwrap()).is_empty());
    }

    /// jeb223's feature sections: named as not applied when on, silent when `enabled: false`,
    /// never "unknown".
    #[test]
    fn fork_feature_sections_are_answered_by_whether_they_are_on() {
        let (_, w) = parse(
            "model:\n  srf_lite:\n    enabled: true\n    num_levels: 4\n  depth_guidance:\n    enabled: false\n    depth_dir: depth\n\
             training:\n  data_dir: d\n  low_light_augmentation:\n    enabled: true\n  boundary_optimization:\n    enabled: false\n\
             \x20\x20semantic_optimization:\n    loss_weight: 20\n",
        )
        .unwrap();
        let all = w.join("\n");
        assert!(all.contains("`model.srf_lite: {...}` is not read: lorahost has no SRF-lite"), "{all}");
        assert!(
            all.contains("`training.low_light_augmentation: {...}`") && all.contains("brightness"),
            "{all}"
        );
        assert!(
            all.contains("`training.semantic_optimization: {...}`"),
            "a section without `enabled` is on: {all}"
        );
        assert!(!all.contains("depth_guidance") && !all.contains("boundary_optimization"), "{all}");
        assert!(!all.contains("unknown"), "{all}");
    }

    /// `training.augment`: booleans, lorahost's mapping, clary97's and other forks' spellings,
    /// values out of range as problems, and overrides on top of `augment: true`.
    #[test]
    fn augment_reads_booleans_mappings_and_other_spellings() {
        use crate::data::augment::Augmentation;
        let aug = |y: &str| parse(&format!("training:\n  data_dir: d\n  augment: {y}\n")).unwrap();
        assert_eq!(aug("true").0.training.augment, Augmentation::DEFAULT);
        assert_eq!(aug("off").0.training.augment, Augmentation::NONE);
        assert_eq!(aug("null").0.training.augment, Augmentation::NONE);
        // SAM3-LoRA-Crack's transforms, written out; a flip given as true is p = 0.5.
        let (c, w) = aug("{hflip: true, vflip: true, brightness: 0.1, contrast: 0.1}");
        assert_eq!(c.training.augment, Augmentation::SAM3_LORA_CRACK);
        assert!(w.iter().any(|n| n.contains("hflip: true` read as 0.5")), "{w:?}");
        // Keys left out are off; aliases read under lorahost's names; zero is off.
        let (c, w) = aug("{flipud: 0.3, zoom_out: 1, contrast: 0}");
        assert_eq!(
            c.training.augment,
            Augmentation { vflip: 0.3, zoom_out: 1.0, ..Augmentation::NONE },
            "{w:?}"
        );
        assert!(w.iter().any(|n| n.contains("`training.augment.flipud` read as `training.augment.vflip`")));
        // Transforms lorahost lacks are named (not the ones switched off); the rest is read.
        let (c, w) = aug("{hflip: 0.5, rotate: 15, hue: 0, saturation: false}");
        assert_eq!(c.training.augment, Augmentation { hflip: 0.5, ..Augmentation::NONE });
        let all = w.join("\n");
        assert!(all.contains("`rotate` is not an augmentation") && !all.contains("hue"), "{all}");
        assert_eq!(aug("{enabled: false, hflip: true}").0.training.augment, Augmentation::NONE);
        // A value out of range is a problem naming the key and the range; the rest is read.
        let read = |y: &str| TrainConfig::read(y, Path::new("c.yaml"), &[]).unwrap();
        let r = read("training:\n  seed: 3\n  augment:\n    hflip: 2\n");
        assert_eq!(r.config.training.seed, 3);
        assert_eq!(r.config.training.augment, Augmentation::NONE);
        assert!(
            r.problems.iter().any(|p| p.contains("training.augment.hflip") && p.contains("[0, 1]")),
            "{:?}",
            r.problems
        );
        let r = read("training:\n  augment: [hflip]\n");
        assert!(r.problems.iter().any(|p| p.contains("training.augment: expected true, false or a mapping")));
        // An override of one transform adds to the file's `augment: true`.
        let over = |file: &str, k: &str, v: &str| {
            let o = vec![(k.to_string(), serde_yaml::from_str(v).unwrap())];
            TrainConfig::read(file, Path::new("c.yaml"), &o).unwrap().config.training.augment
        };
        let t = "training:\n  augment: true\n";
        assert_eq!(
            over(t, "training.augment.vflip", "0.5"),
            Augmentation { vflip: 0.5, ..Augmentation::DEFAULT }
        );
        assert_eq!(over(t, "training.augment", "false"), Augmentation::NONE);
        assert_eq!(
            over("{}", "training.augment.brightness", "0.2"),
            Augmentation { brightness: 0.2, ..Augmentation::NONE }
        );
        // The run's record reads back as written.
        let (c, _) = aug("{vflip: 0.25, contrast: 0.05}");
        let again = parse(&serde_yaml::to_string(&c).unwrap()).unwrap().0;
        assert_eq!(again.training.augment, c.training.augment);
    }

    /// What PyYAML (YAML 1.1) accepts: yes/no/on/off booleans, null = the default, a BOM;
    /// messages without Rust type names; hints for TABs and Python docstrings.
    #[test]
    fn yaml_1_1_values_nulls_and_parse_hints() {
        let (c, _) = parse(
            "\u{feff}lora:\n  apply_to_vision_encoder: yes\n  apply_to_text_encoder: On\n  apply_to_geometry_encoder: off\n\
             \x20\x20apply_to_detr_encoder: N\n  apply_to_mask_decoder: FALSE\n\
             training:\n  data_dir: d\n  augment: Y\n  max_grad_norm: ~\n  warmup_steps: null\n  seed: 3.0\n  learning_rate: 1_000e-7\n\
             output:\n  push_to_hub: no\nhardware:\n  dataloader_pin_memory: off\n",
        )
        .unwrap();
        let l = &c.lora;
        assert!(l.apply_to_vision_encoder && l.apply_to_text_encoder && !l.apply_to_geometry_encoder);
        assert!(!l.apply_to_detr_encoder && !l.apply_to_mask_decoder && c.training.augment.is_on());
        assert_eq!(c.training.max_grad_norm, 0.0, "null = no clipping");
        assert_eq!((c.training.warmup_steps, c.training.seed), (0, 3));
        assert!((c.training.learning_rate - 1e-4).abs() < 1e-18);
        assert!(!c.output.push_to_hub && !c.hardware.dataloader_pin_memory);
        use crate::sam3::vit_block::Checkpointing;
        for (v, want) in [
            ("yes", Checkpointing::Full),
            ("off", Checkpointing::Off),
            ("mlp", Checkpointing::Mlp),
            ("Full", Checkpointing::Full),
        ] {
            let (c, _) =
                parse(&format!("training:\n  data_dir: d\n  gradient_checkpointing: {v}\n")).unwrap();
            assert_eq!(c.training.gradient_checkpointing, want, "{v}");
        }
        for mp in ["off", "no", "~", "false", "float32", "fp32", "'off'"] {
            let (c, _) = parse(&format!("training:\n  data_dir: d\n  mixed_precision: {mp}\n")).unwrap();
            assert_eq!(c.training.precision(), Some(Precision::No), "{mp}");
        }
        for (yaml, needle) in [
            ("training:\n  seed: true\n", "training.seed: expected a whole number, got true"),
            ("training:\n  seed: -1\n", "training.seed: expected a whole number >= 0, got -1"),
            ("training:\n  learning_rate: true\n", "training.learning_rate: expected a number, got true"),
            ("lora:\n  apply_to_text_encoder: maybe\n", "lora.apply_to_text_encoder: expected true or false"),
            ("lora:\n  target_modules: {a: 1}\n", "lora.target_modules: expected a list"),
            (
                "training:\n  gradient_checkpointing: 2\n",
                "training.gradient_checkpointing: expected true, false or mlp",
            ),
            ("training: 5\n", "training: expected a mapping"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
            assert!(!e.contains("enum") && !e.contains("struct") && !e.contains("invalid type"), "{e}");
        }
        let e = parse("model:\n\tpath: x\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("TAB"), "{e}");
        let e = parse("lora:\n  rank: 8\n  \"\"\"LoRA rank\"\"\"\n  alpha: 16\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("docstring") && e.contains("# comment"), "{e}");
    }

    /// transformers' scheduler names: the warmup variants are lorahost's schedules (all warm
    /// up); the others are an error that lists what there is and where to write another.
    #[test]
    fn hf_scheduler_names() {
        for (name, want) in [
            ("constant_with_warmup", Scheduler::Constant),
            ("linear_schedule_with_warmup", Scheduler::Linear),
            ("linear_with_warmup", Scheduler::Linear),
            ("cosine_with_warmup", Scheduler::Cosine),
            ("cosine_schedule_with_warmup", Scheduler::Cosine),
        ] {
            let (c, w) = parse(&format!("training:\n  data_dir: d\n  lr_scheduler: {name}\n")).unwrap();
            assert_eq!(c.training.scheduler(), Some(want), "{name}");
            assert!(w.iter().any(|m| m.contains(name) && m.contains("warmup_steps")), "{w:?}");
        }
        for name in ["cosine_with_restarts", "polynomial", "reduce_lr_on_plateau", "step"] {
            let e = TrainConfig::from_yaml(
                &format!("training:\n  data_dir: d\n  lr_scheduler: {name}\n"),
                Path::new("c.yaml"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(name) && e.contains("inverse_sqrt") && e.contains("plugins/cosine_schedule"),
                "{e}"
            );
        }
    }

    /// `output.report_to` as transformers takes it: TensorBoard by default, `none` turns it off,
    /// a tracker lorahost lacks gets TensorBoard files and a note, a misspelt name an error.
    #[test]
    fn report_to_forms() {
        let (c, _) = parse("output:\n  output_dir: o\n").unwrap();
        assert!(c.output.tensorboard());
        for (yaml, on) in [
            ("none", false),
            ("[]", false),
            ("tensorboard", true),
            ("\"all\"", true),
            ("[TensorBoard, wandb]", true),
            ("\"none, tensorboard\"", false),
            ("null", true),
        ] {
            let (c, _) = parse(&format!("output:\n  report_to: {yaml}\n")).unwrap();
            assert_eq!(c.output.tensorboard(), on, "{yaml}: {:?}", c.output.report_to);
        }
        let (c, w) = parse("output:\n  report_to: wandb\n").unwrap();
        assert!(c.output.tensorboard(), "W&B imports the event files");
        assert!(
            w.iter()
                .any(|m| m.contains("no wandb integration") && m.contains("wandb sync --sync-tensorboard")),
            "{w:?}"
        );
        let e = parse("output:\n  report_to: tensorbord\n").unwrap_err();
        assert!(e.contains("output.report_to") && e.contains("did you mean `tensorboard`"), "{e}");
        let e = parse("output:\n  report_to: {a: 1}\n").unwrap_err();
        assert!(e.contains("output.report_to") && e.contains("tensorboard or none"), "{e}");
    }

    /// `target_modules` as a string: all-linear, one name; regex patterns are refused with
    /// their glob form.
    #[test]
    fn target_modules_string_forms() {
        let (c, w) = parse("lora:\n  target_modules: all-linear\n").unwrap();
        assert_eq!(c.lora.target_modules, ["*"]);
        assert!(crate::lora::matches("detr_decoder.layers.0.self_attn.q_proj", &c.lora.target_modules));
        assert!(w.iter().any(|m| m.contains("every linear layer")), "{w:?}");
        let (c, _) = parse("lora:\n  target_modules: [q_proj, all-linear]\n").unwrap();
        assert_eq!(c.lora.target_modules, ["q_proj", "*"]);
        let (c, w) = parse("lora:\n  target_modules: q_proj\n").unwrap();
        assert_eq!(c.lora.target_modules, ["q_proj"]);
        assert_eq!(w.len(), 1, "{w:?}");
        // No module name has a comma or a space: a string of several is their list.
        let (c, w) = parse("lora:\n  target_modules: \"q_proj,k_proj, v_proj  out_proj\"\n").unwrap();
        assert_eq!(c.lora.target_modules, ["q_proj", "k_proj", "v_proj", "out_proj"]);
        assert!(w.iter().any(|m| m.contains(r#"["q_proj", "k_proj", "v_proj", "out_proj"]"#)), "{w:?}");
        for (yaml, glob) in [
            ("lora:\n  target_modules: \".*attn.*\"\n", "\"*attn*\""),
            ("lora:\n  target_modules: [q_proj, \".*\\\\.(q|v)_proj$\"]\n", "\"*.q_proj\", \"*.v_proj\""),
            ("lora:\n  target_modules: \"q_proj|v_proj\"\n", "\"q_proj\", \"v_proj\""),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains("regular expression") && e.contains(glob) && e.contains('?'), "{yaml}: {e}");
            assert!(!e.contains("expected a list"), "one error: {e}");
        }
        // Globs and dotted paths are not mistaken for regexes.
        parse("lora:\n  target_modules: [\"*attn*\", \"*.self_attn.q_proj\", \"layers.?.fc1\"]\n").unwrap();
    }

    #[test]
    fn device_strings() {
        let device = |d: &str| {
            TrainConfig::from_yaml(
                &format!("training:\n  data_dir: d\nhardware:\n  device: {d}\n"),
                Path::new("c.yaml"),
            )
            .map(|(c, _)| c.hardware.cuda_ordinal())
            .map_err(|e| e.to_string())
        };
        assert_eq!(device("cuda:1").unwrap(), Some(1));
        assert_eq!(device("cuda").unwrap(), Some(0));
        assert_eq!(device("auto").unwrap(), None);
        assert_eq!(device("CPU").unwrap(), None);
        let e = device("mps").unwrap_err();
        assert!(e.contains("Apple") && e.contains("use cpu"), "{e}");
        let e = device("gpu").unwrap_err();
        assert!(e.contains("cuda:N"), "{e}");
        assert!(device("cuda:x").is_err());
    }

    /// A duplicate key is reported at its own line (and the first one's).
    #[test]
    fn duplicate_keys_point_at_the_duplicate() {
        let e = parse("model:\n  path: m\ntraining:\n  data_dir: d\n  batch_size: 2\n  batch_size: 4\n")
            .unwrap_err();
        assert!(e.contains("line 6") && e.contains("line 5") && e.contains("batch_size"), "{e}");
        let e = parse("training:\n  data_dir: d\noutput:\n  output_dir: o\n# again\ntraining:\n  seed: 1\n")
            .unwrap_err();
        assert!(e.contains("line 6") && e.contains("line 1") && e.contains("training"), "{e}");
        let e = parse("plugins:\n  - path: a.wasm\n    budget_ms: 1\n    budget_ms: 2\n  - path: b.wasm\n")
            .unwrap_err();
        assert!(e.contains("line 4") && e.contains("line 3"), "{e}");
    }
}
