"""Does a change that moves results stay within the seed-to-seed spread? Same configs, several seeds, this
code and a `--baseline` checkout (e.g. `git worktree add /tmp/before <commit>`), side by side.

For each config and metric: the mean over seeds of each code, the change of that mean, and the spread of
the baseline across seeds (max - min). A change inside that spread is one the seed alone could make.
Results: benchmarks/results/results_change.md and .csv (with --record).

    python benchmarks/results_change.py --baseline /tmp/before [--seeds 0,1,2,3,4] [--record]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baseline import checkout, child_json, commit_of, use_code_from_env  # noqa: E402
from benchmarks.recording import finish, output_dir, write_report  # noqa: E402

use_code_from_env()

# what the change touches: multi-replica runs of the routers that price queues (dLoRA, Proactive), with and
# without co-migration, on the default workload and on the paper's (the capacity experiment's setting)
CONFIGS = {
    "dlora_8rep_80pct": ["system=dlora", "cluster.num_replicas=8", "workload.rate=38.5", "workload.num_requests=4000"],
    # near the capacity experiment's answers for Llama-2-7B, kernel LoRA cost (benchmarks/results/capacity.md)
    "dlora_paper_at_capacity": ["system=dlora", "cluster=eight", "workload=paper", "cluster.replica.max_num_seqs=16",
                                "workload.rate=60", "workload.num_requests=6000"],
    "slora_paper_at_capacity": ["system=slora", "cluster=eight", "workload=paper", "cluster.replica.max_num_seqs=16",
                                "workload.rate=60", "workload.num_requests=6000"],
    "dlora_migration": ["system=dlora", "cluster=eight", "workload.num_adapters=32", "router.extra_placements=7",
                        "workload.rate=32", "workload.num_requests=3000"],
    "proactive_32ad": ["system=dlora", "cluster=eight", "workload.num_adapters=32", "router=proactive",
                       "router.extra_placements=7", "migration=none", "workload.rate=32", "workload.num_requests=3000"],
}
METRICS = ("mean_latency_s", "p99_latency_s", "mean_ttft_s", "p99_ttft_s", "slo_attainment", "num_migrations")


def one(config: str, seed: int) -> dict:
    from dlora_sim.core.config import compose
    from dlora_sim.des.engine import build_simulation
    from dlora_sim.core.results import summarize
    cfg = compose(["keep_iterations=false", "progress=false", f"seed={seed}", *CONFIGS[config]])
    res = build_simulation(cfg).run()
    s = summarize(res, float(cfg.slo_s_per_token))
    return {m: s.get(m) for m in METRICS}


def _child(config: str, seed: int, code: Path | None) -> dict:
    return child_json(__file__, [config, str(seed)], code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of the code before the change")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true", help="write the results into benchmarks/results/")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child[0], int(a.child[1]))))
        return
    baseline = checkout(a.baseline, required=True)
    seeds = [int(x) for x in a.seeds.split(",")]
    at = commit_of(baseline)
    rows = []
    for config in a.configs.split(","):
        runs = {code: [_child(config, s, where) for s in seeds]
                for code, where in (("this", None), ("baseline", baseline))}
        for m in METRICS:
            vals = {code: [r[m] for r in rs if r[m] is not None] for code, rs in runs.items()}
            if not vals["this"] or not vals["baseline"]:
                continue
            before, after = statistics.mean(vals["baseline"]), statistics.mean(vals["this"])
            spread = max(vals["baseline"]) - min(vals["baseline"])
            rows.append({"config": config, "metric": m, "baseline_mean": round(before, 4), "this_mean": round(after, 4),
                         "change": round(after - before, 4), "baseline_spread": round(spread, 4),
                         "within_spread": abs(after - before) <= spread})
            print(json.dumps(rows[-1]), flush=True)
    out = output_dir(a.record, "results_change", a.out)
    lines = [f"# A results change against the seed-to-seed spread ({len(seeds)} seeds: {a.seeds})", "",
             f"This code vs the baseline at commit {at}, the same configs and seeds. change = mean(this) - "
             "mean(baseline); baseline_spread = max - min of the baseline over the seeds.", "",
             "Configs: " + "; ".join(f"`{k}`: {' '.join(v)}" for k, v in CONFIGS.items() if k in a.configs), "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(r[c]) for c in rows[0]) + " |" for r in rows]
    inside = sum(r["within_spread"] for r in rows)
    lines += ["", f"{inside} of {len(rows)} config-metric means moved by less than the baseline's seed-to-seed spread."]
    write_report(out, "results_change", rows, "\n".join(lines) + "\n")
    print(finish(out, ["results_change.csv", "results_change.md"], a.record))


if __name__ == "__main__":
    main()
