"""The server over HTTP beside the in-process runtime and the simulator, on the same requests.

Each case runs the same workload three ways, one after another on this machine:
1. `dlora-serve` (the runtime in one process, real clock), the reference a trace replay gives;
2. `dlora-server` with `dlora-bench` replaying the workload against it over loopback HTTP (streamed,
   open loop), timed by the client: what a user of the server measures;
3. `dlora-validate --runtime-folder` on the bench's folder: the simulator with the server's own config
   (policies, profile, KV blocks) on the same requests.
The report gives each way's metrics and two errors: HTTP against in-process (what the server's front
end, the client and the event loop add), and the simulator against HTTP (what `dlora-validate` says).
On a CPU the real clock also measures the machine's drift since the profile's calibration
(benchmarks/results/fidelity_cpu.md), which moves the simulator's error and not the first one.

    python benchmarks/server_fidelity.py [--record] [--requests 120] [--rates 8,24] [--systems dlora,slora]

Writes a temporary folder unless --record (benchmarks/results/server_fidelity_cpu.{csv,md}).
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from calibration.validate import METRICS, probe_machine, validate
from recording import RESULTS, finish, write_report

PY = sys.executable


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str]) -> None:
    subprocess.run([PY, "-m", *args], check=True, capture_output=True, text=True, timeout=1800)


def _serve_and_bench(common: list[str], workload: list[str], work: Path) -> None:
    port = _port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([PY, "-m", "dlora_gpu.server.cli", *common, f"server.port={port}",
                               f"hydra.run.dir={work / 'server'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"dlora-server exited: {server.stderr.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("dlora-server did not start")
            time.sleep(0.25)
        _run(["dlora_bench.cli", f"url={url}", *workload, "progress=false", f"hydra.run.dir={work / 'bench'}"])
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(120)


def case(system: str, requests: int, rate: float, work: Path) -> dict:
    common = [f"system={system}", "seed=0"]
    workload = ["workload=tiny", f"workload.num_requests={requests}", f"workload.rate={rate}"]
    _run(["dlora_gpu.cli", *common, *workload, "progress=false", "charts=false", f"hydra.run.dir={work / 'serve'}"])
    _serve_and_bench(common, workload, work)
    machine = probe_machine(common, "real")   # this machine's speed now against the profile's calibration
    v = validate(work / "bench", work / "validation", machine=machine)
    inproc = json.loads((work / "serve" / "summary.json").read_text())
    http = json.loads((work / "bench" / "summary.json").read_text())
    row = {"system": system, "rate_rps": rate, "requests": requests, "completed_http": http["completed"],
           "completed_inproc": inproc["completed"], "machine_factor": machine["factor"]}
    for key, _ in METRICS:
        a, b, s = inproc.get(key), http.get(key), v["simulator"].get(key)
        row |= {f"inproc_{key}": a, f"http_{key}": b, f"sim_{key}": s,
                f"http_vs_inproc_{key}": None if not a or b is None else round(b / a - 1, 6),
                f"sim_vs_http_{key}": v["relative_error"].get(key)}
    return row


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def report(rows: list[dict], device: str) -> str:
    shown = [k for k, _ in METRICS if k != "throughput_rps"]
    labels = dict(METRICS)
    lines = [f"# dlora-server over HTTP beside the in-process runtime and the simulator ({device})", "",
             "Each case: `dlora-serve` (in one process, real clock), then `dlora-server` with `dlora-bench` replaying "
             "the same requests over loopback HTTP (streamed, open loop, timed by the client), then `dlora-validate "
             "--runtime-folder` on the bench's folder (the simulator with the server's config and KV blocks). "
             "Latencies in ms; errors are HTTP / in-process - 1 and simulator / HTTP - 1.", "",
             "The simulator prices steps at the speed of the machine the profile was calibrated on; `machine` is "
             "this machine's speed against it, probed after each case (the profile's reference decode step, "
             "`dlora-validate`'s probe): at 2x, every real-clock step here takes half its price, and the "
             "simulator's errors below are mostly that, not the server. The first error (HTTP against "
             "in-process) compares two runs on this machine minutes apart.", "",
             "| system | rate (req/s) | machine | done (in-process / HTTP) | " + " | ".join(
                 f"{labels[k]} in-proc / HTTP / sim" for k in shown) + " | throughput in-proc / HTTP / sim |",
             "|---|---|---|---|" + "---|" * (len(shown) + 1)]
    for r in rows:
        cells = [f"{_ms(r[f'inproc_{k}'])} / {_ms(r[f'http_{k}'])} / {_ms(r[f'sim_{k}'])}" for k in shown]
        thr = "{:.2f} / {:.2f} / {:.2f}".format(r["inproc_throughput_rps"], r["http_throughput_rps"],
                                               r["sim_throughput_rps"])
        speed = "-" if not r["machine_factor"] else f"{1 / r['machine_factor']:.2f}x"
        done = f"{r['completed_inproc']} / {r['completed_http']}"
        lines.append(f"| {r['system']} | {r['rate_rps']:g} | {speed} | {done} | "
                     + " | ".join(cells) + f" | {thr} |")
    lines += ["", "| system | rate (req/s) | " + " | ".join(f"{labels[k]} HTTP vs in-proc / sim vs HTTP"
                                                        for k, _ in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        lines.append(f"| {r['system']} | {r['rate_rps']:g} | " + " | ".join(
            f"{_pct(r[f'http_vs_inproc_{k}'])} / {_pct(r[f'sim_vs_http_{k}'])}" for k, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--rates", default="8,24", help="arrival rates (req/s) of the tiny workload")
    ap.add_argument("--systems", default="dlora,slora")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/server_fidelity_cpu.{csv,md}")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="server_fidelity_"))
    rows = []
    for system in args.systems.split(","):
        for rate in (float(x) for x in args.rates.split(",")):
            rows.append(case(system, args.requests, rate, work / f"{system}_{rate:g}"))
            print(json.dumps(rows[-1]), flush=True)
    device = json.loads((work / f"{rows[0]['system']}_{rows[0]['rate_rps']:g}" / "bench" / "summary.json")
                        .read_text())["device"]
    out = RESULTS if args.record else work
    slug = "cpu" if "cpu" in device.lower() else "gpu"
    write_report(out, f"server_fidelity_{slug}", rows, report(rows, device))
    print((out / f"server_fidelity_{slug}.md").read_text())
    print(finish(out, [f"server_fidelity_{slug}.csv", f"server_fidelity_{slug}.md"], args.record))
    print(f"case folders in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
