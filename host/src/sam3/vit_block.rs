//! A ViT block (transformers' `Sam3ViTLayer`) as one recorded op with a hand-written backward.
//!
//! Recorded op by op, a block is about a dozen graph nodes, and candle 0.11's backward pays for
//! every gradient edge between them: it allocates a zero tensor for the edge's target and adds
//! the incoming gradient to it (`zeros_like` + `add`), about fifteen activation-sized edges per
//! block (one of them fc1's 4736-wide output) — at batch 2 on SAM3's 5184-token grid ~1.3 GB
//! of extra memory traffic and ~30 launches per block, 32 blocks per step. Here the block is
//! one op on (x, anchor): the forward runs the same layers unrecorded ([`LinearStep`],
//! [`AttentionStep`], the LayerNorm kernels) and keeps what the backward needs; the backward
//! chains their backward functions by hand and adds each branch's gradient once. The block's
//! LoRA factors enter the op as one concatenated operand, so their gradients come back through
//! candle's graph like any other (one small tensor per block); where the caller merges the
//! side store after backward ([`super::recompute::with_side_grads`]: the trainer, the bench)
//! they go there instead, which spares candle splitting the operand again.
//!
//! Kept for backward: q and k (rotated, heads first), v, the attention output and its
//! log-sum-exp (flash) or nothing more (the chunked path), the residual sum x + attn(x), fc1's
//! output, and the dropout masks; the two LayerNorm outputs are recomputed in backward (one
//! cheap pass each) instead of kept, and everything is released as soon as the block's
//! backward has run. With checkpointing the forward keeps nothing and the backward reruns it
//! under the same dropout key first (no graph is recorded either time); with
//! [`Checkpointing::Mlp`] it keeps all but fc1's output, which the backward recomputes from the
//! LayerNorm rows it recomputes anyway.
//!
//! The values are those of the op-by-op path ([`ViTLayer::forward`]): the same functions in the
//! same order, the dropout masks drawn in the same order from the same stream; gradients agree
//! to rounding (a test compares both). `LORAHOST_VIT_BLOCK_OP=0` switches back to the op-by-op
//! graph (A/B timings).

use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor, Var};

use std::sync::Mutex;

use super::attention::AttentionStep;
use super::frozen::LinearStep;
use super::layer_op::{out_of_memory, OpFactors};
use super::ops::{binary_storage, Binary, OutputMap, Precomputed};
use super::ops::{
    layer_norm_composed, layer_norm_composed_mapped, layer_norm_input_grad, precomputed_kernels,
};
use super::vision::{partition_map, unpartition_map, ViTLayer};

/// How much of a ViT block's forward is kept for its backward (`training.gradient_checkpointing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Everything the backward needs.
    #[default]
    Off,
    /// All but fc1's output, the block's largest activation (MLP-wide), which the backward
    /// recomputes with one more fc1 product (its adapter's dropout draws replayed): about 40%
    /// less of the ViT's activation memory for one fc1 product per block. Blocks recorded op by
    /// op (`LORAHOST_VIT_BLOCK_OP=0`) keep it.
    Mlp,
    /// Only the block's input: the whole block reruns in backward.
    Full,
}

impl serde::Serialize for Checkpointing {
    /// As the config writes it: `false`, `"mlp"`, `true`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Checkpointing::Off => s.serialize_bool(false),
            Checkpointing::Mlp => s.serialize_str("mlp"),
            Checkpointing::Full => s.serialize_bool(true),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Checkpointing {
    /// `true` (full), `false` (off) or `"mlp"` (also `"full"`, `"off"`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Checkpointing::Full),
            Raw::Bool(false) => Ok(Checkpointing::Off),
            Raw::Text(t) => match t.to_ascii_lowercase().as_str() {
                "mlp" => Ok(Checkpointing::Mlp),
                "full" | "true" => Ok(Checkpointing::Full),
                "off" | "false" => Ok(Checkpointing::Off),
                _ => Err(serde::de::Error::custom(format!("`{t}`: expected true, false or mlp"))),
            },
        }
    }
}

/// Set when the op's forward failed in this process (see [`fall_back`]).
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether ViT blocks on a training graph run as one op (`LORAHOST_VIT_BLOCK_OP=0`: no; nor
/// after a failure, [`fall_back`]).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LORAHOST_VIT_BLOCK_OP").is_ok_and(|v| v == "0"))
        && !FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

/// After the op's forward failed with `e`: the error itself when the device ran out of memory
/// (the op-by-op graph needs more, and the trainer reports that case), else `Ok` after
/// switching the op off for the rest of the process with a warning (the caller then runs the
/// block op by op): a defect in the op costs speed, not the run.
pub fn fall_back(e: candle_core::Error) -> Result<()> {
    let text = e.to_string();
    if out_of_memory(&text) {
        return Err(e);
    }
    tracing::warn!("the ViT block op failed ({text}); recording the blocks op by op from here on");
    FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// What the forward keeps for the backward.
struct Saved {
    /// q, k: rotated, heads first (B', H, N, D); v: (B', H, N, D) (a view of its rows).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The attention output, (B', N, H, D) contiguous, and its record.
    o: Tensor,
    attention: AttentionStep,
    /// x + attention branch, (B, H, W, C).
    x1: Tensor,
    /// fc1's output (rows, hidden), before the activation (fc2 applies it); `None` when the
    /// backward recomputes it ([`Checkpointing::Mlp`]).
    h: Option<Tensor>,
    /// The six layers with their dropout masks and converted factors.
    q_proj: LinearStep,
    k_proj: LinearStep,
    v_proj: LinearStep,
    o_proj: LinearStep,
    fc1: LinearStep,
    fc2: LinearStep,
}

/// The block's layout: window maps (window blocks) and sequence shapes.
struct BlockLayout {
    /// (B, H, W, C) of the block's input.
    dims: (usize, usize, usize, usize),
    /// Sequences × tokens per sequence the attention sees (windows, or whole images).
    seqs: usize,
    tokens: usize,
    /// LayerNorm → windows and output projection → map, for a window block.
    maps: Option<(OutputMap, OutputMap)>,
}

impl BlockLayout {
    fn of(layer: &ViTLayer, x: &Tensor) -> Result<Self> {
        let (b, h, w, c) = x.dims4()?;
        let ws = layer.window_size;
        if ws > 0 {
            let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
            let maps = (partition_map(ws, (h, w)), unpartition_map(ws, (h, w)));
            return Ok(Self { dims: (b, h, w, c), seqs: b * nh * nw, tokens: ws * ws, maps: Some(maps) });
        }
        if h * w != layer.rope.len() {
            candle_core::bail!(
                "global ViT block: the input grid {h}×{w} differs from the configured grid ({} tokens); \
                 the input size must equal vision_config.backbone_config.image_size",
                layer.rope.len()
            );
        }
        Ok(Self { dims: (b, h, w, c), seqs: b, tokens: h * w, maps: None })
    }

    /// `layer_norm1(x)` as the attention's input rows (seqs·tokens, C).
    fn attention_rows(&self, layer: &ViTLayer, x: &Tensor) -> Result<Tensor> {
        let ln = &layer.layer_norm1;
        let c = self.dims.3;
        let t = match &self.maps {
            Some((partition, _)) => layer_norm_composed_mapped(x, &ln.weight, &ln.bias, ln.eps, partition)?,
            None => layer_norm_composed(x, &ln.weight, &ln.bias, ln.eps)?,
        };
        t.contiguous()?.reshape((self.seqs * self.tokens, c))
    }

    /// `layer_norm2(x1)` as the MLP's input rows (B·H·W, C).
    fn mlp_rows(&self, layer: &ViTLayer, x1: &Tensor) -> Result<Tensor> {
        let ln = &layer.layer_norm2;
        let (b, h, w, c) = self.dims;
        layer_norm_composed(x1, &ln.weight, &ln.bias, ln.eps)?.contiguous()?.reshape((b * h * w, c))
    }
}

/// The adapters' factors of the block's six linears ([`linears`]'s order) as the layers read
/// them: A and scale·B in `dt`, from the block's concatenated factor operand `flat` (see
/// [`super::frozen::prepare_factors`]); `None` where a layer converts its own.
type Prepared = [Option<(Tensor, Tensor)>; 6];

fn prepare(layer: &ViTLayer, flat: Option<&Tensor>, dt: candle_core::DType) -> Result<Prepared> {
    let mut out: Prepared = Default::default();
    let Some(flat) = flat else { return Ok(out) };
    let lins = linears(layer);
    let adapters: Vec<_> = lins.iter().filter_map(|l| l.lora.as_ref()).collect();
    if let Some(prepared) = super::frozen::prepare_factors(&adapters, flat, dt)? {
        let mut it = prepared.into_iter();
        for (slot, lin) in out.iter_mut().zip(lins) {
            if lin.lora.is_some() {
                *slot = it.next();
            }
        }
    }
    Ok(out)
}

/// The block's forward on an untracked `x` (B, H, W, C): the MLP branch (the output is
/// `saved.x1` plus it) and what backward needs.
fn run(layer: &ViTLayer, x: &Tensor, prepared: &Prepared, keep_h: bool) -> Result<(Tensor, Saved)> {
    let lay = BlockLayout::of(layer, x)?;
    let (b, hh, ww, c) = lay.dims;
    let (dt, dev) = (x.dtype(), x.device());
    let att = &layer.attention;
    let (heads, d) = (att.num_heads, c / att.num_heads);
    let rows = lay.attention_rows(layer, x)?;
    let take = |i: usize| prepared[i].clone();
    // The layers in the order the op-by-op path draws their dropout masks.
    let qk_map = layer.rope.heads_first_map(lay.seqs, heads);
    let q_proj = LinearStep::new(&att.q_proj, None, Some(qk_map.clone()), (rows.shape(), dt), dev, take(0))?;
    let q = q_proj.forward(&rows)?;
    let k_proj = LinearStep::new(&att.k_proj, None, Some(qk_map), (rows.shape(), dt), dev, take(1))?;
    let k = k_proj.forward(&rows)?;
    let v_proj = LinearStep::new(&att.v_proj, None, None, (rows.shape(), dt), dev, take(2))?;
    let v = v_proj.forward(&rows)?.reshape((lay.seqs, lay.tokens, heads, d))?.transpose(1, 2)?;
    drop(rows);
    let (o, attention) = AttentionStep::forward(&q, &k, &v, 1.0 / (d as f64).sqrt(), None, true)?;
    let o_rows = o.reshape((lay.seqs * lay.tokens, c))?;
    let out_map = lay.maps.as_ref().map(|(_, unpartition)| unpartition.clone());
    let o_proj = LinearStep::new(&att.o_proj, None, out_map, (o_rows.shape(), dt), dev, take(3))?;
    let y1 = o_proj.forward(&o_rows)?.reshape((b, hh, ww, c))?;
    let x1 = (x + y1)?;
    let rows2 = lay.mlp_rows(layer, &x1)?;
    let mlp = &layer.mlp;
    let fc1 = LinearStep::new(&mlp.fc1, None, None, (rows2.shape(), dt), dev, take(4))?;
    let h = fc1.forward(&rows2)?;
    drop(rows2);
    let fc2 = LinearStep::new(&mlp.fc2, Some(mlp.act), None, (h.shape(), dt), dev, take(5))?;
    let y2 = fc2.forward(&h)?.reshape((b, hh, ww, c))?;
    let h = keep_h.then_some(h);
    let saved = Saved { q, k, v, o, attention, x1, h, q_proj, k_proj, v_proj, o_proj, fc1, fc2 };
    Ok((y2, saved))
}

/// The block's backward: dx (when `need_dx`) for the output gradient `dout`, given the
/// forward's input `x` and what it kept; LoRA gradients go to `grads`.
fn backward(
    layer: &ViTLayer,
    x: &Tensor,
    s: Saved,
    dout: &Tensor,
    need_dx: bool,
    grads: &mut Vec<(Var, Tensor)>,
) -> Result<Option<Tensor>> {
    let lay = BlockLayout::of(layer, x)?;
    let (b, hh, ww, c) = lay.dims;
    let dout = dout.to_dtype(x.dtype())?;
    // out = x1 + fc2(act(fc1(ln2(x1)))).
    let rows2 = lay.mlp_rows(layer, &s.x1)?;
    let dy2 = dout.reshape((b * hh * ww, c))?;
    let h = match s.h {
        Some(h) => h,
        None => crate::profile::inner(|| "vit block fc1 recompute".to_string(), || s.fc1.forward(&rows2))?,
    };
    let dh = s.fc2.backward(&h, &dy2, true, grads)?;
    drop(h);
    let dh = dh.ok_or_else(|| candle_core::Error::Msg("ViT block: fc2 returned no input gradient".into()))?;
    let drows2 = s.fc1.backward(&rows2, &dh, true, grads)?;
    drop((dh, rows2));
    let drows2 =
        drows2.ok_or_else(|| candle_core::Error::Msg("ViT block: fc1 returned no input gradient".into()))?;
    let ln2 = &layer.layer_norm2;
    let dx1 =
        (&dout + layer_norm_input_grad(&s.x1, &drows2.reshape((b, hh, ww, c))?, &ln2.weight, ln2.eps)?)?;
    drop((dout, drows2, s.x1));
    // x1 = x + o_proj(attention(q, k, v)), the projection writing the map (window blocks) or
    // rows (global ones).
    let o_rows = s.o.reshape((lay.seqs * lay.tokens, c))?;
    let dy1 = if lay.maps.is_some() { dx1.clone() } else { dx1.reshape((b * hh * ww, c))? };
    let do_rows = s.o_proj.backward(&o_rows, &dy1, true, grads)?;
    drop(dy1);
    let do_rows = do_rows
        .ok_or_else(|| candle_core::Error::Msg("ViT block: o_proj returned no input gradient".into()))?;
    let (heads, d) = (layer.attention.num_heads, c / layer.attention.num_heads);
    let d_o = do_rows.reshape((lay.seqs, lay.tokens, heads, d))?;
    let (dq, dk, dv) = s.attention.backward(&s.q, &s.k, &s.v, &s.o, &d_o)?;
    drop((d_o, do_rows, o_rows, s.o, s.q, s.k, s.v));
    // q, k, v all read layer_norm1(x) (as windows for a window block).
    let rows = lay.attention_rows(layer, x)?;
    let dv_rows = dv.transpose(1, 2)?.contiguous()?.reshape((lay.seqs * lay.tokens, c))?;
    drop(dv);
    let mut d_rows = None;
    for (step, dy) in [(&s.q_proj, dq), (&s.k_proj, dk), (&s.v_proj, dv_rows)] {
        let g = step.backward(&rows, &dy, need_dx, grads)?;
        d_rows = match (d_rows, g) {
            (Some(acc), Some(g)) => Some((acc + g)?),
            (acc, g) => acc.or(g),
        };
    }
    drop(rows);
    let Some(d_rows) = d_rows.filter(|_| need_dx) else { return Ok(None) };
    // Back through the windows (or the sequence view) to layer_norm1's natural output.
    let d_ln1 = match &lay.maps {
        Some((partition, _)) => (partition.backward)(&d_rows.reshape((lay.seqs, lay.tokens, c))?)?,
        None => d_rows.reshape((b, hh, ww, c))?,
    };
    let ln1 = &layer.layer_norm1;
    let dx = (dx1 + layer_norm_input_grad(x, &d_ln1, &ln1.weight, ln1.eps)?)?;
    Ok(Some(dx))
}

/// The recorded op: on (x) for a block without adapters, on (x, factors) for one with them,
/// `factors` being every adapter's A and B flattened and concatenated (so the factors'
/// gradients flow back through candle's own graph, as one small tensor); inside
/// [`super::recompute::with_side_grads`] on (x, anchor), the gradients going to the side store.
struct BlockOp {
    layer: ViTLayer,
    /// The block's dropout sub-stream key (the recomputation replays it).
    key: u64,
    /// The adapter factors and the way their gradients leave the op.
    factors: OpFactors,
    /// The factors as the layers read them (for the recomputation).
    prepared: Prepared,
    /// What the forward kept; `None` with checkpointing (or once the backward took it).
    saved: Mutex<Option<Saved>>,
    out: Precomputed,
}

impl BlockOp {
    /// dx (when x is tracked) and the factors' gradients, concatenated like the operand.
    fn gradients(&self, x: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let kind = if self.layer.window_size > 0 { "window" } else { "global" };
        let xd = x.detach();
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let saved = match saved {
            Some(s) => s,
            None => crate::profile::inner(
                || format!("vit {kind} block recompute"),
                || {
                    let rerun = || run(&self.layer, &xd, &self.prepared, true);
                    Result::Ok(crate::rng::with_substream(self.key, x.device(), rerun)?.1)
                },
            )?,
        };
        let mut grads = Vec::with_capacity(self.factors.vars.len());
        let dx = crate::profile::inner(
            || format!("vit {kind} block backward"),
            || backward(&self.layer, &xd, saved, &grad.detach(), x.track_op(), &mut grads),
        )?;
        Ok((dx, self.factors.gradient(grads)?))
    }
}

impl candle_core::CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "vit-block"
    }

    precomputed_kernels!(_x);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.gradients(x, grad)?.0)
    }
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "vit-block"
    }

    precomputed_kernels!(_x, _factors);

    fn bwd(
        &self,
        x: &Tensor,
        _factors: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.gradients(x, grad)
    }
}

/// The block's six linears.
fn linears(layer: &ViTLayer) -> [&super::nn::Linear; 6] {
    let (att, mlp) = (&layer.attention, &layer.mlp);
    [&att.q_proj, &att.k_proj, &att.v_proj, &att.o_proj, &mlp.fc1, &mlp.fc2]
}

/// Whether the op serves `layer` on `x`: the block records a graph (`x` is tracked, or the
/// block has LoRA factors to train outside [`super::recompute::no_grad`]) and its own weights
/// are frozen (the op computes no gradient for them; a trainable one keeps the op-by-op path).
pub fn serves(layer: &ViTLayer, x: &Tensor) -> bool {
    let lins = linears(layer);
    super::layer_op::frozen(&lins, &[&layer.layer_norm1, &layer.layer_norm2])
        && super::layer_op::records(&[x], &lins)
}

/// `layer(x)` for channels-last `x` (B, H, W, C) as one recorded op (see the module docs),
/// keeping for backward what `checkpointing` says. Takes the block's dropout key as [`crate::rng::keyed`]
/// does. Call where [`serves`] says so.
pub fn forward(layer: &ViTLayer, x: &Tensor, checkpointing: Checkpointing) -> Result<Tensor> {
    let checkpoint = checkpointing == Checkpointing::Full;
    let keep_h = checkpointing == Checkpointing::Off;
    let key = crate::rng::next_key();
    let xd = x.detach();
    let kind = if layer.window_size > 0 { "window" } else { "global" };
    // In a side-store scope the factors' gradients skip candle's graph: the op is on an anchor
    // and each layer converts its own factors (one launch each on the GPU).
    let factors = OpFactors::of(linears(layer));
    let operand = factors.operand()?;
    let prepared = prepare(layer, operand.as_ref(), x.dtype())?;
    let (out, saved) = crate::profile::inner(
        || format!("vit {kind} block forward"),
        || {
            let first = || run(layer, &xd, &prepared, keep_h);
            let (y2, saved) = crate::rng::with_substream(key, x.device(), first)?;
            // The residual sum straight into the op's output storage.
            let out =
                Precomputed::from_storage(binary_storage(&saved.x1, &y2, Binary::Add)?, y2.shape().clone());
            Result::Ok((out, saved))
        },
    )?;
    let side = factors.side;
    let op = BlockOp {
        layer: layer.clone(),
        key,
        factors,
        prepared,
        saved: Mutex::new((!checkpoint).then_some(saved)),
        out,
    };
    match operand {
        Some(f) => x.apply_op2(&f, op),
        None if side => x.apply_op2(super::recompute::anchor(x.device())?.as_tensor(), op),
        None => x.apply_op1(op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraAdapter;
    use crate::sam3::config::VisionConfig;
    use crate::sam3::vision::VisionModel;
    use crate::sam3::visit::VisitLinears;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn config(layers: usize, window: usize, global: Vec<usize>) -> VisionConfig {
        let mut cfg = crate::sam3::vision::tests::tiny_config(24, window, global, vec![1.0]);
        cfg.backbone_config.num_hidden_layers = layers;
        cfg
    }

    /// ViT blocks with random frozen weights (plain tensors) and a random LoRA adapter (B ≠ 0,
    /// dropout `p`, training) on each of their six linears.
    fn adapted_layers(cfg: &VisionConfig, p: f64) -> Result<Vec<ViTLayer>> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        VisionModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("vision_encoder"), cfg)?;
        let mut frozen = HashMap::new();
        for (name, v) in varmap.data().lock().unwrap().iter() {
            let r = Tensor::randn(0f32, 1.0, v.shape(), &dev)?;
            let t = if name.contains("layer_norm") && name.ends_with("weight") {
                ((r * 0.2)? + 1.0)?
            } else {
                (r * (0.5 / (v.elem_count() as f64 / v.dim(0)?.max(1) as f64).sqrt().max(1.0)))?
            };
            frozen.insert(name.clone(), t);
        }
        let model =
            VisionModel::load(VarBuilder::from_tensors(frozen, DType::F32, &dev).pp("vision_encoder"), cfg)?;
        let training = Arc::new(AtomicBool::new(true));
        let mut layers = model.backbone.layers;
        for layer in &mut layers {
            let mut failure = None;
            layer.visit_linears(&mut |lin| {
                let (i, o) = (lin.in_dim(), lin.out_dim());
                let mk = |shape: (usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 0.3, shape, &dev)?);
                match (mk((4, i)), mk((o, 4))) {
                    (Ok(a), Ok(b)) => {
                        lin.lora =
                            Some(LoraAdapter { a, b, scale: 2.0, dropout: p, training: training.clone() })
                    }
                    (Err(e), _) | (_, Err(e)) => failure = Some(e),
                }
            });
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(layers)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(d / m.max(1e-12))
    }

    #[derive(Clone, Copy, Debug)]
    enum Path {
        /// Op by op, each block under its own dropout key (what the model did before the op).
        Ops,
        /// The block op, keeping what backward needs.
        Op,
        /// The block op with checkpointing.
        OpCheckpointed,
        /// The block op recomputing fc1's output in backward.
        OpMlpRecomputed,
        /// The block op with its factor gradients in the side store.
        OpSide,
        /// The same, checkpointed.
        OpSideCheckpointed,
    }

    /// The blocks' output and the gradients (of x when tracked, then A and B of every adapter)
    /// of a random weighting of it, along `path`, dropout masks from seed 5.
    fn run_path(
        layers: &[ViTLayer],
        x: &Tensor,
        target: &Tensor,
        path: Path,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        crate::rng::reseed(&[5]);
        let mut y = x.clone();
        for layer in layers {
            y = match path {
                Path::Ops => crate::rng::keyed(y.device(), || layer.forward(&y))?,
                _ => {
                    assert!(serves(layer, &y));
                    let checkpointing = match path {
                        Path::OpCheckpointed | Path::OpSideCheckpointed => Checkpointing::Full,
                        Path::OpMlpRecomputed => Checkpointing::Mlp,
                        _ => Checkpointing::Off,
                    };
                    match path {
                        Path::OpSide | Path::OpSideCheckpointed => {
                            crate::sam3::recompute::with_side_grads(|| forward(layer, &y, checkpointing))?
                        }
                        _ => forward(layer, &y, checkpointing)?,
                    }
                }
            };
        }
        // A plain backward: the op's factor gradients flow through candle's graph, or (side
        // paths) into the side store, merged after it.
        let mut grads = (&y * target)?.sum_all()?.backward()?;
        let through_graph = grads.get_ids().count();
        crate::sam3::recompute::merge_side_grads(&mut grads)?;
        if matches!(path, Path::OpSide | Path::OpSideCheckpointed) {
            assert!(grads.get_ids().count() > through_graph, "{path:?}: nothing came through the side store");
        }
        let mut out = Vec::new();
        if x.track_op() {
            out.push(grads.get(x).expect("a gradient for x").clone());
        }
        for layer in layers {
            let mut layer = layer.clone();
            let mut failure = None;
            layer.visit_linears(&mut |lin| {
                let l = lin.lora.as_ref().expect("adapted");
                for v in [&l.a, &l.b] {
                    match grads.get(v.as_tensor()) {
                        Some(g) => out.push(g.clone()),
                        None => failure = Some(lin.path.clone()),
                    }
                }
            });
            if let Some(path) = failure {
                panic!("no LoRA gradient for {path}");
            }
        }
        Ok((y, out))
    }

    /// The op's output and gradients equal the op-by-op graph's (window blocks with padding and
    /// a global block, dropout on, with and without checkpointing or fc1's output recomputed,
    /// tracked and untracked input), and every adapter weight gets a non-zero gradient.
    #[test]
    fn matches_the_op_by_op_block_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Grid 6 with window 4: padded windows; block 1 is global.
        let layers = adapted_layers(&config(3, 4, vec![1]), 0.3)?;
        let target = Tensor::randn(0f32, 1.0, (2, 6, 6, 16), &dev)?;
        let xt = Tensor::randn(0f32, 1.0, (2, 6, 6, 16), &dev)?;
        for tracked in [true, false] {
            let xv = Var::from_tensor(&xt)?;
            let x = if tracked { xv.as_tensor().clone() } else { xt.clone() };
            let (want_y, want) = run_path(&layers, &x, &target, Path::Ops)?;
            assert_eq!(want.len(), usize::from(tracked) + 3 * 12);
            for g in &want {
                let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(m > 0.0 && m.is_finite(), "a gradient is {m}");
            }
            for path in [
                Path::Op,
                Path::OpCheckpointed,
                Path::OpMlpRecomputed,
                Path::OpSide,
                Path::OpSideCheckpointed,
            ] {
                let (y, got) = run_path(&layers, &x, &target, path)?;
                let dy = max_rel(&y, &want_y)?;
                assert!(dy < 1e-6, "{path:?} (tracked {tracked}): output differs by {dy}");
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let d = max_rel(g, w)?;
                    assert!(d < 1e-4, "{path:?} (tracked {tracked}): gradient {i} differs by {d} (relative)");
                }
            }
        }
        Ok(())
    }

    /// The setting reads as the config writes it (booleans, `mlp`) and round-trips.
    #[test]
    fn checkpointing_reads_booleans_and_mlp() {
        for (text, want) in [
            ("false", Checkpointing::Off),
            ("true", Checkpointing::Full),
            ("mlp", Checkpointing::Mlp),
            ("MLP", Checkpointing::Mlp),
            ("full", Checkpointing::Full),
        ] {
            let got: Checkpointing = serde_yaml::from_str(text).unwrap();
            assert_eq!(got, want, "{text}");
            let back: Checkpointing = serde_yaml::from_str(&serde_yaml::to_string(&got).unwrap()).unwrap();
            assert_eq!(back, want);
        }
        let e = serde_yaml::from_str::<Checkpointing>("sometimes").unwrap_err().to_string();
        assert!(e.contains("true, false or mlp"), "{e}");
    }

    /// Running out of memory is passed on (the op-by-op graph would need more); other
    /// failures switch the op off.
    #[test]
    fn only_other_failures_fall_back() {
        assert!(out_of_memory("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"));
        assert!(out_of_memory("cuda: Out of memory while allocating 2147483648 bytes"));
        assert!(!out_of_memory("shape mismatch in matmul, lhs: [2, 3], rhs: [4, 5]"));
        assert!(!out_of_memory("cuBLASLt: CublasError(CUBLAS_STATUS_NOT_SUPPORTED)"));
    }

    /// Trainable block weights keep the op-by-op path (the op differentiates none of them); so
    /// does a block with nothing to train.
    #[test]
    fn serves_only_frozen_blocks_on_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = config(1, 4, vec![]);
        let layers = adapted_layers(&cfg, 0.0)?;
        let x = Tensor::randn(0f32, 1.0, (1, 6, 6, 16), &dev)?;
        assert!(serves(&layers[0], &x));
        assert!(!crate::sam3::recompute::no_grad(|| serves(&layers[0], &x)));
        let varmap = VarMap::new();
        let model =
            VisionModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("vision_encoder"), &cfg)?;
        let xv = Var::from_tensor(&x)?;
        assert!(!serves(&model.backbone.layers[0], xv.as_tensor()));
        let plain = adapted_layers(&cfg, 0.0)?.remove(0);
        let mut plain = plain;
        plain.visit_linears(&mut |lin| lin.lora = None);
        assert!(!serves(&plain, &x) && serves(&plain, xv.as_tensor()));
        Ok(())
    }
}
