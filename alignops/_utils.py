"""Small shared helpers: output allocation (with NaN poisoning for tests), env flags."""

from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("ALIGNOPS_POISON", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Allocate an output buffer; filled with NaN when ``ALIGNOPS_POISON=1`` (tests) so an
    element a kernel forgets to write is caught. Integer buffers are filled with -1."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    return v.lower() not in ("0", "false", "no", "off")
