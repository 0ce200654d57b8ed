"""TRL trainers' losses on alignops' catalog (``enable(losses=True)`` in :mod:`alignops.bindings.trl`).

The seam is each trainer's ``_compute_loss``: TRL's method still runs the forward passes and logs
its metrics; the per-token log-probs it computed are captured and the loss it returns is replaced
by alignops' (:func:`alignops.losses.dpo_loss` for DPOTrainer, :func:`alignops.losses.grpo_loss`
for GRPOTrainer, :func:`alignops.losses.kto_loss` for KTOTrainer), so the gradient is alignops'.
A configuration whose option alignops' loss lacks raises ``NotImplementedError`` naming the
option, never a silent fallback to TRL's loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class LossCalls:
    """How many losses alignops computed in TRL trainers inside :func:`count_loss_calls`."""

    dpo: int = 0
    grpo: int = 0
    kto: int = 0


_counters: list[LossCalls] = []


@contextlib.contextmanager
def count_loss_calls():
    """``with count_loss_calls() as calls: trainer.train()``; then ``calls.dpo`` / ``calls.grpo`` /
    ``calls.kto``."""
    calls = LossCalls()
    _counters.append(calls)
    try:
        yield calls
    finally:
        _counters.remove(calls)


def _count(field: str) -> None:
    for c in _counters:
        setattr(c, field, getattr(c, field) + 1)


def _refuse(trainer: str, what: str) -> None:
    raise NotImplementedError(f"alignops.bindings.trl.enable(losses=True): {trainer} with {what}: {_WHY}")


_WHY = "alignops' loss has no such option; disable losses=True to keep TRL's loss"


def _replace_loss(result, loss):
    return (loss, result[1]) if isinstance(result, tuple) else loss


# ----------------------------------------------------------------------------------------------
# DPOTrainer
# ----------------------------------------------------------------------------------------------


def _check_dpo(trainer) -> None:
    if trainer.ld_alpha is not None:
        _refuse("DPOTrainer", f"ld_alpha={trainer.ld_alpha} (LD-DPO length desensitization)")
    if trainer.aux_loss_enabled:
        _refuse("DPOTrainer", "a MoE router auxiliary loss (output_router_logits)")


def dpo_compute_loss(original):
    """``DPOTrainer._compute_loss`` returning :func:`alignops.losses.dpo_loss` of TRL's log-probs."""

    def _compute_loss(self, model, inputs, return_outputs):
        from alignops.losses import dpo_loss
        from alignops.sequence import split_pair, wpo_log_weights

        _check_dpo(self)
        captured: list = []
        modules = [model] + ([self.ref_model] if self.ref_model not in (None, model) else [])
        handles = _capture_fused_forwards(modules, captured)
        try:
            result = original(self, model, inputs, return_outputs)
        finally:
            for h in handles:
                h.remove()
        mask = inputs["completion_mask"]
        shift_mask = mask[..., 1:]
        seq_len = shift_mask.size(1)
        token_logps = captured[0].log_probs[:, -seq_len:]  # [2B, T-1], chosen rows then rejected
        chosen, rejected = token_logps.sum(1).chunk(2)
        if self.precompute_ref_logps:
            ref = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        else:
            ref = captured[1].log_probs[:, -seq_len:].sum(1).chunk(2)
        lengths = mask.sum(1).chunk(2)
        chosen_nll = None
        if "sft" in self.loss_types:
            chosen_nll = -token_logps.chunk(2)[0][shift_mask.chunk(2)[0].bool()].mean()
        wpo = None
        if self.use_weighting:
            lsp2 = captured[0].log_sum_sq_probs[:, -seq_len:]
            wpo = split_pair(wpo_log_weights(token_logps, lsp2, shift_mask))
        out = dpo_loss(
            chosen,
            rejected,
            ref[0],
            ref[1],
            beta=self.beta,
            loss_type=list(self.loss_types),
            loss_weights=list(self.loss_weights),
            label_smoothing=self.label_smoothing,
            f_divergence_type=str(self.f_divergence_type),
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            use_weighting=self.use_weighting,
            discopop_tau=self.args.discopop_tau,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
            chosen_nll=chosen_nll,
            wpo_logw=wpo,
        )
        _count("dpo")
        return _replace_loss(result, out.loss)

    return _compute_loss


# ----------------------------------------------------------------------------------------------
# GRPOTrainer
# ----------------------------------------------------------------------------------------------

GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")


def _check_grpo(trainer) -> None:
    if trainer.loss_type not in GRPO_TYPES:
        _refuse("GRPOTrainer", f"loss_type={trainer.loss_type!r} (supported here: {list(GRPO_TYPES)})")
    if trainer.top_entropy_quantile < 1.0:
        _refuse("GRPOTrainer", f"top_entropy_quantile={trainer.top_entropy_quantile}")
    if trainer.off_policy_mask_threshold is not None:
        _refuse("GRPOTrainer", f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}")
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        _refuse("GRPOTrainer", "vLLM importance-sampling correction")
    if trainer._entropy_bonus_enabled:
        _refuse("GRPOTrainer", "an entropy bonus (entropy_coef / adaptive entropy)")
    if trainer.aux_loss_enabled:
        _refuse("GRPOTrainer", "a MoE router auxiliary loss (output_router_logits)")


def grpo_compute_loss(original):
    """``GRPOTrainer._compute_loss`` returning :func:`alignops.losses.grpo_loss` of TRL's log-probs."""

    def _compute_loss(self, model, inputs):
        from alignops.losses import grpo_loss
        from alignops.losses._grpo_types import SAPOOptions

        _check_grpo(self)
        captured = []
        scorer = self._get_per_token_logps_and_entropies

        def capturing(*args, **kwargs):
            got = scorer(*args, **kwargs)
            captured.append(got[0])
            return got

        self._get_per_token_logps_and_entropies = capturing  # instance attribute, for this call only
        try:
            result = original(self, model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                num_items = num_items * accumulation / self.args.steps_per_generation
        a = self.args
        out = grpo_loss(
            captured[0],
            inputs.get("old_per_token_logps"),
            inputs["advantages"],
            mask,
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta,
            epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=a.delta,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=a.use_bias_correction_kl,
            num_items=num_items,
            max_completion_length=self.max_completion_length,
            sapo=SAPOOptions(a.sapo_temperature_pos, a.sapo_temperature_neg)
            if self.loss_type == "sapo"
            else None,
        )
        loss = out.loss if num_items is not None else out.loss / accumulation
        _count("grpo")
        return loss if not isinstance(result, tuple) else (loss, *result[1:])

    return _compute_loss


# ----------------------------------------------------------------------------------------------
# KTOTrainer
# ----------------------------------------------------------------------------------------------


def _capture_fused_forwards(modules, captured: list):
    def hook(module, args, kwargs, out):
        if kwargs.get("fused_lm_head"):
            captured.append(out)

    return [m.register_forward_hook(hook, with_kwargs=True) for m in modules]


def kto_compute_loss(original):
    """``KTOTrainer._compute_loss`` returning :func:`alignops.losses.kto_loss` of TRL's log-probs
    (the reference point z0: the mismatched-pair KL TRL computed and logged, averaged over ranks)."""

    def _compute_loss(self, model, inputs, return_outputs):
        from alignops.losses import kto_loss

        if self.aux_loss_enabled:
            _refuse("KTOTrainer", "a MoE router auxiliary loss (output_router_logits)")
        if self.loss_type not in ("kto", "apo_zero_unpaired"):
            _refuse("KTOTrainer", f"loss_type={self.loss_type!r}")
        captured: list = []
        modules = [model] + ([self.ref_model] if self.ref_model not in (None, model) else [])
        handles = _capture_fused_forwards(modules, captured)
        try:
            result = original(self, model, inputs, return_outputs)
        finally:
            for h in handles:
                h.remove()
        # TRL's forwards, in order: [policy KL pairs], policy, ([reference KL pairs], reference)
        kl_calls = 1 if self.calculate_KL else 0
        seq_len = inputs["input_ids"].size(1) - 1
        logps = captured[kl_calls].log_probs[:, -seq_len:].sum(-1)
        if self.precompute_ref_logps:
            ref = inputs["ref_logps"].to(logps.device)
        else:
            ref = captured[-1].log_probs[:, -seq_len:].sum(-1)
        label = torch.as_tensor(inputs["label"], dtype=torch.bool, device=logps.device)
        mode = "train" if self.model.training else "eval"
        kl = self._metrics[mode]["kl"][-1] if self.calculate_KL else 0.0
        out = kto_loss(
            logps[label],
            logps[~label],
            ref[label],
            ref[~label],
            kl=kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )
        _count("kto")
        return _replace_loss(result, out.loss)

    return _compute_loss


def patch(set_attr, original_of) -> None:
    """Replace the trainers' ``_compute_loss`` through ``set_attr(owner, name, value)``."""
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer

    set_attr(DPOTrainer, "_compute_loss", dpo_compute_loss(original_of(DPOTrainer, "_compute_loss")))
    set_attr(GRPOTrainer, "_compute_loss", grpo_compute_loss(original_of(GRPOTrainer, "_compute_loss")))
    set_attr(KTOTrainer, "_compute_loss", kto_compute_loss(original_of(KTOTrainer, "_compute_loss")))
