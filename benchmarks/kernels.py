#!/usr/bin/env python3
"""LoRA kernel and merge benchmark on Llama-2-7B layer shapes (one transformer layer, 7 projections).

What it measures, all in one run so the numbers are ratios of the same machine state:
- copy bandwidth: a 1 GiB device-to-device copy (the roofline for everything below);
- the merged base GEMMs of a layer (x @ W^T for qkv, o, gate_up, down): the floor of "unmerged overhead";
- unmerged LoRA on all 7 projections for decode batches, by four methods: ours (Triton BGMV-style
  per-token slots, and SGMV-style segments), the dLoRA artifact's one-hot einsum over the resident
  adapters, and gather + bmm; plus ours fused with the base GEMMs ("unmerged" = base + LoRA);
- merge / switch / unmerge of all 7 projections, against the bandwidth floor (read W + write W).

Timing: each op is captured in a CUDA graph (so Python launch overhead does not pollute kernel time;
falls back to eager with a note), the L2 (60 MB on H200) is flushed by writing 256 MB before every
timed call, inputs rotate over two random buffer sets, and each number is the median of `--reps`
CUDA-event timings after warm-up. `--device cpu` runs the same logic on the torch path with
perf_counter (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install

from dlora_gpu.lora_ops import einsum_resident, gather_bmm, lora_apply  # noqa: E402
from dlora_gpu.lora_stack import LoRAStack, group_by_slot  # noqa: E402
from dlora_gpu.merge import merge_from_pristine, naive_merge_, naive_unmerge_  # noqa: E402

# (group, in features, out features of each fused slice); Llama-2-7B has no GQA: k, v are 4096.
SHAPES: dict[str, list[tuple[str, int, tuple[int, ...]]]] = {
    "llama2-7b": [("qkv", 4096, (4096, 4096, 4096)), ("o", 4096, (4096,)),
                  ("gate_up", 4096, (11008, 11008)), ("down", 11008, (4096,))],
    "tiny": [("qkv", 256, (256, 256, 256)), ("o", 256, (256,)),
             ("gate_up", 256, (688, 688)), ("down", 688, (256,))],
}
LAYERS = 32
FULL = {"batches": [1, 8, 16, 32, 64, 128, 256], "ranks": [8, 16, 32, 64],
        "dists": ["1", "8", "distinct"]}
QUICK = {"batches": [1, 16, 64, 256], "ranks": [16, 64], "dists": ["1", "distinct"]}
HEADLINE = (64, 16, "distinct")  # acceptance: overhead <= 15% over the base GEMMs
FIELDS = ["section", "method", "backend", "dtype", "batch", "rank", "dist", "n_adapters", "time_us",
          "bytes", "gbps", "frac_copy_bw", "base_us", "overhead", "overhead_floor", "floor_us",
          "x_floor", "timing"]


class Timer:
    """Median microseconds of one call; see the module docstring for the protocol."""

    def __init__(self, device: str, reps: int, warmup: int, graphs: bool) -> None:
        self.device, self.reps, self.warmup, self.graphs = device, reps, warmup, graphs
        self.flush = (torch.empty(256 * 2**20, dtype=torch.int8, device=device)
                      if device == "cuda" else None)
        self.graph_error: str | None = None

    def __call__(self, fns: list[Callable[[], object]], graphs: bool | None = None) -> tuple[float, str]:
        for _ in range(self.warmup):
            for f in fns:
                f()
        if self.device != "cuda":
            times = []
            for i in range(self.reps):
                t0 = time.perf_counter()
                fns[i % len(fns)]()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times), "cpu-perf_counter"
        torch.cuda.synchronize()
        runners, mode = fns, "eager"
        use_graphs = self.graphs if graphs is None else graphs
        if use_graphs:
            try:
                runners, mode = [self._capture(f) for f in fns], "cudagraph"
            except Exception as e:  # noqa: BLE001 -- report and measure eagerly instead
                torch.cuda.synchronize()
                self.graph_error = f"{type(e).__name__}: {e}"
                print(f"  (CUDA graph capture failed, timing eagerly: {self.graph_error})")
        assert self.flush is not None
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(self.reps)]
        for i, (start, end) in enumerate(ev):
            self.flush.zero_()
            start.record()
            runners[i % len(runners)]()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev), mode

    @staticmethod
    def _capture(f: Callable[[], object]) -> Callable[[], object]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            f()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        torch.cuda.synchronize()
        return g.replay


@dataclass
class Layer:
    groups: list[tuple[str, int, tuple[int, ...]]]
    weights: list[torch.Tensor]  # per group [N_total, K]
    esize: int

    @property
    def weight_bytes(self) -> int:
        return sum(w.numel() for w in self.weights) * self.esize


def randn(*shape: int, dtype: torch.dtype, device: str, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * std).to(dtype)


def make_stacks(layer: Layer, n: int, rank: int, dtype: torch.dtype, device: str) -> list[LoRAStack]:
    stacks = []
    for _, k, sizes in layer.groups:
        a = randn(n, len(sizes), rank, k, dtype=dtype, device=device, std=k ** -0.5)
        b = randn(n, sum(sizes), rank, dtype=dtype, device=device, std=rank ** -0.5)
        stacks.append(LoRAStack(a, b, torch.full((n,), rank, dtype=torch.int32),
                                torch.full((n,), 2.0 / rank), sizes))
    return stacks


def slot_ids_for(batch: int, dist: str, device: str) -> torch.Tensor:
    n = {"1": 1, "8": min(8, batch), "distinct": batch}[dist]
    ids = torch.arange(batch) % n
    return ids[torch.randperm(batch)].to(torch.int32).to(device)


def lora_bytes(layer: Layer, batch: int, n_adapters: int, rank: int) -> tuple[int, int]:
    """(adapter bytes, total bytes: adapters + x read + y read/write + fp32 v round trip)."""
    e = layer.esize
    adapters = sum(n_adapters * rank * (len(s) * k + sum(s)) * e for _, k, s in layer.groups)
    acts = sum(batch * (k * e + 2 * sum(s) * e + 2 * len(s) * rank * 4) for _, k, s in layer.groups)
    return adapters, adapters + acts


def bench_config(layer: Layer, timer: Timer, batch: int, rank: int, dist: str, dtype: torch.dtype,
                 device: str, backend: str, copy_bw: float, base_cache: dict[int, float],
                 emit: Callable[[dict], None]) -> dict[str, float]:
    ids = slot_ids_for(batch, dist, device)
    n_adapters = int(ids.max()) + 1
    stacks = make_stacks(layer, n_adapters, rank, dtype, device)
    order, segs = group_by_slot(ids)
    sets = []
    for _ in range(2):  # two rotated input sets
        xs = [randn(batch, k, dtype=dtype, device=device) for _, k, _ in layer.groups]
        ys = [torch.zeros(batch, sum(s), dtype=dtype, device=device) for _, _, s in layer.groups]
        sets.append((xs, ys, [x[order].contiguous() for x in xs]))

    def base(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        for x, y, w in zip(xs, ys, layer.weights):
            torch.mm(x, w.t(), out=y)

    def bgmv(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        for x, y, st in zip(xs, ys, stacks):
            lora_apply(y, x, st, slot_ids=ids, backend=backend)

    def sgmv(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        for x, y, st in zip(xs, ys, stacks):
            lora_apply(y, x, st, segments=segs, backend=backend)

    def dense(fn: Callable) -> Callable:
        def run(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
            for x, y, st in zip(xs, ys, stacks):
                fn(y, x, st, ids)
        return run

    def unmerged(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        base(xs, ys)
        bgmv(xs, ys)

    if batch not in base_cache:
        base_cache[batch], mode = timer([lambda s=s: base(s[0], s[1]) for s in sets])
        base_bytes = layer.weight_bytes + sum(batch * (k + sum(s)) * layer.esize
                                              for _, k, s in layer.groups)
        emit(dict(section="layer", method="base_gemm", backend="torch", batch=batch,
                  time_us=base_cache[batch], bytes=base_bytes,
                  gbps=base_bytes / base_cache[batch] / 1e3,
                  frac_copy_bw=base_bytes / base_cache[batch] / 1e3 / copy_bw, timing=mode))
    base_us = base_cache[batch]
    adapter_b, total_b = lora_bytes(layer, batch, n_adapters, rank)
    floor = adapter_b / layer.weight_bytes
    out = {"base": base_us}
    methods: list[tuple[str, str, Callable]] = [
        ("lora_bgmv", backend, lambda s: bgmv(s[0], s[1])),
        # Segments read x in adapter order; y rows stay unsorted (same bytes, timing only).
        ("lora_sgmv", backend, lambda s: sgmv(s[2], s[1])),
        ("einsum_resident", "torch", lambda s: dense(einsum_resident)(s[0], s[1])),
        ("gather_bmm", "torch", lambda s: dense(gather_bmm)(s[0], s[1])),
        ("unmerged", backend, lambda s: unmerged(s[0], s[1])),
    ]
    for method, be, fn in methods:
        t, mode = timer([lambda s=s, fn=fn: fn(s) for s in sets])
        out[method] = t
        lora_t = t - base_us if method == "unmerged" else t
        row = dict(section="lora", method=method, backend=be, batch=batch, rank=rank, dist=dist,
                   n_adapters=n_adapters, time_us=t, base_us=base_us, overhead_floor=floor,
                   overhead=(t / base_us - 1) if method == "unmerged" else t / base_us,
                   timing=mode)
        if method != "unmerged":
            row.update(bytes=total_b, gbps=total_b / lora_t / 1e3,
                       frac_copy_bw=total_b / lora_t / 1e3 / copy_bw)
        emit(row)
    return out


def bench_merge(layer: Layer, timer: Timer, rank: int, dtype: torch.dtype, device: str,
                backend: str, copy_bw: float, emit: Callable[[dict], None]) -> dict[str, float]:
    """Merge / switch / unmerge of the 7 projections of one layer (x32 for the model)."""
    live = [w.clone() for w in layer.weights]
    pristine = [w.clone() for w in layer.weights]
    projections = []  # (live view, pristine view) per projection: q, k, v, o, gate, up, down
    for (_, k, sizes), w, p in zip(layer.groups, live, pristine):
        off = 0
        for n in sizes:
            projections.append((w[off:off + n], p[off:off + n], n, k))
            off += n
    ads = [[(randn(rank, k, dtype=dtype, device=device, std=0.1),
             randn(n, rank, dtype=dtype, device=device, std=0.1), 2.0 / rank)
            for _, _, n, k in projections] for _ in range(2)]
    adapter_b = sum(a.numel() + b.numel() for a, b, _ in ads[0]) * layer.esize
    floor_b = 2 * layer.weight_bytes + adapter_b  # read pristine + write W (+ A, B)
    floor_us = floor_b / (copy_bw * 1e3)  # GB/s = 1e3 bytes/us

    def fused(which: int, be: str) -> Callable[[], None]:
        def run() -> None:
            for (w, p, _, _), (a, b, s) in zip(projections, ads[which]):
                merge_from_pristine(w, p, a, b, s, backend=be)
        return run

    def unmerge() -> None:
        for w, p in zip(live, pristine):
            w.copy_(p)

    def naive_switch() -> None:
        for (w, _, _, _), old, new in zip(projections, ads[0], ads[1]):
            naive_unmerge_(w, *old)
            naive_merge_(w, *new)

    def naive_merge() -> None:
        for (w, _, _, _), ad in zip(projections, ads[0]):
            naive_merge_(w, *ad)

    cases = [("merge_fused", backend, fused(0, backend)), ("switch_fused", backend, fused(1, backend)),
             ("unmerge_copy", "torch", unmerge), ("merge_naive_inplace", "torch", naive_merge),
             ("switch_naive_inplace", "torch", naive_switch)]
    if backend == "triton":
        cases.append(("merge_fused", "torch", fused(0, "torch")))
    out = {"floor": floor_us}
    for method, be, fn in cases:
        t, mode = timer([fn])  # graphs too: 7 short launches in a row could starve on the host
        out[f"{method}/{be}"] = t
        emit(dict(section="merge", method=method, backend=be, rank=rank, time_us=t,
                  bytes=floor_b, gbps=floor_b / t / 1e3, frac_copy_bw=floor_b / t / 1e3 / copy_bw,
                  floor_us=floor_us, x_floor=t / floor_us, timing=mode))
    return out


def name_slug(name: str) -> str:
    """A device name as a file name part: "NVIDIA H200" -> "h200"."""
    return "-".join(name.lower().replace("nvidia", "").replace("_", " ").split()) or "gpu"


def device_slug(device: str) -> str:
    """What a result file is named for: the GPU's model, or "cpu"."""
    return name_slug(torch.cuda.get_device_name()) if device == "cuda" else "cpu"


def result_path(stem: str, device: str, out: str | None, record: bool) -> Path:
    """`--out` if given; with `--record`, benchmarks/results/<stem>_<device>.csv (recorded results
    change only when asked); else a fresh temporary folder, so a trial run dirties nothing."""
    if out:
        return Path(out)
    from benchmarks.recording import output_dir
    return output_dir(record, stem) / f"{stem}_{device_slug(device)}.csv"


def csv_sink(path: Path, fields: list[str]):
    """Open a CSV for rows that arrive one by one (flushed as they come, so a killed run keeps them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("w", newline="")
    writer = csv.DictWriter(fh, fieldnames=fields)
    writer.writeheader()

    def write_row(row: dict) -> None:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        fh.flush()

    return fh, write_row


def measure_copy_bw(timer: Timer, device: str, emit: Callable[[dict], None]) -> float:
    """GB/s of a large device-to-device copy, counting bytes read and written."""
    src = torch.empty(2**30 if device == "cuda" else 2**26, dtype=torch.int8,
                      device=device).random_(-100, 100)
    dst = torch.empty_like(src)
    t_copy, _ = timer([lambda: dst.copy_(src)], graphs=False)
    copy_bw = 2 * src.numel() / t_copy / 1e3
    emit(dict(section="copy", method="d2d_copy", backend="torch", time_us=t_copy,
              bytes=2 * src.numel(), gbps=copy_bw, frac_copy_bw=1.0, timing="eager"))
    return copy_bw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="CSV path (default: a temporary folder; see --record)")
    ap.add_argument("--record", action="store_true",
                    help="write benchmarks/results/kernels_<device>.csv (e.g. kernels_h200.csv)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                    help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--shapes", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true", help="reduced sweep")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per op (default 40 / 5 cpu)")
    ap.add_argument("--max-seconds", type=float, default=200.0,
                    help="stop the sweep (keeping what is measured) after this many seconds")
    ap.add_argument("--no-graphs", action="store_true", help="time eagerly, without CUDA graphs")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; this benchmark measures GPU kernels. "
              "For a smoke test of the script on CPU: --device cpu --quick --shapes tiny",
              file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    backend = "triton" if args.device == "cuda" else "torch"
    reps = args.reps or (40 if args.device == "cuda" else 5)
    sweep = QUICK if args.quick else FULL
    t_start = time.time()
    torch.manual_seed(0)
    env = f"torch {torch.__version__}"
    if args.device == "cuda":
        import triton
        env += f", triton {triton.__version__}, {torch.cuda.get_device_name()}"
    print(f"# {env}; dtype {dtype}; shapes {args.shapes}; reps {reps}; backend {backend}")

    path = result_path("kernels", args.device, args.out, args.record)
    print(f"# results: {path}")
    fh, write_row = csv_sink(path, FIELDS)

    def emit(row: dict) -> None:
        write_row({"dtype": str(dtype).replace("torch.", ""), **row})

    timer = Timer(args.device, reps, warmup=2 if args.device == "cuda" else 1,
                  graphs=not args.no_graphs)
    copy_bw = measure_copy_bw(timer, args.device, emit)
    print(f"copy bandwidth (read+write): {copy_bw:.0f} GB/s")

    groups = SHAPES[args.shapes]
    esize = torch.empty(0, dtype=dtype).element_size()
    layer = Layer(groups, [randn(sum(s), k, dtype=dtype, device=args.device, std=0.02)
                           for _, k, s in groups], esize)
    base_cache: dict[int, float] = {}

    hb, hr, hd = HEADLINE
    print(f"\n== headline: batch {hb}, {hb if hd == 'distinct' else hd} adapters, rank {hr}, "
          f"all 7 projections of one layer ==")
    h = bench_config(layer, timer, hb, hr, hd, dtype, args.device, backend, copy_bw, base_cache,
                     emit)
    adapter_b, _ = lora_bytes(layer, hb, hb if hd == "distinct" else int(hd), hr)
    floor = adapter_b / layer.weight_bytes
    print(f"base GEMMs {h['base']:.1f} us | LoRA bgmv {h['lora_bgmv']:.1f} us, sgmv "
          f"{h['lora_sgmv']:.1f}, einsum {h['einsum_resident']:.1f}, gather+bmm "
          f"{h['gather_bmm']:.1f} | base+LoRA {h['unmerged']:.1f} us")
    print(f"unmerged overhead {100 * (h['unmerged'] / h['base'] - 1):.1f}% (target <= 15%); "
          f"bandwidth floor {100 * floor:.1f}% (adapter bytes / base weight bytes)")

    print("\n== merge / switch / unmerge, 7 projections of one layer (x32 = whole model) ==")
    for rank in (16, 64):
        m = bench_merge(layer, timer, rank, dtype, args.device, backend, copy_bw, emit)
        floor_us = m.pop("floor")
        parts = ", ".join(f"{k} {v:.0f} us ({v / floor_us:.2f}x)" for k, v in m.items())
        print(f"rank {rank}: floor {floor_us:.0f} us/layer ({LAYERS * floor_us / 1e3:.2f} ms/model);"
              f" {parts}")

    print(f"\n== sweep ({'quick' if args.quick else 'full'}); overhead = LoRA / base GEMMs, "
          "'unm' = measured (base+LoRA)/base - 1 ==")
    hdr = (f"{'batch':>5} {'rank':>4} {'dist':>8} {'base':>8} {'bgmv':>8} {'sgmv':>8} {'einsum':>9} "
           f"{'gather':>9} {'bgmvGB/s':>9} {'%copy':>6} {'unm%':>6} {'floor%':>6}")
    print(hdr + "   (times in us)")
    configs = [(b, r, d) for b in sweep["batches"] for r in sweep["ranks"] for d in sweep["dists"]]
    seen: set[tuple[int, int, int]] = set()
    skipped = 0
    for b, r, d in configs:
        n = {"1": 1, "8": min(8, b), "distinct": b}[d]
        if (b, r, n) in seen:  # e.g. batch 1: every distribution is one adapter
            continue
        seen.add((b, r, n))
        if time.time() - t_start > args.max_seconds:
            skipped += 1
            continue
        res = h if (b, r, d) == HEADLINE else bench_config(
            layer, timer, b, r, d, dtype, args.device, backend, copy_bw, base_cache, emit)
        ab, total_b = lora_bytes(layer, b, n, r)
        print(f"{b:>5} {r:>4} {d:>8} {res['base']:>8.1f} {res['lora_bgmv']:>8.1f} "
              f"{res['lora_sgmv']:>8.1f} {res['einsum_resident']:>9.1f} {res['gather_bmm']:>9.1f} "
              f"{total_b / res['lora_bgmv'] / 1e3:>9.0f} "
              f"{100 * total_b / res['lora_bgmv'] / 1e3 / copy_bw:>6.1f} "
              f"{100 * (res['unmerged'] / res['base'] - 1):>6.1f} "
              f"{100 * ab / layer.weight_bytes:>6.1f}")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        print(f"(time budget --max-seconds {args.max_seconds:.0f} reached: {skipped} configs skipped)")
    if timer.graph_error:
        print(f"note: some timings are eager because graph capture failed: {timer.graph_error}")
    fh.close()
    from benchmarks.recording import finish
    print(f"\n{time.time() - t_start:.0f} s")
    print(finish(path.parent, [path.name], args.record and not args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
