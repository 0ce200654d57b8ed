"""Host-side helpers shared by every layer: the dtype policy, output allocation, env flags.

This module is the bottom of the stack: it imports only torch (never Triton, never
``alignops``), so the launchers in ``alignops.kernels``, the PyTorch engines, the losses and
the bindings can all use it without an upward import.
"""

from __future__ import annotations

import os

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype: float64 if any given tensor is float64, else float32.

    Every ``exp`` / ``log`` / sum runs in it whatever the storage dtype (bf16 / fp16 inputs
    accumulate in float32); float64 inputs stay float64 so ``gradcheck`` works."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def env_int(name: str, default: int) -> int:
    """Integer environment variable (docs/env.md); unset or empty gives ``default``."""
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def env_flag(name: str, default: bool) -> bool:
    """Boolean environment variable: ``0`` / ``false`` / ``no`` / ``off`` are false."""
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    return v.lower() not in ("0", "false", "no", "off")


def poison_enabled() -> bool:
    """``ALIGNOPS_POISON=1`` (set by the test suite): fill new outputs with NaN / -1."""
    return env_flag("ALIGNOPS_POISON", False)


def empty(shape, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Allocate an output buffer; filled with NaN when ``ALIGNOPS_POISON=1`` (tests) so an
    element a kernel forgets to write is caught. Integer buffers are filled with -1."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t
