"""Analytic profiles: a roofline from datasheet numbers, anchored to published measurements.

Used for hardware we cannot measure. Every number written to the profile is derived here from the
tables below, so `python -m calibration.analytic` regenerates calibration/profiles/*.yaml exactly.

Anchor (dLoRA, OSDI'24, Llama-2-7B on an A100-class GPU, batch 16): ~15 ms per merged decode
iteration, ~27 ms unmerged (the artifact's einsum path) and ~20 ms per merge or unmerge. We fit the
software terms (fixed per-iteration overhead, LoRA launch overhead) and the merge efficiency to that
anchor and carry them to other models (scaled by layer count) and to other GPUs (the same runtime, so
the same software overheads; bandwidth- and FLOP-bound terms follow the datasheet).

Unmerged LoRA has two priced paths (dlora_sim.core.profile.LoraCost): `einsum`, the anchor's (every token
against the 8 resident adapters it assumes), and `kernel`, our batched Triton kernels: their terms are
fitted by `calibration.fit` to the per-layer H200 measurements in benchmarks/results/kernels_h200.csv
(measured for H200 / Llama-2-7B; for 13B scaled by the adapter elements per layer; for the A100
derived by the HBM bandwidth ratio, launch overhead kept).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from calibration.fit import Point, fit
from dlora_sim.core.model_shape import SHAPES, ModelShape
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.core.profile import profile_from_dict

KERNELS_CSV = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "kernels_h200.csv"
KERNEL_HW, KERNEL_MODEL = "h200", "llama-2-7b"   # what kernels_h200.csv measured (one layer)

BW_EFF = 0.8       # achieved / datasheet HBM bandwidth for large streaming kernels
GEMM_EFF = 0.6     # achieved / datasheet dense FLOP/s for the linear layers in prefill
ATTN_EFF = 0.5     # achieved / datasheet FLOP/s for prefill attention
PER_SEQ_S = 20e-6  # per-sequence sampling and bookkeeping

# The anchor's batch: 16 decoding sequences; the anchor does not give their context, we assume 512 each.
ANCHOR = dict(batch=16, context=512, merged_s=0.015, unmerged_s=0.027, merge_s=0.020, distinct_adapters=8,
              rank=16, model="llama-2-7b", hardware="a100-80gb")


@dataclass(frozen=True)
class HardwareSheet:
    name: str
    gpu_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float          # dense bf16
    host_to_gpu_bytes_per_s: float
    kv_swap_bytes_per_s: float
    kv_transfer_bytes_per_s: float
    source: str


GIB = 1 << 30
HARDWARE = {
    "a100-80gb": HardwareSheet("A100-80GB-SXM", 80 * GIB, 2.039e12, 312e12, 32 * GIB, 25e9, 25e9,
                               "NVIDIA A100 datasheet: 2,039 GB/s HBM2e, 312 TFLOP/s dense bf16; PCIe 4.0 x16; "
                               "host->GPU 32 GiB/s as the dLoRA artifact assumes; 200 Gb/s between replicas"),
    "h200": HardwareSheet("H200-SXM-141GB", 141 * 10**9, 4.8e12, 989e12, 50e9, 50e9, 50e9,
                          "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16; PCIe 5.0 x16; "
                          "400 Gb/s between replicas"),
}
MODELS = {name: SHAPES[name] for name in ("llama-2-7b", "llama-2-13b")}
# The backing store behind a bounded host adapter cache: a remote object store, so that a rank-16 Llama-2-7B
# adapter (80 MB) cold-starts in about half a second, as LoRAX users report 0.5-1 s cold loads
STORE_BYTES_PER_S, STORE_LATENCY_S = 200e6, 0.1
STORE_SOURCE = ("backing store: a remote object store at 200 MB/s after 100 ms per fetch (a rank-16 Llama-2-7B adapter "
                "cold-starts in ~0.5 s, as LoRAX users report 0.5-1 s)")


def _roofline(hw: HardwareSheet, m: ModelShape) -> dict:
    weight_bytes = m.params * m.dtype_bytes
    bw = hw.hbm_bytes_per_s * BW_EFF
    return dict(
        weight_read_s=weight_bytes / bw,
        per_token_s=2 * m.params / (hw.peak_flops * GEMM_EFF),
        per_context_token_s=m.kv_bytes_per_token / bw,
        # causal attention: QK^T and PV over half the square, 2 flops per MAC, every layer
        per_prefill_sq_s=2 * m.num_layers * m.hidden / (hw.peak_flops * ATTN_EFF),
        per_adapter_rank_s=m.lora_elems_per_rank_per_layer * m.num_layers * m.dtype_bytes / bw,
        per_token_rank_s=2 * 2 * m.lora_elems_per_rank_per_layer * m.num_layers / 2 / (hw.peak_flops * GEMM_EFF),
        merge_floor_s=2 * m.num_layers * m.linear_params_per_layer * m.dtype_bytes / hw.hbm_bytes_per_s,
    )


def _anchor_terms() -> dict:
    """Software terms fitted so the A100/7B profile reproduces the dLoRA anchor exactly (einsum path:
    every token against every one of the anchor's resident adapters)."""
    hw, m = HARDWARE[ANCHOR["hardware"]], MODELS[ANCHOR["model"]]
    r = _roofline(hw, m)
    b, ctx = ANCHOR["batch"], ANCHOR["context"]
    base = PER_SEQ_S * b + max(r["weight_read_s"], r["per_token_s"] * b) + r["per_context_token_s"] * b * ctx
    overhead = ANCHOR["merged_s"] - base
    resident = ANCHOR["rank"] * ANCHOR["distinct_adapters"]
    lora_data = r["per_adapter_rank_s"] * resident + r["per_token_rank_s"] * b * resident
    lora_overhead = ANCHOR["unmerged_s"] - ANCHOR["merged_s"] - lora_data
    merge_eff = r["merge_floor_s"] / ANCHOR["merge_s"]
    return dict(overhead_per_layer_s=overhead / m.num_layers, lora_overhead_per_layer_s=lora_overhead / m.num_layers,
                merge_efficiency=merge_eff)


def kernel_rows(path: Path = KERNELS_CSV) -> list[dict]:
    """The per-token (BGMV-style) LoRA kernel timings of one Llama-2-7B layer, all seven projections."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["section"] == "lora" and r["method"] == "lora_bgmv"
                and r["backend"] == "triton" and r["dtype"] == "float16"]
    if not rows:
        raise ValueError(f"{path}: no lora_bgmv / triton / float16 rows to fit the kernel LoRA path to")
    return rows


def _kernel_point(r: dict) -> Point:
    batch, rank = int(r["batch"]), int(r["rank"])
    distinct = batch if r["dist"] == "distinct" else int(r["dist"])
    return Point({"batch": batch, "rank_sum": distinct * rank, "token_rank": batch * rank}, float(r["time_us"]) * 1e-6)


def _lora_part(cost, p: Point) -> float:
    b = p.features["batch"]
    return (cost.iteration_time(decode_seqs=b, num_seqs=b, lora_rank_sum=p.features["rank_sum"],
                                lora_token_rank=p.features["token_rank"])
            - cost.iteration_time(decode_seqs=b, num_seqs=b))


@lru_cache(maxsize=1)
def kernel_layer_terms() -> tuple[dict[str, float], float]:
    """Per-layer (overhead, per adapter-rank, per token-rank) seconds of our kernels on the H200, fitted by
    calibration.fit to kernels_h200.csv; and the fit's mean relative error."""
    base = profile_from_dict(_profile_dict(KERNEL_HW, KERNEL_MODEL, {"overhead_s": 3e-5, "per_adapter_rank_s": 2e-8,
                                                                     "per_token_rank_s": 2e-8}, "2000-01-01"))
    keys = ["lora.kernel.overhead_s", "lora.kernel.per_adapter_rank_s", "lora.kernel.per_token_rank_s"]
    res = fit(base.with_lora_path("kernel"), keys, [_kernel_point(r) for r in kernel_rows()], _lora_part)
    return {k.split(".")[-1]: v for k, v in res.values.items()}, res.in_sample.mean_abs_rel


def _kernel_terms(hardware: str, model: str) -> dict:
    per_layer, err = kernel_layer_terms()
    m, m0 = MODELS[model], MODELS[KERNEL_MODEL]
    hw, hw0 = HARDWARE[hardware], HARDWARE[KERNEL_HW]
    elems = m.lora_elems_per_rank_per_layer / m0.lora_elems_per_rank_per_layer
    bw = hw0.hbm_bytes_per_s / hw.hbm_bytes_per_s
    measured = hardware == KERNEL_HW and model == KERNEL_MODEL
    how = ("measured: fitted to benchmarks/results/kernels_h200.csv" if measured else
           f"derived from the H200 / {KERNEL_MODEL} fit to benchmarks/results/kernels_h200.csv"
           + (f", adapter elements per layer x{elems:.3f}" if model != KERNEL_MODEL else "")
           + (f", HBM bandwidth x{bw:.3f} (launch overhead kept)" if hardware != KERNEL_HW else ""))
    return {"overhead_s": _r(per_layer["overhead_s"] * m.num_layers),
            "per_adapter_rank_s": _r(per_layer["per_adapter_rank_s"] * m.num_layers * elems * bw),
            "per_token_rank_s": _r(per_layer["per_token_rank_s"] * m.num_layers * elems * bw),
            "source": (f"{how} (Triton per-token kernels, all seven projections, {m.num_layers} layers; "
                       f"fit mean relative error {err:.1%})")}


def merge_layer_times(path: Path = KERNELS_CSV) -> dict[str, float]:
    """Seconds per layer of the drift-free merger on the H200 (rank 16): fused merge, copy unmerge, fused switch."""
    with path.open(newline="") as f:
        rows = {r["method"]: float(r["time_us"]) * 1e-6 for r in csv.DictReader(f)
                if r["section"] == "merge" and r["rank"] == "16" and r["method"] in ("merge_fused", "unmerge_copy",
                                                                                      "switch_fused")
                and (r["backend"] == "triton" or r["method"] == "unmerge_copy")}
    if len(rows) != 3:
        raise ValueError(f"{path}: expected merge_fused, unmerge_copy and switch_fused rows at rank 16, got {sorted(rows)}")
    return {"merge_s": rows["merge_fused"], "unmerge_s": rows["unmerge_copy"], "switch_s": rows["switch_fused"]}


def _switch_terms(hardware: str, model: str, analytic_merge_s: float) -> tuple[dict, str]:
    """Drift-free merge / unmerge / switch seconds: measured on the H200 (scaled by the weights a merge
    touches for other models), else the anchor's merge efficiency for every pass."""
    if hardware != KERNEL_HW:
        return ({"merge_s": _r(analytic_merge_s), "unmerge_s": _r(analytic_merge_s), "switch_s": _r(analytic_merge_s)},
                "switch: every pass at the anchor's merge efficiency (analytic)")
    m, m0 = MODELS[model], MODELS[KERNEL_MODEL]
    scale = m.num_layers * m.linear_params_per_layer / (m0.linear_params_per_layer)
    per = merge_layer_times()
    how = "measured" if model == KERNEL_MODEL else f"derived by the touched weights (x{scale / m0.num_layers:.3f})"
    return ({k: _r(v * scale) for k, v in per.items()},
            f"switch: {how} from benchmarks/results/kernels_h200.csv (fused merge, copy unmerge, fused switch)")


def analytic_profile(hardware: str, model: str, date: str | None = None) -> dict:
    return _profile_dict(hardware, model, _kernel_terms(hardware, model), date)


def _profile_dict(hardware: str, model: str, kernel: dict, date: str | None) -> dict:
    hw, m = HARDWARE[hardware], MODELS[model]
    r, a = _roofline(hw, m), _anchor_terms()
    switch, switch_source = _switch_terms(hardware, model, r["merge_floor_s"] / a["merge_efficiency"])
    anchors = (
        "dLoRA (OSDI'24), Llama-2-7B, A100-class, batch 16: merged decode ~15 ms, unmerged ~27 ms (einsum path), "
        "merge/unmerge ~20 ms; assumed context 512 per sequence and 8 distinct rank-16 adapters in the batch",
        "software overheads (per layer) fitted to that anchor and carried to this model and GPU",
    )
    return {
        "name": f"{hardware}-{model}",
        "provenance": {
            "source": "analytic", "device": hw.name, "date": date or _dt.date.today().isoformat(),
            "method": (f"roofline: bandwidth efficiency {BW_EFF}, GEMM efficiency {GEMM_EFF}, attention efficiency "
                       f"{ATTN_EFF}; merge efficiency {a['merge_efficiency']:.3f} of the read+write floor "
                       "(from the anchor); generated by calibration/analytic.py"),
            "software": "the dLoRA artifact's runtime (early vLLM, no CUDA graphs), as the anchor measured",
            "anchors": list(anchors) + [hw.source, switch_source, STORE_SOURCE],
        },
        "hardware": {"name": hw.name, "gpu_bytes": hw.gpu_bytes, "hbm_bytes_per_s": hw.hbm_bytes_per_s,
                     "peak_flops": hw.peak_flops},
        "model": dataclasses.asdict(m),
        "iteration": {"overhead_s": _r(a["overhead_per_layer_s"] * m.num_layers), "per_seq_s": PER_SEQ_S,
                      "weight_read_s": _r(r["weight_read_s"]), "per_token_s": _r(r["per_token_s"]),
                      "per_context_token_s": _r(r["per_context_token_s"]),
                      "per_prefill_sq_s": _r(r["per_prefill_sq_s"])},
        "lora": {
            "kernel": kernel,
            "einsum": {"overhead_s": _r(a["lora_overhead_per_layer_s"] * m.num_layers),
                       "per_adapter_rank_s": _r(r["per_adapter_rank_s"]), "per_token_rank_s": _r(r["per_token_rank_s"]),
                       "source": "analytic: the dLoRA artifact's einsum over resident adapters, launch overhead "
                                 "fitted to the anchor (8 resident rank-16 adapters), data terms from the roofline"}},
        "switch": switch,
        "transfers": {"host_to_gpu_bytes_per_s": hw.host_to_gpu_bytes_per_s,
                      "kv_swap_bytes_per_s": hw.kv_swap_bytes_per_s,
                      "kv_transfer_bytes_per_s": hw.kv_transfer_bytes_per_s,
                      "store_bytes_per_s": STORE_BYTES_PER_S, "store_latency_s": STORE_LATENCY_S},
        "memory": {"gpu_utilization": 0.9, "activation_reserve_bytes": 2 * GIB},
    }


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _recorded_date(path: Path) -> str | None:
    if not path.exists():
        return None
    prov = (yaml.safe_load(path.read_text()) or {}).get("provenance") or {}
    return str(prov["date"]) if prov.get("date") else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PROFILES_DIR)
    ap.add_argument("--date", default=None,
                    help="provenance date (default: the date already in the profile, else today), so "
                         "regenerating unchanged profiles leaves the files byte for byte as they are")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for hw in HARDWARE:
        for model in MODELS:
            path = args.out / f"{hw}-{model}.yaml"
            prof = analytic_profile(hw, model, args.date or _recorded_date(path))
            profile_from_dict(prof, src=f"{hw}-{model}")  # validate before writing
            header = "# Analytic profile generated by calibration/analytic.py; do not edit by hand.\n"
            path.write_text(header + yaml.safe_dump(prof, sort_keys=False, width=110))
            print(path)


if __name__ == "__main__":
    main()
