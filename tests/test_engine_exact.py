"""Exactness: closed-form single-request timing, fast-forward equivalence, determinism."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim_helpers import SMALL, SYSTEMS, compose_cfg, iterations_csv, requests_csv, run_cfg
from dlora_sim.des.engine import build_simulation
from dlora_sim.core.request import NS
from dlora_sim.core.workload import RequestSpec, Workload


def _ns(s: float) -> int:
    return int(round(s * NS))


@pytest.mark.parametrize("system,merged", [("slora", False), ("merged", True), ("peft", False)])
@pytest.mark.parametrize("prompt,output", [(1, 1), (37, 5), (500, 40)])
def test_single_request_takes_prefill_plus_decodes(system, merged, prompt, output):
    wl = Workload.from_requests([RequestSpec(0.0, 0, prompt, output)], num_adapters=1)
    sim, res = run_cfg(f"system={system}", "cluster.num_replicas=1", "router=least_loaded", workload=wl)   # no preload
    cost, prof = sim.cluster.cost, sim.cluster.profile
    rank = 16
    lora = (lambda tokens: dict(lora_rank_sum=rank, lora_token_rank=tokens * rank, lora_passes=1)) if not merged else (lambda tokens: dict(lora_rank_sum=0, lora_token_rank=0, lora_passes=0))   # one adapter
    # first iteration: load the adapter (not resident at start), merge if merged, prefill
    first = cost.load_time(prof.adapter_bytes(rank)) + (cost.mode_change_time(None, 0) if merged else 0.0)
    expected = _ns(first + cost.iteration_time(prefill_tokens=prompt, prefill_sq=prompt * prompt, num_seqs=1, **lora(prompt)))
    for g in range(1, output):
        expected += _ns(cost.iteration_time(decode_seqs=1, decode_context=prompt + g, num_seqs=1, **lora(1)))
    (r,) = res.requests
    assert r.finish - r.arrival == expected
    assert res.recorder.num_iterations == output
    assert r.first_token == _ns(first + cost.iteration_time(prefill_tokens=prompt, prefill_sq=prompt * prompt, num_seqs=1, **lora(prompt)))


@pytest.mark.parametrize("system", SYSTEMS)
def test_fast_forward_is_exact(system):
    _, on = run_cfg(f"system={system}", *SMALL, "cluster.replica.fast_forward=true")
    _, off = run_cfg(f"system={system}", *SMALL, "cluster.replica.fast_forward=false")
    assert requests_csv(on) == requests_csv(off)
    assert iterations_csv(on) == iterations_csv(off)


# one replica short of KV blocks with a little host swap: runs of repeated decodes end with requests
# that stay resident outside the next batch, and preemption swaps some out and recomputes others
PRESSURE = ["cluster=single", "cluster.replica.max_kv_blocks=150", "cluster.replica.host_swap_bytes=200000000",
            "cluster.replica.max_num_seqs=16", "workload.num_requests=120", "workload.rate=12"]


@pytest.mark.parametrize("system", SYSTEMS)
def test_fast_forward_is_exact_under_kv_pressure(system):
    _, on = run_cfg(f"system={system}", *PRESSURE, "cluster.replica.fast_forward=true")
    _, off = run_cfg(f"system={system}", *PRESSURE, "cluster.replica.fast_forward=false")
    if system not in ("peft", "vllm"):   # their batches (the head adapter's run) are too small to press on memory
        assert on.recorder.counters["preemptions"] > 0
    assert requests_csv(on) == requests_csv(off)
    assert iterations_csv(on) == iterations_csv(off)


def test_fast_forward_skips_policy_calls():
    """Fast-forward asks the policy less often than it iterates (and, above, changes nothing)."""
    calls = {"n": 0}
    sim = build_simulation(compose_cfg("system=slora", *SMALL))
    for scheduler in sim.cluster.schedulers:
        def counted(view, _orig=scheduler.schedule):
            calls["n"] += 1
            return _orig(view)
        scheduler.schedule = counted
    res = sim.run()
    assert calls["n"] < res.recorder.num_iterations / 2


@pytest.mark.parametrize("system", ["dlora", "slora"])
def test_continuing_after_a_prefill_skips_policy_calls_and_changes_nothing(system):
    """A policy that `continues` is not asked again right after a whole-queue prefill; the run is the
    same, byte for byte, as one that asks it."""
    def run(continues: bool):
        sim = build_simulation(compose_cfg(f"system={system}", *SMALL))
        calls = {"n": 0}
        for scheduler in sim.cluster.schedulers:
            def counted(view, _orig=scheduler.schedule):
                calls["n"] += 1
                return _orig(view)
            scheduler.schedule = counted
        for proc in sim.processes:
            proc._continues = continues
        return sim.run(), calls["n"]

    (on, asked_on), (off, asked_off) = run(True), run(False)
    assert asked_on < 0.9 * asked_off
    assert requests_csv(on) == requests_csv(off)
    assert iterations_csv(on) == iterations_csv(off)


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlora_sim", *args, f"hydra.run.dir={tmp}"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("system", ["dlora", "vllm"])
def test_same_seed_same_bytes_from_the_cli(tmp_path, system):
    args = [f"system={system}", "seed=3", "workload.num_requests=300", "charts=false", "progress=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        p = _cli(d, *args)
        assert p.returncode == 0, p.stderr[-2000:]
    assert (a / "requests.csv").read_bytes() == (b / "requests.csv").read_bytes()
    assert (a / "iterations.csv").read_bytes() == (b / "iterations.csv").read_bytes()
    c = tmp_path / "c"
    assert _cli(c, *args[:1], "seed=4", *args[2:]).returncode == 0
    assert (a / "requests.csv").read_bytes() != (c / "requests.csv").read_bytes()


@pytest.mark.parametrize("fast_forward", [True, False])
def test_the_per_adapter_lora_cost_is_charged_for_each_distinct_adapter_of_a_batch(tmp_path, fast_forward):
    """Two requests on two adapters, batched unmerged from the first iteration to the last: a per-adapter
    LoRA cost of 5 ms makes every iteration 2 x 5 ms longer (repeated decodes included)."""
    import yaml
    from dlora_sim.core.paths import PROFILES_DIR
    raw = yaml.safe_load((PROFILES_DIR / "a100-80gb-llama-2-7b.yaml").read_text())
    raw["lora"]["kernel"]["per_adapter_s"] = 5e-3
    (tmp_path / "looped.yaml").write_text(yaml.safe_dump(raw))
    wl = Workload.from_requests([RequestSpec(0.0, 0, 20, 6), RequestSpec(0.0, 1, 20, 6)], num_adapters=2)
    args = ("system=slora", "cluster.num_replicas=1", f"cluster.replica.fast_forward={str(fast_forward).lower()}")
    _, plain = run_cfg(*args, workload=wl)
    _, looped = run_cfg(*args, f"profile.path={tmp_path / 'looped.yaml'}", workload=wl)
    assert plain.recorder.num_iterations == looped.recorder.num_iterations == 6
    for a, b in zip(plain.requests, looped.requests):
        assert (b.finish - a.finish) == pytest.approx(6 * 2 * 5e-3 * NS, abs=6)   # ns rounding per iteration


def _profile_with(tmp_path: Path, **iteration) -> Path:
    import yaml
    from dlora_sim.core.paths import PROFILES_DIR
    raw = yaml.safe_load((PROFILES_DIR / "a100-80gb-llama-2-7b.yaml").read_text())
    raw["iteration"].update(iteration)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("fast_forward", [True, False])
def test_the_multi_token_cost_is_charged_on_iterations_of_two_or_more_tokens(tmp_path, fast_forward):
    """`iteration.multi_token_s` = 4 ms: one request alone pays it on its prefill only (its decodes are
    one token each); two requests batched together pay it on all 6 iterations."""
    path = _profile_with(tmp_path, multi_token_s=4e-3)
    args = ("system=slora", "cluster.num_replicas=1", f"cluster.replica.fast_forward={str(fast_forward).lower()}")
    for reqs, charged in (([RequestSpec(0.0, 0, 20, 6)], 1), ([RequestSpec(0.0, 0, 20, 6), RequestSpec(0.0, 1, 20, 6)], 6)):
        wl = Workload.from_requests(reqs, num_adapters=2)
        _, plain = run_cfg(*args, workload=wl)
        _, multi = run_cfg(*args, f"profile.path={path}", workload=wl)
        assert plain.recorder.num_iterations == multi.recorder.num_iterations == 6
        for a, b in zip(plain.requests, multi.requests):
            assert (b.finish - a.finish) == pytest.approx(charged * 4e-3 * NS, abs=6)


def test_fast_forward_is_exact_with_a_multi_token_cost(tmp_path):
    path = _profile_with(tmp_path, multi_token_s=3e-4)
    _, on = run_cfg("system=slora", *SMALL, f"profile.path={path}", "cluster.replica.fast_forward=true")
    _, off = run_cfg("system=slora", *SMALL, f"profile.path={path}", "cluster.replica.fast_forward=false")
    assert requests_csv(on) == requests_csv(off)
    assert iterations_csv(on) == iterations_csv(off)


@pytest.mark.parametrize("term", ["per_adapter_s", "per_call_s"])
def test_an_adapter_with_prefill_and_decode_tokens_in_one_batch_pays_two_lora_passes(tmp_path, term):
    """A decodes on adapter 0 when B (adapter 0) arrives: their joint iteration is a prefill and a
    decode of one adapter, two passes of a looped LoRA path and two LoRA calls (one per kind). At 5 ms
    per pass, or per call, A pays 6 x 5 ms over its 6 iterations and 5 ms more for that one."""
    import yaml
    from dlora_sim.core.paths import PROFILES_DIR
    raw = yaml.safe_load((PROFILES_DIR / "a100-80gb-llama-2-7b.yaml").read_text())
    raw["lora"]["kernel"][term] = 5e-3
    (tmp_path / "looped.yaml").write_text(yaml.safe_dump(raw))
    wl = Workload.from_requests([RequestSpec(0.0, 0, 20, 6), RequestSpec(1e-6, 0, 20, 6)], num_adapters=1)
    args = ("system=slora", "cluster.num_replicas=1")
    _, plain = run_cfg(*args, workload=wl)
    _, looped = run_cfg(*args, f"profile.path={tmp_path / 'looped.yaml'}", workload=wl)
    a_plain, a_looped = (next(r for r in res.requests if r.id == 0) for res in (plain, looped))
    assert a_looped.finish - a_plain.finish == pytest.approx(7 * 5e-3 * NS, abs=8)


def test_merged_iterations_are_counted_alike_with_or_without_kept_rows_and_fast_forward():
    """summary.json's merged_iteration_share counts what iterations.csv shows, whether repeats are kept,
    skipped (keep_iterations=false) or not fast-forwarded at all."""
    skewed = ["system=dlora", "cluster=single", "workload.num_adapters=4", "workload.popularity_param=2",
              "workload.num_requests=200", "workload.rate=6", "profile.lora=einsum"]
    counts = set()
    for extra in (["keep_iterations=true"], ["keep_iterations=false"], ["cluster.replica.fast_forward=false"]):
        res = build_simulation(compose_cfg(*skewed, *extra)).run()
        if res.recorder.rows:
            assert res.recorder.merged_iterations == sum(r.merged is not None for r in res.recorder.rows)
        counts.add((res.recorder.merged_iterations, res.recorder.num_iterations))
    assert len(counts) == 1 and next(iter(counts))[0] > 0
