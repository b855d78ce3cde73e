"""dLoRA against today's production stacks: capacity at the SLO and TTFT at fixed loads, per adapter count and arm.

Reads capacity.csv, capacity_probes.csv and fixed_load.csv of a `dlora-sim --multirun experiment=production_stack`
folder and the summary.json of the runs they name (never reruns). Prints the report; `--record` writes
benchmarks/results/production_stack.{md,csv,png}, production_stack_fixed.csv and production_stack_probes.csv.

    dlora-sim --multirun experiment=production_stack
    python benchmarks/production_stack.py outputs/production_stack/<date_time> --record
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from benchmarks.recording import report_main, write_rows  # noqa: E402

SYSTEMS = {"dlora": "dLoRA", "vllm_lora": "vLLM, least loaded", "vllm_gateway": "vLLM + inference gateway",
           "sglang_router": "SGLang + its router"}
ARMS = {"base": "base", "prefix_caching": "prefix caching", "host_cache": "host cache of 32"}
KNOB = "workload.rate_scale"


def _arm(text: str) -> dict[str, str]:
    parts = dict(p.lstrip("+").split("=", 1) for p in text.split())
    return {"system": parts["system"], "adapters": int(parts["workload.num_adapters"]), "arm": parts["stack"]}


def _csv(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"{path} not found: run `dlora-sim --multirun experiment=production_stack` first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _summary(folder: str) -> dict:
    return json.loads((Path(folder) / "summary.json").read_text())


def _num(x: str) -> float | None:
    return float(x) if x not in ("", None) else None


def load(sweep: Path) -> list[dict]:
    """One row per (system, adapters, arm): its capacity, the P99 TTFT of the run at it, and its fixed-load runs."""
    sweep = Path(sweep)
    probes = _csv(sweep / "capacity_probes.csv")
    fixed = _csv(sweep / "fixed_load.csv")
    rows = []
    for r in _csv(sweep / "capacity.csv"):
        row: dict = {**_arm(r["arm"]), "capacity_rps": _num(r["capacity_rps"]),
                     "capacity_rate_scale": _num(r["capacity_rate_scale"]),
                     "first_failed_rate_scale": float(r["first_failed_rate_scale"])}
        at = next((p for p in probes if p["arm"] == r["arm"] and p["met"] == "True"
                   and float(p["rate"]) == row["capacity_rate_scale"]), None)
        row["p99_ttft_at_capacity_s"] = _summary(at["folder"])["p99_ttft_s"] if at else None
        row["fixed"] = []
        for f in (f for f in fixed if f["arm"] == r["arm"]):
            s = _summary(f["folder"])
            row["fixed"].append({"rate_scale": float(f[KNOB]), "offered_rps": s["offered_rps"],
                                 "completed": s["completed"], "mean_ttft_s": s["mean_ttft_s"],
                                 "p99_ttft_s": s["p99_ttft_s"], "mean_s_per_token": s["mean_s_per_token"],
                                 "slo_attainment": s["slo_attainment"], "adapter_loads": s["num_adapter_loads"],
                                 "store_loads": s.get("num_adapter_loads_store"),
                                 "prefix_hit_share": s.get("prefix_hit_share")})
        first = next(p for p in probes if p["arm"] == r["arm"])
        row["config"] = _summary(first["folder"])["config"]   # the run's settings, for the report's header
        rows.append(row)
    if not rows:
        raise SystemExit(f"{sweep}: capacity.csv has no rows")
    return rows


def _cells(rows: list[dict]) -> list[tuple[int, str]]:
    return sorted({(r["adapters"], r["arm"]) for r in rows}, key=lambda c: (c[0], list(ARMS).index(c[1])))


def _get(rows: list[dict], adapters: int, arm: str, system: str) -> dict | None:
    return next((r for r in rows if (r["adapters"], r["arm"], r["system"]) == (adapters, arm, system)), None)


def _fixed(row: dict | None, scale: float) -> dict | None:
    return None if row is None else next((f for f in row["fixed"] if f["rate_scale"] == scale), None)


def _f(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def report(rows: list[dict], sweep: Path) -> str:
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    others = [s for s in systems if s != "dlora"]
    scales = sorted({f["rate_scale"] for r in rows for f in r["fixed"]})
    c = rows[0]["config"]
    w = c["workload"]
    host = next((r["config"]["cluster"]["replica"]["host_adapter_cache"] for r in rows if r["arm"] == "host_cache"),
                None)
    lines = [f"# production_stack: dLoRA against today's LoRA serving stacks ({c['cluster']['num_replicas']} "
             f"{c['profile']['hardware']} / {c['model']['name']} replicas)", "",
             f"ServeGen {w['model']}'s per-client arrivals (trace seconds {w['start_s']:g}-{w['end_s']:g}; lengths "
             f"from {w['lengths']['trace']}), each request's adapter drawn with {w['mapping']}({w['skew']:g}) popularity "
             f"over N rank-{w['rank']} adapters, each {w['shared_prefix_by']}'s requests opening with its own "
             f"{w['shared_prefix_tokens']:,}-token system prompt. Systems: " + "; ".join(
                 f"{SYSTEMS[s]} (`system={s}`)" for s in systems) + ". Arms: base (every adapter in host memory, "
             "no prefix caching), prefix caching on (keyed by adapter), a host cache of "
             f"{host if host is not None else '?'} adapters in front of the profile's backing store. Every system "
             "has the same replicas, memory, adapter slots, batch limits, host cache and prefix cache. Capacity: the "
             f"highest offered rate whose mean s/token stays <= {c['slo_s_per_token']:g} s (dLoRA's SLO), bisected "
             "on the trace's rate_scale (its bracket is in production_stack.csv); "
             f"fixed loads: every arm at rate_scale {', '.join(f'{x:g}' for x in scales)}. Simulated. "
             f"Source: `{sweep}`. Commands: `dlora-sim --multirun experiment=production_stack`, then "
             "`python benchmarks/production_stack.py <folder> --record`.", "",
             "## Capacity at the SLO (req/s offered)", "",
             "| adapters | arm | " + " | ".join(SYSTEMS[s] for s in systems) + " | dLoRA / best other |",
             "|---|---|" + "---|" * (len(systems) + 1)]
    for n, arm in _cells(rows):
        caps = {s: (_get(rows, n, arm, s) or {}).get("capacity_rps") for s in systems}
        best = max((caps[s] for s in others if caps[s] is not None), default=None)
        ratio = f"{caps['dlora'] / best:.2f}x" if caps.get("dlora") and best else "-"
        lines.append(f"| {n} | {ARMS[arm]} | " + " | ".join(_f(caps[s]) for s in systems) + f" | {ratio} |")
    lines += ["", "P99 TTFT (s) of the run at each capacity:", "",
              "| adapters | arm | " + " | ".join(SYSTEMS[s] for s in systems) + " |",
              "|---|---|" + "---|" * len(systems)]
    for n, arm in _cells(rows):
        lines.append(f"| {n} | {ARMS[arm]} | " + " | ".join(
            _f((_get(rows, n, arm, s) or {}).get("p99_ttft_at_capacity_s")) for s in systems) + " |")
    for scale in scales:
        offered = sorted({round(f["offered_rps"], 1) for r in rows for f in r["fixed"] if f["rate_scale"] == scale})
        lines += ["", f"## TTFT at a fixed load: rate_scale {scale:g} ({', '.join(map(str, offered))} req/s offered)",
                  "", "P99 TTFT in s (mean TTFT in s; SLO attainment):", "",
                  "| adapters | arm | " + " | ".join(SYSTEMS[s] for s in systems) + " |",
                  "|---|---|" + "---|" * len(systems)]
        for n, arm in _cells(rows):
            cells = []
            for s in systems:
                f = _fixed(_get(rows, n, arm, s), scale)
                cells.append("-" if f is None else
                             f"{f['p99_ttft_s']:.3g} ({f['mean_ttft_s']:.2g}; {f['slo_attainment']:.1%})")
            lines.append(f"| {n} | {ARMS[arm]} | " + " | ".join(cells) + " |")
    top = scales[-1] if scales else None
    if top is not None:
        lines += ["", f"## What each mechanic did at rate_scale {top:g}", "",
                  "Adapter loads (from the backing store, host-cache arm) and the share of prompt tokens served from "
                  "the prefix cache (prefix-caching arm):", "",
                  "| adapters | " + " | ".join(f"{SYSTEMS[s]}: loads base / store, prefix hits" for s in systems) + " |",
                  "|---|" + "---|" * len(systems)]
        for n in sorted({r["adapters"] for r in rows}):
            cells = []
            for s in systems:
                base, pre, host = (_fixed(_get(rows, n, a, s), top) for a in ARMS)
                cells.append(f"{_f(base and base['adapter_loads'], 'd')} / {_f(host and host['store_loads'], 'd')}, "
                             f"{_f(pre and pre['prefix_hit_share'], '.1%')}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Where dLoRA does not win", ""] + (losses(rows, others, scales) or ["Nowhere in this sweep."])
    return "\n".join(lines) + "\n"


def losses(rows: list[dict], others: list[str], scales: list[float]) -> list[str]:
    """Every cell where some other system serves more at the SLO, or has a lower P99 TTFT at a fixed load."""
    out = []
    for n, arm in _cells(rows):
        mine = _get(rows, n, arm, "dlora")
        if mine is None:
            continue
        better = [(s, r) for s in others if (r := _get(rows, n, arm, s)) is not None
                  and r["capacity_rps"] is not None and (mine["capacity_rps"] or 0) < r["capacity_rps"]]
        if better:   # bisections share their grid: a higher capacity met a load dLoRA missed, or lies in its bracket
            out.append(f"- {n} adapters, {ARMS[arm]}: capacity {_f(mine['capacity_rps'])} req/s, below "
                       + ", ".join(f"{SYSTEMS[s]} {r['capacity_rps']:.3g}" + (
                           "" if r["capacity_rate_scale"] >= mine["first_failed_rate_scale"] else
                           " (inside dLoRA's last bracket)") for s, r in better)
                       + f"; dLoRA missed the SLO at rate_scale {mine['first_failed_rate_scale']:g}.")
        for scale in scales:
            f = _fixed(mine, scale)
            lower = [(s, g["p99_ttft_s"]) for s in others if (g := _fixed(_get(rows, n, arm, s), scale)) is not None
                     and f is not None and g["p99_ttft_s"] < f["p99_ttft_s"]]
            if lower:
                out.append(f"- {n} adapters, {ARMS[arm]}, rate_scale {scale:g}: P99 TTFT {f['p99_ttft_s']:.3g} s, "
                           "above " + ", ".join(f"{SYSTEMS[s]} {t:.3g} s" for s, t in lower) + ".")
    return out


def chart(rows: list[dict], path: Path) -> None:
    """Top: capacity per arm, a bar per system, a panel per adapter count; bottom: P99 TTFT at the highest fixed
    load (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from dlora_sim.chart_layout import color

    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    counts = sorted({r["adapters"] for r in rows})
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    top = max((f["rate_scale"] for r in rows for f in r["fixed"]), default=None)
    fig, axes = plt.subplots(2, len(counts), figsize=(4.6 * len(counts), 7.2), squeeze=False)
    width = 0.8 / len(systems)
    for col, n in enumerate(counts):
        for k, s in enumerate(systems):
            xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(arms))]
            caps = [(_get(rows, n, a, s) or {}).get("capacity_rps") or 0.0 for a in arms]
            ttft = [(_fixed(_get(rows, n, a, s), top) or {}).get("p99_ttft_s") or float("nan") for a in arms]
            axes[0, col].bar(xs, caps, width, color=color(s, systems), label=SYSTEMS[s])
            axes[1, col].bar(xs, ttft, width, color=color(s, systems), label=SYSTEMS[s])
        for row, ylabel in ((0, "capacity at the SLO (req/s)"), (1, f"P99 TTFT at rate_scale {top:g} (s)")):
            ax = axes[row, col]
            ax.set_xticks(range(len(arms)), [ARMS[a] for a in arms], fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{n} adapters", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[1, col].set_yscale("log")
        axes[1, col].yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))   # 1, 2, 5, 10, ...
        axes[1, col].yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes[1, col].yaxis.set_minor_formatter(ticker.NullFormatter())
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(systems), fontsize=8)
    fig.suptitle("dLoRA vs today's stacks: capacity at the SLO (top), P99 TTFT at one fixed load (bottom)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out: Path, sweep: Path) -> list[str]:
    text = report(rows, sweep)
    print(text)
    (out / "production_stack.md").write_text(text)
    write_rows(out / "production_stack.csv", [{k: v for k, v in r.items() if k not in ("fixed", "config")} for r in rows])
    write_rows(out / "production_stack_fixed.csv",
               [{"system": r["system"], "adapters": r["adapters"], "arm": r["arm"], **f} for r in rows for f in r["fixed"]])
    shutil.copyfile(Path(sweep) / "capacity_probes.csv", out / "production_stack_probes.csv")
    chart(rows, out / "production_stack.png")
    return ["production_stack.md", "production_stack.csv", "production_stack_fixed.csv", "production_stack_probes.csv",
            "production_stack.png"]


def main(argv: list[str] | None = None) -> int:
    return report_main("production_stack", __doc__.splitlines()[0], load, write, argv)


if __name__ == "__main__":
    sys.exit(main())
