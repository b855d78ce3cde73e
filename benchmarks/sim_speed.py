"""Simulator speed: wall time vs simulated time at 1, 4, 8 and 32 replicas, ~80% load.

Each point runs in its own process (clean peak RSS) on one core, `--repeats` times; the fastest run is
reported (the least disturbed by other load) with the median beside it. Load: a one-replica capacity probe
(overloaded run, completed requests per second) sets the rate to `load` x capacity x replicas; requests
scale with replicas so every point simulates about the same span. Results:
benchmarks/results/sim_speed.csv and .md.

    python benchmarks/sim_speed.py [--systems slora,dlora] [--per-replica 1500] [--replicas 1,4,8,32] [--record]
    python benchmarks/sim_speed.py --large 1000000 [--large-replicas 8] [--record]   # streamed, sim_speed_large.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recording import RESULTS, finish, write_report  # noqa: E402


def _compose(overrides: list[str]):
    from dlora_sim.core.config import compose
    return compose(["keep_iterations=false", *overrides])


def one_point(system: str, replicas: int, rate: float, requests: int, seed: int, stream_to: str = "") -> dict:
    """One run; with `stream_to`, requests.csv is streamed into that folder as requests finish (what
    `dlora-sim` does from 100k requests on), so memory holds only the requests in flight."""
    from dlora_sim.des.engine import build_simulation
    cfg = _compose([f"system={system}", f"cluster.num_replicas={replicas}", f"workload.rate={rate}",
                    f"workload.num_requests={requests}", f"seed={seed}",
                    f"stream_requests={'true' if stream_to else 'false'}"])
    t0 = time.perf_counter()
    sim = build_simulation(cfg, out=Path(stream_to) if stream_to else None)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = sim.run()
    wall = time.perf_counter() - t0
    if res.streamed is not None:
        res.streamed.close()
    done = len(res.stats.lat)
    return {"system": system, "replicas": replicas, "rate_rps": round(rate, 3), "requests": requests,
            "completed": done, "sim_time_s": round(res.sim_end_s, 3), "wall_s": round(wall, 3),
            "speedup": round(res.sim_end_s / wall, 1),
            "iterations": res.recorder.num_iterations,
            "iterations_per_wall_s": round(res.recorder.num_iterations / wall),
            "build_s": round(build, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def capacity(system: str, seed: int) -> float:
    """Completed requests per simulated second of one overloaded replica."""
    from dlora_sim.des.engine import build_simulation
    cfg = _compose([f"system={system}", "cluster.num_replicas=1", "workload.rate=1000", "workload.num_requests=1500",
                    f"seed={seed}"])
    res = build_simulation(cfg).run()
    return len(res.stats.lat) / res.sim_end_s


def _child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = ["taskset", "-c", "0"] if _has_taskset() else []
    out = subprocess.run(cmd + [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_taskset() -> bool:
    return subprocess.run(["which", "taskset"], capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="slora,dlora")
    ap.add_argument("--replicas", default="1,4,8,32")
    ap.add_argument("--per-replica", type=int, default=1500, help="requests per replica")
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest is reported (noisy machines)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--large", type=int, default=0,
                    help="instead: one streamed run of this many requests per system (e.g. 1000000)")
    ap.add_argument("--large-replicas", type=int, default=8)
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
    caps = {}
    for system in systems:
        caps[system] = _child(["capacity", system, str(a.seed)])["capacity"]
        print(f"{system}: one-replica capacity {caps[system]:.2f} req/s", flush=True)
    rows, ratios = [], []
    for r in (int(x) for x in a.replicas.split(",")):
        # systems alternate within each repeat, so a ratio pairs runs taken moments apart (noisy machines)
        tries: dict[str, list[dict]] = {s: [] for s in systems}
        for _ in range(a.repeats):
            for system in systems:
                cap = caps[system]
                tries[system].append(_child(["point", system, str(r), str(a.load * cap * r),
                                             str(a.per_replica * r), str(a.seed)]))
        for system in systems:
            walls = sorted(t["wall_s"] for t in tries[system])
            row = min(tries[system], key=lambda t: t["wall_s"])   # the least-disturbed run; the median too
            row["median_wall_s"] = walls[len(walls) // 2]
            row["capacity_rps_per_replica"] = round(caps[system], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = systems[0]
        for system in systems[1:]:
            paired = sorted(t["wall_s"] / b["wall_s"] for t, b in zip(tries[system], tries[base]))
            ratios.append((system, base, r, paired))
    note = (f"Load {a.load:.0%} of a one-replica capacity probe; {a.per_replica} requests per replica; "
            "default workload otherwise (16 adapters, Zipf 1, uniform lengths 8-511). Systems alternate "
            "within each repeat; the ratio below is the median of the paired wall-time ratios.")
    if ratios:
        note += "\n\n| system | vs | replicas | wall ratio (median of pairs) | pairs (min..max) |\n|---|---|---|---|---|\n"
        note += "\n".join(f"| {s} | {b} | {r} | {statistics.median(p):.2f} | {p[0]:.2f}..{p[-1]:.2f} |"
                           for s, b, r, p in ratios)
    _write(a, a.out or RESULTS / "sim_speed", rows,
           f"# Simulator speed ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
           f"one core per point, best of {a.repeats}, python {platform.python_version()})", note)


def large_runs(a) -> None:
    """One streamed run of `--large` requests per system at `--large-replicas`, 80% load."""
    import tempfile
    rows = []
    for system in a.systems.split(","):
        cap = _child(["capacity", system, str(a.seed)])["capacity"]
        r = a.large_replicas
        with tempfile.TemporaryDirectory() as tmp:
            row = _child(["point", system, str(r), str(a.load * cap * r), str(a.large), str(a.seed), tmp])
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
