//! Importing datasets annotated as YOLO label files or LabelMe JSON (`lorahost import --from
//! DIR`) into the COCO layout training reads, the objects' polygons kept as they were drawn.
//!
//! **YOLO** (Ultralytics, Roboflow's "YOLOv8" export): `DIR/<split>/images` beside
//! `DIR/<split>/labels`, or `DIR/images/<split>` beside `DIR/labels/<split>`, or `DIR/images`
//! beside `DIR/labels` (one split); each image's `labels/<stem>.txt` holds one object per line,
//! `class x1 y1 x2 y2 ...` (a polygon, coordinates normalised to the image) or
//! `class cx cy w h` (a box: a box-only object, which trains its box and class). An image
//! without a label file is a negative. The class names come from `data.yaml` (`names:` as a
//! list or a map), else from `classes.txt` / `obj.names` (a name per line). Coordinates are in
//! the image as displayed (Ultralytics applies the EXIF orientation).
//!
//! **LabelMe**: a `.json` per image (`DIR/*.json`, or `DIR/<split>/*.json`) with `shapes`
//! (`label`, `points`, `shape_type`, `group_id`) and `imagePath`; the image is the file it
//! names, or the JSON's embedded `imageData`. Polygons, rectangles and circles become
//! polygons; shapes of one label with the same `group_id` are one object; points, lines and
//! other shapes are left out (counted in the notes). The class names are the labels, sorted.
//!
//! Splits: the dataset's split folders (`val`, `validation` → `valid`), else everything into
//! `--split`, with seeded `--valid-share` / `--test-share` as for mask imports. Writing as the
//! mask import writes: each split to a temporary folder renamed into place; a split folder that
//! holds anything is never written into.

use super::masks::{
    begin_split, finish_split, image_files, image_in_frame, invalid, io, split_names, split_of,
    ImportSummary, SplitImport,
};
use super::DataError;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An annotation format [`import_labels`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelFormat {
    /// YOLO label files (`labels/*.txt`).
    Yolo,
    /// LabelMe JSON files.
    LabelMe,
}

impl std::fmt::Display for LabelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LabelFormat::Yolo => "YOLO",
            LabelFormat::LabelMe => "LabelMe",
        })
    }
}

/// Where and how to import.
#[derive(Debug, Clone)]
pub struct LabelImportOptions {
    /// The dataset folder to write splits into.
    pub out: PathBuf,
    /// The split for a dataset without split folders.
    pub split: String,
    /// Share of such a dataset's images put into valid/ instead, in [0, 1).
    pub valid_share: f64,
    /// Share put into test/ instead, in [0, 1).
    pub test_share: f64,
    /// Seed of the split choice.
    pub seed: u64,
}

/// One object: its class (0-based) and polygons in pixels, or a box only.
#[derive(Debug, Clone, PartialEq)]
struct Object {
    class: usize,
    polygons: Vec<Vec<f64>>,
    /// [x, y, w, h] of a box-only object.
    bbox: Option<[f64; 4]>,
}

/// An image to write with its objects.
struct Item {
    /// The image file (or where its embedded data came from).
    image: PathBuf,
    /// The LabelMe JSON whose `imageData` is the image, when the file is absent (decoded when
    /// written, so a dataset's images are never all held at once).
    embedded: Option<PathBuf>,
    /// The annotation file.
    source: PathBuf,
    /// The frame the annotations were drawn on, when the annotation file says.
    size: Option<(u32, u32)>,
    /// YOLO: coordinates normalised to the image (scaled once its size is known).
    normalised: bool,
    objects: Vec<Object>,
}

/// Which format `dir` is in, if any.
pub fn detect(dir: &Path) -> Option<LabelFormat> {
    if !yolo_layout(dir).is_empty() {
        return Some(LabelFormat::Yolo);
    }
    if !labelme_layout(dir).is_empty() {
        return Some(LabelFormat::LabelMe);
    }
    None
}

/// The (split, images, labels) folders of a YOLO dataset.
fn yolo_layout(dir: &Path) -> Vec<(Option<String>, PathBuf, PathBuf)> {
    let has_txt = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.flatten().any(|e| e.path().extension().is_some_and(|x| x.eq_ignore_ascii_case("txt")))
        })
    };
    let pair = |images: PathBuf, labels: PathBuf| {
        (images.is_dir() && labels.is_dir() && has_txt(&labels)).then_some((images, labels))
    };
    let mut out = Vec::new();
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    subs.sort();
    for sub in &subs {
        let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(split) = split_of(&name) {
            if let Some((i, l)) = pair(sub.join("images"), sub.join("labels")) {
                out.push((Some(split.to_string()), i, l));
            } else if let Some((i, l)) = pair(dir.join("images").join(&name), dir.join("labels").join(&name))
            {
                out.push((Some(split.to_string()), i, l));
            }
        }
    }
    if dir.join("images").is_dir() {
        let mut nested: Vec<PathBuf> = std::fs::read_dir(dir.join("images"))
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        nested.sort();
        for sub in nested {
            let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if let (Some(split), Some((i, l))) =
                (split_of(&name), pair(sub.clone(), dir.join("labels").join(&name)))
            {
                if !out.iter().any(|o| o.0.as_deref() == Some(split)) {
                    out.push((Some(split.to_string()), i, l));
                }
            }
        }
    }
    if out.is_empty() {
        if let Some((i, l)) = pair(dir.join("images"), dir.join("labels")) {
            out.push((None, i, l));
        }
    }
    out
}

/// The (split, folder) of a LabelMe dataset: its split folders holding LabelMe JSON, else itself.
fn labelme_layout(dir: &Path) -> Vec<(Option<String>, PathBuf)> {
    let has_labelme = |d: &Path| !labelme_files(d).is_empty();
    let mut out = Vec::new();
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    subs.sort();
    for sub in subs {
        let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(split) = split_of(&name) {
            if has_labelme(&sub) {
                out.push((Some(split.to_string()), sub));
            }
        }
    }
    if out.is_empty() && has_labelme(dir) {
        out.push((None, dir.to_path_buf()));
    }
    out
}

/// The LabelMe JSON files of `dir` (a `.json` naming `shapes` and `imagePath`; not parsed
/// here: such files may embed their image, and [`labelme_item`] parses each once), sorted.
fn labelme_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("json")))
                .filter(|p| {
                    std::fs::read_to_string(p)
                        .is_ok_and(|t| t.contains("\"shapes\"") && t.contains("\"imagePath\""))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The class names of a YOLO dataset: `data.yaml`'s `names` (a list, or a map from index), else
/// `classes.txt` / `obj.names` / `*.names` (a name per line).
fn yolo_names(dir: &Path) -> Result<Vec<String>, DataError> {
    for yaml in ["data.yaml", "data.yml", "dataset.yaml"].map(|n| dir.join(n)) {
        if !yaml.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&yaml).map_err(|e| io(&yaml, e))?;
        let v: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| io(&yaml, format!("not valid YAML: {e}")))?;
        let names = match v.get("names") {
            Some(serde_yaml::Value::Sequence(items)) => {
                items.iter().map(yaml_text).collect::<Option<Vec<_>>>()
            }
            Some(serde_yaml::Value::Mapping(m)) => {
                let mut by: BTreeMap<u64, String> = BTreeMap::new();
                for (k, n) in m {
                    let k = k.as_u64().or_else(|| k.as_str().and_then(|s| s.trim().parse().ok()));
                    match (k, yaml_text(n)) {
                        (Some(k), Some(n)) => {
                            by.insert(k, n);
                        }
                        _ => {
                            return Err(io(
                                &yaml,
                                "`names` maps class numbers to names: {0: crack, 1: spall}",
                            ))
                        }
                    }
                }
                if by.keys().copied().ne(0..by.len() as u64) {
                    return Err(io(&yaml, "`names` must number the classes 0, 1, 2, ... without gaps"));
                }
                Some(by.into_values().collect())
            }
            _ => None,
        };
        return names.filter(|n| !n.is_empty()).ok_or_else(|| {
            io(&yaml, "has no class names: add `names: [crack, spall]` (in class-number order)")
        });
    }
    let mut candidates: Vec<PathBuf> = vec![dir.join("classes.txt"), dir.join("obj.names")];
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut more: Vec<PathBuf> =
            rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "names")).collect();
        more.sort();
        candidates.extend(more);
    }
    for f in candidates.into_iter().filter(|f| f.is_file()) {
        let text = std::fs::read_to_string(&f).map_err(|e| io(&f, e))?;
        let names: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        if !names.is_empty() {
            return Ok(names);
        }
    }
    Err(io(
        dir,
        "a YOLO dataset without class names: add a data.yaml with `names: [crack, spall]` (or a classes.txt, one name per line, in class-number order)",
    ))
}

fn yaml_text(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.trim().to_string()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
    .filter(|s| !s.is_empty())
}

/// One YOLO label file's objects (normalised coordinates), or why it cannot be read; the lines
/// left out (file:line and why) go to `notes`.
fn yolo_objects(path: &Path, classes: usize, notes: &mut Vec<String>) -> Result<Vec<Object>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let bad = |why: String| format!("{}:{}: {why}; the line is left out", path.display(), i + 1);
        let class = match it.next().map(str::parse::<f64>) {
            Some(Ok(c)) if c >= 0.0 && c.fract() == 0.0 && (c as usize) < classes => c as usize,
            Some(Ok(c)) => {
                notes.push(bad(format!(
                    "class {c} is not one of the {classes} named classes (0..{})",
                    classes - 1
                )));
                continue;
            }
            _ => {
                notes.push(bad("the line does not start with a class number".into()));
                continue;
            }
        };
        let nums: Result<Vec<f64>, _> = it.map(str::parse::<f64>).collect();
        let Ok(nums) = nums.map(|n| n.into_iter().filter(|x| x.is_finite()).collect::<Vec<_>>()) else {
            notes.push(bad("a coordinate is not a number".into()));
            continue;
        };
        match nums.len() {
            4 => {
                let (cx, cy, w, h) = (nums[0], nums[1], nums[2], nums[3]);
                out.push(Object {
                    class,
                    polygons: Vec::new(),
                    bbox: Some([cx - w / 2.0, cy - h / 2.0, w, h]),
                });
            }
            // Ultralytics' keypoint and oriented-box lines are other tasks; a polygon has an
            // even count of at least 6.
            n if n >= 6 && n % 2 == 0 => out.push(Object { class, polygons: vec![nums], bbox: None }),
            n => notes.push(bad(format!(
                "{n} coordinates: expected 4 (a box: cx cy w h) or an even count of at least 6 (a polygon)"
            ))),
        }
    }
    Ok(out)
}

/// A LabelMe file's image, frame and objects, each object's class its label's index in
/// `labels` (labels met first are added); shapes left out are counted in `skipped` by kind.
fn labelme_item(
    path: &Path,
    labels: &mut Vec<String>,
    skipped: &mut BTreeMap<String, usize>,
) -> Result<Item, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let image_path = v["imagePath"].as_str().map(|p| dir.join(p.replace('\\', "/")));
    let image = match &image_path {
        Some(p) if p.is_file() => p.clone(),
        _ => {
            // The same stem with an image extension beside the JSON.
            let stem = path.with_extension("");
            ["jpg", "jpeg", "png", "JPG", "JPEG", "PNG"]
                .iter()
                .map(|e| stem.with_extension(e))
                .find(|p| p.is_file())
                .or(image_path.clone())
                .unwrap_or_else(|| stem.with_extension("png"))
        }
    };
    let embedded = if image.is_file() {
        None
    } else if v["imageData"].is_string() {
        Some(path.to_path_buf())
    } else {
        return Err(format!(
            "its image {} does not exist and the JSON embeds none (imageData)",
            image.display()
        ));
    };
    let size = match (v["imageWidth"].as_u64(), v["imageHeight"].as_u64()) {
        (Some(w), Some(h)) if w > 0 && h > 0 => Some((w as u32, h as u32)),
        _ => None,
    };
    // (label, group) → object; shapes without a group are objects of their own.
    let mut groups: BTreeMap<(usize, i64), usize> = BTreeMap::new();
    let mut objects: Vec<Object> = Vec::new();
    for (k, shape) in v["shapes"].as_array().into_iter().flatten().enumerate() {
        let Some(label) = shape["label"].as_str().map(str::trim).filter(|l| !l.is_empty()) else {
            *skipped.entry("shapes without a label (a label is the class)".into()).or_default() += 1;
            continue;
        };
        let pts: Vec<(f64, f64)> = shape["points"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
            .collect();
        let kind = shape["shape_type"].as_str().unwrap_or("polygon");
        let poly: Vec<f64> = match (kind, pts.as_slice()) {
            ("polygon", p) if p.len() >= 3 => p.iter().flat_map(|&(x, y)| [x, y]).collect(),
            ("rectangle", [(x0, y0), (x1, y1)]) => {
                let (l, r, t, b) = (x0.min(*x1), x0.max(*x1), y0.min(*y1), y0.max(*y1));
                vec![l, t, r, t, r, b, l, b]
            }
            ("circle", [(cx, cy), (px, py)]) => {
                let r = ((px - cx).powi(2) + (py - cy).powi(2)).sqrt();
                (0..64)
                    .flat_map(|i| {
                        let a = std::f64::consts::TAU * i as f64 / 64.0;
                        [cx + r * a.cos(), cy + r * a.sin()]
                    })
                    .collect()
            }
            ("polygon", _) => {
                *skipped.entry("polygons of fewer than 3 points".into()).or_default() += 1;
                continue;
            }
            ("rectangle" | "circle", _) => {
                *skipped.entry(format!("{kind}s without their 2 points")).or_default() += 1;
                continue;
            }
            (kind, _) => {
                *skipped
                    .entry(format!("{kind} shapes (only polygons, rectangles and circles are objects)"))
                    .or_default() += 1;
                continue;
            }
        };
        let class = match labels.iter().position(|c| c == label) {
            Some(c) => c,
            None => {
                labels.push(label.to_string());
                labels.len() - 1
            }
        };
        let group = shape["group_id"].as_i64().unwrap_or(-1 - k as i64);
        match groups.get(&(class, group)) {
            Some(&o) => objects[o].polygons.push(poly),
            None => {
                groups.insert((class, group), objects.len());
                objects.push(Object { class, polygons: vec![poly], bbox: None });
            }
        }
    }
    Ok(Item { image, embedded, source: path.to_path_buf(), size, normalised: false, objects })
}

/// Standard base64 (padding optional, whitespace ignored).
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let chars: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(chars.len() * 3 / 4);
    for chunk in chars.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

/// Import the dataset at `dir` (in `format`, or the one [`detect`] finds) as `opts` says.
pub fn import_labels(
    dir: &Path,
    format: Option<LabelFormat>,
    opts: &LabelImportOptions,
) -> Result<ImportSummary, DataError> {
    if !["train", "valid", "test"].contains(&opts.split.as_str()) {
        return Err(invalid(format!("--split {}: use train, valid or test", opts.split)));
    }
    for (flag, share) in [("--valid-share", opts.valid_share), ("--test-share", opts.test_share)] {
        if !(0.0..1.0).contains(&share) {
            return Err(invalid(format!("{flag} {share}: use a share in [0, 1)")));
        }
    }
    let Some(format) = format.or_else(|| detect(dir)) else {
        return Err(io(
            dir,
            "holds neither a YOLO dataset (images/ beside labels/ with .txt files) nor LabelMe JSON files",
        ));
    };
    let mut summary = ImportSummary::default();
    // (split or None, items) per source folder.
    let mut sources: Vec<(Option<String>, Vec<Item>)> = Vec::new();
    let names = match format {
        LabelFormat::Yolo => {
            let names = yolo_names(dir)?;
            for (split, images, labels) in yolo_layout(dir) {
                let mut items = Vec::new();
                for im in image_files(&images)? {
                    let stem = im.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    let label = labels.join(format!("{stem}.txt"));
                    let objects = if label.is_file() {
                        match yolo_objects(&label, names.len(), &mut summary.notes) {
                            Ok(o) => o,
                            Err(e) => {
                                summary
                                    .left_out
                                    .push((im.clone(), format!("its labels {}: {e}", label.display())));
                                continue;
                            }
                        }
                    } else {
                        Vec::new()
                    };
                    items.push(Item {
                        image: im,
                        embedded: None,
                        source: label,
                        size: None,
                        normalised: true,
                        objects,
                    });
                }
                sources.push((split, items));
            }
            names
        }
        LabelFormat::LabelMe => {
            let (mut labels, mut skipped) = (Vec::new(), BTreeMap::new());
            for (split, folder) in labelme_layout(dir) {
                let mut items = Vec::new();
                for f in labelme_files(&folder) {
                    match labelme_item(&f, &mut labels, &mut skipped) {
                        Ok(item) => items.push(item),
                        Err(e) => summary.left_out.push((f.clone(), e)),
                    }
                }
                sources.push((split, items));
            }
            // The class names sorted; each object's class from the order labels were met.
            let mut names = labels.clone();
            names.sort();
            let rank: Vec<usize> =
                labels.iter().map(|l| names.iter().position(|n| n == l).unwrap_or_default()).collect();
            for o in sources.iter_mut().flat_map(|s| s.1.iter_mut()).flat_map(|i| i.objects.iter_mut()) {
                o.class = rank[o.class];
            }
            for (kind, n) in skipped {
                summary.notes.push(format!("{n} LabelMe {kind} left out"));
            }
            names
        }
    };
    if names.is_empty() {
        return Err(io(dir, "no labelled shape: the annotation files name no class"));
    }
    finish_labels(dir, &names, sources, opts, summary)
}

/// Assign `sources`' items to splits and write them (see [`import_labels`]).
fn finish_labels(
    dir: &Path,
    names: &[String],
    mut sources: Vec<(Option<String>, Vec<Item>)>,
    opts: &LabelImportOptions,
    mut summary: ImportSummary,
) -> Result<ImportSummary, DataError> {
    // Every item's split. One source folder (a split folder or none) may be divided by the
    // shares; several are split already.
    let mut by_split: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    let mut opts = opts.clone();
    if let [(split, _)] = sources.as_mut_slice() {
        if let Some(s) = split.take() {
            opts.split = s;
        }
    }
    if sources.iter().any(|s| s.0.is_some()) && (opts.valid_share > 0.0 || opts.test_share > 0.0) {
        return Err(invalid(format!(
            "{} is split already: leave out --valid-share and --test-share",
            dir.display()
        )));
    }
    for (split, items) in sources {
        match split {
            Some(s) => by_split.entry(s).or_default().extend(items),
            None => {
                let names: Vec<String> = items
                    .iter()
                    .map(|i| {
                        i.image.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
                    })
                    .collect();
                let splits = split_names(&names, &opts.split, opts.valid_share, opts.test_share, opts.seed);
                for (item, s) in items.into_iter().zip(splits) {
                    by_split.entry(s).or_default().push(item);
                }
            }
        }
    }
    for s in by_split.keys() {
        let out = opts.out.join(s);
        if out.exists() && std::fs::read_dir(&out).map_err(|e| io(&out, e))?.next().is_some() {
            return Err(io(
                &out,
                "the split folder exists and is not empty: choose a new --out (import never mixes with other files)",
            ));
        }
    }
    let categories: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(k, c)| serde_json::json!({"id": k + 1, "name": c, "supercategory": "none"}))
        .collect();
    let mut box_only = 0;
    for (split, items) in by_split {
        let done = write_split(dir, &opts.out, &split, items, &categories, &mut summary, &mut box_only)?;
        summary.splits.push(done);
    }
    if box_only > 0 {
        summary.notes.push(format!(
            "{box_only} object(s) are boxes without a polygon (YOLO detection lines): they train their box and class, not a mask"
        ));
    }
    Ok(summary)
}

/// A class's name for a note (`"crack"`), from the categories written (class k is id k + 1).
fn class_name(categories: &[Value], class: usize) -> String {
    categories
        .iter()
        .find(|c| c["id"].as_u64() == Some(class as u64 + 1))
        .and_then(|c| c["name"].as_str())
        .map_or_else(|| format!("class-{class}"), |n| format!("{n:?}"))
}

/// Write one split's images and annotation file (temporary folder, then renamed into place).
fn write_split(
    dir: &Path,
    out: &Path,
    split: &str,
    items: Vec<Item>,
    categories: &[Value],
    summary: &mut ImportSummary,
    box_only: &mut usize,
) -> Result<SplitImport, DataError> {
    let tmp = begin_split(out, split)?;
    let mut done = SplitImport { split: split.to_string(), ..Default::default() };
    let (mut images, mut annotations) = (Vec::new(), Vec::new());
    let mut taken = std::collections::HashSet::new();
    for item in items {
        let written = match &item.embedded {
            Some(json) => embedded_image(&item, json),
            None => frame_of(&item).and_then(|size| {
                let (bytes, name, note) = image_in_frame(&item.image, size, true)?;
                Ok((bytes, name, note, size))
            }),
        };
        let (bytes, file_name, note, (w, h)) = match written {
            Ok(x) => x,
            Err(e) => {
                summary
                    .left_out
                    .push((item.image.clone(), format!("{e} (annotations {})", item.source.display())));
                continue;
            }
        };
        if !taken.insert(file_name.to_lowercase()) {
            summary.left_out.push((
                item.image.clone(),
                format!(
                    "a second image named {file_name} in {split}/ (from {}; its annotations are left out with it)",
                    item.source.display()
                ),
            ));
            continue;
        }
        summary.notes.extend(note);
        let path = tmp.join(&file_name);
        crate::fsutil::write_atomic(&path, &bytes).map_err(|e| io(&path, e))?;
        let id = images.len() as u64 + 1;
        images.push(serde_json::json!({"id": id, "file_name": file_name, "width": w, "height": h}));
        let (sx, sy) = if item.normalised { (w as f64, h as f64) } else { (1.0, 1.0) };
        let (mut objects, mut clipped) = (0, 0);
        for o in item.objects {
            let polygons: Vec<Vec<f64>> = o
                .polygons
                .iter()
                .map(|p| p.chunks_exact(2).flat_map(|c| [c[0] * sx, c[1] * sy]).collect())
                .collect();
            let (bbox, area, segmentation) = match o.bbox {
                Some([x, y, bw, bh]) => {
                    // Clipped to the image; one with nothing inside it is left out, as a
                    // polygon that covers no pixel is.
                    let (fw, fh) = (w as f64, h as f64);
                    let (x0, x1) = ((x * sx).clamp(0.0, fw), ((x + bw) * sx).clamp(0.0, fw));
                    let (y0, y1) = ((y * sy).clamp(0.0, fh), ((y + bh) * sy).clamp(0.0, fh));
                    if !(x1 > x0 && y1 > y0) {
                        summary.notes.push(format!(
                            "{}: a {} box lies outside the {w}x{h} image; left out",
                            item.source.display(),
                            class_name(categories, o.class)
                        ));
                        continue;
                    }
                    if x1 - x0 < bw * sx - 1e-6 || y1 - y0 < bh * sy - 1e-6 {
                        clipped += 1;
                    }
                    *box_only += 1;
                    let b = [x0, y0, x1 - x0, y1 - y0];
                    (b, b[2] * b[3], Value::Array(Vec::new()))
                }
                None => {
                    let mask = super::rle::rasterize_polygons(&polygons, h as usize, w as usize)
                        .map_err(|e| io(&item.source, format!("a polygon cannot be drawn: {e}")))?;
                    let area = mask.iter().filter(|&&m| m).count() as f64;
                    if area == 0.0 {
                        summary.notes.push(format!(
                            "{}: a {} shape covers no pixel of the {w}x{h} image; left out",
                            item.source.display(),
                            class_name(categories, o.class)
                        ));
                        continue;
                    }
                    let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
                    for p in &polygons {
                        for c in p.chunks_exact(2) {
                            x0 = x0.min(c[0].clamp(0.0, w as f64));
                            x1 = x1.max(c[0].clamp(0.0, w as f64));
                            y0 = y0.min(c[1].clamp(0.0, h as f64));
                            y1 = y1.max(c[1].clamp(0.0, h as f64));
                        }
                    }
                    ([x0, y0, x1 - x0, y1 - y0], area, serde_json::json!(polygons))
                }
            };
            objects += 1;
            annotations.push(serde_json::json!({
                "id": annotations.len() as u64 + 1, "image_id": id, "category_id": o.class as u64 + 1,
                "bbox": bbox, "area": area, "iscrowd": 0, "segmentation": segmentation,
            }));
        }
        if clipped > 0 {
            summary.notes.push(format!(
                "{}: {clipped} box(es) reaching past the {w}x{h} image clipped to it",
                item.source.display()
            ));
        }
        done.images += 1;
        done.objects += objects;
        done.negatives += usize::from(objects == 0);
    }
    let coco = serde_json::json!({
        "images": images, "annotations": annotations, "categories": categories,
        "info": {"description": format!("imported by lorahost from {}", dir.display())},
    });
    finish_split(&tmp, &out.join(split), &coco)?;
    Ok(done)
}

/// The frame an item's annotations were drawn on: the annotation file's size, else the image
/// as displayed.
fn frame_of(item: &Item) -> Result<(u32, u32), String> {
    match item.size {
        Some(s) => Ok(s),
        None => Ok(crate::imageio::frames(&item.image).map_err(|e| e.to_string())?.displayed),
    }
}

/// A LabelMe file's embedded image, written as it is under the name its JSON gives.
type Written = (Vec<u8>, String, Option<String>, (u32, u32));

fn embedded_image(item: &Item, json: &Path) -> Result<Written, String> {
    let text = std::fs::read_to_string(json).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?;
    let bytes = v["imageData"].as_str().and_then(decode_base64).ok_or("its imageData is not valid base64")?;
    let bytes = bytes.as_slice();
    let img =
        image::load_from_memory(bytes).map_err(|e| format!("its embedded imageData is not an image: {e}"))?;
    let ext = match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::Jpeg) => "jpg",
        _ => return Err("its embedded imageData is neither PNG nor JPEG".into()),
    };
    let stem =
        item.image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let note = format!("{}: the image is the JSON's embedded imageData", item.source.display());
    Ok((bytes.to_vec(), format!("{stem}.{ext}"), Some(note), (img.width(), img.height())))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::data::coco::{Segmentation, Split};

    fn save_image(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]))
            .save(path)
            .unwrap();
    }

    fn options(out: &Path) -> LabelImportOptions {
        LabelImportOptions {
            out: out.to_path_buf(),
            split: "train".into(),
            valid_share: 0.0,
            test_share: 0.0,
            seed: 0,
        }
    }

    fn encode_base64(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n =
                (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
            }
        }
        out
    }

    /// A Roboflow-style YOLO export (data.yaml, train/ and valid/ with images/ and labels/): the
    /// polygons come back in pixels as drawn, a box line is a box-only object, an image without
    /// a label file is a negative, and the dataset loads as training reads it.
    #[test]
    fn a_yolo_export_loads_back_with_its_polygons_in_pixels() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("yolo");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("data.yaml"),
            "train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['crack', 'spall']\n",
        )
        .unwrap();
        save_image(&src.join("train/images/a.jpg"), 40, 30);
        save_image(&src.join("train/images/b.png"), 20, 20);
        save_image(&src.join("valid/images/c.jpg"), 50, 50);
        // Pixel polygons, written normalised.
        let poly = [4.0, 3.0, 20.0, 3.0, 20.0, 15.0, 4.0, 15.0];
        let norm: Vec<String> = poly.chunks(2).map(|c| format!("{} {}", c[0] / 40.0, c[1] / 30.0)).collect();
        std::fs::create_dir_all(src.join("train/labels")).unwrap();
        std::fs::write(src.join("train/labels/a.txt"), format!("0 {}\n1 0.5 0.5 0.25 0.2\n", norm.join(" ")))
            .unwrap();
        std::fs::create_dir_all(src.join("valid/labels")).unwrap();
        std::fs::write(src.join("valid/labels/c.txt"), "1 0.1 0.1 0.5 0.1 0.3 0.6\n").unwrap();
        assert_eq!(detect(&src), Some(LabelFormat::Yolo));
        let out = d.path().join("data");
        let s = import_labels(&src, None, &options(&out)).unwrap();
        let counts: Vec<(String, usize, usize, usize)> =
            s.splits.iter().map(|x| (x.split.clone(), x.images, x.objects, x.negatives)).collect();
        assert_eq!(counts, vec![("train".into(), 2, 2, 1), ("valid".into(), 1, 1, 0)]);
        assert!(s.notes.iter().any(|n| n.contains("1 object(s) are boxes")), "{:?}", s.notes);
        let train = Split::load(&out, "train").unwrap();
        assert_eq!(train.categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["crack", "spall"]);
        let a = train.images.iter().find(|i| i.file_name == "a.jpg").unwrap();
        assert_eq!(a.objects.len(), 2);
        let Some(Segmentation::Polygons(p)) = &a.objects[0].segmentation else {
            panic!("{:?}", a.objects[0])
        };
        assert!(p[0].iter().zip(poly).all(|(g, w)| (g - w).abs() < 1e-9), "{p:?}");
        assert_eq!(a.objects[0].bbox_xywh, [4.0, 3.0, 16.0, 12.0]);
        assert_eq!(a.objects[0].category_id, 1);
        assert!(a.objects[1].segmentation.is_none());
        let b = a.objects[1].bbox_xywh;
        assert!(
            (b[0] - 15.0).abs() < 1e-9
                && (b[1] - 12.0).abs() < 1e-9
                && (b[2] - 10.0).abs() < 1e-9
                && (b[3] - 6.0).abs() < 1e-9,
            "{b:?}"
        );
        assert_eq!(a.objects[1].category_id, 2);
        assert!(train.images.iter().any(|i| i.file_name == "b.png" && i.objects.is_empty()));
        // The annotation's area is the polygon's pixel count, as training decodes it.
        let coco: Value =
            serde_json::from_slice(&std::fs::read(out.join("train/_annotations.coco.json")).unwrap())
                .unwrap();
        let mask = a.objects[0].segmentation.as_ref().unwrap().decode(30, 40).unwrap();
        assert_eq!(
            coco["annotations"][0]["area"].as_f64().unwrap(),
            mask.iter().filter(|&&m| m).count() as f64
        );
        // Training on the YOLO folder itself says how to convert it.
        let e = Split::load(&src, "train").unwrap_err().to_string();
        assert!(e.contains("YOLO dataset") && e.contains("lorahost import --from"), "{e}");
        // Nothing is written into a split folder that holds files; names are required.
        let e = import_labels(&src, None, &options(&out)).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        std::fs::remove_file(src.join("data.yaml")).unwrap();
        let e = import_labels(&src, None, &options(&d.path().join("other"))).unwrap_err().to_string();
        assert!(e.contains("data.yaml") && e.contains("names"), "{e}");
    }

    /// LabelMe JSON: rectangles and polygons as objects, shapes of one label and group as one
    /// object, points left out with a note, an image embedded as imageData written out; the
    /// class names are the labels, sorted.
    #[test]
    fn labelme_shapes_groups_and_embedded_images() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("labelme");
        save_image(&src.join("x.png"), 30, 20);
        let x = serde_json::json!({"version": "5.4.1", "imagePath": "x.png", "imageWidth": 30, "imageHeight": 20, "imageData": null,
            "shapes": [
                {"label": "dent", "points": [[12, 9], [2, 3]], "shape_type": "rectangle", "group_id": null},
                {"label": "scratch", "points": [[20, 2], [28, 2], [28, 6]], "shape_type": "polygon", "group_id": 1},
                {"label": "scratch", "points": [[20, 12], [28, 12], [28, 16]], "shape_type": "polygon", "group_id": 1},
                {"label": "scratch", "points": [[5, 15]], "shape_type": "point", "group_id": null}]});
        std::fs::write(src.join("x.json"), x.to_string()).unwrap();
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(16, 12, image::Rgb([9, 9, 9])))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let y = serde_json::json!({"imagePath": "..\\photos\\y.png", "imageWidth": 16, "imageHeight": 12, "imageData": encode_base64(&png),
            "shapes": [{"label": "dent", "points": [[1, 1], [8, 1], [8, 8], [1, 8]], "shape_type": "polygon"}]});
        std::fs::write(src.join("y.json"), y.to_string()).unwrap();
        assert_eq!(detect(&src), Some(LabelFormat::LabelMe));
        let out = d.path().join("data");
        let s = import_labels(&src, None, &options(&out)).unwrap();
        assert_eq!((s.splits[0].images, s.splits[0].objects), (2, 3), "{s:?}");
        assert!(
            s.notes.iter().any(|n| n.contains(
                "1 LabelMe point shapes (only polygons, rectangles and circles are objects) left out"
            )),
            "{:?}",
            s.notes
        );
        let train = Split::load(&out, "train").unwrap();
        assert_eq!(train.categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["dent", "scratch"]);
        let xi = train.images.iter().find(|i| i.file_name == "x.png").unwrap();
        let dent = &xi.objects[0];
        assert_eq!(dent.bbox_xywh, [2.0, 3.0, 10.0, 6.0]);
        let area = dent.segmentation.as_ref().unwrap().decode(20, 30).unwrap().iter().filter(|&&m| m).count();
        assert_eq!(area, 60);
        let Some(Segmentation::Polygons(p)) = &xi.objects[1].segmentation else { panic!() };
        assert_eq!(p.len(), 2);
        let yi = train.images.iter().find(|i| i.file_name == "y.png").unwrap();
        assert_eq!(std::fs::read(out.join("train/y.png")).unwrap(), png);
        assert_eq!(yi.objects.len(), 1);
    }

    /// YOLO boxes reaching past the image are clipped to it (with a note), a box wholly
    /// outside is left out (with a note), as polygons are.
    #[test]
    fn yolo_boxes_past_the_image_are_clipped_and_outside_ones_left_out() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("yolo");
        std::fs::create_dir_all(src.join("train/labels")).unwrap();
        std::fs::write(src.join("data.yaml"), "train: ../train/images\nnc: 1\nnames: ['crack']\n").unwrap();
        save_image(&src.join("train/images/a.png"), 200, 100);
        std::fs::write(src.join("train/labels/a.txt"), "0 0.95 0.5 0.2 0.2\n0 1.5 0.5 0.2 0.2\n").unwrap();
        let out = d.path().join("data");
        let s = import_labels(&src, None, &options(&out)).unwrap();
        assert_eq!((s.splits[0].images, s.splits[0].objects), (1, 1), "{s:?}");
        assert!(s.notes.iter().any(|n| n.contains("box lies outside the 200x100 image")), "{:?}", s.notes);
        assert!(s.notes.iter().any(|n| n.contains("1 box(es) reaching past")), "{:?}", s.notes);
        let train = Split::load(&out, "train").unwrap();
        let b = train.images[0].objects[0].bbox_xywh;
        assert!(
            (b[0] - 170.0).abs() < 1e-9 && (b[2] - 30.0).abs() < 1e-9 && (b[3] - 20.0).abs() < 1e-9,
            "{b:?}"
        );
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("aGk=\n").unwrap(), b"hi");
        assert!(decode_base64("a$==").is_none());
    }

    #[test]
    fn yolo_lines_boxes_polygons_and_bad_lines() {
        let dir = std::env::temp_dir().join(format!("lorahost-yolo-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(
            &f,
            "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.3 0.1 0.3 0.3\n\n2 0.1 0.1 0.2 0.2\n1 0.1 0.2 0.3\nx 1 2 3 4\n",
        )
        .unwrap();
        let mut notes = Vec::new();
        let o = yolo_objects(&f, 2, &mut notes).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].bbox, Some([0.4, 0.3, 0.2, 0.4]));
        assert_eq!(o[1].polygons, vec![vec![0.1, 0.1, 0.3, 0.1, 0.3, 0.3]]);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("a.txt:4") && notes[0].contains("class 2"), "{notes:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
