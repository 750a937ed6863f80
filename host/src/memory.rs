//! Peak-memory estimate of one training micro-batch, from the model config and the run's
//! shapes, before anything is allocated (`lorahost doctor`, F13), and of the host memory of
//! the run (checkpoint load, data pipeline).
//!
//! What lives at the peak (during backward):
//! - the frozen weights in the compute dtype (linear layers never get a weight gradient, and an
//!   adapted linear keeps only its input and dropout mask: [`crate::sam3::frozen`]);
//! - the LoRA state in f32: weights, gradients, two Adam moments, the accumulation buffer and
//!   the copy kept to roll a skipped step back (6 × the LoRA parameters);
//! - the forward graph: every intermediate autograd keeps for backward, counted per part of
//!   the model ([`Part`]) from the config as element counts of a few kinds ([`Features`]: token
//!   × width, token × MLP, attention scores, maps, image memory × width, mask logits) times
//!   per-part multipliers. Only parts with an adapter at or upstream of them record anything
//!   ([`Adapted`]); attention keeps no score matrix ([`crate::sam3::attention`]); checkpointed
//!   ViT blocks keep only their inputs ([`crate::sam3::recompute`]);
//! - backward's own peak: a share of the graph (gradients of untracked operands, transients)
//!   plus the f32 score chunk of the largest attention being recomputed (and one ViT block's
//!   graph when the blocks are checkpointed);
//! - the process itself: `base`.
//!
//! The multipliers are least-squares fits to CPU heap measurements taken by the counting
//! allocator after each part's forward and at the step's peak (`tools/measure_memory.py`; the
//! table and the leave-one-out errors are in BENCHMARKS.md).

use crate::sam3::config::Sam3Config;
use crate::sam3::vit_block::Checkpointing;
use candle_core::{DType, Device, Shape, Tensor};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// A part of the model whose forward graph is counted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// ViT backbone and FPN neck (per image).
    Vision,
    /// The FPN maps and their position encodings gathered per query.
    QueryImage,
    /// CLIP text encoder (per query).
    Text,
    /// Geometry encoder and DETR encoder (per query).
    DetrEncoder,
    /// DETR decoder and scoring (per query).
    DetrDecoder,
    /// Mask head and the loss (per query).
    MaskHead,
}

impl Part {
    /// Bytes kept per element of each kind of [`Features`] (in units of the compute dtype's
    /// size), fitted per part against the forward graphs measured on the CPU by
    /// `tools/measure_memory.py` (the counting allocator's live heap after each part).
    fn multipliers(self) -> Features {
        let f = |token_width, token_mlp, scores, maps, memory_width, mask_logits| Features {
            token_width,
            token_mlp,
            scores,
            maps,
            memory_width,
            mask_logits,
        };
        match self {
            Part::Vision => f(VISION.0, VISION.1, VISION.2, VISION.3, 0.0, 0.0),
            Part::QueryImage => f(0.0, 0.0, 0.0, QUERY_IMAGE, 0.0, 0.0),
            Part::Text => f(TEXT.0, TEXT.1, TEXT.2, 0.0, 0.0, 0.0),
            Part::DetrEncoder => f(ENCODER.0, ENCODER.1, ENCODER.2, 0.0, 0.0, 0.0),
            Part::DetrDecoder => f(DECODER.0, DECODER.1, DECODER.2, 0.0, DECODER.3, 0.0),
            Part::MaskHead => f(0.0, 0.0, MASK.0, MASK.1, 0.0, MASK.2),
        }
    }
}

/// Fitted multipliers: (token × width, token × MLP, attention scores, maps).
const VISION: (f64, f64, f64, f64) = (19.26, 0.0, 0.0, 2.61);
/// Per gathered map element.
const QUERY_IMAGE: f64 = 1.00;
/// (token × width, token × MLP, attention scores): a transformer layer's multipliers scaled to
/// the one measured case with text adapters (`tools/measure_memory.py`).
const TEXT: (f64, f64, f64) = (13.34, 0.53, 0.0);
/// (token × width, token × MLP, attention scores).
const ENCODER: (f64, f64, f64) = (25.21, 1.00, 0.0);
/// (query token × width, query token × MLP, attention scores, image memory × width).
const DECODER: (f64, f64, f64, f64) = (37.05, 1.45, 0.60, 3.40);
/// (attention scores, maps, mask logits).
const MASK: (f64, f64, f64) = (25.17, 3.30, 1.31);
/// Backward keeps the forward graph alive and adds, at its peak, this share of it: gradients
/// candle stores for untracked operands a tracked tensor met (loss targets; not frozen
/// convolution kernels, position encodings or dropout masks, see
/// [`crate::sam3::frozen::frozen_conv3x3`], [`crate::sam3::ops::add_constant`]) until backward
/// ends, plus the pass's transients (fitted, `tools/measure_memory.py`).
const BACKWARD: f64 = 0.403;
/// On CUDA, the same share for the (not checkpointed) ViT blocks' graph: their ops run
/// lorahost's fused kernels there (LayerNorm, activation/dropout, RoPE, input gradients), whose
/// backward makes few transients. Fitted to the H200 peaks of the bench workload at batch 2, 4
/// and 8 (2026-11-27: 19.5, 36.8, 71.4 GiB, blocks recorded op by op), the rest of the graph
/// keeping [`BACKWARD`] (which the checkpointed runs' peaks confirm).
const BACKWARD_VIT_CUDA: f64 = 0.06;
/// On CUDA, the share of the op-by-op ViT blocks' graph (the CPU-fitted [`VISION`] elements)
/// that each block kept as one op ([`crate::sam3::vit_block`]) keeps: q, k, v, the attention
/// output, the residual sum and fc1's output, without the LayerNorm outputs or candle's
/// intermediate sums. Fitted to the H200 peaks of 2026-11-28 at batch 2, 4 and 8 (16.5, 30.7,
/// 59.0 GiB; BENCHMARKS.md "GPU training"; each alone fits 0.81, 0.82, 0.83). Off with
/// `LORAHOST_VIT_BLOCK_OP=0`.
const VIT_OP_CUDA: f64 = 0.82;
/// The ViT's token grid: its side g (g² tokens per image) and the tokens of the grid padded
/// to whole windows (what a window block attends over).
fn vit_grid(c: &Sam3Config) -> (f64, f64) {
    let v = &c.vision_config.backbone_config;
    let g = (v.image_size / v.patch_size.max(1)) as f64;
    let w = v.window_size.max(1) as f64;
    (g, ((g / w).ceil() * w).powi(2))
}

/// Whether ViT block `layer` attends over the whole image (else over windows).
fn vit_global(c: &Sam3Config, layer: usize) -> bool {
    let v = &c.vision_config.backbone_config;
    v.global_attn_indexes.contains(&layer) || v.window_size == 0
}

/// The dropout masks (u8) the ViT blocks' adapted linears keep for backward when the masks are
/// drawn into bytes, bytes: per token and block, one per input entry of q, k, v, the output
/// projection, fc1 (width each) and fc2 (MLP width) — the case [`VIT_OP_CUDA`] was fitted on
/// (all six adapted, dropout 0.1). With the masks left to the kernels
/// ([`crate::rng::keep_mask_for_kernels`], CUDA's default) none of them is kept, and the
/// estimate subtracts them from that fit (derived, not yet measured on a GPU).
fn vit_mask_bytes(c: &Sam3Config, images: usize) -> f64 {
    let v = &c.vision_config.backbone_config;
    let (g, padded) = vit_grid(c);
    (0..v.num_hidden_layers)
        .map(|layer| {
            let tokens = if vit_global(c, layer) { g * g } else { padded };
            images as f64 * tokens * (5 * v.hidden_size + v.intermediate_size) as f64
        })
        .sum()
}

/// The elements of each ViT block's fc1 output (tokens × MLP width), what
/// [`Checkpointing::Mlp`] recomputes in backward instead of keeping.
fn vit_fc1_elements(c: &Sam3Config, images: usize) -> Vec<f64> {
    let v = &c.vision_config.backbone_config;
    let (g, _) = vit_grid(c);
    (0..v.num_hidden_layers).map(|_| images as f64 * g * g * v.intermediate_size as f64).collect()
}

/// f32 copies of the largest attention's score chunk alive while the lean attention's backward
/// recomputes it (probabilities, dP, dS and their casts; fitted on the CPU).
const ATTENTION_TRANSIENT: f64 = 2.85;
/// The same in bf16 / f16 (CUDA), where the chunk stays in the compute dtype: P, dP, dP − δ
/// and dS are alive at the peak (counted from the code, not fitted: no GPU measurement yet).
const ATTENTION_TRANSIENT_HALF: f64 = 4.0;
/// Process baseline on the CPU beyond the heap (binary, shared libraries, plugin engine), bytes.
pub const CPU_BASE: u64 = 20 << 20;

/// Which components carry LoRA adapters. Autograd records a part's intermediates only when a
/// trainable tensor is upstream of it, so the graph starts at the first adapted component:
/// without ViT adapters the backbone keeps nothing for backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Adapted {
    /// ViT backbone / neck.
    pub vision: bool,
    /// CLIP text encoder.
    pub text: bool,
    /// Geometry (prompt) encoder.
    pub geometry: bool,
    /// DETR encoder.
    pub detr_encoder: bool,
    /// DETR decoder and scoring.
    pub detr_decoder: bool,
    /// Mask head.
    pub mask_head: bool,
}

impl Adapted {
    /// Every component adapted.
    pub fn all() -> Self {
        Adapted {
            vision: true,
            text: true,
            geometry: true,
            detr_encoder: true,
            detr_decoder: true,
            mask_head: true,
        }
    }

    /// From the components of the adapted modules.
    pub fn of(components: impl IntoIterator<Item = crate::lora::Component>) -> Self {
        use crate::lora::Component as C;
        let mut a = Adapted::default();
        for c in components {
            match c {
                C::Vision => a.vision = true,
                C::Text => a.text = true,
                C::Geometry => a.geometry = true,
                C::DetrEncoder => a.detr_encoder = true,
                C::DetrDecoder => a.detr_decoder = true,
                C::MaskDecoder => a.mask_head = true,
            }
        }
        a
    }

    /// Whether `part` runs on tracked tensors (it or something upstream is adapted).
    pub fn tracks(&self, part: Part) -> bool {
        let encoder = self.vision || self.text || self.geometry || self.detr_encoder;
        let decoder = encoder || self.detr_decoder;
        match part {
            Part::Vision => self.vision,
            // The gathered maps feed the encoder and the mask head: kept whenever those record.
            Part::QueryImage => decoder || self.mask_head,
            Part::Text => self.text,
            Part::DetrEncoder => encoder,
            Part::DetrDecoder => decoder,
            Part::MaskHead => decoder || self.mask_head,
        }
    }
}

/// The run-level inputs of the estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunShape {
    /// Frozen parameters.
    pub base_params: usize,
    /// Trainable (LoRA) parameters.
    pub lora_params: usize,
    /// Compute dtype of the frozen model and activations.
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    /// Components with adapters.
    pub adapted: Adapted,
    /// What the ViT blocks keep for backward (`full`: recomputed in backward; `mlp`: fc1's
    /// output recomputed).
    pub vision_checkpointing: Checkpointing,
    /// Process baseline ([`CPU_BASE`]) or CUDA context, bytes.
    pub base: u64,
    /// Trains on CUDA (lorahost's fused kernels: see [`BACKWARD_VIT_CUDA`]).
    pub cuda: bool,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}").to_lowercase())
}

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
    /// Σ image-memory tokens × width seen by cross-attention (the decoder's keys and values).
    pub memory_width: f64,
    /// Per-query mask logits (all queries at mask resolution).
    pub mask_logits: f64,
}

impl Features {
    fn dot(&self, m: &Features) -> f64 {
        self.token_width * m.token_width
            + self.token_mlp * m.token_mlp
            + self.scores * m.scores
            + self.maps * m.maps
            + self.memory_width * m.memory_width
            + self.mask_logits * m.mask_logits
    }
}

/// The element counts of `images` images and `queries` (image, prompt) pairs, per part.
pub fn features_by_part(c: &Sam3Config, images: usize, queries: usize) -> Vec<(Part, Features)> {
    let (i, q) = (images as f64, queries as f64);
    let v = &c.vision_config.backbone_config;
    let (g, padded) = vit_grid(c); // token grid side, padded window grid
    let t = g * g;
    let w = v.window_size.max(1) as f64;
    let mut vision = Features::default();
    for layer in 0..v.num_hidden_layers {
        let global = vit_global(c, layer);
        let tokens = if global { t } else { padded };
        vision.token_width += i * tokens * v.hidden_size as f64;
        vision.token_mlp += i * tokens * v.intermediate_size as f64;
        vision.scores += i * v.num_attention_heads as f64 * if global { t * t } else { padded * w * w };
    }
    let fpn = c.vision_config.fpn_hidden_size as f64;
    vision.maps = i
        * (c.vision_config.scale_factors.iter().map(|s| fpn * (g * s).powi(2)).sum::<f64>()
            + v.hidden_size as f64 * t);
    // The used FPN levels (all but the coarsest) and their position encodings, per query.
    let used = c.vision_config.scale_factors.len().saturating_sub(1).max(1);
    let query_image = Features {
        maps: 2.0
            * q
            * c.vision_config.scale_factors.iter().take(used).map(|s| fpn * (g * s).powi(2)).sum::<f64>(),
        ..Features::default()
    };
    let ctx = c.text_config.max_position_embeddings as f64;
    let tc = &c.text_config;
    let mut text = Features::default();
    for _ in 0..tc.num_hidden_layers {
        text.token_width += q * ctx * tc.hidden_size as f64;
        text.token_mlp += q * ctx * tc.intermediate_size as f64;
        text.scores += q * tc.num_attention_heads as f64 * ctx * ctx;
    }
    let e = &c.detr_encoder_config;
    let mut encoder = Features::default();
    for _ in 0..e.num_layers {
        encoder.token_width += q * t * e.hidden_size as f64;
        encoder.token_mlp += q * t * e.intermediate_size as f64;
        encoder.scores += q * e.num_attention_heads as f64 * (t * t + t * ctx);
    }
    let d = &c.detr_decoder_config;
    let n = 2.0 * d.num_queries.unwrap_or(200) as f64 + 1.0; // one-to-one + DAC one-to-many + presence
    let mut decoder = Features::default();
    for _ in 0..d.num_layers {
        decoder.token_width += q * n * d.hidden_size as f64;
        decoder.memory_width += q * t * d.hidden_size as f64;
        decoder.token_mlp += q * n * d.intermediate_size as f64;
        // Self, text and image cross-attention; box relative-position bias over the image.
        decoder.scores += q * d.num_attention_heads as f64 * (n * n + n * ctx + 1.5 * n * t);
    }
    let m = &c.mask_decoder_config;
    let cm = m.hidden_size as f64;
    let full = 4.0 * g; // mask resolution side
    let mask = Features {
        maps: q
            * ((0..m.num_upsampling_stages).map(|s| cm * (g * 2f64.powi(s as i32)).powi(2)).sum::<f64>()
                + cm * full * full),
        scores: q * m.num_attention_heads as f64 * t * ctx,
        mask_logits: q * n * full * full,
        ..Features::default()
    };
    vec![
        (Part::Vision, vision),
        (Part::QueryImage, query_image),
        (Part::Text, text),
        (Part::DetrEncoder, encoder),
        (Part::DetrDecoder, decoder),
        (Part::MaskHead, mask),
    ]
}

/// Elements of the forward graph of one micro-batch kept for backward.
pub fn activation_elements(c: &Sam3Config, adapted: &Adapted, images: usize, queries: usize) -> f64 {
    features_by_part(c, images, queries)
        .iter()
        .filter(|(p, _)| adapted.tracks(*p))
        .map(|(p, f)| f.dot(&p.multipliers()))
        .sum()
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Frozen weights.
    pub weights: u64,
    /// LoRA weights, gradients, moments, accumulation and rollback copies.
    pub lora_state: u64,
    /// Activations kept for backward (the forward graph).
    pub activations: u64,
    /// Backward's own peak on top of the graph: gradients of untracked operands and
    /// transients.
    pub backward: u64,
    /// Process baseline (CPU) or CUDA context (GPU).
    pub base: u64,
    /// Sum: the predicted peak of a training micro-batch.
    pub total: u64,
}

/// Score elements of the largest single attention of a micro-batch (what one chunk of the lean
/// attention holds, at most [`crate::sam3::attention::CHUNK_ELEMENTS`]).
pub fn largest_attention(c: &Sam3Config, adapted: &Adapted, images: usize, queries: usize) -> f64 {
    let (i, q) = (images as f64, queries as f64);
    let v = &c.vision_config.backbone_config;
    let (g, padded) = vit_grid(c);
    let t = g * g;
    let mut biggest: f64 = 0.0;
    if adapted.tracks(Part::Vision) {
        let global = !v.global_attn_indexes.is_empty() || v.window_size == 0;
        let w = v.window_size.max(1) as f64;
        let window = i * v.num_attention_heads as f64 * padded * w * w;
        biggest = biggest.max(if global { i * v.num_attention_heads as f64 * t * t } else { window });
    }
    if adapted.tracks(Part::DetrEncoder) {
        biggest = biggest.max(q * c.detr_encoder_config.num_attention_heads as f64 * t * t);
    }
    if adapted.tracks(Part::DetrDecoder) {
        let d = &c.detr_decoder_config;
        let n = 2.0 * d.num_queries.unwrap_or(200) as f64 + 1.0;
        biggest = biggest.max(q * d.num_attention_heads as f64 * n * t);
    }
    biggest.min(crate::sam3::attention::CHUNK_ELEMENTS as f64)
}

/// Elements of the ViT's graph with checkpointed blocks: each block keeps its input, and
/// backward holds one block's full graph while recomputing it.
fn checkpointed_vision(c: &Sam3Config, images: usize) -> (f64, f64) {
    let v = &c.vision_config.backbone_config;
    let (g, padded) = vit_grid(c);
    let tokens = padded.max(g * g) * images as f64;
    let kept = v.num_hidden_layers as f64 * tokens * v.hidden_size as f64;
    let one_block = tokens * (VISION.0 * v.hidden_size as f64 + VISION.1 * v.intermediate_size as f64);
    (kept, one_block)
}

/// Bytes per score element of the lean attention's backward transient (see
/// [`crate::sam3::attention`]: half-precision runs keep the chunk in their dtype).
fn attention_transient_bytes(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 | DType::F16 => ATTENTION_TRANSIENT_HALF * dtype.size_in_bytes() as f64,
        _ => ATTENTION_TRANSIENT * 4.0,
    }
}

/// The estimate of a micro-batch of `images` images and `queries` (image, prompt) pairs.
pub fn estimate(c: &Sam3Config, run: &RunShape, images: usize, queries: usize) -> MemoryEstimate {
    let b = run.dtype.size_in_bytes() as f64;
    let weights = (run.base_params as f64 * b) as u64;
    let lora_state = (run.lora_params as f64 * 4.0 * 6.0) as u64;
    let mut graph = activation_elements(c, &run.adapted, images, queries);
    let mut recompute = 0.0;
    // Elements of the graph whose backward share is BACKWARD_VIT_CUDA instead of BACKWARD.
    let mut lean = 0.0;
    if run.adapted.tracks(Part::Vision) {
        let parts = features_by_part(c, images, queries);
        let vit = &parts[0].1;
        let vit_blocks = vit.dot(&Features { maps: 0.0, ..Part::Vision.multipliers() });
        if run.vision_checkpointing == Checkpointing::Full {
            let (kept, one_block) = checkpointed_vision(c, images);
            graph += kept - vit_blocks;
            recompute = one_block;
        } else if run.cuda {
            lean = vit_blocks;
            if crate::sam3::vit_block::enabled() {
                graph -= vit_blocks * (1.0 - VIT_OP_CUDA);
                let mut dropped = 0.0;
                if crate::rng::counter_masks() {
                    dropped += vit_mask_bytes(c, images) / b;
                }
                if run.vision_checkpointing == Checkpointing::Mlp {
                    // fc1's output, recomputed in backward (one block's at a time).
                    let one = vit_fc1_elements(c, images);
                    dropped += one.iter().sum::<f64>();
                    recompute = one.iter().copied().fold(0.0, f64::max);
                }
                graph -= dropped;
                lean -= dropped;
            }
        }
    }
    let activations = (graph * b) as u64;
    let backward = ((graph - lean) * b * BACKWARD
        + lean * b * BACKWARD_VIT_CUDA
        + recompute * b
        + attention_transient_bytes(run.dtype) * largest_attention(c, &run.adapted, images, queries))
        as u64;
    MemoryEstimate {
        weights,
        lora_state,
        activations,
        backward,
        base: run.base,
        total: weights + lora_state + activations + backward + run.base,
    }
}

/// What the host-memory estimate needs to know about the data and the checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HostInputs {
    /// Bytes of the annotation files (train and validation).
    pub annotation_bytes: u64,
    /// Pixels of the largest image.
    pub max_image_pixels: u64,
    /// Objects of the most crowded image.
    pub max_objects: usize,
    /// Images per micro-batch.
    pub batch: usize,
    /// Loader threads (`training.num_workers`).
    pub workers: usize,
    /// Square model input side.
    pub image_size: usize,
    /// Square target mask side.
    pub mask_size: usize,
    /// Bytes of the checkpoint files.
    pub checkpoint_bytes: u64,
}

/// Host (CPU RAM) memory of a run, bytes: what an `exit 137` kill is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HostEstimate {
    /// Binary, libraries, plugin engine.
    pub process: u64,
    /// Parsed annotations (object lists, RLE strings), about twice the JSON.
    pub dataset: u64,
    /// One micro-batch in flight: each busy loader thread holds a decoded full-size image (the
    /// decoder's buffer, the EXIF-rotated copy, the RGB copy), one full-size object mask and the
    /// resized input; the batch holds every sample's input and masks, then the stacked tensors.
    pub data_pipeline: u64,
    /// Loading the checkpoint: its memory-mapped pages (and on the CPU the tensors made from
    /// them).
    pub model_load: u64,
    /// On the CPU, the training micro-batch itself ([`MemoryEstimate::total`] less its base).
    pub training: u64,
    /// process + dataset + the larger of loading and training with data.
    pub total: u64,
}

/// Host memory for `h`; `training` is the device estimate when the device is the CPU (0 on a
/// GPU, where the host only stages the checkpoint and the data).
pub fn host_estimate(h: &HostInputs, training: Option<&MemoryEstimate>) -> HostEstimate {
    let s2 = (h.image_size * h.image_size) as u64;
    let m2 = (h.mask_size * h.mask_size) as u64;
    let busy = h.workers.max(1).min(h.batch.max(1)) as u64;
    // Decoder output, EXIF-rotated copy, RGB copy (3 bytes a pixel each) and one full-size mask.
    let per_worker = 9 * h.max_image_pixels + h.max_image_pixels;
    // Each sample's input (f32) and masks (bytes); stacking a batch of several copies the
    // inputs once more as f32 tensors.
    let per_sample = 3 * s2 * 4 + h.max_objects as u64 * m2;
    let stacked = if h.batch > 1 { h.batch as u64 * (3 * s2 * 4 + h.max_objects as u64 * m2 * 4) } else { 0 };
    let data_pipeline = busy * per_worker + h.batch as u64 * per_sample + stacked;
    let training_bytes = training.map(|e| e.total - e.base).unwrap_or(0);
    let model_load = h.checkpoint_bytes + training.map(|e| e.weights).unwrap_or(0);
    let process = CPU_BASE;
    let dataset = 2 * h.annotation_bytes;
    HostEstimate {
        process,
        dataset,
        data_pipeline,
        model_load,
        training: training_bytes,
        total: process + dataset + model_load.max(data_pipeline + training_bytes),
    }
}

/// The largest micro-batch (images, with `queries_per_image`) whose estimate fits in `budget`
/// bytes; 0 when not even one image fits.
pub fn max_batch(c: &Sam3Config, run: &RunShape, queries_per_image: f64, budget: u64) -> usize {
    let mut best = 0;
    for bsz in 1..=256usize {
        let q = (bsz as f64 * queries_per_image).ceil() as usize;
        if estimate(c, run, bsz, q).total > budget {
            break;
        }
        best = bsz;
    }
    best
}

/// A VarBuilder backend that hands out shape-only stand-ins (one element broadcast to the
/// requested shape) and counts the parameters asked for: the real model code builds, so module
/// paths and sizes are exact, without reading or allocating weights.
pub struct ShapeOnly {
    /// Parameters handed out so far.
    pub params: Arc<Mutex<usize>>,
}

impl candle_nn::var_builder::SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut p) = self.params.lock() {
            *p += s.elem_count();
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape-only model: no tensor {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A VarBuilder over [`ShapeOnly`] stand-ins (f32, CPU) that adds each parameter's size to
/// `params`.
pub fn shape_only_var_builder(params: Arc<Mutex<usize>>) -> candle_nn::VarBuilder<'static> {
    candle_nn::VarBuilder::from_backend(Box::new(ShapeOnly { params }), DType::F32, Device::Cpu)
}

/// Parameters of the SAM3 model `c` describes, counted by building it on shape-only weights.
pub fn parameter_count(c: &Sam3Config) -> candle_core::Result<usize> {
    let params = Arc::new(Mutex::new(0usize));
    crate::sam3::model::Sam3Model::load(shape_only_var_builder(params.clone()), c)?;
    let n = params.lock().map(|p| *p).unwrap_or(0);
    Ok(n)
}

/// Memory the host can still give a process (`MemAvailable` in /proc/meminfo), if known.
pub fn host_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_size() -> Sam3Config {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sam3_config.json");
        Sam3Config::from_file(&p).unwrap().0
    }

    #[test]
    fn memory_grows_with_batch_and_linearly_with_tokens() {
        let c = full_size();
        let all = Adapted::all();
        let one = activation_elements(&c, &all, 1, 1);
        let two = activation_elements(&c, &all, 2, 2);
        assert!((two / one - 2.0).abs() < 1e-9);
        let mut big = c.clone();
        big.vision_config.backbone_config.image_size = 2016;
        // Twice the side: 4x the tokens. Attention keeps no score matrix, so the graph grows
        // with the tokens, not with their square.
        let r = activation_elements(&big, &all, 1, 1) / one;
        assert!(r > 3.5 && r < 5.0, "{r}");
        let run = RunShape {
            base_params: 840_000_000,
            lora_params: 12_000_000,
            dtype: DType::BF16,
            adapted: all,
            vision_checkpointing: Checkpointing::Off,
            base: 0,
            cuda: false,
        };
        let e = estimate(&c, &run, 2, 6);
        // On CUDA the ViT blocks keep less (each one op, fitted on the GPU; the CPU's model is
        // fitted to the op-by-op graph) and their backward makes fewer transients, and
        // (checkpointed) the estimate is the CPU's.
        let gpu = estimate(&c, &RunShape { cuda: true, ..run }, 2, 6);
        assert!(gpu.backward < e.backward && gpu.activations < e.activations, "{gpu:?} vs {e:?}");
        let full = Checkpointing::Full;
        let ckpt_cpu = estimate(&c, &RunShape { vision_checkpointing: full, ..run }, 2, 6);
        let ckpt_gpu = estimate(&c, &RunShape { vision_checkpointing: full, cuda: true, ..run }, 2, 6);
        assert_eq!(ckpt_cpu.total, ckpt_gpu.total);
        assert_eq!(e.weights, 1_680_000_000);
        assert!(e.total > e.weights + e.activations);
        assert!(max_batch(&c, &run, 3.0, e.total) >= 2);
        // Checkpointing the ViT trades its graph for one block's.
        let ckpt = estimate(&c, &RunShape { vision_checkpointing: full, ..run }, 2, 6);
        assert!(ckpt.total < e.total && ckpt.activations < e.activations, "{ckpt:?} vs {e:?}");
        // On CUDA, recomputing fc1's output lands between keeping everything and keeping
        // only the blocks' inputs: the blocks' fc1 outputs less, one block's more.
        let mlp = Checkpointing::Mlp;
        let mlp_gpu = estimate(&c, &RunShape { vision_checkpointing: mlp, cuda: true, ..run }, 2, 6);
        assert!(ckpt_gpu.total < mlp_gpu.total && mlp_gpu.total < gpu.total, "{mlp_gpu:?}");
        let v = &c.vision_config.backbone_config;
        let fc1 = (v.num_hidden_layers - 1) as f64
            * 2.0
            * (v.image_size / v.patch_size).pow(2) as f64
            * v.intermediate_size as f64
            * 2.0;
        let saved = (gpu.activations + gpu.backward) as f64 - (mlp_gpu.activations + mlp_gpu.backward) as f64;
        assert!(
            (saved / fc1 - 1.0).abs() < 0.1,
            "saved {saved} bytes for {fc1} of fc1 outputs less one block's"
        );
    }

    #[test]
    fn the_bundled_full_config_builds_sam3_with_transformers_parameter_count() {
        // transformers' Sam3Model(Sam3Config()) has 840,376,374 parameters
        // (../shared/gpu/README.md, counted by PyTorch).
        assert_eq!(parameter_count(&full_size()).unwrap(), 840_376_374);
    }

    #[test]
    fn the_graph_starts_at_the_first_adapted_component() {
        let c = full_size();
        let none = Adapted::default();
        assert_eq!(activation_elements(&c, &none, 2, 2), 0.0);
        let heads = Adapted { detr_encoder: true, detr_decoder: true, ..Adapted::default() };
        let vit = Adapted { vision: true, ..heads };
        assert!(heads.tracks(Part::MaskHead) && !heads.tracks(Part::Vision) && !heads.tracks(Part::Text));
        // The ViT's graph dominates at 1008² (PyTorch: 25.3 GiB with ViT LoRA, 6.5 without).
        let (h, v) = (activation_elements(&c, &heads, 2, 2), activation_elements(&c, &vit, 2, 2));
        assert!(v > 2.0 * h, "{v} vs {h}");
        // A mask-head adapter alone still records the mask head.
        let mask = Adapted { mask_head: true, ..Adapted::default() };
        assert!(activation_elements(&c, &mask, 1, 1) > 0.0);
    }
}
