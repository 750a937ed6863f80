#!/usr/bin/env python3
"""Measure peak memory of real training steps and compare with `lorahost doctor`'s estimate.

Needs: pip install torch transformers safetensors (to write random tiny SAM3 checkpoints), a release build
(`cargo build --release`). Run: python3 tools/measure_memory.py [--out DIR]

For each case (image size, widths, batch, negatives) it writes a random SAM3 checkpoint of that shape, a
config on the synthetic dataset, runs `lorahost train --max-steps 2` (peak resident memory, VmHWM, is in
metrics.jsonl as memory_bytes) and `lorahost doctor --json` (facts.memory), and prints one row per case:
measured MiB, estimated MiB, error %. The numbers go to BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch
from transformers import Sam3Config, Sam3Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "lorahost")

CASES = [
    # name, image, vit hidden, vit mlp, vit layers, detr hidden, queries, batch, negatives
    ("s224-b1", 224, 32, 64, 2, 32, 16, 1, 1),
    ("s224-b4", 224, 32, 64, 2, 32, 16, 4, 1),
    ("s224-q64", 224, 32, 64, 2, 32, 64, 2, 1),
    ("s336-b2", 336, 48, 96, 2, 32, 32, 2, 1),
    ("s336-wide", 336, 96, 384, 4, 32, 16, 1, 0),
    ("s448-b1", 448, 32, 64, 2, 32, 16, 1, 0),
    ("s448-b2", 448, 64, 128, 3, 64, 32, 2, 1),
    ("s448-d96", 448, 32, 64, 2, 96, 16, 1, 2),
    ("s560-b2", 560, 32, 64, 2, 32, 32, 2, 2),
    ("s672-b1", 672, 32, 64, 2, 32, 16, 1, 1),
]


def model_dir(base_cfg, tok, out, image, vh, vm, vl, dh, q):
    cfg = json.loads(json.dumps(base_cfg))
    b = cfg["vision_config"]["backbone_config"]
    b.update(image_size=image, hidden_size=vh, intermediate_size=vm, num_hidden_layers=vl,
             global_attn_indexes=[vl - 1], window_size=8, pretrain_image_size=224)
    g = image // 14
    cfg["vision_config"]["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
    for k in ("detr_encoder_config", "detr_decoder_config", "geometry_encoder_config"):
        cfg[k]["hidden_size"] = dh
        cfg[k]["intermediate_size"] = 2 * dh
    cfg["detr_decoder_config"]["num_queries"] = q
    cfg["mask_decoder_config"]["hidden_size"] = dh
    cfg["vision_config"]["fpn_hidden_size"] = dh
    cfg["text_config"]["projection_dim"] = dh
    cfg["text_config"]["vocab_size"] = len(tok["model"]["vocab"]) + len(tok.get("added_tokens") or [])
    torch.manual_seed(0)
    config = Sam3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type")})
    Sam3Model(config).save_pretrained(out, safe_serialization=True)
    shutil.copy(os.path.join(ROOT, "examples/tiny_sam3/tokenizer.json"), os.path.join(out, "tokenizer.json"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "memory"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    base_cfg = json.load(open(os.path.join(ROOT, "examples/tiny_sam3/config.json")))
    tok = json.load(open(os.path.join(ROOT, "examples/tiny_sam3/tokenizer.json")))
    rows = []
    fits = []
    for name, image, vh, vm, vl, dh, q, batch, neg in CASES:
        d = os.path.join(a.out, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        model_dir(base_cfg, tok, os.path.join(d, "model"), image, vh, vm, vl, dh, q)
        cfg = os.path.join(d, "c.yaml")
        with open(cfg, "w") as f:
            f.write(f"""model:
  name: m
  path: {d}/model
lora:
  rank: 8
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj, fc1, fc2]
training:
  data_dir: {a.out}/data
  synthetic: true
  batch_size: {batch}
  gradient_accumulation_steps: 1
  num_negatives: {neg}
  num_workers: 1
  num_epochs: 1
  warmup_steps: 1
  eval_steps: 1000
  save_steps: 1000
output:
  output_dir: {d}/run
hardware:
  device: cpu
""")
        subprocess.run([BIN, "train", "--no-hot-reload", "--max-steps", "2", "--config", cfg], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        steps = [json.loads(l) for l in open(os.path.join(d, "run", "metrics.jsonl")) if '"step"' in l and '"event"' not in l]
        measured = max(s["memory_bytes"] for s in steps)
        doc = json.loads(subprocess.run([BIN, "doctor", "--json", "--config", cfg], capture_output=True, text=True).stdout)
        est = doc["facts"]["memory"]["estimate_bytes"]
        err = (est["total"] - measured) / measured * 100
        rows.append((name, measured / 2**20, est["total"] / 2**20, est["activations"] / 2**20, err))
        fits.append((measured - est["weights"] - est["frozen_grads"] - est["lora_state"], doc["facts"]["memory"]["features"]))
        print(f"{name:10s} measured {measured / 2**20:8.1f} MiB  estimate {est['total'] / 2**20:8.1f} MiB "
              f"(activations {est['activations'] / 2**20:7.1f})  error {err:+6.1f}%", flush=True)
    worst = max(abs(r[4]) for r in rows)
    print(f"worst error {worst:.1f}%")
    json.dump(fits, open(os.path.join(a.out, "fit.json"), "w"))
    fit(fits)


def fit(fits):
    """Least-squares multipliers (bytes/4 per element of each kind) and base, with leave-one-out errors."""
    import numpy as np
    keys = ["token_width", "token_mlp", "scores", "maps", "mask_logits"]
    X = np.array([[1.0] + [4.0 * f[k] for k in keys] for _, f in fits])
    y = np.array([m for m, _ in fits], dtype=float)
    coef, *_ = np.linalg.lstsq(X / y[:, None], np.ones(len(y)), rcond=None)  # relative error
    print("fit: base %.1f MiB, " % (coef[0] / 2**20) + ", ".join(f"{k} {c:.2f}" for k, c in zip(keys, coef[1:])))
    for i in range(len(y)):
        m = np.ones(len(y), bool)
        m[i] = False
        c, *_ = np.linalg.lstsq(X[m] / y[m, None], np.ones(m.sum()), rcond=None)
        print(f"  leave-one-out {i}: error {(X[i] @ c - y[i]) / y[i] * 100:+.1f}%")


if __name__ == "__main__":
    main()
