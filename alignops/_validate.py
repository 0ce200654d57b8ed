"""Input validation shared by the public functions: clear errors instead of wrong numbers."""

from __future__ import annotations

import math

import torch

from ._utils import env_flag

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_common(hidden, weight, targets, bias, *, temperature, softcap):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if (hidden.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must both be float64 or neither"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is [..., {hidden.shape[-1]}] but weight is "
            f"[{weight.shape[0]}, {weight.shape[1]}]"
        )
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    devs = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
        devs.add(bias.device)
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and (not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must lie in ``[0, V)`` or equal ``ignore_index``.

    On the CPU this is a host check (cheap). On CUDA it is ``torch._assert_async``: a
    device-side assert with no host synchronisation; it surfaces at the next sync as a
    CUDA error. ``ALIGNOPS_CHECK_TARGETS=0`` turns the CUDA check off.
    """
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.is_cuda:
        if env_flag("ALIGNOPS_CHECK_TARGETS", True):
            torch._assert_async(~bad.any(), "alignops: a target is outside [0, V) and is not ignore_index")
        return
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )
