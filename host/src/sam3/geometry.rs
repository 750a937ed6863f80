//! SAM3's geometry / exemplar prompt encoder (transformers' `Sam3GeometryEncoder` at
//! `geometry_encoder`; Meta's `SequenceGeometryEncoder`).
//!
//! Each box prompt (normalized cxcywh) becomes one token, the sum of
//! * `boxes_direct_project`: Linear 4 → d on (cx, cy, w, h);
//! * `boxes_pool_project`: Conv d → d with a roi×roi kernel (here: a Linear over d·roi·roi) on
//!   RoIAlign(roi×roi) of `vision_layer_norm`(level map), boxes as xyxy · (W, H), spatial_scale 1,
//!   adaptive sampling, `aligned=False` (torchvision semantics, see [`roi_align_weights`]);
//! * `boxes_pos_enc_project`: Linear (d + 2) → d on [pos_y(cy), pos_x(cx), h, w] (sine, 2π,
//!   d/2 features per axis; **h before w**);
//! * `label_embed[label]` (1 positive, 0 negative).
//!
//! A learned CLS token is written right after each sample's *valid* boxes
//! ([`concat_padded_sequences`]), then `final_proj` → `prompt_layer_norm` → pre-norm layers
//! (self-attention with the key padding mask and no position; cross-attention to the raw level
//! map with its sine position added to the keys only; ReLU MLP) → `output_layer_norm`.
//! Dropout is not applied (evaluation semantics, as in the parity reference).
//!
//! Text-only prompts: Meta's model always runs this encoder and gets exactly the CLS token;
//! transformers skips it. [`GeometryEncoder::encode_prompt`] offers both ([`NoBoxPolicy`]).
//!
//! All LayerNorms use eps 1e-5 (transformers builds them with PyTorch's default; the config's
//! `layer_norm_eps` is never read).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::StackConfig;
use super::nn::{
    box_cxcywh_to_xyxy, key_padding_bias, Activation, LayerNorm, Linear, Mlp, MultiHeadAttention,
};
use super::position::encode_values;

/// LayerNorm eps of every geometry-encoder norm.
pub const GEOMETRY_LN_EPS: f64 = 1e-5;

/// Box padding label in transformers' convention.
pub const PAD_LABEL: i64 = -10;

/// What the encoder returns.
#[derive(Debug, Clone)]
pub struct GeometryOutput {
    /// Geometry prompt tokens (B, N + 1, d): valid boxes, then CLS, then padding slots.
    pub last_hidden_state: Tensor,
    /// (B, N + 1) u8, 1 = valid (valid boxes + CLS), 0 = padding.
    pub attention_mask: Tensor,
}

/// What a prompt without boxes turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoBoxPolicy {
    /// Meta's original behaviour (used in training and for the released model): the encoder
    /// still runs and yields exactly one token, the CLS token.
    #[default]
    ClsToken,
    /// transformers' `Sam3Model.forward`: the geometry encoder is skipped (no geometry tokens).
    Skip,
}

/// One pre-norm geometry layer (`geometry_encoder.layers.{i}`).
#[derive(Debug, Clone)]
pub struct GeometryEncoderLayer {
    /// Norm before self-attention.
    pub layer_norm1: LayerNorm,
    /// Self-attention over prompt tokens.
    pub self_attn: MultiHeadAttention,
    /// Norm before cross-attention.
    pub layer_norm2: LayerNorm,
    /// Cross-attention to the image tokens.
    pub cross_attn: MultiHeadAttention,
    /// Norm before the MLP.
    pub layer_norm3: LayerNorm,
    /// `fc1 → ReLU → fc2`.
    pub mlp: Mlp,
}

impl GeometryEncoderLayer {
    /// Load `layers.{i}`.
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let h = cfg.num_attention_heads;
        Ok(GeometryEncoderLayer {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), d, GEOMETRY_LN_EPS)?,
            self_attn: MultiHeadAttention::load(vb.pp("self_attn"), d, h, "o_proj")?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), d, GEOMETRY_LN_EPS)?,
            cross_attn: MultiHeadAttention::load(vb.pp("cross_attn"), d, h, "o_proj")?,
            layer_norm3: LayerNorm::load(vb.pp("layer_norm3"), d, GEOMETRY_LN_EPS)?,
            mlp: Mlp::load(vb.pp("mlp"), d, cfg.intermediate_size, Activation::from_name(&cfg.hidden_act)?)?,
        })
    }

    /// `prompt` (B, L, d); `vision` (B, HW, d) values; `vision_key` = vision + pos (B, HW, d);
    /// `prompt_bias` additive key mask (B, 1, 1, L); `dropout_p`: the residual dropout of
    /// training (transformers' `self.dropout` on each branch), 0 for none.
    pub fn forward(
        &self,
        prompt: &Tensor,
        vision: &Tensor,
        vision_key: &Tensor,
        prompt_bias: Option<&Tensor>,
        dropout_p: f64,
    ) -> Result<Tensor> {
        let h = self.layer_norm1.forward(prompt)?;
        let x =
            crate::rng::dropout_add(&self.self_attn.forward(&h, &h, &h, prompt_bias)?, prompt, dropout_p)?;
        let h = self.layer_norm2.forward(&x)?;
        let x =
            crate::rng::dropout_add(&self.cross_attn.forward(&h, vision_key, vision, None)?, &x, dropout_p)?;
        let h = self.layer_norm3.forward(&x)?;
        crate::rng::dropout_add(&self.mlp.forward(&h)?, &x, dropout_p)
    }
}

/// The image tokens the layers cross-attend to (B, HW, d) and their positions, the keys being
/// their sum.
struct VisionTokens {
    vision: Tensor,
    pos: Option<Tensor>,
}

/// The geometry / exemplar encoder.
#[derive(Debug, Clone)]
pub struct GeometryEncoder {
    /// `label_embed.weight` (2, d).
    pub label_embed: Tensor,
    /// `cls_embed.weight` (1, d).
    pub cls_embed: Tensor,
    /// Linear 4 → d.
    pub boxes_direct_project: Linear,
    /// The roi×roi conv as a Linear d·roi·roi → d (weight reshaped from (d, d, roi, roi)).
    pub boxes_pool_project: Linear,
    /// Linear (d + 2) → d.
    pub boxes_pos_enc_project: Linear,
    /// Norm of the level map before RoIAlign.
    pub vision_layer_norm: LayerNorm,
    /// Linear d → d on the packed prompt.
    pub final_proj: Linear,
    /// Norm after `final_proj`.
    pub prompt_layer_norm: LayerNorm,
    /// The transformer layers.
    pub layers: Vec<GeometryEncoderLayer>,
    /// Final norm.
    pub output_layer_norm: LayerNorm,
    /// d.
    pub hidden_size: usize,
    /// RoIAlign output size.
    pub roi_size: usize,
    /// Residual dropout of the layers in training (`geometry_encoder_config.dropout`).
    pub dropout: f64,
}

impl GeometryEncoder {
    /// Load from `vb` = the `geometry_encoder` path.
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let r = cfg.roi_size;
        if !d.is_multiple_of(2) {
            candle_core::bail!("geometry hidden_size {d} must be even (sine box encoding)");
        }
        let pool = vb.pp("boxes_pool_project");
        let boxes_pool_project = Linear::from_conv(
            &pool,
            pool.get((d, d, r, r), "weight")?.reshape((d, d * r * r))?,
            Some(pool.get(d, "bias")?),
        );
        let layers = (0..cfg.num_layers)
            .map(|i| GeometryEncoderLayer::load(vb.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(GeometryEncoder {
            label_embed: vb.pp("label_embed").get((2, d), "weight")?,
            cls_embed: vb.pp("cls_embed").get((1, d), "weight")?,
            boxes_direct_project: Linear::load(vb.pp("boxes_direct_project"), 4, d, true)?,
            boxes_pool_project,
            boxes_pos_enc_project: Linear::load(vb.pp("boxes_pos_enc_project"), d + 2, d, true)?,
            vision_layer_norm: LayerNorm::load(vb.pp("vision_layer_norm"), d, GEOMETRY_LN_EPS)?,
            final_proj: Linear::load(vb.pp("final_proj"), d, d, true)?,
            prompt_layer_norm: LayerNorm::load(vb.pp("prompt_layer_norm"), d, GEOMETRY_LN_EPS)?,
            layers,
            output_layer_norm: LayerNorm::load(vb.pp("output_layer_norm"), d, GEOMETRY_LN_EPS)?,
            hidden_size: d,
            roi_size: r,
            dropout: cfg.dropout,
        })
    }

    /// transformers' `Sam3GeometryEncoder.forward`.
    ///
    /// * `box_embeddings` (B, N, 4): boxes, normalized cxcywh;
    /// * `box_mask` (B, N): nonzero = valid box (right-padded);
    /// * `box_labels` (B, N) integers: 1 positive, 0 negative (padding already mapped to 0, see
    ///   [`box_labels_and_mask`]);
    /// * `img_feats` (B, d, H, W): the level the encoder uses (HF's `img_feats[-1]`, the 1× FPN
    ///   level, 72² for a 1008 input);
    /// * `img_pos_embeds` (B, d, H, W): its sine position map (None: zeros).
    ///
    /// N = 0 is allowed and gives the CLS-only output (Meta's text-only path).
    pub fn forward(
        &self,
        box_embeddings: &Tensor,
        box_mask: &Tensor,
        box_labels: &Tensor,
        img_feats: &Tensor,
        img_pos_embeds: Option<&Tensor>,
    ) -> Result<GeometryOutput> {
        self.forward_with(box_embeddings, box_mask, box_labels, img_feats, img_pos_embeds, None, false)
    }

    /// [`Self::forward`] with the host's copies of what it reads on the host ([`HostBoxes`],
    /// from [`GeometryEncoder::prefetch`] on the same boxes and mask; None: read them here), in
    /// training (`train`: the layers' residual dropout) or not.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        box_embeddings: &Tensor,
        box_mask: &Tensor,
        box_labels: &Tensor,
        img_feats: &Tensor,
        img_pos_embeds: Option<&Tensor>,
        host: Option<&HostBoxes>,
        train: bool,
    ) -> Result<GeometryOutput> {
        let (b, n, four) = box_embeddings.dims3()?;
        if four != 4 || box_mask.dims() != [b, n] || box_labels.dims() != [b, n] {
            candle_core::bail!(
                "geometry encoder: boxes {:?}, mask {:?}, labels {:?} (expected (B,N,4), (B,N), (B,N))",
                box_embeddings.dims(),
                box_mask.dims(),
                box_labels.dims()
            );
        }
        let vision = self.vision_tokens(img_feats, img_pos_embeds)?;
        let cls = self.cls_tokens(b, img_feats.dtype())?;
        let ones = Tensor::ones((b, 1), DType::U8, img_feats.device())?;
        let (prompt, mask) = if n == 0 {
            (cls, ones)
        } else {
            let host = host.filter(|h| h.fits(b, n, img_feats.dtype()));
            let boxes = self.encode_boxes(box_embeddings, box_labels, img_feats, host)?;
            match host {
                Some(h) => concat_padded_sequences_counted(&boxes, &cls, &h.valid, &vec![1; b])?,
                None => concat_padded_sequences(&boxes, &box_mask.ne(0f64)?, &cls, &ones)?,
            }
        };
        self.encode_tokens(&prompt, &mask, &vision, train)
    }

    /// Meta's text-only path: no boxes, the output is the CLS token alone, (B, 1, d), mask ones.
    pub fn cls_only(&self, img_feats: &Tensor, img_pos_embeds: Option<&Tensor>) -> Result<GeometryOutput> {
        self.cls_only_with(img_feats, img_pos_embeds, false)
    }

    /// [`Self::cls_only`] in training (`train`: the layers' residual dropout) or not.
    fn cls_only_with(
        &self,
        img_feats: &Tensor,
        img_pos_embeds: Option<&Tensor>,
        train: bool,
    ) -> Result<GeometryOutput> {
        let b = img_feats.dim(0)?;
        let vision = self.vision_tokens(img_feats, img_pos_embeds)?;
        let cls = self.cls_tokens(b, img_feats.dtype())?;
        let ones = Tensor::ones((b, 1), DType::U8, img_feats.device())?;
        self.encode_tokens(&cls, &ones, &vision, train)
    }

    /// The geometry part of transformers' `Sam3Model.forward`, with a choice for prompts without
    /// boxes. `input_boxes` (B, N, 4) normalized cxcywh or None; `input_boxes_labels` (B, N) with
    /// 1 / 0 / −10 (padding) or None (all positive, all valid). Returns None only for
    /// [`NoBoxPolicy::Skip`] without boxes.
    pub fn encode_prompt(
        &self,
        input_boxes: Option<&Tensor>,
        input_boxes_labels: Option<&Tensor>,
        img_feats: &Tensor,
        img_pos_embeds: Option<&Tensor>,
        policy: NoBoxPolicy,
    ) -> Result<Option<GeometryOutput>> {
        self.encode_prompt_with(
            input_boxes,
            input_boxes_labels,
            img_feats,
            img_pos_embeds,
            policy,
            None,
            false,
        )
    }

    /// What [`Self::encode_prompt`] reads on the host for these boxes (None without boxes), read
    /// now: the model calls this before queueing the vision backbone, because on the GPU a read
    /// waits for everything queued before it — after the backbone, the device's queue would run
    /// dry and the host would issue the heads with the device idle. `dtype`: the image
    /// features' dtype (the boxes are rounded to it first, as [`Self::encode_prompt`] does).
    pub fn prefetch(
        input_boxes: Option<&Tensor>,
        input_boxes_labels: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Option<HostBoxes>> {
        let Some(boxes) = input_boxes.filter(|b| b.elem_count() > 0) else { return Ok(None) };
        let (b, n, _) = boxes.dims3()?;
        let valid = match input_boxes_labels {
            Some(l) => {
                let (_, mask) = box_labels_and_mask(l)?;
                valid_counts(&mask)?
            }
            None => vec![n as u32; b],
        };
        let xyxy = host_box_rows(&box_cxcywh_to_xyxy(&boxes.to_dtype(dtype)?.to_dtype(DType::F32)?)?)?;
        Ok(Some(HostBoxes { xyxy, valid, dtype }))
    }

    /// [`Self::encode_prompt`] with the host's copies from [`Self::prefetch`] on the same inputs, in
    /// training (`train`: the layers' residual dropout) or not.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_prompt_with(
        &self,
        input_boxes: Option<&Tensor>,
        input_boxes_labels: Option<&Tensor>,
        img_feats: &Tensor,
        img_pos_embeds: Option<&Tensor>,
        policy: NoBoxPolicy,
        host: Option<&HostBoxes>,
        train: bool,
    ) -> Result<Option<GeometryOutput>> {
        match input_boxes {
            Some(boxes) if boxes.elem_count() > 0 => {
                let (b, n, _) = boxes.dims3()?;
                let (labels, mask) = match input_boxes_labels {
                    Some(l) => box_labels_and_mask(l)?,
                    None => {
                        let ones = Tensor::ones((b, n), DType::U32, boxes.device())?;
                        (ones.clone(), ones.to_dtype(DType::U8)?)
                    }
                };
                self.forward_with(boxes, &mask, &labels, img_feats, img_pos_embeds, host, train).map(Some)
            }
            _ => match policy {
                NoBoxPolicy::ClsToken => self.cls_only_with(img_feats, img_pos_embeds, train).map(Some),
                NoBoxPolicy::Skip => Ok(None),
            },
        }
    }

    /// (B, 1, d) copies of the CLS embedding.
    fn cls_tokens(&self, b: usize, dtype: DType) -> Result<Tensor> {
        let d = self.hidden_size;
        self.cls_embed.to_dtype(dtype)?.reshape((1, 1, d))?.broadcast_as((b, 1, d))?.contiguous()
    }

    /// Raw image tokens (B, HW, d) and the cross-attention keys tokens + pos.
    fn vision_tokens(&self, img_feats: &Tensor, img_pos_embeds: Option<&Tensor>) -> Result<VisionTokens> {
        let vision = img_feats.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let pos = img_pos_embeds
            .map(|p| p.to_dtype(vision.dtype())?.flatten_from(2)?.transpose(1, 2))
            .transpose()?;
        Ok(VisionTokens { vision, pos })
    }

    /// transformers' `_encode_boxes`: (B, N, d) box tokens.
    fn encode_boxes(
        &self,
        boxes: &Tensor,
        labels: &Tensor,
        img_feats: &Tensor,
        host: Option<&HostBoxes>,
    ) -> Result<Tensor> {
        let (b, n, _) = boxes.dims3()?;
        let (_, d, h, w) = img_feats.dims4()?;
        let dtype = img_feats.dtype();
        let boxes = boxes.to_dtype(dtype)?;
        let mut embed = self.boxes_direct_project.forward(&boxes)?;

        // RoIAlign on LN(level) (channels-last tokens), then the roi×roi "conv" as a Linear.
        let normed = self.vision_layer_norm.forward(&img_feats.permute((0, 2, 3, 1))?)?; // (B,H,W,d)
        let tokens = normed.reshape((b, h * w, d))?;
        let r = self.roi_size;
        let scale = [w as f32, h as f32, w as f32, h as f32];
        let sampled = match host {
            // The same f32 products as the tensor path's `broadcast_mul`.
            Some(hb) => {
                let scaled: Vec<Vec<[f32; 4]>> = hb
                    .xyxy
                    .iter()
                    .map(|row| row.iter().map(|v| std::array::from_fn(|i| v[i] * scale[i])).collect())
                    .collect();
                roi_align_tokens_host(&tokens, h, w, &scaled, r, 1.0, -1)?
            }
            None => {
                let xyxy = box_cxcywh_to_xyxy(&boxes.to_dtype(DType::F32)?)?;
                let xyxy = xyxy.broadcast_mul(&Tensor::new(&scale, xyxy.device())?)?;
                roi_align_tokens(&tokens, h, w, &xyxy, r, 1.0, -1)?
            }
        }; // (B, N, r*r, d)
        let sampled = sampled.transpose(2, 3)?.contiguous()?.reshape((b, n, d * r * r))?;
        embed = (embed + self.boxes_pool_project.forward(&sampled)?)?;

        // [pos_y(cy), pos_x(cx), h, w] → Linear.
        let tau = 2.0 * std::f64::consts::PI;
        let col = |i: usize| -> Result<Tensor> { boxes.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1) };
        let (cx, cy, bw, bh) = (col(0)?, col(1)?, col(2)?, col(3)?);
        let nf = d / 2;
        let pos_x = encode_values(&(cx.to_dtype(DType::F32)? * tau)?, nf, 10000.0)?.to_dtype(dtype)?;
        let pos_y = encode_values(&(cy.to_dtype(DType::F32)? * tau)?, nf, 10000.0)?.to_dtype(dtype)?;
        let pos =
            Tensor::cat(&[pos_y, pos_x, bh.unsqueeze(D::Minus1)?, bw.unsqueeze(D::Minus1)?], D::Minus1)?;
        embed = (embed + self.boxes_pos_enc_project.forward(&pos)?)?;

        let ids = labels.to_dtype(DType::U32)?.flatten_all()?;
        let label = self.label_embed.to_dtype(dtype)?.index_select(&ids, 0)?.reshape((b, n, d))?;
        label + embed
    }

    /// final_proj → norm → layers → output norm on packed tokens with their mask.
    fn encode_tokens(
        &self,
        prompt: &Tensor,
        mask: &Tensor,
        vision: &VisionTokens,
        train: bool,
    ) -> Result<GeometryOutput> {
        let mut x = self.prompt_layer_norm.forward(&self.final_proj.forward(prompt)?)?;
        let bias = key_padding_bias(mask)?;
        let p = if train { self.dropout } else { 0.0 };
        let (pos, tokens) = (vision.pos.as_ref(), &vision.vision);
        // The keys of the op-by-op layers, made once when the first one needs them.
        let mut key = None;
        for layer in &self.layers {
            // On a training graph one op per layer (fewer, larger operations; the same values).
            if super::detr_block::serves_geometry(layer, &x, tokens, pos, Some(&bias)) {
                match super::detr_block::geometry_forward(layer, &x, tokens, pos, Some(&bias), p) {
                    Ok(y) => {
                        x = y;
                        continue;
                    }
                    Err(e) => super::detr_block::fall_back(e)?,
                }
            }
            if key.is_none() {
                key = Some(match pos {
                    Some(pos) => (tokens + pos)?,
                    None => tokens.clone(),
                });
            }
            x = layer.forward(&x, tokens, key.as_ref().expect("made above"), Some(&bias), p)?;
        }
        let last_hidden_state = self.output_layer_norm.forward(&x)?;
        Ok(GeometryOutput { last_hidden_state, attention_mask: mask.ne(0f64)? })
    }
}

/// transformers' preprocessing of box labels in `Sam3Model.forward`: mask = (label ≠ −10) as u8,
/// labels with −10 replaced by 0, as u32. `labels` (B, N), any integer or float dtype.
pub fn box_labels_and_mask(labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let l = labels.to_dtype(DType::F32)?;
    let mask = l.ne(PAD_LABEL as f64)?;
    let fixed = mask.where_cond(&l, &l.zeros_like()?)?.to_dtype(DType::U32)?;
    Ok((fixed, mask))
}

/// What the geometry encoder reads on the host, read ahead ([`GeometryEncoder::prefetch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HostBoxes {
    /// Per prompt row, each box as xyxy in normalized coordinates (f32 of the boxes rounded to
    /// `dtype`).
    pub xyxy: Vec<Vec<[f32; 4]>>,
    /// Valid (not padding) boxes per row.
    pub valid: Vec<u32>,
    /// The image features' dtype the boxes were rounded to.
    pub dtype: DType,
}

impl HostBoxes {
    /// Whether these copies describe `b` rows of `n` boxes for features in `dtype`.
    fn fits(&self, b: usize, n: usize, dtype: DType) -> bool {
        self.dtype == dtype
            && self.valid.len() == b
            && self.xyxy.len() == b
            && self.xyxy.iter().all(|r| r.len() == n)
    }
}

/// transformers' `concat_padded_sequences`: seq1 (B, L1, C) with mask1 (B, L1) and seq2
/// (B, L2, C) with mask2 (B, L2) (nonzero = valid) → (B, L1 + L2, C) and a u8 mask. Row b is
/// seq1[b] with seq2[b] written starting at n1 = valid count of mask1[b] (overwriting seq1's
/// padding slots there); slots beyond both keep seq1's values or zeros. The mask is 1 on the
/// first n1 + n2 slots. Differentiable in both sequences (one `index_select`).
pub fn concat_padded_sequences(
    seq1: &Tensor,
    mask1: &Tensor,
    seq2: &Tensor,
    mask2: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (b, l1, c) = seq1.dims3()?;
    let (b2, l2, c2) = seq2.dims3()?;
    if b != b2 || c != c2 || mask1.dims() != [b, l1] || mask2.dims() != [b, l2] {
        candle_core::bail!(
            "concat_padded_sequences: {:?}/{:?} and {:?}/{:?}",
            seq1.dims(),
            mask1.dims(),
            seq2.dims(),
            mask2.dims()
        );
    }
    concat_padded_sequences_counted(seq1, seq2, &valid_counts(mask1)?, &valid_counts(mask2)?)
}

/// Nonzero entries per row of a (B, L) mask, read to the host.
fn valid_counts(mask: &Tensor) -> Result<Vec<u32>> {
    mask.ne(0f64)?.to_dtype(DType::U32)?.sum(1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()
}

/// [`concat_padded_sequences`] with each row's valid counts `n1`, `n2` given (the host's).
pub fn concat_padded_sequences_counted(
    seq1: &Tensor,
    seq2: &Tensor,
    n1: &[u32],
    n2: &[u32],
) -> Result<(Tensor, Tensor)> {
    let (b, l1, c) = seq1.dims3()?;
    let (b2, l2, c2) = seq2.dims3()?;
    if b2 != b
        || c2 != c
        || n1.len() != b
        || n2.len() != b
        || n1.iter().any(|&v| v as usize > l1)
        || n2.iter().any(|&v| v as usize > l2)
    {
        candle_core::bail!(
            "concat_padded_sequences: counts {n1:?} / {n2:?} for {:?} and {:?}",
            seq1.dims(),
            seq2.dims()
        );
    }
    let len = l1 + l2;
    // Source rows per sample: [seq1 (l1), seq2 (l2), zero (1)].
    let src_len = l1 + l2 + 1;
    let zero = Tensor::zeros((b, 1, c), seq1.dtype(), seq1.device())?;
    let src = Tensor::cat(&[seq1, &seq2.to_dtype(seq1.dtype())?, &zero], 1)?.reshape((b * src_len, c))?;
    let mut idx = Vec::with_capacity(b * len);
    let mut mask = Vec::with_capacity(b * len);
    for bi in 0..b {
        let s = n1[bi] as usize;
        for p in 0..len {
            let local = if p >= s && p < s + l2 {
                l1 + (p - s)
            } else if p < l1 {
                p
            } else {
                l1 + l2
            };
            idx.push((bi * src_len + local) as u32);
            mask.push(u8::from(p < s + n2[bi] as usize));
        }
    }
    let idx = Tensor::from_vec(idx, b * len, seq1.device())?;
    let out = src.index_select(&idx, 0)?.reshape((b, len, c))?;
    let mask = Tensor::from_vec(mask, (b, len), seq1.device())?;
    Ok((out, mask))
}

/// torchvision `roi_align` sampling weights (`aligned=False`) for one feature map of size
/// `height`×`width`: row k·r² + ph·r + pw (box k, bin (ph, pw)) holds the weights of the H·W
/// map positions whose weighted sum is that output bin; returned row-major, (K·r², H·W).
///
/// Semantics (torchvision `roi_align_kernel.cpp`, computed in f32 like its f32 kernel): box
/// (x1, y1, x2, y2) · `spatial_scale`; roi size max(x2 − x1, 1) × max(y2 − y1, 1); bin = roi / r;
/// per bin g_h × g_w samples with g = `sampling_ratio` if > 0 else ⌈roi / r⌉, at
/// start + p·bin + (i + ½)·bin / g; a sample with y < −1, y > H, x < −1 or x > W contributes 0;
/// otherwise coordinates ≤ 0 clamp to 0, the bilinear neighbours clamp at H − 1 / W − 1; the bin
/// value is the average over all g_h·g_w samples (zeros included).
pub fn roi_align_weights(
    boxes_xyxy: &[[f32; 4]],
    height: usize,
    width: usize,
    output_size: usize,
    spatial_scale: f32,
    sampling_ratio: i32,
) -> Result<Vec<f32>> {
    let r = output_size;
    let hw = height * width;
    let mut out = vec![0f32; boxes_xyxy.len() * r * r * hw];
    let (hf, wf) = (height as f32, width as f32);
    for (k, bx) in boxes_xyxy.iter().enumerate() {
        if bx.iter().any(|v| !v.is_finite()) {
            candle_core::bail!("roi_align: box {k} has non-finite coordinates {bx:?}");
        }
        let start_w = bx[0] * spatial_scale;
        let start_h = bx[1] * spatial_scale;
        let roi_w = (bx[2] * spatial_scale - start_w).max(1.0);
        let roi_h = (bx[3] * spatial_scale - start_h).max(1.0);
        let bin_h = roi_h / r as f32;
        let bin_w = roi_w / r as f32;
        let grid_h =
            if sampling_ratio > 0 { sampling_ratio as usize } else { (roi_h / r as f32).ceil() as usize };
        let grid_w =
            if sampling_ratio > 0 { sampling_ratio as usize } else { (roi_w / r as f32).ceil() as usize };
        if grid_h.saturating_mul(grid_w) > 1 << 20 {
            candle_core::bail!(
                "roi_align: box {k} {bx:?} needs {grid_h}×{grid_w} samples per bin (boxes not normalized?)"
            );
        }
        let count = (grid_h * grid_w).max(1) as f32;
        for ph in 0..r {
            for pw in 0..r {
                let row = &mut out[((k * r + ph) * r + pw) * hw..][..hw];
                for iy in 0..grid_h {
                    let y = start_h + ph as f32 * bin_h + (iy as f32 + 0.5) * bin_h / grid_h as f32;
                    for ix in 0..grid_w {
                        let x = start_w + pw as f32 * bin_w + (ix as f32 + 0.5) * bin_w / grid_w as f32;
                        if y < -1.0 || y > hf || x < -1.0 || x > wf {
                            continue;
                        }
                        let (mut y, mut x) = (y.max(0.0), x.max(0.0));
                        let (mut y_lo, mut x_lo) = (y as usize, x as usize);
                        let y_hi = if y_lo >= height - 1 {
                            y_lo = height - 1;
                            y = y_lo as f32;
                            y_lo
                        } else {
                            y_lo + 1
                        };
                        let x_hi = if x_lo >= width - 1 {
                            x_lo = width - 1;
                            x = x_lo as f32;
                            x_lo
                        } else {
                            x_lo + 1
                        };
                        let ly = y - y_lo as f32;
                        let lx = x - x_lo as f32;
                        let (hy, hx) = (1.0 - ly, 1.0 - lx);
                        row[y_lo * width + x_lo] += hy * hx / count;
                        row[y_lo * width + x_hi] += hy * lx / count;
                        row[y_hi * width + x_lo] += ly * hx / count;
                        row[y_hi * width + x_hi] += ly * lx / count;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// RoIAlign on channels-last tokens as a differentiable matmul (gradients flow into `tokens`,
/// not into the boxes): `tokens` (B, H·W, C) row-major over (H, W); `boxes_xyxy` (B, N, 4) in
/// map coordinates before `spatial_scale`, box n of sample b pools from map b. Returns
/// (B, N, r·r, C), bins row-major. The sampling weights are built on the CPU.
pub fn roi_align_tokens(
    tokens: &Tensor,
    height: usize,
    width: usize,
    boxes_xyxy: &Tensor,
    output_size: usize,
    spatial_scale: f32,
    sampling_ratio: i32,
) -> Result<Tensor> {
    let (b, hw, _) = tokens.dims3()?;
    let (b2, n, _) = boxes_xyxy.dims3()?;
    if b != b2 || hw != height * width || height == 0 || width == 0 {
        candle_core::bail!(
            "roi_align: tokens {:?} for {height}×{width}, boxes {:?}",
            tokens.dims(),
            boxes_xyxy.dims()
        );
    }
    let boxes = host_box_rows(boxes_xyxy)?;
    debug_assert!(boxes.iter().all(|row| row.len() == n));
    roi_align_tokens_host(tokens, height, width, &boxes, output_size, spatial_scale, sampling_ratio)
}

/// (B, N, 4) boxes read to the host as f32, per row.
fn host_box_rows(boxes: &Tensor) -> Result<Vec<Vec<[f32; 4]>>> {
    let rows = boxes.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec3::<f32>()?;
    Ok(rows.iter().map(|row| row.iter().map(|v| [v[0], v[1], v[2], v[3]]).collect()).collect())
}

/// [`roi_align_tokens`] with the boxes (per image, xyxy in feature pixels) on the host.
pub fn roi_align_tokens_host(
    tokens: &Tensor,
    height: usize,
    width: usize,
    boxes: &[Vec<[f32; 4]>],
    output_size: usize,
    spatial_scale: f32,
    sampling_ratio: i32,
) -> Result<Tensor> {
    let (b, hw, c) = tokens.dims3()?;
    let n = boxes.first().map_or(0, |r| r.len());
    if boxes.len() != b || boxes.iter().any(|r| r.len() != n) || hw != height * width || hw == 0 {
        candle_core::bail!(
            "roi_align: tokens {:?} for {height}×{width}, {} rows of boxes",
            tokens.dims(),
            boxes.len()
        );
    }
    let rr = output_size * output_size;
    let mut all = Vec::with_capacity(b * n * rr * hw);
    for bx in boxes {
        all.extend(roi_align_weights(bx, height, width, output_size, spatial_scale, sampling_ratio)?);
    }
    let weights = Tensor::from_vec(all, (b, n * rr, hw), tokens.device())?.to_dtype(tokens.dtype())?;
    weights.matmul(&tokens.contiguous()?)?.reshape((b, n, rr, c))
}

/// torchvision-layout RoIAlign: `features` (B, C, H, W), `boxes_xyxy` (B, N, 4) → (B·N, C, r, r).
pub fn roi_align(
    features: &Tensor,
    boxes_xyxy: &Tensor,
    output_size: usize,
    spatial_scale: f32,
    sampling_ratio: i32,
) -> Result<Tensor> {
    let (b, c, h, w) = features.dims4()?;
    let n = boxes_xyxy.dim(1)?;
    let tokens = features.flatten_from(2)?.transpose(1, 2)?;
    let out = roi_align_tokens(&tokens, h, w, boxes_xyxy, output_size, spatial_scale, sampling_ratio)?;
    out.transpose(2, 3)?.contiguous()?.reshape((b * n, c, output_size, output_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sam3::text::fixtures::{assert_close, assert_covers, Fixture};
    use candle_core::Var;
    use candle_nn::VarMap;

    /// 3×4 map with value 4y + x (bilinear interpolation is exact on it).
    fn ramp() -> Result<Tensor> {
        Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 1, 3, 4))
    }

    fn pool(bx: [f32; 4], r: usize) -> Result<Vec<f32>> {
        let boxes = Tensor::new(&[[bx]], &Device::Cpu)?;
        roi_align(&ramp()?, &boxes, r, 1.0, -1)?.flatten_all()?.to_vec1::<f32>()
    }

    fn near(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn roi_align_matches_hand_computed_values() -> Result<()> {
        // Inside: roi 2×1, bins 1×0.5, one sample per bin at y ∈ {0.75, 1.25}, x ∈ {1, 2}.
        near(&pool([0.5, 0.5, 2.5, 1.5], 2)?, &[4.0, 5.0, 6.0, 7.0]);
        // Partly outside (top-left): roi 3×3, 2×2 samples per bin; x = −1.125 is outside
        // [−1, W] (contributes 0 but counts), y = −0.625 and x = −0.375 clamp to 0.
        // bin(0,0) = (0 + 0 + 0 + 0.5)/4, bin(0,1) = (0.375 + 1.125 + 0.875 + 1.625)/4,
        // bin(1,0) = (3.5 + 6.5)/4, bin(1,1) = (3.875 + 4.625 + 6.875 + 7.625)/4.
        near(&pool([-1.5, -1.0, 1.5, 2.0], 2)?, &[0.125, 1.0, 2.5, 5.75]);
        // Partly outside (bottom-right): 3×2 samples; y = 3.583 > H is dropped, y = 2.75 and
        // x ∈ {3, 4} clamp to the last row/column: (2·(4·1.91667 + 3) + 2·11 + 2·0)/6.
        near(&pool([2.5, 1.5, 4.5, 4.0], 1)?, &[(2.0 * (4.0 * (1.5 + 1.25 / 3.0) + 3.0) + 22.0) / 6.0]);
        // Tiny box: roi forced to 1×1, one sample at (0.7, 1.7).
        near(&pool([1.2, 0.2, 1.4, 0.4], 1)?, &[4.5]);
        // (These four equal torchvision.ops.roi_align on the same map.)
        Ok(())
    }

    #[test]
    fn roi_align_gradient_reaches_the_map_inside_the_box_only() -> Result<()> {
        let map = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 12, 2), &Device::Cpu)?)?; // 3×4, C=2
        let boxes = Tensor::new(&[[[0.0f32, 0.0, 1.0, 1.0]]], &Device::Cpu)?;
        let out = roi_align_tokens(map.as_tensor(), 3, 4, &boxes, 2, 1.0, -1)?;
        assert_eq!(out.dims(), &[1, 1, 4, 2]);
        let g =
            out.sum_all()?.backward()?.get(map.as_tensor()).expect("gradient").sum(2)?.to_vec2::<f32>()?;
        // Samples at 0.25 / 0.75 in both axes touch pixels (0..=1, 0..=1) only; weights sum to 4.
        let touched: f32 = [0, 1, 4, 5].iter().map(|&i| g[0][i]).sum();
        assert!((touched - 2.0 * 4.0).abs() < 1e-5, "{g:?}");
        assert!(g[0].iter().enumerate().all(|(i, v)| [0, 1, 4, 5].contains(&i) || *v == 0.0), "{g:?}");
        Ok(())
    }

    #[test]
    fn concat_padded_sequences_packs_after_valid_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let seq1 = Tensor::new(&[[[1f32], [2.0], [3.0]], [[4.0], [5.0], [6.0]]], &dev)?;
        let mask1 = Tensor::new(&[[1u8, 1, 1], [1, 0, 0]], &dev)?;
        let seq2 = Tensor::new(&[[[9f32]], [[8.0]]], &dev)?;
        let mask2 = Tensor::ones((2, 1), DType::U8, &dev)?;
        let (out, mask) = concat_padded_sequences(&seq1, &mask1, &seq2, &mask2)?;
        assert_eq!(
            out.squeeze(2)?.to_vec2::<f32>()?,
            vec![vec![1.0, 2.0, 3.0, 9.0], vec![4.0, 8.0, 6.0, 0.0]]
        );
        assert_eq!(mask.to_vec2::<u8>()?, vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]);
        Ok(())
    }

    fn parity(name: &str) -> Result<()> {
        let fx = Fixture::load(name);
        let enc = GeometryEncoder::load(fx.vb().pp("geometry_encoder"), &fx.cfg.geometry_encoder_config)?;
        let feats = fx.output("geometry.in.img_feats.2");
        let pos = fx.output("geometry.in.img_pos_embeds.2");
        let out = enc.forward(
            &fx.output("geometry.in.box_embeddings"),
            &fx.output("geometry.in.box_mask"),
            &fx.output("geometry.in.box_labels"),
            &feats,
            Some(&pos),
        )?;
        let diff = assert_close(
            &format!("{name} geometry.features"),
            &out.last_hidden_state,
            &fx.output("geometry.features"),
        )?;
        let want_mask = fx.output("geometry.mask").to_dtype(DType::U8)?.to_vec2::<u8>()?;
        assert_eq!(out.attention_mask.to_vec2::<u8>()?, want_mask);
        // The same through the Sam3Model-level entry point with the raw processor inputs.
        let via = enc
            .encode_prompt(
                Some(&fx.input("input_boxes")),
                Some(&fx.input("input_boxes_labels")),
                &feats,
                Some(&pos),
                NoBoxPolicy::ClsToken,
            )?
            .expect("boxes given");
        assert_close(
            &format!("{name} geometry via encode_prompt"),
            &via.last_hidden_state,
            &out.last_hidden_state,
        )?;
        assert!(diff.is_finite());
        Ok(())
    }

    #[test]
    fn geometry_parity_tiny_a() -> Result<()> {
        parity("tiny_a")
    }

    #[test]
    fn geometry_parity_tiny_b() -> Result<()> {
        parity("tiny_b")
    }

    #[test]
    fn text_only_prompt_policies() -> Result<()> {
        let fx = Fixture::load("tiny_a");
        let enc = GeometryEncoder::load(fx.vb().pp("geometry_encoder"), &fx.cfg.geometry_encoder_config)?;
        let feats = fx.output("geometry.in.img_feats.2");
        let pos = fx.output("geometry.in.img_pos_embeds.2");
        assert!(enc.encode_prompt(None, None, &feats, Some(&pos), NoBoxPolicy::Skip)?.is_none());
        let cls = enc.encode_prompt(None, None, &feats, Some(&pos), NoBoxPolicy::ClsToken)?.expect("CLS");
        assert_eq!(cls.last_hidden_state.dims(), &[2, 1, enc.hidden_size]);
        assert_eq!(cls.attention_mask.to_vec2::<u8>()?, vec![vec![1], vec![1]]);
        // Zero boxes through forward() give the same single token.
        let none = enc.forward(
            &Tensor::zeros((2, 0, 4), DType::F32, &Device::Cpu)?,
            &Tensor::zeros((2, 0), DType::U8, &Device::Cpu)?,
            &Tensor::zeros((2, 0), DType::U32, &Device::Cpu)?,
            &feats,
            Some(&pos),
        )?;
        assert_close("forward with N = 0", &none.last_hidden_state, &cls.last_hidden_state)?;
        // HF semantics imply the same value: with only padding boxes, the CLS lands in slot 0,
        // self-attends only to itself and so equals the CLS-only token.
        let boxes = fx.input("input_boxes");
        let padded = enc.encode_prompt(
            Some(&boxes),
            Some(&Tensor::full(PAD_LABEL, (2, boxes.dim(1)?), &Device::Cpu)?),
            &feats,
            Some(&pos),
            NoBoxPolicy::ClsToken,
        )?;
        let padded = padded.expect("boxes given");
        assert_eq!(padded.attention_mask.sum_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?, 2);
        assert_close(
            "CLS behind padding-only boxes",
            &padded.last_hidden_state.narrow(1, 0, 1)?,
            &cls.last_hidden_state,
        )?;
        Ok(())
    }

    /// In training the layers apply transformers' residual dropout (p from the config): the
    /// output changes, the same seed draws the same masks, and outside training nothing changes.
    #[test]
    fn residual_dropout_only_in_training() -> Result<()> {
        let fx = Fixture::load("tiny_a");
        let enc = GeometryEncoder::load(fx.vb().pp("geometry_encoder"), &fx.cfg.geometry_encoder_config)?;
        assert!(enc.dropout > 0.0);
        let boxes = fx.input("input_boxes");
        let feats = fx.output("geometry.in.img_feats.2");
        let pos = fx.output("geometry.in.img_pos_embeds.2");
        let run = |train: bool| -> Result<Vec<f32>> {
            crate::rng::reseed(&[4]);
            let o = enc.encode_prompt_with(
                Some(&boxes),
                None,
                &feats,
                Some(&pos),
                NoBoxPolicy::ClsToken,
                None,
                train,
            )?;
            o.expect("boxes").last_hidden_state.flatten_all()?.to_vec1::<f32>()
        };
        let eval = enc.encode_prompt(Some(&boxes), None, &feats, Some(&pos), NoBoxPolicy::ClsToken)?;
        let eval = eval.expect("boxes").last_hidden_state.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(run(false)?, eval);
        let (a, b) = (run(true)?, run(true)?);
        assert_eq!(a, b, "the same seed, the same masks");
        assert_ne!(a, eval, "dropout acts in training");
        Ok(())
    }

    /// The host copies read ahead give bit for bit what reading them in place gives (f32 and
    /// bf16 features, one padding box), and copies that do not fit the call are not used.
    #[test]
    fn prefetched_boxes_match_the_boxes_read_in_place() -> Result<()> {
        let fx = Fixture::load("tiny_a");
        let enc = GeometryEncoder::load(fx.vb().pp("geometry_encoder"), &fx.cfg.geometry_encoder_config)?;
        let boxes = fx.input("input_boxes");
        let (b, n) = (boxes.dim(0)?, boxes.dim(1)?);
        assert!(n >= 2, "the case needs a padding box beside a valid one");
        let mut labels = vec![1i64; b * n];
        labels[n - 1] = PAD_LABEL; // the first row's last box is padding
        let labels = Tensor::from_vec(labels, (b, n), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let feats = fx.output("geometry.in.img_feats.2").to_dtype(dtype)?;
            let pos = fx.output("geometry.in.img_pos_embeds.2").to_dtype(dtype)?;
            let host = GeometryEncoder::prefetch(Some(&boxes), Some(&labels), dtype)?.expect("boxes");
            assert_eq!(host.valid[0] as usize, n - 1);
            let run = |h: Option<&HostBoxes>| {
                enc.encode_prompt_with(
                    Some(&boxes),
                    Some(&labels),
                    &feats,
                    Some(&pos),
                    NoBoxPolicy::ClsToken,
                    h,
                    false,
                )
            };
            let (want, got) = (run(None)?.expect("boxes"), run(Some(&host))?.expect("boxes"));
            let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(&got.last_hidden_state)?, flat(&want.last_hidden_state)?, "{dtype:?}");
            assert_eq!(got.attention_mask.to_vec2::<u8>()?, want.attention_mask.to_vec2::<u8>()?);
            // Copies for another dtype are not used: the same result again.
            let other = if dtype == DType::F32 { DType::BF16 } else { DType::F32 };
            let stale = GeometryEncoder::prefetch(Some(&boxes), Some(&labels), other)?.expect("boxes");
            let again = run(Some(&stale))?.expect("boxes");
            assert_eq!(flat(&again.last_hidden_state)?, flat(&want.last_hidden_state)?);
        }
        assert!(GeometryEncoder::prefetch(None, None, DType::F32)?.is_none());
        Ok(())
    }

    #[test]
    fn geometry_gradients_reach_layers_and_vision_map() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = StackConfig {
            hidden_size: 8,
            num_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            dropout: 0.1,
            hidden_act: "relu".into(),
            roi_size: 3,
            num_queries: None,
        };
        let varmap = VarMap::new();
        GeometryEncoder::load(candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
        for var in varmap.all_vars() {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &dev)?)?;
        }
        let enc = GeometryEncoder::load(candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
        let boxes = Tensor::new(&[[[0.4f32, 0.5, 0.3, 0.4], [0.9, 0.2, 0.5, 0.5]]], &dev)?;
        let labels = Tensor::new(&[[1u32, 0]], &dev)?;
        let mask = Tensor::new(&[[1u8, 1]], &dev)?;
        let pos = Tensor::randn(0f32, 1.0, (1, 8, 5, 5), &dev)?;
        let grad_of = |use_boxes: bool| -> Result<(candle_core::backprop::GradStore, Var)> {
            let map = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 8, 5, 5), &dev)?)?;
            let out = if use_boxes {
                enc.forward(&boxes, &mask, &labels, map.as_tensor(), Some(&pos))?
            } else {
                enc.cls_only(map.as_tensor(), Some(&pos))?
            };
            let proj = Tensor::randn(0f32, 1.0, out.last_hidden_state.dims(), &dev)?;
            Ok(((out.last_hidden_state * proj)?.sum_all()?.backward()?, map))
        };
        let norm = |g: Option<&Tensor>| -> f32 {
            g.map_or(0.0, |g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let (grads, map) = grad_of(true)?;
        let data = varmap.data().lock().unwrap();
        for name in [
            "layers.1.self_attn.q_proj.weight",
            "layers.1.cross_attn.k_proj.weight",
            "layers.1.cross_attn.v_proj.weight",
            "layers.1.mlp.fc1.weight",
            "layers.0.layer_norm2.weight",
            "boxes_pool_project.weight",
            "boxes_direct_project.weight",
            "boxes_pos_enc_project.weight",
            "label_embed.weight",
            "cls_embed.weight",
            "vision_layer_norm.weight",
            "output_layer_norm.bias",
        ] {
            let v = data.get(name).unwrap_or_else(|| panic!("no var {name}"));
            assert!(norm(grads.get(v.as_tensor())) > 0.0, "{name} has no gradient");
        }
        assert!(norm(grads.get(map.as_tensor())) > 0.0, "vision map has no gradient");
        // Cross-attention alone (CLS-only: no RoIAlign) also reaches the map.
        let (grads, map) = grad_of(false)?;
        assert!(norm(grads.get(map.as_tensor())) > 0.0, "vision map has no gradient via cross-attention");
        Ok(())
    }

    #[test]
    fn loads_every_geometry_tensor_of_the_checkpoint() -> Result<()> {
        for name in ["tiny_a", "tiny_b"] {
            let cfg = Fixture::load(name).cfg;
            assert_covers(name, &["geometry_encoder."], |vb| {
                GeometryEncoder::load(vb.pp("geometry_encoder"), &cfg.geometry_encoder_config).map(|_| ())
            })?;
        }
        Ok(())
    }
}
