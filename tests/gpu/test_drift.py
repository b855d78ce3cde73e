"""The drift probes' timing rules (what they return of their runs) and the drift factors they give."""
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


def test_the_reference_probe_is_a_step_of_the_runtimes_own_model_on_a_cache_of_its_own():
    """It runs the model the executor serves with (its shape named in the description, which a profile
    records), on scratch sequences: the serving cache's blocks and the replica state are untouched."""
    from dlora_sim.core.config import compose
    from dlora_gpu.cli import build_engine
    engine = build_engine(compose(["system=slora", "workload.num_requests=2"], "serve"))
    ex = engine.workers.workers[0].ex   # one replica: its worker runs in this process
    free, seqs = ex.kv.num_free(), ex.kv.sequences()
    probe = drift.reference_probe(ex.model, ex.backend)
    assert probe.model is ex.model and probe() > 0 and probe() > 0   # real runs time something
    assert ex.kv.num_free() == free and ex.kv.sequences() == seqs
    assert engine.replicas[0].free_blocks == engine.replicas[0].total_blocks
    assert "decode step of 8 sequence(s) at context 128" in probe.describe()
    assert f"hidden {ex.model.cfg.hidden_size}" in probe.describe()


def test_drift_factors_divide_the_reference_by_the_median_of_the_recent_probes():
    probe = drift.DispatchProbe()
    _scripted(probe, [1.0, 2.0, 4.0, 4.0])
    scale = drift.DriftScale(2.0, probe, window=3)
    assert [scale.factor() for _ in range(4)] == [2.0, 2.0 / 1.5, 1.0, 0.5]   # medians of [1], [1, 2], [1, 2, 4], [2, 4, 4]
    assert scale.times == [1.0, 2.0, 4.0, 4.0]   # every probe, for the session's median
    s = scale.summary()
    assert s["factors"] == 4 and s["factor_min"] == 0.5 and s["factor_max"] == 2.0
    with pytest.raises(ValueError, match="must be > 0"):
        drift.DriftScale(0.0, probe)
