"""Token-level helpers shared by the policy-gradient losses (:mod:`alignops.losses.policy`): the
prepared ``[B, T]`` batch, masked means, the aggregations over tokens / sequences and the ratio
and clipping metrics TRL logs.

Masked positions are selected out with ``torch.where`` before any arithmetic, so a NaN or Inf at
a masked position never reaches a value or a gradient. Counts are clamped to ``>= 1`` (an empty
batch gives a finite 0, as TRL does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels._common import compute_dtype

Count = int | float | torch.Tensor


@dataclass(frozen=True)
class TokenBatch:
    """A prepared ``[B, T]`` batch: ``lp`` (policy log-probs, 0 where masked, compute dtype),
    ``old`` (sampler log-probs, or ``lp.detach()`` on-policy), ``mb`` (bool mask), ``m`` (the mask
    in the compute dtype), ``n_i`` (``[B, 1]`` scored tokens per sequence)."""

    lp: torch.Tensor
    old: torch.Tensor
    mb: torch.Tensor
    m: torch.Tensor
    n_i: torch.Tensor

    @property
    def dt(self) -> torch.dtype:
        return self.lp.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.lp.shape[0], self.lp.shape[1]


def check_tokens(logps: torch.Tensor, **others: torch.Tensor | None) -> tuple[int, int]:
    """``logps`` is ``[B, T]`` and every other given tensor has that shape; returns ``(B, T)``."""
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, T], got shape {tuple(logps.shape)}")
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(logps.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, T] = {tuple(logps.shape)}")
    return logps.shape[0], logps.shape[1]


def token_batch(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    mask_truncated: torch.Tensor | None = None,
    dtype_of: tuple[torch.Tensor | None, ...] = (),
) -> TokenBatch:
    """Mask (rows in ``mask_truncated [B]`` zeroed) and upcast ``logps`` / ``old_logps`` ``[B, T]``
    to the compute dtype of ``logps``, ``old_logps`` and ``dtype_of``."""
    b = logps.shape[0]
    mb = mask.bool()
    if mask_truncated is not None:
        if mask_truncated.shape != (b,):
            raise ValueError(f"mask_truncated must be [B] = ({b},), got {tuple(mask_truncated.shape)}")
        mb = mb & ~mask_truncated.bool().unsqueeze(1)
    dt = compute_dtype(logps, old_logps, *dtype_of)
    m = mb.to(dt)
    lp = masked(logps, mb, dt)
    old = lp.detach() if old_logps is None else masked(old_logps, mb, dt)
    return TokenBatch(lp, old, mb, m, m.sum(-1, keepdim=True))


def restrict(tb: TokenBatch, keep: torch.Tensor) -> TokenBatch:
    """``tb`` with only the positions where ``keep [B, T]`` (bool) is also true: the others leave
    the mask, the counts and the values (e.g. tokens rejected by a rollout correction)."""
    mb = tb.mb & keep
    m = mb.to(tb.dt)
    zero = torch.zeros((), dtype=tb.dt, device=tb.lp.device)
    lp, old = torch.where(mb, tb.lp, zero), torch.where(mb, tb.old, zero)
    return TokenBatch(lp, old, mb, m, m.sum(-1, keepdim=True))


def per_row(name: str, x: torch.Tensor, b: int, t: int, dt: torch.dtype) -> torch.Tensor:
    """``[B]`` -> ``[B, 1]``; ``[B, 1]`` and ``[B, T]`` pass through (broadcast over tokens)."""
    if x.shape == (b,):
        x = x.unsqueeze(1)
    if x.dim() != 2 or x.shape[0] != b or x.shape[1] not in (1, t):
        raise ValueError(f"{name} must be [B], [B, 1] or [B, T] with B={b}, T={t}; got {tuple(x.shape)}")
    return x.to(dt)


def masked(x: torch.Tensor, m: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``x`` in ``dt`` with masked positions set to 0 (gradient only reaches valid positions)."""
    return torch.where(m, x.to(dt), torch.zeros((), dtype=dt, device=x.device))


def token_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Masked token mean; 0 (not NaN) without valid tokens."""
    return (x * m).sum() / m.sum().clamp(min=1)


def normalised_sum(x: torch.Tensor, m: torch.Tensor, num_items: Count | None) -> torch.Tensor:
    """``Σ m x / num_items``, or the masked token mean when ``num_items`` is ``None``."""
    return (x * m).sum() / (m.sum().clamp(min=1) if num_items is None else num_items)


def global_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """TRL's logging mean: per-sequence values ``[B, 1]`` average over sequences, ``[B, T]`` over tokens."""
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return token_mean(x, m)


def seq_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean ``[B]``, NaN for sequences without tokens (skipped by the nan-min / max)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * m).sum(-1) / m.sum(-1)


def nanmin(x: torch.Tensor) -> torch.Tensor:
    nan = torch.isnan(x)
    out = torch.where(nan, torch.full_like(x, float("inf")), x).min()
    return torch.where(nan.all(), torch.full_like(out, float("nan")), out)


def nanmax(x: torch.Tensor) -> torch.Tensor:
    return -nanmin(-x)


def ratio_stats(w: torch.Tensor, m: torch.Tensor, prefix: str = "ratio") -> dict[str, torch.Tensor]:
    """Mean / min / max of the importance ratio over valid tokens (or sequences, for ``[B, 1]``)."""
    w = w.detach()
    valid = torch.ones_like(w, dtype=torch.bool) if w.shape[1] == 1 else m.bool()
    inf = torch.full_like(w, float("inf"))
    lo = torch.where(valid, w, inf).min()
    hi = torch.where(valid, w, -inf).max()
    nan = torch.full_like(lo, float("nan"))
    return {
        f"{prefix}/mean": global_mean(w, m),
        f"{prefix}/min": torch.where(torch.isinf(lo), nan, lo),
        f"{prefix}/max": torch.where(torch.isinf(hi), nan, hi),
    }


def clip_metrics(is_low: torch.Tensor, is_high: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's ``clip_ratio/*``: fractions of valid tokens (or sequences) clipped low / high."""
    low, high = is_low.to(m.dtype), is_high.to(m.dtype)
    region = (is_low | is_high).to(m.dtype)
    return {
        "clip_ratio/low_mean": global_mean(low, m),
        "clip_ratio/high_mean": global_mean(high, m),
        "clip_ratio/region_mean": global_mean(region, m),
        "clip_ratio/low_min": nanmin(seq_mean(low, m)),
        "clip_ratio/high_max": nanmax(seq_mean(high, m)),
    }


def high_entropy_mask(entropy: torch.Tensor, mb: torch.Tensor, quantile: float, dt) -> torch.Tensor:
    """Tokens whose entropy is >= the ``1 - top_entropy_quantile`` quantile of the valid tokens of
    this micro-batch (TRL gathers all ranks first). Selecting the valid tokens syncs with the host."""
    ent = masked(entropy.detach(), mb, dt)
    vals = ent[mb]
    if vals.numel() == 0:
        return torch.zeros_like(mb)
    thr = torch.quantile(vals, 1.0 - quantile)
    return (ent >= thr) & mb


def check_policy_options(
    *, beta: float, ref_logps, entropy, top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0
) -> None:
    """The checks every policy loss shares: the KL needs the reference, the entropy options the
    per-token entropy, and ``top_entropy_quantile`` lies in ``(0, 1]``."""
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the KL term is taken against the reference)")
    if (entropy_coef != 0.0 or top_entropy_quantile < 1.0) and entropy is None:
        raise ValueError("entropy_coef != 0 or top_entropy_quantile < 1 needs the per-token entropy")
