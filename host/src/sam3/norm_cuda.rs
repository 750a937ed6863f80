//! LayerNorm forward and input-gradient kernels for CUDA: one block per row, statistics in f32
//! (two passes over the row, mean then the centred variance, as the composed computation does:
//! no E[x²] − E[x]² cancellation), reading and writing the activations' dtype (bf16 or f32).
//!
//! The composed LayerNorm makes about ten elementwise passes over an f32 copy of the input in
//! the forward and fifteen in the backward; these make one read and one write (forward) and two
//! reads and one write (backward). Compiled on first use ([`crate::cuda_kernels`]); if that
//! fails the caller keeps the composed path. `LORAHOST_FUSED_NORM=0` switches the kernels off
//! (for A/B timings).

use candle_core::{DType, Result, Tensor};

/// Whether the kernels serve `x` (and its frozen weights): a CUDA tensor in bf16 or f32, with
/// the kernels compiled.
pub fn serves(x: &Tensor) -> bool {
    imp::serves(x)
}

/// LayerNorm of `x` over its last dimension with f32 `weight` and `bias` (C,), in `x`'s dtype;
/// untracked (no gradient). Only where [`serves`] holds.
pub fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    imp::forward(x, weight, bias, eps)
}

/// The gradient of the LayerNorm's input for the output gradient `dy` (x's shape and dtype) and
/// f32 `weight` (C,), in `x`'s dtype. Only where [`serves`] holds.
pub fn backward(x: &Tensor, dy: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    imp::backward(x, dy, weight, eps)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_dtype(dt: DType) -> Option<&'static str> {
    match dt {
        DType::BF16 => Some("bf16"),
        DType::F32 => Some("f32"),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor) -> bool {
        false
    }

    pub fn forward(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
        candle_core::bail!("LayerNorm kernels: built without CUDA")
    }

    pub fn backward(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
        candle_core::bail!("LayerNorm kernels: built without CUDA")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::kernel_dtype;
    use crate::cuda_kernels::{device_address, launch, uninit, Arg, PRELUDE};
    use candle_core::{DType, Result, Tensor};
    use std::sync::OnceLock;

    const MODULE: &str = "lorahost_layer_norm";

    const SOURCE: &str = r#"
template <typename T>
__device__ void row_stats(const T* xr, int c, float eps, float* sh, float* mean, float* rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += ld(xr, i);
    const float m = block_sum(s, sh) / c;
    float q = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) { const float d = ld(xr, i) - m; q += d * d; }
    const float var = block_sum(q, sh) / c;
    *mean = m;
    *rstd = 1.f / sqrtf(var + eps);
}

template <typename T>
__device__ void ln_fwd(const T* x, const float* w, const float* b, T* y, int c, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * c;
    T* yr = y + row * c;
    float mean, rstd;
    row_stats(xr, c, eps, sh, &mean, &rstd);
    for (int i = threadIdx.x; i < c; i += blockDim.x) st(yr, i, (ld(xr, i) - mean) * rstd * w[i] + b[i]);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, xhat = (x - mean) * rstd.
template <typename T>
__device__ void ln_bwd(const T* x, const T* dy, const float* w, T* dx, int c, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * c;
    const T* gr = dy + row * c;
    T* dr = dx + row * c;
    float mean, rstd;
    row_stats(xr, c, eps, sh, &mean, &rstd);
    float s1 = 0.f, s2 = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float g = ld(gr, i) * w[i];
        s1 += g;
        s2 += g * (ld(xr, i) - mean) * rstd;
    }
    const float m1 = block_sum(s1, sh) / c;
    const float m2 = block_sum(s2, sh) / c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float g = ld(gr, i) * w[i];
        const float xh = (ld(xr, i) - mean) * rstd;
        st(dr, i, (g - m1 - xh * m2) * rstd);
    }
}

extern "C" __global__ void ln_fwd_bf16(const bf16_t* x, const float* w, const float* b, bf16_t* y, int c, float eps) { ln_fwd(x, w, b, y, c, eps); }
extern "C" __global__ void ln_fwd_f32(const float* x, const float* w, const float* b, float* y, int c, float eps) { ln_fwd(x, w, b, y, c, eps); }
extern "C" __global__ void ln_bwd_bf16(const bf16_t* x, const bf16_t* dy, const float* w, bf16_t* dx, int c, float eps) { ln_bwd(x, dy, w, dx, c, eps); }
extern "C" __global__ void ln_bwd_f32(const float* x, const float* dy, const float* w, float* dx, int c, float eps) { ln_bwd(x, dy, w, dx, c, eps); }
"#;

    /// The compiled PTX, or None (logged once) when the kernels cannot be used.
    fn ptx() -> Option<&'static str> {
        static PTX: OnceLock<Option<String>> = OnceLock::new();
        PTX.get_or_init(|| {
            crate::cuda_kernels::compile("LayerNorm", "LORAHOST_FUSED_NORM", &format!("{PRELUDE}{SOURCE}"))
        })
        .as_deref()
    }

    pub fn serves(x: &Tensor) -> bool {
        x.device().is_cuda() && kernel_dtype(x.dtype()).is_some() && x.rank() >= 1 && ptx().is_some()
    }

    /// (C,) f32 contiguous.
    fn per_channel(t: &Tensor, c: usize) -> Result<Tensor> {
        if t.elem_count() != c {
            candle_core::bail!("LayerNorm kernel: {} weights for width {c}", t.elem_count());
        }
        t.detach().to_dtype(DType::F32)?.flatten_all()?.contiguous()
    }

    /// Run `ln_{fwd,bwd}_<dtype>` on the contiguous `x` with operands `a`, `b` (forward: weight
    /// and bias; backward: dy and weight): one block per row, about four elements per thread.
    fn run(kernel: &str, x: &Tensor, a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let (Some(suffix), Some(ptx)) = (kernel_dtype(x.dtype()), ptx()) else {
            candle_core::bail!("LayerNorm kernel: {:?} is not served", x.dtype())
        };
        let c = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / c.max(1);
        let out = uninit(x, x.dims(), x.dtype())?;
        if rows > 0 {
            let args = [
                Arg(device_address(x)?),
                Arg(device_address(a)?),
                Arg(device_address(b)?),
                Arg(device_address(&out)?),
                Arg::i32(c as i32),
                Arg::f32(eps as f32),
            ];
            let threads = (c.div_ceil(4).div_ceil(32).clamp(1, 32) * 32) as u32;
            launch(
                x.device(),
                MODULE,
                ptx,
                &format!("{kernel}_{suffix}"),
                (rows as u32, 1, 1),
                threads,
                &args,
            )?;
        }
        Ok(out)
    }

    pub fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let c = x.dim(candle_core::D::Minus1)?;
        let x = x.detach().contiguous()?;
        run("ln_fwd", &x, &per_channel(weight, c)?, &per_channel(bias, c)?, eps)
    }

    pub fn backward(x: &Tensor, dy: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let c = x.dim(candle_core::D::Minus1)?;
        if dy.shape() != x.shape() {
            candle_core::bail!("LayerNorm kernel: gradient {:?} for input {:?}", dy.shape(), x.shape());
        }
        let x = x.detach().contiguous()?;
        let dy = dy.detach().to_dtype(x.dtype())?.contiguous()?;
        run("ln_bwd", &x, &dy, &per_channel(weight, c)?, eps)
    }
}
