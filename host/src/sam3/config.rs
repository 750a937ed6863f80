//! SAM3 configuration, read from a transformers-style `config.json`.
//!
//! Accepts `model_type: "sam3"` (a `Sam3Model` config) and `model_type: "sam3_video"` (the hub's
//! `Sam3VideoModel`, whose detector config sits under `detector_config`). Every absent field takes
//! the default transformers gives it (the `Sam3*Config` classes; a present `text_config` takes
//! `CLIPTextConfig`'s defaults, e.g. `hidden_act: "quick_gelu"`, an absent one SAM3's own text
//! settings), so a config transformers accepts means the same model here. Defaulted fields are
//! recorded ([`ParsedConfig::defaulted`]) so a checkpoint that does not match them can say so.
//! Values transformers accepts but lorahost's code does not take as they are are normalized first:
//! `global_attn_indexes` entries outside `0..num_hidden_layers` are dropped with a warning (transformers
//! only asks `i in indexes`), `[s, s]` sizes become `s`; a non-square size is refused by name.

use serde::Deserialize;
use std::path::Path;

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// I/O.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: std::path::PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// Bad or missing field.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: std::path::PathBuf,
        /// What is wrong, with the field's path.
        reason: String,
    },
}

fn d_gelu() -> String {
    "gelu".into()
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_relu() -> String {
    "relu".into()
}
fn d_eps6() -> f64 {
    1e-6
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_theta() -> f64 {
    10000.0
}
fn d_drop() -> f64 {
    0.1
}
fn d_channels() -> usize {
    3
}
fn d_roi() -> usize {
    7
}

/// RoPE parameters (newer transformers write `rope_parameters`, older `rope_theta`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// Base of the frequencies.
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
}

/// The ViT backbone (`vision_config.backbone_config`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VitConfig {
    /// Token width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    /// Input size (square); must equal the size of the images fed in.
    pub image_size: usize,
    /// Patch size.
    pub patch_size: usize,
    /// MLP activation.
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    /// LayerNorm eps (transformers: 1e-6; Meta's original: 1e-5).
    #[serde(default = "d_eps6")]
    pub layer_norm_eps: f64,
    /// Window size of the windowed blocks (in patches).
    pub window_size: usize,
    /// Blocks with global attention (0-based).
    pub global_attn_indexes: Vec<usize>,
    /// Image size the absolute position embeddings were trained at.
    pub pretrain_image_size: usize,
    /// RoPE base (older configs).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE parameters (newer configs).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// LayerScale init (None: no LayerScale, as in SAM3).
    #[serde(default)]
    pub layer_scale_init_value: Option<f64>,
}

impl VitConfig {
    /// The RoPE base.
    pub fn theta(&self) -> f64 {
        self.rope_parameters.as_ref().map(|r| r.rope_theta).or(self.rope_theta).unwrap_or(10000.0)
    }
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The vision model: ViT + FPN neck (`vision_config`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VisionConfig {
    /// The ViT.
    pub backbone_config: VitConfig,
    /// Channels of every FPN level.
    pub fpn_hidden_size: usize,
    /// Scale of each FPN level relative to the ViT grid (SAM3: 4, 2, 1, 0.5; the last is dropped).
    pub scale_factors: Vec<f64>,
}

/// The CLIP text encoder (`text_config`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TextConfig {
    /// Vocabulary.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// CLIP projection width (the projection is unused by SAM3 but present in checkpoints).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// MLP activation ("gelu" in SAM3; CLIPTextConfig's default "quick_gelu" when absent).
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    /// LayerNorm eps.
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
}

/// A 256-d transformer stack (geometry encoder, DETR encoder/decoder).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct StackConfig {
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Residual dropout (training).
    #[serde(default = "d_drop")]
    pub dropout: f64,
    /// FFN activation.
    #[serde(default = "d_relu")]
    pub hidden_act: String,
    /// RoIAlign output size (geometry encoder only).
    #[serde(default = "d_roi")]
    pub roi_size: usize,
    /// Queries (decoder only).
    #[serde(default)]
    pub num_queries: Option<usize>,
}

/// The mask decoder (`mask_decoder_config`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MaskDecoderConfig {
    /// Width.
    pub hidden_size: usize,
    /// Pixel-decoder stages (convs in the weights; SAM3 uses all but the last).
    pub num_upsampling_stages: usize,
    /// Heads of the prompt cross-attention.
    pub num_attention_heads: usize,
}

/// A whole SAM3 detector (`Sam3Config`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sam3Config {
    /// Vision.
    pub vision_config: VisionConfig,
    /// Text.
    pub text_config: TextConfig,
    /// Geometry/exemplar encoder.
    pub geometry_encoder_config: StackConfig,
    /// Fusion encoder.
    pub detr_encoder_config: StackConfig,
    /// DETR decoder.
    pub detr_decoder_config: StackConfig,
    /// Mask head.
    pub mask_decoder_config: MaskDecoderConfig,
}

/// Where the detector's tensors sit in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `Sam3Model`: keys as the module paths.
    Sam3,
    /// `Sam3VideoModel`: detector keys under `detector_model.`; tracker keys ignored.
    Sam3Video,
}

/// A parsed config and what parsing had to decide on its own.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    /// The config.
    pub config: Sam3Config,
    /// Where the detector's tensors are expected.
    pub layout: Layout,
    /// Key paths (`detr_decoder_config.num_layers`) absent from the file that took transformers'
    /// default; a whole absent sub-config is one entry.
    pub defaulted: Vec<String>,
    /// What was accepted but changed or ignored (already logged as warnings).
    pub warnings: Vec<String>,
}

impl ParsedConfig {
    /// The defaulted keys that decide tensor shapes (or a whole defaulted sub-config): when the
    /// checkpoint does not match, these are the likely cause.
    pub fn defaulted_shapes(&self) -> Vec<&str> {
        const SHAPE_KEYS: [&str; 15] = [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_layers",
            "patch_size",
            "pretrain_image_size",
            "num_channels",
            "fpn_hidden_size",
            "scale_factors",
            "num_upsampling_stages",
            "vocab_size",
            "max_position_embeddings",
            "projection_dim",
            "num_queries",
            "backbone_config",
        ];
        self.defaulted
            .iter()
            .map(String::as_str)
            .filter(|k| {
                let last = k.rsplit('.').next().unwrap_or(k);
                SHAPE_KEYS.contains(&last) || last.ends_with("_config")
            })
            .collect()
    }
}

/// transformers' defaults of the `Sam3*Config` classes (transformers 5.24), per sub-config.
fn defaults_for(path: &str) -> serde_json::Value {
    use serde_json::json;
    match path {
        "vision_config" => json!({"fpn_hidden_size": 256, "scale_factors": [4.0, 2.0, 1.0, 0.5]}),
        "vision_config.backbone_config" => json!({
            "hidden_size": 1024, "intermediate_size": 4736, "num_hidden_layers": 32,
            "num_attention_heads": 16, "num_channels": 3, "image_size": 1008, "patch_size": 14,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "window_size": 24,
            "global_attn_indexes": [7, 15, 23, 31], "pretrain_image_size": 336,
            "layer_scale_init_value": null}),
        // A present text_config is a CLIPTextConfig with its own defaults.
        "text_config" => json!({
            "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
            "projection_dim": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}),
        "geometry_encoder_config" => json!({
            "hidden_size": 256, "num_layers": 3, "num_attention_heads": 8, "intermediate_size": 2048,
            "dropout": 0.1, "hidden_act": "relu", "roi_size": 7}),
        "detr_encoder_config" => json!({
            "hidden_size": 256, "num_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048,
            "dropout": 0.1, "hidden_act": "relu"}),
        "detr_decoder_config" => json!({
            "hidden_size": 256, "num_layers": 6, "num_queries": 200, "num_attention_heads": 8,
            "intermediate_size": 2048, "dropout": 0.1, "hidden_act": "relu"}),
        "mask_decoder_config" => {
            json!({"hidden_size": 256, "num_upsampling_stages": 3, "num_attention_heads": 8})
        }
        _ => json!({}),
    }
}

/// An absent `text_config`: `Sam3Config`'s `init_kwargs` for it (SAM3's text encoder).
fn absent_text_config() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 512,
        "num_hidden_layers": 24, "num_attention_heads": 16, "max_position_embeddings": 32,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5})
}

/// The `hidden_act` keys the model uses (`vision_config.hidden_act` is not used by transformers'
/// modeling code: the FPN's GELU is fixed).
const ACTIVATION_KEYS: [&str; 5] = [
    "vision_config.backbone_config",
    "text_config",
    "geometry_encoder_config",
    "detr_encoder_config",
    "detr_decoder_config",
];

/// Fill the absent fields of the sub-config at `path` (inside `parent`) with transformers'
/// defaults; `absent` is used when the whole sub-config is missing or null.
fn fill_defaults(
    parent: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    path: &str,
    absent: serde_json::Value,
    defaulted: &mut Vec<String>,
) -> Result<(), String> {
    let entry = parent.entry(key.to_string()).or_insert(serde_json::Value::Null);
    let whole = entry.is_null();
    if whole {
        defaulted.push(path.to_string());
        *entry = absent;
    }
    let obj = entry.as_object_mut().ok_or_else(|| format!("{path}: expected an object"))?;
    // transformers' attribute_map of the DETR stacks: `num_hidden_layers` is `num_layers`.
    if path.starts_with("detr_") && !obj.contains_key("num_layers") {
        if let Some(n) = obj.get("num_hidden_layers").cloned() {
            obj.insert("num_layers".into(), n);
        }
    }
    // `None` means "default" for these lists (the classes' `__post_init__`).
    for k in ["global_attn_indexes", "scale_factors"] {
        if obj.get(k).is_some_and(|v| v.is_null()) {
            obj.remove(k);
        }
    }
    if let serde_json::Value::Object(d) = defaults_for(path) {
        for (k, v) in d {
            if !obj.contains_key(&k) {
                if !whole {
                    defaulted.push(format!("{path}.{k}"));
                }
                obj.insert(k, v);
            }
        }
    }
    Ok(())
}

/// `s` or `[s, s]` → `s`; a non-square pair is refused by name.
fn square(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, path: &str) -> Result<(), String> {
    let Some(serde_json::Value::Array(a)) = obj.get(key) else { return Ok(()) };
    let side = match a.as_slice() {
        [h, w] if h == w => h.clone(),
        [_, _] => {
            return Err(format!(
                "non-square {key} is not supported: {path}.{key} is {}; lorahost's ViT takes square \
                 inputs, set a single size (e.g. {key}: {})",
                serde_json::Value::Array(a.clone()),
                a[0]
            ))
        }
        _ => {
            return Err(format!(
                "{path}.{key}: expected a size or [height, width], got {}",
                serde_json::Value::Array(a.clone())
            ))
        }
    };
    obj.insert(key.into(), side);
    Ok(())
}

/// Normalize a detector config body in place to what the typed structs take; returns the
/// defaulted key paths and the warnings.
fn normalize(body: &mut serde_json::Value) -> Result<(Vec<String>, Vec<String>), String> {
    let mut defaulted = Vec::new();
    let mut warnings = Vec::new();
    let top = body.as_object_mut().ok_or("expected a JSON object")?;
    fill_defaults(top, "vision_config", "vision_config", serde_json::json!({}), &mut defaulted)?;
    let vision = top.get_mut("vision_config").and_then(|v| v.as_object_mut()).ok_or("vision_config")?;
    let path = "vision_config.backbone_config";
    fill_defaults(vision, "backbone_config", path, serde_json::json!({}), &mut defaulted)?;
    let vit = vision.get_mut("backbone_config").and_then(|v| v.as_object_mut()).ok_or(path)?;
    for k in ["image_size", "patch_size", "pretrain_image_size"] {
        square(vit, k, path)?;
    }
    let layers = vit.get("num_hidden_layers").and_then(|v| v.as_i64());
    if let (Some(serde_json::Value::Array(idx)), Some(layers)) = (vit.get("global_attn_indexes"), layers) {
        let mut keep = Vec::new();
        let mut dropped = Vec::new();
        for v in idx {
            match v.as_i64() {
                Some(i) if (0..layers).contains(&i) => keep.push(serde_json::json!(i)),
                Some(i) => dropped.push(i),
                None => return Err(format!("{path}.global_attn_indexes: {v} is not an integer")),
            }
        }
        if !dropped.is_empty() {
            warnings.push(format!(
                "{path}.global_attn_indexes: {dropped:?} name no layer (the ViT has {layers} layers, 0..={}); \
                 ignored, as transformers does",
                layers.max(1) - 1
            ));
            vit.insert("global_attn_indexes".into(), serde_json::Value::Array(keep));
        }
    }
    fill_defaults(top, "text_config", "text_config", absent_text_config(), &mut defaulted)?;
    for key in
        ["geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"]
    {
        fill_defaults(top, key, key, serde_json::json!({}), &mut defaulted)?;
    }
    Ok((defaulted, warnings))
}

/// The most parameters a config may describe: 64× SAM3's 0.84 billion (about 215 GB in f32).
const MAX_PARAMETERS: f64 = 54e9;

impl Sam3Config {
    /// The square size of the ground-truth masks training builds: the mask head's output, the
    /// patch grid times the neck's first scale factor (SAM3: 1008 / 14 · 4 = 288).
    pub fn target_mask_size(&self) -> usize {
        let vc = &self.vision_config;
        let grid = vc.backbone_config.image_size as f64 / vc.backbone_config.patch_size.max(1) as f64;
        (grid.floor() * vc.scale_factors.first().copied().unwrap_or(4.0)).round() as usize
    }

    /// Read `config.json` (either layout).
    pub fn from_file(path: &Path) -> Result<(Self, Layout), ConfigError> {
        let p = Self::parse_file(path)?;
        Ok((p.config, p.layout))
    }

    /// Read `config.json` (either layout), with what parsing decided on its own.
    pub fn parse_file(path: &Path) -> Result<ParsedConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parse config JSON; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<(Self, Layout), ConfigError> {
        let p = Self::parse(text, origin)?;
        Ok((p.config, p.layout))
    }

    /// Parse config JSON (warnings are logged and returned); `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<ParsedConfig, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid { path: origin.into(), reason };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("sam3");
        let (mut body, layout, prefix) = match model_type {
            "sam3" => (value.clone(), Layout::Sam3, ""),
            // transformers: an absent detector_config is the default Sam3Config.
            "sam3_video" => (
                value
                    .get("detector_config")
                    .filter(|v| !v.is_null())
                    .cloned()
                    .unwrap_or(serde_json::json!({})),
                Layout::Sam3Video,
                "detector_config.",
            ),
            other => {
                return Err(invalid(format!(
                    "model_type {other:?} is not a SAM3 detector (expected \"sam3\" or \"sam3_video\")"
                )))
            }
        };
        let (defaulted, warnings) = normalize(&mut body).map_err(|e| invalid(format!("{prefix}{e}")))?;
        let defaulted: Vec<String> = defaulted.into_iter().map(|d| format!("{prefix}{d}")).collect();
        let cfg: Sam3Config = serde_path_to_error::deserialize(body)
            .map_err(|e| invalid(format!("{prefix}{}: {}", e.path(), e.inner())))?;
        for key in ACTIVATION_KEYS {
            let name = match key {
                "vision_config.backbone_config" => &cfg.vision_config.backbone_config.hidden_act,
                "text_config" => &cfg.text_config.hidden_act,
                "geometry_encoder_config" => &cfg.geometry_encoder_config.hidden_act,
                "detr_encoder_config" => &cfg.detr_encoder_config.hidden_act,
                _ => &cfg.detr_decoder_config.hidden_act,
            };
            if super::nn::HiddenAct::parse(name).is_none() {
                return Err(invalid(format!(
                    "{prefix}{key}.hidden_act: unsupported activation {name:?}; supported: {}",
                    super::nn::HiddenAct::NAMES.join(", ")
                )));
            }
        }
        cfg.validate().map_err(|e| invalid(format!("{prefix}{e}")))?;
        for w in &warnings {
            tracing::warn!("{}: {prefix}{w}", origin.display());
        }
        if !defaulted.is_empty() {
            tracing::debug!(
                "{}: not set, transformers' defaults used: {}",
                origin.display(),
                defaulted.join(", ")
            );
        }
        Ok(ParsedConfig { config: cfg, layout, defaulted, warnings })
    }

    /// About how many parameters the model these sizes describe has (the linears, embeddings
    /// and convolutions that grow with them; within a few percent of the real count for SAM3),
    /// with the part holding most of them and its keys. f64: the product of absurd sizes must
    /// not overflow.
    fn approx_parameters(&self) -> (f64, &'static str, String) {
        let v = &self.vision_config.backbone_config;
        let t = &self.text_config;
        let f = self.vision_config.fpn_hidden_size as f64;
        let n = |x: usize| x as f64;
        let block = |h: f64, i: f64, attn: f64| attn * h * h + 2.0 * h * i;
        let pretrain_grid = n(v.pretrain_image_size / v.patch_size.max(1));
        let vit = n(v.num_hidden_layers) * block(n(v.hidden_size), n(v.intermediate_size), 4.0)
            + (pretrain_grid * pretrain_grid + 1.0) * n(v.hidden_size)
            + n(v.num_channels) * n(v.patch_size) * n(v.patch_size) * n(v.hidden_size)
            + 9.0 * f * n(v.hidden_size);
        let text = n(t.num_hidden_layers) * block(n(t.hidden_size), n(t.intermediate_size), 4.0)
            + n(t.vocab_size + t.max_position_embeddings + t.projection_dim.unwrap_or(512))
                * n(t.hidden_size);
        let stack = |c: &StackConfig| n(c.num_layers) * block(f, n(c.intermediate_size), 8.0);
        let g = &self.geometry_encoder_config;
        let geometry = stack(g) + f * f * n(g.roi_size) * n(g.roi_size);
        let detr = stack(&self.detr_encoder_config)
            + stack(&self.detr_decoder_config)
            + n(self.detr_decoder_config.num_queries.unwrap_or(0)) * f;
        let mask = n(self.mask_decoder_config.num_upsampling_stages) * 9.0 * f * f;
        let parts = [
            (
                vit,
                "the ViT",
                "vision_config.backbone_config: num_hidden_layers, hidden_size, intermediate_size",
            ),
            (
                text,
                "the text encoder",
                "text_config: num_hidden_layers, hidden_size, intermediate_size, vocab_size",
            ),
            (
                geometry,
                "the geometry encoder",
                "fpn_hidden_size, geometry_encoder_config: num_layers, intermediate_size, roi_size",
            ),
            (
                detr,
                "the DETR encoder and decoder",
                "fpn_hidden_size, detr_*_config: num_layers, intermediate_size",
            ),
            (mask, "the mask decoder", "fpn_hidden_size, mask_decoder_config.num_upsampling_stages"),
        ];
        let total = parts.iter().map(|p| p.0).sum();
        let (_, part, keys) = parts.iter().copied().fold(parts[0], |a, b| if b.0 > a.0 { b } else { a });
        (total, part, keys.to_string())
    }

    /// Check the constraints the modeling code relies on.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config.backbone_config;
        let fpn = self.vision_config.fpn_hidden_size;
        let mut errs = Vec::new();
        // Sizes far beyond any SAM3 (about 64× its own; 16× for the image sizes, whose RoPE
        // tables and token grids grow with their square) are a typo, and building them would end
        // in an allocation failure, a panic or the OOM killer rather than this message. So are
        // the zeros the modeling code divides by or cannot build.
        let (t, g, e, d, m) = (
            &self.text_config,
            &self.geometry_encoder_config,
            &self.detr_encoder_config,
            &self.detr_decoder_config,
            &self.mask_decoder_config,
        );
        const W: usize = 65_536;
        const L: usize = 2048;
        // (key, value, least, most, SAM3's own)
        let ranges: [(&str, usize, usize, usize, usize); 27] = [
            ("vision_config.backbone_config.hidden_size", v.hidden_size, 1, W, 1024),
            ("vision_config.backbone_config.intermediate_size", v.intermediate_size, 1, W, 4736),
            ("vision_config.backbone_config.num_hidden_layers", v.num_hidden_layers, 0, L, 32),
            ("vision_config.backbone_config.num_channels", v.num_channels, 1, 192, 3),
            ("vision_config.backbone_config.image_size", v.image_size, 1, 16_384, 1008),
            ("vision_config.backbone_config.pretrain_image_size", v.pretrain_image_size, 1, 16_384, 336),
            ("vision_config.backbone_config.patch_size", v.patch_size, 1, 16_384, 14),
            ("vision_config.backbone_config.window_size", v.window_size, 0, 1024, 24),
            ("vision_config.fpn_hidden_size", fpn, 1, W, 256),
            ("text_config.hidden_size", t.hidden_size, 1, W, 1024),
            ("text_config.intermediate_size", t.intermediate_size, 1, W, 4096),
            ("text_config.num_hidden_layers", t.num_hidden_layers, 0, L, 24),
            ("text_config.vocab_size", t.vocab_size, 1, 4_000_000, 49408),
            ("text_config.max_position_embeddings", t.max_position_embeddings, 1, 8192, 32),
            ("text_config.projection_dim", t.projection_dim.unwrap_or(1), 1, W, 512),
            ("geometry_encoder_config.intermediate_size", g.intermediate_size, 1, W, 2048),
            ("geometry_encoder_config.num_layers", g.num_layers, 0, L, 3),
            ("geometry_encoder_config.roi_size", g.roi_size, 1, 448, 7),
            ("detr_encoder_config.intermediate_size", e.intermediate_size, 1, W, 2048),
            ("detr_encoder_config.num_layers", e.num_layers, 0, L, 6),
            ("detr_decoder_config.intermediate_size", d.intermediate_size, 1, W, 2048),
            ("detr_decoder_config.num_layers", d.num_layers, 1, L, 6),
            ("detr_decoder_config.num_queries", d.num_queries.unwrap_or(1), 1, W, 200),
            ("mask_decoder_config.hidden_size", m.hidden_size, 1, W, 256),
            ("mask_decoder_config.num_upsampling_stages", m.num_upsampling_stages, 0, 192, 3),
            ("mask_decoder_config.num_attention_heads", m.num_attention_heads, 1, W, 8),
            ("vision_config.backbone_config.num_attention_heads", v.num_attention_heads, 1, W, 16),
        ];
        for (name, value, least, most, own) in ranges {
            if value > most {
                errs.push(format!(
                    "{name} is {value}, beyond any SAM3 (at most {most}; SAM3's own is {own})"
                ));
            } else if value < least {
                errs.push(format!("{name} is {value}: it must be at least {least} (SAM3's own is {own})"));
            }
        }
        if !errs.is_empty() {
            return Err(errs.join("; "));
        }
        // Each size within its range can still multiply into a model no machine holds (a
        // 65536-wide ViT of 2048 layers); building even its shapes or adapters would not end.
        let (params, part, keys) = self.approx_parameters();
        if params > MAX_PARAMETERS {
            return Err(format!(
                "these sizes describe a model of about {:.1} billion parameters, most of them in {part} \
                 ({keys}), beyond any SAM3 (at most {:.0} billion; SAM3 has 0.84 billion): check those sizes \
                 against SAM3's own config.json",
                params / 1e9,
                MAX_PARAMETERS / 1e9
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            errs.push(format!(
                "image_size {} must be a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.pretrain_image_size < v.patch_size {
            errs.push(format!(
                "pretrain_image_size {} must be at least patch_size {} (its position embeddings are a grid of patches)",
                v.pretrain_image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            errs.push(format!(
                "ViT hidden_size {} not divisible by heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        } else if !v.head_dim().is_multiple_of(4) {
            errs.push(format!("ViT head_dim {} must be divisible by 4 (2-D axial RoPE)", v.head_dim()));
        }
        // window_size 0 makes every block global (transformers builds each layer with
        // `window_size if i not in global_attn_indexes else 0`), with RoPE positions scaled by
        // window_size / grid = 0, as vision.rs does.
        if let Some(&i) = v.global_attn_indexes.iter().find(|&&i| i >= v.num_hidden_layers) {
            errs.push(format!("global_attn_indexes has {i} but there are {} layers", v.num_hidden_layers));
        }
        for (name, c) in [
            ("geometry_encoder_config", &self.geometry_encoder_config),
            ("detr_encoder_config", &self.detr_encoder_config),
            ("detr_decoder_config", &self.detr_decoder_config),
        ] {
            if c.hidden_size != fpn {
                errs.push(format!("{name}.hidden_size {} must equal fpn_hidden_size {fpn}", c.hidden_size));
            }
            if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
                errs.push(format!("{name}: hidden_size not divisible by num_attention_heads"));
            }
        }
        if self.detr_decoder_config.num_queries.unwrap_or(0) == 0 {
            errs.push("detr_decoder_config.num_queries must be set and > 0".into());
        }
        let m = &self.mask_decoder_config;
        if m.hidden_size != fpn {
            errs.push(format!(
                "mask_decoder_config.hidden_size {} must equal fpn_hidden_size {fpn}",
                m.hidden_size
            ));
        }
        if !m.hidden_size.is_multiple_of(m.num_attention_heads.max(1)) {
            errs.push(format!(
                "mask_decoder_config.hidden_size {} not divisible by num_attention_heads {}",
                m.hidden_size, m.num_attention_heads
            ));
        }
        if !m.hidden_size.is_multiple_of(8) {
            errs.push("mask_decoder_config.hidden_size must be divisible by 8 (GroupNorm(8))".into());
        }
        let t = &self.text_config;
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            errs.push("text_config: hidden_size not divisible by num_attention_heads".into());
        }
        if self.vision_config.scale_factors.is_empty() {
            errs.push("vision_config.scale_factors is empty".into());
        }
        for s in &self.vision_config.scale_factors {
            if ![4.0, 2.0, 1.0, 0.5].contains(s) {
                errs.push(format!("unsupported FPN scale factor {s} (SAM3 uses 4, 2, 1, 0.5)"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{
      "model_type": "sam3",
      "vision_config": {"backbone_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "image_size": 112, "patch_size": 14, "window_size": 4,
         "global_attn_indexes": [1], "pretrain_image_size": 56, "rope_parameters": {"rope_theta": 10000.0}},
         "fpn_hidden_size": 16, "scale_factors": [4.0, 2.0, 1.0, 0.5]},
      "text_config": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "max_position_embeddings": 16},
      "geometry_encoder_config": {"hidden_size": 16, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
      "detr_encoder_config": {"hidden_size": 16, "num_layers": 2, "num_attention_heads": 2, "intermediate_size": 32},
      "detr_decoder_config": {"hidden_size": 16, "num_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
         "num_queries": 8},
      "mask_decoder_config": {"hidden_size": 16, "num_upsampling_stages": 3, "num_attention_heads": 2}
    }"#;

    #[test]
    fn parses_both_layouts() {
        let (c, l) = Sam3Config::from_json(TINY, Path::new("config.json")).unwrap();
        assert_eq!(l, Layout::Sam3);
        assert_eq!(c.vision_config.backbone_config.grid(), 8);
        assert_eq!(c.vision_config.backbone_config.theta(), 10000.0);
        let video = format!(r#"{{"model_type": "sam3_video", "detector_config": {TINY}}}"#);
        let (c2, l2) = Sam3Config::from_json(&video, Path::new("config.json")).unwrap();
        assert_eq!((c2, l2), (c, Layout::Sam3Video));
    }

    fn parse(text: &str) -> Result<ParsedConfig, String> {
        Sam3Config::parse(text, Path::new("m/config.json")).map_err(|e| e.to_string())
    }

    /// TINY with `key` removed from the object at `section` (a `/`-separated JSON pointer).
    fn without(section: &str, key: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        v.pointer_mut(section).unwrap().as_object_mut().unwrap().remove(key);
        v.to_string()
    }

    /// TINY with the key at `pointer` (a JSON pointer; the key may be absent) set to `value`.
    fn with(pointer: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        let (section, key) = pointer.rsplit_once('/').unwrap();
        v.pointer_mut(section).unwrap().as_object_mut().unwrap().insert(key.into(), value);
        v.to_string()
    }

    /// Sizes no SAM3 has (and zeros the model code divides by) are refused by name before
    /// anything is built, as are sizes that multiply into a model no machine holds; SAM3's own
    /// config passes.
    #[test]
    fn absurd_sizes_are_named_before_anything_is_allocated() {
        use serde_json::json;
        let vit = "/vision_config/backbone_config";
        for (pointer, value, expected) in [
            (
                format!("{vit}/intermediate_size"),
                json!(1_000_000_000_000u64),
                "vision_config.backbone_config.intermediate_size is 1000000000000, beyond any SAM3 (at most 65536",
            ),
            (format!("{vit}/hidden_size"), json!(1_000_000_000), "backbone_config.hidden_size is 1000000000"),
            (format!("{vit}/num_hidden_layers"), json!(1_000_000_000), "num_hidden_layers is 1000000000"),
            (format!("{vit}/window_size"), json!(1_000_000_000), "window_size is 1000000000"),
            (format!("{vit}/image_size"), json!(0), "image_size is 0: it must be at least 1"),
            (format!("{vit}/pretrain_image_size"), json!(7), "pretrain_image_size 7 must be at least patch_size 14"),
            ("/geometry_encoder_config/roi_size".into(), json!(1_000_000_000), "roi_size is 1000000000"),
            (
                "/mask_decoder_config/num_upsampling_stages".into(),
                json!(1_000_000_000),
                "num_upsampling_stages is 1000000000",
            ),
            ("/mask_decoder_config/num_attention_heads".into(), json!(0), "mask_decoder_config.num_attention_heads is 0"),
            ("/mask_decoder_config/num_attention_heads".into(), json!(3), "not divisible by num_attention_heads 3"),
            ("/text_config/vocab_size".into(), json!(0), "text_config.vocab_size is 0"),
            ("/detr_decoder_config/num_queries".into(), json!(10_000_000), "detr_decoder_config.num_queries is 10000000"),
            ("/detr_decoder_config/num_layers".into(), json!(0), "detr_decoder_config.num_layers is 0"),
        ] {
            let e = parse(&with(&pointer, value)).unwrap_err();
            assert!(e.contains(expected), "{pointer}: {e}");
        }
        // Each size within its range, together 2048 layers of a 8192-wide ViT: ~800 billion.
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        let b = v.pointer_mut(vit).unwrap();
        (b["hidden_size"], b["intermediate_size"], b["num_hidden_layers"]) =
            (json!(8192), json!(8192), json!(2048));
        let e = parse(&v.to_string()).unwrap_err();
        assert!(e.contains("billion parameters, most of them in the ViT"), "{e}");
        // SAM3 itself and the tiny configs pass.
        let asset = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sam3_config.json");
        let (full, _) = Sam3Config::from_file(&asset).unwrap();
        let (n, ..) = full.approx_parameters();
        assert!((0.8e9..0.9e9).contains(&n), "{n}");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for tiny in ["examples/tiny_sam3/config.json", "examples/bench/full_depth_tiny_width.json"] {
            Sam3Config::from_file(&repo.join(tiny)).unwrap();
        }
    }

    #[test]
    fn bad_field_is_named_with_its_path() {
        let broken = TINY.replace(r#""patch_size": 14"#, r#""patch_size": "14""#);
        let e = parse(&broken).unwrap_err();
        assert!(
            e.contains("m/config.json")
                && e.contains("vision_config.backbone_config")
                && e.contains("patch_size"),
            "{e}"
        );
    }

    /// An absent config means transformers' `Sam3Config()`, i.e. facebook/sam3's architecture
    /// (host/assets/sam3_config.json is that checkpoint's config, written by transformers).
    #[test]
    fn empty_config_is_transformers_default() {
        let asset = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sam3_config.json");
        let (mut full, _) = Sam3Config::from_file(&asset).unwrap();
        let p = parse(r#"{"model_type": "sam3"}"#).unwrap();
        full.vision_config.backbone_config.rope_parameters = None;
        assert_eq!(p.config, full);
        assert!(p.defaulted.contains(&"text_config".to_string()), "{:?}", p.defaulted);
        // sam3_video without detector_config: the default detector too.
        let v = parse(r#"{"model_type": "sam3_video"}"#).unwrap();
        assert_eq!((v.config, v.layout), (full, Layout::Sam3Video));
    }

    /// A present text_config is a CLIPTextConfig: its absent fields take CLIP's defaults
    /// (`python3 -c "from transformers import Sam3Config; t=Sam3Config(text_config={'vocab_size':128}).text_config;
    /// print(t.hidden_act, t.hidden_size, t.max_position_embeddings, t.num_attention_heads, t.intermediate_size,
    /// t.projection_dim, t.layer_norm_eps, t.num_hidden_layers)"` → `quick_gelu 512 77 8 2048 512 1e-05 12`),
    /// an absent one SAM3's text encoder (`gelu 1024 32 16 4096 512 1e-05 24`).
    #[test]
    fn text_defaults_follow_clip_text_config() {
        let p = parse(&without("/text_config", "hidden_act")).unwrap();
        assert_eq!(p.config.text_config.hidden_act, "quick_gelu");
        assert!(p.defaulted.contains(&"text_config.hidden_act".to_string()), "{:?}", p.defaulted);
        let explicit = TINY.replacen("\"text_config\": {", "\"text_config\": {\"hidden_act\": \"gelu\", ", 1);
        let p = parse(&explicit).unwrap();
        assert_eq!(p.config.text_config.hidden_act, "gelu");
        assert!(!p.defaulted.contains(&"text_config.hidden_act".to_string()));
        let t = parse(r#"{"text_config": {"vocab_size": 128}}"#).unwrap().config.text_config;
        assert_eq!(
            (t.hidden_act.as_str(), t.hidden_size, t.max_position_embeddings, t.num_attention_heads),
            ("quick_gelu", 512, 77, 8)
        );
        assert_eq!(
            (t.intermediate_size, t.projection_dim, t.layer_norm_eps, t.num_hidden_layers),
            (2048, Some(512), 1e-5, 12)
        );
        let t = parse("{}").unwrap().config.text_config;
        assert_eq!(
            (t.hidden_act.as_str(), t.hidden_size, t.max_position_embeddings, t.num_attention_heads),
            ("gelu", 1024, 32, 16)
        );
        assert_eq!((t.intermediate_size, t.num_hidden_layers, t.vocab_size), (4096, 24, 49408));
    }

    /// Keys transformers defaults are optional here too, with the same values.
    #[test]
    fn optional_keys_take_transformers_defaults() {
        let (base, _) = Sam3Config::from_json(TINY, Path::new("c")).unwrap();
        for (section, key) in [
            ("/geometry_encoder_config", "num_attention_heads"),
            ("/detr_encoder_config", "num_attention_heads"),
            ("/detr_decoder_config", "num_attention_heads"),
            ("/mask_decoder_config", "num_attention_heads"),
            ("/text_config", "num_attention_heads"),
            ("/mask_decoder_config", "num_upsampling_stages"),
            ("/vision_config/backbone_config", "patch_size"),
            ("/vision_config/backbone_config", "window_size"),
            ("/vision_config/backbone_config", "global_attn_indexes"),
            ("/vision_config", "scale_factors"),
        ] {
            let p = parse(&without(section, key)).unwrap_or_else(|e| panic!("{section}/{key}: {e}"));
            let path = format!("{}.{key}", section.trim_start_matches('/').replace('/', "."));
            assert!(p.defaulted.contains(&path), "{section}/{key}: {:?}", p.defaulted);
            let c = p.config;
            let got = match (section, key) {
                ("/geometry_encoder_config", _) => c.geometry_encoder_config.num_attention_heads,
                ("/detr_encoder_config", _) => c.detr_encoder_config.num_attention_heads,
                ("/detr_decoder_config", _) => c.detr_decoder_config.num_attention_heads,
                ("/mask_decoder_config", "num_attention_heads") => c.mask_decoder_config.num_attention_heads,
                ("/mask_decoder_config", _) => c.mask_decoder_config.num_upsampling_stages,
                ("/text_config", _) => c.text_config.num_attention_heads,
                (_, "patch_size") => c.vision_config.backbone_config.patch_size,
                (_, "window_size") => c.vision_config.backbone_config.window_size,
                (_, "global_attn_indexes") => {
                    // [7, 15, 23, 31] on 2 layers: none left (transformers: `i in indexes`).
                    assert!(c.vision_config.backbone_config.global_attn_indexes.is_empty());
                    continue;
                }
                _ => {
                    assert_eq!(c.vision_config.scale_factors, vec![4.0, 2.0, 1.0, 0.5]);
                    continue;
                }
            };
            let want = match key {
                "num_upsampling_stages" => 3,
                "patch_size" => 14,
                "window_size" => 24,
                _ => 8,
            };
            assert_eq!(got, want, "{section}/{key}");
        }
        // transformers' attribute_map: `num_hidden_layers` names a DETR stack's `num_layers`.
        let alias = without("/detr_decoder_config", "num_layers")
            .replace(r#""num_queries":8"#, r#""num_queries":8,"num_hidden_layers":2"#);
        assert_eq!(parse(&alias).unwrap().config, base);
    }

    #[test]
    fn global_indexes_outside_the_layers_are_ignored_with_a_warning() {
        let cfg = TINY.replace(r#""global_attn_indexes": [1]"#, r#""global_attn_indexes": [-1, 1, 7, 15]"#);
        let p = parse(&cfg).unwrap();
        assert_eq!(p.config.vision_config.backbone_config.global_attn_indexes, vec![1]);
        assert_eq!(p.warnings.len(), 1);
        let w = &p.warnings[0];
        assert!(w.contains("global_attn_indexes") && w.contains("[-1, 7, 15]"), "{w}");
    }

    /// transformers makes every block global when window_size is 0 (each layer gets
    /// `window_size if i not in global_attn_indexes else 0`).
    #[test]
    fn window_size_zero_is_accepted() {
        let p = parse(&TINY.replace(r#""window_size": 4"#, r#""window_size": 0"#)).unwrap();
        assert_eq!(p.config.vision_config.backbone_config.window_size, 0);
    }

    #[test]
    fn sizes_as_pairs() {
        let sq = TINY.replace(r#""image_size": 112"#, r#""image_size": [112, 112]"#);
        let sq = sq.replace(r#""patch_size": 14"#, r#""patch_size": [14, 14]"#);
        assert_eq!(parse(&sq).unwrap().config, Sam3Config::from_json(TINY, Path::new("c")).unwrap().0);
        let e = parse(&TINY.replace(r#""image_size": 112"#, r#""image_size": [112, 84]"#)).unwrap_err();
        assert!(
            e.contains("non-square image_size is not supported")
                && e.contains("vision_config.backbone_config.image_size"),
            "{e}"
        );
        assert!(!e.contains("invalid type"), "{e}");
    }

    #[test]
    fn unsupported_activation_names_its_key_and_the_choices() {
        for (section, path) in [
            ("\"text_config\": {", "text_config.hidden_act"),
            ("\"backbone_config\": {", "vision_config.backbone_config.hidden_act"),
            ("\"detr_decoder_config\": {", "detr_decoder_config.hidden_act"),
        ] {
            let cfg = TINY.replacen(section, &format!("{section}\"hidden_act\": \"mish\", "), 1);
            let e = parse(&cfg).unwrap_err();
            assert!(
                e.contains(path) && e.contains("\"mish\"") && e.contains("quick_gelu, relu, silu"),
                "{e}"
            );
            let video = format!(r#"{{"model_type": "sam3_video", "detector_config": {cfg}}}"#);
            let e = parse(&video).unwrap_err();
            assert!(e.contains(&format!("detector_config.{path}")), "{e}");
        }
        for name in ["quick_gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "swish"] {
            let cfg = TINY.replacen(
                "\"text_config\": {",
                &format!("\"text_config\": {{\"hidden_act\": \"{name}\", "),
                1,
            );
            assert_eq!(parse(&cfg).unwrap().config.text_config.hidden_act, name);
        }
    }

    #[test]
    fn inconsistent_sizes_are_rejected() {
        let broken = TINY.replace(r#""fpn_hidden_size": 16"#, r#""fpn_hidden_size": 24"#);
        let e = Sam3Config::from_json(&broken, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("fpn_hidden_size"), "{e}");
    }
}
