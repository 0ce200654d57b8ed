"""Reference of the fused linear log-probs family: the logits ``hidden @ weight.T + bias`` built
in full (``[N, V]``), then the log-probs family's reference (``reference/logprobs.py``, which has
the math). Float64-capable; ground truth for tests and the eager provider of the benchmarks."""

from __future__ import annotations

import torch

from .logprobs import _dtype, cross_entropy_ref, stats_ref, transform_ref


def raw_logits_ref(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in float32 (float64 if any input is float64)."""
    dt = _dtype(hidden, weight, bias)
    r = hidden.to(dt) @ weight.to(dt).T
    return r if bias is None else r + bias.to(dt)


def logits_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **transform):
    """Full transformed logits ``[..., V]`` in float32 (float64 if any input is float64);
    ``transform``: ``logit_scale``, ``softcap``, ``temperature``."""
    return transform_ref(raw_logits_ref(hidden, weight, bias), **transform)


def linear_logprobs_ref(hidden, weight, targets, *, bias=None, ignore_index: int = -100, **transform):
    """``(logps, entropy, lse)`` per token, shape ``targets.shape``; zeros where ignored."""
    logp, ent, lse, _, _ = stats_ref(logits_ref(hidden, weight, bias, **transform), targets, ignore_index)
    return logp, ent, lse


def linear_cross_entropy_ref(hidden, weight, targets, *, bias=None, **options) -> torch.Tensor:
    """``cross_entropy_ref(hidden @ weight.T + bias, targets, **options)``."""
    return cross_entropy_ref(raw_logits_ref(hidden, weight, bias), targets, **options)
