//! Activation checkpointing: run a block without recording its graph and recompute it in
//! backward (candle has none; the recipe of `../shared/docs/candle-training.md`, Recipe B).
//!
//! [`checkpointed`] runs `f(x)` with LoRA weights detached ([`no_grad`]), so none of the block's
//! intermediates stay alive, and records one op on (x, anchor) whose output is that result. In
//! backward the op reruns `f` on a fresh copy of x with the live LoRA weights, backpropagates
//! the incoming gradient through it, returns dx and leaves the block's LoRA gradients in a
//! per-thread side store that the trainer merges into the main gradients ([`merge_side_grads`]).
//! Dropout inside the block draws from a sub-stream keyed at the first run, and the recompute
//! replays it, so both passes see the same masks (CPU stream and device generator alike). A
//! block that is not checkpointed runs under the same key ([`crate::rng::keyed`]), so the masks
//! do not depend on whether checkpointing is on, inside the blocks or after them.
//! `anchor` is a one-element trainable stand-in that makes the op part of the graph even when
//! x itself is untracked (the first ViT block sits right after frozen patch embeddings).

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor, Var};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::ops::{precomputed_kernels, Precomputed};

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
    static SIDE: RefCell<Option<GradStore>> = const { RefCell::new(None) };
    static SIDE_FOR_OPS: Cell<bool> = const { Cell::new(false) };
    static ANCHORS: RefCell<Vec<(candle_core::DeviceLocation, Var)>> = const { RefCell::new(Vec::new()) };
}

/// Run a forward `f` whose caller merges the side store into the gradients after backward
/// ([`merge_side_grads`]): the layer ops recorded inside ([`super::vit_block`],
/// [`super::detr_block`]) then hand their LoRA gradients to the side store instead of
/// returning them through candle's graph. Through the graph, an op's factors enter as one
/// concatenated operand, and candle's backward pays about six launches per factor to split
/// it again (a narrow, a reshape and a zero-plus-add per gradient edge): several hundred
/// per step in the DETR layers alone. A plain `loss.backward()` without this scope still gets
/// every gradient. `LORAHOST_SIDE_GRADS=0` keeps them on the graph anyway (A/B timings).
pub fn with_side_grads<R>(f: impl FnOnce() -> R) -> R {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| !std::env::var("LORAHOST_SIDE_GRADS").is_ok_and(|v| v == "0"));
    let prev = SIDE_FOR_OPS.with(|c| c.replace(on));
    let r = f();
    SIDE_FOR_OPS.with(|c| c.set(prev));
    r
}

/// Whether this thread is inside [`with_side_grads`].
pub fn side_grads_active() -> bool {
    SIDE_FOR_OPS.with(|c| c.get())
}

/// A one-element trainable stand-in on `device` (one per device and thread): an op on it is
/// recorded on a training graph even when its other operands are untracked (a checkpointed
/// block after frozen layers, a layer op whose LoRA gradients go to the side store); it never
/// gets a gradient.
pub fn anchor(device: &candle_core::Device) -> Result<Var> {
    let at = device.location();
    ANCHORS.with(|a| {
        let mut a = a.borrow_mut();
        if let Some((_, v)) = a.iter().find(|(l, _)| *l == at) {
            return Ok(v.clone());
        }
        let v = Var::zeros(1, candle_core::DType::F32, device)?;
        a.push((at, v.clone()));
        Ok(v)
    })
}

/// Whether this thread is inside [`no_grad`]: LoRA adapters use detached weights.
pub fn no_grad_active() -> bool {
    NO_GRAD.with(|c| c.get())
}

/// Run `f` with LoRA weights detached (nothing trainable is recorded).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let prev = NO_GRAD.with(|c| c.replace(true));
    let r = f();
    NO_GRAD.with(|c| c.set(prev));
    r
}

/// Add the LoRA gradients that checkpointed blocks produced during the last backward into
/// `grads` (and clear them). Call right after `loss.backward()`.
pub fn merge_side_grads(grads: &mut GradStore) -> Result<()> {
    let Some(side) = SIDE.with(|s| s.borrow_mut().take()) else { return Ok(()) };
    for id in side.get_ids().copied().collect::<Vec<_>>() {
        let g = side.get_id(id).cloned().expect("id listed by the store");
        let sum = match grads.get_id(id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(())
}

/// Add gradients of trainable weights that an op's backward computed itself to this thread's
/// side store, which [`merge_side_grads`] empties.
pub(crate) fn add_side_grads(grads: impl IntoIterator<Item = (Var, Tensor)>) -> Result<()> {
    SIDE.with(|s| -> Result<()> {
        let mut s = s.borrow_mut();
        let side = s.get_or_insert_with(GradStore::default);
        for (v, g) in grads {
            let sum = match side.get(v.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            side.insert(v.as_tensor(), sum);
        }
        Ok(())
    })
}

/// Drop side gradients left by an aborted backward.
pub fn clear_side_grads() {
    SIDE.with(|s| s.borrow_mut().take());
}

/// A block to checkpoint: the function and the trainable weights it reads.
pub type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

struct Recompute {
    f: Block,
    vars: Vec<Var>,
    /// The no-graph output, handed over once by the forward kernel.
    out: Precomputed,
    /// Dropout sub-stream key.
    key: u64,
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    precomputed_kernels!(_x, _anchor);

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = crate::rng::with_substream(self.key, x.device(), || (self.f)(xv.as_tensor()))?;
        let gs = (y * grad.detach())?.sum_all()?.backward()?;
        add_side_grads(self.vars.iter().filter_map(|v| Some((v.clone(), gs.get(v.as_tensor())?.clone()))))?;
        Ok((gs.get(xv.as_tensor()).cloned(), None))
    }
}

/// `f(x)` as one recomputed op (see the module docs). `vars` are the trainable weights `f`
/// reads; `anchor` a one-element trainable tensor on x's device.
pub fn checkpointed(f: Block, vars: Vec<Var>, anchor: &Var, x: &Tensor) -> Result<Tensor> {
    // The key is taken either way, as a plain block's run takes it ([`crate::rng::keyed`]):
    // the blocks after this one get the same keys with and without checkpointing.
    let key = crate::rng::next_key();
    if vars.is_empty() && !x.track_op() {
        return crate::rng::with_substream(key, x.device(), || f(x));
    }
    let xd = x.detach();
    let out = crate::rng::with_substream(key, x.device(), || no_grad(|| f(&xd)))?;
    let op = Recompute { f, vars, out: Precomputed::new(&out, out.dtype())?, key };
    x.apply_op2(anchor.as_tensor(), op)
}
