"""Distillation and full-distribution KL terms on top of the divergence family
(``alignops.linear_divergence``): every term here needs each token's whole next-token distribution
under two heads, and none builds the ``[N, V]`` logits.

* :func:`gkd_loss`: generalized JSD(beta) of GKD / on-policy distillation (Agarwal et al., 2024,
  "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
  arXiv:2306.13649). GKD's ``lambda`` (the fraction of batches whose outputs the student samples
  itself) is a data choice, not a term of the loss: :func:`gkd_on_policy` draws it per batch.
* :func:`kd_loss`: token-level knowledge distillation, ``T^2 KL(q_T || p_T)`` with both heads at
  temperature ``T`` (Hinton et al., 2015, arXiv:1503.02531); :func:`sequence_kd_loss`:
  sequence-level KD, cross-entropy on teacher-generated sequences (Kim and Rush, 2016,
  arXiv:1606.07947).
* :func:`sequence_kl` and :func:`tdpo_loss`: TDPO1 / TDPO2 (Zeng et al., 2024, "Token-level Direct
  Preference Optimization", arXiv:2404.11999) with the sequential per-token
  ``KL(pi_ref || pi_theta)``.
* :func:`exact_kl_penalty`: the exact per-token ``KL(pi_theta || pi_ref)`` regulariser of RL
  fine-tuning, an alternative to the sampled k1 / k2 / k3 estimators of ``alignops.rl.kl_estimate``.

WPO's per-token weights (``log sum_v p_v^2``) and CRINGE's top-k come from the log-prob family
(``alignops.linear_logprobs(..., return_log_sum_p2=True, topk=k)``), in its single pass.
"""

from __future__ import annotations

import torch

from .._checks import check_choice
from ..linear_divergence import linear_divergence
from ..linear_logprobs import linear_cross_entropy
from ._common import LossOutput, log_sigmoid

__all__ = [
    "exact_kl_penalty",
    "gkd_loss",
    "gkd_on_policy",
    "kd_loss",
    "sequence_kd_loss",
    "sequence_kl",
    "tdpo_loss",
]


def _valid(lead, device, mask, labels, ignore_index) -> torch.Tensor:
    valid = torch.ones(lead, dtype=torch.bool, device=device)
    if mask is not None:
        valid = valid & (mask != 0)
    if labels is not None:
        valid = valid & (labels != ignore_index)
    return valid


def gkd_loss(
    h_p, w_p, h_q, w_q, *, beta: float = 0.5, temperature: float = 1.0, b_p=None, b_q=None,
    mask=None, labels=None, ignore_index: int = -100, num_items=None,
) -> LossOutput:  # fmt: skip
    """GKD's generalized JSD between the student ``(h_p [..., Hp], w_p [V, Hp])`` and the teacher
    ``(h_q [..., Hq], w_q [V, Hq])``, both at ``temperature``: per token
    ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = (1 - beta) p + beta q`` (``beta = 0``: KL(q || p),
    ``beta = 1``: KL(p || q), as TRL's ``GKDTrainer`` defines it). ``loss`` is the mean over the
    counted tokens (TRL's ``batchmean`` with labels), or the sum over ``num_items``; ``losses``
    is per token ``[...]`` (0 where not counted)."""
    out = linear_divergence(
        h_p, w_p, h_q, w_q, kind="jsd", beta=beta, b_p=b_p, b_q=b_q, temperature_p=temperature,
        temperature_q=temperature, mask=mask, labels=labels, ignore_index=ignore_index, reduction="none",
    )  # fmt: skip
    valid = _valid(out.loss.shape, out.loss.device, mask, labels, ignore_index)
    total = out.loss.sum()
    loss = total / num_items if num_items is not None else total / valid.sum().clamp(min=1)
    return LossOutput(loss, out.loss, {"jsd": loss.detach()})


def gkd_on_policy(lmbda: float, generator: torch.Generator | None = None) -> bool:
    """GKD's data choice: ``True`` with probability ``lmbda`` (this batch's outputs are sampled from
    the student, on-policy), else the dataset's (or the teacher's) outputs are used."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda!r}")
    return bool(torch.rand((), generator=generator).item() < lmbda)


def kd_loss(
    h_p, w_p, h_q, w_q, *, temperature: float = 2.0, kind: str = "forward_kl", b_p=None, b_q=None,
    mask=None, labels=None, ignore_index: int = -100, num_items=None,
) -> LossOutput:  # fmt: skip
    """Token-level knowledge distillation: ``T^2 D(q_T, p_T)`` per token with both heads' logits
    divided by ``T`` (``kind`` defaults to Hinton's ``KL(q || p)``; any divergence kind works). The
    ``T^2`` keeps gradient magnitudes independent of ``T``. Mean over the counted tokens."""
    out = linear_divergence(
        h_p, w_p, h_q, w_q, kind=kind, b_p=b_p, b_q=b_q, temperature_p=temperature, temperature_q=temperature,
        mask=mask, labels=labels, ignore_index=ignore_index, reduction="none",
    )  # fmt: skip
    per = out.loss * (temperature * temperature)
    valid = _valid(per.shape, per.device, mask, labels, ignore_index)
    loss = per.sum() / num_items if num_items is not None else per.sum() / valid.sum().clamp(min=1)
    return LossOutput(loss, per, {"kd": loss.detach()})


def sequence_kd_loss(
    hidden, weight, teacher_tokens, *, bias=None, ignore_index: int = -100, **ce
) -> LossOutput:
    """Sequence-level KD: the student's cross-entropy on sequences the teacher generated
    (``teacher_tokens [...]``, the next-token targets; prompt positions = ``ignore_index``).
    ``ce``: any further ``alignops.linear_cross_entropy`` option (``num_items``, ``softcap``, ...)."""
    loss = linear_cross_entropy(hidden, weight, teacher_tokens, bias=bias, ignore_index=ignore_index, **ce)
    return LossOutput(loss, loss.reshape(1), {"nll": loss.detach()})


def sequence_kl(
    h_p, w_p, h_ref, w_ref, mask, *, b_p=None, b_ref=None, temperature: float = 1.0
) -> torch.Tensor:
    """TDPO's ``SeqKL(y) = sum_t m_t KL(pi_ref(.|s_t) || pi_theta(.|s_t))`` per sequence: ``h_p`` /
    ``h_ref`` are ``[B, T, H*]`` hidden states of the policy and the reference at the completion
    positions, ``mask [B, T]``. Differentiable with respect to the policy. Returns ``[B]``."""
    out = linear_divergence(
        h_p, w_p, h_ref, w_ref, kind="forward_kl", b_p=b_p, b_q=b_ref, temperature_p=temperature,
        temperature_q=temperature, mask=mask, reduction="none",
    )  # fmt: skip
    return out.loss.sum(-1)


def tdpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    chosen_seq_kl, rejected_seq_kl, *, beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2",
) -> LossOutput:  # fmt: skip
    """TDPO1 / TDPO2 on per-sequence summed log-probs ``[B]`` and the sequential KLs of
    :func:`sequence_kl` ``[B]``. With ``u = S_theta - S_ref``::

        TDPO1: z = (u_w - u_l) - (SeqKL(y_l) - SeqKL(y_w))
        TDPO2: z = (u_w - u_l) - alpha (SeqKL(y_l) - sg(SeqKL(y_w)))
        loss = -log sigmoid(beta z)

    (the official defaults: TDPO2, ``beta = 0.1``, ``alpha = 0.5``). Metrics as the official code
    logs them: ``rewards/chosen = beta (u_w + SeqKL(y_w))`` (rejected alike), their margin and
    accuracy, and both sequential KLs."""
    check_choice("variant", variant, ("tdpo1", "tdpo2"))
    u_w = policy_chosen_logps - ref_chosen_logps.detach()
    u_l = policy_rejected_logps - ref_rejected_logps.detach()
    if variant == "tdpo1":
        z = (u_w - u_l) - (rejected_seq_kl - chosen_seq_kl)
    else:
        z = (u_w - u_l) - alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    losses = -log_sigmoid(beta * z)
    chosen = (beta * (u_w + chosen_seq_kl)).detach()
    rejected = (beta * (u_l + rejected_seq_kl)).detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "kl/chosen": chosen_seq_kl.detach().mean(),
        "kl/rejected": rejected_seq_kl.detach().mean(),
    }
    return LossOutput(losses.mean(), losses, metrics)


def exact_kl_penalty(
    h_p, w_p, h_ref, w_ref, *, mask=None, b_p=None, b_ref=None, temperature: float = 1.0
) -> torch.Tensor:
    """The exact per-token ``KL(pi_theta(.|s_t) || pi_ref(.|s_t))`` over the whole vocabulary,
    ``[...]`` (0 where ``mask`` is 0), differentiable with respect to the policy: no sampling noise,
    unlike the k1 / k2 / k3 estimators (Schulman, 2020) of ``alignops.rl.kl_estimate`` that use
    only the sampled token. Aggregate it like any per-token term (``alignops.losses``' modes)."""
    return linear_divergence(
        h_p, w_p, h_ref, w_ref, kind="reverse_kl", b_p=b_p, b_q=b_ref, temperature_p=temperature,
        temperature_q=temperature, mask=mask, reduction="none",
    ).loss  # fmt: skip
