#!/usr/bin/env python3
"""Write the example metrics traces in examples/traces/ (deterministic; no dependencies).

- diagnosis.jsonl: the per-step loss our users saw in the reference trainer's "loss fluctuates"
  diagnosis (batch 1, accumulation/warmup/clipping not applied, so the LR is flat).
- smooth.jsonl: a healthy run: linear warmup then cosine decay, a smoothly decreasing loss with
  ordinary noise.
"""
import json, math, os

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "traces")
os.makedirs(here, exist_ok=True)

losses = [169, 141, 169, 242, 212, 182, 186, 161, 189, 181, 181, 172, 218, 186, 175, 198]
grad = [61.2, 48.9, 57.3, 95.1, 80.4, 63.0, 66.2, 52.8, 64.1, 60.7, 59.9, 55.0, 77.6, 63.3, 58.1, 69.4]
with open(os.path.join(here, "diagnosis.jsonl"), "w") as f:
    f.write(json.dumps({"run": {"total_steps": 16, "warmup_steps": 0, "accumulation": 1, "batch_size": 1,
                                "effective_batch_size": 1, "base_lr": 1e-4, "scheduler": "constant"}}) + "\n")
    for i, (l, g) in enumerate(zip(losses, grad), start=1):
        f.write(json.dumps({"step": i, "loss": float(l), "lr": 1e-4, "grad_norm": g, "micro_steps": 1,
                            "epoch": 0, "batch_size": 1}) + "\n")

def noise(i, k):
    # deterministic pseudo-noise in [-1, 1]
    x = math.sin(i * 12.9898 + k * 78.233) * 43758.5453
    return 2.0 * (x - math.floor(x)) - 1.0

total, warmup, base = 300, 20, 2e-4
with open(os.path.join(here, "smooth.jsonl"), "w") as f:
    f.write(json.dumps({"run": {"total_steps": total, "warmup_steps": warmup, "accumulation": 8, "batch_size": 2,
                                "effective_batch_size": 16, "base_lr": base, "scheduler": "cosine"}}) + "\n")
    for s in range(1, total + 1):
        if s <= warmup:
            lr = base * s / warmup
        else:
            # The host's convention (host/src/train/schedule.rs): the peak right after warmup,
            # no step spent at the final LR.
            lr = base * 0.5 * (1 + math.cos(math.pi * (s - warmup - 1) / (total - warmup)))
        loss = (2.0 * math.exp(-s / 60.0) + 0.3) * (1 + 0.02 * noise(s, 1))
        gn = (1.5 * math.exp(-s / 80.0) + 0.4) * (1 + 0.05 * noise(s, 2))
        # Per-term losses with Meta's default weights; the weighted terms add up to `loss`.
        shares = {"loss_ce": 0.10, "loss_bbox": 0.05, "loss_giou": 0.05, "loss_mask": 0.60, "loss_dice": 0.15,
                  "presence_loss": 0.05}
        weights = {"loss_ce": 20.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 200.0, "loss_dice": 10.0,
                   "presence_loss": 20.0}
        terms = {k: round(loss * shares[k] / weights[k], 8) for k in shares}
        f.write(json.dumps({"step": s, "loss": round(loss, 6), "lr": lr, "grad_norm": round(gn, 6),
                            "losses": terms, "loss_weights": weights,
                            "grad_norm_clipped": round(min(gn, 1.0), 6), "micro_steps": 8, "epoch": (s - 1) // 50,
                            "batch_size": 16, "warmup_steps": warmup, "total_steps": total}) + "\n")
