//! The SAM3 vision encoder: a ViTDet-style plain ViT with 2-D axial RoPE and windowed/global
//! attention (transformers' `Sam3ViTModel`, VarBuilder path `vision_encoder.backbone`) followed by
//! the FPN neck ([`super::neck`], `vision_encoder.neck`); together transformers'
//! `Sam3VisionModel` at `vision_encoder`.
//!
//! Data flow for pixels (B, 3, S, S), patch p, grid g = S/p, width C:
//! patchify (a matmul, exact for stride = kernel) → (B, g, g, C) + tiled absolute position
//! embeddings → `layer_norm` (ln_pre) → `layers.{i}` (pre-norm blocks; window blocks partition the
//! (B, g, g, C) map into ws×ws windows, global blocks attend over all g² tokens) → the neck.
//!
//! Every op has a backward in candle 0.11: LayerNorm/softmax come from [`super::nn`], the RoPE
//! tables are constants applied with broadcast multiplies, and window (un)partition is
//! pad + reshape + permute + narrow. On a training graph the layout changes are folded into the
//! ops that produce them ([`super::ops::OutputMap`]): the q/k projections write RoPE-rotated
//! heads, a window block's LayerNorm writes the windows and its output projection writes the map
//! back, so the graph keeps one tensor for each. Internally the backbone keeps the channels-last
//! spatial layout (B, H, W, C) transformers uses between its layers.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

use super::config::{VisionConfig, VitConfig};
use super::neck::VisionNeck;
use super::nn::{attention_tokens, Activation, LayerNorm, Linear, Mlp};
use super::ops::OutputMap;

/// Cos/sin tables of transformers' `Sam3ViTRotaryEmbedding` for one token grid.
///
/// Both tables have shape (N, 1, head_dim/2, 1), N = rows·cols in row-major token order, one value
/// per rotated pair (transformers repeats each value twice with `repeat_interleave`; the pairs
/// are adjacent elements (2j, 2j+1)). Pairs 0..head_dim/4 rotate with the column (x) coordinate,
/// the rest with the row (y) coordinate; frequency k = 1/θ^(2k/(head_dim/2)). Positions are
/// multiplied by `scale` (1 for window blocks, window_size/grid for global blocks). Computed on
/// the CPU in f32 exactly as transformers does, then moved to `device` (always f32).
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// cos(angle), (N, 1, head_dim/2, 1), f32.
    pub cos: Tensor,
    /// sin(angle), (N, 1, head_dim/2, 1), f32.
    pub sin: Tensor,
}

impl RopeTables {
    /// Tables for a `rows`×`cols` grid.
    pub fn new(
        rows: usize,
        cols: usize,
        head_dim: usize,
        theta: f64,
        scale: f64,
        device: &Device,
    ) -> Result<Self> {
        if !head_dim.is_multiple_of(4) {
            candle_core::bail!("ViT head_dim {head_dim} must be divisible by 4 for 2-D axial RoPE");
        }
        let spatial = head_dim / 2; // transformers' `spatial_dim`
        let nf = head_dim / 4; // frequencies per axis
        let inv: Vec<f32> =
            (0..nf).map(|k| 1.0f32 / (theta as f32).powf((2 * k) as f32 / spatial as f32)).collect();
        let scale = scale as f32;
        let n = rows * cols;
        let mut cos = Vec::with_capacity(n * spatial);
        let mut sin = Vec::with_capacity(n * spatial);
        for r in 0..rows {
            for c in 0..cols {
                let (x, y) = (c as f32 * scale, r as f32 * scale);
                for pos in [x, y] {
                    for f in &inv {
                        let a = pos * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
        let shape = (n, 1, spatial, 1);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, &Device::Cpu)?.to_device(device)?,
            sin: Tensor::from_vec(sin, shape, &Device::Cpu)?.to_device(device)?,
        })
    }

    /// Number of tokens the tables cover.
    pub fn len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// True when the tables cover no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotate `x` (B, N, heads, head_dim) — tokens before heads, as produced by the q/k
    /// projections — pairwise: (a, b) → (a·cos − b·sin, b·cos + a·sin), computed in f32 and cast
    /// back (transformers' `apply_rotary_pos_emb_2d` with `rotate_pairwise`). Differentiable.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.rotate(&x.to_dtype(DType::F32)?, false)?.to_dtype(x.dtype())
    }

    /// The q/k projections' output map: a (B·N, heads·head_dim) projection → rotated, heads
    /// before tokens (B, heads, N, head_dim), as attention reads q and k; its backward is the
    /// inverse rotation. Folded into the projection's op, the graph keeps one tensor for
    /// project + rotate + transpose (the same values as [`RopeTables::apply`] and a transpose).
    pub fn heads_first_map(&self, batch: usize, heads: usize) -> OutputMap {
        let (fwd, bwd) = (self.clone(), self.clone());
        // On the GPU one kernel pass each way (rotation and layout change), else composed.
        OutputMap {
            forward: Arc::new(move |y: &Tensor| {
                if super::fused_cuda::serves(y) {
                    return super::fused_cuda::rope(y, &fwd.cos, &fwd.sin, batch, heads, false);
                }
                let (n, d) = (fwd.len(), y.dim(1)? / heads);
                fwd.rotate(&y.reshape((batch, n, heads, d))?.to_dtype(DType::F32)?, false)?.transpose(1, 2)
            }),
            backward: Arc::new(move |dy: &Tensor| {
                if super::fused_cuda::serves(dy) {
                    return super::fused_cuda::rope(dy, &bwd.cos, &bwd.sin, batch, heads, true);
                }
                let (b, h, n, d) = dy.dims4()?;
                bwd.rotate(&dy.transpose(1, 2)?.to_dtype(DType::F32)?, true)?.reshape((b * n, h * d))
            }),
        }
    }

    /// The pairwise rotation of an f32 (B, N, heads, head_dim) tensor by +angle, or by −angle
    /// when `inverse` (the transpose of the rotation: its backward).
    fn rotate(&self, xf: &Tensor, inverse: bool) -> Result<Tensor> {
        let (b, n, h, d) = xf.dims4()?;
        if n != self.len() {
            candle_core::bail!("RoPE tables cover {} tokens, the input has {n}", self.len());
        }
        let xf = xf.contiguous()?.reshape((b, n, h, d / 2, 2))?;
        let a = xf.narrow(4, 0, 1)?;
        let bb = xf.narrow(4, 1, 1)?;
        let (ya, yb) = if inverse {
            (
                a.broadcast_mul(&self.cos)? + bb.broadcast_mul(&self.sin)?,
                bb.broadcast_mul(&self.cos)? - a.broadcast_mul(&self.sin)?,
            )
        } else {
            (
                a.broadcast_mul(&self.cos)? - bb.broadcast_mul(&self.sin)?,
                bb.broadcast_mul(&self.cos)? + a.broadcast_mul(&self.sin)?,
            )
        };
        Tensor::cat(&[ya?, yb?], 4)?.reshape((b, n, h, d))
    }
}

/// Partition a channels-last map (B, H, W, C) into (B·nH·nW, ws·ws, C) windows in row-major window
/// order, zero-padding the bottom/right to multiples of `ws` first (transformers'
/// `window_partition`, with each window's tokens flattened). Returns the padded (H, W).
pub fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let mut x = x.clone();
    if ph > 0 {
        x = x.pad_with_zeros(1, 0, ph)?;
    }
    if pw > 0 {
        x = x.pad_with_zeros(2, 0, pw)?;
    }
    let (hp, wp) = (h + ph, w + pw);
    // (On the GPU, untracked: lorahost's row copy instead of candle's per-element strided copy.)
    let windows = super::copy_cuda::contiguous(
        &x.reshape((b, hp / ws, ws, wp / ws, ws, c))?.permute((0, 1, 3, 2, 4, 5))?,
    )?
    .reshape((b * (hp / ws) * (wp / ws), ws * ws, c))?;
    Ok((windows, (hp, wp)))
}

/// Inverse of [`window_partition`]: (B·nH·nW, ws·ws, C) → (B, H, W, C), cropping the padding.
pub fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    padded: (usize, usize),
    hw: (usize, usize),
) -> Result<Tensor> {
    let (hp, wp) = padded;
    let (h, w) = hw;
    let (nw, _, c) = windows.dims3()?;
    let b = nw / ((hp / ws) * (wp / ws));
    let mut x = super::copy_cuda::contiguous(
        &windows.reshape((b, hp / ws, wp / ws, ws, ws, c))?.permute((0, 1, 3, 2, 4, 5))?,
    )?
    .reshape((b, hp, wp, c))?;
    if hp != h {
        x = x.narrow(1, 0, h)?;
    }
    if wp != w {
        x = x.narrow(2, 0, w)?;
    }
    Ok(x)
}

/// (H, W) padded up to multiples of `ws`.
fn padded_hw(hw: (usize, usize), ws: usize) -> (usize, usize) {
    (hw.0.div_ceil(ws) * ws, hw.1.div_ceil(ws) * ws)
}

/// LayerNorm output (B, H, W, C) → windows (B·nW, ws², C): [`window_partition`] as an output map.
pub(crate) fn partition_map(ws: usize, hw: (usize, usize)) -> OutputMap {
    OutputMap {
        forward: Arc::new(move |y: &Tensor| Ok(window_partition(y, ws)?.0)),
        backward: Arc::new(move |dy: &Tensor| window_unpartition(dy, ws, padded_hw(hw, ws), hw)),
    }
}

/// Output projection rows (B·nW·ws², C) → the map (B, H, W, C): [`window_unpartition`] as an
/// output map.
pub(crate) fn unpartition_map(ws: usize, hw: (usize, usize)) -> OutputMap {
    OutputMap {
        forward: Arc::new(move |y: &Tensor| {
            let c = y.dim(1)?;
            window_unpartition(&y.reshape((y.dim(0)? / (ws * ws), ws * ws, c))?, ws, padded_hw(hw, ws), hw)
        }),
        backward: Arc::new(move |dy: &Tensor| {
            let c = dy.dim(3)?;
            window_partition(dy, ws)?.0.reshape(((), c))
        }),
    }
}

/// The patch embedding `Conv2d(3, C, kernel=p, stride=p, bias=False)` computed as patchify + matmul.
#[derive(Debug, Clone)]
pub struct PatchEmbeddings {
    /// `embeddings.patch_embeddings.projection.weight`, PyTorch layout (C, channels, p, p).
    pub weight: Tensor,
    /// Patch size p.
    pub patch_size: usize,
}

impl PatchEmbeddings {
    /// Load `projection.weight`.
    pub fn load(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let p = cfg.patch_size;
        let weight = vb.pp("projection").get((cfg.hidden_size, cfg.num_channels, p, p), "weight")?;
        Ok(Self { weight, patch_size: p })
    }

    /// Pixels (B, channels, H, W) → channels-last patches (B, H/p, W/p, C). Trailing pixels that do
    /// not fill a patch are dropped (as the strided convolution does).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let p = self.patch_size;
        let (c_out, ch, _, _) = self.weight.dims4()?;
        let x = pixel_values.to_dtype(self.weight.dtype())?;
        let (b, c, h, w) = x.dims4()?;
        if c != ch {
            candle_core::bail!("pixel_values have {c} channels, the patch embedding expects {ch}");
        }
        let (gh, gw) = (h / p, w / p);
        let x = if gh * p != h || gw * p != w { x.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)? } else { x };
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))? // (B, gh, gw, c, kh, kw)
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let wm = self.weight.reshape((c_out, c * p * p))?;
        patches.matmul(&wm.t()?)?.reshape((b, gh, gw, c_out))
    }
}

/// Patch embeddings + tiled absolute position embeddings (transformers' `Sam3ViTEmbeddings`).
#[derive(Debug, Clone)]
pub struct ViTEmbeddings {
    /// The patch projection.
    pub patch_embeddings: PatchEmbeddings,
    /// `embeddings.position_embeddings`, (1, P², C) with P = pretrain_image_size / patch_size
    /// (the class-token slot is already removed in transformers' checkpoints).
    pub position_embeddings: Tensor,
    /// P.
    pub pretrain_grid: usize,
}

impl ViTEmbeddings {
    /// Load from `vision_encoder.backbone.embeddings`.
    pub fn load(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let pretrain_grid = cfg.pretrain_image_size / cfg.patch_size;
        Ok(Self {
            patch_embeddings: PatchEmbeddings::load(vb.pp("patch_embeddings"), cfg)?,
            position_embeddings: vb
                .get((1, pretrain_grid * pretrain_grid, cfg.hidden_size), "position_embeddings")?,
            pretrain_grid,
        })
    }

    /// The position embeddings tiled (repeated, not interpolated) to a `gh`×`gw` grid and cropped:
    /// (1, gh, gw, C).
    pub fn tiled_position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let p = self.pretrain_grid;
        let c = self.position_embeddings.dim(2)?;
        let pe = self.position_embeddings.reshape((p, p, c))?;
        let pe = if gh == p && gw == p {
            pe
        } else {
            pe.repeat((gh / p + 1, gw / p + 1, 1))?.narrow(0, 0, gh)?.narrow(1, 0, gw)?
        };
        pe.unsqueeze(0)
    }

    /// Pixels (B, 3, H, W) → (B, H/p, W/p, C).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.patch_embeddings.forward(pixel_values)?;
        let (_, gh, gw, _) = x.dims4()?;
        x.broadcast_add(&self.tiled_position_embeddings(gh, gw)?.to_dtype(x.dtype())?)
    }
}

/// Self-attention with 2-D axial RoPE on q and k (transformers' `Sam3ViTRoPEAttention`); no mask.
#[derive(Debug, Clone)]
pub struct ViTAttention {
    /// `attention.q_proj`.
    pub q_proj: Linear,
    /// `attention.k_proj`.
    pub k_proj: Linear,
    /// `attention.v_proj`.
    pub v_proj: Linear,
    /// `attention.o_proj`.
    pub o_proj: Linear,
    /// Heads.
    pub num_heads: usize,
}

impl ViTAttention {
    /// Load `{q,k,v,o}_proj` (all with bias) of width `dim`.
    pub fn load(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), dim, dim, true)?,
            k_proj: Linear::load(vb.pp("k_proj"), dim, dim, true)?,
            v_proj: Linear::load(vb.pp("v_proj"), dim, dim, true)?,
            o_proj: Linear::load(vb.pp("o_proj"), dim, dim, true)?,
            num_heads,
        })
    }

    /// Token sequences (B, N, C) with their RoPE tables (N tokens) → (B, N, C), or the output
    /// projection's rows (B·N, C) written through `out_map`.
    pub fn forward(&self, x: &Tensor, rope: &RopeTables, out_map: Option<&OutputMap>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (h, d) = (self.num_heads, c / self.num_heads);
        let x2 = x.contiguous()?.reshape((b * n, c))?;
        let q = self.q_proj.forward_mapped(&x2, &rope.heads_first_map(b, h))?;
        let k = self.k_proj.forward_mapped(&x2, &rope.heads_first_map(b, h))?;
        let v = self.v_proj.forward(&x2)?.reshape((b, n, h, d))?.transpose(1, 2)?;
        let o = attention_tokens(&q, &k, &v, 1.0 / (d as f64).sqrt(), None)?.reshape((b * n, c))?;
        match out_map {
            Some(m) => self.o_proj.forward_mapped(&o, m),
            None => self.o_proj.forward(&o)?.reshape((b, n, c)),
        }
    }
}

/// One pre-norm ViT block (transformers' `Sam3ViTLayer`), windowed or global.
#[derive(Debug, Clone)]
pub struct ViTLayer {
    /// `layer_norm1`.
    pub layer_norm1: LayerNorm,
    /// `attention`.
    pub attention: ViTAttention,
    /// `layer_norm2`.
    pub layer_norm2: LayerNorm,
    /// `mlp` (fc1 → activation → fc2).
    pub mlp: Mlp,
    /// Window size in patches; 0 for a global block.
    pub window_size: usize,
    /// RoPE tables: ws×ws positions for a window block, the full grid scaled by window_size/grid
    /// for a global block.
    pub rope: RopeTables,
}

impl ViTLayer {
    /// Load `layers.{i}`; `window_size` 0 makes a global block (tables for `cfg.grid()`²).
    pub fn load(vb: VarBuilder, cfg: &VitConfig, window_size: usize, device: &Device) -> Result<Self> {
        let c = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let rope = if window_size > 0 {
            RopeTables::new(window_size, window_size, cfg.head_dim(), cfg.theta(), 1.0, device)?
        } else {
            let g = cfg.grid();
            RopeTables::new(g, g, cfg.head_dim(), cfg.theta(), cfg.window_size as f64 / g as f64, device)?
        };
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), c, eps)?,
            attention: ViTAttention::load(vb.pp("attention"), c, cfg.num_attention_heads)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), c, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), c, cfg.intermediate_size, Activation::from_name(&cfg.hidden_act)?)?,
            window_size,
            rope,
        })
    }

    /// Channels-last (B, H, W, C) → (B, H, W, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = if self.window_size > 0 { "window" } else { "global" };
        crate::profile::inner(|| format!("vit {kind} block forward"), || self.forward_block(x))
    }

    fn forward_block(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let y = if self.window_size > 0 {
            // LayerNorm writes the windows, the output projection the map (one tensor each).
            let ws = self.window_size;
            let windows = self.layer_norm1.forward_mapped(x, &partition_map(ws, (h, w)))?;
            self.attention.forward(&windows, &self.rope, Some(&unpartition_map(ws, (h, w))))?
        } else {
            if h * w != self.rope.len() {
                candle_core::bail!(
                    "global ViT block: the input grid {h}×{w} differs from the configured grid ({} tokens); \
                     the input size must equal vision_config.backbone_config.image_size",
                    self.rope.len()
                );
            }
            self.attention
                .forward(&self.layer_norm1.forward(x)?.reshape((b, h * w, c))?, &self.rope, None)?
                .reshape((b, h, w, c))?
        };
        let x = (x + y)?;
        let y = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        x + y
    }
}

/// The ViT backbone (transformers' `Sam3ViTModel`) at `vision_encoder.backbone`.
#[derive(Debug, Clone)]
pub struct ViTModel {
    /// `embeddings`.
    pub embeddings: ViTEmbeddings,
    /// `layer_norm` (ln_pre, applied once after the position embeddings).
    pub layer_norm: LayerNorm,
    /// `layers.{i}`.
    pub layers: Vec<ViTLayer>,
    /// Activation checkpointing of every block (see [`super::vit_block::Checkpointing`]).
    pub checkpoint: super::vit_block::Checkpointing,
}

impl ViTModel {
    /// Load from `vision_encoder.backbone`.
    pub fn load(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let device = vb.device().clone();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let ws = if cfg.global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                ViTLayer::load(vb.pp("layers").pp(i.to_string()), cfg, ws, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: ViTEmbeddings::load(vb.pp("embeddings"), cfg)?,
            layer_norm: LayerNorm::load(vb.pp("layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            layers,
            checkpoint: Default::default(),
        })
    }

    /// Pixels (B, 3, S, S) → channels-last features (B, g, g, C), g = S / patch_size.
    /// (transformers' `last_hidden_state` is this reshaped to (B, g², C).)
    pub fn forward_spatial(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = self.layer_norm.forward(&self.embeddings.forward(pixel_values)?)?;
        for layer in &self.layers {
            x = self.forward_layer(layer, &x)?;
        }
        Ok(x)
    }

    /// One of the blocks on channels-last `x` (B, g, g, C), as [`Self::forward_spatial`] runs it:
    /// as one op where [`super::vit_block::serves`], else op by op (checkpointed or under its
    /// own dropout sub-stream).
    pub fn forward_layer(&self, layer: &ViTLayer, x: &Tensor) -> Result<Tensor> {
        if super::vit_block::enabled() && super::vit_block::serves(layer, x) {
            match super::vit_block::forward(layer, x, self.checkpoint) {
                Ok(y) => return Ok(y),
                Err(e) => super::vit_block::fall_back(e)?,
            }
        }
        Ok(match self.checkpoint == super::vit_block::Checkpointing::Full {
            true => {
                use super::visit::VisitLinears;
                let mut block = layer.clone();
                let mut vars = Vec::new();
                block.visit_linears(&mut |lin| {
                    if let Some(a) = &lin.lora {
                        vars.extend([a.a.clone(), a.b.clone()]);
                    }
                });
                let f: super::recompute::Block = std::sync::Arc::new(move |x| block.forward(x));
                // The anchor records the block even when its input is untracked (the first
                // block follows the frozen patch embedding).
                let anchor = super::recompute::anchor(x.device())?;
                super::recompute::checkpointed(f, vars, &anchor, x)?
            }
            // Under its own dropout sub-stream, as a checkpointed block runs: the same
            // masks with and without checkpointing.
            false => crate::rng::keyed(x.device(), || layer.forward(x))?,
        })
    }

    /// Like [`ViTModel::forward_spatial`], returning every intermediate map (transformers'
    /// `hidden_states`): `[0]` = the input of block 0 (after ln_pre), `[i]` = the output of block
    /// i−1, each (B, g, g, C); the last one is the backbone output.
    pub fn forward_hidden_states(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let mut states = vec![self.layer_norm.forward(&self.embeddings.forward(pixel_values)?)?];
        for layer in &self.layers {
            let prev = &states[states.len() - 1];
            let next = crate::rng::keyed(prev.device(), || layer.forward(prev))?;
            states.push(next);
        }
        Ok(states)
    }
}

/// What [`VisionModel::forward`] returns (transformers' `Sam3VisionEncoderOutput`).
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// ViT output (B, g², C): tokens in row-major grid order (t = row·g + col), channels last —
    /// transformers' `last_hidden_state`.
    pub last_hidden_state: Tensor,
    /// Every FPN level in `scale_factors` order, each (B, fpn_hidden_size, g·s, g·s) for scale s
    /// (NCHW) — transformers' `fpn_hidden_states`, including the last (0.5) level that
    /// `Sam3Model` drops.
    pub fpn: Vec<Tensor>,
    /// The sine position encoding of each level, same shape and dtype as `fpn[i]`, channels
    /// [pos_y (fpn/2), pos_x (fpn/2)] — transformers' `fpn_position_encoding`. Constants (no graph).
    pub fpn_pos: Vec<Tensor>,
}

/// transformers' `Sam3VisionModel` at `vision_encoder`: ViT backbone + FPN neck.
#[derive(Debug, Clone)]
pub struct VisionModel {
    /// `backbone`.
    pub backbone: ViTModel,
    /// `neck`.
    pub neck: VisionNeck,
}

impl VisionModel {
    /// Load `backbone` and `neck` from `vb` (pass the `vision_encoder` VarBuilder).
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        Ok(Self {
            backbone: ViTModel::load(vb.pp("backbone"), &cfg.backbone_config)?,
            neck: VisionNeck::load(vb.pp("neck"), cfg)?,
        })
    }

    /// Pixels (B, 3, S, S), already normalized, S = `image_size` when the config has global
    /// blocks → [`VisionOutput`].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        let x = self.backbone.forward_spatial(pixel_values)?; // (B, g, g, C)
        let (b, gh, gw, c) = x.dims4()?;
        let (fpn, fpn_pos) = self.neck.forward(&x)?;
        Ok(VisionOutput { last_hidden_state: x.reshape((b, gh * gw, c))?, fpn, fpn_pos })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sam3::weights;
    use candle_core::Var;
    use candle_nn::VarMap;
    use std::collections::HashMap;
    use std::path::Path;

    fn max_abs(t: &Tensor) -> Result<f32> {
        t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Run the vision model on a fixture's `pixel_values` and compare every `vision.*` output with
    /// max |diff| ≤ 1e-4 · max(1, max |ref|); returns (name, max diff, max |ref|) per tensor.
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// q/k projection with RoPE folded in: the forward equals the composed projection, rotation
    /// and transpose bit for bit, the input gradient equals the composed graph's.
    #[test]
    fn rope_map_matches_the_composed_rotation_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let tables = RopeTables::new(3, 2, 8, 10000.0, 0.5, &dev)?;
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (12, 24), &dev)?.to_dtype(dt)?)?;
            let w = Tensor::randn(0f32, 0.3, (24, 24), &dev)?.to_dtype(dt)?;
            let t = Tensor::randn(0f32, 1.0, (2, 3, 6, 8), &dev)?.to_dtype(dt)?;
            let plain = x.matmul(&w.t()?)?.reshape((2, 6, 3, 8))?;
            let want = tables.apply(&plain)?.transpose(1, 2)?;
            let map = tables.heads_first_map(2, 3);
            let got = crate::sam3::frozen::frozen_linear(&x, &w, None, None, None, Some(&map))?;
            assert!(got.is_contiguous());
            assert_eq!(max_diff(&want, &got)?, 0.0);
            let gw = (want * &t)?.sum_all()?.backward()?;
            let gg = (got * &t)?.sum_all()?.backward()?;
            let diff = max_diff(gw.get(x.as_tensor()).unwrap(), gg.get(x.as_tensor()).unwrap())?;
            assert!(diff < 1e-5, "{dt:?}: gradient differs by {diff}");
        }
        Ok(())
    }

    /// LayerNorm writing windows and a projection writing the map back (with padding): the same
    /// values and input gradients as the composed partition / unpartition.
    #[test]
    fn window_maps_match_the_composed_partition_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w, c, ws) = (2, 5, 3, 4, 2);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?)?;
        let ln = LayerNorm {
            weight: Tensor::randn(1f32, 0.2, c, &dev)?,
            bias: Tensor::randn(0f32, 0.2, c, &dev)?,
            eps: 1e-6,
        };
        let want = window_partition(&ln.forward(&x)?, ws)?.0;
        let got = ln.forward_mapped(&x, &partition_map(ws, (h, w)))?;
        assert_eq!(max_diff(&want, &got)?, 0.0);
        let t = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
        let gw = (&want * &t)?.sum_all()?.backward()?;
        let gg = (&got * &t)?.sum_all()?.backward()?;
        assert!(max_diff(gw.get(x.as_tensor()).unwrap(), gg.get(x.as_tensor()).unwrap())? < 1e-5);
        // The projection back to the map, from the windows' rows.
        let rows = Var::from_tensor(&Tensor::randn(0f32, 1.0, (want.dim(0)? * ws * ws, c), &dev)?)?;
        let wt = Tensor::randn(0f32, 0.5, (c, c), &dev)?;
        let plain = rows.matmul(&wt.t()?)?.reshape(want.dims())?;
        let want = window_unpartition(&plain, ws, padded_hw((h, w), ws), (h, w))?;
        let got = crate::sam3::frozen::frozen_linear(
            &rows,
            &wt,
            None,
            None,
            None,
            Some(&unpartition_map(ws, (h, w))),
        )?;
        assert_eq!(got.dims(), &[b, h, w, c]);
        assert_eq!(max_diff(&want, &got)?, 0.0);
        let t = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?;
        let gw = (want * &t)?.sum_all()?.backward()?;
        let gg = (got * &t)?.sum_all()?.backward()?;
        assert!(max_diff(gw.get(rows.as_tensor()).unwrap(), gg.get(rows.as_tensor()).unwrap())? < 1e-5);
        Ok(())
    }

    fn check_parity(model: &VisionModel, dir: &Path) -> Result<Vec<(String, f32, f32)>> {
        let inputs = candle_core::safetensors::load(dir.join("inputs.safetensors"), &Device::Cpu)?;
        let refs = candle_core::safetensors::load(dir.join("outputs.safetensors"), &Device::Cpu)?;
        let pixels = &inputs["pixel_values"];
        let out = model.forward(pixels)?;
        let mut got: Vec<(String, Tensor)> = vec![("vision.last_hidden_state".into(), out.last_hidden_state)];
        for (i, h) in model.backbone.forward_hidden_states(pixels)?.into_iter().enumerate() {
            got.push((format!("vision.hidden_states.{i}"), h));
        }
        for (i, (f, p)) in out.fpn.into_iter().zip(out.fpn_pos).enumerate() {
            got.push((format!("vision.fpn.{i}"), f));
            got.push((format!("vision.fpn_pos.{i}"), p));
        }
        let mut report = Vec::new();
        for (name, t) in got {
            let r =
                refs.get(&name).unwrap_or_else(|| panic!("{}: no reference tensor {name}", dir.display()));
            assert_eq!(t.dims(), r.dims(), "{name}: shape");
            let diff = max_abs(&(&t - r)?)?;
            let scale = max_abs(r)?;
            report.push((name.clone(), diff, scale));
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{}: {name} max |diff| {diff} (max |ref| {scale})",
                dir.display()
            );
        }
        // Every reference vision tensor was compared.
        for k in refs.keys().filter(|k| k.starts_with("vision.")) {
            assert!(
                report.iter().any(|(n, _, _)| n == k),
                "{}: reference {k} was not compared",
                dir.display()
            );
        }
        Ok(report)
    }

    fn parity_fixture(name: &str) -> Result<()> {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sam3")).join(name);
        let (cfg, ckpt) = weights::open_dir(&dir).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let model = VisionModel::load(
            ckpt.var_builder(DType::F32, &Device::Cpu).pp("vision_encoder"),
            &cfg.vision_config,
        )?;
        for (t, diff, scale) in check_parity(&model, &dir)? {
            println!("{name} {t}: max |diff| {diff:.3e} (max |ref| {scale:.3e})");
        }
        Ok(())
    }

    #[test]
    fn parity_tiny_a() -> Result<()> {
        parity_fixture("tiny_a")
    }

    #[test]
    fn parity_tiny_b() -> Result<()> {
        parity_fixture("tiny_b")
    }

    /// A tiny vision config (width 16, MLP 24, 3 blocks, 2 heads, patch 4, GELU).
    pub(crate) fn tiny_config(
        image_size: usize,
        window: usize,
        global: Vec<usize>,
        scales: Vec<f64>,
    ) -> VisionConfig {
        VisionConfig {
            backbone_config: VitConfig {
                hidden_size: 16,
                intermediate_size: 24,
                num_hidden_layers: 3,
                num_attention_heads: 2,
                num_channels: 3,
                image_size,
                patch_size: 4,
                hidden_act: "gelu".into(),
                layer_norm_eps: 1e-6,
                window_size: window,
                global_attn_indexes: global,
                pretrain_image_size: 12,
                rope_theta: None,
                rope_parameters: None,
                layer_scale_init_value: None,
            },
            fpn_hidden_size: 8,
            scale_factors: scales,
        }
    }

    /// A model whose every parameter is a random `Var` (from a VarMap), for gradient tests.
    fn var_model(cfg: &VisionConfig) -> Result<(VisionModel, HashMap<String, Var>)> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let model =
            VisionModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("vision_encoder"), cfg)?;
        let vars = varmap.data().lock().unwrap().clone();
        for (name, v) in &vars {
            let r = Tensor::randn(0f32, 1.0, v.shape(), &dev)?;
            let init = if name.contains("layer_norm") && name.ends_with("weight") {
                (r * 0.2)? + 1.0
            } else {
                r * (0.5 / (v.elem_count() as f64 / v.dim(0)?.max(1) as f64).sqrt().max(1.0))
            }?;
            v.set(&init)?;
        }
        Ok((model, vars))
    }

    #[test]
    fn gradients_reach_every_parameter() -> Result<()> {
        let dev = Device::Cpu;
        // grid 6 with window 4: exercises the padding path; block 1 is global.
        let cfg = tiny_config(24, 4, vec![1], vec![4.0, 2.0, 1.0, 0.5]);
        let (model, vars) = var_model(&cfg)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 24, 24), &dev)?;
        let out = model.forward(&x)?;
        // A random weighting of every output, so no symmetry can cancel a gradient.
        let mut loss = (out.last_hidden_state.clone()
            * Tensor::randn_like(&out.last_hidden_state, 0.0, 1.0)?)?
        .sum_all()?;
        for f in &out.fpn {
            loss = (loss + (f * Tensor::randn_like(f, 0.0, 1.0)?)?.sum_all()?)?;
        }
        let grads = loss.backward()?;
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let mut checked = 0;
        for name in names {
            // softmax is invariant to a shift shared by all keys: only RoPE makes k_proj.bias matter.
            if name.ends_with("k_proj.bias") {
                continue;
            }
            let g = grads.get(vars[name].as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let m = max_abs(g)?;
            assert!(m > 0.0 && m.is_finite(), "{name}: gradient max |g| = {m}");
            checked += 1;
        }
        // 5 embedding/ln_pre + 16 per block + neck (4+4 for ×4, 2+4 for ×2, 4, 4).
        assert_eq!(checked + cfg.backbone_config.num_hidden_layers, 4 + 16 * 3 + 22);
        Ok(())
    }

    #[test]
    fn window_partition_round_trips_with_padding() -> Result<()> {
        let x = Tensor::arange(0f32, (2 * 5 * 6 * 3) as f32, &Device::Cpu)?.reshape((2, 5, 6, 3))?;
        let (w, padded) = window_partition(&x, 4)?;
        assert_eq!(padded, (8, 8));
        assert_eq!(w.dims(), &[8, 16, 3]);
        // Window 1 of image 0 (row 0, col 1) starts at pixel (0, 4).
        let first = w.get(1)?.get(0)?.to_vec1::<f32>()?;
        assert_eq!(first, x.get(0)?.get(0)?.get(4)?.to_vec1::<f32>()?);
        // Padding is zero: window 1, token (0, 2) is column 6 ≥ 6.
        assert_eq!(w.get(1)?.get(2)?.to_vec1::<f32>()?, vec![0.0; 3]);
        let back = window_unpartition(&w, 4, padded, (5, 6))?;
        assert_eq!(max_abs(&(back - &x)?)?, 0.0);
        Ok(())
    }

    #[test]
    fn patchify_matches_strided_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let pe = PatchEmbeddings { weight: Tensor::randn(0f32, 1.0, (8, 3, 4, 4), &dev)?, patch_size: 4 };
        let x = Tensor::randn(0f32, 1.0, (2, 3, 12, 17), &dev)?; // 17: a trailing partial patch
        let want = x.narrow(3, 0, 16)?.conv2d(&pe.weight, 0, 4, 1, 1)?.permute((0, 2, 3, 1))?;
        let got = pe.forward(&x)?;
        assert_eq!(got.dims(), &[2, 3, 4, 8]);
        assert!(max_abs(&(got - want)?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn rope_rotates_adjacent_pairs_x_then_y() -> Result<()> {
        let dev = Device::Cpu;
        // grid 2×3, head_dim 8: pairs 0,1 use x = col, pairs 2,3 use y = row; freqs 1 and θ^(-1/2).
        let t = RopeTables::new(2, 3, 8, 100.0, 0.5, &dev)?;
        let x = Tensor::arange(1f32, 1.0 + 6.0 * 8.0, &dev)?.reshape((1, 6, 1, 8))?;
        let y = t.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        for tok in 0..6 {
            let (row, col) = ((tok / 3) as f32 * 0.5, (tok % 3) as f32 * 0.5);
            for pair in 0..4 {
                let ang = [col, col * 0.1, row, row * 0.1][pair];
                let (a, b) = (xs[tok * 8 + 2 * pair], xs[tok * 8 + 2 * pair + 1]);
                let (ea, eb) = (a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin());
                assert!(
                    (y[tok * 8 + 2 * pair] - ea).abs() < 1e-4
                        && (y[tok * 8 + 2 * pair + 1] - eb).abs() < 1e-4
                );
            }
        }
        Ok(())
    }
}
