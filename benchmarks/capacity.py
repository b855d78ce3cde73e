"""Capacity at the SLO per system, model and unmerged LoRA cost, at two run lengths.

Reads capacity.csv / capacity_probes.csv of a `dlora-sim --multirun experiment=capacity` folder (the
capacity sweeper writes them; never reruns). Prints the report; `--record` writes
benchmarks/results/capacity.{csv,md} and capacity_probes.csv, and copies the sweep's chart.

    dlora-sim --multirun experiment=capacity
    python benchmarks/capacity.py outputs/capacity/<date_time> --record

A sweep on another profile (`dlora-sim --multirun experiment=capacity profile=a100_80gb_vidur`) is recorded beside
the default's, as capacity_vidur.*.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from benchmarks.recording import profile_suffix, report_main, write_rows  # noqa: E402

SYSTEMS = {"vllm": "vLLM (replicated)", "peft": "PEFT", "slora": "S-LoRA-style", "dlora": "dLoRA"}


def parse_arm(arm: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in arm.split())


def hardware(sweep: Path) -> str:
    """The profile the sweep ran on (conf/profile's `hardware`), from any of its runs' summaries."""
    return _first_summary(sweep)["config"]["profile"]["hardware"]


def _first_summary(sweep: Path) -> dict:
    from dlora_sim.api import summary_files
    first = next(iter(summary_files(Path(sweep))), None)
    if first is None:
        raise SystemExit(f"{sweep}: no run's summary.json under it")
    return json.loads(first.read_text())


def load(sweep: Path) -> list[dict]:
    path = Path(sweep) / "capacity.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `dlora-sim --multirun experiment=capacity` first")
    # an arm names only the swept keys: a sweep of one model (hydra.sweeper.params.model=llama2_7b) takes it
    # from its runs' overrides
    model = next((o.split("=", 1)[1] for o in _first_summary(sweep)["overrides"] if o.startswith("model=")), "?")
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            a = parse_arm(r["arm"])
            rows.append({"system": a.get("system", "?"), "model": a.get("model", model),
                         "lora": a.get("profile.lora", "?"), "run_length": float(r["run_length"]),
                         "capacity_rps": float(r["capacity_rps"]) if r["capacity_rps"] else None,
                         "first_failed_rps": float(r["first_failed_rps"])})
    return rows


def fmt(x: float | None) -> str:
    return "< 0.25" if x is None else f"{x:.3g}"


def report(rows: list[dict], sweep: Path, hw: str = "a100-80gb") -> str:
    lengths = sorted({r["run_length"] for r in rows})
    override = "" if not profile_suffix(hw) else f" profile={hw.replace('-', '_')}"
    models = sorted({r["model"] for r in rows})
    if len(models) == 1:   # a one-model sweep (the Vidur-fitted profile has Llama-2-7B only)
        override += f" hydra.sweeper.params.model={models[0]}"
    lines = ["# capacity: the highest request rate with mean s/token <= 0.5 s (8 replicas)", "",
             "Bisection by the capacity sweeper (dlora_sim/capacity.py), 8 log-space rounds between 0.25 and 128 "
             f"req/s; requests = run length x rate. Profile {hw} (simulated), rank-16 adapters with Zipf(1) "
             "popularity, lengths resampled from Azure conv and filtered like the paper's ShareGPT, batch cap 16. "
             f"Source: `{sweep}`. Commands: `dlora-sim --multirun experiment=capacity{override}`, then "
             "`python benchmarks/capacity.py <folder> --record`.", ""]
    keys = sorted({(r["model"], r["lora"]) for r in rows})
    head = "| model | LoRA cost | system | " + " | ".join(f"{L:g} x rate" for L in lengths) + " | change |"
    lines += [head, "|---|---|---|" + "---|" * (len(lengths) + 1)]
    for model, lora in keys:
        for sysname, label in SYSTEMS.items():
            caps = [next((r["capacity_rps"] for r in rows if (r["model"], r["lora"], r["system"], r["run_length"])
                          == (model, lora, sysname, L)), None) for L in lengths]
            change = (f"{caps[-1] / caps[0] - 1:+.0%}" if len(caps) > 1 and caps[0] and caps[-1] else "-")
            lines.append(f"| {model} | {lora} | {label} | " + " | ".join(fmt(c) for c in caps) + f" | {change} |")
    lines += ["", "## dLoRA's capacity over each baseline's (longest run length)", "",
              "| model | LoRA cost | / vLLM | / PEFT | / S-LoRA-style |", "|---|---|---|---|---|"]
    L = lengths[-1]
    for model, lora in keys:
        cap = {r["system"]: r["capacity_rps"] for r in rows if (r["model"], r["lora"], r["run_length"]) == (model, lora, L)}
        d = cap.get("dlora")

        def ratio(base: str) -> str:
            b = cap.get(base)
            if d is None or b is None:
                return "-" if d is None else f"> {d / 0.25:.3g}x"
            return f"{d / b:.2f}x"
        lines.append(f"| {model} | {lora} | {ratio('vllm')} | {ratio('peft')} | {ratio('slora')} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path, sweep: Path) -> list[str]:
    hw = hardware(sweep)
    stem = "capacity" + profile_suffix(hw)
    text = report(rows, sweep, hw)
    print(text)
    write_rows(out / f"{stem}.csv", rows)
    (out / f"{stem}.md").write_text(text)
    files = [f"{stem}.csv", f"{stem}.md"]
    for name, suffix in (("capacity", ".png"), ("capacity_probes", ".csv")):
        if (sweep / f"{name}{suffix}").exists():
            files.append(f"{name}{profile_suffix(hw)}{suffix}")
            shutil.copyfile(sweep / f"{name}{suffix}", out / files[-1])
    return files


def main(argv: list[str] | None = None) -> int:
    return report_main("capacity", __doc__.splitlines()[0], load, write, argv)


if __name__ == "__main__":
    sys.exit(main())
