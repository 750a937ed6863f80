//! Tiling a COCO dataset (`lorahost tile`): large images cut into overlapping square crops, each
//! object's mask cropped with them, so thin structures (cracks) keep their width at the model's
//! mask grid instead of vanishing when a 4000-pixel image is squeezed to 288² (F20).
//!
//! Each split of `data_dir` becomes the same split under `out`: tiles as PNG (lossless) named
//! `<image stem>_x<X>_y<Y>.png`, and an `_annotations.coco.json` whose annotations are the
//! cropped masks (COCO compressed RLE) with their boxes, and whose images record the source
//! file and the tile's corner. A box-only object keeps its clipped box. Tiles without any
//! object are negatives ("crack → nothing"); a seeded share of them is kept. An image no larger
//! than the tile is kept whole.

use super::coco::{Dataset, Split};
use super::DataError;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How to tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileOptions {
    /// Side of a tile in pixels.
    pub size: u32,
    /// Overlap of neighbouring tiles in pixels (< size).
    pub overlap: u32,
    /// Share of the tiles without objects that are kept, in [0, 1].
    pub empty_fraction: f64,
    /// Fewest mask pixels an object needs inside a tile to be annotated there.
    pub min_pixels: usize,
    /// Seed of the choice of empty tiles.
    pub seed: u64,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions { size: 1008, overlap: 128, empty_fraction: 0.25, min_pixels: 8, seed: 0 }
    }
}

/// What tiling one split did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitTiles {
    /// Split name.
    pub split: String,
    /// Source images tiled.
    pub images: usize,
    /// Source images that could not be read (file and error), left out.
    pub failed: Vec<(PathBuf, String)>,
    /// Tiles written with at least one object.
    pub tiles_with_objects: usize,
    /// Tiles written without objects (negatives).
    pub empty_tiles_kept: usize,
    /// Tiles without objects left out.
    pub empty_tiles_dropped: usize,
    /// Objects of the source split.
    pub objects: usize,
    /// Annotations written (an object crossing tiles is annotated in each).
    pub annotations: usize,
}

/// Top-left corners along a side of `length` for tiles of `tile` with step `stride`: the last
/// tile ends at the edge; one tile when the side fits.
pub fn tile_positions(length: u32, tile: u32, stride: u32) -> Vec<u32> {
    if length <= tile {
        return vec![0];
    }
    let mut p: Vec<u32> = (0..=length - tile).step_by(stride.max(1) as usize).collect();
    if p.last() != Some(&(length - tile)) {
        p.push(length - tile);
    }
    p
}

/// An object's part in the tile `[x0, x0 + tw) × [y0, y0 + th)`, from the image's mask given
/// as its pixels in `win` (row-major; empty outside `win`): its pixel count, its box in tile
/// pixels and the COCO RLE counts of the tile's mask (column-major, as `rle_encode` writes
/// them), in the time of the overlap rather than of the whole tile (a tile per object and a
/// megapixel each made images with many objects take minutes).
fn tile_part(
    (win, mask): (&super::rle::Window, &[bool]),
    (x0, y0, tw, th): (usize, usize, usize, usize),
) -> (usize, Option<[f64; 4]>, Vec<u64>) {
    let (cx0, cx1) = (x0.max(win.x0), (x0 + tw).min(win.x0 + win.w));
    let (cy0, cy1) = (y0.max(win.y0), (y0 + th).min(win.y0 + win.h));
    let total = (tw * th) as u64;
    let (mut counts, mut pixels) = (Vec::new(), 0usize);
    // The run of ones in progress (its start) and the index just past the last one.
    let (mut open, mut end): (Option<u64>, u64) = (None, 0);
    let (mut bx0, mut by0, mut bx1, mut by1) = (usize::MAX, usize::MAX, 0, 0);
    for x in cx0..cx1 {
        for y in cy0..cy1 {
            if !mask[(y - win.y0) * win.w + x - win.x0] {
                continue;
            }
            pixels += 1;
            let (tx, ty) = (x - x0, y - y0);
            (bx0, by0, bx1, by1) = (bx0.min(tx), by0.min(ty), bx1.max(tx), by1.max(ty));
            let idx = (tx * th + ty) as u64;
            match open {
                Some(_) if idx == end => end += 1,
                _ => {
                    if let Some(s) = open {
                        counts.push(end - s);
                    }
                    counts.push(idx - end);
                    open = Some(idx);
                    end = idx + 1;
                }
            }
        }
    }
    if let Some(s) = open {
        counts.push(end - s);
    }
    if end < total || counts.is_empty() {
        counts.push(total - end);
    }
    let bbox = (pixels > 0).then(|| [bx0 as f64, by0 as f64, (bx1 + 1 - bx0) as f64, (by1 + 1 - by0) as f64]);
    (pixels, bbox, counts)
}

/// Tile every split of `data_dir` into `out` (which must not exist or be empty).
pub fn tile_dataset(data_dir: &Path, out: &Path, opts: &TileOptions) -> Result<Vec<SplitTiles>, DataError> {
    let invalid = |reason: String| DataError::Invalid { what: "tile options", reason };
    if opts.size < 32 {
        return Err(invalid(format!("--size {} (use 32 or more; SAM3's input is 1008)", opts.size)));
    }
    if opts.overlap >= opts.size {
        return Err(invalid(format!("--overlap {} must be smaller than --size {}", opts.overlap, opts.size)));
    }
    if !(0.0..=1.0).contains(&opts.empty_fraction) {
        return Err(invalid(format!("--empty-tiles {} (use a share in [0, 1])", opts.empty_fraction)));
    }
    let io =
        |path: &Path, e: std::io::Error| DataError::Io { path: path.to_path_buf(), reason: e.to_string() };
    if out.exists() && std::fs::read_dir(out).map_err(|e| io(out, e))?.next().is_some() {
        return Err(DataError::Io {
            path: out.to_path_buf(),
            reason:
                "the folder exists and is not empty: choose a new --out (tiling never mixes with other files)"
                    .into(),
        });
    }
    let ds = Dataset::load(data_dir)?;
    let mut done = Vec::new();
    for name in ["train", "valid", "test"] {
        if let Some(split) = ds.split(name) {
            done.push(tile_split(split, &out.join(name), opts)?);
        }
    }
    Ok(done)
}

fn tile_split(split: &Split, dir: &Path, opts: &TileOptions) -> Result<SplitTiles, DataError> {
    use serde_json::json;
    let io =
        |path: &Path, e: std::io::Error| DataError::Io { path: path.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut summary = SplitTiles { split: split.name.clone(), ..Default::default() };
    let (mut images, mut annotations) = (Vec::new(), Vec::new());
    let stride = opts.size - opts.overlap;
    for im in &split.images {
        summary.objects += im.objects.len();
        let img = match crate::imageio::load_rgb_for_annotations(&im.path, im.json_size) {
            Ok((img, _)) => img,
            Err(e) => {
                summary.failed.push((im.path.clone(), e.to_string()));
                continue;
            }
        };
        summary.images += 1;
        let (w, h) = img.dimensions();
        let (xs, ys) = (tile_positions(w, opts.size, stride), tile_positions(h, opts.size, stride));
        let (tw, th) = (opts.size.min(w), opts.size.min(h));
        // Per tile (row-major over ys, xs): its annotations.
        let mut per_tile: Vec<Vec<serde_json::Value>> = vec![Vec::new(); xs.len() * ys.len()];
        for o in &im.objects {
            // Only the object's extent is decoded (a whole-image mask per object made a
            // 12-megapixel image with many objects take minutes).
            let window = o.segmentation.as_ref().map(|s| s.decode_extent(h as usize, w as usize));
            let mask = match window {
                Some(Ok(Some(m))) => Some(m),
                // An empty mask crops to nothing in every tile.
                Some(Ok(None)) => continue,
                _ => None,
            };
            for (t, (&y0, &x0)) in ys.iter().flat_map(|y| xs.iter().map(move |x| (y, x))).enumerate() {
                let b = o.bbox_xywh;
                let (bx0, by0, bx1, by1) = (b[0], b[1], b[0] + b[2], b[1] + b[3]);
                let (tx1, ty1) = ((x0 + tw) as f64, (y0 + th) as f64);
                if bx1 <= x0 as f64 || by1 <= y0 as f64 || bx0 >= tx1 || by0 >= ty1 {
                    continue;
                }
                let ann = match &mask {
                    Some((win, m)) => {
                        let (pixels, bbox, counts) =
                            tile_part((win, m), (x0 as usize, y0 as usize, tw as usize, th as usize));
                        if pixels < opts.min_pixels.max(1) {
                            continue;
                        }
                        let Some(bbox) = bbox else { continue };
                        json!({"bbox": bbox, "area": pixels,
                               "segmentation": {"size": [th, tw], "counts": super::rle::encode_compressed_counts(&counts)}})
                    }
                    None => {
                        // Box-only: the box clipped to the tile.
                        let (cx0, cy0) = (bx0.max(x0 as f64), by0.max(y0 as f64));
                        let (cx1, cy1) = (bx1.min(tx1), by1.min(ty1));
                        if cx1 - cx0 < 2.0 || cy1 - cy0 < 2.0 {
                            continue;
                        }
                        let bbox = [cx0 - x0 as f64, cy0 - y0 as f64, cx1 - cx0, cy1 - cy0];
                        json!({"bbox": bbox, "area": bbox[2] * bbox[3], "segmentation": []})
                    }
                };
                let mut ann = ann;
                ann["category_id"] = json!(o.category_id);
                ann["iscrowd"] = json!(0);
                ann["source_annotation_id"] = json!(o.ann_id);
                per_tile[t].push(ann);
            }
        }
        let stem = im.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let stem: String =
            stem.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
        for (t, (&y0, &x0)) in ys.iter().flat_map(|y| xs.iter().map(move |x| (y, x))).enumerate() {
            let anns = std::mem::take(&mut per_tile[t]);
            if anns.is_empty() {
                let draw = super::SplitMix64::from_parts(&[opts.seed, 0x711E, im.id, x0 as u64, y0 as u64])
                    .next_f64();
                if draw >= opts.empty_fraction {
                    summary.empty_tiles_dropped += 1;
                    continue;
                }
                summary.empty_tiles_kept += 1;
            } else {
                summary.tiles_with_objects += 1;
            }
            let id = images.len() as u64 + 1;
            let file_name = if xs.len() * ys.len() == 1 {
                format!("{stem}_{}.png", im.id)
            } else {
                format!("{stem}_{}_x{x0}_y{y0}.png", im.id)
            };
            let tile = image::imageops::crop_imm(&img, x0, y0, tw, th).to_image();
            let path = dir.join(&file_name);
            let mut png = Vec::new();
            tile.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| DataError::Io { path: path.clone(), reason: e.to_string() })?;
            crate::fsutil::write_atomic(&path, &png).map_err(|e| io(&path, e))?;
            images.push(json!({"id": id, "file_name": file_name, "width": tw, "height": th,
                               "source_file": im.file_name, "source_image_id": im.id, "tile": [x0, y0]}));
            for mut a in anns {
                a["id"] = json!(annotations.len() as u64 + 1);
                a["image_id"] = json!(id);
                annotations.push(a);
            }
        }
    }
    summary.annotations = annotations.len();
    let categories: Vec<serde_json::Value> =
        split.categories.iter().map(|c| json!({"id": c.id, "name": c.name})).collect();
    let coco = json!({"images": images, "annotations": annotations, "categories": categories,
                      "info": {"description": format!("{} tiled by lorahost ({} px, overlap {})", split.annotation_file.display(), opts.size, opts.overlap)}});
    let file = dir.join(super::coco::ANNOTATION_FILE);
    let text =
        serde_json::to_vec(&coco).map_err(|e| DataError::Io { path: file.clone(), reason: e.to_string() })?;
    crate::fsutil::write_atomic(&file, &text).map_err(|e| io(&file, e))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::coco::Segmentation;

    #[test]
    fn tile_part_is_the_whole_tile_crop() {
        use crate::data::rle::rasterize_polygons;
        let (h, w) = (40, 50);
        let polys =
            vec![vec![3.5, 2.0, 30.0, 5.5, 44.0, 33.0, 9.0, 38.5], vec![0.0, 0.0, 6.0, 0.0, 0.0, 9.0]];
        let whole = rasterize_polygons(&polys, h, w).unwrap();
        let seg = crate::data::coco::Segmentation::Polygons(polys);
        let (win, m) = seg.decode_extent(h, w).unwrap().unwrap();
        for (x0, y0, tw, th) in
            [(0, 0, 50, 40), (10, 5, 20, 20), (40, 30, 10, 10), (45, 0, 5, 3), (0, 35, 50, 5)]
        {
            let crop: Vec<bool> = (y0..y0 + th)
                .flat_map(|y| (x0..x0 + tw).map(move |x| (x, y)))
                .map(|(x, y)| whole[y * w + x])
                .collect();
            let rle = crate::sam3::postprocess::rle_encode(&crop, th, tw);
            let (pixels, bbox, counts) = tile_part((&win, &m), (x0, y0, tw, th));
            assert_eq!(counts, rle.counts, "{x0},{y0}");
            assert_eq!(pixels, crop.iter().filter(|&&v| v).count());
            assert_eq!(bbox, crate::data::mask_bounds(&crop, tw));
        }
    }

    #[test]
    fn positions_cover_the_side_and_end_at_the_edge() {
        assert_eq!(tile_positions(500, 1008, 880), [0]);
        assert_eq!(tile_positions(2000, 1008, 880), [0, 880, 992]);
        assert_eq!(tile_positions(1888, 1008, 880), [0, 880]);
        for (len, tile, stride) in [(4000u32, 1008u32, 880u32), (1009, 1008, 1), (3000, 512, 384)] {
            let p = tile_positions(len, tile, stride);
            assert_eq!(*p.last().unwrap() + tile, len);
            assert!(p.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= stride), "{p:?}");
        }
    }

    /// A 3-row crack across a 100 × 40 image, tiled 32 px with overlap 8: every tile on its
    /// rows holds its piece with the right box and pixels, each crack pixel is in some tile,
    /// empty tiles follow the kept share, and the result loads as a dataset.
    #[test]
    fn tiles_crop_masks_and_load_back() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let train = data.join("train");
        std::fs::create_dir_all(&train).unwrap();
        image::RgbImage::from_fn(100, 40, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .save(train.join("a.png"))
            .unwrap();
        let polygon = serde_json::json!([[0, 20, 100, 20, 100, 23, 0, 23]]);
        let coco = serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 40}],
            "annotations": [
                {"id": 5, "image_id": 1, "category_id": 0, "bbox": [0, 20, 100, 3], "segmentation": polygon, "area": 300, "iscrowd": 0},
                {"id": 6, "image_id": 1, "category_id": 0, "bbox": [90, 0, 10, 10], "segmentation": [], "area": 100, "iscrowd": 0}
            ],
            "categories": [{"id": 0, "name": "crack"}]
        });
        std::fs::write(train.join("_annotations.coco.json"), coco.to_string()).unwrap();
        let full = Segmentation::Polygons(vec![vec![0.0, 20.0, 100.0, 20.0, 100.0, 23.0, 0.0, 23.0]])
            .decode(40, 100)
            .unwrap();
        let out = d.path().join("tiles");
        let opts = TileOptions { size: 32, overlap: 8, empty_fraction: 1.0, min_pixels: 1, seed: 1 };
        let s = tile_dataset(&data, &out, &opts).unwrap();
        assert_eq!(s.len(), 1);
        // x: 0, 24, 48, 68; y: 0, 8 → 8 tiles, all kept.
        assert_eq!(s[0].tiles_with_objects + s[0].empty_tiles_kept, 8);
        let ds = Dataset::load(&out).unwrap();
        let split = ds.split("train").unwrap();
        assert!(split.findings.is_empty(), "{:?}", split.findings);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("train/_annotations.coco.json")).unwrap())
                .unwrap();
        let mut covered = vec![false; 4000];
        for im in &split.images {
            let info = json["images"].as_array().unwrap().iter().find(|v| v["id"] == im.id).unwrap();
            let (x0, y0) =
                (info["tile"][0].as_u64().unwrap() as usize, info["tile"][1].as_u64().unwrap() as usize);
            // The tile's pixels are the source's.
            let px = image::open(&im.path).unwrap().to_rgb8();
            assert_eq!(px.dimensions(), (32, 32));
            assert_eq!(px.get_pixel(3, 5).0, [(x0 + 3) as u8, (y0 + 5) as u8, 7]);
            for o in &im.objects {
                match &o.segmentation {
                    Some(seg) => {
                        let m = seg.decode(32, 32).unwrap();
                        for (i, v) in m.iter().enumerate() {
                            let (x, y) = (x0 + i % 32, y0 + i / 32);
                            assert_eq!(*v, full[y * 100 + x], "tile ({x0}, {y0}) pixel ({x}, {y})");
                            covered[y * 100 + x] |= *v;
                        }
                        assert_eq!(o.bbox_xywh[1], (20 - y0) as f64);
                        assert_eq!(o.bbox_xywh[3], 3.0);
                    }
                    None => assert!(x0 + 32 > 90 && y0 < 10, "box-only object in tile ({x0}, {y0})"),
                }
            }
        }
        assert_eq!(covered, full, "every crack pixel lands in a tile");
        // No empty tile kept at share 0; the folder must be new.
        let none =
            tile_dataset(&data, &d.path().join("t0"), &TileOptions { empty_fraction: 0.0, ..opts.clone() })
                .unwrap();
        assert_eq!(none[0].empty_tiles_kept, 0);
        assert_eq!(none[0].empty_tiles_dropped, s[0].empty_tiles_kept);
        assert!(tile_dataset(&data, &out, &opts).unwrap_err().to_string().contains("not empty"));
        let bad = TileOptions { overlap: 32, ..opts };
        assert!(tile_dataset(&data, &d.path().join("t1"), &bad)
            .unwrap_err()
            .to_string()
            .contains("--overlap"));
    }
}
