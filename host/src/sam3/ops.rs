//! Custom-op plumbing shared by the training ops (lean attention, checkpointing) and a fused
//! LayerNorm with its own backward.
//!
//! A custom op's forward receives raw storages; [`wrap`] views one as an untracked tensor so
//! the op can be written with tensor operations (identical on the CPU and on CUDA), and
//! [`owned_storage`] hands a result back.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

/// An untracked tensor over `s` (contiguous from offset 0, as the caller made it).
pub(crate) fn wrap(s: Storage, l: &Layout) -> Result<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("custom op: inputs must be contiguous from offset 0");
    }
    Ok(Tensor::from_storage(s, l.shape().clone(), BackpropOp::none(), false))
}

/// An owned storage holding `t` contiguously from offset 0 (what a custom op's forward returns).
pub(crate) fn owned_storage(t: &Tensor) -> Result<Storage> {
    let t = t.contiguous()?;
    let t = if t.layout().start_offset() == 0 { t } else { t.affine(1.0, 0.0)? };
    let (s, l) = t.storage_and_layout();
    Ok(match &*s {
        Storage::Cpu(c) => Storage::Cpu(c.clone()),
        Storage::Cuda(c) => Storage::Cuda(c.try_clone(l)?),
        Storage::Metal(_) => candle_core::bail!("custom ops: Metal is not supported"),
    })
}

/// `t` itself when it is contiguous from offset 0, else a fresh contiguous copy (differentiable).
pub(crate) fn fresh(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.affine(1.0, 0.0)
    }
}

/// LayerNorm over the last dimension with frozen weight and bias as one op: the forward is the
/// composed f32 computation on untracked tensors (bit-identical to the untracked path, so
/// attaching adapters or checkpointing changes nothing), the backward is analytic for the input
/// only, so the graph keeps just the input instead of the composed version's f32 copies.
struct FusedLayerNorm {
    /// f32 scale and shift.
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl FusedLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_composed(x, &self.weight, &self.bias, self.eps)
    }

    fn fwd_storage(&self, s: Storage, l: &Layout) -> Result<(Storage, Shape)> {
        let y = self.forward(&wrap(s, l)?)?;
        Ok((owned_storage(&y)?, y.shape().clone()))
    }
}

impl CustomOp1 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.fwd_storage(Storage::Cpu(s.clone()), l)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("fused layer norm: device changed"),
        }
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.fwd_storage(Storage::Cuda(s.try_clone(l)?), l)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("fused layer norm: device changed"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let x32 = x.detach().to_dtype(DType::F32)?;
        let xc = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let gw = dy.to_dtype(DType::F32)?.broadcast_mul(&self.weight)?;
        let m1 = gw.mean_keepdim(D::Minus1)?;
        let m2 = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw.broadcast_sub(&m1)?.sub(&xhat.broadcast_mul(&m2)?)?.broadcast_mul(&rstd)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

/// LayerNorm over the last dimension, composed, computed in f32 (differentiable everywhere).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = xn.broadcast_mul(&weight.to_dtype(DType::F32)?)?.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    y.to_dtype(dtype)
}

/// LayerNorm with frozen `weight` and `bias` as one op on a tracked `x` (see [`FusedLayerNorm`]);
/// `None` when `x` is untracked or the weights are trainable (the caller's composed path).
pub fn layer_norm_frozen(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !x.track_op() || weight.track_op() || bias.track_op() || x.dtype() == DType::F64 {
        return Ok(None);
    }
    let op = FusedLayerNorm {
        weight: weight.detach().to_dtype(DType::F32)?,
        bias: bias.detach().to_dtype(DType::F32)?,
        eps,
    };
    Ok(Some(fresh(x)?.apply_op1(op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and input gradient equal the composed LayerNorm's.
    #[test]
    fn fused_layer_norm_matches_the_composed_one_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 16), &dev)? + 0.7)?)?;
        let w = Tensor::randn(1f32, 0.3, 16, &dev)?;
        let b = Tensor::randn(0f32, 0.3, 16, &dev)?;
        let t = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev)?;
        let composed = layer_norm_composed(&x, &w, &b, 1e-6)?;
        let fused = layer_norm_frozen(&x, &w, &b, 1e-6)?.expect("tracked input");
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert_eq!(diff(&composed, &fused)?, 0.0, "the same forward, bit for bit");
        let gc = (composed * &t)?.sum_all()?.backward()?;
        let gf = (fused * &t)?.sum_all()?.backward()?;
        let (a, b2) = (gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap());
        assert!(diff(a, b2)? < 1e-5, "gradient differs by {}", diff(a, b2)?);
        assert!(layer_norm_frozen(&x.as_tensor().detach(), &w, &b, 1e-6)?.is_none());
        Ok(())
    }
}
