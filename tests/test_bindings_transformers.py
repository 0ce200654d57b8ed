"""The transformers binding: patched loss == the model's own loss, values and gradients.

Tiny random models built from configs (no weights are downloaded).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alignops.bindings.transformers import patch_causal_lm  # noqa: E402

from tests._assert import assert_close  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=211,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).double()


def _gemma2():
    cfg = transformers.Gemma2Config(
        vocab_size=157,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=3.0,
    )
    return transformers.Gemma2ForCausalLM(cfg).double()


def _batch(vocab):
    ids = torch.randint(0, vocab, (3, 13))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("make", [_llama, _gemma2], ids=["llama", "gemma2-softcap"])
@pytest.mark.parametrize("num_items", [None, 17])
def test_patched_loss_matches_model(make, num_items):
    model = make()
    ids, labels = _batch(model.config.vocab_size)
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    ref = model(input_ids=ids, labels=labels, **kw).loss
    ref_grads = torch.autograd.grad(ref * 1.7, list(model.parameters()), allow_unused=True)
    with patch_causal_lm(model) as handle:
        out = model(input_ids=ids, labels=labels, **kw)
        assert out.logits is None
        got_grads = torch.autograd.grad(out.loss * 1.7, list(model.parameters()), allow_unused=True)
    assert not handle.active
    # HF's loss upcasts the logits to float32 (even for a float64 model): fp32-level agreement
    assert_close("loss", ref.detach(), out.loss.detach(), atol=1e-6, rtol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), ref_grads, got_grads):
        if a is None:
            assert b is None or b.abs().max() == 0, name
            continue
        assert_close(name, a, b, atol=1e-6, rtol=1e-5)
    # unpatched again: logits are back
    assert model(input_ids=ids, labels=labels).logits is not None


def test_calls_without_labels_use_the_original_forward():
    model = _llama()
    ids, _ = _batch(model.config.vocab_size)
    ref = model(input_ids=ids).logits
    handle = patch_causal_lm(model)
    out = model(input_ids=ids).logits
    handle.remove()
    assert_close("logits", ref.detach(), out.detach(), atol=0.0)


def _docstring_example() -> str:
    """The code block of the binding's module docstring, dedented."""
    import textwrap

    import alignops.bindings.transformers as binding

    doc = binding.__doc__
    block = doc[doc.index("::\n") + 3 :]
    return textwrap.dedent(block).strip()


def test_docstring_example_is_fused(monkeypatch):
    """The module docstring's own example (positional ``input_ids``) runs the fused loss."""
    import alignops

    model = _llama()
    input_ids, labels = _batch(model.config.vocab_size)
    ref = model(input_ids=input_ids, labels=labels).loss
    calls = []
    fused = alignops.linear_cross_entropy
    monkeypatch.setattr(alignops, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    code = _docstring_example()
    assert "model(input_ids, labels=labels)" in code
    ns = {"patch_causal_lm": patch_causal_lm, "model": model, "input_ids": input_ids, "labels": labels}
    exec(code, ns)
    assert calls == [1], "the docstring's call did not go through alignops.linear_cross_entropy"
    assert not ns["handle"].active
    assert_close("loss", ref.detach(), ns["loss"].detach(), atol=1e-6, rtol=1e-6)


def test_positional_and_tuple_calls_are_fused():
    model = _llama()
    ids, labels = _batch(model.config.vocab_size)
    ref = model(input_ids=ids, labels=labels).loss.detach()
    mask = torch.ones_like(ids)
    with patch_causal_lm(model):
        out = model(ids, mask, labels=labels)  # input_ids, attention_mask by position
        assert out.logits is None
        assert_close("loss", ref, out.loss.detach(), atol=1e-6, rtol=1e-6)
        tup = model(ids, labels=labels, return_dict=False)
        assert isinstance(tup, tuple)
        assert_close("loss", ref, tup[0].detach(), atol=1e-6, rtol=1e-6)


class _ArgsForward(transformers.LlamaForCausalLM):
    """A forward that hides its parameter names (as some wrappers do)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_unfusable_call_warns_once_and_runs_the_original():
    model = _ArgsForward(_llama().config).double()
    ids, labels = _batch(model.config.vocab_size)
    ref = model(input_ids=ids, labels=labels).loss.detach()
    with patch_causal_lm(model):
        with pytest.warns(UserWarning, match=r"not fused \(the forward takes \*args"):
            out = model(ids, labels=labels)
        assert out.logits is not None  # the original forward ran, and said so
        assert_close("loss", ref, out.loss.detach(), atol=1e-6, rtol=1e-6)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(ids, labels=labels)  # once per model: no second warning
            assert model(input_ids=ids, labels=labels).logits is None  # keywords: fused
