#!/usr/bin/env bash
# Issue #7 on a multi-GPU host (device kind nvidia-h100-x2; x4 adds the tp2-ep2 / ep4 cases and
# the ep=4 row): the multigpu tests, then the EP scaling benchmark. Logs go into the return
# folder ($OUT, else benchmarks/results/) as they are written, so a call cut short still
# returns what finished; the benchmark's JSON is rewritten there after every ep setting.
#
# Device recipe, two calls back to back (Ray staged as for one GPU: ../shared/tools/stage-ray-for-gpu;
# files under $HOME/.cache stay while the machine is warm):
#   call 1  kind nvidia-h100-x2, carry [".gpu-wheels-a"]:  bash .gpu-wheels-a/stage.sh
#   call 2  carry [".gpu-wheels-b"]:  source .gpu-wheels-b/install.sh && bash benchmarks/multigpu.sh
# A later call on the still-warm machine needs no staging (this script puts the staged site on
# PYTHONPATH itself), e.g.  bash benchmarks/multigpu.sh bench
#
#   bash benchmarks/multigpu.sh [all|tests|bench] [extra ep_scaling.py flags…]
# Time limits per part (seconds; a part past its limit is stopped and the next one runs):
# TESTS_LIMIT_S (default 270), BENCH_LIMIT_S (default 250): with ~60 s of install both fit one
# 10-minute call.
# Proof run without a GPU (CPU ranks over gloo, tiny model; seconds to a minute):
#   LORA_CLUSTER_MULTIGPU_CPU=1 PYTHON=.venv/bin/python OUT=/tmp/mg bash benchmarks/multigpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PYTHONPATH="$HOME/.cache/gpu-site:$root:$root/kernels${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast off in this process and everything it starts (Ray's raylet and workers
# inherit it; the rank actors also get it through their runtime_env).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 RAY_DISABLE_USAGE_STATS=1
export PYTHONUNBUFFERED=1  # log lines reach the return folder as they are printed
PY=${PYTHON:-python3}
dest=${OUT:-$root/benchmarks/results}
mkdir -p "$dest"
part=${1:-all}
shift || true

device=cuda
[ "${LORA_CLUSTER_MULTIGPU_CPU:-0}" = 1 ] && device=cpu
tag=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
      | grep -oE '[A-Z][0-9]{2,3}' | head -1 | tr 'A-Z' 'a-z')
tag=${tag:-gpu}
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$device" = cpu ] && tag=cpu

{
  date
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
  nvidia-smi topo -m || true
  $PY - <<'EOF'
import importlib
for m in ("torch", "triton", "ray", "zmq", "safetensors", "tokenizers", "transformers", "peft",
          "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except ImportError:
        print(f"{m} MISSING")
import torch
print("cuda devices:", torch.cuda.device_count(),
      "nccl:", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
EOF
} 2>&1 | tee "$dest/multigpu_env_${tag}x${ngpu}.log"

rc=0
run_tests() {
  echo "=== multigpu tests (limit ${TESTS_LIMIT_S:-270}s) ==="
  timeout -k 10 "${TESTS_LIMIT_S:-270}" $PY -m pytest -m multigpu tests/test_multigpu.py \
    -v -s -rA --durations=0 -p no:cacheprovider 2>&1 \
    | tee "$dest/multigpu_tests_${tag}x${ngpu}.log"
  local status=${PIPESTATUS[0]}
  echo "tests exit status: $status" | tee -a "$dest/multigpu_tests_${tag}x${ngpu}.log"
  [ "$status" = 0 ] || rc=1
  stop_stray_ray "$status"
}
# A part stopped by its time limit may leave its embedded Ray (holding GPUs) behind.
stop_stray_ray() {
  if [ "$1" = 124 ] || [ "$1" = 137 ]; then
    echo "part stopped by its time limit: stopping its Ray"
    $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
  fi
}
run_bench() {
  echo "=== ep_scaling (limit ${BENCH_LIMIT_S:-250}s) ==="
  timeout -k 10 "${BENCH_LIMIT_S:-250}" $PY benchmarks/ep_scaling.py --device "$device" \
    --cache-dir "$HOME/.cache/lora_cluster/ep" --out "$dest" "$@" 2>&1 \
    | grep --line-buffered -v "Token authentication is enabled" \
    | tee "$dest/ep_scaling_${tag}x${ngpu}.log"
  local status=${PIPESTATUS[0]}
  echo "bench exit status: $status" | tee -a "$dest/ep_scaling_${tag}x${ngpu}.log"
  [ "$status" = 0 ] || rc=1
  stop_stray_ray "$status"
}

case "$part" in
  tests) run_tests ;;
  bench) run_bench "$@" ;;
  all) run_tests; run_bench "$@" ;;
  *) echo "usage: $0 all|tests|bench [ep_scaling.py flags…]" >&2; exit 2 ;;
esac
exit $rc
