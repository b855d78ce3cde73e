"""Side by side with BLIS (inference-sim/inference-sim): the same requests through both simulators, with and without LoRA.

BLIS is the discrete-event LLM serving simulator in Go (IBM / llm-d) that added LoRA in 2026: an adapter registry, a
per-instance resident set with LRU eviction, a cold-load gate and a per-step rank overhead. Both simulators get the
same requests (Poisson, 4 req/s per replica, prompt and output lengths uniform in [8, 512)), Llama-2-7B on one A100
per replica, round-robin over 4 and 16 replicas, vLLM-V1-style scheduling (chunked prefill, 64 sequences and 2,048
tokens per step, 6,500 KV blocks of 16 tokens). LoRA cases: 32 rank-16 adapters with Zipf(1) popularity at 4, 8 and
32 GPU adapter slots, the load cost matched (BLIS gets our profile's bytes per rank, host-to-GPU bandwidth and fixed
cost per load); ours runs `system=vllm_lora` (unmerged batching, LRU slots), the no-LoRA case `system=merged` with
one adapter (no LoRA term at all). Every case runs under each of BLIS's latency models (`trained-physics`, its
default, and `roofline`) and both of our A100 profiles (`a100_80gb`, analytic: the paper's software;
`a100_80gb_vidur`, fitted to Vidur's measured operators). Each simulator runs as its own process (wall time and
peak RSS by /usr/bin/time), `--repeats` times; the best wall is reported, metrics are deterministic.

How the models differ, which the LoRA rows show: BLIS multiplies a whole step by 1 + 0.035 per distinct rank-16
adapter in the batch; ours adds LoRA terms (a launch cost, per distinct adapter-rank and per token-rank) to the step.
A request whose adapter is not resident blocks BLIS's queue head until its load finishes; ours starts the load and
schedules the requests behind it whose adapters are resident. BLIS's trained-physics model also charges every
request 15.6 ms before it queues and 0.78 ms after its last token, and each step 1.15 ms plus 4.4 us per request;
roofline charges no fixed cost.

Installs nothing here: BLIS is built offline from its source (../shared/blis/README.md), e.g.

    python benchmarks/vs_blis.py --blis /path/to/inference-sim/blis [--record]

Writes a temporary folder unless --record (benchmarks/results/vs_blis.{csv,md}).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recording import RESULTS, finish, write_report  # noqa: E402
from benchmarks.vs_vidur import _metrics, _timed  # noqa: E402

PER_REPLICA_RPS = 4.0
PER_REPLICA_REQUESTS = 1500
MAX_SEQS, MAX_TOKENS, KV_BLOCKS = 64, 2048, 6500
ADAPTERS, RANK = 32, 16
SLOTS = (4, 8, 32)
PROFILES = ("a100_80gb", "a100_80gb_vidur")
LATENCY_MODELS = ("trained-physics", "roofline")
KEYS = ["mean_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s", "mean_tpot_s", "throughput_rps"]


@dataclass(frozen=True)
class Case:
    replicas: int
    slots: int | None   # None: no LoRA

    @property
    def label(self) -> str:
        return "no LoRA" if self.slots is None else f"{ADAPTERS} adapters, {self.slots} slots"


def requests(case: Case, per_replica: int = PER_REPLICA_REQUESTS, seed: int = 0) -> list[tuple[float, int, int, int]]:
    """(arrival_s, adapter, prompt, output) from our generator: the one request list both simulators replay."""
    from dlora_sim.core.config import build_workload, compose
    n = per_replica * case.replicas
    ov = ["workload=default", f"workload.num_requests={n}", f"workload.rate={PER_REPLICA_RPS * case.replicas}",
          f"workload.num_adapters={1 if case.slots is None else ADAPTERS}", f"workload.rank={RANK}", f"seed={seed}"]
    wl = build_workload(compose(ov))
    return [(r.arrival_s, r.adapter, r.prompt_tokens, r.output_tokens) for r in wl.requests]


def run_ours(rows, case: Case, profile: str, work: Path) -> tuple[float, float, dict]:
    path = work / "ours.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["arrival_s", "adapter", "prompt_tokens", "output_tokens"])
        w.writerows([f"{t:.6f}", a, p, o] for t, a, p, o in rows)
    out = work / f"ours_{profile}"
    system = ["system=merged"] if case.slots is None else ["system=vllm_lora", f"cluster.replica.gpu_adapter_slots={case.slots}"]
    wall, rss, _ = _timed([sys.executable, "-m", "dlora_sim.cli", *system, f"profile={profile}", "workload=csv",
                           f"workload.path={path}", f"workload.num_adapters={1 if case.slots is None else ADAPTERS}",
                           f"workload.rank={RANK}", "router=rr", f"cluster.num_replicas={case.replicas}",
                           f"cluster.replica.max_num_seqs={MAX_SEQS}", f"cluster.replica.max_num_batched_tokens={MAX_TOKENS}",
                           f"cluster.replica.max_kv_blocks={KV_BLOCKS}", "cluster.replica.chunked_prefill=true",
                           "charts=false", "progress=false", "resume=false", "keep_iterations=false",
                           f"hydra.run.dir={out}"], cwd=ROOT)
    s = json.loads((out / "summary.json").read_text())
    with (out / "requests.csv").open(newline="") as f:
        req = [r for r in csv.DictReader(f) if r["status"] == "finished"]
    m = _metrics([float(r["arrival_s"]) for r in req], [float(r["latency_s"]) for r in req],
                 [float(r["ttft_s"]) for r in req], [int(r["output_tokens"]) for r in req])
    return wall, rss, {**m, "adapter_loads": s["num_adapter_loads"], "unfinished": len(rows) - len(req)}


# TraceV2: BLIS reads its data CSV by position, all 27 base columns, then `adapter` by name (its sim/workload/tracev2.go)
TRACE_COLUMNS = ["request_id", "client_id", "tenant_id", "slo_class", "session_id", "round_index", "prefix_group",
                 "prefix_length", "streaming", "input_tokens", "output_tokens", "text_tokens", "image_tokens",
                 "audio_tokens", "video_tokens", "reason_ratio", "model", "deadline_us", "server_input_tokens",
                 "arrival_time_us", "send_time_us", "first_chunk_time_us", "last_chunk_time_us", "num_chunks", "status",
                 "error_message", "finish_reason", "adapter"]


def write_blis_inputs(rows, case: Case, work: Path) -> tuple[Path, Path, Path | None]:
    """Trace header, trace data and (with LoRA) the adapter registry with our load cost (both our A100 profiles
    keep the analytic profile's adapter bytes and host-to-GPU bandwidth)."""
    from dlora_sim.core.profile import load_profile
    header = work / "trace.yaml"
    header.write_text(yaml.safe_dump({"trace_version": 3, "time_unit": "microseconds", "mode": "generated",
                                      "warm_up_requests": 0}))
    data = work / "trace.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TRACE_COLUMNS)
        for i, (t, a, p, o) in enumerate(rows):
            w.writerow([i, "", "", "", "", 0, "", 0, "false", p, o, 0, 0, 0, 0, 0, "", 0, 0, round(t * 1e6), 0, 0, 0, 0,
                        "ok", "", "", "" if case.slots is None else f"a{a}"])
    if case.slots is None:
        return header, data, None
    prof = load_profile("a100-80gb-llama-2-7b")
    lora = work / "lora.yaml"
    lora.write_text(yaml.safe_dump({"lora": {
        "adapter_capacity": case.slots, "footprint_bytes_per_rank": float(prof.model.adapter_bytes_per_rank),
        "load_bandwidth_bytes_us": prof.transfers.host_to_gpu_bytes_per_s / 1e6,
        "load_base_latency_us": prof.transfers.load_overhead_s * 1e6,
        "adapters": [{"id": f"a{i}", "rank": RANK} for i in range(ADAPTERS)]}}))
    return header, data, lora


def run_blis(files, case: Case, model: str, blis: Path, work: Path, span_s: float) -> tuple[float, float, dict]:
    header, data, lora = files
    metrics = work / f"blis_{model}.json"
    cmd = [str(blis), "replay", "--trace-header", str(header), "--trace-data", str(data),
           "--model", "meta-llama/llama-2-7b-hf", "--hardware", "A100-80", "--tp", "1", "--latency-model", model,
           "--num-instances", str(case.replicas), "--routing-policy", "round-robin", "--cache-signal-delay", "0",
           "--max-num-seqs", str(MAX_SEQS), "--max-num-batched-tokens", str(MAX_TOKENS),
           "--total-kv-blocks", str(KV_BLOCKS), "--block-size-in-tokens", "16",
           "--horizon", str(int(span_s * 10 * 1e6)), "--metrics-path", str(metrics)]
    if lora is not None:
        cmd += ["--lora-config", str(lora)]
    wall, rss, _ = _timed(cmd, cwd=blis.parent)   # BLIS reads model_configs/ and hardware_config.json from its source
    out = json.loads(metrics.read_text())
    req = out["requests"]
    m = _metrics([r["arrived_at"] for r in req], [r["e2e_ms"] / 1e3 for r in req], [r["ttft_ms"] / 1e3 for r in req],
                 [int(r["num_decode_tokens"]) for r in req])
    loads = sum(a.get("load_count", 0) for a in (out.get("adapters") or {}).values())
    return wall, rss, {**m, "adapter_loads": loads, "unfinished": out["still_queued"] + out["still_running"]}


def blis_commit(blis: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(blis.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def report(rows: list[dict], commit: str, flags: str) -> str:
    lines = ["# Side by side with BLIS (A100 / Llama-2-7B, vLLM-V1-style chunked prefill, round-robin)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on this machine by `python benchmarks/vs_blis.py --record{flags}` "
             f"against BLIS (inference-sim/inference-sim) commit `{commit}`, built offline as ../shared/blis/README.md "
             "says and run with `--cache-signal-delay 0`. The requests: Poisson, "
             f"{PER_REPLICA_RPS:g} req/s and {rows[0]['requests'] // rows[0]['replicas']} requests per replica, lengths uniform [8, 512); "
             f"LoRA: {ADAPTERS} rank-{RANK} adapters, Zipf(1), the load cost matched to our profile. Wall and peak RSS "
             "are whole processes, best of the repeats. Metric columns: ours / BLIS - 1 on the same requests; "
             "loads: adapter loads, ours / BLIS. How the two models differ: benchmarks/vs_blis.py's docstring.", "",
             "| replicas | case | our profile | BLIS model | ours wall s | BLIS wall s | wall ratio | ours MiB | BLIS MiB | "
             + " | ".join(KEYS) + " | loads |", "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(KEYS) + 1)]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['case']} | {r['profile']} | {r['blis_model']} | {r['ours_wall_s']:.2f} | "
                     f"{r['blis_wall_s']:.2f} | {r['ours_wall_s'] / r['blis_wall_s']:.2f} | {r['ours_rss_mib']:.0f} | "
                     f"{r['blis_rss_mib']:.0f} | " + " | ".join(f"{r['rel_' + k]:+.1%}" for k in KEYS)
                     + f" | {r['ours_adapter_loads']} / {r['blis_adapter_loads']} |")
    lines += ["", "Absolute values (each side once per case and model or profile):", "",
              "| replicas | case | side | " + " | ".join(KEYS) + " | adapter loads | unfinished |",
              "|---|---|---|" + "---|" * (len(KEYS) + 2)]
    seen = set()
    for r in rows:
        for side, name in (("ours", r["profile"]), ("blis", r["blis_model"])):
            key = (r["replicas"], r["case"], side, name)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"| {r['replicas']} | {r['case']} | {'ours ' if side == 'ours' else 'BLIS '}{name} | "
                         + " | ".join(f"{r[f'{side}_{k}']:.4g}" for k in KEYS)
                         + f" | {r[f'{side}_adapter_loads']} | {r[f'{side}_unfinished']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blis", type=Path, required=True,
                    help="the BLIS binary, built in its source folder (which holds model_configs/ and hardware_config.json)")
    ap.add_argument("--replicas", default="4,16")
    ap.add_argument("--slots", default=",".join(map(str, SLOTS)), help="GPU adapter slots of the LoRA cases; "
                    "'none' drops them")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests-per-replica", type=int, default=PER_REPLICA_REQUESTS)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    blis = args.blis.resolve()
    if not blis.is_file() or not (blis.parent / "model_configs").is_dir():
        raise SystemExit(f"{args.blis}: not a BLIS binary in its source folder (no model_configs/ beside it); "
                         "../shared/blis/README.md says how to build it")
    slots = [] if args.slots == "none" else [int(s) for s in args.slots.split(",")]
    work = Path(tempfile.mkdtemp(prefix="vs_blis_"))
    out_rows = []
    for n in map(int, args.replicas.split(",")):
        for case in [Case(n, None)] + [Case(n, s) for s in slots]:
            rows = requests(case, args.requests_per_replica)
            span = rows[-1][0]
            case_dir = work / f"{n}_{case.slots or 'none'}"
            case_dir.mkdir()
            ours = {p: min((run_ours(rows, case, p, case_dir) for _ in range(args.repeats)), key=lambda x: x[0])
                    for p in PROFILES}
            blis_runs = {}
            for model in LATENCY_MODELS:
                files = write_blis_inputs(rows, case, case_dir)
                blis_runs[model] = min((run_blis(files, case, model, blis, case_dir, span) for _ in range(args.repeats)),
                                       key=lambda x: x[0])
            for p, (ow, orss, om) in ours.items():
                for model, (bw, brss, bm) in blis_runs.items():
                    row = {"replicas": n, "case": case.label, "requests": len(rows), "profile": p, "blis_model": model,
                           "ours_wall_s": ow, "blis_wall_s": bw, "ours_rss_mib": orss, "blis_rss_mib": brss,
                           **{f"ours_{k}": v for k, v in om.items()}, **{f"blis_{k}": v for k, v in bm.items()},
                           **{f"rel_{k}": om[k] / bm[k] - 1 for k in KEYS}}
                    out_rows.append(row)
                    print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
    flags = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("replicas", "slots", "repeats", "requests_per_replica")
                    if getattr(args, k) != ap.get_default(k))
    text = report(out_rows, blis_commit(blis), flags)
    dest = RESULTS if args.record else work
    write_report(dest, "vs_blis", [{k: (f"{x:.6g}" if isinstance(x, float) else x) for k, x in r.items()}
                                   for r in out_rows], text)
    print(text)
    print(finish(dest, ["vs_blis.csv", "vs_blis.md"], args.record))
    print(f"runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
