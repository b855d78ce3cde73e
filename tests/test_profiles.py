"""Profiles: the analytic generator reproduces the committed files and the published anchor."""
from __future__ import annotations

import dataclasses

import pytest

from calibration.analytic import HARDWARE, MODELS, main as generate
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.core.profile import ProfileError, load_profile


def test_committed_analytic_profiles_are_regenerated_exactly(tmp_path):
    generate(["--out", str(tmp_path), "--date", "2026-12-01"])
    for hw in HARDWARE:
        for model in MODELS:
            name = f"{hw}-{model}.yaml"
            assert (tmp_path / name).read_text() == (PROFILES_DIR / name).read_text(), name


def test_a100_llama7b_reproduces_the_dlora_anchor_on_the_einsum_path():
    cost = CostModel(load_profile("a100-80gb-llama-2-7b").with_lora_path("einsum"))
    assert cost.decode_time(16, 512) == pytest.approx(0.015, abs=1e-6)
    assert cost.decode_time(16, 512, merged=False, distinct_adapters=8, resident_adapters=8) == pytest.approx(0.027, abs=1e-6)
    assert cost.mode_change_time(None, 3) == pytest.approx(0.020, abs=1e-6)
    assert cost.mode_change_time(3, 4) == pytest.approx(0.040, abs=1e-6)


def test_costs_follow_hardware_and_model():
    a7, h7 = CostModel(load_profile("a100-80gb-llama-2-7b")), CostModel(load_profile("h200-llama-2-7b"))
    a13 = CostModel(load_profile("a100-80gb-llama-2-13b"))
    assert h7.decode_time(64, 512) < a7.decode_time(64, 512) < a13.decode_time(64, 512)
    assert h7.mode_change_time(None, 0) < a7.mode_change_time(None, 0) < a13.mode_change_time(None, 0)
    # unmerged overhead grows with the number of distinct adapters, merged has none
    assert a7.decode_time(32, 512, False, 1) < a7.decode_time(32, 512, False, 32)
    # the profile's adapter size is the seven projections' A and B: 2.5 MB per layer at rank 16 (7B)
    assert load_profile("a100-80gb-llama-2-7b").adapter_bytes(16) / 32 == pytest.approx(2.5e6, rel=1e-3)


def test_tensor_parallel_divides_bandwidth_terms_only():
    p = load_profile("a100-80gb-llama-2-13b")
    one, two = CostModel(p, 1), CostModel(p, 2)
    assert two.decode_time(32, 512) < one.decode_time(32, 512)
    assert two.decode_time(32, 512) > p.iteration.overhead_s


def test_einsum_cost_grows_with_residents_kernel_cost_with_the_batch():
    prof = load_profile("h200-llama-2-7b")
    einsum, kernel = CostModel(prof.with_lora_path("einsum")), CostModel(prof.with_lora_path("kernel"))
    # einsum: one adapter in the batch, 1 vs 32 resident -> cost grows; the batch's own mix does not matter
    assert einsum.decode_time(32, 512, False, 1, resident_adapters=32) > einsum.decode_time(32, 512, False, 1,
                                                                                           resident_adapters=1)
    assert einsum.decode_time(32, 512, False, 1, resident_adapters=8) == einsum.decode_time(32, 512, False, 8,
                                                                                            resident_adapters=8)
    # kernel: residents do not matter; distinct adapters and tokens in the batch do
    assert kernel.decode_time(32, 512, False, 1, resident_adapters=32) == kernel.decode_time(32, 512, False, 1,
                                                                                             resident_adapters=1)
    assert kernel.decode_time(32, 512, False, 32) > kernel.decode_time(32, 512, False, 1)
    assert kernel.decode_time(64, 512, False, 1) - kernel.decode_time(64, 512) > \
        kernel.decode_time(8, 512, False, 1) - kernel.decode_time(8, 512)
    # the measured kernels: batch 64, 64 distinct rank-16 adapters, 32 layers x the per-layer time in kernels_h200.csv
    lora = kernel.decode_time(64, 512, False, 64) - kernel.decode_time(64, 512)
    assert lora == pytest.approx(32 * 78.464e-6, rel=0.15)
    assert "measured" in prof.lora_paths["kernel"].source and "derived" in \
        load_profile("a100-80gb-llama-2-7b").lora_paths["kernel"].source


def test_a_missing_lora_path_is_named():
    with pytest.raises(ProfileError, match="lora.einsum"):
        load_profile("cpu-tiny").with_lora_path("einsum")


def test_a_per_adapter_lora_cost_counts_the_batchs_distinct_adapters_whatever_their_rank():
    """`lora.kernel.per_adapter_s` (what a loop over adapters pays, the CPU runtime's torch path) adds a
    fixed cost per distinct adapter of an unmerged batch, on the kernel path only; 0 leaves prices as they were."""
    prof = load_profile("h200-llama-2-7b")
    kernel = prof.lora_paths["kernel"]
    looped = dataclasses.replace(prof, lora_paths={**prof.lora_paths,
                                                   "kernel": dataclasses.replace(kernel, per_adapter_s=1e-3)})
    base, per = CostModel(prof.with_lora_path("kernel")), CostModel(looped.with_lora_path("kernel"))
    for distinct, rank in ((1, 8), (4, 8), (4, 64)):
        extra = per.decode_time(16, 512, False, distinct, rank) - base.decode_time(16, 512, False, distinct, rank)
        assert extra == pytest.approx(distinct * 1e-3, rel=1e-9)
    assert per.decode_time(16, 512) == base.decode_time(16, 512)   # merged: no LoRA at all
    assert kernel.per_adapter_s == 0.0   # the analytic profiles' batched kernels
    einsum = CostModel(looped.with_lora_path("einsum"))
    assert einsum.decode_time(16, 512, False, 4) == CostModel(prof.with_lora_path("einsum")).decode_time(16, 512, False, 4)


def test_an_einsum_path_with_a_per_adapter_or_per_call_cost_is_rejected_with_the_key_named(tmp_path):
    import yaml
    raw = yaml.safe_load((PROFILES_DIR / "a100-80gb-llama-2-7b.yaml").read_text())
    for key in ("per_adapter_s", "per_call_s"):
        bad = {**raw, "lora": {**raw["lora"], "einsum": {**raw["lora"]["einsum"], key: 1e-3}}}
        path = tmp_path / "looped.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ProfileError, match=rf"looped.yaml: 'lora.einsum.{key}' must be 0"):
            load_profile(path)


def test_a_per_call_lora_cost_is_charged_once_per_kind_of_token_an_unmerged_batch_has():
    """`lora.kernel.per_call_s`: the CPU runtime's torch path calls LoRA once for a batch's prefills and
    once for its decodes, so a mixed unmerged batch pays it twice, a prefill-only or decode-only one
    once, a merged one never; the analytic profiles have none."""
    prof = load_profile("a100-80gb-llama-2-7b")
    kernel = prof.lora_paths["kernel"]
    assert kernel.per_call_s == 0.0
    called = dataclasses.replace(prof, lora_paths={**prof.lora_paths,
                                                   "kernel": dataclasses.replace(kernel, per_call_s=1e-3)})
    base, per = CostModel(prof), CostModel(called)
    lora = dict(lora_rank_sum=32, lora_token_rank=16 * 40, lora_passes=2)
    for prefill, decodes, calls in ((30, 0, 1), (0, 10, 1), (30, 10, 2)):
        args = dict(prefill_tokens=prefill, prefill_sq=prefill * prefill, decode_seqs=decodes,
                    decode_context=decodes * 100, num_seqs=decodes + (prefill > 0))
        assert per.iteration_time(**args, **lora) - base.iteration_time(**args, **lora) == pytest.approx(calls * 1e-3)
        assert per.iteration_time(**args) == base.iteration_time(**args)   # merged: no LoRA at all
    assert [b - a for a, b in zip(base.decode_repeats(4, 100, 0, 3, **lora), per.decode_repeats(4, 100, 0, 3, **lora))] == \
        pytest.approx([1e-3] * 3)


def test_the_multi_token_cost_is_charged_from_two_tokens_on_and_analytic_profiles_have_none():
    """`iteration.multi_token_s`: a one-token iteration (a single decode) runs its projections as
    matrix-vector products on a CPU; every larger one pays this fixed cost more, merged or not."""
    prof = load_profile("a100-80gb-llama-2-7b")
    assert prof.iteration.multi_token_s == 0.0
    multi = dataclasses.replace(prof, iteration=dataclasses.replace(prof.iteration, multi_token_s=2e-3))
    base, more = CostModel(prof), CostModel(multi)
    for merged in (True, False):
        assert more.decode_time(1, 512, merged) == base.decode_time(1, 512, merged)
        for batch in (2, 16):
            assert more.decode_time(batch, 512, merged) - base.decode_time(batch, 512, merged) == pytest.approx(2e-3)
    prefill2 = dict(prefill_tokens=2, prefill_sq=4, num_seqs=1)
    assert more.iteration_time(**prefill2) - base.iteration_time(**prefill2) == pytest.approx(2e-3)   # a 2-token prefill
    assert more.decode_repeats(1, 100, 0, 3) == base.decode_repeats(1, 100, 0, 3)
    assert [b - a for a, b in zip(base.decode_repeats(4, 100, 0, 3), more.decode_repeats(4, 100, 0, 3))] == \
        pytest.approx([2e-3] * 3)


def test_fast_forward_prices_repeated_decodes_exactly_as_single_iterations():
    """`decode_repeats` hoists the constant terms out of its loop; with every term nonzero and
    non-round (the multi-token, per-adapter and per-call terms included) it must give the same floats, bit for
    bit, as `iteration_time` of each iteration."""
    prof = load_profile("cpu-tiny")
    it, lo = prof.iteration, prof.lora
    odd = dataclasses.replace(prof, iteration=dataclasses.replace(it, multi_token_s=4.3217e-4, overhead_s=1.23457e-3),
                              lora_paths={**prof.lora_paths, "kernel": dataclasses.replace(lo, per_adapter_s=8.7654e-4,
                                                                                          per_adapter_rank_s=3.1e-7,
                                                                                          per_call_s=6.5432e-4)})
    cost = CostModel(odd)
    unmerged = dict(lora_rank_sum=24, lora_token_rank=40, resident_rank_sum=64, lora_passes=3)
    for n, ctx, lora in ((1, 77, {}), (5, 913, unmerged), (16, 4321, {})):
        assert cost.decode_repeats(n, ctx, 2, 9, **lora) == [
            cost.iteration_time(decode_seqs=n, decode_context=ctx + i * n, num_seqs=n, **lora) for i in range(2, 9)]
