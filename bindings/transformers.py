"""transformers causal LMs: compute the training loss without ``[B, T, V]`` logits.

``patch_causal_lm(model)`` wraps ``model.forward``: calls with ``labels`` run the decoder,
then :func:`alignops.linear_cross_entropy` on the last hidden states and the LM-head
weight (HF's one-position shift, ``ignore_index=-100``, ``num_items_in_batch`` as the
global token count of gradient accumulation, Gemma-2's ``final_logit_softcapping``, a
``logit_scale`` where the config has one). The output's ``logits`` is ``None`` for those
calls (``return_dict=False`` gives the tuple of the fields that are set); calls without
``labels`` (generation, evaluation of logits) run the original forward.

Arguments are matched to the original forward's signature, so positional and keyword calls
are fused alike. A call with ``labels`` that cannot be fused (positional arguments to a
``forward(*args, **kwargs)`` whose names are unknown) runs the original forward and says
why in a warning, once per patched model: never silently.

One generic wrapper for every architecture that follows HF's ``XForCausalLM`` layout
(``get_decoder()`` and ``get_output_embeddings()``), no per-model copies of ``forward``::

    handle = patch_causal_lm(model)       # or: with patch_causal_lm(model): ...
    loss = model(input_ids, labels=labels).loss
    handle.remove()                        # the original forward is back
"""

from __future__ import annotations

import inspect
import warnings
from typing import NamedTuple

import torch

import alignops

from ._common import full_head, head_logprobs

# Arguments of the causal-LM forward that the decoder does not take: the loss inputs, and
# ``logits_to_keep`` (no logits are computed on the fused path).
_LOSS_ONLY = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "return_dict")


class PatchHandle:
    """Undo handle of :func:`patch_causal_lm`; also a context manager."""

    def __init__(self, model, original_forward):
        self._model = model
        self._original = original_forward
        self.active = True

    def remove(self) -> None:
        if self.active:
            if self._original is None:
                del self._model.forward  # back to the class attribute
            else:
                self._model.forward = self._original
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def logit_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a causal LM's output logits, read from its (text) config.

    The conventions transformers models use for a multiplier on the LM-head output: ``logit_scale``
    (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``logits_scaling``
    (Granite and MiniCPM3 divide by it, HyperCLOVA X multiplies), the first that is set wins; 1.0
    when none is. ``final_logit_softcapping`` (Gemma-2 / Gemma-3) is the soft-cap applied after it.
    Raises ``ValueError`` for a scale alignops cannot represent (not a finite number > 0).
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(cfg, name, None)
        if scale is not None:
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        div = cfg.logits_scaling
        scale = div if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / div
    scale = 1.0 if scale is None else float(scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(
            f"alignops: the config's logit multiplier is {scale!r}; the fused head needs a finite scale > 0"
        )
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (None if softcap is None else float(softcap))


def _head(model):
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    return head


def _decoder(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None:
        base = getattr(model, "base_model", None)
        dec = base if base is not None and base is not model else None
    if dec is None:
        raise TypeError(
            f"{type(model).__name__} has no get_decoder() and no base_model; cannot locate the decoder "
            "whose last hidden states feed the LM head"
        )
    return dec


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: no introspectable signature
        return None


def _by_name(sig: inspect.Signature | None, args: tuple, kwargs: dict) -> dict | str | None:
    """The call's arguments as keywords, positional ones matched to the forward's parameters.

    Returns a dict; a string (why positional arguments cannot be named); or ``None`` when the
    call does not fit the signature (the original forward then raises its own precise error).
    """
    if not args:
        return dict(kwargs)
    if sig is None:
        return "the forward's signature cannot be read, so positional arguments have no name"
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    named: dict = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return f"the forward takes *{name}, so positional arguments have no name"
        else:
            named[name] = value
    return named


def patch_causal_lm(model, *, ignore_index: int = -100) -> PatchHandle:
    """Make ``model(..., labels=...)`` compute its loss with alignops' fused kernels.

    Positional arguments are bound to the original forward's signature (``model(input_ids,
    labels=labels)`` is fused). Returns a :class:`PatchHandle` (call ``.remove()`` or use it as
    a context manager).
    """
    head = _head(model)
    decoder = _decoder(model)
    cfg = getattr(model, "config", None)
    logit_scale, softcap = logit_transform(cfg) if cfg is not None else (1.0, None)
    original = model.__dict__.get("forward")
    bound = model.forward
    sig = _signature(bound)
    warned: list[str] = []

    def unfused(reason: str, args: tuple, kwargs: dict):
        if not warned:
            warned.append(reason)
            warnings.warn(
                f"alignops patch_causal_lm: {type(model).__name__} call with labels not fused ({reason}); "
                "the original forward runs and builds the full [B, T, V] logits. Pass the inputs by "
                "keyword (model(input_ids=..., labels=...)) to fuse it. (Warned once per model.)",
                UserWarning,
                stacklevel=3,
            )
        return bound(*args, **kwargs)

    def forward(*args, **kwargs):
        if not args and kwargs.get("labels") is None:
            return bound(**kwargs)  # no loss asked for: generation, logits
        call = _by_name(sig, args, kwargs)
        if isinstance(call, str) and kwargs.get("labels") is not None:
            return unfused(call, args, kwargs)
        if not isinstance(call, dict):
            return bound(*args, **kwargs)  # a bad call (the forward raises), or no known labels
        labels = call.get("labels")
        if labels is None:
            return bound(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = call.get("num_items_in_batch")
        shift_labels = call.get("shift_labels")
        return_dict = call.get("return_dict")
        out = decoder(**{k: v for k, v in call.items() if k not in _LOSS_ONLY})
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if shift_labels is None:
            # HF ForCausalLMLoss: the label of position t is labels[t + 1]; the last is ignored
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss = alignops.linear_cross_entropy(
            hidden,
            head.weight,
            shift_labels.to(hidden.device),
            bias=getattr(head, "bias", None),
            ignore_index=ignore_index,
            softcap=softcap,
            logit_scale=logit_scale,
            reduction="sum" if num_items is not None else "mean",
            num_items=num_items,
        )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )
        return result.to_tuple() if return_dict is False else result

    model.forward = forward
    return PatchHandle(model, original)


class CausalLMLogProbs(NamedTuple):
    """Output of :func:`causal_lm_logprobs`, each ``[B, T - 1]``, aligned with ``labels[:, 1:]``.

    logps:   ``log p(labels[:, t + 1] | tokens <= t)`` (float32; float64 for a float64 model), 0 where
             not scored; differentiable.
    entropy: the entropy of the next-token distribution at ``t`` (0 where not scored), or ``None``.
    mask:    bool, the scored positions.
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def _check_layout(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(decoder, head)`` of a causal LM, or a ``TypeError`` naming what is missing."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{name} has no .config; causal_lm_logprobs reads the logit scale / soft-cap from it")
    if getattr(cfg, "is_encoder_decoder", False):
        raise TypeError(
            f"{name} is an encoder-decoder model; causal_lm_logprobs needs a decoder-only causal LM"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{name} has no output embedding with a [vocab, hidden] weight (get_output_embeddings() gave "
            f"{type(head).__name__}); causal_lm_logprobs needs the LM head as a linear layer"
        )
    return _decoder(model), head


def causal_lm_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    return_entropy: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    **decoder_kwargs,
) -> CausalLMLogProbs:
    """Per-token log-probs of any transformers causal LM without its ``[B, T, V]`` logits.

    Runs the decoder (``get_decoder()``), then :func:`alignops.linear_logprobs` on the last hidden
    states and the output embedding's weight (tied or not, with its bias if any), with the logit
    multiplier and ``final_logit_softcapping`` of the model's config (:func:`logit_transform`). An
    FSDP2 (``fully_shard``) root model runs the computation inside its own call, so its hooks gather
    the embeddings and the head and reduce-scatter their gradients; a DTensor head met outside
    such a call is gathered with ``full_tensor()``. Under ``torch.autocast`` the matmul runs in
    its dtype.

    Args:
        model: a decoder-only ``XForCausalLM`` (Llama, Qwen2/3, Mistral, Gemma-2/3, GPT-2, MoE ...).
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding) or ``None``.
        labels: ``[B, T]`` the ids to score (HF convention: position ``t`` predicts ``labels[t + 1]``),
            ``ignore_index`` where not scored. Default: ``input_ids`` with padding ignored.
        position_ids: ``[B, T]``; for packed, padding-free rows (several sequences in one row,
            positions restarting at 0 for each, as flash-attn's varlen path and TRL's
            ``padding_free`` use them), the last token of a sequence is never scored against the
            first token of the next one.
        return_entropy: also return each position's entropy.
        temperature: divides the (scaled, soft-capped) logits.
        decoder_kwargs: passed to the decoder (e.g. ``pixel_values`` is not: text only).

    Returns:
        :class:`CausalLMLogProbs` with ``[B, T - 1]`` fields.
    """
    decoder, head = _check_layout(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    for nm, t in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(
                f"{nm} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}"
            )
    logit_scale, softcap = logit_transform(model.config)
    if labels is None:
        pad = None if attention_mask is None else attention_mask == 0
        labels = input_ids if pad is None else input_ids.masked_fill(pad, ignore_index)

    def fused(input_ids, attention_mask, position_ids, labels):
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **decoder_kwargs,
        )
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1]
        weight, bias = full_head(head.weight, getattr(head, "bias", None))
        if hidden.shape[-1] != weight.shape[1]:
            raise TypeError(
                f"{type(model).__name__}: the decoder's hidden size {hidden.shape[-1]} differs from the LM "
                f"head's input size {weight.shape[1]} (a projection between them is not supported)"
            )
        targets = labels[:, 1:].to(hidden.device)
        if position_ids is not None:  # packed rows: a sequence starts where the position restarts at 0
            targets = targets.masked_fill(position_ids[:, 1:].to(hidden.device) == 0, ignore_index)
        res = head_logprobs(
            hidden,
            weight,
            targets,
            bias,
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
            logit_scale=logit_scale,
            return_entropy=return_entropy,
        )
        return CausalLMLogProbs(res.logps, res.entropy, targets != ignore_index)

    args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    if not _is_fsdp(model):
        return fused(**args)
    # FSDP2 root: run inside the model's own call, so that its hooks gather the parameters it
    # owns (embeddings, LM head) and reduce-scatter their gradients in the backward
    saved = model.__dict__.get("forward")
    model.forward = fused
    try:
        return model(**args)
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved


__all__ = ["CausalLMLogProbs", "PatchHandle", "causal_lm_logprobs", "logit_transform", "patch_causal_lm"]
