//! The CUDA device as training uses it: opened once per process with settings that suit one
//! stream and a training loop's allocation pattern, plus the memory pool's peak counters
//! (what `lorahost bench` reports, the counterpart of PyTorch's `max_memory_allocated`).
//!
//! candle allocates through cudarc with stream-ordered `cuMemAllocAsync` from the device's
//! memory pool. Two defaults of that stack cost time in a training loop:
//! - the pool's release threshold is 0: at every synchronisation (each step has a few: the
//!   loss read-back, gradient statistics) the pool returns its free memory to the driver, and
//!   the next step maps it again. lorahost sets the threshold to "never", so freed memory
//!   stays cached for reuse the way PyTorch's caching allocator keeps it.
//! - cudarc creates (and destroys) two CUDA events per allocation to order work between
//!   streams. lorahost runs one stream, where the events are never recorded: pure per-op
//!   overhead, switched off.
//!
//! Both are best effort: if the driver refuses, training runs with the defaults (logged).

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Open CUDA device `ordinal` for lorahost (see the module docs); `what` names the setting
/// that asked for CUDA in the error of a build without CUDA support.
pub fn open_cuda(ordinal: usize, what: &str) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "{what}: this lorahost was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (see ../shared/gpu/README.md) or use the CPU"
        );
    }
    let device = Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
    configure(&device);
    #[cfg(feature = "cuda")]
    crate::cuda_kernels::precompile();
    Ok(device)
}

/// Peak bytes of device memory in use by tensors since the last [`reset_peak`] (the memory
/// pool's high-water mark of allocated memory), and the peak reserved by the pool (allocated
/// plus cached). `None` on the CPU or when the driver does not report them.
pub fn peak_memory(device: &Device) -> Option<(u64, u64)> {
    imp::peak(device)
}

/// Reset the counters [`peak_memory`] reads.
pub fn reset_peak(device: &Device) {
    imp::reset(device)
}

fn configure(device: &Device) {
    if let Err(e) = imp::configure(device) {
        tracing::warn!("CUDA memory pool left at its defaults: {e}");
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    /// The memory pool the device's allocations come from.
    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = device else { return None };
        let cu_device = d.cuda_stream().context().cu_device();
        // SAFETY: `cu_device` comes from a live context.
        unsafe { result::device::get_mem_pool(cu_device) }.ok()
    }

    fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: these attributes are cuuint64_t values.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }.ok()?;
        Some(v)
    }

    fn set(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<(), String> {
        // SAFETY: these attributes are cuuint64_t values.
        unsafe { result::mem_pool::set_attribute(pool, attr, (&mut v as *mut u64).cast()) }
            .map_err(|e| format!("{attr:?}: {e}"))
    }

    pub fn configure(device: &Device) -> Result<(), String> {
        let Device::Cuda(d) = device else { return Ok(()) };
        // SAFETY: lorahost runs all device work on this device's one stream, so no allocation
        // is ever used on another stream; the events only order multi-stream work.
        unsafe { d.disable_event_tracking() };
        let pool = pool(device).ok_or("no memory pool")?;
        set(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
    }

    pub fn peak(device: &Device) -> Option<(u64, u64)> {
        let pool = pool(device)?;
        Some((
            get(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            get(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        ))
    }

    pub fn reset(device: &Device) {
        if let Some(pool) = pool(device) {
            // Only 0 is accepted: the high-water marks restart from the current use.
            let _ = set(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
            let _ = set(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0);
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    pub fn configure(_: &Device) -> Result<(), String> {
        Ok(())
    }

    pub fn peak(_: &Device) -> Option<(u64, u64)> {
        None
    }

    pub fn reset(_: &Device) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI): asking for CUDA fails with an error naming the setting and the fix,
    /// and the counters report nothing on the CPU.
    #[test]
    fn cpu_only_behaviour() {
        if candle_core::utils::cuda_is_available() {
            return;
        }
        let e = open_cuda(0, "hardware.device is cuda").unwrap_err().to_string();
        assert!(e.contains("hardware.device is cuda") && e.contains("--features cuda"), "{e}");
        assert!(peak_memory(&Device::Cpu).is_none());
        reset_peak(&Device::Cpu);
    }
}
