"""Capacity at the SLO: a Hydra sweeper that bisects, per arm, the highest request rate a system serves.

The dLoRA paper's "throughput" is the highest request rate whose mean latency per output token stays
under the SLO (0.5 s), with 100 x rate requests per run. `hydra/sweeper=capacity` takes the discrete
sweeps of the command line or the experiment (system, model, ...) as arms and bisects each arm's rate
in log space, `rounds` times, between `rate_low` and `rate_high`; every round launches one job per
(arm, run length) through the configured launcher (joblib locally, submitit or Ray on a cluster). A
rate is met when the run's mean s/token is within `slo_s_per_token` and at most `max_rejected` of its
requests were rejected. `run_lengths` repeats the search with more requests per unit of rate: with
~100 s of arrivals an overloaded system can still average under the SLO, so the capacity found at two
lengths says how robust it is.

The knob is `workload.rate` (with `workload.num_requests` = run length x rate) unless `rate_key` names another,
e.g. a trace's `workload.rate_scale` with `count_key: null` (its window sets the requests): the bisection then
runs on that knob, and capacities are reported in req/s as the met run's offered rate (`offered_rps`).

`fixed_loads` (values of the knob) first runs every arm at each of those loads, at the longest run length: the
same offered load for every system, for latency percentiles side by side (fixed_load.csv).

Writes capacity.csv (one row per arm and run length), capacity_probes.csv (every run) and capacity.png
(mean s/token vs rate per arm, the SLO as a line) into the sweep folder.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RATE_KEY = "workload.rate"   # the default knob: a synthetic workload's request rate


@dataclass
class Search:
    """One arm's bisection at one run length (log-space bounds: `lo` met, `hi` not met)."""

    arm: list[str]
    run_length: float
    lo: float
    hi: float
    lo_met: bool = False          # whether a run has confirmed `lo`
    probes: list[dict] = field(default_factory=list)

    def next_rate(self) -> float:
        return float(f"{math.sqrt(self.lo * self.hi):.4g}")


def arms_of(overrides) -> list[list[str]]:
    """The cartesian product of the discrete sweeps; plain overrides are in every arm. A key given twice
    (the experiment's params, then the command line) keeps its last value."""
    by_key: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ValueError(f"capacity sweeper: only discrete sweeps (a,b,c) are arms, not {key}")
            by_key[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            by_key[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(x) for x in itertools.product(*by_key.values())]


class CapacitySearch(Sweeper):
    """The bisection (the plugin class Hydra instantiates is hydra_plugins.dlora_capacity.CapacitySweeper)."""

    def __init__(self, rate_low: float = 0.25, rate_high: float = 128.0, rounds: int = 8,
                 run_lengths: Sequence[float] = (100.0,), max_rejected: float = 0.01,
                 params: dict[str, str] | None = None, rate_key: str = RATE_KEY,
                 count_key: str | None = "workload.num_requests", fixed_loads: Sequence[float] = ()):
        if not 0 < rate_low < rate_high or rounds < 1 or not run_lengths or not 0 <= max_rejected < 1:
            raise ValueError("hydra.sweeper: need 0 < rate_low < rate_high, rounds >= 1, run_lengths, "
                             "0 <= max_rejected < 1")
        if any(float(x) <= 0 for x in fixed_loads or ()):
            raise ValueError(f"hydra.sweeper.fixed_loads must be > 0, got {list(fixed_loads)}")
        self.fixed_loads = [float(x) for x in fixed_loads or ()]
        self.rate_key, self.count_key = rate_key, count_key
        self.rate_low, self.rate_high, self.rounds = rate_low, rate_high, rounds
        self.run_lengths = [float(x) for x in run_lengths]
        self.max_rejected = max_rejected
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        searches = [Search(arm, L, self.rate_low, self.rate_high) for arm in arms_of(overrides)
                    for L in self.run_lengths]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        slo = float(self.config.slo_s_per_token)
        job = 0
        if self.fixed_loads:
            arms, longest = arms_of(overrides), max(self.run_lengths)
            batch = [self._overrides(arm, longest, x) for arm in arms for x in self.fixed_loads]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job)
            job += len(batch)
            write_fixed_loads(sweep_dir, arms, batch, results, self.rate_key)
        for round_ in range(self.rounds):
            batch = [self._overrides(s.arm, s.run_length, s.next_rate()) for s in searches]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job)
            job += len(batch)
            for s, overrides_, res in zip(searches, batch, results):
                _ = res.return_value   # raises if the job failed
                summary = json.loads((Path(res.hydra_cfg.hydra.runtime.output_dir) / "summary.json").read_text())
                rate = float(overrides_[len(s.arm)].split("=", 1)[1])
                rejected = summary["rejected"] / max(summary["num_requests"], 1)
                spt = summary["mean_s_per_token"]
                met = spt is not None and spt <= slo and rejected <= self.max_rejected
                s.probes.append({"rate": rate, "num_requests": summary["num_requests"],
                                 "offered_rps": summary.get("offered_rps"), "mean_s_per_token": spt,
                                 "rejected_share": round(rejected, 6), "met": met,
                                 "folder": res.hydra_cfg.hydra.runtime.output_dir})
                if met:
                    s.lo, s.lo_met = rate, True
                else:
                    s.hi = rate
            log.info("capacity round %d/%d: %s", round_ + 1, self.rounds,
                     ", ".join(f"{' '.join(s.arm)} x{s.run_length:g}: [{s.lo:g}, {s.hi:g}]" for s in searches))
        rows = write_results(sweep_dir, searches, slo, self.rate_key)
        for r in rows:
            log.info("capacity %-40s %s requests/rate: %s req/s", r["arm"], r["run_length"], r["capacity_rps"])
        return rows

    def _overrides(self, arm: list[str], run_length: float, rate: float) -> list[str]:
        count = [f"{self.count_key}={max(1, round(run_length * rate))}"] if self.count_key else []
        return [*arm, f"{self.rate_key}={rate}", *count]


FIXED_COLUMNS = ("offered_rps", "num_requests", "completed", "rejected", "mean_s_per_token", "slo_attainment",
                 "mean_ttft_s", "p50_latency_s", "p99_ttft_s", "p99_latency_s")


def write_fixed_loads(folder: Path, arms: list[list[str]], batch: list[list[str]], results, knob: str) -> None:
    """fixed_load.csv: one row per arm and load, the run's summary figures beside its folder."""
    common = set.intersection(*(set(a) for a in arms)) if len(arms) > 1 else set()
    with (folder / "fixed_load.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm", knob, *FIXED_COLUMNS, "folder"], lineterminator="\n")
        w.writeheader()
        for overrides_, res in zip(batch, results):
            _ = res.return_value   # raises if the job failed
            out = Path(res.hydra_cfg.hydra.runtime.output_dir)
            summary = json.loads((out / "summary.json").read_text())
            arm = overrides_[: len(arms[0])]   # then the knob (Search's order)
            w.writerow({"arm": " ".join(o for o in arm if o not in common) or " ".join(arm),
                        knob: float(overrides_[len(arm)].split("=", 1)[1]),
                        **{k: summary.get(k) for k in FIXED_COLUMNS}, "folder": str(out)})


def _capacity(s: Search) -> float | None:
    """The highest met value of the knob; None when even rate_low failed."""
    return s.lo if s.lo_met else None


def _capacity_rps(s: Search, knob: str) -> float | None:
    """The capacity in req/s: the knob itself when it is the rate, else the met run's offered rate."""
    cap = _capacity(s)
    if cap is None or knob == RATE_KEY:
        return cap
    return next(p["offered_rps"] for p in s.probes if p["rate"] == cap and p["met"])


def _x(p: dict, knob: str) -> float:
    return p["rate"] if knob == RATE_KEY else p["offered_rps"]


def label(s: Search, searches: list[Search]) -> str:
    """The overrides that tell this arm from the others (all of them when there is one arm)."""
    common = set.intersection(*(set(x.arm) for x in searches)) if len(searches) > 1 else set()
    return " ".join(o for o in s.arm if o not in common) or " ".join(s.arm)


def write_results(folder: Path, searches: list[Search], slo: float, knob: str = RATE_KEY) -> list[dict]:
    rows = []
    for s in searches:
        cap = _capacity_rps(s, knob)
        row = {"arm": label(s, searches), "run_length": s.run_length, "capacity_rps": "" if cap is None else cap}
        if knob == RATE_KEY:
            row["first_failed_rps"] = s.hi
        else:   # the knob's own values beside the req/s
            name = knob.rsplit(".", 1)[-1]
            row[f"capacity_{name}"] = "" if _capacity(s) is None else _capacity(s)
            row[f"first_failed_{name}"] = s.hi
        rows.append({**row, "probes": len(s.probes)})
    with (folder / "capacity.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with (folder / "capacity_probes.csv").open("w", newline="") as f:
        fields = ["arm", "run_length", "rate", "num_requests", "offered_rps", "mean_s_per_token", "rejected_share",
                  "met", "folder"]
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for s in searches:
            for p in sorted(s.probes, key=lambda p: p["rate"]):
                w.writerow({"arm": label(s, searches), "run_length": s.run_length, **p})
    chart(folder / "capacity.png", searches, slo, knob)
    return rows


def chart(path: Path, searches: list[Search], slo: float, knob: str = RATE_KEY) -> None:
    """One panel per arm without its system (e.g. model x LoRA cost); in it a line per system (its
    colour everywhere in the project), solid for the longest run length, dashed for shorter ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from dlora_sim.chart_layout import color

    def split(s: Search) -> tuple[str, str]:
        parts = label(s, searches).split()
        system = next((p.split("=", 1)[1] for p in parts if p.startswith("system=")), "")
        return system, " ".join(p for p in parts if not p.startswith("system=")) or "all"

    panels = sorted({split(s)[1] for s in searches})
    systems = sorted({split(s)[0] for s in searches})
    longest = max(s.run_length for s in searches)
    cols = min(len(panels), 2)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.4 * cols, 4.3 * rows_n), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for s in sorted((s for s in searches if split(s)[1] == panel), key=lambda s: (split(s)[0], -s.run_length)):
            pts = sorted((_x(p, knob), p["mean_s_per_token"]) for p in s.probes if p["mean_s_per_token"] is not None)
            if not pts:
                continue
            system = split(s)[0]
            cap = _capacity_rps(s, knob)
            below = f"< {s.hi:g} req/s" if knob == RATE_KEY else f"none met ({knob} >= {s.hi:g})"
            legend = f"{system or 'run'} ({s.run_length:g}x rate): " + (f"{cap:g} req/s" if cap is not None else below)
            c = color(system, systems)
            ax.plot(*zip(*pts), marker="o", ms=3, color=c, ls="-" if s.run_length == longest else "--", label=legend)
            if cap is not None and s.run_length == longest:
                ax.axvline(cap, color=c, ls=":", lw=0.8)
        ax.axhline(slo, color="k", ls="--", lw=1, label=f"SLO {slo:g} s/token")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("mean s / output token")
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, ncol=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("capacity at the SLO: the highest rate whose mean s/token stays under it "
                 f"(dotted: capacity at {longest:g}x rate requests)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
