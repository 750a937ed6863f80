#!/usr/bin/env python3
"""Write a tiny checkpoint in Meta's ORIGINAL `sam3.pt` layout from the transformers-format fixture.

Needs: pip install torch safetensors   (CPU only)
Run:   python3 tools/gen_sam3_original_fixture.py [--src DIR] [--out DIR]

Reads  host/tests/fixtures/sam3/tiny_a/model.safetensors   (transformers `Sam3Model` keys)
Writes host/tests/fixtures/sam3/tiny_a_original/sam3.pt     torch.save({"model": state_dict})
       host/tests/fixtures/sam3/tiny_a_original/config.json (copied: the original file carries no config)

The conversion is the exact inverse of the ORIG -> HF rename rules of docs/sam3-architecture.md §3.3
(written here independently of the Rust loader, host/src/sam3/weights.rs, which the fixture tests):

  * every key gets the `detector.` prefix and its original module path (§3.2);
  * q/k/v are fused: ViT `attn.qkv.{weight,bias}`; every nn.MultiheadAttention (text resblocks, geometry
    `encode.N.{self_attn,cross_attn_image}`, DETR encoder/decoder `self_attn`/`cross_attn_image`/`ca_text`/
    `cross_attn`, segmentation head `cross_attend_prompt`) `in_proj_weight` / `in_proj_bias`, order q, k, v;
  * `pos_embed` gets a (random) cls row in front: (1, 1+P², C);
  * the CLIP `text_projection` is stored transposed (width, proj) as a bare Parameter;
  * tensors the original has but transformers drops are ADDED, so that the loader must skip them:
    a complex64 `attn.freqs_cis` buffer per ViT block ((window², head_dim/2) for windowed blocks,
    (grid², head_dim/2) for global ones), the geometry `points_direct_project` / `points_pool_project` /
    `points_pos_enc_project` Linears, the tracker FPN copy `backbone.vision_backbone.sam2_convs.*`, and a few
    `tracker.*` tensors.

Before writing, the script checks every produced key against the §3.2 table (regexes below) and converts the
result back with its own implementation of the §3.3 rules, requiring the transformers state dict to come back
bit-exactly. Deterministic values (fixed seed); the zip container itself may differ between torch versions.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from collections import OrderedDict

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "host", "tests", "fixtures", "sam3"))

# --------------------------------------------------------------------------------------------------------------
# HF -> ORIG: the inverse of §3.3. Each rule: (regex on the HF key, replacement). The first match wins; every
# HF key must match exactly one rule. `{qkv}` rules are handled by fusing (see FUSED below).
# --------------------------------------------------------------------------------------------------------------

V = "backbone.vision_backbone."
T = "backbone.language_backbone."

RULES = [
    # §3.3 rule 2: ViT trunk.
    (r"vision_encoder\.backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)$",
     V + r"trunk.patch_embed.proj.\1"),
    (r"vision_encoder\.backbone\.embeddings\.position_embeddings$", V + "trunk.pos_embed"),
    (r"vision_encoder\.backbone\.layer_norm\.(weight|bias)$", V + r"trunk.ln_pre.\1"),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$", V + r"trunk.blocks.\1.norm\2.\3"),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.attention\.o_proj\.(weight|bias)$", V + r"trunk.blocks.\1.attn.proj.\2"),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", V + r"trunk.blocks.\1.mlp.\2.\3"),
    # rule 3: neck. Level 0 (x4): dconv_2x2_0, GELU, dconv_2x2_1; level 1 (x2): dconv_2x2; then conv_1x1, conv_3x3.
    (r"vision_encoder\.neck\.fpn_layers\.0\.scale_layers\.0\.(weight|bias)$", V + r"convs.0.dconv_2x2_0.\1"),
    (r"vision_encoder\.neck\.fpn_layers\.0\.scale_layers\.2\.(weight|bias)$", V + r"convs.0.dconv_2x2_1.\1"),
    (r"vision_encoder\.neck\.fpn_layers\.(\d+)\.scale_layers\.0\.(weight|bias)$", V + r"convs.\1.dconv_2x2.\2"),
    (r"vision_encoder\.neck\.fpn_layers\.(\d+)\.proj1\.(weight|bias)$", V + r"convs.\1.conv_1x1.\2"),
    (r"vision_encoder\.neck\.fpn_layers\.(\d+)\.proj2\.(weight|bias)$", V + r"convs.\1.conv_3x3.\2"),
    # rule 4: text encoder (open_clip layout) and the resizer.
    (r"text_encoder\.text_model\.embeddings\.token_embedding\.weight$", T + "encoder.token_embedding.weight"),
    (r"text_encoder\.text_model\.embeddings\.position_embedding\.weight$", T + "encoder.positional_embedding"),
    (r"text_encoder\.text_model\.final_layer_norm\.(weight|bias)$", T + r"encoder.ln_final.\1"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$",
     T + r"encoder.transformer.resblocks.\1.ln_\2.\3"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$",
     T + r"encoder.transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$",
     T + r"encoder.transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$",
     T + r"encoder.transformer.resblocks.\1.attn.out_proj.\2"),
    (r"text_encoder\.text_projection\.weight$", T + "encoder.text_projection"),
    (r"text_projection\.(weight|bias)$", T + r"resizer.\1"),
    # rule 5: geometry encoder.
    (r"geometry_encoder\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$",
     r"geometry_encoder.encode.\1.self_attn.out_proj.\2"),
    (r"geometry_encoder\.layers\.(\d+)\.cross_attn\.o_proj\.(weight|bias)$",
     r"geometry_encoder.encode.\1.cross_attn_image.out_proj.\2"),
    (r"geometry_encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", r"geometry_encoder.encode.\1.linear\2.\3"),
    (r"geometry_encoder\.layers\.(\d+)\.layer_norm([123])\.(weight|bias)$", r"geometry_encoder.encode.\1.norm\2.\3"),
    (r"geometry_encoder\.vision_layer_norm\.(weight|bias)$", r"geometry_encoder.img_pre_norm.\1"),
    (r"geometry_encoder\.prompt_layer_norm\.(weight|bias)$", r"geometry_encoder.norm.\1"),
    (r"geometry_encoder\.output_layer_norm\.(weight|bias)$", r"geometry_encoder.encode_norm.\1"),
    (r"geometry_encoder\.(label_embed|cls_embed)\.weight$", r"geometry_encoder.\1.weight"),
    (r"geometry_encoder\.(boxes_direct_project|boxes_pool_project|boxes_pos_enc_project|final_proj)\.(weight|bias)$",
     r"geometry_encoder.\1.\2"),
    # rule 6: DETR encoder.
    (r"detr_encoder\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$",
     r"transformer.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"detr_encoder\.layers\.(\d+)\.cross_attn\.o_proj\.(weight|bias)$",
     r"transformer.encoder.layers.\1.cross_attn_image.out_proj.\2"),
    (r"detr_encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", r"transformer.encoder.layers.\1.linear\2.\3"),
    (r"detr_encoder\.layers\.(\d+)\.layer_norm([123])\.(weight|bias)$", r"transformer.encoder.layers.\1.norm\2.\3"),
    # rule 7: DETR decoder.
    (r"detr_decoder\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$",
     r"transformer.decoder.layers.\1.self_attn.out_proj.\2"),
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn\.o_proj\.(weight|bias)$",
     r"transformer.decoder.layers.\1.ca_text.out_proj.\2"),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn\.o_proj\.(weight|bias)$",
     r"transformer.decoder.layers.\1.cross_attn.out_proj.\2"),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn_layer_norm\.(weight|bias)$",
     r"transformer.decoder.layers.\1.norm1.\2"),
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn_layer_norm\.(weight|bias)$",
     r"transformer.decoder.layers.\1.catext_norm.\2"),
    (r"detr_decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"transformer.decoder.layers.\1.norm2.\2"),
    (r"detr_decoder\.layers\.(\d+)\.mlp_layer_norm\.(weight|bias)$", r"transformer.decoder.layers.\1.norm3.\2"),
    (r"detr_decoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", r"transformer.decoder.layers.\1.linear\2.\3"),
    (r"detr_decoder\.output_layer_norm\.(weight|bias)$", r"transformer.decoder.norm.\1"),
    (r"detr_decoder\.box_head\.layer([123])\.(weight|bias)$",
     lambda m: f"transformer.decoder.bbox_embed.layers.{int(m[1]) - 1}.{m[2]}"),
    (r"detr_decoder\.presence_head\.layer([123])\.(weight|bias)$",
     lambda m: f"transformer.decoder.presence_token_head.layers.{int(m[1]) - 1}.{m[2]}"),
    (r"detr_decoder\.presence_layer_norm\.(weight|bias)$", r"transformer.decoder.presence_token_out_norm.\1"),
    (r"detr_decoder\.ref_point_head\.layer([12])\.(weight|bias)$",
     lambda m: f"transformer.decoder.ref_point_head.layers.{int(m[1]) - 1}.{m[2]}"),
    (r"detr_decoder\.box_rpb_embed_([xy])\.layer([12])\.(weight|bias)$",
     lambda m: f"transformer.decoder.boxRPB_embed_{m[1]}.layers.{int(m[2]) - 1}.{m[3]}"),
    (r"detr_decoder\.(query_embed|reference_points|presence_token)\.weight$", r"transformer.decoder.\1.weight"),
    # rule 8: scoring.
    (r"dot_product_scoring\.text_mlp\.layer([12])\.(weight|bias)$",
     lambda m: f"dot_prod_scoring.prompt_mlp.layers.{int(m[1]) - 1}.{m[2]}"),
    (r"dot_product_scoring\.text_mlp_out_norm\.(weight|bias)$", r"dot_prod_scoring.prompt_mlp.out_norm.\1"),
    (r"dot_product_scoring\.text_proj\.(weight|bias)$", r"dot_prod_scoring.prompt_proj.\1"),
    (r"dot_product_scoring\.query_proj\.(weight|bias)$", r"dot_prod_scoring.hs_proj.\1"),
    # rule 9: segmentation head.
    (r"mask_decoder\.pixel_decoder\.(conv_layers|norms)\.(\d+)\.(weight|bias)$",
     r"segmentation_head.pixel_decoder.\1.\2.\3"),
    (r"mask_decoder\.mask_embedder\.layers\.(\d+)\.(weight|bias)$",
     r"segmentation_head.mask_predictor.mask_embed.layers.\1.\2"),
    (r"mask_decoder\.instance_projection\.(weight|bias)$", r"segmentation_head.instance_seg_head.\1"),
    (r"mask_decoder\.semantic_projection\.(weight|bias)$", r"segmentation_head.semantic_seg_head.\1"),
    (r"mask_decoder\.prompt_cross_attn\.o_proj\.(weight|bias)$", r"segmentation_head.cross_attend_prompt.out_proj.\1"),
    (r"mask_decoder\.prompt_cross_attn_norm\.(weight|bias)$", r"segmentation_head.cross_attn_norm.\1"),
]

# Fused attention projections (rules 2 and 10): HF module prefix regex -> ORIG fused-tensor name template
# ({} = weight|bias). q, k, v are concatenated along dim 0 in that order.
FUSED = [
    (r"vision_encoder\.backbone\.layers\.(\d+)\.attention$", lambda m: V + f"trunk.blocks.{m[1]}.attn.qkv.{{}}"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn$",
     lambda m: T + f"encoder.transformer.resblocks.{m[1]}.attn.in_proj_{{}}"),
    (r"geometry_encoder\.layers\.(\d+)\.self_attn$", lambda m: f"geometry_encoder.encode.{m[1]}.self_attn.in_proj_{{}}"),
    (r"geometry_encoder\.layers\.(\d+)\.cross_attn$",
     lambda m: f"geometry_encoder.encode.{m[1]}.cross_attn_image.in_proj_{{}}"),
    (r"detr_encoder\.layers\.(\d+)\.self_attn$", lambda m: f"transformer.encoder.layers.{m[1]}.self_attn.in_proj_{{}}"),
    (r"detr_encoder\.layers\.(\d+)\.cross_attn$",
     lambda m: f"transformer.encoder.layers.{m[1]}.cross_attn_image.in_proj_{{}}"),
    (r"detr_decoder\.layers\.(\d+)\.self_attn$", lambda m: f"transformer.decoder.layers.{m[1]}.self_attn.in_proj_{{}}"),
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn$", lambda m: f"transformer.decoder.layers.{m[1]}.ca_text.in_proj_{{}}"),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn$",
     lambda m: f"transformer.decoder.layers.{m[1]}.cross_attn.in_proj_{{}}"),
    (r"mask_decoder\.prompt_cross_attn$", lambda m: "segmentation_head.cross_attend_prompt.in_proj_{}"),
]

# The §3.2 table as regexes over the key after `detector.` (what a state_dict of Meta's modules holds).
LIN = r"\.(weight|bias)"
MHA = r"\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
ORIG_TABLE = [
    V + r"trunk\.pos_embed",
    V + r"trunk\.patch_embed\.proj\.weight",
    V + r"trunk\.ln_pre" + LIN,
    V + r"trunk\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)" + LIN,
    V + r"trunk\.blocks\.\d+\.attn\.freqs_cis",
    V + r"(convs|sam2_convs)\.\d+\.(dconv_2x2_0|dconv_2x2_1|dconv_2x2|conv_1x1|conv_3x3)" + LIN,
    T + r"encoder\.token_embedding\.weight",
    T + r"encoder\.positional_embedding",
    T + r"encoder\.transformer\.resblocks\.\d+\.attn" + MHA,
    T + r"encoder\.transformer\.resblocks\.\d+\.(ln_1|ln_2|mlp\.c_fc|mlp\.c_proj)" + LIN,
    T + r"encoder\.ln_final" + LIN,
    T + r"encoder\.text_projection",
    T + r"resizer" + LIN,
    r"geometry_encoder\.(label_embed|cls_embed)\.weight",
    r"geometry_encoder\.(points|boxes)_(direct_project|pool_project|pos_enc_project)" + LIN,
    r"geometry_encoder\.(final_proj|norm|img_pre_norm|encode_norm)" + LIN,
    r"geometry_encoder\.encode\.\d+\.(self_attn|cross_attn_image)" + MHA,
    r"geometry_encoder\.encode\.\d+\.(linear1|linear2|norm1|norm2|norm3)" + LIN,
    r"transformer\.encoder\.layers\.\d+\.(self_attn|cross_attn_image)" + MHA,
    r"transformer\.encoder\.layers\.\d+\.(linear1|linear2|norm1|norm2|norm3)" + LIN,
    r"transformer\.decoder\.layers\.\d+\.(self_attn|ca_text|cross_attn)" + MHA,
    r"transformer\.decoder\.layers\.\d+\.(norm1|norm2|norm3|catext_norm|linear1|linear2)" + LIN,
    r"transformer\.decoder\.(norm|presence_token_out_norm)" + LIN,
    r"transformer\.decoder\.(bbox_embed|presence_token_head)\.layers\.[012]" + LIN,
    r"transformer\.decoder\.(ref_point_head|boxRPB_embed_x|boxRPB_embed_y)\.layers\.[01]" + LIN,
    r"transformer\.decoder\.(query_embed|reference_points|presence_token)\.weight",
    r"dot_prod_scoring\.(prompt_mlp\.layers\.[01]|prompt_mlp\.out_norm|prompt_proj|hs_proj)" + LIN,
    r"segmentation_head\.pixel_decoder\.(conv_layers|norms)\.\d+" + LIN,
    r"segmentation_head\.mask_predictor\.mask_embed\.layers\.\d+" + LIN,
    r"segmentation_head\.cross_attend_prompt" + MHA,
    r"segmentation_head\.(cross_attn_norm|semantic_seg_head|instance_seg_head)" + LIN,
]


def hf_to_orig(hf, cfg, gen):
    """The original `detector.*` state dict (plus a few `tracker.*` tensors) for transformers' `hf`."""
    out = {}
    done = set()

    def put(key, t):
        key = "detector." + key
        assert key not in out, f"duplicate original key {key}"
        out[key] = t.detach().clone().contiguous()

    # Fused q/k/v.
    for name in hf:
        m = re.match(r"(.+)\.q_proj\.(weight|bias)$", name)
        if not m:
            continue
        prefix, kind = m[1], m[2]
        target = None
        for pat, tmpl in FUSED:
            fm = re.match(pat, prefix)
            if fm:
                target = tmpl(fm).format(kind)
                break
        assert target is not None, f"no fused target for {prefix}"
        parts = [f"{prefix}.{p}_proj.{kind}" for p in "qkv"]
        put(target, torch.cat([hf[p] for p in parts], dim=0))
        done.update(parts)

    for name, t in hf.items():
        if name in done:
            continue
        hits = [(pat, rep) for pat, rep in RULES if re.match(pat, name)]
        assert hits, f"no rule for {name}"
        pat, rep = hits[0]
        key = re.sub(pat, rep, name)
        if name == "vision_encoder.backbone.embeddings.position_embeddings":
            cls = torch.randn(1, 1, t.shape[2], generator=gen) * 0.5
            t = torch.cat([cls, t], dim=1)  # (1, 1+P², C)
        elif name == "text_encoder.text_projection.weight":
            t = t.t()  # HF Linear (proj, width) -> open_clip Parameter (width, proj)
        put(key, t)
        done.add(name)
    assert done == set(hf), "unconverted keys"

    # What transformers drops: RoPE buffers, point-prompt weights, the tracker FPN copy, the tracker.
    bb = cfg["vision_config"]["backbone_config"]
    width, heads, layers = bb["hidden_size"], bb["num_attention_heads"], bb["num_hidden_layers"]
    window, grid = bb["window_size"], bb["image_size"] // bb["patch_size"]
    head_dim = width // heads
    for i in range(layers):
        glob = i in bb["global_attn_indexes"]
        side = grid if glob else window
        scale = window / grid if glob else 1.0
        put(V + f"trunk.blocks.{i}.attn.freqs_cis", axial_cis(head_dim, side, scale, bb["rope_parameters"]["rope_theta"]))
    d = cfg["geometry_encoder_config"]["hidden_size"]
    for name, fan_in in (("points_direct_project", 2), ("points_pool_project", d), ("points_pos_enc_project", d)):
        put(f"geometry_encoder.{name}.weight", torch.randn(d, fan_in, generator=gen) / math.sqrt(fan_in))
        put(f"geometry_encoder.{name}.bias", torch.randn(d, generator=gen) * 0.05)
    for key in sorted(k for k in out if k.startswith("detector." + V + "convs.")):
        t = out[key]
        put(key[len("detector."):].replace(V + "convs.", V + "sam2_convs."), t + 0.01 * torch.randn(t.shape, generator=gen))
    out["tracker.maskmem_tpos_enc"] = torch.randn(7, 1, 1, 8, generator=gen)
    out["tracker.no_mem_embed"] = torch.randn(1, 1, d, generator=gen)
    out["tracker.sam_mask_decoder.iou_token.weight"] = torch.randn(1, d, generator=gen)
    return OrderedDict(sorted(out.items()))


def axial_cis(head_dim, side, scale, theta):
    """ORIG `compute_axial_cis` for a side x side grid: complex64 (side², head_dim/2), x pairs then y pairs."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    t = torch.arange(side * side, dtype=torch.float32)
    tx, ty = (t % side) * scale, torch.div(t, side, rounding_mode="floor") * scale
    fx, fy = torch.outer(tx, freqs), torch.outer(ty, freqs)
    return torch.cat([torch.polar(torch.ones_like(fx), fx), torch.polar(torch.ones_like(fy), fy)], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# ORIG -> HF, §3.3 written out again (independently of the inverse above), for the round-trip check.
# --------------------------------------------------------------------------------------------------------------

def orig_to_hf(sd):
    out = {}
    for full, t in sd.items():
        if not full.startswith("detector."):
            continue  # tracker
        k = full[len("detector."):]
        if "freqs_cis" in k or ".points_" in k or ".sam2_convs." in k:
            continue
        k = apply_rules(k)
        if k.endswith((".in_proj_weight", ".in_proj_bias", ".attention.qkv.weight", ".attention.qkv.bias")):
            kind = "weight" if k.endswith("weight") else "bias"
            prefix = re.sub(r"\.(in_proj_(weight|bias)|qkv\.(weight|bias))$", "", k)
            for p, c in zip("qkv", t.chunk(3, dim=0)):
                out[f"{prefix}.{p}_proj.{kind}"] = c
        elif k == "vision_encoder.backbone.embeddings.position_embeddings":
            out[k] = t[:, 1:, :]
        elif k == "text_encoder.text_projection.weight":
            out[k] = t.t()
        else:
            out[k] = t
    return out


def apply_rules(k):
    def sub(pairs, s):
        for a, b in pairs:
            s = re.sub(a, b, s)
        return s

    if k.startswith(V + "trunk."):
        k = "vision_encoder.backbone." + k[len(V + "trunk."):]
        return sub([(r"\.pos_embed$", ".embeddings.position_embeddings"),
                    (r"\.patch_embed\.proj\.", ".embeddings.patch_embeddings.projection."),
                    (r"\.ln_pre\.", ".layer_norm."), (r"\.blocks\.(\d+)\.norm([12])\.", r".layers.\1.layer_norm\2."),
                    (r"\.blocks\.(\d+)\.attn\.proj\.", r".layers.\1.attention.o_proj."),
                    (r"\.blocks\.(\d+)\.attn\.qkv\.", r".layers.\1.attention.qkv."), (r"\.blocks\.", ".layers.")], k)
    if k.startswith(V + "convs."):
        k = "vision_encoder.neck.fpn_layers." + k[len(V + "convs."):]
        return sub([(r"\.dconv_2x2_0\.", ".scale_layers.0."), (r"\.dconv_2x2_1\.", ".scale_layers.2."),
                    (r"\.dconv_2x2\.", ".scale_layers.0."), (r"\.conv_1x1\.", ".proj1."), (r"\.conv_3x3\.", ".proj2.")], k)
    if k.startswith(T + "resizer."):
        return "text_projection." + k[len(T + "resizer."):]
    if k.startswith(T + "encoder."):
        k = k[len(T + "encoder."):]
        if k == "text_projection":
            return "text_encoder.text_projection.weight"
        if k == "positional_embedding":
            return "text_encoder.text_model.embeddings.position_embedding.weight"
        k = sub([(r"^token_embedding\.", "embeddings.token_embedding."), (r"^ln_final\.", "final_layer_norm."),
                 (r"^transformer\.resblocks\.", "encoder.layers."), (r"\.ln_([12])\.", r".layer_norm\1."),
                 (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."), (r"\.attn\.", ".self_attn.")], k)
        return "text_encoder.text_model." + k
    if k.startswith("geometry_encoder."):
        return sub([(r"\.encode\.(\d+)\.", r".layers.\1."), (r"\.cross_attn_image\.", ".cross_attn."),
                    (r"\.out_proj\.", ".o_proj."), (r"\.linear([12])\.", r".mlp.fc\1."),
                    (r"\.norm([123])\.", r".layer_norm\1."), (r"\.img_pre_norm\.", ".vision_layer_norm."),
                    (r"^geometry_encoder\.norm\.", "geometry_encoder.prompt_layer_norm."),
                    (r"\.encode_norm\.", ".output_layer_norm.")], k)
    if k.startswith("transformer.encoder."):
        k = "detr_encoder." + k[len("transformer.encoder."):]
        return sub([(r"\.cross_attn_image\.", ".cross_attn."), (r"\.out_proj\.", ".o_proj."),
                    (r"\.linear([12])\.", r".mlp.fc\1."), (r"\.norm([123])\.", r".layer_norm\1.")], k)
    if k.startswith("transformer.decoder."):
        k = "detr_decoder." + k[len("transformer.decoder."):]
        return sub([(r"\.ca_text\.", ".text_cross_attn."), (r"\.layers\.(\d+)\.cross_attn\.", r".layers.\1.vision_cross_attn."),
                    (r"\.out_proj\.", ".o_proj."), (r"\.norm1\.", ".vision_cross_attn_layer_norm."),
                    (r"\.catext_norm\.", ".text_cross_attn_layer_norm."), (r"\.norm2\.", ".self_attn_layer_norm."),
                    (r"\.norm3\.", ".mlp_layer_norm."), (r"\.linear([12])\.", r".mlp.fc\1."),
                    (r"^detr_decoder\.norm\.", "detr_decoder.output_layer_norm."),
                    (r"\.bbox_embed\.layers\.(\d)\.", lambda m: f".box_head.layer{int(m[1]) + 1}."),
                    (r"\.presence_token_head\.layers\.(\d)\.", lambda m: f".presence_head.layer{int(m[1]) + 1}."),
                    (r"\.presence_token_out_norm\.", ".presence_layer_norm."),
                    (r"\.ref_point_head\.layers\.(\d)\.", lambda m: f".ref_point_head.layer{int(m[1]) + 1}."),
                    (r"\.boxRPB_embed_([xy])\.layers\.(\d)\.", lambda m: f".box_rpb_embed_{m[1]}.layer{int(m[2]) + 1}.")], k)
    if k.startswith("dot_prod_scoring."):
        k = "dot_product_scoring." + k[len("dot_prod_scoring."):]
        return sub([(r"\.prompt_mlp\.layers\.(\d)\.", lambda m: f".text_mlp.layer{int(m[1]) + 1}."),
                    (r"\.prompt_mlp\.out_norm\.", ".text_mlp_out_norm."), (r"\.prompt_proj\.", ".text_proj."),
                    (r"\.hs_proj\.", ".query_proj.")], k)
    if k.startswith("segmentation_head."):
        k = "mask_decoder." + k[len("segmentation_head."):]
        return sub([(r"\.mask_predictor\.mask_embed\.layers\.", ".mask_embedder.layers."),
                    (r"\.instance_seg_head\.", ".instance_projection."), (r"\.semantic_seg_head\.", ".semantic_projection."),
                    (r"\.cross_attend_prompt\.", ".prompt_cross_attn."), (r"\.out_proj\.", ".o_proj."),
                    (r"\.cross_attn_norm\.", ".prompt_cross_attn_norm.")], k)
    raise AssertionError(f"no §3.3 rule for {k}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=os.path.join(FIXTURES, "tiny_a"))
    ap.add_argument("--out", default=os.path.join(FIXTURES, "tiny_a_original"))
    args = ap.parse_args()

    hf = load_file(os.path.join(args.src, "model.safetensors"))
    with open(os.path.join(args.src, "config.json")) as f:
        cfg = json.load(f)
    gen = torch.Generator().manual_seed(3)
    sd = hf_to_orig(hf, cfg, gen)

    # Every key is one the §3.2 table lists.
    for k in sd:
        if k.startswith("tracker."):
            continue
        assert k.startswith("detector."), k
        assert any(re.fullmatch(p, k[len("detector."):]) for p in ORIG_TABLE), f"not in the §3.2 table: {k}"
    # Complex buffers are what the original stores.
    assert all(t.dtype == torch.complex64 for k, t in sd.items() if k.endswith("freqs_cis"))
    # Round trip through §3.3 gives back the transformers state dict bit-exactly.
    back = orig_to_hf(sd)
    assert set(back) == set(hf), (sorted(set(back) - set(hf)), sorted(set(hf) - set(back)))
    for k in hf:
        assert back[k].shape == hf[k].shape and torch.equal(back[k], hf[k]), k

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sam3.pt")
    torch.save({"model": sd}, path)
    shutil.copyfile(os.path.join(args.src, "config.json"), os.path.join(args.out, "config.json"))
    # torch.load reads it back (weights_only: plain tensors in a dict).
    loaded = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)

    n_det = sum(k.startswith("detector.") for k in sd)
    n_fused = sum(k.endswith(("qkv.weight", "qkv.bias", "in_proj_weight", "in_proj_bias")) for k in sd)
    n_extra = sum(k.endswith("freqs_cis") or ".points_" in k or ".sam2_convs." in k for k in sd)
    print(f"{path}: {len(sd)} tensors ({n_det} detector.*, of which {n_fused} fused q/k/v and {n_extra} "
          f"dropped by transformers; {len(sd) - n_det} tracker.*), {os.path.getsize(path):,} bytes; "
          f"from {len(hf)} transformers tensors")


if __name__ == "__main__":
    sys.exit(main())
