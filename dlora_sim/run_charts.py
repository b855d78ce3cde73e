"""A run folder's charts, drawn by every app after its results are written (`finish_job`'s `charts`).

Its own module, so that importing it costs nothing: matplotlib loads only when charts are drawn."""
from __future__ import annotations

from pathlib import Path


def draw_run_charts(out: Path) -> None:
    from dlora_sim.plots import run_charts
    run_charts(out)
