//! Tests for the data module: parsing, preflight, synthetic data, negatives, flips, batching.

use super::batch::{build_sample, collate, SampleOptions};
use super::coco::{Dataset, FindingKind, Segmentation, Severity, Split};
use super::synthetic::{write_synthetic, SyntheticSpec};
use super::DataError;
use candle_core::Device;
use std::path::Path;

fn png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 20) as u8, (y * 20) as u8, 90]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn write_json(dir: &Path, split: &str, v: serde_json::Value) {
    let p = dir.join(split).join(super::coco::ANNOTATION_FILE);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn opts(size: usize, mask: usize, hflip: bool) -> SampleOptions {
    SampleOptions { hflip, ..SampleOptions::plain(size, mask, 1, 7) }
}

/// One 5x6 (w x h) image with a polygon, an uncompressed RLE and a compressed RLE (the
/// pycocotools string `0162M0:N`, see `rle::tests::compressed_matches_pycocotools`).
#[test]
fn parses_polygon_uncompressed_and_compressed_rle() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/a.png"), 5, 6);
    let counts =
        crate::sam3::postprocess::rle_encode(&(0..30).map(|i| i == 7 || i == 8).collect::<Vec<bool>>(), 6, 5)
            .counts;
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png", "width": 5, "height": 6}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2],
                 "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "iscrowd": 0},
                {"id": 11, "image_id": 1, "category_id": 2, "bbox": [2, 1, 2, 1],
                 "segmentation": {"size": [6, 5], "counts": counts}, "iscrowd": 0},
                {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 6],
                 "segmentation": {"size": [6, 5], "counts": "0162M0:N"}, "iscrowd": 1}
            ],
            "categories": [{"id": 1, "name": "Crack"}, {"id": 2, "name": "Stain"}]
        }),
    );
    let ds = Dataset::load(d.path()).unwrap();
    let split = ds.split("train").unwrap();
    // Only the crowd annotation is pointed out (trained as one instance).
    let kinds: Vec<FindingKind> = split.findings.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, vec![FindingKind::Crowd], "{:?}", split.findings);
    let objs = &split.images[0].objects;
    assert_eq!(objs.len(), 3);
    assert!(matches!(objs[0].segmentation, Some(Segmentation::Polygons(_))));
    assert!(objs[2].iscrowd);
    let m0 = objs[0].segmentation.as_ref().unwrap().decode(6, 5).unwrap();
    let on: Vec<usize> = (0..30).filter(|&i| m0[i]).collect();
    assert_eq!(on, vec![6, 7, 11, 12]);
    let m1 = objs[1].segmentation.as_ref().unwrap().decode(6, 5).unwrap();
    assert_eq!((0..30).filter(|&i| m1[i]).collect::<Vec<_>>(), vec![7, 8]);
    let m2 = objs[2].segmentation.as_ref().unwrap().decode(6, 5).unwrap();
    assert_eq!(m2.iter().filter(|b| **b).count(), 8);
    assert!(m2[0] && m2[29] && m2[6]);
    assert_eq!(ds.preflight().len(), 1);

    let s = build_sample(split, 0, &opts(8, 6, false)).unwrap();
    assert_eq!(s.pixel_values.dims(), &[1, 3, 8, 8]);
    let crack = s.queries.iter().find(|q| q.prompt == "crack").unwrap();
    assert!(!crack.negative && crack.ann_ids == vec![10]);
    let b = crack.boxes[0];
    let want = [2.0 / 5.0, 2.0 / 6.0, 2.0 / 5.0, 2.0 / 6.0];
    for k in 0..4 {
        assert!((b[k] - want[k]).abs() < 1e-6, "{b:?}");
    }
    let stain = s.queries.iter().find(|q| q.prompt == "stain").unwrap();
    assert_eq!(stain.ann_ids, vec![11, 12]);
    assert_eq!(stain.masks.len(), 2 * 36);
}

#[test]
fn preflight_finds_planted_faults() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/ok.png"), 10, 8);
    std::fs::write(d.path().join("train/corrupt.jpg"), b"not a jpeg").unwrap();
    png(&d.path().join("train/empty.png"), 10, 8);
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [
                {"id": 1, "file_name": "ok.png", "width": 10, "height": 8},
                {"id": 2, "file_name": "missing.png"},
                {"id": 3, "file_name": "corrupt.jpg"},
                {"id": 4, "file_name": "empty.png", "width": 8, "height": 10}
            ],
            "annotations": [
                {"id": 100, "image_id": 1, "category_id": 1, "bbox": [6, 2, 8, 3], "segmentation": []},
                {"id": 101, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 3], "segmentation": []},
                {"id": 102, "image_id": 1, "category_id": 1, "segmentation": []},
                {"id": 103, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "segmentation": 5},
                {"id": 104, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2],
                 "segmentation": {"size": [8, 10], "counts": [1, 2]}},
                {"id": 105, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2],
                 "segmentation": {"size": [8, 10], "counts": "\u{7f}"}},
                {"id": 106, "image_id": 2, "category_id": 2, "bbox": [1, 1, 2, 2]},
                {"id": 107, "image_id": 3, "category_id": 3, "bbox": [1, 1, 2, 2]},
                {"id": 108, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},
                {"id": 109, "image_id": 1, "category_id": 1, "bbox": [20, 2, 3, 3]}
            ],
            "categories": [
                {"id": 1, "name": "crack"}, {"id": 2, "name": "0"}, {"id": 3, "name": "Object"},
                {"id": 4, "name": "CRACK "}
            ]
        }),
    );
    let ds = Dataset::load(d.path()).unwrap();
    let f = ds.preflight();
    let json = d.path().join("train").join(super::coco::ANNOTATION_FILE);
    let has = |kind: FindingKind, file: &Path, img: Option<u64>, ann: Option<u64>| {
        f.iter().any(|x| x.kind == kind && x.file == file && x.image_id == img && x.ann_id == ann)
    };
    let dump = f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n");
    let t = d.path().join("train");
    assert!(has(FindingKind::MissingImage, &t.join("missing.png"), Some(2), None), "{dump}");
    assert!(has(FindingKind::CorruptImage, &t.join("corrupt.jpg"), Some(3), None), "{dump}");
    assert!(has(FindingKind::BoxOutsideImage, &json, Some(1), Some(100)), "{dump}");
    assert!(has(FindingKind::BoxOutsideImage, &json, Some(1), Some(109)), "{dump}");
    assert!(has(FindingKind::DegenerateBox, &json, Some(1), Some(101)), "{dump}");
    assert!(has(FindingKind::MissingBox, &json, Some(1), Some(102)), "{dump}");
    for ann in [103, 104, 105] {
        assert!(has(FindingKind::UndecodableMask, &json, Some(1), Some(ann)), "{dump}");
        let f = f.iter().find(|x| x.ann_id == Some(ann) && x.kind == FindingKind::UndecodableMask).unwrap();
        assert_eq!(f.severity, Severity::Warning, "box-only, not dropped: {f}");
        assert!(f.message.contains("box and class only"), "{f}");
    }
    assert!(f.iter().all(|x| x.split == "train"));
    assert!(has(FindingKind::UnknownCategory, &json, Some(1), Some(108)), "{dump}");
    assert!(has(FindingKind::ImageWithoutAnnotations, &json, Some(4), None), "{dump}");
    assert!(has(FindingKind::SizeMismatch, &t.join("empty.png"), Some(4), None), "{dump}");
    let poor: Vec<&str> =
        f.iter().filter(|x| x.kind == FindingKind::PoorPrompt).map(|x| x.message.as_str()).collect();
    assert!(poor.len() == 2 && poor[0].contains("\"0\"") && poor[1].contains("Object"), "{dump}");
    assert!(
        f.iter().any(|x| x.kind == FindingKind::DuplicatePrompt && x.message.contains("[1, 4]")),
        "{dump}"
    );
    assert!(f.iter().any(|x| x.kind == FindingKind::UnusedCategory && x.message.contains("CRACK")), "{dump}");
    // Undecodable masks (103: not a segmentation; 104: counts do not cover the image, known
    // only at the image's size; 105: a broken compressed string) leave box-only objects: the
    // sample is built, their targets carry no valid mask.
    let split = ds.split("train").unwrap();
    let s = build_sample(split, 0, &opts(8, 4, false)).unwrap();
    let crack = s.queries.iter().find(|q| q.prompt == "crack").unwrap();
    assert_eq!(crack.ann_ids, vec![100, 103, 104, 105], "109 lies outside the image");
    assert_eq!(crack.mask_valid, vec![false, false, false, false], "100 has segmentation []");
    // Dropped annotations are dropped whole: objects and categories stay aligned.
    let ids: Vec<u64> = split.images[0].objects.iter().map(|o| o.ann_id).collect();
    assert_eq!(ids, vec![100, 103, 104, 105, 109]);
    // Six errors: missing, corrupt, degenerate, no box, unknown category, box entirely outside;
    // the partly outside box (100) is a warning (clipped).
    assert_eq!(f.iter().filter(|x| x.severity == Severity::Error).count(), 6, "{dump}");
    let partly = f.iter().find(|x| x.ann_id == Some(100)).unwrap();
    assert_eq!(partly.severity, Severity::Warning);
    let clipped = super::batch::box_to_cxcywh([6.0, 2.0, 8.0, 3.0], 10, 8, false);
    assert_eq!(clipped, [0.8, 3.5 / 8.0, 0.4, 3.0 / 8.0]);
    assert_eq!(super::batch::box_to_cxcywh([20.0, 2.0, 3.0, 3.0], 10, 8, false)[2], 0.0);
}

#[test]
fn missing_split_names_path_and_fix() {
    let d = tempfile::tempdir().unwrap();
    let e = Dataset::load(d.path()).unwrap_err();
    assert!(matches!(e, DataError::MissingSplit { .. }));
    let s = e.to_string();
    assert!(s.contains("train") && s.contains("_annotations.coco.json") && s.contains("data_dir"), "{s}");
    write_json(d.path(), "train", serde_json::json!({"images": "nope"}));
    let s = Dataset::load(d.path()).unwrap_err().to_string();
    assert!(s.contains("images") && s.contains("cannot parse"), "{s}");
}

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for split in ["train", "valid"] {
        let mut names: Vec<_> =
            std::fs::read_dir(dir.join(split)).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            out.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[test]
fn synthetic_is_deterministic_and_preflight_clean() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spec = SyntheticSpec::default();
    let sa = write_synthetic(a.path(), &spec).unwrap();
    write_synthetic(b.path(), &spec).unwrap();
    let (fa, fb) = (read_all(a.path()), read_all(b.path()));
    assert_eq!(fa.len(), spec.train_images + spec.valid_images + 2);
    assert!(fa == fb, "same spec must give byte-identical files");
    let c = tempfile::tempdir().unwrap();
    write_synthetic(c.path(), &SyntheticSpec { seed: 1, ..spec.clone() }).unwrap();
    assert!(read_all(c.path()) != fa);

    let ds = Dataset::load(a.path()).unwrap();
    let f = ds.preflight();
    assert!(f.is_empty(), "{}", f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n"));
    let fp = ds.fingerprint();
    assert_eq!(fp.categories, vec!["crack", "stain"]);
    assert_eq!(fp.splits.iter().map(|s| s.images).sum::<usize>(), 12);
    assert_eq!(fp.splits.iter().map(|s| s.annotations).sum::<usize>(), sa.annotations);
    let fpb = Dataset::load(b.path()).unwrap().fingerprint();
    assert_eq!(fp.content_sha256, fpb.content_sha256);
    assert_ne!(fp.content_sha256, Dataset::load(c.path()).unwrap().fingerprint().content_sha256);
    // Both RLE forms occur, and some images lack a stain (so "stain" is a negative there).
    let train = ds.split("train").unwrap();
    let mut negatives = 0;
    for i in 0..train.images.len() {
        let qs = train.queries(i, 3, 0);
        assert!(qs.iter().any(|q| q.prompt == "crack" && !q.negative));
        negatives += qs.iter().filter(|q| q.negative && q.prompt == "stain").count();
    }
    assert!(negatives > 0);
    let text = std::fs::read_to_string(a.path().join("train").join(super::coco::ANNOTATION_FILE)).unwrap();
    assert!(text.contains("\"counts\": \"") && text.contains("\"counts\": ["));
    assert!(write_synthetic(a.path(), &SyntheticSpec { size: 8, ..spec }).is_err());
}

/// A one-class dataset still gets its negatives (generic object words), never one of its own
/// category names (compared without case, also as a plural).
#[test]
fn a_single_class_dataset_gets_generic_negatives() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/a.png"), 10, 8);
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 0, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 0, "name": "Teddy Bears"}]
        }),
    );
    let split = Split::load(d.path(), "train").unwrap();
    let n = super::coco::GENERIC_NEGATIVES.len() - 1;
    for seed in 0..30 {
        let neg: Vec<String> =
            split.queries(0, n + 5, seed).into_iter().filter(|q| q.negative).map(|q| q.prompt).collect();
        assert_eq!(neg.len(), n);
        assert!(!neg.iter().any(|w| w == "teddy bear"), "{neg:?}");
    }
}

/// The built-in generic negatives are things that are not in inspection, medical or aerial
/// images (no road, sky, person...: "there is no road" on a road-crack photo teaches the
/// model to miss roads); `training.generic_negatives` replaces them for the whole dataset
/// (normalized, never a category of any split, also as a plural), and an empty list turns
/// generic fillers off.
#[test]
fn generic_negatives_are_safe_configurable_and_never_a_category() {
    for w in ["road", "sky", "grass", "tree", "building", "person", "window", "car", "door", "table"] {
        assert!(!super::coco::GENERIC_NEGATIVES.contains(&w), "{w} is often in the picture");
    }
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/a.png"), 10, 8);
    png(&d.path().join("train/b.png"), 10, 8);
    png(&d.path().join("valid/a.png"), 10, 8);
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"id": 0, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 0, "name": "Door"}]
        }),
    );
    write_json(
        d.path(),
        "valid",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 0, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 0, "name": "Crack"}]
        }),
    );
    let negatives = |ds: &Dataset, split: &str, index: usize, seed: u64| -> Vec<String> {
        let s = ds.split(split).unwrap();
        let mut n: Vec<String> =
            s.queries(index, 10, seed).into_iter().filter(|q| q.negative).map(|q| q.prompt).collect();
        n.sort();
        n
    };
    // By default: the built-in words (the dataset's prompts are not among them).
    let ds = Dataset::load(d.path()).unwrap();
    let train = ds.split("train").unwrap();
    assert_eq!(train.generic_negatives, super::coco::GENERIC_NEGATIVES);
    assert!(negatives(&ds, "train", 0, 1)
        .iter()
        .all(|w| super::coco::GENERIC_NEGATIVES.contains(&w.as_str())));
    // A list of one's own: trimmed, lower-cased, once; "cracks" (valid's category, as a
    // plural) and "doors" are no fillers anywhere.
    let words = ["Teapot", " violin ", "", "teapot", "cracks", "DOORS", "hot dog"];
    let ds = Dataset::load(d.path()).unwrap().with_generic_negatives(words);
    for s in &ds.splits {
        assert_eq!(s.generic_negatives, ["teapot", "violin", "hot dog"], "{}", s.name);
    }
    for seed in 0..10 {
        assert_eq!(negatives(&ds, "train", 0, seed), ["hot dog", "teapot", "violin"]);
        // The background image: the absent category first, then the words.
        assert_eq!(negatives(&ds, "train", 1, seed), ["door", "hot dog", "teapot", "violin"]);
        assert_eq!(negatives(&ds, "valid", 0, seed), ["hot dog", "teapot", "violin"]);
    }
    // Off: the one-class image gets only its positive, the background image only "door".
    let mut ds = Dataset::load(d.path()).unwrap();
    ds.set_generic_negatives(Vec::<String>::new());
    let q = ds.split("train").unwrap().queries(0, 3, 0);
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].prompt.as_str(), q[0].negative), ("door", false));
    let q = ds.split("train").unwrap().queries(1, 3, 0);
    assert_eq!(q.iter().map(|q| (q.prompt.as_str(), q.negative)).collect::<Vec<_>>(), [("door", true)]);
    // One split alone: its own prompts are left out.
    let mut s = Split::load(d.path(), "valid").unwrap();
    s.set_generic_negatives(["crack", "Teapot"]);
    assert_eq!(s.generic_negatives, ["teapot"]);
}

/// `training.generic_negatives` in a config: a list of words (numbers read as text), `[]` for
/// none, absent or null for the built-in list; anything else is an error naming the key.
#[test]
fn generic_negatives_config_key() {
    use crate::train_config::TrainConfig;
    let parse =
        |y: &str| TrainConfig::from_yaml_unvalidated(y, Path::new("c.yaml")).map_err(|e| e.to_string());
    let (c, w) = parse("training:\n  generic_negatives: [teapot, violin, 7]\n").unwrap();
    assert_eq!(c.training.generic_negatives, ["teapot", "violin", "7"]);
    assert!(w.iter().all(|m| !m.contains("generic_negatives")), "not an unknown key: {w:?}");
    let (c, _) = parse("training:\n  generic_negatives: []\n").unwrap();
    assert!(c.training.generic_negatives.is_empty());
    for y in ["training:\n  num_negatives: 2\n", "training:\n  generic_negatives: null\n"] {
        let (c, _) = parse(y).unwrap();
        assert_eq!(c.training.generic_negatives, super::coco::GENERIC_NEGATIVES, "{y}");
    }
    let e = parse("training:\n  generic_negatives: {a: 1}\n").unwrap_err();
    assert!(e.contains("training.generic_negatives: expected a list of words"), "{e}");
    let e = parse("training:\n  generic_negatives: [teapot, [x]]\n").unwrap_err();
    assert!(e.contains("training.generic_negatives[1]: expected a word"), "{e}");
}

/// An annotation without a usable bbox (absent, or degenerate) but with a segmentation gets the
/// segmentation's bounds as its box, as pycocotools and Roboflow do, with a warning naming it;
/// without a segmentation that encloses something it is dropped, as before.
#[test]
fn a_missing_bbox_is_derived_from_the_segmentation() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/a.png"), 40, 30);
    png(&d.path().join("train/b.png"), 40, 30);
    let counts = crate::sam3::postprocess::rle_encode(
        &(0..1200)
            .map(|i| (i / 40) >= 10 && (i / 40) < 14 && (i % 40) >= 20 && (i % 40) < 25)
            .collect::<Vec<bool>>(),
        30,
        40,
    )
    .counts;
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [
                {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                {"id": 2, "file_name": "b.png"}
            ],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[5, 5, 15, 5, 15, 12, 5, 12]]},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 0],
                 "segmentation": [[2, 20, 8, 20, 8, 26]]},
                {"id": 3, "image_id": 1, "category_id": 1, "bbox": null,
                 "segmentation": {"size": [30, 40], "counts": counts}},
                // Clipped to the 40 x 30 image the JSON gives.
                {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [[30, 20, 50, 20, 50, 40, 30, 40]]},
                // No size in the JSON: the polygon's own bounds.
                {"id": 5, "image_id": 2, "category_id": 1, "segmentation": [[1.5, 2, 9, 2, 9, 7.5]]},
                // Nothing to take a box from: dropped.
                {"id": 6, "image_id": 1, "category_id": 1, "segmentation": []},
                {"id": 7, "image_id": 1, "category_id": 1},
                {"id": 8, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5, 9, 9]]},
                {"id": 9, "image_id": 1, "category_id": 1, "segmentation": [[50, 50, 60, 50, 60, 60]]},
                {"id": 10, "image_id": 1, "category_id": 1, "segmentation": {"size": [10, 10], "counts": [5, 5, 90]}},
                {"id": 11, "image_id": 1, "category_id": 1, "segmentation": 5}
            ],
            "categories": [{"id": 1, "name": "crack"}]
        }),
    );
    let ds = Dataset::load(d.path()).unwrap();
    let split = ds.split("train").unwrap();
    let dump = split.findings.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n");
    let boxes: Vec<(u64, [f64; 4])> =
        split.images.iter().flat_map(|i| i.objects.iter().map(|o| (o.ann_id, o.bbox_xywh))).collect();
    assert_eq!(
        boxes,
        vec![
            (1, [5.0, 5.0, 10.0, 7.0]),
            (2, [2.0, 20.0, 6.0, 6.0]),
            (3, [20.0, 10.0, 5.0, 4.0]),
            (4, [30.0, 20.0, 10.0, 10.0]),
            (5, [1.5, 2.0, 7.5, 5.5])
        ],
        "{dump}"
    );
    for ann in 1..=5 {
        let f =
            split.findings.iter().find(|f| f.ann_id == Some(ann)).unwrap_or_else(|| panic!("{ann}: {dump}"));
        assert_eq!((f.kind, f.severity), (FindingKind::DerivedBox, Severity::Warning), "{f}");
        assert!(f.to_string().contains(&format!("annotation {ann}: ")), "{f}");
        assert!(f.message.contains("bbox derived from the segmentation"), "{f}");
    }
    for ann in 6..=11 {
        let f =
            split.findings.iter().find(|f| f.ann_id == Some(ann)).unwrap_or_else(|| panic!("{ann}: {dump}"));
        assert_eq!(f.severity, Severity::Error, "{f}");
        assert!(matches!(f.kind, FindingKind::MissingBox), "{f}");
        assert!(f.message.contains("the annotation is dropped"), "{f}");
    }
    // The derived boxes are the training targets; the preflight finds no box/mask disagreement.
    let s = build_sample(split, 0, &opts(40, 40, false)).unwrap();
    let crack = s.queries.iter().find(|q| q.prompt == "crack").unwrap();
    assert_eq!(crack.ann_ids, vec![1, 2, 3, 4]);
    assert_eq!(crack.mask_valid, vec![true; 4]);
    assert_eq!(crack.boxes[0], super::batch::box_to_cxcywh([5.0, 5.0, 10.0, 7.0], 40, 30, false));
    let f = ds.preflight();
    assert!(
        !f.iter().any(|x| x.kind == FindingKind::BoxFormat || x.kind == FindingKind::BoxOutsideImage),
        "{f:?}"
    );
}

/// An annotation that is dropped (no usable box) is still an object in the picture: its
/// category is never drawn as a negative ("absent") prompt for that image, whatever the seed.
/// The same holds for an image listed twice (the other entry's objects) and for a prompt whose
/// every object lies outside the image (left out of the sample, not trained as absent).
#[test]
fn a_dropped_annotation_is_never_a_negative_for_its_image() {
    let d = tempfile::tempdir().unwrap();
    for f in ["a.png", "b.png", "c.png"] {
        png(&d.path().join("train").join(f), 10, 8);
    }
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [
                {"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                {"id": 3, "file_name": "c.png"}, {"id": 4, "file_name": "c.png"}
            ],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
                // A ball without a usable box on image 1 (902 in the tester's dataset).
                {"id": 2, "image_id": 1, "category_id": 2, "segmentation": []},
                {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 2]},
                {"id": 4, "image_id": 2, "category_id": 2, "bbox": [1, 1, 2, 2]},
                {"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]},
                {"id": 6, "image_id": 2, "category_id": 4, "bbox": [20, 20, 2, 2]},
                {"id": 7, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2]},
                {"id": 8, "image_id": 4, "category_id": 4, "bbox": [1, 1, 2, 2]}
            ],
            "categories": [
                {"id": 1, "name": "crack"}, {"id": 2, "name": "ball"}, {"id": 3, "name": "cone"},
                {"id": 4, "name": "brick"}
            ]
        }),
    );
    let split = Split::load(d.path(), "train").unwrap();
    assert_eq!(split.images[0].dropped_categories.iter().copied().collect::<Vec<_>>(), vec![2, 3]);
    let negatives = |i: usize, seed: u64| -> Vec<String> {
        split.queries(i, 30, seed).into_iter().filter(|q| q.negative).map(|q| q.prompt).collect()
    };
    for seed in 0..20 {
        let a = negatives(0, seed);
        assert!(a.contains(&"brick".to_string()), "{a:?}");
        assert!(!a.contains(&"ball".to_string()) && !a.contains(&"cone".to_string()), "{a:?}");
        let b = negatives(1, seed);
        assert!(b.contains(&"crack".to_string()), "{b:?}");
        // c.png is listed twice: a crack (id 3) and a brick (id 4) are both in it.
        for (i, other) in [(2, "brick"), (3, "crack")] {
            let n = negatives(i, seed);
            assert!(!n.contains(&other.to_string()), "{n:?}");
            assert!(n.contains(&"ball".to_string()), "{n:?}");
        }
    }
    // b.png's brick lies entirely outside the 10 x 8 image: the sample has no "brick" prompt
    // at all (not a positive without targets, which trains as absent).
    let s = build_sample(&split, 1, &SampleOptions { num_negatives: 30, ..opts(16, 8, false) }).unwrap();
    assert!(!s.queries.iter().any(|q| q.prompt == "brick"), "{:?}", s.queries);
    assert!(s.queries.iter().all(|q| q.negative || !q.boxes.is_empty()));
    assert!(s.queries.iter().any(|q| q.prompt == "ball" && !q.negative));
}

#[test]
fn negatives_are_seeded_and_absent() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/a.png"), 10, 8);
    png(&d.path().join("train/b.png"), 10, 8);
    let names = ["crack", "stain", "spall", "rust", "joint", "marking", "pothole"];
    let mut anns = vec![serde_json::json!({"id": 0, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2]})];
    for (i, _) in names.iter().enumerate().skip(1) {
        anns.push(serde_json::json!({"id": i, "image_id": 2, "category_id": i, "bbox": [1, 1, 2, 2]}));
    }
    let mut cats: Vec<_> =
        names.iter().enumerate().map(|(i, n)| serde_json::json!({"id": i, "name": n})).collect();
    cats.push(serde_json::json!({"id": 99, "name": "unused"}));
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": anns, "categories": cats
        }),
    );
    let split = Split::load(d.path(), "train").unwrap();
    let neg = |seed| -> Vec<String> {
        split.queries(0, 3, seed).into_iter().filter(|q| q.negative).map(|q| q.prompt).collect()
    };
    assert_eq!(neg(5), neg(5));
    assert_eq!(neg(5).len(), 3);
    for s in 0..20 {
        let n = neg(s);
        assert!(!n.contains(&"crack".to_string()) && !n.contains(&"unused".to_string()), "{n:?}");
    }
    assert!((0..20).any(|s| neg(s) != neg(0)), "different seeds should vary the negatives");
    let q0 = split.queries(0, 3, 5);
    assert_eq!((q0[0].prompt.as_str(), q0[0].negative, q0[0].objects.clone()), ("crack", false, vec![0]));
    // Asking for more negatives than absent categories gives all of them, once, then generic
    // object words.
    let all: Vec<String> =
        split.queries(0, 100, 1).into_iter().filter(|q| q.negative).map(|q| q.prompt).collect();
    assert_eq!(all.len(), 6 + super::coco::GENERIC_NEGATIVES.len());
    assert!(names[1..].iter().all(|n| all[..6].contains(&n.to_string())), "{all:?}");
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), all.len());
    // Image b has every category but one: 1 absent category, then 2 generic words.
    let b: Vec<String> =
        split.queries(1, 3, 1).into_iter().filter(|q| q.negative).map(|q| q.prompt).collect();
    assert_eq!(b.len(), 3);
    assert_eq!(b[0], "crack", "{b:?}");
    assert!(b[1..].iter().all(|w| super::coco::GENERIC_NEGATIVES.contains(&w.as_str())), "{b:?}");
    assert!(split.queries(9, 3, 1).is_empty());
}

#[test]
fn hflip_keeps_boxes_masks_and_pixels_consistent() {
    let d = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { train_images: 3, valid_images: 0, size: 64, ..Default::default() };
    write_synthetic(d.path(), &spec).unwrap();
    let split = Split::load(d.path(), "train").unwrap();
    for i in 0..3 {
        let a = build_sample(&split, i, &opts(64, 64, false)).unwrap();
        let b = build_sample(&split, i, &opts(64, 64, true)).unwrap();
        assert!(b.flipped && !a.flipped);
        let pa = a.pixel_values.flip(&[3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pb = b.pixel_values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(pa, pb);
        assert_eq!(a.queries.len(), b.queries.len());
        for (qa, qb) in a.queries.iter().zip(&b.queries) {
            assert_eq!(qa.prompt, qb.prompt);
            for (ba, bb) in qa.boxes.iter().zip(&qb.boxes) {
                assert!((ba[0] - (1.0 - bb[0])).abs() < 1e-6 && ba[1..] == bb[1..], "{ba:?} {bb:?}");
            }
            for g in 0..qa.boxes.len() {
                let ma = &qa.masks[g * 4096..(g + 1) * 4096];
                let mb = &qb.masks[g * 4096..(g + 1) * 4096];
                for y in 0..64 {
                    for x in 0..64 {
                        assert_eq!(ma[y * 64 + x], mb[y * 64 + 63 - x]);
                    }
                }
                // The flipped box bounds the flipped mask.
                let bx = qb.boxes[g];
                let xs: Vec<usize> = (0..4096).filter(|&k| mb[k]).map(|k| k % 64).collect();
                let (lo, hi) = (*xs.iter().min().unwrap() as f32, *xs.iter().max().unwrap() as f32 + 1.0);
                assert!(((bx[0] - bx[2] / 2.0) * 64.0 - lo).abs() < 1e-3, "{bx:?} {lo}");
                assert!(((bx[0] + bx[2] / 2.0) * 64.0 - hi).abs() < 1e-3, "{bx:?} {hi}");
            }
        }
    }
}

/// A vertical flip mirrors pixels, box centres and masks top to bottom, together; with a
/// horizontal flip too it is a half turn.
#[test]
fn vflip_keeps_boxes_masks_and_pixels_consistent() {
    let d = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { train_images: 3, valid_images: 0, size: 64, ..Default::default() };
    write_synthetic(d.path(), &spec).unwrap();
    let split = Split::load(d.path(), "train").unwrap();
    let pixels = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..3 {
        let a = build_sample(&split, i, &opts(64, 64, false)).unwrap();
        let v = build_sample(&split, i, &SampleOptions { vflip: true, ..opts(64, 64, false) }).unwrap();
        let hv = build_sample(&split, i, &SampleOptions { vflip: true, ..opts(64, 64, true) }).unwrap();
        assert_eq!(pixels(&v.pixel_values), pixels(&a.pixel_values.flip(&[2]).unwrap()));
        assert_eq!(pixels(&hv.pixel_values), pixels(&a.pixel_values.flip(&[2, 3]).unwrap()));
        assert!(a.queries.iter().any(|q| !q.boxes.is_empty()));
        for ((qa, qv), qhv) in a.queries.iter().zip(&v.queries).zip(&hv.queries) {
            for ((ba, bv), bhv) in qa.boxes.iter().zip(&qv.boxes).zip(&qhv.boxes) {
                assert!(
                    (ba[1] - (1.0 - bv[1])).abs() < 1e-6 && ba[0] == bv[0] && ba[2..] == bv[2..],
                    "{ba:?} {bv:?}"
                );
                assert!((ba[0] - (1.0 - bhv[0])).abs() < 1e-6 && (ba[1] - (1.0 - bhv[1])).abs() < 1e-6);
            }
            for g in 0..qa.boxes.len() {
                let ma = &qa.masks[g * 4096..(g + 1) * 4096];
                let mv = &qv.masks[g * 4096..(g + 1) * 4096];
                let mhv = &qhv.masks[g * 4096..(g + 1) * 4096];
                for y in 0..64 {
                    for x in 0..64 {
                        assert_eq!(ma[y * 64 + x], mv[(63 - y) * 64 + x], "vflip mask at ({x}, {y})");
                        assert_eq!(ma[y * 64 + x], mhv[(63 - y) * 64 + 63 - x], "half turn at ({x}, {y})");
                    }
                }
                // The flipped box bounds the flipped mask.
                let bx = qv.boxes[g];
                let ys: Vec<usize> = (0..4096).filter(|&k| mv[k]).map(|k| k / 64).collect();
                let (lo, hi) = (*ys.iter().min().unwrap() as f32, *ys.iter().max().unwrap() as f32 + 1.0);
                assert!(((bx[1] - bx[3] / 2.0) * 64.0 - lo).abs() < 1e-3, "{bx:?} {lo}");
                assert!(((bx[1] + bx[3] / 2.0) * 64.0 - hi).abs() < 1e-3, "{bx:?} {hi}");
            }
        }
    }
}

/// Brightness and contrast change the content's pixels (clamped to the real range), not the
/// padding of a zoom-out, and never the targets.
#[test]
fn brightness_and_contrast_change_pixels_only() {
    let d = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { train_images: 1, valid_images: 0, size: 64, ..Default::default() };
    write_synthetic(d.path(), &spec).unwrap();
    let split = Split::load(d.path(), "train").unwrap();
    let plain = build_sample(&split, 0, &opts(32, 16, false)).unwrap();
    let jitter = SampleOptions { contrast: 1.1, brightness: -0.1, scale: 0.5, ..opts(32, 16, false) };
    let j = build_sample(&split, 0, &jitter).unwrap();
    let zoomed = build_sample(&split, 0, &SampleOptions { scale: 0.5, ..opts(32, 16, false) }).unwrap();
    let z = zoomed.pixel_values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let jv = j.pixel_values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut changed = 0;
    for (k, (a, b)) in z.iter().zip(&jv).enumerate() {
        let (y, x) = ((k / 32) % 32, k % 32);
        if y >= 16 || x >= 16 {
            assert_eq!(*b, 0.0, "padding changed at {k}");
        } else {
            assert!((b - (a * 1.1 - 0.1).clamp(-1.0, 1.0)).abs() < 1e-6, "pixel {k}: {a} -> {b}");
            changed += usize::from(a != b);
        }
    }
    assert!(changed > 100, "{changed}");
    assert!(jv.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(zoomed.queries, j.queries);
    assert_eq!(plain.queries.len(), j.queries.len());
    for bad in [
        SampleOptions { contrast: 0.0, ..opts(32, 16, false) },
        SampleOptions { brightness: f32::NAN, ..opts(32, 16, false) },
    ] {
        assert!(build_sample(&split, 0, &bad).is_err());
    }
}

#[test]
fn collate_stacks_batch() {
    let d = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { train_images: 2, valid_images: 0, size: 48, ..Default::default() };
    write_synthetic(d.path(), &spec).unwrap();
    let split = Split::load(d.path(), "train").unwrap();
    let samples: Vec<_> = (0..2).map(|i| build_sample(&split, i, &opts(32, 16, i == 1)).unwrap()).collect();
    let batch = collate(&samples, 16, &Device::Cpu).unwrap();
    assert_eq!(batch.pixel_values.dims(), &[2, 3, 32, 32]);
    let n: usize = samples.iter().map(|s| s.queries.len()).sum();
    assert_eq!(batch.queries.len(), n);
    for (i, q) in batch.queries.iter().enumerate() {
        let g = q.boxes.len();
        assert_eq!(batch.boxes[i].dims(), &[g, 4]);
        assert_eq!(batch.masks[i].dims(), &[g, 16, 16]);
        if q.negative {
            assert_eq!(g, 0);
        }
    }
    assert_eq!(batch.queries.last().unwrap().image_index, 1);
    assert!(collate(&samples, 8, &Device::Cpu).is_err());
    assert!(collate(&[], 16, &Device::Cpu).is_err());
}

#[test]
fn zoom_out_shrinks_pixels_boxes_and_masks_into_the_top_left() {
    let d = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { train_images: 2, valid_images: 0, size: 64, ..Default::default() };
    write_synthetic(d.path(), &spec).unwrap();
    let split = Split::load(d.path(), "train").unwrap();
    for i in 0..2 {
        let full = build_sample(&split, i, &opts(64, 64, false)).unwrap();
        let zoom = build_sample(&split, i, &SampleOptions { scale: 0.5, ..opts(64, 64, false) }).unwrap();
        // The content is the image at 32 px in the corner; the rest is padding (0).
        let direct = crate::imageio::to_pixel_values(
            &crate::imageio::load_rgb(&split.images[i].path).unwrap(),
            32,
            &Device::Cpu,
        )
        .unwrap();
        let corner = zoom.pixel_values.narrow(2, 0, 32).unwrap().narrow(3, 0, 32).unwrap();
        let diff = (corner - direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        let pad = zoom
            .pixel_values
            .narrow(3, 32, 32)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(pad, 0.0);
        for (qf, qz) in full.queries.iter().zip(&zoom.queries) {
            for (bf, bz) in qf.boxes.iter().zip(&qz.boxes) {
                for c in 0..4 {
                    assert!((bf[c] * 0.5 - bz[c]).abs() < 1e-6, "{bf:?} {bz:?}");
                }
            }
            for g in 0..qz.boxes.len() {
                let mz = &qz.masks[g * 4096..(g + 1) * 4096];
                assert!((0..4096).all(|k| !mz[k] || (k % 64 < 32 && k / 64 < 32)), "mask outside the corner");
                assert!(mz.iter().any(|&v| v), "mask lost");
            }
        }
    }
    assert!(build_sample(&split, 0, &SampleOptions { scale: 0.0, ..opts(64, 64, false) }).is_err());
}

/// Files as real exporters write them (probe of Roboflow/CVAT/pandas/FiftyOne outputs): what is
/// harmless loads, what is ambiguous is left out and named, nothing is silently misassigned.
#[test]
fn real_world_coco_variants() {
    let d = tempfile::tempdir().unwrap();
    for name in ["a.png", "b.png", "c.png", "images/d.png", "Case.PNG"] {
        png(&d.path().join("train").join(name), 40, 30);
    }
    // A 2-point fragment next to a real polygon; a flat polygon; pandas floats and strings as
    // ids; an annotation without id; an xyxy box; a normalized box.
    let square = serde_json::json!([[10, 10, 20, 10, 20, 20, 10, 20], [30, 5, 31, 6]]);
    let text = serde_json::json!({
        "images": [
            {"id": 1.0, "file_name": "a.png", "width": 40.0, "height": "30"},
            {"id": "2", "file_name": "b.png", "width": 0, "height": 0},
            {"id": 3, "file_name": "c.png"},
            {"id": 3, "file_name": "other.png"},
            {"id": 4, "file_name": "images/missing.png"},
            {"id": 5, "file_name": "case.png"},
            {"id": "x7", "file_name": "d.png"}
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "segmentation": square},
            {"id": 11.0, "image_id": "1", "category_id": 2, "bbox": [10, 10, 10, 10],
             "segmentation": [10, 10, 20, 10, 20, 20, 10, 20]},
            {"image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": square},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [0.25, 0.3, 0.2, 0.3], "segmentation": square},
            {"id": 14, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": []},
            {"id": 15, "image_id": 2, "category_id": 1, "bbox": ["1", 2, 3], "segmentation": []}
        ],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "stain"}, {"id": 2, "name": "rust"}]
    });
    // With a UTF-8 byte-order mark, as Notepad writes it.
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(serde_json::to_vec(&text).unwrap());
    std::fs::write(d.path().join("train").join(super::coco::ANNOTATION_FILE), bytes).unwrap();
    // A broken test/ split: not needed for training.
    std::fs::create_dir_all(d.path().join("test")).unwrap();
    std::fs::write(d.path().join("test").join(super::coco::ANNOTATION_FILE), b"{\"images\": [").unwrap();

    let ds = Dataset::load(d.path()).unwrap();
    assert_eq!(ds.skipped.len(), 1);
    assert_eq!(ds.skipped[0].kind, FindingKind::UnusedSplit);
    let split = ds.split("train").unwrap();
    let f = ds.preflight_of(&["train", "valid"]);
    assert!(f.iter().all(|x| x.split == "train"));
    let dump = f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n");
    let find =
        |kind: FindingKind, text: &str| f.iter().any(|x| x.kind == kind && x.to_string().contains(text));

    // Ids: floats and digit strings are ids; "x7" is not (named); id 3 is ambiguous, so both
    // images and annotation 14 are left out.
    let ids: Vec<u64> = split.images.iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![1, 2, 4, 5], "{dump}");
    assert!(find(FindingKind::UnknownImage, "\"x7\""), "{dump}");
    assert!(find(FindingKind::DuplicateId, "c.png, other.png"), "{dump}");
    assert!(find(FindingKind::DuplicateId, "1 annotations with the duplicated image_id 3"), "{dump}");
    assert_eq!(split.images[0].json_size, Some((40, 30)));
    assert_eq!(split.images[1].json_size, None, "0 x 0 is no size");
    // The later category 2 wins everywhere: its name is the prompt, the earlier one is gone.
    assert_eq!(split.category(2).unwrap().name, "rust");
    assert!(split.categories.iter().all(|c| c.name != "stain"));
    assert!(find(FindingKind::DuplicateId, "the later one (\"rust\") is used"), "{dump}");
    let prompts: Vec<String> = split.queries(0, 5, 1).into_iter().take(2).map(|q| q.prompt).collect();
    assert_eq!(prompts, vec!["crack", "rust"], "the dataset's prompts (generic words follow)");
    // Objects: 10 (fragment ignored), 11 (flat polygon, read as one), the id-less one (named by
    // its position 2), 13; 15's bbox is named as JSON.
    let objs: Vec<u64> = split.images.iter().flat_map(|i| i.objects.iter().map(|o| o.ann_id)).collect();
    assert_eq!(objs, vec![10, 11, 2, 13], "{dump}");
    assert!(find(FindingKind::UndecodableMask, "flat polygon"), "{dump}");
    assert!(find(FindingKind::MissingBox, "got [\"1\",2,3]"), "{dump}");
    let m10 = split.images[0].objects[0].segmentation.as_ref().unwrap().decode(30, 40).unwrap();
    assert_eq!(m10.iter().filter(|b| **b).count(), 100);
    // Box formats (F5): the id-less box is [x0, y0, x1, y1] of its mask; 13 is normalized.
    assert!(
        find(FindingKind::BoxFormat, "annotation 2: bbox [10.0, 10.0, 20.0, 20.0] matches its mask"),
        "{dump}"
    );
    assert!(
        find(FindingKind::BoxFormat, "annotation 13: bbox [0.25, 0.3, 0.2, 0.3] looks normalized"),
        "{dump}"
    );
    assert!(!f.iter().any(|x| x.kind == FindingKind::BoxFormat && x.ann_id == Some(10)), "{dump}");
    // Missing files: in a subfolder (named, split known), and a case mismatch with the hint.
    assert!(find(FindingKind::MissingImage, "images/missing.png"), "{dump}");
    assert!(find(FindingKind::MissingImage, "a file named Case.PNG exists"), "{dump}");

    // The top level as a list, NaN, and no categories: named, once.
    write_json(d.path(), "train", serde_json::json!([{"images": []}]));
    let e = Dataset::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("not a list"), "{e}");
    std::fs::write(
        d.path().join("train").join(super::coco::ANNOTATION_FILE),
        br#"{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [NaN, 1, 2, 2]}]}"#,
    )
    .unwrap();
    let e = Dataset::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("NaN or Infinity"), "{e}");
    let anns: Vec<serde_json::Value> = (0..50)
        .map(|i| serde_json::json!({"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}))
        .collect();
    write_json(
        d.path(),
        "train",
        serde_json::json!({"images": [{"id": 1, "file_name": "a.png"}], "annotations": anns}),
    );
    let s = Split::load(d.path(), "train").unwrap();
    assert_eq!(s.findings.iter().filter(|x| x.kind == FindingKind::UnknownCategory).count(), 1);
    assert!(s.findings[0].message.contains("no categories") && s.findings[0].message.contains("50"));
}

#[test]
fn truncated_and_empty_images_are_corrupt() {
    let d = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 7]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&image::DynamicImage::ImageRgb8(img))
        .unwrap();
    let dir = d.path().join("train");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("whole.jpg"), &jpeg).unwrap();
    std::fs::write(dir.join("half.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    let e = crate::imageio::load_rgb(&dir.join("half.jpg")).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("half.jpg"), "{e}");
    let e = crate::imageio::load_rgb(&dir.join("empty.jpg")).unwrap_err().to_string();
    assert!(e.contains("empty") && !e.contains('\n'), "{e}");
    assert_eq!(crate::imageio::load_rgb(&dir.join("whole.jpg")).unwrap().dimensions(), (64, 64));
}

#[test]
fn segmentation_extent_from_geometry() {
    let poly = Segmentation::Polygons(vec![
        vec![1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0],
        vec![30.0, 5.0, 31.0, 6.0],
    ]);
    assert_eq!(poly.extent(4, 4), Some([1.0, 1.0, 3.0, 3.0]), "the 2-point fragment adds nothing");
    let clipped = Segmentation::Polygons(vec![vec![-5.0, 1.0, 9.0, 1.0, 9.0, 3.0]]);
    assert_eq!(clipped.extent(4, 4), Some([0.0, 1.0, 4.0, 3.0]));
    // Column-major runs of a 6 (h) x 5 (w) mask: pixels 7 and 8 are column 1, rows 1 and 2.
    let rle = Segmentation::Rle { h: 6, w: 5, counts: vec![7, 2, 21] };
    assert_eq!(rle.extent(6, 5), Some([1.0, 1.0, 2.0, 3.0]));
    let m = rle.decode(6, 5).unwrap();
    assert!(m[5 + 1] && m[2 * 5 + 1], "row-major (x 1, y 1) and (x 1, y 2)");
    // A run crossing into the next column spans all rows.
    let rle = Segmentation::Rle { h: 6, w: 5, counts: vec![4, 4, 22] };
    assert_eq!(rle.extent(6, 5), Some([0.0, 0.0, 2.0, 6.0]));
    assert_eq!(Segmentation::Rle { h: 6, w: 5, counts: vec![30] }.extent(6, 5), None);
}

/// A PNG whose header declares 100000x100000 pixels over a few bytes of data (it used to abort
/// `doctor` and `train` with "memory allocation failed"): a corrupt image like any other,
/// named with its declared size, skipped; the other images are checked.
#[test]
fn an_image_declaring_a_huge_size_is_a_named_corrupt_image() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("train");
    png(&dir.join("ok.png"), 10, 8);
    let empty_zlib = [0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    std::fs::write(
        dir.join("bomb.png"),
        crate::imageio::tests::png_with_header(100_000, 100_000, &empty_zlib),
    )
    .unwrap();
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [
                {"id": 1, "file_name": "ok.png", "width": 10, "height": 8},
                {"id": 2, "file_name": "bomb.png", "width": 100000, "height": 100000}
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
                {"id": 11, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]}
            ],
            "categories": [{"id": 1, "name": "crack"}]
        }),
    );
    let ds = Dataset::load(d.path()).unwrap();
    let f = ds.preflight();
    let dump = f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n");
    let bomb: Vec<_> = f.iter().filter(|x| x.image_id == Some(2)).collect();
    assert_eq!(bomb.len(), 1, "{dump}");
    assert_eq!((bomb[0].kind, bomb[0].severity), (FindingKind::CorruptImage, Severity::Error), "{dump}");
    assert_eq!(bomb[0].file, dir.join("bomb.png"));
    let m = &bomb[0].message;
    assert!(m.contains("100000x100000") && m.contains("downscale") && m.contains("skipped"), "{m}");
    assert!(!f.iter().any(|x| x.image_id == Some(1) && x.severity == Severity::Error), "{dump}");
    // Training's sample builder refuses it the same way.
    let split = ds.split("train").unwrap();
    let e = build_sample(split, 1, &opts(8, 6, false)).unwrap_err().to_string();
    assert!(e.contains("bomb.png") && e.contains("100000x100000"), "{e}");
    assert!(build_sample(split, 0, &opts(8, 6, false)).is_ok());
}

/// The "names are case-sensitive" hint only when a file differing in case exists; a path that
/// is a directory says so; an unreadable file keeps the OS error.
#[test]
fn missing_image_hints_name_the_real_problem() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("train");
    png(&dir.join("Other.PNG"), 10, 8);
    std::fs::create_dir_all(dir.join("folder.png")).unwrap();
    png(&dir.join("locked.png"), 10, 8);
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [
                {"id": 1, "file_name": "folder.png"},
                {"id": 2, "file_name": "other.png"},
                {"id": 3, "file_name": "locked.png"}
            ],
            "annotations": [],
            "categories": [{"id": 1, "name": "crack"}]
        }),
    );
    let ds = Dataset::load(d.path()).unwrap();
    let f = ds.preflight();
    let dump = f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n");
    let of = |id: u64| {
        f.iter()
            .find(|x| x.image_id == Some(id) && x.kind == FindingKind::MissingImage)
            .map(|x| x.message.clone())
    };
    let m = of(1).unwrap_or_else(|| panic!("{dump}"));
    assert!(m.contains("is a directory, not an image file"), "{m}");
    assert!(!m.contains("case-sensitive") && !m.contains("os error"), "{m}");
    let m = of(2).unwrap_or_else(|| panic!("{dump}"));
    assert!(m.contains("a file named Other.PNG exists"), "{m}");
    // The file itself, whatever kept it from being read, is no near miss (only another case is).
    assert_eq!(super::coco::near_miss(&dir, "locked.png"), "");
    assert_eq!(super::coco::near_miss(&dir, "folder.png"), "");
    assert!(super::coco::near_miss(&dir, "LOCKED.png").contains("a file named locked.png exists"));
    // An unreadable file (only testable without root, who reads anything).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.join("locked.png");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&locked).is_err() {
            let f = ds.preflight();
            let m = f
                .iter()
                .find(|x| x.image_id == Some(3) && x.kind == FindingKind::MissingImage)
                .map(|x| x.message.clone())
                .unwrap();
            assert!(m.contains("ermission denied") && !m.contains("case-sensitive"), "{m}");
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// Image sizes in the JSON that are no sizes (negative, absurd, fractional, text) are warned
/// about per image, naming the file and id, and ignored (0 still means "unknown", silently);
/// polygon points far outside the image are warned about per annotation.
#[test]
fn implausible_sizes_and_far_away_polygons_are_warned() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("train");
    for name in ["a.png", "b.png", "c.png", "d.png", "e.png"] {
        png(&dir.join(name), 40, 30);
    }
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [
                {"id": 1, "file_name": "a.png", "width": -112, "height": 30},
                {"id": 2, "file_name": "b.png", "width": 40, "height": 1e12},
                {"id": 3, "file_name": "c.png", "width": 40.5, "height": "big"},
                {"id": 4, "file_name": "d.png", "width": 0, "height": 0},
                {"id": 5, "file_name": "e.png", "width": 40, "height": 30}
            ],
            "annotations": [
                {"id": 50, "image_id": 5, "category_id": 1, "bbox": [1, 1, 10, 10],
                 "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]},
                {"id": 51, "image_id": 5, "category_id": 1, "bbox": [1, 1, 10, 10],
                 "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11], [1, 1, 4000, 1, 1, 11]]},
                {"id": 52, "image_id": 5, "category_id": 1, "bbox": [1, 1, 10, 10],
                 "segmentation": [[1, 1, 11, 1, 11, -350, 1, 11]]}
            ],
            "categories": [{"id": 1, "name": "crack"}]
        }),
    );
    let ds = Dataset::load(d.path()).unwrap();
    let split = ds.split("train").unwrap();
    let json = dir.join(super::coco::ANNOTATION_FILE);
    let size_warning = |id: u64| {
        split
            .findings
            .iter()
            .find(|x| x.kind == FindingKind::SizeMismatch && x.image_id == Some(id))
            .map(|x| (x.severity, x.file.clone(), x.message.clone()))
    };
    for (id, file, text) in [
        (1, "a.png", "width -112"),
        (2, "b.png", "height 1000000000000"),
        (3, "c.png", "width 40.5 and height \"big\""),
    ] {
        let (severity, f, m) = size_warning(id).unwrap_or_else(|| panic!("image {id}: {:?}", split.findings));
        assert_eq!((severity, f), (Severity::Warning, json.clone()));
        assert!(m.contains(file) && m.contains(text) && m.contains("ignored"), "{m}");
        assert_eq!(split.images[id as usize - 1].json_size, None);
    }
    assert_eq!(size_warning(4), None, "0 means unknown");
    assert_eq!(size_warning(5), None);
    let f = ds.preflight();
    let dump = f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("\n");
    let far = |ann: u64| {
        f.iter()
            .find(|x| x.kind == FindingKind::PolygonOutsideImage && x.ann_id == Some(ann))
            .map(|x| x.to_string())
    };
    assert_eq!(far(50), None, "{dump}");
    let m = far(51).unwrap_or_else(|| panic!("{dump}"));
    assert!(m.starts_with("warning") && m.contains("polygon 1 has the point (4000, 1)"), "{m}");
    assert!(m.contains("image 5 annotation 51") && m.contains("40x30"), "{m}");
    let m = far(52).unwrap_or_else(|| panic!("{dump}"));
    assert!(m.contains("polygon 0 has the point (11, -350)"), "{m}");
}

/// An annotation "file" that is a folder is named as such, not as missing.
#[test]
fn an_annotation_path_that_is_a_folder_is_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("train").join(super::coco::ANNOTATION_FILE)).unwrap();
    let e = Split::load(d.path(), "train").unwrap_err().to_string();
    assert!(e.contains("a folder where the split's COCO JSON file belongs"), "{e}");
    // In valid/ too (not "no valid split"); in test/, the split is left out with the reason.
    let d = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { seed: 1, train_images: 2, valid_images: 0, size: 32, max_cracks: 1 };
    write_synthetic(d.path(), &spec).unwrap();
    std::fs::create_dir_all(d.path().join("test").join(super::coco::ANNOTATION_FILE)).unwrap();
    let ds = Dataset::load(d.path()).unwrap();
    assert!(
        ds.skipped[0].message.contains("a folder where the split's COCO JSON file belongs"),
        "{:?}",
        ds.skipped
    );
    std::fs::create_dir_all(d.path().join("valid").join(super::coco::ANNOTATION_FILE)).unwrap();
    let e = Dataset::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("valid/_annotations.coco.json") && e.contains("a folder where"), "{e}");
}

/// An all-negative test split (clean images, the dataset's category listed but annotated
/// nowhere there): the trained category is still asked on its images as a negative, so its
/// false detections are measured; a category the training split does not annotate is not.
#[test]
fn an_all_negative_split_is_asked_for_the_trained_categories() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("train/a.png"), 8, 8);
    png(&d.path().join("test/clean.png"), 8, 8);
    let cats = serde_json::json!([{"id": 1, "name": "crack"}, {"id": 2, "name": "spall"}]);
    write_json(
        d.path(),
        "train",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                             "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]], "iscrowd": 0}],
            "categories": cats,
        }),
    );
    write_json(
        d.path(),
        "test",
        serde_json::json!({
            "images": [{"id": 1, "file_name": "clean.png", "width": 8, "height": 8}],
            "annotations": [],
            "categories": cats,
        }),
    );
    let ds = Dataset::load(d.path()).unwrap().with_generic_negatives(Vec::<String>::new());
    let test = ds.split("test").unwrap();
    let q = test.queries(0, 3, 0);
    assert_eq!(q.iter().map(|q| (q.prompt.as_str(), q.negative)).collect::<Vec<_>>(), [("crack", true)]);
    let unused: Vec<&str> = test
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::UnusedCategory)
        .map(|f| f.message.as_str())
        .collect();
    assert!(unused.len() == 1 && unused[0].contains("spall"), "{unused:?}");
}
