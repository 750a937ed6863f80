#!/usr/bin/env python3
"""Measure peak memory of real training steps and compare with `lorahost doctor`'s memory model.

Needs: pip install torch transformers safetensors (to write random tiny SAM3 checkpoints), a release build
(`cargo build --release`). Run: python3 tools/measure_memory.py [--out DIR]

For each case (image size, widths, batch, negatives, LoRA placement, checkpointing) it writes a random
SAM3 checkpoint of that shape and a config on the synthetic dataset, and runs `lorahost train --max-steps 2`
with LORAHOST_LOG=lorahost::memory=debug: per micro-batch, the binary's counting allocator logs the heap
after each part of the model and at the peak, and the estimate for that very batch (images, queries).
It prints per case the heaviest micro-batch's heap peak against the estimate, the process peak (VmHWM)
against estimate + CPU base, the data pipeline's measured peak against `lorahost doctor`'s host estimate,
and then refits the multipliers (per part, with leave-one-out errors) that `host/src/memory.rs` uses.
The table goes to BENCHMARKS.md.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import torch
from transformers import Sam3Config, Sam3Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "lorahost")
CPU_BASE = 20 * 2**20  # memory::CPU_BASE: binary, libraries, plugin engine beyond the heap

CASES = [
    # name, image, vit hidden, vit mlp, vit layers, detr hidden, queries, batch, negatives[, detr MLP ratio,
    # text hidden, text MLP, text layers] (SAM3: 8, 1024, 4096, 24; default 2, 32, 64, 2)
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
    ("s392-l4", 392, 64, 256, 4, 48, 24, 2, 1),
    ("s504-b3", 504, 32, 64, 2, 32, 16, 3, 0),
    ("s280-q100", 280, 48, 192, 3, 64, 100, 2, 1),
    ("s336-r8", 336, 48, 192, 2, 32, 32, 2, 1, 8, 64, 256, 3),
    ("s448-r8", 448, 32, 128, 2, 48, 24, 1, 2, 8, 32, 128, 2),
    ("s280-t96", 280, 32, 64, 2, 32, 16, 2, 2, 8, 96, 384, 4),
    ("s392-r8", 392, 64, 128, 3, 32, 48, 2, 0, 4, 48, 96, 2),
    # LoRA placement: text encoder adapted too / no ViT adapters (the graph starts later).
    ("s336-text", 336, 48, 96, 2, 32, 16, 2, 1, 8, 64, 256, 3),
    ("s448-novit", 448, 64, 128, 3, 64, 32, 2, 1),
    # Activation checkpointing of the ViT blocks.
    ("s448-ckpt", 448, 64, 128, 3, 64, 32, 2, 1),
    ("s560-ckpt", 560, 96, 384, 4, 32, 16, 1, 1),
]
TRAIN_FLAGS = {"s448-ckpt": "  gradient_checkpointing: true\n", "s560-ckpt": "  gradient_checkpointing: true\n"}
LORA_FLAGS = {"s336-text": "  apply_to_text_encoder: true\n", "s448-novit": "  apply_to_vision_encoder: false\n"}


def model_dir(base_cfg, tok, out, image, vh, vm, vl, dh, q, ratio=2, th=None, tm=None, tl=None):
    cfg = json.loads(json.dumps(base_cfg))
    b = cfg["vision_config"]["backbone_config"]
    b.update(image_size=image, hidden_size=vh, intermediate_size=vm, num_hidden_layers=vl,
             global_attn_indexes=[vl - 1], window_size=8, pretrain_image_size=224)
    g = image // 14
    cfg["vision_config"]["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
    for k in ("detr_encoder_config", "detr_decoder_config", "geometry_encoder_config"):
        cfg[k]["hidden_size"] = dh
        cfg[k]["intermediate_size"] = ratio * dh
    if th:
        cfg["text_config"].update(hidden_size=th, intermediate_size=tm, num_hidden_layers=tl)
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
    ap.add_argument("--refit", action="store_true", help="only refit from the last run's fit.json")
    a = ap.parse_args()
    if a.refit:
        fit(json.load(open(os.path.join(a.out, "fit.json"))))
        return
    os.makedirs(a.out, exist_ok=True)
    base_cfg = json.load(open(os.path.join(ROOT, "examples/tiny_sam3/config.json")))
    tok = json.load(open(os.path.join(ROOT, "examples/tiny_sam3/tokenizer.json")))
    rows = []
    fits = []
    host_rows = []
    for name, image, vh, vm, vl, dh, q, batch, neg, *text in CASES:
        d = os.path.join(a.out, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        model_dir(base_cfg, tok, os.path.join(d, "model"), image, vh, vm, vl, dh, q, *text)
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
{LORA_FLAGS.get(name, "")}training:
  data_dir: {a.out}/data
  synthetic: true
  batch_size: {batch}
  gradient_accumulation_steps: 1
  num_negatives: {neg}
  num_workers: 1
  num_epochs: 1
  warmup_steps: 1
{TRAIN_FLAGS.get(name, "")}  eval_steps: 1000
  save_steps: 1000
output:
  output_dir: {d}/run
hardware:
  device: cpu
""")
        env = dict(os.environ, LORAHOST_LOG="lorahost::memory=debug,warn", NO_COLOR="1")
        log = subprocess.run([BIN, "train", "--no-hot-reload", "--max-steps", "2", "--config", cfg], check=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env).stderr
        steps = [json.loads(l) for l in open(os.path.join(d, "run", "metrics.jsonl")) if '"step"' in l and '"event"' not in l]
        rss = max(s["memory_bytes"] for s in steps)
        micro = []
        marks = {}
        for l in log.splitlines():
            mk = re.search(r'component="([a-z -]+)" live_mib=([0-9.]+)', l)
            if mk:
                marks[mk.group(1)] = float(mk.group(2)) * 2**20
            if "heap during the micro-batch" not in l:
                continue
            kv = dict(re.findall(r"(\w+)=([0-9.]+)", l))
            feats = json.loads(re.search(r"features=\"(.*)\"", l).group(1).replace('\\"', '"'))
            micro.append(dict(name=name, queries=int(kv["queries"]), before=float(kv["before_mib"]) * 2**20,
                              forward=float(kv["forward_graph_mib"]) * 2**20, peak=float(kv["peak_mib"]) * 2**20,
                              est_graph=float(kv["estimate_graph_mib"]) * 2**20, est=float(kv["estimate_peak_mib"]) * 2**20,
                              attention=float(kv.get("largest_attention_mib", "nan")) * 2**20,
                              data=float(kv.get("data_pipeline_mib", "nan")) * 2**20,
                              features=feats, marks=dict(marks)))
        top = max(micro, key=lambda m: m["peak"])
        doc = json.loads(subprocess.run([BIN, "doctor", "--json", "--config", cfg], capture_output=True, text=True).stdout)
        est = doc["facts"]["memory"]["estimate_bytes"]
        err = (top["est"] - top["peak"]) / top["peak"] * 100
        data_measured = max(m["data"] for m in micro)
        data_est = doc["facts"]["host_memory"]["estimate_bytes"]["data_pipeline"]
        host_rows.append((name, data_measured / 2**20, data_est / 2**20))
        rss_err = (top["est"] + CPU_BASE - rss) / rss * 100
        rows.append((name, top["peak"] / 2**20, top["est"] / 2**20, rss / 2**20, (top["est"] + CPU_BASE) / 2**20, err, rss_err))
        fits.append(top)
        print(f"{name:10s} {top['queries']:3d} queries: heap peak {top['peak'] / 2**20:8.1f} MiB, estimate "
              f"{top['est'] / 2**20:8.1f} ({err:+6.1f}%) | forward graph {top['forward'] / 2**20:7.1f}, estimate "
              f"{top['est_graph'] / 2**20:7.1f} | process peak {rss / 2**20:8.1f} MiB ({rss_err:+6.1f}% for estimate + base) "
              f"| doctor, heaviest micro-batch of the data: {est['total'] / 2**20:8.1f} MiB", flush=True)
    print("| case | queries | heap peak MiB | estimate MiB | error | process peak (VmHWM) MiB | estimate + base MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, hp, he, rss, de, err, rerr in rows:
        print(f"| {name} | {[f['queries'] for f in fits if f['name'] == name][0]} | {hp:.1f} | {he:.1f} | {err:+.1f}% | {rss:.1f} | {de:.1f} | {rerr:+.1f}% |")
    print("| case | data pipeline, measured peak MiB | doctor's estimate MiB | error |")
    print("|---|---|---|---|")
    for name, m, e in host_rows:
        print(f"| {name} | {m:.1f} | {e:.1f} | {(e - m) / m * 100:+.1f}% |")
    print(f"worst error: heap {max(abs(r[5]) for r in rows):.1f}%, process {max(abs(r[6]) for r in rows):.1f}%")
    json.dump(fits, open(os.path.join(a.out, "fit.json"), "w"))
    fit(fits)


def nonnegative_lstsq(A, b):
    """Least squares with coefficients >= 0 (a kind of element cannot free memory): refit without
    the kinds whose coefficient came out negative until none does."""
    import numpy as np
    active = np.ones(A.shape[1], bool)
    while True:
        coef = np.zeros(A.shape[1])
        if active.any():
            coef[active], *_ = np.linalg.lstsq(A[:, active], b, rcond=None)
        if (coef >= 0).all():
            return coef
        active &= coef > 0


def relative_fit(X, y):
    """Non-negative least squares minimising the relative error; the coefficients and the
    leave-one-out errors (%)."""
    import numpy as np
    coef = nonnegative_lstsq(X / y[:, None], np.ones(len(y)))
    loo = []
    for j in range(len(y)):
        m = np.ones(len(y), bool)
        m[j] = False
        if m.sum() == 0:
            continue
        c = nonnegative_lstsq(X[m] / y[m, None], np.ones(m.sum()))
        loo.append((X[j] @ c - y[j]) / y[j] * 100)
    return coef, loo or [float("nan")]


def fit(fits):
    """Per part of the model: least-squares multipliers (elements kept per element of each kind) of the
    forward graph measured between the component marks, with leave-one-out errors; then backward's own
    peak as a share of the graph plus copies of the largest attention's score chunk."""
    import numpy as np
    kinds = ["token_width", "token_mlp", "scores", "maps", "memory_width", "mask_logits"]
    order = ["vision", "query_image", "text", "detr_encoder", "detr_decoder", "mask_head"]
    for f in fits:
        m = f["marks"]
        end = f["before"] + f["forward"]
        f["parts"] = {"vision": m["vision"] - f["before"], "query_image": m["per-query image features"] - m["vision"],
                      "text": m["text"] - m["per-query image features"],
                      "detr_encoder": m["encoder"] - m["text"], "detr_decoder": m["scoring"] - m["encoder"],
                      "mask_head": end - m["scoring"]}
    fits = [f for f in fits if f["name"] not in TRAIN_FLAGS]  # checkpointed ViT: other structure

    def tracked(name, part):
        if part == "vision":
            return name != "s448-novit"
        if part == "text":
            return name == "s336-text"
        return True

    fitted = {}
    # The text encoder borrows the DETR encoder's multipliers: fit that first.
    for part in ["vision", "query_image", "detr_encoder", "text", "detr_decoder", "mask_head"]:
        i = order.index(part)
        fits_all = fits
        fits = [f for f in fits_all if tracked(f["name"], part)]
        untracked = [f"{f['name']} {f['parts'][part] / 2**20:.1f} MiB" for f in fits_all if not tracked(f["name"], part)]
        if untracked:
            print(f"{part} without adapters upstream (estimated 0): " + ", ".join(untracked))
        feats = [dict(f["features"][i][1]) for f in fits]
        used = [k for k in kinds if any(x[k] > 0 for x in feats)]
        X = np.array([[4.0 * x[k] for k in used] for x in feats])
        if part == "text":
            # Too few cases adapt the text encoder to separate its kinds: one scale on the DETR
            # encoder's multipliers (a transformer layer of the same make).
            enc = fitted["detr_encoder"]
            X = X @ np.array([[enc.get(k, 0.0)] for k in used])
            used = ["scale of the DETR encoder's (" + ", ".join(f"{enc.get(k, 0.0):.2f}" for k in ["token_width", "token_mlp", "scores"]) + ")"]
        coef, loo = relative_fit(X, np.array([f["parts"][part] for f in fits]))
        fitted[part] = dict(zip(used, coef))
        print(f"{part}: " + ", ".join(f"{k} {c:.3f}" for k, c in zip(used, coef))
              + f"; leave-one-out errors {min(loo):+.1f}% .. {max(loo):+.1f}%")
        fits = fits_all
    # The forward graph as the estimate computes it from the multipliers just fitted.
    def estimated_graph(f):
        g = 0.0
        for i, part in enumerate(order):
            if not tracked(f["name"], part):
                continue
            x = dict(f["features"][i][1])
            if part == "text":
                enc = fitted["detr_encoder"]
                scale = next(iter(fitted["text"].values()))
                g += scale * sum(enc.get(k, 0.0) * 4.0 * x.get(k, 0.0) for k in kinds)
            else:
                g += sum(c * 4.0 * x.get(k, 0.0) for k, c in fitted[part].items())
        return g
    # Backward's own peak = beta x forward graph + gamma x the largest attention's f32 score chunk,
    # on the *estimated* graph (what doctor multiplies), so the forward parts' errors are not
    # compounded.
    # The fit minimises the relative error of the micro-batch's whole peak above its start:
    # (1 + beta) x estimated graph + gamma x attention chunk.
    est = [estimated_graph(f) for f in fits]
    X = np.array([[g, f["attention"]] for g, f in zip(est, fits)])
    coef, loo = relative_fit(X, np.array([f["peak"] - f["before"] for f in fits]))
    print(f"backward: {coef[0] - 1:.3f} x estimated forward graph + {coef[1]:.2f} x largest attention chunk; "
          f"leave-one-out errors of the micro-batch's peak {min(loo):+.1f}% .. {max(loo):+.1f}%")


if __name__ == "__main__":
    main()
