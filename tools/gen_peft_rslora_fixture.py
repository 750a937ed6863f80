#!/usr/bin/env python3
"""Generate host/tests/fixtures/peft_rslora/: a rank-stabilized LoRA adapter made by PEFT itself
(`use_rslora=True`, scale lora_alpha / sqrt(r)) on the tiny_a SAM3 fixture, and the outputs PEFT
computes with it, for lorahost's rsLoRA parity test (host/tests/lora.rs).

Needs: pip install torch torchvision transformers safetensors peft
Run:   python3 tools/gen_peft_rslora_fixture.py
"""
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Sam3Model

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "host", "tests", "fixtures", "sam3", "tiny_a")
OUT = os.path.join(HERE, "..", "host", "tests", "fixtures", "peft_rslora")

torch.manual_seed(0)
torch.set_grad_enabled(False)
base = Sam3Model.from_pretrained(FIXTURE, attn_implementation="eager").eval()
config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "fc1"], lora_dropout=0.0)
model = get_peft_model(base, config).eval()
# Seeded non-zero factors (PEFT starts B at zero, which would make any scale look right).
g = torch.Generator().manual_seed(7)
for name, p in model.named_parameters():
    if "lora_A" in name or "lora_B" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
inputs = load_file(os.path.join(FIXTURE, "inputs.safetensors"))
out = model(**inputs)
os.makedirs(OUT, exist_ok=True)
model.peft_config["default"].base_model_name_or_path = "host/tests/fixtures/sam3/tiny_a"
model.save_pretrained(OUT)
os.remove(os.path.join(OUT, "README.md"))  # PEFT's model-card template
with open(os.path.join(OUT, "README.md"), "w") as fh:
    fh.write(
        "# peft_rslora\n\nA rank-stabilized LoRA adapter (`use_rslora: true`, r 4, lora_alpha 6, q_proj/v_proj/fc1, "
        "seeded non-zero factors) made by PEFT on the `sam3/tiny_a` fixture, and PEFT's outputs for that "
        "fixture's inputs (`outputs.safetensors`). Written by `tools/gen_peft_rslora_fixture.py`.\n"
    )
save_file(
    {k: getattr(out, k).contiguous() for k in ["pred_logits", "pred_boxes", "presence_logits", "pred_masks"]},
    os.path.join(OUT, "outputs.safetensors"),
)
for f in os.listdir(OUT):
    os.chmod(os.path.join(OUT, f), 0o644)
print("wrote", OUT, sorted(os.listdir(OUT)))
