//! Building model inputs and targets from a [`Split`]: the image resized to the square model
//! size and normalized (as SAM3, aspect ratio not preserved), optional flips and zoom-out applied to
//! pixels, boxes and masks together, per-query targets with boxes in normalized CxCyWH and masks
//! nearest-resized to the mask resolution; then stacking samples into a batch.

use super::coco::{Query, Split};
use super::DataError;
use candle_core::{Device, Tensor};

/// How to build a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Square model input size (SAM3: 1008).
    pub image_size: usize,
    /// Square GT mask size.
    pub mask_size: usize,
    /// Hard negatives per image.
    pub num_negatives: usize,
    /// Seed for negatives.
    pub seed: u64,
    /// Flip this sample horizontally (the caller decides, e.g. from a seeded coin).
    pub hflip: bool,
    /// Flip this sample vertically.
    pub vflip: bool,
    /// Zoom-out augmentation (Meta's random resize + pad to a square): the image, boxes and
    /// masks are shrunk by this factor into the top-left corner of the square input and the
    /// rest is padding (0 after normalization). 1.0 = none; valid range (0, 1].
    pub scale: f64,
    /// Contrast factor applied to the normalized content around mid-grey (1.0 = none).
    pub contrast: f32,
    /// Brightness shift added to the normalized content (0.0 = none); the result is clamped
    /// to [-1, 1], the range of real pixels.
    pub brightness: f32,
}

impl SampleOptions {
    /// Options without augmentation.
    pub fn plain(image_size: usize, mask_size: usize, num_negatives: usize, seed: u64) -> Self {
        SampleOptions {
            image_size,
            mask_size,
            num_negatives,
            seed,
            hflip: false,
            vflip: false,
            scale: 1.0,
            contrast: 1.0,
            brightness: 0.0,
        }
    }

    /// These options with an augmentation draw applied.
    pub fn augmented(self, d: &super::augment::Draw) -> Self {
        SampleOptions {
            hflip: d.hflip,
            vflip: d.vflip,
            scale: d.scale,
            contrast: d.contrast,
            brightness: d.brightness,
            ..self
        }
    }
}

/// Reverse the order of the rows (of width `w`) of a row-major mask: a vertical flip.
fn flip_rows(mask: &mut [bool], w: usize) {
    let h = mask.len() / w.max(1);
    for y in 0..h / 2 {
        let (top, bottom) = mask.split_at_mut((h - 1 - y) * w);
        top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
    }
}

/// Put a (k, k) mask into the top-left corner of an (m, m) one.
fn place_mask(small: &[bool], k: usize, m: usize) -> Vec<bool> {
    let mut out = vec![false; m * m];
    for y in 0..k.min(m) {
        out[y * m..y * m + k.min(m)].copy_from_slice(&small[y * k..y * k + k.min(m)]);
    }
    out
}

/// Targets of one query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryTarget {
    /// Index of the image (pixel tensor) in the batch; 0 for a single sample.
    pub image_index: usize,
    /// Text prompt.
    pub prompt: String,
    /// Whether it is a hard negative (no targets).
    pub negative: bool,
    /// COCO annotation ids of the targets, in order.
    pub ann_ids: Vec<u64>,
    /// Boxes (G) as [cx, cy, w, h] in [0, 1], clipped to the image.
    pub boxes: Vec<[f32; 4]>,
    /// Masks (G × mask_size × mask_size) row-major; an object without a usable segmentation
    /// (none, undecodable, or empty at this resolution) gets an all-false mask and `mask_valid`
    /// false.
    pub masks: Vec<bool>,
    /// Per target: whether it has a real mask.
    pub mask_valid: Vec<bool>,
}

/// One image ready for the model.
#[derive(Debug, Clone)]
pub struct Sample {
    /// COCO image id.
    pub image_id: u64,
    /// (1, 3, S, S) f32 in [-1, 1] on the CPU.
    pub pixel_values: Tensor,
    /// Original decoded (width, height).
    pub original_size: (u32, u32),
    /// Whether it was flipped.
    pub flipped: bool,
    /// Per-query targets.
    pub queries: Vec<QueryTarget>,
}

/// A stacked batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, 3, S, S).
    pub pixel_values: Tensor,
    /// All queries; `image_index` points into the batch.
    pub queries: Vec<QueryTarget>,
    /// Per query: boxes (G, 4) f32.
    pub boxes: Vec<Tensor>,
    /// Per query: masks (G, m, m) f32 of 0/1.
    pub masks: Vec<Tensor>,
    /// Mask size m.
    pub mask_size: usize,
}

/// Clip an xywh pixel box to the image and convert to normalized CxCyWH (x flipped if `hflip`).
pub fn box_to_cxcywh(b: [f64; 4], w: u32, h: u32, hflip: bool) -> [f32; 4] {
    let (wf, hf) = (w as f64, h as f64);
    let x0 = b[0].clamp(0.0, wf);
    let y0 = b[1].clamp(0.0, hf);
    let x1 = (b[0] + b[2]).clamp(0.0, wf);
    let y1 = (b[1] + b[3]).clamp(0.0, hf);
    let mut cx = (x0 + x1) / 2.0 / wf;
    if hflip {
        cx = 1.0 - cx;
    }
    [cx as f32, ((y0 + y1) / 2.0 / hf) as f32, ((x1 - x0) / wf) as f32, ((y1 - y0) / hf) as f32]
}

/// Nearest-neighbour resize of a row-major (h, w) mask to (m, m), sampling source pixel centers;
/// flipped horizontally if `hflip`. A mask whose length is not `h * w` gives an empty mask.
pub fn resize_mask_nearest(mask: &[bool], h: usize, w: usize, m: usize, hflip: bool) -> Vec<bool> {
    let mut out = vec![false; m * m];
    if h == 0 || w == 0 || mask.len() != h * w {
        return out;
    }
    for y in 0..m {
        let sy = (((y as f64 + 0.5) * h as f64 / m as f64) as usize).min(h - 1);
        for x in 0..m {
            let mut sx = (((x as f64 + 0.5) * w as f64 / m as f64) as usize).min(w - 1);
            if hflip {
                sx = w - 1 - sx;
            }
            out[y * m + x] = mask[sy * w + sx];
        }
    }
    out
}

/// Build the sample for image `index` of `split`. Errors name the image or annotation file.
/// Boxes are clipped to the decoded image; an object whose box lies entirely outside it is left
/// out (the preflight reports it as an error), and a prompt left without any object is left out
/// too: it is neither present (no target) nor absent (its object is in the file), so it must
/// not train as a negative. Every target box is in [0, 1] with w, h > 0.
pub fn build_sample(split: &Split, index: usize, opts: &SampleOptions) -> Result<Sample, DataError> {
    if opts.image_size == 0 || opts.mask_size == 0 {
        return Err(DataError::Invalid {
            what: "sample options",
            reason: "image_size and mask_size must be > 0 (SAM3: 1008 and 288)".into(),
        });
    }
    let im = split.images.get(index).ok_or_else(|| DataError::Invalid {
        what: "image index",
        reason: format!("{index} but split {} has {} images", split.name, split.images.len()),
    })?;
    let (mut img, _) = crate::imageio::load_rgb_for_annotations(&im.path, im.json_size)?;
    let (w, h) = img.dimensions();
    if opts.hflip {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    if opts.vflip {
        image::imageops::flip_vertical_in_place(&mut img);
    }
    if !(opts.contrast > 0.0 && opts.contrast.is_finite() && opts.brightness.is_finite()) {
        return Err(DataError::Invalid {
            what: "sample options",
            reason: format!(
                "contrast {} and brightness {} (use a contrast factor > 0 and a finite shift)",
                opts.contrast, opts.brightness
            ),
        });
    }
    if !(opts.scale > 0.0 && opts.scale <= 1.0) {
        return Err(DataError::Invalid {
            what: "sample options",
            reason: format!("scale {} (use (0, 1])", opts.scale),
        });
    }
    // Zoom-out: the content occupies k × k of the S × S input (and km × km of the m × m masks).
    let s = opts.image_size;
    let k = ((s as f64 * opts.scale).round() as usize).clamp(1, s);
    let f = k as f32 / s as f32;
    let mut pixel_values = crate::imageio::to_pixel_values(&img, k, &Device::Cpu)?;
    if opts.contrast != 1.0 || opts.brightness != 0.0 {
        // Photometric jitter of the content only (padding stays 0), saturating like a camera.
        pixel_values =
            pixel_values.affine(opts.contrast as f64, opts.brightness as f64)?.clamp(-1f32, 1f32)?;
    }
    let pixel_values = if k < s {
        pixel_values.pad_with_zeros(2, 0, s - k)?.pad_with_zeros(3, 0, s - k)?
    } else {
        pixel_values
    };
    let m = opts.mask_size;
    let km = ((m as f32 * f).round() as usize).clamp(1, m);
    let queries: Vec<Query> = split.queries(index, opts.num_negatives, opts.seed);
    let mut out = Vec::with_capacity(queries.len());
    for q in queries {
        let mut t = QueryTarget {
            image_index: 0,
            prompt: q.prompt,
            negative: q.negative,
            ann_ids: Vec::new(),
            boxes: Vec::new(),
            masks: Vec::new(),
            mask_valid: Vec::new(),
        };
        for &oi in &q.objects {
            let o = &im.objects[oi];
            let mut bx = box_to_cxcywh(o.bbox_xywh, w, h, opts.hflip);
            if opts.vflip {
                bx[1] = 1.0 - bx[1];
            }
            let bx = [bx[0] * f, bx[1] * f, bx[2] * f, bx[3] * f];
            if bx[2] <= 0.0 || bx[3] <= 0.0 {
                // Entirely outside the image: degenerate once clipped (a preflight error). A
                // zero-size target would poison the GIoU cost and loss, so it is left out.
                continue;
            }
            t.ann_ids.push(o.ann_id);
            t.boxes.push(bx);
            // A mask that cannot be decoded at this size (the preflight names it), or that
            // is empty at the mask resolution, leaves a box-only target: no mask loss.
            let mut full = o.segmentation.as_ref().and_then(|seg| seg.decode(h as usize, w as usize).ok());
            if let Some(f) = full.as_mut().filter(|f| opts.vflip && f.len() == (w * h) as usize) {
                flip_rows(f, w as usize);
            }
            let resized = full.map(|full| {
                if km == m {
                    resize_mask_nearest(&full, h as usize, w as usize, m, opts.hflip)
                } else {
                    let small = resize_mask_nearest(&full, h as usize, w as usize, km, opts.hflip);
                    place_mask(&small, km, m)
                }
            });
            match resized.filter(|r| r.contains(&true)) {
                Some(r) => {
                    t.masks.extend(r);
                    t.mask_valid.push(true);
                }
                None => {
                    t.masks.extend(std::iter::repeat_n(false, m * m));
                    t.mask_valid.push(false);
                }
            }
        }
        if !q.negative && t.boxes.is_empty() {
            continue;
        }
        out.push(t);
    }
    Ok(Sample { image_id: im.id, pixel_values, original_size: (w, h), flipped: opts.hflip, queries: out })
}

/// Stack samples into a batch on `device`: pixel values (B, 3, S, S), and per query boxes
/// (G, 4) and masks (G, m, m) (G may be 0). `image_index` is set to each sample's position.
pub fn collate(samples: &[Sample], mask_size: usize, device: &Device) -> Result<Batch, DataError> {
    if samples.is_empty() {
        return Err(DataError::Invalid { what: "batch", reason: "no samples to collate".into() });
    }
    let pix: Vec<&Tensor> = samples.iter().map(|s| &s.pixel_values).collect();
    let pixel_values = Tensor::cat(&pix, 0)?.to_device(device)?;
    let (mut queries, mut boxes, mut masks) = (Vec::new(), Vec::new(), Vec::new());
    let mm = mask_size * mask_size;
    for (bi, s) in samples.iter().enumerate() {
        for q in &s.queries {
            let g = q.boxes.len();
            if q.masks.len() != g * mm {
                return Err(DataError::Invalid {
                    what: "mask_size",
                    reason: format!(
                        "{mask_size} does not match the samples' masks; use the size they were built with"
                    ),
                });
            }
            let flat: Vec<f32> = q.boxes.iter().flatten().copied().collect();
            boxes.push(Tensor::from_vec(flat, (g, 4), device)?);
            let mv: Vec<f32> = q.masks.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
            masks.push(Tensor::from_vec(mv, (g, mask_size, mask_size), device)?);
            let mut q = q.clone();
            q.image_index = bi;
            queries.push(q);
        }
    }
    Ok(Batch { pixel_values, queries, boxes, masks, mask_size })
}
