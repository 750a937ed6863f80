#!/usr/bin/env bash
# One prepared run on the GPU machine (issue #6): everything a device session measures, in one
# call, results under $OUT (JSON lines + logs). Build the binary here first:
#   source <(../shared/gpu/cuda-toolkit.sh) && cargo build --release --features cuda --target-dir target-cuda
#   cp ../shared/gpu/hf_sam3_bench.py target/    # the PyTorch reference (the device sees only the repo)
#   then carry target-cuda/release/lorahost (strip + xz if the tree is near the size limit) and
#   target/hf_sam3_bench.py, and run `bash tools/gpu_check.sh [quick]` from the repository root.
# `quick` skips the checkpointing and larger-batch benches (about 3 minutes less).
# Order: selftest of the training ops on the GPU (f32, bf16: selftest_*.txt), forward parity,
# bf16 demo training, bench b2 with a 2-step profile (profile / profile_ops in bench.jsonl),
# PyTorch eager b2, then b2 --ckpt, b8 --ckpt, b4.
set -u
OUT="${OUT:-target/gpu-out}"
mkdir -p "$OUT"
BIN="${LORAHOST_BIN:-target-cuda/release/lorahost}"
[ -x "$BIN" ] || { [ -f "$BIN.xz" ] && xz -dkf "$BIN.xz" && chmod +x "$BIN"; }
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
PY="${PYTHON:-/opt/torch/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
ldd "$BIN" > "$OUT/ldd.txt" 2>&1

# 0. The training ops lorahost writes itself, on the GPU, against the f64 CPU reference.
log "selftest"
for d in f32 bf16; do
  timeout 120 "$BIN" selftest --device cuda --dtype "$d" > "$OUT/selftest_$d.txt" 2>&1
  echo "selftest $d exit $?" >> "$OUT/steps.log"
done

# 1. GPU forward vs CPU forward on the tiny parity fixture (bf16 tolerance) and f32.
log "forward parity"
F=host/tests/fixtures/sam3/tiny_a
for d in f32 bf16; do
  timeout 120 "$BIN" forward --model "$F" --inputs "$F/inputs.safetensors" --out "$OUT/fwd_cuda_$d.safetensors" --device cuda --dtype "$d" >> "$OUT/steps.log" 2>&1
done
timeout 120 "$BIN" forward --model "$F" --inputs "$F/inputs.safetensors" --out "$OUT/fwd_cpu.safetensors" >> "$OUT/steps.log" 2>&1
"$PY" - "$OUT" >> "$OUT/parity.txt" 2>&1 <<'EOF'
import sys
from safetensors.numpy import load_file
o = sys.argv[1]
cpu = load_file(f"{o}/fwd_cpu.safetensors")
for d in ("f32", "bf16"):
    try:
        g = load_file(f"{o}/fwd_cuda_{d}.safetensors")
    except Exception as e:
        print(d, "missing", e); continue
    for k in sorted(cpu):
        a, b = cpu[k].astype("float64"), g[k].astype("float64")
        print(d, k, "max abs diff %.3g (scale %.3g)" % (abs(a - b).max(), abs(a).max()))
EOF

# 2. A short GPU training run on the synthetic data: the loss must fall.
log "train demo on cuda"
# The demo without its plugins (their .wasm builds are not on the device).
sed '/^plugins:/,$d' configs/demo.yaml > "$OUT/demo_gpu.yaml"
timeout 300 "$BIN" train --config "$OUT/demo_gpu.yaml" --no-hot-reload \
  --override hardware.device=cuda --override training.mixed_precision=bf16 \
  --override output.output_dir="$OUT/demo" --override training.data_dir="$OUT/data" > "$OUT/train.log" 2>&1
cp "$OUT/demo/metrics.jsonl" "$OUT/demo_metrics.jsonl" 2>/dev/null

# 3. Benchmarks: lorahost and PyTorch (eager) on the same card, same run.
log "bench lorahost b2"
# Two profiled steps after the timed ones: where the time goes (profile / profile_ops in the JSON).
timeout 300 "$BIN" bench --device cuda --dtype bf16 --batch 2 --profile 2 --json "$OUT/bench.jsonl" >> "$OUT/steps.log" 2>&1
log "bench pytorch eager b2"
for ref in target/hf_sam3_bench.py shared/gpu/hf_sam3_bench.py ../shared/gpu/hf_sam3_bench.py; do
  if [ -f "$ref" ]; then
    timeout 300 "$PY" "$ref" --batch 2 --json "$OUT/bench.jsonl" >> "$OUT/steps.log" 2>&1
    break
  fi
done
if [ "${1:-}" != quick ]; then
  log "bench lorahost b2 ckpt"
  timeout 300 "$BIN" bench --device cuda --dtype bf16 --batch 2 --ckpt --json "$OUT/bench.jsonl" >> "$OUT/steps.log" 2>&1
  log "bench lorahost b8 ckpt"
  timeout 400 "$BIN" bench --device cuda --dtype bf16 --batch 8 --ckpt --steps 4 --json "$OUT/bench.jsonl" >> "$OUT/steps.log" 2>&1
  # Without checkpointing the model predicts 47 GiB at batch 4 and 91 GiB at batch 8 (too big
  # for an 80 GB card): batch 4 is the largest plain batch worth timing.
  log "bench lorahost b4"
  timeout 400 "$BIN" bench --device cuda --dtype bf16 --batch 4 --steps 4 --json "$OUT/bench.jsonl" >> "$OUT/steps.log" 2>&1
fi
log "done"
cat "$OUT/bench.jsonl" 2>/dev/null
