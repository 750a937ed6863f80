#!/usr/bin/env python3
"""Check that PEFT itself loads adapters saved by lorahost and reproduces lorahost's outputs.

    LORAHOST_KEEP_PEFT_DIR=/tmp/peft_rt cargo test --release --test lora adapters_round_trip
    python3 tools/check_peft_roundtrip.py /tmp/peft_rt

Needs `pip install torch torchvision transformers safetensors peft`. Uses the tiny_a fixture model.
"""
import os, sys
import torch
from safetensors.torch import load_file
from transformers import Sam3Model
from peft import PeftModel

adapter_dir = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
fixture = os.path.join(here, "..", "host", "tests", "fixtures", "sam3", "tiny_a")
torch.set_grad_enabled(False)
base = Sam3Model.from_pretrained(fixture, attn_implementation="eager").eval()
model = PeftModel.from_pretrained(base, adapter_dir).eval()
n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
print("PEFT loaded", n_lora, "LoRA tensors")
inputs = load_file(os.path.join(fixture, "inputs.safetensors"))
out = model(**inputs)
want = load_file(os.path.join(adapter_dir, "expected_outputs.safetensors"))
worst = 0.0
for k in ["pred_logits", "pred_boxes", "presence_logits", "pred_masks"]:
    d = (getattr(out, k) - want[k]).abs().max().item()
    scale = max(1.0, want[k].abs().max().item())
    print(f"{k}: max |diff| {d:.3g} (scale {scale:.3g})")
    worst = max(worst, d / scale)
assert worst < 1e-4, f"PEFT output differs from lorahost's: {worst}"
print("OK: PEFT reproduces lorahost's adapted model")
