//! The `lorahost` command line.

use crate::inference::path_json;
use crate::metrics::Trace;
use crate::plugin::{self, hook_list, PluginOverrides, PluginSet, PluginSpec, Runtime};
use crate::replay;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// lorahost: fine-tune SAM3 with LoRA, steered by sandboxed, hot-reloaded WebAssembly plugins.
#[derive(Parser, Debug)]
#[command(name = "lorahost", version, about, long_about = None, after_help = "\
Examples:
  lorahost train --config configs/demo.yaml
  lorahost train --config configs/full_lora_config.yaml --plugin spike_guard.wasm
  lorahost train --config configs/full_lora_config.yaml --resume
  lorahost doctor --config configs/full_lora_config.yaml --probe-steps 20
  lorahost lr-find --config configs/full_lora_config.yaml
  lorahost export --config configs/full_lora_config.yaml --adapter outputs/sam3_lora_full/best --merge --out merged/
  lorahost plugin check plugins/target/wasm32-wasip2/release/spike_guard.wasm
  lorahost plugin replay spike_guard.wasm --trace examples/traces/diagnosis.jsonl
  lorahost plugin new my_scheduler

Logs go to stderr; set LORAHOST_LOG=debug (or a tracing filter) for more.")]
pub struct Cli {
    /// Where compiled plugins are cached [default: $LORAHOST_CACHE_DIR or ~/.cache/lorahost/components].
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write the compiled-plugin cache.
    #[arg(long, global = true)]
    pub no_cache: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune SAM3 with LoRA as a training YAML says (SAM3_LoRA's schema; every key applied).
    ///
    /// Writes into output.output_dir: metrics.jsonl (one line per optimizer step, the format
    /// `plugin replay` and `doctor` read), checkpoints/step-N/ (adapters, optimizer, state;
    /// `--resume` continues exactly), best/ and adapter/ (PEFT format), loss_curve.png.
    /// Without --config, runs the bundled demo (configs/demo.yaml: tiny SAM3, synthetic cracks).
    Train {
        /// Training YAML.
        #[arg(long, default_value = "configs/demo.yaml")]
        config: PathBuf,
        /// A plugin (.wasm component), after the config's `plugins:`; repeatable.
        #[arg(long = "plugin", value_name = "FILE.wasm")]
        plugins: Vec<PathBuf>,
        #[command(flatten)]
        plugin_config: PluginConfigArgs,
        /// Override a config key: SECTION.KEY=VALUE (VALUE parsed as YAML); repeatable.
        #[arg(long = "override", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Resume from the newest checkpoint in output_dir, or from the checkpoint directory given.
        #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
        resume: Option<String>,
        /// Stop after this many optimizer steps (the LR schedule still spans the whole run).
        #[arg(long)]
        max_steps: Option<u64>,
        /// Do not watch plugin files for new versions.
        #[arg(long)]
        no_hot_reload: bool,
    },
    /// Diagnose a training setup: config, data, LoRA targets and (with --probe-steps) a few
    /// real steps. Findings carry the failure-mode codes F1..F27 of the SAM3_LoRA catalogue
    /// (or lorahost's D-codes), a severity, the evidence and the fix. Exits non-zero when any
    /// finding is an error.
    #[command(
        after_help = "Examples:\n  lorahost doctor --config configs/full_lora_config.yaml --probe-steps 20\n  lorahost doctor --trace outputs/run/metrics.jsonl          # why does the loss fluctuate?\n  lorahost doctor --trace sam3_lora_log.jsonl --config C.yaml"
    )]
    Doctor {
        /// Training YAML [default: configs/demo.yaml, unless --trace is given alone].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Diagnose a recorded run from its metrics log: lorahost's metrics.jsonl, a SAM3_LoRA
        /// (TC4451) JSONL log, a Hugging Face trainer_state.json, a CSV log (Lightning's
        /// metrics.csv, a W&B or TensorBoard export), or TensorBoard event files (an
        /// events.out.tfevents.* file or its run's folder).
        /// How much the loss moves from step to step and which causes the log shows (batch,
        /// warmup, clipping, LR schedule), settings the header names that the steps do not
        /// show, whether the loss improves, spikes, slowdowns, over-training. With --config too,
        /// the setup is checked as well.
        #[arg(long, value_name = "METRICS")]
        trace: Option<PathBuf>,
        /// Override a config key: SECTION.KEY=VALUE; repeatable.
        #[arg(long = "override", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// The dataset's expected content fingerprint (sha-256 prefix, as `train` logs it).
        #[arg(long, value_name = "HEX")]
        expect_fingerprint: Option<String>,
        /// Run this many real optimizer steps (in a scratch directory) and analyse them.
        #[arg(long, default_value_t = 0)]
        probe_steps: u64,
        /// Memory of the training device in GiB (default: available host memory for cpu).
        #[arg(long, value_name = "GiB")]
        device_memory_gb: Option<f64>,
        /// Host RAM in GiB (default: what the machine has available now).
        #[arg(long, value_name = "GiB")]
        host_memory_gb: Option<f64>,
        /// Draw the ground truth as training builds it (the model's square input with each
        /// prompt's boxes and masks in its colour; with training.augment also the augmented
        /// variant) into DIR, with an index overlays.json.
        #[arg(long, value_name = "DIR")]
        gt_overlays: Option<PathBuf>,
        /// Images per split to draw with --gt-overlays (spread over the split).
        #[arg(long, value_name = "N", default_value_t = 8)]
        gt_overlay_images: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate trained adapters (or a model alone: the base model, a merged one) on a split:
    /// the validation loss terms and COCO mask mAP/AP50/AP75 and cgF1, computed as training's
    /// validation computes them
    Evaluate {
        /// The training YAML (model, data and evaluation settings).
        #[arg(long)]
        config: PathBuf,
        /// Adapter directory (adapter_model.safetensors + adapter_config.json), e.g. OUTPUT/best;
        /// its rank, alpha and modules are read from it (a `lora:` section that differs is
        /// warned about). Without it the model alone is evaluated.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// Evaluate this model directory instead of the config's model.path, e.g. a model
        /// `export --merge` wrote.
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Split to evaluate (default: test when present, else valid).
        #[arg(long)]
        split: Option<String>,
        /// Override a config key: SECTION.KEY=VALUE; repeatable.
        #[arg(long = "override", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Write pictures of the worst image/prompt pairs here: the ground truth (red) beside
        /// the detections scoring 0.5 or more, lowest pixel IoU first (`panels.json` indexes
        /// them). A new or empty folder, or one an earlier --panels wrote (its pictures are
        /// replaced).
        #[arg(long, value_name = "DIR")]
        panels: Option<PathBuf>,
        /// How many pairs --panels draws.
        #[arg(long, default_value_t = 24)]
        panel_count: usize,
    },
    /// Find a learning rate: an LR range test on the config's model, data and batch. Trains
    /// with the LR rising exponentially from --start-lr to --end-lr, one value per optimizer
    /// step, until the loss diverges, then suggests the LR where the smoothed loss fell
    /// fastest. Writes metrics.jsonl, a TensorBoard file, lr_find.png and lr_find.json into
    /// --out (default <output_dir>/lr-find); the run's own folder is not touched, no plugin is
    /// loaded, nothing is validated or saved.
    #[command(
        after_help = "Example:\n  lorahost lr-find --config configs/full_lora_config.yaml --steps 100\n  lorahost train --config configs/full_lora_config.yaml --override training.learning_rate=<the suggestion>"
    )]
    LrFind {
        /// Training YAML.
        #[arg(long, default_value = "configs/demo.yaml")]
        config: PathBuf,
        /// Override a config key: SECTION.KEY=VALUE; repeatable.
        #[arg(long = "override", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// The first step's LR.
        #[arg(long, default_value_t = 1e-7)]
        start_lr: f64,
        /// The last step's LR (the test usually stops before, when the loss diverges).
        #[arg(long, default_value_t = 1.0)]
        end_lr: f64,
        /// Optimizer steps from --start-lr to --end-lr.
        #[arg(long, default_value_t = 100)]
        steps: u64,
        /// The test's folder [default: <output_dir>/lr-find].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export trained adapters: check them against the base model, and with --merge write a
    /// full transformers-format model with the adapters folded into the weights.
    Export {
        /// The training YAML the adapters were trained with (its model section; a `lora:`
        /// section that differs from the adapter is warned about).
        #[arg(long)]
        config: PathBuf,
        /// Adapter directory (adapter_model.safetensors + adapter_config.json), e.g. OUTPUT/best;
        /// its rank, alpha and modules are read from it.
        #[arg(long, value_name = "DIR")]
        adapter: PathBuf,
        /// Fold the adapters into the base weights.
        #[arg(long)]
        merge: bool,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Replace an --out that already holds a previous export (without it, such an --out
        /// is refused and its files named).
        #[arg(long)]
        overwrite: bool,
    },
    /// Import a dataset of images and mask images (CrackForest, DeepCrack, Crack500, ISIC,
    /// Kvasir-SEG style: binary or label masks) as the COCO layout training reads, each mask as
    /// exact RLE (no polygon tracing that loses one-pixel cracks). Writes OUT/<split>/ with the
    /// images and an _annotations.coco.json; train on OUT as data_dir.
    ///
    /// A mask pairs with the image of the same file stem, or the stem plus a suffix such as _mask,
    /// _gt, _label or _segmentation. Each connected region of a class becomes one object (or, with
    /// --instances whole, all of it); an empty mask makes the image a negative.
    #[command(
        after_help = "Examples:\n  lorahost import --images CFD/image --masks CFD/gt --prompt crack --out data --valid-share 0.2\n  lorahost import --images ISIC/val --masks ISIC/val_gt --prompt lesion --split valid --out data\n  lorahost import --images scans --masks labels --class 1=crack --class 2=spalling --out data"
    )]
    Import {
        /// A dataset folder to import whole: its train/ val/ test/ subfolders (or the folder
        /// itself), each with an image folder (images, img, ...) beside a mask folder (masks,
        /// gt, labels, ...), or masks beside their images with a suffix; or a YOLO dataset
        /// (images/ beside labels/*.txt, names in data.yaml) or LabelMe JSON files, whose
        /// polygons are kept as drawn.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["images", "masks"], required_unless_present_all = ["images", "masks"])]
        from: Option<PathBuf>,
        /// The images' folder (JPEG or PNG).
        #[arg(long, value_name = "DIR", requires = "masks")]
        images: Option<PathBuf>,
        /// The masks' folder (may be the images' folder when the masks carry a suffix).
        #[arg(long, value_name = "DIR", requires = "images")]
        masks: Option<PathBuf>,
        /// The dataset folder to write OUT/<split>/ into (a split folder there must be new or empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// What binary masks show (the category name and text prompt), e.g. "crack" (mask
        /// imports; YOLO and LabelMe datasets name their classes).
        #[arg(long, value_name = "NAME", conflicts_with = "class")]
        prompt: Option<String>,
        /// A class of label or colour masks, VALUE=NAME: a grey level (1=crack) or an 8-bit
        /// colour (255,0,0=crack); repeatable. Pixels of other values are background.
        #[arg(long, value_name = "VALUE=NAME")]
        class: Vec<crate::data::masks::MaskClass>,
        /// The split the images go to.
        #[arg(long, default_value = "train")]
        split: String,
        /// Share of the images put into valid/ instead (seeded, by file name).
        #[arg(long, default_value_t = 0.0)]
        valid_share: f64,
        /// Share of the images put into test/ instead (seeded, by file name).
        #[arg(long, default_value_t = 0.0)]
        test_share: f64,
        /// Connected regions or whole classes as objects.
        #[arg(long, value_enum, default_value = "components")]
        instances: crate::data::masks::Instances,
        /// Fewest pixels an object needs; smaller regions are dropped as noise.
        #[arg(long, default_value_t = 8)]
        min_pixels: usize,
        /// Seed of the split choice.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Cut a dataset's large images into overlapping tiles with their masks, so thin structures
    /// (cracks) keep their width at the model's mask grid (F20). Writes OUT/<split>/ with PNG
    /// tiles and an _annotations.coco.json (cropped masks as RLE); train on OUT as data_dir.
    Tile {
        /// The dataset folder (train/, valid/, test/ with _annotations.coco.json).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Output folder (new or empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Tile side in pixels (SAM3's input is 1008: a tile is seen at full resolution).
        #[arg(long, default_value_t = 1008)]
        size: u32,
        /// Overlap of neighbouring tiles in pixels.
        #[arg(long, default_value_t = 128)]
        overlap: u32,
        /// Share of the tiles without any object to keep as negatives, in [0, 1].
        #[arg(long, default_value_t = 0.25)]
        empty_tiles: f64,
        /// Fewest mask pixels an object needs inside a tile to be annotated there.
        #[arg(long, default_value_t = 8)]
        min_pixels: usize,
        /// Seed of the choice of empty tiles.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Work with plugins: check, replay a recorded run through them, scaffold a new one.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Time LoRA training steps of a random-initialised SAM3: the workload of
    /// ../shared/gpu/hf_sam3_bench.py (PyTorch + PEFT), to compare on one machine.
    ///
    /// Prints one JSON line: median s/step, images/s, peak memory (GiB) and the time from start to
    /// the end of the first step.
    Bench {
        /// Device.
        #[arg(long, value_enum, default_value = "cpu")]
        device: crate::inference::DeviceArg,
        /// Compute dtype of the frozen model (LoRA and optimizer stay f32).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: crate::inference::DTypeArg,
        /// The tiny demo shape instead of full-size SAM3 (1008², 840M parameters).
        #[arg(long)]
        tiny: bool,
        /// A transformers SAM3 `config.json` to build instead (random weights): your own model
        /// shape, or `examples/bench/full_depth_tiny_width.json` (SAM3's layer counts at the
        /// demo's widths: `graph_ops` of the full workload on any machine).
        #[arg(long, value_name = "CONFIG_JSON", conflicts_with = "tiny")]
        model_config: Option<PathBuf>,
        /// Images per step.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Untimed steps first (the first includes kernel compilation).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// LoRA rank (alpha = 2 × rank).
        #[arg(long, default_value_t = 32)]
        rank: usize,
        /// Adapt the ViT too (1) or not (0).
        #[arg(long, default_value_t = 1)]
        vision_lora: u8,
        /// Activation checkpointing of the ViT blocks (recomputed in backward).
        #[arg(long)]
        ckpt: bool,
        /// The ViT blocks recompute fc1's output in backward instead of keeping it
        /// (`gradient_checkpointing: mlp`).
        #[arg(long, conflicts_with = "ckpt")]
        ckpt_mlp: bool,
        /// Print only the memory estimate of this workload (`doctor`'s model) as JSON; nothing
        /// is built or run.
        #[arg(long)]
        estimate_only: bool,
        /// Append the result as a JSON line to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// After the timed steps, profile this many more: the mean time of each model
        /// component, the loss, backward and the optimizer, and of the costliest operations,
        /// on the device (CUDA events, no synchronisation) and on the host (`profile`,
        /// `profile_ops` in the JSON; the timed steps are not slowed).
        #[arg(long, default_value_t = 0, value_name = "STEPS")]
        profile: usize,
        /// After that, time a window and a global ViT block on their own, forward and backward
        /// this many times each, the GPU kept busy meanwhile so that it never waits for the
        /// host: the kernels' own time and the host's time to issue them, per block and per
        /// operation (`isolated` in the JSON; against `profile_ops`, the difference is the time
        /// the device waited for the host in a step).
        #[arg(long, default_value_t = 0, value_name = "REPS")]
        isolated: usize,
    },
    /// Check the training ops lorahost implements itself (lean attention, adapted linear, frozen
    /// 3×3 convolution and norms, the ViT block and DETR layer ops) on a device: forward and
    /// every input gradient against the composed computation in f64 on the CPU (the layer ops
    /// against the same layers op by op). Run it first on a new GPU build; exits non-zero if an
    /// op is off.
    Selftest {
        /// Device.
        #[arg(long, value_enum, default_value = "cpu")]
        device: crate::inference::DeviceArg,
        /// Compute dtype (LoRA factors stay f32).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: crate::inference::DTypeArg,
    },
    /// Run SAM3 on raw tensors (the parity contract with transformers' Sam3Model).
    ///
    /// IN holds pixel_values f32 (B,3,S,S), input_ids i64 (B,T), attention_mask i64 (B,T), and
    /// optionally input_boxes f32 (B,N,4) normalized cxcywh with input_boxes_labels i64 (B,N)
    /// (1 positive, 0 negative, -10 padding). OUT gets pred_logits (B,Q), pred_boxes (B,Q,4)
    /// normalized xyxy, presence_logits (B,1), pred_masks (B,Q,H,W) and semantic_seg (B,1,H,W).
    Forward {
        /// Model directory: config.json + model.safetensors (or sharded with an index).
        #[arg(long)]
        model: PathBuf,
        /// Input tensors (safetensors).
        #[arg(long)]
        inputs: PathBuf,
        /// Output file (safetensors), written atomically.
        #[arg(long)]
        out: PathBuf,
        /// Device.
        #[arg(long, value_enum, default_value = "cpu")]
        device: crate::inference::DeviceArg,
        /// Compute dtype.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: crate::inference::DTypeArg,
        /// Numerics where Meta's original and transformers differ: `transformers` (the parity
        /// contract: text-only prompts skip the geometry encoder, presence clamped to ±10, the
        /// config's ViT LayerNorm eps) or `original` (geometry CLS token always present, no
        /// clamp, ViT eps 1e-5: how SAM3 was trained; what predict and train use).
        #[arg(long, value_enum, default_value = "transformers")]
        semantics: SemanticsArg,
    },
    /// Segment images with text prompts (and optional boxes): JSON, overlay and mask PNGs.
    ///
    /// Applies EXIF orientation, resizes to the model size, scores each query as
    /// σ(logit)·σ(presence), keeps those above --threshold, runs NMS, upsamples masks to the
    /// image, and writes OUT/detections.json (boxes in pixels, scores, COCO compressed-RLE
    /// masks), OUT/overlay.png and OUT/mask.png (the detections' masks at image size: 0/255, or
    /// with several prompts prompt k's pixels as value k, as `import --class` reads them). With
    /// several --prompt, the image is encoded once and detections.json holds a `prompts` list
    /// (one entry per prompt). With several images
    /// (--image repeated, or a folder) the model loads once, each image gets OUT/<file name>/
    /// and OUT/summary.json lists them all.
    Predict {
        /// Model directory (config.json, weights, tokenizer.json). With --adapter from a run it
        /// may be left out: the run's recorded config.yaml (beside best/, or in the checkpoint)
        /// names the base model.
        #[arg(long, required_unless_present = "adapter")]
        model: Option<PathBuf>,
        /// Trained adapters to apply: a PEFT folder (adapter_config.json +
        /// adapter_model.safetensors) such as a run's best/ or a checkpoint's adapter/.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// The image (JPEG or PNG); repeatable, or a folder of them. With several images each
        /// gets its own OUT/<file name>/ and OUT/summary.json lists them all.
        #[arg(long, required = true)]
        image: Vec<PathBuf>,
        /// What to find, e.g. "crack"; repeatable (each prompt gets its own detections, the
        /// image is encoded once).
        #[arg(long = "prompt", value_name = "TEXT")]
        prompts: Vec<String>,
        /// A box prompt in image pixels, x0,y0,x1,y1 (repeatable; given with every --prompt).
        #[arg(long = "box", value_name = "X0,Y0,X1,Y1")]
        boxes: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Predict on overlapping square tiles of this many pixels when an image is larger
        /// (as `lorahost tile` cut the training data), detections placed back in the image
        /// and overlap duplicates removed by NMS; text prompts only.
        #[arg(long, value_name = "PIXELS")]
        tile: Option<u32>,
        /// Overlap of neighbouring tiles with --tile, in pixels.
        #[arg(long, value_name = "PIXELS", default_value_t = 128, requires = "tile")]
        tile_overlap: u32,
        /// Score threshold.
        #[arg(long, default_value_t = 0.5)]
        threshold: f32,
        /// NMS IoU threshold.
        #[arg(long, default_value_t = 0.7)]
        nms_iou: f32,
        /// Device.
        #[arg(long, value_enum, default_value = "cpu")]
        device: crate::inference::DeviceArg,
        /// Compute dtype.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: crate::inference::DTypeArg,
    },
}

/// `lorahost plugin ...`
#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Load a plugin, validate it against the contract, and print what it is.
    ///
    /// Compiles the component (or loads it from the cache), type-checks it against the
    /// lorahost:plugin@0.1.0 world, calls describe() and init() with the given config, and
    /// prints name, version, hooks, size and compile time. Exits non-zero when the plugin
    /// would not load in training.
    Check {
        /// The plugin (.wasm component).
        file: PathBuf,
        #[command(flatten)]
        config: PluginConfigArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Feed a recorded run's per-step metrics through plugins and print each step's answers.
    ///
    /// The trace is the metrics JSONL that `lorahost train` writes (one JSON object per
    /// optimizer step with at least step and loss; see docs/metrics-schema.md), a Hugging Face
    /// Trainer trainer_state.json (its log_history), a SAM3_LoRA (TC4451 fork) JSONL log
    /// (`train_step` events), a CSV log (Lightning CSVLogger, W&B, TensorBoard export) or
    /// TensorBoard event files (a file or its run's folder). The hooks are called in the
    /// order training calls them (loss weights per micro-step, gradients, LR, step); the data
    /// sampling hooks cannot be replayed. With --json,
    /// prints one JSON object per step with `step` and `action` (continue, skip, scale_lr,
    /// checkpoint, stop) and the details.
    Replay {
        /// Plugins (.wasm components), called in this order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The metrics JSONL to replay (or trainer_state.json, a SAM3_LoRA JSONL log, a Lightning
        /// metrics.csv, TensorBoard event files or their folder).
        #[arg(long, value_name = "METRICS.jsonl")]
        trace: PathBuf,
        #[command(flatten)]
        config: PluginConfigArgs,
        /// Print one JSON object per step instead of text.
        #[arg(long)]
        json: bool,
        /// Keep going after a plugin answers stop (training would stop there).
        #[arg(long)]
        no_stop: bool,
    },
    /// Scaffold a new plugin crate that builds as-is with `cargo build --target wasm32-wasip2`.
    New {
        /// Plugin name, snake_case (also the crate name).
        name: String,
        /// Parent directory for the new crate.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the lorahost-plugin SDK (plugins/sdk of a lorahost repository) [default: the one this binary was built from, else a vendored copy].
        #[arg(long, conflicts_with = "vendor_sdk")]
        sdk: Option<PathBuf>,
        /// Put a copy of the SDK this binary embeds inside the new crate (`lorahost-plugin/`), so
        /// the crate builds on any machine, without a lorahost repository.
        #[arg(long)]
        vendor_sdk: bool,
    },
}

/// `--semantics` of `forward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SemanticsArg {
    /// transformers' Sam3Model, exactly.
    Transformers,
    /// Meta's original Sam3Image.
    Original,
}

/// How plugins get their config sections and limits on the command line.
#[derive(Args, Debug, Clone, Default)]
pub struct PluginConfigArgs {
    /// YAML or JSON file mapping plugin name (file stem) to its config section,
    /// e.g. `spike_guard: {z_threshold: 5}`. A top-level `plugins:` key is also accepted.
    #[arg(long = "plugin-config", value_name = "FILE")]
    pub plugin_config: Option<PathBuf>,
    /// Set one config key: NAME.KEY=VALUE (VALUE is parsed as YAML: 5, true, "text").
    #[arg(long = "set", value_name = "NAME.KEY=VALUE")]
    pub set: Vec<String>,
    /// CPU budget per hook call, in milliseconds [default: 100, or the config's `budget_ms`].
    #[arg(long)]
    pub budget_ms: Option<u64>,
    /// Memory limit per plugin, in MiB [default: 64, or the config's `memory_mb`].
    #[arg(long)]
    pub memory_mb: Option<usize>,
}

impl PluginConfigArgs {
    /// The settings these flags give, for every plugin of the run.
    pub fn overrides(&self) -> Result<PluginOverrides> {
        let mut sections: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        if let Some(path) = &self.plugin_config {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut value: serde_json::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not valid YAML/JSON", path.display()))?;
            if let Some(inner) = value.get("plugins").cloned() {
                value = inner;
            }
            // A training config's `plugins:` list (`- path: x.wasm` + `config:`) reads too.
            if let Some(list) = value.as_array() {
                let mut map = serde_json::Map::new();
                for (i, e) in list.iter().enumerate() {
                    let p = e
                        .get("path")
                        .and_then(|p| p.as_str())
                        .with_context(|| format!("{}: plugins[{i}] has no `path`", path.display()))?;
                    let cfg = e.get("config").cloned().unwrap_or(serde_json::Value::Null);
                    if !cfg.is_null() {
                        map.insert(stem(Path::new(p)), cfg);
                    }
                }
                value = map.into();
            }
            let map = value.as_object().with_context(|| {
                format!(
                    "{}: expected a mapping of plugin name to config section (or a training config's `plugins:` list)",
                    path.display()
                )
            })?;
            sections.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for s in &self.set {
            let (key, raw) =
                s.split_once('=').with_context(|| format!("--set {s:?}: expected NAME.KEY=VALUE"))?;
            let (name, field) = key.split_once('.').with_context(|| {
                format!("--set {s:?}: expected NAME.KEY=VALUE (e.g. spike_guard.z_threshold=5)")
            })?;
            let value: serde_json::Value =
                serde_yaml::from_str(raw).with_context(|| format!("--set {s:?}: value is not valid YAML"))?;
            let entry = sections.entry(name.to_string()).or_insert_with(|| serde_json::json!({}));
            if entry.is_null() {
                *entry = serde_json::json!({});
            }
            match entry.as_object_mut() {
                Some(obj) => {
                    obj.insert(field.to_string(), value);
                }
                None => bail!("--set {s:?}: the config of {name} is not a mapping"),
            }
        }
        if self.budget_ms == Some(0) {
            bail!("--budget-ms 0: a hook call needs at least 1 ms");
        }
        if self.memory_mb.is_some_and(|m| m < 2) {
            bail!("--memory-mb {}: a plugin needs at least 2 MiB", self.memory_mb.unwrap_or(0));
        }
        Ok(PluginOverrides {
            sections,
            call_budget: self.budget_ms.map(Duration::from_millis),
            memory_bytes: self.memory_mb.map(|m| m << 20),
        })
    }

    /// The specs for `files` with these settings.
    pub fn specs(&self, files: &[PathBuf]) -> Result<Vec<PluginSpec>> {
        let mut specs: Vec<PluginSpec> = files.iter().map(PluginSpec::new).collect();
        self.overrides()?.apply(&mut specs).map_err(anyhow::Error::msg)?;
        Ok(specs)
    }
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn runtime(cli: &Cli) -> Result<Arc<Runtime>> {
    let cache = if cli.no_cache { None } else { cli.cache_dir.clone().or_else(Runtime::default_cache_dir) };
    Ok(Runtime::new(cache)?)
}

fn ensure_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("plugin {} is a directory: name the .wasm component file", path.display());
    }
    if !path.is_file() {
        // The reference plugins build to plugins/target/wasm32-wasip2/release/ in the repo.
        let built =
            Path::new("plugins/target/wasm32-wasip2/release").join(path.file_name().unwrap_or_default());
        let hint = if path.to_string_lossy().contains("plugins/target") {
            "; build the plugins first: `make plugins` (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)".to_string()
        } else if built.is_file() && path.parent().is_none_or(|p| p.as_os_str().is_empty()) {
            format!("; the reference plugin is at {}", built.display())
        } else {
            "; the reference plugins (spike_guard, warmup_validator, balanced_sampler, cosine_schedule, early_stopping) build with `make plugins` into plugins/target/wasm32-wasip2/release/".to_string()
        };
        bail!("plugin file {} not found{hint}", path.display());
    }
    Ok(())
}

fn parse_box(s: &str) -> Result<[f32; 4]> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--box {s:?}: expected four numbers x0,y0,x1,y1"))?;
    match v.as_slice() {
        v if v.iter().any(|c| !c.is_finite()) => bail!("--box {s:?}: the coordinates must be finite numbers"),
        [x0, y0, x1, y1] if x1 > x0 && y1 > y0 => Ok([*x0, *y0, *x1, *y1]),
        [_, _, _, _] => bail!("--box {s:?}: need x1 > x0 and y1 > y0"),
        _ => bail!("--box {s:?}: expected four numbers x0,y0,x1,y1"),
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Train { config, plugins, plugin_config, overrides, resume, max_steps, no_hot_reload } => {
            for f in plugins {
                ensure_file(f)?;
            }
            let opts = crate::train::TrainOptions {
                config: config.clone(),
                plugins: plugins.iter().map(PluginSpec::new).collect(),
                plugin_overrides: plugin_config.overrides()?,
                resume: resume.as_deref().map(|r| match r {
                    "latest" => crate::train::Resume::Latest,
                    d => crate::train::Resume::Dir(PathBuf::from(d)),
                }),
                max_steps: *max_steps,
                hot_reload: !no_hot_reload,
                overrides: overrides.clone(),
                cache_dir: if cli.no_cache {
                    None
                } else {
                    cli.cache_dir.clone().or_else(Runtime::default_cache_dir)
                },
                lr_range: None,
            };
            let _signals = crate::train::interrupt::install();
            let s = crate::train::train(&opts)?;
            if s.already_complete {
                println!(
                    "nothing to train: the run is complete at step {}; outputs in {} are unchanged",
                    s.steps,
                    s.output_dir.display()
                );
                return Ok(());
            }
            println!(
                "trained {} optimizer step{} ({} skipped); outputs in {}",
                s.steps,
                if s.steps == 1 { "" } else { "s" },
                s.skipped_steps,
                s.output_dir.display()
            );
            if let (Some(first), Some(last)) = (s.initial_validation_loss, s.final_validation.as_ref()) {
                println!("validation loss {first:.4} -> {:.4}", last.loss);
            }
            if let Some(m) = s.final_validation.as_ref().and_then(|v| v.summary) {
                println!("validation mask mAP {:.4} (AP50 {:.4}), cgF1 {:.2}", m.map, m.ap50, m.cgf1);
            }
            if let Some(r) = s.stopped {
                if s.out_of_memory {
                    // A failure for scripts and schedulers, with the checkpoint to resume from.
                    anyhow::bail!("stopped: {r}");
                }
                println!("stopped early: {r}");
            }
            if s.interrupted {
                std::process::exit(crate::train::interrupt::EXIT_CODE);
            }
            Ok(())
        }
        Command::Doctor {
            config,
            trace,
            overrides,
            expect_fingerprint,
            probe_steps,
            device_memory_gb,
            host_memory_gb,
            gt_overlays,
            gt_overlay_images,
            json,
        } => {
            if gt_overlays.is_some() && *gt_overlay_images == 0 {
                bail!("--gt-overlay-images 0 draws nothing: give the number of images per split to draw (e.g. 8)");
            }
            for (flag, v) in [("--device-memory-gb", device_memory_gb), ("--host-memory-gb", host_memory_gb)]
            {
                if let Some(v) = v {
                    if !(v.is_finite() && *v > 0.0) {
                        bail!("{flag} {v}: give the memory in GiB as a number > 0 (e.g. 24)");
                    }
                }
            }
            if let Some(f) = expect_fingerprint {
                if !crate::doctor::valid_fingerprint(f) {
                    bail!("--expect-fingerprint {f:?}: give at least 8 hex digits of the dataset's content_sha256");
                }
            }
            // A probe is a short training run: Ctrl-C ends it at a step boundary, and its
            // scratch folder is removed.
            let _signals = (*probe_steps > 0).then(crate::train::interrupt::install);
            let trace_only = config.is_none()
                && trace.is_some()
                && overrides.is_empty()
                && *probe_steps == 0
                && gt_overlays.is_none()
                && expect_fingerprint.is_none();
            let report = if let (true, Some(t)) = (trace_only, trace) {
                crate::doctor::diagnose_trace(t)?
            } else {
                crate::doctor::diagnose(&crate::doctor::DoctorOptions {
                    config: config.clone().unwrap_or_else(|| PathBuf::from("configs/demo.yaml")),
                    trace: trace.clone(),
                    overrides: overrides.clone(),
                    expect_fingerprint: expect_fingerprint.clone(),
                    probe_steps: *probe_steps,
                    device_memory_gb: *device_memory_gb,
                    host_memory_gb: *host_memory_gb,
                    cache_dir: if cli.no_cache {
                        None
                    } else {
                        cli.cache_dir.clone().or_else(Runtime::default_cache_dir)
                    },
                    gt_overlays: gt_overlays.clone(),
                    gt_overlay_images: *gt_overlay_images,
                })?
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            if report.has_errors() {
                bail!(
                    "doctor found {} error(s)",
                    report.findings.iter().filter(|f| f.severity == crate::doctor::Severity::Error).count()
                );
            }
            Ok(())
        }
        Command::LrFind { config, overrides, start_lr, end_lr, steps, out, json } => {
            let range =
                crate::lr_find::LrRange::new(*start_lr, *end_lr, *steps).map_err(anyhow::Error::msg)?;
            let _signals = crate::train::interrupt::install();
            let r = crate::lr_find::run(&crate::lr_find::LrFindOptions {
                config: config.clone(),
                overrides: overrides.clone(),
                range,
                out: out.clone(),
                cache_dir: None,
            })?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", crate::lr_find::describe(&r, config));
            }
            Ok(())
        }
        Command::Evaluate { config, adapter, model, split, overrides, json, panels, panel_count } => {
            let r = crate::train::evaluate::evaluate(&crate::train::evaluate::EvaluateOptions {
                config: config.clone(),
                overrides: overrides.clone(),
                adapter: adapter.clone(),
                model: model.clone(),
                split: split.clone(),
                panels: panels.clone(),
                panel_count: *panel_count,
            })?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let what = match (&r.adapter, r.merged) {
                (Some(a), false) => format!("adapters {} with the model {}", a.display(), r.model.display()),
                (Some(a), true) => {
                    format!("adapters {} with the merged model {}", a.display(), r.model.display())
                }
                (None, true) => format!("the merged model {} (adapters in its weights)", r.model.display()),
                (None, false) => format!("the base model {} (no adapters)", r.model.display()),
            };
            println!(
                "{what} on {} ({} images{}):",
                r.annotation_file.display(),
                r.images,
                if r.images_left_out > 0 {
                    format!(", {} left out", r.images_left_out)
                } else {
                    String::new()
                }
            );
            println!("  loss {:.4}", r.loss);
            match r.metrics {
                Some(m) => println!(
                    "  mask mAP {:.4}  AP50 {:.4}  AP75 {:.4}  cgF1 {:.2}  (pmF1 {:.3}, IL_MCC {:.3}; {} image/prompt {}, {} with objects)",
                    m.map,
                    m.ap50,
                    m.ap75,
                    m.cgf1,
                    m.pmf1,
                    m.il_mcc,
                    m.queries,
                    if m.queries == 1 { "pair" } else { "pairs" },
                    m.positives
                ),
                None => println!("  no image/prompt pair could be scored (box-only objects, or a diverged model)"),
            }
            if r.per_prompt.len() > 1 {
                for (p, m) in &r.per_prompt {
                    println!(
                        "    {p:<24} mAP {:.4}  AP50 {:.4}  cgF1 {:>6.2}  ({} {}, {} with objects)",
                        m.map,
                        m.ap50,
                        m.cgf1,
                        m.queries,
                        if m.queries == 1 { "pair" } else { "pairs" },
                        m.positives
                    );
                }
            }
            for (p, n) in &r.negative_only {
                println!("    {p:<24} {n}");
            }
            if let Some(p) = r.pixel {
                println!(
                    "  pixels ({} image/prompt {} of the dataset's categories, predictions scoring >= {}, on the {}x{} mask grid):",
                    p.pairs,
                    if p.pairs == 1 { "pair" } else { "pairs" },
                    p.threshold,
                    r.mask_size,
                    r.mask_size
                );
                println!(
                    "    IoU {:.4} (micro {:.4})  precision {:.4}  recall {:.4}  F1 {:.4}  Dice {:.4}",
                    p.mean_iou, p.micro_iou, p.precision, p.recall, p.f1, p.dice
                );
                println!(
                    "    within ±{} px: precision {:.4}  recall {:.4}  F1 {:.4}  clDice {:.4}",
                    p.tolerance, p.relaxed_precision, p.relaxed_recall, p.relaxed_f1, p.cldice
                );
            }
            if let Some(dir) = panels {
                println!(
                    "  the {} image/prompt pairs whose detections overlap their ground truth least (pixel IoU, worst first): {}",
                    r.panels.len(),
                    dir.join("panels.json").display()
                );
                for p in r.panels.iter().take(5) {
                    println!("    IoU {:.3}  {}  {}", p.iou, p.prompt, p.image.display());
                }
            }
            Ok(())
        }
        Command::Tile { data_dir, out, size, overlap, empty_tiles, min_pixels, seed } => {
            let opts = crate::data::tiling::TileOptions {
                size: *size,
                overlap: *overlap,
                empty_fraction: *empty_tiles,
                min_pixels: *min_pixels,
                seed: *seed,
            };
            let splits = crate::data::tiling::tile_dataset(data_dir, out, &opts)
                .with_context(|| format!("tiling {}", data_dir.display()))?;
            for s in &splits {
                println!(
                    "{}: {} images -> {} tiles with objects, {} empty kept ({} dropped); {} objects -> {} annotations",
                    s.split,
                    s.images,
                    s.tiles_with_objects,
                    s.empty_tiles_kept,
                    s.empty_tiles_dropped,
                    s.objects,
                    s.annotations
                );
                for (file, e) in &s.failed {
                    println!("  left out {}: {e}", file.display());
                }
            }
            println!("tiles in {}: train with training.data_dir: {}", out.display(), out.display());
            Ok(())
        }
        Command::Import {
            from,
            images,
            masks,
            out,
            prompt,
            class,
            split,
            valid_share,
            test_share,
            instances,
            min_pixels,
            seed,
        } => {
            let classes = match prompt {
                Some(name) => vec![crate::data::masks::MaskClass {
                    value: crate::data::masks::MaskValue::Foreground,
                    name: name.clone(),
                }],
                None => class.clone(),
            };
            let opts = crate::data::masks::ImportOptions {
                images: images.clone().unwrap_or_default(),
                masks: masks.clone().unwrap_or_default(),
                out: out.clone(),
                classes,
                split: split.clone(),
                valid_share: *valid_share,
                test_share: *test_share,
                instances: *instances,
                min_pixels: *min_pixels,
                seed: *seed,
            };
            let labels = from.as_deref().and_then(crate::data::labels::detect);
            let s = match (from, labels) {
                (Some(dir), Some(format)) => {
                    if !opts.classes.is_empty() {
                        anyhow::bail!(
                            "{} is a {format} dataset, which names its classes itself: leave out --prompt and --class",
                            dir.display()
                        );
                    }
                    let lo = crate::data::labels::LabelImportOptions {
                        out: out.clone(),
                        split: split.clone(),
                        valid_share: *valid_share,
                        test_share: *test_share,
                        seed: *seed,
                    };
                    crate::data::labels::import_labels(dir, Some(format), &lo)
                        .with_context(|| format!("importing {}", dir.display()))?
                }
                (Some(dir), None) => crate::data::masks::import_dataset(dir, &opts)
                    .with_context(|| format!("importing {}", dir.display()))?,
                (None, _) => crate::data::masks::import_masks(&opts).with_context(|| {
                    format!("importing {} with masks {}", opts.images.display(), opts.masks.display())
                })?,
            };
            for sp in &s.splits {
                let dropped = if labels.is_none() {
                    format!(" ({} regions under --min-pixels {min_pixels} dropped)", sp.small_regions_dropped)
                } else {
                    String::new()
                };
                println!(
                    "{}: {} images ({} negatives), {} objects{dropped}",
                    sp.split, sp.images, sp.negatives, sp.objects
                );
            }
            for (file, why) in &s.left_out {
                println!("  left out {}: {why}", file.display());
            }
            if !s.unmatched_masks.is_empty() {
                let shown: Vec<String> =
                    s.unmatched_masks.iter().take(5).map(|p| p.display().to_string()).collect();
                println!(
                    "  {} mask(s) without an image: {}{}",
                    s.unmatched_masks.len(),
                    shown.join(", "),
                    if s.unmatched_masks.len() > 5 { ", ..." } else { "" }
                );
            }
            for note in &s.notes {
                println!("  note: {note}");
            }
            println!("dataset in {}: train with training.data_dir: {}", out.display(), out.display());
            Ok(())
        }
        Command::Export { config, adapter, merge, out, overwrite } => {
            crate::export::export(config, adapter, *merge, out, *overwrite)
        }
        Command::Bench {
            device,
            dtype,
            tiny,
            model_config,
            batch,
            steps,
            warmup,
            rank,
            vision_lora,
            ckpt,
            ckpt_mlp,
            estimate_only,
            json,
            profile,
            isolated,
        } => {
            for (flag, v) in [("--batch", batch), ("--steps", steps), ("--rank", rank)] {
                if *v == 0 {
                    bail!("{flag} 0: give a whole number >= 1");
                }
            }
            let opts = crate::bench::BenchOptions {
                device: *device,
                tiny: *tiny,
                model_config: model_config.clone(),
                batch: *batch,
                steps: *steps,
                warmup: *warmup,
                dtype: *dtype,
                rank: *rank,
                vision_lora: *vision_lora != 0,
                ckpt: *ckpt,
                ckpt_mlp: *ckpt_mlp,
                json: json.clone(),
                profile_steps: *profile,
                isolated_reps: *isolated,
            };
            if *estimate_only {
                println!("{}", serde_json::to_string(&crate::bench::estimate_only(&opts)?)?);
                return Ok(());
            }
            println!("{}", serde_json::to_string(&crate::bench::run(&opts)?)?);
            Ok(())
        }
        Command::Selftest { device, dtype } => {
            let dev = device.device()?;
            dtype.check(&dev)?;
            let checks = crate::selftest::run(&dev, dtype.dtype())?;
            for c in &checks {
                let grads: Vec<String> = c.grads.iter().map(|(k, e)| format!("d{k} {e:.1e}")).collect();
                println!(
                    "{} {:<48} forward {:.1e}  {}  (tolerance {:.0e})",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.forward,
                    grads.join("  "),
                    c.tolerance
                );
            }
            let failed = checks.iter().filter(|c| !c.ok).count();
            if failed > 0 {
                anyhow::bail!("{failed} of {} op checks are outside the tolerance", checks.len());
            }
            Ok(())
        }
        Command::Forward { model, inputs, out, device, dtype, semantics } => {
            let semantics = match semantics {
                SemanticsArg::Transformers => crate::sam3::model::Semantics::Transformers,
                SemanticsArg::Original => crate::sam3::model::Semantics::Original,
            };
            crate::inference::forward(model, inputs, out, *device, *dtype, semantics)
        }
        Command::Predict {
            model,
            adapter,
            image,
            prompts,
            boxes,
            out,
            tile,
            tile_overlap,
            threshold,
            nms_iou,
            device,
            dtype,
        } => {
            use crate::inference::{count_text, detection_line, Prediction};
            for (flag, v) in [("--threshold", threshold), ("--nms-iou", nms_iou)] {
                if !(0.0..=1.0).contains(v) {
                    bail!("{flag} {v}: give a number in [0, 1]");
                }
            }
            let images = crate::inference::expand_images(image)?;
            let several = images.len() > 1 || image.iter().any(|p| p.is_dir());
            if several && !boxes.is_empty() {
                bail!(
                    "--box is in one image's pixels: give it with a single --image (here {} images)",
                    images.len()
                );
            }
            let prompt_list = crate::inference::prompt_list(prompts, !boxes.is_empty())?;
            let model_dir = match (model, adapter) {
                (Some(m), _) => m.clone(),
                (None, Some(a)) => crate::inference::model_for_adapter(a)?,
                (None, None) => bail!("give --model DIR (or --adapter DIR from a run)"),
            };
            let mut opts = crate::inference::PredictOptions {
                model_dir,
                adapter: adapter.clone(),
                image: images[0].clone(),
                prompts: prompts.clone(),
                boxes: boxes.iter().map(|b| parse_box(b)).collect::<Result<_>>()?,
                out: out.clone(),
                threshold: *threshold,
                nms_iou: *nms_iou,
                device: *device,
                dtype: *dtype,
                tile: tile.map(|t| (t, *tile_overlap)),
            };
            let predictor = crate::inference::Predictor::load(&opts)?;
            // Each prompt's count (with the best score when nothing passed) and detections.
            let print = |p: &Prediction, indent: &str| {
                for r in &p.prompts {
                    if p.prompts.len() > 1 {
                        println!("{indent}{:?}: {}", r.prompt, count_text(r, *threshold, false));
                    }
                    for d in &r.detections {
                        println!("{indent}  {}", detection_line(d));
                    }
                }
            };
            if !several {
                let p = predictor.predict(&opts)?;
                match p.prompts.as_slice() {
                    [one] => println!(
                        "{}; wrote {}/detections.json, overlay.png and mask.png",
                        count_text(one, *threshold, true),
                        out.display()
                    ),
                    list => println!(
                        "{} prompts; wrote {}/detections.json (one entry per prompt), overlay.png and mask.png (prompt k as value k)",
                        list.len(),
                        out.display()
                    ),
                }
                print(&p, "");
                return Ok(());
            }
            // Several images: one folder each (OUT/<file name>/), and OUT/summary.json. An image
            // that fails is reported and the others go on.
            let dirs = crate::inference::image_out_dirs(&images, out);
            let mut summary = Vec::new();
            let mut failed = Vec::new();
            for (img, dir) in images.iter().zip(&dirs) {
                opts.image = img.clone();
                opts.out = dir.clone();
                match predictor.predict(&opts) {
                    Ok(p) => {
                        let total: usize = p.prompts.iter().map(|r| r.detections.len()).sum();
                        let best = p.prompts.iter().map(|r| r.best_score).fold(0.0f32, f32::max);
                        match p.prompts.as_slice() {
                            [one] => println!(
                                "{}: {} -> {}",
                                img.display(),
                                count_text(one, *threshold, false),
                                dir.display()
                            ),
                            _ => println!("{}: {total} detection(s) -> {}", img.display(), dir.display()),
                        }
                        print(&p, "");
                        // The best score of any query (the first detection's when there is one).
                        let mut entry = serde_json::json!({"image": path_json(img), "out": path_json(dir), "detections": total, "best_score": best});
                        if p.prompts.len() > 1 {
                            entry["prompts"] = p
                                .prompts
                                .iter()
                                .map(|r| serde_json::json!({"prompt": r.prompt, "detections": r.detections.len(), "best_score": r.best_score}))
                                .collect();
                        }
                        summary.push(entry);
                    }
                    Err(e) => {
                        tracing::error!("{}: {e:#}", img.display());
                        summary.push(serde_json::json!({"image": path_json(img), "error": format!("{e:#}")}));
                        failed.push(img.display().to_string());
                    }
                }
            }
            std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
            let mut doc = serde_json::json!({"model": model.as_deref().map(path_json), "adapter": adapter.as_deref().map(path_json), "threshold": threshold, "images": summary});
            match prompt_list.as_slice() {
                [one] => doc["prompt"] = serde_json::json!(one),
                list => doc["prompts"] = serde_json::json!(list),
            }
            crate::fsutil::write_atomic(
                &out.join("summary.json"),
                serde_json::to_string_pretty(&doc)?.as_bytes(),
            )?;
            println!("wrote {}/summary.json ({} images)", out.display(), images.len());
            if !failed.is_empty() {
                bail!(
                    "{} of {} images could not be segmented: {}",
                    failed.len(),
                    images.len(),
                    failed.join(", ")
                );
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::Check { file, config, json }) => {
            ensure_file(file)?;
            let spec = config.specs(std::slice::from_ref(file))?.remove(0);
            let run = plugin::RunInfo::sample();
            let p = match plugin::check(runtime(&cli)?, &spec, &run) {
                Ok(p) => p,
                Err(e) if *json => {
                    let v = serde_json::json!({"ok": false, "file": file, "error": e.to_string()});
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            let m = p.manifest();
            let c = p.compile_info();
            if *json {
                let v = serde_json::json!({
                    "ok": true,
                    "file": file,
                    "contract": plugin::CONTRACT,
                    "name": m.name,
                    "version": m.version,
                    "description": m.description,
                    "hooks": m.hooks.iter().map(|h| h.wit_name()).collect::<Vec<_>>(),
                    "size_bytes": c.size,
                    "sha256": c.sha256,
                    "compile_ms": c.elapsed.as_secs_f64() * 1e3,
                    "cached": c.cached,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}: ok, implements {}", file.display(), plugin::CONTRACT);
                println!("  name         {}", m.name);
                println!("  version      {}", m.version);
                println!("  description  {}", m.description);
                println!("  hooks        {}", hook_list(m));
                println!(
                    "  init         ok with its config and a sample run ({} steps, warmup {}, {} from {:e}, batch {} x {}, {} images)",
                    run.total_steps,
                    run.warmup_steps,
                    run.scheduler,
                    run.base_lr,
                    run.batch_size,
                    run.accumulation,
                    run.dataset_size
                );
                println!("  size         {:.1} KiB (sha256 {})", c.size as f64 / 1024.0, &c.sha256[..16]);
                println!(
                    "  compile      {:.1} ms{}",
                    c.elapsed.as_secs_f64() * 1e3,
                    if c.cached { " (from cache)" } else { "" }
                );
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::Replay { files, trace, config, json, no_stop }) => {
            for f in files {
                ensure_file(f)?;
            }
            let trace_data = Trace::read(trace)?;
            let run = replay::run_info_for(&trace_data);
            let specs = config.specs(files)?;
            let mut set = PluginSet::load(runtime(&cli)?, &specs, &run)?;
            let steps = replay::replay(&mut set, &trace_data, &run, !*no_stop);
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for s in &steps {
                if *json {
                    writeln!(out, "{}", serde_json::to_string(s)?)?;
                } else {
                    writeln!(out, "{}", replay::render_text(s))?;
                }
            }
            let failures = replay::failure_count(&steps);
            if !*json {
                let flagged = steps.iter().filter(|s| s.action != "continue").count();
                writeln!(
                    out,
                    "{} steps replayed through {}; {} with an action other than continue{}",
                    steps.len(),
                    set.plugins().iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
                    flagged,
                    if failures > 0 {
                        format!("; {failures} plugin failure(s), marked !")
                    } else {
                        String::new()
                    }
                )?;
            }
            drop(out);
            // A plugin that fails on a recorded run would fail in training: not a pass.
            if failures > 0 {
                bail!("{failures} plugin failure(s) during the replay (see the steps marked !)");
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::New { name, dir, sdk, vendor_sdk }) => {
            use crate::scaffold::SdkSource;
            let source = match (sdk, vendor_sdk) {
                (Some(p), _) => SdkSource::Path(p.clone()),
                (None, true) => SdkSource::Vendored,
                (None, false) => SdkSource::Default,
            };
            let path = crate::scaffold::new_plugin(name, dir, source)?;
            println!("created {}", path.display());
            println!("build it:  cd {} && cargo build --release --target wasm32-wasip2", path.display());
            println!(
                "check it:  lorahost plugin check {}/target/wasm32-wasip2/release/{name}.wasm",
                path.display()
            );
            Ok(())
        }
    }
}

/// Every command-line argument is UTF-8; else the first that is not, named (its undecodable
/// bytes shown as �) with the fix. lorahost records paths in JSON and YAML, which hold text.
pub fn check_utf8_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<()> {
    for (i, a) in args.into_iter().enumerate().skip(1) {
        if a.to_str().is_none() {
            bail!(
                "argument {i} ({:?}) is not valid UTF-8: lorahost records paths in JSON and YAML (run.json, config.yaml), which hold text; rename the file or folder to a UTF-8 name",
                a.to_string_lossy()
            );
        }
    }
    Ok(())
}

/// Set up logging to stderr (`LORAHOST_LOG` filter, default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal (and not with NO_COLOR): redirected logs stay plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    /// An argument that is not UTF-8 is named (by position, its bytes shown lossily) with the
    /// fix; UTF-8 arguments, non-ASCII ones included, pass.
    #[cfg(unix)]
    #[test]
    fn non_utf8_arguments_are_named() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let ok = ["lorahost", "train", "--config", "données/ç.yaml"].map(OsString::from);
        super::check_utf8_args(ok).unwrap();
        let bad = vec![
            OsString::from("lorahost"),
            OsString::from("train"),
            OsString::from("--config"),
            OsString::from_vec(b"cfg_\xff.yaml".to_vec()),
        ];
        let e = super::check_utf8_args(bad).unwrap_err().to_string();
        assert!(e.contains("argument 3") && e.contains("cfg_\u{fffd}.yaml") && e.contains("rename"), "{e}");
    }
}
