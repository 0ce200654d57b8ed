"""Triton kernels and their launchers (imported as ``alignops.kernels``).

Tensors in, tensors out: no autograd, no loss policy. One kernel family per module, its
math in the module docstring. Every module lists the compile configurations its launchers
use in ``AOT_SPECS`` so ``alignops kernels --arch sm_80,sm_90a`` can build them ahead of
time (see ``alignops/build_report.py``).

Triton is imported lazily by each module, so ``import alignops`` works without it.
"""
