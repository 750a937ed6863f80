#!/usr/bin/env python3
"""Write a full-size, random-weight SAM 3 checkpoint in the exact Hugging Face hub layouts (for loader tests and
memory/speed benchmarks of the Rust port without downloading facebook/sam3). Not run in CI; output not committed.

Needs: pip install torch transformers safetensors   (torchvision too for --tiny, which runs a forward pass)

    python3 tools/gen_sam3_fullsize.py OUT_DIR [--video] [--shard-mb 1024] [--seed 0] [--std 0.02]
    python3 tools/gen_sam3_fullsize.py /tmp/sam3_tiny --tiny --video     # same code path, tiny_a config, + checks

Writes
    OUT_DIR/sam3/config.json             Sam3Config defaults (model_type "sam3", the real 840M detector)
    OUT_DIR/sam3/model.safetensors       Sam3Model state dict, exact HF keys, f32, one file (~3.4 GB)
    OUT_DIR/sam3_video/ (with --video)   the hub layout of facebook/sam3 (a Sam3VideoModel):
        config.json                      model_type "sam3_video", detector_config = the Sam3Config above
        model-0000i-of-0000n.safetensors tensors keyed "detector_model.<Sam3Model key>" + a few dummy
                                         "tracker_model.*" / "tracker_neck.*" tensors (must be ignored by a loader)
        model.safetensors.index.json     {"metadata": {"total_size": ...}, "weight_map": {key: file}}
    OUT_DIR/inputs.safetensors           pixel_values (1,3,S,S) f32, input_ids (1,T) i64, attention_mask (1,T) i64,
                                         input_boxes (1,1,4) f32 cxcywh, input_boxes_labels (1,1) i64 (= 1)
                                         (S = config image size: 1008; T = 32, or max_position_embeddings if smaller)

Weights: N(0, std²) (LayerNorm/GroupNorm weights 1 + N(0, std²)), one seeded generator per tensor (seed ^ crc32(key)),
so a key has the same values in both layouts whatever the sharding. Names/shapes come from Sam3Model built on the
`meta` device (no HF init); tensors are generated and streamed to disk one at a time (peak RAM ~ the largest tensor,
the 49408x1024 token table, ~200 MB).
"""
import argparse
import json
import os
import struct
import sys
import time
import zlib

import torch
import torch.nn as nn

from transformers import Sam3Config, Sam3Model, Sam3VideoConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# dummy tracker tensors (name, shape): a loader of the detector must skip them
DUMMY_TRACKER = [
    ("tracker_model.no_memory_embedding", (1, 1, 256)),
    ("tracker_model.mask_downsample.weight", (1, 1, 4, 4)),
    ("tracker_model.memory_attention.layers.0.self_attn.q_proj.weight", (256, 256)),
]


def build_config(tiny):
    if tiny:
        sys.path.insert(0, HERE)
        from gen_sam3_fixtures import CASES, build_config as build_tiny  # noqa: E402

        cfg = build_tiny(CASES["tiny_a"])
    else:
        cfg = Sam3Config()
    cfg.architectures = ["Sam3Model"]
    return cfg


def param_specs(cfg):
    """[(key, shape, kind)] of Sam3Model's state dict, from a meta-device instance; kind: 'norm_weight' or 'other'."""
    with torch.device("meta"):
        model = Sam3Model(cfg)
    norm_weights = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) and mod.weight is not None:
            norm_weights.add(f"{mname}.weight")
    specs = []
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32, (k, v.dtype)
        specs.append((k, tuple(v.shape), "norm_weight" if k in norm_weights else "other"))
    return specs


def make_tensor(key, shape, kind, seed, std):
    gen = torch.Generator().manual_seed((seed ^ zlib.crc32(key.encode())) & 0x7FFFFFFF)
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    if kind == "norm_weight":
        t += 1.0
    return t


def nbytes(shape):
    n = 4
    for s in shape:
        n *= s
    return n


def write_safetensors(path, entries, make, metadata=None):
    """Stream a safetensors file: entries = [(key, shape, kind)] (all F32), make(key, shape, kind) -> tensor."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for key, shape, _ in entries:
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
        off += nbytes(shape)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, shape, kind in entries:
            t = make(key, shape, kind).contiguous()
            assert tuple(t.shape) == tuple(shape) and t.dtype == torch.float32
            f.write(t.numpy().tobytes())
    return off


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def shard(entries, shard_bytes, min_shards=2):
    total = sum(nbytes(s) for _, s, _ in entries)
    limit = min(shard_bytes, (total + min_shards - 1) // min_shards)
    shards, cur, cur_b = [], [], 0
    for e in entries:
        b = nbytes(e[1])
        if cur and cur_b + b > limit:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(e)
        cur_b += b
    if cur:
        shards.append(cur)
    assert len(shards) >= min_shards, "could not split into enough shards"
    return shards, total


def make_inputs(cfg, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    S = cfg.vision_config.backbone_config.image_size
    T = min(32, cfg.text_config.max_position_embeddings)
    vocab = cfg.text_config.vocab_size
    bos, eos = cfg.text_config.bos_token_id, cfg.text_config.eos_token_id
    n_valid = min(6, T)
    ids = torch.full((1, T), eos, dtype=torch.int64)  # padded with EOS, like the HF processor
    ids[0, 0] = bos
    ids[0, 1:n_valid - 1] = torch.randint(1, min(bos, eos, vocab) - 1, (n_valid - 2,), generator=gen)
    ids[0, n_valid - 1] = eos
    mask = torch.zeros((1, T), dtype=torch.int64)
    mask[0, :n_valid] = 1
    return {
        "pixel_values": torch.randn((1, 3, S, S), generator=gen, dtype=torch.float32),
        "input_ids": ids,
        "attention_mask": mask,
        "input_boxes": torch.tensor([[[0.45, 0.55, 0.3, 0.4]]], dtype=torch.float32),
        "input_boxes_labels": torch.ones((1, 1), dtype=torch.int64),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--video", action="store_true", help="also write the sharded Sam3VideoModel hub layout")
    ap.add_argument("--tiny", action="store_true", help="tiny_a config (same code path) + load/forward checks")
    ap.add_argument("--shard-mb", type=int, default=1024, help="max shard size of the video layout (at least 2 shards)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    args = ap.parse_args()

    t0 = time.time()
    cfg = build_config(args.tiny)
    specs = param_specs(cfg)
    n_params = sum(nbytes(s) // 4 for _, s, _ in specs)
    print(f"Sam3Model: {len(specs)} tensors, {n_params:,} parameters ({n_params * 4 / 2**30:.2f} GiB f32)")
    make = lambda k, s, kind: make_tensor(k, s, kind, args.seed, args.std)  # noqa: E731

    # (a) Sam3Model layout
    d_a = os.path.join(args.out, "sam3")
    os.makedirs(d_a, exist_ok=True)
    cfg.to_json_file(os.path.join(d_a, "config.json"))
    write_safetensors(os.path.join(d_a, "model.safetensors"), specs, make, {"format": "pt"})
    print(f"wrote {d_a} ({time.time() - t0:.0f}s)")

    # (b) Sam3VideoModel hub layout
    if args.video:
        d_b = os.path.join(args.out, "sam3_video")
        os.makedirs(d_b, exist_ok=True)
        vcfg = Sam3VideoConfig(detector_config=cfg.to_dict())
        vcfg.architectures = ["Sam3VideoModel"]
        vcfg.to_json_file(os.path.join(d_b, "config.json"))
        vspecs = [("detector_model." + k, s, kind) for k, s, kind in specs]
        neck = [(k.replace("vision_encoder.neck.", "tracker_neck.", 1), s, kind) for k, s, kind in specs
                if k.startswith("vision_encoder.neck.")]
        vspecs += neck + [(k, s, "other") for k, s in DUMMY_TRACKER]
        vspecs.sort(key=lambda e: e[0])
        # strip the prefix for value generation so that detector values equal the Sam3Model layout's
        vmake = lambda k, s, kind: make(k[len("detector_model."):] if k.startswith("detector_model.") else k,  # noqa
                                        s, kind)
        shards, total = shard(vspecs, args.shard_mb * 2**20)
        weight_map = {}
        for i, entries in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(d_b, fname), entries, vmake, {"format": "pt"})
            for k, _, _ in entries:
                weight_map[k] = fname
        index = {"metadata": {"total_size": total, "total_parameters": total // 4},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(d_b, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        print(f"wrote {d_b}: {len(vspecs)} tensors in {len(shards)} shards ({time.time() - t0:.0f}s)")

    # inputs
    inputs = make_inputs(cfg, args.seed)
    from safetensors.torch import save_file

    save_file(inputs, os.path.join(args.out, "inputs.safetensors"), metadata={"generator": "gen_sam3_fullsize.py"})

    # ---- checks (headers only: cheap at full size) --------------------------------------------------------
    expect = {k: list(s) for k, s, _ in specs}
    h = read_header(os.path.join(d_a, "model.safetensors"))
    h.pop("__metadata__", None)
    assert {k: v["shape"] for k, v in h.items()} == expect
    print(f"check (a): {len(h)} keys, shapes match Sam3Model; e.g. {sorted(h)[:3]}")
    if args.video:
        with open(os.path.join(d_b, "model.safetensors.index.json")) as f:
            index = json.load(f)
        seen = {}
        for fname in sorted(set(index["weight_map"].values())):
            hh = read_header(os.path.join(d_b, fname))
            hh.pop("__metadata__", None)
            for k, v in hh.items():
                assert index["weight_map"][k] == fname
                seen[k] = v["shape"]
        assert set(seen) == set(index["weight_map"])
        det = {k[len("detector_model."):]: v for k, v in seen.items() if k.startswith("detector_model.")}
        assert det == expect
        other = sorted(k for k in seen if not k.startswith("detector_model."))
        print(f"check (b): {len(seen)} keys in {len(set(index['weight_map'].values()))} shards, "
              f"{len(det)} detector_model.* keys match Sam3Model, {len(other)} ignorable: {other[:2]} ... "
              f"{other[-2:]}")
        print(f"   e.g. {sorted(det)[:2]}")
        with open(os.path.join(d_b, "config.json")) as f:
            vc = json.load(f)
        assert vc["model_type"] == "sam3_video" and vc["detector_config"]["model_type"] == "sam3"

    if args.tiny:
        check_tiny(args.out, cfg, inputs, args.video)
    print(f"done in {time.time() - t0:.0f}s -> {args.out}")


def check_tiny(out, cfg, inputs, video):
    """Load the written layouts with HF and run the model (only sensible for the tiny config)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from safetensors.torch import load_file

    ma = Sam3Model.from_pretrained(os.path.join(out, "sam3"), attn_implementation="eager").eval()
    sd = load_file(os.path.join(out, "sam3", "model.safetensors"))
    for k, v in ma.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        oa = ma(**inputs)
    print(f"tiny (a): from_pretrained OK, pred_logits {tuple(oa.pred_logits.shape)}, "
          f"pred_masks {tuple(oa.pred_masks.shape)}")
    if video:
        mb = Sam3Model.from_pretrained(os.path.join(out, "sam3_video"), attn_implementation="eager").eval()
        for k, v in ma.state_dict().items():
            assert torch.equal(v, mb.state_dict()[k]), k
        with torch.no_grad():
            ob = mb(**inputs)
        # (bit-equality is not guaranteed: BLAS kernels may round differently with other buffer alignments)
        for k in ("pred_masks", "pred_logits", "pred_boxes", "presence_logits", "semantic_seg"):
            assert torch.allclose(getattr(oa, k), getattr(ob, k), rtol=1e-5, atol=1e-6), k
        print("tiny (b): Sam3Model.from_pretrained(sam3_video dir) strips detector_model., ignores tracker_*; "
              "same weights and outputs as (a)")


if __name__ == "__main__":
    main()
