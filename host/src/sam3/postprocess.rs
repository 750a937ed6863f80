//! From model outputs to detections a person can use: scores σ(logit)·σ(presence), a score
//! threshold, non-maximum suppression, boxes in image pixels, masks upsampled to the image
//! (bilinear on logits, align_corners=False, as Meta's processor) and COCO RLE encoding.

use serde::Serialize;

/// One detection in image coordinates.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// σ(logit)·σ(presence).
    pub score: f32,
    /// [x0, y0, x1, y1] in pixels of the original image (`bbox_xyxy` in JSON).
    #[serde(rename = "bbox_xyxy")]
    pub bbox: [f32; 4],
    /// The same box as COCO's [x, y, width, height] (`bbox` in JSON, beside the COCO RLE
    /// `segmentation` and `area`, so the detections read as COCO results).
    #[serde(rename = "bbox")]
    pub bbox_xywh: [f32; 4],
    /// Query index in the model output.
    pub query: usize,
    /// The mask as COCO RLE (column-major counts), at image resolution.
    pub segmentation: Rle,
    /// Mask area in pixels.
    pub area: u64,
}

/// COCO run-length encoding: `counts` alternate background/foreground runs in column-major
/// order, starting with background.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rle {
    /// [height, width].
    pub size: [usize; 2],
    /// Run lengths.
    pub counts: Vec<u64>,
}

/// Logistic function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Intersection over union of two xyxy boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy NMS: indices of kept boxes, highest score first.
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_threshold: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        if keep.iter().all(|&k| iou(&boxes[i], &boxes[k]) <= iou_threshold) {
            keep.push(i);
        }
    }
    keep
}

/// For each of `out` output positions along an axis of `input` samples: the two source indices
/// and the weight of the second, by PyTorch's `align_corners=False` rule (no antialiasing).
pub fn bilinear_taps(out: usize, input: usize) -> Vec<(usize, usize, f64)> {
    let scale = input as f64 / out as f64;
    (0..out)
        .map(|o| {
            let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, s - i0 as f64)
        })
        .collect()
}

/// Bilinear resize of a (h, w) map to (out_h, out_w) with PyTorch's align_corners=False rule.
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let ys = bilinear_taps(out_h, h);
    let xs = bilinear_taps(out_w, w);
    let mut out = vec![0f32; out_h * out_w];
    for (oy, &(y0, y1, ly)) in ys.iter().enumerate() {
        let ly = ly as f32;
        for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
            let lx = lx as f32;
            let top = src[y0 * w + x0] * (1.0 - lx) + src[y0 * w + x1] * lx;
            let bot = src[y1 * w + x0] * (1.0 - lx) + src[y1 * w + x1] * lx;
            out[oy * out_w + ox] = top * (1.0 - ly) + bot * ly;
        }
    }
    out
}

/// COCO RLE of a row-major boolean mask (h, w).
pub fn rle_encode(mask: &[bool], h: usize, w: usize) -> Rle {
    let mut counts = Vec::new();
    let mut current = false;
    let mut run = 0u64;
    for x in 0..w {
        for y in 0..h {
            let v = mask[y * w + x];
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    Rle { size: [h, w], counts }
}

/// Decode a COCO RLE back to a row-major mask (tests, overlays); an inconsistent RLE decodes
/// to an empty mask. See [`crate::data::rle::decode_counts`] for the checked form.
pub fn rle_decode(rle: &Rle) -> Vec<bool> {
    let [h, w] = rle.size;
    crate::data::rle::decode_counts(&rle.counts, h, w).unwrap_or_else(|_| vec![false; h * w])
}

/// Raw per-image model outputs needed for post-processing.
pub struct RawOutputs<'a> {
    /// (Q) dot-product logits.
    pub logits: &'a [f32],
    /// presence logit.
    pub presence_logit: f32,
    /// (Q, 4) normalized xyxy boxes.
    pub boxes: &'a [[f32; 4]],
    /// (Q, mh, mw) mask logits, row-major.
    pub masks: &'a [f32],
    /// Mask height and width.
    pub mask_size: (usize, usize),
}

/// Turn raw outputs into detections at image resolution (width, height).
pub fn detections(
    raw: &RawOutputs,
    image_size: (usize, usize),
    score_threshold: f32,
    nms_iou: f32,
) -> Vec<Detection> {
    let (iw, ih) = image_size;
    let presence = sigmoid(raw.presence_logit);
    let scores: Vec<f32> = raw.logits.iter().map(|l| sigmoid(*l) * presence).collect();
    let boxes: Vec<[f32; 4]> = raw
        .boxes
        .iter()
        .map(|b| {
            [
                (b[0] * iw as f32).clamp(0.0, iw as f32),
                (b[1] * ih as f32).clamp(0.0, ih as f32),
                (b[2] * iw as f32).clamp(0.0, iw as f32),
                (b[3] * ih as f32).clamp(0.0, ih as f32),
            ]
        })
        .collect();
    let candidates: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] > score_threshold).collect();
    let cand_boxes: Vec<[f32; 4]> = candidates.iter().map(|&i| boxes[i]).collect();
    let cand_scores: Vec<f32> = candidates.iter().map(|&i| scores[i]).collect();
    let (mh, mw) = raw.mask_size;
    nms(&cand_boxes, &cand_scores, nms_iou)
        .into_iter()
        .map(|k| {
            let q = candidates[k];
            let logits = &raw.masks[q * mh * mw..(q + 1) * mh * mw];
            let up = resize_bilinear(logits, mh, mw, ih, iw);
            let mask: Vec<bool> = up.iter().map(|v| *v > 0.0).collect();
            let area = mask.iter().filter(|b| **b).count() as u64;
            Detection {
                score: scores[q],
                bbox: boxes[q],
                bbox_xywh: {
                    let [x0, y0, x1, y1] = boxes[q];
                    [x0, y0, x1 - x0, y1 - y0]
                },
                query: q,
                segmentation: rle_encode(&mask, ih, iw),
                area,
            }
        })
        .collect()
}

/// Distinct colours for overlays (a detection's, or a prompt's in ground-truth overlays).
pub const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
];

/// Draw detections on the image: each mask tinted in its own colour (45 % opacity) and its box
/// outlined (2 px), in score order.
pub fn overlay(img: &image::RgbImage, dets: &[Detection]) -> image::RgbImage {
    let mut out = img.clone();
    let (w, h) = (img.width() as usize, img.height() as usize);
    for (i, d) in dets.iter().enumerate() {
        let mask = (d.segmentation.size == [h, w]).then(|| rle_decode(&d.segmentation));
        draw_instance(&mut out, mask.as_deref(), d.bbox, PALETTE[i % PALETTE.len()]);
    }
    out
}

/// Draw one instance: its row-major mask (the image's size; another size is not drawn) tinted
/// in `color` at 45 % opacity, and its [x0, y0, x1, y1] pixel box outlined (2 px).
pub fn draw_instance(out: &mut image::RgbImage, mask: Option<&[bool]>, bbox: [f32; 4], color: [u8; 3]) {
    let (w, h) = (out.width() as usize, out.height() as usize);
    if let Some(mask) = mask.filter(|m| m.len() == w * h) {
        for (p, on) in mask.iter().enumerate() {
            if *on {
                let px = out.get_pixel_mut((p % w) as u32, (p / w) as u32);
                for k in 0..3 {
                    px[k] = ((px[k] as f32) * 0.55 + color[k] as f32 * 0.45) as u8;
                }
            }
        }
    }
    let [x0, y0, x1, y1] = bbox.map(|v| v.round() as i64);
    let mut put = |x: i64, y: i64| {
        if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h {
            out.put_pixel(x as u32, y as u32, image::Rgb(color));
        }
    };
    for t in 0..2 {
        for x in x0..=x1 {
            put(x, y0 + t);
            put(x, y1 - t);
        }
        for y in y0..=y1 {
            put(x0 + t, y);
            put(x1 - t, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_roundtrip_and_column_major() {
        // 2x3 mask: row0 = 1 0 0, row1 = 1 1 0 -> column-major 1,1 | 0,1 | 0,0
        let mask = [true, false, false, true, true, false];
        let rle = rle_encode(&mask, 2, 3);
        assert_eq!(rle.counts, vec![0, 2, 1, 1, 2]);
        assert_eq!(rle_decode(&rle), mask.to_vec());
    }

    #[test]
    fn nms_suppresses_overlaps() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
        let keep = nms(&boxes, &[0.9, 0.8, 0.7], 0.5);
        assert_eq!(keep, vec![0, 2]);
    }

    #[test]
    fn bilinear_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0.,1.],[2.,3.]]]]), size=(4,4),
        // mode="bilinear", align_corners=False) first row: 0, 0.25, 0.75, 1
        let out = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        let row0 = &out[0..4];
        for (g, e) in row0.iter().zip([0.0, 0.25, 0.75, 1.0]) {
            assert!((g - e).abs() < 1e-6, "{row0:?}");
        }
        // second row (src y = 0.25): 0.5, 0.75, 1.25, 1.5
        for (g, e) in out[4..8].iter().zip([0.5, 0.75, 1.25, 1.5]) {
            assert!((g - e).abs() < 1e-6, "{:?}", &out[4..8]);
        }
    }

    #[test]
    fn scores_combine_presence_and_threshold() {
        let boxes = [[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]];
        let masks = vec![1.0f32; 2 * 4];
        let raw = RawOutputs {
            logits: &[5.0, -5.0],
            presence_logit: 5.0,
            boxes: &boxes,
            masks: &masks,
            mask_size: (2, 2),
        };
        let d = detections(&raw, (10, 20), 0.5, 0.5);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].query, 0);
        assert!((d[0].score - sigmoid(5.0) * sigmoid(5.0)).abs() < 1e-6);
        assert_eq!(d[0].bbox, [1.0, 2.0, 5.0, 10.0]);
        assert_eq!(d[0].area, 200);
    }
}
