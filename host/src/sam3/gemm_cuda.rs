//! The linear layers' forward on cuBLASLt (CUDA, bf16): `act(x)·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`
//! as two matrix products into the output, without the adapter's output or the bias sum as
//! passes of their own.
//!
//! Composed, an adapted linear writes `y = act(x)·Wᵀ` and the adapter's `z = h·(sB)ᵀ`
//! (`h = drop(act(x))·Aᵀ`, rank r), then reads both back to write `y + b + z`: at SAM3's batch 2
//! (10,368 ViT tokens) three extra activation-sized passes per 1024-wide layer and per
//! 4736-wide fc1. Here the first product writes `h·(sB)ᵀ` straight into the output and the
//! second accumulates `act(x)·Wᵀ + b` onto it (β = 1, cuBLASLt's bias epilogue): one write and
//! one read of the output beyond the main product. A frozen linear without an adapter gets the
//! bias epilogue alone.
//!
//! Row-major `out (N, O) = x (N, K) · Wᵀ` is, in cuBLAS's column-major terms,
//! `outᵀ (O × N, ld O) = op(W) · xᵀ` with W read as a K × O matrix transposed (ld K) and x as
//! K × N (ld K); the bias is one value per output row of that product, O of them.
//!
//! The first use in a process is checked against the composed f32 computation on the GPU
//! (a few small products); a disagreement or an error leaves the layers on the composed path,
//! with a warning. `LORAHOST_CUBLASLT=0` switches it off (A/B timings).

use candle_core::{Result, Tensor};

/// Whether the cuBLASLt path serves an untracked computation on `x` (CUDA, bf16, on and checked).
pub fn serves(x: &Tensor) -> bool {
    imp::serves(x)
}

/// `xa·Wᵀ + bias + h·sbᵀ` (the last term when `lowrank` is given as `(h, sb)`) for 2-D
/// contiguous bf16 CUDA tensors: xa (N, K), w (O, K), bias (O), h (N, r), sb (O, r).
pub fn linear(
    xa: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lowrank: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    imp::linear(xa, w, bias, lowrank)
}

/// [`linear`] written into a fresh storage (a recorded op's precomputed output).
pub fn linear_storage(
    xa: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lowrank: Option<(&Tensor, &Tensor)>,
) -> Result<candle_core::Storage> {
    imp::linear_storage(xa, w, bias, lowrank)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor) -> bool {
        false
    }

    pub fn linear(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        candle_core::bail!("cuBLASLt linear: built without CUDA")
    }

    pub fn linear_storage(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<(&Tensor, &Tensor)>,
    ) -> Result<candle_core::Storage> {
        candle_core::bail!("cuBLASLt linear: built without CUDA")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::cuda_kernels::device_address;
    use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    use candle_core::cuda_backend::cudarc::driver::{
        sys::CUdeviceptr, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
    };
    use candle_core::{DType, Device, Result, Tensor};
    use std::marker::PhantomData;
    use std::sync::{Arc, Mutex, OnceLock};

    /// A device address as cudarc's matmul reads it: every operand lives on the one stream
    /// candle issues everything to, so no event is recorded or waited for.
    struct Raw<T> {
        ptr: u64,
        len: usize,
        stream: Arc<CudaStream>,
        _t: PhantomData<T>,
    }

    impl<T> DeviceSlice<T> for Raw<T> {
        fn len(&self) -> usize {
            self.len
        }
        fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }
    }

    impl<T> DevicePtr<T> for Raw<T> {
        fn device_ptr<'a>(&'a self, _: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
            (self.ptr, SyncOnDrop::Sync(None))
        }
    }

    impl<T> DevicePtrMut<T> for Raw<T> {
        fn device_ptr_mut<'a>(&'a mut self, _: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
            (self.ptr, SyncOnDrop::Sync(None))
        }
    }

    /// A cuBLASLt status as a candle error.
    fn lt_error(e: candle_core::cuda_backend::cudarc::cublaslt::result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
    }

    /// The cuBLASLt handle (with its workspace) of the device candle uses.
    fn handle(dev: &candle_core::CudaDevice) -> Result<Arc<CudaBlasLT>> {
        type Handles = Vec<(candle_core::cuda_backend::DeviceId, Arc<CudaBlasLT>)>;
        static HANDLES: OnceLock<Mutex<Handles>> = OnceLock::new();
        let mut handles =
            HANDLES.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, h)) = handles.iter().find(|(id, _)| *id == dev.id()) {
            return Ok(h.clone());
        }
        let h = Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(lt_error)?);
        handles.push((dev.id(), h.clone()));
        Ok(h)
    }

    /// Checked once per process, see the module docs.
    static READY: OnceLock<bool> = OnceLock::new();

    pub fn serves(x: &Tensor) -> bool {
        if x.dtype() != DType::BF16 || !x.device().is_cuda() {
            return false;
        }
        if std::env::var("LORAHOST_CUBLASLT").is_ok_and(|v| v == "0") {
            return false;
        }
        *READY.get_or_init(|| match probe(x.device()) {
            Ok(None) => {
                tracing::info!("cuBLASLt linear checked on the GPU: in use");
                true
            }
            Ok(Some(why)) => {
                tracing::warn!(
                    "cuBLASLt linear disagrees with the composed one on this GPU ({why}); not used"
                );
                false
            }
            Err(e) => {
                tracing::warn!("cuBLASLt linear failed on this GPU ({e}); not used");
                false
            }
        })
    }

    /// Odd sizes against the composed f32 computation, with and without the low-rank term.
    fn probe(device: &Device) -> Result<Option<String>> {
        let (n, k, o, r) = (37, 48, 40, 8);
        let draw = |shape: &[usize], seed: f64| -> Result<Tensor> {
            let count: usize = shape.iter().product();
            let v: Vec<f32> = (0..count).map(|i| ((i as f64 * 0.37 + seed).sin() * 0.5) as f32).collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(DType::BF16)
        };
        let (x, w, b, h, sb) = (
            draw(&[n, k], 1.0)?,
            draw(&[o, k], 2.0)?,
            draw(&[o], 3.0)?,
            draw(&[n, r], 4.0)?,
            draw(&[o, r], 5.0)?,
        );
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let base = f(&x)?.matmul(&f(&w)?.t()?)?.broadcast_add(&f(&b)?)?;
        for lowrank in [false, true] {
            let want = if lowrank { (&base + f(&h)?.matmul(&f(&sb)?.t()?)?)? } else { base.clone() };
            let got = linear(&x, &w, Some(&b), lowrank.then_some((&h, &sb)))?.to_dtype(DType::F32)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            if err.is_nan() || err > 1e-2 {
                return Ok(Some(format!("relative error {err:.2e} (low-rank term: {lowrank})")));
            }
        }
        Ok(None)
    }

    /// Validate the operands; (N, K, O) and the low-rank rank.
    fn dims(
        xa: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        lowrank: Option<(&Tensor, &Tensor)>,
    ) -> Result<(usize, usize, usize)> {
        let (n, k) = xa.dims2()?;
        let (o, k2) = w.dims2()?;
        let mut ok = k == k2 && xa.is_contiguous() && w.is_contiguous();
        ok &= [xa, w].iter().all(|t| t.dtype() == DType::BF16);
        if let Some(b) = bias {
            ok &= b.elem_count() == o && b.is_contiguous() && b.dtype() == DType::BF16;
        }
        if let Some((h, sb)) = lowrank {
            let (hn, r) = h.dims2()?;
            let (so, r2) = sb.dims2()?;
            ok &= hn == n && so == o && r == r2 && h.is_contiguous() && sb.is_contiguous();
            ok &= h.dtype() == DType::BF16 && sb.dtype() == DType::BF16;
        }
        if !ok {
            candle_core::bail!(
                "cuBLASLt linear: operands x {:?} {:?}, w {:?}, bias {:?}, low-rank {:?}",
                xa.shape(),
                xa.dtype(),
                w.shape(),
                bias.map(|b| b.shape().clone()),
                lowrank.map(|(h, sb)| (h.shape().clone(), sb.shape().clone()))
            );
        }
        Ok((n, k, o))
    }

    /// The products into `dst` (N·O bf16 elements).
    fn linear_into(
        xa: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        lowrank: Option<(&Tensor, &Tensor)>,
        dst: u64,
    ) -> Result<()> {
        let (n, k, o) = dims(xa, w, bias, lowrank)?;
        if n == 0 || o == 0 {
            return Ok(());
        }
        let Device::Cuda(dev) = xa.device() else { candle_core::bail!("cuBLASLt linear: not on the GPU") };
        let lt = handle(dev)?;
        let stream = dev.cuda_stream();
        let raw = |t: &Tensor| -> Result<Raw<half::bf16>> {
            Ok(Raw { ptr: device_address(t)?, len: t.elem_count(), stream: stream.clone(), _t: PhantomData })
        };
        let mut out = Raw::<half::bf16> { ptr: dst, len: n * o, stream: stream.clone(), _t: PhantomData };
        // outᵀ (O × N) = op(A)·B with A a K × O matrix read transposed: W (or sB), B = xᵀ (or hᵀ).
        let cfg = |k: usize, beta: f32| MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: o as u64,
            n: n as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta,
            ldc: o as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let mut beta = 0.0;
        if let Some((h, sb)) = lowrank {
            let r = h.dim(1)?;
            // SAFETY: the addresses are of live contiguous tensors of the sizes the config
            // describes (checked above), on the stream the products are queued to.
            unsafe { lt.matmul(cfg(r, 0.0), &raw(sb)?, &raw(h)?, &mut out, None, None) }.map_err(lt_error)?;
            beta = 1.0;
        }
        let bias = bias.map(raw).transpose()?;
        // SAFETY: as above; with β = 1 the output holds the low-rank term written just before.
        unsafe { lt.matmul(cfg(k, beta), &raw(w)?, &raw(xa)?, &mut out, bias.as_ref(), None) }
            .map_err(lt_error)?;
        Ok(())
    }

    pub fn linear(
        xa: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        lowrank: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (n, _, o) = dims(xa, w, bias, lowrank)?;
        let out = crate::cuda_kernels::uninit(xa, &[n, o], DType::BF16)?;
        linear_into(xa, w, bias, lowrank, device_address(&out)?)?;
        Ok(out)
    }

    pub fn linear_storage(
        xa: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        lowrank: Option<(&Tensor, &Tensor)>,
    ) -> Result<candle_core::Storage> {
        let (n, _, o) = dims(xa, w, bias, lowrank)?;
        let Device::Cuda(dev) = xa.device() else { candle_core::bail!("cuBLASLt linear: not on the GPU") };
        // SAFETY: the products write all N·O elements before anything reads them.
        let slice = unsafe { dev.alloc::<half::bf16>(n * o)? };
        let addr = slice.device_ptr(&dev.cuda_stream()).0;
        linear_into(xa, w, bias, lowrank, addr)?;
        Ok(candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(slice, dev.clone())))
    }
}
