//! Frozen weights as differentiable ops that never differentiate the weight.
//!
//! candle's backward computes a gradient for both operands of every matmul, tracked or not:
//! a frozen base weight downstream of the first LoRA adapter costs a full `dW` GEMM and a
//! weight-sized gradient kept until backward ends (`../shared/docs/candle-training.md`, §0.2).
//! [`frozen_matmul`] records `x · Wᵀ` as a custom op whose backward returns only
//! `dx = dy · W`: the same forward and input gradient, no weight gradient, nothing stored for
//! `W`. The op is recorded only when `x` is tracked and `W` is not; otherwise it is a plain
//! matmul.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// `x · Wᵀ` with `W` (out, in) frozen.
struct FrozenMatmul {
    /// (out, in), in the dtype and on the device of `x`.
    w: Tensor,
}

impl FrozenMatmul {
    /// (m, n, k) of `x` (m, k) · `Wᵀ` (k, n), checked.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = l.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen matmul: input width {k} but weight {n}x{kw}");
        }
        Ok((m, n, k))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(l)?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("frozen matmul: weight not on the CPU") };
        Ok((s.matmul(w, (1, m, n, k), l, wl)?, Shape::from((m, n))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (m, n, k) = self.dims(l)?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("frozen matmul: weight not on the GPU") };
        Ok((s.matmul(w, (1, m, n, k), l, wl)?, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w)?))
    }
}

/// `x · Wᵀ` for a 2-D `x` (rows, in) and `w` (out, in): differentiable in `x` only when `w` is
/// frozen (a trainable `w` takes the plain matmul and gets its gradient).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() || w.track_op() {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.detach() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn same_forward_and_input_gradient_as_a_matmul_and_no_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 3), &dev)?)?;
        let w = Tensor::randn(0f64, 1.0, (4, 3), &dev)?;
        let t = Tensor::randn(0f64, 1.0, (5, 4), &dev)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        let frozen = frozen_matmul(x.as_tensor(), &w)?;
        let diff = (&plain - &frozen)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g_plain = (plain * &t)?.sum_all()?.backward()?;
        let g_frozen = (frozen * &t)?.sum_all()?.backward()?;
        let dx = (g_plain.get(x.as_tensor()).unwrap() - g_frozen.get(x.as_tensor()).unwrap())?;
        assert!(dx.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        // The plain graph stored a gradient for the weight's transpose; the frozen one did not.
        assert!(g_plain.get_ids().count() > g_frozen.get_ids().count());
        assert_eq!(g_frozen.get_ids().count(), 2, "x and the constant t only");
        assert_eq!(frozen_matmul(&w, &w)?.dtype(), DType::F64);
        // A trainable weight keeps its gradient.
        let wv = Var::from_tensor(&w)?;
        let g = frozen_matmul(x.as_tensor(), wv.as_tensor())?.sum_all()?.backward()?;
        assert!(g.get(wv.as_tensor()).is_some());
        Ok(())
    }
}
