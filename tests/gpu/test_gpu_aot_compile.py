"""Every kernel compiles for sm_90 through the real Triton pipeline, on a machine without a GPU.

The interpreter accepts code the compiler rejects; CI never has a GPU, so this is where compile
errors in the CUDA path would surface before a GPU session. Runs in a subprocess because this test
session has TRITON_INTERPRET=1 set (kernels there are interpreted, not compilable).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
if torch.cuda.is_available():
    pytest.skip("a GPU is present: the other tests compile and run the real kernels",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "dlora_gpu.kernels.aot_check", "--arch", "90",
                          "--dtypes", "bf16,fp32"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == 10
