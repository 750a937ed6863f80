//! Every key of configs/full_lora_config.yaml has an observable effect: each is changed on its
//! own (through `--override`, on top of the shipped file pointed at the tiny model, a small
//! synthetic dataset and the CPU) and the run's outputs are compared with the baseline's.
mod common;

use candle_core::{Device, Tensor};
use lorahost::data::synthetic::{write_synthetic, SyntheticSpec};
use lorahost::metrics::{StepRecord, Trace};
use lorahost::train::{train, TrainOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn full_config() -> PathBuf {
    common::repo().join("configs/full_lora_config.yaml")
}

/// What a run left behind.
struct Outcome {
    out: PathBuf,
    steps: Vec<StepRecord>,
    header: lorahost::metrics::RunHeader,
    adapters: HashMap<String, Tensor>,
    adapter_config: serde_json::Value,
    events: Vec<serde_json::Value>,
    run: serde_json::Value,
}

struct Lab {
    dir: tempfile::TempDir,
    data: PathBuf,
    n: std::cell::Cell<usize>,
}

impl Lab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        write_synthetic(
            &data,
            &SyntheticSpec { seed: 9, train_images: 4, valid_images: 2, size: 112, max_cracks: 2 },
        )
        .unwrap();
        Lab { dir, data, n: std::cell::Cell::new(0) }
    }

    /// The shipped full config made runnable here, plus `extra` overrides.
    fn overrides(&self, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut o: Vec<String> = vec![
            format!("model.path={}", common::repo().join("examples/tiny_sam3").display()),
            format!("training.data_dir={}", self.data.display()),
            format!("output.output_dir={}", out.display()),
            "hardware.device=cpu".into(),
            "training.mixed_precision=no".into(),
            "training.num_epochs=2".into(),
            "training.batch_size=2".into(),
            "training.gradient_accumulation_steps=1".into(),
            "training.warmup_steps=2".into(),
            "training.num_negatives=1".into(),
            "training.learning_rate=1e-2".into(),
            "lora.rank=4".into(),
            "lora.alpha=8".into(),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        o
    }

    fn out(&self) -> PathBuf {
        let i = self.n.get();
        self.n.set(i + 1);
        self.dir.path().join(format!("run{i}"))
    }

    fn run(&self, extra: &[&str]) -> Outcome {
        let out = self.out();
        let opts = TrainOptions {
            config: full_config(),
            overrides: self.overrides(&out, extra),
            hot_reload: false,
            ..Default::default()
        };
        train(&opts).unwrap_or_else(|e| panic!("{extra:?}: {e:#}"));
        let log_dir = if out.join("logs/metrics.jsonl").is_file() { out.join("logs") } else { out.clone() };
        let trace = Trace::read(&log_dir.join("metrics.jsonl")).unwrap();
        let events = std::fs::read_to_string(log_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("event").is_some())
            .collect();
        let adapters =
            candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        let adapter_config =
            serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
        let run = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
        Outcome { out, steps: trace.steps, header: trace.run.unwrap(), adapters, adapter_config, events, run }
    }

    /// The CLI's exit status and stderr for a variant.
    fn cli(&self, extra: &[&str]) -> (bool, String) {
        let out = self.out();
        let mut c = Command::new(env!("CARGO_BIN_EXE_lorahost"));
        c.args(["train", "--no-hot-reload", "--config"]).arg(full_config());
        for o in self.overrides(&out, extra) {
            c.arg("--override").arg(o);
        }
        let o = c.env("LORAHOST_LOG", "info").output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn same_weights(a: &Outcome, b: &Outcome) -> bool {
    a.adapters.len() == b.adapters.len()
        && a.adapters.iter().all(|(k, t)| b.adapters.get(k).is_some_and(|u| values(t) == values(u)))
}

fn prefixes(o: &Outcome) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for k in o.adapters.keys() {
        let head = k.trim_start_matches("base_model.model.").split('.').next().unwrap().to_string();
        *m.entry(head).or_default() += 1;
    }
    m
}

fn lrs(o: &Outcome) -> Vec<f64> {
    o.steps.iter().map(|s| s.lr).collect()
}

#[test]
fn every_key_of_the_full_config_has_an_observable_effect() {
    // The list is the shipped file's keys: a key added there without a case here fails.
    let text = std::fs::read_to_string(full_config()).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut keys: Vec<String> = Vec::new();
    for (s, m) in doc.as_mapping().unwrap() {
        for (k, _) in m.as_mapping().unwrap() {
            keys.push(format!("{}.{}", s.as_str().unwrap(), k.as_str().unwrap()));
        }
    }
    let lab = Lab::new();
    let base = lab.run(&[]);
    assert_eq!(base.header.total_steps, 4);
    let mut checked: Vec<&str> = Vec::new();
    let mut check = |key: &'static str, ok: bool, what: &str| {
        assert!(ok, "{key}: {what}");
        checked.push(key);
    };

    // model.
    check(
        "model.name",
        base.adapter_config["base_model_name_or_path"] == "facebook/sam3",
        "recorded as the adapters' base",
    );
    {
        let cache = lab.dir.path().join("hub");
        let snap = cache.join("models--acme--tiny/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(common::repo().join("examples/tiny_sam3").join(f), snap.join(f)).unwrap();
        }
        let mut cfg = lorahost::train::load_config(&full_config(), &[]).unwrap();
        cfg.model.name = "acme/tiny".into();
        cfg.model.cache_dir = Some(cache.clone());
        check(
            "model.cache_dir",
            lorahost::train::resolve_model(&cfg).unwrap() == snap,
            "found the model in the cache",
        );
    }

    // lora.
    let r8 = lab.run(&["lora.rank=8", "lora.alpha=16"]);
    let a_shape =
        |o: &Outcome| o.adapters.iter().find(|(k, _)| k.ends_with("lora_A.weight")).unwrap().1.dims()[0];
    check("lora.rank", a_shape(&base) == 4 && a_shape(&r8) == 8, "adapter rank");
    let alpha = lab.run(&["lora.alpha=32"]);
    check(
        "lora.alpha",
        alpha.adapter_config["lora_alpha"] == 32.0 && !same_weights(&alpha, &base),
        "scale alpha/r",
    );
    let drop0 = lab.run(&["lora.dropout=0.0"]);
    check("lora.dropout", drop0.steps[1].loss != base.steps[1].loss, "dropout changes the trained path");
    let targets = lab.run(&["lora.target_modules=[fc1]"]);
    check(
        "lora.target_modules",
        targets.adapters.keys().all(|k| k.contains(".fc1.")) && targets.adapters.len() < base.adapters.len(),
        "only fc1 adapted",
    );
    let comps = [
        ("lora.apply_to_vision_encoder", "vision_encoder", "false"),
        ("lora.apply_to_text_encoder", "text_encoder", "true"),
        ("lora.apply_to_geometry_encoder", "geometry_encoder", "false"),
        ("lora.apply_to_detr_encoder", "detr_encoder", "false"),
        ("lora.apply_to_detr_decoder", "detr_decoder", "false"),
        ("lora.apply_to_mask_decoder", "mask_decoder", "false"),
    ];
    for (key, prefix, value) in comps {
        let o = lab.run(&[&format!("{key}={value}")]);
        let (before, after) = (prefixes(&base).contains_key(prefix), prefixes(&o).contains_key(prefix));
        check(key, before != after, &format!("{prefix} adapters {before} -> {after}"));
    }

    // training.
    let other = lab.dir.path().join("data8");
    write_synthetic(
        &other,
        &SyntheticSpec { seed: 1, train_images: 8, valid_images: 2, size: 112, max_cracks: 1 },
    )
    .unwrap();
    let d = lab.run(&[&format!("training.data_dir={}", other.display())]);
    check("training.data_dir", d.header.dataset_size == 8 && base.header.dataset_size == 4, "dataset size");
    let neg = lab.run(&["training.num_negatives=0"]);
    check(
        "training.num_negatives",
        neg.steps[0].loss != base.steps[0].loss,
        "hard negatives change the batch",
    );
    let bs = lab.run(&["training.batch_size=4"]);
    check(
        "training.batch_size",
        bs.steps[0].batch_size == Some(4) && base.steps[0].batch_size == Some(2),
        "images per step",
    );
    let lr = lab.run(&["training.learning_rate=2e-2"]);
    check("training.learning_rate", (lrs(&lr)[1] - 2.0 * lrs(&base)[1]).abs() < 1e-12, "peak LR");
    let wd = lab.run(&["training.weight_decay=0.5"]);
    check("training.weight_decay", !same_weights(&wd, &base), "decayed weights");
    for key in ["training.adam_beta1=0.5", "training.adam_beta2=0.9", "training.adam_epsilon=1e-2"] {
        let o = lab.run(&[key]);
        let name: &'static str = Box::leak(key.split('=').next().unwrap().to_string().into_boxed_str());
        check(name, !same_weights(&o, &base), "different update");
    }
    let clip = lab.run(&["training.max_grad_norm=1e-3"]);
    check(
        "training.max_grad_norm",
        clip.steps.iter().all(|s| s.grad_norm_clipped.unwrap() <= 1.0001e-3 && s.grad_norm > 1e-3),
        "clipped norms logged",
    );
    let ep = lab.run(&["training.num_epochs=3"]);
    check("training.num_epochs", ep.header.total_steps == 6, "total steps");
    let wu = lab.run(&["training.warmup_steps=0"]);
    check(
        "training.warmup_steps",
        lrs(&base)[0] == 0.5e-2 && lrs(&wu)[0] == 1e-2,
        "LR ramps over warmup steps",
    );
    let sched = lab.run(&["training.lr_scheduler=constant"]);
    check(
        "training.lr_scheduler",
        lrs(&sched)[3] == 1e-2 && lrs(&base)[3] < 1e-2,
        &format!("constant {:?} vs cosine {:?}", lrs(&sched), lrs(&base)),
    );
    let (_, log1) = lab.cli(&["training.logging_steps=1"]);
    let (_, log4) = lab.cli(&["training.logging_steps=4"]);
    let lines = |s: &str| s.lines().filter(|l| l.contains(" grad_norm ")).count();
    check("training.logging_steps", lines(&log1) == 4 && lines(&log4) == 1, "progress log lines");
    let ev = lab.run(&["training.eval_steps=1"]);
    let vals = |o: &Outcome| o.events.iter().filter(|e| e["event"] == "validation").count();
    check(
        "training.eval_steps",
        vals(&ev) == 5 && vals(&base) == 2,
        "validation cadence (plus the step-0 baseline)",
    );
    let ckpts = |o: &Outcome| lorahost::train::checkpoint::list(&o.out.join("checkpoints")).len();
    let sv = lab.run(&["training.save_steps=1", "training.save_total_limit=0"]);
    check("training.save_steps", ckpts(&sv) == 4, "a checkpoint every step");
    let lim = lab.run(&["training.save_steps=1", "training.save_total_limit=2"]);
    check("training.save_total_limit", ckpts(&lim) == 2, "old checkpoints pruned");
    let (ok, err) = lab.cli(&["training.mixed_precision=bf16"]);
    check(
        "training.mixed_precision",
        !ok && err.contains("mixed_precision"),
        "bf16 on the CPU is refused by name",
    );
    let seed = lab.run(&["training.seed=7"]);
    check(
        "training.seed",
        !same_weights(&seed, &base) && same_weights(&lab.run(&[]), &base),
        "seeded and reproducible",
    );
    let acc = lab.run(&["training.gradient_accumulation_steps=2"]);
    check(
        "training.gradient_accumulation_steps",
        acc.steps[0].micro_steps == Some(2) && acc.header.total_steps == 2,
        "micro-batches per step",
    );
    let (_, w1) = lab.cli(&["training.num_workers=1"]);
    let (_, w3) = lab.cli(&["training.num_workers=3"]);
    check(
        "training.num_workers",
        w1.contains("1 loader thread") && w3.contains("3 loader thread"),
        "loader threads",
    );

    // output.
    check("output.output_dir", base.out.join("adapter").is_dir(), "outputs land there");
    check("output.logging_dir", base.out.join("logs/metrics.jsonl").is_file(), "metrics in logging_dir");
    let event_files = |o: &Outcome| {
        std::fs::read_dir(o.out.join("logs"))
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().contains("tfevents")).count())
            .unwrap_or(0)
    };
    let no_tb = lab.run(&["output.report_to=none"]);
    check(
        "output.report_to",
        event_files(&base) == 1 && event_files(&no_tb) == 0,
        "TensorBoard files in logging_dir unless none",
    );
    let merged = lab.run(&["output.save_lora_only=false"]);
    check(
        "output.save_lora_only",
        merged.out.join("merged/model.safetensors").is_file() && !base.out.join("merged").exists(),
        "merged weights",
    );
    let (ok, err) = lab.cli(&["output.push_to_hub=true"]);
    check("output.push_to_hub", !ok && err.contains("push_to_hub"), "refused by name");
    let hub = lab.run(&["output.hub_model_id=acme/cracks"]);
    check("output.hub_model_id", hub.run["hub_model_id"] == "acme/cracks", "recorded in run.json");

    // evaluation.
    let m = lab.run(&["evaluation.metric=loss"]);
    let cl = lab.run(&["evaluation.metric=cldice"]);
    // The best by clDice is a validation with the highest clDice.
    let cldice_best = cl.run["best"]["value"].as_f64().unwrap();
    let cldices: Vec<f64> = cl
        .events
        .iter()
        .filter(|e| e["event"] == "validation")
        .filter_map(|e| e["pixel"]["cldice"].as_f64())
        .collect();
    check(
        "evaluation.metric",
        m.run["best"]["metric"] == "loss"
            && base.run["best"]["metric"] == "map"
            && cl.run["best"]["metric"] == "cldice"
            && !cldices.is_empty()
            && cldices.iter().all(|c| *c <= cldice_best),
        "best-checkpoint metric (iou = mask mAP; pixel metrics too)",
    );
    let sp = lab.run(&["evaluation.save_predictions=true"]);
    check(
        "evaluation.save_predictions",
        sp.out.join("predictions.json").is_file() && !base.out.join("predictions.json").exists(),
        "predictions file",
    );
    let nm = lab.run(&[
        "evaluation.compute_metrics_during_training=false",
        "evaluation.metric=loss",
        "training.eval_steps=1",
    ]);
    let with_metrics = |o: &Outcome| {
        o.events.iter().filter(|e| e["event"] == "validation" && !e["metrics"].is_null()).count()
    };
    check(
        "evaluation.compute_metrics_during_training",
        with_metrics(&nm) == 1 && with_metrics(&ev) == 4,
        "metrics only at the end",
    );

    // hardware.
    let (ok, err) = lab.cli(&["hardware.device=cuda"]);
    let cuda_ok = candle_core::utils::cuda_is_available();
    check(
        "hardware.device",
        cuda_ok || (!ok && err.contains("hardware.device")),
        "cuda without a CUDA build is refused by name",
    );
    let (_, pin) = lab.cli(&["hardware.dataloader_pin_memory=true"]);
    let (_, nopin) = lab.cli(&["hardware.dataloader_pin_memory=false"]);
    check(
        "hardware.dataloader_pin_memory",
        pin.contains("dataloader_pin_memory") && !nopin.contains("dataloader_pin_memory"),
        "how batches reach the device is reported",
    );
    let (_, comp) = lab.cli(&["hardware.use_compile=true"]);
    check("hardware.use_compile", comp.contains("use_compile"), "warned as ignored");

    let missing: Vec<&String> = keys.iter().filter(|k| !checked.contains(&k.as_str())).collect();
    assert!(missing.is_empty(), "keys of full_lora_config.yaml without a check: {missing:?}");
}
