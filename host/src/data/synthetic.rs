//! A bundled, deterministic synthetic dataset in the Roboflow COCO layout: small PNGs of thin,
//! dark, crack-like strokes (random polyline walks, 1–3 px wide) on textured backgrounds
//! (gradient + noise), plus brownish elliptical "stain" blobs on some images so that hard
//! negatives exist. Crack masks are RLE (uncompressed counts on even images, compressed strings
//! on odd ones), stain masks are polygons. The same spec gives byte-identical files.

use super::{rle, DataError, SplitMix64};
use crate::sam3::postprocess::rle_encode;
use serde_json::{json, Value};
use std::path::Path;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// Seed: everything derives from it.
    pub seed: u64,
    /// Images in `train/`.
    pub train_images: usize,
    /// Images in `valid/` (0: no valid split).
    pub valid_images: usize,
    /// Square image side in pixels, 32..=512.
    pub size: u32,
    /// Most cracks per image (at least 1 per image).
    pub max_cracks: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self { seed: 0, train_images: 8, valid_images: 4, size: 96, max_cracks: 2 }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSummary {
    /// Images written per split (train, valid).
    pub images: Vec<(String, usize)>,
    /// Annotations written in total.
    pub annotations: usize,
}

/// One generated annotation: category id, full-resolution mask, COCO segmentation JSON.
type GeneratedAnnotation = (u64, Vec<bool>, Value);

const CATEGORIES: [(u64, &str); 2] = [(0, "crack"), (1, "stain")];

fn write(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::fsutil::write_atomic(path, bytes)
        .map_err(|e| DataError::Io { path: path.into(), reason: format!("{e} (is the folder writable?)") })
}

/// Mask pixels within `r` of the segment (ax, ay)–(bx, by), measured at pixel centers.
fn stamp_segment(mask: &mut [bool], n: usize, a: (f64, f64), b: (f64, f64), r: f64) {
    let (minx, maxx) = (a.0.min(b.0) - r, a.0.max(b.0) + r);
    let (miny, maxy) = (a.1.min(b.1) - r, a.1.max(b.1) + r);
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let clampi = |v: f64| (v.max(0.0) as usize).min(n);
    for y in clampi(miny.floor())..clampi(maxy.ceil() + 1.0) {
        for x in clampi(minx.floor())..clampi(maxx.ceil() + 1.0) {
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let t =
                if len2 > 0.0 { (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            let (qx, qy) = (a.0 + t * dx - px, a.1 + t * dy - py);
            if qx * qx + qy * qy <= r * r {
                mask[y * n + x] = true;
            }
        }
    }
}

/// Generate one image: RGB bytes and its annotations (category id, mask, segmentation JSON).
fn generate_image(
    rng: &mut SplitMix64,
    n: usize,
    max_cracks: usize,
    compressed: bool,
) -> (Vec<u8>, Vec<GeneratedAnnotation>) {
    // Background: a linear gradient in a random direction, a base tone, and per-pixel noise.
    let base = 120.0 + rng.next_f64() * 80.0;
    let (gx, gy) = (rng.next_f64() * 2.0 - 1.0, rng.next_f64() * 2.0 - 1.0);
    let mut rgb = vec![0u8; n * n * 3];
    for y in 0..n {
        for x in 0..n {
            let g = base + 30.0 * (gx * x as f64 + gy * y as f64) / n as f64 + (rng.next_f64() - 0.5) * 24.0;
            for c in 0..3 {
                rgb[(y * n + x) * 3 + c] = (g + c as f64 * 4.0).clamp(0.0, 255.0) as u8;
            }
        }
    }
    let mut anns = Vec::new();
    // Stains first (cracks are drawn over them): on about half of the images.
    if rng.next_f64() < 0.5 {
        let (cx, cy) = (n as f64 * (0.25 + rng.next_f64() * 0.5), n as f64 * (0.25 + rng.next_f64() * 0.5));
        let (rx, ry) = (n as f64 * (0.08 + rng.next_f64() * 0.1), n as f64 * (0.08 + rng.next_f64() * 0.1));
        let poly: Vec<f64> = (0..16)
            .flat_map(|k| {
                let a = k as f64 * std::f64::consts::TAU / 16.0;
                [((cx + rx * a.cos()) * 10.0).round() / 10.0, ((cy + ry * a.sin()) * 10.0).round() / 10.0]
            })
            .collect();
        if let Ok(mask) = rle::rasterize_polygons(std::slice::from_ref(&poly), n, n) {
            for (i, _) in mask.iter().enumerate().filter(|(_, b)| **b) {
                rgb[i * 3] = rgb[i * 3].saturating_sub(20);
                rgb[i * 3 + 1] = rgb[i * 3 + 1].saturating_sub(45);
                rgb[i * 3 + 2] = rgb[i * 3 + 2].saturating_sub(70);
            }
            anns.push((1, mask, json!([poly])));
        }
    }
    let cracks = 1 + rng.below(max_cracks.max(1));
    for _ in 0..cracks {
        let mut mask = vec![false; n * n];
        let r = 0.5 + rng.below(3) as f64 * 0.5; // width 1, 2 or 3 px
        let mut p = (n as f64 * (0.1 + rng.next_f64() * 0.8), n as f64 * (0.1 + rng.next_f64() * 0.8));
        let mut dir = rng.next_f64() * std::f64::consts::TAU;
        let steps = 4 + rng.below(6);
        for _ in 0..steps {
            dir += (rng.next_f64() - 0.5) * 1.2;
            let len = n as f64 * (0.05 + rng.next_f64() * 0.1);
            let q = (
                (p.0 + len * dir.cos()).clamp(1.0, n as f64 - 1.0),
                (p.1 + len * dir.sin()).clamp(1.0, n as f64 - 1.0),
            );
            stamp_segment(&mut mask, n, p, q, r);
            p = q;
        }
        let dark = 25.0 + rng.next_f64() * 35.0;
        for (i, _) in mask.iter().enumerate().filter(|(_, b)| **b) {
            for c in 0..3 {
                rgb[i * 3 + c] = (dark + c as f64 * 3.0) as u8;
            }
        }
        let counts = rle_encode(&mask, n, n).counts;
        let seg = if compressed {
            json!({"size": [n, n], "counts": rle::encode_compressed_counts(&counts)})
        } else {
            json!({"size": [n, n], "counts": counts})
        };
        anns.push((0, mask, seg));
    }
    (rgb, anns)
}

/// Write the synthetic dataset under `dir` (`train/`, and `valid/` if `valid_images > 0`), each
/// with PNGs and `_annotations.coco.json`, every file written atomically.
pub fn write_synthetic(dir: &Path, spec: &SyntheticSpec) -> Result<SyntheticSummary, DataError> {
    if !(32..=512).contains(&spec.size) {
        return Err(DataError::Invalid {
            what: "synthetic size",
            reason: format!("{} (use 32..=512)", spec.size),
        });
    }
    if spec.train_images == 0 {
        return Err(DataError::Invalid {
            what: "synthetic train_images",
            reason: "0 (use at least 1)".into(),
        });
    }
    let n = spec.size as usize;
    let mut summary = SyntheticSummary { images: Vec::new(), annotations: 0 };
    for (si, (split, count)) in
        [("train", spec.train_images), ("valid", spec.valid_images)].into_iter().enumerate()
    {
        if count == 0 {
            continue;
        }
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        for i in 0..count {
            let mut rng = SplitMix64::from_parts(&[spec.seed, si as u64, i as u64]);
            let (rgb, anns) = generate_image(&mut rng, n, spec.max_cracks, i % 2 == 1);
            let file_name = format!("synth_{split}_{i:04}.png");
            let img = image::RgbImage::from_raw(spec.size, spec.size, rgb).ok_or_else(|| {
                DataError::Invalid { what: "synthetic image", reason: "internal buffer size mismatch".into() }
            })?;
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(img)
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| DataError::Io {
                    path: dir.join(split).join(&file_name),
                    reason: e.to_string(),
                })?;
            write(&dir.join(split).join(&file_name), &png)?;
            images.push(json!({"id": i, "file_name": file_name, "width": n, "height": n}));
            for (cat, mask, seg) in anns {
                let Some(bbox) = super::mask_bounds(&mask, n) else { continue };
                let area = mask.iter().filter(|b| **b).count();
                annotations.push(json!({
                    "id": annotations.len(), "image_id": i, "category_id": cat, "bbox": bbox,
                    "area": area, "segmentation": seg, "iscrowd": 0
                }));
            }
        }
        summary.annotations += annotations.len();
        summary.images.push((split.to_string(), count));
        let cats: Vec<Value> = CATEGORIES
            .iter()
            .map(|(id, name)| json!({"id": id, "name": name, "supercategory": "defects"}))
            .collect();
        let doc = json!({
            "info": {"description": format!("lorahost synthetic cracks, seed {}", spec.seed)},
            "images": images, "annotations": annotations, "categories": cats
        });
        let mut bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|e| DataError::Invalid { what: "synthetic json", reason: e.to_string() })?;
        bytes.push(b'\n');
        write(&dir.join(split).join(super::coco::ANNOTATION_FILE), &bytes)?;
    }
    Ok(summary)
}
