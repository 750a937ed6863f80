//! The DETR decoder with presence token, box relative-position bias (boxRPB) and iterative box
//! refinement (transformers' `Sam3DetrDecoder`, Meta's `TransformerDecoder`), plus Meta's
//! training-only DAC one-to-many branch, which transformers does not have.
//!
//! Per layer (post-norm): `[presence; queries]` self-attend (q = k = x + query_pos, presence pos = 0),
//! cross-attend to the prompt, cross-attend to the image memory with the boxRPB additive bias
//! (zero row for the presence token), FFN. Query positions come from the current reference boxes
//! (`ref_point_head(sine([y, x, w, h]))`), and the boxes are refined in logit space with the shared
//! `box_head` on the output-normed queries; the next layer sees the refined boxes detached.
//!
//! Weights under the VarBuilder given to [`DetrDecoder::load`] (`detr_decoder` in a `Sam3Model`
//! checkpoint): `layers.{i}.{self_attn,text_cross_attn,vision_cross_attn}.{q,k,v,o}_proj`,
//! `layers.{i}.{self_attn,text_cross_attn,vision_cross_attn,mlp}_layer_norm`, `layers.{i}.mlp.fc{1,2}`,
//! `query_embed.weight`, `reference_points.weight`, `presence_token.weight`, `box_head`,
//! `presence_head`, `ref_point_head`, `box_rpb_embed_{x,y}`, `output_layer_norm`, `presence_layer_norm`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::StackConfig;
use super::nn::{
    box_cxcywh_to_xyxy, inverse_sigmoid, key_padding_bias, sigmoid, Activation, DecoderMlp, LayerNorm, Mlp,
    MultiHeadAttention,
};
use super::position::box_encoding;

/// PyTorch's default `nn.LayerNorm` eps: transformers builds every decoder LayerNorm without `eps=`
/// (the config's `layer_norm_eps` = 1e-6 is not used).
const LN_EPS: f64 = 1e-5;

/// Clamp of `inverse_sigmoid` in the box refinement (transformers and Meta).
const INV_SIGMOID_EPS: f64 = 1e-3;

/// transformers' `clamp_presence_logit_max_val`.
pub const PRESENCE_LOGIT_CLAMP: f64 = 10.0;

/// Residual dropout (`nn.Dropout`) active only in training.
fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        crate::rng::dropout(x, p)
    } else {
        Ok(x.clone())
    }
}

/// `residual + dropout(x)` (one op on CUDA, [`crate::rng::dropout_add`]).
fn dropout_add(x: &Tensor, residual: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        crate::rng::dropout_add(x, residual, p)
    } else {
        residual + x
    }
}

/// One post-norm decoder layer (transformers' `Sam3DetrDecoderLayer`).
#[derive(Debug, Clone)]
pub struct DetrDecoderLayer {
    /// Self-attention over `[presence; queries]`.
    pub self_attn: MultiHeadAttention,
    /// Norm after self-attention (Meta's `norm2`).
    pub self_attn_layer_norm: LayerNorm,
    /// Cross-attention to the prompt tokens.
    pub text_cross_attn: MultiHeadAttention,
    /// Norm after the prompt cross-attention (Meta's `catext_norm`).
    pub text_cross_attn_layer_norm: LayerNorm,
    /// Cross-attention to the image memory, with the boxRPB bias.
    pub vision_cross_attn: MultiHeadAttention,
    /// Norm after the image cross-attention (Meta's `norm1`).
    pub vision_cross_attn_layer_norm: LayerNorm,
    /// FFN.
    pub mlp: Mlp,
    /// Norm after the FFN (Meta's `norm3`).
    pub mlp_layer_norm: LayerNorm,
}

impl DetrDecoderLayer {
    /// Load one layer.
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let attn = |name: &str| MultiHeadAttention::load(vb.pp(name), d, heads, "o_proj");
        let ln = |name: &str| LayerNorm::load(vb.pp(name), d, LN_EPS);
        Ok(DetrDecoderLayer {
            self_attn: attn("self_attn")?,
            self_attn_layer_norm: ln("self_attn_layer_norm")?,
            text_cross_attn: attn("text_cross_attn")?,
            text_cross_attn_layer_norm: ln("text_cross_attn_layer_norm")?,
            vision_cross_attn: attn("vision_cross_attn")?,
            vision_cross_attn_layer_norm: ln("vision_cross_attn_layer_norm")?,
            mlp: Mlp::load(vb.pp("mlp"), d, cfg.intermediate_size, Activation::from_name(&cfg.hidden_act)?)?,
            mlp_layer_norm: ln("mlp_layer_norm")?,
        })
    }

    /// One layer.
    ///
    /// * `hidden_states`: (B, 1 + N, C), the presence token at index 0, then N queries.
    /// * `query_pos`: (B, N, C) (the presence token gets a zero position).
    /// * `text_features` (B, T, C) with `text_cross_attn_mask` additive (B, 1, 1, T) or None.
    /// * `vision_features`, `vision_pos_encoding`: (B, HW, C); `vision_cross_attn_mask` additive,
    ///   broadcastable to (B, heads, 1 + N, HW) (the boxRPB with its zero presence row), or None.
    /// * `num_o2m`: DAC — the last `num_o2m` queries skip self-attention (they neither attend nor are
    ///   attended to; the self-attention norm still applies to them); 0 = transformers' layer.
    /// * `dropout_p`, `train`: residual dropout, applied only when `train`.
    ///
    /// Returns (B, 1 + N, C).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        query_pos: &Tensor,
        text_features: &Tensor,
        vision_features: &Tensor,
        vision_pos_encoding: &Tensor,
        text_cross_attn_mask: Option<&Tensor>,
        vision_cross_attn_mask: Option<&Tensor>,
        num_o2m: usize,
        dropout_p: f64,
        train: bool,
    ) -> Result<Tensor> {
        let (b, n1, c) = hidden_states.dims3()?;
        if num_o2m >= n1 {
            candle_core::bail!("decoder layer: {num_o2m} one-to-many queries of {} tokens", n1);
        }
        let zero_row = Tensor::zeros((b, 1, c), query_pos.dtype(), query_pos.device())?;
        let query_pos = Tensor::cat(&[&zero_row, query_pos], 1)?;

        // Self-attention (over [presence; o2o queries] only when DAC is on).
        let n_sa = n1 - num_o2m;
        let (x_sa, pos_sa) = if num_o2m > 0 {
            (hidden_states.narrow(1, 0, n_sa)?, query_pos.narrow(1, 0, n_sa)?)
        } else {
            (hidden_states.clone(), query_pos.clone())
        };
        let qk = (&x_sa + &pos_sa)?;
        let mut a = dropout(&self.self_attn.forward(&qk, &qk, &x_sa, None)?, dropout_p, train)?;
        if num_o2m > 0 {
            let pad = Tensor::zeros((b, num_o2m, c), a.dtype(), a.device())?;
            a = Tensor::cat(&[&a, &pad], 1)?;
        }
        let h = self.self_attn_layer_norm.forward(&(hidden_states + a)?)?;

        // Prompt cross-attention.
        let q = (&h + &query_pos)?;
        let a = self.text_cross_attn.forward(&q, text_features, text_features, text_cross_attn_mask)?;
        let h = self.text_cross_attn_layer_norm.forward(&dropout_add(&a, &h, dropout_p, train)?)?;

        // Image cross-attention with boxRPB.
        let q = (&h + &query_pos)?;
        let k = super::ops::add_constant(vision_features, vision_pos_encoding)?;
        let a = self.vision_cross_attn.forward(&q, &k, vision_features, vision_cross_attn_mask)?;
        let h = self.vision_cross_attn_layer_norm.forward(&dropout_add(&a, &h, dropout_p, train)?)?;

        // FFN.
        let m = self.mlp.forward(&h)?;
        self.mlp_layer_norm.forward(&dropout_add(&m, &h, dropout_p, train)?)
    }
}

/// Per-call switches of [`DetrDecoder::forward`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderOptions {
    /// Meta's DAC one-to-many branch (training only; transformers has none): queries and reference
    /// boxes are duplicated to 2Q; the second ("o2m") half skips self-attention. Outputs then have
    /// 2Q queries: `[..Q]` the one-to-one half (numerically the same as `dac = false`), `[Q..]` the
    /// one-to-many half. Meta enables it only in training mode; the caller decides here.
    pub dac: bool,
    /// Training mode: residual dropout (`detr_decoder_config.dropout`) is applied.
    pub train: bool,
}

/// What [`DetrDecoder::forward`] returns (transformers' `Sam3DETRDecoderOutput`); L = layers,
/// N = Q (or 2Q with DAC).
#[derive(Debug, Clone)]
pub struct DetrDecoderOutput {
    /// Output-normed queries of every layer (L, B, N, C).
    pub intermediate_hidden_states: Tensor,
    /// The reference boxes each layer received as input, cxcywh in [0, 1] (L, B, N, 4). As in
    /// transformers (and Meta), these are the *undetached* values: layer 0's is
    /// `σ(reference_points)`, layer ℓ's is the refined box of layer ℓ−1, which carries gradient into
    /// that layer's box head (the layer itself computed with a detached copy).
    pub reference_boxes: Tensor,
    /// Presence logit of every layer (L, B, 1), clamped iff [`DetrDecoder::presence_logit_clamp`].
    pub presence_logits: Tensor,
    /// Queries of the one-to-many half (0 without DAC, else Q; they are the last ones).
    pub num_o2m: usize,
}

/// The DETR decoder (transformers' `Sam3DetrDecoder`).
#[derive(Debug, Clone)]
pub struct DetrDecoder {
    /// The layers.
    pub layers: Vec<DetrDecoderLayer>,
    /// Shared output norm (intermediate outputs and the box head input).
    pub output_layer_norm: LayerNorm,
    /// Box-delta MLP C → C → C → 4.
    pub box_head: DecoderMlp,
    /// Initial content queries (Q, C) (`query_embed.weight`).
    pub query_embed: Tensor,
    /// Initial reference boxes before sigmoid (Q, 4) (`reference_points.weight`).
    pub reference_points: Tensor,
    /// Presence token (1, C) (`presence_token.weight`).
    pub presence_token: Tensor,
    /// Presence MLP C → C → C → 1.
    pub presence_head: DecoderMlp,
    /// Norm before the presence head.
    pub presence_layer_norm: LayerNorm,
    /// Query-position MLP 2C → C → C on the box sine encoding.
    pub ref_point_head: DecoderMlp,
    /// boxRPB MLP over x offsets 2 → C → heads.
    pub box_rpb_embed_x: DecoderMlp,
    /// boxRPB MLP over y offsets 2 → C → heads.
    pub box_rpb_embed_y: DecoderMlp,
    /// Width.
    pub hidden_size: usize,
    /// Heads (= boxRPB channels).
    pub num_heads: usize,
    /// Q.
    pub num_queries: usize,
    /// Residual dropout probability in training mode.
    pub dropout: f64,
    /// Clamp of the presence logits to ±value. `Some(10.0)` after `load` (transformers, which the
    /// parity tests follow); `None` = Meta's original behaviour (its clamp call discards its result,
    /// so the logits are unclamped).
    pub presence_logit_clamp: Option<f64>,
}

impl DetrDecoder {
    /// Load the decoder; `cfg` is `detr_decoder_config` (`num_queries` required).
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let q = match cfg.num_queries {
            Some(q) if q > 0 => q,
            _ => candle_core::bail!("detr_decoder_config.num_queries must be set"),
        };
        let layers = (0..cfg.num_layers)
            .map(|i| DetrDecoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(DetrDecoder {
            layers,
            output_layer_norm: LayerNorm::load(vb.pp("output_layer_norm"), d, LN_EPS)?,
            box_head: DecoderMlp::load(vb.pp("box_head"), &[d, d, d, 4])?,
            query_embed: vb.pp("query_embed").get((q, d), "weight")?,
            reference_points: vb.pp("reference_points").get((q, 4), "weight")?,
            presence_token: vb.pp("presence_token").get((1, d), "weight")?,
            presence_head: DecoderMlp::load(vb.pp("presence_head"), &[d, d, d, 1])?,
            presence_layer_norm: LayerNorm::load(vb.pp("presence_layer_norm"), d, LN_EPS)?,
            ref_point_head: DecoderMlp::load(vb.pp("ref_point_head"), &[2 * d, d, d])?,
            box_rpb_embed_x: DecoderMlp::load(vb.pp("box_rpb_embed_x"), &[2, d, heads])?,
            box_rpb_embed_y: DecoderMlp::load(vb.pp("box_rpb_embed_y"), &[2, d, heads])?,
            hidden_size: d,
            num_heads: heads,
            num_queries: q,
            dropout: cfg.dropout,
            presence_logit_clamp: Some(PRESENCE_LOGIT_CLAMP),
        })
    }

    /// The boxRPB bias (B, heads, N, H·W) of reference boxes (B, N, 4) cxcywh over an H×W grid
    /// (transformers' `_get_rpb_matrix`, "log" mode): grid coordinates i/H, j/W; offsets to the box
    /// edges, v ↦ sign(8v)·log2(|8v| + 1)/3; MLP_y(Δy)[i] + MLP_x(Δx)[j] per head.
    pub fn rpb_matrix(&self, reference_boxes: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, _) = reference_boxes.dims3()?;
        let (ey, ex) = self.rpb_terms(reference_boxes, height, width)?;
        let heads = ey.dim(D::Minus1)?;
        let rpb = ey.unsqueeze(3)?.broadcast_add(&ex.unsqueeze(2)?)?; // (B, N, H, W, heads)
        rpb.reshape((b, n, height * width, heads))?.permute((0, 3, 1, 2))?.contiguous()
    }

    /// [`Self::rpb_matrix`] as the image cross-attention adds it: (B, heads, 1 + N, H·W) in
    /// `dtype` with a zero first row (the presence token), the per-axis terms laid out heads
    /// first and summed straight into that layout (one write of the bias, where the matrix,
    /// its transposition, the cast and the zero row's concatenation are five passes over it).
    /// The same values: each entry is the same f32 sum, cast once.
    pub fn rpb_bias(
        &self,
        reference_boxes: &Tensor,
        (height, width): (usize, usize),
        dtype: DType,
    ) -> Result<Tensor> {
        let (b, n, _) = reference_boxes.dims3()?;
        let (ey, ex) = self.rpb_terms(reference_boxes, height, width)?;
        let heads = ey.dim(D::Minus1)?;
        // (B, N, L, heads) → (B, heads, 1 + N, L) with a zero row 0.
        let with_zero_row = |t: &Tensor, len: usize| -> Result<Tensor> {
            let zero = Tensor::zeros((b, 1, len, heads), t.dtype(), t.device())?;
            Tensor::cat(&[&zero, t], 1)?.permute((0, 3, 1, 2))
        };
        let ey = with_zero_row(&ey, height)?.unsqueeze(4)?; // (B, heads, 1 + N, H, 1)
        let ex = with_zero_row(&ex, width)?.unsqueeze(3)?; // (B, heads, 1 + N, 1, W)
        ey.broadcast_add(&ex)?.reshape((b, heads, 1 + n, height * width))?.to_dtype(dtype)
    }

    /// The boxRPB's per-axis terms of reference boxes (B, N, 4): MLP_y over the rows (B, N, H,
    /// heads) and MLP_x over the columns (B, N, W, heads).
    fn rpb_terms(&self, reference_boxes: &Tensor, height: usize, width: usize) -> Result<(Tensor, Tensor)> {
        let dev = reference_boxes.device();
        let dtype = reference_boxes.dtype();
        let xyxy = box_cxcywh_to_xyxy(reference_boxes)?;
        let edges = |i0: usize, i1: usize| -> Result<Tensor> {
            Tensor::cat(&[xyxy.narrow(D::Minus1, i0, 1)?, xyxy.narrow(D::Minus1, i1, 1)?], D::Minus1)?
                .unsqueeze(2) // (B, N, 1, 2)
        };
        let coords = |len: usize| -> Result<Tensor> {
            super::ops::cached_constant(format!("rpb coords {len} {dtype:?}"), dev, || {
                let v: Vec<f32> = (0..len).map(|i| i as f32 / len as f32).collect();
                Tensor::from_vec(v, (1, 1, len, 1), dev)?.to_dtype(dtype)
            })
        };
        let log_scale = |d: Tensor| -> Result<Tensor> {
            let d8 = (d * 8.0)?;
            let mag = ((d8.abs()? + 1.0)?.log()? * (1.0 / 8f64.ln()))?;
            d8.sign()? * mag
        };
        let dy = log_scale(coords(height)?.broadcast_sub(&edges(1, 3)?)?)?; // (B, N, H, 2)
        let dx = log_scale(coords(width)?.broadcast_sub(&edges(0, 2)?)?)?; // (B, N, W, 2)
        let ey = self.box_rpb_embed_y.forward(&dy)?; // (B, N, H, heads)
        let ex = self.box_rpb_embed_x.forward(&dx)?; // (B, N, W, heads)
        Ok((ey, ex))
    }

    /// Decode.
    ///
    /// * `vision_features`: encoder memory (B, HW, C); `vision_pos_encoding` its positions (B, HW, C).
    /// * `text_features`: prompt tokens (B, T, C); `text_mask` (B, T), nonzero = valid, None = all.
    /// * `spatial_shapes`: (H, W) per memory level; boxRPB is used iff there is exactly one level
    ///   (as in transformers; SAM3 always has one).
    /// * `opts`: DAC and training-mode dropout ([`DecoderOptions::default`] = transformers' eval).
    pub fn forward(
        &self,
        vision_features: &Tensor,
        text_features: &Tensor,
        vision_pos_encoding: &Tensor,
        text_mask: Option<&Tensor>,
        spatial_shapes: &[(usize, usize)],
        opts: DecoderOptions,
    ) -> Result<DetrDecoderOutput> {
        let (b, hw, c) = vision_features.dims3()?;
        if c != self.hidden_size {
            candle_core::bail!("detr_decoder: memory width {c}, model width {}", self.hidden_size);
        }
        if let [(h, w)] = spatial_shapes {
            if h * w != hw {
                candle_core::bail!("detr_decoder: spatial shape {h}x{w} but {hw} memory tokens");
            }
        }
        let dtype = vision_features.dtype();
        let q = self.num_queries;
        let copies = if opts.dac { 2 } else { 1 };
        let n = q * copies;
        let num_o2m = if opts.dac { q } else { 0 };
        let dup = |t: &Tensor| -> Result<Tensor> {
            if opts.dac {
                Tensor::cat(&[t, t], 0)
            } else {
                Ok(t.clone())
            }
        };
        let queries = dup(&self.query_embed.to_dtype(dtype)?)?.unsqueeze(0)?.broadcast_as((b, n, c))?;
        // Reference boxes are kept in f32 whatever the compute dtype.
        let ref_logits = dup(&self.reference_points.to_dtype(DType::F32)?)?;
        let mut reference_boxes = sigmoid(&ref_logits)?.unsqueeze(0)?.broadcast_as((b, n, 4))?;
        let presence = self.presence_token.to_dtype(dtype)?.unsqueeze(0)?.broadcast_as((b, 1, c))?;
        let mut hidden = Tensor::cat(&[&presence, &queries], 1)?;

        let text_bias = text_mask.map(key_padding_bias).transpose()?;

        let mut outputs = Vec::with_capacity(self.layers.len());
        let mut ref_inputs = Vec::with_capacity(self.layers.len());
        let mut presence_logits = Vec::with_capacity(self.layers.len());
        let mut ref_out = reference_boxes.clone();
        // The prompt and the memory as the layer ops' one context operand (made once).
        let mut context: Option<Tensor> = None;
        for layer in &self.layers {
            let sine = box_encoding(&reference_boxes, c / 2)?.to_dtype(dtype)?;
            let query_pos = self.ref_point_head.forward(&sine)?;
            let vision_bias = match spatial_shapes {
                [(h, w)] => Some(self.rpb_bias(&reference_boxes, (*h, *w), dtype)?),
                _ => None,
            };
            let (text_bias, vision_bias) = (text_bias.as_ref(), vision_bias.as_ref());
            // On a training graph one op per layer (fewer, larger operations; the same values),
            // reading the prompt and the memory as one context operand.
            let mut op_out = None;
            let inputs = super::detr_block::DecoderLayerInputs {
                query_pos: &query_pos,
                text: text_features,
                memory: vision_features,
                vision_pos: vision_pos_encoding,
                text_bias,
                vision_bias,
                num_o2m,
                dropout: self.dropout,
                train: opts.train,
            };
            if super::detr_block::serves_decoder(layer, &hidden, &inputs) {
                if context.is_none() {
                    context = Some(Tensor::cat(&[text_features, vision_features], 1)?);
                }
                let ctx = context.as_ref().expect("made above");
                match super::detr_block::decoder_forward(layer, &hidden, ctx, &inputs) {
                    Ok(h) => op_out = Some(h),
                    Err(e) => super::detr_block::fall_back(e)?,
                }
            }
            hidden = match op_out {
                Some(h) => h,
                None => layer.forward(
                    &hidden,
                    &query_pos,
                    text_features,
                    vision_features,
                    vision_pos_encoding,
                    text_bias,
                    vision_bias,
                    num_o2m,
                    self.dropout,
                    opts.train,
                )?,
            };

            let normed = self.output_layer_norm.forward(&hidden.narrow(1, 1, n)?)?;
            let delta = self.box_head.forward(&normed)?.to_dtype(DType::F32)?;
            let new_boxes = sigmoid(&(delta + inverse_sigmoid(&reference_boxes, INV_SIGMOID_EPS)?)?)?;
            ref_inputs.push(ref_out);
            ref_out = new_boxes.clone();
            reference_boxes = new_boxes.detach();
            outputs.push(normed);

            let p = self.presence_layer_norm.forward(&hidden.narrow(1, 0, 1)?)?;
            let mut p = self.presence_head.forward(&p)?.squeeze(D::Minus1)?; // (B, 1)
            if let Some(m) = self.presence_logit_clamp {
                p = p.clamp(-m, m)?;
            }
            presence_logits.push(p);
        }
        Ok(DetrDecoderOutput {
            intermediate_hidden_states: Tensor::stack(&outputs, 0)?,
            reference_boxes: Tensor::stack(&ref_inputs, 0)?,
            presence_logits: Tensor::stack(&presence_logits, 0)?,
            num_o2m,
        })
    }

    /// Per-layer predicted boxes, cxcywh in [0, 1] (L, B, N, 4), f32:
    /// σ(box_head(h_ℓ) + inverse_sigmoid(r_ℓ)) from the decoder outputs, as `Sam3Model.forward` does
    /// (transformers returns the xyxy form of the last layer as `pred_boxes`; see
    /// [`box_cxcywh_to_xyxy`]).
    pub fn pred_boxes(&self, out: &DetrDecoderOutput) -> Result<Tensor> {
        let delta = self.box_head.forward(&out.intermediate_hidden_states)?.to_dtype(DType::F32)?;
        let r = inverse_sigmoid(&out.reference_boxes.to_dtype(DType::F32)?, INV_SIGMOID_EPS)?;
        sigmoid(&(delta + r)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sam3::encoder::test_support::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    fn parity(name: &str) -> Result<()> {
        let Some(fx) = Fixture::open(name) else { return Ok(()) };
        let dec = DetrDecoder::load(fx.vb().pp("detr_decoder"), &fx.config.detr_decoder_config)?;
        assert_eq!(dec.presence_logit_clamp, Some(10.0));
        let shapes = fx.get("decoder.in.spatial_shapes").to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let shapes: Vec<(usize, usize)> = shapes.iter().map(|s| (s[0] as usize, s[1] as usize)).collect();
        let out = dec.forward(
            &fx.get("decoder.in.vision_features"),
            &fx.get("decoder.in.text_features"),
            &fx.get("decoder.in.vision_pos_encoding"),
            Some(&fx.get("decoder.in.text_mask")),
            &shapes,
            DecoderOptions::default(),
        )?;
        assert_eq!(out.num_o2m, 0);
        let p = |s: &str| format!("{name} {s}");
        assert_close(
            &p("decoder.intermediate_hidden_states"),
            &out.intermediate_hidden_states,
            &fx.get("decoder.intermediate_hidden_states"),
        );
        assert_close(&p("decoder.reference_boxes"), &out.reference_boxes, &fx.get("decoder.reference_boxes"));
        assert_close(&p("decoder.presence_logits"), &out.presence_logits, &fx.get("decoder.presence_logits"));
        let boxes = box_cxcywh_to_xyxy(&dec.pred_boxes(&out)?)?;
        assert_close(&p("heads.all_pred_boxes"), &boxes, &fx.get("heads.all_pred_boxes"));
        let last = boxes.get(boxes.dim(0)? - 1)?;
        assert_close(&p("pred_boxes"), &last, &fx.get("pred_boxes"));
        let presence = out.presence_logits.get(out.presence_logits.dim(0)? - 1)?;
        assert_close(&p("presence_logits"), &presence, &fx.get("presence_logits"));
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

    const Q: usize = 4;

    fn random_decoder(layers: usize) -> Result<(VarMap, DetrDecoder)> {
        let varmap = VarMap::new();
        let dec = DetrDecoder::load(var_builder(&varmap).pp("detr_decoder"), &stack(layers, Some(Q)))?;
        randomize(&varmap)?;
        // Spread the initial boxes as trained models do.
        var(&varmap, "detr_decoder.reference_points.weight").set(&(pseudo_random(&[Q, 4], 99) * 2.0)?)?;
        Ok((varmap, dec))
    }

    struct Inputs {
        memory: Tensor,
        pos: Tensor,
        text: Tensor,
        mask: Tensor,
        shapes: Vec<(usize, usize)>,
    }

    fn inputs() -> Result<Inputs> {
        Ok(Inputs {
            memory: pseudo_random(&[2, 12, 16], 11),
            pos: pseudo_random(&[2, 12, 16], 12),
            text: pseudo_random(&[2, 5, 16], 13),
            mask: Tensor::new(&[[1i64, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu)?,
            shapes: vec![(3, 4)],
        })
    }

    fn run(dec: &DetrDecoder, x: &Inputs, dac: bool) -> Result<DetrDecoderOutput> {
        dec.forward(
            &x.memory,
            &x.text,
            &x.pos,
            Some(&x.mask),
            &x.shapes,
            DecoderOptions { dac, train: false },
        )
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// With DAC the first Q queries (and the presence token) compute exactly what the plain
    /// decoder computes: the o2m half never reaches them (it is excluded from self-attention, and
    /// every other sub-layer is per-query).
    #[test]
    fn dac_one_to_one_half_equals_plain_decoder() -> Result<()> {
        let (_vm, dec) = random_decoder(3)?;
        let x = inputs()?;
        let plain = run(&dec, &x, false)?;
        let dac = run(&dec, &x, true)?;
        assert_eq!(dac.intermediate_hidden_states.dims(), &[3, 2, 2 * Q, 16]);
        assert_eq!(dac.reference_boxes.dims(), &[3, 2, 2 * Q, 4]);
        assert_eq!(dac.presence_logits.dims(), &[3, 2, 1]);
        assert_eq!(dac.num_o2m, Q);
        let o2o = |t: &Tensor| t.narrow(2, 0, Q).unwrap();
        let d = max_abs(&(o2o(&dac.intermediate_hidden_states) - &plain.intermediate_hidden_states)?);
        assert!(d < 1e-5, "o2o hidden differs by {d}");
        let d = max_abs(&(o2o(&dac.reference_boxes) - &plain.reference_boxes)?);
        assert!(d < 1e-6, "o2o boxes differ by {d}");
        let d = max_abs(&(&dac.presence_logits - &plain.presence_logits)?);
        assert!(d < 1e-5, "presence differs by {d}");
        let d = max_abs(&(dec.pred_boxes(&dac)?.narrow(2, 0, Q)? - dec.pred_boxes(&plain)?)?);
        assert!(d < 1e-6, "o2o predicted boxes differ by {d}");
        Ok(())
    }

    /// The o2m half equals the plain decoder run with every self-attention output zeroed (the
    /// residual + norm still applied), and differs from the o2o half.
    #[test]
    fn dac_one_to_many_half_skips_self_attention() -> Result<()> {
        let (_vm, dec) = random_decoder(3)?;
        let x = inputs()?;
        let dac = run(&dec, &x, true)?;
        let mut no_sa = dec.clone();
        for layer in &mut no_sa.layers {
            let o = &mut layer.self_attn.o_proj;
            o.weight = o.weight.zeros_like()?;
            o.bias = Some(o.bias.as_ref().unwrap().zeros_like()?);
        }
        let skipped = run(&no_sa, &x, false)?;
        let o2m = |t: &Tensor| t.narrow(2, Q, Q).unwrap();
        let d = max_abs(&(o2m(&dac.intermediate_hidden_states) - &skipped.intermediate_hidden_states)?);
        assert!(d < 1e-5, "o2m hidden differs from the no-self-attention decoder by {d}");
        let d = max_abs(&(o2m(&dac.reference_boxes) - &skipped.reference_boxes)?);
        assert!(d < 1e-6, "o2m boxes differ by {d}");
        let gap = max_abs(
            &(o2m(&dac.intermediate_hidden_states) - dac.intermediate_hidden_states.narrow(2, 0, Q)?)?,
        );
        assert!(gap > 1e-2, "o2m and o2o halves should differ (gap {gap})");
        Ok(())
    }

    /// Layer level: perturbing the o2m queries leaves the presence token and the o2o queries
    /// bit-for-bit unchanged when `num_o2m` = Q, and changes them without DAC (so the probe is live).
    #[test]
    fn layer_o2m_queries_do_not_reach_o2o_queries() -> Result<()> {
        let (_vm, dec) = random_decoder(1)?;
        let layer = &dec.layers[0];
        let x = inputs()?;
        let hidden = pseudo_random(&[2, 1 + 2 * Q, 16], 21);
        let query_pos = pseudo_random(&[2, 2 * Q, 16], 22);
        let rpb = pseudo_random(&[2, 2, 1 + 2 * Q, 12], 23);
        let text_bias = key_padding_bias(&x.mask)?;
        let noise = Tensor::cat(
            &[Tensor::zeros((2, 1 + Q, 16), DType::F32, &Device::Cpu)?, pseudo_random(&[2, Q, 16], 24)],
            1,
        )?;
        let perturbed = (&hidden + (noise * 3.0)?)?;
        let fwd = |h: &Tensor, num_o2m| {
            layer.forward(
                h,
                &query_pos,
                &x.text,
                &x.memory,
                &x.pos,
                Some(&text_bias),
                Some(&rpb),
                num_o2m,
                0.0,
                false,
            )
        };
        let front = |t: Tensor| t.narrow(1, 0, 1 + Q).unwrap();
        let back = |t: Tensor| t.narrow(1, 1 + Q, Q).unwrap();
        let d_front = max_abs(&(front(fwd(&hidden, Q)?) - front(fwd(&perturbed, Q)?))?);
        assert_eq!(d_front, 0.0, "o2o/presence outputs moved by {d_front}");
        let d_back = max_abs(&(back(fwd(&hidden, Q)?) - back(fwd(&perturbed, Q)?))?);
        assert!(d_back > 1e-2, "o2m outputs should follow their inputs ({d_back})");
        let d_plain = max_abs(&(front(fwd(&hidden, 0)?) - front(fwd(&perturbed, 0)?))?);
        assert!(d_plain > 1e-4, "without DAC the perturbation must reach the first queries ({d_plain})");
        Ok(())
    }

    #[test]
    fn presence_clamp_is_a_flag() -> Result<()> {
        let (vm, mut dec) = random_decoder(2)?;
        var(&vm, "detr_decoder.presence_head.layer3.bias").set(&Tensor::new(&[50f32], &Device::Cpu)?)?;
        let x = inputs()?;
        let clamped = run(&dec, &x, false)?.presence_logits.flatten_all()?.to_vec1::<f32>()?;
        assert!(clamped.iter().all(|v| *v == 10.0), "{clamped:?}");
        dec.presence_logit_clamp = None;
        let raw = run(&dec, &x, false)?.presence_logits.flatten_all()?.to_vec1::<f32>()?;
        assert!(raw.iter().all(|v| *v > 10.0), "{raw:?}");
        Ok(())
    }

    #[test]
    fn gradients_reach_weights_and_inputs() -> Result<()> {
        let (vm, dec) = random_decoder(2)?;
        let x = inputs()?;
        let memory = Var::from_tensor(&x.memory)?;
        let text = Var::from_tensor(&x.text)?;
        let out = dec.forward(
            memory.as_tensor(),
            text.as_tensor(),
            &x.pos,
            Some(&x.mask),
            &x.shapes,
            DecoderOptions { dac: true, train: false },
        )?;
        let loss = (weighted_sum(&out.intermediate_hidden_states, 1)?
            + weighted_sum(&dec.pred_boxes(&out)?, 2)?
            + weighted_sum(&out.presence_logits, 3)?)?;
        let grads = loss.backward()?;
        for name in [
            "layers.0.self_attn.q_proj.weight",
            "layers.1.self_attn.v_proj.weight",
            "layers.0.self_attn_layer_norm.weight",
            "layers.0.text_cross_attn.k_proj.weight",
            "layers.1.text_cross_attn.o_proj.weight",
            "layers.0.vision_cross_attn.q_proj.weight",
            "layers.1.vision_cross_attn.k_proj.weight",
            "layers.0.vision_cross_attn_layer_norm.bias",
            "layers.0.mlp.fc1.weight",
            "layers.1.mlp.fc2.bias",
            "layers.1.mlp_layer_norm.weight",
            "output_layer_norm.weight",
            "box_head.layer1.weight",
            "box_head.layer3.weight",
            "presence_head.layer1.weight",
            "presence_head.layer3.bias",
            "presence_layer_norm.weight",
            "ref_point_head.layer1.weight",
            "ref_point_head.layer2.bias",
            "box_rpb_embed_x.layer1.weight",
            "box_rpb_embed_y.layer2.weight",
            "query_embed.weight",
            "reference_points.weight",
            "presence_token.weight",
        ] {
            assert_grad(&grads, &vm, &format!("detr_decoder.{name}"));
        }
        for v in [&memory, &text] {
            assert!(max_abs(grads.get(v.as_tensor()).expect("input gradient")) > 0.0);
        }
        Ok(())
    }

    /// The bias the image cross-attention adds is transformers' RPB matrix below a zero row
    /// (the presence token), bit for bit, in f32 and cast to bf16.
    #[test]
    fn rpb_bias_is_the_rpb_matrix_below_a_zero_row() -> Result<()> {
        let (_vm, dec) = random_decoder(1)?;
        let boxes = Tensor::rand(0.1f32, 0.9, (2, 5, 4), &Device::Cpu)?;
        let (h, w) = (3, 4);
        let m = dec.rpb_matrix(&boxes, h, w)?;
        let zero = Tensor::zeros((2, m.dim(1)?, 1, h * w), DType::F32, &Device::Cpu)?;
        let want = Tensor::cat(&[&zero, &m], 2)?;
        for dt in [DType::F32, DType::BF16] {
            let got = dec.rpb_bias(&boxes, (h, w), dt)?;
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dt));
            let d = (got.to_dtype(DType::F32)? - want.to_dtype(dt)?.to_dtype(DType::F32)?)?;
            assert_eq!(d.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{dt:?}");
        }
        assert!(max_abs(&m) > 0.0);
        Ok(())
    }

    /// The refined boxes enter the next layer detached: the queries alone give the box head no
    /// gradient, while the initial reference points (not detached, as in transformers) get one.
    #[test]
    fn refined_boxes_are_detached_between_layers() -> Result<()> {
        let (vm, dec) = random_decoder(3)?;
        let x = inputs()?;
        let out = run(&dec, &x, false)?;
        let grads = weighted_sum(&out.intermediate_hidden_states, 5)?.backward()?;
        let bh = var(&vm, "detr_decoder.box_head.layer3.weight");
        assert!(grads.get(bh.as_tensor()).is_none_or(|g| max_abs(g) == 0.0));
        assert_grad(&grads, &vm, "detr_decoder.reference_points.weight");
        Ok(())
    }

    #[test]
    fn dropout_only_in_training() -> Result<()> {
        let (_vm, dec) = random_decoder(1)?;
        let x = inputs()?;
        let go = |train| {
            dec.forward(
                &x.memory,
                &x.text,
                &x.pos,
                Some(&x.mask),
                &x.shapes,
                DecoderOptions { dac: false, train },
            )
        };
        let a = go(false)?.intermediate_hidden_states;
        let b = go(true)?.intermediate_hidden_states;
        assert!(max_abs(&(a - b)?) > 0.0);
        Ok(())
    }
}
