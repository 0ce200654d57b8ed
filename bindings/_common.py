"""What the bindings share: the compute dtype under ``torch.autocast`` and DTensor heads."""

from __future__ import annotations

import torch

import alignops


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def full_head(weight: torch.Tensor, bias: torch.Tensor | None):
    """The LM head as plain tensors: a DTensor (FSDP2 ``fully_shard``) weight / bias is gathered
    with ``full_tensor()``, which is differentiable (its gradient is sharded back)."""
    if is_dtensor(weight):
        weight = weight.full_tensor()
    if bias is not None and is_dtensor(bias):
        bias = bias.full_tensor()
    return weight, bias


def autocast_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype a model layer would use here: ``torch.autocast``'s when it is on for the
    device, else ``hidden``'s. (alignops' engines switch autocast off inside themselves, so the
    bindings apply autocast's choice to the operands before the call.)"""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def to_compute(t: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    """``t`` for a matmul in ``dt``: an fp32 master weight with a 16-bit ``dt`` stays as it is
    (alignops rounds it tile by tile, as autocast would, without a 16-bit copy); anything else
    that differs is cast (e.g. a bf16 head with an fp32 compute dtype)."""
    if t is None or t.dtype == dt or (t.dtype == torch.float32 and dt in (torch.float16, torch.bfloat16)):
        return t
    return t.to(dt)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias, **options):
    """``alignops.linear_logprobs`` of ``hidden [..., H]`` under the head ``weight [V, H]`` /
    ``bias [V]`` with ``targets [...]``: in the matmul dtype of :func:`autocast_dtype` (operands
    cast by :func:`to_compute`) ``options``: its keywords."""
    dt = autocast_dtype(hidden)
    hidden, weight, bias = hidden.to(dt), to_compute(weight, dt), to_compute(bias, dt)
    return alignops.linear_logprobs(hidden, weight, targets, bias=bias, **options)
