//! Where a training step's time goes: wall time between marks (the model's components, the
//! loss, backward, the optimizer), with the device synchronised at each mark so GPU time is
//! charged to the part that queued it. Off unless a caller (`lorahost bench --profile`)
//! switches it on; synchronising costs the overlap of host and device, so profiled steps are
//! timed apart from the reported ones.

use crate::sam3::ops::{precomputed_kernels, Precomputed};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use std::cell::RefCell;
use std::time::Instant;

struct Profiler {
    device: Device,
    last: Instant,
    /// (part, total seconds, marks), in first-seen order.
    parts: Vec<(String, f64, u32)>,
    /// Operations timed inside the parts ([`inner`]): (label, total seconds, calls).
    inner: Vec<(String, f64, u32)>,
}

/// What a profile found: the parts a step's time splits into (mean seconds per step) and, inside
/// them, the time of some operations (mean seconds per step and calls per step).
#[derive(Debug, Default)]
pub struct Report {
    /// (part, seconds per step), in the order the parts ran.
    pub parts: Vec<(String, f64)>,
    /// (operation, seconds per step, calls per step), the most expensive first.
    pub inner: Vec<(String, f64, f64)>,
}

fn add(table: &mut Vec<(String, f64, u32)>, key: &str, dt: f64) {
    match table.iter_mut().find(|e| e.0 == key) {
        Some(e) => {
            e.1 += dt;
            e.2 += 1;
        }
        None => table.push((key.to_string(), dt, 1)),
    }
}

thread_local! {
    /// Per thread: the step (forward and backward) runs on the thread that profiles it.
    static PROFILER: RefCell<Option<Profiler>> = const { RefCell::new(None) };
}

/// Start profiling this thread's work on `device` (clears what was recorded).
pub fn enable(device: &Device) {
    PROFILER.with_borrow_mut(|p| {
        *p = Some(Profiler {
            device: device.clone(),
            last: Instant::now(),
            parts: Vec::new(),
            inner: Vec::new(),
        })
    });
}

/// Stop profiling after `steps` profiled steps; what was recorded, per step.
pub fn disable(steps: usize) -> Report {
    let Some(p) = PROFILER.with_borrow_mut(|p| p.take()) else { return Report::default() };
    let n = steps.max(1) as f64;
    let mut inner: Vec<(String, f64, f64)> =
        p.inner.into_iter().map(|(k, s, c)| (k, s / n, c as f64 / n)).collect();
    inner.sort_by(|a, b| b.1.total_cmp(&a.1));
    Report { parts: p.parts.into_iter().map(|(k, s, _)| (k, s / n)).collect(), inner }
}

/// Whether a profile is being recorded.
pub fn enabled() -> bool {
    PROFILER.with_borrow(|p| p.is_some())
}

/// Run `f`, and when profiling add its time (device synchronised before and after) to the
/// operation `label` (the enclosing part's time still includes it).
pub fn inner<T>(label: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t0 = sync_now();
    let out = f();
    let dt = sync_now().duration_since(t0).as_secs_f64();
    let label = label();
    with(|p| add(&mut p.inner, &label, dt));
    out
}

fn sync_now() -> Instant {
    let device = PROFILER.with_borrow(|p| p.as_ref().map(|p| p.device.clone()));
    if let Some(d) = device {
        let _ = d.synchronize();
    }
    Instant::now()
}

/// The identity on `t`; when profiling and `t` is tracked, its backward [`mark`]s `part`:
/// backward reaching `t` ends that part (e.g. everything downstream of the vision features).
pub fn backward_mark(t: &Tensor, part: &'static str) -> Result<Tensor> {
    if !t.track_op() || !enabled() {
        return Ok(t.clone());
    }
    let out = Precomputed::new(t, t.dtype())?;
    t.apply_op1(BackwardMark { part, out })
}

struct BackwardMark {
    part: &'static str,
    out: Precomputed,
}

impl CustomOp1 for BackwardMark {
    fn name(&self) -> &'static str {
        "profile-mark"
    }

    precomputed_kernels!(_x);

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        mark(self.part);
        Ok(Some(grad_res.clone()))
    }
}

/// Restart the clock without charging anything (the start of a step).
pub fn restart() {
    with(|p| {
        let _ = p.device.synchronize();
        p.last = Instant::now();
    })
}

/// Charge the time since the previous mark to `part` (no-op unless profiling).
pub fn mark(part: &str) {
    with(|p| {
        let _ = p.device.synchronize();
        let now = Instant::now();
        let dt = now.duration_since(p.last).as_secs_f64();
        p.last = now;
        add(&mut p.parts, part, dt);
    })
}

fn with(f: impl FnOnce(&mut Profiler)) {
    PROFILER.with_borrow_mut(|p| {
        if let Some(p) = p.as_mut() {
            f(p)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::Var;

    /// Parts are charged the time between marks, per step, in order; inner operations are
    /// timed and counted; a backward mark fires when backward reaches its tensor; nothing is
    /// recorded while off.
    #[test]
    fn charges_time_between_marks() -> Result<()> {
        let x = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
        mark("ignored");
        assert!(!backward_mark(x.as_tensor(), "never")?.track_op() || !enabled());
        enable(&Device::Cpu);
        let pause = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
        for _ in 0..2 {
            restart();
            pause(20);
            mark("slow");
            inner(|| "nap".into(), || pause(5));
            mark("fast");
            let y = (backward_mark(&(x.as_tensor() * 3.0)?, "late backward")? * 2.0)?;
            let g = y.sum_all()?.backward()?;
            // The mark is the identity: d(6x)/dx = 6.
            assert_eq!(g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, [6.0, 6.0]);
        }
        let r = disable(2);
        let names: Vec<&str> = r.parts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(names, ["slow", "fast", "late backward"]);
        assert!(r.parts[0].1 >= 0.02 && r.parts[0].1 < 1.0, "{r:?}");
        assert!(r.parts[1].1 >= 0.005 && r.parts[1].1 < r.parts[0].1, "{r:?}");
        assert_eq!(r.inner.len(), 1);
        assert!(r.inner[0].0 == "nap" && r.inner[0].1 >= 0.005 && r.inner[0].2 == 1.0, "{r:?}");
        assert!(disable(1).parts.is_empty());
        Ok(())
    }
}
