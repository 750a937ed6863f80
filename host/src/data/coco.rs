//! Loading the Roboflow COCO layout, preflight checks, dataset fingerprint and prompt queries.
//!
//! An annotation that cannot be used (no box, degenerate box, unknown category, undecodable
//! segmentation) is dropped *as a whole* and reported, so objects and their category names never
//! go out of step (seed-trainer F23). Boxes partly outside the image are clipped when a sample is
//! built, and reported by the preflight.

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
    id: u64,
    file_name: String,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    #[serde(default)]
    bbox: Option<Value>,
    #[serde(default)]
    segmentation: Option<Value>,
    #[serde(default)]
    iscrowd: Option<Value>,
}

#[derive(Deserialize)]
struct RawCategory {
    id: u64,
    name: String,
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
            Value::Array(a) => {
                let mut polys = Vec::with_capacity(a.len());
                for (i, p) in a.iter().enumerate() {
                    let Value::Array(p) = p else {
                        return Err(format!("polygon {i} is not a list of numbers"));
                    };
                    let coords: Option<Vec<f64>> = p.iter().map(Value::as_f64).collect();
                    polys.push(coords.ok_or_else(|| format!("polygon {i} has a non-number"))?);
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
    /// The text prompt: the name trimmed and lower-cased.
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
    /// An annotation without a (well-formed) `bbox`.
    MissingBox,
    /// A box with w ≤ 0 or h ≤ 0, or non-finite values.
    DegenerateBox,
    /// A box reaching outside the image; it is clipped to the image.
    BoxOutsideImage,
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
}

/// One preflight finding, naming the file and the image/annotation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// What.
    pub kind: FindingKind,
    /// The annotation file (or image file for image problems).
    pub file: PathBuf,
    /// The image id, if any.
    pub image_id: Option<u64>,
    /// The annotation id, if any.
    pub ann_id: Option<u64>,
    /// Human-readable detail with the fix.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.file.display())?;
        if let Some(i) = self.image_id {
            write!(f, " image {i}")?;
        }
        if let Some(a) = self.ann_id {
            write!(f, " annotation {a}")?;
        }
        write!(f, ": {}", self.message)
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
        if !annotation_file.is_file() {
            let hint = if data_dir.join(ANNOTATION_FILE).is_file() {
                format!(
                    " ({} is itself a split folder: set data_dir to its parent, {})",
                    data_dir.display(),
                    data_dir.parent().map(|p| p.display().to_string()).unwrap_or_default()
                )
            } else if !data_dir.is_dir() {
                format!(" ({} does not exist)", data_dir.display())
            } else {
                String::new()
            };
            return Err(DataError::MissingSplit { path: annotation_file, hint });
        }
        let bytes = std::fs::read(&annotation_file)
            .map_err(|e| DataError::Io { path: annotation_file.clone(), reason: e.to_string() })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let raw: RawFile = serde_path_to_error::deserialize(de)
            .map_err(|e| DataError::Json { path: annotation_file.clone(), reason: e.to_string() })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let file = annotation_file.clone();
        let mut findings = Vec::new();
        let mut finding = |severity, kind, image_id, ann_id, message: String| {
            findings.push(Finding { severity, kind, file: file.clone(), image_id, ann_id, message })
        };

        let mut categories: Vec<Category> = Vec::new();
        let mut cat_index: HashMap<u64, usize> = HashMap::new();
        for c in raw.categories {
            let prompt = c.name.trim().to_lowercase();
            if cat_index.insert(c.id, categories.len()).is_some() {
                finding(
                    Severity::Error,
                    FindingKind::DuplicateId,
                    None,
                    None,
                    format!("category id {} appears twice; the later one wins", c.id),
                );
            }
            categories.push(Category { id: c.id, name: c.name, prompt, used: false });
        }

        let mut images: Vec<ImageEntry> = Vec::new();
        let mut img_index: HashMap<u64, usize> = HashMap::new();
        for im in raw.images {
            if img_index.contains_key(&im.id) {
                finding(
                    Severity::Error,
                    FindingKind::DuplicateId,
                    Some(im.id),
                    None,
                    format!("image id {} appears twice; the second ({}) is ignored", im.id, im.file_name),
                );
                continue;
            }
            img_index.insert(im.id, images.len());
            images.push(ImageEntry {
                id: im.id,
                path: dir.join(&im.file_name),
                file_name: im.file_name,
                json_size: im.width.zip(im.height),
                objects: Vec::new(),
            });
        }

        let num_annotations = raw.annotations.len();
        let mut seen_ann: BTreeSet<u64> = BTreeSet::new();
        for a in raw.annotations {
            let (img, ann) = (Some(a.image_id), Some(a.id));
            if !seen_ann.insert(a.id) {
                finding(
                    Severity::Error,
                    FindingKind::DuplicateId,
                    img,
                    ann,
                    "annotation id appears twice; give every annotation a unique id".into(),
                );
            }
            let Some(&ii) = img_index.get(&a.image_id) else {
                finding(
                    Severity::Error,
                    FindingKind::UnknownImage,
                    img,
                    ann,
                    "image_id is not in images; the annotation is dropped".into(),
                );
                continue;
            };
            let Some(&ci) = cat_index.get(&a.category_id) else {
                finding(
                    Severity::Error,
                    FindingKind::UnknownCategory,
                    img,
                    ann,
                    format!("category_id {} is not in categories; the annotation is dropped", a.category_id),
                );
                continue;
            };
            let bbox = match parse_bbox(a.bbox.as_ref()) {
                Ok(b) => b,
                Err(kind) => {
                    let msg = match kind {
                        FindingKind::MissingBox => "no bbox [x, y, w, h]; the annotation is dropped",
                        _ => "degenerate bbox (w or h <= 0, or not finite); the annotation is dropped",
                    };
                    finding(Severity::Error, kind, img, ann, format!("{msg} (bbox: {:?})", a.bbox));
                    continue;
                }
            };
            let segmentation = match a.segmentation.as_ref().map(Segmentation::parse).transpose() {
                Ok(s) => s.flatten(),
                Err(reason) => {
                    finding(
                        Severity::Error,
                        FindingKind::UndecodableMask,
                        img,
                        ann,
                        format!("{reason}; the annotation is dropped"),
                    );
                    continue;
                }
            };
            let iscrowd = match &a.iscrowd {
                Some(Value::Bool(b)) => *b,
                Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
                _ => false,
            };
            categories[ci].used = true;
            images[ii].objects.push(Object {
                ann_id: a.id,
                category_id: a.category_id,
                bbox_xywh: bbox,
                segmentation,
                iscrowd,
            });
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
        Ok(Self {
            name: name.into(),
            dir,
            annotation_file,
            sha256,
            categories,
            images,
            num_annotations,
            findings,
        })
    }

    /// The category with this id.
    pub fn category(&self, id: u64) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }

    /// Queries for image `index`: one positive per distinct prompt present (its objects), then
    /// `min(num_negatives, absent)` hard negatives drawn without replacement from the prompts of
    /// used categories absent from the image, seeded by (`seed`, image id) so the same seed gives
    /// the same negatives. Images without objects get only negatives (never an "object" query).
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
        let mut pool: Vec<&str> = Vec::new();
        for c in &self.categories {
            let p = c.prompt.as_str();
            if c.used && !pool.contains(&p) && !positives.iter().any(|q| q.prompt == p) {
                pool.push(p);
            }
        }
        let mut rng = SplitMix64::from_parts(&[seed, im.id]);
        let n = num_negatives.min(pool.len());
        for i in 0..n {
            let j = i + rng.below(pool.len() - i);
            pool.swap(i, j);
        }
        positives.extend(pool[..n].iter().map(|p| Query {
            prompt: (*p).to_string(),
            objects: Vec::new(),
            negative: true,
        }));
        positives
    }

    /// Image-level checks on top of the parse findings: every image decodes (EXIF applied), its
    /// size matches the JSON, boxes lie inside it, masks decode at its size and are non-empty.
    pub fn preflight(&self) -> Vec<Finding> {
        let mut out = self.findings.clone();
        for im in &self.images {
            let push = |out: &mut Vec<Finding>, severity, kind, file: &Path, ann_id, message| {
                out.push(Finding {
                    severity,
                    kind,
                    file: file.into(),
                    image_id: Some(im.id),
                    ann_id,
                    message,
                })
            };
            let img = match crate::imageio::load_rgb(&im.path) {
                Ok(i) => i,
                Err(e) => {
                    let kind = match e {
                        crate::imageio::ImageError::Read { .. } => FindingKind::MissingImage,
                        crate::imageio::ImageError::Decode { .. } => FindingKind::CorruptImage,
                    };
                    push(
                        &mut out,
                        Severity::Error,
                        kind,
                        &im.path,
                        None,
                        format!("{e}; the image is skipped"),
                    );
                    continue;
                }
            };
            let (w, h) = img.dimensions();
            if let Some((jw, jh)) = im.json_size.filter(|&s| s != (w, h)) {
                let why = if (jw, jh) == (h, w) {
                    "EXIF orientation rotates it; annotations may be in the un-rotated frame, re-export with orientation applied"
                } else {
                    "the image was replaced or resized after annotating"
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
                        (
                            Severity::Error,
                            "lies entirely outside the image; it becomes degenerate when clipped",
                        )
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
                if let Some(seg) = &o.segmentation {
                    match seg.decode(h as usize, w as usize) {
                        Ok(m) if !m.iter().any(|&b| b) => push(
                            &mut out,
                            Severity::Warning,
                            FindingKind::EmptyMask,
                            &self.annotation_file,
                            Some(o.ann_id),
                            "segmentation decodes to no pixels".into(),
                        ),
                        Ok(_) => {}
                        Err(reason) => push(
                            &mut out,
                            Severity::Error,
                            FindingKind::UndecodableMask,
                            &self.annotation_file,
                            Some(o.ann_id),
                            reason,
                        ),
                    }
                }
            }
        }
        out
    }
}

/// A dataset: the splits found under `data_dir`.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The folder given.
    pub data_dir: PathBuf,
    /// Loaded splits in order train, valid, test (those present; train is required).
    pub splits: Vec<Split>,
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
    /// Load `train` (required), `valid` and `test` (if present) from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self, DataError> {
        let mut splits = vec![Split::load(data_dir, "train")?];
        for name in ["valid", "test"] {
            if data_dir.join(name).join(ANNOTATION_FILE).is_file() {
                splits.push(Split::load(data_dir, name)?);
            }
        }
        Ok(Self { data_dir: data_dir.into(), splits })
    }

    /// The split with this name.
    pub fn split(&self, name: &str) -> Option<&Split> {
        self.splits.iter().find(|s| s.name == name)
    }

    /// All splits' preflight findings.
    pub fn preflight(&self) -> Vec<Finding> {
        self.splits.iter().flat_map(Split::preflight).collect()
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
