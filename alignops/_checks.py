"""Argument checks shared by the light layer (``alignops.sequence``, ``alignops.rl``,
``alignops.losses``), one definition of each.

The compute dtype is :func:`alignops.kernels._common.compute_dtype`: float64 if any input is
float64, else float32 (bf16 / fp16 inputs are upcast). A Python number given next to float64
tensors is converted straight to float64 (:func:`scalar`), never through a float32 tensor.

This module imports nothing from the rest of the light layer, so every module there can use it
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels._common import compute_dtype

__all__ = [
    "as_float",
    "check_choice",
    "check_finite",
    "check_same_shape",
    "scalar",
    "vec",
]


def check_choice(name: str, value: str, choices: Sequence[str], hint: str = "") -> None:
    """``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}{hint}")


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor of ``others`` that is not ``None`` has the shape of ``ref``."""
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} (the shape of {ref_name})"
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError when a log-prob tensor holds NaN (a silent NaN loss is worse).

    CPU: a host check. CUDA: an asynchronous device-side assert (no host sync). Under
    ``torch.compile`` the check is skipped (it would be a data-dependent branch).
    """
    if torch.compiler.is_compiling():
        return
    if t.is_cuda:
        torch._assert_async(~torch.isnan(t).any(), f"alignops: {name} contains NaN")
        return
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")


def as_float(name: str, x: torch.Tensor) -> torch.Tensor:
    """A floating tensor without NaN, in its compute dtype (float32, or float64 for float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_finite(name, x)
    return x.to(compute_dtype(x))


def vec(name: str, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """A ``[B]`` floating tensor (see :func:`as_float`); ``batch`` checks ``B``."""
    x = as_float(name, x)
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]}, expected {batch} (mismatched batch sizes)")
    return x


def scalar(name: str, value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d floating tensor on ``like``'s device: a tensor keeps its compute dtype (and its
    gradient); a Python number takes ``like``'s dtype, so float64 losses stay exact."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        t = value.to(like.device)
        t = t if t.is_floating_point() else t.to(like.dtype)
        return as_float(name, t).reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a scalar tensor, got {type(value).__name__}")
    t = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    check_finite(name, t)
    return t
