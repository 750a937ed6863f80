//! Validation: the training loss over the same terms (all decoder layers, one-to-many branch;
//! no dropout, fixed negatives, no flip, so the number is comparable between evaluations and
//! with the training loss), plus COCO mask mAP and cgF1 on (image, prompt) datapoints.
//!
//! For the metrics, each query's predictions are scored as SAM3 does (sigmoid(logit) ×
//! sigmoid(presence)), the top 100 kept, and masks binarised at logit 0; they are compared with
//! the ground truth at the mask resolution of the model (the training targets' resolution).

use super::{batch_loss, build_samples};
use crate::data::batch::{collate, SampleOptions};
use crate::data::coco::Split;
use crate::data::SplitMix64;
use crate::evaluation::{evaluate, EvalQuery, EvalSummary, Prediction};
use crate::loss::LossWeights;
use crate::sam3::model::{Sam3Model, Sam3Outputs};
use crate::sam3::tokenizer::PromptTokenizer;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Most predictions kept per datapoint (COCO's maxDets).
const MAX_DETS: usize = 100;

/// A validation pass.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ValidationResult {
    /// Mean total loss per batch.
    pub loss: f64,
    /// Mean per-term losses.
    pub terms: BTreeMap<String, f64>,
    /// mAP / cgF1, when computed.
    pub summary: Option<EvalSummary>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Per query: (score, mask) predictions, best first, at most [`MAX_DETS`].
fn predictions(out: &Sam3Outputs) -> Result<Vec<Vec<Prediction>>> {
    let (q, n) = out.pred_logits.dims2()?;
    let (_, _, h, w) = out.pred_masks.dims4()?;
    let logits = to_vec(&out.pred_logits)?;
    let presence = to_vec(&out.presence_logits)?;
    let masks = to_vec(&out.pred_masks)?;
    let mut all = Vec::with_capacity(q);
    for qi in 0..q {
        let p = sigmoid(presence.get(qi).copied().unwrap_or(0.0));
        let mut order: Vec<usize> = (0..n).collect();
        let score = |i: usize| sigmoid(logits[qi * n + i]) * p;
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        let preds = order
            .into_iter()
            .take(MAX_DETS)
            .map(|i| {
                let off = (qi * n + i) * h * w;
                Prediction {
                    score: score(i),
                    mask: masks[off..off + h * w].iter().map(|v| *v > 0.0).collect(),
                }
            })
            .collect();
        all.push(preds);
    }
    Ok(all)
}

fn options(
    split: &Split,
    i: usize,
    image_size: usize,
    mask_size: usize,
    negatives: usize,
    seed: u64,
) -> SampleOptions {
    SampleOptions {
        image_size,
        mask_size,
        num_negatives: negatives,
        // Fixed per image: the same negatives at every evaluation.
        seed: SplitMix64::from_parts(&[seed, 0x7A11D, split.images[i].id]).next_u64(),
        hflip: false,
        scale: 1.0,
    }
}

/// Run validation over `ids` of `split` (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn validate(
    model: &Sam3Model,
    split: &Split,
    ids: &[usize],
    tok: &PromptTokenizer,
    weights: &LossWeights,
    image_size: usize,
    mask_size: usize,
    negatives: usize,
    seed: u64,
    batch_size: usize,
    with_metrics: bool,
) -> Result<ValidationResult> {
    let device = model_device(model);
    let (mut loss, mut n) = (0.0, 0usize);
    let mut terms: BTreeMap<String, f64> = BTreeMap::new();
    let mut queries = Vec::new();
    for chunk in ids.chunks(batch_size.max(1)) {
        let opts: Vec<SampleOptions> =
            chunk.iter().map(|&i| options(split, i, image_size, mask_size, negatives, seed)).collect();
        let samples = build_samples(split, chunk, &opts, 1)?;
        let batch = collate(&samples, mask_size, &device)?;
        let (l, out) = batch_loss(model, &batch, tok, weights, false, &[])?;
        loss += l.terms.get("total").copied().unwrap_or(f64::NAN);
        for (k, v) in l.terms {
            *terms.entry(k).or_default() += v;
        }
        n += 1;
        if with_metrics {
            let preds = predictions(&out)?;
            for (q, p) in batch.queries.iter().zip(preds) {
                let mm = mask_size * mask_size;
                queries.push(EvalQuery {
                    image_id: samples[q.image_index].image_id,
                    prompt: q.prompt.clone(),
                    height: mask_size,
                    width: mask_size,
                    gt_masks: q.masks.chunks(mm).map(|c| c.to_vec()).collect(),
                    predictions: p,
                });
            }
        }
    }
    let n = n.max(1) as f64;
    let summary = if with_metrics { Some(evaluate(&queries)?) } else { None };
    Ok(ValidationResult {
        loss: loss / n,
        terms: terms.into_iter().map(|(k, v)| (k, v / n)).collect(),
        summary,
    })
}

fn model_device(model: &Sam3Model) -> Device {
    model.device().clone()
}

/// Write the validation predictions as COCO results (`image_id`, `prompt`, `score`, RLE
/// `segmentation` at the mask resolution, `size`), score > 0.05 only, atomically.
#[allow(clippy::too_many_arguments)]
pub fn write_predictions(
    model: &Sam3Model,
    split: &Split,
    ids: &[usize],
    tok: &PromptTokenizer,
    image_size: usize,
    mask_size: usize,
    negatives: usize,
    seed: u64,
    batch_size: usize,
    path: &Path,
) -> Result<()> {
    let device = model_device(model);
    let mut rows = Vec::new();
    for chunk in ids.chunks(batch_size.max(1)) {
        let opts: Vec<SampleOptions> =
            chunk.iter().map(|&i| options(split, i, image_size, mask_size, negatives, seed)).collect();
        let samples = build_samples(split, chunk, &opts, 1)?;
        let batch = collate(&samples, mask_size, &device)?;
        let (_, out) = batch_loss(model, &batch, tok, &LossWeights::default(), false, &[])?;
        for (q, preds) in batch.queries.iter().zip(predictions(&out)?) {
            for p in preds.into_iter().filter(|p| p.score > 0.05) {
                let rle = crate::sam3::postprocess::rle_encode(&p.mask, mask_size, mask_size);
                rows.push(serde_json::json!({
                    "image_id": samples[q.image_index].image_id,
                    "prompt": q.prompt,
                    "score": p.score,
                    "segmentation": rle,
                }));
            }
        }
    }
    crate::fsutil::write_atomic(path, serde_json::to_string(&rows)?.as_bytes())?;
    Ok(())
}
