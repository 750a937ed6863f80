//! The whole SAM3 detector: transformers' `Sam3Model.forward`, plus Meta's original prompt path
//! and the training-time outputs (per-layer logits, boxes and presence for auxiliary losses, and
//! the one-to-many/DAC half of the decoder).
//!
//! Data flow: vision (ViT + FPN, the coarsest level dropped) → text (CLIP + resizer) → geometry
//! (boxes + CLS) → prompt = [text; geometry] → fusion encoder → DETR decoder → box head,
//! dot-product scoring, presence → mask head.

use super::config::Sam3Config;
use super::decoder::{DecoderOptions, DetrDecoder};
use super::encoder::DetrEncoder;
use super::geometry::{GeometryEncoder, NoBoxPolicy};
use super::mask_head::MaskDecoder;
use super::nn::box_cxcywh_to_xyxy;
use super::scoring::DotProductScoring;
use super::text::TextEncoder;
use super::vision::VisionModel;
use super::weights::{self, Checkpoint, Coverage};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::path::Path;

/// Whose numerics to follow where Meta's original code and transformers' port differ.
///
/// | | `Original` (default: training and inference) | `Transformers` (parity) |
/// |---|---|---|
/// | text-only prompt | geometry encoder runs: one CLS token | geometry encoder skipped |
/// | presence logit | unclamped | clamped to ±10 |
/// | ViT LayerNorm eps | 1e-5 | the config's `layer_norm_eps` (1e-6) |
///
/// Both return boxes as normalized xyxy in `pred_boxes` (transformers' format) and cxcywh in
/// `all_boxes_cxcywh` (the original's format, used by the training loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Semantics {
    /// Meta's original `Sam3Image` (how SAM3 was trained).
    #[default]
    Original,
    /// transformers' `Sam3Model`: reproduces it exactly.
    Transformers,
}

/// ViT LayerNorm eps of Meta's original code.
const ORIGINAL_VIT_EPS: f64 = 1e-5;

/// Model inputs (the `forward` contract).
#[derive(Debug, Clone)]
pub struct Sam3Inputs {
    /// (B, 3, S, S), normalized to [-1, 1].
    pub pixel_values: Tensor,
    /// (B, T) token ids.
    pub input_ids: Tensor,
    /// (B, T), 1 = valid token.
    pub attention_mask: Tensor,
    /// (B, N, 4) normalized cxcywh box prompts.
    pub input_boxes: Option<Tensor>,
    /// (B, N): 1 positive, 0 negative, -10 padding.
    pub input_boxes_labels: Option<Tensor>,
    /// The host's copy of each row of `input_ids` / `attention_mask`: lets a frozen text encoder
    /// reuse the output of prompts it has seen ([`TextEncoder::forward_cached`]). None: encode.
    pub prompt_keys: Option<Vec<super::text::PromptKey>>,
}

/// Switches of one forward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Training mode: dropout on (as Meta's recipe).
    pub train: bool,
    /// Run the DAC one-to-many half of the decoder (training).
    pub dac: bool,
}

/// Model outputs. Q = queries; N = Q, or 2Q with DAC (the one-to-many half last).
#[derive(Debug, Clone)]
pub struct Sam3Outputs {
    /// Last-layer dot-product logits of the one-to-one queries (B, Q).
    pub pred_logits: Tensor,
    /// Last-layer boxes, normalized xyxy (B, Q, 4).
    pub pred_boxes: Tensor,
    /// Last-layer presence logit (B, 1).
    pub presence_logits: Tensor,
    /// Mask logits of the one-to-one queries (B, Q, H, W).
    pub pred_masks: Tensor,
    /// Semantic logits (B, 1, H, W).
    pub semantic_seg: Tensor,
    /// Logits of every layer and query (L, B, N).
    pub all_logits: Tensor,
    /// Boxes of every layer and query, cxcywh (L, B, N, 4).
    pub all_boxes_cxcywh: Tensor,
    /// Presence logits of every layer (L, B, 1).
    pub all_presence: Tensor,
    /// Mask logits of all N queries (B, N, H, W).
    pub all_masks: Tensor,
    /// Queries of the one-to-many half (0 without DAC).
    pub num_o2m: usize,
}

/// SAM3's image model.
pub struct Sam3Model {
    config: Sam3Config,
    /// ViT + FPN (`vision_encoder`).
    pub vision: VisionModel,
    /// CLIP text encoder + resizer (`text_encoder`, `text_projection`).
    pub text: TextEncoder,
    /// Box/exemplar prompts (`geometry_encoder`).
    pub geometry: GeometryEncoder,
    /// Fusion encoder (`detr_encoder`).
    pub encoder: DetrEncoder,
    /// DETR decoder (`detr_decoder`).
    pub decoder: DetrDecoder,
    /// Dot-product scoring (`dot_product_scoring`).
    pub scoring: DotProductScoring,
    /// Mask head (`mask_decoder`).
    pub mask: MaskDecoder,
    dtype: DType,
    device: Device,
    semantics: Semantics,
}

impl Sam3Model {
    /// Build from a VarBuilder whose paths are transformers' `Sam3Model` keys.
    pub fn load(vb: VarBuilder, config: &Sam3Config) -> Result<Self> {
        Ok(Sam3Model {
            vision: VisionModel::load(vb.pp("vision_encoder"), &config.vision_config)?,
            text: TextEncoder::load(vb.clone(), &config.text_config, config.detr_encoder_config.hidden_size)?,
            geometry: GeometryEncoder::load(vb.pp("geometry_encoder"), &config.geometry_encoder_config)?,
            encoder: DetrEncoder::load(vb.pp("detr_encoder"), &config.detr_encoder_config)?,
            decoder: DetrDecoder::load(vb.pp("detr_decoder"), &config.detr_decoder_config)?,
            scoring: DotProductScoring::load(vb.pp("dot_product_scoring"), &config.detr_decoder_config)?,
            mask: MaskDecoder::load(vb.pp("mask_decoder"), &config.mask_decoder_config)?,
            config: config.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            semantics: Semantics::Transformers,
        }
        .with_semantics(Semantics::Original))
    }

    /// Switch between Meta's original numerics and transformers' (see [`Semantics`]).
    pub fn set_semantics(&mut self, semantics: Semantics) {
        let vit_eps = match semantics {
            Semantics::Original => ORIGINAL_VIT_EPS,
            Semantics::Transformers => self.config.vision_config.backbone_config.layer_norm_eps,
        };
        let backbone = &mut self.vision.backbone;
        backbone.layer_norm.eps = vit_eps;
        for layer in &mut backbone.layers {
            layer.layer_norm1.eps = vit_eps;
            layer.layer_norm2.eps = vit_eps;
        }
        self.decoder.presence_logit_clamp = match semantics {
            Semantics::Original => None,
            Semantics::Transformers => Some(super::decoder::PRESENCE_LOGIT_CLAMP),
        };
        self.semantics = semantics;
    }

    /// Builder form of [`Sam3Model::set_semantics`].
    pub fn with_semantics(mut self, semantics: Semantics) -> Self {
        self.set_semantics(semantics);
        self
    }

    /// The numerics in use.
    pub fn semantics(&self) -> Semantics {
        self.semantics
    }

    /// Build from an opened checkpoint and check that every tensor was used (strict).
    pub fn from_checkpoint(
        ck: &Checkpoint,
        config: &Sam3Config,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<(Self, Coverage)> {
        let model = Self::load(ck.var_builder(dtype, device), config)?;
        let coverage = ck.finish()?;
        Ok((model, coverage))
    }

    /// Load a model: a transformers directory (`config.json` + safetensors, either layout) or
    /// Meta's `sam3.pt` with a `config.json` beside it.
    pub fn load_dir(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        check_not_adapter(path)?;
        // A transformers weights file named instead of its directory: load the directory.
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let path = match path.parent() {
            Some(dir) if path.is_file() && is_safetensors => {
                if !dir.join("config.json").is_file() {
                    bail!(
                        "{}: a safetensors weights file; point the model path at the transformers model directory (config.json + model.safetensors), not at the file",
                        path.display()
                    );
                }
                tracing::info!("{} is a weights file: loading its directory", path.display());
                dir
            }
            _ => path,
        };
        let (config, ck) = if path.is_file() {
            let config_path = path.with_file_name("config.json");
            if !config_path.is_file() {
                bail!(
                    "{}: an original checkpoint carries no config; put the matching config.json next to it",
                    path.display()
                );
            }
            let (config, _) = super::config::Sam3Config::from_file(&config_path)?;
            (config, weights::open_original(path)?)
        } else {
            weights::open_dir(path)?
        };
        let (model, cov) = Self::from_checkpoint(&ck, &config, device, dtype)
            .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(
            "loaded {}: {}/{} tensors ({} tracker/unused tensors ignored)",
            path.display(),
            cov.used,
            cov.available,
            cov.ignored
        );
        Ok(model)
    }

    /// Turn activation checkpointing of the ViT blocks on or off: on, each block keeps only
    /// its input for backward and is recomputed there (about one extra ViT forward per step).
    pub fn set_activation_checkpointing(&mut self, on: bool) -> Result<()> {
        use super::vit_block::Checkpointing;
        self.set_vit_checkpointing(if on { Checkpointing::Full } else { Checkpointing::Off })
    }

    /// What the ViT blocks keep for backward (see [`super::vit_block::Checkpointing`]).
    pub fn set_vit_checkpointing(&mut self, c: super::vit_block::Checkpointing) -> Result<()> {
        self.vision.backbone.checkpoint = c;
        Ok(())
    }

    /// The config.
    pub fn config(&self) -> &Sam3Config {
        &self.config
    }

    /// Input image size (square).
    pub fn image_size(&self) -> usize {
        self.config.vision_config.backbone_config.image_size
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Inference forward pass (no dropout, no DAC).
    pub fn forward(&self, inputs: &Sam3Inputs) -> Result<Sam3Outputs> {
        self.forward_with(inputs, ForwardOptions::default())
    }

    /// Forward pass with explicit options.
    pub fn forward_with(&self, inputs: &Sam3Inputs, opts: ForwardOptions) -> Result<Sam3Outputs> {
        self.forward_indexed(inputs, None, opts)
    }

    /// Forward pass where several prompts share an image: `pixel_values` holds I images,
    /// `input_ids` Q prompts, and `image_index` (Q,) u32 says which image each prompt asks
    /// about. The vision backbone runs once per image; everything after it runs per prompt.
    /// `None` means one prompt per image (Q = I).
    pub fn forward_indexed(
        &self,
        inputs: &Sam3Inputs,
        image_index: Option<&Tensor>,
        opts: ForwardOptions,
    ) -> Result<Sam3Outputs> {
        // What the geometry encoder reads on the host, read before the backbone is queued.
        let host_boxes = super::geometry::GeometryEncoder::prefetch(
            inputs.input_boxes.as_ref(),
            inputs.input_boxes_labels.as_ref(),
            self.dtype,
        )?;
        let pixel_values = inputs.pixel_values.to_dtype(self.dtype)?;
        let vision = self.vision.forward(&pixel_values)?;
        mem_mark("vision");
        // The coarsest FPN level (0.5x) is computed by the neck but not used (`scalp=1`).
        let levels = vision.fpn.len().saturating_sub(1).max(1);
        let pick = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            match image_index {
                Some(idx) => ts.iter().map(|t| t.index_select(idx, 0)).collect(),
                None => Ok(ts.to_vec()),
            }
        };
        // Profiling: backward reaching the coarsest level (the encoder's and the geometry
        // encoder's input) ends their backward. (The finer levels feed only the mask head; a
        // mark there would fire in the middle of the heads' backward.)
        let marked = vision.fpn[..levels]
            .iter()
            .enumerate()
            .map(|(i, t)| match i + 1 == levels {
                true => crate::profile::backward_mark(t, "backward: encoder + geometry"),
                false => Ok(t.clone()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let fpn = &pick(&marked)?[..];
        let fpn_pos = &pick(&vision.fpn_pos[..levels])?[..];
        let (img, img_pos) = (&fpn[levels - 1], &fpn_pos[levels - 1]);
        mem_mark("per-query image features");

        let text = self.text.forward_cached(
            &inputs.input_ids,
            &inputs.attention_mask,
            inputs.prompt_keys.as_deref(),
        )?;
        mem_mark("text");
        let text_mask = inputs.attention_mask.ne(0i64)?.to_dtype(DType::U8)?;
        let policy = match self.semantics {
            Semantics::Original => NoBoxPolicy::ClsToken,
            Semantics::Transformers => NoBoxPolicy::Skip,
        };
        let geometry = self.geometry.encode_prompt_with(
            inputs.input_boxes.as_ref(),
            inputs.input_boxes_labels.as_ref(),
            img,
            Some(img_pos),
            policy,
            host_boxes.as_ref(),
            opts.train,
        )?;
        let (prompt, prompt_mask) = match geometry {
            Some(g) => {
                let b = g.last_hidden_state.dim(0)?;
                let (mut t, mut m) = (text.features.clone(), text_mask.clone());
                if t.dim(0)? == 1 && b > 1 {
                    t = t.repeat((b, 1, 1))?;
                    m = m.repeat((b, 1))?;
                }
                let gm = g.attention_mask.to_dtype(DType::U8)?;
                (
                    Tensor::cat(&[t, g.last_hidden_state.to_dtype(text.features.dtype())?], 1)?,
                    Tensor::cat(&[m, gm], 1)?,
                )
            }
            None => (text.features.clone(), text_mask),
        };
        mem_mark("geometry");

        let enc = self.encoder.forward(
            std::slice::from_ref(img),
            &prompt,
            std::slice::from_ref(img_pos),
            Some(&prompt_mask),
            opts.train,
        )?;
        mem_mark("encoder");
        // Profiling: backward reaching the encoder's output ends the decoder's and the mask
        // head's backward (the rest, until the vision features, is the encoder's and geometry's).
        let memory = crate::profile::backward_mark(&enc.last_hidden_state, "backward: decoder + mask head")?;
        let dec = self.decoder.forward(
            &memory,
            &enc.text_features,
            &enc.pos_embeds_flattened,
            Some(&prompt_mask),
            &enc.spatial_shapes,
            DecoderOptions { dac: opts.dac, train: opts.train },
        )?;
        mem_mark("decoder");
        let all_boxes_cxcywh = self.decoder.pred_boxes(&dec)?;
        let all_logits = self.scoring.forward(
            &dec.intermediate_hidden_states,
            &enc.text_features,
            Some(&prompt_mask),
            opts.train,
        )?;
        mem_mark("scoring");
        let all_logits = all_logits.squeeze(D::Minus1)?.to_dtype(DType::F32)?;
        let all_presence = dec.presence_logits.to_dtype(DType::F32)?;
        let l = all_logits.dim(0)?;
        let n = all_logits.dim(2)?;
        let q = n - dec.num_o2m;

        let queries = dec.intermediate_hidden_states.get(l - 1)?; // (B, N, C)
        let masks = self.mask.forward(&queries, fpn, &memory, Some(&prompt), Some(&prompt_mask))?;
        mem_mark("mask head");
        let all_masks = masks.pred_masks.to_dtype(DType::F32)?;

        let last_boxes = all_boxes_cxcywh.get(l - 1)?.narrow(1, 0, q)?;
        Ok(Sam3Outputs {
            pred_logits: all_logits.get(l - 1)?.narrow(1, 0, q)?,
            pred_boxes: box_cxcywh_to_xyxy(&last_boxes)?,
            presence_logits: all_presence.get(l - 1)?,
            pred_masks: all_masks.narrow(1, 0, q)?,
            semantic_seg: masks.semantic_seg.to_dtype(DType::F32)?,
            all_logits,
            all_boxes_cxcywh,
            all_presence,
            all_masks,
            num_o2m: dec.num_o2m,
        })
    }
}

/// Refuse a PEFT adapter directory where a model is expected, with the way to get a model.
pub fn check_not_adapter(path: &Path) -> anyhow::Result<()> {
    if path.join("adapter_config.json").is_file() && !path.join("config.json").is_file() {
        bail!(
            "{}: a LoRA adapter, not a model; merge it into its base model first (`lorahost export --config C.yaml --adapter {} --merge --out DIR`) and pass DIR as the model",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// Log the heap held after a component's forward (debug, target `lorahost::memory`) and charge
/// the time since the previous mark to it when profiling ([`crate::profile`]).
fn mem_mark(component: &str) {
    crate::profile::mark(component);
    tracing::debug!(
        target: "lorahost::memory",
        component,
        live_mib = crate::alloc_stats::live() as f64 / 1048576.0,
        "heap after forward"
    );
}
