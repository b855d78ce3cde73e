"""Fixtures for trace tests: where the real traces are (skip when absent) and small generated files."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))  # trace_files.py helpers, whatever the import mode


def trace_dirs() -> list[Path]:
    """Every folder the registry looks in, in its order: $DLORA_TRACE_DIR, the user cache (where
    `dlora-trace fetch` puts traces), $DLORA_SHARED_TRACES or else <repo>/../shared/traces."""
    from dlora_sim.traces.registry import search_dirs
    return [d for d in search_dirs() if d.is_dir()]


@pytest.fixture(scope="session")
def shared() -> list[Path]:
    dirs = trace_dirs()
    if not dirs:
        pytest.skip("real traces not available ($DLORA_TRACE_DIR, the user cache, $DLORA_SHARED_TRACES, ../shared)")
    return dirs
