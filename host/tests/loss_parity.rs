//! End-to-end parity of the training loss (`lorahost::loss::sam3_loss`, with the matchers of
//! `lorahost::matcher`) with Meta's own SAM3 training loss code (`sam3/train/loss/loss_fns.py`,
//! `sam3_loss.py`, `sam3/train/matcher.py`), configured as Meta's SAM3 fine-tuning recipe
//! (`roboflow_v100_full_ft_100_images.yaml`, its segmentation loss block).
//!
//! The fixtures in `tests/fixtures/loss/` hold seeded random model outputs (6, 2 or 1 decoder
//! layers; 4 to 200 one-to-one queries and as many DAC one-to-many ones; presence logits;
//! final-layer mask logits) and targets (an image without GT boxes, a box-only object, more GT
//! boxes than queries, an all-negative batch, masks up- and downsampled), with what Meta's
//! `Sam3LossWrapper` makes of them: every loss term, the total, the matched (query, GT) pairs of
//! every branch, and the gradient of the total with respect to each output. This test builds
//! `Sam3Outputs` and `Targets` as the trainer does (`train::batch_targets`,
//! `LossWeights::default()`), runs `sam3_loss`, backpropagates, and compares everything in f32
//! with tight tolerances. `--nocapture` prints the per-term comparison.
//!
//! Differences in logging only: Meta multiplies its logged `_o2m` terms by `o2m_weight` (ours are
//! unweighted) and logs a `presence_loss*_o2m` of 0 (ours has no such term: presence is not a
//! one-to-many loss). The recipe's segmentation block also has a `SemanticSegCriterion`, which
//! lorahost does not implement; it is left out on both sides.
//!
//! Regenerate (needs `pip install torch scipy safetensors pyyaml` and a checkout or git mirror of
//! facebookresearch/sam3, given as `--sam3 PATH` or `$SAM3_REPO`):
//!
//! ```text
//! python3 tools/gen_loss_fixture.py --sam3 /path/to/sam3
//! ```

use candle_core::{DType, Device, Tensor, Var};
use lorahost::loss::{sam3_loss, LossOutput, LossWeights, Targets};
use lorahost::sam3::model::Sam3Outputs;
use lorahost::sam3::nn::box_cxcywh_to_xyxy;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

/// Relative tolerance of the loss terms and the total (f32 on both sides).
const TERM_RTOL: f64 = 2e-5;
/// Absolute floor of the term comparison.
const TERM_ATOL: f64 = 1e-6;
/// Gradient tolerance, relative to the largest gradient magnitude of the same tensor.
const GRAD_RTOL: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss")
}

/// One fixture case: tensors, Meta's results, and our outputs as leaves of the loss graph.
struct Case {
    name: String,
    tensors: HashMap<String, Tensor>,
    meta: Value,
    logits: Var,
    boxes: Var,
    presence: Var,
    masks: Var,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = fixture_dir();
        let tensors = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}.safetensors: {e}"));
        let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        let meta: Value = serde_json::from_str(&json).unwrap();
        let var = |k: &str| Var::from_tensor(&tensors[k]).unwrap();
        Case {
            name: name.to_string(),
            logits: var("all_logits"),
            boxes: var("all_boxes_cxcywh"),
            presence: var("all_presence"),
            masks: var("all_masks"),
            tensors,
            meta,
        }
    }

    fn num_o2m(&self) -> usize {
        self.meta["num_o2m"].as_u64().unwrap() as usize
    }

    /// `Sam3Outputs` laid out as `Sam3Model::forward_with` returns them.
    fn outputs(&self) -> Sam3Outputs {
        let (l, b, n) = self.logits.as_tensor().dims3().unwrap();
        let q = n - self.num_o2m();
        let (_, _, h, w) = self.masks.as_tensor().dims4().unwrap();
        let last_boxes = self.boxes.as_tensor().get(l - 1).unwrap().narrow(1, 0, q).unwrap();
        Sam3Outputs {
            pred_logits: self.logits.as_tensor().get(l - 1).unwrap().narrow(1, 0, q).unwrap(),
            pred_boxes: box_cxcywh_to_xyxy(&last_boxes).unwrap(),
            presence_logits: self.presence.as_tensor().get(l - 1).unwrap(),
            pred_masks: self.masks.as_tensor().narrow(1, 0, q).unwrap(),
            semantic_seg: Tensor::zeros((b, 1, h, w), DType::F32, &Device::Cpu).unwrap(),
            all_logits: self.logits.as_tensor().clone(),
            all_boxes_cxcywh: self.boxes.as_tensor().clone(),
            all_presence: self.presence.as_tensor().clone(),
            all_masks: self.masks.as_tensor().clone(),
            num_o2m: self.num_o2m(),
        }
    }

    /// Per-image `Targets` as `train::batch_targets` builds them: every image carries its (G, h, w)
    /// f32 masks, and `mask_valid` is set only when some object of the image is box-only.
    fn targets(&self) -> Vec<Targets> {
        let counts: Vec<i64> = self.tensors["gt_num_boxes"].to_vec1().unwrap();
        let boxes = &self.tensors["gt_boxes"];
        let masks = self.tensors["gt_masks"].to_dtype(DType::F32).unwrap();
        let valid: Vec<u8> = self.tensors["gt_mask_valid"].to_vec1().unwrap();
        let mut off = 0;
        counts
            .iter()
            .map(|&g| {
                let g = g as usize;
                let v: Vec<bool> = valid[off..off + g].iter().map(|&x| x != 0).collect();
                let t = Targets {
                    boxes: boxes.narrow(0, off, g).unwrap(),
                    masks: Some(masks.narrow(0, off, g).unwrap()),
                    mask_valid: if v.iter().all(|x| *x) { None } else { Some(v) },
                };
                off += g;
                t
            })
            .collect()
    }

    fn run(&self, w: &LossWeights) -> LossOutput {
        sam3_loss(&self.outputs(), &self.targets(), w).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= TERM_ATOL + TERM_RTOL * want.abs()
}

/// The recipe values the fixture was made with are our defaults.
fn check_hyperparameters(case: &Case, w: &LossWeights) {
    let hp = &case.meta["hyperparameters"];
    let f = |k: &str| hp[k].as_f64().unwrap_or_else(|| panic!("hyperparameters.{k}"));
    let pairs = [
        ("loss_bbox", w.loss_bbox),
        ("loss_giou", w.loss_giou),
        ("loss_ce", w.loss_ce),
        ("presence_loss", w.presence_loss),
        ("loss_mask", w.loss_mask),
        ("loss_dice", w.loss_dice),
        ("o2m_weight", w.o2m_weight),
        ("pos_weight", w.pos_weight),
        ("iabce_alpha", w.iabce_alpha),
        ("iabce_gamma", w.iabce_gamma),
        ("pad_n_queries", w.pad_n_queries.unwrap() as f64),
        ("presence_alpha", w.presence_alpha),
        ("presence_gamma", w.presence_gamma),
        ("mask_alpha", w.mask_alpha),
        ("mask_gamma", w.mask_gamma),
        ("matcher_cost_class", w.matcher.cost_class),
        ("matcher_cost_bbox", w.matcher.cost_bbox),
        ("matcher_cost_giou", w.matcher.cost_giou),
        ("matcher_alpha", w.matcher.alpha),
        ("matcher_gamma", w.matcher.gamma),
        ("o2m_alpha", w.o2m_matcher.alpha),
        ("o2m_threshold", w.o2m_matcher.threshold),
        ("o2m_topk", w.o2m_matcher.topk as f64),
    ];
    for (k, ours) in pairs {
        assert_eq!(ours, f(k), "{}: LossWeights::default().{k} differs from Meta's recipe", case.name);
    }
    // Aux layers on; the aux o2m halves matched one-to-one; total × √B.
    assert!(w.aux);
    assert_eq!(hp["use_o2m_matcher_on_o2m_aux"], Value::Bool(false));
    assert_eq!(hp["scale_by_find_batch_size"], Value::Bool(w.scale_by_batch));
}

/// Every term Meta logs, in our naming and scale; a failure message for each mismatch.
fn compare_terms(case: &Case, l: &LossOutput, w: &LossWeights) -> Vec<String> {
    let mut errors = Vec::new();
    let o2m_weighted = case.meta["o2m_terms_include_o2m_weight"].as_bool().unwrap();
    let terms = case.meta["terms"].as_object().unwrap();
    for (name, v) in terms {
        let meta = v.as_f64().unwrap();
        if name.starts_with("presence_loss") && name.ends_with("_o2m") {
            // Meta logs a zero presence term for the o2m half; we log none.
            assert_eq!(meta, 0.0, "{}: {name}", case.name);
            assert!(!l.terms.contains_key(name), "{}: unexpected {name}", case.name);
            continue;
        }
        let want = if name.ends_with("_o2m") && o2m_weighted { meta / w.o2m_weight } else { meta };
        // Shown with `--nocapture`.
        if let Some(got) = l.terms.get(name) {
            eprintln!("{} {name:<22} ours {got:>14.8} Meta {want:>14.8} diff {:+.2e}", case.name, got - want);
        }
        match l.terms.get(name) {
            None => errors.push(format!("{name}: missing (Meta {want})")),
            Some(&got) if !close(got, want) => {
                errors.push(format!("{name}: ours {got:.8} Meta {want:.8} (diff {:.3e})", got - want))
            }
            Some(_) => {}
        }
    }
    // And we compute no loss term that Meta does not.
    for name in l.terms.keys() {
        let is_term = name.starts_with("loss_") || name.starts_with("presence_loss");
        if is_term && !terms.contains_key(name) {
            errors.push(format!("{name}: ours only ({})", l.terms[name]));
        }
    }
    let total = case.meta["total"].as_f64().unwrap();
    eprintln!(
        "{} {:<22} ours {:>14.6} Meta {total:>14.6} diff {:+.2e}",
        case.name,
        "total",
        l.terms["total"],
        l.terms["total"] - total
    );
    if !close(l.terms["total"], total) {
        errors.push(format!("total: ours {:.6} Meta {total:.6}", l.terms["total"]));
    }
    let n = case.meta["num_boxes"].as_f64().unwrap();
    if l.terms["num_boxes"] != n {
        errors.push(format!("num_boxes: ours {} Meta {n}", l.terms["num_boxes"]));
    }
    errors
}

fn compare_matches(case: &Case, l: &LossOutput) -> Vec<String> {
    let mut errors = Vec::new();
    let want = case.meta["matches"].as_array().unwrap();
    if want.len() != l.matches.len() {
        return vec![format!("{} branches, Meta {}", l.matches.len(), want.len())];
    }
    for (got, m) in l.matches.iter().zip(want) {
        let layer = m["layer"].as_u64().unwrap() as usize;
        let o2m = m["o2m"].as_bool().unwrap();
        let pairs: Vec<Vec<(usize, usize)>> = m["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|img| {
                img.as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize))
                    .collect()
            })
            .collect();
        let mut ours = got.pairs.clone();
        for p in &mut ours {
            p.sort_unstable();
        }
        if (got.layer, got.o2m) != (layer, o2m) || ours != pairs {
            errors.push(format!(
                "layer {} o2m {}: ours {ours:?}, Meta (layer {layer} o2m {o2m}) {pairs:?}",
                got.layer, got.o2m
            ));
        }
    }
    errors
}

fn compare_grads(case: &Case, l: &LossOutput) -> Vec<String> {
    let grads = l.total.backward().unwrap();
    let mut errors = Vec::new();
    for (name, v) in [
        ("all_logits", &case.logits),
        ("all_boxes_cxcywh", &case.boxes),
        ("all_presence", &case.presence),
        ("all_masks", &case.masks),
    ] {
        let want: Vec<f32> = case.tensors[&format!("grad_{name}")].flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; want.len()],
        };
        assert_eq!(got.len(), want.len(), "{}: grad {name} size", case.name);
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-6);
        let (worst, at) = got
            .iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (g, w))| ((*g as f64 - *w as f64).abs(), i))
            .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
        eprintln!("{} grad {name:<17} max |diff| {worst:.2e} (max |grad| {scale:.3e})", case.name);
        if worst > GRAD_RTOL * scale {
            errors.push(format!(
                "grad {name}: max |diff| {worst:.3e} at {at} (ours {}, Meta {}; scale {scale:.3e})",
                got[at], want[at]
            ));
        }
    }
    errors
}

fn check_case(name: &str) {
    let case = Case::load(name);
    let w = LossWeights::default();
    check_hyperparameters(&case, &w);
    let l = case.run(&w);
    let mut errors = compare_matches(&case, &l);
    errors.extend(compare_terms(&case, &l, &w));
    errors.extend(compare_grads(&case, &l));
    assert!(errors.is_empty(), "{name}: differs from Meta's SAM3 loss:\n  {}", errors.join("\n  "));

    // The comparison is sharp enough to notice a changed weight (where the o2m half has a loss).
    let total = case.meta["total"].as_f64().unwrap();
    let changed = case.run(&LossWeights { o2m_weight: 1.9, ..w });
    if changed.terms.iter().any(|(k, v)| k.ends_with("_o2m") && *v != 0.0) {
        assert!(!close(changed.terms["total"], total), "{name}: o2m_weight 1.9 still gives Meta's total");
    }
}

#[test]
fn main_case_matches_meta() {
    // 6 layers, 3 images (one without GT), a box-only object, 12 + 12 queries, masks 8² → 18×22.
    check_case("main");
}

#[test]
fn dense_case_matches_meta() {
    // More GT boxes than one-to-one queries, masks 10² → 7×9.
    check_case("dense");
}

#[test]
fn queries200_case_matches_meta() {
    // SAM3's 200 + 200 queries: IABCE mean at Q = pad_n_queries, DAC quantile at 1 − 4/200.
    check_case("queries200");
}

#[test]
fn negatives_case_matches_meta() {
    // No GT in the whole batch: presence only, N clamped to 1.
    check_case("negatives");
}
