"""Charts from results folders. Plots read files; they never rerun a simulation."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _read(path: Path) -> dict[str, list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [r[k] for r in rows] for k in (rows[0].keys() if rows else [])}


def _floats(xs: Sequence[str]) -> np.ndarray:
    return np.array([float(x) for x in xs if x != ""], dtype=float)


def run_charts(folder: Path) -> list[Path]:
    """latency.png (CDFs of latency, TTFT and s/token) and timeline.png (batch size and mode per replica)."""
    folder = Path(folder)
    out = []
    req = _read(folder / "requests.csv")
    if req:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, key, label in zip(axes, ("latency_s", "ttft_s", "s_per_token"),
                                  ("end-to-end latency (s)", "time to first token (s)", "latency / output token (s)")):
            v = np.sort(_floats(req[key]))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size)
            ax.set_xlabel(label)
            ax.set_ylabel("CDF")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(folder / "latency.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    it = _read(folder / "iterations.csv")
    if it:
        rep = np.array([int(x) for x in it["replica"]])
        start, bs = _floats(it["start_s"]), _floats(it["batch_size"])
        merged = np.array([m == "merged" for m in it["mode"]])
        reps = sorted(set(rep.tolist()))[:8]
        fig, axes = plt.subplots(len(reps), 1, figsize=(12, 1.8 * len(reps) + 0.6), sharex=True, squeeze=False)
        for ax, j in zip(axes[:, 0], reps):
            m = rep == j
            ax.scatter(start[m & ~merged], bs[m & ~merged], s=2, label="unmerged", color="tab:blue")
            ax.scatter(start[m & merged], bs[m & merged], s=2, label="merged", color="tab:orange")
            ax.set_ylabel(f"replica {j}\nbatch")
        axes[0, 0].legend(loc="upper right", markerscale=4)
        axes[-1, 0].set_xlabel("simulated time (s)")
        fig.tight_layout()
        out.append(folder / "timeline.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
        if "theta_left" in it and "theta_right" in it:
            out.append(mode_threshold_chart(folder, it=it))
    return out


def mode_threshold_chart(folder: Path, replica: int = 0, it: dict[str, list[str]] | None = None) -> Path:
    """modes.png: one replica's mode (unmerged / merged on adapter k / forced by credits) and the
    dlora thresholds theta_left, theta_right over time, from iterations.csv."""
    folder = Path(folder)
    it = it if it is not None else _read(folder / "iterations.csv")
    m = np.array([int(x) == replica for x in it["replica"]])
    if "theta_left" not in it or not m.any():
        raise ValueError(f"{folder / 'iterations.csv'}: no dlora thresholds for replica {replica}")
    start = _floats(it["start_s"])[m]
    merged = np.array([x == "merged" for x in it["mode"]])[m]
    adapter = np.array([float(a) if a != "" else np.nan for a in it["merged_adapter"]])[m]
    forced = np.array([x == "1" for x in it["forced"]])[m]
    left = np.array([float(x) if x != "" else np.nan for x in it["theta_left"]])[m]
    right = np.array([float(x) if x != "" else np.nan for x in it["theta_right"]])[m]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(12, 4.8), sharex=True, height_ratios=[1, 1.2])
    ax0.scatter(start[merged], adapter[merged], s=3, color="tab:orange", label="merged on adapter")
    ax0.scatter(start[~merged], np.full((~merged).sum(), -1), s=3, color="tab:blue", label="unmerged")
    ax0.scatter(start[forced], np.full(forced.sum(), -2), s=3, color="tab:red", label="forced by credits (either mode)")
    ax0.set_ylabel("merged adapter\n(-1 unmerged,\n-2 forced)")
    ax0.legend(loc="upper right", markerscale=4, fontsize=8)
    ax1.step(start, left, where="post", label="theta_left (stay merged)")
    ax1.step(start, right, where="post", label="theta_right (merge)")
    ax1.set_ylabel("threshold (x |F|)")
    ax1.set_xlabel("simulated time (s)")
    ax1.legend(loc="upper right", fontsize=8)
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.suptitle(f"replica {replica}: dlora mode and thresholds", fontsize=10)
    fig.tight_layout()
    path = folder / "modes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
