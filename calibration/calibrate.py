"""`dlora-calibrate`: measure the runtime, fit a profile in the simulator's own closed form, report it.

    dlora-calibrate                                  # runtime=cpu_tiny, into outputs/calibrate/<stamp>/
    dlora-calibrate --record                         # also write calibration/profiles/cpu-tiny.yaml
    dlora-calibrate --replays                        # also fit calibration replays' served iterations
    dlora-calibrate runtime=h200_7b --record         # on a GPU: calibration/profiles/h200-llama-2-7b.yaml
    dlora-calibrate --from outputs/calibrate/<stamp> # refit points measured elsewhere, without measuring
    dlora-calibrate --from calibration/profiles/cpu-tiny.points.csv   # refit the recorded points
    dlora-calibrate --kv-transfer --record           # measure KV transfers between two workers only, and
                                                     # refit the recorded points with them

Iteration terms (overhead, per sequence, weight read / per token, context, prefill attention, the
fixed cost of two or more tokens) and the kernel LoRA terms are fitted together on the decode, prefill and mixed points, and with `--replays` the
served iterations of calibration replays (`calibration.replays`), by `calibration.fit` (relative error,
non-negative, predictions by `CostModel.iteration_time`; the two sources weigh alike, `source_weights`);
merge / unmerge / switch are the means measured; adapter loads and KV swaps fit a fixed cost plus
bytes over bandwidth. The report gives in-sample error, the error on held-out random mixed batches
that no fit saw, and each kind's bias.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import yaml
from scipy.optimize import nnls

from calibration.fit import NOISY_PASSES, Point, fit
from dlora_sim.core.config import compose
from dlora_sim.core.errors import UserError, reported
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.core.profile import Profile, load_profile, profile_from_dict

ITERATION_KEYS = ["iteration.overhead_s", "iteration.per_seq_s", "iteration.weight_read_s", "iteration.per_token_s",
                  "iteration.per_context_token_s", "iteration.per_prefill_sq_s", "iteration.multi_token_s",
                  "lora.kernel.overhead_s",
                  "lora.kernel.per_adapter_rank_s", "lora.kernel.per_token_rank_s", "lora.kernel.per_adapter_s",
                  "lora.kernel.per_call_s"]
COMPUTE_KINDS = ("decode", "prefill", "mixed", "served")   # served: a calibration replay's iterations


def read_points(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def compute_point(r: dict) -> Point:
    """An iteration's compute: its wall time less the mode-change, load and swap phases."""
    f = {k: float(r[k] or 0) for k in ("prefill_tokens", "prefill_sq", "decodes", "decode_context", "batch",
                                       "rank_sum", "token_rank", "resident_rank_sum", "distinct")}
    # LoRA passes (an adapter with prefill and decode tokens counts twice); points measured before the
    # column existed have their distinct adapters
    f["passes"] = f["distinct"] if r.get("passes") in (None, "") else float(r["passes"])
    secs = float(r["wall_s"]) - float(r["mode_s"] or 0) - float(r["load_s"] or 0) - float(r["swap_s"] or 0)
    return Point(f, max(secs, 1e-9))


def predict_compute(cost, p: Point) -> float:
    f = p.features
    return cost.iteration_time(prefill_tokens=int(f["prefill_tokens"]), prefill_sq=int(f["prefill_sq"]),
                               decode_seqs=int(f["decodes"]), decode_context=int(f["decode_context"]),
                               num_seqs=int(f["batch"]), lora_rank_sum=int(f["rank_sum"]),
                               lora_token_rank=int(f["token_rank"]), resident_rank_sum=int(f["resident_rank_sum"]),
                               lora_passes=int(f["passes"]))


MAX_BANDWIDTH = 1e15   # B/s: a slope this flat means the cost is all fixed overhead at these sizes


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Non-negative (intercept, slope) minimising relative error of y = a + b x."""
    y = np.array(ys)
    a = np.column_stack([np.ones(len(xs)), np.array(xs)]) / y[:, None]
    (c0, c1), _ = nnls(a, np.ones(len(xs)))
    return float(c0), float(c1)


def bias_by_kind(profile: Profile, rows: list[dict]) -> list[dict]:
    """The fitted cost model against each kind and split of compute points: its bias in the sum
    (predicted / measured total - 1, what a replay's time follows) and its mean absolute error."""
    from dlora_sim.core.cost_model import CostModel
    cost = CostModel(profile.with_lora_path("kernel"))
    out = []
    for kind in COMPUTE_KINDS:
        for split in ("fit", "heldout"):
            pts = [compute_point(r) for r in rows if r["kind"] == kind and r["split"] == split]
            if pts:
                pred = np.array([predict_compute(cost, p) for p in pts])
                meas = np.array([p.seconds for p in pts])
                out.append({"kind": kind, "split": split, "n": len(pts),
                            "sum_bias": round(float(pred.sum() / meas.sum() - 1), 4),
                            "mean_abs_rel": round(float(np.mean(np.abs(pred / meas - 1))), 4)})
    return out


def _microbenchmarks_alone(rows: list[dict], base: Profile, held: list[Point]) -> dict | None:
    """With served points in the fit: what the microbenchmarks alone would have fitted, against the same
    points (the difference is how far the microbenchmarks' steps are from served ones)."""
    if not any(r["kind"] == "served" for r in rows):
        return None
    pts = [compute_point(r) for r in rows if r["kind"] in COMPUTE_KINDS and r["kind"] != "served" and r["split"] == "fit"]
    res = fit(base.with_lora_path("kernel"), ITERATION_KEYS, pts, predict_compute, held_out=held, passes=NOISY_PASSES)
    return {"in_sample": res.in_sample.as_dict(), "held_out": res.held_out.as_dict() if res.held_out else None,
            "by_kind": bias_by_kind(res.profile, rows)}


def source_weights(kinds: list[str]) -> list[float] | None:
    """Served iterations and microbenchmark points weigh alike in total: the served ones are many and
    cluster at the batch sizes of one load, the microbenchmarks' grid spans the batch sizes and contexts
    the replays rarely reach (unweighted, the served points outnumber the grid and pull the fit to
    their batch sizes, pricing larger decode batches high; docs/calibration.md)."""
    served = sum(k == "served" for k in kinds)
    micro = len(kinds) - served
    if not served or not micro:
        return None
    return [1.0 if k == "served" else served / micro for k in kinds]


def fit_profile(rows: list[dict], base: Profile, csv_sha256: str, meta: dict) -> tuple[dict, dict]:
    """(profile dict for YAML, fit report) from measured points."""
    fit_rows = [r for r in rows if r["kind"] in COMPUTE_KINDS and r["split"] == "fit"]
    fit_pts = [compute_point(r) for r in fit_rows]
    held = [compute_point(r) for r in rows if r["kind"] == "mixed" and r["split"] == "heldout"]   # random mixed
    res = fit(base.with_lora_path("kernel"), ITERATION_KEYS, fit_pts, predict_compute, held_out=held,
              passes=NOISY_PASSES, weights=source_weights([r["kind"] for r in fit_rows]))
    n_served = sum(r["kind"] == "served" and r["split"] == "fit" for r in rows)
    bench = meta.get("bench") or {}
    raw = yaml.safe_load(Path(base.path).read_text())
    for key, v in res.values.items():
        node = raw
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = v
    modes = {k: median(float(r["mode_s"]) for r in rows if r["kind"] == k) for k in ("merge", "unmerge", "switch")
             if any(r["kind"] == k for r in rows)}
    raw["switch"] = {"merge_s": modes["merge"], "unmerge_s": modes["unmerge"], "switch_s": modes["switch"]}
    loads = [(float(r["bytes"]), float(r["load_s"])) for r in rows if r["kind"] == "load"]
    swaps = [(float(r["bytes"]), float(r["swap_s"])) for r in rows if r["kind"] == "swap"]
    load_c, load_b = _line_fit(*zip(*loads))
    swap_c, swap_b = _line_fit(*zip(*swaps))
    tr = raw["transfers"]
    tr["load_overhead_s"], tr["host_to_gpu_bytes_per_s"] = float(f"{load_c:.6g}"), float(f"{min(1 / max(load_b, 1e-18), MAX_BANDWIDTH):.6g}")
    tr["swap_overhead_s"], tr["kv_swap_bytes_per_s"] = float(f"{swap_c:.6g}"), float(f"{min(1 / max(swap_b, 1e-18), MAX_BANDWIDTH):.6g}")
    moves = [(float(r["bytes"]), float(r["wall_s"])) for r in rows if r["kind"] == "transfer"]
    kv_transfer = None
    if moves:   # points measured before transfers were: the base profile's terms stay
        move_c, move_b = _line_fit(*zip(*moves))
        tr["kv_transfer_overhead_s"] = float(f"{move_c:.6g}")
        tr["kv_transfer_bytes_per_s"] = float(f"{min(1 / max(move_b, 1e-18), MAX_BANDWIDTH):.6g}")
        kv_transfer = {"overhead_s": move_c, "bytes_per_s": min(1 / max(move_b, 1e-18), MAX_BANDWIDTH),
                       "workers": meta.get("kv_transfer_workers")}
    raw["lora"] = {"kernel": {**raw["lora"]["kernel"], "source": "measured: fitted with the iteration terms"}}
    report = {"points": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
              "fit_points": len(fit_pts), "heldout_points": len(held),
              "in_sample": res.in_sample.as_dict(), "held_out": res.held_out.as_dict() if res.held_out else None,
              "by_kind": bias_by_kind(res.profile, rows),
              "microbenchmarks_alone": _microbenchmarks_alone(rows, base, held),
              "coefficients": res.values, "switch_s": modes,
              "load": {"overhead_s": load_c, "bytes_per_s": min(1 / max(load_b, 1e-18), MAX_BANDWIDTH)},
              "swap": {"overhead_s": swap_c, "bytes_per_s": min(1 / max(swap_b, 1e-18), MAX_BANDWIDTH)},
              "kv_transfer": kv_transfer,
              "points_csv_sha256": csv_sha256, "measured_on": meta}
    drifts = [float(r["drift"]) for r in rows if r.get("drift")]
    if drifts:
        report["drift"] = {"median": median(drifts), "min": min(drifts), "max": max(drifts)}
    raw["provenance"] = {
        "source": "measured", "device": meta["device"], "date": meta["date"][:10],
        "method": (f"dlora-calibrate: {len(fit_pts)} decode/prefill/mixed points ("
                   + (f"{n_served} of them served iterations of calibration replays, the two sources weighing alike; "
                      if n_served else "")
                   + f"a microbenchmark point the mean of {bench.get('sweeps', 1)} sweep(s) x {bench.get('repeats', '?')} runs)"
                   + f" fitted by relative-error least squares on the simulator's cost model, {NOISY_PASSES} "
                   f"passes, errors relative to the previous pass's prediction (in-sample mean error "
                   f"{res.in_sample.mean_abs_rel:.1%}, held-out {res.held_out.mean_abs_rel if res.held_out else float('nan'):.1%} "
                   f"on {len(held)} random mixed batches); merge/unmerge/switch the mean of their runs; loads and swaps "
                   f"a fixed cost plus bytes / bandwidth"
                   + ("; KV transfers between two replicas' workers likewise" if moves else "")),
        "software": (f"dlora_gpu runtime, {meta['backend']} backend, {meta['dtype']}; torch "
                     f"{meta['versions']['torch']}, triton {meta['versions']['triton']}"),
        "anchors": [f"points.csv sha256 {csv_sha256}", f"commit {meta.get('commit', '')}",
                    f"1-min load average before measuring: {meta.get('load_avg_1min_before')}"]}
    ref = meta.get("reference") or {}
    if ref.get("scaled"):
        raw["provenance"]["reference_probe_s"] = ref["session_median_s"]
        raw["provenance"]["reference_probe"] = ref["probe"]
    profile_from_dict(raw, src="fitted profile")   # validate before anyone writes it
    return raw, report


def report_md(report: dict, profile_name: str) -> str:
    ins, held = report["in_sample"], report["held_out"]
    lines = [f"# Fit report: {profile_name}", "",
             f"Measured on {report['measured_on']['device']} ({report['measured_on']['dtype']}, "
             f"{report['measured_on']['backend']}), {report['measured_on']['date']}, 1-min load average before: "
             f"{report['measured_on'].get('load_avg_1min_before')}. Points: {report['points']}; "
             f"points.csv sha256 `{report['points_csv_sha256']}`.", "",
             "| iteration compute | points | mean abs rel err | P90 | max |", "|---|---|---|---|---|",
             f"| in sample | {ins['n']} | {ins['mean_abs_rel']:.1%} | {ins['p90_abs_rel']:.1%} | {ins['max_abs_rel']:.1%} |"]
    if held:
        lines.append(f"| held out (random mixed batches) | {held['n']} | {held['mean_abs_rel']:.1%} | "
                     f"{held['p90_abs_rel']:.1%} | {held['max_abs_rel']:.1%} |")
    if report.get("by_kind"):
        lines += ["", "By kind (served: the iterations of calibration replays; bias in the sum = predicted total / "
                      "measured total - 1, what a replay's time follows):", "",
                  "| kind | split | points | bias in the sum | mean abs rel err |", "|---|---|---|---|---|"]
        lines += [f"| {b['kind']} | {b['split']} | {b['n']} | {b['sum_bias']:+.1%} | {b['mean_abs_rel']:.1%} |"
                  for b in report["by_kind"]]
    alone = report.get("microbenchmarks_alone")
    if alone:
        served = "; ".join(f"{b['split']} {b['sum_bias']:+.1%} in the sum, {b['mean_abs_rel']:.1%} mean abs"
                           for b in alone["by_kind"] if b["kind"] == "served")
        held_alone = alone["held_out"]["mean_abs_rel"] if alone["held_out"] else float("nan")
        lines += ["", f"Fitted to the microbenchmarks alone, the same closed form errs {alone['in_sample']['mean_abs_rel']:.1%} "
                      f"in sample and {held_alone:.1%} on the held-out random mixed batches, and on the served "
                      f"iterations: {served}."]
    for r in report["measured_on"].get("replays") or []:
        lines.append(f"\nCalibration replay {r['workload']} / {r['system']} at {r['load']:.0%} of capacity "
                     f"({r['rate_rps']} req/s, measured clock): {r['iterations']} iterations, {r['points']} "
                     f"{'fit' if r.get('split', 'fit') == 'fit' else 'held-out'} points.")
    ref = report["measured_on"].get("reference") or {}
    if ref.get("scaled"):
        drifts = report.get("drift") or {}
        lines += ["", f"Timings scaled to the session's reference speed ({ref['probe']} before every timed run; "
                      f"its median over the session {ref['session_median_s'] * 1e3:.3f} ms, in a burst at the start "
                      f"{ref['burst_at_start_s'] * 1e3:.3f} ms and at the end {ref['burst_at_end_s'] * 1e3:.3f} ms; "
                      f"per-point factor median "
                      f"{drifts.get('median', 1.0):.3f}, range {drifts.get('min', 1.0):.3f}-{drifts.get('max', 1.0):.3f})."]
    lines += ["", "Coefficients: " + ", ".join(f"`{k}` {v:.4g}" for k, v in report["coefficients"].items()),
              f"Mode changes (s): {report['switch_s']}. Adapter load: {report['load']['overhead_s'] * 1e3:.3f} ms + "
              f"bytes / {report['load']['bytes_per_s'] / 1e9:.3f} GB/s. KV swap: "
              f"{report['swap']['overhead_s'] * 1e6:.1f} us + bytes / {report['swap']['bytes_per_s'] / 1e9:.3f} GB/s."
              + (f" KV transfer between two workers ({kv['workers']}): {kv['overhead_s'] * 1e3:.3f} ms + bytes / "
                 f"{kv['bytes_per_s'] / 1e9:.3f} GB/s." if (kv := report.get("kv_transfer")) else ""), ""]
    return "\n".join(lines)


def _with_kv_transfers(cfg, base: Profile, args, out: Path) -> tuple[Path, dict]:
    """The profile's recorded points with their KV-transfer rows measured anew: (points.csv, metadata)."""
    from calibration.microbench import (TRANSFER_BLOCKS, TRANSFER_BLOCKS_QUICK, BenchConfig, Harness, metadata,
                                        transfer_points, write)
    from dlora_gpu.executor import runtime_config
    points, meta_path = _source_files(PROFILES_DIR / f"{base.name}.points.csv")
    rows = [r for r in read_points(points) if r["kind"] != "transfer"]
    meta = json.loads(meta_path.read_text())
    rcfg = runtime_config(cfg.runtime)
    bench = BenchConfig(quick=args.quick, repeats=2 if args.quick else args.repeats, warmup=1 if args.quick else 2)
    print(f"dlora-calibrate: measuring KV transfers between two workers into {out}", file=sys.stderr, flush=True)
    harness = Harness(rcfg, base, bench)
    moves = transfer_points(harness, bench, TRANSFER_BLOCKS_QUICK if args.quick else TRANSFER_BLOCKS)
    now = metadata(rcfg, base, bench, 0.0)
    meta["kv_transfer_workers"] = now["kv_transfer_workers"]
    meta["kv_transfer_measured"] = {k: now[k] for k in ("date", "commit", "device", "load_avg_1min_before", "versions")}
    return write(rows + moves, meta, out), meta


class SourceError(FileNotFoundError, UserError):
    """`--from` names no points to refit."""


def _source_files(source: Path) -> tuple[Path, Path]:
    """(points.csv, metadata.json) of a results folder, or of a recorded profile's points
    (`calibration/profiles/<name>.points.csv` beside `<name>.metadata.json`)."""
    if not source.exists():
        raise SourceError(f"--from {source}: not found")
    if source.is_dir():
        points, meta = source / "points.csv", source / "metadata.json"
    elif source.name.endswith(".points.csv"):
        points, meta = source, source.with_name(source.name[:-len(".points.csv")] + ".metadata.json")
    else:
        raise SourceError(f"--from {source}: expected a results folder or a <name>.points.csv file")
    for f in (points, meta):
        if not f.is_file():
            raise SourceError(f"--from {source}: {f} not found")
    return points, meta


@reported("dlora-calibrate")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides of the serve app, e.g. runtime=h200_7b")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default outputs/calibrate/<stamp>)")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="refit the points.csv (and metadata.json) of this folder, or a recorded <name>.points.csv")
    ap.add_argument("--record", action="store_true", help="write the fitted profile into calibration/profiles/")
    ap.add_argument("--quick", action="store_true", help="a few points of every kind (smoke test)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of a point in a row (default 5)")
    ap.add_argument("--sweeps", type=int, default=3,
                    help="sweeps over the decode, prefill and mixed points, minutes apart, averaged (default 3; --quick: 1)")
    ap.add_argument("--replays", action="store_true",
                    help="also serve calibration replays on the measured clock and fit their iterations too "
                         "(calibration/replays.py: other requests than benchmarks/fidelity.py validates on)")
    ap.add_argument("--kv-transfer", action="store_true",
                    help="measure only KV transfers between two replicas' workers (Ray actors when Ray is installed) "
                         "and refit the profile's recorded points with them: the other terms, fitted from the same "
                         "points, do not change")
    args = ap.parse_args(argv)
    if args.kv_transfer and (args.source is not None or args.replays):
        ap.error("--kv-transfer measures transfers alone and refits the recorded points: not with --from or --replays")
    if args.repeats < 1 or args.sweeps < 1:
        ap.error(f"--repeats and --sweeps must be >= 1, got {args.repeats} and {args.sweeps}")
    if args.source is not None and args.replays:
        ap.error("--replays measures: with --from the folder's points.csv (served points included) is refitted as it is")
    if args.source is None:
        from dlora_gpu import require_runtime
        require_runtime("dlora-calibrate")   # measuring needs the runtime; refitting (--from) does not
    from dlora_sim.core.config import build_profile
    cfg = compose(args.overrides, "serve")
    base = build_profile(cfg)
    out = args.out or Path("outputs/calibrate") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if args.kv_transfer:
        points, meta = _with_kv_transfers(cfg, base, args, out)
    elif args.source is None:
        from calibration.microbench import BenchConfig, Harness, metadata, run_all, write
        from dlora_gpu.executor import runtime_config
        rcfg = runtime_config(cfg.runtime)
        bench = BenchConfig(quick=args.quick, repeats=2 if args.quick else args.repeats,
                            warmup=1 if args.quick else 2, sweeps=1 if args.quick else args.sweeps)
        t0 = time.perf_counter()
        harness = Harness(rcfg, base, bench)        # sets the runtime's torch threads
        meta_load = metadata(rcfg, base, bench, 0.0)
        clock0 = time.perf_counter()

        def stage(what: str, done: list[dict]) -> None:   # progress, and what an interrupt keeps
            write(done, {**meta_load, "partial": what}, out / "partial")
            print(f"dlora-calibrate: {what} done ({len(done)} points, {time.perf_counter() - clock0:.0f} s)",
                  file=sys.stderr, flush=True)

        print(f"dlora-calibrate: measuring into {out} ({bench.sweeps} sweep(s) of the compute points, then mode "
              "changes, adapter loads and KV swaps)", file=sys.stderr, flush=True)
        try:
            rows = run_all(harness, bench, stage)
        except KeyboardInterrupt:
            kept = out / "partial" / "points.csv"
            print(f"dlora-calibrate: interrupted; the points finished so far are in {kept} (a partial set: "
                  "rerun dlora-calibrate to measure them all)", file=sys.stderr)
            raise SystemExit(130) from None
        import shutil
        shutil.rmtree(out / "partial", ignore_errors=True)
        meta = {**meta_load, "elapsed_s": round(time.perf_counter() - t0, 3), "reference": harness.reference()}
        points = write(rows, meta, out)
        if args.replays:
            del harness   # its model and caches; each replay builds its own runtime
            from calibration.replays import calibration_replays
            first, _ = fit_profile(read_points(points), base, hashlib.sha256(points.read_bytes()).hexdigest(), meta)
            (out / "microbench").mkdir(parents=True, exist_ok=True)
            (out / "microbench" / "profile.yaml").write_text(yaml.safe_dump(first, sort_keys=False, width=110))
            served, meta["replays"] = calibration_replays(out / "microbench" / "profile.yaml", out / "replays",
                                                           args.overrides, quick=args.quick)
            meta["elapsed_s"] = round(time.perf_counter() - t0, 3)
            points = write(read_points(points) + served, meta, out)
    else:
        points, meta_path = _source_files(args.source)
        out = args.out or (args.source if args.source.is_dir() else out)
        meta = json.loads(meta_path.read_text())
    rows = read_points(points)   # the fit reads what was written, so a refit of the folder is the same fit
    sha = hashlib.sha256(points.read_bytes()).hexdigest()
    raw, report = fit_profile(rows, base, sha, meta)
    out.mkdir(parents=True, exist_ok=True)
    text = "# Fitted by dlora-calibrate from measurements of the runtime; regenerate, do not edit by hand.\n"
    (out / "profile.yaml").write_text(text + yaml.safe_dump(raw, sort_keys=False, width=110))
    (out / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = report_md(report, raw["name"])
    (out / "fit_report.md").write_text(md)
    print(md)
    if args.record:
        dst = PROFILES_DIR / f"{raw['name']}.yaml"
        dst.write_text((out / "profile.yaml").read_text())
        (PROFILES_DIR / f"{raw['name']}.fit.md").write_text(md)
        (PROFILES_DIR / f"{raw['name']}.points.csv").write_bytes(points.read_bytes())   # refit: --from
        (PROFILES_DIR / f"{raw['name']}.metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote {dst} and its .fit.md, .points.csv and .metadata.json beside it")
    print(f"results in {out}")
    load_profile(out / "profile.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
