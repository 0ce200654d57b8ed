"""What every family's custom ops share.

Custom ops take no objects and return no ``None``: ``LogitOptions`` travels as its four fields
and optional outputs as 0-element tensors. Each op is declared with an explicit schema built
from the shared pieces below, so the options and gradients are spelled once for all families.
"""

from __future__ import annotations

import torch

from ..kernels._common import GRAD_FIELDS, LogitOptions, StatRequest, TokenStats, compute_dtype

#: ``LogitOptions``' fields in the op schemas, in order (``LogitOptions.as_args``).
OPTIONS = "int ignore_index, float logit_scale, float? softcap, float temperature"
#: Which optional statistics a forward computes (``StatRequest``' fields, in order).
REQUEST = "bool need_entropy, bool need_zmean, bool need_log_sum_p2, int topk"
#: A forward op returns the seven ``TokenStats`` fields (0-element when not requested).
STATS = "(" + ", ".join(["Tensor"] * len(TokenStats._fields)) + ")"
#: The forward's statistics a backward reads (``lse``; ``entropy`` / ``log_sum_p2`` may be empty).
SAVED = "Tensor lse, Tensor entropy, Tensor log_sum_p2"
#: Upstream gradients of the differentiable ``TokenStats`` fields (a missing one is zero).
GRADS = ", ".join(f"Tensor? g_{k}" for k in GRAD_FIELDS)


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
    """A forward's :class:`TokenStats` as the op's seven tensors (the ids stay int64 when empty)."""
    out = [pack(t, stats.logp) for t in stats]
    if stats.topk_ids is None:
        out[5] = stats.logp.new_empty(0, dtype=torch.int64)
    return tuple(out)


def unpack_grads(n: int, grads) -> TokenStats:
    """Upstream gradients of the differentiable fields as a :class:`TokenStats` (0-element or
    missing gradients become ``None``: zero)."""
    return TokenStats(*(unpack(g, n) for g in grads))


def unpack_saved(n: int, lse, entropy, log_sum_p2) -> TokenStats:
    return TokenStats(None, lse, unpack(entropy, n), None, unpack(log_sum_p2, n))


def fake_stats(x: torch.Tensor, n: int, want: StatRequest) -> tuple[torch.Tensor, ...]:
    """Fake outputs (shapes and dtypes only) of a forward op: the ``[N]`` statistics in the compute
    dtype and the ``[N, K]`` top-k, 0-element where not requested."""
    dt = compute_dtype(x)
    flags = (True, True, want.entropy, want.zmean, want.log_sum_p2)
    k = want.topk
    topk = (x.new_empty((n, k) if k else 0, dtype=torch.int64), x.new_empty((n, k) if k else 0, dtype=dt))
    return tuple(x.new_empty(n if need else 0, dtype=dt) for need in flags) + topk


def stats_like(outputs, targets: torch.Tensor, want: StatRequest) -> TokenStats:
    """A forward op's outputs as :class:`TokenStats` shaped like ``targets`` (``[..., K]`` for the
    top-k), ``None`` where not requested."""
    shape = targets.shape
    flags = (True, True, want.entropy, want.zmean, want.log_sum_p2)
    per_token = [t.view(shape) if need else None for t, need in zip(outputs[:5], flags)]
    topk = [t.view(*shape, want.topk) if want.topk else None for t in outputs[5:]]
    return TokenStats(*per_token, *topk)


def setup_stats_context(ctx, output) -> None:
    """The top-k outputs have no gradient."""
    ctx.mark_non_differentiable(output[5], output[6])


def options(args) -> LogitOptions:
    return LogitOptions(*args)


def no_grads(ctx) -> tuple[None, ...]:
    """``None`` for every non-tensor input of a forward op (recorded by its setup_context)."""
    return (None,) * ctx.n_options
