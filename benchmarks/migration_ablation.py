"""Tables, charts and acceptance checks for the global-scheduling ablation (RR vs Proactive vs dLoRA).

Reads the sweep folders written by
    dlora-sim --multirun experiment=migration_ablation          (rate sweep)
    dlora-sim --multirun experiment=migration_ablation_length   (length-scale sweep)
and never reruns anything. Prints the report; `--record` writes benchmarks/results/
migration_ablation{_rate,_length,_solver}.csv, migration_ablation.md and migration_ablation.png.
Exit status 1 if an acceptance criterion fails: dLoRA's mean queueing delay at the highest rate is
below RR's and Proactive's, and the total solver (wall) time of every dLoRA run is below 3% of its
simulated time.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from benchmarks.recording import finish, output_dir  # noqa: E402

from dlora_sim.api import load_summaries

ARMS = ("rr", "proactive", "dlora")
ROOT = Path(__file__).resolve().parents[1]


def _override(s: dict, key: str) -> str | None:
    for o in s.get("overrides") or []:
        k, _, v = o.partition("=")
        if k.lstrip("+") == key:
            return v
    return None


def load(sweep: Path) -> list[dict]:
    rows = []
    for s in load_summaries(sweep):
        f = Path(s["folder"]) / "summary.json"
        s["arm"] = s.get("arm") or _override(s, "global")
        s["rate"] = float(s["config"]["workload"]["rate"])
        ls = _override(s, "length_scale")
        s["length_scale"] = int(ls[1:]) / 100 if ls else 1.0
        s["folder"] = str(f.parent.relative_to(ROOT) if f.is_relative_to(ROOT) else f.parent)
        rows.append(s)
    if not rows:
        raise SystemExit(f"no summary.json under {sweep}: run the sweep first (see this script's docstring)")
    return rows


COLS = ["arm", "rate", "length_scale", "mean_queueing_delay_s", "p90_queueing_delay_s", "mean_latency_s",
        "p99_latency_s", "mean_s_per_token", "throughput_rps", "num_migrations", "num_adapter_loads",
        "substitutions", "migration_rounds", "migration_rounds_solved", "solver_time_total_s", "solver_time_frac",
        "solver_time_max_s", "sim_time_s", "folder"]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLS)
        for s in rows:
            w.writerow(["" if s.get(c) is None else s.get(c) for c in COLS])


def pivot(rows: list[dict], x: str, metric: str) -> tuple[list[float], dict[str, list]]:
    xs = sorted({s[x] for s in rows})
    table = {a: [next((s.get(metric) for s in rows if s["arm"] == a and s[x] == v), None) for v in xs] for a in ARMS}
    return xs, table


def md_table(rows: list[dict], x: str, metric: str, label: str) -> str:
    xs, t = pivot(rows, x, metric)
    head = f"| {label} | " + " | ".join(ARMS) + " |\n|---|" + "---|" * len(ARMS) + "\n"
    body = "".join(f"| {v:g} | " + " | ".join("-" if t[a][i] is None else f"{t[a][i]:.3f}" for a in ARMS) + " |\n"
                   for i, v in enumerate(xs))
    return head + body


def chart(rate_rows: list[dict], len_rows: list[dict] | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(rate_rows, "rate", "mean_queueing_delay_s", "request rate (req/s)", "mean queueing delay (s)")]
    if len_rows:
        panels.append((len_rows, "length_scale", "mean_latency_s", "length scale factor", "mean latency (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (rows, x, metric, xl, yl) in zip(axes[0], panels):
        xs, t = pivot(rows, x, metric)
        for a in ARMS:
            pts = [(v, y) for v, y in zip(xs, t[a]) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=a)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("global scheduling: 8 replicas, 32 adapters (Zipf 1)\ndLoRA's local scheduler in every arm",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-sweep", type=Path, default=ROOT / "outputs/migration_ablation/rate")
    ap.add_argument("--length-sweep", type=Path, default=ROOT / "outputs/migration_ablation/length")
    ap.add_argument("--out", type=Path, default=None, help="folder for the report (default: a temporary one)")
    ap.add_argument("--record", action="store_true", help="write the results into benchmarks/results/")
    args = ap.parse_args(argv)
    args.out = output_dir(args.record, "migration_ablation", args.out)
    rate_rows = load(args.rate_sweep)
    len_rows = load(args.length_sweep) if args.length_sweep.exists() else None
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rate_rows, args.out / "migration_ablation_rate.csv")
    if len_rows:
        write_csv(len_rows, args.out / "migration_ablation_length.csv")
    with (args.out / "migration_ablation_solver.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["sweep", "rate", "length_scale", "t_s", "trigger", "scope", "requests", "adapters", "status",
                    "solve_wall_s", "charged_s", "moves", "makespan_before_s", "makespan_after_s"])
        for sweep, rows in (("rate", rate_rows), ("length", len_rows or [])):
            for s in rows:
                for e in s.get("migration_log") or []:
                    w.writerow([sweep, s["rate"], s["length_scale"], e["t_s"], e.get("trigger"), e.get("scope"),
                                e.get("requests"), e.get("adapters"), e.get("status"), e["solve_wall_s"],
                                e["charged_s"], e["moves"], e.get("makespan_before_s"), e.get("makespan_after_s")])
    chart(rate_rows, len_rows, args.out / "migration_ablation.png")

    top = max(s["rate"] for s in rate_rows)
    at_top = {s["arm"]: s["mean_queueing_delay_s"] for s in rate_rows if s["rate"] == top}
    ok_delay = all(a in at_top for a in ARMS) and at_top["dlora"] < min(at_top["rr"], at_top["proactive"])
    dl = [s for s in rate_rows + (len_rows or []) if s["arm"] == "dlora"]
    worst_frac = max(s.get("solver_time_frac", 0.0) for s in dl)
    ok_solver = worst_frac < 0.03
    logs = [e for s in dl for e in s.get("migration_log") or []]
    per_round = sorted(e["solve_wall_s"] for e in logs)
    statuses: dict[str, int] = {}
    for e in logs:
        statuses[e["status"]] = statuses.get(e["status"], 0) + 1
    lines = [
        "# Global scheduling ablation: rr vs proactive vs dLoRA (co-migration ILP)", "",
        f"8 replicas (A100-80GB, Llama-2-7B analytic profile, unmerged LoRA cost: "
        f"{rate_rows[0]['config']['profile'].get('lora', 'kernel')}), 32 rank-16 adapters with Zipf(1) popularity, "
        "3000 Poisson requests, lengths uniform [8, 512) x scale; dLoRA's local scheduler in every arm; placement "
        "learns demand from arrivals (uniform at t=0). Arms as the paper ran them: rr = dLoRA's placement + cost "
        "dispatch among each adapter's hosts, no migration; proactive = + dispatch-time adapter substitution; "
        "dlora = + periodic co-migration ILP (transfer mode). Commands: `dlora-sim --multirun "
        "experiment=migration_ablation`, `dlora-sim --multirun experiment=migration_ablation_length`, then "
        "`python benchmarks/migration_ablation.py --record`.", "",
        "## Mean queueing delay (s) vs request rate", "", md_table(rate_rows, "rate", "mean_queueing_delay_s", "rate"),
        "## Mean latency (s) vs request rate", "", md_table(rate_rows, "rate", "mean_latency_s", "rate"),
    ]
    if len_rows:
        lines += [f"## Mean latency (s) vs length scale (rate {len_rows[0]['rate']:g} req/s)", "",
                  md_table(len_rows, "length_scale", "mean_latency_s", "scale"),
                  "## Mean queueing delay (s) vs length scale", "",
                  md_table(len_rows, "length_scale", "mean_queueing_delay_s", "scale")]
    lines += ["## Migration and solver", "",
              md_table(rate_rows, "rate", "migration_rounds_solved", "rate (rounds triggered and solved)"),
              md_table(rate_rows, "rate", "num_migrations", "rate (requests migrated)"),
              md_table(rate_rows, "rate", "substitutions", "rate (proactive substitutions)"),
              f"Solved rounds: {len(logs)}; per-round solve wall time: median "
              f"{per_round[len(per_round) // 2] if per_round else 0:.4f} s, max {max(per_round, default=0):.4f} s; "
              f"statuses {statuses}. Worst total solver time / simulated time over dLoRA runs: {worst_frac:.4%}. "
              "Per-round rows: migration_ablation_solver.csv.", "",
              "## Acceptance", "",
              f"- dLoRA mean queueing delay at the highest rate ({top:g} req/s): {at_top.get('dlora', float('nan')):.3f} s "
              f"vs rr {at_top.get('rr', float('nan')):.3f} s, proactive {at_top.get('proactive', float('nan')):.3f} s: "
              f"{'PASS' if ok_delay else 'FAIL'}",
              f"- total solver time < 3% of simulated time (worst run {worst_frac:.4%}): {'PASS' if ok_solver else 'FAIL'}",
              ""]
    text = "\n".join(lines)
    (args.out / "migration_ablation.md").write_text(text)
    print(text)
    files = ["migration_ablation_rate.csv", "migration_ablation_length.csv", "migration_ablation_solver.csv",
             "migration_ablation.md", "migration_ablation.png"]
    print(finish(args.out, files, args.record, None if argv is None else [sys.argv[0], *argv]))
    return 0 if ok_delay and ok_solver else 1


if __name__ == "__main__":
    sys.exit(main())
