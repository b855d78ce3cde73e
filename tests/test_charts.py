"""What comparison and run charts plot: series per system over the swept key, seeds pooled, one colour
per system everywhere, titles that name the workload; every chart is drawn from a real run."""
from __future__ import annotations

import pytest

import dlora_sim.plots as plots
from dlora_sim.chart_layout import SYSTEM_COLORS, color, common_description, describe, layout
from dlora_sim.des.engine import run_job
from dlora_sim.compare import compare
from sim_helpers import compose_cfg


def _row(system, rate=None, seed=None, **extra):
    ov = [f"system={system}"] + ([f"workload.rate={rate}"] if rate is not None else []) + \
         ([f"seed={seed}"] if seed is not None else []) + ["charts=false"]
    return {"system": system, "overrides": ov, "mean_latency_s": (rate or 1) * (2 if system == "merged" else 1),
            **extra}


def test_a_numeric_sweep_becomes_one_line_per_system_with_seeds_pooled():
    rows = [_row(sy, r, sd) for sd in (0, 1) for r in (4, 2, 6) for sy in ("dlora", "merged")]
    lay = layout(rows)
    assert lay.x_key == "workload.rate" and lay.seeds == 2 and not lay.bars
    assert [s.label for s in lay.series] == ["dlora", "merged"]
    for s in lay.series:
        assert s.x == [2.0, 4.0, 6.0]                    # sorted along the axis
        assert all(len(runs) == 2 for runs in s.runs)    # both seeds at every point
        assert s.color == SYSTEM_COLORS[s.label]


def test_without_a_numeric_sweep_each_run_is_a_bar_coloured_by_system():
    rows = [_row("slora"), _row("dlora"), _row("custom_a"), _row("custom_b")]
    lay = layout(rows)
    assert lay.x_key is None and [b[0] for b in lay.bars] == ["slora", "dlora", "custom_a", "custom_b"]
    assert lay.bars[1][1] == SYSTEM_COLORS["dlora"]
    assert lay.bars[2][1] != lay.bars[3][1]              # unknown systems still get distinct colours
    assert color("custom_a", ["custom_a", "custom_b"]) == lay.bars[2][1]


def test_a_second_swept_key_joins_the_series_label():
    rows = [_row(sy, r, **{}) | {"overrides": [f"system={sy}", f"workload.rate={r}", f"scheduler.tune={t}"]}
            for sy in ("dlora",) for r in (1, 2) for t in ("true", "false")]
    lay = layout(rows)
    assert lay.x_key == "workload.rate"
    assert sorted(s.label for s in lay.series) == ["scheduler.tune=false", "scheduler.tune=true"]
    assert len({s.color for s in lay.series}) == 2
    assert common_description(rows, lay.x_key).startswith("dlora · ")   # the one system, in the title


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("charts")
    i = 0
    for system in ("slora", "dlora"):
        for rate in (3, 6):
            ov = [f"system={system}", f"workload.rate={rate}", "workload.num_requests=60"]
            run_job(compose_cfg(*ov, "charts=true"), root / str(i), system, ov)
            i += 1
    return root


def test_run_charts_are_titled_and_dlora_gets_modes(sweep):
    for folder, system in ((sweep / "0", "slora"), (sweep / "2", "dlora")):
        names = {p.name for p in folder.glob("*.png")}
        assert {"latency.png", "timeline.png"} <= names
        assert ("modes.png" in names) == (system == "dlora")
    import json
    title = describe(json.loads((sweep / "2" / "summary.json").read_text()))
    for part in ("dlora", "Synthetic", "60 requests", "3 req/s", "16 adapters", "a100-80gb / llama-2-7b",
                 "LoRA cost: kernel"):
        assert part in title


def test_long_runs_are_drawn_as_bins(sweep, monkeypatch):
    monkeypatch.setattr(plots, "MAX_POINTS", 10)   # the aggregated path, on a short run
    paths = plots.run_charts(sweep / "2")
    assert {p.name for p in paths} == {"latency.png", "timeline.png", "modes.png"}
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_sweep_comparison_chart(sweep, capsys):
    chart = compare(sweep)
    assert chart.name == "comparison.png" and chart.stat().st_size > 10_000
    assert "workload.rate=3" in capsys.readouterr().out
