"""Benchmark family ``linear_cross_entropy``: hidden ``[N, H]`` @ weight ``[V, H]``^T -> mean CE.

What alignops fuses: ``F.cross_entropy((h @ W.T).float(), y)`` without the ``[N, V]`` logits.
Targets are uniform over the vocabulary with ``IGNORED_FRACTION`` of them ``-100`` (prompt and
padding positions in a real batch). Models with a final-logit soft-cap (Gemma-2) pass it on.

Roofline counts (algorithmic, whatever an implementation recomputes):
  FLOPs  fwd = 2·N·V·H (the logits matmul; the softmax is O(N·V), negligible)
         bwd = 4·N·V·H (dh = dz @ W and dW = dz^T @ h)
         fwd+bwd = 6·N·V·H
  (a fused backward that recomputes the logits performs 2·N·V·H more; it is not credited.)
  bytes  fwd = (N·H + V·H)·s + 8·N (hidden, weight, int64 targets; s = bytes per element)
         bwd = 2·(N·H + V·H)·s + 8·N (inputs read again, dh and dW written)
         fwd+bwd = the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import alignops
from alignops.reference import linear_cross_entropy_ref

from ._harness import Bound, Case, Inputs, Provider, baseline_providers, generator
from ._peers import (
    TRL_PRELOAD,
    cce_skip_reason,
    cce_version,
    compiled,
    liger_skip_reason,
    liger_version,
    torch_chunked_options,
    torch_chunked_skip_reason,
    trl_chunked_logprobs,
    trl_skip_reason,
    trl_version,
)

FAMILY = "linear_cross_entropy"
RATE_UNIT = "TFLOP/s"
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1
GRAD_NAMES = ["hidden", "weight"]


def unavailable() -> str | None:
    return None


def make_inputs(case: Case) -> Inputs:
    g = generator(case)
    n, h, v = case.tokens, case.hidden, case.vocab
    hidden = torch.randn(n, h, generator=g, device=case.device)
    # std 1/sqrt(H) gives logits of unit scale, as a trained head roughly does.
    weight = torch.randn(v, h, generator=g, device=case.device) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g, device=case.device)
    targets[torch.rand(n, generator=g, device=case.device) < IGNORED_FRACTION] = IGNORE_INDEX
    hidden = hidden.to(case.torch_dtype).requires_grad_()
    weight = weight.to(case.torch_dtype).requires_grad_()
    return Inputs({"hidden": hidden, "weight": weight, "targets": targets}, [hidden, weight])


def lm_head_flops(case: Case, rows: int, mode: str) -> float:
    """Formula in the module docstring, for ``rows`` hidden states through the LM head."""
    per_matmul = 2.0 * rows * case.vocab * case.hidden
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * per_matmul


def lm_head_bytes(case: Case, rows: int, mode: str) -> float:
    inputs = (rows + case.vocab) * case.hidden * case.itemsize + 8 * rows
    grads = (rows + case.vocab) * case.hidden * case.itemsize
    return {"fwd": inputs, "bwd": inputs + grads, "fwd+bwd": 2 * inputs + grads}[mode]


def lm_head_grads_bytes(case: Case, rows: int) -> int:
    """dh + dW, what the op must return."""
    return (rows + case.vocab) * case.hidden * case.itemsize


def flops(case: Case, mode: str) -> float:
    return lm_head_flops(case, case.tokens, mode)


def bytes_moved(case: Case, mode: str) -> float:
    return lm_head_bytes(case, case.tokens, mode)


def grads_bytes(case: Case) -> int:
    return lm_head_grads_bytes(case, case.tokens)


def _args(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = inputs.tensors
    return t["hidden"], t["weight"], t["targets"]


def _alignops(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _args(inputs)
    return Bound(lambda: alignops.linear_cross_entropy(h, w, y, softcap=case.softcap), inputs.leaves)


def _eager(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _args(inputs)
    return Bound(lambda: linear_cross_entropy_ref(h, w, y, softcap=case.softcap), inputs.leaves)


def _torch_compile(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _args(inputs)
    fn = compiled(linear_cross_entropy_ref)
    return Bound(lambda: fn(h, w, y, softcap=case.softcap), inputs.leaves)


def native_linear_ce(h, w, y, softcap: float | None):
    """What training code writes: fp32 logits, then ``F.cross_entropy``."""
    z = F.linear(h, w).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX)


def _torch_native(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _args(inputs)
    return Bound(lambda: native_linear_ce(h, w, y, case.softcap), inputs.leaves)


def _torch_chunked(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _args(inputs)
    options = torch_chunked_options()
    return Bound(
        lambda: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, options=options),
        inputs.leaves,
        note=f"gradients computed in the forward; options={options}",
    )


def _liger(case: Case, inputs: Inputs) -> Bound:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w, y = _args(inputs)
    return Bound(
        lambda: liger_fused_linear_cross_entropy(
            h, w, y, ignore_index=IGNORE_INDEX, reduction="mean", softcap=case.softcap
        ),
        inputs.leaves,
    )


def _cce(case: Case, inputs: Inputs) -> Bound:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    h, w, y = _args(inputs)
    # Default gradient filtering (filter_eps="high"): what a CCE user gets.
    return Bound(
        lambda: cce_linear_cross_entropy(
            h, w, y, ignore_index=IGNORE_INDEX, softcap=case.softcap, impl="cce"
        ),
        inputs.leaves,
    )


def _trl_chunked(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _args(inputs)

    def fn() -> torch.Tensor:
        logps, _ = trl_chunked_logprobs(h, w, y, softcap=case.softcap, ignore_index=IGNORE_INDEX)
        return -logps.sum() / (y != IGNORE_INDEX).sum().clamp(min=1)  # TRL's fused-forward loss

    return Bound(fn, inputs.leaves)


def _no_softcap(case: Case) -> str | None:
    return "F.linear_cross_entropy has no soft-cap" if case.softcap is not None else None


def providers() -> list[Provider]:
    return [
        *baseline_providers(_alignops, _eager, _torch_compile),
        Provider("torch-native", _torch_native),
        Provider(
            "torch-chunked",
            _torch_chunked,
            lambda case: torch_chunked_skip_reason() or _no_softcap(case),
        ),
        Provider("trl-chunked", _trl_chunked, trl_skip_reason, trl_version, TRL_PRELOAD),
        Provider("liger", _liger, liger_skip_reason, liger_version),
        Provider("cce", _cce, cce_skip_reason, cce_version),
    ]
