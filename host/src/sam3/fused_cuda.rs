//! Fused elementwise CUDA kernels for the training ops' hot paths, where candle's composed
//! operations make several passes (each with its own allocation and launch) over
//! activation-sized tensors:
//! - attention: the softmax of a score chunk in place (f32 statistics, one read and one write
//!   of the chunk instead of candle's five passes with bf16 exponentials) and the score
//!   gradient `dS = P ⊙ (dP − δ)` in place in `dP`;
//! - adapted linears: the input activation and the dropped-out adapter input in one pass
//!   (forward, and its recomputation in backward), and the input gradient
//!   `(dy·W + drop(g·A)) ⊙ act'(x)` in one pass instead of about fifteen (the f32 GELU
//!   derivative alone was ten), and the adapter's factors cast to bf16 in one launch;
//! - dropout: the keep mask's counter-based generator ([`HELPERS`], shared with
//!   [`super::lowrank_cuda`]), which every kernel that applies a mask draws again.
//!
//! All compute in f32 and round once to the activations' dtype. The same kernels serve the
//! tracked and the untracked computation, so checkpointed recomputation reproduces the forward
//! bit for bit on the GPU as the composed ops do on the CPU. Compiled on first use
//! ([`crate::cuda_kernels`]); `LORAHOST_FUSED_OPS=0` switches them off (for A/B timings).

use super::nn::Activation;
use crate::cuda_kernels::{Arg, Launch};
use crate::rng::KeepMask;
use candle_core::{Result, Tensor};

/// Whether the kernels serve `t`: a CUDA tensor in bf16 or f32, with the kernels compiled.
pub fn serves(t: &Tensor) -> bool {
    imp::serves(t)
}

/// Whether the kernels run on `device` (CUDA, compiled).
pub fn serves_device(device: &candle_core::Device) -> bool {
    imp::serves_device(device)
}

/// A dropout keep mask (u8, 1 = kept with probability 1 − `p`) of `shape` on `device`, drawn
/// by a counter-based generator: the mask's key is [`mask_key`] of the stream's `seed` and
/// position `offset`, and element `i` hashes (key, `i`), so a stream is a seed and a position
/// and reseeding costs nothing (cuRAND's generator is rebuilt on every reseed, once per ViT
/// block). At most [`MAX_MASK`] entries.
pub fn keep_mask(
    shape: &candle_core::Shape,
    p: f64,
    seed: u64,
    offset: u64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    imp::keep_mask(shape, p, seed, offset, device)
}

/// Softmax over the last axis of the contiguous score chunk `s` (B, H, rows, keys), in place:
/// `s` must be a fresh tensor no one else holds (a matmul's result). Returns it.
pub fn softmax_in_place(s: Tensor) -> Result<Tensor> {
    imp::softmax_in_place(s)
}

/// `dS = P ⊙ (dP − δ)` in place in the fresh contiguous `dp` (B, H, rows, keys), with `p` of
/// the same shape and `delta` f32 (B, H, rows). Returns `dp`.
pub fn attention_score_grad_in_place(dp: Tensor, p: &Tensor, delta: &Tensor) -> Result<Tensor> {
    imp::attention_score_grad_in_place(dp, p, delta)
}

/// `(act(x), drop(act(x)))` for an adapted linear's input: the activation (x itself without
/// one) and the inverted-dropout input of the adapter (keep `mask` with probability `p` of
/// dropping; the activation itself without a mask).
pub fn activation_and_dropout(
    x: &Tensor,
    act: Option<Activation>,
    mask: Option<&KeepMask>,
    p: f64,
) -> Result<(Tensor, Tensor)> {
    imp::act_drop(x, act, mask, p, true)
}

/// `drop(act(x))` alone (the adapter's input, recomputed in backward; the activation itself
/// is not written when there is a mask).
pub fn adapter_input(x: &Tensor, act: Option<Activation>, mask: Option<&KeepMask>, p: f64) -> Result<Tensor> {
    imp::act_drop(x, act, mask, p, mask.is_none()).map(|(_, xm)| xm)
}

/// The adapted linear's input gradient `(d1 + drop(d2)) ⊙ act'(x)` (`d2` the adapter's part,
/// dropped with `mask`/`p` when given; `act` with the layer's input `x` when the layer applies
/// an activation first), in `d1`'s dtype.
pub fn linear_input_grad(
    d1: &Tensor,
    d2: Option<&Tensor>,
    mask: Option<&KeepMask>,
    p: f64,
    act: Option<(Activation, &Tensor)>,
) -> Result<Tensor> {
    imp::linear_input_grad(d1, d2, mask, p, act)
}

/// `residual + drop(x)` (`residual` None: `drop(x)`; same shape and dtype) with keep `mask` and
/// drop probability `p`, written into a fresh storage (a dropout op's precomputed output).
pub fn dropout_storage(
    x: &Tensor,
    residual: Option<&Tensor>,
    mask: &KeepMask,
    p: f64,
) -> Result<candle_core::Storage> {
    imp::dropout_storage(x, residual, mask, p)
}

/// 2-D axial RoPE of the q/k projections as their output map, in one pass: the projection's
/// rows `y` (B·N, H·D) rotated pairwise by the f32 tables `cos`, `sin` (N·D/2 entries, pair `j`
/// of token `n` at `n·D/2 + j`) and laid out heads first (B, H, N, D); with `inverse`, the
/// backward: a (B, H, N, D) gradient rotated back to (B·N, H·D) rows.
pub fn rope(
    y: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    batch: usize,
    heads: usize,
    inverse: bool,
) -> Result<Tensor> {
    imp::rope(y, cos, sin, batch, heads, inverse)
}

/// An adapter's factors as a bf16 layer's products read them: `A` and `scale · B` (f32 `a` (r,
/// in), `b` (out, r)) converted in one launch into one buffer, as two views of it (the
/// composed conversion is three operations: a scaling and two casts). The values are those of
/// `(a.to_dtype(bf16), (b · scale).to_dtype(bf16))`.
pub fn adapter_factors(a: &Tensor, b: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    imp::adapter_factors(a, b, scale)
}

/// A linear layer's output `y + bias + z` (bias broadcast over rows; `z` the adapter's part)
/// in one pass, as a new tensor.
pub fn linear_epilogue(y: &Tensor, bias: Option<&Tensor>, z: Option<&Tensor>) -> Result<Tensor> {
    imp::linear_epilogue(y, bias, z)
}

/// [`linear_epilogue`] written into a fresh storage (a training op's precomputed output).
pub fn linear_epilogue_storage(
    y: &Tensor,
    bias: Option<&Tensor>,
    z: Option<&Tensor>,
) -> Result<candle_core::Storage> {
    imp::linear_epilogue_storage(y, bias, z)
}

/// The CUDA C helpers the fused kernels share with [`super::lowrank_cuda`]'s: the activations
/// and their derivatives (`act_f`, `act_d`), and the dropout generator (`pair_bits`, `draws`,
/// `kept`). Compiled after [`crate::cuda_kernels::PRELUDE`].
pub const HELPERS: &str = r#"
// act: 0 none, 1 GELU (erf), 2 GELU (tanh), 3 quick GELU, 4 SiLU, 5 ReLU.
__device__ __forceinline__ float act_f(int act, float x) {
    switch (act) {
        case 1: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
        case 2: { const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x); return 0.5f * x * (1.f + tanhf(u)); }
        case 3: return x / (1.f + expf(-1.702f * x));
        case 4: return x / (1.f + expf(-x));
        case 5: return x > 0.f ? x : 0.f;
        default: return x;
    }
}
__device__ __forceinline__ float act_d(int act, float x) {
    switch (act) {
        case 1: {
            const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
            const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
            return cdf + x * pdf;
        }
        case 2: {
            const float c = 0.7978845608028654f, k = 0.044715f, x2 = x * x;
            const float t = tanhf(c * x * (1.f + k * x2));
            return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * k * x2);
        }
        case 3: case 4: {
            const float a = act == 3 ? 1.702f : 1.f;
            const float s = 1.f / (1.f + expf(-a * x));
            return s + a * x * s * (1.f - s);
        }
        case 5: return x > 0.f ? 1.f : 0.f;
        default: return 1.f;
    }
}

// The dropout generator, counter-based: a mask is a 64-bit key (the host's `mask_key` of the
// stream's seed and position), and entries 2j and 2j + 1 take the low and the high 16 bits of
// a keyed 32-bit hash of j; an entry is kept when its 16 bits are >= threshold (p · 2^16
// rounded up; 0 keeps everything). Two rounds of a 32-bit integer mix (lowbias32) per pair of
// entries, about six instructions an entry: the mask is drawn again by every kernel that
// applies it (three times per adapted linear and step), and a 64-bit hash per entry took
// about 45 instructions on sm_90, more than the memory traffic of the kernels around it.
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}
__device__ __forceinline__ unsigned pair_bits(unsigned long long key, long long j) {
    return mix32(mix32((unsigned)j ^ (unsigned)key) + (unsigned)(key >> 32));
}

// Whether element i is kept: the drawn mask's entry where there is one (mask not null), else
// the generator's draw, `bits` being pair_bits(key, i / 2); threshold 0 keeps everything.
__device__ __forceinline__ bool kept(const unsigned char* mask, unsigned bits, unsigned threshold, long long i) {
    if (mask) return mask[i] != 0;
    return threshold == 0 || ((i & 1) ? bits >> 16 : bits & 0xffffu) >= threshold;
}

// The generator's bits for pair j, when the kernel draws (no drawn mask, a nonzero threshold).
__device__ __forceinline__ unsigned draws(const unsigned char* mask, unsigned long long key, unsigned threshold, long long j) {
    return (mask || threshold == 0) ? 0u : pair_bits(key, j);
}

"#;

/// The kernels' CUDA C source (compiled after [`crate::cuda_kernels::PRELUDE`] and [`HELPERS`]).
pub const SOURCE: &str = r#"
template <typename T>
__device__ void softmax_rows(T* s, int n) {
    __shared__ float sh[32];
    T* r = s + (long long)blockIdx.x * n;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, ld(r, i));
    m = block_max(m, sh);
    float z = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) z += __expf(ld(r, i) - m);
    z = block_sum(z, sh);
    const float inv = (m == __int_as_float(0xff800000)) ? 0.f : 1.f / z;
    for (int i = threadIdx.x; i < n; i += blockDim.x) st(r, i, __expf(ld(r, i) - m) * inv);
}

template <typename T>
__device__ void score_grad(T* dp, const T* p, const float* delta, int n) {
    const long long row = blockIdx.x;
    const float d = delta[row];
    T* a = dp + row * n;
    const T* b = p + row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) st(a, i, ld(b, i) * (ld(a, i) - d));
}

// The elementwise kernels below take the elements two at a time (one hash per pair): pair j
// is elements 2j and 2j + 1 (the last pair of an odd count has one).
#define FOR_PAIRS(n) \
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; 2 * j < (n); j += (long long)gridDim.x * blockDim.x)

// xa = act(x) (skipped when xa is null), xm = act(x) * keep * scale (skipped when xm is null).
template <typename T>
__device__ void act_drop(const T* x, const unsigned char* mask, unsigned long long key, unsigned int threshold,
        float scale, int act, T* xa, T* xm, long long n) {
    FOR_PAIRS(n) {
        const unsigned bits = xm ? draws(mask, key, threshold, j) : 0u;
        for (long long i = 2 * j; i < 2 * j + 2 && i < n; ++i) {
            const float a = act_f(act, ld(x, i));
            if (xa) st(xa, i, a);
            if (xm) st(xm, i, kept(mask, bits, threshold, i) ? a * scale : 0.f);
        }
    }
}

// dx = (d1 + drop(d2)) * act'(x); d2 and x may be null.
template <typename T>
__device__ void input_grad(const T* d1, const T* d2, const unsigned char* mask, unsigned long long key,
        unsigned int threshold, float scale, const T* x, int act, T* dx, long long n) {
    FOR_PAIRS(n) {
        const unsigned bits = d2 ? draws(mask, key, threshold, j) : 0u;
        for (long long i = 2 * j; i < 2 * j + 2 && i < n; ++i) {
            float d = ld(d1, i);
            if (d2) d += kept(mask, bits, threshold, i) ? ld(d2, i) * scale : 0.f;
            if (act) d *= act_d(act, ld(x, i));
            st(dx, i, d);
        }
    }
}

// out[i] = 1 when the generator keeps element i of the mask `key`.
extern "C" __global__ void keep_mask(unsigned char* out, unsigned long long key, unsigned int threshold, long long n) {
    FOR_PAIRS(n) {
        const unsigned bits = pair_bits(key, j);
        for (long long i = 2 * j; i < 2 * j + 2 && i < n; ++i) out[i] = kept(0, bits, threshold, i) ? 1 : 0;
    }
}

// RoPE, one thread per (b, h, n, pair j): rows layout y[(b·N + n)·H·D + h·D + 2j (+1)], heads
// first h[((b·H + h)·N + n)·D + 2j (+1)]. Forward: rows → heads first, rotated by +angle;
// inverse: heads first → rows, rotated by −angle.
// Index arithmetic in 32 bits (the host keeps every index below 2^32): a 64-bit division is a
// software routine several times longer, and there are three per pair.
template <typename T>
__device__ void rope(const T* src, const float* cs, const float* sn, T* dst, int batch, int heads, int n_tok, int d, int inverse) {
    const unsigned half = d / 2;
    const unsigned total = (unsigned)batch * heads * n_tok * half;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int j = (int)(i % half);
        unsigned r = i / half;
        const int n = (int)(r % (unsigned)n_tok); r /= (unsigned)n_tok;
        const int h = (int)(r % (unsigned)heads);
        const int b = (int)(r / (unsigned)heads);
        const long long rows_at = ((long long)b * n_tok + n) * heads * d + (long long)h * d + 2 * j;
        const long long heads_at = (((long long)b * heads + h) * n_tok + n) * d + 2 * j;
        const float c = cs[(long long)n * half + j], s = sn[(long long)n * half + j];
        if (!inverse) {
            const float a = ld(src, rows_at), bb = ld(src, rows_at + 1);
            st(dst, heads_at, a * c - bb * s);
            st(dst, heads_at + 1, bb * c + a * s);
        } else {
            const float a = ld(src, heads_at), bb = ld(src, heads_at + 1);
            st(dst, rows_at, a * c + bb * s);
            st(dst, rows_at + 1, bb * c - a * s);
        }
    }
}

// out = y + bias[col] + z; bias and z may be null. The column advances with the grid stride
// (one remainder per thread, not one 64-bit remainder per element).
template <typename T>
__device__ void epilogue(const T* y, const T* bias, const T* z, T* out, long long n, int cols) {
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    int col = (int)(start % cols);
    const int step = (int)(stride % cols);
    for (long long i = start; i < n; i += stride) {
        float v = ld(y, i);
        if (bias) v += ld(bias, col);
        if (z) v += ld(z, i);
        st(out, i, v);
        col += step;
        if (col >= cols) col -= cols;
    }
}

// out = [a, b · scale] in bf16 (na then nb entries): an adapter's factors as the layer's
// products read them (A, and B with LoRA's scale folded in), one launch for both.
extern "C" __global__ void factors_bf16(const float* a, long long na, const float* b, long long nb, float scale,
        bf16_t* out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < na + nb; i += (long long)gridDim.x * blockDim.x)
        st(out, i, i < na ? a[i] : b[i - na] * scale);
}

#define DEFINE(T, S) \
extern "C" __global__ void epilogue_##S(const T* y, const T* bias, const T* z, T* out, long long n, int cols) { epilogue(y, bias, z, out, n, cols); } \
extern "C" __global__ void rope_##S(const T* src, const float* cs, const float* sn, T* dst, int batch, int heads, int n_tok, int d, int inverse) { rope(src, cs, sn, dst, batch, heads, n_tok, d, inverse); } \
extern "C" __global__ void softmax_rows_##S(T* s, int n) { softmax_rows(s, n); } \
extern "C" __global__ void score_grad_##S(T* dp, const T* p, const float* delta, int n) { score_grad(dp, p, delta, n); } \
extern "C" __global__ void act_drop_##S(const T* x, const unsigned char* mask, unsigned long long key, unsigned int threshold, float scale, int act, T* xa, T* xm, long long n) { act_drop(x, mask, key, threshold, scale, act, xa, xm, n); } \
extern "C" __global__ void input_grad_##S(const T* d1, const T* d2, const unsigned char* mask, unsigned long long key, unsigned int threshold, float scale, const T* x, int act, T* dx, long long n) { input_grad(d1, d2, mask, key, threshold, scale, x, act, dx, n); }
DEFINE(bf16_t, bf16)
DEFINE(float, f32)
"#;

/// The factor conversion's launch: `out` (bf16, `na + nb`) = `a` (f32, `na`) then `b` (f32,
/// `nb`) times `scale`, on the addresses `[a, b, out]`.
pub fn factors_launch([a, b, out]: [u64; 3], na: usize, nb: usize, scale: f32) -> Launch {
    let (grid, block) = crate::cuda_kernels::elementwise_grid(na + nb);
    let args = vec![Arg(a), Arg::i64(na as i64), Arg(b), Arg::i64(nb as i64), Arg::f32(scale), Arg(out)];
    Launch { name: "factors_bf16".into(), grid, block, args }
}

/// The linear epilogue's launch (`epilogue_<suffix>`): `out = y + bias[col] + z` over `n`
/// elements in rows of `cols`, on the addresses `[y, bias, z, out]` (0 for an absent bias or
/// `z`).
pub fn epilogue_launch(suffix: &str, [y, bias, z, out]: [u64; 4], n: usize, cols: usize) -> Launch {
    let (grid, block) = crate::cuda_kernels::elementwise_grid(n);
    let args = vec![Arg(y), Arg(bias), Arg(z), Arg(out), Arg::i64(n as i64), Arg::i32(cols as i32)];
    Launch { name: format!("epilogue_{suffix}"), grid, block, args }
}

/// RoPE's launch (`rope_<suffix>`) on the addresses `[src, cos, sin, dst]` for `batch` ×
/// `heads` × `n_tok` tokens of head dimension `d` (see [`rope`]); one thread per pair.
pub fn rope_launch(
    suffix: &str,
    [src, cos, sin, dst]: [u64; 4],
    (batch, heads, n_tok, d): (usize, usize, usize, usize),
    inverse: bool,
) -> Launch {
    let (grid, block) = crate::cuda_kernels::elementwise_grid(batch * heads * n_tok * d / 2);
    let mut args = vec![Arg(src), Arg(cos), Arg(sin), Arg(dst)];
    args.extend([batch, heads, n_tok, d].map(|v| Arg::i32(v as i32)));
    args.push(Arg::i32(i32::from(inverse)));
    Launch { name: format!("rope_{suffix}"), grid, block, args }
}

/// How a kernel applies a dropout mask: the drawn bytes at `addr` (0: none), else the
/// counter-based generator's draws for the mask `key` against `threshold` (0: all kept); kept
/// entries are multiplied by `scale` (1 / (1 − p), 1 without a mask).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskArgs {
    /// Address of the u8 mask, or 0.
    pub addr: u64,
    /// The mask's key ([`mask_key`]).
    pub key: u64,
    /// `p · 2¹⁶` rounded up: an entry whose 16 bits are below it is dropped.
    pub threshold: u32,
    /// The multiplier of kept entries.
    pub scale: f32,
}

impl MaskArgs {
    /// No mask: everything kept, unscaled.
    pub const NONE: MaskArgs = MaskArgs { addr: 0, key: 0, threshold: 0, scale: 1.0 };

    /// The generator's draws for the mask at position `offset` of stream `seed`, for drop
    /// probability `p`.
    pub fn counter(seed: u64, offset: u64, p: f64) -> MaskArgs {
        let key = mask_key(seed, offset);
        MaskArgs { addr: 0, key, threshold: threshold(p), scale: (1.0 / (1.0 - p)) as f32 }
    }

    /// The drawn mask at `addr` for drop probability `p`.
    pub fn drawn(addr: u64, p: f64) -> MaskArgs {
        MaskArgs { addr, scale: (1.0 / (1.0 - p)) as f32, ..MaskArgs::NONE }
    }

    /// The four kernel arguments (address, key, threshold, scale).
    pub fn args(&self) -> [Arg; 4] {
        [Arg(self.addr), Arg(self.key), Arg(self.threshold as u64), Arg::f32(self.scale)]
    }
}

/// The most entries a mask of the counter-based generator has (the kernels hash the pair index
/// in 32 bits).
pub const MAX_MASK: usize = 1 << 33;

/// The key of the counter-based generator's mask at position `offset` of stream `seed`: the
/// kernels draw entry `i` from (key, `i`), so masks at different positions of a stream (or on
/// different streams) are independent, and a mask's draws do not depend on where its stream
/// stood beyond its key.
pub fn mask_key(seed: u64, offset: u64) -> u64 {
    fn mix64(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    mix64(seed ^ mix64(offset))
}

/// The generator's threshold for drop probability `p`: `p · 2¹⁶`, rounded up (2¹⁶ drops
/// everything).
pub fn threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 65_536.0).ceil() as u32
}

/// Threads per block and blocks for the kernels that take `n` elements in pairs.
fn pairs_grid(n: usize) -> ((u32, u32, u32), u32) {
    crate::cuda_kernels::elementwise_grid(n.div_ceil(2))
}

/// The keep-mask kernel's launch: `n` bytes at `out`, the draws of the mask at position
/// `offset` of stream `seed`.
pub fn keep_mask_launch(out: u64, seed: u64, offset: u64, p: f64, n: usize) -> Launch {
    let (grid, block) = pairs_grid(n);
    let args = vec![Arg(out), Arg(mask_key(seed, offset)), Arg(threshold(p) as u64), Arg::i64(n as i64)];
    Launch { name: "keep_mask".into(), grid, block, args }
}

/// The activation-and-dropout kernel's launch (`act_drop_<suffix>`) over `n` elements of `x`:
/// `xa = act(x)` and `xm = drop(act(x))`, either skipped at address 0.
pub fn act_drop_launch(suffix: &str, [x, xa, xm]: [u64; 3], mask: MaskArgs, act: i32, n: usize) -> Launch {
    let (grid, block) = pairs_grid(n);
    let mut args = vec![Arg(x)];
    args.extend(mask.args());
    args.extend([Arg::i32(act), Arg(xa), Arg(xm), Arg::i64(n as i64)]);
    Launch { name: format!("act_drop_{suffix}"), grid, block, args }
}

/// The input-gradient kernel's launch (`input_grad_<suffix>`) over `n` elements:
/// `dx = (d1 + drop(d2)) ⊙ act'(x)`, `d2` and `x` skipped at address 0.
pub fn input_grad_launch(
    suffix: &str,
    [d1, d2, x, dx]: [u64; 4],
    mask: MaskArgs,
    act: i32,
    n: usize,
) -> Launch {
    let (grid, block) = pairs_grid(n);
    let mut args = vec![Arg(d1), Arg(d2)];
    args.extend(mask.args());
    args.extend([Arg(x), Arg::i32(act), Arg(dx), Arg::i64(n as i64)]);
    Launch { name: format!("input_grad_{suffix}"), grid, block, args }
}

/// The kernels' activation code.
pub fn act_code(act: Option<Activation>) -> i32 {
    match act {
        None => 0,
        Some(Activation::Gelu) => 1,
        Some(Activation::GeluTanh) => 2,
        Some(Activation::QuickGelu) => 3,
        Some(Activation::Silu) => 4,
        Some(Activation::Relu) => 5,
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{Activation, KeepMask};
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor) -> bool {
        false
    }
    pub fn serves_device(_: &candle_core::Device) -> bool {
        false
    }
    pub fn keep_mask(
        _: &candle_core::Shape,
        _: f64,
        _: u64,
        _: u64,
        _: &candle_core::Device,
    ) -> Result<Tensor> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn softmax_in_place(_: Tensor) -> Result<Tensor> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn rope(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: usize, _: bool) -> Result<Tensor> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn linear_epilogue(_: &Tensor, _: Option<&Tensor>, _: Option<&Tensor>) -> Result<Tensor> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn adapter_factors(_: &Tensor, _: &Tensor, _: f64) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn dropout_storage(
        _: &Tensor,
        _: Option<&Tensor>,
        _: &KeepMask,
        _: f64,
    ) -> Result<candle_core::Storage> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn linear_epilogue_storage(
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
    ) -> Result<candle_core::Storage> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn attention_score_grad_in_place(_: Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn act_drop(
        _: &Tensor,
        _: Option<Activation>,
        _: Option<&KeepMask>,
        _: f64,
        _: bool,
    ) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("fused ops: built without CUDA")
    }
    pub fn linear_input_grad(
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&KeepMask>,
        _: f64,
        _: Option<(Activation, &Tensor)>,
    ) -> Result<Tensor> {
        candle_core::bail!("fused ops: built without CUDA")
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

/// How the kernels apply `mask` (drop probability `p`) to tensors like `like`, and the drawn
/// mask as they read it (held until the launch is queued).
#[cfg(feature = "cuda")]
pub(crate) fn kernel_mask(
    mask: Option<&KeepMask>,
    p: f64,
    like: &Tensor,
) -> Result<(Option<Tensor>, MaskArgs)> {
    imp::mask_arg(mask, p, like)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{act_code, epilogue_launch, rope_launch, Activation, KeepMask, MaskArgs, HELPERS, SOURCE};
    use super::{act_drop_launch, factors_launch, input_grad_launch, keep_mask_launch};
    use crate::cuda_kernels::{device_address, launch, row_threads, uninit, Arg};
    use candle_core::{DType, Result, Tensor};

    const MODULE: &str = "lorahost_fused_ops";

    pub fn prepare() {
        let _ = ptx();
    }

    static KERNELS: crate::cuda_kernels::KernelSet = crate::cuda_kernels::KernelSet::new(
        "fused elementwise",
        "LORAHOST_FUSED_OPS",
        &[crate::cuda_kernels::PRELUDE, HELPERS, SOURCE],
    );

    /// The compiled PTX, or None (logged once) when the kernels cannot be used.
    fn ptx() -> Option<&'static str> {
        KERNELS.ptx()
    }

    fn suffix(dt: DType) -> Option<&'static str> {
        match dt {
            DType::BF16 => Some("bf16"),
            DType::F32 => Some("f32"),
            _ => None,
        }
    }

    pub fn serves(t: &Tensor) -> bool {
        t.device().is_cuda() && suffix(t.dtype()).is_some() && ptx().is_some()
    }

    pub fn serves_device(device: &candle_core::Device) -> bool {
        device.is_cuda() && ptx().is_some()
    }

    pub fn keep_mask(
        shape: &candle_core::Shape,
        p: f64,
        seed: u64,
        offset: u64,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let Some(ptx) = ptx() else { candle_core::bail!("fused ops: keep mask kernel unavailable") };
        let like = device_scalar(device)?;
        let n = shape.elem_count();
        if n > super::MAX_MASK {
            candle_core::bail!("fused ops: a keep mask of {n} entries (at most {})", super::MAX_MASK);
        }
        let out = uninit(&like, shape.dims(), DType::U8)?;
        if n > 0 {
            keep_mask_launch(device_address(&out)?, seed, offset, p, n).run(device, MODULE, ptx)?;
        }
        Ok(out)
    }

    /// A scalar on `device` for [`uninit`] to allocate next to, made once per device (a
    /// dropout mask is drawn for every adapted linear of every step).
    fn device_scalar(device: &candle_core::Device) -> Result<Tensor> {
        static SCALAR: std::sync::Mutex<Option<Tensor>> = std::sync::Mutex::new(None);
        let mut held = SCALAR.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = held.as_ref().filter(|t| t.device().same_device(device)) {
            return Ok(t.clone());
        }
        let t = Tensor::zeros((), DType::U8, device)?;
        *held = Some(t.clone());
        Ok(t)
    }

    /// The kernel name suffix for `t`'s dtype, and the PTX.
    fn served(base: &str, t: &Tensor) -> Result<(&'static str, &'static str)> {
        match (suffix(t.dtype()), ptx()) {
            (Some(s), Some(ptx)) => Ok((s, ptx)),
            _ => candle_core::bail!("fused ops: {base} does not serve {:?} on {:?}", t.dtype(), t.device()),
        }
    }

    /// The kernel name for `t`'s dtype, and the PTX.
    fn kernel(base: &str, t: &Tensor) -> Result<(String, &'static str)> {
        served(base, t).map(|(s, ptx)| (format!("{base}_{s}"), ptx))
    }

    fn check_same(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.shape() != b.shape() || a.dtype() != b.dtype() {
            candle_core::bail!(
                "fused ops: {what} {:?} {:?} against {:?} {:?}",
                b.shape(),
                b.dtype(),
                a.shape(),
                a.dtype()
            );
        }
        Ok(())
    }

    /// The address of an optional operand (0, a null pointer, when absent).
    fn opt_addr(t: &Option<Tensor>) -> Result<Arg> {
        Ok(Arg(match t {
            Some(t) => device_address(t)?,
            None => 0,
        }))
    }

    /// How the kernels apply `mask` (drop probability `p`) to tensors like `like`; the drawn
    /// mask as the kernels read it (held until the launch is queued).
    pub(crate) fn mask_arg(
        mask: Option<&KeepMask>,
        p: f64,
        like: &Tensor,
    ) -> Result<(Option<Tensor>, MaskArgs)> {
        let Some(mask) = mask else { return Ok((None, MaskArgs::NONE)) };
        if mask.elem_count() != like.elem_count() {
            candle_core::bail!("fused ops: mask of {} entries for {:?}", mask.elem_count(), like.shape());
        }
        match mask {
            KeepMask::Drawn(m) => {
                let m = m.to_dtype(DType::U8)?.contiguous()?;
                let a = MaskArgs::drawn(device_address(&m)?, p);
                Ok((Some(m), a))
            }
            KeepMask::Counter { seed, offset, p: drawn_p, device, .. } => {
                if like.elem_count() > super::MAX_MASK {
                    candle_core::bail!("fused ops: a counter mask of {} entries", like.elem_count());
                }
                if !device.same_device(like.device()) || *drawn_p != p {
                    candle_core::bail!(
                        "fused ops: a mask drawn for p = {drawn_p} on {device:?} applied with p = {p}"
                    );
                }
                Ok((None, MaskArgs::counter(*seed, *offset, p)))
            }
        }
    }

    pub fn softmax_in_place(s: Tensor) -> Result<Tensor> {
        let (name, ptx) = kernel("softmax_rows", &s)?;
        if !s.is_contiguous() {
            candle_core::bail!("fused softmax: scores not contiguous");
        }
        let n = s.dim(candle_core::D::Minus1)?;
        let rows = s.elem_count() / n.max(1);
        if rows == 0 {
            return Ok(s);
        }
        let args = [Arg(device_address(&s)?), Arg::i32(n as i32)];
        launch(s.device(), MODULE, ptx, &name, (rows as u32, 1, 1), row_threads(n), &args)?;
        Ok(s)
    }

    pub fn rope(
        y: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: usize,
        heads: usize,
        inverse: bool,
    ) -> Result<Tensor> {
        let (suffix, ptx) = served("rope", y)?;
        let (n_tok, d) = if inverse {
            let (b, h, n, d) = y.dims4()?;
            if b != batch || h != heads {
                candle_core::bail!("fused RoPE: gradient {:?} for batch {batch}, {heads} heads", y.shape());
            }
            (n, d)
        } else {
            let (rows, hd) = y.dims2()?;
            (rows / batch.max(1), hd / heads.max(1))
        };
        let half = d / 2;
        if batch * n_tok * heads * d != y.elem_count() || d % 2 != 0 {
            candle_core::bail!(
                "fused RoPE: {:?} is not {batch} × {n_tok} tokens × {heads} heads × {d}",
                y.shape()
            );
        }
        let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
        if cos.elem_count() != n_tok * half || sin.elem_count() != n_tok * half {
            candle_core::bail!(
                "fused RoPE: tables of {} entries for {n_tok} tokens × {half} pairs",
                cos.elem_count()
            );
        }
        let src = y.contiguous()?;
        let out_shape: Vec<usize> =
            if inverse { vec![batch * n_tok, heads * d] } else { vec![batch, heads, n_tok, d] };
        let dst = uninit(&src, &out_shape, src.dtype())?;
        let pairs = batch * heads * n_tok * half;
        // The kernel's 32-bit indices (and its grid stride past the last pair) stay below 2^32.
        if pairs >= (1usize << 32) - (1usize << 25) {
            candle_core::bail!("fused RoPE: {pairs} pairs in one call (at most about 4.2e9)");
        }
        if pairs > 0 {
            let addrs =
                [device_address(&src)?, device_address(&cos)?, device_address(&sin)?, device_address(&dst)?];
            rope_launch(suffix, addrs, (batch, heads, n_tok, d), inverse).run(src.device(), MODULE, ptx)?;
        }
        Ok(dst)
    }

    /// Launch the epilogue writing to `dst` (an address of `y.elem_count()` elements).
    fn epilogue_into(y: &Tensor, bias: Option<&Tensor>, z: Option<&Tensor>, dst: u64) -> Result<()> {
        let (suffix, ptx) = served("epilogue", y)?;
        let y = y.contiguous()?;
        let cols = y.dim(candle_core::D::Minus1)?;
        let bias = bias.map(|b| b.to_dtype(y.dtype())?.contiguous()).transpose()?;
        if let Some(b) = &bias {
            if b.elem_count() != cols {
                candle_core::bail!("fused linear: bias of {} for {cols} outputs", b.elem_count());
            }
        }
        let z = z.map(|z| z.contiguous()).transpose()?;
        if let Some(z) = &z {
            check_same("adapter output", &y, z)?;
        }
        let n = y.elem_count();
        if n == 0 {
            return Ok(());
        }
        let addrs = [device_address(&y)?, opt_addr(&bias)?.0, opt_addr(&z)?.0, dst];
        epilogue_launch(suffix, addrs, n, cols).run(y.device(), MODULE, ptx)
    }

    pub fn adapter_factors(a: &Tensor, b: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let Some(ptx) = ptx() else { candle_core::bail!("fused ops: factor kernel unavailable") };
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            candle_core::bail!("fused ops: factors of {:?} and {:?}, not f32", a.dtype(), b.dtype());
        }
        let (a, b) = (a.detach().contiguous()?, b.detach().contiguous()?);
        let (na, nb) = (a.elem_count(), b.elem_count());
        let out = uninit(&a, &[na + nb], DType::BF16)?;
        if na + nb > 0 {
            let addrs = [device_address(&a)?, device_address(&b)?, device_address(&out)?];
            factors_launch(addrs, na, nb, scale as f32).run(a.device(), MODULE, ptx)?;
        }
        Ok((out.narrow(0, 0, na)?.reshape(a.shape())?, out.narrow(0, na, nb)?.reshape(b.shape())?))
    }

    pub fn linear_epilogue(y: &Tensor, bias: Option<&Tensor>, z: Option<&Tensor>) -> Result<Tensor> {
        let out = uninit(y, y.dims(), y.dtype())?;
        epilogue_into(y, bias, z, device_address(&out)?)?;
        Ok(out)
    }

    pub fn linear_epilogue_storage(
        y: &Tensor,
        bias: Option<&Tensor>,
        z: Option<&Tensor>,
    ) -> Result<candle_core::Storage> {
        fresh_storage(y, |dst| epilogue_into(y, bias, z, dst))
    }

    /// A fresh storage of `like`'s size and dtype, its address handed to `fill`, which must
    /// write every element (it is not initialised).
    fn fresh_storage(like: &Tensor, fill: impl FnOnce(u64) -> Result<()>) -> Result<candle_core::Storage> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        use candle_core::CudaStorage;
        let candle_core::Device::Cuda(dev) = like.device() else {
            candle_core::bail!("fused ops: not on the GPU")
        };
        let n = like.elem_count();
        let stream = dev.cuda_stream();
        // SAFETY: `fill` writes all n elements before anything reads them.
        let storage = match like.dtype() {
            DType::BF16 => {
                let slice = unsafe { dev.alloc::<half::bf16>(n)? };
                fill(slice.device_ptr(&stream).0)?;
                CudaStorage::wrap_cuda_slice(slice, dev.clone())
            }
            DType::F32 => {
                let slice = unsafe { dev.alloc::<f32>(n)? };
                fill(slice.device_ptr(&stream).0)?;
                CudaStorage::wrap_cuda_slice(slice, dev.clone())
            }
            dt => candle_core::bail!("fused ops: {dt:?}"),
        };
        Ok(candle_core::Storage::Cuda(storage))
    }

    pub fn dropout_storage(
        x: &Tensor,
        residual: Option<&Tensor>,
        mask: &KeepMask,
        p: f64,
    ) -> Result<candle_core::Storage> {
        let x = x.contiguous()?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        if let Some(r) = &residual {
            check_same("residual", &x, r)?;
        }
        let n = x.elem_count();
        let (_m, mask_a) = mask_arg(Some(mask), p, &x)?;
        fresh_storage(&x, |dst| {
            if n == 0 {
                return Ok(());
            }
            match &residual {
                Some(r) => {
                    let (suffix, ptx) = served("input_grad", &x)?;
                    let addrs = [device_address(r)?, device_address(&x)?, 0, dst];
                    input_grad_launch(suffix, addrs, mask_a, 0, n).run(x.device(), MODULE, ptx)
                }
                None => {
                    let (suffix, ptx) = served("act_drop", &x)?;
                    let addrs = [device_address(&x)?, 0, dst];
                    act_drop_launch(suffix, addrs, mask_a, 0, n).run(x.device(), MODULE, ptx)
                }
            }
        })
    }

    pub fn attention_score_grad_in_place(dp: Tensor, p: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let (name, ptx) = kernel("score_grad", &dp)?;
        check_same("probabilities", &dp, p)?;
        if !dp.is_contiguous() {
            candle_core::bail!("fused score gradient: dP not contiguous");
        }
        let n = dp.dim(candle_core::D::Minus1)?;
        let rows = dp.elem_count() / n.max(1);
        let p = p.contiguous()?;
        let delta = delta.to_dtype(DType::F32)?.contiguous()?;
        if delta.elem_count() != rows {
            candle_core::bail!("fused score gradient: {} row terms for {rows} rows", delta.elem_count());
        }
        if rows == 0 {
            return Ok(dp);
        }
        let args = [
            Arg(device_address(&dp)?),
            Arg(device_address(&p)?),
            Arg(device_address(&delta)?),
            Arg::i32(n as i32),
        ];
        launch(dp.device(), MODULE, ptx, &name, (rows as u32, 1, 1), row_threads(n), &args)?;
        Ok(dp)
    }

    /// (act(x), drop(act(x))); `want_act: false` skips writing act(x) (the first result is
    /// then `x`, not to be used).
    pub fn act_drop(
        x: &Tensor,
        act: Option<Activation>,
        mask: Option<&KeepMask>,
        p: f64,
        want_act: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (suffix, ptx) = served("act_drop", x)?;
        let x = x.contiguous()?;
        let n = x.elem_count();
        let xa = match act {
            Some(_) if want_act => Some(uninit(&x, x.dims(), x.dtype())?),
            _ => None,
        };
        let xm = match mask {
            Some(_) => Some(uninit(&x, x.dims(), x.dtype())?),
            None => None,
        };
        if n > 0 && (xa.is_some() || xm.is_some()) {
            let (_m, mask_a) = mask_arg(mask, p, &x)?;
            let addrs = [device_address(&x)?, opt_addr(&xa)?.0, opt_addr(&xm)?.0];
            act_drop_launch(suffix, addrs, mask_a, act_code(act), n).run(x.device(), MODULE, ptx)?;
        }
        let xa = xa.unwrap_or_else(|| x.clone());
        let xm = xm.unwrap_or_else(|| xa.clone());
        Ok((xa, xm))
    }

    pub fn linear_input_grad(
        d1: &Tensor,
        d2: Option<&Tensor>,
        mask: Option<&KeepMask>,
        p: f64,
        act: Option<(Activation, &Tensor)>,
    ) -> Result<Tensor> {
        let (suffix, ptx) = served("input_grad", d1)?;
        let d1 = d1.contiguous()?;
        let d2 = d2.map(|d| d.contiguous()).transpose()?;
        if let Some(d) = &d2 {
            check_same("adapter gradient", &d1, d)?;
        }
        let x = act.map(|(_, x)| x.contiguous()).transpose()?;
        if let Some(x) = &x {
            check_same("activation input", &d1, x)?;
        }
        let n = d1.elem_count();
        let dx = uninit(&d1, d1.dims(), d1.dtype())?;
        if n > 0 {
            let (_m, mask_a) = mask_arg(if d2.is_some() { mask } else { None }, p, &d1)?;
            let addrs = [device_address(&d1)?, opt_addr(&d2)?.0, opt_addr(&x)?.0, device_address(&dx)?];
            let act = act_code(act.map(|(a, _)| a));
            input_grad_launch(suffix, addrs, mask_a, act, n).run(d1.device(), MODULE, ptx)?;
        }
        Ok(dx)
    }
}
