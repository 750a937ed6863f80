//! Importing a dataset of image + mask pairs (`lorahost import`) into the Roboflow COCO layout
//! training reads. Crack and medical datasets mostly ship that way (CrackForest, DeepCrack,
//! Crack500, ISIC, Kvasir-SEG: an image folder and a folder of binary or label masks), and the
//! converters people write for SAM3_LoRA trace masks into polygons, which loses the one-pixel
//! cracks the model is meant to learn. Here every mask becomes COCO compressed RLE, exact to
//! the pixel.
//!
//! - Pairing: a mask belongs to the image with the same file stem, or the stem plus a usual
//!   suffix (`_mask`, `_gt`, `_label`, `_segmentation`, ...; case ignored); masks may share the
//!   images' folder when they carry a suffix.
//! - Reading a mask: any PNG or JPEG, grey, RGB, with alpha, 8 or 16 bits. With one prompt
//!   (`--prompt crack`) a pixel is foreground when any colour channel is at least half the
//!   range (0/255 masks, JPEG noise included); in a mask whose values all stay below half the
//!   range (0/1 masks, label maps) when any channel is non-zero; a mask whose colour is the same
//!   everywhere but whose alpha varies is read from its alpha. With classes (`--class 1=crack
//!   --class 2=spalling`, or `--class 255,0,0=crack` for colour masks) a pixel belongs to the
//!   class whose value it has exactly.
//! - Instances: each connected region (8-neighbourhood) of a class is one object, regions
//!   smaller than `min_pixels` dropped as noise; or the whole class in an image as one object.
//!   An image whose mask is empty is kept as a negative.
//! - Splits: everything into one split, or seeded shares of the images into valid/ and test/
//!   (the choice depends on the file names only, not on the listing order).
//! - Writing: each split is written to a temporary folder and renamed into place at the end,
//!   and a split folder that holds anything is never written into.
//!
//! Images are copied byte for byte, except one with an EXIF orientation, which is written as a
//! PNG in the frame its mask was drawn in (the mask's size decides; where both frames fit, the
//! stored pixels, as mask tools that ignore EXIF see them), so nothing downstream can turn it.

use super::DataError;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Suffixes that mark a mask file of the image with the stem before them (lower case).
pub const MASK_SUFFIXES: &[&str] = &[
    "_mask",
    "_masks",
    "-mask",
    "_gt",
    "-gt",
    "_label",
    "_labels",
    "_segmentation",
    "_seg",
    "_anno",
    "_annotation",
];

/// Image file extensions read as training images (lower case).
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// Which mask pixels make a class.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskValue {
    /// Foreground of a binary mask (see the module docs).
    Foreground,
    /// A grey level (all colour channels equal to it; in the mask's own bit depth).
    Gray(u16),
    /// An 8-bit colour.
    Rgb([u8; 3]),
}

/// A class of the masks and its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskClass {
    /// The pixels of the class.
    pub value: MaskValue,
    /// The category name (the text prompt).
    pub name: String,
}

impl std::str::FromStr for MaskClass {
    type Err = String;

    /// `VALUE=NAME`: a grey level (`1=crack`) or an 8-bit colour (`255,0,0=crack`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (value, name) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected VALUE=NAME, e.g. 1=crack or 255,0,0=crack"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("`{s}`: the class needs a name (the text prompt)"));
        }
        let parts: Vec<&str> = value.split(',').map(str::trim).collect();
        let value = match parts.as_slice() {
            [g] => MaskValue::Gray(
                g.parse().map_err(|_| format!("`{s}`: `{g}` is not a grey level (0..65535)"))?,
            ),
            [r, g, b] => {
                let c = |v: &str| {
                    v.parse::<u8>().map_err(|_| format!("`{s}`: `{v}` is not a colour channel (0..255)"))
                };
                MaskValue::Rgb([c(r)?, c(g)?, c(b)?])
            }
            _ => return Err(format!("`{s}`: the value is a grey level (1) or a colour (255,0,0)")),
        };
        if matches!(value, MaskValue::Gray(0) | MaskValue::Rgb([0, 0, 0])) {
            return Err(format!("`{s}`: 0 is the background; name the classes' own values"));
        }
        Ok(MaskClass { value, name: name.to_string() })
    }
}

/// How a class's pixels become objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
pub enum Instances {
    /// Each connected region (8-neighbourhood) is one object.
    #[default]
    Components,
    /// All of a class's pixels in an image are one object.
    Whole,
}

/// What to import and how.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The images' folder.
    pub images: PathBuf,
    /// The masks' folder (may be the images' folder when the masks carry a suffix).
    pub masks: PathBuf,
    /// The dataset folder to write splits into.
    pub out: PathBuf,
    /// The classes (one [`MaskValue::Foreground`] class for binary masks).
    pub classes: Vec<MaskClass>,
    /// The split the images go to (`train`, `valid` or `test`).
    pub split: String,
    /// Share of the images put into valid/ instead, in [0, 1).
    pub valid_share: f64,
    /// Share of the images put into test/ instead, in [0, 1).
    pub test_share: f64,
    /// Regions or whole classes as objects.
    pub instances: Instances,
    /// Fewest pixels an object needs (smaller regions are dropped as noise).
    pub min_pixels: usize,
    /// Seed of the split choice.
    pub seed: u64,
}

/// What importing one split did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitImport {
    /// Split name.
    pub split: String,
    /// Images written.
    pub images: usize,
    /// Of them, images without any object (negatives).
    pub negatives: usize,
    /// Objects written.
    pub objects: usize,
    /// Regions left out for having fewer than `min_pixels` pixels.
    pub small_regions_dropped: usize,
}

/// What the import did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImportSummary {
    /// Per split written.
    pub splits: Vec<SplitImport>,
    /// Images left out, with the reason (no mask, sizes differ, unreadable).
    pub left_out: Vec<(PathBuf, String)>,
    /// Masks no image claimed.
    pub unmatched_masks: Vec<PathBuf>,
    /// Things worth knowing (EXIF frames, unmatched pixel values, large images).
    pub notes: Vec<String>,
}

pub(super) fn io(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

pub(super) fn invalid(reason: String) -> DataError {
    DataError::Invalid { what: "import options", reason }
}

/// The image files of `dir` (sorted by name).
pub(super) fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    if !dir.is_dir() {
        let why = if dir.exists() { "is not a folder" } else { "does not exist" };
        return Err(io(dir, format!("{why}: give the folder that holds the files")));
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if path.is_file() && IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The lower-case stem of `path`, and the stem without a mask suffix when it has one.
fn stem_keys(path: &Path) -> (String, Option<String>) {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default();
    let stripped = MASK_SUFFIXES
        .iter()
        .find_map(|suf| stem.strip_suffix(suf).filter(|s| !s.is_empty()).map(str::to_string));
    (stem, stripped)
}

/// Image ↔ mask pairs, images without a mask, and masks without an image.
type Pairing = (Vec<(PathBuf, PathBuf)>, Vec<PathBuf>, Vec<PathBuf>);

fn pair(images_dir: &Path, masks_dir: &Path) -> Result<Pairing, DataError> {
    let same_dir = images_dir.canonicalize().ok().is_some_and(|a| masks_dir.canonicalize().ok() == Some(a));
    let mut masks = image_files(masks_dir)?;
    let mut images = image_files(images_dir)?;
    // In a shared folder, a file with a mask suffix is a mask, and the others are images.
    if same_dir {
        images.retain(|p| stem_keys(p).1.is_none());
        masks.retain(|p| stem_keys(p).1.is_some());
    }
    // Exact stems first (in separate folders), then suffixed ones.
    let mut by_key: HashMap<String, PathBuf> = HashMap::new();
    for m in &masks {
        let (_, stripped) = stem_keys(m);
        if let Some(s) = stripped {
            by_key.entry(s).or_insert_with(|| m.clone());
        }
    }
    for m in &masks {
        by_key.insert(stem_keys(m).0, m.clone());
    }
    let (mut pairs, mut missing) = (Vec::new(), Vec::new());
    let mut used = std::collections::HashSet::new();
    for im in images {
        match by_key.get(&stem_keys(&im).0) {
            Some(m) => {
                used.insert(m.clone());
                pairs.push((im, m.clone()));
            }
            None => missing.push(im),
        }
    }
    let unmatched = masks.into_iter().filter(|m| !used.contains(m)).collect();
    Ok((pairs, missing, unmatched))
}

/// A decoded mask: per pixel the class index (0 = background, k = `classes[k - 1]`).
struct ClassMap {
    width: usize,
    height: usize,
    class: Vec<u8>,
    /// Non-zero pixels that matched no class (class masks only).
    unmatched: usize,
}

fn read_mask(path: &Path, classes: &[MaskClass]) -> Result<ClassMap, String> {
    let img = crate::imageio::decode_stored(path).map_err(|e| e.to_string())?;
    let sixteen = matches!(
        img.color(),
        image::ColorType::L16 | image::ColorType::La16 | image::ColorType::Rgb16 | image::ColorType::Rgba16
    );
    let (width, height) = (img.width() as usize, img.height() as usize);
    // All channels as 16-bit values (an 8-bit value v reads as 257·v).
    let px = img.to_rgba16();
    let raw = px.as_raw();
    let color = |i: usize| [raw[4 * i], raw[4 * i + 1], raw[4 * i + 2]];
    let n = width * height;
    let mut class = vec![0u8; n];
    let mut unmatched = 0;
    if let [MaskClass { value: MaskValue::Foreground, .. }] = classes {
        let first = color(0);
        let constant = (0..n).all(|i| color(i) == first);
        let alpha_varies = (0..n).any(|i| raw[4 * i + 3] != raw[3]);
        let level = |i: usize| -> u16 {
            if constant && alpha_varies {
                raw[4 * i + 3]
            } else {
                color(i).into_iter().max().unwrap_or(0)
            }
        };
        let max = (0..n).map(level).max().unwrap_or(0);
        let threshold = if max < 0x8000 { 1 } else { 0x8000 };
        for (i, c) in class.iter_mut().enumerate() {
            *c = (level(i) >= threshold) as u8;
        }
    } else {
        let scale = if sixteen { 1 } else { 257 };
        // (A grey level above 255 is no 8-bit mask's: it matches nothing there, rather than
        // the 255 it would saturate to.)
        let targets: Vec<Option<[u16; 3]>> = classes
            .iter()
            .map(|c| match c.value {
                MaskValue::Gray(g) if !sixteen && g > 255 => None,
                MaskValue::Gray(g) => Some([g * scale; 3]),
                MaskValue::Rgb([r, g, b]) => Some([r as u16 * 257, g as u16 * 257, b as u16 * 257]),
                MaskValue::Foreground => Some([u16::MAX; 3]),
            })
            .collect();
        for (i, c) in class.iter_mut().enumerate() {
            let v = color(i);
            match targets.iter().position(|t| *t == Some(v)) {
                Some(k) => *c = (k + 1) as u8,
                None if v != [0, 0, 0] => unmatched += 1,
                None => {}
            }
        }
    }
    Ok(ClassMap { width, height, class, unmatched })
}

/// An object: its class index (1-based), pixel count, box and compressed RLE counts.
struct Region {
    class: u8,
    pixels: usize,
    bbox: [f64; 4],
    counts: Vec<u64>,
}

/// The objects of `map`: connected regions (8-neighbourhood) of each class, or each class's
/// pixels as one object.
fn regions(map: &ClassMap, instances: Instances) -> Vec<Region> {
    let (w, h) = (map.width, map.height);
    let mut label = vec![0u32; w * h];
    let mut classes: Vec<u8> = Vec::new(); // per label - 1
    match instances {
        Instances::Whole => {
            for (i, &c) in map.class.iter().enumerate().filter(|(_, c)| **c > 0) {
                label[i] = c as u32;
            }
            classes = (1..=u8::MAX).collect();
        }
        Instances::Components => {
            let mut stack = Vec::new();
            for start in 0..w * h {
                let c = map.class[start];
                if c == 0 || label[start] != 0 {
                    continue;
                }
                classes.push(c);
                let l = classes.len() as u32;
                label[start] = l;
                stack.push(start);
                while let Some(i) = stack.pop() {
                    let (x, y) = ((i % w) as isize, (i / w) as isize);
                    for (dx, dy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                            continue;
                        }
                        let j = ny as usize * w + nx as usize;
                        if label[j] == 0 && map.class[j] == c {
                            label[j] = l;
                            stack.push(j);
                        }
                    }
                }
            }
        }
    }
    // One column-major pass (COCO RLE's order) collects each label's runs and bounds.
    struct Acc {
        runs: Vec<(usize, usize)>,
        pixels: usize,
        x0: usize,
        y0: usize,
        x1: usize,
        y1: usize,
    }
    let mut acc: HashMap<u32, Acc> = HashMap::new();
    for x in 0..w {
        for y in 0..h {
            let l = label[y * w + x];
            if l == 0 {
                continue;
            }
            let t = x * h + y;
            let a = acc.entry(l).or_insert(Acc { runs: Vec::new(), pixels: 0, x0: x, y0: y, x1: x, y1: y });
            a.pixels += 1;
            (a.x0, a.y0, a.x1, a.y1) = (a.x0.min(x), a.y0.min(y), a.x1.max(x), a.y1.max(y));
            match a.runs.last_mut() {
                Some((s, len)) if *s + *len == t => *len += 1,
                _ => a.runs.push((t, 1)),
            }
        }
    }
    let mut out: Vec<(u32, Region)> = acc
        .into_iter()
        .map(|(l, a)| {
            let mut counts = Vec::with_capacity(2 * a.runs.len() + 1);
            let mut pos = 0;
            for (s, len) in &a.runs {
                counts.push((s - pos) as u64);
                counts.push(*len as u64);
                pos = s + len;
            }
            if pos < w * h {
                counts.push((w * h - pos) as u64);
            }
            let bbox = [a.x0 as f64, a.y0 as f64, (a.x1 + 1 - a.x0) as f64, (a.y1 + 1 - a.y0) as f64];
            (l, Region { class: classes[l as usize - 1], pixels: a.pixels, bbox, counts })
        })
        .collect();
    out.sort_by_key(|(l, _)| *l);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Folder names that usually hold masks, and images (lower case).
const MASK_FOLDERS: &[&str] = &[
    "masks",
    "mask",
    "gt",
    "groundtruth",
    "ground_truth",
    "labels",
    "label",
    "annotations",
    "segmentations",
    "targets",
];
const IMAGE_FOLDERS: &[&str] =
    &["images", "image", "imgs", "img", "jpegimages", "inputs", "photos", "originals"];

/// The images' and masks' folders when `base` holds images with mask images: a mask folder
/// (`masks`, `gt`, `labels`, ...) beside an image folder (`images`, `img`, ...) or beside the
/// images themselves, or masks beside their images with a suffix.
fn pairs_in(base: &Path) -> Option<(PathBuf, PathBuf)> {
    let has_images = |d: &Path| image_files(d).is_ok_and(|f| !f.is_empty());
    let sub = |names: &[&str]| -> Option<PathBuf> {
        let entries = std::fs::read_dir(base).ok()?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
                names.contains(&name.as_str()) && has_images(p)
            })
            .collect();
        found.sort();
        found.into_iter().next()
    };
    if let Some(masks) = sub(MASK_FOLDERS) {
        let images = sub(IMAGE_FOLDERS).or_else(|| has_images(base).then(|| base.to_path_buf()))?;
        return Some((images, masks));
    }
    let files = image_files(base).unwrap_or_default();
    if files.iter().any(|f| stem_keys(f).1.is_some()) && files.iter().any(|f| stem_keys(f).1.is_none()) {
        return Some((base.to_path_buf(), base.to_path_buf()));
    }
    None
}

/// Where `dir` (or its `split` subfolder) looks like images with mask images rather than a
/// COCO export: the images' and the masks' folders, for a hint that names `lorahost import`.
pub fn looks_like_mask_pairs(dir: &Path, split: &str) -> Option<(PathBuf, PathBuf)> {
    pairs_in(&dir.join(split)).or_else(|| pairs_in(dir))
}

/// The split a dataset's subfolder name stands for (`val`, `validation` → `valid`, ...).
pub(super) fn split_of(folder: &str) -> Option<&'static str> {
    match folder.to_lowercase().as_str() {
        "train" | "training" | "trainval" => Some("train"),
        "valid" | "val" | "validation" | "dev" => Some("valid"),
        "test" | "testing" => Some("test"),
        _ => None,
    }
}

/// The (split, images, masks) of a dataset folder `dir`: one entry per split subfolder
/// (`train/`, `val/`, `test/`, ...) that holds images with masks; else `dir` itself as
/// `default_split` when it does; else none.
pub fn dataset_layout(dir: &Path, default_split: &str) -> Vec<(String, PathBuf, PathBuf)> {
    let mut found: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    subs.sort();
    for sub in subs {
        let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let (Some(split), Some((images, masks))) = (split_of(&name), pairs_in(&sub)) {
            if !found.iter().any(|f| f.0 == split) {
                found.push((split.to_string(), images, masks));
            }
        }
    }
    if found.is_empty() {
        if let Some((images, masks)) = pairs_in(dir) {
            found.push((default_split.to_string(), images, masks));
        }
    }
    found
}

/// [`import_masks`] for a whole dataset folder ([`dataset_layout`]): each split subfolder into
/// its split (the shares of `opts` are refused then: the dataset is split already); one split
/// subfolder, or the folder itself, as `opts` says. Every split folder of `opts.out` is checked before any is
/// written.
pub fn import_dataset(dir: &Path, opts: &ImportOptions) -> Result<ImportSummary, DataError> {
    if !dir.is_dir() {
        return Err(io(dir, "is not a folder: give the dataset folder"));
    }
    let layout = dataset_layout(dir, &opts.split);
    if layout.is_empty() {
        return Err(invalid(format!(
            "{} holds no images with mask images: expected train/ val/ test/ subfolders (or the folder itself) with an image folder ({}) beside a mask folder ({}), or masks beside their images with a suffix such as _mask; else give --images and --masks",
            dir.display(),
            IMAGE_FOLDERS[..3].join(", "),
            MASK_FOLDERS[..4].join(", ")
        )));
    }
    if let [(split, images, masks)] = layout.as_slice() {
        // One split (or none): the shares may divide it.
        let one = ImportOptions {
            images: images.clone(),
            masks: masks.clone(),
            split: split.clone(),
            ..opts.clone()
        };
        return import_masks(&one);
    }
    if opts.valid_share > 0.0 || opts.test_share > 0.0 {
        return Err(invalid(format!(
            "{} is split already ({}): leave out --valid-share and --test-share",
            dir.display(),
            layout.iter().map(|l| format!("{}/", l.0)).collect::<Vec<_>>().join(", ")
        )));
    }
    for (split, _, _) in &layout {
        let out = opts.out.join(split);
        if out.exists() && std::fs::read_dir(&out).map_err(|e| io(&out, e))?.next().is_some() {
            return Err(io(
                &out,
                "the split folder exists and is not empty: choose a new --out (import never mixes with other files)",
            ));
        }
    }
    let mut all = ImportSummary::default();
    for (split, images, masks) in layout {
        let one = ImportOptions { images, masks, split, ..opts.clone() };
        let s = import_masks(&one)?;
        all.splits.extend(s.splits);
        all.left_out.extend(s.left_out);
        all.unmatched_masks.extend(s.unmatched_masks);
        all.notes.extend(s.notes);
    }
    Ok(all)
}

/// FNV-1a of a file name: the split draw depends on the name alone.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The split of each of `names`: `test_share` and `valid_share` of them (rounded, at least one
/// each where the share is above 0 and images remain) chosen by a seeded draw per name.
fn assign_splits(names: &[String], opts: &ImportOptions) -> Vec<String> {
    split_names(names, &opts.split, opts.valid_share, opts.test_share, opts.seed)
}

/// [`assign_splits`] with its settings given one by one: the rest go to `split`.
pub(super) fn split_names(
    names: &[String],
    split: &str,
    valid_share: f64,
    test_share: f64,
    seed: u64,
) -> Vec<String> {
    let n = names.len();
    let mut order: Vec<(u64, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (super::SplitMix64::from_parts(&[seed, 0x1A9E, name_hash(name)]).next_u64(), i))
        .collect();
    order.sort();
    let count = |share: f64, left: usize| -> usize {
        if share <= 0.0 || left <= 1 {
            return 0;
        }
        ((share * n as f64).round() as usize).clamp(1, left - 1)
    };
    let tests = count(test_share, n);
    let valids = count(valid_share, n - tests);
    let mut out = vec![split.to_string(); n];
    for (k, (_, i)) in order.into_iter().enumerate() {
        if k < tests {
            out[i] = "test".into();
        } else if k < tests + valids {
            out[i] = "valid".into();
        }
    }
    out
}

/// The image as it will be written (its bytes and file name) for a mask of `mask_size`, or why
/// it cannot pair with it; a note when its EXIF orientation decided the frame.
fn image_for_mask(path: &Path, mask_size: (u32, u32)) -> Result<(Vec<u8>, String, Option<String>), String> {
    image_in_frame(path, mask_size, false)
}

/// The image as it will be written for annotations made on a frame of `size`: as stored
/// without an EXIF orientation; with one, as a PNG of the frame that has that size (where both
/// have it, the displayed frame if `prefer_displayed`, as annotation tools that apply EXIF
/// drew on, else the stored one).
pub(super) fn image_in_frame(
    path: &Path,
    size: (u32, u32),
    prefer_displayed: bool,
) -> Result<(Vec<u8>, String, Option<String>), String> {
    let mask_size = size;
    let file_name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let crate::imageio::Frames { stored, displayed, exif } =
        crate::imageio::frames(path).map_err(|e| e.to_string())?;
    let fits = |s: (u32, u32)| s == mask_size;
    let (m_w, m_h) = mask_size;
    if exif == 1 {
        if !fits(stored) {
            return Err(format!(
                "the image is {}x{} and its mask {m_w}x{m_h}: a mask must have its image's size",
                stored.0, stored.1
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        return Ok((bytes, file_name, None));
    }
    // An EXIF orientation: write the frame the mask fits, as a PNG without the tag.
    let (img, frame) = if fits(stored) && !(prefer_displayed && fits(displayed)) {
        (crate::imageio::load_rgb_stored(path).map_err(|e| e.to_string())?, "stored")
    } else if fits(displayed) {
        (crate::imageio::load_rgb(path).map_err(|e| e.to_string())?, "displayed (EXIF applied)")
    } else {
        return Err(format!(
            "the image is {}x{} ({}x{} as displayed) and its mask {m_w}x{m_h}: a mask must have its image's size",
            stored.0, stored.1, displayed.0, displayed.1
        ));
    };
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).map_err(|e| e.to_string())?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let note = format!(
        "{}: EXIF orientation {exif}; the mask fits the {frame} pixels, written as {stem}.png without the tag",
        path.display()
    );
    Ok((png, format!("{stem}.png"), Some(note)))
}

/// The temporary folder a split of `out` is written into (emptied if an interrupted import
/// left it).
pub(super) fn begin_split(out: &Path, split: &str) -> Result<PathBuf, DataError> {
    let tmp = out.join(format!(".import-{split}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    Ok(tmp)
}

/// Write `coco` as the split's annotation file in `tmp` and rename `tmp` into place as
/// `target` (which the caller checked is absent or empty).
pub(super) fn finish_split(tmp: &Path, target: &Path, coco: &serde_json::Value) -> Result<(), DataError> {
    let file = tmp.join(super::coco::ANNOTATION_FILE);
    let text = serde_json::to_vec(coco).map_err(|e| io(&file, e))?;
    crate::fsutil::write_atomic(&file, &text).map_err(|e| io(&file, e))?;
    if target.exists() {
        std::fs::remove_dir(target).map_err(|e| io(target, e))?;
    }
    std::fs::rename(tmp, target).map_err(|e| io(target, e))
}

/// Import image + mask pairs as `opts` says (see the module docs).
pub fn import_masks(opts: &ImportOptions) -> Result<ImportSummary, DataError> {
    if !["train", "valid", "test"].contains(&opts.split.as_str()) {
        let hint = if opts.split == "val" { " (training reads valid/, not val/)" } else { "" };
        return Err(invalid(format!("--split {}: use train, valid or test{hint}", opts.split)));
    }
    for (flag, share) in [("--valid-share", opts.valid_share), ("--test-share", opts.test_share)] {
        if !(0.0..1.0).contains(&share) {
            return Err(invalid(format!("{flag} {share}: use a share in [0, 1)")));
        }
    }
    if opts.valid_share + opts.test_share >= 1.0 {
        return Err(invalid("--valid-share and --test-share leave no images for the split".into()));
    }
    if opts.classes.is_empty() {
        return Err(invalid("name what the masks show: --prompt crack, or --class 1=crack per class".into()));
    }
    if opts.classes.len() > 254 {
        return Err(invalid(format!("{} classes (at most 254)", opts.classes.len())));
    }
    let key = |name: &str| name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    for (i, c) in opts.classes.iter().enumerate() {
        if key(&c.name).is_empty() {
            return Err(invalid(
                "an empty class name: the name is the text prompt the class trains (--prompt crack, or --class 1=crack)"
                    .into(),
            ));
        }
        if let Some(d) = opts.classes[..i].iter().find(|d| d.value == c.value) {
            return Err(invalid(format!(
                "the mask value of `{}` is also `{}`'s: one --class per value",
                c.name, d.name
            )));
        }
        if let Some(d) = opts.classes[..i].iter().find(|d| key(&d.name) == key(&c.name)) {
            return Err(invalid(format!(
                "two --class values are named `{}` (`{}`): each class is one text prompt, so they would be two categories with one prompt; give the values one class (relabel the masks), or name them apart",
                c.name, d.name
            )));
        }
    }
    let (pairs, missing, unmatched) = pair(&opts.images, &opts.masks)?;
    if pairs.is_empty() {
        return Err(invalid(format!(
            "no image in {} has a mask in {}: a mask is paired by file stem (crack_01.jpg ↔ crack_01.png), \
             optionally with a suffix such as {} ({} images without a mask, {} masks without an image)",
            opts.images.display(),
            opts.masks.display(),
            MASK_SUFFIXES[..4].join(", "),
            missing.len(),
            unmatched.len()
        )));
    }
    let mut summary = ImportSummary {
        left_out: missing.into_iter().map(|p| (p, "no mask with its file stem".to_string())).collect(),
        unmatched_masks: unmatched,
        ..Default::default()
    };
    let names: Vec<String> = pairs
        .iter()
        .map(|(im, _)| im.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default())
        .collect();
    let splits = assign_splits(&names, opts);
    // Refuse before writing anything: each split folder must be new or empty.
    let mut order: Vec<&str> = Vec::new();
    for s in &splits {
        if !order.contains(&s.as_str()) {
            order.push(s);
        }
    }
    for s in &order {
        let dir = opts.out.join(s);
        if dir.exists() && std::fs::read_dir(&dir).map_err(|e| io(&dir, e))?.next().is_some() {
            return Err(io(
                &dir,
                "the split folder exists and is not empty: choose a new --out or another --split (import never mixes with other files)",
            ));
        }
    }
    let mut large = 0;
    for s in order {
        let tmp = begin_split(&opts.out, s)?;
        let mut done = SplitImport { split: s.to_string(), ..Default::default() };
        let (mut images, mut annotations) = (Vec::new(), Vec::new());
        let mut taken = std::collections::HashSet::new();
        for ((im, mask), _) in pairs.iter().zip(&splits).filter(|(_, sp)| sp.as_str() == s) {
            let map = match read_mask(mask, &opts.classes) {
                Ok(m) => m,
                Err(e) => {
                    summary.left_out.push((im.clone(), format!("its mask {}: {e}", mask.display())));
                    continue;
                }
            };
            let (bytes, file_name, note) = match image_for_mask(im, (map.width as u32, map.height as u32)) {
                Ok(x) => x,
                Err(e) => {
                    summary.left_out.push((im.clone(), format!("{e} (mask {})", mask.display())));
                    continue;
                }
            };
            if !taken.insert(file_name.to_lowercase()) {
                summary.left_out.push((im.clone(), format!("a second image named {file_name} in {s}/")));
                continue;
            }
            summary.notes.extend(note);
            if map.unmatched > 0 {
                summary.notes.push(format!(
                    "{}: {} non-zero pixels match no --class value (left as background)",
                    mask.display(),
                    map.unmatched
                ));
            }
            if map.width.max(map.height) > 2 * 1008 {
                large += 1;
            }
            let path = tmp.join(&file_name);
            crate::fsutil::write_atomic(&path, &bytes).map_err(|e| io(&path, e))?;
            let id = images.len() as u64 + 1;
            images.push(serde_json::json!({"id": id, "file_name": file_name, "width": map.width,
                                           "height": map.height, "mask_file": mask.file_name().map(|f| f.to_string_lossy().into_owned())}));
            let mut objects = 0;
            for r in regions(&map, opts.instances) {
                if r.pixels < opts.min_pixels.max(1) {
                    done.small_regions_dropped += 1;
                    continue;
                }
                objects += 1;
                annotations.push(serde_json::json!({
                    "id": annotations.len() as u64 + 1, "image_id": id, "category_id": r.class as u64,
                    "bbox": r.bbox, "area": r.pixels, "iscrowd": 0,
                    "segmentation": {"size": [map.height, map.width],
                                     "counts": super::rle::encode_compressed_counts(&r.counts)},
                }));
            }
            done.images += 1;
            done.objects += objects;
            done.negatives += (objects == 0) as usize;
        }
        let categories: Vec<serde_json::Value> = opts
            .classes
            .iter()
            .enumerate()
            .map(|(k, c)| serde_json::json!({"id": k + 1, "name": c.name, "supercategory": "none"}))
            .collect();
        let coco = serde_json::json!({
            "images": images, "annotations": annotations, "categories": categories,
            "info": {"description": format!("imported by lorahost from {} and {}", opts.images.display(), opts.masks.display())},
        });
        finish_split(&tmp, &opts.out.join(s), &coco)?;
        summary.splits.push(done);
    }
    if large > 0 {
        summary.notes.push(format!(
            "{large} image(s) are over 2016 px on a side: at SAM3's 1008-pixel input thin structures shrink \
             (F20); `lorahost tile` cuts them into full-resolution tiles"
        ));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::coco::Dataset;

    fn classes(name: &str) -> Vec<MaskClass> {
        vec![MaskClass { value: MaskValue::Foreground, name: name.into() }]
    }

    fn options(images: &Path, masks: &Path, out: &Path) -> ImportOptions {
        ImportOptions {
            images: images.into(),
            masks: masks.into(),
            out: out.into(),
            classes: classes("crack"),
            split: "train".into(),
            valid_share: 0.0,
            test_share: 0.0,
            instances: Instances::Components,
            min_pixels: 1,
            seed: 0,
        }
    }

    fn save(img: image::DynamicImage, path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }

    fn photo(w: u32, h: u32) -> image::DynamicImage {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8, y as u8, 90])
        }))
    }

    /// A grey mask `w`×`h` with `value` where `on(x, y)`.
    fn gray(w: u32, h: u32, value: u8, on: impl Fn(u32, u32) -> bool) -> image::DynamicImage {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if on(x, y) { value } else { 0 }])
        }))
    }

    #[test]
    fn class_arguments_parse_and_refuse_the_background() {
        assert_eq!("1=crack".parse::<MaskClass>().unwrap().value, MaskValue::Gray(1));
        assert_eq!(
            "255, 0,0 = spalling".parse::<MaskClass>().unwrap(),
            MaskClass { value: MaskValue::Rgb([255, 0, 0]), name: "spalling".into() }
        );
        for bad in ["crack", "0=bg", "1=", "x=crack", "1,2=a", "256,0,0=a"] {
            assert!(bad.parse::<MaskClass>().is_err(), "{bad}");
        }
    }

    /// Classes that would make ambiguous categories are refused before anything is written (an
    /// empty name, one value twice, one name twice); a grey level above 255 matches no pixel of
    /// an 8-bit mask (it used to saturate onto 255).
    #[test]
    fn ambiguous_classes_are_refused_and_high_levels_match_no_8_bit_pixel() {
        let d = tempfile::tempdir().unwrap();
        let (images, masks, out) = (d.path().join("images"), d.path().join("masks"), d.path().join("data"));
        save(photo(20, 10), &images.join("a.png"));
        save(gray(20, 10, 255, |x, _| x < 5), &masks.join("a.png"));
        let with = |list: &[&str]| ImportOptions {
            classes: list.iter().map(|c| c.parse::<MaskClass>().unwrap()).collect(),
            ..options(&images, &masks, &out)
        };
        let empty = ImportOptions { classes: classes("  "), ..options(&images, &masks, &out) };
        for (opts, want) in [
            (empty, "empty class name"),
            (with(&["1=crack", "1=spalling"]), "one --class per value"),
            (with(&["1=crack", "2=Crack "]), "named `Crack`"),
        ] {
            let e = import_masks(&opts).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!out.exists());
        }
        let s = import_masks(&with(&["300=spalling"])).unwrap();
        assert_eq!(s.splits[0].objects, 0, "{s:?}");
    }

    /// The regions' RLE equals the postprocess encoder's on each region's own mask, 8-connected
    /// pixels join, and each class's regions stay apart.
    #[test]
    fn regions_are_8_connected_and_encode_like_coco() {
        let (w, h) = (7, 5);
        #[rustfmt::skip]
        let class: Vec<u8> = vec![
            1, 0, 0, 0, 0, 2, 2,
            0, 1, 0, 0, 0, 2, 0,
            0, 0, 0, 1, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 1,
            1, 1, 0, 0, 0, 0, 1,
        ];
        let map = ClassMap { width: w, height: h, class: class.clone(), unmatched: 0 };
        let rs = regions(&map, Instances::Components);
        // (0,0)-(1,1) diagonal; (3,2) alone; the class-2 corner; the bottom-left pair; the right pair.
        let sizes: Vec<(u8, usize)> = rs.iter().map(|r| (r.class, r.pixels)).collect();
        assert_eq!(sizes, vec![(1, 2), (2, 3), (1, 1), (1, 2), (1, 2)]);
        for r in &rs {
            let mask = crate::data::rle::decode_counts(&r.counts, h, w).unwrap();
            let again = crate::sam3::postprocess::rle_encode(&mask, h, w);
            assert_eq!(again.counts, r.counts);
            assert_eq!(crate::data::mask_bounds(&mask, w), Some(r.bbox));
            assert!(mask.iter().zip(&class).all(|(m, c)| !*m || *c == r.class));
        }
        let whole = regions(&map, Instances::Whole);
        assert_eq!(whole.iter().map(|r| (r.class, r.pixels)).collect::<Vec<_>>(), vec![(1, 7), (2, 3)]);
    }

    /// Binary masks of every usual kind import to the same objects, load back as a dataset with
    /// the exact pixels, and pair by stem with and without suffixes.
    #[test]
    fn binary_masks_of_each_kind_load_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let (images, masks, out) = (d.path().join("images"), d.path().join("masks"), d.path().join("data"));
        let crack = |x: u32, y: u32| x == y || (x > 30 && y < 4);
        for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            save(photo(40, 32), &images.join(format!("{name}.jpg")));
            let m = match i {
                0 => gray(40, 32, 255, crack), // 0/255 PNG
                1 => gray(40, 32, 1, crack),   // 0/1 PNG
                2 => image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 32, |x, y| {
                    image::Rgb(if crack(x, y) { [200, 0, 0] } else { [0, 0, 0] })
                    // a red mask
                })),
                3 => image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(40, 32, |x, y| {
                    image::Rgba([255, 255, 255, if crack(x, y) { 255 } else { 0 }])
                    // alpha mask
                })),
                _ => image::DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(40, 32, |x, y| {
                    image::Luma([if crack(x, y) { 65535u16 } else { 0 }])
                })),
            };
            let file = if i % 2 == 0 { format!("{name}.png") } else { format!("{name}_mask.png") };
            save(m, &masks.join(file));
        }
        save(photo(40, 32), &images.join("lonely.jpg"));
        save(gray(40, 32, 255, crack), &masks.join("orphan.png"));
        let s = import_masks(&options(&images, &masks, &out)).unwrap();
        assert_eq!(s.splits.len(), 1);
        assert_eq!((s.splits[0].images, s.splits[0].objects, s.splits[0].negatives), (5, 10, 0));
        assert_eq!(s.left_out.len(), 1);
        assert!(s.left_out[0].0.ends_with("lonely.jpg"), "{:?}", s.left_out);
        assert_eq!(s.unmatched_masks, vec![masks.join("orphan.png")]);
        let ds = Dataset::load(&out).unwrap();
        let split = ds.split("train").unwrap();
        assert_eq!(split.categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["crack"]);
        let findings = ds.preflight();
        assert!(findings.is_empty(), "{findings:?}");
        let expected: Vec<bool> = (0..32).flat_map(|y| (0..40).map(move |x| crack(x, y))).collect();
        for im in &split.images {
            assert_eq!(im.objects.len(), 2, "{}", im.file_name);
            let mut union = vec![false; 40 * 32];
            for o in &im.objects {
                let m = o.segmentation.as_ref().unwrap().decode(32, 40).unwrap();
                union.iter_mut().zip(m).for_each(|(u, v)| *u |= v);
            }
            assert_eq!(union, expected, "{}", im.file_name);
        }
        // The images are the files themselves.
        assert_eq!(
            std::fs::read(out.join("train/a.jpg")).unwrap(),
            std::fs::read(images.join("a.jpg")).unwrap()
        );
        // Importing into the same split again is refused, and nothing changes.
        let before = std::fs::read(out.join("train/_annotations.coco.json")).unwrap();
        let e = import_masks(&options(&images, &masks, &out)).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        assert_eq!(std::fs::read(out.join("train/_annotations.coco.json")).unwrap(), before);
    }

    /// Class masks: one category per --class, pixels matched by value, empty masks as negatives,
    /// noise regions dropped, masks in the images' folder found by suffix, shares split off by
    /// name whatever the order.
    #[test]
    fn label_masks_split_and_shared_folders() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("all");
        for i in 0..10u32 {
            save(photo(24, 24), &dir.join(format!("img{i}.png")));
            save(
                gray(24, 24, if i.is_multiple_of(2) { 1 } else { 2 }, |x, y| {
                    i != 9 && (x < 6 && y < 6 || (x == 20 && y == 20))
                }),
                &dir.join(format!("img{i}_label.png")),
            );
        }
        let out = d.path().join("data");
        let mut o = options(&dir, &dir, &out);
        o.classes =
            vec!["1=crack".parse().unwrap(), "2=spalling".parse().unwrap(), "3=joint".parse().unwrap()];
        o.min_pixels = 4;
        o.valid_share = 0.2;
        o.test_share = 0.1;
        let s = import_masks(&o).unwrap();
        assert!(s.left_out.is_empty() && s.unmatched_masks.is_empty(), "{s:?}");
        let count = |n: &str| s.splits.iter().find(|x| x.split == n).map_or(0, |x| x.images);
        assert_eq!((count("train"), count("valid"), count("test")), (7, 2, 1));
        let total: usize = s.splits.iter().map(|x| x.small_regions_dropped).sum();
        assert_eq!(total, 9, "each single-pixel region dropped");
        assert_eq!(s.splits.iter().map(|x| x.negatives).sum::<usize>(), 1);
        let ds = Dataset::load(&out).unwrap();
        let names: Vec<_> = ds.split("train").unwrap().categories.iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, ["crack", "spalling", "joint"]);
        for split in ["train", "valid", "test"] {
            for im in &ds.split(split).unwrap().images {
                let i: usize =
                    im.file_name.trim_start_matches("img").trim_end_matches(".png").parse().unwrap();
                let want = if i == 9 { vec![] } else { vec![if i.is_multiple_of(2) { 1 } else { 2 }] };
                assert_eq!(im.objects.iter().map(|o| o.category_id).collect::<Vec<_>>(), want);
            }
        }
        // The same names in another order and folder split the same way.
        let names: Vec<String> = (0..10).map(|i| format!("img{i}.png")).collect();
        let mut rev = names.clone();
        rev.reverse();
        let a = assign_splits(&names, &o);
        let mut b = assign_splits(&rev, &o);
        b.reverse();
        assert_eq!(a, b);
    }

    /// An image with an EXIF rotation is written as a PNG in the frame its mask fits, so the
    /// pixels under each mask are the ones it was drawn on.
    #[test]
    fn exif_rotated_images_are_written_in_their_masks_frame() {
        let d = tempfile::tempdir().unwrap();
        let (images, masks, out) = (d.path().join("i"), d.path().join("m"), d.path().join("o"));
        std::fs::create_dir_all(&images).unwrap();
        let pic = image::RgbImage::from_fn(40, 32, |x, y| image::Rgb([(x * 6) as u8, (y * 7) as u8, 0]));
        let jpeg = crate::imageio::tests::jpeg_with_orientation(&pic, 6);
        std::fs::write(images.join("shown.jpg"), &jpeg).unwrap();
        std::fs::write(images.join("stored.jpg"), &jpeg).unwrap();
        save(gray(32, 40, 255, |x, _| x < 2), &masks.join("shown.png")); // the displayed frame
        save(gray(40, 32, 255, |x, _| x < 2), &masks.join("stored.png")); // the stored one
        let s = import_masks(&options(&images, &masks, &out)).unwrap();
        assert!(s.left_out.is_empty(), "{:?}", s.left_out);
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        let shown = crate::imageio::load_rgb(&images.join("shown.jpg")).unwrap();
        let stored = crate::imageio::load_rgb_stored(&images.join("stored.jpg")).unwrap();
        for (name, want) in [("shown.png", shown), ("stored.png", stored)] {
            let f = crate::imageio::frames(&out.join("train").join(name)).unwrap();
            assert_eq!((f.stored, f.displayed, f.exif), (want.dimensions(), want.dimensions(), 1), "{name}");
            assert_eq!(crate::imageio::load_rgb(&out.join("train").join(name)).unwrap(), want, "{name}");
        }
        let ds = Dataset::load(&out).unwrap();
        assert!(ds.preflight().is_empty(), "{:?}", ds.preflight());
    }

    /// A data_dir of images and mask images (in folders, or beside them with a suffix, at the
    /// top or under train/) gets a missing-split error that names `lorahost import`.
    #[test]
    fn mask_layouts_are_recognised_where_a_coco_export_is_expected() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        save(photo(8, 8), &a.join("Images/x.jpg"));
        save(gray(8, 8, 255, |_, _| true), &a.join("GT/x.png"));
        assert_eq!(looks_like_mask_pairs(&a, "train"), Some((a.join("Images"), a.join("GT"))));
        let e = Dataset::load(&a).unwrap_err().to_string();
        assert!(e.contains("lorahost import --images") && e.contains("GT --prompt NAME"), "{e}");
        let b = d.path().join("b");
        save(photo(8, 8), &b.join("train/x.jpg"));
        save(gray(8, 8, 255, |_, _| true), &b.join("train/x_mask.png"));
        assert_eq!(looks_like_mask_pairs(&b, "train"), Some((b.join("train"), b.join("train"))));
        let c = d.path().join("c");
        save(photo(8, 8), &c.join("train/x.jpg"));
        assert_eq!(looks_like_mask_pairs(&c, "train"), None);
        assert!(!Dataset::load(&c).unwrap_err().to_string().contains("lorahost import"));
    }

    /// A dataset folder split into train/ val/ test/, each with images/ and masks/, imports
    /// each into its split (val → valid); shares are refused for it; an unsplit folder imports
    /// into the split asked for.
    #[test]
    fn a_split_dataset_folder_imports_split_by_split() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("Crack500");
        for (split, n) in [("train", 3), ("val", 2), ("test", 1)] {
            for i in 0..n {
                save(photo(16, 16), &src.join(format!("{split}/images/{split}{i}.jpg")));
                save(gray(16, 16, 255, |x, _| x == 3), &src.join(format!("{split}/masks/{split}{i}.png")));
            }
        }
        let out = d.path().join("data");
        let s = import_dataset(&src, &options(Path::new(""), Path::new(""), &out)).unwrap();
        let got: Vec<(String, usize)> = s.splits.iter().map(|x| (x.split.clone(), x.images)).collect();
        assert_eq!(got, [("test".to_string(), 1), ("train".to_string(), 3), ("valid".to_string(), 2)]);
        let ds = Dataset::load(&out).unwrap();
        assert_eq!(ds.split("valid").unwrap().images.len(), 2);
        let mut o = options(Path::new(""), Path::new(""), &d.path().join("data2"));
        o.valid_share = 0.2;
        assert!(import_dataset(&src, &o).unwrap_err().to_string().contains("split already"));
        let e = import_dataset(&src, &options(Path::new(""), Path::new(""), &out)).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        // One unsplit folder: into --split, with shares.
        let flat = src.join("train");
        let mut o = options(Path::new(""), Path::new(""), &d.path().join("data3"));
        o.valid_share = 0.34;
        let s = import_dataset(&flat, &o).unwrap();
        assert_eq!(s.splits.iter().map(|x| x.images).sum::<usize>(), 3);
        assert_eq!(s.splits.len(), 2);
        assert!(import_dataset(d.path(), &o)
            .unwrap_err()
            .to_string()
            .contains("holds no images with mask images"));
    }

    /// A mask of another size is left out with both sizes named; a bad split name or no pairs
    /// at all is an error naming the fix.
    #[test]
    fn mismatches_are_named() {
        let d = tempfile::tempdir().unwrap();
        let (images, masks, out) = (d.path().join("i"), d.path().join("m"), d.path().join("o"));
        save(photo(30, 20), &images.join("x.jpg"));
        save(gray(20, 30, 255, |x, _| x < 3), &masks.join("x.png"));
        save(photo(30, 20), &images.join("y.jpg"));
        save(gray(30, 20, 255, |x, _| x < 3), &masks.join("y.png"));
        let s = import_masks(&options(&images, &masks, &out)).unwrap();
        assert_eq!(s.splits[0].images, 1);
        assert!(s.left_out[0].1.contains("30x20") && s.left_out[0].1.contains("20x30"), "{:?}", s.left_out);
        let mut o = options(&images, &masks, &d.path().join("o2"));
        o.split = "val".into();
        assert!(import_masks(&o).unwrap_err().to_string().contains("valid/, not val/"));
        let e = import_masks(&options(&images, &out, &d.path().join("o3"))).unwrap_err().to_string();
        assert!(e.contains("no image in") && e.contains("paired by file stem"), "{e}");
    }
}
