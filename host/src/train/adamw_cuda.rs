//! AdamW over all of a step's parameters in one CUDA kernel launch (PyTorch's "fused"/"foreach"
//! AdamW): the composed update is about 17 candle operations per parameter, each with its own
//! allocation and launch, which for SAM3's ~730 LoRA tensors costs more time in launches than
//! the arithmetic. The kernel reads a table of per-parameter addresses and bias corrections,
//! updates each parameter in place, writes the new moments into two flat buffers (the old
//! moments stay untouched for a rollback) and a copy of the old parameters into a third. Same
//! arithmetic as the composed path (f32, same order of operations), up to rounding.
//! `LORAHOST_FUSED_ADAMW=0` switches it off (for A/B timings).

use candle_core::{Result, Tensor};

/// One parameter's update: the parameter (updated in place), its gradient and moments (f32,
/// contiguous, the parameter's shape) and its bias corrections 1 − βᵗ.
pub struct Entry<'a> {
    /// The parameter.
    pub param: &'a Tensor,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// First moment before the step.
    pub m: &'a Tensor,
    /// Second moment before the step.
    pub v: &'a Tensor,
    /// 1 − β1ᵗ.
    pub bc1: f64,
    /// 1 − β2ᵗ.
    pub bc2: f64,
}

/// The step's scalars.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Factor on every gradient (clipping), applied inside the kernel.
    pub grad_scale: f64,
}

/// What the fused step wrote: the new moments and the old parameters, each flat (the entries'
/// elements one after another, in order); entry `i` is at `offsets[i]`.
pub struct Fused {
    /// New first moments.
    pub m: Tensor,
    /// New second moments.
    pub v: Tensor,
    /// The parameters before the step.
    pub params_before: Tensor,
    /// Start of each entry in the flat buffers.
    pub offsets: Vec<usize>,
}

/// Whether the fused kernel serves `param`: an f32 CUDA tensor, with the kernel compiled.
pub fn serves(param: &Tensor) -> bool {
    imp::serves(param)
}

/// Run the fused step over `entries` (all where [`serves`] holds).
pub fn step(entries: &[Entry], h: Hyper) -> Result<Fused> {
    imp::step(entries, h)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{Entry, Fused, Hyper};
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor) -> bool {
        false
    }

    pub fn step(_: &[Entry], _: Hyper) -> Result<Fused> {
        candle_core::bail!("fused AdamW: built without CUDA")
    }
}

/// Compile the kernels now (see [`crate::cuda_kernels::precompile`]).
#[cfg(feature = "cuda")]
pub fn prepare() {
    imp::prepare()
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{Entry, Fused, Hyper};
    use crate::cuda_kernels::{device_address, launch, uninit, Arg};
    use candle_core::{DType, Result, Tensor};

    const SOURCE: &str = r#"
// table: 8 values per parameter: param, grad, m, v (addresses), n, offset in the flat outputs,
// 1/bc1 and 1/bc2 (f64 bits).
extern "C" __global__ void adamw_step(const long long* table, int count, unsigned long long m_out,
        unsigned long long v_out, unsigned long long p_before, float lr, float beta1, float beta2,
        float eps, float decay, float gscale) {
    const int t = blockIdx.y;
    if (t >= count) return;
    const long long* r = table + 8 * t;
    float* p = (float*)r[0];
    const float* g = (const float*)r[1];
    const float* m = (const float*)r[2];
    const float* v = (const float*)r[3];
    const long long n = r[4], off = r[5];
    const float ibc1 = (float)__longlong_as_double(r[6]);
    const float ibc2 = (float)__longlong_as_double(r[7]);
    float* mo = (float*)m_out + off;
    float* vo = (float*)v_out + off;
    float* pb = (float*)p_before + off;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * gscale;
        const float pi = p[i];
        const float mi = m[i] * beta1 + gi * (1.f - beta1);
        const float vi = v[i] * beta2 + (gi * gi) * (1.f - beta2);
        mo[i] = mi;
        vo[i] = vi;
        pb[i] = pi;
        const float mhat = mi * ibc1;
        const float denom = sqrtf(vi * ibc2) + eps;
        p[i] = pi * decay - (mhat / denom) * lr;
    }
}
"#;

    pub fn prepare() {
        let _ = ptx();
    }

    static KERNELS: crate::cuda_kernels::KernelSet =
        crate::cuda_kernels::KernelSet::new("AdamW", "LORAHOST_FUSED_ADAMW", &[SOURCE]);

    /// The compiled PTX, or None (logged once) when the kernels cannot be used.
    fn ptx() -> Option<&'static str> {
        KERNELS.ptx()
    }

    pub fn serves(param: &Tensor) -> bool {
        param.device().is_cuda() && param.dtype() == DType::F32 && ptx().is_some()
    }

    pub fn step(entries: &[Entry], h: Hyper) -> Result<Fused> {
        let Some(first) = entries.first() else { candle_core::bail!("fused AdamW: no parameters") };
        if entries.len() > 65_535 {
            candle_core::bail!(
                "fused AdamW: {} parameters (one grid row each, at most 65535)",
                entries.len()
            );
        }
        let device = first.param.device().clone();
        let Some(ptx) = ptx() else { candle_core::bail!("fused AdamW: kernel unavailable") };
        let mut offsets = Vec::with_capacity(entries.len());
        let mut total = 0usize;
        let mut max_n = 1usize;
        for e in entries {
            let n = e.param.elem_count();
            for (what, t) in [("gradient", e.grad), ("first moment", e.m), ("second moment", e.v)] {
                if t.elem_count() != n || t.dtype() != DType::F32 {
                    candle_core::bail!(
                        "fused AdamW: {what} {:?} {:?} for parameter {:?}",
                        t.shape(),
                        t.dtype(),
                        e.param.shape()
                    );
                }
            }
            offsets.push(total);
            total += n;
            max_n = max_n.max(n);
        }
        // Contiguous operands (no-ops for the usual ones); kept alive until the launch is queued.
        let grads: Vec<Tensor> = entries.iter().map(|e| e.grad.contiguous()).collect::<Result<_>>()?;
        let ms: Vec<Tensor> = entries.iter().map(|e| e.m.contiguous()).collect::<Result<_>>()?;
        let vs: Vec<Tensor> = entries.iter().map(|e| e.v.contiguous()).collect::<Result<_>>()?;
        let mut table: Vec<i64> = Vec::with_capacity(entries.len() * 8);
        for (i, e) in entries.iter().enumerate() {
            if !e.param.is_contiguous() {
                candle_core::bail!("fused AdamW: parameter {:?} is not contiguous", e.param.shape());
            }
            table.extend_from_slice(&[
                device_address(e.param)? as i64,
                device_address(&grads[i])? as i64,
                device_address(&ms[i])? as i64,
                device_address(&vs[i])? as i64,
                e.param.elem_count() as i64,
                offsets[i] as i64,
                (1.0 / e.bc1).to_bits() as i64,
                (1.0 / e.bc2).to_bits() as i64,
            ]);
        }
        let table = Tensor::from_vec(table, entries.len() * 8, &device)?;
        // Not zeroed: the kernel writes every element of the three (the entries tile them).
        let m_out = uninit(&table, &[total], DType::F32)?;
        let v_out = uninit(&table, &[total], DType::F32)?;
        let before = uninit(&table, &[total], DType::F32)?;
        let f = |x: f64| Arg::f32(x as f32);
        let args = [
            Arg(device_address(&table)?),
            Arg::i32(entries.len() as i32),
            Arg(device_address(&m_out)?),
            Arg(device_address(&v_out)?),
            Arg(device_address(&before)?),
            f(h.lr),
            f(h.beta1),
            f(h.beta2),
            f(h.eps),
            f(1.0 - h.lr * h.weight_decay),
            f(h.grad_scale),
        ];
        let threads = 256usize;
        let blocks_x = max_n.div_ceil(threads * 4).clamp(1, 64);
        // Every address in the table points at a live f32 buffer of at least n elements
        // (checked above); the flat outputs hold `total`.
        launch(
            &device,
            "lorahost_adamw",
            ptx,
            "adamw_step",
            (blocks_x as u32, entries.len() as u32, 1),
            threads as u32,
            &args,
        )?;
        Ok(Fused { m: m_out, v: v_out, params_before: before, offsets })
    }
}
