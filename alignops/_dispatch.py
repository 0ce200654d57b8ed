"""Which engine runs a call: the Triton kernels (``alignops.kernels.<family>``) or the PyTorch
engine (``alignops._torch.<family>``); both modules expose the same functions.

``ALIGNOPS_BACKEND`` (docs/env.md): ``auto`` (default: Triton for CUDA tensors), ``triton``
(also CPU tensors, which only works under ``TRITON_INTERPRET=1``: that is how the kernels are
tested without a GPU) or ``torch`` (the PyTorch engine everywhere). float64 always runs the
PyTorch engine: the kernels take 16- and 32-bit floats.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` (its device and dtype) runs the Triton kernels."""
    if t.dtype == torch.float64:
        return False
    backend = os.environ.get("ALIGNOPS_BACKEND", "auto").lower()
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"ALIGNOPS_BACKEND must be auto, triton or torch, got {backend!r}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def engine(family: str, t: torch.Tensor) -> ModuleType:
    """The module implementing ``<family>_fwd`` / ``<family>_bwd`` for a call on ``t``."""
    package = "alignops.kernels" if use_triton(t) else "alignops._torch"
    return importlib.import_module(f"{package}.{family}")
