"""Comparison across the jobs of a multirun: a table on stdout, comparison.csv and comparison.png.

Runs as a Hydra callback at the end of every `--multirun`, and as `dlora-compare <sweep dir>` on any
folder of results folders. It only reads summary.json files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dlora_sim.api import load_summaries, sweep_frame
from dlora_sim.chart_layout import common_description, layout
from dlora_sim.verdict import verdict_chart, verdicts

COLUMNS = [("label", "run", "{}"), ("throughput_rps", "req/s", "{:.3f}"), ("mean_latency_s", "mean lat s", "{:.2f}"),
           ("p99_latency_s", "p99 lat s", "{:.2f}"), ("mean_ttft_s", "TTFT s", "{:.2f}"),
           ("mean_s_per_token", "s/token", "{:.4f}"), ("p90_s_per_token", "p90 s/tok", "{:.4f}"),
           ("slo_attainment", "SLO", "{:.1%}"), ("num_switches", "switches", "{}"),
           ("completed", "done", "{}"), ("rejected", "rejected", "{}"), ("rejected_share", "rej %", "{:.1%}")]


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


METRICS = [("throughput_rps", "throughput (req/s)"), ("mean_latency_s", "mean latency (s)"),
           ("p99_latency_s", "P99 latency (s)"), ("mean_s_per_token", "mean s / output token"),
           ("slo_attainment", "SLO attainment")]


def comparison_chart(rows: Sequence[dict[str, Any]], path: Path, *, log: bool = False) -> Path:
    """A line per system over the swept parameter (seeds: mean line, min-max band), or one bar per run
    when nothing numeric is swept; the SLO as a line on s/token; log y only when asked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lay = layout(rows)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.3 * len(METRICS), 3.9 if lay.x_key else 4.4))
    for ax, (key, title) in zip(axes, METRICS):
        if lay.x_key:
            for n, s in enumerate(lay.series):   # markers and widths tell apart series that coincide
                vals = [[r.get(key) for r in runs if r.get(key) is not None] for runs in s.runs]
                xs = [x for x, v in zip(s.x, vals) if v]
                mean = [float(np.mean(v)) for v in vals if v]
                ax.plot(xs, mean, marker="os^Dv<>"[n % 7], ms=5, lw=max(2.6 - 0.5 * n, 1.0), color=s.color,
                        label=s.label)
                if lay.seeds > 1:
                    ax.fill_between(xs, [min(v) for v in vals if v], [max(v) for v in vals if v],
                                    color=s.color, alpha=0.18, lw=0)
            ax.set_xlabel(lay.x_key, fontsize=8)
        else:
            vals = [b[2].get(key) or 0.0 for b in lay.bars]
            pos = np.arange(len(vals))
            horizontal = len(vals) > 8
            draw = ax.barh if horizontal else ax.bar
            bars = draw(pos, vals, color=[b[1] for b in lay.bars])
            if len(vals) <= 12:
                ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=7, padding=1)
            names = [b[0].replace("system=", "") for b in lay.bars]
            if horizontal:
                ax.set_yticks(pos, names if ax is axes[0] else [""] * len(names), fontsize=7)
                ax.invert_yaxis()
            else:
                ax.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
        sideways = lay.x_key is None and len(rows) > 8   # horizontal bars: values run along x
        if key == "mean_s_per_token" and rows and rows[0].get("slo_s_per_token"):
            slo = rows[0]["slo_s_per_token"]
            (ax.axvline if sideways else ax.axhline)(slo, color="k", ls="--", lw=1, label=f"SLO {slo:g} s/token")
            if lay.x_key is None:
                ax.legend(fontsize=7, loc="best")
        if key == "slo_attainment":
            (ax.set_xlim if sideways else ax.set_ylim)(0, 1.05)
        elif log:
            (ax.set_xscale if sideways else ax.set_yscale)("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    title = common_description(rows, lay.x_key)
    seeds = f"; {lay.seeds} seeds: line = mean, band = min-max" if lay.x_key and lay.seeds > 1 else ""
    fig.suptitle(title + seeds, fontsize=9)
    if lay.x_key:
        handles, labels = axes[0].get_legend_handles_labels()
        slo = [(h, lab) for h, lab in zip(*axes[3].get_legend_handles_labels()) if lab.startswith("SLO")]
        fig.legend(handles + [h for h, _ in slo], labels + [lab for _, lab in slo],
                   loc="lower center", ncol=min(len(handles) + len(slo), 6), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(*folders: Path, out: Path | None = None, log: bool = False) -> Path | None:
    """Table, comparison.csv and comparison.png of the runs in `folders` (run or sweep folders), written
    into `out` (default: the folder, when there is one)."""
    rows = load_summaries(*folders)
    if not rows:
        return None
    out = Path(out) if out is not None else Path(folders[0])
    out.mkdir(parents=True, exist_ok=True)
    frame = sweep_frame(rows)   # the table is the Python API's sweep frame (dlora_sim.load_sweep)
    cols = [k for k, _, _ in COLUMNS if k in frame] + ["folder"]
    print(format_table(frame[cols].astype(object).where(frame[cols].notna(), None).to_dict("records")))
    frame.reindex(columns=[k for k, _, _ in COLUMNS] + ["folder"]).to_csv(out / "comparison.csv", index=False)
    chart = comparison_chart(rows, out / "comparison.png", log=log)
    found = verdicts(rows)
    if found:
        lines = [v.line() for v in found]
        print("\n".join(lines))
        (out / "verdicts.md").write_text("# Verdicts: dlora against the best other system, per case\n\n"
                                         + "".join(f"- {ln.removeprefix('verdict ')}\n" for ln in lines))
        print(f"verdicts: {(out / 'verdicts.md').resolve()}")
        png = verdict_chart(rows, out / "verdicts.png")
        if png is not None:
            print(f"verdict chart: {png.resolve()}")
    print(f"comparison table: {(out / 'comparison.csv').resolve()}")
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
    ap.add_argument("--log", action="store_true", help="log y axes for the latency and throughput panels")
    args = ap.parse_args(argv)
    if len(args.folders) > 1 and args.out is None:
        ap.error("several folders: say where the comparison goes with --out")
    if compare(*args.folders, out=args.out, log=args.log) is None:
        print(f"dlora-compare: no summary.json in {', '.join(map(str, args.folders))} or their subfolders",
              file=sys.stderr)
        return 1
    return 0
