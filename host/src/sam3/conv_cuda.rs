//! The 3×3 convolution (stride 1, padding 1) of the FPN neck and the mask head's pixel decoder
//! on the GPU as an implicit GEMM on the tensor cores ([`SOURCE`], `conv3x3.cu`): bf16 NCHW in
//! and out, f32 accumulation, no im2col matrix in memory (candle's CUDA `conv2d` writes one of
//! Cin·9 × B·H·W elements per call, 0.76 GB at SAM3's 288² level for two images). The input
//! gradient is the same convolution of the output gradient with the transposed, flipped weight.
//!
//! Where cuBLAS serves, the convolution runs instead as nine shifted products on it (the
//! GEMM route, [`tap_gemm`]): `conv_pack_bf16` writes the input channels-last with a zero border
//! ((H + 2)·(W + 2) + 2 rows of Cin per image), so with the output computed on a grid of the
//! padded width W + 2 (two columns per row discarded) each tap (ky, kx) reads a plain row-major
//! matrix that starts ky·(W + 2) + kx rows in, and its product with the tap's (Cout, Cin)
//! weight accumulates into the output grid (β = 1 after the first tap, batched over images);
//! `conv_unpack_bf16` writes the grid back as NCHW with the bias. Two activation-sized copies
//! and nine cuBLAS products instead of the implicit-GEMM kernel, whose gathers reached about 14
//! TFLOP/s on an H200 (7.2 ms per 256-channel convolution at 288² for two images). Checked
//! once against candle's f32 `conv2d` like the kernel; `LORAHOST_CONV_GEMM=0` keeps the kernel.
//!
//! Like the flash attention kernels ([`super::flash_cuda`]) it is compiled at first use
//! (compute capability 8.0+), checked once against candle's f32 `conv2d` on the device before
//! anything uses it (a disagreement or a failure leaves candle's convolution in charge, with a
//! warning), switched off with `LORAHOST_CONV=0`, and run on the CPU by the emulation test
//! (`host/tests/cuda_emu.rs`) through the same launch plan ([`launch_plan`]).

use crate::cuda_kernels::Arg;

/// The kernel's CUDA C source (compiled after [`crate::cuda_kernels::PRELUDE`] and
/// [`crate::cuda_kernels::TENSOR_CORE`]).
pub const SOURCE: &str = include_str!("conv3x3.cu");

/// Output pixels and channels per block.
const TILE: usize = 64;

/// Shapes of one convolution: input (batch, cin, height, width), `cout` output channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl ConvDims {
    /// Whether the kernel's int arithmetic and grid hold these shapes.
    pub fn supported(&self) -> bool {
        let pixels = self.batch * self.height * self.width;
        pixels > 0
            && self.cin > 0
            && self.cout > 0
            && self.cin * 9 < (1 << 30)
            && self.cout.div_ceil(TILE) <= 65_535
            && pixels.div_ceil(TILE) < (1 << 31)
    }
}

/// The GEMM route's geometry: rows per image of the padded channels-last input and of the
/// output grid (H rows of the padded width), and the padded width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapGemm {
    /// W + 2.
    pub padded_width: usize,
    /// (H + 2)·(W + 2) + 2: the last tap of the last grid row reads up to row (H + 2)·(W + 2) + 1.
    pub input_rows: usize,
    /// H·(W + 2).
    pub grid_rows: usize,
}

/// One tap's product in cuBLAS's column-major terms, batched over images:
/// `grid_b (Cout × grid_rows, ld Cout) (+)= W_tapᵀ · X_b,tap` with `W_tap` the (Cout, Cin)
/// row-major slice `weight_offset` elements into the (3, 3, Cout, Cin) weight (read as Cin ×
/// Cout, ld Cin, transposed; the same for every image) and `X_b,tap` Cin × grid_rows (ld Cin)
/// starting `input_offset` elements into image b's padded input (image stride
/// `input_rows · Cin`, output image stride `grid_rows · Cout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapProduct {
    /// Elements into the (3, 3, Cout, Cin) weight.
    pub weight_offset: usize,
    /// Elements into each image's padded input.
    pub input_offset: usize,
    /// β = 1 (every tap after the first).
    pub accumulate: bool,
}

/// The GEMM route's geometry for `d`.
pub fn tap_gemm(d: ConvDims) -> TapGemm {
    let padded_width = d.width + 2;
    TapGemm {
        padded_width,
        input_rows: (d.height + 2) * padded_width + 2,
        grid_rows: d.height * padded_width,
    }
}

/// The nine products of the GEMM route, tap (ky, kx) = (t / 3, t % 3) in order.
pub fn tap_products(d: ConvDims) -> Vec<TapProduct> {
    let g = tap_gemm(d);
    (0..9)
        .map(|t| TapProduct {
            weight_offset: t * d.cout * d.cin,
            input_offset: ((t / 3) * g.padded_width + t % 3) * d.cin,
            accumulate: t > 0,
        })
        .collect()
}

/// Whether the GEMM route's int arithmetic (kernels and cuBLAS) and grids hold `d`.
pub fn gemm_supported(d: ConvDims) -> bool {
    let g = tap_gemm(d);
    let max = i32::MAX as usize;
    d.supported()
        && d.batch <= 65_535
        && d.cin.max(d.cout).div_ceil(32) <= 65_535
        && g.input_rows.max(d.height * d.width) < max / 2
        && g.input_rows.checked_mul(d.cin.max(d.cout)).is_some_and(|n| n < max)
}

/// The launch that packs `x` (B, Cin, H, W) into the padded channels-last `xp`.
pub fn pack_plan(d: ConvDims, x: u64, xp: u64) -> ((u32, u32, u32), u32, Vec<Arg>) {
    let g = tap_gemm(d);
    let grid = (g.input_rows.div_ceil(32) as u32, d.cin.div_ceil(32) as u32, d.batch as u32);
    let args = vec![
        Arg(x),
        Arg(xp),
        Arg::i32(d.cin as i32),
        Arg::i32(d.height as i32),
        Arg::i32(d.width as i32),
        Arg::i32(g.input_rows as i32),
    ];
    (grid, 256, args)
}

/// The launch that writes the output grid `yp` (B, grid_rows, Cout) as `y` (B, Cout, H, W),
/// adding `bias` (0: none).
pub fn unpack_plan(d: ConvDims, yp: u64, bias: u64, y: u64) -> ((u32, u32, u32), u32, Vec<Arg>) {
    let grid = ((d.height * d.width).div_ceil(32) as u32, d.cout.div_ceil(32) as u32, d.batch as u32);
    let args = vec![
        Arg(yp),
        Arg(bias),
        Arg(y),
        Arg::i32(d.cout as i32),
        Arg::i32(d.height as i32),
        Arg::i32(d.width as i32),
    ];
    (grid, 256, args)
}

/// The launch: grid, threads per block and arguments (`x`, `w` (Cout, Cin, 3, 3), optional
/// `bias` (0: none) and `y` are addresses of contiguous bf16 buffers).
pub fn launch_plan(d: ConvDims, x: u64, w: u64, bias: u64, y: u64) -> ((u32, u32, u32), u32, Vec<Arg>) {
    let pixels = d.batch * d.height * d.width;
    let grid = (pixels.div_ceil(TILE) as u32, d.cout.div_ceil(TILE) as u32, 1);
    let args = vec![
        Arg(x),
        Arg(w),
        Arg(bias),
        Arg(y),
        Arg::i32(d.batch as i32),
        Arg::i32(d.cin as i32),
        Arg::i32(d.cout as i32),
        Arg::i32(d.height as i32),
        Arg::i32(d.width as i32),
    ];
    (grid, 128, args)
}

/// Whether the kernel serves a convolution of `x` (bf16 CUDA, (B, Cin, H, W)) with `w`
/// ((Cout, Cin, 3, 3)): compiled and checked on this device.
pub fn serves(x: &candle_core::Tensor, w: &candle_core::Tensor) -> bool {
    imp::serves(x, w)
}

/// `conv2d(x, w, stride 1, padding 1) (+ bias)` in bf16, contiguous (B, Cout, H, W). Untracked.
pub fn conv3x3(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
) -> candle_core::Result<candle_core::Tensor> {
    imp::conv3x3(x, w, bias)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor, _: &Tensor) -> bool {
        false
    }
    pub fn conv3x3(_: &Tensor, _: &Tensor, _: Option<&Tensor>) -> Result<Tensor> {
        candle_core::bail!("conv3x3 kernel: built without CUDA")
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{launch_plan, ConvDims};
    use crate::cuda_kernels::{device_address, uninit, CheckedKernels, ProbeResult};
    use candle_core::{DType, Device, Result, Tensor};

    const MODULE: &str = "lorahost_conv3x3";
    const GEMM_MODULE: &str = "lorahost_conv3x3_gemm";

    /// The GEMM route's pack/unpack kernels (the same sources), checked on their own.
    static GEMM: CheckedKernels = CheckedKernels::new(
        "3x3 convolution on cuBLAS",
        "LORAHOST_CONV_GEMM",
        &[crate::cuda_kernels::PRELUDE, crate::cuda_kernels::TENSOR_CORE, super::SOURCE],
        "the implicit-GEMM kernel",
    );

    static KERNELS: CheckedKernels = CheckedKernels::new(
        "3x3 convolution",
        "LORAHOST_CONV",
        &[crate::cuda_kernels::PRELUDE, crate::cuda_kernels::TENSOR_CORE, super::SOURCE],
        "candle's conv2d",
    );

    pub fn prepare() {
        let _ = KERNELS.ptx();
        let _ = GEMM.ptx();
    }

    fn dims(x: &Tensor, w: &Tensor) -> Option<ConvDims> {
        let (batch, cin, height, width) = x.dims4().ok()?;
        let (cout, wcin, kh, kw) = w.dims4().ok()?;
        let d = ConvDims { batch, cin, cout, height, width };
        (wcin == cin && kh == 3 && kw == 3 && d.supported()).then_some(d)
    }

    pub fn serves(x: &Tensor, w: &Tensor) -> bool {
        x.device().is_cuda()
            && x.dtype() == DType::BF16
            && dims(x, w).is_some()
            && KERNELS.ready(x.device(), |dev| probe(dev, kernel_conv3x3))
    }

    pub fn conv3x3(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if dims(x, w).is_some_and(super::gemm_supported)
            && GEMM.ready(x.device(), |dev| probe(dev, gemm_conv3x3))
        {
            return gemm_conv3x3(x, w, bias);
        }
        kernel_conv3x3(x, w, bias)
    }

    /// The operands in bf16, contiguous, and the bias's length checked.
    fn operands(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        d: ConvDims,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).and_then(|t| t.contiguous());
        let bias = bias.map(bf).transpose()?;
        if let Some(b) = bias.as_ref().filter(|b| b.elem_count() != d.cout) {
            candle_core::bail!("conv3x3: bias of {} for {} channels", b.elem_count(), d.cout);
        }
        Ok((bf(x)?, bf(w)?, bias))
    }

    /// The GEMM route (see the module's doc).
    fn gemm_conv3x3(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::cublas::{result, sys};
        let Some(d) = dims(x, w).filter(|d| super::gemm_supported(*d)) else {
            candle_core::bail!("conv3x3 (cuBLAS): shapes {:?} and {:?}", x.shape(), w.shape())
        };
        let Device::Cuda(dev) = x.device() else { candle_core::bail!("conv3x3 (cuBLAS): not a CUDA tensor") };
        let (x, w, bias) = operands(x, w, bias, d)?;
        let g = super::tap_gemm(d);
        let xp = uninit(&x, &[d.batch, g.input_rows, d.cin], DType::BF16)?;
        let (grid, block, args) = super::pack_plan(d, device_address(&x)?, device_address(&xp)?);
        GEMM.launch(x.device(), GEMM_MODULE, "conv_pack_bf16", grid, block, &args)?;
        // (3, 3, Cout, Cin): each tap's weight one row-major (Cout, Cin) slice.
        let wt = w.permute((2, 3, 0, 1))?.contiguous()?;
        let yp = uninit(&x, &[d.batch, g.grid_rows, d.cout], DType::BF16)?;
        let (wa, xa, ya) = (device_address(&wt)?, device_address(&xp)?, device_address(&yp)?);
        let blas = dev.cublas_handle();
        let bf16 = sys::cudaDataType::CUDA_R_16BF;
        let int = |n: usize| n as std::ffi::c_int;
        let (one, zero) = (1f32, 0f32);
        for t in super::tap_products(d) {
            let beta: *const f32 = if t.accumulate { &one } else { &zero };
            // SAFETY: the addresses are those of live contiguous bf16 buffers holding what the
            // products read and write (`tap_gemm`'s geometry: the last tap's last read is the
            // last row of each image's padded input); cuBLAS runs on candle's stream, where
            // the buffers' frees are ordered after it.
            unsafe {
                result::gemm_strided_batched_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    int(d.cout),
                    int(g.grid_rows),
                    int(d.cin),
                    (&one as *const f32).cast(),
                    (wa + 2 * t.weight_offset as u64) as *const std::ffi::c_void,
                    bf16,
                    int(d.cin),
                    0,
                    (xa + 2 * t.input_offset as u64) as *const std::ffi::c_void,
                    bf16,
                    int(d.cin),
                    (g.input_rows * d.cin) as i64,
                    beta.cast(),
                    ya as *mut std::ffi::c_void,
                    bf16,
                    int(d.cout),
                    (g.grid_rows * d.cout) as i64,
                    int(d.batch),
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| candle_core::Error::Msg(format!("conv3x3 (cuBLAS): {e:?}")))?;
        }
        let y = uninit(&x, &[d.batch, d.cout, d.height, d.width], DType::BF16)?;
        let b_addr = bias.as_ref().map(device_address).transpose()?.unwrap_or(0);
        let (grid, block, args) = super::unpack_plan(d, ya, b_addr, device_address(&y)?);
        GEMM.launch(x.device(), GEMM_MODULE, "conv_unpack_bf16", grid, block, &args)?;
        Ok(y)
    }

    /// The implicit-GEMM kernel.
    fn kernel_conv3x3(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Some(d) = dims(x, w) else {
            candle_core::bail!("conv3x3 kernel: shapes {:?} and {:?}", x.shape(), w.shape())
        };
        let (x, w, bias) = operands(x, w, bias, d)?;
        let y = uninit(&x, &[d.batch, d.cout, d.height, d.width], DType::BF16)?;
        let b_addr = match &bias {
            Some(b) => device_address(b)?,
            None => 0,
        };
        let (grid, block, args) =
            launch_plan(d, device_address(&x)?, device_address(&w)?, b_addr, device_address(&y)?);
        KERNELS.launch(x.device(), MODULE, "conv3x3_bf16", grid, block, &args)?;
        Ok(y)
    }

    /// A route (`conv`) against candle's f32 `conv2d` on `device` (channel and pixel counts that
    /// leave partial tiles, with and without a bias): None when they agree within bf16 rounding.
    fn probe(device: &Device, conv: fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>) -> ProbeResult {
        for (b, cin, cout, h, w, with_bias) in [
            (2usize, 5usize, 70usize, 9usize, 11usize, true),
            (1, 64, 16, 8, 8, false),
            (3, 40, 33, 7, 35, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), device)?.to_dtype(DType::BF16)?;
            let wt = Tensor::randn(0f32, 0.2, (cout, cin, 3, 3), device)?.to_dtype(DType::BF16)?;
            let bias = Tensor::randn(0f32, 1.0, cout, device)?.to_dtype(DType::BF16)?;
            let got = conv(&x, &wt, with_bias.then_some(&bias))?.to_dtype(DType::F32)?;
            let mut want = x.to_dtype(DType::F32)?.conv2d(&wt.to_dtype(DType::F32)?, 1, 1, 1, 1)?;
            if with_bias {
                want = want.broadcast_add(&bias.to_dtype(DType::F32)?.reshape((1, cout, 1, 1))?)?;
            }
            let err = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let top = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            if err.is_nan() || err / top >= 0.03 {
                return Ok(Some(format!(
                    "{cin}->{cout} channels at {h}x{w}: off by {:.3e} relative",
                    err / top
                )));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_pixels_and_channels() {
        let d = ConvDims { batch: 2, cin: 5, cout: 70, height: 9, width: 11 };
        let (grid, block, args) = launch_plan(d, 16, 32, 0, 48);
        // 198 pixels and 70 channels in tiles of 64.
        assert_eq!((grid, block, args.len()), ((4, 2, 1), 128, 9));
        assert!(d.supported());
        assert!(!ConvDims { cin: 0, ..d }.supported());
    }
}
