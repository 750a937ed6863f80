//! Peak-memory estimate of one training micro-batch, from the model config and the run's
//! shapes, before anything is allocated (`lorahost doctor`, F13).
//!
//! What lives at the peak (the end of the forward pass, when backward starts):
//! - the frozen weights in the compute dtype;
//! - candle's gradient store, which also receives a gradient for every frozen weight that takes
//!   part in a matmul (candle differentiates both operands) and keeps it to the end of backward:
//!   one tensor per base weight, in the weights' dtype;
//! - the LoRA state in f32: weights, gradients, two Adam moments, the accumulation buffer and
//!   the copy kept to roll a skipped step back (6 × the LoRA parameters);
//! - every intermediate tensor the autograd graph keeps alive, counted per component from the
//!   config: token-by-width activations of each transformer layer, the attention score
//!   matrices (the composed softmax keeps several of them per attention), the FPN maps, the
//!   mask head's upsampled maps and the per-query mask logits;
//! - the process itself (runtime, plugin engine, allocator slack): `base`.
//!
//! The per-kind multipliers come from counting the tensors our layers keep; they are checked
//! against measured CPU peaks by `tools/measure_memory.py` (table in BENCHMARKS.md). Status: the
//! estimate is within +12% / −39% of the measured peak on those cases (it misses part of the
//! per-query cost: backward's transient buffers and the loss), not yet the ±15% we aim for.

use crate::sam3::config::Sam3Config;
use candle_core::DType;
use serde::Serialize;

/// Elements retained per token-by-width unit of a transformer layer (q, k, v, attention
/// output, projections, norms, residuals).
const PER_TOKEN_WIDTH: f64 = 12.0;
/// Elements retained per token-by-MLP-hidden unit (fc1 output, activation, intermediates).
const PER_TOKEN_MLP: f64 = 3.0;
/// Copies of each attention score matrix kept by scaling, bias and the composed softmax.
const PER_SCORE: f64 = 6.0;
/// Copies of each FPN / mask-head map element (convolutions, norms, activations, upsampling).
const PER_MAP: f64 = 8.0;
/// Copies of each per-query mask logit (sigmoid, loss intermediates).
const PER_MASK_LOGIT: f64 = 3.0;
/// Process baseline on the CPU (binary, plugin engine, allocator), bytes.
pub const CPU_BASE: u64 = 80 << 20;

/// Raw element counts of one micro-batch, by kind (before the per-kind multipliers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Features {
    /// Σ tokens × width over transformer layers.
    pub token_width: f64,
    /// Σ tokens × MLP hidden.
    pub token_mlp: f64,
    /// Σ attention score elements.
    pub scores: f64,
    /// Σ convolution map elements (FPN, pixel decoder).
    pub maps: f64,
    /// Per-query mask logits (all queries at mask resolution).
    pub mask_logits: f64,
}

impl Features {
    /// Elements kept alive, with the calibrated multipliers.
    pub fn elements(&self) -> f64 {
        PER_TOKEN_WIDTH * self.token_width
            + PER_TOKEN_MLP * self.token_mlp
            + PER_SCORE * self.scores
            + PER_MAP * self.maps
            + PER_MASK_LOGIT * self.mask_logits
    }
}

/// The element counts of `images` images and `queries` (image, prompt) pairs.
pub fn features(c: &Sam3Config, images: usize, queries: usize) -> Features {
    let (i, q) = (images as f64, queries as f64);
    let v = &c.vision_config.backbone_config;
    let g = (v.image_size / v.patch_size.max(1)) as f64; // token grid side
    let t = g * g;
    let w = v.window_size.max(1) as f64;
    let padded = ((g / w).ceil() * w).powi(2);
    let mut f = Features::default();
    for layer in 0..v.num_hidden_layers {
        let global = v.global_attn_indexes.contains(&layer) || v.window_size == 0;
        let tokens = if global { t } else { padded };
        f.token_width += i * tokens * v.hidden_size as f64;
        f.token_mlp += i * tokens * v.intermediate_size as f64;
        f.scores += i * v.num_attention_heads as f64 * if global { t * t } else { padded * w * w };
    }
    let fpn = c.vision_config.fpn_hidden_size as f64;
    f.maps += i
        * (c.vision_config.scale_factors.iter().map(|s| fpn * (g * s).powi(2)).sum::<f64>()
            + v.hidden_size as f64 * t);
    let ctx = c.text_config.max_position_embeddings as f64;
    let tc = &c.text_config;
    for _ in 0..tc.num_hidden_layers {
        f.token_width += q * ctx * tc.hidden_size as f64;
        f.token_mlp += q * ctx * tc.intermediate_size as f64;
        f.scores += q * tc.num_attention_heads as f64 * ctx * ctx;
    }
    let e = &c.detr_encoder_config;
    for _ in 0..e.num_layers {
        f.token_width += q * t * e.hidden_size as f64;
        f.token_mlp += q * t * e.intermediate_size as f64;
        f.scores += q * e.num_attention_heads as f64 * (t * t + t * ctx);
    }
    let d = &c.detr_decoder_config;
    let n = 2.0 * d.num_queries.unwrap_or(200) as f64 + 1.0; // one-to-one + DAC one-to-many + presence
    for _ in 0..d.num_layers {
        f.token_width += q * n * d.hidden_size as f64;
        f.token_mlp += q * n * d.intermediate_size as f64;
        // Self, text and image cross-attention; box relative-position bias over the image.
        f.scores += q * d.num_attention_heads as f64 * (n * n + n * ctx + 1.5 * n * t);
    }
    let m = &c.mask_decoder_config;
    let cm = m.hidden_size as f64;
    let full = 4.0 * g; // mask resolution side
    f.maps += q
        * ((0..m.num_upsampling_stages).map(|s| cm * (g * 2f64.powi(s as i32)).powi(2)).sum::<f64>()
            + cm * full * full);
    f.scores += q * m.num_attention_heads as f64 * t * ctx;
    f.mask_logits += q * n * full * full;
    f
}

/// Elements of the activations of one micro-batch (see [`Features::elements`]).
pub fn activation_elements(c: &Sam3Config, images: usize, queries: usize) -> f64 {
    features(c, images, queries).elements()
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Frozen weights.
    pub weights: u64,
    /// Gradients candle computes for frozen weights.
    pub frozen_grads: u64,
    /// LoRA weights, gradients, moments, accumulation and rollback copies.
    pub lora_state: u64,
    /// Activations kept for backward.
    pub activations: u64,
    /// Process baseline (CPU) or CUDA context (GPU).
    pub base: u64,
    /// Sum: the predicted peak of a training micro-batch.
    pub total: u64,
}

/// The estimate for `base_params` frozen and `lora_params` trainable parameters with
/// activations in `dtype` (`cpu`: add the process baseline; else `cuda_context` bytes).
pub fn estimate(
    c: &Sam3Config,
    base_params: usize,
    lora_params: usize,
    images: usize,
    queries: usize,
    dtype: DType,
    base: u64,
) -> MemoryEstimate {
    let b = dtype.size_in_bytes() as f64;
    let weights = (base_params as f64 * b) as u64;
    let frozen_grads = (base_params as f64 * b) as u64;
    let lora_state = (lora_params as f64 * 4.0 * 6.0) as u64;
    let activations = (activation_elements(c, images, queries) * b) as u64;
    MemoryEstimate {
        weights,
        frozen_grads,
        lora_state,
        activations,
        base,
        total: weights + frozen_grads + lora_state + activations + base,
    }
}

/// The largest micro-batch (images, with `queries_per_image`) whose estimate fits in `budget`
/// bytes; 0 when not even one image fits.
pub fn max_batch(
    c: &Sam3Config,
    base_params: usize,
    lora_params: usize,
    queries_per_image: f64,
    dtype: DType,
    base: u64,
    budget: u64,
) -> usize {
    let mut best = 0;
    for bsz in 1..=256usize {
        let q = (bsz as f64 * queries_per_image).ceil() as usize;
        if estimate(c, base_params, lora_params, bsz, q, dtype, base).total > budget {
            break;
        }
        best = bsz;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_size() -> Sam3Config {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny_sam3/config.json");
        let (mut c, _) = Sam3Config::from_file(&p).unwrap();
        let v = &mut c.vision_config.backbone_config;
        (v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, v.num_hidden_layers) =
            (1008, 14, 1024, 4736, 32);
        (v.num_attention_heads, v.window_size, v.global_attn_indexes) = (16, 24, vec![7, 15, 23, 31]);
        c
    }

    #[test]
    fn memory_grows_with_batch_and_quadratically_with_global_attention() {
        let c = full_size();
        let one = activation_elements(&c, 1, 1);
        let two = activation_elements(&c, 2, 2);
        assert!((two / one - 2.0).abs() < 1e-9);
        let mut big = c.clone();
        big.vision_config.backbone_config.image_size = 2016;
        // Twice the side: 4x the tokens, 16x the global attention scores.
        assert!(activation_elements(&big, 1, 1) / one > 6.0);
        let e = estimate(&c, 840_000_000, 12_000_000, 2, 6, DType::BF16, 0);
        assert_eq!(e.weights, 1_680_000_000);
        assert!(e.total > e.weights + e.frozen_grads);
        assert!(max_batch(&c, 840_000_000, 12_000_000, 3.0, DType::BF16, 0, e.total) >= 2);
    }
}
