//! Gradient statistics (sum of squares, largest magnitude, non-finite count) of all of a step's
//! gradients in one CUDA kernel launch, for the gradient report and global-norm clipping.
//!
//! The composed statistics flatten and concatenate every gradient (one copy kernel per tensor:
//! about 730 for SAM3's LoRA set) and then reduce; with the device idle while the host issues
//! them (the statistics end in a read-back), that costs the step ~20 ms of launches. The kernel
//! reads a table of (address, length) per gradient; each block reduces a slice of one tensor
//! and writes its partial (sum of squares, NaN-sticky maximum of |g|, non-finite count) in f32;
//! the host reads the partials back once and combines them per group in f64. On the CPU, or for
//! gradients that are not contiguous f32, the composed path runs ([`super::optim::group_stats`]).
//! The first use in a process is checked against the composed statistics (a disagreement turns
//! the kernel off, with a warning). `LORAHOST_FUSED_STATS=0` switches it off (A/B timings).

use crate::cuda_kernels::{Arg, Launch};

/// The kernel's CUDA C source (compiled after [`crate::cuda_kernels::PRELUDE`]).
pub const SOURCE: &str = r#"
// NaN-sticky maximum: NaN if either is NaN, else the larger.
__device__ __forceinline__ float nan_max(float a, float b) {
    return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// table: 2 values per tensor (f32 address, element count). Block (x, t) reduces the grid-stride
// slice x of tensor t into part[(t * gridDim.x + x) * 3 ..]: sum of squares, max |g|, count of
// non-finite entries.
extern "C" __global__ void grad_stats(const long long* table, int count, float* part) {
    __shared__ float sh[32];
    const int t = blockIdx.y;
    if (t >= count) return;
    const float* g = (const float*)table[2 * t];
    const long long n = table[2 * t + 1];
    float s = 0.f, m = 0.f, bad = 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = g[i];
        const float a = fabsf(v);
        s += v * v;
        m = nan_max(m, a);
        if (!(a <= 3.4028234663852886e38f)) bad += 1.f;
    }
    s = block_sum(s, sh);
    bad = block_sum(bad, sh);
    for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = sh[0];
        for (int k = 1; k < nw; ++k) r = nan_max(r, sh[k]);
        float* p = part + ((long long)t * gridDim.x + blockIdx.x) * 3;
        p[0] = s;
        p[1] = r;
        p[2] = bad;
    }
}
"#;

/// Threads per block.
pub const THREADS: u32 = 256;

/// Blocks per tensor for tensors of at most `max_n` elements: about eight elements per thread,
/// at most 64.
pub fn blocks_per_tensor(max_n: usize) -> usize {
    max_n.div_ceil(THREADS as usize * 8).clamp(1, 64)
}

/// The launch over `count` tensors listed in `table` (device address of the (address, length)
/// pairs), the largest of `max_n` elements, writing `count · blocks_per_tensor(max_n) · 3`
/// partials to `part`.
pub fn launch_plan(table: u64, count: usize, max_n: usize, part: u64) -> Launch {
    Launch {
        name: "grad_stats".into(),
        grid: (blocks_per_tensor(max_n) as u32, count as u32, 1),
        block: THREADS,
        args: vec![Arg(table), Arg::i32(count as i32), Arg(part)],
    }
}

/// Per group (sum of squares, max |g|, non-finite count) from the partials: `owner[t]` is
/// tensor `t`'s group, each tensor has `blocks` partials of three values. Sums in f64; the
/// maximum is NaN-sticky.
pub fn combine(partials: &[f32], blocks: usize, owner: &[usize], groups: usize) -> Vec<(f64, f64, u64)> {
    let mut out = vec![(0f64, 0f64, 0u64); groups];
    for (t, &g) in owner.iter().enumerate() {
        for p in partials[t * blocks * 3..(t + 1) * blocks * 3].chunks(3) {
            let o = &mut out[g];
            o.0 += p[0] as f64;
            let m = p[1] as f64;
            o.1 = if o.1.is_nan() || m.is_nan() { f64::NAN } else { o.1.max(m) };
            o.2 += p[2] as u64;
        }
    }
    out
}

/// The statistics of each group of gradients (all contiguous f32 CUDA tensors) in one launch;
/// `None` where the kernel does not serve them (the caller's composed path).
pub fn group_stats(groups: &[&[&candle_core::Tensor]]) -> candle_core::Result<Option<Vec<(f64, f64, u64)>>> {
    imp::group_stats(groups)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub fn group_stats(_: &[&[&candle_core::Tensor]]) -> candle_core::Result<Option<Vec<(f64, f64, u64)>>> {
        Ok(None)
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{blocks_per_tensor, combine, launch_plan, SOURCE};
    use crate::cuda_kernels::{device_address, uninit, PRELUDE};
    use candle_core::{DType, Tensor};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set when the first use disagreed with the composed statistics.
    static OFF: AtomicBool = AtomicBool::new(false);
    /// Whether the first use was checked.
    static CHECKED: AtomicBool = AtomicBool::new(false);

    pub fn prepare() {
        let _ = ptx();
    }

    static KERNELS: crate::cuda_kernels::KernelSet = crate::cuda_kernels::KernelSet::new(
        "gradient statistics",
        "LORAHOST_FUSED_STATS",
        &[PRELUDE, SOURCE],
    );

    /// The compiled PTX, or None (logged once) when the kernels cannot be used.
    fn ptx() -> Option<&'static str> {
        KERNELS.ptx()
    }

    pub fn group_stats(groups: &[&[&Tensor]]) -> candle_core::Result<Option<Vec<(f64, f64, u64)>>> {
        let all: Vec<&Tensor> = groups.iter().flat_map(|g| g.iter().copied()).collect();
        let Some(first) = all.first() else { return Ok(None) };
        let served = first.device().is_cuda()
            && all.len() <= 65_535
            && all.iter().all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.elem_count() > 0);
        if !served || OFF.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(ptx) = ptx() else { return Ok(None) };
        let device = first.device().clone();
        let mut table = Vec::with_capacity(all.len() * 2);
        let mut owner = Vec::with_capacity(all.len());
        for (g, group) in groups.iter().enumerate() {
            for t in group.iter() {
                table.extend_from_slice(&[device_address(t)? as i64, t.elem_count() as i64]);
                owner.push(g);
            }
        }
        let max_n = all.iter().map(|t| t.elem_count()).max().unwrap_or(1);
        let blocks = blocks_per_tensor(max_n);
        let table = Tensor::from_vec(table, all.len() * 2, &device)?;
        let part = uninit(&table, &[all.len() * blocks * 3], DType::F32)?;
        let l = launch_plan(device_address(&table)?, all.len(), max_n, device_address(&part)?);
        // The table lists live contiguous f32 tensors (checked above) of the counts given; the
        // partials buffer holds count · blocks · 3 values.
        l.run(&device, "lorahost_grad_stats", ptx)?;
        let out = combine(&part.to_vec1::<f32>()?, blocks, &owner, groups.len());
        if !CHECKED.swap(true, Ordering::Relaxed) {
            if let Some(why) = disagreement(groups, &out)? {
                tracing::warn!("gradient statistics kernel disagrees with the composed statistics ({why}); using the composed path");
                OFF.store(true, Ordering::Relaxed);
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    /// How the kernel's statistics differ from the composed ones, if they do (beyond the
    /// rounding of a different summation order).
    fn disagreement(groups: &[&[&Tensor]], got: &[(f64, f64, u64)]) -> candle_core::Result<Option<String>> {
        for (g, (group, &(sum_sq, max_abs, bad))) in groups.iter().zip(got).enumerate() {
            let want = crate::train::optim::composed_group_stats("check", group)?;
            let close = |a: f64, b: f64| {
                (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-4 * a.abs().max(b.abs()) || a == b
            };
            if !close(want.sum_sq, sum_sq) || !close(want.max_abs, max_abs) || want.nonfinite != bad {
                return Ok(Some(format!(
                    "group {g}: sum of squares {sum_sq} vs {}, max {max_abs} vs {}, non-finite {bad} vs {}",
                    want.sum_sq, want.max_abs, want.nonfinite
                )));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partials combine per group in f64: sums add, counts add, the maximum is NaN-sticky.
    #[test]
    fn partials_combine_per_group() {
        let nan = f32::NAN;
        // Three tensors, two blocks each: owners 1, 0, 1.
        let partials = [
            1.0, 2.0, 0.0, 3.0, 0.5, 1.0, // tensor 0
            4.0, 1.0, 0.0, 5.0, 7.0, 0.0, // tensor 1
            6.0, nan, 2.0, 0.0, 9.0, 0.0, // tensor 2
        ];
        let got = combine(&partials, 2, &[1, 0, 1], 3);
        assert_eq!((got[0].0, got[0].1, got[0].2), (9.0, 7.0, 0));
        assert_eq!((got[1].0, got[1].2), (10.0, 3));
        assert!(got[1].1.is_nan());
        assert_eq!(got[2], (0.0, 0.0, 0));
        assert_eq!(launch_plan(8, 3, 5000, 16).grid, (blocks_per_tensor(5000) as u32, 3, 1));
        assert_eq!((blocks_per_tensor(1), blocks_per_tensor(usize::MAX / 2)), (1, 64));
    }
}
