"""Triton kernels for unmerged multi-adapter LoRA and for drift-free merging.

Importing this package imports triton. Set TRITON_INTERPRET=1 *before* the import to run the kernels
on CPU (triton decides between compiled and interpreted kernels when `@triton.jit` runs).
"""
