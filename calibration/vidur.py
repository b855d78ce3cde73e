"""An A100 / Llama-2-7B profile fitted to Vidur's published operator measurements.

Vidur (Agrawal et al., MLSys'24; microsoft/vidur, MIT licence) profiled every operator of a Llama-2-7B layer on
one A100: the linear layers, norms and activations at 1-4,096 tokens (`mlp.csv`), decode attention by batch
size and context, prefill attention by chunk and context (`attention.csv`). Vidur prices an iteration as the
number of layers times the sum of one layer's operators at the batch's tokens (decode attention at the batch
size and mean context, x1.1 for batches of two or more; no CPU overhead, no embedding or sampler). This module
composes iterations from those measurements the same way (`IterationPoint`) and fits the simulator's closed form
to them with `calibration.fit` (the simulator's `CostModel` computes every residual). Held out: whole rows and
columns of the grids (batch sizes, contexts, prompt lengths the fit never sees) and mixed batches of a prefill
and decodes, which no measured point is.

Everything but the iteration terms (LoRA costs, merges, loads, memory) is the analytic profile's, labelled so:
Vidur measured none of them.

    python -m calibration.vidur --data ../shared/vidur/cache     # writes calibration/profiles/a100-80gb-vidur-*

Needs only the two CSVs (xz-compressed as Vidur's hub client lays them out, or plain); no Vidur install.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import lzma
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Iterable, Sequence

import numpy as np
import yaml

from calibration.fit import ErrorStats, FitResult, Point, errors, fit
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.paths import PROFILES_DIR, REPO_ROOT
from dlora_sim.core.profile import load_profile, profile_from_dict

BASE = "a100-80gb-llama-2-7b"           # the analytic profile whose model, hardware and non-iteration terms we keep
NAME = "a100-80gb-vidur-llama-2-7b"     # conf/profile/a100_80gb_vidur.yaml selects it: profile=a100_80gb_vidur
DATASET = "profiling_data/compute/datasets--local--vidur-llama-2-7b-a100/snapshots"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "vidur" / "cache"
KEYS = ["iteration.overhead_s", "iteration.per_seq_s", "iteration.weight_read_s", "iteration.per_token_s",
        "iteration.per_context_token_s", "iteration.per_prefill_sq_s"]
# the operators Vidur sums per layer (its ExecutionTime.model_time; the embedding is not counted)
LAYER_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
DECODE_BATCHING_OVERHEAD = 0.1   # Vidur's attention_decode_batching_overhead_fraction (default), batches >= 2
NUM_LAYERS = 32
HELD_BATCHES = frozenset(range(3, 129, 4))       # decode batch sizes 3, 7, 11, ... never fitted
HELD_CONTEXTS = frozenset({768, 2048, 3520})     # decode contexts never fitted
HELD_PREFILL_EVERY = 4                           # every 4th prompt length (sorted) never fitted
MIXED_POINTS = 60


class VidurDataError(ValueError):
    """Vidur's profiling data is missing or not laid out as expected."""


@dataclass(frozen=True)
class IterationPoint:
    """One iteration composed from Vidur's measurements, and where it came from."""

    kind: str          # decode | prefill | chunk (a 64-token prefill chunk over a cached context) | mixed
    split: str         # fit | heldout
    source: str        # Vidur's `source` column: measured | interp_kv | 70b_tp2_proxy_scaled
    prefill_tokens: int
    prefill_sq: int
    decode_seqs: int
    decode_context: int
    seconds: float

    def point(self) -> Point:
        return Point({"prefill_tokens": self.prefill_tokens, "prefill_sq": self.prefill_sq,
                      "decodes": self.decode_seqs, "decode_context": self.decode_context,
                      "batch": self.decode_seqs + (self.prefill_tokens > 0)}, self.seconds)


def predict(cost: CostModel, p: Point) -> float:
    f = p.features
    return cost.iteration_time(prefill_tokens=int(f["prefill_tokens"]), prefill_sq=int(f["prefill_sq"]),
                               decode_seqs=int(f["decodes"]), decode_context=int(f["decode_context"]),
                               num_seqs=int(f["batch"]))


def dataset_dir(data: Path) -> Path:
    """The snapshot folder holding mlp.csv(.xz) and attention.csv(.xz) under a Vidur cache, or `data` itself."""
    if (data / "mlp.csv.xz").exists() or (data / "mlp.csv").exists():
        return data
    snaps = sorted((data / DATASET).glob("*")) if (data / DATASET).is_dir() else []
    if not snaps:
        raise VidurDataError(f"{data}: no Vidur Llama-2-7B/A100 profiling data here (expected mlp.csv[.xz] and "
                             f"attention.csv[.xz], or a Vidur cache with {DATASET}/<snapshot>/); "
                             "../shared/vidur/README.md says where it comes from")
    return snaps[-1]


def _read(folder: Path, name: str) -> tuple[list[dict], str]:
    """Rows of `name` (xz or plain) and the sha256 of its bytes as stored."""
    for path, opener in ((folder / f"{name}.xz", lzma.open), (folder / name, open)):
        if path.exists():
            raw = path.read_bytes()
            text = (lzma.decompress(raw) if opener is lzma.open else raw).decode()
            return list(csv.DictReader(io.StringIO(text))), hashlib.sha256(raw).hexdigest()
    raise VidurDataError(f"{folder}: missing {name}[.xz]")


def _num(row: dict, key: str, where: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        raise VidurDataError(f"{where}: column {key!r} missing or not a number ({row.get(key)!r})") from None


def linear_ms(rows: list[dict], where: str = "mlp.csv") -> dict[int, float]:
    """One layer's non-attention operators (ms) by token count: the median over repeated rows."""
    by: dict[int, list[float]] = {}
    for i, r in enumerate(rows, start=2):
        at = f"{where} line {i}"
        if int(_num(r, "num_tensor_parallel_workers", at)) != 1:
            continue
        by.setdefault(int(_num(r, "num_tokens", at)), []).append(
            sum(_num(r, f"time_stats.{op}.median", at) for op in LAYER_OPS))
    if not by:
        raise VidurDataError(f"{where}: no rows at tensor parallelism 1")
    return {t: median(v) for t, v in sorted(by.items())}


def _linear_at(table: dict[int, float], tokens: int) -> float:
    """Vidur's lookup: tokens rounded up to a multiple of 8, interpolated between measured sizes."""
    t = (tokens + 7) // 8 * 8
    keys = list(table)
    if t > keys[-1]:
        raise VidurDataError(f"mlp.csv: no measurement at or above {t} tokens (largest {keys[-1]})")
    return float(np.interp(t, keys, [table[k] for k in keys]))


def _decode_ms(attn: float, batch: int) -> float:
    return attn * (1 + DECODE_BATCHING_OVERHEAD * (batch > 1))


def iteration_points(data: Path, *, mixed: int = MIXED_POINTS, seed: int = 0) -> tuple[list[IterationPoint], dict]:
    """Every iteration the data prices (one decode batch per decode row, one prefill per prefill row), the
    held-out split, `mixed` held-out mixed batches, and the input files' sha256."""
    folder = dataset_dir(data)
    mlp, mlp_sha = _read(folder, "mlp.csv")
    attn, attn_sha = _read(folder, "attention.csv")
    lin = linear_ms(mlp)
    pts: list[IterationPoint] = []
    decode_rows, prefill_rows = [], []
    for i, r in enumerate(attn, start=2):
        at = f"attention.csv line {i}"
        if int(_num(r, "num_tensor_parallel_workers", at)) != 1:
            continue
        b, kv = int(_num(r, "batch_size", at)), int(_num(r, "kv_cache_size", at))
        src = r.get("source") or "measured"
        if r["is_prefill"].strip() == "False":
            ms = _decode_ms(_num(r, "time_stats.attn_decode.median", at), b)
            decode_rows.append((b, kv))
            held = b in HELD_BATCHES or kv in HELD_CONTEXTS
            pts.append(IterationPoint("decode", "heldout" if held else "fit", src, 0, 0, b, b * kv,
                                      NUM_LAYERS * (_linear_at(lin, b) + ms) / 1e3))
        else:
            c = int(_num(r, "prefill_chunk_size", at))
            ms = _num(r, "time_stats.attn_prefill.median", at)
            prefill_rows.append((kv, c, src, NUM_LAYERS * (_linear_at(lin, c) + ms) / 1e3))
    by_len = sorted({(kv, c) for kv, c, _, _ in prefill_rows})
    held_len = set(by_len[HELD_PREFILL_EVERY - 1::HELD_PREFILL_EVERY])
    for kv, c, src, secs in prefill_rows:
        pts.append(IterationPoint("prefill" if kv == 0 else "chunk", "heldout" if (kv, c) in held_len else "fit",
                                  src, c, c * (2 * kv + c), 0, 0, secs))
    pts += _mixed(attn, lin, mixed, seed)
    return pts, {"mlp.csv": mlp_sha, "attention.csv": attn_sha, "folder": str(folder)}


def _mixed(attn: list[dict], lin: dict[int, float], n: int, seed: int) -> list[IterationPoint]:
    """Held-out batches of one prompt (no cached context; Vidur's rows, mostly its 70B proxy) and a measured
    decode batch, composed as Vidur composes them: linear operators at the total tokens, plus both attentions."""
    rng = np.random.default_rng(seed)
    decodes = [r for r in attn if r["is_prefill"].strip() == "False" and r.get("source", "measured") == "measured"
               and r["num_tensor_parallel_workers"] == "1"]
    prefills = [r for r in attn if r["is_prefill"].strip() == "True" and int(float(r["kv_cache_size"])) == 0
                and int(float(r["prefill_chunk_size"])) <= 2048 and r["num_tensor_parallel_workers"] == "1"]
    out = []
    for _ in range(n if decodes and prefills else 0):
        d, p = decodes[rng.integers(len(decodes))], prefills[rng.integers(len(prefills))]
        b, kv, c = int(float(d["batch_size"])), int(float(d["kv_cache_size"])), int(float(p["prefill_chunk_size"]))
        ms = (_linear_at(lin, b + c) + _decode_ms(float(d["time_stats.attn_decode.median"]), b)
              + float(p["time_stats.attn_prefill.median"]))
        out.append(IterationPoint("mixed", "heldout", p.get("source") or "measured", c, c * c, b, b * kv,
                                  NUM_LAYERS * ms / 1e3))
    return out


def _weights(points: Sequence[IterationPoint]) -> list[float]:
    """Each kind of fitted point weighs alike in total: the decode grid is 10x the prefill rows, and a fit
    led by count would price prefills by the decodes' compromise."""
    counts: dict[str, int] = {}
    for p in points:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    return [len(points) / (len(counts) * counts[p.kind]) for p in points]


@dataclass(frozen=True)
class VidurFit:
    result: FitResult
    points: list[IterationPoint]
    by_kind: list[dict]
    sha256: dict


def fit_vidur(data: Path) -> VidurFit:
    pts, sha = iteration_points(data)
    fit_pts = [p for p in pts if p.split == "fit"]
    held = [p for p in pts if p.split == "heldout"]
    base = load_profile(BASE).with_lora_path("kernel")
    res = fit(base, KEYS, [p.point() for p in fit_pts], predict, held_out=[p.point() for p in held],
              weights=_weights(fit_pts))
    return VidurFit(res, pts, by_kind(res.profile, pts), sha)


def by_kind(profile, pts: Iterable[IterationPoint]) -> list[dict]:
    """Error per kind, split and source of point; bias in the sum = predicted total / Vidur's total - 1."""
    cost = CostModel(profile)
    groups: dict[tuple[str, str, str], list[IterationPoint]] = {}
    for p in pts:
        groups.setdefault((p.kind, p.split, p.source), []).append(p)
    out = []
    for (kind, split, src), g in sorted(groups.items()):
        pred = np.array([predict(cost, p.point()) for p in g])
        meas = np.array([p.seconds for p in g])
        rel = np.abs(pred / meas - 1)
        out.append({"kind": kind, "split": split, "source": src, "n": len(g),
                    "sum_bias": round(float(pred.sum() / meas.sum() - 1), 4),
                    "mean_abs_rel": round(float(rel.mean()), 4), "max_abs_rel": round(float(rel.max()), 4)})
    return out


def profile_dict(vf: VidurFit, date: str) -> dict:
    raw = yaml.safe_load((PROFILES_DIR / f"{BASE}.yaml").read_text())
    raw["name"] = NAME
    for key, v in vf.result.values.items():
        raw["iteration"][key.split(".")[1]] = v
    held = vf.result.held_out
    raw["provenance"] = {
        "source": "measured", "device": "A100 (Vidur's profiling, TP1)", "date": date,
        "method": (f"calibration/vidur.py: iterations composed from Vidur's per-operator measurements as Vidur prices "
                   f"them ({NUM_LAYERS} layers x one layer's operators; decode attention x{1 + DECODE_BATCHING_OVERHEAD:g} "
                   f"for batches >= 2), the iteration terms fitted by relative-error least squares on the simulator's "
                   f"cost model ({vf.result.in_sample.n} points, each kind weighing alike; in-sample mean error "
                   f"{vf.result.in_sample.mean_abs_rel:.1%}, held-out {held.mean_abs_rel:.1%} on {held.n} points: "
                   f"unseen batch sizes, contexts, prompt lengths and mixed batches); calibration/profiles/{NAME}.fit.md"),
        "software": ("Vidur's profiled kernels (vLLM/FlashAttention-era operators, timed one at a time: no CPU "
                     "overhead, no embedding or sampler); the iteration terms only"),
        "anchors": [
            "Vidur (Agrawal et al., MLSys'24), microsoft/vidur, MIT licence: Llama-2-7B on A100 operator profiles "
            "(mlp.csv unchanged from that repository; attention.csv rebuilt from Vidur's published profile, "
            "../shared/vidur/README.md)",
            f"mlp.csv.xz sha256 {vf.sha256['mlp.csv']}", f"attention.csv.xz sha256 {vf.sha256['attention.csv']}",
            f"not measured by Vidur, kept from the analytic profile {BASE}: model, hardware, memory, LoRA, merge/"
            "switch and transfer costs"]}
    for path in raw["lora"].values():
        path["source"] = f"kept from {BASE} (analytic; Vidur measured no LoRA): " + path["source"]
    profile_from_dict(raw, src=NAME)   # validate before anyone writes it
    return raw


def report_md(vf: VidurFit, command: str) -> str:
    ins, held = vf.result.in_sample, vf.result.held_out
    lines = [f"# Fit report: {NAME}", "",
             f"`{command}` (calibration/vidur.py). Vidur's Llama-2-7B / A100 operator data: mlp.csv.xz sha256 "
             f"`{vf.sha256['mlp.csv']}`, attention.csv.xz sha256 `{vf.sha256['attention.csv']}`. Each point is one "
             f"iteration composed from those measurements as Vidur prices it; the simulator's cost model predicts it "
             f"from the fitted profile.", "",
             "| iteration | points | mean abs rel err | P90 | max |", "|---|---|---|---|---|",
             _row("in sample", ins), _row("held out", held), "",
             "Held out: decode batch sizes 3, 7, 11, ..., 127 and contexts 768, 2048, 3520 (whole rows and columns of "
             "the grid), every 4th prompt length, and random mixed batches (a prompt and a measured decode "
             "batch in one iteration, which no fitted point is).", "",
             "By kind and source (source: Vidur's column; `interp_kv` decode points are interpolated in context, "
             "`70b_tp2_proxy_scaled` prefills (all whole prompts but 64, 928 and 1,984 tokens) are Vidur's 70B TP2 "
             "profile scaled to 7B, +-10%; bias in the sum = "
             "predicted total / Vidur's total - 1):", "",
             "| kind | split | source | points | bias in the sum | mean abs rel err | max |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {b['kind']} | {b['split']} | {b['source']} | {b['n']} | {b['sum_bias']:+.1%} | {b['mean_abs_rel']:.1%} "
              f"| {b['max_abs_rel']:.1%} |" for b in vf.by_kind]
    lines += ["", "Coefficients: " + ", ".join(f"`{k}` {v:.4g}" for k, v in vf.result.values.items()), ""]
    return "\n".join(lines)


def _row(label: str, e: ErrorStats | None) -> str:
    if e is None:
        return f"| {label} | 0 | - | - | - |"
    return f"| {label} | {e.n} | {e.mean_abs_rel:.1%} | {e.p90_abs_rel:.1%} | {e.max_abs_rel:.1%} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="Vidur's cache folder (or the folder holding mlp.csv[.xz], attention.csv[.xz])")
    ap.add_argument("--out", type=Path, default=PROFILES_DIR)
    ap.add_argument("--date", default=None, help="provenance date (default: today)")
    args = ap.parse_args(argv)
    import datetime as _dt
    try:
        vf = fit_vidur(args.data)
    except VidurDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raw = profile_dict(vf, args.date or _dt.date.today().isoformat())
    command = "python -m calibration.vidur" + ("" if args.data == DEFAULT_DATA else f" --data {args.data}")
    args.out.mkdir(parents=True, exist_ok=True)
    header = "# Fitted to Vidur's A100 operator measurements by calibration/vidur.py; do not edit by hand.\n"
    (args.out / f"{NAME}.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False, width=110))
    (args.out / f"{NAME}.fit.md").write_text(report_md(vf, command))
    print(report_md(vf, command))
    print(args.out / f"{NAME}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
