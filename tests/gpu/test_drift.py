"""The reference probe's timing rules (what it returns of its runs) and the drift factors it gives."""
from __future__ import annotations

import pytest

from dlora_gpu import drift


def _scripted(probe: drift.DispatchProbe, times: list[float]) -> list[float]:
    """Make the probe's chain return `times` in turn; returns the list it consumes, for inspection."""
    left = list(times)
    probe._chain = lambda: left.pop(0)
    return left


def test_a_warm_probe_discards_its_first_run_and_returns_the_fastest_of_the_rest():
    probe = drift.DispatchProbe(warm=2)
    left = _scripted(probe, [0.9, 0.5, 0.4, 0.1, 0.3, 0.6])
    assert probe() == 0.4 and probe() == 0.3 and left == []   # 0.9 and 0.1 are the untimed warm-up runs
    cold = drift.DispatchProbe()
    _scripted(cold, [0.9, 0.5])
    assert cold() == 0.9   # one run, as it comes


def test_the_reference_probe_is_the_warm_chain_and_says_so():
    probe = drift.reference_probe()
    assert probe.warm == 2 and "fastest of 2 after a warm-up run" in probe.describe()
    assert probe() > 0   # a real run times something


def test_drift_factors_divide_the_reference_by_the_median_of_the_recent_probes():
    probe = drift.DispatchProbe()
    _scripted(probe, [1.0, 2.0, 4.0, 4.0])
    scale = drift.DriftScale(2.0, probe, window=3)
    assert [scale.factor() for _ in range(4)] == [2.0, 2.0 / 1.5, 1.0, 0.5]   # medians of [1], [1, 2], [1, 2, 4], [2, 4, 4]
    s = scale.summary()
    assert s["factors"] == 4 and s["factor_min"] == 0.5 and s["factor_max"] == 2.0
    with pytest.raises(ValueError, match="must be > 0"):
        drift.DriftScale(0.0, probe)
