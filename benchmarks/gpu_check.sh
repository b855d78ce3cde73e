#!/usr/bin/env bash
# One GPU session for dlora_gpu: environment, the GPU test-suite on CUDA (real kernels, bf16
# included), then the kernel benchmark. Run from anywhere with OUT set to an output folder:
#   OUT=/some/dir bash benchmarks/gpu_check.sh [extra benchmarks/kernels.py args, e.g. --quick]
# Nothing is installed: python3 must already hold torch + triton (pytest/hypothesis for the tests).
# Worst case it stays under ~9 minutes (tests capped at 180 s, benchmark sweep budget 170 s).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  python3 - <<'PY'
import sys
import numpy, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__, "| numpy", numpy.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
} 2>&1 | tee "$OUT/env.log"

# --confcutdir: only tests/gpu's conftest, not the simulator's (whose deps may be absent here).
timeout 180 python3 -m pytest -q -p no:cacheprovider --confcutdir=tests/gpu tests/gpu -rs \
  2>&1 | tee "$OUT/tests.log"
test_rc=${PIPESTATUS[0]}

timeout 330 python3 benchmarks/kernels.py --max-seconds 170 --out "$OUT/kernels_h200.csv" "$@" \
  2>&1 | tee "$OUT/kernels.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$test_rc, benchmark rc=$bench_rc" | tee -a "$OUT/kernels.log"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
