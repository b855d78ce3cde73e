"""The runtime as a cluster: N replicas' workers (in-process or Ray actors) under the simulator's global
policies. The virtual clock reproduces dlora-sim byte for byte with migrations of both kinds; a migrated
request continues with the KV and tokens it had; a lost transfer is recomputed, never lost; a worker's
failure names its replica; the real clock serves everything with migration on; one Ray cluster runs
both the runtime and the simulator's sweeps (Hydra's Ray launcher)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from dlora_gpu.cli import build_engine
from dlora_sim.core.config import compose
from dlora_sim.core.request import State
from dlora_sim.core.results import REQUEST_COLUMNS, _csv_text, request_rows
from dlora_sim.des.engine import build_simulation

ray = pytest.importorskip("ray")

# aggressive co-migration on small replicas (4 sequences, 2 adapter slots) with prompts long enough that
# the cost model (the CPU profile's measured KV transfer: a fixed cost + bytes / bandwidth) moves some
# requests with their KV and recomputes others (migration.mode=auto: the cheaper per request)
MIGRATING = ["charts=false", "runtime.clock=virtual", "migration=dlora", "migration.always=true",
             "migration.count_trigger=1", "migration.min_gain_s=0", "migration.mode=auto", "migration.time_limit_s=0.05",
             "migration.interval_s=0.25", "cluster.replica.max_num_seqs=4", "cluster.replica.gpu_adapter_slots=2",
             "workload.prompt.high=300"]
# (system, replicas, rate, requests, seed): found to move requests both ways
CASES = {("dlora", 2): ["workload.rate=30", "workload.num_requests=60", "seed=1"],
         ("dlora", 3): ["workload.rate=40", "workload.num_requests=60", "seed=2"],
         ("slora", 2): ["workload.rate=20", "workload.num_requests=100", "seed=2", "router=dlora"]}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for every test here (its start-up is paid once)."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _cfg(system: str, n: int, *extra: str, migrate: bool = True):
    overrides = _cfg_overrides(system, n) + list(extra)
    if not migrate:
        overrides = [o for o in overrides if not o.startswith("migration")] + ["migration=none"]
    return compose(overrides, "serve")


def _csv(res) -> str:
    return _csv_text(REQUEST_COLUMNS, request_rows(res.requests))


def _serve(cfg, **kw):
    engine = build_engine(cfg, **kw)
    engine.check_memory = True          # every worker mirrors its state after each of its steps
    engine.cluster.debug_checks = True
    try:
        return engine, engine.run()
    finally:
        engine.close()


@pytest.mark.parametrize("system,n,workers", [("dlora", 2, "local"), ("slora", 2, "local"), ("dlora", 3, "ray")])
def test_virtual_clock_equals_the_simulator_at_n_replicas_with_both_kinds_of_migration(system, n, workers,
                                                                                       ray_cluster):
    engine, served = _serve(_cfg(system, n, f"runtime.workers={workers}"))
    simulated = build_simulation(_cfg(system, n)).run()
    applied = served.extra["migration_applied"]
    assert applied["transfer"] >= 1 and applied["recompute"] >= 1, applied
    assert _csv(served) == _csv(simulated)
    assert served.recorder.num_iterations == simulated.recorder.num_iterations
    assert engine.workers.kind == workers and served.extra["kv_transfers"] == applied["transfer"]
    assert served.extra["kv_transfer_bytes"] >= served.extra["migration_kv_bytes"] > 0   # whole blocks travel


def test_a_migrated_request_continues_with_the_kv_and_tokens_it_had(ray_cluster):
    """Served with co-migration or without it, every request produces the same greedy tokens (migrated
    ones too, by KV transfer and by recompute); and a moved sequence's blocks arrive unchanged."""
    base = ["runtime.workers=local"]
    moved_engine, moved = _serve(_cfg("slora", 2, *base), keep_tokens=True)
    still_engine, still = _serve(_cfg("slora", 2, *base, migrate=False), keep_tokens=True)
    migrated = [r.id for r in moved.requests if r.migrations]
    assert migrated and not any(r.migrations for r in still.requests)
    assert moved_engine.tokens.finished == still_engine.tokens.finished
    assert len(still_engine.tokens.finished) == 100
    assert all(len(still_engine.tokens.finished[r.id]) == r.prompt_tokens + r.output_tokens for r in still.requests)

    from dlora_gpu.workers import make_workers
    for kind in ("local", "ray"):
        engine = build_engine(_cfg("slora", 2, "runtime.workers=local"))
        ws = make_workers(kind, [s for s in _specs(engine)])
        try:
            ws.get(ws.call(0, "fill", 7, 5))
            before = ws.get(ws.call(0, "digest", 7))
            ws.get(ws.chain(1, "receive", 7, ws.call(0, "export", 7)))
            ws.get(ws.call(1, "land", 7, "resident", 5))
            assert ws.get(ws.call(1, "digest", 7)) == before
            with pytest.raises(Exception, match="owns no"):   # the source freed its copy
                ws.get(ws.call(0, "digest", 7))
        finally:
            ws.close()
        engine.close()


def _specs(engine):
    from dlora_gpu.executor import ExecutorSpec, runtime_config
    cfg = _cfg("slora", 2)
    from dlora_sim.core.config import build_parts
    parts = build_parts(cfg)
    rcfg = replace(runtime_config(cfg.runtime), warmup=0)
    return [ExecutorSpec.of(rcfg, st, parts) for st in engine.replicas]


@pytest.mark.parametrize("workers", ["local", "ray"])
def test_a_lost_transfer_is_recomputed_never_lost(workers, ray_cluster):
    engine = build_engine(_cfg("dlora", 2, f"runtime.workers={workers}"))
    engine.check_memory = True
    engine.lose_kv = lambda r: True      # every KV transfer's object is lost on the way
    try:
        res = engine.run()
    finally:
        engine.close()
    ids = sorted(r.id for r in res.requests)
    assert ids == list(range(60)) and all(r.state == State.FINISHED for r in res.requests)
    failures = res.extra["migration_transfer_failures"]
    assert len(failures) == res.extra["migration_applied"]["transfer"] == res.extra["kv_transfers_failed"] >= 1
    assert all(f["why"].startswith("replica ") and "TransferLost" in f["why"] for f in failures)
    assert res.extra["migration_applied"]["arrived_queued"] >= len(failures)   # re-prefilled at the destination


def test_a_workers_exception_reaches_the_user_naming_the_replica(ray_cluster):
    from dlora_gpu.engine import Clock, Engine
    from dlora_gpu.executor import runtime_config
    from dlora_gpu.workers import ReplicaError, make_workers
    from dlora_sim.core.config import build_parts
    cfg = _cfg("dlora", 2, "runtime.workers=ray")
    parts, rcfg = build_parts(cfg), runtime_config(cfg.runtime)
    # replica 1's cache is smaller than its state believes: its worker fails at its first large prefill
    engine = Engine(parts, rcfg, lambda specs: make_workers("ray", [specs[0], replace(specs[1], total_blocks=4)]),
                    Clock("virtual"))
    try:
        with pytest.raises(ReplicaError, match=r"^replica 1: run failed: OutOfBlocks"):
            engine.run()
    finally:
        engine.close()


def test_the_real_clock_serves_two_ray_replicas_with_migration(tmp_path, ray_cluster):
    from dlora_gpu.cli import serve_job
    overrides = [o for o in _cfg_overrides("dlora", 2) if o != "runtime.clock=virtual"] + ["runtime.workers=ray"]
    summary = serve_job(compose(overrides, "serve"), tmp_path, "dlora", overrides)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert summary["completed"] == saved["completed"] == 60 and saved["clock"] == "real" and saved["workers"] == "ray"
    assert saved["num_migrations"] > 0 and saved["migration_rounds"] > 0
    assert saved["kv_transfers"] == saved["migration_applied"].get("transfer", 0)
    if saved["kv_transfers"]:
        assert saved["kv_transfer_bytes"] > 0 and saved["kv_transfer_wall_s"] > 0 and saved["migration_kv_bytes"] > 0
    assert (tmp_path / "requests.csv").read_text().count("\n") == 61


def _cfg_overrides(system: str, n: int) -> list[str]:
    return [*MIGRATING, f"system={system}", f"cluster.num_replicas={n}", *CASES[(system, n)]]


def test_the_simulators_sweeps_run_on_the_same_ray_cluster(tmp_path, ray_cluster):
    """Hydra's own Ray launcher sends a multirun's jobs to the Ray cluster the runtime uses."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dlora_sim.cli", "-m", "hydra/launcher=ray_join", f"hydra.launcher.ray.init.address={ray_cluster}",
           "system=slora,dlora", "workload.num_requests=20", "charts=false", "progress=false", f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, system in (("0", "slora"), ("1", "dlora")):
        summary = json.loads((out / job / "summary.json").read_text())
        assert summary["system"] == system and summary["completed"] == 20
    assert (out / "comparison.csv").exists()
