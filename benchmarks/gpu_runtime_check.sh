#!/usr/bin/env bash
# One prepared GPU session for the runtime and its calibration, each stage under its own timeout,
# under 8 minutes in all, at most 8 result files in $OUT:
#   1. env + the GPU test suite (tests/gpu)                                  -> tests.log
#   2. write PEFT-format adapters of Llama-2-7B shapes, microbenchmark the runtime's executor on
#      7B-shaped random weights with them (dlora-calibrate), 3. fit a measured h200-llama-2-7b profile
#                                                                           -> points.csv, profile.yaml, fit_report.md
#   4. short replays of slora and dlora with the KV cache capped so that preemption happens, and
#   5. dlora-validate of each against the simulator with the measured profile -> validation_{slora,dlora}.md, replay.log
# Usage (from anywhere): OUT=/some/dir bash benchmarks/gpu_runtime_check.sh
# DRY=1 runs the same stages on the CPU runtime with tiny sizes (how the script is tested without a GPU).
# Packages the GPU machine lacks (simpy, hydra) are installed from .whl/ when that folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
if [ "${DRY:-0}" = 1 ]; then
  RUNTIME=(runtime=cpu_tiny)
  CAL_ARGS=(--quick)
  REPLAY=(workload.num_requests=24 cluster.replica.max_kv_blocks=40 cluster.replica.host_swap_bytes=200000
          workload.rate=20 workload.output.high=160)
  TESTS=(tests/gpu/test_gpu_kv_cache.py)
  RANKS="8 16 32"
else
  RUNTIME=(runtime=h200_7b)
  CAL_ARGS=(--sweeps 1)   # a GPU does not drift like a shared CPU: one sweep keeps the stage in its budget
  REPLAY=(workload=default workload.num_requests=300 workload.rate=12 cluster.replica.max_kv_blocks=600
          cluster.replica.max_num_seqs=32)
  TESTS=(tests/gpu)
  RANKS="8 16 32"
fi

# 1. environment and the GPU tests
{
  date -u
  nvidia-smi || echo "nvidia-smi: none"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  timeout 150 $PY -m pytest -q -p no:cacheprovider --confcutdir=tests/gpu "${TESTS[@]}" -rs
  echo "tests rc=$?"
} > "$OUT/tests.log" 2>&1

# 2-3. PEFT adapters of the model's shapes (ranks cycling as the harness expects), microbenchmarks, fit
timeout 60 $PY - "$WORK/adapters" "${RUNTIME[0]}" $RANKS <<'PY' > "$OUT/replay.log" 2>&1
import sys
from calibration.microbench import BenchConfig
from dlora_sim.core.config import compose
from dlora_gpu.adapters import write_peft_adapter
from dlora_gpu.model import LlamaConfig
folder, runtime, ranks = sys.argv[1], sys.argv[2], [int(r) for r in sys.argv[3:]]
cfg = compose([runtime], "serve")
model = LlamaConfig.preset(cfg.model.name)
for i in range(BenchConfig().num_adapters):
    write_peft_adapter(f"{folder}/adapter-{i}", model, ranks[i % len(ranks)], 2 * ranks[i % len(ranks)], seed=i)
print("wrote", BenchConfig().num_adapters, "PEFT adapters to", folder)
PY
echo "adapters rc=$?" >> "$OUT/replay.log"
timeout 240 $PY -m calibration.calibrate "${RUNTIME[@]}" "runtime.adapters_dir=$WORK/adapters" "${CAL_ARGS[@]}" \
  --out "$WORK/calibrate" >> "$OUT/replay.log" 2>&1
echo "calibrate rc=$?" >> "$OUT/replay.log"
for f in points.csv profile.yaml fit_report.md; do cp "$WORK/calibrate/$f" "$OUT/" 2>/dev/null; done

# 4-5. replays on the runtime (real clock) and their validation against the simulator
PROFILE=(); [ -f "$WORK/calibrate/profile.yaml" ] && PROFILE=("profile.path=$WORK/calibrate/profile.yaml")
for system in slora dlora; do
  timeout 75 $PY -m calibration.validate "${RUNTIME[@]}" "system=$system" "${PROFILE[@]}" "${REPLAY[@]}" charts=false \
    --out "$WORK/validate_$system" >> "$OUT/replay.log" 2>&1
  echo "validate $system rc=$?" >> "$OUT/replay.log"
  cp "$WORK/validate_$system/validation.md" "$OUT/validation_$system.md" 2>/dev/null
done
grep -E "rc=" "$OUT/tests.log" "$OUT/replay.log"
# any stage that failed fails the script
if grep -hE "rc=[1-9]" "$OUT/tests.log" "$OUT/replay.log" >/dev/null; then
  echo "gpu_runtime_check: a stage failed (rc lines above)" >&2
  exit 1
fi
