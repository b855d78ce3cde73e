"""Serving replays that calibrate and validate: workloads, loads and the runtime's served iterations.

Served steps and microbenchmarked ones of the same features do not cost quite the same on the CPU: a
closed form fitted to the microbenchmarks alone priced a held-out replay's served iterations low, less
so once it had a per-adapter LoRA term (docs/calibration.md). So `dlora-calibrate --replays` also serves calibration replays on the measured clock and fits
the closed form to their iterations too (each iteration's features as `CostModel.price` charged
them, and its measured, drift-scaled time). Those replays use other requests than
`benchmarks/fidelity.py` validates on: other seeds for the synthetic workload, another window of the
Azure trace; one more replay is held out of the fit.

The load of a case is set from the runtime's capacity as the simulator sees it with the runtime's
profile (an overloaded simulated run's completed requests per second), so both halves get the same
arrivals.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dlora_sim.core.config import compose
from calibration.microbench import COLUMNS

AZURE = ["workload=azure_conv", "workload.num_adapters=8", "workload.rank=8",
         "cluster.replica.chunked_prefill=false"]   # the runtime prefills whole prompts
WORKLOADS = {"synthetic": ["workload=tiny"], "azure_conv": AZURE}


def sim_capacity(overrides: list[str]) -> float:
    """Completed requests per second of an overloaded simulated run (the same requests at 50x the rate)."""
    from dlora_sim.des.engine import build_simulation
    from dlora_sim.core.results import summarize
    cfg = compose([*overrides, "charts=false"], "serve")
    if cfg.workload.get("rate") is not None:
        cfg.workload.rate = float(cfg.workload.rate) * 50
    else:
        cfg.workload.time_scale = float(cfg.workload.time_scale) / 50
    return summarize(build_simulation(cfg).run(), float(cfg.slo_s_per_token))["throughput_rps"]


def trace_rate(overrides: list[str]) -> float:
    from dlora_sim.core.config import build_workload
    wl = build_workload(compose(overrides, "serve"))
    return len(wl.requests) / wl.duration_s


def case_overrides(workload: str, system: str, load: float, requests: int,
                   extra: list[str]) -> tuple[list[str], float]:
    """A case's overrides and its offered rate: `load` x the simulated capacity."""
    base = [f"system={system}", *WORKLOADS[workload], *extra]
    base += [f"workload.num_requests={requests}"] if workload == "synthetic" else [f"workload.max_requests={requests}"]
    rate = load * sim_capacity(base)
    if workload == "synthetic":
        return [*base, f"workload.rate={rate:.4g}"], rate
    return [*base, f"workload.time_scale={trace_rate(base) / rate:.4g}"], rate


def serve(overrides: list[str], out: Path, clock: str = "real") -> dict:
    """Serve a case on the runtime into `out` (a results folder); its summary."""
    from dlora_gpu.cli import serve_job
    cfg = compose([*overrides, f"runtime.clock={clock}"], "serve")
    system = next((o.split("=", 1)[1] for o in overrides if o.startswith("system=")), "default")
    return serve_job(cfg, out, system, overrides)


def served_points(iterations_csv: Path, *, limit: int = 0, split: str = "fit") -> list[dict]:
    """A measured-clock replay's iterations as fit points (kind `served`): the features the step was
    priced with and its measured, drift-scaled time, with its mode-change, load and swap phases (the
    fit subtracts them, as for the microbenchmarks). `limit` > 0 keeps that many: every iteration with a
    prefill, then evenly spaced decode-only ones (`sample`)."""
    with iterations_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "predicted_s" not in rows[0]:
        raise ValueError(f"{iterations_csv}: not a runtime replay's iterations (no predicted_s column)")
    rows = sample(rows, limit)
    out = []
    for r in rows:
        batch, decodes = int(r["batch_size"]), int(r["decode_seqs"])
        out.append({**{c: "" for c in COLUMNS}, "kind": "served", "split": split, "mode": r["mode"], "batch": batch,
                    "prefills": batch - decodes, "prefill_tokens": r["prefill_tokens"], "prefill_sq": r["prefill_sq"],
                    "decodes": decodes, "decode_context": r["decode_context"], "distinct": r["distinct_adapters"],
                    "passes": r.get("lora_passes", ""),
                    "rank_sum": r["rank_sum"], "token_rank": r["token_rank"],
                    "resident_rank_sum": r["resident_rank_sum"], "wall_s": r["duration_s"],
                    "device_s": r["duration_s"], "forward_s": r["compute_s"], "mode_s": r["switch_s"],
                    "load_s": r["load_s"], "swap_s": r["swap_s"], "repeats": 1, "drift": ""})
    return out


def _spaced(rows: list, k: int) -> list:
    return rows if len(rows) <= k else [rows[i * len(rows) // k] for i in range(k)]


def sample(rows: list[dict], limit: int) -> list[dict]:
    """At most `limit` (> 0; 0 = all) of a replay's iterations, in their order: every one with a prefill
    (evenly spaced if they alone are more), the rest evenly spaced decode-only ones. Prefills are a small
    share of an Azure replay's iterations but set its TTFT: sampled evenly, too few of them reached the
    fit, and it priced the fidelity cases' long Azure prefills high (docs/calibration.md)."""
    if not limit or len(rows) <= limit:
        return rows
    pre = [i for i, r in enumerate(rows) if int(r["prefill_tokens"]) > 0]
    keep = set(_spaced(pre, limit))
    keep |= set(_spaced([i for i in range(len(rows)) if i not in keep and int(rows[i]["prefill_tokens"]) == 0],
                        limit - len(keep)))
    return [rows[i] for i in sorted(keep)]


@dataclass(frozen=True)
class Replay:
    """A calibration replay: its iterations are fit points (split `fit`) or held out (`heldout`)."""

    workload: str
    system: str
    load: float                  # x the simulated capacity
    requests: tuple[str, ...]    # overrides that pick other requests than the fidelity cases validate on
    split: str = "fit"


SYNTHETIC, AZURE_LATER = ("seed=101",), ("workload.start_s=1800",)   # another seed; a window 30 min in
# both policies (dLoRA's runs merged and unmerged) on both workloads' shapes, and one held-out replay
CALIBRATION_REPLAYS = (Replay("synthetic", "slora", 0.7, SYNTHETIC), Replay("synthetic", "dlora", 0.7, SYNTHETIC),
                       Replay("azure_conv", "slora", 0.7, AZURE_LATER), Replay("azure_conv", "dlora", 0.7, AZURE_LATER),
                       Replay("synthetic", "dlora", 0.9, ("seed=102",), "heldout"))


def calibration_replays(profile: Path, out: Path, overrides: list[str], *, quick: bool = False,
                        requests: int = 120, per_replay: int = 400) -> tuple[list[dict], list[dict]]:
    """Serve every calibration case on the measured clock, timed against `profile` (the microbenchmarks'
    fit: its reference probe scales the steps); (served points, what was served). `quick`: one short
    synthetic replay (smoke tests)."""
    replays = CALIBRATION_REPLAYS[:1] if quick else CALIBRATION_REPLAYS
    points, about = [], []
    for i, rp in enumerate(replays):
        extra = [*overrides, f"profile.path={profile}", *rp.requests]
        ov, rate = case_overrides(rp.workload, rp.system, rp.load, 12 if quick else requests, extra)
        folder = out / f"{i}_{rp.workload}_{rp.system}_{rp.split}"
        summary = serve([*ov, "charts=false"], folder, clock="measured")
        served = served_points(folder / "iterations.csv", limit=per_replay, split=rp.split)
        points += served
        about.append({"workload": rp.workload, "system": rp.system, "load": rp.load, "split": rp.split,
                      "rate_rps": round(rate, 4), "overrides": ov, "iterations": summary["num_iterations"],
                      "points": len(served), "clock_scaling": summary.get("clock_scaling")})
    return points, about
