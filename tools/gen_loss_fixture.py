#!/usr/bin/env python3
"""Generate the end-to-end loss parity fixtures in host/tests/fixtures/loss/ from Meta's own SAM3 loss code.

Needs: pip install torch scipy safetensors pyyaml   (CPU only; scipy for Meta's matcher)
       a checkout (or bare git mirror) of github.com/facebookresearch/sam3
Run:   python3 tools/gen_loss_fixture.py [--sam3 PATH] [--rev REV] [--out DIR]
       PATH defaults to $SAM3_REPO, then /work/.mirror/facebookresearch+sam3/repo.

Meta's files (`sam3/train/loss/{loss_fns,sam3_loss,mask_sampling}.py`, `sam3/train/matcher.py`,
`sam3/model/{box_ops,data_misc,model_misc}.py`, `sam3/train/utils/distributed.py`) are extracted into a
temporary directory at run time and imported unchanged; nothing of Meta's code is kept in this repository.
Stubs, each only because the real thing cannot run here:
  * `sam3/__init__.py` is written empty: the real one imports `model_builder` (the whole model, its weights
    loader and their dependencies), which the loss does not use;
  * `sam3.train.loss.sigmoid_focal_loss` (Triton kernels, GPU only) is replaced by a module whose two entry
    points call Meta's own pure-torch branch of `loss_fns.sigmoid_focal_loss(..., triton=False)` (the formula
    the Triton module documents), summed for the `_reduce` variant exactly like the kernel;
  * `torchmetrics` (only used for the `ce_f1` logging metric, never for a loss) is stubbed when absent.
`Sam3LossWrapper` uses `normalization="global"` (the recipe does not override it), which all-reduces the
box count: a one-process gloo group is started for that (world size 1, so N is the local count).

The loss is configured as Meta's SAM3 fine-tuning recipe
(`sam3/train/configs/roboflow_v100/roboflow_v100_full_ft_100_images.yaml`, its commented segmentation `loss:`
block, i.e. with the `Masks` loss): the script reads that file and checks the values below against it.

Each case is a seeded random model output (per decoder layer: logits, cxcywh boxes, presence logit, for
the one-to-one queries and the DAC one-to-many half; final-layer mask logits of all queries) and random
targets. It is run through `Sam3LossWrapper.forward` (matching as `Sam3Image._compute_matching` does it),
in float32, and backpropagated. Written per case:
  <case>.safetensors  inputs (all_logits (L,B,N), all_boxes_cxcywh (L,B,N,4), all_presence (L,B,1),
                      all_masks (B,N,H,W), f32), targets (gt_boxes (G,4) f32, gt_masks (G,h,w) u8,
                      gt_mask_valid (G,) u8, gt_num_boxes (B,) i64) and grad_<input> (d total / d input);
  <case>.json         Meta's loss dict (terms exactly as Meta logs them: the `_o2m` terms already include
                      `o2m_weight`), the total (core_loss), N, and the matched (query, gt) pairs of every
                      branch (per image, gt indices local to the image).
The layout of the inputs is the one of lorahost's `Sam3Outputs` (host/src/sam3/model.rs): the first
N - num_o2m queries are the one-to-one ones.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "host", "tests", "fixtures", "loss"))
DEFAULT_SAM3 = "/work/.mirror/facebookresearch+sam3/repo"
RECIPE = "sam3/train/configs/roboflow_v100/roboflow_v100_full_ft_100_images.yaml"

META_FILES = [
    "sam3/model/__init__.py",
    "sam3/model/box_ops.py",
    "sam3/model/data_misc.py",
    "sam3/model/model_misc.py",
    "sam3/train/__init__.py",
    "sam3/train/matcher.py",
    "sam3/train/utils/__init__.py",
    "sam3/train/utils/distributed.py",
    "sam3/train/loss/__init__.py",
    "sam3/train/loss/loss_fns.py",
    "sam3/train/loss/mask_sampling.py",
    "sam3/train/loss/sam3_loss.py",
]

# The recipe's values (checked against RECIPE below; lorahost's `LossWeights::default()` documents the same).
HP = {
    "loss_bbox": 5.0,
    "loss_giou": 2.0,
    "loss_ce": 20.0,
    "presence_loss": 20.0,
    "loss_mask": 200.0,
    "loss_dice": 10.0,
    "o2m_weight": 2.0,
    "pos_weight": 10.0,
    "iabce_alpha": 0.25,
    "iabce_gamma": 2.0,
    "pad_n_queries": 200,
    "presence_alpha": 0.5,  # IABCEMdetr defaults (the recipe does not set them)
    "presence_gamma": 0.0,
    "mask_alpha": 0.25,
    "mask_gamma": 2.0,
    "matcher_cost_class": 2.0,
    "matcher_cost_bbox": 5.0,
    "matcher_cost_giou": 2.0,
    "matcher_alpha": 0.25,
    "matcher_gamma": 2.0,
    "o2m_alpha": 0.3,
    "o2m_threshold": 0.4,
    "o2m_topk": 4,
    "use_o2m_matcher_on_o2m_aux": False,
    "scale_by_find_batch_size": True,
}


# ---------------------------------------------------------------------------------------------------------------
# Meta's code: extraction and import
# ---------------------------------------------------------------------------------------------------------------

def read_meta_file(src, rev, path):
    """One file of the sam3 checkout: from git (bare mirror or work tree) or from the directory itself."""
    is_git = subprocess.run(["git", "-C", src, "rev-parse", "--git-dir"], capture_output=True).returncode == 0
    if is_git:
        return subprocess.run(["git", "-C", src, "show", f"{rev}:{path}"], check=True, capture_output=True).stdout
    with open(os.path.join(src, path), "rb") as f:
        return f.read()


def meta_commit(src, rev):
    r = subprocess.run(["git", "-C", src, "rev-parse", rev], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def import_meta(src, rev, tmp):
    for path in META_FILES:
        dst = os.path.join(tmp, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(read_meta_file(src, rev, path))
    # Stub: the real package __init__ imports the whole model (model_builder).
    with open(os.path.join(tmp, "sam3", "__init__.py"), "w") as f:
        f.write("# stub written by tools/gen_loss_fixture.py\n")

    # Stub: Triton focal-loss kernels (GPU only) -> Meta's own torch formula (bound after loss_fns loads).
    focal = types.ModuleType("sam3.train.loss.sigmoid_focal_loss")

    def _focal(inputs, targets, alpha=0.25, gamma=2):
        lf = sys.modules["sam3.train.loss.loss_fns"]
        return lf.sigmoid_focal_loss(inputs, targets, 1, alpha=alpha, gamma=gamma, reduce=False, triton=False)

    focal.triton_sigmoid_focal_loss = _focal
    focal.triton_sigmoid_focal_loss_reduce = lambda inputs, targets, alpha=0.25, gamma=2: _focal(
        inputs, targets, alpha, gamma
    ).sum()
    sys.modules[focal.__name__] = focal

    # Stub: torchmetrics (the `ce_f1` logging metric only).
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        tm = types.ModuleType("torchmetrics")
        tm.functional = types.ModuleType("torchmetrics.functional")
        tm.functional.f1_score = lambda *a, **k: torch.tensor(0.0)
        sys.modules["torchmetrics"] = tm
        sys.modules["torchmetrics.functional"] = tm.functional

    sys.path.insert(0, tmp)
    from sam3.model.box_ops import box_cxcywh_to_xyxy
    from sam3.model.model_misc import SAM3Output
    from sam3.train.loss import loss_fns, sam3_loss
    from sam3.train import matcher

    return types.SimpleNamespace(
        box_cxcywh_to_xyxy=box_cxcywh_to_xyxy,
        SAM3Output=SAM3Output,
        loss_fns=loss_fns,
        sam3_loss=sam3_loss,
        matcher=matcher,
    )


def check_recipe(src, rev):
    """The recipe's loss block (with its commented segmentation variant) must carry the HP values."""
    text = read_meta_file(src, rev, RECIPE).decode()
    # The segmentation loss block is commented out: uncomment it and parse it.
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if "NOTE: Loss to be used for training in case of segmentation" in l)
    block = []
    for l in lines[start + 1:]:
        if not l.startswith("  #"):
            break
        block.append("  " + l[3:])
    import yaml

    seg = yaml.safe_load("\n".join(block))["loss"]
    scratch = yaml.safe_load(text)["scratch"]
    fns = {f["_target_"].rsplit(".", 1)[1]: f for f in seg["loss_fns_find"]}
    m = scratch["matcher"]
    got = {
        "loss_bbox": fns["Boxes"]["weight_dict"]["loss_bbox"],
        "loss_giou": fns["Boxes"]["weight_dict"]["loss_giou"],
        "loss_ce": fns["IABCEMdetr"]["weight_dict"]["loss_ce"],
        "presence_loss": fns["IABCEMdetr"]["weight_dict"]["presence_loss"],
        "loss_mask": fns["Masks"]["weight_dict"]["loss_mask"],
        "loss_dice": fns["Masks"]["weight_dict"]["loss_dice"],
        "o2m_weight": seg["o2m_weight"],
        "pos_weight": fns["IABCEMdetr"]["pos_weight"],
        "iabce_alpha": fns["IABCEMdetr"]["alpha"],
        "iabce_gamma": fns["IABCEMdetr"]["gamma"],
        "pad_n_queries": fns["IABCEMdetr"]["pad_n_queries"],
        "mask_alpha": fns["Masks"]["focal_alpha"],
        "mask_gamma": fns["Masks"]["focal_gamma"],
        "matcher_cost_class": m["cost_class"],
        "matcher_cost_bbox": m["cost_bbox"],
        "matcher_cost_giou": m["cost_giou"],
        "matcher_alpha": m["alpha"],
        "matcher_gamma": m["gamma"],
        "o2m_alpha": seg["o2m_matcher"]["alpha"],
        "o2m_threshold": seg["o2m_matcher"]["threshold"],
        "o2m_topk": seg["o2m_matcher"]["topk"],
        "use_o2m_matcher_on_o2m_aux": seg["use_o2m_matcher_on_o2m_aux"],
        "scale_by_find_batch_size": scratch["scale_by_find_batch_size"],
    }
    for k, v in got.items():
        assert HP[k] == v, f"recipe {k} = {v!r}, generator uses {HP[k]!r}"
    # Settings the generator relies on.
    iabce = fns["IABCEMdetr"]
    assert iabce["weak_loss"] is False and iabce["use_presence"] is True and iabce["pos_focal"] is False
    assert iabce["pad_scale_pos"] == 1.0 and fns["Masks"]["compute_aux"] is False
    assert m["_target_"].endswith("BinaryHungarianMatcherV2") and m["focal"] is True and m["stable"] is False
    assert "presence_alpha" not in iabce and "presence_gamma" not in iabce
    # The block's SemanticSegCriterion is left out (see build_loss).
    assert seg["loss_fn_semantic_seg"]["_target_"].endswith("SemanticSegCriterion")


def build_loss(meta):
    lf, M = meta.loss_fns, meta.matcher
    matcher = M.BinaryHungarianMatcherV2(
        focal=True,
        cost_class=HP["matcher_cost_class"],
        cost_bbox=HP["matcher_cost_bbox"],
        cost_giou=HP["matcher_cost_giou"],
        alpha=HP["matcher_alpha"],
        gamma=HP["matcher_gamma"],
        stable=False,
    )
    o2m_matcher = M.BinaryOneToManyMatcher(alpha=HP["o2m_alpha"], threshold=HP["o2m_threshold"], topk=HP["o2m_topk"])
    loss_fns_find = [
        lf.Boxes(weight_dict={"loss_bbox": HP["loss_bbox"], "loss_giou": HP["loss_giou"]}),
        lf.IABCEMdetr(
            weak_loss=False,
            weight_dict={"loss_ce": HP["loss_ce"], "presence_loss": HP["presence_loss"]},
            pos_weight=HP["pos_weight"],
            alpha=HP["iabce_alpha"],
            gamma=HP["iabce_gamma"],
            use_presence=True,
            pos_focal=False,
            pad_n_queries=HP["pad_n_queries"],
            pad_scale_pos=1.0,
        ),
        lf.Masks(
            focal_alpha=HP["mask_alpha"],
            focal_gamma=HP["mask_gamma"],
            weight_dict={"loss_mask": HP["loss_mask"], "loss_dice": HP["loss_dice"]},
            compute_aux=False,
        ),
    ]
    calls = []

    class Recorder:
        """Wraps a matcher and records each (name, indices) it returns, in call order."""

        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __call__(self, *a, **k):
            r = self.inner(*a, **k)
            calls.append((self.name, r))
            return r

    # The recipe block's SemanticSegCriterion (union-of-instances mask loss) has no counterpart in lorahost's
    # loss: left out here (host/tests/loss_parity.rs says so).
    wrapper = meta.sam3_loss.Sam3LossWrapper(
        loss_fns_find=loss_fns_find,
        matcher=Recorder("o2o", matcher),
        o2m_matcher=Recorder("o2m", o2m_matcher),
        o2m_weight=HP["o2m_weight"],
        use_o2m_matcher_on_o2m_aux=HP["use_o2m_matcher_on_o2m_aux"],
        loss_fn_semantic_seg=None,
        scale_by_find_batch_size=HP["scale_by_find_batch_size"],
    )
    return wrapper, matcher, calls


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------

def rand_box(g, lo=0.08, hi=0.45):
    """A cxcywh box fully inside the unit square."""
    w, h = (lo + (hi - lo) * torch.rand(2, generator=g)).tolist()
    cx = w / 2 + (1 - w) * torch.rand(1, generator=g).item()
    cy = h / 2 + (1 - h) * torch.rand(1, generator=g).item()
    return [cx, cy, w, h]


def jitter(g, box, s):
    cx, cy, w, h = box
    n = torch.randn(4, generator=g).tolist()
    w2 = min(max(w * math.exp(s * n[2]), 0.02), 0.9)
    h2 = min(max(h * math.exp(s * n[3]), 0.02), 0.9)
    cx2 = min(max(cx + s * w * n[0], 0.03), 0.97)
    cy2 = min(max(cy + s * h * n[1], 0.03), 0.97)
    return [cx2, cy2, w2, h2]


def raster(box, h, w, g, flip=0.08):
    """Binary mask of a box (cxcywh) on an h×w grid (pixel centres), with a few flipped pixels."""
    cx, cy, bw, bh = box
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    inside = ((ys[:, None] - cy).abs() <= bh / 2) & ((xs[None, :] - cx).abs() <= bw / 2)
    noise = torch.rand(h, w, generator=g) < flip
    return (inside ^ noise).to(torch.uint8)


def make_case(seed, layers, num_gt, q, pred_hw, gt_hw, invalid=()):
    """Random outputs/targets. num_gt: GT count per image; invalid: (image, gt) pairs that are box-only."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(num_gt), 2 * q
    gt = [[rand_box(g) for _ in range(k)] for k in num_gt]
    logits = 1.5 * torch.randn(layers, b, n, generator=g) - 1.0
    boxes = torch.empty(layers, b, n, 4)
    for l in range(layers):
        for i in range(b):
            for j in range(n):
                boxes[l, i, j] = torch.tensor(rand_box(g, 0.04, 0.5))
            # Some queries of each half near each GT box, closer in later layers.
            for half in (0, q):
                for k, box in enumerate(gt[i]):
                    for r in range(2):
                        j = half + (3 * k + r + l) % q
                        boxes[l, i, j] = torch.tensor(jitter(g, box, 0.25 / (1 + 0.3 * l)))
                        logits[l, i, j] = 1.0 + torch.randn(1, generator=g).item()
    presence = 2.0 * torch.randn(layers, b, 1, generator=g)
    masks = 3.0 * torch.randn(b, n, *pred_hw, generator=g)
    gt_boxes = torch.tensor([x for img in gt for x in img], dtype=torch.float32).reshape(-1, 4)
    gt_masks, valid = [], []
    for i, img in enumerate(gt):
        for k, box in enumerate(img):
            if (i, k) in invalid:
                # As Meta's collator: a box-only object gets an all-zero dummy mask, is_valid_segment 0.
                gt_masks.append(torch.zeros(gt_hw, dtype=torch.uint8))
                valid.append(0)
            else:
                gt_masks.append(raster(box, *gt_hw, g))
                valid.append(1)
    gt_masks = torch.stack(gt_masks) if gt_masks else torch.zeros(0, *gt_hw, dtype=torch.uint8)
    return {
        "all_logits": logits.float().contiguous(),
        "all_boxes_cxcywh": boxes.float().contiguous(),
        "all_presence": presence.float().contiguous(),
        "all_masks": masks.float().contiguous(),
        "num_o2m": q,
        "gt_boxes": gt_boxes.contiguous(),
        "gt_masks": gt_masks.contiguous(),
        "gt_mask_valid": torch.tensor(valid, dtype=torch.uint8),
        "gt_num_boxes": torch.tensor(num_gt, dtype=torch.int64),
    }


CASES = {
    # Six decoder layers as SAM3 (5 aux); image 1 has no GT (negative phrase); object 2 of image 0 is box-only;
    # masks upsampled 8x8 -> 18x22.
    "main": dict(seed=1, layers=6, num_gt=[3, 0, 2], q=12, pred_hw=(8, 8), gt_hw=(18, 22), invalid={(0, 2)}),
    # More GT boxes than one-to-one queries in image 0 (Meta then returns explicit target indices); masks
    # downsampled 10x10 -> 7x9; every mask valid.
    "dense": dict(seed=2, layers=2, num_gt=[5, 1], q=4, pred_hw=(10, 10), gt_hw=(7, 9)),
    # SAM3's real query count (200 + 200): the IABCE normaliser at Q = pad_n_queries (a plain mean), the DAC
    # quantile at 1 - 4/200; one decoder layer (no aux) and 2x2 -> 3x3 masks keep the file small.
    "queries200": dict(seed=4, layers=1, num_gt=[2, 4], q=200, pred_hw=(2, 2), gt_hw=(3, 3), invalid={(1, 3)}),
    # An all-negative batch: only the presence terms are non-zero, N is clamped to 1.
    "negatives": dict(seed=3, layers=2, num_gt=[0, 0], q=6, pred_hw=(4, 4), gt_hw=(6, 6)),
}


# ---------------------------------------------------------------------------------------------------------------
# Running Meta's loss
# ---------------------------------------------------------------------------------------------------------------

def run_meta(meta, case):
    wrapper, matcher, calls = build_loss(meta)
    q = case["num_o2m"]
    leaves = {k: case[k].clone().requires_grad_(True) for k in ("all_logits", "all_boxes_cxcywh", "all_presence", "all_masks")}
    L = leaves["all_logits"].shape[0]
    num_boxes = case["gt_num_boxes"]
    gt_boxes = case["gt_boxes"]
    b = num_boxes.shape[0]
    max_n = int(num_boxes.max().item()) if b else 0
    boxes_padded = torch.zeros(b, max_n, 4)
    ids_padded = torch.full((b, max_n), -1, dtype=torch.long)
    off = 0
    for i, k in enumerate(num_boxes.tolist()):
        boxes_padded[i, :k] = gt_boxes[off:off + k]
        ids_padded[i, :k] = torch.arange(off, off + k)
        off += k
    # `Sam3Image.back_convert` of a collated `BatchedFindTarget`.
    targets = {
        "boxes": gt_boxes,
        "boxes_xyxy": meta.box_cxcywh_to_xyxy(gt_boxes),
        "boxes_padded": boxes_padded,
        "positive_map": gt_boxes.new_ones(len(gt_boxes), 1),
        "num_boxes": num_boxes,
        "masks": case["gt_masks"].bool(),
        "semantic_masks": None,
        "is_valid_mask": case["gt_mask_valid"].bool(),
        "is_exhaustive": torch.ones(b, dtype=torch.bool),
        "object_ids_packed": torch.arange(len(gt_boxes)),
        "object_ids_padded": ids_padded,
    }

    def layer_out(l):
        lg = leaves["all_logits"][l].unsqueeze(-1)  # (B, N, 1)
        bx = leaves["all_boxes_cxcywh"][l]
        xyxy = meta.box_cxcywh_to_xyxy(bx)  # differentiable, as in `_update_scores_and_boxes`
        return {
            "pred_logits": lg[:, :q],
            "pred_boxes": bx[:, :q],
            "pred_boxes_xyxy": xyxy[:, :q],
            "presence_logit_dec": leaves["all_presence"][l],
            "pred_logits_o2m": lg[:, q:],
            "pred_boxes_o2m": bx[:, q:],
            "pred_boxes_xyxy_o2m": xyxy[:, q:],
        }

    out = layer_out(L - 1)
    out["pred_masks"] = leaves["all_masks"][:, :q]
    out["pred_masks_o2m"] = leaves["all_masks"][:, q:]
    out["aux_outputs"] = [layer_out(l) for l in range(L - 1)]
    # `Sam3Image._compute_matching` (the model computes the one-to-one indices).
    out["indices"] = matcher(out, targets)
    for aux in out["aux_outputs"]:
        aux["indices"] = matcher(aux, targets)
    o2o = [out["indices"]] + [a["indices"] for a in out["aux_outputs"]]

    losses = wrapper(meta.SAM3Output([[out]]), [targets])
    total = losses["core_loss"]
    total.backward()

    # Matches per branch in lorahost's order: layer 0..L-1, one-to-one then one-to-many.
    # Every matcher call of the wrapper is for an o2m half: the final layer's first (o2m matcher), then
    # aux 0..L-2 (the one-to-one matcher, `use_o2m_matcher_on_o2m_aux: false`).
    assert [n for n, _ in calls] == ["o2m"] + ["o2o"] * (L - 1), [n for n, _ in calls]
    o2m = [r for _, r in calls]
    offsets = [0] + torch.cumsum(num_boxes, 0).tolist()

    def pairs(ind):
        bi, si, ti = ind
        per = [[] for _ in range(b)]
        if ti is None:
            # Sorted by target within each image, targets in order (Meta's `_do_matching`).
            counter = [0] * b
            for x, s in zip(bi.tolist(), si.tolist()):
                per[x].append([s, counter[x]])
                counter[x] += 1
        else:
            for x, s, t in zip(bi.tolist(), si.tolist(), ti.tolist()):
                per[x].append([s, t - offsets[x]])
        return [sorted(p) for p in per]

    o2o_by_layer = {L - 1: o2o[0], **{l: o2o[l + 1] for l in range(L - 1)}}
    o2m_by_layer = {L - 1: o2m[0], **{l: o2m[l + 1] for l in range(L - 1)}}
    matches = []
    for l in range(L):
        matches.append({"layer": l, "o2m": False, "pairs": pairs(o2o_by_layer[l])})
        matches.append({"layer": l, "o2m": True, "pairs": pairs(o2m_by_layer[l])})

    terms = {}
    for k, v in losses.items():
        if k == "core_loss" or not re.match(r"^(loss_|presence_loss)", k):
            continue  # skip metrics (ce_f1, presence_dec_acc)
        terms[k] = float(v.detach()) if torch.is_tensor(v) else float(v)
    grads = {f"grad_{k}": v.grad.detach().clone() for k, v in leaves.items()}
    num_boxes_norm = float(wrapper._get_num_boxes(targets))
    return float(total.detach()), terms, matches, grads, num_boxes_norm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam3", default=os.environ.get("SAM3_REPO", DEFAULT_SAM3), help="sam3 checkout or git mirror")
    ap.add_argument("--rev", default="HEAD", help="git revision of the sam3 checkout (git only)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    from safetensors.torch import save_file

    check_recipe(args.sam3, args.rev)
    with tempfile.TemporaryDirectory() as tmp:
        meta = import_meta(args.sam3, args.rev, tmp)
        os.makedirs(args.out, exist_ok=True)
        for name, spec in CASES.items():
            case = make_case(**spec)
            total, terms, matches, grads, n_norm = run_meta(meta, case)
            tensors = {k: v for k, v in case.items() if torch.is_tensor(v)}
            tensors.update(grads)
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, f"{name}.safetensors"))
            doc = {
                "generator": "tools/gen_loss_fixture.py",
                "sam3_commit": meta_commit(args.sam3, args.rev),
                "recipe": RECIPE,
                "hyperparameters": HP,
                "num_o2m": case["num_o2m"],
                "num_boxes": n_norm,
                "batch_size": int(case["gt_num_boxes"].shape[0]),
                "o2m_terms_include_o2m_weight": True,
                "total": total,
                "terms": dict(sorted(terms.items())),
                "matches": matches,
            }
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            print(f"{name}: total {total:.6f}, {len(terms)} terms, N {n_norm}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
