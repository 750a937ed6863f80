#!/usr/bin/env python3
"""Generate the SAM 3 parity fixtures in host/tests/fixtures/sam3/ (random weights, tiny configs).

Needs: pip install torch torchvision transformers safetensors   (torchvision for roi_align; CPU only)
Run:   python3 tools/gen_sam3_fixtures.py [--out DIR] [--only NAME] [--skip-grad-check]
Sweep: python3 tools/gen_sam3_fixtures.py --sweep N [--sweep-seed S] --out DIR   (random configs, not committed;
       then LORAHOST_SAM3_PARITY_DIRS=$(cat DIR/sweep_dirs.txt) cargo test --release -p lorahost --test sam3_model
       -- --ignored matches_transformers_dirs)

For each tiny config (`tiny_a`, `tiny_b`, `tiny_c`) this builds `transformers.Sam3Model(Sam3Config(...))` in fp32 with
eager attention, overwrites EVERY parameter with seeded random values (so that no weight sits at an
identity/zero init and every weight influences the outputs), runs one forward pass with boxes (and one without,
the HF text-only path) and writes:

    <name>/config.json          HF config (model.save_pretrained)
    <name>/model.safetensors    HF Sam3Model state dict (single file, exact HF keys)
    <name>/inputs.safetensors   pixel_values, input_ids, attention_mask, input_boxes, input_boxes_labels
    <name>/outputs.safetensors  final outputs + per-component intermediates (see README.md)

and README.md (the tensor table is generated from what was written). Everything is deterministic: fixed seeds,
torch.use_deterministic_algorithms, fp32, one thread.

Storage conventions (also in README.md):
  * every tensor is contiguous f32, except integer tensors (ids, labels, shapes) which are i64, and boolean
    masks, which are stored as i64 0/1 (1 = True = valid token);
  * a tensor whose value is exactly equal (dtype, shape, values) to one stored earlier is not stored twice:
    it is listed in the safetensors metadata entry "aliases" (a JSON object alias -> target). A target
    starting with "inputs:" names a tensor of inputs.safetensors.
"""
import argparse
import inspect
import json
import math
import os
import re
import sys
from collections import OrderedDict

import torch
import torch.nn as nn

try:
    import torchvision  # noqa: F401  (HF Sam3 needs torchvision.ops.roi_align)
except ImportError:  # pragma: no cover
    sys.exit("torchvision is required by transformers' Sam3 (roi_align): pip install torchvision")

import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, Sam3Config, Sam3Model, Sam3ViTConfig, Sam3VisionConfig
from transformers.models.sam3 import modeling_sam3 as hf_sam3

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "host", "tests", "fixtures", "sam3"))

# --------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------

# Each case: the Sam3Config kwargs plus the input description. Token ids: BOS = vocab-2, EOS = vocab-1 (set in the
# text config so that CLIP's EOS pooling has something to find); words are random ids in [1, vocab-2); padding is
# the EOS id (what the HF Sam3Processor/CLIP tokenizer pads with).
CASES = OrderedDict()

CASES["tiny_a"] = dict(
    seed=1234,
    config=dict(
        vision_config=dict(
            backbone_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=112, patch_size=14, window_size=4, global_attn_indexes=[1],
                pretrain_image_size=56,
            ),
            fpn_hidden_size=16,
            scale_factors=[4.0, 2.0, 1.0, 0.5],
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        ),
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu",
            bos_token_id=126, eos_token_id=127, pad_token_id=127,
        ),
        geometry_encoder_config=dict(hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=32,
                                     roi_size=7),
        detr_encoder_config=dict(hidden_size=16, num_layers=2, num_attention_heads=2, intermediate_size=32),
        detr_decoder_config=dict(hidden_size=16, num_layers=2, num_queries=8, num_attention_heads=2,
                                 intermediate_size=32),
        mask_decoder_config=dict(hidden_size=16, num_upsampling_stages=3, num_attention_heads=2),
    ),
    batch=2,
    seq_len=8,
    text_lengths=[8, 5],  # sample 1 is right-padded
    box_labels=[[1, 0], [0, 1]],
)

CASES["tiny_b"] = dict(
    seed=5678,
    config=dict(
        vision_config=dict(
            backbone_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=168, patch_size=14, window_size=6, global_attn_indexes=[0, 2],
                pretrain_image_size=84,
            ),
            fpn_hidden_size=32,
            scale_factors=[4.0, 2.0, 1.0, 0.5],
            backbone_feature_sizes=[[48, 48], [24, 24], [12, 12]],
        ),
        text_config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=96, projection_dim=24, num_hidden_layers=3,
            num_attention_heads=3, max_position_embeddings=12, hidden_act="gelu",
            bos_token_id=126, eos_token_id=127, pad_token_id=127,
        ),
        # roi_size 5 (not the default 7): keeps the file small and checks that the port reads roi_size.
        geometry_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64,
                                     roi_size=5),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=3, num_queries=6, num_attention_heads=4,
                                 intermediate_size=64),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=3, num_attention_heads=4),
    ),
    batch=2,
    seq_len=10,
    text_lengths=[7, 10],  # sample 0 is right-padded
    # -10 = HF's box padding label: sample 1 has 2 real boxes + 1 padding box (exercises the CLS packing)
    box_labels=[[1, 0, 1], [0, 1, -10]],
    # one box (within the cx/cy/w/h ranges) that crosses the right and top borders: RoIAlign border clamping
    box_overrides={(0, 2): [0.78, 0.22, 0.48, 0.46]},
)


# tiny_c: what tiny_a/tiny_b leave at SAM3's values (the sweep of random configs found no difference; this case pins
# the less common shapes and fields, small enough to commit): a grid (6) that is not a multiple of the window (4:
# padded windows), the last block windowed, a pretrain grid (4) that tiles with a partial copy, patch 8, one input
# channel, RoPE θ 100, head_dim 12, the FPN's [2, 1, 0.5] (two kept levels, masks at 2g, one pixel-decoder stage used
# of 2), 3-head text attention, non-ReLU activations in every stack (CLIP's default quick_gelu, tanh-GELU, GELU, SiLU,
# gelu_new), a sample left-padded and a sample whose boxes are all padding (its CLS token goes first), and boxes larger
# than the image and across its corner.
CASES["tiny_c"] = dict(
    seed=4321,
    config=dict(
        vision_config=dict(
            backbone_config=dict(
                hidden_size=24, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                image_size=48, patch_size=8, window_size=4, global_attn_indexes=[1],
                pretrain_image_size=32, num_channels=1, hidden_act="gelu_pytorch_tanh",
                rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
            ),
            fpn_hidden_size=16,
            scale_factors=[2.0, 1.0, 0.5],
            backbone_feature_sizes=[[12, 12], [6, 6]],
        ),
        text_config=dict(
            vocab_size=40, hidden_size=18, intermediate_size=16, projection_dim=4, num_hidden_layers=2,
            num_attention_heads=3, max_position_embeddings=8, hidden_act="quick_gelu",
            bos_token_id=38, eos_token_id=39, pad_token_id=39,
        ),
        geometry_encoder_config=dict(hidden_size=16, num_layers=1, num_attention_heads=4, intermediate_size=8,
                                     roi_size=2, hidden_act="gelu"),
        detr_encoder_config=dict(hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=8,
                                 hidden_act="silu"),
        detr_decoder_config=dict(hidden_size=16, num_layers=2, num_queries=4, num_attention_heads=4,
                                 intermediate_size=8, hidden_act="gelu_new"),
        mask_decoder_config=dict(hidden_size=16, num_upsampling_stages=2, num_attention_heads=2),
    ),
    batch=2,
    seq_len=6,
    text_lengths=[4, 6],
    left_padded=[0],
    # sample 0: padding boxes only (the CLS token goes to slot 0); sample 1: a padding box between real ones
    box_labels=[[-10, -10, -10], [0, -10, 1]],
    # a box larger than the image and one across the top-right corner
    box_overrides={(1, 0): [0.5, 0.5, 1.2, 1.1], (1, 2): [0.97, 0.04, 0.3, 0.2]},
)


# --------------------------------------------------------------------------------------------------------------
# Sweep: seeded random configurations (not committed; `--sweep N --out DIR`, then the ignored Rust test
# `matches_transformers_dirs` on the directories written, see README.md)
# --------------------------------------------------------------------------------------------------------------

# every transformers activation lorahost takes (the others are refused by name when the config is read)
ACTS = ["gelu", "quick_gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "gelu_python", "gelu_python_tanh",
        "gelu_fast", "swish"]


def random_case(seed):
    """A random small configuration transformers accepts, varying every config field the modeling code reads, and
    random inputs (batch 1..3, padded text, boxes with padding labels, boxes at and across the image borders)."""
    import random
    rng = random.Random(seed)
    pick = rng.choice

    def heads_for(width):
        return pick([h for h in (1, 2, 4, 8) if width % h == 0])

    # ViT: head_dim multiple of 4; grid up to 12; window anywhere from 0 (all global) to past the grid.
    vh = pick([1, 2, 3, 4])
    vhd = pick([4, 8, 12, 16])
    vit_hidden = vh * vhd
    patch = pick([2, 3, 4, 7, 8, 14])
    scales = pick([
        [4.0, 2.0, 1.0, 0.5], [4.0, 2.0, 1.0, 0.5], [2.0, 1.0, 0.5], [4.0, 2.0, 1.0], [4.0, 1.0], [1.0, 0.5],
        [2.0, 1.0], [4.0, 2.0, 1.0, 0.5, 0.5], [4.0, 1.0, 0.5], [1.0, 2.0, 0.5], [0.5, 1.0, 2.0, 4.0],
    ])
    grid = rng.randint(2, 12) if rng.random() < 0.85 else rng.randint(13, 28)  # (large: RoIAlign sampling, RPB)
    layers = rng.randint(1, 4)
    window = pick([0, 1, 2, 3, 4, 5, 6, grid, grid + 1, rng.randint(1, grid)])
    globals_ = pick([[], list(range(layers)), [layers - 1], sorted(rng.sample(range(layers), rng.randint(0, layers))),
                     [0], [layers - 1, layers + 3]])
    pre_grid = pick([1, 2, grid // 2 or 1, grid, grid + 1, grid + 3, rng.randint(1, grid + 2)])
    pretrain = pre_grid * patch + pick([0, 0, patch - 1 if patch > 1 else 0])
    d = pick([8, 16, 24, 32, 48])
    t_heads = pick([1, 2, 3, 4])
    t_hidden = t_heads * pick([4, 6, 8, 16])
    max_pos = rng.randint(4, 20)
    seq_len = rng.randint(2, max_pos)
    vocab = rng.randint(16, 200)
    batch = rng.randint(1, 3)
    n_boxes = pick([0, 1, 1, 2, 3, 4])
    labels = [[pick([1, 0, 1, -10]) for _ in range(n_boxes)] for _ in range(batch)]
    if n_boxes and rng.random() < 0.2:
        labels[0] = [-10] * n_boxes  # a sample with only padding boxes: its CLS token goes first
    overrides = {}
    for b in range(batch):
        for n in range(n_boxes):
            if rng.random() < 0.35:  # at / across the borders, tiny, or whole-image boxes
                overrides[(b, n)] = pick([
                    [0.02, 0.5, 0.3, 0.2], [0.98, 0.97, 0.4, 0.5], [0.5, 0.0, 0.2, 0.3], [1.0, 1.0, 0.1, 0.1],
                    [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.4, 1.2], [0.3, 0.7, 0.01, 0.02], [0.0, 0.0, 0.05, 0.6],
                    [rng.random(), rng.random(), rng.random() * 1.2, rng.random() * 1.2],
                ])
    vit = dict(
        hidden_size=vit_hidden, intermediate_size=rng.randint(4, 72), num_hidden_layers=layers,
        num_attention_heads=vh, image_size=grid * patch, patch_size=patch, window_size=window,
        global_attn_indexes=globals_, pretrain_image_size=pretrain, hidden_act=pick(ACTS),
        layer_norm_eps=pick([1e-6, 1e-6, 1e-5, 1e-3]), num_channels=pick([3, 3, 1, 4]),
    )
    if rng.random() < 0.15:  # sizes as [h, w] pairs (square)
        vit["image_size"] = [grid * patch] * 2
        vit["pretrain_image_size"] = [pretrain] * 2
    if rng.random() < 0.15:  # transformers builds no LayerScale (the parameter is not read)
        vit["layer_scale_init_value"] = 0.1
    rope = rng.random()
    if rope < 0.35:
        vit["rope_parameters"] = {"rope_type": "axial", "rope_theta": pick([10000.0, 100.0, 7.5, 1e6])}
    elif rope < 0.5:  # the older key (transformers moves it into rope_parameters)
        vit["rope_theta"] = pick([100.0, 3.0, 1e5])

    def stack(**extra):
        # (layer_norm_eps of these sub-configs is not read by transformers: its LayerNorms use PyTorch's 1e-5)
        return dict(hidden_size=d, num_attention_heads=heads_for(d), intermediate_size=rng.randint(4, 64),
                    hidden_act=pick(ACTS), layer_norm_eps=pick([1e-6, 1e-3]), **extra)

    kept = len(scales) - 1
    return dict(
        seed=seed,
        sweep=True,
        config=dict(
            vision_config=dict(backbone_config=vit, fpn_hidden_size=d, scale_factors=scales),
            text_config=dict(
                vocab_size=vocab, hidden_size=t_hidden, intermediate_size=rng.randint(4, 96),
                projection_dim=rng.randint(2, 40), num_hidden_layers=rng.randint(1, 3),
                num_attention_heads=t_heads, max_position_embeddings=max_pos, hidden_act=pick(ACTS),
                layer_norm_eps=pick([1e-5, 1e-5, 1e-6, 1e-3]),
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
            ),
            geometry_encoder_config=stack(num_layers=rng.randint(0, 3), roi_size=rng.randint(1, 7)),
            detr_encoder_config=stack(num_layers=rng.randint(0, 3)),
            detr_decoder_config=stack(num_layers=rng.randint(1, 4), num_queries=rng.randint(1, 12)),
            mask_decoder_config=dict(hidden_size=d, num_attention_heads=heads_for(d), layer_norm_eps=pick([1e-6, 1e-3]),
                                     num_upsampling_stages=max(kept - 1, 0) + rng.randint(0, 2)),
        ),
        batch=batch,
        seq_len=seq_len,
        text_lengths=[rng.randint(2, seq_len) for _ in range(batch)],
        left_padded=[b for b in range(batch) if rng.random() < 0.2],
        box_labels=labels,
        box_overrides=overrides,
    )


def describe_case(case):
    c = case["config"]
    v = c["vision_config"]["backbone_config"]
    t = c["text_config"]
    side = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    rope = v.get("rope_parameters", {}).get("rope_theta", v.get("rope_theta", "default"))
    return (f"vit {v['hidden_size']}/{v['num_attention_heads']}h x{v['num_hidden_layers']} {v['hidden_act']} "
            f"ch {v['num_channels']} img {v['image_size']}/p{v['patch_size']} (grid {side // v['patch_size']}) "
            f"win {v['window_size']} glob {v['global_attn_indexes']} pre {v['pretrain_image_size']} "
            f"eps {v['layer_norm_eps']} rope {rope} ls {v.get('layer_scale_init_value')}; "
            f"fpn {c['vision_config']['fpn_hidden_size']} {c['vision_config']['scale_factors']}; "
            f"text {t['hidden_size']}/{t['num_attention_heads']}h x{t['num_hidden_layers']} {t['hidden_act']} "
            f"maxpos {t['max_position_embeddings']}; geo x{c['geometry_encoder_config']['num_layers']} "
            f"roi {c['geometry_encoder_config']['roi_size']}; enc x{c['detr_encoder_config']['num_layers']}; "
            f"dec x{c['detr_decoder_config']['num_layers']} q{c['detr_decoder_config']['num_queries']}; "
            f"mask stages {c['mask_decoder_config']['num_upsampling_stages']}; B {case['batch']} T {case['seq_len']} "
            f"lens {case['text_lengths']} left-padded {case.get('left_padded', [])} labels {case['box_labels']}")


def build_config(case):
    kw = json.loads(json.dumps(case["config"]))  # deep copy
    kw["vision_config"]["backbone_config"] = Sam3ViTConfig(**kw["vision_config"]["backbone_config"])
    kw["vision_config"] = Sam3VisionConfig(**kw["vision_config"])
    kw["text_config"] = CLIPTextConfig(**kw["text_config"])
    cfg = Sam3Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def check_constraints(cfg):
    """What transformers' modeling code itself needs (a config outside these fails inside HF, not in a port).

    A patch grid that is not a multiple of window_size is legal (HF pads the windows), as are a window larger than
    the grid, window_size 0 (every block global), no global block at all, a pretrain grid smaller or larger than the
    grid (tiled), an odd grid with a 0.5 level (max-pool floors) and any order of the scale factors."""
    vit = cfg.vision_config.backbone_config
    sizes = [vit.image_size] * 2 if isinstance(vit.image_size, int) else list(vit.image_size)
    pre = [vit.pretrain_image_size] * 2 if isinstance(vit.pretrain_image_size, int) else list(vit.pretrain_image_size)
    assert isinstance(vit.patch_size, int), "transformers' ViT divides by patch_size: it must be an int"
    assert pre[0] == pre[1], "the pretrain position table is square (transformers takes its square root)"
    grid = min(sizes) // vit.patch_size
    assert all(s % vit.patch_size == 0 for s in sizes)
    assert pre[0] >= vit.patch_size, "pretrain grid of at least one patch"
    assert vit.hidden_size % vit.num_attention_heads == 0
    assert (vit.hidden_size // vit.num_attention_heads) % 4 == 0, "ViT head_dim must be divisible by 4"
    assert vit.hidden_size % 4 == 0
    assert all(s in (4.0, 2.0, 1.0, 0.5) for s in cfg.vision_config.scale_factors)
    assert len(cfg.vision_config.scale_factors) >= 2, "Sam3Model drops the last level: at least one must remain"
    if 0.5 in cfg.vision_config.scale_factors:
        assert grid >= 2
    d = cfg.vision_config.fpn_hidden_size
    for sub in (cfg.geometry_encoder_config, cfg.detr_encoder_config, cfg.detr_decoder_config,
                cfg.mask_decoder_config):
        assert sub.hidden_size == d, "all 256-family hidden sizes must equal fpn_hidden_size"
        assert sub.hidden_size % sub.num_attention_heads == 0
    assert cfg.mask_decoder_config.hidden_size % 8 == 0, "GroupNorm(8, C)"
    assert cfg.detr_decoder_config.num_layers >= 1
    kept = len(cfg.vision_config.scale_factors) - 1
    assert cfg.mask_decoder_config.num_upsampling_stages >= kept - 1
    t = cfg.text_config
    assert t.hidden_size % t.num_attention_heads == 0


# --------------------------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------------------------

def _normal(gen, shape, std, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


# Extra gain on a few output projections whose natural scale would be small (so that the logits spread over a
# few units instead of a few tenths, which makes the parity comparison more discriminating).
WEIGHT_GAIN = [
    (r"^dot_product_scoring\.(text_proj|query_proj)\.weight$", 2.5),
    (r"^detr_decoder\.presence_head\.layer3\.weight$", 3.0),
]


def _gain(name):
    for pat, g in WEIGHT_GAIN:
        if re.search(pat, name):
            return g
    return 1.0


@torch.no_grad()
def randomize_parameters(model, gen):
    """Overwrite every parameter. Weights ~ N(0, 1/fan_in) (activations stay O(1) so no softmax/clamp saturates),
    biases ~ N(0, 0.05²), norm weights ~ 1 + N(0, 0.1²), norm biases ~ N(0, 0.1²), embeddings ~ N(0, σ²) with σ
    chosen per table. Parameters are visited in sorted-name order so the result is reproducible."""
    owner = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (mod, pname)
    done = set()
    for name in sorted(owner):
        mod, pname = owner[name]
        p = getattr(mod, pname)
        shape = tuple(p.shape)
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            val = _normal(gen, shape, 0.1, 1.0) if pname == "weight" else _normal(gen, shape, 0.1)
        elif isinstance(mod, nn.Linear):
            val = _normal(gen, shape, 1.0 / math.sqrt(shape[1])) if pname == "weight" else _normal(gen, shape, 0.05)
        elif isinstance(mod, nn.ConvTranspose2d):
            # weight (in, out, k, k) with k == stride: every output pixel sees `in` inputs
            val = _normal(gen, shape, 1.0 / math.sqrt(shape[0])) if pname == "weight" else _normal(gen, shape, 0.05)
        elif isinstance(mod, nn.Conv2d):
            fan_in = shape[1] * shape[2] * shape[3] if pname == "weight" else 1
            val = _normal(gen, shape, 1.0 / math.sqrt(fan_in)) if pname == "weight" else _normal(gen, shape, 0.05)
        elif isinstance(mod, nn.Embedding):
            if name.endswith("reference_points.weight"):
                val = _normal(gen, shape, 1.0)  # -> sigmoid: boxes spread over the image, not saturated
            elif name.endswith("position_embedding.weight"):
                val = _normal(gen, shape, 0.5)
            else:  # token table, query_embed, presence_token, label_embed, cls_embed
                val = _normal(gen, shape, 1.0)
        elif name.endswith("embeddings.position_embeddings"):  # ViT abs pos (1, pretrain_grid², C)
            val = _normal(gen, shape, 0.5)
        else:
            raise RuntimeError(f"no randomization rule for parameter {name} ({type(mod).__name__})")
        p.copy_(val * _gain(name))
        done.add(name)
    all_names = {n for n, _ in model.named_parameters()}
    missing = all_names - done
    assert not missing, f"parameters not randomized: {sorted(missing)}"


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------

def make_inputs(case, cfg, gen):
    B, T = case["batch"], case["seq_len"]
    vit = cfg.vision_config.backbone_config
    S = vit.image_size
    H, W = (S, S) if isinstance(S, int) else S
    vocab = cfg.text_config.vocab_size
    bos, eos = cfg.text_config.bos_token_id, cfg.text_config.eos_token_id
    pixel_values = torch.randn((B, vit.num_channels, H, W), generator=gen, dtype=torch.float32)
    input_ids = torch.full((B, T), eos, dtype=torch.int64)
    attention_mask = torch.zeros((B, T), dtype=torch.int64)
    for b, n in enumerate(case["text_lengths"]):
        assert 2 <= n <= T
        words = torch.randint(1, vocab - 2, (n - 2,), generator=gen, dtype=torch.int64)
        o = T - n if b in case.get("left_padded", ()) else 0  # (sweep: some samples padded on the left)
        input_ids[b, o] = bos
        input_ids[b, o + 1:o + n - 1] = words
        input_ids[b, o + n - 1] = eos
        attention_mask[b, o:o + n] = 1
    strict = not case.get("sweep")
    assert (attention_mask == 0).any() or not strict, "at least one sample must be padded"
    labels = torch.tensor(case["box_labels"], dtype=torch.int64)
    assert labels.dim() == 2 and labels.shape[0] == B
    N = labels.shape[1]
    u = torch.rand((B, N, 4), generator=gen, dtype=torch.float32)
    cxcy = 0.2 + 0.6 * u[..., :2]
    wh = 0.1 + 0.4 * u[..., 2:]
    input_boxes = torch.cat([cxcy, wh], dim=-1).contiguous()
    for (b, n), box in case.get("box_overrides", {}).items():
        input_boxes[b, n] = torch.tensor(box, dtype=torch.float32)
    assert (labels == 1).any() and (labels == 0).any() or not strict
    return OrderedDict(
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=attention_mask,
        input_boxes=input_boxes,
        input_boxes_labels=labels,
    )


# --------------------------------------------------------------------------------------------------------------
# Capturing
# --------------------------------------------------------------------------------------------------------------

def _flatten(prefix, value, out):
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, transformers.utils.ModelOutput):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    # python scalars / None / bool flags (output_hidden_states=True ...) are not stored


class Recorder:
    """Forward hooks (with kwargs) that record the inputs and outputs of the component modules."""

    def __init__(self):
        self.active = False
        self.records = OrderedDict()
        self.handles = []

    def add(self, module, prefix, store_inputs=True, store_output=True, output_name=None):
        def hook(mod, args, kwargs, output):
            if not self.active:
                return
            rec = OrderedDict()
            if store_inputs:
                names = [n for n, prm in inspect.signature(mod.forward).parameters.items()
                         if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD)]
                for i, a in enumerate(args):
                    _flatten(f"{prefix}.in.{names[i] if i < len(names) else i}", a, rec)
                for k, v in kwargs.items():
                    _flatten(f"{prefix}.in.{k}", v, rec)
            if store_output:
                if output_name is not None and isinstance(output, torch.Tensor):
                    rec[f"{prefix}.{output_name}"] = output
                else:
                    _flatten(prefix, output, rec)
            for k, v in rec.items():
                assert k not in self.records, f"{k} recorded twice (module called twice?)"
                self.records[k] = v.detach().clone()

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def to_storable(t):
    t = t.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    elif t.is_floating_point():
        t = t.to(torch.float32)
    elif t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        t = t.to(torch.int64)
    assert t.dtype in (torch.float32, torch.int64), t.dtype
    return t.contiguous().clone()


class TensorStore:
    """Ordered tensor dict that replaces exact duplicates with aliases."""

    def __init__(self, external=None):
        self.tensors = OrderedDict()
        self.aliases = OrderedDict()
        self.order = []  # every name (stored or alias) in insertion order
        self.external = external or OrderedDict()  # name -> tensor that lives in another file (inputs:<name>)

    def _find(self, t):
        for prefix, pool in (("inputs:", self.external), ("", self.tensors)):
            for n, u in pool.items():
                if u.dtype == t.dtype and u.shape == t.shape and torch.equal(u, t):
                    return prefix + n
        return None

    def put(self, name, t, allow_alias=True):
        assert name not in self.tensors and name not in self.aliases, name
        t = to_storable(t)
        target = self._find(t) if allow_alias else None
        self.order.append(name)
        if target is not None:
            self.aliases[name] = target
        else:
            self.tensors[name] = t

    def get(self, name):
        if name in self.tensors:
            return self.tensors[name]
        target = self.aliases[name]
        if target.startswith("inputs:"):
            return self.external[target[len("inputs:"):]]
        return self.tensors[target]

    def names(self):
        return list(self.order)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------

FINAL_FIELDS = ["pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg"]


def run_case(name, case, out_root, grad_check=True):
    torch.manual_seed(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    cfg = build_config(case)
    check_constraints(cfg)
    model = Sam3Model(cfg)
    model.eval()
    randomize_parameters(model, gen)

    # every attention path must be eager
    for sub in model.modules():
        c = getattr(sub, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            assert c._attn_implementation in (None, "eager"), (type(sub).__name__, c._attn_implementation)

    inputs = make_inputs(case, cfg, gen)

    rec = Recorder()
    rec.add(model.vision_encoder, "vision", store_inputs=True)
    rec.add(model.text_encoder, "text.clip", store_inputs=False)
    rec.add(model.text_projection, "text.projection", store_inputs=False, output_name="out")
    rec.add(model.geometry_encoder, "geometry")
    rec.add(model.detr_encoder, "encoder")
    rec.add(model.detr_decoder, "decoder")
    rec.add(model.dot_product_scoring, "scoring", output_name="out")
    rec.add(model.mask_decoder, "mask")

    with torch.no_grad():
        rec.active = True
        out = model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            input_boxes=inputs["input_boxes"],
            input_boxes_labels=inputs["input_boxes_labels"],
            output_hidden_states=True,
        )
        rec.active = False
        r = rec.records

        # the text-only path (HF skips the geometry encoder when there are no boxes)
        out_text = model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )

        # cross-checks with the public helpers
        vis = model.get_vision_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        clip_all = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      output_hidden_states=True)

        # all-layer box predictions, exactly as Sam3Model.forward computes them before taking [-1]
        dec_h = r["decoder.intermediate_hidden_states"]
        all_boxes_cxcywh = (hf_sam3.inverse_sigmoid(r["decoder.reference_boxes"])
                            + model.detr_decoder.box_head(dec_h)).sigmoid()
        all_boxes_xyxy = hf_sam3.box_cxcywh_to_xyxy(all_boxes_cxcywh)
    rec.remove()
    if os.environ.get("SAM3_FIXTURE_DEBUG"):
        for k, v in r.items():
            print(f"   rec {k} {tuple(v.shape)} {v.dtype}")

    # ---- sanity checks -------------------------------------------------------------------------------------
    for i, t in enumerate(vis.fpn_hidden_states):
        assert torch.equal(t, r[f"vision.fpn_hidden_states.{i}"])
    assert torch.equal(vis.last_hidden_state, r["vision.last_hidden_state"])
    assert torch.equal(txt.pooler_output, r["text.projection.out"])
    assert torch.equal(clip_all.last_hidden_state, r["text.clip.last_hidden_state"])
    assert torch.equal(all_boxes_xyxy[-1], out.pred_boxes)
    assert torch.equal(r["scoring.out"][-1].squeeze(-1), out.pred_logits)
    for k in FINAL_FIELDS:
        assert torch.isfinite(getattr(out, k)).all(), k
        assert torch.isfinite(getattr(out_text, k)).all(), k
    pl, pr = out.pred_logits, out.presence_logits
    if not case.get("sweep"):  # (a swept config is checked as it comes: a saturated output is still compared)
        assert pl.abs().max() < 11.0, f"pred_logits near the ±12 clamp: {pl.abs().max()}"
        assert r["decoder.presence_logits"].abs().max() < 9.0, "presence logits near the ±10 clamp"
        assert pl.std() > 0.05 and out.pred_boxes.std() > 0.01 and out.pred_masks.std() > 0.05
    for i, t in enumerate(vis.fpn_position_encoding):
        assert torch.equal(t, t[:1].expand_as(t)), "position encodings are batch-independent"

    # ---- write model/config ------------------------------------------------------------------------------
    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    model.save_pretrained(d, safe_serialization=True, max_shard_size="1GB")
    files = sorted(os.listdir(d))
    assert files == ["config.json", "model.safetensors"], files
    saved = load_file(os.path.join(d, "model.safetensors"))
    sd = model.state_dict()
    assert set(saved) == set(sd), (set(saved) ^ set(sd))
    for k, v in sd.items():
        assert torch.equal(saved[k], v), k
    # the stored config must rebuild the same model
    reloaded = Sam3Model.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        out2 = reloaded(**inputs)
    assert torch.allclose(out2.pred_masks, out.pred_masks, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out2.pred_logits, out.pred_logits, atol=1e-5, rtol=1e-5)

    # ---- inputs -------------------------------------------------------------------------------------------
    inputs_st = OrderedDict((k, to_storable(v)) for k, v in inputs.items())
    # (one metadata key only: safetensors writes the metadata map in random order, which would make the file
    # bytes differ between runs)
    save_file(inputs_st, os.path.join(d, "inputs.safetensors"),
              metadata={"generator": f"tools/gen_sam3_fixtures.py case {name}"})

    # ---- outputs ------------------------------------------------------------------------------------------
    st = TensorStore(external=inputs_st)
    for k in FINAL_FIELDS:
        st.put(k, getattr(out, k))
    st.put("decoder_reference_boxes", out.decoder_reference_boxes)

    # vision
    st.put("vision.last_hidden_state", r["vision.last_hidden_state"])
    n_lvl = len(vis.fpn_hidden_states)
    for i in range(n_lvl):
        st.put(f"vision.fpn.{i}", r[f"vision.fpn_hidden_states.{i}"])
    for i in range(n_lvl):
        st.put(f"vision.fpn_pos.{i}", r[f"vision.fpn_position_encoding.{i}"])
    n_vh = cfg.vision_config.backbone_config.num_hidden_layers + 1
    for i in range(n_vh):
        st.put(f"vision.hidden_states.{i}", r[f"vision.hidden_states.{i}"])
    assert f"vision.hidden_states.{n_vh}" not in r
    st.put("vision.in.pixel_values", r["vision.in.pixel_values"])

    # text
    st.put("text.features", r["text.projection.out"])
    st.put("text.clip_last_hidden_state", r["text.clip.last_hidden_state"])
    for i, h in enumerate(clip_all.hidden_states):
        st.put(f"text.clip_hidden_states.{i}", h)

    def put_prefix(prefix, rename=None):
        rename = rename or {}
        for k, v in r.items():
            if k.startswith(prefix + "."):
                st.put(rename.get(k, k), v)

    # geometry (named features/mask as in the brief + the HF field names)
    if "geometry.last_hidden_state" in r:  # (no boxes: HF skips the geometry encoder)
        st.put("geometry.features", r["geometry.last_hidden_state"])
        st.put("geometry.mask", r["geometry.attention_mask"])
    put_prefix("geometry")
    put_prefix("encoder")
    put_prefix("decoder")
    put_prefix("scoring")
    st.put("heads.all_pred_boxes", all_boxes_xyxy)
    st.put("heads.all_pred_logits", r["scoring.out"].squeeze(-1))
    put_prefix("mask")

    st.put("textonly.pred_logits", out_text.pred_logits)
    st.put("textonly.pred_boxes", out_text.pred_boxes)
    st.put("textonly.presence_logits", out_text.presence_logits)

    # every recorded tensor must have landed somewhere
    stored = set(st.names())
    for k in r:
        if k.startswith(("vision.fpn_hidden_states.", "vision.fpn_position_encoding.")):
            continue
        if k.startswith(("text.",)):
            continue
        assert k in stored, f"recorded but not stored: {k}"

    save_file(st.tensors, os.path.join(d, "outputs.safetensors"),
              metadata={"aliases": json.dumps(st.aliases)})

    # read back and resolve every name
    with safe_open(os.path.join(d, "outputs.safetensors"), "pt") as f:
        meta = f.metadata()
        aliases = json.loads(meta["aliases"])
        keys = set(f.keys())
    for a, t in aliases.items():
        assert (t[len("inputs:"):] in inputs_st) if t.startswith("inputs:") else (t in keys), (a, t)

    grad_report = check_all_params_matter(model, inputs, cfg) if grad_check else None

    return dict(model=model, cfg=cfg, inputs=inputs_st, store=st, dir=d, grad_report=grad_report,
                out=out, out_text=out_text)


# Parameters that no forward path uses (also dead in the real model). The neck's last level and the pixel-decoder
# stages past the kept levels depend on the config (SAM3 and tiny_a/tiny_b: fpn_layers.3, stage 2).
def expected_dead(cfg):
    levels = len(cfg.vision_config.scale_factors)
    stages = cfg.mask_decoder_config.num_upsampling_stages
    unused = "|".join(str(s) for s in range(levels - 2, stages))
    pats = [
        r"^text_encoder\.text_projection\.weight$",          # CLIP's own projection (EOS-pooled), unused by Sam3
        rf"^vision_encoder\.neck\.fpn_layers\.{levels - 1}\.",  # last FPN level, dropped by Sam3Model.forward
    ]
    if unused:  # upsampling stages past the kept levels never run
        pats.append(rf"^mask_decoder\.pixel_decoder\.(conv_layers|norms)\.({unused})\.")
    return pats


def check_all_params_matter(model, inputs, cfg):
    """Back-propagate a random projection of all outputs; every parameter except the known-dead ones must get a
    non-zero gradient (i.e. the fixture actually tests it)."""
    gen = torch.Generator().manual_seed(99)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(**inputs)
        loss = 0.0
        for k in FINAL_FIELDS:
            t = getattr(out, k)
            loss = loss + (t * torch.randn(t.shape, generator=gen)).sum()
        loss.backward()
    dead, live = [], 0
    for n, p in model.named_parameters():
        if p.grad is None or not torch.any(p.grad != 0):
            dead.append(n)
        else:
            live += 1
    pats = expected_dead(cfg)
    unexpected = [n for n in dead if not any(re.search(pat, n) for pat in pats)]
    missing_dead = [pat for pat in pats if not any(re.search(pat, n) for n in dead)]
    assert not unexpected, f"parameters with zero gradient: {unexpected}"
    assert not missing_dead, f"expected-dead parameters got a gradient: {missing_dead}"
    model.zero_grad(set_to_none=True)
    return dict(live=live, dead=dead)


# --------------------------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------------------------

# (regex on the tensor name, meaning / producing HF code). First match wins.
DESCRIPTIONS = [
    (r"^pixel_values$", "input image, N(0,1) noise (already 'normalized'; no resize/normalize needed)"),
    (r"^input_ids$", "token ids: [BOS=vocab-2, random words in [1,vocab-2), EOS=vocab-1], right-padded with EOS "
                   "(tiny_c sample 0: left-padded)"),
    (r"^attention_mask$", "1 = valid token, 0 = padding"),
    (r"^input_boxes$", "box prompts, normalized cxcywh (cx,cy in 0.2..0.8, w,h in 0.1..0.5); tiny_b box [0,2] "
                       "crosses the right/top image border, tiny_c box [1,0] is larger than the image and [1,2] "
                       "crosses its top-right corner"),
    (r"^input_boxes_labels$", "1 = positive, 0 = negative, -10 = padding box (HF convention)"),
    (r"^pred_logits$", "`Sam3Model.forward` output: last-layer dot-product logits (clamped ±12)"),
    (r"^pred_boxes$", "`Sam3Model.forward` output: last-layer boxes, **xyxy** normalized"),
    (r"^presence_logits$", "`Sam3Model.forward` output: last-layer presence logit (clamped ±10)"),
    (r"^pred_masks$", "`Sam3Model.forward` output: mask logits (B,Q,s₀g,s₀g), s₀ = scale_factors[0]"),
    (r"^semantic_seg$", "`Sam3Model.forward` output: semantic logits"),
    (r"^decoder_reference_boxes$", "`Sam3Model.forward` output: input reference boxes (cxcywh) of each decoder layer"),
    (r"^vision\.last_hidden_state$", "`Sam3ViTModel` output (via `Sam3VisionModel`): **(B, g², C_vit)** row-major "
                                     "tokens (HF reshapes (B,g,g,C) to (B,g·g,C)); no final norm"),
    (r"^vision\.fpn\.(\d)$", "`Sam3VisionNeck` level i (scale_factors[i]: 4,2,1,0.5; tiny_c 2,1,0.5), "
                             "`get_vision_features().fpn_hidden_states[i]`, (B,C,h,w); the last level is computed by "
                             "HF but dropped by `Sam3Model.forward`"),
    (r"^vision\.fpn_pos\.(\d)$", "`Sam3SinePositionEmbedding` (normalize=True, 2π) for level i, "
                                 "`fpn_position_encoding[i]`, channels [pos_y, pos_x]; identical for every batch entry"),
    (r"^vision\.hidden_states\.(\d+)$", "ViT `hidden_states[i]` (B,g,g,C_vit): [0] = input of layer 0 (patch "
                                        "embed + tiled abs pos, after `layer_norm`/ln_pre), [i] = output of "
                                        "`Sam3ViTLayer` i−1; the last equals vision.last_hidden_state reshaped"),
    (r"^vision\.in\.", "input of `model.vision_encoder`"),
    (r"^text\.features$", "`Sam3Model.get_text_features(...).pooler_output` = `model.text_projection` "
                          "(Linear text_hidden→d) of the CLIP last_hidden_state: the text prompt tokens (B,T,d)"),
    (r"^text\.clip_last_hidden_state$", "`model.text_encoder` (CLIPTextModelWithProjection) `.last_hidden_state`: "
                                        "after final_layer_norm, before the projection"),
    (r"^text\.clip_hidden_states\.(\d+)$", "CLIP `hidden_states[i]` (separate call with output_hidden_states=True): "
                                           "[0] = token+position embeddings, [i] = output of CLIP layer i−1 "
                                           "(before final_layer_norm)"),
    (r"^geometry\.features$", "`Sam3GeometryEncoder` output `.last_hidden_state`: geometry prompt tokens "
                              "(B,N+1,d) = boxes packed with the CLS token after the valid boxes"),
    (r"^geometry\.mask$", "`Sam3GeometryEncoder` output `.attention_mask` (bool→i64, 1 = valid)"),
    (r"^geometry\.last_hidden_state$", "HF field name of geometry.features"),
    (r"^geometry\.attention_mask$", "HF field name of geometry.mask"),
    (r"^geometry\.in\.box_embeddings$", "geometry encoder input: the boxes (cxcywh)"),
    (r"^geometry\.in\.box_mask$", "geometry encoder input: `input_boxes_labels != -10` (bool→i64)"),
    (r"^geometry\.in\.box_labels$", "geometry encoder input: labels with -10 replaced by 0"),
    (r"^geometry\.in\.img_feats\.(\d)$", "geometry encoder input: the kept FPN levels (all but the last; only "
                                         "the last of them is used)"),
    (r"^geometry\.in\.img_pos_embeds\.(\d)$", "geometry encoder input: their position encodings"),
    (r"^encoder\.in\.vision_features\.0$", "`Sam3DetrEncoder` input: the last kept FPN level (the g×g one in "
                                          "every case here; list of one map)"),
    (r"^encoder\.in\.vision_pos_embeds\.0$", "`Sam3DetrEncoder` input: its sine position map"),
    (r"^encoder\.in\.text_features$", "`Sam3DetrEncoder` input: prompt = cat(text.features, geometry.features) "
                                      "along the sequence (B,T+N+1,d)"),
    (r"^encoder\.in\.text_mask$", "`Sam3DetrEncoder` input: prompt mask = cat(attention_mask, geometry.mask) "
                                  "(bool→i64, 1 = valid)"),
    (r"^encoder\.last_hidden_state$", "`Sam3DetrEncoder` output: fused image memory (B,g²,d)"),
    (r"^encoder\.pos_embeds_flattened$", "`Sam3DetrEncoder` output: flattened sine pos of the g×g level (B,g²,d)"),
    (r"^encoder\.text_features$", "`Sam3DetrEncoder` output: the prompt, returned unchanged"),
    (r"^encoder\.spatial_shapes$", "`Sam3DetrEncoder` output: [[g, g]]"),
    (r"^encoder\.hidden_states\.(\d+)$", "`hidden_states[i]` (output_hidden_states=True): [0] = input of layer 0 "
                                         "(flattened level), [i] = output of `Sam3DetrEncoderLayer` i−1"),
    (r"^decoder\.in\.", "`Sam3DetrDecoder` input (kwarg of the same name)"),
    (r"^decoder\.intermediate_hidden_states$", "`Sam3DetrDecoder` output: output_layer_norm(queries) after "
                                               "each layer (L,B,Q,d)"),
    (r"^decoder\.reference_boxes$", "`Sam3DetrDecoder` output: input reference boxes of each layer, cxcywh "
                                    "(L,B,Q,4); [0] = sigmoid(reference_points)"),
    (r"^decoder\.presence_logits$", "`Sam3DetrDecoder` output: presence logit of each layer (L,B,1), clamped ±10"),
    (r"^decoder\.hidden_states\.(\d+)$", "`hidden_states[i]` (output_hidden_states=True), (B,1+Q,d), row 0 = "
                                         "presence token, **not** normed: [0] = [presence_token; query_embed], "
                                         "[i] = raw output of `Sam3DetrDecoderLayer` i−1"),
    (r"^scoring\.in\.", "`Sam3DotProductScoring` input"),
    (r"^scoring\.out$", "`Sam3DotProductScoring` output: logits of every layer (L,B,Q,1), clamped ±12"),
    (r"^heads\.all_pred_boxes$", "every layer's boxes, xyxy: box_cxcywh_to_xyxy(sigmoid(inverse_sigmoid("
                                 "decoder.reference_boxes) + box_head(decoder.intermediate_hidden_states))) — "
                                 "the aux-loss boxes; [-1] = pred_boxes"),
    (r"^heads\.all_pred_logits$", "scoring.out squeezed (L,B,Q): the aux-loss logits; [-1] = pred_logits"),
    (r"^mask\.in\.decoder_queries$", "`Sam3MaskDecoder` input: decoder.intermediate_hidden_states[-1] (B,Q,d)"),
    (r"^mask\.in\.backbone_features\.(\d)$", "`Sam3MaskDecoder` input: the kept FPN levels (the last is replaced "
                                             "by the encoder memory inside)"),
    (r"^mask\.in\.", "`Sam3MaskDecoder` input"),
    (r"^mask\.pred_masks$", "`Sam3MaskDecoder` output"),
    (r"^mask\.semantic_seg$", "`Sam3MaskDecoder` output"),
    (r"^textonly\.", "same inputs **without** input_boxes: HF skips the geometry encoder (prompt = text only)"),
]


def describe(name):
    for pat, text in DESCRIPTIONS:
        if re.search(pat, name):
            return text
    return ""


def shape_str(t):
    return "(" + ",".join(str(s) for s in t.shape) + ")"


def dtype_str(t):
    return {torch.float32: "f32", torch.int64: "i64"}[t.dtype]


def write_readme(out_root, results):
    names = list(results)
    per_case = OrderedDict()  # case -> OrderedDict((file, name) -> (shape, dtype, alias))
    for case, res in results.items():
        d = OrderedDict()
        for k, v in res["inputs"].items():
            d[("inputs", k)] = (shape_str(v), dtype_str(v), None)
        st = res["store"]
        for k in st.names():
            v = st.get(k)
            d[("outputs", k)] = (shape_str(v), dtype_str(v), st.aliases.get(k))
        per_case[case] = d

    # merged row order: a name missing from an earlier case goes right after its predecessor in its own case
    merged = []
    for case, d in per_case.items():
        prev = None
        for key in d:
            if key not in merged:
                merged.insert(merged.index(prev) + 1 if prev is not None else len(merged), key)
            prev = key

    # collapse `<stem>.<i>` rows whose shape/dtype/alias-ness agree within each case into `<stem>.<i>` with a range
    rows = OrderedDict()  # (file, display name) -> {case: cell}, dtype
    skip = set()
    for key in merged:
        if key in skip:
            continue
        f, k = key
        m = re.match(r"^(.*)\.(\d+)$", k)
        group = None
        if m:
            stem = m.group(1)
            group = [kk for kk in merged if kk[0] == f and re.match(rf"^{re.escape(stem)}\.\d+$", kk[1])]
            ok = len(group) > 1
            for case, d in per_case.items():
                vals = [d[kk] for kk in group if kk in d]
                if len({(v[0], v[1]) for v in vals}) > 1 or any(v[2] for v in vals):
                    ok = False
            if not ok:
                group = None
        if group:
            skip.update(group)
            cells, dt = {}, ""
            for case, d in per_case.items():
                idx = sorted(int(kk[1].rsplit(".", 1)[1]) for kk in group if kk in d)
                if idx:
                    v = d[(f, f"{stem}.{idx[0]}")]
                    cells[case] = f"i=0..{idx[-1]}: {v[0]}" if idx == list(range(idx[-1] + 1)) else f"{idx}: {v[0]}"
                    dt = v[1]
            rows[(f, f"{stem}.<i>", k)] = (cells, dt)
        else:
            cells, dt = {}, ""
            for case, d in per_case.items():
                if key in d:
                    s_, dt, alias = d[key]
                    cells[case] = s_ + (f" = `{alias}`" if alias else "")
            rows[(f, k, k)] = (cells, dt)

    def file_size(case, f):
        return os.path.getsize(os.path.join(results[case]["dir"], f))

    lines = []
    w = lines.append
    w("# SAM 3 parity fixtures (random weights, HF transformers reference)")
    w("")
    w("Generated by `tools/gen_sam3_fixtures.py` (do not edit by hand; rerun the script). Reference: "
      f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, "
      "`transformers.Sam3Model`, fp32, `attn_implementation=\"eager\"`, `model.eval()`, CPU, deterministic.")
    w("")
    w("Each directory holds one tiny configuration:")
    w("")
    w("| file | content |")
    w("|---|---|")
    w("| `config.json` | HF `Sam3Config` (`model_type: sam3`), from `model.save_pretrained` |")
    w("| `model.safetensors` | the `Sam3Model` state dict, exact HF keys (no `detector_model.` prefix), f32, single file |")
    w("| `inputs.safetensors` | the forward inputs |")
    w("| `outputs.safetensors` | final outputs + per-component inputs/outputs (table below) |")
    w("")
    w("Regenerate (CPU, ~15 s; byte-identical output with the same torch build): `pip install torch torchvision "
      "transformers safetensors` then `python3 tools/gen_sam3_fixtures.py` (`--out DIR` to write elsewhere; "
      "`--only NAME` writes that case alone and leaves the others' files as they are, e.g. to add a case: another "
      "torch build or CPU changes the last bits of some outputs). torchvision is required: HF's "
      "geometry encoder calls `torchvision.ops.roi_align`. A full-size random checkpoint in the hub layouts "
      "(not committed) comes from `tools/gen_sam3_fullsize.py`; random configurations for a parity sweep from "
      "`--sweep N` (see the end of this file).")
    w("")
    w("Reading `outputs.safetensors` from a test: `get(name)` = the tensor `name` if present, else "
      "`aliases[name]` from the JSON in the file's `__metadata__[\"aliases\"]` (a target `inputs:<n>` is read "
      "from `inputs.safetensors`). Everything is fp32 on CPU, so a faithful port matches to ~1e-5 relative; "
      "deep paths (ViT → encoder → decoder → masks) typically need atol ≈ 1e-4.")
    w("")
    w("Every parameter was overwritten with random values after construction (weights N(0,1/fan_in), biases "
      "N(0,0.05²), LayerNorm/GroupNorm weight 1+N(0,0.1²) and bias N(0,0.1²), embeddings and "
      "`reference_points` N(0,1), positional tables N(0,0.5²); `dot_product_scoring.{text,query}_proj.weight` ×2.5 and "
      "`detr_decoder.presence_head.layer3.weight` ×3 so that the logits spread over a few units). The generator back-propagates a random projection of all final outputs "
      "and checks that every parameter gets a non-zero gradient, except the ones that are dead in the real "
      "model too: `text_encoder.text_projection.weight` (CLIP's own projection), the neck's last level "
      "(`vision_encoder.neck.fpn_layers.3.*`, tiny_c `.2.*`) and the pixel-decoder stages past the kept levels "
      "(`mask_decoder.pixel_decoder.{conv_layers,norms}.2.*`, tiny_c `.1.*`).")
    w("")
    w("## Configurations")
    w("")
    w("| | " + " | ".join(names) + " |")
    w("|---|" + "---|" * len(names))

    def cfgrow(label, fn):
        w(f"| {label} | " + " | ".join(str(fn(results[c]["cfg"], results[c])) for c in names) + " |")

    vit = lambda c: c.vision_config.backbone_config  # noqa: E731
    cfgrow("image size / patch / grid", lambda c, r: f"{vit(c).image_size} / {vit(c).patch_size} / "
           f"{vit(c).image_size // vit(c).patch_size}")
    cfgrow("ViT hidden / heads / mlp / layers", lambda c, r: f"{vit(c).hidden_size} / {vit(c).num_attention_heads} / "
           f"{vit(c).intermediate_size} / {vit(c).num_hidden_layers}")
    cfgrow("ViT window / global layers / pretrain size", lambda c, r: f"{vit(c).window_size} / "
           f"{vit(c).global_attn_indexes} / {vit(c).pretrain_image_size}")
    cfgrow("ViT act / channels / RoPE θ", lambda c, r: f"{vit(c).hidden_act} / {vit(c).num_channels} / "
           f"{vit(c).rope_parameters['rope_theta']:g}")
    cfgrow("FPN d / scale factors", lambda c, r: f"{c.vision_config.fpn_hidden_size} / {c.vision_config.scale_factors}")
    cfgrow("text vocab / hidden / heads / mlp / layers / max_pos / proj",
           lambda c, r: f"{c.text_config.vocab_size} / {c.text_config.hidden_size} / "
           f"{c.text_config.num_attention_heads} / {c.text_config.intermediate_size} / "
           f"{c.text_config.num_hidden_layers} / {c.text_config.max_position_embeddings} / "
           f"{c.text_config.projection_dim}")
    cfgrow("text act", lambda c, r: c.text_config.hidden_act)
    cfgrow("geometry / DETR encoder / decoder act", lambda c, r: f"{c.geometry_encoder_config.hidden_act} / "
           f"{c.detr_encoder_config.hidden_act} / {c.detr_decoder_config.hidden_act}")
    cfgrow("geometry layers / heads / mlp / roi_size",
           lambda c, r: f"{c.geometry_encoder_config.num_layers} / {c.geometry_encoder_config.num_attention_heads} / "
           f"{c.geometry_encoder_config.intermediate_size} / {c.geometry_encoder_config.roi_size}")
    cfgrow("DETR encoder layers / heads / mlp", lambda c, r: f"{c.detr_encoder_config.num_layers} / "
           f"{c.detr_encoder_config.num_attention_heads} / {c.detr_encoder_config.intermediate_size}")
    cfgrow("DETR decoder layers / queries / heads / mlp", lambda c, r: f"{c.detr_decoder_config.num_layers} / "
           f"{c.detr_decoder_config.num_queries} / {c.detr_decoder_config.num_attention_heads} / "
           f"{c.detr_decoder_config.intermediate_size}")
    cfgrow("mask decoder hidden / heads / stages", lambda c, r: f"{c.mask_decoder_config.hidden_size} / "
           f"{c.mask_decoder_config.num_attention_heads} / {c.mask_decoder_config.num_upsampling_stages}")
    cfgrow("B / T / N boxes", lambda c, r: f"{r['inputs']['input_ids'].shape[0]} / "
           f"{r['inputs']['input_ids'].shape[1]} / {r['inputs']['input_boxes'].shape[1]}")
    cfgrow("text lengths", lambda c, r: r["inputs"]["attention_mask"].sum(1).tolist())
    cfgrow("left-padded samples", lambda c, r: [b for b, m in enumerate(r["inputs"]["attention_mask"].tolist())
                                                if m[0] == 0] or "—")
    cfgrow("box labels", lambda c, r: r["inputs"]["input_boxes_labels"].tolist())
    cfgrow("parameters", lambda c, r: f"{sum(p.numel() for p in r['model'].parameters()):,} in "
           f"{len(r['model'].state_dict())} tensors")
    for f in ("config.json", "model.safetensors", "inputs.safetensors", "outputs.safetensors"):
        cfgrow(f"size of {f}", lambda c, r, f=f: f"{os.path.getsize(os.path.join(r['dir'], f)):,} B")
    w("")
    w("Symbols: B batch, T text length, N boxes, C_vit ViT width, d the 256-family width (= fpn d), "
      "g ViT grid (= image/patch), Q queries, L decoder layers.")
    w("")
    w("## Storage conventions")
    w("")
    w("* Float tensors are contiguous **f32**; integer tensors **i64**. Boolean masks are stored as **i64 0/1** "
      "(1 = True = valid).")
    w("* A tensor exactly equal (dtype, shape, values) to one stored earlier is **not stored again**: its name is "
      "listed in the `aliases` entry of the safetensors metadata of `outputs.safetensors` (JSON object "
      "`alias → target`). A target `inputs:<name>` is a tensor of `inputs.safetensors`. The table marks aliases "
      "with `= target`.")
    w("* `X.in.<arg>` = the argument `<arg>` a hooked module received (forward hook with kwargs); list/tuple "
      "arguments and outputs are indexed `.0`, `.1`, …; `X.<field>` = a field of the module's `ModelOutput`.")
    w("* Masked positions (padding text tokens, padding boxes) hold whatever HF computed there; compare them only "
      "where the mask is 1 (they never influence the final outputs).")
    w("")
    w("## Tensors")
    w("")
    w("| file | name | " + " | ".join(names) + " | dtype | meaning / HF producer |")
    w("|---|---|" + "---|" * len(names) + "---|---|")
    for (f, shown, probe), (cells, dt) in rows.items():
        w(f"| {f} | `{shown}` | " + " | ".join(cells.get(c, "—") for c in names) + f" | {dt} | {describe(probe)} |")
    w("")
    w("## LayerNorm / GroupNorm eps actually constructed (read from the instantiated modules)")
    w("")
    w("| module group | kind | eps | count (" + names[0] + ") |")
    w("|---|---|---|---|")
    model0 = results[names[0]]["model"]
    eps = OrderedDict()
    for n, mod in model0.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            parts = n.split(".")
            grp = parts[0] + ".layers.*" if parts[1] == "layers" else ".".join(parts[:2])
            k_ = (grp, type(mod).__name__, mod.eps)
            eps[k_] = eps.get(k_, 0) + 1
    for (grp, kind, e), cnt in eps.items():
        w(f"| `{grp}` | {kind} | {e:g} | {cnt} |")
    w("")
    w(README_NOTES)
    w(README_TAIL)
    with open(os.path.join(out_root, "README.md"), "w") as fh:
        fh.write("\n".join(lines))


README_NOTES = """## Behaviour of the HF reference that a port must reproduce for these fixtures

* **LayerNorm eps**: ViT (`layer_norm`, `layer_norm{1,2}`) uses `layer_norm_eps` = **1e-6**; CLIP text LNs use
  the text config's 1e-5; **every other LayerNorm** (geometry, DETR encoder/decoder, scoring, mask decoder) is
  built with PyTorch's default **1e-5** — their configs' `layer_norm_eps=1e-6` is never read. GroupNorm(8, d) eps
  1e-5. GELU is exact (erf) in the ViT MLP, the FPN ×4 branch and the text MLP; ReLU elsewhere.
* **ViT**: patch conv without bias; absolute pos table (1, (pretrain/patch)², C) is *tiled* (repeat ⌊g/p⌋+1 times,
  crop to g) and added before `layer_norm` (ln_pre); no final norm. RoPE: pairs (2j, 2j+1) rotate; the first half
  of the pairs uses the **x (column)** position, the second half the **y (row)** position (HF's comment "row 0 = h"
  is wrong: `position_ids = stack([x, y])`). inv_freq_k = θ^(−4k/head_dim). Window layers use positions 0..ws−1
  inside each window; global layers use positions scaled by `window_size / g`. RoPE math is done in fp32.
  A grid that is not a multiple of the window (tiny_c: 6 and 4) is zero-padded at the bottom/right after
  `layer_norm1`, each window attends over all ws² slots (padding included, no mask), and the padding is cropped
  after attention; window_size 0 makes every block global (positions scaled by 0). The pretrain table is tiled
  from its top-left corner (tiny_c: a 4×4 table over a 6×6 grid). `num_channels`, `hidden_act`, `layer_norm_eps`
  and `rope_parameters.rope_theta` (or the older `rope_theta`) are read; `layer_scale_init_value` is not (no
  LayerScale is built).
* **Sine position maps** (FPN): y = row+1, x = col+1, normalized `v / (n + 1e-6) · 2π`, dim_t = 10000^(2⌊i/2⌋/(d/2)),
  interleaved [sin, cos], channel order **[pos_y, pos_x]**.
* **Text**: CLIP causal attention **plus** the padding mask (masked keys get `finfo(f32).min`, softmax in f32).
  Right padding means valid tokens are unaffected by pads, but the features *at* padded positions depend on it.
  Left padding (tiny_c sample 0) is taken as it comes: the valid tokens keep positions T−n…T−1 and attend to the
  valid tokens before them only. `hidden_act` is the text config's (CLIPTextConfig default `quick_gelu`; SAM3 `gelu`).
  `text.features` are all T token features (incl. pads); the 1024→256-style projection is `model.text_projection`
  (with bias), not CLIP's `text_projection` (unused).
* **Geometry encoder** (only when boxes are given): box tokens = direct Linear(4→d)(cxcywh) + Conv(roi×roi)(RoIAlign
  of LN(level-2 map) with xyxy·(W,H), output roi×roi, spatial_scale 1, sampling_ratio −1 (adaptive), aligned=False)
  + Linear(d+2→d)([pos_y(cy), pos_x(cx), **h, w**]) + label_embed[label] (label −10 → 0 first); the sequence is
  extended by one slot and the CLS token is scattered right after the *valid* boxes of each sample
  (`concat_padded_sequences`): a padding box's slot is overwritten by CLS, the slots after it keep the padding
  boxes' embeddings / zeros and are masked (tiny_b sample 1: mask [1,1,1,0]);
  then final_proj → prompt_layer_norm → layers (pre-norm: self-attn with key mask, no pos; cross-attn to the raw
  level-2 tokens with pos added to **keys only**; MLP with the config's `hidden_act`, ReLU in SAM3) →
  output_layer_norm. A sample whose boxes are all padding (tiny_c sample 0) gets the CLS token in slot 0 and
  nothing else valid.
* **Text-only path**: HF `Sam3Model.forward` **skips** the geometry encoder when `input_boxes` is None/empty, so the
  prompt is the text tokens alone (no CLS). The original Meta code always appends the CLS geometry token. The
  `textonly.*` tensors are the HF behaviour.
* **Prompt** = cat(text.features, geometry.features) with mask cat(attention_mask, geometry.mask): the text padding
  stays in the middle (no re-packing). All key masks are additive `finfo(f32).min`.
* **DETR encoder**: pre-norm; self-attn q = k = LN(x)+pos, v = LN(x); cross-attn to the prompt without pos; no
  final norm; prompt returned unchanged.
* **DETR decoder**: post-norm; presence token prepended (its query_pos is 0); query_pos = ref_point_head(sine of the
  reference box, order **[y, x, w, h]**, 2π, no normalization); boxRPB bias from grid coords i/H, j/W (not pixel
  centres), log transform `sign(8v)·log2(|8v|+1)/3`, bias[b,h,q,i·W+j] = mlp_y[i] + mlp_x[j], zero row for the
  presence token; box refinement `sigmoid(box_head(output_layer_norm(q)) + inverse_sigmoid(ref))` with
  inverse_sigmoid clamping x to [0,1] then both x and 1−x to ≥1e-3; the next layer gets the new box detached.
  Presence logit = presence_head(presence_layer_norm(p)) clamped to **±10**. `decoder.hidden_states.i` are the raw
  (un-normed) layer outputs including the presence row.
* **Scoring**: prompt' = LN(prompt + MLP(prompt)) (MLP hidden = decoder intermediate_size); masked mean over valid
  prompt tokens (count clamped ≥ 1); logits = query_proj(h) · text_proj(pooled) / √d, clamped **±12**.
* **Outputs**: `pred_boxes` are **xyxy** (ORIG returns cxcywh); `decoder.reference_boxes` / `decoder_reference_boxes`
  are the *input* boxes of each layer (cxcywh), so layer ℓ's prediction is recomputed from them (`heads.*`).
* **FPN levels**: `Sam3Model.forward` drops the **last** level of `scale_factors` whatever its scale and keeps the
  others in their order; the geometry encoder, the DETR encoder and the mask decoder's memory use the last kept one
  (g×g for SAM3's [4, 2, 1, 0.5] and tiny_c's [2, 1, 0.5]).
* **Mask decoder**: encoder memory += CrossAttn(LN(memory), prompt, prompt, key mask) (pre-norm, no pos); pixel
  decoder starts from that memory as a map of the last kept level's size, then for the other kept levels from the
  last to the first: nearest-resize to the level's size, add the FPN level, conv3×3 → GroupNorm(8) → ReLU using
  stage index 0, 1, … (SAM3 and tiny_a/b: stages 0, 1, stage 2 unused; tiny_c: stage 0, stage 1 unused);
  pred_masks = einsum(mask_embedder(decoder.intermediate_hidden_states[-1]), instance_projection(pixels));
  semantic_seg = semantic_projection(pixels).
"""


README_TAIL = """## `tiny_a_original/`: Meta's original checkpoint format

`sam3.pt` holds tiny_a's weights converted to the layout of Meta's `sam3.pt` (`{"model": state_dict}`,
keys `detector.*` with fused `attn.qkv` / `in_proj_*`, the cls row of `pos_embed`, the transposed
CLIP `text_projection`, and the tensors transformers drops: complex `freqs_cis` buffers,
`points_*`, `sam2_convs.*`, plus a few `tracker.*` tensors), with tiny_a's `config.json` beside it.
Regenerate with `python3 tools/gen_sam3_original_fixture.py`. `host/tests/sam3_original.rs` checks
that lorahost's rename rules recover the transformers tensors bit for bit and reproduce tiny_a's
outputs.

## Sweep: random configurations (not committed)

`python3 tools/gen_sam3_fixtures.py --sweep N --sweep-seed S --out DIR` writes N random configurations that
transformers runs (`random_case(seed)`, seeds S…S+N−1) to `DIR/sweep_<seed>/` — the same four files plus
`case.txt`, a one-line description — and lists them in `DIR/sweep_dirs.txt`. They vary every field the modeling
code reads: ViT width, heads, head_dim (4…16), depth, MLP width, patch (2…14), grid (2…12), window 0…grid+1 (padded
windows), global blocks (none, all, first, last, out-of-range indexes), pretrain size (smaller, larger, not a
multiple of the patch), input channels, activation, LayerNorm eps, RoPE θ (`rope_parameters` or `rope_theta`), sizes
as `[s, s]`, LayerScale set; FPN width and scale-factor lists (2…5 levels, any order, repeated levels); CLIP width,
heads, depth, MLP, activation, eps, context length, projection; geometry/DETR encoder depth (0…3), decoder depth,
queries, heads, MLP widths, activations, ignored eps; roi size; mask-decoder heads and stages; batch 1…3, text
lengths, left padding, 0…4 boxes with padding labels, samples with padding boxes only, boxes at, across and beyond
the borders. Then

    LORAHOST_SAM3_PARITY_DIRS=$(cat DIR/sweep_dirs.txt) cargo test --release -p lorahost --test sam3_model -- --ignored matches_transformers_dirs

runs the parity check of tiny_a/b/c on each (a failure names the mismatching outputs, the case and the first
component that differs). A config transformers itself cannot run is reported and skipped by the generator.
"""


def sweep(out_root, first_seed, count):
    """Generate `count` random configurations; a configuration transformers itself cannot run is reported and
    skipped (it is not a legal SAM3 config). Prints one line per configuration."""
    import traceback
    written, rejected = [], []
    for seed in range(first_seed, first_seed + count):
        case = random_case(seed)
        name = f"sweep_{seed}"
        try:
            cfg = build_config(case)
            check_constraints(cfg)
        except Exception as e:  # noqa: BLE001
            rejected.append((name, f"constraint: {type(e).__name__}: {e}"))
            print(f"-- {name}: not a legal config ({e})")
            continue
        try:
            res = run_case(name, case, out_root, grad_check=False)
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc().strip().splitlines()
            rejected.append((name, f"{type(e).__name__}: {e}"))
            print(f"!! {name}: generation failed: {type(e).__name__}: {e}\n   {tb[-3] if len(tb) > 2 else ''}\n"
                  f"   {describe_case(case)}")
            continue
        with open(os.path.join(res["dir"], "case.txt"), "w") as fh:
            fh.write(describe_case(case) + "\n")
        written.append(res["dir"])
        print(f"ok {name}: {describe_case(case)}")
    with open(os.path.join(out_root, "sweep_dirs.txt"), "w") as fh:
        fh.write(":".join(written) + "\n")
    print(f"{len(written)} written, {len(rejected)} rejected; LORAHOST_SAM3_PARITY_DIRS=$(cat "
          f"{os.path.join(out_root, 'sweep_dirs.txt')})")
    for n, why in rejected:
        print(f"   rejected {n}: {why}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", choices=list(CASES), action="append")
    ap.add_argument("--skip-grad-check", action="store_true")
    ap.add_argument("--sweep", type=int, metavar="N",
                    help="instead of the committed cases, write N random configurations (random_case) to "
                         "OUT/sweep_<seed> and list the directories in OUT/sweep_dirs.txt")
    ap.add_argument("--sweep-seed", type=int, default=1, help="seed of the first swept configuration")
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        return sweep(args.out, args.sweep_seed, args.sweep)
    results = OrderedDict()
    # With --only, the other cases are regenerated into a scratch directory (the README describes them all) and
    # their committed files stay as they are: another torch build or CPU computes the last bits of some outputs
    # differently (tiny_a/tiny_b regenerated with PyPI's torch 2.15.0 build differ by <= 6e-6 from the committed
    # ones, which came from the CPU wheel), so adding a case must not rewrite the others.
    import tempfile
    scratch = tempfile.TemporaryDirectory(prefix="sam3_fixtures_")
    for name, case in CASES.items():
        if args.only and name not in args.only:
            results[name] = run_case(name, case, scratch.name, grad_check=False)
            continue
        res = run_case(name, case, args.out, grad_check=not args.skip_grad_check)
        results[name] = res
        out = res["out"]
        print(f"== {name}: {sum(p.numel() for p in res['model'].parameters()):,} params, "
              f"{len(res['model'].state_dict())} tensors")
        print(f"   pred_logits {tuple(out.pred_logits.shape)} range [{out.pred_logits.min():.3f}, "
              f"{out.pred_logits.max():.3f}]  presence {out.presence_logits.flatten().tolist()}")
        print(f"   pred_boxes {tuple(out.pred_boxes.shape)}  pred_masks {tuple(out.pred_masks.shape)}  "
              f"semantic_seg {tuple(out.semantic_seg.shape)}")
        print(f"   textonly presence {res['out_text'].presence_logits.flatten().tolist()}")
        st = res["store"]
        print(f"   outputs: {len(st.tensors)} stored tensors + {len(st.aliases)} aliases")
        if res["grad_report"]:
            print(f"   grad check: {res['grad_report']['live']} live params; dead (expected): "
                  f"{len(res['grad_report']['dead'])}")
        for f in sorted(os.listdir(res["dir"])):
            print(f"   {f:22s} {os.path.getsize(os.path.join(res['dir'], f)):>10,} B")
    write_readme(args.out, results)
    print(f"README: {os.path.join(args.out, 'README.md')}")
    scratch.cleanup()


if __name__ == "__main__":
    main()
