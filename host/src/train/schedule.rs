//! Learning-rate schedules, counted in optimizer steps (1-based): a linear warmup over the first
//! `warmup` steps (step s runs at s / warmup of the peak, so the first step already moves), then
//! the configured decay, which starts at the peak on the first step after warmup and reaches
//! (almost) zero on the last step; no step runs at an LR of exactly zero.

use crate::train_config::Scheduler;

/// The LR of optimizer step `step` (1-based).
pub fn lr_at(kind: Scheduler, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    let step = step.max(1);
    if warmup > 0 && step <= warmup {
        return base * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup - 1) as f64 / span).clamp(0.0, 1.0);
    match kind {
        Scheduler::Constant => base,
        Scheduler::Linear => base * (1.0 - progress),
        Scheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        // Meta's inverse-square-root: flat at the end of warmup, then ∝ 1/√step.
        Scheduler::InverseSqrt => base * (warmup.max(1) as f64 / step as f64).sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_in_optimizer_steps() {
        let c = |s| lr_at(Scheduler::Cosine, 1.0, s, 10, 110);
        assert_eq!(c(1), 0.1);
        assert_eq!(c(5), 0.5);
        assert_eq!(c(10), 1.0);
        assert_eq!(c(11), 1.0, "the peak right after warmup");
        assert!((c(61) - 0.5).abs() < 1e-12, "half-way through the decay");
        assert!(c(110) > 0.0 && c(110) < 1e-3, "the last step is near zero, not zero");
        let l = |s| lr_at(Scheduler::Linear, 2.0, s, 0, 100);
        assert_eq!(l(1), 2.0);
        assert!((l(51) - 1.0).abs() < 1e-12);
        assert_eq!(lr_at(Scheduler::Constant, 3.0, 77, 5, 100), 3.0);
        let r = |s| lr_at(Scheduler::InverseSqrt, 1.0, s, 4, 100);
        assert_eq!(r(4), 1.0);
        assert!((r(16) - 0.5).abs() < 1e-12);
        // No warmup: the first step already runs at the peak.
        assert_eq!(
            lr_at(Scheduler::Cosine, 1.0, 1, 0, 1000),
            lr_at(Scheduler::Cosine, 1.0, 1, 0, 1000).max(0.99)
        );
    }
}
