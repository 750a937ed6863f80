#!/usr/bin/env python3
"""Console output of two trainers, as a user's nohup.out / SLURM .out file holds it, for
`lorahost doctor --trace` (host/src/console_log.rs) to read.

Needs `pip install torch transformers` (tqdm comes with them). Writes, under
host/tests/fixtures/console_logs/:

- sam3_lora_stdout.log: SAM3_LoRA's training loop (train_sam3_lora_native.py, Sompote/SAM3_LoRA)
  printing through the real tqdm: a `tqdm(train_loader, desc=f"Epoch {epoch+1}")` bar with
  `set_postfix({"loss": ...})` after every batch, a "Validation" bar with `val_loss`, and the
  per-epoch "Epoch E/N - Train Loss: ..., Val Loss: ..." line. The model is not run: the
  losses are the known sequence in sam3_lora_losses.json (what the reader must recover,
  to tqdm's 3 significant digits), so the fixture is small and exact.
- hf_trainer_stdout.log: a real transformers Trainer run (a tiny regression model, 3 epochs,
  logging every 4 steps, evaluation every epoch) with its progress bar and its printed
  `{'loss': ..., 'grad_norm': ..., 'learning_rate': ..., 'epoch': ...}` lines; the trainer's
  own trainer_state.json is saved beside it as hf_trainer_state.json (the reference).

Run from the repository root: python tools/gen_console_log_fixtures.py
"""
import contextlib
import io
import json
import math
import os
import random
import sys
import tempfile

from tqdm import tqdm

OUT = os.path.join("host", "tests", "fixtures", "console_logs")


class Capture(io.StringIO):
    """A file that tqdm takes for a pipe (not a terminal), as nohup.out is."""

    def isatty(self):
        return False


def sam3_lora():
    rng = random.Random(7)
    epochs, batches, val_batches = 3, 12, 4
    print_buf = Capture()
    losses = []
    with contextlib.redirect_stdout(print_buf):
        print("Loaded COCO dataset: train split")
        print("  Images: 12")
        print("Starting training for 3 epochs...")
        print("Training samples: 12, Validation samples: 4")
        for epoch in range(epochs):
            train_losses = []
            pbar = tqdm(range(batches), desc=f"Epoch {epoch+1}", file=print_buf, mininterval=0)
            for _ in pbar:
                # A fluctuating, slowly falling per-batch loss (SAM3_LoRA's F10).
                loss = (200.0 - 15.0 * epoch) * (1.0 + 0.25 * (rng.random() - 0.5))
                losses.append(loss)
                train_losses.append(loss)
                pbar.set_postfix({"loss": loss})
            pbar.close()
            val_pbar = tqdm(range(val_batches), desc="Validation", file=print_buf, mininterval=0)
            for _ in val_pbar:
                val_pbar.set_postfix({"val_loss": 17.0 - epoch + rng.random()})
            val_pbar.close()
            avg = sum(train_losses) / len(train_losses)
            val = 17.0 - 1.1 * epoch
            print(f"\nEpoch {epoch+1}/{epochs} - Train Loss: {avg:.6f}, Val Loss: {val:.6f}")
    with open(os.path.join(OUT, "sam3_lora_stdout.log"), "w") as f:
        f.write(print_buf.getvalue())
    with open(os.path.join(OUT, "sam3_lora_losses.json"), "w") as f:
        json.dump({"batches_per_epoch": batches, "epochs": epochs, "losses": losses,
                   "val_losses": [17.0 - 1.1 * e for e in range(epochs)]}, f, indent=1)


def hf_trainer():
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)

    class Data(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(n)
            self.x = torch.randn(n, 8, generator=g)
            self.y = self.x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, x, labels=None):
            out = self.net(x)
            loss = nn.functional.mse_loss(out, labels)
            return {"loss": loss, "logits": out}

    buf = Capture()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=3, per_device_train_batch_size=8,
            learning_rate=1e-2, warmup_steps=3, logging_steps=4, eval_strategy="epoch",
            save_strategy="no", report_to=[], disable_tqdm=False, use_cpu=True, seed=0,
        )
        trainer = Trainer(model=Model(), args=args, train_dataset=Data(96), eval_dataset=Data(16))
        hf_logging.disable_progress_bar  # (the Trainer's own bars stay on)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            trainer.train()
        trainer.state.save_to_json(os.path.join(OUT, "hf_trainer_state.json"))
    with open(os.path.join(OUT, "hf_trainer_stdout.log"), "w") as f:
        f.write(buf.getvalue())


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    sam3_lora()
    hf_trainer()
    print("wrote", OUT, file=sys.stderr)
