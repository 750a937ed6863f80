//! SAM3's text encoder: a CLIP text transformer (transformers' `CLIPTextModelWithProjection` at
//! `text_encoder`) followed by SAM3's resizer (`text_projection`, Linear text_hidden → d).
//!
//! Matches transformers: token + learned position embeddings; pre-norm layers
//! `x + Attn(LN1 x)`, `x + MLP(LN2 x)` with exact GELU (`hidden_act = "gelu"` in SAM3's config);
//! the attention mask is the causal mask **and** the key padding mask (`attention_mask`, 1 =
//! valid), as HF's `create_causal_mask` builds it; `final_layer_norm`; then every token's feature
//! goes through the resizer (no pooling — SAM3 uses the whole sequence as prompt tokens). Meta's
//! original passes no padding mask; with right padding this only changes the (masked) pad
//! positions. CLIP's own `text_projection` is loaded (so checkpoint coverage is complete) but unused.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::TextConfig;
use super::nn::{key_padding_bias, Activation, LayerNorm, Linear, Mlp, MultiHeadAttention, MASK_BIAS};

/// transformers' `CLIPTextConfig.projection_dim` default.
pub const CLIP_DEFAULT_PROJECTION_DIM: usize = 512;

/// One pre-norm CLIP encoder layer (`text_model.encoder.layers.{i}`).
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Self-attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
    pub self_attn: MultiHeadAttention,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
    /// `fc1 → GELU → fc2`.
    pub mlp: Mlp,
}

impl ClipEncoderLayer {
    /// Load from `text_model.encoder.layers.{i}`.
    pub fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            self_attn: MultiHeadAttention::load(vb.pp("self_attn"), d, cfg.num_attention_heads, "out_proj")?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            mlp: Mlp::load(vb.pp("mlp"), d, cfg.intermediate_size, Activation::from_name(&cfg.hidden_act)?)?,
        })
    }

    /// x (B, T, D); `bias` additive, broadcastable to (B, H, T, T).
    pub fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let x = (x + self.self_attn.forward(&h, &h, &h, Some(bias))?)?;
        let h = self.layer_norm2.forward(&x)?;
        &x + self.mlp.forward(&h)?
    }
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// CLIP's `last_hidden_state` (after `final_layer_norm`): (B, T, text_hidden).
    pub clip_last_hidden_state: Tensor,
    /// The resized prompt tokens SAM3 uses: (B, T, out_dim) (HF `get_text_features().pooler_output`).
    pub features: Tensor,
}

/// A prompt's tokens as the host holds them: the text cache's key (one row of `input_ids` and
/// its `attention_mask`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PromptKey {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Attention mask (nonzero = valid).
    pub mask: Vec<u8>,
}

impl PromptKey {
    /// The keys of a batch's rows from host-side ids and mask (row-major, `t` per row).
    pub fn rows(ids: &[i64], mask: &[i64], t: usize) -> Vec<PromptKey> {
        ids.chunks(t.max(1))
            .zip(mask.chunks(t.max(1)))
            .map(|(i, m)| PromptKey {
                ids: i.iter().map(|&v| v as u32).collect(),
                mask: m.iter().map(|&v| u8::from(v != 0)).collect(),
            })
            .collect()
    }
}

/// Prompts kept by the text cache before it starts over (each ~80 KB at SAM3's size in bf16).
pub const TEXT_CACHE_ENTRIES: usize = 1024;

/// The frozen text encoder's output per prompt (`clip_last_hidden_state` and `features` rows,
/// (T, ·) each). A clone starts empty: the clone's weights may be changed on their own.
#[derive(Debug, Default)]
pub struct TextCache {
    rows: std::sync::Mutex<std::collections::HashMap<PromptKey, (Tensor, Tensor)>>,
    misses: std::sync::atomic::AtomicUsize,
}

impl Clone for TextCache {
    fn clone(&self) -> Self {
        TextCache::default()
    }
}

impl TextCache {
    /// Prompts encoded because they were not cached (since load).
    pub fn misses(&self) -> usize {
        self.misses.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forget every cached prompt (after the encoder's weights change in place).
    pub fn clear(&self) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.clear();
        }
    }
}

/// Whether the text cache is on (`LORAHOST_TEXT_CACHE=0` switches it off; read once).
fn text_cache_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORAHOST_TEXT_CACHE").map_or(true, |v| v != "0"))
}

/// CLIP text transformer + SAM3 resizer.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    /// `text_encoder.text_model.embeddings.token_embedding.weight` (vocab, D), frozen lookup table.
    pub token_embedding: Tensor,
    /// `text_encoder.text_model.embeddings.position_embedding.weight` (max_pos, D).
    pub position_embedding: Tensor,
    /// `text_encoder.text_model.encoder.layers`.
    pub layers: Vec<ClipEncoderLayer>,
    /// `text_encoder.text_model.final_layer_norm`.
    pub final_layer_norm: LayerNorm,
    /// `text_encoder.text_projection.weight` (projection_dim, D): CLIP's pooled projection, unused
    /// by SAM3, held so that the checkpoint is consumed completely.
    pub clip_text_projection: Tensor,
    /// `text_projection` (top level): Linear D → out_dim (+bias), the resizer.
    pub resizer: Linear,
    /// Outputs per prompt while nothing in the encoder trains ([`TextEncoder::forward_cached`]).
    pub cache: TextCache,
}

impl TextEncoder {
    /// Load from the model root: reads `text_encoder.*` and `text_projection.*`.
    /// `out_dim` is the prompt width (`detr_encoder_config.hidden_size`).
    /// `text_encoder.text_projection.weight` is (projection_dim, D), projection_dim defaulting to
    /// 512 like transformers' `CLIPTextConfig`.
    pub fn load(root: VarBuilder, cfg: &TextConfig, out_dim: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let enc = root.pp("text_encoder");
        let tm = enc.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = emb.pp("token_embedding").get((cfg.vocab_size, d), "weight")?;
        let position_embedding =
            emb.pp("position_embedding").get((cfg.max_position_embeddings, d), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(tm.pp("encoder").pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(tm.pp("final_layer_norm"), d, cfg.layer_norm_eps)?;
        let projection_dim = cfg.projection_dim.unwrap_or(CLIP_DEFAULT_PROJECTION_DIM);
        let clip_text_projection = enc.pp("text_projection").get((projection_dim, d), "weight")?;
        let resizer = Linear::load(root.pp("text_projection"), d, out_dim, true)?;
        Ok(TextEncoder {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            clip_text_projection,
            resizer,
            cache: TextCache::default(),
        })
    }

    /// Text width (D).
    pub fn hidden_size(&self) -> usize {
        self.token_embedding.dim(1).unwrap_or(0)
    }

    /// Context length (rows of the position table).
    pub fn max_positions(&self) -> usize {
        self.position_embedding.dim(0).unwrap_or(0)
    }

    /// `input_ids` (B, T) integer ids (u32 or i64), `attention_mask` (B, T) with nonzero = valid
    /// (any dtype). T ≤ max_position_embeddings.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<TextOutput> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims() != [b, t] {
            candle_core::bail!(
                "attention_mask {:?} does not match input_ids {:?}",
                attention_mask.dims(),
                [b, t]
            );
        }
        if t > self.max_positions() {
            candle_core::bail!("text length {t} exceeds max_position_embeddings {}", self.max_positions());
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let d = self.hidden_size();
        let tok = self.token_embedding.index_select(&ids, 0)?.reshape((b, t, d))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        let bias = causal_padding_bias(attention_mask)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        let clip_last_hidden_state = self.final_layer_norm.forward(&x)?;
        let features = self.resizer.forward(&clip_last_hidden_state)?;
        Ok(TextOutput { clip_last_hidden_state, features })
    }
}

impl TextEncoder {
    /// Whether any linear layer of the encoder trains (a LoRA adapter or a tracked weight).
    pub fn trains(&self) -> bool {
        use super::visit::VisitLinears;
        // The visitor wants `&mut`; a clone shares the tensors.
        let (mut probe, mut any) = (self.clone(), false);
        probe.visit_linears(&mut |l| any |= l.lora.is_some() || l.weight.track_op());
        any || self.token_embedding.track_op() || self.position_embedding.track_op()
    }

    /// [`Self::forward`] through the text cache: with `keys` (the host's copy of each row) and
    /// nothing in the encoder training, a prompt seen before costs no computation — a frozen
    /// encoder's output depends only on its tokens, and fine-tuning data repeats a few class
    /// names as prompts. Rows not cached are encoded as one batch (each distinct prompt once)
    /// and kept, detached. Without keys, while the encoder trains, or with
    /// `LORAHOST_TEXT_CACHE=0`: the plain forward.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        keys: Option<&[PromptKey]>,
    ) -> Result<TextOutput> {
        let b = input_ids.dim(0)?;
        let keys = match keys {
            Some(k) if k.len() == b && b > 0 && text_cache_enabled() && !self.trains() => k,
            _ => return self.forward(input_ids, attention_mask),
        };
        let Ok(mut rows) = self.cache.rows.lock() else { return self.forward(input_ids, attention_mask) };
        let missing_rows = |rows: &std::collections::HashMap<PromptKey, (Tensor, Tensor)>| {
            let mut missing: Vec<usize> = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                if !rows.contains_key(k) && !missing.iter().any(|&j| keys[j] == *k) {
                    missing.push(i);
                }
            }
            missing
        };
        let mut missing = missing_rows(&rows);
        if rows.len() + missing.len() > TEXT_CACHE_ENTRIES {
            rows.clear();
            missing = missing_rows(&rows);
            if missing.len() > TEXT_CACHE_ENTRIES {
                drop(rows);
                return self.forward(input_ids, attention_mask);
            }
        }
        // Each prompt encoded on its own: its cached output does not depend on which batch
        // first met it, so a resumed run reads the values the uninterrupted one did.
        for &i in &missing {
            let out = self.forward(&input_ids.narrow(0, i, 1)?, &attention_mask.narrow(0, i, 1)?)?;
            let row = (out.clip_last_hidden_state.get(0)?.detach(), out.features.get(0)?.detach());
            rows.insert(keys[i].clone(), row);
        }
        self.cache.misses.fetch_add(missing.len(), std::sync::atomic::Ordering::Relaxed);
        let (mut clip, mut features) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for k in keys {
            let Some((c, f)) = rows.get(k) else { candle_core::bail!("text cache: a row went missing") };
            clip.push(c);
            features.push(f);
        }
        Ok(TextOutput {
            clip_last_hidden_state: Tensor::stack(&clip, 0)?,
            features: Tensor::stack(&features, 0)?,
        })
    }
}

/// (B, 1, T, T) additive bias: 0 where key j ≤ query i and key j is valid, [`MASK_BIAS`] otherwise
/// (one value for both reasons, like HF's boolean-AND mask → `finfo.min`).
pub fn causal_padding_bias(attention_mask: &Tensor) -> Result<Tensor> {
    let (_, t) = attention_mask.dims2()?;
    let causal: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { MASK_BIAS as f32 })).collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), attention_mask.device())?;
    let valid = attention_mask.ne(0f64)?;
    causal.broadcast_minimum(&key_padding_bias(&valid)?)
}

/// Shared by the text and geometry tests: transformers parity fixtures under
/// `tests/fixtures/sam3/<name>/` (outputs may be stored as aliases, see its README).
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::sam3::config::Sam3Config;
    use crate::sam3::weights::{open_dir, Checkpoint};
    use candle_core::{DType, Device, Result, Tensor};
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    /// A loaded fixture directory.
    pub(crate) struct Fixture {
        pub cfg: Sam3Config,
        pub ckpt: Checkpoint,
        inputs: HashMap<String, Tensor>,
        outputs: HashMap<String, Tensor>,
        aliases: HashMap<String, String>,
    }

    pub(crate) fn dir(name: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sam3")).join(name)
    }

    fn aliases(path: &Path) -> HashMap<String, String> {
        let bytes = std::fs::read(path).expect("read outputs.safetensors");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
        header
            .get("__metadata__")
            .and_then(|m| m.get("aliases"))
            .and_then(|a| a.as_str())
            .map(|a| serde_json::from_str(a).expect("aliases JSON"))
            .unwrap_or_default()
    }

    impl Fixture {
        pub(crate) fn load(name: &str) -> Fixture {
            let d = dir(name);
            let (cfg, ckpt) = open_dir(&d).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
            let inputs = candle_core::safetensors::load(d.join("inputs.safetensors"), &Device::Cpu).unwrap();
            let outputs =
                candle_core::safetensors::load(d.join("outputs.safetensors"), &Device::Cpu).unwrap();
            let aliases = aliases(&d.join("outputs.safetensors"));
            Fixture { cfg, ckpt, inputs, outputs, aliases }
        }

        /// A tensor of inputs.safetensors.
        pub(crate) fn input(&self, name: &str) -> Tensor {
            self.inputs.get(name).unwrap_or_else(|| panic!("no input {name}")).clone()
        }

        /// A tensor of outputs.safetensors, following aliases.
        pub(crate) fn output(&self, name: &str) -> Tensor {
            if let Some(t) = self.outputs.get(name) {
                return t.clone();
            }
            match self.aliases.get(name) {
                Some(target) => match target.strip_prefix("inputs:") {
                    Some(i) => self.input(i),
                    None => self.output(target),
                },
                None => panic!("no output {name}"),
            }
        }

        pub(crate) fn vb(&self) -> candle_nn::VarBuilder<'static> {
            self.ckpt.var_builder(DType::F32, &Device::Cpu)
        }
    }

    /// Checks that loading through `load` (a VarMap-backed builder at the model root) requests
    /// exactly the checkpoint tensors whose names start with one of `prefixes`, with their shapes.
    pub(crate) fn assert_covers(
        name: &str,
        prefixes: &[&str],
        load: impl FnOnce(candle_nn::VarBuilder<'static>) -> Result<()>,
    ) -> Result<()> {
        let stored = candle_core::safetensors::load(dir(name).join("model.safetensors"), &Device::Cpu)?;
        let mut want: Vec<(String, Vec<usize>)> = stored
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        let varmap = candle_nn::VarMap::new();
        load(candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        let mut got: Vec<(String, Vec<usize>)> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        want.sort();
        got.sort();
        assert!(!want.is_empty());
        assert_eq!(got, want, "{name}: requested tensors differ from the checkpoint's {prefixes:?}");
        Ok(())
    }

    /// max |got − want| after checking shapes; asserts ≤ 1e-4 · max(1, max |want|).
    pub(crate) fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> Result<f32> {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let got = got.to_dtype(DType::F32)?;
        let want = want.to_dtype(DType::F32)?;
        let diff = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        eprintln!("{what}: max|diff| = {diff:.3e} (max|ref| {scale:.3})");
        assert!(diff <= 1e-4 * scale, "{what}: max|diff| {diff} > {}", 1e-4 * scale);
        Ok(diff)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{assert_close, assert_covers, Fixture};
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn causal_and_padding_masks_combine() -> Result<()> {
        let m = Tensor::new(&[[1i64, 1, 0]], &Device::Cpu)?;
        let b = causal_padding_bias(&m)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        let k = MASK_BIAS as f32;
        assert_eq!(b, vec![vec![0.0, k, k], vec![0.0, 0.0, k], vec![0.0, 0.0, k]]);
        Ok(())
    }

    fn parity(name: &str) -> Result<()> {
        let fx = Fixture::load(name);
        let enc = TextEncoder::load(fx.vb(), &fx.cfg.text_config, fx.cfg.detr_encoder_config.hidden_size)?;
        let out = enc.forward(&fx.input("input_ids"), &fx.input("attention_mask"))?;
        assert_close(
            &format!("{name} text.clip_last_hidden_state"),
            &out.clip_last_hidden_state,
            &fx.output("text.clip_last_hidden_state"),
        )?;
        assert_close(&format!("{name} text.features"), &out.features, &fx.output("text.features"))?;
        // u32 ids give the same result as i64 ones.
        let ids32 = fx.input("input_ids").to_dtype(DType::U32)?;
        let again = enc.forward(&ids32, &fx.input("attention_mask"))?;
        assert_close(&format!("{name} text.features (u32 ids)"), &again.features, &out.features)?;
        Ok(())
    }

    #[test]
    fn text_parity_tiny_a() -> Result<()> {
        parity("tiny_a")
    }

    #[test]
    fn text_parity_tiny_b() -> Result<()> {
        parity("tiny_b")
    }

    #[test]
    fn text_gradients_reach_last_layer_and_resizer() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = TextConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            projection_dim: Some(4),
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        };
        let varmap = VarMap::new();
        TextEncoder::load(candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg, 4)?;
        for var in varmap.all_vars() {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &dev)?)?;
        }
        let enc = TextEncoder::load(candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg, 4)?;
        let ids = Tensor::new(&[[14u32, 3, 5, 15, 15], [14, 7, 15, 15, 15]], &dev)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &dev)?;
        let out = enc.forward(&ids, &mask)?;
        assert_eq!(out.features.dims(), &[2, 5, 4]);
        assert_eq!(out.clip_last_hidden_state.dims(), &[2, 5, 8]);
        let proj = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev)?;
        let grads = (out.features * proj)?.sum_all()?.backward()?;
        let data = varmap.data().lock().unwrap();
        let grad_norm = |name: &str| -> f32 {
            let v: &Var = data.get(name).unwrap_or_else(|| panic!("no var {name}"));
            grads.get(v.as_tensor()).map_or(0.0, |g| g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap())
        };
        for name in [
            "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.weight",
            "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.weight",
            "text_encoder.text_model.encoder.layers.1.layer_norm1.weight",
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.weight",
            "text_encoder.text_model.encoder.layers.1.mlp.fc2.bias",
            "text_encoder.text_model.final_layer_norm.weight",
            "text_encoder.text_model.embeddings.position_embedding.weight",
            "text_projection.weight",
            "text_projection.bias",
        ] {
            assert!(grad_norm(name) > 0.0, "{name} has no gradient");
        }
        // CLIP's own projection is loaded but dead, as in SAM3.
        assert_eq!(grad_norm("text_encoder.text_projection.weight"), 0.0);
        Ok(())
    }

    #[test]
    fn text_cache_serves_repeated_prompts_and_steps_aside_while_training() -> Result<()> {
        let fx = Fixture::load("tiny_a");
        let mut enc =
            TextEncoder::load(fx.vb(), &fx.cfg.text_config, fx.cfg.detr_encoder_config.hidden_size)?;
        let (ids, mask) = (fx.input("input_ids"), fx.input("attention_mask"));
        let flat = |t: &Tensor| t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>();
        let keys = PromptKey::rows(&flat(&ids)?, &flat(&mask)?, ids.dim(1)?);
        assert!(keys.len() == 2 && keys[0] != keys[1]);
        let want = enc.forward(&ids, &mask)?;
        // Repeated and reordered rows: each distinct prompt encoded once, rows where they belong.
        let order = Tensor::new(&[0u32, 1, 1, 0], &Device::Cpu)?;
        let keys4 = vec![keys[0].clone(), keys[1].clone(), keys[1].clone(), keys[0].clone()];
        let got =
            enc.forward_cached(&ids.index_select(&order, 0)?, &mask.index_select(&order, 0)?, Some(&keys4))?;
        assert_close("cached features", &got.features, &want.features.index_select(&order, 0)?)?;
        assert_close(
            "cached CLIP states",
            &got.clip_last_hidden_state,
            &want.clip_last_hidden_state.index_select(&order, 0)?,
        )?;
        assert_eq!(enc.cache.misses(), 2);
        let again = enc.forward_cached(&ids, &mask, Some(&keys))?;
        assert_close("cache hit", &again.features, &want.features)?;
        assert_eq!(enc.cache.misses(), 2);
        // A clone starts empty (its weights may change on their own).
        let clone = enc.clone();
        clone.forward_cached(&ids, &mask, Some(&keys))?;
        assert_eq!(clone.cache.misses(), 2);
        // While a weight trains the cache steps aside: gradients must reach it.
        enc.resizer.weight = candle_core::Var::from_tensor(&enc.resizer.weight)?.as_tensor().clone();
        assert!(enc.trains());
        let trained = enc.forward_cached(&ids, &mask, Some(&keys))?;
        assert!(trained.features.track_op());
        assert_eq!(enc.cache.misses(), 2);
        Ok(())
    }

    #[test]
    fn padding_does_not_change_valid_tokens() -> Result<()> {
        let fx = Fixture::load("tiny_a");
        let enc = TextEncoder::load(fx.vb(), &fx.cfg.text_config, fx.cfg.detr_encoder_config.hidden_size)?;
        let ids = fx.input("input_ids");
        let mask = fx.input("attention_mask");
        // Sample 1 has 5 valid tokens: its features there must not depend on the pad ids.
        let base = enc.forward(&ids, &mask)?.features.get(1)?.narrow(0, 0, 5)?;
        let other =
            Tensor::cat(&[ids.get(1)?.narrow(0, 0, 5)?, Tensor::new(&[3i64, 4, 5], &Device::Cpu)?], 0)?;
        let got = enc
            .forward(&other.unsqueeze(0)?, &mask.get(1)?.unsqueeze(0)?)?
            .features
            .get(0)?
            .narrow(0, 0, 5)?;
        assert_close("valid tokens with other pads", &got, &base)?;
        Ok(())
    }

    #[test]
    fn loads_every_text_tensor_of_the_checkpoint() -> Result<()> {
        for name in ["tiny_a", "tiny_b"] {
            let cfg = Fixture::load(name).cfg;
            assert_covers(name, &["text_encoder.", "text_projection."], |vb| {
                TextEncoder::load(vb, &cfg.text_config, cfg.detr_encoder_config.hidden_size).map(|_| ())
            })?;
        }
        Ok(())
    }
}
