//! `lorahost predict` end to end on a tiny random model: an image and a text prompt in,
//! detections.json (boxes in pixels, scores, RLE masks at image resolution) and an overlay out.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorahost::sam3::config::Sam3Config;
use lorahost::sam3::model::Sam3Model;
use lorahost::sam3::postprocess::{rle_decode, Rle};
use std::path::Path;
use std::process::Command;

/// A model directory with tiny_a's architecture, random weights, the test tokenizer's vocabulary.
fn tiny_model_dir(dir: &Path) {
    tiny_model_dir_with(dir, |_| {})
}

/// As [`tiny_model_dir`], with `tweak` applied to config.json after the vocabulary is set.
fn tiny_model_dir_with(dir: &Path, tweak: impl Fn(&mut serde_json::Value)) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("sam3/tiny_a/config.json")).unwrap())
            .unwrap();
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("tokenizer/tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap().len()
        + tok["added_tokens"].as_array().map(|a| a.len()).unwrap_or(0);
    cfg["text_config"]["vocab_size"] = serde_json::json!(vocab);
    tweak(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixtures.join("tokenizer/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let (config, _) = Sam3Config::from_file(&dir.join("config.json")).unwrap();
    let varmap = VarMap::new();
    Sam3Model::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &config).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        // Seeded by the name: every run of a test sees the same model (a random one per run
        // made outcomes such as "the second prompt wins some pixel" hold only sometimes).
        let seed =
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let mut rng = lorahost::data::SplitMix64::from_parts(&[seed, 1]);
        let normal: Vec<f32> = (0..t.elem_count())
            .map(|_| {
                let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        let r = Tensor::from_vec(normal, t.shape(), &Device::Cpu).unwrap();
        let fan_in = t.dims().iter().skip(1).product::<usize>().max(1) as f64;
        let v = if name.contains("norm") && name.ends_with("weight") {
            (r * 0.1).unwrap() + 1.0
        } else {
            r * (1.0 / fan_in.sqrt())
        };
        var.set(&v.unwrap()).unwrap();
    }
    varmap.save(dir.join("model.safetensors")).unwrap();
}

#[test]
fn predict_writes_detections_and_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir(&model);
    // A 90x60 image with a dark diagonal stroke on a light background.
    let img = image::RgbImage::from_fn(90, 60, |x, y| {
        if (x as i32 - (y as i32) * 3 / 2).abs() < 3 {
            image::Rgb([30, 30, 30])
        } else {
            image::Rgb([200, 190, 180])
        }
    });
    let img_path = tmp.path().join("road.png");
    img.save(&img_path).unwrap();
    let out = tmp.path().join("pred");
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&img_path)
        .args(["--prompt", "Crack", "--threshold", "0", "--nms-iou", "1.0", "--box", "10,5,50,40", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("detections.json")).unwrap()).unwrap();
    assert_eq!((json["width"].as_u64(), json["height"].as_u64()), (Some(90), Some(60)));
    assert_eq!(json["prompt"], "Crack");
    let dets = json["detections"].as_array().unwrap();
    // Threshold 0 and no suppression: every query is reported, best first.
    assert_eq!(dets.len(), 8);
    let scores: Vec<f64> = dets.iter().map(|d| d["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    for d in dets {
        let b: Vec<f64> = d["bbox_xyxy"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(b[0] >= 0.0 && b[2] <= 90.0 && b[1] >= 0.0 && b[3] <= 60.0, "{b:?}");
        // `bbox` is COCO's [x, y, w, h] of the same box.
        let c: Vec<f64> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let xywh = [b[0], b[1], b[2] - b[0], b[3] - b[1]];
        assert!(c.iter().zip(xywh).all(|(p, q)| (p - q).abs() < 1e-3), "{c:?} vs {b:?}");
        // COCO compressed RLE (pycocotools' `mask.encode` string form).
        let rle = Rle::from_compressed([60, 90], d["segmentation"]["counts"].as_str().unwrap()).unwrap();
        assert_eq!(d["segmentation"]["size"], serde_json::json!([60, 90]));
        let area = rle_decode(&rle).iter().filter(|b| **b).count() as u64;
        assert_eq!(area, d["area"].as_u64().unwrap());
    }
    // mask.png: 255 exactly where some detection's mask is.
    let mut union = vec![false; 90 * 60];
    for d in dets {
        let rle = Rle::from_compressed([60, 90], d["segmentation"]["counts"].as_str().unwrap()).unwrap();
        union.iter_mut().zip(rle_decode(&rle)).for_each(|(u, v)| *u |= v);
    }
    let mask = image::open(out.join("mask.png")).unwrap().to_luma8();
    assert_eq!((mask.width(), mask.height()), (90, 60));
    let want: Vec<u8> = union.iter().map(|&v| if v { 255 } else { 0 }).collect();
    assert_eq!(mask.as_raw(), &want);
    let overlay = image::open(out.join("overlay.png")).unwrap().to_rgb8();
    assert_eq!((overlay.width(), overlay.height()), (90, 60));
    // The --box prompt is drawn (dashed white and black) on top.
    let edge: Vec<[u8; 3]> = (10..=50).map(|x| overlay.get_pixel(x, 5).0).collect();
    assert!(edge.iter().all(|p| *p == [255, 255, 255] || *p == [0, 0, 0]), "{edge:?}");
    // The console labels boxes as the JSON's `bbox_xyxy`.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("8 detection(s) for \"Crack\"") && stdout.contains("  score "), "{stdout}");
    assert!(stdout.contains(" xyxy [") && !stdout.contains(" box ["), "{stdout}");
    // Nothing above the threshold: the best score is said, with a lower --threshold to try.
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&img_path)
        .args(["--prompt", "Crack", "--box", "10,5,50,40", "--threshold", "1", "--out"])
        .arg(tmp.path().join("none"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let best = scores[0];
    assert!(
        stdout.contains("0 detection(s) for \"Crack\" above --threshold 1")
            && stdout.contains(&format!("best score {best:.3}"))
            && (stdout.contains("lower it to see more, e.g. --threshold 0.") || best < 0.01),
        "{stdout}"
    );
    let none: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("none/detections.json")).unwrap())
            .unwrap();
    assert!((none["best_score"].as_f64().unwrap() - best).abs() < 1e-6, "{none:#}");

    // Bad input: a corrupt image is named.
    let bad = tmp.path().join("broken.jpg");
    std::fs::write(&bad, b"no jpeg here").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&bad)
        .args(["--prompt", "crack", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("broken.jpg") && !err.contains("panicked"), "{err}");
}

fn predict_err(model: &Path, tmp: &Path) -> String {
    let img_path = tmp.join("img.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([120, 100, 90])).save(&img_path).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["predict", "--model"])
        .arg(model)
        .arg("--image")
        .arg(&img_path)
        .args(["--prompt", "crack", "--out"])
        .arg(tmp.join("pred"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A tokenizer with more tokens than the text model's embedding table is named as foreign
/// (instead of candle's index error from the embedding lookup).
#[test]
fn predict_refuses_a_tokenizer_larger_than_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir_with(&model, |c| c["text_config"]["vocab_size"] = serde_json::json!(128));
    let e = predict_err(&model, tmp.path());
    assert!(
        e.contains("tokenizer.json has 528 tokens but the model's text vocab_size is 128")
            && e.contains("does not belong to this model"),
        "{e}"
    );
}

/// predict feeds RGB: a model with another channel count is refused by its config key.
#[test]
fn predict_refuses_a_non_rgb_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir_with(&model, |c| {
        c["vision_config"]["backbone_config"]["num_channels"] = serde_json::json!(1)
    });
    let e = predict_err(&model, tmp.path());
    assert!(e.contains("num_channels is 1") && e.contains("RGB"), "{e}");
}

/// `predict --adapter DIR` applies trained adapters without a training config (rank, alpha and
/// modules from the PEFT folder): its scores equal those of the model with the same adapters
/// merged into its weights (`export --merge`'s path), and differ from the base model's. An
/// adapter for modules the model lacks is refused by file.
#[test]
fn predict_applies_an_adapter_as_merging_it_would() {
    use lorahost::lora::{Component, LoraConfig, LoraSet};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir(&model);
    let mut m = Sam3Model::load_dir(&model, &Device::Cpu, DType::F32).unwrap();
    let cfg = LoraConfig {
        rank: 2,
        alpha: 6.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "fc1".into(), "fc2".into()],
        components: vec![Component::Vision, Component::Text, Component::DetrEncoder, Component::DetrDecoder],
        use_rslora: false,
    };
    let lora = LoraSet::attach(&mut m, &cfg, &Device::Cpu).unwrap();
    for v in lora.vars().values() {
        v.set(&(Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap() * 0.5).unwrap()).unwrap();
    }
    let adapter = tmp.path().join("best");
    lora.save_peft(&adapter, &model.display().to_string()).unwrap();
    let merged = tmp.path().join("merged");
    lorahost::export::write_merged(&model, &lora, &merged).unwrap();

    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 120]));
    let img_path = tmp.path().join("img.png");
    img.save(&img_path).unwrap();
    let run = |model_dir: &Path, adapter: Option<&Path>, out: &str| -> serde_json::Value {
        let opts = lorahost::inference::PredictOptions {
            model_dir: model_dir.to_path_buf(),
            adapter: adapter.map(Path::to_path_buf),
            image: img_path.clone(),
            prompts: vec!["crack".into()],
            boxes: Vec::new(),
            out: tmp.path().join(out),
            threshold: 0.0,
            nms_iou: 1.0,
            device: lorahost::inference::DeviceArg::Cpu,
            dtype: lorahost::inference::DTypeArg::F32,
            tile: None,
        };
        lorahost::inference::predict(&opts).unwrap();
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(out).join("detections.json")).unwrap())
            .unwrap()
    };
    let scores = |j: &serde_json::Value| -> Vec<f64> {
        let mut s: Vec<f64> =
            j["detections"].as_array().unwrap().iter().map(|d| d["score"].as_f64().unwrap()).collect();
        s.insert(0, j["presence_score"].as_f64().unwrap());
        s
    };
    let base = scores(&run(&model, None, "base"));
    let adapted = scores(&run(&model, Some(&adapter), "adapted"));
    let folded = scores(&run(&merged, None, "folded"));
    assert_eq!(adapted.len(), folded.len());
    for (a, f) in adapted.iter().zip(&folded) {
        assert!((a - f).abs() < 1e-4, "adapter {adapted:?} vs merged {folded:?}");
    }
    let moved = adapted.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(moved > 1e-3, "the adapter changed nothing: {adapted:?} vs {base:?}");

    // An adapter whose modules this model does not have.
    let mut t =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (k, v) =
        t.iter().find(|(k, _)| k.contains("layers.0.")).map(|(k, v)| (k.clone(), v.clone())).unwrap();
    t.insert(k.replace("layers.0", "layers.77"), v);
    candle_core::safetensors::save(&t, adapter.join("adapter_model.safetensors")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--image")
        .arg(&img_path)
        .args(["--prompt", "crack", "--out"])
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("layers.77") && err.contains("adapter_model.safetensors") && !err.contains("panicked"),
        "{err}"
    );
}

/// `predict --image FOLDER` (and repeated --image): the model loads once, each image gets its
/// own folder with the same detections a single-image run writes, summary.json lists them, a
/// corrupt image is reported and the others still run (exit non-zero), --box is refused.
#[test]
fn predict_on_a_folder_writes_one_folder_per_image_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir(&model);
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for (i, name) in ["a.png", "b.jpg", "c.PNG"].iter().enumerate() {
        let img = image::RgbImage::from_fn(40 + 10 * i as u32, 30, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7 + i as u32 * 40) as u8, 90])
        });
        img.save(imgs.join(name)).unwrap();
    }
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let predict = |image_args: &[&Path], out: &Path| {
        let mut c = Command::new(bin);
        c.args(["predict", "--model"]).arg(&model);
        for a in image_args {
            c.arg("--image").arg(a);
        }
        c.args(["--prompt", "crack", "--threshold", "0", "--out"]).arg(out).output().unwrap()
    };
    let out = tmp.path().join("many");
    let o = predict(&[&imgs], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let listed: Vec<&str> =
        summary["images"].as_array().unwrap().iter().map(|i| i["image"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 3, "{summary:#}");
    // Each folder holds what a single-image run writes for that image.
    let single = tmp.path().join("single");
    let o = predict(&[&imgs.join("b.jpg")], &single);
    assert!(o.status.success());
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("detections.json")).unwrap()).unwrap()
    };
    assert_eq!(read(&out.join("b.jpg"))["detections"], read(&single)["detections"]);
    assert!(out.join("c.PNG/overlay.png").is_file() && out.join("a.png/overlay.png").is_file());
    // A corrupt image among them: named, the others are written, exit status non-zero.
    std::fs::write(imgs.join("d.jpg"), b"broken").unwrap();
    let out2 = tmp.path().join("many2");
    let o = predict(&[&imgs], &out2);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("d.jpg") && err.contains("1 of 4") && !err.contains("panicked"), "{err}");
    assert!(out2.join("c.PNG/detections.json").is_file());
    // Two --image with the same file name from different folders get distinct folders.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(imgs.join("a.png"), other.join("a.png")).unwrap();
    let out3 = tmp.path().join("many3");
    let o = predict(&[&imgs.join("a.png"), &other.join("a.png")], &out3);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out3.join("a.png/detections.json").is_file() && out3.join("a.png-2/detections.json").is_file());
    // A box prompt belongs to one image.
    let o = Command::new(bin)
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&imgs)
        .args(["--prompt", "crack", "--box", "1,1,5,5", "--out"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--box"));
}

/// Several `--prompt`s: the image is encoded once and detections.json holds one entry per
/// prompt, each with what a single-prompt run finds (with boxes too); the single-prompt layout
/// is unchanged; summary.json of several images lists each prompt's count; an empty prompt
/// among them is refused.
#[test]
fn several_prompts_give_one_entry_each_as_single_runs_would() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir(&model);
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 120]));
    let img_path = tmp.path().join("img.png");
    img.save(&img_path).unwrap();
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let predict = |prompts: &[&str], extra: &[&str], out: &str| {
        let mut c = Command::new(bin);
        c.args(["predict", "--model"]).arg(&model).arg("--image").arg(&img_path);
        for p in prompts {
            c.args(["--prompt", p]);
        }
        let o = c
            .args(["--threshold", "0", "--nms-iou", "0.9"])
            .args(extra)
            .arg("--out")
            .arg(tmp.path().join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(out).join("detections.json")).unwrap(),
        )
        .unwrap();
        (j, String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let same = |a: &serde_json::Value, b: &serde_json::Value| {
        let (da, db) = (a["detections"].as_array().unwrap(), b["detections"].as_array().unwrap());
        assert_eq!(da.len(), db.len());
        assert!((a["presence_score"].as_f64().unwrap() - b["presence_score"].as_f64().unwrap()).abs() < 1e-5);
        for (x, y) in da.iter().zip(db) {
            assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5, "{x} vs {y}");
            assert_eq!(x["query"], y["query"]);
        }
    };
    for extra in [&[][..], &["--box", "5,5,40,30"][..]] {
        let (both, stdout) = predict(&["crack", "pothole road"], extra, "both");
        let (crack, _) = predict(&["crack"], extra, "crack");
        let (pothole, _) = predict(&["pothole road"], extra, "pothole");
        // The single-prompt layout: prompt and detections at the top level.
        assert_eq!(crack["prompt"], "crack");
        assert!(crack["detections"].is_array() && crack.get("prompts").is_none());
        // Several: one entry per prompt, in order, each as its single run.
        let entries = both["prompts"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(both.get("detections").is_none() && both.get("prompt").is_none());
        assert_eq!((&entries[0]["prompt"], &entries[1]["prompt"]), (&crack["prompt"], &pothole["prompt"]));
        same(&entries[0], &crack);
        same(&entries[1], &pothole);
        assert!(entries[0]["presence_score"] != entries[1]["presence_score"], "the prompts differ");
        assert!(stdout.contains("\"crack\": ") && stdout.contains("\"pothole road\": "), "{stdout}");
        // mask.png: at each pixel the number of the prompt with the best-scoring detection there.
        let (mut want, mut best) = (vec![0u8; 64 * 48], vec![f64::NEG_INFINITY; 64 * 48]);
        for (k, e) in entries.iter().enumerate() {
            for d in e["detections"].as_array().unwrap() {
                let rle =
                    Rle::from_compressed([48, 64], d["segmentation"]["counts"].as_str().unwrap()).unwrap();
                let score = d["score"].as_f64().unwrap() as f32 as f64;
                for (i, on) in rle_decode(&rle).into_iter().enumerate() {
                    if on && score > best[i] {
                        (best[i], want[i]) = (score, k as u8 + 1);
                    }
                }
            }
        }
        let mask = image::open(tmp.path().join("both/mask.png")).unwrap().to_luma8();
        assert_eq!(mask.as_raw(), &want);
        assert!(want.contains(&2), "the check sees pixels of the second prompt");
    }
    // Several images with several prompts: summary.json counts each prompt.
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    img.save(imgs.join("a.png")).unwrap();
    img.save(imgs.join("b.png")).unwrap();
    let o = Command::new(bin)
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&imgs)
        .args(["--prompt", "crack", "--prompt", "hole", "--threshold", "0", "--out"])
        .arg(tmp.path().join("many"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("many/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["prompts"], serde_json::json!(["crack", "hole"]));
    let first = &summary["images"][0];
    let per: Vec<u64> =
        first["prompts"].as_array().unwrap().iter().map(|p| p["detections"].as_u64().unwrap()).collect();
    assert_eq!(per.iter().sum::<u64>(), first["detections"].as_u64().unwrap());
    // An empty prompt among several is refused by its position.
    let o = Command::new(bin)
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&img_path)
        .args(["--prompt", "crack", "--prompt", " ", "--out"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--prompt number 2 is empty"), "{err}");
}

/// `predict --tile`: each tile's detections are those of the tile cut out and predicted alone,
/// moved to the tile's place (boxes shifted, masks pasted into the image); with NMS off every
/// one is kept, and the presence score is the best tile's. An image no larger than a tile is
/// predicted whole, and --box with --tile is refused.
#[test]
fn tiled_prediction_places_each_tiles_detections_in_the_image() {
    use lorahost::inference::{predict, DTypeArg, DeviceArg, PredictOptions};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir(&model);
    let img = image::RgbImage::from_fn(70, 40, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    });
    let img_path = tmp.path().join("big.png");
    img.save(&img_path).unwrap();
    let opts = |image: &Path, out: &str, tile: Option<(u32, u32)>| PredictOptions {
        model_dir: model.clone(),
        adapter: None,
        image: image.to_path_buf(),
        prompts: vec!["crack".into()],
        boxes: Vec::new(),
        out: tmp.path().join(out),
        threshold: 0.0,
        nms_iou: 1.0,
        device: DeviceArg::Cpu,
        dtype: DTypeArg::F32,
        tile,
    };
    // Tiles of 32 with overlap 8: x at 0, 24, 38; y at 0, 8.
    let tiled = predict(&opts(&img_path, "tiled", Some((32, 8)))).unwrap();
    let dets = &tiled.prompts[0].detections;
    let mut presence = 0f32;
    for (x0, y0) in [(0u32, 0u32), (24, 0), (38, 0), (0, 8), (24, 8), (38, 8)] {
        let crop = image::imageops::crop_imm(&img, x0, y0, 32, 32).to_image();
        let crop_path = tmp.path().join(format!("tile_{x0}_{y0}.png"));
        crop.save(&crop_path).unwrap();
        let alone = predict(&opts(&crop_path, &format!("alone_{x0}_{y0}"), None)).unwrap();
        presence = presence.max(alone.prompts[0].presence_score);
        assert!(!alone.prompts[0].detections.is_empty());
        for a in &alone.prompts[0].detections {
            let (dx, dy) = (x0 as f32, y0 as f32);
            let want = [a.bbox[0] + dx, a.bbox[1] + dy, a.bbox[2] + dx, a.bbox[3] + dy];
            let d = dets
                .iter()
                .find(|d| d.score == a.score && d.bbox == want)
                .unwrap_or_else(|| panic!("tile ({x0}, {y0}) detection {want:?} missing"));
            assert_eq!(d.segmentation.size, [40, 70]);
            let (full, part) = (rle_decode(&d.segmentation), rle_decode(&a.segmentation));
            for (i, v) in full.iter().enumerate() {
                let (x, y) = ((i % 70) as u32, (i / 70) as u32);
                let inside = x >= x0 && x < x0 + 32 && y >= y0 && y < y0 + 32;
                let want = inside && part[((y - y0) * 32 + (x - x0)) as usize];
                assert_eq!(*v, want, "tile ({x0}, {y0}) pixel ({x}, {y})");
            }
        }
    }
    assert_eq!(tiled.prompts[0].presence_score, presence);
    // No larger than a tile: the whole image, as without --tile.
    let whole = predict(&opts(&img_path, "whole", None)).unwrap();
    let big_tile = predict(&opts(&img_path, "big_tile", Some((100, 8)))).unwrap();
    let scores = |p: &lorahost::inference::Prediction| {
        p.prompts[0].detections.iter().map(|d| d.score).collect::<Vec<_>>()
    };
    assert_eq!(scores(&whole), scores(&big_tile));
    let mut with_box = opts(&img_path, "box", Some((32, 8)));
    with_box.boxes = vec![[1.0, 1.0, 10.0, 10.0]];
    assert!(predict(&with_box).unwrap_err().to_string().contains("--tile predicts text prompts only"));
}

/// `--model` naming no folder says so (not that its tokenizer is missing).
#[test]
fn predict_names_a_missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("a.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["predict", "--model"])
        .arg(tmp.path().join("nope"))
        .arg("--image")
        .arg(&img)
        .args(["--prompt", "crack", "--out"])
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("nope: no such folder") && !err.contains("tokenizer.json not found"), "{err}");
}

/// A --box reaching far past the image prompts the part inside it (the same detections as the
/// box clipped by hand); one wholly outside, or with a non-finite coordinate, is refused
/// naming --box (it used to end in roi_align's internal error).
#[test]
fn a_box_past_the_image_is_clipped_and_one_outside_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model_dir(&model);
    let img = image::RgbImage::from_fn(90, 60, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 120]));
    let img_path = tmp.path().join("wall.png");
    img.save(&img_path).unwrap();
    let predict = |b: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .args(["predict", "--model"])
            .arg(&model)
            .arg("--image")
            .arg(&img_path)
            .args(["--prompt", "crack", "--threshold", "0", &format!("--box={b}"), "--out"])
            .arg(tmp.path().join(out))
            .output()
            .unwrap()
    };
    let detections = |out: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(out).join("detections.json")).unwrap(),
        )
        .unwrap();
        v["detections"].clone()
    };
    let far = predict("-50,10,1e9,40", "far");
    assert!(far.status.success(), "{}", String::from_utf8_lossy(&far.stderr));
    let clipped = predict("0,10,90,40", "clipped");
    assert!(clipped.status.success(), "{}", String::from_utf8_lossy(&clipped.stderr));
    assert_eq!(detections("far"), detections("clipped"));
    for b in ["200,10,300,40", "0,0,inf,40"] {
        let o = predict(b, "refused");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--box") && !err.contains("roi_align"), "{b}: {err}");
    }
}
