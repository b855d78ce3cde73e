"""Fidelity: the simulator against the runtime on the same requests, as `dlora-validate` measures it.

Cases: slora and dlora x a synthetic workload (Poisson, short lengths) and an Azure conv window (real
lengths, 8 Zipf adapters) x moderate (~50%) and high (~90%) load. Load is set from the runtime's
capacity as the simulator sees it with the runtime's profile (an overloaded simulated run's completed
requests per second), so both halves get the same arrivals. Each case replays on the runtime's real
clock, then simulates it (the runtime's profile and KV blocks) and compares. Tolerances are reported,
never asserted. CPU timing wants an otherwise idle machine: the 1-minute load average is recorded
before and after each case.

A profile is a property of one machine: `--calibrate` first measures a fresh one with
`dlora-calibrate --replays` on this machine (microbenchmarks, then calibration replays on other
requests whose served iterations join the fit: a fit to the microbenchmarks alone priced a held-out
replay's served iterations low, see calibration/replays.py) and runs every case on it (both halves). On a CPU a case's real-clock error moves by
tens of points between runs minutes apart (the machine's speed drifts and the real clock cannot be
scaled), so every case runs `--repeats` times and the report gives the median of each metric and the
range of the mean E2E error. The repeats are interleaved (every case once, then every case again), so a
case's repeats sample the machine across the recording, not one stretch of it: run back to back, a
case's repeats shared their stretch's drift (their price biases moved together), which
their median could not average out. `--clocks real,measured` also replays each repeat on the runtime's
measured clock (each step's own time, scaled on a CPU to the profile's reference probe, a decode step
of the same model, so both halves are timed at the calibration's machine speed), right after the real
one: what is left there is the cost model's error and per-iteration noise, not drift, idle gaps or the
host's scheduling. Beside each case's errors the report gives the runtime's spread over its repeats
(the runtime against itself) and the simulator's errors at the runtime's own price level (the run's
overall price bias taken out: what is left comes from the terms' shape, the policies' paths and noise).

    python benchmarks/fidelity.py [--record] [--calibrate] [--clocks real,measured] [--repeats 3] [--requests 120] [serve overrides]

Several replicas (`--replicas 2`): the runtime's replicas run as Ray actors (runtime.workers=auto), and
the systems are dLoRA with its co-migration on (made eager enough to move requests in a short run:
`MIGRATING`, KV transfer or recompute, whichever the profile prices lower) against dLoRA's policies
dispatched round-robin with no migration (`dlora_rr`): the cluster-level half of the paper, priced and
served.

Writes a temporary folder unless --record (benchmarks/results/fidelity_<device>[_<n>replicas].{csv,md}).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recording import RESULTS, finish, write_report  # noqa: E402
from benchmarks.kernels import name_slug  # noqa: E402
from calibration.replays import WORKLOADS, case_overrides, serve  # noqa: E402
from calibration.validate import GOALS, METRICS, tolerance, validate  # noqa: E402
from dlora_sim.core.errors import reported  # noqa: E402

LOADS = {"moderate": 0.5, "high": 0.9}
SYSTEMS = ("slora", "dlora")
CLUSTER_SYSTEMS = ("dlora", "dlora_rr")
MIGRATING = ["migration.interval_s=0.1", "migration.count_trigger=1", "migration.min_gain_s=0.001", "migration.mode=auto",
             "migration.time_limit_s=0.01"]   # a CPU replica serves this workload in milliseconds per request
# a case's system -> (the system config, its extra overrides)
SYSTEM_VARIANTS = {"dlora_rr": ("dlora", ["router=rr", "migration=none"])}


def system_overrides(system: str, replicas: int) -> tuple[str, list[str]]:
    name, extra = SYSTEM_VARIANTS.get(system, (system, []))
    if replicas > 1:
        extra = [f"cluster.num_replicas={replicas}", *extra, *(MIGRATING if name == "dlora" and not extra else [])]
    return name, extra


def run_case(overrides: list[str], out: Path, clock: str = "real") -> dict:
    serve([*overrides, "charts=false"], out / "runtime", clock)
    return validate(out / "runtime", out)


def _cases(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["workload"], r["load"], r["system"], r.get("clock", "real")), []).append(r)
    return out


def _median(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def runtime_spread(rs: list[dict]) -> dict[str, float | None]:
    """The runtime against itself: per goal metric, max / min - 1 over a case's repeats (None with fewer
    than two). The simulator is deterministic, so an error no larger than this is as close to the runtime
    as the runtime's own repeats are to each other."""
    out: dict[str, float | None] = {}
    for key in GOALS:
        vals = [r[f"runtime_{key}"] for r in rs if r.get(f"runtime_{key}")]
        out[key] = max(vals) / min(vals) - 1 if len(vals) >= 2 else None
    return out


def verdicts(med: dict[str, float | None], spread: dict[str, float | None]) -> dict[str, str]:
    """Per goal metric: `goal`, `minimum` (the at-least tolerance), `noise` (beyond it, but within the
    runtime's own spread over the repeats) or `miss`."""
    out = {}
    for key in GOALS:
        e, sp = med.get(key), spread.get(key)
        v = tolerance(key, e)
        out[key] = "noise" if v == "miss" and sp is not None and abs(e) <= sp else v
    return out


def report(rows: list[dict], device: str, profile: str, calibration: str, scaling: str = "") -> str:
    cases = _cases(rows)
    reps = max(len(v) for v in cases.values())
    clocks = list(dict.fromkeys(r.get("clock", "real") for r in rows))
    lines = [f"# Fidelity: simulator vs runtime ({device}, profile `{profile}`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} (the command above): each case "
             f"replays the same requests on the runtime ({' and '.join(clocks)} clock) and in the simulator (the runtime's profile and KV "
             f"blocks), {reps} time(s); relative error = simulator / runtime - 1, the median over the repeats "
             "(the mean E2E column also gives its range). Goals (at least): " +
             ", ".join(f"{k} {g:.0%} ({m:.0%})" for k, (g, m) in GOALS.items()) + ".", "", calibration + scaling, "",
             "| workload | load | system | clock | rate (req/s) | " + " | ".join(lab for _, lab in METRICS) +
             " | mean E2E range | KS E2E | per-request mean abs | iterations rt / sim | loadavg before / after |",
             "|---|---|---|---|---|" + "---|" * len(METRICS) + "---|---|---|---|---|"]
    tally = {"goal": 0, "minimum": 0, "noise": 0, "miss": 0}
    tally_matched = {"goal": 0, "minimum": 0, "noise": 0, "miss": 0, "-": 0}
    spreads = []
    for (workload, load, system, clock), rs in cases.items():
        med = {k: _median([r[k] for r in rs]) for k, _ in METRICS}
        spread = runtime_spread(rs)
        ver = verdicts(med, spread)
        worst = _worst(ver.values())
        tally[worst] = tally.get(worst, 0) + 1
        worst_matched = _worst(verdicts({k: _median([r.get(f"matched_{k}") for r in rs]) for k in GOALS},
                                        spread).values())
        tally_matched[worst_matched] += 1
        missed = "; ".join(f"{lab} {med[k]:+.1%}{' (noise)' if ver[k] == 'noise' else ''}"
                           for k, lab in METRICS if ver.get(k) in ("noise", "miss")) or "-"
        spreads.append(f"| {workload} | {load} | {system} | {clock} | " +
                       " | ".join("-" if spread[k] is None else f"{spread[k]:.1%}" for k in GOALS) +
                       f" | {worst} | {missed} | {worst_matched} |")
        errs = " | ".join("-" if med[k] is None else f"{med[k]:+.1%}" for k, _ in METRICS)
        e2e = [r["mean_latency_s"] for r in rs if r["mean_latency_s"] is not None]
        span = f"{min(e2e):+.1%} ... {max(e2e):+.1%}" if e2e else "-"
        lines.append(f"| {workload} | {load} | {system} | {clock} | {rs[0]['rate_rps']:.3g} | {errs} | {span} | "
                     f"{_median([r['ks_latency'] for r in rs]):.3f} | {_median([r['per_request_mean_abs'] for r in rs]):.3f} | "
                     f"{'/'.join(str(r['iterations_runtime']) for r in rs)} / {rs[0]['iterations_sim']}"
                     + (f" (migrations {'/'.join(str(r['migrations_runtime']) for r in rs)} / {rs[0]['migrations_sim']})"
                        if any(r.get("migrations_runtime") or r.get("migrations_sim") for r in rs) else "") + " | "
                     f"{rs[0]['loadavg_before']} / {rs[-1]['loadavg_after']} |")
    n, n_matched = len(cases), len(cases) - tally_matched["-"]
    at_level = ""
    if n_matched:
        at_level = (f" At that level, of {n_matched} cases{' with a price level' if n_matched < n else ''}, "
                    f"{tally_matched['goal']} meet every goal, {tally_matched['goal'] + tally_matched['minimum']} "
                    f"every minimum, {tally_matched['noise']} miss one within the runtime's spread and "
                    f"{tally_matched['miss']} by more.")
    lines += ["", f"Of {n} cases (their median errors), {tally['goal']} meet every goal, "
              f"{tally['goal'] + tally['minimum']} every minimum, {tally['noise']} miss a minimum by no more than the "
              f"runtime's own spread over the repeats, and {tally['miss']} miss one by more. The table below gives "
              "the runtime against itself (max / min - 1 of its own metric over the repeats; the simulator is "
              "deterministic, so an error within it is as close as the runtime's repeats are to each other) and "
              "each case's worst verdict with the metrics beyond the minimum. Its last column gives the worst "
              "verdict of the simulator at the runtime's price level: each repeat rerun with its compute prices "
              "scaled by measured / predicted time over the runtime's priced iterations, which takes out most of "
              "the run's overall price bias (on a CPU mostly the session's drift since the calibration); a "
              "diagnostic, not the result." + at_level, "",
              "| workload | load | system | clock | " + " | ".join(dict(METRICS)[k] for k in GOALS) +
              " | worst | beyond the minimum | at the runtime's price level |",
              "|---|---|---|---|" + "---|" * len(GOALS) + "---|---|---|", *spreads]
    lines += ["", "Where a goal is missed: the cost model's price of the runtime's own iterations (simulator / "
              "runtime - 1, by mode and batch size) is the term-level cause; the per-iteration spread around it "
              "is timing noise (on a CPU the machine's drift, which only the measured clock scales away). "
              "Queueing near capacity amplifies both. The next-to-last column gives the median repeat's mean E2E / "
              "P99 E2E / mean TTFT errors (x1) and the simulator's with every iteration's compute price scaled by "
              "0.99 and 1.01: where 1% of price moves a metric by more than its error, the case is fragile (dLoRA's "
              "merge decisions near capacity flip on any small difference), and its error says little about "
              "the cost model's terms; the last, the same three errors at the runtime's price level (its factor "
              "first). Per repeat:", "",
              "| workload | load | system | clock | price bias, all iterations | by batch (mode, sizes: bias), the "
              "median repeat | by step kind (mode, kind: bias of the sum), the median repeat | mean abs per "
              "iteration | prices x1, x0.99 and x1.01, the median repeat | at the runtime's price level, the "
              "median repeat |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (workload, load, system, clock), rs in cases.items():
        mid = sorted(rs, key=lambda r: r["mean_latency_s"] if r["mean_latency_s"] is not None else 0)[len(rs) // 2]
        lines.append(f"| {workload} | {load} | {system} | {clock} | {', '.join(r['price_bias'] for r in rs)} | "
                     f"{mid['price_by_batch']} | {mid.get('price_by_kind', '-')} | {', '.join(r['price_mean_abs'] for r in rs)} | "
                     f"{mid.get('price_sensitivity', '-')} | {_matched_text(mid)} |")
    return "\n".join(lines) + "\n"


def _worst(verdicts_: Iterable[str]) -> str:
    """A case's worst verdict over its goal metrics (`-` when none has an error)."""
    seen = set(verdicts_)
    return next((v for v in ("miss", "noise", "minimum", "goal") if v in seen), "-")


def _matched_text(row: dict) -> str:
    if not row.get("price_level"):
        return "-"
    return f"x{float(row['price_level']):.3f}: " + three_errors({k: row.get(f"matched_{k}") for k in GOALS})


def calibrate(work: Path, overrides: list[str]) -> tuple[list[str], str]:
    """A profile measured now on this machine (`dlora-calibrate`): the override that selects it, and a
    line for the report."""
    from calibration.calibrate import main as calibrate_main
    out = work / "calibrate"
    calibrate_main(["--out", str(out), "--replays", *overrides])
    fit = json.loads((out / "fit_report.json").read_text())
    kinds = {(b["kind"], b["split"]): b for b in fit.get("by_kind", [])}
    served, held = kinds.get(("served", "fit")), kinds.get(("served", "heldout"))
    replays = sum(r.get("split", "fit") == "fit" for r in fit["measured_on"].get("replays") or [])
    line = (f"Profile measured by `dlora-calibrate --replays` on this machine just before the cases "
            f"({fit['measured_on'].get('date')}: microbenchmarks and {served['n'] if served else 0} iterations of "
            f"{replays} calibration replays on other requests; fit error in sample "
            f"{fit['in_sample']['mean_abs_rel']:.1%}, held out {fit['held_out']['mean_abs_rel']:.1%} on random mixed "
            "batches" + (f" and {held['mean_abs_rel']:.1%} (bias in the sum {held['sum_bias']:+.1%}) on the "
                         f"{held['n']} iterations of a held-out replay" if held else "") +
            f"; points.csv sha256 {fit['points_csv_sha256'][:12]}).")
    return [f"profile.path={out / 'profile.yaml'}"], line


def session_check(overrides: list[str], quick: bool = False) -> dict:
    """The profile against one sweep of its own microbenchmark grid re-measured now, timed in the
    profile's units (each run drift-scaled, then by the profile's reference probe over this session's):
    what the probe does not track of the machine's speed since the calibration, per kind of point. A
    case's price bias near these numbers is the session's, not a cost-model term's."""
    from calibration.calibrate import bias_by_kind
    from dlora_sim.core.config import compose
    from calibration.microbench import BenchConfig, Harness, compute_points
    from dlora_gpu.executor import runtime_config
    from dlora_sim.core.config import build_profile
    cfg = compose(overrides, "serve")
    profile = build_profile(cfg)
    bench = BenchConfig(sweeps=1, quick=quick, repeats=2 if quick else 5, warmup=1 if quick else 2)
    harness = Harness(runtime_config(cfg.runtime), profile, bench)
    ref = profile.provenance.reference_probe_s
    if not (harness.reference_s and ref):
        return {"scaled": False, "by_kind": []}
    session = harness.reference_s   # the burst at the start, which every run's drift factor refers to
    rows = harness.rescale(compute_points(harness, bench), to=ref)
    return {"scaled": True, "session_probe_s": session, "profile_probe_s": ref, "by_kind": bias_by_kind(profile, rows)}


def session_text(check: dict) -> str:
    """The session check as a sentence of the report ("" when it could not scale: a GPU)."""
    if not check.get("by_kind"):
        return ""
    kinds = ", ".join(f"{b['kind']}{'' if b['split'] == 'fit' else ' held out'} {b['sum_bias']:+.1%}"
                      for b in check["by_kind"])
    return (f" Session check, before the cases: the profile's price of its own microbenchmark points re-measured "
            f"now (one sweep, in the profile's units; this session's probe {check['session_probe_s'] * 1e3:.3f} ms, "
            f"the calibration's {check['profile_probe_s'] * 1e3:.3f} ms), bias in the sum: {kinds}. A case's "
            "price bias near these is the machine's drift since the calibration that the probe does not track.")


def _run_repeat(overrides: list[str], out: Path, clock: str) -> tuple[dict, dict]:
    """One replay of a case on `clock` and its validation: (validation, the report row's measurements)."""
    before = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    v = run_case(overrides, out, clock)
    return v, {**v["relative_error"], **{f"runtime_{k}": v["runtime"][k] for k, _ in METRICS},
               "ks_latency": v["ks_latency"],
               "per_request_mean_abs": v["per_request_latency_rel_err"]["mean_abs"],
               "iterations_runtime": v["counts"]["num_iterations"]["runtime"],
               "iterations_sim": v["counts"]["num_iterations"]["simulator"],
               "migrations_runtime": v["counts"].get("num_migrations", {}).get("runtime"),
               "migrations_sim": v["counts"].get("num_migrations", {}).get("simulator"),
               "loadavg_before": before, "loadavg_after": round(os.getloadavg()[0], 2),
               "wall_s": round(time.perf_counter() - t0, 1), **price_errors(v["iteration_error"]),
               "price_by_kind": kind_errors(v.get("iteration_error_by_kind") or []),
               "price_sensitivity": sensitivity_text({"x1": v["relative_error"], **(v.get("price_sensitivity") or {})}),
               **matched_errors(v.get("price_matched") or {})}


def matched_errors(matched: dict) -> dict:
    """A repeat's goal-metric errors with the simulator's prices at the runtime's own price level
    (`calibration.validate.price_matched`), and that factor."""
    errs = matched.get("relative_error") or {}
    return {"price_level": matched.get("factor"), **{f"matched_{k}": errs.get(k) for k in GOALS}}


def three_errors(e: dict) -> str:
    """Mean E2E / P99 E2E / mean TTFT errors of one simulation, `-` where one is missing."""
    return " / ".join("-" if e.get(k) is None else f"{e[k]:+.1%}"
                      for k in ("mean_latency_s", "p99_latency_s", "mean_ttft_s"))


def sensitivity_text(sens: dict) -> str:
    """The simulator's mean E2E, P99 E2E and mean TTFT errors at each price factor (x1: the repeat's own
    errors, the baseline the others move from), in a line."""
    return "; ".join(f"{f}: {three_errors(e)}" for f, e in sens.items()) or "-"


def _factors(scaling: dict | None) -> list[float]:
    """The measured clock's median drift factor of one case (none when unscaled)."""
    return [scaling["factor_median"]] if scaling and scaling.get("scaled") else []


def kind_errors(by_kind: list[dict]) -> str:
    """The cost model's bias by mode and step kind in a line (u mixed: unmerged steps with a prefill and
    decodes)."""
    return "; ".join(f"{b['mode'][0]} {b['kind']}: {b['sum_bias']:+.0%} (n={b['n']})" for b in by_kind) or "-"


def price_errors(iteration_error: list[dict]) -> dict:
    """The cost model's bias over all of a run's iterations, per bucket, and the mean absolute error."""
    n = sum(b["n"] for b in iteration_error)
    if not n:
        return {"price_bias": "-", "price_by_batch": "-", "price_mean_abs": "-"}
    pred = sum(b["n"] * b["predicted_mean_s"] for b in iteration_error)
    meas = sum(b["n"] * b["measured_mean_s"] for b in iteration_error)
    by = "; ".join(f"{b['mode'][0]} {b['batch']}: {b['mean_rel_err']:+.0%} (n={b['n']})" for b in iteration_error)
    mean_abs = sum(b["n"] * b["mean_abs_rel_err"] for b in iteration_error) / n
    return {"price_bias": f"{pred / meas - 1:+.1%}", "price_by_batch": by, "price_mean_abs": f"{mean_abs:.1%}"}


def require_traces(workloads: Iterable[str], overrides: list[str]) -> None:
    """Stop before the first case, with one line, when a workload's trace is not on this machine."""
    from dlora_sim.core.config import compose, instantiated
    from dlora_sim.traces.workloads import require_traces as require
    for w in workloads:
        require(instantiated(compose([*overrides, *WORKLOADS[w]], "serve").workload, "workload"))


@reported("fidelity.py")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="serve overrides (e.g. runtime=h200_7b)")
    ap.add_argument("--requests", type=int, default=120, help="requests per case")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every case (the report gives medians)")
    ap.add_argument("--calibrate", action="store_true", help="measure this machine's profile first and use it")
    ap.add_argument("--clocks", default="real",
                    help="runtime clocks, each repeat on each in turn: real (wall time), measured (each step's own "
                         "time, drift-scaled on a CPU)")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/fidelity_<device>.{csv,md}")
    ap.add_argument("--session-check", action="store_true",
                    help="first re-time one sweep of the profile's microbenchmark grid (minutes on a CPU) and report "
                         "its price bias: the machine's drift since the calibration that the probe does not track")
    ap.add_argument("--systems", default=None, help=f"default {','.join(SYSTEMS)}; with --replicas > 1 "
                                                    f"{','.join(CLUSTER_SYSTEMS)}")
    ap.add_argument("--replicas", type=int, default=1, help="replicas per case (Ray actors when > 1)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--loads", default=",".join(LOADS))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.replicas < 1:
        ap.error(f"--repeats and --replicas must be >= 1, got {args.repeats} and {args.replicas}")
    systems = (args.systems or ",".join(SYSTEMS if args.replicas == 1 else CLUSTER_SYSTEMS)).split(",")
    clocks = args.clocks.split(",")
    if not clocks or any(c not in ("real", "measured") for c in clocks):
        ap.error(f"--clocks must list real and/or measured, got {args.clocks!r}")
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        ap.error(f"--workloads: unknown {unknown}; valid: {sorted(WORKLOADS)}")
    require_traces(args.workloads.split(","), list(args.overrides))
    work = Path(tempfile.mkdtemp(prefix="fidelity_"))
    overrides, calibration = list(args.overrides), "Profile: the committed one (measured before these cases, not for them)."
    if args.calibrate:
        extra, calibration = calibrate(work, overrides)
        overrides += extra
    session = ""
    if args.session_check:
        check = session_check(overrides)
        session = session_text(check)
        print(json.dumps({"session_check": check}), flush=True)
    cases = [(workload, load_name, system,
              *case_overrides(workload, system_overrides(system, args.replicas)[0], LOADS[load_name], args.requests,
                              overrides + system_overrides(system, args.replicas)[1]))
             for workload in args.workloads.split(",") for load_name in args.loads.split(",")
             for system in systems]
    rows, device, profile, factors = [], "?", "?", []
    for rep in range(args.repeats):   # interleaved: every case once, then every case again (see the docstring)
        for workload, load_name, system, ov, rate in cases:
            for clock in clocks:
                v, row = _run_repeat(ov, work / f"{workload}_{load_name}_{system}_{clock}_{rep}", clock)
                device, profile = v["about"]["device"], v["about"]["profile"]
                factors += _factors(v["about"].get("clock_scaling"))
                rows.append({"workload": workload, "load": load_name, "system": system, "repeat": rep,
                             "clock": clock, "rate_rps": float(rate), **row})
                print(json.dumps(rows[-1]), flush=True)
    slug = ("cpu" if "cpu" in str(device).lower() else name_slug(str(device))) + \
        (f"_{args.replicas}replicas" if args.replicas > 1 else "")
    out = RESULTS if args.record else work
    scaling = ""
    if factors:
        scaling = (f" The measured clock scaled the runtime's steps to the profile's reference probe: per-case median "
                   f"factors {min(factors):.3f} ... {max(factors):.3f}.")
    elif "measured" in clocks:
        scaling = " The measured clock was not scaled (a GPU, or a profile without a reference probe)."
    text = report(rows, device, Path(str(profile)).name if args.calibrate else profile, calibration,
                  scaling + session)
    write_report(out, f"fidelity_{slug}", rows, text)
    print(text)
    print(finish(out, [f"fidelity_{slug}.csv", f"fidelity_{slug}.md"], args.record))
    print(f"case folders in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
