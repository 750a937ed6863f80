//! lorahost: a training host that fine-tunes SAM3 with LoRA on candle and lets sandboxed
//! WebAssembly plugins steer training (metrics, gradients, LR, loss weights, sampling),
//! hot-reloaded while training runs.
//!
//! Modules:
//! - [`plugin`]: the wasmtime plugin runtime (contract in `wit/lorahost-plugin.wit`).
//! - [`metrics`]: the per-step metrics JSONL that training writes and replay reads.
//! - [`replay`]: feeding a recorded run through plugins.
//! - [`scaffold`]: `lorahost plugin new`.
//! - [`cli`]: the command line.
//! - [`fsutil`]: atomic file writes.
//! - [`data`]: COCO datasets, preflight, samples and the synthetic dataset.

pub mod alloc_stats;
pub mod bench;
pub mod cli;
pub mod console_log;
pub mod cuda_kernels;
pub mod data;
pub mod doctor;
pub mod evaluation;
pub mod export;
pub mod fsutil;
pub mod gpu;
pub mod imageio;
pub mod inference;
pub(crate) mod log_columns;
pub mod lora;
pub mod loss;
pub mod lr_find;
pub mod matcher;
pub mod memory;
pub mod metrics;
pub mod pixel_metrics;
pub mod plugin;
pub mod profile;
pub mod replay;
pub mod rng;
pub mod run_diagnosis;
pub mod sam3;
pub mod scaffold;
pub mod selftest;
pub mod tfevents;
pub mod train;
pub mod train_config;
