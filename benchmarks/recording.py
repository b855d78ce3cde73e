"""Where a benchmark's report goes, and how every script records it: into benchmarks/results/ only with
--record (recorded results change only when asked), else into a fresh temporary folder, so a trial run
dirties nothing. Every report states the command, the commit and the machine that produced it (a line
under its title), and a recording adds the same to benchmarks/results/provenance.json for every file
it wrote, CSVs and charts included."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
PROVENANCE = RESULTS / "provenance.json"


DEFAULT_HARDWARE = "a100-80gb"   # conf/profile/a100_80gb: the profile the paper comparison's recordings use


def profile_suffix(hardware: str) -> str:
    """'' for the default A100 profile, else '_' and what sets the profile apart (a100-80gb-vidur -> '_vidur'):
    a benchmark recorded on another profile sits beside the default's recording instead of replacing it."""
    if hardware == DEFAULT_HARDWARE:
        return ""
    return "_" + hardware.removeprefix(DEFAULT_HARDWARE + "-").replace("-", "_")


def output_dir(record: bool, name: str, out: Path | None = None) -> Path:
    """benchmarks/results/ with --record, else `out` (--out) or a fresh temporary folder."""
    if record and out is not None:
        raise SystemExit(f"{name}: --record writes benchmarks/results/; drop --out or --record")
    folder = RESULTS if record else (out if out is not None else Path(tempfile.mkdtemp(prefix=f"{name}_")))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_rows(path: Path, rows: list[dict]) -> None:
    """One CSV row per dict, the first row's keys as the header."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def write_report(out: Path, name: str, rows: list[dict], text: str) -> None:
    """A benchmark's two result files: `name`.csv (write_rows) and `name`.md (its report)."""
    write_rows(out / f"{name}.csv", rows)
    (out / f"{name}.md").write_text(text)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def provenance(argv: Sequence[str] | None = None) -> dict:
    """The command (as run, from the repository root), the commit (with `+changes` when the working tree
    differs from it), the machine and the date of this run."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(REPO))
    except ValueError:
        pass
    commit = _git("rev-parse", "--short=10", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"):
        commit += "+changes"
    machine = (f"{platform.system()} {platform.machine()}, {_cpu()}, {os.cpu_count()} CPUs, "
               f"python {platform.python_version()}")
    return {"command": "python " + shlex.join(argv), "commit": commit, "machine": machine,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def provenance_line(p: dict) -> str:
    return f"Produced by `{p['command']}` at commit {p['commit']} on {p['machine']}, {p['date']}."


def _stamp(md: Path, line: str) -> None:
    """Put the provenance line under the report's title (replacing an earlier one)."""
    lines = md.read_text().splitlines()
    lines = [x for x in lines if not x.startswith("Produced by `")]
    at = 1 if lines and lines[0].startswith("#") else 0
    lines[at:at] = ["", line] if at else [line, ""]
    md.write_text("\n".join(lines).replace("\n\n\n", "\n\n") + "\n")


def finish(out: Path, files: Sequence[Path | str], record: bool, argv: Sequence[str] | None = None) -> str:
    """Stamp every markdown report among `files` (in `out`) with this run's provenance; with `record`,
    add every file to benchmarks/results/provenance.json. Returns the lines that say what was written."""
    p = provenance(argv)
    paths = [out / f for f in files]
    written = [f for f in paths if f.exists()]
    for f in written:
        if f.suffix == ".md":
            _stamp(f, provenance_line(p))
    if record:
        index = json.loads(PROVENANCE.read_text()) if PROVENANCE.exists() else {}
        for f in written:
            index[f.name] = p
        PROVENANCE.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    lines = [f"wrote {f}" for f in written]
    if not record:
        lines.append("(not recorded: --record writes benchmarks/results/)")
    return "\n".join(lines)


def report_main(name: str, description: str, load: Callable[[Path], list[dict]],
                write: Callable[[list[dict], Path, Path], list[str]], argv: list[str] | None = None) -> int:
    """The main of a script that reports a finished sweep folder: load its rows, `write(rows, out, sweep)`
    the report's files into the output folder (returning their names), print where they are."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("sweep", type=Path, help="the sweep's folder (holds */summary.json)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the report (default: a temporary one)")
    ap.add_argument("--record", action="store_true", help="write the results into benchmarks/results/")
    args = ap.parse_args(argv)
    rows = load(args.sweep)
    out = output_dir(args.record, name, args.out)
    files = write(rows, out, args.sweep)
    print(finish(out, files, args.record, None if argv is None else [sys.argv[0], *argv]))
    return 0
