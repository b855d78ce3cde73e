"""Which reference probe tracks the runtime's speed drift on a CPU: side by side, in one run.

Interleaves, for `--seconds`, each candidate probe with decode steps of the cpu_tiny runtime (merged
batch 1, merged batch 8, unmerged batch 8 over 4 adapters; fresh requests every 100 rounds, context
300-400); every other round a large prefill runs before each probe and the step, so a probe that
times the cache state the previous step left rather than the machine shows it. Then groups the
rounds into blocks of `--block` and compares the step time's block medians with each probe's. A probe
that tracks the drift leaves little spread in log(step / probe) between blocks; slope 1 means it moves
exactly as much as the steps. The per-step column applies the measured clock's own scaling (the median of the
last 9 probes) to each step.

    python benchmarks/drift_probe.py [--seconds 240] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.recording import finish, output_dir, write_report  # noqa: E402


PROBES = ("matmul", "dispatch", "dispatch_warm", "step_2x64", "step_8x128")
STEPS = {"merged 1": (1, 0), "merged 8": (8, 0), "unmerged 8x4": (8, None)}   # (sequences, merged adapter)


def _measure(seconds: float) -> dict[str, np.ndarray]:
    from dlora_sim.core.config import compose
    from calibration.microbench import BenchConfig, Harness
    from dlora_gpu.drift import DispatchProbe, MatmulProbe, StepProbe
    from dlora_gpu.executor import runtime_config
    from dlora_sim.core.config import build_profile
    from dlora_sim.core.contracts import Decision
    cfg = compose([], "serve")
    h = Harness(runtime_config(cfg.runtime), build_profile(cfg),
                BenchConfig(max_kv_blocks=cfg.cluster.replica.max_kv_blocks, reference=False))
    probes = {"matmul": MatmulProbe(), "dispatch": DispatchProbe(), "dispatch_warm": DispatchProbe(warm=2),
              "step_2x64": StepProbe(h.ex.model, seqs=2, context=64), "step_8x128": StepProbe(h.ex.model)}
    h.ensure_resident([0, 1, 2, 3])

    def fresh(n: int, mode: int | None):
        h.set_mode(mode)
        reqs = h.new([0] * n if mode is not None else [i % 4 for i in range(n)], [300] * n)
        h.step(Decision(reqs, merged=mode), scaled=False)
        return reqs

    def step(reqs, mode: int | None) -> float:
        h.set_mode(mode)   # untimed
        t0 = time.perf_counter()
        h.step(Decision(reqs, merged=mode), scaled=False)
        return time.perf_counter() - t0

    def big_prefill() -> None:
        """An untimed 256-token prefill: the cache state a large step leaves behind."""
        h.set_mode(0)
        reqs = h.new([0], [256])
        h.step(Decision(reqs, merged=0), scaled=False)
        h.drop(reqs)

    cols: dict[str, list[float]] = {f"{k}_{n}": [] for n in STEPS for k in (*PROBES, "step", "after_big")}
    batches = {name: fresh(n, mode) for name, (n, mode) in STEPS.items()}
    end, rounds = time.time() + seconds, 0
    while time.time() < end:
        rounds += 1
        if rounds % 100 == 0:
            for name, (n, mode) in STEPS.items():
                h.drop(batches[name])
                batches[name] = fresh(n, mode)
        for name, reqs in batches.items():
            mode = STEPS[name][1]
            h.set_mode(mode)
            after_big = rounds % 2 == 0
            if after_big:
                big_prefill()
                h.set_mode(mode)
            cols[f"after_big_{name}"].append(float(after_big))
            for probe in PROBES:   # each probe right after the preceding step, in turn
                if after_big and probe != PROBES[0]:
                    big_prefill()
                    h.set_mode(mode)
                cols[f"{probe}_{name}"].append(probes[probe]())
            if after_big:
                big_prefill()
            cols[f"step_{name}"].append(step(reqs, mode))
    return {k: np.array(v) for k, v in cols.items()}


def _trailing_median(x: np.ndarray, w: int) -> np.ndarray:
    return np.array([np.median(x[max(0, i - w + 1):i + 1]) for i in range(len(x))])


def _robust_sd(logs: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(logs - np.median(logs))))


def analyse(cols: dict[str, np.ndarray], block: int) -> list[dict]:
    rows = []
    for n in STEPS:
        step, big = cols[f"step_{n}"], cols[f"after_big_{n}"] > 0
        probes = {"none": np.ones_like(step), **{k: cols[f"{k}_{n}"] for k in PROBES},
                  "matmul x dispatch (geometric mean)": np.sqrt(cols[f"matmul_{n}"] * cols[f"dispatch_{n}"])}
        nb = len(step) // block
        blocks = lambda v: np.log([np.median(v[i * block:(i + 1) * block]) for i in range(nb)])  # noqa: E731
        ks = blocks(step)
        for name, p in probes.items():
            kp = blocks(p)
            probe = name != "none"
            rows.append({"batch": n, "probe": name, "rounds": len(step), "blocks": nb,
                         "step_ms": round(float(np.median(step)) * 1e3, 4),
                         "probe_ms": round(float(np.median(p)) * 1e3, 4) if probe else "",
                         "after_large_step": round(float(np.median(p[big]) / np.median(p[~big])), 3) if probe else
                         round(float(np.median(step[big]) / np.median(step[~big])), 3),
                         "block_sd_log": round(float(np.std(ks - kp)), 4),
                         "slope": round(float(np.polyfit(kp, ks, 1)[0]), 3) if probe else "",
                         "per_step_sd_log": round(_robust_sd(np.log(step / _trailing_median(p, 9))), 4)})
    return rows


def report(rows: list[dict], seconds: float, block: int, load: tuple[float, float]) -> str:
    lines = ["# Drift probes: which reference tracks the CPU runtime's speed", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/drift_probe.py --seconds {seconds:g}`: "
             f"cpu_tiny runtime, 1 torch thread; every round times the matmul probe (384x384 float32), the "
             f"dispatch probe (2-layer 1x256 op chain) as it comes and warm (the fastest of 2 after a warm-up run), "
             f"the step probes (a decode step of the runtime's model on a scratch cache, base weights: 2 sequences "
             f"at context 64; 8 at 128, the reference), and one decode step at context 300 of each kind (merged "
             f"batch 1, merged batch 8, unmerged batch 8 over 4 adapters); every other round an untimed 256-token "
             f"prefill runs before each probe and the step. "
             f"Block = {block} rounds. 1-min load average before / after: {load[0]:.2f} / {load[1]:.2f}.", "",
             "block sd: the standard deviation between blocks of log(step median / probe median), the slow "
             "drift a probe leaves (probe `none`: the steps' own drift); slope: how much log step moves per "
             "unit of log probe (1 = in step); per-step sd: robust sd of log(step / median of the last 9 "
             "probes), as the measured clock scales; after large step: the probe's median after the prefill / "
             "otherwise (probe `none`: the step's), which should be 1 for a probe that times the machine and "
             "not the cache state the last step left.", "",
             "| step | probe | rounds | step (ms) | probe (ms) | after large step | block sd | slope | per-step sd |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['probe']} | {r['rounds']} | {r['step_ms']} | {r['probe_ms']} | {r['after_large_step']} | "
              f"{r['block_sd_log']:.3f} | {r['slope']} | {r['per_step_sd_log']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--block", type=int, default=200)
    ap.add_argument("--record", action="store_true", help="write into benchmarks/results/")
    a = ap.parse_args()
    if a.seconds <= 0 or a.block < 2:
        ap.error("--seconds must be > 0 and --block >= 2")
    before = os.getloadavg()[0]
    cols = _measure(a.seconds)
    if len(cols["step_merged 1"]) < 3 * a.block:
        ap.error(f"only {len(cols['step_merged 1'])} rounds in {a.seconds:g} s: fewer than 3 blocks of {a.block}; run longer")
    rows = analyse(cols, a.block)
    text = report(rows, a.seconds, a.block, (before, os.getloadavg()[0]))
    out = output_dir(a.record, "drift_probe")
    write_report(out, "drift_probe", rows, text)
    print(text)
    print(finish(out, ["drift_probe.csv", "drift_probe.md"], a.record))


if __name__ == "__main__":
    main()
