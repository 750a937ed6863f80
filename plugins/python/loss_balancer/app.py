"""loss_balancer: a lorahost plugin in Python (the second-language example).

Hook: loss-weights. SAM3's loss has terms of very different sizes (loss_mask is weighted 200,
loss_dice 10, ...). This plugin keeps an exponential moving average of each term's weighted
contribution and answers factors that pull every term's contribution towards their mean, clamped
to [min_factor, max_factor], so no single term dominates the gradient. It starts balancing after
`warmup` micro-batches; before that it defers.

Config (every key optional):
  beta        0.98   EMA decay of the per-term contributions
  warmup      20     micro-batches observed before the first answer
  min_factor  0.25   smallest factor answered
  max_factor  4.0    largest factor answered

Build (needs `pip install componentize-py==0.25.1`):
  componentize-py -d ../../../wit -w plugin componentize app -o loss_balancer.wasm

A componentize-py plugin implements one class per exported interface of the `plugin` world, and
returns the defaults from the hooks it does not list in `describe`.
"""
import json

import wit_world
from wit_world import exports
from wit_world.imports import host, types
from componentize_py_types import Err

KEYS = {"beta": 0.98, "warmup": 20, "min_factor": 0.25, "max_factor": 4.0}


class _State:
    def __init__(self):
        self.config = dict(KEYS)
        self.ema = {}  # term name -> EMA of weight * value
        self.seen = 0


STATE = _State()


class Lifecycle(exports.Lifecycle):
    def describe(self) -> types.Manifest:
        return types.Manifest(
            name="loss_balancer",
            version="0.1.0",
            description="balances loss terms by their running contribution (Python example)",
            hooks=[types.Hook.LOSS_WEIGHTS],
        )

    def init(self, config: str, run: types.RunInfo) -> None:
        cfg = json.loads(config or "{}") or {}
        unknown = sorted(set(cfg) - set(KEYS))
        if unknown:
            raise Err(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
        STATE.config = {**KEYS, **{k: float(v) for k, v in cfg.items()}}
        if not 0.0 <= STATE.config["beta"] < 1.0:
            raise Err("beta must be in [0, 1)")
        if not 0.0 < STATE.config["min_factor"] <= 1.0 <= STATE.config["max_factor"]:
            raise Err("need 0 < min_factor <= 1 <= max_factor")
        STATE.ema = {}
        STATE.seen = 0

    def snapshot(self) -> bytes:
        return json.dumps({"ema": STATE.ema, "seen": STATE.seen}).encode()

    def restore(self, state: bytes) -> None:
        try:
            data = json.loads(bytes(state).decode())
            STATE.ema = {str(k): float(v) for k, v in data["ema"].items()}
            STATE.seen = int(data["seen"])
        except Exception as e:  # any malformed state is "incompatible"
            raise Err(f"incompatible state: {e}")


class LossHook(exports.LossHook):
    def loss_weights(self, info: types.MicroBatchInfo, terms):
        c = STATE.config
        for t in terms:
            contribution = abs(t.weight * t.value)
            if contribution != contribution or contribution == float("inf"):
                continue  # skip NaN/inf; the host's own guard handles them
            old = STATE.ema.get(t.name)
            STATE.ema[t.name] = contribution if old is None else c["beta"] * old + (1 - c["beta"]) * contribution
        STATE.seen += 1
        if STATE.seen <= c["warmup"] or not terms:
            return None
        known = [STATE.ema[t.name] for t in terms if STATE.ema.get(t.name, 0.0) > 0.0]
        if not known:
            return None
        target = sum(known) / len(known)
        out = []
        for t in terms:
            e = STATE.ema.get(t.name, 0.0)
            f = 1.0 if e <= 0.0 else min(c["max_factor"], max(c["min_factor"], target / e))
            out.append(types.TermWeight(name=t.name, factor=f))
        host.emit_metrics([types.NamedValue(name="factor." + w.name, value=w.factor) for w in out])
        return out


# The hooks this plugin does not implement still need their exports; the host never calls them.
class StepHook(exports.StepHook):
    def on_step(self, metrics):
        return types.Action_Continue()


class GradHook(exports.GradHook):
    def on_grads(self, report):
        return types.GradVerdict_Accept()


class LrHook(exports.LrHook):
    def lr_for_step(self, request):
        return None


class SamplingHook(exports.SamplingHook):
    def epoch_order(self, epoch, samples):
        return None

    def next_batch(self, request):
        return None

    def observe(self, indices, losses):
        pass
