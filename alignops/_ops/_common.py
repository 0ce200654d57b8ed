"""What every family's custom ops share.

Custom ops take no objects and return no ``None``: ``LogitOptions`` travels as its four fields
and optional outputs as 0-element tensors. Each op is declared with an explicit schema built
from the shared pieces below, so the options and gradients are spelled once for all families.
"""

from __future__ import annotations

import torch

from ..kernels._common import LogitOptions, TokenStats, compute_dtype

#: ``LogitOptions``' fields in the op schemas, in order (``LogitOptions.as_args``).
OPTIONS = "int ignore_index, float logit_scale, float? softcap, float temperature"
#: Upstream gradients of the four ``TokenStats`` fields (a missing one is zero).
GRADS = "Tensor? g_logp, Tensor? g_lse, Tensor? g_entropy, Tensor? g_zmean"
#: A forward op returns the four ``TokenStats`` fields (0-element when not requested).
STATS = "(Tensor, Tensor, Tensor, Tensor)"


def custom_op(name: str, impl, args: str, returns: str, *, mutates: tuple[str, ...] = ()):
    """``alignops::<name>`` with schema ``(<args>) -> <returns>`` implemented by ``impl``."""
    return torch.library.custom_op(
        f"alignops::{name}", impl, mutates_args=mutates, schema=f"({args}) -> {returns}"
    )


def pack(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An optional output as a tensor: ``None`` becomes a 0-element tensor."""
    return like.new_empty(0) if t is None else t


def unpack(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Inverse of :func:`pack` for a per-token tensor of ``n`` rows (``n = 0`` is a real one)."""
    return None if t is None or (t.numel() == 0 and n != 0) else t


def pack_stats(stats: TokenStats) -> tuple[torch.Tensor, ...]:
    return tuple(pack(t, stats.logp) for t in stats)


def unpack_grads(n: int, grads) -> TokenStats:
    """Upstream gradients of (logp, lse, entropy, zmean) as a :class:`TokenStats` (0-element or
    missing gradients become ``None``: zero)."""
    return TokenStats(*(unpack(g, n) for g in grads))


def fake_stats(x: torch.Tensor, n: int, need_entropy: bool, need_zmean: bool) -> tuple[torch.Tensor, ...]:
    """Fake outputs (shapes and dtypes only) of a forward op: four ``[N]`` tensors in the compute
    dtype, 0-element where not requested."""
    dt = compute_dtype(x)
    return tuple(x.new_empty(n if need else 0, dtype=dt) for need in (True, True, need_entropy, need_zmean))


def stats_like(outputs, targets: torch.Tensor, need_entropy: bool, need_zmean: bool) -> TokenStats:
    """A forward op's outputs as :class:`TokenStats` shaped like ``targets`` (``None`` where not
    requested)."""
    logp, lse, ent, zmean = (t.view(targets.shape) if t.numel() == targets.numel() else t for t in outputs)
    return TokenStats(logp, lse, ent if need_entropy else None, zmean if need_zmean else None)


def options(args) -> LogitOptions:
    return LogitOptions(*args)


def no_grads(ctx) -> tuple[None, ...]:
    """``None`` for every non-tensor input of a forward op (recorded by its setup_context)."""
    return (None,) * ctx.n_options
