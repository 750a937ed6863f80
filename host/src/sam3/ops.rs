//! Custom-op plumbing shared by the training ops (adapted linears, RoPE, lean attention,
//! checkpointing) and a fused LayerNorm with its own backward.
//!
//! A training op computes its forward *before* it is recorded, with tensor operations on
//! detached views of its inputs (identical on the CPU and on CUDA, no input copies), and stores
//! the result as a [`Precomputed`] storage that the op's kernel hands over once. The one copy a
//! forward makes is the last one, straight into the storage the op returns ([`Precomputed::new`]
//! writes a strided view or a dtype cast into fresh contiguous memory).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use std::sync::{Arc, Mutex};

/// The dtype ops accumulate reductions and elementwise derivatives in: f64 for f64 inputs (the
/// gradient tests), else f32.
pub(crate) fn accumulation_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `t` (any layout, any offset) as a fresh contiguous storage in `dtype`: one pass over the
/// data (a cast, or a copy when the dtype is already `dtype`).
pub(crate) fn storage_as(t: &Tensor, dtype: DType) -> Result<Storage> {
    let (s, l) = t.storage_and_layout();
    Ok(match &*s {
        Storage::Cpu(c) if t.dtype() == dtype => Storage::Cpu(c.affine(l, 1.0, 0.0)?),
        Storage::Cpu(c) => Storage::Cpu(c.to_dtype(l, dtype)?),
        Storage::Cuda(c) if t.dtype() == dtype => Storage::Cuda(c.affine(l, 1.0, 0.0)?),
        Storage::Cuda(c) => Storage::Cuda(c.to_dtype(l, dtype)?),
        Storage::Metal(_) => candle_core::bail!("custom ops: Metal is not supported"),
    })
}

/// A small constant tensor (a frequency table, a coordinate grid, a flipped frozen kernel) made
/// once per process, `key` and device by `make` and shared after that. Made on the host at
/// each use, such a tensor costs a copy from pageable host memory, which the CUDA driver may
/// serialise with the stream (the host then waits for the device to catch up), besides the
/// operations that build it. The cache is bounded (cleared past 512 entries).
pub(crate) fn cached_constant(
    key: String,
    device: &candle_core::Device,
    make: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    type Cache = Mutex<std::collections::HashMap<(String, candle_core::DeviceLocation), Tensor>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let at = (key, device.location());
    if let Some(t) = cache.lock().ok().and_then(|c| c.get(&at).cloned()) {
        return Ok(t);
    }
    let t = make()?.detach();
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 512 {
            c.clear();
        }
        c.insert(at, t.clone());
    }
    Ok(t)
}

/// An elementwise binary operation an op writes straight into its output storage.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Binary {
    Add,
    Mul,
}

/// `a ⊕ b` (same shape and dtype, any layouts: broadcast views included) written straight into
/// a fresh contiguous storage.
pub(crate) fn binary_storage(a: &Tensor, b: &Tensor, op: Binary) -> Result<Storage> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "custom op: {op:?} of {:?} {:?} and {:?} {:?}",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    use candle_core::op::{Add, Mul};
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    Ok(match (&*sa, &*sb, op) {
        (Storage::Cpu(x), Storage::Cpu(y), Binary::Add) => Storage::Cpu(x.binary_impl::<Add>(y, la, lb)?),
        (Storage::Cpu(x), Storage::Cpu(y), Binary::Mul) => Storage::Cpu(x.binary_impl::<Mul>(y, la, lb)?),
        (Storage::Cuda(x), Storage::Cuda(y), Binary::Add) => Storage::Cuda(x.binary_impl::<Add>(y, la, lb)?),
        (Storage::Cuda(x), Storage::Cuda(y), Binary::Mul) => Storage::Cuda(x.binary_impl::<Mul>(y, la, lb)?),
        _ => candle_core::bail!("custom op: operands on different devices"),
    })
}

/// A forward result computed before its op is recorded; the op's kernel takes it once.
pub(crate) struct Precomputed(Mutex<Option<(Storage, Shape)>>);

impl Precomputed {
    /// `t` as a fresh contiguous storage in `dtype` (see [`storage_as`]).
    pub(crate) fn new(t: &Tensor, dtype: DType) -> Result<Self> {
        Ok(Self::from_storage(storage_as(t, dtype)?, t.shape().clone()))
    }

    /// An already owned storage of `shape`.
    pub(crate) fn from_storage(s: Storage, shape: Shape) -> Self {
        Precomputed(Mutex::new(Some((s, shape))))
    }

    /// The same result viewed as `shape` (as many elements; the storage is contiguous).
    pub(crate) fn reshaped(self, shape: Shape) -> Self {
        let inner = self.0.into_inner().ok().flatten().map(|(s, _)| (s, shape));
        Precomputed(Mutex::new(inner))
    }

    fn take(&self) -> Result<(Storage, Shape)> {
        let out = self.0.lock().ok().and_then(|mut o| o.take());
        out.ok_or_else(|| candle_core::Error::Msg("custom op: forward result already taken".into()))
    }

    /// For `cpu_fwd`.
    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: result is not on the CPU"),
        }
    }

    /// For `cuda_fwd`.
    pub(crate) fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: result is not on the GPU"),
        }
    }
}

/// A change of layout (or any linear map) folded into an op's output, so the op writes what
/// its consumer reads and the graph keeps one tensor instead of two: `forward` takes the op's
/// natural result (untracked; in the op's compute dtype) to the mapped one, `backward` takes
/// the mapped output's gradient back to the natural layout (the map's transpose). Examples:
/// LayerNorm writing ViT windows, q/k projections writing RoPE-rotated heads.
#[derive(Clone)]
pub struct OutputMap {
    /// Natural → mapped.
    pub forward: TensorMap,
    /// Gradient of the mapped output → gradient of the natural output.
    pub backward: TensorMap,
}

/// A shareable tensor → tensor function.
pub type TensorMap = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

impl std::fmt::Debug for OutputMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputMap")
    }
}

/// Implements a custom op trait's `cpu_fwd`/`cuda_fwd` by handing over the op's `out` field;
/// one placeholder name per operand: `precomputed_kernels!(_x)`, `precomputed_kernels!(_q, _k, _v)`.
macro_rules! precomputed_kernels {
    ($($s:ident),+) => {
        fn cpu_fwd(&self, $($s: &CpuStorage, _: &Layout),+) -> Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }
        fn cuda_fwd(&self, $($s: &CudaStorage, _: &Layout),+) -> Result<(CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
}
pub(crate) use precomputed_kernels;

/// LayerNorm over the last dimension with frozen weight and bias as one op: the forward is the
/// composed f32 computation on untracked tensors (bit-identical to the untracked path, so
/// attaching adapters or checkpointing changes nothing), the backward is analytic for the input
/// only, so the graph keeps just the input instead of the composed version's f32 copies.
struct FusedNorm {
    /// f32 scale, shaped to broadcast against the input.
    weight: Tensor,
    /// `None`: normalise over the last axis (LayerNorm); `Some(g)`: over each of `g` channel
    /// groups of a (B, C, ...) input (GroupNorm).
    groups: Option<usize>,
    eps: f64,
    /// The output's layout map, if any.
    map: Option<OutputMap>,
    out: Precomputed,
}

impl CustomOp1 for FusedNorm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    precomputed_kernels!(_x);

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = match &self.map {
            Some(m) => (m.backward)(dy)?,
            None => dy.clone(),
        };
        norm_input_grad(x, &dy, &self.weight, self.groups, self.eps).map(Some)
    }
}

/// The input gradient of a LayerNorm (`groups` None) or GroupNorm with the f32 scale `weight`
/// (shaped to broadcast against `x`) for the output gradient `dy`: the CUDA kernels where they
/// serve, else composed in f32.
fn norm_input_grad(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    groups: Option<usize>,
    eps: f64,
) -> Result<Tensor> {
    match groups {
        None if super::norm_cuda::serves(x) => {
            return crate::profile::inner(
                || format!("layer norm backward {:?}", x.dims()),
                || super::norm_cuda::backward(x, dy, weight, eps),
            );
        }
        Some(g) if super::norm_cuda::serves_groups(x, g) => {
            return crate::profile::inner(
                || format!("group norm backward {:?}", x.dims()),
                || super::norm_cuda::group_backward(x, dy, weight, g, eps),
            );
        }
        _ => {}
    }
    let label = || {
        format!(
            "{} backward (composed) {:?}",
            if groups.is_some() { "group norm" } else { "layer norm" },
            x.dims()
        )
    };
    crate::profile::inner(label, || composed_norm_backward(x, dy, weight, groups, eps))
}

/// The input gradient of `LayerNorm(x)` over the last dimension with the frozen scale `weight`
/// for the output gradient `dy` (x's shape), in x's dtype: what the fused LayerNorm op's
/// backward computes, for ops with a hand-written backward ([`super::vit_block`]).
pub(crate) fn layer_norm_input_grad(x: &Tensor, dy: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let weight = weight.detach().to_dtype(DType::F32)?;
    norm_input_grad(&x.detach(), dy, &weight, None, eps)
}

/// [`norm_input_grad`] composed in f32.
fn composed_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    groups: Option<usize>,
    eps: f64,
) -> Result<Tensor> {
    let x32 = x.detach().to_dtype(DType::F32)?.contiguous()?;
    let gw = dy.to_dtype(DType::F32)?.broadcast_mul(weight)?;
    let (x32, gw) = match groups {
        Some(g) => {
            let b = x.dim(0)?;
            (x32.reshape((b, g, ()))?, gw.reshape((b, g, ()))?)
        }
        None => (x32, gw),
    };
    let xc = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let m1 = gw.mean_keepdim(D::Minus1)?;
    let m2 = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = gw.broadcast_sub(&m1)?.sub(&xhat.broadcast_mul(&m2)?)?.broadcast_mul(&rstd)?;
    dx.reshape(x.dims())?.to_dtype(x.dtype())
}

/// LayerNorm over the last dimension, composed, computed in f32 (differentiable everywhere).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = layer_norm_kernel(x, weight, bias, eps)? {
        return Ok(y);
    }
    layer_norm_f32(x, weight, bias, eps)?.to_dtype(x.dtype())
}

/// The CUDA LayerNorm kernel's result (in x's dtype) where it serves an untracked computation
/// (nothing to differentiate: x and the weights untracked); the frozen op's forward uses it too,
/// so tracked and untracked LayerNorms agree bit for bit on the GPU as they do on the CPU.
fn layer_norm_kernel(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if x.track_op() || weight.track_op() || bias.track_op() || !super::norm_cuda::serves(x) {
        return Ok(None);
    }
    crate::profile::inner(
        || format!("layer norm forward {:?}", x.dims()),
        || super::norm_cuda::forward(x, weight, bias, eps),
    )
    .map(Some)
}

/// The composed LayerNorm's f32 result, before the cast back to the input's dtype.
fn layer_norm_f32(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(&weight.to_dtype(DType::F32)?)?.broadcast_add(&bias.to_dtype(DType::F32)?)
}

/// LayerNorm with frozen `weight` and `bias` as one op on a tracked `x` (see [`FusedLayerNorm`]);
/// `None` when `x` is untracked or the weights are trainable (the caller's composed path).
pub fn layer_norm_frozen(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    layer_norm_frozen_mapped(x, weight, bias, eps, None)
}

/// [`layer_norm_frozen`] with its output written through `map`.
pub fn layer_norm_frozen_mapped(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    map: Option<&OutputMap>,
) -> Result<Option<Tensor>> {
    if !x.track_op() || weight.track_op() || bias.track_op() || x.dtype() == DType::F64 {
        return Ok(None);
    }
    let (xd, wd, bd) = (x.detach(), weight.detach(), bias.detach());
    let mut y = match layer_norm_kernel(&xd, &wd, &bd, eps)? {
        Some(y) => y,
        None => crate::profile::inner(
            || format!("layer norm forward (composed) {:?}", x.dims()),
            || layer_norm_f32(&xd, &wd, &bd, eps),
        )?,
    };
    if let Some(m) = map {
        y = (m.forward)(&y)?;
    }
    let weight = weight.detach().to_dtype(DType::F32)?;
    let out = Precomputed::new(&y, x.dtype())?;
    let op = FusedNorm { weight, groups: None, eps, map: map.cloned(), out };
    Ok(Some(x.apply_op1(op)?))
}

/// LayerNorm composed (differentiable), its output written through `map` (the untracked path
/// of [`layer_norm_frozen_mapped`]: the same values).
pub fn layer_norm_composed_mapped(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    map: &OutputMap,
) -> Result<Tensor> {
    if let Some(y) = layer_norm_kernel(x, weight, bias, eps)? {
        return (map.forward)(&y);
    }
    (map.forward)(&layer_norm_f32(x, weight, bias, eps)?)?.to_dtype(x.dtype())
}

/// GroupNorm of a (B, C, ...) input over `groups` channel groups, composed, computed in f32.
pub fn group_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    if let Some(y) = group_norm_kernel(x, weight, bias, groups, eps)? {
        return Ok(y);
    }
    group_norm_f32(x, weight, bias, groups, eps)?.to_dtype(x.dtype())
}

/// The CUDA GroupNorm kernels' result where they serve an untracked computation (as
/// [`layer_norm_kernel`]: the frozen op's forward uses it too).
fn group_norm_kernel(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Option<Tensor>> {
    if x.track_op() || weight.track_op() || bias.track_op() || !super::norm_cuda::serves_groups(x, groups) {
        return Ok(None);
    }
    crate::profile::inner(
        || format!("group norm forward {:?}", x.dims()),
        || super::norm_cuda::group_forward(x, weight, bias, groups, eps),
    )
    .map(Some)
}

/// (1, C, 1, ...) view of a per-channel vector for an input of rank `rank`, in f32.
fn per_channel(v: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![1usize; rank];
    shape[1] = v.elem_count();
    v.to_dtype(DType::F32)?.reshape(shape)
}

fn group_norm_f32(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let xg = x.to_dtype(DType::F32)?.reshape((dims[0], groups, ()))?;
    let xc = xg.broadcast_sub(&xg.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    xn.broadcast_mul(&per_channel(weight, dims.len())?)?.broadcast_add(&per_channel(bias, dims.len())?)
}

/// GroupNorm with frozen weights as one op on a tracked `x` (keeps only `x`, like
/// [`layer_norm_frozen`]); `None` when it does not apply.
pub fn group_norm_frozen(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !x.track_op() || weight.track_op() || bias.track_op() || x.dtype() == DType::F64 {
        return Ok(None);
    }
    let (xd, wd, bd) = (x.detach(), weight.detach(), bias.detach());
    let y = match group_norm_kernel(&xd, &wd, &bd, groups, eps)? {
        Some(y) => y,
        None => crate::profile::inner(
            || format!("group norm forward (composed) {:?}", x.dims()),
            || group_norm_f32(&xd, &wd, &bd, groups, eps),
        )?,
    };
    let weight = per_channel(&wd, x.rank())?;
    let op =
        FusedNorm { weight, groups: Some(groups), eps, map: None, out: Precomputed::new(&y, x.dtype())? };
    Ok(Some(x.apply_op1(op)?))
}

/// `x ⊕ c` with a constant `c` (broadcast to x's shape), recorded as one op whose backward
/// returns only dx: candle's composed binary ops store a gradient for an untracked operand (of
/// the broadcast shape) that is never consumed and lives until backward ends.
struct WithConstant {
    c: Tensor,
    op: Binary,
    out: Precomputed,
}

impl CustomOp1 for WithConstant {
    fn name(&self) -> &'static str {
        "with-constant"
    }

    precomputed_kernels!(_x);

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.op {
            Binary::Add => dy.clone(),
            Binary::Mul => dy.mul(&self.c)?,
        }))
    }
}

fn with_constant(x: &Tensor, c: &Tensor, op: Binary) -> Result<Tensor> {
    if !x.track_op() || c.track_op() {
        return match op {
            Binary::Add => x.broadcast_add(c),
            Binary::Mul => x.broadcast_mul(c),
        };
    }
    let c = c.detach().to_dtype(x.dtype())?.broadcast_as(x.shape())?;
    let out = Precomputed::from_storage(binary_storage(&x.detach(), &c, op)?, x.shape().clone());
    x.apply_op1(WithConstant { c, op, out })
}

/// `x + c` for a constant `c` broadcast to x's shape (position encodings): differentiable in
/// `x` without keeping a gradient for `c`.
pub fn add_constant(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    with_constant(x, c, Binary::Add)
}

/// `x · c` for a constant `c` broadcast to x's shape (dropout masks): differentiable in `x`
/// without keeping a gradient for `c`.
pub fn mul_constant(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    with_constant(x, c, Binary::Mul)
}

/// Dropout whose mask the CUDA kernels draw themselves ([`crate::rng::KeepMask::Counter`]):
/// one kernel forward (`x ⊙ keep / (1 − p)`, with the residual added for [`dropout_add`]) and
/// one backward (the output gradient dropped with the same draws), keeping only the mask's
/// seed and position. Composed, a dropout draws a u8 mask, converts and scales it to a
/// constant of the input's size kept for backward, multiplies, and adds the residual: four
/// more launches and an activation-sized tensor per residual branch.
struct CounterDropout {
    mask: crate::rng::KeepMask,
    p: f64,
    out: Precomputed,
}

impl CounterDropout {
    /// `drop(dy)`.
    fn dropped(&self, dy: &Tensor) -> Result<Tensor> {
        super::fused_cuda::adapter_input(dy, None, Some(&self.mask), self.p)
    }
}

impl CustomOp1 for CounterDropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    precomputed_kernels!(_x);

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.dropped(dy)?))
    }
}

impl candle_core::CustomOp2 for CounterDropout {
    fn name(&self) -> &'static str {
        "dropout-add"
    }

    precomputed_kernels!(_x, _residual);

    fn bwd(
        &self,
        _x: &Tensor,
        _residual: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.dropped(dy)?), Some(dy.clone())))
    }
}

/// `residual + drop(x)` (`residual` None: `drop(x)`) with probability `p` in (0, 1): on CUDA
/// with lorahost's kernels one op with a counter mask ([`CounterDropout`]), else the composed
/// multiplication by the drawn mask (and the sum). The same mask draws either way.
fn dropout_with(x: &Tensor, residual: Option<&Tensor>, p: f64) -> Result<Tensor> {
    let mask = crate::rng::keep_mask_for_kernels(x.shape(), p, x.device())?;
    if !counter_kernels_apply(&mask, x, residual) {
        let dropped = mul_constant(x, &crate::rng::scaled_mask(&mask.tensor()?, p, x.dtype())?)?;
        return match residual {
            Some(r) => r + dropped,
            None => Ok(dropped),
        };
    }
    let residual_d = residual.map(|r| r.detach());
    let out = super::fused_cuda::dropout_storage(&x.detach(), residual_d.as_ref(), &mask, p)?;
    let op = CounterDropout { mask, p, out: Precomputed::from_storage(out, x.shape().clone()) };
    match residual {
        Some(r) => x.apply_op2(r, op),
        None => x.apply_op1(op),
    }
}

/// Whether the counter-mask kernels apply `mask` to `x` (and add `residual`): a counter mask
/// on an input the fused kernels serve, the residual alike; else the composed multiplication.
fn counter_kernels_apply(mask: &crate::rng::KeepMask, x: &Tensor, residual: Option<&Tensor>) -> bool {
    matches!(mask, crate::rng::KeepMask::Counter { .. })
        && super::fused_cuda::serves(x)
        && residual.is_none_or(|r| r.dtype() == x.dtype() && r.shape() == x.shape())
}

/// A residual dropout drawn by [`dropout_step`], for its backward.
pub(crate) struct DropoutStep {
    mask: Option<crate::rng::KeepMask>,
    p: f64,
    /// The counter kernels apply the mask (else the composed multiplication by it).
    fused: bool,
}

/// `residual + drop(x)` (`residual` None: `drop(x)`) of untracked operands, unrecorded, for ops
/// with a hand-written backward ([`super::detr_block`]): the same draws and values as the
/// recorded [`crate::rng::dropout`] / [`crate::rng::dropout_add`] (`p` ≤ 0 or not `train`: no
/// dropout, nothing drawn).
pub(crate) fn dropout_step(
    x: &Tensor,
    residual: Option<&Tensor>,
    p: f64,
    train: bool,
) -> Result<(Tensor, DropoutStep)> {
    let plain = |x: Tensor| match residual {
        Some(r) => r + x,
        None => Ok(x),
    };
    if !train || p <= 0.0 {
        return Ok((plain(x.clone())?, DropoutStep { mask: None, p: 0.0, fused: false }));
    }
    if p >= 1.0 {
        return Ok((plain(x.zeros_like()?)?, DropoutStep { mask: None, p, fused: false }));
    }
    let mask = crate::rng::keep_mask_for_kernels(x.shape(), p, x.device())?;
    let fused = counter_kernels_apply(&mask, x, residual);
    let y = if fused {
        let s = super::fused_cuda::dropout_storage(x, residual, &mask, p)?;
        Tensor::from_storage(s, x.shape().clone(), candle_core::op::BackpropOp::none(), false)
    } else {
        plain(x.broadcast_mul(&crate::rng::scaled_mask(&mask.tensor()?, p, x.dtype())?)?)?
    };
    Ok((y, DropoutStep { mask: Some(mask), p, fused }))
}

impl DropoutStep {
    /// The dropped branch's gradient for the output gradient `dy` (the residual's is `dy`).
    pub(crate) fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        match &self.mask {
            None if self.p >= 1.0 => dy.zeros_like(),
            None => Ok(dy.clone()),
            Some(m) if self.fused => super::fused_cuda::adapter_input(dy, None, Some(m), self.p),
            Some(m) => dy.broadcast_mul(&crate::rng::scaled_mask(&m.tensor()?, self.p, dy.dtype())?),
        }
    }
}

/// Inverted dropout `drop(x)` with probability `p` in (0, 1) (see [`crate::rng::dropout`]).
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    dropout_with(x, None, p)
}

/// `residual + drop(x)`, a residual branch's dropout and sum, with probability `p` in (0, 1).
pub fn dropout_add(x: &Tensor, residual: &Tensor, p: f64) -> Result<Tensor> {
    dropout_with(x, Some(residual), p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and input gradient equal the composed LayerNorm's.
    #[test]
    fn fused_layer_norm_matches_the_composed_one_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 16), &dev)? + 0.7)?)?;
        let w = Tensor::randn(1f32, 0.3, 16, &dev)?;
        let b = Tensor::randn(0f32, 0.3, 16, &dev)?;
        let t = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev)?;
        let composed = layer_norm_composed(&x, &w, &b, 1e-6)?;
        let fused = layer_norm_frozen(&x, &w, &b, 1e-6)?.expect("tracked input");
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert_eq!(diff(&composed, &fused)?, 0.0, "the same forward, bit for bit");
        let gc = (composed * &t)?.sum_all()?.backward()?;
        let gf = (fused * &t)?.sum_all()?.backward()?;
        let (a, b2) = (gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap());
        assert!(diff(a, b2)? < 1e-5, "gradient differs by {}", diff(a, b2)?);
        assert!(layer_norm_frozen(&x.as_tensor().detach(), &w, &b, 1e-6)?.is_none());
        Ok(())
    }

    /// GroupNorm as one op: the same forward bit for bit, the composed graph's input gradient.
    #[test]
    fn fused_group_norm_matches_the_composed_one_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (2, 6, 3, 4), &dev)? + 0.3)?)?;
        let w = Tensor::randn(1f32, 0.3, 6, &dev)?;
        let b = Tensor::randn(0f32, 0.3, 6, &dev)?;
        let t = Tensor::randn(0f32, 1.0, (2, 6, 3, 4), &dev)?;
        let composed = group_norm_composed(&x, &w, &b, 3, 1e-5)?;
        let fused = group_norm_frozen(&x, &w, &b, 3, 1e-5)?.expect("tracked input");
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert_eq!(diff(&composed, &fused)?, 0.0);
        let gc = (composed * &t)?.sum_all()?.backward()?;
        let gf = (fused * &t)?.sum_all()?.backward()?;
        let (a, b2) = (gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap());
        assert!(diff(a, b2)? < 1e-5, "gradient differs by {}", diff(a, b2)?);
        Ok(())
    }

    /// Adding or multiplying a broadcast constant: the composed values and input gradient, and
    /// no gradient stored for the constant (the composed ops keep one of the broadcast shape).
    #[test]
    fn constants_get_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?)?;
        let c = Tensor::randn(0f64, 1.0, (3, 1), &dev)?;
        let t = Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?;
        for mul in [false, true] {
            let (want, got) = if mul {
                (x.broadcast_mul(&c)?, mul_constant(&x, &c)?)
            } else {
                (x.broadcast_add(&c)?, add_constant(&x, &c)?)
            };
            assert_eq!((&want - &got)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
            let gw = (want * &t)?.sum_all()?.backward()?;
            let gg = (got * &t)?.sum_all()?.backward()?;
            let d = (gw.get(&x).unwrap() - gg.get(&x).unwrap())?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-12);
            assert!(gg.get_ids().count() < gw.get_ids().count(), "the composed op kept a gradient for c");
        }
        Ok(())
    }
}
