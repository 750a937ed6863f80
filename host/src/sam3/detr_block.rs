//! The DETR encoder's, the DETR decoder's and the geometry encoder's layers (transformers'
//! `Sam3DetrEncoderLayer`, `Sam3DetrDecoderLayer`, `Sam3GeometryEncoderLayer`) each as one
//! recorded op with a hand-written backward, as [`super::vit_block`] does for the ViT's blocks.
//!
//! Recorded op by op, an encoder or geometry layer is about 45 graph nodes and a decoder layer
//! about 100, on small tensors (256 wide, 200 queries, a few prompt tokens): each node costs
//! the host more to issue than the device to run, and candle's backward adds a zero tensor and
//! a sum per gradient edge. On the GPU the heads' forward and backward are bound by the host
//! (BENCHMARKS.md: ~50 ms of host time for ~26 ms of device work in their forward at batch 2).
//! Here each layer is one op on three operands: (image tokens, prompt tokens) for a DETR
//! encoder layer (the pre-norm layer that also serves the geometry encoder, there on (prompt
//! tokens, image tokens)), (queries, prompt tokens and image memory concatenated) for a
//! decoder layer, then the layer's LoRA factors concatenated, or an anchor when their
//! gradients go to the side store ([`super::layer_op`]). The forward runs the same layers
//! unrecorded ([`LinearStep`], [`AttentionStep`], the LayerNorm kernels, [`dropout_step`]) and
//! keeps what the backward needs; the backward chains their backward functions by hand.
//!
//! The values are those of the op-by-op path ([`DetrEncoderLayer::forward`],
//! [`DetrDecoderLayer::forward`], [`GeometryEncoderLayer::forward`]): the same functions in
//! the same order, the dropout masks drawn in the same order from the same stream; gradients
//! agree to rounding (the tests and `lorahost selftest` compare both). Constant operands
//! (positions, attention biases, query positions) must be untracked and the layer's own
//! weights frozen, else the op-by-op path runs ([`serves_encoder`], [`serves_decoder`],
//! [`serves_geometry`]). `LORAHOST_DETR_LAYER_OP=0` switches the ops off (A/B timings); a
//! failing op switches them off for the process with a warning.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor, Var};
use std::sync::Mutex;

use super::attention::AttentionStep;
use super::decoder::DetrDecoderLayer;
use super::encoder::DetrEncoderLayer;
use super::frozen::LinearStep;
use super::geometry::GeometryEncoderLayer;
use super::layer_op::OpFactors;
use super::nn::{LayerNorm, Linear, Mlp, MultiHeadAttention};
use super::ops::{dropout_step, layer_norm_composed, layer_norm_input_grad, precomputed_kernels};
use super::ops::{DropoutStep, Precomputed};

/// Set when an op's forward failed in this process.
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    static OFF_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether DETR layers on a training graph run as one op (`LORAHOST_DETR_LAYER_OP=0`: no; nor
/// after a failure, nor inside [`op_by_op`]).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LORAHOST_DETR_LAYER_OP").is_ok_and(|v| v == "0"))
        && !FAILED.load(std::sync::atomic::Ordering::Relaxed)
        && !OFF_HERE.with(|c| c.get())
}

/// Run `f` with the layers recorded op by op on this thread (comparisons of both paths).
pub fn op_by_op<R>(f: impl FnOnce() -> R) -> R {
    let prev = OFF_HERE.with(|c| c.replace(true));
    let r = f();
    OFF_HERE.with(|c| c.set(prev));
    r
}

/// After an op's forward failed with `e`: the error itself when memory ran out, else `Ok`
/// after switching the ops off for the rest of the process with a warning (the caller then
/// runs the layer op by op).
pub fn fall_back(e: candle_core::Error) -> Result<()> {
    let text = e.to_string();
    if super::layer_op::out_of_memory(&text) {
        return Err(e);
    }
    tracing::warn!("the DETR layer op failed ({text}); recording the DETR layers op by op from here on");
    FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// (B, N, C) → (B·N, C) rows (a copy only when `t` is a view).
fn rows(t: &Tensor) -> Result<Tensor> {
    let (b, n, c) = t.dims3()?;
    t.contiguous()?.reshape((b * n, c))
}

/// `Some(a + b)` of two optional gradients (either alone as it is).
fn sum(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
}

/// An input gradient a step had to return.
fn needed(t: Option<Tensor>, what: &str) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg(format!("DETR layer op: {what} returned no input gradient")))
}

/// A LayerNorm of untracked `x` (the kernel on the GPU, else composed in f32).
fn norm(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    layer_norm_composed(x, &ln.weight, &ln.bias, ln.eps)
}

/// `x`'s gradient through `ln` for its output's gradient `dy`.
fn norm_grad(ln: &LayerNorm, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    layer_norm_input_grad(x, dy, &ln.weight, ln.eps)
}

/// One attention sublayer's forward ([`MultiHeadAttention::forward`] unrecorded) and what its
/// backward needs.
struct Attend {
    /// The projections' inputs as rows.
    query: Tensor,
    key: Tensor,
    value: Tensor,
    /// q, k, v heads first (B, H, N, Dh); the attention output (B, Nq, H, Dh).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    step: AttentionStep,
    q_proj: LinearStep,
    k_proj: LinearStep,
    v_proj: LinearStep,
    o_proj: LinearStep,
    /// (B, Nq, Nk, C, heads).
    dims: (usize, usize, usize, usize, usize),
}

impl Attend {
    /// `mha(query, key, value)` (B, Nq, C) with the constant additive `bias` (broadcastable to
    /// (B, heads, Nq, Nk)), of untracked (B, N, C) inputs.
    fn forward(
        mha: &MultiHeadAttention,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Attend)> {
        let (b, nq, c) = query.dims3()?;
        let nk = key.dim(1)?;
        let (heads, dh) = (mha.num_heads, c / mha.num_heads);
        let (dt, dev) = (query.dtype(), query.device());
        let (query, key, value) = (rows(query)?, rows(key)?, rows(value)?);
        // Constructed in the order the op-by-op path draws the adapters' dropout masks.
        let q_proj = LinearStep::new(&mha.q_proj, None, None, (query.shape(), dt), dev, None)?;
        let q = q_proj.forward(&query)?.reshape((b, nq, heads, dh))?.transpose(1, 2)?;
        let k_proj = LinearStep::new(&mha.k_proj, None, None, (key.shape(), dt), dev, None)?;
        let k = k_proj.forward(&key)?.reshape((b, nk, heads, dh))?.transpose(1, 2)?;
        let v_proj = LinearStep::new(&mha.v_proj, None, None, (value.shape(), dt), dev, None)?;
        let v = v_proj.forward(&value)?.reshape((b, nk, heads, dh))?.transpose(1, 2)?;
        let (o, step) = AttentionStep::forward(&q, &k, &v, 1.0 / (dh as f64).sqrt(), bias, true)?;
        let o_rows = o.reshape((b * nq, c))?;
        let o_proj = LinearStep::new(&mha.o_proj, None, None, (o_rows.shape(), dt), dev, None)?;
        let y = o_proj.forward(&o_rows)?.reshape((b, nq, c))?;
        let dims = (b, nq, nk, c, heads);
        Ok((y, Attend { query, key, value, q, k, v, o, step, q_proj, k_proj, v_proj, o_proj, dims }))
    }

    /// The gradients of (query, key, value), each (B, N, C), for the output gradient `dy`
    /// (B, Nq, C): each where `need` says (the adapters' gradients always, into `grads`).
    fn backward(
        self,
        dy: &Tensor,
        need: [bool; 3],
        grads: &mut Vec<(Var, Tensor)>,
    ) -> Result<[Option<Tensor>; 3]> {
        let (b, nq, nk, c, heads) = self.dims;
        let o_rows = self.o.reshape((b * nq, c))?;
        let d_o = needed(self.o_proj.backward(&o_rows, &rows(dy)?, true, grads)?, "o_proj")?;
        let d_o = d_o.reshape((b, nq, heads, c / heads))?;
        let (dq, dk, dv) = self.step.backward(&self.q, &self.k, &self.v, &self.o, &d_o)?;
        drop((d_o, o_rows));
        let heads_rows = |t: Tensor, n: usize| t.transpose(1, 2)?.contiguous()?.reshape((b * n, c));
        let back = |step: &LinearStep, x: &Tensor, g: Tensor, n: usize, need: bool, grads: &mut Vec<_>| {
            let dx = step.backward(x, &heads_rows(g, n)?, need, grads)?;
            dx.map(|t| t.reshape((b, n, c))).transpose()
        };
        let dquery = back(&self.q_proj, &self.query, dq, nq, need[0], grads)?;
        let dkey = back(&self.k_proj, &self.key, dk, nk, need[1], grads)?;
        let dvalue = back(&self.v_proj, &self.value, dv, nk, need[2], grads)?;
        Ok([dquery, dkey, dvalue])
    }
}

/// An MLP's forward (`fc2(act(fc1(x)))` unrecorded, the activation folded into fc2) and what
/// its backward needs.
struct Ffn {
    /// fc1's input rows and output (fc2's input before the activation).
    x: Tensor,
    h: Tensor,
    fc1: LinearStep,
    fc2: LinearStep,
}

impl Ffn {
    fn forward(mlp: &Mlp, x: &Tensor) -> Result<(Tensor, Ffn)> {
        let (b, n, c) = x.dims3()?;
        let (dt, dev) = (x.dtype(), x.device());
        let x = rows(x)?;
        let fc1 = LinearStep::new(&mlp.fc1, None, None, (x.shape(), dt), dev, None)?;
        let h = fc1.forward(&x)?;
        let fc2 = LinearStep::new(&mlp.fc2, Some(mlp.act), None, (h.shape(), dt), dev, None)?;
        let y = fc2.forward(&h)?.reshape((b, n, c))?;
        Ok((y, Ffn { x, h, fc1, fc2 }))
    }

    /// The input's gradient (B, N, C) for the output gradient `dy`.
    fn backward(self, dy: &Tensor, grads: &mut Vec<(Var, Tensor)>) -> Result<Tensor> {
        let shape = dy.shape().clone();
        let dh = needed(self.fc2.backward(&self.h, &rows(dy)?, true, grads)?, "fc2")?;
        drop(self.h);
        needed(self.fc1.backward(&self.x, &dh, true, grads)?, "fc1")?.reshape(shape)
    }
}

/// A pre-norm layer's parts: the DETR encoder's (transformers' `Sam3DetrEncoderLayer`) and the
/// geometry encoder's (`Sam3GeometryEncoderLayer`) layers, which differ only in where positions
/// and the key-padding bias enter.
struct PreNorm<'a> {
    norms: [&'a LayerNorm; 3],
    self_attn: &'a MultiHeadAttention,
    cross_attn: &'a MultiHeadAttention,
    mlp: &'a Mlp,
}

impl<'a> PreNorm<'a> {
    fn encoder(l: &'a DetrEncoderLayer) -> Self {
        let norms = [&l.layer_norm1, &l.layer_norm2, &l.layer_norm3];
        PreNorm { norms, self_attn: &l.self_attn, cross_attn: &l.cross_attn, mlp: &l.mlp }
    }

    fn geometry(l: &'a GeometryEncoderLayer) -> Self {
        let norms = [&l.layer_norm1, &l.layer_norm2, &l.layer_norm3];
        PreNorm { norms, self_attn: &l.self_attn, cross_attn: &l.cross_attn, mlp: &l.mlp }
    }

    /// The ten linears the adapters sit on, in op order.
    fn linears(&self) -> Vec<&'a Linear> {
        let (s, c) = (self.self_attn, self.cross_attn);
        vec![
            &s.q_proj,
            &s.k_proj,
            &s.v_proj,
            &s.o_proj,
            &c.q_proj,
            &c.k_proj,
            &c.v_proj,
            &c.o_proj,
            &self.mlp.fc1,
            &self.mlp.fc2,
        ]
    }
}

/// A pre-norm layer's constant operands: positions added to the self-attention's queries and
/// keys (the DETR encoder's image positions) and to the cross-attention's keys (the geometry
/// encoder's), the two attentions' additive biases, the residual dropout.
#[derive(Clone, Default)]
struct PreNormConsts {
    self_pos: Option<Tensor>,
    self_bias: Option<Tensor>,
    key_pos: Option<Tensor>,
    cross_bias: Option<Tensor>,
    dropout: f64,
    train: bool,
}

/// What a pre-norm layer's forward keeps for its backward.
struct PreNormSaved {
    /// The inputs of LayerNorm 2 and 3 (the residual stream after each branch).
    x1: Tensor,
    x2: Tensor,
    self_attn: Attend,
    cross_attn: Attend,
    mlp: Ffn,
    drops: [DropoutStep; 3],
}

/// The pre-norm layer on untracked operands: `x` the tokens it updates, `ctx` those it
/// cross-attends to (see [`DetrEncoderLayer::forward`], [`GeometryEncoderLayer::forward`]).
fn prenorm_run(l: &PreNorm, x: &Tensor, ctx: &Tensor, c: &PreNormConsts) -> Result<(Tensor, PreNormSaved)> {
    let h = norm(l.norms[0], x)?;
    let h_pos = match &c.self_pos {
        Some(pos) => h.broadcast_add(pos)?,
        None => h.clone(),
    };
    let (a, self_attn) = Attend::forward(l.self_attn, &h_pos, &h_pos, &h, c.self_bias.as_ref())?;
    drop(h_pos);
    let (x1, d1) = dropout_step(&a, Some(x), c.dropout, c.train)?;
    let h = norm(l.norms[1], &x1)?;
    let key = match &c.key_pos {
        Some(pos) => ctx.broadcast_add(pos)?,
        None => ctx.clone(),
    };
    let (a, cross_attn) = Attend::forward(l.cross_attn, &h, &key, ctx, c.cross_bias.as_ref())?;
    drop(key);
    let (x2, d2) = dropout_step(&a, Some(&x1), c.dropout, c.train)?;
    let (m, mlp) = Ffn::forward(l.mlp, &norm(l.norms[2], &x2)?)?;
    let (out, d3) = dropout_step(&m, Some(&x2), c.dropout, c.train)?;
    Ok((out, PreNormSaved { x1, x2, self_attn, cross_attn, mlp, drops: [d1, d2, d3] }))
}

/// The pre-norm layer's backward: the gradients of x and ctx (where `need`), the adapters'
/// into `grads`.
fn prenorm_backward(
    l: &PreNorm,
    x: &Tensor,
    s: PreNormSaved,
    dout: &Tensor,
    need: [bool; 2],
    grads: &mut Vec<(Var, Tensor)>,
) -> Result<[Option<Tensor>; 2]> {
    let [d1, d2, d3] = s.drops;
    let dh3 = s.mlp.backward(&d3.backward(dout)?, grads)?;
    let dx2 = (dout + norm_grad(l.norms[2], &s.x2, &dh3)?)?;
    drop((dh3, s.x2));
    let [dh2, dk, dv] = s.cross_attn.backward(&d2.backward(&dx2)?, [true, need[1], need[1]], grads)?;
    let dctx = sum(dk, dv)?;
    let dx1 = (&dx2 + norm_grad(l.norms[1], &s.x1, &needed(dh2, "cross_attn")?)?)?;
    drop((dx2, s.x1));
    let [dq, dk, dv] = s.self_attn.backward(&d1.backward(&dx1)?, [need[0]; 3], grads)?;
    if !need[0] {
        return Ok([None, dctx]);
    }
    let dh = sum(sum(dq, dk)?, dv)?;
    let dx = (dx1 + norm_grad(l.norms[0], x, &needed(dh, "self_attn")?)?)?;
    Ok([Some(dx), dctx])
}

/// The decoder layer's operands besides the queries: query positions with the presence
/// token's zero row (B, 1 + N, C), the prompt, the memory and its positions (B, HW, C), the
/// attention biases, DAC's one-to-many queries, the residual dropout.
#[derive(Clone)]
struct DecoderConsts {
    query_pos: Tensor,
    /// The prompt and the memory, read as they are (untracked; their gradients leave the op
    /// as the context operand's).
    text: Tensor,
    memory: Tensor,
    vision_pos: Tensor,
    text_bias: Option<Tensor>,
    vision_bias: Option<Tensor>,
    num_o2m: usize,
    dropout: f64,
    train: bool,
}

/// What the decoder layer's forward keeps for its backward.
struct DecoderSaved {
    /// The inputs of the four LayerNorms (each branch's residual sum).
    sums: [Tensor; 4],
    self_attn: Attend,
    text_attn: Attend,
    vision_attn: Attend,
    mlp: Ffn,
    drops: [DropoutStep; 4],
}

/// The post-norm decoder layer on untracked operands (see [`DetrDecoderLayer::forward`]).
fn decoder_run(
    layer: &DetrDecoderLayer,
    hidden: &Tensor,
    c: &DecoderConsts,
) -> Result<(Tensor, DecoderSaved)> {
    let (b, n1, width) = hidden.dims3()?;
    let (text, memory) = (&c.text, &c.memory);
    let n_sa = n1 - c.num_o2m;
    let (x_sa, pos_sa) = if c.num_o2m > 0 {
        (hidden.narrow(1, 0, n_sa)?, c.query_pos.narrow(1, 0, n_sa)?)
    } else {
        (hidden.clone(), c.query_pos.clone())
    };
    let qk = (&x_sa + &pos_sa)?;
    let (a, self_attn) = Attend::forward(&layer.self_attn, &qk, &qk, &x_sa, None)?;
    drop(qk);
    let (mut a, d1) = dropout_step(&a, None, c.dropout, c.train)?;
    if c.num_o2m > 0 {
        let pad = Tensor::zeros((b, c.num_o2m, width), a.dtype(), a.device())?;
        a = Tensor::cat(&[&a, &pad], 1)?;
    }
    let s1 = (hidden + a)?;
    let h = norm(&layer.self_attn_layer_norm, &s1)?;
    let q = (&h + &c.query_pos)?;
    let (a, text_attn) = Attend::forward(&layer.text_cross_attn, &q, text, text, c.text_bias.as_ref())?;
    let (s2, d2) = dropout_step(&a, Some(&h), c.dropout, c.train)?;
    let h = norm(&layer.text_cross_attn_layer_norm, &s2)?;
    let q = (&h + &c.query_pos)?;
    let k = memory.broadcast_add(&c.vision_pos)?;
    let (a, vision_attn) = Attend::forward(&layer.vision_cross_attn, &q, &k, memory, c.vision_bias.as_ref())?;
    drop((q, k));
    let (s3, d3) = dropout_step(&a, Some(&h), c.dropout, c.train)?;
    let h = norm(&layer.vision_cross_attn_layer_norm, &s3)?;
    let (m, mlp) = Ffn::forward(&layer.mlp, &h)?;
    let (s4, d4) = dropout_step(&m, Some(&h), c.dropout, c.train)?;
    let out = norm(&layer.mlp_layer_norm, &s4)?;
    let saved = DecoderSaved {
        sums: [s1, s2, s3, s4],
        self_attn,
        text_attn,
        vision_attn,
        mlp,
        drops: [d1, d2, d3, d4],
    };
    Ok((out, saved))
}

/// The decoder layer's backward: the gradients of the queries and the context (where `need`),
/// the adapters' into `grads`.
fn decoder_backward(
    layer: &DetrDecoderLayer,
    s: DecoderSaved,
    c: &DecoderConsts,
    dout: &Tensor,
    need: [bool; 2],
    grads: &mut Vec<(Var, Tensor)>,
) -> Result<[Option<Tensor>; 2]> {
    let [s1, s2, s3, s4] = s.sums;
    let [d1, d2, d3, d4] = s.drops;
    // out = LN4(s4), s4 = h3 + drop(mlp(h3)).
    let ds4 = norm_grad(&layer.mlp_layer_norm, &s4, dout)?;
    drop(s4);
    let dh3 = (&ds4 + s.mlp.backward(&d4.backward(&ds4)?, grads)?)?;
    drop(ds4);
    // h3 = LN3(s3), s3 = h2 + drop(vision_attn(h2 + pos, memory + pos, memory)).
    let ds3 = norm_grad(&layer.vision_cross_attn_layer_norm, &s3, &dh3)?;
    drop((s3, dh3));
    let [dq, dk, dv] = s.vision_attn.backward(&d3.backward(&ds3)?, [true, need[1], need[1]], grads)?;
    let dmemory = sum(dk, dv)?;
    let dh2 = (ds3 + needed(dq, "vision_cross_attn")?)?;
    // h2 = LN2(s2), s2 = h1 + drop(text_attn(h1 + pos, text, text)).
    let ds2 = norm_grad(&layer.text_cross_attn_layer_norm, &s2, &dh2)?;
    drop((s2, dh2));
    let [dq, dk, dv] = s.text_attn.backward(&d2.backward(&ds2)?, [true, need[1], need[1]], grads)?;
    let dtext = sum(dk, dv)?;
    let dh1 = (ds2 + needed(dq, "text_cross_attn")?)?;
    // h1 = LN1(s1), s1 = hidden + pad(drop(self_attn(x_sa + pos, x_sa + pos, x_sa))).
    let ds1 = norm_grad(&layer.self_attn_layer_norm, &s1, &dh1)?;
    drop((s1, dh1));
    let (b, n1, width) = ds1.dims3()?;
    let n_sa = n1 - c.num_o2m;
    let da = if c.num_o2m > 0 { ds1.narrow(1, 0, n_sa)? } else { ds1.clone() };
    let [dq, dk, dv] = s.self_attn.backward(&d1.backward(&da)?, [need[0]; 3], grads)?;
    let dcontext = match need[1] {
        false => None,
        true => {
            let dtext = match dtext {
                Some(t) => t,
                None => c.text.zeros_like()?.to_dtype(ds1.dtype())?,
            };
            let dmemory = needed(dmemory, "vision_cross_attn")?;
            Some(Tensor::cat(&[&dtext, &dmemory], 1)?)
        }
    };
    if !need[0] {
        return Ok([None, dcontext]);
    }
    let mut dx_sa = needed(sum(sum(dq, dk)?, dv)?, "self_attn")?;
    if c.num_o2m > 0 {
        let pad = Tensor::zeros((b, c.num_o2m, width), dx_sa.dtype(), dx_sa.device())?;
        dx_sa = Tensor::cat(&[&dx_sa, &pad], 1)?;
    }
    Ok([Some((ds1 + dx_sa)?), dcontext])
}

/// The fourteen linears of a decoder layer's adapters, in op order.
fn decoder_linears(layer: &DetrDecoderLayer) -> Vec<&Linear> {
    let mut out = Vec::with_capacity(14);
    for a in [&layer.self_attn, &layer.text_cross_attn, &layer.vision_cross_attn] {
        out.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
    }
    out.extend([&layer.mlp.fc1, &layer.mlp.fc2]);
    out
}

/// The layer an op runs (and the constants its backward reads).
enum Layer {
    Encoder(Box<DetrEncoderLayer>),
    Geometry(Box<GeometryEncoderLayer>),
    Decoder(Box<DetrDecoderLayer>, DecoderConsts),
}

impl Layer {
    fn pre_norm(&self) -> Option<PreNorm<'_>> {
        match self {
            Layer::Encoder(l) => Some(PreNorm::encoder(l)),
            Layer::Geometry(l) => Some(PreNorm::geometry(l)),
            Layer::Decoder(..) => None,
        }
    }
}

/// What a layer's forward kept.
enum Saved {
    PreNorm(Box<PreNormSaved>),
    Decoder(Box<DecoderSaved>),
}

/// The recorded op on (x, y, factors): (image tokens, prompt) for a DETR encoder layer,
/// (prompt, image tokens) for a geometry layer, (queries, context) for a decoder layer; the
/// third operand is the concatenated factors or an anchor.
struct LayerOp {
    layer: Layer,
    factors: OpFactors,
    saved: Mutex<Option<Saved>>,
    out: Precomputed,
}

impl CustomOp3 for LayerOp {
    fn name(&self) -> &'static str {
        match self.layer {
            Layer::Encoder(..) => "detr-encoder-layer",
            Layer::Geometry(..) => "geometry-layer",
            Layer::Decoder(..) => "detr-decoder-layer",
        }
    }

    precomputed_kernels!(_x, _y, _factors);

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _factors: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let saved =
            saved.ok_or_else(|| candle_core::Error::Msg("DETR layer op: backward ran twice".into()))?;
        let need = [x.track_op(), y.track_op()];
        let dout = grad.detach().to_dtype(x.dtype())?;
        let mut grads = Vec::with_capacity(self.factors.vars.len());
        let label = || format!("{} backward", self.name());
        let [dx, dy] = match (&self.layer, saved) {
            (Layer::Decoder(layer, c), Saved::Decoder(s)) => {
                crate::profile::inner(label, || decoder_backward(layer, *s, c, &dout, need, &mut grads))?
            }
            (layer, Saved::PreNorm(s)) => match layer.pre_norm() {
                Some(l) => crate::profile::inner(label, || {
                    prenorm_backward(&l, &x.detach(), *s, &dout, need, &mut grads)
                })?,
                None => candle_core::bail!("DETR layer op: the saved state is another layer kind's"),
            },
            _ => candle_core::bail!("DETR layer op: the saved state is another layer kind's"),
        };
        Ok((dx, dy, self.factors.gradient(grads)?))
    }
}

/// Record `layer` on (x, y) with its forward's output and kept state.
fn record(
    x: &Tensor,
    y: &Tensor,
    layer: Layer,
    factors: OpFactors,
    out: Tensor,
    saved: Saved,
) -> Result<Tensor> {
    let third = match factors.operand()? {
        Some(f) => f,
        None => super::recompute::anchor(x.device())?.as_tensor().clone(),
    };
    let op =
        LayerOp { layer, factors, saved: Mutex::new(Some(saved)), out: Precomputed::new(&out, out.dtype())? };
    x.apply_op3(y, &third, op)
}

/// Whether a pre-norm layer op serves `l` on (x, ctx) with constants `c`: its weights frozen,
/// the constants untracked, and something to differentiate.
fn serves_pre_norm(l: &PreNorm, x: &Tensor, ctx: &Tensor, c: [Option<&Tensor>; 4]) -> bool {
    let lins = l.linears();
    enabled()
        && c.iter().all(|t| !t.is_some_and(|t| t.track_op()))
        && super::layer_op::frozen(&lins, &l.norms)
        && super::layer_op::records(&[x, ctx], &lins)
}

/// `layer` (a pre-norm one) on (x, ctx) as one recorded op.
fn pre_norm_forward(layer: Layer, x: &Tensor, ctx: &Tensor, c: &PreNormConsts) -> Result<Tensor> {
    let l = layer.pre_norm().ok_or_else(|| candle_core::Error::Msg("not a pre-norm layer".into()))?;
    let factors = OpFactors::of(l.linears());
    let label = || {
        format!(
            "{} forward",
            if matches!(layer, Layer::Geometry(_)) { "geometry layer" } else { "detr encoder layer" }
        )
    };
    let (out, saved) = crate::profile::inner(label, || prenorm_run(&l, &x.detach(), &ctx.detach(), c))?;
    record(x, ctx, layer, factors, out, Saved::PreNorm(Box::new(saved)))
}

/// Whether the encoder layer op serves `layer` on these operands: its weights frozen, the
/// positions and the mask untracked, and something to differentiate.
pub fn serves_encoder(
    layer: &DetrEncoderLayer,
    x: &Tensor,
    prompt: &Tensor,
    pos: &Tensor,
    mask: Option<&Tensor>,
) -> bool {
    serves_pre_norm(&PreNorm::encoder(layer), x, prompt, [Some(pos), None, None, mask])
}

/// [`DetrEncoderLayer::forward`] as one recorded op (see the module docs). Call where
/// [`serves_encoder`] says so.
pub fn encoder_forward(
    layer: &DetrEncoderLayer,
    x: &Tensor,
    prompt: &Tensor,
    pos: &Tensor,
    mask: Option<&Tensor>,
    dropout: f64,
    train: bool,
) -> Result<Tensor> {
    let c = PreNormConsts {
        self_pos: Some(pos.detach()),
        cross_bias: mask.map(|m| m.detach()),
        dropout,
        train,
        ..Default::default()
    };
    pre_norm_forward(Layer::Encoder(Box::new(layer.clone())), x, prompt, &c)
}

/// Whether the geometry layer op serves `layer` on (prompt, image tokens) with the image
/// positions `pos` and the prompt's key-padding `bias` (as [`serves_encoder`]).
pub fn serves_geometry(
    layer: &GeometryEncoderLayer,
    prompt: &Tensor,
    vision: &Tensor,
    pos: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> bool {
    serves_pre_norm(&PreNorm::geometry(layer), prompt, vision, [None, bias, pos, None])
}

/// [`GeometryEncoderLayer::forward`] as one recorded op, its image keys `vision + pos` made
/// inside. Call where [`serves_geometry`] says so.
pub fn geometry_forward(
    layer: &GeometryEncoderLayer,
    prompt: &Tensor,
    vision: &Tensor,
    pos: Option<&Tensor>,
    bias: Option<&Tensor>,
    dropout: f64,
) -> Result<Tensor> {
    let c = PreNormConsts {
        self_bias: bias.map(|b| b.detach()),
        key_pos: pos.map(|p| p.detach()),
        dropout,
        train: true,
        ..Default::default()
    };
    pre_norm_forward(Layer::Geometry(Box::new(layer.clone())), prompt, vision, &c)
}

/// A decoder layer's operands besides its queries (see [`DetrDecoderLayer::forward`]).
#[derive(Clone, Copy)]
pub struct DecoderLayerInputs<'a> {
    /// Query positions (B, N, C), without the presence token's row.
    pub query_pos: &'a Tensor,
    /// Prompt tokens (B, T, C).
    pub text: &'a Tensor,
    /// Image memory (B, HW, C).
    pub memory: &'a Tensor,
    /// The memory's positions (B, HW, C), added to its keys.
    pub vision_pos: &'a Tensor,
    /// The prompt's key-padding bias (B, 1, 1, T).
    pub text_bias: Option<&'a Tensor>,
    /// The boxRPB bias with the presence token's zero row (B, heads, 1 + N, HW).
    pub vision_bias: Option<&'a Tensor>,
    /// DAC's one-to-many queries (the last ones).
    pub num_o2m: usize,
    /// Residual dropout probability, applied when `train`.
    pub dropout: f64,
    /// Training mode (the residual dropout on).
    pub train: bool,
}

/// Whether the decoder layer op serves `layer` on `hidden` and `inputs` (as [`serves_encoder`]).
pub fn serves_decoder(layer: &DetrDecoderLayer, hidden: &Tensor, inputs: &DecoderLayerInputs) -> bool {
    let lins = decoder_linears(layer);
    let norms = [
        &layer.self_attn_layer_norm,
        &layer.text_cross_attn_layer_norm,
        &layer.vision_cross_attn_layer_norm,
        &layer.mlp_layer_norm,
    ];
    let i = inputs;
    enabled()
        && !i.query_pos.track_op()
        && !i.vision_pos.track_op()
        && !i.text_bias.is_some_and(|m| m.track_op())
        && !i.vision_bias.is_some_and(|m| m.track_op())
        && super::layer_op::frozen(&lins, &norms)
        && super::layer_op::records(&[hidden, i.text, i.memory], &lins)
}

/// [`DetrDecoderLayer::forward`] as one recorded op (see the module docs) on `hidden` and
/// `context`, the prompt tokens then the image memory along dimension 1 (the graph operand
/// their gradients flow back through; the layer reads `inputs`' tensors). Call where
/// [`serves_decoder`] says so.
pub fn decoder_forward(
    layer: &DetrDecoderLayer,
    hidden: &Tensor,
    context: &Tensor,
    inputs: &DecoderLayerInputs,
) -> Result<Tensor> {
    let i = inputs;
    let (b, n1, c) = hidden.dims3()?;
    if i.num_o2m >= n1 {
        candle_core::bail!("decoder layer: {} one-to-many queries of {n1} tokens", i.num_o2m);
    }
    let zero_row = Tensor::zeros((b, 1, c), i.query_pos.dtype(), i.query_pos.device())?;
    let consts = DecoderConsts {
        query_pos: Tensor::cat(&[&zero_row, &i.query_pos.detach()], 1)?,
        text: i.text.detach(),
        memory: i.memory.detach(),
        vision_pos: i.vision_pos.detach(),
        text_bias: i.text_bias.map(|t| t.detach()),
        vision_bias: i.vision_bias.map(|t| t.detach()),
        num_o2m: i.num_o2m,
        dropout: i.dropout,
        train: i.train,
    };
    let factors = OpFactors::of(decoder_linears(layer));
    let (out, saved) = crate::profile::inner(
        || "detr decoder layer forward".to_string(),
        || decoder_run(layer, &hidden.detach(), &consts),
    )?;
    let layer = Layer::Decoder(Box::new(layer.clone()), consts);
    record(hidden, context, layer, factors, out, Saved::Decoder(Box::new(saved)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraAdapter;
    use crate::sam3::decoder::{DecoderOptions, DetrDecoder};
    use crate::sam3::encoder::test_support::{pseudo_random, randomize, stack};
    use crate::sam3::encoder::DetrEncoder;
    use crate::sam3::visit::VisitLinears;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A module built with random frozen weights (plain tensors, not Vars).
    fn frozen<T>(load: impl Fn(VarBuilder) -> Result<T>) -> Result<T> {
        let varmap = VarMap::new();
        load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        randomize(&varmap)?;
        let tensors: HashMap<String, Tensor> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
    }

    /// A random adapter (B ≠ 0, dropout 0.2, training) on every linear `m` visits.
    fn adapt(m: &mut impl VisitLinears, seed: u64) -> Result<Vec<Var>> {
        let training = Arc::new(AtomicBool::new(true));
        let mut vars = Vec::new();
        let mut i = seed;
        m.visit_linears(&mut |lin| {
            let (n_in, n_out) = (lin.in_dim(), lin.out_dim());
            i += 2;
            let a = Var::from_tensor(&(pseudo_random(&[3, n_in], i) * 0.5).unwrap()).unwrap();
            let b = Var::from_tensor(&(pseudo_random(&[n_out, 3], i + 1) * 0.5).unwrap()).unwrap();
            vars.extend([a.clone(), b.clone()]);
            lin.lora = Some(LoraAdapter { a, b, scale: 1.5, dropout: 0.2, training: training.clone() });
        });
        Ok(vars)
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Path {
        /// Op by op.
        Ops,
        /// The layer ops, the factors' gradients through the graph.
        Op,
        /// The layer ops, the factors' gradients through the side store.
        OpSide,
    }

    /// `f()` along `path` (dropout stream reseeded), then the gradients of a fixed weighting of
    /// its output: of each of `inputs` that is tracked, then of every var in `vars`.
    fn run(
        path: Path,
        f: &dyn Fn() -> Result<Tensor>,
        inputs: &[&Tensor],
        vars: &[Var],
    ) -> Result<(Tensor, Vec<Tensor>, usize)> {
        crate::rng::reseed(&[11]);
        let y = match path {
            Path::Ops => op_by_op(f)?,
            Path::Op => f()?,
            Path::OpSide => crate::sam3::recompute::with_side_grads(f)?,
        };
        let nodes = y.sorted_nodes().len();
        let target = pseudo_random(y.dims(), 99);
        let mut grads = (&y * &target)?.sum_all()?.backward()?;
        crate::sam3::recompute::merge_side_grads(&mut grads)?;
        let mut out = Vec::new();
        for t in inputs.iter().filter(|t| t.track_op()) {
            out.push(grads.get(t).expect("an input gradient").clone());
        }
        for v in vars {
            out.push(grads.get(v.as_tensor()).expect("a LoRA gradient").clone());
        }
        Ok((y, out, nodes))
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(d / m.max(1e-12))
    }

    /// Both op paths against the op-by-op one: the same output, the same gradients (of the
    /// tracked inputs and of every LoRA factor, all non-zero).
    fn compare(f: &dyn Fn() -> Result<Tensor>, inputs: &[&Tensor], vars: &[Var], what: &str) -> Result<()> {
        let (want_y, want, nodes) = run(Path::Ops, f, inputs, vars)?;
        for g in &want {
            let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(m > 0.0 && m.is_finite(), "{what}: a gradient is {m}");
        }
        for path in [Path::Op, Path::OpSide] {
            let (y, got, op_nodes) = run(path, f, inputs, vars)?;
            // The layers did run as ops: fewer recorded operations (far fewer without the
            // factor operand's flattening and concatenation).
            let bound = if path == Path::OpSide { nodes / 2 } else { nodes };
            assert!(op_nodes < bound, "{what} {path:?}: {op_nodes} graph nodes against {nodes} op by op");
            let dy = max_rel(&y, &want_y)?;
            assert!(dy < 1e-5, "{what} {path:?}: output differs by {dy}");
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = max_rel(g, w)?;
                assert!(d < 1e-4, "{what} {path:?}: gradient {i} differs by {d} (relative)");
            }
        }
        Ok(())
    }

    /// The encoder's layers as ops: the op-by-op values and gradients with dropout, a padded
    /// prompt, and tracked or untracked image and prompt tokens.
    #[test]
    fn encoder_layers_match_the_op_by_op_path() -> Result<()> {
        let mut cfg = stack(2, None);
        cfg.dropout = 0.3;
        let mut enc = frozen(|vb| DetrEncoder::load(vb, &cfg))?;
        let vars = adapt(&mut enc.layers, 1)?;
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
        let pos = pseudo_random(&[2, 16, 3, 4], 3);
        for tracked in [true, false] {
            let vision = Var::from_tensor(&pseudo_random(&[2, 16, 3, 4], 1))?;
            let text = Var::from_tensor(&pseudo_random(&[2, 5, 16], 2))?;
            let (vision, text) = match tracked {
                true => (vision.as_tensor().clone(), text.as_tensor().clone()),
                false => (vision.as_detached_tensor(), text.as_detached_tensor()),
            };
            let f = || -> Result<Tensor> {
                let out = enc.forward(
                    std::slice::from_ref(&vision),
                    &text,
                    std::slice::from_ref(&pos),
                    Some(&mask),
                    true,
                )?;
                Ok(out.last_hidden_state)
            };
            compare(&f, &[&vision, &text], &vars, &format!("encoder (inputs tracked: {tracked})"))?;
        }
        Ok(())
    }

    /// The decoder's layers as ops (inside the whole decoder: box refinement, boxRPB, presence):
    /// the op-by-op values and gradients with dropout, with and without DAC's one-to-many
    /// queries, a padded prompt, tracked or untracked memory and prompt.
    #[test]
    fn decoder_layers_match_the_op_by_op_path() -> Result<()> {
        let mut cfg = stack(2, Some(4));
        cfg.dropout = 0.3;
        let mut dec = frozen(|vb| DetrDecoder::load(vb, &cfg))?;
        let vars = adapt(&mut dec.layers, 7)?;
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 0, 0, 0]], &dev)?;
        let pos = pseudo_random(&[2, 12, 16], 3);
        for (tracked, dac) in [(true, false), (false, true), (true, true)] {
            let memory = Var::from_tensor(&pseudo_random(&[2, 12, 16], 1))?;
            let text = Var::from_tensor(&pseudo_random(&[2, 5, 16], 2))?;
            let (memory, text) = match tracked {
                true => (memory.as_tensor().clone(), text.as_tensor().clone()),
                false => (memory.as_detached_tensor(), text.as_detached_tensor()),
            };
            let f = || -> Result<Tensor> {
                let opts = DecoderOptions { dac, train: true };
                let out = dec.forward(&memory, &text, &pos, Some(&mask), &[(3, 4)], opts)?;
                let boxes = dec.pred_boxes(&out)?.flatten_all()?;
                let presence = out.presence_logits.flatten_all()?;
                Tensor::cat(&[out.intermediate_hidden_states.flatten_all()?, boxes, presence], 0)
            };
            let what = format!("decoder (inputs tracked: {tracked}, DAC: {dac})");
            compare(&f, &[&memory, &text], &vars, &what)?;
        }
        Ok(())
    }

    /// The geometry encoder's layers as ops (inside the whole encoder: box embeddings, RoIAlign,
    /// the CLS token): the op-by-op values and gradients with dropout, a padded box prompt, and
    /// a tracked or untracked image map.
    #[test]
    fn geometry_layers_match_the_op_by_op_path() -> Result<()> {
        let mut cfg = stack(2, None);
        cfg.dropout = 0.3;
        cfg.hidden_size = 8;
        cfg.roi_size = 2;
        let mut enc = frozen(|vb| crate::sam3::geometry::GeometryEncoder::load(vb, &cfg))?;
        let vars = adapt(&mut enc.layers, 3)?;
        let dev = Device::Cpu;
        let boxes = Tensor::new(&[[[0.4f32, 0.5, 0.3, 0.4], [0.9, 0.2, 0.5, 0.5]]; 2], &dev)?;
        let labels = Tensor::new(&[[1u32, 0], [1, 1]], &dev)?;
        let mask = Tensor::new(&[[1u8, 1], [1, 0]], &dev)?;
        let pos = pseudo_random(&[2, 8, 3, 4], 3);
        for tracked in [true, false] {
            let map = Var::from_tensor(&pseudo_random(&[2, 8, 3, 4], 1))?;
            let map = if tracked { map.as_tensor().clone() } else { map.as_detached_tensor() };
            let f = || -> Result<Tensor> {
                let out = enc.forward_with(&boxes, &mask, &labels, &map, Some(&pos), None, true)?;
                Ok(out.last_hidden_state)
            };
            compare(&f, &[&map], &vars, &format!("geometry (image map tracked: {tracked})"))?;
        }
        Ok(())
    }

    /// The ops serve only frozen layers with constant positions and biases, on a graph.
    #[test]
    fn serves_only_frozen_layers_with_constant_operands() -> Result<()> {
        let cfg = stack(1, None);
        let mut enc = frozen(|vb| DetrEncoder::load(vb, &cfg))?;
        let layer = enc.layers[0].clone();
        let x = pseudo_random(&[2, 12, 16], 1);
        let text = pseudo_random(&[2, 5, 16], 2);
        let pos = pseudo_random(&[2, 12, 16], 3);
        // Nothing tracked, no adapters: nothing to record.
        assert!(!serves_encoder(&layer, &x, &text, &pos, None));
        let xv = Var::from_tensor(&x)?;
        assert!(serves_encoder(&layer, xv.as_tensor(), &text, &pos, None));
        // A trainable position encoding keeps the op-by-op path.
        let pv = Var::from_tensor(&pos)?;
        assert!(!serves_encoder(&layer, xv.as_tensor(), &text, pv.as_tensor(), None));
        assert!(!op_by_op(|| serves_encoder(&layer, xv.as_tensor(), &text, &pos, None)));
        // Adapters alone make a graph, except under no_grad.
        adapt(&mut enc.layers, 1)?;
        let adapted = &enc.layers[0];
        assert!(serves_encoder(adapted, &x, &text, &pos, None));
        assert!(!crate::sam3::recompute::no_grad(|| serves_encoder(adapted, &x, &text, &pos, None)));
        // Trainable base weights keep the op-by-op path.
        let varmap = VarMap::new();
        let trainable = DetrEncoder::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
        assert!(!serves_encoder(&trainable.layers[0], xv.as_tensor(), &text, &pos, None));
        Ok(())
    }
}
