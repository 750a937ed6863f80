//! Validation metrics for text-prompted instance segmentation: COCO mask mAP and SAM3's cgF1.
//!
//! The unit of evaluation is one **datapoint** ([`EvalQuery`]): an image together with one text
//! prompt, its ground-truth instance masks (possibly none: a *negative* prompt) and the model's
//! scored predictions. [`evaluate`] computes both metric families from the same mask IoUs, which
//! are computed once per datapoint on bit-packed masks (64 pixels per `u64`, popcount).
//!
//! # COCO mask mAP (`map`, `ap50`, `ap75`)
//!
//! What pycocotools' `COCOeval(iouType="segm")` reports as `stats[0..3]` (area range "all",
//! `maxDets=100`), with every distinct prompt string as a category and every datapoint as one
//! (image, category) cell:
//! - per datapoint, predictions are sorted by descending score (stable, ties keep input order) and
//!   cut to the best [`MAX_DETS`];
//! - at each IoU threshold `0.50:0.05:0.95` (numpy `linspace` values), each prediction in turn is
//!   greedily matched to the unmatched ground truth of highest IoU ≥ the threshold (on an IoU tie
//!   the later ground truth wins, as in pycocotools);
//! - per category the datapoints' predictions are merged (datapoints in ascending `image_id`
//!   order, then a stable sort by descending score), precision is made monotone and sampled at the
//!   101 recall thresholds `0:0.01:1` (`searchsorted(side="left")`, 0 past the reached recall),
//!   with pycocotools' `tp / (tp + fp + ε)`, `ε = f64::EPSILON` (`np.spacing(1)`);
//! - categories without any ground truth are skipped (COCO's `-1`), the rest are averaged with
//!   equal weight; `ap50`/`ap75` use the thresholds 0.5/0.75 only. When no category has a ground
//!   truth all three are `-1.0` (COCO's convention for an empty mean).
//!
//! Crowd regions and area ranges do not exist here. An empty mask has IoU 0 with everything
//! (pycocotools' bounding-box pre-check gives 0 too).
//!
//! # cgF1 (`cgf1`, `pmf1`, `il_mcc`)
//!
//! The SAM 3 paper's "classification-gated F1", as `CGF1Eval` in facebookresearch/sam3
//! `sam3/eval/cgf1_eval.py` computes it (`evaluateImg`, `accumulate`, `summarize`):
//! - predictions with `score >= 0.5` ([`CGF1_SCORE_THRESHOLD`]) are kept, the rest dropped;
//! - image level, per datapoint: IL_TP (has ground truth, keeps a prediction), IL_FN (has ground
//!   truth, keeps none), IL_FP (no ground truth, keeps one), IL_TN (neither);
//!   `il_mcc = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`;
//! - instance level, per datapoint with ground truth and kept predictions: a one-to-one matching
//!   maximizing the summed IoU (`linear_sum_assignment(-ious)`, here
//!   [`crate::matcher::linear_sum_assignment`]); at each IoU threshold `t` in `0.50:0.05:0.95`,
//!   `TP_t` = matched pairs with IoU ≥ `t`, `FP_t` = kept − `TP_t`, `FN_t` = ground truths −
//!   `TP_t`. A datapoint with ground truth but no kept prediction adds `FN_t` = ground truths.
//!   Negatives add nothing: their false positives only enter IL_MCC ("positive micro" F1);
//! - `pmF1_t = 2·TP_t / (2·TP_t + FP_t + FN_t)` with the counts summed over datapoints (micro);
//! - `cgF1 = mean_t(pmF1_t · IL_MCC)`; `pmf1` is `mean_t(pmF1_t)`, so `cgf1 = 100 · pmf1 · il_mcc`.
//!
//! Scales: `pmf1` ∈ [0, 1], `il_mcc` ∈ [−1, 1], and `cgf1` ∈ [−100, 100], i.e. the reference
//! value × 100 as the paper reports it.
//!
//! Conventions and deviations from the reference code:
//! - The reference smooths every ratio: `+1e-4` in the precision, recall and F1 denominators and
//!   `+1e-6` in the MCC denominator. Here the ratios are exact, so perfect predictions give
//!   `pmf1 = 1` and `cgf1 = 100` where the reference reports slightly less (≈0.9999 for a handful
//!   of matches); otherwise the two differ by a few 1e-4 at most. Where the reference's denominator
//!   is 0 its numerator is 0 too, so its value is 0, and so is the value here: `pmf1 = 0` when
//!   nothing matches or there is no positive datapoint, and `il_mcc = 0` whenever one of the four
//!   marginals is empty. In particular a set **without negative prompts** (or in which every
//!   datapoint keeps a prediction) has `il_mcc = 0` and hence `cgf1 = 0`, whatever the masks.
//! - `CGF1Evaluator`'s multi-annotation "oracle" (best of several ground-truth sets per datapoint)
//!   and its `is_instance_exhaustive` filter do not apply: every datapoint given is evaluated
//!   against its single ground-truth set.
//! - When several matchings share the optimal summed IoU the solver may pick another one than
//!   scipy, which can change the per-threshold counts (only) in such ties.
//!
//! Inputs are validated, nothing panics: mask lengths must equal `height × width`, scores must not
//! be NaN, and an (`image_id`, `prompt`) pair may appear once ([`EvalError`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

use crate::matcher::linear_sum_assignment;

/// Predictions kept per datapoint for mAP, by descending score (COCOeval's `maxDets=100`).
pub const MAX_DETS: usize = 100;

/// Predictions scoring at least this count for cgF1 (the reference's `threshold=0.5`, `>=`).
pub const CGF1_SCORE_THRESHOLD: f32 = 0.5;

/// Number of IoU thresholds, `0.50:0.05:0.95`.
const NUM_IOU_THRS: usize = 10;
/// Number of recall thresholds, `0:0.01:1`.
const NUM_REC_THRS: usize = 101;
/// Index of IoU 0.50 in [`iou_thresholds`].
const IOU_50: usize = 0;
/// Index of IoU 0.75 in [`iou_thresholds`].
const IOU_75: usize = 5;

/// One (image, prompt) datapoint for evaluation; masks are row-major `height × width` booleans.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalQuery {
    /// Image identifier; together with `prompt` it must be unique within one evaluation.
    pub image_id: u64,
    /// The text prompt (noun phrase); each distinct prompt is one COCO category for mAP.
    pub prompt: String,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Ground-truth instance masks (empty for a negative prompt), each `height × width` long.
    pub gt_masks: Vec<Vec<bool>>,
    /// The model's predictions for this prompt on this image, in any order.
    pub predictions: Vec<Prediction>,
}

/// One predicted instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Confidence; higher ranks first for mAP, `>= 0.5` counts for cgF1. Must not be NaN.
    pub score: f32,
    /// Binary mask, row-major, `height × width` long.
    pub mask: Vec<bool>,
}

/// Metrics over a set of datapoints (see the module documentation for the exact definitions).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalSummary {
    /// COCO mask mAP@[.50:.95], in [0, 1]; `-1` when no datapoint has ground truth.
    pub map: f64,
    /// COCO mask AP at IoU 0.50, in [0, 1]; `-1` when no datapoint has ground truth.
    pub ap50: f64,
    /// COCO mask AP at IoU 0.75, in [0, 1]; `-1` when no datapoint has ground truth.
    pub ap75: f64,
    /// cgF1 = 100 · `pmf1` · `il_mcc`, on the paper's 0–100 scale (negative when `il_mcc` is).
    pub cgf1: f64,
    /// Positive micro-F1 averaged over IoU 0.50:0.95, in [0, 1].
    pub pmf1: f64,
    /// Image-level Matthews correlation coefficient, in [−1, 1]; 0 when undefined.
    pub il_mcc: f64,
    /// Number of datapoints evaluated.
    pub queries: usize,
    /// Datapoints with at least one ground-truth mask.
    pub positives: usize,
}

/// Why a set of datapoints cannot be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// `height × width` does not fit in `usize`.
    #[error("image {image_id} / prompt {prompt:?}: {height}×{width} pixels overflow")]
    ImageTooLarge {
        /// Image of the datapoint.
        image_id: u64,
        /// Prompt of the datapoint.
        prompt: String,
        /// Declared height.
        height: usize,
        /// Declared width.
        width: usize,
    },
    /// A ground-truth mask is not `height × width` long.
    #[error("image {image_id} / prompt {prompt:?}: ground-truth mask {index} has {len} pixels, expected {expected}")]
    GtMaskLength {
        /// Image of the datapoint.
        image_id: u64,
        /// Prompt of the datapoint.
        prompt: String,
        /// Index into `gt_masks`.
        index: usize,
        /// Length of the mask.
        len: usize,
        /// `height × width`.
        expected: usize,
    },
    /// A predicted mask is not `height × width` long.
    #[error(
        "image {image_id} / prompt {prompt:?}: prediction {index} has {len} pixels, expected {expected}"
    )]
    PredictionMaskLength {
        /// Image of the datapoint.
        image_id: u64,
        /// Prompt of the datapoint.
        prompt: String,
        /// Index into `predictions`.
        index: usize,
        /// Length of the mask.
        len: usize,
        /// `height × width`.
        expected: usize,
    },
    /// A prediction's score is NaN (it cannot be ranked).
    #[error("image {image_id} / prompt {prompt:?}: prediction {index} has a NaN score")]
    NanScore {
        /// Image of the datapoint.
        image_id: u64,
        /// Prompt of the datapoint.
        prompt: String,
        /// Index into `predictions`.
        index: usize,
    },
    /// The same (image, prompt) pair was given twice.
    #[error("image {image_id} / prompt {prompt:?} appears more than once")]
    DuplicateQuery {
        /// Image of the datapoint.
        image_id: u64,
        /// Prompt of the datapoint.
        prompt: String,
    },
}

/// Computes COCO mask mAP/AP50/AP75 and cgF1/pmF1/IL_MCC over `queries`.
///
/// An empty slice gives `map = ap50 = ap75 = -1` and `cgf1 = pmf1 = il_mcc = 0`.
///
/// # Errors
/// [`EvalError`] when a mask length differs from `height × width`, a score is NaN, or an
/// (`image_id`, `prompt`) pair repeats.
pub fn evaluate(queries: &[EvalQuery]) -> Result<EvalSummary, EvalError> {
    let mut seen = HashSet::with_capacity(queries.len());
    let mut ious = Vec::with_capacity(queries.len());
    for q in queries {
        if !seen.insert((q.image_id, q.prompt.as_str())) {
            return Err(EvalError::DuplicateQuery { image_id: q.image_id, prompt: q.prompt.clone() });
        }
        ious.push(query_ious(q)?);
    }
    let (map, ap50, ap75) = coco_map(queries, &ious);
    let (cgf1, pmf1, il_mcc) = cgf1(queries, &ious);
    Ok(EvalSummary {
        map,
        ap50,
        ap75,
        cgf1,
        pmf1,
        il_mcc,
        queries: queries.len(),
        positives: queries.iter().filter(|q| !q.gt_masks.is_empty()).count(),
    })
}

/// A prompt without ground truth in any of its datapoints (a *negative-only* prompt, such as a
/// generic negative word): it has no AP (COCO's `-1`), only false positives to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NegativeOnly {
    /// Datapoints (images) the prompt was asked on.
    pub queries: usize,
    /// Of them, those with a prediction scoring at least [`CGF1_SCORE_THRESHOLD`] (cgF1's IL_FP).
    pub images_with_false_positives: usize,
    /// Predictions scoring at least [`CGF1_SCORE_THRESHOLD`], over all its datapoints.
    pub false_positives: usize,
}

impl std::fmt::Display for NegativeOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "negative-only: {} false positives at score >= {CGF1_SCORE_THRESHOLD} on {} of {} images",
            self.false_positives, self.images_with_false_positives, self.queries
        )
    }
}

/// Per-prompt results ([`evaluate_per_prompt`]): metrics for the prompts with ground truth, and
/// false-positive counts for the negative-only ones, each by prompt.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PerPrompt {
    /// Prompts with ground truth in at least one datapoint: [`evaluate`] on their datapoints.
    pub scored: BTreeMap<String, EvalSummary>,
    /// Prompts without any ground truth: no mAP row (it would be `-1`), their false positives.
    pub negative_only: BTreeMap<String, NegativeOnly>,
}

/// [`evaluate`] per prompt (each prompt's datapoints on their own), with the prompts that have
/// no ground truth in any datapoint (generic negatives, or a category absent from the whole
/// split) counted apart as [`NegativeOnly`] instead of giving mAP rows of `-1`. The summary over
/// all datapoints is [`evaluate`] on all of them, unaffected by this split.
///
/// # Errors
/// As [`evaluate`], for any prompt's datapoints.
pub fn evaluate_per_prompt(queries: &[EvalQuery]) -> Result<PerPrompt, EvalError> {
    let mut by_prompt: BTreeMap<&str, Vec<EvalQuery>> = BTreeMap::new();
    for q in queries {
        by_prompt.entry(q.prompt.as_str()).or_default().push(q.clone());
    }
    let mut out = PerPrompt::default();
    for (prompt, qs) in by_prompt {
        // Validates the datapoints of negative-only prompts too.
        let summary = evaluate(&qs)?;
        if summary.positives > 0 {
            out.scored.insert(prompt.to_string(), summary);
            continue;
        }
        let fired = |q: &EvalQuery| q.predictions.iter().filter(|p| p.score >= CGF1_SCORE_THRESHOLD).count();
        out.negative_only.insert(
            prompt.to_string(),
            NegativeOnly {
                queries: qs.len(),
                images_with_false_positives: qs.iter().filter(|q| fired(q) > 0).count(),
                false_positives: qs.iter().map(fired).sum(),
            },
        );
    }
    Ok(out)
}

/// `np.linspace(0.5, 0.95, 10)` bit for bit: `i · step + start`, the last one exactly `stop`.
fn iou_thresholds() -> [f64; NUM_IOU_THRS] {
    linspace(0.5, 0.95)
}

/// `np.linspace(0.0, 1.0, 101)` bit for bit.
fn recall_thresholds() -> [f64; NUM_REC_THRS] {
    linspace(0.0, 1.0)
}

fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut v = [0.0; N];
    for (i, x) in v.iter_mut().enumerate() {
        *x = i as f64 * step + start;
    }
    v[N - 1] = stop;
    v
}

/// A mask packed 64 pixels per word, with its pixel count.
struct Bits {
    words: Vec<u64>,
    area: u64,
}

impl Bits {
    fn pack(mask: &[bool]) -> Self {
        let words: Vec<u64> = mask
            .chunks(64)
            .map(|chunk| chunk.iter().enumerate().fold(0u64, |w, (i, &b)| w | (u64::from(b) << i)))
            .collect();
        let area = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Self { words, area }
    }

    /// Intersection over union; 0 when both masks are empty.
    fn iou(&self, other: &Self) -> f64 {
        let inter: u64 =
            self.words.iter().zip(&other.words).map(|(a, b)| u64::from((a & b).count_ones())).sum();
        let union = self.area + other.area - inter;
        if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        }
    }
}

/// Validates one datapoint and returns its prediction × ground-truth IoUs (row-major, predictions
/// in input order).
fn query_ious(q: &EvalQuery) -> Result<Vec<f64>, EvalError> {
    let expected = q.height.checked_mul(q.width).ok_or_else(|| EvalError::ImageTooLarge {
        image_id: q.image_id,
        prompt: q.prompt.clone(),
        height: q.height,
        width: q.width,
    })?;
    for (index, m) in q.gt_masks.iter().enumerate() {
        if m.len() != expected {
            return Err(EvalError::GtMaskLength {
                image_id: q.image_id,
                prompt: q.prompt.clone(),
                index,
                len: m.len(),
                expected,
            });
        }
    }
    for (index, p) in q.predictions.iter().enumerate() {
        if p.mask.len() != expected {
            return Err(EvalError::PredictionMaskLength {
                image_id: q.image_id,
                prompt: q.prompt.clone(),
                index,
                len: p.mask.len(),
                expected,
            });
        }
        if p.score.is_nan() {
            return Err(EvalError::NanScore { image_id: q.image_id, prompt: q.prompt.clone(), index });
        }
    }
    let gts: Vec<Bits> = q.gt_masks.iter().map(|m| Bits::pack(m)).collect();
    let mut ious = Vec::with_capacity(q.predictions.len() * gts.len());
    for p in &q.predictions {
        let bits = Bits::pack(&p.mask);
        ious.extend(gts.iter().map(|g| bits.iou(g)));
    }
    Ok(ious)
}

/// Descending order of scores (NaN is rejected beforehand; ±0 compare equal as in numpy).
fn by_score_desc(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

/// COCO mask (mAP, AP50, AP75), each `-1` when no category has ground truth.
fn coco_map(queries: &[EvalQuery], ious: &[Vec<f64>]) -> (f64, f64, f64) {
    let thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    let mut categories: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, q) in queries.iter().enumerate() {
        categories.entry(q.prompt.as_str()).or_default().push(i);
    }
    let (mut sum_all, mut sum_50, mut sum_75) = (0.0, 0.0, 0.0);
    let mut evaluated = 0usize;
    for (_, mut members) in categories {
        // pycocotools visits the images of a category in ascending id order (stable sort; ids are
        // unique within a category).
        members.sort_by_key(|&i| queries[i].image_id);
        let mut num_gt = 0usize;
        let mut scores: Vec<f64> = Vec::new();
        let mut matched: Vec<[bool; NUM_IOU_THRS]> = Vec::new();
        for &qi in &members {
            let q = &queries[qi];
            let n_gt = q.gt_masks.len();
            num_gt += n_gt;
            let mut order: Vec<usize> = (0..q.predictions.len()).collect();
            order.sort_by(|&a, &b| {
                by_score_desc(q.predictions[a].score.into(), q.predictions[b].score.into())
            });
            order.truncate(MAX_DETS);
            let mut det_matched = vec![[false; NUM_IOU_THRS]; order.len()];
            for (t, &thr) in thrs.iter().enumerate() {
                let mut gt_taken = vec![false; n_gt];
                for (k, &d) in order.iter().enumerate() {
                    let row = &ious[qi][d * n_gt..(d + 1) * n_gt];
                    let mut best = thr.min(1.0 - 1e-10);
                    let mut hit = None;
                    for (g, &iou) in row.iter().enumerate() {
                        if gt_taken[g] || iou < best {
                            continue;
                        }
                        best = iou;
                        hit = Some(g);
                    }
                    if let Some(g) = hit {
                        gt_taken[g] = true;
                        det_matched[k][t] = true;
                    }
                }
            }
            scores.extend(order.iter().map(|&d| f64::from(q.predictions[d].score)));
            matched.extend(det_matched);
        }
        if num_gt == 0 {
            continue;
        }
        evaluated += 1;
        let mut ranking: Vec<usize> = (0..scores.len()).collect();
        ranking.sort_by(|&a, &b| by_score_desc(scores[a], scores[b]));
        let ap: [f64; NUM_IOU_THRS] = std::array::from_fn(|t| {
            average_precision(ranking.iter().map(|&i| matched[i][t]), num_gt, &rec_thrs)
        });
        sum_all += ap.iter().sum::<f64>();
        sum_50 += ap[IOU_50];
        sum_75 += ap[IOU_75];
    }
    if evaluated == 0 {
        return (-1.0, -1.0, -1.0);
    }
    let n = evaluated as f64;
    (sum_all / (n * NUM_IOU_THRS as f64), sum_50 / n, sum_75 / n)
}

/// 101-point interpolated AP of a ranked list of match flags against `num_gt > 0` ground truths
/// (pycocotools `accumulate`).
fn average_precision(
    ranked_matches: impl Iterator<Item = bool>,
    num_gt: usize,
    rec_thrs: &[f64; NUM_REC_THRS],
) -> f64 {
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut recall = Vec::new();
    let mut precision = Vec::new();
    for m in ranked_matches {
        if m {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        recall.push(tp / num_gt as f64);
        precision.push(tp / (tp + fp + f64::EPSILON));
    }
    for i in (1..precision.len()).rev() {
        if precision[i] > precision[i - 1] {
            precision[i - 1] = precision[i];
        }
    }
    let mut sum = 0.0;
    for &r in rec_thrs {
        // np.searchsorted(recall, r, side="left"); past the end the remaining points stay 0.
        let i = recall.partition_point(|&x| x < r);
        match precision.get(i) {
            Some(&p) => sum += p,
            None => break,
        }
    }
    sum / NUM_REC_THRS as f64
}

/// (cgF1 × 100, pmF1, IL_MCC) as `CGF1Eval` computes them, without its smoothing epsilons.
fn cgf1(queries: &[EvalQuery], ious: &[Vec<f64>]) -> (f64, f64, f64) {
    let thrs = iou_thresholds();
    let mut tp = [0u64; NUM_IOU_THRS];
    let mut fp = [0u64; NUM_IOU_THRS];
    let mut fn_ = [0u64; NUM_IOU_THRS];
    let (mut il_tp, mut il_fp, mut il_tn, mut il_fn) = (0u64, 0u64, 0u64, 0u64);
    for (q, q_ious) in queries.iter().zip(ious) {
        let n_gt = q.gt_masks.len();
        let kept: Vec<usize> =
            (0..q.predictions.len()).filter(|&d| q.predictions[d].score >= CGF1_SCORE_THRESHOLD).collect();
        match (n_gt > 0, !kept.is_empty()) {
            (false, false) => il_tn += 1,
            (false, true) => il_fp += 1,
            (true, false) => {
                il_fn += 1;
                for f in &mut fn_ {
                    *f += n_gt as u64;
                }
            }
            (true, true) => {
                il_tp += 1;
                let mut cost = Vec::with_capacity(kept.len() * n_gt);
                for &d in &kept {
                    cost.extend(q_ious[d * n_gt..(d + 1) * n_gt].iter().map(|&iou| -iou));
                }
                let pairs = linear_sum_assignment(&cost, kept.len(), n_gt);
                let match_ious: Vec<f64> = pairs.iter().map(|&(d, g)| q_ious[kept[d] * n_gt + g]).collect();
                for (t, &thr) in thrs.iter().enumerate() {
                    let hits = match_ious.iter().filter(|&&iou| iou >= thr).count();
                    tp[t] += hits as u64;
                    fp[t] += (kept.len() - hits) as u64;
                    fn_[t] += (n_gt - hits) as u64;
                }
            }
        }
    }
    // pmF1_t = 2·TP / (2·TP + FP + FN), 0 when nothing was counted at all.
    let f1_sum: f64 = (0..NUM_IOU_THRS)
        .map(|t| match 2 * tp[t] + fp[t] + fn_[t] {
            0 => 0.0,
            denom => 2.0 * tp[t] as f64 / denom as f64,
        })
        .sum();
    let pmf1 = f1_sum / NUM_IOU_THRS as f64;
    let (tp_, fp_, tn_, fn_il) = (il_tp as f64, il_fp as f64, il_tn as f64, il_fn as f64);
    let denom = ((tp_ + fp_) * (tp_ + fn_il) * (tn_ + fp_) * (tn_ + fn_il)).sqrt();
    let il_mcc = if denom > 0.0 { (tp_ * tn_ - fp_ * fn_il) / denom } else { 0.0 };
    (100.0 * pmf1 * il_mcc, pmf1, il_mcc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-12;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// A 1-row mask of `width` pixels set on `[a, b)`.
    fn span(width: usize, a: usize, b: usize) -> Vec<bool> {
        (0..width).map(|x| x >= a && x < b).collect()
    }

    fn pred(score: f32, mask: Vec<bool>) -> Prediction {
        Prediction { score, mask }
    }

    fn query(
        image_id: u64,
        prompt: &str,
        width: usize,
        gts: Vec<Vec<bool>>,
        preds: Vec<Prediction>,
    ) -> EvalQuery {
        EvalQuery { image_id, prompt: prompt.into(), height: 1, width, gt_masks: gts, predictions: preds }
    }

    /// Tiny deterministic generator (xorshift64*), mirrored by the Python snippet below.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            (self.next() >> 33) % n
        }
    }

    #[test]
    fn thresholds_match_numpy_linspace() {
        // repr(list(np.linspace(.5, .95, 10))) with numpy 2.4.6, as pycocotools builds them.
        let want = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.8999999999999999, 0.95];
        assert_eq!(iou_thresholds(), want);
        assert_eq!(iou_thresholds()[IOU_75], 0.75);
        let r = recall_thresholds();
        assert_eq!((r[0], r[29], r[50], r[57], r[100]), (0.0, 0.29, 0.5, 0.5700000000000001, 1.0));
    }

    #[test]
    fn packed_iou_matches_naive_count() {
        let mut rng = Rng(99);
        for len in [0usize, 1, 63, 64, 65, 130, 333] {
            for _ in 0..20 {
                let a: Vec<bool> = (0..len).map(|_| rng.below(3) == 0).collect();
                let b: Vec<bool> = (0..len).map(|_| rng.below(2) == 0).collect();
                let inter = a.iter().zip(&b).filter(|(x, y)| **x && **y).count();
                let union = a.iter().zip(&b).filter(|(x, y)| **x || **y).count();
                let want = if union == 0 { 0.0 } else { inter as f64 / union as f64 };
                assert_eq!(Bits::pack(&a).iou(&Bits::pack(&b)), want, "len {len}");
                assert_eq!(Bits::pack(&a).area, a.iter().filter(|x| **x).count() as u64);
            }
        }
    }

    #[test]
    fn perfect_predictions_score_one() {
        let w = 40;
        let queries = vec![
            query(
                1,
                "cat",
                w,
                vec![span(w, 0, 10), span(w, 20, 25)],
                vec![pred(0.9, span(w, 20, 25)), pred(0.8, span(w, 0, 10))],
            ),
            query(2, "cat", w, vec![span(w, 3, 30)], vec![pred(0.7, span(w, 3, 30))]),
            query(
                2,
                "dog",
                w,
                vec![span(w, 0, 1), span(w, 1, 2), span(w, 39, 40)],
                vec![pred(0.6, span(w, 1, 2)), pred(0.95, span(w, 39, 40)), pred(0.55, span(w, 0, 1))],
            ),
            // Negatives: nothing predicted, or only below the cgF1 threshold (ranked last for mAP,
            // after every true positive, so AP stays 1).
            query(3, "cat", w, vec![], vec![]),
            query(3, "dog", w, vec![], vec![pred(0.2, span(w, 5, 9))]),
        ];
        let s = evaluate(&queries).unwrap();
        // pycocotools: 1.0 / 1.0 / 1.0. The reference cgF1 code, smoothed, reports cgF1
        // 0.9999331694554948, pmF1 0.9999333361110232, IL_MCC 0.9999998333333611.
        assert!(close(s.map, 1.0, EPS) && close(s.ap50, 1.0, EPS) && close(s.ap75, 1.0, EPS), "{s:?}");
        assert_eq!((s.pmf1, s.il_mcc, s.cgf1), (1.0, 1.0, 100.0));
        assert_eq!((s.queries, s.positives), (5, 3));
    }

    #[test]
    fn no_predictions_on_positives_score_zero() {
        let w = 10;
        let queries = vec![
            query(1, "cat", w, vec![span(w, 0, 5)], vec![]),
            query(2, "cat", w, vec![span(w, 2, 4), span(w, 6, 9)], vec![]),
            query(3, "cat", w, vec![], vec![]),
        ];
        let s = evaluate(&queries).unwrap();
        assert_eq!((s.map, s.ap50, s.ap75), (0.0, 0.0, 0.0));
        // IL: TP = FP = 0, so MCC's denominator is 0 -> 0 (the reference gives 0/1e-6 = 0).
        assert_eq!((s.pmf1, s.il_mcc, s.cgf1), (0.0, 0.0, 0.0));

        // Predictions that are right but all score below 0.5: mAP sees them, cgF1 does not.
        let mut low = queries.clone();
        low[0].predictions.push(pred(0.49, span(w, 0, 5)));
        let s = evaluate(&low).unwrap();
        assert!(s.map > 0.0);
        assert_eq!((s.pmf1, s.il_mcc, s.cgf1), (0.0, 0.0, 0.0));
    }

    /// Two ground truths A = [0,10) and B = [10,18) on a 30-pixel row, three predictions:
    /// p1 = A exactly (IoU 1 with A), p2 = [20,30) (IoU 0 with both: a false positive),
    /// p3 = [10,15) (IoU 5/8 = 0.625 with B).
    fn ap_case(fp_score: f32) -> Vec<EvalQuery> {
        let w = 30;
        vec![query(
            7,
            "cat",
            w,
            vec![span(w, 0, 10), span(w, 10, 18)],
            vec![pred(0.9, span(w, 0, 10)), pred(fp_score, span(w, 20, 30)), pred(0.7, span(w, 10, 15))],
        )]
    }

    #[test]
    fn hand_computed_ap() {
        // Ranked p1 (0.9), p2 (0.8), p3 (0.7).
        // IoU thresholds 0.50, 0.55, 0.60 (p3 matches B): TP, FP, TP.
        //   recall 0.5, 0.5, 1; precision 1, 1/2, 2/3 -> monotone envelope 1, 2/3, 2/3.
        //   Recall points 0.00..=0.50 (51) find recall 0.5 at rank 1 -> 1; 0.51..=1.00 (50) find
        //   recall 1 at rank 3 -> 2/3. AP = (51 + 50·2/3) / 101 = 253/303.
        // Thresholds 0.65..0.95 (7, p3 unmatched): TP, FP, FP. recall 0.5, 0.5, 0.5: the 51 points
        //   up to 0.5 get 1, the rest 0. AP = 51/101.
        // mAP = (3·253/303 + 7·51/101) / 10 = (3·(51 + 100/3) + 7·51) / 1010 = 610/1010.
        // (pycocotools: 0.6039603960396038 / 0.834983498349835 / 0.5049504950495048.)
        let s = evaluate(&ap_case(0.8)).unwrap();
        assert!(close(s.map, 610.0 / 1010.0, EPS), "{s:?}");
        assert!(close(s.ap50, 253.0 / 303.0, EPS), "{s:?}");
        assert!(close(s.ap75, 51.0 / 101.0, EPS), "{s:?}");

        // cgF1 on the same datapoint: all three kept; the optimal matching is p1-A (1.0),
        // p3-B (0.625). Thresholds <= 0.6: TP 2, FP 1, FN 0 -> F1 4/5; the 7 others: TP 1, FP 2,
        // FN 1 -> F1 2/5. pmF1 = (3·0.8 + 7·0.4) / 10 = 0.52. No negatives: IL_MCC = 0 -> cgF1 0.
        assert!(close(s.pmf1, 0.52, EPS), "{s:?}");
        assert_eq!((s.il_mcc, s.cgf1), (0.0, 0.0));
    }

    #[test]
    fn high_scoring_false_positive_lowers_ap() {
        // Same as `hand_computed_ap` with the false positive ranked last (0.6 < 0.7):
        // thresholds <= 0.6: TP, TP, FP -> precision 1 up to recall 1: AP 1.
        // 0.65..0.95: TP, FP, FP -> 51/101 as before. mAP = (3·101 + 7·51) / 1010 = 660/1010.
        let low = evaluate(&ap_case(0.6)).unwrap();
        assert!(close(low.map, 660.0 / 1010.0, EPS), "{low:?}");
        assert!(close(low.ap50, 1.0, EPS), "{low:?}");
        let high = evaluate(&ap_case(0.8)).unwrap();
        assert!(high.map < low.map && high.ap50 < low.ap50, "{high:?} vs {low:?}");
        // cgF1 keeps every prediction >= 0.5 regardless of order: same pmF1.
        assert_eq!(high.pmf1, low.pmf1);
    }

    #[test]
    fn hand_computed_cgf1_with_negatives() {
        let w = 30;
        let mut queries = ap_case(0.8); // IL TP; TP/FP/FN 2/1/0 (3 thresholds), 1/2/1 (7)
        queries.extend([
            // IL FN: the right mask but scored below 0.5. FN 1 at every threshold.
            query(8, "cat", w, vec![span(w, 0, 4)], vec![pred(0.3, span(w, 0, 4))]),
            // IL FP: a negative with a kept prediction; its FP does not enter pmF1.
            query(9, "cat", w, vec![], vec![pred(0.6, span(w, 0, 4))]),
            // IL TN: a negative whose prediction is dropped, and one with none.
            query(10, "cat", w, vec![], vec![pred(0.4, span(w, 0, 4))]),
            query(11, "cat", w, vec![], vec![]),
            // IL TP: perfect, with a score of exactly 0.5 (kept: `>=`). TP 1 everywhere.
            query(12, "cat", w, vec![span(w, 5, 9)], vec![pred(0.5, span(w, 5, 9))]),
        ]);
        let s = evaluate(&queries).unwrap();
        // IL: TP 2, FN 1, FP 1, TN 2 -> MCC = (2·2 − 1·1) / sqrt(3·3·3·3) = 3/9.
        assert!(close(s.il_mcc, 1.0 / 3.0, EPS), "{s:?}");
        // Thresholds <= 0.6: TP 2+1 = 3, FP 1, FN 0+1 = 1 -> 6/8 = 0.75.
        // Thresholds >= 0.65: TP 1+1 = 2, FP 2, FN 1+1 = 2 -> 4/8 = 0.5.
        // pmF1 = (3·0.75 + 7·0.5) / 10 = 0.575 (counting the negative's FP would give 0.5625).
        assert!(close(s.pmf1, 0.575, EPS), "{s:?}");
        assert!(close(s.cgf1, 100.0 * 0.575 / 3.0, 1e-9), "{s:?}");
        assert_eq!((s.queries, s.positives), (6, 3));
        // The reference (sam3/eval/cgf1_eval.py, with its 1e-4/1e-6 smoothing) reports
        // cgF1 0.19164518865911077, pmF1 0.574935629859062, IL_MCC 0.33333329629630043.
        assert!(close(s.cgf1, 19.164518865911077, 0.01), "{s:?}");
        assert!(close(s.pmf1, 0.574935629859062, 1e-4), "{s:?}");
    }

    #[test]
    fn greedy_tie_goes_to_later_ground_truth() {
        // G1 = [0,4), G2 = [4,8); d1 = [0,8) has IoU 0.5 with both, d2 = G2 exactly.
        // At IoU 0.5 pycocotools gives d1 the *later* tied ground truth G2, leaving d2 a false
        // positive: TP, FP -> AP50 = 51/101. At 0.55..0.95 d1 matches nothing and d2 takes G2:
        // FP, TP -> precision 1/2 up to recall 1/2 -> AP = 25.5/101.
        // mAP = (51 + 9·25.5) / 1010.
        let w = 8;
        let queries = vec![query(
            1,
            "x",
            w,
            vec![span(w, 0, 4), span(w, 4, 8)],
            vec![pred(0.9, span(w, 0, 8)), pred(0.8, span(w, 4, 8))],
        )];
        let s = evaluate(&queries).unwrap();
        assert!(close(s.ap50, 51.0 / 101.0, EPS), "{s:?}");
        assert!(close(s.ap75, 25.5 / 101.0, EPS), "{s:?}");
        assert!(close(s.map, (51.0 + 9.0 * 25.5) / 1010.0, EPS), "{s:?}");
        // The optimal one-to-one matching pairs d1-G1 (0.5) and d2-G2 (1.0): at 0.5 both match
        // (F1 1), above only d2 (TP 1, FP 1, FN 1 -> F1 1/2). pmF1 = (1 + 9·0.5) / 10.
        assert!(close(s.pmf1, 0.55, EPS), "{s:?}");
    }

    #[test]
    fn only_the_best_hundred_predictions_count_for_map() {
        // One ground truth (pixel 0); false positives (pixel 1) at 0.9 and the true positive at 0.1.
        let w = 2;
        let case = |n_fp: usize| {
            let mut preds: Vec<Prediction> = (0..n_fp).map(|_| pred(0.9, span(w, 1, 2))).collect();
            preds.push(pred(0.1, span(w, 0, 1)));
            vec![query(1, "x", w, vec![span(w, 0, 1)], preds)]
        };
        // 99 FPs: the TP is the 100th detection -> precision 1/100 at recall 1, at every recall point.
        let s = evaluate(&case(99)).unwrap();
        assert!(close(s.map, 0.01, EPS), "{s:?}");
        // 100 FPs: the TP is cut off.
        let s = evaluate(&case(100)).unwrap();
        assert_eq!(s.map, 0.0);
    }

    #[test]
    fn categories_without_ground_truth_are_skipped() {
        let w = 10;
        let perfect = query(1, "cat", w, vec![span(w, 0, 5)], vec![pred(0.9, span(w, 0, 5))]);
        let stray = query(1, "dog", w, vec![], vec![pred(0.9, span(w, 0, 5))]);
        let s = evaluate(&[perfect.clone(), stray.clone()]).unwrap();
        assert!(close(s.map, 1.0, EPS), "{s:?}");
        let s = evaluate(&[stray]).unwrap();
        assert_eq!((s.map, s.ap50, s.ap75), (-1.0, -1.0, -1.0));
        let s = evaluate(&[]).unwrap();
        assert_eq!(
            s,
            EvalSummary {
                map: -1.0,
                ap50: -1.0,
                ap75: -1.0,
                cgf1: 0.0,
                pmf1: 0.0,
                il_mcc: 0.0,
                queries: 0,
                positives: 0
            }
        );
    }

    /// Per prompt, a prompt without ground truth anywhere gets no mAP row of -1 but its false
    /// positives; prompts with ground truth somewhere (negative on some images) keep their
    /// metrics, equal to `evaluate` on their datapoints; the overall summary is untouched.
    #[test]
    fn negative_only_prompts_are_counted_apart() {
        let w = 10;
        let qs = vec![
            query(1, "cat", w, vec![span(w, 0, 5)], vec![pred(0.9, span(w, 0, 5))]),
            query(2, "cat", w, vec![], vec![pred(0.7, span(w, 0, 3))]),
            query(1, "teapot", w, vec![], vec![pred(0.9, span(w, 0, 5)), pred(0.6, span(w, 5, 10))]),
            query(2, "teapot", w, vec![], vec![pred(0.3, span(w, 0, 5))]),
            query(3, "teapot", w, vec![], vec![]),
        ];
        let all = evaluate(&qs).unwrap();
        let per = evaluate_per_prompt(&qs).unwrap();
        assert_eq!(per.scored.keys().collect::<Vec<_>>(), vec!["cat"]);
        assert_eq!(per.scored["cat"], evaluate(&qs[..2]).unwrap());
        assert!(per.scored.values().all(|s| s.map >= 0.0 && s.ap50 >= 0.0));
        let t = per.negative_only["teapot"];
        assert_eq!(t, NegativeOnly { queries: 3, images_with_false_positives: 1, false_positives: 2 });
        assert_eq!(t.to_string(), "negative-only: 2 false positives at score >= 0.5 on 1 of 3 images");
        // The summary over everything still holds the teapot datapoints (cgF1's IL_FP / IL_TN;
        // mAP skips them).
        assert!(close(all.map, 1.0, EPS), "{all:?}");
        assert_eq!((all.queries, all.positives), (5, 1));
        // Errors of any prompt's datapoints are reported.
        let mut bad = qs.clone();
        bad[3].predictions[0].score = f32::NAN;
        assert!(matches!(evaluate_per_prompt(&bad), Err(EvalError::NanScore { .. })));
        assert_eq!(evaluate_per_prompt(&[]).unwrap(), PerPrompt::default());
    }

    #[test]
    fn bad_input_is_an_error() {
        let w = 10;
        let good = query(1, "cat", w, vec![span(w, 0, 5)], vec![pred(0.9, span(w, 0, 5))]);
        let mut q = good.clone();
        q.gt_masks[0].pop();
        assert!(matches!(
            evaluate(&[q]),
            Err(EvalError::GtMaskLength { index: 0, len: 9, expected: 10, .. })
        ));
        let mut q = good.clone();
        q.predictions.push(pred(0.5, vec![true; 11]));
        assert!(matches!(evaluate(&[q]), Err(EvalError::PredictionMaskLength { index: 1, len: 11, .. })));
        let mut q = good.clone();
        q.predictions[0].score = f32::NAN;
        assert!(matches!(evaluate(&[q]), Err(EvalError::NanScore { index: 0, .. })));
        assert!(matches!(evaluate(&[good.clone(), good.clone()]), Err(EvalError::DuplicateQuery { .. })));
        let mut q = good;
        q.height = usize::MAX;
        q.width = 2;
        assert!(matches!(evaluate(&[q]), Err(EvalError::ImageTooLarge { .. })));
    }

    /// Random rectangles on a 13×21 image; the same generator as the Python snippet in
    /// `matches_pycocotools_and_reference_cgf1`.
    fn random_case(seed: u64) -> Vec<EvalQuery> {
        const H: usize = 13;
        const W: usize = 21;
        let rect = |x0: i64, y0: i64, w: i64, h: i64| -> Vec<bool> {
            let mut m = vec![false; H * W];
            for y in y0.max(0)..(y0 + h).min(H as i64) {
                for x in x0.max(0)..(x0 + w).min(W as i64) {
                    m[y as usize * W + x as usize] = true;
                }
            }
            m
        };
        let mut r = Rng(seed);
        let mut queries = Vec::new();
        for img in 0..8u64 {
            let image_id = 1000 - 7 * img;
            for prompt in ["cat", "dog", "tree"] {
                let n_gt = r.below(5) / 2;
                let mut boxes = Vec::new();
                for _ in 0..n_gt {
                    let x0 = r.below(W as u64 - 2) as i64;
                    let y0 = r.below(H as u64 - 2) as i64;
                    let w = 2 + r.below(8) as i64;
                    let h = 2 + r.below(6) as i64;
                    boxes.push((x0, y0, w, h));
                }
                let mut preds = Vec::new();
                for &(x0, y0, w, h) in &boxes {
                    if r.below(5) != 0 {
                        let jx = x0 + r.below(3) as i64 - 1;
                        let jy = y0 + r.below(3) as i64 - 1;
                        let jw = w + r.below(3) as i64 - 1;
                        let jh = h + r.below(3) as i64 - 1;
                        let score = r.below(32) as f32 / 32.0;
                        preds.push(pred(score, rect(jx, jy, jw, jh)));
                    }
                }
                for _ in 0..r.below(3) {
                    let x0 = r.below(W as u64 - 2) as i64;
                    let y0 = r.below(H as u64 - 2) as i64;
                    let w = 1 + r.below(8.min(W as u64 - x0 as u64)) as i64;
                    let h = 1 + r.below(8.min(H as u64 - y0 as u64)) as i64;
                    let score = r.below(32) as f32 / 32.0;
                    preds.push(pred(score, rect(x0, y0, w, h)));
                }
                queries.push(EvalQuery {
                    image_id,
                    prompt: prompt.into(),
                    height: H,
                    width: W,
                    gt_masks: boxes.iter().map(|&(x0, y0, w, h)| rect(x0, y0, w, h)).collect(),
                    predictions: preds,
                });
            }
        }
        queries
    }

    /// Cross-check against pycocotools 2.0 (`COCOeval(iouType="segm")`, each prompt a category)
    /// and against facebookresearch/sam3 `sam3/eval/cgf1_eval.py` (`CGF1Eval`, each datapoint an
    /// "image", run as is with a brute-force stand-in for scipy's `linear_sum_assignment`).
    /// Snippet (the generator mirrors `random_case`; scores are k/32 so many tie):
    ///
    /// ```text
    /// M = (1 << 64) - 1
    /// class Rng:
    ///     def __init__(self, s): self.s = s
    ///     def next(self):
    ///         x = self.s; x ^= x >> 12; x ^= (x << 25) & M; x ^= x >> 27; self.s = x
    ///         return (x * 0x2545F4914F6CDD1D) & M
    ///     def below(self, n): return (self.next() >> 33) % n
    /// # gen(seed): for img in range(8), image_id = 1000 - 7*img, for p in cat/dog/tree: as in
    /// # random_case. Masks -> pycocotools.mask.encode(np.asfortranarray(uint8)).
    /// # mAP: COCO() with images (id, 13, 21), categories per prompt, annotations with area and
    /// #   iscrowd=0; loadRes(results with score); COCOeval(gt, dt, "segm").evaluate/accumulate/
    /// #   summarize -> stats[0:3].
    /// # cgF1: one image per datapoint, category 1; e = cgf1_eval.CGF1Eval(gt, dt, "segm");
    /// #   _, ev = cgf1_eval._evaluate(e); e.evalImgs = list(ev.flatten()); e.accumulate();
    /// #   100*mean(e.eval["cgF1"]), mean(e.eval["positive_micro_F1"]), e.eval["IL_MCC"].
    /// ```
    #[test]
    fn matches_pycocotools_and_reference_cgf1() {
        let queries = random_case(7);
        assert_eq!(queries.len(), 24);
        assert_eq!(queries.iter().filter(|q| !q.gt_masks.is_empty()).count(), 19);
        assert_eq!(queries.iter().map(|q| q.predictions.len()).sum::<usize>(), 48);
        let s = evaluate(&queries).unwrap();
        // pycocotools: stats[0], stats[1], stats[2].
        assert!(close(s.map, 0.07183702306882273, 1e-12), "{s:?}");
        assert!(close(s.ap50, 0.1884045418116472, 1e-12), "{s:?}");
        assert!(close(s.ap75, 0.05954345434543454, 1e-12), "{s:?}");
        // Reference cgF1 (smoothed by 1e-4 / 1e-6, so compared with a matching tolerance).
        assert!(close(s.cgf1, 7.324178459352562, 0.01), "{s:?}");
        assert!(close(s.pmf1, 0.18362292884661033, 5e-4), "{s:?}");
        assert!(close(s.il_mcc, 0.3988705825224486, 1e-5), "{s:?}");
    }
}
