"""transformers causal LMs: compute the training loss without ``[B, T, V]`` logits.

``patch_causal_lm(model)`` wraps ``model.forward``: calls with ``labels`` run the decoder,
then :func:`alignops.linear_cross_entropy` on the last hidden states and the LM-head
weight (HF's one-position shift, ``ignore_index=-100``, ``num_items_in_batch`` as the
global normaliser of SPEC §3.3, Gemma-2's ``final_logit_softcapping``, a ``logit_scale``
where the config has one). The output's ``logits`` is ``None`` for those calls; calls
without ``labels`` (generation, evaluation of logits) run the original forward.

One generic wrapper for every architecture that follows HF's ``XForCausalLM`` layout
(``get_decoder()`` and ``get_output_embeddings()``), no per-model copies of ``forward``::

    handle = patch_causal_lm(model)       # or: with patch_causal_lm(model): ...
    loss = model(input_ids, labels=labels).loss
    handle.remove()                        # the original forward is back
"""

from __future__ import annotations

import torch

import alignops

_DROP = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "return_dict")


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


def _head(model):
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    return head


def _decoder(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None:
        raise TypeError(f"{type(model).__name__} has no get_decoder(); cannot locate the base model")
    return dec


def patch_causal_lm(model, *, ignore_index: int = -100) -> PatchHandle:
    """Make ``model(..., labels=...)`` compute its loss with alignops' fused kernels.

    Returns a :class:`PatchHandle` (call ``.remove()`` or use it as a context manager).
    """
    head = _head(model)
    decoder = _decoder(model)
    cfg = getattr(model, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    logit_scale = getattr(cfg, "logit_scale", None)
    original = model.__dict__.get("forward")
    bound = model.forward

    def forward(*args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None or args:
            return bound(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.get("num_items_in_batch")
        shift_labels = kwargs.get("shift_labels")
        dec_kwargs = {k: v for k, v in kwargs.items() if k not in _DROP}
        out = decoder(**dec_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if shift_labels is None:
            # HF ForCausalLMLoss: the label of position t is labels[t + 1]; the last is ignored
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if logit_scale is not None:
            hidden = hidden * logit_scale
        loss = alignops.linear_cross_entropy(
            hidden,
            head.weight,
            shift_labels.to(hidden.device),
            bias=getattr(head, "bias", None),
            ignore_index=ignore_index,
            softcap=softcap,
            reduction="sum" if num_items is not None else "mean",
            num_items=num_items,
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    model.forward = forward
    return PatchHandle(model, original)


__all__ = ["PatchHandle", "patch_causal_lm"]
