//! The `lorahost` command line, run as a user would.
mod common;

use common::*;
use std::process::Command;

fn lorahost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorahost"));
    c.env("LORAHOST_CACHE_DIR", cache_dir());
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_what_the_plugin_is() {
    let (ok, out, err) = run(lorahost().args(["plugin", "check"]).arg(plugin("spike_guard")));
    assert!(ok, "{err}");
    assert!(out.contains("lorahost:plugin@0.1.0"), "{out}");
    assert!(out.contains("spike_guard") && out.contains("step-metrics"), "{out}");
    assert!(out.contains("compile"), "{out}");
    let (ok, out, _) = run(lorahost().args(["plugin", "check", "--json"]).arg(plugin("cosine_schedule")));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["name"], "cosine_schedule");
    assert_eq!(v["hooks"], serde_json::json!(["lr-schedule"]));
}

#[test]
fn check_rejects_broken_files_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.wasm");
    std::fs::write(&bad, b"garbage").unwrap();
    let (ok, _, err) = run(lorahost().args(["plugin", "check"]).arg(&bad));
    assert!(!ok);
    assert!(err.contains("broken.wasm") && err.contains("not a WebAssembly component"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // --json answers on stdout either way.
    let (ok, out, _) = run(lorahost().args(["plugin", "check", "--json"]).arg(&bad));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!ok && v["ok"] == false && v["error"].as_str().unwrap().contains("not a WebAssembly component"));
    let (ok, _, err) = run(lorahost().args(["plugin", "check", "nope.wasm"]));
    assert!(!ok && err.contains("nope.wasm") && err.contains("not found"), "{err}");
}

#[test]
fn replay_json_reports_step_and_action() {
    let trace = repo().join("examples/traces/diagnosis.jsonl");
    let (ok, out, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(plugin("spike_guard"))
        .arg(plugin("warmup_validator"))
        .arg("--trace")
        .arg(&trace)
        .arg("--json"));
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 16);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        let a = l["action"].as_str().unwrap();
        assert!(["continue", "skip", "scale_lr", "checkpoint", "stop"].contains(&a), "{a}");
    }
    assert_eq!(lines[3]["action"], "skip");
    assert_eq!(lines[3]["decided_by"], "spike_guard");
    assert!(lines.iter().enumerate().all(|(i, l)| i == 3 || l["action"] == "continue"), "{out}");
}

#[test]
fn replay_takes_plugin_config_from_the_command_line() {
    let trace = repo().join("examples/traces/diagnosis.jsonl");
    // Ask spike_guard to lower the LR instead of skipping.
    let (ok, out, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(plugin("spike_guard"))
        .arg("--trace")
        .arg(&trace)
        .args(["--json", "--set", "spike_guard.action=scale_lr"]));
    assert!(ok, "{err}");
    let step4: serde_json::Value = serde_json::from_str(out.lines().nth(3).unwrap()).unwrap();
    assert_eq!(step4["action"], "scale_lr", "{out}");
    // A misspelled key is refused, naming it.
    let (ok, _, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(plugin("spike_guard"))
        .arg("--trace")
        .arg(&trace)
        .args(["--set", "spike_guard.z_treshold=3"]));
    assert!(!ok && err.contains("z_treshold"), "{err}");
}

#[test]
fn replay_reports_a_bad_trace_line() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("run.jsonl");
    std::fs::write(&t, "{\"step\": 1, \"loss\": 1, \"lr\": 0.1, \"grad_norm\": 1}\n{\"step\": 2, oops}\n")
        .unwrap();
    let (ok, _, err) =
        run(lorahost().args(["plugin", "replay"]).arg(plugin("spike_guard")).arg("--trace").arg(&t));
    assert!(!ok);
    assert!(err.contains("run.jsonl:2"), "{err}");
}

#[test]
fn new_scaffolds_a_plugin_that_builds_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    // With the SDK vendored into the crate: what a third-party author gets, buildable anywhere.
    let (ok, out, err) =
        run(lorahost().args(["plugin", "new", "my_guard", "--vendor-sdk", "--dir"]).arg(dir.path()));
    assert!(ok, "{err}");
    assert!(out.contains("my_guard"));
    let krate = dir.path().join("my_guard");
    // Share the plugin workspace's compiled dependencies.
    let target = repo().join("plugins/target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let wasm = target.join("wasm32-wasip2/release/my_guard.wasm");
    let (ok, out, err) = run(lorahost().args(["plugin", "check"]).arg(&wasm));
    assert!(ok, "{err}");
    assert!(out.contains("my_guard") && out.contains("step-metrics"), "{out}");
    // And it runs.
    let (ok, out, err) = run(lorahost()
        .args(["plugin", "replay"])
        .arg(&wasm)
        .arg("--trace")
        .arg(repo().join("examples/traces/diagnosis.jsonl"))
        .args(["--set", "my_guard.stop_below=150", "--json"]));
    assert!(ok, "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((last["step"].as_u64(), last["action"].as_str()), (Some(2), Some("stop")), "{out}");
    let _ = plugins_dir();
}

/// `evaluate --adapter` and `export --adapter` take the adapter's rank, alpha and modules from
/// its folder: a config whose `lora:` section differs (rank 32 for a rank-2 adapter) works,
/// with one warning naming the difference instead of a list of mis-shaped tensors. The merged
/// model is readable like the JSON beside it, and `evaluate --model MERGED` evaluates it, says
/// so, and scores as the adapter does.
#[test]
fn evaluate_and_export_read_the_adapter_layout_and_evaluate_a_merged_model() {
    use candle_core::{DType, Device, Tensor};
    use lorahost::lora::{Component, LoraConfig, LoraSet};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let spec = lorahost::data::synthetic::SyntheticSpec {
        seed: 3,
        train_images: 2,
        valid_images: 2,
        size: 112,
        max_cracks: 2,
    };
    lorahost::data::synthetic::write_synthetic(&data, &spec).unwrap();
    let model_dir = repo().join("examples/tiny_sam3");
    let mut model = lorahost::sam3::model::Sam3Model::load_dir(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let trained = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        components: vec![Component::DetrEncoder, Component::DetrDecoder],
        use_rslora: false,
    };
    let lora = LoraSet::attach(&mut model, &trained, &Device::Cpu).unwrap();
    for v in lora.vars().values() {
        v.set(&(Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap() * 0.5).unwrap()).unwrap();
    }
    let adapter = d.join("best");
    lora.save_peft(&adapter, "tiny").unwrap();
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model:\n  name: tiny\n  path: {}\nlora:\n  rank: 32\n  alpha: 64\n  target_modules: [q_proj, v_proj, fc1, fc2]\n\
             training:\n  data_dir: {}\n  batch_size: 2\n  num_negatives: 1\n  num_workers: 1\n  seed: 5\n\
             output:\n  output_dir: {}\nhardware:\n  device: cpu\nevaluation:\n  metric: loss\n",
            model_dir.display(),
            data.display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let evaluate = |extra: &[&str]| {
        let (ok, out, err) =
            run(lorahost().args(["evaluate", "--config"]).arg(&cfg).args(["--split", "valid"]).args(extra));
        assert!(ok, "{err}");
        (out, err)
    };
    let json = |out: &str| -> serde_json::Value { serde_json::from_str(out).unwrap() };
    let warned = |err: &str| {
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("does not match the adapter")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains("rank 32 (the adapter's r is 2)") && lines[0].contains("alpha 64"),
            "{err}"
        );
        assert!(!err.contains("mis-shaped"), "{err}");
    };
    let a = adapter.to_str().unwrap();
    let (out, err) = evaluate(&["--adapter", a, "--json"]);
    warned(&err);
    let with_adapter = json(&out);
    assert_eq!(with_adapter["merged"], false);
    assert_eq!(with_adapter["model"].as_str(), model_dir.to_str());

    let merged = d.join("merged");
    let (ok, _, err) = run(lorahost()
        .args(["export", "--merge", "--config"])
        .arg(&cfg)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged));
    assert!(ok, "{err}");
    warned(&err);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(merged.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("model.safetensors"), mode("lorahost_merged.json"), "as readable as its JSON");
    }

    let m = merged.to_str().unwrap();
    let (out, _) = evaluate(&["--model", m, "--json"]);
    let folded = json(&out);
    assert_eq!(folded["merged"], true);
    assert_eq!(folded["model"].as_str(), Some(m));
    let (la, lm) = (with_adapter["loss"].as_f64().unwrap(), folded["loss"].as_f64().unwrap());
    assert!((la - lm).abs() <= 1e-3 * la.abs().max(1.0), "adapter {la} vs merged {lm}");
    let (out, _) = evaluate(&["--model", m]);
    assert!(out.contains(&format!("the merged model {m}")) && !out.contains("base model"), "{out}");
    let (out, _) = evaluate(&["--json"]);
    let base = json(&out);
    assert!((base["loss"].as_f64().unwrap() - la).abs() > 1e-6, "the adapter changed nothing");
    let (out, _) = evaluate(&[]);
    assert!(out.contains("the base model"), "{out}");
    // A --model that is not there is named.
    let (ok, _, err) =
        run(lorahost().args(["evaluate", "--config"]).arg(&cfg).args(["--model"]).arg(d.join("nope")));
    assert!(!ok && err.contains("--model") && err.contains("nope"), "{err}");
}

/// `tile` writes a dataset `doctor` and training load: the summary names what was written, and
/// an --out that holds files is refused.
#[test]
fn tile_writes_a_dataset_that_loads() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    lorahost::data::synthetic::write_synthetic(
        &data,
        &lorahost::data::synthetic::SyntheticSpec {
            seed: 2,
            train_images: 3,
            valid_images: 1,
            size: 160,
            max_cracks: 2,
        },
    )
    .unwrap();
    let out = d.path().join("tiles");
    let tile = |out: &std::path::Path| {
        run(lorahost().args(["tile", "--data-dir"]).arg(&data).arg("--out").arg(out).args([
            "--size",
            "96",
            "--overlap",
            "32",
            "--empty-tiles",
            "1",
        ]))
    };
    let (ok, stdout, err) = tile(&out);
    assert!(ok, "{err}");
    // 160 px sides: tiles at 0 and 64 on each axis, 4 per image, all kept.
    assert!(stdout.contains("train: 3 images -> "), "{stdout}");
    let ds = lorahost::data::coco::Dataset::load(&out).unwrap();
    assert_eq!(ds.split("train").unwrap().images.len(), 12);
    assert_eq!(ds.split("valid").unwrap().images.len(), 4);
    let objects: usize = ds.split("train").unwrap().images.iter().map(|i| i.objects.len()).sum();
    assert!(objects >= 3, "{objects}");
    let (ok, _, err) = tile(&out);
    assert!(!ok && err.contains("not empty"), "{err}");
}

/// `bench` refuses a CPU workload beyond the host's memory with the estimate, instead of
/// being killed by the OOM killer (exit 137, no message).
#[cfg(target_os = "linux")]
#[test]
fn bench_refuses_a_batch_beyond_the_hosts_memory() {
    let (ok, _, err) =
        run(lorahost().args(["bench", "--tiny", "--device", "cpu", "--batch", "100000000", "--steps", "1"]));
    assert!(!ok);
    assert!(err.contains("GiB available: lower --batch (now 100000000)"), "{err}");
}

/// `import`: a COCO dataset drawn out as one mask image per image imports back to the same
/// pixels per image; without `--prompt` or `--class` it says what to give.
#[test]
fn import_turns_mask_images_into_a_dataset_with_the_same_pixels() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let spec = lorahost::data::synthetic::SyntheticSpec {
        seed: 4,
        train_images: 6,
        valid_images: 0,
        size: 96,
        max_cracks: 2,
    };
    lorahost::data::synthetic::write_synthetic(&data, &spec).unwrap();
    let source = lorahost::data::coco::Dataset::load(&data).unwrap();
    let masks = d.path().join("gt");
    std::fs::create_dir_all(&masks).unwrap();
    let mut unions = std::collections::HashMap::new();
    for im in &source.split("train").unwrap().images {
        let mut union = vec![false; 96 * 96];
        for o in &im.objects {
            let m = o.segmentation.as_ref().unwrap().decode(96, 96).unwrap();
            union.iter_mut().zip(m).for_each(|(u, v)| *u |= v);
        }
        let png =
            image::GrayImage::from_fn(96, 96, |x, y| image::Luma([255 * union[(y * 96 + x) as usize] as u8]));
        let stem = im.file_name.trim_end_matches(".png");
        png.save(masks.join(format!("{stem}_gt.png"))).unwrap();
        unions.insert(im.file_name.clone(), union);
    }
    let out = d.path().join("imported");
    let import = |extra: &[&str]| {
        run(lorahost()
            .args(["import", "--images"])
            .arg(data.join("train"))
            .arg("--masks")
            .arg(&masks)
            .arg("--out")
            .arg(&out)
            .args(["--min-pixels", "1"])
            .args(extra))
    };
    let (ok, _, err) = import(&[]);
    assert!(!ok && err.contains("--prompt"), "{err}");
    let (ok, stdout, err) = import(&["--prompt", "crack", "--valid-share", "0.34"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("train: 4 images") && stdout.contains("valid: 2 images"), "{stdout}");
    let ds = lorahost::data::coco::Dataset::load(&out).unwrap();
    let mut seen = 0;
    for split in ["train", "valid"] {
        for im in &ds.split(split).unwrap().images {
            let mut union = vec![false; 96 * 96];
            for o in &im.objects {
                let m = o.segmentation.as_ref().unwrap().decode(96, 96).unwrap();
                union.iter_mut().zip(m).for_each(|(u, v)| *u |= v);
            }
            assert_eq!(&union, &unions[&im.file_name], "{}", im.file_name);
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
    let (ok, _, err) = import(&["--prompt", "crack"]);
    assert!(!ok && err.contains("not empty"), "{err}");
}

/// `lr-find` on the bundled demo: a JSON report whose points follow the planned sweep, its
/// files in --out, the human report with the command to train; bad ranges are refused by name.
#[test]
fn lr_find_reports_a_suggestion_and_refuses_bad_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lrf");
    let (ok, stdout, err) = run(lorahost()
        .current_dir(repo())
        .args([
            "lr-find",
            "--config",
            "configs/demo.yaml",
            "--steps",
            "12",
            "--start-lr",
            "1e-5",
            "--end-lr",
            "1e-1",
            "--json",
            "--out",
        ])
        .arg(&out));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["planned_steps"], 12);
    let points = v["suggestion"]["points"].as_array().unwrap();
    assert!(!points.is_empty() && points.len() <= 12);
    let first_lr = points[0][0].as_f64().unwrap();
    assert!((first_lr / 1e-5 - 1.0).abs() < 1e-9, "{first_lr}");
    for f in ["lr_find.json", "lr_find.png", "metrics.jsonl"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let (ok, stdout, err) = run(lorahost()
        .current_dir(repo())
        .args(["lr-find", "--config", "configs/demo.yaml", "--steps", "10", "--end-lr", "1e-2"])
        .arg("--out")
        .arg(dir.path().join("second")));
    assert!(ok, "{err}");
    assert!(
        stdout.contains("lorahost train --config configs/demo.yaml --override training.learning_rate=")
            || stdout.contains("did not fall"),
        "{stdout}"
    );
    for (args, named) in [
        (["--start-lr", "1e-3", "--end-lr", "1e-4"], "--end-lr"),
        (["--end-lr", "50", "--steps", "100"], "--end-lr 50"),
        (["--steps", "3", "--end-lr", "1"], "--steps 3"),
    ] {
        let (ok, _, err) =
            run(lorahost().current_dir(repo()).args(["lr-find", "--config", "configs/demo.yaml"]).args(args));
        assert!(!ok && err.contains(named), "{args:?}: {err}");
    }
}

/// A config over the tiny model and a random rank-2 adapter for it, in `d` (for `export`).
fn tiny_config_and_adapter(d: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use candle_core::{DType, Device, Tensor};
    use lorahost::lora::{Component, LoraConfig, LoraSet};
    let data = d.join("data");
    let spec = lorahost::data::synthetic::SyntheticSpec {
        seed: 3,
        train_images: 2,
        valid_images: 2,
        size: 112,
        max_cracks: 2,
    };
    lorahost::data::synthetic::write_synthetic(&data, &spec).unwrap();
    let model_dir = repo().join("examples/tiny_sam3");
    let mut model = lorahost::sam3::model::Sam3Model::load_dir(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let trained = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        components: vec![Component::DetrEncoder, Component::DetrDecoder],
        use_rslora: false,
    };
    let lora = LoraSet::attach(&mut model, &trained, &Device::Cpu).unwrap();
    for v in lora.vars().values() {
        v.set(&(Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap() * 0.5).unwrap()).unwrap();
    }
    let adapter = d.join("best");
    lora.save_peft(&adapter, "tiny").unwrap();
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model:\n  name: tiny\n  path: {}\nlora:\n  rank: 2\n  alpha: 4\n  target_modules: [q_proj, v_proj]\n\
             training:\n  data_dir: {}\n  batch_size: 2\n  num_negatives: 1\n  num_workers: 1\n  seed: 5\n\
             output:\n  output_dir: {}\nhardware:\n  device: cpu\nevaluation:\n  metric: loss\n",
            model_dir.display(),
            data.display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    (cfg, adapter)
}

/// The names in a directory, sorted.
fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `export --overwrite` replaces only an earlier export: a folder of the user's files that look
/// like metadata (labels, notes) is refused with or without it, the files named and kept. An
/// existing directory (a mount point, a volume) is written into, never renamed: it stays the
/// same directory, an earlier export in it is replaced only with --overwrite, and nothing is
/// left beside it. A link --out is written through, the link kept.
#[test]
fn export_writes_into_an_existing_out_and_never_replaces_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cfg, adapter) = tiny_config_and_adapter(d);
    let export = |out: &std::path::Path, extra: &[&str]| {
        run(lorahost()
            .args(["export", "--config"])
            .arg(&cfg)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(out)
            .args(extra))
    };
    // A labels folder: refused, even with --overwrite, and left as it was.
    let labels = d.join("labels");
    std::fs::create_dir_all(&labels).unwrap();
    for f in ["img1.json", "img2.json", "NOTES.md"] {
        std::fs::write(labels.join(f), "{\"shapes\": []}").unwrap();
    }
    for extra in [&[][..], &["--overwrite"], &["--merge", "--overwrite"]] {
        let (ok, _, err) = export(&labels, extra);
        assert!(
            !ok && err.contains("not an earlier export") && err.contains("NOTES.md, img1.json, img2.json"),
            "{err}"
        );
        assert!(err.contains("even with --overwrite"), "{err}");
        assert_eq!(names_in(&labels), ["NOTES.md", "img1.json", "img2.json"]);
    }
    // An existing directory is written into: the same directory (inode) afterwards.
    let out = d.join("vol/out");
    std::fs::create_dir_all(&out).unwrap();
    #[cfg(unix)]
    let ino = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&out).unwrap());
    #[cfg(unix)]
    let before = ino();
    let (ok, stdout, err) = export(&out, &["--merge"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("merged"), "{stdout}");
    assert!(names_in(&out).contains(&"model.safetensors".to_string()), "{:?}", names_in(&out));
    assert!(names_in(&out).iter().all(|n| !n.starts_with('.')), "{:?}", names_in(&out));
    let (ok, _, err) = export(&out, &[]);
    assert!(!ok && err.contains("model.safetensors") && err.contains("--overwrite"), "{err}");
    let (ok, _, err) = export(&out, &["--overwrite"]);
    assert!(ok, "{err}");
    // The adapter export replaced the merged one: only its files are there.
    assert_eq!(names_in(&out), ["adapter_config.json", "adapter_model.safetensors"]);
    assert_eq!(names_in(&d.join("vol")), ["out"], "nothing left beside --out");
    #[cfg(unix)]
    assert_eq!(ino(), before, "--out was replaced, not written into");
    // An export beside a file of the user's is refused too.
    std::fs::write(out.join("NOTES.md"), "mine").unwrap();
    let (ok, _, err) = export(&out, &["--overwrite"]);
    assert!(!ok && err.contains("NOTES.md") && err.contains("earlier export and other files"), "{err}");
    assert!(out.join("NOTES.md").is_file() && out.join("adapter_model.safetensors").is_file());
    // Through a link: the files land where it points, the link stays.
    #[cfg(unix)]
    {
        let real = d.join("bigdisk/merged");
        std::fs::create_dir_all(&real).unwrap();
        let link = d.join("merged");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let (ok, _, err) = export(&link, &["--merge"]);
        assert!(ok, "{err}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(real.join("model.safetensors").is_file() && real.join("lorahost_merged.json").is_file());
    }
}

/// `forward --out` is checked before the model runs: a directory, or the --inputs file itself,
/// is refused with the fix; a good --out is written with no temporary file left beside it.
#[test]
fn forward_checks_out_before_running_and_leaves_no_temporary_file() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inputs = d.join("in.safetensors");
    let dev = Device::Cpu;
    let tensors = std::collections::HashMap::from([
        ("pixel_values".to_string(), Tensor::randn(0f32, 1.0, (1, 3, 112, 112), &dev).unwrap()),
        ("input_ids".to_string(), Tensor::new(&[[1i64, 5, 7, 2]], &dev).unwrap()),
        ("attention_mask".to_string(), Tensor::new(&[[1i64, 1, 1, 1]], &dev).unwrap()),
    ]);
    candle_core::safetensors::save(&tensors, &inputs).unwrap();
    let original = std::fs::read(&inputs).unwrap();
    let forward = |out: &std::path::Path| {
        run(lorahost()
            .args(["forward", "--model"])
            .arg(repo().join("examples/tiny_sam3"))
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(out))
    };
    let odir = d.join("odir");
    std::fs::create_dir_all(&odir).unwrap();
    let (ok, _, err) = forward(&odir);
    assert!(!ok && err.contains("is a directory") && err.contains("outputs.safetensors"), "{err}");
    assert!(!err.contains("forward in"), "refused only after running: {err}");
    for same in [inputs.clone(), d.join("sub/../in.safetensors")] {
        let (ok, _, err) = forward(&same);
        assert!(!ok && err.contains("is the --inputs file"), "{err}");
    }
    assert_eq!(std::fs::read(&inputs).unwrap(), original);
    let out = d.join("res/out.safetensors");
    let (ok, stdout, err) = forward(&out);
    assert!(ok, "{err}");
    assert!(stdout.contains("wrote"), "{stdout}");
    assert!(candle_core::safetensors::load(&out, &dev).unwrap().contains_key("pred_logits"));
    assert_eq!(names_in(&d.join("res")), ["out.safetensors"]);
    assert_eq!(names_in(d), ["in.safetensors", "odir", "res", "sub"]);
}
