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
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
    use std::sync::OnceLock;

    const MODULE: &str = "lorahost_layer_norm";

    const SOURCE: &str = r#"
typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
// Round to nearest even, as __float2bfloat16 does; NaN stays NaN.
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16_t)0x7fc0u; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();  // the previous call's readers are done with sh
    if (l == 0) sh[w] = v;
    __syncthreads();
    float t = l < nw ? sh[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

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
        PTX.get_or_init(|| crate::cuda_kernels::compile("LayerNorm", "LORAHOST_FUSED_NORM", SOURCE))
            .as_deref()
    }

    pub fn serves(x: &Tensor) -> bool {
        x.device().is_cuda() && kernel_dtype(x.dtype()).is_some() && x.rank() >= 1 && ptx().is_some()
    }

    /// Threads per row: about four elements per thread, a multiple of 32, at most 1024.
    fn config(rows: usize, c: usize) -> LaunchConfig {
        let threads = c.div_ceil(4).div_ceil(32).clamp(1, 32) * 32;
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
    }

    /// A contiguous operand's device slice (with its offset) of element type `T`.
    macro_rules! view {
        ($s:expr, $l:expr, $t:ty, $what:expr) => {{
            let Some((a, b)) = $l.contiguous_offsets() else {
                candle_core::bail!("LayerNorm kernel: {} is not contiguous", $what)
            };
            $s.as_cuda_slice::<$t>()?.slice(a..b)
        }};
    }

    /// (x, a, b) → y: the forward (a = weight, b = bias) or the backward (a = dy, b = weight).
    struct Kernel {
        backward: bool,
        eps: f32,
    }

    impl CustomOp3 for Kernel {
        fn name(&self) -> &'static str {
            if self.backward {
                "layer-norm-kernel-backward"
            } else {
                "layer-norm-kernel"
            }
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("LayerNorm kernel: CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let shape = xl.shape().clone();
            let c = shape.dims().last().copied().unwrap_or(1);
            let n = shape.elem_count();
            let rows = n / c.max(1);
            let dev = x.device().clone();
            let (Some(suffix), Some(ptx)) = (kernel_dtype(x.dtype()), ptx()) else {
                candle_core::bail!("LayerNorm kernel: {:?} is not served", x.dtype())
            };
            let name = format!("{}_{suffix}", if self.backward { "ln_bwd" } else { "ln_fwd" });
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx)?;
            let cfg = config(rows, c);
            let eps = self.eps;
            let c32 = c as i32;
            macro_rules! launch {
                ($t:ty) => {{
                    let xs = view!(x, xl, $t, "x");
                    // SAFETY: every element is written by the kernel before it is read.
                    let out = unsafe { dev.alloc::<$t>(n)? };
                    {
                        let mut builder = func.builder();
                        if self.backward {
                            let dy = view!(a, al, $t, "dy");
                            let w = view!(b, bl, f32, "weight");
                            builder.arg(&xs);
                            builder.arg(&dy);
                            builder.arg(&w);
                            builder.arg(&out);
                            builder.arg(&c32);
                            builder.arg(&eps);
                            // SAFETY: the argument list matches ln_bwd_*; sizes checked by the caller.
                            unsafe { builder.launch(cfg) }.w()?;
                        } else {
                            let w = view!(a, al, f32, "weight");
                            let bias = view!(b, bl, f32, "bias");
                            builder.arg(&xs);
                            builder.arg(&w);
                            builder.arg(&bias);
                            builder.arg(&out);
                            builder.arg(&c32);
                            builder.arg(&eps);
                            // SAFETY: the argument list matches ln_fwd_*; sizes checked by the caller.
                            unsafe { builder.launch(cfg) }.w()?;
                        }
                    }
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let out = match x.dtype() {
                DType::BF16 => launch!(half::bf16),
                DType::F32 => launch!(f32),
                dt => candle_core::bail!("LayerNorm kernel: {dt:?}"),
            };
            Ok((out, shape))
        }
    }

    /// (C,) f32 contiguous.
    fn per_channel(t: &Tensor, c: usize) -> Result<Tensor> {
        if t.elem_count() != c {
            candle_core::bail!("LayerNorm kernel: {} weights for width {c}", t.elem_count());
        }
        t.detach().to_dtype(DType::F32)?.flatten_all()?.contiguous()
    }

    pub fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let c = x.dim(candle_core::D::Minus1)?;
        let x = x.detach().contiguous()?;
        x.apply_op3_no_bwd(
            &per_channel(weight, c)?,
            &per_channel(bias, c)?,
            &Kernel { backward: false, eps: eps as f32 },
        )
    }

    pub fn backward(x: &Tensor, dy: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let c = x.dim(candle_core::D::Minus1)?;
        if dy.shape() != x.shape() {
            candle_core::bail!("LayerNorm kernel: gradient {:?} for input {:?}", dy.shape(), x.shape());
        }
        let x = x.detach().contiguous()?;
        let dy = dy.detach().to_dtype(x.dtype())?.contiguous()?;
        x.apply_op3_no_bwd(&dy, &per_channel(weight, c)?, &Kernel { backward: true, eps: eps as f32 })
    }
}
