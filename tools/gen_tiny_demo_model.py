#!/usr/bin/env python3
"""Write examples/tiny_sam3/: the tiny SAM3 the demo and the training tests fine-tune.

Needs: pip install torch torchvision transformers safetensors
Run:   python3 tools/gen_tiny_demo_model.py

The architecture is host/tests/fixtures/sam3/tiny_a (112 px images, 2 ViT layers, hidden 16-32) with the
text vocabulary of host/tests/fixtures/tokenizer/tokenizer.json (byte-level BPE, so any prompt tokenizes).
Weights are seeded random values with unit-scale signal propagation (weights ~ N(0, 1/fan_in), norms ~ 1,
biases small) rather than transformers' init (std 0.02), under which a model this small outputs nearly the
same thing for every input and LoRA has nothing to steer. Nothing about the weights is learned.
"""
import json
import os
import shutil

import torch
from transformers import Sam3Config, Sam3Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "examples", "tiny_sam3")


def main():
    cfg = json.load(open(os.path.join(ROOT, "host/tests/fixtures/sam3/tiny_a/config.json")))
    tok_path = os.path.join(ROOT, "host/tests/fixtures/tokenizer/tokenizer.json")
    tok = json.load(open(tok_path))
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens") or [])
    cfg["text_config"]["vocab_size"] = vocab
    torch.manual_seed(0)
    config = Sam3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type")})
    model = Sam3Model(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() <= 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    shutil.copy(tok_path, os.path.join(OUT, "tokenizer.json"))
    print("wrote", OUT, sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
