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
//! the op; a trainable bias needs its own gradient and keeps the composed path.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Score elements per chunk (query rows × keys × batch × heads) above which the query axis is
/// split: bounds the transient memory of forward and backward at ~64 Mi elements.
pub const CHUNK_ELEMENTS: usize = 64 << 20;

/// The computation: scale, optional constant bias (broadcastable to (B, H, Nq, Nk)), chunk bound.
struct Lean {
    scale: f64,
    bias: Option<Tensor>,
    chunk_elements: usize,
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

impl Lean {
    /// Query rows per chunk for these shapes.
    fn rows(&self, q: &Tensor, k: &Tensor) -> Result<usize> {
        let (b, h, nq, _) = q.dims4()?;
        let nk = k.dim(2)?;
        Ok((self.chunk_elements / (b * h * nk).max(1)).clamp(1, nq.max(1)))
    }

    /// Probabilities (f32, or f64) of query rows `start..start + len`.
    fn probs(&self, q: &Tensor, k: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let qc = q.narrow(2, start, len)?.contiguous()?;
        let mut s = (qc.matmul(&k.t()?.contiguous()?)? * self.scale)?.to_dtype(acc(q))?;
        if let Some(b) = &self.bias {
            let rows = if b.dim(2)? == 1 { b.clone() } else { b.narrow(2, start, len)? };
            s = s.broadcast_add(&rows.to_dtype(acc(q))?)?;
        }
        // Fused kernel without a backward: fine here, `s` is untracked (the op's forward and
        // backward run on detached inputs) and the op has its own backward.
        candle_nn::ops::softmax_last_dim(&s)
    }

    /// Matmuls run in the inputs' dtype (bf16 on the GPU), softmax in f32.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let nq = q.dim(2)?;
        let rows = self.rows(q, k)?;
        let v = v.contiguous()?;
        let mut outs = Vec::with_capacity(nq.div_ceil(rows));
        let mut start = 0;
        while start < nq {
            let len = rows.min(nq - start);
            outs.push(self.probs(q, k, start, len)?.to_dtype(q.dtype())?.matmul(&v)?);
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
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (dt, a) = (q.dtype(), acc(&q));
        let nq = q.dim(2)?;
        let lean = &self.lean;
        let rows = lean.rows(&q, &k)?;
        let (out, d_out) = if self.tokens_major {
            (out.transpose(1, 2)?, d_out.transpose(1, 2)?)
        } else {
            (out.clone(), d_out.clone())
        };
        let d_out = d_out.to_dtype(dt)?.contiguous()?;
        // rowsum(dO ⊙ O) = rowsum(dP ⊙ P): one value per query row.
        let delta = (d_out.to_dtype(a)? * out.to_dtype(a)?)?.sum_keepdim(D::Minus1)?;
        let (kc, vt) = (k.contiguous()?, v.t()?.contiguous()?);
        let mut dq = Vec::with_capacity(nq.div_ceil(rows));
        let mut dk = k.zeros_like()?.to_dtype(a)?;
        let mut dv = v.zeros_like()?.to_dtype(a)?;
        let mut start = 0;
        while start < nq {
            let len = rows.min(nq - start);
            let p = lean.probs(&q, &k, start, len)?; // (B, H, len, Nk), f32
            let doc = d_out.narrow(2, start, len)?;
            dv = (dv + p.to_dtype(dt)?.t()?.matmul(&doc)?.to_dtype(a)?)?;
            let dp = doc.matmul(&vt)?.to_dtype(a)?;
            let ds = (p * dp.broadcast_sub(&delta.narrow(2, start, len)?)?)?.to_dtype(dt)?;
            dq.push((ds.matmul(&kc)? * lean.scale)?);
            let qc = q.narrow(2, start, len)?.contiguous()?;
            dk = (dk + (ds.t()?.matmul(&qc)? * lean.scale)?.to_dtype(a)?)?;
            start += len;
        }
        let dq = Tensor::cat(&dq, 2)?;
        Ok((Some(dq), Some(dk.to_dtype(dt)?), Some(dv.to_dtype(dt)?)))
    }
}

/// `softmax(q kᵀ · scale + bias) v` on (B, H, N, Dh) tensors as one op that keeps no score
/// matrix for backward; `None` when it does not apply (nothing tracked, or a tracked bias),
/// so the caller uses the composed attention.
/// With `tokens_major` the output is (B, Nq, H, Dh), contiguous.
pub fn attention_lean(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    tokens_major: bool,
) -> Result<Option<Tensor>> {
    lean_with(q, k, v, scale, bias, CHUNK_ELEMENTS, tokens_major)
}

fn lean_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    chunk_elements: usize,
    tokens_major: bool,
) -> Result<Option<Tensor>> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !tracked || bias.is_some_and(|b| b.track_op()) {
        return Ok(None);
    }
    let lean = Lean { scale, bias: bias.map(|b| b.detach()), chunk_elements };
    // Computed on detached views (no input copies), handed to the recorded op.
    let o = lean.forward(&q.detach(), &k.detach(), &v.detach())?;
    let o = if tokens_major { o.transpose(1, 2)? } else { o };
    let out = Precomputed::new(&o, q.dtype())?;
    Ok(Some(q.apply_op3(k, v, LeanAttention { lean, tokens_major, out })?))
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
                let got = lean_with(&q, &k, &v, 0.5, bias, chunk, false)?
                    .expect("tracked inputs take the lean path");
                assert!(max_diff(&want, &got) < 1e-12);
                let gw = (&want * &target)?.sum_all()?.backward()?;
                let gg = (got * &target)?.sum_all()?.backward()?;
                // Tokens before heads: the same values transposed, the same gradients.
                let tm = lean_with(&q, &k, &v, 0.5, bias, chunk, true)?.expect("tracked");
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
        // Untracked inputs or a trainable bias: the caller's composed path.
        let plain = q.as_tensor().detach();
        assert!(attention_lean(&plain, &plain, &plain, 1.0, None, false)?.is_none());
        let trainable_bias = Var::from_tensor(&bias)?;
        assert!(attention_lean(&q, &k, &v, 1.0, Some(trainable_bias.as_tensor()), false)?.is_none());
        Ok(())
    }
}
