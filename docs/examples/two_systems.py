"""Two systems on a real trace, from Python: run, load, compare P99 TTFT per adapter, plot latency CDFs.

    .venv/bin/python docs/examples/two_systems.py                       # Azure conv (dlora-trace fetch azure_conv)
    .venv/bin/python docs/examples/two_systems.py --workload default    # the embedded synthetic workload
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import dlora_sim  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="azure_conv", help="a conf/workload name (default: azure_conv)")
    ap.add_argument("--requests", type=int, default=2000, help="requests from the start of the workload")
    ap.add_argument("--out", type=Path, default=Path("outputs/two_systems"))
    args = ap.parse_args(argv)
    size = (f"workload.max_requests={args.requests}" if args.workload.startswith(("azure", "mooncake", "servegen"))
            else f"workload.num_requests={args.requests}")

    # 1. run both systems on the same requests; each writes a results folder and hands back its frames
    runs = {system: dlora_sim.simulate(system, workload=args.workload, overrides=[size, "cluster.num_replicas=2"],
                                       out=args.out / system)
            for system in ("slora", "dlora")}
    # (any folder loads the same way: dlora_sim.load("outputs/<date>/<time>"), a runtime's folder too)

    # 2. one table: P99 TTFT per adapter, the two systems side by side
    finished = pd.concat([r.requests.assign(system=s) for s, r in runs.items()])
    finished = finished[finished["status"] == "finished"]
    p99 = finished.groupby(["adapter", "system"])["ttft_s"].quantile(0.99).unstack("system")
    p99["dlora / slora"] = p99["dlora"] / p99["slora"]
    print(p99.round(3).to_string())

    # 3. latency CDFs
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for system, df in finished.groupby("system"):
        lat = df["latency_s"].sort_values()
        ax.plot(lat.to_numpy(), (lat.rank(method="first") / len(lat)).to_numpy(), label=system)
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("CDF of finished requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = args.out / "latency_cdf.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main()
