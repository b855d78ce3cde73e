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
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from dlora_sim.core.contracts import Decision
from dlora_sim.core.request import NS, Request, State

ITERATION_COLUMNS = ["replica", "start_s", "duration_s", "compute_s", "switch_s", "load_s", "swap_s", "mode",
                     "merged_adapter", "batch_size", "prefill_tokens", "decode_seqs", "distinct_adapters", "forced"]
REQUEST_COLUMNS = ["id", "adapter", "replica", "status", "arrival_s", "dispatch_s", "first_scheduled_s",
                   "first_token_s", "finish_s", "prompt_tokens", "output_tokens", "latency_s", "ttft_s",
                   "exec_s", "queueing_delay_s", "s_per_token", "migrated", "preempted", "reject_reason"]


class IterationRecord(NamedTuple):
    """One iteration of one replica, as iterations.csv writes it (times in ns, prices in s)."""

    replica: int
    start: int                 # ns
    duration: int              # ns
    compute: float             # s: the forward pass (priced, or measured by the runtime)
    switch: float              # s: merge / unmerge / switch before it
    load: float                # s: adapter loads before it
    swap: float                # s: KV swaps before it
    merged: int | None         # the adapter merged into the weights, None = unmerged
    batch_size: int
    prefill_tokens: int
    decode_seqs: int
    distinct_adapters: int
    forced: bool
    info: Mapping[str, float] | None   # the policy's and the executor's extra columns


@dataclass
class Recorder:
    """Collects what the engine does; cheap to call from the hot path."""

    keep_iterations: bool = True
    rows: list[IterationRecord] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    num_iterations: int = 0
    merged_iterations: int = 0   # ... of which ran merged
    busy_ns: int = 0           # sum of iteration durations over all replicas
    switch_s: float = 0.0      # ... of which merge / unmerge / switch time
    info_keys: set[str] = field(default_factory=set)

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.counters[key] += n

    def iteration(self, replica: int, start: int, dur: int, compute: float, overhead: tuple[float, float, float],
                  d: Decision, *, batch_size: int, prefill_tokens: int, decode_seqs: int, distinct: int,
                  extra: Mapping[str, float] | None = None) -> None:
        """One iteration of `d` on `replica`, from `start` for `dur` ns; `overhead` is (switch, load, swap)
        seconds; `extra` adds executor columns (the runtime's wall-clock phases) to d.info's."""
        self.num_iterations += 1
        self.busy_ns += dur
        self.switch_s += overhead[0]
        if d.merged is not None:
            self.merged_iterations += 1
        if not self.keep_iterations:
            return
        info = d.info if not extra else {**(d.info or {}), **extra}
        if info:
            self.info_keys.update(info)
        self.rows.append(IterationRecord(replica, start, dur, compute, *overhead, d.merged, batch_size, prefill_tokens,
                                         decode_seqs, distinct, d.forced, info))


@dataclass
class RequestStats:
    """What the summary needs of every request, added in id order (from a list, or streamed)."""

    num: int = 0
    lat: array = field(default_factory=lambda: array("d"))
    ttft: array = field(default_factory=lambda: array("d"))
    spt: array = field(default_factory=lambda: array("d"))
    tpot: array = field(default_factory=lambda: array("d"))
    qd: array = field(default_factory=lambda: array("d"))
    reject_reasons: Counter = field(default_factory=Counter)
    output_tokens: int = 0
    first_arrival: int | None = None
    last_finish: int = 0

    def add(self, r: Request) -> None:
        self.num += 1
        if self.first_arrival is None or r.arrival < self.first_arrival:
            self.first_arrival = r.arrival
        if r.state == State.REJECTED:
            self.reject_reasons[r.reject_reason] += 1
        if r.state != State.FINISHED:
            return
        self.lat.append((r.finish - r.arrival) / NS)
        self.ttft.append((r.first_token - r.arrival) / NS)
        self.spt.append((r.finish - r.arrival) / NS / r.output_tokens)
        if r.output_tokens > 1:
            self.tpot.append((r.finish - r.first_token) / NS / (r.output_tokens - 1))
        self.qd.append((r.finish - r.arrival - r.exec_ns) / NS)
        self.output_tokens += r.output_tokens
        self.last_finish = max(self.last_finish, r.finish)

    @classmethod
    def of(cls, requests: Iterable[Request]) -> "RequestStats":
        stats = cls()
        for r in requests:
            stats.add(r)
        return stats


@dataclass
class SimResult:
    requests: list[Request] | None     # None when the rows were streamed to requests.csv as requests finished
    recorder: Recorder
    sim_end_s: float
    wall_s: float
    num_replicas: int
    extra: dict = field(default_factory=dict)
    streamed: "RequestStream | None" = None

    @property
    def stats(self) -> RequestStats:
        return self.streamed.stats if self.streamed is not None else RequestStats.of(self.requests)


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def _t(ns: int) -> str:
    return "" if ns < 0 else f"{ns / NS:.6f}"


def request_row(r: Request) -> list:
    finished = r.state == State.FINISHED
    lat = (r.finish - r.arrival) / NS if finished else math.nan
    return [r.id, r.adapter, r.replica, "finished" if finished else ("rejected" if r.state == State.REJECTED
                                                                     else "unfinished"),
            _t(r.arrival), _t(r.dispatch), _t(r.first_scheduled), _t(r.first_token), _t(r.finish),
            r.prompt_tokens, r.output_tokens,
            _fmt(lat) if finished else "", _fmt((r.first_token - r.arrival) / NS) if finished else "",
            _fmt(r.exec_ns / NS), _fmt(lat - r.exec_ns / NS) if finished else "",
            _fmt(lat / r.output_tokens) if finished else "", r.migrations, r.preemptions, r.reject_reason]


def request_rows(requests: Sequence[Request]) -> Iterable[list]:
    return (request_row(r) for r in sorted(requests, key=lambda r: r.id))


class RequestStream:
    """requests.csv written while the simulation runs, in id order, each request dropped once written:
    memory holds only the requests in flight and those that finished before an older one (a reorder
    buffer). The file is written to a temporary name and renamed into place by `close`."""

    def __init__(self, folder: Path, total: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "requests.csv"
        self._tmp = folder / ".requests.csv.tmp"
        self._fh = self._tmp.open("w", newline="")
        self._w = csv.writer(self._fh, lineterminator="\n")
        self._w.writerow(REQUEST_COLUMNS)
        self.total, self._next = total, 0
        self._buffer: dict[int, Request] = {}
        self.stats = RequestStats()
        self.peak_buffered = 0

    def done(self, r: Request) -> None:
        buf = self._buffer
        buf[r.id] = r
        self.peak_buffered = max(self.peak_buffered, len(buf))
        while self._next in buf:
            rr = buf.pop(self._next)
            self._w.writerow(request_row(rr))
            self.stats.add(rr)
            self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != self.total or self._buffer:
            raise AssertionError(f"{self.path}: {self._next} of {self.total} rows written, {len(self._buffer)} held")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def iteration_rows(rec: Recorder) -> tuple[list[str], Iterable[list]]:
    keys = sorted(rec.info_keys)
    cols = ITERATION_COLUMNS + keys

    def rows():
        # by (start, replica): fast-forwarded iterations are recorded late, all at once
        for (rep, start, dur, compute, sw, ld, sp, merged, batch, ptok, decode, distinct, forced, info) in sorted(
                rec.rows, key=lambda row: (row.start, row.replica)):
            yield [rep, _t(start), _fmt(dur / NS), _fmt(compute), _fmt(sw), _fmt(ld), _fmt(sp),
                   "unmerged" if merged is None else "merged", "" if merged is None else merged, batch, ptok,
                   decode, distinct, int(bool(forced)),
                   *[("" if not info or k not in info else info[k]) for k in keys]]
    return cols, rows()


def summarize(res: SimResult, slo_s_per_token: float) -> dict[str, Any]:
    st = res.stats
    lat, ttft, spt, tpot, qd = (np.array(a, dtype=float) for a in (st.lat, st.ttft, st.spt, st.tpot, st.qd))
    n, done, rejected = st.num, len(st.lat), sum(st.reject_reasons.values())
    first = (st.first_arrival or 0) / NS
    last = st.last_finish / NS
    span = max(last - first, 1e-12)
    c = res.recorder.counters

    def stat(a: np.ndarray, f) -> float | None:
        return None if a.size == 0 else round(float(f(a)), 6)

    return {
        "num_requests": n, "completed": done, "rejected": rejected,
        "reject_reasons": dict(st.reject_reasons),
        "throughput_rps": round(done / span, 6) if done else 0.0,
        "output_tokens_per_s": round(st.output_tokens / span, 3) if done else 0.0,
        "mean_latency_s": stat(lat, np.mean), "p50_latency_s": stat(lat, lambda a: np.percentile(a, 50)),
        "p90_latency_s": stat(lat, lambda a: np.percentile(a, 90)),
        "p99_latency_s": stat(lat, lambda a: np.percentile(a, 99)),
        "mean_ttft_s": stat(ttft, np.mean), "p99_ttft_s": stat(ttft, lambda a: np.percentile(a, 99)),
        "mean_tpot_s": stat(tpot, np.mean),
        "mean_s_per_token": stat(spt, np.mean), "p90_s_per_token": stat(spt, lambda a: np.percentile(a, 90)),
        "mean_queueing_delay_s": stat(qd, np.mean), "p90_queueing_delay_s": stat(qd, lambda a: np.percentile(a, 90)),
        "slo_s_per_token": slo_s_per_token,
        # of all requests: a rejected or unfinished request misses the SLO
        "slo_attainment": round(float(np.sum(spt <= slo_s_per_token)) / n, 6) if n else 0.0,
        "rejected_share": round(rejected / n, 6) if n else 0.0,
        "num_switches": c["switches"], "num_adapter_loads": c["adapter_loads"], "num_preemptions": c["preemptions"],
        "num_swap_outs": c["swap_outs"], "num_swap_ins": c["swap_ins"], "num_migrations": c["migrations"],
        "num_partial_prefill_chunks": c["prefill_chunks"],
        "num_iterations": res.recorder.num_iterations, "num_replicas": res.num_replicas,
        "merged_iteration_share": (round(res.recorder.merged_iterations / res.recorder.num_iterations, 6)
                                   if res.recorder.num_iterations else 0.0),
        "busy_s": round(res.recorder.busy_ns / NS, 6), "switch_s": round(res.recorder.switch_s, 6),
        "switching_share": round(res.recorder.switch_s * NS / res.recorder.busy_ns, 6) if res.recorder.busy_ns else 0.0,
        "sim_time_s": round(res.sim_end_s, 6), "sim_wall_s": round(res.wall_s, 3),
        **(_tier_summary(c) if c["tiered_replicas"] else {}),
        **(_prefix_summary(c) if c["prefix_cached_replicas"] else {}),
        **res.extra,
    }


def _prefix_summary(c: Counter) -> dict[str, Any]:
    """Prompt tokens served from the prefix cache, of those completed prefills asked for (runs with prefix caching)."""
    asked = c["prefix_prompt_tokens"]
    return {"prefix_hit_tokens": c["prefix_hit_tokens"], "prefix_prompt_tokens": asked,
            "prefix_hit_share": round(c["prefix_hit_tokens"] / asked, 6) if asked else 0.0}


def _tier_summary(c: Counter) -> dict[str, Any]:
    """Adapter loads by the tier they came from and the time each tier took (runs with a bounded host adapter
    cache): host-to-GPU copies (before any overlap with compute), waits on the backing store."""
    return {"num_adapter_loads_host": c["adapter_loads_host"], "num_adapter_loads_store": c["adapter_loads_store"],
            "num_adapter_loads_prefetched": c["adapter_loads_prefetched"],
            "num_adapter_prefetches": c["adapter_prefetches"], "num_host_cache_evictions": c["host_cache_evictions"],
            "adapter_host_load_s": round(c["adapter_host_load_ns"] / NS, 6),
            "adapter_store_wait_s": round(c["adapter_store_wait_ns"] / NS, 6)}


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
    if res.streamed is not None:
        res.streamed.close()
    else:
        _atomic_write(out / "requests.csv", _csv_text(REQUEST_COLUMNS, request_rows(res.requests)))
    cols, rows = iteration_rows(res.recorder)
    _atomic_write(out / "iterations.csv", _csv_text(cols, rows))
    _atomic_write(out / "summary.json", json_text(summary))
