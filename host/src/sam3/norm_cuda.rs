//! LayerNorm and GroupNorm forward and input-gradient kernels for CUDA ([`SOURCE`], `norm.cu`):
//! statistics in f32 (mean, then the centred variance, as the composed computation does: no
//! E[x²] − E[x]² cancellation), reading and writing the activations' dtype (bf16 or f32).
//!
//! LayerNorm: one block per row. The composed LayerNorm makes about ten elementwise passes over
//! an f32 copy of the input in the forward and fifteen in the backward; these make one read and
//! one write (forward) and two reads and one write (backward).
//!
//! GroupNorm (the mask head's pixel decoder: 8 groups of 2.6 M elements per image at 288²): a
//! group's row is far too long for one block, so each row is cut into chunks; one kernel writes
//! each chunk's mean and centred sum of squares, and the kernels that use the statistics
//! combine them per row (Chan's formula) — two launches forward, three backward (the chunk sums
//! of the gradient's two reductions in between), no atomics, deterministic. The launch plans
//! ([`group_forward_launches`], [`group_backward_launches`]) are plain functions of addresses,
//! run as they are by the CPU emulation test (`host/tests/cuda_emu.rs`).
//!
//! Compiled on first use ([`crate::cuda_kernels`]); if that fails the caller keeps the composed
//! path. `LORAHOST_FUSED_NORM=0` switches the kernels off (for A/B timings).

use crate::cuda_kernels::{Arg, Launch};
use candle_core::{DType, Result, Tensor};

/// The kernels' CUDA C source (compiled after [`crate::cuda_kernels::PRELUDE`]): LayerNorm
/// (`ln_*`) and GroupNorm (`gn_*`), each for bf16 and f32.
pub const SOURCE: &str = include_str!("norm.cu");

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

/// The launch of LayerNorm kernel `name` (`ln_fwd_<dtype>` on x, weight, bias, y;
/// `ln_bwd_<dtype>` on x, dy, weight, dx) over `rows` rows of `c` elements: one block per row,
/// about four elements per thread — or, in bf16 for widths of 256, 512 and 1024 with every
/// operand 16-byte aligned, the warp-per-row kernels (`ln_{fwd,bwd}_warp_bf16_<c / 256>`,
/// eight rows per block, the row in registers).
pub fn layer_launch(name: &str, rows: usize, c: usize, addrs: [u64; 4], eps: f64) -> Launch {
    let chunks = c / 256;
    let warp = c.is_multiple_of(256)
        && matches!(chunks, 1 | 2 | 4)
        && rows < i32::MAX as usize
        && addrs.iter().all(|a| a.is_multiple_of(16));
    if let (true, Some(pass)) = (warp, name.strip_suffix("_bf16")) {
        let mut args: Vec<Arg> = addrs.iter().map(|&a| Arg(a)).collect();
        args.extend([Arg::i32(rows as i32), Arg::f32(eps as f32)]);
        let name = format!("{pass}_warp_bf16_{chunks}");
        return Launch { name, grid: (rows.div_ceil(8) as u32, 1, 1), block: 256, args };
    }
    let mut args: Vec<Arg> = addrs.iter().map(|&a| Arg(a)).collect();
    args.extend([Arg::i32(c as i32), Arg::f32(eps as f32)]);
    let threads = (c.div_ceil(4).div_ceil(32).clamp(1, 32) * 32) as u32;
    Launch { name: name.to_string(), grid: (rows as u32, 1, 1), block: threads, args }
}

/// Whether the GroupNorm kernels serve `x` (B, C, spatial...) with `groups` groups: [`serves`],
/// and sizes the kernels index with 32-bit offsets within a row.
pub fn serves_groups(x: &Tensor, groups: usize) -> bool {
    GroupDims::of(x.dims(), groups).is_some_and(|d| d.fits()) && serves(x)
}

/// GroupNorm of `x` (B, C, spatial...) over `groups` groups with f32 `weight` and `bias` (C
/// elements), in `x`'s dtype; untracked. Only where [`serves_groups`] holds.
pub fn group_forward(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    imp::group_forward(x, weight, bias, groups, eps)
}

/// The gradient of the GroupNorm's input for `dy` (x's shape) and f32 `weight` (C elements), in
/// `x`'s dtype. Only where [`serves_groups`] holds.
pub fn group_backward(x: &Tensor, dy: &Tensor, weight: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    imp::group_backward(x, dy, weight, groups, eps)
}

/// A GroupNorm problem as the kernels see it: `batch · groups` rows, each the contiguous
/// `channels / groups · hw` elements of one group of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupDims {
    /// Images.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Elements per channel (the product of the spatial dimensions).
    pub hw: usize,
    /// Groups.
    pub groups: usize,
}

/// Threads per block of the GroupNorm kernels.
pub const GROUP_THREADS: u32 = 256;
/// Blocks a GroupNorm launch aims at (several per SM on current GPUs).
const GROUP_TARGET_BLOCKS: usize = 2048;
/// The shortest chunk worth a block: eight elements per thread.
const GROUP_MIN_CHUNK: usize = 8 * GROUP_THREADS as usize;

impl GroupDims {
    /// The problem of a (B, C, spatial...) input; None for rank below 3 or groups that do not
    /// divide the channels.
    pub fn of(dims: &[usize], groups: usize) -> Option<GroupDims> {
        if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
            return None;
        }
        Some(GroupDims { batch: dims[0], channels: dims[1], hw: dims[2..].iter().product(), groups })
    }

    /// Rows (image, group).
    pub fn rows(&self) -> usize {
        self.batch * self.groups
    }

    /// Elements per row.
    pub fn len(&self) -> usize {
        self.channels / self.groups * self.hw
    }

    /// Whether a row is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the kernels take it: something to normalise, 32-bit offsets within a row, rows
    /// within the grid's second axis.
    pub fn fits(&self) -> bool {
        self.rows() > 0 && !self.is_empty() && self.len() < (i32::MAX / 2) as usize && self.rows() <= 65535
    }

    /// (chunks per row, chunk length): about [`GROUP_TARGET_BLOCKS`] blocks in all, chunks of
    /// at least [`GROUP_MIN_CHUNK`] elements (the last chunk of a row may be shorter).
    pub fn chunks(&self) -> (usize, usize) {
        let len = self.len().max(1);
        let want = (GROUP_TARGET_BLOCKS / self.rows().max(1)).max(1);
        let chunk = len.div_ceil(want.min(len.div_ceil(GROUP_MIN_CHUNK)).max(1));
        (len.div_ceil(chunk), chunk)
    }

    /// f32 elements of a chunk-statistics buffer (two per chunk).
    pub fn part_len(&self) -> usize {
        self.rows() * self.chunks().0 * 2
    }

    fn grid(&self) -> (u32, u32, u32) {
        (self.chunks().0 as u32, self.rows() as u32, 1)
    }

    /// The arguments after the data pointers: len, chunk, hw, channels per group, groups, eps.
    fn shape_args(&self, eps: f64) -> [Arg; 6] {
        [
            Arg::i64(self.len() as i64),
            Arg::i32(self.chunks().1 as i32),
            Arg::i32(self.hw as i32),
            Arg::i32((self.channels / self.groups) as i32),
            Arg::i32(self.groups as i32),
            Arg::f32(eps as f32),
        ]
    }

    fn launch(&self, name: String, args: Vec<Arg>) -> Launch {
        Launch { name, grid: self.grid(), block: GROUP_THREADS, args }
    }

    fn part_launch(&self, suffix: &str, x: u64, part: u64) -> Launch {
        let (_, chunk) = self.chunks();
        self.launch(
            format!("gn_part_{suffix}"),
            vec![Arg(x), Arg(part), Arg::i64(self.len() as i64), Arg::i32(chunk as i32)],
        )
    }
}

/// The GroupNorm forward on device addresses (`suffix` "bf16" or "f32" for x and y; f32
/// `w`, `b` of C elements, `part` of [`GroupDims::part_len`] f32): chunk statistics, then the
/// normalised output.
pub fn group_forward_launches(
    d: GroupDims,
    suffix: &str,
    [x, w, b, y]: [u64; 4],
    part: u64,
    eps: f64,
) -> [Launch; 2] {
    let mut args = vec![Arg(x), Arg(part), Arg(w), Arg(b), Arg(y)];
    args.extend(d.shape_args(eps));
    [d.part_launch(suffix, x, part), d.launch(format!("gn_fwd_{suffix}"), args)]
}

/// The GroupNorm input gradient on device addresses (x, dy and dx in `suffix`'s dtype, f32
/// `w`; `part` and `part2` of [`GroupDims::part_len`] f32): the input's chunk statistics, the
/// gradient's chunk sums, then dx.
pub fn group_backward_launches(
    d: GroupDims,
    suffix: &str,
    [x, dy, w, dx]: [u64; 4],
    [part, part2]: [u64; 2],
    eps: f64,
) -> [Launch; 3] {
    let mut sums = vec![Arg(x), Arg(dy), Arg(part), Arg(w), Arg(part2)];
    sums.extend(d.shape_args(eps));
    let mut grad = vec![Arg(x), Arg(dy), Arg(part), Arg(part2), Arg(w), Arg(dx)];
    grad.extend(d.shape_args(eps));
    [
        d.part_launch(suffix, x, part),
        d.launch(format!("gn_bwd_part_{suffix}"), sums),
        d.launch(format!("gn_bwd_{suffix}"), grad),
    ]
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

    pub fn group_forward(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: f64) -> Result<Tensor> {
        candle_core::bail!("GroupNorm kernels: built without CUDA")
    }

    pub fn group_backward(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: f64) -> Result<Tensor> {
        candle_core::bail!("GroupNorm kernels: built without CUDA")
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

#[cfg(feature = "cuda")]
mod imp {
    use super::layer_launch;
    use super::{group_backward_launches, group_forward_launches, kernel_dtype, GroupDims, SOURCE};
    use crate::cuda_kernels::{device_address, uninit, Launch, PRELUDE};
    use candle_core::{DType, Result, Tensor};

    const MODULE: &str = "lorahost_layer_norm";

    pub fn prepare() {
        let _ = ptx();
    }

    static KERNELS: crate::cuda_kernels::KernelSet =
        crate::cuda_kernels::KernelSet::new("LayerNorm/GroupNorm", "LORAHOST_FUSED_NORM", &[PRELUDE, SOURCE]);

    /// The compiled PTX, or None (logged once) when the kernels cannot be used.
    fn ptx() -> Option<&'static str> {
        KERNELS.ptx()
    }

    pub fn serves(x: &Tensor) -> bool {
        x.device().is_cuda() && kernel_dtype(x.dtype()).is_some() && x.rank() >= 1 && ptx().is_some()
    }

    /// (C,) f32 contiguous.
    fn per_channel(t: &Tensor, c: usize) -> Result<Tensor> {
        if t.elem_count() != c {
            candle_core::bail!("norm kernel: {} weights for width {c}", t.elem_count());
        }
        t.detach().to_dtype(DType::F32)?.flatten_all()?.contiguous()
    }

    /// Run `ln_{fwd,bwd}_<dtype>` on the contiguous `x` with operands `a`, `b` (forward: weight
    /// and bias; backward: dy and weight).
    fn run(kernel: &str, x: &Tensor, a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let (Some(suffix), Some(ptx)) = (kernel_dtype(x.dtype()), ptx()) else {
            candle_core::bail!("LayerNorm kernel: {:?} is not served", x.dtype())
        };
        let c = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / c.max(1);
        let out = uninit(x, x.dims(), x.dtype())?;
        if rows > 0 {
            let addrs = [device_address(x)?, device_address(a)?, device_address(b)?, device_address(&out)?];
            let l = layer_launch(&format!("{kernel}_{suffix}"), rows, c, addrs, eps);
            l.run(x.device(), MODULE, ptx)?;
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

    /// The problem and dtype suffix of a GroupNorm input the kernels take.
    fn group_dims(x: &Tensor, groups: usize) -> Result<(GroupDims, &'static str)> {
        match (GroupDims::of(x.dims(), groups).filter(|d| d.fits()), kernel_dtype(x.dtype())) {
            (Some(d), Some(suffix)) => Ok((d, suffix)),
            _ => candle_core::bail!(
                "GroupNorm kernel: {:?} {:?} in {groups} groups is not served",
                x.dtype(),
                x.dims()
            ),
        }
    }

    fn run_all(device: &candle_core::Device, launches: &[Launch]) -> Result<()> {
        let Some(ptx) = ptx() else { candle_core::bail!("GroupNorm kernels: not compiled") };
        for l in launches {
            l.run(device, MODULE, ptx)?;
        }
        Ok(())
    }

    pub fn group_forward(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let (d, suffix) = group_dims(x, groups)?;
        let x = x.detach().contiguous()?;
        let (w, b) = (per_channel(weight, d.channels)?, per_channel(bias, d.channels)?);
        let part = uninit(&x, &[d.part_len()], DType::F32)?;
        let y = uninit(&x, x.dims(), x.dtype())?;
        let addrs = [device_address(&x)?, device_address(&w)?, device_address(&b)?, device_address(&y)?];
        run_all(x.device(), &group_forward_launches(d, suffix, addrs, device_address(&part)?, eps))?;
        Ok(y)
    }

    pub fn group_backward(
        x: &Tensor,
        dy: &Tensor,
        weight: &Tensor,
        groups: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let (d, suffix) = group_dims(x, groups)?;
        if dy.shape() != x.shape() {
            candle_core::bail!("GroupNorm kernel: gradient {:?} for input {:?}", dy.shape(), x.shape());
        }
        let x = x.detach().contiguous()?;
        let dy = dy.detach().to_dtype(x.dtype())?.contiguous()?;
        let w = per_channel(weight, d.channels)?;
        let (part, part2) =
            (uninit(&x, &[d.part_len()], DType::F32)?, uninit(&x, &[d.part_len()], DType::F32)?);
        let dx = uninit(&x, x.dims(), x.dtype())?;
        let addrs = [device_address(&x)?, device_address(&dy)?, device_address(&w)?, device_address(&dx)?];
        let parts = [device_address(&part)?, device_address(&part2)?];
        run_all(x.device(), &group_backward_launches(d, suffix, addrs, parts, eps))?;
        Ok(dx)
    }
}
