"""benchmarks/production_stack.py reads a finished sweep's CSVs and the runs they name: capacities and fixed-load
TTFTs land in the right cells, and every cell where dLoRA does not win is said (a hand-made sweep folder)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import production_stack as ps  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


CONFIG = {"cluster": {"num_replicas": 8, "replica": {"host_adapter_cache": 32}}, "profile": {"hardware": "a100-80gb"},
          "model": {"name": "llama-2-7b"}, "slo_s_per_token": 0.5,
          "workload": {"model": "m-large", "start_s": 72000.0, "end_s": 72300.0, "lengths": {"trace": "azure_conv"},
                       "mapping": "zipf", "skew": 1.0, "rank": 16, "shared_prefix_by": "adapter",
                       "shared_prefix_tokens": 1024}}


def _run(folder: Path, p99_ttft: float, **extra) -> str:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"config": CONFIG,
        "offered_rps": 9.0, "completed": 100, "mean_ttft_s": p99_ttft / 4, "p99_ttft_s": p99_ttft,
        "mean_s_per_token": 0.1, "slo_attainment": 1.0, "num_adapter_loads": 7, **extra}))
    return str(folder)


def sweep(tmp_path: Path) -> Path:
    """dlora and vllm_lora at 64 adapters, base and prefix caching: dLoRA serves more in base and less with
    prefix caching; its P99 TTFT at the fixed load is lower in base, higher with prefix caching."""
    caps = {("dlora", "base"): (0.08, 37.0), ("vllm_lora", "base"): (0.06, 28.0),
            ("dlora", "prefix_caching"): (0.1, 46.0), ("vllm_lora", "prefix_caching"): (0.12, 55.0)}
    ttft = {("dlora", "base"): 1.0, ("vllm_lora", "base"): 2.0, ("dlora", "prefix_caching"): 3.0,
            ("vllm_lora", "prefix_caching"): 0.5}
    cap_rows, probes, fixed = [], [], []
    for j, ((system, arm), (scale, rps)) in enumerate(caps.items()):
        label = f"system={system} +stack={arm}"
        arm_args = f"{label} workload.num_adapters=64"
        cap_rows.append({"arm": arm_args, "run_length": 1.0, "capacity_rps": rps, "capacity_rate_scale": scale,
                         "first_failed_rate_scale": scale * 1.1, "probes": 2})
        probes += [{"arm": arm_args, "rate": scale, "met": "True", "folder": _run(tmp_path / f"c{j}", 9.0 + j)},
                   {"arm": arm_args, "rate": scale * 1.1, "met": "False", "folder": _run(tmp_path / f"d{j}", 99.0)}]
        fixed.append({"arm": arm_args, "workload.rate_scale": 0.02,
                      "folder": _run(tmp_path / f"f{j}", ttft[system, arm], prefix_hit_share=0.25)})
    _write(tmp_path / "capacity.csv", cap_rows)
    _write(tmp_path / "capacity_probes.csv", probes)
    _write(tmp_path / "fixed_load.csv", fixed)
    return tmp_path


def test_the_report_puts_each_number_in_its_cell_and_says_where_dlora_loses(tmp_path):
    rows = ps.load(sweep(tmp_path))
    text = ps.report(rows, tmp_path)
    assert "| 64 | base | 37 | 28 | 1.32x |" in text
    assert "| 64 | prefix caching | 46 | 55 | 0.84x |" in text
    assert "| 64 | base | 9 | 10 |" in text   # P99 TTFT of the run at each capacity
    loss = text.split("## Where dLoRA does not win")[1]
    assert "64 adapters, prefix caching: capacity 46 req/s, below vLLM, least loaded 55" in loss
    assert "64 adapters, prefix caching, rate_scale 0.02: P99 TTFT 3 s, above vLLM, least loaded 0.5 s" in loss
    assert "base" not in loss   # dLoRA wins both there
    assert text.startswith("# production_stack: dLoRA against today's LoRA serving stacks (8 a100-80gb / llama-2-7b")
    assert "trace seconds 72000-72300" in text and "1,024-token system prompt" in text
    files = ps.write(rows, tmp_path / "out", tmp_path) if (tmp_path / "out").mkdir() is None else []
    assert all((tmp_path / "out" / f).exists() for f in files) and len(files) == 5
