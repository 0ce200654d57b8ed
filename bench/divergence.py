"""Benchmark family ``divergence``: generalized JSD (beta = 1/2) between a trained student head and
a frozen teacher head, from hidden states, mean over tokens.

Inputs: student ``h_p [N, H]``, ``W_p [V, H]`` (require grad) and teacher ``h_q [N, H]``,
``W_q [V, H]`` (frozen), both of the case's hidden size; weights of std ``1 / sqrt(H)`` (logits of
unit scale, as a trained head roughly has). The loss is ``mean_n JSD_1/2(p_n, q_n)`` with
``m = (p + q) / 2``; the gradients are those of the student (``dh_p``, ``dW_p``).

Providers: ``alignops`` (``alignops.linear_divergence(kind="jsd", beta=0.5)``); ``eager`` (both
heads' fp32 logits in full, ``log_softmax``, the mixture by ``logaddexp``: what training code
writes); ``torch.compile`` (the same under ``torch.compile``); ``trl-chunked`` (TRL's
``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, its CPU path on the CPU); ``liger``
(Liger-Kernel's fused linear JSD, CUDA only).

Roofline counts (algorithmic):
  FLOPs  fwd = 4·N·V·H (both heads' logits)       bwd = 4·N·V·H (dh_p and dW_p)
         fwd+bwd = 8·N·V·H (a fused implementation recomputes logits; not credited)
  bytes  fwd = 2·(N·H + V·H)·s                     bwd = fwd + (N·H + V·H)·s (dh_p, dW_p written)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import alignops

from ._harness import Bound, Case, Inputs, Provider, generator
from ._peers import COMPILE_PRELOAD, TRL_PRELOAD, compiled, liger_skip_reason, liger_version, trl_version

FAMILY = "divergence"
RATE_UNIT = "TFLOP/s"
BETA = 0.5
GRAD_NAMES = ["h_p", "w_p"]
DEFAULT_MODES = ("fwd+bwd",)
TRL_DIV_PRELOAD = (*TRL_PRELOAD, "trl.kernels.chunked_divergence")


def unavailable() -> str | None:
    return None


def make_inputs(case: Case) -> Inputs:
    g = generator(case)
    n, h, v = case.tokens, case.hidden, case.vocab
    dt = case.torch_dtype
    h_p = torch.randn(n, h, generator=g, device=case.device).to(dt).requires_grad_()
    w_p = (torch.randn(v, h, generator=g, device=case.device) / h**0.5).to(dt).requires_grad_()
    h_q = torch.randn(n, h, generator=g, device=case.device).to(dt)
    w_q = (torch.randn(v, h, generator=g, device=case.device) / h**0.5).to(dt)
    return Inputs({"h_p": h_p, "w_p": w_p, "h_q": h_q, "w_q": w_q}, [h_p, w_p])


def flops(case: Case, mode: str) -> float:
    per = 2.0 * case.tokens * case.vocab * case.hidden
    return {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[mode] * per


def bytes_moved(case: Case, mode: str) -> float:
    one = (case.tokens + case.vocab) * case.hidden * case.itemsize
    return {"fwd": 2 * one, "bwd": 3 * one, "fwd+bwd": 5 * one}[mode]


def grads_bytes(case: Case) -> int:
    """dh_p + dW_p, what the op must return."""
    return (case.tokens + case.vocab) * case.hidden * case.itemsize


def _args(inputs: Inputs):
    t = inputs.tensors
    return t["h_p"], t["w_p"], t["h_q"], t["w_q"]


def eager_jsd(h_p, w_p, h_q, w_q, softcap: float | None = None, beta: float = BETA) -> torch.Tensor:
    """Both heads' logits in full (float32), then the generalized JSD, mean over tokens."""
    zp, zq = F.linear(h_p, w_p).float(), F.linear(h_q, w_q).float()
    if softcap is not None:
        zp, zq = softcap * torch.tanh(zp / softcap), softcap * torch.tanh(zq / softcap)
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    lm = torch.logaddexp(lp + math.log(1.0 - beta), lq + math.log(beta))
    kl_p = (lp.exp() * (lp - lm)).sum(-1)
    kl_q = (lq.exp() * (lq - lm)).sum(-1)
    return (beta * kl_q + (1.0 - beta) * kl_p).mean()


def _alignops(case: Case, inputs: Inputs) -> Bound:
    hp, wp, hq, wq = _args(inputs)
    sc = case.softcap
    return Bound(
        lambda: (
            alignops.linear_divergence(hp, wp, hq, wq, kind="jsd", beta=BETA, softcap_p=sc, softcap_q=sc).loss
        ),
        inputs.leaves,
    )


def _eager(case: Case, inputs: Inputs) -> Bound:
    hp, wp, hq, wq = _args(inputs)
    return Bound(lambda: eager_jsd(hp, wp, hq, wq, case.softcap), inputs.leaves)


def _torch_compile(case: Case, inputs: Inputs) -> Bound:
    hp, wp, hq, wq = _args(inputs)
    fn = compiled(eager_jsd)
    return Bound(lambda: fn(hp, wp, hq, wq, case.softcap), inputs.leaves)


def _trl_skip_reason(case=None) -> str | None:
    try:
        import trl.kernels.chunked_divergence  # noqa: F401
    except Exception as e:  # not installed, or a version without it
        return f"trl.kernels.chunked_divergence unavailable: {type(e).__name__}: {e}"
    return None


def _trl_chunked(case: Case, inputs: Inputs) -> Bound:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hp, wp, hq, wq = _args(inputs)
    sc = case.softcap

    def fn():
        div, _ = ChunkedDivergenceFunction.apply(hp, wp, None, hq, wq, None, BETA, 1.0, 1.0, sc, 1.0, sc)
        return div.mean()

    return Bound(fn, inputs.leaves)


def _liger(case: Case, inputs: Inputs) -> Bound:
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    hp, wp, hq, wq = _args(inputs)
    return Bound(lambda: liger_fused_linear_jsd(hp, wp, hq, wq, None, jsd_beta=BETA), inputs.leaves)


def _liger_reason(case: Case) -> str | None:
    return liger_skip_reason(case) or (
        "Liger's fused linear JSD has no soft-cap" if case.softcap is not None else None
    )


def providers() -> list[Provider]:
    return [
        Provider("alignops", _alignops, version=lambda: alignops.__version__),
        Provider("eager", _eager),
        Provider("torch.compile", _torch_compile, preload=COMPILE_PRELOAD),
        Provider("trl-chunked", _trl_chunked, _trl_skip_reason, trl_version, TRL_DIV_PRELOAD),
        Provider("liger", _liger, _liger_reason, liger_version),
    ]
