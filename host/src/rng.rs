//! Seeded randomness for training: dropout masks and adapter initialisation come from a
//! [`SplitMix64`] stream that the trainer reseeds from (seed, step, micro-step) before every
//! micro-batch, so a run is reproducible on the CPU and a resumed run draws exactly what the
//! uninterrupted one drew (no generator state needs saving). On CUDA, masks drawn on the host
//! would cost more than the step: dropout draws on the device, from lorahost's counter-based
//! mask kernel (a seed and a position; [`crate::sam3::fused_cuda::keep_mask`]) or, where that
//! kernel is unavailable, from candle's device generator; either is reseeded by the same keys.

use crate::data::SplitMix64;
use candle_core::{Result, Tensor};
use std::cell::RefCell;

thread_local! {
    static STREAM: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(0x10_4a_05));
    /// Sub-stream keys handed out since the last reseed.
    static KEYS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Inside [`with_substream`] on a GPU: the key the device generator is to be reseeded from
    /// before the sub-stream's first draw (taken by that draw).
    static DEVICE_KEY: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    /// After a [`reseed`] on a GPU: the seed of the device generator for the first draw outside
    /// any sub-stream, so a micro-batch's draws depend only on (seed, step, micro-step), as on
    /// the CPU (a resumed run draws what the uninterrupted one drew).
    static DEVICE_OUTER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    /// On CUDA with lorahost's kernels: the dropout generator's (seed, position), as the device
    /// generator's state otherwise (a key restarts it; see [`keep_mask`]).
    static DEVICE_COUNTER: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((299_792_458, 0)) };
    /// Sub-streams entered and not left.
    static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Restart this thread's stream from a mix of `parts` (e.g. seed, step, micro-step).
pub fn reseed(parts: &[u64]) {
    STREAM.with(|s| *s.borrow_mut() = SplitMix64::from_parts(parts));
    KEYS.with(|k| k.set(0));
    let mut mixed = parts.to_vec();
    mixed.push(0xDE71CE);
    DEVICE_OUTER.with(|k| k.set(Some(SplitMix64::from_parts(&mixed).next_u64())));
}

/// A key for a sub-stream: a mix of this thread's stream position and the number of keys given
/// out since the last reseed. It does not advance the stream, so taking keys leaves every other
/// draw unchanged.
pub fn next_key() -> u64 {
    let n = KEYS.with(|k| {
        let n = k.get();
        k.set(n + 1);
        n
    });
    let peek = STREAM.with(|s| s.borrow().clone().next_u64());
    SplitMix64::from_parts(&[peek, n, 0x5EB5]).next_u64()
}

/// Run `f` with dropout drawing from a sub-stream keyed by `key` (this thread's CPU stream and,
/// on a GPU, the device generator reseeded from the key before the first draw inside `f`), then
/// resume the outer CPU stream: a recomputation under the same key draws the same masks. On a
/// GPU, an `f` that draws leaves the device generator where its draws left it; one that draws
/// nothing leaves it untouched.
pub fn with_substream<R>(key: u64, device: &candle_core::Device, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let outer = STREAM.with(|s| std::mem::replace(&mut *s.borrow_mut(), SplitMix64::from_parts(&[key])));
    let outer_device = (!device.is_cpu()).then(|| DEVICE_KEY.with(|k| k.replace(Some(key))));
    DEPTH.with(|d| d.set(d.get() + 1));
    let r = f();
    DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    STREAM.with(|s| *s.borrow_mut() = outer);
    if let Some(prev) = outer_device {
        DEVICE_KEY.with(|k| k.set(prev));
    }
    r
}

/// Run `f` on a sub-stream of its own ([`next_key`], then [`with_substream`]). Every ViT block
/// runs this way, checkpointed or not, so turning activation checkpointing on or off changes
/// no dropout mask: not the block's own (drawn under the same key either way) and not any drawn
/// after it (the outer stream is left where it was).
pub fn keyed<R>(device: &candle_core::Device, f: impl FnOnce() -> Result<R>) -> Result<R> {
    with_substream(next_key(), device, f)
}

/// Inverted dropout with probability `p` (no-op for p <= 0): kept entries are scaled by
/// 1 / (1 - p). Differentiable (a multiplication by a constant mask).
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    // As one op: no gradient is kept for the mask.
    crate::sam3::ops::dropout(x, p)
}

/// `residual + dropout(x, p)` (a residual branch in training), as one op on CUDA.
pub fn dropout_add(x: &Tensor, residual: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return residual + x;
    }
    if p >= 1.0 {
        return residual + x.zeros_like()?;
    }
    crate::sam3::ops::dropout_add(x, residual, p)
}

/// A dropout keep mask of `shape` for probability `p` in (0, 1): u8, 1 where the entry is kept
/// (a quarter of an f32 tensor, what an op keeps for its backward). On the CPU the draws come
/// from this thread's stream, on a GPU from the device generator.
pub fn keep_mask(shape: &candle_core::Shape, p: f64, device: &candle_core::Device) -> Result<Tensor> {
    draw_keep_mask(shape, p, device, false)?.tensor()
}

/// [`keep_mask`] for the kernels that apply a mask themselves (the adapted linears' fused
/// kernels, [`crate::sam3::fused_cuda`]): on CUDA with lorahost's counter-based generator, the
/// mask's seed and position instead of the drawn bytes ([`KeepMask::Counter`]); each kernel
/// that applies it draws element `i` again from the mask's key and `i`, so nothing is written,
/// kept for backward or read back. The same draws as [`keep_mask`], which it advances the
/// generator exactly as. `LORAHOST_COUNTER_MASKS=0` draws the bytes anyway (A/B timings).
pub fn keep_mask_for_kernels(
    shape: &candle_core::Shape,
    p: f64,
    device: &candle_core::Device,
) -> Result<KeepMask> {
    draw_keep_mask(shape, p, device, counter_masks())
}

/// Whether the adapted linears' kernels draw their dropout masks themselves on CUDA
/// ([`keep_mask_for_kernels`]; `LORAHOST_COUNTER_MASKS=0`: no).
pub fn counter_masks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LORAHOST_COUNTER_MASKS").is_ok_and(|v| v == "0"))
}

/// A dropout keep mask (1 = kept, with probability 1 − `p`).
#[derive(Debug, Clone)]
pub enum KeepMask {
    /// Drawn: u8 of the input's shape.
    Drawn(Tensor),
    /// Not drawn: element `i` is the counter-based generator's draw `i` of the mask at position
    /// `offset` of stream `seed` ([`crate::sam3::fused_cuda::keep_mask`] draws the bytes).
    Counter {
        /// The stream.
        seed: u64,
        /// The position of element 0.
        offset: u64,
        /// The drop probability.
        p: f64,
        /// The shape of the masked input.
        shape: candle_core::Shape,
        /// The (CUDA) device.
        device: candle_core::Device,
    },
}

impl KeepMask {
    /// The mask as a u8 tensor (drawn now for [`KeepMask::Counter`]: the same bytes).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            KeepMask::Drawn(t) => Ok(t.clone()),
            KeepMask::Counter { seed, offset, p, shape, device } => {
                crate::sam3::fused_cuda::keep_mask(shape, *p, *seed, *offset, device)
            }
        }
    }

    /// The number of entries.
    pub fn elem_count(&self) -> usize {
        match self {
            KeepMask::Drawn(t) => t.elem_count(),
            KeepMask::Counter { shape, .. } => shape.elem_count(),
        }
    }
}

fn draw_keep_mask(
    shape: &candle_core::Shape,
    p: f64,
    device: &candle_core::Device,
    defer: bool,
) -> Result<KeepMask> {
    if !device.is_cpu() {
        let inside = DEPTH.with(|d| d.get()) > 0;
        let key = DEVICE_KEY
            .with(|k| k.take())
            .or_else(|| (!inside).then(|| DEVICE_OUTER.with(|k| k.take())).flatten());
        if crate::sam3::fused_cuda::serves_device(device)
            && shape.elem_count() <= crate::sam3::fused_cuda::MAX_MASK
        {
            // The counter-based generator: a key restarts it at position 0.
            let (seed, offset) = match key {
                Some(k) => (k, 0),
                None => DEVICE_COUNTER.with(|c| c.get()),
            };
            DEVICE_COUNTER.with(|c| c.set((seed, offset + shape.elem_count() as u64)));
            let mask = KeepMask::Counter { seed, offset, p, shape: shape.clone(), device: device.clone() };
            return if defer { Ok(mask) } else { Ok(KeepMask::Drawn(mask.tensor()?)) };
        }
        if let Some(key) = key {
            device.set_seed(key)?;
        }
        return Ok(KeepMask::Drawn(Tensor::rand(0f32, 1f32, shape, device)?.ge(p)?));
    }
    let mask: Vec<u8> = STREAM.with(|s| {
        let mut s = s.borrow_mut();
        (0..shape.elem_count()).map(|_| u8::from(s.next_f64() >= p)).collect()
    });
    Ok(KeepMask::Drawn(Tensor::from_vec(mask, shape, device)?))
}

/// A keep mask as the multiplier inverted dropout applies: 1 / (1 - p) where kept, 0 elsewhere,
/// in `dtype`.
pub fn scaled_mask(mask: &Tensor, p: f64, dtype: candle_core::DType) -> Result<Tensor> {
    mask.to_dtype(dtype)?.affine(1.0 / (1.0 - p), 0.0)
}

/// `n` draws uniform in [lo, hi) from a generator seeded by `parts` (adapter initialisation).
pub fn uniform(parts: &[u64], n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut r = SplitMix64::from_parts(parts);
    (0..n).map(|_| (lo + (hi - lo) * r.next_f64()) as f32).collect()
}

/// A stable 64-bit hash of a string (FNV-1a), for seeding per-name streams.
pub fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_is_reproducible_after_reseed_and_keeps_the_expectation() {
        let x = Tensor::ones((64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        reseed(&[1, 2, 3]);
        let a: Vec<f32> = dropout(&x, 0.25).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        reseed(&[1, 2, 3]);
        let b: Vec<f32> = dropout(&x, 0.25).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        let c: Vec<f32> = dropout(&x, 0.25).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(a, c, "the stream moves on");
        let zeros = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "{zeros}");
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
    }

    #[test]
    fn keyed_runs_leave_the_outer_stream_alone_and_replay_under_their_key() {
        let shape = candle_core::Shape::from(256);
        let draw = || -> Vec<u8> { keep_mask(&shape, 0.5, &Device::Cpu).unwrap().to_vec1().unwrap() };
        reseed(&[4, 5]);
        let plain_after = draw();
        reseed(&[4, 5]);
        let inner = keyed(&Device::Cpu, || Ok(draw())).unwrap();
        assert_eq!(draw(), plain_after, "a keyed run does not move the outer stream");
        // The same keys, in the same order, after a reseed: a recomputation replays the masks.
        reseed(&[4, 5]);
        let key = next_key();
        assert_eq!(with_substream(key, &Device::Cpu, || Ok(draw())).unwrap(), inner);
        assert_ne!(keyed(&Device::Cpu, || Ok(draw())).unwrap(), inner, "each keyed run has its own key");
    }
}
