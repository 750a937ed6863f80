//! The fusion ("DETR") encoder: image tokens self-attend (with sine positions) and cross-attend to
//! the prompt tokens (text + geometry), pre-norm (transformers' `Sam3DetrEncoder`, Meta's
//! `TransformerEncoderFusion`). The prompt is not updated; there is no final norm.
//!
//! Weights: `layers.{i}.{self_attn,cross_attn}.{q,k,v,o}_proj`, `layers.{i}.layer_norm{1,2,3}`,
//! `layers.{i}.mlp.{fc1,fc2}` under the VarBuilder given to [`DetrEncoder::load`]
//! (`detr_encoder` in a `Sam3Model` checkpoint).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::StackConfig;
use super::nn::{key_padding_bias, Activation, LayerNorm, Mlp, MultiHeadAttention};

/// PyTorch's default `nn.LayerNorm` eps: transformers builds every DETR-encoder LayerNorm without
/// `eps=`, so the config's `layer_norm_eps` (1e-6) is not used.
const LN_EPS: f64 = 1e-5;

/// `residual + dropout(x)`, the residual dropout (`nn.Dropout`) active only in training (one
/// op on CUDA, [`crate::rng::dropout_add`]).
fn dropout_add(x: &Tensor, residual: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        crate::rng::dropout_add(x, residual, p)
    } else {
        residual + x
    }
}

/// (B, C, H, W) → (B, H·W, C), row-major tokens.
fn flatten_map(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)
}

/// One pre-norm encoder layer (transformers' `Sam3DetrEncoderLayer`).
#[derive(Debug, Clone)]
pub struct DetrEncoderLayer {
    /// Norm before self-attention.
    pub layer_norm1: LayerNorm,
    /// Image-token self-attention (q = k = x + pos, v = x).
    pub self_attn: MultiHeadAttention,
    /// Image → prompt cross-attention (no positions).
    pub cross_attn: MultiHeadAttention,
    /// Norm before cross-attention.
    pub layer_norm2: LayerNorm,
    /// FFN (`fc1 → act → fc2`).
    pub mlp: Mlp,
    /// Norm before the FFN.
    pub layer_norm3: LayerNorm,
}

impl DetrEncoderLayer {
    /// Load `layer_norm{1,2,3}`, `self_attn`, `cross_attn`, `mlp`.
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        Ok(DetrEncoderLayer {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), d, LN_EPS)?,
            self_attn: MultiHeadAttention::load(vb.pp("self_attn"), d, heads, "o_proj")?,
            cross_attn: MultiHeadAttention::load(vb.pp("cross_attn"), d, heads, "o_proj")?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), d, LN_EPS)?,
            mlp: Mlp::load(vb.pp("mlp"), d, cfg.intermediate_size, Activation::from_name(&cfg.hidden_act)?)?,
            layer_norm3: LayerNorm::load(vb.pp("layer_norm3"), d, LN_EPS)?,
        })
    }

    /// `vision_feats` (B, N, C), `prompt_feats` (B, T, C), `vision_pos_encoding` (B, N, C),
    /// `prompt_cross_attn_mask` additive (B, 1, 1, T) (see [`key_padding_bias`]) or None;
    /// `dropout_p` is the residual dropout probability, applied only when `train`. Returns (B, N, C).
    pub fn forward(
        &self,
        vision_feats: &Tensor,
        prompt_feats: &Tensor,
        vision_pos_encoding: &Tensor,
        prompt_cross_attn_mask: Option<&Tensor>,
        dropout_p: f64,
        train: bool,
    ) -> Result<Tensor> {
        let residual = vision_feats;
        let h = self.layer_norm1.forward(vision_feats)?;
        let h_pos = super::ops::add_constant(&h, vision_pos_encoding)?;
        let a = self.self_attn.forward(&h_pos, &h_pos, &h, None)?;
        let x = dropout_add(&a, residual, dropout_p, train)?;

        let h = self.layer_norm2.forward(&x)?;
        let a = self.cross_attn.forward(&h, prompt_feats, prompt_feats, prompt_cross_attn_mask)?;
        let x = dropout_add(&a, &x, dropout_p, train)?;

        let h = self.mlp.forward(&self.layer_norm3.forward(&x)?)?;
        dropout_add(&h, &x, dropout_p, train)
    }
}

/// What [`DetrEncoder::forward`] returns (transformers' `Sam3DETREncoderOutput`).
#[derive(Debug, Clone)]
pub struct DetrEncoderOutput {
    /// Encoded image tokens (B, ΣHW, C) ("memory").
    pub last_hidden_state: Tensor,
    /// The image position encodings, flattened like the tokens (B, ΣHW, C).
    pub pos_embeds_flattened: Tensor,
    /// The prompt tokens, unchanged (B, T, C).
    pub text_features: Tensor,
    /// (H, W) of each level, in order.
    pub spatial_shapes: Vec<(usize, usize)>,
}

/// The fusion encoder (transformers' `Sam3DetrEncoder`).
#[derive(Debug, Clone)]
pub struct DetrEncoder {
    /// The layers.
    pub layers: Vec<DetrEncoderLayer>,
    /// Residual dropout probability used when `forward` is called with `train = true`
    /// (`detr_encoder_config.dropout`, 0.1 in SAM3).
    pub dropout: f64,
}

impl DetrEncoder {
    /// Load `layers.{0..num_layers}`.
    pub fn load(vb: VarBuilder, cfg: &StackConfig) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|i| DetrEncoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(DetrEncoder { layers, dropout: cfg.dropout })
    }

    /// Encode.
    ///
    /// * `vision_features`: one (B, C, H, W) map per level (SAM3 passes one level, the ViT-stride map);
    ///   levels are flattened row-major and concatenated.
    /// * `text_features`: the prompt tokens (text + geometry), (B, T, C).
    /// * `vision_pos_embeds`: the sine encodings of the maps, same shapes as `vision_features`.
    /// * `text_mask`: (B, T), nonzero = valid token; None = all valid.
    /// * `train`: apply the residual dropout (PyTorch `module.train()`); false for inference/parity.
    ///
    /// transformers' optional `spatial_sizes` (sequence-first inputs) is not supported: pass maps.
    pub fn forward(
        &self,
        vision_features: &[Tensor],
        text_features: &Tensor,
        vision_pos_embeds: &[Tensor],
        text_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<DetrEncoderOutput> {
        if vision_features.is_empty() || vision_features.len() != vision_pos_embeds.len() {
            candle_core::bail!(
                "detr_encoder: {} feature maps but {} position maps",
                vision_features.len(),
                vision_pos_embeds.len()
            );
        }
        let mut spatial_shapes = Vec::with_capacity(vision_features.len());
        let mut feats = Vec::with_capacity(vision_features.len());
        let mut pos = Vec::with_capacity(vision_features.len());
        for (f, p) in vision_features.iter().zip(vision_pos_embeds) {
            let (_, _, h, w) = f.dims4()?;
            spatial_shapes.push((h, w));
            feats.push(flatten_map(f)?);
            pos.push(flatten_map(&p.to_dtype(f.dtype())?)?);
        }
        let features = Tensor::cat(&feats, 1)?.contiguous()?;
        let pos = Tensor::cat(&pos, 1)?.contiguous()?;
        let mask = text_mask.map(key_padding_bias).transpose()?;

        let mut hidden = features;
        for layer in &self.layers {
            let (mask, p) = (mask.as_ref(), self.dropout);
            // On a training graph one op per layer (fewer, larger operations; the same values).
            if super::detr_block::serves_encoder(layer, &hidden, text_features, &pos, mask) {
                match super::detr_block::encoder_forward(layer, &hidden, text_features, &pos, mask, p, train)
                {
                    Ok(h) => {
                        hidden = h;
                        continue;
                    }
                    Err(e) => super::detr_block::fall_back(e)?,
                }
            }
            hidden = layer.forward(&hidden, text_features, &pos, mask, p, train)?;
        }
        Ok(DetrEncoderOutput {
            last_hidden_state: hidden,
            pos_embeds_flattened: pos,
            text_features: text_features.clone(),
            spatial_shapes,
        })
    }
}

/// Helpers shared by the tests of the encoder, decoder, scoring and mask-head modules.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use crate::sam3::config::{MaskDecoderConfig, Sam3Config, StackConfig};
    use crate::sam3::weights::{open_dir, Checkpoint};

    /// Directory of the transformers fixture `name` (tiny_a, tiny_b).
    pub fn fixture_dir(name: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sam3")).join(name)
    }

    /// A transformers fixture: config, checkpoint and the recorded tensors.
    pub struct Fixture {
        pub config: Sam3Config,
        pub checkpoint: Checkpoint,
        pub inputs: HashMap<String, Tensor>,
        pub outputs: HashMap<String, Tensor>,
        /// `alias → target` from outputs.safetensors' metadata (`inputs:<n>` = an input tensor).
        pub aliases: HashMap<String, String>,
    }

    /// The `aliases` JSON of a safetensors file's `__metadata__` (empty if none).
    fn read_aliases(path: &Path) -> HashMap<String, String> {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        match header.get("__metadata__").and_then(|m| m.get("aliases")).and_then(|a| a.as_str()) {
            Some(a) => serde_json::from_str(a).unwrap(),
            None => HashMap::new(),
        }
    }

    impl Fixture {
        /// None (with a note on stderr) when the fixture has not been generated.
        pub fn open(name: &str) -> Option<Fixture> {
            let dir = fixture_dir(name);
            if !dir.join("outputs.safetensors").exists() {
                eprintln!("fixture {} not present; parity check skipped", dir.display());
                return None;
            }
            let (config, checkpoint) = open_dir(&dir).expect("fixture checkpoint opens");
            let load = |f: &str| {
                candle_core::safetensors::load(dir.join(f), &Device::Cpu)
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
            };
            Some(Fixture {
                config,
                checkpoint,
                inputs: load("inputs.safetensors"),
                outputs: load("outputs.safetensors"),
                aliases: read_aliases(&dir.join("outputs.safetensors")),
            })
        }

        pub fn vb(&self) -> VarBuilder<'static> {
            self.checkpoint.var_builder(DType::F32, &Device::Cpu)
        }

        /// A recorded tensor if present (aliases resolved), as f32.
        pub fn try_get(&self, key: &str) -> Option<Tensor> {
            let t = match self.outputs.get(key) {
                Some(t) => Some(t),
                None => match self.aliases.get(key) {
                    Some(target) => match target.strip_prefix("inputs:") {
                        Some(input) => self.inputs.get(input),
                        None => self.outputs.get(target),
                    },
                    None => self.inputs.get(key),
                },
            };
            t.map(|t| t.to_dtype(DType::F32).unwrap())
        }

        /// A recorded tensor (aliases resolved), as f32; panics if absent.
        pub fn get(&self, key: &str) -> Tensor {
            self.try_get(key).unwrap_or_else(|| panic!("fixture tensor {key} missing"))
        }
    }

    /// max |got − want|, asserted ≤ 1e-4 · max(1, max |want|); returns the diff.
    pub fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let got = got.to_dtype(DType::F32).unwrap();
        let diff = (&got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let tol = 1e-4 * scale.max(1.0);
        eprintln!("{what}: max|diff| = {diff:.3e} (max|ref| = {scale:.3e}, tol {tol:.1e})");
        assert!(diff <= tol, "{what}: max|diff| {diff} > {tol}");
        diff
    }

    /// Deterministic pseudo-random values in [-1, 1) (no RNG state shared between tests).
    pub fn pseudo_random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A Var-backed VarBuilder; call [`randomize`] after building the modules.
    pub fn var_builder(varmap: &VarMap) -> VarBuilder<'_> {
        VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu)
    }

    /// Overwrite every Var with deterministic values: matrices ~ U(-1,1)/√fan_in, vectors
    /// (biases, norm shifts) ~ 0.2·U(-1,1), norm scales 1 + 0.2·U(-1,1).
    pub fn randomize(varmap: &VarMap) -> Result<()> {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for (i, name) in names.into_iter().enumerate() {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let r = pseudo_random(&dims, i as u64 + 17);
            let value = if dims.len() >= 2 {
                let fan_in: usize = dims[1..].iter().product();
                (r * (1.5 / (fan_in as f64).sqrt()))?
            } else if name.contains("norm") && name.ends_with("weight") {
                ((r * 0.2)? + 1.0)?
            } else {
                (r * 0.2)?
            };
            var.set(&value)?;
        }
        Ok(())
    }

    /// The Var registered under `name`.
    pub fn var(varmap: &VarMap, name: &str) -> Var {
        varmap.data().lock().unwrap().get(name).unwrap_or_else(|| panic!("no var {name}")).clone()
    }

    /// Assert `name`'s gradient exists and is not all zero.
    pub fn assert_grad(grads: &candle_core::backprop::GradStore, varmap: &VarMap, name: &str) {
        let v = var(varmap, name);
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm {n}");
    }

    /// Small configs for Var-backed tests (C = 16, 2 heads).
    pub fn stack(layers: usize, queries: Option<usize>) -> StackConfig {
        StackConfig {
            hidden_size: 16,
            num_layers: layers,
            num_attention_heads: 2,
            intermediate_size: 32,
            dropout: 0.1,
            hidden_act: "relu".into(),
            roi_size: 7,
            num_queries: queries,
        }
    }

    pub fn mask_cfg() -> MaskDecoderConfig {
        MaskDecoderConfig { hidden_size: 16, num_upsampling_stages: 3, num_attention_heads: 2 }
    }

    /// Σ x · R for a fixed pseudo-random R: a "sum of the outputs" whose gradient is generic.
    pub fn weighted_sum(x: &Tensor, seed: u64) -> Result<Tensor> {
        let r = pseudo_random(x.dims(), seed).to_dtype(x.dtype())?;
        (x * r)?.sum_all()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use candle_core::Var;
    use candle_nn::VarMap;

    fn parity(name: &str) -> Result<()> {
        let Some(fx) = Fixture::open(name) else { return Ok(()) };
        let enc = DetrEncoder::load(fx.vb().pp("detr_encoder"), &fx.config.detr_encoder_config)?;
        let vision = fx.get("encoder.in.vision_features.0");
        let pos = fx.get("encoder.in.vision_pos_embeds.0");
        let text = fx.get("encoder.in.text_features");
        let mask = fx.get("encoder.in.text_mask");
        let out = enc.forward(
            std::slice::from_ref(&vision),
            &text,
            std::slice::from_ref(&pos),
            Some(&mask),
            false,
        )?;
        assert_eq!(out.spatial_shapes, vec![(vision.dim(2)?, vision.dim(3)?)]);
        assert_close(
            &format!("{name} encoder.last_hidden_state"),
            &out.last_hidden_state,
            &fx.get("encoder.last_hidden_state"),
        );
        assert_close(
            &format!("{name} encoder.pos_embeds_flattened"),
            &out.pos_embeds_flattened,
            &fx.get("encoder.pos_embeds_flattened"),
        );
        assert_close(&format!("{name} encoder.text_features"), &out.text_features, &text);
        // Layer by layer.
        let mut h = fx.get("encoder.hidden_states.0");
        let bias = key_padding_bias(&mask)?;
        for (i, layer) in enc.layers.iter().enumerate() {
            h = layer.forward(&h, &text, &out.pos_embeds_flattened, Some(&bias), 0.1, false)?;
            assert_close(
                &format!("{name} encoder.hidden_states.{}", i + 1),
                &h,
                &fx.get(&format!("encoder.hidden_states.{}", i + 1)),
            );
        }
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

    #[test]
    fn gradients_reach_weights_and_inputs() -> Result<()> {
        let varmap = VarMap::new();
        let enc = DetrEncoder::load(var_builder(&varmap).pp("detr_encoder"), &stack(1, None))?;
        randomize(&varmap)?;
        let vision = Var::from_tensor(&pseudo_random(&[2, 16, 3, 4], 1))?;
        let text = Var::from_tensor(&pseudo_random(&[2, 5, 16], 2))?;
        let pos = pseudo_random(&[2, 16, 3, 4], 3);
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 0, 0, 0]], &candle_core::Device::Cpu)?;
        let out = enc.forward(&[vision.as_tensor().clone()], text.as_tensor(), &[pos], Some(&mask), false)?;
        assert_eq!(out.last_hidden_state.dims(), &[2, 12, 16]);
        let grads = weighted_sum(&out.last_hidden_state, 4)?.backward()?;
        for name in [
            "detr_encoder.layers.0.self_attn.q_proj.weight",
            "detr_encoder.layers.0.self_attn.k_proj.weight",
            "detr_encoder.layers.0.self_attn.o_proj.bias",
            "detr_encoder.layers.0.cross_attn.q_proj.weight",
            "detr_encoder.layers.0.cross_attn.v_proj.weight",
            "detr_encoder.layers.0.mlp.fc1.weight",
            "detr_encoder.layers.0.mlp.fc2.weight",
            "detr_encoder.layers.0.layer_norm1.weight",
            "detr_encoder.layers.0.layer_norm2.bias",
            "detr_encoder.layers.0.layer_norm3.weight",
        ] {
            assert_grad(&grads, &varmap, name);
        }
        for v in [&vision, &text] {
            let g = grads.get(v.as_tensor()).expect("input gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        // The padded prompt tokens of sample 1 receive no gradient.
        let gt = grads.get(text.as_tensor()).unwrap().get(1)?.narrow(0, 2, 3)?;
        assert_eq!(gt.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn dropout_only_in_training() -> Result<()> {
        let varmap = VarMap::new();
        let mut cfg = stack(1, None);
        cfg.dropout = 0.5;
        let enc = DetrEncoder::load(var_builder(&varmap), &cfg)?;
        randomize(&varmap)?;
        let vision = pseudo_random(&[1, 16, 2, 2], 5);
        let pos = pseudo_random(&[1, 16, 2, 2], 6);
        let text = pseudo_random(&[1, 3, 16], 7);
        let run = |train| {
            enc.forward(std::slice::from_ref(&vision), &text, std::slice::from_ref(&pos), None, train)
        };
        let a = run(false)?.last_hidden_state;
        let b = run(false)?.last_hidden_state;
        assert_eq!((&a - &b)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let c = run(true)?.last_hidden_state;
        assert!((&a - &c)?.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
