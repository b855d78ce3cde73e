"""Prefix caching on Mooncake's conversation trace: the share of prompt tokens served from the cache, and TTFT.

Mooncake (FAST'25) publishes each request's prompt as 512-token block hashes (`hash_ids`); with
`cluster.replica.prefix_caching=true` a replica reuses the KV of a prefix it cached, keyed by adapter
(dlora_sim/core/prefix_cache.py). Runs the whole trace on 8 simulated A100 / Llama-2-7B replicas with vLLM-style
unmerged batching (`system=vllm_lora`), at a quarter of its rate (time_scale 4; at full rate 8 replicas fall behind
by minutes), with caching off and on, for one adapter (every request may share every prefix) and for 32 adapters
(Zipf(1): the same prefix under two adapters is two entries). Writes a temporary folder unless --record
(benchmarks/results/prefix_caching.{csv,md}).

    python benchmarks/prefix_caching.py [--record]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recording import RESULTS, finish, write_report  # noqa: E402

BASE = ["cluster=eight", "workload.time_scale=4", "progress=false", "keep_iterations=false"]
KEYS = ["prefix_hit_share", "mean_ttft_s", "p99_ttft_s", "mean_latency_s", "throughput_rps", "completed", "rejected"]


def run(adapters: int, caching: bool, out: Path) -> dict:
    from dlora_sim.api import simulate
    simulate("vllm_lora", "mooncake", [*BASE, f"workload.num_adapters={adapters}",
                                       f"cluster.replica.prefix_caching={str(caching).lower()}"], out=out)
    s = json.loads((out / "summary.json").read_text())
    return {"adapters": adapters, "prefix_caching": caching, **{k: s.get(k, 0.0) for k in KEYS}}


def unbounded_share(adapters: int) -> float:
    """The hit share of one cache with room for everything, shared by all replicas (the trace's ceiling under this
    adapter mapping): each request's longest prefix some earlier request of its adapter had."""
    from dlora_sim.core.config import build_workload, compose
    from dlora_sim.core.prefix_cache import PrefixCache
    from dlora_sim.core.request import Request
    w = build_workload(compose(["workload=mooncake", f"workload.num_adapters={adapters}", *BASE]))
    cache = PrefixCache(w.prefix_block_tokens, 16)   # its keys: what a replica's cache matches on
    seen: set = set()
    hit = total = 0
    for i, (r, hashes) in enumerate(zip(w.requests, w.prefixes)):
        keys = cache.keys(Request(i, r.adapter, 0, r.prompt_tokens, r.output_tokens, prefix=hashes))
        run = next((i for i, k in enumerate(keys) if k not in seen), len(keys)) * w.prefix_block_tokens
        hit += min(run, r.prompt_tokens - 1)
        total += r.prompt_tokens
        seen.update(keys)
    return hit / total


def report(rows: list[dict]) -> str:
    lines = ["# Prefix caching on Mooncake's conversation trace (8 A100 / Llama-2-7B replicas, vllm_lora, 1/4 rate)", "",
             f"Measured {time.strftime('%Y-%m-%d')} by `python benchmarks/prefix_caching.py --record`; settings in the "
             "script's docstring. Hit share: prompt tokens served from the cache / prompt tokens of completed "
             "prefills. Ceiling: one cache with room for every prefix, shared by all replicas, under the same adapter "
             "mapping (computed from the requests); the gap is what 8 replicas' separate, bounded KV caches and "
             "load-based routing leave.", "",
             "| adapters | prefix caching | hit share | ceiling | mean TTFT s | P99 TTFT s | mean E2E s | req/s "
             "| completed | rejected |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['adapters']} | {'on' if r['prefix_caching'] else 'off'} | {r['prefix_hit_share']:.2%} | "
                     f"{r['ceiling']:.2%} | "
                     f"{r['mean_ttft_s']:.4g} | {r['p99_ttft_s']:.4g} | {r['mean_latency_s']:.4g} | "
                     f"{r['throughput_rps']:.4g} | {r['completed']} | {r['rejected']} |")
    lines += ["", "TTFT with caching / without:", ""]
    for a in sorted({r["adapters"] for r in rows}):
        off, on = (next(r for r in rows if r["adapters"] == a and r["prefix_caching"] is c) for c in (False, True))
        lines.append(f"- {a} adapter(s): mean {on['mean_ttft_s'] / off['mean_ttft_s']:.3f}, "
                     f"P99 {on['p99_ttft_s'] / off['p99_ttft_s']:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prefix_caching_"))
    ceiling = {a: unbounded_share(a) for a in (1, 32)}
    rows = [{**run(a, c, work / f"{a}_{c}"), "ceiling": round(ceiling[a], 6)} for a in (1, 32) for c in (False, True)]
    for r in rows:
        print(json.dumps(r), flush=True)
    text = report(rows)
    dest = RESULTS if args.record else work
    write_report(dest, "prefix_caching", rows, text)
    print(text)
    print(finish(dest, ["prefix_caching.csv", "prefix_caching.md"], args.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
