//! Flash attention on the GPU: `softmax(q kᵀ · scale) v` for bf16 (B, H, N, Dh) operands with
//! Dh 32 or 64 (SAM3's DETR layers and ViT), forward and backward on the tensor cores
//! (`mma.sync` m16n8k16, f32 accumulation) without ever writing a score matrix: the forward
//! keeps one log-sum-exp per query row for the backward, which recomputes the probabilities
//! tile by tile (FlashAttention-2's algorithm: dK/dV in one pass over the queries, dQ in one
//! pass over the keys; deterministic, no atomics).
//!
//! The kernels ([`SOURCE`], `flash_attention.cu`) read their operands through strides, so the
//! model's views (k and v transposed from tokens-first projections, the output written
//! tokens-first for the output projection) cost no copies, and each gradient is written in its
//! input's memory order. The launch plans ([`forward_launch`], [`backward_launches`]) are plain
//! functions of addresses and strides: the CPU emulation test (`host/tests/cuda_emu.rs`) runs
//! the same kernel source on those same plans without a GPU.
//!
//! On CUDA the kernels are compiled (NVRTC, compute capability 8.0+) and checked against the
//! composed attention on the device once per process before anything uses them; a kernel that
//! does not compile or does not agree leaves the chunked attention in charge, with a warning.
//! `LORAHOST_FLASH=0` switches them off (A/B timings).
//!
//! The key (or query) loops are pipelined: the next tile's copies to shared memory (`cp.async`)
//! are in flight while the current one is multiplied, in the other of two buffers, so a block
//! no longer waits for each tile's loads. `LORAHOST_FLASH_PIPELINE=0` runs the one-stage
//! builds of the same kernels ([`one_stage`]; A/B timings).

use crate::cuda_kernels::Arg;

/// `l` (a forward or backward launch of [`forward_launch`] / [`backward_launches`]) with the
/// one-stage build of its kernel (load a tile, then multiply it); `fa_delta` is left as it is.
pub fn one_stage(mut l: Launch) -> Launch {
    if l.name.starts_with("fa_forward_") || l.name.starts_with("fa_backward_") {
        l.name.push_str("_s1");
    }
    l
}

/// Whether the kernels run pipelined (`LORAHOST_FLASH_PIPELINE=0`: no).
#[cfg(feature = "cuda")]
fn pipelined() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LORAHOST_FLASH_PIPELINE").is_ok_and(|v| v == "0"))
}

/// The kernels' CUDA C source (compiled after [`crate::cuda_kernels::PRELUDE`] and
/// [`crate::cuda_kernels::TENSOR_CORE`]).
pub const SOURCE: &str = include_str!("flash_attention.cu");

/// Threads per block of every flash kernel.
pub const THREADS: u32 = 128;
/// Rows (queries or keys) per block.
const ROWS: usize = 64;

/// A (B, H, N, Dh) operand as the kernels read it: the address of element (0, 0, 0, 0) and the
/// element strides of batch, head and token (the head dimension contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Device address (the CPU emulation: a buffer handle).
    pub addr: u64,
    /// Element strides of batch, head, token.
    pub strides: [i64; 3],
}

impl View {
    fn args(&self) -> [Arg; 4] {
        [Arg(self.addr), Arg::i64(self.strides[0]), Arg::i64(self.strides[1]), Arg::i64(self.strides[2])]
    }

    /// Whether the kernels' vector loads may read it: a 16-byte aligned address and strides in
    /// multiples of 8 bf16 elements.
    pub fn aligned(&self) -> bool {
        self.addr.is_multiple_of(16) && self.strides.iter().all(|s| s % 8 == 0)
    }

    /// Whether its memory order is tokens before heads ((B, N, H, Dh), e.g. a transposed view of
    /// a projection's rows), so a gradient for it is best written the same way.
    pub fn tokens_major(&self) -> bool {
        self.strides[1] < self.strides[2]
    }
}

/// The (batch, head, token) strides of a (B, H, N, Dh) tensor's `layout_strides` (4 entries),
/// when the head dimension is contiguous.
pub fn strides_of(layout_strides: &[usize]) -> Option<[i64; 3]> {
    match layout_strides {
        [b, h, n, 1] => Some([*b as i64, *h as i64, *n as i64]),
        _ => None,
    }
}

/// The strides of a fresh (B, H, N, Dh) result stored heads first ((B, H, N, Dh) memory) or
/// tokens first ((B, N, H, Dh) memory).
pub fn fresh_strides(heads: usize, n: usize, d: usize, tokens_major: bool) -> [i64; 3] {
    let (h, n, d) = (heads as i64, n as i64, d as i64);
    if tokens_major {
        [n * h * d, d, h * d]
    } else {
        [h * n * d, n * d, d]
    }
}

/// The shapes of one attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Queries.
    pub nq: usize,
    /// Keys (and values).
    pub nk: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl Dims {
    /// Whether the kernels take these shapes: Dh 32 or 64, counts that fit their int
    /// arithmetic and grid limits.
    pub fn supported(&self) -> bool {
        matches!(self.head_dim, 32 | 64)
            && self.nq > 0
            && self.nk > 0
            && self.batch * self.heads > 0
            && self.batch * self.heads <= 65_535
            && self.nq.max(self.nk) < (1 << 24)
    }

    fn common(&self) -> [Arg; 3] {
        [Arg::i32(self.heads as i32), Arg::i32(self.nq as i32), Arg::i32(self.nk as i32)]
    }
}

pub use crate::cuda_kernels::Launch;

/// `scale · log2 e` (the kernels work in base 2) and `scale`, as f32 arguments.
fn scales(scale: f64) -> (Arg, Arg) {
    (Arg::f32((scale * std::f64::consts::LOG2_E) as f32), Arg::f32(scale as f32))
}

/// The forward: `o` (B, H, Nq, Dh) and the base-2 log-sum-exp `lse` (f32, B·H·Nq, row-major).
pub fn forward_launch(d: Dims, q: View, k: View, v: View, o: View, lse: u64, scale: f64) -> Launch {
    let mut args = Vec::with_capacity(21);
    for x in [q, k, v, o] {
        args.extend(x.args());
    }
    args.push(Arg(lse));
    args.extend(d.common());
    args.push(scales(scale).0);
    Launch {
        name: format!("fa_forward_{}", d.head_dim),
        grid: (d.nq.div_ceil(ROWS) as u32, (d.batch * d.heads) as u32, 1),
        block: THREADS,
        args,
    }
}

/// The operands and results of a backward: the forward's inputs, output and `lse`, the output's
/// gradient `d_out`, an f32 scratch `delta` (B·H·Nq) and the three gradients.
#[derive(Debug, Clone, Copy)]
pub struct Backward {
    /// Queries.
    pub q: View,
    /// Keys.
    pub k: View,
    /// Values.
    pub v: View,
    /// The forward's output.
    pub o: View,
    /// Gradient of the output.
    pub d_out: View,
    /// The forward's log-sum-exp (f32).
    pub lse: u64,
    /// Scratch for rowsum(dO ⊙ O) (f32).
    pub delta: u64,
    /// Gradient of q.
    pub dq: View,
    /// Gradient of k.
    pub dk: View,
    /// Gradient of v.
    pub dv: View,
}

/// The backward's three launches, in order: δ = rowsum(dO ⊙ O), dK and dV, dQ.
pub fn backward_launches(d: Dims, p: &Backward, scale: f64) -> [Launch; 3] {
    let rows = d.batch * d.heads * d.nq;
    let mut delta = Vec::with_capacity(12);
    delta.extend(p.o.args());
    delta.extend(p.d_out.args());
    delta.extend([
        Arg(p.delta),
        Arg::i32(d.heads as i32),
        Arg::i32(d.nq as i32),
        Arg::i32(d.head_dim as i32),
        Arg::i64(rows as i64),
    ]);
    let inputs = || {
        let mut a = Vec::with_capacity(30);
        for x in [p.q, p.k, p.v, p.d_out] {
            a.extend(x.args());
        }
        a.extend([Arg(p.lse), Arg(p.delta)]);
        a
    };
    let (sl2, s) = scales(scale);
    let mut kv = inputs();
    kv.extend(p.dk.args());
    kv.extend(p.dv.args());
    kv.extend(d.common());
    kv.extend([sl2, s]);
    let mut dq = inputs();
    dq.extend(p.dq.args());
    dq.extend(d.common());
    dq.extend([sl2, s]);
    let bh = (d.batch * d.heads) as u32;
    let warps_per_block = (THREADS / 32) as usize;
    [
        Launch {
            name: "fa_delta".into(),
            grid: (rows.div_ceil(warps_per_block) as u32, 1, 1),
            block: THREADS,
            args: delta,
        },
        Launch {
            name: format!("fa_backward_kv_{}", d.head_dim),
            grid: (d.nk.div_ceil(ROWS) as u32, bh, 1),
            block: THREADS,
            args: kv,
        },
        Launch {
            name: format!("fa_backward_q_{}", d.head_dim),
            grid: (d.nq.div_ceil(ROWS) as u32, bh, 1),
            block: THREADS,
            args: dq,
        },
    ]
}

/// Whether the flash kernels serve this attention: bf16 CUDA tensors (B, H, N, Dh) with
/// Dh 32 or 64, the kernels compiled and checked on this device.
pub fn serves(q: &candle_core::Tensor, k: &candle_core::Tensor, v: &candle_core::Tensor) -> bool {
    imp::serves(q, k, v)
}

/// `softmax(q kᵀ · scale) v` and its base-2 log-sum-exp per query row (f32, B·H·Nq), the
/// output laid out (B, Nq, H, Dh) when `tokens_major`, else (B, H, Nq, Dh). Untracked.
pub fn forward(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    scale: f64,
    tokens_major: bool,
) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
    imp::forward(q, k, v, scale, tokens_major)
}

/// [`forward`] written into a fresh storage (a recorded op's precomputed output), with its
/// shape and the log-sum-exp.
pub fn forward_storage(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    scale: f64,
    tokens_major: bool,
) -> candle_core::Result<(candle_core::Storage, candle_core::Shape, candle_core::Tensor)> {
    imp::forward_storage(q, k, v, scale, tokens_major)
}

/// The gradients of q, k and v (each in its input's memory order) from the forward's output
/// `o` and `lse` (as [`forward`] returned them with `tokens_major`) and the output gradient
/// `d_out` (o's shape).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    o: &candle_core::Tensor,
    d_out: &candle_core::Tensor,
    lse: &candle_core::Tensor,
    scale: f64,
    tokens_major: bool,
) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
    imp::backward(q, k, v, o, d_out, lse, scale, tokens_major)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor, _: &Tensor, _: &Tensor) -> bool {
        false
    }
    pub fn forward(_: &Tensor, _: &Tensor, _: &Tensor, _: f64, _: bool) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("flash attention: built without CUDA")
    }
    pub fn forward_storage(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: bool,
    ) -> Result<(candle_core::Storage, candle_core::Shape, Tensor)> {
        candle_core::bail!("flash attention: built without CUDA")
    }
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        candle_core::bail!("flash attention: built without CUDA")
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{backward_launches, forward_launch, fresh_strides, strides_of, Backward, Dims, Launch, View};
    use crate::cuda_kernels::{storage_address, uninit, CheckedKernels, ProbeResult};
    use candle_core::{CudaStorage, DType, Device, Result, Shape, Storage, Tensor, D};

    const MODULE: &str = "lorahost_flash_attention";

    static KERNELS: CheckedKernels = CheckedKernels::new(
        "flash attention",
        "LORAHOST_FLASH",
        &[crate::cuda_kernels::PRELUDE, crate::cuda_kernels::TENSOR_CORE, super::SOURCE],
        "the chunked attention",
    );

    pub fn prepare() {
        let _ = KERNELS.ptx();
    }

    fn dims(q: &Tensor, k: &Tensor) -> Result<Dims> {
        let (batch, heads, nq, head_dim) = q.dims4()?;
        Ok(Dims { batch, heads, nq, nk: k.dim(2)?, head_dim })
    }

    fn shapes_fit(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
        let Ok(d) = dims(q, k) else { return false };
        let (Ok(kd), Ok(vd)) = (k.dims4(), v.dims4()) else { return false };
        d.supported() && kd == (d.batch, d.heads, d.nk, d.head_dim) && kd == vd
    }

    pub fn serves(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
        q.device().is_cuda()
            && [q, k, v].iter().all(|t| t.dtype() == DType::BF16)
            && shapes_fit(q, k, v)
            && KERNELS.ready(q.device(), probe)
    }

    /// `t` as a kernel operand: bf16 with the head dimension contiguous, aligned for vector
    /// loads (copied when it is not), with its view.
    fn operand(t: &Tensor) -> Result<(Tensor, View)> {
        let t = if t.dtype() == DType::BF16 { t.clone() } else { t.to_dtype(DType::BF16)? };
        if let Some(strides) = strides_of(t.stride()) {
            let view = View { addr: storage_address(&t)?, strides };
            if view.aligned() {
                return Ok((t, view));
            }
        }
        let t = t.contiguous()?;
        let Some(strides) = strides_of(t.stride()) else {
            candle_core::bail!("flash attention: operand {:?} is not (B, H, N, Dh)", t.shape())
        };
        let view = View { addr: storage_address(&t)?, strides };
        Ok((t, view))
    }

    /// A fresh bf16 (B, H, N, Dh) result stored tokens first or heads first, with its view.
    fn result(
        like: &Tensor,
        b: usize,
        h: usize,
        n: usize,
        d: usize,
        tokens_major: bool,
    ) -> Result<(Tensor, View)> {
        let t = if tokens_major {
            uninit(like, &[b, n, h, d], DType::BF16)?.transpose(1, 2)?
        } else {
            uninit(like, &[b, h, n, d], DType::BF16)?
        };
        let view = View { addr: storage_address(&t)?, strides: fresh_strides(h, n, d, tokens_major) };
        Ok((t, view))
    }

    fn run(device: &Device, l: &Launch) -> Result<()> {
        if !super::pipelined() {
            let l = super::one_stage(l.clone());
            return KERNELS.launch(device, MODULE, &l.name, l.grid, l.block, &l.args);
        }
        KERNELS.launch(device, MODULE, &l.name, l.grid, l.block, &l.args)
    }

    /// The forward into the output at `o_addr` (contiguous, (B, Nq, H, Dh) when
    /// `tokens_major`, else (B, H, Nq, Dh)); returns the log-sum-exp.
    fn forward_into(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        tokens_major: bool,
        o_addr: u64,
    ) -> Result<Tensor> {
        let d = dims(q, k)?;
        if !shapes_fit(q, k, v) {
            candle_core::bail!("flash attention: shapes {:?} {:?} {:?}", q.shape(), k.shape(), v.shape());
        }
        let ((_q, qv), (_k, kv), (_v, vv)) = (operand(q)?, operand(k)?, operand(v)?);
        let ov = View { addr: o_addr, strides: fresh_strides(d.heads, d.nq, d.head_dim, tokens_major) };
        let lse = uninit(q, &[d.batch * d.heads * d.nq], DType::F32)?;
        run(q.device(), &forward_launch(d, qv, kv, vv, ov, storage_address(&lse)?, scale))?;
        Ok(lse)
    }

    fn output_shape(q: &Tensor, tokens_major: bool) -> Result<Shape> {
        let (b, h, n, d) = q.dims4()?;
        Ok(if tokens_major { (b, n, h, d) } else { (b, h, n, d) }.into())
    }

    pub fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        tokens_major: bool,
    ) -> Result<(Tensor, Tensor)> {
        let o = uninit(q, output_shape(q, tokens_major)?.dims(), DType::BF16)?;
        let lse = forward_into(q, k, v, scale, tokens_major, storage_address(&o)?)?;
        Ok((o, lse))
    }

    pub fn forward_storage(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        tokens_major: bool,
    ) -> Result<(Storage, Shape, Tensor)> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let Device::Cuda(dev) = q.device() else { candle_core::bail!("flash attention: not a CUDA device") };
        let shape = output_shape(q, tokens_major)?;
        // SAFETY: the forward kernel writes every element.
        let slice = unsafe { dev.alloc::<half::bf16>(shape.elem_count())? };
        let addr = slice.device_ptr(&dev.cuda_stream()).0;
        let lse = forward_into(q, k, v, scale, tokens_major, addr)?;
        Ok((Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())), shape, lse))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_out: &Tensor,
        lse: &Tensor,
        scale: f64,
        tokens_major: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = dims(q, k)?;
        // o and d_out as (B, H, Nq, Dh) views.
        let heads_view = |t: &Tensor| if tokens_major { t.transpose(1, 2) } else { Ok(t.clone()) };
        let (o, d_out) = (heads_view(o)?, heads_view(d_out)?);
        let ((_q, qv), (_k, kv), (_v, vv)) = (operand(q)?, operand(k)?, operand(v)?);
        let ((_o, ov), (_d, dv_out)) = (operand(&o)?, operand(&d_out)?);
        let delta = uninit(q, &[d.batch * d.heads * d.nq], DType::F32)?;
        let (dq, dqv) = result(q, d.batch, d.heads, d.nq, d.head_dim, qv.tokens_major())?;
        let (dk, dkv) = result(q, d.batch, d.heads, d.nk, d.head_dim, kv.tokens_major())?;
        let (dv, dvv) = result(q, d.batch, d.heads, d.nk, d.head_dim, vv.tokens_major())?;
        let lse = lse.contiguous()?;
        let plan = Backward {
            q: qv,
            k: kv,
            v: vv,
            o: ov,
            d_out: dv_out,
            lse: storage_address(&lse)?,
            delta: storage_address(&delta)?,
            dq: dqv,
            dk: dkv,
            dv: dvv,
        };
        for l in backward_launches(d, &plan, scale) {
            run(q.device(), &l)?;
        }
        Ok((dq, dk, dv))
    }

    /// The kernels against the composed attention (f32, candle's autograd) on `device`, at
    /// both head dimensions, with query and key counts that leave partial tiles and operands
    /// laid out as the model hands them over: None when they agree within bf16 rounding.
    fn probe(device: &Device) -> ProbeResult {
        for (hd, nq, nk, tokens_major) in [(64usize, 80usize, 72usize, true), (32, 65, 130, false)] {
            let (b, h) = (2usize, 3usize);
            let q = Tensor::randn(0f32, 1.0, (b, h, nq, hd), device)?.to_dtype(DType::BF16)?;
            let k =
                Tensor::randn(0f32, 1.0, (b, nk, h, hd), device)?.to_dtype(DType::BF16)?.transpose(1, 2)?;
            let v =
                Tensor::randn(0f32, 1.0, (b, nk, h, hd), device)?.to_dtype(DType::BF16)?.transpose(1, 2)?;
            let d_out = Tensor::randn(0f32, 1.0, (b, h, nq, hd), device)?.to_dtype(DType::BF16)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let (o, lse) = forward(&q, &k, &v, scale, tokens_major)?;
            let d_o = if tokens_major { d_out.transpose(1, 2)?.contiguous()? } else { d_out.clone() };
            let (dq, dk, dv) = backward(&q, &k, &v, &o, &d_o, &lse, scale, tokens_major)?;
            let o = if tokens_major { o.transpose(1, 2)? } else { o };
            let vars: Vec<candle_core::Var> = [&q, &k, &v]
                .iter()
                .map(|t| t.to_dtype(DType::F32).and_then(|t| candle_core::Var::from_tensor(&t)))
                .collect::<Result<_>>()?;
            let (qf, kf, vf) = (vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
            let s = (qf.matmul(&kf.t()?)? * scale)?;
            let want = candle_nn::ops::softmax(&s, D::Minus1)?.matmul(vf)?;
            let grads = (&want * d_out.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
            let rel = |w: &Tensor, g: &Tensor| -> Result<f32> {
                let err = (w - g.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let top = w.abs()?.max_all()?.to_scalar::<f32>()?;
                Ok(err / top.max(1e-6))
            };
            let mut worst = vec![("output", rel(&want, &o)?)];
            for (name, var, got) in [("dq", &vars[0], &dq), ("dk", &vars[1], &dk), ("dv", &vars[2], &dv)] {
                let w = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
                worst.push((name, rel(w, got)?));
            }
            // NaN counts as a disagreement.
            if let Some((name, e)) = worst.iter().find(|(_, e)| e.is_nan() || *e >= 0.03) {
                return Ok(Some(format!("head dim {hd}: {name} off by {e:.3e} relative")));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plans' argument lists follow the kernels' parameter lists (counted from the source).
    #[test]
    fn launch_arguments_match_the_kernel_signatures() {
        let params = |name: &str| -> usize {
            // The instantiated kernels are declared through FA_INSTANCES_AS(HD, STAGES, SUFFIX, ..).
            let templated = format!(" {}_##HD##SUFFIX(", name.rsplit_once('_').unwrap().0);
            let open = [format!("void {name}("), templated]
                .iter()
                .find_map(|p| SOURCE.find(p.as_str()).map(|at| at + p.len() - 1))
                .unwrap_or_else(|| panic!("kernel {name} in the source"));
            let mut depth = 0;
            let mut end = open;
            for (i, c) in SOURCE[open..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let sig = SOURCE[open + 1..end].replace('\\', " ");
            // FA_VIEW(x) and FA_OUT(x) are four parameters each.
            sig.split(',').map(|p| if p.contains("FA_VIEW(") || p.contains("FA_OUT(") { 4 } else { 1 }).sum()
        };
        let view = |a| View { addr: a, strides: [0, 0, 0] };
        let d = Dims { batch: 2, heads: 3, nq: 70, nk: 130, head_dim: 64 };
        let f = forward_launch(d, view(16), view(32), view(48), view(64), 80, 0.125);
        assert_eq!(f.args.len(), params("fa_forward_64"));
        assert_eq!(f.grid, (2, 6, 1));
        let p = Backward {
            q: view(16),
            k: view(32),
            v: view(48),
            o: view(64),
            d_out: view(80),
            lse: 96,
            delta: 112,
            dq: view(128),
            dk: view(144),
            dv: view(160),
        };
        let [delta, kv, q] = backward_launches(d, &p, 0.125);
        assert_eq!(delta.args.len(), params("fa_delta"));
        assert_eq!(kv.args.len(), params("fa_backward_kv_64"));
        assert_eq!(q.args.len(), params("fa_backward_q_64"));
        assert_eq!((kv.grid, q.grid), ((3, 6, 1), (2, 6, 1)));
        // 420 query rows, one warp each, four warps per block.
        assert_eq!(delta.grid, (105, 1, 1));
        // The one-stage builds: the same arguments under the suffix the source instantiates.
        let names = [f, kv, q, delta].map(|l| one_stage(l).name);
        assert_eq!(names, ["fa_forward_64_s1", "fa_backward_kv_64_s1", "fa_backward_q_64_s1", "fa_delta"]);
        assert!(SOURCE.contains("FA_INSTANCES_AS(HD, 1, _s1,"));
    }

    #[test]
    fn layouts() {
        assert_eq!(strides_of(&[600, 200, 8, 1]), Some([600, 200, 8]));
        assert_eq!(strides_of(&[600, 200, 1, 8]), None);
        // (B, N, H, D) memory seen as (B, H, N, D).
        let tm = View { addr: 0, strides: fresh_strides(3, 5, 8, true) };
        assert_eq!(tm.strides, [120, 8, 24]);
        assert!(tm.tokens_major() && tm.aligned());
        let hf = View { addr: 32, strides: fresh_strides(3, 5, 8, false) };
        assert_eq!(hf.strides, [120, 40, 8]);
        assert!(!hf.tokens_major() && hf.aligned());
        assert!(!View { addr: 8, strides: [64, 64, 64] }.aligned());
        assert!(!View { addr: 0, strides: [60, 20, 4] }.aligned());
        assert!(Dims { batch: 1, heads: 1, nq: 1, nk: 1, head_dim: 64 }.supported());
        assert!(!Dims { batch: 1, heads: 1, nq: 1, nk: 1, head_dim: 16 }.supported());
    }
}
