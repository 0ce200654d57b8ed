"""Sequence reductions: per-token log-probs -> per-sequence log-probs (docs/losses.md, "Shared
notation").

Everything here is a short, differentiable PyTorch function on per-token log-probs ``ℓ [B, T]``
and a loss mask ``m [B, T]`` (1 = completion token that counts, 0 = prompt / padding /
ignored). With ``n = Σ_t m_t``:

    S(y) = Σ_t m_t ℓ_t              summed log-prob (DPO family default)      -> ``sums``
    n(y) = Σ_t m_t                  completion length                         -> ``counts`` (int64)
    A(y) = S(y) / max(1, n)         length-averaged log-prob (SimPO, IPO, ...) -> ``means``

Masked positions contribute exactly 0 to every sum (they are selected out with ``torch.where``,
so a NaN or ``-inf`` there cannot leak into a sum or a gradient) and are excluded from every count.

Layouts:

* padded ``[B, T]`` (:func:`reduce_padded`);
* packed (padding-free) ``[N]`` or ``[1, N]`` with segment boundaries given as flash-attention
  style ``cu_seqlens [S + 1]`` or as HF ``position_ids`` (a segment starts wherever
  ``position_ids == 0``) (:func:`reduce_packed`);
* a concatenated preference batch ``[chosen; rejected]`` of size ``2B`` (TRL computes both
  halves in one forward) -> :func:`split_pair`;
* ``K`` completions per prompt ``[B * K]`` -> ``[B, K]`` (:func:`group_by_prompt`).

Preference helpers: the LD-DPO shared-prefix / tail split (:func:`ld_dpo_logps`, Liu et al. 2024,
arXiv:2409.06411) and the WPO per-sequence log-weight (:func:`wpo_log_weights`, Zhou et al. 2024,
arXiv:2406.11827).

:func:`sequence_logprobs` is the one call from hidden states to per-sequence log-probs: it runs
:func:`alignops.linear_logprobs` (never materialising ``[tokens, vocab]`` logits) and reduces;
:func:`token_logprobs` is its per-token step on already aligned ids (the fused policy losses use it).
It takes HF-style **unshifted** labels by default (``shift=True``): ``labels[:, t]`` is the token
at position ``t`` (``input_ids`` with ``-100`` on prompt and padding, exactly what HF causal LMs
and TRL's ``labels`` are), and the hidden state at position ``t`` scores ``labels[:, t + 1]``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ._checks import check_same_shape
from .kernels._common import compute_dtype
from .linear_logprobs import linear_logprobs

__all__ = [
    "SequenceLogProbs",
    "cu_seqlens_from_position_ids",
    "group_by_prompt",
    "ld_dpo_logps",
    "reduce_packed",
    "reduce_padded",
    "sequence_logprobs",
    "split_pair",
    "token_logprobs",
    "wpo_log_weights",
]


class SequenceLogProbs(NamedTuple):
    """Per-sequence log-probs.

    sums:      ``S [B]`` (or ``[S]`` segments when packed), float32 (float64 for float64 input).
    counts:    ``n [B]`` completion tokens that count, int64.
    means:     ``A = S / max(1, n)`` ``[B]``, same dtype as ``sums``.
    per_token: the masked per-token log-probs ``[B, T']`` (0 at masked positions) when asked for,
               else ``None``.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    means: torch.Tensor
    per_token: torch.Tensor | None


def _check_logps_and_mask(per_token_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(per_token_logps, torch.Tensor) or not per_token_logps.is_floating_point():
        raise TypeError("per_token_logps must be a floating-point torch.Tensor")
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a torch.Tensor, got {type(loss_mask).__name__}")
    if loss_mask.shape != per_token_logps.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal per_token_logps shape "
            f"{tuple(per_token_logps.shape)}"
        )
    if per_token_logps.dim() < 1:
        raise ValueError("per_token_logps must have a time dimension [..., T]")
    return loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0


def _finish(sums: torch.Tensor, counts: torch.Tensor, per_token: torch.Tensor | None) -> SequenceLogProbs:
    means = sums / counts.clamp(min=1).to(sums.dtype)
    return SequenceLogProbs(sums, counts, means, per_token)


def reduce_padded(per_token_logps: torch.Tensor, loss_mask: torch.Tensor) -> SequenceLogProbs:
    """Masked sums, counts and means over the last (time) axis.

    per_token_logps: ``[..., T]`` (any float dtype; accumulated in float32, float64 stays float64).
    loss_mask:       ``[..., T]`` bool or 0/1 (nonzero = counts).
    Returns :class:`SequenceLogProbs` with ``[...]`` fields and ``per_token=None``.
    """
    mask = _check_logps_and_mask(per_token_logps, loss_mask)
    x = per_token_logps.to(compute_dtype(per_token_logps))
    sums = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)
    return _finish(sums, mask.sum(-1), None)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment boundaries of a packed row from HF ``position_ids`` (transformers' padding-free
    packing convention).

    position_ids: ``[N]`` or ``[1, N]``; a segment starts wherever ``position_ids == 0`` (and at
    index 0 whatever its value). Returns ``cu_seqlens [S + 1]`` int64: ``0 = c_0 < ... < c_S = N``.
    Needs one device-to-host sync (the number of segments is data dependent).
    """
    pos = _flat_packed("position_ids", position_ids)
    if pos.is_floating_point():
        raise TypeError(f"position_ids must be an integer tensor, got {pos.dtype}")
    n = pos.numel()
    starts = pos == 0
    if n:
        starts[0] = True
    idx = torch.nonzero(starts).flatten().to(torch.int64)
    return torch.cat([idx, torch.tensor([n], dtype=torch.int64, device=pos.device)])


def _flat_packed(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2 and t.shape[0] == 1:
        return t[0]
    if t.dim() != 1:
        raise ValueError(f"packed {name} must be [N] or [1, N], got shape {tuple(t.shape)}")
    return t


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S + 1]")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens needs at least two entries (0 and N)")
    cu = cu_seqlens.to(torch.int64)
    ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
    if not bool(ok):
        raise ValueError(
            f"cu_seqlens must start at 0, end at N = {n} and be non-decreasing, got {cu_seqlens.tolist()}"
        )
    return cu


def reduce_packed(
    per_token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> SequenceLogProbs:
    """Per-segment sums, counts and means of a packed (padding-free) row.

    per_token_logps, loss_mask: ``[N]`` or ``[1, N]``.
    Exactly one of ``cu_seqlens [S + 1]`` (segment ``s`` is ``[c_s, c_{s+1})``) or
    ``position_ids [N] | [1, N]`` (segments start where ``position_ids == 0``).
    Returns :class:`SequenceLogProbs` with ``[S]`` fields. Empty segments give sum 0, count 0.

    Deterministic and O(N): segment sums are differences of one float64 prefix sum (float64
    keeps the cancellation error near 1e-16 of the running total), no atomics, no ``[S, N]``
    matrix. Not available on devices without float64 (MPS).
    """
    if (cu_seqlens is None) == (position_ids is None):
        raise ValueError("pass exactly one of cu_seqlens or position_ids")
    x = _flat_packed("per_token_logps", per_token_logps)
    m = _flat_packed("loss_mask", loss_mask)
    mask = _check_logps_and_mask(x, m)
    n = x.numel()
    if cu_seqlens is None:
        if _flat_packed("position_ids", position_ids).numel() != n:
            raise ValueError(f"position_ids must have N = {n} entries")
        cu = cu_seqlens_from_position_ids(position_ids)
    else:
        cu = _check_cu_seqlens(cu_seqlens, n)
    cu = cu.to(x.device)
    out_dtype = compute_dtype(x)
    x64 = torch.where(mask, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    zero = x64.new_zeros(1)
    prefix = torch.cat([zero, torch.cumsum(x64, 0)])
    sums = (prefix[cu[1:]] - prefix[cu[:-1]]).to(out_dtype)
    izero = torch.zeros(1, dtype=torch.int64, device=x.device)
    cprefix = torch.cat([izero, torch.cumsum(mask.to(torch.int64), 0)])
    counts = cprefix[cu[1:]] - cprefix[cu[:-1]]
    return _finish(sums, counts, None)


def split_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a concatenated preference batch ``[chosen; rejected]`` ``[2B, ...]`` into two ``[B, ...]``
    views (TRL's one-forward layout)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("split_pair needs a tensor with a batch dimension [2B, ...]")
    if x.shape[0] % 2:
        raise ValueError(f"a concatenated chosen+rejected batch has an even size, got {x.shape[0]}")
    b = x.shape[0] // 2
    return x[:b], x[b:]


def group_by_prompt(
    x: torch.Tensor,
    num_samples: int,
    *,
    order: Literal["prompt_major", "sample_major"] = "prompt_major",
) -> torch.Tensor:
    """Group ``K = num_samples`` completions per prompt: ``[B * K, ...] -> [B, K, ...]``.

    order="prompt_major": row ``b * K + k`` is sample ``k`` of prompt ``b`` (prompts repeated with
                          ``repeat_interleave``, as TRL GRPO/RLOO do);
    order="sample_major": row ``k * B + b`` (K blocks of all prompts, as in TRL DPO's
                          ``[chosen; rejected]``, which is the K = 2 case).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("group_by_prompt needs a tensor with a batch dimension [B * K, ...]")
    if x.shape[0] % num_samples:
        raise ValueError(f"batch size {x.shape[0]} is not a multiple of num_samples = {num_samples}")
    b = x.shape[0] // num_samples
    rest = tuple(x.shape[1:])
    if order == "prompt_major":
        return x.reshape(b, num_samples, *rest)
    if order == "sample_major":
        return x.reshape(num_samples, b, *rest).transpose(0, 1)
    raise ValueError(f"unknown order {order!r}; valid choices: 'prompt_major', 'sample_major'")


def ld_dpo_logps(
    chosen_per_token_logps: torch.Tensor,
    rejected_per_token_logps: torch.Tensor,
    *,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO length-desensitised sequence log-probs (Liu et al. 2024, arXiv:2409.06411; TRL 1.16
    ``ld_alpha``).

    With ``l_p = min(n_w, n_l)`` per pair and completion positions counted through the mask
    (``pos_t = Σ_{t' ≤ t} m_t'``)::

        S^LD(y) = Σ_{m_t = 1, pos_t ≤ l_p} ℓ_t + ld_alpha · Σ_{m_t = 1, pos_t > l_p} ℓ_t

    chosen_per_token_logps [B, Tc], rejected_per_token_logps [B, Tr], masks of the same shapes.
    Returns ``(S^LD(y_w) [B], S^LD(y_l) [B])``. TRL 1.16 applies this to the policy **and** the
    reference log-probs: call it once for each, with the same masks. ``ld_alpha = 1`` gives plain
    sums, ``0`` truncates both responses to the shared length.
    """
    if not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha!r}")
    mc = _check_logps_and_mask(chosen_per_token_logps, chosen_mask)
    mr = _check_logps_and_mask(rejected_per_token_logps, rejected_mask)
    if chosen_per_token_logps.dim() != 2 or rejected_per_token_logps.dim() != 2:
        raise ValueError("ld_dpo_logps expects padded [B, T] per-token log-probs")
    if chosen_per_token_logps.shape[0] != rejected_per_token_logps.shape[0]:
        raise ValueError(
            f"chosen and rejected batch sizes differ: {chosen_per_token_logps.shape[0]} vs "
            f"{rejected_per_token_logps.shape[0]}"
        )
    shared = torch.minimum(mc.sum(-1), mr.sum(-1)).unsqueeze(-1)  # l_p [B, 1]

    def weighted(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        pos = torch.cumsum(m.to(torch.int64), -1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        head = torch.where(m & (pos <= shared), x, zero).sum(-1)
        tail = torch.where(m & (pos > shared), x, zero).sum(-1)
        return head + ld_alpha * tail

    return weighted(chosen_per_token_logps, mc), weighted(rejected_per_token_logps, mr)


def wpo_log_weights(
    per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """WPO per-sequence log-weight ``w̄(y)`` (Zhou et al. 2024, arXiv:2406.11827, Eq. 2), detached::

        w̄(y) = (1 / max(1, n)) Σ_t m_t [ ℓ_t − log Σ_v π_θ(v | ·)² ]

    per_token_logps, log_sum_sq_probs, loss_mask: ``[..., T]``. Returns ``w̄ [...]`` without grad;
    pass the chosen and rejected halves as
    ``dpo_loss(..., use_weighting=True, wpo_logw=split_pair(w))``.
    """
    mask = _check_logps_and_mask(per_token_logps, loss_mask)
    if log_sum_sq_probs.shape != per_token_logps.shape:
        raise ValueError("log_sum_sq_probs must have the shape of per_token_logps")
    with torch.no_grad():
        aligned = per_token_logps.to(compute_dtype(per_token_logps)) - log_sum_sq_probs
        return reduce_padded(aligned, mask).means


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    loss_mask: torch.Tensor | None = None,
    shift: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    return_per_token: bool = False,
) -> SequenceLogProbs:
    """Hidden states -> per-sequence log-probs in one call, differentiable in
    ``hidden``, ``weight`` and ``bias``; never builds ``[tokens, vocab]`` logits.

    hidden: ``[B, T, H]`` (padded) or ``[1, N, H]`` / ``[N, H]`` (packed); weight ``[V, H]``;
    bias ``[V]``; labels ``[B, T]`` (``[1, N]`` / ``[N]`` packed; a 1-D ``[N]`` is one row ``[1, N]``)
    int64 with ``ignore_index`` on every position that must not count.

    shift=True (default, HF causal-LM convention): ``labels`` are unshifted (``labels[:, t]`` is
    the token at position ``t``); the hidden state at ``t`` scores ``labels[:, t + 1]`` and the
    per-token output has ``T - 1`` positions, aligned with ``completion_mask[:, 1:]`` as in TRL.
    The label tensor is shifted, never the hidden states (no copy of ``hidden``).
    shift=False: ``labels`` are already aligned with ``hidden`` (``shift_labels``); ``T`` positions.

    loss_mask: optional ``labels``-shaped 0/1 mask in the labels' coordinates (e.g. TRL's
    ``completion_mask``); a position counts iff ``labels != ignore_index`` and ``loss_mask != 0``.

    Packed rows: pass ``cu_seqlens [S + 1]`` or ``position_ids`` (segments start where
    ``position_ids == 0``); with ``shift=True`` the prediction across a segment boundary is
    dropped. The result then has one entry per segment.

    Returns :class:`SequenceLogProbs` ``(sums [B], counts [B], means [B], per_token)``, with
    ``per_token [B, T - 1]`` (``[B, T]`` if not shifted) float32, 0 at masked positions, when
    ``return_per_token`` else ``None``.
    """
    packed = cu_seqlens is not None or position_ids is not None
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("pass at most one of cu_seqlens or position_ids")
    hidden, labels, loss_mask, squeeze = _as_rows(hidden, labels, loss_mask, packed=packed)
    cu = None
    if packed:
        n = labels.shape[1]
        cu = (
            cu_seqlens_from_position_ids(position_ids)
            if cu_seqlens is None
            else _check_cu_seqlens(cu_seqlens, n)
        )
    targets = _shifted_targets(labels, loss_mask, ignore_index, shift, cu)
    opts = dict(bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    logps, _, mask = token_logprobs(hidden, weight, targets, **opts)
    if shift:
        logps, mask = logps[:, :-1], mask[:, :-1]
    if cu is None:
        out = reduce_padded(logps, mask)
    else:
        out = reduce_packed(logps, mask, cu_seqlens=cu.to(logps.device).clamp(max=logps.shape[1]))
    per_token = None
    if return_per_token:
        per_token = torch.where(mask, logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
        per_token = per_token[0] if squeeze else per_token
    return out._replace(per_token=per_token)


def _as_rows(hidden, labels, loss_mask, *, packed: bool):
    """Checks ``hidden [B, T, H]`` / ``labels [B, T]`` (a packed ``[N]`` row becomes ``[1, N]``)."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 (or int32) tensor of token ids")
    squeeze = labels.dim() == 1
    if squeeze:
        labels, hidden = labels.unsqueeze(0), hidden.unsqueeze(0)
        loss_mask = None if loss_mask is None else loss_mask.unsqueeze(0)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T] (or packed [N] / [1, N]), got shape {tuple(labels.shape)}")
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"hidden must be [B, T, H] matching labels [B, T] = {tuple(labels.shape)}, "
            f"got {tuple(hidden.shape)}"
        )
    if packed and labels.shape[0] != 1:
        raise ValueError(f"packed sequences are one row [1, N], got {labels.shape[0]} rows")
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape {tuple(labels.shape)}"
        )
    return hidden, labels, loss_mask, squeeze


def _shifted_targets(labels, loss_mask, ignore_index: int, shift: bool, cu) -> torch.Tensor:
    """The ids each hidden state scores: ``labels`` with ``ignore_index`` where they do not count,
    shifted left by one when ``shift`` (never scoring across a packed segment boundary)."""
    valid = labels != ignore_index
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    targets = labels.masked_fill(~valid, ignore_index)
    if not shift:
        return targets
    b, t = labels.shape
    if t < 1:
        raise ValueError("shift=True needs at least one position")
    targets = torch.cat([targets[:, 1:], targets.new_full((b, 1), ignore_index)], dim=1)
    if cu is not None:
        # the last token of a segment would score the first token of the next one: drop it
        nxt_start = torch.zeros(t + 1, dtype=torch.bool, device=labels.device)
        nxt_start[cu.to(labels.device)[1:-1]] = True
        targets = targets.masked_fill(nxt_start[1:].unsqueeze(0), ignore_index)
    return targets


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    process_group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log-probs of ``ids`` already aligned with ``hidden`` (``hidden[..., t, :]`` scores
    ``ids[..., t]``), scored only where ``mask`` (default: everywhere) and ``ids != ignore_index``.

    One :func:`alignops.linear_logprobs` pass (no ``[tokens, vocab]`` logits). Returns
    ``(logps, entropy, scored)``: ``logps`` float32 (float64 for float64 inputs) and, with
    ``return_entropy``, the per-token ``entropy`` (else ``None``), both exactly 0 with zero gradient
    where not scored; ``scored`` is the bool mask of the scored positions. ``process_group`` /
    ``vocab_size``: a vocabulary-parallel head (``weight`` is this rank's slice), as in
    :func:`alignops.linear_logprobs`.
    """
    scored = ids != ignore_index
    if mask is not None:
        check_same_shape("ids", ids, mask=mask)
        scored = scored & mask.bool()
    targets = torch.where(scored, ids, torch.full_like(ids, ignore_index))
    out = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        return_entropy=return_entropy,
        process_group=process_group,
        vocab_size=vocab_size,
    )
    return out.logps, out.entropy, scored
