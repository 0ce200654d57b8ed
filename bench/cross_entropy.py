"""Benchmark family ``cross_entropy``: mean CE on given logits ``[N, V]``.

The logits already exist here (a model that returns them); what an implementation can save is
the extra ``[N, V]`` buffers of softmax / log-softmax and of its backward. Targets as in
``linear_cross_entropy`` (``IGNORED_FRACTION`` ignored).

Roofline counts (memory-bound; GB/s is the unit):
  bytes  fwd = N·V·s + 8·N (logits read once, int64 targets)
         bwd = 2·N·V·s + 8·N (logits read again, dlogits written)
         fwd+bwd = the sum.
  FLOPs  about 4·N·V per pass (max, subtract, exp, sum), listed for completeness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import alignops
from alignops.reference import cross_entropy_ref

from ._harness import Bound, Case, Inputs, Provider, baseline_providers, generator
from ._peers import compiled, liger_skip_reason, liger_version

FAMILY = "cross_entropy"
RATE_UNIT = "GB/s"
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1
FLOPS_PER_LOGIT_PASS = 4.0
LOGIT_STD = 2.0  # spread of the random logits, about a trained head's
GRAD_NAMES = ["logits"]


def unavailable() -> str | None:
    return None


def make_inputs(case: Case) -> Inputs:
    g = generator(case)
    n, v = case.tokens, case.vocab
    logits = torch.randn(n, v, generator=g, device=case.device) * LOGIT_STD
    targets = torch.randint(0, v, (n,), generator=g, device=case.device)
    targets[torch.rand(n, generator=g, device=case.device) < IGNORED_FRACTION] = IGNORE_INDEX
    logits = logits.to(case.torch_dtype).requires_grad_()
    return Inputs({"logits": logits, "targets": targets}, [logits])


def flops(case: Case, mode: str) -> float:
    passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]
    return passes * FLOPS_PER_LOGIT_PASS * case.tokens * case.vocab


def bytes_moved(case: Case, mode: str) -> float:
    logits = case.tokens * case.vocab * case.itemsize
    fwd, bwd = logits + 8 * case.tokens, 2 * logits + 8 * case.tokens
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def grads_bytes(case: Case) -> int:
    """dlogits, what the op must return."""
    return case.tokens * case.vocab * case.itemsize


def _alignops(case: Case, inputs: Inputs) -> Bound:
    z, y = inputs.tensors["logits"], inputs.tensors["targets"]
    return Bound(lambda: alignops.cross_entropy(z, y, softcap=case.softcap), inputs.leaves)


def _eager(case: Case, inputs: Inputs) -> Bound:
    z, y = inputs.tensors["logits"], inputs.tensors["targets"]
    return Bound(lambda: cross_entropy_ref(z, y, softcap=case.softcap), inputs.leaves)


def _torch_compile(case: Case, inputs: Inputs) -> Bound:
    z, y = inputs.tensors["logits"], inputs.tensors["targets"]
    fn = compiled(cross_entropy_ref)
    return Bound(lambda: fn(z, y, softcap=case.softcap), inputs.leaves)


def native_cross_entropy(z, y, softcap: float | None):
    """What training code writes: ``F.cross_entropy(logits.float(), labels)``."""
    z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX)


def _torch_native(case: Case, inputs: Inputs) -> Bound:
    z, y = inputs.tensors["logits"], inputs.tensors["targets"]
    return Bound(lambda: native_cross_entropy(z, y, case.softcap), inputs.leaves)


def _liger(case: Case, inputs: Inputs) -> Bound:
    from liger_kernel.transformers.functional import liger_cross_entropy

    # Liger writes the gradient into its input's storage during the forward: give it a private
    # copy, so the other providers keep the original logits. Only its first call (the agreement
    # run) sees real logits; later calls do the same work on overwritten values.
    z = inputs.tensors["logits"].detach().clone().requires_grad_()
    y = inputs.tensors["targets"]
    return Bound(
        lambda: liger_cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="mean", softcap=case.softcap),
        [z],
        note="gradient written into the input buffer",
    )


def providers() -> list[Provider]:
    return [
        *baseline_providers(_alignops, _eager, _torch_compile),
        Provider("torch-native", _torch_native),
        Provider("liger", _liger, liger_skip_reason, liger_version),
    ]
