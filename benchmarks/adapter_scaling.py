"""Served throughput and s/token vs number of adapters: vLLM, PEFT, S-LoRA-style, dLoRA (8 replicas).

Reads the summary.json files of a `dlora-sim --multirun experiment=adapter_scaling` folder (never
reruns). Prints the report; `--record` writes benchmarks/results/adapter_scaling.{csv,md,png}.

    dlora-sim --multirun experiment=adapter_scaling
    python benchmarks/adapter_scaling.py outputs/adapter_scaling/<date_time> --record
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from benchmarks.recording import report_main, write_rows  # noqa: E402

from dlora_sim.api import load_summaries

SYSTEMS = {"vllm": "vLLM (replicated)", "peft": "PEFT", "slora": "S-LoRA-style", "dlora": "dLoRA"}
PATHS = ("einsum", "kernel")
METRICS = [("throughput_rps", "served req/s"), ("mean_s_per_token", "mean s/token"),
           ("slo_attainment", "SLO attainment")]


def load(sweep: Path) -> list[dict]:
    rows = []
    for s in load_summaries(sweep):
        if s.get("system") not in SYSTEMS:
            continue
        rows.append({"system": s["system"], "lora": s["config"]["profile"]["lora"],
                     "adapters": s["config"]["workload"]["num_adapters"], "rate": s["config"]["workload"]["rate"],
                     **{k: s[k] for k, _ in METRICS}, "mean_latency_s": s["mean_latency_s"],
                     "num_adapter_loads": s["num_adapter_loads"], "num_switches": s["num_switches"],
                     "num_migrations": s["num_migrations"], "rejected": s["rejected"]})
    if not rows:
        raise SystemExit(f"no summary.json of {sorted(SYSTEMS)} under {sweep}")
    return sorted(rows, key=lambda r: (PATHS.index(r["lora"]), list(SYSTEMS).index(r["system"]), r["adapters"]))


def report(rows: list[dict], sweep: Path) -> str:
    counts = sorted({r["adapters"] for r in rows})
    lines = ["# adapter_scaling: 8 replicas at 24 req/s, 16-128 adapters", "",
             "A100-80GB / Llama-2-7B (simulated), rank-16 adapters with Zipf(1) popularity, lengths resampled from "
             "Azure conv and filtered like the paper's ShareGPT (prompt <= 1024, total <= 2048), batch cap 16, "
             f"2400 requests (100 s). Source: `{sweep}`. Commands: `dlora-sim --multirun "
             "experiment=adapter_scaling`, then `python benchmarks/adapter_scaling.py <folder> --record`.", ""]
    for path in PATHS:
        sel = [r for r in rows if r["lora"] == path]
        if not sel:
            continue
        for key, title in METRICS:
            lines += [f"## {title}, unmerged LoRA cost: {path}", "",
                      "| system | " + " | ".join(f"{n} adapters" for n in counts) + " |",
                      "|---|" + "---|" * len(counts)]
            for sysname, label in SYSTEMS.items():
                vals = {r["adapters"]: r[key] for r in sel if r["system"] == sysname}
                fmt = "{:.1%}" if key == "slo_attainment" else "{:.3f}"
                lines.append(f"| {label} | " + " | ".join("-" if vals.get(n) is None else fmt.format(vals[n])
                                                          for n in counts) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from dlora_sim.chart_layout import color
    paths = [p for p in PATHS if any(r["lora"] == p for r in rows)]
    fig, axes = plt.subplots(len(paths), 2, figsize=(10, 3.6 * len(paths)), squeeze=False)
    for row, p in zip(axes, paths):
        for ax, (key, title) in zip(row, METRICS[:2]):
            for i, (sysname, label) in enumerate(SYSTEMS.items()):
                pts = sorted((r["adapters"], r[key]) for r in rows if r["lora"] == p and r["system"] == sysname)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color(sysname), lw=2.4 - 0.4 * i, label=label)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            if key == "mean_s_per_token":
                ax.set_yscale("log")
                ax.axhline(0.5, color="k", ls="--", lw=1, label="SLO 0.5 s/token")
                ax.legend(fontsize=7)
            ax.set_xlabel("adapters")
            ax.set_title(f"{title} (LoRA cost: {p})", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        row[0].axhline(24, color="grey", ls=":", lw=1, label="offered 24 req/s")
        row[0].legend(fontsize=7)
    fig.suptitle("8 replicas, 24 req/s, A100-80GB / Llama-2-7B (simulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out: Path, sweep: Path) -> list[str]:
    text = report(rows, sweep)
    print(text)
    write_rows(out / "adapter_scaling.csv", rows)
    (out / "adapter_scaling.md").write_text(text)
    chart(rows, out / "adapter_scaling.png")
    return ["adapter_scaling.csv", "adapter_scaling.md", "adapter_scaling.png"]


def main(argv: list[str] | None = None) -> int:
    return report_main("adapter_scaling", __doc__.splitlines()[0], load, write, argv)


if __name__ == "__main__":
    sys.exit(main())
