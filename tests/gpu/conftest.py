"""GPU-runtime tests: real Triton kernels on CUDA when present, else under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton picks compiled vs interpreted
kernels when `@triton.jit` runs), hence at conftest import time, before any test module loads.
Without torch or triton (the simulator-only install) this folder is not collected.
"""

import importlib.util
import os

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # Tiny CPU matmuls only lose from intra-op threads, badly so on a busy 2-core runner.
        torch.set_num_threads(1)

    @pytest.fixture
    def device() -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    @pytest.fixture(scope="session")
    def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory):
        """A tiny random HF Llama (GQA) saved as safetensors; see runtime_helpers.HF_TINY."""
        pytest.importorskip("transformers")
        from runtime_helpers import save_hf_checkpoint

        return save_hf_checkpoint(tmp_path_factory.mktemp("hf-tiny"))
