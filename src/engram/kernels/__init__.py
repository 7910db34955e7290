"""Fused GPU kernels for Engram (Triton), each with a plain-PyTorch twin used off-GPU and by the tests.

One folder per op: ``naive.py`` (the specification, plain torch), the Triton kernels, and ``op.py`` (the
public function with autograd, dispatching to Triton on CUDA and to the naive path elsewhere).
"""
