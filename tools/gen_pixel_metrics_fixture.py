#!/usr/bin/env python3
"""Reference values for lorahost's pixel metrics (host/src/pixel_metrics.rs).

Writes host/tests/fixtures/pixel_metrics/cases.json: pairs of ground-truth and predicted binary
masks (thin cracks, thick blobs, shifted and broken predictions, empty images; hex, 4 pixels
per digit, row-major) and their skeletons, with the
pixel counts computed by SciPy and scikit-image:

- strict: per-pair IoU (1 when both are empty), tp/fp/fn;
- relaxed: binary_dilation with the cross structure iterated `tol` times (SAM3-LoRA-Crack's
  tolerance): predicted pixels near the ground truth, ground-truth pixels near the prediction;
- clDice: the same for skimage.morphology.skeletonize's skeletons;

and the metrics over all pairs from the summed counts.

Regenerate with:  pip install numpy scipy scikit-image && python tools/gen_pixel_metrics_fixture.py
"""
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import ellipse, line
from skimage.morphology import skeletonize

H, W, TOL = 40, 48, 2
rng = np.random.default_rng(20261128)


def crack(width):
    m = np.zeros((H, W), bool)
    y, x = rng.integers(2, H - 2), 1
    while x < W - 2:
        nx = min(W - 2, x + int(rng.integers(3, 9)))
        ny = int(np.clip(y + rng.integers(-4, 5), 1, H - 2))
        rr, cc = line(y, x, ny, nx)
        m[rr, cc] = True
        x, y = nx, ny
    if width > 1:
        m = ndi.binary_dilation(m, iterations=width // 2)
    return m


def blob():
    m = np.zeros((H, W), bool)
    rr, cc = ellipse(rng.integers(10, H - 10), rng.integers(10, W - 10), rng.integers(4, 9),
                     rng.integers(4, 12), shape=(H, W))
    m[rr, cc] = True
    return m


def shifted(m, dy, dx):
    return np.roll(np.roll(m, dy, axis=0), dx, axis=1)


def broken(m):
    out = m.copy()
    out[:, rng.integers(10, W - 20):][:, :8] = False
    return out


pairs = []
for width in (1, 1, 3, 5):
    g = crack(width)
    pairs.append((g, shifted(g, 1, 0)))
    pairs.append((g, broken(g)))
    pairs.append((g, ndi.binary_dilation(g, iterations=2)))
g = blob()
pairs.append((g, shifted(g, 2, -3)))
pairs.append((g, np.zeros((H, W), bool)))
pairs.append((np.zeros((H, W), bool), crack(1)))
pairs.append((np.zeros((H, W), bool), np.zeros((H, W), bool)))
pairs.append((crack(3) | blob(), crack(1)))


def per_pair(gt, pred, tol):
    gt_d = ndi.binary_dilation(gt, iterations=tol) if tol > 0 else gt
    pred_d = ndi.binary_dilation(pred, iterations=tol) if tol > 0 else pred
    sp = skeletonize(pred) if pred.any() else pred
    st = skeletonize(gt) if gt.any() else gt
    inter, union = int((gt & pred).sum()), int((gt | pred).sum())
    return {
        "iou": inter / union if union else 1.0,
        "tp": inter,
        "fp": int((pred & ~gt).sum()),
        "fn": int((gt & ~pred).sum()),
        # Relaxed: predicted pixels near the ground truth, ground-truth pixels near the prediction.
        "pred_near_gt": int((pred & gt_d).sum()),
        "gt_near_pred": int((gt & pred_d).sum()),
        # clDice: the same for the skeletons.
        "pred_skeleton_near_gt": int((sp & gt_d).sum()),
        "pred_skeleton_pixels": int(sp.sum()),
        "gt_skeleton_near_pred": int((st & pred_d).sum()),
        "gt_skeleton_pixels": int(st.sum()),
        "gt_skeleton": bits(st),
        "pred_skeleton": bits(sp),
    }


def bits(m):
    """Row-major bits as hex, 4 pixels per digit, the first pixel in the high bit."""
    b = "".join("1" if v else "0" for v in m.ravel())
    b += "0" * (-len(b) % 4)
    return "".join(f"{int(b[i:i + 4], 2):x}" for i in range(0, len(b), 4))


cases = []
for gt, pred in pairs:
    cases.append({"gt": bits(gt), "pred": bits(pred), **per_pair(gt, pred, TOL)})


def total(key):
    return sum(c[key] for c in cases)


tp, fp, fn = total("tp"), total("fp"), total("fn")
prec, rec = tp / (tp + fp), tp / (tp + fn)
rp = total("pred_near_gt") / (tp + fp)
rr = total("gt_near_pred") / (tp + fn)
tprec = total("pred_skeleton_near_gt") / total("pred_skeleton_pixels")
tsens = total("gt_skeleton_near_pred") / total("gt_skeleton_pixels")
total = {
    "mean_iou": float(np.mean([c["iou"] for c in cases])),
    "micro_iou": tp / (tp + fp + fn),
    "precision": prec,
    "recall": rec,
    "f1": 2 * prec * rec / (prec + rec),
    "dice": 2 * tp / (2 * tp + fp + fn),
    "relaxed_precision": rp,
    "relaxed_recall": rr,
    "relaxed_f1": 2 * rp * rr / (rp + rr),
    "cldice": 2 * tprec * tsens / (tprec + tsens),
}
out = Path(__file__).resolve().parent.parent / "host/tests/fixtures/pixel_metrics/cases.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"height": H, "width": W, "tolerance": TOL, "cases": cases, "total": total}))
print(f"wrote {out}: {len(cases)} pairs, {total}")
