#!/usr/bin/env bash
# One prepared GPU session for dlora-server (#30's GPU check), under 8 minutes in all, its results in $OUT:
#   1. environment                                                          -> env.log
#   2. dlora-server on Llama-2-7B-shaped random weights in fp16 (runtime=h200_7b, Triton kernels) with
#      4 rank-16 adapters, system=dlora, one replica                        -> server.log, server_summary.json,
#                                                                              stages.log (each stage's status)
#   3. dlora-bench replaying a synthetic workload against it for about a minute (streamed, open loop):
#      tokens/s, TTFT and TPOT as the client measured them, the server's counters from /metrics
#                                                                           -> bench.log, bench_summary.json, bench_requests.csv,
#                                                                              metrics.txt, result.txt
# Usage (from anywhere): OUT=/some/dir bash benchmarks/gpu_server_check.sh
# DRY=1 runs the same stages on the CPU runtime with the tiny model for a few seconds (how it is tested without a GPU).
# Packages the GPU machine lacks (simpy, hydra, fastapi, uvicorn, httpx, prometheus_client, ...) are installed from
# .whl/ when that folder exists (pip download them for the machine's Python, carry .whl with the run).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
if [ "${DRY:-0}" = 1 ]; then
  SERVE=(runtime=cpu_tiny workload=tiny)
  LOAD=(workload=tiny workload.num_requests=24 workload.rate=12)
  START_S=120; BENCH_S=120
else
  # KV capped at 2000 blocks (16 GB in fp16): the h200 profile sizes it for 141 GB, and the machine may be an H100
  SERVE=(runtime=h200_7b workload=default workload.num_adapters=4 workload.rank=16 cluster.replica.max_kv_blocks=2000)
  # ~60 s of arrivals at 8 req/s, the synthetic workload's lengths
  LOAD=(workload=default workload.num_adapters=4 workload.rank=16 workload.num_requests=480 workload.rate=8)
  START_S=180; BENCH_S=200
fi
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL="http://127.0.0.1:$PORT"

# 1. environment
{
  date -u
  nvidia-smi || echo "nvidia-smi: none"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  $PY -c "import fastapi, uvicorn, httpx, prometheus_client; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'httpx', httpx.__version__)"
} > "$OUT/env.log" 2>&1

# 2. the server, in the background until the bench is done
$PY -m dlora_gpu.server.cli system=dlora "${SERVE[@]}" "server.port=$PORT" "hydra.run.dir=$WORK/server" \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
ok=0
for _ in $(seq $((START_S * 4))); do
  if ! kill -0 $SERVER 2>/dev/null; then break; fi
  if $PY -c "import httpx, sys; sys.exit(httpx.get('$URL/health', timeout=2).status_code != 200)" 2>/dev/null; then
    ok=1; break
  fi
  sleep 0.25
done
echo "server healthy=$ok" >> "$OUT/stages.log"

# 3. the replay, the server's metrics, then Ctrl-C to the server (it writes its results folder)
if [ $ok = 1 ]; then
  timeout $BENCH_S $PY -m dlora_bench.cli "url=$URL" "${LOAD[@]}" progress=false "hydra.run.dir=$WORK/bench" \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?" >> "$OUT/stages.log"
  $PY -c "import httpx; print(httpx.get('$URL/metrics', timeout=30).text)" > "$OUT/metrics.txt" 2>&1
fi
kill -INT $SERVER 2>/dev/null
wait $SERVER
echo "server rc=$?" >> "$OUT/stages.log"
cp "$WORK/bench/summary.json" "$OUT/bench_summary.json" 2>/dev/null
cp "$WORK/bench/requests.csv" "$OUT/bench_requests.csv" 2>/dev/null
cp "$WORK/server/summary.json" "$OUT/server_summary.json" 2>/dev/null
$PY - "$OUT/bench_summary.json" > "$OUT/result.txt" 2>&1 <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
ms = lambda x: "-" if x is None else f"{1000 * x:.1f} ms"
print(f"{s['device']}: {s['completed']}/{s['num_requests']} requests, {s['output_tokens_per_s']:.1f} output tokens/s, "
      f"{s['throughput_rps']:.2f} req/s, mean TTFT {ms(s['mean_ttft_s'])}, P99 TTFT {ms(s['p99_ttft_s'])}, "
      f"mean TPOT {ms(s['mean_tpot_s'])}, iterations {s['num_iterations']}, switches {s['num_switches']}")
PY
cat "$OUT/result.txt"
cat "$OUT/stages.log"
