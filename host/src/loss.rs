//! SAM3 training loss on candle tensors (Meta's `sam3/train/loss/loss_fns.py` + `sam3_loss.py`,
//! architecture notes §5.3), differentiable with respect to the model outputs.
//!
//! Per branch (a decoder layer, one-to-one queries or the DAC one-to-many half):
//! - boxes: L1 on cxcywh and 1 − GIoU on xyxy, summed over matched pairs, divided by N (total GT
//!   boxes in the batch, ≥ 1);
//! - `IABCEMdetr` classification: matched queries get pos_weight·BCE(s, t) with the detached soft
//!   target t = max(0.01, p^α·IoU^(1−α)); unmatched ones BCE(s, 0)·p^γ; everything multiplied by
//!   keep_b (image b has ≥ 1 GT box) and divided by B·max(Q, pad_n_queries);
//! - presence (one-to-one branches only): mean over images of the sigmoid focal loss
//!   (α 0.5, γ 0 → 0.5·BCE) of the presence logit against keep_b;
//! - masks (final layer only, both halves, only for images whose [`Targets`] carry masks, and
//!   only for matched targets whose mask is valid; box-only objects are skipped):
//!   sigmoid focal (α 0.25, γ 2) averaged over pixels, and dice, summed over matched pairs and
//!   divided by N. Predicted mask logits are resized to the GT mask size with a differentiable
//!   bilinear resize (`align_corners=False`) built from two interpolation-matrix matmuls.
//!
//! Total = Σ_layers [Σ w·(one-to-one terms) + o2m_weight·Σ w·(one-to-many terms)], times √B when
//! [`LossWeights::scale_by_batch`] (Meta's `scale_by_find_batch_size`). BCE and focal use the
//! stable softplus form; all loss arithmetic runs in f32.

use crate::matcher::{cxcywh_to_xyxy, iou_giou, sigmoid, HungarianMatcher, OneToManyMatcher};
use crate::sam3::model::Sam3Outputs;
use candle_core::{bail, DType, Device, Result, Tensor};
use std::collections::BTreeMap;

/// Ground truth of one image (one image/phrase query).
#[derive(Debug, Clone)]
pub struct Targets {
    /// Normalized cxcywh boxes (G, 4); G may be 0 (a negative image).
    pub boxes: Tensor,
    /// Optional instance masks (G, h, w), f32 0/1. All images that carry masks must share (h, w).
    pub masks: Option<Tensor>,
    /// Per target: whether its mask is real (None: all are). A box-only object (COCO
    /// `segmentation: []`, or one that cannot be decoded) keeps its box and class losses but
    /// gets no mask or dice loss, as Meta's `is_valid_segment`.
    pub mask_valid: Option<Vec<bool>>,
}

impl Targets {
    /// Targets from a list of cxcywh boxes, without masks.
    pub fn from_boxes(boxes: &[[f32; 4]], device: &Device) -> Result<Self> {
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        Ok(Targets {
            boxes: Tensor::from_vec(flat, (boxes.len(), 4), device)?,
            masks: None,
            mask_valid: None,
        })
    }
}

/// Loss weights and loss/matcher hyper-parameters; [`Default`] gives Meta's SAM3 values.
#[derive(Debug, Clone, PartialEq)]
pub struct LossWeights {
    /// Weight of the L1 box loss (5).
    pub loss_bbox: f64,
    /// Weight of the GIoU loss (2).
    pub loss_giou: f64,
    /// Weight of the IABCE classification loss (20).
    pub loss_ce: f64,
    /// Weight of the presence loss (20).
    pub presence_loss: f64,
    /// Weight of the mask focal loss (200).
    pub loss_mask: f64,
    /// Weight of the mask dice loss (10).
    pub loss_dice: f64,
    /// Multiplier of the one-to-many (DAC) half's losses (2).
    pub o2m_weight: f64,
    /// IABCE weight of matched queries (10 in the roboflow recipe, 5 in odinw).
    pub pos_weight: f64,
    /// IABCE soft-target exponent α (0.25).
    pub iabce_alpha: f64,
    /// IABCE exponent γ of the p^γ factor on unmatched queries (2).
    pub iabce_gamma: f64,
    /// IABCE normalizer: sum / (B·max(Q, pad)) instead of the mean when Q < pad (Meta: 200).
    pub pad_n_queries: Option<usize>,
    /// Presence focal α (0.5).
    pub presence_alpha: f64,
    /// Presence focal γ (0).
    pub presence_gamma: f64,
    /// Mask focal α (0.25).
    pub mask_alpha: f64,
    /// Mask focal γ (2).
    pub mask_gamma: f64,
    /// Add the auxiliary (non-final) decoder layers' box/class/presence losses (true).
    pub aux: bool,
    /// Multiply the total by √B (Meta's `scale_by_find_batch_size: True`).
    pub scale_by_batch: bool,
    /// One-to-one matcher (also used for the one-to-many half of the aux layers).
    pub matcher: HungarianMatcher,
    /// One-to-many matcher for the final layer's DAC half.
    pub o2m_matcher: OneToManyMatcher,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            loss_bbox: 5.0,
            loss_giou: 2.0,
            loss_ce: 20.0,
            presence_loss: 20.0,
            loss_mask: 200.0,
            loss_dice: 10.0,
            o2m_weight: 2.0,
            pos_weight: 10.0,
            iabce_alpha: 0.25,
            iabce_gamma: 2.0,
            pad_n_queries: Some(200),
            presence_alpha: 0.5,
            presence_gamma: 0.0,
            mask_alpha: 0.25,
            mask_gamma: 2.0,
            aux: true,
            scale_by_batch: true,
            matcher: HungarianMatcher::default(),
            o2m_matcher: OneToManyMatcher::default(),
        }
    }
}

/// The matches of one branch.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchMatches {
    /// Decoder layer index (L − 1 = final).
    pub layer: usize,
    /// Whether this is the one-to-many half (query indices are relative to the half).
    pub o2m: bool,
    /// Per image, `(query, gt)` pairs.
    pub pairs: Vec<Vec<(usize, usize)>>,
}

/// Result of [`sam3_loss`].
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Weighted total (scalar, differentiable).
    pub total: Tensor,
    /// Unweighted terms (`loss_bbox`, `loss_giou_aux_0`, `loss_ce_o2m`, ...), the weights
    /// (`weight/loss_bbox`, ...), `num_boxes` and `total`, for logging.
    pub terms: BTreeMap<String, f64>,
    /// Matches of every branch.
    pub matches: Vec<BranchMatches>,
}

/// Stable `BCE(sigmoid(x), t)` elementwise: `max(x, 0) − x·t + ln(1 + e^{−|x|})`.
pub fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let log_term = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    (x.relu()? - (x * t)?)? + log_term
}

/// `(1 − p_t)^γ` style power that is safe at 0 and for γ = 0.
fn pow_gamma(x: &Tensor, gamma: f64) -> Result<Option<Tensor>> {
    if gamma == 0.0 {
        Ok(None)
    } else if gamma == 1.0 {
        Ok(Some(x.clone()))
    } else if gamma == 2.0 {
        Ok(Some(x.sqr()?))
    } else {
        Ok(Some(x.relu()?.powf(gamma)?))
    }
}

/// Elementwise sigmoid focal loss (torchvision/Meta `sigmoid_focal_loss`, unreduced):
/// `α_t·BCE(x, t)·(1 − p_t)^γ`; `alpha < 0` disables the α_t factor.
pub fn sigmoid_focal(x: &Tensor, t: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let mut loss = bce_with_logits(x, t)?;
    if gamma != 0.0 {
        let p = candle_nn::ops::sigmoid(x)?;
        // 1 − p_t = p + t − 2·p·t.
        let one_minus_pt = ((&p + t)? - ((&p * t)? * 2.0)?)?;
        if let Some(f) = pow_gamma(&one_minus_pt, gamma)? {
            loss = (loss * f)?;
        }
    }
    if alpha >= 0.0 {
        // α_t = α·t + (1 − α)·(1 − t) = (2α − 1)·t + (1 − α).
        let alpha_t = t.affine(2.0 * alpha - 1.0, 1.0 - alpha)?;
        loss = (loss * alpha_t)?;
    }
    Ok(loss)
}

/// `(out, in)` bilinear interpolation matrix, PyTorch `align_corners=False` (no antialias).
pub fn bilinear_matrix(out: usize, input: usize) -> Vec<f32> {
    let mut a = vec![0f32; out * input];
    for (d, (i0, i1, lambda)) in crate::sam3::postprocess::bilinear_taps(out, input).into_iter().enumerate() {
        a[d * input + i0] += (1.0 - lambda) as f32;
        a[d * input + i1] += lambda as f32;
    }
    a
}

/// Differentiable bilinear resize of `(..., H, W)` to `(..., h, w)` (`align_corners=False`), as
/// `A_h · X · A_wᵀ`.
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("resize_bilinear: need at least 2 dims, got {dims:?}");
    }
    let (ih, iw) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let a_h = Tensor::from_vec(bilinear_matrix(h, ih), (h, ih), x.device())?.to_dtype(x.dtype())?;
    let a_wt = Tensor::from_vec(bilinear_matrix(w, iw), (w, iw), x.device())?
        .to_dtype(x.dtype())?
        .t()?
        .contiguous()?;
    a_h.broadcast_matmul(x)?.broadcast_matmul(&a_wt)
}

/// cxcywh (M, 4) → the four xyxy columns, each (M, 1).
fn xyxy_columns(b: &Tensor) -> Result<[Tensor; 4]> {
    let cx = b.narrow(1, 0, 1)?;
    let cy = b.narrow(1, 1, 1)?;
    let hw = (b.narrow(1, 2, 1)? * 0.5)?;
    let hh = (b.narrow(1, 3, 1)? * 0.5)?;
    Ok([(&cx - &hw)?, (&cy - &hh)?, (&cx + &hw)?, (&cy + &hh)?])
}

/// Differentiable GIoU of paired cxcywh boxes (M, 4) → (M, 1). Union and enclosing areas are
/// clamped at 1e-7 so degenerate boxes give finite values.
pub fn paired_giou(pred: &Tensor, gt: &Tensor) -> Result<Tensor> {
    let [px0, py0, px1, py1] = xyxy_columns(pred)?;
    let [gx0, gy0, gx1, gy1] = xyxy_columns(gt)?;
    let area_p = ((&px1 - &px0)? * (&py1 - &py0)?)?;
    let area_g = ((&gx1 - &gx0)? * (&gy1 - &gy0)?)?;
    let iw = (px1.minimum(&gx1)? - px0.maximum(&gx0)?)?.relu()?;
    let ih = (py1.minimum(&gy1)? - py0.maximum(&gy0)?)?.relu()?;
    let inter = (iw * ih)?;
    let union = ((area_p + area_g)? - &inter)?.maximum(1e-7)?;
    let iou = (inter / &union)?;
    let ew = (px1.maximum(&gx1)? - px0.minimum(&gx0)?)?.relu()?;
    let eh = (py1.maximum(&gy1)? - py0.minimum(&gy0)?)?.relu()?;
    let enclosing = (ew * eh)?.maximum(1e-7)?;
    iou - ((&enclosing - union)? / enclosing)?
}

/// Model outputs of one branch, f32.
struct Branch {
    /// (B, Qh) logits.
    logits: Tensor,
    /// (B, Qh, 4) cxcywh.
    boxes: Tensor,
    /// (B, Qh, H, W) mask logits (final layer only).
    masks: Option<Tensor>,
    /// (B, 1) presence logits (one-to-one only).
    presence: Option<Tensor>,
    /// Detached CPU copy of `logits`, (B·Qh).
    cpu_logits: Vec<f32>,
    /// Detached CPU copy of `boxes`, (B·Qh·4).
    cpu_boxes: Vec<f32>,
}

/// Detached GT shared by all branches.
struct Gt {
    /// Per image, the flattened cxcywh boxes.
    boxes: Vec<Vec<f32>>,
    /// All GT boxes concatenated (Gtot, 4), f32.
    all_boxes: Tensor,
    /// Offset of each image's boxes in `all_boxes`.
    offsets: Vec<usize>,
    /// (B, 1) keep_b.
    keep: Tensor,
    /// N (≥ 1).
    num_boxes: f64,
}

fn idx_tensor(idx: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_vec(idx.to_vec(), idx.len(), device)
}

/// Unweighted terms of one branch.
fn branch_losses(
    br: &Branch,
    targets: &[Targets],
    gt: &Gt,
    pairs: &[Vec<(usize, usize)>],
    w: &LossWeights,
) -> Result<Vec<(&'static str, Tensor)>> {
    let device = br.logits.device().clone();
    let (b, qh) = br.logits.dims2()?;
    let zero = Tensor::zeros((), DType::F32, &device)?;
    let mut out = Vec::new();

    // Flat indices of the matched pairs.
    let mut q_idx = Vec::new();
    let mut g_idx = Vec::new();
    for (bi, ps) in pairs.iter().enumerate() {
        for &(q, g) in ps {
            q_idx.push((bi * qh + q) as u32);
            g_idx.push((gt.offsets[bi] + g) as u32);
        }
    }

    // Boxes.
    if q_idx.is_empty() {
        out.push(("loss_bbox", zero.clone()));
        out.push(("loss_giou", zero.clone()));
    } else {
        let pred = br.boxes.reshape((b * qh, 4))?.index_select(&idx_tensor(&q_idx, &device)?, 0)?;
        let tgt = gt.all_boxes.index_select(&idx_tensor(&g_idx, &device)?, 0)?;
        let l1 = ((&pred - &tgt)?.abs()?.sum_all()? / gt.num_boxes)?;
        let giou = ((paired_giou(&pred, &tgt)?.neg()? + 1.0)?.sum_all()? / gt.num_boxes)?;
        out.push(("loss_bbox", l1));
        out.push(("loss_giou", giou));
    }

    // IABCE: targets from detached probabilities and IoUs.
    let (logits_cpu, boxes_cpu) = (&br.cpu_logits, &br.cpu_boxes);
    let mut matched = vec![0f32; b * qh];
    let mut soft = vec![0f32; b * qh];
    for (bi, ps) in pairs.iter().enumerate() {
        for &(q, g) in ps {
            let k = bi * qh + q;
            let p = sigmoid(logits_cpu[k] as f64);
            let (iou, _) = iou_giou(
                cxcywh_to_xyxy(&boxes_cpu[k * 4..k * 4 + 4]),
                cxcywh_to_xyxy(&gt.boxes[bi][g * 4..g * 4 + 4]),
            );
            let t = (p.powf(w.iabce_alpha) * iou.max(0.0).powf(1.0 - w.iabce_alpha)).max(0.01);
            matched[k] = 1.0;
            soft[k] = t as f32;
        }
    }
    let matched = Tensor::from_vec(matched, (b, qh), &device)?;
    let soft = Tensor::from_vec(soft, (b, qh), &device)?;
    let s = &br.logits;
    let pos = ((bce_with_logits(s, &soft)? * &matched)? * w.pos_weight)?;
    let unmatched = matched.affine(-1.0, 1.0)?;
    let mut neg = (bce_with_logits(s, &s.zeros_like()?)? * unmatched)?;
    if let Some(f) = pow_gamma(&candle_nn::ops::sigmoid(s)?, w.iabce_gamma)? {
        neg = (neg * f)?;
    }
    let per_query = (pos + neg)?.broadcast_mul(&gt.keep)?;
    let denom_q = match w.pad_n_queries {
        Some(pad) => qh.max(pad),
        None => qh,
    };
    out.push(("loss_ce", (per_query.sum_all()? / (b * denom_q).max(1) as f64)?));

    // Presence.
    if let Some(presence) = &br.presence {
        let l = sigmoid_focal(presence, &gt.keep, w.presence_alpha, w.presence_gamma)?;
        out.push(("presence_loss", (l.sum_all()? / b.max(1) as f64)?));
    }

    // Masks.
    if let Some(masks) = &br.masks {
        let (_, _, mh, mw) = masks.dims4()?;
        let mut pred_idx = Vec::new();
        let mut gt_masks = Vec::new();
        let mut size = None;
        for (bi, ps) in pairs.iter().enumerate() {
            let Some(tm) = &targets[bi].masks else { continue };
            let (_, th, tw) = tm.dims3()?;
            if *size.get_or_insert((th, tw)) != (th, tw) {
                bail!("all GT masks of a batch must share one size");
            }
            let valid = targets[bi].mask_valid.as_deref();
            for &(q, g) in ps {
                if valid.is_some_and(|v| !v.get(g).copied().unwrap_or(true)) {
                    continue;
                }
                pred_idx.push((bi * qh + q) as u32);
                gt_masks.push(tm.get(g)?.to_dtype(DType::F32)?.to_device(&device)?);
            }
        }
        if let Some((th, tw)) = size {
            if pred_idx.is_empty() {
                out.push(("loss_mask", zero.clone()));
                out.push(("loss_dice", zero.clone()));
            } else {
                let m = pred_idx.len();
                let pred =
                    masks.reshape((b * qh, mh, mw))?.index_select(&idx_tensor(&pred_idx, &device)?, 0)?;
                let pred = resize_bilinear(&pred, th, tw)?.reshape((m, th * tw))?;
                let tgt = Tensor::stack(&gt_masks, 0)?.reshape((m, th * tw))?;
                let focal = sigmoid_focal(&pred, &tgt, w.mask_alpha, w.mask_gamma)?;
                let focal = (focal.mean(1)?.sum_all()? / gt.num_boxes)?;
                let p = candle_nn::ops::sigmoid(&pred)?;
                let num = (&p * &tgt)?.sum(1)?.affine(2.0, 1.0)?;
                let den = ((p.sum(1)? + tgt.sum(1)?)? + 1.0)?;
                let dice = (((num / den)?.neg()? + 1.0)?.sum_all()? / gt.num_boxes)?;
                out.push(("loss_mask", focal));
                out.push(("loss_dice", dice));
            }
        }
    }
    Ok(out)
}

impl LossWeights {
    /// The weight of a named loss term (`loss_ce`, `presence_loss`, `loss_bbox`, `loss_giou`,
    /// `loss_mask`, `loss_dice`), for reading or changing; None for other names.
    pub fn term_mut(&mut self, name: &str) -> Option<&mut f64> {
        Some(match name {
            "loss_bbox" => &mut self.loss_bbox,
            "loss_giou" => &mut self.loss_giou,
            "loss_ce" => &mut self.loss_ce,
            "presence_loss" => &mut self.presence_loss,
            "loss_mask" => &mut self.loss_mask,
            "loss_dice" => &mut self.loss_dice,
            _ => return None,
        })
    }
}

fn term_weight(name: &str, w: &LossWeights) -> f64 {
    match name {
        "loss_bbox" => w.loss_bbox,
        "loss_giou" => w.loss_giou,
        "loss_ce" => w.loss_ce,
        "presence_loss" => w.presence_loss,
        "loss_mask" => w.loss_mask,
        "loss_dice" => w.loss_dice,
        _ => 0.0,
    }
}

/// Meta's SAM3 detection/segmentation loss (see the module docs) for one batch.
///
/// `targets` has one entry per image of the batch. Matching runs on detached copies of the
/// outputs; the total is differentiable w.r.t. `all_logits`, `all_boxes_cxcywh`, `all_presence`
/// and `all_masks`.
pub fn sam3_loss(outputs: &Sam3Outputs, targets: &[Targets], weights: &LossWeights) -> Result<LossOutput> {
    let (layers, b, n) = outputs.all_logits.dims3()?;
    if targets.len() != b {
        bail!("sam3_loss: {} targets for a batch of {b}", targets.len());
    }
    if layers == 0 {
        bail!("sam3_loss: no decoder layers in the outputs");
    }
    let n_o2m = outputs.num_o2m;
    if n_o2m > n {
        bail!("sam3_loss: num_o2m {n_o2m} exceeds the {n} queries");
    }
    let q = n - n_o2m;
    let device = outputs.all_logits.device().clone();
    let all_logits = outputs.all_logits.to_dtype(DType::F32)?;
    let all_boxes = outputs.all_boxes_cxcywh.to_dtype(DType::F32)?;
    let all_presence = outputs.all_presence.to_dtype(DType::F32)?;
    let all_masks = outputs.all_masks.to_dtype(DType::F32)?;

    // Ground truth.
    let mut gt_boxes = Vec::with_capacity(b);
    let mut offsets = Vec::with_capacity(b);
    let mut keep = Vec::with_capacity(b);
    let mut flat = Vec::new();
    for t in targets {
        let v: Vec<f32> = t.boxes.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if !v.len().is_multiple_of(4) {
            bail!("sam3_loss: target boxes must be (G, 4)");
        }
        if let Some(m) = &t.masks {
            if m.dim(0)? != v.len() / 4 {
                bail!("sam3_loss: {} masks for {} boxes", m.dim(0)?, v.len() / 4);
            }
        }
        offsets.push(flat.len() / 4);
        keep.push(if v.is_empty() { 0f32 } else { 1.0 });
        flat.extend_from_slice(&v);
        gt_boxes.push(v);
    }
    let total_gt = flat.len() / 4;
    let gt = Gt {
        all_boxes: Tensor::from_vec(flat, (total_gt, 4), &device)?,
        boxes: gt_boxes,
        offsets,
        keep: Tensor::from_vec(keep, (b, 1), &device)?,
        num_boxes: total_gt.max(1) as f64,
    };

    let logits_cpu: Vec<f32> = all_logits.flatten_all()?.to_vec1()?;
    let boxes_cpu: Vec<f32> = all_boxes.flatten_all()?.to_vec1()?;

    let mut terms = BTreeMap::new();
    let mut matches = Vec::new();
    let mut total = Tensor::zeros((), DType::F32, &device)?;
    // Per-term values, copied to the host in one transfer at the end.
    let mut logged: Vec<(String, Tensor)> = Vec::new();
    let first = if weights.aux { 0 } else { layers - 1 };
    for layer in first..layers {
        let is_final = layer == layers - 1;
        let halves: &[(bool, usize, usize)] =
            if n_o2m > 0 { &[(false, 0, q), (true, q, n_o2m)] } else { &[(false, 0, q)] };
        for &(o2m, off, len) in halves {
            // Match on detached CPU copies.
            let mut cpu_logits = Vec::with_capacity(b * len);
            let mut cpu_boxes = Vec::with_capacity(b * len * 4);
            let mut pairs = Vec::with_capacity(b);
            for (bi, gt_boxes) in gt.boxes.iter().enumerate() {
                let base = (layer * b + bi) * n + off;
                let lg = &logits_cpu[base..base + len];
                let bx = &boxes_cpu[base * 4..(base + len) * 4];
                pairs.push(if o2m && is_final {
                    weights.o2m_matcher.match_image(lg, bx, gt_boxes)
                } else {
                    weights.matcher.match_image(lg, bx, gt_boxes)
                });
                cpu_logits.extend_from_slice(lg);
                cpu_boxes.extend_from_slice(bx);
            }
            let branch = Branch {
                logits: all_logits.get(layer)?.narrow(1, off, len)?,
                boxes: all_boxes.get(layer)?.narrow(1, off, len)?,
                masks: if is_final { Some(all_masks.narrow(1, off, len)?) } else { None },
                presence: if o2m { None } else { Some(all_presence.get(layer)?) },
                cpu_logits,
                cpu_boxes,
            };
            let losses = branch_losses(&branch, targets, &gt, &pairs, weights)?;
            let scale = if o2m { weights.o2m_weight } else { 1.0 };
            let suffix = format!(
                "{}{}",
                if is_final { String::new() } else { format!("_aux_{layer}") },
                if o2m { "_o2m" } else { "" }
            );
            for (name, value) in losses {
                let wgt = term_weight(name, weights) * scale;
                if wgt != 0.0 {
                    total = (total + (&value * wgt)?)?;
                }
                logged.push((format!("{name}{suffix}"), value.detach()));
            }
            matches.push(BranchMatches { layer, o2m, pairs });
        }
    }
    if weights.scale_by_batch {
        total = (total * (b as f64).sqrt())?;
    }
    for name in ["loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice"] {
        terms.insert(format!("weight/{name}"), term_weight(name, weights));
    }
    terms.insert("weight/o2m".into(), weights.o2m_weight);
    terms.insert("num_boxes".into(), gt.num_boxes);
    logged.push(("total".into(), total.detach()));
    let values: Vec<Tensor> = logged.iter().map(|(_, v)| v.clone()).collect();
    let values: Vec<f32> = Tensor::stack(&values, 0)?.to_device(&Device::Cpu)?.to_vec1()?;
    for ((name, _), v) in logged.into_iter().zip(values) {
        terms.insert(name, v as f64);
    }
    Ok(LossOutput { total, terms, matches })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn close(got: f64, want: f64, tol: f64) {
        assert!((got - want).abs() <= tol, "got {got}, want {want}");
    }

    fn vec1(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Outputs with one layer, no o2m half; boxes/logits given per image.
    fn outputs(logits: &[f32], boxes: &[f32], presence: &[f32], b: usize, q: usize) -> Sam3Outputs {
        let d = Device::Cpu;
        let all_logits = Tensor::from_vec(logits.to_vec(), (1, b, q), &d).unwrap();
        let all_boxes = Tensor::from_vec(boxes.to_vec(), (1, b, q, 4), &d).unwrap();
        let all_presence = Tensor::from_vec(presence.to_vec(), (1, b, 1), &d).unwrap();
        let all_masks = Tensor::zeros((b, q, 2, 2), DType::F32, &d).unwrap();
        Sam3Outputs {
            pred_logits: all_logits.get(0).unwrap(),
            pred_boxes: all_boxes.get(0).unwrap(),
            presence_logits: all_presence.get(0).unwrap(),
            pred_masks: all_masks.clone(),
            semantic_seg: Tensor::zeros((b, 1, 2, 2), DType::F32, &d).unwrap(),
            all_logits,
            all_boxes_cxcywh: all_boxes,
            all_presence,
            all_masks,
            num_o2m: 0,
        }
    }

    #[test]
    fn bce_and_focal_match_torch() {
        let d = Device::Cpu;
        let x = Tensor::new(&[-3f64, -0.5, 0.0, 2.0, 40.0], &d).unwrap();
        let t = Tensor::new(&[0f64, 1.0, 0.3, 1.0, 0.0], &d).unwrap();
        // python3: F.binary_cross_entropy_with_logits(x, t, reduction='none') (float64)
        let bce = [0.048_587_351_6, 0.974_076_984_2, std::f64::consts::LN_2, 0.126_928_011_0, 40.0];
        // python3: p=x.sigmoid(); pt=p*t+(1-p)*(1-t); (0.25*t+0.75*(1-t))*bce*(1-pt)**2
        let focal = [8.196_249_337_3e-5, 9.435_290_021_5e-2, 1.039_720_770_8e-1, 4.508_907_088_1e-4, 30.0];
        for (g, w) in vec1(&bce_with_logits(&x, &t).unwrap()).iter().zip(bce) {
            close(*g, w, 1e-9);
        }
        for (g, w) in vec1(&sigmoid_focal(&x, &t, 0.25, 2.0).unwrap()).iter().zip(focal) {
            close(*g, w, 1e-9);
        }
    }

    #[test]
    fn bilinear_resize_matches_torch() {
        // The interpolation matrices are f32, hence the 1e-6 tolerance.
        let x = Tensor::arange(0f64, 12.0, &Device::Cpu).unwrap().reshape((1, 3, 4)).unwrap();
        // python3: F.interpolate(torch.arange(12.).reshape(1,1,3,4), size=(2,3), mode='bilinear',
        //   align_corners=False).flatten()
        let want = [1.166_666_666_7, 2.5, 3.833_333_333_3, 7.166_666_666_7, 8.5, 9.833_333_333_3];
        for (g, w) in vec1(&resize_bilinear(&x, 2, 3).unwrap()).iter().zip(want) {
            close(*g, w, 1e-6);
        }
        // Same with size=(5,7): first row and a middle row.
        let up = vec1(&resize_bilinear(&x, 5, 7).unwrap());
        let want_row0 = [0.0, 0.357_142_857_1, 0.928_571_428_6, 1.5, 2.071_428_571_4, 2.642_857_142_9, 3.0];
        let want_row1 = [1.6, 1.957_142_857_1, 2.528_571_428_6, 3.1, 3.671_428_571_4, 4.242_857_142_9, 4.6];
        for (g, w) in up[..7].iter().zip(want_row0) {
            close(*g, w, 1e-6);
        }
        for (g, w) in up[7..14].iter().zip(want_row1) {
            close(*g, w, 1e-6);
        }
    }

    /// Central finite differences of `f` at `x0` (f64) against candle's gradient.
    fn check_grad(f: &dyn Fn(&Tensor) -> Tensor, x0: &[f64], shape: &[usize]) {
        let d = Device::Cpu;
        let var = Var::from_tensor(&Tensor::from_vec(x0.to_vec(), shape, &d).unwrap()).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        let analytic = vec1(grads.get(var.as_tensor()).unwrap());
        let eps = 1e-6;
        for i in 0..x0.len() {
            let eval = |delta: f64| {
                let mut x = x0.to_vec();
                x[i] += delta;
                let t = Tensor::from_vec(x, shape, &d).unwrap();
                f(&t).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            close(analytic[i], numeric, 1e-5);
        }
    }

    #[test]
    fn giou_and_resize_gradients_match_finite_differences() {
        let d = Device::Cpu;
        let gt = Tensor::new(&[[0.4f64, 0.45, 0.3, 0.2], [0.6, 0.5, 0.2, 0.4]], &d).unwrap();
        let pred = [0.42, 0.5, 0.25, 0.3, 0.3, 0.3, 0.1, 0.1];
        let giou = |x: &Tensor| paired_giou(x, &gt).unwrap().sum_all().unwrap();
        check_grad(&giou, &pred, &[2, 4]);
        let weights = Tensor::arange(0f64, 35.0, &d).unwrap().reshape((1, 5, 7)).unwrap();
        let resize = |x: &Tensor| (resize_bilinear(x, 5, 7).unwrap() * &weights).unwrap().sum_all().unwrap();
        let x0: Vec<f64> = (0..12).map(|i| (i as f64 * 0.7).sin()).collect();
        check_grad(&resize, &x0, &[1, 3, 4]);
    }

    #[test]
    fn perfect_box_gives_zero_box_losses() {
        let gt = [0.4f32, 0.5, 0.2, 0.3];
        let boxes = [0.4f32, 0.5, 0.2, 0.3, 0.8, 0.8, 0.1, 0.1];
        let out = outputs(&[0.0, 0.0], &boxes, &[0.0], 1, 2);
        let t = vec![Targets::from_boxes(&[gt], &Device::Cpu).unwrap()];
        let l = sam3_loss(&out, &t, &LossWeights::default()).unwrap();
        assert_eq!(l.matches[0].pairs, vec![vec![(0, 0)]]);
        close(l.terms["loss_bbox"], 0.0, 1e-7);
        close(l.terms["loss_giou"], 0.0, 1e-6);
    }

    #[test]
    fn iabce_presence_and_total_hand_values() {
        // Image 0: one GT exactly under query 0 (IoU 1); image 1: no GT.
        let gt = [0.5f32, 0.5, 0.4, 0.4];
        let boxes = [0.5f32, 0.5, 0.4, 0.4, 0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.4, 0.4, 0.1, 0.1, 0.1, 0.1];
        let out = outputs(&[1.0, -1.0, 3.0, 3.0], &boxes, &[0.5, -0.3], 2, 2);
        let d = Device::Cpu;
        let t = vec![Targets::from_boxes(&[gt], &d).unwrap(), Targets::from_boxes(&[], &d).unwrap()];
        let w = LossWeights { pad_n_queries: None, ..Default::default() };
        let l = sam3_loss(&out, &t, &w).unwrap();
        assert_eq!(l.matches[0].pairs, vec![vec![(0, 0)], vec![]]);
        // python3: s=torch.tensor(1.); t=clamp(s.sigmoid()**0.25, min=0.01);
        //   (10*bce(s,t) + bce(-1.,0.)*sigmoid(-1.)**2)/4   (image 1 gated out by keep_b)
        close(l.terms["loss_ce"], 0.977_136_936_8, 1e-6);
        // python3: (0.5*bce(0.5, 1.) + 0.5*bce(-0.3, 0.))/2
        close(l.terms["presence_loss"], 0.257_108_057_2, 1e-6);
        let want_total = 2f64.sqrt()
            * (20.0 * l.terms["loss_ce"]
                + 20.0 * l.terms["presence_loss"]
                + 5.0 * l.terms["loss_bbox"]
                + 2.0 * l.terms["loss_giou"]);
        close(l.terms["total"], want_total, 1e-5);
        // pad_n_queries 200 divides by B·200 instead of B·Q.
        let padded = sam3_loss(&out, &t, &LossWeights::default()).unwrap();
        close(padded.terms["loss_ce"], 0.977_136_936_8 * 2.0 / 200.0, 1e-7);
    }

    #[test]
    fn presence_only_for_empty_batch() {
        let out = outputs(&[2.0, -2.0], &[0.5; 8], &[1.5], 1, 2);
        let t = vec![Targets::from_boxes(&[], &Device::Cpu).unwrap()];
        let l = sam3_loss(&out, &t, &LossWeights::default()).unwrap();
        assert_eq!(l.terms["loss_ce"], 0.0);
        assert_eq!(l.terms["loss_bbox"], 0.0);
        // 0.5·softplus(1.5): python3: 0.5*F.softplus(torch.tensor(1.5,dtype=torch.float64))
        close(l.terms["presence_loss"], 0.5 * 1.701_413_278_0, 1e-6);
    }

    #[test]
    fn dice_of_identical_masks_is_zero() {
        let d = Device::Cpu;
        let gt_mask: Vec<f32> = (0..16).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
        let mut out = outputs(&[0.0], &[0.5, 0.5, 0.4, 0.4], &[0.0], 1, 1);
        let logits: Vec<f32> = gt_mask.iter().map(|&m| if m > 0.5 { 30.0 } else { -30.0 }).collect();
        out.all_masks = Tensor::from_vec(logits, (1, 1, 4, 4), &d).unwrap();
        let t = vec![Targets {
            boxes: Tensor::from_vec(vec![0.5f32, 0.5, 0.4, 0.4], (1, 4), &d).unwrap(),
            masks: Some(Tensor::from_vec(gt_mask, (1, 4, 4), &d).unwrap()),
            mask_valid: None,
        }];
        let l = sam3_loss(&out, &t, &LossWeights::default()).unwrap();
        close(l.terms["loss_dice"], 0.0, 1e-6);
        close(l.terms["loss_mask"], 0.0, 1e-6);
    }

    #[test]
    fn box_only_targets_get_no_mask_loss() {
        let d = Device::Cpu;
        let gt_mask: Vec<f32> = (0..16).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
        // Two queries, each predicting one GT box; the first predicts the first GT's mask exactly.
        let mut out = outputs(&[5.0, 5.0], &[0.3, 0.3, 0.2, 0.2, 0.7, 0.7, 0.2, 0.2], &[3.0], 1, 2);
        let exact: Vec<f32> = gt_mask.iter().map(|&m| if m > 0.5 { 30.0 } else { -30.0 }).collect();
        let mut logits = exact.clone();
        logits.extend(exact.iter().map(|v| -v));
        out.all_masks = Tensor::from_vec(logits, (1, 2, 4, 4), &d).unwrap();
        let mut masks = gt_mask.clone();
        masks.extend([0f32; 16]);
        let targets = |valid: Option<Vec<bool>>| {
            vec![Targets {
                boxes: Tensor::new(&[[0.3f32, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], &d).unwrap(),
                masks: Some(Tensor::from_vec(masks.clone(), (2, 4, 4), &d).unwrap()),
                mask_valid: valid,
            }]
        };
        // The second object is box-only: trained as an empty mask, it costs dice and focal loss.
        let all = sam3_loss(&out, &targets(None), &LossWeights::default()).unwrap();
        assert!(all.terms["loss_dice"] > 0.1 && all.terms["loss_mask"] > 0.1, "{:?}", all.terms);
        // Marked invalid, it is skipped: only the exact first mask counts.
        let valid = sam3_loss(&out, &targets(Some(vec![true, false])), &LossWeights::default()).unwrap();
        close(valid.terms["loss_dice"], 0.0, 1e-6);
        close(valid.terms["loss_mask"], 0.0, 1e-6);
        // Box terms are unchanged.
        close(valid.terms["loss_bbox"], all.terms["loss_bbox"], 1e-9);
        close(valid.terms["loss_giou"], all.terms["loss_giou"], 1e-9);
    }

    #[test]
    fn gradients_reach_all_outputs() {
        let d = Device::Cpu;
        let (layers, b, q) = (2, 2, 3);
        let n = 2 * q;
        let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (layers, b, n), &d).unwrap()).unwrap();
        let raw = Tensor::rand(0.2f32, 0.6, (layers, b, n, 4), &d).unwrap();
        let boxes = Var::from_tensor(&raw).unwrap();
        let presence = Var::from_tensor(&Tensor::randn(0f32, 1.0, (layers, b, 1), &d).unwrap()).unwrap();
        let masks = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, 4, 4), &d).unwrap()).unwrap();
        let out = Sam3Outputs {
            pred_logits: logits.as_tensor().get(1).unwrap(),
            pred_boxes: boxes.as_tensor().get(1).unwrap(),
            presence_logits: presence.as_tensor().get(1).unwrap(),
            pred_masks: masks.as_tensor().clone(),
            semantic_seg: Tensor::zeros((b, 1, 4, 4), DType::F32, &d).unwrap(),
            all_logits: logits.as_tensor().clone(),
            all_boxes_cxcywh: boxes.as_tensor().clone(),
            all_presence: presence.as_tensor().clone(),
            all_masks: masks.as_tensor().clone(),
            num_o2m: q,
        };
        let gt_masks =
            Tensor::rand(0f32, 1.0, (2, 6, 6), &d).unwrap().ge(0.5).unwrap().to_dtype(DType::F32).unwrap();
        let t = vec![
            Targets {
                boxes: Tensor::new(&[[0.4f32, 0.4, 0.3, 0.3], [0.5, 0.5, 0.2, 0.4]], &d).unwrap(),
                masks: Some(gt_masks),
                mask_valid: None,
            },
            Targets::from_boxes(&[], &d).unwrap(),
        ];
        let w = LossWeights {
            o2m_matcher: OneToManyMatcher { threshold: 0.0, ..Default::default() },
            ..Default::default()
        };
        let l = sam3_loss(&out, &t, &w).unwrap();
        assert_eq!(l.matches.len(), 4);
        assert!(l.terms.contains_key("loss_ce_aux_0_o2m"));
        assert!(l.terms.contains_key("loss_dice_o2m"));
        assert!(!l.terms.contains_key("presence_loss_o2m"));
        let grads = l.total.backward().unwrap();
        for (name, v) in [("logits", &logits), ("boxes", &boxes), ("presence", &presence), ("masks", &masks)]
        {
            let g = vec1(grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no grad for {name}")));
            assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite grad");
            assert!(g.iter().any(|x| *x != 0.0), "{name}: zero grad");
        }
    }

    #[test]
    fn fixture_model_loss_is_finite_and_backpropagates() {
        use crate::sam3::model::{ForwardOptions, Sam3Inputs, Sam3Model};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam3/tiny_a");
        let d = Device::Cpu;
        let model = Sam3Model::load_dir(&dir, &d, DType::F32).unwrap();
        let inputs = candle_core::safetensors::load(dir.join("inputs.safetensors"), &d).unwrap();
        let inputs = Sam3Inputs {
            pixel_values: inputs["pixel_values"].clone(),
            input_ids: inputs["input_ids"].clone(),
            attention_mask: inputs["attention_mask"].clone(),
            input_boxes: None,
            input_boxes_labels: None,
            prompt_keys: None,
        };
        let mut out = model.forward_with(&inputs, ForwardOptions { train: false, dac: true }).unwrap();
        assert!(out.num_o2m > 0);
        // The fixture weights are frozen tensors: make the outputs the leaves of the loss graph.
        let logits = Var::from_tensor(&out.all_logits.detach()).unwrap();
        let boxes = Var::from_tensor(&out.all_boxes_cxcywh.detach()).unwrap();
        let presence = Var::from_tensor(&out.all_presence.detach()).unwrap();
        let masks = Var::from_tensor(&out.all_masks.detach()).unwrap();
        out.all_logits = logits.as_tensor().clone();
        out.all_boxes_cxcywh = boxes.as_tensor().clone();
        out.all_presence = presence.as_tensor().clone();
        out.all_masks = masks.as_tensor().clone();
        let b = out.all_logits.dim(1).unwrap();
        let (_, _, mh, mw) = out.all_masks.dims4().unwrap();
        let mut targets = Vec::new();
        for i in 0..b {
            if i % 2 == 1 {
                targets.push(Targets::from_boxes(&[], &d).unwrap());
                continue;
            }
            let mut m = vec![0f32; 2 * (mh + 3) * (mw + 1)];
            for (k, v) in m.iter_mut().enumerate() {
                *v = ((k / 3) % 2) as f32;
            }
            targets.push(Targets {
                boxes: Tensor::new(&[[0.3f32, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]], &d).unwrap(),
                masks: Some(Tensor::from_vec(m, (2, mh + 3, mw + 1), &d).unwrap()),
                mask_valid: None,
            });
        }
        let l = sam3_loss(&out, &targets, &LossWeights::default()).unwrap();
        assert!(l.terms["total"].is_finite(), "{:?}", l.terms);
        assert!(l.terms.values().all(|v| v.is_finite()), "{:?}", l.terms);
        let grads = l.total.backward().unwrap();
        for (name, v) in [("logits", &logits), ("boxes", &boxes), ("presence", &presence), ("masks", &masks)]
        {
            let g = vec1(grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no grad for {name}")));
            assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite grad");
            assert!(g.iter().any(|x| *x != 0.0), "{name}: zero grad");
        }
    }
}
