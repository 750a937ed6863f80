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
//! Each product's descriptors and algorithm (cuBLASLt's heuristic, told the operands' actual
//! address alignments) are made once per shape and kept for the process, so a step pays one
//! `cublasLtMatmul` call per product on the host, as candle's cuBLAS products do.
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

/// `alpha · xᵀ·y` in f32 for 2-D contiguous bf16 CUDA tensors x (N, M) and y (N, P): an
/// adapter factor's gradient (`dA = gᵀ·drop(x)`, `dB = s·dyᵀ·h`) as one cuBLASLt product with the
/// scale and the cast to the factor's f32 folded in (composed: the product, a scaling pass and a
/// cast, three launches per factor). Only where [`grad_serves`] holds.
pub fn grad_product(x: &Tensor, y: &Tensor, alpha: f64) -> Result<Tensor> {
    imp::grad_product(x, y, alpha)
}

/// Whether [`grad_product`] serves operands like `x` (CUDA, bf16, on and checked once against
/// the composed f32 product).
pub fn grad_serves(x: &Tensor) -> bool {
    imp::grad_serves(x)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub fn serves(_: &Tensor) -> bool {
        false
    }

    pub fn grad_serves(_: &Tensor) -> bool {
        false
    }

    pub fn grad_product(_: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
        candle_core::bail!("cuBLASLt gradient product: built without CUDA")
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
    use candle_core::cuda_backend::cudarc::cublaslt as lt;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{DType, Device, Result, Tensor};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use lt::sys;

    /// A cuBLASLt status as a candle error.
    fn lt_error(e: lt::result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
    }

    /// What a product's plan depends on: the shape (outᵀ (m × n) = op(A)·B, inner size k),
    /// whether β is 1 and a bias is added, and the operands' address alignments (A, B, C/D).
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        m: u64,
        n: u64,
        k: u64,
        accumulate: bool,
        bias: bool,
        align: [u32; 3],
        /// A gradient product ([`super::grad_product`]): outᵀ (m × n, f32) = A·op(B) with A an
        /// m × k matrix as stored (ld m) and B an n × k matrix read transposed (ld n).
        grad: bool,
    }

    /// A product's descriptors and the algorithm cuBLASLt's heuristic chose for them, made once
    /// per key: the heuristic query and the descriptors cost host time a step would otherwise
    /// pay for every linear layer.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        c: sys::cublasLtMatrixLayout_t,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    /// One device's cuBLASLt handle, workspace and plans (kept for the process).
    struct Lt {
        device: candle_core::cuda_backend::DeviceId,
        handle: sys::cublasLtHandle_t,
        workspace: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
        plans: HashMap<Key, Plan>,
    }

    // SAFETY: the handle and descriptors are only used under the mutex that holds them, on the
    // stream of the device they were made for.
    unsafe impl Send for Lt {}

    /// Workspace for cuBLASLt's algorithms (NVIDIA's recommendation for Hopper).
    const WORKSPACE: usize = 32 << 20;

    /// The largest power of two (up to 256) that divides `addr`.
    fn alignment(addr: u64) -> u32 {
        if addr == 0 {
            256
        } else {
            (1u64 << addr.trailing_zeros().min(8)) as u32
        }
    }

    impl Plan {
        /// Descriptors for `key` (bf16 operands, f32 accumulation and scale, A transposed) and
        /// the heuristic's algorithm.
        fn new(
            handle: sys::cublasLtHandle_t,
            key: Key,
        ) -> std::result::Result<Plan, lt::result::CublasError> {
            use sys::cublasLtMatmulDescAttributes_t as D;
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
            let desc = lt::result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )?;
            let (transpose, keep) = (1i32, 0i32);
            let (trans_a, trans_b) = if key.grad { (keep, transpose) } else { (transpose, keep) };
            let epilogue = if key.bias {
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            } else {
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
            };
            // SAFETY: attribute values of the documented types and sizes on a live descriptor.
            unsafe {
                let set = |attr, value: *const std::ffi::c_void, size| {
                    lt::result::set_matmul_desc_attribute(desc, attr, value, size)
                };
                set(D::CUBLASLT_MATMUL_DESC_TRANSA, (&trans_a) as *const i32 as *const _, 4)?;
                set(D::CUBLASLT_MATMUL_DESC_TRANSB, (&trans_b) as *const i32 as *const _, 4)?;
                let size = std::mem::size_of_val(&epilogue);
                set(D::CUBLASLT_MATMUL_DESC_EPILOGUE, (&epilogue) as *const _ as *const _, size)?;
            }
            // Linear: A K × M read transposed (ld K); B K × N (ld K); C = D M × N in bf16 (ld M).
            // Gradient: A M × K (ld M); B N × K read transposed (ld N); C = D M × N in f32.
            let (a, b, c) = if key.grad {
                (
                    lt::result::create_matrix_layout(bf16, key.m, key.k, key.m as i64)?,
                    lt::result::create_matrix_layout(bf16, key.n, key.k, key.n as i64)?,
                    lt::result::create_matrix_layout(
                        sys::cudaDataType_t::CUDA_R_32F,
                        key.m,
                        key.n,
                        key.m as i64,
                    )?,
                )
            } else {
                (
                    lt::result::create_matrix_layout(bf16, key.k, key.m, key.k as i64)?,
                    lt::result::create_matrix_layout(bf16, key.k, key.n, key.k as i64)?,
                    lt::result::create_matrix_layout(bf16, key.m, key.n, key.m as i64)?,
                )
            };
            let pref = lt::result::create_matmul_pref()?;
            let workspace = WORKSPACE;
            // SAFETY: as above, on a live preference.
            let heuristic = unsafe {
                let set = |attr, value: *const std::ffi::c_void, size| {
                    lt::result::set_matmul_pref_attribute(pref, attr, value, size)
                };
                let ws = (&workspace) as *const usize as *const _;
                set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws, std::mem::size_of::<usize>())?;
                let [al_a, al_b, al_c] = key.align;
                set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, (&al_a) as *const u32 as *const _, 4)?;
                set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, (&al_b) as *const u32 as *const _, 4)?;
                set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, (&al_c) as *const u32 as *const _, 4)?;
                set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, (&al_c) as *const u32 as *const _, 4)?;
                let h = lt::result::get_matmul_algo_heuristic(handle, desc, a, b, c, c, pref);
                lt::result::destroy_matmul_pref(pref)?;
                h?
            };
            Ok(Plan { desc, a, b, c, algo: heuristic.algo })
        }
    }

    impl Plan {
        /// `D = alpha·op(A)·op(B) + beta·C` with C = D at `a_b_d[2]` on `stream`.
        ///
        /// # Safety
        /// The addresses must be those of live device buffers of the sizes and alignments the
        /// plan was made for, `ws` the handle's workspace, all on `stream`.
        unsafe fn run(
            &self,
            handle: sys::cublasLtHandle_t,
            (alpha, beta): (f32, f32),
            a_b_d: [u64; 3],
            ws: u64,
            stream: sys::cudaStream_t,
        ) -> Result<()> {
            let [a, b, d] = a_b_d;
            lt::result::matmul(
                handle,
                self.desc,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                a as *const _,
                self.a,
                b as *const _,
                self.b,
                d as *const _,
                self.c,
                d as *mut _,
                self.c,
                &self.algo,
                ws as *mut _,
                WORKSPACE,
                stream,
            )
            .map_err(lt_error)
        }
    }

    impl Lt {
        /// The plan for `key`, made on first use.
        fn plan(&mut self, key: Key) -> Result<&Plan> {
            if !self.plans.contains_key(&key) {
                let plan = Plan::new(self.handle, key).map_err(lt_error)?;
                self.plans.insert(key, plan);
            }
            Ok(&self.plans[&key])
        }
    }

    /// The cuBLASLt state of `dev`, made on first use.
    fn with_lt<R>(dev: &candle_core::CudaDevice, f: impl FnOnce(&mut Lt) -> Result<R>) -> Result<R> {
        static STATES: OnceLock<Mutex<Vec<Lt>>> = OnceLock::new();
        let mut states =
            STATES.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|e| e.into_inner());
        let i = match states.iter().position(|s| s.device == dev.id()) {
            Some(i) => i,
            None => {
                let handle = lt::result::create_handle().map_err(lt_error)?;
                // SAFETY: cuBLASLt's workspace, never read by the host.
                let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
                states.push(Lt { device: dev.id(), handle, workspace, plans: HashMap::new() });
                states.len() - 1
            }
        };
        f(&mut states[i])
    }

    /// Switched on or off and checked once per process, see the module docs.
    static READY: OnceLock<bool> = OnceLock::new();

    pub fn serves(x: &Tensor) -> bool {
        if x.dtype() != DType::BF16 || !x.device().is_cuda() {
            return false;
        }
        *READY.get_or_init(|| {
            !std::env::var("LORAHOST_CUBLASLT").is_ok_and(|v| v == "0")
                && verdict("cuBLASLt linear", probe(x.device()))
        })
    }

    /// A probe's outcome, logged: whether `what` is used.
    fn verdict(what: &str, probe: Result<Option<String>>) -> bool {
        match probe {
            Ok(None) => {
                tracing::info!("{what} checked on the GPU: in use");
                true
            }
            Ok(Some(why)) => {
                tracing::warn!(
                    "{what} disagrees with the composed computation on this GPU ({why}); not used"
                );
                false
            }
            Err(e) => {
                tracing::warn!("{what} failed on this GPU ({e}); not used");
                false
            }
        }
    }

    /// A deterministic bf16 probe operand of `shape` on `device` (values in ±0.5).
    fn draw(device: &Device, shape: &[usize], seed: f64) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let v: Vec<f32> = (0..count).map(|i| ((i as f64 * 0.37 + seed).sin() * 0.5) as f32).collect();
        Tensor::from_vec(v, shape, device)?.to_dtype(DType::BF16)
    }

    /// Odd sizes against the composed f32 computation, with and without the low-rank term.
    fn probe(device: &Device) -> Result<Option<String>> {
        let (n, k, o, r) = (37, 48, 40, 8);
        let draw = |shape: &[usize], seed: f64| draw(device, shape, seed);
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
        let stream = dev.cuda_stream();
        let cu_stream = stream.cu_stream() as sys::cudaStream_t;
        with_lt(dev, |lt| {
            let ws = lt.workspace.device_ptr(&stream).0;
            // outᵀ (O × N) = op(A)·B with A a K × O matrix read transposed: W (or sB), B = xᵀ
            // (or hᵀ); β = 1 adds the output's current values (the low-rank term).
            let mut run = |a: u64, b: u64, inner: usize, accumulate: bool, bias: Option<u64>| -> Result<()> {
                let key = Key {
                    m: o as u64,
                    n: n as u64,
                    k: inner as u64,
                    accumulate,
                    bias: bias.is_some(),
                    align: [alignment(a), alignment(b), alignment(dst)],
                    grad: false,
                };
                let handle = lt.handle;
                let plan = lt.plan(key)?;
                let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
                // SAFETY: the addresses are of live contiguous tensors of the sizes the plan
                // describes (checked by `dims`), queued on candle's stream, which also orders
                // the frees of these tensors after the product.
                unsafe {
                    if let Some(ptr) = bias {
                        lt::result::set_matmul_desc_attribute(
                            plan.desc,
                            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                            (&ptr) as *const u64 as *const _,
                            8,
                        )
                        .map_err(lt_error)?;
                    }
                    plan.run(handle, (alpha, beta), [a, b, dst], ws, cu_stream)
                }
            };
            let mut accumulate = false;
            if let Some((h, sb)) = lowrank {
                run(device_address(sb)?, device_address(h)?, h.dim(1)?, false, None)?;
                accumulate = true;
            }
            let bias = bias.map(device_address).transpose()?;
            run(device_address(w)?, device_address(xa)?, k, accumulate, bias)
        })
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

    /// Switched on or off and checked once per process (the gradient products).
    static GRAD_READY: OnceLock<bool> = OnceLock::new();

    pub fn grad_serves(x: &Tensor) -> bool {
        serves(x) && *GRAD_READY.get_or_init(|| verdict("cuBLASLt adapter gradients", grad_probe(x.device())))
    }

    /// Odd sizes and a scale against the composed f32 product.
    fn grad_probe(device: &Device) -> Result<Option<String>> {
        for (n, m, p, alpha) in [(37usize, 8usize, 40usize, 1.0f64), (130, 40, 6, 2.5)] {
            let (x, y) = (draw(device, &[n, m], 1.0)?, draw(device, &[n, p], 2.0)?);
            let want = (x.to_dtype(DType::F32)?.t()?.matmul(&y.to_dtype(DType::F32)?)? * alpha)?;
            let got = grad_product(&x, &y, alpha)?;
            if got.dtype() != DType::F32 || got.dims() != [m, p] {
                return Ok(Some(format!("{:?} {:?} for ({m}, {p}) f32", got.dtype(), got.dims())));
            }
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            if err.is_nan() || err > 1e-2 {
                return Ok(Some(format!("relative error {err:.2e} ({n} rows, {m} x {p})")));
            }
        }
        Ok(None)
    }

    pub fn grad_product(x: &Tensor, y: &Tensor, alpha: f64) -> Result<Tensor> {
        let (n, m) = x.dims2()?;
        let (n2, p) = y.dims2()?;
        let ok = n == n2
            && x.is_contiguous()
            && y.is_contiguous()
            && x.dtype() == DType::BF16
            && y.dtype() == DType::BF16;
        if !ok {
            candle_core::bail!(
                "cuBLASLt gradient product: operands {:?} {:?} and {:?} {:?}",
                x.shape(),
                x.dtype(),
                y.shape(),
                y.dtype()
            );
        }
        if n == 0 || m == 0 || p == 0 {
            return Tensor::zeros((m, p), DType::F32, x.device());
        }
        let Device::Cuda(dev) = x.device() else {
            candle_core::bail!("cuBLASLt gradient product: not on the GPU")
        };
        let out = crate::cuda_kernels::uninit(x, &[m, p], DType::F32)?;
        let (xa, ya, dst) = (device_address(x)?, device_address(y)?, device_address(&out)?);
        let stream = dev.cuda_stream();
        let cu_stream = stream.cu_stream() as sys::cudaStream_t;
        with_lt(dev, |lt| {
            let ws = lt.workspace.device_ptr(&stream).0;
            // out (M, P) row-major is outᵀ (P × M, ld P) = yᵀ-as-stored (P × N, ld P) · xᵀ with x
            // stored as M × N (ld M) and read transposed.
            let key = Key {
                m: p as u64,
                n: m as u64,
                k: n as u64,
                accumulate: false,
                bias: false,
                align: [alignment(ya), alignment(xa), alignment(dst)],
                grad: true,
            };
            let handle = lt.handle;
            let plan = lt.plan(key)?;
            let (alpha, beta) = (alpha as f32, 0f32);
            // SAFETY: as in `linear_into`: live contiguous tensors of the sizes the plan
            // describes, on candle's stream.
            unsafe { plan.run(handle, (alpha, beta), [ya, xa, dst], ws, cu_stream) }
        })?;
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
