//! Pixel metrics for thin structures (cracks, vessels, wires): where COCO mask mAP is harsh,
//! because an instance one or two pixels off its thin ground truth fails every IoU threshold
//! (failure mode F20: strict F1 0.55 against ±2 px relaxed F1 0.85 on the same crack model).
//!
//! Each (image, prompt) pair is one binary problem: the union of the predictions scoring at
//! least `threshold` against the union of the ground-truth masks. Over the pairs:
//!
//! - strict: mean per-pair IoU (a pair with nothing predicted and nothing there counts 1),
//!   micro IoU, precision, recall, F1 and Dice from the summed pixel counts;
//! - relaxed (boundary-tolerant, `tolerance` px in city-block distance, SAM3-LoRA-Crack's
//!   tolerance): the share of predicted pixels within the tolerance of a ground-truth pixel
//!   (precision) and of ground-truth pixels within it of a predicted pixel (recall), and their
//!   F1;
//! - clDice: the share of the prediction's skeleton near the ground truth and of the ground
//!   truth's skeleton near the prediction (same tolerance), and their harmonic mean.
//!   Skeletons are Zhang–Suen thinning.
//!
//! Every share but the mean IoU is of pixels summed over the pairs, like the strict F1, so
//! the strict and relaxed F1 compare directly and an image with nothing there and nothing
//! predicted adds nothing. (SAM3-LoRA-Crack's script averages its relaxed shares and clDice
//! per image instead, which counts such an image as perfect.) lorahost computes them on the
//! model's square mask grid, 288 × 288 for SAM3.

use crate::evaluation::EvalQuery;

/// Score a prediction needs to count in validation's pixel metrics (cgF1's too).
pub const THRESHOLD: f32 = 0.5;
/// Tolerance of validation's relaxed pixel metrics and clDice, in mask pixels
/// (SAM3-LoRA-Crack's).
pub const TOLERANCE: usize = 2;

/// Pixel metrics over a set of (image, prompt) pairs (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PixelMetrics {
    /// Pairs scored.
    pub pairs: usize,
    /// Score a prediction needs to be part of the predicted map.
    pub threshold: f32,
    /// Tolerance of the relaxed metrics and clDice, in mask pixels (city-block distance).
    pub tolerance: usize,
    /// Mean per-pair IoU.
    pub mean_iou: f64,
    /// IoU of the summed counts, tp / (tp + fp + fn).
    pub micro_iou: f64,
    /// tp / (tp + fp).
    pub precision: f64,
    /// tp / (tp + fn).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// 2 tp / (2 tp + fp + fn).
    pub dice: f64,
    /// Share of predicted pixels within the tolerance of the ground truth.
    pub relaxed_precision: f64,
    /// Share of ground-truth pixels within the tolerance of the prediction.
    pub relaxed_recall: f64,
    /// Harmonic mean of the relaxed precision and recall.
    pub relaxed_f1: f64,
    /// clDice (skeleton-based, with the tolerance).
    pub cldice: f64,
}

/// Why a pair cannot be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PixelMetricsError {
    /// A mask whose length is not height × width.
    #[error("image {image_id} / prompt {prompt:?}: a mask has {len} pixels, expected {height}×{width}")]
    MaskSize {
        /// Image id.
        image_id: u64,
        /// Prompt.
        prompt: String,
        /// The mask's length.
        len: usize,
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
}

/// `a / b`, or `empty` when `b` is 0.
fn ratio(a: f64, b: f64, empty: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        empty
    }
}

/// Harmonic mean, 0 when both are 0.
fn harmonic(a: f64, b: f64) -> f64 {
    ratio(2.0 * a * b, a + b, 0.0)
}

/// City-block distance from each pixel to the nearest set pixel of `mask` (h × w), capped at
/// `cap` (two raster passes).
pub fn city_block_distance(mask: &[bool], h: usize, w: usize, cap: u32) -> Vec<u32> {
    let mut d: Vec<u32> = mask.iter().map(|&m| if m { 0 } else { cap }).collect();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if y > 0 {
                d[i] = d[i].min(d[i - w] + 1);
            }
            if x > 0 {
                d[i] = d[i].min(d[i - 1] + 1);
            }
        }
    }
    for y in (0..h).rev() {
        for x in (0..w).rev() {
            let i = y * w + x;
            if y + 1 < h {
                d[i] = d[i].min(d[i + w] + 1);
            }
            if x + 1 < w {
                d[i] = d[i].min(d[i + 1] + 1);
            }
        }
    }
    d
}

/// `mask` grown by `r` pixels in city-block distance (the cross-shaped dilation repeated `r`
/// times).
pub fn dilate(mask: &[bool], h: usize, w: usize, r: usize) -> Vec<bool> {
    if r == 0 {
        return mask.to_vec();
    }
    let r = r.min(u32::MAX as usize - 1) as u32;
    city_block_distance(mask, h, w, r + 1).into_iter().map(|d| d <= r).collect()
}

/// Zhang–Suen thinning of `mask` (h × w): a one-pixel-wide skeleton; outside the image is
/// background.
pub fn skeletonize(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    let mut s = mask.to_vec();
    // Only set pixels with a background neighbour can go (an interior pixel has 8 set
    // neighbours); each pass decides on the state at its start, then the set neighbours of
    // what it removed join the border.
    let neighbours = |i: usize| {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]
            .map(|(dy, dx)| (y + dy, x + dx))
            .map(|(y, x)| {
                (y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w)
                    .then(|| y as usize * w + x as usize)
            })
    };
    let mut on_border = vec![false; h * w];
    let mut border: Vec<usize> =
        (0..h * w).filter(|&i| s[i] && neighbours(i).iter().any(|n| n.is_none_or(|j| !s[j]))).collect();
    for &i in &border {
        on_border[i] = true;
    }
    let mut remove = Vec::new();
    loop {
        let mut changed = false;
        for pass in 0..2 {
            remove.clear();
            for &i in &border {
                // p2..p9: N, NE, E, SE, S, SW, W, NW.
                let p = neighbours(i).map(|n| n.is_some_and(|j| s[j]));
                let b = p.iter().filter(|&&v| v).count();
                let a = (0..8).filter(|&k| !p[k] && p[(k + 1) % 8]).count();
                let (n, e, so, we) = (p[0], p[2], p[4], p[6]);
                // First pass: not (N·E·S or E·S·W); second: not (N·E·W or N·S·W).
                let ok = if pass == 0 { !(e && so && (n || we)) } else { !(n && we && (e || so)) };
                if (2..=6).contains(&b) && a == 1 && ok {
                    remove.push(i);
                }
            }
            for &i in &remove {
                s[i] = false;
            }
            if !remove.is_empty() {
                changed = true;
                for &i in &remove {
                    for j in neighbours(i).into_iter().flatten() {
                        if s[j] && !on_border[j] {
                            on_border[j] = true;
                            border.push(j);
                        }
                    }
                }
                border.retain(|&i| s[i]);
            }
        }
        if !changed {
            return s;
        }
    }
}

/// Mean width of the shape in `mask` (h × w), in pixels: its area over its skeleton's length.
/// `None` for an empty mask.
pub fn mean_width(mask: &[bool], h: usize, w: usize) -> Option<f64> {
    let area = mask.iter().filter(|&&v| v).count();
    let length = skeletonize(mask, h, w).iter().filter(|&&v| v).count();
    (area > 0).then(|| area as f64 / length.max(1) as f64)
}

/// Pixel counts summed over pairs.
#[derive(Debug, Default, PartialEq)]
struct Sums {
    pairs: usize,
    /// Per-pair IoUs, summed.
    iou: f64,
    tp: u64,
    fp: u64,
    fn_: u64,
    /// Predicted pixels within the tolerance of the ground truth.
    pred_near_gt: u64,
    /// Ground-truth pixels within the tolerance of the prediction.
    gt_near_pred: u64,
    /// Skeleton pixels of the prediction near the ground truth, and all of them.
    pred_skeleton_near_gt: u64,
    pred_skeleton: u64,
    /// Skeleton pixels of the ground truth near the prediction, and all of them.
    gt_skeleton_near_pred: u64,
    gt_skeleton: u64,
}

impl Sums {
    fn add(&mut self, gt: &[bool], pred: &[bool], h: usize, w: usize, tolerance: usize) {
        let count = |m: &[bool]| m.iter().filter(|&&v| v).count() as u64;
        let both = |a: &[bool], b: &[bool]| a.iter().zip(b).filter(|(x, y)| **x && **y).count() as u64;
        let (g, p) = (count(gt), count(pred));
        let inter = both(gt, pred);
        self.pairs += 1;
        self.iou += ratio(inter as f64, (g + p - inter) as f64, 1.0);
        self.tp += inter;
        self.fp += p - inter;
        self.fn_ += g - inter;
        let gt_near = dilate(gt, h, w, tolerance);
        let pred_near = dilate(pred, h, w, tolerance);
        self.pred_near_gt += both(pred, &gt_near);
        self.gt_near_pred += both(gt, &pred_near);
        let (sp, sg) = (skeletonize(pred, h, w), skeletonize(gt, h, w));
        self.pred_skeleton_near_gt += both(&sp, &gt_near);
        self.pred_skeleton += count(&sp);
        self.gt_skeleton_near_pred += both(&sg, &pred_near);
        self.gt_skeleton += count(&sg);
    }

    fn metrics(&self, threshold: f32, tolerance: usize) -> PixelMetrics {
        let f = |v: u64| v as f64;
        let (tp, fp, fn_) = (f(self.tp), f(self.fp), f(self.fn_));
        let precision = ratio(tp, tp + fp, 0.0);
        let recall = ratio(tp, tp + fn_, 0.0);
        let rp = ratio(f(self.pred_near_gt), tp + fp, 0.0);
        let rr = ratio(f(self.gt_near_pred), tp + fn_, 0.0);
        let topology_precision = ratio(f(self.pred_skeleton_near_gt), f(self.pred_skeleton), 0.0);
        let topology_sensitivity = ratio(f(self.gt_skeleton_near_pred), f(self.gt_skeleton), 0.0);
        PixelMetrics {
            pairs: self.pairs,
            threshold,
            tolerance,
            mean_iou: self.iou / self.pairs.max(1) as f64,
            micro_iou: ratio(tp, tp + fp + fn_, 0.0),
            precision,
            recall,
            f1: harmonic(precision, recall),
            dice: ratio(2.0 * tp, 2.0 * tp + fp + fn_, 0.0),
            relaxed_precision: rp,
            relaxed_recall: rr,
            relaxed_f1: harmonic(rp, rr),
            cldice: harmonic(topology_precision, topology_sensitivity),
        }
    }
}

/// Pixel metrics of `queries` (see the module documentation); `None` when there is none.
pub fn pixel_metrics(
    queries: &[&EvalQuery],
    threshold: f32,
    tolerance: usize,
) -> Result<Option<PixelMetrics>, PixelMetricsError> {
    let mut sums = Sums::default();
    for q in queries {
        let (h, w) = (q.height, q.width);
        let bad = |len: usize| PixelMetricsError::MaskSize {
            image_id: q.image_id,
            prompt: q.prompt.clone(),
            len,
            height: h,
            width: w,
        };
        let union = |masks: &mut dyn Iterator<Item = &Vec<bool>>| -> Result<Vec<bool>, PixelMetricsError> {
            let mut u = vec![false; h * w];
            for m in masks {
                if m.len() != h * w {
                    return Err(bad(m.len()));
                }
                for (a, &b) in u.iter_mut().zip(m) {
                    *a |= b;
                }
            }
            Ok(u)
        };
        let gt = union(&mut q.gt_masks.iter())?;
        let pred = union(&mut q.predictions.iter().filter(|p| p.score >= threshold).map(|p| &p.mask))?;
        sums.add(&gt, &pred, h, w, tolerance);
    }
    Ok((sums.pairs > 0).then(|| sums.metrics(threshold, tolerance)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::Prediction;

    /// A mask from rows of `#` and `.`.
    fn grid(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let w = rows[0].len();
        (rows.iter().flat_map(|r| r.chars().map(|c| c == '#')).collect(), rows.len(), w)
    }

    fn show(m: &[bool], w: usize) -> Vec<String> {
        m.chunks(w).map(|r| r.iter().map(|&v| if v { '#' } else { '.' }).collect()).collect()
    }

    fn pair(gt: &[bool], preds: &[(f32, Vec<bool>)], h: usize, w: usize) -> EvalQuery {
        EvalQuery {
            image_id: 1,
            prompt: "crack".into(),
            height: h,
            width: w,
            gt_masks: if gt.contains(&true) { vec![gt.to_vec()] } else { vec![] },
            predictions: preds.iter().map(|(s, m)| Prediction { score: *s, mask: m.clone() }).collect(),
        }
    }

    #[test]
    fn mean_width_is_area_over_skeleton_length() {
        let (line, h, w) = grid(&["........", "########", "........"]);
        assert_eq!(mean_width(&line, h, w), Some(1.0));
        let mut bar = vec![false; 12 * 40];
        for y in 3..8 {
            for x in 2..38 {
                bar[y * 40 + x] = true;
            }
        }
        let width = mean_width(&bar, 12, 40).unwrap();
        assert!((4.5..6.0).contains(&width), "a 5-pixel bar: {width}");
        assert_eq!(mean_width(&[false; 9], 3, 3), None);
    }

    #[test]
    fn dilation_is_a_city_block_ball() {
        let (m, h, w) = grid(&[".....", ".....", "..#..", ".....", "....."]);
        assert_eq!(show(&dilate(&m, h, w, 1), w), [".....", "..#..", ".###.", "..#..", "....."]);
        assert_eq!(show(&dilate(&m, h, w, 2), w), ["..#..", ".###.", "#####", ".###.", "..#.."]);
        assert_eq!(dilate(&m, h, w, 0), m);
        assert!(dilate(&[false; 9], 3, 3, 2).iter().all(|v| !v));
    }

    #[test]
    fn skeleton_of_a_thick_bar_is_a_thin_line_inside_it() {
        let (m, h, w) = grid(&["..........", ".########.", ".########.", ".########.", ".........."]);
        let s = skeletonize(&m, h, w);
        let rows = show(&s, w);
        // One pixel wide, on the bar's middle row, inside the bar, and long.
        assert!(rows[0].chars().chain(rows[1].chars()).chain(rows[3].chars()).all(|c| c == '.'), "{rows:?}");
        assert!(rows[2].matches('#').count() >= 4, "{rows:?}");
        assert!(s.iter().zip(&m).all(|(a, b)| !a || *b));
        // A line one pixel wide is its own skeleton; nothing stays nothing.
        let (line, h, w) = grid(&[".....", "#####", "....."]);
        assert_eq!(skeletonize(&line, h, w), line);
        assert!(skeletonize(&[false; 9], 3, 3).iter().all(|v| !v));
    }

    /// A prediction one pixel beside a one-pixel-wide crack: strict metrics see nothing right,
    /// the relaxed ones and clDice see a perfect answer (F20).
    #[test]
    fn a_crack_one_pixel_off_is_wrong_strictly_and_right_with_tolerance() {
        let (gt, h, w) = grid(&["..........", "..........", "##########", "..........", ".........."]);
        let (off, ..) = grid(&["..........", "..........", "..........", "##########", ".........."]);
        let q = pair(&gt, &[(0.9, off.clone())], h, w);
        let m = pixel_metrics(&[&q], 0.5, 2).unwrap().unwrap();
        assert_eq!((m.pairs, m.mean_iou, m.micro_iou, m.f1, m.dice), (1, 0.0, 0.0, 0.0, 0.0));
        assert_eq!((m.relaxed_precision, m.relaxed_recall, m.relaxed_f1), (1.0, 1.0, 1.0));
        assert_eq!(m.cldice, 1.0);
        // Without tolerance the relaxed metrics are the strict ones.
        let strict = pixel_metrics(&[&q], 0.5, 0).unwrap().unwrap();
        assert_eq!((strict.relaxed_f1, strict.cldice), (0.0, 0.0));
        // Below the threshold a prediction is not part of the map.
        let low = pair(&gt, &[(0.3, off)], h, w);
        let m = pixel_metrics(&[&low], 0.5, 2).unwrap().unwrap();
        assert_eq!((m.relaxed_precision, m.relaxed_recall, m.cldice), (0.0, 0.0, 0.0));
    }

    /// Counts summed over pairs for micro IoU, P, R, F1 and Dice; per-pair IoU averaged with an
    /// empty-and-empty pair counting 1; a missed crack costs recall, a false one precision.
    #[test]
    fn strict_metrics_sum_counts_and_average_ious() {
        let (gt, h, w) = grid(&["####", "....", "....", "...."]);
        let (half, ..) = grid(&["##..", "....", "....", "...."]);
        let (wrong, ..) = grid(&["....", "....", "....", "..##"]);
        let empty = vec![false; 16];
        let a = pair(&gt, &[(0.9, half.clone())], h, w); // tp 2, fn 2
        let b = pair(&empty, &[(0.8, wrong)], h, w); // fp 2, IoU 0
        let c = pair(&empty, &[], h, w); // nothing, IoU 1
        let m = pixel_metrics(&[&a, &b, &c], 0.5, 0).unwrap().unwrap();
        assert_eq!(m.pairs, 3);
        assert!((m.mean_iou - (0.5 + 0.0 + 1.0) / 3.0).abs() < 1e-12);
        assert!((m.micro_iou - 2.0 / 6.0).abs() < 1e-12);
        assert!((m.precision - 0.5).abs() < 1e-12 && (m.recall - 0.5).abs() < 1e-12);
        assert!((m.f1 - 0.5).abs() < 1e-12 && (m.dice - 0.5).abs() < 1e-12);
        // Relaxed, summed: of 4 predicted pixels 2 are near a crack (a's), of 4 crack pixels 2
        // near a prediction; the empty pair c adds nothing.
        assert!((m.relaxed_precision - 0.5).abs() < 1e-12 && (m.relaxed_recall - 0.5).abs() < 1e-12);
        // Nothing predicted anywhere scores 0, not the empty pairs' 1.
        let m = pixel_metrics(&[&pair(&gt, &[], h, w), &c], 0.5, 2).unwrap().unwrap();
        assert_eq!((m.mean_iou, m.relaxed_f1, m.cldice), (0.5, 0.0, 0.0));
        // Several predictions are unioned.
        let (rest, ..) = grid(&["..##", "....", "....", "...."]);
        let both = pair(&gt, &[(0.9, half), (0.7, rest)], h, w);
        let m = pixel_metrics(&[&both], 0.5, 0).unwrap().unwrap();
        assert_eq!((m.mean_iou, m.f1, m.cldice), (1.0, 1.0, 1.0));
        assert_eq!(pixel_metrics(&[], 0.5, 2).unwrap(), None);
        let broken = EvalQuery { gt_masks: vec![vec![true; 3]], ..pair(&gt, &[], h, w) };
        assert!(pixel_metrics(&[&broken], 0.5, 2)
            .unwrap_err()
            .to_string()
            .contains("3 pixels, expected 4×4"));
    }

    /// Against SciPy and scikit-image (tools/gen_pixel_metrics_fixture.py): per pair the counts,
    /// relaxed counts exactly; skeletons on the same centre line (Zhang–Suen here, scikit-image's
    /// variant of it there), so clDice within 0.02; the totals.
    #[test]
    fn matches_scipy_and_scikit_image() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixel_metrics/cases.json");
        let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (h, w, tol) = (f["height"].as_u64().unwrap() as usize, f["width"].as_u64().unwrap() as usize, 2);
        assert_eq!(f["tolerance"], 2);
        let mask = |v: &serde_json::Value| -> Vec<bool> {
            let bits: Vec<bool> = v
                .as_str()
                .unwrap()
                .chars()
                .flat_map(|c| {
                    let d = c.to_digit(16).unwrap();
                    (0..4).rev().map(move |b| d >> b & 1 == 1)
                })
                .collect();
            bits[..h * w].to_vec()
        };
        let close = |a: f64, b: &serde_json::Value, eps: f64, what: &str| {
            let b = b.as_f64().unwrap();
            assert!((a - b).abs() <= eps, "{what}: {a} vs {b}");
        };
        let mut queries = Vec::new();
        for (i, c) in f["cases"].as_array().unwrap().iter().enumerate() {
            let (gt, pred) = (mask(&c["gt"]), mask(&c["pred"]));
            let q = pair(&gt, &[(1.0, pred.clone())], h, w);
            let mut one = Sums::default();
            one.add(&gt, &pred, h, w, tol);
            assert_eq!(
                (one.tp, one.fp, one.fn_),
                (c["tp"].as_u64().unwrap(), c["fp"].as_u64().unwrap(), c["fn"].as_u64().unwrap()),
                "pair {i}"
            );
            close(one.iou, &c["iou"], 1e-12, &format!("pair {i} IoU"));
            let n = |k: &str| c[k].as_u64().unwrap();
            assert_eq!(
                (one.pred_near_gt, one.gt_near_pred),
                (n("pred_near_gt"), n("gt_near_pred")),
                "pair {i}"
            );
            for (m, key) in [(&gt, "gt_skeleton"), (&pred, "pred_skeleton")] {
                let (ours, theirs) = (skeletonize(m, h, w), mask(&c[key]));
                // The same centre line: ours within a pixel (diagonals included) of theirs, and
                // theirs within one of ours but at line ends, where scikit-image's variant
                // keeps a few more pixels (and two-pixel steps on diagonals).
                let near = |a: &[bool]| dilate(a, h, w, 2);
                let (near_ours, near_theirs) = (near(&ours), near(&theirs));
                assert!(ours.iter().zip(&near_theirs).all(|(v, n)| !v || *n), "pair {i} {key}");
                let far = theirs.iter().zip(&near_ours).filter(|(v, n)| **v && !**n).count();
                let n = theirs.iter().filter(|&&v| v).count();
                assert!(far * 10 <= n, "pair {i} {key}: {far} of {n} pixels far from ours");
                assert!(ours.iter().zip(m.iter()).all(|(v, inside)| !v || *inside), "pair {i} {key}");
                assert_eq!(ours.contains(&true), theirs.contains(&true), "pair {i} {key}");
            }
            // The share of each skeleton near the other mask: close to scikit-image's.
            let share = |near: u64, all: u64| ratio(near as f64, all as f64, 0.0);
            for (ours, near, all) in [
                (
                    share(one.pred_skeleton_near_gt, one.pred_skeleton),
                    "pred_skeleton_near_gt",
                    "pred_skeleton_pixels",
                ),
                (
                    share(one.gt_skeleton_near_pred, one.gt_skeleton),
                    "gt_skeleton_near_pred",
                    "gt_skeleton_pixels",
                ),
            ] {
                let theirs = share(n(near), n(all));
                assert!((ours - theirs).abs() <= 0.1, "pair {i} {near}: {ours} vs {theirs}");
            }
            queries.push(q);
        }
        let m = pixel_metrics(&queries.iter().collect::<Vec<_>>(), 0.5, tol).unwrap().unwrap();
        let t = &f["total"];
        for (name, ours) in [
            ("mean_iou", m.mean_iou),
            ("micro_iou", m.micro_iou),
            ("precision", m.precision),
            ("recall", m.recall),
            ("f1", m.f1),
            ("dice", m.dice),
            ("relaxed_precision", m.relaxed_precision),
            ("relaxed_recall", m.relaxed_recall),
            ("relaxed_f1", m.relaxed_f1),
        ] {
            close(ours, &t[name], 1e-9, name);
        }
        close(m.cldice, &t["cldice"], 0.02, "clDice");
    }
}
