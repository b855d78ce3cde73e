"""dlora from Python: run a simulation and get its results back as pandas DataFrames, or load any results
folder we write (the simulator's, the runtime's, a streamed million-request run's) and any sweep.

    import dlora_sim
    res = dlora_sim.simulate("dlora", workload="default", overrides=["workload.rate=12"], seed=0)
    res.requests.groupby("adapter")["ttft_s"].quantile(0.99)
    sweep = dlora_sim.load_sweep("outputs/compare/<stamp>")   # one row per job

`simulate` composes the same Hydra config as `dlora-sim` (same keys, same one-line errors, raised as
`ConfigError`) and writes the same results folder, which `Results` then reads: a simulated run and its
folder are one thing, never two formats. Frames load lazily, on first access.
"""
from __future__ import annotations

import json
import tempfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlora_sim.core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

# requests.csv and iterations.csv column types: times in seconds as floats (empty = NaN), counts as
# integers, identifiers that may be absent as nullable integers, the few labels as categories
REQUEST_DTYPES = {"id": "int64", "adapter": "int64", "replica": "Int64", "status": "category",
                  "arrival_s": "float64", "dispatch_s": "float64", "first_scheduled_s": "float64",
                  "first_token_s": "float64", "finish_s": "float64", "prompt_tokens": "int64",
                  "output_tokens": "int64", "latency_s": "float64", "ttft_s": "float64", "exec_s": "float64",
                  "queueing_delay_s": "float64", "s_per_token": "float64", "migrated": "int64",
                  "preempted": "int64", "reject_reason": "string"}
ITERATION_DTYPES = {"replica": "int64", "start_s": "float64", "duration_s": "float64", "compute_s": "float64",
                    "switch_s": "float64", "load_s": "float64", "swap_s": "float64", "mode": "category",
                    "merged_adapter": "Int64", "batch_size": "int64", "prefill_tokens": "int64",
                    "decode_seqs": "int64", "distinct_adapters": "int64", "forced": "bool"}
STATUSES = ["finished", "rejected", "unfinished"]
MODES = ["merged", "unmerged"]


class ResultsFolderError(FileNotFoundError, UserError):
    """A folder that holds no complete results (no summary.json)."""


class Results:
    """One results folder: `.requests` and `.iterations` (DataFrames), `.summary` and `.config` (dicts)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "summary.json").is_file():
            raise ResultsFolderError(f"{self.folder}: no summary.json (not a complete results folder)")

    def __repr__(self) -> str:
        s = self.summary
        return (f"Results({str(self.folder)!r}: {s.get('system')}, {s.get('completed')}/{s.get('num_requests')} "
                f"done, mean latency {s.get('mean_latency_s')} s)")

    @cached_property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.folder / "summary.json").read_text())

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config") or {}

    @cached_property
    def requests(self) -> "pd.DataFrame":
        """One row per request (docs/results.md), in id order; `replica` is <NA> for a request never
        dispatched (rejected), `status` a category of finished / rejected / unfinished."""
        import pandas as pd
        df = pd.read_csv(self.folder / "requests.csv", dtype={k: v for k, v in REQUEST_DTYPES.items()
                                                               if v not in ("Int64", "category", "string")},
                         keep_default_na=False, na_values={k: [""] for k in REQUEST_DTYPES if k.endswith("_s")})
        df["replica"] = df["replica"].astype("Int64").mask(df["replica"] < 0)
        df["status"] = pd.Categorical(df["status"], categories=STATUSES)
        df["reject_reason"] = df["reject_reason"].astype("string").replace("", pd.NA)
        return df

    @cached_property
    def iterations(self) -> "pd.DataFrame":
        """One row per iteration (docs/results.md); `merged_adapter` is <NA> when unmerged; columns the
        policy or the runtime added (e.g. `theta_right`, `wall_s`) are floats (NaN where absent)."""
        import pandas as pd
        path = self.folder / "iterations.csv"
        if not path.exists():   # large runs skip it (keep_iterations)
            return pd.DataFrame({k: pd.Series(dtype=v) for k, v in ITERATION_DTYPES.items()})
        df = pd.read_csv(path, dtype={k: v for k, v in ITERATION_DTYPES.items()
                                      if v not in ("Int64", "category", "bool")})
        df["merged_adapter"] = df["merged_adapter"].astype("Int64")
        df["mode"] = pd.Categorical(df["mode"], categories=MODES)
        df["forced"] = df["forced"].astype(bool)
        return df


def load(folder: str | Path) -> Results:
    """The results of any folder we write (simulator or runtime); frames load on access."""
    return Results(folder)


def simulate(system: str = "dlora", workload: str | None = None, overrides: Sequence[str] = (), seed: int = 0,
             out: str | Path | None = None, charts: bool = False) -> Results:
    """Run `dlora-sim` in-process: the config of `system=<system> [workload=<workload>] seed=<seed>
    <overrides>`, results written to `out` (default: a fresh temporary folder, left for you to keep or
    delete) and loaded from there."""
    from hydra.errors import HydraException

    from dlora_sim.core.config import ConfigError, compose
    from dlora_sim.des.engine import run_job

    given = [f"system={system}", *([f"workload={workload}"] if workload else []),
             *([f"seed={seed}"] if seed else []), *overrides]   # as a command line would give them
    try:
        cfg = compose([*given, f"charts={str(charts).lower()}"])   # seed 0 is the config's default
    except HydraException as e:   # an unknown option or key, as Hydra words it
        raise ConfigError(str(e).splitlines()[0]) from None
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"dlora_{system}_"))
    run_job(cfg, folder, system, given, charts=charts)
    return Results(folder)


def load_sweep(folder: str | Path) -> "pd.DataFrame":
    """One row per job of a sweep folder (or per run folder given): the swept keys as columns (numbers
    where they parse), every scalar of summary.json, `label` and `folder`. What `dlora-compare` tabulates."""
    rows = load_summaries(Path(folder))
    if not rows:
        raise ResultsFolderError(f"{folder}: no summary.json in it or its subfolders (not a sweep's folder)")
    return sweep_frame(rows)


def sweep_frame(summaries: Sequence[dict[str, Any]]) -> "pd.DataFrame":
    """`load_sweep`'s frame from summaries already read (`load_summaries`)."""
    import pandas as pd

    rows = []
    for s in summaries:
        row: dict[str, Any] = {}
        for o in s.get("overrides") or []:
            key, _, value = o.lstrip("+~").partition("=")
            row[key] = _number(value)
        row.update({k: v for k, v in s.items() if not isinstance(v, (dict, list)) and k != "overrides"})
        rows.append(row)
    df = pd.DataFrame(rows)
    if "system" in df:
        df["system"] = df["system"].astype("category")
    return df


def summary_files(folder: Path) -> list[Path]:
    """A run folder's summary.json, or every run's of a sweep folder (in job order)."""
    folder = Path(folder)
    if (folder / "summary.json").exists():
        return [folder / "summary.json"]
    return sorted(folder.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name))


def load_summaries(*folders: Path) -> list[dict[str, Any]]:
    rows = []
    for f in (f for folder in folders for f in summary_files(folder)):
        s = json.loads(f.read_text())
        s["folder"] = str(f.parent)
        rows.append(s)
    # label each run by the overrides that differ between runs (all of them if there is one run)
    common = set.intersection(*(set(s.get("overrides") or []) for s in rows)) if len(rows) > 1 else set()
    for s in rows:
        s["label"] = " ".join(o for o in (s.get("overrides") or []) if o not in common) or s.get("system", "run")
    return rows


def _number(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
