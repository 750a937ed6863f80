//! Dot-product scoring (transformers' `Sam3DotProductScoring`, Meta's `DotProductScoring`): the
//! prompt tokens go through a residual MLP + LayerNorm, are mean-pooled over valid tokens and
//! projected; each decoder query is projected and the logit is their dot product · 1/√C, clamped
//! to ±12.
//!
//! Weights under the VarBuilder given to [`DotProductScoring::load`] (`dot_product_scoring` in a
//! `Sam3Model` checkpoint): `text_mlp.layer{1,2}`, `text_mlp_out_norm`, `text_proj`, `query_proj`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::StackConfig;
use super::nn::{DecoderMlp, LayerNorm, Linear};

/// PyTorch's default `nn.LayerNorm` eps (transformers passes none).
const LN_EPS: f64 = 1e-5;

/// transformers' `clamp_max_val`.
pub const SCORE_LOGIT_CLAMP: f64 = 12.0;

/// The scoring head.
#[derive(Debug, Clone)]
pub struct DotProductScoring {
    /// Prompt MLP C → intermediate → C (ReLU), used residually.
    pub text_mlp: DecoderMlp,
    /// Norm after the residual prompt MLP.
    pub text_mlp_out_norm: LayerNorm,
    /// Projection of the pooled prompt.
    pub text_proj: Linear,
    /// Projection of the decoder queries.
    pub query_proj: Linear,
    /// 1/√(projection width).
    pub scale: f64,
    /// Clamp of the logits to ±value (`Some(12.0)` after `load`, as transformers and Meta).
    pub clamp_logits: Option<f64>,
    /// Dropout after the prompt MLP in training mode (`detr_decoder_config.dropout`).
    pub dropout: f64,
}

impl DotProductScoring {
    /// Load; `cfg` is `detr_decoder_config` (its width, FFN width and dropout are used, as in
    /// transformers).
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(DotProductScoring {
            text_mlp: DecoderMlp::load(vb.pp("text_mlp"), &[d, cfg.intermediate_size, d])?,
            text_mlp_out_norm: LayerNorm::load(vb.pp("text_mlp_out_norm"), d, LN_EPS)?,
            text_proj: Linear::load(vb.pp("text_proj"), d, d, true)?,
            query_proj: Linear::load(vb.pp("query_proj"), d, d, true)?,
            scale: 1.0 / (d as f64).sqrt(),
            clamp_logits: Some(SCORE_LOGIT_CLAMP),
            dropout: cfg.dropout,
        })
    }

    /// The pooled, projected prompt (B, C): `text_proj(mean over valid tokens of
    /// LN(x + MLP(x)))`; the valid count is clamped ≥ 1.
    pub fn prompt_embedding(
        &self,
        text_features: &Tensor,
        text_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mut m = self.text_mlp.forward(text_features)?;
        if train && self.dropout > 0.0 {
            m = crate::rng::dropout(&m, self.dropout)?;
        }
        let t = self.text_mlp_out_norm.forward(&(m + text_features)?)?;
        let pooled = match text_mask {
            None => t.mean(1)?,
            Some(mask) => {
                let valid = mask.to_dtype(DType::F32)?.ne(0.0)?.to_dtype(t.dtype())?.unsqueeze(D::Minus1)?;
                let count = valid.sum(1)?.clamp(1.0, f64::INFINITY)?; // (B, 1)
                t.broadcast_mul(&valid)?.sum(1)?.broadcast_div(&count)?
            }
        };
        self.text_proj.forward(&pooled)
    }

    /// Logits (L, B, Q, 1) for `decoder_hidden_states` (L, B, Q, C) (the decoder's
    /// `intermediate_hidden_states`), prompt `text_features` (B, T, C) and `text_mask` (B, T)
    /// (nonzero = valid; None = all). `train` enables the prompt-MLP dropout.
    pub fn forward(
        &self,
        decoder_hidden_states: &Tensor,
        text_features: &Tensor,
        text_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (l, b, q, c) = decoder_hidden_states.dims4()?;
        let text = self.prompt_embedding(text_features, text_mask, train)?; // (B, C)
        let queries = self.query_proj.forward(decoder_hidden_states)?; // (L, B, Q, C)
                                                                       // (B, L·Q, C) × (B, C, 1)
        let queries = queries.transpose(0, 1)?.contiguous()?.reshape((b, l * q, c))?;
        let scores = queries.matmul(&text.unsqueeze(D::Minus1)?.contiguous()?)?;
        let scores = (scores.reshape((b, l, q, 1))?.transpose(0, 1)? * self.scale)?;
        match self.clamp_logits {
            Some(m) => scores.clamp(-m, m),
            None => Ok(scores),
        }
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
        let sc = DotProductScoring::load(fx.vb().pp("dot_product_scoring"), &fx.config.detr_decoder_config)?;
        let hidden = fx.get("scoring.in.decoder_hidden_states");
        let text = fx.get("scoring.in.text_features");
        let mask = fx.get("scoring.in.text_mask");
        let logits = sc.forward(&hidden, &text, Some(&mask), false)?;
        let p = |s: &str| format!("{name} {s}");
        assert_close(&p("scoring.out"), &logits, &fx.get("scoring.out"));
        let all = logits.squeeze(D::Minus1)?;
        assert_close(&p("heads.all_pred_logits"), &all, &fx.get("heads.all_pred_logits"));
        // The recorded decoder output, scored, is the model's final pred_logits.
        let from_decoder =
            sc.forward(&fx.get("decoder.intermediate_hidden_states"), &text, Some(&mask), false)?;
        let last = from_decoder.get(from_decoder.dim(0)? - 1)?.squeeze(D::Minus1)?;
        assert_close(&p("pred_logits"), &last, &fx.get("pred_logits"));
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

    fn random_scoring() -> Result<(VarMap, DotProductScoring)> {
        let varmap = VarMap::new();
        let sc = DotProductScoring::load(var_builder(&varmap).pp("dot_product_scoring"), &stack(1, Some(4)))?;
        randomize(&varmap)?;
        Ok((varmap, sc))
    }

    #[test]
    fn padded_prompt_tokens_do_not_matter_and_clamp_applies() -> Result<()> {
        let (_vm, mut sc) = random_scoring()?;
        let hidden = pseudo_random(&[2, 2, 4, 16], 1);
        let text = pseudo_random(&[2, 5, 16], 2);
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 0, 0, 0]], &Device::Cpu)?;
        let a = sc.forward(&hidden, &text, Some(&mask), false)?;
        assert_eq!(a.dims(), &[2, 2, 4, 1]);
        let noise = Tensor::cat(
            &[Tensor::zeros((1, 5, 16), DType::F32, &Device::Cpu)?, pseudo_random(&[1, 5, 16], 3)],
            0,
        )?;
        let noise =
            noise.broadcast_mul(&Tensor::new(&[0f32, 0., 1., 1., 1.], &Device::Cpu)?.reshape((1, 5, 1))?)?;
        let b = sc.forward(&hidden, &(&text + noise)?, Some(&mask), false)?;
        assert_eq!((&a - &b)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        // Large queries saturate at ±12 unless the clamp is switched off.
        let big = (hidden * 1000.0)?;
        let clamped = sc.forward(&big, &text, Some(&mask), false)?;
        let m = clamped.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(m, 12.0);
        sc.clamp_logits = None;
        let raw = sc.forward(&big, &text, Some(&mask), false)?;
        assert!(raw.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 12.0);
        Ok(())
    }

    #[test]
    fn gradients_reach_weights_and_inputs() -> Result<()> {
        let (vm, sc) = random_scoring()?;
        let hidden = Var::from_tensor(&pseudo_random(&[2, 2, 4, 16], 4))?;
        let text = Var::from_tensor(&pseudo_random(&[2, 5, 16], 5))?;
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu)?;
        let logits = sc.forward(hidden.as_tensor(), text.as_tensor(), Some(&mask), false)?;
        let grads = weighted_sum(&logits, 6)?.backward()?;
        for name in [
            "text_mlp.layer1.weight",
            "text_mlp.layer2.bias",
            "text_mlp_out_norm.weight",
            "text_proj.weight",
            "text_proj.bias",
            "query_proj.weight",
            "query_proj.bias",
        ] {
            assert_grad(&grads, &vm, &format!("dot_product_scoring.{name}"));
        }
        for v in [&hidden, &text] {
            let g = grads.get(v.as_tensor()).expect("input gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }
}
