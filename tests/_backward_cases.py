"""Inputs and float64 references shared by the backward precision / filtering tests of the
linear log-probs (torch engine and Triton kernels under the interpreter).

* :func:`mean_ce_case`: a mean-reduced cross-entropy batch: upstream gradient ``-1 / n_valid``
  on the log-probs of the valid tokens (what ``reduction="mean"`` sends back).
* :func:`ref_grads`: float64 autograd through the full logits of the same rounded operands.
* :func:`filter_bound`: the bound of what gradient filtering may drop, from the float64 softmax.
"""

from __future__ import annotations

import torch

IGNORE = -100


def mean_ce_case(
    *,
    N: int,
    H: int,
    V: int,
    dtype: torch.dtype,
    seed: int,
    num_items: int | None = None,
    ignored: float = 0.25,
    std: float = 1.0,
):
    """``(hidden [N, H], weight [V, H], targets [N], g_logp [N])``; a quarter of the rows ignored.
    Logits of std ~``std`` (1: a flat softmax, p ~ 1 / V; larger: most p far below 1 / V).
    ``g_logp = -1 / num_items`` on valid rows: the gradient of a mean over ``num_items`` tokens
    (default: this batch's valid tokens; a global count under gradient accumulation)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * std).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[: int(N * ignored)]] = IGNORE
    valid = targets != IGNORE
    count = valid.sum().clamp(min=1) if num_items is None else num_items
    g_logp = torch.where(valid, -1.0 / count, 0.0).float()
    return hidden, weight, targets, g_logp


def _ref_logits(hidden, weight, bias, targets):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = h @ w.T
    if bias is not None:
        z = z + bias.double()
    return h, w, z


def ref_grads(hidden, weight, targets, g_logp, g_lse=None):
    """float64 ``(dh, dW)`` of ``sum g_logp logp + sum g_lse lse`` (ignored rows: no term)."""
    h, w, z = _ref_logits(hidden, weight, None, targets)
    valid = targets != IGNORE
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    loss = (torch.where(valid, logp, 0.0) * g_logp.double()).sum()
    if g_lse is not None:
        loss = loss + (torch.where(valid, lse, 0.0) * g_lse.double()).sum()
    loss.backward()
    return h.grad, w.grad


def ref_mean_ce_grads(hidden, weight, targets, g_logp):
    return ref_grads(hidden, weight, targets, g_logp)


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius) in float64."""
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm().clamp(min=1e-300)).item()


def peaked_case(
    *, N: int, H: int, V: int, dtype: torch.dtype, seed: int, topics: int = 4, sharp: float = 4.0
):
    """A batch whose next-token distributions are as peaked as a trained model's: each hidden
    state is ``sharp`` times the mean of ``topics`` weight rows drawn from a Zipf(1.1) law over
    the vocabulary, plus noise. Those few tokens then take most of the probability mass; the
    rest sit many nats lower (``p`` below 2^-12 for most of the vocabulary in most rows), and
    the frequent tokens are shared across rows, as in text."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 2.0
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    zipf = ranks.pow(-1.1)
    # frequent tokens have low ids, as in a BPE vocabulary (ids in merge order)
    picks = torch.multinomial(zipf / zipf.sum(), N * topics, replacement=True, generator=g)
    picks = picks.view(N, topics)
    hidden = weight[picks].mean(1) * (sharp * H**0.5 / 2.0) + 0.3 * torch.randn(N, H, generator=g)
    targets = picks[torch.arange(N), torch.randint(0, topics, (N,), generator=g)]
    targets[torch.randperm(N, generator=g)[: N // 8]] = IGNORE
    return hidden.to(dtype), weight.to(dtype), targets


def filter_bound(hidden, weight, targets, coef, threshold: float):
    """Elementwise bounds ``(|d dh|, |d dW|, |d db|)`` of what filtering at ``threshold`` may drop, for
    ``dz = coef_n (onehot - p)``-shaped gradients (log-prob / lse gradients): it drops only
    entries with ``p < threshold`` that are not a target, each of size ``|coef_n| p``. Whatever
    the tiling: ``|d dh_nk| <= |coef_n| sum_{v: p_nv < t} p_nv |W_vk|`` and
    ``|d dW_vk| <= sum_{n: p_nv < t} |coef_n| p_nv |h_nk|`` (db: the same with ``h = 1``)."""
    z = hidden.double() @ weight.double().T
    p = torch.softmax(z, -1)
    valid = targets != IGNORE
    small = p * (p < threshold) * valid[:, None]
    small[torch.arange(len(targets))[valid], targets[valid]] = 0.0
    c = coef.double().abs()[:, None]
    return (c * small) @ weight.double().abs(), (c * small).T @ hidden.double().abs(), (c * small).sum(0)
