//! `lorahost selftest`: the training ops lorahost writes itself (lean attention, the adapted
//! linear, the frozen 3×3 convolution and norms, the ViT block as one op, the DETR and
//! geometry layers as ops), run on the chosen device and dtype and compared, forward and every
//! input gradient, with the composed candle computation in f64 on the CPU (the ViT block in
//! half precision and the DETR layers: with the same layers op by op in the same dtype on the
//! device). It answers "is this
//! GPU build computing the right gradients" in seconds, before a long run trusts it; the unit
//! tests cover the same ops on the CPU only.

use crate::lora::LoraAdapter;
use crate::sam3::attention::{attention_lean, attention_lean_chunked};
use crate::sam3::frozen::frozen_linear;
use crate::sam3::nn::Activation;
use crate::sam3::ops::{self, OutputMap};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// One op compared with its reference.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The op and case.
    pub name: String,
    /// Relative error of the output: max |got − want| / max |want|.
    pub forward: f64,
    /// Relative error of each input's gradient.
    pub grads: Vec<(String, f64)>,
    /// The largest relative error allowed in this dtype.
    pub tolerance: f64,
    /// All errors within the tolerance.
    pub ok: bool,
}

/// The relative error allowed for `dtype`: bf16 / f16 rounding (8 / 11 mantissa bits, through a
/// few ops), or f32's.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 3e-2,
        DType::F16 => 1e-2,
        _ => 1e-4,
    }
}

/// An input of the check: the f64 CPU reference variable and the device one (`dtype`).
struct Input {
    name: &'static str,
    reference: Var,
    device: Var,
}

impl Input {
    fn new(name: &'static str, shape: &[usize], device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        let mut r = crate::data::SplitMix64::from_parts(&[seed, 0x5e1f]);
        let n: usize = shape.iter().product();
        // Uniform in [-1, 1): exactly representable after rounding the same way on both sides.
        let v: Vec<f64> = (0..n).map(|_| (r.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0).collect();
        let reference = Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F64)?;
        Ok(Input {
            name,
            device: Var::from_tensor(&reference.to_dtype(dtype)?.to_device(device)?)?,
            reference: Var::from_tensor(&reference)?,
        })
    }
}

fn rel(want: &Tensor, got: &Tensor) -> Result<f64> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-300);
    Ok((want - got)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
}

/// Compare `op` on the device inputs with `reference` on the f64 ones: output, and the gradient
/// of Σ out ⊙ T (T random) for every input.
fn compare(
    name: &str,
    inputs: &[Input],
    dtype: DType,
    reference: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    op: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<Check> {
    let refs: Vec<Tensor> = inputs.iter().map(|i| i.reference.as_tensor().clone()).collect();
    let devs: Vec<Tensor> = inputs.iter().map(|i| i.device.as_tensor().clone()).collect();
    let want = reference(&refs).with_context(|| format!("{name}: reference"))?;
    let got = op(&devs).with_context(|| format!("{name}: on the device"))?;
    anyhow::ensure!(got.dims() == want.dims(), "{name}: shape {:?}, expected {:?}", got.dims(), want.dims());
    let device = devs[0].device().clone();
    let target = Input::new("target", want.dims(), &device, DType::F32, 99)?;
    let gw = (&want * target.reference.as_tensor())?.sum_all()?.backward()?;
    let t = target.device.as_tensor().to_dtype(got.dtype())?;
    let gg = (got.to_dtype(DType::F32)? * t.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
    let forward = rel(&want, &got)?;
    let mut grads = Vec::new();
    for i in inputs {
        let w = gw
            .get(i.reference.as_tensor())
            .with_context(|| format!("{name}: no reference gradient of {}", i.name))?;
        let g = gg
            .get(i.device.as_tensor())
            .with_context(|| format!("{name}: no gradient of {} on the device", i.name))?;
        grads.push((i.name.to_string(), rel(w, g)?));
    }
    let tolerance = tolerance(dtype);
    let ok = forward <= tolerance && grads.iter().all(|g| g.1 <= tolerance);
    Ok(Check { name: name.to_string(), forward, grads, tolerance, ok })
}

/// `x` viewed as `groups` (last axis normalised), standardised: (x − mean) / √(var + eps),
/// in x's dtype (f64 for the references).
fn normalized(x: &Tensor, groups: &[usize], eps: f64) -> candle_core::Result<Tensor> {
    let xg = x.reshape(groups)?;
    let xc = xg.broadcast_sub(&xg.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(x.dims())
}

/// The composed attention of `t` = [q (B, H, Nq, D), k and v (B, Nk, H, D)] with an optional
/// additive bias, its output (B, Nq, H, D) contiguous when `tokens_major`.
fn attention_reference(
    t: &[Tensor],
    scale: f64,
    bias: Option<&Tensor>,
    tokens_major: bool,
) -> candle_core::Result<Tensor> {
    let (k, v) = (t[1].transpose(1, 2)?.contiguous()?, t[2].transpose(1, 2)?.contiguous()?);
    let mut s = (t[0].matmul(&k.t()?)? * scale)?;
    if let Some(bias) = bias {
        s = s.broadcast_add(bias)?;
    }
    let o = candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&v)?;
    if tokens_major {
        o.transpose(1, 2)?.contiguous()
    } else {
        Ok(o)
    }
}

/// The frozen 3×3 convolution against candle's f64 conv2d.
fn conv_check(device: &Device, dtype: DType) -> Result<Check> {
    let inputs = vec![Input::new("x", &[2, 6, 9, 11], device, dtype, 16)?];
    let (wc, bc) =
        (Input::new("w", &[5, 6, 3, 3], device, dtype, 17)?, Input::new("b", &[5], device, dtype, 18)?);
    let reference = |t: &[Tensor]| {
        t[0].conv2d(wc.reference.as_tensor(), 1, 1, 1, 1)?
            .broadcast_add(&bc.reference.as_tensor().reshape((1, 5, 1, 1))?)
    };
    let op = |t: &[Tensor]| {
        crate::sam3::frozen::frozen_conv3x3(
            &t[0],
            &wc.device.as_tensor().detach(),
            &bc.device.as_tensor().detach(),
        )
    };
    compare("conv 3x3", &inputs, dtype, reference, op)
}

/// Run every check on `device` in `dtype` (the frozen compute dtype; LoRA factors stay f32).
pub fn run(device: &Device, dtype: DType) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let inp = |name, shape: &[usize], dt, seed| Input::new(name, shape, device, dt, seed);

    // Lean attention: q heads-first, k and v transposed from tokens-first (as the model hands
    // them over), several uneven query chunks, with and without a per-query bias.
    let (b, h, nq, nk, d) = (2, 3, 37, 29, 16);
    for (case, with_bias) in [("no bias", false), ("bias", true)] {
        let inputs = vec![
            inp("q", &[b, h, nq, d], dtype, 1)?,
            inp("k", &[b, nk, h, d], dtype, 2)?,
            inp("v", &[b, nk, h, d], dtype, 3)?,
        ];
        let bias = inp("bias", &[b, 1, nq, nk], dtype, 4)?;
        let scale = 1.0 / (d as f64).sqrt();
        // A constant bias (untracked), as the model's masks are.
        let bias_ref = with_bias.then(|| bias.reference.as_tensor().detach() * 2.0).transpose()?;
        let bias_dev = with_bias.then(|| bias.device.as_tensor().detach() * 2.0).transpose()?;
        for tokens_major in [false, true] {
            let name = format!("lean attention ({case}{})", if tokens_major { ", tokens-major" } else { "" });
            let reference = |t: &[Tensor]| attention_reference(t, scale, bias_ref.as_ref(), tokens_major);
            let op = |t: &[Tensor]| {
                let (k, v) = (t[1].transpose(1, 2)?, t[2].transpose(1, 2)?);
                // 7 query rows per chunk: 37 = 5 × 7 + 2.
                attention_lean_chunked(&t[0], &k, &v, scale, bias_dev.as_ref(), b * h * nk * 7, tokens_major)?
                    .ok_or_else(|| candle_core::Error::Msg("lean attention not taken".into()))
            };
            checks.push(compare(&name, &inputs, dtype, reference, op)?);
        }
    }

    // Attention without a bias at the model's head dimensions (64: ViT, 32: DETR), with partial
    // query and key tiles: on CUDA in bf16 lorahost's flash kernels, elsewhere the chunked path.
    for (hd, nq, nk, tokens_major) in [(64usize, 80usize, 72usize, true), (32, 65, 130, false)] {
        let (b, h) = (2, 2);
        let inputs = vec![
            inp("q", &[b, h, nq, hd], dtype, 40)?,
            inp("k", &[b, nk, h, hd], dtype, 41)?,
            inp("v", &[b, nk, h, hd], dtype, 42)?,
        ];
        let scale = 1.0 / (hd as f64).sqrt();
        let reference = |t: &[Tensor]| attention_reference(t, scale, None, tokens_major);
        let op = |t: &[Tensor]| {
            let (k, v) = (t[1].transpose(1, 2)?, t[2].transpose(1, 2)?);
            attention_lean(&t[0], &k, &v, scale, None, tokens_major)?
                .ok_or_else(|| candle_core::Error::Msg("attention not taken".into()))
        };
        let path = if crate::sam3::flash_cuda::serves(
            &inputs[0].device.as_tensor().detach(),
            &inputs[1].device.as_tensor().transpose(1, 2)?,
            &inputs[2].device.as_tensor().transpose(1, 2)?,
        ) {
            "flash"
        } else {
            "chunked"
        };
        let name = format!("attention d{hd} {nq}x{nk} ({path})");
        checks.push(compare(&name, &inputs, dtype, reference, op)?);
    }

    // Adapted linear with GELU folded in, LoRA factors in f32, output written heads-first
    // through a layout map (the q/k projections' shape of use).
    let (rows, din, dout, rank) = (2 * 21, 48, 40, 8);
    let inputs = vec![
        inp("x", &[rows, din], dtype, 5)?,
        inp("lora_A", &[rank, din], DType::F32, 6)?,
        inp("lora_B", &[dout, rank], DType::F32, 7)?,
    ];
    let w = Input::new("w", &[dout, din], device, dtype, 8)?;
    let bias = Input::new("b", &[dout], device, dtype, 9)?;
    let s = 2.0;
    let heads_first = |y: &Tensor| y.reshape((2, 21, 4, 10))?.transpose(1, 2)?.contiguous();
    let map = OutputMap {
        forward: Arc::new(heads_first),
        backward: Arc::new(|g: &Tensor| g.transpose(1, 2)?.reshape((42, 40))),
    };
    let reference = |t: &[Tensor]| {
        let xa = t[0].gelu_erf()?;
        let y = xa.matmul(&w.reference.as_tensor().t()?)?.broadcast_add(bias.reference.as_tensor())?;
        let z = (xa.matmul(&t[1].t()?)?.matmul(&t[2].t()?)? * s)?;
        heads_first(&(y + z)?)
    };
    // t[1], t[2] are variables: `from_tensor` wraps them (same identity, so the gradients are
    // found under them), it does not copy.
    let adapter = |t: &[Tensor]| -> candle_core::Result<LoraAdapter> {
        Ok(LoraAdapter {
            a: Var::from_tensor(&t[1])?,
            b: Var::from_tensor(&t[2])?,
            scale: s,
            dropout: 0.0,
            training: Arc::new(AtomicBool::new(true)),
        })
    };
    let op = |t: &[Tensor]| {
        let (w, b) = (w.device.as_tensor().detach(), bias.device.as_tensor().detach());
        frozen_linear(&t[0], &w, Some(&b), Some(Activation::Gelu), Some(&adapter(t)?), Some(&map))
    };
    checks.push(compare("adapted linear (GELU, LoRA, heads-first map)", &inputs, dtype, reference, op)?);
    // The same without activation and map (the output summed straight into the op's storage).
    let reference = |t: &[Tensor]| {
        let y = t[0].matmul(&w.reference.as_tensor().t()?)?.broadcast_add(bias.reference.as_tensor())?;
        y + (t[0].matmul(&t[1].t()?)?.matmul(&t[2].t()?)? * s)?
    };
    let op = |t: &[Tensor]| {
        let (w, b) = (w.device.as_tensor().detach(), bias.device.as_tensor().detach());
        frozen_linear(&t[0], &w, Some(&b), None, Some(&adapter(t)?), None)
    };
    checks.push(compare("adapted linear (bias, LoRA)", &inputs, dtype, reference, op)?);

    // The frozen 3×3 convolution (FPN neck, pixel decoder); candle's CPU convolution has no
    // bf16 matmul (lorahost runs bf16 only on CUDA; the unit tests check bf16 on the CPU).
    if !(matches!(dtype, DType::BF16 | DType::F16) && device.is_cpu()) {
        checks.push(conv_check(device, dtype)?);
    }

    // The frozen norms: LayerNorm at a small width, an odd one and the ViT's (the CUDA kernel
    // spreads a row over 32..1024 threads by width).
    for (shape, seed) in [([2usize, 17, 48], 10u64), ([3, 5, 33], 20), ([2, 9, 1024], 30)] {
        let c = shape[2];
        let inputs = vec![inp("x", &shape, dtype, seed)?];
        let (wn, bn) = (
            Input::new("w", &[c], device, dtype, seed + 1)?,
            Input::new("b", &[c], device, dtype, seed + 2)?,
        );
        let reference = |t: &[Tensor]| {
            normalized(&t[0], &shape, 1e-6)?
                .broadcast_mul(wn.reference.as_tensor())?
                .broadcast_add(bn.reference.as_tensor())
        };
        let op = |t: &[Tensor]| {
            let (w, b) = (wn.device.as_tensor().detach(), bn.device.as_tensor().detach());
            ops::layer_norm_frozen(&t[0], &w, &b, 1e-6)?
                .ok_or_else(|| candle_core::Error::Msg("fused layer norm not taken".into()))
        };
        let name = if c == 48 { "layer norm".to_string() } else { format!("layer norm width {c}") };
        checks.push(compare(&name, &inputs, dtype, reference, op)?);
    }
    // Rows shorter than a block, and (on CUDA) a row the kernels cut into eight chunks.
    for (dims, groups) in [([2usize, 12, 5, 7], 3usize), ([1, 4, 61, 67], 1)] {
        let c = dims[1];
        let inputs = vec![inp("x", &dims, dtype, 13)?];
        let (wg, bg) = (Input::new("w", &[c], device, dtype, 14)?, Input::new("b", &[c], device, dtype, 15)?);
        let reference = |t: &[Tensor]| {
            let per_channel = |v: &Tensor| v.reshape((1, c, 1, 1));
            normalized(&t[0], &[dims[0], groups, c / groups * dims[2] * dims[3]], 1e-5)?
                .reshape(&dims[..])?
                .broadcast_mul(&per_channel(wg.reference.as_tensor())?)?
                .broadcast_add(&per_channel(bg.reference.as_tensor())?)
        };
        let op = |t: &[Tensor]| {
            let (w, b) = (wg.device.as_tensor().detach(), bg.device.as_tensor().detach());
            ops::group_norm_frozen(&t[0], &w, &b, groups, 1e-5)?
                .ok_or_else(|| candle_core::Error::Msg("fused group norm not taken".into()))
        };
        let name = if groups == 3 { "group norm".to_string() } else { format!("group norm {dims:?}") };
        checks.push(compare(&name, &inputs, dtype, reference, op)?);
    }
    // The ViT block as one op (hand-written backward) against the op-by-op block in f64 on the
    // CPU: a padded window block (as is, and with fc1 recomputed) and a global one (checkpointed),
    // head dimension 64 (on CUDA in bf16 the flash kernels), every adapter's factors
    // differentiated.
    use crate::sam3::vit_block::Checkpointing;
    for (ws, checkpoint) in [(4usize, Checkpointing::Off), (0, Checkpointing::Full), (4, Checkpointing::Mlp)]
    {
        checks.push(vit_block_check(device, dtype, ws, checkpoint)?);
    }
    // The DETR encoder, decoder and geometry layers as ops against the same layers op by op.
    checks.extend(detr_layer_checks(device, dtype)?);
    if dtype == DType::F32 {
        checks.push(adamw_check(device)?);
        if device.is_cuda() {
            checks.push(gradient_stats_check(device)?);
        }
    }
    if crate::sam3::fused_cuda::serves(&Tensor::zeros(1, dtype, device)?) {
        checks.push(fused_elementwise_check(device, dtype)?);
    }
    if crate::sam3::lowrank_cuda::serves(&Tensor::zeros((2, 2), dtype, device)?, 2) {
        checks.push(lowrank_check(device, dtype)?);
    }
    Ok(checks)
}

/// The LoRA kernels (GPU, bf16): the down-projection, the factor gradient and the input
/// gradient with a GELU and a counter mask, against the composed f64 computation on the CPU
/// with the same draws as bytes. `forward` is the down-projection's relative error, the two
/// gradients are reported as such.
fn lowrank_check(device: &Device, dtype: DType) -> Result<Check> {
    use crate::sam3::lowrank_cuda;
    let (rows, k, r, p) = (70usize, 144usize, 32usize, 0.25);
    let x = Input::new("x", &[rows, k], device, dtype, 80)?;
    let a = Input::new("a", &[r, k], device, dtype, 81)?;
    let g = Input::new("g", &[rows, r], device, dtype, 82)?;
    let d1 = Input::new("d1", &[rows, k], device, dtype, 83)?;
    let mask = crate::rng::KeepMask::Counter {
        seed: 11,
        offset: 4321,
        p,
        shape: x.device.as_tensor().shape().clone(),
        device: device.clone(),
    };
    let act = Activation::Gelu;
    let keep = (mask.tensor()?.to_device(&Device::Cpu)?.to_dtype(DType::F64)? / (1.0 - p))?;
    let xr = x.reference.as_tensor();
    // drop(act(x)) as the kernels form it: the activation rounded to the dtype once scaled.
    let xm = (act.apply(xr)? * &keep)?.to_dtype(dtype)?.to_dtype(DType::F64)?;
    let (ar, gr) = (a.reference.as_tensor(), g.reference.as_tensor());
    let (xd, ad, gd) = (x.device.as_tensor(), a.device.as_tensor(), g.device.as_tensor());
    let forward = rel(&xm.matmul(&ar.t()?)?, &lowrank_cuda::down(xd, ad, Some(act), Some(&mask), p)?)?;
    let da = rel(&gr.t()?.matmul(&xm)?, &lowrank_cuda::grad_a(gd, xd, Some(act), Some(&mask), p)?)?;
    let dx_want =
        ((d1.reference.as_tensor() + (gr.matmul(ar)? * &keep)?)? * crate::sam3::frozen::act_grad(act, xr)?)?;
    let dx_got = lowrank_cuda::input_grad(d1.device.as_tensor(), gd, ad, Some(&mask), p, Some((act, xd)))?;
    let dx = rel(&dx_want, &dx_got)?;
    let tolerance = tolerance(dtype);
    let grads = vec![("A (factor gradient)".to_string(), da), ("x (input gradient)".to_string(), dx)];
    let ok = forward <= tolerance && da <= tolerance && dx <= tolerance;
    Ok(Check {
        name: "LoRA kernels (down-projection, factor and input gradients)".into(),
        forward,
        grads,
        tolerance,
        ok,
    })
}

/// The names of a ViT block's adapter factors, in the order of its linears.
const BLOCK_FACTORS: [&str; 12] = [
    "q_proj A", "q_proj B", "k_proj A", "k_proj B", "v_proj A", "v_proj B", "o_proj A", "o_proj B", "fc1 A",
    "fc1 B", "fc2 A", "fc2 B",
];

/// [`crate::sam3::vit_block`] on `device` in `dtype` (window size `ws`, 0 = global) against
/// the op-by-op [`ViTLayer::forward`] (in f64 on the CPU without dropout; in bf16 on the
/// device, with dropout, both drawing the same masks), same weights.
///
/// [`ViTLayer::forward`]: crate::sam3::vision::ViTLayer::forward
fn vit_block_check(
    device: &Device,
    dtype: DType,
    ws: usize,
    checkpoint: crate::sam3::vit_block::Checkpointing,
) -> Result<Check> {
    use crate::sam3::config::VitConfig;
    use crate::sam3::vision::ViTLayer;
    use crate::sam3::visit::VisitLinears;
    let (c, mlp, heads, grid) = (128usize, 96usize, 2usize, 6usize);
    let cfg = VitConfig {
        hidden_size: c,
        intermediate_size: mlp,
        num_hidden_layers: 1,
        num_attention_heads: heads,
        num_channels: 3,
        image_size: grid * 4,
        patch_size: 4,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-6,
        window_size: 4,
        global_attn_indexes: vec![],
        pretrain_image_size: 12,
        rope_theta: None,
        rope_parameters: None,
        layer_scale_init_value: None,
    };
    // Frozen weights: uniform draws scaled and shifted in f64, rounded to `dtype` once, the
    // reference reading the rounded values.
    let mut reference = std::collections::HashMap::new();
    let mut on_device = std::collections::HashMap::new();
    let mut seed = 200;
    let mut weight = |name: String, shape: &[usize], scale: f64, shift: f64| -> Result<()> {
        seed += 1;
        let u = Input::new("w", shape, &Device::Cpu, DType::F64, seed)?.reference.as_tensor().detach();
        let v = ((u * scale)? + shift)?.to_dtype(dtype)?;
        reference.insert(name.clone(), v.to_dtype(DType::F64)?);
        on_device.insert(name, v.to_device(device)?);
        Ok(())
    };
    for ln in ["layer_norm1", "layer_norm2"] {
        weight(format!("{ln}.weight"), &[c], 0.25, 1.0)?;
        weight(format!("{ln}.bias"), &[c], 0.25, 0.0)?;
    }
    for (name, o, i) in [
        ("attention.q_proj", c, c),
        ("attention.k_proj", c, c),
        ("attention.v_proj", c, c),
        ("attention.o_proj", c, c),
    ]
    .into_iter()
    .chain([("mlp.fc1", mlp, c), ("mlp.fc2", c, mlp)])
    {
        weight(format!("{name}.weight"), &[o, i], 0.125, 0.0)?;
        weight(format!("{name}.bias"), &[o], 0.125, 0.0)?;
    }
    use candle_nn::VarBuilder;
    let layer_ref = ViTLayer::load(
        VarBuilder::from_tensors(reference, DType::F64, &Device::Cpu),
        &cfg,
        ws,
        &Device::Cpu,
    )?;
    let layer_dev = ViTLayer::load(VarBuilder::from_tensors(on_device, dtype, device), &cfg, ws, device)?;
    // Inputs: x and every adapter's factors (rank 4, f32 on the device).
    let mut inputs = vec![Input::new("x", &[2, grid, grid, c], device, dtype, 300)?];
    let mut linears = Vec::new();
    layer_ref.clone().visit_linears(&mut |lin| linears.push((lin.in_dim(), lin.out_dim())));
    for (i, (din, dout)) in linears.iter().enumerate() {
        inputs.push(Input::new(BLOCK_FACTORS[2 * i], &[4, *din], device, DType::F32, 310 + 2 * i as u64)?);
        inputs.push(Input::new(
            BLOCK_FACTORS[2 * i + 1],
            &[*dout, 4],
            device,
            DType::F32,
            311 + 2 * i as u64,
        )?);
    }
    // Dropout only where both sides draw their masks from the same generator (the half-precision
    // comparison on the device, each side from the same seed).
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let dropout = if half { 0.25 } else { 0.0 };
    let adapted = |layer: &ViTLayer, t: &[Tensor]| -> candle_core::Result<ViTLayer> {
        let mut layer = layer.clone();
        let mut i = 1;
        let mut failure = None;
        layer.visit_linears(&mut |lin| {
            match (Var::from_tensor(&t[i]), Var::from_tensor(&t[i + 1])) {
                (Ok(a), Ok(b)) => {
                    let training = Arc::new(AtomicBool::new(true));
                    lin.lora = Some(LoraAdapter { a, b, scale: 0.25, dropout, training });
                }
                (Err(e), _) | (_, Err(e)) => failure = Some(e),
            }
            i += 2;
        });
        failure.map_or(Ok(layer), Err)
    };
    let op = |t: &[Tensor]| {
        let layer = adapted(&layer_dev, t)?;
        if !crate::sam3::vit_block::serves(&layer, &t[0]) {
            candle_core::bail!("the ViT block op does not serve this block");
        }
        crate::rng::reseed(&[0x5e1f, 7]);
        crate::sam3::vit_block::forward(&layer, &t[0], checkpoint)
    };
    let kind = if ws > 0 { "window 4, padded" } else { "global" };
    let name = match checkpoint {
        crate::sam3::vit_block::Checkpointing::Off => format!("vit block op ({kind})"),
        crate::sam3::vit_block::Checkpointing::Mlp => format!("vit block op ({kind}, fc1 recomputed)"),
        crate::sam3::vit_block::Checkpointing::Full => format!("vit block op ({kind}, checkpointed)"),
    };
    if !half {
        let reference = |t: &[Tensor]| {
            let layer = adapted(&layer_ref, t)?;
            crate::rng::keyed(&Device::Cpu, || layer.forward(&t[0]))
        };
        return compare(&name, &inputs, dtype, reference, op);
    }
    // In bf16 a whole block's rounding (about ten roundings deep) exceeds the per-op tolerance:
    // there the reference is the op-by-op block on the device in the same dtype (each op of
    // which the checks above hold against f64). What this asks is whether the op chains the
    // layers' forward and backward as the graph does.
    let name = format!("{name} vs op by op");
    let t: Vec<Tensor> = inputs.iter().map(|i| i.device.as_tensor().clone()).collect();
    let per_op = |t: &[Tensor]| {
        let layer = adapted(&layer_dev, t)?;
        crate::rng::reseed(&[0x5e1f, 7]);
        crate::rng::keyed(device, || layer.forward(&t[0]))
    };
    let want = per_op(&t).with_context(|| format!("{name}: op by op"))?;
    let got = op(&t).with_context(|| format!("{name}: the op"))?;
    let target = Input::new("target", want.dims(), device, DType::F32, 99)?.device.as_tensor().detach();
    let backward = |y: &Tensor| (y.to_dtype(DType::F32)? * &target)?.sum_all()?.backward();
    let (gw, gg) = (backward(&want)?, backward(&got)?);
    let as_f64 = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let forward = rel(&as_f64(&want)?, &got)?;
    let mut grads = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let (w, g) = (gw.get(&t[i]), gg.get(&t[i]));
        let (Some(w), Some(g)) = (w, g) else { anyhow::bail!("{name}: no gradient of {}", input.name) };
        grads.push((input.name.to_string(), rel(&as_f64(w)?, g)?));
    }
    let tolerance = tolerance(dtype);
    let ok = forward <= tolerance && grads.iter().all(|g| g.1 <= tolerance);
    Ok(Check { name, forward, grads, tolerance, ok })
}

/// A module loaded with frozen weights (plain tensors) on `device` in `dtype`: uniform draws,
/// matrices scaled by 1/√fan-in, norm scales around 1.
fn frozen_module<T>(
    device: &Device,
    dtype: DType,
    seed: u64,
    load: impl Fn(candle_nn::VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    use candle_nn::{VarBuilder, VarMap};
    let varmap = VarMap::new();
    load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let mut names: Vec<(String, Vec<usize>)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned var map"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    names.sort();
    let mut tensors = std::collections::HashMap::new();
    for (i, (name, dims)) in names.into_iter().enumerate() {
        let n: usize = dims.iter().product();
        let u =
            Tensor::from_vec(crate::rng::uniform(&[seed, i as u64], n, -1.0, 1.0), &dims[..], &Device::Cpu)?;
        let v = if dims.len() >= 2 {
            (u * (1.5 / (dims[1..].iter().product::<usize>() as f64).sqrt()))?
        } else if name.contains("norm") && name.ends_with("weight") {
            ((u * 0.2)? + 1.0)?
        } else {
            (u * 0.2)?
        };
        tensors.insert(name, v.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(load(VarBuilder::from_tensors(tensors, dtype, device))?)
}

/// A rank-4 adapter (dropout 0.25, training, f32 factors on `device`) on every linear `m`
/// visits; the factors with their names.
fn adapt_all(
    m: &mut impl crate::sam3::visit::VisitLinears,
    device: &Device,
    seed: u64,
) -> Result<Vec<(String, Var)>> {
    let training = Arc::new(AtomicBool::new(true));
    let mut out = Vec::new();
    let mut failure = None;
    let mut i = 0;
    m.visit_linears(&mut |lin| {
        let mut factor = |shape: (usize, usize)| -> candle_core::Result<Var> {
            i += 1;
            let v = crate::rng::uniform(&[seed, i], shape.0 * shape.1, -0.5, 0.5);
            Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
        };
        match (factor((4, lin.in_dim())), factor((lin.out_dim(), 4))) {
            (Ok(a), Ok(b)) => {
                out.push((format!("{} A", lin.path), a.clone()));
                out.push((format!("{} B", lin.path), b.clone()));
                lin.lora = Some(LoraAdapter { a, b, scale: 0.5, dropout: 0.25, training: training.clone() });
            }
            (Err(e), _) | (_, Err(e)) => failure = Some(e),
        }
    });
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

/// `f` with its layers as ops (the trainer's way: inside the side-store scope) against `f`
/// recorded op by op, both on the device and drawing the same dropout masks: the output, the
/// gradients of the tracked `inputs` and the largest error among the adapters' factors (every
/// one of which must get a non-zero gradient).
fn layer_ops_check(
    name: &str,
    f: &dyn Fn() -> candle_core::Result<Tensor>,
    inputs: &[(&str, &Tensor)],
    factors: &[(String, Var)],
    dtype: DType,
) -> Result<Check> {
    let run = |as_ops: bool| -> Result<(Tensor, candle_core::backprop::GradStore, usize)> {
        crate::rng::reseed(&[0x5e1f, 9]);
        let y = match as_ops {
            true => crate::sam3::recompute::with_side_grads(f),
            false => crate::sam3::detr_block::op_by_op(f),
        }?;
        let nodes = y.sorted_nodes().len();
        let target = Input::new("target", y.dims(), y.device(), DType::F32, 98)?.device.as_tensor().detach();
        let mut g = (y.to_dtype(DType::F32)? * target)?.sum_all()?.backward()?;
        crate::sam3::recompute::merge_side_grads(&mut g)?;
        Ok((y, g, nodes))
    };
    let (want, gw, nodes) = run(false).with_context(|| format!("{name}: op by op"))?;
    let (got, gg, op_nodes) = run(true).with_context(|| format!("{name}: as ops"))?;
    anyhow::ensure!(
        op_nodes < nodes,
        "{name}: the layer ops did not serve ({op_nodes} graph nodes, {nodes} op by op)"
    );
    let as_f64 = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let forward = rel(&as_f64(&want)?, &got)?;
    let mut grads = Vec::new();
    for (input, t) in inputs {
        let (Some(w), Some(g)) = (gw.get(t), gg.get(t)) else {
            anyhow::bail!("{name}: no gradient of {input}")
        };
        grads.push((input.to_string(), rel(&as_f64(w)?, g)?));
    }
    let mut worst = 0f64;
    for (factor, v) in factors {
        let (Some(w), Some(g)) = (gw.get(v.as_tensor()), gg.get(v.as_tensor())) else {
            anyhow::bail!("{name}: no gradient of {factor}")
        };
        let w = as_f64(w)?;
        anyhow::ensure!(w.abs()?.max_all()?.to_scalar::<f64>()? > 0.0, "{name}: {factor}'s gradient is zero");
        worst = worst.max(rel(&w, g)?);
    }
    grads.push((format!("factors ({}, largest)", factors.len()), worst));
    // In half precision the two paths sum some gradients in another order, and the first
    // layer's attention factors see that rounding amplified through the softmax's backward (a
    // few percent in bf16 on the geometry layers); a wrong term or mask moves a factor's
    // gradient by tens of percent. The f32 run holds both paths to f32's tolerance.
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let tolerance = if half { 0.1 } else { tolerance(dtype) };
    let ok = forward <= tolerance && grads.iter().all(|g| g.1 <= tolerance);
    Ok(Check { name: name.to_string(), forward, grads, tolerance, ok })
}

/// [`crate::sam3::detr_block`]'s layer ops on `device` in `dtype` against the same layers
/// recorded op by op (the DETR encoder with a padded prompt; the decoder with DAC, boxRPB and
/// box refinement; the geometry encoder with a padded box prompt): width 64, two heads (head
/// dimension 32: on CUDA in bf16 the encoder's self-attention runs on the flash kernels).
fn detr_layer_checks(device: &Device, dtype: DType) -> Result<Vec<Check>> {
    use crate::sam3::config::StackConfig;
    use crate::sam3::decoder::{DecoderOptions, DetrDecoder};
    use crate::sam3::encoder::DetrEncoder;
    use crate::sam3::geometry::GeometryEncoder;
    let cfg = |queries: Option<usize>| StackConfig {
        hidden_size: 64,
        num_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 128,
        dropout: 0.25,
        hidden_act: "relu".into(),
        roi_size: 2,
        num_queries: queries,
    };
    let input = |name, shape: &[usize], seed| -> Result<Tensor> {
        Ok(Input::new(name, shape, device, dtype, seed)?.device.as_tensor().clone())
    };
    let constant = |shape: &[usize], seed| -> Result<Tensor> { Ok(input("constant", shape, seed)?.detach()) };
    let text_mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device)?;
    let mut checks = Vec::new();

    let mut enc = frozen_module(device, dtype, 401, |vb| DetrEncoder::load(vb, &cfg(None)))?;
    let factors = adapt_all(&mut enc.layers, device, 402)?;
    let (map, text, pos) = (
        input("image", &[2, 64, 6, 8], 403)?,
        input("prompt", &[2, 5, 64], 404)?,
        constant(&[2, 64, 6, 8], 405)?,
    );
    let f = || {
        let out = enc.forward(
            std::slice::from_ref(&map),
            &text,
            std::slice::from_ref(&pos),
            Some(&text_mask),
            true,
        )?;
        Ok(out.last_hidden_state)
    };
    checks.push(layer_ops_check(
        "detr encoder layer ops vs op by op",
        &f,
        &[("image", &map), ("prompt", &text)],
        &factors,
        dtype,
    )?);

    let mut dec = frozen_module(device, dtype, 411, |vb| DetrDecoder::load(vb, &cfg(Some(4))))?;
    let factors = adapt_all(&mut dec.layers, device, 412)?;
    let (memory, text, pos) = (
        input("memory", &[2, 48, 64], 413)?,
        input("prompt", &[2, 5, 64], 414)?,
        constant(&[2, 48, 64], 415)?,
    );
    let f = || {
        let opts = DecoderOptions { dac: true, train: true };
        let out = dec.forward(&memory, &text, &pos, Some(&text_mask), &[(6, 8)], opts)?;
        let boxes = dec.pred_boxes(&out)?.flatten_all()?.to_dtype(dtype)?;
        let presence = out.presence_logits.flatten_all()?.to_dtype(dtype)?;
        Tensor::cat(&[out.intermediate_hidden_states.flatten_all()?, boxes, presence], 0)
    };
    let name = "detr decoder layer ops vs op by op (DAC)";
    checks.push(layer_ops_check(name, &f, &[("memory", &memory), ("prompt", &text)], &factors, dtype)?);

    let mut geo = frozen_module(device, dtype, 421, |vb| GeometryEncoder::load(vb, &cfg(None)))?;
    let factors = adapt_all(&mut geo.layers, device, 422)?;
    let boxes = Tensor::new(&[[[0.4f32, 0.5, 0.3, 0.4], [0.9, 0.2, 0.5, 0.5]]; 2], device)?;
    let labels = Tensor::new(&[[1u32, 0], [1, 1]], device)?;
    let box_mask = Tensor::new(&[[1u8, 1], [1, 0]], device)?;
    let (map, pos) = (input("image", &[2, 64, 6, 8], 423)?, constant(&[2, 64, 6, 8], 424)?);
    let f =
        || Ok(geo.forward_with(&boxes, &box_mask, &labels, &map, Some(&pos), None, true)?.last_hidden_state);
    checks.push(layer_ops_check("geometry layer ops vs op by op", &f, &[("image", &map)], &factors, dtype)?);
    Ok(checks)
}

/// The fused elementwise kernels of the adapted linears (GPU only): every activation with a
/// dropout mask, forward (activation, dropped input) and input gradient, against the composed
/// f64 computation on the CPU.
fn fused_elementwise_check(device: &Device, dtype: DType) -> Result<Check> {
    use crate::sam3::fused_cuda;
    let shape = [3usize, 37];
    let (x, d1, d2) = (
        Input::new("x", &shape, device, dtype, 70)?,
        Input::new("d1", &shape, device, dtype, 71)?,
        Input::new("d2", &shape, device, dtype, 72)?,
    );
    let p = 0.25;
    let keep: Vec<u8> = (0..shape[0] * shape[1]).map(|i| u8::from((i * 7) % 5 != 0)).collect();
    let mask_cpu = Tensor::from_vec(keep, &shape, &Device::Cpu)?;
    let mask_dev = crate::rng::KeepMask::Drawn(mask_cpu.to_device(device)?);
    let scaled = (mask_cpu.to_dtype(DType::F64)? / (1.0 - p))?;
    let (xr, d1r, d2r) = (x.reference.as_tensor(), d1.reference.as_tensor(), d2.reference.as_tensor());
    let (mut fwd, mut bwd) = (0f64, 0f64);
    let acts = [
        None,
        Some(Activation::Gelu),
        Some(Activation::GeluTanh),
        Some(Activation::QuickGelu),
        Some(Activation::Silu),
        Some(Activation::Relu),
    ];
    for act in acts {
        let xa_want = match act {
            Some(a) => a.apply(xr)?,
            None => xr.clone(),
        };
        let xm_want = (&xa_want * &scaled)?;
        let (xa, xm) = fused_cuda::activation_and_dropout(x.device.as_tensor(), act, Some(&mask_dev), p)?;
        fwd = fwd.max(rel(&xa_want, &xa)?).max(rel(&xm_want, &xm)?);
        let xm_only = fused_cuda::adapter_input(x.device.as_tensor(), act, Some(&mask_dev), p)?;
        fwd = fwd.max(rel(&xm_want, &xm_only)?);
        let mut dx_want = (d1r + (d2r * &scaled)?)?;
        if let Some(a) = act {
            dx_want = (dx_want * crate::sam3::frozen::act_grad(a, xr)?)?;
        }
        let dx = fused_cuda::linear_input_grad(
            d1.device.as_tensor(),
            Some(d2.device.as_tensor()),
            Some(&mask_dev),
            p,
            act.map(|a| (a, x.device.as_tensor())),
        )?;
        bwd = bwd.max(rel(&dx_want, &dx)?);
    }
    // The ViT's RoPE output map (rotation + heads-first layout, and its inverse for backward)
    // against the composed map on the CPU in f32.
    let (batch, heads, rows, cols, hd) = (2usize, 3usize, 2usize, 3usize, 8usize);
    let n_tok = rows * cols;
    let tables = |dev: &Device| crate::sam3::vision::RopeTables::new(rows, cols, hd, 100.0, 0.5, dev);
    let (rope_dev, rope_cpu) = (tables(device)?, tables(&Device::Cpu)?);
    let (map_dev, map_cpu) = (rope_dev.heads_first_map(batch, heads), rope_cpu.heads_first_map(batch, heads));
    let y = Input::new("y", &[batch * n_tok, heads * hd], device, dtype, 73)?;
    let g = Input::new("g", &[batch, heads, n_tok, hd], device, dtype, 74)?;
    let cpu32 = |t: &Var| t.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let want = (map_cpu.forward)(&cpu32(&y.device)?)?.to_dtype(DType::F64)?;
    fwd = fwd.max(rel(&want, &(map_dev.forward)(y.device.as_tensor())?)?);
    let want = (map_cpu.backward)(&cpu32(&g.device)?)?.to_dtype(DType::F64)?;
    bwd = bwd.max(rel(&want, &(map_dev.backward)(g.device.as_tensor())?)?);

    // The keep-mask generator: the kept fraction is 1 − p, a (seed, position) draws the same
    // mask again, and the next position draws another one.
    let shape = candle_core::Shape::from((256, 1000));
    let draw = |offset| -> Result<Vec<u8>> {
        Ok(fused_cuda::keep_mask(&shape, p, 7, offset, device)?.flatten_all()?.to_vec1::<u8>()?)
    };
    let (m1, m2, m3) = (draw(0)?, draw(0)?, draw(256_000)?);
    let kept = m1.iter().map(|&k| k as f64).sum::<f64>() / m1.len() as f64;
    let mask_error = (kept - (1.0 - p)).abs() / (1.0 - p)
        + if m1 == m2 { 0.0 } else { 1.0 }
        + if m1 != m3 { 0.0 } else { 1.0 };
    // Masks left to the kernels (each draws its entries again from the generator's seed and
    // position) against the same draws as bytes: the same values, bit for bit.
    let counter = crate::rng::KeepMask::Counter {
        seed: 9,
        offset: 1234,
        p,
        shape: x.device.as_tensor().shape().clone(),
        device: device.clone(),
    };
    let drawn = crate::rng::KeepMask::Drawn(counter.tensor()?);
    let mut counter_error = 0f64;
    for act in acts {
        let run = |m: &crate::rng::KeepMask| -> Result<[Tensor; 3]> {
            let (xa, xm) = fused_cuda::activation_and_dropout(x.device.as_tensor(), act, Some(m), p)?;
            let dx = fused_cuda::linear_input_grad(
                d1.device.as_tensor(),
                Some(d2.device.as_tensor()),
                Some(m),
                p,
                act.map(|a| (a, x.device.as_tensor())),
            )?;
            Ok([xa, xm, dx])
        };
        for (a, b) in run(&counter)?.iter().zip(run(&drawn)?.iter()) {
            let d =
                (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            counter_error = counter_error.max(d);
        }
    }
    // Residual dropout as one op (the mask left to the kernels) against the composed residual
    // sum with the same draws as bytes: output and both gradients.
    crate::rng::reseed(&[3]);
    let out = crate::rng::dropout_add(x.device.as_tensor(), d1.device.as_tensor(), p)?;
    crate::rng::reseed(&[3]);
    let keep = crate::rng::keep_mask(x.device.shape(), p, device)?.to_device(&Device::Cpu)?;
    let scaled = (keep.to_dtype(DType::F64)? / (1.0 - p))?;
    let want = (d1r + (xr * &scaled)?)?;
    fwd = fwd.max(rel(&want, &out)?);
    let target = Input::new("t", x.device.dims(), device, dtype, 75)?;
    let g = (&out * target.device.as_tensor())?.sum_all()?.backward()?;
    let tr = target.reference.as_tensor();
    for (v, want) in [(&x, (tr * &scaled)?), (&d1, tr.clone())] {
        match g.get(v.device.as_tensor()) {
            Some(got) => bwd = bwd.max(rel(&want, got)?),
            None => bwd = f64::INFINITY,
        }
    }
    let tolerance = tolerance(dtype);
    let grads = vec![
        ("x".to_string(), bwd),
        ("keep mask".to_string(), mask_error),
        ("counter mask".to_string(), counter_error),
    ];
    let ok = fwd <= tolerance && bwd <= tolerance && mask_error <= 0.01 && counter_error == 0.0;
    Ok(Check {
        name: "fused kernels (activations, dropout, residual dropout, RoPE map, keep mask)".into(),
        forward: fwd,
        grads,
        tolerance,
        ok,
    })
}

/// The one-launch gradient statistics on the GPU against the composed statistics in f64 on the
/// CPU: two groups of tensors of mixed lengths (several blocks' worth each). `forward` is the
/// sum of squares' relative error, the largest magnitude's and the element count's as "grads".
fn gradient_stats_check(device: &Device) -> Result<Check> {
    let shapes: [&[usize]; 4] = [&[3], &[40, 33], &[2, 3, 3000], &[64, 1024]];
    let inputs: Vec<Input> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Input::new("g", s, device, DType::F32, 60 + i as u64))
        .collect::<Result<_>>()?;
    let dev: Vec<&Tensor> = inputs.iter().map(|i| i.device.as_tensor()).collect();
    let (a, b) = ([dev[0], dev[2]], [dev[1], dev[3]]);
    let got = crate::train::stats_cuda::group_stats(&[&a[..], &b[..]])?;
    let mut worst = (0f64, 0f64);
    let ok_taken = got.is_some();
    for (g, ix) in [[0usize, 2], [1, 3]].iter().enumerate() {
        let cpu: Vec<Tensor> = ix.iter().map(|&i| inputs[i].reference.as_tensor().clone()).collect();
        let want = crate::train::optim::composed_group_stats("check", &cpu.iter().collect::<Vec<_>>())?;
        if let Some(got) = &got {
            let (s, m, _) = got[g];
            worst.0 = worst.0.max((s - want.sum_sq).abs() / want.sum_sq.abs().max(f64::MIN_POSITIVE));
            worst.1 = worst.1.max((m - want.max_abs).abs() / want.max_abs.abs().max(f64::MIN_POSITIVE));
        }
    }
    let tolerance = tolerance(DType::F32);
    let name =
        if ok_taken { "gradient statistics (one launch)" } else { "gradient statistics: kernel not taken" };
    let ok = ok_taken && worst.0 <= tolerance && worst.1 <= tolerance;
    Ok(Check { name: name.into(), forward: worst.0, grads: vec![("max".into(), worst.1)], tolerance, ok })
}

/// AdamW on `device` (on CUDA the fused one-launch update) against the composed update on the
/// CPU: two steps (the second with one parameter left without a gradient and a clipping
/// factor), then a rollback of the second. Parameters, moments and the rolled-back parameters.
fn adamw_check(device: &Device) -> Result<Check> {
    use crate::train::optim::{AdamW, AdamWConfig};
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let shapes: [&[usize]; 3] = [&[5, 7], &[33], &[2, 3, 300]];
    let make = |dev: &Device| -> Result<(AdamW, Vec<Var>)> {
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Ok(Input::new("p", s, dev, DType::F32, 40 + i as u64)?.device))
            .collect::<Result<_>>()?;
        let named = vars.iter().enumerate().map(|(i, v)| (format!("p{i}"), v.clone())).collect();
        Ok((AdamW::new(named, cfg)?, vars))
    };
    let grads = |dev: &Device, seed: u64| -> Result<Vec<Tensor>> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(Input::new("g", s, dev, DType::F32, seed + i as u64)?.device.as_tensor().clone())
            })
            .collect()
    };
    let (mut want, want_vars) = make(&Device::Cpu)?;
    let (mut got, got_vars) = make(device)?;
    let snapshot =
        |vars: &[Var]| -> Result<Vec<Tensor>> { vars.iter().map(|v| Ok(v.as_tensor().copy()?)).collect() };
    for (opt, dev) in [(&mut want, &Device::Cpu), (&mut got, device)] {
        let g1 = grads(dev, 50)?;
        opt.step(&g1, 1e-2)?;
    }
    let after_first = (snapshot(&want_vars)?, snapshot(&got_vars)?);
    for (opt, dev) in [(&mut want, &Device::Cpu), (&mut got, device)] {
        let g2 = grads(dev, 60)?;
        opt.step_scaled(&[Some(&g2[0]), None, Some(&g2[2])], 3e-3, 0.5)?;
    }
    let worst = |a: &[Tensor], b: &[Tensor]| -> Result<f64> {
        let mut e = 0f64;
        for (x, y) in a.iter().zip(b) {
            e = e.max(rel(&x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?, y)?);
        }
        Ok(e)
    };
    let params = worst(&snapshot(&want_vars)?, &snapshot(&got_vars)?)?;
    let state = |o: &AdamW, key: &str| -> Vec<Tensor> {
        o.state_tensors().into_iter().filter(|(k, _)| k.ends_with(key)).map(|(_, t)| t).collect()
    };
    let m = worst(&state(&want, ".exp_avg"), &state(&got, ".exp_avg"))?;
    let v = worst(&state(&want, ".exp_avg_sq"), &state(&got, ".exp_avg_sq"))?;
    got.rollback()?;
    let back = worst(&after_first.1, &snapshot(&got_vars)?)?;
    let first = worst(&after_first.0, &after_first.1)?;
    let tolerance = tolerance(DType::F32);
    let grads = vec![
        ("exp_avg".to_string(), m),
        ("exp_avg_sq".to_string(), v),
        ("after first step".to_string(), first),
        ("rolled back".to_string(), back),
    ];
    let ok = params <= tolerance && grads.iter().all(|g| g.1 <= tolerance);
    Ok(Check { name: "adamw (2 steps, clip, rollback)".into(), forward: params, grads, tolerance, ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU in f32 every op is within f32 rounding of the f64 composed reference, and the
    /// comparison itself catches a wrong gradient (a scaled op fails).
    #[test]
    fn cpu_f32_ops_match_the_f64_reference() -> Result<()> {
        let checks = run(&Device::Cpu, DType::F32)?;
        assert_eq!(checks.len(), 21);
        assert!(checks.iter().any(|c| c.name == "vit block op (window 4, padded)"));
        assert!(checks.iter().any(|c| c.name == "detr decoder layer ops vs op by op (DAC)"));
        assert!(checks.iter().any(|c| c.name == "vit block op (window 4, padded, fc1 recomputed)"));
        assert!(checks.iter().any(|c| c.name == "attention d64 80x72 (chunked)"));
        assert!(checks.iter().any(|c| c.name == "conv 3x3"));
        assert!(checks.iter().any(|c| c.name == "group norm [1, 4, 61, 67]"));
        for c in &checks {
            assert!(c.ok, "{c:?}");
            assert!(!c.grads.is_empty());
        }
        // bf16 inputs (the CPU takes the f32-probabilities attention path): within bf16's
        // tolerance, and the checks are not vacuous (errors well above f32's).
        let checks = run(&Device::Cpu, DType::BF16)?;
        for c in &checks {
            assert!(c.ok, "{c:?}");
        }
        assert!(checks.iter().any(|c| c.forward > tolerance(DType::F32)));
        let x = Input::new("x", &[3, 4], &Device::Cpu, DType::F32, 1)?;
        let wrong = compare("scaled", &[x], DType::F32, |t| t[0].sqr(), |t| t[0].sqr()? * 1.001)?;
        assert!(!wrong.ok && wrong.forward > 5e-4, "{wrong:?}");
        Ok(())
    }
}
