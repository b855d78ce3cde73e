"""Side by side with Vidur (microsoft/vidur): the same requests through both simulators.

Llama-2-7B on one A100 per replica, vLLM-style scheduling in both (prefills first, no chunking, batch
cap 64, 4,096 tokens per iteration, 7,277 KV blocks of 16 tokens), round-robin routing in both (Vidur's
least-outstanding router counts only queued requests), one adapter on our side (`system=merged`, the
LoRA-free case Vidur models; `--system dlora` runs dLoRA's own policy on it instead, the same requests,
recorded as vs_vidur_dlora). Workloads: an Azure conv window (real arrivals and lengths) and a
synthetic Poisson one (our generator), each sized and paced per replica count; requests are filtered
to prompt + output <= 4,096 tokens first, so Vidur's own clipping changes nothing. Each simulator runs
as its own process (wall time and peak RSS by /usr/bin/time), `--repeats` times, best wall reported.

Installs nothing here: Vidur runs from its own venv with its profiling data (`--vidur-cache`), e.g.

    python benchmarks/vs_vidur.py --vidur-python /path/vidur-venv/bin/python --vidur-cache /path/vidur-cache [--record]

Vidur's first run trains its predictors (minutes) into the cache: run once before timing (`--warm`).
Writes a temporary folder unless --record (benchmarks/results/vs_vidur.{csv,md}).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recording import RESULTS, finish, write_report  # noqa: E402

MAX_TOKENS = 4096
BATCH_CAP, KV_BLOCKS = 64, 7277
PER_REPLICA_RPS = 1.25   # moderate load for one A100 / Llama-2-7B replica on Azure conv lengths
PER_REPLICA_REQUESTS = 600
DATE = "2023-08-21"      # Vidur's trace replay keeps rows of one date


def _requests(kind: str, replicas: int) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt, output) for the case, filtered to prompt + output <= MAX_TOKENS."""
    from dlora_sim.core.config import build_workload, compose
    n, rate = PER_REPLICA_REQUESTS * replicas, PER_REPLICA_RPS * replicas
    if kind == "azure_conv":
        ov = ["workload=azure_conv", "workload.num_adapters=1", f"workload.max_requests={int(n * 1.05)}"]
    else:
        ov = ["workload=default", "workload.num_adapters=1", f"workload.num_requests={int(n * 1.05)}",
              f"workload.rate={rate}", "workload.prompt.kind=uniform", "workload.prompt.low=16",
              "workload.prompt.high=2048", "workload.output.kind=uniform", "workload.output.low=16",
              "workload.output.high=512"]
    wl = build_workload(compose(ov))
    rows = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in wl.requests
            if r.prompt_tokens + r.output_tokens <= MAX_TOKENS][:n]
    if kind == "azure_conv":   # pace the window to the target rate
        span = rows[-1][0] - rows[0][0]
        scale = (len(rows) / rate) / span
        rows = [((t - rows[0][0]) * scale, p, o) for t, p, o in rows]
    return rows


def _timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MiB) of a child process, via /usr/bin/time -v."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return wall, rss, proc.stdout + proc.stderr


def run_ours(rows, replicas: int, work: Path, system: str = "merged",
             profile: str = "a100_80gb") -> tuple[float, float, dict, float]:
    path = work / "ours.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["arrival_s", "adapter", "prompt_tokens", "output_tokens"])
        w.writerows([f"{t:.6f}", 0, p, o] for t, p, o in rows)
    out = work / "ours_out"
    wall, rss, _ = _timed([sys.executable, "-m", "dlora_sim.cli", f"system={system}", f"profile={profile}", "workload=csv",
                           f"workload.path={path}", "workload.num_adapters=1", "router=rr",
                           f"cluster.num_replicas={replicas}", f"cluster.replica.max_num_seqs={BATCH_CAP}",
                           f"cluster.replica.max_num_batched_tokens={MAX_TOKENS}",
                           f"cluster.replica.max_kv_blocks={KV_BLOCKS}", "cluster.replica.chunked_prefill=false",
                           "cluster.replica.prefill_priority=true", "charts=false", "progress=false", "resume=false",
                           "keep_iterations=false", f"hydra.run.dir={out}"], cwd=ROOT)
    s = json.loads((out / "summary.json").read_text())
    with (out / "requests.csv").open(newline="") as f:
        req = [r for r in csv.DictReader(f) if r["status"] == "finished"]
    m = _metrics([float(r["arrival_s"]) for r in req], [float(r["latency_s"]) for r in req],
                 [float(r["ttft_s"]) for r in req], [int(r["output_tokens"]) for r in req])
    return wall, rss, m, s["sim_wall_s"]


def vidur_cmd(python: str, cache: str, trace: Path, replicas: int, out: Path) -> list[str]:
    return [python, "-m", "vidur.main",
            "--replica_config_model_name", "meta-llama/Llama-2-7b-hf", "--replica_config_device", "a100",
            "--replica_config_network_device", "a100_dgx", "--replica_config_tensor_parallel_size", "1",
            "--replica_config_num_pipeline_stages", "1",
            "--random_forrest_execution_time_predictor_config_model_profiling_dataset", "local/vidur-llama-2-7b-a100",
            "--random_forrest_execution_time_predictor_config_network_profiling_dataset", "local/vidur-a100-dgx",
            "--random_forrest_execution_time_predictor_config_cache_dir", cache,
            "--random_forrest_execution_time_predictor_config_prediction_max_tokens_per_request", str(MAX_TOKENS),
            "--cluster_config_num_replicas", str(replicas), "--global_scheduler_config_type", "round_robin",
            "--replica_scheduler_config_type", "vllm", "--vllm_scheduler_config_batch_size_cap", str(BATCH_CAP),
            "--vllm_scheduler_config_max_tokens_in_batch", str(MAX_TOKENS),
            "--cache_config_num_blocks", str(KV_BLOCKS),
            "--request_generator_config_type", "trace_replay", "--trace_request_generator_config_trace_file", str(trace),
            "--trace_request_generator_config_date", DATE,
            "--trace_request_generator_config_time_scale_factor", "1",
            "--trace_request_generator_config_prefill_scale_factor", "1",
            "--trace_request_generator_config_decode_scale_factor", "1",
            "--trace_request_generator_config_max_tokens", str(MAX_TOKENS),
            "--metrics_config_output_dir", str(out), "--no-metrics_config_store_plots",
            "--no-metrics_config_enable_chrome_trace"]


def run_vidur(rows, replicas: int, work: Path, python: str, cache: str) -> tuple[float, float, dict]:
    trace = work / "vidur_trace.csv"
    with trace.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Time", "PromptTokenCount", "CompletionTokenCount", "Date"])
        w.writerows([f"{t:.6f}", p, o, DATE] for t, p, o in rows)
    out = work / "vidur_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    wall, rss, _ = _timed(vidur_cmd(python, cache, trace, replicas, out), env=env, cwd=work)
    metrics = sorted(out.glob("*/request_metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    with metrics.open(newline="") as f:
        req = list(csv.DictReader(f))
    arrivals = [rows[int(float(r["Request Id"]))][0] for r in req]   # ids number the trace's rows
    return wall, rss, _metrics(arrivals, [float(r["request_e2e_time"]) for r in req],
                               [float(r["prefill_e2e_time"]) for r in req],
                               [int(float(r["request_num_decode_tokens"])) for r in req])


def _metrics(arrival, e2e, ttft, out_tokens) -> dict:
    """The same definitions for both: E2E and TTFT from arrival; TPOT = (E2E - TTFT) / (tokens - 1)."""
    a, e, t, n = map(np.asarray, (arrival, e2e, ttft, out_tokens))
    tpot = (e - t)[n > 1] / (n[n > 1] - 1)
    span = float(np.max(a + e) - np.min(a))
    return {"requests": int(a.size), "mean_e2e_s": float(e.mean()), "p99_e2e_s": float(np.percentile(e, 99)),
            "mean_ttft_s": float(t.mean()), "p99_ttft_s": float(np.percentile(t, 99)),
            "mean_tpot_s": float(tpot.mean()), "throughput_rps": a.size / span}


KEYS = ["mean_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s", "mean_tpot_s", "throughput_rps"]


def report(rows: list[dict], system: str = "merged", profile: str = "a100_80gb") -> str:
    flags = ("" if system == "merged" else f" --system {system}") + ("" if profile == "a100_80gb" else f" --profile {profile}")
    lines = [f"# Side by side with Vidur (A100 / Llama-2-7B, vLLM scheduling, round-robin; ours: system={system}, "
             f"profile={profile})", "",
             f"Measured {time.strftime('%Y-%m-%d')} on this machine by `python benchmarks/vs_vidur.py --record{flags}` "
             "(vidur 0.0.26 from its own venv, its own profiling data). Wall and peak RSS are whole "
             "processes (start-up included; ours also reports the simulation alone); best of the repeats. "
             "Metric columns: ours / Vidur - 1 on the same requests.", "",
             "| workload | replicas | requests | ours wall s (sim) | Vidur wall s | wall ratio | ours MiB | Vidur MiB | "
             + " | ".join(KEYS) + " |", "|---|---|---|---|---|---|---|---|" + "---|" * len(KEYS)]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['replicas']} | {r['requests']} | {r['ours_wall_s']:.2f} "
                     f"({r['ours_sim_wall_s']:.2f}) | {r['vidur_wall_s']:.2f} | "
                     f"{r['ours_wall_s'] / r['vidur_wall_s']:.3f} | {r['ours_rss_mib']:.0f} | "
                     f"{r['vidur_rss_mib']:.0f} | " + " | ".join(f"{r['rel_' + k]:+.1%}" for k in KEYS) + " |")
    lines += ["", "Absolute values:", "", "| workload | replicas | side | " + " | ".join(KEYS) + " |",
              "|---|---|---|" + "---|" * len(KEYS)]
    for r in rows:
        for side in ("ours", "vidur"):
            lines.append(f"| {r['workload']} | {r['replicas']} | {side} | " +
                         " | ".join(f"{r[f'{side}_{k}']:.4g}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vidur-python", required=True, help="python of a venv with vidur==0.0.26")
    ap.add_argument("--vidur-cache", required=True, help="a writable copy of Vidur's profiling cache")
    ap.add_argument("--replicas", default="1,4,8")
    ap.add_argument("--workloads", default="azure_conv,poisson")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--system", default="merged", help="our policy on the one adapter (merged | dlora | slora ...)")
    ap.add_argument("--profile", default="a100_80gb",
                    help="our cost model (conf/profile): a100_80gb (analytic, the paper's software) | a100_80gb_vidur "
                         "(fitted to Vidur's own operator measurements)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vs_vidur_"))
    out_rows = []
    for kind in args.workloads.split(","):
        for n in map(int, args.replicas.split(",")):
            reqs = _requests(kind, n)
            case = work / f"{kind}_{n}"
            case.mkdir()
            ours = [run_ours(reqs, n, case, args.system, args.profile) for _ in range(args.repeats)]
            vid = [run_vidur(reqs, n, case, args.vidur_python, args.vidur_cache) for _ in range(args.repeats)]
            o, v = min(ours, key=lambda x: x[0]), min(vid, key=lambda x: x[0])
            row = {"workload": kind, "replicas": n, "requests": len(reqs), "ours_wall_s": o[0],
                   "ours_sim_wall_s": o[3], "vidur_wall_s": v[0], "ours_rss_mib": o[1], "vidur_rss_mib": v[1],
                   **{f"ours_{k}": o[2][k] for k in KEYS}, **{f"vidur_{k}": v[2][k] for k in KEYS},
                   **{f"rel_{k}": o[2][k] / v[2][k] - 1 for k in KEYS}}
            out_rows.append(row)
            print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
    dest = RESULTS if args.record else work
    name = ("vs_vidur" + ("" if args.system == "merged" else f"_{args.system}")
            + ("" if args.profile == "a100_80gb" else f"_{args.profile}"))
    text = report(out_rows, args.system, args.profile)
    write_report(dest, name, [{k: (f"{x:.6g}" if isinstance(x, float) else x) for k, x in r.items()}
                              for r in out_rows], text)
    print(text)
    print(finish(dest, [f"{name}.csv", f"{name}.md"], args.record))
    print(f"runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
