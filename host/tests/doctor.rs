//! `lorahost doctor` with planted faults: each is found with its failure-mode code, a clean
//! setup has no error, the CLI's JSON has the documented fields and exit status.

mod common;

use lorahost::data::synthetic::{write_synthetic, SyntheticSpec};
use lorahost::doctor::{diagnose, DoctorOptions, Report, Severity};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    data: PathBuf,
}

/// A clean setup: the tiny model, 6 synthetic training images, a sane config.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_synthetic(
        &data,
        &SyntheticSpec { seed: 4, train_images: 6, valid_images: 2, size: 112, max_cracks: 2 },
    )
    .unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "model:\n  name: tiny\n  path: {}\nlora:\n  rank: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n  apply_to_geometry_encoder: false\n  apply_to_mask_decoder: false\n\
             training:\n  data_dir: {}\n  batch_size: 2\n  gradient_accumulation_steps: 1\n  num_epochs: 4\n  warmup_steps: 2\n  learning_rate: 1e-4\n  num_negatives: 1\n  max_grad_norm: 1.0\n\
             output:\n  output_dir: {}\nhardware:\n  device: cpu\n",
            common::repo().join("examples/tiny_sam3").display(),
            data.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    Setup { dir, config, data }
}

fn run(s: &Setup, overrides: &[&str]) -> Report {
    diagnose(&DoctorOptions {
        config: s.config.clone(),
        overrides: overrides.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    })
    .unwrap()
}

fn has(r: &Report, code: &str, sev: Severity, text: &str) -> bool {
    r.findings.iter().any(|f| {
        f.code == code && f.severity == sev && (f.message.contains(text) || f.evidence.contains(text))
    })
}

fn explain(r: &Report) -> String {
    r.to_text()
}

#[test]
fn a_clean_setup_has_no_error_and_reports_the_effective_numbers() {
    let s = setup();
    let r = run(&s, &[]);
    assert!(!r.has_errors(), "{}", explain(&r));
    let e = &r.facts["effective"];
    assert_eq!((e["steps_per_epoch"].as_u64(), e["total_steps"].as_u64()), (Some(3), Some(12)), "{e}");
    assert!(r.facts["lora"]["modules"].as_u64().unwrap() > 0);
    assert!(r.facts["dataset"]["content_sha256"].as_str().unwrap().len() == 64);
}

#[test]
fn the_diagnosis_root_causes_are_found() {
    let s = setup();
    // Wrong data_dir (a directory that does not exist).
    let r = run(&s, &["training.data_dir=/nonexistent/data3"]);
    assert!(has(&r, "F12", Severity::Error, "/nonexistent/data3"), "{}", explain(&r));
    // Wrong dataset: the expected fingerprint belongs to another one.
    let other = s.dir.path().join("potholes");
    write_synthetic(
        &other,
        &SyntheticSpec { seed: 99, train_images: 3, valid_images: 1, size: 64, max_cracks: 1 },
    )
    .unwrap();
    let want = run(&s, &[]).facts["dataset"]["content_sha256"].as_str().unwrap()[..12].to_string();
    let r = diagnose(&DoctorOptions {
        config: s.config.clone(),
        overrides: vec![format!("training.data_dir={}", other.display())],
        expect_fingerprint: Some(want),
        ..Default::default()
    })
    .unwrap();
    assert!(has(&r, "F12", Severity::Error, "not the expected one"), "{}", explain(&r));
    // Batch 1 without accumulation.
    let r = run(&s, &["training.batch_size=1", "training.gradient_accumulation_steps=1"]);
    assert!(has(&r, "F10", Severity::Warning, "effective batch of one"), "{}", explain(&r));
    // Rank changed without alpha (64 / 16): the update scale drops 8x.
    let r = run(&s, &["lora.rank=64", "lora.alpha=16"]);
    assert!(has(&r, "D4", Severity::Warning, "alpha/rank"), "{}", explain(&r));
    // Warmup in the wrong units: 200 "steps" for a 12-step run.
    let r = run(&s, &["training.warmup_steps=200"]);
    assert!(has(&r, "D1", Severity::Error, "warmup"), "{}", explain(&r));
    // Clipping not applied.
    let r = run(&s, &["training.max_grad_norm=0"]);
    assert!(has(&r, "F10", Severity::Warning, "clipping is off"), "{}", explain(&r));
}

#[test]
fn config_and_lora_faults_are_found() {
    let s = setup();
    let r = run(&s, &["training.warmup_step=10"]);
    assert!(has(&r, "F11", Severity::Warning, "training.warmup_steps"), "{}", explain(&r));
    let r = run(&s, &["training.mixed_precision=bf16"]);
    assert!(has(&r, "F11", Severity::Error, "mixed_precision"), "{}", explain(&r));
    let r = run(&s, &["lora.target_modules=[qkv_nonexistent]"]);
    assert!(has(&r, "F9", Severity::Error, "qkv_nonexistent"), "{}", explain(&r));
    let r = run(&s, &["lora.apply_to_mask_decoder=true", "lora.target_modules=[fc1]"]);
    assert!(has(&r, "F9", Severity::Warning, "apply_to_mask_decoder"), "{}", explain(&r));
    let r = run(&s, &["lora.apply_to_text_encoder=true"]);
    assert!(has(&r, "F7", Severity::Warning, "text encoder"), "{}", explain(&r));
    let r = run(&s, &["training.num_negatives=0"]);
    assert!(has(&r, "F7", Severity::Warning, "num_negatives"), "{}", explain(&r));
    let r = run(&s, &["lora.rank=64", "lora.alpha=128", "lora.target_modules=[\"*\"]"]);
    assert!(has(&r, "F8", Severity::Warning, "trainable"), "{}", explain(&r));
    // Adapters of another layout already in output_dir.
    let adapter = s.dir.path().join("out/best");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), r#"{"r": 16, "lora_alpha": 32}"#).unwrap();
    let r = run(&s, &[]);
    assert!(has(&r, "F25", Severity::Warning, "r 16 alpha 32"), "{}", explain(&r));
    let r = run(&s, &["training.gradient_accumulation_steps=8"]);
    assert!(has(&r, "D2", Severity::Warning, "longer than an epoch"), "{}", explain(&r));
}

/// Rewrite the train split's COCO file.
fn mutate(data: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = data.join("train/_annotations.coco.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn data_faults_are_found_by_file_and_id() {
    let s = setup();
    mutate(&s.data, |v| {
        let anns = v["annotations"].as_array_mut().unwrap();
        anns[0]["bbox"] = serde_json::json!([500.0, 500.0, 40.0, 40.0]); // F4: outside a 112 px image
                                                                         // No box and no mask to take one from: dropped (F23); a degenerate box without a mask (F21).
        anns[1].as_object_mut().unwrap().remove("bbox"); // F23
        anns[1].as_object_mut().unwrap().remove("segmentation");
        anns[2]["bbox"] = serde_json::json!([10.0, 10.0, 0.0, 5.0]); // F21
        anns[2].as_object_mut().unwrap().remove("segmentation");
        anns[3]["segmentation"] = serde_json::json!({"counts": "garbage!!", "size": [3, 3]}); // F23
                                                                                              // No box but a mask: the box is derived from it, with a warning (F23).
        anns[4].as_object_mut().unwrap().remove("bbox");
        let cats = v["categories"].as_array_mut().unwrap();
        cats.push(serde_json::json!({"id": 77, "name": "0"})); // F6
    });
    let first = {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.data.join("train/_annotations.coco.json")).unwrap())
                .unwrap();
        v["images"][5]["file_name"].as_str().unwrap().to_string()
    };
    std::fs::write(s.data.join("train").join(&first), b"not an image").unwrap(); // F26
    let r = run(&s, &[]);
    for (code, text) in [
        ("F4", "outside"),
        ("F23", "bbox"),
        ("F21", "degenerate"),
        ("F23", "segmentation"),
        ("F23", "bbox derived from the segmentation"),
        ("F6", "prompt"),
        ("F26", &first),
    ] {
        assert!(
            r.findings
                .iter()
                .any(|f| f.code == code && (f.message.contains(text) || f.evidence.contains(text))),
            "{code} {text}: {}",
            explain(&r)
        );
    }
    assert!(r.has_errors());
    // No annotations at all (the F1 symptom: a near-zero loss).
    let s2 = setup();
    mutate(&s2.data, |v| v["annotations"] = serde_json::json!([]));
    let r = run(&s2, &[]);
    assert!(has(&r, "F1", Severity::Error, "no usable objects"), "{}", explain(&r));
}

#[test]
fn the_probe_reports_steps_and_catches_a_loss_out_of_range() {
    let s = setup();
    let r =
        diagnose(&DoctorOptions { config: s.config.clone(), probe_steps: 3, ..Default::default() }).unwrap();
    let p = &r.facts["probe"];
    assert_eq!(p["steps"].as_u64(), Some(3), "{}", explain(&r));
    assert_eq!(p["lr_applied"].as_array().unwrap().len(), 3);
    assert!(p["terms_mean"]["loss_mask"].as_f64().unwrap() > 0.0);
    // A loss weight in the wrong units (the F2/F3 symptom).
    let r = diagnose(&DoctorOptions {
        config: s.config.clone(),
        overrides: vec!["loss.loss_mask=1e7".into()],
        probe_steps: 2,
        ..Default::default()
    })
    .unwrap();
    assert!(has(&r, "F2", Severity::Error, "orders of magnitude"), "{}", explain(&r));
}

#[test]
fn the_cli_prints_json_findings_and_fails_on_errors() {
    let s = setup();
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let o = Command::new(bin).args(["doctor", "--json", "--config"]).arg(&s.config).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["findings"].is_array());
    let o = Command::new(bin)
        .args(["doctor", "--json", "--override", "training.warmup_steps=500", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "D1").unwrap();
    for k in ["code", "severity", "message", "evidence", "fix"] {
        assert!(f[k].is_string(), "{k} in {f}");
    }
    assert_eq!(f["severity"], "error");
}

#[test]
fn memory_size_and_split_faults_are_found() {
    let s = setup();
    // F13: a device too small for the micro-batch; the fix proposes a batch that fits.
    let r = diagnose(&DoctorOptions {
        config: s.config.clone(),
        overrides: vec!["training.batch_size=6".into()],
        device_memory_gb: Some(0.035),
        ..Default::default()
    })
    .unwrap();
    let f = r.findings.iter().find(|f| f.code == "F13").unwrap_or_else(|| panic!("{}", explain(&r)));
    assert_eq!(f.severity, Severity::Error, "{}", explain(&r));
    assert!(f.fix.contains("gradient_accumulation_steps"), "{}", f.fix);
    let r = diagnose(&DoctorOptions {
        config: s.config.clone(),
        device_memory_gb: Some(64.0),
        ..Default::default()
    })
    .unwrap();
    assert!(has(&r, "F13", Severity::Info, "GiB"), "{}", explain(&r));
    // F13 on the host: the run's RAM (here CPU training + data pipeline) against a small machine
    // is an exit-137 kill foretold.
    let small = DoctorOptions { config: s.config.clone(), host_memory_gb: Some(0.01), ..Default::default() };
    let r = diagnose(&small).unwrap();
    assert!(has(&r, "F13", Severity::Error, "exit 137"), "{}", explain(&r));
    let host = &r.facts["host_memory"]["estimate_bytes"];
    assert!(host["data_pipeline"].as_u64().unwrap() > 0 && host["dataset"].as_u64().unwrap() > 0, "{host}");
    let r = diagnose(&DoctorOptions { host_memory_gb: Some(64.0), ..small }).unwrap();
    assert!(!has(&r, "F13", Severity::Error, "exit 137"), "{}", explain(&r));
    // F24: the JSON says another size than the decoded image (an EXIF rotation, typically).
    mutate(&s.data, |v| {
        v["images"][0]["width"] = serde_json::json!(60);
        v["images"][0]["height"] = serde_json::json!(112);
    });
    let r = run(&s, &[]);
    assert!(r.findings.iter().any(|f| f.code == "F24"), "{}", explain(&r));
    // D3: an LR outside the LoRA range warns; far outside (diverges within steps) is an error.
    let r = run(&s, &["training.learning_rate=3e-3"]);
    assert!(has(&r, "D3", Severity::Warning, "3e-3"), "{}", explain(&r));
    let r = run(&s, &["training.learning_rate=0.5"]);
    assert!(has(&r, "D3", Severity::Error, "5e-1"), "{}", explain(&r));
    // D6: no validation split; a folder with another usual name is pointed out.
    std::fs::rename(s.data.join("valid"), s.data.join("val")).unwrap();
    let r = run(&s, &[]);
    assert!(r.findings.iter().any(|f| f.code == "D6" && f.fix.contains("rename val/")), "{}", explain(&r));
    std::fs::rename(s.data.join("val"), s.data.join("valid")).unwrap();
    std::fs::remove_dir_all(s.data.join("valid")).unwrap();
    let r = run(&s, &[]);
    assert!(has(&r, "D6", Severity::Warning, "valid"), "{}", explain(&r));
}

#[test]
fn configured_plugins_are_loaded_and_a_broken_one_is_an_error() {
    let s = setup();
    let text = std::fs::read_to_string(&s.config).unwrap();
    let with = |plugins: &str| {
        std::fs::write(&s.config, format!("{text}plugins:\n{plugins}")).unwrap();
        diagnose(&DoctorOptions {
            config: s.config.clone(),
            cache_dir: Some(s.dir.path().join("cache")),
            ..Default::default()
        })
        .unwrap()
    };
    let guard = common::plugin("spike_guard");
    let sampler = common::plugin("balanced_sampler");
    // Good plugins load; the facts name them and their hooks.
    let r = with(&format!(
        "  - path: {}\n    config: {{window: 8}}\n  - path: {}\n",
        guard.display(),
        sampler.display()
    ));
    assert!(!r.has_errors(), "{}", explain(&r));
    let names: Vec<&str> =
        r.facts["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["spike_guard", "balanced_sampler"]);
    assert!(
        r.facts["plugins"][0]["hooks"].as_array().unwrap().iter().any(|h| h == "step-metrics"),
        "{}",
        r.facts["plugins"]
    );
    // A config section init refuses: the plugin's message, with its key.
    let r = with(&format!("  - path: {}\n    config: {{windw: 8}}\n", guard.display()));
    assert!(has(&r, "D7", Severity::Error, "windw"), "{}", explain(&r));
    // A missing file and a file that is no component.
    let junk = s.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let r = with(&format!(
        "  - path: {}\n  - path: {}\n",
        s.dir.path().join("nope.wasm").display(),
        junk.display()
    ));
    assert!(has(&r, "D7", Severity::Error, "does not exist"), "{}", explain(&r));
    assert!(has(&r, "D7", Severity::Error, "junk.wasm"), "{}", explain(&r));
    // The same plugin twice cannot be loaded together.
    let r = with(&format!("  - path: {}\n  - path: {}\n", guard.display(), guard.display()));
    assert!(has(&r, "D7", Severity::Error, "together"), "{}", explain(&r));
}

/// Rewrite a split's COCO file.
fn mutate_split(data: &Path, split: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let p = data.join(split).join("_annotations.coco.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn each_contradiction_is_its_own_finding_and_the_other_checks_go_on() {
    let s = setup();
    let r = run(
        &s,
        &["lora.dropout=1.0", "training.batch_size=0", "training.num_epochs=0", "training.warmup_stpes=10"],
    );
    let errors: Vec<_> = r.with_code("F11").into_iter().filter(|f| f.severity == Severity::Error).collect();
    // The three contradictions, and the misspelt override train refuses.
    assert_eq!(errors.len(), 4, "{}", explain(&r));
    assert!(errors.iter().any(|f| f.message.contains("train refuses this --override")), "{}", explain(&r));
    for key in ["lora.dropout", "training.batch_size", "training.num_epochs"] {
        let f = errors
            .iter()
            .find(|f| f.message.contains(key))
            .unwrap_or_else(|| panic!("{key}: {}", explain(&r)));
        assert!(f.fix.contains(key) && f.fix.starts_with("set "), "{key}: {}", f.fix);
    }
    assert!(!r.findings.iter().any(|f| f.message.contains("does not parse")), "{}", explain(&r));
    // The unknown key, the data and the LoRA table are still checked.
    assert!(has(&r, "F11", Severity::Warning, "training.warmup_steps"), "{}", explain(&r));
    assert!(r.facts["dataset"]["content_sha256"].is_string(), "{}", explain(&r));
    assert!(r.facts["lora"]["modules"].as_u64().unwrap() > 0, "{}", explain(&r));
    // What needs the broken batch/epochs (the planning numbers, memory) is left out.
    assert!(!r.facts.contains_key("effective") && !r.facts.contains_key("memory"), "{}", explain(&r));
    // A contradiction whose fix is in its text keeps that fix.
    let r = run(&s, &["training.mixed_precision=bf16"]);
    let f = r.with_code("F11").into_iter().find(|f| f.severity == Severity::Error).unwrap();
    assert!(f.fix.starts_with("use mixed_precision: no"), "{}", f.fix);
    assert!(r.facts.contains_key("effective"), "{}", explain(&r));
}

#[test]
fn settings_train_refuses_are_errors() {
    let s = setup();
    // clary97's loss section: train stops at its unknown term.
    let r = run(&s, &["loss.loss_mask=250", "loss.loss_cldice=5.0"]);
    assert!(has(&r, "F11", Severity::Error, "loss.loss_cldice"), "{}", explain(&r));
    assert!(!has(&r, "F11", Severity::Error, "loss.loss_mask"), "{}", explain(&r));
    // hardware.device: cuda opens the device as train does.
    let r = run(&s, &["hardware.device=cuda"]);
    if candle_core::utils::cuda_is_available() && candle_core::Device::new_cuda(0).is_ok() {
        assert!(r.with_code("F26").is_empty(), "{}", explain(&r));
    } else {
        let f = r.with_code("F26");
        assert!(
            f.iter().any(|f| f.severity == Severity::Error && f.message.contains("hardware.device is cuda")),
            "{}",
            explain(&r)
        );
    }
    // The device's memory is unknown on CUDA: the estimate says it was not compared.
    let f = r.findings.iter().find(|f| f.code == "F13" && f.message.contains("micro-batch")).unwrap();
    assert!(f.fix.contains("--device-memory-gb"), "{}", explain(&r));
}

#[test]
fn box_only_objects_are_found_with_what_they_cost() {
    let s = setup();
    for split in ["train", "valid"] {
        mutate_split(&s.data, split, |v| {
            for a in v["annotations"].as_array_mut().unwrap() {
                a["segmentation"] = serde_json::json!([]);
            }
        });
    }
    let r = run(&s, &[]);
    assert!(has(&r, "F23", Severity::Warning, "no training object has a mask"), "{}", explain(&r));
    assert!(has(&r, "F23", Severity::Warning, "mAP -1"), "{}", explain(&r));
    // Selecting the best checkpoint by mAP cannot work.
    let r = run(&s, &["evaluation.metric=map"]);
    assert!(has(&r, "F23", Severity::Error, "mAP -1"), "{}", explain(&r));
}

/// F20: masks that vanish on the mask grid (32² for the tiny model, 112-pixel images) are
/// a warning; masks that survive but are under 3 cells wide are thin structures to judge by
/// the pixel metrics; wide masks say nothing.
#[test]
fn thin_structures_on_the_mask_grid_are_found() {
    let band = |y0: f64, y1: f64| {
        move |v: &mut serde_json::Value| {
            for a in v["annotations"].as_array_mut().unwrap() {
                a["segmentation"] = serde_json::json!([[0.0, y0, 112.0, y0, 112.0, y1, 0.0, y1]]);
                a["bbox"] = serde_json::json!([0.0, y0, 112.0, y1 - y0]);
                a["area"] = serde_json::json!(112.0 * (y1 - y0));
            }
        }
    };
    // The synthetic cracks are thin; a 40-row band is not.
    let r = run(&setup(), &[]);
    assert!(has(&r, "F20", Severity::Info, "thin structures"), "{}", explain(&r));
    let s = setup();
    mutate_split(&s.data, "train", band(20.0, 60.0));
    let r = run(&s, &[]);
    assert!(!r.findings.iter().any(|f| f.code == "F20"), "{}", explain(&r));
    // Two image rows between the grid's sampling rows (1 and 5): nothing left of any mask.
    let s = setup();
    mutate_split(&s.data, "train", band(2.0, 4.0));
    let r = run(&s, &[]);
    assert!(has(&r, "F20", Severity::Warning, "100% of the training masks vanish"), "{}", explain(&r));
    assert!(has(&r, "F20", Severity::Warning, "no pixel on the 32×32 mask grid"), "{}", explain(&r));
    // Seven rows: two grid rows wide.
    let s = setup();
    mutate_split(&s.data, "train", band(20.0, 27.0));
    let r = run(&s, &[]);
    assert!(has(&r, "F20", Severity::Info, "median width there is 2."), "{}", explain(&r));
    assert!(!has(&r, "F20", Severity::Warning, ""), "{}", explain(&r));
}

#[test]
fn splits_with_other_prompts_and_most_boxes_in_another_format_are_errors() {
    let s = setup();
    mutate_split(&s.data, "valid", |v| {
        for (i, c) in v["categories"].as_array_mut().unwrap().iter_mut().enumerate() {
            c["name"] = serde_json::json!(["pothole", "patch", "manhole"][i % 3]);
        }
    });
    let r = run(&s, &[]);
    assert!(has(&r, "D8", Severity::Error, "share no prompt"), "{}", explain(&r));
    // Every box written as [x0, y0, x1, y1]: the box targets are all wrong.
    let s = setup();
    for split in ["train", "valid"] {
        mutate_split(&s.data, split, |v| {
            for a in v["annotations"].as_array_mut().unwrap() {
                let b: Vec<f64> = a["bbox"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                a["bbox"] = serde_json::json!([b[0], b[1], b[0] + b[2], b[1] + b[3]]);
            }
        });
    }
    let r = run(&s, &[]);
    assert!(has(&r, "F5", Severity::Error, "most of the objects"), "{}", explain(&r));
}

#[test]
fn batch_larger_than_the_data_negatives_and_a_valid_folder_without_its_file() {
    let s = setup();
    // 4 × 4 = 16 > 6 training images: one partial step per epoch.
    let r = run(&s, &["training.batch_size=4", "training.gradient_accumulation_steps=4"]);
    let f = r
        .findings
        .iter()
        .find(|f| f.code == "D2" && f.message.contains("larger than the training set"))
        .unwrap_or_else(|| panic!("{}", explain(&r)));
    assert!(f.message.contains("one optimizer step over 6 images, not 16"), "{}", f.message);
    // More negatives asked for than the data (categories and any generic words) has.
    let r = run(&s, &["training.num_negatives=500"]);
    assert!(
        r.findings.iter().any(|f| f.code == "F7" && f.message.contains("num_negatives 500 gives")),
        "{}",
        explain(&r)
    );
    assert!(r.facts["negatives_per_image"]["max"].as_u64().unwrap() < 500);
    // valid/ without its COCO file: the fix names the file to add.
    std::fs::remove_file(s.data.join("valid/_annotations.coco.json")).unwrap();
    let r = run(&s, &[]);
    assert!(
        r.findings.iter().any(|f| f.code == "D6" && f.fix.contains("valid/_annotations.coco.json")),
        "{}",
        explain(&r)
    );
}

#[test]
fn an_empty_fingerprint_matches_nothing_and_hex_case_does_not_matter() {
    let s = setup();
    let fp = run(&s, &[]).facts["dataset"]["content_sha256"].as_str().unwrap().to_string();
    let with = |want: &str| {
        diagnose(&DoctorOptions {
            config: s.config.clone(),
            expect_fingerprint: Some(want.into()),
            ..Default::default()
        })
        .unwrap()
    };
    let r = with("");
    assert!(has(&r, "F12", Severity::Error, "empty"), "{}", explain(&r));
    let r = with(&fp[..12].to_ascii_uppercase());
    assert!(r.with_code("F12").is_empty(), "{}", explain(&r));
}

/// The valid split numbers the same classes the other way round ("crack" 0 → 1, "stain" 1 → 0)
/// while its annotations keep train's ids: its labels are swapped. Same-numbered splits are
/// quiet.
#[test]
fn splits_that_number_their_classes_differently_are_warned_about() {
    let s = setup();
    let r = run(&s, &[]);
    assert!(!has(&r, "D8", Severity::Warning, "number their classes"), "{}", explain(&r));
    mutate_split(&s.data, "valid", |v| {
        for c in v["categories"].as_array_mut().unwrap() {
            let id = c["id"].as_u64().unwrap();
            c["id"] = serde_json::json!(1 - id);
        }
    });
    let r = run(&s, &[]);
    assert!(has(&r, "D8", Severity::Warning, "\"crack\" is id 0 in train and 1 in valid"), "{}", explain(&r));
}

/// `doctor --gt-overlays DIR` draws the targets of train and valid images as PNGs at the
/// model's input size, with an index naming each image's prompts and their colours.
#[test]
fn gt_overlays_are_written_with_their_index() {
    let s = setup();
    let dir = s.dir.path().join("overlays");
    let out = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["doctor", "--config"])
        .arg(&s.config)
        .arg("--gt-overlays")
        .arg(&dir)
        .args(["--gt-overlay-images", "3", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("overlays.json")).unwrap()).unwrap();
    let recs = index.as_array().unwrap();
    // 3 training images and both (of 2) validation images.
    assert_eq!(recs.len(), 5, "{index:#}");
    let size =
        lorahost::sam3::config::Sam3Config::from_file(&common::repo().join("examples/tiny_sam3/config.json"))
            .unwrap()
            .0
            .vision_config
            .backbone_config
            .image_size as u32;
    for r in recs {
        let img = image::open(r["file"].as_str().unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (size, size));
        assert!(r["queries"].as_array().unwrap().iter().any(|q| !q["negative"].as_bool().unwrap()));
    }
    assert_eq!(report["facts"]["gt_overlays"]["images"], 5);
    assert!(report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "F5" && f["message"].as_str().unwrap().contains("ground-truth overlays")));
}

/// An image that cannot be read does not stop `--gt-overlays`: it is listed in overlays.json
/// with its error and counted in the finding, the other images and the valid and test splits
/// are still drawn.
#[test]
fn gt_overlays_skip_unreadable_images_and_draw_the_test_split() {
    let s = setup();
    // 6 training images, 3 drawn: indices 0, 2 and 4; the middle one is gone.
    let gone = s.data.join("train/synth_train_0002.png");
    std::fs::remove_file(&gone).unwrap();
    std::fs::create_dir_all(s.data.join("test")).unwrap();
    for e in std::fs::read_dir(s.data.join("valid")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), s.data.join("test").join(e.file_name())).unwrap();
    }
    let dir = s.dir.path().join("overlays");
    let out = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["doctor", "--config"])
        .arg(&s.config)
        .arg("--gt-overlays")
        .arg(&dir)
        .args(["--gt-overlay-images", "3", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("overlays.json")).unwrap()).unwrap();
    let recs = index.as_array().unwrap();
    let splits: Vec<&str> = recs.iter().map(|r| r["split"].as_str().unwrap()).collect();
    assert_eq!(splits, ["train", "train", "train", "valid", "valid", "test", "test"], "{index:#}");
    let failed: Vec<&serde_json::Value> = recs.iter().filter(|r| r.get("error").is_some()).collect();
    assert_eq!(failed.len(), 1, "{index:#}");
    assert_eq!(failed[0]["image"].as_str().unwrap(), gone.to_str().unwrap());
    assert!(failed[0]["error"].as_str().unwrap().contains("synth_train_0002.png"), "{index:#}");
    assert!(failed[0].get("file").is_none());
    for r in recs.iter().filter(|r| r.get("error").is_none()) {
        assert!(std::path::Path::new(r["file"].as_str().unwrap()).is_file(), "{r:#}");
    }
    assert_eq!(report["facts"]["gt_overlays"]["images"], 6);
    assert_eq!(report["facts"]["gt_overlays"]["skipped"], 1);
    let f = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "F5" && f["message"].as_str().unwrap().contains("ground-truth overlays"))
        .unwrap_or_else(|| panic!("{report:#}"));
    assert!(f["message"].as_str().unwrap().contains("wrote 6 ground-truth overlays"), "{f:#}");
    assert!(f["message"].as_str().unwrap().contains("1 image(s) skipped"), "{f:#}");
    assert!(f["evidence"].as_str().unwrap().contains("synth_train_0002.png"), "{f:#}");
}

/// `--gt-overlays` naming a file is a finding that says so, not an OS error.
#[test]
fn gt_overlays_into_a_file_is_named() {
    let s = setup();
    let file = s.dir.path().join("overlays.png");
    std::fs::write(&file, b"not a folder").unwrap();
    let r = diagnose(&DoctorOptions {
        config: s.config.clone(),
        gt_overlays: Some(file.clone()),
        ..Default::default()
    })
    .unwrap();
    assert!(has(&r, "F5", Severity::Warning, "a file, not a folder"), "{}", explain(&r));
    assert!(!explain(&r).contains("os error"), "{}", explain(&r));
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
    // A folder to be made inside that file: the file is named.
    let r = diagnose(&DoctorOptions {
        config: s.config.clone(),
        gt_overlays: Some(file.join("sub")),
        ..Default::default()
    })
    .unwrap();
    let named = format!("{} is a file, not a folder", file.display());
    assert!(has(&r, "F5", Severity::Warning, &named), "{}", explain(&r));
    assert!(!explain(&r).contains("os error"), "{}", explain(&r));
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
}

/// F10's evidence shows the warmup settings as written (file or override), or says that none
/// is set and the default applies, never a key that was not written.
#[test]
fn no_warmup_says_whether_it_was_set_or_left_out() {
    let s = setup();
    let evidence = |r: &Report| -> String {
        let f = r.findings.iter().find(|f| f.code == "F10" && f.message.starts_with("no warmup"));
        f.unwrap_or_else(|| panic!("{}", explain(r))).evidence.clone()
    };
    let r = run(&s, &["training.warmup_steps=0"]);
    assert_eq!(evidence(&r), "training.warmup_steps: 2; --override training.warmup_steps=0");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("  warmup_steps: 2\n", "  warmup_ratio: 0\n")).unwrap();
    assert_eq!(evidence(&run(&s, &[])), "training.warmup_ratio: 0");
    // Not set (a key lorahost does not read is not a warmup setting): the default, said so.
    std::fs::write(&s.config, text.replace("  warmup_steps: 2\n", "  warmup: 5\n")).unwrap();
    let e = evidence(&run(&s, &[]));
    assert!(e.contains("c.yaml: neither training.warmup_steps nor training.warmup_ratio is set"), "{e}");
    assert!(e.contains("training.warmup_steps defaults to 0"), "{e}");
}

/// D9: an image with more objects of one prompt than the tiny model's 8 queries is a warning
/// naming the image and the count; as many as the queries is fine.
#[test]
fn more_objects_than_queries_are_found() {
    let s = setup();
    let crowd = |n: usize| {
        move |v: &mut serde_json::Value| {
            let first = v["annotations"][0].clone();
            let image_id = first["image_id"].clone();
            let anns = v["annotations"].as_array_mut().unwrap();
            anns.retain(|a| a["image_id"] != image_id);
            for k in 0..n {
                let mut a = first.clone();
                a["id"] = serde_json::json!(10_000 + k);
                a["bbox"] = serde_json::json!([k as f64 * 10.0, 5.0, 8.0, 8.0]);
                a["segmentation"] = serde_json::json!([[
                    k as f64 * 10.0,
                    5.0,
                    k as f64 * 10.0 + 8.0,
                    5.0,
                    k as f64 * 10.0 + 8.0,
                    13.0,
                    k as f64 * 10.0,
                    13.0
                ]]);
                anns.push(a);
            }
        }
    };
    mutate(&s.data, crowd(8));
    let r = run(&s, &[]);
    assert!(!r.findings.iter().any(|f| f.code == "D9"), "{}", explain(&r));
    mutate(&s.data, crowd(11));
    let r = run(&s, &[]);
    assert!(
        has(&r, "D9", Severity::Warning, "more objects of one prompt than the model's 8 queries"),
        "{}",
        explain(&r)
    );
    assert!(has(&r, "D9", Severity::Warning, ": 11 objects"), "{}", explain(&r));
}

/// `doctor --trace`: a recorded run alone (no config read), in lorahost's format and in a
/// Hugging Face trainer_state.json; beside a config, both are diagnosed; a missing log is named.
#[test]
fn a_recorded_run_is_diagnosed_from_its_log() {
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let trace = common::repo().join("examples/traces/diagnosis.jsonl");
    let o = Command::new(bin).args(["doctor", "--json", "--trace"]).arg(&trace).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f10 = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "F10").unwrap();
    assert!(f10["evidence"].as_str().unwrap().contains("an effective batch of 1"), "{f10}");
    assert!(v["facts"]["lora"].is_null(), "no config was diagnosed: {}", v["facts"]);
    // A noisy, flat HF run: noise and no improvement.
    let d = tempfile::tempdir().unwrap();
    let history: Vec<String> = (1..=60)
        .map(|s| {
            format!(
                r#"{{"step": {s}, "loss": {}, "learning_rate": 1e-4}}"#,
                if s % 2 == 0 { 1.3 } else { 0.8 }
            )
        })
        .collect();
    let hf = d.path().join("trainer_state.json");
    std::fs::write(&hf, format!(r#"{{"max_steps": 60, "log_history": [{}]}}"#, history.join(","))).unwrap();
    let o = Command::new(bin).args(["doctor", "--trace"]).arg(&hf).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("[F10] warning: the loss moves by about"), "{text}");
    assert!(text.contains("[D10] warning: no measurable improvement"), "{text}");
    assert!(text.contains("a constant LR"), "{text}");
    // With a config: the setup's findings and the trace's.
    let s = setup();
    let r = diagnose(&DoctorOptions { config: s.config.clone(), trace: Some(trace), ..Default::default() })
        .unwrap();
    assert!(!r.with_code("F10").is_empty() && r.facts.contains_key("lora") && r.facts.contains_key("trace"));
    let o = Command::new(bin).args(["doctor", "--trace"]).arg(d.path().join("none.jsonl")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--trace") && err.contains("none.jsonl"), "{err}");
}

/// Doctor says what train would do with the same config: synthetic data not written yet is
/// no error (train writes it) but a user's folder for it is; a data_dir naming a file says so;
/// an --override train refuses is an error; `auto` with half precision on a machine without
/// a GPU is an error (train stops there); a key quoted with its value keeps its whole message,
/// and a regex target_modules is one finding, not also "empty".
#[test]
fn doctor_agrees_with_train() {
    let s = setup();
    let fresh = s.dir.path().join("synthetic");
    let r = run(&s, &["training.synthetic=true", &format!("training.data_dir={}", fresh.display())]);
    assert!(r.with_code("F12").is_empty() && has(&r, "D0", Severity::Info, "synthetic"), "{}", explain(&r));
    let r = run(
        &s,
        &["training.synthetic=true", &format!("training.data_dir={}", s.data.join("train").display())],
    );
    assert!(has(&r, "F12", Severity::Error, "holds other files"), "{}", explain(&r));
    let file = s.data.join("train/_annotations.coco.json");
    let r = run(&s, &[&format!("training.data_dir={}", file.display())]);
    assert!(has(&r, "F12", Severity::Error, "is a file, not a folder"), "{}", explain(&r));
    let r = run(&s, &["training.learnin_rate=1e-4"]);
    assert!(has(&r, "F11", Severity::Error, "train refuses this --override"), "{}", explain(&r));
    if !cfg!(feature = "cuda") {
        let r = run(&s, &["hardware.device=auto", "training.mixed_precision=bf16"]);
        assert!(has(&r, "F26", Severity::Error, "half precision"), "{}", explain(&r));
    }
    let text = std::fs::read_to_string(&s.config).unwrap();
    let both =
        text.replace("  batch_size: 2\n", "  batch_size: 2\n  log_every_n_steps: 5\n  logging_steps: 10\n");
    std::fs::write(&s.config, both).unwrap();
    let r = run(&s, &[]);
    std::fs::write(&s.config, text).unwrap();
    let f = r.findings.iter().find(|f| f.message.contains("log_every_n_steps")).expect("the conflict");
    assert!(
        f.message.ends_with("differ (training.log_every_n_steps is read as training.logging_steps)")
            || f.message.contains("logging_steps: 10`"),
        "{}",
        f.message
    );
    assert!(!f.fix.starts_with("training.log_every_n_steps: 5`"), "{}", f.fix);
    let r = run(&s, &["lora.target_modules=.*(q_proj|v_proj)"]);
    let f11: Vec<&str> = r.with_code("F11").iter().map(|f| f.message.as_str()).collect();
    assert!(f11.iter().any(|m| m.contains("regular expression")), "{f11:?}");
    assert!(!f11.iter().any(|m| m.contains("is empty")), "{f11:?}");
}

/// Category names the text encoder cuts to the same tokens are one prompt to the model: F16
/// error naming both (and the cut); names that fit are not mentioned.
#[test]
fn categories_the_text_encoder_cannot_tell_apart_are_errors() {
    let s = setup();
    let r = run(&s, &[]);
    assert!(r.with_code("F16").iter().all(|f| !f.message.contains("cannot tell apart")), "{}", explain(&r));
    let long = "hairline crack running along the left edge of the concrete slab next to the joint of type";
    for split in ["train", "valid"] {
        mutate_split(&s.data, split, |v| {
            for (i, c) in v["categories"].as_array_mut().unwrap().iter_mut().enumerate() {
                c["name"] = serde_json::json!(format!("{long} {}", ["alpha", "beta", "gamma"][i % 3]));
            }
        });
    }
    let r = run(&s, &[]);
    assert!(has(&r, "F16", Severity::Error, "type alpha"), "{}", explain(&r));
    assert!(has(&r, "F16", Severity::Warning, "cut short"), "{}", explain(&r));
}
