"""Benchmark family ``grpo_step``: one GRPO loss step from the policy's last hidden states.

``S`` sampled completions of ``T = SEQ_LEN`` positions (``S = N // T``), right-padded: completion
``i`` has a length drawn uniformly from ``[MIN_LENGTH_FRACTION·T, T]``. Hidden states are already
aligned with the completion ids (``hidden[:, t]`` scores ``ids[:, t]``). On-policy
(``old_logps=None``), advantages ~ N(0, 1), TRL's defaults (``loss_type="dapo"``, ``beta=0``), the
entropy computed for the logged metric as TRL does.

Providers differ in the heavy part (per-token log-probs and entropy); all finish with
``alignops.losses.grpo_loss``.
  alignops       alignops.grpo_loss_from_hidden (fused; entropy from the same pass)
  eager          alignops.reference.linear_logprobs_ref (full logits, log-probs + entropy)
  torch.compile  the same, compiled
  trl            TRL GRPO without its fused head: ``lm_head(h)`` logits in the input dtype,
                 ``selective_log_softmax`` and ``entropy_from_logits`` (no grad, as TRL)
  trl-chunked    ``trl.kernels.ChunkedLogProbFunction`` with the entropy output

Roofline counts as ``linear_cross_entropy`` with N = S·T rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import alignops

from ._harness import Bound, Case, Inputs, Provider, baseline_providers, generator, seq_len_setting
from ._peers import TRL_PRELOAD, compiled, trl_chunked_logprobs, trl_skip_reason, trl_version
from .linear_cross_entropy import lm_head_bytes, lm_head_flops, lm_head_grads_bytes

FAMILY = "grpo_step"
RATE_UNIT = "TFLOP/s"
SEQ_LEN = 256  # default T; `alignops bench --seq-len` (ALIGNOPS_BENCH_SEQ_LEN) overrides it
MIN_LENGTH_FRACTION = 0.5
IGNORE_INDEX = -100
GRAD_NAMES = ["hidden", "weight"]
DEFAULT_MODES = ("fwd+bwd",)  # a training step; --mode asks for fwd / bwd explicitly


def unavailable() -> str | None:
    try:
        from alignops.losses import grpo_loss  # noqa: F401
    except ImportError as e:
        return f"alignops.losses.grpo_loss not importable: {e}"
    if not hasattr(alignops, "grpo_loss_from_hidden"):
        return "alignops.grpo_loss_from_hidden is missing"
    return None


def layout(case: Case) -> tuple[int, int]:
    """``(completions S, length T)`` for ``case.tokens``."""
    seq_len = max(1, min(seq_len_setting(SEQ_LEN), case.tokens))
    return max(1, case.tokens // seq_len), seq_len


def _rows(case: Case) -> int:
    completions, seq_len = layout(case)
    return completions * seq_len


def flops(case: Case, mode: str) -> float:
    return lm_head_flops(case, _rows(case), mode)


def bytes_moved(case: Case, mode: str) -> float:
    return lm_head_bytes(case, _rows(case), mode)


def grads_bytes(case: Case) -> int:
    return lm_head_grads_bytes(case, _rows(case))


def make_inputs(case: Case) -> Inputs:
    completions, seq_len = layout(case)
    g, dev = generator(case), case.device
    hidden = torch.randn(completions, seq_len, case.hidden, generator=g, device=dev)
    weight = torch.randn(case.vocab, case.hidden, generator=g, device=dev) / case.hidden**0.5
    ids = torch.randint(0, case.vocab, (completions, seq_len), generator=g, device=dev)
    min_length = int(MIN_LENGTH_FRACTION * seq_len)
    lengths = torch.randint(min_length, seq_len + 1, (completions,), generator=g, device=dev)
    mask = torch.arange(seq_len, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
    advantages = torch.randn(completions, generator=g, device=dev)
    hidden = hidden.to(case.torch_dtype).requires_grad_()
    weight = weight.to(case.torch_dtype).requires_grad_()
    tensors = {"hidden": hidden, "weight": weight, "ids": ids, "mask": mask, "advantages": advantages}
    return Inputs(tensors, [hidden, weight])


def _loss(inputs: Inputs, logps: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    from alignops.losses import grpo_loss

    t = inputs.tensors
    return grpo_loss(
        logps=logps, old_logps=None, advantages=t["advantages"], completion_mask=t["mask"], entropy=entropy
    ).loss


def _alignops(case: Case, inputs: Inputs) -> Bound:
    t = inputs.tensors
    return Bound(
        lambda: (
            alignops.grpo_loss_from_hidden(
                hidden=t["hidden"],
                weight=t["weight"],
                completion_ids=t["ids"],
                completion_mask=t["mask"],
                old_logps=None,
                advantages=t["advantages"],
                softcap=case.softcap,
            ).loss
        ),
        inputs.leaves,
    )


def _masked_ids(inputs: Inputs) -> torch.Tensor:
    t = inputs.tensors
    return torch.where(t["mask"], t["ids"], torch.full_like(t["ids"], IGNORE_INDEX))


def reference_logps(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, softcap: float | None):
    from alignops.reference import linear_logprobs_ref

    logps, entropy, _lse = linear_logprobs_ref(h, w, y, ignore_index=IGNORE_INDEX, softcap=softcap)
    return logps, entropy


def _eager(case: Case, inputs: Inputs) -> Bound:
    t, y = inputs.tensors, _masked_ids(inputs)
    return Bound(
        lambda: _loss(inputs, *reference_logps(t["hidden"], t["weight"], y, case.softcap)), inputs.leaves
    )


def _torch_compile(case: Case, inputs: Inputs) -> Bound:
    t, y = inputs.tensors, _masked_ids(inputs)
    fn = compiled(reference_logps)
    return Bound(lambda: _loss(inputs, *fn(t["hidden"], t["weight"], y, case.softcap)), inputs.leaves)


def _trl(case: Case, inputs: Inputs) -> Bound:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    t = inputs.tensors

    def fn() -> torch.Tensor:
        logits = F.linear(t["hidden"], t["weight"])
        if case.softcap is not None:
            logits = case.softcap * torch.tanh(logits / case.softcap)
        logps = selective_log_softmax(logits, t["ids"])
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        return _loss(inputs, logps.float(), entropy.float())

    return Bound(fn, inputs.leaves)


def _trl_chunked(case: Case, inputs: Inputs) -> Bound:
    t, y = inputs.tensors, _masked_ids(inputs)

    def fn() -> torch.Tensor:
        logps, entropy = trl_chunked_logprobs(
            t["hidden"], t["weight"], y, softcap=case.softcap, ignore_index=IGNORE_INDEX, entropy=True
        )
        return _loss(inputs, logps, entropy)

    return Bound(fn, inputs.leaves)


def providers() -> list[Provider]:
    return [
        *baseline_providers(_alignops, _eager, _torch_compile),
        Provider("trl", _trl, trl_skip_reason, trl_version, TRL_PRELOAD),
        Provider("trl-chunked", _trl_chunked, trl_skip_reason, trl_version, TRL_PRELOAD),
    ]
