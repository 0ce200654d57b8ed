"""Reference of the divergence family, written from the math with full ``[N, V]`` log-probabilities
(float64 for float64 inputs). Ground truth for the tests and the eager provider of the benchmarks;
never a production path.

Two next-token distributions per token: the student ``p = softmax(z^p)`` (trained) and the teacher
``q = softmax(z^q)`` (frozen), each from its own logits and :class:`LogitOptions` transform.
With ``lp = log p`` and ``lq = log q`` (``-inf`` where a probability is exactly 0)::

    forward_kl  KL(q || p) = sum_v q_v (lq_v - lp_v)
    reverse_kl  KL(p || q) = sum_v p_v (lp_v - lq_v)
    jsd(beta)   beta KL(q || m) + (1 - beta) KL(p || m),   m = (1 - beta) p + beta q
                (Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from
                Self-Generated Mistakes", arXiv:2306.13649); beta = 0 is KL(q || p), beta = 1 is
                KL(p || q), TRL's convention (the mixture formula itself is 0 at both ends)
    tv          (1 / 2) sum_v |p_v - q_v|
    alpha       (1 - sum_v p_v^alpha q_v^(1 - alpha)) / (alpha (1 - alpha))   (Amari, 1985;
                Cichocki and Amari, 2010, doi:10.3390/e12061532); alpha = 1 is KL(p || q) and
                alpha = 0 is KL(q || p), its limits
    f           sum_v q_v f(p_v / q_v)  (Csiszar, 1967), generators:
                kl         f(t) = t log t                       -> KL(p || q)
                reverse_kl f(t) = -log t                        -> KL(q || p)
                hellinger  f(t) = (sqrt(t) - 1)^2               -> sum_v (sqrt(p_v) - sqrt(q_v))^2
                chi2       f(t) = (t - 1)^2                     -> sum_v (p_v - q_v)^2 / q_v
                js         f(t) = (t log t - (1 + t) log((1 + t) / 2)) / 2  -> jsd(1/2)
                tv         f(t) = |t - 1| / 2                   -> tv

Zero probabilities: a vocabulary entry where both ``p_v = 0`` and ``q_v = 0`` contributes 0.
Where the divergence is infinite in exact arithmetic (``KL(p || q)`` with ``p_v > 0 = q_v``,
``KL(q || p)`` with ``q_v > 0 = p_v``, ``chi2`` likewise, ``alpha > 1`` with ``p_v > 0 = q_v``,
``alpha < 0`` with ``q_v > 0 = p_v``) the value is ``+inf``; every other case is finite.

Sparse teacher: the teacher is known only by its top-``K`` ids and log-probs per token. The
divergence is then taken between the two distributions coarse-grained onto ``K + 1`` outcomes,
the ``K`` listed ids and one "tail" outcome holding the rest of the vocabulary::

    P = (p_{i_1}, ..., p_{i_K}, 1 - sum_k p_{i_k}),   Q = (q_1, ..., q_K, max(0, 1 - sum_k q_k))

By the data-processing inequality ``D(P || Q) <= D(p || q)`` for every f-divergence (all the
kinds above are), with equality when the tail distributions agree up to scale; ``K = V`` gives
the full divergence.
"""

from __future__ import annotations

import math

import torch

from ..kernels._common import DivergenceOptions
from .linear_logprobs import logits_ref


def _plogr(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``a (log a - log b)`` elementwise from log-probabilities: 0 where ``a = 0``, ``+inf`` where
    ``a > 0 = b``."""
    return torch.where(la > -math.inf, la.exp() * (la - lb), torch.zeros_like(la))


def kl_ref(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` over the last axis from log-probabilities."""
    return _plogr(la, lb).sum(-1)


def alpha_sum_ref(lp: torch.Tensor, lq: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sum_v p_v^alpha q_v^(1 - alpha)``, with ``0^0 = 1``-free conventions: an entry where
    either factor is 0 with a positive exponent is 0; a 0 with a negative exponent is ``+inf``
    unless the other factor is 0 too (then the entry is 0)."""
    both_zero = (lp == -math.inf) & (lq == -math.inf)
    e = alpha * lp + (1.0 - alpha) * lq
    return torch.where(both_zero, torch.zeros_like(e), e.exp()).sum(-1)


def divergence_from_logps(lp: torch.Tensor, lq: torch.Tensor, div: DivergenceOptions) -> torch.Tensor:
    """The divergence ``div`` between ``p = exp(lp)`` and ``q = exp(lq)`` (``[..., M]``, each
    row a distribution) over the last axis."""
    kind = div.kind
    if kind == "forward_kl" or (kind == "jsd" and div.beta == 0.0) or (kind == "alpha" and div.alpha == 0.0):
        return kl_ref(lq, lp)
    if kind == "reverse_kl" or (kind == "jsd" and div.beta == 1.0) or (kind == "alpha" and div.alpha == 1.0):
        return kl_ref(lp, lq)
    p, q = lp.exp(), lq.exp()
    if kind == "jsd":
        b = div.beta
        lm = torch.logaddexp(lp + math.log1p(-b), lq + math.log(b))
        return b * kl_ref(lq, lm) + (1.0 - b) * kl_ref(lp, lm)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "alpha":
        a = div.alpha
        return (1.0 - alpha_sum_ref(lp, lq, a)) / (a * (1.0 - a))
    g = div.generator
    if g == "kl":
        return kl_ref(lp, lq)
    if g == "reverse_kl":
        return kl_ref(lq, lp)
    if g == "hellinger":
        return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if g == "chi2":
        # (p - q)^2 / q: 0 where both are 0, +inf where q = 0 < p
        num = (p - q) ** 2
        term = torch.where(num == 0, torch.zeros_like(num), num / q)
        return term.sum(-1)
    if g == "js":
        lm = torch.logaddexp(lp, lq) - math.log(2.0)
        return 0.5 * kl_ref(lp, lm) + 0.5 * kl_ref(lq, lm)
    return 0.5 * (p - q).abs().sum(-1)  # tv


def entropy_ref(lp: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_v log p_v`` (``0 log 0 = 0``)."""
    return -torch.where(lp > -math.inf, lp.exp() * lp, torch.zeros_like(lp)).sum(-1)


def divergence_ref(zp: torch.Tensor, zq: torch.Tensor, div: DivergenceOptions, valid=None):
    """``(div, lse_p, lse_q, entropy_p)`` per token of transformed logits ``zp, zq [N, V]``;
    zeros where ``valid`` (``[N]`` bool, default all) is False."""
    lse_p, lse_q = torch.logsumexp(zp, -1), torch.logsumexp(zq, -1)
    lp, lq = zp - lse_p.unsqueeze(-1), zq - lse_q.unsqueeze(-1)
    out = (divergence_from_logps(lp, lq, div), lse_p, lse_q, entropy_ref(lp))
    if valid is None:
        return out
    zero = torch.zeros((), dtype=zp.dtype, device=zp.device)
    return tuple(torch.where(valid, t, zero) for t in out)


def linear_divergence_ref(
    h_p, w_p, h_q, w_q, div: DivergenceOptions, *, b_p=None, b_q=None, valid=None, opts_p=None, opts_q=None
):
    """:func:`divergence_ref` of the logits ``h_p @ w_p.T + b_p`` and ``h_q @ w_q.T + b_q`` built in
    full (float64 if any input is float64), each transformed by its ``LogitOptions`` (or none)."""
    zp = logits_ref(h_p, w_p, b_p, **_transform(opts_p))
    zq = logits_ref(h_q, w_q, b_q, **_transform(opts_q))
    return divergence_ref(zp, zq.to(zp.dtype), div, valid)


def sparse_divergence_ref(zp: torch.Tensor, q_ids: torch.Tensor, q_logps: torch.Tensor, div, valid=None):
    """``(div, lse_p, entropy_p)`` of the student logits ``zp [N, V]`` against a teacher given as
    its top-K ``q_ids [N, K]`` / ``q_logps [N, K]``, on the ``K + 1`` coarse-grained outcomes of
    the module docstring."""
    lse_p = torch.logsumexp(zp, -1)
    lp_full = zp - lse_p.unsqueeze(-1)
    lp_k = lp_full.gather(-1, q_ids)
    lq_k = q_logps.to(zp.dtype)
    p_tail = (1.0 - lp_k.exp().sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - lq_k.exp().sum(-1)).clamp_min(0.0)
    lp = torch.cat([lp_k, p_tail.log().unsqueeze(-1)], -1)
    lq = torch.cat([lq_k, q_tail.log().unsqueeze(-1)], -1)
    out = (divergence_from_logps(lp, lq, div), lse_p, entropy_ref(lp_full))
    if valid is None:
        return out
    zero = torch.zeros((), dtype=zp.dtype, device=zp.device)
    return tuple(torch.where(valid, t, zero) for t in out)


def _transform(opts) -> dict:
    if opts is None:
        return {}
    return {"logit_scale": opts.logit_scale, "softcap": opts.softcap, "temperature": opts.temperature}
