//! What the layer ops ([`super::vit_block`], [`super::detr_block`]) share: how a layer's LoRA
//! factors take part in the recorded op, and how their gradients leave it.
//!
//! A layer op runs its adapted linears unrecorded and computes their factors' gradients in its
//! own backward. Those gradients reach the trainer one of two ways:
//! - through candle's graph: the op takes every factor flattened and concatenated as one
//!   operand and returns their gradients concatenated the same way (a plain `loss.backward()`
//!   then holds every gradient);
//! - inside [`super::recompute::with_side_grads`] (the trainer, the bench): through the side
//!   store, which the caller merges after backward; the op then takes a one-element anchor
//!   instead, and candle's backward does not split the concatenation again (about six launches
//!   per factor: a narrow, a reshape and a zero-plus-add per gradient edge).

use candle_core::{Result, Tensor, Var};

use super::nn::Linear;

/// A layer's LoRA factors (A then B of each adapted linear, in the layer's order) and the way
/// their gradients leave its op.
pub(crate) struct OpFactors {
    /// The factors.
    pub vars: Vec<Var>,
    /// Their gradients go to the side store.
    pub side: bool,
}

impl OpFactors {
    /// The factors of `linears`' adapters, the way chosen by the caller's scope.
    pub(crate) fn of<'a>(linears: impl IntoIterator<Item = &'a Linear>) -> Self {
        let vars: Vec<Var> = linears
            .into_iter()
            .filter_map(|l| l.lora.as_ref())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect();
        let side = super::recompute::side_grads_active() && !vars.is_empty();
        OpFactors { vars, side }
    }

    /// The operand the op takes them as: every factor flattened and concatenated (f32), or
    /// `None` (no factors, or their gradients go to the side store).
    pub(crate) fn operand(&self) -> Result<Option<Tensor>> {
        if self.vars.is_empty() || self.side {
            return Ok(None);
        }
        let flat = self.vars.iter().map(|v| v.as_tensor().flatten_all()).collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&flat, 0)?))
    }

    /// The operand's gradient from the factor gradients the backward computed (a factor it
    /// computed none for gets zeros); `None` when they went to the side store (or there are
    /// no factors).
    pub(crate) fn gradient(&self, grads: Vec<(Var, Tensor)>) -> Result<Option<Tensor>> {
        if self.side {
            super::recompute::add_side_grads(grads)?;
            return Ok(None);
        }
        if self.vars.is_empty() {
            return Ok(None);
        }
        let flat = self
            .vars
            .iter()
            .map(|v| match grads.iter().find(|(g, _)| g.id() == v.id()) {
                Some((_, g)) => g.flatten_all(),
                None => v.as_detached_tensor().zeros_like()?.flatten_all(),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&flat, 0)?))
    }
}

/// Whether a layer op would differentiate nothing it must: none of `linears`' base weights and
/// biases and none of `norms` (weight, bias) is trainable (the op computes no gradient for
/// them; a trainable one keeps the op-by-op path).
pub(crate) fn frozen(linears: &[&Linear], norms: &[&super::nn::LayerNorm]) -> bool {
    let trainable =
        linears.iter().any(|l| l.weight.track_op() || l.bias.as_ref().is_some_and(|b| b.track_op()))
            || norms.iter().any(|n| n.weight.track_op() || n.bias.track_op());
    !trainable
}

/// Whether the layer records a graph: an operand is tracked, or it has LoRA factors to train
/// (outside [`super::recompute::no_grad`]).
pub(crate) fn records(operands: &[&Tensor], linears: &[&Linear]) -> bool {
    operands.iter().any(|t| t.track_op())
        || (!super::recompute::no_grad_active() && linears.iter().any(|l| l.lora.is_some()))
}

/// Whether an error's text says the device (or host) ran out of memory: a layer op's failure
/// that is passed on (the op-by-op graph needs more) instead of switching the op off.
pub(crate) fn out_of_memory(text: &str) -> bool {
    text.to_lowercase().contains("out of memory") || text.contains("OUT_OF_MEMORY")
}
