//! lorahost's tensor-core CUDA kernels run without a GPU: the kernel sources (flash attention,
//! `host/src/sam3/flash_attention.cu`; 3×3 convolution, `host/src/sam3/conv3x3.cu`; their shared
//! `host/src/tensor_core.cu`) are compiled as C++ against a CPU emulation of the CUDA features
//! they use (`cuda_emu/emu.h`: threads, barriers, warp shuffles, `mma.sync` m16n8k16 and
//! `ldmatrix` fragments) and driven by the launch plans the host builds for the GPU
//! (`lorahost::sam3::flash_cuda`, `lorahost::sam3::conv_cuda`).
//!
//! Flash attention: operands in the model's layouts (k and v transposed from tokens-first
//! storage, the output tokens-first, a query offset inside its buffer); forward, log-sum-exp and
//! the three gradients against candle's autograd of the composed attention in f64.
//! Convolution: against candle's f64 `conv2d`, with channel, pixel and reduction counts that
//! leave partial tiles.
//! LayerNorm and GroupNorm (`host/src/sam3/norm.cu`): forward and input gradient in f32 and bf16
//! against the composed normalisation in f64 and its autograd; GroupNorm rows cut into several
//! chunks with a shorter last one, and rows shorter than a block.
//! Row copies of strided views (`lorahost::sam3::copy_cuda`): the window partition and its
//! inverse in bf16 and f32, aligned and not, against reads through the view's strides.
//! The adapted linear's epilogue (`y + bias + z`) and the RoPE map (`lorahost::sam3::fused_cuda`),
//! with grids whose stride leaves several iterations per thread, against the formulas in f32;
//! the dropout mask's counter-based generator against the hash written out in Rust, and the
//! activation/dropout and input-gradient kernels with the mask drawn into bytes and left to the
//! kernels (the same bytes either way).
//! Gradient statistics (`lorahost::train::stats_cuda`): sums of squares, NaN-sticky maxima and
//! non-finite counts of several groups of tensors of mixed lengths, against f64.
//!
//! Needs a C++20 compiler (`c++`, or `CXX`); without one the test says so and passes, unless
//! `LORAHOST_REQUIRE_CXX=1` (CI) makes that a failure.

use candle_core::{Device, Tensor, Var, D};
use lorahost::cuda_kernels::{Arg, PRELUDE, TENSOR_CORE};
use lorahost::sam3::conv_cuda::{self, ConvDims};
use lorahost::sam3::flash_cuda::{
    self, backward_launches, forward_launch, fresh_strides, Backward, Dims, Launch, View,
};
use lorahost::sam3::fused_cuda;
use lorahost::sam3::norm_cuda::{self, GroupDims};
use std::path::{Path, PathBuf};
use std::process::Command;

/// splitmix64 → values rounded to bf16 (so the kernels and the reference see the same inputs).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        let x = (u - 0.5) * 3.0;
        f32::from_bits(x.to_bits() & 0xffff_0000)
    }
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// A (B, H, N, Dh) operand: its logical values (row-major B, H, N, Dh) and where they sit.
struct Operand {
    values: Vec<f32>,
    dims: [usize; 4],
    view: View,
    /// Elements before element (0, 0, 0, 0) in its buffer.
    offset: usize,
}

fn buffer_addr(id: usize, byte_offset: usize) -> u64 {
    ((id as u64 + 1) << 48) | byte_offset as u64
}

impl Operand {
    fn new(values: Vec<f32>, dims: [usize; 4], id: usize, offset: usize, tokens_major: bool) -> Self {
        let view = View {
            addr: buffer_addr(id, offset * 2),
            strides: fresh_strides(dims[1], dims[2], dims[3], tokens_major),
        };
        Operand { values, dims, view, offset }
    }

    fn index(&self, b: usize, h: usize, n: usize, d: usize) -> usize {
        let s = self.view.strides;
        self.offset + (b as i64 * s[0] + h as i64 * s[1] + n as i64 * s[2]) as usize + d
    }

    fn each(&self, mut f: impl FnMut(usize, usize)) {
        let [bb, hh, nn, dd] = self.dims;
        let mut logical = 0;
        for b in 0..bb {
            for h in 0..hh {
                for n in 0..nn {
                    for d in 0..dd {
                        f(logical, self.index(b, h, n, d));
                        logical += 1;
                    }
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        (self.offset + self.values.len()) * 2
    }

    /// The buffer's bytes (bf16).
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bytes()];
        self.each(|l, at| {
            let bits = (self.values[l].to_bits() >> 16) as u16;
            out[at * 2..at * 2 + 2].copy_from_slice(&bits.to_le_bytes());
        });
        out
    }

    /// Logical values read back from a buffer laid out like this operand.
    fn decode(&self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; self.values.len()];
        self.each(|l, at| {
            let bits = u16::from_le_bytes([bytes[at * 2], bytes[at * 2 + 1]]);
            out[l] = f32::from_bits((bits as u32) << 16);
        });
        out
    }

    fn tensor(&self) -> Tensor {
        let v: Vec<f64> = self.values.iter().map(|&x| x as f64).collect();
        Tensor::from_vec(v, self.dims.to_vec(), &Device::Cpu).unwrap()
    }
}

/// Compile the emulation driver with the kernel sources into `dir`.
fn driver(dir: &Path) -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        // CI sets LORAHOST_REQUIRE_CXX=1: there the check must run.
        assert!(
            !std::env::var("LORAHOST_REQUIRE_CXX").is_ok_and(|v| v == "1"),
            "cuda_emu: no C++ compiler ({cxx}) and LORAHOST_REQUIRE_CXX=1; install g++ or set CXX"
        );
        eprintln!("cuda_emu: no C++ compiler ({cxx}); the CUDA-kernel emulation check is skipped");
        return None;
    }
    let sources = [
        PRELUDE,
        TENSOR_CORE,
        lorahost::sam3::flash_cuda::SOURCE,
        conv_cuda::SOURCE,
        norm_cuda::SOURCE,
        lorahost::train::stats_cuda::SOURCE,
        lorahost::sam3::copy_cuda::SOURCE,
        fused_cuda::HELPERS,
        fused_cuda::SOURCE,
        lorahost::sam3::lowrank_cuda::SOURCE,
    ];
    std::fs::write(dir.join("kernels.inc"), sources.concat()).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
    let exe = dir.join("driver");
    // CUDA code reads and writes bf16 data through 32- and 128-bit pointers (vector loads);
    // C++'s strict aliasing would let the compiler drop those stores.
    // CUDA_EMU_SANITIZE=1: with AddressSanitizer (every buffer exactly its size, so an
    // out-of-bounds read or write of the kernels fails the run) and UBSan; slower to build.
    let sanitize = std::env::var("CUDA_EMU_SANITIZE").is_ok_and(|v| v == "1");
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", "-Wall", "-Wno-unused-function"])
        .args(if sanitize { &["-fsanitize=address,undefined", "-g"][..] } else { &[][..] })
        .arg("-I")
        .arg(dir)
        .arg("-I")
        .arg(&here)
        .arg("-o")
        .arg(&exe)
        .arg(here.join("driver.cpp"))
        .output()
        .expect("run the C++ compiler");
    assert!(out.status.success(), "emulation build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Some(exe)
}

fn launch_line(l: &Launch) -> String {
    let args: Vec<String> = l.args.iter().map(|a: &Arg| a.0.to_string()).collect();
    format!(
        "launch {} {} {} {} {} {} {}\n",
        l.name,
        l.grid.0,
        l.grid.1,
        l.grid.2,
        l.block,
        l.args.len(),
        args.join(" ")
    )
}

fn max_rel(want: &Tensor, got: &[f32]) -> f64 {
    let w: Vec<f64> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(w.len(), got.len());
    let top = w.iter().fold(0f64, |m, x| m.max(x.abs()));
    let err = w.iter().zip(got).fold(0f64, |m, (a, b)| m.max((a - *b as f64).abs()));
    err / top
}

/// One attention through the emulated kernels against the f64 autograd reference.
fn check(exe: &Path, dir: &Path, dims: Dims, out_tokens_major: bool, seed: u64, stages: usize) {
    let build = |l: Launch| if stages == 1 { flash_cuda::one_stage(l) } else { l };
    let Dims { batch: b, heads: h, nq, nk, head_dim: d } = dims;
    let mut rng = Rng(seed);
    // Buffers: 0 q, 1 k, 2 v, 3 d_out, 4 o, 5 lse, 6 delta, 7 dq, 8 dk, 9 dv.
    let q = Operand::new(rng.values(b * h * nq * d), [b, h, nq, d], 0, 24, false);
    let k = Operand::new(rng.values(b * h * nk * d), [b, h, nk, d], 1, 0, true);
    let v = Operand::new(rng.values(b * h * nk * d), [b, h, nk, d], 2, 0, true);
    let d_out = Operand::new(rng.values(b * h * nq * d), [b, h, nq, d], 3, 0, out_tokens_major);
    let o = Operand::new(vec![0.0; b * h * nq * d], [b, h, nq, d], 4, 0, out_tokens_major);
    // Each gradient in its input's memory order, as the host allocates them.
    let dq = Operand::new(vec![0.0; q.values.len()], q.dims, 7, 0, q.view.tokens_major());
    let dk = Operand::new(vec![0.0; k.values.len()], k.dims, 8, 0, k.view.tokens_major());
    let dv = Operand::new(vec![0.0; v.values.len()], v.dims, 9, 0, v.view.tokens_major());
    let rows = b * h * nq;
    let scale = 1.0 / (d as f64).sqrt();

    let mut plan = String::new();
    for (i, x) in [&q, &k, &v, &d_out].iter().enumerate() {
        let path = dir.join(format!("in{i}.bin"));
        std::fs::write(&path, x.encode()).unwrap();
        plan += &format!("buffer {} {}\n", x.bytes(), path.display());
    }
    plan += &format!("buffer {} -\n", o.bytes());
    plan += &format!("buffer {} -\nbuffer {} -\n", rows * 4, rows * 4);
    for x in [&dq, &dk, &dv] {
        plan += &format!("buffer {} -\n", x.bytes());
    }
    plan +=
        &launch_line(&build(forward_launch(dims, q.view, k.view, v.view, o.view, buffer_addr(5, 0), scale)));
    let p = Backward {
        q: q.view,
        k: k.view,
        v: v.view,
        o: o.view,
        d_out: d_out.view,
        lse: buffer_addr(5, 0),
        delta: buffer_addr(6, 0),
        dq: dq.view,
        dk: dk.view,
        dv: dv.view,
    };
    for l in backward_launches(dims, &p, scale) {
        plan += &launch_line(&build(l));
    }
    for id in [4, 5, 7, 8, 9] {
        plan += &format!("output {id} {}\n", dir.join(format!("out{id}.bin")).display());
    }
    run_plan(exe, dir, &plan);
    let read = |id: usize| std::fs::read(dir.join(format!("out{id}.bin"))).unwrap();

    // The reference: composed attention in f64, candle's autograd.
    let (qv, kv, vv) = (
        Var::from_tensor(&q.tensor()).unwrap(),
        Var::from_tensor(&k.tensor()).unwrap(),
        Var::from_tensor(&v.tensor()).unwrap(),
    );
    let s = (qv.matmul(&kv.t().unwrap()).unwrap() * scale).unwrap();
    let want = candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(vv.as_tensor()).unwrap();
    let grads = (&want * d_out.tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let lse2 = (s.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap() / std::f64::consts::LN_2).unwrap();

    let tol = 0.02; // bf16 operands and results, f32 accumulation
    let e = max_rel(&want, &o.decode(&read(4)));
    assert!(e < tol, "{dims:?} ({stages} stages): output off by {e:.2e}");
    let lse: Vec<f32> = read(5).chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let e = max_rel(&lse2, &lse[..rows]);
    assert!(e < 1e-4, "{dims:?}: log-sum-exp off by {e:.2e}");
    for (name, var, out, id) in [("dq", &qv, &dq, 7), ("dk", &kv, &dk, 8), ("dv", &vv, &dv, 9)] {
        let w = grads.get(var.as_tensor()).unwrap();
        let e = max_rel(w, &out.decode(&read(id)));
        assert!(e < tol, "{dims:?} ({stages} stages): {name} off by {e:.2e}");
    }
    // Sanity of the check itself: a wrong output would be caught (softmax rows are not flat).
    assert!(max_rel(&want, &vec![0.0; want.elem_count()]) > 0.5);
}

fn run_plan(exe: &Path, dir: &Path, plan: &str) {
    std::fs::write(dir.join("plan.txt"), plan).unwrap();
    let run = Command::new(exe).arg(dir.join("plan.txt")).output().unwrap();
    assert!(run.status.success(), "emulation failed: {}", String::from_utf8_lossy(&run.stderr));
}

/// A work folder with the driver built in it: a temporary one, or `$CUDA_EMU_DIR/name` to keep
/// the build, plans and buffers (debugging). None without a C++ compiler.
fn setup(name: &str) -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("CUDA_EMU_DIR")
        .map(|d| PathBuf::from(d).join(name))
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let exe = driver(&dir)?;
    Some((tmp, dir, exe))
}

/// Both head dimensions, partial query and key tiles, several blocks along both grid axes,
/// shapes smaller than one tile.
#[test]
fn flash_kernels_match_the_composed_attention_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("flash") else { return };
    // Both builds: the pipelined one (two shared buffers; a tile's copies in flight while the
    // previous one is multiplied) and the one-stage one (LORAHOST_FLASH_PIPELINE=0).
    check(&exe, &dir, Dims { batch: 1, heads: 2, nq: 100, nk: 75, head_dim: 64 }, true, 1, 2);
    // Three key tiles (the pipeline's middle iteration), the last one partial.
    check(&exe, &dir, Dims { batch: 2, heads: 1, nq: 64, nk: 130, head_dim: 32 }, false, 2, 2);
    // Less than a tile of both (whole warps without a row), batch and heads both above one.
    check(&exe, &dir, Dims { batch: 2, heads: 3, nq: 17, nk: 9, head_dim: 32 }, true, 3, 2);
    // Three query tiles for the dK/dV pass's pipeline, and the one-stage build.
    check(&exe, &dir, Dims { batch: 1, heads: 1, nq: 150, nk: 70, head_dim: 64 }, true, 4, 2);
    check(&exe, &dir, Dims { batch: 1, heads: 1, nq: 150, nk: 130, head_dim: 64 }, false, 5, 1);
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect()
}

fn from_bf16_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
}

/// candle's f64 `conv2d` (stride 1, padding 1) of `x` with `w` (+ `bias`) for `d`.
fn conv_reference(d: ConvDims, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Tensor {
    let ConvDims { batch, cin, cout, height, width } = d;
    let t = |v: &[f32], shape: &[usize]| {
        Tensor::from_vec(v.iter().map(|&x| x as f64).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
    };
    let y = t(x, &[batch, cin, height, width]).conv2d(&t(w, &[cout, cin, 3, 3]), 1, 1, 1, 1).unwrap();
    match bias {
        Some(b) => y.broadcast_add(&t(b, &[1, cout, 1, 1])).unwrap(),
        None => y,
    }
}

/// One convolution through the emulated kernel against candle's f64 `conv2d`.
fn check_conv(exe: &Path, dir: &Path, d: ConvDims, with_bias: bool, seed: u64) {
    let ConvDims { batch, cin, cout, height, width } = d;
    let mut rng = Rng(seed);
    let x = rng.values(batch * cin * height * width);
    // Weights ×0.25 (exact in bf16): outputs of order one.
    let w: Vec<f32> = rng.values(cout * cin * 9).iter().map(|v| v * 0.25).collect();
    let bias = rng.values(cout);
    let y_len = batch * cout * height * width;
    let mut plan = String::new();
    for (i, v) in [&x, &w, &bias].iter().enumerate() {
        let path = dir.join(format!("conv{i}.bin"));
        std::fs::write(&path, bf16_bytes(v)).unwrap();
        plan += &format!("buffer {} {}\n", v.len() * 2, path.display());
    }
    plan += &format!("buffer {} -\n", y_len * 2);
    let bias_addr = if with_bias { buffer_addr(2, 0) } else { 0 };
    let (grid, block, args) =
        conv_cuda::launch_plan(d, buffer_addr(0, 0), buffer_addr(1, 0), bias_addr, buffer_addr(3, 0));
    plan += &launch_line(&Launch { name: "conv3x3_bf16".into(), grid, block, args });
    plan += &format!("output 3 {}\n", dir.join("conv_out.bin").display());
    run_plan(exe, dir, &plan);
    let got = from_bf16_bytes(&std::fs::read(dir.join("conv_out.bin")).unwrap());

    let want = conv_reference(d, &x, &w, with_bias.then_some(&bias[..]));
    let e = max_rel(&want, &got);
    assert!(e < 0.02, "{d:?}: convolution off by {e:.2e}");
    assert!(max_rel(&want, &vec![0.0; y_len]) > 0.5);
}

/// Pixel counts across image and tile boundaries, output channels above and below a tile,
/// reductions (Cin·9) that are not multiples of the 32-wide slice, with and without a bias.
#[test]
fn conv_kernel_matches_candle_conv2d_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("conv") else { return };
    check_conv(&exe, &dir, ConvDims { batch: 2, cin: 5, cout: 70, height: 9, width: 11 }, true, 11);
    check_conv(&exe, &dir, ConvDims { batch: 1, cin: 16, cout: 8, height: 5, width: 3 }, false, 12);
    check_conv(&exe, &dir, ConvDims { batch: 3, cin: 3, cout: 64, height: 8, width: 8 }, true, 13);
}

/// cuBLAS's `gemmStridedBatchedEx` (column-major, A transposed, B as is, f32 accumulation,
/// bf16 result) on buffers of bf16 values: what the GEMM route asks of it for one tap.
#[allow(clippy::too_many_arguments)]
fn gemm_tn_batched(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
    (stride_b, stride_c, batch): (usize, usize, usize),
    beta: f32,
) {
    for i in 0..batch {
        for col in 0..n {
            for row in 0..m {
                let mut acc = 0f32;
                for l in 0..k {
                    // op(A)[row, l] = A[l, row] (ld lda); B[l, col] (ld ldb).
                    acc += a[row * lda + l] * b[i * stride_b + col * ldb + l];
                }
                let at = i * stride_c + col * ldc + row;
                let v = acc + if beta != 0.0 { beta * c[at] } else { 0.0 };
                c[at] = f32::from_bits(
                    ((v.to_bits() as u64 + 0x7fff + ((v.to_bits() >> 16) & 1) as u64) as u32) & 0xffff_0000,
                );
            }
        }
    }
}

/// The GEMM route of the 3×3 convolution: the pack and unpack kernels emulated, the nine tap
/// products (`conv_cuda::tap_products`, with the geometry the host gives cuBLAS) on the CPU,
/// against candle's f64 `conv2d`. The padded input and the output start as NaN, so an element
/// a kernel leaves unwritten (or a tap that reads past its image's rows) shows.
fn check_conv_gemm(exe: &Path, dir: &Path, d: ConvDims, with_bias: bool, seed: u64) {
    let ConvDims { batch, cin, cout, height, width } = d;
    assert!(conv_cuda::gemm_supported(d));
    let g = conv_cuda::tap_gemm(d);
    let mut rng = Rng(seed);
    let x = rng.values(batch * cin * height * width);
    let w: Vec<f32> = rng.values(cout * cin * 9).iter().map(|v| v * 0.25).collect();
    let bias = rng.values(cout);
    let nan = |n: usize| vec![0x7fc0u16; n].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let xp_len = batch * g.input_rows * cin;
    std::fs::write(dir.join("gx.bin"), bf16_bytes(&x)).unwrap();
    std::fs::write(dir.join("gxp.bin"), nan(xp_len)).unwrap();
    let mut plan = format!(
        "buffer {} {}\nbuffer {} {}\n",
        x.len() * 2,
        dir.join("gx.bin").display(),
        xp_len * 2,
        dir.join("gxp.bin").display()
    );
    let (grid, block, args) = conv_cuda::pack_plan(d, buffer_addr(0, 0), buffer_addr(1, 0));
    plan += &launch_line(&Launch { name: "conv_pack_bf16".into(), grid, block, args });
    plan += &format!("output 1 {}\n", dir.join("gxp_out.bin").display());
    run_plan(exe, dir, &plan);
    let xp = from_bf16_bytes(&std::fs::read(dir.join("gxp_out.bin")).unwrap());
    assert!(xp.iter().all(|v| v.is_finite()), "{d:?}: the pack left elements unwritten");

    // (3, 3, Cout, Cin) as the host permutes it.
    let mut wt = vec![0f32; w.len()];
    for (o, i, t) in (0..cout).flat_map(|o| (0..cin).flat_map(move |i| (0..9).map(move |t| (o, i, t)))) {
        wt[(t * cout + o) * cin + i] = w[(o * cin + i) * 9 + t];
    }
    let mut yp = vec![f32::NAN; batch * g.grid_rows * cout];
    for t in conv_cuda::tap_products(d) {
        gemm_tn_batched(
            &wt[t.weight_offset..],
            &xp[t.input_offset..],
            &mut yp,
            (cout, g.grid_rows, cin),
            (cin, cin, cout),
            (g.input_rows * cin, g.grid_rows * cout, batch),
            if t.accumulate { 1.0 } else { 0.0 },
        );
    }
    let y_len = batch * cout * height * width;
    std::fs::write(dir.join("gyp.bin"), bf16_bytes(&yp)).unwrap();
    std::fs::write(dir.join("gb.bin"), bf16_bytes(&bias)).unwrap();
    std::fs::write(dir.join("gy.bin"), nan(y_len)).unwrap();
    let mut plan = String::new();
    for (name, len) in [("gyp", yp.len()), ("gb", bias.len()), ("gy", y_len)] {
        plan += &format!("buffer {} {}\n", len * 2, dir.join(format!("{name}.bin")).display());
    }
    let bias_addr = if with_bias { buffer_addr(1, 0) } else { 0 };
    let (grid, block, args) = conv_cuda::unpack_plan(d, buffer_addr(0, 0), bias_addr, buffer_addr(2, 0));
    plan += &launch_line(&Launch { name: "conv_unpack_bf16".into(), grid, block, args });
    plan += &format!("output 2 {}\n", dir.join("gy_out.bin").display());
    run_plan(exe, dir, &plan);
    let got = from_bf16_bytes(&std::fs::read(dir.join("gy_out.bin")).unwrap());

    let want = conv_reference(d, &x, &w, with_bias.then_some(&bias[..]));
    let e = max_rel(&want, &got);
    assert!(e < 0.02, "{d:?}: convolution (GEMM route) off by {e:.2e}");
}

/// Tiles of the pack and unpack kernels cut by the channel, row and pixel counts, several
/// images, one-pixel-wide and one-row images.
#[test]
fn conv_gemm_route_matches_candle_conv2d_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("conv_gemm") else { return };
    check_conv_gemm(&exe, &dir, ConvDims { batch: 2, cin: 5, cout: 70, height: 9, width: 11 }, true, 21);
    check_conv_gemm(&exe, &dir, ConvDims { batch: 3, cin: 40, cout: 33, height: 7, width: 35 }, false, 22);
    check_conv_gemm(&exe, &dir, ConvDims { batch: 1, cin: 3, cout: 4, height: 1, width: 1 }, true, 23);
    check_conv_gemm(&exe, &dir, ConvDims { batch: 2, cin: 64, cout: 8, height: 6, width: 1 }, true, 24);
}

/// Values as the kernels' data type stores them: bf16 or f32 bytes, and back.
fn encode(values: &[f32], bf16: bool) -> Vec<u8> {
    if bf16 {
        return bf16_bytes(values);
    }
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode(bytes: &[u8], bf16: bool) -> Vec<f32> {
    if bf16 {
        return from_bf16_bytes(bytes);
    }
    bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Write `inputs` as buffers 0.. (`(values, in the data type?)`), then zeroed buffers of the
/// given byte sizes.
fn buffers(dir: &Path, inputs: &[(&[f32], bool)], zeroed: &[usize]) -> String {
    let mut plan = String::new();
    for (i, (v, data)) in inputs.iter().enumerate() {
        let path = dir.join(format!("norm{i}.bin"));
        let bytes = encode(v, *data);
        std::fs::write(&path, &bytes).unwrap();
        plan += &format!("buffer {} {}\n", bytes.len(), path.display());
    }
    for z in zeroed {
        plan += &format!("buffer {z} -\n");
    }
    plan
}

fn f64_tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.iter().map(|&x| x as f64).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
}

/// The composed normalisation in f64 of `x` viewed as `groups` (last axis normalised), with a
/// per-channel affine (`w`, `b` broadcast as `affine`): its output and its input gradient for
/// the output gradient `dy` (candle's autograd).
fn norm_reference(
    x: &Tensor,
    groups: &[usize],
    affine: &[usize],
    w: &Tensor,
    b: &Tensor,
    dy: &Tensor,
) -> (Tensor, Tensor) {
    let xv = Var::from_tensor(x).unwrap();
    let xg = xv.reshape(groups).unwrap();
    let xc = xg.broadcast_sub(&xg.mean_keepdim(D::Minus1).unwrap()).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let xn = xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().reshape(x.dims()).unwrap();
    let y = xn
        .broadcast_mul(&w.reshape(affine).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(affine).unwrap())
        .unwrap();
    let g = (&y * dy).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(xv.as_tensor()).unwrap().clone();
    (y, dx)
}

/// GroupNorm of a (B, C, H, W) input through the emulated kernels (forward, then backward on
/// the same statistics buffer) against [`norm_reference`].
fn check_group_norm(exe: &Path, dir: &Path, dims: [usize; 4], groups: usize, bf16: bool, seed: u64) {
    let d = GroupDims::of(&dims, groups).unwrap();
    assert!(d.fits());
    let n: usize = dims.iter().product();
    let c = dims[1];
    let mut rng = Rng(seed);
    // A channel-dependent offset: statistics far from zero mean test the centred variance.
    let x: Vec<f32> =
        rng.values(n).iter().enumerate().map(|(i, v)| v + 3.0 * ((i / d.hw) % c) as f32).collect();
    let x: Vec<f32> = x.iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
    let (dy, w, b) = (rng.values(n), rng.values(c), rng.values(c));
    let size = if bf16 { 2 } else { 4 };
    // Buffers: 0 x, 1 dy, 2 w, 3 b (f32), 4 y, 5 dx, 6 part, 7 part2.
    let mut plan = buffers(
        dir,
        &[(&x, bf16), (&dy, bf16), (&w, false), (&b, false)],
        &[n * size, n * size, d.part_len() * 4, d.part_len() * 4],
    );
    let suffix = if bf16 { "bf16" } else { "f32" };
    let a = |id| buffer_addr(id, 0);
    for l in norm_cuda::group_forward_launches(d, suffix, [a(0), a(2), a(3), a(4)], a(6), 1e-5) {
        plan += &launch_line(&l);
    }
    for l in norm_cuda::group_backward_launches(d, suffix, [a(0), a(1), a(2), a(5)], [a(6), a(7)], 1e-5) {
        plan += &launch_line(&l);
    }
    for id in [4, 5] {
        plan += &format!("output {id} {}\n", dir.join(format!("norm_out{id}.bin")).display());
    }
    run_plan(exe, dir, &plan);
    let read = |id: usize| decode(&std::fs::read(dir.join(format!("norm_out{id}.bin"))).unwrap(), bf16);
    let (want_y, want_dx) = norm_reference(
        &f64_tensor(&x, &dims),
        &[dims[0], groups, n / dims[0] / groups],
        &[1, c, 1, 1],
        &f64_tensor(&w, &[c]),
        &f64_tensor(&b, &[c]),
        &f64_tensor(&dy, &dims),
    );
    let tol = if bf16 { 2e-2 } else { 2e-5 };
    let e = max_rel(&want_y, &read(4));
    assert!(e < tol, "{dims:?}/{groups} {suffix}: GroupNorm output off by {e:.2e}");
    let e = max_rel(&want_dx, &read(5));
    assert!(e < tol, "{dims:?}/{groups} {suffix}: GroupNorm input gradient off by {e:.2e}");
    assert!(max_rel(&want_dx, &vec![0.0; n]) > 0.5);
}

/// LayerNorm over rows of `c` through the emulated kernels against [`norm_reference`].
fn check_layer_norm(exe: &Path, dir: &Path, rows: usize, c: usize, bf16: bool, seed: u64) {
    let n = rows * c;
    let mut rng = Rng(seed);
    let (x, dy, w, b) = (rng.values(n), rng.values(n), rng.values(c), rng.values(c));
    let size = if bf16 { 2 } else { 4 };
    // Buffers: 0 x, 1 dy, 2 w, 3 b, 4 y, 5 dx.
    let mut plan = buffers(dir, &[(&x, bf16), (&dy, bf16), (&w, false), (&b, false)], &[n * size, n * size]);
    let suffix = if bf16 { "bf16" } else { "f32" };
    let a = |id| buffer_addr(id, 0);
    plan += &launch_line(&norm_cuda::layer_launch(
        &format!("ln_fwd_{suffix}"),
        rows,
        c,
        [a(0), a(2), a(3), a(4)],
        1e-5,
    ));
    plan += &launch_line(&norm_cuda::layer_launch(
        &format!("ln_bwd_{suffix}"),
        rows,
        c,
        [a(0), a(1), a(2), a(5)],
        1e-5,
    ));
    for id in [4, 5] {
        plan += &format!("output {id} {}\n", dir.join(format!("norm_out{id}.bin")).display());
    }
    run_plan(exe, dir, &plan);
    let read = |id: usize| decode(&std::fs::read(dir.join(format!("norm_out{id}.bin"))).unwrap(), bf16);
    let (want_y, want_dx) = norm_reference(
        &f64_tensor(&x, &[rows, c]),
        &[rows, c],
        &[1, c],
        &f64_tensor(&w, &[c]),
        &f64_tensor(&b, &[c]),
        &f64_tensor(&dy, &[rows, c]),
    );
    let tol = if bf16 { 2e-2 } else { 2e-5 };
    let e = max_rel(&want_y, &read(4));
    assert!(e < tol, "{rows}x{c} {suffix}: LayerNorm output off by {e:.2e}");
    let e = max_rel(&want_dx, &read(5));
    assert!(e < tol, "{rows}x{c} {suffix}: LayerNorm input gradient off by {e:.2e}");
}

/// GroupNorm: a row in eight chunks with a shorter last one (f32 and bf16), rows shorter than a
/// block with several images and groups; LayerNorm rows wider and narrower than a block's
/// threads.
#[test]
fn norm_kernels_match_the_composed_norms_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("norm") else { return };
    let long = GroupDims::of(&[1, 4, 61, 67], 1).unwrap();
    let (nk, chunk) = long.chunks();
    assert!(
        nk > 2 && !long.len().is_multiple_of(chunk),
        "{nk} chunks of {chunk}: the case must leave a partial chunk"
    );
    for bf16 in [false, true] {
        check_group_norm(&exe, &dir, [1, 4, 61, 67], 1, bf16, 21);
        check_group_norm(&exe, &dir, [3, 6, 5, 7], 3, bf16, 22);
        check_layer_norm(&exe, &dir, 3, 1000, bf16, 23);
        check_layer_norm(&exe, &dir, 5, 24, bf16, 24);
    }
    // The warp-per-row kernels (bf16, widths 256 / 512 / 1024): row counts that leave a block's
    // last warps without a row.
    for (rows, c, seed) in [(11, 256, 25), (9, 512, 26), (3, 1024, 27)] {
        let l =
            norm_cuda::layer_launch("ln_fwd_bf16", rows, c, [0, 16, 32, 48].map(|o| buffer_addr(o, 0)), 1e-5);
        assert_eq!(l.name, format!("ln_fwd_warp_bf16_{}", c / 256));
        check_layer_norm(&exe, &dir, rows, c, true, seed);
    }
}

/// The gradient-statistics kernel over tensors of mixed lengths (one element; shorter than a
/// block; several blocks' worth, so each tensor's partials are combined), in three groups, one
/// with an infinity and one with a NaN, against f64 sums.
#[test]
fn gradient_statistics_kernel_matches_f64_in_emulation() {
    use lorahost::train::stats_cuda;
    let Some((_tmp, dir, exe)) = setup("stats") else { return };
    let mut rng = Rng(31);
    let lens = [1usize, 200, 5000, 70_000, 3];
    let owner = [0usize, 1, 0, 2, 1];
    let mut tensors: Vec<Vec<f32>> = lens.iter().map(|&n| rng.values(n)).collect();
    tensors[1][17] = f32::INFINITY;
    tensors[3][12_345] = f32::NAN;
    // Buffers: 0 table, 1 partials, 2.. the tensors.
    let max_n = *lens.iter().max().unwrap();
    let blocks = stats_cuda::blocks_per_tensor(max_n);
    assert!(blocks > 1);
    let table: Vec<u8> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| [buffer_addr(2 + i, 0), n as u64])
        .flat_map(|w| w.to_le_bytes())
        .collect();
    std::fs::write(dir.join("table.bin"), &table).unwrap();
    let mut plan = format!("buffer {} {}\n", table.len(), dir.join("table.bin").display());
    plan += &format!("buffer {} -\n", lens.len() * blocks * 3 * 4);
    for (i, t) in tensors.iter().enumerate() {
        let path = dir.join(format!("grad{i}.bin"));
        std::fs::write(&path, encode(t, false)).unwrap();
        plan += &format!("buffer {} {}\n", t.len() * 4, path.display());
    }
    plan += "pointers 0 2\n";
    plan += &launch_line(&stats_cuda::launch_plan(buffer_addr(0, 0), lens.len(), max_n, buffer_addr(1, 0)));
    plan += &format!("output 1 {}\n", dir.join("partials.bin").display());
    run_plan(&exe, &dir, &plan);
    let partials = decode(&std::fs::read(dir.join("partials.bin")).unwrap(), false);
    let got = stats_cuda::combine(&partials, blocks, &owner, 3);
    for (g, &(s, m, b)) in got.iter().enumerate() {
        let members: Vec<&Vec<f32>> =
            tensors.iter().zip(owner).filter(|(_, o)| *o == g).map(|(t, _)| t).collect();
        let sum_sq: f64 = members.iter().flat_map(|t| t.iter()).map(|&v| (v as f64) * (v as f64)).sum();
        let bad = members.iter().flat_map(|t| t.iter()).filter(|v| !v.is_finite()).count() as u64;
        let max = members.iter().flat_map(|t| t.iter()).fold(0f64, |m, &v| {
            if m.is_nan() || v.is_nan() {
                f64::NAN
            } else {
                m.max(v.abs() as f64)
            }
        });
        assert_eq!(b, bad, "group {g}: non-finite count");
        assert!(m == max || (m.is_nan() && max.is_nan()), "group {g}: max {m} vs {max}");
        assert!(
            s == sum_sq || (s - sum_sq).abs() <= 1e-5 * sum_sq || (s.is_nan() && sum_sq.is_nan()),
            "group {g}: sum of squares {s} vs {sum_sq}"
        );
    }
    // The cases are what they claim: finite, infinite, NaN.
    assert!(got[0].0.is_finite() && got[0].0 > 100.0, "{got:?}");
    assert!(got[1].0.is_infinite() && got[1].1.is_infinite() && got[1].2 == 1, "{got:?}");
    assert!(got[2].0.is_nan() && got[2].1.is_nan() && got[2].2 == 1, "{got:?}");
}

/// A strided view (`dims`, element `strides`, starting `offset` elements into its buffer) of a
/// random buffer copied by the emulated row-copy kernel, against the view's elements read
/// through its strides; `unit` is the copy unit the plan must pick.
fn check_rows_copy(
    exe: &Path,
    dir: &Path,
    dims: &[usize],
    strides: &[usize],
    offset: usize,
    bf16: bool,
    unit: usize,
) {
    use lorahost::sam3::copy_cuda::{launch_plan, RowsCopy};
    let elem = if bf16 { 2 } else { 4 };
    let span = offset + dims.iter().zip(strides).map(|(d, s)| (d - 1) * s).sum::<usize>() + 1;
    let values = Rng(41).values(span);
    let plan = RowsCopy::plan(dims, strides, elem, buffer_addr(0, offset * elem)).expect("a plan");
    assert_eq!(plan.unit, unit, "{dims:?} {strides:?}: copy unit");
    let n: usize = dims.iter().product();
    std::fs::write(dir.join("copy_in.bin"), encode(&values, bf16)).unwrap();
    let mut text =
        format!("buffer {} {}\nbuffer {} -\n", span * elem, dir.join("copy_in.bin").display(), n * elem);
    text += &launch_line(&launch_plan(&plan, buffer_addr(0, offset * elem), buffer_addr(1, 0)));
    text += &format!("output 1 {}\n", dir.join("copy_out.bin").display());
    run_plan(exe, dir, &text);
    let got = decode(&std::fs::read(dir.join("copy_out.bin")).unwrap(), bf16);
    // The reference: the view's elements in row-major order, read through its strides.
    let mut want_rows = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        let at = offset + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        want_rows.push(values[at]);
        for k in (0..dims.len()).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    assert_eq!(got, want_rows, "{dims:?} {strides:?}: row copy differs");
}

/// The window partition (2, 6, 6, 16) → windows of 3 and its inverse, bf16 and f32, from an
/// aligned and a misaligned start; a row of three bf16 values (2-byte units).
#[test]
fn row_copy_kernel_matches_strided_reads_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("copy") else { return };
    let (b, n, ws, c) = (2usize, 2usize, 3usize, 16usize);
    let w = n * ws;
    let partition = ([b, n, n, ws, ws, c], [w * w * c, ws * w * c, ws * c, w * c, c, 1]);
    let unpartition = ([b, n, ws, n, ws, c], [w * w * c, n * ws * ws * c, ws * c, ws * ws * c, c, 1]);
    check_rows_copy(&exe, &dir, &partition.0, &partition.1, 0, true, 16);
    check_rows_copy(&exe, &dir, &unpartition.0, &unpartition.1, 0, true, 16);
    check_rows_copy(&exe, &dir, &partition.0, &partition.1, 1, false, 4);
    check_rows_copy(&exe, &dir, &[5, 4, 3], &[3, 15, 1], 0, true, 2);
}

/// f32 → bf16 value, round to nearest even (the kernels' `st`).
fn round_bf16(v: f32) -> f32 {
    let u = v.to_bits();
    f32::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1))) & 0xffff_0000)
}

/// The linear epilogue `y + bias[col] + z` over rows × cols with a grid of 3 × 32 threads (the
/// column steps by the stride modulo cols), with and without its optional operands.
#[test]
fn epilogue_and_rope_kernels_match_their_formulas_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("fused") else { return };
    let mut rng = Rng(51);
    let (rows, cols) = (37usize, 13usize);
    let n = rows * cols;
    let (y, bias, z) = (rng.values(n), rng.values(cols), rng.values(n));
    for (with_bias, with_z) in [(true, true), (true, false), (false, true)] {
        let mut plan = buffers(&dir, &[(&y, true), (&bias, true), (&z, true)], &[n * 2]);
        let addrs = [
            buffer_addr(0, 0),
            if with_bias { buffer_addr(1, 0) } else { 0 },
            if with_z { buffer_addr(2, 0) } else { 0 },
            buffer_addr(3, 0),
        ];
        // The host's plan, on a grid small enough that each thread steps several times.
        let mut l = fused_cuda::epilogue_launch("bf16", addrs, n, cols);
        (l.grid, l.block) = ((3, 1, 1), 32);
        plan += &launch_line(&l);
        plan += &format!("output 3 {}\n", dir.join("epi.bin").display());
        run_plan(&exe, &dir, &plan);
        let got = from_bf16_bytes(&std::fs::read(dir.join("epi.bin")).unwrap());
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let mut v = y[i];
                if with_bias {
                    v += bias[i % cols];
                }
                if with_z {
                    v += z[i];
                }
                round_bf16(v)
            })
            .collect();
        assert_eq!(got, want, "epilogue (bias {with_bias}, z {with_z})");
    }

    // RoPE: rows (B·N, H·D) → heads first (B, H, N, D) rotated by +angle, and the inverse.
    let (batch, heads, n_tok, d) = (2usize, 3usize, 5usize, 8usize);
    let half = d / 2;
    let total = batch * heads * n_tok * d;
    let src = rng.values(total);
    let angles: Vec<f32> = (0..n_tok * half).map(|k| 0.37 * k as f32 - 1.1).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    for inverse in [false, true] {
        let mut plan = buffers(&dir, &[(&src, true), (&cos, false), (&sin, false)], &[total * 2]);
        let addrs = [buffer_addr(0, 0), buffer_addr(1, 0), buffer_addr(2, 0), buffer_addr(3, 0)];
        let mut l = fused_cuda::rope_launch("bf16", addrs, (batch, heads, n_tok, d), inverse);
        (l.grid, l.block) = ((2, 1, 1), 32);
        plan += &launch_line(&l);
        plan += &format!("output 3 {}\n", dir.join("rope.bin").display());
        run_plan(&exe, &dir, &plan);
        let got = from_bf16_bytes(&std::fs::read(dir.join("rope.bin")).unwrap());
        let mut want = vec![0f32; total];
        for b in 0..batch {
            for h in 0..heads {
                for t in 0..n_tok {
                    for j in 0..half {
                        let rows_at = (b * n_tok + t) * heads * d + h * d + 2 * j;
                        let heads_at = ((b * heads + h) * n_tok + t) * d + 2 * j;
                        let (c, s) = (cos[t * half + j], sin[t * half + j]);
                        if inverse {
                            let (x0, x1) = (src[heads_at], src[heads_at + 1]);
                            want[rows_at] = round_bf16(x0 * c + x1 * s);
                            want[rows_at + 1] = round_bf16(x1 * c - x0 * s);
                        } else {
                            let (x0, x1) = (src[rows_at], src[rows_at + 1]);
                            want[heads_at] = round_bf16(x0 * c - x1 * s);
                            want[heads_at + 1] = round_bf16(x1 * c + x0 * s);
                        }
                    }
                }
            }
        }
        let e = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(e <= 1e-2, "RoPE (inverse {inverse}) off by {e}");
    }
}

/// The adapter factors' conversion: A cast to bf16, then B times the scale cast to bf16, in one
/// buffer, against the casts written out here (f32 product, round to nearest even), on a grid
/// whose stride leaves several entries per thread.
#[test]
fn factor_conversion_matches_the_casts_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("factors") else { return };
    let mut rng = Rng(81);
    let (na, nb, scale) = (37usize, 50usize, 2.5f32);
    let (a, b) = (rng.values(na), rng.values(nb));
    // Not only bf16 values: the conversion must round.
    let a: Vec<f32> = a.iter().map(|v| v * 1.337).collect();
    let mut plan = buffers(&dir, &[(&a, false), (&b, false)], &[(na + nb) * 2]);
    let mut l =
        fused_cuda::factors_launch([buffer_addr(0, 0), buffer_addr(1, 0), buffer_addr(2, 0)], na, nb, scale);
    (l.grid, l.block) = ((2, 1, 1), 32);
    plan += &launch_line(&l);
    plan += &format!("output 2 {}\n", dir.join("factors.bin").display());
    run_plan(&exe, &dir, &plan);
    let got = from_bf16_bytes(&std::fs::read(dir.join("factors.bin")).unwrap());
    let want: Vec<f32> =
        a.iter().map(|&v| round_bf16(v)).chain(b.iter().map(|&v| round_bf16(v * scale))).collect();
    assert_eq!(got, want);
}

/// The counter-based generator (the host's `mask_key` and the kernels' `pair_bits` and
/// `kept`), written out here: entry `i` of the mask at position `offset` of stream `seed`.
fn keep_draw(seed: u64, offset: u64, i: u64, threshold: u32) -> bool {
    fn mix64(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn mix32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    }
    let key = mix64(seed ^ mix64(offset));
    let bits = mix32(mix32((i / 2) as u32 ^ key as u32).wrapping_add((key >> 32) as u32));
    let draw = if i % 2 == 1 { bits >> 16 } else { bits & 0xffff };
    draw >= threshold
}

/// The dropout generator's draws behave like independent coin flips with the asked
/// probability: the kept share, the correlation of neighbours (at lags 1 to 3, and the two
/// entries that share a hash), of the masks of neighbouring positions of a stream and of two
/// streams, all within five standard errors of what independent draws give.
#[test]
fn the_dropout_generator_draws_independent_entries() {
    let n = 1usize << 18;
    for p in [0.1, 0.5] {
        let threshold = (p * 65_536.0f64).ceil() as u32;
        assert_eq!(fused_cuda::threshold(p), threshold, "p = {p}");
        let draws = |seed: u64, offset: u64| -> Vec<f64> {
            (0..n as u64).map(|i| f64::from(u8::from(keep_draw(seed, offset, i, threshold)))).collect()
        };
        let a = draws(0xfeed, 4096);
        let mean = a.iter().sum::<f64>() / n as f64;
        let se = (p * (1.0 - p) / n as f64).sqrt();
        assert!((mean - (1.0 - p)).abs() < 5.0 * se, "p = {p}: kept share {mean}");
        let corr = |x: &[f64], y: &[f64]| -> f64 {
            let m = x.len() as f64;
            let (mx, my) = (x.iter().sum::<f64>() / m, y.iter().sum::<f64>() / m);
            let cov = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum::<f64>() / m;
            let vx = x.iter().map(|a| (a - mx).powi(2)).sum::<f64>() / m;
            let vy = y.iter().map(|b| (b - my).powi(2)).sum::<f64>() / m;
            cov / (vx * vy).sqrt()
        };
        let limit = |m: usize| 5.0 / (m as f64).sqrt();
        for lag in 1..=3 {
            let c = corr(&a[..n - lag], &a[lag..]);
            assert!(c.abs() < limit(n - lag), "p = {p}: lag-{lag} correlation {c}");
        }
        let (even, odd): (Vec<f64>, Vec<f64>) = a.chunks(2).map(|c| (c[0], c[1])).unzip();
        let c = corr(&even, &odd);
        assert!(c.abs() < limit(n / 2), "p = {p}: the two halves of a hash correlate ({c})");
        for (what, b) in
            [("the next position", draws(0xfeed, 4096 + n as u64)), ("another stream", draws(0xbeef, 4096))]
        {
            let c = corr(&a, &b);
            assert!(c.abs() < limit(n), "p = {p}: the mask of {what} correlates ({c})");
        }
    }
}

/// The dropout mask's generator, and the adapted linears' activation/dropout and input-gradient
/// kernels with the mask drawn into bytes and left to the kernels (each draws its entries again
/// from the generator's key): the mask is the hash written out in Rust (kept
/// share 1 − p), both ways of applying it give the same bytes, and the values follow the
/// formulas (ReLU and no activation exactly, GELU within bf16 rounding of candle's f64 GELU).
#[test]
fn dropout_kernels_draw_the_same_mask_either_way_in_emulation() {
    let Some((_tmp, dir, exe)) = setup("dropout") else { return };
    let mut rng = Rng(61);
    let (n, p, seed, offset) = (4099usize, 0.3, 0xfeed_u64, 77_777u64);
    // The mask as bytes, on a grid whose stride leaves several elements per thread.
    let mut plan = buffers(&dir, &[], &[n]);
    let mut l = fused_cuda::keep_mask_launch(buffer_addr(0, 0), seed, offset, p, n);
    (l.grid, l.block) = ((5, 1, 1), 64);
    plan += &launch_line(&l);
    plan += &format!("output 0 {}\n", dir.join("mask.bin").display());
    run_plan(&exe, &dir, &plan);
    let mask = std::fs::read(dir.join("mask.bin")).unwrap();
    let threshold = (p * 65_536.0f64).ceil() as u32;
    let want: Vec<u8> = (0..n as u64).map(|i| u8::from(keep_draw(seed, offset, i, threshold))).collect();
    assert_eq!(mask, want, "the mask kernel draws the generator's values");
    let kept = mask.iter().map(|&k| k as f64).sum::<f64>() / n as f64;
    assert!((kept - (1.0 - p)).abs() < 0.03, "kept share {kept} for p = {p}");

    let (x, d1, d2) = (rng.values(n), rng.values(n), rng.values(n));
    let scale = (1.0 / (1.0 - p)) as f32;
    let gelu: Vec<f32> = {
        let t = Tensor::from_vec(x.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        t.gelu_erf().unwrap().to_vec1::<f64>().unwrap().iter().map(|&v| v as f32).collect()
    };
    std::fs::write(dir.join("maskbytes.bin"), &mask).unwrap();
    for act in [0i32, 5, 1] {
        let mut outs = Vec::new();
        for drawn in [true, false] {
            // Buffers: 0 x, 1 d1, 2 d2, 3 the mask bytes; 4 xa, 5 xm, 6 dx.
            let mut plan = buffers(&dir, &[(&x, true), (&d1, true), (&d2, true)], &[]);
            plan += &format!("buffer {n} {}\n", dir.join("maskbytes.bin").display());
            plan += &format!("buffer {} -\n", n * 2).repeat(3);
            let m = if drawn {
                fused_cuda::MaskArgs::drawn(buffer_addr(3, 0), p)
            } else {
                fused_cuda::MaskArgs::counter(seed, offset, p)
            };
            let addrs = [buffer_addr(0, 0), buffer_addr(4, 0), buffer_addr(5, 0)];
            let mut l = fused_cuda::act_drop_launch("bf16", addrs, m, act, n);
            (l.grid, l.block) = ((3, 1, 1), 64);
            plan += &launch_line(&l);
            let x_arg = if act == 0 { 0 } else { buffer_addr(0, 0) };
            let addrs = [buffer_addr(1, 0), buffer_addr(2, 0), x_arg, buffer_addr(6, 0)];
            let mut l = fused_cuda::input_grad_launch("bf16", addrs, m, act, n);
            (l.grid, l.block) = ((3, 1, 1), 64);
            plan += &launch_line(&l);
            for id in 4..7 {
                plan += &format!("output {id} {}\n", dir.join(format!("out{id}.bin")).display());
            }
            run_plan(&exe, &dir, &plan);
            let read = |id: usize| from_bf16_bytes(&std::fs::read(dir.join(format!("out{id}.bin"))).unwrap());
            outs.push([read(4), read(5), read(6)]);
        }
        assert_eq!(outs[0], outs[1], "act {act}: the counter mask differs from the drawn one");
        let [xa, xm, dx] = &outs[0];
        let a = |i: usize| match act {
            0 => x[i],
            5 => x[i].max(0.0),
            _ => gelu[i],
        };
        let tol = if act == 1 { 1e-2 } else { 0.0 };
        for i in 0..n {
            let keep = mask[i] == 1;
            if act != 0 {
                assert!((xa[i] - round_bf16(a(i))).abs() <= tol * a(i).abs().max(1.0), "xa[{i}], act {act}");
            }
            let want = if keep { round_bf16(a(i) * scale) } else { 0.0 };
            assert!(
                (xm[i] - want).abs() <= tol * want.abs().max(1.0),
                "xm[{i}] {} vs {want}, act {act}",
                xm[i]
            );
            if act == 0 {
                let want = round_bf16(d1[i] + if keep { d2[i] * scale } else { 0.0 });
                assert_eq!(dx[i], want, "dx[{i}]");
            } else if act == 5 {
                let d = d1[i] + if keep { d2[i] * scale } else { 0.0 };
                let want = round_bf16(if x[i] > 0.0 { d } else { 0.0 });
                assert_eq!(dx[i], want, "dx[{i}] (ReLU)");
            }
        }
    }
}

/// The LoRA kernels (`lowrank.cu`): the down-projection `h = drop(act(x))·Aᵀ` and the factor
/// gradient `dA = gᵀ·drop(act(x))` against f64 products of the dropped-out input written out
/// here (the generator's draws or drawn bytes, the activation, the scale, bf16 rounding), for
/// ranks in each of the kernels' tile sizes (one not a multiple of 8), row and column counts
/// that leave partial tiles, with and without an activation, and dA in one chunk and in several.
#[test]
fn lowrank_kernels_match_the_products_of_the_dropped_out_input_in_emulation() {
    use lorahost::sam3::lowrank_cuda;
    let Some((_tmp, dir, exe)) = setup("lowrank") else { return };
    let mut rng = Rng(71);
    let (seed, offset) = (0xabcd_u64, 999u64);
    // (rows, k, rank, act, p, drawn mask bytes, the dA split)
    let cases = [
        (37usize, 80usize, 32usize, 0i32, 0.3, false, (2usize, 32usize)),
        (37, 80, 32, 0, 0.3, true, (1, 64)),
        (19, 36, 64, 5, 0.5, false, (1, 32)),
        (40, 130, 10, 1, 0.1, false, (3, 32)),
        (16, 16, 16, 0, 0.0, false, (1, 32)),
    ];
    for (rows, k, r, act, p, drawn, split) in cases {
        let what = format!("{rows}x{k} rank {r} act {act} p {p} drawn {drawn}");
        let n = rows * k;
        let (x, a, g) = (rng.values(n), rng.values(r * k), rng.values(rows * r));
        let threshold = (p * 65_536.0f64).ceil() as u32;
        let keep: Vec<bool> = (0..n as u64).map(|i| keep_draw(seed, offset, i, threshold)).collect();
        let gelu: Vec<f64> = f64_tensor(&x, &[n]).gelu_erf().unwrap().to_vec1::<f64>().unwrap();
        let scale = (1.0 / (1.0 - p)) as f32;
        let xm: Vec<f64> = (0..n)
            .map(|i| {
                let v = match act {
                    0 => x[i],
                    5 => x[i].max(0.0),
                    _ => gelu[i] as f32,
                };
                if keep[i] {
                    round_bf16(v * scale) as f64
                } else {
                    0.0
                }
            })
            .collect();
        let mask_bytes: Vec<u8> = keep.iter().map(|&k| u8::from(k)).collect();
        // Buffers: 0 x, 1 A, 2 g, 3 the mask bytes, 4 h, 5 the partial sums, 6 dA.
        let mut plan = buffers(&dir, &[(&x, true), (&a, true), (&g, true)], &[]);
        std::fs::write(dir.join("lrmask.bin"), &mask_bytes).unwrap();
        plan += &format!("buffer {n} {}\n", dir.join("lrmask.bin").display());
        plan +=
            &format!("buffer {} -\nbuffer {} -\nbuffer {} -\n", rows * r * 2, split.0 * r * k * 4, r * k * 4);
        // 7 d1 (the base part of the input gradient), 8 dx.
        let d1 = rng.values(n);
        std::fs::write(dir.join("lrd1.bin"), bf16_bytes(&d1)).unwrap();
        plan += &format!("buffer {} {}\nbuffer {} -\n", n * 2, dir.join("lrd1.bin").display(), n * 2);
        let m = match (drawn, p > 0.0) {
            (_, false) => fused_cuda::MaskArgs::NONE,
            (true, true) => fused_cuda::MaskArgs::drawn(buffer_addr(3, 0), p),
            (false, true) => fused_cuda::MaskArgs::counter(seed, offset, p),
        };
        let [xa, aa, ga, ha, pa, da] = [0, 1, 2, 4, 5, 6].map(|id| buffer_addr(id, 0));
        plan += &launch_line(&lowrank_cuda::down_launch([xa, aa, ha], rows, k, r, m, act));
        for l in lowrank_cuda::grad_a_launches([ga, xa, pa, da], rows, k, r, m, act, split) {
            plan += &launch_line(&l);
        }
        let x_arg = if act == 0 { 0 } else { xa };
        let addrs = [buffer_addr(7, 0), ga, aa, x_arg, buffer_addr(8, 0)];
        plan += &launch_line(&lowrank_cuda::input_grad_launch(addrs, rows, k, r, m, act));
        plan +=
            &format!("output 4 {}\noutput 6 {}\n", dir.join("h.bin").display(), dir.join("da.bin").display());
        plan += &format!("output 8 {}\n", dir.join("dx.bin").display());
        run_plan(&exe, &dir, &plan);
        let h = from_bf16_bytes(&std::fs::read(dir.join("h.bin")).unwrap());
        let da = decode(&std::fs::read(dir.join("da.bin")).unwrap(), false);
        let want_h: Vec<f64> = (0..rows * r)
            .map(|e| {
                let (row, j) = (e / r, e % r);
                (0..k).map(|c| xm[row * k + c] * a[j * k + c] as f64).sum()
            })
            .collect();
        let want_da: Vec<f64> = (0..r * k)
            .map(|e| {
                let (j, c) = (e / k, e % k);
                (0..rows).map(|row| g[row * r + j] as f64 * xm[row * k + c]).sum()
            })
            .collect();
        let off = |want: &[f64], got: &[f32]| {
            let top = want.iter().fold(1e-9f64, |m, v| m.max(v.abs()));
            want.iter().zip(got).fold(0f64, |m, (w, g)| m.max((w - *g as f64).abs())) / top
        };
        // GELU in f32 (erff) against candle's f64 may round an entry of drop(act(x)) the other way.
        let (tol_h, tol_da) = if act == 1 { (1e-2, 1e-2) } else { (8e-3, 1e-5) };
        let (eh, ed) = (off(&want_h, &h), off(&want_da, &da));
        assert!(eh <= tol_h, "{what}: h off by {eh:.3e} relative");
        assert!(ed <= tol_da, "{what}: dA off by {ed:.3e} relative");
        // dx = (d1 + drop(g·A)) ⊙ act'(x), rounded to bf16 once.
        let dx = from_bf16_bytes(&std::fs::read(dir.join("dx.bin")).unwrap());
        let want_dx: Vec<f64> = (0..n)
            .map(|i| {
                let (row, c) = (i / k, i % k);
                let ga: f64 = (0..r).map(|j| g[row * r + j] as f64 * a[j * k + c] as f64).sum();
                let d = d1[i] as f64 + if keep[i] { ga * scale as f64 } else { 0.0 };
                let xv = x[i] as f64;
                let slope = match act {
                    0 => 1.0,
                    5 => f64::from(u8::from(xv > 0.0)),
                    _ => {
                        let cdf = 0.5 * (1.0 + erf(xv / std::f64::consts::SQRT_2));
                        cdf + xv * (-0.5 * xv * xv).exp() / (2.0 * std::f64::consts::PI).sqrt()
                    }
                };
                d * slope
            })
            .collect();
        let ex = off(&want_dx, &dx);
        assert!(ex <= 8e-3, "{what}: dx off by {ex:.3e} relative");
    }
}

/// erf through candle's f64 implementation (the GELU derivative's reference).
fn erf(v: f64) -> f64 {
    Tensor::new(&[v], &Device::Cpu).unwrap().erf().unwrap().to_vec1::<f64>().unwrap()[0]
}
