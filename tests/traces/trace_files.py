"""Test helpers: writers for small files in the published trace formats, and `need` for real files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def need(dirs: list[Path], rel: str) -> Path:
    """`rel` in the first trace folder that holds it (skip the test when none does)."""
    for d in dirs:
        if (d / rel).exists():
            return d / rel
    pytest.skip(f"{rel} not available in {[str(d) for d in dirs]}")


def azure_llm_csv(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{p},{o}\n" for t, p, o in rows))
    return path


def mooncake_jsonl(path: Path, rows: list[tuple[int, int, int]]) -> Path:
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": p, "output_length": o, "hash_ids": [0, 1]}) + "\n"
                            for t, p, o in rows))
    return path


def servegen_csv(path: Path, windows: list[tuple]) -> Path:
    """windows: (start_s, rate, cv, family, shape, scale) per 600 s window."""
    path.write_text("".join(",".join(str(x) for x in w) + "\n" for w in windows))
    return path


def maf2019_csv(path: Path, functions: dict[str, dict[int, int]]) -> Path:
    """functions: hash -> {minute (1-based): count}."""
    header = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(m) for m in range(1, 1441))
    lines = [header]
    for i, (fn, counts) in enumerate(functions.items()):
        lines.append(f"owner{i},app{i},{fn},http," + ",".join(str(counts.get(m, 0)) for m in range(1, 1441)))
    path.write_text("\n".join(lines) + "\n")
    return path


def maf2021_csv(path: Path, rows: list[tuple[str, str, float, float]]) -> Path:
    path.write_text("app,func,end_timestamp,duration\n" + "".join(f"{a},{f},{e},{d}\n" for a, f, e, d in rows))
    return path
