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


def logits_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Full transformed logits ``[..., V]`` in float32 (float64 if any input is float64)."""
    r = raw_logits_ref(hidden, weight, bias)
    return transform_ref(r, logit_scale=logit_scale, softcap=softcap, temperature=temperature)


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logps, entropy, lse)`` per token, shape ``targets.shape``; zeros where ignored."""
    z = logits_ref(hidden, weight, bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    logp, ent, lse, _, _ = stats_ref(z, targets, ignore_index)
    return logp, ent, lse


def linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias=None, **options
) -> torch.Tensor:
    """``cross_entropy_ref(hidden @ weight.T + bias, targets, **options)``."""
    return cross_entropy_ref(raw_logits_ref(hidden, weight, bias), targets, **options)
