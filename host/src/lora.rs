//! LoRA adapters on SAM3's linear layers, in PEFT's vocabulary.
//!
//! Targets are chosen by component flags (vision, text, geometry, DETR encoder, DETR decoder
//! with its heads, mask head) plus module patterns over real module paths:
//! - a plain name (`q_proj`) matches the last path component exactly;
//! - a pattern with `*`/`?` or a dot matches the whole path (`detr_decoder.layers.*.mlp.fc1`);
//! - the names of Meta's original modules map to transformers' (`qkv` → q/k/v_proj, `proj` and
//!   `out_proj` → o_proj/out_proj, `linear1`/`c_fc` → fc1, `linear2`/`c_proj` → fc2), so configs
//!   written for the original trainer keep working.
//!
//! A configuration that matches no module is an error. Adapters are kept in f32
//! (`A` Kaiming-uniform as PEFT, `B` zero), named exactly as PEFT saves them
//! (`base_model.model.<path>.lora_A.weight`), so `adapter_model.safetensors` loads with
//! `PeftModel.from_pretrained(Sam3Model…)`.

use crate::sam3::model::Sam3Model;
use crate::sam3::nn::Linear;
use crate::sam3::visit::VisitLinears;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// SAM3's components, as the config's `apply_to_*` flags name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `vision_encoder.*`
    Vision,
    /// `text_encoder.*`, `text_projection`
    Text,
    /// `geometry_encoder.*`
    Geometry,
    /// `detr_encoder.*`
    DetrEncoder,
    /// `detr_decoder.*`, `dot_product_scoring.*`
    DetrDecoder,
    /// `mask_decoder.*`
    MaskDecoder,
}

impl Component {
    /// The component a module path belongs to.
    pub fn of(path: &str) -> Option<Component> {
        let head = path.split('.').next().unwrap_or("");
        Some(match head {
            "vision_encoder" => Component::Vision,
            "text_encoder" | "text_projection" => Component::Text,
            "geometry_encoder" => Component::Geometry,
            "detr_encoder" => Component::DetrEncoder,
            "detr_decoder" | "dot_product_scoring" => Component::DetrDecoder,
            "mask_decoder" => Component::MaskDecoder,
            _ => return None,
        })
    }

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Vision => "vision encoder",
            Component::Text => "text encoder",
            Component::Geometry => "geometry encoder",
            Component::DetrEncoder => "DETR encoder",
            Component::DetrDecoder => "DETR decoder + heads",
            Component::MaskDecoder => "mask decoder",
        }
    }
}

/// What to adapt and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub rank: usize,
    /// alpha (scale = alpha / rank, or alpha / √rank with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the adapter input (training only).
    pub dropout: f64,
    /// Module patterns.
    pub target_modules: Vec<String>,
    /// Components to adapt.
    pub components: Vec<Component>,
    /// Rank-stabilized LoRA (PEFT's `use_rslora`): scale alpha / √rank.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The adapters' scale: alpha / rank, or alpha / √rank with `use_rslora` (PEFT's rule).
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.rank, self.use_rslora)
    }

    /// From the training config's `lora:` section.
    pub fn from_section(l: &crate::train_config::LoraSection) -> Self {
        let mut components = Vec::new();
        for (on, c) in [
            (l.apply_to_vision_encoder, Component::Vision),
            (l.apply_to_text_encoder, Component::Text),
            (l.apply_to_geometry_encoder, Component::Geometry),
            (l.apply_to_detr_encoder, Component::DetrEncoder),
            (l.apply_to_detr_decoder, Component::DetrDecoder),
            (l.apply_to_mask_decoder, Component::MaskDecoder),
        ] {
            if on {
                components.push(c);
            }
        }
        LoraConfig {
            rank: l.rank,
            alpha: l.alpha,
            dropout: l.dropout,
            target_modules: l.target_modules.clone(),
            components,
            use_rslora: l.use_rslora,
        }
    }
}

/// LoRA's scale: `alpha / rank`, or `alpha / √rank` for rank-stabilized LoRA (rsLoRA, Kalajdzievski
/// 2023; PEFT's `use_rslora`), whose updates keep their size as the rank grows.
pub fn lora_scale(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    let r = rank.max(1) as f64;
    if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

/// Why adapters could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Nothing matched.
    #[error("LoRA targets match no module: patterns [{patterns}] in components [{components}]; module names look like `detr_decoder.layers.0.self_attn.q_proj` (last components: q_proj, k_proj, v_proj, o_proj, out_proj, fc1, fc2)")]
    NoMatch {
        /// The patterns.
        patterns: String,
        /// The enabled components.
        components: String,
    },
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One adapter: `scale · (drop(x) Aᵀ) Bᵀ`, A (r, in) and B (out, r) in f32.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down projection (r, in).
    pub a: Var,
    /// Up projection (out, r).
    pub b: Var,
    /// alpha / r.
    pub scale: f64,
    /// Dropout probability on the input.
    pub dropout: f64,
    /// Shared training flag (dropout only while training).
    pub training: Arc<AtomicBool>,
}

impl LoraAdapter {
    /// A and B as the forward reads them: detached inside a checkpointed block's first run,
    /// where nothing trainable is recorded.
    pub fn factors(&self) -> (Tensor, Tensor) {
        if crate::sam3::recompute::no_grad_active() {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        }
    }

    /// The dropout keep mask for an input of `shape` (see [`crate::rng::keep_mask_for_kernels`]),
    /// or `None` when no dropout applies (p = 0, or not training).
    pub fn keep_mask(
        &self,
        shape: &candle_core::Shape,
        device: &candle_core::Device,
    ) -> Result<Option<crate::rng::KeepMask>> {
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            Ok(Some(crate::rng::keep_mask_for_kernels(shape, self.dropout, device)?))
        } else {
            Ok(None)
        }
    }
}

/// The layer kinds [`sam3_lora_differences`] compares, in transformers' names as lorahost
/// matches them.
const KINDS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"];

/// The names SAM3_LoRA's modules of each kind ([`KINDS`]) have in Meta's original model, per
/// component (its ViT attention is one fused `qkv` and a `proj`; CLIP's MLP `c_fc`/`c_proj`;
/// the DETR and geometry layers' `linear1`/`linear2` and MHA `q/k/v/out_proj`).
fn meta_names(c: Component) -> [&'static str; 6] {
    match c {
        Component::Vision => ["qkv", "qkv", "qkv", "proj", "fc1", "fc2"],
        Component::Text => ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
        _ => ["q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2"],
    }
}

/// The kind ([`KINDS`] index) of a lorahost module by its last name.
fn kind_of(path: &str) -> Option<usize> {
    let last = path.rsplit('.').next().unwrap_or(path);
    let last = if last == "out_proj" { "o_proj" } else { last };
    KINDS.iter().position(|k| *k == last)
}

/// Where SAM3_LoRA, given the same `target_modules` (plain names, its schema), adapts other
/// layers than lorahost does. SAM3_LoRA matches a name when it equals a pattern or contains it
/// (`proj` matches `q_proj`), against Meta's original module names; lorahost reads its names as
/// transformers' ([`expand`]). Per component in `components` (the vision, text, geometry and
/// DETR ones): (component, the kinds adapted here, the kinds SAM3_LoRA adapts), for those that
/// differ. `adapted` are the paths lorahost adapts. Empty when a pattern is a glob or a path
/// (lorahost's own schema, nothing to compare).
pub fn sam3_lora_differences(
    patterns: &[String],
    components: &[Component],
    adapted: &[&str],
) -> Vec<(Component, Vec<&'static str>, Vec<&'static str>)> {
    if patterns.is_empty()
        || patterns.iter().any(|p| !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &c in components {
        if c == Component::MaskDecoder {
            continue;
        }
        let here: Vec<&'static str> = KINDS
            .iter()
            .enumerate()
            .filter(|(k, _)| adapted.iter().any(|p| Component::of(p) == Some(c) && kind_of(p) == Some(*k)))
            .map(|(_, name)| *name)
            .collect();
        let names = meta_names(c);
        let theirs: Vec<&'static str> = KINDS
            .iter()
            .zip(names)
            .filter(|(_, meta)| patterns.iter().any(|p| meta == p || meta.contains(p.as_str())))
            .map(|(k, _)| *k)
            .collect();
        if here != theirs {
            out.push((c, here, theirs));
        }
    }
    out
}

/// Expand the original trainer's module names to transformers' names.
fn expand(pattern: &str) -> Vec<String> {
    let alias: &[&str] = match pattern {
        "qkv" => &["q_proj", "k_proj", "v_proj"],
        "proj" | "out_proj" => &["o_proj", "out_proj"],
        "linear1" | "c_fc" => &["fc1"],
        "linear2" | "c_proj" => &["fc2"],
        _ => &[],
    };
    if alias.is_empty() {
        vec![pattern.to_string()]
    } else {
        alias.iter().map(|s| s.to_string()).collect()
    }
}

/// The component of `lin` when `config` (with its `patterns` expanded) adapts it.
fn selects(config: &LoraConfig, patterns: &[String], lin: &Linear) -> Option<Component> {
    if lin.from_conv {
        return None;
    }
    let component = Component::of(&lin.path)?;
    (config.components.contains(&component) && matches(&lin.path, patterns)).then_some(component)
}

/// Glob match with `*` (any run, dots included) and `?` (one character).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pattern[1..], text) || (!text.is_empty() && glob(pattern, &text[1..])),
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// Whether `path` matches one of `patterns` (already expanded).
pub fn matches(path: &str, patterns: &[String]) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    patterns.iter().any(|p| {
        let p = p.trim();
        if p.contains('*') || p.contains('?') {
            glob(p.as_bytes(), if p.contains('.') { path.as_bytes() } else { last.as_bytes() })
        } else if p.contains('.') {
            path == p || path.ends_with(&format!(".{p}"))
        } else {
            last == p
        }
    })
}

/// The adapters attached to a model.
pub struct LoraSet {
    /// PEFT key (`base_model.model.<path>.lora_{A,B}.weight`) → trainable variable, sorted.
    vars: BTreeMap<String, Var>,
    /// Adapted module paths, in checkpoint order, with their component and (in, out).
    pub modules: Vec<(String, Component, usize, usize)>,
    /// The config used.
    pub config: LoraConfig,
    training: Arc<AtomicBool>,
}

impl LoraSet {
    /// Attach fresh adapters to every matching linear layer of `model` (seed 0).
    pub fn attach(
        model: &mut Sam3Model,
        config: &LoraConfig,
        device: &Device,
    ) -> std::result::Result<Self, LoraError> {
        Self::attach_seeded(model, config, 0, device)
    }

    /// Attach fresh adapters; A is drawn from a stream seeded by (`seed`, module path), so the
    /// initial adapters depend only on the seed, never on the device or thread.
    pub fn attach_seeded(
        model: &mut Sam3Model,
        config: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> std::result::Result<Self, LoraError> {
        let patterns: Vec<String> = config.target_modules.iter().flat_map(|p| expand(p.trim())).collect();
        let training = Arc::new(AtomicBool::new(false));
        let mut vars = BTreeMap::new();
        let mut modules = Vec::new();
        let mut failure: Option<candle_core::Error> = None;
        let scale = config.scale();
        model.visit_linears(&mut |lin: &mut Linear| {
            if failure.is_some() {
                return;
            }
            let Some(component) = selects(config, &patterns, lin) else { return };
            let (out_dim, in_dim) = (lin.out_dim(), lin.in_dim());
            // PEFT's default init: A ~ kaiming_uniform(a=√5) = U(-1/√in, 1/√in), B = 0.
            let bound = 1.0 / (in_dim as f64).sqrt();
            let made = (|| -> Result<(Var, Var)> {
                let init = crate::rng::uniform(
                    &[seed, crate::rng::hash_str(&lin.path)],
                    config.rank * in_dim,
                    -bound,
                    bound,
                );
                let a = Var::from_tensor(&Tensor::from_vec(init, (config.rank, in_dim), device)?)?;
                let b = Var::zeros((out_dim, config.rank), DType::F32, device)?;
                Ok((a, b))
            })();
            match made {
                Ok((a, b)) => {
                    let key = format!("base_model.model.{}", lin.path);
                    vars.insert(format!("{key}.lora_A.weight"), a.clone());
                    vars.insert(format!("{key}.lora_B.weight"), b.clone());
                    modules.push((lin.path.clone(), component, in_dim, out_dim));
                    lin.lora = Some(LoraAdapter {
                        a,
                        b,
                        scale,
                        dropout: config.dropout,
                        training: training.clone(),
                    });
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        if modules.is_empty() {
            return Err(LoraError::NoMatch {
                patterns: config.target_modules.join(", "),
                components: config.components.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
            });
        }
        Ok(LoraSet { vars, modules, config: config.clone(), training })
    }

    /// The module paths `config` would adapt on `model`, sorted, without attaching anything
    /// (to compare a training config's `lora:` section with an adapter folder).
    pub fn planned_modules(model: &mut Sam3Model, config: &LoraConfig) -> Vec<String> {
        let patterns: Vec<String> = config.target_modules.iter().flat_map(|p| expand(p.trim())).collect();
        let mut out = Vec::new();
        model.visit_linears(&mut |lin: &mut Linear| {
            if selects(config, &patterns, lin).is_some() {
                out.push(lin.path.clone());
            }
        });
        out.sort();
        out
    }

    /// How a training config's `lora:` section (`section`, adapting `section_modules` as
    /// [`LoraSet::planned_modules`] says) differs from these adapters: rank, alpha and the
    /// adapted modules, in one line; None when they agree.
    pub fn difference_from(&self, section: &LoraConfig, section_modules: &[String]) -> Option<String> {
        let mut parts = Vec::new();
        if section.rank != self.config.rank {
            parts.push(format!("rank {} (the adapter's r is {})", section.rank, self.config.rank));
        }
        if section.alpha != self.config.alpha {
            parts
                .push(format!("alpha {} (the adapter's lora_alpha is {})", section.alpha, self.config.alpha));
        }
        if section.use_rslora != self.config.use_rslora {
            parts.push(format!(
                "use_rslora {} (the adapter's is {})",
                section.use_rslora, self.config.use_rslora
            ));
        }
        let mine: std::collections::BTreeSet<&str> =
            self.modules.iter().map(|(p, _, _, _)| p.as_str()).collect();
        let theirs: std::collections::BTreeSet<&str> = section_modules.iter().map(String::as_str).collect();
        if mine != theirs {
            let only_section: Vec<&str> = theirs.difference(&mine).copied().collect();
            let only_adapter: Vec<&str> = mine.difference(&theirs).copied().collect();
            let eg = |v: &[&str]| v.first().map(|m| format!(", e.g. {m}")).unwrap_or_default();
            parts.push(format!(
                "target modules: the section adapts {} modules, the adapter {} ({} only in the section{}; {} only in the adapter{})",
                theirs.len(),
                mine.len(),
                only_section.len(),
                eg(&only_section),
                only_adapter.len(),
                eg(&only_adapter)
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// The configured target patterns that adapted no module (a typo, or a name of the
    /// reference trainer's model that SAM3 in transformers' naming does not have): the other
    /// patterns still matched, so attaching succeeded, but these silently did nothing.
    pub fn unmatched_patterns(&self) -> Vec<String> {
        self.config
            .target_modules
            .iter()
            .filter(|p| {
                let expanded = expand(p.trim());
                !self.modules.iter().any(|(path, _, _, _)| matches(path, &expanded))
            })
            .cloned()
            .collect()
    }

    /// Switch adapter dropout on (training) or off.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// The trainable variables by PEFT key, sorted by name (deterministic order).
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Trainable parameter count.
    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Per-component table: (component, adapted modules, trainable parameters).
    pub fn component_table(&self) -> Vec<(Component, usize, usize)> {
        let mut t: BTreeMap<Component, (usize, usize)> = BTreeMap::new();
        for (_, c, i, o) in &self.modules {
            let e = t.entry(*c).or_default();
            e.0 += 1;
            e.1 += self.config.rank * (i + o);
        }
        t.into_iter().map(|(c, (m, p))| (c, m, p)).collect()
    }
}

/// Why saved adapters could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// I/O or format problem with a file.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The saved adapters do not fit the attached ones.
    #[error("{path} does not match the configured adapters:\n{report}")]
    Mismatch {
        /// The file.
        path: std::path::PathBuf,
        /// One problem per line.
        report: String,
    },
}

/// File names of PEFT's format.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

impl LoraSet {
    /// PEFT's `adapter_config.json` for these adapters.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        // The adapted modules exactly, as a regular expression PEFT full-matches against module
        // names: a list would also match by suffix (`text_projection` would catch
        // `text_encoder.text_projection` too).
        let names: Vec<String> = self.modules.iter().map(|(p, _, _, _)| p.replace('.', "\\.")).collect();
        let targets = format!("^(?:{})$", names.join("|"));
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": base_model,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": self.config.use_rslora,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Write `adapter_model.safetensors` + `adapter_config.json` into `dir` (each atomically).
    pub fn save_peft(&self, dir: &std::path::Path, base_model: &str) -> std::result::Result<(), PeftError> {
        let err = |path: std::path::PathBuf, reason: String| PeftError::File { path, reason };
        std::fs::create_dir_all(dir).map_err(|e| err(dir.into(), e.to_string()))?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        let mut tensors = std::collections::HashMap::new();
        for (k, v) in &self.vars {
            let t = v.as_tensor().to_dtype(DType::F32).and_then(|t| t.to_device(&Device::Cpu));
            tensors.insert(k.clone(), t.map_err(|e| err(weights.clone(), e.to_string()))?);
        }
        let tmp = dir.join(format!(".{ADAPTER_WEIGHTS}.tmp-{}", std::process::id()));
        candle_core::safetensors::save(&tensors, &tmp).map_err(|e| err(tmp.clone(), e.to_string()))?;
        crate::train::checkpoint::set_created_permissions(&tmp)
            .map_err(|e| err(tmp.clone(), e.to_string()))?;
        std::fs::rename(&tmp, &weights).map_err(|e| err(weights.clone(), e.to_string()))?;
        let cfg = serde_json::to_vec_pretty(&self.peft_config(base_model)).unwrap_or_default();
        let cfg_path = dir.join(ADAPTER_CONFIG);
        crate::fsutil::write_atomic(&cfg_path, &cfg).map_err(|e| err(cfg_path, e.to_string()))
    }

    /// Attach the adapters a PEFT folder holds and load them, without a training config: the
    /// rank and alpha come from its `adapter_config.json`, the adapted modules from the weight
    /// names (each module exactly). Loading is as strict as [`LoraSet::load_peft`]; adapters are
    /// in inference mode (no dropout).
    pub fn attach_peft(
        model: &mut Sam3Model,
        dir: &std::path::Path,
        device: &Device,
    ) -> std::result::Result<Self, PeftError> {
        let cfg = read_peft_config(dir)?;
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let weights = dir.join(ADAPTER_WEIGHTS);
        let file_err = |path: &std::path::Path, reason: String| PeftError::File { path: path.into(), reason };
        let rank = cfg.get("r").and_then(|r| r.as_u64()).filter(|r| *r > 0).ok_or_else(|| {
            file_err(&cfg_path, format!("r is {}: an adapter's rank is a whole number > 0", cfg["r"]))
        })? as usize;
        // Checked (a number > 0) by read_peft_config.
        let alpha = cfg.get("lora_alpha").and_then(|a| a.as_f64()).unwrap_or(0.0);
        let use_rslora = cfg.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        // The shapes the file holds, from its header alone: the rank must be theirs before
        // anything of that rank is allocated (an `r` of 10^12 is no adapter to build).
        let shapes: BTreeMap<String, Vec<usize>> =
            safetensors_shapes(&weights)?.into_iter().map(|(k, s)| (normalize_peft_key(&k), s)).collect();
        check_rank(rank, &shapes, &cfg_path, &weights)?;
        let mut modules: Vec<String> = shapes
            .keys()
            .filter_map(|k| {
                k.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight").map(String::from)
            })
            .collect();
        modules.sort();
        modules.dedup();
        if modules.is_empty() {
            return Err(file_err(
                &weights,
                "holds no LoRA weights (no `base_model.model.<module>.lora_A.weight` key)".into(),
            ));
        }
        let config = LoraConfig {
            rank,
            alpha,
            dropout: 0.0,
            target_modules: modules,
            components: vec![
                Component::Vision,
                Component::Text,
                Component::Geometry,
                Component::DetrEncoder,
                Component::DetrDecoder,
                Component::MaskDecoder,
            ],
            use_rslora,
        };
        let set = Self::attach(model, &config, device).map_err(|e| match e {
            LoraError::NoMatch { .. } => file_err(
                &weights,
                "adapts modules this model does not have (an adapter for another model?)".into(),
            ),
            other => file_err(&weights, other.to_string()),
        })?;
        set.load_peft(dir)?;
        set.set_training(false);
        Ok(set)
    }

    /// [`LoraSet::attach_peft`] for a command that also has a training config (`evaluate`,
    /// `export`): when the config's `lora:` section (`section`, from the file `config_name`)
    /// disagrees with the adapter folder, one warning names the difference; the adapter's own
    /// rank, alpha and modules are used.
    pub fn attach_peft_for_config(
        model: &mut Sam3Model,
        dir: &std::path::Path,
        device: &Device,
        section: &LoraConfig,
        config_name: &str,
    ) -> std::result::Result<Self, PeftError> {
        let planned = Self::planned_modules(model, section);
        let set = Self::attach_peft(model, dir, device)?;
        if let Some(d) = set.difference_from(section, &planned) {
            tracing::warn!(
                "{config_name}: its lora section does not match the adapter in {}: {d}; using the adapter's own settings ({ADAPTER_CONFIG} and its weights)",
                dir.display()
            );
        }
        Ok(set)
    }

    /// Load adapters saved in PEFT's format into these (already attached) adapters. Strict:
    /// every adapter must be present with its shape, and the file may hold nothing else. Keys
    /// as PEFT writes them for transformers' `Sam3Model` (`base_model.model.<path>`), also with
    /// the adapter-name infix (`lora_A.default.weight`) or from `Sam3VideoModel`
    /// (`base_model.model.detector_model.<path>`).
    pub fn load_peft(&self, dir: &std::path::Path) -> std::result::Result<(), PeftError> {
        let weights = dir.join(ADAPTER_WEIGHTS);
        let file_err = |path: &std::path::Path, reason: String| PeftError::File { path: path.into(), reason };
        let cfg = read_peft_config(dir)?;
        let cfg_path = dir.join(ADAPTER_CONFIG);
        // Rank and alpha first: a rank difference is why every tensor is mis-shaped.
        let mut head = Vec::new();
        let rank_differs = cfg.get("r").and_then(|r| r.as_u64()) != Some(self.config.rank as u64);
        if rank_differs {
            head.push(format!("  rank: file has {}, config has {}", cfg["r"], self.config.rank));
        }
        let alpha_differs = cfg.get("lora_alpha").and_then(|a| a.as_f64()) != Some(self.config.alpha);
        if alpha_differs {
            head.push(format!(
                "  lora_alpha: file has {}, config has {}",
                cfg["lora_alpha"], self.config.alpha
            ));
        }
        let rslora = cfg.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        if rslora != self.config.use_rslora {
            head.push(format!(
                "  use_rslora: file has {rslora}, config has {} (trained with scale alpha/{}; the config applies alpha/{})",
                self.config.use_rslora,
                if rslora { "√r" } else { "r" },
                if rslora { "r" } else { "√r" }
            ));
        }
        let mut problems = Vec::new();
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&weights, &Device::Cpu)
            .map_err(|e| file_err(&weights, format!("not a readable safetensors file: {e}")))?
            .into_iter()
            .map(|(k, t)| (normalize_peft_key(&k), t))
            .collect();
        for (k, v) in &self.vars {
            match tensors.get(k) {
                None => problems.push(format!("  missing     {k}")),
                Some(t) if t.dims() != v.dims() => problems.push(format!(
                    "  mis-shaped  {k}: expected {:?}, file has {:?}",
                    v.dims(),
                    t.dims()
                )),
                Some(_) => {}
            }
        }
        for k in tensors.keys() {
            if !self.vars.contains_key(k) {
                problems.push(format!("  unexpected  {k}"));
            }
        }
        if !head.is_empty() || !problems.is_empty() {
            problems.sort();
            let mut lines = head;
            lines.extend(cap_per_kind(&problems, 8));
            let fix = if rank_differs || alpha_differs || rslora != self.config.use_rslora {
                format!(
                    "  fix: these adapters were trained with r {} and lora_alpha {}{} ({}): set lora.rank and lora.alpha{} (and the target modules) as they were trained, or give the adapter folder of this config; `lorahost evaluate`, `export` and `predict --adapter` read them from the folder themselves",
                    cfg["r"],
                    cfg["lora_alpha"],
                    if rslora { ", use_rslora true" } else { "" },
                    cfg_path.display(),
                    if rslora != self.config.use_rslora { " and lora.use_rslora" } else { "" }
                )
            } else if problems.iter().any(|p| p.starts_with("  mis-shaped")) {
                "  fix: same rank, other shapes: these adapters were trained on a model of another size; use that model (model.path / --model)".to_string()
            } else {
                "  fix: these adapters adapt other modules than the configured ones: set lora.target_modules and the lora.apply_to_* switches as they were trained, or give the adapter folder of this config".to_string()
            };
            lines.push(fix);
            return Err(PeftError::Mismatch { path: weights, report: lines.join("\n") });
        }
        // Diverged adapters (NaN/Inf) are refused: applied, they make every output NaN, and
        // merged, a NaN model.
        let mut non_finite = Vec::new();
        for k in self.vars.keys() {
            let finite = all_finite(&tensors[k]).map_err(|e| file_err(&weights, e.to_string()))?;
            if !finite {
                non_finite.push(k.as_str());
            }
        }
        if let Some(first) = non_finite.first() {
            let more = match non_finite.len() {
                1 => String::new(),
                n => format!(" (and {} more of its {} tensors)", n - 1, self.vars.len()),
            };
            return Err(file_err(
                &weights,
                format!(
                    "the adapter holds NaN/Inf values in {first}{more}: its training diverged; use an earlier checkpoint (output_dir/checkpoints/step-N/adapter) or train again with a lower learning rate"
                ),
            ));
        }
        for (k, v) in &self.vars {
            let t = tensors[k].to_dtype(DType::F32).and_then(|t| t.to_device(v.device()));
            let t = t.map_err(|e| file_err(&weights, e.to_string()))?;
            v.set(&t).map_err(|e| file_err(&weights, e.to_string()))?;
        }
        Ok(())
    }
}

/// `lines` (sorted, each `  <kind> ...`) with at most `keep` of each kind and a count of the
/// rest.
fn cap_per_kind(lines: &[String], keep: usize) -> Vec<String> {
    let mut out = Vec::new();
    let kind = |l: &str| l.split_whitespace().next().unwrap_or("").to_string();
    let mut i = 0;
    while i < lines.len() {
        let k = kind(&lines[i]);
        let n = lines[i..].iter().take_while(|l| kind(l) == k).count();
        out.extend(lines[i..i + n.min(keep)].iter().cloned());
        if n > keep {
            out.push(format!("  ... and {} more {k}", n - keep));
        }
        i += n;
    }
    out
}

/// Read and check a PEFT adapter folder's `adapter_config.json`: a file or a run folder given
/// instead is named with the way out, and options lorahost does not apply are refused by name.
fn read_peft_config(dir: &std::path::Path) -> std::result::Result<serde_json::Value, PeftError> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let file_err = |path: &std::path::Path, reason: String| PeftError::File { path: path.into(), reason };
    if dir.is_file() {
        return Err(file_err(
            dir,
            "is a file; an adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors), such as a run's best/ or adapter/ (SAM3_LoRA's .pt LoRA weights are not a PEFT adapter)".into(),
        ));
    }
    if !cfg_path.exists() {
        let inside: Vec<String> = ["best", "adapter"]
            .iter()
            .filter(|d| dir.join(d).join(ADAPTER_CONFIG).is_file())
            .map(|d| dir.join(d).display().to_string())
            .collect();
        if !inside.is_empty() {
            return Err(file_err(
                dir,
                format!("is a run folder, not an adapter: use {}", inside.join(" or ")),
            ));
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?)
            .map_err(|e| file_err(&cfg_path, format!("not valid JSON: {e}")))?;
    // The scale is lora_alpha / r: a zero or negative alpha (which training refuses) would
    // switch the adapters off or apply them backwards.
    match cfg.get("lora_alpha").and_then(|a| a.as_f64()) {
        Some(a) if a.is_finite() && a > 0.0 => {}
        _ => {
            return Err(file_err(
                &cfg_path,
                format!(
                    "lora_alpha is {}: it must be a number > 0 (the adapters are applied with scale lora_alpha / r, and training refuses alpha <= 0 too); set it to the lora_alpha the adapters were trained with",
                    cfg.get("lora_alpha").unwrap_or(&serde_json::Value::Null)
                ),
            ))
        }
    }
    // PEFT options that change what the weights mean: refused by name rather than applied
    // with the wrong scale or shape.
    let unsupported = unsupported_peft_options(&cfg);
    if !unsupported.is_empty() {
        return Err(file_err(
            &cfg_path,
            format!(
                "uses PEFT options lorahost does not apply: {}; lorahost adapters are plain LoRA or rsLoRA (scale lora_alpha / r, or / √r with use_rslora; one r and alpha for every module, no bias, no DoRA, no modules_to_save)",
                unsupported.join("; ")
            ),
        ));
    }
    Ok(cfg)
}

/// Whether every value of `t` is finite (no NaN, no ±Inf).
fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

/// The largest safetensors header accepted (the `safetensors` crate's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// The shape of every tensor in the safetensors file `path`, read from its header alone
/// (nothing is loaded). Each shape is checked against the bytes the file holds for it, so a
/// shape read here is one the file really has and can size what is allocated.
fn safetensors_shapes(
    path: &std::path::Path,
) -> std::result::Result<BTreeMap<String, Vec<usize>>, PeftError> {
    use std::io::Read;
    let bad = |reason: String| PeftError::File {
        path: path.into(),
        reason: format!("not a readable safetensors file: {reason}"),
    };
    let mut f = std::fs::File::open(path)
        .map_err(|e| PeftError::File { path: path.into(), reason: e.to_string() })?;
    let size = f.metadata().map_err(|e| PeftError::File { path: path.into(), reason: e.to_string() })?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad(format!("{size} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(len);
    if n > size - 8 || n > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!("its header length {n} does not fit the file ({size} bytes)")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("reading its header: {e}")))?;
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header is not a JSON object: {e}")))?;
    let data_len = size - 8 - n;
    let mut out = BTreeMap::new();
    for (key, e) in entries {
        if key == "__metadata__" {
            continue;
        }
        let dtype = e.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let width: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
            _ => return Err(bad(format!("{key}: dtype {:?} is not one a LoRA weight has", e.get("dtype")))),
        };
        let shape: Option<Vec<u64>> =
            e.get("shape").and_then(|s| s.as_array()).and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let offsets: Option<[u64; 2]> =
            e.get("data_offsets").and_then(|s| s.as_array()).and_then(|a| match a.as_slice() {
                [b, e] => Some([b.as_u64()?, e.as_u64()?]),
                _ => None,
            });
        let (Some(shape), Some([begin, end])) = (shape, offsets) else {
            return Err(bad(format!("{key}: no shape and data_offsets in the header")));
        };
        let bytes = shape.iter().try_fold(width, |acc, d| acc.checked_mul(*d));
        if begin > end || end > data_len || bytes != Some(end - begin) {
            return Err(bad(format!(
                "{key}: shape {shape:?} of {dtype} does not fit the {} bytes the file holds for it (data_offsets [{begin}, {end}], {data_len} bytes of data)",
                end.saturating_sub(begin)
            )));
        }
        let shape: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
        out.insert(key, shape);
    }
    Ok(out)
}

/// Check `rank` (an adapter folder's `r`) against the factors its weights file holds (`shapes`,
/// by normalized key): `lora_A` is (r, in), `lora_B` is (out, r).
fn check_rank(
    rank: usize,
    shapes: &BTreeMap<String, Vec<usize>>,
    cfg_path: &std::path::Path,
    weights: &std::path::Path,
) -> std::result::Result<(), PeftError> {
    let file_err = |path: &std::path::Path, reason: String| PeftError::File { path: path.into(), reason };
    // Rank → an example key of it.
    let mut ranks: BTreeMap<usize, (&str, &[usize])> = BTreeMap::new();
    for (k, s) in shapes {
        let r = if k.ends_with(".lora_A.weight") {
            s.first()
        } else if k.ends_with(".lora_B.weight") {
            s.get(1)
        } else {
            continue;
        };
        match (s.len(), r) {
            (2, Some(r)) => {
                ranks.entry(*r).or_insert((k, s));
            }
            _ => return Err(file_err(weights, format!("{k} is {s:?}: a LoRA factor is a matrix"))),
        }
    }
    if ranks.is_empty() || (ranks.len() == 1 && ranks.contains_key(&rank)) {
        return Ok(());
    }
    if let [(r, (k, s))] = ranks.iter().collect::<Vec<_>>()[..] {
        return Err(file_err(
            cfg_path,
            format!(
                "r is {rank}, but {} holds rank-{r} factors ({k} is {s:?}; lora_A is (r, in), lora_B is (out, r)): set \"r\": {r} here, the rank the adapters were trained with, or use the adapter folder these weights came from",
                weights.display()
            ),
        ));
    }
    Err(file_err(
        weights,
        format!(
            "holds LoRA factors of several ranks ({}); lorahost applies one r to every module (no per-module rank_pattern)",
            ranks.iter().map(|(r, (k, s))| format!("{r}: {k} is {s:?}")).collect::<Vec<_>>().join(", ")
        ),
    ))
}

/// A PEFT state-dict key in the form lorahost names its variables: without PEFT's adapter-name
/// infix (`lora_A.default.weight`) and without `Sam3VideoModel`'s `detector_model.` level.
fn normalize_peft_key(k: &str) -> String {
    let k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.");
    match k.strip_prefix("base_model.model.detector_model.") {
        Some(rest) => format!("base_model.model.{rest}"),
        None => k,
    }
}

/// The options of a PEFT `adapter_config.json` that lorahost does not apply, each named with
/// its value.
fn unsupported_peft_options(cfg: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = cfg.get("peft_type").and_then(|t| t.as_str()).filter(|t| !t.eq_ignore_ascii_case("LORA"))
    {
        out.push(format!("peft_type {t} (only LORA)"));
    }
    if cfg.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        out.push("use_dora".into());
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if cfg.get(key).and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty()) {
            out.push(format!("{key} {} (per-module r/alpha)", cfg[key]));
        }
    }
    if let Some(b) = cfg.get("bias").and_then(|b| b.as_str()).filter(|b| *b != "none") {
        out.push(format!("bias {b:?}"));
    }
    if cfg.get("lora_bias").and_then(|v| v.as_bool()) == Some(true) {
        out.push("lora_bias".into());
    }
    if cfg.get("modules_to_save").is_some_and(|m| m.as_array().is_some_and(|a| !a.is_empty())) {
        out.push(format!("modules_to_save {}", cfg["modules_to_save"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SAM3_LoRA's layer choice for the same names: its ViT attention is a fused `qkv` and a
    /// `proj` (so `q_proj` never matched there) and its DETR MLPs `linear1`/`linear2` (so
    /// `fc1`/`fc2` were the ViT's only); its substring rule makes `proj` match every projection;
    /// globs are lorahost's own schema and not compared.
    #[test]
    fn sam3_lora_layer_choice_by_meta_names() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let attn = ["q_proj", "k_proj", "v_proj", "o_proj"];
        let mut adapted: Vec<String> = Vec::new();
        for k in attn {
            adapted.push(format!("vision_encoder.backbone.layers.0.attention.{k}"));
            adapted.push(format!("detr_decoder.layers.0.self_attn.{k}"));
        }
        let a: Vec<&str> = adapted.iter().map(String::as_str).collect();
        let d = sam3_lora_differences(
            &p(&["q_proj", "k_proj", "v_proj", "out_proj"]),
            &[Component::Vision, Component::DetrDecoder],
            &a,
        );
        assert_eq!(d, vec![(Component::Vision, attn.to_vec(), vec![])]);
        let ffn = [
            "vision_encoder.backbone.layers.0.mlp.fc1",
            "vision_encoder.backbone.layers.0.mlp.fc2",
            "detr_encoder.layers.0.mlp.fc1",
            "detr_encoder.layers.0.mlp.fc2",
        ];
        let d =
            sam3_lora_differences(&p(&["fc1", "fc2"]), &[Component::Vision, Component::DetrEncoder], &ffn);
        assert_eq!(d, vec![(Component::DetrEncoder, vec!["fc1", "fc2"], vec![])]);
        // `proj` is part of every projection's name in SAM3_LoRA (the DETR's q/k/v too), but not
        // of the ViT's fused `qkv`.
        let d = sam3_lora_differences(&p(&["proj"]), &[Component::Vision, Component::DetrDecoder], &a);
        assert_eq!(d, vec![(Component::Vision, attn.to_vec(), vec!["o_proj"])]);
        assert!(sam3_lora_differences(&p(&["vision_encoder.*.q_proj"]), &[Component::Vision], &a).is_empty());
        assert!(sam3_lora_differences(&p(&["qkv", "proj"]), &[Component::Vision], &a).is_empty());
    }

    fn fixture_model() -> Sam3Model {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam3/tiny_a");
        Sam3Model::load_dir(&fixture, &Device::Cpu, DType::F32).unwrap()
    }

    fn config(rank: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
        LoraConfig {
            rank,
            alpha,
            dropout: 0.0,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            components: vec![
                Component::Vision,
                Component::Text,
                Component::DetrEncoder,
                Component::DetrDecoder,
            ],
            use_rslora: false,
        }
    }

    /// The mode a file lorahost creates itself gets here (0o666 less the umask).
    #[cfg(unix)]
    fn created_mode(dir: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("probe");
        std::fs::write(&p, b"x").unwrap();
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777
    }

    /// A saved adapter is as readable as its JSON beside it (0644 under umask 022), not
    /// candle's private 0600: teammates can read it.
    #[cfg(unix)]
    #[test]
    fn saved_adapters_are_readable_by_the_group_and_others() {
        use std::os::unix::fs::PermissionsExt;
        let mut model = fixture_model();
        let set = LoraSet::attach(&mut model, &config(2, 4.0, &["q_proj"]), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        set.save_peft(dir.path(), "tiny").unwrap();
        let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        let want = created_mode(dir.path());
        assert_eq!(mode(ADAPTER_WEIGHTS), want, "{:o} vs {want:o}", mode(ADAPTER_WEIGHTS));
        assert_eq!(mode(ADAPTER_CONFIG), want);
        if want & 0o044 == 0o044 {
            assert_eq!(mode(ADAPTER_WEIGHTS) & 0o044, 0o044, "group/other readable");
        }
    }

    /// A config whose rank differs from the adapter's: the rank and alpha lines come first, the
    /// consequences (every tensor mis-shaped) are capped, and the last line is the fix.
    #[test]
    fn a_rank_mismatch_is_reported_first_with_the_fix() {
        let mut model = fixture_model();
        let set =
            LoraSet::attach(&mut model, &config(2, 4.0, &["q_proj", "v_proj", "fc1", "fc2"]), &Device::Cpu)
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        set.save_peft(dir.path(), "tiny").unwrap();
        let mut other = fixture_model();
        let wrong =
            LoraSet::attach(&mut other, &config(8, 16.0, &["q_proj", "v_proj", "fc1", "fc2"]), &Device::Cpu)
                .unwrap();
        assert!(wrong.vars().len() > 20);
        let e = wrong.load_peft(dir.path()).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert!(lines[1].contains("rank: file has 2, config has 8"), "{e}");
        assert!(lines[2].contains("lora_alpha: file has 4.0, config has 16"), "{e}");
        let last = lines.last().unwrap();
        assert!(last.contains("fix:") && last.contains("r 2") && last.contains("lora_alpha 4.0"), "{e}");
        assert!(e.contains("more mis-shaped") && lines.len() <= 13, "{e}");
        // Other modules at the same rank: the fix says so.
        let mut third = fixture_model();
        let fewer = LoraSet::attach(&mut third, &config(2, 4.0, &["q_proj"]), &Device::Cpu).unwrap();
        let e = fewer.load_peft(dir.path()).unwrap_err().to_string();
        assert!(e.lines().last().unwrap().contains("lora.target_modules"), "{e}");
        assert!(!e.contains("rank:"), "{e}");
    }

    /// `attach_peft` takes the adapter's own layout; the difference from a config's section is
    /// named in one line (rank, alpha, modules), and nothing when they agree.
    #[test]
    fn the_difference_between_a_section_and_an_adapter_is_named() {
        let mut model = fixture_model();
        let trained = config(2, 4.0, &["q_proj", "v_proj"]);
        let set = LoraSet::attach(&mut model, &trained, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        set.save_peft(dir.path(), "tiny").unwrap();
        let mut fresh = fixture_model();
        let section = config(32, 64.0, &["q_proj", "v_proj", "fc1"]);
        let planned = LoraSet::planned_modules(&mut fresh, &section);
        let same = LoraSet::planned_modules(&mut fresh, &trained);
        let loaded =
            LoraSet::attach_peft_for_config(&mut fresh, dir.path(), &Device::Cpu, &section, "c.yaml")
                .unwrap();
        assert_eq!((loaded.config.rank, loaded.config.alpha), (2, 4.0));
        assert_eq!(loaded.modules.len(), set.modules.len());
        let d = loaded.difference_from(&section, &planned).unwrap();
        assert!(d.contains("rank 32 (the adapter's r is 2)") && d.contains("alpha 64"), "{d}");
        assert!(
            d.contains("only in the section, e.g.")
                && d.contains("fc1")
                && d.contains("0 only in the adapter"),
            "{d}"
        );
        assert!(!d.contains('\n'));
        assert_eq!(loaded.difference_from(&trained, &same), None);
    }

    /// A saved rank-2 adapter of q_proj/v_proj (random, finite factors) in a new folder.
    fn saved_adapter() -> (tempfile::TempDir, std::path::PathBuf) {
        let mut model = fixture_model();
        let set = LoraSet::attach(&mut model, &config(2, 4.0, &["q_proj", "v_proj"]), &Device::Cpu).unwrap();
        for v in set.vars().values() {
            v.set(&Tensor::randn(0f32, 0.1, v.dims(), &Device::Cpu).unwrap()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("best");
        set.save_peft(&adapter, "tiny").unwrap();
        (dir, adapter)
    }

    /// Set `key` of the folder's adapter_config.json to `value`.
    fn edit_config(adapter: &std::path::Path, key: &str, value: serde_json::Value) {
        let p = adapter.join(ADAPTER_CONFIG);
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    }

    /// An `r` that is not the rank of the stored factors (10^12 once aborted the process
    /// allocating 128 TB) is refused before anything is allocated, naming the file, the rank
    /// the weights have and the fix.
    #[test]
    fn an_r_that_disagrees_with_the_stored_factors_is_refused_before_allocating() {
        let (_dir, adapter) = saved_adapter();
        for r in [1_000_000_000_000u64, 4, 1] {
            edit_config(&adapter, "r", r.into());
            let mut model = fixture_model();
            let e = LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains(ADAPTER_CONFIG) && e.contains(&format!("r is {r}")), "{e}");
            assert!(e.contains("rank-2 factors") && e.contains("set \"r\": 2"), "{e}");
        }
        edit_config(&adapter, "r", 2.into());
        let mut model = fixture_model();
        assert!(LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).is_ok());
    }

    /// A safetensors header whose shape does not fit the bytes stored for it (a huge rank
    /// claimed by a small file) is refused as unreadable, before any allocation.
    #[test]
    fn a_header_shape_larger_than_its_data_is_refused() {
        let (_dir, adapter) = saved_adapter();
        let weights = adapter.join(ADAPTER_WEIGHTS);
        let header = serde_json::json!({
            "base_model.model.detr_encoder.layers.0.self_attn.q_proj.lora_A.weight":
                {"dtype": "F32", "shape": [1_000_000_000_000u64, 32], "data_offsets": [0, 8]},
        })
        .to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 8]);
        std::fs::write(&weights, bytes).unwrap();
        edit_config(&adapter, "r", 1_000_000_000_000u64.into());
        let mut model = fixture_model();
        let e = LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains(ADAPTER_WEIGHTS) && e.contains("does not fit"), "{e}");
        std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}").unwrap();
        let e = LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains(ADAPTER_WEIGHTS) && e.contains("header length"), "{e}");
    }

    /// A zero or negative `lora_alpha` (training refuses alpha <= 0) is refused on load too,
    /// naming the file, rather than applied with a reversed or zero scale.
    #[test]
    fn a_lora_alpha_of_zero_or_below_is_refused_on_load() {
        let (_dir, adapter) = saved_adapter();
        for alpha in [serde_json::json!(-16), serde_json::json!(0.0), serde_json::json!("16")] {
            edit_config(&adapter, "lora_alpha", alpha.clone());
            let mut model = fixture_model();
            let e = LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains(ADAPTER_CONFIG) && e.contains(&format!("lora_alpha is {alpha}")), "{e}");
            assert!(e.contains("> 0"), "{e}");
            // Loading into attached adapters (resuming) refuses it alike.
            let mut model = fixture_model();
            let set =
                LoraSet::attach(&mut model, &config(2, 4.0, &["q_proj", "v_proj"]), &Device::Cpu).unwrap();
            let e = set.load_peft(&adapter).unwrap_err().to_string();
            assert!(e.contains(ADAPTER_CONFIG) && e.contains("lora_alpha is"), "{e}");
        }
        edit_config(&adapter, "lora_alpha", 4.0.into());
        let mut model = fixture_model();
        assert_eq!(LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).unwrap().config.alpha, 4.0);
    }

    /// Diverged adapters (NaN or Inf in a factor, in f32 or bf16) are refused on load, naming
    /// the file and the tensor, with the way out.
    #[test]
    fn nan_or_inf_adapter_weights_are_refused_naming_the_tensor() {
        let (_dir, adapter) = saved_adapter();
        let weights = adapter.join(ADAPTER_WEIGHTS);
        let good = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let key = good.keys().filter(|k| k.ends_with("lora_B.weight")).min().unwrap().clone();
        for (bad, dtype) in [(f32::NAN, DType::F32), (f32::INFINITY, DType::F32), (f32::NAN, DType::BF16)] {
            let mut tensors = good.clone();
            let t = &tensors[&key];
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[1] = bad;
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            tensors.insert(key.clone(), t);
            let tensors: HashMap<String, Tensor> =
                tensors.into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
            candle_core::safetensors::save(&tensors, &weights).unwrap();
            let mut model = fixture_model();
            let e = LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains(ADAPTER_WEIGHTS) && e.contains("NaN/Inf") && e.contains(&key), "{e}");
            assert!(e.contains("earlier checkpoint") && !e.contains("more of its"), "{e}");
        }
        candle_core::safetensors::save(&good, &weights).unwrap();
        let mut model = fixture_model();
        assert!(LoraSet::attach_peft(&mut model, &adapter, &Device::Cpu).is_ok());
    }

    #[test]
    fn patterns_match_paths() {
        let p = |v: &[&str]| v.iter().flat_map(|s| expand(s)).collect::<Vec<_>>();
        assert!(matches("detr_decoder.layers.0.self_attn.q_proj", &p(&["q_proj"])));
        assert!(!matches("detr_decoder.layers.0.self_attn.q_proj", &p(&["proj"])));
        assert!(matches("detr_decoder.layers.0.self_attn.o_proj", &p(&["proj"])));
        assert!(matches("vision_encoder.backbone.layers.3.attention.k_proj", &p(&["qkv"])));
        assert!(matches("detr_encoder.layers.1.mlp.fc2", &p(&["linear2"])));
        assert!(matches("detr_decoder.layers.5.mlp.fc1", &p(&["detr_decoder.layers.*.mlp.fc1"])));
        assert!(!matches("detr_encoder.layers.5.mlp.fc1", &p(&["detr_decoder.layers.*.mlp.fc1"])));
        assert!(matches("text_encoder.text_model.encoder.layers.0.self_attn.out_proj", &p(&["out_proj"])));
        assert!(matches("geometry_encoder.layers.0.cross_attn.v_proj", &p(&["?_proj"])));
        assert!(!matches("detr_decoder.box_head.layer1", &p(&["fc1"])));
        assert_eq!(Component::of("dot_product_scoring.query_proj"), Some(Component::DetrDecoder));
        assert_eq!(Component::of("text_projection"), Some(Component::Text));
    }
}
