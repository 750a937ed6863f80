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
fn add_side_grads(grads: impl IntoIterator<Item = (Var, Tensor)>) -> Result<()> {
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
