"""Microbenchmarks of the runtime's executor: the points a profile is fitted to, and held-out batches.

Drives `dlora_gpu.executor.ModelExecutor` through the shared `ReplicaState` with synthetic batches, so
what is timed is exactly what `dlora-serve` runs: decode batches x context, prefills x sequences,
mixed batches, unmerged batches with distinct adapters x ranks, merge / unmerge / switch, adapter
loads by rank, KV swaps by blocks. Each point is warmed up and timed `repeats` times in a row, and the
decode, prefill and mixed points in `sweeps` sweeps minutes apart; the CSV keeps the mean wall time of
the executor's run (perf_counter around it) and the device time of its phases
(CUDA events on a GPU; on a CPU both are perf_counter). A held-out set of random mixed batches, drawn
like real traffic, is measured the same way and never used in the fit.

On a CPU the machine's speed drifts (on a shared VM over seconds, and more between runs; see dlora_gpu.drift),
so every timed run is preceded by a fixed reference probe (`dlora_gpu.drift.reference_probe`: a real
decode step of the model on a scratch cache) and scaled by (the median of all those probes / the
median of the last 9), as the measured clock scales a served step: a drift that slows both cancels.
The `drift` column keeps the median factor applied to each point; metadata.json keeps the reference.
On a GPU no scaling is applied.
"""
from __future__ import annotations

import csv
import itertools
import json
import importlib.util
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Callable, Iterable, Sequence

import numpy as np

from dlora_gpu.drift import DriftScale, reference_probe
from dlora_sim.core.config import Parts
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.results import Recorder
from dlora_sim.core.contracts import Decision
from dlora_sim.core.profile import Profile
from dlora_sim.core.replica_config import ClusterConfig, ReplicaConfig
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.request import Request
from dlora_sim.core.workload import Workload

# the features a point carries (what CostModel.iteration_time and the transfer terms read)
COLUMNS = ["kind", "split", "mode", "batch", "prefills", "prefill_tokens", "prefill_sq", "decodes", "decode_context",
           "distinct", "passes", "rank", "rank_sum", "token_rank", "resident_rank_sum", "bytes", "blocks",
           "wall_s", "device_s", "forward_s", "mode_s", "load_s", "swap_s", "repeats", "drift"]
TIMED = ("wall_s", "device_s", "forward_s", "mode_s", "load_s", "swap_s")   # the columns drift scaling refers


@dataclass
class BenchConfig:
    repeats: int = 5
    warmup: int = 2
    ranks: tuple[int, ...] = (8, 16, 32)
    num_adapters: int = 8
    slots: int = 8
    max_kv_blocks: int = 4096
    host_swap_bytes: int = 64 << 20
    heldout: int = 40
    seed: int = 0
    sweeps: int = 3   # the compute points are measured in this many sweeps, minutes apart, and averaged
    quick: bool = False   # a few points of every kind (tests, dry runs)
    reference: bool = True   # scale CPU timings by a reference probe run before each (see the module doc)


class Harness:
    """One replica's state and executor, driven by hand-made decisions."""

    def __init__(self, rcfg, profile: Profile, bench: BenchConfig):
        from dlora_gpu.executor import ExecutorSpec, ModelExecutor
        from dlora_gpu.tokens import TokenLog
        ranks = [bench.ranks[i % len(bench.ranks)] for i in range(bench.num_adapters)]
        wl = Workload.from_requests([], bench.num_adapters, ranks)
        cfg = ReplicaConfig(max_num_seqs=4096, max_num_batched_tokens=1 << 20, gpu_adapter_slots=bench.slots,
                            max_kv_blocks=bench.max_kv_blocks, host_swap_bytes=bench.host_swap_bytes, watermark=0.0,
                            merge="pristine_gpu", chunked_prefill=False)
        parts = Parts(profile, ClusterConfig(1, 1, cfg), wl, lambda: None, None, None)   # type: ignore[arg-type]
        self.cost = CostModel(profile, 1, cfg.merge)
        self.state = ReplicaState(0, cfg, self.cost, ranks, Recorder(keep_iterations=False), lambda r: None,
                                  lambda: 0, merges=True)
        self.rcfg, self.parts = rcfg, parts
        self.ex = ModelExecutor(ExecutorSpec.of(rcfg, self.state, parts))
        self.tokens = TokenLog(self.ex.vocab, rcfg.seed)
        self.ranks = ranks
        self._next_id = 0
        self.last_drift = 1.0
        self._scale: DriftScale | None = None   # None: timings are not scaled
        self.reference_s = 0.0
        if bench.reference and self.ex.device.type == "cpu":
            probe = reference_probe(self.ex.model, self.ex.backend)
            for _ in range(10):
                probe()
            self.reference_s = median(probe() for _ in range(50))
            self._scale = DriftScale(self.reference_s, probe)
        self.start_s = self.reference_s   # the burst at the start; `rescale` moves reference_s to the session's

    def drift(self) -> float:
        """The factor that brings the next timing to the start's reference speed (1.0: unscaled): one
        probe, then the reference over the median of the last 9 (as the measured clock scales);
        `rescale` later moves every point to the median of all the probes instead."""
        return 1.0 if self._scale is None else self._scale.factor()

    def rescale(self, rows: list[dict], to: float | None = None) -> list[dict]:
        """Refer every timing to the median of the probes taken between runs (a probe in a burst runs
        with warm caches, faster than one between model runs, so the start's reference would bias), or
        to `to` seconds of probe (another session's median: a profile's `reference_probe_s`)."""
        if self._scale is None or not self._scale.times:
            return rows
        session = median(self._scale.times) if to is None else to
        c = session / self.reference_s
        for r in rows:
            for k in TIMED:
                if r.get(k) not in (None, ""):
                    r[k] = f"{float(r[k]) * c:.9f}"
            if r.get("drift") not in (None, ""):
                r["drift"] = f"{float(r['drift']) * c:.4f}"
        self.reference_s = self._scale.reference_s = session   # later probes scale to it too
        return rows

    def reference(self) -> dict:
        if self._scale is None:
            return {"scaled": False}
        probe = self._scale.probe
        return {"scaled": True, "probe": probe.describe(),
                "session_median_s": round(self.reference_s, 9), "probes": len(self._scale.times),
                "burst_at_start_s": round(self.start_s, 9),
                "burst_at_end_s": round(median(probe() for _ in range(50)), 9)}

    # --- requests and steps ------------------------------------------------------------------------
    def new(self, adapters: Sequence[int], prompt: Sequence[int]) -> list[Request]:
        out = []
        for a, p in zip(adapters, prompt):
            r = Request(self._next_id, a, 0, int(p), 1 << 30)
            self._next_id += 1
            self.state.enqueue(r)
            out.append(r)
        return out

    def ensure_resident(self, adapters: Iterable[int]) -> None:
        """Load adapters into slots (untimed), evicting others when the slots are full."""
        need = [a for a in dict.fromkeys(adapters) if a not in self.state.resident]
        if not need:
            return
        keep = set(adapters) | {self.state.merged}
        spare = [a for a in self.state.resident if a not in keep]
        evict = tuple(spare[:max(0, len(self.state.resident) + len(need) - self.state.adapter_slots)])
        self.step(Decision([], merged=self.state.merged, load=tuple(need), evict=evict), allow_empty=True, scaled=False)

    def set_mode(self, merged: int | None) -> None:
        if self.state.merged != merged:
            if merged is not None:
                self.ensure_resident([merged])
            self.step(Decision([], merged=merged), allow_empty=True, scaled=False)

    def step(self, d: Decision, allow_empty: bool = False, scaled: bool = True):
        """Apply one decision through the state and the executor: (wall s, PhaseTimes, Step), both
        scaled by `drift()` unless `scaled=False` (untimed set-up steps skip the probe)."""
        if not d.batch and not allow_empty:
            raise ValueError("an empty decision changes only memory or mode: pass allow_empty=True")
        from dlora_gpu.orders import StepOrder
        state = self.state
        step = state.begin(d)
        for r, pf in zip(step.batch, step.prefill):
            if pf:
                self.tokens.prompt(r)
        order = StepOrder.of(step, self.tokens)
        k = self.drift() if scaled else 1.0
        t0 = time.perf_counter()
        times, tokens = self.ex.run(order)
        self.ex.sync()
        wall = time.perf_counter() - t0
        if step.batch:
            self.tokens.append(step.batch, tokens)
            state.complete(step, 0, 1)
        state.end_run(step.batch, 0)
        self.last_drift = k
        return wall * k, times.scaled(k), step

    def drop(self, reqs: Sequence[Request]) -> None:
        """Finish requests by hand (free their KV and tokens)."""
        for r in reqs:
            self.state.remove(r)
            if r.id in self.ex.kv.sequences():
                self.ex.kv.release(r.id)
            self.tokens.drop(r.id)


def _means(runs: list[tuple[float, object, object, float]]) -> tuple[float, float, dict, object]:
    """(wall, device s, phase means with the median drift factor, last step) of timed (wall, times,
    step, drift) runs. Means, not medians: the simulator charges a step's expected time (a replay's
    time is the sum of its steps), and timing noise is skewed slow (a median sits under the mean of a
    CPU step's runs)."""
    ph = {k: mean(getattr(t, k) for _, t, _, _ in runs) for k in ("forward", "mode", "load", "swap")}
    ph["drift"] = median(d for *_, d in runs)
    return mean(w for w, *_ in runs), mean(t.total for _, t, _, _ in runs), ph, runs[-1][2]


def timed(h: Harness, make: callable, repeats: int, warmup: int) -> tuple[float, float, dict, object]:
    """Mean wall and device seconds of `make()`'s decision over `repeats` runs after `warmup`."""
    runs = []
    for i in range(warmup + repeats):
        wall, times, step = h.step(make())
        if i >= warmup:
            runs.append((wall, times, step, h.last_drift))
    return _means(runs)


def _row(kind: str, split: str, step, wall: float, dev: float, ph: dict, repeats: int, **extra) -> dict:
    d = step.decision
    row = {"kind": kind, "split": split, "mode": "unmerged" if d.merged is None else "merged",
           "batch": len(step.batch), "prefills": sum(1 for c in step.prefill if c), "prefill_tokens": step.prefill_tokens,
           "prefill_sq": step.prefill_sq, "decodes": step.decode_seqs, "decode_context": step.decode_context,
           "distinct": step.distinct, "passes": step.lora_passes if d.merged is None else 0,
           "rank": extra.pop("rank", ""),
           "rank_sum": step.rank_sum if d.merged is None else 0,
           "token_rank": step.token_rank if d.merged is None else 0, "resident_rank_sum": step.resident_rank_sum,
           "bytes": extra.pop("bytes", ""), "blocks": extra.pop("blocks", ""),
           "wall_s": f"{wall:.9f}", "device_s": f"{dev:.9f}", "forward_s": f"{ph.get('forward', 0.0):.9f}",
           "mode_s": f"{ph.get('mode', 0.0):.9f}", "load_s": f"{ph.get('load', 0.0):.9f}",
           "swap_s": f"{ph.get('swap', 0.0):.9f}", "repeats": repeats, "drift": f"{ph.get('drift', 1.0):.4f}"}
    return row


def decode_points(h: Harness, b: BenchConfig, batches: Sequence[int], contexts: Sequence[int], *, merged: bool,
                  distinct_list: Sequence[int], split: str = "fit") -> list[dict]:
    """Decode batches of n sequences at a context each, merged on one adapter or unmerged over `distinct`."""
    rows = []
    for n, ctx, distinct in itertools.product(batches, contexts, distinct_list):
        if (merged and distinct != 1) or distinct > n:
            continue
        adapters = [i % distinct for i in range(n)]
        h.set_mode(0 if merged else None)
        h.ensure_resident(set(adapters))
        reqs = h.new(adapters, [ctx] * n)
        h.step(Decision(reqs, merged=0 if merged else None), scaled=False)     # prefill them (untimed)
        wall, dev, ph, step = timed(h, lambda: Decision(reqs, merged=0 if merged else None), b.repeats, b.warmup)
        rows.append(_row("decode", split, step, wall, dev, ph, b.repeats, rank=h.ranks[0]))
        h.drop(reqs)
    return rows


def prefill_points(h: Harness, b: BenchConfig, seqs: Sequence[int], lengths: Sequence[int], *, merged: bool,
                   split: str = "fit") -> list[dict]:
    rows = []
    for n, length in itertools.product(seqs, lengths):
        h.set_mode(0 if merged else None)
        h.ensure_resident([0])
        made: list[list[Request]] = []

        def make():
            reqs = h.new([0] * n, [length] * n)
            made.append(reqs)
            return Decision(reqs, merged=0 if merged else None)

        wall, dev, ph, step = timed(h, make, b.repeats, b.warmup)
        rows.append(_row("prefill", split, step, wall, dev, ph, b.repeats, rank=h.ranks[0]))
        for reqs in made:
            h.drop(reqs)
    return rows


def mixed_point(h: Harness, b: BenchConfig, rng: np.random.Generator, split: str) -> dict:
    """One random mixed batch drawn like serving traffic: 1-16 sequences, some prefills of 8-512 tokens,
    decodes at contexts of 16-1024, 1-4 distinct adapters, unmerged (or merged when one adapter); the
    same batch is rebuilt for each run (a prefill runs once), mean of `repeats` after `warmup`."""
    n = int(rng.integers(1, 17))
    n_pre = int(rng.integers(0, min(n, 4) + 1))
    distinct = int(rng.integers(1, 5))
    adapters = [int(a) for a in rng.integers(0, distinct, n)]
    merged = distinct == 1 and rng.random() < 0.5
    mode = adapters[0] if merged else None
    dec_len, pre_len = rng.integers(16, 1024, n - n_pre), rng.integers(8, 512, n_pre)
    h.set_mode(mode)
    h.ensure_resident(set(adapters))
    runs = []
    for i in range(b.warmup + b.repeats):
        dec = h.new(adapters[n_pre:], dec_len)
        if dec:
            h.step(Decision(dec, merged=mode), scaled=False)      # their prompts, untimed
        pre = h.new(adapters[:n_pre], pre_len)
        wall, times, step = h.step(Decision(pre + dec, merged=mode))
        h.drop(pre + dec)
        if i >= b.warmup:
            runs.append((wall, times, step, h.last_drift))
    wall, dev, ph, last = _means(runs)
    return _row("mixed", split, last, wall, dev, ph, b.repeats, rank="")


def mixed_points(h: Harness, b: BenchConfig, counts: dict[str, int]) -> list[dict]:
    """Fit and held-out mixed batches, measured alternately so that a drift of the machine's speed
    during the run falls on both alike (each split has its own random stream)."""
    rngs = {split: np.random.default_rng(b.seed + i) for i, split in enumerate(counts)}
    rows = []
    for k in range(max(counts.values(), default=0)):
        rows += [mixed_point(h, b, rngs[split], split) for split, n in counts.items() if k < n]
    return rows


def mode_points(h: Harness, b: BenchConfig) -> list[dict]:
    """Merge (clean -> a), switch (a -> b) and unmerge (a -> clean), timed alone."""
    rows = []
    h.ensure_resident([0, 1])
    for kind, before, after in (("merge", None, 0), ("switch", 0, 1), ("unmerge", 1, None)):
        walls, drifts = [], []
        for i in range(b.warmup + b.repeats):
            h.set_mode(before)
            _, times, _ = h.step(Decision([], merged=after), allow_empty=True)
            if i >= b.warmup:
                walls.append(times.mode)
                drifts.append(h.last_drift)
        w = mean(walls)
        rows.append({**{c: "" for c in COLUMNS}, "kind": kind, "split": "fit", "mode": "merged" if after is not None
                     else "unmerged", "rank": h.ranks[0], "wall_s": f"{w:.9f}", "device_s": f"{w:.9f}",
                     "mode_s": f"{w:.9f}", "repeats": b.repeats, "drift": f"{median(drifts):.4f}"})
    h.set_mode(None)
    return rows


def load_points(h: Harness, b: BenchConfig) -> list[dict]:
    rows = []
    h.set_mode(None)
    for rank in sorted(set(h.ranks)):
        a = h.ranks.index(rank)
        walls, drifts = [], []
        for i in range(b.warmup + b.repeats):
            if a in h.state.resident:
                h.step(Decision([], evict=(a,)), allow_empty=True, scaled=False)
            _, times, _ = h.step(Decision([], load=(a,)), allow_empty=True)
            if i >= b.warmup:
                walls.append(times.load)
                drifts.append(h.last_drift)
        w = mean(walls)
        rows.append({**{c: "" for c in COLUMNS}, "kind": "load", "split": "fit", "rank": rank,
                     "bytes": h.cost.profile.adapter_bytes(rank), "wall_s": f"{w:.9f}", "device_s": f"{w:.9f}",
                     "load_s": f"{w:.9f}", "repeats": b.repeats, "drift": f"{median(drifts):.4f}"})
    return rows


def swap_points(h: Harness, b: BenchConfig, blocks_list: Sequence[int]) -> list[dict]:
    rows = []
    bs = h.state.block_size
    for blocks in blocks_list:
        h.set_mode(None)
        h.ensure_resident([0])
        (r,) = h.new([0], [blocks * bs])
        h.step(Decision([r]), scaled=False)        # prefill: r holds `blocks` blocks
        walls, drifts = [], []
        for i in range(b.warmup + b.repeats):
            k = h.drift()
            t0 = time.perf_counter()
            h.ex.kv.swap_out(r.id)
            h.ex.kv.swap_in(r.id)
            h.ex.sync()
            if i >= b.warmup:
                walls.append((time.perf_counter() - t0) / 2 * k)   # one direction
                drifts.append(k)
        w = mean(walls)
        rows.append({**{c: "" for c in COLUMNS}, "kind": "swap", "split": "fit", "blocks": blocks,
                     "bytes": blocks * h.state.layout.block_bytes, "wall_s": f"{w:.9f}", "device_s": f"{w:.9f}",
                     "swap_s": f"{w:.9f}", "repeats": b.repeats, "drift": f"{median(drifts):.4f}"})
        h.drop([r])
    return rows


def transfer_points(h: Harness, b: BenchConfig, blocks_list: Sequence[int], workers: str = "auto") -> list[dict]:
    """A request's KV moved between two replicas' workers as co-migration moves it: exported at one (a
    host copy; its blocks freed), shipped (Ray's object store between two actors when Ray is installed,
    else in this process), received and installed at the other. One row per size: the median of the
    timed moves. Not drift-scaled: a copy and a hop between processes are not the probe's compute."""
    from dataclasses import replace

    from dlora_gpu.executor import ExecutorSpec
    from dlora_gpu.workers import make_workers
    spec = ExecutorSpec.of(replace(h.rcfg, warmup=0, clock="real"), h.state, h.parts)
    ws = make_workers(workers, [spec, replace(spec, replica=1)])
    seq = -2
    rows = []
    try:
        block_bytes = ws.get(ws.call(0, "block_bytes"))
        for blocks in blocks_list:
            walls = []
            for i in range(b.warmup + b.repeats):
                ws.get(ws.call(0, "fill", seq, blocks))
                t0 = time.perf_counter()
                ws.get(ws.chain(1, "receive", seq, ws.call(0, "export", seq)))
                ws.get(ws.call(1, "land", seq, "resident", blocks))
                wall = time.perf_counter() - t0
                ws.get(ws.call(1, "release", (seq,)))
                if i >= b.warmup:
                    walls.append(wall)
            w = median(walls)
            rows.append({**{c: "" for c in COLUMNS}, "kind": "transfer", "split": "fit", "blocks": blocks,
                         "bytes": blocks * block_bytes, "wall_s": f"{w:.9f}", "device_s": f"{w:.9f}",
                         "repeats": b.repeats, "drift": ""})
    finally:
        ws.close()
    return rows


def compute_points(h: Harness, b: BenchConfig) -> list[dict]:
    """One sweep over the decode, prefill and mixed points (the same points, in the same order, every time)."""
    q = b.quick
    batches = (1, 4) if q else (1, 2, 4, 8, 16, 32)
    contexts = (64,) if q else (32, 256, 1024)
    h.set_mode(None)   # every sweep starts clean with empty slots (the resident adapters are a feature)
    if h.state.resident:
        h.step(Decision([], evict=tuple(h.state.resident)), allow_empty=True, scaled=False)
    rows = []
    rows += decode_points(h, b, batches, contexts, merged=True, distinct_list=(1,))
    rows += decode_points(h, b, batches, contexts, merged=False, distinct_list=(1, 2) if q else (1, 4, 8))
    rows += prefill_points(h, b, (1,) if q else (1, 2, 4), (32,) if q else (16, 64, 256, 512), merged=False)
    rows += prefill_points(h, b, (1,) if q else (1, 4), (32,) if q else (64, 512), merged=True)
    rows += mixed_points(h, b, {"fit": 3 if q else 30, "heldout": 3 if q else b.heldout})
    return rows


def average_sweeps(sweeps: list[list[dict]]) -> list[dict]:
    """Each point's mean over sweeps of the same points: the drift factor's own error (its probes are
    noisy) and a slow or fast stretch of the machine fall on one sweep's runs together, so runs minutes
    apart average them out where more runs in a row would not. `repeats` counts every timed run;
    `drift` keeps the median of the sweeps' factors."""
    out = []
    for same in zip(*sweeps, strict=True):
        keys = {tuple(r[c] for c in COLUMNS if c not in (*TIMED, "repeats", "drift")) for r in same}
        if len(keys) != 1:
            raise RuntimeError(f"sweeps measured different points: {sorted(keys)}")
        row = dict(same[0])
        for c in TIMED:
            row[c] = f"{mean(float(r[c]) for r in same):.9f}"
        row["repeats"] = sum(int(r["repeats"]) for r in same)
        row["drift"] = f"{median(float(r['drift']) for r in same):.4f}"
        out.append(row)
    return out


def run_all(h: Harness, b: BenchConfig, stage: Callable[[str, list[dict]], None] = lambda what, rows: None) -> list[dict]:
    """Every point of the microbenchmarks; `stage(what, rows so far)` after each stage (progress, and what
    an interrupted calibration keeps)."""
    if b.sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {b.sweeps}")
    sweeps: list[list[dict]] = []
    for i in range(b.sweeps):
        sweeps.append(compute_points(h, b))
        stage(f"compute points, sweep {i + 1}/{b.sweeps}", [r for s in sweeps for r in s])
    rows = average_sweeps(sweeps)
    for what, points in (("mode changes", mode_points), ("adapter loads", load_points),
                         ("KV swaps", lambda h, b: swap_points(h, b, (1, 4) if b.quick else (1, 4, 16, 64)))):
        rows += points(h, b)
        stage(what, rows)
    rows = h.rescale(rows)
    rows += transfer_points(h, b, TRANSFER_BLOCKS_QUICK if b.quick else TRANSFER_BLOCKS)
    stage("KV transfers between two workers", rows)
    return rows


TRANSFER_BLOCKS = (1, 4, 16, 64, 256)
TRANSFER_BLOCKS_QUICK = (1, 16)


def metadata(rcfg, profile: Profile, bench: BenchConfig, elapsed: float) -> dict:
    import torch
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"device": (torch.cuda.get_device_name() if torch.cuda.is_available() and rcfg.device.startswith("cuda")
                       else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"),
            "dtype": rcfg.dtype, "backend": rcfg.backend, "model": profile.model.name, "base_profile": profile.name,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                         "cuda": torch.version.cuda},
            "commit": commit, "load_avg_1min_before": load1, "cpus": os.cpu_count(),
            "kv_transfer_workers": "ray actors" if importlib.util.find_spec("ray") else "in-process",
            "bench": {k: getattr(bench, k) for k in bench.__dataclass_fields__}, "elapsed_s": round(elapsed, 3),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(rows: list[dict], meta: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "points.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
