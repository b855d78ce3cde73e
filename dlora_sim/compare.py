"""Comparison across the jobs of a multirun: a table on stdout, comparison.csv and comparison.png.

Runs as a Hydra callback at the end of every `--multirun`, and as `dlora-compare <sweep dir>` on any
folder of results folders. It only reads summary.json files.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = [("label", "run", "{}"), ("throughput_rps", "req/s", "{:.3f}"), ("mean_latency_s", "mean lat s", "{:.2f}"),
           ("p99_latency_s", "p99 lat s", "{:.2f}"), ("mean_ttft_s", "TTFT s", "{:.2f}"),
           ("mean_s_per_token", "s/token", "{:.4f}"), ("p90_s_per_token", "p90 s/tok", "{:.4f}"),
           ("slo_attainment", "SLO", "{:.1%}"), ("num_switches", "switches", "{}"),
           ("completed", "done", "{}"), ("rejected", "rejected", "{}"), ("rejected_share", "rej %", "{:.1%}")]


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


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    def cell(s, key, fmt):
        v = s.get(key)
        return "-" if v is None else fmt.format(v)
    body = [[cell(s, k, f) for k, _, f in COLUMNS] for s in rows]
    head = [h for _, h, _ in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def comparison_chart(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("throughput_rps", "throughput (req/s)"), ("mean_latency_s", "mean latency (s)"),
               ("p99_latency_s", "p99 latency (s)"), ("mean_s_per_token", "mean s / token"),
               ("slo_attainment", "SLO attainment")]
    labels = [s["label"].replace("system=", "") for s in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.8))
    for ax, (key, title) in zip(axes, metrics):
        vals = [s.get(key) or 0.0 for s in rows]
        bars = ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=7)
        positive = [v for v in vals if v > 0]
        if key != "slo_attainment" and positive and max(positive) > 20 * min(positive):
            ax.set_yscale("log")   # one slow system must not flatten the others
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{rows[0].get('num_requests', '?')} requests, {rows[0].get('num_replicas', '?')} replica(s)"
                 if rows else "no runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(*folders: Path, out: Path | None = None) -> Path | None:
    """Table, comparison.csv and comparison.png of the runs in `folders` (run or sweep folders), written
    into `out` (default: the folder, when there is one)."""
    rows = load_summaries(*folders)
    if not rows:
        return None
    out = Path(out) if out is not None else Path(folders[0])
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(rows))
    with (out / "comparison.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([k for k, _, _ in COLUMNS] + ["folder"])
        for s in rows:
            w.writerow([s.get(k) for k, _, _ in COLUMNS] + [s["folder"]])
    chart = comparison_chart(rows, out / "comparison.png")
    print(f"comparison chart: {chart.resolve()}")
    return chart


class CompareCallback(Callback):
    """At the end of every multirun; experiments that report themselves set `enabled: false`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            compare(Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare runs: sweep folders (*/summary.json) or run folders.")
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None,
                    help="where comparison.csv/.png go (default: the folder; needed for several)")
    args = ap.parse_args(argv)
    if len(args.folders) > 1 and args.out is None:
        ap.error("several folders: say where the comparison goes with --out")
    if compare(*args.folders, out=args.out) is None:
        print(f"dlora-compare: no summary.json in {', '.join(map(str, args.folders))} or their subfolders",
              file=sys.stderr)
        return 1
    return 0
