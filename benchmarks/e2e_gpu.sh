#!/usr/bin/env bash
# End-to-end benchmark on one GPU (preset h100-moe), in parts that each fit one 10-minute call.
#
# On the GPU machine, in the repo root, with Ray staged (../shared/tools/stage-ray-for-gpu; the
# second staging call does `source .gpu-wheels-b/install.sh && bash benchmarks/e2e_gpu.sh engine`):
#
#   bash benchmarks/e2e_gpu.sh engine      # write the model (first time, ~1 min), 45 s
#                                          # warm-up, engine sweep over N = 1,5,8,32,100,1000,
#                                          # decode step time                          (~6 min)
#   bash benchmarks/e2e_gpu.sh peft        # HF PEFT mixed batches, N = 1…100          (~4 min)
#   bash benchmarks/e2e_gpu.sh merged      # merged weights per adapter, N = 1…100     (~5 min)
#   bash benchmarks/e2e_gpu.sh all         # the three in one go (needs ~15 min)
#   bash benchmarks/e2e_gpu.sh async-ab    # closed loop, N = 100, async_steps off vs on in
#                                          # alternating rounds (benchmarks/async_steps.py, ~6 min)
# The engine part runs with the default async_steps="auto" (on through Ray); the engine's
# stats in the JSON say so ("async_steps", "tokens_discarded").
#   extra flags go to `lora-cluster bench`, e.g.  bash benchmarks/e2e_gpu.sh peft --adapters 1,100
#
# Each part merges its results into $STATE/e2e_h100-moe.json (falling back to a copy carried
# in benchmarks/results/ when the machine is fresh; FRESH=1 starts a new file) and copies
# JSON + PNG to $OUT (the device tool's return folder) when set, else to benchmarks/results/. Weights are written at run
# time into $BENCH_CACHE (never committed); they stay while the machine is warm.
# transformers + peft are needed for the baselines; without them those parts say "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PYTHONPATH="$root:$root/kernels${PYTHONPATH:+:$PYTHONPATH}"
export RAY_DISABLE_USAGE_STATS=1
PY=${PYTHON:-python3}
STATE=${STATE:-$HOME/.cache/lora_cluster/bench-results}
BENCH_CACHE=${BENCH_CACHE:-$HOME/.cache/lora_cluster/bench}
RESULT_NAME=e2e_h100-moe
mkdir -p "$STATE"

part=${1:-engine}
shift || true

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF'
import importlib
for m in ("torch", "triton", "ray", "zmq", "safetensors", "tokenizers", "numpy", "transformers",
          "peft", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except ImportError:
        print(f"{m} MISSING")
EOF

previous() {
  # the newest earlier result: this machine's state dir, else a copy carried in the repo
  for f in "$STATE/$RESULT_NAME.json" "$root/benchmarks/results/$RESULT_NAME.json"; do
    if [ -f "$f" ]; then echo "$f"; return; fi
  done
}

run_part() {
  local parts=$1; shift
  local prev; prev=$(previous)
  local update=()
  if [ -n "$prev" ] && [ "${FRESH:-0}" != "1" ]; then update=(--update "$prev"); fi
  echo "=== parts: $parts ${update[*]:-} ==="
  local dest=${OUT:-$root/benchmarks/results}
  mkdir -p "$dest"
  # The log goes to $dest as it is written: a call cut short (device time, call limit)
  # still returns every finished N's lines.
  $PY benchmarks/e2e.py --preset h100-moe --parts "$parts" --cache-dir "$BENCH_CACHE" \
    --out "$STATE" "${update[@]}" "$@" 2>&1 | tee -a "$dest/$RESULT_NAME.${parts//,/-}.log"
  cp "$STATE/$RESULT_NAME.json" "$dest/"
  if [ -f "$STATE/$RESULT_NAME.png" ]; then cp "$STATE/$RESULT_NAME.png" "$dest/"; fi
}

case "$part" in
  engine) run_part engine,steptime "$@" ;;
  peft) run_part peft "$@" ;;
  merged) run_part merged "$@" ;;
  all)
    run_part engine,steptime "$@"
    run_part peft "$@"
    run_part merged "$@"
    ;;
  async-ab)
    dest=${OUT:-$root/benchmarks/results}
    mkdir -p "$dest"
    $PY benchmarks/async_steps.py --preset h100-moe --backend ray --adapters 100 --rounds 2 \
      --warmup 20 --duration 30 --cache-dir "$BENCH_CACHE" \
      --out "$dest/async_steps_h100.json" "$@" 2>&1 | tee -a "$dest/async_steps_h100.log"
    ;;
  *) echo "usage: $0 engine|peft|merged|all|async-ab [bench flags…]" >&2; exit 2 ;;
esac
