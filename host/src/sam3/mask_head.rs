//! The mask head (transformers' `Sam3MaskDecoder`, Meta's `UniversalSegmentationHead` +
//! `PixelDecoder`): the encoder memory cross-attends to the prompt (pre-norm, residual), replaces
//! the coarsest FPN map, an FPN pixel decoder (nearest upsampling + skip + conv3×3 + GroupNorm(8) +
//! ReLU per step) produces pixel embeddings, and per-query masks are the dot product of
//! `mask_embedder(queries)` with the 1×1-projected pixel embeddings; a 1×1 conv gives the
//! one-channel semantic map.
//!
//! Weights under the VarBuilder given to [`MaskDecoder::load`] (`mask_decoder` in a `Sam3Model`
//! checkpoint): `prompt_cross_attn.{q,k,v,o}_proj`, `prompt_cross_attn_norm`,
//! `pixel_decoder.conv_layers.{s}`, `pixel_decoder.norms.{s}` (s < num_upsampling_stages; with
//! fewer FPN levels than stages + 1 the last ones are loaded but unused, as in transformers),
//! `mask_embedder.layers.{0,1,2}`, `instance_projection`, `semantic_projection` (1×1 convs).
//!
//! Everything is differentiable in candle 0.11: the upsampling is broadcast + reshape for integer
//! factors and an index gather otherwise, the 1×1 convs are matmuls (held as [`Linear`]), the
//! GroupNorm is composed.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::MaskDecoderConfig;
use super::neck::Conv3x3;
use super::nn::{key_padding_bias, DecoderMlp, LayerNorm, Linear, MultiHeadAttention};

/// PyTorch's default eps for `nn.LayerNorm` and `nn.GroupNorm` (transformers passes none).
const NORM_EPS: f64 = 1e-5;

/// GroupNorm groups in the pixel decoder.
const GROUPS: usize = 8;

/// PyTorch's `F.interpolate(x, size=(h, w), mode="nearest")` on (B, C, H, W), differentiable.
///
/// Source index = min(⌊dst · (in/out)⌋, in − 1) computed in f32, as PyTorch. Integer upsampling
/// factors (each axis may differ) use broadcast + reshape (backward is a plain sum); any other size
/// gathers rows/columns with `index_select` (backward `index_add`).
pub fn upsample_nearest(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (height, width) {
        return Ok(x.clone());
    }
    if height.is_multiple_of(h) && width.is_multiple_of(w) {
        let (fh, fw) = (height / h, width / w);
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, fh, w, fw))?
            .reshape((b, c, height, width));
    }
    let index = |inp: usize, out: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let idx: Vec<u32> =
            (0..out).map(|i| ((i as f32 * scale).floor() as usize).min(inp - 1) as u32).collect();
        Tensor::from_vec(idx, out, x.device())
    };
    let y = if height == h { x.clone() } else { x.index_select(&index(h, height)?, 2)? };
    if width == w {
        Ok(y)
    } else {
        y.index_select(&index(w, width)?, 3)
    }
}

/// GroupNorm over (B, C, ...) with per-channel affine, composed (differentiable), in f32.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// Scale (C).
    pub weight: Tensor,
    /// Shift (C).
    pub bias: Tensor,
    /// Groups.
    pub num_groups: usize,
    /// Epsilon.
    pub eps: f64,
}

impl GroupNorm {
    /// Load `weight` and `bias` of width `channels`.
    pub fn load(vb: VarBuilder, channels: usize, num_groups: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(num_groups) {
            candle_core::bail!("GroupNorm: {num_groups} groups do not divide {channels} channels");
        }
        Ok(GroupNorm {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            num_groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // On a training graph: one op that keeps only its input for backward.
        if let Some(y) =
            super::ops::group_norm_frozen(x, &self.weight, &self.bias, self.num_groups, self.eps)?
        {
            return Ok(y);
        }
        super::ops::group_norm_composed(x, &self.weight, &self.bias, self.num_groups, self.eps)
    }
}

/// Load a 1×1 conv (`weight` (out, in, 1, 1), `bias` (out)) as a [`Linear`] over channels.
fn conv1x1_as_linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim, 1, 1), "weight")?.reshape((out_dim, in_dim))?;
    Ok(Linear::from_conv(&vb, weight, Some(vb.get(out_dim, "bias")?)))
}

/// The FPN pixel decoder (transformers' `Sam3PixelDecoder`).
#[derive(Debug, Clone)]
pub struct PixelDecoder {
    /// 3×3 convs, one per upsampling step (all `num_upsampling_stages` are loaded).
    pub conv_layers: Vec<Conv3x3>,
    /// GroupNorm(8) after each conv.
    pub norms: Vec<GroupNorm>,
}

impl PixelDecoder {
    /// Load `conv_layers.{s}` and `norms.{s}` for s < `num_upsampling_stages`.
    pub fn load(vb: VarBuilder, cfg: &MaskDecoderConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let conv_layers = (0..cfg.num_upsampling_stages)
            .map(|s| Conv3x3::load(vb.pp(format!("conv_layers.{s}")), d, d))
            .collect::<Result<Vec<_>>>()?;
        let norms = (0..cfg.num_upsampling_stages)
            .map(|s| GroupNorm::load(vb.pp(format!("norms.{s}")), d, GROUPS, NORM_EPS))
            .collect::<Result<Vec<_>>>()?;
        Ok(PixelDecoder { conv_layers, norms })
    }

    /// `backbone_features`: (B, C, Hᵢ, Wᵢ) from fine to coarse. Starting from the coarsest, each step
    /// upsamples (nearest) to the next finer map, adds it, and applies conv → GroupNorm → ReLU.
    /// Returns (B, C, H₀, W₀).
    pub fn forward(&self, backbone_features: &[Tensor]) -> Result<Tensor> {
        let Some((coarsest, rest)) = backbone_features.split_last() else {
            candle_core::bail!("pixel decoder: no feature maps");
        };
        if rest.len() > self.conv_layers.len() {
            candle_core::bail!(
                "pixel decoder: {} maps need {} stages, have {}",
                rest.len() + 1,
                rest.len(),
                self.conv_layers.len()
            );
        }
        let mut prev = coarsest.clone();
        for (i, feat) in rest.iter().rev().enumerate() {
            let (_, _, h, w) = feat.dims4()?;
            prev = (upsample_nearest(&prev, h, w)? + feat)?;
            prev = self.norms[i].forward(&self.conv_layers[i].forward_nchw(&prev)?)?.relu()?;
        }
        Ok(prev)
    }
}

/// Query → mask-embedding MLP C → C → C → C with ReLU (transformers' `Sam3MaskEmbedder`):
/// a [`DecoderMlp`] whose layers are named `layers.{0,1,2}`.
pub type MaskEmbedder = DecoderMlp;

/// Load the mask embedder (`layers.{0,1,2}`, each hidden → hidden).
pub fn load_mask_embedder(vb: VarBuilder, hidden: usize) -> Result<MaskEmbedder> {
    DecoderMlp::load_named(vb, &[hidden; 4], |i| format!("layers.{i}"))
}

/// What [`MaskDecoder::forward`] returns (transformers' `Sam3MaskDecoderOutput`).
#[derive(Debug, Clone)]
pub struct MaskDecoderOutput {
    /// Mask logits (B, Q, H₀, W₀) at the finest FPN resolution.
    pub pred_masks: Tensor,
    /// Semantic logits (B, 1, H₀, W₀).
    pub semantic_seg: Tensor,
}

/// The mask head.
#[derive(Debug, Clone)]
pub struct MaskDecoder {
    /// FPN pixel decoder.
    pub pixel_decoder: PixelDecoder,
    /// Query MLP.
    pub mask_embedder: MaskEmbedder,
    /// 1×1 conv C → C on the pixel embeddings, as a channel Linear.
    pub instance_projection: Linear,
    /// 1×1 conv C → 1 on the pixel embeddings, as a channel Linear.
    pub semantic_projection: Linear,
    /// Memory → prompt cross-attention.
    pub prompt_cross_attn: MultiHeadAttention,
    /// Pre-norm of that cross-attention.
    pub prompt_cross_attn_norm: LayerNorm,
}

impl MaskDecoder {
    /// Load; `cfg` is `mask_decoder_config`.
    pub fn load(vb: VarBuilder, cfg: &MaskDecoderConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(MaskDecoder {
            pixel_decoder: PixelDecoder::load(vb.pp("pixel_decoder"), cfg)?,
            mask_embedder: load_mask_embedder(vb.pp("mask_embedder"), d)?,
            instance_projection: conv1x1_as_linear(vb.pp("instance_projection"), d, d)?,
            semantic_projection: conv1x1_as_linear(vb.pp("semantic_projection"), d, 1)?,
            prompt_cross_attn: MultiHeadAttention::load(
                vb.pp("prompt_cross_attn"),
                d,
                cfg.num_attention_heads,
                "o_proj",
            )?,
            prompt_cross_attn_norm: LayerNorm::load(vb.pp("prompt_cross_attn_norm"), d, NORM_EPS)?,
        })
    }

    /// Masks for the decoder queries.
    ///
    /// * `decoder_queries`: last-layer normed queries (B, Q, C).
    /// * `backbone_features`: FPN maps (B, C, Hᵢ, Wᵢ) from fine to coarse (SAM3: 4×, 2×, 1× of the ViT
    ///   grid); the coarsest is replaced by the encoder memory.
    /// * `encoder_hidden_states`: encoder memory (B, ≥H·W, C); its first H·W tokens (H×W = the
    ///   coarsest map) are used.
    /// * `prompt_features` (B, T, C) and `prompt_mask` (B, T) (nonzero = valid): if given, the memory
    ///   first cross-attends to the prompt.
    pub fn forward(
        &self,
        decoder_queries: &Tensor,
        backbone_features: &[Tensor],
        encoder_hidden_states: &Tensor,
        prompt_features: Option<&Tensor>,
        prompt_mask: Option<&Tensor>,
    ) -> Result<MaskDecoderOutput> {
        let mut memory = encoder_hidden_states.clone();
        if let Some(prompt) = prompt_features {
            let normed = self.prompt_cross_attn_norm.forward(&memory)?;
            let bias = prompt_mask.map(key_padding_bias).transpose()?;
            let a = self.prompt_cross_attn.forward(&normed, prompt, prompt, bias.as_ref())?;
            memory = (memory + a)?;
        }
        let pixel = self.embed_pixels(backbone_features, &memory)?; // (B, C, H, W)
        let (b, c, h, w) = pixel.dims4()?;
        let pixel_tokens = pixel.reshape((b, c, h * w))?.transpose(1, 2)?; // (B, HW, C)
        let instance = self.instance_projection.forward(&pixel_tokens)?; // (B, HW, C)
        let mask_embed = self.mask_embedder.forward(decoder_queries)?; // (B, Q, C)
        let q = mask_embed.dim(1)?;
        let pred_masks =
            mask_embed.contiguous()?.matmul(&instance.transpose(1, 2)?)?.reshape((b, q, h, w))?;
        let semantic_seg = self.semantic_projection.forward(&pixel_tokens)?.reshape((b, 1, h, w))?;
        Ok(MaskDecoderOutput { pred_masks, semantic_seg })
    }

    /// transformers' `_embed_pixels`: the memory (first H·W tokens) reshaped to the coarsest map's
    /// size replaces that map, then the pixel decoder runs. Returns (B, C, H₀, W₀).
    pub fn embed_pixels(
        &self,
        backbone_features: &[Tensor],
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let Some(last) = backbone_features.last() else {
            candle_core::bail!("mask decoder: no backbone features");
        };
        let (b, c, h, w) = last.dims4()?;
        let memory = encoder_hidden_states.narrow(1, 0, h * w)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        let mut feats = backbone_features.to_vec();
        *feats.last_mut().expect("non-empty") = memory;
        self.pixel_decoder.forward(&feats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sam3::decoder::{DecoderOptions, DetrDecoder};
    use crate::sam3::encoder::test_support::*;
    use crate::sam3::encoder::DetrEncoder;
    use crate::sam3::scoring::DotProductScoring;
    use candle_core::{DType, D};
    use candle_core::{Device, Var};
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::VarMap;
    use std::collections::{BTreeSet, HashMap};
    use std::sync::{Arc, Mutex};

    fn parity(name: &str) -> Result<()> {
        let Some(fx) = Fixture::open(name) else { return Ok(()) };
        let md = MaskDecoder::load(fx.vb().pp("mask_decoder"), &fx.config.mask_decoder_config)?;
        let feats: Vec<Tensor> = (0..3).map(|i| fx.get(&format!("mask.in.backbone_features.{i}"))).collect();
        let out = md.forward(
            &fx.get("mask.in.decoder_queries"),
            &feats,
            &fx.get("mask.in.encoder_hidden_states"),
            Some(&fx.get("mask.in.prompt_features")),
            Some(&fx.get("mask.in.prompt_mask")),
        )?;
        let p = |s: &str| format!("{name} {s}");
        assert_close(&p("mask.pred_masks"), &out.pred_masks, &fx.get("mask.pred_masks"));
        assert_close(&p("mask.semantic_seg"), &out.semantic_seg, &fx.get("mask.semantic_seg"));
        Ok(())
    }

    #[test]
    fn parity_with_transformers_tiny_a() -> Result<()> {
        parity("tiny_a")
    }

    #[test]
    fn parity_with_transformers_tiny_b() -> Result<()> {
        parity("tiny_b")
    }

    /// The four modules chained as `Sam3Model.forward` wires them, from the recorded encoder
    /// inputs to the model's final outputs (with box prompts, and HF's text-only path).
    fn chained(name: &str) -> Result<()> {
        let Some(fx) = Fixture::open(name) else { return Ok(()) };
        let (vb, c) = (fx.vb(), &fx.config);
        let enc = DetrEncoder::load(vb.pp("detr_encoder"), &c.detr_encoder_config)?;
        let dec = DetrDecoder::load(vb.pp("detr_decoder"), &c.detr_decoder_config)?;
        let sc = DotProductScoring::load(vb.pp("dot_product_scoring"), &c.detr_decoder_config)?;
        let md = MaskDecoder::load(vb.pp("mask_decoder"), &c.mask_decoder_config)?;
        let fpn: Vec<Tensor> = (0..3).map(|i| fx.get(&format!("vision.fpn.{i}"))).collect();
        let pos = fx.get("vision.fpn_pos.2");
        let run = |prompt: &Tensor, mask: &Tensor, masks: bool| -> Result<Vec<Tensor>> {
            let e = enc.forward(&fpn[2..], prompt, std::slice::from_ref(&pos), Some(mask), false)?;
            let d = dec.forward(
                &e.last_hidden_state,
                &e.text_features,
                &e.pos_embeds_flattened,
                Some(mask),
                &e.spatial_shapes,
                DecoderOptions::default(),
            )?;
            let last = |t: &Tensor| t.get(t.dim(0).unwrap() - 1).unwrap();
            let logits =
                last(&sc.forward(&d.intermediate_hidden_states, &e.text_features, Some(mask), false)?);
            let boxes = last(&crate::sam3::nn::box_cxcywh_to_xyxy(&dec.pred_boxes(&d)?)?);
            let mut out = vec![logits.squeeze(D::Minus1)?, boxes, last(&d.presence_logits)];
            if masks {
                let m = md.forward(
                    &last(&d.intermediate_hidden_states),
                    &fpn,
                    &e.last_hidden_state,
                    Some(prompt),
                    Some(mask),
                )?;
                out.extend([m.pred_masks, m.semantic_seg]);
            }
            Ok(out)
        };
        let got = run(&fx.get("encoder.in.text_features"), &fx.get("encoder.in.text_mask"), true)?;
        for (g, key) in
            got.iter().zip(["pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg"])
        {
            assert_close(&format!("{name} chained {key}"), g, &fx.get(key));
        }
        let got = run(&fx.get("text.features"), &fx.get("attention_mask"), false)?;
        for (g, key) in
            got.iter().zip(["textonly.pred_logits", "textonly.pred_boxes", "textonly.presence_logits"])
        {
            assert_close(&format!("{name} chained {key}"), g, &fx.get(key));
        }
        Ok(())
    }

    #[test]
    fn chained_components_match_model_outputs_tiny_a() -> Result<()> {
        chained("tiny_a")
    }

    #[test]
    fn chained_components_match_model_outputs_tiny_b() -> Result<()> {
        chained("tiny_b")
    }

    /// The chain runs with half-precision weights and activations (norms, softmax and boxes in f32
    /// inside) and stays close to the f32 reference. f16 stands in for bf16 here: candle's CPU
    /// matmul has no bf16 kernel; the dtype plumbing is the same.
    #[test]
    fn chained_components_run_in_half_precision() -> Result<()> {
        let Some(fx) = Fixture::open("tiny_a") else { return Ok(()) };
        let vb = fx.checkpoint.var_builder(DType::F16, &Device::Cpu);
        let c = &fx.config;
        let enc = DetrEncoder::load(vb.pp("detr_encoder"), &c.detr_encoder_config)?;
        let dec = DetrDecoder::load(vb.pp("detr_decoder"), &c.detr_decoder_config)?;
        let sc = DotProductScoring::load(vb.pp("dot_product_scoring"), &c.detr_decoder_config)?;
        let md = MaskDecoder::load(vb.pp("mask_decoder"), &c.mask_decoder_config)?;
        let half = |k: &str| fx.get(k).to_dtype(DType::F16).unwrap();
        let fpn: Vec<Tensor> = (0..3).map(|i| half(&format!("vision.fpn.{i}"))).collect();
        let (prompt, mask) = (half("encoder.in.text_features"), fx.get("encoder.in.text_mask"));
        let e = enc.forward(&fpn[2..], &prompt, &[half("vision.fpn_pos.2")], Some(&mask), false)?;
        let d = dec.forward(
            &e.last_hidden_state,
            &prompt,
            &e.pos_embeds_flattened,
            Some(&mask),
            &e.spatial_shapes,
            DecoderOptions { dac: true, train: false },
        )?;
        assert_eq!(d.intermediate_hidden_states.dtype(), DType::F16);
        let logits = sc.forward(&d.intermediate_hidden_states, &prompt, Some(&mask), false)?;
        let boxes = dec.pred_boxes(&d)?;
        let last = d.intermediate_hidden_states.get(1)?.narrow(1, 0, 8)?;
        let m = md.forward(&last, &fpn, &e.last_hidden_state, Some(&prompt), Some(&mask))?;
        let close = |what: &str, got: &Tensor, want: &Tensor, tol: f32| {
            let got = got.to_dtype(DType::F32).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            eprintln!("f16 {what}: max|diff| = {diff:.3e}");
            assert!(diff < tol, "{what}: {diff}");
        };
        close(
            "pred_logits",
            &logits.get(1)?.narrow(1, 0, 8)?.squeeze(D::Minus1)?,
            &fx.get("pred_logits"),
            0.3,
        );
        let xyxy = crate::sam3::nn::box_cxcywh_to_xyxy(&boxes.get(1)?.narrow(1, 0, 8)?)?;
        close("pred_boxes", &xyxy, &fx.get("pred_boxes"), 0.01);
        close("pred_masks", &m.pred_masks, &fx.get("pred_masks"), 0.1);
        Ok(())
    }

    fn arange_map(h: usize, w: usize) -> Result<Tensor> {
        Tensor::arange(0f32, (h * w) as f32, &Device::Cpu)?.reshape((1, 1, h, w))
    }

    #[test]
    fn nearest_upsampling_matches_pytorch() -> Result<()> {
        // Expected values from torch 2.15 `F.interpolate(arange, size, mode="nearest")`.
        type Case = ((usize, usize), (usize, usize), Vec<u32>);
        let cases: [Case; 2] = [
            (
                (3, 4),
                (7, 6),
                vec![
                    0, 0, 1, 2, 2, 3, 0, 0, 1, 2, 2, 3, 0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 4, 4, 5, 6, 6, 7,
                    8, 8, 9, 10, 10, 11, 8, 8, 9, 10, 10, 11,
                ],
            ),
            ((2, 3), (5, 5), vec![0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 3, 3, 4, 4, 5]),
        ];
        for ((h, w), (oh, ow), want) in cases {
            let got = upsample_nearest(&arange_map(h, w)?, oh, ow)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got.iter().map(|v| *v as u32).collect::<Vec<_>>(), want, "{h}x{w} -> {oh}x{ow}");
        }
        // Integer factors (different per axis) by broadcast equal the index formula.
        let got = upsample_nearest(&arange_map(2, 3)?, 4, 9)?.flatten_all()?.to_vec1::<f32>()?;
        let want: Vec<f32> = (0..4).flat_map(|i| (0..9).map(move |j| ((i / 2) * 3 + j / 3) as f32)).collect();
        assert_eq!(got, want);
        // Both paths are differentiable: each source pixel gets one gradient per copy.
        for (oh, ow) in [(4, 6), (5, 5)] {
            let x = Var::from_tensor(&arange_map(2, 3)?)?;
            let g = upsample_nearest(x.as_tensor(), oh, ow)?.sum_all()?.backward()?;
            let g = g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(g.iter().sum::<f32>(), (oh * ow) as f32);
            assert!(g.iter().all(|v| *v >= 1.0), "{g:?}");
        }
        Ok(())
    }

    fn random_mask_decoder() -> Result<(VarMap, MaskDecoder)> {
        let varmap = VarMap::new();
        let md = MaskDecoder::load(var_builder(&varmap).pp("mask_decoder"), &mask_cfg())?;
        randomize(&varmap)?;
        Ok((varmap, md))
    }

    #[test]
    fn gradients_reach_weights_and_inputs() -> Result<()> {
        let (vm, md) = random_mask_decoder()?;
        let queries = Var::from_tensor(&pseudo_random(&[2, 3, 16], 1))?;
        let memory = Var::from_tensor(&pseudo_random(&[2, 4, 16], 2))?;
        let feats = [
            pseudo_random(&[2, 16, 8, 8], 3),
            pseudo_random(&[2, 16, 4, 4], 4),
            pseudo_random(&[2, 16, 2, 2], 5),
        ];
        let prompt = pseudo_random(&[2, 5, 16], 6);
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu)?;
        let out = md.forward(queries.as_tensor(), &feats, memory.as_tensor(), Some(&prompt), Some(&mask))?;
        assert_eq!(out.pred_masks.dims(), &[2, 3, 8, 8]);
        assert_eq!(out.semantic_seg.dims(), &[2, 1, 8, 8]);
        let grads = (weighted_sum(&out.pred_masks, 7)? + weighted_sum(&out.semantic_seg, 8)?)?.backward()?;
        for name in [
            "prompt_cross_attn.q_proj.weight",
            "prompt_cross_attn.v_proj.weight",
            "prompt_cross_attn.o_proj.bias",
            "prompt_cross_attn_norm.weight",
            "pixel_decoder.conv_layers.0.weight",
            "pixel_decoder.conv_layers.0.bias",
            "pixel_decoder.conv_layers.1.weight",
            "pixel_decoder.norms.0.weight",
            "pixel_decoder.norms.1.bias",
            "mask_embedder.layers.0.weight",
            "mask_embedder.layers.2.bias",
            "instance_projection.weight",
            "instance_projection.bias",
            "semantic_projection.weight",
            "semantic_projection.bias",
        ] {
            assert_grad(&grads, &vm, &format!("mask_decoder.{name}"));
        }
        // The third stage is loaded (checkpoint coverage) but unused, as in transformers.
        for name in ["pixel_decoder.conv_layers.2.weight", "pixel_decoder.norms.2.weight"] {
            let v = var(&vm, &format!("mask_decoder.{name}"));
            assert!(grads.get(v.as_tensor()).is_none(), "{name} should be unused");
        }
        for v in [&queries, &memory] {
            let g = grads.get(v.as_tensor()).expect("input gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    /// encoder → decoder (DAC) → scoring + mask head: the encoder's input map gets a gradient from
    /// the detection outputs alone and from the masks alone.
    #[test]
    fn encoder_input_gets_gradient_through_decoder_and_mask_head() -> Result<()> {
        let varmap = VarMap::new();
        let vb = var_builder(&varmap);
        let enc = DetrEncoder::load(vb.pp("detr_encoder"), &stack(1, None))?;
        let dcfg = stack(2, Some(3));
        let dec = DetrDecoder::load(vb.pp("detr_decoder"), &dcfg)?;
        let sc = DotProductScoring::load(vb.pp("dot_product_scoring"), &dcfg)?;
        let md = MaskDecoder::load(vb.pp("mask_decoder"), &mask_cfg())?;
        randomize(&varmap)?;
        let image = Var::from_tensor(&pseudo_random(&[1, 16, 2, 2], 1))?;
        let pos = pseudo_random(&[1, 16, 2, 2], 2);
        let prompt = pseudo_random(&[1, 4, 16], 3);
        let mask = Tensor::new(&[[1u8, 1, 1, 0]], &Device::Cpu)?;
        let fpn =
            [pseudo_random(&[1, 16, 8, 8], 4), pseudo_random(&[1, 16, 4, 4], 5), image.as_tensor().clone()];

        let forward = || -> Result<(Tensor, Tensor)> {
            let e = enc.forward(
                std::slice::from_ref(image.as_tensor()),
                &prompt,
                std::slice::from_ref(&pos),
                Some(&mask),
                false,
            )?;
            let d = dec.forward(
                &e.last_hidden_state,
                &e.text_features,
                &e.pos_embeds_flattened,
                Some(&mask),
                &e.spatial_shapes,
                DecoderOptions { dac: true, train: false },
            )?;
            let logits = sc.forward(&d.intermediate_hidden_states, &prompt, Some(&mask), false)?;
            let det = (weighted_sum(&logits, 6)? + weighted_sum(&dec.pred_boxes(&d)?, 7)?)?;
            let last = d.intermediate_hidden_states.get(d.intermediate_hidden_states.dim(0)? - 1)?;
            let m = md.forward(&last, &fpn, &e.last_hidden_state, Some(&prompt), Some(&mask))?;
            let masks = (weighted_sum(&m.pred_masks, 8)? + weighted_sum(&m.semantic_seg, 9)?)?;
            Ok((det, masks))
        };
        let (det, _) = forward()?;
        let g = det.backward()?;
        assert!(
            g.get(image.as_tensor()).expect("through the decoder").abs()?.sum_all()?.to_scalar::<f32>()?
                > 0.0
        );
        assert_grad(&g, &varmap, "detr_encoder.layers.0.self_attn.q_proj.weight");
        let (_, masks) = forward()?;
        let g = masks.backward()?;
        assert!(
            g.get(image.as_tensor()).expect("through the mask head").abs()?.sum_all()?.to_scalar::<f32>()?
                > 0.0
        );
        assert_grad(&g, &varmap, "detr_encoder.layers.0.mlp.fc2.weight");
        Ok(())
    }

    /// Records every tensor name requested, over a fixture's model.safetensors.
    #[derive(Clone)]
    struct Recorder {
        tensors: Arc<HashMap<String, Tensor>>,
        used: Arc<Mutex<BTreeSet<String>>>,
    }

    impl SimpleBackend for Recorder {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            _: candle_nn::Init,
            dt: DType,
            _: &Device,
        ) -> Result<Tensor> {
            self.used.lock().unwrap().insert(name.to_string());
            let t =
                self.tensors.get(name).ok_or_else(|| candle_core::Error::Msg(format!("missing {name}")))?;
            assert_eq!(t.dims(), s.dims(), "{name}");
            t.to_dtype(dt)
        }
        fn get_unchecked(&self, name: &str, dt: DType, _: &Device) -> Result<Tensor> {
            self.used.lock().unwrap().insert(name.to_string());
            self.tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing {name}")))?
                .to_dtype(dt)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.tensors.contains_key(name)
        }
    }

    /// Every checkpoint tensor of the four modules is loaded (including the unused third
    /// pixel-decoder stage), with the expected shape.
    #[test]
    fn loads_every_checkpoint_tensor_of_these_modules() -> Result<()> {
        for name in ["tiny_a", "tiny_b"] {
            let Some(fx) = Fixture::open(name) else { continue };
            let tensors =
                candle_core::safetensors::load(fixture_dir(name).join("model.safetensors"), &Device::Cpu)?;
            let recorder =
                Recorder { tensors: Arc::new(tensors), used: Arc::new(Mutex::new(BTreeSet::new())) };
            let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
            let c = &fx.config;
            DetrEncoder::load(vb.pp("detr_encoder"), &c.detr_encoder_config)?;
            DetrDecoder::load(vb.pp("detr_decoder"), &c.detr_decoder_config)?;
            DotProductScoring::load(vb.pp("dot_product_scoring"), &c.detr_decoder_config)?;
            MaskDecoder::load(vb.pp("mask_decoder"), &c.mask_decoder_config)?;
            let used = recorder.used.lock().unwrap();
            let prefixes = ["detr_encoder.", "detr_decoder.", "dot_product_scoring.", "mask_decoder."];
            let mine: Vec<&String> =
                recorder.tensors.keys().filter(|k| prefixes.iter().any(|p| k.starts_with(p))).collect();
            let unused: Vec<&&String> = mine.iter().filter(|k| !used.contains(k.as_str())).collect();
            assert!(unused.is_empty(), "{name}: not loaded: {unused:?}");
            assert_eq!(used.len(), mine.len(), "{name}: requested tensors outside the checkpoint");
            eprintln!("{name}: {} tensors of the four modules, all loaded", mine.len());
        }
        Ok(())
    }
}
