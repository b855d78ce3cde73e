"""Adapter mappings: dLoRA's map_stride, identity, explicit files and popularity draws."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from dlora_sim.traces import TraceFormatError
from dlora_sim.traces.mapping import AdapterMapping, map_stride, rank_keys
from dlora_sim.traces.stats import gini
from dlora_sim.workload.popularity import powerlaw_weights, zipf_weights

RNG = np.random.default_rng(0)


def _keys(counts: dict[str, int]) -> np.ndarray:
    return np.array([k for k, n in counts.items() for _ in range(n)], dtype=object)


def test_rank_keys_by_popularity_then_name():
    ranked, rank = rank_keys(np.array(["b", "a", "c", "c", "b", "c"], dtype=object))
    assert ranked.tolist() == ["c", "b", "a"]  # c:3, b:2, a:1
    assert rank.tolist() == [1, 2, 0, 0, 1, 0]


@given(st.integers(1, 200), st.integers(1, 16), st.integers(1, 8))
def test_map_stride_chunks_round_robin(num_keys, adapters, stride):
    m = map_stride(num_keys, adapters, stride)
    for r in range(num_keys):
        assert m[r] == (r // stride) % adapters
    # each chunk of `stride` consecutive keys shares one adapter
    assert all(len(set(m[i:i + stride])) == 1 for i in range(0, num_keys, stride))


def test_larger_stride_means_more_skew():
    """With Zipf-popular functions, more hot functions land on adapter 0 as the stride grows."""
    counts = {f"f{i:03d}": int(1000 / (i + 1)) + 1 for i in range(256)}
    keys = _keys(counts)
    ginis = []
    for stride in (1, 4, 16):
        a, k = AdapterMapping("map_stride", 16, stride).assign(keys, len(keys), RNG)
        ginis.append(gini(np.bincount(a, minlength=k)))
    assert ginis[0] < ginis[1] < ginis[2]


def test_identity_one_key_one_adapter_by_rank():
    keys = _keys({"7": 5, "3": 9, "11": 1})
    a, k = AdapterMapping("identity").assign(keys, len(keys), RNG)
    assert k == 3
    assert set(a[keys == "3"]) == {0} and set(a[keys == "7"]) == {1} and set(a[keys == "11"]) == {2}


def test_explicit_mapping_file(tmp_path):
    f = tmp_path / "map.csv"
    f.write_text("key,adapter\nx,2\ny,0\n")
    keys = _keys({"x": 2, "y": 3})
    a, k = AdapterMapping("explicit", file=str(f)).assign(keys, len(keys), RNG)
    assert k == 3 and set(a[keys == "x"]) == {2} and set(a[keys == "y"]) == {0}
    with pytest.raises(ValueError, match="'z'"):
        AdapterMapping("explicit", file=str(f)).assign(_keys({"z": 1}), 1, RNG)
    f.write_text("key,adapter\nx,2\nx,1\n")
    with pytest.raises(TraceFormatError, match="duplicate") as err:
        AdapterMapping("explicit", file=str(f)).assign(keys, len(keys), RNG)
    assert err.value.line == 3


@pytest.mark.parametrize("kind,param,weights", [("zipf", 1.2, zipf_weights(8, 1.2)), ("powerlaw", 2.0, powerlaw_weights(8, 2.0))])
def test_popularity_draws_follow_weights(kind, param, weights):
    a, k = AdapterMapping(kind, 8, skew=param).assign(None, 40000, np.random.default_rng(1))
    assert k == 8
    np.testing.assert_allclose(np.bincount(a, minlength=8) / 40000, weights, atol=0.01)


def test_keyed_mapping_on_keyless_trace_is_an_error():
    with pytest.raises(ValueError, match="source key"):
        AdapterMapping("map_stride", 4).assign(None, 10, RNG)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown mapping"):
        AdapterMapping("roundrobin", 4)
    with pytest.raises(ValueError, match="num_adapters"):
        AdapterMapping("zipf", None)
    with pytest.raises(ValueError, match="map_stride"):
        AdapterMapping("map_stride", 4, 0)
