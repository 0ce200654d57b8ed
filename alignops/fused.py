"""Fused policy losses straight from hidden states: the LM head, the per-token log-probs (and
entropy) and the loss in one call, never building the ``[tokens, vocab]`` logits.

:func:`grpo_loss_from_hidden` and :func:`ppo_loss_from_hidden` sit next to the public ops they
compose: :func:`alignops.linear_logprobs` (through :func:`alignops.sequence.token_logprobs`) for the
policy's log-probs and entropy,
:func:`alignops.linear_cross_entropy` for the PPO-ptx pretraining NLL, then
:func:`alignops.losses.grpo_loss` / :func:`alignops.losses.ppo_loss`, which only ever see
log-probs. Gradients reach ``hidden``, ``weight`` and ``bias`` through the fused engine.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from .linear_logprobs import linear_cross_entropy
from .losses import LossOutput
from .losses.policy import grpo_loss, ppo_loss
from .sequence import token_logprobs

__all__ = ["grpo_loss_from_hidden", "ppo_loss_from_hidden"]


def _check_options(fn: Callable, options: dict, reserved: Sequence[str]) -> None:
    """Every key of ``options`` is a keyword-only option of ``fn`` not set here (``reserved``)."""
    params = inspect.signature(fn).parameters
    valid = sorted(
        n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in reserved
    )
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, bad))}; "
            f"valid options of {fn.__name__}: {', '.join(valid)}"
        )


def _policy_logps(hidden, weight, ids, mask, need_entropy: bool, head: dict):
    """``hidden [B, T, H]`` scores ``ids [B, T]`` where ``mask``: per-token log-probs and entropy
    ``[B, T]`` (0 elsewhere) and the bool mask of the scored positions."""
    if hidden.dim() != 3 or ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"need hidden [B, T, H] and ids [B, T]; got {tuple(hidden.shape)} and {tuple(ids.shape)}"
        )
    return token_logprobs(hidden, weight, ids, mask, return_entropy=need_entropy, **head)


def grpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = True,
    process_group=None,
    vocab_size: int | None = None,
    **grpo_options,
) -> LossOutput:
    """GRPO-family loss straight from hidden states, never building ``[N, V]`` logits.

    ``hidden [B, T, H]`` are the states that predict ``completion_ids [B, T]`` (already shifted:
    ``hidden[:, t]`` scores ``completion_ids[:, t]``); ``weight [V, H]`` (+ ``bias [V]``) is the LM
    head. The policy's per-token log-probs ``log softmax(softcap(h W^T + b) / temperature)[y]``
    and, with ``return_entropy``, the per-token entropy come from one
    :func:`alignops.linear_logprobs` pass; masked positions and ``ignore_index`` ids are not
    scored. ``old_logps [B, T]`` (``None``: on-policy, ``logps.detach()``), ``ref_logps [B, T]``
    and ``advantages [B]`` / ``[B, T]`` are tensors computed elsewhere (e.g. cached reference
    log-probs). ``grpo_options`` are the keyword options of :func:`alignops.losses.grpo_loss`
    (``loss_type``, ``beta``, ``epsilon``, ``num_items``, ...); the entropy is passed on for the
    ``entropy`` metric, ``entropy_coef`` and ``top_entropy_quantile``.

    ``process_group`` / ``vocab_size``: a vocabulary-parallel head, ``weight`` / ``bias`` being this
    rank's slice (as in :func:`alignops.linear_logprobs`); every rank returns the same loss.

    Returns the :class:`~alignops.losses.LossOutput` of ``grpo_loss``.
    """
    _check_options(grpo_loss, grpo_options, reserved=("ref_logps", "entropy"))
    need_entropy = (
        return_entropy
        or grpo_options.get("entropy_coef", 0.0) != 0.0
        or grpo_options.get("top_entropy_quantile", 1.0) < 1.0
    )
    truncated = grpo_options.get("mask_truncated")
    if truncated is not None and truncated.shape == completion_mask.shape[:1]:
        # truncated rows are never scored: leave them out of the vocab projection as well
        completion_mask = completion_mask.bool() & ~truncated.bool().unsqueeze(1)
    head = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    head.update(process_group=process_group, vocab_size=vocab_size)
    logps, entropy, valid = _policy_logps(hidden, weight, completion_ids, completion_mask, need_entropy, head)
    return grpo_loss(
        logps, old_logps, advantages, valid, ref_logps=ref_logps, entropy=entropy, **grpo_options
    )


def ppo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = True,
    ptx_hidden: torch.Tensor | None = None,
    ptx_labels: torch.Tensor | None = None,
    ptx_num_items: int | float | torch.Tensor | None = None,
    process_group=None,
    vocab_size: int | None = None,
    **ppo_options,
) -> LossOutput:
    """PPO / PPO-ptx loss straight from hidden states (InstructGPT, Ouyang et al. 2022,
    arXiv:2203.02155), no ``[N, V]`` logits.

    As :func:`grpo_loss_from_hidden` for the policy part: ``hidden [B, T, H]`` scores
    ``response_ids [B, T]`` under ``weight [V, H]`` (+ ``bias``) at ``temperature`` (TRL PPO
    samples at 0.7 and divides logits by ``temperature + 1e-7``: pass the value you sampled with).
    Values, returns and old values come in through ``ppo_options`` (the keyword options of
    :func:`alignops.losses.ppo_loss`).

    PPO-ptx: ``ptx_hidden [M, H]`` (any leading dims) with ``ptx_labels`` (already aligned to
    ``ptx_hidden``, ``ignore_index`` allowed) are scored with the same ``weight`` / ``bias`` /
    ``softcap`` at temperature 1 by :func:`alignops.linear_cross_entropy` (token mean, or
    ``/ ptx_num_items`` for gradient accumulation), and that NLL goes to ``ppo_loss(ptx_nll=...)``
    (``ptx_coef`` in ``ppo_options``; InstructGPT's gamma).

    ``process_group`` / ``vocab_size``: a vocabulary-parallel head, as in
    :func:`grpo_loss_from_hidden` (the PTX term too).
    """
    _check_options(ppo_loss, ppo_options, reserved=("entropy", "ptx_nll"))
    if (ptx_hidden is None) != (ptx_labels is None):
        raise ValueError("pass ptx_hidden and ptx_labels together")
    need_entropy = return_entropy or ppo_options.get("entropy_coef", 0.0) != 0.0
    par = dict(process_group=process_group, vocab_size=vocab_size)
    head = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index, **par)
    logps, entropy, valid = _policy_logps(hidden, weight, response_ids, response_mask, need_entropy, head)
    ptx_nll = None
    if ptx_hidden is not None:
        ptx_head = dict(bias=bias, ignore_index=ignore_index, softcap=softcap, num_items=ptx_num_items, **par)
        ptx_nll = linear_cross_entropy(ptx_hidden, weight, ptx_labels, reduction="mean", **ptx_head)
    return ppo_loss(logps, old_logps, advantages, valid, entropy=entropy, ptx_nll=ptx_nll, **ppo_options)
