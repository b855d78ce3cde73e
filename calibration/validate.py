"""`dlora-validate`: how far the simulator is from the runtime on one trace.

Replays the workload through the runtime on the real clock (`--clock measured`: each step's own
measured time, drift-scaled on a CPU, see dlora_gpu.engine) or reads a runtime results folder brought
back from another machine, `--runtime-folder`), then simulates the same config: the same policies,
the runtime's profile and its KV block count. Requests are matched by id. Reports the relative error
of mean / P50 / P90 / P99 end-to-end latency, mean and P99 TTFT, mean TPOT and throughput; the KS
distance between the two latency distributions; counts (iterations, switches, adapter loads,
preemptions); and, from the runtime's own iterations, the cost model's per-iteration error by mode
and batch size (measured duration vs the `predicted_s` the runtime recorded). Two diagnostics rerun
the simulator with its compute prices scaled: by 0.99 and 1.01 (is the case fragile?) and to the
runtime's own price level (what is left once the run's overall price bias is out?). Writes
validation.json, validation.md and validation.png (latency and TTFT CDFs).

    dlora-validate system=dlora workload.num_requests=80            # CPU, runtime=cpu_tiny
    dlora-validate --runtime-folder path/to/runtime/results         # compare without re-running
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from scipy.stats import ks_2samp

from dlora_sim.des.engine import build_simulation
from dlora_sim.core.errors import UserError, reported
from dlora_sim.core.results import summarize, write_results

METRICS = [("mean_latency_s", "mean E2E"), ("p50_latency_s", "P50 E2E"), ("p90_latency_s", "P90 E2E"),
           ("p99_latency_s", "P99 E2E"), ("mean_ttft_s", "mean TTFT"), ("p99_ttft_s", "P99 TTFT"),
           ("mean_tpot_s", "mean TPOT"), ("throughput_rps", "throughput")]
COUNTS = ["num_iterations", "num_switches", "num_adapter_loads", "num_preemptions", "num_swap_outs", "num_migrations",
          "completed", "rejected"]
GOALS = {"mean_latency_s": (0.02, 0.05), "p99_latency_s": (0.05, 0.10), "mean_ttft_s": (0.05, 0.15),
         "throughput_rps": (0.01, 0.03)}   # (goal, at least): relative error
BUCKETS = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 1 << 30)]


def _requests(folder: Path) -> dict[int, dict]:
    with (folder / "requests.csv").open(newline="") as f:
        return {int(r["id"]): r for r in csv.DictReader(f)}


def _iterations(folder: Path) -> list[dict]:
    with (folder / "iterations.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def iteration_errors(rows: list[dict]) -> list[dict]:
    """Cost-model error of the runtime's measured iterations, by mode and batch size."""
    if not rows or "predicted_s" not in rows[0]:
        return []
    out = []
    for mode in ("merged", "unmerged"):
        for lo, hi in BUCKETS:
            sel = [r for r in rows if r["mode"] == mode and lo <= int(r["batch_size"]) <= hi]
            if not sel:
                continue
            meas = np.array([float(r["duration_s"]) for r in sel])
            pred = np.array([float(r["predicted_s"]) for r in sel])
            rel = pred / meas - 1
            out.append({"mode": mode, "batch": f"{lo}-{hi}" if hi < 1 << 30 else f"{lo}+", "n": len(sel),
                        "mean_rel_err": round(float(rel.mean()), 4), "mean_abs_rel_err": round(float(abs(rel).mean()), 4),
                        "measured_mean_s": round(float(meas.mean()), 6), "predicted_mean_s": round(float(pred.mean()), 6)})
    return out


def tolerance(key: str, err: float | None) -> str:
    """Where a relative error of goal metric `key` falls: `goal`, `minimum` (the at-least tolerance),
    `miss`, or `-` (no error)."""
    goal, least = GOALS[key]
    return "-" if err is None else "goal" if abs(err) <= goal else "minimum" if abs(err) <= least else "miss"


STEP_KINDS = ("decode", "prefill", "mixed")   # decode-only steps, prefill-only ones, both in one step


def step_kind(row: dict) -> str:
    pre, dec = int(row["prefill_tokens"]) > 0, int(row["decode_seqs"]) > 0
    return "mixed" if pre and dec else "prefill" if pre else "decode"


def iteration_errors_by_kind(rows: list[dict]) -> list[dict]:
    """Cost-model bias in the sum (predicted / measured - 1) by mode and step kind: the steps with a
    prefill are few but set TTFT, which a bias by batch size hides among the decodes."""
    if not rows or "predicted_s" not in rows[0]:
        return []
    out = []
    for mode in ("merged", "unmerged"):
        for kind in STEP_KINDS:
            sel = [r for r in rows if r["mode"] == mode and step_kind(r) == kind]
            if sel:
                meas = sum(float(r["duration_s"]) for r in sel)
                pred = sum(float(r["predicted_s"]) for r in sel)
                out.append({"mode": mode, "kind": kind, "n": len(sel), "sum_bias": round(pred / meas - 1, 4),
                            "measured_s": round(meas, 6)})
    return out


def compare(runtime: dict, sim: dict, runtime_dir: Path, sim_dir: Path, steps: list[dict]) -> dict:
    """The simulator's summary against the runtime's; `steps`: the runtime's iterations (`_iterations`)."""
    rel = {}
    for key, _ in METRICS:
        a, b = runtime.get(key), sim.get(key)
        rel[key] = None if not a or b is None else round((b - a) / a, 6)
    ra, rb = _requests(runtime_dir), _requests(sim_dir)
    both = [i for i in ra if i in rb and ra[i]["status"] == rb[i]["status"] == "finished"]
    la = np.array([float(ra[i]["latency_s"]) for i in both])
    lb = np.array([float(rb[i]["latency_s"]) for i in both])
    per_req = (lb / la - 1) if both else np.array([])
    labels = {"goal": "goal met", "minimum": "minimum met", "miss": "missed", "-": "-"}
    verdict = {key: labels[tolerance(key, rel.get(key))] for key in GOALS}
    return {"relative_error": rel, "runtime": {k: runtime.get(k) for k, _ in METRICS},
            "simulator": {k: sim.get(k) for k, _ in METRICS},
            "counts": {k: {"runtime": runtime.get(k), "simulator": sim.get(k)} for k in COUNTS},
            "matched_requests": len(both),
            "per_request_latency_rel_err": {"mean": round(float(per_req.mean()), 6) if both else None,
                                            "mean_abs": round(float(abs(per_req).mean()), 6) if both else None,
                                            "p90_abs": round(float(np.percentile(abs(per_req), 90)), 6) if both else None},
            "ks_latency": round(float(ks_2samp(la, lb).statistic), 6) if both else None,
            "iteration_error": iteration_errors(steps),
            "iteration_error_by_kind": iteration_errors_by_kind(steps),
            "goals": {k: {"goal": g, "at_least": m, "verdict": verdict[k]} for k, (g, m) in GOALS.items()}}


def _scaling_note(scaling: dict | None) -> str:
    """What the measured clock did about the CPU's drift (nothing for the other clocks)."""
    if not scaling:
        return ""
    if not scaling.get("scaled"):
        return f" Measured clock, unscaled: {scaling.get('why')}."
    return (f" Measured clock scaled to the profile's reference probe ({scaling['probe']}, "
            f"{scaling['reference_probe_s'] * 1e3:.3f} ms): factor median {scaling['factor_median']}, "
            f"range {scaling['factor_min']}-{scaling['factor_max']}.")


def report_md(v: dict, runtime_dir: Path) -> str:
    about = v["about"]
    machine = about.get("machine_vs_calibration") or {}
    lines = ["# dlora-validate: simulator vs runtime", "",
             *([f"Command: `{about['command']}`", ""] if about.get("command") else []),
             *([f"This machine against the profile's calibration: {machine['why']} (factor {machine['factor']}).", ""]
               if machine.get("factor") is not None else []),
             f"Runtime results: `{runtime_dir}` ({v['about'].get('device')}, {v['about'].get('clock')} clock); "
             f"simulator with the runtime's profile `{v['about'].get('profile')}` and its {v['about'].get('kv_blocks')} "
             f"KV blocks. {v['matched_requests']} requests matched by id.{_scaling_note(v['about'].get('clock_scaling'))}", "",
             "| metric | runtime | simulator | relative error | goal / at least | verdict |", "|---|---|---|---|---|---|"]
    for key, label in METRICS:
        e = v["relative_error"][key]
        g = v["goals"].get(key)
        err = "-" if e is None else f"{e:+.2%}"
        goal = f"{g['goal']:.0%} / {g['at_least']:.0%}" if g else ""
        lines.append(f"| {label} | {v['runtime'][key]} | {v['simulator'][key]} | {err} | {goal} | "
                     f"{g['verdict'] if g else ''} |")
    p = v["per_request_latency_rel_err"]
    lines += ["", f"Per request (matched): mean latency error {p['mean']}, mean |error| {p['mean_abs']}, "
              f"P90 |error| {p['p90_abs']}; KS distance of the latency distributions {v['ks_latency']}.", "",
              "| count | runtime | simulator |", "|---|---|---|"]
    lines += [f"| {k} | {c['runtime']} | {c['simulator']} |" for k, c in v["counts"].items()]
    sens = v.get("price_sensitivity") or {}
    if sens:
        lines += ["", "The simulator with every iteration's compute price scaled (the relative error it would "
                      "have; where a 1% change moves a metric by more than its error, the case is fragile and "
                      "its error says little about any one cost-model term; at the runtime's price level, the "
                      "run's overall price bias is taken out and what is left comes from the terms' shape, the "
                      "policies' paths and noise):", "",
                  "| prices | " + " | ".join(lab for _, lab in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        matched = v.get("price_matched") or {}
        if matched:   # the factor that prices the runtime's own iterations, in the sum, as it measured them
            sens = {**sens, f"x{matched['factor']:.3f}: the runtime's price level": matched["relative_error"]}
        lines += [f"| {f} | " + " | ".join("-" if e.get(k) is None else f"{e[k]:+.1%}" for k, _ in METRICS) + " |"
                  for f, e in sens.items()]
    if v["iteration_error"]:
        lines += ["", "Cost model per iteration (runtime's measured duration vs the price it recorded):", "",
                  "| mode | batch | n | mean rel error | mean abs rel error | measured mean s | predicted mean s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['batch']} | {r['n']} | {r['mean_rel_err']:+.1%} | {r['mean_abs_rel_err']:.1%} | "
                  f"{r['measured_mean_s']} | {r['predicted_mean_s']} |" for r in v["iteration_error"]]
    if v.get("iteration_error_by_kind"):
        lines += ["", "Cost model by step kind (decode-only, prefill-only, both; bias of the sum: the steps with a "
                      "prefill set TTFT):", "", "| mode | kind | n | bias of the sum | measured s in all |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['kind']} | {r['n']} | {r['sum_bias']:+.1%} | {r['measured_s']} |"
                  for r in v["iteration_error_by_kind"]]
    return "\n".join(lines) + "\n"


def cdf_chart(runtime_dir: Path, sim_dir: Path, path: Path, clock: str = "real") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ra, rb = _requests(runtime_dir), _requests(sim_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("latency_s", "ttft_s"), ("end-to-end latency (s)", "time to first token (s)")):
        for reqs, name, color in ((ra, f"runtime ({clock} clock)", "C0"), (rb, "simulator", "C1")):
            v = np.sort([float(r[key]) for r in reqs.values() if r[key] != ""])
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name, color=color)
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("simulator vs runtime on the same requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sim_config(summary: dict, sim_overrides: dict | None = None):
    """The simulator's config: the one a runtime folder ran with, its KV blocks, `sim_overrides`."""
    cfg = OmegaConf.create(summary["config"])
    kv = (summary.get("runtime") or {}).get("kv_blocks")
    if kv:
        cfg.cluster.replica.max_kv_blocks = int(kv)   # exactly the runtime's blocks
    for k, v in (sim_overrides or {}).items():
        OmegaConf.update(cfg, k, v)
    return cfg


def _simulate(summary: dict, sim_overrides: dict | None = None):
    """(config, result, summary) of the simulator on `_sim_config`."""
    cfg = _sim_config(summary, sim_overrides)
    res = build_simulation(cfg).run()
    return cfg, res, {"system": summary.get("system"), **summarize(res, float(cfg.slo_s_per_token)),
                      "config": OmegaConf.to_container(cfg, resolve=True)}


SENSITIVITY = (0.99, 1.01)   # price factors the simulator is rerun with


def _cost_terms(cls: type) -> set[str]:
    """A profile section's coefficients: its float fields (a term added to the closed form is scaled too)."""
    return {f.name for f in dataclasses.fields(cls) if f.type == "float"}


def price_sensitivity(summary: dict, cfg, folder: Path, sim_overrides: dict | None = None,
                      factors: tuple[float, ...] = SENSITIVITY) -> dict:
    """The simulator's metrics (relative to the runtime's) with every iteration's compute price scaled by
    each factor. Near a policy's decision boundary (dLoRA merging or not) a 1% price change can move a
    metric by more than the error itself: then the case is fragile, its error set by which way a
    decision fell, and says little about any one term's bias."""
    import yaml
    from dlora_sim.core.config import build_profile
    from dlora_sim.core.profile import IterationCost, LoraCost
    raw = yaml.safe_load(Path(build_profile(cfg).path).read_text())
    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    for f in factors:
        scaled = copy.deepcopy(raw)
        for section, terms in [(scaled["iteration"], _cost_terms(IterationCost)),
                               *((lora, _cost_terms(LoraCost)) for lora in scaled["lora"].values())]:
            for k in terms & set(section):
                section[k] = float(section[k]) * f
        path = folder / f"profile_x{f:g}.yaml"
        path.write_text(yaml.safe_dump(scaled, sort_keys=False))
        _, _, sim = _simulate(summary, {**(sim_overrides or {}), "profile.path": str(path)})
        out[f"x{f:g}"] = {key: None if not summary.get(key) or sim.get(key) is None else
                          round((sim[key] - summary[key]) / summary[key], 6) for key, _ in METRICS}
    return out


def price_level(steps: list[dict]) -> float | None:
    """Measured / predicted time over a runtime's priced iterations (None without prices): scaled by it,
    the simulator's prices would match the runtime's measured times in the sum."""
    pred = sum(float(r["predicted_s"]) for r in steps if r.get("predicted_s"))
    return sum(float(r["duration_s"]) for r in steps if r.get("predicted_s")) / pred if pred else None


def price_matched(summary: dict, cfg, folder: Path, steps: list[dict], sim_overrides: dict | None = None) -> dict:
    """The simulator's errors with its compute prices scaled by the runtime's price level (`price_level`;
    mode changes, loads and swaps, a small part of the sum, keep their prices, so the level is matched
    closely, not exactly): the run's overall price bias (on a CPU mostly the session's drift since the
    calibration) taken out, so what remains comes from the terms' shape, the policies' paths and
    per-iteration noise. A diagnostic beside the errors, never instead of them."""
    level = price_level(steps)
    if level is None:
        return {}
    return {"factor": round(level, 6), "relative_error": next(iter(
        price_sensitivity(summary, cfg, folder, sim_overrides, (round(level, 6),)).values()))}


def validate(runtime_dir: Path, out: Path, sim_overrides: dict | None = None, machine: dict | None = None) -> dict:
    """Simulate the config a runtime folder ran with and compare; `sim_overrides` patch the config;
    `machine`: this machine's speed against the profile's calibration (`probe_machine`)."""
    summary = json.loads((runtime_dir / "summary.json").read_text())
    cfg, res, sim_summary = _simulate(summary, sim_overrides)
    kv = (summary.get("runtime") or {}).get("kv_blocks")
    sim_dir = out / "simulator"
    write_results(sim_dir, res, sim_summary)
    steps = _iterations(runtime_dir)
    v = compare(summary, sim_summary, runtime_dir, sim_dir, steps)
    v["price_sensitivity"] = price_sensitivity(summary, cfg, out / "sensitivity", sim_overrides)
    v["price_matched"] = price_matched(summary, cfg, out / "sensitivity", steps, sim_overrides)
    v["about"] = {"device": summary.get("device"), "clock": summary.get("clock"), "kv_blocks": kv,
                  "clock_scaling": summary.get("clock_scaling"),
                  "profile": cfg.profile.get("path") or f"{cfg.profile.get('hardware')}-{cfg.model.name}",
                  "runtime_dir": str(runtime_dir), "machine_vs_calibration": machine,
                  "command": "dlora-validate " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "dlora-validate"
                  else None,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(v, indent=2) + "\n")
    (out / "validation.md").write_text(report_md(v, runtime_dir))
    cdf_chart(runtime_dir, sim_dir, out / "validation.png", str(summary.get("clock") or "real"))
    return v


class FolderError(ValueError, UserError):
    """--runtime-folder names something that is not a runtime's complete results folder."""


def check_runtime_folder(folder: Path) -> None:
    """A runtime's complete results folder (dlora-serve's), not a
    simulator's: comparing the simulator with itself would meet every goal and mean nothing."""
    summary = folder / "summary.json"
    if not summary.is_file():
        raise FolderError(f"--runtime-folder {folder}: no summary.json there (not a complete results folder)")
    try:
        about = json.loads(summary.read_text())
    except ValueError:
        raise FolderError(f"--runtime-folder {summary}: not valid JSON") from None
    if not about.get("executor"):
        raise FolderError(f"--runtime-folder {folder}: a simulator's results (summary.json names no executor); "
                          "give the folder of a dlora-serve run")


def probe_machine(overrides: list[str], clock: str) -> dict:
    """The machine's speed against the profile's calibration (the reference probe), warned about on stderr
    when it is more than 10% off: on the real clock that difference lands in every error."""
    try:
        from dlora_gpu.cli import build_engine
    except ImportError:
        return {"factor": None, "why": "the runtime is not installed here (make install-runtime)"}
    from dlora_sim.core.config import build_profile, compose
    cfg = compose([*overrides, "workload.num_requests=1", "cluster.num_replicas=1", "runtime.workers=local"], "serve")
    profile = build_profile(cfg)
    if not profile.provenance.reference_probe_s > 0:   # before building a model: a GPU profile records none
        return {"factor": None, "why": f"profile {profile.name} records no reference probe"}
    engine = build_engine(cfg)
    try:
        factor, how = engine.workers.get(engine.workers.call(0, "machine_factor"))   # replica 0's worker
    finally:
        engine.close()
    if factor is not None and abs(factor - 1) > 0.10 and clock == "real":
        print(f"dlora-validate: this machine runs {1 / factor:.2f}x the speed of the profile's calibration ({how}): "
              "real-clock errors include that; --clock measured scales the runtime's steps to the calibration's "
              "speed", file=sys.stderr)
    return {"factor": None if factor is None else round(factor, 4), "why": how}


@reported("dlora-validate")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides of the serve app (runtime, system, workload...)")
    ap.add_argument("--runtime-folder", type=Path, default=None, help="compare this runtime results folder")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default outputs/validate/<stamp>)")
    ap.add_argument("--clock", choices=("real", "measured"), default=None,
                    help="the clock of the replay it runs: wall time (default), or each step's own measured time "
                         "(drift-scaled on a CPU); a --runtime-folder ran on its own")
    args = ap.parse_args(argv)
    if args.clock is not None and args.runtime_folder is not None:
        ap.error("--clock sets the clock of a replay dlora-validate runs itself; a --runtime-folder was served on "
                 "its own clock (its summary.json says which)")
    args.clock = args.clock or "real"
    out = args.out or Path("outputs/validate") / time.strftime("%Y-%m-%d_%H-%M-%S")
    runtime_dir = args.runtime_folder
    if runtime_dir is not None:
        check_runtime_folder(runtime_dir)
    else:
        from dlora_gpu import require_runtime
        require_runtime("dlora-validate")
    speed = None   # a folder brought from elsewhere ran on another machine (or this one, earlier)
    if runtime_dir is None:
        speed = probe_machine(args.overrides, args.clock)
        from calibration.replays import serve
        runtime_dir = out / "runtime"
        serve(args.overrides, runtime_dir, args.clock)
    validate(runtime_dir, out, machine=speed)
    print((out / "validation.md").read_text())
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
