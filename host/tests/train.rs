//! `lorahost train` end to end on the tiny demo model (examples/tiny_sam3) and a small synthetic
//! dataset: the loss falls, resume is exact, a crash mid-save loses nothing, config keys act,
//! every LoRA weight gets a gradient through the real loss, exports round-trip.
mod common;

use candle_core::{DType, Device, Tensor};
use lorahost::data::synthetic::{write_synthetic, SyntheticSpec};
use lorahost::metrics::Trace;
use lorahost::train::{train, Resume, TrainOptions, TrainSummary};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A synthetic dataset in `dir/data` (8 train, 4 valid images of 112 px).
fn dataset(dir: &Path, train_images: usize) -> PathBuf {
    let data = dir.join("data");
    let spec = SyntheticSpec { seed: 3, train_images, valid_images: 4, size: 112, max_cracks: 2 };
    write_synthetic(&data, &spec).unwrap();
    data
}

/// A config: the tiny model, `data`, output `out`; `training` overrides keys of the training
/// section ("key: value" lines); `rest` is appended (other sections).
fn config(dir: &Path, data: &Path, out: &Path, training: &str, rest: &str) -> PathBuf {
    let mut keys: Vec<(String, String)> = [
        ("data_dir", data.display().to_string()),
        ("batch_size", "2".into()),
        ("gradient_accumulation_steps", "2".into()),
        ("num_epochs", "2".into()),
        ("learning_rate", "3e-3".into()),
        ("warmup_steps", "1".into()),
        ("num_negatives", "1".into()),
        ("num_workers", "1".into()),
        ("logging_steps", "1".into()),
        ("eval_steps", "0".into()),
        ("save_steps", "0".into()),
        ("seed", "5".into()),
        ("max_grad_norm", "1.0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for line in training.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line.trim().split_once(':').unwrap();
        let (k, v) = (k.trim().to_string(), v.trim().to_string());
        match keys.iter_mut().find(|(kk, _)| *kk == k) {
            Some(e) => e.1 = v,
            None => keys.push((k, v)),
        }
    }
    let training: String = keys.iter().map(|(k, v)| format!("  {k}: {v}\n")).collect();
    let text = format!(
        "model:\n  name: tiny\n  path: {model}\nlora:\n  rank: 4\n  alpha: 8\n  dropout: 0.1\n  \
         target_modules: [q_proj, v_proj, fc1, fc2]\ntraining:\n{training}output:\n  output_dir: {out}\n\
         hardware:\n  device: cpu\nevaluation:\n  metric: loss\n{rest}",
        model = common::repo().join("examples/tiny_sam3").display(),
        out = out.display(),
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = dir.join(format!("c{}.yaml", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
    std::fs::write(&path, text).unwrap();
    path
}

fn opts(cfg: &Path) -> TrainOptions {
    TrainOptions { config: cfg.into(), hot_reload: false, ..Default::default() }
}

fn run(o: &TrainOptions) -> TrainSummary {
    train(o).unwrap_or_else(|e| panic!("{e:#}"))
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, t)| {
            let u = &b[k];
            // Bitwise in their own dtype (moments f32, per-parameter step counts f64).
            let v = |t: &Tensor| -> Vec<f64> {
                t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
            };
            t.dtype() == u.dtype() && v(t) == v(u)
        })
}

fn steps(out: &Path) -> Trace {
    Trace::read(&out.join("metrics.jsonl")).unwrap()
}

#[test]
fn a_tiny_run_lowers_the_validation_loss_and_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 8);
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  num_epochs: 6\n  lr_scheduler: constant\n", "");
    let s = run(&opts(&cfg));
    let first = s.initial_validation_loss.unwrap();
    let last = s.final_validation.as_ref().unwrap().loss;
    assert!(last < first * 0.9, "validation loss {first} -> {last}");
    let trace = steps(&out);
    let header = trace.run.clone().unwrap();
    // 8 images / batch 2 = 4 micro-batches = 2 optimizer steps per epoch.
    assert_eq!((header.total_steps, header.steps_per_epoch, header.effective_batch_size), (12, 2, 4));
    assert_eq!(trace.steps.iter().map(|s| s.step).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    assert!(trace.steps.iter().all(|s| s.micro_steps == Some(2) && s.batch_size == Some(4)));
    for f in [
        "loss_curve.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "best/adapter_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(image::open(out.join("loss_curve.png")).is_ok());
    // The TensorBoard file: the same steps as metrics.jsonl, every validation, and pictures of
    // the validation predictions at each one (before training too).
    let events: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| lorahost::tfevents::is_event_file_name(p))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let tb = lorahost::tfevents::trace_from_event_files(&events, &out).unwrap();
    let f32s = |t: &Trace| t.steps.iter().map(|s| (s.step, s.loss as f32, s.lr as f32)).collect::<Vec<_>>();
    assert_eq!(f32s(&tb), f32s(&trace));
    assert_eq!(tb.validation.first().map(|v| v.0), Some(0));
    let bytes = std::fs::read(&events[0]).unwrap();
    let tag = b"val_images/";
    assert!(bytes.windows(tag.len()).filter(|w| w == tag).count() >= 2, "validation pictures");
}

#[test]
fn resume_from_a_mid_run_checkpoint_gives_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 8);
    let sampler = common::plugin("balanced_sampler");
    let plugin_yaml = format!("plugins:\n  - path: {}\n", sampler.display());
    // Uninterrupted: 4 steps, a checkpoint every step.
    let full = tmp.path().join("full");
    let cfg_a = config(
        tmp.path(),
        &data,
        &full,
        "  save_steps: 1\n  save_total_limit: 0\n  augment: {hflip: 0.5, vflip: 0.5, zoom_out: 0.5, brightness: 0.1, contrast: 0.1}\n",
        &plugin_yaml,
    );
    run(&opts(&cfg_a));
    // Interrupted: a fresh output dir holding only the step-2 checkpoint, resumed from there.
    let part = tmp.path().join("part");
    std::fs::create_dir_all(part.join("checkpoints")).unwrap();
    copy_dir(&full.join("checkpoints/step-00000002"), &part.join("checkpoints/step-00000002"));
    let cfg_b = config(
        tmp.path(),
        &data,
        &part,
        "  save_steps: 1\n  save_total_limit: 0\n  augment: {hflip: 0.5, vflip: 0.5, zoom_out: 0.5, brightness: 0.1, contrast: 0.1}\n",
        &plugin_yaml,
    );
    let s = run(&TrainOptions { resume: Some(Resume::Latest), ..opts(&cfg_b) });
    assert_eq!(s.steps, 4);
    assert!(
        same_tensors(&tensors(&full.join("adapter")), &tensors(&part.join("adapter"))),
        "resumed weights differ"
    );
    let (a, b) = (steps(&full), steps(&part));
    assert_eq!(a.steps[2].loss, b.steps.iter().find(|s| s.step == 3).unwrap().loss);
    // And the resumed run's checkpoint equals the uninterrupted one's (optimizer state too).
    let opt = |d: &Path| {
        candle_core::safetensors::load(
            d.join("checkpoints/step-00000004/optimizer.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    assert!(same_tensors(&opt(&full), &opt(&part)));

    // A damaged state: unreadable JSON names another checkpoint to resume from; a readable one
    // whose epoch order does not fit the dataset is refused too (not trained on).
    let broken = tmp.path().join("broken");
    for step in [1, 2] {
        let name = format!("checkpoints/step-0000000{step}");
        copy_dir(&full.join(&name), &broken.join(&name));
    }
    let state = broken.join("checkpoints/step-00000002/trainer_state.json");
    let good = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, "{ not json").unwrap();
    let cfg_c = config(tmp.path(), &data, &broken, "  save_steps: 1\n", &plugin_yaml);
    let resume = TrainOptions { resume: Some(Resume::Latest), ..opts(&cfg_c) };
    let e = format!("{:#}", train(&resume).unwrap_err());
    assert!(e.contains("damaged") && e.contains("step-00000001"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["epoch_order"] = serde_json::json!([999, 0, 1, 2, 3, 4, 5, 6]);
    std::fs::write(&state, v.to_string()).unwrap();
    let e = format!("{:#}", train(&resume).unwrap_err());
    assert!(e.contains("does not fit this run"), "{e}");

    // No checkpoint that holds its state (interrupted saves) in a folder that holds a run:
    // --resume refuses, naming them, and moves nothing; in an empty folder it starts the run.
    let stateless = tmp.path().join("stateless");
    copy_dir(&full.join("checkpoints/step-00000002"), &stateless.join("checkpoints/step-00000002"));
    std::fs::remove_file(stateless.join("checkpoints/step-00000002/trainer_state.json")).unwrap();
    let cfg_d = config(tmp.path(), &data, &stateless, "  save_steps: 1\n", &plugin_yaml);
    let e =
        format!("{:#}", train(&TrainOptions { resume: Some(Resume::Latest), ..opts(&cfg_d) }).unwrap_err());
    assert!(e.contains("no checkpoint it can continue from") && e.contains("step-00000002"), "{e}");
    assert!(stateless.join("checkpoints/step-00000002/adapter_model.safetensors").is_file());
    assert!(!stateless.join("previous-runs").exists());
    let fresh = tmp.path().join("fresh");
    let cfg_e = config(tmp.path(), &data, &fresh, "", &plugin_yaml);
    let s = run(&TrainOptions { resume: Some(Resume::Latest), max_steps: Some(1), ..opts(&cfg_e) });
    assert_eq!(s.steps, 1);
    // A start that fails (a plugin that does not load) leaves the earlier run where it was.
    let broken_plugin = tmp.path().join("not-a-plugin.wasm");
    std::fs::write(&broken_plugin, b"not wasm").unwrap();
    let with_broken =
        TrainOptions { plugins: vec![lorahost::plugin::PluginSpec::new(&broken_plugin)], ..opts(&cfg_e) };
    assert!(train(&with_broken).is_err());
    assert!(!fresh.join("previous-runs").exists() && fresh.join("metrics.jsonl").is_file());
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_crash_during_a_save_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  save_steps: 1\n  num_epochs: 3\n", "");
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--config"])
        .arg(&cfg)
        .env("LORAHOST_TEST_CRASH_DURING_SAVE", "state:2")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the run should have been killed mid-save");
    let ckpts = out.join("checkpoints");
    let names: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.contains("step-00000002.partial")), "{names:?}");
    assert!(!names.contains(&"step-00000002".to_string()), "{names:?}");
    // The previous checkpoint is complete and loads.
    let (state, _) = lorahost::train::checkpoint::load(&ckpts.join("step-00000001")).unwrap();
    assert_eq!(state.step, 1);
    // Resuming cleans up and finishes the run.
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--resume", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    assert_eq!(steps(&out).steps.last().unwrap().step, 3);
}

#[test]
fn every_lora_weight_gets_a_gradient_through_the_training_loss() {
    use lorahost::data::batch::{build_sample, collate, SampleOptions};
    use lorahost::lora::{LoraConfig, LoraSet};
    use lorahost::loss::LossWeights;
    use lorahost::sam3::model::Sam3Model;
    use lorahost::sam3::tokenizer::PromptTokenizer;
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 2);
    let split = lorahost::data::coco::Split::load(&data, "train").unwrap();
    let model_dir = common::repo().join("examples/tiny_sam3");
    let mut model = Sam3Model::load_dir(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let section = lorahost::train_config::LoraSection {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["*".into()],
        apply_to_text_encoder: true,
        ..Default::default()
    };
    let lora =
        LoraSet::attach_seeded(&mut model, &LoraConfig::from_section(&section), 1, &Device::Cpu).unwrap();
    // B starts at zero, so A's gradient is zero on the first step: take one plain SGD step on B.
    let tok = PromptTokenizer::from_dir(&model_dir).unwrap();
    let samples: Vec<_> =
        (0..2).map(|i| build_sample(&split, i, &SampleOptions::plain(112, 32, 1, 1)).unwrap()).collect();
    let batch = collate(&samples, 32, &Device::Cpu).unwrap();
    lora.set_training(true);
    // Every positive query also gets a box exemplar (training.box_prompt_prob = 1).
    let exemplar = vec![true; batch.queries.len()];
    let grads = |lora: &LoraSet| {
        let (l, _) =
            lorahost::train::batch_loss(&model, &batch, &tok, &LossWeights::default(), true, &exemplar)
                .unwrap();
        let g = l.total.backward().unwrap();
        lora.vars().iter().map(|(k, v)| (k.clone(), g.get(v.as_tensor()).cloned())).collect::<Vec<_>>()
    };
    for (k, g) in grads(&lora) {
        if let (true, Some(g)) = (k.ends_with("lora_B.weight"), g) {
            let v = &lora.vars()[&k];
            v.set(&(v.as_tensor() - (g * 1e-2).unwrap()).unwrap()).unwrap();
        }
    }
    let mut missing = Vec::new();
    let n = lora.vars().len();
    for (k, g) in grads(&lora) {
        let nonzero = g.map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        if nonzero != Some(true) {
            missing.push(k);
        }
    }
    assert!(n > 100, "only {n} LoRA tensors");
    assert!(missing.is_empty(), "{} of {n} LoRA weights got no gradient: {missing:?}", missing.len());
}

#[test]
fn exported_adapters_load_strictly_and_merge_into_equivalent_weights() {
    use lorahost::lora::{LoraConfig, LoraSet};
    use lorahost::sam3::model::{Sam3Inputs, Sam3Model};
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  num_epochs: 1\n", "");
    run(&opts(&cfg));
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let merged = tmp.path().join("merged");
    let o = Command::new(bin)
        .args(["export", "--merge", "--config"])
        .arg(&cfg)
        .arg("--adapter")
        .arg(out.join("adapter"))
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The adapted model and the merged model agree.
    let model_dir = common::repo().join("examples/tiny_sam3");
    let mut adapted = Sam3Model::load_dir(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let cfg_l = lorahost::train::load_config(&cfg, &[]).unwrap();
    let lora = LoraSet::attach(&mut adapted, &LoraConfig::from_section(&cfg_l.lora), &Device::Cpu).unwrap();
    lora.load_peft(&out.join("adapter")).unwrap();
    let plain = Sam3Model::load_dir(&merged, &Device::Cpu, DType::F32).unwrap();
    let tok = lorahost::sam3::tokenizer::PromptTokenizer::from_dir(&merged).unwrap();
    let (ids, mask) = tok.encode("crack", 16);
    let inputs = Sam3Inputs {
        pixel_values: Tensor::randn(0f32, 1.0, (1, 3, 112, 112), &Device::Cpu).unwrap(),
        input_ids: Tensor::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        attention_mask: Tensor::new(mask.iter().map(|&i| i as i64).collect::<Vec<_>>(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        input_boxes: None,
        input_boxes_labels: None,
        prompt_keys: None,
    };
    let a: Vec<f32> = adapted.forward(&inputs).unwrap().pred_logits.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = plain.forward(&inputs).unwrap().pred_logits.flatten_all().unwrap().to_vec1().unwrap();
    let base = Sam3Model::load_dir(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let c: Vec<f32> = base.forward(&inputs).unwrap().pred_logits.flatten_all().unwrap().to_vec1().unwrap();
    let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(diff(&a, &b) < 1e-3, "merged differs from adapted by {}", diff(&a, &b));
    assert!(diff(&a, &c) > 1e-3, "training changed nothing");
    // A mismatched LoRA layout is refused, naming what differs.
    let mut other = Sam3Model::load_dir(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let mut l8 = LoraConfig::from_section(&cfg_l.lora);
    l8.rank = 8;
    let wrong = LoraSet::attach(&mut other, &l8, &Device::Cpu).unwrap();
    let e = wrong.load_peft(&out.join("adapter")).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");

    // predict --adapter without --model: the base model comes from the run's config.yaml and
    // the detections are those of naming the model explicitly.
    let img = tmp.path().join("probe.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 120]))
        .save(&img)
        .unwrap();
    let predict = |model: Option<&Path>, adapter: &Path, to: &str| {
        let mut c = Command::new(bin);
        c.arg("predict");
        if let Some(m) = model {
            c.arg("--model").arg(m);
        }
        c.arg("--adapter").arg(adapter).arg("--image").arg(&img);
        c.args(["--prompt", "crack", "--threshold", "0", "--out"]).arg(tmp.path().join(to)).output().unwrap()
    };
    let o = predict(Some(&model_dir), &out.join("adapter"), "explicit");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = predict(None, &out.join("adapter"), "implied");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |d: &str| std::fs::read_to_string(tmp.path().join(d).join("detections.json")).unwrap();
    let (explicit, implied): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(&read("explicit")).unwrap(), serde_json::from_str(&read("implied")).unwrap());
    assert_eq!(explicit["detections"], implied["detections"]);
    // Adapters moved away from their run: the error says to give --model.
    let loose = tmp.path().join("loose");
    std::fs::create_dir_all(&loose).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(out.join("adapter").join(f), loose.join(f)).unwrap();
    }
    let o = predict(None, &loose, "none");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--model") && err.contains("config.yaml") && !err.contains("panicked"), "{err}");
}

#[test]
fn every_hook_answer_takes_effect_in_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 8);
    let steer = common::plugin("steer");
    let plugin = |cfg: &str| format!("plugins:\n  - path: {}\n    config: {cfg}\n", steer.display());
    // 8 images, batch 2, accumulation 2: 2 steps per epoch; 3 epochs = 6 steps, stopped at 4.
    let out = tmp.path().join("steered");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 3\n  warmup_steps: 0\n  lr_scheduler: constant\n",
        &plugin("{lr: 0.005, lr_from: 3, mask_factor: 2.0, veto_at: [2], skip_at: [3], stop_at: 4, reverse_epochs: true}"),
    );
    let s = run(&opts(&cfg));
    assert_eq!(s.steps, 4);
    assert!(s.stopped.as_deref().is_some_and(|r| r.contains("stop_at")), "{:?}", s.stopped);
    let t = steps(&out);
    let lrs: Vec<f64> = t.steps.iter().map(|s| s.lr).collect();
    assert_eq!(lrs, vec![3e-3, 3e-3, 0.005, 0.005], "LR hook from step 3");
    assert!(t.steps.iter().all(|s| s.loss_weights["loss_mask"] == 400.0), "loss-weight factor 2 on 200");
    let actions: Vec<&str> = t.steps.iter().map(|s| s.action.as_deref().unwrap()).collect();
    assert_eq!(actions, vec!["continue", "skip", "skip", "stop"], "veto at 2, skip at 3, stop at 4");
    // Each non-continue step names its plugin and the plugin's reason.
    let why: Vec<(Option<&str>, Option<&str>)> =
        t.steps.iter().map(|s| (s.decided_by.as_deref(), s.reason.as_deref())).collect();
    assert_eq!(
        why,
        vec![
            (None, None),
            (Some("steer"), Some("steer: veto_at")),
            (Some("steer"), Some("steer: skip_at")),
            (Some("steer"), Some("steer: stop_at"))
        ]
    );
    let last = &t.steps[3].extra;
    let calls = |k: &str| last[&format!("plugin.steer.{k}")].as_f64().unwrap();
    assert_eq!((calls("on_step"), calls("on_grads"), calls("lr")), (4.0, 4.0, 4.0));
    assert_eq!((calls("loss_weights"), calls("next_batch"), calls("observe")), (8.0, 8.0, 8.0));
    assert_eq!(calls("epoch_order"), 2.0);
    assert!(lorahost::train::checkpoint::list(&out.join("checkpoints")).iter().any(|(s, _)| *s == 4));

    // A skipped or vetoed only step leaves the adapters as they started (B = 0).
    for (i, answer) in ["{skip_at: [1]}", "{veto_at: [1]}"].iter().enumerate() {
        let out = tmp.path().join(format!("one{i}"));
        let cfg = config(tmp.path(), &data, &out, "  num_epochs: 1\n  batch_size: 4\n", &plugin(answer));
        run(&opts(&cfg));
        let b_sum: f32 = tensors(&out.join("adapter"))
            .iter()
            .filter(|(k, _)| k.ends_with("lora_B.weight"))
            .map(|(_, t)| t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sum();
        assert_eq!(b_sum, 0.0, "{answer}: the update was not undone");
    }

    // observe: each image's own loss, not its micro-batch's (a 2-image micro-batch at step 1).
    let out = tmp.path().join("observed");
    let cfg =
        config(tmp.path(), &data, &out, "  num_epochs: 1\n  gradient_accumulation_steps: 1\n", &plugin("{}"));
    run(&TrainOptions { max_steps: Some(1), ..opts(&cfg) });
    let ckpts = lorahost::train::checkpoint::list(&out.join("checkpoints"));
    let (state, _) = lorahost::train::checkpoint::load(&ckpts[0].1).unwrap();
    let seen: Vec<f64> = state.sample_stats.iter().filter_map(|(l, _)| *l).collect();
    assert_eq!(seen.len(), 2, "{:?}", state.sample_stats);
    assert!(seen.iter().all(|l| l.is_finite()) && seen[0] != seen[1], "{seen:?}");
    let step1 = steps(&out).steps[0].loss;
    assert!(
        seen.iter().all(|l| *l != step1),
        "the micro-batch's loss {step1} passed for each image: {seen:?}"
    );

    // next-batch: the same two images in every micro-batch.
    let out = tmp.path().join("fixed");
    let cfg = config(tmp.path(), &data, &out, "  num_epochs: 2\n", &plugin("{batch: [0, 1]}"));
    run(&opts(&cfg));
    let counts: Vec<u32> = steps(&out).steps.iter().map(|s| s.object_count.unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] == w[1]), "{counts:?}");
}

#[test]
fn a_non_finite_loss_skips_the_step_and_names_the_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("nan");
    let cfg = config(tmp.path(), &data, &out, "  num_epochs: 1\n", "loss:\n  loss_mask: 1e39\n");
    run(&opts(&cfg));
    let t = steps(&out);
    assert!(t.steps.iter().all(|s| s.action.as_deref() == Some("skip")), "{:?}", t.steps);
    assert!(
        t.steps.iter().all(|s| s.reason.as_deref() == Some("non-finite loss") && s.decided_by.is_none()),
        "{:?}",
        t.steps
    );
    let dump = std::fs::read_to_string(out.join("nonfinite_batches.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(dump.lines().next().unwrap()).unwrap();
    assert_eq!(first["image_ids"].as_array().unwrap().len(), 4, "{first}");
    // Ten in a row stop the run; the tenth step is recorded like the others.
    let out = tmp.path().join("nan10");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 12\n  batch_size: 4\n  gradient_accumulation_steps: 1\n",
        "loss:\n  loss_mask: 1e39\n",
    );
    let summary = run(&opts(&cfg));
    let why = summary.stopped.expect("the run stops");
    assert!(why.contains("10 non-finite steps in a row") && why.contains("loss weights"), "{why}");
    let recorded: Vec<u64> = steps(&out).steps.iter().map(|s| s.step).collect();
    assert_eq!(recorded, (1..=10).collect::<Vec<u64>>());
}

#[test]
fn validation_results_reach_the_plugins_and_early_stopping_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("early");
    let stopper = common::plugin("early_stopping");
    // Validation before training and after every step; no evaluation can beat the first (step
    // 0) by 1e9, so with patience 2 the evaluations at steps 1 and 2 are bad ones: step 3 sees
    // the second and stops.
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 5\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  eval_steps: 1\n",
        &format!(
            "plugins:\n  - path: {}\n    config: {{patience: 2, min_delta: 1.0e9}}\n",
            stopper.display()
        ),
    );
    let s = run(&opts(&cfg));
    assert_eq!(s.steps, 3, "{:?}", s.stopped);
    let why = s.stopped.unwrap();
    assert!(why.contains("early_stopping") && why.contains("validation.loss"), "{why}");
    let t = steps(&out);
    // Each step carries the latest validation: the previous step's (step 0: before training).
    let vals: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"event\":\"validation\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for s in &t.steps {
        let at = s.extra["validation.step"].as_f64().unwrap() as u64;
        assert_eq!(at, s.step - 1);
        let event = &vals[at as usize];
        assert_eq!(event["step"].as_u64(), Some(at), "{event}");
        assert_eq!(s.extra["validation.loss"].as_f64(), event["loss"].as_f64());
    }
    assert_eq!(t.steps[2].decided_by.as_deref(), Some("early_stopping"));
    assert_eq!(t.steps[2].extra["plugin.early_stopping.bad_evals"].as_f64(), Some(2.0));
}

/// Ctrl-C: the step in flight finishes, a checkpoint of it is saved, the run stops with status
/// 130, and `--resume` continues from there.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    // 4 images, batch 1, no accumulation: 4 steps per epoch, 50 epochs; no periodic saves.
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 50\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  save_steps: 100000\n  eval_steps: 100000\n",
        "",
    );
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let child = Command::new(bin)
        .args(["train", "--no-hot-reload", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for two recorded steps, then press Ctrl-C.
    let metrics = out.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let n = std::fs::read_to_string(&metrics).map(|t| t.matches("\"step\":").count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no steps recorded");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Twice at once, as GNU timeout or docker stop deliver it (to the process and its group):
    // one request, not a second Ctrl-C.
    for _ in 0..2 {
        let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: saving a checkpoint") && !err.contains("second interrupt"), "{err}");
    let at = steps(&out).steps.last().unwrap().step;
    assert!(at < 200, "stopped early");
    let ckpts = lorahost::train::checkpoint::list(&out.join("checkpoints"));
    assert_eq!(ckpts.last().map(|(s, _)| *s), Some(at), "{ckpts:?}");
    assert!(out.join("adapter").join("adapter_model.safetensors").is_file());
    // Resume continues from that step.
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--resume", "--max-steps"])
        .arg((at + 2).to_string())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = steps(&out);
    let resumed: Vec<u64> = t.steps.iter().map(|s| s.step).collect();
    assert_eq!(resumed, (1..=at + 2).collect::<Vec<u64>>());
}

/// Ctrl-C during a validation does not wait for it: the one before training stops the run
/// with nothing saved; a scheduled one is dropped, and the step it followed is saved.
#[cfg(unix)]
#[test]
fn ctrl_c_during_validation_stops_without_waiting_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let bin = env!("CARGO_BIN_EXE_lorahost");
    // 4 validation images at batch 1: batches 1-4 validate before training, 5-8 after step 2.
    let run = |name: &str, at_batch: u32| {
        let out = tmp.path().join(name);
        let cfg = config(
            tmp.path(),
            &data,
            &out,
            "  num_epochs: 3\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  eval_steps: 2\n  save_steps: 100\n",
            "",
        );
        let o = Command::new(bin)
            .args(["train", "--no-hot-reload", "--config"])
            .arg(&cfg)
            .env("LORAHOST_TEST_INTERRUPT_AT_VALIDATION_BATCH", at_batch.to_string())
            .output()
            .unwrap();
        (out, o.status.code(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (out, code, err) = run("before", 2);
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted during the validation before training"), "{err}");
    assert!(lorahost::train::checkpoint::list(&out.join("checkpoints")).is_empty());

    let (out, code, err) = run("during", 6);
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted during the validation of step 2"), "{err}");
    let ckpts = lorahost::train::checkpoint::list(&out.join("checkpoints"));
    assert_eq!(ckpts.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let validated: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "validation")
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(validated, [0], "the cut-short validation is not recorded");
}

/// `evaluate` loads adapters from disk and reproduces training's own validation of them, and
/// of the base model before training.
#[test]
fn evaluate_reproduces_the_validation_of_training() {
    use lorahost::train::evaluate::{evaluate, EvaluateOptions};
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 2\n",
        "  compute_metrics_during_training: true\n", // continues the evaluation section
    );
    let s = run(&opts(&cfg));
    let last = s.final_validation.unwrap();
    let opts =
        |adapter: Option<PathBuf>| EvaluateOptions { config: cfg.clone(), adapter, ..Default::default() };
    let trained = evaluate(&opts(Some(out.join("adapter")))).unwrap();
    assert_eq!(trained.split, "valid");
    assert_eq!(trained.images, 4);
    assert!((trained.loss - last.loss).abs() < 1e-9, "{} vs {}", trained.loss, last.loss);
    let (m, want) = (trained.metrics.unwrap(), last.summary.unwrap());
    assert_eq!((m.map, m.cgf1, m.queries), (want.map, want.cgf1, want.queries));
    // Per prompt: the pairs add up (prompts without ground truth, e.g. generic negatives,
    // counted apart), and mAP is the mean of the per-category APs (COCO).
    let negative_only: usize = trained.negative_only.values().map(|n| n.queries).sum();
    assert_eq!(trained.per_prompt.values().map(|p| p.queries).sum::<usize>() + negative_only, m.queries);
    let with_gt: Vec<f64> = trained.per_prompt.values().filter(|p| p.positives > 0).map(|p| p.map).collect();
    assert!((with_gt.iter().sum::<f64>() / with_gt.len() as f64 - m.map).abs() < 1e-12);
    // Pixel metrics: as training's validation gave them, over one pair per image and category
    // (crack and stain, present or absent), not over the generic-word negatives.
    let (p, want) = (trained.pixel.unwrap(), last.pixel.unwrap());
    assert_eq!(p, want);
    assert_eq!(p.pairs, trained.images * 2);
    assert!(p.pairs < m.queries);
    assert!(p.relaxed_f1 >= 0.0 && p.relaxed_f1 <= 1.0 && p.cldice >= 0.0 && p.cldice <= 1.0);
    let base = evaluate(&opts(None)).unwrap();
    assert!((base.loss - s.initial_validation_loss.unwrap()).abs() < 1e-9);
    assert!(base.loss != trained.loss);
    // A split that is not there is named with the ones that are.
    let e = evaluate(&EvaluateOptions { split: Some("test".into()), ..opts(None) }).unwrap_err().to_string();
    assert!(e.contains("no test split") && e.contains("train, valid"), "{e}");
    let e = evaluate(&EvaluateOptions { split: Some("validation".into()), ..opts(None) })
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean valid?"), "{e}");
    // --panels: the worst pairs, worst first; the two worst of all are the two drawn with a
    // count of two; the metrics are the same with or without pictures; files and index written.
    let all_dir = tmp.path().join("panels-all");
    let panels = |dir: &Path, n: usize| {
        evaluate(&EvaluateOptions {
            panels: Some(dir.to_path_buf()),
            panel_count: n,
            ..opts(Some(out.join("adapter")))
        })
        .unwrap()
    };
    let all = panels(&all_dir, 100);
    assert_eq!(all.loss, trained.loss);
    let positives = trained.per_prompt.values().map(|p| p.positives).sum::<usize>();
    assert_eq!(all.panels.len(), positives, "every pair with objects");
    assert!(all.panels.windows(2).all(|w| w[0].iou <= w[1].iou));
    let two_dir = tmp.path().join("panels-two");
    let two = panels(&two_dir, 2);
    let key = |p: &lorahost::train::evaluate::PanelRecord| (p.image_id, p.prompt.clone());
    assert_eq!(
        two.panels.iter().map(key).collect::<Vec<_>>(),
        all.panels[..2].iter().map(key).collect::<Vec<_>>()
    );
    for p in &two.panels {
        assert!(image::open(&p.file).is_ok(), "{}", p.file.display());
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(two_dir.join("panels.json")).unwrap()).unwrap();
    assert_eq!(index.as_array().unwrap().len(), 2);
    // Again into the same folder: the earlier pictures are replaced; a folder of other files is refused.
    let again = panels(&two_dir, 1);
    assert_eq!(std::fs::read_dir(&two_dir).unwrap().count(), 2, "one picture and the index");
    assert_eq!(again.panels.len(), 1);
    let e =
        evaluate(&EvaluateOptions { panels: Some(data.clone()), panel_count: 1, ..opts(None) }).unwrap_err();
    assert!(format!("{e:#}").contains("holds other files"), "{e:#}");
}

/// Resume after a change of settings: a batch or accumulation change is refused (the epoch
/// position is in micro-batches), others are said and recorded; the validation history and
/// the plugins' view of the latest validation survive; each checkpoint records its settings;
/// resuming an earlier checkpoint sets the later ones aside; resuming a complete run changes
/// nothing.
#[test]
fn resume_after_changes_is_checked_and_keeps_the_history() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let base = "  num_epochs: 3\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  save_steps: 2\n  eval_steps: 4\n";
    let cfg = config(tmp.path(), &data, &out, base, "");
    let first = train(&TrainOptions { max_steps: Some(6), ..opts(&cfg) }).unwrap();
    assert_eq!(first.steps, 6);
    let resume = |cfg: &Path, max: u64, from: lorahost::train::Resume| {
        train(&TrainOptions { max_steps: Some(max), resume: Some(from), ..opts(cfg) })
    };
    // Another batch size: refused, naming both.
    let other = config(tmp.path(), &data, &out, &format!("{base}  batch_size: 2\n"), "");
    let e = format!("{:#}", resume(&other, 8, Resume::Latest).unwrap_err());
    assert!(e.contains("batch_size 1") && e.contains("has 2 x 1"), "{e}");
    // Another LR: accepted; the new header is recorded, history and the latest validation kept.
    let lr = config(tmp.path(), &data, &out, &format!("{base}  learning_rate: 1e-3\n"), "");
    let s = resume(&lr, 8, Resume::Latest).unwrap();
    assert_eq!(s.steps, 8);
    assert_eq!(s.initial_validation_loss, first.initial_validation_loss, "the validation before training");
    let t = steps(&out);
    assert_eq!(t.run.unwrap().base_lr, 1e-3);
    let step7 = t.steps.iter().find(|s| s.step == 7).unwrap();
    assert_eq!(
        step7.extra["validation.step"].as_f64(),
        Some(6.0),
        "the validation of step 6 (the first run's last), from before the resume"
    );
    // Each checkpoint records the settings it was trained with, and the run its latest.
    let lr_of = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("config.yaml")).unwrap();
        serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap()["training"]["learning_rate"].as_f64()
    };
    assert_ne!(lr_of(&out.join("checkpoints/step-00000006")), Some(1e-3));
    assert_eq!(lr_of(&out.join("checkpoints/step-00000008")), Some(1e-3));
    assert_eq!(lr_of(&out), Some(1e-3));
    // Back to step 4: the later checkpoints are set aside, not resumed by a plain --resume.
    let ckpts = out.join("checkpoints");
    let s = resume(&lr, 5, Resume::Dir(ckpts.join("step-00000004"))).unwrap();
    assert_eq!(s.steps, 5);
    let kept: Vec<u64> = lorahost::train::checkpoint::list(&ckpts).into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept.last(), Some(&5), "{kept:?}");
    assert!(ckpts.join("abandoned-step-00000008").is_dir());
    // ... and so are the log records of steps 5-8 (resumed from step 4), beside the log.
    let set_aside = std::fs::read_to_string(out.join("metrics.abandoned-after-step-4.jsonl")).unwrap();
    let aside: Vec<u64> = set_aside
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_none())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(aside, [5, 6, 7, 8]);
    // Complete: nothing is trained, nothing rewritten.
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let s = resume(&lr, 5, Resume::Latest).unwrap();
    assert!(s.already_complete && s.steps == 5);
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
}

/// `--set` / `--plugin-config` and the limits reach the config's own plugins too (merged over
/// their YAML section), and the run's config.yaml records the settings as applied.
#[test]
fn command_line_plugin_settings_apply_to_the_configs_plugins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 2\n  batch_size: 1\n  gradient_accumulation_steps: 1\n",
        &format!(
            "plugins:\n  - path: {}\n    config: {{skip_at: [2], stop_at: 4}}\n",
            common::plugin("steer").display()
        ),
    );
    let overrides = lorahost::plugin::PluginOverrides {
        sections: [("steer".to_string(), serde_json::json!({"skip_at": [3]}))].into(),
        call_budget: Some(std::time::Duration::from_millis(500)),
        memory_bytes: None,
    };
    let s = run(&TrainOptions { plugin_overrides: overrides.clone(), ..opts(&cfg) });
    assert_eq!(s.steps, 4, "stop_at from the YAML section is kept");
    let actions: Vec<String> = steps(&out).steps.iter().map(|s| s.action.clone().unwrap()).collect();
    assert_eq!(actions, ["continue", "continue", "skip", "stop"], "skip_at from the command line wins");
    let rec: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(out.join("config.yaml")).unwrap()).unwrap();
    assert_eq!(rec["plugins"][0]["config"]["skip_at"][0].as_u64(), Some(3));
    assert_eq!(rec["plugins"][0]["budget_ms"].as_u64(), Some(500));
    // A section for a plugin the run does not load is refused, naming the ones it does.
    let typo = lorahost::plugin::PluginOverrides {
        sections: [("steeer".to_string(), serde_json::json!({}))].into(),
        ..overrides
    };
    let e = train(&TrainOptions { plugin_overrides: typo, ..opts(&cfg) }).unwrap_err().to_string();
    assert!(e.contains("steeer") && e.contains("plugins: steer"), "{e}");
}

/// scale-lr answers compound from step to step, but the LR used never passes the bound a
/// plugin's own LR has (10).
#[test]
fn compounding_scale_lr_is_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 2\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  warmup_steps: 0\n  lr_scheduler: constant\n  learning_rate: 1e-3\n",
        &format!("plugins:\n  - path: {}\n    config: {{scale_lr: 10.0}}\n", common::plugin("steer").display()),
    );
    run(&opts(&cfg));
    let lrs: Vec<f64> = steps(&out).steps.iter().map(|s| s.lr).collect();
    let want = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 10.0, 10.0, 10.0];
    assert_eq!(lrs.len(), want.len());
    for (got, want) in lrs.iter().zip(want) {
        assert!((got / want - 1.0).abs() < 1e-9, "{lrs:?}");
    }
}

/// A tokenizer.json with more tokens than the model's text vocabulary (another model's) is
/// refused before training, by name, rather than failing inside an embedding lookup.
#[test]
fn a_tokenizer_too_large_for_the_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 2);
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    // tiny_a has a 128-token text vocabulary; the demo tokenizer has more.
    let fixture = common::repo().join("host/tests/fixtures/sam3/tiny_a");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    std::fs::copy(common::repo().join("examples/tiny_sam3/tokenizer.json"), model.join("tokenizer.json"))
        .unwrap();
    let cfg = config(tmp.path(), &data, &tmp.path().join("run"), "", "");
    let o = TrainOptions { overrides: vec![format!("model.path={}", model.display())], ..opts(&cfg) };
    let e = format!("{:#}", train(&o).unwrap_err());
    assert!(e.contains("tokenizer") && e.contains("vocab_size"), "{e}");
}

/// A fresh run into a folder that holds an earlier run sets the earlier one aside (nothing
/// lost, nothing mixed): pruning, best/ and a later --resume see only the new run.
#[test]
fn a_fresh_run_sets_an_earlier_run_in_its_folder_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 2\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  save_steps: 1\n  save_total_limit: 2\n",
        "",
    );
    run(&TrainOptions { max_steps: Some(6), ..opts(&cfg) });
    run(&TrainOptions { max_steps: Some(3), ..opts(&cfg) });
    let kept: Vec<u64> =
        lorahost::train::checkpoint::list(&out.join("checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, [2, 3], "only the new run's checkpoints");
    let earlier = out.join("previous-runs/run-1");
    let old: Vec<u64> =
        lorahost::train::checkpoint::list(&earlier.join("checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(old, [5, 6]);
    let old_steps = lorahost::metrics::Trace::read(&earlier.join("metrics.jsonl")).unwrap().steps.len();
    assert_eq!((old_steps, steps(&out).steps.len()), (6, 3));
    // --resume continues the new run.
    let s = run(&TrainOptions { max_steps: Some(4), resume: Some(Resume::Latest), ..opts(&cfg) });
    assert_eq!(s.steps, 4);
    assert!(!out.join("previous-runs/run-2").exists(), "a resume sets nothing aside");
    // The TensorBoard files went with their runs: the earlier run's six steps in run-1, this
    // run's file and its resume's beside each other, read as one run of four steps.
    let event_files = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| lorahost::tfevents::is_event_file_name(p))
            .collect();
        v.sort();
        v
    };
    let tb = |d: &Path| lorahost::tfevents::trace_from_event_files(&event_files(d), d).unwrap();
    assert_eq!(tb(&earlier).steps.len(), 6);
    assert_eq!(event_files(&out).len(), 2);
    let resumed = tb(&out);
    assert_eq!(resumed.steps.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(
        resumed.steps.iter().map(|s| s.loss as f32).collect::<Vec<_>>(),
        steps(&out).steps.iter().map(|s| s.loss as f32).collect::<Vec<_>>()
    );
}

/// Setting an earlier run aside keeps a logging_dir's layout: `logs/metrics.jsonl` goes to
/// `run-N/logs/`, and a metrics log in the output folder itself is not overwritten by it.
#[test]
fn setting_aside_keeps_the_logging_dir_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 2);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 1\n  batch_size: 1\n  gradient_accumulation_steps: 1\n",
        "",
    );
    let with_logs = |max| TrainOptions {
        max_steps: Some(max),
        overrides: vec!["output.logging_dir=logs".into()],
        ..opts(&cfg)
    };
    run(&with_logs(2));
    let first = std::fs::read_to_string(out.join("logs/metrics.jsonl")).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"older\": true}\n").unwrap();
    run(&with_logs(1));
    let kept = out.join("previous-runs/run-1");
    assert_eq!(std::fs::read_to_string(kept.join("logs/metrics.jsonl")).unwrap(), first);
    assert_eq!(std::fs::read_to_string(kept.join("metrics.jsonl")).unwrap(), "{\"older\": true}\n");
    assert_eq!(steps(&out.join("logs")).steps.len(), 1);
}

/// A run's recorded config.yaml trained again into another output_dir logs into that folder,
/// and the recorded run keeps its log; a record naming the earlier run's logging_dir (as
/// records made before the fix did) is refused before anything of that run is touched.
#[test]
fn a_recorded_config_rerun_elsewhere_leaves_the_recorded_run_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 2);
    let a = tmp.path().join("a");
    let cfg = config(
        tmp.path(),
        &data,
        &a,
        "  num_epochs: 1\n  batch_size: 1\n  gradient_accumulation_steps: 1\n",
        "",
    );
    run(&TrainOptions {
        max_steps: Some(2),
        overrides: vec!["output.logging_dir=logs".into()],
        ..opts(&cfg)
    });
    let a_log = std::fs::read(a.join("logs/metrics.jsonl")).unwrap();
    let record = a.join("config.yaml");
    assert!(std::fs::read_to_string(&record).unwrap().contains("logging_dir: logs"));
    let b = tmp.path().join("b");
    let o = |out: &Path| TrainOptions {
        max_steps: Some(1),
        overrides: vec![format!("output.output_dir={}", out.display())],
        ..opts(&record)
    };
    run(&o(&b));
    assert_eq!(steps(&b.join("logs")).steps.len(), 1);
    assert!(!b.join("previous-runs").exists());
    assert_eq!(std::fs::read(a.join("logs/metrics.jsonl")).unwrap(), a_log);
    // An older record: logging_dir absolute, inside the recorded run.
    let text = std::fs::read_to_string(&record).unwrap();
    let old = tmp.path().join("old.yaml");
    std::fs::write(
        &old,
        text.replace("logging_dir: logs", &format!("logging_dir: {}", a.join("logs").display())),
    )
    .unwrap();
    let c = tmp.path().join("c");
    let e = train(&TrainOptions {
        max_steps: Some(1),
        overrides: vec![format!("output.output_dir={}", c.display())],
        ..opts(&old)
    })
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("another run's log") && e.contains("logging_dir"), "{e}");
    assert_eq!(std::fs::read(a.join("logs/metrics.jsonl")).unwrap(), a_log);
    assert!(!a.join("previous-runs").exists() && !c.join("previous-runs").exists());
}

/// A skip answered by one plugin rolls the update back even when another stops on that step.
#[test]
fn a_skip_beside_a_stop_still_rolls_the_update_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    // early_stopping stops at step 2 (the validation of step 1 cannot beat step 0's by 1e9);
    // steer skips step 2.
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 5\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  eval_steps: 1\n  save_steps: 1\n",
        &format!(
            "plugins:\n  - path: {}\n    config: {{skip_at: [2]}}\n  - path: {}\n    config: {{patience: 1, min_delta: 1.0e9}}\n",
            common::plugin("steer").display(),
            common::plugin("early_stopping").display()
        ),
    );
    let s = run(&opts(&cfg));
    assert_eq!(s.steps, 2, "{:?}", s.stopped);
    let after_1 = tensors(&out.join("checkpoints/step-00000001"));
    assert!(same_tensors(&tensors(&out.join("adapter")), &after_1), "step 2's update was not rolled back");
    assert_eq!(s.skipped_steps, 1);
}

/// A validation folder under another name than Roboflow's valid/ is named with the fix.
#[test]
fn a_val_folder_is_named_with_the_rename() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    std::fs::rename(data.join("valid"), data.join("val")).unwrap();
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  num_epochs: 1\n", "");
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["train", "--no-hot-reload", "--max-steps", "1", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("there is a val/ folder: rename it to valid/"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("trained 1 optimizer step ("));
}

/// A file named `previous-runs` in the output folder stops a new run before anything is
/// moved, with a message naming it.
#[test]
fn a_file_where_earlier_runs_go_is_named_and_nothing_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  num_epochs: 1\n", "");
    run(&opts(&cfg));
    std::fs::write(out.join("previous-runs"), b"notes").unwrap();
    let before: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    let e = format!("{:#}", train(&opts(&cfg)).unwrap_err());
    assert!(e.contains("previous-runs is a file") && e.contains("nothing was moved"), "{e}");
    let after: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before.len(), after.len());
    assert_eq!(std::fs::read(out.join("previous-runs")).unwrap(), b"notes");
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

/// With `synthetic: true`, a folder where train/'s annotation file belongs is reported as such
/// (with its fix), not written into (an OS error), and nothing is written beside it.
#[test]
fn synthetic_data_is_not_written_over_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("train/_annotations.coco.json")).unwrap();
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  synthetic: true\n", "");
    let e = format!("{:#}", train(&opts(&cfg)).unwrap_err());
    assert!(e.contains("a folder where the split's COCO JSON file belongs"), "{e}");
    assert!(!e.contains("os error"), "{e}");
    let entries: Vec<_> = std::fs::read_dir(data.join("train")).unwrap().collect();
    assert_eq!(entries.len(), 1, "nothing written beside the folder");
    assert!(!data.join("valid").exists());
}

/// `lorahost lr-find`: the LR rises exponentially step by step (checked against the formula),
/// the curve is read and written, nothing is validated
/// or saved, the config's plugins are not loaded, and an earlier run in the output folder is
/// left exactly as it was.
#[test]
fn lr_find_sweeps_the_lr_and_leaves_the_run_alone() {
    use lorahost::lr_find::{run as lr_find, LrFindOptions, LrRange};
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  batch_size: 1\n  gradient_accumulation_steps: 1\n",
        "plugins:\n  - path: /nonexistent/spike_guard.wasm\n",
    );
    // An earlier run in the output folder (its plugin removed from the config for it).
    let plain = config(tmp.path(), &data, &out, "  batch_size: 1\n  gradient_accumulation_steps: 1\n", "");
    run(&TrainOptions { max_steps: Some(2), ..opts(&plain) });
    let before: Vec<(PathBuf, Vec<u8>)> = ["metrics.jsonl", "run.json", "adapter/adapter_model.safetensors"]
        .iter()
        .map(|f| (out.join(f), std::fs::read(out.join(f)).unwrap()))
        .collect();
    let (start, end, n) = (1e-6, 10.0, 12u64);
    let r = lr_find(&LrFindOptions {
        config: cfg.clone(),
        overrides: vec![],
        range: LrRange::new(start, end, n).unwrap(),
        out: None,
        cache_dir: None,
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let dir = out.join("lr-find");
    assert_eq!(r.out, dir);
    let trace = steps(&dir);
    for s in &trace.steps {
        let want = start * (end / start).powf((s.step - 1) as f64 / (n - 1) as f64);
        assert!((s.lr / want - 1.0).abs() < 1e-9, "step {}: LR {} want {want}", s.step, s.lr);
    }
    // SAM3's loss is bounded enough that this tiny model need not diverge even at LR 10: the
    // sweep either ran to its end or stopped on divergence (DivergenceWatch's own tests).
    assert!(
        (r.steps == n && r.stopped.is_none())
            || (r.steps < n
                && r.stopped.as_deref().is_some_and(|w| w.contains("diverged") || w.contains("not finite"))),
        "{r:?}"
    );
    assert_eq!(trace.steps.len() as u64, r.steps);
    let sg = r.suggestion.as_ref().unwrap();
    assert_eq!(sg.points.len(), trace.steps.iter().take_while(|s| s.loss.is_finite()).count());
    for f in ["lr_find.json", "lr_find.png", "metrics.jsonl"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("lr_find.json")).unwrap()).unwrap();
    assert_eq!(json["steps"], r.steps);
    assert!(!dir.join("checkpoints").exists() && !dir.join("adapter").exists() && !dir.join("best").exists());
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(!text.contains("\"validation\""), "nothing validated");
    for (p, bytes) in before {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
    assert!(!out.join("previous-runs").exists());
    assert!(LrRange::new(1e-3, 1e-5, 100).is_err());
}

/// `lora.use_rslora: true` trains rank-stabilized adapters: the adapters written say so and load
/// with scale alpha / √rank.
#[test]
fn rslora_training_writes_rslora_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 2);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 1\n  batch_size: 1\n  gradient_accumulation_steps: 1\n",
        "",
    );
    run(&TrainOptions { overrides: vec!["lora.use_rslora=true".into()], ..opts(&cfg) });
    let adapter_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((adapter_cfg["use_rslora"].as_bool(), adapter_cfg["r"].as_u64()), (Some(true), Some(4)));
    let mut model = lorahost::sam3::model::Sam3Model::load_dir(
        &common::repo().join("examples/tiny_sam3"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let set = lorahost::lora::LoraSet::attach_peft(&mut model, &out.join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(set.config.scale(), 8.0 / 2.0, "alpha 8 / √4");
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["lora"]["use_rslora"], true);
}

/// The diagnosis during training: a run with every F10 cause planted (batch 1, no accumulation,
/// no warmup, no clipping, a constant LR) is told so at its first validation with enough steps,
/// as a `diagnosis` event in its log, each code once.
#[test]
fn a_noisy_run_is_diagnosed_while_it_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 5\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  warmup_steps: 0\n  lr_scheduler: constant\n  max_grad_norm: 0\n  eval_steps: 10\n",
        "",
    );
    run(&opts(&cfg));
    let events: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "diagnosis")
        .collect();
    let f10: Vec<&serde_json::Value> = events.iter().filter(|e| e["code"] == "F10").collect();
    assert_eq!(f10.len(), 1, "{events:?}");
    assert_eq!(f10[0]["step"], 10, "{events:?}");
    assert!(f10[0]["fix"].as_str().unwrap().contains("gradient_accumulation_steps"), "{:?}", f10[0]);
    let mut codes: Vec<&str> = events.iter().map(|e| e["code"].as_str().unwrap()).collect();
    let n = codes.len();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), n, "each code once: {events:?}");
}

/// The records of `out`'s log whose `event` is `name`.
fn events(out: &Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

/// A micro-batch that runs out of device memory (made to, on the CPU, by
/// LORAHOST_INJECT_OOM) is skipped and the run goes on; three in a row finish the step, save it
/// and stop with the fix and a failing exit status; the run then resumes with half the batch
/// and twice the accumulation (the same samples per step), where the epoch would have been.
#[test]
fn micro_batches_out_of_memory_are_skipped_then_stop_the_run_resumably() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 8);
    let out = tmp.path().join("run");
    // 8 images, batch 1 x 2: 4 steps per epoch.
    let base = "  num_epochs: 2\n  batch_size: 1\n  gradient_accumulation_steps: 2\n  save_steps: 1\n";
    let cfg = config(tmp.path(), &data, &out, base, "");
    let bin = env!("CARGO_BIN_EXE_lorahost");
    // Step 1: its second micro-batch; step 2: both. Three in a row.
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--config"])
        .arg(&cfg)
        .env("LORAHOST_INJECT_OOM", "1.1,2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("3 micro-batches in a row ran out of device memory")
            && err.contains("gradient_checkpointing"),
        "{err}"
    );
    let t = steps(&out);
    let done: Vec<(u64, Option<u32>, Option<String>)> =
        t.steps.iter().map(|s| (s.step, s.micro_steps, s.action.clone())).collect();
    assert_eq!(
        done,
        [(1, Some(1), Some("continue".to_string())), (2, Some(0), Some("stop".to_string()))],
        "step 1 trained on the micro-batch that fitted; step 2 on none"
    );
    assert!(t.steps[0].loss.is_finite() && t.steps[0].batch_size == Some(1));
    let oom: Vec<(u64, u64)> = events(&out, "out_of_memory")
        .iter()
        .map(|e| (e["step"].as_u64().unwrap(), e["micro_step"].as_u64().unwrap()))
        .collect();
    assert_eq!(oom, [(1, 1), (2, 0), (2, 1)]);
    let end = events(&out, "end");
    assert_eq!(end.last().unwrap()["reason"], "out_of_memory", "{end:?}");
    let ckpts = lorahost::train::checkpoint::list(&out.join("checkpoints"));
    assert_eq!(ckpts.last().map(|(s, _)| *s), Some(2), "{ckpts:?}");
    // doctor names it.
    let report = lorahost::doctor::diagnose_trace(&out).unwrap().to_text();
    assert!(
        report.contains("[F13]") && report.contains("3 micro-batch(es) ran out of device memory"),
        "{report}"
    );
    assert!(!report.contains("[F21]"), "a step that trained nothing is not a non-finite one: {report}");
    // Half the batch, twice the accumulation: resumed where the epoch was (step 2 of 4).
    let halved = config(
        tmp.path(),
        &data,
        &out,
        &format!("{base}  batch_size: 2\n  gradient_accumulation_steps: 1\n"),
        "",
    );
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--resume", "--max-steps", "5", "--config"])
        .arg(&halved)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("the same 2 samples per optimizer step"), "{err}");
    let t = steps(&out);
    let epochs: Vec<(u64, Option<u32>)> = t.steps.iter().map(|s| (s.step, s.epoch)).collect();
    assert_eq!(epochs, [(1, Some(0)), (2, Some(0)), (3, Some(0)), (4, Some(0)), (5, Some(1))]);
    assert!(t.steps[2..].iter().all(|s| s.batch_size == Some(2) && s.micro_steps == Some(1)));
    let sessions = events(&out, "session");
    let ends = events(&out, "end");
    assert_eq!((sessions.len(), ends.len()), (2, 2), "{sessions:?} {ends:?}");
    assert_eq!(ends[1]["reason"], "max_steps");
    assert_eq!(sessions[1]["step"], 2);
}

/// A run still training keeps its folder: another `train` there is refused, naming the
/// process. Killed outright (SIGKILL, as the OOM killer kills), it leaves no end record; doctor
/// and the next `train --resume` say the session ended without one, and the run continues.
#[cfg(target_os = "linux")]
#[test]
fn a_live_run_keeps_its_folder_and_a_killed_one_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let cfg = config(
        tmp.path(),
        &data,
        &out,
        "  num_epochs: 50\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  save_steps: 1\n  eval_steps: 100000\n",
        "",
    );
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let mut child = Command::new(bin)
        .args(["train", "--no-hot-reload", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while steps_in(&metrics) < 2 {
        assert!(std::time::Instant::now() < deadline, "no steps recorded");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A second run into the same folder: refused, and nothing of the first is moved.
    let o = Command::new(bin).args(["train", "--no-hot-reload", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("is in use") && err.contains(&format!("process {}", child.id())), "{err}");
    assert!(!out.join("previous-runs").exists());
    let report = lorahost::doctor::diagnose_trace(&out).unwrap().to_text();
    assert!(report.contains("[D13] info: the run is still going"), "{report}");
    // SIGKILL.
    child.kill().unwrap();
    child.wait().unwrap();
    let last = steps(&out).steps.last().unwrap().step;
    let report = lorahost::doctor::diagnose_trace(&out).unwrap().to_text();
    assert!(report.contains(&format!("ended without a record after step {last}")), "{report}");
    // (The OOM killer did not do it; unless some other process on the machine was OOM-killed
    // meanwhile, the counters say so.)
    assert!(report.contains("SIGKILL") || report.contains("OOM killer"), "{report}");
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--resume", "--max-steps"])
        .arg((last + 1).to_string())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("ended without a record"), "{err}");
    assert_eq!(steps(&out).steps.last().unwrap().step, last + 1);
    assert_eq!(events(&out, "end").last().unwrap()["reason"], "max_steps");
}

fn steps_in(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics)
        .map(|t| t.lines().filter(|l| l.starts_with("{\"step\":")).count())
        .unwrap_or(0)
}

/// A micro-batch of several images that runs out of device memory is skipped, and from the next
/// step on the micro-batches are halved and doubled in number: the same samples per optimizer
/// step, the epoch ending where it would have. The checkpoints record the smaller micro-batches,
/// and the config's own resume onto them.
#[test]
fn micro_batches_that_do_not_fit_are_made_smaller_for_the_same_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 12);
    let out = tmp.path().join("run");
    // 12 images, 2 x 2: 6 micro-batches and 3 optimizer steps per epoch.
    let base = "  num_epochs: 2\n  batch_size: 2\n  gradient_accumulation_steps: 2\n  save_steps: 1\n";
    let cfg = config(tmp.path(), &data, &out, base, "");
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--max-steps", "4", "--config"])
        .arg(&cfg)
        .env("LORAHOST_INJECT_OOM", "1.0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("micro-batches of 2 images do not fit on the device"), "{err}");
    assert!(err.contains("training.batch_size: 1, gradient_accumulation_steps: 4"), "{err}");
    let t = steps(&out);
    let seen: Vec<_> = t.steps.iter().map(|s| (s.step, s.epoch, s.micro_steps, s.batch_size)).collect();
    assert_eq!(
        seen,
        [
            (1, Some(0), Some(1), Some(2)),
            (2, Some(0), Some(4), Some(4)),
            (3, Some(0), Some(4), Some(4)),
            (4, Some(1), Some(4), Some(4))
        ]
    );
    let change = events(&out, "micro_batches");
    assert_eq!(
        (change.len(), &change[0]["batch_size"], &change[0]["accumulation"]),
        (1, &serde_json::json!(1), &serde_json::json!(4))
    );
    // The log's headers: the config's grouping for step 1 (the one that ran out), 1 x 4 after it.
    let segments: Vec<(u64, u32, u32)> =
        t.segments.iter().map(|s| (s.from_step, s.header.batch_size, s.header.accumulation)).collect();
    assert_eq!(segments, [(1, 2, 2), (2, 1, 4)]);
    let report = lorahost::doctor::diagnose_trace(&out).unwrap().to_text();
    assert!(report.contains("from step 2 on the run trained in micro-batches of 1 x 4"), "{report}");
    // The config's 2 x 2 resumes onto the checkpoint's 1 x 4 (the same product).
    let o = Command::new(bin)
        .args(["train", "--no-hot-reload", "--resume", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("where the checkpoint had 1 x 4"), "{err}");
    let t = steps(&out);
    let tail: Vec<(u64, Option<u32>, Option<u32>)> =
        t.steps[4..].iter().map(|s| (s.step, s.epoch, s.micro_steps)).collect();
    assert_eq!(tail, [(5, Some(1), Some(2)), (6, Some(1), Some(2))]);
}

/// Every file under `dir` (relative path -> bytes).
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A resume that is refused (another LoRA layout than the checkpoint's, or another run's
/// checkpoint into a folder holding a run) moves and cuts nothing: every checkpoint and the
/// metrics log stay byte for byte. Another run's checkpoint into an empty folder starts there.
#[test]
fn a_refused_resume_moves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let base = "  num_epochs: 2\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  save_steps: 2\n";
    let cfg = config(tmp.path(), &data, &out, base, "");
    assert_eq!(train(&TrainOptions { max_steps: Some(4), ..opts(&cfg) }).unwrap().steps, 4);
    let ckpts = out.join("checkpoints");
    assert!(ckpts.join("step-00000004").is_dir());
    let before = snapshot(&out);
    let from_2 = |overrides: &[&str]| TrainOptions {
        resume: Some(Resume::Dir(ckpts.join("step-00000002"))),
        max_steps: Some(6),
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        ..opts(&cfg)
    };
    for (change, says) in [
        ("lora.rank=2", "rank: file has 4, config has 2"),
        ("lora.target_modules=[q_proj, v_proj]", "unexpected"),
        ("lora.apply_to_mask_decoder=false", "unexpected"),
    ] {
        let e = format!("{:#}", train(&from_2(&[change])).unwrap_err());
        assert!(e.contains("nothing was moved") && e.contains(says), "{change}: {e}");
        assert!(snapshot(&out) == before, "{change}: the run's files changed");
    }
    // Another run's checkpoint (outside this run's checkpoints/): refused while this folder
    // holds a run, naming both folders.
    let other = tmp.path().join("other");
    copy_dir(&ckpts.join("step-00000002"), &other.join("checkpoints/step-00000002"));
    let foreign = TrainOptions {
        resume: Some(Resume::Dir(other.join("checkpoints/step-00000002"))),
        max_steps: Some(3),
        ..opts(&cfg)
    };
    let e = format!("{:#}", train(&foreign).unwrap_err());
    assert!(
        e.contains("not one of this run's")
            && e.contains(&other.canonicalize().unwrap().display().to_string())
            && e.contains(&out.display().to_string())
            && e.contains("Nothing was moved"),
        "{e}"
    );
    assert!(snapshot(&out) == before, "another run's checkpoint: the run's files changed");
    // ... and starts a run from it in a folder that holds none.
    let fresh = tmp.path().join("fresh");
    let cfg_fresh = config(tmp.path(), &data, &fresh, base, "");
    let s = train(&TrainOptions { config: cfg_fresh, ..foreign }).unwrap();
    assert_eq!(s.steps, 3);
    // The refused resumes left a plain --resume where the run was: at step 4.
    let s = train(&TrainOptions { resume: Some(Resume::Latest), max_steps: Some(5), ..opts(&cfg) }).unwrap();
    assert_eq!(s.steps, 5);
    assert!(!ckpts.join("abandoned-step-00000004").exists());
}

/// An optimizer update that leaves NaN/Inf in the adapters (rehearsed with
/// LORAHOST_INJECT_NAN_UPDATE) is undone and stops the run with an error naming the optimizer
/// settings: no NaN adapters are saved, and the images are not blamed.
#[test]
fn an_update_that_breaks_the_weights_stops_the_run_without_saving_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let out = tmp.path().join("run");
    let base = "  num_epochs: 2\n  batch_size: 1\n  gradient_accumulation_steps: 1\n  save_steps: 1\n";
    let cfg = config(tmp.path(), &data, &out, base, "");
    let o = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["train", "--no-hot-reload", "--config"])
        .arg(&cfg)
        .env("LORAHOST_INJECT_NAN_UPDATE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("turned LoRA weights NaN/Inf") && err.contains("training.adam_epsilon"), "{err}");
    assert!(!out.join("adapter").exists(), "no adapters written after the failed update");
    assert!(!out.join("nonfinite_batches.jsonl").exists(), "the images are not blamed");
    assert!(!out.join("checkpoints/step-00000002").exists());
    let t = steps(&out);
    let actions: Vec<(u64, Option<String>)> = t.steps.iter().map(|s| (s.step, s.action.clone())).collect();
    assert_eq!(actions, [(1, Some("continue".into())), (2, Some("skip".into()))]);
    let end = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(end.lines().last().unwrap().contains("\"reason\":\"error\""), "{end}");
    // The step-1 checkpoint, the one to resume from, holds finite adapters.
    for (k, t) in tensors(&out.join("checkpoints/step-00000001")) {
        let v: Vec<f32> = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{k}");
    }
}

/// `training.synthetic: true` never writes its dataset among a user's files.
#[test]
fn synthetic_data_is_not_written_into_a_folder_of_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mine");
    std::fs::create_dir_all(data.join("train")).unwrap();
    std::fs::write(data.join("train/IMG_0001.jpg"), b"\xff\xd8 not really").unwrap();
    let out = tmp.path().join("run");
    let cfg = config(tmp.path(), &data, &out, "  synthetic: true\n", "");
    let e = format!("{:#}", train(&opts(&cfg)).unwrap_err());
    assert!(
        e.contains("IMG_0001.jpg") && e.contains("training.synthetic") && e.contains("new folder"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(data.join("train")).unwrap().count(), 1, "nothing written beside it");
    assert!(!data.join("valid").exists());
    // An empty folder is filled.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = config(tmp.path(), &empty, &out, "  synthetic: true\n", "");
    assert!(train(&TrainOptions { max_steps: Some(1), ..opts(&cfg) }).is_ok());
    assert!(empty.join("train/_annotations.coco.json").is_file());
}

/// A relative output_dir is read from the working directory: `--resume` from another folder,
/// where it holds no run while the same path from the config's project does, is refused
/// naming both rather than silently starting a new run.
#[test]
fn resume_from_another_working_directory_names_the_run_it_would_miss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 4);
    let proj = tmp.path().join("proj");
    let cfgs = proj.join("configs");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&cfgs).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let base = "  num_epochs: 1\n  batch_size: 2\n  gradient_accumulation_steps: 1\n  save_steps: 1\n";
    let cfg = config(&cfgs, &data, Path::new("runs/x"), base, "");
    let bin = env!("CARGO_BIN_EXE_lorahost");
    let train_in = |dir: &Path, extra: &[&str]| {
        Command::new(bin)
            .current_dir(dir)
            .args(["train", "--no-hot-reload", "--max-steps", "1"])
            .args(extra)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let o = train_in(&proj, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(proj.join("runs/x/checkpoints/step-00000001").is_dir());
    let o = train_in(&elsewhere, &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let near = proj.canonicalize().unwrap().join("runs/x");
    assert!(
        err.contains("holds no run")
            && err.contains(&near.display().to_string())
            && err.contains("elsewhere"),
        "{err}"
    );
    assert!(!elsewhere.join("runs").exists(), "nothing written in the working directory");
}
