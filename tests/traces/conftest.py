"""Fixtures for trace tests: where the real traces are (skip when absent) and small generated files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))  # trace_files.py helpers, whatever the import mode


def shared_traces_dir() -> Path | None:
    """$DLORA_SHARED_TRACES when set (authoritative, so a bad value skips), else <repo>/../shared/traces."""
    env = os.environ.get("DLORA_SHARED_TRACES")
    cand = Path(env) if env else REPO.parent / "shared" / "traces"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_traces_dir()
    if d is None:
        pytest.skip("real traces not available (../shared/traces or $DLORA_SHARED_TRACES)")
    return d
