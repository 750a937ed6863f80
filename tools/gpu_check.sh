#!/usr/bin/env bash
# One prepared run on the GPU machine (issue #6): everything a device session measures, in one
# call, results under $OUT (JSON lines + logs). Build the binary here first:
#   source <(../shared/gpu/cuda-toolkit.sh) && cargo build --release --features cuda --target-dir target-cuda
#   cp ../shared/gpu/hf_sam3_bench.py target/    # the PyTorch reference (the device sees only the repo)
#   then carry target-cuda/release/lorahost (strip + xz if the tree is near the size limit) and
#   target/hf_sam3_bench.py, and run `bash tools/gpu_check.sh [quick]` from the repository root.
# `quick` skips the larger batches (4, 8, 16 with checkpointing) and batch 2 with checkpointing.
# Order: selftest of the training ops on the GPU (f32, bf16: selftest_*.txt), forward parity,
# bench b2 with a 2-step profile (profile / profile_ops in bench.jsonl), PyTorch eager b2, the ViT
# blocks on their own (bench_isolated.jsonl), bf16
# demo training, then b8 --ckpt, b4, b8, b8 --ckpt-mlp, b12, b16 --ckpt, b2 --ckpt. BUDGET (seconds, default 520) bounds the run:
# a step that would not fit is cut short or skipped, so the results always come back. NO_AB=1
# skips the A/B runs (AB="conv ..." picks some) (flash attention off; ViT blocks op by op; the convolutions on the
# implicit-GEMM kernel; all of lorahost's own kernels and ops off).
set -u
T0=$(date +%s)
# The device returns at most 8 files from $OUT: everything is written to a work folder and
# the end collects summary.txt (GPU, selftests, parity, step log), the bench JSON lines and the
# demo's metrics into $OUT.
FINAL="${OUT:-target/gpu-out}"
OUT="${GPU_WORK:-/tmp/lorahost-gpu-work}"
rm -rf "$OUT"
mkdir -p "$OUT" "$FINAL"
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
  timeout 60 "$BIN" selftest --device cuda --dtype "$d" > "$OUT/selftest_$d.txt" 2>&1
  echo "selftest $d exit $?" >> "$OUT/steps.log"
done

# 1. GPU forward vs CPU forward on the tiny parity fixture (bf16 tolerance) and f32.
log "forward parity"
F=host/tests/fixtures/sam3/tiny_a
for d in f32 bf16; do
  timeout 60 "$BIN" forward --model "$F" --inputs "$F/inputs.safetensors" --out "$OUT/fwd_cuda_$d.safetensors" --device cuda --dtype "$d" >> "$OUT/steps.log" 2>&1
done
timeout 60 "$BIN" forward --model "$F" --inputs "$F/inputs.safetensors" --out "$OUT/fwd_cpu.safetensors" >> "$OUT/steps.log" 2>&1
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

# Steps after the checks get at most what is left (since the start) of ${BUDGET:-520} s (the device call's limit).
left() { echo $(( ${BUDGET:-520} - ($(date +%s) - T0) )); }
# step TIMEOUT NAME CMD...: run when at least 30 s are left, for at most TIMEOUT or what is left.
step() {
  local t=$1 name=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 30 ]; then log "skip $name ($l s left)"; return; fi
  [ "$t" -gt "$l" ] && t=$l
  log "$name (limit $t s)"
  timeout "$t" "$@" >> "$OUT/steps.log" 2>&1
  echo "$name exit $?" >> "$OUT/steps.log"
}
# ab NAME: whether the A/B run NAME is on (AB="detrops sidegrads noflash pipeline blockops conv cublaslt textcache countermasks lorakernels composed" by default;
# NO_AB=1: none).
ab() { [ -z "${NO_AB:-}" ] && [[ " ${AB:-detrops sidegrads noflash pipeline blockops conv cublaslt textcache countermasks lorakernels composed} " == *" $1 "* ]]; }
REF=""
for ref in target/hf_sam3_bench.py shared/gpu/hf_sam3_bench.py ../shared/gpu/hf_sam3_bench.py; do
  [ -f "$ref" ] && { REF=$ref; break; }
done

# 2. Benchmarks: lorahost and PyTorch (eager) on the same card, same run. Two profiled steps
# after the timed ones: where the time goes (profile / profile_ops in the JSON: device time from
# CUDA events as `ms`, the host's issue time as `host_ms`; `host_issue_s_median` against
# `step_s_median` says whether the host's per-operation cost bounds the step).
step 200 "bench lorahost b2" "$BIN" bench --device cuda --dtype bf16 --batch 2 --profile 2 --json "$OUT/bench.jsonl"
[ -n "$REF" ] && step 200 "bench pytorch eager b2" "$PY" "$REF" --batch 2 --json "$OUT/bench.jsonl"
# The ViT blocks on their own, the GPU kept busy so that it never waits for the host: their
# kernels' own time against the same blocks' time inside a step (profile_ops above).
step 60 "bench lorahost b2 isolated blocks" "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 2 --warmup 1 \
  --isolated 3 --json "$OUT/bench_isolated.jsonl"
# The DETR encoder, decoder and geometry layers recorded op by op (about 1,300 more graph
# operations per step: `graph_ops` in the JSON) instead of one op per layer.
ab detrops && step 60 "bench lorahost b2 detr layers op by op" env LORAHOST_DETR_LAYER_OP=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --profile 1 --json "$OUT/bench_detrops.jsonl"
# The layer ops' LoRA gradients back through candle's graph (each op's factors concatenated
# into one operand and split again) instead of the side store.
ab sidegrads && step 60 "bench lorahost b2 no side store" env LORAHOST_SIDE_GRADS=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_nosidegrads.jsonl"
# A/B: the same workload with the flash attention kernels off (the chunked attention), and with
# all of lorahost's own CUDA kernels (flash attention, convolution, LayerNorm, AdamW, fused
# elementwise) off: candle's composed operations.
ab noflash && step 100 "bench lorahost b2 no flash" env LORAHOST_FLASH=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --profile 1 --json "$OUT/bench_noflash.jsonl"
# The flash kernels' one-stage builds (each key tile loaded, then multiplied) instead of the
# pipelined ones (the next tile's cp.async copies in flight while the current one is multiplied).
ab pipeline && step 60 "bench lorahost b2 flash one stage" env LORAHOST_FLASH_PIPELINE=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --profile 1 --json "$OUT/bench_flash1stage.jsonl"
# The ViT blocks recorded op by op (candle's autograd between the layers) instead of as one op.
ab blockops && step 80 "bench lorahost b2 block ops" env LORAHOST_VIT_BLOCK_OP=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_blockops.jsonl"
# The 3x3 convolutions on the implicit-GEMM kernel instead of cuBLAS's nine shifted products.
ab conv && step 60 "bench lorahost b2 conv kernel" env LORAHOST_CONV_GEMM=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_convkernel.jsonl"
# The linear layers' products and the adapters' gradient products composed instead of on cuBLASLt.
ab cublaslt && step 60 "bench lorahost b2 no cublaslt" env LORAHOST_CUBLASLT=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_nocublaslt.jsonl"
# Every step encoding the (same) prompts again instead of reading the frozen text encoder's cache.
ab textcache && step 60 "bench lorahost b2 no text cache" env LORAHOST_TEXT_CACHE=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_notextcache.jsonl"
# Dropout masks drawn into bytes (kept for backward, read by each kernel) instead of drawn again
# by the kernels that apply them: time and peak memory.
ab countermasks && step 60 "bench lorahost b2 drawn masks" env LORAHOST_COUNTER_MASKS=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_drawnmasks.jsonl"
# The adapters' low-rank products composed (the dropped-out input and g·A written for a product
# or the elementwise kernel to read back) instead of the LoRA kernels.
ab lorakernels && step 60 "bench lorahost b2 no LoRA kernels" env LORAHOST_LORA_KERNELS=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --json "$OUT/bench_nolorakernels.jsonl"
ab composed && step 120 "bench lorahost b2 composed" env LORAHOST_FLASH=0 LORAHOST_CONV=0 LORAHOST_FUSED_NORM=0 LORAHOST_FUSED_ADAMW=0 LORAHOST_FUSED_OPS=0 LORAHOST_FUSED_STATS=0 LORAHOST_VIT_BLOCK_OP=0 LORAHOST_CUBLASLT=0 LORAHOST_LORA_KERNELS=0 LORAHOST_DETR_LAYER_OP=0 LORAHOST_SIDE_GRADS=0 \
  "$BIN" bench --device cuda --dtype bf16 --batch 2 --steps 4 --warmup 2 --profile 1 --json "$OUT/bench_composed.jsonl"

# 3. A short GPU training run on the synthetic data: the loss must fall. The demo without its
# plugins (their .wasm builds are not on the device).
sed '/^plugins:/,$d' configs/demo.yaml > "$OUT/demo_gpu.yaml"
step 150 "train demo on cuda" "$BIN" train --config "$OUT/demo_gpu.yaml" --no-hot-reload \
  --override hardware.device=cuda --override training.mixed_precision=bf16 \
  --override output.output_dir="$OUT/demo" --override training.data_dir="$OUT/data"
cp "$OUT/demo/metrics.jsonl" "$OUT/demo_metrics.jsonl" 2>/dev/null

# Batch 8 with checkpointing (PyTorch runs out of memory there), then the other settings.
step 150 "bench lorahost b8 ckpt" "$BIN" bench --device cuda --dtype bf16 --batch 8 --ckpt --steps 4 --warmup 2 --json "$OUT/bench.jsonl"
if [ "${1:-}" != quick ]; then
  # The best throughput at any batch that fits: larger plain batches, and checkpointing.
  step 100 "bench lorahost b4" "$BIN" bench --device cuda --dtype bf16 --batch 4 --steps 4 --warmup 2 --json "$OUT/bench.jsonl"
  step 100 "bench lorahost b8" "$BIN" bench --device cuda --dtype bf16 --batch 8 --steps 4 --warmup 2 --profile 1 --json "$OUT/bench.jsonl"
  # fc1's outputs recomputed in backward: memory against the plain batch 8, and the time it costs.
  step 100 "bench lorahost b8 ckpt-mlp" "$BIN" bench --device cuda --dtype bf16 --batch 8 --ckpt-mlp --steps 3 --warmup 1 --json "$OUT/bench.jsonl"
  # Without the dropout masks kept, batch 12 is estimated at ~67 GiB: the best plain batch?
  step 100 "bench lorahost b12" "$BIN" bench --device cuda --dtype bf16 --batch 12 --steps 3 --warmup 1 --json "$OUT/bench.jsonl"
  # PyTorch's best batch on the H100 reference (7.06 images/s at batch 6, 67 GiB): its best
  # throughput on this card, beside lorahost's.
  [ -n "$REF" ] && step 120 "bench pytorch eager b6" "$PY" "$REF" --batch 6 --json "$OUT/bench.jsonl"
  step 100 "bench lorahost b16 ckpt" "$BIN" bench --device cuda --dtype bf16 --batch 16 --ckpt --steps 3 --warmup 1 --json "$OUT/bench.jsonl"
  step 60 "bench lorahost b2 ckpt" "$BIN" bench --device cuda --dtype bf16 --batch 2 --ckpt --steps 6 --warmup 2 --json "$OUT/bench.jsonl"
fi
log "done"
{
  for f in gpu.csv selftest_f32.txt selftest_bf16.txt parity.txt steps.log; do
    echo "=== $f"; cat "$OUT/$f" 2>/dev/null
  done
  echo "=== ldd (missing)"; grep "not found" "$OUT/ldd.txt"
  # Each bench line in brief, and the profiles: device ms (CUDA events) and host ms per part and
  # for the costliest operations.
  for f in bench.jsonl bench_isolated.jsonl bench_detrops.jsonl bench_nosidegrads.jsonl bench_noflash.jsonl bench_flash1stage.jsonl bench_blockops.jsonl bench_convkernel.jsonl bench_nocublaslt.jsonl bench_notextcache.jsonl bench_drawnmasks.jsonl bench_nolorakernels.jsonl bench_composed.jsonl; do
    [ -f "$OUT/$f" ] || continue
    echo "=== $f"
    "$PY" - "$OUT/$f" <<'EOF' 2>&1
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "step_s_median" not in r:
        print(line.strip()[:300]); continue
    print("batch %s ckpt %s: %.3f s/step, %.2f img/s, peak %.1f GiB, host issue %s s, graph ops %s" % (
        r.get("batch"), ("mlp" if r.get("ckpt_mlp") else r.get("ckpt")), r["step_s_median"], r.get("images_per_s", 0),
        r.get("peak_mem_gib", 0), r.get("host_issue_s_median", "?"), r.get("graph_ops", "?")))
    for p in r.get("profile") or []:
        print("  part %-28s device %8.1f ms  host %8.1f ms" % (p["part"], p["ms"], p.get("host_ms", 0)))
    for o in (r.get("profile_ops") or [])[:40]:
        print("  op %-50s %6.1f calls  device %8.2f ms  host %8.2f ms" % (o["op"], o["calls"], o["ms"], o.get("host_ms", 0)))
    for o in (r.get("isolated") or [])[:40]:
        print("  isolated %-44s %6.1f calls  device %8.2f ms  host %8.2f ms" % (o["op"], o["calls"], o["ms"], o.get("host_ms", 0)))
EOF
  done
} > "$FINAL/summary.txt"
for f in bench.jsonl bench_isolated.jsonl bench_detrops.jsonl bench_noflash.jsonl bench_composed.jsonl demo_metrics.jsonl; do
  [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/$f"
done
cat "$FINAL/summary.txt" | grep -v "^{" | tail -60
