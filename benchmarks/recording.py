"""Where a benchmark's report goes, and its rows written one way by every script: into
benchmarks/results/ only with --record (recorded results change only when asked), else into a fresh
temporary folder, so a trial run dirties nothing."""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def output_dir(record: bool, name: str) -> Path:
    out = RESULTS if record else Path(tempfile.mkdtemp(prefix=f"{name}_"))
    out.mkdir(parents=True, exist_ok=True)
    return out


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


def wrote(out: Path, name: str, record: bool, exts: str = "csv,md,png") -> str:
    return f"wrote {out}/{name}.{{{exts}}}" + ("" if record else " (pass --record to keep them)")
