//! `lorahost bench`: the training-step workload of `../shared/gpu/hf_sam3_bench.py` (PyTorch +
//! transformers + PEFT), so the two can be compared on one machine in one run.
//!
//! Random-initialised SAM3 (full size: 1008² input, 32 text tokens; or the tiny shape), one box
//! prompt per image, LoRA r/2r on q/k/v/o/fc1/fc2 of the ViT (optional), the geometry encoder
//! and the DETR encoder and decoder, dropout 0.1, the same proxy loss over all heads
//! (sigmoid-mean of masks and logits, mean of boxes, presence and semantic map), global-norm
//! clipping at 1.0 and AdamW. Reports the median step time, images/s, peak memory and the time
//! from start to the end of the first step (PyTorch's compiled path needs minutes there).

use crate::lora::{Component, LoraConfig, LoraSet};
use crate::sam3::config::Sam3Config;
use crate::sam3::model::{ForwardOptions, Sam3Inputs, Sam3Model};
use crate::train::optim::{group_stats, AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The full-size SAM3 config (transformers' `Sam3Config()` defaults, as `facebook/sam3`).
const FULL_CONFIG: &str = include_str!("../assets/sam3_config.json");
/// The tiny demo config.
const TINY_CONFIG: &str = include_str!("../../examples/tiny_sam3/config.json");

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Where to run.
    pub device: crate::inference::DeviceArg,
    /// The tiny model instead of full-size SAM3.
    pub tiny: bool,
    /// A transformers SAM3 `config.json` to build instead (random weights).
    pub model_config: Option<PathBuf>,
    /// Images per step.
    pub batch: usize,
    /// Timed steps (the median is reported).
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// bf16 (frozen weights and activations in bf16, LoRA and optimizer in f32) or f32.
    pub dtype: crate::inference::DTypeArg,
    /// LoRA rank (alpha = 2 × rank).
    pub rank: usize,
    /// Adapt the ViT too.
    pub vision_lora: bool,
    /// Activation checkpointing of the ViT blocks.
    pub ckpt: bool,
    /// The ViT blocks recompute fc1's output in backward (when not `ckpt`).
    pub ckpt_mlp: bool,
    /// Append the result as a JSON line to this file.
    pub json: Option<PathBuf>,
    /// After the timed steps, this many more steps with the model's parts, the loss, backward,
    /// the optimizer and the costliest operations timed on the device and the host: where a
    /// step's time goes.
    pub profile_steps: usize,
    /// After that, a window and a global ViT block on their own, forward and backward this many
    /// times each, with the device kept busy meanwhile ([`isolated_blocks`]).
    pub isolated_reps: usize,
}

impl BenchOptions {
    /// What the ViT blocks keep for backward.
    pub fn checkpointing(&self) -> crate::sam3::vit_block::Checkpointing {
        use crate::sam3::vit_block::Checkpointing;
        match (self.ckpt, self.ckpt_mlp) {
            (true, _) => Checkpointing::Full,
            (false, true) => Checkpointing::Mlp,
            (false, false) => Checkpointing::Off,
        }
    }
}

/// One part of a profiled step.
#[derive(Debug, Clone, Serialize)]
pub struct ProfilePart {
    /// The part: a model component's forward (`vision`, `text`, `geometry`, `encoder`,
    /// `decoder`, ...), `loss`, then backward: `backward: decoder + mask head` (until it
    /// reaches the encoder's output), `backward: encoder + geometry` (until it reaches the
    /// vision features; the two together were `backward: heads`), `backward: vision` (the
    /// rest: neck and ViT when they are adapted), then `optimizer` (gradient statistics,
    /// clipping, AdamW).
    pub part: String,
    /// Milliseconds per step on the device (from CUDA events; on the CPU: wall time).
    pub ms: f64,
    /// Milliseconds per step the host spent issuing the part (above `ms`: bound by the host).
    pub host_ms: f64,
}

/// An operation timed inside the parts of a profiled step.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileOp {
    /// The operation and its shape, e.g. `attention backward b2 h16 5184x5184 d64`.
    pub op: String,
    /// Milliseconds per step on the device (from CUDA events; on the CPU: wall time).
    pub ms: f64,
    /// Milliseconds per step the host spent issuing it.
    pub host_ms: f64,
    /// Calls per step.
    pub calls: f64,
}

/// One benchmark result (the fields of `hf_sam3_bench.py`'s JSON, plus startup).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Device description.
    pub device: String,
    /// Tiny model.
    pub tiny: bool,
    /// The model config given with `--model-config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_config: Option<String>,
    /// Images per step.
    pub batch: usize,
    /// Compute dtype.
    pub dtype: String,
    /// LoRA rank.
    pub rank: usize,
    /// ViT adapted.
    pub vision_lora: bool,
    /// ViT blocks checkpointed.
    pub ckpt: bool,
    /// fc1's outputs recomputed in backward.
    pub ckpt_mlp: bool,
    /// Base parameters.
    pub params: usize,
    /// Trainable parameters.
    pub trainable: usize,
    /// Adapted modules.
    pub lora_modules: usize,
    /// Median step time, seconds.
    pub step_s_median: f64,
    /// Fastest step, seconds.
    pub step_s_min: f64,
    /// Median seconds the host took to issue a step's forward and backward (it first waits for
    /// the device after them): close to `step_s_median` means the step is bound by the host's
    /// per-operation cost, not by the device.
    pub host_issue_s_median: f64,
    /// batch / median.
    pub images_per_s: f64,
    /// Operations recorded on a step's training graph (forward to the loss): each costs the
    /// host a launch or more in forward and in backward, so on a fast device the host's share
    /// of a step grows with it.
    pub graph_ops: usize,
    /// Last loss.
    pub loss: f64,
    /// Peak memory of the run, GiB: on CUDA the high-water mark of the memory pool's allocated
    /// bytes (weights, activations, gradients, optimizer state: what PyTorch's
    /// `max_memory_allocated` counts); on the CPU the peak heap.
    pub peak_mem_gib: f64,
    /// On CUDA, the peak the memory pool reserved (allocated plus cached; PyTorch's
    /// `max_memory_reserved`); device memory in use beyond the CUDA context.
    pub peak_reserved_gib: Option<f64>,
    /// From start (device open) to the end of the first training step, seconds.
    pub time_to_first_step_s: f64,
    /// `lorahost doctor`'s peak estimate for this workload, GiB (without the CUDA context).
    pub estimated_peak_gib: f64,
    /// Where a step's time goes (`--profile`), in the order the parts run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfilePart>>,
    /// With `--profile`: operations timed inside the parts, the most expensive first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_ops: Option<Vec<ProfileOp>>,
    /// With `--isolated`: the ViT blocks on their own (per block; see [`isolated_blocks`]), then
    /// the operations inside them, the most expensive first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolated: Option<Vec<ProfileOp>>,
}

/// The ViT's blocks on their own (`--isolated`): the first window block and the first global
/// one, each `reps` times forward (as the model runs it, [`crate::sam3::vision::ViTModel::forward_layer`]) and
/// backward from a weighted sum of its output, on a random (B, g, g, C) input. On CUDA the
/// repetitions are queued behind a chain of large products that keeps the device busy while
/// the host issues them, so the device never waits for the host: `ms` is the kernels' own time
/// per block and `host_ms` the host's time to issue it. Against the same blocks inside a step
/// (`profile_ops`, whose device time includes any wait for the host), the difference is the
/// device's idle time. The operations inside the blocks are timed the same way and follow.
pub fn isolated_blocks(
    model: &Sam3Model,
    device: &Device,
    dtype: DType,
    batch: usize,
    reps: usize,
) -> Result<Vec<ProfileOp>> {
    let vit = &model.vision.backbone;
    let window = vit.layers.iter().find(|l| l.window_size > 0);
    let global = vit.layers.iter().find(|l| l.window_size == 0);
    let (mut blocks, mut ops) = (Vec::new(), Vec::new());
    for (kind, layer) in [("window", window), ("global", global)] {
        let Some(layer) = layer else { continue };
        let grid = (layer.rope.len() as f64).sqrt().round() as usize;
        let width = layer.attention.q_proj.weight.dim(1)?;
        let shape = (batch, grid, grid, width);
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)?;
        let weights = Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?;
        let (forward, backward) =
            (format!("vit {kind} block (forward)"), format!("vit {kind} block (backward)"));
        let run = || -> Result<()> {
            let y = vit.forward_layer(layer, x.as_tensor())?;
            crate::profile::mark(&forward);
            let grads = (y * &weights)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            drop(grads);
            crate::profile::mark(&backward);
            Ok(())
        };
        // Once unprofiled (kernels compiled and checked, memory pooled), then the timed runs.
        run()?;
        device.synchronize()?;
        crate::profile::enable(device);
        if device.is_cuda() {
            // About 40 ms of products on an H100 class GPU (20 of 8192² · 8192 in bf16):
            // longer than the host takes to issue a few blocks' forward and backward.
            let m = Tensor::randn(0f32, 1.0, (8192, 8192), device)?.to_dtype(DType::BF16)?;
            for _ in 0..20 {
                drop(m.matmul(&m)?);
            }
        }
        for _ in 0..reps {
            crate::profile::restart();
            run()?;
        }
        let report = crate::profile::disable(reps);
        let as_op = |t: crate::profile::Timing| ProfileOp {
            op: t.name,
            ms: t.device_s * 1e3,
            host_ms: t.host_s * 1e3,
            calls: t.calls,
        };
        blocks.extend(report.parts.into_iter().map(as_op));
        ops.extend(report.inner.into_iter().map(as_op));
    }
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    blocks.extend(ops);
    Ok(blocks)
}

/// The model config of the benchmark: `--model-config`, else the tiny or the full one.
fn bench_config(o: &BenchOptions) -> Result<Sam3Config> {
    if let Some(path) = &o.model_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the model config {} (--model-config)", path.display()))?;
        let (config, _) = Sam3Config::from_json(&text, path)
            .with_context(|| format!("{}: not a SAM3 config.json (--model-config)", path.display()))?;
        return Ok(config);
    }
    let tiny = o.tiny;
    let (config, _) = Sam3Config::from_json(
        if tiny { TINY_CONFIG } else { FULL_CONFIG },
        Path::new(if tiny { "examples/tiny_sam3/config.json" } else { "host/assets/sam3_config.json" }),
    )?;
    Ok(config)
}

/// `lorahost doctor`'s estimate for the workload of `o` without building or running anything
/// (`--estimate-only`; any machine).
pub fn estimate_only(o: &BenchOptions) -> Result<crate::memory::MemoryEstimate> {
    let dtype = o.dtype.dtype();
    estimate(o, &bench_config(o)?, dtype)
}

/// The LoRA config of the benchmark (hf_sam3_bench.py's targets).
fn lora_config(o: &BenchOptions) -> LoraConfig {
    let mut components = vec![Component::Geometry, Component::DetrEncoder, Component::DetrDecoder];
    if o.vision_lora {
        components.push(Component::Vision);
    }
    LoraConfig {
        rank: o.rank,
        alpha: 2.0 * o.rank as f64,
        dropout: 0.1,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"].map(String::from).to_vec(),
        components,
        use_rslora: false,
    }
}

/// The memory estimate of the workload (built on shape-only weights).
pub fn estimate(
    o: &BenchOptions,
    config: &Sam3Config,
    dtype: DType,
) -> Result<crate::memory::MemoryEstimate> {
    let params = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let mut model = Sam3Model::load(crate::memory::shape_only_var_builder(params.clone()), config)?;
    // Adapters of rank 1 stand in for the real ones (each module's A and B grow linearly with
    // the rank): the estimate allocates nothing that grows with --rank.
    let lora = LoraSet::attach(&mut model, &LoraConfig { rank: 1, ..lora_config(o) }, &Device::Cpu)?;
    let base_params = params.lock().map(|p| *p).unwrap_or(0);
    let run = crate::memory::RunShape {
        base_params,
        lora_params: lora.num_params().saturating_mul(o.rank),
        dtype,
        adapted: crate::memory::Adapted::of(lora.modules.iter().map(|m| m.1)),
        vision_checkpointing: o.checkpointing(),
        base: 0,
        cuda: matches!(o.device, crate::inference::DeviceArg::Cuda),
    };
    Ok(crate::memory::estimate(config, &run, o.batch.max(1), o.batch.max(1)))
}

/// Stand-in weights: N(0, 0.02²) in the compute dtype on the device (norm weights included;
/// the numbers do not matter for speed, only that they are finite).
struct RandomWeights {
    dtype: DType,
    device: Device,
}

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, &self.device)?.to_dtype(self.dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: no shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// `e`, or where the device ran out of memory, `e` with what the workload needs (`needs`), the
/// memory free at the start and the `fix`.
fn explain_out_of_memory(e: anyhow::Error, needs: &str, free: Option<u64>, fix: &str) -> anyhow::Error {
    if !crate::sam3::layer_op::out_of_memory(&format!("{e:#}")) {
        return e;
    }
    let free = free.map_or(String::new(), |f| {
        format!("; {:.1} GiB were free at the start", f as f64 / (1u64 << 30) as f64)
    });
    e.context(format!("the device ran out of memory: {needs}{free}: {fix}"))
}

/// Memory free for the workload, bytes: the device's free memory on a GPU, the host's
/// available memory on the CPU; `None` when it cannot be read.
fn device_free(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        Device::Cpu => crate::memory::host_available(),
        _ => None,
    }
}

/// Device memory in use (total − free), bytes; 0 on the CPU.
fn device_used(device: &Device) -> u64 {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .map(|(free, total)| (total - free) as u64)
            .unwrap_or(0),
        _ => 0,
    }
}

/// Run the benchmark.
pub fn run(o: &BenchOptions) -> Result<BenchResult> {
    let start = Instant::now();
    let device = o.device.device()?;
    o.dtype.check(&device)?;
    let dtype = o.dtype.dtype();
    let config = bench_config(o)?;
    let predicted = estimate(o, &config, dtype)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let free = device_free(&device);
    let needs = format!(
        "this workload needs about {:.1} GiB (weights {:.1}, LoRA and optimizer state {:.1}, activations and backward {:.1})",
        gib(predicted.total),
        gib(predicted.weights),
        gib(predicted.lora_state),
        gib(predicted.activations + predicted.backward),
    );
    let fix = format!(
        "lower --batch (now {}) or --rank (now {}){}, or use a smaller --model-config / --tiny (`lorahost bench --estimate-only` prints the estimate)",
        o.batch,
        o.rank,
        if device.is_cpu() || o.ckpt { "" } else { ", checkpoint the ViT blocks (--ckpt-mlp, --ckpt)" },
    );
    match free.filter(|free| predicted.total > *free) {
        // On the CPU a workload beyond the host's memory ends in the OOM killer (exit 137, no
        // message): refuse it while the reason can still be said.
        Some(free) if device.is_cpu() => {
            bail!("{needs} and the host has {:.1} GiB available: {fix}", gib(free))
        }
        // On a GPU running out of memory is an error the run reports (below, with this
        // estimate); the estimate may be a little high (checkpointed blocks), so try.
        Some(free) => tracing::warn!(
            "{needs} and the GPU has {:.1} GiB free: it will probably run out of memory ({fix})",
            gib(free)
        ),
        None => {}
    }
    let explain = |e: anyhow::Error| explain_out_of_memory(e, &needs, free, &fix);
    device.synchronize()?;
    crate::alloc_stats::reset_peak();
    crate::gpu::reset_peak(&device);
    let used_before = device_used(&device);
    let params = crate::memory::parameter_count(&config)?;
    let vb = candle_nn::VarBuilder::from_backend(
        Box::new(RandomWeights { dtype, device: device.clone() }),
        dtype,
        device.clone(),
    );
    let mut model = Sam3Model::load(vb, &config).context("building the random SAM3").map_err(explain)?;
    model.set_vit_checkpointing(o.checkpointing())?;
    let lora = LoraSet::attach(&mut model, &lora_config(o), &device)
        .map_err(anyhow::Error::from)
        .map_err(explain)?;
    lora.set_training(true);
    let vars: Vec<(String, candle_core::Var)> =
        lora.vars().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 })?;

    let b = o.batch.max(1);
    let s = config.vision_config.backbone_config.image_size;
    let t = config.text_config.max_position_embeddings;
    let vocab = config.text_config.vocab_size as u64;
    let mut rng = crate::data::SplitMix64::from_parts(&[1, 0xBE7C]);
    let ids: Vec<i64> = (0..b * t).map(|_| (rng.next_u64() % vocab) as i64).collect();
    // The same prompts every step, as a training run over a few class names sees them: with the
    // text encoder frozen, the text cache encodes them once (`LORAHOST_TEXT_CACHE=0`: every step).
    let prompt_keys = Some(crate::sam3::text::PromptKey::rows(&ids, &vec![1; b * t], t));
    let inputs = Sam3Inputs {
        pixel_values: Tensor::randn(0f32, 1.0, (b, 3, s, s), &device)?,
        input_ids: Tensor::from_vec(ids, (b, t), &device)?,
        attention_mask: Tensor::ones((b, t), DType::I64, &device)?,
        input_boxes: Some(Tensor::new(&[[[0.5f32, 0.5, 0.3, 0.3]]], &device)?.repeat((b, 1, 1))?),
        input_boxes_labels: Some(Tensor::ones((b, 1), DType::I64, &device)?),
        prompt_keys,
    };

    let mut peak_used = used_before;
    // One step: (loss, seconds until forward and backward were issued, the host's part of it
    // before it first waits for the device: the gradient norm's read-back).
    let mut graph_ops = 0;
    let mut step = |peak_used: &mut u64| -> Result<(f64, f64)> {
        let t0 = Instant::now();
        // The layer ops' LoRA gradients go to the side store, merged after backward.
        let out = crate::sam3::recompute::with_side_grads(|| {
            model.forward_with(&inputs, ForwardOptions { train: true, dac: false })
        })?;
        let sig_mean = |x: &Tensor| crate::sam3::nn::sigmoid(&x.to_dtype(DType::F32)?)?.mean_all();
        let loss = (sig_mean(&out.pred_masks)?
            + out.pred_boxes.to_dtype(DType::F32)?.mean_all()?
            + sig_mean(&out.pred_logits)?
            + out.presence_logits.to_dtype(DType::F32)?.mean_all()?
            + out.semantic_seg.to_dtype(DType::F32)?.mean_all()?)?;
        crate::profile::mark("loss");
        if graph_ops == 0 {
            graph_ops = loss.sorted_nodes().len();
        }
        *peak_used = (*peak_used).max(device_used(&device));
        let mut grads = loss.backward()?;
        crate::sam3::recompute::merge_side_grads(&mut grads)?;
        let issued = t0.elapsed().as_secs_f64();
        // Without ViT adapters backward never reaches the vision features: it is all heads.
        crate::profile::mark(if o.vision_lora { "backward: vision" } else { "backward: encoder + geometry" });
        *peak_used = (*peak_used).max(device_used(&device));
        drop(out);
        let gs: Vec<Tensor> = var_list
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned().map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        drop(grads);
        let norm = group_stats("all", &gs.iter().collect::<Vec<_>>())?.sum_sq.sqrt();
        let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        opt.step_scaled(&gs.iter().map(Some).collect::<Vec<_>>(), 1e-4, clip)?;
        let l = loss.to_scalar::<f32>()? as f64;
        device.synchronize()?;
        crate::profile::mark("optimizer");
        Ok((l, issued))
    };

    let (mut loss, _) = step(&mut peak_used).map_err(explain)?;
    let first = start.elapsed().as_secs_f64();
    for _ in 1..o.warmup {
        loss = step(&mut peak_used).map_err(explain)?.0;
    }
    let (mut times, mut issue) = (Vec::new(), Vec::new());
    for _ in 0..o.steps.max(1) {
        let t0 = Instant::now();
        let (l, issued) = step(&mut peak_used).map_err(explain)?;
        loss = l;
        times.push(t0.elapsed().as_secs_f64());
        issue.push(issued);
    }
    times.sort_by(f64::total_cmp);
    issue.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let pool_peak = crate::gpu::peak_memory(&device);
    let peak = match (device.is_cpu(), pool_peak) {
        (true, _) => crate::alloc_stats::peak(),
        (false, Some((used, _))) if used > 0 => used,
        // No pool counters (a driver without stream-ordered allocation reports none, or zeros):
        // sampled device memory (after each forward and backward) above what was in use before
        // the model was built.
        (false, _) => peak_used - used_before,
    };
    let (profile, profile_ops) = if o.profile_steps > 0 {
        crate::profile::enable(&device);
        for _ in 0..o.profile_steps {
            crate::profile::restart();
            loss = step(&mut peak_used).map_err(explain)?.0;
        }
        let r = crate::profile::disable(o.profile_steps);
        (
            Some(
                r.parts
                    .into_iter()
                    .map(|t| ProfilePart { part: t.name, ms: t.device_s * 1e3, host_ms: t.host_s * 1e3 })
                    .collect(),
            ),
            Some(
                r.inner
                    .into_iter()
                    .map(|t| ProfileOp {
                        op: t.name,
                        ms: t.device_s * 1e3,
                        host_ms: t.host_s * 1e3,
                        calls: t.calls,
                    })
                    .collect(),
            ),
        )
    } else {
        (None, None)
    };
    let isolated = match o.isolated_reps {
        0 => None,
        reps => Some(isolated_blocks(&model, &device, dtype, b, reps)?),
    };
    let res = BenchResult {
        device: if device.is_cpu() { "cpu".into() } else { "cuda:0".into() },
        tiny: o.tiny,
        model_config: o.model_config.as_ref().map(|p| p.display().to_string()),
        batch: b,
        dtype: format!("{dtype:?}").to_lowercase(),
        rank: o.rank,
        vision_lora: o.vision_lora,
        ckpt: o.ckpt,
        ckpt_mlp: o.ckpt_mlp && !o.ckpt,
        params,
        trainable: lora.num_params(),
        lora_modules: lora.modules.len(),
        step_s_median: med,
        step_s_min: times[0],
        host_issue_s_median: issue[issue.len() / 2],
        images_per_s: b as f64 / med,
        graph_ops,
        loss,
        peak_mem_gib: gib(peak),
        peak_reserved_gib: pool_peak.filter(|p| p.0 > 0).map(|(_, reserved)| gib(reserved)),
        time_to_first_step_s: first,
        estimated_peak_gib: gib(predicted.total),
        profile,
        profile_ops,
        isolated,
    };
    if let Some(p) = &o.json {
        let line = serde_json::to_string(&res)? + "\n";
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("appending to {}", p.display()))?;
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One timed step of the tiny model at batch 1, rank 4, on the CPU.
    fn tiny_options() -> BenchOptions {
        BenchOptions {
            device: crate::inference::DeviceArg::Cpu,
            tiny: true,
            model_config: None,
            batch: 1,
            steps: 1,
            warmup: 1,
            dtype: crate::inference::DTypeArg::F32,
            rank: 4,
            vision_lora: true,
            ckpt: false,
            ckpt_mlp: false,
            json: None,
            profile_steps: 0,
            isolated_reps: 0,
        }
    }

    /// `--model-config`: the given shape is built (SAM3's layer counts: more graph operations
    /// than the tiny model's); a missing file is an error naming it.
    #[test]
    fn model_config_builds_the_given_shape() -> Result<()> {
        let mut o = tiny_options();
        let tiny = run(&o)?;
        let deep = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench/full_depth_tiny_width.json");
        o.model_config = Some(deep.clone());
        let r = run(&o)?;
        assert_eq!(r.model_config.as_deref(), Some(deep.display().to_string().as_str()));
        assert!(r.graph_ops > tiny.graph_ops && tiny.graph_ops > 0, "{} vs {}", r.graph_ops, tiny.graph_ops);
        o.model_config = Some(PathBuf::from("/nonexistent/sam3.json"));
        let e = format!("{:#}", run(&o).unwrap_err());
        assert!(e.contains("/nonexistent/sam3.json") && e.contains("--model-config"), "{e}");
        Ok(())
    }

    /// An out-of-memory error from the device gets the estimate, the free memory and the fix;
    /// any other error is left as it was.
    #[test]
    fn running_out_of_device_memory_is_explained() {
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let e =
            explain_out_of_memory(oom, "this workload needs about 90.0 GiB", Some(80 << 30), "lower --batch");
        let e = format!("{e:#}");
        assert!(e.starts_with("the device ran out of memory: this workload needs about 90.0 GiB"), "{e}");
        assert!(
            e.contains("80.0 GiB were free at the start: lower --batch") && e.contains("OUT_OF_MEMORY"),
            "{e}"
        );
        let other = explain_out_of_memory(anyhow::anyhow!("shape mismatch"), "needs", None, "fix");
        assert_eq!(format!("{other:#}"), "shape mismatch");
    }

    /// A rank whose adapters the host cannot hold is refused with the estimate, before any
    /// adapter is allocated (the estimate itself allocates none of rank size): not an
    /// allocation failure that aborts the process.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_rank_beyond_the_hosts_memory_is_refused_before_allocating() -> Result<()> {
        let o = BenchOptions { rank: 1 << 40, ..tiny_options() };
        let rank1 = estimate_only(&BenchOptions { rank: 1, ..tiny_options() })?;
        let huge = estimate_only(&o)?;
        assert_eq!(huge.lora_state, rank1.lora_state << 40);
        let e = format!("{:#}", run(&o).unwrap_err());
        assert!(e.contains("LoRA and optimizer state") && e.contains("--rank (now 1099511627776)"), "{e}");
        Ok(())
    }

    /// `--isolated`: both kinds of ViT block, forward and backward, each timed once per
    /// repetition, then the operations inside them (the block op's own span among them).
    #[test]
    fn isolated_blocks_time_both_kinds_and_their_operations() -> Result<()> {
        let o = BenchOptions { isolated_reps: 2, ..tiny_options() };
        let r = run(&o)?;
        let isolated = r.isolated.expect("isolated timings");
        for kind in ["window", "global"] {
            for pass in ["forward", "backward"] {
                let name = format!("vit {kind} block ({pass})");
                let t = isolated.iter().find(|t| t.op == name).unwrap_or_else(|| panic!("{name}"));
                assert!(t.ms > 0.0 && t.calls == 1.0, "{name}: {t:?}");
            }
        }
        assert!(isolated.iter().any(|t| t.op.starts_with("linear forward") && t.op.ends_with("lora")));
        assert!(r.profile_ops.is_none());
        Ok(())
    }
}
