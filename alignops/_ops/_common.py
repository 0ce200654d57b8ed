"""What every family's custom ops share: custom ops take no ``None`` outputs and no objects, so
optional outputs travel as 0-element tensors and ``LogitOptions`` as its fields."""

from __future__ import annotations

import torch

from ..kernels._common import LogitOptions, TokenStats, compute_dtype

#: Custom-op argument names of ``LogitOptions``' fields, in order (``LogitOptions.as_args``).
OPTION_ARGS = ("ignore_index", "logit_scale", "softcap", "temperature")


def pack(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An optional output as a tensor: ``None`` becomes a 0-element tensor."""
    return like.new_empty(0) if t is None else t


def unpack(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Inverse of :func:`pack` for a per-token tensor of ``n`` rows (``n = 0`` is a real one)."""
    return None if t is None or (t.numel() == 0 and n != 0) else t


def pack_stats(stats: TokenStats, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(pack(t, like) for t in stats)


def unpack_grads(n: int, *grads: torch.Tensor | None) -> TokenStats:
    """Upstream gradients of (logp, lse, entropy, zmean) as a :class:`TokenStats` (0-element or
    missing gradients become ``None``: zero)."""
    return TokenStats(*(unpack(g, n) for g in grads))


def fake_stats(x: torch.Tensor, n: int, need_entropy: bool, need_zmean: bool) -> tuple[torch.Tensor, ...]:
    """Fake outputs (shapes and dtypes only) of a forward op: four ``[N]`` tensors in the compute
    dtype, 0-element where not requested."""
    dt = compute_dtype(x)
    out = x.new_empty(n, dtype=dt)
    return (
        out,
        torch.empty_like(out),
        x.new_empty(n if need_entropy else 0, dtype=dt),
        x.new_empty(n if need_zmean else 0, dtype=dt),
    )


def options(args) -> LogitOptions:
    return LogitOptions(*args)
