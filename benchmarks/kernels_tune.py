#!/usr/bin/env python3
"""Sweep the decode LoRA kernels' launch parameters on a GPU; write every config and the best per case.

Why separate sweeps: shrink and expand are separate launches, so their parameters are independent;
timing each kernel alone (all four projection groups of a Llama-2-7B layer, as `benchmarks/kernels.py`
does) turns a product of grids into a sum. Then, per case, the best shrink + best expand are timed
together through the same launch sequence `lora_apply` uses, next to the untuned defaults.

Phases per case (headline first, so a time cap still leaves the number that matters):
1. shrink: BLOCK_K x num_warps x late_sum (compile-time) x target_programs (split-K, run-time);
   expand: BLOCK_N x num_warps.
2. the 3 fastest shrink configs again with num_stages 1/2/4 and with partials (no atomics/memset).
3. combined: defaults of the table in `dlora_gpu/kernels/tuning.py` vs the case's best.

Every config's output is checked against fp32 torch (max |err| / max |ref| < 1e-2); timing reuses
`benchmarks.kernels.Timer` (CUDA graphs, L2 flushed before each call, median of --reps). Each new
constexpr combination compiles a kernel: the grids are sized to fit `--max-seconds`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import (SHAPES, Layer, Timer, csv_sink, make_stacks, measure_copy_bw,  # noqa: E402
                                randn, result_path, slot_ids_for)
from dlora_gpu.kernels import tuning  # noqa: E402
from dlora_gpu.kernels.lora_expand import expand_decode  # noqa: E402
from dlora_gpu.kernels.lora_shrink import shrink_decode  # noqa: E402

CASES = [(64, 16, "distinct"), (1, 16, "1"), (16, 16, "distinct"), (256, 16, "distinct"),
         (64, 64, "distinct"), (64, 16, "1")]
FIELDS = ["batch", "rank", "dist", "phase", "kernel", "block_k", "block_r", "num_warps",
          "num_stages", "target_programs", "late_sum", "partials", "block_n", "e_warps", "time_us",
          "adapter_bytes", "adapter_gbps", "max_rel_err", "ok", "note"]


def shrink_grid() -> list[dict]:
    """Phase-1 shrink configs; late-sum tiles over 128 fp32 accumulators per thread are skipped."""
    out = []
    for bk, w, late, tp in itertools.product([128, 256, 512, 1024], [2, 4, 8], [False, True],
                                             [264, 528, 1056, 2112]):
        if late and 16 * bk // (32 * w) > 128:
            continue
        out.append(dict(block_k=bk, block_r=16, num_warps=w, num_stages=3, target_programs=tp,
                        late_sum=late, partials=False))
    return out


def expand_grid() -> list[dict]:
    """Phase-1 expand configs; tiles over 256 B elements per thread are skipped."""
    return [dict(block_n=bn, num_warps=w) for bn, w in itertools.product(
        [64, 128, 256, 512, 1024], [1, 2, 4, 8]) if bn * 16 // (32 * w) <= 256]


def max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="CSV path (default: a temporary folder; see --record)")
    ap.add_argument("--record", action="store_true",
                    help="write benchmarks/results/kernels_tune_<device>.csv (e.g. kernels_tune_h200.csv)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--max-seconds", type=float, default=230.0,
                    help="skip remaining configs (keeping what is measured) after this long")
    ap.add_argument("--cases", default=None, help="e.g. 64:16:distinct,1:16:1 (default: all)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script itself (needs TRITON_INTERPRET=1): tiny shapes, "
                         "2 configs per grid, one case; timings meaningless")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: kernels_tune.py times GPU kernels; no CUDA device", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    cases = CASES if args.cases is None else [
        (int(b), int(r), d) for b, r, d in (c.split(":") for c in args.cases.split(","))]
    dev, dtype, shapes = "cuda", torch.float16, "llama2-7b"
    s_grid, e_grid = shrink_grid(), expand_grid()
    if args.smoke:
        dev, dtype, shapes, cases = "cpu", torch.float32, "tiny", [(4, 16, "distinct")]
        s_grid, e_grid, args.reps = s_grid[:2], e_grid[:2], 1
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)"
    print(f"# torch {torch.__version__}, triton {triton.__version__}, {name}; {dtype}; "
          f"reps {args.reps}")
    path = result_path("kernels_tune", dev, args.out, args.record)
    print(f"# results: {path}")
    fh, emit = csv_sink(path, FIELDS)

    timer = Timer(dev, args.reps, warmup=2, graphs=True)
    copy_bw = measure_copy_bw(timer, dev, lambda row: None)
    print(f"copy bandwidth {copy_bw:.0f} GB/s")
    groups = SHAPES[shapes]
    esize = torch.empty(0, dtype=dtype).element_size()
    layer = Layer(groups, [randn(sum(s), k, dtype=dtype, device=dev, std=0.02) for _, k, s in groups],
                  esize)
    base_shrink = {k: v for k, v in tuning.pick(tuning.SHRINK_DECODE, 64, 16).items()}
    base_expand = tuning.pick(tuning.EXPAND_DECODE, 64, 16)
    summary = []
    over = lambda: time.time() - t0 > args.max_seconds  # noqa: E731

    for batch, rank, dist in cases:
        if over():
            print(f"time cap: case {batch}/{rank}/{dist} skipped")
            continue
        ids = slot_ids_for(batch, dist, dev)
        n_ad = int(ids.max()) + 1
        stacks = make_stacks(layer, n_ad, rank, dtype, dev)
        sets = [[randn(batch, k, dtype=dtype, device=dev) for _, k, _ in groups] for _ in range(2)]
        ys = [[torch.zeros(batch, sum(s), dtype=dtype, device=dev) for _, _, s in groups]
              for _ in range(2)]
        idx = ids.long()
        # fp32 references: v per group (gathered A), y = LoRA delta via the torch backend.
        v_ref = [torch.einsum("tk,trk->tr", x.float(), st.A[idx].flatten(1, 2).float())
                 for x, st in zip(sets[0], stacks)]
        y_ref = [_expand_ref(v, st, ids, sum(s)) for v, st, (_, _, s) in zip(v_ref, stacks, groups)]
        a_bytes = sum(n_ad * rank * len(s) * k * esize for _, k, s in groups)
        b_bytes = sum(n_ad * rank * sum(s) * esize for _, k, s in groups)
        key = dict(batch=batch, rank=rank, dist=dist)

        def time_shrink(cfg: dict, phase: str) -> float | None:
            try:
                err = max(max_rel(_vsum(shrink_decode(x, st, ids, **cfg)), vr)
                          for x, st, vr in zip(sets[0], stacks, v_ref))
                t, _ = timer([lambda s=s: [shrink_decode(x, st, ids, **cfg)
                                           for x, st in zip(s, stacks)] for s in sets])
            except Exception as e:  # noqa: BLE001 -- a config that fails to compile is data too
                emit(dict(**key, phase=phase, kernel="shrink", **cfg, ok=False,
                          note=f"{type(e).__name__}: {str(e)[:120]}"))
                return None
            ok = err < 1e-2
            emit(dict(**key, phase=phase, kernel="shrink", **cfg, time_us=t, adapter_bytes=a_bytes,
                      adapter_gbps=a_bytes / t / 1e3, max_rel_err=err, ok=ok))
            return t if ok else None

        def time_expand(cfg: dict, phase: str) -> float | None:
            vs = [v.contiguous() for v in v_ref]
            try:
                errs = []
                for v, st, yr, (_, _, s) in zip(vs, stacks, y_ref, groups):
                    y = torch.zeros(batch, sum(s), dtype=dtype, device=dev)
                    expand_decode(y, v, st, ids, **cfg)
                    errs.append(max_rel(y, yr))
                err = max(errs)
                t, _ = timer([lambda yy=yy: [expand_decode(y, v, st, ids, **cfg)
                                             for y, v, st in zip(yy, vs, stacks)] for yy in ys])
            except Exception as e:  # noqa: BLE001
                emit(dict(**key, phase=phase, kernel="expand", block_n=cfg["block_n"],
                          e_warps=cfg["num_warps"], ok=False, note=f"{type(e).__name__}: {e}"[:140]))
                return None
            ok = err < 1e-2
            emit(dict(**key, phase=phase, kernel="expand", block_n=cfg["block_n"],
                      e_warps=cfg["num_warps"], time_us=t, adapter_bytes=b_bytes,
                      adapter_gbps=b_bytes / t / 1e3, max_rel_err=err, ok=ok))
            return t if ok else None

        def time_both(scfg: dict, ecfg: dict, phase: str) -> float | None:
            def run(xs: list[torch.Tensor], yy: list[torch.Tensor]) -> None:
                for x, y, st in zip(xs, yy, stacks):
                    expand_decode(y, shrink_decode(x, st, ids, **scfg), st, ids, **ecfg)
            fresh = [torch.zeros_like(y) for y in ys[0]]
            run(sets[0], fresh)
            err = max(max_rel(y, yr) for y, yr in zip(fresh, y_ref))
            t, _ = timer([lambda s=s, yy=yy: run(s, yy) for s, yy in zip(sets, ys)])
            ok = err < 1e-2
            emit(dict(**key, phase=phase, kernel="lora", **scfg, block_n=ecfg["block_n"],
                      e_warps=ecfg["num_warps"], time_us=t, adapter_bytes=a_bytes + b_bytes,
                      adapter_gbps=(a_bytes + b_bytes) / t / 1e3, max_rel_err=err, ok=ok))
            return t if ok else None

        results: list[tuple[float, dict]] = []
        for cfg in s_grid:
            if over():
                break
            t = time_shrink(cfg, "1")
            if t is not None:
                results.append((t, cfg))
        e_results: list[tuple[float, dict]] = []
        for cfg in e_grid:
            if over():
                break
            t = time_expand(cfg, "1")
            if t is not None:
                e_results.append((t, cfg))
        results.sort(key=lambda r: r[0])
        for _, cfg in results[:3]:
            for stages, partials in [(1, False), (2, False), (4, False), (cfg["num_stages"], True)]:
                if over():
                    break
                c2 = dict(cfg, num_stages=stages, partials=partials)
                t = time_shrink(c2, "2")
                if t is not None:
                    results.append((t, c2))
        results.sort(key=lambda r: r[0])
        e_results.sort(key=lambda r: r[0])
        t_def = time_both(base_shrink, base_expand, "3-defaults")
        line = f"case batch {batch:>3} rank {rank:>2} {dist:>8}: defaults {t_def or float('nan'):.1f} us"
        if results and e_results:
            bs, be = results[0][1], e_results[0][1]
            t_best = time_both(bs, be, "3-best")
            # the best with the other split-K mode, in case expand's partial sums cost more than
            # the shrink-only timing saw
            alt = next((c for _, c in results if c["partials"] != bs["partials"]), None)
            t_alt = time_both(alt, be, "3-best-alt") if alt else None
            line += (f" | best shrink {results[0][0]:.1f} us {bs} | best expand {e_results[0][0]:.1f} "
                     f"us {be} | together {t_best or float('nan'):.1f} us"
                     + (f" (other split-K mode {t_alt:.1f})" if t_alt else ""))
        print(line, flush=True)
        summary.append(line)
        del stacks, sets, ys, v_ref, y_ref
        torch.cuda.empty_cache()
    fh.close()
    from benchmarks.recording import finish
    print(f"\n{time.time() - t0:.0f} s")
    print(finish(path.parent, [path.name], args.record and not args.out))
    return 0


def _vsum(v: torch.Tensor) -> torch.Tensor:
    return v.sum(0) if v.dim() == 3 else v


def _expand_ref(v: torch.Tensor, stack, ids: torch.Tensor, n: int) -> torch.Tensor:  # noqa: ANN001
    """fp32 delta for a given v (expand alone): per slice v_s @ B[slot, slice]^T * scale."""
    idx = ids.long()
    out = torch.zeros(v.shape[0], n, device=v.device)
    R = stack.max_rank
    for s, (off, sz) in enumerate(zip(stack.slice_offsets, stack.slice_sizes)):
        b = stack.B[idx, off:off + sz].float()  # [T, sz, R]
        out[:, off:off + sz] = torch.einsum("tr,tnr->tn", v[:, s * R:(s + 1) * R], b)
    return out * stack.scales[idx][:, None]


if __name__ == "__main__":
    sys.exit(main())
