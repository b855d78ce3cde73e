"""The calibration fit recovers the coefficients a cost model generated, through the simulator's own
closed form (calibration.fit and the dlora-calibrate fit of points.csv rows)."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from calibration.calibrate import ITERATION_KEYS, compute_point, fit_profile, predict_compute
from calibration.fit import NOISY_PASSES, Point, coefficient, fit, set_coefficients
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.profile import load_profile

TRUTH = {"iteration.overhead_s": 2.0e-3, "iteration.per_seq_s": 6.0e-5, "iteration.weight_read_s": 1.5e-3,
         "iteration.per_token_s": 3.0e-5, "iteration.per_context_token_s": 4.0e-7,
         "iteration.per_prefill_sq_s": 2.0e-8, "iteration.multi_token_s": 1.0e-3, "lora.kernel.overhead_s": 8.0e-4,
         "lora.kernel.per_adapter_rank_s": 5.0e-6, "lora.kernel.per_token_rank_s": 4.0e-7,
         "lora.kernel.per_adapter_s": 2.0e-4, "lora.kernel.per_call_s": 5.0e-4}


def _rows(profile, rng, noise: float) -> list[dict]:
    """points.csv rows over a microbenchmark-like grid plus random mixed batches, timed by `profile`."""
    cost = CostModel(profile)
    rows = []

    def add(kind, split, prefills, decodes, ctx, distinct, merged, rank=16):
        n = len(prefills) + decodes
        pt = sum(prefills)
        rank_sum = 0 if merged else distinct * rank
        token_rank = 0 if merged else (pt + decodes) * rank
        t = cost.iteration_time(prefill_tokens=pt, prefill_sq=sum(p * p for p in prefills), decode_seqs=decodes,
                                decode_context=decodes * ctx, num_seqs=n, lora_rank_sum=rank_sum,
                                lora_token_rank=token_rank, lora_passes=0 if merged else distinct)
        rows.append({"kind": kind, "split": split, "mode": "merged" if merged else "unmerged", "batch": n,
                     "prefills": len(prefills), "prefill_tokens": pt, "prefill_sq": sum(p * p for p in prefills),
                     "decodes": decodes, "decode_context": decodes * ctx, "distinct": distinct, "rank": rank,
                     "rank_sum": rank_sum, "token_rank": token_rank, "resident_rank_sum": 8 * rank, "bytes": "",
                     "blocks": "", "wall_s": t * (1 + noise * rng.standard_normal()), "device_s": t,
                     "forward_s": t, "mode_s": 0.0, "load_s": 0.0, "swap_s": 0.0, "repeats": 5})

    for n in (1, 2, 4, 8, 16, 32):
        for ctx in (32, 256, 1024):
            add("decode", "fit", [], n, ctx, 1, True)
            for distinct, rank in itertools.product((1, 4, 8), (8, 32)):   # two ranks: per adapter vs per rank
                if distinct <= n:
                    add("decode", "fit", [], n, ctx, distinct, False, rank)
    for seqs in (1, 2, 4):
        for length in (16, 64, 256, 512):
            add("prefill", "fit", [length] * seqs, 0, 0, 1, False)
            add("prefill", "fit", [length] * seqs, 0, 0, 1, True)
    for length, decodes, distinct in itertools.product((32, 256), (2, 8), (1, 3)):   # both kinds: two LoRA calls
        add("mixed", "fit", [length], decodes, 128, distinct, False)
    for split, count in (("fit", 30), ("heldout", 40)):
        for _ in range(count):
            n = int(rng.integers(1, 17))
            pre = [int(x) for x in rng.integers(8, 512, int(rng.integers(0, min(n, 4) + 1)))]
            add("mixed", split, pre, n - len(pre), int(rng.integers(16, 1024)), int(rng.integers(1, 5)), False)
    for kind, secs in (("merge", 1e-3), ("unmerge", 2e-4), ("switch", 1.1e-3)):
        rows.append({**{k: "" for k in rows[0]}, "kind": kind, "split": "fit", "mode_s": secs, "wall_s": secs})
    for b in (1, 4, 16):
        rows.append({**{k: "" for k in rows[0]}, "kind": "load", "split": "fit", "bytes": b * 1e6,
                     "load_s": 1e-3 + b * 1e6 / 2e9, "wall_s": 0})
        rows.append({**{k: "" for k in rows[0]}, "kind": "swap", "split": "fit", "bytes": b * 32768,
                     "swap_s": 5e-5 + b * 32768 / 4e9, "wall_s": 0})
    return rows


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_fit_recovers_known_coefficients_within_5_percent(noise):
    base = load_profile("cpu-tiny")
    truth = set_coefficients(base, TRUTH)
    rows = _rows(truth, np.random.default_rng(0), noise)
    meta = {"device": "synthetic", "date": "2026-12-01 00:00:00", "backend": "torch", "dtype": "float32",
            "versions": {"torch": "-", "triton": "-"}}
    raw, report = fit_profile(rows, base, "0" * 64, meta)
    for key in ITERATION_KEYS:
        assert report["coefficients"][key] == pytest.approx(coefficient(truth, key), rel=0.05), key
    assert report["held_out"]["mean_abs_rel"] < max(2 * noise, 1e-4) + 0.005
    assert raw["switch"] == {"merge_s": 1e-3, "unmerge_s": 2e-4, "switch_s": 1.1e-3}
    assert report["load"]["overhead_s"] == pytest.approx(1e-3, rel=0.05)
    assert report["load"]["bytes_per_s"] == pytest.approx(2e9, rel=0.05)
    assert report["swap"]["bytes_per_s"] == pytest.approx(4e9, rel=0.05)
    assert raw["provenance"]["source"] == "measured"


def test_held_out_served_iterations_stay_out_of_the_fit_and_are_reported():
    """Served iterations of a held-out replay, however far off, leave the coefficients as they are and
    show up in the report's bias by kind; fit ones join the fit."""
    base = load_profile("cpu-tiny")
    rows = _rows(set_coefficients(base, TRUTH), np.random.default_rng(0), 0.0)
    meta = {"device": "synthetic", "date": "2026-12-01 00:00:00", "backend": "torch", "dtype": "float32",
            "versions": {"torch": "-", "triton": "-"}}
    _, plain = fit_profile(rows, base, "0" * 64, meta)
    served = [{**r, "kind": "served", "split": "heldout", "wall_s": 10 * float(r["wall_s"])}
              for r in rows if r["kind"] == "mixed"]
    _, with_held = fit_profile(rows + served, base, "0" * 64, meta)
    assert with_held["coefficients"] == plain["coefficients"] and with_held["fit_points"] == plain["fit_points"]
    (held,) = [b for b in with_held["by_kind"] if b["kind"] == "served"]
    assert held["split"] == "heldout" and held["n"] == len(served) and held["sum_bias"] == pytest.approx(-0.9, abs=0.01)
    assert with_held["microbenchmarks_alone"]["in_sample"] == plain["in_sample"]
    fitted = [{**r, "split": "fit"} for r in served]
    _, with_fit = fit_profile(rows + fitted, base, "0" * 64, meta)
    assert with_fit["fit_points"] == plain["fit_points"] + len(fitted)
    assert with_fit["coefficients"] != plain["coefficients"]


def test_set_coefficients_names_bad_keys():
    base = load_profile("cpu-tiny")
    with pytest.raises(KeyError, match="not a profile coefficient"):
        set_coefficients(base, {"overhead_s": 1.0})
    moved = set_coefficients(base, {"lora.kernel.overhead_s": 1.0, "switch.merge_s": 2.0})
    assert moved.lora.overhead_s == 1.0 and moved.switch.merge_s == 2.0
    assert dataclasses.replace(moved, lora_paths=base.lora_paths).lora == base.lora


def test_a_fit_to_noisy_points_charges_their_mean_not_less():
    """Timing noise skewed slow (lognormal, 25% spread, mean 1): least squares on error relative to the
    measured time (one pass) lands well under the points' total; relative to the previous pass's
    prediction (dlora-calibrate's passes), the fitted total matches the measured one."""
    base = load_profile("cpu-tiny").with_lora_path("kernel")
    truth = set_coefficients(base, TRUTH)
    rng = np.random.default_rng(3)
    exact = [compute_point(r) for r in _rows(truth, rng, 0.0) if r["kind"] in ("decode", "prefill", "mixed")]
    sigma = 0.25
    noisy = [Point(p.features, p.seconds * float(np.exp(sigma * rng.standard_normal() - sigma ** 2 / 2)))
             for p in exact for _ in range(4)]

    def total_bias(res) -> float:
        cost = CostModel(res.profile)
        return sum(predict_compute(cost, p) for p in noisy) / sum(p.seconds for p in noisy) - 1

    assert total_bias(fit(base, ITERATION_KEYS, noisy, predict_compute, passes=1)) < -0.05
    assert abs(total_bias(fit(base, ITERATION_KEYS, noisy, predict_compute, passes=NOISY_PASSES))) < 0.02
    with pytest.raises(ValueError, match="passes"):
        fit(base, ITERATION_KEYS, noisy, predict_compute, passes=0)


def test_served_iterations_and_microbenchmark_points_weigh_alike_however_many_served_there_are():
    """Served iterations 30% dearer than the microbenchmarks' points of the same features, 10 times as
    many: weighed alike (each source's weights sum to the same), the fit prices both sources about as far
    off, in opposite directions; unweighted, the served ones would pull it almost all the way."""
    from calibration.calibrate import source_weights
    base = load_profile("cpu-tiny")
    rows = _rows(set_coefficients(base, TRUTH), np.random.default_rng(0), 0.0)
    meta = {"device": "synthetic", "date": "2026-12-01 00:00:00", "backend": "torch", "dtype": "float32",
            "versions": {"torch": "-", "triton": "-"}}
    micro = [r for r in rows if r["kind"] in ("decode", "prefill", "mixed") and r["split"] == "fit"]
    served = [{**r, "kind": "served", "wall_s": 1.3 * float(r["wall_s"])} for r in micro for _ in range(10)]
    _, report = fit_profile(rows + served, base, "0" * 64, meta)
    bias = {b["kind"]: b["sum_bias"] for b in report["by_kind"] if b["split"] == "fit"}
    assert 0.10 < bias["decode"] < 0.20 and 0.10 < bias["mixed"] < 0.20
    assert -0.15 < bias["served"] < -0.08
    plain = fit(base.with_lora_path("kernel"), ITERATION_KEYS, [compute_point(r) for r in micro + served],
                predict_compute, passes=NOISY_PASSES)   # unweighted
    cost, pts = CostModel(plain.profile), [compute_point(r) for r in micro]
    assert sum(predict_compute(cost, p) for p in pts) / sum(p.seconds for p in pts) - 1 > 0.22
    weights = source_weights(["decode", "served", "served", "mixed", "served", "served"])
    assert weights == [2.0, 1.0, 1.0, 2.0, 1.0, 1.0] and source_weights(["decode", "mixed"]) is None
    with pytest.raises(ValueError, match="weights must be 2 numbers > 0"):
        fit(base, ITERATION_KEYS, [compute_point(r) for r in micro[:2]], predict_compute, weights=[1.0, 0.0])
