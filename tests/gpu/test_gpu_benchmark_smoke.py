"""The kernel benchmark's logic on CPU (torch path, tiny shapes): it must run and write its CSV.

No timing is checked -- CPU numbers mean nothing here; the point is that the script the GPU session
depends on does not rot between GPU runs.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_benchmark_cpu_smoke(tmp_path: Path) -> None:
    from benchmarks.kernels import main

    out = tmp_path / "k.csv"
    args = ["--device", "cpu", "--quick", "--shapes", "tiny", "--reps", "1", "--max-seconds", "0",
            "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader(out.open()))
    sections = {r["section"] for r in rows}
    assert sections == {"copy", "layer", "lora", "merge"}
    methods = {r["method"] for r in rows if r["section"] == "lora"}
    assert methods == {"lora_bgmv", "lora_sgmv", "einsum_resident", "gather_bmm", "unmerged"}
    assert all(float(r["time_us"]) > 0 for r in rows)


def test_benchmark_refuses_cuda_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from benchmarks.kernels import main

    assert main(["--out", "/nonexistent/never-written.csv"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
