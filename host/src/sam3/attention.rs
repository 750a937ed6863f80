//! Memory-lean scaled dot-product attention for training: `softmax(q kᵀ · scale + bias) v` as
//! one differentiable op that keeps no score matrix for backward.
//!
//! The composed attention (matmul, scale, bias, softmax, matmul) leaves several (Nq, Nk) score
//! tensors in the autograd graph per attention; at SAM3's 5184 image tokens that is ~0.9 GB per
//! image, head group and copy in bf16, in each global ViT block and each DETR encoder layer.
//! [`attention_lean`] records one custom op on (q, k, v): the forward runs on detached views in
//! query chunks and keeps only q, k, v and the output; the backward recomputes each chunk's
//! probabilities and applies the standard formulas (FlashAttention's, without the fused kernel):
//! `P = softmax(S)`, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`,
//! `dQ = scale · dS K`, `dK = scale · dSᵀ Q`. A constant (untracked) additive bias is held by
//! the op; a trainable bias needs its own gradient and keeps the composed path. Without a graph
//! (inference, a checkpointed block's first run) the same chunked forward runs unrecorded: the
//! values are bit-identical with and without adapters or checkpointing, and inference never
//! holds a full score matrix either.
//!
//! On CUDA, bf16 attention without a bias (the ViT's window and global blocks, the DETR
//! encoder's self-attention) runs on lorahost's flash kernels instead ([`super::flash_cuda`]):
//! no score chunk is written at all, forward or backward.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Score elements per chunk (query rows × keys × batch × heads) above which the query axis is
/// split: bounds the transient memory of forward and backward at ~64 Mi elements.
pub const CHUNK_ELEMENTS: usize = 64 << 20;

/// The chunk bound on CUDA, where the score chunk stays in bf16 and is normalised in place:
/// fewer, larger chunks (a SAM3 window block's attention in one, a global one in seven), at
/// ~0.5 GB of transient memory.
pub const CUDA_CHUNK_ELEMENTS: usize = 128 << 20;

/// The computation: scale, optional constant bias (broadcastable to (B, H, Nq, Nk)), chunk bound
/// and the dtype the score chunks are normalised in.
pub(crate) struct Lean {
    scale: f64,
    bias: Option<Tensor>,
    chunk_elements: usize,
    /// Dtype of the scores and probabilities: the inputs' dtype (bf16) on CUDA, whose softmax
    /// kernel accumulates in f32 (one pass over the chunk each for the scores, the softmax
    /// and the product with V, like PyTorch's eager attention), and the accumulation dtype
    /// (f32) elsewhere: candle's CPU softmax accumulates in the element type.
    probs: DType,
}

/// The recorded op.
struct LeanAttention {
    lean: Lean,
    /// The output is laid out (B, Nq, H, Dh) (tokens before heads, as the output projection
    /// reads it) instead of (B, H, Nq, Dh).
    tokens_major: bool,
    out: Precomputed,
}

use super::ops::{accumulation_dtype, precomputed_kernels, Precomputed};

/// Accumulation dtype of `t`.
fn acc(t: &Tensor) -> DType {
    accumulation_dtype(t.dtype())
}

/// The score dtype [`Lean::probs`] uses for inputs like `q`.
fn probs_dtype(q: &Tensor) -> DType {
    let half = matches!(q.dtype(), DType::BF16 | DType::F16);
    if half && q.device().is_cuda() {
        q.dtype()
    } else {
        acc(q)
    }
}

/// The operands as the chunk loops read them: `q · scale` and `k`, `v` contiguous (copied only
/// when they are views), so that each chunk's matmuls take views (query rows narrowed, `kᵀ`
/// and `vᵀ` transposed) without copies: both backends' batched matmuls read those strides.
struct Operands {
    q_scaled: Tensor,
    k: Tensor,
    v: Tensor,
}

impl Lean {
    /// Query rows per chunk for these shapes.
    fn rows(&self, q: &Tensor, k: &Tensor) -> Result<usize> {
        let (b, h, nq, _) = q.dims4()?;
        let nk = k.dim(2)?;
        Ok((self.chunk_elements / (b * h * nk).max(1)).clamp(1, nq.max(1)))
    }

    fn operands(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Operands> {
        // The scaling writes a fresh contiguous tensor, whatever q's layout.
        Ok(Operands { q_scaled: (q * self.scale)?, k: k.contiguous()?, v: v.contiguous()? })
    }

    /// Probabilities (in [`Lean::probs`]) of query rows `start..start + len`.
    fn probs(&self, o: &Operands, start: usize, len: usize) -> Result<Tensor> {
        let mut s = o.q_scaled.narrow(2, start, len)?.matmul(&o.k.t()?)?;
        if s.dtype() != self.probs {
            s = s.to_dtype(self.probs)?;
        }
        if let Some(b) = &self.bias {
            let rows = if b.dim(2)? == 1 { b.clone() } else { b.narrow(2, start, len)? };
            s = s.broadcast_add(&rows.to_dtype(self.probs)?)?;
        }
        // `s` is untracked (the op's forward and backward run on detached inputs; the op has
        // its own backward) and freshly computed here: on the GPU it is normalised in place
        // (f32 statistics, one read and one write), elsewhere by candle's fused softmax.
        if super::fused_cuda::serves(&s) && s.is_contiguous() {
            return super::fused_cuda::softmax_in_place(s);
        }
        candle_nn::ops::softmax_last_dim(&s)
    }

    /// Matmuls run in the inputs' dtype (bf16 on the GPU), softmax see [`Lean::probs`].
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let nq = q.dim(2)?;
        let rows = self.rows(q, k)?;
        let o = self.operands(q, k, v)?;
        let mut outs = Vec::with_capacity(nq.div_ceil(rows));
        let mut start = 0;
        while start < nq {
            let len = rows.min(nq - start);
            outs.push(self.probs(&o, start, len)?.to_dtype(q.dtype())?.matmul(&o.v)?);
            start += len;
        }
        Tensor::cat(&outs, 2)
    }
}

impl CustomOp3 for LeanAttention {
    fn name(&self) -> &'static str {
        "lean-attention"
    }

    precomputed_kernels!(_q, _k, _v);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::inner(
            || profile_label("backward", q, k),
            || self.lean.backward(self.tokens_major, q, k, v, out, d_out),
        )
    }
}

/// The profile's name of an attention of these shapes ([`crate::profile::inner`]).
fn profile_label(pass: &str, q: &Tensor, k: &Tensor) -> String {
    let (b, h, nq, d) = q.dims4().unwrap_or_default();
    format!("attention {pass} b{b} h{h} {nq}x{} d{d}", k.dim(2).unwrap_or_default())
}

/// The gradients of q, k and v.
type QkvGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl Lean {
    /// The gradients of q, k and v from the forward's output `out` and its gradient `d_out`
    /// (both laid out (B, Nq, H, Dh) when `tokens_major`).
    fn backward(
        &self,
        tokens_major: bool,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<QkvGrads> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (dt, a, pd) = (q.dtype(), acc(&q), self.probs);
        let nq = q.dim(2)?;
        let lean = self;
        let rows = lean.rows(&q, &k)?;
        let (out, d_out) = if tokens_major {
            (out.transpose(1, 2)?, d_out.transpose(1, 2)?)
        } else {
            (out.clone(), d_out.clone())
        };
        let d_out = d_out.to_dtype(dt)?.contiguous()?;
        // rowsum(dO ⊙ O) = rowsum(dP ⊙ P): one value per query row, accumulated in f32 and
        // used in the scores' dtype.
        let delta = (d_out.to_dtype(a)? * out.to_dtype(a)?)?.sum_keepdim(D::Minus1)?;
        let fused = super::fused_cuda::serves(&q) && q.dtype() == pd;
        let delta = if fused { delta } else { delta.to_dtype(pd)? };
        let o = lean.operands(&q, &k, &v)?;
        let vt = o.v.t()?;
        let mut dq = Vec::with_capacity(nq.div_ceil(rows));
        let mut dk = o.k.zeros_like()?.to_dtype(a)?;
        let mut dv = o.v.zeros_like()?.to_dtype(a)?;
        let mut start = 0;
        while start < nq {
            let len = rows.min(nq - start);
            let p = lean.probs(&o, start, len)?; // (B, H, len, Nk)
            let doc = d_out.narrow(2, start, len)?;
            dv = (dv + p.to_dtype(dt)?.t()?.matmul(&doc)?.to_dtype(a)?)?;
            let dp = doc.matmul(&vt)?.to_dtype(pd)?;
            // dS of the scaled scores S = (q · scale) kᵀ (on the GPU in place in dP, one pass).
            let ds = if fused {
                super::fused_cuda::attention_score_grad_in_place(dp, &p, &delta.narrow(2, start, len)?)?
            } else {
                (p * dp.broadcast_sub(&delta.narrow(2, start, len)?)?)?.to_dtype(dt)?
            };
            dq.push(ds.matmul(&o.k)?);
            dk = (dk + ds.t()?.matmul(&o.q_scaled.narrow(2, start, len)?)?.to_dtype(a)?)?;
            start += len;
        }
        let dq = (Tensor::cat(&dq, 2)? * lean.scale)?;
        Ok((Some(dq), Some(dk.to_dtype(dt)?), Some(dv.to_dtype(dt)?)))
    }
}

/// `softmax(q kᵀ · scale + bias) v` on (B, H, N, Dh) tensors, chunked over the queries: on
/// tracked inputs one op that keeps no score matrix for backward, on untracked ones the same
/// computation unrecorded (so a model gives the same values with and without a graph). `None`
/// for a tracked (trainable) bias: the caller's composed attention differentiates it.
/// With `tokens_major` the output is (B, Nq, H, Dh), contiguous.
pub fn attention_lean(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    tokens_major: bool,
) -> Result<Option<Tensor>> {
    let chunk = if q.device().is_cuda() { CUDA_CHUNK_ELEMENTS } else { CHUNK_ELEMENTS };
    attention_lean_chunked(q, k, v, scale, bias, chunk, tokens_major)
}

/// [`attention_lean`] with `chunk_elements` score elements per query chunk instead of
/// [`CHUNK_ELEMENTS`] (checks of the chunking: `lorahost selftest`, tests). Attention the flash
/// kernels serve (bf16 on CUDA, no bias, head dimension 32 or 64) is not chunked at all.
pub fn attention_lean_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    chunk_elements: usize,
    tokens_major: bool,
) -> Result<Option<Tensor>> {
    if bias.is_some_and(|b| b.track_op()) {
        return Ok(None);
    }
    if bias.is_none() && super::flash_cuda::serves(q, k, v) {
        return flash(q, k, v, scale, tokens_major).map(Some);
    }
    let lean = Lean { scale, bias: bias.map(|b| b.detach()), chunk_elements, probs: probs_dtype(q) };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        // No graph: the same chunked computation (bit-identical to the op's forward, so
        // attaching adapters or checkpointing changes no value), nothing recorded.
        let o = crate::profile::inner(|| profile_label("forward", q, k), || lean.forward(q, k, v))?;
        return Ok(Some(if tokens_major { o.transpose(1, 2)?.contiguous()? } else { o }));
    }
    lean_op(q, k, v, lean, tokens_major).map(Some)
}

/// The recorded flash attention (CUDA, bf16, no bias; [`super::flash_cuda`]): keeps q, k, v,
/// the output and one log-sum-exp per query row.
struct FlashAttention {
    scale: f64,
    tokens_major: bool,
    lse: Tensor,
    out: Precomputed,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    precomputed_kernels!(_q, _k, _v);

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, d_out: &Tensor) -> Result<QkvGrads> {
        flash_backward(q, k, v, out, d_out, &self.lse, self.scale, self.tokens_major)
    }
}

/// The flash kernels' backward (see [`super::flash_cuda::backward`]), profiled.
#[allow(clippy::too_many_arguments)]
fn flash_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    lse: &Tensor,
    scale: f64,
    tokens_major: bool,
) -> Result<QkvGrads> {
    crate::profile::inner(
        || profile_label("backward (flash)", q, k),
        || {
            let (q, k, v) = (q.detach(), k.detach(), v.detach());
            let (dq, dk, dv) = super::flash_cuda::backward(&q, &k, &v, out, d_out, lse, scale, tokens_major)?;
            Ok((Some(dq), Some(dk), Some(dv)))
        },
    )
}

/// Attention without a bias as a forward and a backward function, for ops that chain it with
/// other layers under a hand-written backward ([`super::vit_block`]): the flash kernels where
/// they serve, else the chunked computation; the same values as [`attention_tokens`]'s op.
///
/// [`attention_tokens`]: super::nn::attention_tokens
pub(crate) enum AttentionStep {
    /// The flash kernels' log-sum-exp per query row.
    Flash { lse: Tensor, scale: f64, tokens_major: bool },
    /// The chunked computation.
    Lean { lean: Lean, tokens_major: bool },
}

impl AttentionStep {
    /// `softmax(q kᵀ · scale + bias) v` of untracked (B, H, N, Dh) operands (laid out (B, Nq,
    /// H, Dh), contiguous, when `tokens_major`) with an optional constant additive `bias`
    /// (broadcastable to (B, H, Nq, Nk)) and what its backward needs.
    pub(crate) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        bias: Option<&Tensor>,
        tokens_major: bool,
    ) -> Result<(Tensor, AttentionStep)> {
        let label = || profile_label("forward", q, k);
        if bias.is_none() && super::flash_cuda::serves(q, k, v) {
            let (o, lse) =
                crate::profile::inner(label, || super::flash_cuda::forward(q, k, v, scale, tokens_major))?;
            return Ok((o, AttentionStep::Flash { lse, scale, tokens_major }));
        }
        let chunk = if q.device().is_cuda() { CUDA_CHUNK_ELEMENTS } else { CHUNK_ELEMENTS };
        let lean =
            Lean { scale, bias: bias.map(|b| b.detach()), chunk_elements: chunk, probs: probs_dtype(q) };
        let o = crate::profile::inner(label, || lean.forward(q, k, v))?;
        let o = if tokens_major { o.transpose(1, 2)?.contiguous()? } else { o };
        Ok((o, AttentionStep::Lean { lean, tokens_major }))
    }

    /// The gradients of q, k and v from the forward's output `out` and its gradient `d_out`.
    pub(crate) fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dq, dk, dv) = match self {
            AttentionStep::Flash { lse, scale, tokens_major } => {
                flash_backward(q, k, v, out, d_out, lse, *scale, *tokens_major)?
            }
            AttentionStep::Lean { lean, tokens_major } => crate::profile::inner(
                || profile_label("backward", q, k),
                || lean.backward(*tokens_major, q, k, v, out, d_out),
            )?,
        };
        match (dq, dk, dv) {
            (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
            _ => candle_core::bail!("attention backward: a gradient is missing"),
        }
    }
}

/// Flash attention of (q, k, v): unrecorded without a graph, else one [`FlashAttention`] op
/// (the same kernel either way, so the values agree bit for bit).
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, tokens_major: bool) -> Result<Tensor> {
    let label = || profile_label("forward (flash)", q, k);
    if !(q.track_op() || k.track_op() || v.track_op()) {
        let (o, _) =
            crate::profile::inner(label, || super::flash_cuda::forward(q, k, v, scale, tokens_major))?;
        return Ok(o);
    }
    let (storage, shape, lse) = crate::profile::inner(label, || {
        super::flash_cuda::forward_storage(&q.detach(), &k.detach(), &v.detach(), scale, tokens_major)
    })?;
    let out = Precomputed::from_storage(storage, shape);
    q.apply_op3(k, v, FlashAttention { scale, tokens_major, lse, out })
}

/// Record `lean`'s attention of (q, k, v).
fn lean_op(q: &Tensor, k: &Tensor, v: &Tensor, lean: Lean, tokens_major: bool) -> Result<Tensor> {
    // Computed on detached views (no input copies), handed to the recorded op.
    let o = crate::profile::inner(
        || profile_label("forward", q, k),
        || lean.forward(&q.detach(), &k.detach(), &v.detach()),
    )?;
    let o = if tokens_major { o.transpose(1, 2)? } else { o };
    let out = Precomputed::new(&o, q.dtype())?;
    q.apply_op3(k, v, LeanAttention { lean, tokens_major, out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut s = (q.matmul(&k.t()?)? * scale)?;
        if let Some(b) = bias {
            s = s.broadcast_add(b)?;
        }
        candle_nn::ops::softmax(&s, D::Minus1)?.matmul(v)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    /// Forward and the gradients of q, k and v equal the composed attention's, with and without
    /// a constant bias, in one chunk and in several (uneven ones included).
    #[test]
    fn matches_the_composed_attention_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, nq, nk, d) = (2, 3, 7, 5, 4);
        let var = |s: &[usize]| Var::from_tensor(&Tensor::randn(0f64, 1.0, s, &dev)?);
        let (q, k, v) = (var(&[b, h, nq, d])?, var(&[b, h, nk, d])?, var(&[b, h, nk, d])?);
        let bias = Tensor::randn(0f64, 1.0, (b, 1, nq, nk), &dev)?;
        let key_bias = Tensor::randn(0f64, 1.0, (b, 1, 1, nk), &dev)?;
        let target = Tensor::randn(0f64, 1.0, (b, h, nq, d), &dev)?;
        // b·h·nk = 30 score elements per query row: 1, 3 (uneven: 7 = 3 + 3 + 1) and all 7 rows.
        for chunk in [30, 90, CHUNK_ELEMENTS] {
            for bias in [None, Some(&bias), Some(&key_bias)] {
                let want = composed(&q, &k, &v, 0.5, bias)?;
                let got = attention_lean_chunked(&q, &k, &v, 0.5, bias, chunk, false)?
                    .expect("tracked inputs take the lean path");
                assert!(max_diff(&want, &got) < 1e-12);
                let gw = (&want * &target)?.sum_all()?.backward()?;
                let gg = (got * &target)?.sum_all()?.backward()?;
                // Tokens before heads: the same values transposed, the same gradients.
                let tm = attention_lean_chunked(&q, &k, &v, 0.5, bias, chunk, true)?.expect("tracked");
                assert_eq!(tm.dims(), &[b, nq, h, d]);
                assert!(tm.is_contiguous());
                assert!(max_diff(&want.transpose(1, 2)?, &tm) < 1e-12);
                let gt = (tm * target.transpose(1, 2)?)?.sum_all()?.backward()?;
                for x in [&q, &k, &v] {
                    let d = max_diff(gw.get(x.as_tensor()).unwrap(), gg.get(x.as_tensor()).unwrap());
                    assert!(d < 1e-10, "gradient differs by {d} (chunk {chunk})");
                    let d = max_diff(gw.get(x.as_tensor()).unwrap(), gt.get(x.as_tensor()).unwrap());
                    assert!(d < 1e-10, "tokens-major gradient differs by {d} (chunk {chunk})");
                }
            }
        }
        // f32 inputs: f32 accumulation, same result within f32 rounding.
        let f = |t: &Var| t.as_tensor().to_dtype(DType::F32).and_then(|t| Var::from_tensor(&t));
        let (qf, kf, vf) = (f(&q)?, f(&k)?, f(&v)?);
        let got = attention_lean(&qf, &kf, &vf, 0.5, None, false)?.unwrap().to_dtype(DType::F64)?;
        assert!(max_diff(&composed(&q, &k, &v, 0.5, None)?, &got) < 1e-5);
        // Untracked inputs: the same values, nothing recorded; a trainable bias: the caller's
        // composed path.
        let (qd, kd, vd) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
        for tokens_major in [false, true] {
            let plain = attention_lean_chunked(&qd, &kd, &vd, 0.5, Some(&bias), 30, tokens_major)?.unwrap();
            let tracked = attention_lean_chunked(&q, &k, &v, 0.5, Some(&bias), 30, tokens_major)?.unwrap();
            assert!(!plain.track_op() && tracked.track_op());
            assert_eq!(max_diff(&plain, &tracked), 0.0);
        }
        let trainable_bias = Var::from_tensor(&bias)?;
        assert!(attention_lean(&q, &k, &v, 1.0, Some(trainable_bias.as_tensor()), false)?.is_none());
        Ok(())
    }

    /// The CUDA bf16 path (scores and probabilities in bf16, the softmax kernel accumulating in
    /// f32) run on the CPU with bf16 inputs, operands as views (k and v transposed from
    /// tokens-first tensors, q narrowed): forward and gradients within bf16 rounding of the
    /// f64 composed attention, over several chunks and with a bias.
    #[test]
    fn bf16_scores_match_within_bf16_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, nq, nk, d) = (2, 2, 9, 6, 8);
        let f64var = |s: &[usize]| Var::from_tensor(&Tensor::randn(0f64, 1.0, s, &dev)?);
        // k and v as (B, Nk, H, D) transposed to (B, H, Nk, D): not contiguous.
        let (q, k, v) = (f64var(&[b, h, nq, d])?, f64var(&[b, nk, h, d])?, f64var(&[b, nk, h, d])?);
        let bias = (Tensor::randn(0f64, 1.0, (b, 1, nq, nk), &dev)? * 0.5)?;
        let target = Tensor::randn(0f64, 1.0, (b, h, nq, d), &dev)?;
        let (kt, vt) =
            (k.as_tensor().transpose(1, 2)?.contiguous()?, v.as_tensor().transpose(1, 2)?.contiguous()?);
        let want = composed(q.as_tensor(), &kt, &vt, 0.35, Some(&bias))?;
        let gw = (&want * &target)?.sum_all()?.backward()?;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).and_then(|t| Var::from_tensor(&t));
        let (qb, kb, vb) = (bf(q.as_tensor())?, bf(k.as_tensor())?, bf(v.as_tensor())?);
        for chunk in [b * h * nk * 2, CHUNK_ELEMENTS] {
            let lean = Lean {
                scale: 0.35,
                bias: Some(bias.to_dtype(DType::BF16)?),
                chunk_elements: chunk,
                probs: DType::BF16,
            };
            let got = lean_op(qb.as_tensor(), &kb.transpose(1, 2)?, &vb.transpose(1, 2)?, lean, false)?;
            assert_eq!(got.dtype(), DType::BF16);
            let got = got.to_dtype(DType::F64)?;
            let rel = |w: &Tensor, g: &Tensor| -> f64 {
                max_diff(w, g) / w.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
            };
            assert!(rel(&want, &got) < 0.03, "forward off by {}", rel(&want, &got));
            let gg = (got * &target)?.sum_all()?.backward()?;
            for (x, xb) in [(&q, &qb), (&k, &kb), (&v, &vb)] {
                let w = gw.get(x.as_tensor()).expect("f64 gradient");
                let g = gg.get(xb.as_tensor()).expect("bf16 gradient").to_dtype(DType::F64)?;
                assert!(rel(w, &g) < 0.03, "gradient off by {} (chunk {chunk})", rel(w, &g));
            }
        }
        Ok(())
    }
}
