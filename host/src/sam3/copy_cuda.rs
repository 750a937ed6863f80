//! Copying a strided view whose last dimension is contiguous (a permutation of outer axes: the
//! ViT's window partition and its inverse, forward and backward) into a contiguous tensor on
//! the GPU, row by row.
//!
//! candle's strided copy computes every element's source offset with a 64-bit division and
//! remainder per dimension (six of each for the window partition's 6-D view); this kernel
//! computes one offset per row (a row is the longest contiguous run: in the ViT one window row,
//! 24 tokens × 1024 channels) and copies the row in 16-byte units where alignment allows: a memory-bound copy.
//! Untracked tensors only (inside the training ops and their backward); anything else takes
//! candle's `contiguous`. The launch plan ([`launch_plan`]) is a plain function, run as it is by
//! the CPU emulation test (`host/tests/cuda_emu.rs`). `LORAHOST_FUSED_OPS=0` switches it off
//! with the other fused kernels.

use crate::cuda_kernels::{Arg, Launch};
use candle_core::{Result, Tensor};

/// The kernels' CUDA C source.
pub const SOURCE: &str = r#"
struct __align__(16) unit16_t { unsigned int a, b, c, d; };

// dst row r (`inner` units) = the `inner` units of src at off(r) = sum of index_k * stride_k over
// the five outer dimensions (sizes d0..d4, d4 innermost; strides in units).
template <typename U>
__device__ void rows_copy(const U* src, U* dst, long long rows, int inner, long long d0, long long d1,
                          long long d2, long long d3, long long d4, long long s0, long long s1,
                          long long s2, long long s3, long long s4) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        long long q = r, off = 0;
        off += (q % d4) * s4; q /= d4;
        off += (q % d3) * s3; q /= d3;
        off += (q % d2) * s2; q /= d2;
        off += (q % d1) * s1; q /= d1;
        off += q * s0;
        const U* a = src + off;
        U* b = dst + r * inner;
        for (int k = threadIdx.x; k < inner; k += blockDim.x) b[k] = a[k];
    }
}

#define ROWS_COPY(N, U)                                                                                  \
extern "C" __global__ void rows_copy_##N(const U* src, U* dst, long long rows, int inner, long long d0,  \
                                         long long d1, long long d2, long long d3, long long d4,         \
                                         long long s0, long long s1, long long s2, long long s3,         \
                                         long long s4) {                                                 \
    rows_copy(src, dst, rows, inner, d0, d1, d2, d3, d4, s0, s1, s2, s3, s4);                           \
}
ROWS_COPY(16, unit16_t)
ROWS_COPY(4, unsigned int)
ROWS_COPY(2, unsigned short)
"#;

/// Outer dimensions the kernel takes.
pub const OUTER: usize = 5;

/// A copy problem in bytes and elements: the view's element size, its dimensions and element
/// strides (the last stride 1), the byte address of its first element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowsCopy {
    /// Rows (the product of the outer sizes).
    pub rows: usize,
    /// Unit size in bytes (16, 4 or 2).
    pub unit: usize,
    /// Units per row.
    pub inner: usize,
    /// Outer sizes and strides in units, padded to [`OUTER`] at the front with (1, 0).
    pub outer: [(usize, i64); OUTER],
}

impl RowsCopy {
    /// The plan for a view of `dims` with element `strides` (last one 1) and `elem` bytes per
    /// element starting at byte address `addr`: unit dimensions of size 1 dropped, outer
    /// dimensions merged where they are contiguous with the next, the last merged into the row
    /// when it is; the largest unit that alignment allows. None when the last dimension is not
    /// contiguous or more than [`OUTER`] outer dimensions remain.
    pub fn plan(dims: &[usize], strides: &[usize], elem: usize, addr: u64) -> Option<RowsCopy> {
        let mut ds: Vec<(usize, usize)> =
            dims.iter().copied().zip(strides.iter().copied()).filter(|d| d.0 != 1).collect();
        let (mut inner, last_stride) = ds.pop().unwrap_or((1, 1));
        if last_stride != 1 {
            return None;
        }
        // Fold outer dimensions that continue the row, then merge contiguous outer pairs.
        while let Some(&(d, s)) = ds.last() {
            if s != inner {
                break;
            }
            inner *= d;
            ds.pop();
        }
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (d, s) in ds {
            match merged.last_mut() {
                Some(prev) if prev.1 == s * d => *prev = (prev.0 * d, s),
                _ => merged.push((d, s)),
            }
        }
        if merged.len() > OUTER {
            return None;
        }
        let bytes = |x: usize| x * elem;
        // Units and element sizes are powers of two: a unit at least an element holds whole ones.
        let unit = [16, 4, 2].into_iter().find(|&u| {
            u >= elem
                && bytes(inner).is_multiple_of(u)
                && merged.iter().all(|&(_, s)| bytes(s).is_multiple_of(u))
                && addr.is_multiple_of(u as u64)
        })?;
        let mut outer = [(1usize, 0i64); OUTER];
        for (slot, &(d, s)) in outer[OUTER - merged.len()..].iter_mut().zip(&merged) {
            *slot = (d, (bytes(s) / unit) as i64);
        }
        let rows = merged.iter().map(|d| d.0).product();
        Some(RowsCopy { rows, unit, inner: bytes(inner) / unit, outer })
    }
}

/// The launch for `p` from byte address `src` to the contiguous `dst`.
pub fn launch_plan(p: &RowsCopy, src: u64, dst: u64) -> Launch {
    let threads = (p.inner.div_ceil(32) * 32).clamp(32, 256) as u32;
    let mut args = vec![Arg(src), Arg(dst), Arg::i64(p.rows as i64), Arg::i32(p.inner as i32)];
    args.extend(p.outer.iter().map(|o| Arg::i64(o.0 as i64)));
    args.extend(p.outer.iter().map(|o| Arg::i64(o.1)));
    Launch {
        name: format!("rows_copy_{}", p.unit),
        grid: (p.rows.clamp(1, 1 << 20) as u32, 1, 1),
        block: threads,
        args,
    }
}

/// `t` as a contiguous tensor: on the GPU, for an untracked view whose last dimension is
/// contiguous, by the row-copy kernel; otherwise candle's `contiguous` (differentiable).
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() || t.track_op() || !super::fused_cuda::serves(t) {
        return t.contiguous();
    }
    imp::contiguous(t)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub fn contiguous(t: &Tensor) -> Result<Tensor> {
        t.contiguous()
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{launch_plan, RowsCopy, SOURCE};
    use crate::cuda_kernels::{device_address, storage_address, uninit};
    use candle_core::{Result, Tensor};

    pub fn prepare() {
        let _ = ptx();
    }

    static KERNELS: crate::cuda_kernels::KernelSet =
        crate::cuda_kernels::KernelSet::new("row copy", "LORAHOST_FUSED_OPS", &[SOURCE]);

    /// The compiled PTX, or None (logged once) when the kernels cannot be used.
    fn ptx() -> Option<&'static str> {
        KERNELS.ptx()
    }

    pub fn contiguous(t: &Tensor) -> Result<Tensor> {
        let Some(ptx) = ptx() else { return t.contiguous() };
        let addr = storage_address(t)?;
        let Some(plan) = RowsCopy::plan(t.dims(), t.stride(), t.dtype().size_in_bytes(), addr) else {
            return t.contiguous();
        };
        let out = uninit(t, t.dims(), t.dtype())?;
        if t.elem_count() > 0 {
            let l = launch_plan(&plan, addr, device_address(&out)?);
            // The plan reads rows inside t's storage (its layout's offsets) and writes all of out.
            l.run(t.device(), "lorahost_rows_copy", ptx)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans: the window partition's 6-D view merges to three outer dimensions of 16-byte units;
    /// a contiguous tail folds into the row; a transposed last dimension, an odd alignment and
    /// too many outer dimensions are refused or fall back to smaller units.
    #[test]
    fn plans_merge_dimensions_and_pick_units() {
        // The window partition: (2, 72, 72, 1024) viewed as (2, 3, 24, 3, 24, 1024), permuted
        // to (2, 3, 3, 24, 24, 1024). A window's row of 24 tokens is contiguous (one copy row),
        // the image and window-row axes merge: three outer dimensions.
        let (b, n, ws, c) = (2usize, 3usize, 24usize, 1024usize);
        let w = n * ws;
        let dims = [b, n, n, ws, ws, c];
        let strides = [w * w * c, ws * w * c, ws * c, w * c, c, 1];
        let p = RowsCopy::plan(&dims, &strides, 2, 4096).unwrap();
        assert_eq!((p.unit, p.inner, p.rows), (16, ws * c * 2 / 16, b * n * n * ws));
        let units = |e: usize| (e * 2 / 16) as i64;
        assert_eq!(
            p.outer,
            [(1, 0), (1, 0), (b * n, units(ws * w * c)), (n, units(ws * c)), (ws, units(w * c))]
        );
        // Contiguous in full: one row.
        let p = RowsCopy::plan(&[4, 5, 6], &[30, 6, 1], 4, 0).unwrap();
        assert_eq!((p.rows, p.inner, p.unit), (1, 120 * 4 / 16, 16));
        // Misaligned start: 2-byte units.
        let p = RowsCopy::plan(&[3, 8], &[16, 1], 2, 2).unwrap();
        assert_eq!((p.unit, p.inner, p.rows, p.outer[OUTER - 1]), (2, 8, 3, (3, 16)));
        // Not contiguous in the last dimension.
        assert!(RowsCopy::plan(&[3, 8], &[1, 3], 2, 0).is_none());
        // Six outer dimensions that cannot merge.
        assert!(RowsCopy::plan(&[2, 2, 2, 2, 2, 2, 4], &[1000, 300, 100, 40, 15, 6, 1], 4, 0).is_none());
        let l = launch_plan(&RowsCopy::plan(&[3, 8], &[16, 1], 2, 2).unwrap(), 2, 64);
        assert_eq!((l.name.as_str(), l.args.len(), l.block, l.grid.0), ("rows_copy_2", 14, 32, 3));
    }
}
