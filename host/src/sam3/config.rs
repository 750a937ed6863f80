//! SAM3 configuration, read from a transformers-style `config.json`.
//!
//! Accepts `model_type: "sam3"` (a `Sam3Model` config) and `model_type: "sam3_video"` (the hub's
//! `Sam3VideoModel`, whose detector config sits under `detector_config`). Structural fields (sizes,
//! layer and head counts) are required and a missing one is an error naming its path; incidental
//! fields (dropouts, activation names, initializer ranges) take transformers' defaults.

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
    /// MLP activation ("gelu" in SAM3).
    #[serde(default = "d_gelu")]
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

impl Sam3Config {
    /// Read `config.json` (either layout).
    pub fn from_file(path: &Path) -> Result<(Self, Layout), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_json(&text, path)
    }

    /// Parse config JSON; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<(Self, Layout), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid { path: origin.into(), reason };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("sam3");
        let (body, layout, prefix) = match model_type {
            "sam3" => (value.clone(), Layout::Sam3, ""),
            "sam3_video" => (
                value
                    .get("detector_config")
                    .cloned()
                    .ok_or_else(|| invalid("model_type sam3_video without `detector_config`".into()))?,
                Layout::Sam3Video,
                "detector_config.",
            ),
            other => {
                return Err(invalid(format!(
                    "model_type {other:?} is not a SAM3 detector (expected \"sam3\" or \"sam3_video\")"
                )))
            }
        };
        let cfg: Sam3Config = serde_path_to_error::deserialize(body)
            .map_err(|e| invalid(format!("{prefix}{}: {}", e.path(), e.inner())))?;
        cfg.validate().map_err(invalid)?;
        Ok((cfg, layout))
    }

    /// Check the constraints the modeling code relies on.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config.backbone_config;
        let fpn = self.vision_config.fpn_hidden_size;
        let mut errs = Vec::new();
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            errs.push(format!(
                "image_size {} must be a multiple of patch_size {}",
                v.image_size, v.patch_size
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
        if v.window_size == 0 {
            errs.push("window_size must be > 0".into());
        }
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

    #[test]
    fn missing_field_is_named_with_its_path() {
        let broken = TINY.replace(r#""patch_size": 14, "#, "");
        let e = Sam3Config::from_json(&broken, Path::new("m/config.json")).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json")
                && e.contains("vision_config.backbone_config")
                && e.contains("patch_size"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_sizes_are_rejected() {
        let broken = TINY.replace(r#""fpn_hidden_size": 16"#, r#""fpn_hidden_size": 24"#);
        let e = Sam3Config::from_json(&broken, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("fpn_hidden_size"), "{e}");
    }
}
