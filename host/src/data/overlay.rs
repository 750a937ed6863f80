//! Ground-truth overlays: the images as training sees them (resized to the model's square
//! input, and also augmented when augmentation is on) with the targets training builds for
//! them drawn on top: each prompt's boxes and masks in the prompt's colour.
//!
//! This is the check people did by hand with SAM3_LoRA's `verify_gt_transforms.py`: boxes
//! written as [x0, y0, x1, y1] (F5), pixel boxes read as normalized ones (F4), masks rotated
//! against their image (F24) or labels of the wrong class (F6, D8) are obvious in a picture
//! and easy to miss in numbers. `lorahost doctor --gt-overlays DIR` writes them.

use super::augment::{Augmentation, Draw};
use super::batch::{build_sample, Sample, SampleOptions};
use super::coco::Split;
use super::DataError;
use crate::sam3::postprocess::{draw_instance, PALETTE};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One written overlay and what is drawn on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlayRecord {
    /// The PNG written.
    pub file: PathBuf,
    /// The split.
    pub split: String,
    /// The source image.
    pub image: PathBuf,
    /// COCO image id.
    pub image_id: u64,
    /// The decoded image's (width, height) before resizing.
    pub original_size: (u32, u32),
    /// Whether this is the augmented variant (every transform of `training.augment` at a
    /// visible setting).
    pub augmented: bool,
    /// The prompts of the image: positives with their objects, and the negatives drawn.
    pub queries: Vec<OverlayQuery>,
}

/// An image whose overlay could not be drawn (it cannot be read or decoded): listed in the
/// index with the error, and skipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlayFailure {
    /// The split.
    pub split: String,
    /// The source image.
    pub image: PathBuf,
    /// COCO image id.
    pub image_id: u64,
    /// Why it could not be drawn.
    pub error: String,
}

/// One entry of the overlay index (`overlays.json`): a written overlay, or an image skipped with
/// its error (serialized without a tag: a failure has `error` and no `file`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OverlayEntry {
    /// An overlay written.
    Written(OverlayRecord),
    /// An image that could not be drawn.
    Failed(OverlayFailure),
}

impl OverlayEntry {
    /// The written overlay, if this is one.
    pub fn written(&self) -> Option<&OverlayRecord> {
        match self {
            Self::Written(w) => Some(w),
            Self::Failed(_) => None,
        }
    }

    /// The failure, if this is one.
    pub fn failed(&self) -> Option<&OverlayFailure> {
        match self {
            Self::Failed(f) => Some(f),
            Self::Written(_) => None,
        }
    }
}

/// One prompt on an overlay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlayQuery {
    /// The text prompt.
    pub prompt: String,
    /// The colour its objects are drawn in (RGB; none for a negative prompt).
    pub color: Option<[u8; 3]>,
    /// A negative prompt (no object: nothing drawn).
    pub negative: bool,
    /// Objects drawn.
    pub objects: usize,
    /// Of them, objects without a usable mask (drawn as a box only; they get no mask loss).
    pub box_only: usize,
}

/// The sample's model input as an RGB picture, and its side.
fn input_picture(sample: &Sample) -> (image::RgbImage, usize) {
    let pv = sample.pixel_values.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap_or_default();
    let s = (pv.len() / 3).isqrt();
    let hw = s * s;
    let img = image::RgbImage::from_fn(s as u32, s as u32, |x, y| {
        let p = y as usize * s + x as usize;
        let c = |k: usize| ((pv[k * hw + p] + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
        image::Rgb([c(0), c(1), c(2)])
    });
    (img, s)
}

/// An `m`×`m` mask nearest-upsampled to `s`×`s`.
fn upsample(mask: &[bool], m: usize, s: usize) -> Vec<bool> {
    (0..s * s).map(|p| mask[(p / s) * m / s * m + (p % s) * m / s]).collect()
}

/// Draw one query's targets (boxes, and masks where valid) on a picture of side `s`.
fn draw_targets(
    img: &mut image::RgbImage,
    q: &super::batch::QueryTarget,
    s: usize,
    m: usize,
    color: [u8; 3],
) {
    for (g, b) in q.boxes.iter().enumerate() {
        let valid = q.mask_valid.get(g).copied().unwrap_or(false);
        let mask = (valid && q.masks.len() >= (g + 1) * m * m)
            .then(|| upsample(&q.masks[g * m * m..(g + 1) * m * m], m, s));
        let sf = s as f32;
        let xyxy = [
            (b[0] - b[2] / 2.0) * sf,
            (b[1] - b[3] / 2.0) * sf,
            (b[0] + b[2] / 2.0) * sf,
            (b[1] + b[3] / 2.0) * sf,
        ];
        draw_instance(img, mask.as_deref(), xyxy, color);
    }
}

/// The sample as an RGB picture of the model input with its targets drawn: boxes from the
/// normalized CxCyWH targets, masks nearest-upsampled from the `mask_size` targets.
pub fn render(sample: &Sample, mask_size: usize, colors: &BTreeMap<String, [u8; 3]>) -> image::RgbImage {
    let (mut img, s) = input_picture(sample);
    for q in sample.queries.iter().filter(|q| !q.negative) {
        draw_targets(&mut img, q, s, mask_size, colors.get(&q.prompt).copied().unwrap_or(PALETTE[0]));
    }
    img
}

/// A validation panel for TensorBoard: the model input with `prompt`'s ground truth (left) and,
/// beside it, the model's detections for that prompt scoring `threshold` or more (right, each
/// in its own colour with its mask's bounding box), each half scaled to `side` px.
/// `predictions` are at the `mask_size` resolution.
pub fn prediction_panel(
    sample: &Sample,
    prompt: &str,
    predictions: &[crate::evaluation::Prediction],
    mask_size: usize,
    threshold: f32,
    side: u32,
) -> image::RgbImage {
    let (plain, s) = input_picture(sample);
    let m = mask_size;
    let mut truth = plain.clone();
    for q in sample.queries.iter().filter(|q| !q.negative && q.prompt == prompt) {
        draw_targets(&mut truth, q, s, m, PALETTE[0]);
    }
    let mut found = plain;
    for (k, p) in predictions.iter().filter(|p| p.score >= threshold && p.mask.len() == m * m).enumerate() {
        let mask = upsample(&p.mask, m, s);
        let on: Vec<(usize, usize)> = (0..s * s).filter(|&i| mask[i]).map(|i| (i % s, i / s)).collect();
        let Some(x0) = on.iter().map(|p| p.0).min() else { continue };
        let x1 = on.iter().map(|p| p.0).max().unwrap_or(x0) + 1;
        let y0 = on.iter().map(|p| p.1).min().unwrap_or(0);
        let y1 = on.iter().map(|p| p.1).max().unwrap_or(y0) + 1;
        draw_instance(
            &mut found,
            Some(&mask),
            [x0 as f32, y0 as f32, x1 as f32, y1 as f32],
            PALETTE[1 + k % (PALETTE.len() - 1)],
        );
    }
    let side = side.max(1);
    let scale = |img: &image::RgbImage| {
        image::imageops::resize(img, side, side, image::imageops::FilterType::Triangle)
    };
    const GAP: u32 = 4;
    let mut panel = image::RgbImage::from_pixel(2 * side + GAP, side, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut panel, &scale(&truth), 0, 0);
    image::imageops::replace(&mut panel, &scale(&found), i64::from(side + GAP), 0);
    panel
}

/// Write overlays of `count` images of `split` (spread evenly over it) into `dir`, each as
/// training builds it with `base` (its augmentation fields are set here: plain, and when
/// `augment` is on also with every transform it has at a visible setting,
/// [`Augmentation::showcase`]). Colours follow the split's prompts in name order.
/// An image whose sample cannot be built (unreadable, undecodable) becomes an
/// [`OverlayEntry::Failed`] and the others are still drawn; only an output that cannot be
/// written is an error.
pub fn write_overlays(
    split: &Split,
    base: &SampleOptions,
    count: usize,
    augment: &Augmentation,
    dir: &Path,
) -> Result<Vec<OverlayEntry>, DataError> {
    let io =
        |path: &Path, e: std::io::Error| DataError::Io { path: path.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut prompts: Vec<&str> = split.categories.iter().map(|c| c.prompt.as_str()).collect();
    prompts.sort_unstable();
    prompts.dedup();
    let colors: BTreeMap<String, [u8; 3]> =
        prompts.iter().enumerate().map(|(i, p)| (p.to_string(), PALETTE[i % PALETTE.len()])).collect();
    let n = split.images.len();
    let count = count.min(n);
    let mut picked: Vec<usize> = (0..count).map(|i| i * n / count.max(1)).collect();
    picked.dedup();
    let mut out = Vec::new();
    for index in picked {
        let variants: &[Draw] =
            if augment.is_on() { &[Draw::NONE, augment.showcase()] } else { &[Draw::NONE] };
        for (variant, draw) in variants.iter().enumerate() {
            let augmented = variant > 0;
            let opts = base.augmented(draw);
            let im = &split.images[index];
            let sample = match build_sample(split, index, &opts) {
                Ok(s) => s,
                Err(e) => {
                    out.push(OverlayEntry::Failed(OverlayFailure {
                        split: split.name.clone(),
                        image: im.path.clone(),
                        image_id: im.id,
                        error: e.to_string(),
                    }));
                    // The augmented variant of an unreadable image fails the same way.
                    break;
                }
            };
            let img = render(&sample, opts.mask_size, &colors);
            let stem = im.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let name = format!(
                "{}_{index:04}_{}{}.png",
                split.name,
                sanitize(&stem),
                if augmented { "_augmented" } else { "" }
            );
            let file = dir.join(name);
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| DataError::Io { path: file.clone(), reason: e.to_string() })?;
            crate::fsutil::write_atomic(&file, &png).map_err(|e| io(&file, e))?;
            out.push(OverlayEntry::Written(OverlayRecord {
                file,
                split: split.name.clone(),
                image: im.path.clone(),
                image_id: im.id,
                original_size: sample.original_size,
                augmented,
                queries: sample
                    .queries
                    .iter()
                    .map(|q| OverlayQuery {
                        prompt: q.prompt.clone(),
                        color: (!q.negative).then(|| colors.get(&q.prompt).copied().unwrap_or(PALETTE[0])),
                        negative: q.negative,
                        objects: q.boxes.len(),
                        box_only: q.mask_valid.iter().filter(|v| !**v).count(),
                    })
                    .collect(),
            }));
        }
    }
    Ok(out)
}

/// A file-name-safe version of an image's stem.
pub(crate) fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(60)
        .collect();
    if t.is_empty() {
        "image".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::coco::Dataset;
    use crate::data::synthetic::{write_synthetic, SyntheticSpec};

    /// A validation panel: the truth (red) on the left half, each detection at or above the
    /// threshold on the right in its own colour, inside its mask's box; one below it not drawn.
    #[test]
    fn prediction_panels_put_truth_and_detections_side_by_side() {
        use crate::data::batch::QueryTarget;
        use crate::evaluation::Prediction;
        let (s, m) = (32usize, 8usize);
        let pixel_values =
            candle_core::Tensor::zeros((1, 3, s, s), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        // Truth: the mask's top-left quarter, box [0, 0.5]².
        let truth: Vec<bool> = (0..m * m).map(|i| i % m < m / 2 && i / m < m / 2).collect();
        let q = QueryTarget {
            image_index: 0,
            prompt: "crack".into(),
            negative: false,
            ann_ids: vec![1],
            boxes: vec![[0.25, 0.25, 0.5, 0.5]],
            masks: truth,
            mask_valid: vec![true],
        };
        let sample = Sample {
            image_id: 3,
            pixel_values,
            original_size: (s as u32, s as u32),
            flipped: false,
            queries: vec![q],
        };
        // A detection in the bottom-right quarter (score 0.9) and one in the top-left (0.3).
        let quarter = |right: bool| -> Vec<bool> {
            (0..m * m).map(|i| ((i % m >= m / 2) == right) && ((i / m >= m / 2) == right)).collect()
        };
        let preds =
            [Prediction { score: 0.9, mask: quarter(true) }, Prediction { score: 0.3, mask: quarter(false) }];
        let side = 64u32;
        let panel = prediction_panel(&sample, "crack", &preds, m, 0.5, side);
        assert_eq!(panel.dimensions(), (2 * side + 4, side));
        let near = |p: &image::Rgb<u8>, c: [u8; 3]| p.0.iter().zip(c).all(|(a, b)| a.abs_diff(b) < 40);
        // Pixels of colour `c` in the `n`-wide square at (x0, y0).
        let count = |x0: u32, y0: u32, n: u32, c: [u8; 3]| {
            (x0..x0 + n)
                .flat_map(|x| (y0..y0 + n).map(move |y| (x, y)))
                .filter(|&(x, y)| near(panel.get_pixel(x, y), c))
                .count()
        };
        let (right, h) = (side + 4, side / 2);
        assert!(count(0, 0, h, PALETTE[0]) > 100, "truth in the left half's top-left quarter");
        assert_eq!(
            count(h + 4, h + 4, h - 4, PALETTE[0]),
            0,
            "none in the other corner (past the resampled edge)"
        );
        assert!(count(right + h, h, h, PALETTE[1]) > 100, "the 0.9 detection");
        assert_eq!(
            count(right, 0, h, PALETTE[1]) + count(right, 0, h, PALETTE[2]),
            0,
            "the 0.3 one is not drawn"
        );
    }

    /// The drawn pixels are where the annotations are: each box outline lies on the box the COCO
    /// file gives (scaled to the model input), in its prompt's colour, and mask tint only inside
    /// it; the augmented variant is mirrored and zoomed out.
    #[test]
    fn overlays_draw_the_annotated_boxes_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        write_synthetic(
            &data,
            &SyntheticSpec { seed: 3, train_images: 3, valid_images: 1, size: 96, max_cracks: 2 },
        )
        .unwrap();
        let ds = Dataset::load(&data).unwrap();
        let split = ds.split("train").unwrap();
        let base = SampleOptions::plain(64, 16, 1, 7);
        let out = dir.path().join("ov");
        let recs: Vec<OverlayRecord> = write_overlays(split, &base, 2, &Augmentation::DEFAULT, &out)
            .unwrap()
            .iter()
            .map(|e| e.written().unwrap().clone())
            .collect();
        assert_eq!(recs.len(), 4);
        let rec = &recs[0];
        let img = image::open(&rec.file).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        let im = &split.images[0];
        let (w, h) = rec.original_size;
        let positives: Vec<&OverlayQuery> = rec.queries.iter().filter(|q| !q.negative).collect();
        assert!(!positives.is_empty());
        let near = |o: &crate::data::coco::Object, x: u32, y: u32| {
            let b = o.bbox_xywh;
            let (sx, sy) = (64.0 / w as f64, 64.0 / h as f64);
            let (x, y) = (x as f64 + 0.5, y as f64 + 0.5);
            // A mask cell is 64 / 16 = 4 pixels wide: its tint may pass the box edge by one cell.
            let t = 5.0;
            x >= b[0] * sx - t
                && x <= (b[0] + b[2]) * sx + t
                && y >= b[1] * sy - t
                && y <= (b[1] + b[3]) * sy + t
        };
        let mut checked = 0;
        for (i, o) in im.objects.iter().enumerate() {
            let cat = split.category(o.category_id).unwrap();
            let color = colors_of(rec, &cat.prompt);
            // The box's top-left corner in model-input pixels carries the prompt's colour
            // (unless another object is drawn near it).
            let x0 = (o.bbox_xywh[0] / w as f64 * 64.0).round().clamp(0.0, 63.0) as u32;
            let y0 = (o.bbox_xywh[1] / h as f64 * 64.0).round().clamp(0.0, 63.0) as u32;
            if im.objects.iter().enumerate().any(|(j, p)| j != i && near(p, x0, y0)) {
                continue;
            }
            assert_eq!(img.get_pixel(x0, y0).0, color, "box corner of annotation {}", o.ann_id);
            checked += 1;
        }
        assert!(checked > 0);
        // Nothing drawn outside every box.
        let inside = |x: u32, y: u32| im.objects.iter().any(|o| near(o, x, y));
        let plain = crate::imageio::to_pixel_values(
            &crate::imageio::load_rgb_for_annotations(&im.path, im.json_size).unwrap().0,
            64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let sample = Sample {
            image_id: 0,
            pixel_values: plain,
            original_size: (w, h),
            flipped: false,
            queries: Vec::new(),
        };
        let bare = render(&sample, 16, &BTreeMap::new());
        for (x, y, p) in img.enumerate_pixels() {
            if !inside(x, y) {
                assert_eq!(p, bare.get_pixel(x, y), "pixel ({x}, {y}) changed outside every box");
            }
        }
        assert_ne!(img, bare, "nothing drawn");
        // The augmented variant: same image, flipped and zoomed out, named as such.
        assert!(recs[1].augmented && recs[1].file.to_string_lossy().contains("_augmented"));
        assert_eq!(recs[1].image_id, rec.image_id);
    }

    fn colors_of(rec: &OverlayRecord, prompt: &str) -> [u8; 3] {
        rec.queries.iter().find(|q| q.prompt == prompt).and_then(|q| q.color).unwrap()
    }
}
