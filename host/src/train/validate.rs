//! Validation: the training loss over the same terms (all decoder layers, one-to-many branch;
//! no dropout, fixed negatives, no flip, so the number is comparable between evaluations and
//! with the training loss), plus COCO mask mAP and cgF1 on (image, prompt) datapoints.
//!
//! For the metrics, each query's predictions are scored as SAM3 does (sigmoid(logit) ×
//! sigmoid(presence)), the top 100 kept, and masks binarised at logit 0; they are compared with
//! the ground truth at the mask resolution of the model (the training targets' resolution).
//! Image/prompt pairs with a box-only object (no usable mask) are left out of the metrics; the
//! loss skips only those objects' mask terms.

use super::{batch_loss, build_samples};
use crate::data::batch::{collate, Batch, Sample, SampleOptions};
use crate::data::coco::Split;
use crate::data::SplitMix64;
use crate::evaluation::{evaluate, EvalQuery, EvalSummary, Prediction};
use crate::loss::{LossOutput, LossWeights};
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
    /// The same metrics per prompt (category), when computed: COCO's per-category AP.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub per_prompt: BTreeMap<String, EvalSummary>,
    /// Prompts without ground truth anywhere in the split (generic negatives): no mAP row,
    /// their false positives.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub negative_only: BTreeMap<String, crate::evaluation::NegativeOnly>,
    /// Pixel metrics (strict, ±[`crate::pixel_metrics::TOLERANCE`] px relaxed, clDice) over the image/prompt
    /// pairs of the dataset's categories, when computed: what thin structures are judged by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pixel: Option<crate::pixel_metrics::PixelMetrics>,
    /// Pictures of image/prompt pairs with objects as [`ValidationSet::panels`] chooses them:
    /// the ground truth beside the detections ([`crate::data::overlay::prediction_panel`]).
    #[serde(skip)]
    pub panels: Vec<Panel>,
}

/// Which validation pairs get a picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Panels {
    /// None.
    #[default]
    None,
    /// The first N image/prompt pairs with objects (the same pairs at every validation, so a
    /// run's pictures line up).
    First(usize),
    /// The N pairs whose detections (score ≥ 0.5) overlap their ground truth least (pixel IoU
    /// of the unions at the mask resolution), worst first: where to look for what goes wrong.
    Worst(usize),
}

/// One validation picture.
#[derive(Debug, Clone)]
pub struct Panel {
    /// COCO image id.
    pub image_id: u64,
    /// The prompt.
    pub prompt: String,
    /// Pixel IoU of the detections' union (score ≥ 0.5) with the ground truth's.
    pub iou: f64,
    /// Ground truth (left) beside the detections (right).
    pub picture: image::RgbImage,
}

impl Panel {
    /// `<image id>_<prompt>`.
    pub fn name(&self) -> String {
        format!("{}_{}", self.image_id, self.prompt)
    }
}

/// Pixel IoU of the union of `preds` scoring `threshold` or more with the union of the valid
/// ground-truth masks of `q` (both `m`×`m`); 1 when both are empty.
fn pair_iou(q: &crate::data::batch::QueryTarget, preds: &[Prediction], m: usize, threshold: f32) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for p in 0..m * m {
        let truth = q
            .mask_valid
            .iter()
            .enumerate()
            .any(|(g, v)| *v && q.masks.get(g * m * m + p).copied().unwrap_or(false));
        let found = preds.iter().any(|d| d.score >= threshold && d.mask.get(p).copied().unwrap_or(false));
        inter += usize::from(truth && found);
        union += usize::from(truth || found);
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Side of each half of a validation panel, in pixels.
pub const PANEL_SIDE: u32 = 288;

/// Detections drawn on a panel and counted in its IoU: score (σ(logit)·σ(presence)) at least this.
pub const PANEL_THRESHOLD: f32 = 0.5;

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

/// What validation runs over, and how its samples are built.
pub struct ValidationSet<'a> {
    /// The split.
    pub split: &'a Split,
    /// Usable image indices of the split.
    pub ids: &'a [usize],
    /// The model's tokenizer.
    pub tokenizer: &'a PromptTokenizer,
    /// Square model input size.
    pub image_size: usize,
    /// Target mask size (the model's mask resolution).
    pub mask_size: usize,
    /// Hard negatives per image.
    pub negatives: usize,
    /// The run's seed (fixes the negatives).
    pub seed: u64,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Which pairs get a picture.
    pub panels: Panels,
}

impl ValidationSet<'_> {
    fn options(&self, i: usize) -> SampleOptions {
        // Fixed per image: the same negatives at every evaluation; never augmented.
        SampleOptions::plain(
            self.image_size,
            self.mask_size,
            self.negatives,
            SplitMix64::from_parts(&[self.seed, 0x7A11D, self.split.images[i].id]).next_u64(),
        )
    }

    /// Forward every batch (eval mode) and hand its samples, batch, loss and outputs to `f`.
    /// A stop requested by Ctrl-C / SIGTERM ([`crate::train::interrupt`]) ends it between
    /// batches with [`Interrupted`].
    fn for_each_batch(
        &self,
        model: &Sam3Model,
        weights: &LossWeights,
        mut f: impl FnMut(&[Sample], &Batch, LossOutput, Sam3Outputs) -> Result<()>,
    ) -> Result<()> {
        for chunk in self.ids.chunks(self.batch_size.max(1)) {
            test_interrupt_hook();
            if crate::train::interrupt::requested() {
                return Err(Interrupted.into());
            }
            let opts: Vec<SampleOptions> = chunk.iter().map(|&i| self.options(i)).collect();
            let samples = build_samples(self.split, chunk, &opts, 1)?;
            let batch = collate(&samples, self.mask_size, model.device())?;
            let (loss, out) = batch_loss(model, &batch, self.tokenizer, weights, false, &[])?;
            f(&samples, &batch, loss, out)?;
        }
        Ok(())
    }
}

/// Tests: `LORAHOST_TEST_INTERRUPT_AT_VALIDATION_BATCH=N` acts as a Ctrl-C just before the
/// process's N-th validation batch (counted from 1 over all validations).
fn test_interrupt_hook() {
    static BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(at) =
        std::env::var("LORAHOST_TEST_INTERRUPT_AT_VALIDATION_BATCH").ok().and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if BATCHES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == at {
        crate::train::interrupt::request();
    }
}

/// A validation (or prediction pass) cut short by Ctrl-C / SIGTERM.
#[derive(Debug, thiserror::Error)]
#[error("validation interrupted (Ctrl-C / SIGTERM)")]
pub struct Interrupted;

/// Whether `e` is a validation cut short by Ctrl-C / SIGTERM.
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Interrupted>().is_some()
}

/// Run validation (see the module docs).
pub fn validate(
    model: &Sam3Model,
    set: &ValidationSet,
    weights: &LossWeights,
    with_metrics: bool,
) -> Result<ValidationResult> {
    let (mut loss, mut n) = (0.0, 0usize);
    let mut terms: BTreeMap<String, f64> = BTreeMap::new();
    let mut queries = Vec::new();
    let mut box_only = 0usize;
    let mut panels = Vec::new();
    let m = set.mask_size;
    set.for_each_batch(model, weights, |samples, batch, l, out| {
        loss += l.terms.get("total").copied().unwrap_or(f64::NAN);
        for (k, v) in l.terms {
            *terms.entry(k).or_default() += v;
        }
        n += 1;
        let want_panels = match set.panels {
            Panels::None => false,
            Panels::First(n) => panels.len() < n,
            Panels::Worst(n) => n > 0,
        };
        let preds = if with_metrics || want_panels { predictions(&out)? } else { Vec::new() };
        if want_panels {
            for (q, p) in batch.queries.iter().zip(&preds) {
                if q.negative || !q.mask_valid.contains(&true) {
                    continue;
                }
                let iou = pair_iou(q, p, m, PANEL_THRESHOLD);
                let keep = match set.panels {
                    Panels::None => false,
                    Panels::First(n) => panels.len() < n,
                    // Kept while among the n worst so far (the best of them gives way).
                    Panels::Worst(n) => panels.len() < n || panels.iter().any(|k: &Panel| k.iou > iou),
                };
                if !keep {
                    continue;
                }
                let sample = &samples[q.image_index];
                let picture = crate::data::overlay::prediction_panel(
                    sample,
                    &q.prompt,
                    p,
                    m,
                    PANEL_THRESHOLD,
                    PANEL_SIDE,
                );
                if let Panels::Worst(n) = set.panels {
                    if panels.len() >= n {
                        if let Some(best) =
                            (0..panels.len()).max_by(|&a, &b| panels[a].iou.total_cmp(&panels[b].iou))
                        {
                            panels.remove(best);
                        }
                    }
                }
                panels.push(Panel { image_id: sample.image_id, prompt: q.prompt.clone(), iou, picture });
            }
        }
        if with_metrics {
            for (q, p) in batch.queries.iter().zip(preds) {
                // A box-only object has no mask to score against: its query is left out of the
                // mask metrics rather than counted as a miss (or its detection as a false one).
                if q.mask_valid.contains(&false) {
                    box_only += 1;
                    continue;
                }
                queries.push(EvalQuery {
                    image_id: samples[q.image_index].image_id,
                    prompt: q.prompt.clone(),
                    height: m,
                    width: m,
                    gt_masks: q.masks.chunks(m * m).map(|c| c.to_vec()).collect(),
                    predictions: p,
                });
            }
        }
        Ok(())
    })?;
    let n = n.max(1) as f64;
    // A diverged model (non-finite loss, NaN scores) has no meaningful metrics: the loss says it.
    let diverged = !(loss / n).is_finite();
    if diverged && with_metrics {
        tracing::warn!("validation loss is not finite (the adapters diverged): metrics skipped");
    }
    if box_only > 0 {
        tracing::info!(
            "validation metrics: {box_only} image/prompt pairs with box-only objects (no usable mask) are left out of mAP and cgF1 ({} scored)",
            queries.len()
        );
    }
    let summary =
        if with_metrics && !diverged && !queries.is_empty() { Some(evaluate(&queries)?) } else { None };
    let per = if summary.is_some() {
        crate::evaluation::evaluate_per_prompt(&queries)?
    } else {
        Default::default()
    };
    // Pixel metrics over the dataset's own categories (present or absent from the image), as
    // a per-class binary segmentation: the generic-word negatives are left to cgF1.
    let pixel = if summary.is_some() {
        let categories: std::collections::BTreeSet<&str> =
            set.split.categories.iter().map(|c| c.prompt.as_str()).collect();
        let pairs: Vec<&EvalQuery> =
            queries.iter().filter(|q| categories.contains(q.prompt.as_str())).collect();
        crate::pixel_metrics::pixel_metrics(
            &pairs,
            crate::pixel_metrics::THRESHOLD,
            crate::pixel_metrics::TOLERANCE,
        )?
    } else {
        None
    };
    Ok(ValidationResult {
        loss: loss / n,
        terms: terms.into_iter().map(|(k, v)| (k, v / n)).collect(),
        summary,
        per_prompt: per.scored,
        negative_only: per.negative_only,
        pixel,
        panels: {
            if matches!(set.panels, Panels::Worst(_)) {
                panels.sort_by(|a, b| a.iou.total_cmp(&b.iou));
            }
            panels
        },
    })
}

/// Write the validation predictions as COCO results (`image_id`, `prompt`, `score`, RLE
/// `segmentation` at the mask resolution, `size`), score > 0.05 only, atomically.
pub fn write_predictions(model: &Sam3Model, set: &ValidationSet, path: &Path) -> Result<()> {
    let mut rows = Vec::new();
    let m = set.mask_size;
    set.for_each_batch(model, &LossWeights::default(), |samples, batch, _, out| {
        for (q, preds) in batch.queries.iter().zip(predictions(&out)?) {
            for p in preds.into_iter().filter(|p| p.score > 0.05) {
                rows.push(serde_json::json!({
                    "image_id": samples[q.image_index].image_id,
                    "prompt": q.prompt,
                    "score": p.score,
                    "segmentation": crate::sam3::postprocess::rle_encode(&p.mask, m, m),
                }));
            }
        }
        Ok(())
    })?;
    crate::fsutil::write_atomic(path, serde_json::to_string(&rows)?.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::QueryTarget;

    /// A pair's IoU: the union of the valid ground-truth masks against the union of the
    /// detections at or above the threshold (a box-only object's empty mask and a low-scoring
    /// detection count for nothing).
    #[test]
    fn pair_iou_counts_the_unions() {
        let m = 4;
        // Truth: cells 0..4 (first row) valid, plus a box-only object (all false, not valid).
        let mut masks = vec![false; 2 * m * m];
        masks[..4].iter_mut().for_each(|v| *v = true);
        let q = QueryTarget {
            image_index: 0,
            prompt: "crack".into(),
            negative: false,
            ann_ids: vec![1, 2],
            boxes: vec![[0.5; 4]; 2],
            masks,
            mask_valid: vec![true, false],
        };
        let cells = |c: &[usize]| (0..m * m).map(|i| c.contains(&i)).collect::<Vec<bool>>();
        // Detections: cells 2..6 (score 0.9), and 8..16 (score 0.2, ignored).
        let preds = [
            Prediction { score: 0.9, mask: cells(&[2, 3, 4, 5]) },
            Prediction { score: 0.2, mask: cells(&[8, 9, 10, 11, 12, 13, 14, 15]) },
        ];
        // Intersection {2, 3}, union {0..6}: 2 / 6.
        assert!((pair_iou(&q, &preds, m, 0.5) - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(pair_iou(&q, &[], m, 0.5), 0.0);
    }
}
