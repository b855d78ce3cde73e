"""Simulator speed: wall time vs simulated time, and wall microseconds per request and per policy decision,
at 1, 8, 32 and 128 replicas (the same load per replica), ~80% load.

Each point runs in its own process (clean peak RSS) on one core, `--repeats` times; the fastest run is
reported (the least disturbed by other load) with the median beside it. Load: a one-replica capacity probe
(overloaded run, completed requests per second) sets the rate to `load` x capacity x replicas; requests
scale with replicas so every point simulates about the same span. A decision is one call of a replica's
local policy (fast-forward and continuation skip calls). With `--baseline DIR` (a checkout of earlier
code, e.g. `git worktree add /tmp/before <commit>`), every point also runs on that code, alternating with
this one, and the report gives each change's speed-up as the median of paired ratios.
Results: benchmarks/results/sim_speed.csv and .md.

    python benchmarks/sim_speed.py [--systems slora,dlora] [--per-replica 1500] [--replicas 1,8,32,128] [--record]
    python benchmarks/sim_speed.py --baseline /tmp/before [--replicas 8,32] [--record]   # before/after pairs
    python benchmarks/sim_speed.py --large 1000000 [--large-replicas 8] [--record]   # streamed, sim_speed_large.md
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baseline import checkout, child_json, commit_of, use_code_from_env  # noqa: E402
from benchmarks.recording import RESULTS, finish, write_report  # noqa: E402

use_code_from_env()


def _before_core() -> bool:
    """The code under test predates the serving core (2026-12-02, the code of issue 32): its modules sat at the
    package's top (looked up on disk: the editable install would otherwise find this checkout's)."""
    import dlora_sim
    return not (Path(dlora_sim.__file__).parent / "core").is_dir()


def _compose(overrides: list[str]):
    if _before_core():   # it composed in place
        from hydra import compose as hydra_compose, initialize_config_dir
        from dlora_sim.paths import CONF_DIR
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=["progress=false", "keep_iterations=false", *overrides])
    from dlora_sim.core.config import compose
    return compose(["keep_iterations=false", *overrides])


def _build_simulation():
    if _before_core():
        from dlora_sim.config import build_simulation
    else:
        from dlora_sim.des.engine import build_simulation
    return build_simulation


def one_point(system: str, replicas: int, rate: float, requests: int, seed: int, stream_to: str = "") -> dict:
    """One run; with `stream_to`, requests.csv is streamed into that folder as requests finish (what
    `dlora-sim` does from 100k requests on), so memory holds only the requests in flight."""
    build_simulation = _build_simulation()
    cfg = _compose([f"system={system}", f"cluster.num_replicas={replicas}", f"workload.rate={rate}",
                    f"workload.num_requests={requests}", f"seed={seed}",
                    f"stream_requests={'true' if stream_to else 'false'}"])
    t0 = time.perf_counter()
    sim = build_simulation(cfg, out=Path(stream_to) if stream_to else None)
    decisions = _count_decisions(sim)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = sim.run()
    wall = time.perf_counter() - t0
    try:   # code older than the compiled build has none (active(), not build_kind(): a baseline may predate it)
        from dlora_sim import compiled
        build_kind = "compiled" if compiled.active() else "pure"
    except ImportError:
        build_kind = "pure"
    if res.streamed is not None:
        res.streamed.close()
    done = len(res.stats.lat)
    return {"system": system, "build": build_kind, "replicas": replicas, "rate_rps": round(rate, 3), "requests": requests,
            "completed": done, "sim_time_s": round(res.sim_end_s, 3), "wall_s": round(wall, 3),
            "speedup": round(res.sim_end_s / wall, 1),
            "us_per_request": round(wall / requests * 1e6, 1),
            "decisions": decisions[0], "us_per_decision": round(wall / max(decisions[0], 1) * 1e6, 1),
            "iterations": res.recorder.num_iterations,
            "iterations_per_wall_s": round(res.recorder.num_iterations / wall),
            "build_s": round(build, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _count_decisions(sim) -> list[int]:
    """A counter of the replicas' policy calls (a one-element list the run fills in)."""
    count = [0]
    cluster = getattr(sim, "cluster", None)   # code before the serving core: each replica held its scheduler
    for scheduler in cluster.schedulers if cluster is not None else [r.scheduler for r in sim.replicas]:
        def counted(view, _schedule=scheduler.schedule):
            count[0] += 1
            return _schedule(view)
        scheduler.schedule = counted
    return count


def capacity(system: str, seed: int) -> float:
    """Completed requests per simulated second of one overloaded replica."""
    build_simulation = _build_simulation()
    cfg = _compose([f"system={system}", "cluster.num_replicas=1", "workload.rate=1000", "workload.num_requests=1500",
                    f"seed={seed}"])
    res = build_simulation(cfg).run()
    return len(res.stats.lat) / res.sim_end_s


def _child(args: list[str], code: Path | None = None, env: dict[str, str] | None = None) -> dict:
    return child_json(__file__, args, code, one_core=True, extra_env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="slora,dlora")
    ap.add_argument("--replicas", default="1,8,32,128")
    ap.add_argument("--per-replica", type=int, default=1500, help="requests per replica")
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest is reported (noisy machines)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--large", type=int, default=0,
                    help="instead: one streamed run of this many requests per system (e.g. 1000000)")
    ap.add_argument("--large-replicas", type=int, default=8)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of earlier code: every point also runs on it, for before/after ratios")
    ap.add_argument("--record", action="store_true", help="write the results into benchmarks/results/")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.child is not None:
        kind, *rest = a.child
        if kind == "capacity":
            print(json.dumps({"capacity": capacity(rest[0], int(rest[1]))}))
        else:
            s, r, rate, n, seed, *stream = rest
            print(json.dumps(one_point(s, int(r), float(rate), int(n), int(seed), *stream)))
        return
    if a.large:
        return large_runs(a)
    systems = a.systems.split(",")
    from dlora_sim import compiled
    # this code as the runs would use it (its compiled build where current) and, beside it, pure Python
    codes: dict[str, tuple[Path | None, dict[str, str]]] = {"this": (None, {})}
    if compiled.available():
        codes["pure"] = (None, compiled.PURE_ENV)
    if a.baseline is not None:
        codes["baseline"] = (checkout(a.baseline), {})
    caps = {}
    for system in systems:   # the rates come from this code's probe: both codes simulate the same requests
        caps[system] = _child(["capacity", system, str(a.seed)])["capacity"]
        print(f"{system}: one-replica capacity {caps[system]:.2f} req/s", flush=True)
    rows, ratios, speedups = [], [], []
    for r in (int(x) for x in a.replicas.split(",")):
        # systems (and codes) alternate within each repeat, so a ratio pairs runs taken moments apart
        tries: dict[tuple[str, str], list[dict]] = {(s, c): [] for s in systems for c in codes}
        for _ in range(a.repeats):
            for system in systems:
                for code, (where, env) in codes.items():
                    args = ["point", system, str(r), str(a.load * caps[system] * r), str(a.per_replica * r),
                            str(a.seed)]
                    tries[system, code].append(_child(args, where, env))
        for (system, code), runs in tries.items():
            walls = sorted(t["wall_s"] for t in runs)
            row = {"code": code, **min(runs, key=lambda t: t["wall_s"])}   # the least-disturbed run
            row["median_wall_s"] = walls[len(walls) // 2]
            row["capacity_rps_per_replica"] = round(caps[system], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        for system in systems[1:]:
            ratios.append((system, systems[0], r, _paired(tries[system, "this"], tries[systems[0], "this"])))
        for slow, fast in (("baseline", "this"), ("baseline", "pure"), ("pure", "this")):
            if slow in codes and fast in codes:
                for system in systems:
                    speedups.append((slow, fast, system, r, _paired(tries[system, slow], tries[system, fast])))
    _write(a, a.out or RESULTS / "sim_speed", rows,
           f"# Simulator speed ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
           f"one core per point, best of {a.repeats}, python {platform.python_version()})",
           _notes(a, rows, ratios, speedups))


def _paired(num: list[dict], den: list[dict]) -> list[float]:
    return sorted(n["wall_s"] / d["wall_s"] for n, d in zip(num, den))


def _notes(a, rows: list[dict], ratios: list, speedups: list) -> str:
    note = (f"Load {a.load:.0%} of a one-replica capacity probe; {a.per_replica} requests per replica; "
            "default workload otherwise (16 adapters, Zipf 1, uniform lengths 8-511). A decision is one call "
            "of a replica's local policy. Runs alternate within each repeat; a ratio is the median of the "
            "paired wall-time ratios.")
    builds = {row["code"]: row["build"] for row in rows}
    if speedups:
        note += ("\n\nCodes: `this` is this commit as runs use it (build: " + builds.get("this", "?") + ")"
                 + ("; `pure` is this commit with DLORA_SIM_PURE=1 (build: pure)" if "pure" in builds else "")
                 + (f"; `baseline` is `--baseline` ({a.baseline}, commit {commit_of(a.baseline)}; build: "
                    f"{builds.get('baseline', '?')})" if a.baseline is not None else "")
                 + " (`build`: compiled or pure Python; `build_s`: the run's set-up time)"
                 + ". Same requests, same machine, runs alternating; speed-up = slower wall / faster wall:\n\n"
                 "| slower | faster | system | replicas | speed-up (median of pairs) | pairs (min..max) |\n"
                 "|---|---|---|---|---|---|\n")
        note += "\n".join(f"| {slow} | {fast} | {s} | {r} | {statistics.median(p):.2f} | {p[0]:.2f}..{p[-1]:.2f} |"
                           for slow, fast, s, r, p in speedups)
    if ratios:
        note += "\n\n| system | vs | replicas | wall ratio (median of pairs) | pairs (min..max) |\n|---|---|---|---|---|\n"
        note += "\n".join(f"| {s} | {b} | {r} | {statistics.median(p):.2f} | {p[0]:.2f}..{p[-1]:.2f} |"
                           for s, b, r, p in ratios)
    scale = [(row["code"], row["system"], row["replicas"], row["us_per_request"]) for row in rows]
    ref = {(c, s): us for c, s, r, us in scale if r == 8}
    if ref:
        note += ("\n\nScaling: wall µs per request (best run) relative to 8 replicas:\n\n"
                 "| code | system | replicas | µs/request | vs 8 replicas |\n|---|---|---|---|---|\n")
        note += "\n".join(f"| {c} | {s} | {r} | {us} | {us / ref[c, s]:.2f} |"
                           for c, s, r, us in scale if (c, s) in ref)
    return note


def large_runs(a) -> None:
    """One streamed run of `--large` requests per system at `--large-replicas`, 80% load."""
    import tempfile
    from dlora_sim import compiled
    builds = [{}]   # this code as runs use it, and pure Python beside a compiled build
    if compiled.available():
        builds.append(compiled.PURE_ENV)
    rows = []
    for system in a.systems.split(","):
        cap = _child(["capacity", system, str(a.seed)])["capacity"]
        r = a.large_replicas
        for env in builds:
            with tempfile.TemporaryDirectory() as tmp:
                row = _child(["point", system, str(r), str(a.load * cap * r), str(a.large), str(a.seed), tmp],
                             env=env)
                row["requests_csv_mb"] = round((Path(tmp) / "requests.csv").stat().st_size / 2**20, 1)
            row["capacity_rps_per_replica"] = round(cap, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    _write(a, a.out or RESULTS / "sim_speed_large", rows,
           f"# A million requests ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
           f"one core, python {platform.python_version()})",
           f"{a.large} requests, {a.large_replicas} replicas, load {a.load:.0%} of a one-replica capacity probe; "
           "requests.csv streamed as requests finish, no iterations.csv (the defaults from 100k requests); "
           "default workload otherwise. wall_s: the simulation; build_s: workload generation and setup; "
           "peak_rss_mb: the whole process.")


def _write(a, out: Path, rows: list[dict], title: str, note: str) -> None:
    cols = list(rows[0])
    lines = [title, "", note, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    if not a.record:
        print("\n".join(lines))
        print("(not recorded; --record writes benchmarks/results/)")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out.parent, out.name, rows, "\n".join(lines) + "\n")
    print(finish(out.parent, [f"{out.name}.csv", f"{out.name}.md"], out.parent == RESULTS))


if __name__ == "__main__":
    main()
