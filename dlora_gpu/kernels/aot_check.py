"""Compile every kernel for a GPU target (default sm_90, Hopper) without a GPU.

Why: the interpreter runs kernels as numpy and accepts code the real compiler rejects (types of
`if` branches, pointer/int mixes, bitcasts). Compiling through ttir -> ttgir -> llir -> ptx -> cubin
here catches those on CPU-only CI. Run it without TRITON_INTERPRET:
    python -m dlora_gpu.kernels.aot_check [--arch 90]
Prints one line per kernel variant and the registers / local-memory spill bytes when the triton
wheel ships cuobjdump; exits 1 on any compile failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dlora_gpu.kernels.lora_expand import _expand_decode_kernel, _expand_segment_kernel
from dlora_gpu.kernels.lora_shrink import _shrink_decode_kernel, _shrink_segment_kernel
from dlora_gpu.kernels.merge import _fused_merge_kernel

I32 = "i32"


def variants(dt: str) -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(name, kernel, signature, constexprs, num_warps) as the launchers use them for one dtype."""
    p, f32 = f"*{dt}", dt == "fp32"
    ints = lambda *names: {n: I32 for n in names}  # noqa: E731
    cx = lambda **kw: ({k: "constexpr" for k in kw}, kw)  # noqa: E731
    out = []
    sig, c = cx(BLOCK_R=16, BLOCK_K=256, LATE_SUM=True, ATOMIC=False)
    out.append(("shrink_decode", _shrink_decode_kernel,
                {"x_ptr": p, "a_ptr": p, "v_ptr": "*fp32", "slot_ptr": "*i32", "rank_ptr": "*i32",
                 **ints("K", "stride_xt", "stride_as", "stride_ar", "stride_vt", "stride_vk", "R",
                        "NR", "SPLIT_K"), **sig}, c, 4))
    sig, c = cx(BLOCK_M=32, BLOCK_R=64, BLOCK_K=64, DOT_FP32=f32)
    out.append(("shrink_segments", _shrink_segment_kernel,
                {"x_ptr": p, "a_ptr": p, "v_ptr": "*fp32", "seg_start_ptr": "*i32",
                 "seg_len_ptr": "*i32", "seg_slot_ptr": "*i32", "rank_ptr": "*i32",
                 **ints("K", "stride_xt", "stride_as", "stride_ar", "stride_vt", "R", "NR",
                        "ROW_BLOCKS", "SPLIT_K"), **sig}, c, 4))
    common = {"v_ptr": "*fp32", "b_ptr": p, "y_ptr": p}
    tail = ints("stride_vt", "stride_bs", "stride_bn", "stride_yt", "R", "N_BLOCKS")
    meta = {"rank_ptr": "*i32", "scale_ptr": "*fp32", "slice_off_ptr": "*i32",
            "slice_size_ptr": "*i32"}
    sig, c = cx(BLOCK_N=128, BLOCK_R=64, SPLITS_P2=4, ALIGN=16, BF16_BITS=False)
    dec_tail = ints("stride_vt", "stride_vk", "V_SPLITS", "stride_bs", "stride_bn", "stride_yt", "R",
                    "N_BLOCKS")
    out.append(("expand_decode", _expand_decode_kernel,
                {**common, "slot_ptr": "*i32", **meta, **dec_tail, **sig}, c, 4))
    sig, c = cx(BLOCK_M=32, BLOCK_N=64, BLOCK_R=64, DOT_FP32=f32, BF16_BITS=False)
    out.append(("expand_segments", _expand_segment_kernel,
                {**common, "seg_start_ptr": "*i32", "seg_len_ptr": "*i32", "seg_slot_ptr": "*i32",
                 **meta, **tail, **sig}, c, 4))
    sig, c = cx(BLOCK_N=64, BLOCK_K=128, BLOCK_R=64, DOT_FP32=f32, BF16_BITS=False)
    out.append(("fused_merge", _fused_merge_kernel,
                {"out_ptr": p, "w_ptr": p, "a_ptr": p, "b_ptr": p, "scale": "fp32",
                 **ints("N", "K", "rank", "stride_on", "stride_wn", "stride_ar", "stride_bn"),
                 **sig}, c, 8))
    return out


def resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    lines = [ln.strip() for ln in res.stdout.splitlines() if "REG:" in ln]
    return " ".join(w for w in (lines[0].split() if lines else []) if w[:4] in ("REG:", "LOCA"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter has nothing to compile", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for dt in args.dtypes.split(","):
        for name, fn, sig, consts, warps in variants(dt):
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                   target=target, options={"num_warps": warps})
                print(f"ok   {name:<16} {dt:<5} sm_{args.arch} {resource_usage(k.asm['cubin'])}")
            except Exception as e:  # noqa: BLE001 -- report every failure, then exit 1
                failed += 1
                print(f"FAIL {name:<16} {dt:<5} sm_{args.arch}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
