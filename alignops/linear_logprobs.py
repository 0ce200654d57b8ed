"""TEMPORARY: reference-backed public API; replaced by the fused engine shortly."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import cross_entropy_ref, linear_cross_entropy_ref, linear_logprobs_ref


class LogProbsOutput(NamedTuple):
    logps: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0,
                    softcap=None, return_entropy=False, return_lse=False):
    lp, ent, lse = linear_logprobs_ref(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                       temperature=temperature, softcap=softcap)
    return LogProbsOutput(lp.float(), ent.float() if return_entropy else None,
                          lse.float() if return_lse else None)


def linear_cross_entropy(hidden, weight, targets, **kw):
    return linear_cross_entropy_ref(hidden, weight, targets, **kw)


def cross_entropy(logits, targets, **kw):
    return cross_entropy_ref(logits, targets, **kw)
