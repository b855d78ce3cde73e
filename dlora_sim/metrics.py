"""Per-iteration records, per-request rows and the run summary; the results folder's writer.

Results are written atomically: each file goes to a temporary name and is renamed, and
summary.json comes last, so a folder with a summary.json is complete and one without it is not.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dlora_sim.policies.base import Decision
from dlora_sim.request import NS, Request, State

ITERATION_COLUMNS = ["replica", "start_s", "duration_s", "compute_s", "switch_s", "load_s", "swap_s", "mode",
                     "merged_adapter", "batch_size", "prefill_tokens", "decode_seqs", "distinct_adapters", "forced"]
REQUEST_COLUMNS = ["id", "adapter", "replica", "status", "arrival_s", "dispatch_s", "first_scheduled_s",
                   "first_token_s", "finish_s", "prompt_tokens", "output_tokens", "latency_s", "ttft_s",
                   "exec_s", "queueing_delay_s", "s_per_token", "migrated", "preempted", "reject_reason"]


@dataclass
class Recorder:
    """Collects what the engine does; cheap to call from the hot path."""

    keep_iterations: bool = True
    rows: list[tuple] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    num_iterations: int = 0
    busy_ns: int = 0           # sum of iteration durations over all replicas
    switch_s: float = 0.0      # ... of which merge / unmerge / switch time
    info_keys: set[str] = field(default_factory=set)

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.counters[key] += n

    def iteration(self, replica: int, start: int, dur: int, compute: float, overhead: tuple[float, float, float],
                  d: Decision, batch: int, prefill_tokens: int, decode_seqs: int, distinct: int,
                  extra: Mapping[str, float] | None = None) -> None:
        """One iteration; `extra` adds executor columns (the runtime's wall-clock phases) to d.info's."""
        self.num_iterations += 1
        self.busy_ns += dur
        self.switch_s += overhead[0]
        if not self.keep_iterations:
            return
        info = d.info if not extra else {**(d.info or {}), **extra}
        if info:
            self.info_keys.update(info)
        self.rows.append((replica, start, dur, compute, overhead, d.merged, batch, prefill_tokens, decode_seqs,
                          distinct, d.forced, info))


@dataclass
class SimResult:
    requests: list[Request]
    recorder: Recorder
    sim_end_s: float
    wall_s: float
    num_replicas: int
    extra: dict = field(default_factory=dict)


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def _t(ns: int) -> str:
    return "" if ns < 0 else f"{ns / NS:.6f}"


def request_rows(requests: Sequence[Request]) -> Iterable[list]:
    for r in sorted(requests, key=lambda r: r.id):
        finished = r.state == State.FINISHED
        lat = (r.finish - r.arrival) / NS if finished else math.nan
        yield [r.id, r.adapter, r.replica, "finished" if finished else ("rejected" if r.state == State.REJECTED
                                                                         else "unfinished"),
               _t(r.arrival), _t(r.dispatch), _t(r.first_scheduled), _t(r.first_token), _t(r.finish),
               r.prompt_tokens, r.output_tokens,
               _fmt(lat) if finished else "", _fmt((r.first_token - r.arrival) / NS) if finished else "",
               _fmt(r.exec_ns / NS), _fmt(lat - r.exec_ns / NS) if finished else "",
               _fmt(lat / r.output_tokens) if finished else "", r.migrations, r.preemptions, r.reject_reason]


def iteration_rows(rec: Recorder) -> tuple[list[str], Iterable[list]]:
    keys = sorted(rec.info_keys)
    cols = ITERATION_COLUMNS + keys

    def rows():
        # by (start, replica): fast-forwarded iterations are recorded late, all at once
        for (rep, start, dur, compute, (sw, ld, sp), merged, batch, ptok, decode, distinct, forced, info) in sorted(
                rec.rows, key=lambda row: (row[1], row[0])):
            yield [rep, _t(start), _fmt(dur / NS), _fmt(compute), _fmt(sw), _fmt(ld), _fmt(sp),
                   "unmerged" if merged is None else "merged", "" if merged is None else merged, batch, ptok,
                   decode, distinct, int(bool(forced)),
                   *[("" if not info or k not in info else info[k]) for k in keys]]
    return cols, rows()


def summarize(res: SimResult, slo_s_per_token: float) -> dict[str, Any]:
    reqs = res.requests
    done = [r for r in reqs if r.state == State.FINISHED]
    rejected = [r for r in reqs if r.state == State.REJECTED]
    lat = np.array([(r.finish - r.arrival) / NS for r in done])
    ttft = np.array([(r.first_token - r.arrival) / NS for r in done])
    spt = np.array([(r.finish - r.arrival) / NS / r.output_tokens for r in done])
    tpot = np.array([(r.finish - r.first_token) / NS / (r.output_tokens - 1) for r in done if r.output_tokens > 1])
    qd = np.array([(r.finish - r.arrival - r.exec_ns) / NS for r in done])
    first = min((r.arrival for r in reqs), default=0) / NS
    last = max((r.finish for r in done), default=0) / NS
    span = max(last - first, 1e-12)
    c = res.recorder.counters

    def stat(a: np.ndarray, f) -> float | None:
        return None if a.size == 0 else round(float(f(a)), 6)

    return {
        "num_requests": len(reqs), "completed": len(done), "rejected": len(rejected),
        "reject_reasons": dict(Counter(r.reject_reason for r in rejected)),
        "throughput_rps": round(len(done) / span, 6) if done else 0.0,
        "output_tokens_per_s": round(sum(r.output_tokens for r in done) / span, 3) if done else 0.0,
        "mean_latency_s": stat(lat, np.mean), "p50_latency_s": stat(lat, lambda a: np.percentile(a, 50)),
        "p90_latency_s": stat(lat, lambda a: np.percentile(a, 90)),
        "p99_latency_s": stat(lat, lambda a: np.percentile(a, 99)),
        "mean_ttft_s": stat(ttft, np.mean), "p99_ttft_s": stat(ttft, lambda a: np.percentile(a, 99)),
        "mean_tpot_s": stat(tpot, np.mean),
        "mean_s_per_token": stat(spt, np.mean), "p90_s_per_token": stat(spt, lambda a: np.percentile(a, 90)),
        "mean_queueing_delay_s": stat(qd, np.mean), "p90_queueing_delay_s": stat(qd, lambda a: np.percentile(a, 90)),
        "slo_s_per_token": slo_s_per_token,
        # of all requests: a rejected or unfinished request misses the SLO
        "slo_attainment": round(float(np.sum(spt <= slo_s_per_token)) / len(reqs), 6) if reqs else 0.0,
        "rejected_share": round(len(rejected) / len(reqs), 6) if reqs else 0.0,
        "num_switches": c["switches"], "num_adapter_loads": c["adapter_loads"], "num_preemptions": c["preemptions"],
        "num_swap_outs": c["swap_outs"], "num_swap_ins": c["swap_ins"], "num_migrations": c["migrations"],
        "num_iterations": res.recorder.num_iterations, "num_replicas": res.num_replicas,
        "busy_s": round(res.recorder.busy_ns / NS, 6), "switch_s": round(res.recorder.switch_s, 6),
        "switching_share": round(res.recorder.switch_s * NS / res.recorder.busy_ns, 6) if res.recorder.busy_ns else 0.0,
        "sim_time_s": round(res.sim_end_s, 6), "sim_wall_s": round(res.wall_s, 3),
        **res.extra,
    }


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they become null (recursively)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def json_text(obj: Any) -> str:
    """Strict JSON (no bare NaN), as every results file is written."""
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv_text(cols: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(rows)
    return buf.getvalue()


RESULT_FILES = ("requests.csv", "iterations.csv", "summary.json")


def write_results(out: Path, res: SimResult, summary: Mapping[str, Any]) -> None:
    """requests.csv, iterations.csv, then summary.json (the completeness marker)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    _atomic_write(out / "requests.csv", _csv_text(REQUEST_COLUMNS, request_rows(res.requests)))
    cols, rows = iteration_rows(res.recorder)
    _atomic_write(out / "iterations.csv", _csv_text(cols, rows))
    _atomic_write(out / "summary.json", json_text(summary))
