//! `lorahost forward` (the raw-tensor contract used for parity) and `lorahost predict`
//! (real images and text prompts in, boxes/scores/masks and an overlay out).

use crate::imageio;
use crate::sam3::model::{ForwardOptions, Sam3Inputs, Sam3Model, Semantics};
use crate::sam3::postprocess::{self, Detection, RawOutputs};
use crate::sam3::tokenizer::PromptTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CPU.
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    /// 32-bit floats.
    F32,
    /// bfloat16 weights and activations (norms, softmax in f32).
    Bf16,
}

impl DeviceArg {
    /// The candle device.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => crate::gpu::open_cuda(0, "--device cuda"),
        }
    }
}

impl DTypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
        }
    }

    /// Check the dtype is usable on `device`.
    pub fn check(self, device: &Device) -> Result<()> {
        if self == DTypeArg::Bf16 && device.is_cpu() {
            bail!("--dtype bf16 needs --device cuda: candle's CPU matmul has no bf16 kernel; use --dtype f32 on the CPU");
        }
        Ok(())
    }
}

fn get<'a>(map: &'a HashMap<String, Tensor>, name: &str, path: &Path) -> Result<&'a Tensor> {
    map.get(name).with_context(|| format!("{}: missing tensor `{name}`", path.display()))
}

fn expect_rank(t: &Tensor, name: &str, rank: usize, what: &str, path: &Path) -> Result<()> {
    if t.rank() != rank {
        bail!("{}: `{name}` has shape {:?}, expected {what}", path.display(), t.dims());
    }
    Ok(())
}

/// Read and check the `forward` input file.
pub fn read_inputs(
    path: &Path,
    device: &Device,
    model: &crate::sam3::config::Sam3Config,
) -> Result<Sam3Inputs> {
    let image_size = model.vision_config.backbone_config.image_size;
    let channels = model.vision_config.backbone_config.num_channels;
    let (vocab, ctx) = (model.text_config.vocab_size, model.text_config.max_position_embeddings);
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    let pixel_values = get(&map, "pixel_values", path)?;
    expect_rank(pixel_values, "pixel_values", 4, "(B, C, S, S)", path)?;
    let (b, c, h, w) = pixel_values.dims4()?;
    if c != channels || h != w || h != image_size {
        bail!(
            "{}: pixel_values is {:?}; this model takes (B, {channels}, {image_size}, {image_size}) \
             (vision_config.backbone_config.num_channels / image_size)",
            path.display(),
            pixel_values.dims()
        );
    }
    if b == 0 {
        bail!("{}: pixel_values holds no image (batch 0)", path.display());
    }
    let input_ids = get(&map, "input_ids", path)?;
    expect_rank(input_ids, "input_ids", 2, "(B, T)", path)?;
    let t = input_ids.dim(1)?;
    if t == 0 || t > ctx {
        bail!("{}: input_ids has {t} tokens per prompt; this model takes 1..={ctx}", path.display());
    }
    let ids = input_ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        bail!(
            "{}: input_ids holds token id {bad}, outside this model's vocabulary 0..{vocab} (tokenize with the model's tokenizer.json)",
            path.display()
        );
    }
    // Without an attention_mask every token is valid (as transformers reads it).
    let ones;
    let attention_mask = match map.get("attention_mask") {
        Some(m) => m,
        None => {
            ones = Tensor::ones(input_ids.dims(), DType::I64, input_ids.device())?;
            &ones
        }
    };
    if attention_mask.dims() != input_ids.dims() || input_ids.dim(0)? != b {
        bail!(
            "{}: input_ids {:?} and attention_mask {:?} must both be (B={b}, T)",
            path.display(),
            input_ids.dims(),
            attention_mask.dims()
        );
    }
    let boxes = map.get("input_boxes");
    let labels = map.get("input_boxes_labels");
    if let Some(bx) = boxes {
        expect_rank(bx, "input_boxes", 3, "(B, N, 4) normalized cxcywh", path)?;
        if bx.dim(0)? != b || bx.dim(2)? != 4 {
            bail!("{}: input_boxes is {:?}, expected (B={b}, N, 4)", path.display(), bx.dims());
        }
        let coords = bx.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if let Some(bad) = coords.iter().find(|v| !v.is_finite() || v.abs() > 4.0) {
            bail!(
                "{}: input_boxes holds {bad}; boxes are normalized cxcywh (fractions of the image, about 0..1)",
                path.display()
            );
        }
        if let Some(l) = labels {
            if l.dims() != &bx.dims()[..2] {
                bail!(
                    "{}: input_boxes_labels is {:?}, expected (B, N) = {:?}",
                    path.display(),
                    l.dims(),
                    &bx.dims()[..2]
                );
            }
            let values = l.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            if let Some(bad) = values.iter().find(|&&v| v != 0.0 && v != 1.0 && v != -10.0) {
                bail!(
                    "{}: input_boxes_labels holds {bad}; a box label is 1 (positive), 0 (negative) or -10 (padding)",
                    path.display()
                );
            }
        }
    } else if labels.is_some() {
        bail!("{}: input_boxes_labels given without input_boxes", path.display());
    }
    let to = |t: &Tensor, dt: DType| -> Result<Tensor> { Ok(t.to_dtype(dt)?.to_device(device)?) };
    Ok(Sam3Inputs {
        pixel_values: to(pixel_values, DType::F32)?,
        input_ids: to(input_ids, DType::I64)?,
        attention_mask: to(attention_mask, DType::I64)?,
        input_boxes: boxes.map(|t| to(t, DType::F32)).transpose()?,
        input_boxes_labels: labels.map(|t| to(t, DType::I64)).transpose()?,
        prompt_keys: None,
    })
}

/// `lorahost forward`.
pub fn forward(
    model_dir: &Path,
    inputs: &Path,
    out: &Path,
    device: DeviceArg,
    dtype: DTypeArg,
    semantics: Semantics,
) -> Result<()> {
    // --out is checked before the model runs: a directory, or the inputs themselves, would
    // fail (or lose the inputs) only after the work is done.
    if out.is_dir() {
        bail!(
            "--out {} is a directory: --out names the file to write, e.g. --out {}",
            out.display(),
            out.join("outputs.safetensors").display()
        );
    }
    // The folder is created as training creates its output_dir (a missing one is no reason to
    // lose the forward about to run).
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {} for --out: choose another --out", dir.display()))?;
    }
    // (Compared once the folder exists: `x/../in.safetensors` is the inputs too.)
    let same_file = match (std::fs::canonicalize(out), std::fs::canonicalize(inputs)) {
        (Ok(a), Ok(b)) => a == b,
        _ => out == inputs,
    };
    if same_file {
        bail!(
            "--out {} is the --inputs file: writing there would replace the inputs; choose another --out",
            out.display()
        );
    }
    let device = device.device()?;
    dtype.check(&device)?;
    let start = std::time::Instant::now();
    let model = Sam3Model::load_dir(model_dir, &device, dtype.dtype())?.with_semantics(semantics);
    tracing::info!("loaded {} in {:.1} s", model_dir.display(), start.elapsed().as_secs_f64());
    let inputs = read_inputs(inputs, &device, model.config())?;
    let start = std::time::Instant::now();
    let o = model.forward(&inputs)?;
    tracing::info!("forward in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in [
        ("pred_logits", &o.pred_logits),
        ("pred_boxes", &o.pred_boxes),
        ("presence_logits", &o.presence_logits),
        ("pred_masks", &o.pred_masks),
        ("semantic_seg", &o.semantic_seg),
    ] {
        tensors.insert(name.to_string(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?);
    }
    // Written beside --out and renamed over it when complete; the temporary file never stays.
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("cannot write {} (for --out {})", tmp.display(), out.display()))
        .and_then(|()| {
            crate::train::checkpoint::set_created_permissions(&tmp)
                .with_context(|| format!("cannot set the permissions of {}", tmp.display()))
        })
        .and_then(|()| {
            std::fs::rename(&tmp, out).with_context(|| {
                format!(
                    "cannot move the result {} to --out {}: choose another --out",
                    tmp.display(),
                    out.display()
                )
            })
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The base model of a run's adapters: the run's recorded `config.yaml` (in `adapter`, beside it
/// — a run's `best/` or `adapter/` sits in the output directory — or in the checkpoint holding
/// `adapter/`) resolved as training resolved it (`model.path`, else `model.name` in the Hugging
/// Face cache).
pub fn model_for_adapter(adapter: &Path) -> Result<PathBuf> {
    let record = crate::train::checkpoint::CONFIG_RECORD;
    let candidates: Vec<PathBuf> =
        [Some(adapter), adapter.parent()].into_iter().flatten().map(|d| d.join(record)).collect();
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "--adapter {}: no {record} of the run beside it ({}) to name the base model; give --model DIR (the model the adapters were trained on)",
            adapter.display(),
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    };
    // Only the model is read from it: the rest (data, outputs) need not be valid here.
    let text = std::fs::read_to_string(found)
        .with_context(|| format!("cannot read {} (or give --model DIR)", found.display()))?;
    let (cfg, _) =
        crate::train_config::TrainConfig::from_yaml_unvalidated(&text, found).with_context(|| {
            format!("reading the run's settings from {} (or give --model DIR)", found.display())
        })?;
    let dir = crate::train::resolve_model(&cfg)
        .with_context(|| format!("the base model named in {} (give --model DIR instead)", found.display()))?;
    tracing::info!("base model {} (from {})", dir.display(), found.display());
    Ok(dir)
}

/// Options of `lorahost predict`.
pub struct PredictOptions {
    /// Model directory (config, weights, tokenizer).
    pub model_dir: PathBuf,
    /// Trained adapters (a PEFT folder such as a run's `best/`) applied to the model.
    pub adapter: Option<PathBuf>,
    /// The image.
    pub image: PathBuf,
    /// The text prompts (one forward of the heads per prompt, the image encoded once). Empty
    /// with `boxes`: the boxes alone (prompt "visual").
    pub prompts: Vec<String>,
    /// Optional box prompts in image pixels, xyxy (given with every text prompt).
    pub boxes: Vec<[f32; 4]>,
    /// Output directory.
    pub out: PathBuf,
    /// Score threshold on σ(logit)·σ(presence).
    pub threshold: f32,
    /// NMS IoU threshold.
    pub nms_iou: f32,
    /// Device.
    pub device: DeviceArg,
    /// Dtype.
    pub dtype: DTypeArg,
    /// Predict on overlapping square tiles of this side (and overlap) when the image is larger,
    /// instead of the whole image squeezed to the model's input: for models trained on tiles
    /// (`lorahost tile`) and thin structures in large photos.
    pub tile: Option<(u32, u32)>,
}

/// The image files `predict` reads from its `--image` arguments: files as given, folders as
/// their JPEG and PNG files (sorted by name, not recursive).
pub fn expand_images(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(a)
                .with_context(|| format!("cannot list {}", a.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                        })
                })
                .collect();
            // Other image formats are not read: said, not skipped silently.
            let others: Vec<String> = std::fs::read_dir(a)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let ext = e.path().extension()?.to_str()?.to_ascii_lowercase();
                    matches!(ext.as_str(), "webp" | "tif" | "tiff" | "bmp" | "gif" | "heic" | "jp2")
                        .then(|| e.file_name().to_string_lossy().into_owned())
                })
                .collect();
            if !others.is_empty() {
                tracing::warn!(
                    "{}: {} image(s) in other formats than JPEG or PNG are not read (e.g. {}): convert them to PNG",
                    a.display(),
                    others.len(),
                    others[0]
                );
            }
            if found.is_empty() {
                bail!("{}: a folder without JPEG or PNG images", a.display());
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// A loaded model ready to segment images: weights, tokenizer and adapters.
pub struct Predictor {
    model: Sam3Model,
    tokenizer: PromptTokenizer,
    device: Device,
    _adapters: Option<crate::lora::LoraSet>,
}

impl Predictor {
    /// Load the model of `o` (and its adapters) once.
    pub fn load(o: &PredictOptions) -> Result<Self> {
        if !o.model_dir.is_dir() {
            bail!(
                "--model {}: {}; give the model folder (config.json, model.safetensors, tokenizer.json), or --adapter DIR from a run alone",
                o.model_dir.display(),
                if o.model_dir.exists() { "not a folder" } else { "no such folder" }
            );
        }
        let device = o.device.device()?;
        o.dtype.check(&device)?;
        crate::sam3::model::check_not_adapter(&o.model_dir)?;
        let tokenizer = PromptTokenizer::from_dir(&o.model_dir)?;
        let mut model = Sam3Model::load_dir(&o.model_dir, &device, o.dtype.dtype())?;
        tokenizer.check_model_vocab(model.config().text_config.vocab_size)?;
        let channels = model.config().vision_config.backbone_config.num_channels;
        if channels != 3 {
            bail!(
                "{}: vision_config.backbone_config.num_channels is {channels}; predict feeds RGB images (3 channels) \
                 (a {channels}-channel model can run through `lorahost forward` with its own pixel_values)",
                o.model_dir.display()
            );
        }
        let adapters = match &o.adapter {
            Some(dir) => {
                crate::export::warn_if_merged(&o.model_dir, dir);
                let lora = crate::lora::LoraSet::attach_peft(&mut model, dir, &device)
                    .with_context(|| format!("--adapter {}", dir.display()))?;
                tracing::info!("applying {} adapted modules from {}", lora.modules.len(), dir.display());
                Some(lora)
            }
            None => None,
        };
        let fit = tokenizer.prompt_fit(&o.prompts, model.config().text_config.max_position_embeddings);
        for (p, n) in &fit.truncated {
            tracing::warn!(
                "--prompt {p:?} is {n} tokens; the text encoder reads {}: it is cut short",
                model.config().text_config.max_position_embeddings
            );
        }
        for (a, b) in &fit.same {
            tracing::warn!(
                "--prompt {a:?} and --prompt {b:?} read as the same tokens: their results are the same"
            );
        }
        Ok(Predictor { model, tokenizer, device, _adapters: adapters })
    }

    /// Run the model on `img` with each prompt (and the box prompts, in `img`'s pixels):
    /// per prompt, its detections at `img`'s resolution.
    fn segment(
        &self,
        img: &image::RgbImage,
        prompts: &[String],
        boxes: &[[f32; 4]],
        o: &PredictOptions,
    ) -> Result<Vec<PromptResult>> {
        let (model, device) = (&self.model, &self.device);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let size = model.image_size();
        let pixel_values = imageio::to_pixel_values(img, size, device)?;
        let ctx = model.config().text_config.max_position_embeddings;
        // Every prompt in one batch: the vision backbone runs once, the rest per prompt.
        let p = prompts.len();
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for prompt in prompts {
            let (i, m) = self.tokenizer.encode(prompt, ctx);
            ids.extend(i.iter().map(|&i| i as i64));
            mask.extend(m.iter().map(|&i| i as i64));
        }
        let t = ids.len() / p;
        // Predicting over many images with the same prompts encodes each prompt once.
        let prompt_keys = Some(crate::sam3::text::PromptKey::rows(&ids, &mask, t));
        let input_ids = Tensor::from_vec(ids, (p, t), device)?;
        let attention_mask = Tensor::from_vec(mask, (p, t), device)?;
        let (input_boxes, input_boxes_labels) = if boxes.is_empty() {
            (None, None)
        } else {
            let mut data = Vec::new();
            for b in boxes {
                // Clipped to the image (a box reaching past it prompts the part inside).
                let (wf, hf) = (w as f32, h as f32);
                let (x0, x1) = (b[0].clamp(0.0, wf), b[2].clamp(0.0, wf));
                let (y0, y1) = (b[1].clamp(0.0, hf), b[3].clamp(0.0, hf));
                if !(x1 > x0 && y1 > y0) {
                    bail!(
                        "--box {},{},{},{} lies outside the {w}×{h} image: give it in the image's pixels as x0,y0,x1,y1",
                        b[0],
                        b[1],
                        b[2],
                        b[3]
                    );
                }
                let (x0, y0, x1, y1) = (x0 / wf, y0 / hf, x1 / wf, y1 / hf);
                data.extend([(x0 + x1) / 2.0, (y0 + y1) / 2.0, (x1 - x0).abs(), (y1 - y0).abs()]);
            }
            let n = boxes.len();
            let data: Vec<f32> = (0..p).flat_map(|_| data.iter().copied()).collect();
            (
                Some(Tensor::from_vec(data, (p, n, 4), device)?),
                Some(Tensor::from_vec(vec![1i64; p * n], (p, n), device)?),
            )
        };
        let inputs = Sam3Inputs {
            pixel_values,
            input_ids,
            attention_mask,
            input_boxes,
            input_boxes_labels,
            prompt_keys,
        };
        let out = if p == 1 {
            model.forward(&inputs)?
        } else {
            let index = Tensor::zeros(p, DType::U32, device)?;
            model.forward_indexed(&inputs, Some(&index), ForwardOptions::default())?
        };
        let f32v = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let logits = f32v(&out.pred_logits)?;
        let presence = f32v(&out.presence_logits)?;
        let boxes_flat = f32v(&out.pred_boxes)?;
        let boxes: Vec<[f32; 4]> = boxes_flat.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
        let (_, q, mh, mw) = out.pred_masks.dims4()?;
        let masks = f32v(&out.pred_masks)?;
        let mut results = Vec::new();
        for (k, prompt) in prompts.iter().cloned().enumerate() {
            let raw = RawOutputs {
                logits: &logits[k * q..(k + 1) * q],
                presence_logit: presence[k],
                boxes: &boxes[k * q..(k + 1) * q],
                masks: &masks[k * q * mh * mw..(k + 1) * q * mh * mw],
                mask_size: (mh, mw),
            };
            results.push(PromptResult {
                prompt,
                presence_score: postprocess::sigmoid(presence[k]),
                best_score: postprocess::best_score(&raw),
                detections: postprocess::detections(&raw, (w, h), o.threshold, o.nms_iou),
            });
        }
        Ok(results)
    }

    /// [`Self::segment`] on overlapping `size`-pixel tiles of `img` (as `lorahost tile` cuts
    /// them), each detection moved to its place in the image, and duplicates from the overlaps
    /// removed by NMS; the presence and best scores are each prompt's highest over the tiles.
    fn segment_tiled(
        &self,
        img: &image::RgbImage,
        prompts: &[String],
        o: &PredictOptions,
        size: u32,
        overlap: u32,
    ) -> Result<Vec<PromptResult>> {
        if size < 32 || overlap >= size {
            bail!("--tile {size} --tile-overlap {overlap}: use a tile of 32 pixels or more and an overlap smaller than it");
        }
        let (w, h) = (img.width(), img.height());
        let stride = size - overlap;
        let (xs, ys) = (
            crate::data::tiling::tile_positions(w, size, stride),
            crate::data::tiling::tile_positions(h, size, stride),
        );
        let (tw, th) = (size.min(w), size.min(h));
        let mut merged: Vec<PromptResult> = prompts
            .iter()
            .map(|p| PromptResult {
                prompt: p.clone(),
                presence_score: 0.0,
                best_score: 0.0,
                detections: Vec::new(),
            })
            .collect();
        for &y0 in &ys {
            for &x0 in &xs {
                let tile = image::imageops::crop_imm(img, x0, y0, tw, th).to_image();
                for (m, r) in merged.iter_mut().zip(self.segment(&tile, prompts, &[], o)?) {
                    m.presence_score = m.presence_score.max(r.presence_score);
                    m.best_score = m.best_score.max(r.best_score);
                    m.detections.extend(r.detections.into_iter().map(|d| place(d, (x0, y0), (w, h))));
                }
            }
        }
        for m in &mut merged {
            m.detections.sort_by(|a, b| b.score.total_cmp(&a.score));
            let boxes: Vec<[f32; 4]> = m.detections.iter().map(|d| d.bbox).collect();
            let scores: Vec<f32> = m.detections.iter().map(|d| d.score).collect();
            let keep = postprocess::nms(&boxes, &scores, o.nms_iou);
            let mut all: Vec<Option<Detection>> =
                std::mem::take(&mut m.detections).into_iter().map(Some).collect();
            m.detections = keep.into_iter().filter_map(|k| all[k].take()).collect();
        }
        tracing::info!(
            "{}: {} tiles of {size} px (overlap {overlap})",
            o.image.display(),
            xs.len() * ys.len()
        );
        Ok(merged)
    }

    /// Segment `o.image` with each prompt and write `detections.json`, `overlay.png` and
    /// `mask.png` ([`postprocess::mask_image`]: 0/255 for one prompt, a label map for several)
    /// into `o.out`. One prompt: `detections.json` holds `prompt`, `presence_score`, `best_score` and
    /// `detections` at the top level; several: a `prompts` list of those, in the order given,
    /// and the overlay colours each prompt's detections in its own colour. With `o.tile` and an
    /// image larger than a tile, the model runs on tiles ([`Self::segment_tiled`]).
    pub fn predict(&self, o: &PredictOptions) -> Result<Prediction> {
        let prompts = prompt_list(&o.prompts, !o.boxes.is_empty())?;
        let img = imageio::load_rgb(&o.image)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        for b in &o.boxes {
            let inside = b[0].max(0.0) < b[2].min(w as f32) && b[1].max(0.0) < b[3].min(h as f32);
            if !inside {
                tracing::warn!(
                    "--box {},{},{},{} does not overlap the {w}x{h} image {} (pixel x0,y0,x1,y1): it prompts nothing there",
                    b[0],
                    b[1],
                    b[2],
                    b[3],
                    o.image.display()
                );
            }
        }
        let results = match o.tile {
            Some((size, overlap)) if img.width() > size || img.height() > size => {
                if !o.boxes.is_empty() {
                    bail!("--tile predicts text prompts only: give --box without --tile (a box prompt belongs to the whole image)");
                }
                self.segment_tiled(&img, &prompts, o, size, overlap)?
            }
            _ => self.segment(&img, &prompts, &o.boxes, o)?,
        };
        std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
        let mut json = serde_json::json!({
            "image": path_json(&o.image),
            "model": path_json(&o.model_dir),
            "adapter": o.adapter.as_deref().map(path_json),
            "width": w,
            "height": h,
            "threshold": o.threshold,
        });
        if let [one] = results.as_slice() {
            // One prompt: the layout of a single-prompt run, unchanged.
            for (k, v) in serde_json::to_value(one)?.as_object().into_iter().flatten() {
                json[k] = v.clone();
            }
        } else {
            json["prompts"] = serde_json::to_value(&results)?;
        }
        crate::fsutil::write_atomic(
            &o.out.join("detections.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        let per_prompt: Vec<&[Detection]> = results.iter().map(|r| r.detections.as_slice()).collect();
        let overlay = postprocess::overlay_prompts(&img, &per_prompt, &o.boxes);
        let mut png = Vec::new();
        overlay
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .context("cannot encode the overlay PNG")?;
        crate::fsutil::write_atomic(&o.out.join("overlay.png"), &png)?;
        let mask = image::GrayImage::from_raw(w as u32, h as u32, postprocess::mask_image(&per_prompt, w, h))
            .context("mask image size")?;
        let mut png = Vec::new();
        mask.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .context("cannot encode the mask PNG")?;
        crate::fsutil::write_atomic(&o.out.join("mask.png"), &png)?;
        Ok(Prediction { width: w, height: h, prompts: results })
    }
}

/// A detection of the tile at `(x0, y0)` moved into the `(w, h)` image.
fn place(d: Detection, (x0, y0): (u32, u32), (w, h): (u32, u32)) -> Detection {
    let [th, tw] = d.segmentation.size;
    let part = postprocess::rle_decode(&d.segmentation);
    let (w, h) = (w as usize, h as usize);
    let mut full = vec![false; w * h];
    for y in 0..th {
        let row = (y0 as usize + y) * w + x0 as usize;
        full[row..row + tw].copy_from_slice(&part[y * tw..(y + 1) * tw]);
    }
    let (dx, dy) = (x0 as f32, y0 as f32);
    let [bx0, by0, bx1, by1] = d.bbox;
    Detection {
        bbox: [bx0 + dx, by0 + dy, bx1 + dx, by1 + dy],
        bbox_xywh: [bx0 + dx, by0 + dy, bx1 - bx0, by1 - by0],
        segmentation: postprocess::rle_encode(&full, h, w),
        ..d
    }
}

/// What one prompt found in an image.
#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    /// The prompt ("visual" for boxes alone).
    pub prompt: String,
    /// σ(presence logit): whether the model thinks the prompt is in the image at all.
    pub presence_score: f32,
    /// The best score of any query, kept or not (what `--threshold` would have to be below
    /// for a detection).
    pub best_score: f32,
    /// Detections above the threshold after NMS, best first.
    pub detections: Vec<Detection>,
}

/// What `predict` found in one image.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// One result per prompt, in the order given.
    pub prompts: Vec<PromptResult>,
}

/// The prompts to run: `prompts` trimmed; none with boxes is the boxes alone ("visual"); an
/// empty one is refused.
pub fn prompt_list(prompts: &[String], has_boxes: bool) -> Result<Vec<String>> {
    let trimmed: Vec<String> = prompts.iter().map(|p| p.trim().to_string()).collect();
    match trimmed.as_slice() {
        [] if has_boxes => Ok(vec!["visual".into()]),
        [one] if one.is_empty() && has_boxes => Ok(vec!["visual".into()]),
        [] => bail!("no --prompt: give a text prompt (e.g. --prompt \"crack\"; repeatable) or a --box"),
        list => {
            if let Some(i) = list.iter().position(|p| p.is_empty()) {
                bail!(
                    "--prompt number {} is empty; give a text prompt (e.g. --prompt \"crack\") {}",
                    i + 1,
                    if list.len() > 1 { "each time" } else { "or a --box" }
                );
            }
            Ok(trimmed)
        }
    }
}

/// One detection as the console shows it: score, `xyxy` box (as `bbox_xyxy` in the JSON) and
/// area.
pub fn detection_line(d: &Detection) -> String {
    format!(
        "score {:.3}  xyxy [{:.0}, {:.0}, {:.0}, {:.0}]  area {} px",
        d.score, d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3], d.area
    )
}

/// "N detection(s)" (with `for "PROMPT"` when `name_prompt`); with none, the best score and
/// how to see it (a `--threshold` below it).
pub fn count_text(r: &PromptResult, threshold: f32, name_prompt: bool) -> String {
    let n = r.detections.len();
    let prompt = if name_prompt { format!(" for {:?}", r.prompt) } else { String::new() };
    if n > 0 {
        return format!("{n} detection(s){prompt}");
    }
    let best = r.best_score;
    // A threshold strictly below the best score (a detection needs score > threshold).
    let below = ((best as f64 * 100.0 - 1e-6).floor() / 100.0).max(0.0);
    if best >= 0.01 && (below as f32) < threshold {
        format!(
            "0 detection(s){prompt} above --threshold {threshold} (best score {best:.3}; lower it to see more, e.g. --threshold {below:.2})"
        )
    } else {
        format!("0 detection(s){prompt} above --threshold {threshold} (best score {best:.3}: nothing like it found)")
    }
}

/// A path as a JSON string, for the documents `predict` writes. Bytes that are not UTF-8 (a
/// file named on another system) show as U+FFFD: serde refuses such a path, and
/// `serde_json::json!` panics on it, so a `PathBuf` must never go into JSON as it is.
pub fn path_json(path: &Path) -> serde_json::Value {
    serde_json::Value::String(path.to_string_lossy().into_owned())
}

/// `lorahost predict` on one image: writes `detections.json`, `overlay.png` and `mask.png` into `out`.
pub fn predict(o: &PredictOptions) -> Result<Prediction> {
    Predictor::load(o)?.predict(o)
}

/// The output folder of each of several images under `out`: its file name (made unique when
/// two folders hold the same name).
pub fn image_out_dirs(images: &[PathBuf], out: &Path) -> Vec<PathBuf> {
    let mut used = std::collections::HashSet::new();
    images
        .iter()
        .map(|p| {
            let name =
                p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
            let mut candidate = name.clone();
            let mut k = 2;
            while !used.insert(candidate.clone()) {
                candidate = format!("{name}-{k}");
                k += 1;
            }
            out.join(candidate)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base model of a run's adapters comes from the run's recorded config, which needs only
    /// its `model:` section here (no data_dir: predict reads no dataset).
    #[test]
    fn the_base_model_is_read_from_a_record_holding_only_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let best = dir.path().join("best");
        std::fs::create_dir_all(&best).unwrap();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny_sam3");
        let record = format!("model:\n  path: {}\n", model.display());
        std::fs::write(dir.path().join(crate::train::checkpoint::CONFIG_RECORD), record).unwrap();
        assert_eq!(model_for_adapter(&best).unwrap(), model);
    }

    /// An image whose file name is not UTF-8 is segmented, and its `detections.json` names it
    /// (the undecodable byte as U+FFFD); putting the `PathBuf` into `json!` panicked.
    #[cfg(unix)]
    #[test]
    fn a_non_utf8_file_name_is_written_as_text() {
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join(std::ffi::OsStr::from_bytes(b"b\xffd.png"));
        image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90]))
            .save(&image)
            .unwrap();
        let o = PredictOptions {
            model_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny_sam3"),
            adapter: None,
            image,
            prompts: vec!["crack".into()],
            boxes: Vec::new(),
            out: tmp.path().join("out"),
            threshold: 0.5,
            nms_iou: 0.5,
            device: DeviceArg::Cpu,
            dtype: DTypeArg::F32,
            tile: None,
        };
        let p = predict(&o).unwrap();
        assert_eq!((p.width, p.height), (40, 30));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(o.out.join("detections.json")).unwrap()).unwrap();
        assert!(json["image"].as_str().unwrap().ends_with("b\u{fffd}d.png"), "{json}");
        assert!(json["model"].as_str().unwrap().ends_with("tiny_sam3"), "{json}");
        assert!(json["adapter"].is_null(), "{json}");
        assert_eq!(path_json(Path::new("a/b.png")), serde_json::json!("a/b.png"));
    }
}
