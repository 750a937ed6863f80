"""Real Hugging Face Trainer runs for `doctor --trace`'s tests: host/tests/fixtures/hf_traces/.

Each run is a tiny regression model trained by transformers' Trainer on the CPU, logged the
ways its users have it: trainer_state.json, the console (tqdm bars and printed dicts) and the
TensorBoardCallback's event files (with the Trainer's arguments as the `args` text).

- nan/: the loss turns NaN from the 60th training forward on (max_steps 120, logging every 5
  steps, warmup 10): the Trainer logs grad_norm NaN and, through its logging_nan_inf_filter,
  a loss of 0 afterwards.
- warmup50/: warmup_steps 50 logged every 50 steps (cosine, 1000 steps): the first logged LR
  is near the peak although the run warmed up.

Needs `pip install torch transformers tensorboard` (made with torch 2.x, transformers 5.24).
Usage: python tools/gen_hf_trace_fixtures.py [OUT_DIR]
"""
import contextlib
import io
import os
import shutil
import sys

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "host", "tests", "fixtures", "hf_traces")


class Pairs(torch.utils.data.Dataset):
    """y = sum(x) + noise, 8 features."""

    def __init__(self, n, seed, noise):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(1, keepdim=True) + noise * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Regressor(nn.Module):
    def __init__(self, nan_from):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.nan_from = nan_from
        self.forwards = 0

    def forward(self, x, labels=None):
        pred = self.body(x)
        loss = nn.functional.mse_loss(pred, labels)
        if self.training:
            self.forwards += 1
            if 0 < self.nan_from <= self.forwards:
                loss = loss * float("nan")
        return {"loss": loss, "logits": pred}


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


def run(name, samples, noise, nan_from, **overrides):
    torch.manual_seed(0)
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    args = dict(output_dir=os.path.join(folder, "out"), per_device_train_batch_size=8, learning_rate=1e-2,
                save_strategy="no", report_to=["tensorboard"],
                use_cpu=True, seed=0)
    args.update(overrides)
    trainer = Trainer(model=Regressor(nan_from), args=TrainingArguments(**args),
                      train_dataset=Pairs(samples, 1, noise))
    console = NotATerminal()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        trainer.train()
    trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
    with open(os.path.join(folder, "console.log"), "w") as f:
        f.write(console.getvalue())
    # The TensorBoardCallback's folder (output_dir/runs/<date>_<host>), the rest dropped.
    shutil.move(os.path.join(folder, "out", "runs"), os.path.join(folder, "runs"))
    shutil.rmtree(os.path.join(folder, "out"), ignore_errors=True)


run("nan", 256, 1.0, 60, max_steps=120, logging_steps=5, warmup_steps=10)
run("warmup50", 64, 1.0, 0, max_steps=1000, logging_steps=50, warmup_steps=50, lr_scheduler_type="cosine",
    learning_rate=3e-3)
