//! LoRA adapters on the real SAM3 module tree: targeting, the no-op start, and gradients that
//! reach every adapter weight.

use candle_core::{DType, Device, Tensor};
use lorahost::lora::{Component, LoraConfig, LoraError, LoraSet};
use lorahost::sam3::model::{ForwardOptions, Sam3Inputs, Sam3Model};
use lorahost::sam3::vit_block::Checkpointing;
use std::path::Path;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam3/tiny_a")
}

fn inputs() -> Sam3Inputs {
    let i = candle_core::safetensors::load(fixture().join("inputs.safetensors"), &Device::Cpu).unwrap();
    Sam3Inputs {
        pixel_values: i["pixel_values"].clone(),
        input_ids: i["input_ids"].clone(),
        attention_mask: i["attention_mask"].clone(),
        input_boxes: Some(i["input_boxes"].clone()),
        input_boxes_labels: Some(i["input_boxes_labels"].clone()),
        prompt_keys: None,
    }
}

fn all_components() -> Vec<Component> {
    vec![
        Component::Vision,
        Component::Text,
        Component::Geometry,
        Component::DetrEncoder,
        Component::DetrDecoder,
        Component::MaskDecoder,
    ]
}

fn config(targets: &[&str], components: Vec<Component>) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        components,
        use_rslora: false,
    }
}

fn loss(o: &lorahost::sam3::model::Sam3Outputs) -> Tensor {
    let mut l = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (i, t) in [&o.all_logits, &o.all_boxes_cxcywh, &o.all_presence, &o.all_masks].into_iter().enumerate()
    {
        // Fixed, sign-alternating weights so no term cancels.
        let w = Tensor::arange(0f32, t.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, i as f64)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(t.shape())
            .unwrap();
        l = (l + (t * w).unwrap().sum_all().unwrap()).unwrap();
    }
    l
}

#[test]
fn adapters_start_as_a_no_op_and_every_weight_gets_a_gradient_after_one_step() {
    let dev = Device::Cpu;
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let before = model.forward(&inputs()).unwrap();
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2"];
    let set = LoraSet::attach(&mut model, &config(&targets, all_components()), &dev).unwrap();

    // Every component gets adapters; B = 0 so the model is unchanged.
    let table = set.component_table();
    assert_eq!(table.iter().map(|(c, _, _)| *c).collect::<Vec<_>>(), all_components());
    assert!(table.iter().all(|(_, m, p)| *m > 0 && *p > 0), "{table:?}");
    let after = model.forward(&inputs()).unwrap();
    let d = (&after.pred_masks - &before.pred_masks).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);

    // Step 1: only B can have a gradient (A's gradient goes through B = 0).
    let opts = ForwardOptions { train: false, dac: true };
    let grads = loss(&model.forward_with(&inputs(), opts).unwrap()).backward().unwrap();
    let norm = |t: &Tensor| t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    for (name, var) in set.vars() {
        if name.ends_with("lora_B.weight") {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(norm(g) > 0.0, "zero gradient for {name}");
            // One plain SGD step on B.
            var.set(&(var.as_tensor() - (g * 0.1).unwrap()).unwrap()).unwrap();
        }
    }
    // Step 2: every A and B receives a non-zero gradient.
    let grads = loss(&model.forward_with(&inputs(), opts).unwrap()).backward().unwrap();
    let missing: Vec<&String> = set
        .vars()
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).map(|g| norm(g) == 0.0).unwrap_or(true))
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} adapter weights got no gradient: {missing:?}",
        missing.len(),
        set.vars().len()
    );
    // PEFT names.
    assert!(set
        .vars()
        .keys()
        .any(|k| k == "base_model.model.detr_decoder.layers.0.self_attn.q_proj.lora_A.weight"));
}

#[test]
fn flags_and_patterns_select_modules() {
    let dev = Device::Cpu;
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    // The original trainer's names work: qkv -> q/k/v_proj of the ViT.
    let set = LoraSet::attach(&mut model, &config(&["qkv"], vec![Component::Vision]), &dev).unwrap();
    let layers = model.vision.backbone.layers.len();
    assert_eq!(set.modules.len(), 3 * layers);
    assert!(set.modules.iter().all(|(p, c, _, _)| *c == Component::Vision && p.contains("attention")));
    // Glob over full paths.
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let set =
        LoraSet::attach(&mut model, &config(&["detr_decoder.layers.*.mlp.fc1"], all_components()), &dev)
            .unwrap();
    assert_eq!(set.modules.len(), model.decoder.layers.len());
    // A config that matches nothing is an error naming the patterns.
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let e = LoraSet::attach(&mut model, &config(&["to_q"], all_components()), &dev).err().unwrap();
    assert!(matches!(e, LoraError::NoMatch { .. }));
    assert!(e.to_string().contains("to_q"), "{e}");
    // Text encoder off (the default): no adapter there.
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let comps: Vec<Component> = all_components().into_iter().filter(|c| *c != Component::Text).collect();
    let set = LoraSet::attach(&mut model, &config(&["q_proj"], comps), &dev).unwrap();
    assert!(set.modules.iter().all(|(p, _, _, _)| !p.starts_with("text_encoder")));
}

#[test]
fn adapters_round_trip_through_the_peft_format() {
    let dev = Device::Cpu;
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let cfg = config(&["q_proj", "v_proj", "fc1"], all_components());
    let set = LoraSet::attach(&mut model, &cfg, &dev).unwrap();
    // Give B non-zero values so the adapters change the output.
    for (name, v) in set.vars() {
        if name.ends_with("lora_B.weight") {
            v.set(&Tensor::randn(0f32, 0.2, v.shape(), &dev).unwrap()).unwrap();
        }
    }
    let want = model.forward(&inputs()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    set.save_peft(dir.path(), "facebook/sam3").unwrap();
    // For tools/check_peft_roundtrip.py (PEFT itself loading these adapters): keep a copy with
    // the transformers-semantics outputs it must reproduce.
    if let Some(keep) = std::env::var_os("LORAHOST_KEEP_PEFT_DIR") {
        let keep = std::path::PathBuf::from(keep);
        set.save_peft(&keep, "facebook/sam3").unwrap();
        let mut parity = model;
        parity.set_semantics(lorahost::sam3::model::Semantics::Transformers);
        let o = parity.forward(&inputs()).unwrap();
        let mut m = std::collections::HashMap::new();
        m.insert("pred_logits".to_string(), o.pred_logits);
        m.insert("pred_boxes".to_string(), o.pred_boxes);
        m.insert("pred_masks".to_string(), o.pred_masks);
        m.insert("presence_logits".to_string(), o.presence_logits);
        candle_core::safetensors::save(&m, keep.join("expected_outputs.safetensors")).unwrap();
    }
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    // The adapted modules exactly, as a regex PEFT full-matches (a list would suffix-match).
    let targets = cfg_json["target_modules"].as_str().unwrap();
    assert!(targets.starts_with("^(?:") && targets.ends_with(")$"), "{targets}");
    assert_eq!(targets.matches('|').count() + 1, set.modules.len());
    let first = &set.modules[0].0;
    assert!(targets.contains(&first.replace('.', "\\.")), "{targets}");

    // A fresh model with fresh adapters, loaded from disk, computes the same.
    let mut fresh = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let set2 = LoraSet::attach(&mut fresh, &cfg, &dev).unwrap();
    set2.load_peft(dir.path()).unwrap();
    let got = fresh.forward(&inputs()).unwrap();
    let d = (&got.pred_masks - &want.pred_masks).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);

    // PEFT's other key forms load the same: the adapter-name infix, Sam3VideoModel's level.
    let renamed = tempfile::tempdir().unwrap();
    let file = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &dev).unwrap();
    let other_keys: std::collections::HashMap<String, candle_core::Tensor> = file
        .into_iter()
        .map(|(k, t)| {
            let k = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.");
            (k.replacen("base_model.model.", "base_model.model.detector_model.", 1), t)
        })
        .collect();
    candle_core::safetensors::save(&other_keys, renamed.path().join("adapter_model.safetensors")).unwrap();
    std::fs::copy(dir.path().join("adapter_config.json"), renamed.path().join("adapter_config.json"))
        .unwrap();
    set2.load_peft(renamed.path()).unwrap();
    let again = fresh.forward(&inputs()).unwrap();
    let d = (&again.pred_masks - &want.pred_masks).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    // rsLoRA adapters loaded into plain LoRA ones (another scale) are a named mismatch.
    let mut c = cfg_json.clone();
    c["use_rslora"] = serde_json::json!(true);
    std::fs::write(renamed.path().join("adapter_config.json"), c.to_string()).unwrap();
    let e = set2.load_peft(renamed.path()).unwrap_err().to_string();
    assert!(
        e.contains("use_rslora: file has true, config has false") && e.contains("lora.use_rslora"),
        "{e}"
    );
    // Options that change what the weights mean are refused by name, not applied wrongly.
    for (key, value) in [
        ("alpha_pattern", serde_json::json!({"v_proj": 32})),
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("lora_only")),
    ] {
        let mut c = cfg_json.clone();
        c[key] = value;
        std::fs::write(renamed.path().join("adapter_config.json"), c.to_string()).unwrap();
        let e = set2.load_peft(renamed.path()).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("does not apply"), "{key}: {e}");
    }

    // Loading is strict: a different target set is refused with the differences listed.
    let mut other = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let set3 = LoraSet::attach(&mut other, &config(&["q_proj", "k_proj"], all_components()), &dev).unwrap();
    let e = set3.load_peft(dir.path()).unwrap_err().to_string();
    assert!(e.contains("missing") && e.contains("k_proj.lora_A.weight"), "{e}");
    assert!(e.contains("unexpected") && e.contains("v_proj.lora_B.weight"), "{e}");
}

/// One training forward + backward of the tiny model with adapters on every ViT, DETR and
/// text module (LoRA dropout `dropout`, the fixture's DETR residual dropout 0.1 on), the ViT
/// blocks keeping what `ckpt` says: the loss and every adapter's gradient, by name.
fn checkpoint_run(ckpt: Checkpointing, dropout: f64) -> (f32, Vec<(String, Tensor)>) {
    let dev = Device::Cpu;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"];
    let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
    let mut cfg = config(&targets, all_components());
    cfg.dropout = dropout;
    let set = LoraSet::attach_seeded(&mut model, &cfg, 7, &dev).unwrap();
    // B = 0 would leave every A without a gradient: give B values.
    for (name, var) in set.vars() {
        if name.ends_with("lora_B.weight") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            let v =
                Tensor::arange(0f32, (o * r) as f32, &dev).unwrap().affine(0.01, 0.0).unwrap().sin().unwrap();
            var.set(&v.reshape((o, r)).unwrap()).unwrap();
        }
    }
    model.set_vit_checkpointing(ckpt).unwrap();
    set.set_training(true);
    lorahost::rng::reseed(&[1, 2, 3]);
    let l = loss(&model.forward_with(&inputs(), ForwardOptions { train: true, dac: true }).unwrap());
    let mut grads = l.backward().unwrap();
    lorahost::sam3::recompute::merge_side_grads(&mut grads).unwrap();
    let gs: Vec<(String, Tensor)> = set
        .vars()
        .iter()
        .map(|(n, v)| {
            (n.clone(), grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}")).clone())
        })
        .collect();
    (l.to_scalar::<f32>().unwrap(), gs)
}

/// Every gradient of `a` within `tol` (relative to its largest entry) of `b`'s.
fn assert_grads_close(a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f32) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol * s.max(1e-6), "{n}: gradients differ by {d} (scale {s})");
    }
}

/// Loss and every adapter gradient with the ViT blocks checkpointed equal the plain graph's;
/// with dropout, the recomputation replays the first run's masks (two runs agree exactly).
#[test]
fn activation_checkpointing_gives_the_plain_gradients() {
    let (l_plain, g_plain) = checkpoint_run(Checkpointing::Off, 0.0);
    let (l_ckpt, g_ckpt) = checkpoint_run(Checkpointing::Full, 0.0);
    assert!((l_plain - l_ckpt).abs() <= 1e-5 * l_plain.abs().max(1.0), "{l_plain} vs {l_ckpt}");
    assert_grads_close(&g_plain, &g_ckpt, 1e-4);
    let vit = g_ckpt.iter().filter(|(n, _)| n.contains("vision_encoder")).count();
    assert!(vit > 0, "the ViT carries adapters");
    assert!(g_ckpt
        .iter()
        .all(|(_, g)| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0));
    // Dropout: deterministic and replayed.
    let (l1, g1) = checkpoint_run(Checkpointing::Full, 0.2);
    let (l2, g2) = checkpoint_run(Checkpointing::Full, 0.2);
    assert_eq!(l1, l2);
    assert_grads_close(&g1, &g2, 0.0);
}

/// With LoRA dropout and the DETR residual dropout on, checkpointing the ViT (whole blocks, or
/// fc1's outputs) draws the very masks the plain graph draws, in the ViT and downstream of it:
/// same loss, same gradients.
#[test]
fn activation_checkpointing_draws_the_plain_dropout_masks() {
    let (l_plain, g_plain) = checkpoint_run(Checkpointing::Off, 0.3);
    for c in [Checkpointing::Full, Checkpointing::Mlp] {
        let (l_ckpt, g_ckpt) = checkpoint_run(c, 0.3);
        // Bit for bit: the same masks, and the recomputation repeats the plain forward exactly.
        assert_eq!(l_plain, l_ckpt, "loss {l_plain} plain vs {l_ckpt} ({c:?})");
        assert_grads_close(&g_plain, &g_ckpt, 0.0);
    }
    // Dropout does act: the masks change the loss.
    let (l_nodrop, _) = checkpoint_run(Checkpointing::Off, 0.0);
    assert_ne!(l_plain, l_nodrop);
}

/// A rank-stabilized adapter made by PEFT (`use_rslora`: scale lora_alpha / √r) loads and
/// reproduces PEFT's outputs on the same inputs (fixture by tools/gen_peft_rslora_fixture.py);
/// read as plain LoRA (scale lora_alpha / r) it would not, so the comparison can fail. Saved
/// again by lorahost, the adapter still says use_rslora and loads the same.
#[test]
fn rslora_adapters_made_by_peft_reproduce_peft() {
    let dev = Device::Cpu;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_rslora");
    let want = candle_core::safetensors::load(dir.join("outputs.safetensors"), &dev).unwrap();
    let run = |adapter: &Path| {
        let mut model = Sam3Model::load_dir(&fixture(), &dev, DType::F32).unwrap();
        model.set_semantics(lorahost::sam3::model::Semantics::Transformers);
        let set = LoraSet::attach_peft(&mut model, adapter, &dev).unwrap();
        (model.forward(&inputs()).unwrap(), set)
    };
    let worst = |o: &lorahost::sam3::model::Sam3Outputs| {
        [
            ("pred_logits", &o.pred_logits),
            ("pred_boxes", &o.pred_boxes),
            ("presence_logits", &o.presence_logits),
            ("pred_masks", &o.pred_masks),
        ]
        .iter()
        .map(|(k, t)| {
            let d = (*t - &want[*k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want[*k].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            d / scale
        })
        .fold(0f32, f32::max)
    };
    let (out, set) = run(&dir);
    assert!(set.config.use_rslora && (set.config.scale() - 3.0).abs() < 1e-12, "6 / √4");
    let err = worst(&out);
    assert!(err < 1e-4, "relative error {err}");
    // The same weights as plain LoRA: a scale of 1.5 instead of 3, visibly other outputs.
    let plain = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("adapter_model.safetensors"), plain.path().join("adapter_model.safetensors"))
        .unwrap();
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::write(
        plain.path().join("adapter_config.json"),
        text.replace("\"use_rslora\": true", "\"use_rslora\": false"),
    )
    .unwrap();
    let (out_plain, _) = run(plain.path());
    assert!(worst(&out_plain) > 100.0 * err.max(1e-6), "the scale must matter: {}", worst(&out_plain));
    // Saved by lorahost: use_rslora recorded, the same outputs again.
    let again = tempfile::tempdir().unwrap();
    set.save_peft(again.path(), "facebook/sam3").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(worst(&run(again.path()).0), err);
}
