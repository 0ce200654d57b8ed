"""TRL: every trainer's fused LM head on alignops' kernels, with one switch.

TRL (>= 1.16) scores tokens in DPOTrainer, KTOTrainer, GRPOTrainer, RLOOTrainer and SFTTrainer
through one seam: ``trl.trainer.utils.add_fused_lm_head`` patches the model so that
``model(..., labels=..., fused_lm_head=True)`` runs the decoder, then TRL's chunked head
(``ChunkedLogProbFunction``, looked up as a module global of ``trl.trainer.utils`` on every call)
on the last hidden states and the LM-head weight. :func:`enable` replaces that head with
:func:`alignops.linear_logprobs`, for every trainer and for models patched before or after the
switch::

    from alignops.bindings import trl as alignops_trl

    with alignops_trl.enable():           # or alignops_trl.enable() ... alignops_trl.disable()
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        trainer.train()

Every per-token field TRL asks for comes from one streaming pass over the vocabulary:
``log_probs`` (differentiable), ``entropy`` (differentiable), ``log_sum_sq_probs`` (WPO's weight,
Zhou et al., 2024, arXiv:2406.11827; returned without gradient, as TRL does), ``mean_logits``
(without gradient) and ``is_top1``. The logit transform is the one TRL resolves from the config
(``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``,
``final_logit_softcapping``) and passes to the head, with the trainer's temperature. FSDP2 heads
arrive as full tensors (TRL gathers a DTensor head before the call; a DTensor weight reaching the
head directly is gathered with ``full_tensor()``, differentiably); DeepSpeed ZeRO-3 heads are
refused (see below).

The DistillationTrainer's divergence head (``ChunkedDivergenceFunction``: TRL's generalized JSD
between student and teacher heads, Agarwal et al., 2024, arXiv:2306.13649) is replaced by
:func:`alignops.linear_divergence` (``kind="jsd"`` with TRL's ``beta``: 0 the forward KL(teacher ||
student), 1 the reverse KL, in between the mixture ``(1 - beta) p_student + beta p_teacher``; one
temperature for both heads; the gradient to the student only, the entropy without one).

Refused, with the reason, never silently left on TRL's code: a logit scale that is not a finite
number > 0, an unknown output name, DTensor hidden states, DeepSpeed ZeRO-3 (TRL gathers the head
for the forward only and re-gathers it in its own backward, which alignops' backward does not).

:func:`count_head_calls` counts the calls of TRL's heads and of alignops': with the switch on, TRL's
ran zero times.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import alignops

from . import _trl_losses
from ._common import autocast_dtype, full_head, head_logprobs, is_dtensor, to_compute
from ._trl_losses import LossCalls, count_loss_calls

#: The per-token fields of TRL's ``FusedCausalLMOutput`` the head computes, in its return order.
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class HeadCalls:
    """How many times each head ran (forward calls) inside :func:`count_head_calls`: TRL's
    log-prob and divergence heads together (``trl``), alignops' in their place (``alignops``)."""

    alignops: int = 0
    trl: int = 0


_counters: list[HeadCalls] = []


def fused_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
):
    """TRL's head call on alignops: same arguments as ``ChunkedLogProbFunction.apply``.

    Args:
        hidden: ``[N, H]`` last hidden states (already shifted and flattened by TRL).
        weight: ``[V, H]`` LM-head weight (a DTensor is gathered); bias ``[V]`` or ``None``.
        targets: ``[N]`` next-token ids in ``[0, V)`` (TRL masks ignored positions itself).
        temperature, final_logit_softcapping, logit_scale: ``z = softcap(logit_scale * (h W^T + b))
            / temperature``. ``chunk_size`` is TRL's tile width, unused (alignops tiles itself).
        outputs: names among :data:`OUTPUTS`; ``log_probs`` is always computed.

    Returns:
        ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` (fp32; bool
        for ``is_top1``) or ``None`` when not in ``outputs``. ``is_top1`` counts a tie with the
        largest logit as top-1 (TRL breaks ties toward the smaller id; exact float ties only).
    """
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"alignops.bindings.trl: unknown output(s) {unknown}; supported: {OUTPUTS}")
    if is_dtensor(hidden):
        raise TypeError("alignops.bindings.trl: hidden states are a DTensor; pass the local tensor")
    weight, bias = full_head(weight, bias)
    scale = float(logit_scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(
            f"alignops.bindings.trl: logit scale {logit_scale!r} read from the model config is not a finite "
            "number > 0; alignops' head does not support it (disable the switch for this model)"
        )
    if _zero3():
        raise NotImplementedError(
            "alignops.bindings.trl: DeepSpeed ZeRO-3 is not supported yet: alignops' backward reads the "
            "LM-head weight TRL gathered for the forward only (TRL's head re-gathers it in its backward). "
            "Use FSDP2, ZeRO-1/2, or disable the switch."
        )
    for c in _counters:
        c.alignops += 1
    out = head_logprobs(
        hidden,
        weight,
        targets,
        bias,
        temperature=temperature,
        softcap=final_logit_softcapping,
        logit_scale=scale,
        return_entropy="entropy" in outputs,
        return_log_sum_p2="log_sum_sq_probs" in outputs,
        return_mean_logit="mean_logits" in outputs,
        topk=1 if "is_top1" in outputs else 0,
    )
    is_top1 = None
    if out.topk_ids is not None:
        is_top1 = (out.topk_ids[..., 0] == targets) | (out.logps.detach() >= out.topk_logps[..., 0])
    lsp2 = None if out.log_sum_p2 is None else out.log_sum_p2.detach()
    mean = None if out.mean_logit is None else out.mean_logit.detach()
    return out.logps, out.entropy, lsp2, mean, is_top1


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


class AlignopsLogProbFunction:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (only ``apply`` is used by TRL)."""

    apply = staticmethod(fused_head)


def divergence_head(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    beta: float,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
):
    """TRL's divergence head on alignops: same arguments as ``ChunkedDivergenceFunction.apply``.

    Args:
        student_hidden: ``[N, Hs]``; student_weight ``[V, Hs]``; student_bias ``[V]`` or ``None``.
        teacher_hidden: ``[N, Ht]``; teacher_weight ``[V, Ht]``; teacher_bias ``[V]`` or ``None``.
        beta: in ``[0, 1]``: 0 the forward KL(teacher || student), 1 the reverse KL(student ||
            teacher), else the generalized JSD ``beta KL(t || m) + (1 - beta) KL(s || m)`` with
            ``m = (1 - beta) p_s + beta p_t`` (Agarwal et al., 2024, arXiv:2306.13649).
        temperature: divides both heads' logits, after each head's ``logit_scale`` and soft-cap.

    Returns:
        ``(divergence, entropy)``, each ``[N]`` fp32: the per-token divergence (differentiable
        with respect to the student only, as TRL's) and the student's entropy (no gradient).
    """
    if is_dtensor(student_hidden) or is_dtensor(teacher_hidden):
        raise TypeError("alignops.bindings.trl: hidden states are a DTensor; pass the local tensor")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"alignops.bindings.trl: the distillation beta must be in [0, 1], got {beta!r}")
    scales = (float(student_logit_scale), float(teacher_logit_scale))
    if not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(
            f"alignops.bindings.trl: logit scales {scales} read from the model configs must be finite "
            "numbers > 0; alignops' head does not support others (disable the switch for this model)"
        )
    if _zero3():
        raise NotImplementedError(
            "alignops.bindings.trl: DeepSpeed ZeRO-3 is not supported yet: alignops' backward reads the "
            "LM-head weight TRL gathered for the forward only. Use FSDP2, ZeRO-1/2, or disable the switch."
        )
    for c in _counters:
        c.alignops += 1
    student_weight, student_bias = full_head(student_weight, student_bias)
    teacher_weight, teacher_bias = full_head(teacher_weight, teacher_bias)
    s_dt, t_dt = autocast_dtype(student_hidden), autocast_dtype(teacher_hidden)
    # TRL's head gives the teacher no gradient: its tensors are detached
    teacher_hidden = teacher_hidden.detach().to(t_dt)
    teacher_weight = to_compute(teacher_weight.detach(), t_dt)
    teacher_bias = None if teacher_bias is None else to_compute(teacher_bias.detach(), t_dt)
    out = alignops.linear_divergence(
        student_hidden.to(s_dt),
        to_compute(student_weight, s_dt),
        teacher_hidden,
        teacher_weight,
        kind="jsd",
        beta=beta,
        b_p=to_compute(student_bias, s_dt),
        b_q=teacher_bias,
        temperature_p=temperature,
        temperature_q=temperature,
        softcap_p=student_final_logit_softcapping,
        softcap_q=teacher_final_logit_softcapping,
        logit_scale_p=scales[0],
        logit_scale_q=scales[1],
        reduction="none",
        return_entropy=True,
    )
    return out.loss, out.entropy.detach()


class AlignopsDivergenceFunction:
    """Stands in for TRL's ``ChunkedDivergenceFunction`` (only ``apply`` is used by TRL)."""

    apply = staticmethod(divergence_head)


# (owner, attribute name, original value) of every attribute replaced while enabled
_saved: list[tuple[object, str, object]] = []


def _set(owner, name: str, value) -> None:
    if not any(o is owner and n == name for o, n, _ in _saved):
        _saved.append((owner, name, vars(owner)[name]))
    setattr(owner, name, value)


def _original(owner, name: str):
    """``owner.name`` as it was before :func:`_set` replaced it (the current value if not replaced)."""
    for o, n, value in _saved:
        if o is owner and n == name:
            return value
    return getattr(owner, name)


class Switch:
    """Returned by :func:`enable`; ``with enable(): ...`` disables on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        disable()
        return False


def _hook_dpo_reference(lookup) -> None:
    """DPOTrainer's reference precompute (``precompute_ref_log_probs=True``) asks ``lookup`` first."""
    from trl import DPOTrainer

    precompute = _original(DPOTrainer, "_precompute_ref_logps")
    original_init = _original(DPOTrainer, "__init__")

    def checked_init(self, *args, **kwargs):
        cfg = kwargs.get("args", args[2] if len(args) > 2 else None)  # (model, ref_model, args, ...)
        if cfg is None or not getattr(cfg, "precompute_ref_log_probs", False):
            raise ValueError(
                "alignops.bindings.trl.enable(dpo_reference=...): the lookup is used where DPOTrainer "
                "precomputes reference log-probs; set DPOConfig(precompute_ref_log_probs=True)"
            )
        original_init(self, *args, **kwargs)

    def looked_up(self, dataset, name, batch_size):
        found = lookup(self, dataset, name)
        if found is None:  # not in the lookup: TRL precomputes them (on alignops' head)
            return precompute(self, dataset, name, batch_size)
        missing = {"ref_chosen_logps", "ref_rejected_logps"} - set(found.column_names)
        if missing or len(found) != len(dataset):
            raise ValueError(
                f"alignops.bindings.trl: the dpo_reference lookup returned a dataset of {len(found)} rows "
                f"(expected {len(dataset)}) missing {sorted(missing)}"
            )
        return found

    _set(DPOTrainer, "__init__", checked_init)
    _set(DPOTrainer, "_precompute_ref_logps", looked_up)


def cache_reference(cache, *, id_column: str | None = None):
    """A ``dpo_reference`` lookup for :func:`enable` reading an :mod:`alignops.cache` reference cache.

    ``cache``: a :class:`alignops.cache.ReferenceCache` (precomputed with the reference model on
    the training data), or a mapping from TRL's dataset name (``"train"``, ``"eval"``, or an eval
    dataset's key) to one; a name the mapping lacks is left to TRL (its own precompute).
    Each row's key is computed from the ids TRL tokenized (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``), so a cache tokenized otherwise (another tokenizer, chat template, EOS rule)
    raises :class:`alignops.cache.CacheKeyError` naming how many rows are missing, never a wrong
    value. ``id_column``: a dataset column that joined the keys at precompute time.

    Returns ``lookup(trainer, dataset, name)``: the dataset with ``ref_chosen_logps`` /
    ``ref_rejected_logps`` (the cached sums over each completion's tokens) added.
    """
    from collections.abc import Mapping

    from alignops.cache import reference_logps

    def lookup(trainer, dataset, name):
        found = cache.get(name) if isinstance(cache, Mapping) else cache
        if found is None:
            return None
        missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"alignops.bindings.trl.cache_reference: the tokenized {name!r} dataset has no "
                f"{sorted(missing)} (columns: {dataset.column_names})"
            )
        batch = {
            "prompt_input_ids": list(dataset["prompt_ids"]),
            "chosen_input_ids": list(dataset["chosen_ids"]),
            "rejected_input_ids": list(dataset["rejected_ids"]),
        }
        eids = None if id_column is None else [str(v) for v in dataset[id_column]]
        refs = reference_logps(found, batch, kind="preference", example_ids=eids, device="cpu")
        for col in ("ref_chosen_logps", "ref_rejected_logps"):
            dataset = dataset.add_column(col, refs[col].tolist())
        return dataset

    return lookup


def enable(*, dpo_reference=None, losses: bool = False) -> Switch:
    """Route every TRL trainer's fused LM head through alignops (idempotent).

    Patches ``trl.trainer.utils._ChunkedLogProbFunction`` (the head ``add_fused_lm_head``'s forward
    looks up on every call, so models patched earlier switch too) and the DistillationTrainer's
    divergence head (``ChunkedDivergenceFunction``, a module global of
    ``trl.trainer.distillation_trainer``) with :class:`AlignopsDivergenceFunction`.

    ``dpo_reference``: the hook for cached reference log-probs in DPOTrainer, a callable
    ``(trainer, dataset, name) -> dataset | None``. Where the trainer precomputes its reference
    log-probs (``DPOConfig(precompute_ref_log_probs=True)``, required: refused otherwise), it is
    given the tokenized dataset (``prompt_ids``, ``chosen_ids``, ``rejected_ids`` in TRL 1.16)
    and returns it with the columns ``ref_chosen_logps`` / ``ref_rejected_logps`` (summed over
    each completion's tokens), or ``None`` for TRL to compute them (on alignops' head);
    :func:`cache_reference` makes one from an :mod:`alignops.cache` reference cache. The hook
    stays until :func:`disable` (a later ``enable()`` without it keeps it).

    ``losses=True``: DPOTrainer, GRPOTrainer and KTOTrainer also compute their loss with alignops'
    catalog (:func:`alignops.losses.dpo_loss`, :func:`alignops.losses.grpo_loss`,
    :func:`alignops.losses.kto_loss`) from the per-token
    log-probs TRL computed; an option alignops lacks raises ``NotImplementedError`` at train
    time (:mod:`alignops.bindings._trl_losses`); :func:`count_loss_calls` counts the calls.
    """
    import trl.trainer.utils as trl_utils

    _set(trl_utils, "_ChunkedLogProbFunction", AlignopsLogProbFunction)
    if dpo_reference is not None:
        _hook_dpo_reference(dpo_reference)
    if losses:
        _trl_losses.patch(_set, _original)
    try:
        import trl.trainer.distillation_trainer as dist
    except ImportError:  # a TRL without the DistillationTrainer
        return Switch()
    _set(dist, "ChunkedDivergenceFunction", AlignopsDivergenceFunction)
    return Switch()


def disable() -> None:
    """Put TRL's own heads back (idempotent)."""
    while _saved:
        owner, name, value = _saved.pop()
        setattr(owner, name, value)


def is_enabled() -> bool:
    """Whether TRL's fused heads currently run on alignops."""
    import trl.trainer.utils as trl_utils

    return trl_utils._ChunkedLogProbFunction is AlignopsLogProbFunction


def _trl_heads() -> list:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    heads = [ChunkedLogProbFunction]
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except ImportError:  # a TRL without the divergence head
        return heads
    return heads + [ChunkedDivergenceFunction]


@contextlib.contextmanager
def count_head_calls():
    """Count the forward calls of alignops' heads and of TRL's (``ChunkedLogProbFunction``,
    ``ChunkedDivergenceFunction``)::

    with count_head_calls() as calls:
        trainer.train()
    assert calls.trl == 0 and calls.alignops > 0
    """
    calls = HeadCalls()
    originals = [(head, vars(head)["forward"]) for head in _trl_heads()]

    def counting(original):
        forward = original.__func__ if isinstance(original, staticmethod) else original

        def counting_forward(*args, **kwargs):
            calls.trl += 1
            return forward(*args, **kwargs)

        return staticmethod(counting_forward)

    for head, original in originals:
        head.forward = counting(original)
    _counters.append(calls)
    try:
        yield calls
    finally:
        _counters.remove(calls)
        for head, original in originals:
            head.forward = original


__all__ = [
    "OUTPUTS",
    "AlignopsDivergenceFunction",
    "AlignopsLogProbFunction",
    "HeadCalls",
    "LossCalls",
    "cache_reference",
    "count_head_calls",
    "count_loss_calls",
    "disable",
    "divergence_head",
    "enable",
    "fused_head",
    "is_enabled",
]
