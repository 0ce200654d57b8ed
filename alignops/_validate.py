"""Input validation shared by the public functions: clear errors instead of wrong numbers."""

from __future__ import annotations

import math

import torch

from .kernels._common import env_flag

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def check_number(name: str, v, *, lo: float, lo_open: bool, hi: float = math.inf) -> float:
    """A finite real (not a bool) with ``v > lo`` (``lo_open``) or ``v >= lo``, and ``v <= hi``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise ValueError(f"{name} must be {bound}, got {v!r}")
    return float(v)


def check_transform(temperature, softcap) -> None:
    """Logit transform of SPEC §1.1: ``temperature > 0``; ``softcap`` None or > 0."""
    check_number("temperature", temperature, lo=0.0, lo_open=True)
    if softcap is not None:
        check_number("softcap", softcap, lo=0.0, lo_open=True)


def check_loss_options(*, reduction, label_smoothing, z_loss, num_items) -> None:
    """Options shared by ``linear_cross_entropy`` and ``cross_entropy`` (SPEC §3.1-§3.3)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_number("label_smoothing", label_smoothing, lo=0.0, lo_open=False, hi=1.0)
    check_number("z_loss", z_loss, lo=0.0, lo_open=False)
    if num_items is None:
        return
    if reduction == "none":
        raise ValueError("num_items divides a summed loss: use reduction='sum' or 'mean', not 'none'")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
    elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)) or not num_items > 0:
        raise ValueError(f"num_items must be a number > 0 or a scalar tensor, got {num_items!r}")


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
    check_transform(temperature, softcap)


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
