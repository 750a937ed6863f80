//! From model outputs to detections a person can use: scores σ(logit)·σ(presence), a score
//! threshold, non-maximum suppression, boxes in image pixels, masks upsampled to the image
//! (bilinear on logits, align_corners=False, as Meta's processor), COCO RLE encoding (written
//! in the compressed string form pycocotools' `mask.encode` gives) and overlays whose lines
//! scale with the image.

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
    /// The mask as COCO RLE (column-major counts), at image resolution; in JSON the compressed
    /// form (`{"size": [h, w], "counts": "<string>"}`, as pycocotools' `mask.encode`).
    #[serde(serialize_with = "serialize_compressed")]
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

impl Rle {
    /// The counts as COCO's compressed RLE string (pycocotools' `mask.encode` / `rleToString`).
    pub fn compressed_counts(&self) -> String {
        crate::data::rle::encode_compressed_counts(&self.counts)
    }

    /// From a compressed RLE string and [height, width]; the counts must cover the mask.
    pub fn from_compressed(size: [usize; 2], counts: &str) -> Result<Rle, String> {
        let counts = crate::data::rle::decode_compressed_counts(counts)?;
        crate::data::rle::decode_counts(&counts, size[0], size[1])?;
        Ok(Rle { size, counts })
    }
}

/// Serialize an [`Rle`] as COCO compressed RLE: `{"size": [h, w], "counts": "<string>"}`.
fn serialize_compressed<S: serde::Serializer>(rle: &Rle, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("Rle", 2)?;
    st.serialize_field("size", &rle.size)?;
    st.serialize_field("counts", &rle.compressed_counts())?;
    st.end()
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

/// The highest score σ(logit)·σ(presence) of any query, whether or not it passed the threshold
/// (what to lower `--threshold` to when nothing was found); 0 without queries.
pub fn best_score(raw: &RawOutputs) -> f32 {
    let presence = sigmoid(raw.presence_logit);
    raw.logits.iter().map(|l| sigmoid(*l) * presence).fold(0.0, f32::max)
}

/// Line width of overlay boxes and mask outlines for a `w`×`h` image: 2 px up to 750 px, then
/// a 300th of the shorter side (10 px on a 4032×3024 photo), so they stay visible when the
/// image is shown scaled down.
pub fn line_width(w: usize, h: usize) -> usize {
    ((w.min(h) as f64 / 300.0).round() as usize).max(2)
}

/// Draw detections on the image: each mask tinted in its own colour (45 % opacity) with its
/// outline, and its box outlined, in score order (see [`draw_instance`]).
pub fn overlay(img: &image::RgbImage, dets: &[Detection]) -> image::RgbImage {
    overlay_prompts(img, &[dets], &[])
}

/// The detections as one mask image, row-major, `w`×`h`: with one prompt 255 where any
/// detection's mask is (0 elsewhere); with several, the prompt's number (1, 2, ... in order)
/// of the best-scoring detection at each pixel, the label map `lorahost import --class
/// 1=NAME --class 2=...` reads back.
pub fn mask_image(per_prompt: &[&[Detection]], w: usize, h: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    let mut best = vec![f32::NEG_INFINITY; w * h];
    let single = per_prompt.len() == 1;
    for (k, dets) in per_prompt.iter().enumerate() {
        let value = if single { 255 } else { (k + 1).min(255) as u8 };
        for d in dets.iter() {
            if d.segmentation.size != [h, w] {
                continue;
            }
            for (i, on) in rle_decode(&d.segmentation).into_iter().enumerate() {
                if on && d.score > best[i] {
                    best[i] = d.score;
                    out[i] = value;
                }
            }
        }
    }
    out
}

/// Draw the detections of one or several prompts, and the box prompts. One prompt: each
/// detection in its own [`PALETTE`] colour; several: one colour per prompt (in order). Box
/// prompts ([x0, y0, x1, y1] pixels) are dashed white and black lines on top.
pub fn overlay_prompts(
    img: &image::RgbImage,
    per_prompt: &[&[Detection]],
    prompt_boxes: &[[f32; 4]],
) -> image::RgbImage {
    let mut out = img.clone();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let several = per_prompt.len() > 1;
    for (p, dets) in per_prompt.iter().enumerate() {
        for (i, d) in dets.iter().enumerate() {
            let mask = (d.segmentation.size == [h, w]).then(|| rle_decode(&d.segmentation));
            let color = PALETTE[if several { p } else { i } % PALETTE.len()];
            draw_instance(&mut out, mask.as_deref(), d.bbox, color);
        }
    }
    for b in prompt_boxes {
        draw_dashed_box(&mut out, *b);
    }
    out
}

/// Draw one instance: its row-major mask (the image's size; another size is not drawn) tinted
/// in `color` at 45 % opacity and outlined in `color`, and its [x0, y0, x1, y1] pixel box
/// outlined; lines [`line_width`] wide (the mask outline half as wide, at least 1 px).
pub fn draw_instance(out: &mut image::RgbImage, mask: Option<&[bool]>, bbox: [f32; 4], color: [u8; 3]) {
    let (w, h) = (out.width() as usize, out.height() as usize);
    let lw = line_width(w, h);
    if let Some(mask) = mask.filter(|m| m.len() == w * h) {
        let inner = erode(mask, w, h, (lw / 2).max(1));
        for (p, on) in mask.iter().enumerate() {
            if *on {
                let px = out.get_pixel_mut((p % w) as u32, (p / w) as u32);
                if inner[p] {
                    for k in 0..3 {
                        px[k] = ((px[k] as f32) * 0.55 + color[k] as f32 * 0.45) as u8;
                    }
                } else {
                    *px = image::Rgb(color);
                }
            }
        }
    }
    draw_box(out, bbox, lw, |_| color);
}

/// A box prompt: a dashed outline, white and black dashes four line widths long, visible on
/// any background.
pub fn draw_dashed_box(out: &mut image::RgbImage, bbox: [f32; 4]) {
    let lw = line_width(out.width() as usize, out.height() as usize);
    let dash = 4 * lw as i64;
    draw_box(out, bbox, lw, |along| if (along / dash) % 2 == 0 { [255, 255, 255] } else { [0, 0, 0] });
}

/// Outline an [x0, y0, x1, y1] pixel box `width` px wide, inwards; `color` gets the distance
/// along the outline.
fn draw_box(out: &mut image::RgbImage, bbox: [f32; 4], width: usize, color: impl Fn(i64) -> [u8; 3]) {
    let (w, h) = (out.width() as i64, out.height() as i64);
    let [x0, y0, x1, y1] = bbox.map(|v| v.round() as i64);
    let mut put = |x: i64, y: i64, along: i64| {
        if x >= 0 && y >= 0 && x < w && y < h {
            out.put_pixel(x as u32, y as u32, image::Rgb(color(along)));
        }
    };
    for t in 0..width as i64 {
        for x in x0..=x1 {
            put(x, y0 + t, x - x0);
            put(x, y1 - t, x - x0);
        }
        for y in y0..=y1 {
            put(x0 + t, y, y - y0);
            put(x1 - t, y, y - y0);
        }
    }
}

/// Erode a row-major `w`×`h` mask by a (2r+1)² square (pixels outside the image count as set,
/// so a mask at the border is not outlined along it): what stays is the mask's interior, the
/// rest of the mask its outline, `r` px wide. Separable, linear in the pixels.
fn erode(mask: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    // Pass 1: set where the row window [x - r, x + r] holds no unset pixel; pass 2: the same
    // down the columns of pass 1.
    let pass = |src: &[bool], len: usize, lines: usize, at: &dyn Fn(usize, usize) -> usize| {
        let mut dst = vec![false; src.len()];
        let mut unset_before = vec![0usize; len + 1];
        for line in 0..lines {
            for i in 0..len {
                unset_before[i + 1] = unset_before[i] + usize::from(!src[at(line, i)]);
            }
            for i in 0..len {
                let (a, b) = (i.saturating_sub(r), (i + r + 1).min(len));
                dst[at(line, i)] = unset_before[b] == unset_before[a];
            }
        }
        dst
    };
    let rows = pass(mask, w, h, &|y, x| y * w + x);
    pass(&rows, h, w, &|x, y| y * w + x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One prompt: 255 on every detection's pixels; several: the number of the prompt whose
    /// detection scores best at each pixel.
    #[test]
    fn mask_image_marks_detections_and_the_best_prompt() {
        let (w, h) = (4, 3);
        let det = |score: f32, on: &[usize]| {
            let mut m = vec![false; w * h];
            on.iter().for_each(|&i| m[i] = true);
            Detection {
                score,
                bbox: [0.0; 4],
                bbox_xywh: [0.0; 4],
                query: 0,
                segmentation: rle_encode(&m, h, w),
                area: on.len() as u64,
            }
        };
        let a = [det(0.9, &[0, 1]), det(0.6, &[5])];
        let b = [det(0.7, &[1, 2, 11])];
        let one = mask_image(&[&a], w, h);
        assert_eq!(one, [255, 255, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0]);
        let two = mask_image(&[&a, &b], w, h);
        // Pixel 1: prompt 1 scores 0.9 there, prompt 2 0.7.
        assert_eq!(two, [1, 1, 2, 0, 0, 1, 0, 0, 0, 0, 0, 2]);
        let b_first = mask_image(&[&b, &a], w, h);
        assert_eq!(b_first, [2, 2, 1, 0, 0, 2, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn rle_roundtrip_and_column_major() {
        // 2x3 mask: row0 = 1 0 0, row1 = 1 1 0 -> column-major 1,1 | 0,1 | 0,0
        let mask = [true, false, false, true, true, false];
        let rle = rle_encode(&mask, 2, 3);
        assert_eq!(rle.counts, vec![0, 2, 1, 1, 2]);
        assert_eq!(rle_decode(&rle), mask.to_vec());
    }

    /// detections.json writes masks as COCO compressed RLE, byte-identical to pycocotools 2.0.11:
    /// `mask.encode(np.asfortranarray(m))` of the 12x10 mask below gives
    /// `b'`0382N2O0001NNLO22N60M2'` (area 43), and of a 300x200 mask with rows 20..280 × cols
    /// 15..190 set and rows 100..110 × cols 50..60 cleared the 418-byte string rebuilt here
    /// (area 45400): multi-group counts and negative deltas.
    #[test]
    fn detections_json_masks_are_pycocotools_compressed_rle() {
        let (h, w) = (12usize, 10usize);
        let mask: Vec<bool> = (0..h * w)
            .map(|p| {
                let (y, x) = ((p / w) as i64, (p % w) as i64);
                (x - 4).pow(2) + (y - 5).pow(2) <= 12 || (y == 0 && x >= 7) || (x == 9 && y > 8)
            })
            .collect();
        let rle = rle_encode(&mask, h, w);
        assert_eq!(rle.compressed_counts(), "`0382N2O0001NNLO22N60M2");
        assert_eq!(mask.iter().filter(|b| **b).count(), 43);
        let back = Rle::from_compressed([h, w], "`0382N2O0001NNLO22N60M2").unwrap();
        assert_eq!(rle_decode(&back), mask);

        let (h, w) = (300usize, 200usize);
        let mask: Vec<bool> = (0..h * w)
            .map(|p| {
                let (y, x) = (p / w, p % w);
                (20..280).contains(&y)
                    && (15..190).contains(&x)
                    && !((100..110).contains(&y) && (50..60).contains(&x))
            })
            .collect();
        let want =
            format!("X]4T8X1{}\\JROj2n0{}j2{}Tm2", "0".repeat(68), "VMROj2n0".repeat(9), "0".repeat(258));
        assert_eq!(want.len(), 418);
        let rle = rle_encode(&mask, h, w);
        assert_eq!(rle.compressed_counts(), want);
        assert_eq!(rle_decode(&Rle::from_compressed([h, w], &want).unwrap()), mask);
        assert!(Rle::from_compressed([h, w + 1], &want).is_err(), "counts must cover the mask");

        // In a detection's JSON: the string form, beside the boxes, area and score.
        let d = Detection {
            score: 0.5,
            bbox: [15.0, 20.0, 190.0, 280.0],
            bbox_xywh: [15.0, 20.0, 175.0, 260.0],
            query: 3,
            segmentation: rle,
            area: 45400,
        };
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["segmentation"], serde_json::json!({"size": [300, 200], "counts": want}));
        assert_eq!(j["bbox"], serde_json::json!([15.0, 20.0, 175.0, 260.0]));
        assert_eq!(j["bbox_xyxy"], serde_json::json!([15.0, 20.0, 190.0, 280.0]));
        assert_eq!((j["area"].as_u64(), j["score"].as_f64()), (Some(45400), Some(0.5)));
    }

    /// Overlay lines scale with the image (2 px on small images, a 300th of the shorter side on
    /// large ones), masks get an outline in their colour, box prompts are drawn dashed.
    #[test]
    fn overlay_lines_scale_with_the_image_and_box_prompts_are_drawn() {
        assert_eq!(line_width(90, 60), 2);
        assert_eq!(line_width(4032, 3024), 10);
        assert_eq!(line_width(3024, 4032), 10);
        let (w, h) = (1200usize, 900usize);
        assert_eq!(line_width(w, h), 3);
        let img = image::RgbImage::from_pixel(w as u32, h as u32, image::Rgb([100, 100, 100]));
        let mask: Vec<bool> =
            (0..w * h).map(|p| (200..400).contains(&(p / w)) && (300..600).contains(&(p % w))).collect();
        let d = Detection {
            score: 0.9,
            bbox: [280.0, 180.0, 620.0, 420.0],
            bbox_xywh: [280.0, 180.0, 340.0, 240.0],
            query: 0,
            segmentation: rle_encode(&mask, h, w),
            area: 60000,
        };
        let out = overlay_prompts(&img, &[&[d]], &[[50.0, 60.0, 800.0, 700.0]]);
        let c = PALETTE[0];
        // The detection's box: 3 px wide, inwards.
        for t in 0..3 {
            assert_eq!(out.get_pixel(450, 180 + t).0, c, "box row {t}");
        }
        assert_eq!(out.get_pixel(450, 183).0, [100, 100, 100]);
        // The mask: an outline in its colour (1 px: half the line width), a tinted interior.
        assert_eq!(out.get_pixel(450, 200).0, c);
        assert_eq!(out.get_pixel(300, 300).0, c);
        let inside = out.get_pixel(450, 201).0;
        assert!(inside != c && inside != [100, 100, 100], "{inside:?}");
        // The box prompt: dashed white and black, 3 px.
        let top: Vec<[u8; 3]> = (50..800).map(|x| out.get_pixel(x, 62).0).collect();
        assert!(top.iter().all(|p| *p == [255, 255, 255] || *p == [0, 0, 0]), "not a dashed line");
        assert!(top.contains(&[255, 255, 255]) && top.contains(&[0, 0, 0]));
        assert_eq!(out.get_pixel(100, 63).0, [100, 100, 100], "3 px wide only");
        // Several prompts: a colour per prompt.
        let d2 = |q| Detection { query: q, ..detection_at(10, 10) };
        let two = overlay_prompts(&img, &[&[d2(0), d2(1)], &[]], &[]);
        assert_eq!(two.get_pixel(15, 10).0, PALETTE[0], "several prompts: the first prompt's colour");
        let one = overlay_prompts(&img, &[&[d2(0), d2(1)]], &[]);
        assert_eq!(one.get_pixel(15, 10).0, PALETTE[1], "one prompt: a colour per detection");
    }

    fn detection_at(x: usize, y: usize) -> Detection {
        Detection {
            score: 0.9,
            bbox: [x as f32, y as f32, x as f32 + 20.0, y as f32 + 20.0],
            bbox_xywh: [x as f32, y as f32, 20.0, 20.0],
            query: 0,
            segmentation: Rle { size: [1, 1], counts: vec![1] },
            area: 0,
        }
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
