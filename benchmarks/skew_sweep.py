"""Mean and P90 s/token vs popularity skew for unmerged-only, merged-only and dlora (one replica).

Reads the summary.json files of a `dlora-sim --multirun experiment=skew_sweep` folder (never reruns),
writes benchmarks/results/skew_sweep.{csv,md,png} and checks issue 3's acceptance criterion:
on every skew, dlora's mean s/token <= 1.05 x the better baseline, and strictly below both on at
least half of the skews. Exit status 1 if the criterion fails.

    python benchmarks/skew_sweep.py outputs/skew_sweep/<date_time>
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from dlora_sim.compare import load_summaries

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = {"slora": "unmerged-only", "merged": "merged-only", "dlora": "dlora"}
TOLERANCE = 1.05


def load(sweep: Path) -> dict[float, dict[str, dict]]:
    """skew -> system -> summary."""
    table: dict[float, dict[str, dict]] = {}
    for s in load_summaries(Path(sweep)):
        f = s["folder"]
        system = s.get("system")
        if system not in SYSTEMS:
            continue
        skew = float(s["config"]["workload"]["popularity_param"])
        if skew in table and system in table[skew]:
            raise SystemExit(f"{f}: two runs of {system} at skew {skew} in {sweep}")
        table.setdefault(skew, {})[system] = s
    if not table:
        raise SystemExit(f"no summary.json of {sorted(SYSTEMS)} under {sweep}")
    for skew, runs in table.items():
        missing = set(SYSTEMS) - set(runs)
        if missing:
            raise SystemExit(f"{sweep}: skew {skew} lacks runs of {sorted(missing)}")
    return dict(sorted(table.items()))


def check(table: dict[float, dict[str, dict]]) -> tuple[list[dict], bool, str]:
    rows, strictly = [], 0
    ok = True
    for skew, runs in table.items():
        m = {k: runs[k]["mean_s_per_token"] for k in SYSTEMS}
        p90 = {k: runs[k]["p90_s_per_token"] for k in SYSTEMS}
        best = min(m["slora"], m["merged"])
        ratio = m["dlora"] / best
        below = m["dlora"] < m["slora"] and m["dlora"] < m["merged"]
        strictly += below
        ok &= ratio <= TOLERANCE
        rows.append({"zipf_s": skew, **{f"mean_{k}": m[k] for k in SYSTEMS}, **{f"p90_{k}": p90[k] for k in SYSTEMS},
                     "dlora_vs_best": round(ratio, 4), "dlora_strictly_best": int(below),
                     "dlora_switches": runs["dlora"]["num_switches"]})
    half = strictly * 2 >= len(rows)
    verdict = (f"dlora <= {TOLERANCE}x best baseline on every skew: {'yes' if ok else 'NO'}; "
               f"strictly best on {strictly}/{len(rows)} skews (need >= half): {'yes' if half else 'NO'}")
    return rows, ok and half, verdict


def write(rows: list[dict], verdict: str, sweep: Path, table: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "skew_sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    any_run = next(iter(table.values()))["dlora"]
    wl, cl = any_run["config"]["workload"], any_run["config"]["cluster"]
    head = ("| zipf s | unmerged-only mean | merged-only mean | dlora mean | unmerged-only P90 | merged-only P90 "
            "| dlora P90 | dlora / best | dlora switches |")
    lines = ["# skew_sweep: s/token vs adapter popularity (one replica)", "",
             f"{wl['num_adapters']} adapters, Zipf(s) popularity, {wl['num_requests']} requests at {wl['rate']} req/s, "
             f"max_num_seqs {cl['replica']['max_num_seqs']}, profile {any_run['config']['profile']['hardware']} / "
             f"{any_run['config']['model']['name']}, seed {any_run['config']['seed']}. Source: `{sweep}`.", "",
             head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['zipf_s']:g} | {r['mean_slora']:.4f} | {r['mean_merged']:.4f} | {r['mean_dlora']:.4f} | "
                     f"{r['p90_slora']:.4f} | {r['p90_merged']:.4f} | {r['p90_dlora']:.4f} | "
                     f"{r['dlora_vs_best']:.3f} | {r['dlora_switches']} |")
    lines += ["", verdict, ""]
    (RESULTS / "skew_sweep.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [r["zipf_s"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stat, title in zip(axes, ("mean", "p90"), ("mean s / output token", "P90 s / output token")):
        for i, (k, label) in enumerate(SYSTEMS.items()):
            ax.plot(xs, [r[f"{stat}_{k}"] for r in rows], marker="o", label=label, color=f"C{i}")
        ax.set_xlabel("popularity skew (Zipf s; 0 = uniform)")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(f"one replica, {wl['num_adapters']} adapters, {wl['rate']} req/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "skew_sweep.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="folder of a skew_sweep multirun (holds */summary.json)")
    args = ap.parse_args(argv)
    table = load(args.sweep)
    rows, ok, verdict = check(table)
    write(rows, verdict, args.sweep, table)
    print((RESULTS / "skew_sweep.md").read_text())
    print(f"wrote {RESULTS / 'skew_sweep.csv'}, .md, .png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
