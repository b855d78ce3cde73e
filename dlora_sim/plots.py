"""Charts from results folders. Plots read files; they never rerun a simulation."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dlora_sim.chart_layout import color, describe  # noqa: E402


def _read(path: Path) -> dict[str, list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [r[k] for r in rows] for k in (rows[0].keys() if rows else [])}


def _floats(xs: Sequence[str]) -> np.ndarray:
    return np.array([float(x) for x in xs if x != ""], dtype=float)


def _summary(folder: Path) -> dict:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


CLOCKS = {"real": "wall-clock time (s, real clock)", "measured": "time (s, measured clock: the steps' own times)",
          "virtual": "time (s, virtual clock: the cost model's prices)"}


def time_axis(summary: dict) -> str:
    """The x label of a time axis: simulated time, or the runtime's clock by name."""
    return CLOCKS.get(str(summary.get("clock")), "simulated time (s)")


def run_charts(folder: Path) -> list[Path]:
    """latency.png (CDFs of latency, TTFT and s/token, the SLO marked), timeline.png (batch size and
    mode per replica) and, for dlora, modes.png; titled from the folder's summary.json."""
    folder = Path(folder)
    out = []
    summary = _summary(folder)
    title = describe(summary) if summary else folder.name
    req = _read(folder / "requests.csv")
    if req:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, key, label in zip(axes, ("latency_s", "ttft_s", "s_per_token"),
                                  ("end-to-end latency (s)", "time to first token (s)", "latency / output token (s)")):
            v = np.sort(_floats(req[key]))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, color=color(str(summary.get("system", ""))))
            if key == "s_per_token" and summary.get("slo_s_per_token"):
                slo = summary["slo_s_per_token"]
                ax.axvline(slo, color="k", ls="--", lw=1,
                           label=f"SLO {slo:g} s/token ({summary.get('slo_attainment', 0):.1%} met)")
                ax.legend(fontsize=8, loc="lower right")
            ax.set_xlabel(label)
            ax.set_ylabel("CDF of finished requests")
            ax.grid(alpha=0.3)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        out.append(folder / "latency.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    it = _read(folder / "iterations.csv")
    if it:
        out.append(_timeline(folder, it, title))
        if "theta_left" in it and "theta_right" in it:
            out.append(mode_threshold_chart(folder, it=it, title=title))
    return out


MAX_POINTS = 4000   # per replica and series: longer runs are drawn as per-bin aggregates, not dots


def _bins(start: np.ndarray, n: int) -> np.ndarray:
    lo, hi = float(start.min()), float(start.max())
    return np.linspace(lo, hi if hi > lo else lo + 1.0, n + 1)


def _timeline(folder: Path, it: dict[str, list[str]], title: str) -> Path:
    rep = np.array([int(x) for x in it["replica"]])
    start, bs = _floats(it["start_s"]), _floats(it["batch_size"])
    merged = np.array([m == "merged" for m in it["mode"]])
    reps = sorted(set(rep.tolist()))
    shown = reps[:8]
    fig, axes = plt.subplots(len(shown), 1, figsize=(12, 1.6 * len(shown) + 1.0), sharex=True, squeeze=False)
    edges = _bins(start, 300)
    for ax, j in zip(axes[:, 0], shown):
        m = rep == j
        if m.sum() <= MAX_POINTS:
            ax.scatter(start[m & ~merged], bs[m & ~merged], s=2, label="unmerged", color="tab:blue")
            ax.scatter(start[m & merged], bs[m & merged], s=2, label="merged", color="tab:orange")
        else:   # mean batch per bin; shading = share of iterations merged
            idx = np.clip(np.digitize(start[m], edges) - 1, 0, len(edges) - 2)
            count = np.bincount(idx, minlength=len(edges) - 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_bs = np.bincount(idx, bs[m], len(edges) - 1) / count
                share = np.bincount(idx, merged[m].astype(float), len(edges) - 1) / count
            mid = (edges[:-1] + edges[1:]) / 2
            ax.plot(mid, mean_bs, color="k", lw=1, label="mean batch size (per bin)")
            top = np.nanmax(bs[m])
            ax.fill_between(mid, 0, np.nan_to_num(share) * top, color="tab:orange", alpha=0.35, lw=0,
                            label="share of iterations merged (scaled)")
        ax.set_ylabel(f"replica {j}\nbatch", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", markerscale=4, fontsize=7)
    axes[-1, 0].set_xlabel(time_axis(_summary(folder)))
    return _save(fig, folder / "timeline.png", title, shown, len(reps))


def _save(fig, path: Path, title: str, shown: list[int], replicas: int) -> Path:
    """Title (saying which replicas are drawn when not all are), lay out, write, close."""
    more = f" (replicas {shown[0]}-{shown[-1]} of {replicas})" if replicas > len(shown) else ""
    fig.suptitle(f"{title}{more}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mode_threshold_chart(folder: Path, it: dict[str, list[str]] | None = None, title: str | None = None,
                         max_replicas: int = 4) -> Path:
    """modes.png for dlora runs, per replica (up to `max_replicas`), in time bins so long runs read:
    the share of iterations merged and forced by credits; which adapter is merged (its own axis); and
    the thresholds theta_left / theta_right, from iterations.csv."""
    folder = Path(folder)
    it = it if it is not None else _read(folder / "iterations.csv")
    if "theta_left" not in it or not it["replica"]:
        raise ValueError(f"{folder / 'iterations.csv'}: no dlora thresholds")
    title = title if title is not None else (describe(_summary(folder)) or folder.name)
    rep = np.array([int(x) for x in it["replica"]])
    start = _floats(it["start_s"])
    merged = np.array([x == "merged" for x in it["mode"]])
    adapter = np.array([float(a) if a != "" else np.nan for a in it["merged_adapter"]])
    forced = np.array([x == "1" for x in it["forced"]])
    left = np.array([float(x) if x != "" else np.nan for x in it["theta_left"]])
    right = np.array([float(x) if x != "" else np.nan for x in it["theta_right"]])
    reps = sorted(set(rep.tolist()))[:max_replicas]
    top_id = int(np.nanmax(adapter)) if np.isfinite(adapter).any() else 0
    both = np.concatenate([left[np.isfinite(left)], right[np.isfinite(right)]])
    pad = 0.05 * (both.max() - both.min()) + 1e-3 if both.size else 0.1
    theta_lim = (both.min() - pad, both.max() + pad) if both.size else (0, 1)
    edges = _bins(start, 200)
    mid = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(3, len(reps), figsize=(max(12, 4.2 * len(reps)), 6.6), sharex=True,
                             squeeze=False, height_ratios=[1, 1.1, 1.1])
    for col, j in enumerate(reps):
        m = rep == j
        idx = np.clip(np.digitize(start[m], edges) - 1, 0, len(edges) - 2)
        count = np.bincount(idx, minlength=len(mid)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            share_m = np.bincount(idx, merged[m].astype(float), len(mid)) / count
            share_f = np.bincount(idx, forced[m].astype(float), len(mid)) / count
        ax0, ax1, ax2 = axes[:, col]
        ax0.fill_between(mid, 0, np.nan_to_num(share_m), step="mid", color="tab:orange", alpha=0.5, lw=0,
                         label="merged")
        ax0.step(mid, share_f, where="mid", color="tab:red", lw=1, label="forced by credits")
        ax0.set_ylim(0, 1.02)
        ax0.set_title(f"replica {j}", fontsize=9)
        # merged adapter: each bin's most frequent one, dot size = the share of the bin it holds
        am = adapter[m]
        for b in range(len(mid)):
            sel = (idx == b) & merged[m]
            if sel.any():
                ids, n = np.unique(am[sel], return_counts=True)
                ax1.scatter(mid[b], ids[np.argmax(n)], s=4 + 24 * n.max() / count[b], color="tab:orange")
        ax1.set_ylim(-0.5, top_id + 0.5)
        ax1.yaxis.get_major_locator().set_params(integer=True)
        ax2.set_ylim(*theta_lim)
        ax2.step(start[m], left[m], where="post", color="tab:purple", label="theta_left (stay merged)")
        ax2.step(start[m], right[m], where="post", color="tab:green", label="theta_right (merge)")
        ax2.set_xlabel(time_axis(_summary(folder)))
        for ax in (ax0, ax1, ax2):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("share of\niterations", fontsize=8)
    axes[1, 0].set_ylabel("merged adapter\n(most frequent in bin)", fontsize=8)
    axes[2, 0].set_ylabel("threshold (x |F|)", fontsize=8)
    axes[0, -1].legend(loc="upper right", fontsize=7)
    axes[2, -1].legend(loc="upper right", fontsize=7)
    return _save(fig, folder / "modes.png", f"dlora modes and thresholds: {title}", reps, len(set(rep.tolist())))
