//! Where a training step's time goes: the time between marks (the model's components, the
//! loss, backward, the optimizer) and of some operations inside them, each twice: on the host
//! (the time to issue the work) and on the device.
//!
//! On the CPU the two are the same wall time. On CUDA the device's clock is read from events
//! recorded on the stream at each mark and around each operation, resolved once at the end, so
//! profiling does not synchronise the device between operations: the host keeps running ahead
//! as it does in an unprofiled step, and the device times are what the kernels took (plus any
//! time the device sat idle waiting for the host, which the host times reveal: a part whose host
//! time exceeds its device time is bound by the host). Off unless a caller (`lorahost bench
//! --profile`) switches it on; profiled steps are timed apart from the reported ones.

use crate::sam3::ops::{precomputed_kernels, Precomputed};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use std::cell::RefCell;
use std::time::Instant;

/// A point in the step: the host's clock and, on CUDA, an event recorded on the stream (shared
/// by the span it ends and the one it starts).
#[derive(Clone)]
struct Stamp {
    host: Instant,
    #[cfg(feature = "cuda")]
    event: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaEvent>>,
}

impl Stamp {
    fn now(device: &Device) -> Stamp {
        #[cfg(feature = "cuda")]
        let event = match device {
            Device::Cuda(d) => {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                d.cuda_stream()
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .ok()
                    .map(std::sync::Arc::new)
            }
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Stamp {
            host: Instant::now(),
            #[cfg(feature = "cuda")]
            event,
        }
    }

    /// Seconds from `self` to `end`: (host, device). The device's time is the host's where no
    /// events were recorded (the CPU); call only after the device finished the work.
    fn until(&self, end: &Stamp) -> (f64, f64) {
        let host = end.host.duration_since(self.host).as_secs_f64();
        #[cfg(feature = "cuda")]
        if let (Some(a), Some(b)) = (&self.event, &end.event) {
            if let Ok(ms) = a.elapsed_ms(b) {
                return (host, ms as f64 * 1e-3);
            }
        }
        (host, host)
    }
}

/// A span waiting for its times: (label, start, end).
type Span = (String, Stamp, Stamp);

struct Profiler {
    device: Device,
    last: Stamp,
    /// Parts in first-seen order, and operations ([`inner`]), still to resolve.
    parts: Vec<Span>,
    inner: Vec<Span>,
}

/// One row of a [`Report`]: per step, the mean seconds on the device and on the host, and the
/// calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// The part or operation.
    pub name: String,
    /// Seconds per step on the device (on the CPU: wall time).
    pub device_s: f64,
    /// Seconds per step the host spent issuing it (on the CPU: wall time).
    pub host_s: f64,
    /// Calls (marks) per step.
    pub calls: f64,
}

/// What a profile found: the parts a step's time splits into, in the order they ran, and
/// inside them the time of some operations, the most expensive (on the device) first.
#[derive(Debug, Default)]
pub struct Report {
    /// The parts of a step.
    pub parts: Vec<Timing>,
    /// Operations timed inside the parts.
    pub inner: Vec<Timing>,
}

/// Sum resolved spans by label, in first-seen order, per step.
fn tally(spans: Vec<Span>, steps: f64) -> Vec<Timing> {
    let mut out: Vec<Timing> = Vec::new();
    for (name, a, b) in spans {
        let (host, dev) = a.until(&b);
        match out.iter_mut().find(|t| t.name == name) {
            Some(t) => {
                t.device_s += dev;
                t.host_s += host;
                t.calls += 1.0;
            }
            None => out.push(Timing { name, device_s: dev, host_s: host, calls: 1.0 }),
        }
    }
    for t in &mut out {
        t.device_s /= steps;
        t.host_s /= steps;
        t.calls /= steps;
    }
    out
}

thread_local! {
    /// Per thread: the step (forward and backward) runs on the thread that profiles it.
    static PROFILER: RefCell<Option<Profiler>> = const { RefCell::new(None) };
}

/// Start profiling this thread's work on `device` (clears what was recorded).
pub fn enable(device: &Device) {
    let _ = device.synchronize();
    PROFILER.with_borrow_mut(|p| {
        *p = Some(Profiler {
            device: device.clone(),
            last: Stamp::now(device),
            parts: Vec::new(),
            inner: Vec::new(),
        })
    });
}

/// Stop profiling after `steps` profiled steps (synchronises the device); what was recorded,
/// per step.
pub fn disable(steps: usize) -> Report {
    let Some(p) = PROFILER.with_borrow_mut(|p| p.take()) else { return Report::default() };
    let _ = p.device.synchronize();
    let n = steps.max(1) as f64;
    let mut inner = tally(p.inner, n);
    inner.sort_by(|a, b| b.device_s.total_cmp(&a.device_s));
    Report { parts: tally(p.parts, n), inner }
}

/// Whether a profile is being recorded.
pub fn enabled() -> bool {
    PROFILER.with_borrow(|p| p.is_some())
}

/// Run `f`, and when profiling add its time to the operation `label` (the enclosing part's
/// time still includes it).
pub fn inner<T>(label: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    let Some(device) = PROFILER.with_borrow(|p| p.as_ref().map(|p| p.device.clone())) else {
        return f();
    };
    let t0 = Stamp::now(&device);
    let out = f();
    let t1 = Stamp::now(&device);
    let label = label();
    with(|p| p.inner.push((label, t0, t1)));
    out
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
    with(|p| p.last = Stamp::now(&p.device))
}

/// Charge the time since the previous mark to `part` (no-op unless profiling).
pub fn mark(part: &str) {
    with(|p| {
        let now = Stamp::now(&p.device);
        let last = std::mem::replace(&mut p.last, now.clone());
        p.parts.push((part.to_string(), last, now));
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
        let names: Vec<&str> = r.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["slow", "fast", "late backward"]);
        assert!(r.parts.iter().all(|p| p.calls == 1.0 && p.device_s == p.host_s), "{r:?}");
        assert!(r.parts[0].device_s >= 0.02 && r.parts[0].device_s < 1.0, "{r:?}");
        assert!(r.parts[1].device_s >= 0.005 && r.parts[1].device_s < r.parts[0].device_s, "{r:?}");
        assert_eq!(r.inner.len(), 1);
        let nap = &r.inner[0];
        assert!(nap.name == "nap" && nap.device_s >= 0.005 && nap.calls == 1.0, "{r:?}");
        assert!(disable(1).parts.is_empty());
        Ok(())
    }
}
