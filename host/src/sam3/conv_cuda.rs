//! The 3×3 convolution (stride 1, padding 1) of the FPN neck and the mask head's pixel decoder
//! on the GPU as an implicit GEMM on the tensor cores ([`SOURCE`], `conv3x3.cu`): bf16 NCHW in
//! and out, f32 accumulation, no im2col matrix in memory (candle's CUDA `conv2d` writes one of
//! Cin·9 × B·H·W elements per call, 0.76 GB at SAM3's 288² level for two images). The input
//! gradient is the same convolution of the output gradient with the transposed, flipped weight.
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

    static KERNELS: CheckedKernels = CheckedKernels::new(
        "3x3 convolution",
        "LORAHOST_CONV",
        &[crate::cuda_kernels::PRELUDE, crate::cuda_kernels::TENSOR_CORE, super::SOURCE],
        "candle's conv2d",
    );

    pub fn prepare() {
        let _ = KERNELS.ptx();
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
            && KERNELS.ready(x.device(), probe)
    }

    pub fn conv3x3(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Some(d) = dims(x, w) else {
            candle_core::bail!("conv3x3 kernel: shapes {:?} and {:?}", x.shape(), w.shape())
        };
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).and_then(|t| t.contiguous());
        let (x, w) = (bf(x)?, bf(w)?);
        let bias = bias.map(bf).transpose()?;
        if bias.as_ref().is_some_and(|b| b.elem_count() != d.cout) {
            candle_core::bail!(
                "conv3x3 kernel: bias of {} for {} channels",
                bias.unwrap().elem_count(),
                d.cout
            );
        }
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

    /// The kernel against candle's f32 `conv2d` on `device` (channel and pixel counts that
    /// leave partial tiles, with and without a bias): None when they agree within bf16 rounding.
    fn probe(device: &Device) -> ProbeResult {
        for (b, cin, cout, h, w, with_bias) in
            [(2usize, 5usize, 70usize, 9usize, 11usize, true), (1, 64, 16, 8, 8, false)]
        {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), device)?.to_dtype(DType::BF16)?;
            let wt = Tensor::randn(0f32, 0.2, (cout, cin, 3, 3), device)?.to_dtype(DType::BF16)?;
            let bias = Tensor::randn(0f32, 1.0, cout, device)?.to_dtype(DType::BF16)?;
            let got = conv3x3(&x, &wt, with_bias.then_some(&bias))?.to_dtype(DType::F32)?;
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
