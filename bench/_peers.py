"""Peer providers shared by families: torch.compile, torch's chunked linear CE, Liger, CCE.

Each peer says why it cannot run (``*_skip_reason``, ``None`` when it can) and which version was
measured (``*_version``), so a skipped or measured peer is always named with its reason/version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable

import torch

# Slow imports a provider needs, done once by the CPU memory server before it forks children.
COMPILE_PRELOAD = ("torch._dynamo", "torch._inductor.compile_fx")
TRL_PRELOAD = ("trl.kernels", "trl.trainer.utils")

# A token sweep compiles one graph per shape (dynamic=False); torch's default limit of 8 would
# silently fall back to eager after the eighth.
COMPILE_RECOMPILE_LIMIT = 64


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``: the fastest compiled form for a fixed shape."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), COMPILE_RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False)


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def torch_chunked_skip_reason() -> str | None:
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (needs torch >= 2.13)"
    return None


def torch_chunked_options():
    """Default options: what a user who opts into chunking gets (resolved per device/dtype)."""
    return torch.nn.LinearCrossEntropyOptions()


def _cuda_peer_reason(module: str, dist: str, case_device: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {dist})"
    if case_device != "cuda":
        return f"{dist} {_dist_version(dist)}: Triton kernels need a CUDA device, this run is {case_device}"
    return None


def liger_skip_reason(case) -> str | None:
    return _cuda_peer_reason("liger_kernel", "liger-kernel", case.device)


def liger_version() -> str:
    return _dist_version("liger-kernel")


def cce_skip_reason(case) -> str | None:
    reason = _cuda_peer_reason("cut_cross_entropy", "cut-cross-entropy", case.device)
    if reason and case.device != "cuda" and "not installed" not in reason:
        reason += " (its impl='torch_compile' fallback is a torch.compile reference, like ours)"
    return reason


def cce_version() -> str:
    return _dist_version("cut-cross-entropy")


def trl_skip_reason(case=None) -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "not installed (pip install trl)"
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
        from trl.trainer.utils import selective_log_softmax  # noqa: F401
    except ImportError as e:
        return f"trl {_dist_version('trl')} lacks the function measured here: {e}"
    return None


def trl_version() -> str:
    return _dist_version("trl")


# TRL's own vocabulary tile for its fused LM head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in
# 1.16); read from TRL when it is there.
TRL_CHUNK_SIZE_FALLBACK = 32768


def trl_chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    ignore_index: int,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TRL's fused LM head (``trl.kernels.ChunkedLogProbFunction``), called as TRL 1.16's patched
    forward calls it: on CUDA only the valid positions are scored (``hidden[mask]``), elsewhere
    every position with the target clamped; ignored positions come back as 0."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK_SIZE_FALLBACK)
    mask = targets != ignore_index
    outputs = ("entropy",) if entropy else ()
    compact = hidden.device.type in ("cuda", "xpu")
    if compact:
        h, y = hidden[mask], targets[mask]
    else:
        h, y = hidden.reshape(-1, hidden.shape[-1]), targets.clamp(min=0).reshape(-1)
    logps, ent, *_ = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, chunk, softcap, 1.0, outputs)

    def place(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        if compact:
            return x.new_zeros(mask.shape).masked_scatter(mask, x)
        return x.view(mask.shape).masked_fill(~mask, 0.0)

    return place(logps), place(ent)
