//! lorahost's own CUDA kernels (LayerNorm, GroupNorm, AdamW, gradient statistics, row copies,
//! fused elementwise, and the tensor-core ones: flash attention, 3×3 convolution): CUDA C
//! source compiled with NVRTC on first use (or all at once when a device opens, [`precompile`])
//! and loaded once per device. The sources use no headers (bf16 is handled as its bit
//! pattern), so only the NVRTC library that candle links is needed. A kernel set that cannot
//! be compiled (or is switched off with its environment variable, `NAME=0`, for A/B timings)
//! leaves the caller on its composed path, logged once.

/// The PTX of `source` for a virtual architecture (`compute_80`: instructions that need it,
/// e.g. `mma.sync` on bf16; NVRTC's default without one); None when `switch` is set to `0` or
/// the compilation failed (both logged; [`KernelSet`] calls it once per set).
#[cfg(feature = "cuda")]
pub fn compile_for(what: &str, switch: &str, source: &str, arch: Option<&'static str>) -> Option<String> {
    use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    if std::env::var(switch).is_ok_and(|v| v == "0") {
        tracing::info!("{what} kernels off ({switch}=0): composed path");
        return None;
    }
    match compile_ptx_with_opts(source, CompileOptions { arch, ..Default::default() }) {
        Ok(p) => {
            tracing::info!("{what} CUDA kernels compiled (NVRTC)");
            Some(p.to_src())
        }
        Err(e) => {
            tracing::warn!("{what} CUDA kernels did not compile ({e}); using the composed path");
            None
        }
    }
}

/// Compile every kernel set of lorahost in the background, concurrently (NVRTC takes from a
/// fraction of a second to seconds per set): the first training step then finds them compiled
/// instead of compiling each at its first use, one after another. Their first users wait for a
/// compilation in progress (each set is compiled once per process either way).
#[cfg(feature = "cuda")]
pub fn precompile() {
    use crate::sam3::{conv_cuda, copy_cuda, flash_cuda, fused_cuda, lowrank_cuda, norm_cuda};
    use crate::train::{adamw_cuda, stats_cuda};
    let sets: [fn(); 8] = [
        flash_cuda::prepare,
        conv_cuda::prepare,
        fused_cuda::prepare,
        lowrank_cuda::prepare,
        norm_cuda::prepare,
        copy_cuda::prepare,
        adamw_cuda::prepare,
        stats_cuda::prepare,
    ];
    for set in sets {
        let _ = std::thread::Builder::new().name("lorahost-nvrtc".into()).spawn(set);
    }
}

/// A kernel set: the concatenation of `sources`, compiled once per process on first use (or by
/// [`precompile`]) for `arch` (NVRTC's default when None); None when switched off (`switch=0`)
/// or when it does not compile (both logged once).
#[cfg(feature = "cuda")]
pub struct KernelSet {
    what: &'static str,
    switch: &'static str,
    sources: &'static [&'static str],
    arch: Option<&'static str>,
    ptx: std::sync::OnceLock<Option<String>>,
}

#[cfg(feature = "cuda")]
impl KernelSet {
    /// A set named `what` (logs), switched off by the environment variable `switch`, compiled
    /// from `sources` for NVRTC's default architecture.
    pub const fn new(what: &'static str, switch: &'static str, sources: &'static [&'static str]) -> Self {
        Self::for_arch(what, switch, sources, None)
    }

    /// [`KernelSet::new`] for a virtual architecture (`compute_80`).
    pub const fn for_arch(
        what: &'static str,
        switch: &'static str,
        sources: &'static [&'static str],
        arch: Option<&'static str>,
    ) -> Self {
        KernelSet { what, switch, sources, arch, ptx: std::sync::OnceLock::new() }
    }

    /// The PTX, compiled once (None: off or not compiled).
    pub fn ptx(&self) -> Option<&str> {
        self.ptx
            .get_or_init(|| compile_for(self.what, self.switch, &self.sources.concat(), self.arch))
            .as_deref()
    }
}

/// A tensor-core kernel set: compiled for compute capability 8.0 ([`TENSOR_CORE`] needs it) from
/// the concatenation of `sources` on first use, then checked once against a reference on the
/// device by the caller's probe before anything uses it; a set that does not compile, is
/// switched off (`switch=0`), fails its probe or disagrees leaves the caller on its fallback
/// path, logged once.
#[cfg(feature = "cuda")]
pub struct CheckedKernels {
    what: &'static str,
    fallback: &'static str,
    set: KernelSet,
    ready: std::sync::OnceLock<bool>,
}

/// What a kernel set's probe found: `None` when the kernels agree with the reference, else how
/// they disagree.
#[cfg(feature = "cuda")]
pub type ProbeResult = candle_core::Result<Option<String>>;

#[cfg(feature = "cuda")]
impl CheckedKernels {
    /// A set named `what` (logs), switched off by the environment variable `switch`, compiled
    /// from `sources`; `fallback` names what the callers use instead (logs).
    pub const fn new(
        what: &'static str,
        switch: &'static str,
        sources: &'static [&'static str],
        fallback: &'static str,
    ) -> Self {
        CheckedKernels {
            what,
            fallback,
            set: KernelSet::for_arch(what, switch, sources, Some("compute_80")),
            ready: std::sync::OnceLock::new(),
        }
    }

    /// The PTX, compiled once (None: off or not compiled).
    pub fn ptx(&self) -> Option<&str> {
        self.set.ptx()
    }

    /// Whether the kernels are compiled and agreed with the reference on `device` (`probe`
    /// runs once per process).
    pub fn ready(
        &self,
        device: &candle_core::Device,
        probe: impl FnOnce(&candle_core::Device) -> ProbeResult,
    ) -> bool {
        let (what, fallback) = (self.what, self.fallback);
        self.ptx().is_some()
            && *self.ready.get_or_init(|| match probe(device) {
                Ok(None) => {
                    tracing::info!("{what} kernels checked on the GPU: in use");
                    true
                }
                Ok(Some(why)) => {
                    tracing::warn!(
                        "{what} kernels disagree with the reference on this GPU ({why}); using {fallback}"
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!("{what} kernels failed on this GPU ({e}); using {fallback}");
                    false
                }
            })
    }

    /// Launch `name` (see [`launch`]).
    pub fn launch(
        &self,
        device: &candle_core::Device,
        module: &str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> candle_core::Result<()> {
        let Some(ptx) = self.ptx() else { candle_core::bail!("{} kernels unavailable", self.what) };
        launch(device, module, ptx, name, grid, block, args)
    }
}

/// Device address of a contiguous f32/bf16/i64/u8 CUDA tensor's first element (its storage's
/// address plus the layout offset). The tensor must stay alive until the kernel that reads it
/// is queued (frees are stream-ordered after that).
#[cfg(feature = "cuda")]
pub fn device_address(t: &candle_core::Tensor) -> candle_core::Result<u64> {
    if !t.is_contiguous() {
        candle_core::bail!("kernel operand {:?} is not contiguous", t.shape());
    }
    storage_address(t)
}

/// Device address of a CUDA tensor's first element, whatever its layout (a kernel that reads
/// it through its strides).
#[cfg(feature = "cuda")]
pub fn storage_address(t: &candle_core::Tensor) -> candle_core::Result<u64> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{DType, Storage};
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else { candle_core::bail!("kernel operand is not on the GPU") };
    let stream = cs.device().cuda_stream();
    let (base, size) = match t.dtype() {
        DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
        DType::I64 => (cs.as_cuda_slice::<i64>()?.device_ptr(&stream).0, 8),
        DType::U8 => (cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0, 1),
        dt => candle_core::bail!("kernel operand of dtype {dt:?}"),
    };
    Ok(base + (l.start_offset() * size) as u64)
}

/// CUDA C shared by the kernel sources: bf16 loads and stores as bit patterns (round to nearest
/// even, as `__float2bfloat16`), and block-wide sum and max (blockDim.x a multiple of 32, at
/// most 1024; every thread gets the result).
pub const PRELUDE: &str = r#"
typedef unsigned short bf16_t;
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16_t)0x7fc0u; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    float t = l < nw ? sh[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}
__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    float t = l < nw ? sh[l] : __int_as_float(0xff800000);
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}
"#;

/// CUDA C of the tensor-core building blocks (`mma.sync` m16n8k16 on bf16, `ldmatrix`, fragment
/// loads from shared-memory tiles) for kernels compiled after [`PRELUDE`] for compute
/// capability 8.0 and up.
pub const TENSOR_CORE: &str = include_str!("tensor_core.cu");

/// A kernel argument as the 8 bytes the launch copies from: addresses and 64-bit integers as
/// they are, 32-bit values in the low half (the driver copies as many bytes as the kernel's
/// parameter has; x86-64 and the GPU are little-endian).
#[derive(Debug, Clone, Copy)]
pub struct Arg(pub u64);

impl Arg {
    /// An `int` parameter.
    pub fn i32(v: i32) -> Arg {
        Arg(v as u32 as u64)
    }
    /// A `float` parameter.
    pub fn f32(v: f32) -> Arg {
        Arg(v.to_bits() as u64)
    }
    /// A `long long` parameter.
    pub fn i64(v: i64) -> Arg {
        Arg(v as u64)
    }
}

/// One kernel launch as a plain value (what the CPU emulation test replays): kernel name, grid,
/// threads per block, arguments.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Kernel name in its module's source.
    pub name: String,
    /// Grid.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Arguments in the kernel's parameter order.
    pub args: Vec<Arg>,
}

impl Launch {
    /// Launch it on `device`'s stream from module `module` (compiled from `ptx`).
    #[cfg(feature = "cuda")]
    pub fn run(&self, device: &candle_core::Device, module: &str, ptx: &str) -> candle_core::Result<()> {
        launch(device, module, ptx, &self.name, self.grid, self.block, &self.args)
    }
}

/// Launch `name` of the module `module` (compiled from `ptx`) on `device`'s stream with a 1-D
/// block of `block` threads and `grid` blocks.
#[cfg(feature = "cuda")]
pub fn launch(
    device: &candle_core::Device,
    module: &str,
    ptx: &str,
    name: &str,
    grid: (u32, u32, u32),
    block: u32,
    args: &[Arg],
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    let candle_core::Device::Cuda(dev) = device else {
        candle_core::bail!("kernel {name}: not a CUDA device")
    };
    let func = function(dev, module, name, ptx)?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    for a in args {
        builder.arg(&a.0);
    }
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the callers pass the argument list of `name` (addresses of live buffers of the
    // sizes the kernel indexes, scalars by value).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// The kernel `name` of `module` on `dev`, looked up in the driver once per process: candle's
/// `get_or_load_custom_func` asks the driver again on every call (a C string and a
/// `cuModuleGetFunction` per launch, thousands of launches a step).
#[cfg(feature = "cuda")]
fn function(
    dev: &candle_core::CudaDevice,
    module: &str,
    name: &str,
    ptx: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    use candle_core::cuda_backend::cudarc::driver::CudaFunction;
    use std::collections::HashMap;
    // Device → module → kernel (looked up by &str: no allocation on a hit).
    type Cache = HashMap<candle_core::cuda_backend::DeviceId, HashMap<String, HashMap<String, CudaFunction>>>;
    static CACHE: std::sync::Mutex<Option<Cache>> = std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let modules = cache.get_or_insert_with(HashMap::new).entry(dev.id()).or_default();
    if let Some(f) = modules.get(module).and_then(|m| m.get(name)) {
        return Ok(f.clone());
    }
    let f = dev.get_or_load_custom_func(name, module, ptx)?.into_cuda_function();
    modules.entry(module.to_string()).or_default().insert(name.to_string(), f.clone());
    Ok(f)
}

/// A new contiguous CUDA tensor of `shape` and `dtype` on `like`'s device, not initialised (a
/// kernel writes every element before anything reads it).
#[cfg(feature = "cuda")]
pub fn uninit(
    like: &candle_core::Tensor,
    shape: &[usize],
    dtype: candle_core::DType,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape};
    struct Alloc(Shape, DType);
    impl CustomOp1 for Alloc {
        fn name(&self) -> &'static str {
            "uninit"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("uninit: CUDA only")
        }
        fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let dev = s.device().clone();
            let n = self.0.elem_count();
            // SAFETY: the caller's kernel writes every element before it is read.
            let st = unsafe {
                match self.1 {
                    DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
                    DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
                    DType::U8 => CudaStorage::wrap_cuda_slice(dev.alloc::<u8>(n)?, dev.clone()),
                    dt => candle_core::bail!("uninit: {dt:?}"),
                }
            };
            Ok((st, self.0.clone()))
        }
    }
    like.detach().apply_op1_no_bwd(&Alloc(Shape::from(shape), dtype))
}

/// Threads per block and blocks for an elementwise kernel over `n` elements (grid-stride loop).
pub fn elementwise_grid(n: usize) -> ((u32, u32, u32), u32) {
    let threads = 256usize;
    let blocks = n.div_ceil(threads).clamp(1, 1 << 16);
    ((blocks as u32, 1, 1), threads as u32)
}

/// Threads per block for a kernel that gives each row of `n` elements one block: about eight
/// elements per thread, a multiple of 32, between 32 and 256.
pub fn row_threads(n: usize) -> u32 {
    (n.div_ceil(8).div_ceil(32).clamp(1, 8) * 32) as u32
}
