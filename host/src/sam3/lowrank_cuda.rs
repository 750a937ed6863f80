//! An adapter's low-rank products on the GPU with the dropout drawn in place
//! ([`SOURCE`], `lowrank.cu`): the down-projection `h = drop(act(x))·Aᵀ` of the forward, and
//! in backward the factor gradient `dA = gᵀ·drop(act(x))` and the layer's input gradient
//! `(dy·W + drop(g·A)) ⊙ act'(x)`, each one tensor-core kernel that reads its large operand
//! once and draws the mask entry by entry as it goes.
//!
//! Composed, the first two had [`super::fused_cuda`]'s activation/dropout kernel write the
//! dropped-out input (as large as `x`: 10,368 × 1024 per ViT projection at SAM3's batch 2,
//! × 4736 before fc2) for a matrix product to read back, and the third had a product write
//! `g·A` (as large again) for the elementwise kernel to read: an activation-sized write and
//! read and a launch more each, per adapted linear and step. The values are the same entries
//! (`bf16(act(x)·scale)` where kept, the same generator draws), multiplied in f32 on the tensor
//! cores like cuBLAS's products; `dA` sums the rows in chunks (partial sums, then one pass
//! adding them in order: deterministic).
//!
//! Checked once per process against the composed products on the GPU before use (a
//! disagreement or an error leaves the adapters on the composed path, logged);
//! `LORAHOST_LORA_KERNELS=0` switches them off (A/B timings).

use crate::cuda_kernels::{Arg, Launch};
use crate::sam3::fused_cuda::MaskArgs;

/// The kernels' CUDA C source (compiled after [`crate::cuda_kernels::PRELUDE`],
/// [`crate::cuda_kernels::TENSOR_CORE`] and [`super::fused_cuda::HELPERS`]).
pub const SOURCE: &str = include_str!("lowrank.cu");

/// The largest adapter rank the kernels take.
pub const MAX_RANK: usize = 64;

/// The most rows the kernels take (the input gradient's grid has one block row per 64 rows,
/// at most 65,535 of them).
pub const MAX_ROWS: usize = 65_535 * 64;

/// Threads per block of the kernels.
const THREADS: u32 = 128;

/// Whether the kernels take a product of rank `r` over `k`-wide rows: `r` and `k` even (a pair
/// of neighbouring entries is one 32-bit word and one draw), `r` at most [`MAX_RANK`].
pub fn supported(k: usize, r: usize) -> bool {
    k > 0 && k.is_multiple_of(2) && r > 0 && r.is_multiple_of(2) && r <= MAX_RANK && k < i32::MAX as usize
}

/// The down-projection's launch: `h` (rows, r) bf16 = `drop(act(x))·Aᵀ` for `x` (rows, k) and
/// `A` (r, k) at the addresses `[x, a, h]`, one block per 16 rows.
pub fn down_launch([x, a, h]: [u64; 3], rows: usize, k: usize, r: usize, mask: MaskArgs, act: i32) -> Launch {
    let tiles = match r {
        0..=16 => 2,
        17..=32 => 4,
        _ => 8,
    };
    let mut args =
        vec![Arg(x), Arg(a), Arg(h), Arg::i64(rows as i64), Arg::i32(k as i32), Arg::i32(r as i32)];
    args.extend(mask.args());
    args.push(Arg::i32(act));
    let grid = (rows.div_ceil(16).max(1) as u32, 1, 1);
    Launch { name: format!("lr_down_{tiles}"), grid, block: THREADS, args }
}

/// How [`grad_a_launches`] splits `rows` rows of `k` entries: (chunks, rows per chunk, a
/// multiple of 32), enough blocks of 64 columns × one chunk to fill a large GPU (~4 per SM of
/// 132).
pub fn grad_a_split(rows: usize, k: usize) -> (usize, usize) {
    let column_tiles = k.div_ceil(64).max(1);
    let chunks = 528usize.div_ceil(column_tiles).clamp(1, rows.div_ceil(32).max(1));
    let per = rows.div_ceil(chunks).div_ceil(32).max(1) * 32;
    (rows.div_ceil(per).max(1), per)
}

/// The factor gradient's launches: `dA` (r, k) f32 = `gᵀ·drop(act(x))` for `g` (rows, r) bf16 and
/// `x` (rows, k) at the addresses `[g, x, partial, out]`, the rows cut as `split` says
/// ([`grad_a_split`]): with one chunk the kernel writes `out` itself; with more, each chunk's
/// sum goes to `partial` (chunks × r × k f32) and a second kernel adds them into `out`.
pub fn grad_a_launches(
    [g, x, partial, out]: [u64; 4],
    rows: usize,
    k: usize,
    r: usize,
    mask: MaskArgs,
    act: i32,
    (chunks, per): (usize, usize),
) -> Vec<Launch> {
    let tiles = match r {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    };
    let target = if chunks == 1 { out } else { partial };
    let mut args =
        vec![Arg(g), Arg(x), Arg(target), Arg::i64(rows as i64), Arg::i32(k as i32), Arg::i32(r as i32)];
    args.push(Arg::i64(per as i64));
    args.extend(mask.args());
    args.push(Arg::i32(act));
    let grid = (k.div_ceil(64) as u32, chunks as u32, 1);
    let mut launches = vec![Launch { name: format!("lr_grad_a_{tiles}"), grid, block: THREADS, args }];
    if chunks > 1 {
        let n = r * k;
        let (grid, block) = crate::cuda_kernels::elementwise_grid(n);
        let args = vec![Arg(partial), Arg(out), Arg::i64(n as i64), Arg::i32(chunks as i32)];
        launches.push(Launch { name: "lr_sum".into(), grid, block, args });
    }
    launches
}

/// The input gradient's launch: `dx` (rows, k) = `(d1 + drop(g·A)) ⊙ act'(x)` for `d1`, `x`
/// (rows, k), `g` (rows, r) and `A` (r, k) at the addresses `[d1, g, a, x, dx]` (`x` 0 without
/// an activation), one block per 64 rows × 64 columns.
pub fn input_grad_launch(
    [d1, g, a, x, dx]: [u64; 5],
    rows: usize,
    k: usize,
    r: usize,
    mask: MaskArgs,
    act: i32,
) -> Launch {
    let steps = match r {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    };
    let mut args = vec![Arg(d1), Arg(g), Arg(a), Arg(x), Arg(dx)];
    args.extend([Arg::i64(rows as i64), Arg::i32(k as i32), Arg::i32(r as i32)]);
    args.extend(mask.args());
    args.push(Arg::i32(act));
    let grid = (k.div_ceil(64) as u32, rows.div_ceil(64).max(1) as u32, 1);
    Launch { name: format!("lr_input_grad_{steps}"), grid, block: THREADS, args }
}

/// Whether the kernels serve an adapter of rank `r` on the input `x`: CUDA, bf16, 2-D, at most
/// [`MAX_ROWS`] rows, a supported shape ([`supported`]), the kernels compiled and checked on
/// this GPU.
pub fn serves(x: &candle_core::Tensor, r: usize) -> bool {
    imp::serves(x, r)
}

/// `h = drop(act(x))·Aᵀ` (rows, r) in bf16 for `x` (rows, k) and `a` (r, k), both bf16, with keep
/// `mask` for drop probability `p` (no dropout without one). Where [`serves`] holds.
pub fn down(
    x: &candle_core::Tensor,
    a: &candle_core::Tensor,
    act: Option<super::nn::Activation>,
    mask: Option<&crate::rng::KeepMask>,
    p: f64,
) -> candle_core::Result<candle_core::Tensor> {
    imp::down(x, a, act, mask, p)
}

/// `dA = gᵀ·drop(act(x))` (r, k) in f32 for `g` (rows, r) and `x` (rows, k), both bf16, with keep
/// `mask` for drop probability `p`. Where [`serves`] holds.
pub fn grad_a(
    g: &candle_core::Tensor,
    x: &candle_core::Tensor,
    act: Option<super::nn::Activation>,
    mask: Option<&crate::rng::KeepMask>,
    p: f64,
) -> candle_core::Result<candle_core::Tensor> {
    imp::grad_a(g, x, act, mask, p, None)
}

/// The adapted linear's input gradient `(d1 + drop(g·A)) ⊙ act'(x)` (rows, k) in bf16 for `d1`
/// (rows, k) (the base part `dy·W`), `g` (rows, r) (`dy·(sB)`) and `a` (r, k), with keep `mask`
/// for drop probability `p`; `act` with the layer's input `x` when the layer applies an
/// activation first. Where [`serves`] holds.
pub fn input_grad(
    d1: &candle_core::Tensor,
    g: &candle_core::Tensor,
    a: &candle_core::Tensor,
    mask: Option<&crate::rng::KeepMask>,
    p: f64,
    act: Option<(super::nn::Activation, &candle_core::Tensor)>,
) -> candle_core::Result<candle_core::Tensor> {
    imp::input_grad(d1, g, a, mask, p, act)
}

/// Compile the kernels (see [`crate::cuda_kernels::precompile`]).
pub fn prepare() {
    imp::prepare()
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use crate::rng::KeepMask;
    use crate::sam3::nn::Activation;
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor, _: usize) -> bool {
        false
    }

    pub fn prepare() {}

    pub fn down(
        _: &Tensor,
        _: &Tensor,
        _: Option<Activation>,
        _: Option<&KeepMask>,
        _: f64,
    ) -> Result<Tensor> {
        candle_core::bail!("LoRA kernels: built without CUDA")
    }

    pub fn grad_a(
        _: &Tensor,
        _: &Tensor,
        _: Option<Activation>,
        _: Option<&KeepMask>,
        _: f64,
        _: Option<usize>,
    ) -> Result<Tensor> {
        candle_core::bail!("LoRA kernels: built without CUDA")
    }

    pub fn input_grad(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&KeepMask>,
        _: f64,
        _: Option<(Activation, &Tensor)>,
    ) -> Result<Tensor> {
        candle_core::bail!("LoRA kernels: built without CUDA")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{down_launch, grad_a_launches, grad_a_split, input_grad_launch, supported, SOURCE};
    use crate::cuda_kernels::{device_address, uninit, CheckedKernels, ProbeResult};
    use crate::rng::KeepMask;
    use crate::sam3::fused_cuda;
    use crate::sam3::nn::Activation;
    use candle_core::{DType, Device, Result, Tensor};

    const MODULE: &str = "lorahost_lowrank";

    static KERNELS: CheckedKernels = CheckedKernels::new(
        "LoRA low-rank",
        "LORAHOST_LORA_KERNELS",
        &[crate::cuda_kernels::PRELUDE, crate::cuda_kernels::TENSOR_CORE, fused_cuda::HELPERS, SOURCE],
        "the composed adapter products",
    );

    pub fn prepare() {
        let _ = KERNELS.ptx();
    }

    pub fn serves(x: &Tensor, r: usize) -> bool {
        x.device().is_cuda()
            && x.dtype() == DType::BF16
            && x.rank() == 2
            && x.dim(0).is_ok_and(|rows| rows <= super::MAX_ROWS)
            && supported(x.dim(1).unwrap_or(0), r)
            && fused_cuda::serves(x)
            && KERNELS.ready(x.device(), probe)
    }

    /// `t` contiguous, bf16, 4-byte aligned (pairs of entries are read as words): its address.
    fn operand(what: &str, t: &Tensor) -> Result<(Tensor, u64)> {
        if t.dtype() != DType::BF16 {
            candle_core::bail!("LoRA kernels: {what} is {:?}, not bf16", t.dtype());
        }
        let t = t.contiguous()?;
        let addr = device_address(&t)?;
        if addr % 4 != 0 {
            candle_core::bail!("LoRA kernels: {what} is not 4-byte aligned");
        }
        Ok((t, addr))
    }

    pub fn down(
        x: &Tensor,
        a: &Tensor,
        act: Option<Activation>,
        mask: Option<&KeepMask>,
        p: f64,
    ) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        let (r, ka) = a.dims2()?;
        if ka != k || !supported(k, r) {
            candle_core::bail!("LoRA kernels: down-projection of {:?} by {:?}", x.shape(), a.shape());
        }
        let Some(ptx) = KERNELS.ptx() else { candle_core::bail!("LoRA kernels unavailable") };
        let (x, xa) = operand("x", x)?;
        let (a, aa) = operand("A", a)?;
        let h = uninit(&x, &[rows, r], DType::BF16)?;
        if rows > 0 {
            let (_held, m) = fused_cuda::kernel_mask(mask, p, &x)?;
            let l = down_launch([xa, aa, device_address(&h)?], rows, k, r, m, fused_cuda::act_code(act));
            l.run(x.device(), MODULE, ptx)?;
        }
        drop(a);
        Ok(h)
    }

    /// [`super::grad_a`], the rows cut into `chunks` pieces when given (the probe checks both
    /// ways), else as [`grad_a_split`] says.
    pub fn grad_a(
        g: &Tensor,
        x: &Tensor,
        act: Option<Activation>,
        mask: Option<&KeepMask>,
        p: f64,
        chunks: Option<usize>,
    ) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        let (rg, r) = g.dims2()?;
        if rg != rows || !supported(k, r) {
            candle_core::bail!("LoRA kernels: factor gradient of {:?} and {:?}", g.shape(), x.shape());
        }
        let Some(ptx) = KERNELS.ptx() else { candle_core::bail!("LoRA kernels unavailable") };
        let (x, xa) = operand("x", x)?;
        let (g, ga) = operand("g", g)?;
        if rows == 0 {
            return Tensor::zeros((r, k), DType::F32, x.device());
        }
        let split = match chunks {
            Some(c) => {
                let per = rows.div_ceil(c.max(1)).div_ceil(32) * 32;
                (rows.div_ceil(per), per)
            }
            None => grad_a_split(rows, k),
        };
        let out = uninit(&x, &[r, k], DType::F32)?;
        let partial = if split.0 > 1 { Some(uninit(&x, &[split.0, r, k], DType::F32)?) } else { None };
        let pa = partial.as_ref().map(device_address).transpose()?.unwrap_or(0);
        let (_held, m) = fused_cuda::kernel_mask(mask, p, &x)?;
        let addrs = [ga, xa, pa, device_address(&out)?];
        for l in grad_a_launches(addrs, rows, k, r, m, fused_cuda::act_code(act), split) {
            l.run(x.device(), MODULE, ptx)?;
        }
        drop((g, partial));
        Ok(out)
    }

    pub fn input_grad(
        d1: &Tensor,
        g: &Tensor,
        a: &Tensor,
        mask: Option<&KeepMask>,
        p: f64,
        act: Option<(Activation, &Tensor)>,
    ) -> Result<Tensor> {
        let (rows, k) = d1.dims2()?;
        let (r, ka) = a.dims2()?;
        if ka != k
            || g.dims2()? != (rows, r)
            || act.is_some_and(|(_, x)| x.dims() != d1.dims())
            || !supported(k, r)
        {
            candle_core::bail!("LoRA kernels: input gradient of {:?} through {:?}", d1.shape(), a.shape());
        }
        let Some(ptx) = KERNELS.ptx() else { candle_core::bail!("LoRA kernels unavailable") };
        let (d1, d1a) = operand("d1", d1)?;
        let (g, ga) = operand("g", g)?;
        let (a, aa) = operand("A", a)?;
        let x = act.map(|(_, x)| operand("x", x)).transpose()?;
        let dx = uninit(&d1, &[rows, k], DType::BF16)?;
        if rows > 0 {
            let (_held, m) = fused_cuda::kernel_mask(mask, p, &d1)?;
            let xa = x.as_ref().map_or(0, |(_, addr)| *addr);
            let act = fused_cuda::act_code(act.map(|(a, _)| a));
            let l = input_grad_launch([d1a, ga, aa, xa, device_address(&dx)?], rows, k, r, m, act);
            l.run(d1.device(), MODULE, ptx)?;
        }
        drop((g, a, x));
        Ok(dx)
    }

    /// The kernels against the composed products (the activation/dropout kernel's output times
    /// the factor in f32) on shapes with partial tiles of rows, columns and rank, with and
    /// without an activation, the rows of `dA` in one chunk and in several.
    fn probe(device: &Device) -> ProbeResult {
        for (rows, k, r, act, p) in [
            (37usize, 80usize, 32usize, None, 0.3),
            (70, 144, 16, Some(Activation::Gelu), 0.1),
            (20, 64, 64, None, 0.0),
        ] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), device)?.to_dtype(DType::BF16)?;
            let a = Tensor::randn(0f32, 0.1, (r, k), device)?.to_dtype(DType::BF16)?;
            let g = Tensor::randn(0f32, 1.0, (rows, r), device)?.to_dtype(DType::BF16)?;
            let mask = (p > 0.0).then(|| KeepMask::Counter {
                seed: 0x5eed,
                offset: 12_345,
                p,
                shape: x.shape().clone(),
                device: device.clone(),
            });
            let xm = fused_cuda::adapter_input(&x, act, mask.as_ref(), p)?.to_dtype(DType::F32)?;
            let off = |want: &Tensor, got: &Tensor| -> Result<f32> {
                let err = (want - got.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let top = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                Ok(if err.is_nan() { f32::INFINITY } else { err / top })
            };
            let h = down(&x, &a, act, mask.as_ref(), p)?;
            let e = off(&xm.matmul(&a.to_dtype(DType::F32)?.t()?)?, &h)?;
            if e >= 2e-2 {
                return Ok(Some(format!("down-projection {rows}x{k} rank {r}: off by {e:.3e} relative")));
            }
            let want = g.to_dtype(DType::F32)?.t()?.matmul(&xm)?;
            for chunks in [None, Some(1), Some(2)] {
                let e = off(&want, &grad_a(&g, &x, act, mask.as_ref(), p, chunks)?)?;
                if e >= 1e-3 {
                    return Ok(Some(format!("factor gradient {rows}x{k} rank {r}: off by {e:.3e} relative")));
                }
            }
            // The input gradient against the elementwise kernel given g·A.
            let d1 = Tensor::randn(0f32, 1.0, (rows, k), device)?.to_dtype(DType::BF16)?;
            let ga = g.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
            let x32 = x.to_dtype(DType::F32)?;
            let d1_32 = d1.to_dtype(DType::F32)?;
            let want =
                fused_cuda::linear_input_grad(&d1_32, Some(&ga), mask.as_ref(), p, act.map(|f| (f, &x32)))?;
            let e = off(&want, &input_grad(&d1, &g, &a, mask.as_ref(), p, act.map(|f| (f, &x)))?)?;
            if e >= 2e-2 {
                return Ok(Some(format!("input gradient {rows}x{k} rank {r}: off by {e:.3e} relative")));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_row_once_in_chunks_of_whole_tiles() {
        for (rows, k) in [(10_368usize, 1024usize), (10_368, 4736), (37, 80), (1, 2), (100_000, 256)] {
            let (chunks, per) = grad_a_split(rows, k);
            assert_eq!(per % 32, 0, "{rows}x{k}");
            assert!(chunks * per >= rows && (chunks - 1) * per < rows, "{rows}x{k}: {chunks} x {per}");
        }
        assert!(supported(1024, 32) && supported(4736, 64));
        assert!(!supported(1023, 32) && !supported(1024, 31) && !supported(1024, 128));
    }

    #[test]
    fn launches_take_one_block_per_16_rows_and_sum_chunks_only_when_there_are_several() {
        let m = MaskArgs::NONE;
        let l = down_launch([1, 2, 3], 37, 80, 32, m, 0);
        assert_eq!((l.name.as_str(), l.grid, l.block, l.args.len()), ("lr_down_4", (3, 1, 1), 128, 11));
        let one = grad_a_launches([1, 2, 3, 4], 37, 80, 32, m, 0, (1, 64));
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].grid, one[0].args[2].0), ((2, 1, 1), 4), "one chunk writes dA itself");
        let two = grad_a_launches([1, 2, 3, 4], 37, 80, 32, m, 0, (2, 32));
        assert_eq!((two.len(), two[0].args[2].0, two[1].name.as_str()), (2, 3, "lr_sum"));
    }
}
