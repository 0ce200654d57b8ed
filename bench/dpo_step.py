"""Benchmark family ``dpo_step``: one DPO loss step from the policy's last hidden states.

Batch as TRL builds it: ``[chosen; rejected]`` concatenated, ``2B`` sequences of ``T`` tokens
(``T = SEQ_LEN`` or less for tiny token counts, ``B = N // 2T``), the first ``PROMPT_FRACTION``
of every sequence labelled ``-100``. HF-style unshifted labels: the hidden state at position
``t`` scores ``labels[t + 1]``. Reference log-probs are precomputed (the cached-reference setup
alignops is built for), so the step is: policy sequence log-probs -> ``dpo_loss`` -> backward.

Providers differ only in the heavy part, hidden states -> per-sequence log-probs; all of them
finish with the same ``alignops.losses.dpo_loss`` (sigmoid, ``BETA``), an O(B) function.
  alignops       alignops.sequence.sequence_logprobs
  eager          alignops.reference.linear_logprobs_ref (full logits; it also computes entropy)
  torch.compile  the same, compiled
  trl            what TRL's DPO computes without its fused head: ``lm_head(h)`` logits in the input
                 dtype, then ``trl.trainer.utils.selective_log_softmax``
  trl-chunked    ``trl.kernels.ChunkedLogProbFunction`` (TRL's fused LM head)

Roofline counts as ``linear_cross_entropy`` with N = 2B·(T - 1) scored rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._harness import Bound, Case, Inputs, Provider, baseline_providers, generator, seq_len_setting
from ._peers import TRL_PRELOAD, compiled, trl_chunked_logprobs, trl_skip_reason, trl_version
from .linear_cross_entropy import lm_head_bytes, lm_head_flops, lm_head_grads_bytes

FAMILY = "dpo_step"
RATE_UNIT = "TFLOP/s"
SEQ_LEN = 256  # default T; `alignops bench --seq-len` (ALIGNOPS_BENCH_SEQ_LEN) overrides it
PROMPT_FRACTION = 0.5
BETA = 0.1
REF_NOISE = 0.5  # spread of the cached reference log-probs around the policy's (nats)
IGNORE_INDEX = -100
GRAD_NAMES = ["hidden", "weight"]
DEFAULT_MODES = ("fwd+bwd",)  # a training step; --mode asks for fwd / bwd explicitly


def unavailable() -> str | None:
    try:
        from alignops.losses import dpo_loss  # noqa: F401
        from alignops.sequence import sequence_logprobs, split_pair  # noqa: F401
    except ImportError as e:
        return f"alignops.sequence.sequence_logprobs / alignops.losses.dpo_loss not importable: {e}"
    return None


def layout(case: Case) -> tuple[int, int]:
    """``(pairs B, sequence length T)`` for ``case.tokens``."""
    seq_len = max(2, min(seq_len_setting(SEQ_LEN), case.tokens // 2))
    return max(1, case.tokens // (2 * seq_len)), seq_len


def _rows(case: Case) -> int:
    pairs, seq_len = layout(case)
    return 2 * pairs * (seq_len - 1)


def flops(case: Case, mode: str) -> float:
    return lm_head_flops(case, _rows(case), mode)


def bytes_moved(case: Case, mode: str) -> float:
    return lm_head_bytes(case, _rows(case), mode)


def grads_bytes(case: Case) -> int:
    pairs, seq_len = layout(case)
    return lm_head_grads_bytes(case, 2 * pairs * seq_len)  # dh covers every position


def make_inputs(case: Case) -> Inputs:
    from alignops.sequence import sequence_logprobs, split_pair

    pairs, seq_len = layout(case)
    g, dev = generator(case), case.device
    hidden = torch.randn(2 * pairs, seq_len, case.hidden, generator=g, device=dev)
    weight = torch.randn(case.vocab, case.hidden, generator=g, device=dev) / case.hidden**0.5
    labels = torch.randint(0, case.vocab, (2 * pairs, seq_len), generator=g, device=dev)
    labels[:, : int(PROMPT_FRACTION * seq_len)] = IGNORE_INDEX
    noise = REF_NOISE * torch.randn(2 * pairs, generator=g, device=dev)
    hidden = hidden.to(case.torch_dtype).requires_grad_()
    weight = weight.to(case.torch_dtype).requires_grad_()
    with torch.no_grad():
        ref = sequence_logprobs(hidden, weight, labels, softcap=case.softcap).sums + noise
    ref_chosen, ref_rejected = split_pair(ref)
    tensors = {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    return Inputs(tensors, [hidden, weight])


def _step(inputs: Inputs, sums: torch.Tensor) -> torch.Tensor:
    from alignops.losses import dpo_loss
    from alignops.sequence import split_pair

    chosen, rejected = split_pair(sums)
    t = inputs.tensors
    return dpo_loss(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        ref_chosen_logps=t["ref_chosen"],
        ref_rejected_logps=t["ref_rejected"],
        beta=BETA,
    ).loss


def _shifted(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = inputs.tensors
    return t["hidden"][:, :-1], t["weight"], t["labels"][:, 1:]


def _alignops(case: Case, inputs: Inputs) -> Bound:
    from alignops.sequence import sequence_logprobs

    t = inputs.tensors

    def fn() -> torch.Tensor:
        out = sequence_logprobs(t["hidden"], t["weight"], t["labels"], softcap=case.softcap)
        return _step(inputs, out.sums)

    return Bound(fn, inputs.leaves)


def reference_sums(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    from alignops.reference import linear_logprobs_ref

    logps, _entropy, _lse = linear_logprobs_ref(h, w, y, ignore_index=IGNORE_INDEX, softcap=softcap)
    return logps.sum(-1)


def _eager(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _shifted(inputs)
    return Bound(lambda: _step(inputs, reference_sums(h, w, y, case.softcap)), inputs.leaves)


def _torch_compile(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _shifted(inputs)
    sums = compiled(reference_sums)
    return Bound(lambda: _step(inputs, sums(h, w, y, case.softcap)), inputs.leaves)


def _trl(case: Case, inputs: Inputs) -> Bound:
    from trl.trainer.utils import selective_log_softmax

    h, w, y = _shifted(inputs)
    mask = y != IGNORE_INDEX

    def fn() -> torch.Tensor:
        logits = F.linear(h, w)
        if case.softcap is not None:
            logits = case.softcap * torch.tanh(logits / case.softcap)
        logps = selective_log_softmax(logits, y.clamp(min=0), row_mask=mask)
        return _step(inputs, logps.float().sum(-1))

    return Bound(fn, inputs.leaves)


def _trl_chunked(case: Case, inputs: Inputs) -> Bound:
    h, w, y = _shifted(inputs)

    def fn() -> torch.Tensor:
        logps, _ = trl_chunked_logprobs(h, w, y, softcap=case.softcap, ignore_index=IGNORE_INDEX)
        return _step(inputs, logps.sum(-1))

    return Bound(fn, inputs.leaves)


def providers() -> list[Provider]:
    return [
        *baseline_providers(_alignops, _eager, _torch_compile),
        Provider("trl", _trl, trl_skip_reason, trl_version, TRL_PRELOAD),
        Provider("trl-chunked", _trl_chunked, trl_skip_reason, trl_version, TRL_PRELOAD),
    ]
