#!/usr/bin/env python3
"""Write the TensorBoard fixtures in host/tests/fixtures/tfevents/ (needs `pip install torch
transformers accelerate tensorboard`).

Each fixture pairs event files written by the real writers with the same run in a format
lorahost already reads, so `host/tests/tfevents.rs` can check the event-file reader against it:

- `hf/`: a Hugging Face Trainer run (a tiny regression model, 40 steps, warmup, evaluation every
  10 steps) with `report_to=["tensorboard"]`: `hf/runs/<run>/events.out.tfevents.*` from
  transformers' TensorBoardCallback (tags `train/loss`, `train/learning_rate`, `train/grad_norm`,
  `train/epoch`, `eval/loss`, the final summary, the arguments as text) and the same run's
  `hf/trainer_state.json`.
- `writer/`: a trainer that logs like SAM2/SAM3's official one (0-based steps, tags
  `Step_Losses/Losses/train_all_loss` and its components, `Optim/lr`, a gradient norm, a
  validation loss every 25 steps, a histogram and text), through `torch.utils.tensorboard`:
  old-style scalars (`simple_value`), new-style ones (tensors with `float_val` and, with
  double precision, `double_val`). The run is resumed once: a second event file in the same
  folder repeats steps 50..59 with other values. `writer/expected.jsonl` is the same run as
  lorahost's metrics log (1-based steps, the resumed values, step times from the wall clock of
  each file's previous point).
- `sam3_trainer/`: SAM3's official trainer's TensorBoard logging, call for call (see
  `sam3_trainer_run`), and `sam3_trainer/expected.jsonl`, the same run as a metrics log.
"""
import json
import math
import os
import shutil
import sys
import tempfile

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "host", "tests", "fixtures", "tfevents")


def noise(i, k):
    x = math.sin(i * 12.9898 + k * 78.233) * 43758.5453
    return 2.0 * (x - math.floor(x)) - 1.0


def hf_run(out):
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, labels=None):
            y = self.lin(x).squeeze(-1)
            loss = ((y - labels) ** 2).mean()
            return {"loss": loss, "logits": y}

    g = torch.Generator().manual_seed(1)
    xs = torch.randn(64, 4, generator=g)
    ys = xs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(64, generator=g)
    data = [{"x": xs[i], "labels": ys[i]} for i in range(64)]
    work = tempfile.mkdtemp()
    # transformers 5 takes the TensorBoard folder from the environment.
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(out, "runs", "Nov29_12-00-00_fixture")
    args = TrainingArguments(
        output_dir=work,
        report_to=["tensorboard"],
        max_steps=40,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        warmup_steps=5,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data, eval_dataset=data[:16])
    trainer.train()
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    shutil.rmtree(work, ignore_errors=True)


def writer_run(out):
    import torch
    from torch.utils.tensorboard import SummaryWriter

    start = 1_764_000_000.0
    records = {}

    def log(w, step, wall, prev_wall, resumed):
        s = step + 1
        f = 1.3 if resumed else 1.0
        loss = (3.0 * math.exp(-s / 40.0) + 0.5) * (1 + 0.1 * noise(s, 1)) * f
        mask, dice = 0.6 * loss, 0.4 * loss
        lr = 1e-4 * min(1.0, s / 10.0)
        gn = (2.0 * math.exp(-s / 50.0) + 0.3) * (1 + 0.2 * noise(s, 2))
        # Old style, new style (float_val) and double precision (double_val).
        w.add_scalar("Step_Losses/Losses/train_all_loss", loss, step, walltime=wall)
        w.add_scalar("Step_Losses/Losses/train_all_loss_mask", mask, step, walltime=wall, new_style=True)
        w.add_scalar("Step_Losses/Losses/train_all_loss_dice", dice, step, walltime=wall)
        w.add_scalar("Optim/lr", lr, step, walltime=wall, new_style=True, double_precision=True)
        w.add_scalar("Grad/total_norm", gn, step, walltime=wall)
        rec = {"step": s, "loss": loss, "lr": lr, "grad_norm": gn,
               "losses": {"train_all_loss_dice": dice, "train_all_loss_mask": mask}}
        if prev_wall is not None:
            rec["step_time_ms"] = (wall - prev_wall) * 1000.0
        if step > 0 and step % 25 == 0:
            val = 0.8 * loss
            w.add_scalar("Losses/val_all_loss", val, step, walltime=wall)
            records["val", step] = val
        if step % 20 == 0:
            w.add_histogram("Params/lora_b", torch.linspace(-1, 1, 50) * s, step, walltime=wall)
            w.add_text("notes", f"step {s}", step, walltime=wall)
        records[s] = rec

    # The first run: steps 0..59, 0.5 s a step. The resumed one: from step 50, 0.5 s a step up
    # to step 79, then 2 s a step (a slowdown).
    first = SummaryWriter(out, filename_suffix=".first")
    wall, prev = start, None
    for step in range(60):
        log(first, step, wall, prev, False)
        prev, wall = wall, wall + 0.5
    first.close()
    second = SummaryWriter(out, filename_suffix=".second")
    wall, prev = start + 3600.0, None
    for step in range(50, 100):
        log(second, step, wall, prev, True)
        prev, wall = wall, wall + (0.5 if step < 79 else 2.0)
    second.close()
    vals = sorted((k[1], v) for k, v in records.items() if isinstance(k, tuple))
    with open(os.path.join(os.path.dirname(out), "expected.jsonl"), "w") as f:
        for s in range(1, 101):
            rec = dict(records[s])
            # A validation at step t reaches the steps after it.
            seen = [(at, v) for at, v in vals if at + 1 < s]
            if seen:
                rec["validation.step"] = float(seen[-1][0] + 1)
                rec["validation.loss"] = seen[-1][1]
            f.write(json.dumps(rec) + "\n")


def sam3_trainer_run(out):
    """The logging of SAM3's official trainer (facebookresearch/sam3, sam3/train/trainer.py and
    sam3/train/utils/logger.py), call for call: `add_scalar(..., new_style=True)` through
    `torch.utils.tensorboard.SummaryWriter`; per-step tags every `log_scalar_frequency` steps at
    the 0-based step counter (`Step_Losses/Losses/train_all_loss` and its terms under it,
    `Optim/lr`, `Optim/weight_decay`, the `Step_Stats/<phase>/...` meters, the validation
    meters at the validation step counter), the epoch's `log_dict` at the epoch number
    (`Losses/<phase>_all_loss...`, `Trainer/where`, `Trainer/epoch`, `Trainer/steps_<phase>`).
    3 epochs of 60 steps, logged every 10; validation after each epoch."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=out, filename_suffix="2f1c7a9e-0000-4000-8000-000000000000")
    log = lambda name, v, step, wall: w.add_scalar(name, v, global_step=step, walltime=wall, new_style=True)
    freq, per_epoch, epochs, val_iters = 10, 60, 3, 20
    wall = 1_764_100_000.0
    steps = {"train": 0, "val": 0}
    expected, validations, epoch_ends = {}, [], {}
    terms = ["loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"]
    for epoch in range(epochs):
        sums = {t: 0.0 for t in ["core"] + terms}
        for it in range(per_epoch):
            g = steps["train"]
            s = g + 1
            core = (4.0 * math.exp(-s / 60.0) + 1.0) * (1 + 0.15 * noise(s, 3))
            parts = {t: core * (i + 1) / 15.0 for i, t in enumerate(terms)}
            for t in terms:
                sums[t] += parts[t]
            sums["core"] += core
            lr = 5e-4 * (1 + math.cos(math.pi * g / (per_epoch * epochs))) / 2
            wall += 0.8
            if g % freq == 0:
                for t in terms:
                    log(f"Step_Losses/Losses/train_all_loss/{t}", parts[t], g, wall)
                log("Step_Losses/Losses/train_all_loss", core, g, wall)
            steps["train"] += 1
            if it % freq == 0:
                log("Optim/lr", lr, g, wall)
                log("Optim/weight_decay", 0.1, g, wall)
                for name, v in [("Batch Time", 0.8), ("Data Time", 0.05), ("Mem (GB)", 20.5),
                                ("Time Elapsed", wall - 1_764_100_000.0), ("Losses/train_all_loss", core)]:
                    log(f"Step_Stats/train/{name}", v, steps["train"], wall)
                rec = {"step": s, "loss": core, "lr": lr, "grad_norm": None, "epoch": epoch,
                       "losses": {t: parts[t] for t in terms}, "wall": wall}
                expected[s] = rec
        log("Step_Stats/train/Time Elapsed", wall - 1_764_100_000.0, steps["train"], wall)
        outs = {"Losses/train_all_loss": sums["core"] / per_epoch}
        outs.update({f"Losses/train_all_{t}": sums[t] / per_epoch for t in terms})
        outs.update({"Trainer/where": (epoch + 1) / epochs, "Trainer/epoch": epoch, "Trainer/steps_train": steps["train"]})
        for k, v in outs.items():
            log(k, v, epoch, wall)
        epoch_ends[epoch] = steps["train"]
        total = 0.0
        for it in range(val_iters):
            v = 0.9 * (4.0 * math.exp(-steps["train"] / 60.0) + 1.0) * (1 + 0.05 * noise(it, epoch))
            total += v
            wall += 0.3
            if it % freq == 0:
                log("Step_Stats/val/Losses/val_all_loss", v, steps["val"], wall)
            steps["val"] += 1
        val = total / val_iters
        for k, v in {"Losses/val_all_loss": val, "Trainer/where": (epoch + 1) / epochs, "Trainer/epoch": epoch,
                     "Trainer/steps_val": steps["val"]}.items():
            log(k, v, epoch, wall)
        validations.append((steps["train"], val))
    w.close()
    # The step time: the wall clock between logged loss points over the steps between them.
    prev = None
    with open(os.path.join(os.path.dirname(out), "expected.jsonl"), "w") as f:
        for s in sorted(expected):
            rec = dict(expected[s])
            rec["grad_norm"] = float("nan")
            if prev is not None:
                # Validation pauses count into the interval they fall in.
                rec["step_time_ms"] = (rec["wall"] - expected[prev]["wall"]) * 1000.0 / (s - prev)
            del rec["wall"]
            seen = [(at, v) for at, v in validations if at < s]
            if seen:
                rec["validation.step"] = float(seen[-1][0])
                rec["validation.loss"] = seen[-1][1]
            prev = s
            f.write(json.dumps({k: v for k, v in rec.items() if v is not None}).replace("NaN", "null") + "\n")


def main():
    only = sys.argv[1:] or ["hf", "writer", "sam3_trainer"]
    if "hf" in only:
        out = os.path.join(here, "hf")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        hf_run(out)
    if "writer" in only:
        base = os.path.join(here, "writer")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(os.path.join(base, "run"))
        writer_run(os.path.join(base, "run"))
    if "sam3_trainer" in only:
        base = os.path.join(here, "sam3_trainer")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(os.path.join(base, "tensorboard"))
        sam3_trainer_run(os.path.join(base, "tensorboard"))
    for root, _, files in os.walk(here):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"{os.path.relpath(p, here)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
