//! SAM3's image model (the detector) in candle, component by component as in the paper and
//! the reference code: vision (ViT), neck (FPN), text (CLIP), geometry (box/exemplar prompts),
//! encoder (fusion), decoder (DETR with presence token), scoring (dot product), mask head.
//! Module paths equal transformers' `Sam3Model` key names.

pub mod attention;
pub mod config;
pub mod conv_cuda;
pub mod copy_cuda;
pub mod decoder;
pub mod detr_block;
pub mod encoder;
pub mod flash_cuda;
pub mod frozen;
pub mod fused_cuda;
pub mod gemm_cuda;
pub mod geometry;
pub(crate) mod layer_op;
pub mod lowrank_cuda;
pub mod mask_head;
pub mod model;
pub mod neck;
pub mod nn;
pub mod norm_cuda;
pub mod ops;
pub mod position;
pub mod postprocess;
pub mod recompute;
pub mod scoring;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod visit;
pub mod vit_block;
pub mod weights;
