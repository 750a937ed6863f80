//! Loading the Roboflow COCO layout, preflight checks, dataset fingerprint and prompt queries.
//!
//! An annotation without a usable `bbox` takes its box from its segmentation's bounds (as
//! pycocotools and Roboflow do), with a warning. One that cannot be used (no box and no
//! segmentation to take one from, unknown category or image) is dropped *as a whole* and
//! reported, so objects and their category names never go out of step (seed-trainer F23); its
//! category is never a negative prompt for its image (the object is there). One whose
//! segmentation cannot be used keeps its box and class as a box-only object (dropping it would
//! teach "absent" for a real object). Ids are read leniently
//! (integral floats, digit strings); an image id used twice leaves those images and their
//! annotations out, since the annotations cannot be told apart. Boxes partly outside the image
//! are clipped when a sample is built, and reported by the preflight.

use super::{rle, DataError, SplitMix64};
use crate::fsutil::hex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The annotation file name in each split folder (Roboflow export).
pub const ANNOTATION_FILE: &str = "_annotations.coco.json";

/// Category names that carry no meaning as a text prompt.
const GENERIC_NAMES: &[&str] =
    &["object", "objects", "class", "classes", "thing", "item", "label", "none", "null", "background", "bg"];

#[derive(Deserialize)]
struct RawFile {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    #[serde(default)]
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: Value,
    file_name: String,
    #[serde(default)]
    width: Option<Value>,
    #[serde(default)]
    height: Option<Value>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    #[serde(default)]
    id: Option<Value>,
    image_id: Value,
    category_id: Value,
    #[serde(default)]
    bbox: Option<Value>,
    #[serde(default)]
    segmentation: Option<Value>,
    #[serde(default)]
    iscrowd: Option<Value>,
}

#[derive(Deserialize)]
struct RawCategory {
    id: Value,
    name: Value,
}

/// A COCO id as written by different tools: an integer, an integral float (pandas) or a
/// string of digits. None for anything else.
fn as_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15).map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The largest image width or height taken from the JSON: anything above is no real size.
const MAX_JSON_DIM: u64 = 1_000_000;

/// An image width or height (None for absent, 0, or not a usable pixel count: some exporters
/// write 0).
fn as_dim(v: Option<&Value>) -> Option<u32> {
    as_id(v?).filter(|d| *d > 0 && *d <= MAX_JSON_DIM).map(|d| d as u32)
}

/// A width or height given but unusable (negative, fractional, absurdly large, not a number),
/// as JSON; None when usable, absent, null or 0 (the "unknown" some exporters write).
fn bad_dim(v: Option<&Value>) -> Option<String> {
    let v = v?;
    (!v.is_null() && as_id(v) != Some(0) && as_dim(Some(v)).is_none()).then(|| show(v))
}

/// A JSON value for a message: compact, truncated.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// A parsed COCO segmentation.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// Polygons in pixels, unioned.
    Polygons(Vec<Vec<f64>>),
    /// Run counts (uncompressed list, or decoded from the compressed string) of an `h`×`w` mask.
    Rle {
        /// Mask height.
        h: usize,
        /// Mask width.
        w: usize,
        /// Column-major run counts, background first.
        counts: Vec<u64>,
    },
}

impl Segmentation {
    /// Parse a COCO `segmentation` value. `Ok(None)` for an empty list (no mask).
    pub fn parse(v: &Value) -> Result<Option<Self>, String> {
        match v {
            Value::Array(a) if a.is_empty() => Ok(None),
            // A flat list of numbers: one polygon written without the outer list.
            Value::Array(a) if a.iter().all(Value::is_number) => {
                let coords: Vec<f64> = a.iter().filter_map(Value::as_f64).collect();
                Ok(Some(Self::Polygons(vec![coords])))
            }
            Value::Array(a) => {
                let mut polys = Vec::with_capacity(a.len());
                for (i, p) in a.iter().enumerate() {
                    let Value::Array(p) = p else {
                        return Err(format!(
                            "segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...]; item {i} is {}",
                            show(p)
                        ));
                    };
                    let coords: Option<Vec<f64>> = p.iter().map(Value::as_f64).collect();
                    polys.push(coords.ok_or_else(|| {
                        format!(
                            "polygon {i} has a coordinate that is not a number ({})",
                            show(&Value::Array(p.clone()))
                        )
                    })?);
                }
                Ok(Some(Self::Polygons(polys)))
            }
            Value::Object(o) => {
                let size = o
                    .get("size")
                    .and_then(Value::as_array)
                    .filter(|s| s.len() == 2)
                    .and_then(|s| Some([s[0].as_u64()? as usize, s[1].as_u64()? as usize]))
                    .ok_or("RLE needs \"size\": [height, width]")?;
                let counts = match o.get("counts") {
                    Some(Value::String(s)) => rle::decode_compressed_counts(s)?,
                    Some(Value::Array(c)) => c
                        .iter()
                        .map(Value::as_u64)
                        .collect::<Option<Vec<u64>>>()
                        .ok_or("RLE counts list has a non-integer")?,
                    _ => return Err("RLE needs \"counts\" (a list of runs or a compressed string)".into()),
                };
                Ok(Some(Self::Rle { h: size[0], w: size[1], counts }))
            }
            other => Err(format!("unknown segmentation type {}", type_name(other))),
        }
    }

    /// Decode into a row-major mask of the image's size (`h`×`w`).
    pub fn decode(&self, h: usize, w: usize) -> Result<Vec<bool>, String> {
        match self {
            Self::Polygons(p) => rle::rasterize_polygons(p, h, w),
            Self::Rle { h: rh, w: rw, counts } => {
                if (*rh, *rw) != (h, w) {
                    return Err(format!("RLE size is {rh}x{rw} but the image is {h}x{w}"));
                }
                rle::decode_counts(counts, h, w)
            }
        }
    }
}

impl Segmentation {
    /// The mask inside its extent (grown by 2 px, within the image) of an `h`×`w` image: the
    /// window and its pixels, row-major; None when it covers nothing. What [`Self::decode`]
    /// gives there, without a whole-image mask per object.
    pub fn decode_extent(&self, h: usize, w: usize) -> Result<Option<(rle::Window, Vec<bool>)>, String> {
        let Some([ex0, ey0, ex1, ey1]) = self.extent(h, w) else { return Ok(None) };
        let x0 = (ex0.floor() as usize).saturating_sub(2);
        let y0 = (ey0.floor() as usize).saturating_sub(2);
        let x1 = ((ex1.ceil() as usize) + 2).min(w);
        let y1 = ((ey1.ceil() as usize) + 2).min(h);
        if x1 <= x0 || y1 <= y0 {
            return Ok(None);
        }
        let win = rle::Window { x0, y0, w: x1 - x0, h: y1 - y0 };
        let mask = match self {
            Self::Polygons(p) => rle::rasterize_polygons_in(p, h, w, win)?,
            Self::Rle { h: rh, w: rw, counts } => {
                if (*rh, *rw) != (h, w) {
                    return Err(format!("RLE size is {rh}x{rw} but the image is {h}x{w}"));
                }
                rle::decode_counts_in(counts, h, w, win)?
            }
        };
        Ok(Some((win, mask)))
    }

    /// The extent [x0, y0, x1, y1] in pixels of an `h`×`w` image, from the geometry (polygon
    /// coordinates of the polygons that enclose anything, clipped; RLE runs), without rasterizing.
    /// None when it covers nothing.
    pub fn extent(&self, h: usize, w: usize) -> Option<[f64; 4]> {
        let (mut x0, mut y0, mut x1, mut y1) =
            (f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
        match self {
            Self::Polygons(polys) => {
                for p in polys.iter().filter(|p| p.len() >= 6) {
                    for xy in p.chunks_exact(2) {
                        let (x, y) = (xy[0].clamp(0.0, w as f64), xy[1].clamp(0.0, h as f64));
                        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                    }
                }
            }
            Self::Rle { h: rh, counts, .. } => {
                let rh = (*rh).max(1);
                let mut i = 0usize;
                for (k, &c) in counts.iter().enumerate() {
                    let c = c as usize;
                    if k % 2 == 1 && c > 0 {
                        let (first, last) = (i, i + c - 1);
                        let (cx0, cx1) = (first / rh, last / rh);
                        let (ry0, ry1) = if cx0 == cx1 { (first % rh, last % rh) } else { (0, rh - 1) };
                        x0 = x0.min(cx0 as f64);
                        x1 = x1.max(cx1 as f64 + 1.0);
                        y0 = y0.min(ry0 as f64);
                        y1 = y1.max(ry1 as f64 + 1.0);
                    }
                    i += c;
                }
            }
        }
        (x1 > x0 && y1 > y0).then_some([x0, y0, x1, y1])
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// One category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Category {
    /// COCO id.
    pub id: u64,
    /// Name as in the file.
    pub name: String,
    /// The text prompt: the name lower-cased, its whitespace runs one space ([`prompt_text`]).
    pub prompt: String,
    /// Whether at least one usable annotation has this category (only those become negatives).
    pub used: bool,
}

/// One usable object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// COCO annotation id.
    pub ann_id: u64,
    /// COCO category id.
    pub category_id: u64,
    /// Box [x, y, w, h] in pixels as in the file (w, h > 0).
    pub bbox_xywh: [f64; 4],
    /// Mask, if the annotation has one.
    pub segmentation: Option<Segmentation>,
    /// COCO `iscrowd`.
    pub iscrowd: bool,
}

/// One image with its usable objects.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    /// COCO image id.
    pub id: u64,
    /// `file_name` as in the file.
    pub file_name: String,
    /// `split_dir / file_name`.
    pub path: PathBuf,
    /// (width, height) from the JSON, if given. The real size is read from the file.
    pub json_size: Option<(u32, u32)>,
    /// Usable objects.
    pub objects: Vec<Object>,
    /// Categories of this image's annotations that could not be used (dropped), and, for an
    /// image listed twice, the other entry's categories: such an object is in the picture, so
    /// its category is never drawn as a negative ("absent") prompt for this image.
    pub dropped_categories: BTreeSet<u64>,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The data is wrong: the image or annotation is dropped or cannot be used.
    Error,
    /// Suspicious; training proceeds.
    Warning,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The image file does not exist or cannot be read.
    MissingImage,
    /// The image file cannot be decoded.
    CorruptImage,
    /// An annotation without a (well-formed) `bbox`, and no segmentation to take one from.
    MissingBox,
    /// An annotation without a usable `bbox` whose box is taken from its segmentation's
    /// bounds (as pycocotools and Roboflow do).
    DerivedBox,
    /// A box with w ≤ 0 or h ≤ 0, or non-finite values.
    DegenerateBox,
    /// A box reaching outside the image; it is clipped to the image.
    BoxOutsideImage,
    /// A polygon with points far outside the image (another unit or format?); its mask is
    /// still used, clipped to the image.
    PolygonOutsideImage,
    /// A segmentation that cannot be decoded (unknown type, bad RLE, bad polygon, size mismatch).
    UndecodableMask,
    /// A mask that decodes to no pixels.
    EmptyMask,
    /// An annotation whose category id is not in `categories`.
    UnknownCategory,
    /// An annotation whose image id is not in `images`.
    UnknownImage,
    /// Two images or annotations share an id.
    DuplicateId,
    /// An image with no usable annotations.
    ImageWithoutAnnotations,
    /// The decoded size (EXIF orientation applied) differs from the JSON width/height.
    SizeMismatch,
    /// A category name that makes a poor prompt (empty, numeric, generic).
    PoorPrompt,
    /// Two categories share a prompt after lower-casing (they are merged into one query).
    DuplicatePrompt,
    /// A category no annotation uses (e.g. Roboflow's super-category 0); never a negative.
    UnusedCategory,
    /// `iscrowd: 1` annotations (trained as single instances).
    Crowd,
    /// A bbox that disagrees with its mask the way [x0, y0, x1, y1] or normalized boxes do (F5).
    BoxFormat,
    /// A split that is present but cannot be loaded and is not needed (`test/`).
    UnusedSplit,
}

/// One preflight finding, naming the file and the image/annotation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// What.
    pub kind: FindingKind,
    /// The split (`train`, `valid`, `test`).
    pub split: String,
    /// The annotation file (or image file for image problems).
    pub file: PathBuf,
    /// The image id, if any.
    pub image_id: Option<u64>,
    /// The annotation id, if any.
    pub ann_id: Option<u64>,
    /// Human-readable detail with the fix.
    pub message: String,
}

impl Finding {
    /// The finding without its severity (`file image N annotation M: message`), for a log line
    /// whose level already says it.
    pub fn located(&self) -> String {
        let mut s = self.file.display().to_string();
        if let Some(i) = self.image_id {
            s.push_str(&format!(" image {i}"));
        }
        if let Some(a) = self.ann_id {
            s.push_str(&format!(" annotation {a}"));
        }
        format!("{s}: {}", self.message)
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.located())
    }
}

/// One loaded split (`train`, `valid`, `test`).
#[derive(Debug, Clone)]
pub struct Split {
    /// Split name.
    pub name: String,
    /// The split folder.
    pub dir: PathBuf,
    /// Its `_annotations.coco.json`.
    pub annotation_file: PathBuf,
    /// SHA-256 of the annotation file bytes (hex).
    pub sha256: String,
    /// Categories in file order.
    pub categories: Vec<Category>,
    /// Images in file order.
    pub images: Vec<ImageEntry>,
    /// Total annotations in the file (usable or not).
    pub num_annotations: usize,
    /// Findings from parsing (no image decoding); [`Split::preflight`] adds image checks.
    pub findings: Vec<Finding>,
    /// The words that fill the negatives when too few categories are absent from an image
    /// ([`GENERIC_NEGATIVES`] unless [`Split::set_generic_negatives`] or
    /// [`Dataset::set_generic_negatives`] gave others); never one of the dataset's prompts.
    pub generic_negatives: Vec<String>,
}

/// The default generic negative words (`training.generic_negatives`): they fill the negative
/// prompts when a dataset has too few categories absent from an image (SAM3_LoRA adds 20 such
/// words too): without any negative, a model learns that every prompt is present (seed trainer
/// F7).
///
/// A generic negative is trained as "this is not in the image", so it must be a thing that is
/// almost never in the images people fine-tune on: inspection and defect photos (cracks,
/// corrosion, welds, PCBs, roads, facades), medical scans and aerial or satellite tiles. Words
/// such as road, sky, grass, tree, building, window, person or car are *in* many of those
/// images, and "there is no road" on a road-crack photo teaches the model to miss roads. These
/// are concrete nouns of small household objects, food, toys and musical instruments (most are
/// COCO or LVIS classes, which SAM3's text encoder knows): too small to see from the air,
/// absent from scans and surfaces, and sharing no word with common inspection classes (cone,
/// glass, plate, pipe, wire). Left out on purpose: fruit (produce-grading datasets), umbrellas,
/// kites and surfboards (aerial beach and street scenes), and large animals (aerial wildlife
/// surveys). Set `training.generic_negatives` to replace them (an empty list turns them off).
pub const GENERIC_NEGATIVES: &[&str] = &[
    "teddy bear",
    "toothbrush",
    "violin",
    "saxophone",
    "trumpet",
    "accordion",
    "harp",
    "xylophone",
    "pizza",
    "hot dog",
    "donut",
    "cupcake",
    "croissant",
    "pretzel",
    "lollipop",
    "ice cream",
    "birthday cake",
    "hair drier",
    "rubber duck",
    "teapot",
];

/// Whether two prompts name the same thing for negative drawing: equal without case and
/// surrounding space, or one is the other's plural with "s" / "es" ("teapot", "Teapots").
pub fn same_prompt(a: &str, b: &str) -> bool {
    let (a, b) = (prompt_text(a), prompt_text(b));
    let plural =
        |x: &str, y: &str| x.strip_suffix('s').is_some_and(|s| s == y || s.strip_suffix('e') == Some(y));
    a == b || plural(&a, &b) || plural(&b, &a)
}

/// The text prompt of a category name or word: lower-cased, its whitespace runs one space
/// (the tokenizer reads `hot  dog` as `hot dog`: they are one prompt).
pub fn prompt_text(name: &str) -> String {
    name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `words` as generic negatives: trimmed, lower-cased, without empties and repeats, and
/// without any that names one of `prompts` (a dataset's own categories are never fillers).
fn generic_words<S: AsRef<str>>(words: impl IntoIterator<Item = S>, prompts: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in words {
        let w = prompt_text(w.as_ref());
        if !w.is_empty() && !out.contains(&w) && !prompts.iter().any(|p| same_prompt(p, &w)) {
            out.push(w);
        }
    }
    out
}

/// A query: one prompt on one image with its targets (indices into the image's objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Text prompt (lower-cased category name).
    pub prompt: String,
    /// Indices into [`ImageEntry::objects`]; empty for a negative.
    pub objects: Vec<usize>,
    /// Whether this is a hard negative (category absent from the image).
    pub negative: bool,
}

fn prompt_problem(prompt: &str) -> Option<&'static str> {
    if prompt.is_empty() {
        Some("empty")
    } else if prompt.chars().all(|c| c.is_ascii_digit() || c.is_whitespace() || c == '-' || c == '_') {
        Some("numeric")
    } else if GENERIC_NAMES.contains(&prompt) {
        Some("generic")
    } else {
        None
    }
}

fn parse_bbox(v: Option<&Value>) -> Result<[f64; 4], FindingKind> {
    let Some(Value::Array(a)) = v else { return Err(FindingKind::MissingBox) };
    if a.len() != 4 {
        return Err(FindingKind::MissingBox);
    }
    let mut b = [0.0; 4];
    for (o, x) in b.iter_mut().zip(a) {
        *o = x.as_f64().ok_or(FindingKind::MissingBox)?;
    }
    if b.iter().any(|x| !x.is_finite()) || b[2] <= 0.0 || b[3] <= 0.0 {
        return Err(FindingKind::DegenerateBox);
    }
    Ok(b)
}

impl Split {
    /// Load `<data_dir>/<name>/_annotations.coco.json`. Fails only when the file is missing or
    /// is not COCO JSON; bad entries become [`Split::findings`].
    pub fn load(data_dir: &Path, name: &str) -> Result<Self, DataError> {
        let dir = data_dir.join(name);
        let annotation_file = dir.join(ANNOTATION_FILE);
        if annotation_file.is_dir() {
            return Err(DataError::Io {
                path: annotation_file,
                reason: "a folder where the split's COCO JSON file belongs: move the folder away and put the export's _annotations.coco.json there".into(),
            });
        }
        if !annotation_file.is_file() {
            let hint = if data_dir.join(ANNOTATION_FILE).is_file() {
                format!(
                    " ({} is itself a split folder: set data_dir to its parent, {})",
                    data_dir.display(),
                    data_dir.parent().map(|p| p.display().to_string()).unwrap_or_default()
                )
            } else if !data_dir.is_dir() {
                format!(" ({} does not exist)", data_dir.display())
            } else if let Some(format) = super::labels::detect(data_dir) {
                format!(
                    " ({} is a {format} dataset, not a COCO export: convert it with `lorahost import --from {} --out NEW_DIR` and set data_dir to NEW_DIR)",
                    data_dir.display(),
                    data_dir.display()
                )
            } else if let Some((images, masks)) = super::masks::looks_like_mask_pairs(data_dir, name) {
                let command = if super::masks::dataset_layout(data_dir, name).len() > 1 {
                    format!("lorahost import --from {}", data_dir.display())
                } else {
                    format!("lorahost import --images {} --masks {}", images.display(), masks.display())
                };
                format!(
                    " ({} holds images with mask images, not a COCO export: convert them with `{command} --prompt NAME --out NEW_DIR` and set data_dir to NEW_DIR)",
                    data_dir.display(),
                )
            } else {
                String::new()
            };
            return Err(DataError::MissingSplit { path: annotation_file, hint });
        }
        let bytes = std::fs::read(&annotation_file)
            .map_err(|e| DataError::Io { path: annotation_file.clone(), reason: e.to_string() })?;
        // A UTF-8 byte-order mark (Notepad, PowerShell) is not JSON; skip it.
        let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let de = &mut serde_json::Deserializer::from_slice(text);
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut reason = e.to_string();
            let t = String::from_utf8_lossy(text);
            if text.first() == Some(&b'[') {
                reason.push_str("; the top level must be an object {\"images\": [...], \"annotations\": [...], \"categories\": [...]}, not a list");
            } else if e.inner().is_syntax() && ["NaN", "Infinity"].iter().any(|w| t.contains(w)) {
                reason.push_str("; the file contains NaN or Infinity, which JSON does not allow (Python's json.dump writes them): replace them with numbers or null");
            }
            DataError::Json { path: annotation_file.clone(), reason }
        })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let file = annotation_file.clone();
        let mut findings = Vec::new();
        let mut finding = |severity, kind, image_id, ann_id, message: String| {
            findings.push(Finding {
                severity,
                kind,
                split: name.to_string(),
                file: file.clone(),
                image_id,
                ann_id,
                message,
            })
        };

        let mut categories: Vec<Category> = Vec::new();
        let mut cat_index: HashMap<u64, usize> = HashMap::new();
        for (k, c) in raw.categories.into_iter().enumerate() {
            let Some(id) = as_id(&c.id) else {
                finding(
                    Severity::Error,
                    FindingKind::UnknownCategory,
                    None,
                    None,
                    format!(
                        "categories[{k}] has id {}, not a non-negative integer; the category is ignored",
                        show(&c.id)
                    ),
                );
                continue;
            };
            let name = match c.name {
                Value::String(n) => n,
                other => other.to_string(),
            };
            let prompt = prompt_text(&name);
            let cat = Category { id, name, prompt, used: false };
            if let Some(&old) = cat_index.get(&id) {
                // pycocotools keeps the later entry; the earlier one must not stay a prompt.
                finding(
                    Severity::Error,
                    FindingKind::DuplicateId,
                    None,
                    None,
                    format!(
                        "category id {id} appears twice ({:?}, then {:?}); the later one ({:?}) is used, as pycocotools does: give each category its own id",
                        categories[old].name, cat.name, cat.name
                    ),
                );
                categories[old] = cat;
                continue;
            }
            cat_index.insert(id, categories.len());
            categories.push(cat);
        }

        // Image ids: a duplicated id makes its annotations ambiguous, so every image with that
        // id is left out, with its annotations.
        let mut id_count: HashMap<u64, Vec<String>> = HashMap::new();
        let mut raw_images = Vec::with_capacity(raw.images.len());
        for (k, im) in raw.images.into_iter().enumerate() {
            match as_id(&im.id) {
                Some(id) => {
                    id_count.entry(id).or_default().push(im.file_name.clone());
                    raw_images.push((id, im));
                }
                None => finding(
                    Severity::Error,
                    FindingKind::UnknownImage,
                    None,
                    None,
                    format!(
                        "images[{k}] ({}) has id {}, not a non-negative integer; the image is skipped",
                        im.file_name,
                        show(&im.id)
                    ),
                ),
            }
        }
        let mut ambiguous: HashMap<u64, usize> = HashMap::new();
        let mut images: Vec<ImageEntry> = Vec::new();
        let mut img_index: HashMap<u64, usize> = HashMap::new();
        let mut by_file: HashMap<String, u64> = HashMap::new();
        for (id, im) in raw_images {
            let files = &id_count[&id];
            if files.len() > 1 {
                if let std::collections::hash_map::Entry::Vacant(e) = ambiguous.entry(id) {
                    e.insert(0);
                    finding(
                        Severity::Error,
                        FindingKind::DuplicateId,
                        Some(id),
                        None,
                        format!(
                            "image id {id} is used by {} images ({}): their annotations cannot be told apart, so these images and the annotations with image_id {id} are left out; give every image a unique id",
                            files.len(),
                            files.join(", ")
                        ),
                    );
                }
                continue;
            }
            if let Some(other) = by_file.insert(im.file_name.clone(), id) {
                finding(
                    Severity::Warning,
                    FindingKind::DuplicateId,
                    Some(id),
                    None,
                    format!(
                        "{} is listed twice (image ids {other} and {id}): each entry's objects are missing from the other's targets (their categories are not used as negatives there); merge their annotations under one image",
                        im.file_name
                    ),
                );
            }
            let bad: Vec<String> = [("width", &im.width), ("height", &im.height)]
                .into_iter()
                .filter_map(|(what, v)| bad_dim(v.as_ref()).map(|v| format!("{what} {v}")))
                .collect();
            if !bad.is_empty() {
                finding(
                    Severity::Warning,
                    FindingKind::SizeMismatch,
                    Some(id),
                    None,
                    format!(
                        "{} has {}, not {} in pixels (a whole number from 1 to {MAX_JSON_DIM}): the JSON width/height are ignored and the decoded image's size is used; check the export",
                        im.file_name,
                        bad.join(" and "),
                        if bad.len() > 1 { "sizes" } else { "a size" }
                    ),
                );
            }
            img_index.insert(id, images.len());
            images.push(ImageEntry {
                id,
                path: dir.join(&im.file_name),
                file_name: im.file_name,
                json_size: as_dim(im.width.as_ref()).zip(as_dim(im.height.as_ref())),
                objects: Vec::new(),
                dropped_categories: BTreeSet::new(),
            });
        }

        let num_annotations = raw.annotations.len();
        let mut seen_ann: BTreeSet<u64> = BTreeSet::new();
        let mut unknown_category: BTreeMap<String, usize> = BTreeMap::new();
        for (k, a) in raw.annotations.into_iter().enumerate() {
            // An annotation without a usable id is named by its position.
            let ann_id = a.id.as_ref().and_then(as_id);
            let ann = Some(ann_id.unwrap_or(k as u64));
            let where_ = match &a.id {
                Some(v) if ann_id.is_none() => format!("annotations[{k}] (id {})", show(v)),
                None => format!("annotations[{k}] (no id)"),
                _ => String::new(),
            };
            let named = |msg: String| if where_.is_empty() { msg } else { format!("{where_}: {msg}") };
            let Some(image_id) = as_id(&a.image_id) else {
                finding(
                    Severity::Error,
                    FindingKind::UnknownImage,
                    None,
                    ann,
                    named(format!(
                        "image_id {} is not a non-negative integer; the annotation is dropped",
                        show(&a.image_id)
                    )),
                );
                continue;
            };
            let img = Some(image_id);
            if let Some(id) = ann_id {
                if !seen_ann.insert(id) {
                    finding(
                        Severity::Error,
                        FindingKind::DuplicateId,
                        img,
                        ann,
                        "annotation id appears twice; give every annotation a unique id".into(),
                    );
                }
            }
            if let Some(n) = ambiguous.get_mut(&image_id) {
                *n += 1;
                continue;
            }
            let Some(&ii) = img_index.get(&image_id) else {
                finding(
                    Severity::Error,
                    FindingKind::UnknownImage,
                    img,
                    ann,
                    named("image_id is not in images; the annotation is dropped".into()),
                );
                continue;
            };
            let Some(&ci) = as_id(&a.category_id).and_then(|c| cat_index.get(&c)) else {
                *unknown_category.entry(show(&a.category_id)).or_default() += 1;
                if !categories.is_empty() {
                    finding(
                        Severity::Error,
                        FindingKind::UnknownCategory,
                        img,
                        ann,
                        named(format!(
                            "category_id {} is not in categories; the annotation is dropped",
                            show(&a.category_id)
                        )),
                    );
                }
                continue;
            };
            let bbox = match parse_bbox(a.bbox.as_ref()) {
                Ok(b) => b,
                Err(kind) => {
                    let got = a.bbox.as_ref().map(show).unwrap_or_else(|| "absent".into());
                    let what = match kind {
                        FindingKind::MissingBox => format!("bbox must be 4 numbers [x, y, w, h], got {got}"),
                        _ => format!("degenerate bbox {got} (w or h <= 0)"),
                    };
                    // pycocotools and Roboflow take a missing box from the mask's bounds.
                    let seg = a.segmentation.as_ref().map(Segmentation::parse);
                    match seg {
                        Some(Ok(Some(seg))) => match box_from_segmentation(&seg, images[ii].json_size) {
                            Ok(b) => {
                                finding(
                                    Severity::Warning,
                                    FindingKind::DerivedBox,
                                    img,
                                    ann,
                                    named(format!(
                                        "{what}; bbox derived from the segmentation: {b:?} (as pycocotools and Roboflow do)"
                                    )),
                                );
                                b
                            }
                            Err(why) => {
                                let msg = format!("{what}, and its segmentation gives no box ({why}); the annotation is dropped");
                                finding(Severity::Error, kind, img, ann, named(msg));
                                images[ii].dropped_categories.insert(categories[ci].id);
                                continue;
                            }
                        },
                        _ => {
                            let why = match seg {
                                Some(Err(e)) => format!(", and its segmentation cannot be read ({e})"),
                                _ => String::new(),
                            };
                            let msg = format!("{what}{why}; the annotation is dropped");
                            finding(Severity::Error, kind, img, ann, named(msg));
                            images[ii].dropped_categories.insert(categories[ci].id);
                            continue;
                        }
                    }
                }
            };
            // A segmentation that cannot be parsed leaves a box-only object: its box and class
            // still train (dropping it would teach "absent" for a real object).
            let segmentation = match a.segmentation.as_ref().map(Segmentation::parse).transpose() {
                Ok(s) => s.flatten(),
                Err(reason) => {
                    finding(
                        Severity::Warning,
                        FindingKind::UndecodableMask,
                        img,
                        ann,
                        named(format!(
                            "{reason}; the mask is ignored and the object trains its box and class only"
                        )),
                    );
                    None
                }
            };
            if matches!(a.segmentation.as_ref(), Some(Value::Array(v)) if v.iter().all(Value::is_number) && !v.is_empty())
            {
                finding(
                    Severity::Warning,
                    FindingKind::UndecodableMask,
                    img,
                    ann,
                    named("segmentation is one flat polygon [x1, y1, ...] without the outer list; read as [[x1, y1, ...]]".into()),
                );
            }
            let iscrowd = match &a.iscrowd {
                Some(Value::Bool(b)) => *b,
                Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
                _ => false,
            };
            categories[ci].used = true;
            images[ii].objects.push(Object {
                ann_id: ann_id.unwrap_or(k as u64),
                category_id: categories[ci].id,
                bbox_xywh: bbox,
                segmentation,
                iscrowd,
            });
        }
        // An image listed twice: each entry's objects are in the picture of the other, so their
        // categories are no negatives there either.
        let mut same_file: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, im) in images.iter().enumerate() {
            same_file.entry(im.file_name.as_str()).or_default().push(i);
        }
        let shared: Vec<(Vec<usize>, BTreeSet<u64>)> = same_file
            .into_values()
            .filter(|group| group.len() > 1)
            .map(|group| {
                let cats = group
                    .iter()
                    .flat_map(|&i| {
                        let im = &images[i];
                        im.objects.iter().map(|o| o.category_id).chain(im.dropped_categories.iter().copied())
                    })
                    .collect();
                (group, cats)
            })
            .collect();
        for (group, cats) in shared {
            for i in group {
                images[i].dropped_categories.extend(cats.iter().copied());
            }
        }
        if categories.is_empty() && !unknown_category.is_empty() {
            finding(
                Severity::Error,
                FindingKind::UnknownCategory,
                None,
                None,
                format!(
                    "the file has no categories (the \"categories\" list is missing or empty), so none of its {} annotations can be used: add [{{\"id\": 1, \"name\": \"crack\"}}, ...]",
                    unknown_category.values().sum::<usize>()
                ),
            );
        }
        for (id, n) in &ambiguous {
            if *n > 0 {
                finding(
                    Severity::Error,
                    FindingKind::DuplicateId,
                    Some(*id),
                    None,
                    format!("{n} annotations with the duplicated image_id {id} are left out"),
                );
            }
        }
        let crowd = images.iter().flat_map(|i| &i.objects).filter(|o| o.iscrowd).count();
        if crowd > 0 {
            finding(
                Severity::Warning,
                FindingKind::Crowd,
                None,
                None,
                format!("{crowd} annotations have iscrowd: 1; lorahost trains each as one instance (SAM3 has no crowd regions): drop them if they cover groups of objects"),
            );
        }

        let mut by_prompt: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for c in &categories {
            by_prompt.entry(c.prompt.as_str()).or_default().push(c.id);
        }
        let mut cat_findings = Vec::new();
        for c in &categories {
            if let Some(p) = prompt_problem(&c.prompt) {
                cat_findings.push((
                    Severity::Warning,
                    FindingKind::PoorPrompt,
                    format!("category {} name {:?} is a poor ({p}) text prompt; rename it to a noun phrase like \"crack\"", c.id, c.name),
                ));
            }
            if !c.used {
                cat_findings.push((
                    Severity::Warning,
                    FindingKind::UnusedCategory,
                    format!(
                        "category {} {:?} has no usable annotations; it is not used as a negative",
                        c.id, c.name
                    ),
                ));
            }
        }
        for (p, ids) in &by_prompt {
            if ids.len() > 1 {
                cat_findings.push((
                    Severity::Warning,
                    FindingKind::DuplicatePrompt,
                    format!(
                        "categories {ids:?} share the prompt {p:?} after lower-casing; they form one query"
                    ),
                ));
            }
        }
        for (s, k, m) in cat_findings {
            finding(s, k, None, None, m);
        }
        for im in &images {
            if im.objects.is_empty() {
                finding(
                    Severity::Warning,
                    FindingKind::ImageWithoutAnnotations,
                    Some(im.id),
                    None,
                    format!("{} has no usable annotations; it gets only negative queries", im.file_name),
                );
            }
        }
        let generic_negatives = generic_words(
            GENERIC_NEGATIVES,
            &categories.iter().map(|c| c.prompt.as_str()).collect::<Vec<_>>(),
        );
        Ok(Self {
            name: name.into(),
            dir,
            annotation_file,
            sha256,
            categories,
            generic_negatives,
            images,
            num_annotations,
            findings,
        })
    }

    /// Use `words` as this split's generic negatives (`training.generic_negatives`; empty: none):
    /// trimmed and lower-cased, repeats and the split's own category prompts (also as plurals)
    /// left out. A whole dataset's are set with [`Dataset::set_generic_negatives`], which also
    /// leaves out the other splits' prompts.
    pub fn set_generic_negatives<S: AsRef<str>>(&mut self, words: impl IntoIterator<Item = S>) {
        let prompts: Vec<&str> = self.categories.iter().map(|c| c.prompt.as_str()).collect();
        self.generic_negatives = generic_words(words, &prompts);
    }

    /// The category with this id (ids are unique: a repeated id keeps its later entry).
    pub fn category(&self, id: u64) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }

    /// Queries for image `index`: one positive per distinct prompt present (its objects), then
    /// `num_negatives` negatives drawn without replacement: first the prompts of used categories
    /// absent from the image (hard negatives), then, when those run short (a one-class dataset
    /// has none), the split's generic words ([`Split::generic_negatives`], never a category of
    /// the dataset), as SAM3_LoRA does. A category whose annotation on this image was dropped
    /// ([`ImageEntry::dropped_categories`]) is never a negative here: the object is there.
    /// Seeded by (`seed`, image id), so the same seed gives the same negatives. Images without
    /// objects get only negatives (never an "object" query).
    pub fn queries(&self, index: usize, num_negatives: usize, seed: u64) -> Vec<Query> {
        let Some(im) = self.images.get(index) else { return Vec::new() };
        let mut positives: Vec<Query> = Vec::new();
        for (oi, o) in im.objects.iter().enumerate() {
            let Some(c) = self.category(o.category_id) else { continue };
            match positives.iter_mut().find(|q| q.prompt == c.prompt) {
                Some(q) => q.objects.push(oi),
                None => {
                    positives.push(Query { prompt: c.prompt.clone(), objects: vec![oi], negative: false })
                }
            }
        }
        // Prompts of objects that are in the image but not usable: neither positive nor negative.
        let present: Vec<&str> = im
            .dropped_categories
            .iter()
            .filter_map(|&id| self.category(id))
            .map(|c| c.prompt.as_str())
            .collect();
        let mut pool: Vec<&str> = Vec::new();
        for c in &self.categories {
            let p = c.prompt.as_str();
            if c.used
                && !pool.contains(&p)
                && !positives.iter().any(|q| q.prompt == p)
                && !present.contains(&p)
            {
                pool.push(p);
            }
        }
        let mut rng = SplitMix64::from_parts(&[seed, im.id]);
        let mut draw = |pool: &mut Vec<&str>, want: usize| -> usize {
            let n = want.min(pool.len());
            for i in 0..n {
                let j = i + rng.below(pool.len() - i);
                pool.swap(i, j);
            }
            n
        };
        let n = draw(&mut pool, num_negatives);
        pool.truncate(n);
        if n < num_negatives {
            let taken = |w: &str| self.categories.iter().any(|c| same_prompt(&c.prompt, w));
            let mut generic: Vec<&str> =
                self.generic_negatives.iter().map(String::as_str).filter(|w| !taken(w)).collect();
            let m = draw(&mut generic, num_negatives - n);
            pool.extend_from_slice(&generic[..m]);
        }
        positives.extend(pool.iter().map(|p| Query {
            prompt: (*p).to_string(),
            objects: Vec::new(),
            negative: true,
        }));
        positives
    }

    /// Image-level checks on top of the parse findings: every image decodes (EXIF handled as
    /// training handles it), its size matches the JSON, boxes lie inside it and agree with their
    /// masks, masks decode at its size and are non-empty. Images are checked on all cores, with
    /// a progress line every few seconds for large sets.
    pub fn preflight(&self) -> Vec<Finding> {
        let n = self.images.len();
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, n.max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let start = std::time::Instant::now();
        let last_note = std::sync::Mutex::new(start);
        let mut per_image: Vec<(usize, Vec<Finding>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            out.push((i, self.check_image(&self.images[i])));
                            if let Ok(mut t) = last_note.lock() {
                                if t.elapsed().as_secs() >= 5 {
                                    *t = std::time::Instant::now();
                                    tracing::info!(
                                        "preflight of {}: {}/{n} images checked ({:.0} s)",
                                        self.name,
                                        i + 1,
                                        start.elapsed().as_secs_f64()
                                    );
                                }
                            }
                        }
                        out
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
        });
        per_image.sort_by_key(|(i, _)| *i);
        let mut out = self.findings.clone();
        out.extend(per_image.into_iter().flat_map(|(_, f)| f));
        out
    }

    /// The findings of one image (see [`Split::preflight`]).
    fn check_image(&self, im: &ImageEntry) -> Vec<Finding> {
        let mut out = Vec::new();
        let push = |out: &mut Vec<Finding>, severity, kind, file: &Path, ann_id, message| {
            out.push(Finding {
                severity,
                kind,
                split: self.name.clone(),
                file: file.into(),
                image_id: Some(im.id),
                ann_id,
                message,
            })
        };
        let (img, orientation) = match crate::imageio::load_rgb_for_annotations(&im.path, im.json_size) {
            Ok(i) => i,
            Err(e) => {
                let kind = match e {
                    crate::imageio::ImageError::Read { .. } => FindingKind::MissingImage,
                    crate::imageio::ImageError::Decode { .. }
                    | crate::imageio::ImageError::TooLarge { .. } => FindingKind::CorruptImage,
                };
                let hint = if kind == FindingKind::MissingImage {
                    near_miss(&self.dir, &im.file_name)
                } else {
                    String::new()
                };
                push(
                    &mut out,
                    Severity::Error,
                    kind,
                    &im.path,
                    None,
                    format!("{e}{hint}; the image is skipped"),
                );
                return out;
            }
        };
        let (w, h) = img.dimensions();
        use crate::imageio::OrientationUse;
        match orientation {
            OrientationUse::Ignored { exif } => push(
                &mut out,
                Severity::Warning,
                FindingKind::SizeMismatch,
                &im.path,
                None,
                format!(
                    "EXIF orientation {exif} (a 90° rotation) is not applied: the JSON width/height {w}x{h} are the stored pixels', so the annotations were drawn on them"
                ),
            ),
            OrientationUse::Applied { exif, swaps } if !swaps || im.json_size.is_none() => push(
                &mut out,
                Severity::Warning,
                FindingKind::SizeMismatch,
                &im.path,
                None,
                format!(
                    "EXIF orientation {exif} turns the stored pixels and is applied, so the annotations are taken in the displayed frame (as Roboflow exports them){}; if they were drawn on the raw pixels, remove the orientation tag",
                    if im.json_size.is_none() { " (the JSON gives no width/height to tell)" } else { "" }
                ),
            ),
            _ => {}
        }
        if let Some((jw, jh)) = im.json_size.filter(|&s| s != (w, h)) {
            let why = if (jw, jh) == (h, w) {
                if matches!(orientation, OrientationUse::None) {
                    "width and height are swapped in the JSON (the file has no EXIF rotation); the annotations are used in the file's frame: correct width/height, and check the annotations".to_string()
                } else {
                    "EXIF orientation rotates it; annotations may be in the un-rotated frame, re-export with orientation applied".to_string()
                }
            } else {
                let (sx, sy) = (w as f64 / jw as f64, h as f64 / jh as f64);
                let scale = if (sx / sy - 1.0).abs() < 0.01 { format!(" ({sx:.3}x)") } else { String::new() };
                format!(
                    "the image was replaced or resized{scale} after annotating; the annotations are used unscaled in the file's {w}x{h} pixel frame, so they are misaligned unless width/height in the JSON are simply wrong: restore the annotated image or rescale the annotations"
                )
            };
            push(
                &mut out,
                Severity::Warning,
                FindingKind::SizeMismatch,
                &im.path,
                None,
                format!("JSON says {jw}x{jh} but the decoded image is {w}x{h}: {why}"),
            );
        }
        for o in &im.objects {
            let [x, y, bw, bh] = o.bbox_xywh;
            let (wf, hf) = (w as f64, h as f64);
            if x < 0.0 || y < 0.0 || x + bw > wf + 1e-6 || y + bh > hf + 1e-6 {
                let clipped_empty = x >= wf || y >= hf || x + bw <= 0.0 || y + bh <= 0.0;
                let (severity, what) = if clipped_empty {
                    (Severity::Error, "lies entirely outside the image; it becomes degenerate when clipped")
                } else {
                    (Severity::Warning, "reaches outside the image; it is clipped to the image")
                };
                push(
                    &mut out,
                    severity,
                    FindingKind::BoxOutsideImage,
                    &self.annotation_file,
                    Some(o.ann_id),
                    format!("bbox {:?} {what} ({w}x{h})", o.bbox_xywh),
                );
            }
            if let Some(Segmentation::Polygons(polys)) = &o.segmentation {
                if let Some(problem) = polygon_far_outside(polys, w, h) {
                    push(
                        &mut out,
                        Severity::Warning,
                        FindingKind::PolygonOutsideImage,
                        &self.annotation_file,
                        Some(o.ann_id),
                        problem,
                    );
                }
            }
            let mask = o.segmentation.as_ref().map(|seg| seg.decode(h as usize, w as usize));
            let extent = match (&o.segmentation, &mask) {
                (Some(seg), Some(Ok(_))) => seg.extent(h as usize, w as usize),
                _ => None,
            };
            if let Some(reason) = box_format_problem(o.bbox_xywh, extent, w, h) {
                push(
                    &mut out,
                    Severity::Warning,
                    FindingKind::BoxFormat,
                    &self.annotation_file,
                    Some(o.ann_id),
                    reason,
                );
            }
            match mask {
                Some(Ok(m)) if !m.iter().any(|&b| b) => push(
                    &mut out,
                    Severity::Warning,
                    FindingKind::EmptyMask,
                    &self.annotation_file,
                    Some(o.ann_id),
                    "segmentation decodes to no pixels; the object trains its box and class only".into(),
                ),
                Some(Err(reason)) => push(
                    &mut out,
                    Severity::Warning,
                    FindingKind::UndecodableMask,
                    &self.annotation_file,
                    Some(o.ann_id),
                    format!("{reason}; the mask is ignored and the object trains its box and class only"),
                ),
                _ => {}
            }
        }
        out
    }
}

/// The box [x, y, w, h] of a segmentation, from its geometry (the polygons' coordinates,
/// clipped to the image when the JSON gives its size; the RLE's runs), for an annotation
/// without a usable `bbox`. Errors when it encloses no area, or when an RLE's size differs from
/// the image's. (Not rasterized: the preflight decodes every mask at the decoded image size.)
fn box_from_segmentation(seg: &Segmentation, json_size: Option<(u32, u32)>) -> Result<[f64; 4], String> {
    let (h, w) = match (seg, json_size) {
        (Segmentation::Rle { h, w, .. }, Some((jw, jh))) if (*h, *w) != (jh as usize, jw as usize) => {
            return Err(format!("its RLE size is {h}x{w} but the image is {jh}x{jw}"));
        }
        (_, Some((jw, jh))) => (jh as usize, jw as usize),
        (Segmentation::Rle { h, w, .. }, None) => (*h, *w),
        (Segmentation::Polygons(_), None) => (usize::MAX, usize::MAX),
    };
    if let Segmentation::Polygons(polys) = seg {
        // Shoelace area: points on a line enclose nothing, whatever their bounds.
        let area: f64 = polys
            .iter()
            .filter(|p| p.len() >= 6)
            .map(|p| {
                let pts: Vec<&[f64]> = p.chunks_exact(2).collect();
                let twice: f64 = (0..pts.len())
                    .map(|i| {
                        pts[i][0] * pts[(i + 1) % pts.len()][1] - pts[(i + 1) % pts.len()][0] * pts[i][1]
                    })
                    .sum();
                twice.abs() / 2.0
            })
            .sum();
        if area.is_nan() || area <= 0.0 {
            return Err("its polygons enclose no area".into());
        }
    }
    let e = seg.extent(h, w).ok_or("it covers no pixels of the image")?;
    Ok([e[0], e[1], e[2] - e[0], e[3] - e[1]])
}

/// How far outside a `w`x`h` image a polygon point may lie, in image sizes, before it is
/// reported: a little outside is an annotation tool's slack (clipped), 10 times the size is
/// another unit or frame.
const FAR_OUTSIDE: f64 = 10.0;

/// The first polygon point more than [`FAR_OUTSIDE`] times the image size from the origin, as a
/// message; None when all lie near the image.
fn polygon_far_outside(polys: &[Vec<f64>], w: u32, h: u32) -> Option<String> {
    let (wf, hf) = (w as f64, h as f64);
    polys.iter().enumerate().find_map(|(i, p)| {
        p.chunks_exact(2).find(|xy| xy[0].abs() > FAR_OUTSIDE * wf || xy[1].abs() > FAR_OUTSIDE * hf).map(
            |xy| {
                format!(
                    "polygon {i} has the point ({}, {}), far outside the {w}x{h} image (over {FAR_OUTSIDE} times its size): the coordinates are in another unit or frame, or corrupt; the mask is clipped to the image, so check it",
                    xy[0], xy[1]
                )
            },
        )
    })
}

/// A hint for a missing image file: a file in the folder whose name differs only in case or in
/// the path separator. The file itself (a directory, an unreadable file) is no near miss: the
/// error says what is wrong with it.
pub(super) fn near_miss(dir: &Path, file_name: &str) -> String {
    let slashed = file_name.replace('\\', "/");
    if slashed != file_name && dir.join(&slashed).is_file() {
        return format!(" (the file exists as {slashed}: write file_name with / separators)");
    }
    let target = Path::new(&slashed);
    let (Some(parent), Some(exact)) = (target.parent(), target.file_name()) else { return String::new() };
    let name = exact.to_string_lossy().to_lowercase();
    let folder = dir.join(parent);
    let Ok(entries) = std::fs::read_dir(&folder) else { return String::new() };
    for e in entries.flatten() {
        let other = e.file_name().to_string_lossy().to_string();
        if e.file_name() != exact && other.to_lowercase() == name && e.path().is_file() {
            return format!(" (a file named {other} exists: names are case-sensitive here; fix file_name or rename the file)");
        }
    }
    String::new()
}

/// F5: a bbox that disagrees with its own mask the way an [x0, y0, x1, y1] box, or a box in
/// 0..1 units, does (`extent`: the mask's, from its geometry). Without a mask only normalized
/// units are recognisable.
fn box_format_problem(b: [f64; 4], extent: Option<[f64; 4]>, w: u32, h: u32) -> Option<String> {
    let iou = |a: [f64; 4], c: [f64; 4]| {
        let iw = (a[2].min(c[2]) - a[0].max(c[0])).max(0.0);
        let ih = (a[3].min(c[3]) - a[1].max(c[1])).max(0.0);
        let inter = iw * ih;
        let union = (a[2] - a[0]) * (a[3] - a[1]) + (c[2] - c[0]) * (c[3] - c[1]) - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    };
    let normalized = b.iter().all(|v| (0.0..=1.0).contains(v)) && w > 16 && h > 16;
    let Some(m) = extent else {
        return normalized.then(|| format!("bbox {b:?} looks normalized to 0..1; COCO boxes are in pixels"));
    };
    if (m[2] - m[0]) * (m[3] - m[1]) < 4.0 {
        return None; // too small to judge
    }
    let as_xywh = iou([b[0], b[1], b[0] + b[2], b[1] + b[3]], m);
    if as_xywh >= 0.5 {
        return None;
    }
    if normalized {
        return Some(format!(
            "bbox {b:?} looks normalized to 0..1 (its mask spans {m:?} pixels); COCO boxes are in pixels"
        ));
    }
    if b[2] > b[0] && b[3] > b[1] && iou(b, m) > 0.7 {
        return Some(format!(
            "bbox {b:?} matches its mask ({m:?}) as [x0, y0, x1, y1], not as COCO [x, y, width, height] (IoU {as_xywh:.2}); the box target is wrong"
        ));
    }
    None
}

/// A dataset: the splits found under `data_dir`.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The folder given.
    pub data_dir: PathBuf,
    /// Loaded splits in order train, valid, test (those present; train is required).
    pub splits: Vec<Split>,
    /// Splits present but not loaded (a broken `test/`), as findings.
    pub skipped: Vec<Finding>,
}

/// Per-split counts in a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitCount {
    /// Split name.
    pub name: String,
    /// Images.
    pub images: usize,
    /// Annotations in the file.
    pub annotations: usize,
    /// SHA-256 of the annotation file.
    pub sha256: String,
}

/// What identifies a dataset, to log at start and compare against an expected one (F12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fingerprint {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Per split.
    pub splits: Vec<SplitCount>,
    /// Sorted distinct prompts of all categories.
    pub categories: Vec<String>,
    /// SHA-256 over split names and annotation file bytes (hex): independent of the path.
    pub content_sha256: String,
}

impl Dataset {
    /// Load `train` (required), `valid` and `test` (if present) from `data_dir`. A `test/`
    /// that does not load is not an error (training never reads it): it is left out and named
    /// in [`Dataset::skipped`].
    pub fn load(data_dir: &Path) -> Result<Self, DataError> {
        let mut splits = vec![Split::load(data_dir, "train")?];
        let mut skipped = Vec::new();
        for name in ["valid", "test"] {
            // A folder in the file's place is a split that does not load (said by
            // `Split::load`), not an absent one.
            if data_dir.join(name).join(ANNOTATION_FILE).exists() {
                match Split::load(data_dir, name) {
                    Ok(s) => splits.push(s),
                    Err(e) if name == "test" => skipped.push(Finding {
                        severity: Severity::Warning,
                        kind: FindingKind::UnusedSplit,
                        split: name.into(),
                        file: data_dir.join(name).join(ANNOTATION_FILE),
                        image_id: None,
                        ann_id: None,
                        message: format!("{e}; the test split is left out (training does not use it)"),
                    }),
                    Err(e) => return Err(e),
                }
            }
        }
        let mut ds = Self { data_dir: data_dir.into(), splits, skipped };
        ds.share_trained_categories();
        ds.set_generic_negatives(GENERIC_NEGATIVES);
        Ok(ds)
    }

    /// A category that the training split annotates is a class the model is trained on: in the
    /// other splits it is asked as a negative even where no image shows it (an all-negative
    /// test split of clean walls measures the false "crack" detections), so it is used there.
    fn share_trained_categories(&mut self) {
        let Some(train) = self.splits.iter().find(|s| s.name == "train") else { return };
        let trained: Vec<String> =
            train.categories.iter().filter(|c| c.used).map(|c| c.prompt.clone()).collect();
        for split in self.splits.iter_mut().filter(|s| s.name != "train") {
            let mut shared = Vec::new();
            for c in split.categories.iter_mut().filter(|c| !c.used && trained.contains(&c.prompt)) {
                c.used = true;
                shared.push(c.id);
            }
            // Its "not used as a negative" finding no longer holds.
            split.findings.retain(|f| {
                f.kind != FindingKind::UnusedCategory
                    || !shared.iter().any(|id| f.message.starts_with(&format!("category {id} ")))
            });
        }
    }

    /// Use `words` as every split's generic negatives (`training.generic_negatives`; an empty
    /// list turns generic fillers off): trimmed and lower-cased, without repeats and without
    /// any word that names a category prompt of any split (also as a plural). [`Dataset::load`]
    /// sets [`GENERIC_NEGATIVES`].
    pub fn set_generic_negatives<S: AsRef<str>>(&mut self, words: impl IntoIterator<Item = S>) {
        let prompts: Vec<&str> =
            self.splits.iter().flat_map(|s| s.categories.iter().map(|c| c.prompt.as_str())).collect();
        let words = generic_words(words, &prompts);
        for s in &mut self.splits {
            s.generic_negatives = words.clone();
        }
    }

    /// [`Dataset::set_generic_negatives`] on an owned dataset:
    /// `let dataset = dataset.with_generic_negatives(&t.generic_negatives);`.
    pub fn with_generic_negatives<S: AsRef<str>>(mut self, words: impl IntoIterator<Item = S>) -> Self {
        self.set_generic_negatives(words);
        self
    }

    /// Every text prompt the dataset trains or evaluates with, once each in split order: the
    /// categories' and the generic negative words.
    pub fn prompts(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for split in &self.splits {
            for p in split.categories.iter().map(|c| &c.prompt).chain(&split.generic_negatives) {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
        }
        out
    }

    /// The split with this name.
    pub fn split(&self, name: &str) -> Option<&Split> {
        self.splits.iter().find(|s| s.name == name)
    }

    /// All splits' preflight findings (and the skipped splits').
    pub fn preflight(&self) -> Vec<Finding> {
        self.preflight_of(&["train", "valid", "test"])
    }

    /// The preflight findings of the named splits only (training checks train and valid).
    pub fn preflight_of(&self, names: &[&str]) -> Vec<Finding> {
        let mut out: Vec<Finding> =
            self.skipped.iter().filter(|f| names.contains(&f.split.as_str())).cloned().collect();
        for s in self.splits.iter().filter(|s| names.contains(&s.name.as_str())) {
            out.extend(s.preflight());
        }
        out
    }

    /// The dataset fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        let mut cats = BTreeSet::new();
        let mut splits = Vec::new();
        for s in &self.splits {
            h.update(s.name.as_bytes());
            h.update([0]);
            h.update(s.sha256.as_bytes());
            cats.extend(s.categories.iter().map(|c| c.prompt.clone()));
            splits.push(SplitCount {
                name: s.name.clone(),
                images: s.images.len(),
                annotations: s.num_annotations,
                sha256: s.sha256.clone(),
            });
        }
        Fingerprint {
            data_dir: self.data_dir.clone(),
            splits,
            categories: cats.into_iter().collect(),
            content_sha256: hex(&h.finalize()),
        }
    }
}
