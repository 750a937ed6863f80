//! Query/ground-truth matching for SAM3 training (Meta's `sam3/train/matcher.py`, architecture
//! notes §5.2).
//!
//! Everything here runs on detached CPU data (`f32` slices copied out of the model outputs):
//! - [`linear_sum_assignment`]: a dense rectangular Hungarian solver (shortest augmenting path
//!   with potentials, O(n²·m)), the equivalent of scipy's `linear_sum_assignment`;
//! - [`HungarianMatcher`]: `BinaryHungarianMatcherV2`, one-to-one;
//! - [`OneToManyMatcher`]: `BinaryOneToManyMatcher`, the DAC one-to-many half.
//!
//! Boxes are normalized cxcywh, `4` floats per box, row-major.

/// Large finite stand-in for non-finite costs (NaN / ±inf would stall the solver).
const COST_CAP: f64 = 1e12;

/// Minimum-cost assignment on a dense `rows × cols` cost matrix (row-major).
///
/// Returns `min(rows, cols)` `(row, col)` pairs sorted by row, every row and column used at most
/// once, minimizing the summed cost (scipy `linear_sum_assignment` semantics). NaN and +inf costs
/// are treated as a large finite cost, −inf as a large negative one.
pub fn linear_sum_assignment(cost: &[f64], rows: usize, cols: usize) -> Vec<(usize, usize)> {
    assert_eq!(cost.len(), rows * cols, "cost matrix is not rows × cols");
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let sanitize = |c: f64| {
        if c.is_nan() {
            COST_CAP
        } else {
            c.clamp(-COST_CAP, COST_CAP)
        }
    };
    let mut pairs = if rows <= cols {
        let c: Vec<f64> = cost.iter().map(|&c| sanitize(c)).collect();
        solve_rows_le_cols(&c, rows, cols)
    } else {
        // Transpose so that the short side is the rows.
        let mut t = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = sanitize(cost[r * cols + c]);
            }
        }
        solve_rows_le_cols(&t, cols, rows).into_iter().map(|(c, r)| (r, c)).collect()
    };
    pairs.sort_unstable();
    pairs
}

/// Shortest-augmenting-path Hungarian algorithm for `n ≤ m` (every row gets a column).
fn solve_rows_le_cols(c: &[f64], n: usize, m: usize) -> Vec<(usize, usize)> {
    // 1-based: index 0 of `p`/`way` is the virtual source column.
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut p = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let cur = c[(i0 - 1) * m + (j - 1)] - u[i0] - v[j];
                if cur < minv[j] {
                    minv[j] = cur;
                    way[j] = j0;
                }
                if minv[j] < delta {
                    delta = minv[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    (1..=m).filter(|&j| p[j] != 0).map(|j| (p[j] - 1, j - 1)).collect()
}

/// Numerically stable `ln(1 + e^x)`.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `σ(x)`.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// cxcywh → xyxy.
pub fn cxcywh_to_xyxy(b: &[f32]) -> [f64; 4] {
    let (cx, cy, w, h) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
    [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h]
}

/// IoU and generalized IoU of two xyxy boxes. Degenerate (zero-area) pairs give 0 instead of NaN.
pub fn iou_giou(a: [f64; 4], b: [f64; 4]) -> (f64, f64) {
    let area = |x: [f64; 4]| (x[2] - x[0]).max(0.0) * (x[3] - x[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let iou = if union > 0.0 { inter / union } else { 0.0 };
    let ew = (a[2].max(b[2]) - a[0].min(b[0])).max(0.0);
    let eh = (a[3].max(b[3]) - a[1].min(b[1])).max(0.0);
    let enclosing = ew * eh;
    let giou = if enclosing > 0.0 { iou - (enclosing - union) / enclosing } else { iou };
    (iou, giou)
}

/// One-to-one matcher (`BinaryHungarianMatcherV2`): cost = `cost_bbox`·L1(cxcywh) +
/// `cost_class`·focal class cost − `cost_giou`·GIoU(xyxy), solved per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HungarianMatcher {
    /// Weight of the L1 box distance (Meta: 5).
    pub cost_bbox: f64,
    /// Weight of the focal class cost (Meta: 2).
    pub cost_class: f64,
    /// Weight of the GIoU term (Meta: 2).
    pub cost_giou: f64,
    /// Focal α (Meta: 0.25).
    pub alpha: f64,
    /// Focal γ (Meta: 2).
    pub gamma: f64,
}

impl Default for HungarianMatcher {
    fn default() -> Self {
        HungarianMatcher { cost_bbox: 5.0, cost_class: 2.0, cost_giou: 2.0, alpha: 0.25, gamma: 2.0 }
    }
}

impl HungarianMatcher {
    /// Cost matrix `Q × G` (row-major) for one image: `logits` (Q), `boxes` (Q·4 cxcywh), `gt` (G·4
    /// cxcywh).
    pub fn cost_matrix(&self, logits: &[f32], boxes: &[f32], gt: &[f32]) -> Vec<f64> {
        let q = logits.len();
        let g = gt.len() / 4;
        assert_eq!(boxes.len(), q * 4, "boxes must be Q×4");
        assert_eq!(gt.len(), g * 4, "gt boxes must be G×4");
        let gt_xyxy: Vec<[f64; 4]> = gt.chunks_exact(4).map(cxcywh_to_xyxy).collect();
        let mut cost = Vec::with_capacity(q * g);
        for (qi, &logit) in logits.iter().enumerate() {
            let x = logit as f64;
            let p = sigmoid(x);
            // log p = −softplus(−x), log(1−p) = −softplus(x).
            let pos = self.alpha * (1.0 - p).powf(self.gamma) * softplus(-x);
            let neg = (1.0 - self.alpha) * p.powf(self.gamma) * softplus(x);
            let class = pos - neg;
            let pb = &boxes[qi * 4..qi * 4 + 4];
            let pb_xyxy = cxcywh_to_xyxy(pb);
            for (gi, gb) in gt.chunks_exact(4).enumerate() {
                let l1: f64 = pb.iter().zip(gb).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum();
                let (_, giou) = iou_giou(pb_xyxy, gt_xyxy[gi]);
                cost.push(self.cost_bbox * l1 + self.cost_class * class - self.cost_giou * giou);
            }
        }
        cost
    }

    /// `(query, gt)` pairs for one image, sorted by query; empty when the image has no GT.
    pub fn match_image(&self, logits: &[f32], boxes: &[f32], gt: &[f32]) -> Vec<(usize, usize)> {
        let g = gt.len() / 4;
        if g == 0 || logits.is_empty() {
            return Vec::new();
        }
        let cost = self.cost_matrix(logits, boxes, gt);
        linear_sum_assignment(&cost, logits.len(), g)
    }
}

/// One-to-many matcher (`BinaryOneToManyMatcher`, DAC): S = α·p + (1−α)·IoU; a pair is positive if
/// S is strictly above the per-GT `1 − topk/Q` quantile of S over the queries (linear
/// interpolation, as `torch.quantile`) and S > `threshold`. A query may match several GT boxes,
/// exactly as Meta's code (no exclusivity is enforced there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneToManyMatcher {
    /// Class/IoU balance α (SAM3 config: 0.3).
    pub alpha: f64,
    /// Score threshold (SAM3 config: 0.4).
    pub threshold: f64,
    /// Queries kept per GT (SAM3 config: 4).
    pub topk: usize,
}

impl Default for OneToManyMatcher {
    fn default() -> Self {
        OneToManyMatcher { alpha: 0.3, threshold: 0.4, topk: 4 }
    }
}

/// `torch.quantile(values, q)` with the default linear interpolation (values need not be sorted).
pub fn quantile_linear(values: &[f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "quantile of an empty set");
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (pos - lo as f64) * (v[hi] - v[lo])
}

impl OneToManyMatcher {
    /// `(query, gt)` pairs for one image, sorted by query then GT; empty when the image has no GT.
    pub fn match_image(&self, logits: &[f32], boxes: &[f32], gt: &[f32]) -> Vec<(usize, usize)> {
        let q = logits.len();
        let g = gt.len() / 4;
        assert_eq!(boxes.len(), q * 4, "boxes must be Q×4");
        if g == 0 || q == 0 {
            return Vec::new();
        }
        let pred_xyxy: Vec<[f64; 4]> = boxes.chunks_exact(4).map(cxcywh_to_xyxy).collect();
        let level = 1.0 - self.topk as f64 / q as f64;
        let mut pairs = Vec::new();
        for (gi, gb) in gt.chunks_exact(4).enumerate() {
            let gt_xyxy = cxcywh_to_xyxy(gb);
            let scores: Vec<f64> = (0..q)
                .map(|qi| {
                    let (iou, _) = iou_giou(pred_xyxy[qi], gt_xyxy);
                    self.alpha * sigmoid(logits[qi] as f64) + (1.0 - self.alpha) * iou
                })
                .collect();
            let cut = quantile_linear(&scores, level);
            for (qi, &s) in scores.iter().enumerate() {
                if s > cut && s > self.threshold {
                    pairs.push((qi, gi));
                }
            }
        }
        pairs.sort_unstable();
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic generator (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn brute_force(cost: &[f64], rows: usize, cols: usize) -> f64 {
        // Enumerate injective maps from the short side into the long side.
        fn rec(k: usize, n: usize, m: usize, used: &mut Vec<bool>, f: &dyn Fn(usize, usize) -> f64) -> f64 {
            if k == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..m {
                if !used[j] {
                    used[j] = true;
                    best = best.min(f(k, j) + rec(k + 1, n, m, used, f));
                    used[j] = false;
                }
            }
            best
        }
        if rows <= cols {
            rec(0, rows, cols, &mut vec![false; cols], &|r, c| cost[r * cols + c])
        } else {
            rec(0, cols, rows, &mut vec![false; rows], &|c, r| cost[r * cols + c])
        }
    }

    #[test]
    fn lsa_matches_brute_force_on_random_matrices() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for rows in 1..=5 {
            for cols in 1..=5 {
                for trial in 0..20 {
                    let cost: Vec<f64> = (0..rows * cols)
                        .map(|_| {
                            let x = rng.next_f64() * 10.0 - 5.0;
                            // Some trials use few distinct values to exercise ties.
                            if trial % 3 == 0 {
                                x.round()
                            } else {
                                x
                            }
                        })
                        .collect();
                    let pairs = linear_sum_assignment(&cost, rows, cols);
                    assert_eq!(pairs.len(), rows.min(cols));
                    let mut rs: Vec<usize> = pairs.iter().map(|p| p.0).collect();
                    let mut cs: Vec<usize> = pairs.iter().map(|p| p.1).collect();
                    rs.dedup();
                    cs.sort_unstable();
                    cs.dedup();
                    assert_eq!(rs.len(), pairs.len());
                    assert_eq!(cs.len(), pairs.len());
                    let got: f64 = pairs.iter().map(|&(r, c)| cost[r * cols + c]).sum();
                    let want = brute_force(&cost, rows, cols);
                    assert!((got - want).abs() < 1e-9, "{rows}x{cols}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn lsa_known_2x2_and_degenerate() {
        // Diagonal costs 4+3 = 7 vs anti-diagonal 1+2 = 3.
        assert_eq!(linear_sum_assignment(&[4.0, 1.0, 2.0, 3.0], 2, 2), vec![(0, 1), (1, 0)]);
        assert_eq!(linear_sum_assignment(&[1.0, 5.0, 5.0, 1.0], 2, 2), vec![(0, 0), (1, 1)]);
        assert!(linear_sum_assignment(&[], 0, 3).is_empty());
        // Non-finite entries do not stall the solver.
        let pairs = linear_sum_assignment(&[f64::NAN, 1.0, f64::INFINITY, 2.0], 2, 2);
        assert_eq!(pairs, vec![(0, 1), (1, 0)]);
    }

    #[test]
    fn giou_of_identical_and_disjoint_boxes() {
        let (iou, giou) = iou_giou([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]);
        assert_eq!((iou, giou), (1.0, 1.0));
        // Disjoint unit boxes 1 apart: enclosing 3×1, union 2 → GIoU = 0 − 1/3.
        let (iou, giou) = iou_giou([0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]);
        assert_eq!(iou, 0.0);
        assert!((giou + 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn focal_class_cost_matches_torch() {
        // python3 -c "import torch; x=torch.tensor([-2.,0.,3.],dtype=torch.float64); p=x.sigmoid();
        //   print(0.25*(1-p)**2*(-torch.nn.functional.logsigmoid(x))
        //         - 0.75*p**2*(-torch.nn.functional.logsigmoid(-x)))"
        let want = [0.411_166_872_7, -0.086_643_397_6, -2.074_683_009_9];
        let m = HungarianMatcher { cost_bbox: 0.0, cost_giou: 0.0, cost_class: 1.0, ..Default::default() };
        let boxes = [0.5f32, 0.5, 0.2, 0.2].repeat(3);
        let c = m.cost_matrix(&[-2.0, 0.0, 3.0], &boxes, &[0.5, 0.5, 0.2, 0.2]);
        for (g, w) in c.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn hungarian_matcher_picks_box_overlap() {
        let m = HungarianMatcher::default();
        // Query 0 sits on GT 1, query 2 on GT 0, query 1 is far from both.
        let boxes = [0.7, 0.7, 0.2, 0.2, 0.1, 0.9, 0.05, 0.05, 0.3, 0.3, 0.2, 0.2];
        let gt = [0.3, 0.3, 0.2, 0.2, 0.7, 0.7, 0.2, 0.2];
        assert_eq!(m.match_image(&[0.0, 0.0, 0.0], &boxes, &gt), vec![(0, 1), (2, 0)]);
        assert!(m.match_image(&[0.0, 0.0, 0.0], &boxes, &[]).is_empty());
        // More GT than queries: every query matched once.
        assert_eq!(m.match_image(&[0.0], &boxes[..4], &gt), vec![(0, 1)]);
    }

    #[test]
    fn quantile_is_torch_linear() {
        // python3 -c "import torch; print(torch.quantile(torch.tensor([3.,1.,4.,1.,5.]), 0.3))"
        // → 1.4000
        assert!((quantile_linear(&[3.0, 1.0, 4.0, 1.0, 5.0], 0.3) - 1.4).abs() < 1e-12);
        assert_eq!(quantile_linear(&[2.0], 0.5), 2.0);
    }

    #[test]
    fn one_to_many_topk_and_threshold() {
        let m = OneToManyMatcher { alpha: 0.3, threshold: 0.4, topk: 2 };
        let gt = [0.5f32, 0.5, 0.2, 0.2];
        // Queries 0..3 on the GT (IoU 1), with decreasing scores; 4..7 far away.
        let mut boxes = Vec::new();
        for i in 0..8 {
            if i < 4 {
                boxes.extend([0.5f32, 0.5, 0.2, 0.2]);
            } else {
                boxes.extend([0.1f32, 0.1, 0.05, 0.05]);
            }
        }
        let logits = [3.0f32, 2.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0];
        // Scores: 0.7 + 0.3σ(l) for 0..3; 0.3σ(5) ≈ 0.298 for 4..7. Quantile 0.75 over 8 → position
        // 5.25 of the sorted scores: between σ-scores of queries 2 and 1, so queries 0 and 1 pass.
        assert_eq!(m.match_image(&logits, &boxes, &gt), vec![(0, 0), (1, 0)]);
        // A threshold above every score removes all matches.
        let strict = OneToManyMatcher { threshold: 0.99, ..m };
        assert!(strict.match_image(&logits, &boxes, &gt).is_empty());
        assert!(m.match_image(&logits, &boxes, &[]).is_empty());
    }
}
