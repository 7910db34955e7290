"""Fused GPU kernels for Engram (Triton), each with a plain-PyTorch twin used off-GPU and by the tests.

One folder per op: ``naive.py`` (the specification, plain torch), the Triton kernels, and ``op.py`` (the
public function with autograd, dispatching to Triton on CUDA and to the naive path elsewhere).
:mod:`~engram.kernels.fp8` is the packed FP8 row format the gathers read (quantise, pack, dequantise, plain torch).
Nothing here imports the rest of engram: the kernels are the bottom layer (docs/design.md §9).
"""
